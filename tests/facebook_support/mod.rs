//! Test harness for the Facebook channel: a fake Graph API Send endpoint on 127.0.0.1 that
//! records every call (path, query, body, the answer it gave), can be scripted to refuse, and
//! refuses what Graph refuses (no token; a sender action together with a message). Plus an
//! in-process gateway configured with two pages, reached by a real gRPC client over TCP.
#![allow(dead_code)]
#[path = "../fake_http/mod.rs"]
mod fake_http;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::channels::facebook::config::PageCredentials;
use channel_gateway::config::{Config, Secret};
use channel_gateway::server::RunningGateway;

/// The page the tests send as, with an app secret: its token and secret are RFC 4231's HMAC
/// test case 2, so `PROOF` is a published answer, not one computed by the code under test.
pub const PAGE: &str = "107345288765432";
pub const TOKEN: &str = "what do ya want for nothing?";
pub const APP_SECRET: &str = "Jefe";
pub const PROOF: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
/// A second page, without an app secret (so without appsecret_proof).
pub const PAGE2: &str = "200000000000002";
pub const TOKEN2: &str = "EAAGm0PX4ZCpsBAsecondpagetoken0123456789";

/// One call the fake Graph API received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// `/{version}/{node}/messages`.
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Value,
    /// The status the fake answered with.
    pub status: u16,
}

impl Received {
    pub fn recipient(&self) -> &str {
        self.body
            .pointer("/recipient/id")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn text(&self) -> &str {
        self.body
            .pointer("/message/text")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn ok(&self) -> bool {
        self.status == 200
    }
    /// A short label: `typing`, `text:...`, `generic:N`, `button:TEXT`, `receipt`, `image`...
    pub fn label(&self) -> String {
        if let Some(a) = self.body.get("sender_action").and_then(Value::as_str) {
            return a.to_string();
        }
        if let Some(t) = self.body.pointer("/message/text").and_then(Value::as_str) {
            return format!("text:{t}");
        }
        match self
            .body
            .pointer("/message/attachment/payload/template_type")
            .and_then(Value::as_str)
        {
            Some("generic") => format!(
                "generic:{}",
                self.body
                    .pointer("/message/attachment/payload/elements")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            ),
            Some("button") => format!(
                "button:{}",
                self.body
                    .pointer("/message/attachment/payload/text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            ),
            Some(other) => other.to_string(),
            None => self
                .body
                .pointer("/message/attachment/type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        }
    }
}

/// An answer to give instead of a success.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
}

/// A Graph error answer.
pub fn graph_error(status: u16, code: i64, subcode: Option<i64>, message: &str) -> Scripted {
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AzXq1Trace",
    });
    if let Some(s) = subcode {
        error["error_subcode"] = s.into();
    }
    Scripted {
        status,
        body: json!({ "error": error }),
    }
}

#[derive(Default)]
pub struct FakeState {
    pub received: Mutex<Vec<Received>>,
    /// PSID -> answers for its next calls (`None`: answer normally).
    pub script: Mutex<HashMap<String, VecDeque<Option<Scripted>>>>,
    /// Random latency in [0, max] for every answer.
    pub jitter_max: Mutex<Duration>,
    /// Calls in flight per PSID now, and the most ever seen.
    pub in_flight: fake_http::InFlight,
    pub next_id: AtomicU64,
}

#[derive(Clone)]
pub struct FakeGraph {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeGraph {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .route("/{version}/{node}/messages", post(send))
            .with_state(state.clone());
        let addr = fake_http::serve(app).await;
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Every call for one PSID, refused ones included, in arrival order.
    pub fn for_psid(&self, psid: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.recipient() == psid)
            .collect()
    }

    /// The accepted calls for one PSID, in arrival order.
    pub fn delivered(&self, psid: &str) -> Vec<Received> {
        self.for_psid(psid)
            .into_iter()
            .filter(Received::ok)
            .collect()
    }

    pub fn script(&self, psid: &str, answers: Vec<Option<Scripted>>) {
        self.state
            .script
            .lock()
            .unwrap()
            .insert(psid.into(), answers.into());
    }

    pub fn set_jitter(&self, max: Duration) {
        *self.state.jitter_max.lock().unwrap() = max;
    }

    pub fn max_in_flight(&self, psid: &str) -> u32 {
        self.state.in_flight.max(psid)
    }

    /// Waits until `pred` holds for what was received, or panics after `within` (a generous
    /// bound for a busy machine, never an assertion on speed).
    pub async fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        fake_http::wait_for(within, what, || self.received(), pred).await;
    }

    /// Messenger's own rule, checked on everything the gateway ever sent.
    pub fn assert_no_state_with_message(&self) {
        for r in self.received() {
            assert!(
                !(r.body.get("sender_action").is_some() && r.body.get("message").is_some()),
                "a request has both sender_action and message: {}",
                r.body
            );
        }
    }
}

fn answer(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

async fn send(
    State(s): State<Arc<FakeState>>,
    Path((version, node)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    Json(body): Json<Value>,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let psid = body
        .pointer("/recipient/id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    s.in_flight.enter(&psid);
    let jitter = *s.jitter_max.lock().unwrap();
    if !jitter.is_zero() {
        tokio::time::sleep(jitter.mul_f64(rand::random::<f64>())).await;
    }
    let scripted = s
        .script
        .lock()
        .unwrap()
        .get_mut(&psid)
        .and_then(VecDeque::pop_front)
        .flatten();
    let (status, reply) = if !query.contains_key("access_token") {
        let e = graph_error(400, 2500, None, "An active access token must be used");
        (e.status, e.body)
    } else if body.get("sender_action").is_some() && body.get("message").is_some() {
        let e = graph_error(
            400,
            100,
            None,
            "(#100) Cannot send both message and state at the same time",
        );
        (e.status, e.body)
    } else if let Some(sc) = scripted {
        (sc.status, sc.body)
    } else {
        let n = s.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let mut ok = json!({"recipient_id": psid});
        if body.get("message").is_some() {
            ok["message_id"] = json!(format!("m_fake{n:06}"));
        }
        (200, ok)
    };
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        path: format!("/{version}/{node}/messages"),
        query,
        body,
        status,
    });
    s.in_flight.leave(&psid);
    answer(status, reply)
}

/// A gateway config pointing the facebook channel at the fake, with both pages.
pub fn config_for(fake: &FakeGraph) -> Config {
    let mut c = fake_http::gateway_config();
    let fb = &mut c.channels.facebook;
    fb.graph_base_url = fake.base_url();
    fb.pages = vec![
        PageCredentials {
            page_id: PAGE.into(),
            access_token: Secret::new(TOKEN),
            app_secret: Some(Secret::new(APP_SECRET)),
        },
        PageCredentials {
            page_id: PAGE2.into(),
            access_token: Secret::new(TOKEN2),
            app_secret: None,
        },
    ];
    c
}

pub struct Harness {
    pub fake: FakeGraph,
    pub gateway: RunningGateway,
    pub client: ChannelGatewayClient<tonic::transport::Channel>,
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
    let fake = FakeGraph::start().await;
    let mut config = config_for(&fake);
    tweak(&mut config);
    let (gateway, client) = fake_http::start_gateway(config).await;
    Harness {
        fake,
        gateway,
        client,
    }
}

/// The address of a Messenger conversation with `psid`, as `page`.
pub fn address_as(page: &str, psid: &str) -> pb::Address {
    pb::Address {
        channel_id: "facebook".into(),
        user: Some(pb::Identity {
            id: psid.into(),
            name: "Ada".into(),
            ..Default::default()
        }),
        bot: Some(pb::Identity {
            id: page.into(),
            name: "Helper Page".into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: psid.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn address(psid: &str) -> pb::Address {
    address_as(PAGE, psid)
}

pub fn text(psid: &str, text: &str) -> pb::Message {
    pb::Message {
        address: Some(Box::new(address(psid))),
        text: text.into(),
        ..Default::default()
    }
}

pub fn action(kind: pb::ActionType, title: &str, value: &str) -> pb::CardAction {
    pb::CardAction {
        r#type: kind as i32,
        title: title.into(),
        value: value.into(),
        ..Default::default()
    }
}

/// A carousel of `cards` hero cards with `buttons` buttons each.
pub fn carousel(psid: &str, cards: usize, buttons: usize) -> pb::Message {
    let attachments = (1..=cards)
        .map(|i| pb::Attachment {
            content: Some(pb::attachment::Content::Hero(pb::HeroCard {
                title: format!("Card {i}"),
                subtitle: format!("The card number {i}"),
                buttons: (1..=buttons)
                    .map(|b| {
                        action(
                            pb::ActionType::PostBack,
                            &format!("B{b}"),
                            &format!("c{i}b{b}"),
                        )
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    pb::Message {
        address: Some(Box::new(address(psid))),
        attachments,
        attachment_layout: pb::AttachmentLayout::Carousel as i32,
        ..Default::default()
    }
}

/// The native bodies the Render RPC gives for `m`, in order.
pub async fn rendered_bodies(
    client: &ChannelGatewayClient<tonic::transport::Channel>,
    m: pb::Message,
) -> Vec<Value> {
    client
        .clone()
        .render(pb::RenderRequest {
            change: None,
            message: Some(m),
            options: None,
        })
        .await
        .unwrap()
        .into_inner()
        .requests
        .iter()
        .map(|r| serde_json::from_str(&r.body_json).unwrap())
        .collect()
}

/// The google.rpc.ErrorInfo metadata of a status, if any.
pub fn error_info(s: &tonic::Status) -> HashMap<String, String> {
    use tonic_types::StatusExt;
    s.get_details_error_info()
        .map(|i| i.metadata.into_iter().collect())
        .unwrap_or_default()
}
