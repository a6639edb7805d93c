//! Test harness for the Slack channel: a fake Slack Web API on 127.0.0.1 that records every
//! request (path, headers, body) and answers as scripted, and an in-process gateway pointed at it
//! and reached by a real gRPC client over TCP.
#![allow(dead_code)]
#[path = "../fake_http/mod.rs"]
pub mod fake_http;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::channels::slack::config::SlackWorkspace;
use channel_gateway::config::{Config, Secret};
use channel_gateway::server::RunningGateway;

pub const BOT: &str = "B0TESTBOT";
pub const TOKEN: &str = "xoxb-1111-2222-test-token-never-shown";
pub const USER: &str = "U0TESTUSER";

/// One request the fake received, and how it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// `/api/chat.postMessage`, `/api/conversations.open`.
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    /// The HTTP status answered and whether the answer was `ok: true`.
    pub status: u16,
    pub ok: bool,
}

impl Received {
    pub fn channel(&self) -> &str {
        self.body
            .get("channel")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn text(&self) -> &str {
        self.body.get("text").and_then(Value::as_str).unwrap_or("")
    }
    pub fn is_post(&self) -> bool {
        self.path.ends_with("/chat.postMessage")
    }
}

/// A scripted answer for the next request to a Slack channel.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl Scripted {
    /// HTTP 200 with `{"ok": false, "error": code}`, as Slack refuses.
    pub fn refuse(code: &str) -> Self {
        Self {
            status: 200,
            body: json!({"ok": false, "error": code}),
            retry_after: None,
        }
    }
    pub fn rate_limited(secs: u64) -> Self {
        Self {
            status: 429,
            body: json!({"ok": false, "error": "ratelimited"}),
            retry_after: Some(secs),
        }
    }
}

#[derive(Default)]
pub struct FakeState {
    pub received: Mutex<Vec<Received>>,
    /// Slack channel id -> answers to give before answering normally.
    pub script: Mutex<HashMap<String, Vec<Scripted>>>,
    /// Slack channel id -> latency of each answer.
    pub latency: Mutex<HashMap<String, Duration>>,
    /// Slack channel id -> how long the answer waits after the call took effect (as a Slack
    /// whose answer is slow: a client gone meanwhile does not undo the call).
    pub late_answer: Mutex<HashMap<String, Duration>>,
    /// Requests in flight per Slack channel now, and the most ever seen.
    pub in_flight: fake_http::InFlight,
    pub next_ts: AtomicU64,
    pub opened: AtomicU64,
    /// What each channel shows now: (ts, text) of every message posted and not deleted, as
    /// chat.update left it. Slack's `ts` orders a channel's messages.
    pub shown: Mutex<std::collections::BTreeMap<(String, String), String>>,
}

#[derive(Clone)]
pub struct FakeSlack {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeSlack {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .route("/api/{method}", post(method))
            .with_state(state.clone());
        let addr = fake_http::serve(app).await;
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Messages Slack accepted in one channel, in arrival order.
    pub fn posted(&self, channel: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.is_post() && r.ok && r.channel() == channel)
            .collect()
    }

    /// What `channel` shows now, in Slack's order: (ts, text).
    pub fn shown(&self, channel: &str) -> Vec<(String, String)> {
        self.state
            .shown
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), _)| c == channel)
            .map(|((_, ts), text)| (ts.clone(), text.clone()))
            .collect()
    }

    /// Requests of one Web API method that Slack accepted, in arrival order.
    pub fn calls(&self, method: &str) -> Vec<Received> {
        let path = format!("/api/{method}");
        self.received()
            .into_iter()
            .filter(|r| r.path == path && r.ok)
            .collect()
    }

    pub fn script(&self, channel: &str, answers: Vec<Scripted>) {
        self.state
            .script
            .lock()
            .unwrap()
            .insert(channel.into(), answers);
    }

    pub fn set_latency(&self, channel: &str, d: Duration) {
        self.state.latency.lock().unwrap().insert(channel.into(), d);
    }

    /// Each call to `channel` takes effect (and is recorded) at once, and is answered `d` later.
    pub fn set_late_answer(&self, channel: &str, d: Duration) {
        self.state
            .late_answer
            .lock()
            .unwrap()
            .insert(channel.into(), d);
    }

    pub fn max_in_flight(&self, channel: &str) -> u32 {
        self.state.in_flight.max(channel)
    }

    /// Waits until `pred` holds for what was received, or panics after `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        fake_http::wait_for(within, what, || self.received(), pred).await;
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(String::from)
}

async fn method(
    State(s): State<Arc<FakeState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let channel = match method.as_str() {
        "conversations.open" => "conversations.open".to_string(),
        _ => body
            .get("channel")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    s.in_flight.enter(&channel);
    let latency = s.latency.lock().unwrap().get(&channel).copied();
    if let Some(d) = latency {
        tokio::time::sleep(d).await;
    }
    let scripted = {
        let mut sc = s.script.lock().unwrap();
        sc.get_mut(&channel)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
    };
    let (status, answer, retry_after) = match (scripted, method.as_str()) {
        (Some(sc), _) => (sc.status, sc.body, sc.retry_after),
        (None, "conversations.open") => {
            let n = s.opened.fetch_add(1, Ordering::SeqCst) + 1;
            (
                200,
                json!({"ok": true, "channel": {"id": format!("D0OPENED{n}")}}),
                None,
            )
        }
        (None, "chat.postMessage") => {
            let n = s.next_ts.fetch_add(1, Ordering::SeqCst) + 1;
            let ts = format!("1700000000.{n:06}");
            let text = body.get("text").and_then(Value::as_str).unwrap_or_default();
            s.shown
                .lock()
                .unwrap()
                .insert((channel.clone(), ts.clone()), text.to_string());
            (
                200,
                json!({"ok": true, "channel": channel, "ts": ts, "message": {"ts": ts, "text": body.get("text")}}),
                None,
            )
        }
        // As Slack does: the message must exist in that channel (by its ts).
        (None, "chat.update" | "chat.delete") => {
            let ts = body
                .get("ts")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut shown = s.shown.lock().unwrap();
            let key = (channel.clone(), ts.clone());
            match shown.get_mut(&key) {
                None => (
                    200,
                    json!({"ok": false, "error": "message_not_found"}),
                    None,
                ),
                Some(text) if method == "chat.update" => {
                    *text = body
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    (
                        200,
                        json!({"ok": true, "channel": channel, "ts": ts, "text": body.get("text")}),
                        None,
                    )
                }
                Some(_) => {
                    shown.remove(&key);
                    (200, json!({"ok": true, "channel": channel, "ts": ts}), None)
                }
            }
        }
        (None, _) => (200, json!({"ok": false, "error": "unknown_method"}), None),
    };
    let ok = status == 200 && answer.get("ok") == Some(&Value::Bool(true));
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        path: format!("/api/{method}"),
        authorization: header(&headers, "authorization"),
        content_type: header(&headers, "content-type"),
        body,
        status,
        ok,
    });
    let mut resp = (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    let late = s.late_answer.lock().unwrap().get(&channel).copied();
    if let Some(d) = late {
        tokio::time::sleep(d).await;
    }
    s.in_flight.leave(&channel);
    resp
}

/// A gateway config pointing at the fake: one workspace with a bot token, a rate high enough
/// not to slow tests that are not about it, short retry delays.
pub fn config_for(fake: &FakeSlack) -> Config {
    let mut c = fake_http::gateway_config();
    let s = &mut c.channels.slack;
    s.api_base_url = fake.base_url();
    s.workspaces = vec![SlackWorkspace {
        bot_id: BOT.into(),
        token: Secret::new(TOKEN),
        team_id: None,
        signing_secret: None,
        receive: Default::default(),
        app_token: None,
    }];
    s.rate_per_second = 1000.0;
    s.rate_burst = 1000;
    c.delivery.max_retry_delay = Duration::from_secs(5);
    c
}

pub struct Harness {
    pub fake: FakeSlack,
    pub gateway: RunningGateway,
    pub client: ChannelGatewayClient<tonic::transport::Channel>,
}

pub async fn start() -> Harness {
    let fake = FakeSlack::start().await;
    let (gateway, client) = fake_http::start_gateway(config_for(&fake)).await;
    Harness {
        fake,
        gateway,
        client,
    }
}

impl Harness {
    pub fn address(&self, channel: &str) -> pb::Address {
        pb::Address {
            channel_id: "slack".into(),
            user: Some(pb::Identity {
                id: USER.into(),
                name: "Ada".into(),
                ..Default::default()
            }),
            bot: Some(pb::Identity {
                id: BOT.into(),
                name: "helper".into(),
                ..Default::default()
            }),
            conversation: (!channel.is_empty()).then(|| pb::ConversationAccount {
                id: channel.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn text(&self, channel: &str, text: &str) -> pb::Message {
        pb::Message {
            address: Some(Box::new(self.address(channel))),
            text: text.into(),
            ..Default::default()
        }
    }

    pub async fn send(
        &self,
        message: pb::Message,
        wait: pb::WaitMode,
    ) -> Result<pb::SendResponse, tonic::Status> {
        self.client
            .clone()
            .send(pb::SendRequest {
                message: Some(message),
                wait: wait as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// Each request a Render answer shows: its Web API method (the URL's last segment) and one
/// string field of its body (empty when absent).
pub fn method_and_field(r: &pb::RenderResponse, field: &str) -> Vec<(String, String)> {
    r.requests
        .iter()
        .map(|q| {
            let body: serde_json::Value = serde_json::from_str(&q.body_json).unwrap();
            (
                q.url.rsplit('/').next().unwrap_or_default().to_string(),
                body[field].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
