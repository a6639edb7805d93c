//! Fetching a file a person sent through the Bot Framework: the attachment's `contentUrl`.
//! Skype, Teams and Web Chat attachment URLs on the Connector's hosts need the bot's Connector
//! token, so it is sent, as on the send side, only to a host of
//! `channels.botframework.allowed_service_hosts` (https, or http to loopback when listed).
//! Other https URLs (a Teams file's pre-authorized download URL) are fetched without any
//! credential, and never on an address literal of a private network or this machine.

use super::BotFramework;
use super::client::{FOR_CHANNEL, allowed_url};
use crate::channels::channel::Channel;
use crate::channels::fetch::{self, FetchError, FetchRequest, Fetched};
use crate::channels::shared::no_credentials;

pub(super) async fn fetch(
    bf: &BotFramework,
    req: &FetchRequest<'_>,
) -> Result<Fetched, FetchError> {
    let url = fetch::parse_url(req.content_url)?;
    // Decided on the URL as it will be sent (its normalized form), not the text as given.
    let for_token = allowed_url(&bf.config.allowed_service_hosts, url.as_str()).is_ok();
    if !for_token {
        if url.scheme() != "https" {
            return Err(FetchError::invalid_url(
                "plain http to a host that is not in channels.botframework.allowed_service_hosts: \
                 not fetched",
            ));
        }
        if let Some(reason) = fetch::private_host_refusal(&url) {
            return Err(FetchError::invalid_url(reason));
        }
    }
    if !bf.has_credentials(req.bot_id) {
        return Err(FetchError::NoCredentials(no_credentials(
            &bf.credential_hint(),
            req.bot_id,
        )));
    }
    let token = if for_token {
        FOR_CHANNEL
            .scope(
                crate::metrics::channel_label(req.channel_id),
                bf.client.token(req.bot_id, None),
            )
            .await
            .map_err(FetchError::from_channel)?
    } else {
        None
    };
    let bearer = token.as_ref().map(|t| t.expose());
    fetch::download(
        bf.client.http(),
        "the Bot Framework",
        &url,
        bearer,
        req.max_bytes,
        None,
    )
    .await
    .map_err(|e| e.scrubbed(bearer))
}
