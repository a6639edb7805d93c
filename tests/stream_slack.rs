//! StreamReply on Slack end to end: a real gRPC client streams a reply chunk by chunk to the real
//! gateway, which posts it, then updates it as the text grows (within the channel's rate scope),
//! while other Sends to the conversation wait behind it; the fake Slack keeps what each channel
//! shows.

#[path = "stream_frames/mod.rs"]
mod frames;
#[path = "slack_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use frames::{assert_cut_short, chunk, finish};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use channel_gateway::api::pb;

/// A gateway on the fake whose Slack channel scope allows `rate` calls a second with bursts of
/// `burst`, showing a stream's text every `every`.
async fn start_paced(rate: f64, burst: u32, every: Duration, idle: Duration) -> Harness {
    let fake = FakeSlack::start().await;
    let mut c = config_for(&fake);
    c.channels.slack.rate_per_second = rate;
    c.channels.slack.rate_burst = burst;
    c.delivery.stream_update_interval = every;
    c.delivery.stream_idle_timeout = idle;
    let (gateway, client) = support::fake_http::start_gateway(c).await;
    Harness {
        fake,
        gateway,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_chunks_grow_one_message_within_the_rate_and_queued_sends_come_after() {
    const RATE: f64 = 4.0;
    const BURST: u32 = 2;
    let h = start_paced(
        RATE,
        BURST,
        Duration::from_millis(100),
        Duration::from_secs(10),
    )
    .await;
    let (tx, rx) = mpsc::channel(256);
    tx.send(frames::start_frame(h.address("C0STREAM")))
        .await
        .unwrap();
    let mut client = h.client.clone();
    let call = tokio::spawn(async move { client.stream_reply(ReceiverStream::new(rx)).await });
    let mut want = String::new();
    let started = Instant::now();
    let mut queued = Vec::new();
    for i in 0..200 {
        let piece = format!("tok{i} ");
        want.push_str(&piece);
        tx.send(chunk(&piece)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i == 50 || i == 150 {
            // Other messages of the conversation, accepted while the reply streams.
            let r = h
                .send(
                    h.text("C0STREAM", &format!("after {i}")),
                    pb::WaitMode::Accepted,
                )
                .await
                .unwrap();
            queued.push(r.message_id);
        }
    }
    tx.send(finish(pb::Message::default())).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    let took = started.elapsed();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(!r.incomplete);
    // Then the queued Sends, after the final update.
    h.fake
        .wait_for(Duration::from_secs(10), "the queued sends", |rs| {
            rs.iter()
                .filter(|x| x.is_post() && x.text().starts_with("after"))
                .count()
                == 2
        })
        .await;
    let calls: Vec<Received> = h
        .fake
        .received()
        .into_iter()
        .filter(|x| x.channel() == "C0STREAM")
        .collect();
    let first_after = calls
        .iter()
        .position(|x| x.text().starts_with("after"))
        .unwrap();
    let last_update = calls
        .iter()
        .rposition(|x| x.path.ends_with("chat.update"))
        .unwrap();
    assert!(
        last_update < first_after,
        "the queued sends came after the final message"
    );
    // The reply is one message showing the whole text.
    let shown = h.fake.shown("C0STREAM");
    assert_eq!(shown[0].1, want.trim_end_matches(' '), "the final text");
    assert_eq!(shown.len(), 3, "the reply, then the two queued sends");
    assert_eq!(r.receipts.len(), 1);
    assert_eq!(r.receipts[0].native_id, shown[0].0);
    // Shown as it grew, and never faster than the scope allows: in any second at most
    // rate + burst calls for this channel.
    let stream_calls: Vec<Instant> = calls[..=last_update].iter().map(|x| x.at).collect();
    let updates = stream_calls.len() - 1;
    assert!(
        updates >= 3,
        "the text was shown growing: {updates} updates"
    );
    let mut worst = 0;
    for (i, t) in stream_calls.iter().enumerate() {
        let n = stream_calls[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        worst = worst.max(n);
    }
    assert!(
        worst as f64 <= RATE + f64::from(BURST),
        "{worst} calls in one second; the scope allows {RATE}/s with bursts of {BURST}"
    );
    let texts: Vec<usize> = calls[..=last_update]
        .iter()
        .map(|x| x.text().len())
        .collect();
    assert!(
        texts.windows(2).all(|w| w[0] <= w[1]),
        "the shown text only grows: {texts:?}"
    );
    println!(
        "200 chunks in {took:?}: 1 post + {} updates, at most {worst} calls in a second (scope {RATE}/s, burst {BURST}); first text shown {:?} after the first chunk",
        updates,
        calls[0].at.duration_since(started)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_client_leaves_is_finished_with_the_partial_text_flagged() {
    let h = start_paced(
        1000.0,
        1000,
        Duration::from_millis(100),
        Duration::from_secs(10),
    )
    .await;
    // Closed without its finish: the caller still hears how it ended.
    let (tx, rx) = mpsc::channel(16);
    tx.send(frames::start_frame(h.address("C0CUT")))
        .await
        .unwrap();
    for t in ["the ", "first ", "half"] {
        tx.send(chunk(t)).await.unwrap();
    }
    drop(tx);
    let r = h
        .client
        .clone()
        .stream_reply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_cut_short(&r);
    assert_eq!(h.fake.shown("C0CUT")[0].1, "the first half");

    // Gone altogether (the call dropped): GetDelivery says what happened to it.
    let sent = h
        .send(h.text("C0GONE", "before"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let stream_id = (sent.message_id.parse::<u64>().unwrap() + 1).to_string();
    let (tx, rx) = mpsc::channel(16);
    tx.send(frames::start_frame(h.address("C0GONE")))
        .await
        .unwrap();
    tx.send(chunk("cut short")).await.unwrap();
    let mut client = h.client.clone();
    let call = tokio::spawn(async move { client.stream_reply(ReceiverStream::new(rx)).await });
    h.fake
        .wait_for(Duration::from_secs(5), "the first showing", |rs| {
            rs.iter().any(|x| x.text() == "cut short")
        })
        .await;
    call.abort();
    drop(tx);
    let mut d = None;
    for _ in 0..100 {
        let got = h
            .client
            .clone()
            .get_delivery(pb::GetDeliveryRequest {
                message_id: stream_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .delivery
            .unwrap();
        if got.state == pb::DeliveryState::Delivered as i32 {
            d = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = d.expect("the stream was finished");
    assert_eq!(
        d.error.as_ref().map(|e| e.code.as_str()),
        Some("stream_incomplete"),
        "{d:?}"
    );
    assert_eq!(h.fake.shown("C0GONE")[1].1, "cut short");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_finished_after_the_idle_timeout_and_its_line_moves_on() {
    let h = start_paced(
        1000.0,
        1000,
        Duration::from_millis(100),
        Duration::from_secs(1),
    )
    .await;
    let started = Instant::now();
    let (tx, call) = frames::open(&h.client, h.address("C0IDLE")).await;
    tx.send(chunk("thinking")).await.unwrap();
    // Shown: the stream holds the line. A Send behind it waits for it to be finished.
    h.fake
        .wait_for(Duration::from_secs(5), "the first showing", |rs| {
            rs.iter().any(|x| x.text() == "thinking")
        })
        .await;
    let after = h
        .send(h.text("C0IDLE", "next"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "the send waited for the idle stream: {waited:?}"
    );
    assert_eq!(after.state, pb::DeliveryState::Delivered as i32);
    let r = call.await.unwrap().unwrap().into_inner();
    assert!(r.incomplete);
    drop(tx);
    let shown = h.fake.shown("C0IDLE");
    assert_eq!(
        shown.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        ["thinking", "next"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finish_puts_its_buttons_on_the_final_message_and_a_bad_first_frame_is_refused() {
    let h = start().await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(frames::start_frame(h.address("C0FIN")))
        .await
        .unwrap();
    tx.send(chunk("Pick one")).await.unwrap();
    tx.send(frames::finish_with_yes()).await.unwrap();
    drop(tx);
    let r = h
        .client
        .clone()
        .stream_reply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.incomplete, "{r:?}");
    let last = h.fake.received().into_iter().last().unwrap();
    assert!(
        last.body.to_string().contains("\"Yes\""),
        "the buttons are on the final message: {}",
        last.body
    );

    let (tx, rx) = mpsc::channel(4);
    tx.send(chunk("no start")).await.unwrap();
    drop(tx);
    let e = h
        .client
        .clone()
        .stream_reply(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("start"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_shows_a_streams_requests_and_capabilities_say_how_it_streams() {
    let h = start().await;
    let caps = h
        .client
        .clone()
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "slack".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert_eq!(caps.streaming, "edits");
    let r = h
        .client
        .clone()
        .render(pb::RenderRequest {
            message: Some(h.text("C0RENDER", "the whole answer")),
            options: None,
            change: Some(pb::RenderChange {
                native_messages: 0,
                delete: false,
                stream: true,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let seq = method_and_field(&r, "text");
    assert_eq!(
        seq,
        [
            ("chat.postMessage".to_string(), "{text so far}".to_string()),
            ("chat.update".to_string(), "{text so far}".to_string()),
            ("chat.update".to_string(), "the whole answer".to_string()),
        ]
    );
    assert!(h.fake.received().is_empty(), "render sends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply_can_be_updated_and_deleted_like_a_sent_message() {
    let h = start().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(frames::start_frame(h.address("C0LATER")))
        .await
        .unwrap();
    tx.send(chunk("draft answer")).await.unwrap();
    tx.send(finish(pb::Message::default())).await.unwrap();
    drop(tx);
    let r = h
        .client
        .clone()
        .stream_reply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let u = h
        .client
        .clone()
        .update_message(pb::UpdateMessageRequest {
            message_id: r.message_id.clone(),
            message: Some(pb::Message {
                text: "final answer".into(),
                ..Default::default()
            }),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(h.fake.shown("C0LATER")[0].1, "final answer");
    h.client
        .clone()
        .delete_message(pb::DeleteMessageRequest {
            message_id: r.message_id,
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(h.fake.shown("C0LATER").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_chunks_do_not_keep_a_stream_alive() {
    let h = start_paced(
        1000.0,
        1000,
        Duration::from_millis(100),
        Duration::from_secs(1),
    )
    .await;
    let started = Instant::now();
    let (tx, call) = frames::open(&h.client, h.address("C0EMPTY")).await;
    tx.send(chunk("thinking")).await.unwrap();
    // Empty chunks for three times the idle timeout: the stream still ends after one.
    let keepalive = tokio::spawn(async move {
        for _ in 0..15 {
            if tx.send(chunk("")).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let r = call.await.unwrap().unwrap().into_inner();
    let took = started.elapsed();
    assert!(r.incomplete, "{r:?}");
    assert!(
        took < Duration::from_millis(2500),
        "finished by the idle timeout, not by the empty chunks' end: {took:?}"
    );
    keepalive.abort();
}
