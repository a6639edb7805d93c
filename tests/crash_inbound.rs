//! Crash safety of receiving, with the real binary: a channel posts signed Telegram updates
//! over 8 chats while a bot reads the Receive stream and acks; the gateway is SIGKILLed at a
//! random point and restarted on the same data directory, several times. Every update the
//! gateway answered 2xx must reach the bot, in order per chat; an update may reach it twice
//! only flagged as a redelivery; the channel's retries of a stored update are not delivered
//! again, across restarts too.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

const CHATS: i64 = 8;
const ROUNDS: usize = 4;
const SECRET: &str = "crash-hook-secret";
const TG_BOT: &str = "crash_bot";

fn spawn_gateway(
    fake: &FakeConnector,
    data_dir: &std::path::Path,
    port: u16,
    inbound: u16,
) -> Child {
    gateway_command(fake, data_dir, port)
        .env("CHANNEL_GATEWAY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("CHANNEL_GATEWAY__INBOUND__LISTEN", format!("127.0.0.1:{inbound}"))
        .env("CHANNEL_GATEWAY__INBOUND__ACK_DEADLINE", "\"2s\"")
        .env(
            "CHANNEL_GATEWAY__CHANNELS__TELEGRAM__BOTS",
            format!(
                r#"[{{ bot_id = "{TG_BOT}", token = "1000:crash-test-token", secret_token = "{SECRET}" }}]"#
            ),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn update(chat: i64, n: u64) -> Vec<u8> {
    // One update id per (chat, n): a retry of the same post repeats it, as Telegram's do.
    let id = chat as u64 * 1_000_000 + n;
    serde_json::to_vec(&json!({
        "update_id": id,
        "message": {
            "message_id": n + 1,
            "from": {"id": 7, "is_bot": false, "first_name": "Ada"},
            "chat": {"id": chat, "type": "private"},
            "date": 1_700_000_000,
            "text": format!("{chat}:{n}"),
        }
    }))
    .unwrap()
}

/// What the bot saw of one delivery.
#[derive(Debug, Clone)]
struct Seen {
    n: u64,
    redelivered: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_events_arrive_loses_nothing_answered_and_keeps_order() {
    let _watchdog = common::Watchdog::start();
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // Chat -> the updates answered 2xx (in the order posted: each chat posts one at a time).
    let answered: Arc<Mutex<HashMap<i64, Vec<u64>>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<i64, Vec<Seen>>>> = Arc::default();
    let inbound_port = Arc::new(AtomicU16::new(0));
    let grpc_port = Arc::new(AtomicU16::new(0));
    let posting = Arc::new(AtomicBool::new(true));

    // The channel: per chat, post the next update until it is answered 2xx (a refused or
    // unanswered post is retried with the same update id, as Telegram does), and re-post some
    // answered ones (a retry after a lost answer) that must not be delivered again.
    let mut posters = Vec::new();
    for chat in 1..=CHATS {
        let http = http.clone();
        let answered = answered.clone();
        let port = inbound_port.clone();
        let posting = posting.clone();
        posters.push(tokio::spawn(async move {
            let mut n = 0u64;
            while posting.load(Ordering::Relaxed) {
                let p = port.load(Ordering::Relaxed);
                let url = format!("http://127.0.0.1:{p}/webhooks/telegram/{TG_BOT}");
                let post = http
                    .post(&url)
                    .header("x-telegram-bot-api-secret-token", SECRET)
                    .header("content-type", "application/json")
                    .body(update(chat, n))
                    .send()
                    .await;
                match post {
                    Ok(r) if r.status().is_success() => {
                        answered.lock().unwrap().entry(chat).or_default().push(n);
                        if n.is_multiple_of(5) {
                            let _ = http
                                .post(&url)
                                .header("x-telegram-bot-api-secret-token", SECRET)
                                .body(update(chat, n))
                                .send()
                                .await;
                        }
                        n += 1;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                let pause = rand::rng().random_range(0..8);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }

    // The bot: reads and acks, reconnecting to whichever gateway is up.
    let bot = {
        let seen = seen.clone();
        let port = grpc_port.clone();
        tokio::spawn(async move {
            loop {
                let p = port.load(Ordering::Relaxed);
                let Ok(channel) =
                    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{p}"))
                        .unwrap()
                        .connect()
                        .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut client = ChannelGatewayClient::new(channel);
                let (tx, input) = mpsc::channel(256);
                let _ = tx
                    .send(pb::ReceiveRequest {
                        kind: Some(pb::receive_request::Kind::Subscribe(
                            pb::ReceiveSubscription {
                                max_in_flight: 64,
                                ..Default::default()
                            },
                        )),
                    })
                    .await;
                let Ok(r) = client.receive(ReceiverStream::new(input)).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut rx = r.into_inner();
                while let Some(Ok(m)) = rx.next().await {
                    let Some(pb::receive_response::Kind::Event(e)) = m.kind else {
                        continue;
                    };
                    let text = e
                        .message
                        .as_ref()
                        .map(|m| m.text.clone())
                        .unwrap_or_default();
                    let (chat, n) = text.split_once(':').expect("chat:n");
                    seen.lock()
                        .unwrap()
                        .entry(chat.parse().unwrap())
                        .or_default()
                        .push(Seen {
                            n: n.parse().unwrap(),
                            redelivered: e.redelivered,
                        });
                    let _ = tx
                        .send(pb::ReceiveRequest {
                            kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
                                event_ids: vec![e.event_id],
                            })),
                        })
                        .await;
                }
            }
        })
    };

    for round in 0..=ROUNDS {
        let port = free_port();
        let inbound = free_port();
        let mut child = spawn_gateway(&fake, dir.path(), port, inbound);
        let _ = ChannelGatewayClient::new(binary_channel(port).await);
        inbound_port.store(inbound, Ordering::Relaxed);
        grpc_port.store(port, Ordering::Relaxed);
        if round == ROUNDS {
            // The last gateway stays up: posting stops, and the bot must get everything.
            tokio::time::sleep(Duration::from_millis(500)).await;
            posting.store(false, Ordering::Relaxed);
            for p in posters.drain(..) {
                p.await.unwrap();
            }
            let want: usize = answered.lock().unwrap().values().map(Vec::len).sum();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let got: usize = seen
                    .lock()
                    .unwrap()
                    .values()
                    .map(|v| v.iter().map(|s| s.n).collect::<HashSet<_>>().len())
                    .sum();
                if got >= want || tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        let ms = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.kill().unwrap();
        child.wait().unwrap();
    }
    bot.abort();

    let answered = answered.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    let total: usize = answered.values().map(Vec::len).sum();
    assert!(
        total >= CHATS as usize * 5,
        "too few events got through to mean anything: {total}"
    );
    let mut redeliveries = 0;
    for (chat, posted) in &answered {
        let got = seen.get(chat).cloned().unwrap_or_default();
        let distinct: HashSet<u64> = got.iter().map(|s| s.n).collect();
        for n in posted {
            assert!(
                distinct.contains(n),
                "chat {chat}: update {n} was answered 2xx and never reached the bot"
            );
        }
        // In order: each delivery is the next one, or a flagged repeat of an earlier one.
        let mut max: Option<u64> = None;
        for (i, s) in got.iter().enumerate() {
            let near = &got[i.saturating_sub(4)..(i + 4).min(got.len())];
            match max {
                Some(m) if s.n <= m => {
                    assert!(
                        s.redelivered,
                        "chat {chat}: {} came again unflagged, near {near:?}",
                        s.n
                    );
                    redeliveries += 1;
                }
                _ => {
                    assert_eq!(
                        s.n,
                        max.map_or(0, |m| m + 1),
                        "chat {chat}: out of order near {near:?}"
                    );
                    max = Some(s.n);
                }
            }
        }
    }
    eprintln!(
        "{total} events answered 2xx over {ROUNDS} kills; {redeliveries} redelivered (flagged)"
    );
}
