//! The one interface a channel implements: what it serves and supports, the credential check
//! of an address, the pure render of a send and of a proactive start, the execution of one
//! native request, conversation creation, and (from the inbound step on) webhook verification
//! and parsing, and fetching the files people send.
//!
//! Owns the contract between the engine (`delivery`, `api`) and a channel folder. It must not
//! name any channel: the registry in `channels/mod.rs` is the only place that lists them.

use std::fmt::Display;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::shared::CredentialHint;
use super::update::Plan;
use super::{
    Capabilities, ChannelError, NativeReceipt, NativeRequest, RenderError, Rendered, RouteError,
};
use crate::model::{Address, Message, ProactiveOptions};

/// The refusal of a channel that cannot update or delete a message it sent.
pub fn cannot(channel: &str, verb: &str) -> RenderError {
    RenderError::Unimplemented {
        field: "message_id".into(),
        reason: format!("the {channel} channel cannot {verb} a message it sent"),
    }
}

/// A channel: one folder under `src/channels/`, built from its own config section.
///
/// A disabled channel (its section's `enabled = false`) is still built: it renders (Render and
/// GetCapabilities work without credentials), but nothing is sent through it. The registry
/// refuses to execute or create a conversation on a disabled channel before calling it.
///
/// `execute` and `create_conversation` return boxed futures so that channels live behind one
/// `dyn Channel`; one allocation per HTTP call is noise next to the call.
pub trait Channel: Send + Sync + 'static {
    /// The implementation's name as GetCapabilities reports it: `botframework`, `slack`.
    fn name(&self) -> &'static str;

    /// The config section, for errors: `channels.slack`.
    fn section(&self) -> &'static str;

    /// The channel ids it serves (Bot Framework serves several; most serve one). Ids are unique
    /// across channels; the registry refuses a configuration where two channels claim one.
    fn channel_ids(&self) -> Vec<String>;

    /// Whether the section is enabled.
    fn enabled(&self) -> bool;

    /// What the channel supports for `channel_id` (one of `channel_ids`), with the configured
    /// typing interval.
    fn capabilities(&self, channel_id: &str) -> Capabilities;

    /// Whether it can send for at least one bot (credentials, or an unauthenticated mode).
    fn configured(&self) -> bool;

    /// Whether it can send for `bot_id` (`address.bot.id`).
    fn has_credentials(&self, bot_id: &str) -> bool;

    /// The configured ids `bot_id` is matched against, for the error that says none matched.
    fn credential_hint(&self) -> CredentialHint;

    /// Checks of an address beyond its bot's credentials, made before a message is accepted
    /// (Bot Framework: the service URL is present and allowed). `field` is the address's path
    /// in the request, for the error.
    fn check_address(&self, addr: &Address, field: &dyn Display) -> Result<(), RouteError> {
        let _ = (addr, field);
        Ok(())
    }

    /// Renders a message for a conversation that exists; `proactive` is set for SendProactive.
    /// Pure: no I/O, no credentials; the same input gives the same bytes.
    fn render_send(
        &self,
        msg: &Message,
        proactive: Option<&ProactiveOptions>,
    ) -> Result<Rendered, RenderError>;

    /// Renders a proactive start (an address without a conversation): any conversation
    /// creation, then each message. Pure.
    fn render_proactive(
        &self,
        messages: &[Message],
        options: &ProactiveOptions,
    ) -> Result<Rendered, RenderError>;

    /// Renders an update of a message sent before: `msg` is the new message (with the sent
    /// one's address), `receipts` what the sent one became (see `update::reconcile`). Pure.
    /// Default: the channel cannot edit messages.
    fn render_update(
        &self,
        msg: &Message,
        receipts: &[NativeReceipt],
    ) -> Result<Plan, RenderError> {
        let _ = (msg, receipts);
        Err(cannot(self.name(), "update"))
    }

    /// Renders the deletion of every native message of a message sent before to `addr`. Pure.
    /// Default: the channel cannot delete messages.
    fn render_delete(
        &self,
        addr: &Address,
        receipts: &[NativeReceipt],
    ) -> Result<Plan, RenderError> {
        let _ = (addr, receipts);
        Err(cannot(self.name(), "delete"))
    }

    /// Makes one native request rendered by this channel for `channel_id`.
    fn execute<'a>(
        &'a self,
        channel_id: &'a str,
        req: &'a NativeRequest,
    ) -> BoxFuture<'a, Result<NativeReceipt, ChannelError>>;

    /// Starts a conversation and returns the address to use from now on.
    fn create_conversation<'a>(
        &'a self,
        addr: &'a Address,
        options: &'a ProactiveOptions,
    ) -> BoxFuture<'a, Result<Address, ChannelError>>;

    /// The conversation id a proactive start to `addr` (an address without a conversation)
    /// lands in, when the channel names it without a call (Messenger: the PSID; Telegram: the
    /// user's private chat). `None`: only `create_conversation` knows.
    fn known_conversation(&self, addr: &Address) -> Option<String> {
        let _ = addr;
        None
    }

    /// Whether it fetches tokens (its token-fetch metric series are created at start).
    fn fetches_tokens(&self) -> bool {
        false
    }

    /// Token fetches per channel id, for channels that fetch tokens (the admin metrics).
    fn token_fetches(&self) -> Vec<(crate::metrics::LabelValue, u64)> {
        Vec::new()
    }

    /// Starts fetching a file a person sent (an attachment of a received event) with this
    /// channel's credentials for `req.bot_id`: checks that `req.content_url` is a URL the
    /// channel serves files from (refused before any request otherwise), then streams it,
    /// bounded by `req.max_bytes`. A credential only ever goes to the channel's own hosts, and
    /// no error names a token-bearing URL. Default: the channel cannot fetch files.
    fn fetch_attachment<'a>(
        &'a self,
        req: &'a super::fetch::FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<super::fetch::Fetched, super::fetch::FetchError>> {
        let _ = req;
        let name = self.name();
        Box::pin(async move {
            Err(super::fetch::FetchError::Unsupported(format!(
                "the {name} channel cannot fetch attachments"
            )))
        })
    }

    /// The receiving side, for channels that receive (the inbound step).
    fn inbound(&self) -> Option<&dyn Inbound> {
        None
    }

    /// Long-running tasks that pull events from the channel instead of waiting for its webhook
    /// (Slack Socket Mode, Telegram `getUpdates`), each handing what it pulls to `sink`. The
    /// server spawns them at start and drops them at shutdown, so each must be cancel-safe:
    /// dropped at any await, it must have confirmed to the channel only events the sink said
    /// were durable (`Ok`). They run until dropped, retrying failures themselves. Default: none.
    fn pullers(&self, sink: Arc<dyn crate::inbound::Sink>) -> Vec<BoxFuture<'static, ()>> {
        let _ = sink;
        Vec::new()
    }
}

/// One webhook call as the inbound listener received it: the exact bytes, so a signature is
/// checked over what arrived.
pub struct WebhookRequest<'a> {
    pub method: &'a http::Method,
    /// The path below the listener, e.g. `/webhooks/slack/events`.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
    /// When the call arrived (seconds since the Unix epoch): timestamp windows are checked
    /// against it, so tests can pass their own clock.
    pub received_at: u64,
}

/// Why a webhook call was refused. The reason goes to the log and a metric, never on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The caller is not the channel (bad or missing signature, secret, token or timestamp):
    /// 401/403, nothing stored. The reason is a fixed phrase: it never quotes the request.
    #[error("not verified: {0}")]
    Unverified(&'static str),
    /// Verified, but not a body this channel sends: 400.
    #[error("unreadable: {0}")]
    Unreadable(String),
}

/// One event of a verified call, normalized into the model.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundEvent {
    /// The channel's own id for the event, which its retries repeat (Slack `event_id`,
    /// Messenger `mid`, Bot Framework activity `id`, Telegram `update_id`): the dedupe key.
    pub dedupe_key: String,
    /// The event as a v3 bot receives it: `address` ready to reply with (`user` the sender,
    /// `bot` the recipient, `id` the incoming message), `source_event[channel_id]` the native
    /// event as received.
    pub message: Message,
}

/// What a verified call carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub events: Vec<InboundEvent>,
    /// An answer the channel expects instead of an empty 200 (Slack's `url_verification`
    /// challenge, Messenger's `hub.challenge`).
    pub answer: Option<WebhookAnswer>,
    /// The channel shows the bot's answer to this call (a Slack slash command, a Bot Framework
    /// `invoke`) if it comes within the window; past it, the neutral answer goes.
    pub reply: Option<ReplyWindow>,
}

/// How long a channel waits for the answer to a call, and which kind of answer it takes (the
/// channel's own name for it, given back to [`Inbound::answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyWindow {
    pub kind: &'static str,
    /// From when the call arrived; shorter than the channel's own deadline, so the answer is
    /// written before the channel gives up.
    pub within: std::time::Duration,
}

/// A bot's answer to a call the channel waits on: a message (rendered the way the channel
/// shows a synchronous answer), or the raw JSON body (and status) the channel takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    pub message: Option<Message>,
    pub body: Option<serde_json::Value>,
    pub status: Option<u16>,
}

/// A body to answer a webhook call with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The receiving side of a channel: verify that a webhook call comes from the channel, then
/// parse it into events of the model, each with the address to reply to. Nothing here stores
/// or answers: the inbound listener does, after `verify` succeeded.
pub trait Inbound: Send + Sync {
    /// The paths under the inbound listener this channel answers.
    fn paths(&self) -> Vec<String>;

    /// Checks the call's signature, token or secret over the exact bytes received, in constant
    /// time. Async: the Bot Framework fetches (and caches) its signing keys.
    fn verify<'a>(&'a self, req: &'a WebhookRequest<'a>)
    -> BoxFuture<'a, Result<(), WebhookError>>;

    /// The events of a verified call (a batch gives several, in the channel's order); the bot's
    /// own messages and echoes are left out.
    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError>;

    /// The HTTP answer for a bot's `reply` to a call whose [`Parsed::reply`] named `kind`; an
    /// error (told to the bot, capped, never a secret) when the reply does not fit the kind.
    fn answer(&self, kind: &str, reply: &Reply) -> Result<WebhookAnswer, String> {
        let _ = (kind, reply);
        Err("this channel does not wait for an answer".into())
    }
}
