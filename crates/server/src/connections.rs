//! Connections: accepting them, their limits, and draining them at shutdown.
//!
//! Policy, so that no client can stop the server by holding sockets:
//! - **HTTP/1.1 and HTTP/2** (h2c with prior knowledge) on the same port, through hyper-util's
//!   auto builder, under the same limits.
//! - **Header-read timeout** (HTTP/1.1): a request's headers must arrive within
//!   `header_read_timeout_ms` of the connection opening or of the previous response. hyper
//!   starts this clock whenever it waits for a request head, so it also bounds idle time.
//! - **Keep-alive idle timeout** (both protocols): a connection with no request in flight for
//!   `keep_alive_idle_ms` is shut down gracefully (HTTP/2 gets a GOAWAY).
//! - **At most `max_connections` at once.** Past it the server stops accepting until one
//!   closes: new clients wait in the kernel's listen backlog instead of being turned away, and
//!   nothing spins.
//! - **Accept errors back off.** Running out of descriptors (`EMFILE`) or memory makes `accept`
//!   fail at once for as long as it lasts; each failure doubles a pause (up to a second), and the
//!   log says so at most once every few seconds, with how many failures it did not print.
//! - **Drain.** On shutdown the listener closes (new connections are refused), every connection
//!   finishes the requests it has and closes, and `serve` returns once all are closed or the
//!   grace period is over. A connection accepted but not yet read from gets up to
//!   `FIRST_REQUEST_WAIT` for its first request to arrive before it is closed: its client has
//!   been accepted and has most likely sent the request already, and hyper's graceful shutdown
//!   would close such a connection unread, dropping it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchbox_metrics::names;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use super::App;
use crate::ServerConfig;

/// The connection limits, from `server:` in the config.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long an HTTP/1.1 request's headers may take to arrive (`header_read_timeout_ms`).
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight stays open (`keep_alive_idle_ms`).
    pub keep_alive_idle: Duration,
    /// Connections open at once; at it, accepting pauses until one closes.
    pub max_connections: usize,
    /// Bytes of request headers: the HTTP/1.1 read buffer and the HTTP/2 header list size.
    pub max_header_bytes: usize,
    /// Requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// How long in-flight requests may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl ConnectionLimits {
    /// The limits the `server:` section sets, its milliseconds as durations.
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(server.header_read_timeout_ms.get()),
            keep_alive_idle: Duration::from_millis(server.keep_alive_idle_ms.get()),
            max_connections: server.max_connections.get(),
            max_header_bytes: server.max_header_bytes,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams.get(),
            shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.max_header_bytes)
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .max_header_list_size(self.max_header_bytes as u32);
        builder
    }
}

/// Serves connections until `shutdown` resolves, then drains them (see the module docs).
pub async fn serve(listener: TcpListener, app: Arc<App>, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) {
    check_descriptor_limit(limits.max_connections);
    let builder = Arc::new(limits.builder());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        match accepted {
            Ok((stream, slot)) => {
                backoff.succeeded();
                tokio::spawn(connection(
                    stream,
                    slot,
                    builder.clone(),
                    app.clone(),
                    limits.keep_alive_idle,
                    stopping.clone(),
                ));
            }
            Err(e) => {
                let pause = backoff.failed(&e);
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => tracing::info!("all requests finished"),
        () = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!("grace period over; dropping what is left"),
    }
}

/// At shutdown, how long a connection that has not had a request yet may wait for its first.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Descriptors the process needs besides its connections: the model's and plugins' files,
/// the runtime's own, logs.
const OTHER_DESCRIPTORS: u64 = 256;

/// Raises the soft limit on open descriptors to the hard one (as servers do: the soft default
/// of 1,024 is for interactive shells), and warns when `max_connections` still does not fit
/// under it. Accepting past the limit is survivable (see [`AcceptBackoff`]) but slow.
fn check_descriptor_limit(max_connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, ..limit };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let needed = max_connections as u64 + OTHER_DESCRIPTORS;
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open-file limit is below server.max_connections plus {OTHER_DESCRIPTORS}: lower max_connections or raise `ulimit -n`"
        );
    }
}

/// Waits for a free connection slot, then for a connection.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
    let (stream, _) = listener.accept().await?;
    Ok((stream, slot))
}

/// One connection, until it closes; its slot is given back when it does.
async fn connection(
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Arc<App>,
    keep_alive_idle: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let _open = OpenConnection::counted();
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        service_fn(move |request| {
            let (app, busy) = (app.clone(), activity.begin());
            async move {
                let response = app.handle(request).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = loop {
        let idle_check = tokio::time::sleep_until(activity.idle_deadline(keep_alive_idle).into());
        tokio::select! {
            result = connection.as_mut() => break result,
            () = stopped(&mut stopping) => {
                // Resolves at once if a request has begun on this connection (see the module docs).
                let first_request = tokio::time::timeout(FIRST_REQUEST_WAIT, activity.requested.notified());
                tokio::select! {
                    result = connection.as_mut() => break result,
                    _ = first_request => {}
                }
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            () = idle_check => {
                if activity.idle_for().is_some_and(|idle| idle >= keep_alive_idle) {
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A connection in the open-connections gauge while this lives.
struct OpenConnection;

impl OpenConnection {
    fn counted() -> Self {
        metrics::gauge!(names::CONNECTIONS).increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(names::CONNECTIONS).decrement(1.0);
    }
}

/// Resolves once shutdown has begun.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The sender lives until every connection is drained, so an error cannot happen first.
    let _ = stopping.wait_for(|&stop| stop).await;
}

/// Whether a connection has requests in flight, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    /// Holds a permit once any request has begun (`notify_one` keeps one for a later waiter).
    requested: Notify,
}

/// A request in flight on its connection; dropping it marks it done.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self { in_flight: AtomicUsize::new(0), last_done: Mutex::new(Instant::now()), requested: Notify::new() }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requested.notify_one();
        Busy(self.clone())
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    fn idle_for(&self) -> Option<Duration> {
        let since = *self.last_done.lock().unwrap_or_else(|p| p.into_inner());
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| since.elapsed())
    }

    /// When to look again: when the idle time would reach `limit`, or (while busy) `limit`
    /// from now.
    fn idle_deadline(&self, limit: Duration) -> Instant {
        let now = Instant::now();
        match self.idle_for() {
            Some(idle) => now + limit.saturating_sub(idle),
            None => now + limit,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The pause after each failed `accept`, and a log that cannot flood: while `accept` keeps
/// failing (out of descriptors, say), the pause doubles up to `MAX_PAUSE` and one warning per
/// `LOG_EVERY` says how many failures there were.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(5);

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// Records a failure; returns how long to wait before accepting again.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.failed_at(error, Instant::now())
    }

    fn failed_at(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        self.unlogged += 1;
        if self.logged_at.is_none_or(|at| now.duration_since(at) >= Self::LOG_EVERY) {
            tracing::warn!(error = %error, failures = self.unlogged, "accept failed; backing off");
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        self.pause = (self.pause * 2).clamp(Self::FIRST_PAUSE, Self::MAX_PAUSE);
        self.pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_to_a_second_and_log_once_per_period() {
        let mut backoff = AcceptBackoff::default();
        let error = std::io::Error::from_raw_os_error(24); // EMFILE
        let t0 = Instant::now();
        let pauses: Vec<Duration> = (0..12).map(|i| backoff.failed_at(&error, t0 + Duration::from_millis(i))).collect();
        assert_eq!(pauses[0], AcceptBackoff::FIRST_PAUSE);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), AcceptBackoff::MAX_PAUSE);
        // The first failure was logged; the 11 since wait for the next period.
        assert_eq!(backoff.unlogged, 11);
        backoff.failed_at(&error, t0 + AcceptBackoff::LOG_EVERY);
        assert_eq!(backoff.unlogged, 0, "logged again, with the count");
        backoff.succeeded();
        assert_eq!(backoff.failed_at(&error, t0 + AcceptBackoff::LOG_EVERY), AcceptBackoff::FIRST_PAUSE);
    }

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight() {
        let activity = Arc::new(Activity::new());
        let busy = activity.begin();
        assert_eq!(activity.idle_for(), None);
        drop(busy);
        assert!(activity.idle_for().unwrap() < Duration::from_secs(1));
        let limit = Duration::from_secs(10);
        assert!(activity.idle_deadline(limit) > Instant::now() + Duration::from_secs(9));
    }
}
