//! The cross-request scheduler: every in-flight `infer` call's sequences wait here, and each
//! forward pass is chosen from all of them.
//!
//! - **Length grouping.** A batch is built around an anchor sequence, which sets its padded
//!   length; the rest of the batch is the waiting sequences closest to it in length (never longer),
//!   so padding stays small whatever order requests arrived in. How many it takes comes from the
//!   [`CostModel`]: the first pass of the split of what waits (in the order a batch takes it)
//!   into passes whose predicted total time is least. Where a pass costs little beyond its
//!   tokens (a CPU), short sequences are left for a pass of their own rather than padded to a
//!   long anchor; where every pass has a large fixed cost (a GPU), passes stay full.
//! - **Fairness.** Callers are grouped by tenant, and each tenant's recent use of the model is
//!   kept as padded tokens with exponential decay (half-life `usage_half_life`). Each batch is
//!   filled tenant by tenant, least recent use first (then least waiting work): a light tenant's
//!   request goes ahead of a tenant flooding the queue, and tenants that both flood converge to
//!   equal shares, as serving one raises its use above the other's.
//! - **No starvation.** A sequence passed over `max_pass_over` times goes first in its tenant.
//! - **Bounded pass time.** A forward pass cannot be pre-empted, so a request that arrives while
//!   one runs waits for all of it. With `max_batch_time` set, a batch is shrunk (fewer rows, never
//!   a split sequence) until its predicted time is within the target; the prediction comes from
//!   a [`CostModel`] fitted to the passes the executor measured and reported with
//!   [`Scheduler::observe`]. One sequence always runs, even if predicted over the target, and
//!   where a pass's fixed cost seems to take more than half the target the rows still get half of
//!   it ([`CostModel::rows_within`]). The seed's `InputOrder` batching ignores the target.
//! - **Backpressure.** At most `max_queued_tokens` tokens wait; past that, a submission is refused
//!   at once. Requests past their deadline, or cancelled, leave the queue before they are computed.
//! - **A share of the queue per tenant.** A tenant may be given a share of `max_queued_tokens`
//!   ([`Scheduler::with_shares`]; the shares add up to at most the limit). Every tenant's unused
//!   share stays reserved for it: a submission is refused if it would leave less room than the
//!   other tenants' unused shares. So a tenant within its share is never refused, whatever the
//!   others queue, and a tenant past its share is refused alone (it may use only room no share
//!   reserves). When nothing waits and no other tenant's share reserves room (no shares, or a
//!   model's only tenant), any request is taken, so one larger than the limit still runs (alone).
//!
//! Pure: time comes in as arguments, so tests drive it step by step.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use super::cost::CostModel;
use super::{BatchLimits, ChunkOrder, plan_chunks};

/// Names one submitted request; the caller picks it, unique among the requests still queued or running.
pub type RequestId = u64;

/// The scheduler's limits and policy, fixed for its lifetime; the model crate builds it from the
/// config's `api` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Rows and padded tokens one batch may hold.
    pub limits: BatchLimits,
    /// How long a batch that is not full may wait for more work; zero never waits.
    pub max_queue_delay: Duration,
    /// Tokens that may wait at once; a submission that would pass it is refused.
    pub max_queued_tokens: usize,
    /// After being passed over this many times, a sequence goes first in its tenant.
    pub max_pass_over: u32,
    /// How fast a tenant's past use of the model is forgotten: halved every this long.
    pub usage_half_life: Duration,
    /// A target for one forward pass: batches predicted to take longer are shrunk. `None`: no
    /// target, only `limits`.
    pub max_batch_time: Option<Duration>,
    /// `InputOrder` is the seed's batching (first come, first in a batch), kept as a
    /// benchmark baseline: no length grouping and no fairness.
    pub order: ChunkOrder,
}

/// Why the scheduler refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The whole queue is full; retrying later can help.
    Overloaded {
        /// Tokens waiting in the whole queue.
        queued: usize,
        /// Tokens the request would add (a sequence counts at least 1).
        requested: usize,
        /// `max_queued_tokens`, the queue's size in tokens.
        limit: usize,
    },
    /// The tenant's own share of the queue is full; retrying later can help.
    OverShare {
        /// The tenant that submitted.
        tenant: String,
        /// Tokens that tenant has waiting.
        queued: usize,
        /// Tokens the request would add (a sequence counts at least 1).
        requested: usize,
        /// The tenant's share of the queue, in tokens.
        share: usize,
    },
    /// Refused for good: even with the queue empty, the other tenants' shares leave less room
    /// than the request needs. Retrying cannot help; smaller requests can.
    NeverFits {
        /// The tenant that submitted.
        tenant: String,
        /// Tokens the request would add (a sequence counts at least 1).
        requested: usize,
        /// The most tokens the tenant may ever have waiting: `max_queued_tokens` less the others' shares.
        room: usize,
    },
    /// The request id is queued already (a caller's bug).
    Duplicate(RequestId),
}

// By hand rather than with thiserror: this crate depends on nothing beyond std.
impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overloaded { queued, requested, limit } => write!(
                f,
                "the model's queue is full: {queued} tokens are waiting and {requested} more would pass the limit of {limit}"
            ),
            Self::OverShare { tenant, queued, requested, share } => write!(
                f,
                "tenant {tenant}'s share of the model's queue is full: it has {queued} tokens waiting and {requested} more \
                 would pass its share of {share} (limits.max_queued_tokens)"
            ),
            Self::NeverFits { tenant, requested, room } => write!(
                f,
                "the request's {requested} tokens can never wait in the model's queue: the other tenants' shares leave \
                 tenant {tenant} at most {room} (limits.max_queued_tokens); send fewer or shorter sequences per request"
            ),
            Self::Duplicate(id) => write!(f, "request {id} is already queued"),
        }
    }
}

impl std::error::Error for Rejected {}

/// Tenants' shares of the queue that add up to more than the queue holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesTooLarge {
    /// The shares added up, in tokens.
    pub total: usize,
    /// `max_queued_tokens`, which the total may not pass.
    pub limit: usize,
}

impl fmt::Display for SharesTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the tenants' shares of the queue add up to {} tokens, more than the {} it holds",
            self.total, self.limit
        )
    }
}

impl std::error::Error for SharesTooLarge {}

/// One row of a batch: sequence `index` of request `request`, `len` tokens long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Row {
    /// The request the sequence came in.
    pub request: RequestId,
    /// The sequence's position in the `lengths` its request was submitted with.
    pub index: usize,
    /// Its length in tokens, at least 1 (an empty sequence counts as one token).
    pub len: usize,
}

/// One forward pass chosen by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Its sequences: at most `limits.max_sequences`, and within `limits.max_tokens` unless one
    /// sequence alone is longer.
    pub rows: Vec<Row>,
    /// Tokens every row is padded to: the longest row's `len`.
    pub padded_len: usize,
}

impl Batch {
    /// Tokens the pass computes, padding included: rows × `padded_len`, which is what its tenants are charged.
    pub fn padded_tokens(&self) -> usize {
        self.rows.len() * self.padded_len
    }
}

/// What the executor should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run this batch now; its rows have left the queue, and go to [`Scheduler::complete`] once computed.
    Run(Batch),
    /// Work is waiting but not enough for a full batch; ask again at this time (or on arrival).
    WaitUntil(Instant),
    /// Nothing waits; ask again when a request arrives.
    Idle,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    row: Row,
    passed_over: u32,
}

struct Request {
    tenant: usize,
    /// Sequences still in the queue.
    queued: usize,
    /// Sequences not yet completed: queued or in a running batch.
    unfinished: usize,
    enqueued: Instant,
    deadline: Option<Instant>,
}

struct Tenant {
    queue: Vec<Waiting>,
    /// Tokens of `queue`.
    queued: usize,
    /// Tokens it may have waiting whatever the others do; `None`: only what no share reserves.
    share: Option<usize>,
    /// Padded tokens computed for this tenant, decayed to `usage_at`.
    usage: f64,
    usage_at: Option<Instant>,
}

impl Tenant {
    fn usage(&self, now: Instant, half_life: Duration) -> f64 {
        let Some(at) = self.usage_at else { return 0.0 };
        self.usage * 0.5f64.powf(now.saturating_duration_since(at).as_secs_f64() / half_life.as_secs_f64().max(1e-9))
    }

    fn charge(&mut self, tokens: usize, now: Instant, half_life: Duration) {
        self.usage = self.usage(now, half_life) + tokens as f64;
        self.usage_at = Some(now);
    }

    /// Room its share still reserves in the queue.
    fn unused_share(&self) -> usize {
        self.share.map_or(0, |share| share.saturating_sub(self.queued))
    }
}

/// One model's queue: every waiting sequence, and the policy that picks each forward pass from
/// them (see the module docs).
pub struct Scheduler {
    config: SchedulerConfig,
    tenants: Vec<Tenant>,
    tenant_ids: HashMap<String, usize>,
    /// Tenants with waiting sequences, in arrival order (the last tie-breaker).
    ring: VecDeque<usize>,
    requests: HashMap<RequestId, Request>,
    queued_tokens: usize,
    cost: CostModel,
}

impl Scheduler {
    /// A scheduler with an empty queue and no shares: any tenant may use all of `max_queued_tokens`.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            tenants: Vec::new(),
            tenant_ids: HashMap::new(),
            ring: VecDeque::new(),
            requests: HashMap::new(),
            queued_tokens: 0,
            cost: CostModel::default(),
        }
    }

    /// A scheduler whose tenants each have a share of the queue, in tokens (see the module docs).
    pub fn with_shares(config: SchedulerConfig, shares: &[(String, usize)]) -> Result<Self, SharesTooLarge> {
        let mut scheduler = Self::new(config);
        scheduler.set_shares(shares)?;
        Ok(scheduler)
    }

    /// Gives each named tenant its share, and every other tenant none, keeping what waits: a
    /// config reload that adds, removes or resizes tenants. A tenant left without a share keeps
    /// its queued sequences, which run as before; only its new requests lose the reserved room.
    pub fn set_shares(&mut self, shares: &[(String, usize)]) -> Result<(), SharesTooLarge> {
        let total = shares.iter().map(|(_, share)| share).sum();
        if total > self.config.max_queued_tokens {
            return Err(SharesTooLarge { total, limit: self.config.max_queued_tokens });
        }
        self.tenants.iter_mut().for_each(|t| t.share = None);
        for (name, share) in shares {
            let t = self.tenant(name);
            self.tenants[t].share = Some(*share);
        }
        Ok(())
    }

    /// The tenant's index, added if new.
    fn tenant(&mut self, name: &str) -> usize {
        let next = self.tenants.len();
        let t = *self.tenant_ids.entry(name.to_owned()).or_insert(next);
        if t == next {
            self.tenants.push(Tenant { queue: Vec::new(), queued: 0, share: None, usage: 0.0, usage_at: None });
        }
        t
    }

    /// Learns from a forward pass the executor measured: `rows` sequences padded to `padded_len`
    /// took `elapsed`. Later batches are sized from it (see `max_batch_time`).
    pub fn observe(&mut self, rows: usize, padded_len: usize, elapsed: Duration) {
        self.cost.observe(rows, padded_len, elapsed);
    }

    /// What a pass of `rows` sequences padded to `len` tokens is predicted to take, once enough
    /// passes were measured (for the model thread's log).
    pub fn predict(&self, rows: usize, len: usize) -> Option<Duration> {
        self.cost.predict(rows, len)
    }

    /// Queues a request's sequences (their token lengths). An empty request queues nothing:
    /// the caller answers it at once.
    pub fn submit(
        &mut self,
        id: RequestId,
        tenant: &str,
        lengths: &[usize],
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), Rejected> {
        if self.requests.contains_key(&id) {
            return Err(Rejected::Duplicate(id));
        }
        if lengths.is_empty() {
            return Ok(());
        }
        let tokens: usize = lengths.iter().map(|&len| len.max(1)).sum();
        let own = self.tenant_ids.get(tenant).copied();
        let reserved_by_others: usize = self
            .tenants
            .iter()
            .enumerate()
            .filter(|&(t, _)| Some(t) != own)
            .map(|(_, other)| other.unused_share())
            .sum();
        let limit = self.config.max_queued_tokens;
        let others_shares: usize =
            self.tenants.iter().enumerate().filter(|&(t, _)| Some(t) != own).filter_map(|(_, other)| other.share).sum();
        if others_shares > 0 && tokens + others_shares > limit {
            return Err(Rejected::NeverFits {
                tenant: tenant.to_owned(),
                requested: tokens,
                room: limit - others_shares,
            });
        }
        let fits = self.queued_tokens + tokens + reserved_by_others <= limit;
        // With nothing waiting and nothing reserved, a request larger than the limit still runs (alone).
        if !(fits || self.queued_tokens == 0 && reserved_by_others == 0) {
            let (queued, share) = own.map_or((0, None), |t| (self.tenants[t].queued, self.tenants[t].share));
            return Err(match share {
                Some(share) if queued + tokens > share => {
                    Rejected::OverShare { tenant: tenant.to_owned(), queued, requested: tokens, share }
                }
                _ => Rejected::Overloaded { queued: self.queued_tokens, requested: tokens, limit },
            });
        }
        let t = self.tenant(tenant);
        let entry = &mut self.tenants[t];
        entry.queued += tokens;
        entry.queue.extend(
            lengths
                .iter()
                .enumerate()
                .map(|(index, &len)| Waiting { row: Row { request: id, index, len: len.max(1) }, passed_over: 0 }),
        );
        if !self.ring.contains(&t) {
            self.ring.push_back(t);
        }
        self.requests.insert(
            id,
            Request { tenant: t, queued: lengths.len(), unfinished: lengths.len(), enqueued: now, deadline },
        );
        self.queued_tokens += tokens;
        Ok(())
    }

    /// Drops a request: its waiting sequences leave the queue, and rows of it still running
    /// are ignored when they complete. Returns whether it was known.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let Some(request) = self.requests.remove(&id) else { return false };
        if request.queued > 0 {
            let tenant = &mut self.tenants[request.tenant];
            let removed: usize = tenant.queue.iter().filter(|w| w.row.request == id).map(|w| w.row.len).sum();
            tenant.queue.retain(|w| w.row.request != id);
            tenant.queued -= removed;
            self.queued_tokens -= removed;
            self.drop_idle_tenant(request.tenant);
        }
        true
    }

    /// Drops every request still waiting in the queue past its deadline; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<RequestId> {
        let expired: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.queued > 0 && r.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for &id in &expired {
            self.cancel(id);
        }
        expired
    }

    /// Marks rows as computed; returns the requests that are now complete.
    pub fn complete(&mut self, rows: &[Row]) -> Vec<RequestId> {
        let mut done = Vec::new();
        for row in rows {
            if let Some(request) = self.requests.get_mut(&row.request) {
                request.unfinished -= 1;
                if request.unfinished == 0 {
                    self.requests.remove(&row.request);
                    done.push(row.request);
                }
            }
        }
        done
    }

    /// Tokens waiting now (a sequence counts at least 1); rows in a running batch no longer count.
    pub fn queued_tokens(&self) -> usize {
        self.queued_tokens
    }

    /// Sequences waiting now; rows in a running batch no longer count.
    pub fn queued_sequences(&self) -> usize {
        self.tenants.iter().map(|t| t.queue.len()).sum()
    }

    /// Chooses the next batch, or says when to ask again.
    pub fn next(&mut self, now: Instant) -> Next {
        if self.ring.is_empty() {
            return Next::Idle;
        }
        let limits = self.config.limits;
        let full =
            self.queued_sequences() >= limits.max_sequences.get() || self.queued_tokens >= limits.max_tokens.get();
        let oldest = self
            .requests
            .values()
            .filter(|r| r.queued > 0)
            .map(|r| r.enqueued)
            .min()
            .expect("a tenant in the ring has work");
        let ready_at = oldest + self.config.max_queue_delay;
        if !full && now < ready_at {
            return Next::WaitUntil(ready_at);
        }
        Next::Run(match self.config.order {
            ChunkOrder::LengthSorted => self.build_batch(now),
            ChunkOrder::InputOrder => self.build_fifo_batch(now),
        })
    }

    /// The seed's way: the oldest sequences, in arrival order, as many as the limits allow.
    fn build_fifo_batch(&mut self, now: Instant) -> Batch {
        let mut waiting: Vec<(usize, Waiting)> =
            self.ring.iter().flat_map(|&t| self.tenants[t].queue.iter().map(move |w| (t, *w))).collect();
        waiting.sort_by_key(|(_, w)| (w.row.request, w.row.index));
        let lengths: Vec<usize> = waiting.iter().map(|(_, w)| w.row.len).collect();
        let first = plan_chunks(&lengths, self.config.limits, ChunkOrder::InputOrder).swap_remove(0);
        let rows: Vec<Row> = first.indices.iter().map(|&i| waiting[i].1.row).collect();
        for row in &rows {
            let tenant = self.requests[&row.request].tenant;
            self.tenants[tenant].queue.retain(|w| w.row != *row);
        }
        self.finish_batch(rows, first.padded_len, now)
    }

    fn build_batch(&mut self, now: Instant) -> Batch {
        let limits = self.config.limits;
        let starving = self.config.max_pass_over;
        // Tenants in the order they are served: least recent use, then least waiting work, then
        // arrival (the sort is stable).
        let half_life = self.config.usage_half_life;
        let mut keyed: Vec<(f64, usize, usize)> = self
            .ring
            .iter()
            .map(|&t| {
                let tenant = &self.tenants[t];
                (tenant.usage(now, half_life), tenant.queued, t)
            })
            .collect();
        keyed.sort_by(|a, b| (a.0, a.1).partial_cmp(&(b.0, b.1)).expect("usage is finite"));
        let order: Vec<usize> = keyed.into_iter().map(|(_, _, t)| t).collect();
        let rank: HashMap<usize, usize> = order.iter().enumerate().map(|(rank, &t)| (t, rank)).collect();

        let anchor_tenant = order[0];
        let anchor = take_anchor(&mut self.tenants[anchor_tenant].queue, starving);
        let padded_len = anchor.row.len;
        // The rows a pass padded to `len` may hold: the limits, and the pass time target.
        let (cost, target) = (&self.cost, self.config.max_batch_time);
        let cap = |len: usize| {
            let most = limits.max_sequences.get().min((limits.max_tokens.get() / len.max(1)).max(1));
            target.map_or(most, |target| cost.rows_within(len, target, most))
        };
        let capacity = cap(padded_len);
        let mut rows = vec![anchor.row];

        // Candidates no longer than the anchor: by tenant, then starving ones first within a
        // tenant, then closest in length.
        let mut candidates: Vec<(usize, usize)> = Vec::new(); // (tenant, position in its queue)
        for &t in &order {
            for (i, w) in self.tenants[t].queue.iter().enumerate() {
                if w.row.len <= padded_len {
                    candidates.push((t, i));
                }
            }
        }
        candidates.sort_by_key(|&(t, i)| {
            let w = &self.tenants[t].queue[i];
            (rank[&t], w.passed_over < starving, std::cmp::Reverse(w.row.len), w.row.request, w.row.index)
        });
        // As many as the cheapest split of what waits puts in its first pass: rows much shorter
        // than the anchor go to a pass of their own when padding them costs more than a pass.
        let horizon = (SPLIT_HORIZON * capacity).min(MAX_SPLIT_HORIZON);
        let lengths: Vec<usize> = std::iter::once(padded_len)
            .chain(candidates.iter().take(horizon).map(|&(t, i)| self.tenants[t].queue[i].row.len))
            .collect();
        let rows_now = self.cost.first_pass_rows(&lengths, cap).min(capacity);
        let mut taken: Vec<(usize, usize)> = candidates.into_iter().take(rows_now - 1).collect();
        rows.extend(taken.iter().map(|&(t, i)| self.tenants[t].queue[i].row));

        // Sequences overtaken by a later request of their own tenant were passed over; after
        // `max_pass_over` times they go first (see `take_anchor` and the candidate order).
        let mut latest: HashMap<usize, RequestId> = HashMap::new();
        latest.insert(anchor_tenant, anchor.row.request);
        for &(t, i) in &taken {
            let request = self.tenants[t].queue[i].row.request;
            latest.entry(t).and_modify(|r| *r = (*r).max(request)).or_insert(request);
        }
        // Remove what was taken, highest positions first so the others stay valid.
        taken.sort_unstable_by(|a, b| b.cmp(a));
        for (t, i) in taken {
            self.tenants[t].queue.remove(i);
        }
        for (&t, &latest) in &latest {
            for w in self.tenants[t].queue.iter_mut().filter(|w| w.row.request < latest) {
                w.passed_over += 1;
            }
        }
        self.finish_batch(rows, padded_len, now)
    }

    /// Books rows that left the queue for a batch, and what they cost to their tenants.
    fn finish_batch(&mut self, rows: Vec<Row>, padded_len: usize, now: Instant) -> Batch {
        for row in &rows {
            self.queued_tokens -= row.len;
            let request = self.requests.get_mut(&row.request).expect("queued rows belong to live requests");
            request.queued -= 1;
            let tenant = request.tenant;
            self.tenants[tenant].queued -= row.len;
            self.tenants[tenant].charge(padded_len, now, self.config.usage_half_life);
            self.drop_idle_tenant(tenant);
        }
        Batch { rows, padded_len }
    }

    fn drop_idle_tenant(&mut self, t: usize) {
        if self.tenants[t].queue.is_empty() {
            self.ring.retain(|&x| x != t);
        }
    }
}

/// How far ahead a batch looks when it splits what waits into passes: this many passes' worth of
/// rows (see [`CostModel::first_pass_rows`]), and at most this many rows, since the split is
/// worked out under the queue's lock.
const SPLIT_HORIZON: usize = 4;
const MAX_SPLIT_HORIZON: usize = 256;

/// The tenant's anchor: its longest-waiting starving sequence if any, else its longest one
/// (earliest first among equals).
fn take_anchor(queue: &mut Vec<Waiting>, starving: u32) -> Waiting {
    let position = queue
        .iter()
        .enumerate()
        .max_by_key(|(i, w)| {
            (
                w.passed_over >= starving,
                if w.passed_over >= starving { w.passed_over as usize } else { w.row.len },
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i)
        .expect("a tenant in the ring has work");
    queue.remove(position)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::num::NonZeroUsize;

    use proptest::prelude::*;

    use super::*;

    fn config(max_sequences: usize, max_tokens: usize, delay_ms: u64, max_queued_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            limits: BatchLimits {
                max_sequences: NonZeroUsize::new(max_sequences).unwrap(),
                max_tokens: NonZeroUsize::new(max_tokens).unwrap(),
            },
            max_queue_delay: Duration::from_millis(delay_ms),
            max_queued_tokens,
            max_pass_over: 4,
            usage_half_life: Duration::from_secs(5),
            max_batch_time: None,
            order: ChunkOrder::LengthSorted,
        }
    }

    /// A CPU-like pass time: 2 ms a pass, 20 µs a token, attention 0.1 µs per token per position.
    fn pass_ms(rows: usize, len: usize) -> f64 {
        2.0 + 0.02 * (rows * len) as f64 + 0.0001 * (rows * len * len) as f64
    }

    /// Reports passes of varied shapes, as the model thread would after serving them; `stall_ms`
    /// more each, as on a contended machine.
    fn teach(s: &mut Scheduler, passes: usize, stall_ms: f64) {
        let shapes = [(32, 48), (7, 20), (32, 256), (1, 256), (16, 128), (32, 12), (4, 200), (2, 8)];
        for &(rows, len) in shapes.iter().cycle().take(passes) {
            s.observe(rows, len, Duration::from_secs_f64((pass_ms(rows, len) + stall_ms) / 1e3));
        }
    }

    /// Runs batches at `now` until idle; returns them.
    fn drain(s: &mut Scheduler, now: Instant, on_complete: &mut impl FnMut(usize, Vec<RequestId>)) -> Vec<Batch> {
        let mut batches = Vec::new();
        loop {
            match s.next(now) {
                Next::Run(batch) => {
                    let done = s.complete(&batch.rows);
                    on_complete(batches.len(), done);
                    batches.push(batch);
                }
                Next::Idle => return batches,
                Next::WaitUntil(_) => unreachable!("drained past the queue delay"),
            }
        }
    }

    fn check_limits(batch: &Batch, c: &SchedulerConfig) {
        assert!(!batch.rows.is_empty());
        assert!(batch.rows.len() <= c.limits.max_sequences.get());
        assert_eq!(batch.padded_len, batch.rows.iter().map(|r| r.len).max().unwrap());
        assert!(batch.padded_tokens() <= c.limits.max_tokens.get() || batch.rows.len() == 1, "{batch:?}");
    }

    #[test]
    fn waits_for_more_work_only_up_to_the_queue_delay() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(4, 1000, 5, 10_000));
        assert_eq!(s.next(t0), Next::Idle);
        s.submit(1, "a", &[10, 12], None, t0).unwrap();
        assert_eq!(s.next(t0), Next::WaitUntil(t0 + Duration::from_millis(5)));
        assert!(matches!(s.next(t0 + Duration::from_millis(5)), Next::Run(b) if b.rows.len() == 2));
        // A full batch does not wait.
        s.submit(2, "a", &[10, 10, 10, 10], None, t0).unwrap();
        assert!(matches!(s.next(t0), Next::Run(b) if b.rows.len() == 4));
        // Zero delay never waits.
        let mut s = Scheduler::new(config(4, 1000, 0, 10_000));
        s.submit(1, "a", &[10], None, t0).unwrap();
        assert!(matches!(s.next(t0), Next::Run(_)));
    }

    /// The lengths in each batch when two requests of mixed lengths arrive together.
    fn batch_lengths(order: ChunkOrder, tenants: [&str; 2]) -> Vec<Vec<usize>> {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig { order, ..config(3, 10_000, 0, 100_000) });
        s.submit(1, tenants[0], &[50, 5, 48], None, t0).unwrap();
        s.submit(2, tenants[1], &[6, 49, 7], None, t0).unwrap();
        drain(&mut s, t0, &mut |_, _| {}).iter().map(|b| b.rows.iter().map(|r| r.len).collect()).collect()
    }

    #[test]
    fn batches_group_similar_lengths_across_requests() {
        assert_eq!(batch_lengths(ChunkOrder::LengthSorted, ["a", "a"]), vec![vec![50, 49, 48], vec![7, 6, 5]]);
    }

    #[test]
    fn input_order_is_first_come_first_batched() {
        assert_eq!(batch_lengths(ChunkOrder::InputOrder, ["a", "b"]), vec![vec![50, 5, 48], vec![6, 49, 7]]);
    }

    #[test]
    fn a_sequence_longer_than_the_budget_runs_alone() {
        let t0 = Instant::now();
        let c = config(8, 100, 0, 100_000);
        let mut s = Scheduler::new(c);
        s.submit(1, "a", &[10, 500, 10], None, t0).unwrap();
        let batches = drain(&mut s, t0, &mut |_, _| {});
        assert_eq!(batches[0].rows.len(), 1);
        assert_eq!(batches[0].padded_len, 500);
        batches.iter().for_each(|b| check_limits(b, &c));
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_accepts_again_when_drained() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(4, 1000, 0, 100));
        s.submit(1, "a", &[60], None, t0).unwrap();
        assert_eq!(
            s.submit(2, "a", &[50], None, t0),
            Err(Rejected::Overloaded { queued: 60, requested: 50, limit: 100 })
        );
        assert_eq!(s.submit(1, "a", &[1], None, t0), Err(Rejected::Duplicate(1)));
        drain(&mut s, t0, &mut |_, _| {});
        assert_eq!(s.queued_tokens(), 0);
        s.submit(2, "a", &[50], None, t0).unwrap();
        // An empty queue takes even a request larger than the limit.
        let mut s = Scheduler::new(config(4, 1000, 0, 100));
        s.submit(3, "a", &[500], None, t0).unwrap();
    }

    #[test]
    fn deadlines_and_cancellations_remove_waiting_work() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(2, 1000, 0, 10_000));
        s.submit(1, "a", &[10, 10, 10], Some(t0 + Duration::from_millis(10)), t0).unwrap();
        s.submit(2, "b", &[20, 20], None, t0).unwrap();
        s.submit(3, "b", &[30], Some(t0 + Duration::from_millis(50)), t0).unwrap();
        assert!(s.expire(t0 + Duration::from_millis(5)).is_empty());
        assert_eq!(s.expire(t0 + Duration::from_millis(10)), vec![1]);
        assert!(s.cancel(2));
        assert!(!s.cancel(2));
        assert_eq!(s.queued_tokens(), 30);
        let mut done = Vec::new();
        drain(&mut s, t0, &mut |_, d| done.extend(d));
        assert_eq!(done, vec![3]);
        // Rows of a request cancelled while running are ignored when they complete.
        s.submit(4, "a", &[5, 5], None, t0).unwrap();
        let Next::Run(batch) = s.next(t0) else { panic!() };
        s.cancel(4);
        assert!(s.complete(&batch.rows).is_empty());
    }

    #[test]
    fn a_flooding_tenant_delays_another_by_about_one_batch() {
        let t0 = Instant::now();
        let c = config(32, 8192, 0, 1_000_000);
        let lengths: Vec<usize> = (0..120).map(|i| 10 + (i * 37) % 50).collect();
        // Alone, B's 120 sequences take this many batches.
        let mut alone = Scheduler::new(c);
        alone.submit(1000, "b", &lengths, None, t0).unwrap();
        let alone_batches = drain(&mut alone, t0, &mut |_, _| {}).len();

        let mut s = Scheduler::new(c);
        for r in 0..32 {
            s.submit(r, "a", &lengths, None, t0).unwrap();
        }
        // A few of A's batches run before B arrives.
        for _ in 0..3 {
            let Next::Run(b) = s.next(t0) else { panic!() };
            s.complete(&b.rows);
        }
        s.submit(1000, "b", &lengths, None, t0).unwrap();
        s.submit(1001, "c", &[12, 30, 7], None, t0).unwrap();
        let (mut big_done, mut small_done) = (None, None);
        drain(&mut s, t0, &mut |i, done| {
            if done.contains(&1000) {
                big_done = Some(i + 1);
            }
            if done.contains(&1001) {
                small_done = Some(i + 1);
            }
        });
        // B and C have used the model less than A, so their rows go first: C's small request
        // runs in the first batch after it arrives, and B needs one batch more than alone at most.
        assert!(big_done.unwrap() <= alone_batches + 1, "B done after {big_done:?} batches, alone {alone_batches}");
        assert!(small_done.unwrap() <= 1, "C waited {small_done:?} batches");
    }

    #[test]
    fn tenants_that_both_flood_share_the_model_equally() {
        let t0 = Instant::now();
        let c = config(32, 8192, 0, usize::MAX);
        let mut s = Scheduler::new(c);
        let lengths: Vec<usize> = (0..120).map(|i| 10 + (i * 37) % 50).collect();
        for r in 0..64 {
            s.submit(r, if r % 2 == 0 { "a" } else { "b" }, &lengths, None, t0).unwrap();
        }
        let mut tokens = [0usize; 2];
        for i in 0..100 {
            // A batch every 50 ms: usage decays while they run.
            let Next::Run(batch) = s.next(t0 + Duration::from_millis(50 * i)) else { panic!() };
            for row in &batch.rows {
                tokens[(row.request % 2) as usize] += batch.padded_len;
            }
            s.complete(&batch.rows);
        }
        let share = tokens[0] as f64 / (tokens[0] + tokens[1]) as f64;
        assert!((0.45..=0.55).contains(&share), "tenant a got {share:.3} of the padded tokens: {tokens:?}");
    }

    #[test]
    fn a_passed_over_sequence_runs_within_the_bound() {
        let t0 = Instant::now();
        // Room for 4 rows of 100: a stream of long sequences would keep a short one out.
        let c = config(4, 400, 0, 1_000_000);
        let mut s = Scheduler::new(c);
        s.submit(1, "a", &[5], None, t0).unwrap();
        for r in 2..40 {
            s.submit(r, "a", &[100, 100], None, t0).unwrap();
        }
        let mut served_at = None;
        drain(&mut s, t0, &mut |i, done| {
            if done.contains(&1) && served_at.is_none() {
                served_at = Some(i + 1);
            }
        });
        assert!(served_at.unwrap() <= c.max_pass_over as usize + 1, "served after {served_at:?} batches");
    }

    #[test]
    fn a_batch_predicted_over_the_target_is_shrunk_to_fit() {
        let t0 = Instant::now();
        let c = SchedulerConfig { max_batch_time: Some(Duration::from_millis(200)), ..config(32, 8192, 0, usize::MAX) };
        let mut s = Scheduler::new(c);
        // Before any pass was measured, the limits alone size the batch.
        s.submit(1, "flood", &[256; 64], None, t0).unwrap();
        let Next::Run(first) = s.next(t0) else { panic!() };
        assert_eq!(first.rows.len(), 32);
        s.complete(&first.rows);
        teach(&mut s, 24, 0.0);
        let Next::Run(batch) = s.next(t0) else { panic!() };
        // 2 + r·(5.12 + 6.55) ≤ 200: 16 rows of 256 tokens, where the limits allowed 32.
        assert_eq!(batch.rows.len(), 16);
        assert!(pass_ms(batch.rows.len(), batch.padded_len) <= 200.0);
        // Short rows still fill the batch.
        s.submit(2, "light", &[12; 32], None, t0).unwrap();
        let Next::Run(light) = s.next(t0) else { panic!() };
        assert_eq!((light.rows.len(), light.padded_len), (32, 12));
    }

    #[test]
    fn a_sequence_predicted_over_the_target_still_runs_alone() {
        let t0 = Instant::now();
        let c = SchedulerConfig { max_batch_time: Some(Duration::from_millis(5)), ..config(32, 8192, 0, usize::MAX) };
        let mut s = Scheduler::new(c);
        teach(&mut s, 24, 0.0);
        s.submit(1, "a", &[256, 256, 256], None, t0).unwrap();
        let batches = drain(&mut s, t0, &mut |_, _| {});
        assert_eq!(batches.iter().map(|b| b.rows.len()).collect::<Vec<_>>(), vec![1, 1, 1]);
    }

    #[test]
    fn a_light_request_waits_one_bounded_pass_behind_a_flood() {
        let t0 = Instant::now();
        let target = Duration::from_millis(200);
        let c = SchedulerConfig { max_batch_time: Some(target), ..config(32, 8192, 0, usize::MAX) };
        let mut s = Scheduler::new(c);
        teach(&mut s, 24, 0.0);
        for r in 0..16 {
            s.submit(r, "flood", &[256; 256], None, t0).unwrap();
        }
        let Next::Run(running) = s.next(t0) else { panic!() };
        // The light request arrives while the flood's pass runs, and goes next.
        s.submit(100, "light", &[9, 14], None, t0).unwrap();
        s.complete(&running.rows);
        let Next::Run(next) = s.next(t0) else { panic!() };
        assert_eq!(s.complete(&next.rows), vec![100]);
        let waited = pass_ms(running.rows.len(), running.padded_len) + pass_ms(next.rows.len(), next.padded_len);
        assert!(waited <= 200.0 + pass_ms(2, 14), "waited {waited:.1} ms");
    }

    #[test]
    fn once_passes_are_measured_short_sequences_run_apart_from_long_ones_unless_passes_cost_much_more() {
        let t0 = Instant::now();
        let lengths = |batches: Vec<Batch>| -> Vec<Vec<usize>> {
            batches.iter().map(|b| b.rows.iter().map(|r| r.len).collect()).collect()
        };
        // One-sentence requests of 60 and 8 tokens from many clients, as under `make soak`.
        let submit_all = |s: &mut Scheduler| {
            for r in 0..32u64 {
                s.submit(r, "a", &[if r % 4 == 0 { 60 } else { 8 }], None, t0).unwrap();
            }
        };
        let mut cpu = Scheduler::new(config(32, 8192, 0, usize::MAX));
        // Before any pass is measured, a batch takes all it may.
        submit_all(&mut cpu);
        assert_eq!(lengths(drain(&mut cpu, t0, &mut |_, _| {})), [[vec![60; 8], vec![8; 24]].concat()]);
        // Taught a CPU's pass times (2 ms a pass, the rest per token): two passes, no padding.
        teach(&mut cpu, 24, 0.0);
        submit_all(&mut cpu);
        assert_eq!(lengths(drain(&mut cpu, t0, &mut |_, _| {})), [vec![60; 8], vec![8; 24]]);
        // Taught passes that each cost 200 ms more (a GPU waiting on launches): one full pass.
        let mut gpu = Scheduler::new(config(32, 8192, 0, usize::MAX));
        teach(&mut gpu, 24, 200.0);
        submit_all(&mut gpu);
        assert_eq!(lengths(drain(&mut gpu, t0, &mut |_, _| {})), [[vec![60; 8], vec![8; 24]].concat()]);
    }

    #[test]
    fn a_request_larger_than_its_tenants_room_is_refused_for_good_even_from_an_empty_queue() {
        let t0 = Instant::now();
        let shares = [("a".to_owned(), 300), ("b".to_owned(), 500)];
        let mut s = Scheduler::with_shares(config(4, 1000, 0, 1000), &shares).unwrap();
        // A may use its 300 and the 200 no share reserves: 500 at most, queue empty or not.
        let refused = s.submit(1, "a", &[300, 201], None, t0).unwrap_err();
        assert_eq!(refused, Rejected::NeverFits { tenant: "a".into(), requested: 501, room: 500 });
        assert!(refused.to_string().contains("can never wait") && refused.to_string().contains("500"), "{refused}");
        s.submit(2, "a", &[300, 200], None, t0).unwrap();
        // Without shares, an empty queue still takes a request larger than the limit (it runs alone).
        let mut alone = Scheduler::new(config(4, 1000, 0, 1000));
        alone.submit(1, "a", &[2000], None, t0).unwrap();
    }

    #[test]
    fn a_tenant_past_its_share_is_refused_alone() {
        let t0 = Instant::now();
        let shares = [("a".to_owned(), 500), ("b".to_owned(), 500)];
        let mut s = Scheduler::with_shares(config(4, 1000, 0, 1000), &shares).unwrap();
        s.submit(1, "a", &[200, 200], None, t0).unwrap();
        let refused = s.submit(2, "a", &[200], None, t0).unwrap_err();
        assert_eq!(refused, Rejected::OverShare { tenant: "a".into(), queued: 400, requested: 200, share: 500 });
        assert!(refused.to_string().contains("tenant a's share") && refused.to_string().contains("500"), "{refused}");
        // B's whole share is still there for it.
        s.submit(3, "b", &[250, 250], None, t0).unwrap();
        // A tenant without a share gets only room no share reserves: none here, ever.
        assert_eq!(
            s.submit(4, "c", &[1], None, t0),
            Err(Rejected::NeverFits { tenant: "c".into(), requested: 1, room: 0 })
        );
        // Once A's work ran, A has room again.
        drain(&mut s, t0, &mut |_, _| {});
        s.submit(2, "a", &[200], None, t0).unwrap();
        assert_eq!(
            Scheduler::with_shares(config(4, 1000, 0, 1000), &[("a".into(), 600), ("b".into(), 500)]).err(),
            Some(SharesTooLarge { total: 1100, limit: 1000 })
        );
    }

    #[test]
    fn new_shares_apply_to_new_requests_and_keep_what_waits() {
        let t0 = Instant::now();
        let mut s = Scheduler::with_shares(config(4, 1000, 0, 1000), &[("a".into(), 500), ("b".into(), 500)]).unwrap();
        s.submit(1, "b", &[400], None, t0).unwrap();
        // B leaves and C arrives with B's share: B's queued sequence stays and still runs.
        s.set_shares(&[("a".into(), 500), ("c".into(), 100)]).unwrap();
        s.submit(2, "c", &[100], None, t0).unwrap();
        // A's 500 is still reserved; B, without a share now, gets only room no share reserves:
        // none while its old sequence waits.
        assert!(matches!(s.submit(3, "b", &[1], None, t0), Err(Rejected::Overloaded { .. })));
        let mut done = Vec::new();
        drain(&mut s, t0, &mut |_, requests| done.extend(requests));
        done.sort();
        assert_eq!(done, [1, 2]);
        assert_eq!(
            s.set_shares(&[("a".into(), 600), ("c".into(), 500)]),
            Err(SharesTooLarge { total: 1100, limit: 1000 })
        );
    }

    #[test]
    fn room_no_share_reserves_is_first_come() {
        let t0 = Instant::now();
        let mut s = Scheduler::with_shares(config(4, 1000, 0, 1000), &[("a".into(), 300), ("b".into(), 300)]).unwrap();
        // A may go past its share into the 400 tokens no one reserves, but not into B's.
        s.submit(1, "a", &[350, 350], None, t0).unwrap();
        assert!(matches!(s.submit(2, "a", &[1], None, t0), Err(Rejected::OverShare { .. })));
        s.submit(3, "b", &[300], None, t0).unwrap();
    }

    proptest! {
        /// Whatever the others queue, a tenant whose own waiting tokens stay within its share is
        /// never refused; a refused tenant is always past its share.
        #[test]
        fn a_tenant_within_its_share_is_never_refused(
            shares in proptest::collection::vec(1usize..400, 1..4),
            slack in 0usize..300,
            steps in proptest::collection::vec((0usize..5, 1usize..120, 0usize..4), 1..80),
        ) {
            let t0 = Instant::now();
            let limit = shares.iter().sum::<usize>() + slack;
            let named: Vec<(String, usize)> = shares.iter().enumerate().map(|(i, &s)| (format!("t{i}"), s)).collect();
            let mut s = Scheduler::with_shares(config(4, 256, 0, limit), &named).unwrap();
            let mut queued = [0usize; 5];
            let mut owner = HashMap::new();
            for (id, &(tenant, len, action)) in steps.iter().enumerate() {
                if action == 0 {
                    // A batch runs and frees its rows.
                    if let Next::Run(batch) = s.next(t0) {
                        for row in &batch.rows {
                            queued[owner[&row.request]] -= row.len;
                        }
                        s.complete(&batch.rows);
                    }
                    continue;
                }
                let name = format!("t{tenant}");
                let share = shares.get(tenant).copied();
                match s.submit(id as RequestId, &name, &[len], None, t0) {
                    Ok(()) => {
                        queued[tenant] += len;
                        owner.insert(id as RequestId, tenant);
                    }
                    Err(refused) => {
                        prop_assert!(share.is_none_or(|share| queued[tenant] + len > share), "t{tenant} refused within its share: {refused}");
                        if share.is_some() {
                            prop_assert!(matches!(refused, Rejected::OverShare { .. } | Rejected::NeverFits { .. }), "{refused}");
                        }
                        // Refused for good only what could never fit beside the others' shares.
                        let others: usize = shares.iter().enumerate().filter(|&(t, _)| t != tenant).map(|(_, s)| s).sum();
                        prop_assert_eq!(matches!(refused, Rejected::NeverFits { .. }), others > 0 && len + others > limit, "{}", refused);
                    }
                }
                // Past the limit only by one sequence larger than it, alone in the queue.
                prop_assert!(s.queued_tokens() <= limit || s.queued_sequences() == 1);
            }
        }

        #[test]
        fn every_sequence_runs_once_within_the_limits(
            requests in proptest::collection::vec((0usize..3, proptest::collection::vec(1usize..300, 0..40)), 1..30),
            max_sequences in 1usize..40,
            max_tokens in 1usize..4096,
            cancel_every in 0usize..5,
            sorted in any::<bool>(),
            target_ms in proptest::option::of(0u64..300),
            taught in 0usize..12,
            stall_ms in proptest::option::of(0.0f64..400.0),
        ) {
            let t0 = Instant::now();
            let order = if sorted { ChunkOrder::LengthSorted } else { ChunkOrder::InputOrder };
            let max_batch_time = target_ms.map(Duration::from_millis);
            let c = SchedulerConfig { order, max_batch_time, ..config(max_sequences, max_tokens, 3, usize::MAX) };
            let mut s = Scheduler::new(c);
            teach(&mut s, taught, stall_ms.unwrap_or(0.0));
            let mut expected = HashSet::new();
            let mut cancelled = HashSet::new();
            for (id, (tenant, lengths)) in requests.iter().enumerate() {
                let id = id as RequestId;
                s.submit(id, &format!("t{tenant}"), lengths, None, t0).unwrap();
                if cancel_every > 0 && (id as usize).is_multiple_of(cancel_every) && !lengths.is_empty() {
                    s.cancel(id);
                    cancelled.insert(id);
                } else {
                    expected.extend((0..lengths.len()).map(|i| (id, i)));
                }
            }
            let mut seen = HashSet::new();
            let mut completed = Vec::new();
            let predicts = s.cost.predict(1, 1).is_some();
            for batch in drain(&mut s, t0 + Duration::from_secs(1), &mut |_, done| completed.extend(done)) {
                check_limits(&batch, &c);
                // Only a single sequence may be predicted over the target (or over a pass's fixed
                // cost and half the target, where the fixed cost takes more than half).
                if let (Some(target), true, true, true) = (max_batch_time, sorted, predicts, batch.rows.len() > 1) {
                    let fixed = s.cost.predict(0, batch.padded_len).unwrap();
                    let bound = target.max(fixed + target / 2) + Duration::from_nanos(1);
                    prop_assert!(s.cost.predict(batch.rows.len(), batch.padded_len).unwrap() <= bound, "{batch:?}");
                }
                for row in batch.rows {
                    prop_assert!(seen.insert((row.request, row.index)), "row {row:?} ran twice");
                    prop_assert_eq!(row.len, requests[row.request as usize].1[row.index].max(1));
                }
            }
            prop_assert_eq!(seen, expected);
            let with_work: HashSet<RequestId> = requests.iter().enumerate()
                .filter(|(id, (_, l))| !l.is_empty() && !cancelled.contains(&(*id as RequestId)))
                .map(|(id, _)| id as RequestId).collect();
            prop_assert_eq!(completed.len(), with_work.len(), "each request completes exactly once");
            prop_assert_eq!(completed.into_iter().collect::<HashSet<_>>(), with_work);
            prop_assert_eq!(s.queued_tokens(), 0);
        }
    }
}
