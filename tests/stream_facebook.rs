//! StreamReply on Messenger end to end (mode `typing`: a page's message can be neither edited
//! nor unsent): the real gateway keeps a `typing_on` sender action alive while the streamed
//! text grows, then sends the final message with the whole text and the finish's quick
//! replies; a Send to the same person queued behind the stream goes after it. The fake Graph
//! API records every call.

#[path = "stream_frames/mod.rs"]
mod frames;
#[path = "facebook_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use frames::*;
use support::*;

use channel_gateway::api::pb;

/// How often the typing indicator is repeated in these tests (the shortest Messenger takes).
const TYPING_EVERY: Duration = Duration::from_secs(1);

async fn start_streaming(idle: Duration) -> Harness {
    start_with(|c| {
        c.channels.facebook.typing_interval = TYPING_EVERY;
        c.delivery.stream_update_interval = Duration::from_millis(100);
        c.delivery.stream_idle_timeout = idle;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_kept_alive_while_the_text_grows_then_the_whole_text_with_quick_replies() {
    let h = start_streaming(Duration::from_secs(10)).await;
    assert_eq!(streaming(&h.client, "facebook").await, "typing");
    let psid = "2400000000000101";
    let (tx, call) = open(&h.client, address(psid)).await;
    let mut want = String::new();
    let started = Instant::now();
    for i in 0..200 {
        let piece = format!("tok{i} ");
        want.push_str(&piece);
        tx.send(chunk(&piece)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
        if i == 50 {
            h.client
                .clone()
                .send(pb::SendRequest {
                    message: Some(text(psid, "after")),
                    wait: pb::WaitMode::Accepted as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let r = finish_whole(tx, call).await;
    let took = started.elapsed();
    h.fake
        .wait_for(Duration::from_secs(10), "the queued send", |rs| {
            rs.iter().any(|x| x.text() == "after")
        })
        .await;
    h.fake.assert_no_state_with_message();
    let calls = h.fake.delivered(psid);
    assert_eq!(calls.len(), h.fake.for_psid(psid).len(), "nothing refused");
    let labels: Vec<String> = calls.iter().map(Received::label).collect();
    // typing_on while the text grew, the final message, the queued send.
    let message = labels.iter().position(|l| l != "typing_on").unwrap();
    assert_eq!(calls.len(), message + 2, "{labels:?}");
    let typing: Vec<Instant> = calls[..message].iter().map(|c| c.at).collect();
    // ~4.5 s of chunks, typing repeated every second.
    assert!(typing.len() >= 3, "typing kept alive: {labels:?}");
    let gap = min_gap(&typing).unwrap();
    assert!(
        gap >= TYPING_EVERY - Duration::from_millis(100),
        "typing_on repeated {gap:?} apart; channels.facebook.typing_interval is {TYPING_EVERY:?}"
    );
    let last_typing_to_message = calls[message].at.duration_since(typing[typing.len() - 1]);
    assert!(
        last_typing_to_message <= TYPING_EVERY + Duration::from_millis(500),
        "the indicator lapsed {last_typing_to_message:?} before the message"
    );
    let final_message = &calls[message];
    assert_eq!(
        final_message.text(),
        want.trim_end(),
        "the whole text, once"
    );
    let quick = final_message
        .body
        .pointer("/message/quick_replies")
        .and_then(|q| q.as_array())
        .unwrap_or_else(|| panic!("no quick replies: {}", final_message.body));
    assert_eq!(quick.len(), 1, "{quick:?}");
    assert_eq!(quick[0]["title"], "Yes");
    assert_eq!(quick[0]["content_type"], "text");
    assert_eq!(calls[message + 1].text(), "after");
    assert_eq!(r.receipts.len(), 1);
    // The fake numbers its answers in order (one PSID, one call at a time): the final
    // message's id is its position's.
    assert_eq!(
        r.receipts[0].native_id,
        format!("m_fake{:06}", message + 1),
        "the receipt names the final message"
    );
    println!(
        "facebook: 200 chunks in {took:?}: {} typing_on (shortest gap {gap:?}), then the message \
         {:?} after the first chunk ({last_typing_to_message:?} after the last typing_on), the \
         queued send {:?} after it",
        typing.len(),
        final_message.at.duration_since(started),
        calls[message + 1].at.duration_since(final_message.at)
    );
}

/// A client that keeps its stream open but sends nothing more is finished after
/// `delivery.stream_idle_timeout` with what arrived, and the person's line moves on, also when
/// the channel shows a stream by typing: the typing indicator kept alive is the gateway's
/// doing, not the client's, and must not keep an idle stream open. (Found by this test: each
/// typing_on restarted the idle clock, so with typing repeated more often than the idle
/// timeout, as by default on Messenger (15 s, 30 s) and Bot Framework (3 s, 30 s), an idle
/// stream never ended and held the conversation's line while typing went on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_finished_after_the_idle_timeout_though_typing_is_kept_alive() {
    const IDLE: Duration = Duration::from_secs(3);
    let h = start_streaming(IDLE).await;
    let psid = "2400000000000102";
    let (tx, call) = open(&h.client, address(psid)).await;
    tx.send(chunk("thinking")).await.unwrap();
    let started = Instant::now();
    // Shown typing: the stream holds the line. A Send behind it waits for it to be finished.
    h.fake
        .wait_for(Duration::from_secs(5), "the first typing_on", |rs| {
            rs.iter()
                .any(|x| x.recipient() == psid && x.label() == "typing_on")
        })
        .await;
    let mut client = h.client.clone();
    let next = tokio::spawn(async move {
        client
            .send(pb::SendRequest {
                message: Some(text(psid, "next")),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            })
            .await
    });
    let bound = IDLE * 3;
    let r = tokio::time::timeout(bound, call).await;
    let typing = h
        .fake
        .delivered(psid)
        .iter()
        .filter(|c| c.label() == "typing_on")
        .count();
    let Ok(r) = r else {
        // Closed now: the stream ends as the client leaves, so the test does not hang.
        drop(tx);
        panic!(
            "an idle stream was not finished {bound:?} after its last chunk (stream_idle_timeout \
             {IDLE:?}); {typing} typing_on were sent meanwhile"
        );
    };
    let waited = started.elapsed();
    let r = r.unwrap().unwrap().into_inner();
    assert!(r.incomplete, "{r:?}");
    assert_eq!(
        r.error.as_ref().map(|e| e.code.as_str()),
        Some("stream_incomplete")
    );
    assert!(waited >= IDLE - Duration::from_millis(100), "{waited:?}");
    let next = next.await.unwrap().unwrap().into_inner();
    assert_eq!(next.state, pb::DeliveryState::Delivered as i32);
    let labels: Vec<String> = h.fake.delivered(psid).iter().map(Received::label).collect();
    assert_eq!(
        &labels[labels.len() - 2..],
        ["text:thinking", "text:next"],
        "{labels:?}"
    );
    drop(tx);
    println!(
        "facebook: idle stream finished {waited:?} after its last chunk (idle timeout {IDLE:?}), {typing} typing_on meanwhile"
    );
}
