//! Which precision a model runs at, and `cpu_dtype: auto`'s measurement.
//!
//! Policy:
//! - On CUDA: fp16 when `use_fp16`, else fp32.
//! - On CPU, a `cpu_dtype` set by hand (`fp32`, `bf16`, `int8`) is used as it is; a variant the
//!   export lacks stops startup with the command that adds it.
//! - On CPU with `auto` (the default): no precision is fastest everywhere (bf16 ran DeBERTa-v3 2x
//!   faster than fp32 on an AMD EPYC and 0.83x on an Intel Xeon without AMX; int8 depends on
//!   VNNI), so each exported candidate among fp32, bf16 and int8 is loaded, warmed up and timed
//!   on a warm-up batch. Only those faster than fp32 (the baseline) are worth checking: they are
//!   compared with fp32 on the export's agreement texts and checked for batch invariance
//!   (`batchbox_model::checks`), and the fastest within both bounds wins. One whose second pass
//!   on a few rows takes over [`SCREEN_FACTOR`] times fp32's is not even warmed up (without
//!   native bf16 or VNNI, bf16 ran 6x and int8 35x slower than fp32, and checking them took
//!   minutes). fp32 is always a candidate and the fallback, so a model that only has fp32 still
//!   loads. What was measured, and why a candidate was not checked, goes to the log,
//!   `check-config` and `/v1/models`.
//! - Every precision served, configured or chosen, has its batch invariance measured at load; a
//!   configured one is checked on the probes (alone, then beside their neighbours), and one
//!   outside the bound is still served, with a warning saying what that costs.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use batchbox_model::checks::{self, Invariance};
use batchbox_model::{
    Backend, Candidate, Format, LoadedBackend, Manifest, ModelError, Output, Pad, Precision, PrecisionChoice, warm_up,
};

use crate::engine::Engine;
use crate::{CpuDtype, FormatChoice, variant};

/// Rows and longest row of the batch `auto` times: short sentences, as a classifier mostly sees.
const TIMING_ROWS: usize = 32;
const TIMING_MAX_LEN: usize = 48;
/// Timed passes per candidate, interleaved so a noisy neighbour slows them alike.
const TIMING_ROUNDS: usize = 3;
/// A candidate whose second pass on [`SCREENING_ROWS`] rows takes over this many times the
/// baseline's (warm) is dropped untimed: it cannot win, and warming it up and checking it could
/// take minutes.
const SCREEN_FACTOR: f64 = 3.0;
/// Rows of the passes that screen a candidate: a few, so that a slow one costs little.
const SCREENING_ROWS: usize = 4;

/// A precision in a format: what one exported variant runs.
type Key = (Precision, Format);

/// Whether the export wrote the variant that runs `key` on `device`.
fn exported(manifest: &Manifest, device: tch::Device, (precision, format): Key) -> bool {
    manifest.variants.contains_key(&variant::name(precision, device, format))
}

/// Loads the engine the config asks for, or measures the candidates: every precision for
/// `cpu_dtype: auto`, every exported format for a backend setting of `auto`. The engine returned
/// is warmed up.
pub(crate) fn choose(
    dir: &Path,
    manifest: &Manifest,
    device: tch::Device,
    use_fp16: bool,
    cpu_dtype: CpuDtype,
    formats: FormatChoice,
) -> Result<LoadedBackend<Engine>, ModelError> {
    let device_name = format!("{device:?}").to_lowercase();
    let golden = Golden::load(dir);
    let configured = variant::configured(device, use_fp16, cpu_dtype);
    let exported = |key: Key| exported(manifest, device, key);
    let precisions = match configured {
        Some(precision) => vec![precision],
        None => vec![Precision::Fp32, Precision::Bf16, Precision::Int8],
    };
    let allowed = formats.formats();
    let candidates: Vec<Key> = precisions
        .iter()
        .flat_map(|&precision| allowed.iter().map(move |&format| (precision, format)))
        .filter(|&key| exported(key))
        .collect();
    let missing = |(precision, format): Key| ModelError::MissingVariant {
        dir: dir.to_owned(),
        variant: variant::name(precision, device, format),
        available: manifest.variants.keys().cloned().collect(),
    };
    if candidates.is_empty() {
        return Err(missing((precisions[0], allowed[0])));
    }
    if let (Some(_), [(precision, format)]) = (configured, candidates.as_slice()) {
        return configured_engine(dir, manifest, device, device_name, *precision, *format, golden);
    }
    match (golden, configured) {
        (Ok(golden), _) => measure(dir, manifest, device, device_name, candidates, configured, golden, missing),
        // A precision set by hand in two formats cannot be measured without the golden texts:
        // the trace runs, as it did before packages existed (configured_engine warns).
        (Err(e), Some(_)) => {
            let (precision, format) =
                candidates.iter().copied().find(|&(_, format)| format == Format::TorchScript).unwrap_or(candidates[0]);
            configured_engine(dir, manifest, device, device_name, precision, format, Err(e))
        }
        (Err(e), None) => Err(e),
    }
}

/// The one variant the config leaves: loaded, warmed up, and its batch invariance measured.
fn configured_engine(
    dir: &Path,
    manifest: &Manifest,
    device: tch::Device,
    device_name: String,
    precision: Precision,
    format: Format,
    golden: Result<Golden, ModelError>,
) -> Result<LoadedBackend<Engine>, ModelError> {
    let mut engine = Engine::load(dir, manifest, device, precision, format)?;
    warm_up(&mut engine, manifest)?;
    let invariance = match &golden {
        // The probes alone and beside their neighbours: seconds. Regrouping every agreement text
        // as well, as `auto` does for a candidate, took a minute for the default model in bf16
        // and over five in int8 on a 2-core CPU without VNNI; the export ran that on every
        // variant and printed it (the manifest's `invariance`).
        Ok(golden) => Some(golden.invariance(&mut engine, precision, None)?),
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
    let measured = Candidate::new(precision, None, None, invariance).in_format(format);
    Ok(LoadedBackend::configured(engine, device_name, measured))
}

/// Loads every candidate and times it on a warm-up batch; checks those faster than the baseline
/// (the reference's own candidate, else the one closest to it) against the reference (TorchScript
/// fp32, else TorchScript at the configured precision) and for batch invariance; keeps the fastest
/// within both bounds, or the baseline.
#[allow(clippy::too_many_arguments)]
fn measure(
    dir: &Path,
    manifest: &Manifest,
    device: tch::Device,
    device_name: String,
    candidates: Vec<Key>,
    configured: Option<Precision>,
    golden: Golden,
    missing: impl Fn(Key) -> ModelError,
) -> Result<LoadedBackend<Engine>, ModelError> {
    let exported = |key: Key| exported(manifest, device, key);
    // What every candidate is compared with: fp32 where the export has it, a trace before a
    // package, else the configured precision (an fp16-only CUDA export).
    let wanted = configured.unwrap_or(Precision::Fp32);
    let preference = [
        (Precision::Fp32, Format::TorchScript),
        (wanted, Format::TorchScript),
        (Precision::Fp32, Format::Aoti),
        (wanted, Format::Aoti),
    ];
    let Some(reference) = preference.into_iter().find(|&key| exported(key)) else {
        return Err(missing(preference[0]));
    };
    let reference_index = candidates.iter().position(|&key| key == reference);
    // What is served when no other candidate is eligible, and what the others must beat: the
    // reference's own candidate, else the one closest to it (its precision, a trace before a
    // package), else the first.
    let baseline = reference_index
        .or_else(|| candidates.iter().position(|&key| key == (reference.0, Format::TorchScript)))
        .or_else(|| candidates.iter().position(|&(precision, _)| precision == reference.0))
        .unwrap_or(0);
    let started = Instant::now();
    let mut engines = Vec::with_capacity(candidates.len());
    for &(precision, format) in &candidates {
        engines.push(Some(Engine::load(dir, manifest, device, precision, format)?));
    }
    let mut reference_engine = match reference_index {
        Some(_) => None,
        None => Some(Engine::load(dir, manifest, device, reference.0, reference.1)?),
    };

    // Every candidate pads alike (same pad id, same device).
    let padder = live(&mut engines, baseline).padder();
    let golden_rows: Vec<&[u32]> = golden.input_ids.iter().map(Vec::as_slice).collect();
    let timing: Vec<&[u32]> =
        golden_rows.iter().cycle().take(TIMING_ROWS).map(|row| &row[..row.len().min(TIMING_MAX_LEN)]).collect();
    let timing_batch = padder.pad(&timing);
    let screening_batch = padder.pad(&timing[..SCREENING_ROWS]);
    let timed = |engine: &mut Engine, batch| -> Result<Duration, ModelError> {
        let started = Instant::now();
        engine.forward(batch)?;
        Ok(started.elapsed())
    };

    // The baseline warm, then each other candidate's first passes on a few rows: one far slower
    // than the baseline (int8 without VNNI: 35x fp32 there) is neither warmed up nor timed.
    warm_up(live(&mut engines, baseline), manifest)?;
    if let Some(engine) = reference_engine.as_mut() {
        warm_up(engine, manifest)?;
    }
    let baseline_screened = timed(live(&mut engines, baseline), &screening_batch)?;
    let mut samples = vec![Vec::with_capacity(TIMING_ROUNDS); candidates.len()];
    let mut not_checked: Vec<Option<String>> = vec![None; candidates.len()];
    for i in (0..candidates.len()).filter(|&i| i != baseline) {
        // The first pass is cold (the JIT's profiling run, oneDNN making kernels): time the second.
        timed(live(&mut engines, i), &screening_batch)?;
        let screened = timed(live(&mut engines, i), &screening_batch)?;
        if screened.as_secs_f64() > SCREEN_FACTOR * baseline_screened.as_secs_f64() {
            not_checked[i] = Some(format!(
                "slower than {}: its second pass on {SCREENING_ROWS} rows took {:.0} ms, over {SCREEN_FACTOR}x its {:.0} ms",
                label(candidates[baseline]),
                screened.as_secs_f64() * 1e3,
                baseline_screened.as_secs_f64() * 1e3
            ));
            engines[i] = None;
        } else {
            warm_up(live(&mut engines, i), manifest)?;
        }
    }
    for _ in 0..TIMING_ROUNDS {
        for (engine, times) in engines.iter_mut().zip(&mut samples).filter_map(|(e, t)| Some((e.as_mut()?, t))) {
            times.push(timed(engine, &timing_batch)?);
        }
    }
    // Screened out: no time on the warm-up batch. The baseline is never screened out.
    let medians: Vec<Option<f64>> =
        samples.into_iter().map(|times| median(times).map(|m| m.as_secs_f64() * 1e3)).collect();
    let baseline_ms = medians[baseline].expect("the baseline is timed");
    for i in (0..candidates.len()).filter(|&i| i != baseline) {
        if let Some(ms) = medians[i].filter(|&ms| ms >= baseline_ms) {
            not_checked[i] = Some(format!(
                "not faster than {}: {ms:.1} ms against its {baseline_ms:.1} ms",
                label(candidates[baseline])
            ));
            engines[i] = None;
        }
    }

    let loaded_and_timed = started.elapsed();
    let texts = golden.agreement_texts();
    // Compared with the reference: every candidate but the reference itself (the baseline, when
    // the reference is a candidate).
    let compared = |i: usize| i != baseline || reference_index.is_none();
    let reference_outputs = match (0..candidates.len()).any(|i| not_checked[i].is_none() && compared(i)) {
        false => None,
        true => Some(match (reference_index, reference_engine.as_mut()) {
            (Some(i), _) => checks::run_sorted(live(&mut engines, i), &texts)?,
            (None, Some(engine)) => checks::run_sorted(engine, &texts)?,
            (None, None) => unreachable!("the reference is a candidate or loaded on its own"),
        }),
    };
    drop(reference_engine);
    let mut measured = Vec::new();
    for (i, &(precision, format)) in candidates.iter().enumerate() {
        let candidate = match (not_checked[i].take(), &reference_outputs) {
            (Some(reason), _) => Candidate::unchecked(precision, medians[i], reason),
            (None, Some(reference_outputs)) if compared(i) => {
                let engine = live(&mut engines, i);
                let outputs = checks::run_sorted(engine, &texts)?;
                let agreement = checks::agreement(reference_outputs, &outputs);
                let invariance = golden.invariance(engine, precision, Some(&outputs))?;
                Candidate::new(precision, medians[i], Some(agreement), Some(invariance))
            }
            (None, _) => {
                // The reference: fp32 is checked with the probes alone (see `checks`).
                let invariance = golden.invariance(live(&mut engines, i), precision, None)?;
                Candidate::reference(precision, baseline_ms, invariance)
            }
        };
        measured.push(candidate.in_format(format));
    }
    // The fastest eligible candidate; else the baseline (even if it failed its own invariance
    // bound: nothing else would do better).
    let best = measured
        .iter()
        .enumerate()
        .filter(|(_, c)| c.eligible())
        .min_by(|a, b| a.1.median_ms.unwrap_or(f64::MAX).total_cmp(&b.1.median_ms.unwrap_or(f64::MAX)))
        .map_or(baseline, |(i, _)| i);
    for candidate in &measured {
        let (agreement, invariance) = (candidate.agreement.as_ref(), candidate.invariance.as_ref());
        tracing::info!(
            precision = ?candidate.precision,
            format = ?candidate.format,
            median_ms = format!("{:.1}", candidate.median_ms.unwrap_or(0.0)),
            reference = candidate.reference,
            not_checked = candidate.not_checked.as_deref(),
            top_labels_agreeing = agreement.map(|a| format!("{}/{} over {} texts", a.agreeing, a.compared, a.texts)),
            max_abs_diff_from_reference = agreement.map(|a| format!("{:.1e}", a.max_abs_diff)),
            batch_invariance = invariance.map(|i| format!("{:.1e} (bound {:e})", i.max_abs_diff, i.bound)),
            eligible = candidate.eligible(),
            "auto: measured"
        );
    }
    if texts.len() < checks::MIN_AGREEMENT_TEXTS && reference_outputs.is_some() {
        tracing::warn!(
            texts = texts.len(),
            "auto: the export has fewer than {} agreement texts, too few to tell 99% agreement from less, so \
             only the reference can be chosen; re-export the model (tools/export_model.py) to let auto consider the others",
            checks::MIN_AGREEMENT_TEXTS
        );
    }
    tracing::info!(
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        loading_warming_and_timing = format!("{:.1}", loaded_and_timed.as_secs_f64()),
        "auto: measured every candidate"
    );
    let engine = engines.swap_remove(best).expect("the chosen candidate was checked, so it was kept");
    let (precision, format) = (measured[best].precision, measured[best].format);
    if measured[best].eligible() {
        tracing::info!(
            ?precision,
            ?format,
            "auto: chose the fastest candidate that agrees with the reference and is batch-invariant"
        );
    } else {
        tracing::warn!(
            ?precision,
            ?format,
            "auto: no candidate passed both checks (agreement with the reference, batch invariance); serving the one \
             closest to the reference"
        );
    }
    let batch = Some((timing.len(), timing.iter().map(|row| row.len()).max().unwrap_or(0)));
    let precision_choice = PrecisionChoice { mode: "auto", candidates: measured, batch };
    Ok(LoadedBackend { backend: engine, device: device_name, precision, format, precision_choice })
}

/// A candidate still measured: only those that cannot win are dropped.
fn live(engines: &mut [Option<Engine>], i: usize) -> &mut Engine {
    engines[i].as_mut().expect("only candidates that cannot win are dropped")
}

/// How the log names a candidate: `Fp32`, `Int8 (AOTInductor)`.
fn label((precision, format): Key) -> String {
    match format {
        Format::TorchScript => format!("{precision:?}"),
        Format::Aoti => format!("{precision:?} (AOTInductor)"),
    }
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

fn median(mut samples: Vec<Duration>) -> Option<Duration> {
    samples.sort();
    samples.get(samples.len() / 2).copied()
}
