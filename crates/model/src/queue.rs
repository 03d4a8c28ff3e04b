//! The queue in front of the model: the one owner of the scheduler and of the calls waiting for,
//! or in, a forward pass. Callers submit to it ([`Model::infer_for`](crate::Model::infer_for));
//! the model thread takes batches from it and hands each pass's results back to it, which
//! answers every call as soon as all of its sequences are done. It lives under one mutex (see
//! `worker.rs`), so each method is one consistent step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use batchbox_batcher::scheduler::{Next, Rejected, RequestId, Row, Scheduler, SharesTooLarge};
use tokio::sync::oneshot;

use crate::{Inference, ModelError, Output, RunStats};

/// Where a call's answer goes.
pub(crate) type Reply = oneshot::Receiver<Result<Inference, ModelError>>;

/// One caller's request while it is in the queue or being computed.
struct Job {
    sequences: Vec<Vec<u32>>,
    outputs: Vec<Option<Output>>,
    enqueued: Instant,
    first_batch: Option<Instant>,
    computed: Duration,
    batch_ids: Vec<u64>,
    stats: RunStats,
    reply: oneshot::Sender<Result<Inference, ModelError>>,
    /// The caller's trace span (its `infer`), which the passes that compute it are traced under.
    span: tracing::Span,
}

/// A batch taken for the model: its number, its rows, and their token ids (copied, so the pass
/// runs without the lock), with the trace spans of the calls it serves, in row order.
pub(crate) struct Taken {
    pub id: u64,
    pub rows: Vec<Row>,
    pub inputs: Vec<Vec<u32>>,
    pub callers: Vec<tracing::Span>,
}

/// What the model thread should do next.
pub(crate) enum Step {
    /// Run this batch.
    Run(Taken),
    /// Nothing is due before then (a batch that is not full waits for more work).
    WaitUntil(Instant),
    /// Nothing is queued.
    Idle,
}

/// One forward pass as it ran, for [`Queue::finish`].
pub(crate) struct Pass<'a> {
    pub id: u64,
    pub rows: &'a [Row],
    pub started: Instant,
    pub elapsed: Duration,
    pub padded_len: usize,
    /// The pass ran whole (no out-of-memory split, no failure): only then does its time say
    /// what a pass of its shape costs.
    pub whole: bool,
}

/// The scheduler and the jobs it schedules.
pub(crate) struct Queue {
    scheduler: Scheduler,
    jobs: HashMap<RequestId, Job>,
    next_request: RequestId,
    next_batch: u64,
    stopped: bool,
}

impl Queue {
    pub fn new(scheduler: Scheduler) -> Self {
        Self { scheduler, jobs: HashMap::new(), next_request: 1, next_batch: 1, stopped: false }
    }

    /// Queues a call's sequences for `tenant` (valid ones: see `validate` in lib.rs), or refuses
    /// them at once when the scheduler has no room. A call with no sequences is answered here.
    pub fn submit(
        &mut self,
        tenant: &str,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Reply, Rejected> {
        let (reply, answer) = oneshot::channel();
        if sequences.is_empty() {
            let _ = reply.send(Ok(Inference::nothing_computed()));
            return Ok(answer);
        }
        let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let id = self.next_request;
        self.next_request += 1;
        self.scheduler.submit(id, tenant, &lengths, deadline, now)?;
        let job = Job {
            outputs: vec![None; sequences.len()],
            stats: RunStats { real_tokens: lengths.iter().sum(), ..RunStats::default() },
            sequences,
            enqueued: now,
            first_batch: None,
            computed: Duration::ZERO,
            batch_ids: Vec::new(),
            reply,
            span: tracing::Span::current(),
        };
        self.jobs.insert(id, job);
        Ok(answer)
    }

    /// Sequences and tokens waiting right now.
    pub fn depth(&self) -> (usize, usize) {
        (self.scheduler.queued_sequences(), self.scheduler.queued_tokens())
    }

    /// The tenants' shares from now on (see `Scheduler::set_shares`).
    pub fn set_shares(&mut self, shares: &[(String, usize)]) -> Result<(), SharesTooLarge> {
        self.scheduler.set_shares(shares)
    }

    /// No more batches: the model is being dropped.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether [`Queue::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Drops the calls whose callers went away (client disconnected, plugin stopped), and
    /// answers `TimedOut` to those still waiting at their deadline: (abandoned, expired).
    pub fn sweep(&mut self, now: Instant) -> (usize, usize) {
        let gone: Vec<RequestId> = self.jobs.iter().filter(|(_, j)| j.reply.is_closed()).map(|(&id, _)| id).collect();
        for id in &gone {
            self.scheduler.cancel(*id);
            self.jobs.remove(id);
        }
        let expired = self.scheduler.expire(now);
        for id in &expired {
            if let Some(job) = self.jobs.remove(id) {
                let _ = job.reply.send(Err(ModelError::TimedOut(now - job.enqueued)));
            }
        }
        (gone.len(), expired.len())
    }

    /// The next batch, if one is due.
    pub fn next(&mut self, now: Instant) -> Step {
        match self.scheduler.next(now) {
            Next::Run(batch) => {
                let id = self.next_batch;
                self.next_batch += 1;
                let inputs = batch.rows.iter().map(|r| self.jobs[&r.request].sequences[r.index].clone()).collect();
                // Each call once, in the order of its first row (a call's rows need not be adjacent).
                let mut requests: Vec<RequestId> = Vec::new();
                for row in &batch.rows {
                    if !requests.contains(&row.request) {
                        requests.push(row.request);
                    }
                }
                let callers = requests.iter().map(|r| self.jobs[r].span.clone()).collect();
                Step::Run(Taken { id, rows: batch.rows, inputs, callers })
            }
            Next::WaitUntil(at) => Step::WaitUntil(at),
            Next::Idle => Step::Idle,
        }
    }

    /// Takes a pass's results (one per row): tells the scheduler the pass's time, fails the
    /// calls with a failed row, and answers each call whose rows are now all done. Returns how
    /// many rows failed.
    pub fn finish(&mut self, pass: &Pass, results: Vec<Result<Output, ModelError>>) -> usize {
        let rows = pass.rows;
        if pass.whole {
            let predicted_ms = self.scheduler.predict(rows.len(), pass.padded_len).map(|p| p.as_secs_f64() * 1e3);
            let elapsed_ms = pass.elapsed.as_secs_f64() * 1e3;
            tracing::debug!(rows = rows.len(), pass.padded_len, elapsed_ms, ?predicted_ms, "forward pass");
            self.scheduler.observe(rows.len(), pass.padded_len, pass.elapsed);
        }
        let mut failed: Vec<(RequestId, ModelError)> = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            let Some(job) = self.jobs.get_mut(&row.request) else { continue }; // cancelled meanwhile
            if job.batch_ids.last() != Some(&pass.id) {
                job.batch_ids.push(pass.id);
                job.computed += pass.elapsed;
                job.stats.forward_passes += 1;
            }
            job.first_batch.get_or_insert(pass.started);
            job.stats.padded_tokens += pass.padded_len;
            match result {
                Ok(output) => job.outputs[row.index] = Some(output),
                Err(e) => failed.push((row.request, e)),
            }
        }
        let failures = failed.len();
        for (request, error) in failed {
            self.scheduler.cancel(request);
            if let Some(job) = self.jobs.remove(&request) {
                let _ = job.reply.send(Err(error));
            }
        }
        for request in self.scheduler.complete(rows) {
            if let Some(job) = self.jobs.remove(&request) {
                answer(job);
            }
        }
        failures
    }
}

fn answer(job: Job) {
    let outputs = job.outputs.into_iter().map(|o| o.expect("a complete request has every output")).collect();
    let queued = job.first_batch.map_or(Duration::ZERO, |t| t.saturating_duration_since(job.enqueued));
    let inference = Inference { outputs, queued, computed: job.computed, batch_ids: job.batch_ids, stats: job.stats };
    let _ = job.reply.send(Ok(inference));
}

#[cfg(test)]
mod tests {
    use batchbox_batcher::scheduler::SchedulerConfig;
    use batchbox_batcher::{BatchLimits, ChunkOrder};

    use super::*;

    fn queue(max_sequences: usize) -> Queue {
        let config = SchedulerConfig {
            limits: BatchLimits {
                max_sequences: max_sequences.try_into().unwrap(),
                max_tokens: 1024.try_into().unwrap(),
            },
            max_queue_delay: Duration::ZERO,
            max_queued_tokens: 1024,
            max_pass_over: 8,
            usage_half_life: Duration::from_secs(2),
            max_batch_time: None,
            order: ChunkOrder::LengthSorted,
        };
        Queue::new(Scheduler::with_shares(config, &[]).unwrap())
    }

    /// Runs every due batch as a model would: each row's output is its first token id, and a row
    /// starting with `poison` fails.
    fn run_all(queue: &mut Queue, poison: u32) -> usize {
        let mut passes = 0;
        while let Step::Run(Taken { id, rows, inputs, .. }) = queue.next(Instant::now()) {
            let results = inputs
                .iter()
                .map(|ids| match ids[0] {
                    id if id == poison => Err(ModelError::Forward("poisoned".into())),
                    id => Ok(Output { data: vec![id as f32], shape: vec![1] }),
                })
                .collect();
            let pass =
                Pass { id, rows: &rows, started: Instant::now(), elapsed: Duration::ZERO, padded_len: 2, whole: true };
            queue.finish(&pass, results);
            passes += 1;
        }
        passes
    }

    #[test]
    fn each_call_gets_its_own_outputs_in_order_across_passes_and_a_failed_row_fails_only_its_call() {
        let mut queue = queue(2);
        let now = Instant::now();
        let mut first = queue.submit("a", vec![vec![1, 9], vec![2], vec![3, 9, 9]], None, now).unwrap();
        let mut second = queue.submit("b", vec![vec![7], vec![4]], None, now).unwrap();
        let mut third = queue.submit("a", vec![vec![5]], None, now).unwrap();
        // Six rows, at most two per pass: three passes or more, rows of different calls mixed.
        assert!(run_all(&mut queue, 7) >= 3);
        let outputs = |reply: &mut Reply| -> Vec<f32> {
            reply.try_recv().unwrap().unwrap().outputs.iter().map(|o| o.data[0]).collect()
        };
        assert_eq!(outputs(&mut first), vec![1.0, 2.0, 3.0]);
        assert!(matches!(second.try_recv().unwrap(), Err(ModelError::Forward(m)) if m == "poisoned"));
        assert_eq!(outputs(&mut third), vec![5.0]);
        assert_eq!(queue.depth(), (0, 0), "nothing left behind");
    }

    #[test]
    fn a_caller_that_went_away_loses_its_place_and_an_empty_call_is_answered_at_once() {
        let mut queue = queue(8);
        let now = Instant::now();
        drop(queue.submit("a", vec![vec![1], vec![2]], None, now).unwrap());
        let mut empty = queue.submit("a", Vec::new(), None, now).unwrap();
        assert!(empty.try_recv().unwrap().unwrap().outputs.is_empty());
        assert_eq!(queue.sweep(now), (1, 0));
        assert_eq!(run_all(&mut queue, u32::MAX), 0, "no pass for a call nobody waits for");
    }
}
