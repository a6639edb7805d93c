//! Telegram Bot API channel: pure render (model -> Bot API calls, with Telegram's HTML subset),
//! the HTTP client, receiving (webhook, or `getUpdates` polling per bot), and the
//! `[channels.telegram]` config section.
//!
//! The bot's token is part of every Bot API URL's path (`/bot<token>/METHOD`). A rendered
//! request's URL carries the literal placeholder [`TOKEN_PLACEHOLDER`] instead, so Render, the
//! outbox, logs and errors never hold a token; only the client puts the token in, at send time.

pub mod client;
pub mod config;
pub mod fetch;
pub mod html;
pub mod inbound;
pub mod polling;
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

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::channel::Channel;
use super::shared::CredentialHint;
use super::{
    Capabilities, ChannelError, FailureKind, NativeReceipt, NativeRequest, RenderError, Rendered,
};
use crate::model::{Address, Message, ProactiveOptions};
use client::TelegramClient;
use config::TelegramConfig;

/// The Telegram Bot API behind the `Channel` interface.
pub struct Telegram {
    config: TelegramConfig,
    /// `None` when no bot has a webhook secret.
    inbound: Option<inbound::TelegramInbound>,
    /// Built even when the section is disabled (the registry then never calls it).
    client: TelegramClient,
}

impl Telegram {
    pub fn new(config: &TelegramConfig, request_timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: TelegramClient::new(config.clone(), request_timeout)?,
            inbound: inbound::TelegramInbound::new(config),
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

    fn render_update(
        &self,
        msg: &Message,
        receipts: &[NativeReceipt],
    ) -> Result<super::update::Plan, RenderError> {
        render::render_update(msg, receipts, &self.config)
    }

    fn render_delete(
        &self,
        addr: &Address,
        receipts: &[NativeReceipt],
    ) -> Result<super::update::Plan, RenderError> {
        render::render_delete(addr, receipts, &self.config)
    }

    fn fetch_attachment<'a>(
        &'a self,
        req: &'a crate::channels::fetch::FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<crate::channels::fetch::Fetched, crate::channels::fetch::FetchError>>
    {
        Box::pin(fetch::fetch(self, req))
    }

    fn inbound(&self) -> Option<&dyn super::channel::Inbound> {
        self.inbound
            .as_ref()
            .map(|i| i as &dyn super::channel::Inbound)
    }

    /// One `getUpdates` loop per bot with `receive = "polling"`, when the section is enabled.
    fn pullers(&self, sink: Arc<dyn crate::inbound::Sink>) -> Vec<BoxFuture<'static, ()>> {
        if !self.config.enabled {
            return Vec::new();
        }
        self.config
            .bots
            .iter()
            .filter(|b| b.receive == config::Receive::Polling)
            .filter_map(|b| {
                match polling::Poller::new(&self.config, b, polling::Timing::default()) {
                    Ok(p) => Some(Box::pin(p.run(sink.clone())) as BoxFuture<'static, ()>),
                    Err(e) => {
                        tracing::error!(bot_id = %crate::bounded::for_log(&b.bot_id), error = %crate::bounded::for_log(&e), "telegram: cannot poll for updates");
                        None
                    }
                }
            })
            .collect()
    }

    fn known_conversation(&self, addr: &Address) -> Option<String> {
        render::proactive_address(addr, "address")
            .ok()?
            .conversation_id()
            .map(str::to_string)
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
        let _ = options;
        // No call: bots cannot open a chat; a private chat's id is the user's id. Whether the
        // user ever wrote to the bot only the send can tell (Telegram answers 403 otherwise).
        Box::pin(async move {
            render::proactive_address(addr, "address").map_err(|e| ChannelError {
                code: Some("no_recipient".into()),
                ..ChannelError::new(
                    CHANNEL_ID,
                    FailureKind::Permanent,
                    format!(
                        "{e}; the user must have written to the bot first (bots cannot start a chat)"
                    ),
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proactive_start_goes_to_the_users_private_chat_without_a_call() {
        let config = TelegramConfig {
            // Nothing listens there: a call would fail.
            api_base_url: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let tg = Telegram::new(&config, Duration::from_secs(1)).unwrap();
        let addr = Address {
            channel_id: CHANNEL_ID.into(),
            user: Some(crate::model::Identity {
                id: "777".into(),
                ..Default::default()
            }),
            id: Some("old".into()),
            ..Default::default()
        };
        assert_eq!(tg.known_conversation(&addr).as_deref(), Some("777"));
        let out = tg
            .create_conversation(&addr, &ProactiveOptions::default())
            .await
            .unwrap();
        assert_eq!(out.conversation_id(), Some("777"));
        assert_eq!(out.id, None);
        let mut nobody = addr.clone();
        nobody.user = None;
        assert_eq!(tg.known_conversation(&nobody), None);
        let e = tg
            .create_conversation(&nobody, &ProactiveOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("no_recipient"));
        assert_eq!(e.kind, FailureKind::Permanent);
        assert!(e.message.contains("address.user.id"), "{}", e.message);
        assert!(
            e.message.contains("written to the bot first"),
            "{}",
            e.message
        );
    }
}
