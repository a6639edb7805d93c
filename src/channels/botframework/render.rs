//! Pure translation of the model into Bot Framework Connector v3 requests.
//!
//! Owns the Activity JSON (v3 REST schema, camelCase), the Connector URLs (sends, and the edits
//! and deletes of an activity sent), and fitting a message to a channel's documented limits
//! (reported as warnings). No I/O: the client sends what this
//! returns, attaching the credential named by `NativeRequest::credential`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::channels::update::Plan;
use crate::channels::{
    Body, Budget, Capabilities, HttpMethod, NativeReceipt, NativeRequest, ObjWriter, RateScope,
    RateScopes, RenderError, Rendered, text,
};
use crate::model::{
    ActionType, Address, AttachmentContent, AttachmentLayout, CONTENT_TYPE_HERO, CardAction,
    CardImage, Conversation, DeliveryMode, HeroCard, Identity, Importance, InputHint, MediaCard,
    Message, MessageType, ProactiveOptions, ReceiptCard, SendKind, TextFormat, Warning,
};

/// The largest activity the Connector accepts, serialized.
pub const MAX_ACTIVITY_BYTES: usize = 262_144;
/// Stands for the id of a conversation not created yet (Render of a proactive start).
pub const CONVERSATION_ID_PLACEHOLDER: &str = "{conversationId}";

const SKYPE: &str = "skype";
const TEAMS: &str = "msteams";
/// Buttons per hero / thumbnail card on Skype and Teams.
const CARD_BUTTONS_SKYPE_TEAMS: usize = 3;
/// Suggested actions (quick replies) on Teams.
const SUGGESTED_ACTIONS_TEAMS: usize = 5;
/// The activity size Teams is sure to take, in UTF-16 code units: Teams counts "the entire
/// message payload encoded as UTF-16", refuses about 100 KB with 413 `MessageSizeTooBig`, and
/// recommends staying within 80 KB "to guarantee successful message delivery"; earlier and
/// localized versions of the page said 40 KB. 80 KB of UTF-16 is 40,960 units.
/// <https://learn.microsoft.com/microsoftteams/platform/bots/how-to/format-your-bot-messages>
pub const TEAMS_MAX_UTF16_UNITS: usize = 40_960;
/// What the text's activity holds besides the text: `"text":"",` and some slack.
const TEAMS_TEXT_ROOM: usize = 64;
/// Below this, splitting the text would send a flood of tiny activities: refuse instead.
const TEAMS_MIN_TEXT_BUDGET: usize = 1000;

/// Teams' limits per bot per conversation ("thread"), from "Rate limiting for bots" (Teams
/// platform docs, learn.microsoft.com/microsoftteams/platform/bots/how-to/rate-limit): 7
/// operations per 1 s, 8 per 2 s, 60 per 30 s, 1,800 per 3,600 s. Each bucket lets its burst and
/// its rate over the window through, never more than the documented count in any window; the
/// bursts favour a bot's few quick replies, the rates a long stream (2/s, then 1.7/s, then
/// 1,500/h once the hour's burst is spent).
pub const TEAMS_PER_CONVERSATION: &[Budget] = &[
    Budget::window(7, 1, 4),
    Budget::window(8, 2, 4),
    Budget::window(60, 30, 10),
    Budget::window(1800, 3600, 300),
];
/// Teams' global limit per app per tenant, 50 requests per second (same page): smooth, since a
/// tenant's traffic comes from many conversations at once.
pub const TEAMS_PER_TENANT: &[Budget] = &[Budget::window(50, 1, 10)];

/// The Activity JSON for a message (Bot Framework v3 REST schema, camelCase), plus warnings for
/// the adaptations made to fit the channel. Fields that are unset or empty are left out.
pub fn activity(msg: &Message) -> Result<(Body, Vec<Warning>), RenderError> {
    let addr = &msg.address;
    let channel = addr.channel_id.as_str();
    let mut warnings = Vec::new();
    // Written straight to the bytes the connector receives: building a value tree first, then
    // serializing and dropping it, was about a seventh of the instructions per message.
    let mut o = ObjWriter::new();

    o.str("type", message_type(msg.kind));
    if let Some(bot) = &addr.bot {
        o.obj("from", |o| account(o, bot));
    }
    if let Some(user) = &addr.user {
        o.obj("recipient", |o| account(o, user));
    }
    if let Some(c) = &addr.conversation {
        o.obj("conversation", |o| conversation(o, c));
    }
    o.opt_str("replyToId", msg.reply_target());

    match RenderError::send_kind(msg)? {
        SendKind::Typing => {}
        SendKind::EndOfConversation => {
            o.opt_str("code", msg.code.as_deref());
            o.opt_str("text", msg.text.as_deref());
        }
        SendKind::Message | SendKind::Event => {
            message_fields(&mut o, msg, &mut warnings)?;
        }
    }
    if let Some(data) = msg.source_event_for(channel) {
        o.value("channelData", data);
    }

    let body = o.finish()?;
    // Teams' own, smaller limit is fitted by splitting the text (`fit_teams`).
    if body.len() > MAX_ACTIVITY_BYTES && channel != TEAMS {
        return Err(RenderError::invalid(
            "message",
            format!(
                "activity is {} bytes; the channel accepts at most {MAX_ACTIVITY_BYTES}",
                body.len()
            ),
        ));
    }
    Ok((body, warnings))
}

/// `POST {service_url}/v3/conversations/{conversationId}/activities`, or
/// `.../activities/{replyTarget}` when the message answers an activity (except on Skype, where the
/// v3 SDK never used the reply route). The credential is the address's bot id.
pub fn render_send(msg: &Message) -> Result<Rendered, RenderError> {
    let base = service_base(&msg.address, "message.address")?;
    let conversation_id = msg.address.conversation_id().ok_or_else(|| {
        RenderError::invalid(
            "message.address.conversation.id",
            "required: start a conversation with a proactive send first",
        )
    })?;
    let conversation_segment = segment(conversation_id, "message.address.conversation.id")?;
    send_request(msg, &base, &conversation_segment)
}

/// `POST {service_url}/v3/conversations` with `{bot, members, isGroup, topicName, tenantId}`.
/// Members are `address.user` followed by `options.members`.
pub fn render_create_conversation(
    address: &Address,
    options: &ProactiveOptions,
) -> Result<NativeRequest, RenderError> {
    create_request(address, options, "address")
}

/// Render of a proactive send whose address has no conversation: the create request, then each
/// message's send request with the literal placeholder `{conversationId}` in its URL and body.
/// The messages are rendered as the gateway sends them once the conversation exists: with the
/// address of the new conversation, which answers no activity (`address.id` is cleared).
pub fn render_proactive(
    messages: &[Message],
    options: &ProactiveOptions,
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
            "must be empty for a proactive start: the channel names the new conversation",
        ));
    }
    for (i, m) in messages.iter().enumerate().skip(1) {
        if m.address.channel_id != address.channel_id
            || m.address.service_url != address.service_url
            || m.address.conversation_id().is_some()
        {
            return Err(RenderError::invalid(
                format!("messages[{i}].address"),
                "every message of a proactive start must have the first message's address",
            ));
        }
    }

    let create = create_request(address, options, "message.address")?;
    let base = service_base(address, "message.address")?;
    let mut rendered = Rendered {
        requests: vec![create],
        warnings: Vec::new(),
    };
    for m in messages {
        let mut m = m.clone();
        let mut conv = m.address.conversation.take().unwrap_or_default();
        conv.id = CONVERSATION_ID_PLACEHOLDER.to_string();
        if options.is_group {
            conv.is_group = Some(true);
        }
        m.address.conversation = Some(conv);
        m.address.id = None;
        let r = send_request(&m, &base, CONVERSATION_ID_PLACEHOLDER)?;
        rendered.requests.extend(r.requests);
        rendered.warnings.extend(r.warnings);
    }
    Ok(rendered)
}

/// What the Bot Framework channel `channel_id` supports.
pub fn capabilities(channel_id: &str) -> Capabilities {
    let skype_or_teams = matches!(channel_id, SKYPE | TEAMS);
    Capabilities {
        channel_id: channel_id.to_string(),
        implementation: "botframework".to_string(),
        typing: true,
        typing_interval: Duration::from_secs(3),
        carousel: true,
        max_buttons_per_card: if skype_or_teams {
            CARD_BUTTONS_SKYPE_TEAMS as u32
        } else {
            0
        },
        max_suggested_actions: if channel_id == TEAMS {
            SUGGESTED_ACTIONS_TEAMS as u32
        } else {
            0
        },
        max_text_length: 0,
        markdown_flavor: if channel_id == SKYPE {
            "xml"
        } else {
            "markdown"
        }
        .to_string(),
        // Web Chat and Direct Line answer 405 to PUT and DELETE of an activity.
        update_delete: proactive_supported(channel_id),
        proactive: proactive_supported(channel_id),
        // Teams counts UTF-16 units: a body of this many UTF-8 bytes has at most as many, so it
        // always fits (longer text is split across activities).
        max_payload_bytes: if channel_id == TEAMS {
            TEAMS_MAX_UTF16_UNITS as u32
        } else {
            MAX_ACTIVITY_BYTES as u32
        },
        proactive_note: String::new(),
    }
}

/// Web Chat and Direct Line refuse create-conversation (only the user starts a conversation
/// there), and updates and deletes of an activity.
fn proactive_supported(channel_id: &str) -> bool {
    !matches!(channel_id, "webchat" | "directline")
}

// ---------------------------------------------------------------------------------------------
// Updates and deletes

/// How an activity the bot posted is edited and deleted: `PUT` (the activity again, with its
/// `id`) and `DELETE` of `{serviceUrl}/v3/conversations/{conversationId}/activities/{activityId}`,
/// named by the receipt of its send (the conversation its URL posted into, the id the connector
/// answered). The Connector's reference gives both routes ("Some channels allow you to edit an
/// existing activity"; delete answers a status and no body); Teams' "Update and delete messages
/// sent from bot" passes "a new Activity object with the existing activity ID", as the SDKs'
/// `updateActivity(conversationId, activity.id, activity)` do.
pub struct BotFrameworkEditor<'a> {
    pub address: &'a Address,
}

impl BotFrameworkEditor<'_> {
    /// The activity's URL, or `None` when its receipt names no activity (the connector answered
    /// its send without an id): nothing can address it then.
    fn activity_url(&self, receipt: &NativeReceipt) -> Result<Option<String>, RenderError> {
        if receipt.native_id.is_empty() {
            return Ok(None);
        }
        let base = service_base(self.address, "message.address")?;
        // Receipts name the conversation their send posted into; one without (none is made so
        // today) stands for the address's, where every send of the message went.
        let conversation = Some(receipt.conversation_id.as_str())
            .filter(|c| !c.is_empty())
            .or_else(|| self.address.conversation_id())
            .ok_or_else(|| {
                RenderError::invalid(
                    "message.address.conversation.id",
                    "required: the activity's conversation is unknown",
                )
            })?;
        Ok(Some(format!(
            "{}/v3/conversations/{}/activities/{}",
            base.url,
            segment(conversation, "message.address.conversation.id")?,
            segment(&receipt.native_id, "message_id")?
        )))
    }
}

impl crate::channels::update::Editor for BotFrameworkEditor<'_> {
    fn edit(
        &self,
        send: &NativeRequest,
        receipt: &NativeReceipt,
    ) -> Result<Option<NativeRequest>, RenderError> {
        // Only a posted message activity becomes an edit: a create-conversation request has no
        // activity, and typing or an event is not something a person sees change.
        if send.method != HttpMethod::Post || conversation_in_url(&send.url).is_none() {
            return Ok(None);
        }
        let Value::Object(mut body) = send.body.value() else {
            return Ok(None);
        };
        if body.get("type").and_then(Value::as_str) != Some("message") {
            return Ok(None);
        }
        let Some(url) = self.activity_url(receipt)? else {
            return Ok(None);
        };
        body.insert("id".into(), Value::String(receipt.native_id.clone()));
        let body = Body::json(&body)?;
        // The id makes the activity a little longer than the one the send fitted to Teams'
        // size: past it, the activity is replaced (deleted, and posted again as sent).
        if self.address.channel_id == TEAMS && utf16_units(&body) > TEAMS_MAX_UTF16_UNITS {
            return Ok(None);
        }
        Ok(Some(NativeRequest {
            method: HttpMethod::Put,
            url,
            body,
            credential: send.credential.clone(),
            // Teams' rate-limit page lists no budget of its own for updates or deletes: each
            // counts as one more operation of the bot in that conversation, like a send.
            rate: send.rate.clone(),
        }))
    }

    fn delete(&self, receipt: &NativeReceipt) -> Result<NativeRequest, RenderError> {
        let url = self.activity_url(receipt)?.ok_or_else(|| {
            RenderError::invalid(
                "message_id",
                "one of its activities has no id (the connector answered its send without \
                 one): it cannot be deleted or changed",
            )
        })?;
        let base = service_base(self.address, "message.address")?;
        Ok(NativeRequest {
            method: HttpMethod::Delete,
            url,
            body: Body::default(),
            credential: self.address.bot_id().to_string(),
            rate: send_scopes(self.address, &base),
        })
    }
}

/// Web Chat and Direct Line answer 405 to PUT and DELETE of an activity (capabilities say
/// `update_delete` false, so the API refuses before this): refused here too, so a Render of an
/// update shows what the channel would do.
fn check_editable(address: &Address, verb: &str) -> Result<(), RenderError> {
    if proactive_supported(&address.channel_id) {
        Ok(())
    } else {
        Err(crate::channels::channel::cannot(&address.channel_id, verb))
    }
}

/// An update of a sent message: the activities its send would post now, mapped onto the
/// activities it became (`update::reconcile`).
pub fn render_update(msg: &Message, receipts: &[NativeReceipt]) -> Result<Plan, RenderError> {
    check_editable(&msg.address, "update")?;
    let sends = render_send(msg)?;
    crate::channels::update::reconcile(
        sends,
        receipts,
        &BotFrameworkEditor {
            address: &msg.address,
        },
    )
}

/// The deletion of every activity a sent message became.
pub fn render_delete(address: &Address, receipts: &[NativeReceipt]) -> Result<Plan, RenderError> {
    check_editable(address, "delete")?;
    crate::channels::update::delete_all(receipts, &BotFrameworkEditor { address })
}

// ---------------------------------------------------------------------------------------------
// Requests

fn send_request(
    msg: &Message,
    base: &ServiceBase,
    conversation_segment: &str,
) -> Result<Rendered, RenderError> {
    // Pushed rather than formatted: this runs for every message.
    let mut url = String::with_capacity(base.url.len() + conversation_segment.len() + 64);
    url.push_str(&base.url);
    url.push_str("/v3/conversations/");
    url.push_str(conversation_segment);
    url.push_str("/activities");
    if msg.address.channel_id != SKYPE
        && let Some(target) = msg.reply_target()
    {
        url.push('/');
        url.push_str(&segment(target, reply_target_field(msg))?);
    }
    let (body, mut warnings) = activity(msg)?;
    // UTF-8 bytes are never fewer than UTF-16 units: most activities need no count at all.
    let bodies = if msg.address.channel_id == TEAMS && body.len() > TEAMS_MAX_UTF16_UNITS {
        fit_teams(msg, body, &mut warnings)?
    } else {
        vec![body]
    };
    let credential = msg.address.bot_id();
    let rate = send_scopes(&msg.address, base);
    Ok(Rendered {
        requests: bodies
            .into_iter()
            .map(|body| NativeRequest {
                method: HttpMethod::Post,
                url: url.clone(),
                body,
                credential: credential.to_string(),
                rate: rate.clone(),
            })
            .collect(),
        warnings,
    })
}

/// An activity's size as Teams counts it: UTF-16 code units of its JSON.
fn utf16_units(body: &Body) -> usize {
    std::str::from_utf8(body.as_bytes()).map_or(body.len(), |s| text::len(s, text::utf16))
}

/// A Teams activity over `TEAMS_MAX_UTF16_UNITS`, as several that fit, in order: the text split
/// across activities of its own (each mention with the piece that names it), the attachments,
/// actions and everything else with the last piece (or after it, when they do not fit beside
/// it). Refused when what is not text is too big by itself: Teams would answer 413.
fn fit_teams(
    msg: &Message,
    body: Body,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Body>, RenderError> {
    let units = utf16_units(&body);
    if units <= TEAMS_MAX_UTF16_UNITS {
        return Ok(vec![body]);
    }
    let too_big = |units: usize, what: &str| {
        let field = if msg.attachments.is_empty() {
            "message"
        } else {
            "message.attachments"
        };
        RenderError::invalid(
            field,
            format!(
                "the activity is {units} UTF-16 units{what}; Teams takes {TEAMS_MAX_UTF16_UNITS} (80 KB as UTF-16) for sure and refuses about 100 KB: send less in one message"
            ),
        )
    };
    let text = msg
        .text
        .as_deref()
        .filter(|t| !t.trim().is_empty() && msg.kind == MessageType::Message)
        .ok_or_else(|| too_big(units, ""))?;
    let is_mention = |e: &Value| e.get("type").and_then(Value::as_str) == Some("mention");
    let mention_text = |e: &Value| {
        e.get("text")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(String::from)
    };
    // A text-only activity with every mention is the most a piece's neighbours can weigh.
    let envelope = text_part(
        msg,
        "",
        msg.entities.iter().filter(|e| is_mention(e)).cloned(),
    );
    let budget = TEAMS_MAX_UTF16_UNITS
        .saturating_sub(utf16_units(&activity(&envelope)?.0))
        .saturating_sub(TEAMS_TEXT_ROOM);
    if budget < TEAMS_MIN_TEXT_BUDGET {
        return Err(too_big(units, " and leaves no room for its text"));
    }
    let pieces = text::split(text, budget, text::json_utf16);
    let Some((last, first)) = pieces.split_last() else {
        return Err(too_big(units, ""));
    };
    let mut placed = vec![false; msg.entities.len()];
    let mut mentions_in = |piece: &str| {
        let mut out = Vec::new();
        for (k, e) in msg.entities.iter().enumerate() {
            if !placed[k] && is_mention(e) && mention_text(e).is_some_and(|t| piece.contains(&t)) {
                placed[k] = true;
                out.push(e.clone());
            }
        }
        out
    };
    let mut parts: Vec<Message> = first
        .iter()
        .map(|p| text_part(msg, p, mentions_in(p)))
        .collect();
    let last_mentions = mentions_in(last);
    let rest_entities = |extra: Vec<Value>| {
        extra
            .into_iter()
            .chain(
                msg.entities
                    .iter()
                    .zip(&placed)
                    .filter(|(_, p)| !**p)
                    .map(|(e, _)| e.clone()),
            )
            .collect::<Vec<_>>()
    };
    let mut with_last = msg.clone();
    with_last.text = Some(last.clone());
    with_last.entities = rest_entities(last_mentions.clone());
    let (b, _) = activity(&with_last)?;
    let mut bodies = Vec::with_capacity(parts.len() + 2);
    if utf16_units(&b) <= TEAMS_MAX_UTF16_UNITS {
        parts.push(with_last);
    } else {
        parts.push(text_part(msg, last, last_mentions));
        let mut rest = msg.clone();
        rest.text = None;
        rest.entities = rest_entities(Vec::new());
        let (b, _) = activity(&rest)?;
        let rest_units = utf16_units(&b);
        if rest_units > TEAMS_MAX_UTF16_UNITS {
            return Err(too_big(rest_units, " without its text"));
        }
        parts.push(rest);
    }
    for p in &parts {
        let (b, _) = activity(p)?;
        if utf16_units(&b) > TEAMS_MAX_UTF16_UNITS {
            return Err(too_big(units, ""));
        }
        bodies.push(b);
    }
    warnings.push(Warning::new(
        "text_split",
        "message.text",
        format!(
            "the activity is {units} UTF-16 units; Teams takes {TEAMS_MAX_UTF16_UNITS} (80 KB as UTF-16) for sure and refuses about 100 KB with 413: sent as {} activities in order, the text split at paragraph, sentence or word boundaries, the rest with the last",
            bodies.len()
        ),
    ));
    Ok(bodies)
}

/// One piece of a split text as an activity of its own: the message's address, reply target,
/// text format, locale, importance, delivery mode and channel data (Teams reads the tenant and
/// notification settings there), without its attachments, actions or other entities.
fn text_part(msg: &Message, piece: &str, entities: impl IntoIterator<Item = Value>) -> Message {
    Message {
        kind: MessageType::Message,
        address: msg.address.clone(),
        text: Some(piece.to_string()),
        text_format: msg.text_format,
        text_locale: msg.text_locale.clone(),
        entities: entities.into_iter().collect(),
        source_event: msg.source_event.clone(),
        importance: msg.importance,
        delivery_mode: msg.delivery_mode,
        reply_to_id: msg.reply_to_id.clone(),
        ..Default::default()
    }
}

/// A send's rate scopes: its conversation (Teams: per bot per conversation), the bot's tenant
/// (Teams: per app per tenant), then the service host. Only Teams documents budgets; on every
/// channel a 429 pauses the conversation alone until 429s repeat across the host's
/// conversations (see `delivery::rate`).
fn send_scopes(address: &Address, base: &ServiceBase) -> RateScopes {
    let teams = address.channel_id == TEAMS;
    let bot = address.bot_id();
    // The bot id's length keeps (bot `a/b`, conversation `c`) apart from (`a`, `b/c`).
    let prefix = format!("{}/{}:{bot}/", base.scope, bot.len());
    let conversation = address.conversation_id().unwrap_or_default();
    let mut levels = Vec::with_capacity(3);
    levels.push(RateScope::new(
        format!("{prefix}c/{conversation}"),
        if teams { TEAMS_PER_CONVERSATION } else { &[] },
    ));
    if teams && let Some(tenant) = tenant_id(address) {
        levels.push(RateScope::new(
            format!("{prefix}t/{tenant}"),
            TEAMS_PER_TENANT,
        ));
    }
    levels.push(RateScope::new(base.scope.clone(), &[]));
    RateScopes(levels)
}

/// The tenant of an address: its conversation's, else its user's or its bot's.
fn tenant_id(address: &Address) -> Option<&str> {
    [
        address
            .conversation
            .as_ref()
            .and_then(|c| c.tenant_id.as_deref()),
        address.user.as_ref().and_then(|u| u.tenant_id.as_deref()),
        address.bot.as_ref().and_then(|b| b.tenant_id.as_deref()),
    ]
    .into_iter()
    .flatten()
    .find(|t| !t.is_empty())
}

fn create_request(
    address: &Address,
    options: &ProactiveOptions,
    prefix: &str,
) -> Result<NativeRequest, RenderError> {
    if !proactive_supported(&address.channel_id) {
        return Err(RenderError::invalid(
            format!("{prefix}.channel_id"),
            format!(
                "channel `{}` does not let a bot start a conversation; send in a conversation the user started",
                address.channel_id
            ),
        ));
    }
    let base = service_base(address, prefix)?;

    let mut members = Vec::with_capacity(1 + options.members.len());
    if let Some(user) = address.user.as_ref().filter(|u| !u.id.is_empty()) {
        members.push(user);
    }
    for (i, m) in options.members.iter().enumerate() {
        if m.id.is_empty() {
            return Err(RenderError::invalid(
                format!("options.members[{i}].id"),
                "required",
            ));
        }
        members.push(m);
    }
    if members.is_empty() {
        return Err(RenderError::invalid(
            format!("{prefix}.user.id"),
            "required to start a conversation",
        ));
    }

    let tenant_id = tenant_id(address);

    let mut o = ObjWriter::new();
    if let Some(bot) = &address.bot {
        o.obj("bot", |o| account(o, bot));
    }
    o.objs("members", &members, |o, m| account(o, m));
    o.bool("isGroup", options.is_group);
    o.opt_str("topicName", options.topic_name.as_deref());
    o.opt_str("tenantId", tenant_id);
    Ok(NativeRequest {
        method: HttpMethod::Post,
        url: format!("{}/v3/conversations", base.url),
        body: o.finish()?,
        credential: address.bot_id().to_string(),
        rate: RateScopes(vec![RateScope::new(base.scope.clone(), &[])]),
    })
}

/// A checked service URL: parsed once per message, it gives both the request URL and the rate scope.
#[derive(Clone)]
struct ServiceBase {
    /// Without trailing slashes, so a path can be appended.
    url: String,
    /// The rate scope of its host, `botframework:{host}`.
    scope: Arc<str>,
}

/// The service URL, checked to be an absolute http(s) URL that a path can be appended to.
fn service_base(address: &Address, prefix: &str) -> Result<Arc<ServiceBase>, RenderError> {
    // Named only when something is wrong: this runs for every message.
    let field = || format!("{prefix}.service_url");
    let raw = address
        .service_url
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RenderError::invalid(field(), "required"))?;
    // A bot talks to a handful of service URLs (one per region or channel), so each thread
    // keeps the last one it checked: parsing it was ~1% of the gateway's CPU.
    thread_local! {
        static LAST: std::cell::RefCell<Option<(String, Arc<ServiceBase>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let hit = LAST.with_borrow(|last| {
        last.as_ref()
            .filter(|(s, _)| s == raw)
            .map(|(_, base)| base.clone())
    });
    if let Some(base) = hit {
        return Ok(base);
    }
    let base = Arc::new(check_service_url(raw, &field())?);
    LAST.with_borrow_mut(|last| *last = Some((raw.to_string(), base.clone())));
    Ok(base)
}

fn check_service_url(raw: &str, field: &str) -> Result<ServiceBase, RenderError> {
    let parsed = url::Url::parse(raw)
        .map_err(|e| RenderError::invalid(field, format!("not an absolute URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(RenderError::invalid(
            field,
            format!("must be an http(s) URL, got `{raw}`"),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(RenderError::invalid(field, "must not carry credentials"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(RenderError::invalid(
            field,
            "must not have a query or fragment",
        ));
    }
    Ok(ServiceBase {
        url: parsed.as_str().trim_end_matches('/').to_string(),
        scope: format!("botframework:{}", parsed.host_str().unwrap_or_default()).into(),
    })
}

/// `id` percent-encoded as one path segment: everything but the unreserved characters
/// `A-Z a-z 0-9 - . _ ~` is encoded. `.` and `..` are refused: URL parsers resolve them (even
/// encoded), which would send the request to another resource.
fn segment(id: &str, field: &str) -> Result<String, RenderError> {
    if id == "." || id == ".." {
        return Err(RenderError::invalid(
            field,
            format!("`{id}` cannot be used as an id in a URL"),
        ));
    }
    Ok(percent_encode(id))
}

fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// The conversation id an activities URL (`.../conversations/{id}/activities[/{reply}]`)
/// posts into, decoded: the receipt reports it without reading the body back. Read from the
/// end, since the service URL before it may hold anything and encoded segments hold no `/`.
pub fn conversation_in_url(url: &str) -> Option<String> {
    let (mut next, mut after_next) = ("", "");
    let mut found = None;
    for s in url.rsplit('/') {
        if s == "conversations" && after_next == "activities" {
            found = Some(next);
            break;
        }
        (next, after_next) = (s, next);
    }
    let encoded = found?.as_bytes();
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match encoded[i] {
            b'%' if i + 2 < encoded.len() => {
                let (hi, lo) = (hex(encoded[i + 1])?, hex(encoded[i + 2])?);
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'%' => return None,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn reply_target_field(msg: &Message) -> &'static str {
    if msg.reply_to_id.as_deref().is_some_and(|s| !s.is_empty()) {
        "message.reply_to_id"
    } else {
        "message.address.id"
    }
}

// ---------------------------------------------------------------------------------------------
// Activity

fn message_fields(
    o: &mut ObjWriter,
    msg: &Message,
    warnings: &mut Vec<Warning>,
) -> Result<(), RenderError> {
    let channel = msg.address.channel_id.as_str();
    o.opt_str("text", msg.text.as_deref());
    if let Some(format) = msg.text_format {
        // Teams renders its subset of XML / HTML tags too.
        if format == TextFormat::Xml && channel != SKYPE && channel != TEAMS {
            warnings.push(Warning::new(
                "xml_not_supported",
                "message.text_format",
                format!(
                    "textFormat xml renders only on skype and msteams; channel `{channel}` may show the markup as text"
                ),
            ));
        }
        o.str("textFormat", text_format(format));
    }
    o.opt_str("locale", msg.text_locale.as_deref());
    o.list("attachments", &attachments(msg, warnings)?);
    o.opt_str(
        "attachmentLayout",
        msg.attachment_layout.map(attachment_layout),
    );
    if let Some(sa) = &msg.suggested_actions {
        let mut actions = sa.actions.as_slice();
        if channel == TEAMS && actions.len() > SUGGESTED_ACTIONS_TEAMS {
            warnings.push(Warning::new(
                "suggested_actions_truncated",
                "message.suggested_actions.actions",
                format!(
                    "{} suggested actions; {channel} shows at most {SUGGESTED_ACTIONS_TEAMS}: kept the first {SUGGESTED_ACTIONS_TEAMS}",
                    actions.len()
                ),
            ));
            actions = &actions[..SUGGESTED_ACTIONS_TEAMS];
        }
        o.obj("suggestedActions", |o| {
            o.list("to", &sa.to);
            o.list(
                "actions",
                &actions.iter().map(card_action).collect::<Vec<_>>(),
            );
        });
    }
    o.opt_str("inputHint", msg.input_hint.map(input_hint));
    o.opt_str("summary", msg.summary.as_deref());
    o.opt_str("speak", msg.speak.as_deref());
    o.list("entities", &msg.entities);
    if let Some(v) = &msg.value {
        o.value("value", v);
    }
    o.opt_str("valueType", msg.value_type.as_deref());
    o.opt_str("name", msg.name.as_deref());
    o.opt_str("code", msg.code.as_deref());
    o.opt_str("importance", msg.importance.map(importance));
    o.opt_str("deliveryMode", msg.delivery_mode.map(delivery_mode));
    if let Some(t) = msg.expiration {
        o.str(
            "expiration",
            &rfc3339(t.to_offset(UtcOffset::UTC), "message.expiration")?,
        );
    }
    o.opt_str("label", msg.label.as_deref());
    if let Some(t) = msg.local_timestamp {
        o.str("localTimestamp", &rfc3339(t, "message.local_timestamp")?);
    }
    o.opt_str("localTimezone", msg.local_timezone.as_deref());
    o.list("listenFor", &msg.listen_for);
    o.objs("textHighlights", &msg.text_highlights, |o, h| {
        o.str("text", &h.text);
        if let Some(n) = h.occurrence {
            o.value("occurrence", &Value::from(n));
        }
    });
    Ok(())
}

/// The attachments, with hero / thumbnail cards over the channel's button limit split: the first
/// buttons stay on the card, the rest continue on button-only hero cards right after it.
fn attachments(msg: &Message, warnings: &mut Vec<Warning>) -> Result<Vec<Value>, RenderError> {
    let channel = msg.address.channel_id.as_str();
    let max_buttons = matches!(channel, SKYPE | TEAMS).then_some(CARD_BUTTONS_SKYPE_TEAMS);
    let mut out = Vec::with_capacity(msg.attachments.len());
    for (i, a) in msg.attachments.iter().enumerate() {
        let content_type = if a.content_type.is_empty() {
            a.content
                .as_ref()
                .and_then(AttachmentContent::implied_content_type)
                .ok_or_else(|| {
                    RenderError::invalid(
                        format!("message.attachments[{i}].content_type"),
                        "required: the channel needs a media type for this attachment",
                    )
                })?
        } else {
            a.content_type.as_str()
        };
        let (card, variant) = match &a.content {
            Some(AttachmentContent::Hero(c)) => (Some(c), "hero"),
            Some(AttachmentContent::Thumbnail(c)) => (Some(c), "thumbnail"),
            _ => (None, ""),
        };
        let split = match (card, max_buttons) {
            (Some(card), Some(max)) if card.buttons.len() > max => Some((card, max)),
            _ => None,
        };
        let mut x = Obj::default();
        x.put("contentType", content_type);
        x.put_opt("contentUrl", a.content_url.as_deref());
        x.put_opt("name", a.name.as_deref());
        x.put_opt("thumbnailUrl", a.thumbnail_url.as_deref());
        let Some((card, max)) = split else {
            x.put_opt("content", a.content.as_ref().map(content));
            out.push(x.into_value());
            continue;
        };
        x.put("content", hero_card(card, &card.buttons[..max]));
        out.push(x.into_value());
        let rest = &card.buttons[max..];
        let extra = rest.len().div_ceil(max);
        for chunk in rest.chunks(max) {
            let mut c = Obj::default();
            c.put("contentType", CONTENT_TYPE_HERO);
            c.put("content", hero_card(&HeroCard::default(), chunk));
            out.push(c.into_value());
        }
        let moved = if rest.len() == 1 {
            format!("button {} continues", max + 1)
        } else {
            format!("buttons {}-{} continue", max + 1, card.buttons.len())
        };
        warnings.push(Warning::new(
            "buttons_split",
            format!("message.attachments[{i}].{variant}.buttons"),
            format!(
                "{} buttons; {channel} shows at most {max} per card: {moved} on {extra} button-only hero card{} right after it",
                card.buttons.len(),
                if extra == 1 { "" } else { "s" },
            ),
        ));
    }
    Ok(out)
}

fn content(c: &AttachmentContent) -> Value {
    match c {
        AttachmentContent::Hero(card) | AttachmentContent::Thumbnail(card) => {
            hero_card(card, &card.buttons)
        }
        AttachmentContent::Receipt(card) => receipt_card(card),
        AttachmentContent::Signin(card) => {
            let mut o = Obj::default();
            o.put_opt("text", card.text.as_deref());
            o.put("buttons", card_actions(&card.buttons));
            o.into_value()
        }
        AttachmentContent::Oauth(card) => {
            let mut o = Obj::default();
            o.put_opt("text", card.text.as_deref());
            o.put("connectionName", card.connection_name.as_str());
            o.put("buttons", card_actions(&card.buttons));
            o.into_value()
        }
        AttachmentContent::Animation(card)
        | AttachmentContent::Audio(card)
        | AttachmentContent::Video(card) => media_card(card),
        AttachmentContent::Json(v) => v.clone(),
    }
}

/// A hero or thumbnail card with the given buttons (a split card keeps only some of its own).
fn hero_card(card: &HeroCard, buttons: &[CardAction]) -> Value {
    let mut o = Obj::default();
    o.put_opt("title", card.title.as_deref());
    o.put_opt("subtitle", card.subtitle.as_deref());
    o.put_opt("text", card.text.as_deref());
    o.put(
        "images",
        card.images.iter().map(card_image).collect::<Vec<_>>(),
    );
    o.put("buttons", card_actions(buttons));
    o.put_opt("tap", card.tap.as_ref().map(card_action));
    o.into_value()
}

fn receipt_card(card: &ReceiptCard) -> Value {
    let mut o = Obj::default();
    o.put_opt("title", card.title.as_deref());
    let facts: Vec<Value> = card
        .facts
        .iter()
        .map(|f| {
            let mut x = Obj::default();
            x.put("key", f.key.as_str());
            x.put("value", f.value.as_str());
            x.into_value()
        })
        .collect();
    o.put("facts", facts);
    let items: Vec<Value> = card
        .items
        .iter()
        .map(|it| {
            let mut x = Obj::default();
            x.put_opt("title", it.title.as_deref());
            x.put_opt("subtitle", it.subtitle.as_deref());
            x.put_opt("text", it.text.as_deref());
            x.put_opt("image", it.image.as_ref().map(card_image));
            x.put_opt("price", it.price.as_deref());
            x.put_opt("quantity", it.quantity.as_deref());
            x.put_opt("tap", it.tap.as_ref().map(card_action));
            x.into_value()
        })
        .collect();
    o.put("items", items);
    o.put_opt("tap", card.tap.as_ref().map(card_action));
    o.put_opt("total", card.total.as_deref());
    o.put_opt("tax", card.tax.as_deref());
    o.put_opt("vat", card.vat.as_deref());
    o.put("buttons", card_actions(&card.buttons));
    o.into_value()
}

fn media_card(card: &MediaCard) -> Value {
    let mut o = Obj::default();
    o.put_opt("title", card.title.as_deref());
    o.put_opt("subtitle", card.subtitle.as_deref());
    o.put_opt("text", card.text.as_deref());
    if let Some(img) = &card.image {
        let mut x = Obj::default();
        x.put("url", img.url.as_str());
        x.put_opt("alt", img.alt.as_deref());
        o.put("image", x.into_value());
    }
    let media: Vec<Value> = card
        .media
        .iter()
        .map(|m| {
            let mut x = Obj::default();
            x.put("url", m.url.as_str());
            x.put_opt("profile", m.profile.as_deref());
            x.into_value()
        })
        .collect();
    o.put("media", media);
    o.put("buttons", card_actions(&card.buttons));
    o.put_opt("shareable", card.shareable);
    o.put_opt("autoloop", card.autoloop);
    o.put_opt("autostart", card.autostart);
    o.put_opt("aspect", card.aspect.as_deref());
    o.put_opt("duration", card.duration.as_deref());
    o.put_opt("value", card.value.clone());
    o.into_value()
}

fn card_image(i: &CardImage) -> Value {
    let mut o = Obj::default();
    o.put("url", i.url.as_str());
    o.put_opt("alt", i.alt.as_deref());
    o.put_opt("tap", i.tap.as_ref().map(card_action));
    o.into_value()
}

fn card_actions(actions: &[CardAction]) -> Vec<Value> {
    actions.iter().map(card_action).collect()
}

/// A button, tap or suggested action. A v3 dialog action is a postBack of `action?NAME=DATA`.
fn card_action(a: &CardAction) -> Value {
    let (kind, value) = match a.kind {
        ActionType::DialogAction => ("postBack", Some(Value::String(a.dialog_action_value()))),
        k => (action_type(k), a.value.clone()),
    };
    let mut o = Obj::default();
    o.put("type", kind);
    o.put_opt("title", a.title.as_deref());
    o.put_opt("value", value);
    o.put_opt("image", a.image.as_deref());
    o.put_opt("text", a.text.as_deref());
    o.put_opt("displayText", a.display_text.as_deref());
    o.put_opt("channelData", a.channel_data.clone());
    o.into_value()
}

/// A ChannelAccount: `tenant_id` is not part of it (it travels on the conversation).
fn account(o: &mut ObjWriter, i: &Identity) {
    o.str("id", &i.id);
    o.opt_str("name", i.name.as_deref());
    o.opt_str("role", i.role.as_deref());
    o.opt_str("aadObjectId", i.aad_object_id.as_deref());
}

fn conversation(o: &mut ObjWriter, c: &Conversation) {
    o.str("id", &c.id);
    o.opt_str("name", c.name.as_deref());
    o.opt_bool("isGroup", c.is_group);
    o.opt_str("conversationType", c.conversation_type.as_deref());
    o.opt_str("tenantId", c.tenant_id.as_deref());
}

fn rfc3339(t: OffsetDateTime, field: &str) -> Result<String, RenderError> {
    t.format(&Rfc3339)
        .map_err(|e| RenderError::invalid(field, format!("cannot be written as RFC 3339: {e}")))
}

fn message_type(k: MessageType) -> &'static str {
    match k {
        MessageType::Message => "message",
        MessageType::Typing => "typing",
        MessageType::EndOfConversation => "endOfConversation",
        MessageType::Event => "event",
        MessageType::ConversationUpdate => "conversationUpdate",
        MessageType::Invoke => "invoke",
        MessageType::MessageReaction => "messageReaction",
        MessageType::MessageUpdate => "messageUpdate",
        MessageType::MessageDelete => "messageDelete",
        MessageType::InstallationUpdate => "installationUpdate",
    }
}

fn text_format(f: TextFormat) -> &'static str {
    match f {
        TextFormat::Plain => "plain",
        TextFormat::Markdown => "markdown",
        TextFormat::Xml => "xml",
    }
}

fn attachment_layout(l: AttachmentLayout) -> &'static str {
    match l {
        AttachmentLayout::List => "list",
        AttachmentLayout::Carousel => "carousel",
    }
}

fn input_hint(h: InputHint) -> &'static str {
    match h {
        InputHint::AcceptingInput => "acceptingInput",
        InputHint::IgnoringInput => "ignoringInput",
        InputHint::ExpectingInput => "expectingInput",
    }
}

fn importance(i: Importance) -> &'static str {
    match i {
        Importance::Low => "low",
        Importance::Normal => "normal",
        Importance::High => "high",
    }
}

fn delivery_mode(d: DeliveryMode) -> &'static str {
    match d {
        DeliveryMode::Normal => "normal",
        DeliveryMode::Notification => "notification",
        DeliveryMode::ExpectReplies => "expectReplies",
        DeliveryMode::Ephemeral => "ephemeral",
    }
}

fn action_type(k: ActionType) -> &'static str {
    match k {
        ActionType::OpenUrl => "openUrl",
        ActionType::ImBack => "imBack",
        ActionType::PostBack | ActionType::DialogAction => "postBack",
        ActionType::Call => "call",
        ActionType::PlayAudio => "playAudio",
        ActionType::PlayVideo => "playVideo",
        ActionType::ShowImage => "showImage",
        ActionType::DownloadFile => "downloadFile",
        ActionType::Signin => "signin",
        ActionType::MessageBack => "messageBack",
    }
}

/// A JSON object that never holds null or empty values (`""`, `[]`, `{}`).
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(&mut self, key: &str, v: impl Into<Value>) {
        let v = v.into();
        if !crate::channels::body::is_empty(&v) {
            self.0.insert(key.to_string(), v);
        }
    }

    fn put_opt<T: Into<Value>>(&mut self, key: &str, v: Option<T>) {
        if let Some(v) = v {
            self.put(key, v);
        }
    }

    fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Attachment, CONTENT_TYPE_THUMBNAIL, SuggestedActions};

    /// The activity read back as a value: these tests check fields, not their order.
    fn activity(msg: &Message) -> Result<(Value, Vec<Warning>), RenderError> {
        super::activity(msg).map(|(body, warnings)| (body.value(), warnings))
    }

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap()
    }

    #[test]
    fn the_remembered_service_url_never_answers_for_another() {
        let with = |url: &str| Address {
            service_url: Some(url.into()),
            ..address("msteams")
        };
        let a = service_base(&with("https://a.example/amer/"), "m").unwrap();
        assert_eq!(
            (a.url.as_str(), &*a.scope),
            ("https://a.example/amer", "botframework:a.example")
        );
        let b = service_base(&with("https://b.example/emea"), "m").unwrap();
        assert_eq!(
            (b.url.as_str(), &*b.scope),
            ("https://b.example/emea", "botframework:b.example")
        );
        let err = service_base(&with("https://u:p@a.example/amer/"), "m").err();
        assert!(err.is_some(), "credentials refused after a good URL");
        let again = service_base(&with("https://a.example/amer/"), "m").unwrap();
        assert_eq!(again.url, "https://a.example/amer");
        assert!(service_base(&with("ftp://a.example/"), "m").is_err());
    }

    const SERVICE_URL: &str = "https://smba.trafficmanager.net/amer/";
    const TEAMS_CONVERSATION: &str = "a:1Xyz-9_AB;messageid=1596";

    fn address(channel_id: &str) -> Address {
        Address {
            channel_id: channel_id.to_string(),
            user: Some(Identity {
                id: "29:1UserAbc".into(),
                name: Some("Ada".into()),
                tenant_id: Some("tenant-user".into()),
                ..Default::default()
            }),
            bot: Some(Identity {
                id: "28:bot-app-id".into(),
                name: Some("Helper".into()),
                ..Default::default()
            }),
            conversation: Some(Conversation {
                id: TEAMS_CONVERSATION.into(),
                ..Default::default()
            }),
            service_url: Some(SERVICE_URL.into()),
            id: None,
            thread_id: None,
        }
    }

    fn text(channel_id: &str, text: &str) -> Message {
        Message {
            address: address(channel_id),
            text: Some(text.into()),
            ..Default::default()
        }
    }

    fn button(n: usize) -> CardAction {
        CardAction {
            kind: ActionType::ImBack,
            title: Some(format!("B{n}")),
            value: Some(json!(format!("b{n}"))),
            ..Default::default()
        }
    }

    fn hero_with_buttons(n: usize) -> Attachment {
        Attachment {
            content: Some(AttachmentContent::Hero(HeroCard {
                title: Some("Pick".into()),
                buttons: (1..=n).map(button).collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn url(r: &Rendered) -> &str {
        &r.requests[0].url
    }

    #[test]
    fn percent_encodes_everything_but_unreserved() {
        assert_eq!(percent_encode("AZaz09-._~"), "AZaz09-._~");
        assert_eq!(
            percent_encode("19:abc@thread.skype;messageid=1|x y/z?#%+"),
            "19%3Aabc%40thread.skype%3Bmessageid%3D1%7Cx%20y%2Fz%3F%23%25%2B"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode("{conversationId}"), "%7BconversationId%7D");
    }

    #[test]
    fn send_url_encodes_conversation_id_and_trims_slashes() {
        let mut m = text("msteams", "hi");
        m.address.service_url = Some("https://smba.trafficmanager.net/amer///".into());
        m.address.conversation.as_mut().unwrap().id = "19:abc@thread.skype".into();
        let r = render_send(&m).unwrap();
        assert_eq!(
            url(&r),
            "https://smba.trafficmanager.net/amer/v3/conversations/19%3Aabc%40thread.skype/activities"
        );
        assert_eq!(r.requests[0].method, HttpMethod::Post);
        assert_eq!(r.requests[0].credential, "28:bot-app-id");
        assert!(r.warnings.is_empty());
        // A host-only service URL has no path to trim.
        m.address.service_url = Some("https://webchat.botframework.com".into());
        assert!(
            url(&render_send(&m).unwrap())
                .starts_with("https://webchat.botframework.com/v3/conversations/")
        );
    }

    #[test]
    fn reply_goes_to_the_activity_route() {
        let mut m = text("msteams", "hi");
        m.address.id = Some("1596:f00|x".into());
        let r = render_send(&m).unwrap();
        assert_eq!(
            url(&r),
            "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1Xyz-9_AB%3Bmessageid%3D1596/activities/1596%3Af00%7Cx"
        );
        assert_eq!(r.requests[0].body.value()["replyToId"], "1596:f00|x");
        // reply_to_id overrides address.id.
        m.reply_to_id = Some("other".into());
        let r = render_send(&m).unwrap();
        assert!(url(&r).ends_with("/activities/other"));
        assert_eq!(r.requests[0].body.value()["replyToId"], "other");
    }

    #[test]
    fn without_reply_target_posts_to_the_conversation() {
        let mut m = text("msteams", "hi");
        m.address.id = Some(String::new());
        let r = render_send(&m).unwrap();
        assert!(url(&r).ends_with("/activities"));
        assert!(r.requests[0].body.value().get("replyToId").is_none());
    }

    #[test]
    fn skype_never_uses_the_reply_route() {
        let mut m = text("skype", "hi");
        m.address.service_url = Some("https://smba.trafficmanager.net/apis/".into());
        m.address.conversation.as_mut().unwrap().id = "8:live:ada".into();
        m.address.id = Some("1485983408511".into());
        let r = render_send(&m).unwrap();
        assert_eq!(
            url(&r),
            "https://smba.trafficmanager.net/apis/v3/conversations/8%3Alive%3Aada/activities"
        );
        // The body still says what it answers.
        assert_eq!(r.requests[0].body.value()["replyToId"], "1485983408511");
    }

    #[test]
    fn dot_segments_are_refused() {
        let mut m = text("msteams", "hi");
        m.address.conversation.as_mut().unwrap().id = "..".into();
        let e = render_send(&m).unwrap_err();
        assert!(
            matches!(&e, RenderError::InvalidArgument { field, .. } if field == "message.address.conversation.id"),
            "{e:?}"
        );
        let mut m = text("msteams", "hi");
        m.address.id = Some(".".into());
        let e = render_send(&m).unwrap_err();
        assert!(
            matches!(&e, RenderError::InvalidArgument { field, .. } if field == "message.address.id"),
            "{e:?}"
        );
        m.reply_to_id = Some("..".into());
        let e = render_send(&m).unwrap_err();
        assert!(
            matches!(&e, RenderError::InvalidArgument { field, .. } if field == "message.reply_to_id"),
            "{e:?}"
        );
        // Dots inside an id are fine.
        m.reply_to_id = Some("a..b".into());
        assert!(url(&render_send(&m).unwrap()).ends_with("/activities/a..b"));
    }

    fn invalid_field(r: Result<Rendered, RenderError>) -> String {
        match r {
            Err(RenderError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn service_url_is_required_and_checked() {
        for bad in [
            None,
            Some(""),
            Some("smba.trafficmanager.net/amer"),
            Some("/amer/"),
            Some("ftp://smba.trafficmanager.net/amer"),
            Some("mailto:bot@example.com"),
            Some("https://user:secret@smba.trafficmanager.net/amer"),
            Some("https://smba.trafficmanager.net/amer?x=1"),
            Some("https://smba.trafficmanager.net/amer#x"),
        ] {
            let mut m = text("msteams", "hi");
            m.address.service_url = bad.map(String::from);
            assert_eq!(
                invalid_field(render_send(&m)),
                "message.address.service_url",
                "{bad:?}"
            );
        }
        let mut m = text("emulator", "hi");
        m.address.service_url = Some("http://localhost:3978".into());
        assert!(url(&render_send(&m).unwrap()).starts_with("http://localhost:3978/v3/"));
    }

    #[test]
    fn conversation_id_is_required_to_send() {
        let mut m = text("msteams", "hi");
        m.address.conversation.as_mut().unwrap().id = String::new();
        assert_eq!(
            invalid_field(render_send(&m)),
            "message.address.conversation.id"
        );
        m.address.conversation = None;
        assert_eq!(
            invalid_field(render_send(&m)),
            "message.address.conversation.id"
        );
    }

    #[test]
    fn dialog_action_is_a_post_back_of_its_action_url() {
        let a = CardAction {
            kind: ActionType::DialogAction,
            title: Some("Help".into()),
            value: Some(json!("ignored")),
            dialog_name: Some("help".into()),
            dialog_data: Some("topic".into()),
            ..Default::default()
        };
        assert_eq!(
            card_action(&a),
            json!({"type": "postBack", "title": "Help", "value": "action?help=topic"})
        );
        let a = CardAction {
            dialog_data: None,
            ..a
        };
        assert_eq!(card_action(&a)["value"], "action?help");
    }

    #[test]
    fn action_types_are_camel_case() {
        let cases = [
            (ActionType::OpenUrl, "openUrl"),
            (ActionType::ImBack, "imBack"),
            (ActionType::PostBack, "postBack"),
            (ActionType::Call, "call"),
            (ActionType::PlayAudio, "playAudio"),
            (ActionType::PlayVideo, "playVideo"),
            (ActionType::ShowImage, "showImage"),
            (ActionType::DownloadFile, "downloadFile"),
            (ActionType::Signin, "signin"),
            (ActionType::MessageBack, "messageBack"),
        ];
        for (k, name) in cases {
            let a = CardAction {
                kind: k,
                ..Default::default()
            };
            assert_eq!(card_action(&a), json!({ "type": name }));
        }
    }

    #[test]
    fn teams_splits_buttons_three_per_card() {
        let mut m = text("msteams", "choose");
        m.attachments = vec![hero_with_buttons(7), hero_with_buttons(2)];
        let (body, warnings) = activity(&m).unwrap();
        let atts = body["attachments"].as_array().unwrap();
        assert_eq!(atts.len(), 4);
        let titles = |v: &Value| -> Vec<String> {
            v["content"]["buttons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["title"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(titles(&atts[0]), ["B1", "B2", "B3"]);
        assert_eq!(atts[0]["content"]["title"], "Pick");
        assert_eq!(titles(&atts[1]), ["B4", "B5", "B6"]);
        assert_eq!(titles(&atts[2]), ["B7"]);
        for a in &atts[1..3] {
            assert_eq!(a["contentType"], CONTENT_TYPE_HERO);
            assert_eq!(a["content"].as_object().unwrap().len(), 1, "{a}");
        }
        assert_eq!(titles(&atts[3]), ["B1", "B2"]);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].code, "buttons_split");
        assert_eq!(warnings[0].field, "message.attachments[0].hero.buttons");
    }

    #[test]
    fn skype_splits_thumbnail_buttons_into_hero_cards() {
        let mut m = text("skype", "choose");
        let mut a = hero_with_buttons(4);
        a.content_type = CONTENT_TYPE_THUMBNAIL.into();
        let Some(AttachmentContent::Hero(card)) = a.content.take() else {
            unreachable!()
        };
        a.content = Some(AttachmentContent::Thumbnail(card));
        m.attachments = vec![a];
        let (body, warnings) = activity(&m).unwrap();
        let atts = body["attachments"].as_array().unwrap();
        assert_eq!(atts.len(), 2);
        assert_eq!(atts[0]["contentType"], CONTENT_TYPE_THUMBNAIL);
        assert_eq!(atts[1]["contentType"], CONTENT_TYPE_HERO);
        assert_eq!(
            warnings[0].field,
            "message.attachments[0].thumbnail.buttons"
        );
    }

    #[test]
    fn three_buttons_or_other_channels_are_not_split() {
        let mut m = text("msteams", "choose");
        m.attachments = vec![hero_with_buttons(3)];
        let (body, warnings) = activity(&m).unwrap();
        assert_eq!(body["attachments"].as_array().unwrap().len(), 1);
        assert!(warnings.is_empty());
        let mut m = text("webchat", "choose");
        m.attachments = vec![hero_with_buttons(8)];
        let (body, warnings) = activity(&m).unwrap();
        assert_eq!(
            body["attachments"][0]["content"]["buttons"]
                .as_array()
                .unwrap()
                .len(),
            8
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn teams_keeps_five_suggested_actions() {
        let mut m = text("msteams", "pick");
        m.suggested_actions = Some(SuggestedActions {
            to: vec![],
            actions: (1..=7).map(button).collect(),
        });
        let (body, warnings) = activity(&m).unwrap();
        let actions = body["suggestedActions"]["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 5);
        assert_eq!(actions[4]["title"], "B5");
        assert!(body["suggestedActions"].get("to").is_none());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].code, "suggested_actions_truncated");
        assert_eq!(warnings[0].field, "message.suggested_actions.actions");

        m.address.channel_id = "webchat".into();
        let (body, warnings) = activity(&m).unwrap();
        assert_eq!(
            body["suggestedActions"]["actions"]
                .as_array()
                .unwrap()
                .len(),
            7
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn activity_over_the_payload_limit_is_refused() {
        // The envelope is a few hundred bytes: text of the full limit cannot fit.
        let m = text("webchat", &"x".repeat(MAX_ACTIVITY_BYTES));
        let e = activity(&m).unwrap_err();
        let RenderError::InvalidArgument { field, reason } = e else {
            panic!("{e:?}")
        };
        assert_eq!(field, "message");
        let len = MAX_ACTIVITY_BYTES
            + serde_json::to_vec(&activity(&text("webchat", "")).unwrap().0)
                .unwrap()
                .len()
            + r#","text":"""#.len();
        assert_eq!(
            reason,
            format!("activity is {len} bytes; the channel accepts at most 262144")
        );
        // Exactly at the limit is accepted.
        let envelope = len - MAX_ACTIVITY_BYTES;
        let m = text("msteams", &"x".repeat(MAX_ACTIVITY_BYTES - envelope));
        let (body, _) = activity(&m).unwrap();
        assert_eq!(serde_json::to_vec(&body).unwrap().len(), MAX_ACTIVITY_BYTES);
    }

    #[test]
    fn the_receipt_reads_the_conversation_back_from_the_url() {
        for id in [
            "19:abc@thread.tacv2",
            "a/b?c#d%e f",
            "a:b;messageid=1",
            "é😀",
        ] {
            let base = "https://smba.example/v3/conversations/x/amer";
            let url = format!(
                "{base}/v3/conversations/{}/activities/7",
                percent_encode(id)
            );
            assert_eq!(conversation_in_url(&url).as_deref(), Some(id), "{url}");
        }
        assert_eq!(conversation_in_url("https://a.example/v3/other"), None);
        assert_eq!(
            conversation_in_url("https://a.example/v3/conversations/%4"),
            None
        );
        assert_eq!(
            conversation_in_url("https://a.example/v3/conversations/%zz/a"),
            None
        );
    }

    #[test]
    fn teams_text_over_the_size_limit_is_split_with_each_mention_in_its_piece() {
        let para = format!("{}.", "word ".repeat(2000).trim_end());
        let mut m = text(
            "msteams",
            &format!("Hi <at>Ada</at>\n\n{para}\n\n{para}\n\n{para}\n\n{para}\n\n{para}\n\nbye"),
        );
        let mention =
            json!({"type": "mention", "text": "<at>Ada</at>", "mentioned": {"id": "29:1"}});
        let place = json!({"type": "place", "name": "HQ"});
        m.entities = vec![mention.clone(), place.clone()];
        m.attachments = vec![hero_with_buttons(1)];
        let r = render_send(&m).unwrap();
        assert!(r.requests.len() >= 2, "{}", r.requests.len());
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.warnings[0].code, "text_split");
        let bodies: Vec<Value> = r.requests.iter().map(|q| q.body.value()).collect();
        for (q, b) in r.requests.iter().zip(&bodies) {
            assert!(utf16_units(&q.body) <= TEAMS_MAX_UTF16_UNITS);
            assert_eq!(q.url, r.requests[0].url);
            assert_eq!(b["conversation"]["id"], TEAMS_CONVERSATION);
        }
        assert_eq!(bodies[0]["entities"], json!([mention]));
        let last = bodies.last().unwrap();
        assert_eq!(last["entities"], json!([place]));
        assert!(last.get("attachments").is_some());
        assert!(
            bodies[..bodies.len() - 1]
                .iter()
                .all(|b| b.get("attachments").is_none())
        );
        let joined: Vec<&str> = bodies.iter().map(|b| b["text"].as_str().unwrap()).collect();
        assert_eq!(
            joined.join("\n\n").split_whitespace().count(),
            m.text.as_deref().unwrap().split_whitespace().count()
        );
        // Other channels keep one activity (the connector's own limit is far above).
        m.address.channel_id = "webchat".into();
        assert_eq!(render_send(&m).unwrap().requests.len(), 1);
    }

    #[test]
    fn xml_warns_except_on_skype_and_teams() {
        let mut m = text("webchat", "<b>hi</b>");
        m.text_format = Some(TextFormat::Xml);
        let (body, warnings) = activity(&m).unwrap();
        assert_eq!(body["textFormat"], "xml");
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].code, "xml_not_supported");
        assert_eq!(warnings[0].field, "message.text_format");
        m.address.channel_id = "skype".into();
        assert!(activity(&m).unwrap().1.is_empty());
        m.address.channel_id = "msteams".into();
        assert!(activity(&m).unwrap().1.is_empty());
        m.text_format = Some(TextFormat::Markdown);
        m.address.channel_id = "webchat".into();
        assert!(activity(&m).unwrap().1.is_empty());
    }

    #[test]
    fn typing_carries_only_the_envelope() {
        let mut m = text("msteams", "ignored");
        m.kind = MessageType::Typing;
        m.address.id = Some("act1".into());
        m.summary = Some("ignored".into());
        m.code = Some("ignored".into());
        m.source_event
            .insert("*".into(), json!({"notification": {"alert": false}}));
        let (body, _) = activity(&m).unwrap();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "channelData",
                "conversation",
                "from",
                "recipient",
                "replyToId",
                "type"
            ]
        );
        assert_eq!(body["type"], "typing");
    }

    #[test]
    fn end_of_conversation_carries_code_and_text() {
        let mut m = text("msteams", "bye");
        m.kind = MessageType::EndOfConversation;
        m.code = Some("completedSuccessfully".into());
        m.summary = Some("ignored".into());
        let (body, _) = activity(&m).unwrap();
        assert_eq!(body["type"], "endOfConversation");
        assert_eq!(body["code"], "completedSuccessfully");
        assert_eq!(body["text"], "bye");
        assert!(body.get("summary").is_none());
    }

    #[test]
    fn identities_drop_tenant_and_empty_fields() {
        let mut m = text("msteams", "hi");
        m.address.user.as_mut().unwrap().aad_object_id = Some("00000000-aad".into());
        m.address.user.as_mut().unwrap().role = Some(String::new());
        let (body, _) = activity(&m).unwrap();
        assert_eq!(
            body["recipient"],
            json!({"id": "29:1UserAbc", "name": "Ada", "aadObjectId": "00000000-aad"})
        );
        assert_eq!(
            body["from"],
            json!({"id": "28:bot-app-id", "name": "Helper"})
        );
    }

    #[test]
    fn nothing_null_or_empty_is_emitted() {
        let mut m = text("webchat", "");
        m.value = Some(Value::Null);
        m.name = Some(String::new());
        m.suggested_actions = Some(SuggestedActions::default());
        m.source_event.insert("webchat".into(), json!({}));
        m.address.conversation.as_mut().unwrap().is_group = Some(false);
        let (body, _) = activity(&m).unwrap();
        assert_eq!(
            body,
            json!({
                "type": "message",
                "from": {"id": "28:bot-app-id", "name": "Helper"},
                "recipient": {"id": "29:1UserAbc", "name": "Ada"},
                "conversation": {"id": TEAMS_CONVERSATION, "isGroup": false},
            })
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let mut m = text("msteams", "hi");
        m.expiration = Some(at("2025-03-01T12:00:00+02:00"));
        m.local_timestamp = Some(at("2025-03-01T09:30:15.25-05:00"));
        let (body, _) = activity(&m).unwrap();
        assert_eq!(body["expiration"], "2025-03-01T10:00:00Z");
        assert_eq!(body["localTimestamp"], "2025-03-01T09:30:15.25-05:00");
    }

    #[test]
    fn source_event_prefers_the_channel_then_star() {
        let mut m = text("msteams", "hi");
        m.source_event.insert("*".into(), json!({"any": 1}));
        m.source_event.insert("msteams".into(), json!({"teams": 1}));
        assert_eq!(activity(&m).unwrap().0["channelData"], json!({"teams": 1}));
        m.address.channel_id = "webchat".into();
        assert_eq!(activity(&m).unwrap().0["channelData"], json!({"any": 1}));
    }

    #[test]
    fn attachment_without_any_content_type_is_refused() {
        let mut m = text("msteams", "hi");
        m.attachments = vec![Attachment {
            content_url: Some("https://example.com/a.png".into()),
            ..Default::default()
        }];
        let e = activity(&m).unwrap_err();
        assert_eq!(
            e,
            RenderError::invalid(
                "message.attachments[0].content_type",
                "required: the channel needs a media type for this attachment"
            )
        );
    }

    #[test]
    fn create_conversation_body_and_tenant_fallback() {
        let mut a = address("msteams");
        a.conversation = None;
        let options = ProactiveOptions {
            topic_name: Some("Standup".into()),
            is_group: true,
            members: vec![Identity {
                id: "29:2Other".into(),
                tenant_id: Some("ignored".into()),
                ..Default::default()
            }],
            message_tag: None,
        };
        let req = render_create_conversation(&a, &options).unwrap();
        assert_eq!(
            req.url,
            "https://smba.trafficmanager.net/amer/v3/conversations"
        );
        assert_eq!(req.credential, "28:bot-app-id");
        assert_eq!(
            req.body.value(),
            json!({
                "bot": {"id": "28:bot-app-id", "name": "Helper"},
                "members": [{"id": "29:1UserAbc", "name": "Ada"}, {"id": "29:2Other"}],
                "isGroup": true,
                "topicName": "Standup",
                "tenantId": "tenant-user",
            })
        );
        // The conversation's tenant wins, then the user's, then the bot's.
        a.conversation = Some(Conversation {
            tenant_id: Some("tenant-conv".into()),
            ..Default::default()
        });
        let req = render_create_conversation(&a, &ProactiveOptions::default()).unwrap();
        assert_eq!(req.body.value()["tenantId"], "tenant-conv");
        assert_eq!(req.body.value()["isGroup"], false);
        a.conversation = None;
        a.user.as_mut().unwrap().tenant_id = None;
        a.bot.as_mut().unwrap().tenant_id = Some("tenant-bot".into());
        let req = render_create_conversation(&a, &ProactiveOptions::default()).unwrap();
        assert_eq!(req.body.value()["tenantId"], "tenant-bot");
        a.bot.as_mut().unwrap().tenant_id = None;
        let req = render_create_conversation(&a, &ProactiveOptions::default()).unwrap();
        assert!(req.body.value().get("tenantId").is_none());
    }

    #[test]
    fn create_conversation_needs_a_member_and_a_willing_channel() {
        let mut a = address("msteams");
        a.user = None;
        let e = render_create_conversation(&a, &ProactiveOptions::default()).unwrap_err();
        assert!(
            matches!(&e, RenderError::InvalidArgument { field, .. } if field == "address.user.id")
        );
        for channel in ["webchat", "directline"] {
            let e = render_create_conversation(&address(channel), &ProactiveOptions::default())
                .unwrap_err();
            assert!(
                matches!(&e, RenderError::InvalidArgument { field, .. } if field == "address.channel_id"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn proactive_uses_the_placeholder_verbatim() {
        let mut m = text("msteams", "hello");
        m.address.conversation = Some(Conversation {
            tenant_id: Some("tenant-conv".into()),
            ..Default::default()
        });
        let mut second = m.clone();
        second.text = Some("again".into());
        let options = ProactiveOptions {
            is_group: true,
            ..Default::default()
        };
        let r = render_proactive(&[m.clone(), second], &options).unwrap();
        assert_eq!(r.requests.len(), 3);
        assert!(r.requests[0].url.ends_with("/v3/conversations"));
        for req in &r.requests[1..] {
            assert_eq!(
                req.url,
                "https://smba.trafficmanager.net/amer/v3/conversations/{conversationId}/activities"
            );
            assert_eq!(
                req.body.value()["conversation"],
                json!({"id": "{conversationId}", "isGroup": true, "tenantId": "tenant-conv"})
            );
        }
        assert_eq!(r.requests[2].body.value()["text"], "again");

        m.address.conversation = None;
        m.address.id = Some("old-activity".into());
        let r = render_proactive(&[m.clone()], &ProactiveOptions::default()).unwrap();
        assert!(r.requests[1].url.ends_with("/activities"));
        assert!(r.requests[1].body.value().get("replyToId").is_none());

        assert_eq!(invalid_field(render_proactive(&[], &options)), "messages");
        m.address.conversation = Some(Conversation {
            id: "19:abc@thread.skype".into(),
            ..Default::default()
        });
        assert_eq!(
            invalid_field(render_proactive(&[m], &options)),
            "message.address.conversation.id"
        );
    }

    fn receipt(id: &str) -> NativeReceipt {
        NativeReceipt {
            native_id: id.into(),
            conversation_id: TEAMS_CONVERSATION.into(),
        }
    }

    const ACTIVITY_URL: &str = "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1Xyz-9_AB%3Bmessageid%3D1596/activities";

    #[test]
    fn an_update_puts_the_activity_again_with_its_id_and_deletes_the_extra_ones() {
        use crate::channels::update::Step;
        let mut m = text("msteams", "the short answer");
        m.address.conversation.as_mut().unwrap().tenant_id = Some("tenant-1".into());
        let sent = [receipt("1:abc"), receipt("1:def"), receipt("1:ghi")];
        let plan = render_update(&m, &sent).unwrap();
        assert_eq!(
            plan.steps,
            [Step::Edit(0), Step::Delete(1), Step::Delete(2)]
        );
        let r = &plan.rendered.requests;
        let send = &render_send(&m).unwrap().requests[0];
        assert_eq!(r[0].method, HttpMethod::Put);
        assert_eq!(r[0].url, format!("{ACTIVITY_URL}/1%3Aabc"));
        // The send's activity, with the id of the one it replaces.
        let mut want = send.body.value();
        want["id"] = json!("1:abc");
        assert_eq!(r[0].body.value(), want);
        assert_eq!(r[0].body.value()["type"], "message");
        assert_eq!(
            (&r[0].credential, &r[0].rate),
            (&send.credential, &send.rate)
        );
        for (req, id) in r[1..].iter().zip(["1%3Adef", "1%3Aghi"]) {
            assert_eq!(req.method, HttpMethod::Delete);
            assert_eq!(req.url, format!("{ACTIVITY_URL}/{id}"));
            assert!(req.body.is_empty());
            assert_eq!(req.credential, "28:bot-app-id");
            // A delete counts against the conversation's and the tenant's budgets, as a send.
            assert_eq!(req.rate, send.rate);
        }
        assert_eq!(plan.rendered.warnings[0].code, "update_deletes");
        // A delete removes each activity, in order.
        let plan = render_delete(&m.address, &sent[..2]).unwrap();
        assert_eq!(plan.steps, [Step::Delete(0), Step::Delete(1)]);
        let urls: Vec<&str> = plan
            .rendered
            .requests
            .iter()
            .map(|r| r.url.as_str())
            .collect();
        assert_eq!(
            urls,
            [
                format!("{ACTIVITY_URL}/1%3Aabc"),
                format!("{ACTIVITY_URL}/1%3Adef")
            ]
        );
    }

    #[test]
    fn an_update_that_grows_edits_every_activity_then_posts_the_rest() {
        use crate::channels::update::Step;
        let para = format!("{}.", "word ".repeat(4000).trim_end());
        let m = text("msteams", &[para.as_str(); 5].join("\n\n"));
        let sends = render_send(&m).unwrap().requests;
        assert!(sends.len() >= 3, "{}", sends.len());
        let plan = render_update(&m, &[receipt("7")]).unwrap();
        assert_eq!(plan.steps[0], Step::Edit(0));
        assert!(plan.steps[1..].iter().all(|s| *s == Step::Send));
        let r = &plan.rendered.requests;
        assert_eq!(r.len(), sends.len());
        assert!(utf16_units(&r[0].body) <= TEAMS_MAX_UTF16_UNITS);
        for (got, send) in r[1..].iter().zip(&sends[1..]) {
            assert_eq!(
                (got.method, &got.url, &got.body),
                (HttpMethod::Post, &send.url, &send.body)
            );
        }
    }

    #[test]
    fn what_a_put_cannot_edit_is_left_to_the_plan() {
        use crate::channels::update::Editor;
        let a = address("msteams");
        let editor = BotFrameworkEditor { address: &a };
        let mut m = text("msteams", "typing");
        m.kind = MessageType::Typing;
        let typing = &render_send(&m).unwrap().requests[0];
        assert_eq!(editor.edit(typing, &receipt("1")).unwrap(), None);
        let create = render_create_conversation(&a, &ProactiveOptions::default()).unwrap();
        assert_eq!(editor.edit(&create, &receipt("1")).unwrap(), None);
        // An activity the connector gave no id cannot be named: not edited, and its delete
        // is refused (never a DELETE of the conversation's activities route).
        let send = &render_send(&text("msteams", "hi")).unwrap().requests[0];
        assert_eq!(editor.edit(send, &receipt("")).unwrap(), None);
        assert_eq!(
            invalid_field(editor.delete(&receipt("")).map(|_| Rendered::default())),
            "message_id"
        );
        assert_eq!(
            invalid_field(editor.delete(&receipt("..")).map(|_| Rendered::default())),
            "message_id"
        );
        // A receipt without its conversation stands for the address's.
        let d = editor
            .delete(&NativeReceipt {
                native_id: "9".into(),
                conversation_id: String::new(),
            })
            .unwrap();
        assert_eq!(d.url, format!("{ACTIVITY_URL}/9"));
    }

    #[test]
    fn web_chat_and_direct_line_refuse_updates_and_deletes() {
        for channel in ["webchat", "directline"] {
            let m = text(channel, "hi");
            for e in [
                render_update(&m, &[receipt("1")]).unwrap_err(),
                render_delete(&m.address, &[receipt("1")]).unwrap_err(),
            ] {
                assert!(
                    matches!(&e, RenderError::Unimplemented { reason, .. } if reason.contains(channel)),
                    "{e:?}"
                );
            }
        }
        for channel in ["msteams", "skype", "emulator"] {
            assert!(render_delete(&address(channel), &[receipt("1")]).is_ok());
        }
    }

    #[test]
    fn capabilities_per_channel() {
        let teams = capabilities("msteams");
        assert_eq!(teams.implementation, "botframework");
        assert_eq!(teams.channel_id, "msteams");
        assert!(teams.typing && teams.carousel && teams.update_delete && teams.proactive);
        assert_eq!(teams.typing_interval, Duration::from_secs(3));
        assert_eq!(teams.max_buttons_per_card, 3);
        assert_eq!(teams.max_suggested_actions, 5);
        assert_eq!(teams.max_text_length, 0);
        assert_eq!(teams.markdown_flavor, "markdown");
        assert_eq!(teams.max_payload_bytes, 40_960);

        let skype = capabilities("skype");
        assert_eq!(skype.max_buttons_per_card, 3);
        assert_eq!(skype.max_suggested_actions, 0);
        assert_eq!(skype.markdown_flavor, "xml");
        assert!(skype.proactive);

        for id in ["webchat", "directline"] {
            let c = capabilities(id);
            assert!(!c.proactive);
            assert_eq!(c.max_buttons_per_card, 0);
            assert_eq!(c.markdown_flavor, "markdown");
        }
        assert!(capabilities("emulator").proactive);
    }
}
