//! Proto <-> model conversion. Proto to model validates and collects every violation with the
//! field path the caller wrote (`message.attachments[0].hero.buttons[1].value`), so one call
//! reports all that is wrong. Model to proto serves the CLI, which reads the model's JSON form.

use std::collections::BTreeMap;
use std::fmt::{self, Display};

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::pb;
use crate::model::*;

/// Field violations found in a request, in the order met: the first `MAX_KEPT` of them, each
/// capped, and how many more there were. A request of 100k bad items once made a status of
/// 29.5 MB, more than a client reads, so the caller never saw why it was refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations {
    kept: Vec<(String, String)>,
    more: usize,
}

impl Violations {
    pub const MAX_KEPT: usize = 20;
    /// A field path is ours, but may carry a key from the request (`source_event["…"]`).
    const MAX_FIELD_CHARS: usize = 256;

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.kept.len() >= Self::MAX_KEPT {
            self.more += 1;
            return;
        }
        let mut field = field.into();
        let mut description = description.into();
        crate::bounded::cap_owned(&mut field, Self::MAX_FIELD_CHARS);
        crate::bounded::cap_owned(&mut description, crate::bounded::MAX_ECHO_CHARS);
        self.kept.push((field, description));
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The violations kept, in the order met.
    pub fn kept(&self) -> &[(String, String)] {
        &self.kept
    }

    /// How many violations were found past those kept.
    pub fn more(&self) -> usize {
        self.more
    }
}

/// A field path under `path`, written out only when a violation names it: formatting every
/// path of a message up front cost several allocations per message on the accept path.
pub(crate) struct Field<'a>(pub &'a dyn Display, pub &'static str);

impl Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// An item's path in a list (`messages[3]`), written out only when a violation names it.
pub(crate) struct Item(pub &'static str, pub usize);

impl Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

fn opt(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn check_url(v: &mut Violations, field: &dyn Display, s: &str) {
    // The same URLs come again and again (a bot's service URL, its image host): each thread
    // remembers the last one that passed, so it is not parsed for every message.
    thread_local! {
        static LAST_OK: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    if !s.is_empty() && LAST_OK.with_borrow(|last| last == s) {
        return;
    }
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            LAST_OK.with_borrow_mut(|last| s.clone_into(last));
        }
        Ok(u) => v.add(
            field.to_string(),
            format!("`{s}` must be an http(s) URL, not {}", u.scheme()),
        ),
        Err(e) => v.add(
            field.to_string(),
            format!("`{s}` is not an absolute URL: {e}"),
        ),
    }
}

fn opt_url(v: &mut Violations, field: &dyn Display, s: String) -> Option<String> {
    let s = opt(s)?;
    check_url(v, field, &s);
    Some(s)
}

pub fn value_to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            // Whole numbers stay integers so channels see `3`, not `3.0`.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
    }
}

pub fn struct_to_json(s: prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

pub fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a Struct; anything else becomes an empty Struct.
pub fn json_to_struct(v: &Value) -> prost_types::Struct {
    prost_types::Struct {
        fields: v
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), json_to_value(v)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn timestamp(
    v: &mut Violations,
    field: &dyn Display,
    t: prost_types::Timestamp,
) -> Option<OffsetDateTime> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => Some(t),
        Err(e) => {
            v.add(field.to_string(), format!("timestamp out of range: {e}"));
            None
        }
    }
}

/// The longest id or name in an address (channel, bot, user, conversation, tenant, message
/// ids and display names), in bytes. Channels' ids are tens to a few hundred bytes (Teams
/// conversation ids are the longest met); a longer one is not an id, and was accepted only to
/// fail at delivery.
pub const MAX_ID_BYTES: usize = 1024;
/// The longest `service_url`, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Most members a proactive start may name besides `address.user`.
pub const MAX_MEMBERS: usize = 100;
/// The largest a proactive start's options may be, encoded.
pub const MAX_OPTIONS_BYTES: usize = 16 << 10;

fn check_len(v: &mut Violations, field: &dyn Display, s: &str, max: usize) {
    if s.len() > max {
        v.add(
            field.to_string(),
            format!("{} bytes; at most {max}", s.len()),
        );
    }
}

fn check_identity(v: &mut Violations, path: &dyn Display, i: &Identity) {
    check_len(v, &Field(path, "id"), &i.id, MAX_ID_BYTES);
    for (name, value) in [
        ("name", &i.name),
        ("role", &i.role),
        ("aad_object_id", &i.aad_object_id),
        ("tenant_id", &i.tenant_id),
    ] {
        if let Some(value) = value {
            check_len(v, &Field(path, name), value, MAX_ID_BYTES);
        }
    }
}

fn identity(i: Option<pb::Identity>) -> Option<Identity> {
    let i = i?;
    let out = Identity {
        id: i.id,
        name: opt(i.name),
        role: opt(i.role),
        aad_object_id: opt(i.aad_object_id),
        tenant_id: opt(i.tenant_id),
    };
    (out != Identity::default()).then_some(out)
}

/// Converts an address; `channel_id` and `bot.id` are required everywhere.
pub fn address(v: &mut Violations, path: &dyn Display, a: Option<pb::Address>) -> Address {
    let Some(a) = a else {
        v.add(path.to_string(), "required");
        return Address::default();
    };
    if a.channel_id.is_empty() {
        v.add(format!("{path}.channel_id"), "required");
    }
    let bot = identity(a.bot);
    if bot.as_ref().is_none_or(|b| b.id.is_empty()) {
        v.add(
            format!("{path}.bot.id"),
            "required: it selects the bot's credentials",
        );
    }
    let conversation = a.conversation.and_then(|c| {
        let out = Conversation {
            id: c.id,
            name: opt(c.name),
            is_group: c.is_group,
            conversation_type: opt(c.conversation_type),
            tenant_id: opt(c.tenant_id),
        };
        (out != Conversation::default()).then_some(out)
    });
    check_len(v, &Field(path, "channel_id"), &a.channel_id, MAX_ID_BYTES);
    check_len(
        v,
        &Field(path, "service_url"),
        &a.service_url,
        MAX_URL_BYTES,
    );
    check_len(v, &Field(path, "id"), &a.id, MAX_ID_BYTES);
    check_len(v, &Field(path, "thread_id"), &a.thread_id, MAX_ID_BYTES);
    let user = identity(a.user);
    for (field, i) in [("user", &user), ("bot", &bot)] {
        if let Some(i) = i {
            check_identity(v, &Field(path, field), i);
        }
    }
    if let Some(c) = &conversation {
        let at = Field(path, "conversation");
        check_len(v, &Field(&at, "id"), &c.id, MAX_ID_BYTES);
        for (name, value) in [
            ("name", &c.name),
            ("conversation_type", &c.conversation_type),
            ("tenant_id", &c.tenant_id),
        ] {
            if let Some(value) = value {
                check_len(v, &Field(&at, name), value, MAX_ID_BYTES);
            }
        }
    }
    let service_url = if a.service_url.len() > MAX_URL_BYTES {
        None
    } else {
        opt_url(v, &Field(path, "service_url"), a.service_url)
    };
    Address {
        channel_id: a.channel_id,
        user,
        bot,
        conversation,
        service_url,
        id: opt(a.id),
        thread_id: opt(a.thread_id),
    }
}

fn action_type(t: i32) -> Option<ActionType> {
    use pb::ActionType as P;
    Some(match P::try_from(t).ok()? {
        P::Unspecified => return None,
        P::OpenUrl => ActionType::OpenUrl,
        P::ImBack => ActionType::ImBack,
        P::PostBack => ActionType::PostBack,
        P::Call => ActionType::Call,
        P::PlayAudio => ActionType::PlayAudio,
        P::PlayVideo => ActionType::PlayVideo,
        P::ShowImage => ActionType::ShowImage,
        P::DownloadFile => ActionType::DownloadFile,
        P::Signin => ActionType::Signin,
        P::MessageBack => ActionType::MessageBack,
        P::DialogAction => ActionType::DialogAction,
    })
}

fn action(v: &mut Violations, path: &dyn Display, a: pb::CardAction) -> CardAction {
    let kind = action_type(a.r#type).unwrap_or_else(|| {
        v.add(
            format!("{path}.type"),
            "required: one of the ACTION_TYPE_ values",
        );
        ActionType::OpenUrl
    });
    let value = match (a.value.is_empty(), a.value_object) {
        (false, Some(_)) => {
            v.add(
                format!("{path}.value_object"),
                "set either value or value_object, not both",
            );
            None
        }
        (_, Some(obj)) => Some(struct_to_json(obj)),
        (false, None) => Some(Value::String(a.value.clone())),
        (true, None) => None,
    };
    let vpath = Field(path, "value");
    if kind.takes_url() {
        match &value {
            Some(Value::String(s)) => check_url(v, &vpath, s),
            _ => v.add(vpath.to_string(), "required: a URL for this action type"),
        }
    } else if matches!(
        kind,
        ActionType::ImBack | ActionType::PostBack | ActionType::Call
    ) && value.is_none()
    {
        v.add(vpath.to_string(), "required for this action type");
    }
    if kind == ActionType::DialogAction && a.dialog_name.is_empty() {
        v.add(format!("{path}.dialog_name"), "required for dialog_action");
    }
    CardAction {
        kind,
        title: opt(a.title),
        value,
        image: opt_url(v, &Field(path, "image"), a.image),
        text: opt(a.text),
        display_text: opt(a.display_text),
        channel_data: a.channel_data.map(struct_to_json),
        dialog_name: opt(a.dialog_name),
        dialog_data: opt(a.dialog_data),
    }
}

fn actions(v: &mut Violations, path: &dyn Display, list: Vec<pb::CardAction>) -> Vec<CardAction> {
    list.into_iter()
        .enumerate()
        .map(|(i, a)| action(v, &format!("{path}[{i}]"), a))
        .collect()
}

fn tap(v: &mut Violations, path: &dyn Display, a: Option<pb::CardAction>) -> Option<CardAction> {
    a.map(|a| action(v, &Field(path, "tap"), a))
}

fn image(v: &mut Violations, path: &dyn Display, i: pb::CardImage) -> CardImage {
    if i.url.is_empty() {
        v.add(format!("{path}.url"), "required");
    } else {
        check_url(v, &Field(path, "url"), &i.url);
    }
    CardImage {
        url: i.url,
        alt: opt(i.alt),
        tap: tap(v, path, i.tap),
    }
}

fn hero(v: &mut Violations, path: &dyn Display, c: pb::HeroCard) -> HeroCard {
    HeroCard {
        title: opt(c.title),
        subtitle: opt(c.subtitle),
        text: opt(c.text),
        images: c
            .images
            .into_iter()
            .enumerate()
            .map(|(i, im)| image(v, &format!("{path}.images[{i}]"), im))
            .collect(),
        buttons: actions(v, &Field(path, "buttons"), c.buttons),
        tap: tap(v, path, c.tap),
    }
}

fn media(v: &mut Violations, path: &dyn Display, c: pb::MediaCard) -> MediaCard {
    if c.media.is_empty() {
        v.add(
            format!("{path}.media"),
            "at least one media URL is required",
        );
    }
    MediaCard {
        title: opt(c.title),
        subtitle: opt(c.subtitle),
        text: opt(c.text),
        image: c.image.map(|i| ThumbnailUrl {
            url: {
                check_url(v, &Field(path, "image.url"), &i.url);
                i.url
            },
            alt: opt(i.alt),
        }),
        media: c
            .media
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                check_url(v, &format!("{path}.media[{i}].url"), &m.url);
                MediaUrl {
                    url: m.url,
                    profile: opt(m.profile),
                }
            })
            .collect(),
        buttons: actions(v, &Field(path, "buttons"), c.buttons),
        shareable: c.shareable,
        autoloop: c.autoloop,
        autostart: c.autostart,
        aspect: opt(c.aspect),
        duration: opt(c.duration),
        value: c.value.map(value_to_json),
    }
}

fn attachment(v: &mut Violations, path: &dyn Display, a: pb::Attachment) -> Attachment {
    use pb::attachment::Content as C;
    let content = a.content.map(|c| match c {
        C::Hero(c) => AttachmentContent::Hero(hero(v, &Field(path, "hero"), c)),
        C::Thumbnail(c) => AttachmentContent::Thumbnail(hero(v, &Field(path, "thumbnail"), c)),
        C::Receipt(c) => {
            let p = Field(path, "receipt");
            AttachmentContent::Receipt(ReceiptCard {
                title: opt(c.title),
                facts: c
                    .facts
                    .into_iter()
                    .map(|f| Fact {
                        key: f.key,
                        value: f.value,
                    })
                    .collect(),
                items: c
                    .items
                    .into_iter()
                    .enumerate()
                    .map(|(i, it)| {
                        let ip = format!("{p}.items[{i}]");
                        ReceiptItem {
                            title: opt(it.title),
                            subtitle: opt(it.subtitle),
                            text: opt(it.text),
                            image: it.image.map(|im| image(v, &Field(&ip, "image"), im)),
                            price: opt(it.price),
                            quantity: opt(it.quantity),
                            tap: tap(v, &ip, it.tap),
                        }
                    })
                    .collect(),
                tap: tap(v, &p, c.tap),
                total: opt(c.total),
                tax: opt(c.tax),
                vat: opt(c.vat),
                buttons: actions(v, &Field(&p, "buttons"), c.buttons),
            })
        }
        C::Signin(c) => {
            let p = Field(path, "signin");
            if c.buttons.is_empty() {
                v.add(
                    format!("{p}.buttons"),
                    "a sign-in card needs at least one button",
                );
            }
            AttachmentContent::Signin(SigninCard {
                text: opt(c.text),
                buttons: actions(v, &Field(&p, "buttons"), c.buttons),
            })
        }
        C::Oauth(c) => {
            let p = Field(path, "oauth");
            if c.connection_name.is_empty() {
                v.add(format!("{p}.connection_name"), "required");
            }
            AttachmentContent::Oauth(OAuthCard {
                text: opt(c.text),
                connection_name: c.connection_name,
                buttons: actions(v, &Field(&p, "buttons"), c.buttons),
            })
        }
        C::Animation(c) => AttachmentContent::Animation(media(v, &Field(path, "animation"), c)),
        C::Audio(c) => AttachmentContent::Audio(media(v, &Field(path, "audio"), c)),
        C::Video(c) => AttachmentContent::Video(media(v, &Field(path, "video"), c)),
        C::Json(s) => AttachmentContent::Json(struct_to_json(s)),
    });
    let implied = content
        .as_ref()
        .and_then(AttachmentContent::implied_content_type);
    let content_type = match (a.content_type.is_empty(), implied) {
        (true, Some(t)) => t.to_string(),
        (false, Some(t)) if a.content_type != t => {
            v.add(
                format!("{path}.content_type"),
                format!(
                    "`{}` contradicts the card set, which is `{t}`",
                    a.content_type
                ),
            );
            a.content_type
        }
        (true, None) => {
            v.add(
                format!("{path}.content_type"),
                "required for a file or JSON content",
            );
            a.content_type
        }
        _ => a.content_type,
    };
    let content_url = opt_url(v, &Field(path, "content_url"), a.content_url);
    if content.is_none() && content_url.is_none() {
        v.add(path.to_string(), "needs content_url or a card");
    }
    Attachment {
        content_type,
        content_url,
        name: opt(a.name),
        thumbnail_url: opt_url(v, &Field(path, "thumbnail_url"), a.thumbnail_url),
        content,
    }
}

fn enum_or<T, P: TryFrom<i32>>(
    v: &mut Violations,
    field: &dyn Display,
    raw: i32,
    f: impl FnOnce(P) -> Option<T>,
) -> Option<T> {
    match P::try_from(raw) {
        Ok(p) => f(p),
        Err(_) => {
            v.add(field.to_string(), format!("unknown enum value {raw}"));
            None
        }
    }
}

/// Converts and validates one message at `path`.
pub fn message(v: &mut Violations, path: &dyn Display, m: pb::Message) -> Message {
    use pb::{
        AttachmentLayout as L, DeliveryMode as D, Importance as I, InputHint as H,
        MessageType as T, TextFormat as F,
    };
    let kind = enum_or(v, &Field(path, "type"), m.r#type, |t: T| {
        Some(match t {
            T::Unspecified | T::Message => MessageType::Message,
            T::Typing => MessageType::Typing,
            T::EndOfConversation => MessageType::EndOfConversation,
            T::Event => MessageType::Event,
            T::ConversationUpdate => MessageType::ConversationUpdate,
            T::Invoke => MessageType::Invoke,
            T::MessageReaction => MessageType::MessageReaction,
            T::MessageUpdate => MessageType::MessageUpdate,
            T::MessageDelete => MessageType::MessageDelete,
            T::InstallationUpdate => MessageType::InstallationUpdate,
        })
    })
    .unwrap_or_default();
    if kind.send_kind().is_none() {
        v.add(
            format!("{path}.type"),
            "a kind of event channels report to the bot: a bot cannot send it",
        );
    }
    // What only received events carry; `timestamp` is left alone (v3 bots often copy it over).
    for (name, set) in [
        ("members_added", !m.members_added.is_empty()),
        ("members_removed", !m.members_removed.is_empty()),
        ("reactions_added", !m.reactions_added.is_empty()),
        ("reactions_removed", !m.reactions_removed.is_empty()),
    ] {
        if set {
            v.add(
                format!("{path}.{name}"),
                "received events only: a message sent does not take it",
            );
        }
    }
    let local_timestamp = opt(m.local_timestamp).and_then(|s| {
        OffsetDateTime::parse(&s, &Rfc3339)
            .map_err(|e| {
                v.add(
                    format!("{path}.local_timestamp"),
                    format!("`{s}` is not RFC 3339 with an offset: {e}"),
                )
            })
            .ok()
    });
    let mut source_event = BTreeMap::new();
    for (k, s) in m.source_event {
        if k.is_empty() {
            v.add(
                format!("{path}.source_event"),
                "keys are channel ids or `*`, not empty",
            );
        }
        source_event.insert(k, struct_to_json(s));
    }
    let out = Message {
        kind,
        address: address(v, &Field(path, "address"), m.address.map(|a| *a)),
        text: opt(m.text),
        text_format: enum_or(
            v,
            &Field(path, "text_format"),
            m.text_format,
            |f: F| match f {
                F::Unspecified => None,
                F::Plain => Some(TextFormat::Plain),
                F::Markdown => Some(TextFormat::Markdown),
                F::Xml => Some(TextFormat::Xml),
            },
        ),
        text_locale: opt(m.text_locale),
        attachments: m
            .attachments
            .into_iter()
            .enumerate()
            .map(|(i, a)| attachment(v, &format!("{path}.attachments[{i}]"), a))
            .collect(),
        attachment_layout: enum_or(
            v,
            &Field(path, "attachment_layout"),
            m.attachment_layout,
            |l: L| match l {
                L::Unspecified => None,
                L::List => Some(AttachmentLayout::List),
                L::Carousel => Some(AttachmentLayout::Carousel),
            },
        ),
        suggested_actions: m.suggested_actions.map(|s| SuggestedActions {
            to: s.to,
            actions: actions(v, &Field(path, "suggested_actions.actions"), s.actions),
        }),
        summary: opt(m.summary),
        speak: opt(m.speak),
        input_hint: enum_or(
            v,
            &Field(path, "input_hint"),
            m.input_hint,
            |h: H| match h {
                H::Unspecified => None,
                H::AcceptingInput => Some(InputHint::AcceptingInput),
                H::IgnoringInput => Some(InputHint::IgnoringInput),
                H::ExpectingInput => Some(InputHint::ExpectingInput),
            },
        ),
        entities: m.entities.into_iter().map(struct_to_json).collect(),
        source_event,
        value: m.value.map(value_to_json),
        value_type: opt(m.value_type),
        name: opt(m.name),
        code: opt(m.code),
        importance: enum_or(
            v,
            &Field(path, "importance"),
            m.importance,
            |i: I| match i {
                I::Unspecified => None,
                I::Low => Some(Importance::Low),
                I::Normal => Some(Importance::Normal),
                I::High => Some(Importance::High),
            },
        ),
        delivery_mode: enum_or(
            v,
            &Field(path, "delivery_mode"),
            m.delivery_mode,
            |d: D| match d {
                D::Unspecified => None,
                D::Normal => Some(DeliveryMode::Normal),
                D::Notification => Some(DeliveryMode::Notification),
                D::ExpectReplies => Some(DeliveryMode::ExpectReplies),
                D::Ephemeral => Some(DeliveryMode::Ephemeral),
            },
        ),
        expiration: m
            .expiration
            .and_then(|t| timestamp(v, &Field(path, "expiration"), t)),
        reply_to_id: opt(m.reply_to_id),
        label: opt(m.label),
        local_timestamp,
        local_timezone: opt(m.local_timezone),
        listen_for: m.listen_for,
        text_highlights: m
            .text_highlights
            .into_iter()
            .map(|h| TextHighlight {
                text: h.text,
                occurrence: (h.occurrence != 0).then_some(h.occurrence),
            })
            .collect(),
        timestamp: None,
        members_added: Vec::new(),
        members_removed: Vec::new(),
        reactions_added: Vec::new(),
        reactions_removed: Vec::new(),
    };
    if out.kind == MessageType::Message
        && out.text.as_deref().is_none_or(|t| t.trim().is_empty())
        && out.attachments.is_empty()
        && out
            .suggested_actions
            .as_ref()
            .is_none_or(|s| s.actions.is_empty())
        && out.source_event_for(&out.address.channel_id).is_none()
    {
        v.add(
            path.to_string(),
            "empty message: set text, attachments, suggested_actions or a source_event for the channel",
        );
    }
    out
}

/// A proactive start's options, bounded: they travel with each of its messages to the outbox.
pub fn proactive_options(v: &mut Violations, o: Option<pb::ProactiveOptions>) -> ProactiveOptions {
    let o = o.unwrap_or_default();
    // Stored with each message of the start (a restart must be able to start it again from
    // any of them): bounded as a whole so 100 messages carry at most 1.6 MB of options.
    let size = prost::Message::encoded_len(&o);
    if size > MAX_OPTIONS_BYTES {
        v.add(
            "options",
            format!("{size} bytes; at most {MAX_OPTIONS_BYTES}"),
        );
        return ProactiveOptions::default();
    }
    check_len(v, &"options.topic_name", &o.topic_name, MAX_ID_BYTES);
    check_len(v, &"options.message_tag", &o.message_tag, MAX_ID_BYTES);
    if o.members.len() > MAX_MEMBERS {
        v.add(
            "options.members",
            format!("{} members; at most {MAX_MEMBERS}", o.members.len()),
        );
        return ProactiveOptions::default();
    }
    // Checked at the index the caller wrote, before empty identities are left out.
    let mut members = Vec::with_capacity(o.members.len());
    for (i, m) in o.members.into_iter().enumerate() {
        if let Some(m) = identity(Some(m)) {
            check_identity(v, &Item("options.members", i), &m);
            members.push(m);
        }
    }
    ProactiveOptions {
        topic_name: opt(o.topic_name),
        is_group: o.is_group,
        members,
        message_tag: opt(o.message_tag),
    }
}

// ---- model -> proto (for the CLI and for answers) ----

fn s(o: &Option<String>) -> String {
    o.clone().unwrap_or_default()
}

fn identity_pb(i: &Option<Identity>) -> Option<pb::Identity> {
    i.as_ref().map(identity_pb_of)
}

fn identity_pb_of(i: &Identity) -> pb::Identity {
    pb::Identity {
        id: i.id.clone(),
        name: s(&i.name),
        role: s(&i.role),
        aad_object_id: s(&i.aad_object_id),
        tenant_id: s(&i.tenant_id),
    }
}

pub fn address_pb(a: &Address) -> pb::Address {
    pb::Address {
        channel_id: a.channel_id.clone(),
        user: identity_pb(&a.user),
        bot: identity_pb(&a.bot),
        conversation: a.conversation.as_ref().map(|c| pb::ConversationAccount {
            id: c.id.clone(),
            name: s(&c.name),
            is_group: c.is_group,
            conversation_type: s(&c.conversation_type),
            tenant_id: s(&c.tenant_id),
        }),
        service_url: s(&a.service_url),
        id: s(&a.id),
        thread_id: s(&a.thread_id),
    }
}

fn action_pb(a: &CardAction) -> pb::CardAction {
    use pb::ActionType as P;
    let t = match a.kind {
        ActionType::OpenUrl => P::OpenUrl,
        ActionType::ImBack => P::ImBack,
        ActionType::PostBack => P::PostBack,
        ActionType::Call => P::Call,
        ActionType::PlayAudio => P::PlayAudio,
        ActionType::PlayVideo => P::PlayVideo,
        ActionType::ShowImage => P::ShowImage,
        ActionType::DownloadFile => P::DownloadFile,
        ActionType::Signin => P::Signin,
        ActionType::MessageBack => P::MessageBack,
        ActionType::DialogAction => P::DialogAction,
    };
    let (value, value_object) = match &a.value {
        Some(Value::String(s)) => (s.clone(), None),
        Some(o @ Value::Object(_)) => (String::new(), Some(json_to_struct(o))),
        Some(other) => (other.to_string(), None),
        None => (String::new(), None),
    };
    pb::CardAction {
        r#type: t as i32,
        title: s(&a.title),
        value,
        image: s(&a.image),
        text: s(&a.text),
        display_text: s(&a.display_text),
        channel_data: a.channel_data.as_ref().map(json_to_struct),
        value_object,
        dialog_name: s(&a.dialog_name),
        dialog_data: s(&a.dialog_data),
    }
}

fn actions_pb(a: &[CardAction]) -> Vec<pb::CardAction> {
    a.iter().map(action_pb).collect()
}

fn image_pb(i: &CardImage) -> pb::CardImage {
    pb::CardImage {
        url: i.url.clone(),
        alt: s(&i.alt),
        tap: i.tap.as_ref().map(action_pb),
    }
}

fn hero_pb(c: &HeroCard) -> pb::HeroCard {
    pb::HeroCard {
        title: s(&c.title),
        subtitle: s(&c.subtitle),
        text: s(&c.text),
        images: c.images.iter().map(image_pb).collect(),
        buttons: actions_pb(&c.buttons),
        tap: c.tap.as_ref().map(action_pb),
    }
}

fn media_pb(c: &MediaCard) -> pb::MediaCard {
    pb::MediaCard {
        title: s(&c.title),
        subtitle: s(&c.subtitle),
        text: s(&c.text),
        image: c.image.as_ref().map(|i| pb::ThumbnailUrl {
            url: i.url.clone(),
            alt: s(&i.alt),
        }),
        media: c
            .media
            .iter()
            .map(|m| pb::MediaUrl {
                url: m.url.clone(),
                profile: s(&m.profile),
            })
            .collect(),
        buttons: actions_pb(&c.buttons),
        shareable: c.shareable,
        autoloop: c.autoloop,
        autostart: c.autostart,
        aspect: s(&c.aspect),
        duration: s(&c.duration),
        value: c.value.as_ref().map(json_to_value),
    }
}

fn attachment_pb(a: &Attachment) -> pb::Attachment {
    use pb::attachment::Content as C;
    pb::Attachment {
        content_type: a.content_type.clone(),
        content_url: s(&a.content_url),
        name: s(&a.name),
        thumbnail_url: s(&a.thumbnail_url),
        content: a.content.as_ref().map(|c| match c {
            AttachmentContent::Hero(h) => C::Hero(hero_pb(h)),
            AttachmentContent::Thumbnail(h) => C::Thumbnail(hero_pb(h)),
            AttachmentContent::Receipt(r) => C::Receipt(pb::ReceiptCard {
                title: s(&r.title),
                facts: r
                    .facts
                    .iter()
                    .map(|f| pb::Fact {
                        key: f.key.clone(),
                        value: f.value.clone(),
                    })
                    .collect(),
                items: r
                    .items
                    .iter()
                    .map(|i| pb::ReceiptItem {
                        title: s(&i.title),
                        subtitle: s(&i.subtitle),
                        text: s(&i.text),
                        image: i.image.as_ref().map(image_pb),
                        price: s(&i.price),
                        quantity: s(&i.quantity),
                        tap: i.tap.as_ref().map(action_pb),
                    })
                    .collect(),
                tap: r.tap.as_ref().map(action_pb),
                total: s(&r.total),
                tax: s(&r.tax),
                vat: s(&r.vat),
                buttons: actions_pb(&r.buttons),
            }),
            AttachmentContent::Signin(c) => C::Signin(pb::SigninCard {
                text: s(&c.text),
                buttons: actions_pb(&c.buttons),
            }),
            AttachmentContent::Oauth(c) => C::Oauth(pb::OAuthCard {
                text: s(&c.text),
                connection_name: c.connection_name.clone(),
                buttons: actions_pb(&c.buttons),
            }),
            AttachmentContent::Animation(m) => C::Animation(media_pb(m)),
            AttachmentContent::Audio(m) => C::Audio(media_pb(m)),
            AttachmentContent::Video(m) => C::Video(media_pb(m)),
            AttachmentContent::Json(j) => C::Json(json_to_struct(j)),
        }),
    }
}

fn timestamp_pb(t: OffsetDateTime) -> prost_types::Timestamp {
    let n = t.unix_timestamp_nanos();
    prost_types::Timestamp {
        seconds: (n.div_euclid(1_000_000_000)) as i64,
        nanos: (n.rem_euclid(1_000_000_000)) as i32,
    }
}

pub fn message_pb(m: &Message) -> pb::Message {
    use pb::{
        AttachmentLayout as L, DeliveryMode as D, Importance as I, InputHint as H,
        MessageType as T, TextFormat as F,
    };
    let fmt =
        |t: &Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default();
    pb::Message {
        r#type: match m.kind {
            MessageType::Message => T::Message,
            MessageType::Typing => T::Typing,
            MessageType::EndOfConversation => T::EndOfConversation,
            MessageType::Event => T::Event,
            MessageType::ConversationUpdate => T::ConversationUpdate,
            MessageType::Invoke => T::Invoke,
            MessageType::MessageReaction => T::MessageReaction,
            MessageType::MessageUpdate => T::MessageUpdate,
            MessageType::MessageDelete => T::MessageDelete,
            MessageType::InstallationUpdate => T::InstallationUpdate,
        } as i32,
        address: Some(Box::new(address_pb(&m.address))),
        text: s(&m.text),
        text_format: match m.text_format {
            None => F::Unspecified,
            Some(TextFormat::Plain) => F::Plain,
            Some(TextFormat::Markdown) => F::Markdown,
            Some(TextFormat::Xml) => F::Xml,
        } as i32,
        text_locale: s(&m.text_locale),
        attachments: m.attachments.iter().map(attachment_pb).collect(),
        attachment_layout: match m.attachment_layout {
            None => L::Unspecified,
            Some(AttachmentLayout::List) => L::List,
            Some(AttachmentLayout::Carousel) => L::Carousel,
        } as i32,
        suggested_actions: m.suggested_actions.as_ref().map(|sa| pb::SuggestedActions {
            to: sa.to.clone(),
            actions: actions_pb(&sa.actions),
        }),
        summary: s(&m.summary),
        speak: s(&m.speak),
        input_hint: match m.input_hint {
            None => H::Unspecified,
            Some(InputHint::AcceptingInput) => H::AcceptingInput,
            Some(InputHint::IgnoringInput) => H::IgnoringInput,
            Some(InputHint::ExpectingInput) => H::ExpectingInput,
        } as i32,
        entities: m.entities.iter().map(json_to_struct).collect(),
        source_event: m
            .source_event
            .iter()
            .map(|(k, v)| (k.clone(), json_to_struct(v)))
            .collect(),
        value: m.value.as_ref().map(json_to_value),
        value_type: s(&m.value_type),
        name: s(&m.name),
        code: s(&m.code),
        importance: match m.importance {
            None => I::Unspecified,
            Some(Importance::Low) => I::Low,
            Some(Importance::Normal) => I::Normal,
            Some(Importance::High) => I::High,
        } as i32,
        delivery_mode: match m.delivery_mode {
            None => D::Unspecified,
            Some(DeliveryMode::Normal) => D::Normal,
            Some(DeliveryMode::Notification) => D::Notification,
            Some(DeliveryMode::ExpectReplies) => D::ExpectReplies,
            Some(DeliveryMode::Ephemeral) => D::Ephemeral,
        } as i32,
        expiration: m.expiration.map(timestamp_pb),
        reply_to_id: s(&m.reply_to_id),
        label: s(&m.label),
        local_timestamp: fmt(&m.local_timestamp),
        local_timezone: s(&m.local_timezone),
        listen_for: m.listen_for.clone(),
        text_highlights: m
            .text_highlights
            .iter()
            .map(|h| pb::TextHighlight {
                text: h.text.clone(),
                occurrence: h.occurrence.unwrap_or_default(),
            })
            .collect(),
        timestamp: m.timestamp.map(timestamp_pb),
        members_added: m.members_added.iter().map(identity_pb_of).collect(),
        members_removed: m.members_removed.iter().map(identity_pb_of).collect(),
        reactions_added: m.reactions_added.clone(),
        reactions_removed: m.reactions_removed.clone(),
    }
}

pub fn options_pb(o: &ProactiveOptions) -> pb::ProactiveOptions {
    pb::ProactiveOptions {
        topic_name: s(&o.topic_name),
        is_group: o.is_group,
        members: o
            .members
            .iter()
            .filter_map(|m| identity_pb(&Some(m.clone())))
            .collect(),
        message_tag: s(&o.message_tag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remembered_url_lets_no_other_through() {
        let check = |s: &str| {
            let mut v = Violations::default();
            check_url(&mut v, &"f", s);
            v.is_empty()
        };
        assert!(check("https://img.example/a.png"));
        assert!(check("https://img.example/a.png"), "the same one again");
        assert!(!check("ftp://img.example/a.png"));
        assert!(!check("not a url"));
        assert!(!check(""));
        assert!(check("https://img.example/b.png"));
        assert!(!check("https://"), "no host");
    }

    fn sent(m: pb::Message) -> Vec<String> {
        let mut v = Violations::default();
        let _ = message(&mut v, &"message", m);
        v.kept.into_iter().map(|(field, _)| field).collect()
    }

    #[test]
    fn a_received_only_kind_or_field_is_refused_on_send_by_name() {
        let base = pb::Message {
            text: "hi".into(),
            address: Some(Box::new(pb::Address {
                channel_id: "slack".into(),
                bot: Some(pb::Identity {
                    id: "B1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(sent(base.clone()), Vec::<String>::new());
        let kind = pb::Message {
            r#type: pb::MessageType::ConversationUpdate as i32,
            ..base.clone()
        };
        assert_eq!(sent(kind), ["message.type"]);
        let members = pb::Message {
            members_added: vec![pb::Identity {
                id: "u".into(),
                ..Default::default()
            }],
            reactions_removed: vec!["like".into()],
            ..base
        };
        assert_eq!(
            sent(members),
            ["message.members_added", "message.reactions_removed"]
        );
    }

    #[test]
    fn received_events_convert_with_their_kind_and_fields() {
        let m = Message {
            kind: MessageType::MessageReaction,
            timestamp: OffsetDateTime::from_unix_timestamp(1_700_000_000).ok(),
            members_added: vec![Identity {
                id: "29:new".into(),
                ..Default::default()
            }],
            reactions_added: vec!["like".into()],
            ..Default::default()
        };
        let p = message_pb(&m);
        assert_eq!(p.r#type, pb::MessageType::MessageReaction as i32);
        assert_eq!(p.timestamp.map(|t| t.seconds), Some(1_700_000_000));
        assert_eq!(p.members_added[0].id, "29:new");
        assert_eq!(p.reactions_added, ["like"]);
    }
}
