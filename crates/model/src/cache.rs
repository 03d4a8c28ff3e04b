//! The response cache: a tenant's logits per sequence, so a text it sent before skips the model.
//!
//! Policy:
//! - Opt-in per tenant (`tenants[].cache.max_bytes`). Each tenant has a cache of its own: a
//!   shared one would let a tenant learn from a fast answer what another tenant had sent.
//! - An entry is keyed by the model's version and precision and the exact token ids, and holds
//!   the logits the model computed for them. A hit returns those very bytes, bit for bit.
//! - Bounded in bytes (token ids, logits and a fixed per-entry overhead): the least recently used
//!   entries are evicted first; an entry larger than the whole budget is not kept.
//! - A lookup or insert under another model version clears the cache first: nothing computed by
//!   one model is ever answered for another.
//! - Hits and misses count per sequence, once the call succeeds, into the model's cache metrics
//!   (`/metrics`, `/v1/models`), summed over its tenants so no tenant is named there. A sequence
//!   repeated within one call is computed once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lru::LruCache;

pub use crate::metrics::CacheMetrics;
use crate::{Inference, Model, ModelError, Output};

/// What an entry costs beyond its ids and logits: the map's node, the LRU links, two `Vec`
/// headers and the shape. An estimate; it keeps many tiny entries from slipping past the budget.
const ENTRY_OVERHEAD: u64 = 128;

/// One tenant's entries: a byte-bounded LRU for one model version at a time.
pub struct Lru {
    max_bytes: u64,
    version: String,
    entries: LruCache<Vec<u32>, Output>,
    bytes: u64,
}

impl Lru {
    /// An empty cache charged at most `max_bytes`: ids, logits and a fixed overhead per entry.
    pub fn new(max_bytes: u64) -> Self {
        Self { max_bytes, version: String::new(), entries: LruCache::unbounded(), bytes: 0 }
    }

    /// Bytes its entries are charged now; never more than `max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn cost(ids: &[u32], output: &Output) -> u64 {
        (4 * ids.len() + 4 * output.data.len() + 8 * output.shape.len()) as u64 + ENTRY_OVERHEAD
    }

    /// Forgets everything if `version` is not the one the entries were computed by.
    fn switch_to(&mut self, version: &str, stats: &CacheMetrics) {
        if self.version != version {
            stats.entries.decrement(self.entries.len() as f64);
            stats.bytes.decrement(self.bytes as f64);
            self.entries.clear();
            self.bytes = 0;
            version.clone_into(&mut self.version);
        }
    }

    /// The logits computed for `ids` by model `version`, if kept; marks them recently used.
    pub fn get(&mut self, version: &str, ids: &[u32], stats: &CacheMetrics) -> Option<Output> {
        self.switch_to(version, stats);
        self.entries.get(ids).cloned()
    }

    /// Keeps `output` for `ids`, evicting the least recently used entries to stay in budget.
    pub fn put(&mut self, version: &str, ids: Vec<u32>, output: Output, stats: &CacheMetrics) {
        self.switch_to(version, stats);
        let cost = Self::cost(&ids, &output);
        if cost > self.max_bytes {
            return;
        }
        if let Some(old) = self.entries.pop(&ids) {
            self.forget(Self::cost(&ids, &old), stats);
        }
        while self.bytes + cost > self.max_bytes {
            let Some((old_ids, old)) = self.entries.pop_lru() else { break };
            self.forget(Self::cost(&old_ids, &old), stats);
            stats.evictions.increment(1);
        }
        self.entries.put(ids, output);
        self.bytes += cost;
        stats.entries.increment(1.0);
        stats.bytes.increment(cost as f64);
    }

    fn forget(&mut self, cost: u64, stats: &CacheMetrics) {
        self.bytes -= cost;
        stats.entries.decrement(1.0);
        stats.bytes.decrement(cost as f64);
    }
}

/// A tenant's view of its model through its cache.
pub struct CachedModel {
    model: Arc<Model>,
    lru: Mutex<Lru>,
}

impl CachedModel {
    /// An empty cache of at most `max_bytes` in front of `model`, for one tenant.
    pub fn new(model: Arc<Model>, max_bytes: u64) -> Self {
        Self { model, lru: Mutex::new(Lru::new(max_bytes)) }
    }

    /// The model the cache stands in front of.
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The LRU is consistent after every call; a panic elsewhere cannot leave it half-updated.
        self.lru.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`Model::infer_for`], with repeats answered from the cache: only the misses go to the
    /// model (a sequence repeated within the call, once), and what it computes is kept. Queue
    /// and compute times and the stats are those of the misses. Hits and misses are counted
    /// once the call succeeds.
    pub async fn infer(
        &self,
        tenant: &str,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Result<Inference, ModelError> {
        let version = self.model.cache_version();
        let stats = &self.model.shared.metrics.cache;
        let mut outputs: Vec<Option<Output>> = {
            let mut lru = self.lru();
            sequences.iter().map(|ids| lru.get(&version, ids, stats)).collect()
        };
        // Each distinct missing sequence, and where its output goes.
        let mut missing: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, ids) in sequences.iter().enumerate().filter(|(i, _)| outputs[*i].is_none()) {
            missing.entry(ids.as_slice()).or_default().push(i);
        }
        let missing: Vec<(&[u32], Vec<usize>)> = missing.into_iter().collect();
        let mut inference = if missing.is_empty() {
            Inference::nothing_computed()
        } else {
            self.model.infer_for(tenant, missing.iter().map(|(ids, _)| ids.to_vec()).collect(), deadline).await?
        };
        let misses = missing.iter().map(|(_, at)| at.len()).sum::<usize>();
        stats.misses.increment(misses as u64);
        stats.hits.increment((sequences.len() - misses) as u64);
        {
            let mut lru = self.lru();
            for ((ids, at), output) in missing.iter().zip(std::mem::take(&mut inference.outputs)) {
                for &i in at {
                    outputs[i] = Some(output.clone());
                }
                lru.put(&version, ids.to_vec(), output, stats);
            }
        }
        inference.outputs = outputs.into_iter().map(|o| o.expect("every sequence was a hit or computed")).collect();
        Ok(inference)
    }
}

impl Drop for CachedModel {
    /// The model may outlive its tenants' caches: take this one's entries off its gauges.
    fn drop(&mut self) {
        let lru = self.lru();
        let stats = &self.model.shared.metrics.cache;
        stats.entries.decrement(lru.len() as f64);
        stats.bytes.decrement(lru.bytes() as f64);
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use proptest::prelude::*;

    use super::*;

    /// Runs `test` with the cache metrics of a model of its own, recorded where `test` can read
    /// them back (a recorder for this thread alone).
    fn with_metrics(test: impl FnOnce(&CacheMetrics, &dyn Fn(&str) -> f64)) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // A snapshot drains what it reads (counters and gauges go back to 0): keep the totals.
        let totals = std::cell::RefCell::new(std::collections::HashMap::<String, f64>::new());
        let value = |name: &str| {
            let mut totals = totals.borrow_mut();
            for (key, _, _, value) in snapshotter.snapshot().into_vec() {
                let drained = match value {
                    DebugValue::Counter(n) => n as f64,
                    DebugValue::Gauge(x) => x.into_inner(),
                    DebugValue::Histogram(_) => 0.0,
                };
                *totals.entry(key.key().name().to_owned()).or_default() += drained;
            }
            totals.get(name).copied().unwrap_or_default()
        };
        metrics::with_local_recorder(&recorder, || test(&CacheMetrics::new("m"), &value));
    }

    fn output(values: &[f32]) -> Output {
        Output { data: values.to_vec(), shape: vec![values.len()] }
    }

    #[test]
    fn a_hit_returns_the_stored_bits() {
        let stats = &CacheMetrics::new("m");
        let mut lru = Lru::new(1 << 20);
        // Values whose bits matter: a NaN payload, a negative zero, a subnormal.
        let stored = output(&[f32::from_bits(0x7fc0_1234), -0.0, f32::from_bits(1), 0.1]);
        assert_eq!(lru.get("v1", &[1, 2, 3], stats), None);
        lru.put("v1", vec![1, 2, 3], stored.clone(), stats);
        let hit = lru.get("v1", &[1, 2, 3], stats).unwrap();
        let bits = |o: &Output| o.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&hit), bits(&stored));
        assert_eq!(hit.shape, stored.shape);
    }

    #[test]
    fn a_new_model_version_misses_and_clears_the_old_entries() {
        with_metrics(|stats, value| {
            let mut lru = Lru::new(1 << 20);
            lru.put("minilm-aaaa/cpu-float32", vec![7, 8], output(&[1.0, 2.0]), stats);
            assert!(value(batchbox_metrics::names::CACHE_ENTRIES) == 1.0);
            assert!(lru.get("minilm-bbbb/cpu-float32", &[7, 8], stats).is_none());
            assert!(lru.is_empty() && lru.bytes() == 0);
            let held = (value(batchbox_metrics::names::CACHE_ENTRIES), value(batchbox_metrics::names::CACHE_BYTES));
            assert_eq!(held, (0.0, 0.0));
            // And back: the first version's entry is gone for good.
            assert!(lru.get("minilm-aaaa/cpu-float32", &[7, 8], stats).is_none());
        });
    }

    #[test]
    fn least_recently_used_entries_go_first() {
        with_metrics(|stats, value| {
            let one = Lru::cost(&[0], &output(&[0.0; 4]));
            let mut lru = Lru::new(3 * one);
            for id in 0..3 {
                lru.put("v", vec![id], output(&[id as f32; 4]), stats);
            }
            assert!(lru.get("v", &[0], stats).is_some(), "0 is now the most recently used");
            lru.put("v", vec![3], output(&[3.0; 4]), stats);
            assert!(lru.get("v", &[1], stats).is_none(), "1 was the least recently used");
            for id in [0, 2, 3] {
                assert!(lru.get("v", &[id], stats).is_some(), "{id} is kept");
            }
            assert_eq!(value(batchbox_metrics::names::CACHE_EVICTIONS), 1.0);
        });
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept() {
        let stats = &CacheMetrics::new("m");
        let mut lru = Lru::new(256);
        lru.put("v", vec![1], output(&[0.5; 100]), stats);
        assert!(lru.is_empty() && lru.bytes() == 0);
    }

    proptest! {
        /// Whatever is put, in any order and with repeats: the bytes held never pass the
        /// budget, they equal the sum of the entries' costs, and the model's cache gauges agree.
        #[test]
        fn bytes_never_pass_max_bytes(
            max_bytes in 200u64..4_000,
            puts in proptest::collection::vec((proptest::collection::vec(0u32..6, 1..4), 1usize..40), 1..80),
        ) {
            let mut checked = Ok(());
            with_metrics(|stats, value| {
                checked = (|| {
                    let mut lru = Lru::new(max_bytes);
                    for (ids, width) in puts {
                        lru.put("v", ids, output(&vec![1.0; width]), stats);
                        prop_assert!(lru.bytes() <= max_bytes);
                        let sum: u64 = lru.entries.iter().map(|(ids, o)| Lru::cost(ids, o)).sum();
                        prop_assert_eq!(sum, lru.bytes());
                        prop_assert_eq!(value(batchbox_metrics::names::CACHE_BYTES), lru.bytes() as f64);
                        prop_assert_eq!(value(batchbox_metrics::names::CACHE_ENTRIES), lru.len() as f64);
                    }
                    Ok(())
                })();
            });
            checked?;
        }
    }
}
