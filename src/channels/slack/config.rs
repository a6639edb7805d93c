//! The `[channels.slack]` config section: the Web API base URL, one bot token per workspace
//! installation (with how its events arrive: Events API webhooks, or Socket Mode with an
//! app-level token), the per-channel rate limit, link-unfurling defaults, and the signing
//! secrets inbound requests are verified with.
//!
//! Tokens and signing secrets are `Secret`s: their `Debug` prints `<redacted>`, and nothing here ever formats one.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::settings::{ConfigError, Secret, invalid};

/// The public Slack Web API.
pub const DEFAULT_API_BASE_URL: &str = "https://slack.com/api";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    pub enabled: bool,
    /// Where the Web API methods live (`{api_base_url}/chat.postMessage`). Bot tokens are only
    /// ever sent to URLs under it.
    pub api_base_url: String,
    /// One entry per workspace the bot is installed in; `address.bot.id` selects the token.
    pub workspaces: Vec<SlackWorkspace>,
    /// Messages per second to one Slack channel (Slack allows about one, with short bursts).
    pub rate_per_second: f64,
    /// Messages that may go to one Slack channel at once before the rate applies.
    pub rate_burst: u32,
    /// `unfurl_links` on every message, unless `source_event` sets it. Unset: Slack's default.
    pub unfurl_links: Option<bool>,
    /// `unfurl_media` on every message, unless `source_event` sets it. Unset: Slack's default.
    pub unfurl_media: Option<bool>,
    /// The app's signing secret (Basic Information → App Credentials): every inbound request's
    /// `X-Slack-Signature` is checked with it. Unset, and no workspace sets one: nothing is
    /// received from Slack.
    pub signing_secret: Option<Secret>,
}

/// A bot's installation in one workspace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackWorkspace {
    /// The bot id as it appears in `address.bot.id` (Slack bot ids are per workspace).
    pub bot_id: String,
    /// The bot token (`xoxb-...`), sent as `Authorization: Bearer`.
    pub token: Secret,
    /// The workspace's team id (`T...`): inbound events of this team are addressed to this
    /// entry's `bot_id`, so a reply selects its token. Needed when several workspaces are
    /// configured; with one, every event is addressed to it.
    pub team_id: Option<String>,
    /// This installation's app signing secret, when the gateway fronts several Slack apps;
    /// inbound requests are accepted when they verify with any configured secret.
    pub signing_secret: Option<Secret>,
    /// How this installation's events arrive: `events_api` (Slack calls the inbound listener's
    /// webhook paths, which needs a public URL) or `socket_mode` (the gateway opens a
    /// WebSocket to Slack with `app_token`; no public URL).
    #[serde(default)]
    pub receive: Receive,
    /// The app-level token (`xapp-...`, Basic Information → App-Level Tokens, with the
    /// `connections:write` scope) Socket Mode connects with. Sent only to `api_base_url`.
    #[serde(default)]
    pub app_token: Option<Secret>,
}

/// How a workspace's events arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receive {
    #[default]
    EventsApi,
    SocketMode,
}

impl Default for SlackConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            api_base_url: DEFAULT_API_BASE_URL.into(),
            workspaces: Vec::new(),
            rate_per_second: 1.0,
            rate_burst: 3,
            unfurl_links: None,
            unfurl_media: None,
            signing_secret: None,
        }
    }
}

impl SlackConfig {
    /// Checks the section; errors name the key as `channels.slack.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = url::Url::parse(&self.api_base_url).map_err(|e| {
            invalid(
                "channels.slack.api_base_url",
                // Not echoed: a URL may carry credentials.
                format!("not a URL: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                "channels.slack.api_base_url",
                "must be an http(s) URL with a host",
            ));
        }
        // Bot tokens go in the Authorization header of every call to it.
        if let Some(reason) = crate::channels::clear_text_refusal(&url) {
            return Err(invalid("channels.slack.api_base_url", reason));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "channels.slack.api_base_url",
                "must not have a query or fragment: method names are appended to it",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "channels.slack.api_base_url",
                "must not carry credentials",
            ));
        }
        if !(self.rate_per_second.is_finite() && self.rate_per_second > 0.0) {
            return Err(invalid(
                "channels.slack.rate_per_second",
                "must be a number above 0",
            ));
        }
        if self.rate_burst == 0 {
            return Err(invalid("channels.slack.rate_burst", "must be at least 1"));
        }
        if let Some(s) = &self.signing_secret {
            check_signing_secret(s, "channels.slack.signing_secret")?;
        }
        let mut seen = BTreeSet::new();
        let mut teams = BTreeSet::new();
        for (i, w) in self.workspaces.iter().enumerate() {
            if let Some(s) = &w.signing_secret {
                check_signing_secret(s, &format!("channels.slack.workspaces[{i}].signing_secret"))?;
            }
            if let Some(team) = &w.team_id {
                if team.is_empty() || !team.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(invalid(
                        &format!("channels.slack.workspaces[{i}].team_id"),
                        "must be a Slack team id (letters and digits, e.g. T0123ABCD)",
                    ));
                }
                if !teams.insert(team.as_str()) {
                    return Err(invalid(
                        &format!("channels.slack.workspaces[{i}].team_id"),
                        format!("`{team}` is configured twice: events of a team go to one bot"),
                    ));
                }
            }
            if w.bot_id.is_empty() {
                return Err(invalid(
                    &format!("channels.slack.workspaces[{i}].bot_id"),
                    "must not be empty",
                ));
            }
            if !seen.insert(w.bot_id.as_str()) {
                return Err(invalid(
                    &format!("channels.slack.workspaces[{i}].bot_id"),
                    format!("`{}` is configured twice", w.bot_id),
                ));
            }
            match (&w.app_token, w.receive) {
                (None, Receive::SocketMode) => {
                    return Err(invalid(
                        &format!("channels.slack.workspaces[{i}].app_token"),
                        "is needed with `receive = \"socket_mode\"`: an app-level token (xapp-...) with connections:write",
                    ));
                }
                (Some(t), _) => {
                    let t = t.expose();
                    // Not shown: a bot token pasted here is still a secret.
                    if !t.starts_with("xapp-")
                        || t.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(invalid(
                            &format!("channels.slack.workspaces[{i}].app_token"),
                            "must be an app-level token (`xapp-...`, without spaces or line breaks)",
                        ));
                    }
                }
                (None, Receive::EventsApi) => {}
            }
            let token = w.token.expose();
            if token.is_empty() {
                return Err(invalid(
                    &format!("channels.slack.workspaces[{i}].token"),
                    "must not be empty",
                ));
            }
            // Checked here because an HTTP header cannot carry them; the token itself is never shown.
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    &format!("channels.slack.workspaces[{i}].token"),
                    "must not contain spaces, line breaks or control characters",
                ));
            }
        }
        Ok(())
    }

    /// Every configured signing secret, each once: the section's, then the workspaces'.
    pub fn signing_secrets(&self) -> Vec<&Secret> {
        let mut out: Vec<&Secret> = Vec::new();
        for s in self.signing_secret.iter().chain(
            self.workspaces
                .iter()
                .filter_map(|w| w.signing_secret.as_ref()),
        ) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// `api_base_url` without its trailing slashes, ready for `/{method}`.
    pub fn method_url(&self, method: &str) -> String {
        format!("{}/{method}", self.api_base_url.trim_end_matches('/'))
    }
}

/// A signing secret is an HMAC key: any bytes would do, but an empty one verifies forgeries
/// made with an empty key, and a space or line break is a copy-and-paste slip.
fn check_signing_secret(s: &Secret, key: &str) -> Result<(), ConfigError> {
    let v = s.expose();
    if v.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            key,
            "must not contain spaces, line breaks or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(
            None,
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn defaults() {
        let c = SlackConfig::default();
        assert!(c.enabled);
        assert_eq!(c.api_base_url, "https://slack.com/api");
        assert_eq!(c.rate_per_second, 1.0);
        assert_eq!(c.rate_burst, 3);
        assert!(c.workspaces.is_empty());
        assert_eq!(c.unfurl_links, None);
        assert!(c.signing_secret.is_none());
        assert!(c.signing_secrets().is_empty());
        assert_eq!(
            c.method_url("chat.postMessage"),
            "https://slack.com/api/chat.postMessage"
        );
        c.validate().unwrap();
    }

    /// A base URL may carry a user and password: an error never quotes it, and such a URL is
    /// refused (credentials go in their own keys).
    #[test]
    fn url_errors_never_quote_the_url() {
        for (key, url) in [
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL",
                "https://u:s3cret@slack.example/api",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL",
                "http://u:s3cret@[bad/api",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL",
                "ftp://u:s3cret@slack.example/api",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TOKEN_URL",
                "https://u:s3cret@login.example/t",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__FACEBOOK__GRAPH_BASE_URL",
                "https://u:s3cret@graph.example/",
            ),
        ] {
            let err = load(&[(key, url)]).unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{key}: {err}");
            let name = key
                .trim_start_matches("CHANNEL_GATEWAY__")
                .to_ascii_lowercase()
                .replace("__", ".");
            assert!(err.contains(&name), "{key}: {err}");
        }
    }

    #[test]
    fn workspaces_from_the_environment() {
        let c = load(&[(
            "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
            r#"[{bot_id = "B01", token = "xoxb-1"}, {bot_id = "B02", token = "xoxb-2"}]"#,
        )])
        .unwrap();
        let s = &c.channels.slack;
        assert_eq!(s.workspaces.len(), 2);
        assert_eq!(s.workspaces[1].token.expose(), "xoxb-2");
        assert!(!format!("{s:?}").contains("xoxb-"), "token in Debug");
    }

    #[test]
    fn socket_mode_needs_an_app_token_never_shown() {
        let ws = |extra: &str| {
            load(&[(
                "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
                &format!(r#"[{{bot_id = "B01", token = "xoxb-1"{extra}}}]"#),
            )])
        };
        let e = ws(r#", receive = "socket_mode""#).unwrap_err().to_string();
        assert!(e.contains("workspaces[0].app_token"), "{e}");
        let e = ws(r#", receive = "socket_mode", app_token = "xoxb-s3cret""#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("workspaces[0].app_token") && !e.contains("s3cret"),
            "{e}"
        );
        assert!(ws(r#", receive = "sockets", app_token = "xapp-1""#).is_err());
        let c = ws(r#", receive = "socket_mode", app_token = "xapp-1-s3cret""#).unwrap();
        let w = &c.channels.slack.workspaces[0];
        assert_eq!(w.receive, Receive::SocketMode);
        assert!(!format!("{w:?}").contains("s3cret"), "token in Debug");
        assert_eq!(
            ws("").unwrap().channels.slack.workspaces[0].receive,
            Receive::EventsApi
        );
    }

    #[test]
    fn signing_secrets_section_and_workspaces_each_once() {
        let c = load(&[
            ("CHANNEL_GATEWAY__CHANNELS__SLACK__SIGNING_SECRET", "s3cret-a"),
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
                r#"[{bot_id = "B01", token = "xoxb-1", team_id = "T01", signing_secret = "s3cret-b"},
                    {bot_id = "B02", token = "xoxb-2", signing_secret = "s3cret-a"},
                    {bot_id = "B03", token = "xoxb-3"}]"#,
            ),
        ])
        .unwrap();
        let s = &c.channels.slack;
        let secrets: Vec<&str> = s.signing_secrets().iter().map(|x| x.expose()).collect();
        assert_eq!(secrets, ["s3cret-a", "s3cret-b"]);
        assert_eq!(s.workspaces[0].team_id.as_deref(), Some("T01"));
        assert!(!format!("{s:?}").contains("s3cret"), "secret in Debug");
    }

    #[test]
    fn bad_keys_are_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "API_BASE_URL",
                "\"slack.com\"",
                "channels.slack.api_base_url",
            ),
            (
                "API_BASE_URL",
                "\"https://slack.com/api?x=1\"",
                "channels.slack.api_base_url",
            ),
            (
                "API_BASE_URL",
                "\"http://slack.example/api\"",
                "channels.slack.api_base_url",
            ),
            ("RATE_PER_SECOND", "0", "channels.slack.rate_per_second"),
            ("RATE_BURST", "0", "channels.slack.rate_burst"),
            (
                "WORKSPACES",
                r#"[{bot_id = "", token = "x"}]"#,
                "channels.slack.workspaces[0].bot_id",
            ),
            (
                "WORKSPACES",
                r#"[{bot_id = "B1", token = "x"}, {bot_id = "B1", token = "y"}]"#,
                "channels.slack.workspaces[1].bot_id",
            ),
            (
                "WORKSPACES",
                r#"[{bot_id = "B1", token = "xoxb-secret value"}]"#,
                "channels.slack.workspaces[0].token",
            ),
            ("SIGNING_SECRET", "\"\"", "channels.slack.signing_secret"),
            (
                "SIGNING_SECRET",
                "\"secret value\"",
                "channels.slack.signing_secret",
            ),
            (
                "WORKSPACES",
                r#"[{bot_id = "B1", token = "x", signing_secret = "secret value"}]"#,
                "channels.slack.workspaces[0].signing_secret",
            ),
            (
                "WORKSPACES",
                r#"[{bot_id = "B1", token = "x", team_id = "T 1"}]"#,
                "channels.slack.workspaces[0].team_id",
            ),
            (
                "WORKSPACES",
                r#"[{bot_id = "B1", token = "x", team_id = "T1"}, {bot_id = "B2", token = "y", team_id = "T1"}]"#,
                "channels.slack.workspaces[1].team_id",
            ),
        ];
        for (key, value, expected) in cases {
            let err = load(&[(&format!("CHANNEL_GATEWAY__CHANNELS__SLACK__{key}"), value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{key}={value}: {err}");
            assert!(!err.contains("secret value"), "token in error: {err}");
        }
        let err = load(&[("CHANNEL_GATEWAY__CHANNELS__SLACK__TOKEN", "\"x\"")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("token"), "{err}");
    }
}
