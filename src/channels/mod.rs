//! Channels: each one a pure renderer (model -> native requests) and an HTTP client.
//!
//! Owns everything channel-specific and the routing from a channel id to its implementation.
//! Must not know about gRPC, sequencing or retries.

pub mod botframework;
mod types;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub use types::*;

use crate::config::Config;
use crate::model::{Address, Message, ProactiveOptions};
use botframework::client::{BotFrameworkClient, service_url_refusal};

/// Channel ids that the gateway knows but that arrive in later steps.
const PLANNED_CHANNELS: &[&str] = &["facebook", "slack", "telegram", "whatsapp"];

/// Why an address cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown channel `{0}`")]
    Unknown(String),
    #[error("channel `{channel_id}` is not configured: {reason}")]
    NotConfigured { channel_id: String, reason: String },
    #[error("{field}: {reason}")]
    PermissionDenied { field: String, reason: String },
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
}

enum Route<'a> {
    BotFramework(&'a BotFrameworkClient),
}

/// Every channel implementation, routed by channel id.
pub struct Channels {
    botframework: Option<Arc<BotFrameworkClient>>,
    botframework_ids: HashSet<String>,
}

impl Channels {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let bf = &config.channels.botframework;
        let botframework = if bf.enabled {
            Some(Arc::new(BotFrameworkClient::new(
                bf.clone(),
                config.delivery.request_timeout,
            )?))
        } else {
            None
        };
        Ok(Self {
            botframework,
            botframework_ids: bf.channel_ids.iter().cloned().collect(),
        })
    }

    pub fn botframework(&self) -> Option<&BotFrameworkClient> {
        self.botframework.as_deref()
    }

    fn route(&self, channel_id: &str) -> Result<Route<'_>, RouteError> {
        if self.botframework_ids.contains(channel_id) {
            return match &self.botframework {
                Some(c) => Ok(Route::BotFramework(c)),
                None => Err(RouteError::NotConfigured {
                    channel_id: channel_id.into(),
                    reason: "channels.botframework.enabled is false".into(),
                }),
            };
        }
        if PLANNED_CHANNELS.contains(&channel_id) {
            return Err(RouteError::NotConfigured {
                channel_id: channel_id.into(),
                reason: "this gateway has no client for it yet".into(),
            });
        }
        Err(RouteError::Unknown(channel_id.into()))
    }

    /// Whether `channel_id` is one the gateway can route (configured or not).
    pub fn capabilities(&self, channel_id: &str) -> Result<(Capabilities, bool), RouteError> {
        match self.route(channel_id) {
            Ok(Route::BotFramework(c)) => {
                let mut caps = botframework::render::capabilities(channel_id);
                caps.typing_interval = c.config().typing_interval;
                Ok((caps, true))
            }
            Err(RouteError::NotConfigured { .. }) if self.botframework_ids.contains(channel_id) => {
                Ok((botframework::render::capabilities(channel_id), false))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks, before accepting, that the address can be served with the configured credentials.
    /// `field` is the path of the address in the request.
    pub fn check_address(&self, addr: &Address, field: &str) -> Result<(), RouteError> {
        match self.route(&addr.channel_id)? {
            Route::BotFramework(c) => {
                let service_url = addr.service_url.as_deref().unwrap_or_default();
                if service_url.is_empty() {
                    return Err(RouteError::InvalidArgument {
                        field: format!("{field}.service_url"),
                        reason: "required for Bot Framework channels".into(),
                    });
                }
                if let Some(reason) =
                    service_url_refusal(&c.config().allowed_service_hosts, service_url)
                {
                    return Err(RouteError::PermissionDenied {
                        field: format!("{field}.service_url"),
                        reason,
                    });
                }
                let bot = addr.bot_id();
                if !c.has_credentials(bot) && !c.config().allow_unauthenticated {
                    return Err(RouteError::NotConfigured {
                        channel_id: addr.channel_id.clone(),
                        reason: format!(
                            "no credentials for bot `{bot}` (channels.botframework.bots, or allow_unauthenticated)"
                        ),
                    });
                }
                Ok(())
            }
        }
    }

    /// Renders a message for a conversation that exists. Routing errors surface as render errors
    /// only for Render (dry run); Send checks the address first.
    pub fn render_send(&self, msg: &Message) -> Result<Rendered, RenderOrRoute> {
        match self.route_for_render(&msg.address.channel_id)? {
            Implementation::BotFramework => Ok(botframework::render::render_send(msg)?),
        }
    }

    /// Renders a proactive start: the create request, then each message.
    pub fn render_proactive(
        &self,
        messages: &[Message],
        options: &ProactiveOptions,
    ) -> Result<Rendered, RenderOrRoute> {
        let channel_id = messages
            .first()
            .map(|m| m.address.channel_id.as_str())
            .unwrap_or_default();
        match self.route_for_render(channel_id)? {
            Implementation::BotFramework => {
                Ok(botframework::render::render_proactive(messages, options)?)
            }
        }
    }

    // Render works without credentials or configuration: only the channel id must be known.
    fn route_for_render(&self, channel_id: &str) -> Result<Implementation, RouteError> {
        if self.botframework_ids.contains(channel_id) {
            return Ok(Implementation::BotFramework);
        }
        self.route(channel_id).map(|_| Implementation::BotFramework)
    }

    /// Makes one native request.
    pub async fn execute(
        &self,
        channel_id: &str,
        req: &NativeRequest,
    ) -> Result<NativeReceipt, ChannelError> {
        match self.route(channel_id) {
            Ok(Route::BotFramework(c)) => c.execute(req).await,
            Err(e) => Err(ChannelError::new(
                channel_id,
                FailureKind::Permanent,
                e.to_string(),
            )),
        }
    }

    /// Starts a conversation and returns the address to use from now on.
    pub async fn create_conversation(
        &self,
        addr: &Address,
        options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        let client = match self.route(&addr.channel_id) {
            Ok(Route::BotFramework(c)) => c,
            Err(e) => {
                return Err(ChannelError::new(
                    &addr.channel_id,
                    FailureKind::Permanent,
                    e.to_string(),
                ));
            }
        };
        let req = botframework::render::render_create_conversation(addr, options).map_err(|e| {
            ChannelError::new("botframework", FailureKind::Permanent, e.to_string())
        })?;
        let created = client.create_conversation(&req).await?;
        let mut out = addr.clone();
        let mut conv = out.conversation.take().unwrap_or_default();
        conv.id = created.id;
        if options.is_group {
            conv.is_group = Some(true);
        }
        if let Some(url) = created.service_url.filter(|u| !u.is_empty()) {
            out.service_url = Some(url);
        }
        out.conversation = Some(conv);
        out.id = None;
        Ok(out)
    }

    pub fn typing_interval(&self, channel_id: &str) -> Duration {
        match self.route(channel_id) {
            Ok(Route::BotFramework(c)) => c.config().typing_interval,
            Err(_) => Duration::from_secs(3),
        }
    }
}

enum Implementation {
    BotFramework,
}

/// A render that failed because of the message, or because the channel is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderOrRoute {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Route(#[from] RouteError),
}
