//! AOTInductor packages, the second format a variant may take (`crates/model-tch/src/aoti.rs`):
//! a tiny DeBERTa-v3 compiled at test time (`make test-models`: `tiny-deberta-aoti`, exported with
//! `--variants cpu-float32,cpu-float32-aoti`) is served through `batchbox serve` and gives the
//! original eager model's numbers; sizes the package cannot take (1 row, 1 token) are padded up;
//! a package that cannot be loaded stops startup naming the file and the command that rebuilds
//! it; and `auto` measures the package beside the TorchScript trace.
//!
//! Needs `make setup`, `make test-models` and `make plugins`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use batchbox_batcher::ChunkOrder;
use batchbox_model::checks::probabilities;
use batchbox_model::{Format, Precision, QueueOptions};
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use common::{PREDICT, Server, batchbox, workspace, write_config};
use serde::Deserialize;
use serde_json::json;

const MODEL: &str = "models/test/tiny-deberta-aoti";
/// The issue's bound between the package and the eager fp32 model.
const TOLERANCE: f64 = 1e-5;

fn model_dir() -> PathBuf {
    model_dir_of(MODEL)
}

fn model_dir_of(model: &str) -> PathBuf {
    let dir = workspace().join(model);
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run `make setup test-models`", dir.display());
    dir
}

fn options(cpu_dtype: CpuDtype, cpu_backend: FormatChoice) -> ModelOptions {
    options_of(MODEL, cpu_dtype, cpu_backend)
}

fn options_of(model: &str, cpu_dtype: CpuDtype, cpu_backend: FormatChoice) -> ModelOptions {
    ModelOptions {
        path: model_dir_of(model),
        device: DeviceSpec::Cpu,
        use_fp16: false,
        cpu_dtype,
        cpu_backend,
        gpu_backend: FormatChoice::TorchScript,
        pass: PassShape::fixed(32, 8192),
        queue: QueueOptions {
            name: format!("aoti-{cpu_dtype:?}-{cpu_backend:?}"),
            max_queue_delay: Duration::ZERO,
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        },
    }
}

/// The export's eager fp32 outputs (`golden.json`): the *original* checkpoint's module, neither
/// windowed nor compiled.
#[derive(Deserialize)]
struct Golden {
    texts: Vec<String>,
    outputs: Vec<Vec<f32>>,
}

/// A config serving `dir` at fp32 in `backend` to the sentence classifier.
fn config(name: &str, dir: &Path, backend: &str) -> PathBuf {
    write_config(
        name,
        &format!(
            r#"
models: [{{ name: tiny-deberta, path: "{}", device: cpu, cpu_dtype: fp32, cpu_backend: {backend} }}]
api: {{ use_fp16: false, inference_batch_size: 32, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - name: sentence-classifier
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
"#,
            dir.display()
        ),
    )
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|x| f64::from(x - max).exp()).sum();
    logits.iter().map(|x| f64::from(x - max).exp() / z).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn an_aoti_package_served_by_batchbox_gives_the_eager_models_probabilities() {
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("golden.json")).unwrap()).unwrap();
    let server = Server::launch(&config("aoti", &model_dir(), "aoti"));

    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200, "{models}");
    let served = &models["models"][0];
    assert_eq!(served["format"], "aoti", "{served}");

    // Every golden text together, then each alone: a one-row pass is padded to two rows.
    let (status, body) = server.post(PREDICT, json!({ "sentences": golden.texts }).to_string());
    assert_eq!(status, 200, "{body}");
    for (i, (row, logits)) in body["probabilities"].as_array().unwrap().iter().zip(&golden.outputs).enumerate() {
        let got: Vec<f64> = row.as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        let diff = max_diff(&got, &softmax(logits));
        assert!(diff <= TOLERANCE, "golden text {i} in one request: |served - eager| = {diff:.2e}");

        let (status, alone) = server.post(PREDICT, json!({ "sentences": [&golden.texts[i]] }).to_string());
        assert_eq!(status, 200, "{alone}");
        let got: Vec<f64> = alone["probabilities"][0].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        let diff = max_diff(&got, &softmax(logits));
        assert!(diff <= TOLERANCE, "golden text {i} alone: |served - eager| = {diff:.2e}");
    }
}

#[test]
fn a_one_row_one_token_pass_is_padded_up_for_the_package_and_cut_back() {
    // No text tokenizes to one token (the classifier's special tokens come with every text), so
    // the runtime is driven directly: the package and the trace on rows of 1 and 2 tokens, for
    // a sequence classifier (logits per row) and a token classifier (per token, cut back on both
    // dimensions).
    for model in [MODEL, "models/test/tiny-deberta-ner-aoti"] {
        let package = batchbox_model_tch::load(&options_of(model, CpuDtype::Fp32, FormatChoice::Aoti)).unwrap();
        let trace = batchbox_model_tch::load(&options_of(model, CpuDtype::Fp32, FormatChoice::TorchScript)).unwrap();
        assert_eq!(package.info().format, Format::Aoti);
        assert_eq!(trace.info().format, Format::TorchScript);
        same_outputs(model, &package, &trace);
    }
}

fn same_outputs(model: &str, package: &batchbox_model::Model, trace: &batchbox_model::Model) {
    for rows in [vec![vec![1u32]], vec![vec![1, 2]], vec![vec![1], vec![5, 6, 7]]] {
        let got = package.infer_blocking(rows.clone()).unwrap().outputs;
        let want = trace.infer_blocking(rows.clone()).unwrap().outputs;
        assert_eq!(got.len(), rows.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape, w.shape, "{model}, rows {rows:?}");
            let (g, w): (Vec<f64>, Vec<f64>) = (
                probabilities(g).into_iter().map(f64::from).collect(),
                probabilities(w).into_iter().map(f64::from).collect(),
            );
            let diff = max_diff(&g, &w);
            assert!(diff <= TOLERANCE, "{model}, rows {rows:?}: |package - trace| = {diff:.2e}");
        }
    }
}

#[test]
fn cpu_backend_auto_measures_the_package_beside_the_trace_and_lists_its_time() {
    let model = batchbox_model_tch::load(&options(CpuDtype::Fp32, FormatChoice::Auto)).unwrap();
    let choice = &model.info().precision_choice;
    assert_eq!(choice.mode, "auto", "two formats of fp32 are exported: auto measures both");
    let formats: Vec<(Precision, Format)> = choice.candidates.iter().map(|c| (c.precision, c.format)).collect();
    assert_eq!(formats, [(Precision::Fp32, Format::TorchScript), (Precision::Fp32, Format::Aoti)]);
    let (trace, package) = (&choice.candidates[0], &choice.candidates[1]);
    assert!(trace.reference && trace.eligible(), "the trace is the reference: {trace}");
    let trace_ms = trace.median_ms.unwrap();
    match package.not_checked {
        // Checked only where it is the faster: then it must agree and be batch-invariant.
        None => assert!(package.eligible() && package.median_ms.unwrap() < trace_ms, "{package}"),
        // Else timed and found slower, or found far slower on a few rows and not timed.
        Some(_) => assert!(!package.eligible() && package.median_ms.is_none_or(|ms| ms >= trace_ms), "{package}"),
    }
    let chosen = choice.candidates.iter().find(|c| c.format == model.info().format).unwrap();
    let fastest = choice.candidates.iter().filter_map(|c| c.median_ms).fold(f64::INFINITY, f64::min);
    assert_eq!(chosen.median_ms, Some(fastest), "auto keeps the faster of the two");

    // Packages only, with cpu_dtype auto: the fp32 trace is still the reference, loaded beside
    // them to compare with, and the package it measured is what runs.
    let model = batchbox_model_tch::load(&options(CpuDtype::Auto, FormatChoice::Aoti)).unwrap();
    let choice = &model.info().precision_choice;
    let formats: Vec<(Precision, Format)> = choice.candidates.iter().map(|c| (c.precision, c.format)).collect();
    assert_eq!(formats, [(Precision::Fp32, Format::Aoti)]);
    assert!(choice.candidates[0].eligible(), "{}", choice.candidates[0]);
    assert_eq!(model.info().format, Format::Aoti);

    // check-config says the same, in words.
    let path = config("aoti-auto", &model_dir(), "auto");
    let (ok, out) = batchbox(&["--config", path.to_str().unwrap(), "check-config"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("(AOTInductor)"), "check-config lists the package as a candidate:\n{out}");
}

/// A copy of the model whose package is replaced by `bytes`.
fn broken_copy(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = workspace().join("target/aoti-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("model-cpu-float32-aoti.pt2"), bytes).unwrap();
    dir
}

#[test]
fn a_package_that_cannot_be_loaded_stops_startup_naming_the_file_and_the_rebuild() {
    let trace = std::fs::read(model_dir().join("model-cpu-float32.pt")).unwrap();
    let package = std::fs::read(model_dir().join("model-cpu-float32-aoti.pt2")).unwrap();
    for (name, bytes) in [
        ("truncated", &package[..package.len() / 2]),
        ("not-a-package", b"not a zip archive".as_slice()),
        // A TorchScript file is a zip archive too, of the wrong kind.
        ("torchscript", trace.as_slice()),
    ] {
        let dir = broken_copy(name, bytes);
        let path = config(&format!("aoti-{name}"), &dir, "aoti");
        let (ok, out) = batchbox(&["--config", path.to_str().unwrap(), "check-config"], &[]);
        assert!(!ok, "{name}: a broken package must stop startup:\n{out}");
        assert!(out.contains("model-cpu-float32-aoti.pt2"), "{name}: the error names the file:\n{out}");
        assert!(out.contains("tools/export_model.py"), "{name}: the error gives the command that rebuilds it:\n{out}");
    }
}
