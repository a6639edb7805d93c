//! Telegram Bot API channel: pure render (model -> Bot API calls, with Telegram's HTML subset),
//! the HTTP client, and the `[channels.telegram]` config section.
//!
//! The bot's token is part of every Bot API URL's path (`/bot<token>/METHOD`). A rendered
//! request's URL carries the literal placeholder [`TOKEN_PLACEHOLDER`] instead, so Render, the
//! outbox, logs and errors never hold a token; only the client puts the token in, at send time.

pub mod client;
pub mod config;
pub mod html;
pub mod render;
pub mod split;

/// The channel id.
pub const CHANNEL_ID: &str = "telegram";

/// What stands for the token in a rendered URL: `{api_base_url}/bot<token>/sendMessage`.
pub const TOKEN_PLACEHOLDER: &str = "<token>";

/// The rendered URL of a Bot API method: the token is left as [`TOKEN_PLACEHOLDER`].
pub fn method_url(config: &config::TelegramConfig, method: &str) -> String {
    format!("{}/bot{TOKEN_PLACEHOLDER}/{method}", config.api_base())
}

use std::time::Duration;

use futures::future::BoxFuture;

use super::channel::Channel;
use super::shared::CredentialHint;
use super::{Capabilities, ChannelError, NativeReceipt, NativeRequest, RenderError, Rendered};
use crate::model::{Address, Message, ProactiveOptions};
use client::TelegramClient;
use config::TelegramConfig;

/// The Telegram Bot API behind the `Channel` interface.
pub struct Telegram {
    config: TelegramConfig,
    /// Built even when the section is disabled (the registry then never calls it).
    client: TelegramClient,
}

impl Telegram {
    pub fn new(config: &TelegramConfig, request_timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: TelegramClient::new(config.clone(), request_timeout)?,
            config: config.clone(),
        })
    }
}

impl Channel for Telegram {
    fn name(&self) -> &'static str {
        CHANNEL_ID
    }

    fn section(&self) -> &'static str {
        "channels.telegram"
    }

    fn channel_ids(&self) -> Vec<String> {
        vec![CHANNEL_ID.to_string()]
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
        self.client.credential_hint()
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
}
