//! Messenger's receiving side: the webhook subscription handshake, the `X-Hub-Signature-256`
//! check, and the page webhook body normalized into model messages, one per messaging item.
//!
//! Owns `/webhooks/facebook`: what a verified call means and the address each event replies
//! to (the same fields `render::render_send` reads: `bot.id` the page, `user.id` and
//! `conversation.id` the PSID). Must not store, answer or log: the inbound listener does, after
//! `verify` succeeded. Never quotes the request or a secret in a refusal.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;
use time::OffsetDateTime;

use super::Facebook;
use super::render::CHANNEL;
use crate::channels::channel::{
    Inbound, InboundEvent, Parsed, WebhookAnswer, WebhookError, WebhookRequest,
};
use crate::model::{Address, Attachment, Conversation, Identity, Message, MessageType};

type HmacSha256 = Hmac<Sha256>;

/// The one path Messenger calls: GET for the subscription handshake, POST for events.
pub const PATH: &str = "/webhooks/facebook";
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Meta batches up to 1,000 entries in one call ("Webhooks for Messenger Platform").
pub const MAX_ENTRIES: usize = 1000;
/// Messaging items accepted in one call, over all its entries. An entry usually holds one;
/// twice the documented batch leaves room for entries holding several, and a body past it is
/// refused whole (a 2xx must mean every event of the call was stored).
pub const MAX_EVENTS: usize = 2000;
/// Page ids, PSIDs and mids are far shorter; they become dedupe keys and inbox keys.
const MAX_ID: usize = 512;
/// The handshake's challenge is an integer; a longer one is not Meta's.
const MAX_CHALLENGE: usize = 128;
/// Query strings longer than this are not a handshake (its three parameters are short).
const MAX_QUERY: usize = 4096;
/// Keys the verify token and the presented token are MAC'ed with, so that `verify_slice`
/// compares them in constant time whatever their lengths. Not a secret: it only hides timing.
const TOKEN_KEY: &[u8] = b"channel-gateway facebook verify token";

impl Facebook {
    /// The receiving side exists when the section is enabled and at least one app secret is
    /// configured: without one no POST could be verified.
    pub(super) fn receives(&self) -> bool {
        self.config.enabled && !self.config.app_secrets().is_empty()
    }

    /// Checks the GET handshake and returns its challenge.
    fn handshake(&self, query: Option<&str>) -> Result<Option<String>, WebhookError> {
        let Some(expected) = &self.config.verify_token else {
            return Err(WebhookError::Unverified("no verify token configured"));
        };
        let query = query.unwrap_or_default();
        if query.len() > MAX_QUERY {
            return Err(WebhookError::Unverified("query too long"));
        }
        let (mut mode, mut token, mut challenge) = (None, None, None);
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match k.as_ref() {
                "hub.mode" => &mut mode,
                "hub.verify_token" => &mut token,
                "hub.challenge" => &mut challenge,
                _ => continue,
            };
            // Two values for one parameter: which one Meta meant is a guess, so neither.
            if slot.replace(v).is_some() {
                return Err(WebhookError::Unverified("repeated handshake parameter"));
            }
        }
        if mode.as_deref() != Some("subscribe") {
            return Err(WebhookError::Unverified("not a subscription handshake"));
        }
        let token = token.ok_or(WebhookError::Unverified("missing verify token"))?;
        let mut tag = HmacSha256::new_from_slice(TOKEN_KEY)
            .map_err(|_| WebhookError::Unverified("verify token check failed"))?;
        tag.update(expected.expose().as_bytes());
        let tag = tag.finalize().into_bytes();
        let mut presented = HmacSha256::new_from_slice(TOKEN_KEY)
            .map_err(|_| WebhookError::Unverified("verify token check failed"))?;
        presented.update(token.as_bytes());
        presented
            .verify_slice(&tag)
            .map_err(|_| WebhookError::Unverified("verify token does not match"))?;
        Ok(challenge.map(|c| c.into_owned()))
    }

    /// Checks `X-Hub-Signature-256` over the exact body against every configured app secret.
    fn check_signature(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let mut values = req.headers.get_all(SIGNATURE_HEADER).iter();
        let header = values
            .next()
            .ok_or(WebhookError::Unverified("missing X-Hub-Signature-256"))?;
        if values.next().is_some() {
            return Err(WebhookError::Unverified("repeated X-Hub-Signature-256"));
        }
        let sig = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("sha256="))
            .and_then(decode_hex32)
            .ok_or(WebhookError::Unverified("malformed X-Hub-Signature-256"))?;
        for secret in self.config.app_secrets() {
            let Ok(mut mac) = HmacSha256::new_from_slice(secret.expose().as_bytes()) else {
                continue;
            };
            mac.update(req.body);
            if mac.verify_slice(&sig).is_ok() {
                return Ok(());
            }
        }
        Err(WebhookError::Unverified("signature does not match"))
    }
}

/// 64 hex digits (either case) to 32 bytes.
fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl Inbound for Facebook {
    fn paths(&self) -> Vec<String> {
        vec![PATH.to_string()]
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), WebhookError>> {
        let result = match *req.method {
            http::Method::GET => self.handshake(req.query).map(|_| ()),
            http::Method::POST => self.check_signature(req),
            _ => Err(WebhookError::Unverified("method not accepted")),
        };
        Box::pin(std::future::ready(result))
    }

    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        if *req.method == http::Method::GET {
            // Checked again: echoing a challenge is what subscribes a URL, so it never
            // depends on the caller having called `verify` first.
            let challenge = self.handshake(req.query)?.unwrap_or_default();
            let shown = !challenge.is_empty()
                && challenge.len() <= MAX_CHALLENGE
                && challenge.bytes().all(|b| b.is_ascii_graphic());
            if !shown {
                return Err(WebhookError::Unreadable(
                    "hub.challenge is missing or not a short token".into(),
                ));
            }
            return Ok(Parsed {
                events: Vec::new(),
                answer: Some(WebhookAnswer {
                    status: 200,
                    content_type: "text/plain",
                    body: challenge.into_bytes(),
                }),
                reply: None,
            });
        }
        Ok(Parsed {
            events: parse_body(req.body, |page| self.client.has_credentials(page))?,
            answer: None,
            reply: None,
        })
    }
}

#[derive(Deserialize)]
struct Envelope {
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    id: Value,
    #[serde(default)]
    time: Option<Value>,
    /// Items for the app with thread control. `standby` (items for the app without it, in
    /// the handover protocol) is not read: this gateway answers, so it owns the thread.
    #[serde(default)]
    messaging: Vec<Value>,
}

fn unreadable(reason: &str) -> WebhookError {
    WebhookError::Unreadable(reason.to_string())
}

/// The events of a page webhook body, in body order (entry by entry, item by item). Echoes
/// of the page's own messages, and entries of pages this gateway has no credentials for (no
/// bot can reply as them), are left out; anything else that is not a Messenger body refuses
/// the whole call.
pub fn parse_body(
    body: &[u8],
    is_configured_page: impl Fn(&str) -> bool,
) -> Result<Vec<InboundEvent>, WebhookError> {
    let env: Envelope =
        serde_json::from_slice(body).map_err(|_| unreadable("not a Messenger webhook body"))?;
    if env.object != "page" {
        return Err(unreadable("object is not `page`"));
    }
    if env.entry.len() > MAX_ENTRIES {
        return Err(WebhookError::Unreadable(format!(
            "{} entries; at most {MAX_ENTRIES} are accepted in one call",
            env.entry.len()
        )));
    }
    let total: usize = env.entry.iter().map(|e| e.messaging.len()).sum();
    if total > MAX_EVENTS {
        return Err(WebhookError::Unreadable(format!(
            "{total} messaging items; at most {MAX_EVENTS} are accepted in one call"
        )));
    }
    let mut events = Vec::with_capacity(total);
    for entry in env.entry {
        let page = id_of(Some(&entry.id)).ok_or_else(|| unreadable("entry without a page id"))?;
        if !is_configured_page(&page) {
            // Verified (an app secret of ours signed it), but no bot could answer as this page:
            // said, so a page subscribed by mistake or missing from the config is noticed.
            tracing::warn!(
                page = %crate::bounded::for_log(&page),
                items = entry.messaging.len(),
                "messenger events for a page without credentials here were left out"
            );
            continue;
        }
        let entry_time = entry.time.as_ref().and_then(number);
        for item in entry.messaging {
            if let Some(ev) = parse_item(&page, entry_time, item)? {
                events.push(ev);
            }
        }
    }
    Ok(events)
}

/// An id as Messenger writes it: a string, or a number in older payloads. Bounded.
fn id_of(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!s.is_empty() && s.len() <= MAX_ID).then_some(s)
}

/// A timestamp in milliseconds: a number, or a numeric string in the newer reference pages.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Milliseconds since the epoch as a time (UTC); `None` past the calendar `time` knows.
pub fn time_of_ms(ms: u64) -> Option<OffsetDateTime> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// Field names of a messaging item that are not its event.
const ENVELOPE_KEYS: [&str; 3] = ["sender", "recipient", "timestamp"];

/// Event fields mapped here, in the order they are looked for.
const KINDS: [&str; 7] = [
    "message", "postback", "reaction", "read", "delivery", "optin", "referral",
];

fn parse_item(
    page: &str,
    entry_time: Option<u64>,
    item: Value,
) -> Result<Option<InboundEvent>, WebhookError> {
    let Value::Object(obj) = item else {
        return Err(unreadable("a messaging item is not an object"));
    };
    let message = obj.get("message").and_then(Value::as_object);
    // The page's own message, sent by this gateway or from the inbox: answering it would loop.
    if message.is_some_and(|m| m.get("is_echo").and_then(Value::as_bool) == Some(true)) {
        return Ok(None);
    }
    let recipient = id_of(obj.get("recipient").and_then(|r| r.get("id")))
        .ok_or_else(|| unreadable("a messaging item without recipient.id"))?;
    if recipient != page {
        return Err(unreadable(
            "a messaging item's recipient is not its entry's page",
        ));
    }
    // `user_ref`: a person on the Chat Plugin who has no PSID yet (replies then need
    // `recipient: {user_ref}` in source_event.facebook).
    let sender = obj
        .get("sender")
        .and_then(|s| id_of(s.get("id")).or_else(|| id_of(s.get("user_ref"))))
        .ok_or_else(|| unreadable("a messaging item without sender.id"))?;
    let kind = KINDS
        .into_iter()
        .find(|k| obj.contains_key(*k))
        .or_else(|| {
            obj.keys()
                .map(String::as_str)
                .find(|k| !ENVELOPE_KEYS.contains(k))
        })
        .unwrap_or("unknown");
    let kind = crate::settings::capped(kind, 64);
    let item_time = obj.get("timestamp").and_then(number);

    let mut msg = Message {
        address: Address {
            channel_id: CHANNEL.into(),
            user: Some(Identity {
                id: sender.clone(),
                ..Identity::default()
            }),
            bot: Some(Identity {
                id: page.to_string(),
                ..Identity::default()
            }),
            conversation: Some(Conversation {
                id: sender.clone(),
                ..Conversation::default()
            }),
            ..Address::default()
        },
        ..Message::default()
    };
    let mid = match kind.as_str() {
        "message" => match message {
            Some(m) => {
                user_message(m, &mut msg);
                id_of(m.get("mid"))
            }
            None => return Err(unreadable("`message` is not an object")),
        },
        "postback" => {
            let pb = obj.get("postback").and_then(Value::as_object);
            let title = pb.and_then(|p| p.get("title")).and_then(Value::as_str);
            let payload = pb.and_then(|p| p.get("payload")).and_then(Value::as_str);
            tap(&mut msg, payload, title);
            pb.and_then(|p| id_of(p.get("mid")))
        }
        "reaction" => {
            let r = obj.get("reaction").and_then(Value::as_object);
            reaction(r, &mut msg);
            // The id of the reacted-to message, where the model puts it: not this event's.
            msg.address.id = r.and_then(|r| id_of(r.get("mid")));
            None
        }
        other => {
            msg.kind = MessageType::Event;
            msg.name = Some(other.to_string());
            msg.value = obj.get(other).cloned();
            None
        }
    };
    if mid.is_some() {
        msg.address.id = mid.clone();
    }
    msg.timestamp = item_time.or(entry_time).and_then(time_of_ms);
    // Delivery receipts carry no timestamp: their watermark tells them apart (the entry's
    // time, shared by every item of the entry, would not).
    let stamp = item_time
        .or_else(|| {
            obj.get(kind.as_str())
                .and_then(|v| v.get("watermark"))
                .and_then(number)
        })
        .or(entry_time)
        .unwrap_or(0);
    let dedupe_key = mid.unwrap_or_else(|| format!("{page}:{sender}:{stamp}:{kind}"));
    msg.source_event.insert(CHANNEL.into(), Value::Object(obj));
    Ok(Some(InboundEvent {
        dedupe_key,
        message: msg,
    }))
}

/// A reaction added (`react`) or removed (`unreact`): by its name (`love`, `like`...), or
/// by its emoji when Messenger names it `other`.
fn reaction(r: Option<&Map<String, Value>>, msg: &mut Message) {
    msg.kind = MessageType::MessageReaction;
    let name = r
        .and_then(|r| r.get("reaction"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && *n != "other");
    let emoji = r.and_then(|r| r.get("emoji")).and_then(Value::as_str);
    let Some(what) = name.or(emoji).map(|w| crate::settings::capped(w, 64)) else {
        return;
    };
    match r.and_then(|r| r.get("action")).and_then(Value::as_str) {
        Some("unreact") => msg.reactions_removed.push(what),
        _ => msg.reactions_added.push(what),
    }
}

/// A person's message: text, media attachments, and a quick reply's payload.
fn user_message(m: &Map<String, Value>, msg: &mut Message) {
    msg.text = m.get("text").and_then(Value::as_str).map(str::to_string);
    if let Some(list) = m.get("attachments").and_then(Value::as_array) {
        msg.attachments = list.iter().filter_map(media).collect();
    }
    if let Some(payload) = m
        .get("quick_reply")
        .and_then(|q| q.get("payload"))
        .and_then(Value::as_str)
    {
        let title = msg.text.take();
        tap(msg, Some(payload), title.as_deref());
    }
}

/// What a tapped button or quick reply gives the bot, mapped back to what the bot sent.
///
/// The renderer sends every postback-like action as its bare payload (`render::payload_of`:
/// imBack and postBack their value, messageBack a JSON value as JSON text, dialogAction
/// `action?NAME=DATA`), so the action type does not come back. v3 put a Messenger payload in
/// `text` (botframework-sdk#919: "We map the quick reply payload on Facebook to be the
/// message.text"), which is what makes imBack and `action?` dialog actions work: text = the
/// payload. `value` = the payload too, as JSON when it is a JSON object or array (a
/// messageBack's value), the text then being the title the person saw. The title is always in
/// `source_event.facebook`.
fn tap(msg: &mut Message, payload: Option<&str>, title: Option<&str>) {
    let Some(payload) = payload else {
        msg.text = title.map(str::to_string);
        return;
    };
    let structured = serde_json::from_str::<Value>(payload)
        .ok()
        .filter(|v| v.is_object() || v.is_array());
    match structured {
        Some(v) => {
            msg.value = Some(v);
            msg.text = title.map(str::to_string);
        }
        None => {
            msg.value = Some(Value::String(payload.to_string()));
            msg.text = Some(payload.to_string());
        }
    }
}

/// A media attachment the person sent, by URL. Others (fallback links, location, reels,
/// posts, bookings) stay in `source_event.facebook` only.
fn media(a: &Value) -> Option<Attachment> {
    let kind = a.get("type")?.as_str()?;
    let url = a.get("payload")?.get("url")?.as_str()?;
    if url.is_empty() {
        return None;
    }
    let (top, fallback) = match kind {
        // A sticker is an image (the `sticker` type replaces `image` for them in 2026).
        "image" | "sticker" => ("image", "image/*"),
        "video" => ("video", "video/*"),
        "audio" => ("audio", "audio/*"),
        "file" => ("application", "application/octet-stream"),
        _ => return None,
    };
    Some(Attachment {
        content_type: media_type(url, top).unwrap_or(fallback).to_string(),
        content_url: Some(url.to_string()),
        ..Attachment::default()
    })
}

/// The media type a URL's extension names, when it agrees with Messenger's attachment type.
fn media_type(url: &str, top: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next()?;
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    let t = match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "txt" => "text/plain",
        _ => return None,
    };
    (t.starts_with(top) || top == "application").then_some(t)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use time::format_description::well_known::Rfc3339;

    use super::*;
    use crate::channels::channel::Channel;
    use crate::channels::facebook::config::{FacebookConfig, PageCredentials};
    use crate::settings::Secret;

    const PAGE: &str = "1122334455";
    const PAGE2: &str = "6677889900";
    const PSID: &str = "24681357";
    const SECRET: &str = "app-secret-one";
    const SECRET2: &str = "app-secret-two";
    const TOKEN: &str = "meaty ham&hock";

    fn config() -> FacebookConfig {
        FacebookConfig {
            pages: vec![
                PageCredentials {
                    page_id: PAGE.into(),
                    access_token: Secret::new("page-token-1"),
                    app_secret: Some(Secret::new(SECRET)),
                },
                PageCredentials {
                    page_id: PAGE2.into(),
                    access_token: Secret::new("page-token-2"),
                    app_secret: Some(Secret::new(SECRET2)),
                },
            ],
            verify_token: Some(Secret::new(TOKEN)),
            ..FacebookConfig::default()
        }
    }

    fn fb() -> Facebook {
        Facebook::new(&config(), Duration::from_secs(5)).unwrap()
    }

    /// `sha256=` + hex HMAC-SHA256 of the exact bytes, keyed by the app secret, as Meta signs.
    fn sign(secret: &str, body: &[u8]) -> String {
        let hex = crate::channels::shared::hmac_sha256_hex(secret.as_bytes(), &[body]);
        format!("sha256={hex}")
    }

    struct Call {
        method: http::Method,
        query: Option<String>,
        headers: http::HeaderMap,
        body: Vec<u8>,
    }

    impl Call {
        fn post(body: &[u8], signature: Option<&str>) -> Self {
            let mut headers = http::HeaderMap::new();
            if let Some(s) = signature {
                headers.insert("X-Hub-Signature-256", s.parse().unwrap());
            }
            Self {
                method: http::Method::POST,
                query: None,
                headers,
                body: body.to_vec(),
            }
        }

        fn signed(body: &[u8]) -> Self {
            Self::post(body, Some(&sign(SECRET, body)))
        }

        fn get(query: &str) -> Self {
            Self {
                method: http::Method::GET,
                query: Some(query.into()),
                headers: http::HeaderMap::new(),
                body: Vec::new(),
            }
        }

        fn req(&self) -> WebhookRequest<'_> {
            WebhookRequest {
                method: &self.method,
                path: PATH,
                query: self.query.as_deref(),
                headers: &self.headers,
                body: &self.body,
                received_at: 1_700_000_000,
            }
        }
    }

    fn verify(fb: &Facebook, call: &Call) -> Result<(), WebhookError> {
        futures::executor::block_on(fb.verify(&call.req()))
    }

    fn refused(fb: &Facebook, call: &Call) -> &'static str {
        match verify(fb, call) {
            Err(WebhookError::Unverified(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn events(body: &Value) -> Vec<InboundEvent> {
        let fb = fb();
        let call = Call::signed(&serde_json::to_vec(body).unwrap());
        verify(&fb, &call).unwrap();
        fb.parse(&call.req()).unwrap().events
    }

    fn page_body(items: Vec<Value>) -> Value {
        json!({"object": "page", "entry": [{"id": PAGE, "time": 1458692752478u64, "messaging": items}]})
    }

    fn item(extra: Value) -> Value {
        let mut v = json!({"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": 1458692752478u64});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn one(extra: Value) -> InboundEvent {
        let mut evs = events(&page_body(vec![item(extra)]));
        assert_eq!(evs.len(), 1);
        evs.remove(0)
    }

    // --- verification ---

    #[test]
    fn inbound_needs_an_app_secret_and_an_enabled_section() {
        assert!(fb().inbound().is_some());
        assert_eq!(fb().inbound().unwrap().paths(), [PATH]);
        let mut c = config();
        c.pages.iter_mut().for_each(|p| p.app_secret = None);
        let no_secret = Facebook::new(&c, Duration::from_secs(5)).unwrap();
        assert!(no_secret.inbound().is_none());
        let mut c = config();
        c.enabled = false;
        assert!(
            Facebook::new(&c, Duration::from_secs(5))
                .unwrap()
                .inbound()
                .is_none()
        );
    }

    #[test]
    fn handshake_answers_the_challenge_for_the_right_token_only() {
        let fb = fb();
        // The token as Meta's dashboard sends it: form-encoded in the query.
        let ok = Call::get(
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meaty+ham%26hock",
        );
        verify(&fb, &ok).unwrap();
        let parsed = fb.parse(&ok.req()).unwrap();
        assert!(parsed.events.is_empty());
        assert_eq!(
            parsed.answer,
            Some(WebhookAnswer {
                status: 200,
                content_type: "text/plain",
                body: b"1158201444".to_vec()
            })
        );
        for (query, reason) in [
            (
                "hub.mode=subscribe&hub.challenge=1&hub.verify_token=meaty+ham",
                "verify token does not match",
            ),
            (
                "hub.mode=subscribe&hub.challenge=1&hub.verify_token=",
                "verify token does not match",
            ),
            ("hub.mode=subscribe&hub.challenge=1", "missing verify token"),
            (
                "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=meaty+ham%26hock",
                "not a subscription handshake",
            ),
            (
                "hub.mode=subscribe&hub.verify_token=x&hub.verify_token=meaty+ham%26hock",
                "repeated handshake parameter",
            ),
            ("", "not a subscription handshake"),
        ] {
            let call = Call::get(query);
            assert_eq!(refused(&fb, &call), reason, "{query}");
            // parse never answers a challenge the token did not earn.
            assert!(fb.parse(&call.req()).is_err(), "{query}");
        }
        let mut c = config();
        c.verify_token = None;
        let no_token = Facebook::new(&c, Duration::from_secs(5)).unwrap();
        assert_eq!(refused(&no_token, &ok), "no verify token configured");
        // Verified, but a challenge that is not a short token is not echoed.
        let odd = Call::get(
            "hub.mode=subscribe&hub.challenge=%3Cscript%3E%20x&hub.verify_token=meaty+ham%26hock",
        );
        verify(&fb, &odd).unwrap();
        assert!(matches!(
            fb.parse(&odd.req()),
            Err(WebhookError::Unreadable(_))
        ));
    }

    #[test]
    fn signature_is_checked_against_each_app_secret_over_the_exact_bytes() {
        let fb = fb();
        let body = serde_json::to_vec(&page_body(vec![item(
            json!({"message": {"mid": "m_1", "text": "hi"}}),
        )]))
        .unwrap();
        verify(&fb, &Call::signed(&body)).unwrap();
        // The second page's app secret verifies too: the call names its page only inside.
        verify(&fb, &Call::post(&body, Some(&sign(SECRET2, &body)))).unwrap();
        // Hex case is not part of the signature.
        let upper = sign(SECRET, &body)
            .to_ascii_uppercase()
            .replace("SHA256=", "sha256=");
        verify(&fb, &Call::post(&body, Some(&upper))).unwrap();

        assert_eq!(
            refused(&fb, &Call::post(&body, Some(&sign("another-app", &body)))),
            "signature does not match"
        );
        assert_eq!(
            refused(&fb, &Call::post(&body, None)),
            "missing X-Hub-Signature-256"
        );
        let good = sign(SECRET, &body);
        for garbled in [
            good.trim_start_matches("sha256=").to_string(),
            good.replace("sha256=", "sha1="),
            good[..good.len() - 2].to_string(),
            format!("{good}00"),
            good.replace(&good[10..12], "zz"),
            format!("{good} "),
            "sha256=".into(),
        ] {
            assert_eq!(
                refused(&fb, &Call::post(&body, Some(&garbled))),
                "malformed X-Hub-Signature-256",
                "{garbled}"
            );
        }
        let mut changed = body.clone();
        let at = changed.iter().position(|&b| b == b'h').unwrap();
        changed[at] = b'H';
        assert_eq!(
            refused(&fb, &Call::post(&changed, Some(&good))),
            "signature does not match"
        );
        let mut twice = Call::signed(&body);
        twice
            .headers
            .append("X-Hub-Signature-256", good.parse().unwrap());
        assert_eq!(refused(&fb, &twice), "repeated X-Hub-Signature-256");
        let mut put = Call::signed(&body);
        put.method = http::Method::PUT;
        assert_eq!(refused(&fb, &put), "method not accepted");
    }

    #[test]
    fn non_ascii_bodies_verify_over_the_bytes_received() {
        let fb = fb();
        // Meta signs the escaped-unicode form it sends ("äöå" as \u00e4\u00f6\u00e5).
        let escaped = format!(
            r#"{{"object":"page","entry":[{{"id":"{PAGE}","time":1,"messaging":[{{"sender":{{"id":"{PSID}"}},"recipient":{{"id":"{PAGE}"}},"timestamp":1458692752478,"message":{{"mid":"m_u","text":"\u00e4\u00f6\u00e5 \ud83d\ude00"}}}}]}}]}}"#
        );
        assert!(escaped.is_ascii());
        let sig = sign(SECRET, escaped.as_bytes());
        let call = Call::post(escaped.as_bytes(), Some(&sig));
        verify(&fb, &call).unwrap();
        let evs = fb.parse(&call.req()).unwrap().events;
        assert_eq!(evs[0].message.text.as_deref(), Some("äöå 😀"));
        // The same JSON with raw UTF-8 is other bytes: the escaped form's signature fails it.
        let raw = escaped
            .replace(r"\u00e4\u00f6\u00e5", "äöå")
            .replace(r"\ud83d\ude00", "😀");
        assert_ne!(raw.as_bytes(), escaped.as_bytes());
        assert_eq!(
            refused(&fb, &Call::post(raw.as_bytes(), Some(&sig))),
            "signature does not match"
        );
        // A raw UTF-8 body verifies when signed over its own bytes, and one changed byte in
        // a multi-byte character fails it.
        let call = Call::signed(raw.as_bytes());
        verify(&fb, &call).unwrap();
        assert_eq!(
            fb.parse(&call.req()).unwrap().events[0]
                .message
                .text
                .as_deref(),
            Some("äöå 😀")
        );
        let mut changed = raw.clone().into_bytes();
        let at = raw.find('ö').unwrap() + 1;
        changed[at] ^= 0x01;
        assert_eq!(
            refused(
                &fb,
                &Call::post(&changed, Some(&sign(SECRET, raw.as_bytes())))
            ),
            "signature does not match"
        );
    }

    #[test]
    fn refusals_never_quote_a_secret_or_the_request() {
        let fb = fb();
        let body = br#"{"object":"page","entry":[]}"#;
        let calls = [
            Call::post(body, Some(&sign("wrong", body))),
            Call::post(body, Some("sha256=app-secret-one")),
            Call::get("hub.mode=subscribe&hub.challenge=1&hub.verify_token=meaty"),
        ];
        for call in &calls {
            let shown = verify(&fb, call).unwrap_err().to_string();
            for secret in [SECRET, SECRET2, TOKEN, "meaty", "app-secret"] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
    }

    // --- parsing ---

    #[test]
    fn a_text_message_becomes_a_message_with_a_reply_address() {
        let native = json!({"message": {"mid": "mid.1457764197618:41d102a3e1ae206a38", "text": "hello, world!"}});
        let it = item(native.clone());
        let ev = one(native);
        let m = &ev.message;
        assert_eq!(ev.dedupe_key, "mid.1457764197618:41d102a3e1ae206a38");
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(m.text.as_deref(), Some("hello, world!"));
        assert_eq!(m.address.channel_id, "facebook");
        assert_eq!(m.address.bot_id(), PAGE);
        assert_eq!(m.address.user_id(), PSID);
        assert_eq!(m.address.conversation_id(), Some(PSID));
        assert_eq!(
            m.address.id.as_deref(),
            Some("mid.1457764197618:41d102a3e1ae206a38")
        );
        assert_eq!(
            m.timestamp.and_then(|t| t.format(&Rfc3339).ok()).as_deref(),
            Some("2016-03-23T00:25:52.478Z")
        );
        assert_eq!(m.source_event.get("facebook"), Some(&it));
        assert!(m.value.is_none() && m.attachments.is_empty());
    }

    #[test]
    fn the_reply_address_renders_back_to_the_same_psid() {
        let ev = one(json!({"message": {"mid": "m_rt", "text": "hi"}}));
        let fb = fb();
        let reply = Message {
            address: ev.message.address.clone(),
            text: Some("hello back".into()),
            ..Message::default()
        };
        let rendered = fb.render_send(&reply, None).unwrap();
        assert_eq!(rendered.requests.len(), 1);
        let req = &rendered.requests[0];
        assert_eq!(req.credential, PAGE);
        assert!(fb.has_credentials(ev.message.address.bot_id()));
        let body: Value = serde_json::from_slice(req.body.as_bytes()).unwrap();
        assert_eq!(body["recipient"]["id"], PSID);
        assert_eq!(body["messaging_type"], "RESPONSE");
    }

    #[test]
    fn attachments_keep_their_urls_and_media_types() {
        let ev = one(
            json!({"message": {"mid": "m_att", "sticker_id": 369239263222822u64, "attachments": [
                {"type": "image", "payload": {"url": "https://scontent.xx.fbcdn.net/v/t1/photo.JPG?oh=1&oe=2", "sticker_id": 369239263222822u64}},
                {"type": "video", "payload": {"url": "https://video.xx.fbcdn.net/v/clip.mp4?x=1"}},
                {"type": "audio", "payload": {"url": "https://cdn.fbsbx.com/v/audioclip-1"}},
                {"type": "file", "payload": {"url": "https://cdn.fbsbx.com/v/report.pdf?dl=1"}},
                {"type": "fallback", "title": "A link", "url": "https://example.com/", "payload": null},
                {"type": "location", "payload": {"coordinates": {"lat": 1.5, "long": 2.5}}},
                {"type": "image", "payload": {}}
            ]}}),
        );
        let m = &ev.message;
        let got: Vec<(&str, &str)> = m
            .attachments
            .iter()
            .map(|a| (a.content_type.as_str(), a.content_url.as_deref().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "image/jpeg",
                    "https://scontent.xx.fbcdn.net/v/t1/photo.JPG?oh=1&oe=2"
                ),
                ("video/mp4", "https://video.xx.fbcdn.net/v/clip.mp4?x=1"),
                ("audio/*", "https://cdn.fbsbx.com/v/audioclip-1"),
                ("application/pdf", "https://cdn.fbsbx.com/v/report.pdf?dl=1"),
            ]
        );
        assert!(m.text.is_none());
        let native = &m.source_event["facebook"]["message"];
        assert_eq!(native["sticker_id"], 369239263222822u64);
        assert_eq!(native["attachments"][4]["type"], "fallback");
        assert_eq!(
            native["attachments"][5]["payload"]["coordinates"]["lat"],
            1.5
        );
    }

    #[test]
    fn quick_replies_and_postbacks_give_the_bot_what_it_sent() {
        // imBack / postBack: the payload is the value the bot set, as text and as value.
        let qr = one(
            json!({"message": {"mid": "m_qr", "text": "Red", "quick_reply": {"payload": "pick red"}}}),
        );
        assert_eq!(qr.message.kind, MessageType::Message);
        assert_eq!(qr.message.text.as_deref(), Some("pick red"));
        assert_eq!(qr.message.value, Some(json!("pick red")));
        assert_eq!(qr.dedupe_key, "m_qr");
        assert_eq!(
            qr.message.source_event["facebook"]["message"]["text"],
            "Red"
        );

        // messageBack with a JSON value: the value as JSON, the text the title shown.
        let mb = one(
            json!({"message": {"mid": "m_qr2", "text": "Buy", "quick_reply": {"payload": "{\"sku\":7}"}}}),
        );
        assert_eq!(mb.message.value, Some(json!({"sku": 7})));
        assert_eq!(mb.message.text.as_deref(), Some("Buy"));

        // Postback buttons, as `render::button` sends them.
        let pb = one(json!({"postback": {"mid": "m_pb", "title": "Yes", "payload": "yes please"}}));
        assert_eq!(pb.message.kind, MessageType::Message);
        assert_eq!(pb.message.text.as_deref(), Some("yes please"));
        assert_eq!(pb.message.value, Some(json!("yes please")));
        assert_eq!(pb.dedupe_key, "m_pb");
        assert_eq!(pb.message.address.id.as_deref(), Some("m_pb"));
        assert_eq!(
            pb.message.source_event["facebook"]["postback"]["title"],
            "Yes"
        );

        let da = one(json!({"postback": {"title": "Help", "payload": "action?help=topics"}}));
        assert_eq!(da.message.text.as_deref(), Some("action?help=topics"));
        assert_eq!(
            da.dedupe_key,
            format!("{PAGE}:{PSID}:1458692752478:postback")
        );
        assert!(da.message.address.id.is_none());

        let mb = one(json!({"postback": {"mid": "m_pb2", "title": "Order", "payload": "[1,2]"}}));
        assert_eq!(mb.message.value, Some(json!([1, 2])));
        assert_eq!(mb.message.text.as_deref(), Some("Order"));

        // Get Started without a payload: the title.
        let gs = one(json!({"postback": {"title": "Get Started"}}));
        assert_eq!(gs.message.text.as_deref(), Some("Get Started"));
        assert!(gs.message.value.is_none());
    }

    #[test]
    fn a_reply_to_is_kept_in_source_event() {
        let ev = one(
            json!({"message": {"mid": "m_2", "text": "this one", "reply_to": {"mid": "m_1", "is_self_reply": false}}}),
        );
        assert_eq!(ev.message.text.as_deref(), Some("this one"));
        assert_eq!(
            ev.message.source_event["facebook"]["message"]["reply_to"]["mid"],
            "m_1"
        );
        assert_eq!(ev.message.address.id.as_deref(), Some("m_2"));
    }

    #[test]
    fn echoes_of_the_page_are_dropped() {
        // As Meta sends them: the page is the sender, the person the recipient.
        let echo = json!({"sender": {"id": PAGE}, "recipient": {"id": PSID}, "timestamp": 1457764197627u64,
            "message": {"is_echo": true, "app_id": 1517776481860111u64, "metadata": "m", "mid": "mid.echo", "text": "hello, world!"}});
        let user = item(json!({"message": {"mid": "m_user", "text": "hi"}}));
        let evs = events(&page_body(vec![echo.clone(), user, echo]));
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].dedupe_key, "m_user");
    }

    #[test]
    fn other_events_become_named_events() {
        let read = one(json!({"read": {"watermark": 1458668856253u64}}));
        assert_eq!(read.message.kind, MessageType::Event);
        assert_eq!(read.message.name.as_deref(), Some("read"));
        assert_eq!(
            read.message.value,
            Some(json!({"watermark": 1458668856253u64}))
        );
        assert_eq!(read.dedupe_key, format!("{PAGE}:{PSID}:1458692752478:read"));

        // Delivery receipts have no timestamp: the watermark keys them.
        let delivery = json!({"sender": {"id": PSID}, "recipient": {"id": PAGE},
            "delivery": {"mids": ["mid.1458668856218:ed81099e15d3f4f233"], "watermark": 1458668856253u64}});
        let mut later = delivery.clone();
        later["delivery"]["watermark"] = json!(1458668856999u64);
        let body = json!({"object": "page", "entry": [{"id": PAGE, "time": 1458668857000u64, "messaging": [delivery, later]}]});
        let evs = events(&body);
        assert_eq!(
            evs[1].dedupe_key,
            format!("{PAGE}:{PSID}:1458668856999:delivery")
        );
        assert_eq!(evs[0].message.name.as_deref(), Some("delivery"));
        assert_eq!(
            evs[0].dedupe_key,
            format!("{PAGE}:{PSID}:1458668856253:delivery")
        );
        // The entry's time stands in for the item's.
        assert_eq!(
            evs[0].message.timestamp.map(|t| t.unix_timestamp()),
            Some(1458668857)
        );

        let reaction = one(
            json!({"reaction": {"reaction": "love", "emoji": "\u{2764}\u{FE0F}", "action": "react", "mid": "m_reacted"}}),
        );
        let m = &reaction.message;
        assert_eq!(m.kind, MessageType::MessageReaction);
        assert_eq!(m.reactions_added, ["love"]);
        assert!(m.reactions_removed.is_empty());
        assert_eq!(m.address.id.as_deref(), Some("m_reacted"));
        assert_eq!(m.address.conversation_id(), Some(PSID));
        assert_eq!(
            reaction.dedupe_key,
            format!("{PAGE}:{PSID}:1458692752478:reaction"),
            "the reacted-to mid is not this event's id"
        );
        let other = one(
            json!({"reaction": {"reaction": "other", "emoji": "\u{1F525}", "action": "unreact", "mid": "m_reacted"}}),
        );
        assert_eq!(other.message.reactions_removed, ["\u{1F525}"]);
        assert!(other.message.reactions_added.is_empty());

        for (field, body) in [
            (
                "optin",
                json!({"type": "notification_messages", "payload": "p", "notification_messages_token": "t"}),
            ),
            (
                "referral",
                json!({"ref": "r", "source": "SHORTLINK", "type": "OPEN_THREAD"}),
            ),
            ("game_play", json!({"game_id": "g"})),
        ] {
            let ev = one(json!({ field: body }));
            assert_eq!(ev.message.kind, MessageType::Event);
            assert_eq!(ev.message.name.as_deref(), Some(field));
            assert_eq!(ev.message.value.as_ref(), Some(&body));
            assert_eq!(ev.message.address.user_id(), PSID);
            assert_eq!(ev.message.source_event["facebook"][field], body);
        }
    }

    #[test]
    fn a_batch_of_100_events_from_10_senders_is_kept_whole_and_in_order() {
        // 50 entries of two items each, senders interleaved, as Meta batches them.
        let entries: Vec<Value> = (0..50)
            .map(|e| {
                let items: Vec<Value> = (0..2)
                    .map(|k| {
                        let n = e * 2 + k;
                        json!({"sender": {"id": format!("psid-{}", n % 10)}, "recipient": {"id": PAGE},
                            "timestamp": 1_700_000_000_000u64 + n as u64,
                            "message": {"mid": format!("m_{n}"), "text": format!("#{n}")}})
                    })
                    .collect();
                json!({"id": PAGE, "time": 1_700_000_000_000u64, "messaging": items})
            })
            .collect();
        let evs = events(&json!({"object": "page", "entry": entries}));
        assert_eq!(evs.len(), 100);
        let keys: std::collections::BTreeSet<&str> =
            evs.iter().map(|e| e.dedupe_key.as_str()).collect();
        assert_eq!(keys.len(), 100);
        for s in 0..10 {
            let psid = format!("psid-{s}");
            let texts: Vec<&str> = evs
                .iter()
                .filter(|e| e.message.address.user_id() == psid)
                .map(|e| e.message.text.as_deref().unwrap())
                .collect();
            let expected: Vec<String> = (0..10).map(|i| format!("#{}", i * 10 + s)).collect();
            assert_eq!(texts, expected, "{psid}");
            assert!(
                evs.iter()
                    .filter(|e| e.message.address.user_id() == psid)
                    .all(|e| e.message.address.conversation_id() == Some(psid.as_str()))
            );
        }
    }

    #[test]
    fn entries_of_several_pages_keep_their_page_and_unknown_pages_are_left_out() {
        let body = json!({"object": "page", "entry": [
            {"id": PAGE, "time": 1, "messaging": [item(json!({"message": {"mid": "m_a", "text": "a"}}))]},
            {"id": "999", "time": 1, "messaging": [{"sender": {"id": PSID}, "recipient": {"id": "999"}, "timestamp": 1, "message": {"mid": "m_x", "text": "x"}}]},
            {"id": PAGE2.parse::<u64>().unwrap(), "time": 1, "messaging": [{"sender": {"id": PSID}, "recipient": {"id": PAGE2}, "timestamp": 2, "message": {"mid": "m_b", "text": "b"}}]}
        ]});
        let evs = events(&body);
        let got: Vec<(&str, &str)> = evs
            .iter()
            .map(|e| (e.dedupe_key.as_str(), e.message.address.bot_id()))
            .collect();
        assert_eq!(got, [("m_a", PAGE), ("m_b", PAGE2)]);
    }

    #[test]
    fn bodies_over_the_caps_or_not_from_messenger_are_unreadable() {
        let fb = fb();
        let unreadable = |body: &[u8]| {
            let call = Call::signed(body);
            verify(&fb, &call).unwrap();
            matches!(fb.parse(&call.req()), Err(WebhookError::Unreadable(_)))
        };
        let entry = json!({"id": PAGE, "time": 1, "messaging": []});
        let many = json!({"object": "page", "entry": vec![entry; MAX_ENTRIES + 1]});
        assert!(unreadable(&serde_json::to_vec(&many).unwrap()));
        let it = item(json!({"read": {"watermark": 1}}));
        let items = json!({"object": "page", "entry": [
            {"id": PAGE, "messaging": vec![it.clone(); MAX_EVENTS / 2]},
            {"id": PAGE, "messaging": vec![it.clone(); MAX_EVENTS / 2 + 1]}
        ]});
        assert!(unreadable(&serde_json::to_vec(&items).unwrap()));
        let at_cap =
            json!({"object": "page", "entry": [{"id": PAGE, "messaging": vec![it; MAX_EVENTS]}]});
        assert_eq!(events(&at_cap).len(), MAX_EVENTS);

        let long = "9".repeat(MAX_ID + 1);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for body in [
            b"not json".to_vec(),
            deep.into_bytes(),
            br#"{"object":"instagram","entry":[]}"#.to_vec(),
            br#"{"object":"page","entry":[{"messaging":[]}]}"#.to_vec(),
            serde_json::to_vec(&page_body(vec![json!("text")])).unwrap(),
            serde_json::to_vec(&page_body(vec![json!({"sender": {"id": PSID}, "recipient": {"id": PAGE2}, "message": {"mid": "m"}})])).unwrap(),
            serde_json::to_vec(&page_body(vec![json!({"recipient": {"id": PAGE}, "message": {"mid": "m"}})])).unwrap(),
            serde_json::to_vec(&page_body(vec![json!({"sender": {"id": long}, "recipient": {"id": PAGE}, "message": {"mid": "m"}})])).unwrap(),
            serde_json::to_vec(&page_body(vec![item(json!({"message": "hi"}))])).unwrap(),
        ] {
            assert!(unreadable(&body), "{}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        }
    }

    #[test]
    fn timestamps_as_strings_and_chat_plugin_senders_are_read() {
        let body = json!({"object": "page", "entry": [{"id": PAGE, "time": 1, "messaging": [
            {"sender": {"user_ref": "ref-1"}, "recipient": {"id": PAGE}, "timestamp": "1527459824000",
             "postback": {"mid": "m_s", "title": "Go", "payload": "go"}}]}]});
        let ev = &events(&body)[0];
        assert_eq!(ev.message.address.user_id(), "ref-1");
        assert_eq!(
            ev.message
                .timestamp
                .and_then(|t| t.format(&Rfc3339).ok())
                .as_deref(),
            Some("2018-05-27T22:23:44Z")
        );
        assert_eq!(time_of_ms(u64::MAX), None);
    }
}
