//! Slack channel: pure render (model -> Web API requests, with Block Kit and mrkdwn), the HTTP
//! client, and its config section.

pub mod blocks;
pub mod client;
pub mod config;
pub mod inbound;
pub mod mrkdwn;
pub mod render;

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

    fn inbound(&self) -> Option<&dyn Inbound> {
        self.inbound.as_ref().map(|i| i as &dyn Inbound)
    }
}
