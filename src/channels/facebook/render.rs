//! Pure translation of the model into Messenger Send API requests.
//!
//! Owns the Send API JSON (`recipient`, `messaging_type`, `message`, `sender_action`), the
//! mapping of cards and actions to Messenger's templates, buttons and quick replies, and fitting
//! a message to Messenger's documented limits (each adaptation reported as a warning). No I/O:
//! URLs never carry the page token; the client attaches it, looked up by the page id in
//! `NativeRequest::credential`.
//!
//! One model message may become several requests, in delivery order: its text (split at 2000),
//! then each attachment in order (media, templates, carousels of at most 10, and the buttons a
//! card could not hold, in button templates right after it). Quick replies ride on the last one.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::config::{FacebookConfig, SendEndpoint};
use super::money::{self, Decimal};
use super::text;
use crate::channels::{
    Body, Budget, Capabilities, HttpMethod, NativeRequest, RateScope, RateScopes, RenderError,
    Rendered,
};
use crate::model::{
    ActionType, Attachment, AttachmentContent, AttachmentLayout, CONTENT_TYPE_ADAPTIVE, CardAction,
    CardImage, HeroCard, MediaCard, Message, MessageType, ProactiveOptions, ReceiptCard, SendKind,
    SigninCard, SuggestedActions, TextFormat, Warning,
};

pub const CHANNEL: &str = "facebook";
/// Characters of one text message.
pub const MAX_TEXT: usize = 2000;
pub const MAX_QUICK_REPLIES: usize = 13;
/// Buttons on a generic template element or a button template.
pub const MAX_BUTTONS: usize = 3;
/// Elements of one generic template (a carousel).
pub const MAX_ELEMENTS: usize = 10;
/// Element title and subtitle.
pub const MAX_ELEMENT_TEXT: usize = 80;
/// Button and quick reply titles.
pub const MAX_BUTTON_TITLE: usize = 20;
/// Postback and quick reply payloads.
pub const MAX_PAYLOAD: usize = 1000;
pub const MAX_BUTTON_TEMPLATE_TEXT: usize = 640;
pub const MAX_RECEIPT_ELEMENTS: usize = 100;
/// Messenger shows a typing indicator for about 20 s or until the next message.
pub const TYPING_INTERVAL: Duration = Duration::from_secs(15);

/// What Messenger supports. Messenger has no end-of-conversation: those send nothing (with a
/// warning), and messages cannot be updated or deleted through the Send API.
pub fn capabilities(channel_id: &str) -> Capabilities {
    Capabilities {
        channel_id: channel_id.into(),
        implementation: CHANNEL.into(),
        typing: true,
        typing_interval: TYPING_INTERVAL,
        carousel: true,
        max_buttons_per_card: MAX_BUTTONS as u32,
        max_suggested_actions: MAX_QUICK_REPLIES as u32,
        max_text_length: MAX_TEXT as u32,
        markdown_flavor: "plain".into(),
        update_delete: false,
        proactive: true,
        max_payload_bytes: 0,
        proactive_note: "only to a person who messaged the page (address.user.id is the PSID); outside Messenger's 24-hour window set options.message_tag".into(),
    }
}

/// The requests for one message. `proactive` is set for SendProactive (outside a reply): the
/// requests then use `messaging_type` UPDATE, or MESSAGE_TAG with `options.message_tag`.
pub fn render_send(
    msg: &Message,
    proactive: Option<&ProactiveOptions>,
    config: &FacebookConfig,
) -> Result<Rendered, RenderError> {
    let addr = &msg.address;
    let page_id = addr.bot_id();
    if page_id.is_empty() {
        return Err(RenderError::invalid(
            "message.address.bot.id",
            "required: the id of the Facebook page the message is sent as",
        ));
    }
    let psid = addr.user_id();
    if psid.is_empty() {
        return Err(RenderError::invalid(
            "message.address.user.id",
            "required: the recipient's page-scoped id (PSID)",
        ));
    }
    if proactive.is_none() && addr.conversation_id().is_none() {
        return Err(RenderError::invalid(
            "message.address.conversation.id",
            "required: on Messenger it is the user's PSID; SendProactive starts one",
        ));
    }
    let url = send_url(config, page_id)?;
    let mut ctx = Ctx::new(config, msg.text_format);
    let bodies = match RenderError::send_kind(msg)? {
        SendKind::Typing => vec![(
            json!({"recipient": {"id": psid}, "sender_action": "typing_on"}),
            false,
        )],
        SendKind::EndOfConversation => {
            ctx.warn(
                "end_of_conversation_not_sent",
                "message.type",
                "Messenger has no end of conversation: nothing was sent",
            );
            Vec::new()
        }
        SendKind::Message | SendKind::Event => message_requests(msg, psid, proactive, &mut ctx)?,
    };
    // Send API: 300 calls per second per page for text, links, reactions and stickers, 10 for
    // audio or video ("Messenger Platform rate limits"; the defaults stay below), and "too many
    // messages to a single thread" may be limited, without a figure: the thread is the
    // narrowest scope, paced by the page's budget only.
    let thread: std::sync::Arc<str> = format!("{CHANNEL}:{page_id}/{psid}").into();
    let rate = |media: bool| {
        let page = if media {
            RateScope::configured(
                format!("{CHANNEL}:{page_id}:media"),
                Budget {
                    per_second: config.media_rate_per_second,
                    burst: config.media_rate_burst,
                },
            )
        } else {
            RateScope::configured(
                format!("{CHANNEL}:{page_id}"),
                Budget {
                    per_second: config.rate_per_second,
                    burst: config.rate_burst,
                },
            )
        };
        RateScopes(vec![RateScope::new(thread.clone(), &[]), page])
    };
    Ok(Rendered {
        requests: bodies
            .into_iter()
            .map(|(body, media)| {
                Ok(NativeRequest {
                    method: HttpMethod::Post,
                    url: url.clone(),
                    body: Body::json(&body)?,
                    credential: page_id.to_string(),
                    rate: rate(media),
                })
            })
            .collect::<Result<_, RenderError>>()?,
        warnings: ctx.warnings,
    })
}

/// Render of a proactive start: Messenger needs no conversation creation (the PSID is the
/// conversation), so each message is rendered as it will be sent, to `conversation.id = user.id`.
pub fn render_proactive(
    messages: &[Message],
    options: &ProactiveOptions,
    config: &FacebookConfig,
) -> Result<Rendered, RenderError> {
    let mut out = Rendered::default();
    for m in messages {
        let mut m = m.clone();
        let psid = m.address.user_id().to_string();
        let mut conv = m.address.conversation.take().unwrap_or_default();
        conv.id = psid;
        m.address.conversation = Some(conv);
        m.address.id = None;
        let r = render_send(&m, Some(options), config)?;
        out.requests.extend(r.requests);
        out.warnings.extend(r.warnings);
    }
    Ok(out)
}

fn send_url(config: &FacebookConfig, page_id: &str) -> Result<String, RenderError> {
    Ok(match config.endpoint {
        SendEndpoint::Me => format!("{}/me/messages", config.api_base()),
        SendEndpoint::Page => {
            if page_id == "." || page_id == ".." {
                return Err(RenderError::invalid(
                    "message.address.bot.id",
                    format!("`{page_id}` is not a page id"),
                ));
            }
            let segment: String = url::form_urlencoded::byte_serialize(page_id.as_bytes())
                .collect::<String>()
                .replace('+', "%20");
            format!("{}/{segment}/messages", config.api_base())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Context

struct Ctx<'a> {
    config: &'a FacebookConfig,
    format: Option<TextFormat>,
    warnings: Vec<Warning>,
}

impl<'a> Ctx<'a> {
    fn new(config: &'a FacebookConfig, format: Option<TextFormat>) -> Self {
        Self {
            config,
            format,
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, code: &str, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning::new(code, field, message));
    }

    /// Card and action text in the message's text format, as plain text.
    fn plain(&self, s: &str) -> String {
        match self.format {
            Some(TextFormat::Markdown) => text::markdown_to_plain(s),
            Some(TextFormat::Xml) => text::xml_to_plain(s),
            _ => s.to_string(),
        }
        .trim()
        .to_string()
    }

    /// `s` within `max`, truncated with an ellipsis and a warning when it is longer.
    fn fit(&mut self, s: &str, max: usize, code: &str, field: &str, what: &str) -> String {
        match text::truncate(s, max) {
            None => s.to_string(),
            Some(short) => {
                self.warn(
                    code,
                    field,
                    format!(
                        "{what} is {} characters; Messenger shows at most {max}: truncated to \"{short}\"",
                        text::len16(s)
                    ),
                );
                short
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parts: the `message` objects of a send, in order

#[derive(Debug, Clone)]
struct Part {
    message: Map<String, Value>,
    /// Audio and video count against the page's lower media quota.
    media: bool,
}

impl Part {
    fn text(s: impl Into<String>) -> Self {
        Self::native_text(Value::String(s.into()))
    }

    /// A text as the bot gave it in its native extra (sent as is, not split).
    fn native_text(text: Value) -> Self {
        let mut message = Map::new();
        message.insert("text".into(), text);
        Self {
            message,
            media: false,
        }
    }

    fn attachment(attachment: Value) -> Self {
        let media = matches!(
            attachment.get("type").and_then(Value::as_str),
            Some("audio" | "video")
        );
        let mut message = Map::new();
        message.insert("attachment".into(), attachment);
        Self { message, media }
    }

    fn template(payload: Value) -> Self {
        Self::attachment(json!({"type": "template", "payload": payload}))
    }
}

/// The Send API bodies for a message or event, each with whether it is a media send.
fn message_requests(
    msg: &Message,
    psid: &str,
    proactive: Option<&ProactiveOptions>,
    ctx: &mut Ctx,
) -> Result<Vec<(Value, bool)>, RenderError> {
    let native = source_event(msg, ctx)?;
    let (mut message_keys, mut request_keys) = match &native {
        Some((obj, _)) => split_native(obj),
        None => (Map::new(), Map::new()),
    };
    let path = native.as_ref().map(|(_, p)| p.as_str()).unwrap_or_default();
    // Native content replaces what the gateway would generate for it, which is then not
    // rendered at all (a card Messenger could not take must not fail a native override).
    let native_text = message_keys.remove("text");
    let native_attachment = message_keys
        .remove("attachment")
        .or_else(|| message_keys.remove("attachments"));
    let mut parts = Vec::new();
    if msg.kind == MessageType::Message {
        match native_text {
            Some(text) => {
                if msg.text.as_deref().is_some_and(|t| !t.trim().is_empty()) {
                    ctx.warn(
                        "text_replaced",
                        "message.text",
                        format!("{path}.text replaces the message text"),
                    );
                }
                parts.push(Part::native_text(text));
            }
            None => parts.extend(text_parts(msg, ctx)),
        }
        match native_attachment {
            Some(att) => {
                let n = msg.attachments.len();
                if n > 0 {
                    ctx.warn(
                        "attachments_replaced",
                        "message.attachments",
                        format!(
                            "{path}.attachment replaces the message's {n} attachment{}",
                            plural(n)
                        ),
                    );
                }
                parts.push(Part::attachment(att));
            }
            None => parts.extend(attachment_parts(msg, ctx)?),
        }
    } else {
        if let Some(text) = native_text {
            parts.push(Part::native_text(text));
        }
        if let Some(att) = native_attachment {
            parts.push(Part::attachment(att));
        }
    }
    let quick_replies = match message_keys.remove("quick_replies") {
        Some(q) => Some(q),
        None => match &msg.suggested_actions {
            Some(sa) if !sa.actions.is_empty() => Some(Value::Array(quick_replies(sa, ctx)?)),
            _ => None,
        },
    };
    let metadata = message_keys.remove("metadata");
    if !message_keys.is_empty() {
        // Other native message fields (a sticker, say): on the last message, or on their own.
        match parts.last_mut() {
            Some(last) => last.message.extend(message_keys),
            None => parts.push(Part {
                message: message_keys,
                media: false,
            }),
        }
    }
    if let Some(action) = request_keys.remove("sender_action") {
        if !parts.is_empty() {
            return Err(RenderError::invalid(
                format!("{path}.sender_action"),
                "Messenger refuses a sender action in the same request as a message: send it in a message of its own",
            ));
        }
        let recipient = request_keys
            .remove("recipient")
            .unwrap_or_else(|| json!({"id": psid}));
        return Ok(vec![(
            json!({"recipient": recipient, "sender_action": action}),
            false,
        )]);
    }
    if let Some(q) = quick_replies.filter(|q| q.as_array().is_none_or(|a| !a.is_empty())) {
        match parts.last_mut() {
            Some(last) => {
                last.message.insert("quick_replies".into(), q);
            }
            None => {
                return Err(RenderError::invalid(
                    "message.text",
                    "required: Messenger shows quick replies only with a text or an attachment",
                ));
            }
        }
    }
    if parts.is_empty() {
        let (code, what) = match msg.kind {
            MessageType::Event => (
                "event_not_sent",
                "Messenger has no events: nothing was sent (source_event.facebook can give one content)",
            ),
            _ => (
                "nothing_to_send",
                "the message has nothing Messenger can show: nothing was sent",
            ),
        };
        ctx.warn(code, "message", what);
        return Ok(Vec::new());
    }
    let (messaging_type, tag) = match proactive {
        None => ("RESPONSE", None),
        Some(o) => match o.message_tag.as_deref().filter(|t| !t.is_empty()) {
            Some(tag) => ("MESSAGE_TAG", Some(tag)),
            None => ("UPDATE", None),
        },
    };
    let native_tag = request_keys.contains_key("tag");
    let native_type = request_keys.contains_key("messaging_type");
    Ok(parts
        .into_iter()
        .map(|mut part| {
            if let Some(m) = &metadata {
                part.message.insert("metadata".into(), m.clone());
            }
            let mut body = Map::new();
            body.insert("recipient".into(), json!({"id": psid}));
            body.insert("messaging_type".into(), json!(messaging_type));
            if let Some(t) = tag {
                body.insert("tag".into(), json!(t));
            }
            body.insert("message".into(), Value::Object(part.message));
            for (k, v) in &request_keys {
                body.insert(k.clone(), v.clone());
            }
            if native_tag && !native_type {
                body.insert("messaging_type".into(), json!("MESSAGE_TAG"));
            }
            if native_type
                && !native_tag
                && body.get("messaging_type") != Some(&json!("MESSAGE_TAG"))
            {
                body.remove("tag");
            }
            (Value::Object(body), part.media)
        })
        .collect())
}

/// Keys of the Send API's `message` object; every other native key belongs to the request.
const MESSAGE_KEYS: &[&str] = &[
    "text",
    "attachment",
    "attachments",
    "quick_replies",
    "metadata",
    "sticker_id",
];

/// The native extra as (message keys, request keys). A nested `message` object counts as
/// message keys, so both `{attachment}` and `{message: {attachment}}` work.
fn split_native(obj: &Map<String, Value>) -> (Map<String, Value>, Map<String, Value>) {
    let mut message = Map::new();
    let mut request = Map::new();
    for (k, v) in obj {
        if k == "message" {
            if let Value::Object(m) = v {
                message.extend(m.clone());
            }
        } else if MESSAGE_KEYS.contains(&k.as_str()) {
            message.insert(k.clone(), v.clone());
        } else {
            request.insert(k.clone(), v.clone());
        }
    }
    (message, request)
}

/// The Send API request fields the shared `source_event["*"]` may set besides `message` and
/// the `MESSAGE_KEYS`. `source_event["*"]` is written for every channel (Teams reads it as
/// channelData), so anything else (`recipient` above all, or another channel's fields) is
/// left out with a warning; `source_event.facebook` passes every key through. Documented in
/// docs/channels/facebook.md.
pub const FALLBACK_REQUEST_KEYS: &[&str] = &[
    "messaging_type",
    "notification_type",
    "persona_id",
    "sender_action",
    "tag",
];

/// `obj` (from `source_event["*"]`) without the keys the fallback may not set, which a
/// warning names (`message.KEY` for those inside the nested message).
fn fallback_only(obj: &Map<String, Value>, ctx: &mut Ctx) -> Map<String, Value> {
    let mut kept = Map::new();
    let mut dropped: Vec<String> = Vec::new();
    for (k, v) in obj {
        if k == "message"
            && let Value::Object(m) = v
        {
            let mut inner = Map::new();
            for (mk, mv) in m {
                if MESSAGE_KEYS.contains(&mk.as_str()) {
                    inner.insert(mk.clone(), mv.clone());
                } else {
                    dropped.push(format!("message.{mk}"));
                }
            }
            kept.insert(k.clone(), Value::Object(inner));
        } else if MESSAGE_KEYS.contains(&k.as_str()) || FALLBACK_REQUEST_KEYS.contains(&k.as_str())
        {
            kept.insert(k.clone(), v.clone());
        } else {
            dropped.push(k.clone());
        }
    }
    if !dropped.is_empty() {
        let names: Vec<&str> = dropped.iter().map(String::as_str).collect();
        let allowed: Vec<&str> = FALLBACK_REQUEST_KEYS
            .iter()
            .chain(&["message"])
            .chain(MESSAGE_KEYS)
            .copied()
            .collect();
        ctx.warnings.push(crate::channels::fallback_keys_dropped(
            &names, "Send API", CHANNEL, &allowed,
        ));
    }
    kept
}

/// A native extra and the path it was found at (`message.source_event.facebook` or `.*`).
type Native = (Map<String, Value>, String);

/// `source_event.facebook` (or `*`, keeping what `fallback_only` allows) as an object, with
/// the path it was found at.
fn source_event(msg: &Message, ctx: &mut Ctx) -> Result<Option<Native>, RenderError> {
    let key = if msg.source_event.contains_key(CHANNEL) {
        CHANNEL
    } else {
        "*"
    };
    let Some(v) = msg.source_event.get(key) else {
        return Ok(None);
    };
    let path = format!("message.source_event.{key}");
    match v {
        Value::Object(o) => {
            if let Some(m) = o.get("message").filter(|m| !m.is_object()) {
                return Err(RenderError::invalid(
                    format!("{path}.message"),
                    format!("must be a JSON object (the Send API's message), not {m}"),
                ));
            }
            if key == "*" {
                return Ok(Some((fallback_only(o, ctx), path)));
            }
            Ok(Some((o.clone(), path)))
        }
        Value::Null => Ok(None),
        _ => Err(RenderError::invalid(
            path,
            "must be a JSON object of Send API fields (messaging_type, tag, attachment, ...)",
        )),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------------
// Text

fn text_parts(msg: &Message, ctx: &mut Ctx) -> Vec<Part> {
    let Some(raw) = msg.text.as_deref().filter(|t| !t.trim().is_empty()) else {
        return Vec::new();
    };
    let plain = ctx.plain(raw);
    if plain != raw.trim() {
        let what = match ctx.format {
            Some(TextFormat::Xml) => "xml",
            _ => "markdown",
        };
        ctx.warn(
            "text_format_converted",
            "message.text",
            format!(
                "Messenger shows plain text: the {what} was converted (emphasis markers removed, links as \"text (url)\")"
            ),
        );
    }
    let pieces = text::split(&plain, MAX_TEXT);
    if pieces.len() > 1 {
        ctx.warn(
            "text_split",
            "message.text",
            format!(
                "text is {} characters; Messenger shows at most {MAX_TEXT} per message: sent as {} messages, split at paragraph, sentence or word boundaries",
                text::len16(&plain),
                pieces.len()
            ),
        );
    }
    pieces.into_iter().map(Part::text).collect()
}

// ---------------------------------------------------------------------------------------------
// Attachments

/// A hero or thumbnail card: a generic template element and the button templates holding the
/// buttons it could not, or what it became instead (a title-only card is a text).
enum CardOut {
    Element { element: Value, overflow: Vec<Part> },
    Parts(Vec<Part>),
}

fn attachment_parts(msg: &Message, ctx: &mut Ctx) -> Result<Vec<Part>, RenderError> {
    let carousel = msg.attachment_layout == Some(AttachmentLayout::Carousel);
    let mut parts = Vec::new();
    // Consecutive cards of a carousel, waiting to be grouped.
    let mut run: Vec<(usize, Value, Vec<Part>)> = Vec::new();
    let mut split_runs = Vec::new();
    for (i, a) in msg.attachments.iter().enumerate() {
        let path = format!("message.attachments[{i}]");
        let card = match &a.content {
            Some(AttachmentContent::Hero(c)) => Some((c, format!("{path}.hero"))),
            Some(AttachmentContent::Thumbnail(c)) => Some((c, format!("{path}.thumbnail"))),
            _ => None,
        };
        if let Some((card, card_path)) = card {
            match hero_card(card, &card_path, ctx)? {
                CardOut::Element { element, overflow } if carousel => {
                    run.push((i, element, overflow));
                    continue;
                }
                CardOut::Element { element, overflow } => {
                    parts.push(generic(vec![element]));
                    parts.extend(overflow);
                    continue;
                }
                CardOut::Parts(p) => {
                    flush_run(&mut run, &mut parts, &mut split_runs);
                    parts.extend(p);
                    continue;
                }
            }
        }
        flush_run(&mut run, &mut parts, &mut split_runs);
        parts.extend(other_attachment(a, &path, ctx)?);
    }
    flush_run(&mut run, &mut parts, &mut split_runs);
    for (first, last, sizes) in split_runs {
        let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
        ctx.warn(
            "carousel_split",
            "message.attachments",
            format!(
                "attachments {first}-{last} are {} cards; a Messenger carousel holds at most {MAX_ELEMENTS}: sent as {} carousels ({}) in order",
                last - first + 1,
                sizes.len(),
                sizes.join(" + ")
            ),
        );
    }
    Ok(parts)
}

/// Sends a run of carousel cards: generic templates of at most 10 elements, each followed by
/// the button templates of its cards' extra buttons.
fn flush_run(
    run: &mut Vec<(usize, Value, Vec<Part>)>,
    parts: &mut Vec<Part>,
    split_runs: &mut Vec<(usize, usize, Vec<usize>)>,
) {
    if run.is_empty() {
        return;
    }
    if run.len() > MAX_ELEMENTS {
        let first = run[0].0;
        let last = run[run.len() - 1].0;
        let sizes = run.chunks(MAX_ELEMENTS).map(<[_]>::len).collect();
        split_runs.push((first, last, sizes));
    }
    let cards = std::mem::take(run);
    let mut it = cards.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<(usize, Value, Vec<Part>)> = it.by_ref().take(MAX_ELEMENTS).collect();
        let mut overflow = Vec::new();
        let mut elements = Vec::with_capacity(chunk.len());
        for (_, element, extra) in chunk {
            elements.push(element);
            overflow.extend(extra);
        }
        parts.push(generic(elements));
        parts.extend(overflow);
    }
}

fn generic(elements: Vec<Value>) -> Part {
    Part::template(json!({"template_type": "generic", "elements": elements}))
}

/// Everything but hero and thumbnail cards.
fn other_attachment(a: &Attachment, path: &str, ctx: &mut Ctx) -> Result<Vec<Part>, RenderError> {
    match &a.content {
        Some(AttachmentContent::Hero(_) | AttachmentContent::Thumbnail(_)) => Ok(Vec::new()),
        Some(AttachmentContent::Receipt(card)) => receipt(card, &format!("{path}.receipt"), ctx),
        Some(AttachmentContent::Signin(card)) => signin(card, &format!("{path}.signin"), ctx),
        Some(AttachmentContent::Oauth(card)) => {
            let p = format!("{path}.oauth");
            ctx.warn(
                "oauth_as_signin",
                &p,
                "Messenger has no OAuth card: sent as a button template with its sign-in buttons",
            );
            let as_signin = SigninCard {
                text: card.text.clone(),
                buttons: card.buttons.clone(),
            };
            signin(&as_signin, &p, ctx)
        }
        Some(AttachmentContent::Animation(card)) => {
            media_card(card, "animation", &format!("{path}.animation"), ctx)
        }
        Some(AttachmentContent::Audio(card)) => {
            media_card(card, "audio", &format!("{path}.audio"), ctx)
        }
        Some(AttachmentContent::Video(card)) => {
            media_card(card, "video", &format!("{path}.video"), ctx)
        }
        Some(AttachmentContent::Json(v)) if a.content_type == CONTENT_TYPE_ADAPTIVE => {
            Ok(adaptive(v, path, ctx))
        }
        Some(AttachmentContent::Json(_)) | None => match a.content_url.as_deref() {
            Some(url) => Ok(vec![media_by_url(&a.content_type, url, ctx)]),
            None => {
                ctx.warn(
                    "attachment_not_supported",
                    path,
                    format!(
                        "Messenger cannot show `{}` content without a content_url: not sent",
                        a.content_type
                    ),
                );
                Ok(Vec::new())
            }
        },
    }
}

/// A file by URL: image, video, audio or file by its media type.
fn media_by_url(content_type: &str, url: &str, ctx: &Ctx) -> Part {
    let kind = match content_type.split('/').next().unwrap_or_default() {
        "image" => "image",
        "video" => "video",
        "audio" => "audio",
        _ => "file",
    };
    media_attachment(kind, url, ctx)
}

fn media_attachment(kind: &str, url: &str, ctx: &Ctx) -> Part {
    Part::attachment(json!({
        "type": kind,
        "payload": {"url": url, "is_reusable": ctx.config.is_reusable},
    }))
}

/// Title, subtitle and text of a card as plain text, the non-empty ones with their fields.
fn card_texts(fields: &[(Option<&String>, &str)], path: &str, ctx: &Ctx) -> Vec<(String, String)> {
    fields
        .iter()
        .filter_map(|(s, f)| {
            let plain = ctx.plain(s.map(String::as_str).unwrap_or_default());
            (!plain.is_empty()).then(|| (plain, format!("{path}.{f}")))
        })
        .collect()
}

/// A hero or thumbnail card as a generic template element. Messenger needs a title: a card
/// without one takes its subtitle or text as title. Subtitle and text share the subtitle line.
fn hero_card(card: &HeroCard, path: &str, ctx: &mut Ctx) -> Result<CardOut, RenderError> {
    let mut texts = card_texts(
        &[
            (card.title.as_ref(), "title"),
            (card.subtitle.as_ref(), "subtitle"),
            (card.text.as_ref(), "text"),
        ],
        path,
        ctx,
    );
    if texts.is_empty()
        && let Some(alt) = card.images.first().and_then(|i| i.alt.as_ref())
    {
        texts = card_texts(&[(Some(alt), "images[0].alt")], path, ctx);
    }
    if texts.is_empty() {
        if !card.images.is_empty() && card.buttons.is_empty() && card.tap.is_none() {
            ctx.warn(
                "card_as_image",
                path,
                "a card with only images is sent as the images (Messenger cards need a title)",
            );
            for (j, _) in card
                .images
                .iter()
                .enumerate()
                .filter(|(_, i)| i.tap.is_some())
            {
                ctx.warn(
                    "tap_dropped",
                    format!("{path}.images[{j}].tap"),
                    "an image sent on its own cannot be tapped on Messenger: this tap is dropped",
                );
            }
            return Ok(CardOut::Parts(
                card.images
                    .iter()
                    .map(|i| media_attachment("image", &i.url, ctx))
                    .collect(),
            ));
        }
        return Err(RenderError::invalid(
            format!("{path}.title"),
            "required: Messenger cards need a title (or a subtitle or text)",
        ));
    }
    let (title, title_field) = texts.remove(0);
    let subtitle = texts
        .iter()
        .map(|(s, _)| s.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let subtitle_field = texts.first().map(|(_, f)| f.clone()).unwrap_or_default();
    if card.images.len() > 1 {
        ctx.warn(
            "images_dropped",
            format!("{path}.images"),
            format!(
                "{} images; a Messenger card shows one: kept the first",
                card.images.len()
            ),
        );
    }
    let image_url = card.images.first().map(|i| i.url.clone());
    // One element has one default action: the card's tap, else its first image's. The taps of
    // the images dropped above go with them.
    if card.tap.is_some() && card.images.first().is_some_and(|i| i.tap.is_some()) {
        ctx.warn(
            "tap_dropped",
            format!("{path}.images[0].tap"),
            "a Messenger card has one tap target and the card's own tap takes it: this tap is dropped",
        );
    }
    let tap = card
        .tap
        .as_ref()
        .map(|t| (t, format!("{path}.tap")))
        .or_else(|| {
            card.images
                .first()
                .and_then(|i| i.tap.as_ref())
                .map(|t| (t, format!("{path}.images[0].tap")))
        });
    let default_action = match tap {
        Some((t, field)) => default_action(t, &field, ctx),
        None => None,
    };
    let (shown, extra) = card.buttons.split_at(card.buttons.len().min(MAX_BUTTONS));
    if subtitle.is_empty() && image_url.is_none() && default_action.is_none() && shown.is_empty() {
        ctx.warn(
            "card_as_text",
            path,
            "a card with only a title is sent as text (a Messenger card needs more than a title)",
        );
        return Ok(CardOut::Parts(
            text::split(&title, MAX_TEXT)
                .into_iter()
                .map(Part::text)
                .collect(),
        ));
    }
    let mut element = Map::new();
    element.insert(
        "title".into(),
        json!(ctx.fit(
            &title,
            MAX_ELEMENT_TEXT,
            "title_truncated",
            &title_field,
            "card title"
        )),
    );
    if !subtitle.is_empty() {
        element.insert(
            "subtitle".into(),
            json!(ctx.fit(
                &subtitle,
                MAX_ELEMENT_TEXT,
                "text_truncated",
                &subtitle_field,
                "card subtitle and text"
            )),
        );
    }
    if let Some(url) = image_url {
        element.insert("image_url".into(), json!(url));
    }
    if let Some(d) = default_action {
        element.insert("default_action".into(), d);
    }
    if !shown.is_empty() {
        element.insert(
            "buttons".into(),
            Value::Array(buttons(shown, &format!("{path}.buttons"), 0, ctx)?),
        );
    }
    let overflow = overflow_buttons(extra, card.buttons.len(), &title, path, ctx)?;
    Ok(CardOut::Element {
        element: Value::Object(element),
        overflow,
    })
}

/// The buttons past the first three of a card, in button templates (three each) whose text is
/// the card's title, so that none is dropped.
fn overflow_buttons(
    extra: &[CardAction],
    total: usize,
    title: &str,
    path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Part>, RenderError> {
    if extra.is_empty() {
        return Ok(Vec::new());
    }
    let first = total - extra.len();
    let templates = extra.len().div_ceil(MAX_BUTTONS);
    let moved = if extra.len() == 1 {
        format!("button {} continues", first + 1)
    } else {
        format!("buttons {}-{total} continue", first + 1)
    };
    ctx.warn(
        "buttons_split",
        format!("{path}.buttons"),
        format!(
            "{total} buttons; Messenger shows at most {MAX_BUTTONS} per card: {moved} in {templates} button template{} right after it",
            plural(templates)
        ),
    );
    button_templates(title, extra, &format!("{path}.buttons"), first, path, ctx)
}

/// Button templates (1-3 buttons each) with `text` above the buttons.
fn button_templates(
    text_above: &str,
    actions: &[CardAction],
    buttons_path: &str,
    first_index: usize,
    text_path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Part>, RenderError> {
    let text_above = ctx.fit(
        text_above,
        MAX_BUTTON_TEMPLATE_TEXT,
        "text_truncated",
        text_path,
        "button template text",
    );
    let mut out = Vec::new();
    for (k, chunk) in actions.chunks(MAX_BUTTONS).enumerate() {
        let b = buttons(chunk, buttons_path, first_index + k * MAX_BUTTONS, ctx)?;
        out.push(Part::template(json!({
            "template_type": "button",
            "text": text_above,
            "buttons": b,
        })));
    }
    Ok(out)
}

/// A sign-in card: a button template with the sign-in link as a web_url button.
fn signin(card: &SigninCard, path: &str, ctx: &mut Ctx) -> Result<Vec<Part>, RenderError> {
    if card.buttons.is_empty() {
        return Err(RenderError::invalid(
            format!("{path}.buttons"),
            "a sign-in card needs at least one button",
        ));
    }
    let texts = card_texts(&[(card.text.as_ref(), "text")], path, ctx);
    let (text_above, text_path) = match texts.into_iter().next() {
        Some(t) => t,
        None => {
            let title = card.buttons.iter().find_map(|b| b.title.as_deref());
            match title.map(|t| ctx.plain(t)).filter(|t| !t.is_empty()) {
                Some(t) => (t, format!("{path}.buttons[0].title")),
                None => {
                    return Err(RenderError::invalid(
                        format!("{path}.text"),
                        "required: a Messenger button template needs a text (or a button title)",
                    ));
                }
            }
        }
    };
    if card.buttons.len() > MAX_BUTTONS {
        let templates = card.buttons.len().div_ceil(MAX_BUTTONS);
        ctx.warn(
            "buttons_split",
            format!("{path}.buttons"),
            format!(
                "{} buttons; a Messenger button template holds at most {MAX_BUTTONS}: sent as {templates} button templates",
                card.buttons.len()
            ),
        );
    }
    button_templates(
        &text_above,
        &card.buttons,
        &format!("{path}.buttons"),
        0,
        &text_path,
        ctx,
    )
}

/// Audio, video and animation cards: the media as an attachment, then a generic element for the
/// card's title, thumbnail and buttons (when it has any).
fn media_card(
    card: &MediaCard,
    variant: &str,
    path: &str,
    ctx: &mut Ctx,
) -> Result<Vec<Part>, RenderError> {
    let url = card
        .media
        .first()
        .map(|m| m.url.as_str())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            RenderError::invalid(
                format!("{path}.media"),
                "at least one media URL is required",
            )
        })?;
    let kind = match variant {
        "audio" => "audio",
        "video" => "video",
        _ => {
            let lower = url
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if [".mp4", ".webm", ".mov", ".m4v"]
                .iter()
                .any(|e| lower.ends_with(e))
            {
                "video"
            } else {
                "image"
            }
        }
    };
    if card.media.len() > 1 {
        ctx.warn(
            "media_dropped",
            format!("{path}.media"),
            format!(
                "{} media URLs; a Messenger attachment plays one: kept the first",
                card.media.len()
            ),
        );
    }
    let mut parts = vec![media_attachment(kind, url, ctx)];
    let has_text = [&card.title, &card.subtitle, &card.text]
        .iter()
        .any(|t| t.as_deref().is_some_and(|t| !ctx.plain(t).is_empty()));
    if !has_text && card.buttons.is_empty() {
        return Ok(parts);
    }
    let as_hero = HeroCard {
        title: card.title.clone(),
        subtitle: card.subtitle.clone(),
        text: card.text.clone(),
        images: card
            .image
            .iter()
            .map(|i| CardImage {
                url: i.url.clone(),
                alt: None,
                tap: None,
            })
            .collect(),
        buttons: card.buttons.clone(),
        tap: None,
    };
    match hero_card(&as_hero, path, ctx)? {
        CardOut::Element { element, overflow } => {
            parts.push(generic(vec![element]));
            parts.extend(overflow);
        }
        CardOut::Parts(p) => parts.extend(p),
    }
    Ok(parts)
}

/// An adaptive card as the text of its text blocks and facts.
fn adaptive(card: &Value, path: &str, ctx: &mut Ctx) -> Vec<Part> {
    let mut lines = Vec::new();
    if let Some(body) = card.get("body") {
        adaptive_text(body, &mut lines);
    }
    if lines.is_empty()
        && let Some(f) = card.get("fallbackText").and_then(Value::as_str)
    {
        lines.push(f.to_string());
    }
    let actions = card
        .get("actions")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let dropped = match actions {
        0 => String::new(),
        1 => "; its action is not shown".to_string(),
        n => format!("; its {n} actions are not shown"),
    };
    let text_all = lines.join("\n");
    if text_all.trim().is_empty() {
        ctx.warn(
            "adaptive_card_not_sent",
            path,
            format!(
                "Messenger cannot show adaptive cards and this one has no text{dropped}: not sent"
            ),
        );
        return Vec::new();
    }
    ctx.warn(
        "adaptive_card_as_text",
        path,
        format!("Messenger cannot show adaptive cards: sent the text of its text blocks{dropped}"),
    );
    text::split(&text_all, MAX_TEXT)
        .into_iter()
        .map(Part::text)
        .collect()
}

fn adaptive_text(v: &Value, lines: &mut Vec<String>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| adaptive_text(i, lines)),
        Value::Object(o) => {
            match o.get("type").and_then(Value::as_str) {
                Some("TextBlock") => {
                    if let Some(t) = o.get("text").and_then(Value::as_str) {
                        lines.push(text::markdown_to_plain(t).trim().to_string());
                    }
                }
                Some("RichTextBlock") => lines.push(crate::channels::adaptive::rich_text(o)),
                Some("FactSet") => {
                    // Fact titles and values take markdown, as text blocks do.
                    for (t, v) in crate::channels::adaptive::facts(o) {
                        lines.push(format!(
                            "{}: {}",
                            text::markdown_to_plain(t).trim(),
                            text::markdown_to_plain(v).trim()
                        ));
                    }
                }
                _ => {}
            }
            for k in ["items", "columns", "body"] {
                if let Some(child) = o.get(k) {
                    adaptive_text(child, lines);
                }
            }
        }
        _ => {}
    }
    lines.retain(|l| !l.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Receipt

/// A receipt card as Messenger's receipt template, or, when the card cannot fill the template's
/// required fields, as a generic card (with a warning saying why). Receipt templates have no
/// buttons: the card's buttons follow in a button template.
fn receipt(card: &ReceiptCard, path: &str, ctx: &mut Ctx) -> Result<Vec<Part>, RenderError> {
    match receipt_template(card, path, ctx) {
        Ok((payload, notes)) => {
            ctx.warnings.extend(notes);
            let mut parts = vec![Part::template(payload)];
            if !card.buttons.is_empty() {
                let title = card
                    .title
                    .as_deref()
                    .map(|t| ctx.plain(t))
                    .unwrap_or_default();
                ctx.warn(
                    "buttons_split",
                    format!("{path}.buttons"),
                    match card.buttons.len() {
                        1 => "Messenger receipts have no buttons: its button follows in a button template right after it".to_string(),
                        n => format!("Messenger receipts have no buttons: its {n} buttons follow in button templates right after it"),
                    },
                );
                parts.extend(button_templates(
                    &title,
                    &card.buttons,
                    &format!("{path}.buttons"),
                    0,
                    &format!("{path}.title"),
                    ctx,
                )?);
            }
            Ok(parts)
        }
        Err(reason) => {
            ctx.warn(
                "receipt_as_generic",
                path,
                format!(
                    "sent as a generic card (title, facts and totals; items not shown) because {reason}"
                ),
            );
            let mut lines: Vec<String> = card
                .facts
                .iter()
                .map(|f| format!("{}: {}", f.key, f.value))
                .collect();
            for (label, v) in [
                ("Tax", &card.tax),
                ("VAT", &card.vat),
                ("Total", &card.total),
            ] {
                if let Some(v) = v {
                    lines.push(format!("{label}: {v}"));
                }
            }
            let as_hero = HeroCard {
                title: card.title.clone(),
                subtitle: Some(lines.join("\n")).filter(|s| !s.is_empty()),
                text: None,
                images: card
                    .items
                    .iter()
                    .find_map(|i| i.image.clone())
                    .into_iter()
                    .collect(),
                buttons: card.buttons.clone(),
                tap: card.tap.clone(),
            };
            Ok(match hero_card(&as_hero, path, ctx)? {
                CardOut::Element { element, overflow } => {
                    let mut p = vec![generic(vec![element])];
                    p.extend(overflow);
                    p
                }
                CardOut::Parts(p) => p,
            })
        }
    }
}

/// Fact keys compared without case, spaces or punctuation ("Order No." is `orderno`).
fn fact_key(k: &str) -> String {
    k.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FactRole {
    OrderNumber,
    PaymentMethod,
    Merchant,
    Subtotal,
    Shipping,
    Other,
}

fn fact_role(key: &str) -> FactRole {
    match fact_key(key).as_str() {
        "ordernumber" | "orderno" | "ordernr" | "orderid" | "order" => FactRole::OrderNumber,
        "paymentmethod" | "payment" | "paidwith" | "paymenttype" => FactRole::PaymentMethod,
        "merchant" | "merchantname" | "seller" | "store" => FactRole::Merchant,
        "subtotal" => FactRole::Subtotal,
        "shipping" | "shippingcost" | "shippingfee" | "delivery" | "deliveryfee" => {
            FactRole::Shipping
        }
        _ => FactRole::Other,
    }
}

/// The receipt template payload and the warnings it carries, or why the card cannot be one.
fn receipt_template(
    card: &ReceiptCard,
    path: &str,
    ctx: &Ctx,
) -> Result<(Value, Vec<Warning>), String> {
    let default_currency = ctx.config.default_currency.as_str();
    let mut notes = Vec::new();
    let mut currencies: Vec<(String, String)> = Vec::new();
    let mut amount = |text: &str, field: String| {
        money::parse_price(text, default_currency).map(|m| {
            if let Some(c) = m.currency {
                currencies.push((c, field));
            }
            m.amount
        })
    };
    let recipient_name = card
        .title
        .as_deref()
        .map(|t| ctx.plain(t))
        .filter(|t| !t.is_empty())
        .ok_or("the card has no title for the receipt's recipient_name")?;

    let mut order_number = None;
    let mut payment_method = None;
    let mut merchant_name = None;
    let mut subtotal = None;
    let mut shipping = None;
    let mut adjustments = Vec::new();
    let mut unused = Vec::new();
    for (i, f) in card.facts.iter().enumerate() {
        let field = format!("{path}.facts[{i}].value");
        // Card text is in the message's text format, as the card's title is.
        let value = ctx.plain(&f.value);
        let value = value.as_str();
        let key = ctx.plain(&f.key);
        let role = fact_role(&key);
        match role {
            FactRole::OrderNumber if order_number.is_none() && !value.is_empty() => {
                order_number = Some(value.to_string())
            }
            FactRole::PaymentMethod if payment_method.is_none() && !value.is_empty() => {
                payment_method = Some(value.to_string())
            }
            FactRole::Merchant if merchant_name.is_none() && !value.is_empty() => {
                merchant_name = Some(value.to_string())
            }
            FactRole::Subtotal | FactRole::Shipping => match amount(value, field) {
                Some(a) if role == FactRole::Subtotal => subtotal = Some(a),
                Some(a) => shipping = Some(a),
                None => unused.push(key),
            },
            _ => {
                // A fact worth money ("Discount: -$5.00") is an adjustment.
                let money =
                    money::parse_price(value, default_currency).filter(|m| m.currency.is_some());
                match money.and_then(|_| amount(value, field)) {
                    Some(a) => adjustments.push(json!({"name": key, "amount": a.to_json()})),
                    None => unused.push(key),
                }
            }
        }
    }
    let order_number = order_number
        .ok_or("the card has no \"Order Number\" fact for the receipt's order_number")?;
    let payment_method = payment_method
        .ok_or("the card has no \"Payment Method\" fact for the receipt's payment_method")?;
    let total_text = card
        .total
        .as_deref()
        .ok_or("the card has no total for the receipt's summary.total_cost")?;
    let total = amount(total_text, format!("{path}.total"))
        .ok_or_else(|| format!("its total `{total_text}` is not an amount"))?;
    let mut tax: Option<Decimal> = None;
    for (name, v) in [("tax", &card.tax), ("vat", &card.vat)] {
        let Some(v) = v else { continue };
        match amount(v, format!("{path}.{name}")) {
            Some(a) => tax = Some(tax.unwrap_or_else(Decimal::zero).add(a)),
            None => notes.push(Warning::new(
                "receipt_field_dropped",
                format!("{path}.{name}"),
                format!("{name} `{v}` is not an amount: left out of the receipt's total_tax"),
            )),
        }
    }
    if card.tax.is_some() && card.vat.is_some() && tax.is_some() {
        notes.push(Warning::new(
            "receipt_tax_combined",
            format!("{path}.vat"),
            "Messenger receipts have one total_tax: tax and vat are added up",
        ));
    }

    let mut elements = Vec::new();
    let mut taps = 0;
    for (j, item) in card.items.iter().enumerate() {
        let ipath = format!("{path}.items[{j}]");
        let title = item
            .title
            .as_deref()
            .map(|t| ctx.plain(t))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("item {j} has no title"))?;
        let price_text = item
            .price
            .as_deref()
            .ok_or_else(|| format!("item {j} has no price"))?;
        let price = amount(price_text, format!("{ipath}.price"))
            .ok_or_else(|| format!("item {j} price `{price_text}` is not an amount"))?;
        let mut e = Map::new();
        e.insert("title".into(), json!(title));
        let sub: Vec<String> = [&item.subtitle, &item.text]
            .into_iter()
            .flatten()
            .map(|s| ctx.plain(s))
            .filter(|s| !s.is_empty())
            .collect();
        if !sub.is_empty() {
            e.insert("subtitle".into(), json!(sub.join("\n")));
        }
        if let Some(q) = &item.quantity {
            match money::parse_quantity(q) {
                Some(n) => {
                    e.insert("quantity".into(), n);
                }
                None => notes.push(Warning::new(
                    "receipt_field_dropped",
                    format!("{ipath}.quantity"),
                    format!("quantity `{q}` is not a number: left out"),
                )),
            }
        }
        e.insert("price".into(), price.to_json());
        if let Some(img) = &item.image {
            e.insert("image_url".into(), json!(img.url));
        }
        if item.tap.is_some() {
            taps += 1;
        }
        elements.push(Value::Object(e));
    }
    if taps > 0 {
        notes.push(Warning::new(
            "tap_dropped",
            format!("{path}.items"),
            format!(
                "Messenger receipt items cannot be tapped: {taps} item tap{} dropped",
                plural(taps)
            ),
        ));
    }
    if elements.len() > MAX_RECEIPT_ELEMENTS {
        notes.push(Warning::new(
            "receipt_items_truncated",
            format!("{path}.items"),
            format!(
                "{} items; a Messenger receipt holds at most {MAX_RECEIPT_ELEMENTS}: kept the first {MAX_RECEIPT_ELEMENTS}",
                elements.len()
            ),
        ));
        elements.truncate(MAX_RECEIPT_ELEMENTS);
    }
    let mut distinct: Vec<&str> = currencies.iter().map(|(c, _)| c.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() > 1 {
        return Err(format!(
            "its prices are in several currencies ({}) and a Messenger receipt has one",
            distinct.join(", ")
        ));
    }
    let currency = distinct
        .first()
        .map(|c| c.to_string())
        .unwrap_or_else(|| default_currency.to_string());

    let mut payload = Map::new();
    payload.insert("template_type".into(), json!("receipt"));
    payload.insert("recipient_name".into(), json!(recipient_name));
    payload.insert("order_number".into(), json!(order_number));
    payload.insert("currency".into(), json!(currency));
    payload.insert("payment_method".into(), json!(payment_method));
    if let Some(m) = merchant_name {
        payload.insert("merchant_name".into(), json!(m));
    }
    if let Some(tap) = &card.tap {
        match (tap.kind.takes_url(), tap.value_str()) {
            (true, Some(url)) => {
                payload.insert("order_url".into(), json!(url));
            }
            _ => notes.push(Warning::new(
                "tap_dropped",
                format!("{path}.tap"),
                "only a URL tap has a place in a Messenger receipt (order_url): dropped",
            )),
        }
    }
    if !elements.is_empty() {
        payload.insert("elements".into(), Value::Array(elements));
    }
    let mut summary = Map::new();
    if let Some(s) = subtotal {
        summary.insert("subtotal".into(), s.to_json());
    }
    if let Some(s) = shipping {
        summary.insert("shipping_cost".into(), s.to_json());
    }
    if let Some(t) = tax {
        summary.insert("total_tax".into(), t.to_json());
    }
    summary.insert("total_cost".into(), total.to_json());
    payload.insert("summary".into(), Value::Object(summary));
    if !adjustments.is_empty() {
        payload.insert("adjustments".into(), Value::Array(adjustments));
    }
    if !unused.is_empty() {
        notes.push(Warning::new(
            "receipt_field_dropped",
            format!("{path}.facts"),
            format!(
                "a Messenger receipt has no place for the fact{} {}: left out",
                plural(unused.len()),
                unused
                    .iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok((Value::Object(payload), notes))
}

// ---------------------------------------------------------------------------------------------
// Actions

/// Messenger buttons for `actions`, which start at index `first` of the list at `path`.
fn buttons(
    actions: &[CardAction],
    path: &str,
    first: usize,
    ctx: &mut Ctx,
) -> Result<Vec<Value>, RenderError> {
    actions
        .iter()
        .enumerate()
        .map(|(k, a)| button(a, &format!("{path}[{}]", first + k), ctx))
        .collect()
}

/// The title an action shows: its title, else its display text, text or textual value.
fn action_title(a: &CardAction, path: &str, ctx: &mut Ctx) -> Result<String, RenderError> {
    let (title, field) = action_title_from(a, path, ctx)?;
    message_back_dropped(a, field, path, ctx);
    Ok(title)
}

/// Warns for the parts of a message_back that Messenger has no place for: a tapped button or
/// quick reply shows its title in the chat (not `display_text`) and sends the bot its payload
/// only (`value`, so `text` goes unless it stands in for a missing value). `title_field` is
/// where the title was taken from.
fn message_back_dropped(a: &CardAction, title_field: &str, path: &str, ctx: &mut Ctx) {
    if a.kind != ActionType::MessageBack {
        return;
    }
    let set = |t: &Option<String>| t.as_deref().is_some_and(|t| !t.trim().is_empty());
    let payload_field = match &a.value {
        Some(v) if !v.is_null() => "value",
        _ if a.text.is_some() => "text",
        _ => "display_text",
    };
    if set(&a.display_text) && title_field != "display_text" && payload_field != "display_text" {
        ctx.warn(
            "action_field_dropped",
            format!("{path}.display_text"),
            "Messenger shows the title in the chat when it is tapped: display_text is dropped",
        );
    }
    if set(&a.text) && title_field != "text" && payload_field != "text" {
        ctx.warn(
            "action_field_dropped",
            format!("{path}.text"),
            "Messenger sends the bot only the payload (value) when it is tapped: text is dropped",
        );
    }
}

/// The title an action shows and the field it came from.
fn action_title_from(
    a: &CardAction,
    path: &str,
    ctx: &mut Ctx,
) -> Result<(String, &'static str), RenderError> {
    let (title, field) = a.label(|t| ctx.plain(t)).ok_or_else(|| {
        RenderError::invalid(
            format!("{path}.title"),
            "required: Messenger buttons and quick replies need a title",
        )
    })?;
    let title = ctx.fit(
        &title,
        MAX_BUTTON_TITLE,
        "title_truncated",
        &format!("{path}.{field}"),
        "title",
    );
    Ok((title, field))
}

/// What a postback-like action sends back; errors name the field it comes from.
fn payload_of(a: &CardAction, path: &str) -> Result<String, RenderError> {
    let (payload, field) = a.postback_value();
    let payload = payload.or_else(|| match a.kind {
        ActionType::MessageBack | ActionType::ImBack => {
            a.text.clone().or_else(|| a.display_text.clone())
        }
        _ => None,
    });
    let field = format!("{path}.{field}");
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or_else(|| RenderError::invalid(&field, "required: Messenger needs a payload"))?;
    let n = text::len16(&payload);
    if n > MAX_PAYLOAD {
        return Err(RenderError::invalid(
            field,
            format!("payload is {n} characters; Messenger accepts at most {MAX_PAYLOAD}"),
        ));
    }
    Ok(payload)
}

/// A card button: URL actions open the URL, post_back / im_back / message_back / dialog_action
/// post back (Messenger has no imBack: the text comes back as the payload), call dials.
fn button(a: &CardAction, path: &str, ctx: &mut Ctx) -> Result<Value, RenderError> {
    let title = action_title(a, path, ctx)?;
    if a.kind.takes_url() {
        let url = a
            .value_str()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| RenderError::invalid(format!("{path}.value"), "required: a URL"))?;
        return Ok(json!({"type": "web_url", "url": url, "title": title}));
    }
    if a.kind == ActionType::Call {
        let number = a
            .value_str()
            .map(|v| v.trim().trim_start_matches("tel:"))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                RenderError::invalid(format!("{path}.value"), "required: a phone number")
            })?;
        return Ok(json!({"type": "phone_number", "title": title, "payload": number}));
    }
    let payload = payload_of(a, path)?;
    Ok(json!({"type": "postback", "title": title, "payload": payload}))
}

/// A tap as an element's default_action: only URLs can be opened on tap.
fn default_action(a: &CardAction, path: &str, ctx: &mut Ctx) -> Option<Value> {
    match (a.kind.takes_url(), a.value_str()) {
        (true, Some(url)) if !url.is_empty() => Some(json!({"type": "web_url", "url": url})),
        _ => {
            ctx.warn(
                "tap_dropped",
                path,
                "a Messenger card can only open a URL on tap: this tap is dropped (make it a button)",
            );
            None
        }
    }
}

/// Suggested actions as text quick replies: the first 13 that can be one (URLs and calls
/// cannot: Messenger quick replies only send text back).
fn quick_replies(sa: &SuggestedActions, ctx: &mut Ctx) -> Result<Vec<Value>, RenderError> {
    let mut out = Vec::new();
    let mut over = 0;
    for (i, a) in sa.actions.iter().enumerate() {
        let path = format!("message.suggested_actions.actions[{i}]");
        if a.kind.takes_url() || a.kind == ActionType::Call {
            ctx.warn(
                "suggested_action_dropped",
                &path,
                "Messenger quick replies can only send text back, not open a URL or dial: dropped (use a card button)",
            );
            continue;
        }
        if out.len() == MAX_QUICK_REPLIES {
            over += 1;
            continue;
        }
        let title = action_title(a, &path, ctx)?;
        let payload = payload_of(a, &path)?;
        let mut q = Map::new();
        q.insert("content_type".into(), json!("text"));
        q.insert("title".into(), json!(title));
        q.insert("payload".into(), json!(payload));
        if let Some(img) = &a.image {
            q.insert("image_url".into(), json!(img));
        }
        out.push(Value::Object(q));
    }
    if over > 0 {
        ctx.warn(
            "suggested_actions_truncated",
            "message.suggested_actions.actions",
            format!(
                "{} quick replies; Messenger shows at most {MAX_QUICK_REPLIES}: kept the first {MAX_QUICK_REPLIES}",
                MAX_QUICK_REPLIES + over
            ),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Conversation, Fact, Identity, ReceiptItem};

    fn config() -> FacebookConfig {
        FacebookConfig::default()
    }

    fn msg() -> Message {
        Message {
            address: Address {
                channel_id: "facebook".into(),
                user: Some(Identity {
                    id: "psid-1".into(),
                    ..Default::default()
                }),
                bot: Some(Identity {
                    id: "page-1".into(),
                    ..Default::default()
                }),
                conversation: Some(Conversation {
                    id: "psid-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn bodies(r: &Rendered) -> Vec<Value> {
        r.requests.iter().map(|q| q.body.value()).collect()
    }

    #[test]
    fn requests_never_carry_a_token_and_name_the_page() {
        let mut m = msg();
        m.text = Some("hi".into());
        let r = render_send(&m, None, &config()).unwrap();
        assert_eq!(r.requests.len(), 1);
        let q = &r.requests[0];
        assert_eq!(q.url, "https://graph.facebook.com/v25.0/me/messages");
        assert_eq!(q.credential, "page-1");
        let keys: Vec<&str> = q.rate.levels().iter().map(|l| &*l.key).collect();
        assert_eq!(keys, ["facebook:page-1/psid-1", "facebook:page-1"]);
        assert_eq!(
            q.body.value(),
            json!({"recipient": {"id": "psid-1"}, "messaging_type": "RESPONSE", "message": {"text": "hi"}})
        );
        let mut c = config();
        c.endpoint = SendEndpoint::Page;
        let r = render_send(&m, None, &c).unwrap();
        assert_eq!(
            r.requests[0].url,
            "https://graph.facebook.com/v25.0/page-1/messages"
        );
    }

    #[test]
    fn typing_is_a_sender_action_alone() {
        let mut m = msg();
        m.kind = MessageType::Typing;
        m.text = Some("ignored".into());
        let r = render_send(&m, None, &config()).unwrap();
        assert_eq!(
            bodies(&r),
            [json!({"recipient": {"id": "psid-1"}, "sender_action": "typing_on"})]
        );
    }

    #[test]
    fn required_address_fields_are_named() {
        let mut m = msg();
        m.address.user = None;
        let e = render_send(&m, None, &config()).unwrap_err();
        assert!(
            matches!(e, RenderError::InvalidArgument { ref field, .. } if field == "message.address.user.id")
        );
        let mut m = msg();
        m.address.conversation = None;
        let e = render_send(&m, None, &config()).unwrap_err();
        assert!(
            matches!(e, RenderError::InvalidArgument { ref field, .. } if field == "message.address.conversation.id")
        );
        m.text = Some("x".into());
        let r = render_send(&m, Some(&ProactiveOptions::default()), &config()).unwrap();
        assert_eq!(r.requests[0].body.value()["messaging_type"], "UPDATE");
    }

    #[test]
    fn audio_and_video_count_against_the_media_quota() {
        let mut m = msg();
        m.attachments = vec![
            Attachment {
                content_type: "video/mp4".into(),
                content_url: Some("https://example.com/v.mp4".into()),
                ..Default::default()
            },
            Attachment {
                content_type: "image/png".into(),
                content_url: Some("https://example.com/i.png".into()),
                ..Default::default()
            },
        ];
        let r = render_send(&m, None, &config()).unwrap();
        let scopes: Vec<&str> = r
            .requests
            .iter()
            .map(|q| &*q.rate.levels()[1].key)
            .collect();
        assert_eq!(scopes, ["facebook:page-1:media", "facebook:page-1"]);
        assert_eq!(r.requests[0].rate.levels()[1].budgets[0].per_second, 10.0);
    }

    #[test]
    fn receipt_facts_prices_and_fallback() {
        let mut card = ReceiptCard {
            title: Some("Ada".into()),
            facts: vec![
                Fact {
                    key: "order no.".into(),
                    value: "A-1".into(),
                },
                Fact {
                    key: "PAYMENT METHOD".into(),
                    value: "Visa 1234".into(),
                },
                Fact {
                    key: "Discount".into(),
                    value: "-5,00 EUR".into(),
                },
            ],
            items: vec![ReceiptItem {
                title: Some("Book".into()),
                price: Some("22,00 EUR".into()),
                quantity: Some("2".into()),
                ..Default::default()
            }],
            total: Some("€ 39,00".into()),
            ..Default::default()
        };
        let cfg = config();
        let ctx = Ctx::new(&cfg, None);
        let (p, notes) = receipt_template(&card, "r", &ctx).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            p,
            json!({
                "template_type": "receipt", "recipient_name": "Ada", "order_number": "A-1",
                "currency": "EUR", "payment_method": "Visa 1234",
                "elements": [{"title": "Book", "quantity": 2, "price": 22}],
                "summary": {"total_cost": 39},
                "adjustments": [{"name": "Discount", "amount": -5}]
            })
        );
        card.items[0].price = Some("$22.00".into());
        let err = receipt_template(&card, "r", &ctx).unwrap_err();
        assert!(err.contains("EUR, USD"), "{err}");
        card.facts.remove(1);
        let err = receipt_template(&card, "r", &ctx).unwrap_err();
        assert!(err.contains("Payment Method"), "{err}");
    }

    #[test]
    fn payload_limit_names_the_field() {
        let mut m = msg();
        m.attachments = vec![Attachment {
            content_type: String::new(),
            content: Some(AttachmentContent::Hero(HeroCard {
                title: Some("t".into()),
                buttons: vec![
                    CardAction {
                        kind: ActionType::PostBack,
                        title: Some("ok".into()),
                        value: Some(json!("fine")),
                        ..Default::default()
                    },
                    CardAction {
                        kind: ActionType::PostBack,
                        title: Some("big".into()),
                        value: Some(json!("x".repeat(1001))),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })),
            ..Default::default()
        }];
        let e = render_send(&m, None, &config()).unwrap_err();
        assert_eq!(
            e,
            RenderError::invalid(
                "message.attachments[0].hero.buttons[1].value",
                "payload is 1001 characters; Messenger accepts at most 1000"
            )
        );
    }
}
