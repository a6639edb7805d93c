//! Receiving Slack events over Socket Mode, for workspaces configured with
//! `receive = "socket_mode"`: the gateway opens a WebSocket to Slack, so no public URL is
//! needed.
//!
//! Owns one app's connection loop: `apps.connections.open` with the app-level token (POST,
//! `Authorization: Bearer xapp-...`) gives a one-use `wss://` URL; Slack then sends envelopes
//! (`hello`, `events_api`, `interactive`, `slash_commands`, `disconnect`), and each envelope
//! with an `envelope_id` is acknowledged by sending `{"envelope_id": ...}` back. Payloads are
//! normalized by `inbound::envelope_events`, the webhook's own functions. Must not store
//! events (the sink does) nor read a payload itself.
//!
//! Durability: an envelope is acknowledged only after the sink said its events are durable.
//! Not acknowledged (sink full or failing, the loop dropped, the connection lost), Slack sends
//! it again, and the sink's dedupe recognises it. Envelopes are handled one at a time, so
//! their order is kept.
//!
//! Secrets: the app token goes only to `{api_base_url}/apps.connections.open`, and the
//! WebSocket URL carries a connection ticket; neither is logged or put in an error (errors
//! from the transport are scrubbed of both).

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::config::SlackConfig;
use super::inbound::envelope_events;
use super::render::CHANNEL_ID;
use crate::channels::http::{Http, parse_uri};
use crate::channels::shared::{is_loopback, retry_after, scrub_secrets};
use crate::inbound::{Sink, SinkError};
use crate::settings::Secret;

/// The largest WebSocket message taken (and frame): Slack's envelopes are some kilobytes; a
/// message of 40,000 characters with blocks stays far below this.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The longest `envelope_id` acknowledged: Slack's are UUIDs.
const MAX_ENVELOPE_ID_CHARS: usize = 255;
/// The longest error text kept from Slack or the transport.
const MAX_ERROR_CHARS: usize = 300;

/// A connection that ends sooner than this is followed by a pause before the next.
const SHORT_CONNECTION: Duration = Duration::from_secs(10);

/// How the loop waits. The defaults suit Slack; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// The first wait after a failed connection; it doubles with each failure in a row.
    pub backoff_first: Duration,
    /// The longest wait after a failure, and the cap on a `Retry-After` from Slack.
    pub backoff_max: Duration,
    /// `apps.connections.open` and the WebSocket handshake each within this.
    pub connect_timeout: Duration,
    /// A ping goes out after this long without a message from Slack; a connection silent for
    /// twice this long is dead and replaced.
    pub ping_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// Why a connection could not be opened or was lost. Its text never holds the app token nor
/// the WebSocket URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    /// Slack refused `apps.connections.open` (`invalid_auth`, `not_allowed_token_type`, ...):
    /// a person must fix the token or the app's settings.
    #[error("apps.connections.open refused: {0}")]
    Refused(String),
    /// Slack asks to wait (429).
    #[error("apps.connections.open rate limited")]
    RateLimited(Option<Duration>),
    /// The call, the handshake or the connection failed.
    #[error("{0}")]
    Transport(String),
}

/// One Slack app's Socket Mode connection, kept open until dropped.
pub struct SocketMode {
    http: Http,
    /// `{api_base_url}/apps.connections.open`.
    open_url: String,
    app_token: Secret,
    config: SlackConfig,
    timing: Timing,
}

impl SocketMode {
    pub fn new(config: &SlackConfig, app_token: Secret, timing: Timing) -> Result<Self, String> {
        Ok(Self {
            http: Http::new(timing.connect_timeout)?,
            open_url: config.method_url("apps.connections.open"),
            app_token,
            config: config.clone(),
            timing,
        })
    }

    /// Connects, receives and reconnects until dropped. Cancel-safe: see the module doc.
    pub async fn run(self, sink: Arc<dyn Sink>) {
        tracing::info!("slack: receiving over Socket Mode");
        let mut failures: u32 = 0;
        loop {
            let started = tokio::time::Instant::now();
            let wait = match self.connect_and_receive(sink.as_ref(), &mut failures).await {
                // Slack refreshes a connection every few hours: reconnect at once. A peer that
                // says hello and closes right away would otherwise be reconnected to in a tight
                // loop, so a short-lived connection waits first.
                Ok(()) if started.elapsed() < SHORT_CONNECTION => {
                    tracing::info!(
                        "slack: Socket Mode connection ended soon after it opened; reconnecting after a pause"
                    );
                    self.timing.backoff_first
                }
                Ok(()) => {
                    tracing::info!("slack: Socket Mode connection refreshed");
                    continue;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.wait_after(&e, failures)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Asks Slack for a WebSocket URL. The URL is a credential for one connection: it is
    /// returned, never shown.
    pub async fn open_connection(&self) -> Result<url::Url, SocketError> {
        let token = self.app_token.expose();
        let scrub = |s: String| {
            let mut s = scrub_secrets(s, [token]);
            crate::bounded::cap_owned(&mut s, MAX_ERROR_CHARS);
            s
        };
        let uri =
            parse_uri(&self.open_url).map_err(|e| SocketError::Transport(scrub(e.to_string())))?;
        let answer = self
            .http
            .send(http::Method::POST, uri, Some(token), None)
            .await
            .map_err(|e| {
                SocketError::Transport(scrub(format!("calling apps.connections.open: {e}")))
            })?;
        if answer.status == 429 {
            return Err(SocketError::RateLimited(retry_after(&answer.headers())));
        }
        let v: Value = serde_json::from_slice(&answer.body).map_err(|_| {
            SocketError::Transport(format!(
                "apps.connections.open answered HTTP {} without Slack's JSON",
                answer.status
            ))
        })?;
        if v.get("ok").and_then(Value::as_bool) != Some(true) {
            let error = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error code");
            return Err(SocketError::Refused(scrub(error.to_string())));
        }
        let url = v
            .get("url")
            .and_then(Value::as_str)
            .and_then(|u| url::Url::parse(u).ok())
            .ok_or_else(|| {
                SocketError::Transport("apps.connections.open gave no usable url".into())
            })?;
        // The ticket in it opens a connection that receives the app's events: clear text only
        // to this machine, as for every URL that receives a credential.
        let allowed = match url.scheme() {
            "wss" => true,
            "ws" => is_loopback(url.host_str().unwrap_or_default()),
            _ => false,
        };
        if !allowed || !url.username().is_empty() || url.password().is_some() {
            return Err(SocketError::Transport(
                "apps.connections.open gave a URL that is not wss:// (ws:// only to a loopback host)"
                    .into(),
            ));
        }
        Ok(url)
    }

    /// One connection: open it, then handle envelopes until it ends.
    async fn connect_and_receive(
        &self,
        sink: &dyn Sink,
        failures: &mut u32,
    ) -> Result<(), SocketError> {
        let url = self.open_connection().await?;
        let ticket = url.as_str().to_string();
        let scrub = |s: String| {
            let mut s = scrub_secrets(s, [ticket.as_str(), self.app_token.expose()]);
            if let Some(q) = url.query() {
                s = scrub_secrets(s, [q]);
            }
            crate::bounded::cap_owned(&mut s, MAX_ERROR_CHARS);
            s
        };
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            url.as_str(),
            Some(ws_config),
            true,
            None,
        );
        let (mut ws, _) = tokio::time::timeout(self.timing.connect_timeout, connect)
            .await
            .map_err(|_| SocketError::Transport("the WebSocket handshake timed out".into()))?
            .map_err(|e| SocketError::Transport(scrub(format!("WebSocket handshake: {e}"))))?;
        let mut pinged = false;
        // A connection that ends before Slack's `hello` counts as a failure: a peer that accepts
        // and closes at once must meet the backoff, not a reconnect loop.
        let mut greeted = false;
        let ended = |greeted: bool| {
            if greeted {
                Ok(())
            } else {
                Err(SocketError::Transport(
                    "the connection ended before Slack's hello".into(),
                ))
            }
        };
        loop {
            let next = tokio::time::timeout(self.timing.ping_interval, ws.next()).await;
            let msg = match next {
                Err(_) if pinged => {
                    return Err(SocketError::Transport(
                        "the connection went silent (no answer to a ping)".into(),
                    ));
                }
                Err(_) => {
                    pinged = true;
                    self.send(&mut ws, WsMessage::Ping(Default::default()), &scrub)
                        .await?;
                    continue;
                }
                Ok(None) => return ended(greeted),
                Ok(Some(Err(e))) => {
                    return Err(SocketError::Transport(scrub(format!("WebSocket: {e}"))));
                }
                Ok(Some(Ok(m))) => m,
            };
            pinged = false;
            let text = match msg {
                WsMessage::Text(t) => t,
                WsMessage::Close(_) => return ended(greeted),
                // Pings are answered by the WebSocket layer; binary is not Slack's.
                _ => continue,
            };
            let Ok(envelope) = serde_json::from_str::<Value>(text.as_str()) else {
                tracing::warn!("slack: a Socket Mode message that is not JSON was ignored");
                continue;
            };
            match envelope.get("type").and_then(Value::as_str) {
                Some("hello") => {
                    greeted = true;
                    *failures = 0;
                    tracing::debug!("slack: Socket Mode connected");
                }
                Some("disconnect") => {
                    let reason = envelope
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    tracing::debug!(reason = %crate::bounded::for_log(reason), "slack: Socket Mode asks to reconnect");
                    return ended(greeted);
                }
                Some(_) => {
                    if let Some(ack) = self.handle(sink, envelope).await {
                        self.send(&mut ws, WsMessage::Text(ack.into()), &scrub)
                            .await?;
                    }
                }
                None => {}
            }
        }
    }

    /// Sends one message, within the connect timeout: a peer that stops reading must not hold
    /// the loop.
    async fn send<S>(
        &self,
        ws: &mut S,
        msg: WsMessage,
        scrub: &impl Fn(String) -> String,
    ) -> Result<(), SocketError>
    where
        S: futures::Sink<WsMessage, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        match tokio::time::timeout(self.timing.connect_timeout, ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SocketError::Transport(scrub(format!("WebSocket: {e}")))),
            Err(_) => Err(SocketError::Transport(
                "the connection stopped taking what is sent".into(),
            )),
        }
    }

    /// One envelope: its events to the sink; the acknowledgement to send once they are
    /// durable, `None` when it must not be acknowledged (Slack then sends it again).
    async fn handle(&self, sink: &dyn Sink, mut envelope: Value) -> Option<String> {
        let kind = envelope
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let kind_log = crate::bounded::for_log(&kind).into_owned();
        let id = envelope
            .get("envelope_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.chars().count() <= MAX_ENVELOPE_ID_CHARS)?
            .to_string();
        let payload = envelope
            .get_mut("payload")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let ack = json!({ "envelope_id": id }).to_string();
        let events = match envelope_events(&self.config, &kind, payload) {
            // A type with nothing to deliver: acknowledged, as the webhook answers 200.
            None => return Some(ack),
            Some(Ok(events)) => events,
            Some(Err(e)) => {
                // As the webhook answers 400: not acknowledged.
                tracing::warn!(kind = %kind_log, error = %crate::bounded::for_log(&e.to_string()), "slack: a Socket Mode envelope was unreadable");
                return None;
            }
        };
        if events.is_empty() {
            return Some(ack);
        }
        let count = events.len();
        match sink.append(CHANNEL_ID, events).await {
            Ok(()) => {
                tracing::debug!(kind = %kind_log, count, "slack: Socket Mode events stored");
                Some(ack)
            }
            Err(SinkError::Full { .. }) => {
                tracing::debug!(kind = %kind_log, "slack: the inbox is full; the envelope is left for Slack to resend");
                None
            }
            Err(SinkError::Failed(e)) => {
                tracing::error!(kind = %kind_log, error = %crate::bounded::for_log(&e), "slack: Socket Mode events not stored; left for Slack to resend");
                None
            }
        }
    }

    fn wait_after(&self, e: &SocketError, failures: u32) -> Duration {
        let backoff = self
            .timing
            .backoff_first
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.timing.backoff_max);
        let error = crate::bounded::for_log(&e.to_string()).into_owned();
        match e {
            SocketError::Refused(code) if needs_a_person(code) => {
                tracing::error!(error = %error, "slack: Socket Mode cannot connect: check the workspace's app_token (an xapp- token with connections:write) and that Socket Mode is on for the app");
                self.timing.backoff_max
            }
            SocketError::Refused(_) => {
                tracing::warn!(error = %error, wait = ?backoff, "slack: apps.connections.open failed");
                backoff
            }
            SocketError::RateLimited(after) => {
                let wait = after.map_or(backoff, |a| a.min(self.timing.backoff_max).max(backoff));
                tracing::warn!(?wait, "slack: apps.connections.open rate limited");
                wait
            }
            SocketError::Transport(_) => {
                tracing::warn!(error = %error, wait = ?backoff, "slack: Socket Mode connection failed");
                backoff
            }
        }
    }
}

/// Whether Slack's refusal of `apps.connections.open` is about the token or the app's settings
/// (a person must act) rather than a passing failure (`internal_error`, `fatal_error`, ...).
fn needs_a_person(code: &str) -> bool {
    const CODES: [&str; 10] = [
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "not_allowed_token_type",
        "missing_scope",
        "no_permission",
        "access_denied",
        "app_missing_action_url",
    ];
    CODES.iter().any(|c| code.starts_with(c))
}
