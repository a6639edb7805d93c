//! Render (dry run) and GetCapabilities through the real gRPC surface, and the CLI client.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use tonic::Code;

use channel_gateway::api::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_returns_the_native_requests_without_secrets_or_sending() {
    let h = start().await;
    let mut m = h.text("19:abc@thread.skype", "Hello **there**");
    m.text_format = pb::TextFormat::Markdown as i32;
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
    let req = &r.requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.url,
        format!(
            "{}v3/conversations/19%3Aabc%40thread.skype/activities",
            h.fake.service_url()
        )
    );
    let body: Value = serde_json::from_str(&req.body_json).unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["text"], "Hello **there**");
    assert_eq!(body["textFormat"], "markdown");
    assert_eq!(body["from"]["id"], BOT);
    let all = format!("{r:?}");
    assert!(
        !all.contains(PASSWORD) && !all.contains("tok-"),
        "secrets in Render output"
    );
    assert!(
        h.fake.received().is_empty() && h.fake.token_requests() == 0,
        "Render sent something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_of_a_proactive_start_shows_the_create_then_the_message() {
    let h = start().await;
    let mut m = h.text("", "hi");
    m.address.as_mut().unwrap().conversation = None;
    let r = h
        .client
        .clone()
        .render(pb::RenderRequest {
            message: Some(m),
            options: Some(pb::ProactiveOptions {
                topic_name: "News".into(),
                ..Default::default()
            }),
            change: None,
        })
        .await
        .unwrap()
        .into_inner();
    let urls: Vec<&str> = r.requests.iter().map(|q| q.url.as_str()).collect();
    assert_eq!(urls[0], format!("{}v3/conversations", h.fake.service_url()));
    assert!(urls[1].contains("{conversationId}"), "{urls:?}");
    let create: Value = serde_json::from_str(&r.requests[0].body_json).unwrap();
    assert_eq!(create["topicName"], "News");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_per_channel() {
    let h = start().await;
    let mut c = h.client.clone();
    let teams = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "msteams".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert_eq!(teams.implementation, "botframework");
    assert!(teams.typing && teams.carousel && teams.proactive && teams.configured);
    assert_eq!(teams.max_buttons_per_card, 3);
    assert_eq!(teams.max_suggested_actions, 5);
    assert_eq!(
        teams.max_payload_bytes, 40_960,
        "Teams' own limit, not the connector's"
    );
    let webchat = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "webchat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert!(!webchat.proactive, "Web Chat refuses create-conversation");
    let err = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "whatsapp".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["channel_id"]);
}

/// `configured` means the gateway can send there: enabled and holding credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_say_configured_only_with_credentials() {
    async fn configured(h: &Harness, channel_id: &str) -> bool {
        h.client
            .clone()
            .get_capabilities(pb::GetCapabilitiesRequest {
                channel_id: channel_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .capabilities
            .unwrap()
            .configured
    }
    // Slack and Messenger are enabled by default, with no workspace or page.
    let h = start().await;
    assert!(configured(&h, "msteams").await);
    assert!(!configured(&h, "slack").await);
    assert!(!configured(&h, "facebook").await);
    drop(h);
    let h = start_with(|c| c.channels.botframework.bots.clear()).await;
    assert!(!configured(&h, "msteams").await, "no bot has credentials");
    drop(h);
    let h = start_with(|c| {
        c.channels.botframework.bots.clear();
        c.channels.botframework.allow_unauthenticated = true;
    })
    .await;
    assert!(configured(&h, "emulator").await, "the emulator needs none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_send_and_render_talk_to_a_running_gateway() {
    let h = start().await;
    let gateway = format!("http://{}", h.gateway.addr);
    let service_url = h.fake.service_url();
    let bin = env!("CARGO_BIN_EXE_channel-gateway");
    let args = move |cmd: &str| {
        let mut a = vec![
            cmd.to_string(),
            "--gateway".into(),
            gateway.clone(),
            "--channel".into(),
            "msteams".into(),
            "--service-url".into(),
            service_url.clone(),
            "--bot".into(),
            BOT.into(),
            "--user".into(),
            "29:u".into(),
            "--conversation".into(),
            "cli".into(),
            "--text".into(),
            "from the CLI".into(),
        ];
        if cmd == "send" {
            a.push("--wait-delivered".into());
        }
        a
    };
    let out =
        tokio::task::spawn_blocking(move || Command::new(bin).args(args("send")).output().unwrap())
            .await
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["state"], "delivered");
    assert!(
        printed["receipts"][0]["native_id"]
            .as_str()
            .unwrap()
            .starts_with("activity-")
    );
    assert_eq!(h.fake.for_conversation("cli")[0].text(), "from the CLI");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "address": {"channel_id": "msteams", "bot": {"id": BOT}, "user": {"id": "29:u"},
                        "conversation": {"id": "cli"}, "service_url": h.fake.service_url()},
            "attachments": [{"content": {"hero": {"title": "Card", "buttons": [{"type": "im_back", "title": "Yes", "value": "yes"}]}}}]
        })
        .to_string(),
    )
    .unwrap();
    let g = format!("http://{}", h.gateway.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["render", "--gateway", &g, "--file"])
            .arg(&file)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let body = &printed["requests"][0]["body"];
    assert_eq!(
        body["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.hero"
    );
    assert_eq!(
        body["attachments"][0]["content"]["buttons"][0]["type"],
        "imBack"
    );
}
