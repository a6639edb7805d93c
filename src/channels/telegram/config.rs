//! The `[channels.telegram]` config section: the Bot API base URL, one token per bot (with how
//! its updates arrive: webhook or `getUpdates` polling), and the typing interval.
//!
//! Tokens are `Secret`s: their `Debug` prints `<redacted>`, and nothing here formats one. A
//! token is part of every Bot API URL's path (`/bot<token>/METHOD`), so it is checked here to be
//! made of the characters Telegram issues: nothing in it can change the URL's shape.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{ConfigError, Secret, de_duration, invalid};

/// The public Bot API.
pub const DEFAULT_API_BASE_URL: &str = "https://api.telegram.org";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramConfig {
    pub enabled: bool,
    /// Where the Bot API lives (`{api_base_url}/bot<token>/sendMessage`). Tokens are only ever
    /// sent to URLs under it: https, or http to a loopback host (a local Bot API server).
    pub api_base_url: String,
    /// One entry per bot; `address.bot.id` selects the token.
    pub bots: Vec<TelegramBot>,
    /// How often a kept-alive typing indicator repeats (Telegram shows one for 5 s or less).
    #[serde(deserialize_with = "de_duration")]
    pub typing_interval: Duration,
    /// Send within Telegram's documented limits (30 messages/s per bot, 1/s per private chat,
    /// 20/min per group) so its 429s stay rare; off, only 429s slow sends down.
    pub pacing: bool,
}

/// One bot and its token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramBot {
    /// The bot id as it appears in `address.bot.id` (e.g. the bot's username or numeric id).
    pub bot_id: String,
    /// The token from @BotFather (`123456:ABC-DEF...`), part of the URL path of every call.
    pub token: Secret,
    /// The `secret_token` given to `setWebhook`: Telegram sends it in the
    /// `X-Telegram-Bot-Api-Secret-Token` header of every update. Without it, updates to this bot
    /// cannot be verified and are not received.
    #[serde(default)]
    pub secret_token: Option<Secret>,
    /// How this bot's updates arrive: `webhook` (Telegram calls the inbound listener, which
    /// needs a public URL and `secret_token`) or `polling` (the gateway calls `getUpdates`; no
    /// public URL, but Telegram refuses it while a webhook is set: call `deleteWebhook` first).
    #[serde(default)]
    pub receive: Receive,
}

/// How a bot receives its updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receive {
    #[default]
    Webhook,
    Polling,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            api_base_url: DEFAULT_API_BASE_URL.into(),
            bots: Vec::new(),
            typing_interval: Duration::from_secs(4),
            pacing: true,
        }
    }
}

impl TelegramConfig {
    /// Checks the section; errors name the key as `channels.telegram.KEY` and never show a token.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const KEY: &str = "channels.telegram.api_base_url";
        let url = url::Url::parse(&self.api_base_url)
            // Not echoed: a URL may carry credentials.
            .map_err(|e| invalid(KEY, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(KEY, "must be an http(s) URL with a host"));
        }
        if let Some(reason) = crate::channels::shared::clear_text_refusal(&url) {
            return Err(invalid(KEY, reason));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                KEY,
                "must not have a query or fragment: `/bot<token>/METHOD` is appended to it",
            ));
        }
        if self.typing_interval < Duration::from_millis(100) {
            return Err(invalid(
                "channels.telegram.typing_interval",
                "must be at least 100ms",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, b) in self.bots.iter().enumerate() {
            if b.bot_id.is_empty() {
                return Err(invalid(
                    &format!("channels.telegram.bots[{i}].bot_id"),
                    "must not be empty",
                ));
            }
            if !seen.insert(b.bot_id.as_str()) {
                return Err(invalid(
                    &format!("channels.telegram.bots[{i}].bot_id"),
                    format!(
                        "`{}` is configured twice",
                        crate::settings::capped(&b.bot_id, 64)
                    ),
                ));
            }
            let token = b.token.expose();
            if token.is_empty() {
                return Err(invalid(
                    &format!("channels.telegram.bots[{i}].token"),
                    "must not be empty",
                ));
            }
            // The token goes into the URL path: a `/`, `?`, `#`, `%` or space would change what
            // is called. Telegram's tokens are digits, a colon, then [A-Za-z0-9_-].
            if !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'))
            {
                return Err(invalid(
                    &format!("channels.telegram.bots[{i}].token"),
                    "must be a Bot API token as @BotFather issues it (letters, digits, `:`, `_`, `-`)",
                ));
            }
            if b.receive == Receive::Polling && b.secret_token.is_some() {
                // Telegram serves one or the other: a secret here means a webhook was meant.
                return Err(invalid(
                    &format!("channels.telegram.bots[{i}].secret_token"),
                    "is for webhooks; a bot with `receive = \"polling\"` has no webhook (remove one of the two)",
                ));
            }
            if let Some(secret) = &b.secret_token {
                // setWebhook's own rule: 1-256 characters of A-Z, a-z, 0-9, `_` and `-`.
                let v = secret.expose();
                if v.is_empty()
                    || v.len() > 256
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                {
                    return Err(invalid(
                        &format!("channels.telegram.bots[{i}].secret_token"),
                        "must be 1 to 256 characters of letters, digits, `_` and `-` (setWebhook's rule)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `api_base_url` without its trailing slashes.
    pub fn api_base(&self) -> &str {
        self.api_base_url.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut TelegramConfig)) -> Result<(), ConfigError> {
        let mut c = TelegramConfig::default();
        f(&mut c);
        c.validate()
    }

    fn bot(id: &str, token: &str) -> TelegramBot {
        TelegramBot {
            bot_id: id.into(),
            token: Secret::new(token),
            secret_token: None,
            receive: Receive::Webhook,
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert!(with(|_| {}).is_ok());
    }

    #[test]
    fn tokens_that_would_change_the_url_are_refused_without_being_shown() {
        for token in ["12:ab/../x", "12:ab?x=1", "12:ab#x", "12:a b", "12:a%2F"] {
            let e = with(|c| c.bots.push(bot("b", token)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("channels.telegram.bots[0].token"), "{e}");
            assert!(!e.contains(token), "{e}");
        }
        assert!(with(|c| c.bots.push(bot("b", "123456:ABC-def_9"))).is_ok());
    }

    #[test]
    fn clear_text_only_to_loopback() {
        let e = with(|c| c.api_base_url = "http://api.example.com".into()).unwrap_err();
        assert!(e.to_string().contains("api_base_url"), "{e}");
        assert!(with(|c| c.api_base_url = "http://127.0.0.1:8081/".into()).is_ok());
        assert!(with(|c| c.api_base_url = "https://x.test/?a=1".into()).is_err());
    }

    #[test]
    fn bot_ids_are_unique_and_present() {
        let e = with(|c| c.bots = vec![bot("a", "1:x"), bot("a", "2:y")]).unwrap_err();
        assert!(e.to_string().contains("bots[1].bot_id"), "{e}");
        assert!(with(|c| c.bots = vec![bot("", "1:x")]).is_err());
    }

    #[test]
    fn a_polling_bot_has_no_webhook_secret() {
        let mut b = bot("b", "1:x");
        b.receive = Receive::Polling;
        assert!(with(|c| c.bots = vec![b.clone()]).is_ok());
        b.secret_token = Some(Secret::new("s3cret"));
        let e = with(|c| c.bots = vec![b]).unwrap_err().to_string();
        assert!(e.contains("bots[0].secret_token"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let parsed: TelegramBot =
            toml::from_str("bot_id = \"b\"\ntoken = \"1:x\"\nreceive = \"polling\"").unwrap();
        assert_eq!(parsed.receive, Receive::Polling);
        assert!(
            toml::from_str::<TelegramBot>("bot_id = \"b\"\ntoken = \"1:x\"\nreceive = \"poll\"")
                .is_err()
        );
    }
}
