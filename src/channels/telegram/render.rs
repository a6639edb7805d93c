//! Pure translation of the model into Telegram Bot API calls: `sendMessage` (text as Telegram
//! HTML), `sendPhoto` / `sendVideo` / `sendAudio` / `sendAnimation` / `sendDocument` for media
//! and cards with an image, `sendMediaGroup` for runs of images, `sendChatAction` for typing,
//! inline keyboards for card buttons and a reply keyboard for suggested actions; the split of
//! long text, `source_event.telegram` merging, and each call's rate scopes. And how a message
//! sent before is edited (`editMessageText`, `editMessageMedia`) or deleted (`deleteMessage`),
//! native message by native message (`TelegramEditor`, planned by `channels::update`).
//!
//! No I/O, no token: every URL is `{api_base}/bot<token>/METHOD` with the literal placeholder
//! (`telegram::method_url`); the client puts the token of `NativeRequest::credential` (the
//! address's bot id) in at send time. Owns none of the text conversion (`html`) nor the
//! splitting mechanics (`split`).
//!
//! One model message becomes several calls, in delivery order: its text (split at 4096, or as
//! the caption of a first media attachment when it fits in 1024), then each attachment in
//! order. Documented in docs/channels/telegram.md.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::config::TelegramConfig;
use super::html::{self, Rich, Style};
use super::split;
use super::{CHANNEL_ID, method_url};
use crate::channels::{
    Body, Budget, Capabilities, HttpMethod, NativeRequest, RateScope, RateScopes, RenderError,
    Rendered, text,
};
use crate::model::{
    ActionType, Address, Attachment, AttachmentContent, CardAction, HeroCard, MediaCard, Message,
    MessageType, ProactiveOptions, ReceiptCard, SendKind, SuggestedActions, TextFormat, Warning,
};

/// A message's text, counted after entity parsing (UTF-16 units: see `split`).
pub const MAX_TEXT: usize = 4096;
/// A media caption, counted the same way.
pub const MAX_CAPTION: usize = 1024;
/// Media in one `sendMediaGroup` (the Bot API takes 2-10).
pub const MAX_ALBUM: usize = 10;
/// `callback_data` of an inline button, in bytes (Bot API: 1-64 bytes).
pub const MAX_CALLBACK_DATA: usize = 64;
/// Buttons in one keyboard. Telegram documents no figure; it refuses a markup much past 100
/// buttons (`BUTTONS_TOO_MUCH`, widely reported), so one keyboard holds at most 100.
pub const MAX_KEYBOARD_BUTTONS: usize = 100;
/// Characters of a button's label kept (Telegram documents none; clients elide long ones).
pub const MAX_BUTTON_TEXT: usize = 64;
/// Buttons whose labels are all at most this long share rows of [`ROW_OF_SHORT`].
const SHORT_TITLE: usize = 12;
const ROW_OF_SHORT: usize = 3;
/// Attachments of one message rendered; the rest are dropped with a warning.
pub const MAX_ATTACHMENTS: usize = 50;
/// Telegram messages one model text may become (50 x 4096 units); a longer text is refused.
pub const MAX_TEXT_PARTS: usize = 50;
/// Telegram shows a chat action for 5 s or less ("sendChatAction"): repeat it every 4 s.
pub const TYPING_INTERVAL: Duration = Duration::from_secs(4);

/// Telegram's broadcast FAQ: about 30 messages per second per bot, no more than one message per
/// second in one private chat, and 20 per minute in one group. Each budget leaves its burst
/// inside the documented window (`Budget::window`).
static BOT_BUDGET: [Budget; 1] = [Budget::window(30, 1, 5)];
static PRIVATE_CHAT_BUDGET: [Budget; 1] = [Budget {
    per_second: 1.0,
    burst: 1,
}];
static GROUP_CHAT_BUDGET: [Budget; 1] = [Budget::window(20, 60, 3)];

/// Keys `source_event.telegram` may not set: the chat is the address's, and nothing in a body
/// may name another method or carry a token.
const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "chat_id",
        "cannot be set here: the chat is address.conversation.id",
    ),
    (
        "method",
        "cannot be set here: the method is chosen by the gateway",
    ),
    (
        "token",
        "cannot be set here: tokens come from channels.telegram.bots",
    ),
    (
        "bot_token",
        "cannot be set here: tokens come from channels.telegram.bots",
    ),
];

/// What the shared `source_event["*"]` may set: how a message is delivered, never what it
/// says or where it goes (`source_event.telegram` may set any key but `REFUSED_KEYS`).
pub const FALLBACK_KEYS: &[&str] = &[
    "allow_paid_broadcast",
    "disable_notification",
    "link_preview_options",
    "message_effect_id",
    "protect_content",
];

/// What Telegram supports through this gateway.
pub fn capabilities(channel_id: &str) -> Capabilities {
    Capabilities {
        channel_id: channel_id.into(),
        implementation: CHANNEL_ID.into(),
        typing: true,
        typing_interval: TYPING_INTERVAL,
        carousel: true,
        max_buttons_per_card: MAX_KEYBOARD_BUTTONS as u32,
        max_suggested_actions: MAX_KEYBOARD_BUTTONS as u32,
        max_text_length: MAX_TEXT as u32,
        markdown_flavor: "markdown".into(),
        update_delete: true,
        proactive: true,
        max_payload_bytes: 0,
        proactive_note: "only to a person who wrote to the bot first (bots cannot open a chat): \
                         without a conversation, address.user.id is the private chat's id"
            .into(),
    }
}

/// The calls for one message to `address.conversation.id`, in order. `proactive` changes
/// nothing on Telegram (no message tags).
pub fn render_send(
    msg: &Message,
    _proactive: Option<&ProactiveOptions>,
    config: &TelegramConfig,
) -> Result<Rendered, RenderError> {
    let bot = msg.address.bot_id();
    if bot.is_empty() {
        return Err(RenderError::invalid(
            "message.address.bot.id",
            "required: the bot_id of one of channels.telegram.bots",
        ));
    }
    let conv = msg.address.conversation_id().ok_or_else(|| {
        RenderError::invalid(
            "message.address.conversation.id",
            "required: the Telegram chat id (SendProactive uses the user's id for a private chat)",
        )
    })?;
    let chat = chat_id(conv, "message.address.conversation.id")?;
    let thread = match msg.address.thread_id.as_deref().filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(t.parse::<i64>().map_err(|_| {
            RenderError::invalid(
                "message.address.thread_id",
                "must be a forum topic's message_thread_id (an integer)",
            )
        })?),
    };
    if msg.delivery_mode == Some(crate::model::DeliveryMode::Ephemeral) {
        // Sent as an ordinary message it would show to everyone in a group.
        return Err(RenderError::invalid(
            "message.delivery_mode",
            "ephemeral messages are not supported on telegram (they would be visible to the whole chat)",
        ));
    }
    let mut ctx = Ctx {
        format: msg.text_format,
        warnings: Vec::new(),
    };
    let extra = source_event(msg, &mut ctx)?;

    let mut calls = match RenderError::send_kind(msg)? {
        SendKind::Typing => vec![Call::new("sendChatAction").with("action", json!("typing"))],
        SendKind::EndOfConversation => {
            ctx.warn(
                "end_of_conversation_not_sent",
                "message.type",
                "Telegram has no end of conversation: nothing was sent",
            );
            Vec::new()
        }
        SendKind::Event => {
            ctx.warn(
                "event_not_sent",
                "message.type",
                "Telegram has no event activity: nothing was sent",
            );
            Vec::new()
        }
        SendKind::Message => message_calls(msg, &mut ctx)?,
    };

    if msg.kind == MessageType::Message {
        if calls.is_empty() {
            ctx.warn(
                "nothing_to_send",
                "message",
                "the message has nothing Telegram can show: nothing was sent",
            );
        }
        if let Some(target) = msg.reply_target() {
            match target.parse::<i64>() {
                // The first call answers the message; the rest follow it.
                Ok(id) => {
                    if let Some(first) = calls.first_mut() {
                        first.body.insert(
                            "reply_parameters".into(),
                            json!({"message_id": id, "allow_sending_without_reply": true}),
                        );
                    }
                }
                Err(_) => ctx.warn(
                    "reply_dropped",
                    if msg.reply_to_id.is_some() {
                        "message.reply_to_id"
                    } else {
                        "message.address.id"
                    },
                    "not a Telegram message_id (an integer): sent without replying to it",
                ),
            }
        }
    }

    let mut rate = rate_scopes(bot, &chat);
    if !config.pacing {
        rate.drop_budgets();
    }
    // A typing indicator kept alive every 4 s would take most of a group's 20 messages a
    // minute: it is paused with the chat (a 429 there stops it too) but not paced by the
    // chat's message budget; it still counts against the bot's.
    let mut typing_rate = rate.clone();
    if let Some(chat_scope) = typing_rate.0.first_mut() {
        chat_scope.budgets = std::borrow::Cow::Borrowed(&[]);
    }
    let mut requests = Vec::with_capacity(calls.len());
    for call in calls {
        let mut body = Map::new();
        body.insert("chat_id".into(), chat.clone());
        if let Some(t) = thread {
            body.insert("message_thread_id".into(), json!(t));
        }
        let typing = call.method == "sendChatAction";
        body.extend(call.body);
        if let Some(e) = extra.as_ref().filter(|_| !typing) {
            for (k, v) in e {
                body.insert(k.clone(), v.clone());
            }
        }
        requests.push(NativeRequest {
            method: HttpMethod::Post,
            url: method_url(config, call.method),
            body: Body::json(&Value::Object(body))?,
            credential: bot.to_string(),
            rate: if typing {
                typing_rate.clone()
            } else {
                rate.clone()
            },
        });
    }
    let mut out = Rendered {
        requests,
        warnings: ctx.warnings,
    };
    out.cap_warnings();
    Ok(out)
}

/// Whether every text and caption of `r` is HTML whose tags balance and whose visible text is
/// within Telegram's limits (`MAX_TEXT`, `MAX_CAPTION`), and, unless `blank_allowed`, not
/// blank: what the split promises. The goldens and the fuzz targets hold every render to it
/// (hostile input may leave a blank part; no golden case may).
pub fn texts_fit(r: &Rendered, blank_allowed: bool) -> Result<(), String> {
    for q in &r.requests {
        let body = q.body.value();
        let mut texts: Vec<(&Value, usize)> =
            vec![(&body["text"], MAX_TEXT), (&body["caption"], MAX_CAPTION)];
        for m in body["media"].as_array().into_iter().flatten() {
            texts.push((&m["caption"], MAX_CAPTION));
        }
        for (t, max) in texts {
            if let Some(t) = t.as_str() {
                let v = html::visible_text(t)?;
                let n = v.encode_utf16().count();
                if n > max || (!blank_allowed && v.trim().is_empty()) {
                    return Err(format!("{n} UTF-16 units (limit {max}) in {}", q.url));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Updates and deletes

/// The keys of a `sendMessage` body that `editMessageText` takes too. The rest (the thread, the
/// message replied to, notification and protection flags) belongs to the message's posting and
/// cannot change.
const EDIT_TEXT_KEYS: &[&str] = &["text", "parse_mode", "entities", "link_preview_options"];
/// The keys of a media send's body that its `InputMedia` takes in `editMessageMedia`.
const EDIT_MEDIA_KEYS: &[&str] = &[
    "caption",
    "parse_mode",
    "caption_entities",
    "show_caption_above_media",
    "has_spoiler",
];

/// How a Telegram message is edited and deleted: `editMessageText`, `editMessageMedia` and
/// `deleteMessage` with the chat id and `message_id` Telegram gave back for it.
///
/// A receipt says nothing of what kind of message it names, so each edit is chosen by what the
/// update sends in its place:
/// - a text (`sendMessage`) becomes `editMessageText`. Telegram edits only a text message into
///   text: a photo cannot become one (it answers "there is no text in the message to edit",
///   reported as a permanent failure saying so);
/// - a photo, video, audio, document or animation becomes `editMessageMedia` with its media and
///   caption, never `editMessageCaption`: whether only the caption changed is not knowable from
///   a receipt, and `editMessageMedia` is right either way (the same media with a new caption,
///   new media, or media added to a text message);
/// - an album (`sendMediaGroup`) is several messages, which no edit of one message makes: the
///   native message is deleted and the album sent after the others (`update::reconcile`).
///
/// Every edit sets `reply_markup` or leaves it out, so the message shows exactly the update's
/// inline keyboard (none removes the old one): `editMessageReplyMarkup` is never needed. An
/// edit cannot set a reply keyboard (suggested actions): it is left out, and counted for the
/// plan's warning.
///
/// An album sent before is one receipt naming its first message (`TelegramClient::execute`):
/// an edit or delete reaches that message only, and the album's other media stay. Reaching
/// them needs a receipt that records every message of the album.
pub struct TelegramEditor<'a> {
    pub config: &'a TelegramConfig,
    pub address: &'a Address,
    /// Edits whose send carried a reply keyboard, left out of the edit.
    dropped_keyboards: std::cell::Cell<usize>,
}

impl<'a> TelegramEditor<'a> {
    pub fn new(config: &'a TelegramConfig, address: &'a Address) -> Self {
        Self {
            config,
            address,
            dropped_keyboards: std::cell::Cell::new(0),
        }
    }

    /// The chat and message a receipt names, as the Bot API takes them. A Render's placeholder
    /// (`{native_id_1}`, `update::placeholders`) stands as it is: it is shown, never sent.
    fn target(
        &self,
        receipt: &crate::channels::NativeReceipt,
    ) -> Result<(Value, Value), RenderError> {
        let conv = Some(receipt.conversation_id.as_str())
            .filter(|c| !c.is_empty())
            .or_else(|| self.address.conversation_id())
            .unwrap_or_default();
        let chat = chat_id(conv, "message.address.conversation.id")?;
        let id = &receipt.native_id;
        if let Ok(n) = id.parse::<i64>() {
            return Ok((chat, json!(n)));
        }
        let placeholder = id
            .strip_prefix("{native_id_")
            .and_then(|r| r.strip_suffix('}'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if placeholder {
            return Ok((chat, json!(id)));
        }
        // Not echoed: a receipt's id comes from the channel.
        Err(RenderError::invalid(
            "message_id",
            "a native message of this message has no Telegram message_id: it cannot be changed \
             or deleted",
        ))
    }

    fn request(
        &self,
        method: &str,
        chat: &Value,
        body: Map<String, Value>,
    ) -> Result<NativeRequest, RenderError> {
        let bot = self.address.bot_id();
        let mut rate = rate_scopes(bot, chat);
        // Edits count against the chat's and the bot's flood limits like sends (and are paced
        // by them). Telegram publishes no limit for deletes, its maintainers call theirs "high
        // enough to cover all reasonable usages": a delete is not paced by the message budgets,
        // only paused with the chat and the bot when Telegram answers 429.
        if !self.config.pacing || method == "deleteMessage" {
            rate.drop_budgets();
        }
        Ok(NativeRequest {
            method: HttpMethod::Post,
            url: method_url(self.config, method),
            body: Body::json(&Value::Object(body))?,
            credential: bot.to_string(),
            rate,
        })
    }
}

impl crate::channels::update::Editor for TelegramEditor<'_> {
    fn edit(
        &self,
        send: &NativeRequest,
        receipt: &crate::channels::NativeReceipt,
    ) -> Result<Option<NativeRequest>, RenderError> {
        let posted = send.body.value();
        let method = send.url.rsplit('/').next().unwrap_or_default();
        let media_field = match method {
            "sendMessage" => None,
            "sendPhoto" => Some("photo"),
            "sendVideo" => Some("video"),
            "sendAudio" => Some("audio"),
            "sendDocument" => Some("document"),
            "sendAnimation" => Some("animation"),
            // An album, or anything else no edit of one message makes.
            _ => return Ok(None),
        };
        let (chat, message_id) = self.target(receipt)?;
        let mut body = Map::new();
        body.insert("chat_id".into(), chat.clone());
        body.insert("message_id".into(), json!(message_id));
        let edit = match media_field {
            None => {
                for k in EDIT_TEXT_KEYS {
                    if let Some(v) = posted.get(*k) {
                        body.insert((*k).into(), v.clone());
                    }
                }
                "editMessageText"
            }
            Some(field) => {
                let mut media = Map::new();
                media.insert("type".into(), json!(field));
                media.insert(
                    "media".into(),
                    posted.get(field).cloned().unwrap_or(Value::Null),
                );
                for k in EDIT_MEDIA_KEYS {
                    if let Some(v) = posted.get(*k) {
                        media.insert((*k).into(), v.clone());
                    }
                }
                body.insert("media".into(), Value::Object(media));
                "editMessageMedia"
            }
        };
        match posted.get("reply_markup") {
            Some(m) if m.get("inline_keyboard").is_some() => {
                body.insert("reply_markup".into(), m.clone());
            }
            Some(Value::Null) | None => {}
            // A reply keyboard, or a markup that removes one or forces a reply: only a new
            // message sets those.
            Some(_) => self.dropped_keyboards.set(self.dropped_keyboards.get() + 1),
        }
        self.request(edit, &chat, body).map(Some)
    }

    fn delete(
        &self,
        receipt: &crate::channels::NativeReceipt,
    ) -> Result<NativeRequest, RenderError> {
        let (chat, message_id) = self.target(receipt)?;
        let mut body = Map::new();
        body.insert("chat_id".into(), chat.clone());
        body.insert("message_id".into(), json!(message_id));
        self.request("deleteMessage", &chat, body)
    }
}

/// An update of a sent message: its send's rendering, mapped onto what it became
/// (`TelegramEditor` says how each native message is edited).
pub fn render_update(
    msg: &Message,
    receipts: &[crate::channels::NativeReceipt],
    config: &TelegramConfig,
) -> Result<crate::channels::update::Plan, RenderError> {
    if msg.kind != MessageType::Message {
        return Err(RenderError::invalid(
            "message.type",
            "an update replaces a message with a message: a typing indicator, an event or an \
             end of conversation cannot take its place",
        ));
    }
    let sends = render_send(msg, None, config)?;
    if sends.requests.is_empty() {
        // Mapped onto the receipts, it would delete every native message without saying so.
        return Err(RenderError::invalid(
            "message",
            "the update has nothing Telegram can show: DeleteMessage removes a message",
        ));
    }
    let editor = TelegramEditor::new(config, &msg.address);
    let mut plan = crate::channels::update::reconcile(sends, receipts, &editor)?;
    let dropped = editor.dropped_keyboards.get();
    if dropped > 0 {
        let field = if msg
            .suggested_actions
            .as_ref()
            .is_some_and(|s| !s.actions.is_empty())
        {
            "message.suggested_actions"
        } else {
            "message.source_event.telegram.reply_markup"
        };
        plan.rendered.warnings.push(Warning::new(
            "reply_keyboard_dropped",
            field,
            format!(
                "Telegram cannot set a reply keyboard by editing a message: {dropped} edited \
                 message(s) went without it (only a new message shows suggested actions)"
            ),
        ));
        plan.rendered.cap_warnings();
    }
    Ok(plan)
}

/// The deletion of every native message a sent message became, one `deleteMessage` each:
/// each receipt is a step of its own, so a delete that stops part way (a message older than
/// 48 hours) records exactly which are gone.
pub fn render_delete(
    address: &Address,
    receipts: &[crate::channels::NativeReceipt],
    config: &TelegramConfig,
) -> Result<crate::channels::update::Plan, RenderError> {
    crate::channels::update::delete_all(receipts, &TelegramEditor::new(config, address))
}

/// Render of a proactive start: Telegram bots cannot open a chat, but a private chat's id is
/// the user's id, so a message without a conversation goes to `user.id` (the user must have
/// written to the bot once, or Telegram answers 403). Each message is then rendered as sent.
pub fn render_proactive(
    messages: &[Message],
    options: &ProactiveOptions,
    config: &TelegramConfig,
) -> Result<Rendered, RenderError> {
    if messages.is_empty() {
        return Err(RenderError::invalid(
            "messages",
            "at least one message is needed to render a proactive start",
        ));
    }
    if options.is_group || !options.members.is_empty() {
        return Err(RenderError::invalid(
            "options.is_group",
            "Telegram bots cannot create groups: send to an existing group's chat id instead",
        ));
    }
    let mut out = Rendered::default();
    for (i, m) in messages.iter().enumerate() {
        let mut m = m.clone();
        m.address = proactive_address(&m.address, &format!("messages[{i}].address"))?;
        m.address.id = None;
        m.reply_to_id = None;
        let r = render_send(&m, Some(options), config)?;
        out.requests.extend(r.requests);
        out.warnings.extend(r.warnings);
    }
    out.cap_warnings();
    Ok(out)
}

/// The address a proactive send goes to: as it is when it names a chat, else the private chat
/// whose id is `user.id` (Telegram's private chat ids are the users' ids), answering no
/// message. `field` is the address's path in the request, for errors. What SendProactive's
/// conversation creation answers on Telegram: no call is made.
pub fn proactive_address(address: &Address, field: &str) -> Result<Address, RenderError> {
    let mut out = address.clone();
    out.id = None;
    if out.conversation_id().is_some() {
        return Ok(out);
    }
    let user = out.user_id().trim().to_string();
    if user.is_empty() {
        return Err(RenderError::invalid(
            format!("{field}.user.id"),
            "required: a private chat's id is the user's id",
        ));
    }
    if user.parse::<i64>().is_err() {
        return Err(RenderError::invalid(
            format!("{field}.user.id"),
            "must be a Telegram user id (an integer), the id of the private chat",
        ));
    }
    let mut conv = out.conversation.take().unwrap_or_default();
    conv.id = user;
    out.conversation = Some(conv);
    Ok(out)
}

/// `chat_id` as the Bot API takes it: an integer (`-1001234567890`, `42`), or a channel's
/// `@username`.
fn chat_id(id: &str, field: &str) -> Result<Value, RenderError> {
    if let Ok(n) = id.parse::<i64>() {
        return Ok(json!(n));
    }
    let name = id.strip_prefix('@').unwrap_or_default();
    if !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Ok(json!(id));
    }
    Err(RenderError::invalid(
        field,
        "must be a Telegram chat id (an integer such as -1001234567890) or a channel's @username",
    ))
}

/// The chat's scope, then the bot's: a private chat (positive id) takes 1 message/s, a group or
/// channel (negative id, `@name`) 20/min; the bot 30/s across its chats.
fn rate_scopes(bot: &str, chat: &Value) -> RateScopes {
    let private = chat.as_i64().is_some_and(|n| n > 0);
    // The chat as Telegram names it (`007` and `7` are one chat).
    let conv = match chat {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let chat_budget: &'static [Budget] = if private {
        &PRIVATE_CHAT_BUDGET
    } else {
        &GROUP_CHAT_BUDGET
    };
    RateScopes(vec![
        RateScope::new(format!("{CHANNEL_ID}:{bot}:{conv}"), chat_budget),
        RateScope::new(format!("{CHANNEL_ID}:{bot}"), &BOT_BUDGET),
    ])
}

/// `source_event.telegram` (any key but `REFUSED_KEYS`) or `source_event["*"]` (only
/// `FALLBACK_KEYS`), merged over each call's body.
fn source_event(msg: &Message, ctx: &mut Ctx) -> Result<Option<Map<String, Value>>, RenderError> {
    let key = if msg.source_event.contains_key(CHANNEL_ID) {
        CHANNEL_ID
    } else {
        "*"
    };
    let Some(v) = msg.source_event.get(key) else {
        return Ok(None);
    };
    let field = format!("message.source_event.{key}");
    let o = match v {
        Value::Object(o) => o,
        Value::Null => return Ok(None),
        _ => {
            return Err(RenderError::invalid(
                field,
                "must be a JSON object of Bot API parameters (disable_notification, protect_content, ...)",
            ));
        }
    };
    if key == "*" {
        return Ok(crate::channels::shared::keep_fallback_keys(
            o,
            "Bot API",
            CHANNEL_ID,
            FALLBACK_KEYS,
            &mut ctx.warnings,
        ));
    }
    for (k, reason) in REFUSED_KEYS {
        if o.contains_key(*k) {
            return Err(RenderError::invalid(format!("{field}.{k}"), *reason));
        }
    }
    Ok((!o.is_empty()).then(|| o.clone()))
}

// ---------------------------------------------------------------------------------------------
// Context and calls

struct Ctx {
    format: Option<TextFormat>,
    warnings: Vec<Warning>,
}

impl Ctx {
    fn warn(&mut self, code: &str, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning::new(code, field, message));
    }

    /// Text in the message's format (markdown when unset), as styled runs.
    fn rich(&self, s: &str) -> Rich {
        match self.format {
            Some(TextFormat::Plain) => Rich::plain(s),
            Some(TextFormat::Xml) => html::from_xml(s),
            _ => html::from_markdown(s),
        }
    }

    /// Text in the message's format, as plain text (button labels).
    fn plain(&self, s: &str) -> String {
        self.rich(s).visible().trim().to_string()
    }
}

/// One Bot API call, without the fields every call of the message shares.
#[derive(Debug, Clone)]
struct Call {
    method: &'static str,
    body: Map<String, Value>,
}

impl Call {
    fn new(method: &'static str) -> Self {
        Self {
            method,
            body: Map::new(),
        }
    }

    fn with(mut self, key: &str, v: Value) -> Self {
        self.body.insert(key.into(), v);
        self
    }

    /// Whether a reply keyboard can still be put on it: only single messages take a markup,
    /// and only one.
    fn takes_markup(&self) -> bool {
        !matches!(self.method, "sendMediaGroup" | "sendChatAction")
            && !self.body.contains_key("reply_markup")
    }
}

/// `sendMessage` calls for `rich` (split at 4096), the keyboard on the last.
fn text_calls(
    rich: &Rich,
    keyboard: Option<Value>,
    field: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Call>, RenderError> {
    let rich = rich.clone().trimmed();
    if rich.is_blank() {
        return Ok(Vec::new());
    }
    let too_long = |n: usize| {
        RenderError::invalid(
            field,
            format!(
                "is {n} characters (UTF-16 units); at most {MAX_TEXT_PARTS} Telegram messages of {MAX_TEXT} are sent for one text"
            ),
        )
    };
    if rich.len16() > MAX_TEXT * MAX_TEXT_PARTS {
        return Err(too_long(rich.len16()));
    }
    let parts: Vec<Rich> = split::split(&rich, MAX_TEXT)
        .into_iter()
        .map(Rich::trimmed)
        .filter(|p| !p.is_blank())
        .collect();
    if parts.len() > MAX_TEXT_PARTS {
        return Err(too_long(rich.len16()));
    }
    if parts.len() > 1 {
        ctx.warn(
            "text_split",
            field,
            format!(
                "text is {} characters (UTF-16 units, after formatting); a Telegram message holds at most {MAX_TEXT}: sent as {} messages, split at paragraph, line, sentence or word boundaries",
                rich.len16(),
                parts.len()
            ),
        );
    }
    let n = parts.len();
    Ok(parts
        .into_iter()
        .enumerate()
        .map(|(k, p)| {
            let mut c = Call::new("sendMessage")
                .with("text", json!(p.to_html()))
                .with("parse_mode", json!("HTML"));
            if k + 1 == n
                && let Some(kb) = &keyboard
            {
                c.body.insert("reply_markup".into(), kb.clone());
            }
            c
        })
        .collect())
}

/// A media call with `caption` (when it fits in 1024; otherwise the text goes before it as
/// messages) and the keyboard.
fn media_call(
    method: &'static str,
    field: &str,
    url: &str,
    caption: &Rich,
    keyboard: Option<Value>,
    path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Call>, RenderError> {
    let mut out = Vec::new();
    let mut call = Call::new(method).with(field, json!(url));
    let caption = caption.clone().trimmed();
    if !caption.is_blank() {
        if caption.len16() <= MAX_CAPTION {
            call.body.insert("caption".into(), json!(caption.to_html()));
            call.body.insert("parse_mode".into(), json!("HTML"));
        } else {
            ctx.warn(
                "caption_as_text",
                path,
                format!(
                    "the text is {} characters; a Telegram caption holds at most {MAX_CAPTION}: sent as a message before the media",
                    caption.len16()
                ),
            );
            out.extend(text_calls(&caption, None, path, ctx)?);
        }
    }
    if let Some(kb) = keyboard {
        call.body.insert("reply_markup".into(), kb);
    }
    out.push(call);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Message content

/// What one attachment becomes before images are grouped into albums.
enum Item {
    /// An image by URL: grouped with its neighbours into albums.
    Photo(String),
    /// Other media by URL: the method, its media field and the URL.
    Media(&'static str, &'static str, String),
    Calls(Vec<Call>),
}

impl Item {
    /// A media item's method, media field and URL.
    fn media(&self) -> Option<(&'static str, &'static str, &str)> {
        match self {
            Item::Photo(u) => Some(("sendPhoto", "photo", u)),
            Item::Media(m, f, u) => Some((m, f, u)),
            Item::Calls(_) => None,
        }
    }
}

fn message_calls(msg: &Message, ctx: &mut Ctx) -> Result<Vec<Call>, RenderError> {
    let text = msg
        .text
        .as_deref()
        .map(|t| ctx.rich(t).trimmed())
        .unwrap_or_default();

    let mut items = Vec::new();
    if msg.attachments.len() > MAX_ATTACHMENTS {
        ctx.warn(
            "attachments_dropped",
            "message.attachments",
            format!(
                "{} attachments; at most {MAX_ATTACHMENTS} are sent for one message: the rest are dropped",
                msg.attachments.len()
            ),
        );
    }
    for (i, a) in msg.attachments.iter().take(MAX_ATTACHMENTS).enumerate() {
        if let Some(item) = attachment(a, &format!("message.attachments[{i}]"), ctx)? {
            items.push(item);
        }
    }
    let items = albums(items, ctx);

    let mut calls = Vec::new();
    let mut items = items.into_iter().peekable();
    // The text is the caption of a first media attachment when it fits there.
    let caption_fits = !text.is_blank() && text.len16() <= MAX_CAPTION;
    match items.peek_mut() {
        Some(Grouped::Album(urls)) if caption_fits => {
            let urls = std::mem::take(urls);
            items.next();
            calls.push(album(&urls, Some(&text)));
        }
        Some(Grouped::Item(item)) if caption_fits && item.media().is_some() => {
            if let Some((method, field, url)) = item.media() {
                calls.extend(media_call(
                    method,
                    field,
                    url,
                    &text,
                    None,
                    "message.text",
                    ctx,
                )?);
            }
            items.next();
        }
        first => {
            if !text.is_blank()
                && let Some(Grouped::Album(_) | Grouped::Item(Item::Photo(_) | Item::Media(..))) =
                    first
            {
                ctx.warn(
                    "caption_as_text",
                    "message.text",
                    format!(
                        "the text is {} characters; a Telegram caption holds at most {MAX_CAPTION}: sent as a message before the media",
                        text.len16()
                    ),
                );
            }
            calls.extend(text_calls(&text, None, "message.text", ctx)?)
        }
    }
    for g in items {
        match g {
            Grouped::Album(urls) => calls.push(album(&urls, None)),
            Grouped::Item(Item::Photo(u)) => {
                calls.push(Call::new("sendPhoto").with("photo", json!(u)))
            }
            Grouped::Item(Item::Media(m, f, u)) => calls.push(Call::new(m).with(f, json!(u))),
            Grouped::Item(Item::Calls(c)) => calls.extend(c),
        }
    }

    if let Some(sa) = msg
        .suggested_actions
        .as_ref()
        .filter(|s| !s.actions.is_empty())
        && let Some(kb) = reply_keyboard(sa, ctx)?
    {
        // A reply keyboard shows under the input field whichever message brought it: on the
        // last call that has no markup yet, or on a message of its own when none can take it.
        match calls.iter_mut().rev().find(|c| c.takes_markup()) {
            Some(c) => {
                c.body.insert("reply_markup".into(), kb);
            }
            None => {
                let label = msg
                    .summary
                    .as_deref()
                    .map(|s| ctx.plain(s))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "…".to_string());
                if !calls.is_empty() {
                    ctx.warn(
                        "suggested_actions_own_message",
                        "message.suggested_actions",
                        "every call of this message already carries a keyboard (or is an album): the suggested actions come in one more message",
                    );
                }
                calls.extend(text_calls(
                    &Rich::plain(&label),
                    Some(kb),
                    "message.summary",
                    ctx,
                )?);
            }
        }
    }
    Ok(calls)
}

enum Grouped {
    Album(Vec<String>),
    Item(Item),
}

/// Runs of two or more images as albums of at most 10, balanced: 11 images are albums of 6
/// and 5 rather than 10 and a lone photo, so every image of a run stays in an album (the same
/// number of calls either way).
fn albums(items: Vec<Item>, ctx: &mut Ctx) -> Vec<Grouped> {
    let mut out = Vec::new();
    let mut run: Vec<String> = Vec::new();
    let flush = |run: &mut Vec<String>, out: &mut Vec<Grouped>, ctx: &mut Ctx| match run.len() {
        0 => {}
        1 => out.push(Grouped::Item(Item::Photo(run.remove(0)))),
        n => {
            let albums = n.div_ceil(MAX_ALBUM);
            if albums > 1 {
                ctx.warn(
                        "album_split",
                        "message.attachments",
                        format!(
                            "{n} images in a row; a Telegram album holds at most {MAX_ALBUM}: sent as {albums} albums"
                        ),
                    );
            }
            let mut rest = std::mem::take(run);
            for k in 0..albums {
                let size = rest.len().div_ceil(albums - k);
                let tail = rest.split_off(size);
                out.push(Grouped::Album(std::mem::replace(&mut rest, tail)));
            }
        }
    };
    for item in items {
        match item {
            Item::Photo(u) => run.push(u),
            other => {
                flush(&mut run, &mut out, ctx);
                out.push(Grouped::Item(other));
            }
        }
    }
    flush(&mut run, &mut out, ctx);
    out
}

/// `sendMediaGroup` of photos; a caption goes on the first (Telegram shows it for the album).
fn album(urls: &[String], caption: Option<&Rich>) -> Call {
    let media: Vec<Value> = urls
        .iter()
        .enumerate()
        .map(|(k, u)| {
            let mut m = json!({"type": "photo", "media": u});
            if k == 0
                && let Some(c) = caption
            {
                m["caption"] = json!(c.to_html());
                m["parse_mode"] = json!("HTML");
            }
            m
        })
        .collect();
    Call::new("sendMediaGroup").with("media", Value::Array(media))
}

/// The media method and field for a file's content type.
fn media_method(content_type: &str) -> (&'static str, &'static str) {
    let ct = content_type.to_ascii_lowercase();
    // A photo is a raster image Telegram recompresses; an SVG is sent as the file it is.
    if ct == "image/svg+xml" {
        ("sendDocument", "document")
    } else if ct == "image/gif" {
        ("sendAnimation", "animation")
    } else if ct.starts_with("image/") {
        ("sendPhoto", "photo")
    } else if ct.starts_with("video/") {
        ("sendVideo", "video")
    } else if ct.starts_with("audio/") {
        ("sendAudio", "audio")
    } else {
        ("sendDocument", "document")
    }
}

fn attachment(a: &Attachment, path: &str, ctx: &mut Ctx) -> Result<Option<Item>, RenderError> {
    let calls = match &a.content {
        Some(AttachmentContent::Hero(c)) => hero(c, &format!("{path}.hero"), ctx)?,
        Some(AttachmentContent::Thumbnail(c)) => hero(c, &format!("{path}.thumbnail"), ctx)?,
        Some(AttachmentContent::Signin(c)) => {
            let p = format!("{path}.signin");
            let text = ctx.rich(c.text.as_deref().unwrap_or_default());
            card_calls(None, text, &c.buttons, &p, ctx)?
        }
        Some(AttachmentContent::Oauth(c)) => {
            let p = format!("{path}.oauth");
            let text = ctx.rich(c.text.as_deref().unwrap_or_default());
            card_calls(None, text, &c.buttons, &p, ctx)?
        }
        Some(AttachmentContent::Receipt(c)) => receipt(c, &format!("{path}.receipt"), ctx)?,
        Some(AttachmentContent::Animation(c)) => media_card(
            c,
            "sendAnimation",
            "animation",
            &format!("{path}.animation"),
            ctx,
        )?,
        Some(AttachmentContent::Audio(c)) => {
            media_card(c, "sendAudio", "audio", &format!("{path}.audio"), ctx)?
        }
        Some(AttachmentContent::Video(c)) => {
            media_card(c, "sendVideo", "video", &format!("{path}.video"), ctx)?
        }
        Some(AttachmentContent::Json(v))
            if a.content_type == crate::model::CONTENT_TYPE_ADAPTIVE =>
        {
            adaptive(v, &format!("{path}.content"), ctx)?
        }
        _ => {
            let Some(url) = a.content_url.as_deref().filter(|u| !u.is_empty()) else {
                ctx.warn(
                    "attachment_dropped",
                    path,
                    format!(
                        "Telegram cannot show `{}` content without a content_url: dropped",
                        crate::bounded::for_log(&a.content_type)
                    ),
                );
                return Ok(None);
            };
            // A file a person sent (`telegram-file:<file_id>`, as events carry it) goes back
            // by its file_id, which Telegram takes where it takes a URL.
            let url = url
                .strip_prefix(super::fetch::FILE_SCHEME)
                .filter(|id| !id.is_empty())
                .unwrap_or(url);
            let (method, field) = media_method(&a.content_type);
            return Ok(Some(if method == "sendPhoto" {
                Item::Photo(url.to_string())
            } else {
                Item::Media(method, field, url.to_string())
            }));
        }
    };
    Ok(Some(Item::Calls(calls)))
}

/// Bold title, italic subtitle and the text, one per line.
fn card_text(title: Option<&str>, subtitle: Option<&str>, body: Option<&str>, ctx: &Ctx) -> Rich {
    let mut out = Rich::default();
    let line = |r: Rich, out: &mut Rich| {
        let r = r.trimmed();
        if r.is_blank() {
            return;
        }
        if !out.runs.is_empty() {
            out.push("\n", &Style::default());
        }
        out.append(r);
    };
    for (t, bold, italic) in [(title, true, false), (subtitle, false, true)] {
        let Some(t) = t.map(|t| ctx.plain(t)).filter(|t| !t.is_empty()) else {
            continue;
        };
        let mut r = Rich::default();
        r.push(
            &t,
            &Style {
                bold,
                italic,
                ..Default::default()
            },
        );
        line(r, &mut out);
    }
    if let Some(b) = body {
        line(ctx.rich(b), &mut out);
    }
    out
}

fn hero(card: &HeroCard, path: &str, ctx: &mut Ctx) -> Result<Vec<Call>, RenderError> {
    let text = card_text(
        card.title.as_deref(),
        card.subtitle.as_deref(),
        card.text.as_deref(),
        ctx,
    );
    if card.images.len() > 1 {
        ctx.warn(
            "images_dropped",
            format!("{path}.images"),
            format!(
                "{} images; a Telegram message with buttons shows one: the first is kept",
                card.images.len()
            ),
        );
    }
    if card.tap.is_some() {
        ctx.warn(
            "tap_dropped",
            format!("{path}.tap"),
            "Telegram messages have no tap action: dropped (make it a button)",
        );
    }
    let image = card
        .images
        .first()
        .map(|i| i.url.as_str())
        .filter(|u| !u.is_empty());
    card_calls(image, text, &card.buttons, path, ctx)
}

/// A card: a photo with the text as its caption (or the text alone), its buttons as an inline
/// keyboard, `call` buttons as lines of text.
fn card_calls(
    image: Option<&str>,
    mut text: Rich,
    buttons: &[CardAction],
    path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Call>, RenderError> {
    let (keyboard, calls_text) = inline_keyboard(buttons, &format!("{path}.buttons"), ctx)?;
    for line in calls_text {
        if !text.runs.is_empty() {
            text.push("\n", &Style::default());
        }
        text.push(&line, &Style::default());
    }
    if let Some(url) = image {
        return media_call("sendPhoto", "photo", url, &text, keyboard, path, ctx);
    }
    if text.is_blank() {
        if keyboard.is_none() {
            ctx.warn(
                "card_empty",
                path,
                "the card has nothing Telegram can show: dropped",
            );
            return Ok(Vec::new());
        }
        // Telegram sends no message without text: the button labels stand in for it.
        let labels: Vec<String> = buttons
            .iter()
            .filter_map(|b| b.title.as_deref().map(|t| ctx.plain(t)))
            .filter(|t| !t.is_empty())
            .collect();
        ctx.warn(
            "card_text_missing",
            path,
            "a Telegram message needs a text: the card's button titles are its text",
        );
        text = Rich::plain(&labels.join(" · "));
        if text.is_blank() {
            text = Rich::plain("…");
        }
    }
    text_calls(&text, keyboard, path, ctx)
}

/// The buttons as `inline_keyboard` rows (one per row, or three per row when every label is
/// short), and the `call` buttons as lines of text ("title: number"): a url button takes only
/// http(s) and tg:// links, not `tel:`.
fn inline_keyboard(
    buttons: &[CardAction],
    path: &str,
    ctx: &mut Ctx,
) -> Result<(Option<Value>, Vec<String>), RenderError> {
    let mut keys = Vec::new();
    let mut calls = Vec::new();
    if buttons.len() > MAX_KEYBOARD_BUTTONS {
        ctx.warn(
            "buttons_dropped",
            path,
            format!(
                "{} buttons; a Telegram keyboard holds at most {MAX_KEYBOARD_BUTTONS}: the rest are dropped",
                buttons.len()
            ),
        );
    }
    for (k, b) in buttons.iter().take(MAX_KEYBOARD_BUTTONS).enumerate() {
        let p = format!("{path}[{k}]");
        let title = action_title(b, &p, ctx)?;
        if b.kind == ActionType::Call {
            let number = b
                .value_str()
                .map(|v| v.trim().trim_start_matches("tel:").trim())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    RenderError::invalid(format!("{p}.value"), "required: a phone number")
                })?;
            ctx.warn(
                "call_as_text",
                &p,
                "Telegram buttons cannot dial (a url button takes no tel: link): the number is in the text",
            );
            calls.push(format!("{title}: {number}"));
            continue;
        }
        if b.kind.takes_url() {
            let url = b
                .value_str()
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .ok_or_else(|| RenderError::invalid(format!("{p}.value"), "required: a URL"))?;
            if !html::linkable(url) {
                return Err(RenderError::invalid(
                    format!("{p}.value"),
                    "a Telegram url button opens only http(s) and tg:// links",
                ));
            }
            keys.push(json!({"text": title, "url": url}));
            continue;
        }
        keys.push(json!({"text": title, "callback_data": callback_data(b, &p)?}));
        if b.kind == ActionType::MessageBack && b.value.as_ref().is_some_and(|v| !v.is_null()) {
            for (set, field) in [(&b.text, "text"), (&b.display_text, "display_text")] {
                if set.as_deref().is_some_and(|t| !t.trim().is_empty()) {
                    ctx.warn(
                        "action_field_dropped",
                        format!("{p}.{field}"),
                        format!("a Telegram callback button sends the bot only its value: {field} is dropped"),
                    );
                }
            }
        }
    }
    Ok((keyboard_rows(keys, "inline_keyboard", None), calls))
}

/// `{KIND: rows}` (plus `extra` fields), one button per row or three when every label is
/// short; `None` without buttons.
fn keyboard_rows(keys: Vec<Value>, kind: &str, extra: Option<Value>) -> Option<Value> {
    if keys.is_empty() {
        return None;
    }
    let short = keys.iter().all(|k| {
        k["text"]
            .as_str()
            .is_some_and(|t| text::len(t, text::chars) <= SHORT_TITLE)
    });
    let per_row = if short { ROW_OF_SHORT } else { 1 };
    let rows: Vec<Value> = keys
        .chunks(per_row)
        .map(|r| Value::Array(r.to_vec()))
        .collect();
    let mut out = extra.unwrap_or_else(|| json!({}));
    out[kind] = Value::Array(rows);
    Some(out)
}

/// What a postBack-like button sends back, within 64 bytes. A longer value is refused rather
/// than kept server-side behind a short key: the gateway has no inbound side yet to resolve
/// the key when the button is pressed, so the key would reach the bot meaningless.
fn callback_data(b: &CardAction, path: &str) -> Result<String, RenderError> {
    let (data, field) = b.postback_value();
    let data = data.or_else(|| match b.kind {
        ActionType::MessageBack | ActionType::ImBack => b.text.clone().or_else(|| b.title.clone()),
        _ => None,
    });
    let field = format!("{path}.{field}");
    let data = data
        .filter(|d| !d.is_empty())
        .ok_or_else(|| RenderError::invalid(&field, "required: the data the button sends back"))?;
    if data.len() > MAX_CALLBACK_DATA {
        return Err(RenderError::invalid(
            field,
            format!(
                "is {} bytes; Telegram's callback_data holds at most {MAX_CALLBACK_DATA} bytes (send a short key and keep the rest in the bot)",
                data.len()
            ),
        ));
    }
    Ok(data)
}

/// A button's label: its title, else its display text, text or textual value, as plain text
/// of at most `MAX_BUTTON_TEXT` characters.
fn action_title(a: &CardAction, path: &str, ctx: &mut Ctx) -> Result<String, RenderError> {
    let (title, field) = a.label(|t| ctx.plain(t)).ok_or_else(|| {
        RenderError::invalid(
            format!("{path}.title"),
            "required: a Telegram button needs a label",
        )
    })?;
    Ok(match text::truncate(&title, MAX_BUTTON_TEXT, text::chars) {
        None => title,
        Some(short) => {
            ctx.warn(
                "title_truncated",
                format!("{path}.{field}"),
                format!(
                    "label is {} characters; at most {MAX_BUTTON_TEXT} are kept",
                    text::len(&title, text::chars)
                ),
            );
            short
        }
    })
}

/// Suggested actions as a one-time reply keyboard: a keyboard button sends its label as the
/// user's message, so only actions that send text back fit (URL and call actions are dropped).
fn reply_keyboard(sa: &SuggestedActions, ctx: &mut Ctx) -> Result<Option<Value>, RenderError> {
    let mut keys = Vec::new();
    let mut value_lost = false;
    if !sa.to.is_empty() {
        ctx.warn(
            "suggested_actions_to_ignored",
            "message.suggested_actions.to",
            "a Telegram reply keyboard shows to everyone in the chat: `to` cannot be honoured",
        );
    }
    for (i, a) in sa.actions.iter().enumerate() {
        let path = format!("message.suggested_actions.actions[{i}]");
        if a.kind.takes_url() || a.kind == ActionType::Call {
            ctx.warn(
                "suggested_action_dropped",
                &path,
                "a Telegram reply keyboard button only sends its label back: URL and call actions are dropped",
            );
            continue;
        }
        if keys.len() == MAX_KEYBOARD_BUTTONS {
            ctx.warn(
                "suggested_actions_dropped",
                "message.suggested_actions.actions",
                format!("a Telegram keyboard holds at most {MAX_KEYBOARD_BUTTONS} buttons: the rest are dropped"),
            );
            break;
        }
        let title = action_title(a, &path, ctx)?;
        let sent = match a.kind {
            ActionType::DialogAction => Some(a.dialog_action_value()),
            _ => a.value_str().map(str::to_string),
        };
        if sent.is_some_and(|v| v.trim() != title) {
            value_lost = true;
        }
        keys.push(json!({"text": title}));
    }
    if value_lost {
        ctx.warn(
            "suggested_action_value_not_sent",
            "message.suggested_actions.actions",
            "a Telegram reply keyboard button sends its label as the user's message: values that differ from their titles are not sent",
        );
    }
    Ok(keyboard_rows(
        keys,
        "keyboard",
        Some(json!({"one_time_keyboard": true, "resize_keyboard": true})),
    ))
}

// ---------------------------------------------------------------------------------------------
// Receipt, media and adaptive cards

/// Characters of one receipt table cell kept.
const MAX_CELL: usize = 40;
/// Receipt items shown; a receipt of more lists the first and says how many are left out.
const MAX_RECEIPT_ITEMS: usize = 100;

/// A receipt as text: the title in bold, then a monospaced table of facts, items (quantity and
/// price) and tax, VAT and total, the buttons as a keyboard.
fn receipt(card: &ReceiptCard, path: &str, ctx: &mut Ctx) -> Result<Vec<Call>, RenderError> {
    let cell = |s: &str| {
        let p = s.trim().replace('\n', " ");
        text::truncate(&p, MAX_CELL, text::chars).unwrap_or(p)
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for f in &card.facts {
        rows.push((cell(&ctx.plain(&f.key)), cell(&ctx.plain(&f.value))));
    }
    if !card.facts.is_empty() && !card.items.is_empty() {
        rows.push((String::new(), String::new()));
    }
    for it in card.items.iter().take(MAX_RECEIPT_ITEMS) {
        let mut name = ctx.plain(it.title.as_deref().unwrap_or_default());
        if let Some(q) = it
            .quantity
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
        {
            name = format!("{name} × {q}");
        }
        rows.push((cell(&name), cell(it.price.as_deref().unwrap_or_default())));
    }
    if card.items.len() > MAX_RECEIPT_ITEMS {
        rows.push((
            format!("… {} more items", card.items.len() - MAX_RECEIPT_ITEMS),
            String::new(),
        ));
    }
    let totals: Vec<(&str, &Option<String>)> = vec![
        ("Tax", &card.tax),
        ("VAT", &card.vat),
        ("Total", &card.total),
    ];
    if totals.iter().any(|(_, v)| v.is_some()) && !rows.is_empty() {
        rows.push((String::new(), String::new()));
    }
    for (label, v) in totals {
        if let Some(v) = v.as_deref().filter(|v| !v.trim().is_empty()) {
            rows.push((label.to_string(), cell(v)));
        }
    }
    if card.tap.is_some() || card.items.iter().any(|i| i.tap.is_some()) {
        ctx.warn(
            "tap_dropped",
            format!("{path}.tap"),
            "Telegram messages have no tap action: dropped (make it a button)",
        );
    }
    let mut text = card_text(card.title.as_deref(), None, None, ctx);
    let table = html::table(&rows);
    if !table.is_empty() {
        if !text.runs.is_empty() {
            text.push("\n", &Style::default());
        }
        text.push(
            &table,
            &Style {
                pre: Some(String::new()),
                ..Default::default()
            },
        );
    }
    card_calls(None, text, &card.buttons, path, ctx)
}

fn media_card(
    card: &MediaCard,
    method: &'static str,
    field: &'static str,
    path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Call>, RenderError> {
    let url = card
        .media
        .first()
        .map(|m| m.url.trim())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| RenderError::invalid(format!("{path}.media"), "required: a media URL"))?;
    if card.media.len() > 1 {
        ctx.warn(
            "media_dropped",
            format!("{path}.media"),
            format!(
                "{} media URLs; a Telegram message carries one: the first is sent",
                card.media.len()
            ),
        );
    }
    let mut text = card_text(
        card.title.as_deref(),
        card.subtitle.as_deref(),
        card.text.as_deref(),
        ctx,
    );
    let (keyboard, calls_text) = inline_keyboard(&card.buttons, &format!("{path}.buttons"), ctx)?;
    for line in calls_text {
        if !text.runs.is_empty() {
            text.push("\n", &Style::default());
        }
        text.push(&line, &Style::default());
    }
    media_call(method, field, url, &text, keyboard, path, ctx)
}

/// Adaptive cards elements walked for text.
const MAX_ADAPTIVE_ELEMENTS: usize = 500;
const MAX_ADAPTIVE_DEPTH: usize = 16;

#[derive(Default)]
struct Adaptive {
    text: Rich,
    /// The actions taken, with where each is in the card (for errors).
    actions: Vec<(CardAction, String)>,
    lost_actions: usize,
    lost_inputs: usize,
    lost_images: usize,
    seen: usize,
}

impl Adaptive {
    fn line(&mut self, r: Rich) {
        let r = r.trimmed();
        if r.is_blank() {
            return;
        }
        if !self.text.runs.is_empty() {
            self.text.push("\n", &Style::default());
        }
        self.text.append(r);
    }

    fn walk(&mut self, v: &Value, depth: usize, path: &str) {
        if depth > MAX_ADAPTIVE_DEPTH || self.seen >= MAX_ADAPTIVE_ELEMENTS {
            return;
        }
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.walk(item, depth + 1, &format!("{path}[{i}]"));
                }
            }
            Value::Object(o) => {
                self.seen += 1;
                let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default();
                match s("type") {
                    "TextBlock" => {
                        let mut r = html::from_markdown(s("text"));
                        if s("weight").eq_ignore_ascii_case("bolder") {
                            for run in &mut r.runs {
                                run.style.bold = !run.style.code && run.style.pre.is_none();
                            }
                        }
                        self.line(r);
                    }
                    "RichTextBlock" => {
                        self.line(Rich::plain(&crate::channels::adaptive::rich_text(o)))
                    }
                    "FactSet" => {
                        for (t, v) in crate::channels::adaptive::facts(o) {
                            let mut r = Rich::default();
                            r.push(
                                html::from_markdown(t).visible().trim(),
                                &Style {
                                    bold: true,
                                    ..Default::default()
                                },
                            );
                            r.push(": ", &Style::default());
                            r.append(html::from_markdown(v));
                            self.line(r);
                        }
                    }
                    "Image" => self.lost_images += 1,
                    "ImageSet" => {
                        self.lost_images += o
                            .get("images")
                            .and_then(Value::as_array)
                            .map_or(0, Vec::len)
                    }
                    t if t.starts_with("Input.") => self.lost_inputs += 1,
                    "Action.OpenUrl" => {
                        let title = Some(s("title")).filter(|t| !t.trim().is_empty());
                        self.actions.push((
                            CardAction {
                                kind: ActionType::OpenUrl,
                                title: Some(title.unwrap_or(s("url")).to_string()),
                                value: Some(json!(s("url"))),
                                ..Default::default()
                            },
                            path.to_string(),
                        ));
                    }
                    "Action.Submit" => {
                        let data = match o.get("data") {
                            Some(Value::String(d)) => d.clone(),
                            Some(Value::Null) | None => s("title").to_string(),
                            Some(other) => other.to_string(),
                        };
                        let title = Some(s("title")).filter(|t| !t.trim().is_empty());
                        self.actions.push((
                            CardAction {
                                kind: ActionType::PostBack,
                                title: Some(title.unwrap_or(&data).to_string()),
                                value: Some(json!(data)),
                                ..Default::default()
                            },
                            path.to_string(),
                        ));
                    }
                    t if t.starts_with("Action.") => self.lost_actions += 1,
                    _ => {}
                }
                for k in ["body", "items", "columns", "actions", "selectAction"] {
                    if let Some(child) = o.get(k) {
                        self.walk(child, depth + 1, &format!("{path}.{k}"));
                    }
                }
            }
            _ => {}
        }
    }
}

/// An adaptive card as text with a keyboard: text blocks, fact sets and rich text as text,
/// `Action.OpenUrl` as url buttons, `Action.Submit` as callback buttons (its data as JSON);
/// images, inputs and other actions are lost, which a warning says.
fn adaptive(card: &Value, path: &str, ctx: &mut Ctx) -> Result<Vec<Call>, RenderError> {
    let mut a = Adaptive::default();
    a.walk(card, 0, path);
    if a.text.is_blank()
        && let Some(f) = card.get("fallbackText").and_then(Value::as_str)
    {
        a.line(html::from_markdown(f));
    }
    let mut lost = Vec::new();
    for (n, what) in [
        (a.lost_images, "image"),
        (a.lost_inputs, "input"),
        (a.lost_actions, "action other than OpenUrl and Submit"),
    ] {
        match n {
            0 => {}
            1 => lost.push(format!("1 {what}")),
            n => lost.push(format!("{n} {what}s")),
        }
    }
    ctx.warn(
        "adaptive_card_as_text",
        path,
        if lost.is_empty() {
            "Telegram cannot show adaptive cards: sent its text, its OpenUrl and Submit actions as buttons".to_string()
        } else {
            format!(
                "Telegram cannot show adaptive cards: sent its text, its OpenUrl and Submit actions as buttons; lost: {}",
                lost.join(", ")
            )
        },
    );
    let mut actions = Vec::with_capacity(a.actions.len());
    for (action, at) in a.actions {
        let value = action.value_str().unwrap_or_default();
        match action.kind {
            ActionType::OpenUrl if !html::linkable(value) => {
                return Err(RenderError::invalid(
                    format!("{at}.url"),
                    "a Telegram url button opens only http(s) and tg:// links",
                ));
            }
            ActionType::PostBack if value.is_empty() || value.len() > MAX_CALLBACK_DATA => {
                return Err(RenderError::invalid(
                    format!("{at}.data"),
                    format!(
                        "is {} bytes; Telegram's callback_data holds 1 to {MAX_CALLBACK_DATA} bytes (send a short key and keep the rest in the bot)",
                        value.len()
                    ),
                ));
            }
            _ => actions.push(action),
        }
    }
    card_calls(None, a.text, &actions, path, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Conversation, Identity};

    fn msg(text: &str) -> Message {
        Message {
            address: Address {
                channel_id: "telegram".into(),
                bot: Some(Identity {
                    id: "helperbot".into(),
                    ..Default::default()
                }),
                user: Some(Identity {
                    id: "42".into(),
                    ..Default::default()
                }),
                conversation: Some(Conversation {
                    id: "42".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            text: Some(text.into()),
            ..Default::default()
        }
    }

    fn bodies(r: &Rendered) -> Vec<Value> {
        r.requests.iter().map(|q| q.body.value()).collect()
    }

    #[test]
    fn urls_hold_the_placeholder_and_scopes_follow_the_chat_kind() {
        let config = TelegramConfig::default();
        let r = render_send(&msg("hi"), None, &config).unwrap();
        let q = &r.requests[0];
        assert_eq!(q.url, "https://api.telegram.org/bot<token>/sendMessage");
        assert_eq!(q.credential, "helperbot");
        assert_eq!(q.rate.levels()[0].key.as_ref(), "telegram:helperbot:42");
        assert_eq!(q.rate.levels()[0].budgets.as_ref(), PRIVATE_CHAT_BUDGET);
        assert_eq!(q.rate.levels()[1].budgets.as_ref(), BOT_BUDGET);
        assert_eq!(
            q.body.value(),
            json!({"chat_id": 42, "text": "hi", "parse_mode": "HTML"})
        );
        let mut m = msg("hi");
        m.address.conversation.as_mut().unwrap().id = "@news_channel".into();
        let r = render_send(
            &m,
            None,
            &TelegramConfig {
                pacing: false,
                ..config
            },
        )
        .unwrap();
        assert_eq!(r.requests[0].body.value()["chat_id"], "@news_channel");
        assert!(
            r.requests[0]
                .rate
                .levels()
                .iter()
                .all(|l| l.budgets.is_empty())
        );
        assert_eq!(r.requests[0].rate.levels().len(), 2);
    }

    #[test]
    fn typing_is_paused_with_the_chat_but_not_paced_by_its_budget() {
        let mut m = msg("");
        m.kind = MessageType::Typing;
        m.address.conversation.as_mut().unwrap().id = "-100200".into();
        let r = render_send(&m, None, &TelegramConfig::default()).unwrap();
        let levels = r.requests[0].rate.levels();
        assert_eq!(levels[0].key.as_ref(), "telegram:helperbot:-100200");
        assert!(levels[0].budgets.is_empty());
        assert_eq!(levels[1].budgets.as_ref(), BOT_BUDGET);
        assert_eq!(
            r.requests[0].body.value(),
            json!({"chat_id": -100200, "action": "typing"})
        );
        let r = render_send(&msg("hi"), None, &TelegramConfig::default()).unwrap();
        assert_eq!(
            r.requests[0].rate.levels()[0].budgets.as_ref(),
            PRIVATE_CHAT_BUDGET
        );
    }

    #[test]
    fn bad_chat_and_thread_ids_are_named() {
        let mut m = msg("hi");
        m.address.conversation.as_mut().unwrap().id = "general chat".into();
        let e = render_send(&m, None, &TelegramConfig::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("message.address.conversation.id"),
            "{e}"
        );
        let mut m = msg("hi");
        m.address.thread_id = Some("1700000000.0001".into());
        let e = render_send(&m, None, &TelegramConfig::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("message.address.thread_id"),
            "{e}"
        );
    }

    #[test]
    fn callback_data_over_64_bytes_is_refused_by_field() {
        let mut m = msg("");
        m.attachments.push(Attachment {
            content_type: crate::model::CONTENT_TYPE_HERO.into(),
            content: Some(AttachmentContent::Hero(HeroCard {
                title: Some("t".into()),
                buttons: vec![CardAction {
                    kind: ActionType::PostBack,
                    title: Some("Go".into()),
                    // 22 three-byte characters: 22 characters, 66 bytes.
                    value: Some(json!("€".repeat(22))),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        });
        let e = render_send(&m, None, &TelegramConfig::default()).unwrap_err();
        assert_eq!(
            e,
            RenderError::invalid(
                "message.attachments[0].hero.buttons[0].value",
                "is 66 bytes; Telegram's callback_data holds at most 64 bytes (send a short key and keep the rest in the bot)"
            )
        );
    }

    #[test]
    fn long_text_parts_fit_and_keep_every_character() {
        let text = format!("**{}**", "word & <tag> ".repeat(2000).trim_end());
        let r = render_send(&msg(&text), None, &TelegramConfig::default()).unwrap();
        assert!(r.requests.len() > 1);
        let mut seen = String::new();
        for b in bodies(&r) {
            let h = b["text"].as_str().unwrap();
            assert!(h.starts_with("<b>") && h.ends_with("</b>"));
            let visible = html::visible_text(h).unwrap();
            assert!(text::len(&visible, text::utf16) <= MAX_TEXT);
            seen.push_str(&visible);
            seen.push(' ');
        }
        assert_eq!(seen.split_whitespace().count(), 6000);
        assert_eq!(r.warnings[0].code, "text_split");
    }

    #[test]
    fn eleven_images_are_two_balanced_albums() {
        let mut m = msg("caption");
        for k in 0..11 {
            m.attachments.push(Attachment {
                content_type: "image/png".into(),
                content_url: Some(format!("https://img.example/{k}.png")),
                ..Default::default()
            });
        }
        let r = render_send(&m, None, &TelegramConfig::default()).unwrap();
        let b = bodies(&r);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0]["media"].as_array().unwrap().len(), 6);
        assert_eq!(b[1]["media"].as_array().unwrap().len(), 5);
        assert_eq!(b[0]["media"][0]["caption"], "caption");
    }

    #[test]
    fn a_received_file_goes_back_by_its_file_id() {
        let mut m = msg("");
        m.attachments.push(Attachment {
            content_type: "application/pdf".into(),
            content_url: Some("telegram-file:BQACAgIAAxk".into()),
            content: Some(crate::model::AttachmentContent::Json(
                json!({"file_id": "BQACAgIAAxk"}),
            )),
            ..Default::default()
        });
        let r = render_send(&m, None, &TelegramConfig::default()).unwrap();
        let b = bodies(&r);
        assert_eq!(b.len(), 1);
        assert!(
            r.requests[0].url.ends_with("/sendDocument"),
            "{}",
            r.requests[0].url
        );
        assert_eq!(b[0]["document"], "BQACAgIAAxk");
    }

    #[test]
    fn source_event_refuses_the_chat_and_tokens() {
        for key in ["chat_id", "token", "method", "bot_token"] {
            let mut m = msg("hi");
            m.source_event
                .insert("telegram".into(), json!({ key: "x" }));
            let e = render_send(&m, None, &TelegramConfig::default()).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("message.source_event.telegram.{key}")),
                "{e}"
            );
            assert!(!e.to_string().contains("\"x\""));
        }
    }

    fn receipts(ids: &[&str]) -> Vec<crate::channels::NativeReceipt> {
        ids.iter()
            .map(|id| crate::channels::NativeReceipt {
                native_id: id.to_string(),
                conversation_id: "42".into(),
            })
            .collect()
    }

    fn methods(p: &crate::channels::update::Plan) -> Vec<&str> {
        p.rendered
            .requests
            .iter()
            .map(|q| q.url.rsplit('/').next().unwrap())
            .collect()
    }

    fn codes(w: &[Warning]) -> Vec<&str> {
        w.iter().map(|w| w.code.as_str()).collect()
    }

    #[test]
    fn an_edit_names_the_receipts_message_and_never_holds_a_token() {
        let config = TelegramConfig::default();
        let mut m = msg("**new** text");
        m.source_event.insert(
            "telegram".into(),
            json!({"link_preview_options": {"is_disabled": true}, "disable_notification": true}),
        );
        m.address.thread_id = Some("7".into());
        let p = render_update(&m, &receipts(&["17"]), &config).unwrap();
        assert_eq!(p.steps, [crate::channels::update::Step::Edit(0)]);
        let q = &p.rendered.requests[0];
        assert_eq!(
            q.url, "https://api.telegram.org/bot<token>/editMessageText",
            "the token is left to the client"
        );
        assert_eq!(q.credential, "helperbot");
        assert_eq!(q.rate.levels()[0].key.as_ref(), "telegram:helperbot:42");
        // What the send would show, on message 17; not the posting's thread or flags.
        assert_eq!(
            q.body.value(),
            json!({
                "chat_id": 42,
                "message_id": 17,
                "text": "<b>new</b> text",
                "parse_mode": "HTML",
                "link_preview_options": {"is_disabled": true},
            })
        );
        assert_eq!(q.rate.levels()[0].budgets.as_ref(), PRIVATE_CHAT_BUDGET);
        let d = render_delete(&m.address, &receipts(&["17", "18"]), &config).unwrap();
        assert_eq!(methods(&d), ["deleteMessage", "deleteMessage"]);
        // Paused with the chat and the bot, not paced by their message budgets.
        let levels = d.rendered.requests[0].rate.levels();
        assert_eq!(levels[0].key.as_ref(), "telegram:helperbot:42");
        assert!(levels.iter().all(|l| l.budgets.is_empty()));
        assert_eq!(
            d.rendered.requests[1].body.value(),
            json!({"chat_id": 42, "message_id": 18})
        );
        for q in p.rendered.requests.iter().chain(&d.rendered.requests) {
            assert!(q.url.contains("/bot<token>/"), "{}", q.url);
            assert_eq!(q.credential, "helperbot");
        }
        // A Render shows the requests against placeholders.
        let shown = crate::channels::update::placeholders(2, "42");
        let d = render_delete(&m.address, &shown, &config).unwrap();
        assert_eq!(
            d.rendered.requests[1].body.value(),
            json!({"chat_id": 42, "message_id": "{native_id_2}"})
        );
        // A receipt that names no Telegram message is refused, without echoing it.
        let e = render_delete(&m.address, &receipts(&["1700000000.0001"]), &config).unwrap_err();
        assert!(e.to_string().starts_with("message_id"), "{e}");
        assert!(!e.to_string().contains("1700000000"), "{e}");
    }

    #[test]
    fn an_inline_keyboard_is_kept_and_a_reply_keyboard_dropped_with_a_warning() {
        let config = TelegramConfig::default();
        let button = |title: &str| CardAction {
            kind: ActionType::PostBack,
            title: Some(title.into()),
            value: Some(json!(title)),
            ..Default::default()
        };
        let mut card = msg("");
        card.attachments.push(Attachment {
            content_type: crate::model::CONTENT_TYPE_HERO.into(),
            content: Some(AttachmentContent::Hero(HeroCard {
                title: Some("Order 7".into()),
                buttons: vec![button("Cancel")],
                ..Default::default()
            })),
            ..Default::default()
        });
        let p = render_update(&card, &receipts(&["5"]), &config).unwrap();
        let body = p.rendered.requests[0].body.value();
        assert_eq!(methods(&p), ["editMessageText"]);
        assert_eq!(
            body["reply_markup"],
            json!({"inline_keyboard": [[{"text": "Cancel", "callback_data": "Cancel"}]]})
        );
        assert!(!codes(&p.rendered.warnings).contains(&"reply_keyboard_dropped"));

        let mut m = msg("pick one");
        m.suggested_actions = Some(SuggestedActions {
            actions: vec![button("Yes"), button("No")],
            ..Default::default()
        });
        let sent = render_send(&m, None, &config).unwrap();
        assert!(sent.requests[0].body.value()["reply_markup"]["keyboard"].is_array());
        let p = render_update(&m, &receipts(&["5"]), &config).unwrap();
        let body = p.rendered.requests[0].body.value();
        assert_eq!(body["text"], "pick one");
        assert!(body.get("reply_markup").is_none(), "{body}");
        assert_eq!(codes(&p.rendered.warnings), ["reply_keyboard_dropped"]);
        assert_eq!(p.rendered.warnings[0].field, "message.suggested_actions");
        // The send's own warnings stay, the plan's come after.
        let p = render_update(&m, &receipts(&["5", "6"]), &config).unwrap();
        assert_eq!(
            codes(&p.rendered.warnings),
            ["update_deletes", "reply_keyboard_dropped"]
        );
    }

    #[test]
    fn media_is_edited_with_its_caption_and_an_album_is_sent_again() {
        let config = TelegramConfig::default();
        let mut m = msg("a caption");
        m.attachments.push(Attachment {
            content_type: "video/mp4".into(),
            content_url: Some("https://cdn.example/v.mp4".into()),
            ..Default::default()
        });
        let p = render_update(&m, &receipts(&["9"]), &config).unwrap();
        assert_eq!(methods(&p), ["editMessageMedia"]);
        assert_eq!(
            p.rendered.requests[0].body.value(),
            json!({
                "chat_id": 42,
                "message_id": 9,
                "media": {
                    "type": "video",
                    "media": "https://cdn.example/v.mp4",
                    "caption": "a caption",
                    "parse_mode": "HTML",
                },
            })
        );
        let mut album = msg("two");
        for k in 0..2 {
            album.attachments.push(Attachment {
                content_type: "image/png".into(),
                content_url: Some(format!("https://img.example/{k}.png")),
                ..Default::default()
            });
        }
        let p = render_update(&album, &receipts(&["9"]), &config).unwrap();
        assert_eq!(methods(&p), ["deleteMessage", "sendMediaGroup"]);
        use crate::channels::update::Step;
        assert_eq!(p.steps, [Step::Delete(0), Step::Send]);
        assert_eq!(codes(&p.rendered.warnings), ["update_replaces"]);
    }

    #[test]
    fn an_update_must_be_a_message_with_something_to_show() {
        let config = TelegramConfig::default();
        let e = render_update(&msg("   "), &receipts(&["1"]), &config).unwrap_err();
        assert!(e.to_string().contains("DeleteMessage"), "{e}");
        let mut typing = msg("");
        typing.kind = MessageType::Typing;
        let e = render_update(&typing, &receipts(&["1"]), &config).unwrap_err();
        assert!(e.to_string().starts_with("message.type"), "{e}");
    }

    #[test]
    fn capabilities_are_honest() {
        let c = capabilities("telegram");
        assert!(c.typing && c.carousel && c.proactive && c.update_delete);
        assert_eq!(c.typing_interval, Duration::from_secs(4));
        assert_eq!(c.max_text_length, 4096);
        assert_eq!(c.implementation, "telegram");
    }
}
