//! The Slack channel end to end: a real gRPC client, the real gateway, and a fake Slack Web API
//! on 127.0.0.1 that records every request and answers as scripted.

#[path = "slack_support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

use channel_gateway::api::pb;

fn assert_no_token(what: &str, text: &str) {
    assert!(!text.contains(TOKEN), "the bot token leaked into {what}");
    assert!(
        !text.contains("xoxb-"),
        "something token-like leaked into {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_false_on_http_200_is_a_failure_with_slacks_code_and_the_next_message_still_goes() {
    let h = start().await;
    h.fake
        .script("C0GONE", vec![Scripted::refuse("channel_not_found")]);

    let err = h
        .send(h.text("C0GONE", "first"), pb::WaitMode::Delivered)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        err.message().contains("channel_not_found"),
        "{}",
        err.message()
    );
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "channel_not_found");
    assert_eq!(info.metadata["channel"], "slack");
    assert_eq!(info.metadata["http_status"], "200");
    assert_eq!(info.metadata["permanent"], "true");
    assert_eq!(
        info.metadata["attempts"], "1",
        "a permanent refusal is not retried"
    );
    assert_no_token("the error", &format!("{err:?}"));

    let ok = h
        .send(h.text("C0GONE", "second"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    assert_eq!(ok.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(ok.receipts.len(), 1);
    assert!(ok.receipts[0].native_id.starts_with("1700000000."));
    assert_eq!(ok.receipts[0].conversation_id, "C0GONE");

    let received = h.fake.received();
    assert_eq!(received.len(), 2, "one attempt each");
    assert_eq!(
        received
            .iter()
            .map(|r| (r.text(), r.ok))
            .collect::<Vec<_>>(),
        [("first", false), ("second", true)]
    );
    for r in &received {
        assert_eq!(r.path, "/api/chat.postMessage");
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "the token travels in the Authorization header"
        );
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/json; charset=utf-8")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_waits_for_retry_after_and_keeps_the_order() {
    let h = start().await;
    h.fake.script("C0BUSY", vec![Scripted::rate_limited(1)]);
    for i in 0..3 {
        h.send(h.text("C0BUSY", &format!("m{i}")), pb::WaitMode::Accepted)
            .await
            .unwrap();
    }
    h.fake
        .wait_for(Duration::from_secs(20), "3 messages posted", |r| {
            r.iter().filter(|x| x.ok).count() == 3
        })
        .await;
    let received = h.fake.received();
    assert_eq!(
        received
            .iter()
            .map(|r| (r.text(), r.status))
            .collect::<Vec<_>>(),
        [("m0", 429), ("m0", 200), ("m1", 200), ("m2", 200)],
        "the limited message was retried at the head of the line"
    );
    let waited = received[1].at.duration_since(received[0].at);
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After: 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_dm_opens_then_posts_and_returns_the_new_address() {
    let h = start().await;
    let r = h
        .client
        .clone()
        .send_proactive(pb::SendProactiveRequest {
            address: Some(h.address("")),
            messages: vec![
                pb::Message {
                    text: "Your **report** is ready".into(),
                    ..Default::default()
                },
                pb::Message {
                    text: "second".into(),
                    ..Default::default()
                },
            ],
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let new = r.address.unwrap();
    assert_eq!(new.conversation.as_ref().unwrap().id, "D0OPENED1");
    assert_eq!(new.bot.as_ref().unwrap().id, BOT);
    assert_eq!(r.results.len(), 2);
    for res in &r.results {
        assert_eq!(res.state, pb::DeliveryState::Delivered as i32);
        assert_eq!(res.receipts[0].conversation_id, "D0OPENED1");
    }

    let received = h.fake.received();
    assert_eq!(received[0].path, "/api/conversations.open");
    assert_eq!(received[0].body, serde_json::json!({"users": USER}));
    assert_eq!(
        received[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let posted: Vec<(&str, &str)> = received[1..]
        .iter()
        .map(|r| (r.channel(), r.text()))
        .collect();
    assert_eq!(
        posted,
        [
            ("D0OPENED1", "Your *report* is ready"),
            ("D0OPENED1", "second")
        ]
    );

    // The returned address is what the bot uses from now on.
    h.send(
        pb::Message {
            address: Some(Box::new(new)),
            text: "later".into(),
            ..Default::default()
        },
        pb::WaitMode::Delivered,
    )
    .await
    .unwrap();
    let last = h.fake.received().last().unwrap().clone();
    assert_eq!((last.channel(), last.text()), ("D0OPENED1", "later"));
    assert_eq!(
        h.fake
            .received()
            .iter()
            .filter(|r| r.path.ends_with("conversations.open"))
            .count(),
        1
    );
}

/// A message of 15 carousel cards (60 blocks): Slack takes it as two messages.
fn big_carousel(h: &Harness, channel: &str, tag: &str) -> pb::Message {
    let card = |i: usize| pb::Attachment {
        content: Some(pb::attachment::Content::Hero(pb::HeroCard {
            title: format!("{tag} item {i}"),
            images: vec![pb::CardImage {
                url: format!("https://images.example.com/{i}.png"),
                ..Default::default()
            }],
            buttons: vec![pb::CardAction {
                r#type: pb::ActionType::PostBack as i32,
                title: "Buy".into(),
                value: format!("buy:{i}"),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    pb::Message {
        address: Some(Box::new(h.address(channel))),
        text: tag.into(),
        attachment_layout: pb::AttachmentLayout::Carousel as i32,
        attachments: (0..15).map(card).collect(),
        ..Default::default()
    }
}

/// The first section's text of a posted message, or its first card title: which part it is.
fn label(r: &Received) -> String {
    let blocks = r.body["blocks"].as_array().cloned().unwrap_or_default();
    blocks
        .iter()
        .find(|b| b["type"] == "section")
        .and_then(|b| b["text"]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_messages_keep_their_order_across_concurrent_conversations() {
    let h = start().await;
    let channels: Vec<String> = (0..4).map(|c| format!("C0SPLIT{c}")).collect();
    for c in &channels {
        h.fake.set_latency(c, Duration::from_millis(5));
    }
    let mut tasks = Vec::new();
    for c in &channels {
        let msgs: Vec<pb::Message> = (0..3)
            .map(|i| big_carousel(&h, c, &format!("m{i}")))
            .collect();
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut warnings = Vec::new();
            for m in msgs {
                let r = client
                    .send(pb::SendRequest {
                        message: Some(m),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                warnings.extend(r.warnings.into_iter().map(|w| w.code));
            }
            warnings
        }));
    }
    for t in tasks {
        let warnings = t.await.unwrap();
        assert_eq!(warnings, ["message_split"; 3]);
    }
    h.fake
        .wait_for(Duration::from_secs(30), "6 parts in 4 channels", |r| {
            r.iter().filter(|x| x.ok).count() == 24
        })
        .await;
    for c in &channels {
        let posted = h.fake.posted(c);
        let labels: Vec<String> = posted.iter().map(label).collect();
        let mut expected = Vec::new();
        for i in 0..3 {
            expected.push(format!("m{i}"));
            expected.push(format!("*m{i} item 12*"));
        }
        assert_eq!(labels, expected, "{c}: parts out of order");
        for p in &posted {
            assert!(p.body["blocks"].as_array().unwrap().len() <= 50);
            assert!(!p.text().is_empty(), "every part carries a text fallback");
        }
        assert_eq!(
            h.fake.max_in_flight(c),
            1,
            "{c}: a part started before the previous was acknowledged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_typing_warns_and_sends_nothing() {
    let h = start().await;
    let r = h
        .client
        .clone()
        .send_typing(pb::SendTypingRequest {
            address: Some(h.address("C0TYPE")),
            keep_alive: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<&str> = r.warnings.iter().map(|w| w.code.as_str()).collect();
    assert_eq!(codes, ["typing_not_supported"]);
    assert!(r.warnings[0].message.contains("no typing indicator"));

    // A message after it is the only thing Slack sees.
    h.send(h.text("C0TYPE", "after"), pb::WaitMode::Delivered)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = h.fake.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0].text(), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_render_answer_for_slack_without_the_token() {
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
    assert_eq!(caps.implementation, "slack");
    assert!(caps.configured);
    assert!(!caps.typing, "Slack bots have no typing indicator");
    assert!(caps.carousel && caps.proactive && caps.update_delete);
    assert_eq!(caps.markdown_flavor, "mrkdwn");
    assert_eq!(caps.max_buttons_per_card, 25);
    assert_eq!(caps.max_text_length, 40_000);

    let mut m = h.text("C0RENDER", "Hello **there** & <you>");
    m.address.as_mut().unwrap().thread_id = "1712345678.000100".into();
    let r = h
        .client
        .clone()
        .render(pb::RenderRequest {
            change: None,
            message: Some(m),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requests.len(), 1);
    assert_eq!(r.requests[0].method, "POST");
    assert_eq!(
        r.requests[0].url,
        format!("{}/chat.postMessage", h.fake.base_url())
    );
    let body: Value = serde_json::from_str(&r.requests[0].body_json).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "channel": "C0RENDER",
            "text": "Hello *there* &amp; &lt;you&gt;",
            "thread_ts": "1712345678.000100"
        })
    );
    assert_no_token("Render", &format!("{r:?}"));

    // Without a conversation: the DM to open, then the message to its placeholder channel.
    let r = h
        .client
        .clone()
        .render(pb::RenderRequest {
            change: None,
            message: Some(h.text("", "hi")),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let urls: Vec<&str> = r.requests.iter().map(|q| q.url.as_str()).collect();
    assert_eq!(
        urls,
        [
            format!("{}/conversations.open", h.fake.base_url()),
            format!("{}/chat.postMessage", h.fake.base_url())
        ]
    );
    let post: Value = serde_json::from_str(&r.requests[1].body_json).unwrap();
    assert_eq!(post["channel"], "{conversationId}");
    assert_no_token("Render", &format!("{r:?}"));
    assert!(h.fake.received().is_empty(), "Render sent something");

    // A refusal of the token itself names the code, never the token.
    h.fake
        .script("C0AUTH", vec![Scripted::refuse("invalid_auth")]);
    let err = h
        .send(h.text("C0AUTH", "hi"), pb::WaitMode::Delivered)
        .await
        .unwrap_err();
    assert!(err.message().contains("invalid_auth"), "{}", err.message());
    assert_no_token("the error", &format!("{err:?}"));

    // A bot without a token is refused before anything is accepted.
    let mut m = h.text("C0RENDER", "hi");
    m.address.as_mut().unwrap().bot.as_mut().unwrap().id = "B0UNKNOWN".into();
    let err = h.send(m, pb::WaitMode::Accepted).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("channels.slack.workspaces"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_stay_in_the_thread_and_cards_arrive_as_blocks() {
    let h = start().await;
    let mut m = h.text("C0THREAD", "Pick one");
    m.address.as_mut().unwrap().thread_id = "1712345678.000100".into();
    m.suggested_actions = Some(pb::SuggestedActions {
        to: vec![],
        actions: vec![pb::CardAction {
            r#type: pb::ActionType::ImBack as i32,
            title: "Yes".into(),
            value: "yes".into(),
            ..Default::default()
        }],
    });
    h.send(m, pb::WaitMode::Delivered).await.unwrap();
    let r = h.fake.posted("C0THREAD");
    assert_eq!(r.len(), 1);
    let body = &r[0].body;
    assert_eq!(body["thread_ts"], "1712345678.000100");
    assert_eq!(body["text"], "Pick one");
    let types: Vec<&str> = body["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["section", "actions"]);
    let button = &body["blocks"][1]["elements"][0];
    assert_eq!(button["action_id"], "im_back:0:sa0");
    assert_eq!(button["value"], "yes");
}
