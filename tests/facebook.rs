//! The Facebook Messenger channel end to end: a real gRPC client, the real gateway, and a fake
//! Graph API on 127.0.0.1. Ordering across split text, carousels and typing; typing alone in
//! its requests; permanent and retryable Graph errors; where the page token may and may not go.

#[path = "facebook_support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::Code;

use channel_gateway::api::pb;
use support::*;

const GENEROUS: Duration = Duration::from_secs(60);

fn send_req(m: pb::Message, wait: pb::WaitMode) -> pb::SendRequest {
    pb::SendRequest {
        message: Some(m),
        wait: wait as i32,
        ..Default::default()
    }
}

fn typing_msg(psid: &str) -> pb::Message {
    pb::Message {
        r#type: pb::MessageType::Typing as i32,
        address: Some(Box::new(address(psid))),
        ..Default::default()
    }
}

/// About 4,300 characters of sentences: three Messenger messages.
fn long_text() -> String {
    (0..60)
        .map(|i| {
            format!("Sentence {i} of a long answer that Messenger cannot take in one message.")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

enum Step {
    Typing,
    Message(Box<pb::Message>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_is_kept_across_split_text_carousels_and_typing_in_concurrent_conversations() {
    let h = start().await;
    h.fake.set_jitter(Duration::from_millis(3));
    let psids: Vec<String> = (0..6).map(|c| format!("psid-order-{c}")).collect();
    let steps = |psid: &str| {
        vec![
            Step::Typing,
            Step::Message(Box::new(text(psid, "start"))),
            Step::Message(Box::new(text(psid, &long_text()))),
            Step::Message(Box::new(carousel(psid, 12, 4))),
            Step::Typing,
            Step::Message(Box::new(text(psid, "end"))),
        ]
    };

    // What each conversation must receive: the Render of each step, in the order sent.
    let mut expected = Vec::new();
    for psid in &psids {
        let mut bodies = Vec::new();
        for step in steps(psid) {
            let m = match step {
                Step::Typing => typing_msg(psid),
                Step::Message(m) => *m,
            };
            bodies.extend(rendered_bodies(&h.client, m).await);
        }
        expected.push(bodies);
    }
    assert_eq!(
        expected[0].len(),
        1 + 1 + 3 + (1 + 10 + 1 + 2) + 1 + 1,
        "typing, start, 3 text pieces, carousels of 10 and 2 each with 1 button template per card, typing, end"
    );
    assert!(h.fake.received().is_empty(), "Render sent something");

    let mut tasks = Vec::new();
    for psid in psids.clone() {
        let mut client = h.client.clone();
        let steps = steps(&psid);
        tasks.push(tokio::spawn(async move {
            for step in steps {
                match step {
                    Step::Typing => {
                        client
                            .send_typing(pb::SendTypingRequest {
                                address: Some(address(&psid)),
                                keep_alive: None,
                            })
                            .await
                            .unwrap();
                    }
                    Step::Message(m) => {
                        client
                            .send(send_req(*m, pb::WaitMode::Accepted))
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    h.fake
        .wait_for(GENEROUS, "every request of every conversation", |r| {
            r.iter().filter(|x| x.ok()).count() >= total
        })
        .await;
    for (psid, want) in psids.iter().zip(&expected) {
        let got: Vec<Value> = h.fake.delivered(psid).into_iter().map(|r| r.body).collect();
        assert_eq!(got.len(), want.len(), "{psid}: count");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g, w, "{psid}: request {i} out of order or not as rendered");
        }
        assert_eq!(
            h.fake.max_in_flight(psid),
            1,
            "{psid}: a request started before the previous one was answered"
        );
    }
    assert_eq!(
        h.fake.received().len(),
        total,
        "nothing refused, nothing extra"
    );
    h.fake.assert_no_state_with_message();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_a_request_of_its_own() {
    let h = start().await;
    let psid = "psid-typing";
    let mut c = h.client.clone();
    let typing = |keep_alive| pb::SendTypingRequest {
        address: Some(address(psid)),
        keep_alive,
    };
    c.send_typing(typing(None)).await.unwrap();
    c.send(send_req(text(psid, "a"), pb::WaitMode::Accepted))
        .await
        .unwrap();
    c.send_typing(typing(Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    })))
    .await
    .unwrap();
    let mut with_replies = text(psid, "b");
    with_replies.suggested_actions = Some(pb::SuggestedActions {
        actions: vec![action(pb::ActionType::ImBack, "Yes", "yes")],
        ..Default::default()
    });
    c.send(send_req(with_replies, pb::WaitMode::Delivered))
        .await
        .unwrap();
    let got = h.fake.for_psid(psid);
    let labels: Vec<String> = got.iter().map(|r| r.label()).collect();
    assert_eq!(labels, ["typing_on", "text:a", "typing_on", "text:b"]);
    assert!(
        got.iter().all(|r| r.ok()),
        "Graph refused something: {got:?}"
    );
    for r in &got {
        let keys: HashSet<&str> = r
            .body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        if r.label() == "typing_on" {
            assert_eq!(
                keys,
                HashSet::from(["recipient", "sender_action"]),
                "{}",
                r.body
            );
        } else {
            assert!(!keys.contains("sender_action"), "{}", r.body);
        }
    }
    assert_eq!(got[3].body["message"]["quick_replies"][0]["payload"], "yes");
    h.fake.assert_no_state_with_message();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_fails_only_that_message() {
    let h = start().await;
    let psid = "psid-gone";
    let mut c = h.client.clone();
    h.fake.script(
        psid,
        vec![Some(graph_error(
            400,
            100,
            Some(2018001),
            "(#100) No matching user found",
        ))],
    );
    let err = c
        .send(send_req(text(psid, "first"), pb::WaitMode::Delivered))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("No matching user found"),
        "{}",
        err.message()
    );
    let info = error_info(&err);
    assert_eq!(
        info.get("channel_code").map(String::as_str),
        Some("100/2018001")
    );
    assert_eq!(info.get("channel").map(String::as_str), Some("facebook"));
    assert_eq!(info.get("permanent").map(String::as_str), Some("true"));
    assert_eq!(info.get("attempts").map(String::as_str), Some("1"));

    let ok = c
        .send(send_req(text(psid, "second"), pb::WaitMode::Delivered))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(ok.receipts.len(), 1);
    assert!(ok.receipts[0].native_id.starts_with("m_fake"), "{ok:?}");
    assert_eq!(ok.receipts[0].conversation_id, psid);

    // In a batch, the failed message is reported and the next one still goes.
    h.fake.script(
        psid,
        vec![
            None,
            Some(graph_error(
                400,
                551,
                None,
                "(#551) This person isn't available right now.",
            )),
        ],
    );
    let batch = c
        .send_batch(pb::SendBatchRequest {
            messages: vec![text(psid, "b1"), text(psid, "b2"), text(psid, "b3")],
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let states: Vec<i32> = batch.results.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        [
            pb::DeliveryState::Delivered as i32,
            pb::DeliveryState::Failed as i32,
            pb::DeliveryState::Delivered as i32
        ]
    );
    let e = batch.results[1].error.as_ref().unwrap();
    assert_eq!(
        (e.code.as_str(), e.permanent, e.http_status),
        ("551", true, 400)
    );
    assert_eq!(e.channel, "facebook");

    let calls: Vec<(String, u16)> = h
        .fake
        .for_psid(psid)
        .iter()
        .map(|r| (r.label(), r.status))
        .collect();
    let want: Vec<(String, u16)> = [
        ("text:first", 400),
        ("text:second", 200),
        ("text:b1", 200),
        ("text:b2", 400),
        ("text:b3", 200),
    ]
    .into_iter()
    .map(|(l, s)| (l.to_string(), s))
    .collect();
    assert_eq!(calls, want, "a permanent error is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_in_place_then_delivered_in_order() {
    let h = start().await;
    let psid = "psid-busy";
    let mut c = h.client.clone();
    h.fake.script(
        psid,
        vec![
            Some(graph_error(
                400,
                613,
                None,
                "(#613) Calls to this api have exceeded the rate limit.",
            )),
            Some(graph_error(
                500,
                1200,
                None,
                "Temporary send message failure. Please try again later",
            )),
            Some(Scripted {
                status: 500,
                body: json!("internal error"),
            }),
        ],
    );
    for t in ["m1", "m2", "m3"] {
        c.send(send_req(text(psid, t), pb::WaitMode::Accepted))
            .await
            .unwrap();
    }
    let last = c
        .send(send_req(text(psid, "m4"), pb::WaitMode::Delivered))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.state, pb::DeliveryState::Delivered as i32);
    let calls: Vec<(String, u16)> = h
        .fake
        .for_psid(psid)
        .iter()
        .map(|r| (r.label(), r.status))
        .collect();
    let want: Vec<(String, u16)> = [
        ("text:m1", 400),
        ("text:m1", 500),
        ("text:m1", 500),
        ("text:m1", 200),
        ("text:m2", 200),
        ("text:m3", 200),
        ("text:m4", 200),
    ]
    .into_iter()
    .map(|(l, s)| (l.to_string(), s))
    .collect();
    assert_eq!(
        calls, want,
        "retried at the head of the line, nothing overtook m1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_token_goes_only_on_the_wire() {
    let h = start().await;
    let mut c = h.client.clone();
    let secrets = [
        TOKEN,
        PROOF,
        APP_SECRET,
        TOKEN2,
        "what+do+ya",
        "access_token",
    ];
    let leaks = |what: &str, s: &str| {
        for secret in secrets {
            assert!(!s.contains(secret), "{what} contains `{secret}`: {s}");
        }
    };

    let ok = c
        .send(send_req(text("psid-t1", "hello"), pb::WaitMode::Delivered))
        .await
        .unwrap()
        .into_inner();
    leaks("a Send response", &format!("{ok:?}"));
    let mut other_page = text("psid-t2", "hello");
    other_page.address = Some(Box::new(address_as(PAGE2, "psid-t2")));
    c.send(send_req(other_page, pb::WaitMode::Delivered))
        .await
        .unwrap();

    let first = &h.fake.for_psid("psid-t1")[0];
    assert_eq!(first.path, "/v25.0/me/messages");
    assert_eq!(
        first.query.get("access_token").map(String::as_str),
        Some(TOKEN)
    );
    assert_eq!(
        first.query.get("appsecret_proof").map(String::as_str),
        Some(PROOF),
        "appsecret_proof is HMAC-SHA256(token, key = app secret) in hex"
    );
    let second = &h.fake.for_psid("psid-t2")[0];
    assert_eq!(
        second.query.get("access_token").map(String::as_str),
        Some(TOKEN2)
    );
    assert!(
        !second.query.contains_key("appsecret_proof"),
        "no app secret, no proof"
    );

    let r = c
        .render(pb::RenderRequest {
            change: None,
            message: Some(text("psid-t1", "hello")),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    leaks("Render output", &format!("{r:?}"));

    // Graph echoing the token in its error text: the caller never sees it.
    h.fake.script(
        "psid-t1",
        vec![Some(graph_error(
            400,
            190,
            None,
            &format!("Invalid OAuth access token - Cannot parse access token: {TOKEN}"),
        ))],
    );
    let err = c
        .send(send_req(text("psid-t1", "again"), pb::WaitMode::Delivered))
        .await
        .unwrap_err();
    assert_eq!(
        error_info(&err).get("channel_code").map(String::as_str),
        Some("190")
    );
    let shown = format!("{err:?} {}", err.message());
    leaks("a Graph error", &shown);
    assert!(err.message().contains("<redacted>"), "{}", err.message());

    // A transport failure (nothing listens there): its error must not name the URL either.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h2 = start_with(|cfg| {
        cfg.channels.facebook.graph_base_url = format!("http://127.0.0.1:{port}");
        cfg.delivery.max_attempts = 1;
    })
    .await;
    let err = h2
        .client
        .clone()
        .send(send_req(text("psid-t3", "hello"), pb::WaitMode::Delivered))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert_eq!(
        error_info(&err).get("permanent").map(String::as_str),
        Some("false")
    );
    leaks("a transport error", &format!("{err:?} {}", err.message()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proactive_start_needs_no_conversation_creation() {
    let h = start().await;
    let psid = "psid-proactive";
    let mut bare = address(psid);
    bare.conversation = None;
    let r = h
        .client
        .clone()
        .send_proactive(pb::SendProactiveRequest {
            address: Some(bare),
            messages: vec![pb::Message {
                text: "Your password was changed.".into(),
                ..Default::default()
            }],
            options: Some(pb::ProactiveOptions {
                message_tag: "ACCOUNT_UPDATE".into(),
                ..Default::default()
            }),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let conv = r.address.as_ref().and_then(|a| a.conversation.as_ref());
    assert_eq!(
        conv.map(|c| c.id.as_str()),
        Some(psid),
        "the PSID is the conversation"
    );
    assert_eq!(r.results[0].state, pb::DeliveryState::Delivered as i32);
    h.client
        .clone()
        .send(send_req(
            pb::Message {
                address: r.address.clone().map(Box::new),
                text: "Reply".into(),
                ..Default::default()
            },
            pb::WaitMode::Delivered,
        ))
        .await
        .unwrap();
    let got = h.fake.received();
    assert_eq!(got.len(), 2, "no other Graph call: {got:?}");
    assert_eq!(got[0].body["messaging_type"], "MESSAGE_TAG");
    assert_eq!(got[0].body["tag"], "ACCOUNT_UPDATE");
    assert_eq!(got[1].body["messaging_type"], "RESPONSE");
    assert!(got[1].body.get("tag").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_render_answer_for_facebook() {
    let h = start().await;
    let mut c = h.client.clone();
    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "facebook".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert_eq!(caps.implementation, "facebook");
    assert!(caps.configured && caps.typing && caps.carousel && caps.proactive);
    assert!(!caps.update_delete);
    assert_eq!(
        (
            caps.max_buttons_per_card,
            caps.max_suggested_actions,
            caps.max_text_length
        ),
        (3, 13, 2000)
    );
    assert_eq!(caps.markdown_flavor, "plain");
    assert_eq!(caps.typing_interval.map(|d| d.seconds), Some(15));

    let mut m = text("psid-render", "**Hello** [docs](https://example.com)");
    m.text_format = pb::TextFormat::Markdown as i32;
    let r = c
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
        format!("{}/v25.0/me/messages", h.fake.base_url())
    );
    let body: Value = serde_json::from_str(&r.requests[0].body_json).unwrap();
    assert_eq!(
        body,
        json!({
            "recipient": {"id": "psid-render"},
            "messaging_type": "RESPONSE",
            "message": {"text": "Hello docs (https://example.com)"}
        })
    );
    assert_eq!(r.warnings[0].code, "text_format_converted");

    // Without a conversation, Render shows the proactive send: no creation call, a tag.
    let mut bare = text("psid-render", "Tagged");
    bare.address.as_mut().unwrap().conversation = None;
    let r = c
        .render(pb::RenderRequest {
            message: Some(bare),
            options: Some(pb::ProactiveOptions {
                message_tag: "POST_PURCHASE_UPDATE".into(),
                ..Default::default()
            }),
            change: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requests.len(), 1);
    let body: Value = serde_json::from_str(&r.requests[0].body_json).unwrap();
    assert_eq!(body["messaging_type"], "MESSAGE_TAG");
    assert_eq!(body["tag"], "POST_PURCHASE_UPDATE");

    // A render error names the field as the caller wrote it.
    let mut big = text("psid-render", "x");
    big.suggested_actions = Some(pb::SuggestedActions {
        actions: vec![action(pb::ActionType::PostBack, "Big", &"p".repeat(1001))],
        ..Default::default()
    });
    let err = c
        .send(send_req(big, pb::WaitMode::Accepted))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = err
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["message.suggested_actions.actions[0].value"]);

    // A page without a token is not configured.
    let err = c
        .send(send_req(
            pb::Message {
                address: Some(Box::new(address_as("999", "psid-render"))),
                text: "x".into(),
                ..Default::default()
            },
            pb::WaitMode::Accepted,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        h.fake.received().is_empty(),
        "Render or a refused Send reached Graph"
    );
}
