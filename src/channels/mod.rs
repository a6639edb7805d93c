//! Channels: each one a pure renderer (model -> native requests), an HTTP client, and its
//! config section; plus the routing from a channel id to its implementation.
//!
//! Owns everything channel-specific. Must not know about gRPC, sequencing or retries.

pub(crate) mod adaptive;
mod body;
pub mod botframework;
pub mod channel;
pub mod facebook;
pub mod fetch;
pub mod http;
pub(crate) mod markup;
pub mod shared;
pub mod slack;
pub mod telegram;
pub mod text;
mod types;
pub mod update;

use std::sync::Arc;
use std::time::Duration;

pub use body::{Body, ObjWriter};
pub use types::*;

pub(crate) use shared::{clear_text_refusal, fallback_keys_dropped, is_loopback};

use crate::config::Config;
use crate::model::{Address, Message, ProactiveOptions};
pub use channel::Channel;

/// Channel ids that the gateway knows but that arrive in later steps.
const PLANNED_CHANNELS: &[&str] = &["whatsapp"];

/// The channel ids of the default configuration: metric labels for them are static.
pub fn default_channel_ids() -> impl Iterator<Item = &'static str> {
    botframework::config::DEFAULT_BOTFRAMEWORK_CHANNEL_IDS
        .into_iter()
        .chain([
            facebook::render::CHANNEL,
            slack::render::CHANNEL_ID,
            telegram::CHANNEL_ID,
        ])
}

/// Builds every channel from its section. The registry: adding a channel is one line here.
fn build_all(config: &Config) -> Result<Vec<Arc<dyn Channel>>, String> {
    let timeout = config.delivery.request_timeout;
    let c = &config.channels;
    Ok(vec![
        Arc::new(botframework::BotFramework::new(&c.botframework, timeout)?),
        Arc::new(facebook::Facebook::new(&c.facebook, timeout)?),
        Arc::new(slack::Slack::new(&c.slack, timeout)?),
        Arc::new(telegram::Telegram::new(&c.telegram, timeout)?),
    ])
}

/// Why an address cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown channel `{0}`")]
    Unknown(String),
    #[error("channel `{channel_id}` is not configured: {reason}")]
    NotConfigured { channel_id: String, reason: String },
    /// The channel is served, but no configured credential matches the address's bot id;
    /// `reason` names the bot id and the configured ones (ids only, never a token).
    #[error("{reason}")]
    NoCredentials { channel_id: String, reason: String },
    #[error("{field}: {reason}")]
    PermissionDenied { field: String, reason: String },
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
}

/// A render that failed because of the message, or because the channel is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderOrRoute {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// Every channel, routed by channel id. Knows no channel by name beyond `build_all`.
pub struct Channels {
    all: Vec<Arc<dyn Channel>>,
    /// Channel id -> its channel. A handful of ids, looked up several times per message: a
    /// scan of short strings costs less than hashing one.
    routes: Vec<(String, Arc<dyn Channel>)>,
}

impl Channels {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let all = build_all(config)?;
        let mut routes: Vec<(String, Arc<dyn Channel>)> = Vec::new();
        for ch in &all {
            for id in ch.channel_ids() {
                if let Some((_, other)) = routes.iter().find(|(known, _)| *known == id) {
                    return Err(format!(
                        "channel id `{}` is served by both {} and {}: list it in one only",
                        crate::settings::capped(&id, 64),
                        other.section(),
                        ch.section()
                    ));
                }
                routes.push((id, ch.clone()));
            }
        }
        Ok(Self { all, routes })
    }

    /// The channel ids of every enabled channel, each with whether its channel fetches tokens.
    pub fn enabled_ids(&self) -> Vec<(String, bool)> {
        self.routes
            .iter()
            .filter(|(_, ch)| ch.enabled())
            .map(|(id, ch)| (id.clone(), ch.fetches_tokens()))
            .collect()
    }

    /// The channels that receive (their `inbound()` is set), for the webhook listener.
    pub fn receivers(&self) -> Vec<Arc<dyn Channel>> {
        self.all
            .iter()
            .filter(|c| c.enabled() && c.inbound().is_some())
            .cloned()
            .collect()
    }

    /// Every enabled channel's pullers (Socket Mode, long polling), feeding `sink`.
    pub fn pullers(
        &self,
        sink: &Arc<dyn crate::inbound::Sink>,
    ) -> Vec<futures::future::BoxFuture<'static, ()>> {
        self.all
            .iter()
            .filter(|c| c.enabled())
            .flat_map(|c| c.pullers(sink.clone()))
            .collect()
    }

    /// Token requests made so far, by channel id, over every channel that fetches tokens.
    pub fn token_fetches(&self) -> Vec<(crate::metrics::LabelValue, u64)> {
        self.all.iter().flat_map(|c| c.token_fetches()).collect()
    }

    fn route(&self, channel_id: &str) -> Result<&dyn Channel, RouteError> {
        if let Some((_, ch)) = self.routes.iter().find(|(id, _)| id == channel_id) {
            return Ok(ch.as_ref());
        }
        Err(match channel_id {
            id if PLANNED_CHANNELS.contains(&id) => RouteError::NotConfigured {
                channel_id: id.into(),
                reason: "this gateway has no client for it yet".into(),
            },
            id => RouteError::Unknown(id.into()),
        })
    }

    /// The channel serving `channel_id`, refused when its section is disabled.
    fn enabled(&self, channel_id: &str) -> Result<&dyn Channel, RouteError> {
        let ch = self.route(channel_id)?;
        if !ch.enabled() {
            return Err(RouteError::NotConfigured {
                channel_id: channel_id.into(),
                reason: format!("{}.enabled is false", ch.section()),
            });
        }
        Ok(ch)
    }

    /// What a channel supports, and whether this gateway can send on it: enabled, with
    /// credentials for at least one bot (or, for Bot Framework, `allow_unauthenticated`).
    pub fn capabilities(&self, channel_id: &str) -> Result<(Capabilities, bool), RouteError> {
        let ch = self.route(channel_id)?;
        Ok((ch.capabilities(channel_id), ch.configured()))
    }

    /// Checks, before accepting, that the address can be served with the configured credentials.
    /// `field` is the path of the address in the request.
    pub fn check_address(
        &self,
        addr: &Address,
        field: &dyn std::fmt::Display,
    ) -> Result<(), RouteError> {
        let id = addr.channel_id.as_str();
        let ch = self.enabled(id)?;
        ch.check_address(addr, field)?;
        let bot = addr.bot_id();
        if !ch.has_credentials(bot) {
            return Err(RouteError::NoCredentials {
                channel_id: id.into(),
                reason: shared::no_credentials(&ch.credential_hint(), bot),
            });
        }
        Ok(())
    }

    /// Renders a message for a conversation that exists; `proactive` is set for SendProactive.
    /// Works without credentials: only the channel id must be known.
    pub fn render_send(
        &self,
        msg: &Message,
        proactive: Option<&ProactiveOptions>,
    ) -> Result<Rendered, RenderOrRoute> {
        let ch = self.route(&msg.address.channel_id)?;
        Ok(ch.render_send(msg, proactive)?)
    }

    /// Renders a proactive start (address without conversation): any conversation creation, then each message.
    pub fn render_proactive(
        &self,
        messages: &[Message],
        options: &ProactiveOptions,
    ) -> Result<Rendered, RenderOrRoute> {
        let channel_id = messages
            .first()
            .map(|m| m.address.channel_id.as_str())
            .unwrap_or_default();
        let ch = self.route(channel_id)?;
        Ok(ch.render_proactive(messages, options)?)
    }

    /// Plans an update of a message sent before (`update::reconcile`); `msg` carries the sent
    /// message's address.
    pub fn render_update(
        &self,
        msg: &Message,
        receipts: &[NativeReceipt],
    ) -> Result<update::Plan, RenderOrRoute> {
        let ch = self.route(&msg.address.channel_id)?;
        Ok(ch.render_update(msg, receipts)?)
    }

    /// Plans the deletion of a message sent before to `addr`.
    pub fn render_delete(
        &self,
        addr: &crate::model::Address,
        receipts: &[NativeReceipt],
    ) -> Result<update::Plan, RenderOrRoute> {
        let ch = self.route(&addr.channel_id)?;
        Ok(ch.render_delete(addr, receipts)?)
    }

    fn unroutable(channel_id: &str, e: RouteError) -> ChannelError {
        ChannelError::new(channel_id, FailureKind::Permanent, e.to_string())
    }

    /// Makes one native request.
    pub async fn execute(
        &self,
        channel_id: &str,
        req: &NativeRequest,
    ) -> Result<NativeReceipt, ChannelError> {
        let ch = self
            .enabled(channel_id)
            .map_err(|e| Self::unroutable(channel_id, e))?;
        ch.execute(channel_id, req).await
    }

    /// Starts a conversation and returns the address to use from now on.
    pub async fn create_conversation(
        &self,
        addr: &Address,
        options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        let channel_id = addr.channel_id.as_str();
        let ch = self
            .enabled(channel_id)
            .map_err(|e| Self::unroutable(channel_id, e))?;
        ch.create_conversation(addr, options).await
    }

    /// The conversation a proactive start to `addr` lands in, when its channel knows it without
    /// a call.
    pub fn known_conversation(&self, addr: &Address) -> Option<String> {
        self.route(&addr.channel_id)
            .ok()?
            .known_conversation(addr)
            .filter(|id| !id.is_empty())
    }

    /// Starts fetching a file a person sent on `req.channel_id` (FetchAttachment): the
    /// channel checks the URL and the bot's credentials, then streams the bytes.
    pub async fn fetch_attachment(
        &self,
        req: &fetch::FetchRequest<'_>,
    ) -> Result<fetch::Fetched, fetch::FetchError> {
        let ch = self.enabled(req.channel_id)?;
        ch.fetch_attachment(req).await
    }

    /// How often a kept-alive typing indicator repeats on this channel.
    pub fn typing_interval(&self, channel_id: &str) -> Duration {
        self.capabilities(channel_id)
            .map(|(c, _)| c.typing_interval)
            .ok()
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_id_claimed_by_two_channels_is_refused_naming_both() {
        let mut config = Config::default();
        config
            .channels
            .botframework
            .channel_ids
            .push("slack".into());
        let e = Channels::from_config(&config).err().unwrap_or_default();
        assert!(e.contains("`slack`"), "{e}");
        assert!(
            e.contains("channels.botframework") && e.contains("channels.slack"),
            "{e}"
        );
    }

    #[test]
    fn every_channel_id_routes_to_the_channel_that_claims_it() {
        let channels = Channels::from_config(&Config::default()).unwrap();
        for (id, want) in [
            ("msteams", "botframework"),
            ("webchat", "botframework"),
            ("facebook", "facebook"),
            ("slack", "slack"),
            ("telegram", "telegram"),
        ] {
            let (caps, _) = channels.capabilities(id).unwrap();
            assert_eq!(caps.implementation, want, "{id}");
            assert_eq!(caps.channel_id, id);
        }
        assert!(matches!(
            channels.capabilities("nope"),
            Err(RouteError::Unknown(_))
        ));
    }
}
