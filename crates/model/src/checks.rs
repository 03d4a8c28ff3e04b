//! What a precision is checked for when a model loads: agreement with fp32, and batch invariance.
//!
//! Policy (README, "Precision on CPU"; the export checks the same, `tools/batchbox_export/checks.py`):
//! - **Agreement.** The export's agreement texts (`golden.json`: the golden texts and at least
//!   256 more, written for this and never request traffic) run through fp32 and each candidate in
//!   length-sorted passes of up to 32 rows, as the scheduler groups them. A candidate's top labels
//!   (per token, for token classifiers) must agree with fp32's on at least [`MIN_AGREEMENT`] of
//!   them; the largest difference in probability is reported beside it.
//! - **Batch invariance.** A sentence's answer must not depend on the sentences batched beside
//!   it: the same request would get different answers under load, and one tenant's traffic would
//!   move another's answers. The export's probes (texts of up to 64 tokens) run alone, then in one
//!   padded pass with each other and with neighbours of up to 128 tokens; and every agreement
//!   text runs again in passes whose boundaries are shifted by half a pass, so that each has other
//!   neighbours and other padding. No probability may move by more than [`invariance_bound`]
//!   between two runs of a text: 1e-5 for fp32, 1e-3 for the others. (fp32, the reference, is
//!   checked with the probes alone: regrouping every text would double the slowest candidate's
//!   share of the startup.) Reduced precision rounds between layers, so a rounding that fp32's
//!   last bit tips the other way can grow through the layers: on the models measured, most texts
//!   moved by under 1e-6 and a few by over 1e-2, which is why every text is regrouped and not a
//!   sample.
//!
//! Both run on any [`Backend`], so they are tested here with backends that break them on purpose.

use serde::Serialize;

use crate::{Backend, ModelError, Output, Pad, Precision};

/// The share of top labels a candidate must agree with fp32 on.
pub const MIN_AGREEMENT: f64 = 0.99;
/// The fewest agreement texts that can tell 99% agreement from less; an older export has fewer.
pub const MIN_AGREEMENT_TEXTS: usize = 256;
/// Rows per pass when texts run as the scheduler groups them.
const PASS_ROWS: usize = 32;

/// How far a row's probabilities may move with its neighbours: fp32's own rounding, or 1e-3.
pub fn invariance_bound(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1e-5,
        Precision::Fp16 | Precision::Bf16 | Precision::Int8 => 1e-3,
    }
}

/// A candidate's outputs against fp32's on the agreement texts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// Texts compared.
    pub texts: usize,
    /// Top labels that agree with fp32's (one per text, or per token for token classifiers)...
    pub agreeing: usize,
    /// ...out of how many.
    pub compared: usize,
    /// The largest difference from fp32 in any probability.
    pub max_abs_diff: f64,
}

impl Agreement {
    /// Whether there were enough texts and at least [`MIN_AGREEMENT`] of the top labels agree.
    pub fn holds(&self) -> bool {
        self.texts >= MIN_AGREEMENT_TEXTS && self.agreeing as f64 >= MIN_AGREEMENT * self.compared as f64
    }
}

/// How far a text's probabilities moved between running alone and running beside others, or
/// beside other others. Serialized with `holds`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invariance {
    /// The largest move of any probability of any text.
    pub max_abs_diff: f64,
    /// What it may be: [`invariance_bound`] of the precision.
    pub bound: f64,
    /// Texts run alone.
    pub probes: usize,
    /// Other texts beside them in the shared pass.
    pub neighbours: usize,
    /// Texts run again in passes regrouped (0: not regrouped).
    pub regrouped: usize,
}

impl Serialize for Invariance {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Invariance", 6)?;
        s.serialize_field("max_abs_diff", &self.max_abs_diff)?;
        s.serialize_field("bound", &self.bound)?;
        s.serialize_field("holds", &self.holds())?;
        s.serialize_field("probes", &self.probes)?;
        s.serialize_field("neighbours", &self.neighbours)?;
        s.serialize_field("regrouped", &self.regrouped)?;
        s.end()
    }
}

impl Invariance {
    /// Whether no probability moved more than the bound.
    pub fn holds(&self) -> bool {
        self.max_abs_diff <= self.bound
    }
}

/// Each output's probabilities: a softmax over its labels (per token for token classifiers).
pub fn probabilities(output: &Output) -> Vec<f32> {
    let labels = output.shape.last().copied().unwrap_or(1).max(1);
    output
        .data
        .chunks(labels)
        .flat_map(|logits| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            exp.into_iter().map(move |e| e / sum)
        })
        .collect()
}

/// Each row's output when `rows` run as the scheduler groups them: in length-sorted passes of up
/// to 32 rows. In the rows' order.
pub fn run_sorted<B: Backend>(backend: &mut B, rows: &[&[u32]]) -> Result<Vec<Output>, ModelError> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (rows[i].len(), i));
    let padder = backend.padder();
    let mut outputs: Vec<Option<Output>> = vec![None; rows.len()];
    for pass in order.chunks(PASS_ROWS) {
        let batch: Vec<&[u32]> = pass.iter().map(|&i| rows[i]).collect();
        for (&i, output) in pass.iter().zip(backend.forward(&padder.pad(&batch))?) {
            outputs[i] = Some(output);
        }
    }
    Ok(outputs.into_iter().map(|o| o.expect("every row ran in one pass")).collect())
}

/// `outputs` against fp32's `reference` for the same texts.
pub fn agreement(reference: &[Output], outputs: &[Output]) -> Agreement {
    let (mut agreeing, mut compared, mut max_abs_diff) = (0, 0, 0f64);
    for (want, got) in reference.iter().zip(outputs) {
        let labels = want.shape.last().copied().unwrap_or(1).max(1);
        let (want, got) = (probabilities(want), probabilities(got));
        for (a, b) in want.chunks(labels).zip(got.chunks(labels)) {
            compared += 1;
            agreeing += usize::from(top(a) == top(b));
            max_abs_diff = a.iter().zip(b).map(|(&x, &y)| gap(x, y)).fold(max_abs_diff, f64::max);
        }
    }
    Agreement { texts: reference.len(), agreeing, compared, max_abs_diff }
}

/// Runs each of `probes` alone, then all of them with `neighbours` in one padded pass, and
/// measures how far the probes' probabilities moved.
pub fn invariance<B: Backend>(
    backend: &mut B,
    probes: &[&[u32]],
    neighbours: &[&[u32]],
    bound: f64,
) -> Result<Invariance, ModelError> {
    let padder = backend.padder();
    let mut alone = Vec::with_capacity(probes.len());
    for &probe in probes {
        alone.extend(backend.forward(&padder.pad(&[probe]))?);
    }
    let together: Vec<&[u32]> = probes.iter().chain(neighbours).copied().collect();
    let beside = backend.forward(&padder.pad(&together))?;
    let max_abs_diff = alone
        .iter()
        .zip(&beside)
        .flat_map(|(a, b)| probabilities(a).into_iter().zip(probabilities(b)).map(|(x, y)| gap(x, y)))
        .fold(0f64, f64::max);
    Ok(Invariance { max_abs_diff, bound, probes: probes.len(), neighbours: neighbours.len(), regrouped: 0 })
}

/// Runs `rows` again in length-sorted passes whose boundaries are shifted by half a pass, so that
/// every row has other neighbours and other padding than in `sorted` (their outputs from
/// [`run_sorted`]), and adds how far any probability moved to `invariance`.
pub fn regrouped<B: Backend>(
    backend: &mut B,
    rows: &[&[u32]],
    sorted: &[Output],
    invariance: Invariance,
) -> Result<Invariance, ModelError> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (rows[i].len(), i));
    let padder = backend.padder();
    let mut moved = invariance.max_abs_diff;
    let (first, rest) = order.split_at(order.len().min(PASS_ROWS / 2));
    for pass in std::iter::once(first).chain(rest.chunks(PASS_ROWS)) {
        let batch: Vec<&[u32]> = pass.iter().map(|&i| rows[i]).collect();
        for (&i, output) in pass.iter().zip(backend.forward(&padder.pad(&batch))?) {
            let (a, b) = (probabilities(&output), probabilities(&sorted[i]));
            moved = a.iter().zip(&b).map(|(&x, &y)| gap(x, y)).fold(moved, f64::max);
        }
    }
    Ok(Invariance { max_abs_diff: moved, regrouped: rows.len(), ..invariance })
}

/// The first label with the highest probability (as `torch.argmax` picks, so the export and the
/// server count ties alike).
fn top(probabilities: &[f32]) -> usize {
    probabilities
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &p)| if p > best.1 { (i, p) } else { best })
        .0
}

/// How far apart two probabilities are; a NaN on either side is infinitely far, so that a variant
/// whose outputs overflow cannot pass a check.
fn gap(x: f32, y: f32) -> f64 {
    let d = f64::from((x - y).abs());
    if d.is_nan() { f64::INFINITY } else { d }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::backend::tests::Rows;

    /// Logits from a row's own tokens, plus `leak` times the batch's mean length: a backend whose
    /// rows move with their neighbours as much as `leak` says (what per-batch int8 scales did).
    struct Leaky {
        leak: f32,
    }

    impl Backend for Leaky {
        type Padder = Rows;
        fn padder(&self) -> Rows {
            Rows
        }
        fn forward(&mut self, batch: &Vec<Vec<u32>>) -> Result<Vec<Output>, ModelError> {
            let mean = batch.iter().map(Vec::len).sum::<usize>() as f32 / batch.len() as f32;
            Ok(batch
                .iter()
                .map(|row| {
                    let own = row.iter().map(|&t| t as f32).sum::<f32>() / row.len() as f32 / 1000.0;
                    Output { data: vec![own + self.leak * mean, -own, 0.5], shape: vec![3] }
                })
                .collect())
        }
    }

    fn rows(lengths: &[usize]) -> Vec<Vec<u32>> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n as u32).map(|t| (t * 37 + i as u32 * 11) % 997).collect())
            .collect()
    }

    #[test]
    fn a_nan_fails_every_check_and_ties_go_to_the_first_label() {
        let nan = Output { data: vec![f32::NAN, 0.0, 0.0], shape: vec![3] };
        let fine = Output { data: vec![1.0, 0.0, 0.0], shape: vec![3] };
        assert_eq!(agreement(std::slice::from_ref(&fine), &[nan]).max_abs_diff, f64::INFINITY);
        assert_eq!(top(&[0.25, 0.5, 0.5, 0.25]), 1);
        let moved = Invariance { max_abs_diff: f64::INFINITY, bound: 1e-3, probes: 1, neighbours: 0, regrouped: 0 };
        assert!(!moved.holds());
        assert_eq!(serde_json::to_value(&moved).unwrap()["holds"], false);
    }

    #[test]
    fn probabilities_are_a_softmax_per_label_row() {
        let p = probabilities(&Output { data: vec![0.0, 0.0, 1000.0, 0.0], shape: vec![2, 2] });
        assert_eq!(p, [0.5, 0.5, 1.0, 0.0]);
    }

    #[test]
    fn a_backend_whose_rows_depend_on_the_batch_fails_the_invariance_bound_and_one_that_does_not_passes() {
        let probes = rows(&[3, 9, 20]);
        let neighbours = rows(&[60, 128, 1]);
        let (p, n): (Vec<&[u32]>, Vec<&[u32]>) =
            (probes.iter().map(Vec::as_slice).collect(), neighbours.iter().map(Vec::as_slice).collect());
        let faithful = invariance(&mut Leaky { leak: 0.0 }, &p, &n, 1e-5).unwrap();
        assert!(faithful.holds() && faithful.max_abs_diff == 0.0, "{faithful:?}");
        assert_eq!((faithful.probes, faithful.neighbours), (3, 3));
        let leaky = invariance(&mut Leaky { leak: 1e-3 }, &p, &n, 1e-3).unwrap();
        assert!(!leaky.holds(), "{leaky:?}");
    }

    #[test]
    fn regrouping_finds_rows_that_move_with_their_neighbours() {
        let texts = rows(&(1..=70).map(|n| n % 23 + 1).collect::<Vec<_>>());
        let texts: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let none = Invariance { max_abs_diff: 0.0, bound: 1e-3, probes: 0, neighbours: 0, regrouped: 0 };
        for (leak, holds) in [(0.0, true), (1e-3, false)] {
            let mut backend = Leaky { leak };
            let sorted = run_sorted(&mut backend, &texts).unwrap();
            let checked = regrouped(&mut backend, &texts, &sorted, none.clone()).unwrap();
            assert_eq!((checked.holds(), checked.regrouped), (holds, 70), "leak {leak}: {checked:?}");
        }
    }

    #[test]
    fn agreement_needs_enough_texts_and_counts_top_labels() {
        let texts = rows(&vec![5; MIN_AGREEMENT_TEXTS]);
        let texts: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let reference = run_sorted(&mut Leaky { leak: 0.0 }, &texts).unwrap();
        let same = agreement(&reference, &reference);
        assert!(same.holds() && same.max_abs_diff == 0.0 && same.agreeing == MIN_AGREEMENT_TEXTS, "{same:?}");
        assert!(!agreement(&reference[..10], &reference[..10]).holds(), "10 texts cannot tell 99% from less");
        // Every label turned around on 1% of the texts, and one more.
        let mut flipped = reference.clone();
        for output in flipped.iter_mut().take(MIN_AGREEMENT_TEXTS / 100 + 2) {
            output.data = vec![-10.0, 10.0, 0.0];
        }
        let fewer = agreement(&reference, &flipped);
        assert_eq!(fewer.agreeing, MIN_AGREEMENT_TEXTS - MIN_AGREEMENT_TEXTS / 100 - 2);
        assert!(!fewer.holds() && fewer.max_abs_diff > 0.5, "{fewer:?}");
    }

    proptest! {
        #[test]
        fn rows_run_sorted_come_back_in_their_own_order(lengths in proptest::collection::vec(1usize..80, 1..100)) {
            let texts = rows(&lengths);
            let texts: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
            let sorted = run_sorted(&mut Leaky { leak: 0.0 }, &texts).unwrap();
            let alone: Vec<Output> = texts.iter().map(|t| Leaky { leak: 0.0 }.forward(&vec![t.to_vec()]).unwrap().remove(0)).collect();
            prop_assert_eq!(sorted, alone);
        }
    }
}
