//! Bad input and hostile channel answers: absurd values are refused or bounded, never a panic;
//! errors, statuses and stored channel texts stay small; each RPC takes only what it needs.

mod common;

use std::time::Duration;

use channel_gateway::api::pb;
use common::*;
use serde_json::json;
use tonic::Code;

async fn send_delivered(h: &Harness, m: pb::Message) -> Result<pb::SendResponse, tonic::Status> {
    let mut client = h.client.clone();
    let call = client.send(pb::SendRequest {
        message: Some(m),
        wait: pb::WaitMode::Delivered as i32,
        ..Default::default()
    });
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the message reached a final state (it was not stranded)")
        .map(|r| r.into_inner())
}

/// A SendProactive the gateway refuses, and why.
async fn proactive_refused(
    h: &Harness,
    address: pb::Address,
    messages: Vec<pb::Message>,
    options: pb::ProactiveOptions,
) -> tonic::Status {
    h.client
        .clone()
        .send_proactive(pb::SendProactiveRequest {
            address: Some(address),
            messages,
            options: Some(options),
            ..Default::default()
        })
        .await
        .expect_err("refused")
}

/// A Send of `m` the gateway refuses, and why.
async fn refused(h: &Harness, m: pb::Message) -> tonic::Status {
    h.client
        .clone()
        .send(pb::SendRequest {
            message: Some(m),
            ..Default::default()
        })
        .await
        .expect_err("refused")
}

/// ListFailed's first page once it lists `n` messages: a final state is recorded without
/// waiting for the disk, so it may be listed a moment after the caller heard of it.
async fn listed_failed(h: &Harness, n: usize) -> Vec<pb::Delivery> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = h
            .client
            .clone()
            .list_failed(pb::ListFailedRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("a page a default client can read")
            .into_inner();
        if page.deliveries.len() >= n || std::time::Instant::now() > deadline {
            assert_eq!(page.deliveries.len(), n);
            return page.deliveries;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typing_keep_alive_past_its_maximum_is_refused_and_the_conversation_goes_on() {
    let h = start().await;
    let mut client = h.client.clone();
    let err = client
        .send_typing(pb::SendTypingRequest {
            address: Some(h.address("typing")),
            keep_alive: Some(prost_types::Duration {
                seconds: i64::MAX,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(bad_fields(&err), ["keep_alive"]);
    client
        .send_typing(pb::SendTypingRequest {
            address: Some(h.address("typing")),
            keep_alive: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        })
        .await
        .expect("the documented maximum is accepted");
    let r = send_delivered(&h, h.text("typing", "after")).await.unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_answering_a_huge_lifetime_does_not_strand_the_message() {
    let h = start().await;
    *h.fake.state.token_expires_in.lock().unwrap() = u64::MAX;
    let r = send_delivered(&h, h.text("huge-token", "one"))
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    let r = send_delivered(&h, h.text("huge-token", "two"))
        .await
        .unwrap();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(h.fake.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_idempotency_key_is_refused_naming_the_field() {
    let h = start().await;
    let call = |key: String| {
        let mut client = h.client.clone();
        let m = h.text("keys", "k");
        async move {
            let key = key;
            client
                .send(pb::SendRequest {
                    message: Some(m),
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
        }
    };
    let err = call("k".repeat(257)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["idempotency_key"]);
    call("k".repeat(256)).await.expect("256 bytes are enough");
    let err = h
        .client
        .clone()
        .send_batch(pb::SendBatchRequest {
            messages: vec![h.text("keys", "b")],
            idempotency_key: "k".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["idempotency_key"]);
    assert!(err.message().len() < 1024, "{} bytes", err.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_lists_a_bounded_number_of_violations_and_says_how_many_more() {
    let h = start().await;
    let mut m = h.text("many", "x");
    m.attachments = vec![pb::Attachment::default(); 100_000];
    let err = refused(&h, m).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let fields = bad_fields(&err);
    assert!(fields.len() <= 21, "{} violations", fields.len());
    assert!(
        fields[0].starts_with("message.attachments[0]"),
        "{fields:?}"
    );
    assert!(
        err.message().contains("more violations"),
        "{}",
        err.message()
    );
    assert!(
        err.message().len() < 16 << 10,
        "{} bytes of status message",
        err.message().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channels_huge_error_text_and_native_id_are_capped_where_kept_and_echoed() {
    let h = start().await;
    h.fake.script(
        "huge-error",
        vec![Scripted {
            status: 400,
            body: json!({"error": {"code": "BadArgument", "message": "e".repeat(3 << 20)}}),
            retry_after: None,
        }],
    );
    let err = send_delivered(&h, h.text("huge-error", "x"))
        .await
        .unwrap_err();
    assert!(
        err.message().len() < 4 << 10,
        "{} bytes of status message",
        err.message().len()
    );
    assert!(
        err.message().contains("more characters"),
        "{}",
        err.message()
    );

    h.fake.script(
        "huge-id",
        vec![Scripted {
            status: 200,
            body: json!({"id": "i".repeat(3 << 20)}),
            retry_after: None,
        }],
    );
    let r = send_delivered(&h, h.text("huge-id", "x")).await.unwrap();
    let result = r;
    assert_eq!(result.state, pb::DeliveryState::Delivered as i32);
    // Not a cut id that looks real and names nothing: no id.
    let id = &result.receipts[0].native_id;
    assert!(id.is_empty(), "{} bytes of native id", id.len());
    let stored = delivery(&mut h.client.clone(), &result.message_id).await;
    assert!(stored.receipts[0].native_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_takes_only_what_it_needs_and_echoes_little() {
    let h = start().await;
    // An id of 1 MiB: over GetDelivery's own limit, refused at its prefix, not echoed.
    let err = h
        .client
        .clone()
        .get_delivery(pb::GetDeliveryRequest {
            message_id: "1".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("this RPC takes at most"),
        "{}",
        err.message()
    );
    assert!(err.message().len() < 1024);
    // A page token within the limit but not a token: its echo is capped.
    let err = h
        .client
        .clone()
        .list_failed(pb::ListFailedRequest {
            page_token: "p".repeat(60_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["page_token"]);
    assert!(err.message().len() < 1024, "{}", err.message().len());
    // A Send of 2 MiB is refused before it is read whole, naming the setting.
    let err = refused(&h, h.text("big", &"x".repeat(2 << 20))).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("server.max_message_bytes"),
        "{}",
        err.message()
    );
    // Under that, the per-message check still names the message.
    let err = refused(&h, h.text("big", &"x".repeat(300_000))).await;
    assert_eq!(bad_fields(&err), ["message"]);
    // The gateway still serves.
    h.send("big", "small").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_proactive_options_are_bounded() {
    let h = start().await;
    let mut m = h.text(&"c".repeat(100_000), "x");
    m.address.as_mut().unwrap().user.as_mut().unwrap().id = "u".repeat(2000);
    let err = refused(&h, m).await;
    names(
        &err,
        &["message.address.conversation.id", "message.address.user.id"],
    );

    let mut address = h.address("unused");
    address.conversation = None;
    let err = proactive_refused(
        &h,
        address,
        (0..100)
            .map(|i| pb::Message {
                text: format!("m{i}"),
                ..Default::default()
            })
            .collect(),
        pb::ProactiveOptions {
            topic_name: "t".repeat(2 << 20),
            members: vec![pb::Identity::default(); 101],
            ..Default::default()
        },
    )
    .await;
    names(&err, &["options"]);
    let err = proactive_refused(
        &h,
        h.address("unused"),
        vec![pb::Message {
            text: "m".into(),
            ..Default::default()
        }],
        pb::ProactiveOptions {
            topic_name: "t".repeat(1025),
            members: vec![pb::Identity::default(); 101],
            ..Default::default()
        },
    )
    .await;
    names(&err, &["options.topic_name", "options.members"]);
    // A member's field is named at the index the caller wrote, empty members included.
    let long = pb::Identity {
        id: "m".repeat(2000),
        ..Default::default()
    };
    let err = proactive_refused(
        &h,
        h.address("unused"),
        vec![pb::Message {
            text: "m".into(),
            ..Default::default()
        }],
        pb::ProactiveOptions {
            members: vec![pb::Identity::default(), pb::Identity::default(), long],
            ..Default::default()
        },
    )
    .await;
    names(&err, &["options.members[2].id"]);
}

/// `err` is INVALID_ARGUMENT and names each of `fields`.
fn names(err: &tonic::Status, fields: &[&str]) {
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let named = bad_fields(err);
    for f in fields {
        assert!(named.iter().any(|n| n == f), "{f} not in {named:?}");
    }
}

/// A struct nested deeper than the decoder allows is the caller's error, not an internal one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_struct_nested_too_deep_is_invalid_argument() {
    let h = start().await;
    let mut value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("leaf".into())),
    };
    for _ in 0..200 {
        value = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![value],
                },
            )),
        };
    }
    let mut m = h.text("deep", "x");
    m.value = Some(value);
    let err = refused(&h, m).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("recursion"), "{}", err.message());
    h.send("deep", "fine").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redeliver_naming_an_id_twice_delivers_it_once() {
    let h = start().await;
    h.fake.script(
        "again",
        vec![Scripted {
            status: 400,
            body: json!({"error": {"code": "BadArgument", "message": "no"}}),
            retry_after: None,
        }],
    );
    let err = send_delivered(&h, h.text("again", "once"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let failed = listed_failed(&h, 1).await;
    let id = failed[0].message_id.clone();
    let r = h
        .client
        .clone()
        .redeliver(pb::RedeliverRequest {
            message_ids: vec![id.clone(), id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message_ids, [id]);
    h.fake
        .wait_for(Duration::from_secs(10), "the redelivery", |r| {
            r.iter().any(|x| x.conversation == "again")
        })
        .await;
    h.send("again", "after").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "the next message", |r| {
            r.iter().any(|x| x.text() == "after")
        })
        .await;
    assert_eq!(h.fake.texts("again"), ["once", "after"]);
}

/// Failed messages whose channel answered megabytes of error text: ListFailed stays readable
/// by a client with gRPC's default 4 MiB limit (each error is capped where it is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_failed_stays_within_the_default_message_size() {
    let h = start().await;
    let n = 3;
    h.fake.script(
        "large",
        (0..n)
            .map(|_| Scripted {
                status: 400,
                body: json!({"error": {"code": "BadArgument", "message": "e".repeat(3 << 20)}}),
                retry_after: None,
            })
            .collect(),
    );
    for i in 0..n {
        let err = send_delivered(&h, h.text("large", &format!("m{i}")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{i}");
    }
    let deliveries = listed_failed(&h, n).await;
    for d in &deliveries {
        let e = d.error.as_ref().unwrap();
        assert!(e.message.len() < 4 << 10, "{} bytes", e.message.len());
        assert_eq!(e.code, "BadArgument");
    }
}
