//! Pure translation of the model into Slack Web API requests: `chat.postMessage` bodies (text
//! as mrkdwn, Block Kit for cards, files and buttons), the split of a message that exceeds
//! Slack's per-message limits into several messages in order, `source_event` merging, and the
//! `conversations.open` request that starts a proactive DM.
//!
//! No I/O: the client sends what this returns, adding the bot token named by
//! `NativeRequest::credential` (the address's bot id). Nothing here sees a token.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::blocks::{self, Ctx, Group};
use super::config::SlackConfig;
use super::mrkdwn;
use crate::channels::{
    Body, Budget, Capabilities, HttpMethod, NativeReceipt, NativeRequest, RateScope, RateScopes,
    RenderError, Rendered,
};
use crate::model::{
    Address, AttachmentLayout, Conversation, DeliveryMode, Message, ProactiveOptions, SendKind,
    TextFormat, Warning,
};

/// The channel id served here.
pub const CHANNEL_ID: &str = "slack";
/// Stands for the channel id of a DM not opened yet (Render of a proactive start).
pub const CONVERSATION_ID_PLACEHOLDER: &str = "{conversationId}";
/// Blocks in one message.
pub const MAX_BLOCKS: usize = 50;
/// Characters in one message's blocks, counted over every string in them. Slack refuses about
/// 13.2k (`msg_blocks_too_long`, undocumented); this leaves room for its own counting.
pub const MAX_BLOCK_CHARS: usize = 12_000;
/// The message `text` field: Slack truncates past this.
pub const MAX_TEXT_CHARS: usize = 40_000;
/// The `text` fallback sent with blocks (notifications and screen readers need little).
pub const FALLBACK_MAX: usize = 3000;
/// Users in one `conversations.open` (a group DM holds the bot and up to 8 people).
pub const MAX_DM_USERS: usize = 8;

/// `source_event` keys that replace the generated content rather than adjust it.
const CONTENT_KEYS: &[&str] = &["text", "blocks", "attachments"];
/// The `chat.postMessage` arguments the shared `source_event["*"]` may set: the documented
/// optional ones but the legacy `as_user`. `source_event["*"]` is written for every channel
/// (Teams reads it as channelData), so anything else (`channel`, `token`, another channel's
/// fields) is left out with a warning; `source_event.slack` passes every key through.
/// Documented in docs/channels/slack.md.
pub const FALLBACK_KEYS: &[&str] = &[
    "attachments",
    "blocks",
    "icon_emoji",
    "icon_url",
    "link_names",
    "markdown_text",
    "metadata",
    "mrkdwn",
    "parse",
    "reply_broadcast",
    "text",
    "thread_ts",
    "unfurl_links",
    "unfurl_media",
    "username",
];

/// The requests for one message: `chat.postMessage` to `address.conversation.id`, in the
/// thread `address.thread_id` when set. `proactive` changes nothing on Slack (no message tags).
pub fn render_send(
    msg: &Message,
    _proactive: Option<&ProactiveOptions>,
    config: &SlackConfig,
) -> Result<Rendered, RenderError> {
    let channel = msg.address.conversation_id().ok_or_else(|| {
        RenderError::invalid(
            "message.address.conversation.id",
            "required: start a conversation with a proactive send first",
        )
    })?;
    if msg.delivery_mode == Some(DeliveryMode::Ephemeral) {
        // Sent as an ordinary message it would show to everyone in the channel.
        return Err(RenderError::invalid(
            "message.delivery_mode",
            "ephemeral messages are not supported on slack (they would be visible to the whole channel)",
        ));
    }
    let mut warnings = Vec::new();
    let extra = source_event(msg, &mut warnings)?;

    let bodies = match RenderError::send_kind(msg)? {
        SendKind::Typing => {
            warnings.push(Warning::new(
                "typing_not_supported",
                "message.type",
                "Slack has no typing indicator for bots over the Web API: nothing was sent",
            ));
            return Ok(Rendered {
                requests: Vec::new(),
                warnings,
            });
        }
        SendKind::EndOfConversation => {
            warnings.push(Warning::new(
                "end_of_conversation_not_supported",
                "message.type",
                "Slack has no end-of-conversation activity: nothing was sent",
            ));
            return Ok(Rendered {
                requests: Vec::new(),
                warnings,
            });
        }
        SendKind::Event => {
            let has_content = extra.as_ref().is_some_and(|e| {
                CONTENT_KEYS
                    .iter()
                    .any(|k| e.get(*k).is_some_and(|v| !v.is_null()))
            });
            if !has_content {
                warnings.push(Warning::new(
                    "event_not_supported",
                    "message.type",
                    "Slack has no event activity: nothing was sent (give source_event.slack a text or blocks to post one)",
                ));
                return Ok(Rendered {
                    requests: Vec::new(),
                    warnings,
                });
            }
            vec![Map::new()]
        }
        SendKind::Message => content_bodies(msg, extra.as_ref(), &mut warnings)?,
    };
    if let (Some(e), Some(first)) = (&extra, bodies.first()) {
        replaced_content(msg, e, first, &mut warnings);
    }

    let requests = bodies
        .into_iter()
        .map(|content| {
            let mut body = envelope(msg, channel, config);
            body.extend(content);
            if let Some(e) = &extra {
                merge(&mut body, e);
            }
            post_message(config, &msg.address, channel, Value::Object(body))
        })
        .collect::<Result<_, _>>()?;
    Ok(Rendered { requests, warnings })
}

/// The keys of a `chat.postMessage` body that `chat.update` takes as well. The rest (the
/// thread, unfurling, `mrkdwn`) belongs to the message's posting and cannot change.
const UPDATE_KEYS: &[&str] = &[
    "text",
    "blocks",
    "attachments",
    "metadata",
    "link_names",
    "parse",
];

/// How a Slack message is edited and deleted: `chat.update` and `chat.delete` with the
/// channel id and `ts` Slack gave back for it (a DM's `D…` id, not the user's).
pub struct SlackEditor<'a> {
    pub config: &'a SlackConfig,
    pub address: &'a Address,
}

impl crate::channels::update::Editor for SlackEditor<'_> {
    fn edit(
        &self,
        send: &NativeRequest,
        receipt: &NativeReceipt,
    ) -> Result<Option<NativeRequest>, RenderError> {
        let posted = send.body.value();
        let mut body = Map::new();
        body.insert("channel".into(), receipt.conversation_id.clone().into());
        body.insert("ts".into(), receipt.native_id.clone().into());
        for k in UPDATE_KEYS {
            if let Some(v) = posted.get(*k) {
                body.insert((*k).into(), v.clone());
            }
        }
        // Left out, the message would keep its old blocks; an empty list removes them.
        body.entry("blocks")
            .or_insert_with(|| Value::Array(Vec::new()));
        method_request(
            self.config,
            self.address,
            &receipt.conversation_id,
            "chat.update",
            Value::Object(body),
        )
        .map(Some)
    }

    fn delete(&self, receipt: &NativeReceipt) -> Result<NativeRequest, RenderError> {
        method_request(
            self.config,
            self.address,
            &receipt.conversation_id,
            "chat.delete",
            serde_json::json!({"channel": receipt.conversation_id, "ts": receipt.native_id}),
        )
    }
}

/// An update of a sent message: its send's rendering, mapped onto what it became.
pub fn render_update(
    msg: &Message,
    receipts: &[NativeReceipt],
    config: &SlackConfig,
) -> Result<crate::channels::update::Plan, RenderError> {
    let sends = render_send(msg, None, config)?;
    let editor = SlackEditor {
        config,
        address: &msg.address,
    };
    crate::channels::update::reconcile(sends, receipts, &editor)
}

/// The deletion of every native message a sent message became.
pub fn render_delete(
    address: &Address,
    receipts: &[NativeReceipt],
    config: &SlackConfig,
) -> Result<crate::channels::update::Plan, RenderError> {
    crate::channels::update::delete_all(receipts, &SlackEditor { config, address })
}

/// Render of a proactive start whose address has no conversation: `conversations.open`, then
/// each message's `chat.postMessage` with the literal placeholder `{conversationId}` as its
/// channel, rendered as sent once the DM exists (no thread, answering no activity).
pub fn render_proactive(
    messages: &[Message],
    options: &ProactiveOptions,
    config: &SlackConfig,
) -> Result<Rendered, RenderError> {
    let first = messages.first().ok_or_else(|| {
        RenderError::invalid(
            "messages",
            "at least one message is needed to render a proactive start",
        )
    })?;
    let address = &first.address;
    if address.conversation_id().is_some() {
        return Err(RenderError::invalid(
            "message.address.conversation.id",
            "must be empty for a proactive start: Slack names the new DM",
        ));
    }
    for (i, m) in messages.iter().enumerate().skip(1) {
        if m.address.channel_id != address.channel_id
            || m.address.bot_id() != address.bot_id()
            || m.address.conversation_id().is_some()
        {
            return Err(RenderError::invalid(
                format!("messages[{i}].address"),
                "every message of a proactive start must have the first message's address",
            ));
        }
    }
    let mut out = Rendered {
        requests: vec![open_request(address, options, config, "message.address")?],
        warnings: Vec::new(),
    };
    let opened = opened_address(address, CONVERSATION_ID_PLACEHOLDER, options);
    for m in messages {
        let mut m = m.clone();
        m.address = opened.clone();
        let r = render_send(&m, Some(options), config)?;
        out.requests.extend(r.requests);
        out.warnings.extend(r.warnings);
    }
    Ok(out)
}

/// `POST {api}/conversations.open {users: "U1[,U2...]"}`: `address.user`, plus `options.members`
/// for a group DM (`options.is_group`). `prefix` is where the address sits in the request.
pub fn open_request(
    address: &Address,
    options: &ProactiveOptions,
    config: &SlackConfig,
    prefix: &str,
) -> Result<NativeRequest, RenderError> {
    let user = address.user_id().trim();
    if user.is_empty() {
        return Err(RenderError::invalid(
            format!("{prefix}.user.id"),
            "required to open a DM",
        ));
    }
    let mut users = vec![user.to_string()];
    if options.is_group {
        for (i, m) in options.members.iter().enumerate() {
            let id = m.id.trim();
            if id.is_empty() {
                return Err(RenderError::invalid(
                    format!("options.members[{i}].id"),
                    "required",
                ));
            }
            if !users.iter().any(|u| u == id) {
                users.push(id.to_string());
            }
        }
    }
    if users.len() > MAX_DM_USERS {
        return Err(RenderError::invalid(
            "options.members",
            format!(
                "{} people; a Slack group DM holds at most {MAX_DM_USERS}",
                users.len()
            ),
        ));
    }
    if let Some(bad) = users.iter().find(|u| u.contains(',')) {
        return Err(RenderError::invalid(
            format!("{prefix}.user.id"),
            format!("`{bad}` is not a Slack user id (it contains a comma)"),
        ));
    }
    Ok(NativeRequest {
        method: HttpMethod::Post,
        url: config.method_url("conversations.open"),
        body: Body::json(&json!({"users": users.join(",")}))?,
        credential: address.bot_id().to_string(),
        // conversations.open has its own, workspace-wide quota: only Slack's 429s slow it.
        rate: RateScopes::default(),
    })
}

/// The address of a DM Slack opened: its channel id as the conversation, no thread, answering
/// no activity.
pub fn opened_address(address: &Address, channel_id: &str, options: &ProactiveOptions) -> Address {
    let mut out = address.clone();
    let mut conv: Conversation = out.conversation.take().unwrap_or_default();
    conv.id = channel_id.to_string();
    if options.is_group {
        conv.is_group = Some(true);
    }
    out.conversation = Some(conv);
    out.id = None;
    out.thread_id = None;
    out
}

/// What Slack supports through this gateway.
pub fn capabilities(channel_id: &str) -> Capabilities {
    Capabilities {
        channel_id: channel_id.into(),
        implementation: "slack".into(),
        typing: false,
        typing_interval: Duration::ZERO,
        carousel: true,
        max_buttons_per_card: blocks::ACTIONS_MAX as u32,
        max_suggested_actions: blocks::ACTIONS_MAX as u32,
        max_text_length: MAX_TEXT_CHARS as u32,
        markdown_flavor: "mrkdwn".into(),
        update_delete: true,
        proactive: true,
        // Slack documents no byte limit, only the block and character limits applied here.
        max_payload_bytes: 0,
        proactive_note: String::new(),
    }
}

// ---------------------------------------------------------------------------------------------

fn post_message(
    config: &SlackConfig,
    address: &Address,
    channel: &str,
    body: Value,
) -> Result<NativeRequest, RenderError> {
    method_request(config, address, channel, "chat.postMessage", body)
}

/// A Web API call about a message of `channel`: chat.postMessage, chat.update and chat.delete
/// share the channel's budget (a change of a message is a message call, for Slack's tiers).
fn method_request(
    config: &SlackConfig,
    address: &Address,
    channel: &str,
    method: &str,
    body: Value,
) -> Result<NativeRequest, RenderError> {
    let bot = address.bot_id();
    Ok(NativeRequest {
        method: HttpMethod::Post,
        url: config.method_url(method),
        body: Body::json(&body)?,
        credential: bot.to_string(),
        // chat.postMessage: "generally allows posting one message per second per channel,
        // while also maintaining a workspace-wide limit" (Slack's rate limits page, special
        // tier). The channel's budget is configured; the workspace's is unpublished, so only
        // 429s repeated across its channels pause it.
        rate: RateScopes(vec![
            RateScope::configured(
                format!("slack:{bot}:{channel}"),
                Budget {
                    per_second: config.rate_per_second,
                    burst: config.rate_burst,
                },
            ),
            RateScope::new(format!("slack:{bot}"), &[]),
        ]),
    })
}

/// The fields every request of a message carries: channel, thread, formatting and unfurling.
fn envelope(msg: &Message, channel: &str, config: &SlackConfig) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("channel".into(), channel.into());
    if let Some(ts) = msg.address.thread_id.as_deref().filter(|t| !t.is_empty()) {
        o.insert("thread_ts".into(), ts.into());
    }
    if msg.text_format == Some(TextFormat::Plain) {
        o.insert("mrkdwn".into(), false.into());
    }
    if let Some(u) = config.unfurl_links {
        o.insert("unfurl_links".into(), u.into());
    }
    if let Some(u) = config.unfurl_media {
        o.insert("unfurl_media".into(), u.into());
    }
    o
}

/// `source_event.slack` (or `*`, keeping `FALLBACK_KEYS`): an object whose keys are merged over
/// each request body.
fn source_event(
    msg: &Message,
    warnings: &mut Vec<Warning>,
) -> Result<Option<Map<String, Value>>, RenderError> {
    let key = if msg.source_event.contains_key(CHANNEL_ID) {
        CHANNEL_ID
    } else {
        "*"
    };
    let Some(v) = msg.source_event.get(key) else {
        return Ok(None);
    };
    let field = format!("message.source_event.{key}");
    let Value::Object(o) = v else {
        return Err(RenderError::invalid(field, "must be a JSON object"));
    };
    if key == "*" {
        return Ok(crate::channels::shared::keep_fallback_keys(
            o,
            "chat.postMessage",
            CHANNEL_ID,
            FALLBACK_KEYS,
            warnings,
        ));
    }
    if o.contains_key("channel") {
        return Err(RenderError::invalid(
            format!("{field}.channel"),
            "cannot be set here: the channel is address.conversation.id",
        ));
    }
    if o.contains_key("token") {
        return Err(RenderError::invalid(
            format!("{field}.token"),
            "cannot be set here: tokens come from channels.slack.workspaces",
        ));
    }
    Ok(Some(o.clone()))
}

/// Warns for each content key of the native extra that replaces what the message's own
/// content made (the first request's `text` or `blocks`), which is otherwise lost unseen.
fn replaced_content(
    msg: &Message,
    extra: &Map<String, Value>,
    generated: &Map<String, Value>,
    warnings: &mut Vec<Warning>,
) {
    let key = if msg.source_event.contains_key(CHANNEL_ID) {
        CHANNEL_ID
    } else {
        "*"
    };
    let with_blocks = generated.contains_key("blocks");
    for k in CONTENT_KEYS {
        if extra.get(*k).is_none_or(Value::is_null) || !generated.contains_key(*k) {
            continue;
        }
        let what = match *k {
            "text" if with_blocks => {
                "the text fallback (notifications, screen readers) made from the message"
            }
            "text" => "the message text",
            _ => "the blocks made from the message's text, attachments and actions",
        };
        warnings.push(Warning::new(
            "content_replaced",
            format!("message.source_event.{key}.{k}"),
            format!("replaces {what}: what the gateway made from it was not sent"),
        ));
    }
}

/// `extra` over `body`: a null value removes the key (e.g. `"thread_ts": null`).
fn merge(body: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        if v.is_null() {
            body.remove(k);
        } else {
            body.insert(k.clone(), v.clone());
        }
    }
}

/// The message text as mrkdwn (or escaped plain text), with the warnings its conversion needs.
fn message_text(msg: &Message, warnings: &mut Vec<Warning>) -> Option<String> {
    let text = msg.text.as_deref().filter(|t| !t.trim().is_empty())?;
    Some(match msg.text_format {
        Some(TextFormat::Plain) => mrkdwn::escape(text),
        Some(TextFormat::Xml) => {
            let (s, dropped) = mrkdwn::from_xml(text);
            if !dropped.is_empty() {
                warnings.push(Warning::new(
                    "xml_tags_dropped",
                    "message.text",
                    format!(
                        "Slack has no form for {}: the tags were dropped, their text kept",
                        crate::channels::shared::name_list(
                            &dropped.iter().map(String::as_str).collect::<Vec<_>>(),
                            |t| format!("<{t}>")
                        )
                    ),
                ));
            }
            s
        }
        // Bot Framework's default text format is Markdown.
        Some(TextFormat::Markdown) | None => mrkdwn::from_markdown(text),
    })
}

/// The content part (`text`, `blocks`) of each request of a message, in order.
fn content_bodies(
    msg: &Message,
    extra: Option<&Map<String, Value>>,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Map<String, Value>>, RenderError> {
    let plain = msg.text_format == Some(TextFormat::Plain);
    let text = message_text(msg, warnings);
    let mut ctx = Ctx {
        warnings,
        buttons: 0,
    };

    let mut groups: Vec<Group> = Vec::new();
    if let Some(t) = &text {
        groups.push(Group {
            blocks: blocks::text_sections(t, plain),
            divider_before: false,
        });
    }
    let carousel = msg.attachment_layout == Some(AttachmentLayout::Carousel);
    for (i, a) in msg.attachments.iter().enumerate() {
        let mut g = blocks::attachment(&mut ctx, a, &format!("message.attachments[{i}]"))?;
        g.divider_before = carousel && i > 0;
        if !g.blocks.is_empty() {
            groups.push(g);
        }
    }
    if let Some(sa) = msg
        .suggested_actions
        .as_ref()
        .filter(|s| !s.actions.is_empty())
    {
        if !sa.to.is_empty() {
            ctx.warnings.push(Warning::new(
                "suggested_actions_to_ignored",
                "message.suggested_actions.to",
                "Slack cannot show buttons to some members only: everyone in the conversation sees them",
            ));
        }
        let b = blocks::buttons(
            &mut ctx,
            &sa.actions,
            "message.suggested_actions.actions",
            "message.suggested_actions",
        )?;
        groups.push(Group {
            blocks: b,
            divider_before: false,
        });
    }

    // Anything besides the text makes a Block Kit message.
    let has_blocks = groups.len() > usize::from(text.is_some());
    let replaced = extra.is_some_and(|e| {
        CONTENT_KEYS
            .iter()
            .any(|k| e.get(*k).is_some_and(|v| !v.is_null()))
    });

    if !has_blocks {
        let Some(text) = text else {
            if replaced {
                return Ok(vec![Map::new()]);
            }
            return Err(RenderError::invalid(
                "message",
                "nothing to send: set text, attachments or suggested_actions (or source_event.slack content)",
            ));
        };
        // Text alone goes in `text`, where mrkdwn renders and the 40k limit applies.
        let parts = mrkdwn::split(&text, MAX_TEXT_CHARS);
        if parts.len() > 1 && !replaced {
            ctx.warnings.push(Warning::new(
                "text_split",
                "message.text",
                format!(
                    "{} characters; Slack truncates a message past {MAX_TEXT_CHARS}: continued in {}",
                    text.chars().count(),
                    blocks::more(parts.len() - 1, "message", "messages")
                ),
            ));
        }
        if parts.len() > 1 && replaced {
            ctx.warnings.push(Warning::new(
                "source_event_replaced_content",
                "message.source_event",
                format!(
                    "source_event sets the content: the message is sent once, with only the first of the {} parts of its text",
                    parts.len()
                ),
            ));
        }
        let parts = if replaced {
            parts.into_iter().take(1).collect()
        } else {
            parts
        };
        return Ok(parts
            .into_iter()
            .map(|p| {
                let mut o = Map::new();
                o.insert("text".into(), p.into());
                o
            })
            .collect());
    }

    let messages = pack(groups);
    if messages.len() > 1 && !replaced {
        let total: usize = messages.iter().map(Vec::len).sum();
        ctx.warnings.push(Warning::new(
            "message_split",
            "message",
            format!(
                "{total} blocks; a Slack message holds at most {MAX_BLOCKS} blocks and about {MAX_BLOCK_CHARS} characters of them: continued in {}, in order",
                blocks::more(messages.len() - 1, "message", "messages")
            ),
        ));
    }
    if replaced && messages.len() > 1 {
        ctx.warnings.push(Warning::new(
            "source_event_replaced_content",
            "message.source_event",
            "source_event sets the content: the message is sent once, with only the first part of what it would have been",
        ));
    }
    let first_fallback = text.as_deref().map(String::from).or_else(|| {
        msg.summary
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                if plain {
                    mrkdwn::escape(s)
                } else {
                    mrkdwn::from_markdown(s)
                }
            })
    });
    let take = if replaced { 1 } else { messages.len() };
    Ok(messages
        .into_iter()
        .take(take)
        .enumerate()
        .map(|(k, blocks)| {
            let fallback = match (k, &first_fallback) {
                (0, Some(f)) => f.clone(),
                _ => fallback_from(&blocks),
            };
            let fallback = mrkdwn::truncate(&fallback, FALLBACK_MAX).unwrap_or(fallback);
            let mut o = Map::new();
            o.insert("text".into(), fallback.into());
            o.insert("blocks".into(), Value::Array(blocks));
            o
        })
        .collect())
}

/// Groups packed into messages of at most `MAX_BLOCKS` blocks and `MAX_BLOCK_CHARS` characters,
/// in order. A group moves whole to the next message when it does not fit in this one but fits
/// in an empty one; a group too big for any message is cut between blocks. A divider is only
/// placed between two groups of one message.
fn pack(groups: Vec<Group>) -> Vec<Vec<Value>> {
    let mut out: Vec<Vec<Value>> = Vec::new();
    let mut cur: Vec<Value> = Vec::new();
    let mut cur_chars = 0usize;
    let divider = blocks::divider();
    let divider_chars = measure(&divider);
    for g in groups {
        let g_chars: usize = g.blocks.iter().map(measure).sum();
        let fits_alone = g.blocks.len() <= MAX_BLOCKS && g_chars <= MAX_BLOCK_CHARS;
        let with_div = g.divider_before && !cur.is_empty();
        let need = g.blocks.len() + usize::from(with_div);
        let need_chars = g_chars + if with_div { divider_chars } else { 0 };
        if !cur.is_empty()
            && fits_alone
            && (cur.len() + need > MAX_BLOCKS || cur_chars + need_chars > MAX_BLOCK_CHARS)
        {
            out.push(std::mem::take(&mut cur));
            cur_chars = 0;
        }
        if g.divider_before && !cur.is_empty() {
            cur.push(divider.clone());
            cur_chars += divider_chars;
        }
        for b in g.blocks {
            let c = measure(&b);
            if !cur.is_empty() && (cur.len() + 1 > MAX_BLOCKS || cur_chars + c > MAX_BLOCK_CHARS) {
                out.push(std::mem::take(&mut cur));
                cur_chars = 0;
            }
            cur.push(b);
            cur_chars += c;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // A message never ends with the divider that announced a group moved to the next one.
    for m in &mut out {
        while m.last().is_some_and(|b| b == &divider) && m.len() > 1 {
            m.pop();
        }
    }
    out
}

/// Characters Slack may count for a block: every string in it.
fn measure(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(a) => a.iter().map(measure).sum(),
        Value::Object(o) => o.values().map(measure).sum(),
        _ => 0,
    }
}

/// A `text` fallback for a message made of `blocks` alone: the text of each section and header,
/// one per line; image titles when there is no text; button labels when there is nothing else.
fn fallback_from(blocks: &[Value]) -> String {
    fn text_of(t: &Value) -> Option<String> {
        let s = t.get("text")?.as_str()?;
        Some(match t.get("type").and_then(Value::as_str) {
            Some("plain_text") => mrkdwn::escape(s),
            _ => s.to_string(),
        })
    }
    let mut lines = Vec::new();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("section") => {
                if let Some(t) = b.get("text").and_then(text_of) {
                    lines.push(t);
                }
                if let Some(fields) = b.get("fields").and_then(Value::as_array) {
                    let row: Vec<String> = fields.iter().filter_map(text_of).collect();
                    lines.push(row.join(" "));
                }
            }
            Some("image") => {
                let t = b.get("title").and_then(text_of).or_else(|| {
                    b.get("alt_text")
                        .and_then(Value::as_str)
                        .map(mrkdwn::escape)
                });
                images.extend(t);
            }
            Some("header") => lines.extend(b.get("text").and_then(text_of)),
            Some("actions") => {
                for e in b
                    .get("elements")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    labels.extend(e.get("text").and_then(text_of));
                }
            }
            _ => {}
        }
    }
    lines.retain(|l| !l.trim().is_empty());
    // Images speak for themselves when there is text; without any, their names stand in.
    if lines.is_empty() {
        lines = images;
    }
    if lines.is_empty() {
        lines.push(labels.join(" | "));
    }
    let joined = lines.join("\n");
    if joined.trim().is_empty() {
        "(message)".to_string()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CardAction, SuggestedActions};

    fn msg(text: &str) -> Message {
        Message {
            address: Address {
                channel_id: "slack".into(),
                bot: Some(crate::model::Identity {
                    id: "B01".into(),
                    ..Default::default()
                }),
                user: Some(crate::model::Identity {
                    id: "U01".into(),
                    ..Default::default()
                }),
                conversation: Some(Conversation {
                    id: "C01".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            text: Some(text.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_file_shared_on_slack_goes_back_as_slack_file_others_by_image_url() {
        let mut m = msg("");
        for url in [
            "https://files.slack.com/files-pri/T1-F1/cat.png",
            "https://img.example/dog.png",
        ] {
            m.attachments.push(crate::model::Attachment {
                content_type: "image/png".into(),
                content_url: Some(url.into()),
                ..Default::default()
            });
        }
        let r = render_send(&m, None, &SlackConfig::default()).unwrap();
        let body = r.requests[0].body.value();
        let images: Vec<&serde_json::Value> = body["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "image")
            .collect();
        assert_eq!(images.len(), 2, "{body}");
        assert_eq!(
            images[0]["slack_file"],
            serde_json::json!({"url": "https://files.slack.com/files-pri/T1-F1/cat.png"})
        );
        assert!(images[0].get("image_url").is_none(), "{}", images[0]);
        assert_eq!(images[1]["image_url"], "https://img.example/dog.png");
        assert!(images[1].get("slack_file").is_none(), "{}", images[1]);
    }

    #[test]
    fn dropped_xml_tags_are_named_only_a_few_and_capped() {
        let tags: String = (0..2000)
            .map(|i| format!("<t{i}{}>x</t{i}{}>", "n".repeat(200), "n".repeat(200)))
            .collect();
        let mut m = msg(&tags);
        m.text_format = Some(TextFormat::Xml);
        let r = render_send(&m, None, &SlackConfig::default()).unwrap();
        let w = r
            .warnings
            .iter()
            .find(|w| w.code == "xml_tags_dropped")
            .unwrap();
        // Before: every one of the 2,000 names of 204 characters, about 400 KB.
        assert!(w.message.len() < 600, "{} bytes", w.message.len());
        assert!(w.message.contains("and 1995 more"), "{}", w.message);
    }

    #[test]
    fn text_only_message_and_request_envelope() {
        let config = SlackConfig {
            unfurl_links: Some(false),
            api_base_url: "http://127.0.0.1:9/api/".into(),
            ..Default::default()
        };
        let r = render_send(&msg("**hi** <you>"), None, &config).unwrap();
        assert_eq!(r.requests.len(), 1);
        let req = &r.requests[0];
        assert_eq!(req.url, "http://127.0.0.1:9/api/chat.postMessage");
        assert_eq!(req.credential, "B01");
        assert_eq!(
            req.rate,
            RateScopes(vec![
                RateScope::configured(
                    "slack:B01:C01",
                    Budget {
                        per_second: 1.0,
                        burst: 3
                    }
                ),
                RateScope::new("slack:B01", &[]),
            ])
        );
        assert_eq!(
            req.body.value(),
            json!({"channel": "C01", "text": "*hi* &lt;you&gt;", "unfurl_links": false})
        );
    }

    #[test]
    fn very_long_text_is_split_in_order() {
        let para = format!("{}\n\n", "word ".repeat(1000));
        let text = para.repeat(9);
        let r = render_send(&msg(&text), None, &SlackConfig::default()).unwrap();
        assert_eq!(r.requests.len(), 2);
        assert_eq!(r.warnings[0].code, "text_split");
        let joined: String = r
            .requests
            .iter()
            .map(|q| q.body.value()["text"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n\n");
        assert_eq!(joined.split_whitespace().count(), 9000);
        for q in &r.requests {
            assert!(q.body.value()["text"].as_str().unwrap().chars().count() <= MAX_TEXT_CHARS);
        }
    }

    #[test]
    fn block_characters_split_messages() {
        let mut m = msg(&"x ".repeat(7000));
        m.suggested_actions = Some(SuggestedActions {
            to: vec![],
            actions: vec![CardAction {
                kind: crate::model::ActionType::ImBack,
                title: Some("Yes".into()),
                value: Some("yes".into()),
                ..Default::default()
            }],
        });
        let r = render_send(&m, None, &SlackConfig::default()).unwrap();
        assert_eq!(r.requests.len(), 2, "{:?}", r.warnings);
        for q in &r.requests {
            let body = q.body.value();
            let blocks = body["blocks"].as_array().unwrap();
            assert!(blocks.iter().map(measure).sum::<usize>() <= MAX_BLOCK_CHARS);
            assert!(!q.body.value()["text"].as_str().unwrap().is_empty());
        }
        let body = r.requests[1].body.value();
        let last = body["blocks"].as_array().unwrap();
        assert_eq!(last.last().unwrap()["type"], "actions");
    }

    #[test]
    fn source_event_cannot_redirect_or_carry_a_token() {
        let mut m = msg("hi");
        m.source_event
            .insert("slack".into(), json!({"channel": "C99"}));
        assert!(render_send(&m, None, &SlackConfig::default()).is_err());
        m.source_event
            .insert("slack".into(), json!({"token": "xoxb"}));
        assert!(render_send(&m, None, &SlackConfig::default()).is_err());
        m.source_event.insert("slack".into(), json!("text"));
        assert!(render_send(&m, None, &SlackConfig::default()).is_err());
        m.source_event.insert(
            "slack".into(),
            json!({"thread_ts": null, "unfurl_media": false}),
        );
        m.address.thread_id = Some("1.2".into());
        let r = render_send(&m, None, &SlackConfig::default()).unwrap();
        assert_eq!(
            r.requests[0].body.value(),
            json!({"channel": "C01", "text": "hi", "unfurl_media": false})
        );
    }

    #[test]
    fn the_shared_fallback_sets_only_postmessage_fields() {
        let mut m = msg("hi");
        let mut star = Map::new();
        star.insert("channel".into(), json!("C99"));
        star.insert("token".into(), json!("xoxb-secret"));
        star.insert("unfurl_links".into(), json!(false));
        for i in 0..20 {
            star.insert(format!("k{i:02}{}", "x".repeat(100)), json!(1));
        }
        m.source_event.insert("*".into(), Value::Object(star));
        let r = render_send(&m, None, &SlackConfig::default()).unwrap();
        assert_eq!(
            r.requests[0].body.value(),
            json!({"channel": "C01", "text": "hi", "unfurl_links": false})
        );
        assert_eq!(r.warnings.len(), 1);
        let w = &r.warnings[0];
        assert_eq!(w.code, "source_event_keys_dropped");
        assert!(w.message.starts_with("`channel`, `k00"), "{}", w.message);
        assert!(
            w.message.contains("…` and 17 more are not"),
            "{}",
            w.message
        );
        assert!(w.message.len() < 1000, "{}", w.message.len());
        assert!(!w.message.contains("xoxb"), "only the key is named");
    }

    #[test]
    fn empty_and_ephemeral_messages_are_refused() {
        let mut m = msg("");
        assert!(render_send(&m, None, &SlackConfig::default()).is_err());
        m.text = Some("hi".into());
        m.delivery_mode = Some(DeliveryMode::Ephemeral);
        assert!(render_send(&m, None, &SlackConfig::default()).is_err());
    }

    #[test]
    fn open_request_for_dm_and_group() {
        let mut m = msg("hi");
        m.address.conversation = None;
        let c = SlackConfig::default();
        let req = open_request(&m.address, &ProactiveOptions::default(), &c, "address").unwrap();
        assert_eq!(req.url, "https://slack.com/api/conversations.open");
        assert_eq!(req.body.value(), json!({"users": "U01"}));
        let members = (2..=9)
            .map(|i| crate::model::Identity {
                id: format!("U0{i}"),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let mut opts = ProactiveOptions {
            is_group: true,
            members: members[..2].to_vec(),
            ..Default::default()
        };
        let req = open_request(&m.address, &opts, &c, "address").unwrap();
        assert_eq!(req.body.value(), json!({"users": "U01,U02,U03"}));
        opts.members = members;
        assert!(open_request(&m.address, &opts, &c, "address").is_err());
        m.address.user = None;
        assert!(open_request(&m.address, &ProactiveOptions::default(), &c, "address").is_err());
    }

    #[test]
    fn capabilities_are_honest() {
        let c = capabilities("slack");
        assert!(!c.typing && c.carousel && c.update_delete && c.proactive);
        assert_eq!(c.markdown_flavor, "mrkdwn");
        assert_eq!(c.max_buttons_per_card, 25);
        assert_eq!(c.implementation, "slack");
    }
}
