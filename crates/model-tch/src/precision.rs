//! Which precision a model runs at, and `cpu_dtype: auto`'s measurement.
//!
//! Policy:
//! - On CUDA: fp16 when `use_fp16`, else fp32.
//! - On CPU, a `cpu_dtype` set by hand (`fp32`, `bf16`, `int8`) is used as it is; a variant the
//!   export lacks stops startup with the command that adds it.
//! - On CPU with `auto` (the default): no precision is fastest everywhere (bf16 ran DeBERTa-v3 2x
//!   faster than fp32 on an AMD EPYC and 0.83x on an Intel Xeon without AMX; int8 depends on
//!   VNNI), so each exported candidate among fp32, bf16 and int8 is loaded, warmed up and timed
//!   on a warm-up batch, compared with fp32 on the export's agreement texts and checked for batch
//!   invariance (`batchbox_model::checks`); the fastest that is within both bounds wins. fp32 is
//!   always a candidate and the fallback, so a model that only has fp32 still loads. What was
//!   measured goes to the log, `check-config` and `/v1/models`.
//! - Every precision served, configured or chosen, has its batch invariance measured at load; a
//!   configured one outside the bound is still served, with a warning saying what that costs.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use batchbox_model::checks::{self, Invariance};
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
    let golden = Golden::load(dir);
    if let Some(precision) = Precision::configured(device, use_fp16, cpu_dtype) {
        let mut engine = Engine::load(dir, manifest, device, precision)?;
        warm_up(&mut engine, manifest)?;
        let invariance = match &golden {
            Ok(golden) => {
                // fp32 is checked with the probes alone, as `auto` checks it (see `checks`).
                let texts = golden.agreement_texts();
                let sorted = match precision {
                    Precision::Fp32 => None,
                    _ => Some(checks::run_sorted(&mut engine, &texts)?),
                };
                Some(golden.invariance(&mut engine, precision, sorted.as_deref())?)
            }
            Err(e) => {
                tracing::warn!(error = %e, "batch invariance not measured: golden.json cannot be used");
                None
            }
        };
        if let Some(moved) = invariance.as_ref().filter(|i| !i.holds()) {
            tracing::warn!(
                ?precision,
                max_abs_diff = format!("{:.1e}", moved.max_abs_diff),
                bound = moved.bound,
                "this precision is not batch-invariant on this model: a text's probabilities moved by up to {:.1e} with \
                 the texts batched beside it (bound {:e}). The same request can get different answers under load, one \
                 tenant's traffic can move another's answers, and the response cache keeps whichever came first; \
                 `cpu_dtype: auto` would not choose it",
                moved.max_abs_diff,
                moved.bound
            );
        }
        let measured = Candidate::new(precision, None, None, invariance);
        return Ok(LoadedBackend::configured(engine, device_name, measured));
    }

    let golden = golden?;
    let started = Instant::now();
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

    let loaded_and_timed = started.elapsed();
    let texts = golden.agreement_texts();
    let reference = checks::run_sorted(&mut engines[0].1, &texts)?; // fp32's
    let mut candidates = Vec::new();
    for ((precision, engine), times) in engines.iter_mut().zip(samples) {
        let outputs = match precision {
            Precision::Fp32 => None,
            _ => Some(checks::run_sorted(engine, &texts)?),
        };
        let agreement = checks::agreement(&reference, outputs.as_ref().unwrap_or(&reference));
        let invariance = golden.invariance(engine, *precision, outputs.as_deref())?;
        candidates.push(Candidate::new(
            *precision,
            Some(median(times).as_secs_f64() * 1e3),
            Some(agreement),
            Some(invariance),
        ));
    }
    // The fastest eligible candidate; fp32, the reference, if none is (even if it failed its
    // own invariance bound: nothing else would do better).
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.eligible())
        .min_by(|a, b| a.1.median_ms.unwrap_or(f64::MAX).total_cmp(&b.1.median_ms.unwrap_or(f64::MAX)))
        .map_or(0, |(i, _)| i);
    for candidate in &candidates {
        let (agreement, invariance) = (candidate.agreement.as_ref(), candidate.invariance.as_ref());
        tracing::info!(
            precision = ?candidate.precision,
            median_ms = format!("{:.1}", candidate.median_ms.unwrap_or(0.0)),
            top_labels_agreeing = agreement.map(|a| format!("{}/{} over {} texts", a.agreeing, a.compared, a.texts)),
            max_abs_diff_from_fp32 = agreement.map(|a| format!("{:.1e}", a.max_abs_diff)),
            batch_invariance = invariance.map(|i| format!("{:.1e} (bound {:e})", i.max_abs_diff, i.bound)),
            eligible = candidate.eligible(),
            "cpu_dtype auto: measured"
        );
    }
    if texts.len() < checks::MIN_AGREEMENT_TEXTS {
        tracing::warn!(
            texts = texts.len(),
            "cpu_dtype auto: the export has fewer than {} agreement texts, too few to tell 99% agreement from less, so \
             only fp32 can be chosen; re-export the model (tools/export_model.py) to let auto consider bf16 and int8",
            checks::MIN_AGREEMENT_TEXTS
        );
    }
    tracing::info!(
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        loading_warming_and_timing = format!("{:.1}", loaded_and_timed.as_secs_f64()),
        "cpu_dtype auto: measured every candidate"
    );
    let (precision, engine) = engines.swap_remove(best);
    if candidates[best].eligible() {
        tracing::info!(
            ?precision,
            "cpu_dtype auto: chose the fastest precision that agrees with fp32 and is batch-invariant"
        );
    } else {
        tracing::warn!(?precision, "cpu_dtype auto: no candidate passed both checks; serving fp32, the reference");
    }
    let batch = Some((timing.len(), timing.iter().map(|row| row.len()).max().unwrap_or(0)));
    let precision_choice = PrecisionChoice { mode: "auto", candidates, batch };
    Ok(LoadedBackend { backend: engine, device: device_name, precision, precision_choice })
}

/// What the export wrote for the runtime's checks (`golden.json`, by tools/export_model.py): the
/// golden texts' token ids; the agreement texts' (an older export has none: then the golden
/// texts alone); and which of those the invariance check runs alone and beside them.
#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<Vec<u32>>,
    #[serde(default)]
    agreement_ids: Vec<Vec<u32>>,
    #[serde(default)]
    invariance: Option<InvarianceSets>,
}

/// Indices into the agreement texts.
#[derive(Deserialize)]
struct InvarianceSets {
    probes: Vec<usize>,
    neighbours: Vec<usize>,
}

impl Golden {
    fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("golden.json");
        let invalid = |message: String| ModelError::Manifest { path: path.clone(), message };
        let golden: Golden = serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?)
            .map_err(|e| invalid(e.to_string()))?;
        if golden.input_ids.is_empty() || golden.input_ids.iter().chain(&golden.agreement_ids).any(Vec::is_empty) {
            return Err(invalid("the precision checks need the golden texts' token ids; re-export the model".into()));
        }
        let texts = golden.agreement_texts().len();
        if let Some(sets) = &golden.invariance {
            if sets.probes.is_empty() {
                return Err(invalid("the invariance check names no probe texts; re-export the model".into()));
            }
            if let Some(bad) = sets.probes.iter().chain(&sets.neighbours).find(|&&i| i >= texts) {
                return Err(invalid(format!("invariance text {bad} is not one of the {texts} agreement texts")));
            }
        }
        Ok(golden)
    }

    /// The texts candidates are compared with fp32 on.
    fn agreement_texts(&self) -> Vec<&[u32]> {
        let texts = if self.agreement_ids.is_empty() { &self.input_ids } else { &self.agreement_ids };
        texts.iter().map(Vec::as_slice).collect()
    }

    /// How far the probes' probabilities move between alone and beside the neighbours, and, given
    /// the agreement texts' outputs in sorted passes, how far any text's move when regrouped. An
    /// older export names no probes: its golden texts run alone and together then.
    fn invariance(
        &self,
        engine: &mut Engine,
        precision: Precision,
        sorted: Option<&[Output]>,
    ) -> Result<Invariance, ModelError> {
        let texts = self.agreement_texts();
        let (probes, neighbours): (Vec<&[u32]>, Vec<&[u32]>) = match &self.invariance {
            Some(sets) => {
                (sets.probes.iter().map(|&i| texts[i]).collect(), sets.neighbours.iter().map(|&i| texts[i]).collect())
            }
            None => (self.input_ids.iter().map(Vec::as_slice).collect(), Vec::new()),
        };
        let alone = checks::invariance(engine, &probes, &neighbours, checks::invariance_bound(precision))?;
        match sorted {
            Some(sorted) => checks::regrouped(engine, &texts, sorted, alone),
            None => Ok(alone),
        }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
