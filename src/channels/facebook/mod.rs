//! Facebook Messenger channel: pure render (model -> Send API requests), the Graph API client,
//! and the `[channels.facebook]` config section.

pub mod client;
pub mod config;
pub mod fetch;
pub mod inbound;
mod money;
pub mod render;
mod text;

use std::time::Duration;

use futures::future::BoxFuture;

use super::channel::Channel;
use super::shared::CredentialHint;
use super::{Capabilities, ChannelError, NativeReceipt, NativeRequest, RenderError, Rendered};
use crate::model::{Address, Message, ProactiveOptions};
use client::FacebookClient;
use config::FacebookConfig;

/// Messenger behind the `Channel` interface.
pub struct Facebook {
    config: FacebookConfig,
    /// Built even when the section is disabled (the registry then never calls it).
    client: FacebookClient,
}

impl Facebook {
    pub fn new(config: &FacebookConfig, request_timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: FacebookClient::new(config.clone(), request_timeout)?,
            config: config.clone(),
        })
    }
}

impl Channel for Facebook {
    fn name(&self) -> &'static str {
        render::CHANNEL
    }

    fn section(&self) -> &'static str {
        "channels.facebook"
    }

    fn channel_ids(&self) -> Vec<String> {
        vec![render::CHANNEL.to_string()]
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
        self.config.enabled && self.client.has_any_credentials()
    }

    fn has_credentials(&self, bot_id: &str) -> bool {
        self.client.has_credentials(bot_id)
    }

    fn credential_hint(&self) -> CredentialHint {
        CredentialHint {
            what: "page",
            key: "page_id",
            section: "channels.facebook.pages (or page_id and access_token)",
            ids: self
                .config
                .all_pages()
                .into_iter()
                .map(|p| p.page_id)
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

    fn known_conversation(&self, addr: &Address) -> Option<String> {
        Some(addr.user_id().to_string())
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

    fn inbound(&self) -> Option<&dyn super::channel::Inbound> {
        self.receives()
            .then_some(self as &dyn super::channel::Inbound)
    }
}
