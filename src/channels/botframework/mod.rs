//! Bot Framework Connector v3 (Skype, Teams, Web Chat, Direct Line, Emulator): pure render,
//! the connector client (tokens, service-URL allow-list), and the `[channels.botframework]`
//! config section. One implementation serves several channel ids.

pub mod client;
pub mod config;
pub mod fetch;
pub mod inbound;
pub mod render;

use std::fmt::Display;
use std::time::Duration;

use futures::future::BoxFuture;

use super::channel::Channel;
use super::shared::CredentialHint;
use super::{
    Capabilities, ChannelError, FailureKind, NativeReceipt, NativeRequest, RenderError, Rendered,
    RouteError,
};
use crate::model::{Address, Message, ProactiveOptions};
use client::BotFrameworkClient;
use config::BotFrameworkConfig;

const NAME: &str = "botframework";

/// The Bot Framework Connector behind the `Channel` interface.
pub struct BotFramework {
    config: BotFrameworkConfig,
    /// Built even when the section is disabled (the registry then never calls it).
    client: BotFrameworkClient,
    inbound: inbound::BotFrameworkInbound,
    /// Whether any bot is configured: a token's audience must be one, so without any nothing
    /// could verify (asked on every webhook call).
    receives: bool,
}

impl BotFramework {
    pub fn new(config: &BotFrameworkConfig, request_timeout: Duration) -> Result<Self, String> {
        let inbound = inbound::BotFrameworkInbound::new(config, request_timeout)?;
        Ok(Self {
            client: BotFrameworkClient::new(config.clone(), request_timeout)?
                .with_trusted(inbound.trusted()),
            inbound,
            receives: !config.credentials().is_empty(),
            config: config.clone(),
        })
    }

    /// Without `teams_pacing`, Teams' documented budgets are not applied (its scopes stay, for
    /// 429 pauses).
    fn pace_teams(&self, mut r: Rendered) -> Rendered {
        if !self.config.teams_pacing {
            for req in &mut r.requests {
                req.rate.drop_budgets();
            }
        }
        r
    }
}

impl Channel for BotFramework {
    fn name(&self) -> &'static str {
        NAME
    }

    fn section(&self) -> &'static str {
        "channels.botframework"
    }

    fn channel_ids(&self) -> Vec<String> {
        self.config.channel_ids.clone()
    }

    fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn capabilities(&self, channel_id: &str) -> Capabilities {
        let mut caps = render::capabilities(channel_id);
        caps.typing_interval = self.config.typing_interval;
        caps
    }

    fn configured(&self) -> bool {
        self.config.enabled
            && (self.client.has_any_credentials() || self.config.allow_unauthenticated)
    }

    fn has_credentials(&self, bot_id: &str) -> bool {
        self.client.has_credentials(bot_id) || self.config.allow_unauthenticated
    }

    fn credential_hint(&self) -> CredentialHint {
        CredentialHint {
            what: "bot",
            key: "app_id",
            section: "channels.botframework.bots (or app_id and app_password; or \
                      allow_unauthenticated for the Emulator)",
            ids: self.config.credentials().into_keys().collect(),
        }
    }

    fn check_address(&self, addr: &Address, field: &dyn Display) -> Result<(), RouteError> {
        let service_url = addr.service_url.as_deref().unwrap_or_default();
        if service_url.is_empty() {
            return Err(RouteError::InvalidArgument {
                field: format!("{field}.service_url"),
                reason: "required for Bot Framework channels".into(),
            });
        }
        match self.client.refusal_for(addr.bot_id(), service_url) {
            Some(reason) => Err(RouteError::PermissionDenied {
                field: format!("{field}.service_url"),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn render_send(
        &self,
        msg: &Message,
        _proactive: Option<&ProactiveOptions>,
    ) -> Result<Rendered, RenderError> {
        render::render_send(msg).map(|r| self.pace_teams(r))
    }

    fn render_proactive(
        &self,
        messages: &[Message],
        options: &ProactiveOptions,
    ) -> Result<Rendered, RenderError> {
        render::render_proactive(messages, options).map(|r| self.pace_teams(r))
    }

    fn render_update(
        &self,
        msg: &Message,
        receipts: &[NativeReceipt],
    ) -> Result<crate::channels::update::Plan, RenderError> {
        let mut plan = render::render_update(msg, receipts)?;
        plan.rendered = self.pace_teams(plan.rendered);
        Ok(plan)
    }

    fn render_delete(
        &self,
        addr: &Address,
        receipts: &[NativeReceipt],
    ) -> Result<crate::channels::update::Plan, RenderError> {
        let mut plan = render::render_delete(addr, receipts)?;
        plan.rendered = self.pace_teams(plan.rendered);
        Ok(plan)
    }

    fn execute<'a>(
        &'a self,
        channel_id: &'a str,
        req: &'a NativeRequest,
    ) -> BoxFuture<'a, Result<NativeReceipt, ChannelError>> {
        Box::pin(async move {
            let client = &self.client;
            client::FOR_CHANNEL
                .scope(
                    crate::metrics::channel_label(channel_id),
                    client.execute(req),
                )
                .await
        })
    }

    fn create_conversation<'a>(
        &'a self,
        addr: &'a Address,
        options: &'a ProactiveOptions,
    ) -> BoxFuture<'a, Result<Address, ChannelError>> {
        Box::pin(async move {
            let client = &self.client;
            let req = render::render_create_conversation(addr, options)
                .map_err(|e| ChannelError::new(NAME, FailureKind::Permanent, e.to_string()))?;
            let created = client::FOR_CHANNEL
                .scope(
                    crate::metrics::channel_label(&addr.channel_id),
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
        })
    }

    fn fetches_tokens(&self) -> bool {
        true
    }

    fn token_fetches(&self) -> Vec<(crate::metrics::LabelValue, u64)> {
        self.client.token_fetches()
    }

    fn fetch_attachment<'a>(
        &'a self,
        req: &'a crate::channels::fetch::FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<crate::channels::fetch::Fetched, crate::channels::fetch::FetchError>>
    {
        Box::pin(fetch::fetch(self, req))
    }

    fn inbound(&self) -> Option<&dyn super::channel::Inbound> {
        self.receives
            .then_some(&self.inbound as &dyn super::channel::Inbound)
    }
}
