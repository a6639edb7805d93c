//! What the StreamReply tests of every channel share: the frames a client sends, a stream
//! opened in the background, and the figures taken from a fake's timestamps (the most calls in
//! any window, the shortest gap between two). Nothing here knows a channel.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

pub type Client = ChannelGatewayClient<tonic::transport::Channel>;
pub type Call = JoinHandle<Result<tonic::Response<pb::StreamReplyResponse>, tonic::Status>>;

pub fn start_frame(address: pb::Address) -> pb::StreamReplyRequest {
    pb::StreamReplyRequest {
        kind: Some(pb::stream_reply_request::Kind::Start(pb::Message {
            address: Some(Box::new(address)),
            ..Default::default()
        })),
    }
}

pub fn chunk(t: &str) -> pb::StreamReplyRequest {
    pb::StreamReplyRequest {
        kind: Some(pb::stream_reply_request::Kind::Chunk(t.into())),
    }
}

pub fn finish(m: pb::Message) -> pb::StreamReplyRequest {
    pb::StreamReplyRequest {
        kind: Some(pb::stream_reply_request::Kind::Finish(m)),
    }
}

/// A finish whose final message carries one quick reply / button, "Yes".
pub fn finish_with_yes() -> pb::StreamReplyRequest {
    finish(pb::Message {
        suggested_actions: Some(pb::SuggestedActions {
            actions: vec![pb::CardAction {
                r#type: pb::ActionType::ImBack as i32,
                title: "Yes".into(),
                value: "yes".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A StreamReply opened in the background with its start sent: frames go to the sender, the
/// call's answer comes from the handle once the stream ends.
pub async fn open(
    client: &Client,
    address: pb::Address,
) -> (mpsc::Sender<pb::StreamReplyRequest>, Call) {
    let (tx, rx) = mpsc::channel(256);
    tx.send(start_frame(address)).await.unwrap();
    let mut client = client.clone();
    let call = tokio::spawn(async move { client.stream_reply(ReceiverStream::new(rx)).await });
    (tx, call)
}

/// Sends `chunks`, closes the stream without its finish and returns the answer, checked to be a
/// cut-short stream's: delivered with the partial text, flagged `stream_incomplete`.
pub async fn cut_short(
    tx: mpsc::Sender<pb::StreamReplyRequest>,
    call: Call,
    chunks: &[&str],
) -> pb::StreamReplyResponse {
    for t in chunks {
        tx.send(chunk(t)).await.unwrap();
    }
    // Closed without its finish: the caller still hears how it ended.
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    assert_cut_short(&r);
    r
}

/// The answer of a stream that ended without its finish.
pub fn assert_cut_short(r: &pb::StreamReplyResponse) {
    assert!(r.incomplete, "{r:?}");
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(
        r.error.as_ref().map(|e| e.code.as_str()),
        Some("stream_incomplete")
    );
}

/// Finishes the stream with [`finish_with_yes`] and returns the answer, checked to be a whole
/// stream's: delivered, not incomplete, no error.
pub async fn finish_whole(
    tx: mpsc::Sender<pb::StreamReplyRequest>,
    call: Call,
) -> pb::StreamReplyResponse {
    tx.send(finish_with_yes()).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(!r.incomplete && r.error.is_none(), "{r:?}");
    r
}

/// GetCapabilities' `streaming` for a channel.
pub async fn streaming(client: &Client, channel_id: &str) -> String {
    client
        .clone()
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: channel_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap()
        .streaming
}

/// The most of `times` (in order) that fall in any window shorter than `window`.
pub fn most_in(times: &[Instant], window: Duration) -> usize {
    let mut worst = 0;
    for (i, t) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < window)
            .count();
        worst = worst.max(n);
    }
    worst
}

/// The shortest gap between two consecutive `times` (in order).
pub fn min_gap(times: &[Instant]) -> Option<Duration> {
    times.windows(2).map(|w| w[1].duration_since(w[0])).min()
}

/// The stream's id when it is accepted right after the Send that answered `sent` (ids count
/// up by one per accepted message).
pub fn next_id(sent: &str) -> String {
    (sent.parse::<u64>().unwrap() + 1).to_string()
}

/// GetDelivery of `id` once it is finished (delivered or failed), polled for up to `within`.
pub async fn finished_delivery(client: &Client, id: &str, within: Duration) -> pb::Delivery {
    let deadline = Instant::now() + within;
    loop {
        let d = client
            .clone()
            .get_delivery(pb::GetDeliveryRequest {
                message_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .delivery
            .unwrap();
        if d.state == pb::DeliveryState::Delivered as i32
            || d.state == pb::DeliveryState::Failed as i32
        {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not finished within {within:?}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
