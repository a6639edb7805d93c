//! The `ChannelGateway` service: validate, render (to report problems before accepting),
//! hand to the dispatcher, and answer per the wait mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

use super::convert::{self, Violations};
use super::pb::{self, channel_gateway_server::ChannelGateway};
use super::status;
use crate::channels::{Capabilities, NativeReceipt, Rendered};
use crate::config::ServerConfig;
use crate::delivery::{ConversationKey, Dispatcher, Ticket};
use crate::model::{self, Message, MessageType, ProactiveOptions};
use crate::outbox::{DeliveryState, Outcome};

#[derive(Clone)]
enum Cached {
    Send(Box<pb::SendResponse>),
    Batch(pb::SendBatchResponse),
    Proactive(Box<pb::SendProactiveResponse>),
}

type Slot = Arc<OnceCell<Cached>>;
/// (rpc, bot id, idempotency key).
type IdemKey = (&'static str, String, String);

/// First results by (rpc, bot id, idempotency key). A concurrent retry waits for the first
/// call; a failed first call caches nothing, so a retry after it really retries.
struct Idempotency {
    window: Duration,
    slots: Mutex<HashMap<IdemKey, (Instant, Slot)>>,
}

impl Idempotency {
    fn slot(&self, rpc: &'static str, bot: &str, key: &str) -> Slot {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() > 1024 {
            map.retain(|_, (t, _)| now.duration_since(*t) < self.window);
        }
        let entry = map
            .entry((rpc, bot.to_string(), key.to_string()))
            .or_insert_with(|| (now, Arc::new(OnceCell::new())));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, Arc::new(OnceCell::new()));
        }
        entry.1.clone()
    }
}

pub struct GatewayService {
    dispatcher: Dispatcher,
    config: ServerConfig,
    idempotency: Idempotency,
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

fn state_pb(s: DeliveryState) -> pb::DeliveryState {
    match s {
        DeliveryState::Accepted => pb::DeliveryState::Accepted,
        DeliveryState::Delivering => pb::DeliveryState::Delivering,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Failed => pb::DeliveryState::Failed,
        DeliveryState::Expired => pb::DeliveryState::Expired,
    }
}

fn result_pb(id: String, warnings: &[model::Warning], outcome: Option<Outcome>) -> pb::SendResult {
    let mut r = pb::SendResult {
        message_id: id,
        state: pb::DeliveryState::Accepted as i32,
        warnings: warnings_pb(warnings),
        ..Default::default()
    };
    if let Some(o) = outcome {
        r.state = state_pb(o.state) as i32;
        r.receipts = receipts_pb(&o.receipts);
        r.error = o.error.map(|e| pb::ChannelError {
            channel: e.channel,
            http_status: e.http_status.map(u32::from).unwrap_or_default(),
            code: e.code.unwrap_or_default(),
            message: e.message,
            permanent: e.kind == crate::channels::FailureKind::Permanent,
            possible_duplicate: o.possible_duplicate,
            attempts: o.attempts,
        });
    }
    r
}

fn wants_delivery(wait: i32) -> bool {
    wait == pb::WaitMode::Delivered as i32
}

fn capabilities_pb(c: Capabilities, configured: bool) -> pb::Capabilities {
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
    }
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
            dispatcher,
            config,
        }
    }

    fn check_size(&self, v: &mut Violations, path: &str, m: &pb::Message) {
        let len = m.encoded_len();
        if len > self.config.max_message_bytes {
            v.add(
                path,
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
        path: &str,
        m: Option<pb::Message>,
        proactive: Option<&ProactiveOptions>,
    ) -> Result<(Message, Rendered), Status> {
        let mut v = Violations::default();
        let Some(m) = m else {
            return Err(status::invalid_field(path, "required"));
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
        let addr_path = format!("{path}.address");
        let channels = self.dispatcher.channels();
        channels
            .check_address(&msg.address, &addr_path)
            .map_err(|e| status::route(e, &format!("{addr_path}.channel_id")))?;
        let rendered = channels
            .render_send(&msg, proactive)
            .map_err(|e| status::render(e, path, &format!("{addr_path}.channel_id")))?;
        Ok((msg, rendered))
    }

    async fn run_batch(
        &self,
        prepared: Vec<(Message, Rendered)>,
        flush: bool,
        wait: i32,
    ) -> Result<Vec<pb::SendResult>, Status> {
        let warnings: Vec<Vec<model::Warning>> =
            prepared.iter().map(|(_, r)| r.warnings.clone()).collect();
        let tickets = self
            .dispatcher
            .submit(prepared, flush, wants_delivery(wait))
            .map_err(status::submit)?;
        let mut results = Vec::with_capacity(tickets.len());
        for (t, w) in tickets.into_iter().zip(warnings) {
            let id = t.id.clone();
            results.push(result_pb(id, &w, outcome(t).await));
        }
        Ok(results)
    }

    async fn idempotent<F, Fut>(
        &self,
        rpc: &'static str,
        bot: &str,
        key: &str,
        f: F,
    ) -> Result<Cached, Status>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Cached, Status>>,
    {
        if key.is_empty() {
            return f().await;
        }
        let slot = self.idempotency.slot(rpc, bot, key);
        slot.get_or_try_init(f).await.cloned()
    }
}

fn bot_of(m: Option<&pb::Message>) -> String {
    m.and_then(|m| m.address.as_ref())
        .and_then(|a| a.bot.as_ref())
        .map(|b| b.id.clone())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl ChannelGateway for GatewayService {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let req = req.into_inner();
        let bot = bot_of(req.message.as_ref());
        let key = req.idempotency_key.clone();
        let cached = self
            .idempotent("send", &bot, &key, || async move {
                let prepared = self.prepare("message", req.message, None)?;
                let warnings = prepared.1.warnings.clone();
                let mut tickets = self
                    .dispatcher
                    .submit(vec![prepared], false, wants_delivery(req.wait))
                    .map_err(status::submit)?;
                let ticket = tickets.pop().ok_or_else(|| Status::internal("no ticket"))?;
                let id = ticket.id.clone();
                let done = outcome(ticket).await;
                if let Some(o) = &done
                    && let Some(e) = &o.error
                {
                    return Err(status::channel(e, o.attempts, o.possible_duplicate));
                }
                if wants_delivery(req.wait) && done.is_none() {
                    return Err(Status::unavailable(format!(
                        "message {id} was accepted but the gateway stopped before it was delivered"
                    )));
                }
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

    async fn send_batch(
        &self,
        req: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let req = req.into_inner();
        let bot = bot_of(req.messages.first());
        let key = req.idempotency_key.clone();
        let cached = self
            .idempotent("send_batch", &bot, &key, || async move {
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
                    prepared.push(self.prepare(&format!("messages[{i}]"), Some(m), None)?);
                }
                let first = ConversationKey::of(&prepared[0].0.address);
                let mut v = Violations::default();
                for (i, (m, _)) in prepared.iter().enumerate().skip(1) {
                    if ConversationKey::of(&m.address) != first {
                        v.add(
                            format!("messages[{i}].address"),
                            "names another conversation than messages[0]; a batch is for one conversation",
                        );
                    }
                }
                if !v.is_empty() {
                    return Err(status::invalid(v));
                }
                let results = self.run_batch(prepared, true, req.wait).await?;
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
        let req = req.into_inner();
        let keep_alive = match req.keep_alive {
            Some(d) => Some(Duration::try_from(d).map_err(|_| {
                status::invalid_field("keep_alive", "must be a non-negative duration")
            })?),
            None => None,
        };
        let mut v = Violations::default();
        let address = convert::address(&mut v, "address", req.address);
        if address.conversation_id().is_none() && !address.channel_id.is_empty() {
            v.add("address.conversation.id", "required");
        }
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let channels = self.dispatcher.channels();
        channels
            .check_address(&address, "address")
            .map_err(|e| status::route(e, "address.channel_id"))?;
        let msg = Message {
            kind: MessageType::Typing,
            address,
            ..Default::default()
        };
        let rendered = channels
            .render_send(&msg, None)
            .map_err(|e| status::render(e, "", "address.channel_id"))?;
        let warnings = warnings_pb(&rendered.warnings);
        self.dispatcher
            .submit_typing(msg, rendered, keep_alive)
            .map_err(status::submit)?;
        Ok(Response::new(pb::SendTypingResponse { warnings }))
    }

    async fn send_proactive(
        &self,
        req: Request<pb::SendProactiveRequest>,
    ) -> Result<Response<pb::SendProactiveResponse>, Status> {
        let req = req.into_inner();
        let bot = req
            .address
            .as_ref()
            .and_then(|a| a.bot.as_ref())
            .map(|b| b.id.clone())
            .unwrap_or_default();
        let key = req.idempotency_key.clone();
        let cached = self
            .idempotent("send_proactive", &bot, &key, || self.proactive(req))
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
        self.check_size(&mut v, "message", &m);
        let msg = convert::message(&mut v, "message", m);
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let options = convert::proactive_options(req.options);
        let channels = self.dispatcher.channels();
        let rendered = if msg.address.conversation_id().is_some() {
            channels.render_send(&msg, None)
        } else {
            channels.render_proactive(std::slice::from_ref(&msg), &options)
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
}

impl GatewayService {
    async fn proactive(&self, req: pb::SendProactiveRequest) -> Result<Cached, Status> {
        let mut v = Violations::default();
        let address = convert::address(&mut v, "address", req.address.clone());
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
        if !v.is_empty() {
            return Err(status::invalid(v));
        }
        let channels = self.dispatcher.channels();
        channels
            .check_address(&address, "address")
            .map_err(|e| status::route(e, "address.channel_id"))?;
        let options = convert::proactive_options(req.options);
        let has_conversation = address.conversation_id().is_some();
        // Until the channel names the conversation, render against a stand-in to validate and
        // collect warnings; the worker renders again with the real address.
        let mut stand_in = address.clone();
        if !has_conversation {
            let mut c = stand_in.conversation.take().unwrap_or_default();
            c.id = "{conversationId}".into();
            stand_in.conversation = Some(c);
        }
        let mut prepared = Vec::with_capacity(req.messages.len());
        for (i, mut m) in req.messages.into_iter().enumerate() {
            m.address = Some(convert::address_pb(&stand_in));
            let path = format!("messages[{i}]");
            prepared.push(self.prepare(&path, Some(m), Some(&options))?);
        }
        if has_conversation {
            let results = if prepared.is_empty() {
                Vec::new()
            } else {
                self.run_batch(prepared, true, req.wait).await?
            };
            return Ok(Cached::Proactive(Box::new(pb::SendProactiveResponse {
                address: Some(convert::address_pb(&address)),
                results,
            })));
        }
        let warnings: Vec<Vec<model::Warning>> =
            prepared.iter().map(|(_, r)| r.warnings.clone()).collect();
        let (tickets, created) = self
            .dispatcher
            .submit_proactive(address, options, prepared, wants_delivery(req.wait))
            .map_err(status::submit)?;
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
            let id = t.id.clone();
            results.push(result_pb(id, &w, outcome(t).await));
        }
        Ok(Cached::Proactive(Box::new(pb::SendProactiveResponse {
            address: Some(convert::address_pb(&new_address)),
            results,
        })))
    }
}
