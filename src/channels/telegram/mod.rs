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
