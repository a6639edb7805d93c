//! FetchAttachment over gRPC: checks the request and the caller's right to act as its bot, asks
//! the channel to start the download, and streams a header, then the file's bytes.
//!
//! Owns the wire side only: which URLs a channel fetches and with which credential is the
//! channel's (`Channel::fetch_attachment`), and this file never holds more of a file than the
//! piece it is handing on. It logs no URL: a Telegram download URL holds the bot's token, and
//! even the others are the people's files.

use std::pin::Pin;

use futures::StreamExt;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::pb;
use super::pb::fetch_attachment_response::Kind;
use super::{auth, status};
use crate::channels::Channels;
use crate::channels::fetch::{self, FetchError, FetchRequest};

pub type FetchAttachmentStream =
    Pin<Box<dyn Stream<Item = Result<pb::FetchAttachmentResponse, Status>> + Send>>;

/// The longest channel id or bot id taken.
const MAX_ID_CHARS: usize = 256;

/// Fetches streaming at once, in this process: each holds a connection to a channel and up to
/// a few hundred KiB of buffers until its bot has read the file. Past it, RESOURCE_EXHAUSTED.
pub const MAX_FETCHES: usize = 64;

static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FETCHES);

/// The status a fetch error is answered with.
pub fn fetch_status(e: FetchError) -> Status {
    let text = crate::bounded::cap(&e.to_string(), 500).into_owned();
    match e {
        FetchError::InvalidArgument { field, reason } => status::invalid_field(field, reason),
        FetchError::Route(r) => status::route(r, "address.channel_id"),
        FetchError::NoCredentials(_) => Status::with_error_details(
            Code::FailedPrecondition,
            text.clone(),
            ErrorDetails::with_precondition_failure_violation(
                "NO_CREDENTIALS",
                "address.bot.id",
                text,
            ),
        ),
        FetchError::NotFound(_) => Status::not_found(text),
        FetchError::Refused(_) => Status::failed_precondition(text),
        FetchError::TooLarge { limit } => Status::with_error_details(
            Code::ResourceExhausted,
            text.clone(),
            ErrorDetails::with_quota_failure_violation(format!("max_bytes={limit}"), text),
        ),
        FetchError::Unavailable(_) => Status::unavailable(text),
        FetchError::Unsupported(_) => Status::unimplemented(text),
    }
}

fn id_field(field: &'static str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(status::invalid_field(field, "required"));
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(status::invalid_field(
            field,
            format!("longer than {MAX_ID_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Serves one FetchAttachment call: errors found before the first byte (a bad request, a URL
/// the channel does not serve, no credentials, a file the channel does not have or announces
/// over the bound) are the call's status; one found while streaming ends the stream with it.
#[allow(clippy::result_large_err)]
pub async fn fetch_attachment(
    channels: &Channels,
    req: Request<pb::FetchAttachmentRequest>,
) -> Result<Response<FetchAttachmentStream>, Status> {
    let r = req.get_ref();
    let Some(address) = r.address.as_ref() else {
        return Err(status::invalid_field(
            "address",
            "required: the address of the event the attachment came with",
        ));
    };
    id_field("address.channel_id", &address.channel_id)?;
    let bot_id = address.bot.as_ref().map_or("", |b| b.id.as_str());
    id_field("address.bot.id", bot_id)?;
    auth::authorize(&req, bot_id)?;
    // Held until the stream ends (or the bot goes away and tonic drops it).
    let permit = FETCHES.try_acquire().map_err(|_| {
        Status::resource_exhausted(format!(
            "{MAX_FETCHES} attachment fetches are streaming already: try again shortly"
        ))
    })?;
    let fetch_req = FetchRequest {
        channel_id: &address.channel_id,
        bot_id,
        content_url: &r.content_url,
        max_bytes: fetch::bound(r.max_bytes),
    };
    let fetched = channels.fetch_attachment(&fetch_req).await.map_err(|e| {
        tracing::info!(
            channel_id = %crate::bounded::for_log(fetch_req.channel_id),
            bot_id = %crate::bounded::for_log(bot_id),
            error = %crate::bounded::for_log(&e.to_string()),
            "attachment not fetched"
        );
        fetch_status(e)
    })?;
    tracing::debug!(
        channel_id = %crate::bounded::for_log(fetch_req.channel_id),
        bot_id = %crate::bounded::for_log(bot_id),
        size = fetched.size,
        "attachment fetch started"
    );
    let header = pb::FetchAttachmentResponse {
        kind: Some(Kind::Header(pb::FetchAttachmentHeader {
            content_type: fetched.content_type,
            name: fetched.name.unwrap_or_default(),
            size: fetched.size,
        })),
    };
    // Pumped by a task of its own with a deadline on every hand-over: a bot that stops reading
    // but stays connected would never poll the stream, and would hold its permit and the
    // channel's connection for ever.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let started = tokio::time::Instant::now();
    let deadline = started
        .checked_add(fetch::MAX_FETCH_TIME)
        .unwrap_or(started);
    let mut body = fetched.body;
    tokio::spawn(async move {
        let _held = permit;
        let mut next = Some(Ok(header));
        while let Some(item) = next {
            let last = item.is_err();
            let sent = tokio::time::timeout_at(deadline, tx.send(item)).await;
            // An error ends the stream (tonic sends it as the status).
            if last || !matches!(sent, Ok(Ok(()))) {
                // Gone, or too slow: dropping the body closes the channel's connection.
                return;
            }
            next = body.next().await.map(|piece| match piece {
                Ok(bytes) => Ok(pb::FetchAttachmentResponse {
                    kind: Some(Kind::Chunk(bytes.to_vec())),
                }),
                Err(e) => Err(fetch_status(e)),
            });
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
