//! The channel-neutral message model (Bot Framework v3 `IMessage` / `IAddress`).
//!
//! Owns the shape of what a bot asks the gateway to say and where. It knows nothing of protobuf,
//! HTTP or any channel's JSON: `api` converts proto into these types after validation, and each
//! `channels/*/render` turns them into native requests. The serde form (snake_case, the same field
//! names as the proto) is what the CLI reads from JSON files and what the golden tests use as input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Who sends or receives: a user, a bot, or a member of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aad_object_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

/// The conversation a message belongs to, as the channel names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conversation {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_group: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

/// Where a message goes. `id` is the incoming activity being answered, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Address {
    pub channel_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bot: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Conversation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The thread within the conversation (Slack `thread_ts`); replies stay in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

impl Address {
    pub fn bot_id(&self) -> &str {
        self.bot.as_ref().map(|b| b.id.as_str()).unwrap_or("")
    }
    pub fn user_id(&self) -> &str {
        self.user.as_ref().map(|u| u.id.as_str()).unwrap_or("")
    }
    pub fn conversation_id(&self) -> Option<&str> {
        self.conversation
            .as_ref()
            .map(|c| c.id.as_str())
            .filter(|id| !id.is_empty())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    #[default]
    Message,
    Typing,
    EndOfConversation,
    Event,
    /// Received only: members joined or left, or the conversation changed.
    ConversationUpdate,
    /// Received only: a request that expects an answer (a Teams invoke).
    Invoke,
    /// Received only: reactions added to or removed from a message (`address.id`).
    MessageReaction,
    /// Received only: a message (`address.id`) was edited.
    MessageUpdate,
    /// Received only: a message (`address.id`) was deleted.
    MessageDelete,
    /// Received only: the bot was installed or uninstalled.
    InstallationUpdate,
}

/// The kinds a bot can send: what a renderer matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    Message,
    Typing,
    EndOfConversation,
    Event,
}

impl MessageType {
    /// The kind as sent, or `None` for the kinds a channel reports but a bot cannot send.
    pub fn send_kind(self) -> Option<SendKind> {
        match self {
            Self::Message => Some(SendKind::Message),
            Self::Typing => Some(SendKind::Typing),
            Self::EndOfConversation => Some(SendKind::EndOfConversation),
            Self::Event => Some(SendKind::Event),
            Self::ConversationUpdate
            | Self::Invoke
            | Self::MessageReaction
            | Self::MessageUpdate
            | Self::MessageDelete
            | Self::InstallationUpdate => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    Plain,
    Markdown,
    Xml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentLayout {
    List,
    Carousel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputHint {
    AcceptingInput,
    IgnoringInput,
    ExpectingInput,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    Low,
    Normal,
    High,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    Normal,
    Notification,
    ExpectReplies,
    Ephemeral,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextHighlight {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurrence: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SuggestedActions {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    pub actions: Vec<CardAction>,
}

/// One message (or typing / end-of-conversation / event activity) for one address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Message {
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub address: Address,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_format: Option<TextFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_locale: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_layout: Option<AttachmentLayout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggested_actions: Option<SuggestedActions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speak: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_hint: Option<InputHint>,
    /// Each entity is a JSON object with at least a `type`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<Value>,
    /// Channel-native extras keyed by channel id; `*` applies to any channel without its own key.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_event: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub importance: Option<Importance>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<DeliveryMode>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expiration: Option<OffsetDateTime>,
    /// Overrides `address.id` as the activity replied to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Keeps the sender's UTC offset, which a plain timestamp would lose.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_timestamp: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_timezone: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen_for: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub text_highlights: Vec<TextHighlight>,
    /// When the channel says the event happened (received events).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<OffsetDateTime>,
    /// Who joined (a received conversation update).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members_added: Vec<Identity>,
    /// Who left (a received conversation update).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members_removed: Vec<Identity>,
    /// Reaction types added to `address.id` (a received message reaction).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reactions_added: Vec<String>,
    /// Reaction types removed from `address.id`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reactions_removed: Vec<String>,
}

impl Message {
    /// The channel-native extra for `channel_id`, falling back to `*`.
    pub fn source_event_for(&self, channel_id: &str) -> Option<&Value> {
        self.source_event
            .get(channel_id)
            .or_else(|| self.source_event.get("*"))
    }

    /// The incoming activity this message answers, if any.
    pub fn reply_target(&self) -> Option<&str> {
        self.reply_to_id
            .as_deref()
            .or(self.address.id.as_deref())
            .filter(|s| !s.is_empty())
    }
}

pub const CONTENT_TYPE_HERO: &str = "application/vnd.microsoft.card.hero";
pub const CONTENT_TYPE_THUMBNAIL: &str = "application/vnd.microsoft.card.thumbnail";
pub const CONTENT_TYPE_RECEIPT: &str = "application/vnd.microsoft.card.receipt";
pub const CONTENT_TYPE_SIGNIN: &str = "application/vnd.microsoft.card.signin";
pub const CONTENT_TYPE_OAUTH: &str = "application/vnd.microsoft.card.oauth";
pub const CONTENT_TYPE_ANIMATION: &str = "application/vnd.microsoft.card.animation";
pub const CONTENT_TYPE_AUDIO: &str = "application/vnd.microsoft.card.audio";
pub const CONTENT_TYPE_VIDEO: &str = "application/vnd.microsoft.card.video";
pub const CONTENT_TYPE_ADAPTIVE: &str = "application/vnd.microsoft.card.adaptive";

/// A file by URL, a typed card, or any other JSON content (adaptive cards included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Attachment {
    /// Always set after validation: implied by a typed card when the caller left it empty.
    pub content_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<AttachmentContent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentContent {
    Hero(HeroCard),
    Thumbnail(HeroCard),
    Receipt(ReceiptCard),
    Signin(SigninCard),
    Oauth(OAuthCard),
    Animation(MediaCard),
    Audio(MediaCard),
    Video(MediaCard),
    /// Adaptive cards and any other content, passed through as JSON.
    Json(Value),
}

impl AttachmentContent {
    /// The Bot Framework content type a typed card implies (`None` for raw JSON).
    pub fn implied_content_type(&self) -> Option<&'static str> {
        Some(match self {
            Self::Hero(_) => CONTENT_TYPE_HERO,
            Self::Thumbnail(_) => CONTENT_TYPE_THUMBNAIL,
            Self::Receipt(_) => CONTENT_TYPE_RECEIPT,
            Self::Signin(_) => CONTENT_TYPE_SIGNIN,
            Self::Oauth(_) => CONTENT_TYPE_OAUTH,
            Self::Animation(_) => CONTENT_TYPE_ANIMATION,
            Self::Audio(_) => CONTENT_TYPE_AUDIO,
            Self::Video(_) => CONTENT_TYPE_VIDEO,
            Self::Json(_) => return None,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CardImage {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<CardAction>,
}

/// Hero and thumbnail cards share one shape; only the layout differs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeroCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtitle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<CardImage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<CardAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<CardAction>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fact {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiptItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtitle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<CardImage>,
    /// Kept as the bot wrote it ("$22.00", "22,00 EUR"): channels parse what they need.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<CardAction>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiptCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<Fact>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ReceiptItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<CardAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tax: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vat: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<CardAction>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SigninCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub buttons: Vec<CardAction>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OAuthCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub connection_name: String,
    pub buttons: Vec<CardAction>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MediaUrl {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThumbnailUrl {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alt: Option<String>,
}

/// Animation, audio and video cards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MediaCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtitle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ThumbnailUrl>,
    pub media: Vec<MediaUrl>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<CardAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shareable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoloop: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// "16:9" or "4:3".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aspect: Option<String>,
    /// ISO 8601 duration, e.g. "PT2M30S".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionType {
    #[default]
    OpenUrl,
    ImBack,
    PostBack,
    Call,
    PlayAudio,
    PlayVideo,
    ShowImage,
    DownloadFile,
    Signin,
    MessageBack,
    /// v3 `CardAction.dialogAction`: sent as a postBack with value `action?NAME=DATA`.
    DialogAction,
}

impl ActionType {
    /// Actions whose value must be an absolute http(s) URL.
    pub fn takes_url(self) -> bool {
        matches!(
            self,
            Self::OpenUrl
                | Self::PlayAudio
                | Self::PlayVideo
                | Self::ShowImage
                | Self::DownloadFile
                | Self::Signin
        )
    }
}

/// A button, a tap target, or a suggested action.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CardAction {
    #[serde(rename = "type")]
    pub kind: ActionType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// A string for most actions (URL, text, payload, phone number); any JSON for message_back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_data: Option<Value>,
    /// dialog_action only: the action name and its optional data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialog_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialog_data: Option<String>,
}

impl CardAction {
    /// The value as a string, for actions whose value is text (URLs, payloads).
    pub fn value_str(&self) -> Option<&str> {
        self.value.as_ref().and_then(Value::as_str)
    }

    /// The wire value of a dialog action, as the v3 SDK built it.
    pub fn dialog_action_value(&self) -> String {
        let name = self.dialog_name.as_deref().unwrap_or_default();
        match self.dialog_data.as_deref() {
            Some(data) => format!("action?{name}={data}"),
            None => format!("action?{name}"),
        }
    }

    /// What a post-back-like action sends back, with the field it comes from: a dialog
    /// action's wire value (`dialog_data`), else `value` (a string as it is, other JSON as
    /// JSON text). `None` when there is no value: channels then fall back on their own rule.
    pub fn postback_value(&self) -> (Option<String>, &'static str) {
        match self.kind {
            ActionType::DialogAction => (Some(self.dialog_action_value()), "dialog_data"),
            _ => (
                match &self.value {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Null) | None => None,
                    Some(other) => Some(other.to_string()),
                },
                "value",
            ),
        }
    }

    /// What a button shows, and the field it came from: the first of its title, display text,
    /// text or textual value (never a URL) that is not empty once converted by `plain` (the
    /// channel's conversion of the message's text format).
    pub fn label(&self, plain: impl Fn(&str) -> String) -> Option<(String, &'static str)> {
        let textual_value = (!self.kind.takes_url()).then(|| self.value_str()).flatten();
        [
            (self.title.as_deref(), "title"),
            (self.display_text.as_deref(), "display_text"),
            (self.text.as_deref(), "text"),
            (textual_value, "value"),
        ]
        .into_iter()
        .find_map(|(t, f)| {
            let p = plain(t.unwrap_or_default());
            (!p.is_empty()).then_some((p, f))
        })
    }
}

/// Options for starting a new conversation proactively.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProactiveOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    #[serde(skip_serializing_if = "is_false")]
    pub is_group: bool,
    /// Members besides `address.user`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Identity>,
    /// A channel's tag for messages outside the normal reply window (Messenger `tag`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_tag: Option<String>,
}

/// An adaptation the gateway made to fit a channel's limits, reported back to the bot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// Stable machine-readable code, e.g. `buttons_truncated`.
    pub code: String,
    /// Field path in the request, e.g. `message.attachments[0].hero.buttons`.
    pub field: String,
    pub message: String,
}

impl Warning {
    pub fn new(code: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}
