//! The real binary: starts with no config, answers health and reflection, stops on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn serve_with_no_config_answers_health_and_reflection_and_stops_on_sigterm() {
    // No harness here: the test runs its own gateway process, so it starts its own watchdog.
    let _watchdog = common::Watchdog::start();
    let port = common::free_port();
    let admin = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_remove("CHANNEL_GATEWAY_CONFIG")
        // Colours are off because stderr is a pipe, not because of NO_COLOR.
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        // Only to keep parallel test runs off the default admin port 9090.
        .env(
            "CHANNEL_GATEWAY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let channel = common::binary_channel(port).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "channelgateway.v1.ChannelGateway"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service `{service}`"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"channelgateway.v1.ChannelGateway".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // v1alpha, which grpcurl and Python's grpcio-reflection client ask: the services, and the
    // gateway's own file with its descriptor.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut alpha = ServerReflectionClient::new(common::binary_channel(port).await);
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "channelgateway.v1.ChannelGateway".into(),
                )),
            },
        ];
        let mut stream = alpha
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected v1alpha answer: {resp:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "channelgateway.v1.ChannelGateway",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
            panic!("unexpected v1alpha answer: {resp:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }

    // The probes for those that cannot speak gRPC.
    let base = format!("http://127.0.0.1:{admin}");
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("channel_gateway_queue_depth"), "{text}");
    assert!(
        dir.path()
            .join("channel-gateway-data/outbox.sqlite3")
            .exists(),
        "durable outbox by default"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("INFO"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "colour codes in logs to a pipe: {logs:?}"
    );
}

/// `--listen localhost:PORT` serves on the IPv4 loopback (it used to be refused as not host:port).
#[tokio::test]
async fn serve_listens_on_localhost_by_name() {
    let _watchdog = common::Watchdog::start();
    let port = common::free_port();
    let admin = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
        .args(["serve", "--listen", &format!("localhost:{port}")])
        .current_dir(dir.path())
        .env_remove("CHANNEL_GATEWAY_CONFIG")
        .env(
            "CHANNEL_GATEWAY__ADMIN__LISTEN",
            format!("localhost:{admin}"),
        )
        .env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0")
        .env("CHANNEL_GATEWAY__OUTBOX__BACKEND", "memory")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                panic!("gateway exited ({s}): {err}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    if started.is_err() {
        child.kill().unwrap();
        panic!("gateway did not listen on localhost:{port} within 60 s");
    }
    let channel = common::binary_channel(port).await;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every way a user got a list of credentials wrong, through the real binary: the error names
/// the key (and the variable), and the token is nowhere in what the process prints.
#[test]
fn config_errors_name_the_key_and_never_show_a_token() {
    const TOKEN: &str = "tok-TOPSECRET-7f3a";
    let dir = tempfile::tempdir().unwrap();
    let serve = |env: &[(&str, String)], file: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_channel-gateway"));
        cmd.arg("serve").current_dir(dir.path());
        cmd.env_remove("CHANNEL_GATEWAY_CONFIG");
        cmd.env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(text) = file {
            let p = dir.path().join("gateway.toml");
            std::fs::write(&p, text).unwrap();
            cmd.arg("--config").arg(&p);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "a bad config must not start");
        let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
        all.push_str(&String::from_utf8_lossy(&out.stderr));
        assert!(!all.contains("TOPSECRET"), "token printed: {all}");
        all
    };
    for (var, id, secret) in [
        (
            "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
            "bot_id",
            "token",
        ),
        (
            "CHANNEL_GATEWAY__CHANNELS__FACEBOOK__PAGES",
            "page_id",
            "access_token",
        ),
        (
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__BOTS",
            "app_id",
            "app_password",
        ),
    ] {
        for value in [
            format!(r#"[{{{id} = "1", {secret} = "{TOKEN}"}}"#),
            format!(r#"{{"{id}": "1", "{secret}": "{TOKEN}"}}"#),
            format!("1:{TOKEN}"),
        ] {
            let out = serve(&[(var, value.clone())], None);
            assert!(out.contains(var), "{var}={value}: {out}");
            assert!(out.contains("inline array"), "{var}={value}: {out}");
        }
    }
    let out = serve(
        &[],
        Some(&format!(
            "[channels.slack]\nworkspaces = [{{bot_id = \"B1\", token = \"{TOKEN}\"]\n"
        )),
    );
    assert!(out.contains("line 2"), "{out}");
    assert!(out.contains("channels.slack.workspaces"), "{out}");
}

/// When the shutdown grace runs out, the log says what becomes of the undelivered messages as
/// the backend decides it: kept and sent after the next start (sqlite, which the restart
/// then does), or lost (memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_what_becomes_of_undelivered_messages() {
    use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
    let _watchdog = common::Watchdog::start();
    let fake = common::FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let start = |backend: &str| {
        let port = common::free_port();
        let child = common::gateway_command(&fake, dir.path(), port)
            .env_remove("CHANNEL_GATEWAY_CONFIG")
            .env_remove("RUST_LOG")
            .env("CHANNEL_GATEWAY__ADMIN__ENABLED", "false")
            .env("CHANNEL_GATEWAY__OUTBOX__BACKEND", backend)
            .env("CHANNEL_GATEWAY__SERVER__SHUTDOWN_GRACE", "300ms")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (port, child)
    };
    let address = pb::Address {
        channel_id: "msteams".into(),
        bot: Some(pb::Identity {
            id: common::BOT.into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: "held".into(),
            ..Default::default()
        }),
        service_url: fake.service_url(),
        ..Default::default()
    };
    let stop = |mut child: std::process::Child| {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "gateway did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
        logs
    };
    for (backend, said) in [
        (
            "memory",
            "the undelivered messages are lost (outbox.backend = memory)",
        ),
        (
            "sqlite",
            "the undelivered messages stay in the durable outbox and are delivered after the next start",
        ),
    ] {
        fake.set_latency("held", Duration::from_secs(60));
        let (port, child) = start(backend);
        let mut client = ChannelGatewayClient::new(common::binary_channel(port).await);
        for text in ["a", "b", "c"] {
            common::send_text(&mut client, &address, format!("{backend}-{text}"))
                .await
                .unwrap();
        }
        let logs = tokio::task::spawn_blocking(move || stop(child))
            .await
            .unwrap();
        assert!(logs.contains(said), "{backend}: {logs}");
        assert!(!logs.contains("in-memory store"), "{backend}: {logs}");
    }
    // And so it is: the next start sends what the durable outbox kept.
    fake.set_latency("held", Duration::ZERO);
    let (_port, child) = start("sqlite");
    fake.wait_for(Duration::from_secs(30), "the kept messages", |r| {
        ["sqlite-a", "sqlite-b", "sqlite-c"]
            .iter()
            .all(|t| r.iter().any(|x| x.text() == *t))
    })
    .await;
    tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
}
