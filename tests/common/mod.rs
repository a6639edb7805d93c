//! Test harness: a fake Bot Framework Connector (and token endpoint) on 127.0.0.1 that records
//! what it receives and keeps what each conversation shows (activities posted, as PUT and DELETE
//! of an activity changed them), and an in-process gateway reached by a real gRPC client over
//! TCP.
#![allow(dead_code)]
#[path = "../fake_http/mod.rs"]
mod fake_http;
#[allow(unused_imports)]
pub use fake_http::{pg, start_gateway};

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
use channel_gateway::config::{BotCredentials, Config, Secret};
use channel_gateway::server::RunningGateway;

pub const BOT: &str = "bot-app-1";
pub const PASSWORD: &str = "s3cret-password-for-tests";

/// One request the fake connector accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// `POST`, or `PUT` / `DELETE` of an activity.
    pub method: &'static str,
    /// `/v3/conversations/{id}/activities[/{reply}]`, `/v3/conversations`, or
    /// `/v3/conversations/{id}/activities/{activityId}` for a PUT or DELETE.
    pub path: String,
    pub conversation: String,
    pub reply_to: Option<String>,
    /// The activity a PUT or DELETE changed.
    pub activity: Option<String>,
    pub authorization: Option<String>,
    pub body: Value,
}

impl Received {
    pub fn text(&self) -> &str {
        self.body.get("text").and_then(Value::as_str).unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.body.get("type").and_then(Value::as_str).unwrap_or("")
    }
    /// A POST of a new activity (not a change of one).
    pub fn is_post(&self) -> bool {
        self.method == "POST"
    }
}

/// A scripted answer for the next call to a conversation.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

#[derive(Default)]
pub struct FakeState {
    pub received: Mutex<Vec<Received>>,
    /// Conversation id -> latency of each answer.
    pub latency: Mutex<HashMap<String, Duration>>,
    /// Random latency in [0, max] for every answer.
    pub jitter_max: Mutex<Duration>,
    /// Conversation id -> answers to give before answering normally.
    pub script: Mutex<HashMap<String, Vec<Scripted>>>,
    /// Activities in flight per conversation now, and the most ever seen.
    pub in_flight: fake_http::InFlight,
    pub token_requests: Mutex<Vec<String>>,
    /// Scripted refusals given: when, and to which conversation.
    pub refused: Mutex<Vec<(Instant, String)>>,
    /// Random faults for this share of activity POSTs (0.0 = none).
    pub fault_rate: Mutex<f64>,
    /// With faults on: how long a "slow" answer takes (beyond the gateway's timeout).
    pub slow_answer: Mutex<Duration>,
    /// The faults to choose from, each equally likely (a kind may be named twice); empty: the
    /// mix [`fault`] describes.
    pub fault_kinds: Mutex<Vec<&'static str>>,
    /// Faults given: when, which (`429`, `500`, `slow`, `drop`), and to which conversation.
    pub faults: Mutex<Vec<(Instant, &'static str, String)>>,
    /// Every activity request as it arrived (before any fault), and its conversation, for
    /// pause checks.
    pub arrivals: Mutex<Vec<(Instant, String)>>,
    pub token_expires_in: Mutex<u64>,
    pub next_id: AtomicU64,
    pub created: AtomicU64,
    /// What each conversation shows now: (activity id, text) of every activity posted and not
    /// deleted, in posting order, as PUTs left it.
    pub shown: Mutex<HashMap<String, Vec<(String, String)>>>,
}

#[derive(Clone)]
pub struct FakeConnector {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeConnector {
    /// A Teams conversation `conv` of the test bot, served by this fake.
    pub fn address(&self, conv: &str) -> pb::Address {
        pb::Address {
            channel_id: "msteams".into(),
            user: Some(pb::Identity {
                id: "29:user-1".into(),
                name: "Ada".into(),
                ..Default::default()
            }),
            bot: Some(pb::Identity {
                id: BOT.into(),
                name: "Bot".into(),
                ..Default::default()
            }),
            conversation: Some(pb::ConversationAccount {
                id: conv.into(),
                ..Default::default()
            }),
            service_url: self.service_url(),
            id: String::new(),
            thread_id: String::new(),
        }
    }

    /// A text message to conversation `conv`.
    pub fn text(&self, conv: &str, text: &str) -> pb::Message {
        pb::Message {
            address: Some(Box::new(self.address(conv))),
            text: text.into(),
            ..Default::default()
        }
    }

    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        *state.token_expires_in.lock().unwrap() = 3600;
        let app = Router::new()
            .route("/token", post(token))
            .route("/v3/conversations", post(create))
            .route("/v3/conversations/{conv}/activities", post(activity))
            .route(
                "/v3/conversations/{conv}/activities/{reply}",
                post(reply).put(update).delete(remove),
            )
            .with_state(state.clone());
        let addr = fake_http::serve(app).await;
        Self { addr, state }
    }

    pub fn service_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Activities received for one conversation, in arrival order.
    pub fn for_conversation(&self, conv: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.conversation == conv)
            .collect()
    }

    /// What conversation `conv` shows now: (activity id, text), in posting order.
    pub fn shown(&self, conv: &str) -> Vec<(String, String)> {
        self.state
            .shown
            .lock()
            .unwrap()
            .get(conv)
            .cloned()
            .unwrap_or_default()
    }

    /// The accepted requests of one method (`POST`, `PUT`, `DELETE`), in arrival order.
    pub fn calls(&self, method: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.method == method)
            .collect()
    }

    /// The texts received for one conversation, in arrival order.
    pub fn texts(&self, conv: &str) -> Vec<String> {
        self.for_conversation(conv)
            .iter()
            .map(|r| r.text().to_string())
            .collect()
    }

    pub fn set_latency(&self, conv: &str, d: Duration) {
        self.state.latency.lock().unwrap().insert(conv.into(), d);
    }

    pub fn set_jitter(&self, max: Duration) {
        *self.state.jitter_max.lock().unwrap() = max;
    }

    pub fn script(&self, conv: &str, answers: Vec<Scripted>) {
        self.state
            .script
            .lock()
            .unwrap()
            .insert(conv.into(), answers);
    }

    pub fn max_in_flight(&self, conv: &str) -> u32 {
        self.state.in_flight.max(conv)
    }

    pub fn token_requests(&self) -> usize {
        self.state.token_requests.lock().unwrap().len()
    }

    /// Waits until `pred` holds for what was received, or panics after `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        fake_http::wait_for(within, what, || self.received(), pred).await;
    }
}

async fn token(State(s): State<Arc<FakeState>>, body: String) -> Json<Value> {
    let n = {
        let mut t = s.token_requests.lock().unwrap();
        t.push(body);
        t.len()
    };
    let expires = *s.token_expires_in.lock().unwrap();
    Json(json!({"token_type": "Bearer", "access_token": format!("tok-{n}"), "expires_in": expires}))
}

async fn create(
    State(s): State<Arc<FakeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let n = s.created.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("created:{n}");
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        method: "POST",
        path: "/v3/conversations".into(),
        conversation: String::new(),
        reply_to: None,
        activity: None,
        authorization: auth(&headers),
        body,
    });
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

fn auth(h: &HeaderMap) -> Option<String> {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// What an activity request does.
enum Op {
    /// Posts a new activity (answering `reply_to`, if any).
    Post {
        reply_to: Option<String>,
    },
    /// Replaces the activity with the body.
    Put(String),
    Delete(String),
}

async fn activity(
    State(s): State<Arc<FakeState>>,
    Path(conv): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    handle(s, conv, Op::Post { reply_to: None }, headers, body).await
}

async fn reply(
    State(s): State<Arc<FakeState>>,
    Path((conv, reply)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let op = Op::Post {
        reply_to: Some(reply),
    };
    handle(s, conv, op, headers, body).await
}

async fn update(
    State(s): State<Arc<FakeState>>,
    Path((conv, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    handle(s, conv, Op::Put(id), headers, body).await
}

/// A DELETE carries no body.
async fn remove(
    State(s): State<Arc<FakeState>>,
    Path((conv, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    handle(s, conv, Op::Delete(id), headers, Value::Null).await
}

/// Teams' answer for an activity that is not in the conversation (its status-code table).
fn activity_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "ActivityNotFoundInConversation", "message": "Conversation not found."}})),
    )
        .into_response()
}

async fn handle(
    s: Arc<FakeState>,
    conv: String,
    op: Op,
    headers: HeaderMap,
    body: Value,
) -> Response {
    s.arrivals
        .lock()
        .unwrap()
        .push((Instant::now(), conv.clone()));
    let rate = *s.fault_rate.lock().unwrap();
    if let Op::Post { reply_to } = &op
        && rate > 0.0
        && rand::random::<f64>() < rate
    {
        return fault(&s, conv, reply_to.clone(), headers, body).await;
    }
    let in_flight = s.in_flight.track(&conv);
    let latency = s.latency.lock().unwrap().get(&conv).copied();
    let jitter = *s.jitter_max.lock().unwrap();
    let wait = latency.unwrap_or_else(|| {
        if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(rand::random::<f64>())
        }
    });
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let scripted = {
        let mut sc = s.script.lock().unwrap();
        sc.get_mut(&conv).and_then(|v| {
            if v.is_empty() {
                None
            } else {
                Some(v.remove(0))
            }
        })
    };
    let (method, path, reply_to, activity) = match &op {
        Op::Post { reply_to: Some(r) } => (
            "POST",
            format!("/v3/conversations/{conv}/activities/{r}"),
            Some(r.clone()),
            None,
        ),
        Op::Post { reply_to: None } => (
            "POST",
            format!("/v3/conversations/{conv}/activities"),
            None,
            None,
        ),
        Op::Put(id) | Op::Delete(id) => (
            if matches!(op, Op::Put(_)) {
                "PUT"
            } else {
                "DELETE"
            },
            format!("/v3/conversations/{conv}/activities/{id}"),
            None,
            Some(id.clone()),
        ),
    };
    let rec = Received {
        at: Instant::now(),
        method,
        path,
        conversation: conv.clone(),
        reply_to,
        activity,
        authorization: auth(&headers),
        body,
    };
    let resp = match scripted {
        Some(sc) => {
            // Refused requests are not recorded as received activities.
            s.refused
                .lock()
                .unwrap()
                .push((Instant::now(), conv.clone()));
            let mut r = (StatusCode::from_u16(sc.status).unwrap(), Json(sc.body)).into_response();
            if let Some(secs) = sc.retry_after {
                r.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            r
        }
        None => answer(&s, &conv, op, rec),
    };
    drop(in_flight);
    resp
}

/// The answer to an activity request that is not refused, as the Connector gives it: a POST
/// adds an activity, a PUT or DELETE needs the activity to be in the conversation (404
/// otherwise, not recorded as received). A PUT answers the activity's id, a DELETE nothing.
fn answer(s: &FakeState, conv: &str, op: Op, rec: Received) -> Response {
    let mut shown = s.shown.lock().unwrap();
    let activities = shown.entry(conv.to_string()).or_default();
    let resp = match op {
        Op::Post { .. } => {
            let id = format!("activity-{}", s.next_id.fetch_add(1, Ordering::SeqCst) + 1);
            activities.push((id.clone(), rec.text().to_string()));
            (StatusCode::OK, Json(json!({ "id": id }))).into_response()
        }
        Op::Put(id) | Op::Delete(id) => {
            let Some(at) = activities.iter().position(|(a, _)| *a == id) else {
                s.refused
                    .lock()
                    .unwrap()
                    .push((Instant::now(), conv.to_string()));
                return activity_not_found();
            };
            if rec.method == "PUT" {
                activities[at].1 = rec.text().to_string();
                (StatusCode::OK, Json(json!({ "id": id }))).into_response()
            } else {
                activities.remove(at);
                StatusCode::OK.into_response()
            }
        }
    };
    drop(shown);
    s.received.lock().unwrap().push(rec);
    resp
}

/// One random fault: 429 with Retry-After, 500, an answer slower than the gateway's timeout
/// (the activity took effect), or a connection dropped mid-answer (it did not).
async fn fault(
    s: &Arc<FakeState>,
    conv: String,
    reply_to: Option<String>,
    headers: HeaderMap,
    body: Value,
) -> Response {
    let kinds = s.fault_kinds.lock().unwrap().clone();
    let kind = match kinds.len() {
        0 => match rand::random::<u32>() % 10 {
            0 => "429",
            1..=4 => "500",
            5..=7 => "slow",
            _ => "drop",
        },
        n => kinds[rand::random::<u32>() as usize % n],
    };
    s.faults
        .lock()
        .unwrap()
        .push((Instant::now(), kind, conv.clone()));
    match kind {
        "429" => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {"code": "TooManyRequests", "message": "slow down"}})),
            )
                .into_response();
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            r
        }
        "500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"code": "ServiceError", "message": "try later"}})),
        )
            .into_response(),
        "slow" => {
            let id = s.next_id.fetch_add(1, Ordering::SeqCst) + 1;
            let path = format!("/v3/conversations/{conv}/activities");
            let text = body.get("text").and_then(Value::as_str).unwrap_or("");
            s.shown
                .lock()
                .unwrap()
                .entry(conv.clone())
                .or_default()
                .push((format!("activity-{id}"), text.to_string()));
            s.received.lock().unwrap().push(Received {
                at: Instant::now(),
                method: "POST",
                path,
                conversation: conv,
                reply_to,
                activity: None,
                authorization: auth(&headers),
                body,
            });
            let wait = *s.slow_answer.lock().unwrap();
            tokio::time::sleep(wait).await;
            (
                StatusCode::OK,
                Json(json!({"id": format!("activity-{id}")})),
            )
                .into_response()
        }
        _ => {
            // Headers go out, then the body fails: the client sees the connection break.
            let stream = futures::stream::once(async {
                Err::<axum::body::Bytes, std::io::Error>(std::io::Error::other("dropped"))
            });
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(axum::body::Body::from_stream(stream))
                .unwrap()
        }
    }
}

/// A gateway config pointing at the fake: loopback allowed, one bot with credentials.
pub fn config_for(fake: &FakeConnector) -> Config {
    let mut c = fake_http::gateway_config();
    // The durable outbox: `start_with` gives each test its own directory.
    c.outbox.backend = channel_gateway::config::OutboxConfig::default().backend;
    let bf = &mut c.channels.botframework;
    bf.allowed_service_hosts = vec!["127.0.0.1:*".into()];
    bf.token_url = format!("http://127.0.0.1:{}/token", fake.addr.port());
    bf.bots = vec![BotCredentials {
        app_id: BOT.into(),
        app_password: Secret::new(PASSWORD),
    }];
    // The fake is not Teams: tests send one conversation many messages at once, faster than
    // Teams' documented budgets allow (tests that check the pacing turn it on).
    c.channels.botframework.teams_pacing = false;
    c
}

pub struct Harness {
    pub fake: FakeConnector,
    pub gateway: RunningGateway,
    pub client: ChannelGatewayClient<tonic::transport::Channel>,
    /// The durable outbox's directory, removed when the harness goes.
    pub data_dir: tempfile::TempDir,
    _watchdog: Watchdog,
}

/// How long one test may run (from its harness, or its own watchdog, to their drop). The
/// slowest test takes ~16 s on a loaded 2-core machine; a hung one once used all of CI's 90
/// minutes and hid every other result.
const TEST_BOUND: std::time::Duration = std::time::Duration::from_secs(240);

/// Ends the test process, naming the test, if it is still alive after `TEST_BOUND`: a hang then
/// fails within minutes, with its name, instead of running until CI's budget is gone.
pub struct Watchdog {
    /// Dropped with the watchdog, which wakes its thread with `Disconnected`: it ends quietly.
    _alive: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    pub fn start() -> Self {
        use std::io::Write;
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(TEST_BOUND) {
                // Straight to stderr: the test harness captures `eprintln!` and would lose it.
                let _ = writeln!(
                    std::io::stderr(),
                    "{test} has run for more than {TEST_BOUND:?}: it hangs; aborting"
                );
                std::process::exit(101);
            }
        });
        Watchdog { _alive: tx }
    }
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
    let watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&fake);
    config.outbox.data_dir = data_dir.path().to_path_buf();
    tweak(&mut config);
    let (gateway, client) = fake_http::start_gateway(config).await;
    Harness {
        fake,
        gateway,
        client,
        data_dir,
        _watchdog: watchdog,
    }
}

impl Harness {
    pub fn address(&self, conv: &str) -> pb::Address {
        self.fake.address(conv)
    }

    pub fn text(&self, conv: &str, text: &str) -> pb::Message {
        self.fake.text(conv, text)
    }

    pub async fn send(&self, conv: &str, text: &str) -> Result<pb::SendResponse, tonic::Status> {
        send_text(&mut self.client.clone(), &self.address(conv), text.into()).await
    }
}

/// One Send of `text` to `address`, for a task that owns its client.
pub async fn send_text(
    client: &mut ChannelGatewayClient<tonic::transport::Channel>,
    address: &pb::Address,
    text: String,
) -> Result<pb::SendResponse, tonic::Status> {
    client
        .send(pb::SendRequest {
            message: Some(pb::Message {
                address: Some(Box::new(address.clone())),
                text,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The gateway binary serving on 127.0.0.1:`port` with its outbox in `data_dir`, configured by
/// environment as a deployment would be: the Bot Framework pointed at `fake`, whose tokens and
/// activities it may receive. Callers add what their test needs and spawn it.
pub fn gateway_command(
    fake: &FakeConnector,
    data_dir: &std::path::Path,
    port: u16,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_channel-gateway"));
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(data_dir)
    // Off the default webhook port 3978, so tests can run side by side.
    .env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0")
    .env(
        "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__ALLOWED_SERVICE_HOSTS",
        "[\"127.0.0.1:*\"]",
    )
    .env(
        "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TOKEN_URL",
        format!("http://127.0.0.1:{}/token", fake.addr.port()),
    )
    .env("CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_ID", BOT)
    .env(
        "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASSWORD",
        PASSWORD,
    );
    // The suite's backend (`CHANNEL_GATEWAY_TEST_BACKEND`); a test that names one sets it after.
    match fake_http::backend() {
        fake_http::Backend::Sqlite => {}
        fake_http::Backend::Memory => {
            cmd.env("CHANNEL_GATEWAY__OUTBOX__BACKEND", "memory");
        }
        fake_http::Backend::Postgres => {
            cmd.env("CHANNEL_GATEWAY__OUTBOX__BACKEND", "postgres").env(
                "CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL",
                fake_http::postgres_url_for(data_dir),
            );
        }
    }
    cmd
}

/// `gateway_command`, with Slack pointed at a fake Web API at `slack_api` (one workspace: `bot`
/// with `token`), paced only by that fake, quick retries, the admin listener on a free port,
/// and its log kept where `CG_TEST_LOG` says (for a failure to be looked into; `RUST_LOG` from
/// `CG_TEST_RUST_LOG`). The crash tests of changes and streams run the binary this way.
pub fn slack_gateway_command(
    fake: &FakeConnector,
    data_dir: &std::path::Path,
    port: u16,
    slack_api: &str,
    bot: &str,
    token: &str,
) -> std::process::Command {
    let mut cmd = gateway_command(fake, data_dir, port);
    cmd.env("CHANNEL_GATEWAY__DELIVERY__BASE_RETRY_DELAY", "20ms")
        .env("CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL", slack_api)
        .env(
            "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
            format!(r#"[{{ bot_id = "{bot}", token = "{token}" }}]"#),
        )
        // As fast as the fake takes them: these tests are about kills, not pacing.
        .env("CHANNEL_GATEWAY__CHANNELS__SLACK__RATE_PER_SECOND", "1000")
        .env("CHANNEL_GATEWAY__CHANNELS__SLACK__RATE_BURST", "1000")
        .env("CHANNEL_GATEWAY__ADMIN__LISTEN", "127.0.0.1:0")
        .env(
            "RUST_LOG",
            std::env::var("CG_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(match std::env::var("CG_TEST_LOG") {
            Ok(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(std::process::Stdio::from)
                .unwrap_or_else(|_| std::process::Stdio::null()),
            Err(_) => std::process::Stdio::null(),
        });
    cmd
}

/// What GetDelivery answers for message `id`.
pub async fn delivery(
    client: &mut ChannelGatewayClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Delivery {
    client
        .get_delivery(pb::GetDeliveryRequest {
            message_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .delivery
        .unwrap()
}

/// The gateway's Prometheus text, from its admin listener.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first series starting with `prefix` (labels included), 0 when absent.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The BadRequest field paths of an INVALID_ARGUMENT status.
pub fn bad_fields(s: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    s.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A port free on 127.0.0.1 now, for a gateway binary a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gRPC channel to a gateway binary starting on `port`, once it listens (within 60 s).
pub async fn binary_channel(port: u16) -> tonic::transport::Channel {
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("gateway did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}
