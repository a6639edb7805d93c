//! The real binary behind an egress proxy: `HTTPS_PROXY` in its environment sends channel calls
//! through a CONNECT tunnel. The proxy here is a fake on 127.0.0.1 that records what it is
//! asked and refuses it, so nothing leaves the machine.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use common::{binary_channel, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Accepts connections, reports each request head, and answers 403 to all of them.
async fn refusing_proxy() -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = s
                    .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn channel_calls_go_through_the_https_proxy_of_the_environment() {
    // No harness here: the test runs its own gateway process, so it starts its own watchdog.
    let _watchdog = common::Watchdog::start();
    let (proxy_port, mut seen) = refusing_proxy().await;
    let port = free_port();
    let admin = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_remove("CHANNEL_GATEWAY_CONFIG")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("HTTPS_PROXY", format!("http://127.0.0.1:{proxy_port}"))
        .env(
            "CHANNEL_GATEWAY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0")
        // No token request: the only call is the activity itself.
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__ALLOW_UNAUTHENTICATED",
            "true",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut client = ChannelGatewayClient::new(binary_channel(port).await);
    let address = pb::Address {
        channel_id: "msteams".into(),
        bot: Some(pb::Identity {
            id: "28:bot".into(),
            ..Default::default()
        }),
        user: Some(pb::Identity {
            id: "29:user".into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: "a:conv-1".into(),
            ..Default::default()
        }),
        service_url: "https://smba.trafficmanager.net/amer/".into(),
        ..Default::default()
    };
    client
        .send(pb::SendRequest {
            message: Some(pb::Message {
                address: Some(Box::new(address)),
                text: "through the proxy".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("accepted");

    let head = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the gateway never called the proxy")
        .expect("proxy stopped");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        head.starts_with("CONNECT smba.trafficmanager.net:443 HTTP/1.1\r\n"),
        "{head}"
    );
    // The tunnel request shows the proxy the host only: no path, no conversation, no text.
    assert!(!head.contains("conv-1") && !head.contains("amer"), "{head}");
}
