//! Fetching a file a person sent on Telegram. An event names it by reference: the
//! attachment's `content_url` is `telegram-file:<file_id>` (see `inbound.rs`). The gateway
//! calls `getFile` with the bot's token, then downloads `{api_base}/file/bot<token>/<file_path>`.
//!
//! That download URL contains the token, so it is built here, handed to the transport and
//! dropped: it is never logged, returned or put in an error (every error text is scrubbed of
//! the token all the same). Telegram lets bots download files of up to 20 MB.

use serde_json::{Value, json};

use super::{Telegram, method_url};
use crate::channels::channel::Channel;
use crate::channels::fetch::{self, FetchError, FetchRequest, Fetched};
use crate::channels::shared::no_credentials;
use crate::channels::{Body, HttpMethod, NativeRequest, RateScopes};

/// The scheme of a Telegram file reference in `content_url`.
pub const FILE_SCHEME: &str = "telegram-file:";

/// The longest `file_id` taken (Telegram's are under 200 characters).
const MAX_FILE_ID_CHARS: usize = 512;
/// The longest `file_path` taken from `getFile` (`documents/file_12.pdf`).
const MAX_FILE_PATH_CHARS: usize = 1024;
/// What Telegram lets a bot download.
const TELEGRAM_MAX_BYTES: u64 = 20_000_000;

/// The `content_url` of a file an event carries.
pub fn file_url(file_id: &str) -> String {
    format!("{FILE_SCHEME}{file_id}")
}

/// The `file_id` of a `telegram-file:` reference, if it is one.
fn file_id(content_url: &str) -> Result<&str, FetchError> {
    let id = content_url.strip_prefix(FILE_SCHEME).ok_or_else(|| {
        FetchError::invalid_url(format!(
            "not a Telegram file reference: give the attachment's content_url as received \
             ({FILE_SCHEME}<file_id>)"
        ))
    })?;
    if id.is_empty()
        || id.len() > MAX_FILE_ID_CHARS
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(FetchError::invalid_url(
            "the file_id is empty, too long or not one Telegram gives",
        ));
    }
    Ok(id)
}

/// A `file_path` from `getFile` that keeps the download under `/file/bot<token>/`: relative,
/// no `..` segment, printable ASCII without `?`, `#`, `%` or `\`.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_FILE_PATH_CHARS
        && !p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#%\\".contains(&b))
        && p.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

pub(super) async fn fetch(tg: &Telegram, req: &FetchRequest<'_>) -> Result<Fetched, FetchError> {
    let id = file_id(req.content_url)?;
    let Some(token) = tg.client.token(req.bot_id) else {
        return Err(FetchError::NoCredentials(no_credentials(
            &tg.credential_hint(),
            req.bot_id,
        )));
    };
    let token = token.expose();
    let get_file = NativeRequest {
        method: HttpMethod::Post,
        url: method_url(&tg.config, "getFile"),
        body: Body::json(&json!({ "file_id": id }))
            .map_err(|e| FetchError::invalid_url(e.to_string()))?,
        credential: req.bot_id.to_string(),
        rate: RateScopes::default(),
    };
    let file = tg.client.call(&get_file).await.map_err(|e| {
        if e.message.contains("file is too big") {
            FetchError::TooLarge {
                limit: TELEGRAM_MAX_BYTES.min(req.max_bytes),
            }
        } else if e.http_status == Some(400) {
            // "Bad Request: invalid file_id", "wrong file_id or the file is temporarily
            // unavailable": a file_id of another bot, or one Telegram no longer has.
            FetchError::NotFound(e.message)
        } else {
            FetchError::from_channel(e)
        }
        .scrubbed([token])
    })?;
    let path = file
        .get("file_path")
        .and_then(Value::as_str)
        .filter(|p| safe_path(p))
        .ok_or_else(|| {
            FetchError::Unavailable(
                "Telegram's getFile answered without a usable file_path".to_string(),
            )
        })?;
    let size = file.get("file_size").and_then(Value::as_u64);
    let url = url::Url::parse(&format!("{}/file/bot{token}/{path}", tg.config.api_base()))
        .map_err(|_| FetchError::Unavailable("the download URL could not be built".into()))?;
    fetch::download(
        tg.client.http(),
        "Telegram",
        &url,
        None,
        req.max_bytes.min(TELEGRAM_MAX_BYTES),
        size,
    )
    .await
    .map(|mut f| {
        // Telegram names no file: the path's last segment (`file_12.jpg`) is the name, and
        // nothing else of the token-bearing URL leaves.
        f.name = path
            .rsplit('/')
            .next()
            .map(|n| crate::bounded::cap(n, 255).into_owned());
        f
    })
    .map_err(|e| e.scrubbed([token]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_telegram_file_references_are_taken() {
        assert_eq!(
            file_id("telegram-file:AgACAgIAAx0-_x").unwrap(),
            "AgACAgIAAx0-_x"
        );
        for bad in [
            "https://api.telegram.org/file/bot1:A/x",
            "telegram-file:",
            "telegram-file:a/../b",
            "telegram-file:a?b",
            "AgACAgIAAx0",
        ] {
            assert!(
                matches!(
                    file_id(bad),
                    Err(FetchError::InvalidArgument {
                        field: "content_url",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn file_paths_stay_under_the_bots_file_root() {
        assert!(safe_path("photos/file_0.jpg"));
        assert!(safe_path("documents/file_12.pdf"));
        for bad in [
            "",
            "/etc/passwd",
            "../bot2/x",
            "a/../../x",
            "a//b",
            "a?b",
            "a#b",
            "a%2e%2e/b",
            "a\\b",
            "a b",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }
}
