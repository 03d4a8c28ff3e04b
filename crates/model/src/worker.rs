//! The model thread, and the [`Queue`] it shares with callers under one mutex.
//!
//! Callers submit their sequences to the queue (refused at once when it is full) and wait on a
//! oneshot. When the backend wants batches prepared ahead (CUDA) a preparing thread takes the
//! next batch from the queue and pads it (pinned) while the model thread runs the current one;
//! otherwise the model thread takes each batch when it is free. Each pass's results go back to
//! the queue, which answers each caller as soon as all of its sequences are done and tells the
//! scheduler the pass's shape and time, from which it sizes later batches (`api.max_batch_ms`).
//! A forward pass that runs out of memory is split in halves and retried, down to single
//! sequences; a sequence that fails alone fails only its own request.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use batchbox_batcher::scheduler::Row;

use crate::cache::CacheStats;
use crate::queue::{Pass, Queue, Step, Taken};
use crate::{Backend, ModelError, Output, Pad};

/// What callers and the model thread share.
pub(super) struct Shared {
    pub queue: Mutex<Queue>,
    pub wakeup: Condvar,
    pub counters: Counters,
}

/// What the model has done since it started, in one place (for `/v1/models` and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Forward passes run; a batch split after running out of memory counts once.
    pub batches: AtomicU64,
    /// Sequences sent through a forward pass, failed ones included.
    pub sequences: AtomicU64,
    /// Tokens of those sequences themselves, without padding.
    pub real_tokens: AtomicU64,
    /// Tokens computed, padding included: each batch's rows × its longest row.
    pub padded_tokens: AtomicU64,
    /// Calls refused because the queue was full.
    pub rejected: AtomicU64,
    /// Calls dropped from the queue at their deadline.
    pub expired: AtomicU64,
    /// Calls whose caller went away before they were computed.
    pub abandoned: AtomicU64,
    /// Sequences whose forward pass failed even alone.
    pub failed_sequences: AtomicU64,
    /// Batches that ran out of memory and were split in halves.
    pub oom_splits: AtomicU64,
    /// The tenants' response caches in front of this model, together.
    pub cache: CacheStats,
}

impl Counters {
    /// Adds `n` to one of these counters; relaxed, as they are statistics, not synchronisation.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half-updated in a way that matters
        // more than stopping would: keep serving.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A batch taken from the scheduler, with its inputs ready for the model.
struct Prepared<Batch> {
    id: u64,
    rows: Vec<Row>,
    inputs: Vec<Vec<u32>>,
    padded: Batch,
}

/// The batch type of backend `B`.
type BatchOf<B> = <<B as Backend>::Padder as Pad>::Batch;

/// The model thread's loop: until every `Model` handle is gone.
///
/// When the backend wants batches prepared ahead ([`Backend::prepare_ahead`]: CUDA, where a pass
/// takes milliseconds and pinned copies are worth overlapping) a second thread chooses and pads
/// the next batch while the current one runs. Otherwise each batch is chosen only when the model
/// is free, so a request that arrives mid-pass waits for that pass alone.
pub(super) fn serve<B: Backend>(mut backend: B, shared: Arc<Shared>) {
    let (padder, prepare_ahead) = (backend.padder(), backend.prepare_ahead());
    let prepare = move |Taken { id, rows, inputs }: Taken| {
        let padded = padder.pad(&inputs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        Prepared { id, rows, inputs, padded }
    };
    // A rendezvous channel: the preparer holds at most one batch, handed over when the model is free.
    let (ready, prepared) = std::sync::mpsc::sync_channel::<Prepared<BatchOf<B>>>(0);
    let preparer = prepare_ahead.then(|| {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("model-prepare".into())
            .spawn(move || {
                while let Some(batch) = next_batch(&shared) {
                    if ready.send(prepare(batch)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the batch-preparing thread")
    });
    let batches: Box<dyn Iterator<Item = Prepared<BatchOf<B>>>> = if prepare_ahead {
        Box::new(prepared.into_iter())
    } else {
        Box::new(std::iter::from_fn(|| next_batch(&shared).map(prepare)))
    };
    for Prepared { id: batch_id, rows, inputs, padded } in batches {
        let started = Instant::now();
        let splits_before = shared.counters.oom_splits.load(Ordering::Relaxed);
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let results = run_split(&mut backend, padder, &refs, Some(&padded), &shared.counters);
        let elapsed = started.elapsed();
        let padded_len = refs.iter().map(|row| row.len()).max().unwrap_or(0);
        // Only a pass that ran whole says what a pass of its shape costs: one split after running
        // out of memory was several passes, and a failed one may have stopped early.
        let whole =
            shared.counters.oom_splits.load(Ordering::Relaxed) == splits_before && results.iter().all(Result::is_ok);

        let counters = &shared.counters;
        Counters::add(&counters.batches, 1);
        Counters::add(&counters.sequences, rows.len());
        Counters::add(&counters.real_tokens, rows.iter().map(|r| r.len).sum());
        Counters::add(&counters.padded_tokens, rows.len() * padded_len);
        let pass = Pass { id: batch_id, rows: &rows, started, elapsed, padded_len, whole };
        let failed = shared.lock().finish(&pass, results);
        Counters::add(&counters.failed_sequences, failed);
    }
    if let Some(preparer) = preparer {
        let _ = preparer.join();
    }
    // The module goes before this thread lets go of `shared`, so a handle that sees `shared` gone
    // knows the module was freed (`Model`'s `Drop` relies on the thread ending after this).
    drop(backend);
    drop(shared);
}

/// Waits for the next batch and copies its rows out; `None` once the model is dropped.
fn next_batch(shared: &Shared) -> Option<Taken> {
    let mut queue = shared.lock();
    loop {
        if queue.is_stopped() {
            return None;
        }
        let now = Instant::now();
        let (abandoned, expired) = queue.sweep(now);
        Counters::add(&shared.counters.abandoned, abandoned);
        Counters::add(&shared.counters.expired, expired);
        match queue.next(now) {
            Step::Run(taken) => return Some(taken),
            Step::WaitUntil(at) => {
                queue = shared
                    .wakeup
                    .wait_timeout(queue, at.saturating_duration_since(now))
                    .map(|(q, _)| q)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            Step::Idle => queue = shared.wakeup.wait(queue).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// Runs rows in one pass (`padded`, if they were prepared already); if that runs out of memory,
/// runs each half on its own, down to single rows. Every row gets its own result. A panic inside
/// the backend fails these rows only.
fn run_split<B: Backend>(
    backend: &mut B,
    padder: B::Padder,
    rows: &[&[u32]],
    padded: Option<&BatchOf<B>>,
    counters: &Counters,
) -> Vec<Result<Output, ModelError>> {
    let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| match padded {
        Some(batch) => backend.forward(batch),
        None => backend.forward(&padder.pad(rows)),
    }))
    .unwrap_or_else(|panic| Err(ModelError::Panicked(panic_message(panic))));
    match attempt {
        Ok(outputs) => outputs.into_iter().map(Ok).collect(),
        Err(e) if e.is_out_of_memory() && rows.len() > 1 => {
            tracing::warn!(rows = rows.len(), "out of memory: splitting the batch");
            Counters::add(&counters.oom_splits, 1);
            let (left, right) = rows.split_at(rows.len() / 2);
            let mut results = run_split(backend, padder, left, None, counters);
            results.extend(run_split(backend, padder, right, None, counters));
            results
        }
        // Every row gets the same failure; an out-of-memory keeps its own message (re-wrapping
        // its display text would repeat the variant's prefix).
        Err(ModelError::OutOfMemory(message)) => {
            rows.iter().map(|_| Err(ModelError::OutOfMemory(message.clone()))).collect()
        }
        Err(e) => {
            let message = e.to_string();
            rows.iter().map(|_| Err(ModelError::Forward(message.clone()))).collect()
        }
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tests::Rows;

    /// Fault injection through the backend interface: out of memory above `max_rows` rows, and
    /// a failure of its own for any row starting with `poison`.
    struct Faulty {
        max_rows: usize,
        poison: u32,
        calls: Vec<usize>,
    }

    impl Backend for Faulty {
        type Padder = Rows;
        fn padder(&self) -> Rows {
            Rows
        }
        fn forward(&mut self, batch: &Vec<Vec<u32>>) -> Result<Vec<Output>, ModelError> {
            self.calls.push(batch.len());
            if batch.len() > self.max_rows {
                return Err(ModelError::OutOfMemory("CUDA out of memory (injected)".into()));
            }
            if batch.iter().any(|row| row[0] == self.poison) {
                return Err(ModelError::OutOfMemory("out of memory even alone (injected)".into()));
            }
            Ok(batch.iter().map(|row| Output { data: vec![row[0] as f32], shape: vec![1] }).collect())
        }
    }

    fn padder() -> Rows {
        Rows
    }

    #[test]
    fn out_of_memory_splits_until_every_row_has_its_result() {
        let rows: Vec<Vec<u32>> = (0..13).map(|i| vec![i, 1, 2]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut backend = Faulty { max_rows: 3, poison: 999, calls: Vec::new() };
        let counters = Counters::default();
        let results = run_split(&mut backend, padder(), &refs, None, &counters);
        assert!(counters.oom_splits.load(Ordering::Relaxed) >= 3, "13 rows down to 3 or fewer");
        let got: Vec<f32> = results.into_iter().map(|r| r.unwrap().data[0]).collect();
        assert_eq!(got, (0..13).map(|i| i as f32).collect::<Vec<_>>(), "in input order");
        assert!(backend.calls.iter().skip(1).all(|&n| n < 13));
    }

    #[test]
    fn a_row_that_fails_alone_fails_only_itself() {
        let rows: Vec<Vec<u32>> = (0..8).map(|i| vec![i]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut backend = Faulty { max_rows: 8, poison: 5, calls: Vec::new() };
        let results = run_split(&mut backend, padder(), &refs, None, &Counters::default());
        for (i, result) in results.iter().enumerate() {
            match (i, result) {
                (5, Err(ModelError::OutOfMemory(m))) => assert_eq!(m, "out of memory even alone (injected)"),
                (5, other) => panic!("row 5 must fail: {other:?}"),
                (_, Ok(output)) => assert_eq!(output.data, vec![i as f32]),
                (_, Err(e)) => panic!("row {i} failed: {e}"),
            }
        }
    }

    #[test]
    fn a_panicking_executor_fails_the_rows_not_the_thread() {
        struct Panics;
        impl Backend for Panics {
            type Padder = Rows;
            fn padder(&self) -> Rows {
                Rows
            }
            fn forward(&mut self, _: &Vec<Vec<u32>>) -> Result<Vec<Output>, ModelError> {
                panic!("boom")
            }
        }
        let results = run_split(&mut Panics, padder(), &[&[1u32][..], &[2][..]], None, &Counters::default());
        assert!(results.iter().all(|r| matches!(r, Err(ModelError::Forward(m)) if m.contains("boom"))));
    }
}
