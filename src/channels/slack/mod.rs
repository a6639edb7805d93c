//! Slack channel: pure render (model -> Web API requests, with Block Kit and mrkdwn), the HTTP
//! client, receiving (Events API webhooks, or Socket Mode per workspace), and its config
//! section.

pub mod blocks;
pub mod client;
pub mod config;
pub mod fetch;
pub mod inbound;
pub mod mrkdwn;
pub mod render;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::channel::{Channel, Inbound};
use super::shared::CredentialHint;
use super::{Capabilities, ChannelError, NativeReceipt, NativeRequest, RenderError, Rendered};
use crate::model::{Address, Message, ProactiveOptions};
use client::SlackClient;
use config::SlackConfig;

/// Slack behind the `Channel` interface.
pub struct Slack {
    config: SlackConfig,
    /// Built even when the section is disabled (the registry then never calls it).
    client: SlackClient,
    /// `None` without a signing secret.
    inbound: Option<inbound::SlackInbound>,
}

impl Slack {
    pub fn new(config: &SlackConfig, request_timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: SlackClient::new(config.clone(), request_timeout)?,
            config: config.clone(),
            inbound: inbound::SlackInbound::new(config),
        })
    }
}

impl Channel for Slack {
    fn name(&self) -> &'static str {
        render::CHANNEL_ID
    }

    fn section(&self) -> &'static str {
        "channels.slack"
    }

    fn channel_ids(&self) -> Vec<String> {
        vec![render::CHANNEL_ID.to_string()]
    }

    fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn capabilities(&self, channel_id: &str) -> Capabilities {
        render::capabilities(channel_id)
    }

    fn configured(&self) -> bool {
        self.config.enabled && self.client.has_any_credentials()
    }

    fn has_credentials(&self, bot_id: &str) -> bool {
        self.client.has_credentials(bot_id)
    }

    fn credential_hint(&self) -> CredentialHint {
        CredentialHint {
            what: "workspace",
            key: "bot_id",
            section: "channels.slack.workspaces",
            ids: self
                .config
                .workspaces
                .iter()
                .map(|w| w.bot_id.clone())
                .collect(),
        }
    }

    fn render_send(
        &self,
        msg: &Message,
        proactive: Option<&ProactiveOptions>,
    ) -> Result<Rendered, RenderError> {
        render::render_send(msg, proactive, &self.config)
    }

    fn render_proactive(
        &self,
        messages: &[Message],
        options: &ProactiveOptions,
    ) -> Result<Rendered, RenderError> {
        render::render_proactive(messages, options, &self.config)
    }

    fn render_update(
        &self,
        msg: &Message,
        receipts: &[NativeReceipt],
    ) -> Result<crate::channels::update::Plan, RenderError> {
        render::render_update(msg, receipts, &self.config)
    }

    fn render_delete(
        &self,
        addr: &Address,
        receipts: &[NativeReceipt],
    ) -> Result<crate::channels::update::Plan, RenderError> {
        render::render_delete(addr, receipts, &self.config)
    }

    fn execute<'a>(
        &'a self,
        _channel_id: &'a str,
        req: &'a NativeRequest,
    ) -> BoxFuture<'a, Result<NativeReceipt, ChannelError>> {
        Box::pin(async move { self.client.execute(req).await })
    }

    fn create_conversation<'a>(
        &'a self,
        addr: &'a Address,
        options: &'a ProactiveOptions,
    ) -> BoxFuture<'a, Result<Address, ChannelError>> {
        Box::pin(async move { self.client.create_conversation(addr, options).await })
    }

    fn fetch_attachment<'a>(
        &'a self,
        req: &'a crate::channels::fetch::FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<crate::channels::fetch::Fetched, crate::channels::fetch::FetchError>>
    {
        Box::pin(fetch::fetch(self, req))
    }

    fn inbound(&self) -> Option<&dyn Inbound> {
        self.inbound.as_ref().map(|i| i as &dyn Inbound)
    }

    /// One Socket Mode connection per app-level token of the workspaces with
    /// `receive = "socket_mode"`, when the section is enabled: workspaces of one app share its
    /// token, and one connection receives all of that app's events.
    fn pullers(&self, sink: Arc<dyn crate::inbound::Sink>) -> Vec<BoxFuture<'static, ()>> {
        if !self.config.enabled {
            return Vec::new();
        }
        let mut tokens: Vec<&crate::settings::Secret> = Vec::new();
        for w in &self.config.workspaces {
            if w.receive != config::Receive::SocketMode {
                continue;
            }
            if let Some(t) = &w.app_token
                && !tokens.iter().any(|seen| seen.expose() == t.expose())
            {
                tokens.push(t);
            }
        }
        tokens
            .into_iter()
            .filter_map(|t| {
                match socket::SocketMode::new(&self.config, t.clone(), socket::Timing::default()) {
                    Ok(s) => Some(Box::pin(s.run(sink.clone())) as BoxFuture<'static, ()>),
                    Err(e) => {
                        tracing::error!(error = %crate::bounded::for_log(&e), "slack: cannot start Socket Mode");
                        None
                    }
                }
            })
            .collect()
    }
}
