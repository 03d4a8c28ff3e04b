//! Splitting one call's sequences into forward passes.
//!
//! A forward pass pads every row to the longest one, so its cost is `rows × longest`.
//! Sorting by length puts similar lengths together and keeps that padding small; the two
//! limits from the config (`inference_batch_size` rows, `max_batch_tokens` padded tokens)
//! bound memory. A sequence longer than the whole token budget still runs, alone.

use std::num::NonZeroUsize;

/// The two bounds on one forward pass: the config's `inference_batch_size` and `max_batch_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// At most this many sequences in one forward pass.
    pub max_sequences: NonZeroUsize,
    /// At most this many padded tokens (rows × longest row) in one forward pass.
    pub max_tokens: NonZeroUsize,
}

/// How sequences are grouped. `InputOrder` is the seed's old way, kept as a benchmark baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOrder {
    /// Similar lengths together, longest first, so passes pad little (in the scheduler, with tenant
    /// fairness too); the config's default.
    LengthSorted,
    /// First come, first in a pass, which closes when the next sequence would pass a limit.
    InputOrder,
}

/// One forward pass: which inputs it holds and the length they are padded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Positions of its sequences in the input, ascending; never empty.
    pub indices: Vec<usize>,
    /// Tokens each row is padded to: its longest sequence's length, at least 1.
    pub padded_len: usize,
}

impl Chunk {
    fn empty() -> Self {
        Chunk { indices: Vec::new(), padded_len: 0 }
    }

    /// Tokens the pass computes, padding included: rows × `padded_len`.
    pub fn padded_tokens(&self) -> usize {
        self.indices.len() * self.padded_len
    }
}

/// Plans the forward passes for sequences of the given lengths. Every index appears in
/// exactly one chunk; within a chunk, indices keep their relative input order.
pub fn plan_chunks(lengths: &[usize], limits: BatchLimits, order: ChunkOrder) -> Vec<Chunk> {
    let mut queue: Vec<usize> = (0..lengths.len()).collect();
    if order == ChunkOrder::LengthSorted {
        // Longest first: the most demanding pass runs first, so memory trouble shows early.
        queue.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }

    let mut chunks = Vec::new();
    let mut current = Chunk::empty();
    for i in queue {
        let len = lengths[i].max(1);
        let rows = current.indices.len() + 1;
        let padded_len = current.padded_len.max(len);
        let fits = rows <= limits.max_sequences.get() && rows * padded_len <= limits.max_tokens.get();
        if !fits && !current.indices.is_empty() {
            chunks.push(std::mem::replace(&mut current, Chunk::empty()));
        }
        current.padded_len = current.padded_len.max(len);
        current.indices.push(i);
    }
    if !current.indices.is_empty() {
        chunks.push(current);
    }
    for chunk in &mut chunks {
        chunk.indices.sort_unstable();
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(seqs: usize, tokens: usize) -> BatchLimits {
        BatchLimits { max_sequences: NonZeroUsize::new(seqs).unwrap(), max_tokens: NonZeroUsize::new(tokens).unwrap() }
    }

    #[test]
    fn empty_input_plans_nothing() {
        assert!(plan_chunks(&[], limits(4, 100), ChunkOrder::LengthSorted).is_empty());
    }

    #[test]
    fn sorted_chunks_group_similar_lengths() {
        let lengths = [5, 50, 6, 48, 7, 49];
        let chunks = plan_chunks(&lengths, limits(3, 1000), ChunkOrder::LengthSorted);
        assert_eq!(
            chunks,
            vec![Chunk { indices: vec![1, 3, 5], padded_len: 50 }, Chunk { indices: vec![0, 2, 4], padded_len: 7 },]
        );
        let in_order = plan_chunks(&lengths, limits(3, 1000), ChunkOrder::InputOrder);
        assert_eq!(in_order[0], Chunk { indices: vec![0, 1, 2], padded_len: 50 });
    }

    #[test]
    fn token_budget_closes_a_chunk_before_the_row_limit() {
        // 3 rows of 40 = 120 tokens > 100: only two fit.
        let chunks = plan_chunks(&[40, 40, 40], limits(8, 100), ChunkOrder::LengthSorted);
        assert_eq!(chunks.iter().map(|c| c.indices.len()).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn a_sequence_over_the_token_budget_runs_alone() {
        let chunks = plan_chunks(&[10, 500, 10], limits(8, 100), ChunkOrder::LengthSorted);
        assert_eq!(chunks[0], Chunk { indices: vec![1], padded_len: 500 });
        assert_eq!(chunks[1], Chunk { indices: vec![0, 2], padded_len: 10 });
    }

    proptest! {
        #[test]
        fn plans_respect_limits_and_cover_every_input_once(
            lengths in proptest::collection::vec(0usize..600, 0..300),
            max_sequences in 1usize..64,
            max_tokens in 1usize..4096,
            sorted in any::<bool>(),
        ) {
            let order = if sorted { ChunkOrder::LengthSorted } else { ChunkOrder::InputOrder };
            let chunks = plan_chunks(&lengths, limits(max_sequences, max_tokens), order);
            let mut seen = vec![0u32; lengths.len()];
            for chunk in &chunks {
                prop_assert!(!chunk.indices.is_empty());
                prop_assert!(chunk.indices.len() <= max_sequences);
                let longest = chunk.indices.iter().map(|&i| lengths[i].max(1)).max().unwrap();
                prop_assert_eq!(chunk.padded_len, longest);
                // Over budget only when one sequence alone is longer than the budget.
                prop_assert!(chunk.padded_tokens() <= max_tokens || chunk.indices.len() == 1);
                prop_assert!(chunk.indices.windows(2).all(|w| w[0] < w[1]));
                for &i in &chunk.indices {
                    seen[i] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
        }

        #[test]
        fn sorting_never_pads_more_than_input_order(
            max_sequences in 1usize..40,
            pattern in proptest::collection::vec(1usize..300, 1..50),
            full_chunks in 1usize..8,
        ) {
            // With only a row limit and full chunks, the i-th longest chunk of a sorted plan is
            // as short as any plan's can be, so sorting can't pad more than input order.
            let lengths: Vec<usize> = pattern.iter().cycle().take(max_sequences * full_chunks).copied().collect();
            let l = limits(max_sequences, usize::MAX);
            let padded = |order| plan_chunks(&lengths, l, order).iter().map(Chunk::padded_tokens).sum::<usize>();
            prop_assert!(padded(ChunkOrder::LengthSorted) <= padded(ChunkOrder::InputOrder));
        }
    }
}
