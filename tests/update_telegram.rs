//! UpdateMessage and DeleteMessage on Telegram end to end: a real gRPC client, the real gateway,
//! and the fake Bot API, which keeps what each chat shows (sends add messages, edits change them,
//! `deleteMessage` removes them, by `message_id`) and answers as Telegram does when an edit
//! changes nothing, a message is gone, or a delete comes too late. Each test checks the chat as
//! a person sees it, and the order of the calls that made it so.

#[path = "change_support/mod.rs"]
mod change_support;

#[path = "telegram_support/mod.rs"]
mod support;

use change_support::{codes, delete, new_text, receipts_of};
use std::time::Duration;

use support::*;
use tonic::Code;

use channel_gateway::api::pb;

/// Telegram's limit per message is 4096 characters: `n` messages of `word` (4 letters and a
/// space, 5 characters a word) when `n - 1 < words * 5 / 4096 <= n`, cut at word boundaries.
fn long_text(word: &str, parts: usize) -> String {
    let words = (parts - 1) * 820 + 410;
    format!("{word} ").repeat(words).trim_end().to_string()
}

async fn send(h: &Harness, m: pb::Message, wait: pb::WaitMode) -> pb::SendResponse {
    h.client
        .clone()
        .send(send_req(m, wait))
        .await
        .unwrap()
        .into_inner()
}

async fn update(
    h: &Harness,
    id: &str,
    message: pb::Message,
    wait: pb::WaitMode,
) -> Result<pb::UpdateMessageResponse, tonic::Status> {
    change_support::update(&h.client, id, message, wait, "").await
}

fn ids(r: &pb::SendResponse) -> Vec<i64> {
    r.receipts
        .iter()
        .map(|r| r.native_id.parse().unwrap())
        .collect()
}

/// The calls to `chat` other than sends, as "METHOD message_id", in arrival order.
fn changes(h: &Harness, chat: &str) -> Vec<String> {
    h.fake
        .for_chat(chat)
        .into_iter()
        .filter(|r| !r.method.starts_with("send"))
        .map(|r| format!("{} {}", r.method, r.body["message_id"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_split_in_three_is_updated_into_one_and_into_five() {
    let h = start().await;
    // Three messages, updated into one: the first is edited, the other two deleted.
    let chat = "5001";
    let sent = send(
        &h,
        text(chat, &long_text("word", 3)),
        pb::WaitMode::Delivered,
    )
    .await;
    let first = ids(&sent);
    assert_eq!(first.len(), 3, "the text is split in three");
    let r = update(
        &h,
        &sent.message_id,
        new_text("the **short** answer"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(codes(&r.warnings), ["update_deletes"]);
    assert_eq!(
        h.fake.shown(chat),
        [(first[0], "the <b>short</b> answer".to_string())],
        "one message left, edited in place (as Telegram HTML)"
    );
    assert_eq!(
        changes(&h, chat),
        [
            format!("editMessageText {}", first[0]),
            format!("deleteMessage {}", first[1]),
            format!("deleteMessage {}", first[2]),
        ]
    );
    let edit = &h.fake.calls("editMessageText")[0];
    assert_eq!(edit.token, TOKEN, "the token travels in the path only");
    assert_eq!(edit.body["chat_id"], 5001);
    assert_eq!(edit.body["parse_mode"], "HTML");
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        [first[0].to_string()]
    );

    // Three messages updated into five: three edits, then two new messages after them.
    let chat = "5002";
    let sent = send(
        &h,
        text(chat, &long_text("word", 3)),
        pb::WaitMode::Delivered,
    )
    .await;
    let before = ids(&sent);
    let r = update(
        &h,
        &sent.message_id,
        new_text(&long_text("more", 5)),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(codes(&r.warnings), ["text_split", "update_sends"]);
    let shown = h.fake.shown(chat);
    assert_eq!(shown.len(), 5, "five messages shown");
    let shown_ids: Vec<i64> = shown.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        &shown_ids[..3],
        &before[..],
        "the three sent ones stay, edited"
    );
    let calls: Vec<String> = h
        .fake
        .for_chat(chat)
        .into_iter()
        .skip(3)
        .map(|r| r.method)
        .collect();
    assert_eq!(
        calls,
        [
            "editMessageText",
            "editMessageText",
            "editMessageText",
            "sendMessage",
            "sendMessage"
        ]
    );
    let joined: String = shown
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(joined.split_whitespace().count(), 4 * 820 + 410);
    assert!(joined.split_whitespace().all(|w| w == "more"));
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        shown_ids.iter().map(i64::to_string).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_changes_nothing_is_delivered() {
    let h = start().await;
    let chat = "5003";
    let sent = send(&h, text(chat, "same words"), pb::WaitMode::Delivered).await;
    let r = update(
        &h,
        &sent.message_id,
        new_text("same words"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    // Telegram did refuse it, in its words: the message already shows that.
    let edits: Vec<_> = h
        .fake
        .for_chat(chat)
        .into_iter()
        .filter(|c| c.method == "editMessageText")
        .collect();
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0].status, 400);
    assert_eq!(edits[0].description.as_deref(), Some(NOT_MODIFIED));
    assert_eq!(
        h.fake.shown(chat),
        [(ids(&sent)[0], "same words".to_string())]
    );
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        receipts_of(&h.client, &r.change_id).await,
        "the change names the message it left as it was"
    );
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        [ids(&sent)[0].to_string()]
    );
    // A later update plans against it still.
    update(
        &h,
        &sent.message_id,
        new_text("other words"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(
        h.fake.shown(chat),
        [(ids(&sent)[0], "other words".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removes_the_message_and_one_too_old_says_why() {
    let h = start().await;
    let caps = h
        .client
        .clone()
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "telegram".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert!(
        caps.update_delete,
        "GetCapabilities says Telegram updates and deletes"
    );
    let chat = "5004";
    let keep = send(&h, text(chat, "stays"), pb::WaitMode::Delivered).await;
    let gone = send(
        &h,
        text(chat, "posted in the wrong chat"),
        pb::WaitMode::Delivered,
    )
    .await;
    let r = delete(&h.client, &gone.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(h.fake.shown(chat), [(ids(&keep)[0], "stays".to_string())]);
    assert_eq!(
        changes(&h, chat),
        [format!("deleteMessage {}", ids(&gone)[0])]
    );
    assert!(receipts_of(&h.client, &gone.message_id).await.is_empty());

    // Past 48 hours Telegram keeps the message: the delete fails, saying so, and the message
    // is still known (nothing was deleted).
    let chat = "5005";
    let old = send(&h, text(chat, "old news"), pb::WaitMode::Delivered).await;
    h.fake.make_old(chat, ids(&old)[0]);
    let e = delete(&h.client, &old.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("Telegram deletes a bot's messages only within 48 hours"),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("message can't be deleted"),
        "{}",
        e.message()
    );
    assert_eq!(h.fake.shown(chat).len(), 1);
    assert_eq!(
        receipts_of(&h.client, &old.message_id).await,
        [ids(&old)[0].to_string()]
    );

    // A message someone deleted in the app: NOT_FOUND for an edit, in Telegram's words; a
    // delete of it is done already (as one carried out again after a crash).
    let chat = "5006";
    let taken = send(&h, text(chat, "deleted by hand"), pb::WaitMode::Delivered).await;
    h.fake
        .state
        .shown
        .lock()
        .unwrap()
        .remove(&(chat.to_string(), ids(&taken)[0]));
    let e = update(
        &h,
        &taken.message_id,
        new_text("v2"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("message to edit not found"),
        "{}",
        e.message()
    );
    let r = delete(&h.client, &taken.message_id, pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32, "{r:?}");
    assert!(
        h.fake
            .received()
            .iter()
            .any(|x| x.method == "deleteMessage" && !x.ok()),
        "the delete was made, and Telegram said the message was gone"
    );
    for r in h.fake.received() {
        assert_eq!(r.token, TOKEN);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sent_right_after_its_send_waits_for_it() {
    let h = start().await;
    // Telegram is slow: the Send is still on its way when the update is accepted.
    let chat = "5007";
    h.fake.set_latency(chat, Duration::from_millis(400));
    let sent = send(&h, text(chat, "working on it…"), pb::WaitMode::Accepted).await;
    let r = update(
        &h,
        &sent.message_id,
        new_text("here is the answer"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(codes(&r.warnings), ["update_pending"], "{:?}", r.warnings);
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    let methods: Vec<String> = h
        .fake
        .for_chat(chat)
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["sendMessage", "editMessageText"]);
    let shown = h.fake.shown(chat);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].1, "here is the answer");
    assert_eq!(
        receipts_of(&h.client, &sent.message_id).await,
        [shown[0].0.to_string()]
    );
    // And a Send after the update goes after it.
    send(&h, text(chat, "next"), pb::WaitMode::Delivered).await;
    let methods: Vec<String> = h
        .fake
        .for_chat(chat)
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["sendMessage", "editMessageText", "sendMessage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggested_actions_cannot_be_set_by_an_edit_and_the_warnings_say_so() {
    let h = start().await;
    let chat = "5008";
    let with_actions = |t: &str| pb::Message {
        text: t.into(),
        suggested_actions: Some(pb::SuggestedActions {
            actions: ["Yes", "No"]
                .into_iter()
                .map(|a| pb::CardAction {
                    r#type: pb::ActionType::ImBack as i32,
                    title: a.into(),
                    value: a.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut m = with_actions("shall I go on?");
    m.address = Some(Box::new(address(chat)));
    let sent = send(&h, m, pb::WaitMode::Delivered).await;
    let shown = h.fake.shown_messages(chat);
    assert!(
        shown[0].1.markup.as_ref().unwrap()["keyboard"].is_array(),
        "the send shows a reply keyboard: {shown:?}"
    );
    let r = update(
        &h,
        &sent.message_id,
        with_actions("shall I go on? (2 left)"),
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(codes(&r.warnings), ["reply_keyboard_dropped"]);
    assert_eq!(r.warnings[0].field, "message.suggested_actions");
    let edit = &h.fake.calls("editMessageText")[0];
    assert_eq!(edit.body["text"], "shall I go on? (2 left)");
    assert!(
        edit.body.get("reply_markup").is_none(),
        "an edit takes only an inline keyboard: {}",
        edit.body
    );
    assert_eq!(
        h.fake.shown(chat),
        [(ids(&sent)[0], "shall I go on? (2 left)".to_string())]
    );
}
