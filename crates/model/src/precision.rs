//! The precision a model runs at, and why: shown in `/v1/models`, `check-config` and the log. The
//! backend chooses it (see `batchbox-model-tch`'s `precision` for the policy), with the checks of
//! [`crate::checks`].

use std::fmt;

use serde::Serialize;

use crate::checks::{Agreement, Invariance};
use crate::manifest::Format;

/// Numeric precision of the loaded weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats: the reference `cpu_dtype: auto` checks the others against.
    Fp32,
    /// 16-bit floats; CUDA only, with `use_fp16`.
    Fp16,
    /// bfloat16; CPU only, set by `cpu_dtype: bf16` or chosen by `auto`.
    Bf16,
    /// int8 linear layers, weights scaled per output channel and activations per row; the rest in
    /// fp32. CPU only.
    Int8,
}

/// What was measured of one precision at load: by `auto` for each candidate, and for the
/// precision served when it was configured (invariance only).
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// The precision loaded and measured.
    pub precision: Precision,
    /// The format of the variant that runs it: TorchScript or an AOTInductor package.
    pub format: Format,
    /// Median time of the warm-up batch (`auto` only; not for a candidate screened out on a few
    /// rows first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median_ms: Option<f64>,
    /// Its outputs against fp32's on the export's agreement texts (`auto` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
    /// How far a text's probabilities moved with the texts batched beside it; `None` where the
    /// export has no golden texts to measure with.
    pub invariance: Option<Invariance>,
    /// Whether `auto` may choose it: agreement and invariance both within their bounds (`auto`
    /// only: a configured precision is served whatever it measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eligible: Option<bool>,
    /// Why `auto` did not check it (`slower than the reference`): only a candidate faster than the
    /// one `auto` would otherwise serve is worth its agreement and invariance checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_checked: Option<String>,
    /// Whether this is the reference the others are compared with (`auto` only): it has no
    /// agreement of its own, and is eligible when batch-invariant.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reference: bool,
}

impl Candidate {
    /// A candidate with what was measured of it; with an agreement (`auto`), eligible when both
    /// checks hold.
    pub fn new(
        precision: Precision,
        median_ms: Option<f64>,
        agreement: Option<Agreement>,
        invariance: Option<Invariance>,
    ) -> Self {
        let eligible =
            agreement.as_ref().map(|agreement| agreement.holds() && invariance.as_ref().is_some_and(Invariance::holds));
        Self {
            precision,
            format: Format::TorchScript,
            median_ms,
            agreement,
            invariance,
            eligible,
            not_checked: None,
            reference: false,
        }
    }

    /// The reference `auto` compares the others with: eligible when batch-invariant.
    pub fn reference(precision: Precision, median_ms: f64, invariance: Invariance) -> Self {
        Self {
            eligible: Some(invariance.holds()),
            reference: true,
            ..Self::new(precision, Some(median_ms), None, Some(invariance))
        }
    }

    /// A candidate `auto` left unchecked, for `reason`: not eligible. (No time where it was
    /// screened out on a few rows, before the warm-up batch.)
    pub fn unchecked(precision: Precision, median_ms: Option<f64>, reason: String) -> Self {
        Self { eligible: Some(false), not_checked: Some(reason), ..Self::new(precision, median_ms, None, None) }
    }

    /// The same, measured of the variant in `format`.
    pub fn in_format(self, format: Format) -> Self {
        Self { format, ..self }
    }

    /// Whether `auto` may choose it.
    pub fn eligible(&self) -> bool {
        self.eligible == Some(true)
    }
}

/// One line for the log and `check-config`: what was measured, and whether `auto` may choose it.
impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.precision)?;
        if self.format == Format::Aoti {
            write!(f, " (AOTInductor)")?;
        }
        if let Some(ms) = self.median_ms {
            write!(f, " {ms:.1} ms")?;
        }
        if self.reference {
            write!(f, ", the reference")?;
        }
        if let Some(a) = &self.agreement {
            let rate = a.agreeing as f64 / a.compared.max(1) as f64 * 100.0;
            write!(
                f,
                ", top labels agree with fp32 on {}/{} ({rate:.1}%) over {} texts, max |dp| {:.1e}",
                a.agreeing, a.compared, a.texts, a.max_abs_diff
            )?;
        }
        match (&self.invariance, &self.not_checked) {
            (_, Some(reason)) => write!(f, ", not checked: {reason}")?,
            (Some(i), None) => write!(
                f,
                ", moves {:.1e} beside other texts{} (bound {:e}{})",
                i.max_abs_diff,
                if i.regrouped > 0 {
                    format!(" ({} alone, {} regrouped)", i.probes, i.regrouped)
                } else {
                    format!(" ({} alone)", i.probes)
                },
                i.bound,
                if i.holds() { "" } else { ": not batch-invariant" }
            )?,
            (None, None) => write!(f, ", batch invariance not measured")?,
        }
        if let Some(eligible) = self.eligible {
            write!(f, "{}", if eligible { "; eligible" } else { "; not eligible" })?;
        }
        Ok(())
    }
}

/// Why a model runs at the precision it does.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionChoice {
    /// `configured` (set by hand, or on CUDA) or `auto`.
    pub mode: &'static str,
    /// `auto`: every candidate, in the order tried; configured: the precision served, with its
    /// invariance.
    pub candidates: Vec<Candidate>,
    /// The warm-up batch `auto` timed: rows x padded length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<(usize, usize)>,
}
