//! The `[channels.facebook]` config section: the Graph API endpoint, each page's credentials,
//! the Send API's rate quotas and how renders fit messages (reusable media, default currency).
//!
//! Every key has a default that validates, so the gateway runs without a `[channels.facebook]`
//! section (with no page configured, addresses on `facebook` are refused as not configured).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::settings::{ConfigError, Secret, de_duration, invalid};

/// The Graph API version used when none is configured (the current one when this was written).
pub const DEFAULT_API_VERSION: &str = "v25.0";

/// Which Send API path the requests use. Both take a page access token; `page` names the page
/// in the path, so Graph refuses a token that belongs to another page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendEndpoint {
    /// `POST /{version}/me/messages`.
    #[default]
    Me,
    /// `POST /{version}/{page_id}/messages`.
    Page,
}

/// One Facebook page the gateway sends as; `page_id` is what bots put in `address.bot.id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageCredentials {
    #[serde(deserialize_with = "de_id")]
    pub page_id: String,
    pub access_token: Secret,
    /// When set, every call carries `appsecret_proof` (required by apps that enforce it).
    #[serde(default)]
    pub app_secret: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FacebookConfig {
    pub enabled: bool,
    /// Scheme and host of the Graph API (tests point it at a local fake).
    pub graph_base_url: String,
    /// Graph API version path segment, e.g. `v25.0`.
    pub api_version: String,
    pub endpoint: SendEndpoint,
    /// `is_reusable` on media attachments sent by URL (Messenger then returns an attachment id).
    pub is_reusable: bool,
    /// ISO 4217 code for receipt prices that name no currency.
    pub default_currency: String,
    /// Shortcut for a single page: its id, token and optional app secret.
    #[serde(deserialize_with = "de_opt_id")]
    pub page_id: Option<String>,
    pub access_token: Option<Secret>,
    pub app_secret: Option<Secret>,
    pub pages: Vec<PageCredentials>,
    /// The Verify Token typed into the app dashboard for the webhook subscription: Meta's GET
    /// handshake must present it before its challenge is answered.
    pub verify_token: Option<Secret>,
    /// Send API calls per second per page, and the burst allowed above that rate.
    pub rate_per_second: f64,
    pub rate_burst: u32,
    /// Audio and video sends per second per page (Messenger's lower quota for them).
    pub media_rate_per_second: f64,
    pub media_rate_burst: u32,
    /// How often a kept-alive `typing_on` repeats (Messenger shows one for about 20 s).
    #[serde(deserialize_with = "de_duration")]
    pub typing_interval: Duration,
}

impl Default for FacebookConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            graph_base_url: "https://graph.facebook.com".into(),
            api_version: DEFAULT_API_VERSION.into(),
            endpoint: SendEndpoint::Me,
            is_reusable: false,
            default_currency: "USD".into(),
            page_id: None,
            access_token: None,
            app_secret: None,
            pages: Vec::new(),
            verify_token: None,
            rate_per_second: 250.0,
            rate_burst: 250,
            media_rate_per_second: 10.0,
            media_rate_burst: 10,
            typing_interval: Duration::from_secs(15),
        }
    }
}

/// Page ids are numbers in Graph's eyes; an environment override without quotes arrives as one.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawId {
    S(String),
    N(u64),
}

impl RawId {
    fn into_string(self) -> String {
        match self {
            RawId::S(s) => s,
            RawId::N(n) => n.to_string(),
        }
    }
}

fn de_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    RawId::deserialize(d).map(RawId::into_string)
}

fn de_opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<RawId>::deserialize(d)?.map(RawId::into_string))
}

const SECTION: &str = "channels.facebook";

fn key(k: &str) -> String {
    format!("{SECTION}.{k}")
}

impl FacebookConfig {
    /// Every configured page, the single-page shortcut included (it wins over a duplicate).
    pub fn all_pages(&self) -> Vec<PageCredentials> {
        let mut out: Vec<PageCredentials> = self
            .pages
            .iter()
            .filter(|p| Some(&p.page_id) != self.page_id.as_ref())
            .cloned()
            .collect();
        if let (Some(id), Some(token)) = (&self.page_id, &self.access_token) {
            out.push(PageCredentials {
                page_id: id.clone(),
                access_token: token.clone(),
                app_secret: self.app_secret.clone(),
            });
        }
        out
    }

    /// Every distinct app secret configured (the single-page shortcut's and each page's), in
    /// configuration order: a webhook call names its page only inside the signed body, so its
    /// signature is checked against each of them.
    pub fn app_secrets(&self) -> Vec<&Secret> {
        let mut out: Vec<&Secret> = Vec::new();
        let all = self
            .app_secret
            .iter()
            .chain(self.pages.iter().filter_map(|p| p.app_secret.as_ref()));
        for s in all {
            if !out.iter().any(|o| o.expose() == s.expose()) {
                out.push(s);
            }
        }
        out
    }

    /// `{graph_base_url}/{api_version}`, without a trailing slash.
    pub fn api_base(&self) -> String {
        format!(
            "{}/{}",
            self.graph_base_url.trim_end_matches('/'),
            self.api_version
        )
    }

    /// Checks the section; errors name the key as `channels.facebook.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = url::Url::parse(&self.graph_base_url)
            .map_err(|e| invalid(&key("graph_base_url"), format!("not a URL: {e}")))?;
        // Page tokens travel in the query string: never in clear text off this machine.
        if let Some(reason) = crate::channels::clear_text_refusal(&url) {
            return Err(invalid(&key("graph_base_url"), reason));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                &key("graph_base_url"),
                "must not carry a query or fragment",
            ));
        }
        let v = self.api_version.strip_prefix('v').unwrap_or_default();
        let mut parts = v.split('.');
        let numeric = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        if !(numeric(parts.next()) && parts.all(|p| numeric(Some(p)))) {
            return Err(invalid(
                &key("api_version"),
                format!(
                    "`{}` is not a Graph API version like `v25.0`",
                    self.api_version
                ),
            ));
        }
        let c = &self.default_currency;
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid(
                &key("default_currency"),
                format!("`{c}` is not an ISO 4217 code like `USD`"),
            ));
        }
        for (k, rate) in [
            ("rate_per_second", self.rate_per_second),
            ("media_rate_per_second", self.media_rate_per_second),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(&key(k), "must be more than 0"));
            }
        }
        for (k, burst) in [
            ("rate_burst", self.rate_burst),
            ("media_rate_burst", self.media_rate_burst),
        ] {
            if burst == 0 {
                return Err(invalid(&key(k), "must be at least 1"));
            }
        }
        if self.typing_interval < Duration::from_secs(1) {
            return Err(invalid(&key("typing_interval"), "must be at least 1s"));
        }
        match (&self.page_id, &self.access_token) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    &key("access_token"),
                    "page_id and access_token go together",
                ));
            }
            (None, None) if self.app_secret.is_some() => {
                return Err(invalid(
                    &key("app_secret"),
                    "needs page_id and access_token (or set it per page in `pages`)",
                ));
            }
            (Some(id), Some(token)) => {
                if id.is_empty() {
                    return Err(invalid(&key("page_id"), "must not be empty"));
                }
                if token.expose().is_empty() {
                    return Err(invalid(&key("access_token"), "must not be empty"));
                }
                if self
                    .app_secret
                    .as_ref()
                    .is_some_and(|s| s.expose().is_empty())
                {
                    return Err(invalid(&key("app_secret"), "must not be empty when set"));
                }
            }
            (None, None) => {}
        }
        if self
            .verify_token
            .as_ref()
            .is_some_and(|s| s.expose().trim().is_empty())
        {
            return Err(invalid(&key("verify_token"), "must not be empty when set"));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.pages.iter().enumerate() {
            let k = |f: &str| key(&format!("pages[{i}].{f}"));
            if p.page_id.is_empty() {
                return Err(invalid(&k("page_id"), "must not be empty"));
            }
            if p.page_id.contains(['/', '?', '#']) || p.page_id.chars().any(char::is_whitespace) {
                return Err(invalid(
                    &k("page_id"),
                    format!("`{}` is not a page id", p.page_id),
                ));
            }
            if p.access_token.expose().is_empty() {
                return Err(invalid(&k("access_token"), "must not be empty"));
            }
            if p.app_secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                return Err(invalid(&k("app_secret"), "must not be empty when set"));
            }
            if !seen.insert(p.page_id.as_str()) {
                return Err(invalid(
                    &k("page_id"),
                    format!("`{}` is configured twice", p.page_id),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(
            None,
            env.iter().map(|(k, v)| {
                (
                    format!("CHANNEL_GATEWAY__CHANNELS__FACEBOOK__{k}"),
                    v.to_string(),
                )
            }),
        )
    }

    #[test]
    fn defaults_validate() {
        let c = FacebookConfig::default();
        c.validate().unwrap();
        assert_eq!(
            c.api_base(),
            format!("https://graph.facebook.com/{DEFAULT_API_VERSION}")
        );
        assert!(c.all_pages().is_empty());
    }

    #[test]
    fn environment_sets_pages_and_durations() {
        let c = load(&[
            (
                "PAGES",
                r#"[{page_id = 111, access_token = "t1", app_secret = "s1"}]"#,
            ),
            ("PAGE_ID", "222"),
            ("ACCESS_TOKEN", "t2"),
            ("TYPING_INTERVAL", "10s"),
            ("ENDPOINT", "page"),
        ])
        .unwrap();
        let fb = &c.channels.facebook;
        let ids: Vec<String> = fb.all_pages().into_iter().map(|p| p.page_id).collect();
        assert_eq!(ids, ["111", "222"]);
        assert_eq!(fb.typing_interval, Duration::from_secs(10));
        assert_eq!(fb.endpoint, SendEndpoint::Page);
        assert_eq!(
            format!("{:?}", fb.pages[0]).matches("<redacted>").count(),
            2
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (env, expected) in [
            (
                ("GRAPH_BASE_URL", "http://graph.example.com"),
                "graph_base_url",
            ),
            (("API_VERSION", "25"), "api_version"),
            (("DEFAULT_CURRENCY", "usd"), "default_currency"),
            (("RATE_PER_SECOND", "0"), "rate_per_second"),
            (("MEDIA_RATE_BURST", "0"), "media_rate_burst"),
            (("TYPING_INTERVAL", "100ms"), "typing_interval"),
            (("VERIFY_TOKEN", " "), "verify_token"),
            (("PAGE_ID", "1"), "access_token"),
            (
                (
                    "PAGES",
                    r#"[{page_id = "1", access_token = "a"}, {page_id = "1", access_token = "b"}]"#,
                ),
                "pages[1].page_id",
            ),
            (
                ("PAGES", r#"[{page_id = "1", access_token = ""}]"#),
                "pages[0].access_token",
            ),
        ] {
            let err = load(&[env]).unwrap_err().to_string();
            assert!(err.contains(expected), "{env:?}: {err}");
        }
        load(&[("GRAPH_BASE_URL", "http://127.0.0.1:9")]).unwrap();
    }

    #[test]
    fn app_secrets_are_distinct_and_verify_token_redacted() {
        let c = load(&[
            (
                "PAGES",
                r#"[{page_id = "1", access_token = "a", app_secret = "s1"}, {page_id = "2", access_token = "b", app_secret = "s2"}, {page_id = "3", access_token = "c", app_secret = "s1"}, {page_id = "4", access_token = "d"}]"#,
            ),
            ("PAGE_ID", "5"),
            ("ACCESS_TOKEN", "e"),
            ("APP_SECRET", "s2"),
            ("VERIFY_TOKEN", "vt"),
        ])
        .unwrap();
        let fb = &c.channels.facebook;
        let secrets: Vec<&str> = fb.app_secrets().iter().map(|s| s.expose()).collect();
        assert_eq!(secrets.len(), 2);
        assert!(secrets.contains(&"s1") && secrets.contains(&"s2"));
        assert_eq!(fb.verify_token.as_ref().map(Secret::expose), Some("vt"));
        assert!(format!("{fb:?}").contains("verify_token: Some(<redacted>)"));
        assert!(FacebookConfig::default().app_secrets().is_empty());
    }
}
