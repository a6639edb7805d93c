//! The Receive stream: a bot's subscription to the inbox over gRPC.
//!
//! Owns the wire side only: the first message must be a subscription (checked against what the
//! caller may act as), then acks and nacks come in while events go out. The inbox decides order,
//! credits and redelivery; this file never holds an event past handing it to the stream.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Caller;
use super::convert;
use super::pb;
use super::status;
use crate::inbound::{Delivered, Inbox, ReceiveError, Subscription};

pub type ReceiveStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiveResponse, Status>> + Send>>;

/// How long a new stream may take to send its subscription.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(30);

/// Most event ids in one ack or nack.
const MAX_IDS: usize = 1000;

fn receive_error(e: ReceiveError) -> Status {
    match e {
        ReceiveError::Invalid { field, reason } => status::invalid_field(field, reason),
        e @ (ReceiveError::TooManyStreams(_) | ReceiveError::TooManyGroups(_)) => {
            Status::resource_exhausted(e.to_string())
        }
        ReceiveError::Storage(e) => Status::unavailable(crate::bounded::cap(&e, 300).into_owned()),
    }
}

/// The event for the wire; an error only for an event the inbox file holds damaged.
fn event_pb(d: Delivered) -> Result<pb::ReceiveResponse, serde_json::Error> {
    let message = d.message()?;
    Ok(pb::ReceiveResponse {
        kind: Some(pb::receive_response::Kind::Event(pb::ReceivedEvent {
            event_id: d.event_id.to_string(),
            attempt: d.attempt,
            redelivered: d.redelivered,
            message: Some(convert::message_pb(&message)),
            received_at: Some(timestamp_ms(d.received_at_ms)),
            reply_by: d.reply_by_ms.map(timestamp_ms),
        })),
    })
}

fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn responded(event_id: String, outcome: Result<(), String>) -> pb::ReceiveResponse {
    let (in_time, error) = match outcome {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e),
    };
    pb::ReceiveResponse {
        kind: Some(pb::receive_response::Kind::Responded(
            pb::ReceiveResponded {
                event_id,
                in_time,
                error,
            },
        )),
    }
}

/// The bot's answer in the model, or what is wrong with it.
fn reply(r: pb::ReceiveRespond) -> Result<crate::channels::channel::Reply, String> {
    let mut v = convert::Violations::default();
    let message = r
        .message
        .map(|m| convert::message(&mut v, &"respond.message", m));
    if let Some((field, why)) = v.kept().first() {
        return Err(crate::bounded::cap(&format!("{field}: {why}"), 500).into_owned());
    }
    let status = match r.status {
        0 => None,
        s => Some(u16::try_from(s).map_err(|_| "respond.status: an HTTP status".to_string())?),
    };
    Ok(crate::channels::channel::Reply {
        message,
        body: r.body.map(convert::value_to_json),
        status,
    })
}

fn ids(field: &str, list: &[String]) -> Result<Vec<u64>, Status> {
    if list.len() > MAX_IDS {
        return Err(status::invalid_field(
            field,
            format!("at most {MAX_IDS} ids in one message"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u64>().map_err(|_| {
                status::invalid_field(
                    format!("{field}[{i}]"),
                    format!(
                        "`{}` is not an event id from this stream",
                        crate::bounded::cap(s, 64)
                    ),
                )
            })
        })
        .collect()
}

/// Checks the subscription against the caller: named bots must be its own; none named means
/// all of its bots.
#[allow(clippy::result_large_err)]
fn allowed(caller: &Caller, sub: &pb::ReceiveSubscription) -> Result<Option<Vec<String>>, Status> {
    for (i, b) in sub.bot_ids.iter().enumerate() {
        if !caller.may_send_as(b) {
            return Err(Status::permission_denied(format!(
                "subscribe.bot_ids[{i}]: caller `{caller}` may not act as bot `{}`",
                crate::bounded::cap(b, 128)
            )));
        }
    }
    Ok(caller.bots().map(<[String]>::to_vec))
}

pub async fn receive(
    inbox: Option<&Inbox>,
    ack_deadline: Duration,
    req: Request<Streaming<pb::ReceiveRequest>>,
) -> Result<Response<ReceiveStream>, Status> {
    let inbox = inbox
        .cloned()
        .ok_or_else(|| Status::unavailable("receiving is off here (inbound.enabled = false)"))?;
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no caller identity"))?;
    let mut input = req.into_inner();
    let first = match tokio::time::timeout(SUBSCRIBE_WITHIN, input.message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => {
            return Err(status::invalid_field(
                "subscribe",
                "the stream ended before a subscription",
            ));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Status::deadline_exceeded(
                "no subscription within 30 s of opening the stream",
            ));
        }
    };
    let Some(pb::receive_request::Kind::Subscribe(sub)) = first.kind else {
        return Err(status::invalid_field(
            "subscribe",
            "the first message of a Receive stream must be a subscription",
        ));
    };
    let allowed = allowed(&caller, &sub)?;
    let group = if sub.group.is_empty() {
        crate::inbound::store::DEFAULT_GROUP.to_string()
    } else {
        sub.group.clone()
    };
    let mut receiver = inbox
        .subscribe(
            Subscription {
                group: sub.group,
                bot_ids: sub.bot_ids,
                channel_ids: sub.channel_ids,
                max_in_flight: sub.max_in_flight,
            },
            allowed,
        )
        .await
        .map_err(receive_error)?;
    let max_in_flight = receiver.max_in_flight();
    tracing::info!(caller = %caller, group = %group, max_in_flight, "Receive stream opened");
    // Credits bound what is out, so this channel never holds more than they allow.
    let (out, rx) = mpsc::channel::<Result<pb::ReceiveResponse, Status>>(max_in_flight + 4);
    let subscribed = pb::ReceiveResponse {
        kind: Some(pb::receive_response::Kind::Subscribed(
            pb::ReceiveSubscribed {
                group,
                max_in_flight: max_in_flight as u32,
                ack_deadline: prost_types::Duration::try_from(ack_deadline).ok(),
            },
        )),
    };
    if out.send(Ok(subscribed)).await.is_err() {
        return Err(Status::cancelled("the stream ended"));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                d = receiver.rx.recv() => {
                    let Some(d) = d else { break };
                    let id = d.event_id;
                    match event_pb(d) {
                        Ok(e) => {
                            if out.send(Ok(e)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            // No bot could ever read it: dropped (acked) rather than redelivered
                            // for ever.
                            tracing::error!(event_id = id, error = %e, "inbox event unreadable; dropped");
                            receiver.ack(id);
                        }
                    }
                }
                m = input.message() => {
                    let m = match m {
                        Ok(Some(m)) => m,
                        Ok(None) | Err(_) => break,
                    };
                    let settled = match m.kind {
                        Some(pb::receive_request::Kind::Ack(a)) => ids("ack.event_ids", &a.event_ids)
                            .map(|ids| ids.into_iter().for_each(|id| { receiver.ack(id); })),
                        Some(pb::receive_request::Kind::Nack(n)) => ids("nack.event_ids", &n.event_ids)
                            .map(|ids| ids.into_iter().for_each(|id| { receiver.nack(id); })),
                        Some(pb::receive_request::Kind::Respond(r)) => {
                            match ids("respond.event_id", std::slice::from_ref(&r.event_id)) {
                                Err(s) => Err(s),
                                Ok(id) => {
                                    let event_id = r.event_id.clone();
                                    let taken = reply(r).and_then(|reply| {
                                        receiver.respond(id[0], reply).map_err(String::from)
                                    });
                                    match taken {
                                        // Refused at once: said in line, so a bot sending many
                                        // such answers is slowed by its own stream.
                                        Err(e) => {
                                            if out.send(Ok(responded(event_id, Err(e)))).await.is_err() {
                                                break;
                                            }
                                        }
                                        // Taken: at most once per event out to this stream, so
                                        // these waits are bounded by its credits. Whether it was
                                        // written is known once the webhook call answers.
                                        Ok(used) => {
                                            let out = out.clone();
                                            tokio::spawn(async move {
                                                let outcome = match tokio::time::timeout(Duration::from_secs(10), used).await {
                                                    Ok(Ok(r)) => r,
                                                    _ => Err("late: the channel was given the neutral answer".into()),
                                                };
                                                let _ = out.send(Ok(responded(event_id, outcome))).await;
                                            });
                                        }
                                    }
                                    Ok(())
                                }
                            }
                        }
                        Some(pb::receive_request::Kind::Subscribe(_)) => Err(status::invalid_field(
                            "subscribe",
                            "a stream subscribes once; open another stream for another subscription",
                        )),
                        None => Err(status::invalid_field("kind", "empty message: set ack or nack")),
                    };
                    if let Err(s) = settled {
                        let _ = out.send(Err(s)).await;
                        break;
                    }
                }
                () = out.closed() => break,
            }
        }
        // Dropping the receiver gives back whatever it held, in order, flagged.
        drop(receiver);
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
