//! The CUDA path on a real GPU.
//!
//! Every test here needs a CUDA device and a model exported on it with `cuda-float16` and
//! `cuda-float32` variants, named by `BATCHBOX_CUDA_MODEL` (a model directory). They are
//! `#[ignore]`d, so a plain `cargo test` on a machine without a GPU lists them as ignored, never
//! as passed. `make gpu-check` (tools/gpu_check.sh) exports DeBERTa-v3-large on the GPU machine
//! and runs this binary with `--ignored`; there a missing GPU or model is a failure.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use batchbox_batcher::ChunkOrder;
use batchbox_metrics::{Scrape, names};
use batchbox_model::{Model, Output, Precision, QueueOptions};
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use serde::Deserialize;

fn model_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("BATCHBOX_CUDA_MODEL").expect("BATCHBOX_CUDA_MODEL names a model exported with cuda variants"),
    )
}

fn load(use_fp16: bool, max_sequences: usize, max_tokens: usize) -> Arc<Model> {
    let model = batchbox_model_tch::load(&ModelOptions {
        path: model_dir(),
        device: DeviceSpec::Cuda(0),
        use_fp16,
        cpu_dtype: CpuDtype::Fp32,
        cpu_backend: FormatChoice::TorchScript,
        gpu_backend: FormatChoice::TorchScript,
        pass: PassShape::fixed(max_sequences, max_tokens),
        queue: QueueOptions {
            // Each load a series of its own, read back by the test that made it.
            name: format!("cuda-{}-{max_sequences}", if use_fp16 { "fp16" } else { "fp32" }),
            max_queue_delay: std::time::Duration::ZERO,
            max_queued_tokens: 1 << 24,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        },
    })
    .unwrap_or_else(|e| panic!("loading {} on cuda:0: {e}", model_dir().display()));
    assert!(model.info().device.starts_with("cuda"), "{}", model.info().device);
    model
}

fn top_label(output: &Output) -> usize {
    (0..output.data.len()).max_by(|&a, &b| output.data[a].total_cmp(&output.data[b])).unwrap()
}

#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<Vec<u32>>,
    /// Eager PyTorch's outputs per variant, computed on the export machine's GPU.
    variants: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
}

#[test]
#[ignore = "needs a CUDA GPU: run by `make gpu-check` (tools/gpu_check.sh)"]
fn cuda_variants_match_eager_pytorch_on_the_gpu() {
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("golden.json")).unwrap()).unwrap();
    // fp32 may differ from eager only by kernel choice; fp16 relative to the logits' size.
    for (use_fp16, precision, variant, tolerance) in
        [(false, Precision::Fp32, "cuda-float32", 1e-3f32), (true, Precision::Fp16, "cuda-float16", 1e-2)]
    {
        let model = load(use_fp16, 32, 8192);
        assert_eq!(model.info().precision, precision);
        let expected = golden
            .variants
            .get(variant)
            .unwrap_or_else(|| panic!("golden.json has no {variant} outputs: export on the GPU"));
        let got = model.infer_blocking(golden.input_ids.clone()).unwrap().outputs;
        let scale = expected.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
        let diff = got
            .iter()
            .zip(expected)
            .flat_map(|(g, e)| g.data.iter().zip(e).map(|(a, b)| (a - b).abs()))
            .fold(0f32, f32::max);
        println!("{variant}: max |batchbox - eager PyTorch| = {diff:.3e} (logit scale {scale:.3})");
        assert!(diff <= tolerance * scale, "{variant}: {diff} > {tolerance} x {scale}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run by `make gpu-check` (tools/gpu_check.sh)"]
fn fp16_top_labels_agree_with_fp32_on_the_fixture() {
    // The binary runs far from its build tree there: BATCHBOX_WORKSPACE says where the fixture is.
    let sentences = common::fixture_sentences();
    let top = |use_fp16: bool| {
        let model = load(use_fp16, 32, 8192);
        let ids = model.tokenize(&sentences).unwrap().into_iter().map(|e| e.ids).collect();
        model.infer_blocking(ids).unwrap().outputs.iter().map(top_label).collect::<Vec<_>>()
    };
    let (fp32, fp16) = (top(false), top(true));
    let agreeing = fp32.iter().zip(&fp16).filter(|(a, b)| a == b).count();
    println!("fp16 top label agrees with fp32 on {agreeing}/{} fixture sentences", sentences.len());
    assert!(agreeing * 100 >= sentences.len() * 95, "{agreeing}/{}", sentences.len());
}

#[test]
#[ignore = "needs a CUDA GPU: run by `make gpu-check` (tools/gpu_check.sh)"]
fn a_real_cuda_out_of_memory_splits_the_batch_and_every_row_is_answered() {
    // 8192 rows of 512 tokens in one pass: each of DeBERTa-v3-large's attention score tensors
    // (scores, c2p, p2c, softmax) is 8192 x 16 heads x 512 x 512 x 2 bytes = 64 GiB, and several
    // live at once: more than an H100's 80 GB or an H200's 141 GB. The halves are retried until
    // they fit.
    const ROWS: usize = 8192;
    let metrics = batchbox_metrics::install().unwrap();
    let model = load(true, ROWS, ROWS * 512);
    let max_length = model.info().manifest.max_length;
    let vocab = model.info().manifest.vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..ROWS as u32)
        .map(|r| (0..max_length as u32).map(|j| 1000 + (r * 7919 + j * 104_729) % (vocab - 1000)).collect())
        .collect();
    let inference = model.infer_blocking(rows.clone()).expect("every row answered after splitting");
    let scrape = Scrape::parse(&metrics.render());
    let value = |name| scrape.value(name, &[("model", &format!("cuda-fp16-{ROWS}"))]);
    let splits = value(names::OOM_SPLITS);
    println!(
        "{ROWS} x {max_length} tokens: {splits} out-of-memory splits, {} forward passes",
        inference.stats.forward_passes
    );
    assert!(splits >= 1.0, "the batch was meant to run out of GPU memory");
    assert_eq!(value(names::FAILED_SEQUENCES), 0.0);
    assert_eq!(inference.outputs.len(), ROWS);
    // The rows computed after a split are the rows computed in a small batch of their own.
    let check: Vec<usize> = vec![0, ROWS / 2 - 1, ROWS / 2, ROWS - 1];
    let alone = model.infer_blocking(check.iter().map(|&i| rows[i].clone()).collect()).unwrap().outputs;
    for (&i, small) in check.iter().zip(&alone) {
        let diff = inference.outputs[i].data.iter().zip(&small.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-2 * small.data.iter().fold(1f32, |m, x| m.max(x.abs())), "row {i}: {diff}");
    }
}
