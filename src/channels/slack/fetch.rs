//! Fetching a file shared on Slack: its `url_private` / `url_private_download` (the event's
//! `content_url`) with the workspace's bot token as `Authorization: Bearer`, which Slack
//! requires for them (the bot token needs the `files:read` scope).
//!
//! The token goes only to Slack's file host (`https://files.slack.com`) or to the origin of
//! `channels.slack.api_base_url` (where it already goes for every call: a local fake, a proxy);
//! any other URL is refused before a request is made.

use super::Slack;
use crate::channels::channel::Channel;
use crate::channels::fetch::{self, FetchError, FetchRequest, Fetched};
use crate::channels::shared::no_credentials;

/// Where Slack serves files (`url_private`, `url_private_download`).
const FILES_HOST: &str = "files.slack.com";

pub(super) async fn fetch(slack: &Slack, req: &FetchRequest<'_>) -> Result<Fetched, FetchError> {
    let url = fetch::parse_url(req.content_url)?;
    let slack_files = url.scheme() == "https"
        && url.host_str() == Some(FILES_HOST)
        && url.port_or_known_default() == Some(443);
    if !slack_files && !fetch::same_origin(&url, &slack.config.api_base_url) {
        return Err(FetchError::invalid_url(format!(
            "not a Slack file URL: only the url_private or url_private_download of a file \
             (https://{FILES_HOST}/...) is fetched with the bot token"
        )));
    }
    let Some(token) = slack.client.token(req.bot_id) else {
        return Err(FetchError::NoCredentials(no_credentials(
            &slack.credential_hint(),
            req.bot_id,
        )));
    };
    fetch::download(
        slack.client.http(),
        "Slack",
        &url,
        Some(token.expose()),
        req.max_bytes,
        None,
    )
    .await
    .map_err(|e| e.scrubbed([token.expose()]))
}
