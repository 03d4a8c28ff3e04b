//! OpenTelemetry trace export, with the `otel` cargo feature (a default one, dormant until an
//! endpoint is set).
//!
//! The spans themselves are always in the code, at debug level, so that they cost nothing unless
//! something records them: `request` (the server), `plugin` (the plugin runtime), `tokenize` and
//! `infer` (the plugin's host calls) and `batch` (a forward pass on the model thread, the child of
//! the first request it computes and linked to the others). This module exports them over
//! OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
//! the other standard `OTEL_*` variables (protocol, headers, batch delay, service name) apply. A
//! request that carries a sampled W3C `traceparent` joins its client's trace
//! ([`join_client_trace`]).

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The exporter, flushed and shut down when dropped (at the end of `main`), so that the spans of
/// the last requests before a clean exit are sent.
pub struct Traces(SdkTracerProvider);

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("flushing traces: {e}");
        }
    }
}

/// The layer that exports batchbox's spans, and its exporter; `None` unless an OTLP endpoint is
/// configured.
pub fn layer<S>() -> anyhow::Result<Option<(impl Layer<S>, Traces)>>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("batchbox");
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    // batchbox's own crates' spans and events (a target matches by prefix, so "batchbox" is every
    // batchbox_* crate; events are sent as the events of their span); nothing of the libraries'.
    let ours = Targets::new().with_target("batchbox", Level::DEBUG);
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("batchbox")).with_filter(ours);
    Ok(Some((layer, Traces(provider))))
}

/// Makes a request's `span` a child of its client's trace when the request carries a valid W3C
/// `traceparent` (and `tracestate`) that the client samples; otherwise the request starts a trace
/// of its own. An unsampled parent would leave the request unrecorded, and with it the `batch`
/// span of every pass it computed first, which other requests' traces link to.
pub fn join_client_trace(headers: &batchbox_server::HeaderMap, span: &tracing::Span) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let sampled = parent.span().span_context().is_sampled();
    if sampled {
        // Refused only for a span nothing records, which the server does not pass here.
        let _ = span.set_parent(parent);
    }
}
