//! Channels: each one a pure renderer (model -> native requests), an HTTP client, and its
//! config section; plus the routing from a channel id to its implementation.
//!
//! Owns everything channel-specific. Must not know about gRPC, sequencing or retries.

mod body;
pub mod botframework;
pub mod channel;
pub mod facebook;
pub mod http;
pub mod shared;
pub mod slack;
pub mod telegram;
pub mod text;
mod types;

use std::sync::Arc;
use std::time::Duration;

pub use body::{Body, ObjWriter};
pub use types::*;

pub(crate) use shared::{clear_text_refusal, fallback_keys_dropped, is_loopback};

use crate::config::Config;
use crate::model::{Address, Message, ProactiveOptions};
use botframework::client::BotFrameworkClient;
use facebook::client::FacebookClient;
use slack::client::SlackClient;

/// Channel ids that the gateway knows but that arrive in later steps.
const PLANNED_CHANNELS: &[&str] = &["telegram", "whatsapp"];

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

/// The implementation serving a channel id, with or without a usable client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Implementation {
    BotFramework,
    Facebook,
    Slack,
}

impl Implementation {
    fn section(self) -> &'static str {
        match self {
            Self::BotFramework => "channels.botframework",
            Self::Facebook => "channels.facebook",
            Self::Slack => "channels.slack",
        }
    }
}

/// Every channel implementation, routed by channel id.
pub struct Channels {
    botframework: Option<Arc<BotFrameworkClient>>,
    /// A handful of ids, looked up several times per message: a scan of short strings costs
    /// less than hashing one.
    botframework_ids: Vec<String>,
    facebook: Option<Arc<FacebookClient>>,
    slack: Option<Arc<SlackClient>>,
    /// Kept for rendering, which needs no client (and no credentials).
    config: Config,
}

impl Channels {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let timeout = config.delivery.request_timeout;
        let c = &config.channels;
        Ok(Self {
            botframework: match c.botframework.enabled {
                true => Some(Arc::new(BotFrameworkClient::new(
                    c.botframework.clone(),
                    timeout,
                )?)),
                false => None,
            },
            botframework_ids: c.botframework.channel_ids.clone(),
            facebook: match c.facebook.enabled {
                true => Some(Arc::new(FacebookClient::new(c.facebook.clone(), timeout)?)),
                false => None,
            },
            slack: match c.slack.enabled {
                true => Some(Arc::new(SlackClient::new(c.slack.clone(), timeout)?)),
                false => None,
            },
            config: config.clone(),
        })
    }

    pub fn botframework(&self) -> Option<&BotFrameworkClient> {
        self.botframework.as_deref()
    }

    fn implementation(&self, channel_id: &str) -> Result<Implementation, RouteError> {
        match channel_id {
            "facebook" => Ok(Implementation::Facebook),
            "slack" => Ok(Implementation::Slack),
            id if self.botframework_ids.iter().any(|b| b == id) => Ok(Implementation::BotFramework),
            id if PLANNED_CHANNELS.contains(&id) => Err(RouteError::NotConfigured {
                channel_id: id.into(),
                reason: "this gateway has no client for it yet".into(),
            }),
            id => Err(RouteError::Unknown(id.into())),
        }
    }

    fn disabled(channel_id: &str, imp: Implementation) -> RouteError {
        RouteError::NotConfigured {
            channel_id: channel_id.into(),
            reason: format!("{}.enabled is false", imp.section()),
        }
    }

    /// What a channel supports, and whether this gateway can send on it: enabled, with
    /// credentials for at least one bot (or, for Bot Framework, `allow_unauthenticated`).
    pub fn capabilities(&self, channel_id: &str) -> Result<(Capabilities, bool), RouteError> {
        let imp = self.implementation(channel_id)?;
        Ok(match imp {
            Implementation::BotFramework => {
                let mut caps = botframework::render::capabilities(channel_id);
                caps.typing_interval = self.config.channels.botframework.typing_interval;
                let configured = self
                    .botframework
                    .as_deref()
                    .is_some_and(|c| c.has_any_credentials() || c.config().allow_unauthenticated);
                (caps, configured)
            }
            Implementation::Facebook => {
                let mut caps = facebook::render::capabilities(channel_id);
                caps.typing_interval = self.config.channels.facebook.typing_interval;
                let configured = self
                    .facebook
                    .as_deref()
                    .is_some_and(FacebookClient::has_any_credentials);
                (caps, configured)
            }
            Implementation::Slack => (
                slack::render::capabilities(channel_id),
                self.slack
                    .as_deref()
                    .is_some_and(SlackClient::has_any_credentials),
            ),
        })
    }

    /// Checks, before accepting, that the address can be served with the configured credentials.
    /// `field` is the path of the address in the request.
    pub fn check_address(
        &self,
        addr: &Address,
        field: &dyn std::fmt::Display,
    ) -> Result<(), RouteError> {
        let id = addr.channel_id.as_str();
        let imp = self.implementation(id)?;
        let bot = addr.bot_id();
        let has_credentials = match imp {
            Implementation::BotFramework => {
                let c = self
                    .botframework
                    .as_deref()
                    .ok_or_else(|| Self::disabled(id, imp))?;
                let service_url = addr.service_url.as_deref().unwrap_or_default();
                if service_url.is_empty() {
                    return Err(RouteError::InvalidArgument {
                        field: format!("{field}.service_url"),
                        reason: "required for Bot Framework channels".into(),
                    });
                }
                if let Some(reason) = c.refusal(service_url) {
                    return Err(RouteError::PermissionDenied {
                        field: format!("{field}.service_url"),
                        reason,
                    });
                }
                c.has_credentials(bot) || c.config().allow_unauthenticated
            }
            Implementation::Facebook => self
                .facebook
                .as_deref()
                .ok_or_else(|| Self::disabled(id, imp))?
                .has_credentials(bot),
            Implementation::Slack => self
                .slack
                .as_deref()
                .ok_or_else(|| Self::disabled(id, imp))?
                .has_credentials(bot),
        };
        if !has_credentials {
            return Err(RouteError::NoCredentials {
                channel_id: id.into(),
                reason: self.no_credentials(imp, bot),
            });
        }
        Ok(())
    }

    /// "no workspace has bot_id `B9` (configured: `B1`, `B2`)": what the bot id was matched
    /// against, by id only. The list is capped; the bot id from the request is too.
    fn no_credentials(&self, imp: Implementation, bot: &str) -> String {
        const SHOWN: usize = 5;
        let c = &self.config.channels;
        let (what, key, section, ids): (&str, &str, &str, Vec<String>) = match imp {
            Implementation::BotFramework => (
                "bot",
                "app_id",
                "channels.botframework.bots (or app_id and app_password; or \
                 allow_unauthenticated for the Emulator)",
                c.botframework.credentials().into_keys().collect(),
            ),
            Implementation::Facebook => (
                "page",
                "page_id",
                "channels.facebook.pages (or page_id and access_token)",
                c.facebook
                    .all_pages()
                    .into_iter()
                    .map(|p| p.page_id)
                    .collect(),
            ),
            Implementation::Slack => (
                "workspace",
                "bot_id",
                "channels.slack.workspaces",
                c.slack
                    .workspaces
                    .iter()
                    .map(|w| w.bot_id.clone())
                    .collect(),
            ),
        };
        let capped = |s: &str| match s.char_indices().nth(64) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s.to_string(),
        };
        let bot = if bot.is_empty() {
            "(address.bot.id is empty)".to_string()
        } else {
            format!("`{}`", capped(bot))
        };
        let configured = match ids.len() {
            0 => format!("none is configured: set {section}"),
            n => {
                let mut list: Vec<String> = ids
                    .iter()
                    .take(SHOWN)
                    .map(|i| format!("`{}`", capped(i)))
                    .collect();
                if n > SHOWN {
                    list.push(format!("and {} more", n - SHOWN));
                }
                format!("configured: {}; {section}", list.join(", "))
            }
        };
        format!("no {what} has {key} {bot} ({configured})")
    }

    /// Renders a message for a conversation that exists; `proactive` is set for SendProactive.
    /// Works without credentials: only the channel id must be known.
    pub fn render_send(
        &self,
        msg: &Message,
        proactive: Option<&ProactiveOptions>,
    ) -> Result<Rendered, RenderOrRoute> {
        let c = &self.config.channels;
        Ok(match self.implementation(&msg.address.channel_id)? {
            Implementation::BotFramework => {
                let mut r = botframework::render::render_send(msg)?;
                self.pace_teams(&mut r);
                r
            }
            Implementation::Facebook => facebook::render::render_send(msg, proactive, &c.facebook)?,
            Implementation::Slack => slack::render::render_send(msg, proactive, &c.slack)?,
        })
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
        let c = &self.config.channels;
        Ok(match self.implementation(channel_id)? {
            Implementation::BotFramework => {
                let mut r = botframework::render::render_proactive(messages, options)?;
                self.pace_teams(&mut r);
                r
            }
            Implementation::Facebook => {
                facebook::render::render_proactive(messages, options, &c.facebook)?
            }
            Implementation::Slack => slack::render::render_proactive(messages, options, &c.slack)?,
        })
    }

    /// Without `channels.botframework.teams_pacing`, Teams' documented budgets are not applied
    /// (its scopes stay, for 429 pauses).
    fn pace_teams(&self, r: &mut Rendered) {
        if !self.config.channels.botframework.teams_pacing {
            for req in &mut r.requests {
                req.rate.drop_budgets();
            }
        }
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
        let imp = self
            .implementation(channel_id)
            .map_err(|e| Self::unroutable(channel_id, e))?;
        let off = || Self::unroutable(channel_id, Self::disabled(channel_id, imp));
        match imp {
            Implementation::BotFramework => {
                let client = self.botframework.as_deref().ok_or_else(off)?;
                botframework::client::FOR_CHANNEL
                    .scope(
                        crate::metrics::channel_label(channel_id),
                        client.execute(req),
                    )
                    .await
            }
            Implementation::Facebook => {
                self.facebook.as_deref().ok_or_else(off)?.execute(req).await
            }
            Implementation::Slack => self.slack.as_deref().ok_or_else(off)?.execute(req).await,
        }
    }

    /// Starts a conversation and returns the address to use from now on.
    pub async fn create_conversation(
        &self,
        addr: &Address,
        options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        let channel_id = addr.channel_id.as_str();
        let imp = self
            .implementation(channel_id)
            .map_err(|e| Self::unroutable(channel_id, e))?;
        let off = || Self::unroutable(channel_id, Self::disabled(channel_id, imp));
        match imp {
            Implementation::BotFramework => {
                let client = self.botframework.as_deref().ok_or_else(off)?;
                let req = botframework::render::render_create_conversation(addr, options).map_err(
                    |e| ChannelError::new("botframework", FailureKind::Permanent, e.to_string()),
                )?;
                let created = botframework::client::FOR_CHANNEL
                    .scope(
                        crate::metrics::channel_label(channel_id),
                        client.create_conversation(&req),
                    )
                    .await?;
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
            Implementation::Facebook => {
                self.facebook
                    .as_deref()
                    .ok_or_else(off)?
                    .create_conversation(addr, options)
                    .await
            }
            Implementation::Slack => {
                self.slack
                    .as_deref()
                    .ok_or_else(off)?
                    .create_conversation(addr, options)
                    .await
            }
        }
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
