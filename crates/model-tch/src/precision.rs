//! Which precision a model runs at, and `cpu_dtype: auto`'s measurement.
//!
//! Policy:
//! - On CUDA: fp16 when `use_fp16`, else fp32.
//! - On CPU, a `cpu_dtype` set by hand (`fp32`, `bf16`, `int8`) is used as it is; a variant the
//!   export lacks stops startup with the command that adds it.
//! - On CPU with `auto` (the default): no precision is fastest everywhere (bf16 ran DeBERTa-v3 2x
//!   faster than fp32 on an AMD EPYC and 0.83x on an Intel Xeon without AMX; int8 depends on
//!   VNNI), so each exported candidate among fp32, bf16 and int8 is loaded and warmed up, checked
//!   against fp32 on the export's golden texts, and timed on a warm-up batch; the fastest whose
//!   top labels (per token, for token classifiers) all agree with fp32's wins. fp32 is always a
//!   candidate, so a model that only has fp32 still loads. The timings go to the log and to
//!   `/v1/models`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use batchbox_model::{
    Backend, Candidate, LoadedBackend, Manifest, ModelError, Output, Pad, Precision, PrecisionChoice, warm_up,
};

use crate::CpuDtype;
use crate::engine::Engine;

/// The manifest's variant names and the config's choice, on a torch device.
pub(crate) trait OnDevice: Sized {
    fn variant(self, device: tch::Device) -> String;
    fn configured(device: tch::Device, use_fp16: bool, cpu_dtype: CpuDtype) -> Option<Self>;
}

impl OnDevice for Precision {
    /// The manifest's name for the traced file that runs at this precision on `device`.
    fn variant(self, device: tch::Device) -> String {
        let device = if device.is_cuda() { "cuda" } else { "cpu" };
        let dtype = match self {
            Self::Fp32 => "float32",
            Self::Fp16 => "float16",
            Self::Bf16 => "bfloat16",
            Self::Int8 => "int8",
        };
        format!("{device}-{dtype}")
    }

    /// The precision the config asks for, or `None` for `auto` on CPU (measured by [`choose`]).
    fn configured(device: tch::Device, use_fp16: bool, cpu_dtype: CpuDtype) -> Option<Self> {
        match (device.is_cuda(), use_fp16, cpu_dtype) {
            (true, true, _) => Some(Self::Fp16),
            (true, false, _) | (false, _, CpuDtype::Fp32) => Some(Self::Fp32),
            (false, _, CpuDtype::Bf16) => Some(Self::Bf16),
            (false, _, CpuDtype::Int8) => Some(Self::Int8),
            (false, _, CpuDtype::Auto) => None,
        }
    }
}

/// Rows and longest row of the batch `auto` times: short sentences, as a classifier mostly sees.
const TIMING_ROWS: usize = 32;
const TIMING_MAX_LEN: usize = 48;
/// Timed passes per candidate, interleaved so a noisy neighbour slows them alike.
const TIMING_ROUNDS: usize = 3;

/// Loads the engine at the configured precision, or measures the candidates for `auto`.
/// The engine returned is warmed up.
pub(crate) fn choose(
    dir: &Path,
    manifest: &Manifest,
    device: tch::Device,
    use_fp16: bool,
    cpu_dtype: CpuDtype,
) -> Result<LoadedBackend<Engine>, ModelError> {
    let device_name = format!("{device:?}").to_lowercase();
    if let Some(precision) = Precision::configured(device, use_fp16, cpu_dtype) {
        let mut engine = Engine::load(dir, manifest, device, precision)?;
        warm_up(&mut engine, manifest)?;
        return Ok(LoadedBackend::configured(engine, device_name, precision));
    }

    let golden = Golden::load(dir)?;
    let mut engines = vec![(Precision::Fp32, Engine::load(dir, manifest, device, Precision::Fp32)?)];
    for precision in [Precision::Bf16, Precision::Int8] {
        if manifest.variants.contains_key(&precision.variant(device)) {
            engines.push((precision, Engine::load(dir, manifest, device, precision)?));
        }
    }
    for (_, engine) in &mut engines {
        warm_up(engine, manifest)?;
    }

    // Every candidate pads alike (same pad id, same device).
    let padder = engines[0].1.padder();
    let golden_rows: Vec<&[u32]> = golden.input_ids.iter().map(Vec::as_slice).collect();
    let golden_batch = padder.pad(&golden_rows);
    let labels = engines
        .iter_mut()
        .map(|(_, engine)| Ok(top_labels(&engine.forward(&golden_batch)?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    let reference = &labels[0]; // fp32's
    let timing: Vec<&[u32]> =
        golden_rows.iter().cycle().take(TIMING_ROWS).map(|row| &row[..row.len().min(TIMING_MAX_LEN)]).collect();
    let timing_batch = padder.pad(&timing);

    let mut samples = vec![Vec::with_capacity(TIMING_ROUNDS); engines.len()];
    for _ in 0..TIMING_ROUNDS {
        for ((_, engine), times) in engines.iter_mut().zip(&mut samples) {
            let started = Instant::now();
            engine.forward(&timing_batch)?;
            times.push(started.elapsed());
        }
    }
    let mut candidates = Vec::new();
    for (((precision, _), times), labels) in engines.iter().zip(samples).zip(&labels) {
        let agreeing_texts = labels.iter().zip(reference).filter(|(a, b)| a == b).count();
        candidates.push(Candidate {
            precision: *precision,
            median_ms: median(times).as_secs_f64() * 1e3,
            agreeing_texts,
            golden_texts: reference.len(),
        });
    }
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.agrees())
        .min_by(|a, b| a.1.median_ms.total_cmp(&b.1.median_ms))
        .map_or(0, |(i, _)| i);
    for candidate in &candidates {
        tracing::info!(
            precision = ?candidate.precision,
            median_ms = format!("{:.1}", candidate.median_ms),
            agreeing_golden_texts = format!("{}/{}", candidate.agreeing_texts, candidate.golden_texts),
            "cpu_dtype auto: measured"
        );
    }
    let (precision, engine) = engines.swap_remove(best);
    tracing::info!(?precision, "cpu_dtype auto: chose the fastest precision that agrees with fp32");
    let batch = Some((timing.len(), timing.iter().map(|row| row.len()).max().unwrap_or(0)));
    let precision_choice = PrecisionChoice { mode: "auto", candidates, batch };
    Ok(LoadedBackend { backend: engine, device: device_name, precision, precision_choice })
}

/// The export's golden texts, as token ids (`golden.json`, written by tools/export_model.py).
#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<Vec<u32>>,
}

impl Golden {
    fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("golden.json");
        let invalid = |message: String| ModelError::Manifest { path: path.clone(), message };
        let golden: Golden = serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?)
            .map_err(|e| invalid(e.to_string()))?;
        if golden.input_ids.is_empty() || golden.input_ids.iter().any(Vec::is_empty) {
            return Err(invalid("cpu_dtype auto needs the golden texts' token ids; re-export the model".into()));
        }
        Ok(golden)
    }
}

/// Each output's top label: one per sequence, or one per token for token classifiers.
fn top_labels(outputs: &[Output]) -> Vec<Vec<usize>> {
    outputs
        .iter()
        .map(|output| {
            let labels = *output.shape.last().expect("outputs have a label dimension");
            output
                .data
                .chunks_exact(labels)
                .map(|row| (0..labels).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0))
                .collect()
        })
        .collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
