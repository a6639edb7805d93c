//! StreamReply through the Bot Framework connector end to end, on the two ways its channels
//! show a stream: Teams (`msteams`, mode `edits`: the first text POSTed as an activity, then
//! that activity PUT again as the text grows, within Teams' documented budget per bot per
//! conversation, `TEAMS_PER_CONVERSATION` in botframework/render.rs) and Web Chat (`webchat`,
//! mode `typing`: it cannot change an activity, so typing activities are sent while the text
//! grows, then one message activity with the whole text). Other Sends to the conversation wait
//! behind the stream. The fake connector keeps what each conversation shows.

mod common;
#[path = "stream_frames/mod.rs"]
mod frames;

use std::time::{Duration, Instant};

use common::*;
use frames::*;

use channel_gateway::api::pb;

/// Teams' limits per bot per conversation: (operations, window): 7 per second, 8 per 2 s, 60
/// per 30 s (1,800 an hour is out of a test's reach).
const TEAMS_WINDOWS: [(usize, Duration); 3] = [
    (7, Duration::from_secs(1)),
    (8, Duration::from_secs(2)),
    (60, Duration::from_secs(30)),
];

/// A gateway on the fake connector with Teams' pacing on (the harness turns it off), showing a
/// stream's text every 100 ms if the scopes let it (so Teams' budget is what limits), and
/// typing repeated every second.
async fn start_paced(idle: Duration) -> Harness {
    start_with(|c| {
        c.channels.botframework.teams_pacing = true;
        c.channels.botframework.typing_interval = Duration::from_secs(1);
        c.delivery.stream_update_interval = Duration::from_millis(100);
        c.delivery.stream_idle_timeout = idle;
    })
    .await
}

fn webchat(h: &Harness, conv: &str) -> pb::Address {
    pb::Address {
        channel_id: "webchat".into(),
        ..h.address(conv)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_two_hundred_chunks_put_one_activity_within_teams_budget_and_queued_sends_come_after()
{
    let h = start_paced(Duration::from_secs(10)).await;
    assert_eq!(streaming(&h.client, "msteams").await, "edits");
    let conv = "teams-stream";
    let (tx, call) = open(&h.client, h.address(conv)).await;
    let mut want = String::new();
    let started = Instant::now();
    for i in 0..200 {
        let piece = format!("tok{i} ");
        want.push_str(&piece);
        tx.send(chunk(&piece)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i == 50 || i == 150 {
            h.send(conv, &format!("after {i}")).await.unwrap();
        }
    }
    tx.send(finish(pb::Message::default())).await.unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    let took = started.elapsed();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(!r.incomplete && r.error.is_none(), "{r:?}");
    h.fake
        .wait_for(Duration::from_secs(20), "the two queued sends", |rs| {
            rs.iter().filter(|x| x.text().starts_with("after")).count() == 2
        })
        .await;
    let calls = h.fake.for_conversation(conv);
    let first_after = calls
        .iter()
        .position(|x| x.text().starts_with("after"))
        .unwrap();
    let last_put = calls.iter().rposition(|x| x.method == "PUT").unwrap();
    assert!(
        last_put < first_after,
        "the queued sends came after the final PUT"
    );
    // The stream's calls: one POST, then PUTs of that activity only.
    let stream = &calls[..first_after];
    assert_eq!(r.receipts.len(), 1);
    let id = r.receipts[0].native_id.clone();
    assert!(stream[0].is_post(), "{:?}", stream[0]);
    for c in &stream[1..] {
        assert_eq!(c.method, "PUT", "{c:?}");
        assert_eq!(c.activity.as_deref(), Some(id.as_str()), "{c:?}");
        assert_eq!(
            c.body["id"],
            id.as_str(),
            "the PUT names the activity: {}",
            c.body
        );
        assert_eq!(c.kind(), "message");
    }
    for c in &calls[first_after..] {
        assert!(c.is_post(), "{c:?}");
    }
    let shown = h.fake.shown(conv);
    let texts: Vec<&str> = shown.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [want.as_str(), "after 50", "after 150"],
        "the reply, whole, then the queued sends"
    );
    assert_eq!(shown[0].0, id);
    // Shown as it grew, within each of Teams' windows.
    let updates = stream.len() - 1;
    assert!(updates >= 3, "the text was shown growing: {updates} PUTs");
    let times: Vec<Instant> = calls.iter().map(|x| x.at).collect();
    let mut figures = Vec::new();
    for (most, window) in TEAMS_WINDOWS {
        let n = most_in(&times, window);
        assert!(
            n <= most,
            "{n} operations in {window:?} in one conversation; Teams allows {most}"
        );
        figures.push(format!("{n}/{most} in {window:?}"));
    }
    let lens: Vec<usize> = stream.iter().map(|x| x.text().len()).collect();
    assert!(
        lens.windows(2).all(|w| w[0] <= w[1]),
        "the shown text only grows: {lens:?}"
    );
    println!(
        "msteams: 200 chunks in {took:?}: 1 POST + {updates} PUTs; most operations in a window \
         (seen/allowed): {}; first text shown {:?} after the first chunk",
        figures.join(", "),
        calls[0].at.duration_since(started)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_stream_closed_without_finish_shows_the_partial_text_flagged_incomplete() {
    let h = start_paced(Duration::from_secs(10)).await;
    let conv = "teams-cut";
    let (tx, call) = open(&h.client, h.address(conv)).await;
    let r = cut_short(tx, call, &["the ", "first ", "half"]).await;
    let shown = h.fake.shown(conv);
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].1, "the first half");
    assert_eq!(r.receipts[0].native_id, shown[0].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webchat_shows_typing_while_the_text_grows_then_one_message_and_the_queued_send() {
    let h = start_paced(Duration::from_secs(10)).await;
    assert_eq!(streaming(&h.client, "webchat").await, "typing");
    let conv = "webchat-stream";
    let (tx, call) = open(&h.client, webchat(&h, conv)).await;
    let mut want = String::new();
    let started = Instant::now();
    for i in 0..100 {
        let piece = format!("tok{i} ");
        want.push_str(&piece);
        tx.send(chunk(&piece)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        if i == 50 {
            let mut client = h.client.clone();
            send_text(&mut client, &webchat(&h, conv), "after".into())
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
    let calls = h.fake.for_conversation(conv);
    let kinds: Vec<&str> = calls.iter().map(|c| c.kind()).collect();
    // Typing while the text grows, then the message, then the queued send: never a PUT.
    let message = kinds.iter().position(|k| *k == "message").unwrap();
    assert!(
        calls.iter().all(Received::is_post),
        "Web Chat cannot change an activity: {kinds:?}"
    );
    assert!(kinds[..message].iter().all(|k| *k == "typing"), "{kinds:?}");
    assert_eq!(&kinds[message..], ["message", "message"], "{kinds:?}");
    let typing: Vec<Instant> = calls[..message].iter().map(|c| c.at).collect();
    // ~3 s of chunks with typing repeated every second.
    assert!(
        typing.len() >= 2,
        "typing kept alive while the text grew: {kinds:?}"
    );
    let gap = min_gap(&typing);
    if let Some(g) = gap {
        assert!(
            g >= Duration::from_millis(900),
            "typing repeated {g:?} apart; channels.botframework.typing_interval is 1 s"
        );
    }
    assert_eq!(calls[message].text(), want, "the whole text, once");
    assert_eq!(calls[message + 1].text(), "after");
    assert!(
        calls[message].body.to_string().contains("\"Yes\""),
        "the finish's suggested action is on the final message: {}",
        calls[message].body
    );
    assert_eq!(r.receipts.len(), 1);
    println!(
        "webchat: 100 chunks in {took:?}: {} typing activities (shortest gap {gap:?}), then the message \
         {:?} after the first chunk, the queued send {:?} after it",
        typing.len(),
        calls[message].at.duration_since(started),
        calls[message + 1].at.duration_since(calls[message].at)
    );
}
