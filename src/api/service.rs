//! The `ChannelGateway` service: validate, render (to report problems before accepting),
//! hand to the dispatcher, and answer per the wait mode.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

use super::convert::{self, Violations};
use super::pb::{self, channel_gateway_server::ChannelGateway};
use super::{auth, status};
use crate::channels::{Capabilities, NativeReceipt};
use crate::config::ServerConfig;
use crate::delivery::{ConversationKey, Dispatcher, Submission, Ticket};
use crate::model::{self, Message, MessageType, ProactiveOptions};
use crate::outbox::{DeliveryState, Outcome, StoredMessage, now_ms};
use tokio_stream::{Stream, StreamExt};

#[derive(Clone)]
enum Cached {
    Send(Box<pb::SendResponse>),
    Batch(pb::SendBatchResponse),
    Proactive(Box<pb::SendProactiveResponse>),
    Change(Box<pb::SendResult>),
}

type Slot = Arc<OnceCell<Cached>>;
/// (rpc, bot id, idempotency key).
type IdemKey = (&'static str, String, String);

/// First results by (rpc, bot id, idempotency key), in this process. A concurrent retry waits
/// for the first call; a failed first call caches nothing, so a retry after it really retries.
/// Across restarts the outbox keeps which messages a key accepted.
struct Idempotency {
    window: Duration,
    slots: Mutex<HashMap<IdemKey, (Instant, Slot)>>,
}

impl Idempotency {
    fn slot(&self, key: &IdemKey) -> Slot {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() > 4096 {
            map.retain(|_, (t, _)| now.duration_since(*t) < self.window);
        }
        let entry = map
            .entry(key.clone())
            .or_insert_with(|| (now, Arc::new(OnceCell::new())));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, Arc::new(OnceCell::new()));
        }
        entry.1.clone()
    }

    fn release(&self, key: &IdemKey, slot: &Slot) {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|(_, s)| Arc::ptr_eq(s, slot)) {
            map.remove(key);
        }
    }
}

fn idem_store_key(k: &IdemKey) -> String {
    // Unit separators cannot appear in the parts' meaning, so keys never collide.
    format!("{}\u{1f}{}\u{1f}{}", k.0, k.1, k.2)
}

pub struct GatewayService {
    dispatcher: Dispatcher,
    config: ServerConfig,
    idempotency: Idempotency,
    watchers: Arc<super::watch::Watchers>,
    /// The inbox, when receiving is on, and its ack deadline.
    inbox: Option<(crate::inbound::Inbox, Duration)>,
}

fn warnings_pb(w: &[model::Warning]) -> Vec<pb::Warning> {
    w.iter()
        .map(|w| pb::Warning {
            code: w.code.clone(),
            field: w.field.clone(),
            message: w.message.clone(),
        })
        .collect()
}

fn receipts_pb(r: &[NativeReceipt]) -> Vec<pb::Receipt> {
    r.iter()
        .map(|r| pb::Receipt {
            native_id: r.native_id.clone(),
            conversation_id: r.conversation_id.clone(),
        })
        .collect()
}

pub(super) fn state_pb(s: DeliveryState) -> pb::DeliveryState {
    match s {
        DeliveryState::Accepted => pb::DeliveryState::Accepted,
        DeliveryState::Delivering => pb::DeliveryState::Delivering,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Failed => pb::DeliveryState::Failed,
        DeliveryState::Expired => pb::DeliveryState::Expired,
    }
}

fn error_pb(e: crate::channels::ChannelError, o: &Outcome) -> pb::ChannelError {
    pb::ChannelError {
        permanent: e.kind == crate::channels::FailureKind::Permanent,
        channel: e.channel,
        http_status: e.http_status.map(u32::from).unwrap_or_default(),
        code: e.code.unwrap_or_default(),
        message: e.message,
        possible_duplicate: o.possible_duplicate,
        attempts: o.attempts,
    }
}

fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(super) fn delivery_pb(m: &StoredMessage) -> pb::Delivery {
    let o = m.outcome();
    let r = &m.record;
    let addr = &m.message.address;
    pb::Delivery {
        message_id: m.id.to_string(),
        state: state_pb(r.state) as i32,
        attempts: r.attempts,
        error: r.error.clone().map(|e| error_pb(e, &o)),
        receipts: receipts_pb(&r.receipts),
        possible_duplicate: r.possible_duplicate,
        channel_id: addr.channel_id.clone(),
        bot_id: addr.bot_id().to_string(),
        conversation_id: addr.conversation_id().unwrap_or_default().to_string(),
        accepted_at: Some(timestamp_ms(m.accepted_at_ms)),
        updated_at: Some(timestamp_ms(r.updated_at_ms)),
        warnings: warnings_pb(&m.warnings),
    }
}

/// A result rebuilt from the outbox (an idempotent retry after a restart).
fn stored_result_pb(m: &StoredMessage) -> pb::SendResult {
    let mut r = result_pb(m.id, &m.warnings, Some(m.outcome()));
    if !m.record.state.is_terminal() {
        r.state = state_pb(m.record.state) as i32;
        r.error = None;
    }
    r
}

fn parse_id(field: &str, s: &str) -> Result<u64, Status> {
    s.parse().map_err(|_| {
        status::invalid_field(
            field,
            format!("`{}` is not a message id", crate::bounded::cap(s, 32)),
        )
    })
}

/// The answer for a message the caller may not see, the same as for one that does not exist:
/// answering PERMISSION_DENIED for another bot's message let a caller count its traffic.
fn unknown_message(id: u64) -> Status {
    Status::not_found(format!(
        "message {id} is not in the outbox (unknown, not one of your bots', or delivered and compacted)"
    ))
}

/// Whether the caller of `req` may see `m` (it may act as the message's bot).
fn visible<T>(req: &Request<T>, m: &StoredMessage) -> bool {
    auth::authorize(req, m.message.address.bot_id()).is_ok()
}

/// One page of failed messages after `after`: at most `size` of them (of `bot`, when not empty)
/// and at most `max_bytes` encoded, but at least one; and the token of the next page (empty
/// when there is none).
async fn failed_page(
    store: &dyn crate::outbox::Store,
    mut after: u64,
    size: usize,
    bot: &str,
    max_bytes: usize,
) -> Result<(Vec<pb::Delivery>, String), crate::outbox::StoreError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut full = false;
    let mut exhausted = false;
    while !full && !exhausted {
        let page = store.failed(after, size).await?;
        exhausted = page.len() < size;
        for m in page {
            if bot.is_empty() || m.message.address.bot_id() == bot {
                let d = delivery_pb(&m);
                let len = prost::Message::encoded_len(&d);
                // The next page starts with this one.
                if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                    full = true;
                    break;
                }
                bytes = bytes.saturating_add(len);
                out.push(d);
            }
            after = m.id;
            if out.len() == size {
                full = true;
                break;
            }
        }
    }
    let token = if exhausted && !full {
        String::new()
    } else {
        after.to_string()
    };
    Ok((out, token))
}

/// Most ids one Redeliver takes (a page of ListFailed).
const MAX_REDELIVER_IDS: usize = 1000;

/// ListFailed's answer stays under gRPC's default 4 MiB message size, which clients enforce:
/// a page of 1,000 large messages would be refused by the very client that asked for it.
const MAX_LIST_BYTES: usize = 3 << 20;

fn result_pb(id: u64, warnings: &[model::Warning], outcome: Option<Outcome>) -> pb::SendResult {
    let mut r = pb::SendResult {
        message_id: id.to_string(),
        state: pb::DeliveryState::Accepted as i32,
        warnings: warnings_pb(warnings),
        ..Default::default()
    };
    if let Some(o) = outcome {
        r.state = state_pb(o.state) as i32;
        r.receipts = receipts_pb(&o.receipts);
        r.error = o.error.clone().map(|e| error_pb(e, &o));
    }
    r
}

fn wants_delivery(wait: i32) -> bool {
    wait == pb::WaitMode::Delivered as i32
}

fn capabilities_pb(c: Capabilities, configured: bool) -> pb::Capabilities {
    let streaming = crate::delivery::StreamMode::of(&c).word().to_string();
    pb::Capabilities {
        channel_id: c.channel_id,
        implementation: c.implementation,
        typing: c.typing,
        typing_interval: prost_types::Duration::try_from(c.typing_interval).ok(),
        carousel: c.carousel,
        max_buttons_per_card: c.max_buttons_per_card,
        max_suggested_actions: c.max_suggested_actions,
        max_text_length: c.max_text_length,
        markdown_flavor: c.markdown_flavor,
        update_delete: c.update_delete,
        proactive: c.proactive,
        max_payload_bytes: c.max_payload_bytes,
        configured,
        streaming,
        proactive_note: c.proactive_note,
    }
}

/// One accepted message's id and, when its caller waits for it, its outcome: the channel's
/// refusal as the call's error; a gateway that stopped first as UNAVAILABLE. `what` and `done`
/// name it in that error ("message", "delivered").
async fn one_outcome(
    submitted: Result<crate::delivery::Accepted, crate::delivery::SubmitError>,
    wait: i32,
    what: &str,
    done: &str,
) -> Result<(u64, Option<Outcome>), Status> {
    let accepted = submitted.map_err(status::submit)?;
    accepted.durable.await.map_err(status::outbox)?;
    let mut tickets = accepted.tickets;
    let ticket = tickets.pop().ok_or_else(|| Status::internal("no ticket"))?;
    let id = ticket.id;
    let out = outcome(ticket).await;
    if let Some(o) = &out
        && let Some(e) = &o.error
    {
        return Err(status::channel(e, o.attempts, o.possible_duplicate));
    }
    if wants_delivery(wait) && out.is_none() {
        return Err(Status::unavailable(format!(
            "{what} {id} was accepted but the gateway stopped before it was {done}"
        )));
    }
    Ok((id, out))
}

/// Awaits an outcome the dispatcher owes; a dropped sender means the gateway stopped first.
async fn outcome(t: Ticket) -> Option<Outcome> {
    match t.outcome {
        Some(rx) => rx.await.ok(),
        None => None,
    }
}

impl GatewayService {
    pub fn new(dispatcher: Dispatcher, config: ServerConfig) -> Self {
        Self {
            idempotency: Idempotency {
                window: config.idempotency_window,
                slots: Mutex::new(HashMap::new()),
            },
            watchers: super::watch::Watchers::new(dispatcher.clone(), config.max_watchers),
            dispatcher,
            config,
            inbox: None,
        }
    }

    /// Serves Receive from `inbox`.
    pub fn with_inbox(mut self, inbox: crate::inbound::Inbox, ack_deadline: Duration) -> Self {
        self.inbox = Some((inbox, ack_deadline));
        self
    }

    fn check_size(&self, v: &mut Violations, path: &dyn Display, m: &pb::Message) {
        let len = m.encoded_len();
        if len > self.config.max_message_bytes {
            v.add(
                path.to_string(),
                format!(
                    "message is {len} bytes; server.max_message_bytes is {}",
                    self.config.max_message_bytes
                ),
            );
        }
    }

    /// Validates one message for an existing conversation, checks its address can be served,
    /// and renders it.
    fn prepare(
        &self,
        path: &dyn Display,
        m: Option<pb::Message>,
        proactive: Option<&ProactiveOptions>,
        traceparent: Option<String>,
    ) -> Result<Submission, Status> {
        let mut v = Violations::default();
        let Some(m) = m else {
            return Err(status::invalid_field(path.to_string(), "required"));
        };
        self.check_size(&mut v, path, &m);
        let msg = convert::message(&mut v, path, m);
        if msg.address.conversation_id().is_none() && !msg.address.channel_id.is_empty() {
            v.add(
                format!("{path}.address.conversation.id"),
                "required: use SendProactive to start a conversation",
            );
        }
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let addr_path = convert::Field(&path, "address");
        let channels = self.dispatcher.channels();
        channels
            .check_address(&msg.address, &addr_path)
            .map_err(|e| status::route(e, &format!("{addr_path}.channel_id")))?;
        let mut rendered = channels.render_send(&msg, proactive).map_err(|e| {
            status::render(e, &path.to_string(), &format!("{addr_path}.channel_id"))
        })?;
        rendered.cap_warnings();
        Ok(Submission {
            message: msg,
            rendered,
            traceparent,
            op: None,
        })
    }

    async fn run_batch(
        &self,
        prepared: Vec<Submission>,
        flush: bool,
        wait: i32,
        idempotency: Option<&IdemKey>,
    ) -> Result<Vec<pb::SendResult>, Status> {
        let warnings: Vec<Vec<model::Warning>> = prepared
            .iter()
            .map(|s| s.rendered.warnings.clone())
            .collect();
        let accepted = self
            .dispatcher
            .submit(
                prepared,
                flush,
                wants_delivery(wait),
                idempotency.map(idem_store_key),
            )
            .await
            .map_err(status::submit)?;
        accepted.durable.await.map_err(status::outbox)?;
        let mut results = Vec::with_capacity(accepted.tickets.len());
        for (t, w) in accepted.tickets.into_iter().zip(warnings) {
            let id = t.id;
            results.push(result_pb(id, &w, outcome(t).await));
        }
        Ok(results)
    }

    /// Runs `f` once per idempotency key: a retry in this process gets the first answer; a
    /// retry after a restart gets the accepted messages' current state from the outbox.
    async fn idempotent<F, Fut>(
        &self,
        key: Option<IdemKey>,
        replay: impl FnOnce(Vec<StoredMessage>) -> Cached,
        f: F,
    ) -> Result<Cached, Status>
    where
        F: FnOnce(Option<IdemKey>) -> Fut,
        Fut: std::future::Future<Output = Result<Cached, Status>>,
    {
        let Some(key) = key else {
            return f(None).await;
        };
        let slot = self.idempotency.slot(&key);
        let store = self.dispatcher.store().clone();
        let window = self.config.idempotency_window;
        let map_key = key.clone();
        let result = slot
            .get_or_try_init(|| async move {
                let first = |store: Arc<dyn crate::outbox::Store>, key: IdemKey| async move {
                    let stored = store
                        .idempotency_get(&idem_store_key(&key))
                        .await
                        .map_err(status::outbox_read)?;
                    let Some(rec) = stored.filter(|rec| {
                        now_ms().saturating_sub(rec.created_at_ms) < window.as_millis() as u64
                    }) else {
                        return Ok(None);
                    };
                    let mut found = Vec::with_capacity(rec.message_ids.len());
                    for id in &rec.message_ids {
                        if let Some(m) = store.get(*id).await.map_err(status::outbox_read)? {
                            found.push(m);
                        }
                    }
                    Ok::<_, Status>(Some(found))
                };
                if let Some(found) = first(store.clone(), key.clone()).await? {
                    return Ok(replay(found));
                }
                match f(Some(key.clone())).await {
                    // Another replica accepted the same key in the same moment, and its
                    // commit came first: this call gets its answer.
                    Err(s) if status::is_key_taken(&s) => match first(store, key).await? {
                        Some(found) => Ok(replay(found)),
                        None => Err(s),
                    },
                    other => other,
                }
            })
            .await
            .cloned();
        // The slot only makes concurrent retries wait for the first call; once it is done the
        // outbox answers retries, so the slot goes (memory stays bounded by calls in flight).
        self.idempotency.release(&map_key, &slot);
        result
    }
}

/// The longest a typing indicator is kept alive (`SendTypingRequest.keep_alive`): a typing
/// indicator is for a reply being prepared, and a bot that needs longer sends another.
pub const MAX_TYPING_KEEP_ALIVE: Duration = Duration::from_secs(600);

/// The longest idempotency key, in bytes: a key names a call (a UUID is 36 bytes), and every
/// key is kept for `server.idempotency_window`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

fn idem_key(rpc: &'static str, bot: String, key: &str) -> Result<Option<IdemKey>, Status> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(status::invalid_field(
            "idempotency_key",
            format!("{} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES}", key.len()),
        ));
    }
    Ok((!key.is_empty()).then(|| (rpc, bot, key.to_string())))
}

/// The caller's W3C trace context, when well formed (`00-<32 hex>-<16 hex>-<2 hex>`).
fn traceparent<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000";
    ok.then(|| v.to_ascii_lowercase())
}

/// Bot ids are checked only when given: a missing one is reported by validation, by field.
#[allow(clippy::result_large_err)]
fn authorize_bot<T>(req: &Request<T>, bot: &str) -> Result<(), Status> {
    if bot.is_empty() {
        return Ok(());
    }
    auth::authorize(req, bot)
}

fn bot_of_address(a: Option<&pb::Address>) -> String {
    a.and_then(|a| a.bot.as_ref())
        .map(|b| b.id.clone())
        .unwrap_or_default()
}

fn bot_of(m: Option<&pb::Message>) -> String {
    m.and_then(|m| m.address.as_ref())
        .and_then(|a| a.bot.as_ref())
        .map(|b| b.id.clone())
        .unwrap_or_default()
}

/// What `send` takes from its request before it awaits anything.
struct SendStart {
    key: Option<IdemKey>,
    /// On the heap: the future and those nested in it would each hold its ~1 KB inline.
    message: Option<Box<pb::Message>>,
    wait: i32,
    traceparent: Option<String>,
}

impl SendStart {
    fn of(req: Request<pb::SendRequest>) -> Result<Self, Status> {
        authorize_bot(&req, &bot_of(req.get_ref().message.as_ref()))?;
        let traceparent = traceparent(&req);
        let pb::SendRequest {
            message,
            idempotency_key,
            wait,
        } = req.into_inner();
        Ok(Self {
            key: idem_key("send", bot_of(message.as_ref()), &idempotency_key)?,
            message: message.map(Box::new),
            wait,
            traceparent,
        })
    }
}

impl GatewayService {
    async fn send_started(&self, start: SendStart) -> Result<Response<pb::SendResponse>, Status> {
        let SendStart {
            key,
            message,
            wait,
            traceparent: tp,
        } = start;
        let replay = |found: Vec<StoredMessage>| {
            let r = found.first().map(stored_result_pb).unwrap_or_default();
            Cached::Send(Box::new(pb::SendResponse {
                message_id: r.message_id,
                state: r.state,
                receipts: r.receipts,
                warnings: r.warnings,
            }))
        };
        let cached = self
            .idempotent(key, replay, |key| async move {
                // Scoped so that neither the submission nor its message outlives the submit:
                // what is in scope at an await is kept in the future.
                // The submit future is awaited outside the scope for the same reason.
                let (warnings, submitted) = {
                    let prepared = self.prepare(&"message", message.map(|m| *m), None, tp)?;
                    let warnings = prepared.rendered.warnings.clone();
                    let submitted = self.dispatcher.submit(
                        vec![prepared],
                        false,
                        wants_delivery(wait),
                        key.as_ref().map(idem_store_key),
                    );
                    (warnings, submitted)
                };
                let (id, done) = one_outcome(submitted.await, wait, "message", "delivered").await?;
                let r = result_pb(id, &warnings, done);
                Ok(Cached::Send(Box::new(pb::SendResponse {
                    message_id: r.message_id,
                    state: r.state,
                    receipts: r.receipts,
                    warnings: r.warnings,
                })))
            })
            .await?;
        match cached {
            Cached::Send(r) => Ok(Response::new(*r)),
            _ => Err(Status::already_exists(
                "idempotency key was used by another call",
            )),
        }
    }
}

impl GatewayService {
    /// The sent message an UpdateMessage or DeleteMessage names, once it is one this call may
    /// change: the caller's, a message (not a change), on a channel that can. Whether there is
    /// still something to change is `changeable`'s, checked only for a first call: a retry
    /// with the idempotency key is answered from the first even once nothing is left.
    async fn change_target<T>(
        &self,
        req: &Request<T>,
        id: u64,
        verb: &str,
    ) -> Result<StoredMessage, Status> {
        let target = self
            .dispatcher
            .store()
            .get(id)
            .await
            .map_err(status::outbox_read)?
            .filter(|m| visible(req, m))
            .ok_or_else(|| unknown_message(id))?;
        // A streamed reply is a message; an update or a delete is not.
        if target
            .op
            .is_some_and(|o| o != crate::outbox::Operation::Stream)
        {
            return Err(status::invalid_field(
                "message_id",
                format!("{id} is an update or a delete; name the message it changed"),
            ));
        }
        let addr = &target.message.address;
        let (caps, _) = self
            .dispatcher
            .channels()
            .capabilities(&addr.channel_id)
            .map_err(|e| status::route(e, "message_id"))?;
        if !caps.update_delete {
            return Err(Status::unimplemented(format!(
                "message_id: the {} channel {:?} cannot {verb} a message it sent \
                 (GetCapabilities: update_delete is false)",
                caps.implementation,
                crate::bounded::cap(&addr.channel_id, 64)
            )));
        }
        Ok(target)
    }

    /// Whether `target` still has (or will have) something on the channel to change.
    fn changeable(target: &StoredMessage, verb: &str) -> Result<(), Status> {
        let id = target.id;
        if target.message.address.conversation_id().is_none() {
            return Err(Status::failed_precondition(format!(
                "message_id: message {id} is still starting its conversation (SendProactive); \
                 {verb} it once it is delivered"
            )));
        }
        if target.record.state.is_terminal() && target.record.receipts.is_empty() {
            return Err(Status::failed_precondition(format!(
                "message_id: message {id} ended {} with no native message on the channel: \
                 nothing to {verb}",
                target.record.state.word()
            )));
        }
        Ok(())
    }

    /// Accepts a change (its submission ready) like a Send: durable, in line, idempotent.
    async fn submit_change(
        &self,
        prepared: Submission,
        warnings: Vec<model::Warning>,
        wait: i32,
        key: Option<IdemKey>,
        target: &StoredMessage,
    ) -> Result<pb::SendResult, Status> {
        let replay = |found: Vec<StoredMessage>| {
            Cached::Change(Box::new(
                found.first().map(stored_result_pb).unwrap_or_default(),
            ))
        };
        let cached = self
            .idempotent(key, replay, |key| async move {
                let verb = prepared.op.map_or("change", |o| o.verb());
                Self::changeable(target, verb)?;
                let submitted = self.dispatcher.submit(
                    vec![prepared],
                    false,
                    wants_delivery(wait),
                    key.as_ref().map(idem_store_key),
                );
                let (id, done) =
                    one_outcome(submitted.await, wait, "change", "carried out").await?;
                Ok(Cached::Change(Box::new(result_pb(id, &warnings, done))))
            })
            .await?;
        match cached {
            Cached::Change(r) => Ok(*r),
            _ => Err(Status::already_exists(
                "idempotency key was used by another call",
            )),
        }
    }
}

#[tonic::async_trait]
impl ChannelGateway for GatewayService {
    async fn update_message(
        &self,
        req: Request<pb::UpdateMessageRequest>,
    ) -> Result<Response<pb::UpdateMessageResponse>, Status> {
        let tp = traceparent(&req);
        let id = parse_id("message_id", &req.get_ref().message_id)?;
        let target = self.change_target(&req, id, "update").await?;
        let sent_to = target.message.address.clone();
        let r = req.into_inner();
        let key = idem_key(
            "update_message",
            sent_to.bot_id().to_string(),
            &r.idempotency_key,
        )?;
        let Some(mut m) = r.message else {
            return Err(status::invalid_field("message", "required"));
        };
        // The sent message's address, unless the caller gave one (which must name the same
        // conversation): the render needs all of it (a service URL, a thread).
        let given = m.address.is_some();
        if !given {
            m.address = Some(Box::new(convert::address_pb(&sent_to)));
        }
        let mut prepared = self.prepare(&"message", Some(m), None, tp)?;
        if given && ConversationKey::of(&prepared.message.address) != ConversationKey::of(&sent_to)
        {
            return Err(status::invalid_field(
                "message.address",
                format!("names another conversation than message {id}, which it would update"),
            ));
        }
        prepared.message.address = sent_to;
        // A typing indicator or an event is not a message to show instead of one (and some
        // channels would replace the message with it).
        if prepared.message.kind != MessageType::Message {
            return Err(status::invalid_field(
                "message.type",
                "an update replaces a message with a message: to remove it, use DeleteMessage",
            ));
        }
        // Planned now against the receipts the message has now, to refuse what cannot be done
        // and say how it maps; planned again when its turn comes.
        let channels = self.dispatcher.channels();
        let warnings = if target.record.receipts.is_empty() {
            let mut w = prepared.rendered.warnings.clone();
            w.push(model::Warning::new(
                "update_pending",
                "message_id",
                format!(
                    "message {id} is not delivered yet: the update is mapped onto the native \
                     messages it becomes when the update's turn comes"
                ),
            ));
            w
        } else {
            channels
                .render_update(&prepared.message, &target.record.receipts)
                .map_err(|e| status::render(e, "message", "message.address.channel_id"))?
                .rendered
                .warnings
        };
        prepared.rendered.warnings = warnings.clone();
        prepared.op = Some(crate::outbox::Operation::Update { target: id });
        let r = self
            .submit_change(prepared, warnings, r.wait, key, &target)
            .await?;
        Ok(Response::new(pb::UpdateMessageResponse {
            change_id: r.message_id,
            state: r.state,
            receipts: r.receipts,
            warnings: r.warnings,
        }))
    }

    async fn stream_reply(
        &self,
        req: Request<tonic::Streaming<pb::StreamReplyRequest>>,
    ) -> Result<Response<pb::StreamReplyResponse>, Status> {
        let tp = traceparent(&req);
        let (meta, ext, mut frames) = req.into_parts();
        let who = Request::from_parts(meta, ext, ());
        // The start comes first, within the idle timeout like every frame after it.
        let idle = self.dispatcher.stream_idle_timeout();
        let first = tokio::time::timeout(idle, frames.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "start: no first frame within {idle:?} (delivery.stream_idle_timeout)"
                ))
            })??;
        let Some(pb::StreamReplyRequest {
            kind: Some(pb::stream_reply_request::Kind::Start(start)),
        }) = first
        else {
            return Err(status::invalid_field(
                "start",
                "the first frame of a StreamReply must be its start",
            ));
        };
        authorize_bot(&who, &bot_of(Some(&start)))?;
        // The start may have no text yet: it is checked as a message with some.
        let mut m = start;
        let empty = m.text.is_empty();
        if empty {
            m.text = "…".into();
        }
        let mut prepared = self.prepare(&"start", Some(m), None, tp)?;
        if empty {
            prepared.message.text = None;
        }
        let template_pb = convert::address_pb(&prepared.message.address);
        let warnings = prepared.rendered.warnings.clone();
        prepared.op = Some(crate::outbox::Operation::Stream);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (shown_tx, shown_warnings) = tokio::sync::oneshot::channel();
        let feed = crate::delivery::StreamFeed {
            events: rx,
            warnings: shown_tx,
        };
        let accepted = self
            .dispatcher
            .submit_stream(prepared, feed)
            .await
            .map_err(status::submit)?;
        accepted.durable.await.map_err(status::outbox)?;
        let Some(ticket) = accepted.tickets.into_iter().next() else {
            return Err(Status::internal("no ticket"));
        };
        let id = ticket.id;
        let Some(mut finished) = ticket.outcome else {
            return Err(Status::internal("no outcome for the stream"));
        };
        // Frames go to the conversation's worker as they come; a refused one ends the stream
        // (the worker finishes it with what arrived) and the caller is told why. The worker
        // may finish it first (nothing came for the idle timeout): then the caller hears so at
        // once, whatever it still sends.
        let max = self.config.max_message_bytes;
        let mut total = 0usize;
        let mut refusal = None;
        let mut early = None;
        loop {
            let frame = tokio::select! {
                f = frames.message() => f,
                done = &mut finished => {
                    early = Some(done.ok());
                    break;
                }
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                // Ended without a finish, or the connection went: finished with what arrived.
                Ok(None) | Err(_) => break,
            };
            use crate::delivery::StreamEvent;
            match frame.kind {
                // An empty chunk adds nothing, and does not keep a stream alive either: a
                // client sending only those would hold its conversation's line for good.
                Some(pb::stream_reply_request::Kind::Chunk(t)) if t.is_empty() => {}
                Some(pb::stream_reply_request::Kind::Chunk(t)) => {
                    total = total.saturating_add(t.len());
                    if total > max {
                        let _ = tx.send(StreamEvent::TooLong).await;
                        refusal = Some(status::invalid_field(
                            "chunk",
                            format!(
                                "the streamed text passed server.max_message_bytes ({max}); \
                                 the message shows the text before it"
                            ),
                        ));
                        break;
                    }
                    // Gone: the worker finished the stream (idle timeout).
                    if tx.send(StreamEvent::Text(t)).await.is_err() {
                        break;
                    }
                }
                Some(pb::stream_reply_request::Kind::Finish(mut f)) => {
                    let mut v = Violations::default();
                    f.address = Some(Box::new(template_pb));
                    let empty = f.text.is_empty()
                        && f.attachments.is_empty()
                        && f.suggested_actions.is_none();
                    let last = if empty {
                        model::Message::default()
                    } else {
                        convert::message(&mut v, &"finish", f)
                    };
                    if !v.is_empty() {
                        refusal = Some(status::invalid(v));
                        break;
                    }
                    let _ = tx.send(StreamEvent::Finish(Box::new(last))).await;
                    break;
                }
                Some(pb::stream_reply_request::Kind::Start(_)) | None => {
                    refusal = Some(status::invalid_field(
                        "start",
                        "a StreamReply has one start, first; then chunks, then a finish",
                    ));
                    break;
                }
            }
        }
        drop(tx);
        let done = match early {
            Some(done) => done,
            None => finished.await.ok(),
        };
        if let Some(s) = refusal {
            return Err(s);
        }
        let Some(o) = done else {
            return Err(Status::unavailable(format!(
                "reply {id} was accepted but the gateway stopped before it was finished"
            )));
        };
        let incomplete = o
            .error
            .as_ref()
            .and_then(|e| e.code.as_deref())
            .is_some_and(|c| c == "stream_incomplete");
        // The start's adaptations, then what the showings had to change (each code once).
        let mut warnings = warnings;
        for w in shown_warnings.await.unwrap_or_default() {
            if !warnings.iter().any(|x| x.code == w.code) {
                warnings.push(w);
            }
        }
        let r = result_pb(id, &warnings, Some(o));
        Ok(Response::new(pb::StreamReplyResponse {
            message_id: r.message_id,
            state: r.state,
            receipts: r.receipts,
            warnings: r.warnings,
            incomplete,
            error: r.error,
        }))
    }

    async fn delete_message(
        &self,
        req: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        let tp = traceparent(&req);
        let id = parse_id("message_id", &req.get_ref().message_id)?;
        let target = self.change_target(&req, id, "delete").await?;
        let sent_to = target.message.address.clone();
        let r = req.into_inner();
        let key = idem_key(
            "delete_message",
            sent_to.bot_id().to_string(),
            &r.idempotency_key,
        )?;
        let mut warnings = Vec::new();
        if target.record.receipts.is_empty() && !target.record.state.is_terminal() {
            warnings.push(model::Warning::new(
                "delete_pending",
                "message_id",
                format!(
                    "message {id} is not delivered yet: it is deleted once it is, when the \
                     delete's turn comes"
                ),
            ));
        } else {
            warnings = self
                .dispatcher
                .channels()
                .render_delete(&sent_to, &target.record.receipts)
                .map_err(|e| status::render(e, "message", "message_id"))?
                .rendered
                .warnings;
        }
        let prepared = Submission {
            message: model::Message {
                address: sent_to,
                ..Default::default()
            },
            rendered: crate::channels::Rendered {
                requests: Vec::new(),
                warnings: warnings.clone(),
            },
            traceparent: tp,
            op: Some(crate::outbox::Operation::Delete { target: id }),
        };
        let r = self
            .submit_change(prepared, warnings, r.wait, key, &target)
            .await?;
        Ok(Response::new(pb::DeleteMessageResponse {
            change_id: r.message_id,
            state: r.state,
            warnings: r.warnings,
        }))
    }

    /// Written out rather than `async fn`: an async method keeps its request (1.1 KB) in its
    /// future to the end, and every call copies the whole future into a box. The checks and
    /// the request's parts are taken here, synchronously; the future keeps only what it needs.
    fn send<'life0, 'async_trait>(
        &'life0 self,
        req: Request<pb::SendRequest>,
    ) -> Pin<
        Box<dyn Future<Output = Result<Response<pb::SendResponse>, Status>> + Send + 'async_trait>,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let start = SendStart::of(req);
        Box::pin(async move { self.send_started(start?).await })
    }

    async fn send_batch(
        &self,
        req: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        for m in &req.get_ref().messages {
            authorize_bot(&req, &bot_of(Some(m)))?;
        }
        let tp = traceparent(&req);
        let req = req.into_inner();
        let key = idem_key(
            "send_batch",
            bot_of(req.messages.first()),
            &req.idempotency_key,
        )?;
        let replay = |found: Vec<StoredMessage>| {
            Cached::Batch(pb::SendBatchResponse {
                results: found.iter().map(stored_result_pb).collect(),
            })
        };
        let cached = self
            .idempotent(key, replay, |key| async move {
                if req.messages.is_empty() {
                    return Err(status::invalid_field("messages", "at least one message is required"));
                }
                if req.messages.len() > self.config.max_batch_len {
                    return Err(status::invalid_field(
                        "messages",
                        format!(
                            "{} messages; server.max_batch_len is {}",
                            req.messages.len(),
                            self.config.max_batch_len
                        ),
                    ));
                }
                let mut prepared = Vec::with_capacity(req.messages.len());
                for (i, m) in req.messages.into_iter().enumerate() {
                    prepared.push(self.prepare(
                        &convert::Item("messages", i),
                        Some(m),
                        None,
                        tp.clone(),
                    )?);
                }
                let first = ConversationKey::of(&prepared[0].message.address);
                let mut v = Violations::default();
                for (i, p) in prepared.iter().enumerate().skip(1) {
                    if ConversationKey::of(&p.message.address) != first {
                        v.add(
                            format!("messages[{i}].address"),
                            "names another conversation than messages[0]; a batch is for one conversation",
                        );
                    }
                }
                if !v.is_empty() {
                    return Err(status::invalid(v));
                }
                let results = self
                    .run_batch(prepared, true, req.wait, key.as_ref())
                    .await?;
                Ok(Cached::Batch(pb::SendBatchResponse { results }))
            })
            .await?;
        match cached {
            Cached::Batch(r) => Ok(Response::new(r)),
            _ => Err(Status::already_exists(
                "idempotency key was used by another call",
            )),
        }
    }

    async fn send_typing(
        &self,
        req: Request<pb::SendTypingRequest>,
    ) -> Result<Response<pb::SendTypingResponse>, Status> {
        authorize_bot(&req, &bot_of_address(req.get_ref().address.as_ref()))?;
        let req = req.into_inner();
        let keep_alive = match req.keep_alive {
            Some(d) => match Duration::try_from(d) {
                Ok(d) if d <= MAX_TYPING_KEEP_ALIVE => Some(d),
                _ => {
                    return Err(status::invalid_field(
                        "keep_alive",
                        format!(
                            "must be a duration from 0 to {} s",
                            MAX_TYPING_KEEP_ALIVE.as_secs()
                        ),
                    ));
                }
            },
            None => None,
        };
        let mut v = Violations::default();
        let address = convert::address(&mut v, &"address", req.address);
        if address.conversation_id().is_none() && !address.channel_id.is_empty() {
            v.add("address.conversation.id", "required");
        }
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let channels = self.dispatcher.channels();
        channels
            .check_address(&address, &"address")
            .map_err(|e| status::route(e, "address.channel_id"))?;
        let msg = Message {
            kind: MessageType::Typing,
            address,
            ..Default::default()
        };
        debug_assert_eq!(msg.kind, MessageType::Typing);
        let rendered = channels
            .render_send(&msg, None)
            .map_err(|e| status::render(e, "", "address.channel_id"))?;
        // Renderers name fields under `message`; this request only has `address`.
        let mut warnings = warnings_pb(&rendered.warnings);
        for w in &mut warnings {
            w.field = match w.field.strip_prefix("message.") {
                Some(rest) if rest.starts_with("address") => rest.to_string(),
                _ => "address.channel_id".to_string(),
            };
        }
        self.dispatcher
            .submit_typing(
                Submission {
                    message: msg,
                    rendered,
                    traceparent: None,
                    op: None,
                },
                keep_alive,
            )
            .await
            .map_err(status::submit)?;
        Ok(Response::new(pb::SendTypingResponse { warnings }))
    }

    async fn send_proactive(
        &self,
        req: Request<pb::SendProactiveRequest>,
    ) -> Result<Response<pb::SendProactiveResponse>, Status> {
        authorize_bot(&req, &bot_of_address(req.get_ref().address.as_ref()))?;
        let tp = traceparent(&req);
        let req = req.into_inner();
        let bot = req
            .address
            .as_ref()
            .and_then(|a| a.bot.as_ref())
            .map(|b| b.id.clone())
            .unwrap_or_default();
        let key = idem_key("send_proactive", bot, &req.idempotency_key)?;
        let fallback = req.address.clone();
        let replay = move |found: Vec<StoredMessage>| {
            Cached::Proactive(Box::new(pb::SendProactiveResponse {
                address: found
                    .first()
                    .map(|m| convert::address_pb(&m.message.address))
                    .or(fallback),
                results: found.iter().map(stored_result_pb).collect(),
            }))
        };
        let cached = self
            .idempotent(key, replay, |key| self.proactive(req, key, tp))
            .await?;
        match cached {
            Cached::Proactive(r) => Ok(Response::new(*r)),
            _ => Err(Status::already_exists(
                "idempotency key was used by another call",
            )),
        }
    }

    async fn render(
        &self,
        req: Request<pb::RenderRequest>,
    ) -> Result<Response<pb::RenderResponse>, Status> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let Some(m) = req.message else {
            return Err(status::invalid_field("message", "required"));
        };
        self.check_size(&mut v, &"message", &m);
        // A delete has no new message: only where the sent one went matters.
        let msg = match &req.change {
            Some(c) if c.delete => model::Message {
                address: convert::address(&mut v, &"message.address", m.address.map(|a| *a)),
                ..Default::default()
            },
            _ => convert::message(&mut v, &"message", m),
        };
        let options = convert::proactive_options(&mut v, req.options);
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let channels = self.dispatcher.channels();
        let rendered = match req.change {
            Some(change) if change.stream => crate::delivery::stream_render(channels, &msg),
            Some(change) => {
                let n = change.native_messages as usize;
                if !(1..=crate::channels::update::MAX_STEPS).contains(&n) {
                    return Err(status::invalid_field(
                        "change.native_messages",
                        format!("1 to {}", crate::channels::update::MAX_STEPS),
                    ));
                }
                let Some(conversation) = msg.address.conversation_id() else {
                    return Err(status::invalid_field(
                        "message.address.conversation.id",
                        "required: a change is of a message sent to a conversation",
                    ));
                };
                let receipts = crate::channels::update::placeholders(n, conversation);
                if change.delete {
                    channels.render_delete(&msg.address, &receipts)
                } else {
                    channels.render_update(&msg, &receipts)
                }
                .map(|plan| plan.rendered)
            }
            None if msg.address.conversation_id().is_some() => channels.render_send(&msg, None),
            None => channels.render_proactive(std::slice::from_ref(&msg), &options),
        }
        .map_err(|e| status::render(e, "message", "message.address.channel_id"))?;
        Ok(Response::new(pb::RenderResponse {
            requests: rendered
                .requests
                .iter()
                .map(|r| pb::NativeRequest {
                    method: r.method.as_str().to_string(),
                    url: r.url.clone(),
                    body_json: r.body.to_string(),
                })
                .collect(),
            warnings: warnings_pb(&rendered.warnings),
        }))
    }

    async fn get_capabilities(
        &self,
        req: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        let id = req.into_inner().channel_id;
        if id.is_empty() {
            return Err(status::invalid_field("channel_id", "required"));
        }
        let (caps, configured) = self
            .dispatcher
            .channels()
            .capabilities(&id)
            .map_err(|e| status::route(e, "channel_id"))?;
        Ok(Response::new(pb::GetCapabilitiesResponse {
            capabilities: Some(capabilities_pb(caps, configured)),
        }))
    }

    async fn get_delivery(
        &self,
        req: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let id = parse_id("message_id", &req.get_ref().message_id)?;
        let m = self
            .dispatcher
            .store()
            .get(id)
            .await
            .map_err(status::outbox_read)?
            .filter(|m| visible(&req, m))
            .ok_or_else(|| unknown_message(id))?;
        Ok(Response::new(pb::GetDeliveryResponse {
            delivery: Some(delivery_pb(&m)),
        }))
    }

    type WatchDeliveriesStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<pb::WatchDeliveriesResponse, Status>> + Send>>;

    async fn watch_deliveries(
        &self,
        req: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        match req.get_ref().bot_id.as_str() {
            "" => auth::authorize_all(&req, "one of your bots")?,
            bot => auth::authorize(&req, bot)?,
        }
        let f = req.into_inner();
        let (rx, seat) = self.watchers.join()?;
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| {
            // Held by the stream: the seat is given back when the watcher goes.
            let _ = &seat;
            use super::watch::Watched;
            let lost = |n| {
                Some(Err(Status::data_loss(format!(
                    "watcher fell behind and missed {n} changes; use GetDelivery or ListFailed, then watch again"
                ))))
            };
            match ev {
                Ok(Watched::Change(c)) => {
                    let wanted = (f.bot_id.is_empty() || f.bot_id == c.bot_id)
                        && (f.channel_id.is_empty() || f.channel_id == c.channel_id)
                        && (f.conversation_id.is_empty() || f.conversation_id == c.conversation_id);
                    wanted.then(|| {
                        Ok(pb::WatchDeliveriesResponse {
                            delivery: Some(c.delivery.clone()),
                        })
                    })
                }
                // A watcher that fell behind is told, rather than silently missing changes.
                Ok(Watched::Missed(n)) => lost(n),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => lost(n),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_failed(
        &self,
        req: Request<pb::ListFailedRequest>,
    ) -> Result<Response<pb::ListFailedResponse>, Status> {
        match req.get_ref().bot_id.as_str() {
            "" => auth::authorize_all(&req, "one of your bots")?,
            bot => auth::authorize(&req, bot)?,
        }
        let req = req.into_inner();
        let size = match req.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let after = if req.page_token.is_empty() {
            0
        } else {
            parse_id("page_token", &req.page_token)?
        };
        let (deliveries, next_page_token) = failed_page(
            self.dispatcher.store().as_ref(),
            after,
            size,
            &req.bot_id,
            MAX_LIST_BYTES,
        )
        .await
        .map_err(status::outbox_read)?;
        Ok(Response::new(pb::ListFailedResponse {
            deliveries,
            next_page_token,
        }))
    }

    type ReceiveStream = super::receive::ReceiveStream;

    async fn receive(
        &self,
        req: Request<tonic::Streaming<pb::ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let deadline = self.inbox.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
        super::receive::receive(self.inbox.as_ref().map(|(i, _)| i), deadline, req).await
    }

    type FetchAttachmentStream = super::fetch::FetchAttachmentStream;

    async fn fetch_attachment(
        &self,
        req: Request<pb::FetchAttachmentRequest>,
    ) -> Result<Response<Self::FetchAttachmentStream>, Status> {
        super::fetch::fetch_attachment(self.dispatcher.channels(), req).await
    }

    async fn redeliver(
        &self,
        req: Request<pb::RedeliverRequest>,
    ) -> Result<Response<pb::RedeliverResponse>, Status> {
        let ids_s = req.get_ref().message_ids.clone();
        if ids_s.is_empty() {
            return Err(status::invalid_field(
                "message_ids",
                "at least one id is required",
            ));
        }
        if ids_s.len() > MAX_REDELIVER_IDS {
            return Err(status::invalid_field(
                "message_ids",
                format!("{} ids; at most {MAX_REDELIVER_IDS}", ids_s.len()),
            ));
        }
        let mut ids = Vec::with_capacity(ids_s.len());
        let mut seen = std::collections::HashSet::with_capacity(ids_s.len());
        let mut answer = Vec::with_capacity(ids_s.len());
        for (i, s) in ids_s.iter().enumerate() {
            let id = parse_id(&format!("message_ids[{i}]"), s)?;
            // The same id twice is redelivered once.
            if !seen.insert(id) {
                continue;
            }
            match self
                .dispatcher
                .store()
                .get(id)
                .await
                .map_err(status::outbox_read)?
            {
                Some(m) if visible(&req, &m) => {}
                _ => return Err(unknown_message(id)),
            }
            ids.push(id);
            answer.push(id.to_string());
        }
        self.dispatcher
            .redeliver(&ids)
            .await
            .map_err(status::submit)?;
        Ok(Response::new(pb::RedeliverResponse {
            message_ids: answer,
        }))
    }
}

impl GatewayService {
    async fn proactive(
        &self,
        req: pb::SendProactiveRequest,
        key: Option<IdemKey>,
        tp: Option<String>,
    ) -> Result<Cached, Status> {
        let mut v = Violations::default();
        let address = convert::address(&mut v, &"address", req.address.clone());
        if address.conversation_id().is_none() && address.user_id().is_empty() {
            v.add("address.user.id", "required to start a conversation");
        }
        if req.messages.len() > self.config.max_batch_len {
            v.add(
                "messages",
                format!(
                    "{} messages; server.max_batch_len is {}",
                    req.messages.len(),
                    self.config.max_batch_len
                ),
            );
        }
        for (i, m) in req.messages.iter().enumerate() {
            if m.address.is_some() {
                v.add(
                    format!("messages[{i}].address"),
                    "must be unset: the request's address applies",
                );
            }
        }
        let options = convert::proactive_options(&mut v, req.options);
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let channels = self.dispatcher.channels();
        channels
            .check_address(&address, &"address")
            .map_err(|e| status::route(e, "address.channel_id"))?;
        let has_conversation = address.conversation_id().is_some();
        // Until the channel names the conversation, render against the one it will be (when the
        // channel knows it without a call) or a stand-in, to validate and collect warnings; the
        // worker renders again with the real address.
        let mut stand_in = address.clone();
        if !has_conversation {
            let mut c = stand_in.conversation.take().unwrap_or_default();
            c.id = channels
                .known_conversation(&address)
                .unwrap_or_else(|| "{conversationId}".into());
            stand_in.conversation = Some(c);
        }
        let mut prepared = Vec::with_capacity(req.messages.len());
        for (i, mut m) in req.messages.into_iter().enumerate() {
            m.address = Some(Box::new(convert::address_pb(&stand_in)));
            let path = convert::Item("messages", i);
            prepared.push(self.prepare(&path, Some(m), Some(&options), tp.clone())?);
        }
        if has_conversation {
            let results = if prepared.is_empty() {
                Vec::new()
            } else {
                self.run_batch(prepared, true, req.wait, key.as_ref())
                    .await?
            };
            return Ok(Cached::Proactive(Box::new(pb::SendProactiveResponse {
                address: Some(convert::address_pb(&address)),
                results,
            })));
        }
        let warnings: Vec<Vec<model::Warning>> = prepared
            .iter()
            .map(|s| s.rendered.warnings.clone())
            .collect();
        let (accepted, created) = self
            .dispatcher
            .submit_proactive(
                address,
                options,
                prepared,
                wants_delivery(req.wait),
                key.as_ref().map(idem_store_key),
            )
            .await
            .map_err(status::submit)?;
        accepted.durable.await.map_err(status::outbox)?;
        let tickets = accepted.tickets;
        let new_address = match created.await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(status::channel(&e, 1, false)),
            Err(_) => {
                return Err(Status::unavailable(
                    "the gateway stopped before the conversation was created",
                ));
            }
        };
        let mut results = Vec::with_capacity(tickets.len());
        for (t, w) in tickets.into_iter().zip(warnings) {
            let id = t.id;
            results.push(result_pb(id, &w, outcome(t).await));
        }
        Ok(Cached::Proactive(Box::new(pb::SendProactiveResponse {
            address: Some(convert::address_pb(&new_address)),
            results,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    /// Every Send call's future is copied into a box: bounded so that a change that makes it
    /// hold the request again (it was 10 KB) fails here, not in a benchmark.
    #[tokio::test]
    async fn a_send_call_future_stays_small() {
        let config = Config::default();
        let channels = Arc::new(crate::channels::Channels::from_config(&config).unwrap());
        let store: Arc<dyn crate::outbox::Store> = Arc::new(crate::outbox::MemoryStore::new());
        let d = Dispatcher::new(
            channels,
            store,
            config.delivery.clone(),
            Arc::new(Metrics::new()),
        );
        let service = GatewayService::new(d, config.server.clone());
        let call = ChannelGateway::send(&service, Request::new(pb::SendRequest::default()));
        let size = std::mem::size_of_val(&*call);
        eprintln!("Send future: {size} bytes");
        assert!(size <= 2048, "Send future: {size} bytes");
    }

    /// Pages cut by size join up: every failed message once, in order, whatever the budget.
    #[tokio::test]
    async fn failed_pages_cut_by_size_list_every_message_once() {
        use crate::outbox::{Change, DeliveryState, Outcome, StateRecord, Store, StoredMessage};
        let store = crate::outbox::MemoryStore::new();
        let messages: Vec<StoredMessage> = (1..=30u64)
            .map(|id| {
                let mut message = crate::model::Message::default();
                message.address.bot = Some(crate::model::Identity {
                    id: if id % 3 == 0 { "other" } else { "bot" }.into(),
                    ..Default::default()
                });
                StoredMessage {
                    id,
                    conversation: "c".into(),
                    message: Arc::new(message),
                    proactive: None,
                    accepted_at_ms: 0,
                    record: StateRecord::new(DeliveryState::Accepted, 0),
                    op: None,
                    // Sizes that vary, so pages break at different places.
                    warnings: vec![
                        model::Warning::new(
                            "w",
                            "message",
                            "x".repeat(100 * (id as usize % 7))
                        );
                        3
                    ],
                }
            })
            .collect();
        store.append(messages, None).await.unwrap();
        for id in 1..=30u64 {
            let failed = Outcome {
                state: DeliveryState::Failed,
                receipts: Vec::new(),
                error: None,
                attempts: 1,
                possible_duplicate: false,
            };
            store.update(id, Change::Finished(failed)).await.unwrap();
        }
        for (bot, budget, size) in [
            ("", 1500, 1000),
            ("bot", 900, 4),
            ("", 1, 1000),
            ("", 1 << 20, 7),
        ] {
            let mut seen = Vec::new();
            let mut after = 0;
            for _ in 0..100 {
                let (page, token) = failed_page(&store, after, size, bot, budget).await.unwrap();
                assert!(
                    !page.is_empty() || token.is_empty(),
                    "an empty page that goes on"
                );
                let bytes: usize = page.iter().map(prost::Message::encoded_len).sum();
                assert!(
                    page.len() == 1 || bytes <= budget,
                    "{bytes} bytes over {budget}"
                );
                assert!(page.len() <= size);
                seen.extend(page.iter().map(|d| d.message_id.parse::<u64>().unwrap()));
                if token.is_empty() {
                    break;
                }
                after = token.parse().unwrap();
            }
            let want: Vec<u64> = (1..=30)
                .filter(|id| bot.is_empty() || (id % 3 != 0) == (bot == "bot"))
                .collect();
            assert_eq!(seen, want, "bot {bot:?}, budget {budget}, size {size}");
        }
    }
}
