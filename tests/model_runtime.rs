//! The model runtime against real exported models and real libtorch (no mocks).
//!
//! Needs the models `make setup` and `make test-models` export: `models/minilm-topics` (the
//! default model) and the tiny DeBERTa-v3 checkpoints under `models/test/`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use batchbox_batcher::ChunkOrder;
use batchbox_model::{Model, ModelError, Output, Precision, QueueOptions};
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ sits in the workspace")
}

fn model_dir(name: &str) -> PathBuf {
    let dir = workspace().join("models").join(name);
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run `make test-models`", dir.display());
    dir
}

fn options(name: &str) -> ModelOptions {
    ModelOptions {
        path: model_dir(name),
        device: DeviceSpec::Cpu,
        use_fp16: true,
        cpu_dtype: CpuDtype::Fp32,
        cpu_backend: FormatChoice::TorchScript,
        gpu_backend: FormatChoice::TorchScript,
        pass: PassShape::fixed(32, 8192),
        queue: QueueOptions {
            name: name.to_owned(),
            max_queue_delay: std::time::Duration::ZERO,
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        },
    }
}

/// The default model, loaded once for all tests of this file.
fn default_model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| batchbox_model_tch::load(&options("minilm-topics")).expect("default model loads")).clone()
}

fn sentences() -> Vec<String> {
    #[derive(Deserialize)]
    struct Fixture {
        sentences: Vec<String>,
    }
    let text = std::fs::read_to_string(workspace().join("tests/fixtures/test_120_sentences.json")).unwrap();
    serde_json::from_str::<Fixture>(&text).unwrap().sentences
}

fn infer_texts(model: &Model, texts: &[String]) -> Vec<Output> {
    let ids = model.tokenize(texts).unwrap().into_iter().map(|e| e.ids).collect();
    model.infer_blocking(ids).unwrap().outputs
}

fn max_abs_diff(a: &[Output], b: &[Output]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.shape, y.shape);
            x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn top_label(model: &Model, output: &Output) -> String {
    let best = output.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    model.info().manifest.labels[best].clone()
}

/// `golden.json`: what the export tool's eager PyTorch model gave for a few texts.
#[derive(Deserialize)]
struct Golden {
    texts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    truncated: Vec<bool>,
    outputs: Vec<Vec<f32>>,
    shapes: Vec<Vec<usize>>,
}

fn check_against_golden(name: &str) {
    let dir = model_dir(name);
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let model = batchbox_model_tch::load(&options(name)).unwrap();
    let encodings = model.tokenize(&golden.texts).unwrap();
    for (i, encoding) in encodings.iter().enumerate() {
        assert_eq!(encoding.ids, golden.input_ids[i], "{name}: token ids of text {i}");
        assert_eq!(encoding.truncated, golden.truncated[i], "{name}: truncation flag of text {i}");
    }
    assert!(golden.truncated.contains(&true), "the golden texts include a truncated one");
    let outputs = model.infer_blocking(encodings.into_iter().map(|e| e.ids).collect()).unwrap().outputs;
    let expected: Vec<Output> =
        golden.outputs.into_iter().zip(golden.shapes).map(|(data, shape)| Output { data, shape }).collect();
    let diff = max_abs_diff(&outputs, &expected);
    assert!(diff <= TOLERANCE, "{name}: max |rust - pytorch eager| = {diff}");
}

#[test]
fn default_model_matches_pytorch_eager() {
    check_against_golden("minilm-topics");
}

#[test]
fn deberta_v3_checkpoint_exported_from_spm_model_matches_pytorch_eager() {
    check_against_golden("test/tiny-deberta");
}

#[test]
fn deberta_v3_token_classifier_matches_pytorch_eager_per_token() {
    check_against_golden("test/tiny-deberta-ner");
}

#[test]
fn batched_equals_one_by_one() {
    let model = default_model();
    let texts = sentences();
    let batched = infer_texts(&model, &texts);
    let single: Vec<Output> = texts.iter().flat_map(|t| infer_texts(&model, std::slice::from_ref(t))).collect();
    let diff = max_abs_diff(&batched, &single);
    assert!(diff <= TOLERANCE, "batched vs one-by-one: {diff}");
}

#[test]
fn small_chunks_keep_results_and_input_order() {
    let texts = sentences();
    let expected = infer_texts(&default_model(), &texts);
    let small =
        batchbox_model_tch::load(&ModelOptions { pass: PassShape::fixed(3, 40), ..options("minilm-topics") }).unwrap();
    let ids: Vec<Vec<u32>> = small.tokenize(&texts).unwrap().into_iter().map(|e| e.ids).collect();
    let longest = ids.iter().map(Vec::len).max().unwrap();
    assert!(longest > 40, "one sentence is longer than the token budget, so it must run alone");
    let inference = small.infer_blocking(ids.clone()).unwrap();
    assert!(inference.stats.forward_passes >= 40, "3 rows per pass: {:?}", inference.stats);
    assert!(max_abs_diff(&inference.outputs, &expected) <= TOLERANCE);

    let reversed: Vec<Vec<u32>> = ids.into_iter().rev().collect();
    let mut outputs = small.infer_blocking(reversed).unwrap().outputs;
    outputs.reverse();
    assert!(max_abs_diff(&outputs, &expected) <= TOLERANCE);
}

#[test]
fn length_sorting_pads_less_than_input_order() {
    let texts = sentences();
    let unsorted = batchbox_model_tch::load(&ModelOptions {
        queue: QueueOptions { chunk_order: ChunkOrder::InputOrder, ..options("minilm-topics").queue },
        ..options("minilm-topics")
    })
    .unwrap();
    let ids: Vec<Vec<u32>> = unsorted.tokenize(&texts).unwrap().into_iter().map(|e| e.ids).collect();
    let in_order = unsorted.infer_blocking(ids.clone()).unwrap();
    // A model of its own: on the shared one, other tests' concurrent calls share its batches.
    let sorted = batchbox_model_tch::load(&options("minilm-topics")).unwrap().infer_blocking(ids).unwrap();
    assert!(max_abs_diff(&sorted.outputs, &in_order.outputs) <= TOLERANCE);
    assert_eq!(sorted.stats.real_tokens, in_order.stats.real_tokens);
    assert!(
        sorted.stats.padded_tokens * 10 < in_order.stats.padded_tokens * 8,
        "sorted {:?} vs input order {:?}",
        sorted.stats,
        in_order.stats
    );
}

#[test]
fn long_texts_are_truncated_and_flagged() {
    let model = default_model();
    let max = model.info().manifest.max_length;
    let long = "word ".repeat(max * 2);
    let encodings = model.tokenize(&[long.as_str(), "A short one."]).unwrap();
    assert!(encodings[0].truncated);
    assert_eq!(encodings[0].ids.len(), max);
    assert_eq!(*encodings[0].ids.last().unwrap(), 102, "truncation keeps the closing [SEP]");
    assert!(!encodings[1].truncated);
    let outputs = model.infer_blocking(encodings.into_iter().map(|e| e.ids).collect()).unwrap().outputs;
    assert_eq!(outputs.len(), 2);
}

#[test]
fn word_ids_and_character_offsets_are_kept() {
    let model = default_model();
    let encoding = &model.tokenize(&["Café owners agree"]).unwrap()[0];
    // [CLS] cafe owners agree [SEP]: offsets count characters, not UTF-8 bytes.
    assert_eq!(encoding.offsets[1], (0, 4));
    assert_eq!(encoding.offsets[2], (5, 11));
    assert_eq!(encoding.word_ids, vec![None, Some(0), Some(1), Some(2), None]);
}

#[test]
fn empty_batch_gives_empty_result() {
    let model = default_model();
    assert!(model.tokenize(&Vec::<String>::new()).unwrap().is_empty());
    let inference = model.infer_blocking(Vec::new()).unwrap();
    assert!(inference.outputs.is_empty());
    assert_eq!(inference.stats.forward_passes, 0);
}

#[test]
fn invalid_sequences_are_refused_and_the_model_keeps_serving() {
    let model = default_model();
    let vocab = model.info().manifest.vocab_size as u32;
    let max = model.info().manifest.max_length;
    for (bad, what) in [
        (vec![vec![101, vocab, 102]], "outside the vocabulary"),
        (vec![vec![101, 102], vec![]], "sequence 1 has 0 tokens"),
        (vec![vec![101; max + 1]], "the model takes 1 to"),
    ] {
        match model.infer_blocking(bad) {
            Err(ModelError::InvalidInput(message)) => assert!(message.contains(what), "{message}"),
            other => panic!("expected InvalidInput({what}), got {other:?}"),
        }
    }
    assert_eq!(infer_texts(&model, &["Still serving.".to_owned()]).len(), 1);
}

#[test]
fn default_model_puts_clear_sentences_under_the_right_topic() {
    let cases = [
        ("The goalkeeper saved a penalty in the last minute of the cup final.", "sports"),
        ("She won the marathon in record time despite the heat.", "sports"),
        ("The senate rejected the president's nominee after a heated vote.", "politics"),
        ("Voters head to the polls on Sunday to elect a new parliament.", "politics"),
        ("The company's quarterly profit doubled and its shares jumped 12 percent.", "business"),
        ("The central bank raised interest rates to fight inflation.", "business"),
        ("The new smartphone ships with a faster processor and an improved camera app.", "technology"),
        ("Hackers exploited a software vulnerability to break into the company's servers.", "technology"),
        ("Astronomers discovered a planet orbiting a distant star using a space telescope.", "science"),
        ("Physicists measured the decay of the particle in a new experiment.", "science"),
        ("Doctors say the new vaccine sharply reduces the risk of severe illness.", "health"),
        ("Regular exercise and a balanced diet lower the risk of heart disease.", "health"),
        ("The actor's new movie topped the box office this weekend.", "entertainment"),
        ("The band released its new album and announced a world tour.", "entertainment"),
    ];
    let model = default_model();
    let texts: Vec<String> = cases.iter().map(|(t, _)| t.to_string()).collect();
    let outputs = infer_texts(&model, &texts);
    let wrong: Vec<String> = cases
        .iter()
        .zip(&outputs)
        .filter(|((_, want), output)| top_label(&model, output) != *want)
        .map(|((text, want), output)| format!("{text:?}: want {want}, got {}", top_label(&model, output)))
        .collect();
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn bf16_and_int8_on_cpu_agree_with_fp32_on_99_percent_of_the_fixture() {
    let texts = sentences();
    // A model of its own: batches shared with other tests' calls would change int8's scales.
    let fp32 = infer_texts(&batchbox_model_tch::load(&options("minilm-topics")).unwrap(), &texts);
    // Logits reach about 20 (cosine / 0.05): bf16 keeps 8 bits of mantissa, int8 quantizes the
    // linear layers' inputs per batch.
    for (dtype, max_diff) in [(CpuDtype::Bf16, 0.5), (CpuDtype::Int8, 2.0)] {
        let model = batchbox_model_tch::load(&ModelOptions { cpu_dtype: dtype, ..options("minilm-topics") }).unwrap();
        let reduced = infer_texts(&model, &texts);
        let agree = fp32.iter().zip(&reduced).filter(|(a, b)| top_label(&model, a) == top_label(&model, b)).count();
        let diff = max_abs_diff(&fp32, &reduced);
        println!(
            "{dtype:?}: top label agrees with fp32 on {agree}/{} fixture sentences; max |diff| {diff:.3}",
            texts.len()
        );
        assert!(agree * 100 >= texts.len() * 99, "{dtype:?} agrees with fp32 on {agree} of {} top labels", texts.len());
        assert!(diff < max_diff, "{dtype:?} vs fp32: {diff}");
    }
}

/// `golden.json`'s eager outputs of one variant, computed by the export on that variant's own
/// (quantized or cast) PyTorch module.
fn golden_variant(name: &str, variant: &str) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    #[derive(Deserialize)]
    struct Variants {
        input_ids: Vec<Vec<u32>>,
        variants: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
    }
    let golden: Variants =
        serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("golden.json")).unwrap()).unwrap();
    let outputs =
        golden.variants.get(variant).unwrap_or_else(|| panic!("{name}: golden.json has no {variant}")).clone();
    (golden.input_ids, outputs)
}

#[test]
fn each_cpu_variant_matches_its_own_eager_pytorch_module() {
    for name in ["minilm-topics", "test/tiny-deberta"] {
        for (dtype, variant) in
            [(CpuDtype::Fp32, "cpu-float32"), (CpuDtype::Bf16, "cpu-bfloat16"), (CpuDtype::Int8, "cpu-int8")]
        {
            let (ids, expected) = golden_variant(name, variant);
            let model = batchbox_model_tch::load(&ModelOptions { cpu_dtype: dtype, ..options(name) }).unwrap();
            // One batch, as the export ran it.
            let got = model.infer_blocking(ids).unwrap().outputs;
            let scale = expected.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
            let diff = got
                .iter()
                .zip(&expected)
                .flat_map(|(g, e)| g.data.iter().zip(e).map(|(a, b)| (a - b).abs()))
                .fold(0f32, f32::max);
            let tolerance = if dtype == CpuDtype::Fp32 { TOLERANCE } else { 1e-2 * scale };
            assert!(diff <= tolerance, "{name} {variant}: max |rust - pytorch eager| = {diff} > {tolerance}");
        }
    }
}

#[test]
fn auto_runs_the_fastest_precision_that_agrees_with_fp32_and_is_batch_invariant() {
    let model =
        batchbox_model_tch::load(&ModelOptions { cpu_dtype: CpuDtype::Auto, ..options("minilm-topics") }).unwrap();
    let choice = &model.info().precision_choice;
    assert_eq!(choice.mode, "auto");
    let tried: Vec<Precision> = choice.candidates.iter().map(|c| c.precision).collect();
    assert_eq!(tried, [Precision::Fp32, Precision::Bf16, Precision::Int8], "every exported CPU variant is timed");
    let fp32 = &choice.candidates[0];
    let invariance = fp32.invariance.as_ref().unwrap();
    assert!(fp32.reference && fp32.agreement.is_none(), "fp32 is the reference: {fp32}");
    assert!(invariance.holds() && invariance.bound == 1e-5 && fp32.eligible(), "fp32 is batch-invariant: {fp32}");
    for c in &choice.candidates[1..] {
        assert!(!c.reference, "{c}");
        match (&c.not_checked, &c.agreement, &c.invariance) {
            // Only a candidate faster than fp32 is worth its checks; one far slower on its first
            // pass is not even timed.
            (Some(_), None, None) => {
                assert!(c.median_ms.is_none_or(|ms| ms >= fp32.median_ms.unwrap()) && !c.eligible(), "{c}");
            }
            (None, Some(agreement), Some(invariance)) => {
                assert!(c.median_ms < fp32.median_ms, "{c}");
                assert!(agreement.texts >= 256 && agreement.compared == agreement.texts, "{c}");
                assert_eq!(invariance.bound, 1e-3, "{c}");
                assert_eq!(c.eligible, Some(agreement.holds() && invariance.holds()), "{c}");
            }
            _ => panic!("a candidate is either checked or says why not: {c}"),
        }
    }
    let chosen = choice.candidates.iter().find(|c| c.precision == model.info().precision).unwrap();
    assert!(chosen.eligible(), "{chosen}");
    for other in choice.candidates.iter().filter(|c| c.eligible()) {
        assert!(chosen.median_ms <= other.median_ms, "{chosen} was chosen over the faster {other}");
    }
    println!("auto: {}", choice.candidates.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n      "));
}

#[test]
fn a_precision_the_export_lacks_stops_loading_with_the_command_that_adds_it() {
    // The default model without its int8 variant, as an older export would have it.
    let source = model_dir("minilm-topics");
    let dir = workspace().join("target/model-runtime-tests/minilm-without-int8");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::os::unix::fs::symlink(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("manifest.json")).unwrap()).unwrap();
    manifest["variants"].as_object_mut().unwrap().remove("cpu-int8");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();

    let load = |dtype| {
        batchbox_model_tch::load(&ModelOptions { path: dir.clone(), cpu_dtype: dtype, ..options("minilm-topics") })
    };
    let error = load(CpuDtype::Int8).err().expect("no int8 variant");
    let message = error.to_string();
    assert!(matches!(&error, ModelError::MissingVariant { variant, .. } if variant == "cpu-int8"), "{message}");
    assert!(
        message.contains("tools/export_model.py")
            && message.contains("--variants cpu-bfloat16,cpu-float32,cpu-int8")
            && message.contains("minilm-without-int8"),
        "{message}"
    );
    // `auto` measures what there is instead.
    let auto = load(CpuDtype::Auto).unwrap();
    assert_eq!(auto.info().precision_choice.candidates.len(), 2);
}

#[test]
fn cuda_is_used_when_present_and_refused_clearly_when_absent() {
    match batchbox_model_tch::load(&ModelOptions { device: DeviceSpec::Cuda(0), ..options("minilm-topics") }) {
        Ok(model) => assert!(model.info().device.starts_with("cuda"), "{}", model.info().device),
        Err(ModelError::CudaUnavailable { requested, .. }) => assert_eq!(requested, "cuda:0"),
        // A GPU machine whose export had no cuda variant must say so, not fall back silently.
        Err(ModelError::MissingVariant { variant, .. }) => assert_eq!(variant, "cuda-float16"),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[test]
fn a_caller_that_goes_away_is_dropped_before_its_sequences_are_computed() {
    use batchbox_metrics::{Scrape, names};
    use std::time::Duration;

    let metrics = batchbox_metrics::install().unwrap();
    // Its own series: the `model` label of its metrics is this test's.
    let model = batchbox_model_tch::load(&ModelOptions {
        queue: QueueOptions { name: "abandoned-caller".into(), ..options("minilm-topics").queue },
        ..options("minilm-topics")
    })
    .unwrap();
    let ids: Vec<Vec<u32>> = model.tokenize(&sentences()).unwrap().into_iter().map(|e| e.ids).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let running = tokio::spawn({
            let (model, ids) = (model.clone(), ids.clone());
            async move { model.infer(ids).await }
        });
        // Once the first call is being computed (its first batch of 32 running, the next prepared,
        // 56 sequences left in the queue)...
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(1..=56).contains(&model.queue_depth().0) {
            assert!(std::time::Instant::now() < deadline, "the first call never reached its second batch");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ...a second one is queued behind it and abandoned at once, as when a client disconnects:
        // a zero timeout polls it once (which submits it) and then drops it.
        let abandoned = tokio::time::timeout(Duration::ZERO, model.infer(ids.clone())).await;
        assert!(abandoned.is_err());
        assert_eq!(running.await.unwrap().unwrap().outputs.len(), 120);
    });
    let scrape = Scrape::parse(&metrics.render());
    let value = |name| scrape.value(name, &[("model", "abandoned-caller")]);
    assert_eq!(value(names::ABANDONED), 1.0);
    assert_eq!(value(names::SEQUENCES), 120.0, "none of the abandoned call's sequences ran");
    assert_eq!(model.queue_depth(), (0, 0));
}
