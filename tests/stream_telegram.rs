//! StreamReply on Telegram end to end (mode `edits`): a real gRPC client streams a reply chunk
//! by chunk to the real gateway, which sends the first text with `sendMessage`, then edits that
//! message with `editMessageText` as the text grows, within the chat's rate scope (a private
//! chat: 1 message a second, `telegram/render.rs`), while other Sends to the chat wait behind
//! it. The fake Bot API keeps what each chat shows, and refuses an edit that changes nothing as
//! Telegram does ("message is not modified", which the gateway takes as done).

#[path = "stream_frames/mod.rs"]
mod frames;
#[path = "telegram_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use frames::*;
use support::*;

use channel_gateway::api::pb;

/// Telegram's budget for one private chat (`PRIVATE_CHAT_BUDGET`): 1 message a second, a
/// burst of 1. Edits count against it like sends.
const CHAT_RATE: f64 = 1.0;
const CHAT_BURST: u32 = 1;

/// A gateway on the fake with Telegram's pacing on (the support's config turns it off), showing
/// a stream's text every 100 ms if the chat's scope lets it: the scope is what limits.
async fn start_paced(idle: Duration) -> Harness {
    let fake = FakeTelegram::start().await;
    let mut c = config_for(&fake);
    c.channels.telegram.pacing = true;
    c.delivery.stream_update_interval = Duration::from_millis(100);
    c.delivery.stream_idle_timeout = idle;
    let gateway = channel_gateway::server::start(c).await.unwrap();
    let client = Client::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    Harness {
        fake,
        gateway,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_chunks_edit_one_message_within_the_chats_budget_and_queued_sends_come_after() {
    let h = start_paced(Duration::from_secs(10)).await;
    assert_eq!(streaming(&h.client, "telegram").await, "edits");
    let chat = "7001";
    let (tx, call) = open(&h.client, address(chat)).await;
    let mut want = String::new();
    let started = Instant::now();
    let mut queued = Vec::new();
    for i in 0..200 {
        let piece = format!("tok{i} ");
        want.push_str(&piece);
        tx.send(chunk(&piece)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i == 50 || i == 150 {
            // Other messages of the chat, accepted while the reply streams.
            let r = h
                .client
                .clone()
                .send(send_req(
                    text(chat, &format!("after {i}")),
                    pb::WaitMode::Accepted,
                ))
                .await
                .unwrap()
                .into_inner();
            queued.push(r.message_id);
        }
    }
    tx.send(finish(pb::Message::default())).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    let took = started.elapsed();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(!r.incomplete, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    h.fake
        .wait_for(Duration::from_secs(20), "the two queued sends", |rs| {
            rs.iter()
                .filter(|x| x.method == "sendMessage" && x.ok() && x.text().starts_with("after"))
                .count()
                == 2
        })
        .await;
    let calls = h.fake.for_chat(chat);
    // Every call was taken, but for edits Telegram found changed nothing (done all the same).
    for c in &calls {
        assert!(
            c.ok() || c.description.as_deref() == Some(NOT_MODIFIED),
            "a refused call: {c:?}"
        );
    }
    let not_modified = calls.iter().filter(|c| !c.ok()).count();
    let first_after = calls
        .iter()
        .position(|x| x.text().starts_with("after"))
        .unwrap();
    let last_edit = calls
        .iter()
        .rposition(|x| x.method == "editMessageText")
        .unwrap();
    assert!(
        last_edit < first_after,
        "the queued sends came after the final edit"
    );
    // The stream's calls: one sendMessage, then edits of that message only.
    let stream = &calls[..first_after];
    assert_eq!(stream[0].method, "sendMessage");
    let id = r.receipts[0].native_id.parse::<i64>().unwrap();
    for c in &stream[1..] {
        assert_eq!(c.method, "editMessageText", "{c:?}");
        assert_eq!(c.body["message_id"], id, "{c:?}");
    }
    // The reply is one message showing the whole text, then the queued sends.
    let shown = h.fake.shown(chat);
    assert_eq!(
        shown.len(),
        3,
        "the reply, then the two queued sends: {shown:?}"
    );
    assert_eq!(shown[0].0, id);
    assert_eq!(shown[0].1, want.trim_end(), "the final text");
    assert_eq!(shown[1].1, "after 50");
    assert_eq!(shown[2].1, "after 150");
    assert_eq!(r.receipts.len(), 1);
    // Shown as it grew, and never faster than the chat's budget: at most rate + burst in any
    // second, and (a burst of 1) about a second between two calls to the chat.
    let times: Vec<Instant> = calls.iter().map(|x| x.at).collect();
    let updates = stream.len() - 1;
    assert!(updates >= 3, "the text was shown growing: {updates} edits");
    let worst = most_in(&times, Duration::from_secs(1));
    let gap = min_gap(&times).unwrap();
    assert!(
        worst as f64 <= CHAT_RATE + f64::from(CHAT_BURST),
        "{worst} calls to the chat in one second; its budget is {CHAT_RATE}/s, burst {CHAT_BURST}"
    );
    assert!(
        gap >= Duration::from_millis(800),
        "two calls to the chat {gap:?} apart; its budget is 1/s"
    );
    let lens: Vec<usize> = stream.iter().map(|x| x.text().len()).collect();
    assert!(
        lens.windows(2).all(|w| w[0] <= w[1]),
        "the shown text only grows: {lens:?}"
    );
    println!(
        "telegram: 200 chunks in {took:?}: 1 sendMessage + {updates} edits ({not_modified} \"not modified\"), \
         at most {worst} calls to the chat in a second, {gap:?} the shortest gap (budget {CHAT_RATE}/s, \
         burst {CHAT_BURST}); first text shown {:?} after the first chunk; queued sends at {:?} and {:?} \
         after the first chunk",
        calls[0].at.duration_since(started),
        calls[first_after].at.duration_since(started),
        calls[first_after + 1].at.duration_since(started),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closed_without_its_finish_shows_the_partial_text_flagged_incomplete() {
    let h = start_paced(Duration::from_secs(10)).await;
    let chat = "7002";
    let (tx, call) = open(&h.client, address(chat)).await;
    let r = cut_short(tx, call, &["the ", "first ", "half"]).await;
    let shown = h.fake.shown(chat);
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].1, "the first half");
    assert_eq!(r.receipts[0].native_id, shown[0].0.to_string());
    // GetDelivery tells the same.
    let d = finished_delivery(&h.client, &r.message_id, Duration::from_secs(5)).await;
    assert_eq!(
        d.error.as_ref().map(|e| e.code.as_str()),
        Some("stream_incomplete"),
        "{d:?}"
    );
    assert_eq!(d.receipts.len(), 1);
}

/// The finish adds nothing to a text shown whole already: the last edit is one Telegram
/// refuses as "message is not modified", which means the message shows it: delivered, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_that_changes_nothing_is_delivered_though_telegram_says_not_modified() {
    let h = start_paced(Duration::from_secs(10)).await;
    let chat = "7003";
    let (tx, call) = open(&h.client, address(chat)).await;
    // One chunk: the first showing is the whole text (two might be shown one at a time).
    tx.send(chunk("all shown")).await.unwrap();
    let fake = h.fake.clone();
    h.fake
        .wait_for(Duration::from_secs(10), "the whole text shown", move |_| {
            fake.shown(chat)
                .first()
                .is_some_and(|(_, t)| t == "all shown")
        })
        .await;
    tx.send(finish(pb::Message::default())).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(r.error.is_none() && !r.incomplete, "{r:?}");
    let calls = h.fake.for_chat(chat);
    let methods: Vec<(&str, Option<&str>)> = calls
        .iter()
        .map(|c| (c.method.as_str(), c.description.as_deref()))
        .collect();
    assert_eq!(
        methods,
        [
            ("sendMessage", None),
            ("editMessageText", Some(NOT_MODIFIED))
        ],
        "the message, then the final edit Telegram found changed nothing"
    );
    assert_eq!(h.fake.shown(chat)[0].1, "all shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_showing_had_to_change_is_reported_with_the_answer() {
    let h = start_paced(Duration::from_secs(10)).await;
    let (tx, call) = open(&h.client, address("7009")).await;
    tx.send(chunk("Pick one")).await.unwrap();
    // Shown first: the final message is then an edit of it, and suggested actions are a reply
    // keyboard, which an edit cannot set.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(finish_with_yes()).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    let codes: Vec<&str> = r.warnings.iter().map(|w| w.code.as_str()).collect();
    assert!(
        codes.contains(&"reply_keyboard_dropped"),
        "the final showing's adaptation is reported: {codes:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == "reply_keyboard_dropped")
            .count(),
        1,
        "each code once: {codes:?}"
    );
}
