//! Slack's receiving side: the signature check of every webhook call (Events API,
//! interactivity, slash commands) and their normalization into the model, each event with the
//! address a reply goes to.
//!
//! Owns only the pure part: nothing here stores, answers or calls Slack. The listener calls
//! `verify` before anything else, then `parse`. It must not touch the send side (`render`,
//! `client`): an address made here is checked against `render::render_send` in tests only.

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::config::SlackConfig;
use crate::channels::channel::{
    Inbound, Parsed, Reply, WebhookAnswer, WebhookError, WebhookRequest,
};
use crate::settings::Secret;

pub const PATH_EVENTS: &str = "/webhooks/slack/events";
pub const PATH_INTERACTIVITY: &str = "/webhooks/slack/interactivity";
pub const PATH_COMMANDS: &str = "/webhooks/slack/commands";

const SIGNATURE_HEADER: &str = "x-slack-signature";
const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Slack: "If the timestamp is more than five minutes from local time, it could be a replay
/// attack". Both ways: a timestamp from the future is as suspect as an old one.
const MAX_SKEW_SECS: u64 = 5 * 60;
/// `v0=` and 32 bytes in hex.
const SIGNATURE_LEN: usize = 3 + 64;
/// Unix seconds have 10 digits until 2286: more is not a timestamp.
const TIMESTAMP_MAX_DIGITS: usize = 12;

/// Slack behind the `Inbound` interface: the configured signing secrets and the workspaces that
/// events are addressed to.
pub struct SlackInbound {
    config: SlackConfig,
    secrets: Vec<Secret>,
}

impl SlackInbound {
    /// `None` without a signing secret: nothing could be verified, so nothing is received.
    pub fn new(config: &SlackConfig) -> Option<Self> {
        let secrets: Vec<Secret> = config.signing_secrets().into_iter().cloned().collect();
        if secrets.is_empty() {
            return None;
        }
        Some(Self {
            config: config.clone(),
            secrets,
        })
    }

    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let signature = single_header(req, SIGNATURE_HEADER)?
            .ok_or(WebhookError::Unverified("missing X-Slack-Signature"))?;
        let timestamp = single_header(req, TIMESTAMP_HEADER)?.ok_or(WebhookError::Unverified(
            "missing X-Slack-Request-Timestamp",
        ))?;
        if timestamp.is_empty()
            || timestamp.len() > TIMESTAMP_MAX_DIGITS
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(WebhookError::Unverified(
                "X-Slack-Request-Timestamp is not a number",
            ));
        }
        let ts: u64 = timestamp
            .parse()
            .map_err(|_| WebhookError::Unverified("X-Slack-Request-Timestamp is not a number"))?;
        if ts.abs_diff(req.received_at) > MAX_SKEW_SECS {
            return Err(WebhookError::Unverified(
                "X-Slack-Request-Timestamp outside the 5-minute window",
            ));
        }
        let expected = signature
            .strip_prefix("v0=")
            .filter(|_| signature.len() == SIGNATURE_LEN)
            .and_then(decode_hex)
            .ok_or(WebhookError::Unverified(
                "X-Slack-Signature is not v0=<hex>",
            ))?;
        // Every secret is tried, each in constant time: which one matched says nothing an
        // attacker can use, since each comparison on its own leaks nothing.
        let mut ok = false;
        for secret in &self.secrets {
            ok |= signature_matches(secret, timestamp, req.body, &expected);
        }
        if ok {
            Ok(())
        } else {
            Err(WebhookError::Unverified("X-Slack-Signature does not match"))
        }
    }
}

/// The header's value when it appears once; a repeated signature or timestamp is refused
/// rather than guessing which one Slack meant.
fn single_header<'a>(
    req: &'a WebhookRequest<'_>,
    name: &'static str,
) -> Result<Option<&'a str>, WebhookError> {
    let mut values = req.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(WebhookError::Unverified("X-Slack header repeated"));
    }
    first
        .to_str()
        .map(|s| Some(s.trim()))
        .map_err(|_| WebhookError::Unverified("X-Slack header is not ASCII"))
}

/// HMAC-SHA256 of `v0:{timestamp}:{body}` keyed by the signing secret, compared with `expected`
/// by `verify_slice` (constant time).
fn signature_matches(secret: &Secret, timestamp: &str, body: &[u8], expected: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(expected).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

impl Inbound for SlackInbound {
    fn paths(&self) -> Vec<String> {
        [PATH_EVENTS, PATH_INTERACTIVITY, PATH_COMMANDS]
            .map(String::from)
            .to_vec()
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        let result = self.check(req);
        Box::pin(async move { result })
    }

    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        parse::parse(&self.config, req)
    }

    /// A slash command's answer is a message Slack shows in the channel (`response_type`
    /// `in_channel`, from `source_event.slack.response_type`) or to the user only (the default,
    /// `ephemeral`), or a JSON body as is; an interaction takes a JSON body only (a modal's
    /// `response_action`): a message to post goes through Send.
    fn answer(&self, kind: &str, reply: &Reply) -> Result<WebhookAnswer, String> {
        let json = |v: &serde_json::Value| WebhookAnswer {
            status: 200,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        };
        if let Some(body) = &reply.body {
            if !body.is_object() {
                return Err("respond.body: Slack takes a JSON object".into());
            }
            return Ok(json(body));
        }
        let Some(message) = &reply.message else {
            return Err("respond: give a message or a body".into());
        };
        if kind != REPLY_COMMAND {
            return Err(
                "respond.message: a Slack interaction's answer is a body (response_action);                  post a message with Send"
                    .into(),
            );
        }
        let mut message = message.clone();
        let response_type = message
            .source_event
            .get_mut(super::render::CHANNEL_ID)
            .and_then(|e| e.as_object_mut())
            .and_then(|o| o.remove("response_type"))
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "ephemeral".into());
        if !matches!(response_type.as_str(), "ephemeral" | "in_channel") {
            return Err(
                "respond.message.source_event.slack.response_type: `ephemeral` or `in_channel`"
                    .into(),
            );
        }
        let rendered = super::render::render_send(&message, None, &self.config)
            .map_err(|e| crate::bounded::cap(&format!("respond.message: {e}"), 300).into_owned())?;
        let [request] = rendered.requests.as_slice() else {
            return Err(
                "respond.message: it needs more than one Slack message; answer with one".into(),
            );
        };
        let mut body: serde_json::Value = serde_json::from_slice(request.body.as_bytes())
            .map_err(|_| "respond.message: not renderable".to_string())?;
        if let Some(o) = body.as_object_mut() {
            for k in ["channel", "thread_ts", "unfurl_links", "unfurl_media"] {
                o.remove(k);
            }
            o.insert("response_type".into(), response_type.into());
        }
        Ok(json(&body))
    }
}

/// The kinds of answer Slack waits for, and how long: Slack gives up after 3 s.
const REPLY_COMMAND: &str = "command";
const REPLY_INTERACTION: &str = "interaction";
const REPLY_WITHIN: std::time::Duration = std::time::Duration::from_millis(2500);

/// The events of a Socket Mode envelope's `payload`, by the envelope's `type` (`events_api`,
/// `interactive`, `slash_commands`): the same normalization as the webhook bodies. `None`: a
/// type that carries no events.
pub fn envelope_events(
    config: &SlackConfig,
    kind: &str,
    payload: serde_json::Value,
) -> Option<Result<Vec<crate::channels::channel::InboundEvent>, WebhookError>> {
    let parsed = match kind {
        "events_api" => parse::events_payload(config, payload),
        "interactive" => parse::interaction_payload(config, payload),
        "slash_commands" => parse::command_payload(config, &payload),
        _ => return None,
    };
    Some(parsed.map(|p| p.events))
}

mod parse {
    //! Slack's three bodies into events. Every string kept is capped, every list bounded; the
    //! native payload goes to `source_event["slack"]` without its verification `token` (a
    //! shared secret of the app, which a bot must never receive).

    use serde_json::{Map, Value, json};

    use super::*;
    use crate::channels::channel::{InboundEvent, ReplyWindow};
    use crate::model::{Address, Attachment, Conversation, Identity, Message, MessageType};

    /// Events made from one call: a `block_actions` payload lists its actions (one per click in
    /// practice); anything past this is dropped rather than stored.
    pub const MAX_EVENTS: usize = 25;
    /// Characters of text kept (Slack truncates messages at 40,000).
    pub const MAX_TEXT_CHARS: usize = 40_000;
    /// Files kept per message (Slack shares at most 10 at once).
    pub const MAX_FILES: usize = 10;
    /// Mention entities per message.
    pub const MAX_MENTIONS: usize = 50;
    /// Longest id kept (channel, user, ts, trigger_id, file names): a longer one is not Slack's.
    pub const MAX_ID_CHARS: usize = 255;
    /// The longest file URL kept as `content_url` (FetchAttachment takes no longer one).
    const MAX_URL_CHARS: usize = crate::channels::fetch::MAX_URL_CHARS;
    /// Form fields read from a slash command or interactivity body (Slack sends about 15).
    const MAX_FORM_PAIRS: usize = 64;
    /// `url_verification` challenges are some 50 characters.
    const MAX_CHALLENGE_CHARS: usize = 512;

    const CHANNEL_ID: &str = super::super::render::CHANNEL_ID;

    fn unreadable(why: &str) -> WebhookError {
        WebhookError::Unreadable(why.to_string())
    }

    pub fn parse(config: &SlackConfig, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        match req.path {
            PATH_EVENTS => events(config, req.body),
            PATH_INTERACTIVITY => interactivity(config, req.body),
            PATH_COMMANDS => command(config, req.body),
            _ => Err(unreadable("not a Slack webhook path")),
        }
    }

    /// A string field that fits as an id.
    fn id<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
        v.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.chars().count() <= MAX_ID_CHARS)
    }

    fn capped(s: &str, max: usize) -> String {
        match s.char_indices().nth(max) {
            Some((i, _)) => s[..i].to_string(),
            None => s.to_string(),
        }
    }

    fn ident(id: &str) -> Identity {
        Identity {
            id: id.to_string(),
            ..Default::default()
        }
    }

    /// The native payload as a bot may see it: without the app's verification token.
    fn without_token(mut v: Value) -> Value {
        if let Some(o) = v.as_object_mut() {
            o.remove("token");
        }
        v
    }

    /// `address.bot.id` must be what the send side selects the token by: a configured
    /// workspace's `bot_id`. The workspace is the one whose `team_id` is the event's team; else
    /// one whose `bot_id` is the bot user Slack names (an operator may configure that id);
    /// else the only workspace when it names no team. Otherwise the bot user itself, so the
    /// reply fails with the configured ids named rather than going out with another's token.
    pub fn bot_for(
        config: &SlackConfig,
        team: Option<&str>,
        bot_user: Option<&str>,
    ) -> Option<Identity> {
        let ws = &config.workspaces;
        let found = team
            .and_then(|t| ws.iter().find(|w| w.team_id.as_deref() == Some(t)))
            .or_else(|| bot_user.and_then(|u| ws.iter().find(|w| w.bot_id == u)))
            .or_else(|| match ws.as_slice() {
                [only] if only.team_id.is_none() => Some(only),
                _ => None,
            });
        found.map(|w| w.bot_id.as_str()).or(bot_user).map(ident)
    }

    /// Slack's `ts` (`1531420618.000200`: seconds, then a fraction) as a time.
    pub fn ts_to_time(ts: &str) -> Option<time::OffsetDateTime> {
        let (secs, frac) = ts.split_once('.').unwrap_or((ts, "0"));
        if secs.is_empty()
            || secs.len() > 12
            || frac.is_empty()
            || frac.len() > 9
            || !secs.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let secs: i64 = secs.parse().ok()?;
        let nanos: i64 = format!("{frac:0<9}").parse().ok()?;
        time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(secs) * 1_000_000_000 + i128::from(nanos),
        )
        .ok()
    }

    /// `<@U123>` and `<@U123|name>` in Slack text: mention entities as the Bot Framework has
    /// them (`{type: "mention", mentioned: {id}, text}`); the text keeps them as they are.
    pub fn mentions(text: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("<@") {
            if out.len() >= MAX_MENTIONS {
                break;
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find('>') else { break };
            let inner = &after[..end];
            let id = inner.split('|').next().unwrap_or("");
            if !id.is_empty()
                && id.len() <= MAX_ID_CHARS
                && id.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                let mut mentioned = Map::new();
                mentioned.insert("id".into(), id.into());
                if let Some(name) = inner.split_once('|').map(|x| x.1).filter(|n| !n.is_empty()) {
                    mentioned.insert("name".into(), capped(name, MAX_ID_CHARS).into());
                }
                out.push(json!({
                    "type": "mention",
                    "mentioned": Value::Object(mentioned),
                    "text": &rest[start..start + 2 + end + 1],
                }));
            }
            rest = &after[end + 1..];
        }
        out
    }

    /// Files shared with a message: name, media type, and as `content_url` the file's
    /// `url_private` (else `url_private_download`). Those need the bot token: a bot fetches
    /// the bytes with FetchAttachment, which the gateway answers with the token it keeps.
    /// `url_private` rather than the download URL: sent back, it is what Slack's `slack_file`
    /// image source takes.
    fn files(event: &Value) -> Vec<Attachment> {
        event
            .get("files")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|f| id(f, "id").is_some())
            .take(MAX_FILES)
            .map(|f| Attachment {
                content_type: id(f, "mimetype")
                    .unwrap_or("application/octet-stream")
                    .to_string(),
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .or_else(|| f.get("title").and_then(Value::as_str))
                    .map(|n| capped(n, MAX_ID_CHARS)),
                content_url: ["url_private", "url_private_download"]
                    .iter()
                    .filter_map(|k| f.get(*k).and_then(Value::as_str))
                    .find(|u| u.starts_with("https://") && u.len() <= MAX_URL_CHARS)
                    .map(str::to_string),
                ..Default::default()
            })
            .collect()
    }

    fn conversation(channel: &str, channel_type: Option<&str>) -> Conversation {
        Conversation {
            id: channel.to_string(),
            // A public or private channel or a group DM has more than two members; an `im`
            // is the user and the bot.
            is_group: channel_type.map(|t| matches!(t, "channel" | "group" | "mpim")),
            conversation_type: channel_type.map(|t| capped(t, MAX_ID_CHARS)),
            ..Default::default()
        }
    }

    fn text_of(v: &Value) -> Option<String> {
        v.get("text")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| capped(t, MAX_TEXT_CHARS))
    }

    // -----------------------------------------------------------------------------------------
    // Events API

    fn events(config: &SlackConfig, body: &[u8]) -> Result<Parsed, WebhookError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|_| unreadable("Events API body is not JSON"))?;
        events_payload(config, v)
    }

    /// An Events API payload, as a webhook body or a Socket Mode `events_api` envelope carries it.
    pub fn events_payload(config: &SlackConfig, v: Value) -> Result<Parsed, WebhookError> {
        match v.get("type").and_then(Value::as_str) {
            Some("url_verification") => {
                let challenge = v
                    .get("challenge")
                    .and_then(Value::as_str)
                    .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE_CHARS)
                    .ok_or_else(|| unreadable("url_verification without a usable challenge"))?;
                Ok(Parsed {
                    events: Vec::new(),
                    answer: Some(WebhookAnswer {
                        status: 200,
                        content_type: "application/json",
                        body: json!({ "challenge": challenge }).to_string().into_bytes(),
                    }),
                    reply: None,
                })
            }
            Some("event_callback") => {
                let events = event_callback(config, v)?.into_iter().collect();
                Ok(Parsed {
                    events,
                    answer: None,
                    reply: None,
                })
            }
            // `app_rate_limited` and envelopes to come: acknowledged, nothing to deliver.
            _ => Ok(Parsed::default()),
        }
    }

    fn event_callback(
        config: &SlackConfig,
        v: Value,
    ) -> Result<Option<InboundEvent>, WebhookError> {
        let event = v
            .get("event")
            .filter(|e| e.is_object())
            .ok_or_else(|| unreadable("event_callback without an event"))?;
        let team = id(&v, "team_id").or_else(|| id(event, "team"));
        // Slack lists the installation the event is for; its bot user is ours.
        let bot_user = v
            .get("authorizations")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| id(a, "user_id"));
        let (kind, post) = match event.get("type").and_then(Value::as_str) {
            Some("message") => match event.get("subtype").and_then(Value::as_str) {
                None | Some("file_share" | "thread_broadcast" | "me_message") => {
                    (MessageType::Message, event)
                }
                // The edited message as it is now, its `ts` the original's.
                Some("message_changed") => (
                    MessageType::MessageUpdate,
                    event.get("message").unwrap_or(&Value::Null),
                ),
                Some("message_deleted") => (
                    MessageType::MessageDelete,
                    event.get("previous_message").unwrap_or(&Value::Null),
                ),
                // Joins, topic changes, bot_message and the like are not someone talking to
                // the bot.
                _ => return Ok(None),
            },
            Some("app_mention") => (MessageType::Message, event),
            Some(t @ ("reaction_added" | "reaction_removed")) => {
                return Ok(reaction(config, &v, event, team, bot_user, t));
            }
            Some(t @ ("member_joined_channel" | "member_left_channel")) => {
                return Ok(membership(config, &v, event, team, bot_user, t));
            }
            _ => return Ok(None),
        };
        // Bolt's ignoreSelf, stricter: every bot-posted message is left out (the bot's own
        // carry its bot id, which only auth.test would tell; another bot's would start loops),
        // with its edits and deletions.
        if post.get("bot_id").is_some_and(|b| !b.is_null())
            || bot_user.is_some_and(|u| id(post, "user") == Some(u))
        {
            return Ok(None);
        }
        let user = id(post, "user");
        if user.is_none() && kind != MessageType::MessageDelete {
            return Ok(None);
        }
        let channel =
            id(event, "channel").ok_or_else(|| unreadable("message event without a channel"))?;
        let ts = id(event, "ts").ok_or_else(|| unreadable("message event without a ts"))?;
        let message_id = match kind {
            MessageType::MessageDelete => id(event, "deleted_ts"),
            _ => id(post, "ts"),
        }
        .ok_or_else(|| unreadable("message event without the message's ts"))?;
        let text = match kind {
            MessageType::MessageDelete => None,
            _ => text_of(post),
        };
        let entities = text.as_deref().map(mentions).unwrap_or_default();
        let address = Address {
            channel_id: CHANNEL_ID.into(),
            user: user.map(ident),
            bot: bot_for(config, team, bot_user),
            conversation: Some(conversation(channel, id(event, "channel_type"))),
            service_url: None,
            id: Some(message_id.to_string()),
            thread_id: id(post, "thread_ts").map(String::from),
        };
        let dedupe_key = match kind {
            // The `app_mention` and the `message` of one post carry different event ids (and
            // Slack has resent events with new ones): the post itself is the key.
            MessageType::Message => format!("{}:{channel}:{ts}", team.unwrap_or("")),
            _ => id(&v, "event_id")
                .map(String::from)
                .unwrap_or_else(|| format!("{}:{channel}:{ts}", team.unwrap_or(""))),
        };
        let attachments = match kind {
            MessageType::MessageDelete => Vec::new(),
            _ => files(post),
        };
        let mut message = Message {
            kind,
            address,
            text,
            attachments,
            entities,
            timestamp: ts_to_time(ts),
            ..Default::default()
        };
        message
            .source_event
            .insert(CHANNEL_ID.into(), without_token(v));
        Ok(Some(InboundEvent {
            dedupe_key,
            message,
        }))
    }

    /// When the event happened: its `event_ts`, else the envelope's `event_time` (seconds).
    fn event_time(v: &Value, event: &Value) -> Option<time::OffsetDateTime> {
        id(event, "event_ts").and_then(ts_to_time).or_else(|| {
            v.get("event_time")
                .and_then(Value::as_i64)
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        })
    }

    /// The key of an event that is not a post: Slack's `event_id`, which its retries repeat.
    fn event_key(v: &Value, event: &Value) -> Option<String> {
        id(v, "event_id")
            .or_else(|| id(event, "event_ts"))
            .map(String::from)
    }

    /// A reaction on a message: `address.id` is the message reacted to. Slack does not say
    /// which thread it is in, so a reply goes to the channel. The bot's own reactions are
    /// left out, as its messages are.
    fn reaction(
        config: &SlackConfig,
        v: &Value,
        event: &Value,
        team: Option<&str>,
        bot_user: Option<&str>,
        kind: &str,
    ) -> Option<InboundEvent> {
        let item = event.get("item")?;
        if item.get("type").and_then(Value::as_str) != Some("message") {
            return None;
        }
        let user = id(event, "user")?;
        if bot_user == Some(user) {
            return None;
        }
        let reaction = capped(id(event, "reaction")?, MAX_ID_CHARS);
        let mut message = Message {
            kind: MessageType::MessageReaction,
            address: Address {
                channel_id: CHANNEL_ID.into(),
                user: Some(ident(user)),
                bot: bot_for(config, team, bot_user),
                conversation: Some(conversation(id(item, "channel")?, None)),
                service_url: None,
                id: Some(id(item, "ts")?.to_string()),
                thread_id: None,
            },
            timestamp: event_time(v, event),
            ..Default::default()
        };
        if kind == "reaction_added" {
            message.reactions_added.push(reaction);
        } else {
            message.reactions_removed.push(reaction);
        }
        enveloped(v, event, message)
    }

    /// Someone joined or left a channel: a conversation update. The bot's own joins are kept
    /// (as Bolt keeps them): a bot greets the channel it was added to.
    fn membership(
        config: &SlackConfig,
        v: &Value,
        event: &Value,
        team: Option<&str>,
        bot_user: Option<&str>,
        kind: &str,
    ) -> Option<InboundEvent> {
        let member = ident(id(event, "user")?);
        let channel = id(event, "channel")?;
        let mut message = Message {
            kind: MessageType::ConversationUpdate,
            address: Address {
                channel_id: CHANNEL_ID.into(),
                // Who acted: the inviter when Slack names one, else the member.
                user: Some(
                    id(event, "inviter")
                        .map(ident)
                        .unwrap_or_else(|| member.clone()),
                ),
                bot: bot_for(config, team, bot_user),
                // Joins happen in channels, private channels and group DMs only. Slack's
                // one-letter channel_type does not tell public from private.
                conversation: Some(Conversation {
                    id: channel.to_string(),
                    is_group: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
            timestamp: event_time(v, event),
            ..Default::default()
        };
        if kind == "member_joined_channel" {
            message.members_added.push(member);
        } else {
            message.members_removed.push(member);
        }
        enveloped(v, event, message)
    }

    /// An Events API event as delivered: the envelope (without Slack's verification token) as
    /// its native event, keyed by `event_id`.
    fn enveloped(v: &Value, event: &Value, mut message: Message) -> Option<InboundEvent> {
        message
            .source_event
            .insert(CHANNEL_ID.into(), without_token(v.clone()));
        Some(InboundEvent {
            dedupe_key: event_key(v, event)?,
            message,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Interactivity

    /// The form fields of a body, at most `MAX_FORM_PAIRS`.
    fn form(body: &[u8]) -> Vec<(String, String)> {
        url::form_urlencoded::parse(body)
            .take(MAX_FORM_PAIRS)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn interactivity(config: &SlackConfig, body: &[u8]) -> Result<Parsed, WebhookError> {
        let payload = form(body)
            .into_iter()
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v)
            .ok_or_else(|| unreadable("interactivity body without a payload"))?;
        let p: Value = serde_json::from_str(&payload)
            .map_err(|_| unreadable("interactivity payload is not JSON"))?;
        interaction_payload(config, p)
    }

    /// An interactivity payload, as a webhook form's `payload` field or a Socket Mode
    /// `interactive` envelope carries it.
    pub fn interaction_payload(config: &SlackConfig, p: Value) -> Result<Parsed, WebhookError> {
        if !p.is_object() {
            return Err(unreadable("interactivity payload is not an object"));
        }
        let events = match p.get("type").and_then(Value::as_str) {
            Some("block_actions") => block_actions(config, &p)?,
            Some(other) => {
                // Modals, shortcuts, message actions: passed on as events the bot can read
                // natively until the model maps them.
                let name = capped(other, MAX_ID_CHARS);
                let key = id(&p, "trigger_id")
                    .map(String::from)
                    .or_else(|| p.get("view").and_then(|v| id(v, "id")).map(String::from))
                    .ok_or_else(|| unreadable("interactivity payload without a trigger_id"))?;
                let mut message = Message {
                    kind: MessageType::Event,
                    address: interaction_address(config, &p),
                    name: Some(name),
                    ..Default::default()
                };
                message
                    .source_event
                    .insert(CHANNEL_ID.into(), without_token(p.clone()));
                vec![InboundEvent {
                    dedupe_key: key,
                    message,
                }]
            }
            None => return Err(unreadable("interactivity payload without a type")),
        };
        Ok(Parsed {
            events,
            answer: None,
            reply: Some(ReplyWindow {
                kind: REPLY_INTERACTION,
                within: REPLY_WITHIN,
            }),
        })
    }

    /// The address of a click: who clicked, in which channel and thread, on which message.
    fn interaction_address(config: &SlackConfig, p: &Value) -> Address {
        let container = p.get("container").unwrap_or(&Value::Null);
        let message = p.get("message").unwrap_or(&Value::Null);
        let team = p
            .get("team")
            .and_then(|t| id(t, "id"))
            .or_else(|| p.get("user").and_then(|u| id(u, "team_id")));
        // The clicked message was posted by the bot: its user is the bot user.
        let poster = id(message, "user").filter(|_| message.get("bot_id").is_some());
        let channel = p
            .get("channel")
            .and_then(|c| id(c, "id"))
            .or_else(|| id(container, "channel_id"));
        Address {
            channel_id: CHANNEL_ID.into(),
            user: p.get("user").and_then(|u| id(u, "id")).map(ident),
            bot: bot_for(config, team, poster),
            conversation: channel.map(|c| conversation(c, None)),
            service_url: None,
            id: id(message, "ts")
                .or_else(|| id(container, "message_ts"))
                .map(String::from),
            thread_id: id(message, "thread_ts")
                .or_else(|| id(container, "thread_ts"))
                .map(String::from),
        }
    }

    /// What a click on one of our buttons means (`action_id` = `{type}:{ordinal}:{origin}`,
    /// see `blocks::button`): im_back is text the user sent; post_back and dialog_action a
    /// silent value; message_back its JSON object's text and value. `None`: a URL button,
    /// which needs only the acknowledgement.
    pub fn tap(action: &Value) -> Option<(Option<String>, Option<Value>)> {
        let raw = action.get("value").and_then(Value::as_str).unwrap_or("");
        let value = capped(raw, MAX_TEXT_CHARS);
        let kind = action
            .get("action_id")
            .and_then(Value::as_str)
            .and_then(|a| {
                let mut parts = a.splitn(3, ':');
                let kind = parts.next()?;
                let ordinal = parts.next()?;
                parts.next()?;
                (!ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit())).then_some(kind)
            });
        match kind {
            Some("im_back") => Some((Some(value), None)),
            Some("post_back" | "dialog_action") => Some((None, Some(Value::String(value)))),
            Some("message_back") => match serde_json::from_str::<Value>(&value) {
                Ok(Value::Object(o)) => Some((
                    o.get("text")
                        .and_then(Value::as_str)
                        .map(|t| capped(t, MAX_TEXT_CHARS)),
                    o.get("value").cloned(),
                )),
                _ => Some((None, Some(Value::String(value)))),
            },
            Some(
                "open_url" | "signin" | "download_file" | "show_image" | "play_audio"
                | "play_video",
            ) => None,
            // Not one of ours (native blocks sent through source_event, a select menu): the
            // action as Slack reports it.
            _ => Some((None, Some(action.clone()))),
        }
    }

    fn block_actions(config: &SlackConfig, p: &Value) -> Result<Vec<InboundEvent>, WebhookError> {
        let address = interaction_address(config, p);
        let trigger = id(p, "trigger_id");
        let message_ts = p
            .get("container")
            .and_then(|c| id(c, "message_ts"))
            .or(address.id.as_deref());
        let source = without_token(p.clone());
        let actions: Vec<&Value> = p
            .get("actions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(MAX_EVENTS)
            .collect();
        let many = actions.len() > 1;
        let mut out = Vec::new();
        for (i, action) in actions.into_iter().enumerate() {
            let Some((text, value)) = tap(action) else {
                continue;
            };
            let key = match (trigger, message_ts, id(action, "action_ts")) {
                (Some(t), _, _) => t.to_string(),
                (None, Some(m), Some(a)) => format!("{m}:{a}"),
                _ => return Err(unreadable("block_actions without a trigger_id")),
            };
            let dedupe_key = if many { format!("{key}:{i}") } else { key };
            let mut message = Message {
                kind: MessageType::Message,
                address: address.clone(),
                text,
                value,
                ..Default::default()
            };
            message
                .source_event
                .insert(CHANNEL_ID.into(), source.clone());
            out.push(InboundEvent {
                dedupe_key,
                message,
            });
        }
        Ok(out)
    }

    // -----------------------------------------------------------------------------------------
    // Slash commands

    fn command(config: &SlackConfig, body: &[u8]) -> Result<Parsed, WebhookError> {
        command_fields(config, &form(body))
    }

    /// A Socket Mode `slash_commands` payload: the webhook's form fields as a JSON object
    /// (values are strings; any other value is taken as its JSON text).
    pub fn command_payload(config: &SlackConfig, p: &Value) -> Result<Parsed, WebhookError> {
        let fields: Vec<(String, String)> = p
            .as_object()
            .ok_or_else(|| unreadable("slash command payload is not an object"))?
            .iter()
            .take(MAX_FORM_PAIRS)
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => capped(&other.to_string(), MAX_TEXT_CHARS),
                };
                (k.clone(), v)
            })
            .collect();
        command_fields(config, &fields)
    }

    /// A slash command's fields, however they arrived.
    fn command_fields(
        config: &SlackConfig,
        fields: &[(String, String)],
    ) -> Result<Parsed, WebhookError> {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let short = |k: &str| get(k).filter(|v| !v.is_empty() && v.chars().count() <= MAX_ID_CHARS);
        let name = short("command").ok_or_else(|| unreadable("slash command without a command"))?;
        let channel =
            short("channel_id").ok_or_else(|| unreadable("slash command without a channel_id"))?;
        let user = short("user_id").ok_or_else(|| unreadable("slash command without a user_id"))?;
        let trigger =
            short("trigger_id").ok_or_else(|| unreadable("slash command without a trigger_id"))?;
        let team = short("team_id");
        let mut native = Map::new();
        for (k, v) in fields {
            if k != "token" && !native.contains_key(k) {
                native.insert(capped(k, MAX_ID_CHARS), capped(v, MAX_TEXT_CHARS).into());
            }
        }
        let mut message = Message {
            kind: MessageType::Message,
            address: Address {
                channel_id: CHANNEL_ID.into(),
                user: Some(ident(user)),
                bot: bot_for(config, team, None),
                conversation: Some(conversation(channel, None)),
                ..Default::default()
            },
            text: get("text")
                .filter(|t| !t.is_empty())
                .map(|t| capped(t, MAX_TEXT_CHARS)),
            name: Some(name.to_string()),
            ..Default::default()
        };
        message
            .source_event
            .insert(CHANNEL_ID.into(), Value::Object(native));
        Ok(Parsed {
            events: vec![InboundEvent {
                dedupe_key: trigger.to_string(),
                message,
            }],
            answer: None,
            reply: Some(ReplyWindow {
                kind: REPLY_COMMAND,
                within: REPLY_WITHIN,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::slack::config::SlackWorkspace;

    /// Slack's documented example ("Verifying requests from Slack"): a slash command.
    pub const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    pub const DOC_TIMESTAMP: u64 = 1531420618;
    pub const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    pub const DOC_SIGNATURE: &str =
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    pub fn config(secret: &str) -> SlackConfig {
        SlackConfig {
            signing_secret: Some(Secret::new(secret)),
            ..Default::default()
        }
    }

    /// Signs as Slack does: hex HMAC-SHA256 of `v0:{ts}:{body}`.
    pub fn sign(secret: &str, ts: u64, body: &[u8]) -> String {
        let prefix = format!("v0:{ts}:");
        let hex =
            crate::channels::shared::hmac_sha256_hex(secret.as_bytes(), &[prefix.as_bytes(), body]);
        format!("v0={hex}")
    }

    pub fn headers(sig: Option<&str>, ts: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(s) = sig {
            h.insert("X-Slack-Signature", s.parse().unwrap());
        }
        if let Some(t) = ts {
            h.insert("X-Slack-Request-Timestamp", t.parse().unwrap());
        }
        h
    }

    pub fn run_verify(
        inbound: &SlackInbound,
        path: &str,
        headers: &http::HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<(), WebhookError> {
        let method = http::Method::POST;
        let req = WebhookRequest {
            method: &method,
            path,
            query: None,
            headers,
            body,
            received_at: now,
        };
        futures::executor::block_on(inbound.verify(&req))
    }

    #[test]
    fn slacks_documented_example_verifies() {
        // The test's own signer agrees with the published vector.
        assert_eq!(
            sign(DOC_SECRET, DOC_TIMESTAMP, DOC_BODY.as_bytes()),
            DOC_SIGNATURE
        );
        let inbound = SlackInbound::new(&config(DOC_SECRET)).unwrap();
        let h = headers(Some(DOC_SIGNATURE), Some(&DOC_TIMESTAMP.to_string()));
        for now in [DOC_TIMESTAMP, DOC_TIMESTAMP + 300, DOC_TIMESTAMP - 300] {
            run_verify(&inbound, PATH_COMMANDS, &h, DOC_BODY.as_bytes(), now).unwrap();
        }
        // Upper-case hex is the same signature.
        let upper = format!("v0={}", DOC_SIGNATURE[3..].to_ascii_uppercase());
        let h = headers(Some(&upper), Some(&DOC_TIMESTAMP.to_string()));
        run_verify(
            &inbound,
            PATH_COMMANDS,
            &h,
            DOC_BODY.as_bytes(),
            DOC_TIMESTAMP,
        )
        .unwrap();
    }

    #[test]
    fn refusals_have_fixed_reasons_and_never_quote_the_request() {
        let inbound = SlackInbound::new(&config(DOC_SECRET)).unwrap();
        let ts = DOC_TIMESTAMP.to_string();
        let body = DOC_BODY.as_bytes();
        let wrong_secret = sign("another-secret", DOC_TIMESTAMP, body);
        let mut changed = DOC_BODY.to_string();
        changed.push('x');
        let cases: Vec<(&str, http::HeaderMap, Vec<u8>, u64)> = vec![
            (
                "wrong secret",
                headers(Some(&wrong_secret), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "missing signature",
                headers(None, Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "missing timestamp",
                headers(Some(DOC_SIGNATURE), None),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "old",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP + 301,
            ),
            (
                "future",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP - 301,
            ),
            (
                "body changed",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                changed.into_bytes(),
                DOC_TIMESTAMP,
            ),
            (
                "v1",
                headers(Some(&DOC_SIGNATURE.replace("v0=", "v1=")), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "short",
                headers(Some(&DOC_SIGNATURE[..60]), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "not hex",
                headers(Some(&DOC_SIGNATURE.replace('a', "g")), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts not a number",
                headers(Some(DOC_SIGNATURE), Some("1531420618.5")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts huge",
                headers(Some(DOC_SIGNATURE), Some("99999999999999999999999")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts empty",
                headers(Some(DOC_SIGNATURE), Some("")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
        ];
        for (name, h, b, now) in cases {
            let err = run_verify(&inbound, PATH_EVENTS, &h, &b, now).unwrap_err();
            let WebhookError::Unverified(reason) = &err else {
                panic!("{name}: {err:?}");
            };
            for leak in [DOC_SECRET, &DOC_SIGNATURE[3..], "xyzz0Wbap", "1531420618"] {
                assert!(!reason.contains(leak), "{name}: {reason}");
            }
        }
        // Repeated headers: refused rather than picking one.
        let mut h = headers(Some(DOC_SIGNATURE), Some(&ts));
        h.append("X-Slack-Signature", wrong_secret.parse().unwrap());
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, DOC_TIMESTAMP).is_err());
        // Non-ASCII header bytes.
        let mut h = headers(None, Some(&ts));
        h.insert(
            "X-Slack-Signature",
            http::HeaderValue::from_bytes(b"v0=\xe9").unwrap(),
        );
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, DOC_TIMESTAMP).is_err());
    }

    /// A JSON body with non-ASCII text, signed over its UTF-8 bytes: verifies as sent; one
    /// changed character (same length in bytes) is refused.
    #[test]
    fn non_ascii_json_body_is_checked_over_its_exact_bytes() {
        let secret = "s3cret-signing";
        let inbound = SlackInbound::new(&config(secret)).unwrap();
        let body =
            r#"{"type":"event_callback","event":{"type":"message","text":"héllo wörld 👋"}}"#;
        let now = 1_700_000_000;
        let h = headers(
            Some(&sign(secret, now, body.as_bytes())),
            Some(&now.to_string()),
        );
        run_verify(&inbound, PATH_EVENTS, &h, body.as_bytes(), now).unwrap();
        let tampered = body.replace('é', "è");
        assert_eq!(tampered.len(), body.len());
        assert_eq!(
            run_verify(&inbound, PATH_EVENTS, &h, tampered.as_bytes(), now),
            Err(WebhookError::Unverified("X-Slack-Signature does not match"))
        );
        // Re-serializing the JSON (as a framework that parses first would) breaks it too.
        let reserialized =
            serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(body).unwrap()).unwrap();
        let spaced = [b" ".as_slice(), &reserialized].concat();
        assert!(run_verify(&inbound, PATH_EVENTS, &h, &spaced, now).is_err());
    }

    #[test]
    fn every_configured_secret_is_tried_and_none_means_no_inbound() {
        assert!(SlackInbound::new(&SlackConfig::default()).is_none());
        let c = SlackConfig {
            workspaces: vec![
                SlackWorkspace {
                    bot_id: "B1".into(),
                    token: Secret::new("xoxb-1"),
                    team_id: Some("T1".into()),
                    signing_secret: Some(Secret::new("secret-one")),
                    receive: Default::default(),
                    app_token: None,
                },
                SlackWorkspace {
                    bot_id: "B2".into(),
                    token: Secret::new("xoxb-2"),
                    team_id: Some("T2".into()),
                    signing_secret: Some(Secret::new("secret-two")),
                    receive: Default::default(),
                    app_token: None,
                },
            ],
            ..Default::default()
        };
        let inbound = SlackInbound::new(&c).unwrap();
        let now = 1_700_000_000;
        let body = b"{}";
        for s in ["secret-one", "secret-two"] {
            let h = headers(Some(&sign(s, now, body)), Some(&now.to_string()));
            run_verify(&inbound, PATH_EVENTS, &h, body, now).unwrap();
        }
        let h = headers(
            Some(&sign("secret-three", now, body)),
            Some(&now.to_string()),
        );
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, now).is_err());
    }

    // -----------------------------------------------------------------------------------------
    // Parsing

    use super::parse::{MAX_EVENTS, MAX_FILES, MAX_MENTIONS, MAX_TEXT_CHARS};
    use crate::channels::channel::{Channel, InboundEvent, Parsed};
    use crate::channels::slack::render;
    use crate::model::{ActionType, CardAction, HeroCard, Message, MessageType};
    use serde_json::{Value, json};

    const SECRET: &str = "test-signing-secret";
    const NOW: u64 = 1_700_000_600;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/inbound/slack/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn workspace(bot: &str, team: Option<&str>) -> SlackWorkspace {
        SlackWorkspace {
            bot_id: bot.into(),
            token: Secret::new(format!("xoxb-{bot}")),
            team_id: team.map(String::from),
            signing_secret: None,
            receive: Default::default(),
            app_token: None,
        }
    }

    fn two_workspaces() -> SlackConfig {
        let mut c = config(SECRET);
        c.workspaces = vec![
            workspace("B0OTHER", Some("T0OTHER")),
            workspace("B0123BOT", Some("T0123TEAM")),
        ];
        c
    }

    /// Signs `body` as Slack does, verifies it, then parses it: what the listener will do.
    fn receive_with(c: &SlackConfig, path: &str, body: &[u8]) -> Result<Parsed, WebhookError> {
        let inbound = SlackInbound::new(c).unwrap();
        let h = headers(Some(&sign(SECRET, NOW, body)), Some(&NOW.to_string()));
        run_verify(&inbound, path, &h, body, NOW)?;
        let method = http::Method::POST;
        inbound.parse(&WebhookRequest {
            method: &method,
            path,
            query: None,
            headers: &h,
            body,
            received_at: NOW,
        })
    }

    fn receive(path: &str, body: &[u8]) -> Parsed {
        receive_with(&two_workspaces(), path, body).unwrap()
    }

    fn one(path: &str, body: &[u8]) -> InboundEvent {
        let mut p = receive(path, body);
        assert_eq!(p.events.len(), 1, "{:?}", p.events);
        assert!(p.answer.is_none());
        p.events.remove(0)
    }

    fn interactive(payload: &Value) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish()
            .into_bytes()
    }

    /// A reply with the received address, rendered as the send side will: the channel, thread
    /// and token it goes with.
    fn reply_target(addr: &crate::model::Address) -> (String, Option<String>, String) {
        let reply = Message {
            address: addr.clone(),
            text: Some("ok".into()),
            ..Default::default()
        };
        let r = render::render_send(&reply, None, &two_workspaces()).unwrap();
        let body = r.requests[0].body.value();
        (
            body["channel"].as_str().unwrap().to_string(),
            body["thread_ts"].as_str().map(String::from),
            r.requests[0].credential.clone(),
        )
    }

    /// Socket Mode envelopes carry the webhook bodies' payloads as JSON: the same events come
    /// out, so a bot cannot tell how they arrived.
    #[test]
    fn socket_mode_payloads_give_the_webhooks_events() {
        let c = two_workspaces();
        for name in [
            "message_in_thread",
            "app_mention",
            "reaction_added",
            "message_deleted",
        ] {
            let body = fixture(name);
            let hook = receive(PATH_EVENTS, body.as_bytes()).events;
            assert!(!hook.is_empty(), "{name}");
            let payload: Value = serde_json::from_str(&body).unwrap();
            let socket = envelope_events(&c, "events_api", payload).unwrap().unwrap();
            assert_eq!(socket, hook, "{name}");
        }
        let payload: Value = serde_json::from_str(&fixture("block_actions")).unwrap();
        let hook = receive(PATH_INTERACTIVITY, &interactive(&payload)).events;
        assert!(!hook.is_empty());
        assert_eq!(
            envelope_events(&c, "interactive", payload)
                .unwrap()
                .unwrap(),
            hook
        );
        // A slash command: the form's fields as a JSON object of strings.
        let fields: serde_json::Map<String, Value> =
            url::form_urlencoded::parse(DOC_BODY.as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect();
        let hook = receive(PATH_COMMANDS, DOC_BODY.as_bytes()).events;
        assert_eq!(hook.len(), 1);
        let socket = envelope_events(&c, "slash_commands", Value::Object(fields))
            .unwrap()
            .unwrap();
        assert_eq!(socket, hook);
        // Types that carry no events, and payloads that are not the webhook's.
        assert!(envelope_events(&c, "hello", Value::Null).is_none());
        assert!(matches!(
            envelope_events(&c, "slash_commands", json!("text")),
            Some(Err(WebhookError::Unreadable(_)))
        ));
        assert!(matches!(
            envelope_events(&c, "interactive", json!([1])),
            Some(Err(WebhookError::Unreadable(_)))
        ));
    }

    #[test]
    fn the_channel_serves_its_inbound_side_only_with_a_secret() {
        let d = std::time::Duration::from_secs(1);
        let without = super::super::Slack::new(&SlackConfig::default(), d).unwrap();
        assert!(without.inbound().is_none());
        let with = super::super::Slack::new(&two_workspaces(), d).unwrap();
        let paths = with.inbound().unwrap().paths();
        assert_eq!(
            paths,
            [
                "/webhooks/slack/events",
                "/webhooks/slack/interactivity",
                "/webhooks/slack/commands"
            ]
        );
    }

    #[test]
    fn url_verification_is_answered_only_once_verified() {
        let body = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        let p = receive(PATH_EVENTS, body);
        assert!(p.events.is_empty());
        let a = p.answer.unwrap();
        assert_eq!((a.status, a.content_type), (200, "application/json"));
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            v,
            json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
        );
        // Unsigned: refused before any parsing.
        let inbound = SlackInbound::new(&two_workspaces()).unwrap();
        let h = headers(None, Some(&NOW.to_string()));
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, NOW).is_err());
    }

    #[test]
    fn a_message_in_a_thread_with_files_and_mentions() {
        let body = fixture("message_in_thread");
        let e = one(PATH_EVENTS, body.as_bytes());
        let m = &e.message;
        assert_eq!(e.dedupe_key, "T0123TEAM:C0123CHAN:1700000123.000200");
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(
            m.text.as_deref(),
            Some("<@U0BOTUSER> here is the report, cc <@U0OTHER|bob> — ça va?")
        );
        assert_eq!(
            m.entities,
            vec![
                json!({"type": "mention", "mentioned": {"id": "U0BOTUSER"}, "text": "<@U0BOTUSER>"}),
                json!({"type": "mention", "mentioned": {"id": "U0OTHER", "name": "bob"}, "text": "<@U0OTHER|bob>"}),
            ]
        );
        assert_eq!(m.attachments.len(), 2);
        assert_eq!(m.attachments[0].content_type, "application/pdf");
        assert_eq!(m.attachments[0].name.as_deref(), Some("report.pdf"));
        assert_eq!(m.attachments[1].content_type, "image/png");
        assert_eq!(m.attachments[1].name.as_deref(), Some("photo"));
        // url_private (else the download URL): the bot fetches it with FetchAttachment.
        assert_eq!(
            m.attachments[0].content_url.as_deref(),
            Some("https://files.slack.com/files-pri/T0123TEAM-F0123FILE/report.pdf")
        );
        assert_eq!(
            m.attachments[1].content_url.as_deref(),
            Some("https://files.slack.com/files-pri/T0123TEAM-F0456FILE/photo.png")
        );
        let a = &m.address;
        assert_eq!(a.channel_id, "slack");
        assert_eq!(a.user_id(), "U0HUMAN");
        assert_eq!(a.bot_id(), "B0123BOT");
        let c = a.conversation.as_ref().unwrap();
        assert_eq!(c.id, "C0123CHAN");
        assert_eq!(c.is_group, Some(true));
        assert_eq!(c.conversation_type.as_deref(), Some("channel"));
        assert_eq!(a.id.as_deref(), Some("1700000123.000200"));
        assert_eq!(a.thread_id.as_deref(), Some("1700000000.000100"));
        assert_eq!(a.service_url, None);
        assert_eq!(
            m.timestamp.map(|t| t.unix_timestamp_nanos()),
            Some(1_700_000_123_000_200_000)
        );
        let native = &m.source_event["slack"];
        assert_eq!(native["event_id"], "Ev0MESSAGE");
        assert_eq!(
            native["event"]["files"][0]["url_private"],
            "https://files.slack.com/files-pri/T0123TEAM-F0123FILE/report.pdf"
        );
        assert!(native.get("token").is_none(), "verification token kept");
        // The reply goes to the same channel and thread, with this workspace's token.
        assert_eq!(
            reply_target(a),
            (
                "C0123CHAN".into(),
                Some("1700000000.000100".into()),
                "B0123BOT".into()
            )
        );
    }

    #[test]
    fn the_mention_and_the_message_of_one_post_share_a_key() {
        let mention = one(PATH_EVENTS, fixture("app_mention").as_bytes());
        let message = one(PATH_EVENTS, fixture("message_in_thread").as_bytes());
        assert_eq!(mention.dedupe_key, message.dedupe_key);
        assert_eq!(
            mention.message.address.thread_id,
            message.message.address.thread_id
        );
        assert_eq!(mention.message.entities.len(), 2);
        // No channel_type on app_mention: whether it is a group is not guessed.
        assert_eq!(
            mention
                .message
                .address
                .conversation
                .as_ref()
                .unwrap()
                .is_group,
            None
        );
    }

    #[test]
    fn the_bots_own_and_other_bots_messages_are_dropped() {
        let bot = fixture("bot_message");
        assert!(receive(PATH_EVENTS, bot.as_bytes()).events.is_empty());
        let v: Value = serde_json::from_str(&bot).unwrap();
        // Our bot user without a bot_id (e.g. a message posted as the bot user).
        let mut own = v.clone();
        own["event"].as_object_mut().unwrap().remove("bot_id");
        // subtype bot_message (legacy integrations, no user).
        let mut legacy = v.clone();
        legacy["event"]["subtype"] = json!("bot_message");
        legacy["event"].as_object_mut().unwrap().remove("user");
        // Another app's bot.
        let mut other = v.clone();
        other["event"]["user"] = json!("U0OTHERBOT");
        other["event"]["bot_id"] = json!("B0OTHERBOT");
        // Not talk: someone joined.
        let mut join = v.clone();
        join["event"]["subtype"] = json!("channel_join");
        join["event"]["user"] = json!("U0HUMAN");
        join["event"].as_object_mut().unwrap().remove("bot_id");
        // Edits of the bot's own messages.
        let mut edit: Value = serde_json::from_str(&fixture("message_changed")).unwrap();
        edit["event"]["message"]["bot_id"] = json!("B0123BOT");
        for (name, body) in [
            ("own", own),
            ("legacy", legacy),
            ("other", other),
            ("join", join),
            ("edit", edit),
        ] {
            let p = receive(PATH_EVENTS, body.to_string().as_bytes());
            assert!(p.events.is_empty(), "{name}: {:?}", p.events);
        }
        // The same post from a person is kept.
        let mut human = v;
        human["event"]["user"] = json!("U0HUMAN");
        human["event"].as_object_mut().unwrap().remove("bot_id");
        assert_eq!(
            receive(PATH_EVENTS, human.to_string().as_bytes())
                .events
                .len(),
            1
        );
    }

    #[test]
    fn edits_and_deletions() {
        let e = one(PATH_EVENTS, fixture("message_changed").as_bytes());
        assert_eq!(e.dedupe_key, "Ev0CHANGED");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::MessageUpdate);
        assert_eq!(m.text.as_deref(), Some("hello, corrected"));
        assert_eq!(m.address.id.as_deref(), Some("1700000250.000400"));
        assert_eq!(m.address.user_id(), "U0HUMAN");
        let c = m.address.conversation.as_ref().unwrap();
        assert_eq!((c.id.as_str(), c.is_group), ("D0123DM", Some(false)));
        assert_eq!(m.address.thread_id, None);
        assert_eq!(reply_target(&m.address).0, "D0123DM");

        let e = one(PATH_EVENTS, fixture("message_deleted").as_bytes());
        assert_eq!(e.dedupe_key, "Ev0DELETED");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::MessageDelete);
        assert_eq!(m.text, None);
        assert_eq!(m.address.id.as_deref(), Some("1700000250.000400"));
        assert_eq!(m.address.thread_id.as_deref(), Some("1700000000.000100"));
        let c = m.address.conversation.as_ref().unwrap();
        assert_eq!((c.id.as_str(), c.is_group), ("G0123PRIV", Some(true)));
    }

    #[test]
    fn the_bot_is_the_workspace_the_send_side_selects_the_token_by() {
        use super::parse::bot_for;
        let two = two_workspaces();
        let bot =
            |c: &SlackConfig, t: Option<&str>, u: Option<&str>| bot_for(c, t, u).map(|i| i.id);
        assert_eq!(
            bot(&two, Some("T0OTHER"), Some("U1")).as_deref(),
            Some("B0OTHER")
        );
        assert_eq!(
            bot(&two, Some("T0123TEAM"), None).as_deref(),
            Some("B0123BOT")
        );
        // Unknown team: the bot user, which no workspace has (the reply is refused, naming
        // the configured ids, rather than sent with another workspace's token).
        assert_eq!(bot(&two, Some("T9"), Some("U9")).as_deref(), Some("U9"));
        assert_eq!(bot(&two, Some("T9"), None), None);
        // One workspace without a team: everything is for it.
        let mut one_ws = config(SECRET);
        one_ws.workspaces = vec![workspace("B1", None)];
        assert_eq!(bot(&one_ws, Some("T9"), Some("U9")).as_deref(), Some("B1"));
        // An operator who configured the bot user id as bot_id.
        let mut by_user = config(SECRET);
        by_user.workspaces = vec![workspace("U0BOT", Some("T1")), workspace("B2", Some("T2"))];
        assert_eq!(
            bot(&by_user, Some("T9"), Some("U0BOT")).as_deref(),
            Some("U0BOT")
        );
        // The other workspace's event goes to its own bot.
        let mut v: Value = serde_json::from_str(&fixture("app_mention")).unwrap();
        v["team_id"] = json!("T0OTHER");
        let e = one(PATH_EVENTS, v.to_string().as_bytes());
        assert_eq!(e.message.address.bot_id(), "B0OTHER");
        assert_eq!(e.dedupe_key, "T0OTHER:C0123CHAN:1700000123.000200");
    }

    #[test]
    fn a_button_click_in_a_thread() {
        let payload: Value = serde_json::from_str(&fixture("block_actions")).unwrap();
        let e = one(PATH_INTERACTIVITY, &interactive(&payload));
        assert_eq!(e.dedupe_key, "1700000500.12345.abcdef0123456789");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(m.text.as_deref(), Some("hi"));
        assert_eq!(m.value, None);
        let a = &m.address;
        assert_eq!(a.user_id(), "U0HUMAN");
        assert_eq!(a.bot_id(), "B0123BOT");
        assert_eq!(a.conversation_id(), Some("C0123CHAN"));
        assert_eq!(a.id.as_deref(), Some("1700000200.000300"));
        assert_eq!(a.thread_id.as_deref(), Some("1700000000.000100"));
        assert!(m.source_event["slack"].get("token").is_none());
        assert_eq!(
            m.source_event["slack"]["actions"][0]["action_id"],
            "im_back:0:a0.b0"
        );
        assert_eq!(
            reply_target(a),
            (
                "C0123CHAN".into(),
                Some("1700000000.000100".into()),
                "B0123BOT".into()
            )
        );
        // Without a trigger_id: the message and the action's times.
        let mut p = payload.clone();
        p.as_object_mut().unwrap().remove("trigger_id");
        let e = one(PATH_INTERACTIVITY, &interactive(&p));
        assert_eq!(e.dedupe_key, "1700000200.000300:1700000500.000700");
        // A click on a top-level message: no thread, the reply goes to the channel.
        let mut p = payload;
        p["message"].as_object_mut().unwrap().remove("thread_ts");
        p["container"].as_object_mut().unwrap().remove("thread_ts");
        let e = one(PATH_INTERACTIVITY, &interactive(&p));
        assert_eq!(reply_target(&e.message.address).1, None);
    }

    /// Buttons rendered by `blocks`, clicked: each maps back to what the bot sent, per the
    /// README's promise (im_back as text; post_back, dialog_action, message_back's value as
    /// value; message_back's text as text; URL buttons nothing).
    #[test]
    fn rendered_buttons_map_back() {
        let action = |kind, value: Option<Value>| CardAction {
            kind,
            title: Some("t".into()),
            value,
            image: None,
            text: None,
            display_text: None,
            channel_data: None,
            dialog_name: None,
            dialog_data: None,
        };
        let mut back = action(ActionType::MessageBack, Some(json!({"order": 7})));
        back.text = Some("buy".into());
        back.display_text = Some("Buying…".into());
        let mut dialog = action(ActionType::DialogAction, None);
        dialog.dialog_name = Some("help".into());
        dialog.dialog_data = Some("topic".into());
        let buttons = vec![
            action(ActionType::ImBack, Some(json!("hello there"))),
            action(ActionType::PostBack, Some(json!("pb-1"))),
            back,
            dialog,
            action(ActionType::OpenUrl, Some(json!("https://example.com/"))),
        ];
        let sent = Message {
            address: crate::model::Address {
                channel_id: "slack".into(),
                bot: Some(crate::model::Identity {
                    id: "B0123BOT".into(),
                    ..Default::default()
                }),
                conversation: Some(crate::model::Conversation {
                    id: "C0123CHAN".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            attachments: vec![crate::model::Attachment {
                content: Some(crate::model::AttachmentContent::Hero(HeroCard {
                    title: Some("Pick".into()),
                    buttons,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = render::render_send(&sent, None, &two_workspaces()).unwrap();
        let body = r.requests[0].body.value();
        let elements: Vec<Value> = body["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "actions")
            .flat_map(|b| b["elements"].as_array().unwrap().clone())
            .collect();
        assert_eq!(elements.len(), 5);
        let mut template: Value = serde_json::from_str(&fixture("block_actions")).unwrap();
        let mut got = Vec::new();
        for el in elements {
            let mut clicked = json!({
                "action_id": el["action_id"],
                "block_id": "b",
                "text": el["text"],
                "type": "button",
                "action_ts": "1700000500.000700"
            });
            if let Some(v) = el.get("value") {
                clicked["value"] = v.clone();
            }
            template["actions"] = json!([clicked]);
            let p = receive(PATH_INTERACTIVITY, &interactive(&template));
            got.push(
                p.events
                    .into_iter()
                    .map(|e| (e.message.text, e.message.value))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            got,
            vec![
                vec![(Some("hello there".to_string()), None)],
                vec![(None, Some(json!("pb-1")))],
                vec![(Some("buy".to_string()), Some(json!({"order": 7})))],
                vec![(None, Some(json!("action?help=topic")))],
                vec![],
            ]
        );
    }

    #[test]
    fn foreign_actions_and_other_interactions_are_passed_on_natively() {
        let mut payload: Value = serde_json::from_str(&fixture("block_actions")).unwrap();
        let select = json!({
            "action_id": "choose_color",
            "block_id": "b",
            "type": "static_select",
            "selected_option": {"text": {"type": "plain_text", "text": "Red"}, "value": "red"},
            "action_ts": "1700000500.000700"
        });
        payload["actions"] = json!([select.clone()]);
        let e = one(PATH_INTERACTIVITY, &interactive(&payload));
        assert_eq!(e.message.value, Some(select));
        assert_eq!(e.message.text, None);

        let shortcut = json!({
            "type": "shortcut",
            "token": "XXYYZZverificationtoken",
            "action_ts": "1700000500.000800",
            "team": {"id": "T0123TEAM", "domain": "example"},
            "user": {"id": "U0HUMAN", "username": "alice", "team_id": "T0123TEAM"},
            "callback_id": "open_ticket",
            "trigger_id": "944799105734.773906753841.38b5894552bdd4a780554ee59d1f3638"
        });
        let e = one(PATH_INTERACTIVITY, &interactive(&shortcut));
        assert_eq!(e.message.kind, MessageType::Event);
        assert_eq!(e.message.name.as_deref(), Some("shortcut"));
        assert_eq!(
            e.dedupe_key,
            "944799105734.773906753841.38b5894552bdd4a780554ee59d1f3638"
        );
        assert_eq!(e.message.address.user_id(), "U0HUMAN");
        assert!(e.message.source_event["slack"].get("token").is_none());
    }

    #[test]
    fn slacks_documented_slash_command() {
        let mut c = config(DOC_SECRET);
        c.workspaces = vec![workspace("B0DOC", None)];
        let inbound = SlackInbound::new(&c).unwrap();
        let h = headers(Some(DOC_SIGNATURE), Some(&DOC_TIMESTAMP.to_string()));
        run_verify(
            &inbound,
            PATH_COMMANDS,
            &h,
            DOC_BODY.as_bytes(),
            DOC_TIMESTAMP,
        )
        .unwrap();
        let method = http::Method::POST;
        let mut p = inbound
            .parse(&WebhookRequest {
                method: &method,
                path: PATH_COMMANDS,
                query: None,
                headers: &h,
                body: DOC_BODY.as_bytes(),
                received_at: DOC_TIMESTAMP,
            })
            .unwrap();
        assert_eq!(p.events.len(), 1);
        let e = p.events.remove(0);
        assert_eq!(
            e.dedupe_key,
            "398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
        );
        let m = &e.message;
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(m.name.as_deref(), Some("/webhook-collect"));
        assert_eq!(m.text, None);
        assert_eq!(m.address.user_id(), "U2CERLKJA");
        assert_eq!(m.address.bot_id(), "B0DOC");
        assert_eq!(m.address.conversation_id(), Some("G8PSS9T3V"));
        assert_eq!(m.address.thread_id, None);
        let native = &m.source_event["slack"];
        assert!(native.get("token").is_none());
        assert_eq!(native["team_domain"], "testteamnow");
        assert_eq!(
            native["response_url"],
            "https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN"
        );
        // With text.
        let body = DOC_BODY.replace("text=&", "text=deploy+prod%20now&");
        let e = receive_with(&c_with_secret(c), PATH_COMMANDS, body.as_bytes()).unwrap();
        assert_eq!(e.events[0].message.text.as_deref(), Some("deploy prod now"));
    }

    fn c_with_secret(mut c: SlackConfig) -> SlackConfig {
        c.signing_secret = Some(Secret::new(SECRET));
        c
    }

    #[test]
    fn unreadable_bodies_are_refused_after_verification() {
        for (path, body) in [
            (PATH_EVENTS, b"not json".as_slice()),
            (PATH_EVENTS, br#"{"type":"event_callback"}"#.as_slice()),
            (PATH_EVENTS, br#"{"type":"url_verification"}"#.as_slice()),
            (PATH_INTERACTIVITY, b"nopayload=1".as_slice()),
            (PATH_INTERACTIVITY, b"payload=%7Bnot".as_slice()),
            (PATH_COMMANDS, b"text=hi".as_slice()),
            ("/webhooks/slack/other", b"{}".as_slice()),
        ] {
            let err = receive_with(&two_workspaces(), path, body).unwrap_err();
            assert!(
                matches!(err, WebhookError::Unreadable(_)),
                "{path}: {err:?}"
            );
        }
        // Envelopes with nothing for a bot are acknowledged without events.
        let p = receive(PATH_EVENTS, br#"{"type":"app_rate_limited","team_id":"T1","minute_rate_limited":1518467820,"api_app_id":"A1"}"#);
        assert_eq!(p, Parsed::default());
        let mut v: Value = serde_json::from_str(&fixture("app_mention")).unwrap();
        v["event"]["type"] = json!("emoji_changed");
        assert!(
            receive(PATH_EVENTS, v.to_string().as_bytes())
                .events
                .is_empty()
        );
    }

    #[test]
    fn hostile_sizes_are_bounded() {
        let mut v: Value = serde_json::from_str(&fixture("message_in_thread")).unwrap();
        let file = v["event"]["files"][0].clone();
        v["event"]["files"] = Value::Array(vec![file; 500]);
        let many_mentions = "<@U1> ".repeat(1000);
        let long = format!("{many_mentions}{}", "é".repeat(60_000));
        v["event"]["text"] = json!(long);
        let e = one(PATH_EVENTS, v.to_string().as_bytes());
        assert_eq!(e.message.attachments.len(), MAX_FILES);
        assert_eq!(e.message.entities.len(), MAX_MENTIONS);
        assert_eq!(
            e.message.text.as_ref().unwrap().chars().count(),
            MAX_TEXT_CHARS
        );
        let mut p: Value = serde_json::from_str(&fixture("block_actions")).unwrap();
        let a = p["actions"][0].clone();
        p["actions"] = Value::Array(vec![a; 1000]);
        let events = receive(PATH_INTERACTIVITY, &interactive(&p)).events;
        assert_eq!(events.len(), MAX_EVENTS);
        let keys: std::collections::BTreeSet<_> = events.iter().map(|e| &e.dedupe_key).collect();
        assert_eq!(keys.len(), MAX_EVENTS, "each action its own key");
        // An id longer than Slack's is no id: the event is refused, not stored with it.
        let mut v: Value = serde_json::from_str(&fixture("app_mention")).unwrap();
        v["event"]["channel"] = json!("C".repeat(10_000));
        assert!(receive_with(&two_workspaces(), PATH_EVENTS, v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn reactions_and_joins() {
        let body = fixture("reaction_added");
        let e = one(PATH_EVENTS, body.as_bytes());
        assert_eq!(e.dedupe_key, "Ev0REACTION");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::MessageReaction);
        assert_eq!(m.reactions_added, ["thumbsup"]);
        assert!(m.reactions_removed.is_empty());
        assert_eq!(m.address.id.as_deref(), Some("1700000200.000300"));
        assert_eq!(m.address.user_id(), "U0HUMAN");
        assert_eq!(m.address.bot_id(), "B0123BOT");
        assert_eq!(
            m.timestamp.map(|t| t.unix_timestamp_nanos()),
            Some(1_700_000_700_000_800_000)
        );
        assert_eq!(reply_target(&m.address).0, "C0123CHAN");
        let mut v: Value = serde_json::from_str(&body).unwrap();
        v["event"]["type"] = json!("reaction_removed");
        let e = one(PATH_EVENTS, v.to_string().as_bytes());
        assert_eq!(e.message.reactions_removed, ["thumbsup"]);
        // The bot's own reaction, and one on a file, are not delivered.
        let mut own = v.clone();
        own["event"]["user"] = json!("U0BOTUSER");
        let mut file = v;
        file["event"]["item"] = json!({"type": "file", "file": "F0123FILE"});
        for body in [own, file] {
            assert!(
                receive(PATH_EVENTS, body.to_string().as_bytes())
                    .events
                    .is_empty()
            );
        }

        // The bot added to a channel: kept (a bot greets the channel it joined).
        let body = fixture("member_joined_channel");
        let e = one(PATH_EVENTS, body.as_bytes());
        assert_eq!(e.dedupe_key, "Ev0JOINED");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::ConversationUpdate);
        assert_eq!(m.members_added.len(), 1);
        assert_eq!(m.members_added[0].id, "U0BOTUSER");
        assert_eq!(m.address.user_id(), "U0HUMAN");
        assert_eq!(
            m.address.conversation.as_ref().unwrap().is_group,
            Some(true)
        );
        assert_eq!(m.timestamp.map(|t| t.unix_timestamp()), Some(1_700_000_800));
        assert_eq!(
            reply_target(&m.address),
            ("C0123CHAN".into(), None, "B0123BOT".into())
        );
        let mut v: Value = serde_json::from_str(&body).unwrap();
        v["event"]["type"] = json!("member_left_channel");
        v["event"]["user"] = json!("U0HUMAN");
        v["event"].as_object_mut().unwrap().remove("inviter");
        let e = one(PATH_EVENTS, v.to_string().as_bytes());
        assert_eq!(e.message.members_removed[0].id, "U0HUMAN");
        assert_eq!(e.message.address.user_id(), "U0HUMAN");
    }
}
