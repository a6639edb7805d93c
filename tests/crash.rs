//! Crash safety with the real binary: clients send over many conversations, the gateway is
//! SIGKILLed at a random point, restarted on the same data directory, several times. Every
//! message whose Send returned OK must arrive, in order per conversation; a message may arrive
//! twice only if it was in flight at a kill, and then the gateway must say it may be a duplicate.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

const CONVERSATIONS: usize = 24;
const CLIENTS: usize = 8;
const ROUNDS: usize = 3;

fn spawn_gateway(fake: &FakeConnector, data_dir: &std::path::Path, port: u16) -> Child {
    gateway_command(fake, data_dir, port)
        .env("CHANNEL_GATEWAY__DELIVERY__BASE_RETRY_DELAY", "20ms")
        // The fake is not Teams: its conversations take messages faster than Teams allows.
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TEAMS_PACING",
            "false",
        )
        .env("CHANNEL_GATEWAY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect(port: u16) -> ChannelGatewayClient<tonic::transport::Channel> {
    ChannelGatewayClient::new(binary_channel(port).await)
}

fn address(fake: &FakeConnector, conv: usize) -> pb::Address {
    pb::Address {
        channel_id: "msteams".into(),
        user: Some(pb::Identity {
            id: "29:u".into(),
            ..Default::default()
        }),
        bot: Some(pb::Identity {
            id: BOT.into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: format!("crash-{conv}"),
            ..Default::default()
        }),
        service_url: fake.service_url(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_loses_nothing_accepted_and_keeps_order() {
    // No harness here: the test runs its own gateway process, so it starts its own watchdog.
    let _watchdog = common::Watchdog::start();
    let fake = FakeConnector::start().await;
    fake.set_jitter(Duration::from_millis(3));
    let dir = tempfile::tempdir().unwrap();
    // (conversation, sequence) -> message id, for every Send that returned OK.
    let acked: Arc<Mutex<HashMap<(usize, usize), String>>> = Arc::default();
    let next_seq: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![0; CONVERSATIONS]));

    for round in 0..ROUNDS {
        let port = free_port();
        let mut child = spawn_gateway(&fake, dir.path(), port);
        let client = connect(port).await;
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let mut client = client.clone();
            let acked = acked.clone();
            let next_seq = next_seq.clone();
            let addrs: Vec<(usize, pb::Address)> = (0..CONVERSATIONS)
                .filter(|conv| conv % CLIENTS == c)
                .map(|conv| (conv, address(&fake, conv)))
                .collect();
            tasks.push(tokio::spawn(async move {
                // Each conversation has one sender, so its sequence is the order Sends were made.
                'outer: loop {
                    for (conv, addr) in &addrs {
                        let seq = {
                            let mut n = next_seq.lock().unwrap();
                            n[*conv] += 1;
                            n[*conv] - 1
                        };
                        let r = client
                            .send(pb::SendRequest {
                                message: Some(pb::Message {
                                    address: Some(Box::new(addr.clone())),
                                    text: format!("{seq}"),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            })
                            .await;
                        match r {
                            Ok(r) => {
                                acked
                                    .lock()
                                    .unwrap()
                                    .insert((*conv, seq), r.into_inner().message_id);
                            }
                            Err(_) => break 'outer,
                        }
                    }
                }
            }));
        }
        // Kill at a random point while messages stream in and out.
        let pause = 150 + rand::random::<u64>() % 600;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "round {round}: killed after {pause} ms, {} acked so far, {} received",
            acked.lock().unwrap().len(),
            fake.received().len()
        );
    }

    // A last start delivers whatever the kills left in the outbox.
    let port = free_port();
    let mut child = spawn_gateway(&fake, dir.path(), port);
    let mut client = connect(port).await;
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > CONVERSATIONS,
        "too few messages were sent to test anything"
    );
    let want: HashSet<(usize, usize)> = acked.keys().copied().collect();
    fake.wait_for(
        Duration::from_secs(120),
        "every acknowledged message",
        |r| {
            let got: HashSet<(usize, usize)> = r
                .iter()
                .filter_map(|x| {
                    let conv = x.conversation.strip_prefix("crash-")?.parse().ok()?;
                    Some((conv, x.text().parse().ok()?))
                })
                .collect();
            want.is_subset(&got)
        },
    )
    .await;

    let mut duplicates = 0;
    for conv in 0..CONVERSATIONS {
        let seq: Vec<usize> = fake
            .for_conversation(&format!("crash-{conv}"))
            .iter()
            .map(|r| r.text().parse().unwrap())
            .collect();
        let mut seen = HashSet::new();
        let mut firsts = Vec::new();
        let mut dups = Vec::new();
        for s in &seq {
            if seen.insert(*s) {
                firsts.push(*s);
            } else {
                dups.push(*s);
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(firsts, sorted, "crash-{conv} out of order: {seq:?}");
        // A kill can catch two messages of a conversation undone on disk: the one on its way,
        // and the one before it, delivered but with its outcome still queued for the outbox
        // (final states are not waited for). Both are resent, flagged (checked below).
        assert!(
            dups.len() <= 2 * ROUNDS,
            "crash-{conv}: {} duplicates for {ROUNDS} kills: {seq:?}",
            dups.len()
        );
        for d in dups {
            duplicates += 1;
            if let Some(id) = acked.get(&(conv, d)) {
                let delivery = delivery(&mut client, id).await;
                assert!(
                    delivery.possible_duplicate,
                    "crash-{conv} message {d} arrived twice unflagged"
                );
            }
        }
    }
    println!(
        "{} acknowledged, {} received, {duplicates} duplicates",
        acked.len(),
        fake.received().len()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// After a kill, `possible_duplicate` marks the messages a call may have reached, not the ones
/// that only waited: the message whose call was in flight (held open by the fake) is flagged;
/// the one waiting out its 429's Retry-After, and the one queued behind it, are not. (Before,
/// every message stored as delivering was flagged, waiting or not: about 28% of a chaos run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_only_messages_a_call_may_have_reached_are_flagged() {
    let _watchdog = common::Watchdog::start();
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (held, limited) = ("crash-0", "crash-1");
    fake.set_latency(held, Duration::from_secs(60));
    fake.script(
        limited,
        vec![Scripted {
            status: 429,
            body: serde_json::json!({"error": {"code": "TooManyRequests", "message": "slow down"}}),
            retry_after: Some(30),
        }],
    );
    let port = free_port();
    let mut child = spawn_gateway(&fake, dir.path(), port);
    let mut client = connect(port).await;
    // Two messages to each conversation: (conversation, text) -> message id. The limited
    // conversation's come in one batch, so the second is marked ahead while the first's call
    // is under way, and must be unmarked when that call is refused.
    let mut ids = HashMap::new();
    for text in ["0", "1"] {
        let id = client
            .send(pb::SendRequest {
                message: Some(pb::Message {
                    address: Some(Box::new(address(&fake, 0))),
                    text: text.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .message_id;
        ids.insert((0, text), id);
    }
    let batch = client
        .send_batch(pb::SendBatchRequest {
            messages: ["0", "1"]
                .map(|text| pb::Message {
                    address: Some(Box::new(address(&fake, 1))),
                    text: text.into(),
                    ..Default::default()
                })
                .to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (text, r) in ["0", "1"].into_iter().zip(batch.results) {
        ids.insert((1, text), r.message_id);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fake.max_in_flight(held) == 0
        || !fake
            .state
            .refused
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c)| c == limited)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the held call or the 429 never came"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The gateway reads the 429 and records the wait without waiting for the disk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    fake.set_latency(held, Duration::ZERO);
    let port = free_port();
    let mut child = spawn_gateway(&fake, dir.path(), port);
    let mut client = connect(port).await;
    let mut flags = HashMap::new();
    for (&(conv, text), id) in &ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let delivery = loop {
            let d = delivery(&mut client, id).await;
            if d.state == pb::DeliveryState::Delivered as i32 {
                break d;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "crash-{conv} {text} not delivered after the restart: {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        flags.insert((conv, text), delivery.possible_duplicate);
    }
    println!("possible_duplicate after the kill: {flags:?}");
    assert!(
        flags[&(0, "0")],
        "the message in flight at the kill is not flagged"
    );
    assert!(
        !flags[&(1, "0")],
        "the message waiting out its Retry-After is flagged"
    );
    assert!(
        !flags[&(1, "1")],
        "the message queued behind the refused one is flagged"
    );
    // The one queued behind the call in flight may be flagged: its mark is written while
    // that call is under way, so that no commit waits between two calls.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
