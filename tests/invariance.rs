//! Batch invariance, as a property of every exported CPU variant of every test model: a
//! sequence's probabilities must not depend on what shares its forward pass. A sequence runs
//! alone, in a pass of other sequences of its own length, in a pass of longer ones (padding), and
//! beside another tenant's sequences through the model's queue and scheduler; its probabilities
//! must agree within the variant's bound (1e-5 in fp32, 1e-3 otherwise).
//!
//! The bound is asserted for every variant whose load-time check (`batchbox_model::checks`, what
//! `cpu_dtype: auto` relies on) says it holds. A variant that check flags is served only by name,
//! with a warning; for it the test asserts the flag, so that a check too weak to see what these
//! cases see fails here.
//!
//! Needs `make setup` and `make test-models`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use batchbox_batcher::ChunkOrder;
use batchbox_model::checks::probabilities;
use batchbox_model::{Model, Output, Precision, QueueOptions};
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn model_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("models").join(name);
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run `make setup test-models`", dir.display());
    dir
}

/// The model at `dtype`, behind a queue that batches first come, first served (`batch_order:
/// input-order`) and waits 50 ms for more work: a call's rows share one pass, and calls made
/// together share a pass, so each case decides exactly what runs beside its sequence.
fn load(name: &str, dtype: CpuDtype) -> Arc<Model> {
    batchbox_model_tch::load(&ModelOptions {
        path: model_dir(name),
        device: DeviceSpec::Cpu,
        use_fp16: false,
        cpu_dtype: dtype,
        cpu_backend: FormatChoice::TorchScript,
        gpu_backend: FormatChoice::TorchScript,
        pass: PassShape::fixed(64, 1 << 16),
        queue: QueueOptions {
            name: format!("{name}-{dtype:?}"),
            max_queue_delay: Duration::from_millis(50),
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::InputOrder,
        },
    })
    .unwrap_or_else(|e| panic!("{name} at {dtype:?}: {e}"))
}

/// How far any probability of `a` is from `b`'s.
fn moved(a: &Output, b: &Output) -> f64 {
    assert_eq!(a.shape, b.shape);
    probabilities(a).iter().zip(probabilities(b)).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max)
}

/// A sequence and what may share its pass: token ids from the middle of the vocabulary, the
/// others of its length, and longer ones.
#[derive(Debug, Clone)]
struct Case {
    row: Vec<u32>,
    same_length: Vec<Vec<u32>>,
    longer: Vec<Vec<u32>>,
    other_tenant: Vec<Vec<u32>>,
}

fn cases(vocab: u32, max_length: usize) -> impl Strategy<Value = Case> {
    let token = 1000.min(vocab / 4)..vocab;
    let short = max_length.min(48);
    (1..=short).prop_flat_map(move |len| {
        let row = |n: std::ops::RangeInclusive<usize>| proptest::collection::vec(token.clone(), n);
        (
            row(len..=len),
            proptest::collection::vec(row(len..=len), 1..8),
            proptest::collection::vec(row(len + 1..=max_length.min(len + 80)), 1..6),
            proptest::collection::vec(row(1..=max_length.min(96)), 2..12),
        )
            .prop_map(|(row, same_length, longer, other_tenant)| Case {
                row,
                same_length,
                longer,
                other_tenant,
            })
    })
}

/// The largest move of `case.row`'s probabilities from alone, over the four ways of sharing a pass.
fn largest_move(model: &Arc<Model>, runtime: &tokio::runtime::Runtime, case: &Case) -> f64 {
    let first = |rows: Vec<Vec<u32>>| {
        let inference = model.infer_blocking(rows).unwrap();
        assert_eq!(inference.stats.forward_passes, 1, "a call's rows share one pass");
        inference.outputs[0].clone()
    };
    let alone = first(vec![case.row.clone()]);
    let same_length = first([vec![case.row.clone()], case.same_length.clone()].concat());
    let padded = first([vec![case.row.clone()], case.longer.clone()].concat());
    // Two tenants' calls made together, through the scheduler: they must share a pass.
    let (mine, theirs) = runtime.block_on(async {
        tokio::join!(
            model.infer_for("mine", vec![case.row.clone()], None),
            model.infer_for("theirs", case.other_tenant.clone(), None),
        )
    });
    let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
    assert!(mine.batch_ids.iter().any(|id| theirs.batch_ids.contains(id)), "the tenants' calls did not share a pass");
    [same_length, padded, mine.outputs[0].clone()].iter().map(|shared| moved(&alone, shared)).fold(0.0, f64::max)
}

#[test]
fn a_sequence_gets_the_same_probabilities_alone_and_beside_any_other_sequences() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let mut report = Vec::new();
    for name in ["minilm-topics", "test/tiny-deberta", "test/tiny-deberta-ner"] {
        for dtype in [CpuDtype::Fp32, CpuDtype::Bf16, CpuDtype::Int8] {
            let model = load(name, dtype);
            let info = model.info();
            let measured = &info.precision_choice.candidates[0];
            let checked = measured.invariance.clone().expect("the export has golden texts");
            let manifest = &info.manifest;
            let strategy = cases(manifest.vocab_size as u32, manifest.max_length);
            // Few cases: each runs five passes of a real model.
            let mut runner = TestRunner::new(Config { cases: 6, failure_persistence: None, ..Config::default() });
            let largest = std::cell::Cell::new(0f64);
            let result = runner.run(&strategy, |case| {
                let moved = largest_move(&model, &runtime, &case);
                largest.set(largest.get().max(moved));
                prop_assert!(
                    moved <= checked.bound || !checked.holds(),
                    "{name} {:?}: moved {moved:.2e} > {:e}, though the load-time check measured {:.2e}",
                    info.precision,
                    checked.bound,
                    checked.max_abs_diff
                );
                Ok(())
            });
            if let Err(e) = result {
                panic!("{e}");
            }
            assert_eq!(checked.bound, if info.precision == Precision::Fp32 { 1e-5 } else { 1e-3 });
            // What must hold on any CPU: fp32, and int8 where attention runs in fp64 (its linear
            // layers are integer products, and the rest rounds per element or per row).
            if info.precision == Precision::Fp32 || (name == "minilm-topics" && info.precision == Precision::Int8) {
                assert!(checked.holds(), "{name} {:?}: {checked:?}", info.precision);
            }
            report.push(format!(
                "{name} {:?}: load-time check {:.2e} ({}), largest move in the cases {:.2e}",
                info.precision,
                checked.max_abs_diff,
                if checked.holds() { "holds" } else { "flagged: auto will not choose it" },
                largest.get()
            ));
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn a_precision_set_by_hand_outside_the_bound_is_served_with_a_warning_saying_what_it_costs() {
    // A variant the export found not batch-invariant, loaded by name as `serve` would load it:
    // the bf16 of tests/fixtures/make_batch_dependent_model.py, which moves with its neighbours
    // on purpose (every exported DeBERTa and MiniLM variant is batch-invariant now).
    let models = ["test/batch-dependent"];
    let variants = [("cpu-bfloat16", "bf16", "Bf16"), ("cpu-int8", "int8", "Int8")];
    let flagged =
        models.iter().flat_map(|&name| variants.iter().map(move |&v| (name, v))).find(|(name, (variant, ..))| {
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("manifest.json")).unwrap()).unwrap();
            manifest["invariance"][variant]["holds"] == false
        });
    let Some((name, (_, dtype, shown))) = flagged else {
        panic!("the export found every variant of {models:?} batch-invariant: pick another model for this test");
    };
    let config = common::write_config(
        "invariance-by-hand",
        &format!(
            r#"
models: [{{ name: tiny, path: "{}", device: cpu, cpu_dtype: {dtype} }}]
api: {{ inference_batch_size: 32, use_fp16: false, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants: [{{ name: a, wasm: "{{classifier}}", routes: [/a] }}]
"#,
            model_dir(name).display()
        ),
    );
    let (ok, output) = common::batchbox(&["--config", config.to_str().unwrap(), "check-config"], &[]);
    assert!(ok, "served, by name: {output}");
    assert!(output.contains("not batch-invariant on this model"), "{output}");
    assert!(output.contains("different answers under load") && output.contains("would not choose it"), "{output}");
    let measured = format!("({shown}; measured at load: {shown}, moves ");
    assert!(output.contains("model tiny:") && output.contains(&measured), "{output}");
}
