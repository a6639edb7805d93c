//! Fetching a file a person sent on Messenger: the attachment's `payload.url` (the event's
//! `content_url`), which Messenger serves from its CDN without credentials. No token is ever
//! sent; only https URLs on Messenger's CDN domains are fetched (or the origin of
//! `channels.facebook.graph_base_url`, for a local fake), so a bot cannot make the gateway
//! fetch anything else.

use super::Facebook;
use crate::channels::channel::Channel;
use crate::channels::fetch::{self, FetchError, FetchRequest, Fetched};
use crate::channels::shared::no_credentials;

/// The domains Messenger serves attachment URLs from (`scontent-*.xx.fbcdn.net`,
/// `cdn.fbsbx.com`, `lookaside.fbsbx.com`).
const CDN_DOMAINS: &[&str] = &["fbcdn.net", "fbsbx.com"];

pub(super) async fn fetch(fb: &Facebook, req: &FetchRequest<'_>) -> Result<Fetched, FetchError> {
    let url = fetch::parse_url(req.content_url)?;
    let host = url.host_str().unwrap_or_default();
    let on_cdn = url.scheme() == "https"
        && matches!(url.host(), Some(url::Host::Domain(_)))
        && CDN_DOMAINS.iter().any(|d| fetch::under_domain(host, d));
    if !on_cdn && !fetch::same_origin(&url, &fb.config.graph_base_url) {
        return Err(FetchError::invalid_url(format!(
            "not a Messenger attachment URL: only https URLs under {} are fetched",
            CDN_DOMAINS.join(" or ")
        )));
    }
    // No token goes with the request, but only a page this gateway serves may fetch: the
    // gateway is no open proxy for any bot id.
    if !fb.client.has_credentials(req.bot_id) {
        return Err(FetchError::NoCredentials(no_credentials(
            &fb.credential_hint(),
            req.bot_id,
        )));
    }
    fetch::download(
        fb.client.http(),
        "Messenger",
        &url,
        None,
        req.max_bytes,
        None,
    )
    .await
}
