//! The client subcommands, run as the real binary against an in-process gateway and the fake
//! connector: what a new user types in the first hour.

mod common;

use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{BOT, Harness, Scripted, start};

/// Runs the binary to its end, off the runtime's threads.
async fn cli(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
            .args(&args)
            .env_remove("CHANNEL_GATEWAY_TOKEN")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `send` flags for one text to `conv` through the fake connector, with the bare address form.
fn send_args(h: &Harness, conv: &str, text: &str) -> Vec<String> {
    let service_url = h.fake.service_url();
    let gateway = h.gateway.addr.to_string();
    args(&[
        "send",
        "--gateway",
        &gateway,
        "--channel",
        "msteams",
        "--service-url",
        &service_url,
        "--conversation",
        conv,
        "--bot",
        BOT,
        "--user",
        "29:user-1",
        "--text",
        text,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_status_and_capabilities_with_a_bare_gateway_address() {
    let h = start().await;
    let gateway = h.gateway.addr.to_string();
    let mut a = send_args(&h, "c1", "hello");
    a.push("--wait-delivered".into());
    let out = cli(a).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = stdout_json(&out);
    assert_eq!(sent["state"], "delivered", "{sent}");
    let id = sent["message_id"].as_str().unwrap().to_string();

    let out = cli(args(&["status", "--gateway", &gateway, &id])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let d = stdout_json(&out);
    assert_eq!(d["message_id"], id.as_str());
    assert_eq!(d["state"], "delivered");
    assert_eq!(d["conversation_id"], "c1");
    assert!(
        d["receipts"][0]["native_id"]
            .as_str()
            .unwrap()
            .starts_with("activity-"),
        "{d}"
    );
    assert!(d["accepted_at"].as_str().unwrap().contains('T'), "{d}");

    let out = cli(args(&["capabilities", "--gateway", &gateway, "msteams"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let c = stdout_json(&out);
    assert_eq!(c["implementation"], "botframework", "{c}");
    assert_eq!(c["channel_id"], "msteams", "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_listed_and_redelivered() {
    let h = start().await;
    let gateway = h.gateway.addr.to_string();
    h.fake.script(
        "refused",
        vec![Scripted {
            status: 403,
            body: json!({"error": {"code": "BotNotInConversationRoster", "message": "not in roster"}}),
            retry_after: None,
        }],
    );
    let mut a = send_args(&h, "refused", "hi");
    a.push("--wait-delivered".into());
    let out = cli(a).await;
    assert!(!out.status.success(), "a failure is not a success");
    let r = stdout_json(&out);
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["error"]["code"], "BotNotInConversationRoster", "{r}");
    assert!(stderr(&out).contains("not delivered"), "{}", stderr(&out));
    let id = r["message_id"].as_str().unwrap().to_string();

    let out = cli(args(&["failed", "--gateway", &gateway])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout_json(&out);
    let ids: Vec<&str> = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["message_id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()], "{list}");

    let out = cli(args(&["redeliver", "--gateway", &gateway, &id])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["message_ids"], json!([id]));
    h.fake
        .wait_for(Duration::from_secs(20), "the redelivered message", |r| {
            r.iter().any(|x| x.conversation == "refused")
        })
        .await;
}

/// `channel-gateway watch | head -n 1`: once the reader is gone, the next line ends the process
/// quietly (no panic about a broken pipe, exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_into_a_closed_pipe_exits_quietly() {
    let h = start().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
        .args(["watch", "--gateway", &h.gateway.addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = tokio::task::spawn_blocking(move || {
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
        // The reader goes away here, like `head -n 1`.
        first
    });
    // The watcher subscribes once connected: send until it has printed a line.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "watch printed nothing");
        h.send("w", "one").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first: Value = serde_json::from_str(&reader.await.unwrap()).unwrap();
    assert_eq!(first["conversation_id"], "w", "{first}");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "watch went on after its reader left"
        );
        h.send("w", "more").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.is_empty(), "{err}");
}

#[tokio::test]
async fn a_connection_error_names_the_address_and_what_render_needs() {
    let port = common::free_port();
    for gateway in [
        format!("127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}"),
    ] {
        let out = cli(args(&[
            "render",
            "--gateway",
            &gateway,
            "--channel",
            "slack",
            "--conversation",
            "C1",
            "--text",
            "hi",
        ]))
        .await;
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(&gateway), "{err}");
        assert!(err.contains("channel-gateway serve"), "{err}");
        assert!(err.contains("render asks a running gateway"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_files_are_strict_and_take_the_proto_json_form() {
    let h = start().await;
    let gateway = h.gateway.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let render = |name: &str, v: Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        cli(args(&[
            "render",
            "--gateway",
            &gateway,
            "--file",
            p.to_str().unwrap(),
        ]))
    };
    let model = json!({
        "address": {"channel_id": "msteams", "service_url": h.fake.service_url(),
                    "conversation": {"id": "c"}, "bot": {"id": BOT}},
        "text": "**hi**",
        "text_format": "markdown",
        "attachments": [{"content": {"hero": {"title": "t", "buttons": [
            {"type": "im_back", "title": "yes", "value": "yes"}]}}}],
    });
    let proto = json!({
        "address": {"channelId": "msteams", "serviceUrl": h.fake.service_url(),
                    "conversation": {"id": "c"}, "bot": {"id": BOT}},
        "text": "**hi**",
        "textFormat": "TEXT_FORMAT_MARKDOWN",
        "attachments": [{"hero": {"title": "t", "buttons": [
            {"type": "ACTION_TYPE_IM_BACK", "title": "yes", "value": "yes"}]}}],
    });
    let a = render("model.json", model.clone()).await;
    assert!(a.status.success(), "{}", stderr(&a));
    let b = render("proto.json", proto).await;
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(stdout_json(&a), stdout_json(&b));
    assert_eq!(
        stdout_json(&a)["requests"][0]["body"]["textFormat"],
        "markdown"
    );

    let mut typo = model.clone();
    typo["attachments"][0]["content"]["hero"]["titel"] = json!("x");
    typo["txet"] = json!("y");
    let out = render("typo.json", typo).await;
    assert!(
        !out.status.success(),
        "a misspelled key must not be dropped"
    );
    let err = stderr(&out);
    assert!(err.contains("`attachments[0].content.hero.titel`"), "{err}");
    assert!(err.contains("`txet`"), "{err}");

    let p = dir.path().join("model.json");
    let out = cli(args(&[
        "render",
        "--gateway",
        &gateway,
        "--file",
        p.to_str().unwrap(),
        "--text",
        "other",
    ]))
    .await;
    assert!(!out.status.success(), "--file with --text must be refused");
    assert!(stderr(&out).contains("--text"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_delivered_gives_up_after_its_timeout_and_names_the_message() {
    let h = start().await;
    h.fake.set_latency("slow", Duration::from_secs(60));
    let mut a = send_args(&h, "slow", "hi");
    a.extend(args(&["--wait-delivered", "--timeout", "500ms"]));
    let started = Instant::now();
    let out = cli(a).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let r = stdout_json(&out);
    let id = r["message_id"].as_str().unwrap();
    let err = stderr(&out);
    assert!(err.contains("not delivered within"), "{err}");
    assert!(err.contains(id), "{err}");
    assert!(err.contains("channel-gateway status"), "{err}");
}

/// A bot id that matches no credential is told which ids are configured (ids only, capped),
/// not that the whole channel "is not configured".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_without_credentials_is_told_which_ids_are_configured() {
    use channel_gateway::api::pb;
    use channel_gateway::channels::slack::config::SlackWorkspace;
    use channel_gateway::config::Secret;
    let h = common::start_with(|c| {
        c.channels.slack.workspaces = (1..=7)
            .map(|i| SlackWorkspace {
                bot_id: format!("B0{i}"),
                token: Secret::new(format!("xoxb-TOPSECRET-{i}")),
                team_id: None,
                signing_secret: None,
                receive: Default::default(),
                app_token: None,
            })
            .collect();
    })
    .await;
    let send = |address: pb::Address| {
        let mut c = h.client.clone();
        async move {
            c.send(pb::SendRequest {
                message: Some(pb::Message {
                    address: Some(Box::new(address)),
                    text: "hi".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err()
        }
    };
    let slack = pb::Address {
        channel_id: "slack".into(),
        bot: Some(pb::Identity {
            id: "B99".into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: "C1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = send(slack).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let m = err.message();
    assert!(m.starts_with("no workspace has bot_id `B99`"), "{m}");
    assert!(m.contains("`B01`") && m.contains("and 2 more"), "{m}");
    assert!(!m.contains("TOPSECRET"), "{m}");
    assert!(!m.contains("not configured"), "{m}");

    let mut teams = h.address("c1");
    teams.bot.as_mut().unwrap().id = "other-bot".into();
    let m = send(teams).await.message().to_string();
    assert!(
        m.starts_with(&format!(
            "no bot has app_id `other-bot` (configured: `{BOT}`"
        )),
        "{m}"
    );

    let fb = pb::Address {
        channel_id: "facebook".into(),
        bot: Some(pb::Identity {
            id: "123".into(),
            ..Default::default()
        }),
        user: Some(pb::Identity {
            id: "psid".into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: "psid".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = send(fb).await.message().to_string();
    assert!(
        m.starts_with("no page has page_id `123` (none is configured: set channels.facebook.pages"),
        "{m}"
    );
}

/// A message that failed for good says what happened (the channel's answer, how often it was
/// tried), not the gateway's internal retry class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_failure_says_what_happened() {
    use channel_gateway::api::pb;
    let h = start().await;
    h.fake.script(
        "down",
        (0..6)
            .map(|_| Scripted {
                status: 500,
                body: json!({"error": {"code": "ServiceError", "message": "try later"}}),
                retry_after: None,
            })
            .collect(),
    );
    let err = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(h.text("down", "hi")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let m = err.message();
    assert!(
        m.starts_with(
            "delivery failed after 6 attempts: botframework answered 500 ServiceError: try later"
        ),
        "{m}"
    );
    assert!(m.ends_with("(temporary)"), "{m}");
    assert!(!m.contains("Retryable"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_change_a_sent_message_in_place() {
    let h = start().await;
    let gateway = h.gateway.addr.to_string();
    let mut a = send_args(&h, "c-edit", "working on it");
    a.push("--wait-delivered".into());
    let out = cli(a).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout_json(&out)["message_id"]
        .as_str()
        .unwrap()
        .to_string();

    let out = cli(args(&[
        "update",
        "--gateway",
        &gateway,
        &id,
        "--text",
        "the answer",
        "--wait-delivered",
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r = stdout_json(&out);
    assert_eq!(r["state"], "delivered", "{r}");
    assert!(r["change_id"].as_str().is_some_and(|c| c != id), "{r}");
    let shown = h.fake.shown("c-edit");
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].1, "the answer");

    let out = cli(args(&[
        "delete",
        "--gateway",
        &gateway,
        &id,
        "--wait-delivered",
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["state"], "delivered");
    assert!(h.fake.shown("c-edit").is_empty());

    // Nothing left to change: the gateway's refusal, on standard error, and a failure.
    let out = cli(args(&[
        "update",
        "--gateway",
        &gateway,
        &id,
        "--text",
        "again",
    ]))
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to update"),
        "{}",
        stderr(&out)
    );
    // The new message is required, and named.
    let out = cli(args(&["update", "--gateway", &gateway, &id])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--text"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_shows_standard_input_as_one_growing_message() {
    let h = start().await;
    let mut a = send_args(&h, "c-stream", "Answer: ");
    a[0] = "stream".into();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
            .args(&a)
            .env_remove("CHANNEL_GATEWAY_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for word in ["forty", " two", " (streamed)"] {
            stdin.write_all(word.as_bytes()).unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r = stdout_json(&out);
    assert_eq!(r["state"], "delivered", "{r}");
    assert_eq!(r["incomplete"], false, "{r}");
    let shown = h.fake.shown("c-stream");
    assert_eq!(shown.len(), 1, "one message, grown in place: {shown:?}");
    assert_eq!(shown[0].1, "Answer: forty two (streamed)");
}
