//! What every channel shares: the clear-text refusal for URLs that receive a credential,
//! `Retry-After` parsing, scrubbing secrets out of text, the warning for dropped
//! `source_event["*"]` keys, and the "no credentials for this bot" explanation.
//!
//! The one place a channel borrows from: no channel imports from a sibling. Knows no channel's
//! JSON; transport-error classification lives with the transport (`http::TransportError`).

use std::time::Duration;

use super::text;

/// Whether `host` is this machine: the only place a credential may travel in clear text.
pub(crate) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a configured URL that will receive a credential (a token endpoint, an API base) may not:
/// only https, or plain http to a loopback host (local fakes and tests), and no credentials of
/// its own (`user:password@`: they would be echoed wherever the URL is shown). `None` when it
/// may. The reason never quotes the URL.
pub(crate) fn clear_text_refusal(url: &url::Url) -> Option<String> {
    if !url.username().is_empty() || url.password().is_some() {
        return Some(
            "must not carry a user or password (`user:password@`): credentials go in their own keys"
                .into(),
        );
    }
    match url.scheme() {
        "https" => None,
        "http" if is_loopback(url.host_str().unwrap_or_default()) => None,
        s => Some(format!(
            "scheme `{s}` is not allowed: only https (http for loopback hosts), since credentials travel to it"
        )),
    }
}

/// Names (at most this many) a warning lists, e.g. of the `source_event["*"]` keys it left out.
const NAMES_SHOWN: usize = 5;
/// Characters of one name in such a warning: the names come from the request.
const NAME_CHARS: usize = 40;

/// "`a`, `b` and 3 more": what a warning says of names from a request, each capped, without
/// control characters, and only the first few listed. `quote` writes one (capped) name.
pub(crate) fn name_list(names: &[&str], quote: impl Fn(&str) -> String) -> String {
    let list: Vec<String> = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|k| {
            let k = text::truncate(k, NAME_CHARS, text::chars).unwrap_or_else(|| k.to_string());
            quote(&k.escape_debug().to_string())
        })
        .collect();
    let mut out = list.join(", ");
    if names.len() > NAMES_SHOWN {
        out.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    out
}

/// The warning for keys of the shared `source_event["*"]` fallback that a channel does not take
/// from it (`allowed` lists those it does): they were left out of the request. `channel_key`
/// is where a channel-only field belongs (`source_event.slack`).
pub(crate) fn fallback_keys_dropped(
    dropped: &[&str],
    api: &str,
    channel_key: &str,
    allowed: &[&str],
) -> crate::model::Warning {
    let names = name_list(dropped, |k| format!("`{k}`"));
    crate::model::Warning::new(
        "source_event_keys_dropped",
        "message.source_event.*",
        format!(
            "{names} {} not among the {api} fields the shared source_event[\"*\"] may set ({}): left out (put fields for this channel only in source_event.{channel_key})",
            if dropped.len() == 1 { "is" } else { "are" },
            allowed.join(", ")
        ),
    )
}

/// The keys of a shared `source_event["*"]` object that a channel takes from it (`allowed`), and
/// the warning for the others, which are left out. `None` when none is kept.
pub(crate) fn keep_fallback_keys(
    o: &serde_json::Map<String, serde_json::Value>,
    api: &str,
    channel_key: &str,
    allowed: &[&str],
    warnings: &mut Vec<crate::model::Warning>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let (kept, dropped): (Vec<_>, Vec<_>) =
        o.iter().partition(|(k, _)| allowed.contains(&k.as_str()));
    if !dropped.is_empty() {
        let names: Vec<&str> = dropped.iter().map(|(k, _)| k.as_str()).collect();
        warnings.push(fallback_keys_dropped(&names, api, channel_key, allowed));
    }
    let kept: serde_json::Map<String, serde_json::Value> = kept
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// Parses `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &http::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

/// `s` with every non-empty secret in `secrets` replaced by `<redacted>`: the last line of
/// defence for text that may echo a request (an error quoting a URL, a channel's answer).
pub(crate) fn scrub_secrets<'a>(s: String, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut s = s;
    for secret in secrets {
        if !secret.is_empty() && s.contains(secret) {
            s = s.replace(secret, "<redacted>");
        }
    }
    s
}

/// How a channel names the credentials an address's bot id is matched against, for the error
/// that says none matched (ids only, never a secret).
pub struct CredentialHint {
    /// `bot`, `page`, `workspace`.
    pub what: &'static str,
    /// The key holding the id: `app_id`, `page_id`, `bot_id`.
    pub key: &'static str,
    /// Where to configure one: `channels.slack.workspaces`.
    pub section: &'static str,
    /// The configured ids.
    pub ids: Vec<String>,
}

/// "no workspace has bot_id `B9` (configured: `B1`, `B2`; channels.slack.workspaces)": what
/// the bot id was matched against. The list is capped; the bot id from the request is too.
pub(crate) fn no_credentials(hint: &CredentialHint, bot: &str) -> String {
    const SHOWN: usize = 5;
    let capped = |s: &str| crate::settings::capped(s, 64);
    let bot = if bot.is_empty() {
        "(address.bot.id is empty)".to_string()
    } else {
        format!("`{}`", capped(bot))
    };
    let section = hint.section;
    let configured = match hint.ids.len() {
        0 => format!("none is configured: set {section}"),
        n => {
            let mut list: Vec<String> = hint
                .ids
                .iter()
                .take(SHOWN)
                .map(|i| format!("`{}`", capped(i)))
                .collect();
            if n > SHOWN {
                list.push(format!("and {} more", n - SHOWN));
            }
            format!("configured: {}; {section}", list.join(", "))
        }
    };
    format!("no {} has {} {bot} ({configured})", hint.what, hint.key)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Hex HMAC-SHA256 of `parts` (concatenated) keyed by `key`: how Graph's `appsecret_proof`,
/// Messenger's and Slack's webhook signatures are written. Only for making a signature: a
/// presented one is checked with `Mac::verify_slice`, in constant time.
pub fn hmac_sha256_hex(key: &[u8], parts: &[&[u8]]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
        return String::new();
    };
    for p in parts {
        mac.update(p);
    }
    hex(&mac.finalize().into_bytes())
}
