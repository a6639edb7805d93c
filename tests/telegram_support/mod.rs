//! Test harness for the Telegram channel: a fake Telegram Bot API on 127.0.0.1 that records
//! every call (method, the token seen in the path, JSON body, time) and answers as Telegram does
//! (`{ok:true, result:{message_id, chat:{id}, ...}}`, message ids counting up per chat), with
//! scriptable refusals (flood control for a chat's next calls, a 400 for a body holding a
//! marker, a delete of a message "too old"), and a latency per chat. It keeps what each chat
//! shows, as Telegram does: sends add messages, `editMessageText` / `editMessageCaption` /
//! `editMessageMedia` change them (refusing an edit that changes nothing, or of a message that
//! is not there, in Telegram's words), `deleteMessage` removes them. Plus an in-process gateway
//! pointed at it and reached by a real gRPC client over TCP.
#![allow(dead_code)]
#[path = "../fake_http/mod.rs"]
mod fake_http;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::channels::telegram::config::TelegramBot;
use channel_gateway::config::{Config, Secret};
use channel_gateway::server::RunningGateway;

/// The bot the tests send as (`address.bot.id`) and its token, shaped as @BotFather issues them.
pub const BOT: &str = "gateway_test_bot";
pub const TOKEN: &str = "7100200300:AAHt0kEnNeverShownAnywhere_x-42";
/// The part of the token after the bot's numeric id: the secret half, searched for on its own.
pub const TOKEN_SECRET: &str = "AAHt0kEnNeverShownAnywhere_x-42";
pub const USER: &str = "4242";

/// One call the fake Bot API received, and how it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// The Bot API method: `sendMessage`, `sendChatAction`.
    pub method: String,
    /// The token in the path (`/bot<token>/METHOD`).
    pub token: String,
    pub content_type: Option<String>,
    pub body: Value,
    /// The HTTP status answered and, for a refusal, Telegram's description.
    pub status: u16,
    pub description: Option<String>,
}

impl Received {
    /// `chat_id` as text, whether the request sent it as a number or a string.
    pub fn chat(&self) -> String {
        chat_key(&self.body)
    }
    /// The message's text, or its caption for media.
    pub fn text(&self) -> &str {
        self.body
            .get("text")
            .or_else(|| self.body.get("caption"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn ok(&self) -> bool {
        self.status == 200
    }
    pub fn is_typing(&self) -> bool {
        self.method == "sendChatAction"
    }
}

fn chat_key(body: &Value) -> String {
    match body.get("chat_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// The chat id as Telegram would echo it in `result.chat.id`: a number when it is one.
fn chat_value(key: &str) -> Value {
    key.parse::<i64>().map_or_else(|_| json!(key), Value::from)
}

#[derive(Default)]
pub struct FakeState {
    pub received: Mutex<Vec<Received>>,
    /// The tokens the fake knows; any other gets Telegram's 401.
    pub tokens: Mutex<HashSet<String>>,
    /// chat id -> (calls still to refuse with flood control, retry_after seconds).
    pub flood: Mutex<HashMap<String, (u32, u64)>>,
    /// A body containing the marker is refused with a 400 and the description.
    pub markers: Mutex<Vec<(String, String)>>,
    /// chat id -> the last message id given.
    pub next_id: Mutex<HashMap<String, i64>>,
    pub in_flight: fake_http::InFlight,
    /// What each chat shows now: (chat, message_id) -> the message, as edits left it.
    pub shown: Mutex<BTreeMap<(String, i64), Shown>>,
    /// Messages whose deletion Telegram refuses as it does past 48 hours.
    pub too_old: Mutex<HashSet<(String, i64)>>,
    /// chat id -> how long each call to it takes to be answered.
    pub latency: Mutex<HashMap<String, Duration>>,
}

/// One message a chat shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    /// The text of a text message, the caption of a media message ("" without one).
    pub text: String,
    /// The media's URL or file_id; `None` for a text message.
    pub media: Option<String>,
    /// The message's markup (an inline keyboard; a reply keyboard as sent).
    pub markup: Option<Value>,
}

#[derive(Clone)]
pub struct FakeTelegram {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeTelegram {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        state.tokens.lock().unwrap().insert(TOKEN.into());
        let app = Router::new()
            .route("/{bot}/{method}", post(call))
            .with_state(state.clone());
        let addr = fake_http::serve(app).await;
        Self { addr, state }
    }

    /// `channels.telegram.api_base_url` for this fake.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Every call to one chat, in arrival order.
    pub fn for_chat(&self, chat: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.chat() == chat)
            .collect()
    }

    /// The texts Telegram accepted in one chat, in arrival order (typing left out).
    pub fn delivered_texts(&self, chat: &str) -> Vec<String> {
        self.for_chat(chat)
            .into_iter()
            .filter(|r| r.ok() && !r.is_typing())
            .map(|r| r.text().to_string())
            .collect()
    }

    /// The next `calls` calls to `chat` are refused with flood control (429,
    /// `parameters.retry_after = secs`).
    pub fn flood(&self, chat: &str, calls: u32, secs: u64) {
        self.state
            .flood
            .lock()
            .unwrap()
            .insert(chat.into(), (calls, secs));
    }

    /// Any call whose JSON body contains `marker` is refused with a 400 and `description`.
    pub fn refuse_marker(&self, marker: &str, description: &str) {
        self.state
            .markers
            .lock()
            .unwrap()
            .push((marker.into(), description.into()));
    }

    /// What `chat` shows now, in Telegram's order: (message_id, text or caption).
    pub fn shown(&self, chat: &str) -> Vec<(i64, String)> {
        self.shown_messages(chat)
            .into_iter()
            .map(|(id, m)| (id, m.text))
            .collect()
    }

    /// What `chat` shows now, whole.
    pub fn shown_messages(&self, chat: &str) -> Vec<(i64, Shown)> {
        self.state
            .shown
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), _)| c == chat)
            .map(|((_, id), m)| (*id, m.clone()))
            .collect()
    }

    /// Calls of one Bot API method that Telegram accepted, in arrival order.
    pub fn calls(&self, method: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.method == method && r.ok())
            .collect()
    }

    /// From now on, deleting message `id` of `chat` is refused as Telegram refuses a message
    /// older than 48 hours.
    pub fn make_old(&self, chat: &str, id: i64) {
        self.state.too_old.lock().unwrap().insert((chat.into(), id));
    }

    /// Each call to `chat` is answered after `d`.
    pub fn set_latency(&self, chat: &str, d: Duration) {
        self.state.latency.lock().unwrap().insert(chat.into(), d);
    }

    pub fn max_in_flight(&self, chat: &str) -> u32 {
        self.state.in_flight.max(chat)
    }

    /// Waits until `pred` holds for what was received, or panics after `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        fake_http::wait_for(within, what, || self.received(), pred).await;
    }
}

fn refusal(code: u16, description: &str, parameters: Option<Value>) -> Value {
    let mut v = json!({"ok": false, "error_code": code, "description": description});
    if let Some(p) = parameters {
        v["parameters"] = p;
    }
    v
}

/// One sent message as Telegram describes it.
fn message(id: i64, chat: &str, body: &Value) -> Value {
    let mut m = json!({
        "message_id": id,
        "date": 1_700_000_000,
        "chat": {"id": chat_value(chat), "type": "private"},
    });
    for key in ["text", "caption"] {
        if let Some(v) = body.get(key) {
            m[key] = v.clone();
        }
    }
    m
}

async fn call(
    State(s): State<Arc<FakeState>>,
    Path((bot, method)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    let token = bot.strip_prefix("bot").unwrap_or_default().to_string();
    let raw = body;
    let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
    let chat = chat_key(&body);
    s.in_flight.enter(&chat);
    // Calls overlap for real: a second call to one chat arriving before the first is answered
    // shows up in `max_in_flight`.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let latency = s.latency.lock().unwrap().get(&chat).copied();
    if let Some(d) = latency {
        tokio::time::sleep(d).await;
    }
    let known = s.tokens.lock().unwrap().contains(&token);
    let flooded = {
        let mut f = s.flood.lock().unwrap();
        match f.get_mut(&chat) {
            Some((n, secs)) if *n > 0 => {
                *n -= 1;
                Some(*secs)
            }
            _ => None,
        }
    };
    let marked = s
        .markers
        .lock()
        .unwrap()
        .iter()
        .find(|(m, _)| raw.contains(m.as_str()))
        .map(|(_, d)| d.clone());
    let (status, answer) = if !known {
        (401, refusal(401, "Unauthorized", None))
    } else if let Some(secs) = flooded {
        (
            429,
            refusal(
                429,
                &format!("Too Many Requests: retry after {secs}"),
                Some(json!({"retry_after": secs})),
            ),
        )
    } else if let Some(description) = marked {
        (400, refusal(400, &description, None))
    } else if chat.is_empty() {
        (400, refusal(400, "Bad Request: chat_id is empty", None))
    } else {
        let next = |s: &FakeState| {
            let mut ids = s.next_id.lock().unwrap();
            let id = ids.entry(chat.clone()).or_insert(0);
            *id += 1;
            *id
        };
        match answer(&s, &method, &chat, &body, next) {
            Ok(result) => (200, json!({"ok": true, "result": result})),
            Err((code, description)) => (code, refusal(code, &description, None)),
        }
    };
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        method,
        token,
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        body,
        status,
        description: answer
            .get("description")
            .and_then(Value::as_str)
            .map(String::from),
    });
    s.in_flight.leave(&chat);
    (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response()
}

/// Telegram's words when an edit would leave the message as it is.
pub const NOT_MODIFIED: &str = "Bad Request: message is not modified: specified new message \
    content and reply markup are exactly the same as a current content and reply markup of the \
    message";

/// A known token's call to a chat: Telegram's `result`, or its refusal (status, description).
fn answer(
    s: &FakeState,
    method: &str,
    chat: &str,
    body: &Value,
    mut next: impl FnMut(&FakeState) -> i64,
) -> Result<Value, (u16, String)> {
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let markup = body.get("reply_markup").cloned();
    let bad = |d: &str| Err((400, format!("Bad Request: {d}")));
    match method {
        "sendChatAction" => Ok(Value::Bool(true)),
        "sendMediaGroup" => {
            let media = body
                .get("media")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut out = Vec::new();
            for m in media {
                let id = next(s);
                s.shown.lock().unwrap().insert(
                    (chat.into(), id),
                    Shown {
                        text: str_of(m.get("caption")),
                        media: Some(str_of(m.get("media"))),
                        markup: None,
                    },
                );
                out.push(message(id, chat, &Value::Null));
            }
            Ok(Value::Array(out))
        }
        "sendMessage" => {
            let id = next(s);
            s.shown.lock().unwrap().insert(
                (chat.into(), id),
                Shown {
                    text: str_of(body.get("text")),
                    media: None,
                    markup,
                },
            );
            Ok(message(id, chat, body))
        }
        m if m.starts_with("send") => {
            let field = ["photo", "video", "audio", "document", "animation"]
                .into_iter()
                .find(|f| body.get(*f).is_some());
            let id = next(s);
            s.shown.lock().unwrap().insert(
                (chat.into(), id),
                Shown {
                    text: str_of(body.get("caption")),
                    media: field.map(|f| str_of(body.get(f))),
                    markup,
                },
            );
            Ok(message(id, chat, body))
        }
        "editMessageText" | "editMessageCaption" | "editMessageMedia" => {
            let id = body.get("message_id").and_then(Value::as_i64).unwrap_or(0);
            let mut shown = s.shown.lock().unwrap();
            let Some(old) = shown.get_mut(&(chat.to_string(), id)) else {
                return bad("message to edit not found");
            };
            let new = match method {
                "editMessageText" if old.media.is_some() => {
                    return bad("there is no text in the message to edit");
                }
                "editMessageText" => Shown {
                    text: str_of(body.get("text")),
                    media: None,
                    markup,
                },
                // Not a wording checked against Telegram: the gateway never sends this.
                "editMessageCaption" if old.media.is_none() => {
                    return bad("there is no caption in the message to edit");
                }
                "editMessageCaption" => Shown {
                    text: str_of(body.get("caption")),
                    media: old.media.clone(),
                    markup,
                },
                _ => {
                    let media = body.get("media").cloned().unwrap_or(Value::Null);
                    Shown {
                        text: str_of(media.get("caption")),
                        media: Some(str_of(media.get("media"))),
                        markup,
                    }
                }
            };
            if *old == new {
                return Err((400, NOT_MODIFIED.to_string()));
            }
            *old = new.clone();
            let key = if new.media.is_some() {
                "caption"
            } else {
                "text"
            };
            Ok(message(id, chat, &json!({ key: new.text })))
        }
        "deleteMessage" => {
            let id = body.get("message_id").and_then(Value::as_i64).unwrap_or(0);
            let key = (chat.to_string(), id);
            if s.too_old.lock().unwrap().contains(&key) {
                return bad("message can't be deleted");
            }
            match s.shown.lock().unwrap().remove(&key) {
                Some(_) => Ok(Value::Bool(true)),
                None => bad("message to delete not found"),
            }
        }
        _ => Err((404, "Not Found".into())),
    }
}

/// A gateway config pointing at the fake: one bot with its token, Telegram's pacing off (the
/// tests send 100 messages to a chat at once, far above its documented 1 per second: only a
/// 429 slows a chat down then), short retry delays.
pub fn config_for(fake: &FakeTelegram) -> Config {
    let mut c = fake_http::gateway_config();
    let t = &mut c.channels.telegram;
    t.api_base_url = fake.base_url();
    t.bots = vec![TelegramBot {
        bot_id: BOT.into(),
        token: Secret::new(TOKEN),
        secret_token: None,
        receive: Default::default(),
    }];
    t.pacing = false;
    c.delivery.max_retry_delay = Duration::from_secs(5);
    c
}

pub struct Harness {
    pub fake: FakeTelegram,
    pub gateway: RunningGateway,
    pub client: ChannelGatewayClient<tonic::transport::Channel>,
}

pub async fn start() -> Harness {
    let fake = FakeTelegram::start().await;
    let (gateway, client) = fake_http::start_gateway(config_for(&fake)).await;
    Harness {
        fake,
        gateway,
        client,
    }
}

/// An address in chat `chat` (none when empty: a proactive start to `USER`).
pub fn address(chat: &str) -> pb::Address {
    address_as(BOT, chat)
}

pub fn address_as(bot: &str, chat: &str) -> pb::Address {
    pb::Address {
        channel_id: "telegram".into(),
        user: Some(pb::Identity {
            id: USER.into(),
            name: "Ada".into(),
            ..Default::default()
        }),
        bot: Some(pb::Identity {
            id: bot.into(),
            name: "helper".into(),
            ..Default::default()
        }),
        conversation: (!chat.is_empty()).then(|| pb::ConversationAccount {
            id: chat.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn text(chat: &str, text: &str) -> pb::Message {
    pb::Message {
        address: Some(Box::new(address(chat))),
        text: text.into(),
        ..Default::default()
    }
}

pub fn send_req(message: pb::Message, wait: pb::WaitMode) -> pb::SendRequest {
    pb::SendRequest {
        message: Some(message),
        wait: wait as i32,
        ..Default::default()
    }
}
