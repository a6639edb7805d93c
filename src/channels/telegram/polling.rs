//! Receiving a Telegram bot's updates by `getUpdates` long polling, for a bot configured with
//! `receive = "polling"`: no public URL is needed.
//!
//! Owns the poll loop of one bot: the `offset` (which confirms earlier updates to Telegram),
//! the long-poll timeout, the backoff on failures, and the hand-over to the sink. Updates are
//! normalized by `inbound::update_events`, the function the webhook uses; the Bot API call goes
//! through `client.rs`, the only place a token meets a URL (and whose errors are scrubbed of
//! it). Must not store events (the sink does) nor parse an update itself.
//!
//! Durability: `getUpdates` with `offset = N` tells Telegram that every update below `N` was
//! received, and Telegram forgets them. So the offset moves past a batch only once the sink
//! said its events are durable; the offset lives only in this loop, so a loop dropped at any
//! await restarts (next process) from the earliest unconfirmed update, and the sink's dedupe
//! (`{bot_id}:{update_id}`) recognises what it already holds.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::CHANNEL_ID;
use super::client::TelegramClient;
use super::config::{TelegramBot, TelegramConfig};
use super::inbound::{self_id, update_events, update_id, update_kinds};
use crate::channels::channel::InboundEvent;
use crate::channels::{Body, ChannelError, HttpMethod, NativeRequest};
use crate::inbound::{Sink, SinkError};

/// The most updates one `getUpdates` returns (Telegram's own bound: 1-100).
pub const MAX_LIMIT: u32 = 100;
/// An empty answer quicker than this was no long poll.
const MIN_EMPTY_POLL: Duration = Duration::from_millis(100);
/// Added to the long-poll timeout for the HTTP call: Telegram answers at the end of the long
/// poll, and the answer needs time to arrive.
const HTTP_MARGIN: Duration = Duration::from_secs(15);

/// How the loop waits. The defaults suit Telegram; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// `getUpdates`' `timeout`: how long Telegram holds a call open when there is nothing new
    /// (whole seconds; at least one).
    pub long_poll: Duration,
    /// The first wait after a failure; it doubles with each failure in a row.
    pub backoff_first: Duration,
    /// The longest wait after a failure, and the cap on a `retry_after` asked by Telegram or
    /// the sink (a hostile or broken answer must not park the loop for days).
    pub backoff_max: Duration,
    /// The wait after a 409 Conflict (a webhook is set, or another process polls this bot):
    /// slow, since it needs a person to act.
    pub conflict_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            long_poll: Duration::from_secs(25),
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            conflict_wait: Duration::from_secs(30),
        }
    }
}

/// One bot's poll loop.
pub struct Poller {
    client: TelegramClient,
    /// `{api_base_url}/bot<token>/getUpdates`: the token is put in by the client only.
    url: String,
    /// `…/answerCallbackQuery`, the same way.
    answer_url: String,
    bot_id: String,
    self_id: Option<i64>,
    timing: Timing,
}

/// How long a callback query's answer may take before polling goes on without it.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What a pass through the loop ended with.
enum Next {
    /// Go on at once from this offset.
    Poll(Option<i64>),
    /// Wait, then poll again from the same offset.
    Wait(Duration),
    /// The inbox failed to store: wait longer after each failure in a row, then poll again.
    SinkFailed,
}

impl Poller {
    pub fn new(config: &TelegramConfig, bot: &TelegramBot, timing: Timing) -> Result<Self, String> {
        let timeout = timing.long_poll.saturating_add(HTTP_MARGIN);
        Ok(Self {
            client: TelegramClient::new(config.clone(), timeout)?,
            url: super::method_url(config, "getUpdates"),
            answer_url: super::method_url(config, "answerCallbackQuery"),
            bot_id: bot.bot_id.clone(),
            self_id: self_id(&bot.token),
            timing,
        })
    }

    /// Polls until dropped. Cancel-safe: see the module doc.
    pub async fn run(self, sink: Arc<dyn Sink>) {
        tracing::info!(bot_id = %crate::bounded::for_log(&self.bot_id), "telegram: receiving by getUpdates long polling");
        let mut offset: Option<i64> = None;
        let mut failures: u32 = 0;
        let mut limit = MAX_LIMIT;
        loop {
            let started = tokio::time::Instant::now();
            let next = match self.get_updates(offset, limit).await {
                // Nothing, at once: not a long poll (a server ignoring `timeout`). A pause keeps
                // such a server from spinning the loop.
                Ok(updates) if updates.is_empty() && started.elapsed() < MIN_EMPTY_POLL => {
                    failures = 0;
                    Next::Wait(self.timing.backoff_first)
                }
                Ok(updates) => {
                    failures = 0;
                    limit = limit.saturating_mul(2).min(MAX_LIMIT);
                    self.deliver(sink.as_ref(), offset, &updates).await
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if e.http_status.is_none() {
                        // No answer: perhaps one too big to take. Fewer updates per call
                        // let a batch of large ones through.
                        limit = (limit / 2).max(1);
                    }
                    Next::Wait(self.wait_after(&e, failures))
                }
            };
            match next {
                Next::Poll(o) => offset = o,
                Next::Wait(d) => tokio::time::sleep(d).await,
                Next::SinkFailed => {
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(self.backoff(failures)).await;
                }
            }
        }
    }

    /// One `getUpdates` call: the updates from `offset` on, at most `limit`.
    async fn get_updates(
        &self,
        offset: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Value>, ChannelError> {
        let mut body = json!({
            "limit": limit,
            "timeout": self.timing.long_poll.as_secs().max(1),
            "allowed_updates": update_kinds(),
        });
        if let (Some(o), Some(map)) = (offset, body.as_object_mut()) {
            map.insert("offset".into(), o.into());
        }
        let req = NativeRequest {
            method: HttpMethod::Post,
            url: self.url.clone(),
            body: Body::json(&body).map_err(|e| {
                ChannelError::new(
                    CHANNEL_ID,
                    crate::channels::FailureKind::Permanent,
                    e.to_string(),
                )
            })?,
            credential: self.bot_id.clone(),
            rate: Default::default(),
        };
        match self.client.call(&req).await? {
            Value::Array(updates) => Ok(updates
                .into_iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .collect()),
            _ => Err(ChannelError::new(
                CHANNEL_ID,
                crate::channels::FailureKind::Retryable,
                "getUpdates answered something that is not a list of updates",
            )),
        }
    }

    /// Hands the events of `updates` to the sink; the offset moves past them only if it took
    /// them.
    async fn deliver(&self, sink: &dyn Sink, offset: Option<i64>, updates: &[Value]) -> Next {
        let mut events: Vec<InboundEvent> = Vec::new();
        let mut next = offset;
        for update in updates {
            let Some(id) = update_id(update) else {
                tracing::warn!(bot_id = %crate::bounded::for_log(&self.bot_id), "telegram: an update without update_id was skipped");
                continue;
            };
            // An update_id at i64::MAX cannot be passed: it is confirmed by none, and comes
            // again, which the sink's dedupe absorbs.
            if let Some(after) = id.checked_add(1) {
                next = Some(next.map_or(after, |n| n.max(after)));
            }
            match update_events(&self.bot_id, self.self_id, update) {
                Ok(e) => events.extend(e),
                Err(e) => {
                    tracing::warn!(bot_id = %crate::bounded::for_log(&self.bot_id), error = %crate::bounded::for_log(&e.to_string()), "telegram: an update was unreadable");
                }
            }
        }
        // Updates that move the offset nowhere (no usable update_id, ids below it) would be
        // asked for again at once, for ever: wait between such rounds.
        let advance = if next == offset {
            Next::Wait(self.timing.backoff_first)
        } else {
            Next::Poll(next)
        };
        if events.is_empty() {
            return advance;
        }
        let count = events.len();
        match sink.append(CHANNEL_ID, events).await {
            Ok(()) => {
                tracing::debug!(bot_id = %crate::bounded::for_log(&self.bot_id), count, "telegram: polled updates stored");
                // Stored: stop the pressed buttons spinning (a webhook does it in its answer),
                // all at once and briefly, so a batch of presses does not hold up polling.
                let answers = updates
                    .iter()
                    .filter_map(super::inbound::callback_query_id)
                    .map(|id| tokio::time::timeout(ANSWER_WITHIN, self.answer_callback_query(id)));
                futures::future::join_all(answers).await;
                advance
            }
            // Not confirmed: the same updates come again after the wait.
            Err(SinkError::Full { retry_after }) => {
                tracing::debug!(bot_id = %crate::bounded::for_log(&self.bot_id), ?retry_after, "telegram: the inbox is full; polling again later");
                Next::Wait(
                    retry_after
                        .max(Duration::from_millis(10))
                        .min(self.timing.backoff_max),
                )
            }
            Err(SinkError::Failed(e)) => {
                tracing::error!(bot_id = %crate::bounded::for_log(&self.bot_id), error = %crate::bounded::for_log(&e), "telegram: polled updates not stored; polling again later");
                Next::SinkFailed
            }
        }
    }

    /// Answers a callback query with no text. A failure is only logged: the button stops
    /// spinning on its own after a while, and the event is stored either way.
    async fn answer_callback_query(&self, id: &str) {
        let Ok(body) = Body::json(&json!({ "callback_query_id": id })) else {
            return;
        };
        let req = NativeRequest {
            method: HttpMethod::Post,
            url: self.answer_url.clone(),
            body,
            credential: self.bot_id.clone(),
            rate: Default::default(),
        };
        if let Err(e) = self.client.call(&req).await {
            tracing::debug!(bot_id = %crate::bounded::for_log(&self.bot_id), error = %crate::bounded::for_log(&e.message), "telegram: answerCallbackQuery failed");
        }
    }

    /// The wait after `failures` failures in a row: doubling from `backoff_first`, capped.
    fn backoff(&self, failures: u32) -> Duration {
        self.timing
            .backoff_first
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.timing.backoff_max)
    }

    /// How long to wait after a failed call (the error is already scrubbed of the token).
    fn wait_after(&self, e: &ChannelError, failures: u32) -> Duration {
        let bot_id = crate::bounded::for_log(&self.bot_id);
        let error: Cow<'_, str> = crate::bounded::for_log(&e.message);
        match e.http_status {
            Some(409) => {
                tracing::warn!(
                    bot_id = %bot_id,
                    error = %error,
                    "telegram: getUpdates refused (409 Conflict): a webhook is set for this bot, or another process polls it; call deleteWebhook (or stop the other poller) to receive here"
                );
                return self.timing.conflict_wait;
            }
            Some(401 | 404) => {
                tracing::error!(bot_id = %bot_id, error = %error, "telegram: getUpdates refused: the bot's token is not valid");
                return self.timing.backoff_max;
            }
            _ => {}
        }
        let backoff = self.backoff(failures);
        let wait = e
            .retry_after
            .map_or(backoff, |r| r.min(self.timing.backoff_max).max(backoff));
        tracing::warn!(bot_id = %bot_id, http_status = e.http_status, error = %error, ?wait, "telegram: getUpdates failed");
        wait
    }
}
