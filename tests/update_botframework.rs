//! UpdateMessage and DeleteMessage on the Bot Framework Connector end to end: a real gRPC
//! client, the real gateway, and the fake connector, which keeps what each conversation shows
//! (a POST adds an activity, a PUT replaces it, a DELETE removes it, by activity id; a PUT or
//! DELETE of an activity that is not there answers Teams' 404 `ActivityNotFoundInConversation`).
//! Each test checks the conversation as a person sees it and the order of the calls that made it
//! so. Web Chat and Direct Line refuse both before anything is accepted (Messenger's refusal is
//! in `update_facebook.rs`, on its own fake).

#[path = "change_support/mod.rs"]
mod change_support;

mod common;

use change_support::{codes, delete, new_text, receipts_of, update};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use channel_gateway::api::pb;

type Client = pb::channel_gateway_client::ChannelGatewayClient<tonic::transport::Channel>;

/// A Teams conversation id as Teams writes them: the gateway must encode it in the URL.
const CONV: &str = "19:split@thread.tacv2";

/// Teams takes 40,960 UTF-16 units per activity; with its envelope a piece of text holds about
/// 40,600 characters of "word ", so this many words make `n` activities, half a piece away from
/// either neighbour.
fn long_text(parts: usize) -> String {
    let words = (parts * 2 - 1) * 4_060;
    "word ".repeat(words).trim_end().to_string()
}

fn word_count(shown: &[(String, String)]) -> usize {
    shown
        .iter()
        .map(|(_, t)| t.split_whitespace().count())
        .sum()
}

async fn send(
    client: &Client,
    message: pb::Message,
    wait: pb::WaitMode,
) -> Result<pb::SendResponse, tonic::Status> {
    client
        .clone()
        .send(pb::SendRequest {
            message: Some(message),
            idempotency_key: String::new(),
            wait: wait as i32,
        })
        .await
        .map(|r| r.into_inner())
}

fn ids(receipts: &[pb::Receipt]) -> Vec<String> {
    receipts.iter().map(|r| r.native_id.clone()).collect()
}

/// The PUTs and DELETEs the fake accepted (and the POSTs after the first `skip_posts`), as
/// `METHOD activity` lines, in arrival order.
fn changes(fake: &FakeConnector, conv: &str, skip_posts: usize) -> Vec<String> {
    fake.for_conversation(conv)
        .into_iter()
        .filter(|r| r.path.starts_with("/v3/conversations/"))
        .skip_while({
            let mut posts = 0;
            move |r| {
                posts += usize::from(r.is_post());
                r.is_post() && posts <= skip_posts
            }
        })
        .map(|r| format!("{} {}", r.method, r.activity.as_deref().unwrap_or("")))
        .collect()
}

/// The id GetDelivery would give the next message the gateway accepts: nothing may have it.
fn next_id(id: &str) -> String {
    (id.parse::<u64>().unwrap() + 1).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_in_three_is_updated_into_one_and_into_five() {
    let h = start().await;
    // Three activities, updated into one: the first is edited in place, the other two deleted.
    let sent = send(
        &h.client,
        h.text(CONV, &long_text(3)),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(sent.receipts.len(), 3, "the text is split in three");
    let first = ids(&sent.receipts);
    assert_eq!(h.fake.shown(CONV).len(), 3);
    let r = update(
        &h.client,
        &sent.message_id,
        new_text("the short answer"),
        pb::WaitMode::Delivered,
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(codes(&r.warnings), ["update_deletes"]);
    assert_eq!(
        h.fake.shown(CONV),
        vec![(first[0].clone(), "the short answer".to_string())],
        "one activity left, edited in place"
    );
    assert_eq!(
        changes(&h.fake, CONV, 3),
        [
            format!("PUT {}", first[0]),
            format!("DELETE {}", first[1]),
            format!("DELETE {}", first[2]),
        ]
    );
    // The PUT carries the whole activity again, with the id of the one it replaces; both
    // calls carry the bot's token, never in the URL.
    let put = &h.fake.calls("PUT")[0];
    assert_eq!(put.body["id"], json!(first[0]));
    assert_eq!(put.body["type"], "message");
    assert_eq!(put.body["conversation"]["id"], CONV);
    assert_eq!(put.body["from"]["id"], BOT);
    for r in h.fake.calls("PUT").iter().chain(&h.fake.calls("DELETE")) {
        assert!(
            r.authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer tok-")),
            "{r:?}"
        );
        assert!(!r.path.contains("tok-"), "{}", r.path);
    }
    assert!(h.fake.calls("DELETE").iter().all(|r| r.body == Value::Null));
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        [first[0].clone()]
    );

    // Three activities updated into five: three edits, then two new activities after them.
    let grow = "19:grow@thread.tacv2";
    let sent = send(
        &h.client,
        h.text(grow, &long_text(3)),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    let before = ids(&sent.receipts);
    assert_eq!(before.len(), 3);
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
    let calls = changes(&h.fake, grow, 3);
    assert_eq!(
        calls,
        [
            format!("PUT {}", before[0]),
            format!("PUT {}", before[1]),
            format!("PUT {}", before[2]),
            "POST ".to_string(),
            "POST ".to_string(),
        ]
    );
    let shown = h.fake.shown(grow);
    assert_eq!(shown.len(), 5, "five activities shown");
    let shown_ids: Vec<String> = shown.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        &shown_ids[..3],
        &before[..],
        "the three sent ones stay, edited"
    );
    assert_eq!(word_count(&shown), 9 * 4_060, "the whole new text is shown");
    assert_eq!(receipts_of(&h.client, &sent.message_id).await, shown_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removes_every_activity_of_the_message() {
    let h = start().await;
    let conv = "a:1del";
    let keep = send(&h.client, h.text(conv, "stays"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let gone = send(
        &h.client,
        h.text(conv, &long_text(2)),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    let gone_ids = ids(&gone.receipts);
    assert_eq!(gone_ids.len(), 2);
    let r = delete(&h.client, &gone.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(
        changes(&h.fake, conv, 3),
        [
            format!("DELETE {}", gone_ids[0]),
            format!("DELETE {}", gone_ids[1])
        ]
    );
    assert_eq!(
        h.fake.shown(conv),
        vec![(keep.receipts[0].native_id.clone(), "stays".to_string())]
    );
    assert!(receipts_of(&h.client, &gone.message_id).await.is_empty());
    assert_eq!(
        receipts_of(&h.client, &keep.message_id).await,
        ids(&keep.receipts)
    );
    // Nothing of it is left on the channel: a second delete is refused before acceptance.
    let e = delete(&h.client, &gone.message_id, pb::WaitMode::Accepted)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(h.fake.calls("DELETE").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sent_right_after_its_send_waits_for_it_and_never_overtakes_it() {
    let h = start().await;
    let conv = "a:1slow";
    // The connector is slow: the Send is still on its way when the update is accepted.
    h.fake.set_latency(conv, Duration::from_millis(400));
    let sent = send(
        &h.client,
        h.text(conv, "working on it…"),
        pb::WaitMode::Accepted,
    )
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
    let calls = h.fake.for_conversation(conv);
    let methods: Vec<&str> = calls.iter().map(|r| r.method).collect();
    assert_eq!(methods, ["POST", "PUT"]);
    let posted = &h.fake.shown(conv)[0].0;
    assert_eq!(calls[1].activity.as_ref(), Some(posted));
    assert_eq!(h.fake.max_in_flight(conv), 1, "never two calls at once");
    assert_eq!(
        h.fake.shown(conv),
        vec![(posted.clone(), "here is the answer".to_string())]
    );
    // And a Send after the update goes after it.
    send(&h.client, h.text(conv, "next"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    let methods: Vec<&str> = h
        .fake
        .for_conversation(conv)
        .iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["POST", "PUT", "POST"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_retried_with_its_idempotency_key_is_made_once() {
    let h = start().await;
    let conv = "a:1idem";
    let sent = send(&h.client, h.text(conv, "v1"), pb::WaitMode::Delivered)
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
    assert_eq!(h.fake.calls("PUT").len(), 1);
    assert_eq!(h.fake.shown(conv)[0].1, "v2");
}

fn teams_error(status: u16, code: &str) -> Scripted {
    Scripted {
        status,
        body: json!({"error": {"code": code, "message": format!("refused: {code}")}}),
        retry_after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_refusals_are_reported_with_their_code() {
    let h = start().await;
    let conv = "a:1refuse";
    // Teams' codes for an update it refuses (its status-code table), and the gRPC code each
    // becomes: a message or conversation gone is NOT_FOUND.
    for (status, code, want) in [
        (403, "NotEnoughPermissions", Code::FailedPrecondition),
        (403, "BotNotInConversationRoster", Code::FailedPrecondition),
        (404, "ActivityNotFoundInConversation", Code::NotFound),
        (404, "ConversationNotFound", Code::NotFound),
        (400, "BadArgument", Code::InvalidArgument),
    ] {
        let sent = send(&h.client, h.text(conv, "v1"), pb::WaitMode::Delivered)
            .await
            .unwrap();
        h.fake.script(conv, vec![teams_error(status, code)]);
        let e = update(
            &h.client,
            &sent.message_id,
            new_text("v2"),
            pb::WaitMode::Delivered,
            "",
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), want, "{code}: {e:?}");
        assert!(e.message().contains(code), "{code}: {}", e.message());
        let info = e.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, code);
        assert_eq!(info.metadata["http_status"], status.to_string());
        assert_eq!(info.metadata["permanent"], "true", "{code} is not retried");
        // Refused, the activity is as it was, and still the message's.
        assert_eq!(
            receipts_of(&h.client, &sent.message_id).await,
            ids(&sent.receipts)
        );
        let shown = h.fake.shown(conv);
        assert_eq!(shown.last().map(|(_, t)| t.as_str()), Some("v1"));
    }
    assert!(h.fake.calls("PUT").is_empty(), "every PUT was refused");

    // A DELETE answered 404 for a conversation Teams does not know fails the same way...
    let sent = send(&h.client, h.text(conv, "v1"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    h.fake
        .script(conv, vec![teams_error(404, "ConversationNotFound")]);
    let e = delete(&h.client, &sent.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("ConversationNotFound"),
        "{}",
        e.message()
    );
    assert_eq!(receipts_of(&h.client, &sent.message_id).await.len(), 1);
    // ...but one that says the activity is gone already is what the delete was for: done (a
    // delete resent after a crash finds its activity removed by the first attempt).
    h.fake.script(
        conv,
        vec![teams_error(404, "ActivityNotFoundInConversation")],
    );
    let r = delete(&h.client, &sent.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert!(receipts_of(&h.client, &sent.message_id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_chat_and_direct_line_refuse_updates_and_deletes_before_accepting_them() {
    let h = start().await;
    for channel in ["webchat", "directline"] {
        let mut message = h.text("wc-conv", "hello");
        message.address.as_mut().unwrap().channel_id = channel.into();
        let sent = send(&h.client, message, pb::WaitMode::Delivered)
            .await
            .unwrap();
        assert_eq!(sent.receipts.len(), 1);
        let before = h.fake.received().len();
        let e = update(
            &h.client,
            &sent.message_id,
            new_text("changed"),
            pb::WaitMode::Delivered,
            "",
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{channel}: {e:?}");
        assert!(e.message().contains("update_delete"), "{}", e.message());
        let e = delete(&h.client, &sent.message_id, pb::WaitMode::Delivered)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{channel}: {e:?}");
        // Nothing was accepted: no change got an id, and nothing more reached the connector.
        let e = h
            .client
            .clone()
            .get_delivery(pb::GetDeliveryRequest {
                message_id: next_id(&sent.message_id),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{channel}: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.fake.received().len(), before, "{channel}");
        assert_eq!(
            receipts_of(&h.client, &sent.message_id).await,
            ids(&sent.receipts)
        );
    }
}
