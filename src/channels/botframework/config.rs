//! The `[channels.botframework]` config section: the channel ids served through the Bot
//! Framework Connector, the token endpoint, the service hosts a token may go to, and the bots'
//! app ids and passwords.
//!
//! Passwords are `Secret`s: their `Debug` prints `<redacted>`, and nothing here formats one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{ConfigError, Secret, de_duration, invalid};

/// The channel ids served through the Bot Framework Connector unless configured otherwise.
pub const DEFAULT_BOTFRAMEWORK_CHANNEL_IDS: [&str; 5] =
    ["skype", "msteams", "webchat", "directline", "emulator"];

/// Hosts the Bot Framework serves conversations from; a token is only ever sent to these.
pub const DEFAULT_BOTFRAMEWORK_HOSTS: &[&str] = &[
    "*.botframework.com",
    "smba.trafficmanager.net",
    "*.botframework.azure.us",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotFrameworkConfig {
    pub enabled: bool,
    /// Channel ids served by the Bot Framework Connector.
    pub channel_ids: Vec<String>,
    /// OAuth client-credentials endpoint.
    pub token_url: String,
    pub scope: String,
    /// A token is treated as expired this long before its `expires_in` (the v3 SDK used 300 s).
    #[serde(deserialize_with = "de_duration")]
    pub token_refresh_margin: Duration,
    /// Service URL host patterns (`*.example.com` matches subdomains). Plain http is only
    /// accepted for loopback hosts.
    pub allowed_service_hosts: Vec<String>,
    /// Send without a token when the bot has no credentials (the Emulator without auth).
    pub allow_unauthenticated: bool,
    /// How often a kept-alive typing indicator repeats (clients show one for about 3 s).
    #[serde(deserialize_with = "de_duration")]
    pub typing_interval: Duration,
    /// Send to each Teams conversation and tenant within Teams' documented rate limits, so
    /// its 429s stay rare; off, only 429s slow sends down.
    pub teams_pacing: bool,
    /// Shortcut for a single bot: its Microsoft app id and password.
    pub app_id: Option<String>,
    pub app_password: Option<Secret>,
    pub bots: Vec<BotCredentials>,
    /// Receiving: the OpenID metadata document whose `jwks_uri` lists the keys the Bot
    /// Connector signs its calls to the bot with.
    pub openid_metadata_url: String,
    /// Receiving: also accept tokens the Bot Framework Emulator got from Microsoft Entra ID
    /// (its issuers, its keys from `emulator_openid_metadata_url`). Off in production.
    pub allow_emulator_tokens: bool,
    pub emulator_openid_metadata_url: String,
}

/// Where the Bot Connector publishes its signing keys (the Bot Framework SDKs' default).
pub const DEFAULT_OPENID_METADATA_URL: &str =
    "https://login.botframework.com/v1/.well-known/openidconfiguration";
/// Where the Emulator's tokens' signing keys are published (the SDKs' default).
pub const DEFAULT_EMULATOR_OPENID_METADATA_URL: &str =
    "https://login.microsoftonline.com/botframework.com/v2.0/.well-known/openid-configuration";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotCredentials {
    pub app_id: String,
    pub app_password: Secret,
}

impl Default for BotFrameworkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            channel_ids: DEFAULT_BOTFRAMEWORK_CHANNEL_IDS.map(String::from).to_vec(),
            token_url: "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
                .into(),
            scope: "https://api.botframework.com/.default".into(),
            token_refresh_margin: Duration::from_secs(300),
            allowed_service_hosts: DEFAULT_BOTFRAMEWORK_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow_unauthenticated: false,
            typing_interval: Duration::from_secs(3),
            teams_pacing: true,
            app_id: None,
            app_password: None,
            bots: Vec::new(),
            openid_metadata_url: DEFAULT_OPENID_METADATA_URL.into(),
            allow_emulator_tokens: false,
            emulator_openid_metadata_url: DEFAULT_EMULATOR_OPENID_METADATA_URL.into(),
        }
    }
}

impl BotFrameworkConfig {
    /// Every configured bot, the single-bot shortcut included.
    pub fn credentials(&self) -> BTreeMap<String, Secret> {
        let mut out: BTreeMap<String, Secret> = self
            .bots
            .iter()
            .map(|b| (b.app_id.clone(), b.app_password.clone()))
            .collect();
        if let (Some(id), Some(pw)) = (&self.app_id, &self.app_password) {
            out.insert(id.clone(), pw.clone());
        }
        out
    }
}

impl BotFrameworkConfig {
    /// Checks the section; errors name the key as `channels.botframework.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bf = self;
        let token_url = url::Url::parse(&bf.token_url)
            .map_err(|e| invalid("channels.botframework.token_url", format!("not a URL: {e}")))?;
        // The bot's app password is posted to it.
        if let Some(reason) = crate::channels::clear_text_refusal(&token_url) {
            return Err(invalid("channels.botframework.token_url", reason));
        }
        // The keys fetched from them decide which calls are the Bot Connector's: a key list
        // read in clear text could be swapped on the way.
        for (key, value) in [
            ("openid_metadata_url", &bf.openid_metadata_url),
            (
                "emulator_openid_metadata_url",
                &bf.emulator_openid_metadata_url,
            ),
        ] {
            let field = format!("channels.botframework.{key}");
            let url =
                url::Url::parse(value).map_err(|e| invalid(&field, format!("not a URL: {e}")))?;
            if let Some(reason) = crate::channels::clear_text_refusal(&url) {
                return Err(invalid(&field, reason));
            }
        }
        for (i, host) in bf.allowed_service_hosts.iter().enumerate() {
            let (name, port) = super::client::split_host_pattern(host);
            let bare = name.strip_prefix("*.").unwrap_or(name);
            let ipv6 = bare.starts_with('[')
                && bare.ends_with(']')
                && bare[1..bare.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok();
            let port_ok = port.is_none_or(|p| p == "*" || p.parse::<u16>().is_ok());
            if bare.is_empty() || (!ipv6 && bare.contains(['/', ':', '*', '[', ']'])) || !port_ok {
                return Err(invalid(
                    &format!("channels.botframework.allowed_service_hosts[{i}]"),
                    format!(
                        "`{host}` is not a host name or `*.domain` pattern, optionally with `:port` or `:*`"
                    ),
                ));
            }
        }
        if bf.typing_interval < Duration::from_millis(100) {
            return Err(invalid(
                "channels.botframework.typing_interval",
                "must be at least 100ms",
            ));
        }
        if bf.app_id.is_some() != bf.app_password.is_some() {
            return Err(invalid(
                "channels.botframework.app_password",
                "app_id and app_password go together",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, b) in bf.bots.iter().enumerate() {
            if b.app_id.is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_id"),
                    "must not be empty",
                ));
            }
            if b.app_password.expose().is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_password"),
                    "must not be empty",
                ));
            }
            if !seen.insert(&b.app_id) {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_id"),
                    format!("`{}` is configured twice", b.app_id),
                ));
            }
        }
        // An id another channel serves is refused when the registry is built.
        for (i, id) in bf.channel_ids.iter().enumerate() {
            if id.is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.channel_ids[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_metadata_urls_are_https_or_loopback_http() {
        assert!(BotFrameworkConfig::default().validate().is_ok());
        for key in ["openid_metadata_url", "emulator_openid_metadata_url"] {
            for (url, ok) in [
                ("http://127.0.0.1:4711/openid", true),
                ("https://login.example/openid", true),
                (
                    "http://login.botframework.com/v1/.well-known/openidconfiguration",
                    false,
                ),
                ("https://user:pw@login.example/openid", false),
                ("not a url", false),
            ] {
                let mut c = BotFrameworkConfig::default();
                match key {
                    "openid_metadata_url" => c.openid_metadata_url = url.into(),
                    _ => c.emulator_openid_metadata_url = url.into(),
                }
                let r = c.validate();
                assert_eq!(r.is_ok(), ok, "{key} = {url}: {r:?}");
                if let Err(e) = r {
                    assert!(e.to_string().contains(key), "{e}");
                }
            }
        }
    }
}
