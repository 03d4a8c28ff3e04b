//! The precision a model runs at, and why: shown in `/v1/models` and the log. The backend
//! chooses it (see `batchbox-model-tch`'s `precision` for the policy).

use serde::Serialize;

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
    /// Dynamic int8 quantization of the linear layers; the rest in fp32. CPU only.
    Int8,
}

/// What `auto` measured for one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// The precision loaded and timed.
    pub precision: Precision,
    /// Median time of the warm-up batch.
    pub median_ms: f64,
    /// Golden texts whose top labels all agree with fp32's, out of how many.
    pub agreeing_texts: usize,
    /// Golden texts compared: every one in the export's `golden.json`.
    pub golden_texts: usize,
}

impl Candidate {
    /// Whether every golden text's top labels match fp32's; only then may `auto` choose it.
    pub fn agrees(&self) -> bool {
        self.agreeing_texts == self.golden_texts
    }
}

/// Why a model runs at the precision it does.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionChoice {
    /// `configured` (set by hand, or on CUDA) or `auto`.
    pub mode: &'static str,
    /// What `auto` measured, in the order tried; empty when configured.
    pub candidates: Vec<Candidate>,
    /// The warm-up batch `auto` timed: rows x padded length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<(usize, usize)>,
}
