//! StreamReply's delivery: a reply whose text arrives while it is being shown, holding its
//! conversation's line from its first chunk to its end, so nothing of the conversation goes
//! between its first showing and its final message.
//!
//! Owns how the growing text reaches a channel, by what the channel can do:
//! - `edits` (the channel updates messages: Slack, Teams, Telegram): the first text is sent,
//!   then the message is updated with the text so far at most every
//!   `delivery.stream_update_interval`, each call within the channel's rate scopes; the final
//!   message (with its attachments and suggested actions) is the last update;
//! - `typing` (Messenger, Web Chat): a typing indicator kept alive while the text grows, then
//!   the final message;
//! - `final`: the final message alone.
//!
//! A stream that ends without its finish (the client went away, or sent nothing for
//! `delivery.stream_idle_timeout`) is finished with the text that arrived, and its outcome says
//! so (`stream_incomplete`). Its receipts are recorded from its first showing on, so a crash
//! leaves the partial message known: at the restart the stream is finished as it stood
//! (`stream_interrupted`), never sent again. Updates of a message are planned as
//! UpdateMessage's are (`channels::update`).

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Item, Worker, failed};
use crate::channels::update::{placeholders, receipts_after};
use crate::channels::{
    ChannelError, Channels, FailureKind, NativeReceipt, NativeRequest, RenderOrRoute, Rendered,
};
use crate::model::{Message, MessageType, Warning};
use crate::outbox::{Change, DeliveryState, Outcome};

/// What a StreamReply's client sends after its start.
#[derive(Debug)]
pub enum StreamEvent {
    /// Text to append.
    Text(String),
    /// The end: the final message's extras (attachments, suggested actions) and, when it has
    /// text, the text that replaces what was streamed.
    Finish(Box<Message>),
    /// The client sent more text than a message may hold: the stream ends with what it had.
    TooLong,
}

/// What a StreamReply's worker gets from its call: the client's events, and where to say what
/// had to change to show them (each showing's adaptations, reported with the answer).
#[derive(Debug)]
pub struct StreamFeed {
    pub events: mpsc::Receiver<StreamEvent>,
    pub warnings: oneshot::Sender<Vec<Warning>>,
}

/// How a channel shows a stream (GetCapabilities' `streaming`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    Edits,
    Typing,
    Final,
}

impl StreamMode {
    pub fn of(caps: &crate::channels::Capabilities) -> Self {
        if caps.update_delete {
            StreamMode::Edits
        } else if caps.typing {
            StreamMode::Typing
        } else {
            StreamMode::Final
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            StreamMode::Edits => "edits",
            StreamMode::Typing => "typing",
            StreamMode::Final => "final",
        }
    }
}

/// Attempts of one showing's request: a showing that keeps failing is skipped (the next one, or
/// the final message, carries the text anyway).
const SHOW_ATTEMPTS: u32 = 3;

/// Why a stream ended.
enum End {
    Finished(Box<Message>),
    /// The client went away without a finish.
    Gone,
    /// Nothing came for `stream_idle_timeout`.
    Idle,
    /// More text than `server.max_message_bytes`.
    TooLong,
}

impl Worker {
    /// Delivers a StreamReply while its events arrive; see the module doc.
    pub(super) async fn stream(&self, item: Item, feed: StreamFeed) {
        let StreamFeed {
            mut events,
            warnings,
        } = feed;
        if let Err(e) = item.durable.clone().await {
            let out = super::outbox_failed(failed_outcome(), e);
            self.finish(item, out);
            return;
        }
        let mut shown = Shown::default();
        self.stream_with(&item, &mut events, &mut shown).await;
        let _ = warnings.send(std::mem::take(&mut shown.warnings));
        let out = shown.outcome.take().unwrap_or_else(failed_outcome);
        self.finish(item, out);
    }

    /// The stream's loop and final showing; the outcome is left in `shown`.
    async fn stream_with(
        &self,
        item: &Item,
        events: &mut mpsc::Receiver<StreamEvent>,
        shown: &mut Shown,
    ) {
        let cfg = &self.inner.config;
        let mode = self
            .inner
            .channels
            .capabilities(self.key.channel_id())
            .map(|(c, _)| StreamMode::of(&c))
            .unwrap_or(StreamMode::Final);
        let mut text = item.message.text.clone().unwrap_or_default();
        let mut shown_len = 0usize;
        let now = tokio::time::Instant::now();
        let mut next_show = now;
        let mut next_typing = now;
        let typing_every = self.inner.channels.typing_interval(self.key.channel_id());
        // Idle is counted from the client's last frame: this side's showings and typing
        // indicators do not keep a silent stream alive.
        let mut idle_until = later(now, cfg.stream_idle_timeout);
        let end = loop {
            let wake = match mode {
                StreamMode::Edits if text.len() > shown_len => Some(next_show),
                StreamMode::Typing => Some(next_typing),
                _ => None,
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(StreamEvent::Text(t)) => {
                        text.push_str(&t);
                        idle_until = later(tokio::time::Instant::now(), cfg.stream_idle_timeout);
                    }
                    Some(StreamEvent::TooLong) => break End::TooLong,
                    Some(StreamEvent::Finish(m)) => break End::Finished(m),
                    None => break End::Gone,
                },
                _ = tokio::time::sleep_until(wake.unwrap_or(idle_until)), if wake.is_some() => {
                    match mode {
                        StreamMode::Edits => {
                            let m = with_text(&item.message, &text);
                            self.show(item, &m, shown).await;
                            shown_len = text.len();
                            next_show = later(tokio::time::Instant::now(), cfg.stream_update_interval);
                        }
                        StreamMode::Typing => {
                            self.typing_once(&item.message).await;
                            next_typing = later(tokio::time::Instant::now(), typing_every.max(Duration::from_secs(1)));
                        }
                        StreamMode::Final => {}
                    }
                }
                _ = tokio::time::sleep_until(idle_until) => break End::Idle,
            }
        };
        let (mut last, incomplete) = match end {
            End::Finished(m) => {
                let mut last = with_text(&item.message, &text);
                if m.text.as_deref().is_some_and(|t| !t.is_empty()) {
                    last.text = m.text.clone();
                }
                last.attachments = m.attachments.clone();
                last.attachment_layout = m.attachment_layout;
                last.suggested_actions = m.suggested_actions.clone();
                (last, None)
            }
            End::Gone => (
                with_text(&item.message, &text),
                Some("the client went away before the stream's finish"),
            ),
            End::Idle => (
                with_text(&item.message, &text),
                Some("nothing came for delivery.stream_idle_timeout"),
            ),
            End::TooLong => (
                with_text(&item.message, &text),
                Some("the text reached server.max_message_bytes; the rest was not shown"),
            ),
        };
        if last.text.as_deref().is_none_or(str::is_empty)
            && last.attachments.is_empty()
            && last.suggested_actions.is_none()
        {
            if shown.receipts.is_empty() {
                let err = stream_error(
                    "stream_empty",
                    "the stream ended with nothing to show: no message was sent",
                );
                shown.outcome = Some(failed(err, shown.calls));
                return;
            }
            // Shown already: the final showing keeps what is there.
            last.text = Some(text.clone());
        }
        let mut out = self.show_final(item, &last, shown).await;
        if let Some(why) = incomplete
            && out.error.is_none()
        {
            out.error = Some(stream_error(
                "stream_incomplete",
                format!("{why}: the message shows the text that arrived"),
            ));
            tracing::warn!(
                message_id = item.id,
                reason = why,
                "stream finished with the text that arrived"
            );
        }
        shown.outcome = Some(out);
    }

    /// One showing of the text so far: the first sends the message, the next ones update it.
    /// Failures are logged and skipped: the next showing carries the text anyway.
    async fn show(&self, item: &Item, m: &Message, shown: &mut Shown) {
        if let Err(e) = self.show_step(item, m, shown).await {
            tracing::warn!(message_id = item.id, error = %e, "a stream's showing failed; the next one carries its text");
            return;
        }
        // Known from its first showing on: a crash then leaves it finished as it stood.
        let mut progress = Outcome {
            state: DeliveryState::Delivering,
            receipts: shown.receipts.clone(),
            error: None,
            attempts: shown.calls,
            possible_duplicate: false,
        };
        for r in &mut progress.receipts {
            r.bound();
        }
        if shown.recorded != shown.receipts {
            shown.recorded = shown.receipts.clone();
            drop(
                self.inner
                    .store
                    .update_fenced(item.id, Change::Finished(progress), item.fence),
            );
        }
    }

    async fn show_step(
        &self,
        item: &Item,
        m: &Message,
        shown: &mut Shown,
    ) -> Result<(), ChannelError> {
        let render_err = |e: crate::channels::RenderOrRoute| self.render_failure(&e);
        if shown.receipts.is_empty() {
            let rendered = self
                .inner
                .channels
                .render_send(m, None)
                .map_err(render_err)?;
            // As a Send's: from now on a crash may leave the message shown with no receipt
            // recorded, and the stream is then finished flagged as a possible duplicate.
            if !shown.marked {
                self.inner
                    .store
                    .update_fenced(item.id, Change::Delivering { attempts: 0 }, item.fence)
                    .await
                    .map_err(|e| ChannelError {
                        code: Some("outbox".into()),
                        ..ChannelError::new("gateway", FailureKind::Permanent, e.to_string())
                    })?;
                shown.marked = true;
            }
            shown.note(&rendered.warnings);
            for req in &rendered.requests {
                let r = self.call(req, &mut shown.calls).await?;
                shown.receipts.push(r);
            }
            return Ok(());
        }
        let plan = self
            .inner
            .channels
            .render_update(m, &shown.receipts)
            .map_err(render_err)?;
        shown.note(&plan.rendered.warnings);
        let mut done = Vec::with_capacity(plan.rendered.requests.len());
        let mut result = Ok(());
        for req in &plan.rendered.requests {
            match self.call(req, &mut shown.calls).await {
                Ok(r) => done.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        shown.receipts = receipts_after(&shown.receipts, &plan.steps, &done);
        result
    }

    /// The final showing: an update of what was shown, or the message itself.
    async fn show_final(&self, item: &Item, m: &Message, shown: &mut Shown) -> Outcome {
        let result = self.show_step(item, m, shown).await;
        let mut out = Outcome {
            state: DeliveryState::Delivered,
            receipts: shown.receipts.clone(),
            error: None,
            attempts: shown.calls,
            possible_duplicate: item.possible_duplicate,
        };
        if let Err(e) = result {
            // Shown in part: the message stays as it was last shown.
            out.state = if shown.receipts.is_empty() {
                DeliveryState::Failed
            } else {
                DeliveryState::Delivered
            };
            out.error = Some(e);
        }
        out
    }

    /// One request of a stream: within its rate scopes, tried again a few times when the
    /// channel asks for it.
    async fn call(
        &self,
        req: &NativeRequest,
        calls: &mut u32,
    ) -> Result<NativeReceipt, ChannelError> {
        let cfg = &self.inner.config;
        let mut attempt = 0u32;
        loop {
            let wait = self.inner.rates.reserve(&req.rate, Instant::now());
            self.wait_for_scopes(req, wait).await;
            attempt += 1;
            *calls = calls.saturating_add(1);
            match self.execute(req).await {
                Ok(r) => return Ok(r),
                Err(e) if e.kind == FailureKind::Retryable && attempt < SHOW_ATTEMPTS => {
                    let wait = super::retry::backoff(
                        attempt,
                        cfg.base_retry_delay,
                        cfg.max_retry_delay,
                        e.retry_after,
                        rand::random::<f64>(),
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn typing_once(&self, template: &Message) {
        if let Ok(r) = self.inner.channels.render_send(&typing_of(template), None) {
            self.send_typing(&Rendered {
                requests: r.requests,
                warnings: Vec::new(),
            })
            .await;
        }
    }

    /// A stream resumed after a restart: its text is gone with the process that had it, so it
    /// is finished as it stood: shown (its receipts were recorded), or never shown.
    pub(super) async fn interrupted_stream(&self, item: &mut Item) -> Outcome {
        let receipts = match self.inner.store.get(item.id).await {
            Ok(Some(m)) => m.record.receipts,
            _ => Vec::new(),
        };
        let shown = !receipts.is_empty();
        // Marked delivering before its first showing: without receipts, that showing may have
        // reached the channel all the same.
        let maybe = !shown && item.possible_duplicate;
        // Shown, with its receipts: nothing is sent again, so nothing is a duplicate.
        item.possible_duplicate = maybe;
        let why = match (shown, maybe) {
            (true, _) => {
                "the gateway stopped while the reply was streaming: the message shows the text \
                 it had shown then"
            }
            (false, true) => {
                "the gateway stopped while the reply's first showing was on its way: the channel \
                 may show it, its receipt is unknown"
            }
            (false, false) => {
                "the gateway stopped before the streamed reply was shown: nothing was sent"
            }
        };
        Outcome {
            state: if shown {
                DeliveryState::Delivered
            } else {
                DeliveryState::Failed
            },
            receipts,
            error: Some(stream_error("stream_interrupted", why)),
            attempts: 0,
            possible_duplicate: maybe,
        }
    }
}

/// What a stream has shown so far.
#[derive(Default)]
struct Shown {
    receipts: Vec<NativeReceipt>,
    /// The receipts last written to the outbox.
    recorded: Vec<NativeReceipt>,
    /// Channel calls made.
    calls: u32,
    /// The outbox was told a showing may reach the channel.
    marked: bool,
    /// What the showings had to change, each code once.
    warnings: Vec<Warning>,
    /// How it ended, once it did.
    outcome: Option<Outcome>,
}

impl Shown {
    /// Keeps a showing's adaptations, each code once: every showing of a growing text says
    /// the same ones again.
    fn note(&mut self, warnings: &[Warning]) {
        for w in warnings {
            if self.warnings.len() < crate::channels::MAX_WARNINGS
                && !self.warnings.iter().any(|x| x.code == w.code)
            {
                self.warnings.push(w.clone());
            }
        }
    }
}

/// What a StreamReply whose final message is `msg` makes on its channel, shown the way the
/// worker shows it, against placeholder ids (Render's `change.stream`): by edits, its first
/// showing (text `{text so far}`), one update of it and the final update; by typing, the
/// indicator then the message; else the message.
pub fn render(channels: &Channels, msg: &Message) -> Result<Rendered, RenderOrRoute> {
    let (caps, _) = channels.capabilities(&msg.address.channel_id)?;
    let growing = Message {
        text: Some("{text so far}".into()),
        attachments: Vec::new(),
        suggested_actions: None,
        ..msg.clone()
    };
    let mut out = Rendered::default();
    match StreamMode::of(&caps) {
        StreamMode::Edits => {
            let first = channels.render_send(&growing, None)?;
            let conversation = msg.address.conversation_id().unwrap_or_default();
            let receipts = placeholders(first.requests.len().max(1), conversation);
            let again = channels.render_update(&growing, &receipts)?;
            let last = channels.render_update(msg, &receipts)?;
            out.requests.extend(first.requests);
            out.requests.extend(again.rendered.requests);
            out.requests.extend(last.rendered.requests);
            out.warnings = last.rendered.warnings;
        }
        StreamMode::Typing => {
            out.requests
                .extend(channels.render_send(&typing_of(msg), None)?.requests);
            let last = channels.render_send(msg, None)?;
            out.requests.extend(last.requests);
            out.warnings = last.warnings;
        }
        StreamMode::Final => out = channels.render_send(msg, None)?,
    }
    Ok(out)
}

/// The typing indicator shown while a reply to `template`'s address grows.
fn typing_of(template: &Message) -> Message {
    Message {
        address: template.address.clone(),
        kind: MessageType::Typing,
        ..Default::default()
    }
}

fn with_text(template: &Message, text: &str) -> Message {
    Message {
        text: Some(text.to_string()),
        ..template.clone()
    }
}

fn later(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now.checked_add(d).unwrap_or(now)
}

fn stream_error(code: &str, why: impl Into<String>) -> ChannelError {
    ChannelError {
        code: Some(code.into()),
        ..ChannelError::new("gateway", FailureKind::Permanent, why)
    }
}

fn failed_outcome() -> Outcome {
    Outcome {
        state: DeliveryState::Failed,
        receipts: Vec::new(),
        error: None,
        attempts: 0,
        possible_duplicate: false,
    }
}
