//! Receiving Telegram updates by webhook: each bot's updates arrive at
//! `/webhooks/telegram/{bot_id}`, verified by the `X-Telegram-Bot-Api-Secret-Token` header
//! (the `secret_token` given to `setWebhook`), then normalized into the model with the address
//! to reply to.
//!
//! Owns the update's JSON shape and the mapping back of what the renderer sent (a button's
//! `callback_data` arrives as the text a v3 bot received for a post-back). Must not store,
//! answer or call Telegram: the inbound listener does (and answers callback queries).

use std::collections::HashMap;

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::CHANNEL_ID;
use super::config::{Receive, TelegramConfig};
use crate::channels::channel::{
    Inbound, InboundEvent, Parsed, WebhookAnswer, WebhookError, WebhookRequest,
};
use crate::model::{
    Address, Attachment, AttachmentContent, Conversation, Identity, Message, MessageType,
};
use crate::settings::Secret;

/// The path prefix; the bot id follows.
const PATH: &str = "/webhooks/telegram/";
/// The header Telegram sends the webhook's secret in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The longest text kept from an update (Telegram's own limit is 4096 characters; a caption
/// 1024): anything longer is not from Telegram.
const MAX_TEXT_BYTES: usize = 64 << 10;
/// Attachments kept from one message (an album arrives one message per item).
const MAX_ATTACHMENTS: usize = 16;

/// One bot's webhook: its secret, and its own numeric id (the token's prefix), to drop what the
/// bot itself said.
struct Hook {
    secret: Secret,
    self_id: Option<i64>,
}

/// The receiving side of the Telegram channel: the bots that have a `secret_token`.
pub struct TelegramInbound {
    hooks: HashMap<String, Hook>,
}

impl TelegramInbound {
    /// `None` when no bot has a `secret_token`: nothing could be verified.
    pub fn new(config: &TelegramConfig) -> Option<Self> {
        let hooks: HashMap<String, Hook> = config
            .bots
            .iter()
            // A polling bot has no webhook: its path is not served.
            .filter(|b| b.receive == Receive::Webhook)
            .filter_map(|b| {
                let secret = b.secret_token.clone()?;
                let self_id = self_id(&b.token);
                Some((b.bot_id.clone(), Hook { secret, self_id }))
            })
            .collect();
        (!hooks.is_empty()).then_some(Self { hooks })
    }

    /// The bot a path names, when it has a webhook here.
    fn hook<'a>(&'a self, path: &str) -> Option<(&'a str, &'a Hook)> {
        let bot = path.strip_prefix(PATH)?;
        self.hooks.get_key_value(bot).map(|(k, h)| (k.as_str(), h))
    }
}

impl Inbound for TelegramInbound {
    fn paths(&self) -> Vec<String> {
        self.hooks.keys().map(|b| format!("{PATH}{b}")).collect()
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(async move {
            if req.method != http::Method::POST {
                return Err(WebhookError::Unverified("not a POST"));
            }
            let (_, hook) = self
                .hook(req.path)
                .ok_or(WebhookError::Unverified("no webhook for this bot"))?;
            let given = req
                .headers
                .get(SECRET_HEADER)
                .ok_or(WebhookError::Unverified("no secret token header"))?;
            // Constant-time: the comparison must not tell how much of a guess was right.
            let same: bool = given
                .as_bytes()
                .ct_eq(hook.secret.expose().as_bytes())
                .into();
            if same {
                Ok(())
            } else {
                Err(WebhookError::Unverified("wrong secret token"))
            }
        })
    }

    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        let (bot, hook) = self
            .hook(req.path)
            .ok_or(WebhookError::Unverified("no webhook for this bot"))?;
        let update: Value = serde_json::from_slice(req.body)
            .map_err(|e| WebhookError::Unreadable(format!("not JSON: {e}")))?;
        let events = update_events(bot, hook.self_id, &update)?;
        // A pressed button spins until the query is answered. Telegram takes a method call as
        // the webhook's answer, so the query is answered with no call of our own, and only once
        // the update is stored (the listener writes the answer after the inbox took it).
        let answer = callback_query_id(&update).map(|id| WebhookAnswer {
            status: 200,
            content_type: "application/json",
            body: serde_json::json!({"method": "answerCallbackQuery", "callback_query_id": id})
                .to_string()
                .into_bytes(),
        });
        Ok(Parsed {
            events,
            answer,
            reply: None,
        })
    }
}

/// The id of the callback query an update carries (a pressed inline button), when it has a
/// usable one.
pub fn callback_query_id(update: &Value) -> Option<&str> {
    update
        .get("callback_query")?
        .get("id")?
        .as_str()
        .filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic()))
}

/// The bot's own user id: the numeric prefix of its token (`123456:ABC...`), to leave out what
/// the bot itself said.
pub fn self_id(token: &Secret) -> Option<i64> {
    token
        .expose()
        .split_once(':')
        .and_then(|(id, _)| id.parse().ok())
}

/// The events of one update of `bot`, however it arrived (a webhook call, or one element of a
/// `getUpdates` answer): none for what a bot does not get.
pub fn update_events(
    bot: &str,
    self_id: Option<i64>,
    update: &Value,
) -> Result<Vec<InboundEvent>, WebhookError> {
    let update_id =
        update_id(update).ok_or_else(|| WebhookError::Unreadable("no update_id".into()))?;
    Ok(normalize(bot, self_id, update)
        .map(|message| InboundEvent {
            // update_id counts per bot.
            dedupe_key: format!("{bot}:{update_id}"),
            message,
        })
        .into_iter()
        .collect())
}

/// An update's `update_id`.
pub fn update_id(update: &Value) -> Option<i64> {
    update.get("update_id").and_then(Value::as_i64)
}

/// The update kinds [`update_events`] turns into events, each with its kind of message
/// (`None`: a pressed button, a callback query).
const KINDS: [(&str, Option<MessageType>); 7] = [
    ("message", Some(MessageType::Message)),
    ("channel_post", Some(MessageType::Message)),
    ("edited_message", Some(MessageType::MessageUpdate)),
    ("edited_channel_post", Some(MessageType::MessageUpdate)),
    ("callback_query", None),
    ("message_reaction", Some(MessageType::MessageReaction)),
    ("my_chat_member", Some(MessageType::ConversationUpdate)),
];

/// What `getUpdates` asks for: the kinds read here (`message_reaction` is only sent when asked
/// for by name).
pub fn update_kinds() -> Vec<&'static str> {
    KINDS.iter().map(|(k, _)| *k).collect()
}

/// The update as a v3 bot receives it, or `None` for what a bot does not get (its own
/// messages, update kinds with nothing to tell).
fn normalize(bot: &str, self_id: Option<i64>, update: &Value) -> Option<Message> {
    let obj = update.as_object()?;
    let field = |k: &str| obj.get(k).and_then(Value::as_object);
    let (kind, m) = KINDS
        .into_iter()
        .find_map(|(k, kind)| field(k).map(|m| (kind, m)))?;
    let mut out = match kind {
        Some(MessageType::MessageReaction) => reaction(m),
        Some(MessageType::ConversationUpdate) => membership(m, bot),
        Some(kind) => message(kind, m),
        // A button of ours was pressed: its callback_data is what the bot sent.
        None => callback(m),
    }?;
    if self_id.is_some_and(|me| out.address.user_id() == me.to_string()) {
        return None;
    }
    out.address.channel_id = CHANNEL_ID.into();
    out.address.bot = Some(Identity {
        id: bot.to_string(),
        ..Default::default()
    });
    out.source_event
        .insert(CHANNEL_ID.to_string(), update.clone());
    Some(out)
}

/// The chat a message or event is in, as the conversation to reply to.
fn conversation(chat: &Map<String, Value>) -> Option<Conversation> {
    let id = id_text(chat.get("id")?)?;
    let kind = chat.get("type").and_then(Value::as_str).unwrap_or_default();
    Some(Conversation {
        id,
        name: chat.get("title").and_then(Value::as_str).map(bounded),
        is_group: Some(kind != "private"),
        conversation_type: Some(kind.to_string()).filter(|k| !k.is_empty()),
        ..Default::default()
    })
}

/// A sender (`from`) as an identity: its id, and its name as Telegram shows it.
fn person(from: &Map<String, Value>) -> Option<Identity> {
    let id = id_text(from.get("id")?)?;
    let s = |k: &str| from.get(k).and_then(Value::as_str).unwrap_or_default();
    let name = [s("first_name"), s("last_name")]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let name = if name.is_empty() {
        s("username")
    } else {
        &name
    };
    Some(Identity {
        id,
        name: Some(bounded(name)).filter(|n| !n.is_empty()),
        ..Default::default()
    })
}

fn message(kind: MessageType, m: &Map<String, Value>) -> Option<Message> {
    let chat = m.get("chat").and_then(Value::as_object)?;
    let mut out = Message {
        kind,
        address: Address {
            user: m
                .get("from")
                .and_then(Value::as_object)
                .and_then(person)
                // A channel post has no sender: the channel speaks.
                .or_else(|| person(chat)),
            conversation: Some(conversation(chat)?),
            id: m.get("message_id").and_then(id_text),
            thread_id: m
                .get("is_topic_message")
                .and_then(Value::as_bool)
                .filter(|t| *t)
                .and_then(|_| m.get("message_thread_id"))
                .and_then(id_text),
            ..Default::default()
        },
        text: m
            .get("text")
            .or_else(|| m.get("caption"))
            .and_then(Value::as_str)
            .map(bounded),
        timestamp: m
            .get("edit_date")
            .or_else(|| m.get("date"))
            .and_then(Value::as_i64)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
        ..Default::default()
    };
    out.attachments = attachments(m);
    let joined: Vec<Identity> = array(m, "new_chat_members").filter_map(person).collect();
    let left: Vec<Identity> = m
        .get("left_chat_member")
        .and_then(Value::as_object)
        .and_then(person)
        .into_iter()
        .collect();
    if !joined.is_empty() || !left.is_empty() {
        out.kind = MessageType::ConversationUpdate;
        out.members_added = joined;
        out.members_removed = left;
    }
    Some(out)
}

/// A pressed inline button: `data` is the callback_data the renderer wrote, which is what a v3
/// bot received as the message text of a post-back (and of an imBack).
fn callback(q: &Map<String, Value>) -> Option<Message> {
    let from = q.get("from").and_then(Value::as_object).and_then(person)?;
    let mut out = q
        .get("message")
        .and_then(Value::as_object)
        .and_then(|m| message(MessageType::Message, m))
        .unwrap_or_default();
    out.kind = MessageType::Message;
    out.address.user = Some(from);
    out.attachments.clear();
    out.text = q.get("data").and_then(Value::as_str).map(bounded);
    out.value = out.text.clone().map(Value::String);
    out.address.conversation.as_ref()?;
    Some(out)
}

/// Reactions changed on a message: what was added and what was taken away.
fn reaction(r: &Map<String, Value>) -> Option<Message> {
    let chat = r.get("chat").and_then(Value::as_object)?;
    let emojis = |k: &str| -> Vec<String> {
        array(r, k)
            .filter_map(|e| {
                e.get("emoji")
                    .or_else(|| e.get("custom_emoji_id"))
                    .and_then(Value::as_str)
                    .map(bounded)
            })
            .collect()
    };
    let (old, new) = (emojis("old_reaction"), emojis("new_reaction"));
    Some(Message {
        kind: MessageType::MessageReaction,
        address: Address {
            user: r.get("user").and_then(Value::as_object).and_then(person),
            conversation: Some(conversation(chat)?),
            id: r.get("message_id").and_then(id_text),
            ..Default::default()
        },
        reactions_added: new.iter().filter(|e| !old.contains(e)).cloned().collect(),
        reactions_removed: old.iter().filter(|e| !new.contains(e)).cloned().collect(),
        timestamp: r
            .get("date")
            .and_then(Value::as_i64)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
        ..Default::default()
    })
}

/// The bot itself was added to or removed from a chat.
fn membership(c: &Map<String, Value>, bot: &str) -> Option<Message> {
    let chat = c.get("chat").and_then(Value::as_object)?;
    let status = c
        .get("new_chat_member")
        .and_then(|m| m.get("status"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let me = Identity {
        id: bot.to_string(),
        ..Default::default()
    };
    let mut out = Message {
        kind: MessageType::ConversationUpdate,
        address: Address {
            user: c.get("from").and_then(Value::as_object).and_then(person),
            conversation: Some(conversation(chat)?),
            ..Default::default()
        },
        ..Default::default()
    };
    match status {
        "member" | "administrator" | "creator" => out.members_added.push(me),
        "left" | "kicked" => out.members_removed.push(me),
        _ => {}
    }
    Some(out)
}

/// What a message carries besides text, by reference: Telegram gives a `file_id`, whose
/// download URL holds the bot's token, so no URL is given to the bot: `content_url` is the
/// reference `telegram-file:<file_id>`, which FetchAttachment turns into the bytes (the
/// gateway keeps the token).
fn attachments(m: &Map<String, Value>) -> Vec<Attachment> {
    let mut out = Vec::new();
    // A photo comes in several sizes, smallest first: the largest is the picture.
    if let Some(photo) = m
        .get("photo")
        .and_then(Value::as_array)
        .and_then(|sizes| sizes.last())
    {
        out.push(file(photo, "image/jpeg"));
    }
    for (k, default_type) in [
        ("document", "application/octet-stream"),
        ("video", "video/mp4"),
        ("audio", "audio/mpeg"),
        ("voice", "audio/ogg"),
        ("animation", "video/mp4"),
        ("sticker", "image/webp"),
    ] {
        if let Some(f) = m.get(k) {
            out.push(file(f, default_type));
        }
    }
    out.truncate(MAX_ATTACHMENTS);
    out
}

fn file(f: &Value, default_type: &str) -> Attachment {
    let s = |k: &str| f.get(k).and_then(Value::as_str);
    Attachment {
        content_url: s("file_id")
            .filter(|id| {
                id.len() <= 512
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .filter(|id| !id.is_empty())
            .map(super::fetch::file_url),
        content_type: s("mime_type")
            .unwrap_or(default_type)
            .chars()
            .take(255)
            .collect(),
        name: s("file_name").map(bounded),
        content: Some(AttachmentContent::Json(serde_json::json!({
            "file_id": s("file_id").map(bounded),
            "file_unique_id": s("file_unique_id").map(bounded),
            "file_size": f.get("file_size").and_then(Value::as_u64),
        }))),
        ..Default::default()
    }
}

fn array<'a>(m: &'a Map<String, Value>, k: &str) -> impl Iterator<Item = &'a Map<String, Value>> {
    m.get(k)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(MAX_ATTACHMENTS * 16)
        .filter_map(Value::as_object)
}

/// Telegram ids are integers (chat ids up to 52 bits); an id given as a string is kept too.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(bounded(s)),
        _ => None,
    }
}

/// A string from an update, cut to what Telegram could have sent.
fn bounded(s: &str) -> String {
    crate::bounded::cap(s, MAX_TEXT_BYTES).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::telegram::config::TelegramBot;

    const SECRET: &str = "webhook_secret-42";

    fn inbound() -> TelegramInbound {
        let config = TelegramConfig {
            bots: vec![
                TelegramBot {
                    bot_id: "helper_bot".into(),
                    token: Secret::new("7100200300:AAHsecret"),
                    secret_token: Some(Secret::new(SECRET)),
                    receive: Default::default(),
                },
                TelegramBot {
                    bot_id: "other_bot".into(),
                    token: Secret::new("42:other"),
                    secret_token: Some(Secret::new("other-secret")),
                    receive: Default::default(),
                },
                TelegramBot {
                    bot_id: "send_only_bot".into(),
                    token: Secret::new("43:x"),
                    secret_token: None,
                    receive: Default::default(),
                },
            ],
            ..Default::default()
        };
        TelegramInbound::new(&config).unwrap()
    }

    fn call(
        inbound: &TelegramInbound,
        path: &str,
        secret: Option<&str>,
        body: &Value,
    ) -> (Result<(), WebhookError>, Result<Parsed, WebhookError>) {
        let mut headers = http::HeaderMap::new();
        if let Some(s) = secret {
            headers.insert(SECRET_HEADER, s.parse().unwrap());
        }
        let body = serde_json::to_vec(body).unwrap();
        let req = WebhookRequest {
            method: &http::Method::POST,
            path,
            query: None,
            headers: &headers,
            body: &body,
            received_at: 1_733_000_000,
        };
        let verified = futures::executor::block_on(inbound.verify(&req));
        (verified, inbound.parse(&req))
    }

    fn one(body: Value) -> InboundEvent {
        let (v, p) = call(
            &inbound(),
            "/webhooks/telegram/helper_bot",
            Some(SECRET),
            &body,
        );
        v.unwrap();
        let mut events = p.unwrap().events;
        assert_eq!(events.len(), 1, "{events:?}");
        events.remove(0)
    }

    fn text_update() -> Value {
        serde_json::json!({
            "update_id": 10001,
            "message": {
                "message_id": 77,
                "message_thread_id": 5,
                "is_topic_message": true,
                "from": {"id": 123456789, "is_bot": false, "first_name": "Ada", "last_name": "L", "username": "ada"},
                "chat": {"id": -1001234567890i64, "title": "Team", "type": "supergroup", "is_forum": true},
                "date": 1733000000,
                "text": "hello <b>",
                "entities": [{"offset": 0, "length": 5, "type": "bold"}]
            }
        })
    }

    #[test]
    fn only_the_right_secret_for_the_bot_in_the_path_verifies() {
        let i = inbound();
        let body = text_update();
        let ok = |path: &str, secret: Option<&str>| call(&i, path, secret, &body).0;
        assert_eq!(ok("/webhooks/telegram/helper_bot", Some(SECRET)), Ok(()));
        for (path, secret) in [
            ("/webhooks/telegram/helper_bot", None),
            ("/webhooks/telegram/helper_bot", Some("webhook_secret-43")),
            ("/webhooks/telegram/helper_bot", Some("other-secret")),
            ("/webhooks/telegram/helper_bot", Some("")),
            ("/webhooks/telegram/other_bot", Some(SECRET)),
            ("/webhooks/telegram/send_only_bot", Some(SECRET)),
            ("/webhooks/telegram/nobody", Some(SECRET)),
            ("/webhooks/telegram/", Some(SECRET)),
        ] {
            assert!(
                matches!(ok(path, secret), Err(WebhookError::Unverified(_))),
                "{path} {secret:?}"
            );
        }
        let reason = ok("/webhooks/telegram/helper_bot", Some("guess")).unwrap_err();
        assert!(!reason.to_string().contains(SECRET) && !reason.to_string().contains("guess"));
        assert_eq!(
            {
                let mut p = i.paths();
                p.sort();
                p
            },
            [
                "/webhooks/telegram/helper_bot",
                "/webhooks/telegram/other_bot"
            ]
        );
    }

    #[test]
    fn a_message_in_a_topic_gives_the_address_to_reply_in_that_topic() {
        let e = one(text_update());
        assert_eq!(e.dedupe_key, "helper_bot:10001");
        let m = &e.message;
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(m.text.as_deref(), Some("hello <b>"));
        let a = &m.address;
        assert_eq!(a.channel_id, "telegram");
        assert_eq!(a.bot_id(), "helper_bot");
        assert_eq!(a.user_id(), "123456789");
        assert_eq!(
            a.user.as_ref().and_then(|u| u.name.as_deref()),
            Some("Ada L")
        );
        assert_eq!(a.conversation_id(), Some("-1001234567890"));
        assert_eq!(a.conversation.as_ref().and_then(|c| c.is_group), Some(true));
        assert_eq!(a.thread_id.as_deref(), Some("5"));
        assert_eq!(a.id.as_deref(), Some("77"));
        assert_eq!(m.timestamp.map(|t| t.unix_timestamp()), Some(1_733_000_000));
        assert_eq!(m.source_event["telegram"]["update_id"], 10001);

        // The address, used unchanged, answers in the same chat and topic, quoting the message.
        let mut reply = m.clone();
        reply.text = Some("hi".into());
        reply.source_event.clear();
        let r = crate::channels::telegram::render::render_send(
            &reply,
            None,
            &TelegramConfig::default(),
        )
        .unwrap();
        let body = r.requests[0].body.value();
        assert_eq!(body["chat_id"], -1001234567890i64);
        assert_eq!(body["message_thread_id"], 5);
        assert_eq!(body["reply_parameters"]["message_id"], 77);
        assert_eq!(r.requests[0].credential, "helper_bot");
    }

    #[test]
    fn a_pressed_button_arrives_as_the_text_a_post_back_gave() {
        let e = one(serde_json::json!({
            "update_id": 10002,
            "callback_query": {
                "id": "4382bfdwdsb323b2d9",
                "from": {"id": 123456789, "is_bot": false, "first_name": "Ada"},
                "message": {
                    "message_id": 80,
                    "from": {"id": 7100200300i64, "is_bot": true, "first_name": "Helper"},
                    "chat": {"id": 123456789, "type": "private", "first_name": "Ada"},
                    "date": 1733000000,
                    "text": "Pick one"
                },
                "chat_instance": "-1",
                "data": "yes"
            }
        }));
        let m = e.message;
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(m.text.as_deref(), Some("yes"));
        assert_eq!(m.value, Some(Value::String("yes".into())));
        // The presser, not the bot that wrote the message with the button.
        assert_eq!(m.address.user_id(), "123456789");
        assert_eq!(m.address.conversation_id(), Some("123456789"));
        assert_eq!(m.address.id.as_deref(), Some("80"));
        assert_eq!(
            m.source_event["telegram"]["callback_query"]["id"], "4382bfdwdsb323b2d9",
            "kept for answerCallbackQuery"
        );
    }

    #[test]
    fn edits_reactions_and_membership_have_their_kinds() {
        let edit = one(serde_json::json!({"update_id": 1, "edited_message": {
            "message_id": 9, "from": {"id": 5, "first_name": "A"}, "chat": {"id": 5, "type": "private"},
            "date": 1733000000, "edit_date": 1733000100, "text": "fixed"}}));
        assert_eq!(edit.message.kind, MessageType::MessageUpdate);
        assert_eq!(edit.message.address.id.as_deref(), Some("9"));
        assert_eq!(
            edit.message.timestamp.map(|t| t.unix_timestamp()),
            Some(1_733_000_100)
        );

        let reaction = one(serde_json::json!({"update_id": 2, "message_reaction": {
            "chat": {"id": 5, "type": "private"}, "message_id": 9, "user": {"id": 5, "first_name": "A"},
            "date": 1733000200,
            "old_reaction": [{"type": "emoji", "emoji": "👍"}],
            "new_reaction": [{"type": "emoji", "emoji": "🔥"}]}}));
        assert_eq!(reaction.message.kind, MessageType::MessageReaction);
        assert_eq!(reaction.message.reactions_added, ["🔥"]);
        assert_eq!(reaction.message.reactions_removed, ["👍"]);

        let added = one(serde_json::json!({"update_id": 3, "my_chat_member": {
            "chat": {"id": -100, "type": "group", "title": "G"}, "from": {"id": 5, "first_name": "A"},
            "date": 1733000300,
            "old_chat_member": {"status": "left", "user": {"id": 7100200300i64, "is_bot": true}},
            "new_chat_member": {"status": "member", "user": {"id": 7100200300i64, "is_bot": true}}}}));
        assert_eq!(added.message.kind, MessageType::ConversationUpdate);
        assert_eq!(added.message.members_added[0].id, "helper_bot");

        let joined = one(serde_json::json!({"update_id": 4, "message": {
            "message_id": 10, "from": {"id": 5, "first_name": "A"}, "chat": {"id": -100, "type": "group"},
            "date": 1733000400, "new_chat_members": [{"id": 6, "first_name": "B"}]}}));
        assert_eq!(joined.message.kind, MessageType::ConversationUpdate);
        assert_eq!(joined.message.members_added[0].id, "6");
    }

    #[test]
    fn files_come_by_reference_never_by_a_url_holding_the_token() {
        let e = one(serde_json::json!({"update_id": 5, "message": {
            "message_id": 11, "from": {"id": 5, "first_name": "A"}, "chat": {"id": 5, "type": "private"},
            "date": 1733000000, "caption": "look",
            "photo": [{"file_id": "small", "file_unique_id": "s", "width": 90, "height": 90},
                      {"file_id": "large", "file_unique_id": "l", "width": 800, "height": 800, "file_size": 5000}],
            "document": {"file_id": "doc", "file_unique_id": "d", "file_name": "a.pdf", "mime_type": "application/pdf"}}}));
        let m = e.message;
        assert_eq!(m.text.as_deref(), Some("look"));
        assert_eq!(m.attachments.len(), 2);
        assert_eq!(m.attachments[0].content_type, "image/jpeg");
        assert_eq!(m.attachments[1].content_type, "application/pdf");
        assert_eq!(m.attachments[1].name.as_deref(), Some("a.pdf"));
        // A reference FetchAttachment resolves, never a URL with the token.
        assert_eq!(
            m.attachments[0].content_url.as_deref(),
            Some("telegram-file:large")
        );
        assert_eq!(
            m.attachments[1].content_url.as_deref(),
            Some("telegram-file:doc")
        );
        assert_eq!(
            m.attachments[0].content,
            Some(AttachmentContent::Json(serde_json::json!(
                {"file_id": "large", "file_unique_id": "l", "file_size": 5000}
            )))
        );
    }

    #[test]
    fn the_bots_own_messages_and_unknown_updates_are_not_events() {
        let i = inbound();
        let path = "/webhooks/telegram/helper_bot";
        for body in [
            serde_json::json!({"update_id": 6, "message": {"message_id": 12,
                "from": {"id": 7100200300i64, "is_bot": true, "first_name": "Helper"},
                "chat": {"id": 5, "type": "private"}, "date": 1733000000, "text": "mine"}}),
            serde_json::json!({"update_id": 7, "poll": {"id": "p"}}),
        ] {
            let (v, p) = call(&i, path, Some(SECRET), &body);
            v.unwrap();
            assert!(p.unwrap().events.is_empty(), "{body}");
        }
        let bad = |body: &[u8]| {
            let headers = http::HeaderMap::new();
            i.parse(&WebhookRequest {
                method: &http::Method::POST,
                path,
                query: None,
                headers: &headers,
                body,
                received_at: 0,
            })
        };
        assert!(matches!(bad(b"not json"), Err(WebhookError::Unreadable(_))));
        assert!(matches!(
            bad(b"{\"message\":{}}"),
            Err(WebhookError::Unreadable(_))
        ));
    }

    #[test]
    fn hostile_sizes_are_bounded() {
        let e = one(serde_json::json!({"update_id": 8, "message": {
            "message_id": 13, "from": {"id": 5, "first_name": "x".repeat(200_000)},
            "chat": {"id": 5, "type": "private"}, "date": 1733000000,
            "text": "y".repeat(1_000_000),
            "new_chat_members": vec![serde_json::json!({"id": 1, "first_name": "m"}); 10_000]}}));
        let m = e.message;
        assert!(m.text.as_ref().unwrap().len() < 70 << 10);
        assert!(m.address.user.unwrap().name.unwrap().len() < 70 << 10);
        assert!(m.members_added.len() <= MAX_ATTACHMENTS * 16);
    }
}
