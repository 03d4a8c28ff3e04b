//! How long a forward pass will take, learned from the passes the model thread measured.
//!
//! A pass over `rows` sequences padded to `len` tokens is modelled as
//! `time ≈ c0 + c1·rows·len + c2·rows·len²`: a fixed cost per pass, a cost per padded token
//! (the linear layers), and one that grows with length (attention). The three coefficients are
//! fitted online by least squares, kept non-negative (a pass never gets cheaper with more tokens),
//! over every measured pass with exponential forgetting, so the fit follows the machine as its
//! load changes.
//!
//! Robustness:
//! - no prediction until [`MIN_PASSES`] passes were measured: before that, nothing is shrunk;
//! - once there is a fit, a measurement is clamped to at most [`SLOWER_AT_MOST`]× and at least
//!   1/[`FASTER_AT_MOST`] of what was predicted, so one pass stalled by a noisy neighbour moves
//!   the fit a step and not all the way. Slower is allowed further than faster: a pass longer than
//!   predicted (the first of a new length, say) makes another tenant wait, so the fit must catch
//!   up at once, while one shorter than predicted only costs some throughput until it does;
//! - old passes weigh less and less ([`FORGET`] per pass), so slow first passes (lazy
//!   initialisation, JIT profiling) are forgotten;
//! - a shape the model has never seen is predicted from the others; with few shapes the three
//!   coefficients are not all determined, and the fit with the fewest coefficients among equals
//!   is kept;
//! - a batch's rows always get at least half the target, however much of it the fixed cost of a
//!   pass (`c0`) seems to take: on a CPU shared with other work every pass stalls now and then,
//!   `c0` looks large, and shrinking batches towards one row would cut throughput without
//!   making passes much shorter. A pass is then predicted at `c0` plus half the target.
//!
//! Pure: durations come in as arguments.

use std::time::Duration;

/// Passes measured before the model predicts anything.
pub const MIN_PASSES: u32 = 3;
/// Each new pass multiplies the weight of the earlier ones by this (half-life about 23 passes).
pub const FORGET: f64 = 0.97;
/// A measurement is taken as at most this many times what was predicted...
pub const SLOWER_AT_MOST: f64 = 16.0;
/// ...and at least this many times less.
pub const FASTER_AT_MOST: f64 = 4.0;

/// The share of a full pass's predicted time a split must save, for
/// [`CostModel::first_pass_rows`] to split.
pub const SPLIT_SAVES_AT_LEAST: f64 = 0.1;

/// Features are scaled so that a full 32 × 256 batch gives values of order 1 to 10.
fn features(rows: usize, len: usize) -> [f64; 3] {
    let tokens = rows as f64 * len as f64;
    [1.0, tokens / 1e3, tokens * len as f64 / 1e5]
}

/// The online fit: decayed sums of the normal equations, and the coefficients they give.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    xtx: [[f64; 3]; 3],
    xty: [f64; 3],
    passes: u32,
    coefficients: Option<[f64; 3]>,
}

impl CostModel {
    /// Learns from one measured pass of `rows` sequences padded to `len` tokens.
    pub fn observe(&mut self, rows: usize, len: usize, elapsed: Duration) {
        if rows == 0 || len == 0 {
            return;
        }
        let x = features(rows, len);
        let mut y = elapsed.as_secs_f64();
        if let Some(predicted) = self.predict_secs(rows, len).filter(|&p| p > 0.0) {
            y = y.clamp(predicted / FASTER_AT_MOST, predicted * SLOWER_AT_MOST);
        }
        for i in 0..3 {
            for j in 0..3 {
                self.xtx[i][j] = self.xtx[i][j] * FORGET + x[i] * x[j];
            }
            self.xty[i] = self.xty[i] * FORGET + x[i] * y;
        }
        self.passes = self.passes.saturating_add(1);
        if self.passes >= MIN_PASSES {
            self.coefficients = Some(self.fit());
        }
    }

    /// The predicted time of a pass, once enough passes were measured.
    pub fn predict(&self, rows: usize, len: usize) -> Option<Duration> {
        self.predict_secs(rows, len).map(|s| Duration::from_secs_f64(s.max(0.0)))
    }

    /// The most rows of length `len` (at least 1, at most `cap`) whose pass is predicted to take
    /// at most `target`, or whose own work (the pass less its fixed cost) takes at most half of it,
    /// whichever is more; `cap` until the model predicts.
    pub fn rows_within(&self, len: usize, target: Duration, cap: usize) -> usize {
        let Some(c) = self.coefficients else { return cap };
        let per_row = {
            let x = features(1, len);
            c[1] * x[1] + c[2] * x[2]
        };
        if per_row <= 0.0 {
            return cap;
        }
        let target = target.as_secs_f64();
        let room = (target - c[0]).max(target / 2.0);
        // `room / per_row` is finite and at most huge; the cast saturates.
        (((room / per_row).floor()).max(1.0) as usize).clamp(1, cap.max(1))
    }

    /// How many of `lengths` (rows in the order a batch would take them) the next pass should
    /// take, where a pass padded to `len` tokens may hold `cap(len)` rows (at least one).
    ///
    /// The rule, the same at every pass: take every row the pass may hold, unless a split of what
    /// waits into consecutive passes, each padded to its longest row and each following this rule
    /// in turn, is predicted to save at least [`SPLIT_SAVES_AT_LEAST`] of that first full pass's
    /// time; then take the first pass of the quickest such split. Where a pass costs little beyond
    /// its tokens (a CPU), rows much shorter than the first are left to a pass of their own rather
    /// than padded; where each pass has a large fixed cost (a GPU waiting on kernel launches),
    /// passes stay full; a fit still unsure of the fixed cost does not break passes up for a few
    /// percent. Every row the pass may hold until the model predicts. Since later passes follow
    /// the same rule, the passes taken are never predicted slower than full ones.
    pub fn first_pass_rows(&self, lengths: &[usize], cap: impl Fn(usize) -> usize) -> usize {
        let n = lengths.len();
        // The rows a full pass starting at `i` holds: as many as fit the cap of its longest row.
        let full = |i: usize| {
            let (mut rows, mut longest) = (0, 0);
            while i + rows < n {
                let with_next = longest.max(lengths[i + rows]);
                if rows + 1 > cap(with_next).max(1) {
                    break;
                }
                (rows, longest) = (rows + 1, with_next);
            }
            rows.max(1).min(n - i)
        };
        let Some(c) = self.coefficients.filter(|_| n > 1) else { return full(0) };
        let predict = |rows: usize, len: usize| {
            let x = features(rows, len);
            c[0] * x[0] + c[1] * x[1] + c[2] * x[2]
        };
        // planned[i]: the predicted time of lengths[i..] under the rule; first[i]: its first pass.
        let (mut planned, mut first) = (vec![0.0; n + 1], vec![0; n + 1]);
        for i in (0..n).rev() {
            let all = full(i);
            let (mut quickest, mut rows, mut longest) = (f64::INFINITY, all, 0);
            for j in i + 1..=i + all {
                longest = longest.max(lengths[j - 1]);
                let total = predict(j - i, longest) + planned[j];
                // Among equals (to rounding), the fuller pass: its rows are answered sooner.
                if total <= quickest + quickest * 1e-9 {
                    (quickest, rows) = (total, j - i);
                }
            }
            let first_full = predict(all, longest);
            let taking_all = first_full + planned[i + all];
            (planned[i], first[i]) = if quickest <= taking_all - SPLIT_SAVES_AT_LEAST * first_full {
                (quickest, rows)
            } else {
                (taking_all, all)
            };
        }
        first[0]
    }

    fn predict_secs(&self, rows: usize, len: usize) -> Option<f64> {
        let c = self.coefficients?;
        let x = features(rows, len);
        Some(c[0] * x[0] + c[1] * x[1] + c[2] * x[2])
    }

    /// Non-negative least squares over three coefficients: every subset of them is solved (the
    /// others held at zero) and the feasible one with the smallest residual wins, the smaller
    /// subset among equals.
    fn fit(&self) -> [f64; 3] {
        let mut best: Option<(f64, [f64; 3])> = None;
        // Subsets by size, so a larger one must be strictly better to win.
        for subset in [0b001, 0b010, 0b100, 0b011, 0b101, 0b110, 0b111u8] {
            let Some(c) = self.solve(subset) else { continue };
            if c.iter().any(|&v| v < 0.0) {
                continue;
            }
            let residual = self.residual(&c);
            if best.is_none_or(|(r, _)| residual < r * (1.0 - 1e-9) - 1e-15) {
                best = Some((residual, c));
            }
        }
        best.map_or([0.0; 3], |(_, c)| c)
    }

    /// The squared residual, less the constant Σy² every subset shares.
    fn residual(&self, c: &[f64; 3]) -> f64 {
        let mut r = 0.0;
        for i in 0..3 {
            r -= 2.0 * c[i] * self.xty[i];
            for j in 0..3 {
                r += c[i] * self.xtx[i][j] * c[j];
            }
        }
        r
    }

    /// The least-squares coefficients of the features in `subset` (the rest zero), by Gaussian
    /// elimination with partial pivoting; `None` if they are not determined.
    fn solve(&self, subset: u8) -> Option<[f64; 3]> {
        let idx: Vec<usize> = (0..3).filter(|i| subset & (1 << i) != 0).collect();
        let n = idx.len();
        let mut a: Vec<Vec<f64>> =
            idx.iter().map(|&i| idx.iter().map(|&j| self.xtx[i][j]).chain([self.xty[i]]).collect()).collect();
        let scale = idx.iter().map(|&i| self.xtx[i][i]).fold(0.0, f64::max);
        for col in 0..n {
            let pivot = (col..n).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
            // A pivot this small next to the largest diagonal means the features are dependent
            // over the passes seen so far.
            if a[pivot][col].abs() <= scale * 1e-9 {
                return None;
            }
            a.swap(col, pivot);
            let pivot_row = a[col].clone();
            for (r, row) in a.iter_mut().enumerate() {
                if r != col {
                    let factor = row[col] / pivot_row[col];
                    for (value, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                        *value -= factor * p;
                    }
                }
            }
        }
        let mut c = [0.0; 3];
        for (row, &i) in idx.iter().enumerate() {
            c[i] = a[row][n] / a[row][row];
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    /// A CPU-like cost: 2 ms a pass, 20 µs a token, attention 0.1 µs per token per position.
    fn truth(rows: usize, len: usize) -> f64 {
        2.0 + 0.02 * (rows * len) as f64 + 0.0001 * (rows * len * len) as f64
    }

    fn shapes() -> impl Iterator<Item = (usize, usize)> {
        [(32, 48), (7, 20), (32, 256), (1, 256), (16, 128), (32, 12), (4, 200), (2, 8)].into_iter().cycle()
    }

    #[test]
    fn predicts_nothing_until_it_has_measured_a_few_passes() {
        let mut model = CostModel::default();
        for _ in 1..MIN_PASSES {
            model.observe(32, 48, ms(100.0));
            assert_eq!(model.predict(32, 48), None);
            assert_eq!(model.rows_within(48, ms(1.0), 32), 32, "no shrinking before there is a fit");
        }
        model.observe(32, 48, ms(100.0));
        let predicted = model.predict(32, 48).unwrap().as_secs_f64() * 1e3;
        assert!((predicted - 100.0).abs() < 1.0, "{predicted}");
    }

    #[test]
    fn learns_the_length_cost_from_varied_passes() {
        let mut model = CostModel::default();
        for (rows, len) in shapes().take(40) {
            model.observe(rows, len, ms(truth(rows, len)));
        }
        for (rows, len) in [(32, 256), (3, 256), (32, 30), (1, 1), (10, 100)] {
            let predicted = model.predict(rows, len).unwrap().as_secs_f64() * 1e3;
            let want = truth(rows, len);
            assert!(
                (predicted - want).abs() <= want * 0.02,
                "{rows}×{len}: predicted {predicted:.2} ms, truth {want:.2} ms"
            );
        }
        // 200 ms at length 256: 2 + r·(5.12 + 6.5536) ≤ 200, so 16 rows.
        assert_eq!(model.rows_within(256, ms(200.0), 32), 16);
        assert_eq!(model.rows_within(16, ms(200.0), 32), 32, "short rows fit the cap");
    }

    #[test]
    fn a_sequence_over_the_target_still_gets_one_row() {
        let mut model = CostModel::default();
        for (rows, len) in shapes().take(20) {
            model.observe(rows, len, ms(truth(rows, len)));
        }
        assert_eq!(model.rows_within(256, ms(1.0), 32), 1);
        assert_eq!(model.rows_within(256, Duration::ZERO, 32), 1);
    }

    #[test]
    fn rows_keep_half_the_target_however_large_the_fixed_cost() {
        // A contended machine: every pass seems to cost 300 ms before its 20 µs a token (1 ms a
        // row of 50 tokens).
        let mut model = CostModel::default();
        for (rows, len) in shapes().take(20) {
            model.observe(rows, len, ms(300.0 + 0.02 * (rows * len) as f64));
        }
        // Nothing fits a 200 ms target; the rows get 100 ms of it.
        let rows = model.rows_within(50, ms(200.0), 1000);
        assert!((99..=100).contains(&rows), "{rows}");
        assert_eq!(model.rows_within(50, ms(200.0), 32), 32);
        // Where the fixed cost leaves more than half the target, the rows get all of it.
        let rows = model.rows_within(50, ms(1000.0), 1000);
        assert!((699..=700).contains(&rows), "{rows}");
    }

    #[test]
    fn one_slow_pass_moves_the_fit_a_step_only() {
        let mut model = CostModel::default();
        for (rows, len) in shapes().take(40) {
            model.observe(rows, len, ms(truth(rows, len)));
        }
        // A neighbour stalls the CPU for a second during one small pass.
        model.observe(2, 8, ms(1000.0));
        let predicted = model.predict(2, 8).unwrap().as_secs_f64() * 1e3;
        assert!(predicted < 4.0 * truth(2, 8), "predicted {predicted:.2} ms for a {:.2} ms pass", truth(2, 8));
        let big = model.predict(32, 256).unwrap().as_secs_f64() * 1e3;
        assert!((big - truth(32, 256)).abs() < truth(32, 256) * 0.1, "{big:.1}");
    }

    #[test]
    fn a_new_length_much_slower_than_predicted_is_learned_at_once() {
        // Only short passes so far: length 256 is extrapolated, here 10x too low.
        let mut model = CostModel::default();
        for (rows, len) in shapes().filter(|&(_, len)| len <= 48).take(30) {
            model.observe(rows, len, ms(truth(rows, len)));
        }
        let slow = |rows: usize| 10.0 * truth(rows, 256);
        model.observe(32, 256, ms(slow(32)));
        let rows = model.rows_within(256, ms(200.0), 32);
        let after_one = slow(rows);
        assert!(after_one < 600.0, "after one slow pass the next has {rows} rows, {after_one:.0} ms");
    }

    #[test]
    fn slow_first_passes_are_forgotten() {
        let mut model = CostModel::default();
        // Warm-up: the first passes take ten times as long.
        for (rows, len) in shapes().take(8) {
            model.observe(rows, len, ms(10.0 * truth(rows, len)));
        }
        for (rows, len) in shapes().take(150) {
            model.observe(rows, len, ms(truth(rows, len)));
        }
        let predicted = model.predict(32, 256).unwrap().as_secs_f64() * 1e3;
        assert!((predicted - truth(32, 256)).abs() < truth(32, 256) * 0.05, "{predicted:.1}");
    }

    #[test]
    fn one_shape_alone_predicts_that_shape() {
        // A flood of one shape determines only the sum of the coefficients' contributions there.
        let mut model = CostModel::default();
        for _ in 0..20 {
            model.observe(3, 256, ms(190.0));
        }
        let predicted = model.predict(3, 256).unwrap().as_secs_f64() * 1e3;
        assert!((predicted - 190.0).abs() < 1.0, "{predicted}");
        assert_eq!(model.rows_within(256, ms(200.0), 32), 3);
    }

    /// A model taught `truth`-like passes, plus `fixed_ms` per pass.
    fn taught(fixed_ms: f64) -> CostModel {
        let mut model = CostModel::default();
        for _ in 0..10 {
            for (rows, len) in shapes().take(8) {
                model.observe(rows, len, ms(truth(rows, len) + fixed_ms));
            }
        }
        model
    }

    /// The predicted time of running `lengths` in consecutive passes of the given sizes.
    fn total_ms(model: &CostModel, lengths: &[usize], passes: &[usize]) -> f64 {
        let mut start = 0;
        let mut total = 0.0;
        for &rows in passes {
            let longest = lengths[start..start + rows].iter().copied().max().unwrap();
            total += model.predict(rows, longest).unwrap().as_secs_f64() * 1e3;
            start += rows;
        }
        total
    }

    /// Splits `lengths` pass by pass as the scheduler would, each pass taking `first_pass_rows`.
    fn passes(model: &CostModel, lengths: &[usize], cap: usize) -> Vec<usize> {
        let mut passes = Vec::new();
        let mut start = 0;
        while start < lengths.len() {
            let rows = model.first_pass_rows(&lengths[start..], |_| cap);
            passes.push(rows);
            start += rows;
        }
        passes
    }

    #[test]
    fn rows_of_one_length_fill_each_pass() {
        for fixed_ms in [0.0, 2.0, 30.0] {
            assert_eq!(passes(&taught(fixed_ms), &[40; 70], 32), [32, 32, 6], "fixed cost {fixed_ms} ms");
        }
        // Before the model predicts: every row it may take.
        assert_eq!(CostModel::default().first_pass_rows(&[50, 10, 5], |_| 32), 3);
        // A pass holds what the cap of its longest row lets it.
        assert_eq!(CostModel::default().first_pass_rows(&[50, 10, 5], |len| 100 / len), 2);
    }

    #[test]
    fn short_rows_are_not_padded_to_long_ones_when_a_pass_costs_little_more_than_its_tokens() {
        // 8 rows of 60 tokens, then 24 of 8: one pass pads the short ones to 60.
        let lengths: Vec<usize> = [60; 8].into_iter().chain([8; 24]).collect();
        assert_eq!(passes(&taught(0.5), &lengths, 32), [8, 24]);
        // Where every pass has a large fixed cost, one full pass is cheaper.
        assert_eq!(passes(&taught(200.0), &lengths, 32), [32]);
    }

    #[test]
    fn a_split_that_saves_under_a_tenth_is_not_taken() {
        // 16 rows of 60 and 16 of 50: two passes would save about 5% of one.
        let lengths: Vec<usize> = [60; 16].into_iter().chain([50; 16]).collect();
        let model = taught(0.5);
        let (one, two) = (total_ms(&model, &lengths, &[32]), total_ms(&model, &lengths, &[16, 16]));
        assert!(two < one && two > one * (1.0 - SPLIT_SAVES_AT_LEAST), "{one} ms, split {two} ms");
        assert_eq!(passes(&model, &lengths, 32), [32]);
    }

    #[test]
    fn a_rule_followed_at_every_pass_is_never_slower_than_full_passes_even_unsorted() {
        // A review's counterexample to a rule that planned with splits later passes did not make.
        let lengths = [200, 60, 120, 120, 10, 80, 60, 60];
        let model = taught(0.0);
        let chosen = passes(&model, &lengths, 2);
        assert!(
            total_ms(&model, &lengths, &chosen) <= total_ms(&model, &lengths, &[2, 2, 2, 2]) * (1.0 + 1e-9),
            "{chosen:?}"
        );
    }

    proptest! {
        #[test]
        fn the_passes_chosen_are_never_predicted_slower_than_full_ones(
            mut lengths in proptest::collection::vec(1usize..300, 1..100),
            cap in 1usize..40,
            fixed_ms in 0.0f64..100.0,
            sorted: bool,
        ) {
            if sorted {
                lengths.sort_unstable_by(|a, b| b.cmp(a));
            }
            let model = taught(fixed_ms);
            let chosen = passes(&model, &lengths, cap);
            prop_assert!(chosen.iter().all(|&rows| (1..=cap).contains(&rows)));
            prop_assert_eq!(chosen.iter().sum::<usize>(), lengths.len());
            let full: Vec<usize> = lengths.chunks(cap).map(<[usize]>::len).collect();
            let (chosen_ms, full_ms) = (total_ms(&model, &lengths, &chosen), total_ms(&model, &lengths, &full));
            prop_assert!(chosen_ms <= full_ms * (1.0 + 1e-6), "{:?}: {} ms, full passes {} ms", chosen, chosen_ms, full_ms);
        }

        #[test]
        fn predictions_are_finite_and_grow_with_rows_and_length(
            passes in proptest::collection::vec((1usize..40, 1usize..512, 0.0f64..3000.0), 0..60),
            rows in 1usize..64,
            len in 1usize..512,
            target_ms in 0.0f64..5000.0,
        ) {
            let mut model = CostModel::default();
            for (r, l, t) in passes {
                model.observe(r, l, ms(t));
            }
            if let Some(p) = model.predict(rows, len) {
                prop_assert!(p.as_secs_f64().is_finite());
                prop_assert!(model.predict(rows + 1, len).unwrap() >= p);
                prop_assert!(model.predict(rows, len + 1).unwrap() >= p);
            }
            let r = model.rows_within(len, ms(target_ms), 32);
            prop_assert!((1..=32).contains(&r));
        }
    }
}
