//! Types shared by every channel: native requests, render results, capabilities, channel errors.
//!
//! Owns the seam between `delivery` (which sees requests as opaque) and each channel's
//! render (pure) and client (HTTP). No channel's JSON shape lives here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Body;
use crate::model::Warning;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Delete,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// One HTTP call a channel will make. `url` never carries a secret: credentials are attached by
/// the channel's client at send time, looked up by `credential` (an id, never the secret itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NativeRequest {
    pub method: HttpMethod,
    pub url: String,
    pub body: Body,
    #[serde(skip)]
    pub credential: String,
    /// The channel's rate scopes this request counts against, narrowest first.
    #[serde(skip)]
    pub rate: RateScopes,
}

/// Where one request counts against its channel's rate limits: the scopes the channel's
/// documentation names, narrowest first (a Teams conversation, then the bot's tenant, then the
/// service host). A 429 pauses the narrowest; a wider one is paused only when 429s repeat
/// across the narrower scopes under it. Empty: the request is never paced nor paused.
///
/// Built by each channel's render; `delivery` reads keys and budgets, never their meaning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateScopes(pub Vec<RateScope>);

impl RateScopes {
    pub fn levels(&self) -> &[RateScope] {
        &self.0
    }

    /// Keeps the scopes (for 429 pauses) without their budgets.
    pub fn drop_budgets(&mut self) {
        for l in &mut self.0 {
            l.budgets = std::borrow::Cow::Borrowed(&[]);
        }
    }
}

/// One scope: its key and the budgets its channel documents for it (applied before sending).
#[derive(Debug, Clone, PartialEq)]
pub struct RateScope {
    /// Unique across channels, e.g. `slack:B0123:C0456`. Shared, since a wide scope's key is
    /// the same for every request under it.
    pub key: std::sync::Arc<str>,
    /// Empty when the channel publishes none: then only a 429 slows the scope.
    pub budgets: std::borrow::Cow<'static, [Budget]>,
}

impl RateScope {
    pub fn new(key: impl Into<std::sync::Arc<str>>, budgets: &'static [Budget]) -> Self {
        Self {
            key: key.into(),
            budgets: std::borrow::Cow::Borrowed(budgets),
        }
    }

    /// A scope whose only budget comes from the configuration.
    pub fn configured(key: impl Into<std::sync::Arc<str>>, budget: Budget) -> Self {
        Self {
            key: key.into(),
            budgets: std::borrow::Cow::Owned(vec![budget]),
        }
    }
}

/// A token bucket: `burst` requests at once, then `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub per_second: f64,
    pub burst: u32,
}

impl Budget {
    /// At most `count` requests in any window of `window_secs`, of which `burst` may go at
    /// once. A bucket with burst b and rate r lets b + r * window through in one window, so the
    /// rate is what the window leaves after the burst: a documented "N per T" is then never
    /// exceeded, at the price of a sustained rate below N / T.
    pub const fn window(count: u32, window_secs: u32, burst: u32) -> Self {
        let rest = count.saturating_sub(burst);
        Self {
            per_second: rest as f64 / window_secs as f64,
            burst,
        }
    }
}

/// What a message turns into on a channel, and what had to change to fit.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rendered {
    pub requests: Vec<NativeRequest>,
    pub warnings: Vec<Warning>,
}

/// Most adaptation warnings kept for one message: each is reported with the message and kept
/// with it in the outbox, and a message of thousands of cards would otherwise carry thousands.
pub const MAX_WARNINGS: usize = 20;

impl Rendered {
    /// Keeps the first [`MAX_WARNINGS`] warnings, and one more saying how many were dropped.
    pub fn cap_warnings(&mut self) {
        if self.warnings.len() > MAX_WARNINGS {
            let more = self.warnings.len() - MAX_WARNINGS;
            self.warnings.truncate(MAX_WARNINGS);
            self.warnings.push(Warning::new(
                "warnings_truncated",
                "message",
                format!("{more} more adaptations of this message are not listed"),
            ));
        }
    }

    /// Drops the requests' bodies and keeps their routes (method, URL, credential, rate scope),
    /// for a message that waits long: `Channels::render_send` renders the bodies again.
    pub fn drop_bodies(&mut self) {
        for r in &mut self.requests {
            r.body = Body::default();
        }
    }
}

/// A message the channel cannot take as given, found before any call is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{field}: {reason}")]
    PermissionDenied { field: String, reason: String },
    /// The channel cannot do this at all (update or delete a message on Messenger).
    #[error("{field}: {reason}")]
    Unimplemented { field: String, reason: String },
}

impl RenderError {
    /// The kind of `msg` as sent, or the error for a kind only channels report.
    pub fn send_kind(msg: &crate::model::Message) -> Result<crate::model::SendKind, Self> {
        msg.kind.send_kind().ok_or_else(|| {
            Self::invalid(
                "message.type",
                format!(
                    "{:?} is a kind of event channels report to the bot: a bot cannot send it",
                    msg.kind
                ),
            )
        })
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a channel supports and its limits; 0 means no documented limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub channel_id: String,
    /// The gateway's channel implementation: `botframework`, `facebook`, `slack`, `telegram`.
    pub implementation: String,
    pub typing: bool,
    pub typing_interval: Duration,
    pub carousel: bool,
    pub max_buttons_per_card: u32,
    pub max_suggested_actions: u32,
    pub max_text_length: u32,
    /// `markdown`, `mrkdwn`, `xml`, `plain`.
    pub markdown_flavor: String,
    pub update_delete: bool,
    pub proactive: bool,
    pub max_payload_bytes: u32,
    /// How a proactive start reaches someone, when the channel sets a condition on it.
    pub proactive_note: String,
}

/// How a failed channel call should be treated by the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Try again later (429, 5xx, throttling codes); the request surely had no effect or is safe.
    Retryable,
    /// The request may have reached the channel (timeout or reset after sending): a retry may duplicate.
    Ambiguous,
    /// The channel refused it for good (4xx other than 429, invalid token after refresh, ...).
    Permanent,
}

/// What kind of refusal a channel's own code means, for channels whose HTTP status does not say
/// (Slack answers 200 with `ok:false`). `None` on an error: judge by the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCategory {
    /// The conversation, user or thread does not exist (or the bot cannot see it).
    NotFound,
    /// The message itself was refused (too long, bad blocks, bad arguments).
    InvalidRequest,
    /// The gateway's credentials or the bot's permissions are wrong.
    Unauthorized,
    /// The channel refuses this action in this state (archived, not in channel).
    Refused,
}

/// A channel's answer that is not a success, with the channel's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{}", self.describe())]
pub struct ChannelError {
    pub channel: String,
    pub kind: FailureKind,
    /// HTTP status if the channel answered.
    pub http_status: Option<u16>,
    /// The channel's own error code (`Forbidden`, `613`, `channel_not_found`, ...).
    pub code: Option<String>,
    pub message: String,
    #[serde(skip, default)]
    pub retry_after: Option<Duration>,
    #[serde(default)]
    pub category: Option<ErrorCategory>,
}

/// The longest channel error code kept (codes are short words or numbers).
const MAX_CODE_CHARS: usize = 128;
/// The longest native id kept: channels' ids are tens of characters; one of megabytes is not
/// an id, and would be stored and echoed with every status.
pub const MAX_NATIVE_ID_CHARS: usize = 1024;

impl ChannelError {
    /// Caps what the channel said before it is stored or answered: an answer may carry
    /// megabytes of error text.
    pub fn bound(&mut self) {
        crate::bounded::cap_owned(&mut self.message, crate::bounded::MAX_ECHO_CHARS);
        if let Some(code) = &mut self.code {
            crate::bounded::cap_owned(code, MAX_CODE_CHARS);
        }
    }

    /// What happened, for people: "botframework answered 500 ServiceError: try later
    /// (temporary)", not the internal retry class. The channel's words are capped and shown
    /// without control characters: this text goes into logs and statuses.
    fn describe(&self) -> String {
        let mut out = self.channel.clone();
        if let Some(status) = self.http_status {
            out.push_str(&format!(" answered {status}"));
        }
        if let Some(code) = &self.code {
            out.push(' ');
            out.push_str(&crate::bounded::for_log(code));
        }
        out.push_str(": ");
        out.push_str(&crate::bounded::for_log(&self.message));
        out.push_str(match self.kind {
            FailureKind::Retryable => " (temporary)",
            FailureKind::Ambiguous => " (the request may have reached the channel)",
            FailureKind::Permanent => " (permanent)",
        });
        out
    }

    pub fn new(channel: &str, kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            channel: channel.to_string(),
            kind,
            http_status: None,
            code: None,
            message: message.into(),
            retry_after: None,
            category: None,
        }
    }
}

/// A channel's acknowledgement of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeReceipt {
    /// The channel's id for what was created (activity id, message_id, ts).
    pub native_id: String,
    pub conversation_id: String,
}

impl NativeReceipt {
    /// Drops an id longer than `MAX_NATIVE_ID_CHARS` before it is stored or answered: cut, it
    /// would look like an id and name nothing (a later update or delete by it would miss); left
    /// empty, it says the channel gave no usable one.
    pub fn bound(&mut self) {
        for id in [&mut self.native_id, &mut self.conversation_id] {
            if id.chars().nth(MAX_NATIVE_ID_CHARS).is_some() {
                id.clear();
            }
        }
    }
}
