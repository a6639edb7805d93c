//! Receiving from the Bot Framework end to end: the test plays the Bot Connector's token issuer
//! (OpenID metadata → JWKS, with the test-only RSA keys of tests/inbound/botframework) and posts
//! activities to a real gateway's `/api/messages` with a signed `Authorization: Bearer` JWT, as the
//! Connector does. Valid ones reach the Receive stream and their address replies to the same
//! conversation, as a reply to the incoming activity; every kind of bad token stores nothing.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use channel_gateway::api::pb;
use common::*;

const KEY_A: &[u8] = include_bytes!("inbound/botframework/TEST_ONLY_rsa_a.der");
const KEY_B: &[u8] = include_bytes!("inbound/botframework/TEST_ONLY_rsa_b.der");
const ISSUER: &str = "https://api.botframework.com";

/// The public half of `der` as the Connector's key document lists it.
fn jwk(der: &[u8], kid: &str, endorsements: &[&str]) -> Value {
    let key = EncodingKey::from_rsa_der(der);
    let mut v = serde_json::to_value(
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap(),
    )
    .unwrap();
    v["kid"] = json!(kid);
    v["use"] = json!("sig");
    v["endorsements"] = json!(endorsements);
    v
}

/// Serves `/openid` and `/keys` (key `a`, endorsed for msteams only) on 127.0.0.1.
async fn issuer() -> String {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let keys = json!({ "keys": [jwk(KEY_A, "key-a", &["msteams"])] });
    let b = base.clone();
    let app = axum::Router::new()
        .route(
            "/openid",
            get(move || async move {
                axum::Json(json!({
                    "issuer": ISSUER,
                    "jwks_uri": format!("{b}/keys"),
                    "id_token_signing_alg_values_supported": ["RS256"],
                }))
            }),
        )
        .route(
            "/keys",
            get(move || async move { axum::Json(keys.clone()) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: &Value, der: &[u8]) -> String {
    let header = Header {
        kid: Some("key-a".into()),
        ..Header::new(Algorithm::RS256)
    };
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(der)).unwrap()
}

fn claims(service_url: &str) -> Value {
    json!({
        "serviceurl": service_url,
        "nbf": now() - 60,
        "exp": now() + 3600,
        "iss": ISSUER,
        "aud": BOT,
    })
}

fn activity(id: &str, channel: &str, service_url: &str, conv: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "message",
        "id": id,
        "timestamp": "2026-12-05T10:00:00.000Z",
        "channelId": channel,
        "serviceUrl": service_url,
        "from": {"id": "29:user-ann", "name": "Ann"},
        "recipient": {"id": format!("28:{BOT}"), "name": "Bot"},
        "conversation": {"id": conv},
        "text": text,
    }))
    .unwrap()
}

async fn post(h: &Harness, bearer: Option<&str>, body: Vec<u8>) -> u16 {
    let mut r = reqwest::Client::new()
        .post(format!(
            "http://{}/api/messages",
            h.gateway.inbound_addr.expect("webhook listener")
        ))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = bearer {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    r.send().await.unwrap().status().as_u16()
}

async fn subscribe(
    h: &Harness,
) -> (
    mpsc::Sender<pb::ReceiveRequest>,
    tonic::Streaming<pb::ReceiveResponse>,
) {
    let (tx, input) = mpsc::channel(16);
    tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Subscribe(Default::default())),
    })
    .await
    .unwrap();
    let mut rx = h
        .client
        .clone()
        .receive(ReceiverStream::new(input))
        .await
        .unwrap()
        .into_inner();
    let first = rx.message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(pb::receive_response::Kind::Subscribed(_))
    ));
    (tx, rx)
}

async fn next_event(
    rx: &mut tonic::Streaming<pb::ReceiveResponse>,
    within: Duration,
) -> Option<pb::ReceivedEvent> {
    match tokio::time::timeout(within, rx.message()).await {
        Ok(Ok(Some(pb::ReceiveResponse {
            kind: Some(pb::receive_response::Kind::Event(e)),
        }))) => Some(e),
        Ok(other) => panic!("{other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_activity_arrives_and_its_address_replies_to_it_in_its_conversation() {
    let issuer = issuer().await;
    let h = start_with(|c| {
        c.channels.botframework.openid_metadata_url = format!("{issuer}/openid");
    })
    .await;
    let service_url = h.fake.service_url();
    let (tx, mut rx) = subscribe(&h).await;
    let jwt = token(&claims(&service_url), KEY_A);
    assert_eq!(
        post(
            &h,
            Some(&jwt),
            activity("act-1", "msteams", &service_url, "a:conv-1", "hi bot")
        )
        .await,
        200
    );
    let e = next_event(&mut rx, Duration::from_secs(10))
        .await
        .expect("the activity");
    let m = e.message.clone().unwrap();
    assert_eq!(m.text, "hi bot");
    let a = m.address.clone().unwrap();
    assert_eq!(a.channel_id, "msteams");
    assert_eq!(a.user.as_ref().unwrap().id, "29:user-ann");
    assert_eq!(
        a.bot.as_ref().unwrap().id,
        BOT,
        "the bot id selects the credentials to reply with"
    );
    assert_eq!(a.id, "act-1");
    assert_eq!(a.service_url, service_url);
    // The reply: the address unchanged.
    let sent = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(pb::Message {
                address: Some(a),
                text: "hello Ann".into(),
                ..Default::default()
            }),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .expect("reply sent")
        .into_inner();
    assert_eq!(sent.state, pb::DeliveryState::Delivered as i32);
    let got = h.fake.for_conversation("a:conv-1");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].text(), "hello Ann");
    assert_eq!(
        got[0].reply_to.as_deref(),
        Some("act-1"),
        "a reply to the incoming activity"
    );
    tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
            event_ids: vec![e.event_id],
        })),
    })
    .await
    .unwrap();
    // The Connector retrying the same activity: answered, not delivered again.
    assert_eq!(
        post(
            &h,
            Some(&jwt),
            activity("act-1", "msteams", &service_url, "a:conv-1", "hi bot")
        )
        .await,
        200
    );
    assert!(
        next_event(&mut rx, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_and_nothing_is_stored() {
    let issuer = issuer().await;
    let h = start_with(|c| {
        c.channels.botframework.openid_metadata_url = format!("{issuer}/openid");
    })
    .await;
    let su = h.fake.service_url();
    let (_tx, mut rx) = subscribe(&h).await;
    let body = || activity("act-x", "msteams", &su, "a:bad", "naïve — forged ☕");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(&su);
        f(&mut c);
        token(&c, KEY_A)
    };
    let cases: Vec<(&str, Option<String>, Vec<u8>)> = vec![
        (
            "wrong audience",
            Some(with(&|c| c["aud"] = json!("another-bot"))),
            body(),
        ),
        (
            "issuer not trusted",
            Some(with(&|c| c["iss"] = json!("https://evil.example"))),
            body(),
        ),
        (
            "expired",
            Some(with(&|c| c["exp"] = json!(now() - 600))),
            body(),
        ),
        (
            "signed by another key",
            Some(token(&claims(&su), KEY_B)),
            body(),
        ),
        (
            "serviceUrl differs from the claim",
            Some(token(&claims("https://other.example/"), KEY_A)),
            body(),
        ),
        // The key is endorsed for msteams only.
        (
            "unendorsed channel",
            Some(token(&claims(&su), KEY_A)),
            activity("act-x", "skype", &su, "a:bad", "x"),
        ),
        ("no token", None, body()),
        ("not a JWT", Some("abc.def".into()), body()),
    ];
    for (what, bearer, body) in cases {
        assert_eq!(post(&h, bearer.as_deref(), body).await, 401, "{what}");
    }
    // A body changed after the token was issued still carries a valid token: what the token binds
    // (channel id, service URL) is what is checked, and the changed text arrives as sent.
    assert!(
        next_event(&mut rx, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing refused was stored"
    );
    let good = token(&claims(&su), KEY_A);
    assert_eq!(post(&h, Some(&good), body()).await, 200);
    let e = next_event(&mut rx, Duration::from_secs(10))
        .await
        .expect("the valid one");
    assert_eq!(e.message.unwrap().text, "naïve — forged ☕");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_is_answered_with_the_bots_status_and_body() {
    let issuer = issuer().await;
    let h = start_with(|c| {
        c.channels.botframework.openid_metadata_url = format!("{issuer}/openid");
    })
    .await;
    let su = h.fake.service_url();
    let (tx, mut rx) = subscribe(&h).await;
    let mut invoke: Value =
        serde_json::from_slice(&activity("inv-1", "msteams", &su, "a:conv-2", "")).unwrap();
    invoke["type"] = json!("invoke");
    invoke["name"] = json!("adaptiveCard/action");
    invoke["value"] = json!({"action": {"type": "Action.Execute", "verb": "approve"}});
    let jwt = token(&claims(&su), KEY_A);
    let post = {
        let h = &h;
        let body = serde_json::to_vec(&invoke).unwrap();
        async move {
            reqwest::Client::new()
                .post(format!(
                    "http://{}/api/messages",
                    h.gateway.inbound_addr.unwrap()
                ))
                .header("authorization", format!("Bearer {jwt}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let bot = async {
        let e = next_event(&mut rx, Duration::from_secs(10))
            .await
            .expect("the invoke");
        assert_eq!(
            e.message.as_ref().unwrap().r#type,
            pb::MessageType::Invoke as i32
        );
        assert!(e.reply_by.is_some(), "the Connector waits for the answer");
        tx.send(pb::ReceiveRequest {
            kind: Some(pb::receive_request::Kind::Respond(pb::ReceiveRespond {
                event_id: e.event_id.clone(),
                message: None,
                body: Some(channel_gateway::api::convert::json_to_value(&json!({
                    "statusCode": 200,
                    "type": "application/vnd.microsoft.activity.message",
                    "value": "Approved"
                }))),
                status: 200,
            })),
        })
        .await
        .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
            Ok(Ok(Some(pb::ReceiveResponse {
                kind: Some(pb::receive_response::Kind::Responded(r)),
            }))) => assert!(r.in_time, "{r:?}"),
            other => panic!("{other:?}"),
        }
    };
    let (answer, ()) = tokio::join!(post, bot);
    assert_eq!(answer.status().as_u16(), 200);
    let v: Value = answer.json().await.unwrap();
    assert_eq!(v["value"], "Approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_url_the_connector_vouched_for_may_receive_the_bots_replies() {
    let issuer = issuer().await;
    let h = start_with(|c| {
        c.channels.botframework.openid_metadata_url = format!("{issuer}/openid");
        // Only Microsoft's hosts: the fake's 127.0.0.1 is not on the allow-list.
        c.channels.botframework.allowed_service_hosts =
            channel_gateway::config::BotFrameworkConfig::default().allowed_service_hosts;
    })
    .await;
    let su = h.fake.service_url();
    let send = |text: &str| {
        let mut client = h.client.clone();
        let message = pb::Message {
            address: Some(Box::new(h.address("a:trusted"))),
            text: text.into(),
            ..Default::default()
        };
        async move {
            client
                .send(pb::SendRequest {
                    message: Some(message),
                    wait: pb::WaitMode::Delivered as i32,
                    ..Default::default()
                })
                .await
        }
    };
    let refused = send("before").await.expect_err("not on the allow-list");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A verified call from that service URL vouches for it, for this bot.
    let (_tx, mut rx) = subscribe(&h).await;
    let jwt = token(&claims(&su), KEY_A);
    assert_eq!(
        post(
            &h,
            Some(&jwt),
            activity("act-t", "msteams", &su, "a:trusted", "hi")
        )
        .await,
        200
    );
    next_event(&mut rx, Duration::from_secs(10))
        .await
        .expect("the activity");
    let sent = send("after").await.expect("trusted now").into_inner();
    assert_eq!(sent.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(h.fake.for_conversation("a:trusted").len(), 1);
}
