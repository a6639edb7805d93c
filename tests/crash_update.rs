//! Crash safety of UpdateMessage with the real binary: bots keep updating one Slack message per
//! conversation while the gateway is SIGKILLed at random points and restarted on the same data
//! directory. Every update whose call returned OK must be applied, in the order it was made; one
//! may be applied twice only if it was on its way at a kill, and then the gateway says so.
//!
//! A call cut by a kill is retried after the restart with the same idempotency key, as a bot
//! would: it is either the change already stored (answered from it) or a new acceptance.

// The binary's harness (`common`) and the fake Slack each bring the shared fake-HTTP helpers
// along; the two copies are separate modules and never mix their types.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "slack_support/mod.rs"]
mod slack;

use std::collections::HashMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FakeConnector, Watchdog, binary_channel, free_port, slack_gateway_command};

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

const CONVERSATIONS: usize = 12;

/// Conversation -> (version, change id) of each update whose call returned OK.
type Acked = HashMap<usize, Vec<(usize, String)>>;
const ROUNDS: usize = 3;

fn spawn_gateway(
    bf: &FakeConnector,
    fake: &slack::FakeSlack,
    data_dir: &std::path::Path,
    port: u16,
) -> Child {
    let mut cmd = slack_gateway_command(
        bf,
        data_dir,
        port,
        &fake.base_url(),
        slack::BOT,
        slack::TOKEN,
    );
    cmd.spawn().unwrap()
}

async fn connect(port: u16) -> ChannelGatewayClient<tonic::transport::Channel> {
    ChannelGatewayClient::new(binary_channel(port).await)
}

fn channel(conv: usize) -> String {
    format!("C0CRASH{conv}")
}

fn text(conv: usize, version: usize) -> String {
    format!("c{conv} v{version}")
}

fn version_of(t: &str) -> Option<usize> {
    t.rsplit_once(" v")?.1.parse().ok()
}

fn address(conv: usize) -> pb::Address {
    pb::Address {
        channel_id: "slack".into(),
        user: Some(pb::Identity {
            id: slack::USER.into(),
            ..Default::default()
        }),
        bot: Some(pb::Identity {
            id: slack::BOT.into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: channel(conv),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_updates_are_queued_applies_every_acknowledged_update_in_order() {
    let _watchdog = Watchdog::start();
    let bf = FakeConnector::start().await;
    let fake = slack::FakeSlack::start().await;
    let dir = tempfile::tempdir().unwrap();

    // One message per conversation, delivered before any update.
    let port = free_port();
    let mut child = spawn_gateway(&bf, &fake, dir.path(), port);
    let mut client = connect(port).await;
    let mut targets = Vec::new();
    for conv in 0..CONVERSATIONS {
        let r = client
            .send(pb::SendRequest {
                message: Some(pb::Message {
                    address: Some(Box::new(address(conv))),
                    text: text(conv, 0),
                    ..Default::default()
                }),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        targets.push(r.message_id);
    }
    // Slack answers slowly enough that updates queue up behind each other.
    for conv in 0..CONVERSATIONS {
        fake.set_latency(&channel(conv), Duration::from_millis(4));
    }

    // conv -> the versions whose UpdateMessage returned OK, and their change ids.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    // conv -> the next version to ask for (a version cut by a kill is asked for again).
    let next: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![1; CONVERSATIONS]));
    for round in 0..ROUNDS {
        if round > 0 {
            child = spawn_gateway(&bf, &fake, dir.path(), port);
            client = connect(port).await;
        }
        let mut tasks = Vec::new();
        for (conv, target) in targets.iter().enumerate() {
            let mut client = client.clone();
            let (acked, next, target) = (acked.clone(), next.clone(), target.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let v = next.lock().unwrap()[conv];
                    let r = client
                        .update_message(pb::UpdateMessageRequest {
                            message_id: target.clone(),
                            message: Some(pb::Message {
                                text: text(conv, v),
                                ..Default::default()
                            }),
                            idempotency_key: format!("c{conv}-v{v}"),
                            wait: pb::WaitMode::Accepted as i32,
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            acked
                                .lock()
                                .unwrap()
                                .entry(conv)
                                .or_default()
                                .push((v, r.into_inner().change_id));
                            next.lock().unwrap()[conv] = v + 1;
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        let pause = 150 + rand::random::<u64>() % 500;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let n: usize = acked.lock().unwrap().values().map(Vec::len).sum();
        println!(
            "round {round}: killed after {pause} ms, {n} updates acknowledged so far, {} chat.update calls",
            fake.calls("chat.update").len()
        );
    }

    // A last start carries out what the kills left queued.
    child = spawn_gateway(&bf, &fake, dir.path(), port);
    let mut client = connect(port).await;
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total > 3 * CONVERSATIONS,
        "too few updates were acknowledged to test anything: {total}"
    );
    let last: HashMap<usize, usize> = acked
        .iter()
        .map(|(c, l)| (*c, l.iter().map(|(v, _)| *v).max().unwrap_or(0)))
        .collect();
    let fake2 = fake.clone();
    fake.wait_for(
        Duration::from_secs(60),
        "every conversation showing its last acknowledged update or a later one",
        move |_| {
            last.iter().all(|(conv, v)| {
                fake2
                    .shown(&channel(*conv))
                    .first()
                    // An update stored before a kill cut its call short is carried out too: it
                    // was accepted, the bot just did not hear so.
                    .is_some_and(|(_, t)| version_of(t).is_some_and(|shown| shown >= *v))
            })
        },
    )
    .await;

    let mut reapplied = 0;
    for (conv, versions) in &acked {
        // What Slack was asked to show, in order, for this conversation's message.
        let applied: Vec<usize> = fake
            .calls("chat.update")
            .iter()
            .filter(|r| r.channel() == channel(*conv))
            .filter_map(|r| version_of(r.text()))
            .collect();
        let mut firsts: Vec<usize> = Vec::new();
        let mut again = Vec::new();
        for v in &applied {
            if firsts.last() == Some(v) {
                again.push(*v);
            } else {
                firsts.push(*v);
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            firsts, sorted,
            "c{conv}: updates applied out of order: {applied:?}"
        );
        for (v, _) in versions {
            assert!(
                firsts.contains(v),
                "c{conv}: acknowledged update v{v} was never applied: {applied:?}"
            );
        }
        // Twice only right after itself (resent after a kill), and flagged then.
        assert!(
            again.len() <= ROUNDS,
            "c{conv}: {} re-applications for {ROUNDS} kills: {applied:?}",
            again.len()
        );
        for v in again {
            reapplied += 1;
            if let Some((_, id)) = versions.iter().find(|(x, _)| *x == v) {
                let d = common::delivery(&mut client, id).await;
                assert!(
                    d.possible_duplicate,
                    "c{conv}: update v{v} applied twice unflagged"
                );
            }
        }
    }
    // Each message still is one Slack message: an update never posts a second one.
    for conv in 0..CONVERSATIONS {
        assert_eq!(fake.shown(&channel(conv)).len(), 1, "c{conv}");
    }
    println!(
        "{total} updates acknowledged over {ROUNDS} kills, {} chat.update calls, {reapplied} applied again after a kill (flagged)",
        fake.calls("chat.update").len()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
