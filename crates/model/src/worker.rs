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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use batchbox_batcher::scheduler::Row;

use crate::metrics::ModelMetrics;
use crate::queue::{Pass, Queue, Step, Taken};
use crate::{Backend, ModelError, Output, Pad};

/// What callers and the model thread share.
pub(super) struct Shared {
    pub queue: Mutex<Queue>,
    pub wakeup: Condvar,
    pub metrics: ModelMetrics,
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
    callers: Vec<tracing::Span>,
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
    let prepare = move |Taken { id, rows, inputs, callers }: Taken| {
        let padded = padder.pad(&inputs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        Prepared { id, rows, inputs, padded, callers }
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
    for Prepared { id: batch_id, rows, inputs, padded, callers } in batches {
        let started = Instant::now();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let padded_len = refs.iter().map(|row| row.len()).max().unwrap_or(0);
        let mut splits = 0;
        let results = pass_span(batch_id, rows.len(), padded_len, &callers)
            .in_scope(|| run_split(&mut backend, padder, &refs, Some(&padded), &mut splits));
        let elapsed = started.elapsed();
        // Only a pass that ran whole says what a pass of its shape costs: one split after running
        // out of memory was several passes, and a failed one may have stopped early.
        let whole = splits == 0 && results.iter().all(Result::is_ok);

        let metrics = &shared.metrics;
        metrics.batches.increment(1);
        metrics.sequences.increment(rows.len() as u64);
        metrics.real_tokens.increment(rows.iter().map(|r| r.len as u64).sum());
        metrics.padded_tokens.increment((rows.len() * padded_len) as u64);
        metrics.batch_rows.record(rows.len() as f64);
        metrics.pass_seconds.record(elapsed.as_secs_f64());
        metrics.oom_splits.increment(splits);
        let pass = Pass { id: batch_id, rows: &rows, started, elapsed, padded_len, whole };
        let failed = shared.lock().finish(&pass, results);
        metrics.failed_sequences.increment(failed as u64);
    }
    if let Some(preparer) = preparer {
        let _ = preparer.join();
    }
    // The module goes before this thread lets go of `shared`, so a handle that sees `shared` gone
    // knows the module was freed (`Model`'s `Drop` relies on the thread ending after this).
    drop(backend);
    drop(shared);
}

/// A pass's trace span (`batch`): a child of the first call it serves (that request's `infer`),
/// and linked to the others', so each request's trace shows the passes it waited for.
fn pass_span(id: u64, rows: usize, padded_len: usize, callers: &[tracing::Span]) -> tracing::Span {
    let span = tracing::debug_span!(parent: callers.first().and_then(tracing::Span::id), "batch", batch_id = id, rows, padded_len);
    for caller in callers.iter().skip(1) {
        span.follows_from(caller);
    }
    span
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
        shared.metrics.abandoned.increment(abandoned as u64);
        shared.metrics.expired.increment(expired as u64);
        let step = queue.next(now);
        shared.metrics.queue_depth(queue.depth());
        match step {
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
/// runs each half on its own, down to single rows, counting each split in `splits`. Every row
/// gets its own result. A panic inside the backend fails these rows only.
fn run_split<B: Backend>(
    backend: &mut B,
    padder: B::Padder,
    rows: &[&[u32]],
    padded: Option<&BatchOf<B>>,
    splits: &mut u64,
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
            *splits += 1;
            let (left, right) = rows.split_at(rows.len() / 2);
            let mut results = run_split(backend, padder, left, None, splits);
            results.extend(run_split(backend, padder, right, None, splits));
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
        let mut splits = 0;
        let results = run_split(&mut backend, padder(), &refs, None, &mut splits);
        assert!(splits >= 3, "13 rows down to 3 or fewer");
        let got: Vec<f32> = results.into_iter().map(|r| r.unwrap().data[0]).collect();
        assert_eq!(got, (0..13).map(|i| i as f32).collect::<Vec<_>>(), "in input order");
        assert!(backend.calls.iter().skip(1).all(|&n| n < 13));
    }

    #[test]
    fn a_row_that_fails_alone_fails_only_itself() {
        let rows: Vec<Vec<u32>> = (0..8).map(|i| vec![i]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut backend = Faulty { max_rows: 8, poison: 5, calls: Vec::new() };
        let results = run_split(&mut backend, padder(), &refs, None, &mut 0);
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
        let results = run_split(&mut Panics, padder(), &[&[1u32][..], &[2][..]], None, &mut 0);
        assert!(results.iter().all(|r| matches!(r, Err(ModelError::Forward(m)) if m.contains("boom"))));
    }
}
