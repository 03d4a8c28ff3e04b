//! Metrics: every series batchbox exports, with its labels and meaning, in one place; the
//! Prometheus recorder behind the `metrics` facade; and values read back from a scrape.
//!
//! Policy:
//! - Each event is recorded with the `metrics` macros where it happens, in the crate that sees
//!   it, under a name from [`names`]. With no recorder installed (unit tests, `check-config`,
//!   `server.metrics: false`) a macro is a no-op.
//! - Labels are `tenant` and `model` (names from the config) and closed sets the host chooses
//!   (status class, trap kind, quota name): never anything a client sends (no path, no text), so
//!   no client can grow the number of series.
//! - Durations are seconds and histograms (buckets in [`install`]); counters end in `_total`.
//! - `/v1/models` reads its numbers from the same recorder ([`Scrape`]), so the two never disagree.

use std::collections::HashMap;
use std::sync::OnceLock;

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// The names of every metric; see [`describe`] for what each counts.
pub mod names {
    /// Counter `{tenant, status}`: requests a tenant's route answered, by status class ("2xx"…).
    pub const REQUESTS: &str = "batchbox_requests_total";
    /// Histogram `{tenant}`: a tenant's requests, from routing to the response, in seconds.
    pub const REQUEST_SECONDS: &str = "batchbox_request_duration_seconds";
    /// Histogram `{tenant}`: per request, time the host spent tokenizing for the plugin.
    pub const TOKENIZE_SECONDS: &str = "batchbox_request_tokenize_seconds";
    /// Histogram `{tenant}`: per request, time its sequences waited for the model.
    pub const QUEUE_SECONDS: &str = "batchbox_request_queue_seconds";
    /// Histogram `{tenant}`: per request, time the model computed its sequences.
    pub const INFERENCE_SECONDS: &str = "batchbox_request_inference_seconds";
    /// Histogram `{tenant}`: per request, the plugin's own time (wall time outside host calls).
    pub const PLUGIN_SECONDS: &str = "batchbox_request_plugin_seconds";
    /// Counter `{tenant, kind}`: plugin runs stopped by a trap or a limit; `kind` is one of
    /// [`TRAP_KINDS`](super::TRAP_KINDS).
    pub const PLUGIN_TRAPS: &str = "batchbox_plugin_traps_total";
    /// Counter `{tenant, quota}`: requests or host calls refused by a tenant quota.
    pub const QUOTA_REJECTIONS: &str = "batchbox_quota_rejections_total";
    /// Counter `{model}`: forward passes (a batch split after running out of memory counts once).
    pub const BATCHES: &str = "batchbox_model_batches_total";
    /// Counter `{model}`: sequences sent through a forward pass, failed ones included.
    pub const SEQUENCES: &str = "batchbox_model_sequences_total";
    /// Counter `{model}`: tokens of those sequences, without padding.
    pub const REAL_TOKENS: &str = "batchbox_model_real_tokens_total";
    /// Counter `{model}`: tokens computed, padding included.
    pub const PADDED_TOKENS: &str = "batchbox_model_padded_tokens_total";
    /// Histogram `{model}`: rows per forward pass.
    pub const BATCH_ROWS: &str = "batchbox_model_batch_rows";
    /// Histogram `{model}`: time of one forward pass, in seconds.
    pub const PASS_SECONDS: &str = "batchbox_model_pass_duration_seconds";
    /// Gauge `{model}`: sequences waiting for the model.
    pub const QUEUED_SEQUENCES: &str = "batchbox_model_queued_sequences";
    /// Gauge `{model}`: tokens waiting for the model.
    pub const QUEUED_TOKENS: &str = "batchbox_model_queued_tokens";
    /// Counter `{model}`: calls refused because the queue (or the tenant's share) was full.
    pub const REJECTED: &str = "batchbox_model_rejected_total";
    /// Counter `{model}`: calls dropped from the queue at their deadline.
    pub const EXPIRED: &str = "batchbox_model_expired_total";
    /// Counter `{model}`: calls whose caller went away before they were computed.
    pub const ABANDONED: &str = "batchbox_model_abandoned_total";
    /// Counter `{model}`: sequences whose forward pass failed even alone.
    pub const FAILED_SEQUENCES: &str = "batchbox_model_failed_sequences_total";
    /// Counter `{model}`: batches that ran out of memory and were split in halves.
    pub const OOM_SPLITS: &str = "batchbox_model_oom_splits_total";
    /// Gauge `{model, version, device, precision}`, always 1: what is loaded and how it runs.
    pub const MODEL_INFO: &str = "batchbox_model_info";
    /// Counter `{model}`: sequences answered from a tenant's response cache.
    pub const CACHE_HITS: &str = "batchbox_cache_hits_total";
    /// Counter `{model}`: sequences the caches sent on to the model.
    pub const CACHE_MISSES: &str = "batchbox_cache_misses_total";
    /// Counter `{model}`: entries evicted from the caches.
    pub const CACHE_EVICTIONS: &str = "batchbox_cache_evictions_total";
    /// Gauge `{model}`: entries held by the caches in front of the model.
    pub const CACHE_ENTRIES: &str = "batchbox_cache_entries";
    /// Gauge `{model}`: bytes those entries take.
    pub const CACHE_BYTES: &str = "batchbox_cache_bytes";
    /// Gauge: plugin instances alive (running a request, or idle for reuse).
    pub const PLUGIN_INSTANCES: &str = "batchbox_plugin_instances";
    /// Gauge: HTTP connections open.
    pub const CONNECTIONS: &str = "batchbox_connections_open";
    /// Gauge `{version}`, always 1: the running build.
    pub const BUILD_INFO: &str = "batchbox_build_info";
}

/// The `kind` label values of [`names::PLUGIN_TRAPS`].
pub const TRAP_KINDS: [&str; 5] = ["cpu", "memory", "wall", "panic", "hostcall"];

/// Upper bounds of the duration histograms' buckets, in seconds: from a cached answer to a
/// request that waits out a long queue.
const SECONDS_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds of the rows-per-pass histogram's buckets.
const ROWS_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The `status` label values of [`names::REQUESTS`]: a status code's class.
pub const STATUS_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Which of [`STATUS_CLASSES`] a status code is in (the host answers 200 to 599 only).
pub fn status_class(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        _ => 3,
    }
}

/// Installs the Prometheus recorder for the whole process, once, and describes every metric;
/// later calls return the same handle. The handle renders `/metrics`, and must have
/// [`PrometheusHandle::run_upkeep`] called every few seconds, or histogram samples pile up
/// between scrapes.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_ROWS.into()), &ROWS_BUCKETS)?
        .install_recorder()?;
    describe();
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The help text of every metric, as `/metrics` shows it.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(REQUESTS, "Requests a tenant's route answered, by status class.");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "A tenant's requests, end to end in the host.");
    describe_histogram!(TOKENIZE_SECONDS, Unit::Seconds, "Per request: the host tokenizing for the plugin.");
    describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Per request: its sequences waiting for the model.");
    describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "Per request: the model computing its sequences.");
    describe_histogram!(PLUGIN_SECONDS, Unit::Seconds, "Per request: the plugin's own time, outside host calls.");
    describe_counter!(PLUGIN_TRAPS, "Plugin runs stopped by a trap or a limit (cpu, memory, wall, panic, hostcall).");
    describe_counter!(QUOTA_REJECTIONS, "Requests or host calls refused by a tenant quota.");
    describe_counter!(BATCHES, "Forward passes.");
    describe_counter!(SEQUENCES, "Sequences sent through a forward pass.");
    describe_counter!(REAL_TOKENS, "Tokens of the sequences computed, without padding.");
    describe_counter!(PADDED_TOKENS, "Tokens computed, padding included.");
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per forward pass.");
    describe_histogram!(PASS_SECONDS, Unit::Seconds, "One forward pass.");
    describe_gauge!(QUEUED_SEQUENCES, "Sequences waiting for the model.");
    describe_gauge!(QUEUED_TOKENS, "Tokens waiting for the model.");
    describe_counter!(REJECTED, "Calls refused because the queue or the tenant's share of it was full.");
    describe_counter!(EXPIRED, "Calls dropped from the queue at their deadline.");
    describe_counter!(ABANDONED, "Calls whose caller went away before they were computed.");
    describe_counter!(FAILED_SEQUENCES, "Sequences whose forward pass failed even alone.");
    describe_counter!(OOM_SPLITS, "Batches that ran out of memory and were split in halves.");
    describe_gauge!(MODEL_INFO, "The loaded model: version, device and precision (always 1).");
    describe_counter!(CACHE_HITS, "Sequences answered from a response cache.");
    describe_counter!(CACHE_MISSES, "Sequences the response caches sent on to the model.");
    describe_counter!(CACHE_EVICTIONS, "Entries evicted from the response caches.");
    describe_gauge!(CACHE_ENTRIES, "Entries held by the response caches.");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held by the response caches.");
    describe_gauge!(PLUGIN_INSTANCES, "Plugin instances alive.");
    describe_gauge!(CONNECTIONS, "HTTP connections open.");
    describe_gauge!(BUILD_INFO, "The running build (always 1).");
}

/// Values read back from a rendered scrape: what `/v1/models` shows, and what tests check.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Each sample's value, by its name and its labels as rendered (`{model="m",tenant="t"}`,
    /// labels sorted; empty for none).
    samples: HashMap<(String, String), f64>,
}

impl Scrape {
    /// Parses the text exposition format, as [`PrometheusHandle::render`] writes it.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, sorted_labels(labels.strip_suffix('}')?)),
                    None => (series, String::new()),
                };
                Some(((name.to_owned(), labels), value.parse().ok()?))
            })
            .collect();
        Self { samples }
    }

    /// The value of metric `name` with exactly `labels` (values as given, unescaped); 0 if it has
    /// none yet (a counter nothing has incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // Escaped as the text format escapes label values.
        let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        labels.sort();
        let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
        self.samples.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
    }
}

/// `a="1",b="2"` with its labels sorted, wrapped in braces. A value may hold commas (a tenant
/// named "a,b") and escaped quotes: only a comma outside quotes separates labels.
fn sorted_labels(labels: &str) -> String {
    let (mut pairs, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pairs.push(&labels[start..]);
    pairs.retain(|pair| !pair.is_empty());
    pairs.sort_unstable();
    format!("{{{}}}", pairs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_reads_back_what_was_rendered_whatever_the_label_order() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\nx_total{tenant=\"a\",kind=\"cpu\"} 3\n\
                    x_total{tenant=\"b\",kind=\"cpu\"} 1\nup 1\nh_bucket{model=\"m\",le=\"0.5\"} 2\n";
        let scrape = Scrape::parse(text);
        assert_eq!(scrape.value("x_total", &[("kind", "cpu"), ("tenant", "a")]), 3.0);
        assert_eq!(scrape.value("x_total", &[("tenant", "b"), ("kind", "cpu")]), 1.0);
        assert_eq!(scrape.value("up", &[]), 1.0);
        assert_eq!(scrape.value("h_bucket", &[("le", "0.5"), ("model", "m")]), 2.0);
        assert_eq!(scrape.value("x_total", &[("tenant", "c"), ("kind", "cpu")]), 0.0, "never incremented");
        let awkward = Scrape::parse("y_total{tenant=\"a,b\\\"c\",kind=\"cpu\"} 4\n");
        assert_eq!(awkward.value("y_total", &[("kind", "cpu"), ("tenant", "a,b\"c")]), 4.0, "{awkward:?}");
    }

    #[test]
    fn the_recorder_renders_what_the_facade_recorded() {
        let handle = install().unwrap();
        metrics::counter!(names::BATCHES, "model" => "recorder-test").increment(2);
        metrics::histogram!(names::PASS_SECONDS, "model" => "recorder-test").record(0.003);
        let scrape = Scrape::parse(&handle.render());
        assert_eq!(scrape.value(names::BATCHES, &[("model", "recorder-test")]), 2.0);
        let count = format!("{}_count", names::PASS_SECONDS);
        assert_eq!(scrape.value(&count, &[("model", "recorder-test")]), 1.0);
        let bucket = format!("{}_bucket", names::PASS_SECONDS);
        assert_eq!(scrape.value(&bucket, &[("model", "recorder-test"), ("le", "0.0025")]), 0.0);
        assert_eq!(scrape.value(&bucket, &[("model", "recorder-test"), ("le", "0.005")]), 1.0);
        assert_eq!(scrape.value(names::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    }
}
