//! The webhook listener: one axum router over every channel's inbound paths.
//!
//! A call goes: exact path → its channel's `Inbound` → `verify` over the exact bytes (refused:
//! 401, no detail on the wire, the reason in the log and in `inbound_refused_total`) → `parse`
//! (unreadable: 400) → the sink appends the events durably → the channel's expected answer, or
//! an empty 200. The channel never waits for a bot: the sink's append is the only wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http_body_util::BodyExt;

use crate::channels::Channels;
use crate::channels::channel::{Channel, InboundEvent, Reply, WebhookError, WebhookRequest};
use tokio::sync::oneshot;

/// Where verified events go: the inbox. `Ok` means durable: the listener answers 2xx after it,
/// and a channel retry of the same events must be recognised there (by `dedupe_key`).
pub trait Sink: Send + Sync + 'static {
    fn append<'a>(
        &'a self,
        channel: &'a str,
        events: Vec<InboundEvent>,
    ) -> BoxFuture<'a, Result<(), SinkError>>;

    /// Stores one event the channel waits on (a slash command, an invoke) and returns where
    /// the bot's answer will come, until `reply_by_ms`. `None`: nobody can answer (a retry of a
    /// stored event, or a sink that streams to no bot); the channel gets the neutral answer.
    fn append_awaiting<'a>(
        &'a self,
        channel: &'a str,
        event: InboundEvent,
        reply_by_ms: u64,
    ) -> BoxFuture<'a, Result<Option<oneshot::Receiver<Answering>>, SinkError>> {
        let _ = reply_by_ms;
        Box::pin(async move { self.append(channel, vec![event]).await.map(|()| None) })
    }
}

/// A bot's answer to an event the channel waits on, on its way to the HTTP answer; `used` says
/// whether it was written (or why not).
#[derive(Debug)]
pub struct Answering {
    pub reply: Reply,
    pub used: oneshot::Sender<Result<(), String>>,
}

/// Why the sink did not take events: the channel is told to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Full: 503 with `Retry-After`, so the channel tries again later.
    #[error("the inbox is full")]
    Full { retry_after: Duration },
    /// Storage failed: 500, and the channel retries.
    #[error("the inbox failed: {0}")]
    Failed(String),
}

/// A refusal counted by channel and reason (both from fixed sets).
pub type RefusalCounter = Arc<dyn Fn(&str, &'static str) + Send + Sync>;

/// The listener's routes: every inbound path of every channel that receives.
pub struct InboundRouter {
    routes: HashMap<String, Arc<dyn Channel>>,
}

/// What a route needs at call time.
struct Shared {
    router: InboundRouter,
    sink: Arc<dyn Sink>,
    max_body_bytes: usize,
    read_timeout: Duration,
    refused: RefusalCounter,
}

impl InboundRouter {
    /// The routes of `channels`. Two channels claiming one path is a configuration error.
    pub fn new(channels: &Channels) -> Result<Self, String> {
        let mut routes = HashMap::new();
        for ch in channels.receivers() {
            let Some(inbound) = ch.inbound() else {
                continue;
            };
            for path in inbound.paths() {
                if routes.insert(path.clone(), ch.clone()).is_some() {
                    return Err(format!(
                        "inbound path `{}` is claimed twice",
                        crate::bounded::for_log(&path)
                    ));
                }
            }
        }
        Ok(Self { routes })
    }

    /// The paths served, sorted (for the startup log).
    pub fn paths(&self) -> Vec<String> {
        let mut p: Vec<String> = self.routes.keys().cloned().collect();
        p.sort();
        p
    }
}

/// The listener's bounds (the `[inbound]` section).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// How long a call has to send its headers, and then its body.
    pub read_timeout: Duration,
    /// Open connections at once; past it a new one is closed at once.
    pub max_connections: usize,
}

/// Serves the webhook routes on `listener` until `shutdown`, then lets calls in progress finish.
/// A call's headers and body must each arrive within `read_timeout` and the body stay within
/// `max_body_bytes`, so a slow or endless client holds nothing for long; at most
/// `max_connections` are open at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: InboundRouter,
    sink: Arc<dyn Sink>,
    limits: Limits,
    refused: RefusalCounter,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let shared = Arc::new(Shared {
        router,
        sink,
        max_body_bytes: limits.max_body_bytes,
        read_timeout: limits.read_timeout,
        refused,
    });
    let app = axum::Router::new().fallback(handle).with_state(shared);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    // Out of file descriptors, most often: wait instead of spinning a core.
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: closing at once is cheaper for both sides than queueing; the channel retries.
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = limits.read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(Body::new))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    // Calls in progress finish (their events may be on their way to the inbox); new ones find
    // the port closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        limits.read_timeout.saturating_mul(2),
        slots.acquire_many(all),
    )
    .await;
    Ok(())
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let arrived = tokio::time::Instant::now();
    let (parts, body) = req.into_parts();
    let Some((ch, inbound)) = shared
        .router
        .routes
        .get(parts.uri.path())
        .and_then(|ch| ch.inbound().map(|i| (ch, i)))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let channel = ch.name();
    // The body within its bound and its time: a slow or endless client holds nothing for long.
    let collect = http_body_util::Limited::new(body, shared.max_body_bytes).collect();
    let body = match tokio::time::timeout(shared.read_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            (shared.refused)(channel, "body too large or cut");
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        }
        Err(_) => {
            (shared.refused)(channel, "body too slow");
            return StatusCode::REQUEST_TIMEOUT.into_response();
        }
    };
    let received_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let call = WebhookRequest {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &body,
        received_at,
    };
    if let Err(e) = inbound.verify(&call).await {
        let reason = match e {
            WebhookError::Unverified(r) => r,
            WebhookError::Unreadable(_) => "unreadable credentials",
        };
        (shared.refused)(channel, reason);
        tracing::warn!(channel = %channel, reason, "inbound call refused");
        // No detail on the wire: a prober learns nothing from the answer.
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let parsed = match inbound.parse(&call) {
        Ok(p) => p,
        Err(e) => {
            (shared.refused)(channel, "unreadable");
            tracing::warn!(channel = %channel, error = %crate::bounded::for_log(&e.to_string()), "inbound call unreadable");
            return StatusCode::BAD_REQUEST.into_response();
        }
    };
    let mut answer = parsed.answer;
    if let (Some(window), 1) = (parsed.reply, parsed.events.len()) {
        // The channel shows the bot's answer if it comes in time: wait for it (never past the
        // window), else give the neutral answer.
        let by = arrived.checked_add(window.within).unwrap_or(arrived);
        let by_ms = crate::outbox::now_ms().saturating_add(
            by.saturating_duration_since(tokio::time::Instant::now())
                .as_millis() as u64,
        );
        let Some(event) = parsed.events.into_iter().next() else {
            return StatusCode::OK.into_response();
        };
        let waiting = match shared.sink.append_awaiting(channel, event, by_ms).await {
            Ok(w) => w,
            Err(e) => return not_stored(channel, e),
        };
        if let Some(rx) = waiting
            && let Ok(Ok(a)) = tokio::time::timeout_at(by, rx).await
        {
            match inbound.answer(window.kind, &a.reply) {
                Ok(rendered) => {
                    let _ = a.used.send(Ok(()));
                    answer = Some(rendered);
                }
                Err(e) => {
                    let _ = a.used.send(Err(crate::bounded::cap(&e, 300).into_owned()));
                }
            }
        }
    } else if !parsed.events.is_empty() {
        let count = parsed.events.len();
        match shared.sink.append(channel, parsed.events).await {
            Ok(()) => tracing::debug!(channel = %channel, count, "inbound events stored"),
            Err(e) => return not_stored(channel, e),
        }
    }
    match answer {
        Some(a) => Response::builder()
            .status(StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK))
            .header(header::CONTENT_TYPE, a.content_type)
            .body(Body::from(Bytes::from(a.body)))
            .unwrap_or_else(|_| StatusCode::OK.into_response()),
        None => StatusCode::OK.into_response(),
    }
}

/// The answer when the sink did not take the events: the channel retries.
fn not_stored(channel: &str, e: SinkError) -> Response {
    match e {
        SinkError::Full { retry_after } => {
            let mut r = StatusCode::SERVICE_UNAVAILABLE.into_response();
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        SinkError::Failed(e) => {
            tracing::error!(channel = %channel, error = %crate::bounded::for_log(&e), "inbound events not stored");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
