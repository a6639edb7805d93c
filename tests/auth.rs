//! Caller authentication: the matrix of no token, wrong token, a token for another bot and the
//! right token; per-caller rate limits; and probes that stay open.

mod common;

use channel_gateway::api::auth::sha256_hex;
use channel_gateway::api::pb;
use channel_gateway::config::TokenIdentity;
use common::*;
use tonic::Code;

const RIGHT: &str = "token-for-bot-app-1";
const OTHER: &str = "token-for-another-bot";

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn auth_harness(per_second: f64) -> Harness {
    start_with(move |c| {
        c.auth.tokens = vec![
            TokenIdentity {
                name: "bot-a".into(),
                sha256: sha256_hex(RIGHT.as_bytes()),
                bots: vec![BOT.into()],
            },
            TokenIdentity {
                name: "bot-b".into(),
                sha256: sha256_hex(OTHER.as_bytes()),
                bots: vec!["another-bot".into()],
            },
        ];
        c.limits.per_caller_per_second = per_second;
        c.limits.per_caller_burst = 2;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_matrix() {
    let h = auth_harness(0.0).await;
    let mut c = h.client.clone();
    let req = || pb::SendRequest {
        message: Some(h.text("auth", "hi")),
        ..Default::default()
    };

    let e = c.send(with_token(req(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "no token: {}", e.message());
    let e = c
        .send(with_token(req(), Some("guessed")))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "wrong token: {}",
        e.message()
    );
    let e = c.send(with_token(req(), Some(OTHER))).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "token for another bot: {}",
        e.message()
    );
    c.send(with_token(req(), Some(RIGHT)))
        .await
        .expect("right token");

    // Status queries are scoped the same way.
    let e = c
        .list_failed(with_token(pb::ListFailedRequest::default(), Some(RIGHT)))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a bot-scoped caller must name its bot"
    );
    c.list_failed(with_token(
        pb::ListFailedRequest {
            bot_id: BOT.into(),
            ..Default::default()
        },
        Some(RIGHT),
    ))
    .await
    .unwrap();

    // Probes need no credential.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", h.gateway.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    h.fake
        .wait_for(std::time::Duration::from_secs(5), "one message", |r| {
            r.len() == 1
        })
        .await;
}

/// Another bot's message is answered exactly as an unknown one: a caller cannot count another
/// bot's traffic by probing ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_bots_message_looks_like_an_unknown_one() {
    let h = auth_harness(0.0).await;
    let mut c = h.client.clone();
    let sent = c
        .send(with_token(
            pb::SendRequest {
                message: Some(h.text("mine", "hi")),
                ..Default::default()
            },
            Some(RIGHT),
        ))
        .await
        .unwrap()
        .into_inner();
    let get = |id: String, token: &'static str| {
        let mut c = h.client.clone();
        async move {
            c.get_delivery(with_token(
                pb::GetDeliveryRequest { message_id: id },
                Some(token),
            ))
            .await
        }
    };
    get(sent.message_id.clone(), RIGHT)
        .await
        .expect("its own bot sees it");
    let theirs = get(sent.message_id.clone(), OTHER).await.unwrap_err();
    let unknown = get("999999".into(), OTHER).await.unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound, "{}", theirs.message());
    assert_eq!(unknown.code(), Code::NotFound);
    // The same words, but for the id itself.
    assert_eq!(
        theirs.message().replace(&sent.message_id, "ID"),
        unknown.message().replace("999999", "ID")
    );
    let redeliver = c
        .redeliver(with_token(
            pb::RedeliverRequest {
                message_ids: vec![sent.message_id.clone()],
            },
            Some(OTHER),
        ))
        .await
        .unwrap_err();
    assert_eq!(redeliver.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_told_so() {
    let h = auth_harness(0.5).await;
    let mut c = h.client.clone();
    let caps = || {
        with_token(
            pb::GetCapabilitiesRequest {
                channel_id: "msteams".into(),
            },
            Some(RIGHT),
        )
    };
    c.get_capabilities(caps()).await.unwrap();
    c.get_capabilities(caps()).await.unwrap();
    let e = c.get_capabilities(caps()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("limits.per_caller_per_second"),
        "{}",
        e.message()
    );
    // Another caller has its own budget.
    c.get_capabilities(with_token(
        pb::GetCapabilitiesRequest {
            channel_id: "msteams".into(),
        },
        Some(OTHER),
    ))
    .await
    .unwrap();
}

#[test]
fn remote_listening_without_auth_must_be_explicit() {
    let err = channel_gateway::config::Config::load(
        None,
        vec![(
            "CHANNEL_GATEWAY__SERVER__LISTEN".into(),
            "\"0.0.0.0:50051\"".into(),
        )],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("server.listen") && err.contains("allow_unauthenticated_remote"),
        "{err}"
    );
    channel_gateway::config::Config::load(
        None,
        vec![
            (
                "CHANNEL_GATEWAY__SERVER__LISTEN".into(),
                "\"0.0.0.0:50051\"".into(),
            ),
            (
                "CHANNEL_GATEWAY__AUTH__ALLOW_UNAUTHENTICATED_REMOTE".into(),
                "true".into(),
            ),
        ],
    )
    .unwrap();
}
