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
    /// The channel's rate limit this request counts against, if any.
    #[serde(skip)]
    pub rate: Option<RateLimit>,
}

/// A rate scope (a Slack channel, a Facebook page's media sends...) and its quota.
/// Requests of one scope share one token bucket, across conversations.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Unique across channels, e.g. `slack:T0123:C0456`.
    pub scope: String,
    pub per_second: f64,
    pub burst: u32,
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
}

impl RenderError {
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
    /// The gateway's channel implementation: `botframework`, `facebook`, `slack`.
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
    /// Caps the ids before they are stored or answered (see `MAX_NATIVE_ID_CHARS`).
    pub fn bound(&mut self) {
        crate::bounded::cap_owned(&mut self.native_id, MAX_NATIVE_ID_CHARS);
        crate::bounded::cap_owned(&mut self.conversation_id, MAX_NATIVE_ID_CHARS);
    }
}
