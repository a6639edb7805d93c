//! UpdateMessage and DeleteMessage on Slack end to end: a real gRPC client, the real gateway, and
//! the fake Slack Web API, which keeps what each channel shows (chat.postMessage adds, chat.update
//! edits, chat.delete removes, by `ts`), so each test checks the conversation as a person sees
//! it, and the order of the calls that made it so.

#[path = "change_support/mod.rs"]
mod change_support;

#[path = "slack_support/mod.rs"]
mod support;

use change_support::{codes, delete, new_text, receipts_of, update};
use std::time::Duration;

use support::*;
use tonic::Code;

use channel_gateway::api::pb;

/// Slack's text limit per message is 40,000 characters: this many words of "word " (5
/// characters) make `n` native messages when `n - 1 < words * 5 / 40_000 <= n`.
fn long_text(parts: usize) -> String {
    let words = (parts - 1) * 8_000 + 4_000;
    "word ".repeat(words).trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_in_three_is_updated_into_one_and_into_five() {
    let h = start().await;
    // Three native messages, updated into one: the first is edited, the other two deleted.
    let sent = h
        .send(h.text("C0SPLIT", &long_text(3)), pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(sent.receipts.len(), 3, "the text is split in three");
    let first: Vec<String> = sent.receipts.iter().map(|r| r.native_id.clone()).collect();
    let r = update(
        &h.client,
        &sent.message_id,
        new_text("the *short* answer"),
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(codes(&r.warnings), ["update_deletes"]);
    let shown = h.fake.shown("C0SPLIT");
    assert_eq!(
        shown,
        vec![(first[0].clone(), "the _short_ answer".to_string())],
        "one message left, edited in place (rendered as Slack mrkdwn)"
    );
    let calls: Vec<String> = h
        .fake
        .received()
        .into_iter()
        .filter(|r| !r.is_post())
        .map(|r| format!("{} {}", r.path, r.body["ts"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        calls,
        [
            format!("/api/chat.update {}", first[0]),
            format!("/api/chat.delete {}", first[1]),
            format!("/api/chat.delete {}", first[2]),
        ]
    );
    // The update keeps the message's channel and thread position: chat.update gets the
    // channel id Slack gave back and no thread or unfurl keys.
    let edit = &h.fake.calls("chat.update")[0].body;
    assert_eq!(edit["channel"], "C0SPLIT");
    assert!(edit.get("thread_ts").is_none() && edit.get("unfurl_links").is_none());
    assert_eq!(edit["blocks"], serde_json::json!([]), "old blocks removed");
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        [first[0].clone()]
    );

    // Three native messages updated into five: three edits, then two new messages after them.
    let sent = h
        .send(h.text("C0GROW", &long_text(3)), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let before: Vec<String> = sent.receipts.iter().map(|r| r.native_id.clone()).collect();
    let posts_before = h.fake.calls("chat.postMessage").len();
    let r = update(
        &h.client,
        &sent.message_id,
        new_text(&long_text(5)),
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap();
    assert_eq!(codes(&r.warnings), ["text_split", "update_sends"]);
    let shown = h.fake.shown("C0GROW");
    assert_eq!(shown.len(), 5, "five messages shown");
    let shown_ts: Vec<String> = shown.iter().map(|(ts, _)| ts.clone()).collect();
    assert_eq!(
        &shown_ts[..3],
        &before[..],
        "the three sent ones stay, edited"
    );
    assert_eq!(h.fake.calls("chat.update").len(), 1 + 3);
    assert_eq!(h.fake.calls("chat.postMessage").len(), posts_before + 2);
    let joined: String = shown
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(joined.split_whitespace().count(), 4 * 8_000 + 4_000);
    assert_eq!(receipts_of(&h.client, &sent.message_id).await, shown_ts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removes_the_message_and_a_second_one_has_nothing_to_delete() {
    let h = start().await;
    let keep = h
        .send(h.text("C0DEL", "stays"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let gone = h
        .send(
            h.text("C0DEL", "posted in the wrong room"),
            pb::WaitMode::Delivered,
        )
        .await
        .unwrap();
    let r = delete(&h.client, &gone.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(
        h.fake.shown("C0DEL"),
        vec![(keep.receipts[0].native_id.clone(), "stays".to_string())]
    );
    let del = &h.fake.calls("chat.delete")[0].body;
    assert_eq!(
        (del["channel"].as_str(), del["ts"].as_str()),
        (Some("C0DEL"), Some(gone.receipts[0].native_id.as_str()))
    );
    // Nothing of it is left on the channel: refused before anything is accepted.
    let e = delete(&h.client, &gone.message_id, pb::WaitMode::Accepted)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("nothing to delete"), "{}", e.message());
    // An unknown id, and a change's own id, are refused by field.
    let e = delete(&h.client, "999999999", pb::WaitMode::Accepted)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = delete(&h.client, &r.change_id, pb::WaitMode::Accepted)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("message_id"), "{}", e.message());
    let e = delete(&h.client, "not-a-number", pb::WaitMode::Accepted)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sent_right_after_its_send_waits_for_it_and_never_overtakes_it() {
    let h = start().await;
    // Slack is slow: the Send is still on its way when the update is accepted.
    h.fake.set_latency("C0SLOW", Duration::from_millis(400));
    let sent = h
        .send(h.text("C0SLOW", "working on it…"), pb::WaitMode::Accepted)
        .await
        .unwrap();
    let r = update(
        &h.client,
        &sent.message_id,
        new_text("here is the answer"),
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap();
    assert_eq!(codes(&r.warnings), ["update_pending"], "{:?}", r.warnings);
    let paths: Vec<String> = h.fake.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/api/chat.postMessage", "/api/chat.update"]);
    let shown = h.fake.shown("C0SLOW");
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].1, "here is the answer");
    // And a Send after the update goes after it.
    h.send(h.text("C0SLOW", "next"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let paths: Vec<String> = h.fake.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths.last().map(String::as_str),
        Some("/api/chat.postMessage")
    );
    assert_eq!(paths.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_retried_with_its_idempotency_key_is_made_once() {
    let h = start().await;
    let sent = h
        .send(h.text("C0IDEM", "v1"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let first = update(
        &h.client,
        &sent.message_id,
        new_text("v2"),
        pb::WaitMode::Delivered,
        "edit-1",
    )
    .await
    .unwrap();
    let again = update(
        &h.client,
        &sent.message_id,
        new_text("v2"),
        pb::WaitMode::Delivered,
        "edit-1",
    )
    .await
    .unwrap();
    assert_eq!(first.change_id, again.change_id);
    assert_eq!(h.fake.calls("chat.update").len(), 1);
    // The change is reported like a message.
    assert_eq!(receipts_of(&h.client, &first.change_id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slacks_own_refusals_are_reported_with_their_code() {
    let h = start().await;
    for code in [
        "edit_window_closed",
        "cant_update_message",
        "message_not_found",
    ] {
        let sent = h
            .send(h.text("C0REFUSE", "v1"), pb::WaitMode::Delivered)
            .await
            .unwrap();
        h.fake.script("C0REFUSE", vec![Scripted::refuse(code)]);
        let e = update(
            &h.client,
            &sent.message_id,
            new_text("v2"),
            pb::WaitMode::Delivered,
            "",
        )
        .await
        .unwrap_err();
        // Slack's code decides the gRPC one: a message gone is NOT_FOUND.
        let want = match code {
            "message_not_found" => Code::NotFound,
            _ => Code::FailedPrecondition,
        };
        assert_eq!(e.code(), want, "{code}: {e:?}");
        assert!(e.message().contains(code), "{code}: {}", e.message());
    }
    let sent = h
        .send(h.text("C0REFUSE", "v1"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    h.fake
        .script("C0REFUSE", vec![Scripted::refuse("cant_delete_message")]);
    let e = delete(&h.client, &sent.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("cant_delete_message"),
        "{}",
        e.message()
    );
    // Refused, the message is still there and still known: a later delete can try again.
    assert_eq!(receipts_of(&h.client, &sent.message_id).await.len(), 1);
    delete(&h.client, &sent.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert!(receipts_of(&h.client, &sent.message_id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_shows_an_updates_and_a_deletes_requests_against_placeholder_ids() {
    let h = start().await;
    let render = |change: pb::RenderChange, text: &str| {
        let mut client = h.client.clone();
        let message = h.text("C0RENDER", text);
        async move {
            client
                .render(pb::RenderRequest {
                    message: Some(message),
                    options: None,
                    change: Some(change),
                })
                .await
        }
    };
    let r = render(
        pb::RenderChange {
            native_messages: 3,
            delete: false,
            stream: false,
        },
        "short now",
    )
    .await
    .unwrap()
    .into_inner();
    let seq = method_and_field(&r, "ts");
    assert_eq!(
        seq,
        [
            ("chat.update".to_string(), "{native_id_1}".to_string()),
            ("chat.delete".to_string(), "{native_id_2}".to_string()),
            ("chat.delete".to_string(), "{native_id_3}".to_string()),
        ]
    );
    assert_eq!(codes(&r.warnings), ["update_deletes"]);
    let r = render(
        pb::RenderChange {
            native_messages: 2,
            delete: true,
            stream: false,
        },
        "",
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.requests.len(), 2);
    assert!(r.requests.iter().all(|q| q.url.ends_with("/chat.delete")));
    // Bounded, and named by field.
    let e = render(
        pb::RenderChange {
            native_messages: 0,
            delete: false,
            stream: false,
        },
        "x",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("change.native_messages"),
        "{}",
        e.message()
    );
    assert!(h.fake.received().is_empty(), "render sends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_leftovers_of_changes_are_answered_sensibly() {
    let h = start().await;
    // A delete retried with its key after it was carried out: the first answer again, though
    // nothing is left to delete.
    let sent = h
        .send(h.text("C0AGAIN", "bye"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let del = |key: &'static str| {
        let mut client = h.client.clone();
        let id = sent.message_id.clone();
        async move {
            client
                .delete_message(pb::DeleteMessageRequest {
                    message_id: id,
                    idempotency_key: key.into(),
                    wait: pb::WaitMode::Delivered as i32,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = del("del-1").await.unwrap();
    let again = del("del-1").await.unwrap();
    assert_eq!(first.change_id, again.change_id);
    assert_eq!(h.fake.calls("chat.delete").len(), 1);
    // Without the key, there is nothing left to delete.
    assert_eq!(del("").await.unwrap_err().code(), Code::FailedPrecondition);

    // A message someone removed in Slack: deleting it is done already.
    let gone = h
        .send(
            h.text("C0AGAIN", "removed by hand"),
            pb::WaitMode::Delivered,
        )
        .await
        .unwrap();
    h.fake
        .state
        .shown
        .lock()
        .unwrap()
        .remove(&("C0AGAIN".to_string(), gone.receipts[0].native_id.clone()));
    let r = delete(&h.client, &gone.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert!(receipts_of(&h.client, &gone.message_id).await.is_empty());

    // An update that shows nothing (a typing indicator) is refused: it would delete the message.
    let kept = h
        .send(h.text("C0AGAIN", "stays"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let e = update(
        &h.client,
        &kept.message_id,
        pb::Message {
            r#type: pb::MessageType::Typing as i32,
            ..Default::default()
        },
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("DeleteMessage"), "{}", e.message());

    // A failed change is not redelivered: behind later ones it would show an older version.
    h.fake
        .script("C0AGAIN", vec![Scripted::refuse("edit_window_closed")]);
    let e = update(
        &h.client,
        &kept.message_id,
        new_text("v2"),
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let failed_change = h
        .client
        .clone()
        .list_failed(pb::ListFailedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries
        .into_iter()
        .find(|d| d.conversation_id == "C0AGAIN")
        .expect("the failed update is listed")
        .message_id;
    let e = h
        .client
        .clone()
        .redeliver(pb::RedeliverRequest {
            message_ids: vec![failed_change],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not redelivered"), "{}", e.message());
    assert_eq!(h.fake.shown("C0AGAIN").last().unwrap().1, "stays");
}
