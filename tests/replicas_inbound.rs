//! Receiving across replicas of the real binary on one PostgreSQL database (tests/pg): a channel
//! posts its signed events (Telegram updates, the simplest to sign: a secret header) to any
//! replica, and retries them to another; a bot's Receive streams on any replica get every event
//! once, in order per conversation, one at a time per conversation (`per_conversation` = 1), with
//! the ack semantics of one replica. A SIGKILLed replica's unacked events come again, flagged
//! `redelivered`, on a replica with a matching stream within the lease; a stream that ends hands
//! its conversations over at once; consumer groups span replicas.
//!
//! Always on PostgreSQL, whatever `CHANNEL_GATEWAY_TEST_BACKEND` says: each test has a database
//! of its own on the binary's shared cluster, and the tests take turns (`SERIAL`).
//!
//! Owns only this binary's channel (posting updates), bots (Receive streams) and checks; the
//! replicas' processes are tests/replica_support's.

mod common;
mod replica_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use channel_gateway::api::pb;
use common::*;
use replica_support::*;

const TG_BOT: &str = "replicas_bot";
const SECRET: &str = "replicas-hook-secret";

/// A call to a replica gives up after this.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `n` replicas on a fresh database, each serving webhooks for the same Telegram bot.
async fn inbound_replicas(fake: &FakeConnector, n: usize) -> Replicas {
    let mut cluster = Replicas::new(fake).await;
    cluster.webhooks = true;
    cluster.set_env(
        "CHANNEL_GATEWAY__CHANNELS__TELEGRAM__BOTS",
        format!(
            r#"[{{ bot_id = "{TG_BOT}", token = "1000:replicas-test-token", secret_token = "{SECRET}" }}]"#
        ),
    );
    // Named, though they are the defaults, because the checks rest on them: one event of a
    // conversation out at a time, and no test holds an event anywhere near the deadline (a
    // redelivery here is a failover's or a stream's end, never the deadline's).
    cluster.set_env("CHANNEL_GATEWAY__INBOUND__PER_CONVERSATION", "1");
    cluster.set_env("CHANNEL_GATEWAY__INBOUND__ACK_DEADLINE", "30s");
    for _ in 0..n {
        cluster.start().await;
    }
    cluster
}

// ---------------------------------------------------------------------------------------------
// The channel: Telegram updates, one conversation per chat.

/// Update `k` of `chat`: one update id per (chat, k), so a retry repeats it as Telegram's do.
fn update(chat: i64, k: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "update_id": chat as u64 * 1000 + k,
        "message": {
            "message_id": k + 1,
            "from": {"id": 7, "is_bot": false, "first_name": "Ada"},
            "chat": {"id": chat, "type": "private"},
            "date": 1_700_000_000,
            "text": format!("{chat}:{k}"),
        }
    }))
    .unwrap()
}

/// Posts update `k` of `chat` to the webhook listener at `base`; Err says what went wrong.
async fn post(http: &reqwest::Client, base: &str, chat: i64, k: u64) -> Result<(), String> {
    let r = http
        .post(format!("{base}/webhooks/telegram/{TG_BOT}"))
        .header("x-telegram-bot-api-secret-token", SECRET)
        .header("content-type", "application/json")
        .body(update(chat, k))
        .send()
        .await
        .map_err(|e| format!("chat {chat} update {k} to {base}: {e}"))?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "chat {chat} update {k} to {base}: answered {}",
            r.status()
        ))
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .build()
        .unwrap()
}

/// Every chat's updates `0..events`, one after the other (the next once the previous was
/// answered 2xx), chats in parallel; update `k` of the `i`-th chat goes to replica
/// `(i + k) % n`. With `retries`, each update is posted again (a channel's retry after a lost
/// answer) to the next replica, together with the chat's next update. Returns the posts made;
/// panics on any post not answered 2xx.
async fn post_conversations(bases: &[String], chats: &[i64], events: u64, retries: bool) -> usize {
    let http = http();
    let n = bases.len();
    let mut tasks = Vec::new();
    for (i, &chat) in chats.iter().enumerate() {
        let (http, bases) = (http.clone(), bases.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut posts = 0;
            let mut retry: Option<(usize, u64)> = None;
            for k in 0..events {
                let to = (i + k as usize) % n;
                let again = retry.take();
                let (first, second) = tokio::join!(post(&http, &bases[to], chat, k), async {
                    match again {
                        Some((r, j)) => post(&http, &bases[r], chat, j).await,
                        None => Ok(()),
                    }
                });
                first?;
                second?;
                posts += 1 + usize::from(again.is_some());
                if retries {
                    retry = Some(((to + 1) % n, k));
                }
            }
            if let Some((r, j)) = retry {
                post(&http, &bases[r], chat, j).await?;
                posts += 1;
            }
            Ok::<usize, String>(posts)
        }));
    }
    let mut posts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(p) => posts += p,
            Err(e) => panic!("a post was not answered 2xx: {e}"),
        }
    }
    posts
}

// ---------------------------------------------------------------------------------------------
// The bots: Receive streams.

/// One Receive stream: acks go in through `tx`, events come out of `rx`.
struct Stream {
    tx: mpsc::Sender<pb::ReceiveRequest>,
    rx: tonic::Streaming<pb::ReceiveResponse>,
}

/// Subscribes `group` ("" for the default) on the replica `client` reaches; panics unless the
/// subscription is confirmed.
async fn open(client: Client, group: &str) -> Stream {
    let mut client = client;
    let (tx, input) = mpsc::channel(256);
    tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Subscribe(
            pb::ReceiveSubscription {
                group: group.into(),
                max_in_flight: 64,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let subscribe = async {
        let mut rx = client
            .receive(ReceiverStream::new(input))
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
            .into_inner();
        match rx.message().await {
            Ok(Some(pb::ReceiveResponse {
                kind: Some(pb::receive_response::Kind::Subscribed(_)),
            })) => Ok(rx),
            other => Err(format!("expected the subscription first, got {other:?}")),
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, subscribe).await {
        Ok(Ok(rx)) => Stream { tx, rx },
        Ok(Err(e)) => panic!("subscribing group {group:?}: {e}"),
        Err(_) => panic!("subscribing group {group:?}: no answer within {CALL_TIMEOUT:?}"),
    }
}

impl Stream {
    /// The next event within `d`, or None; panics if the stream fails or ends.
    async fn next_within(&mut self, d: Duration) -> Option<pb::ReceivedEvent> {
        loop {
            match tokio::time::timeout(d, self.rx.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(pb::ReceiveResponse {
                    kind: Some(pb::receive_response::Kind::Event(e)),
                }))) => return Some(e),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("the stream failed or ended: {other:?}"),
            }
        }
    }

    async fn ack(&self, e: &pb::ReceivedEvent) {
        ack(&self.tx, e.event_id.clone()).await;
    }
}

async fn ack(tx: &mpsc::Sender<pb::ReceiveRequest>, event_id: String) {
    // A stream the gateway ended refuses it; the checks then find the event unacked.
    let _ = tx
        .send(pb::ReceiveRequest {
            kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
                event_ids: vec![event_id],
            })),
        })
        .await;
}

/// (chat, k) of an event posted by [`update`].
fn parse(e: &pb::ReceivedEvent) -> Option<(i64, u64)> {
    let text = e.message.as_ref()?.text.as_str();
    let (chat, k) = text.split_once(':')?;
    Some((chat.parse().ok()?, k.parse().ok()?))
}

/// One event handed to a stream, as the bot saw it.
#[derive(Debug, Clone)]
struct Handout {
    /// The record's clock when it came: one clock for hand-outs and acks of every stream.
    tick: u64,
    stream: char,
    chat: i64,
    k: u64,
    redelivered: bool,
    attempt: u32,
}

/// What the bots of one consumer group saw, under one mutex so hand-outs and acks of all its
/// streams are in one order.
#[derive(Default)]
struct Record {
    tick: u64,
    handed: Vec<Handout>,
    /// (chat, k) -> the tick of its (last) ack, taken before the ack went out: a hand-out
    /// ticked after it may have been caused by it, one ticked before cannot have been.
    acked: HashMap<(i64, u64), u64>,
    errors: Vec<String>,
}

impl Record {
    fn received(&self) -> usize {
        let mut seen: Vec<(i64, u64)> = self.handed.iter().map(|h| (h.chat, h.k)).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }
}

/// A bot reading `stream` (named `name`) and acking each event after a random delay up to
/// `max_delay`, into `record`, until the task is aborted.
fn consume(
    mut stream: Stream,
    name: char,
    record: Arc<Mutex<Record>>,
    max_delay: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let e = match stream.rx.next().await {
                Some(Ok(pb::ReceiveResponse {
                    kind: Some(pb::receive_response::Kind::Event(e)),
                })) => e,
                Some(Ok(_)) => continue,
                other => {
                    record
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("stream {name} failed or ended: {other:?}"));
                    return;
                }
            };
            let Some((chat, k)) = parse(&e) else {
                record
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("stream {name}: an event not posted here: {e:?}"));
                continue;
            };
            {
                let mut r = record.lock().unwrap();
                r.tick += 1;
                let tick = r.tick;
                r.handed.push(Handout {
                    tick,
                    stream: name,
                    chat,
                    k,
                    redelivered: e.redelivered,
                    attempt: e.attempt,
                });
            }
            let delay = max_delay.mul_f64(rand::rng().random_range(0.0..=1.0));
            let (tx, record) = (stream.tx.clone(), record.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                {
                    let mut r = record.lock().unwrap();
                    r.tick += 1;
                    let tick = r.tick;
                    r.acked.insert((chat, k), tick);
                }
                ack(&tx, e.event_id).await;
            });
        }
    })
}

/// Waits until `record` holds every one of `total` events, or `within` passed.
async fn wait_received(record: &Mutex<Record>, total: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while record.lock().unwrap().received() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks a group that nothing failed in: every event of `chats` (`0..events` each) handed out
/// exactly once, unflagged, in order per chat, and none while its chat's previous one was
/// unacked.
fn check_group(group: &str, record: &Record, chats: &[i64], events: u64, problems: &mut Problems) {
    for e in &record.errors {
        problems.add("stream errors", format!("{group}: {e}"));
    }
    let mut by_chat: BTreeMap<i64, Vec<&Handout>> = BTreeMap::new();
    for h in &record.handed {
        by_chat.entry(h.chat).or_default().push(h);
        if !chats.contains(&h.chat) || h.k >= events {
            problems.add(
                "events never posted",
                format!("{group}: chat {} update {}", h.chat, h.k),
            );
        }
        if h.redelivered || h.attempt != 1 {
            problems.add(
                "events flagged redelivered though nothing failed",
                format!("{group}: {h:?}"),
            );
        }
    }
    for &chat in chats {
        let got = by_chat.remove(&chat).unwrap_or_default();
        let ks: Vec<u64> = got.iter().map(|h| h.k).collect();
        for k in 0..events {
            match ks.iter().filter(|x| **x == k).count() {
                0 => problems.add(
                    "events never received",
                    format!("{group}: chat {chat} update {k}"),
                ),
                1 => {}
                n => problems.add(
                    "events received more than once",
                    format!(
                        "{group}: chat {chat} update {k}, {n} times, by streams {:?}",
                        got.iter()
                            .filter(|h| h.k == k)
                            .map(|h| h.stream)
                            .collect::<Vec<_>>()
                    ),
                ),
            }
        }
        if ks.windows(2).any(|w| w[0] >= w[1]) {
            problems.add(
                "conversations received out of the order posted",
                format!("{group}: chat {chat} received {ks:?}"),
            );
        }
        for h in got.iter().filter(|h| h.k > 0) {
            let previous = record.acked.get(&(chat, h.k - 1));
            if previous.is_none_or(|acked| *acked > h.tick) {
                problems.add(
                    "events handed out while their conversation's previous one was unacked",
                    format!(
                        "{group}: chat {chat} update {} to stream {} at tick {}; update {} \
                         acked at tick {previous:?}",
                        h.k,
                        h.stream,
                        h.tick,
                        h.k - 1
                    ),
                );
            }
        }
    }
}

/// How many conversations each stream got events of, and how many events.
fn spread(record: &Record) -> BTreeMap<char, (usize, usize)> {
    let mut chats: BTreeMap<char, Vec<i64>> = BTreeMap::new();
    for h in &record.handed {
        chats.entry(h.stream).or_default().push(h.chat);
    }
    chats
        .into_iter()
        .map(|(s, mut c)| {
            let events = c.len();
            c.sort_unstable();
            c.dedup();
            (s, (c.len(), events))
        })
        .collect()
}

fn bases(cluster: &Replicas) -> Vec<String> {
    (0..cluster.replicas.len())
        .map(|i| cluster.webhook_base(i))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_posted_to_any_replica_reach_streams_on_others_in_order() {
    const CHATS: i64 = 20;
    const EVENTS: u64 = 15;
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let cluster = inbound_replicas(&fake, 3).await;
    // Streams on B and C only; the channel posts to A, B and C alike.
    let record: Arc<Mutex<Record>> = Arc::default();
    let bots = [
        consume(
            open(cluster.client(1), "").await,
            'B',
            record.clone(),
            Duration::from_millis(20),
        ),
        consume(
            open(cluster.client(2), "").await,
            'C',
            record.clone(),
            Duration::from_millis(20),
        ),
    ];
    let chats: Vec<i64> = (1..=CHATS).map(|c| 100 + c).collect();
    let total = chats.len() * EVENTS as usize;
    let began = Instant::now();
    let posts = post_conversations(&bases(&cluster), &chats, EVENTS, true).await;
    let posted = began.elapsed();
    wait_received(&record, total, Duration::from_secs(20)).await;
    let received = began.elapsed();
    // A second copy, or a stray redelivery, would be on its way by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for b in bots {
        b.abort();
    }
    let record = record.lock().unwrap();
    let mut problems = Problems::default();
    check_group("default", &record, &chats, EVENTS, &mut problems);
    eprintln!(
        "{total} events of {CHATS} chats, {posts} posts (each update twice, to two replicas) \
         answered in {posted:.2?}; {} hand-outs, {} distinct, all in {received:.2?}; per stream \
         (chats, events): {:?}",
        record.handed.len(),
        record.received(),
        spread(&record)
    );
    assert_eq!(posts, 2 * total);
    assert!(problems.is_empty(), "{problems}");
}

/// Events of `chats` (`0..events` each) handed to `stream` one at a time, the `i`-th chat's
/// first `i` acked and the next one held unacked; returns the held (chat, k). Checks the order
/// and that nothing more comes while they are held.
async fn hold_some(stream: &mut Stream, name: char, chats: &[i64], events: u64) -> Vec<(i64, u64)> {
    let mut next: BTreeMap<i64, u64> = chats.iter().map(|c| (*c, 0)).collect();
    let mut held = Vec::new();
    let to_ack = |chat: i64| chats.iter().position(|c| *c == chat).unwrap_or(0) as u64;
    let holding = chats.iter().filter(|c| to_ack(**c) < events).count();
    let acks: u64 = chats.iter().map(|c| to_ack(*c).min(events)).sum();
    let mut acked = 0;
    while held.len() < holding || acked < acks {
        let e = stream
            .next_within(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "stream {name}: nothing within 10 s; held {held:?}, {acked} of {acks} acked, \
                     next expected {next:?}"
                )
            });
        let (chat, k) = parse(&e).unwrap_or_else(|| panic!("not an event posted here: {e:?}"));
        let expected = next.get_mut(&chat).expect("a chat posted to");
        assert!(
            k == *expected && !e.redelivered,
            "stream {name}: chat {chat}: update {k} came (redelivered: {}) where update \
             {expected} was due, unflagged (a chat's updates were posted to every replica in turn)",
            e.redelivered
        );
        *expected += 1;
        if k < to_ack(chat) {
            stream.ack(&e).await;
            acked += 1;
        } else {
            held.push((chat, k));
        }
    }
    assert!(
        stream
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "stream {name}: an event came while every chat with updates left had one out unacked"
    );
    held
}

/// What one stream got after a failover or a handover.
#[derive(Debug)]
struct Got {
    chat: i64,
    k: u64,
    redelivered: bool,
    attempt: u32,
    at: Instant,
}

/// Reads and acks `stream` until it got `count` events (each within `wait`), then checks that
/// nothing more comes for 500 ms.
async fn take(stream: &mut Stream, name: char, count: usize, wait: Duration) -> Vec<Got> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(e) = stream.next_within(wait).await else {
            panic!(
                "stream {name}: {} of {count} events, then nothing within {wait:?}: {got:?}",
                got.len()
            );
        };
        let (chat, k) = parse(&e).unwrap_or_else(|| panic!("not an event posted here: {e:?}"));
        got.push(Got {
            chat,
            k,
            redelivered: e.redelivered,
            attempt: e.attempt,
            at: Instant::now(),
        });
        stream.ack(&e).await;
    }
    if let Some(e) = stream.next_within(Duration::from_millis(500)).await {
        panic!("stream {name}: an event beyond those expected: {e:?}; before it: {got:?}");
    }
    got
}

/// Checks what a stream got after another's conversations came to it: per chat, from the held
/// event on, in order, and none acked before; the held event flagged (attempt 2 or more: it is
/// not the group's first delivery of it). With `later_unflagged`, the events after it, never out
/// before, must come as first deliveries (as on one replica when a stream ends); otherwise a
/// conservative flag on them is allowed. Returns how many later events came flagged.
fn check_taken_over(
    got: &[Got],
    chats: &[i64],
    held: &[(i64, u64)],
    events: u64,
    later_unflagged: bool,
    problems: &mut Problems,
) -> usize {
    let mut later_flagged = 0;
    for &chat in chats {
        let of_chat: Vec<&Got> = got.iter().filter(|g| g.chat == chat).collect();
        let ks: Vec<u64> = of_chat.iter().map(|g| g.k).collect();
        let held_k = held.iter().find(|(c, _)| *c == chat).map(|(_, k)| *k);
        let want: Vec<u64> = held_k.map_or(Vec::new(), |h| (h..events).collect());
        if ks != want {
            problems.add(
                "conversations not taken over as they were left (missing, repeated, acked \
                 before, or out of order)",
                format!("chat {chat}: got updates {ks:?}, want {want:?}"),
            );
        }
        for g in of_chat {
            if Some(g.k) == held_k {
                if !g.redelivered || g.attempt < 2 {
                    problems.add("held events not flagged as redelivered", format!("{g:?}"));
                }
            } else if g.redelivered || g.attempt != 1 {
                later_flagged += 1;
                if later_unflagged {
                    problems.add(
                        "events never out before flagged as redelivered",
                        format!("{g:?}"),
                    );
                }
            }
        }
    }
    later_flagged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_unacked_events_come_again_flagged_on_another() {
    const EVENTS: u64 = 6;
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let mut cluster = inbound_replicas(&fake, 2).await;
    let (a, b) = (0, 1);
    // The i-th chat: i events acked on A, the next held; the last chat all acked.
    let chats: Vec<i64> = (0..=EVENTS as i64).map(|c| 200 + c).collect();
    let mut on_a = open(cluster.client(a), "").await;
    post_conversations(&bases(&cluster), &chats, EVENTS, true).await;
    let held = hold_some(&mut on_a, 'A', &chats, EVENTS).await;
    assert_eq!(held.len(), EVENTS as usize);

    // B's stream is there before the kill: while A lives and holds them, B gets nothing.
    let mut on_b = open(cluster.client(b), "").await;
    if let Some(e) = on_b.next_within(Duration::from_millis(500)).await {
        panic!("B got an event while A holds every conversation: {e:?}");
    }
    let killed = cluster.kill(a);
    drop(on_a);
    let left: usize = held.iter().map(|(_, k)| (EVENTS - k) as usize).sum();
    let got = take(
        &mut on_b,
        'B',
        left,
        LEASE + RENEW_EVERY + Duration::from_secs(5),
    )
    .await;

    let mut problems = Problems::default();
    let later_flagged = check_taken_over(&got, &chats, &held, EVENTS, false, &mut problems);
    let bound = LEASE + RENEW_EVERY + Duration::from_secs(2);
    let first = got
        .iter()
        .filter(|g| g.redelivered)
        .map(|g| g.at - killed)
        .min();
    let last = got
        .iter()
        .filter(|g| g.redelivered)
        .map(|g| g.at - killed)
        .max();
    eprintln!(
        "A held {} events unacked ({} acked) when it was killed; B got the first again \
         {first:.2?} after the kill, the last held one {last:.2?} after (bound {bound:?}), {} \
         events in all ({later_flagged} of those never out before flagged redelivered too)",
        held.len(),
        chats.len() * EVENTS as usize - left,
        got.len()
    );
    assert!(problems.is_empty(), "{problems}");
    let first = first.expect("a redelivered event");
    assert!(
        first <= bound,
        "the first redelivered event came {first:?} after the kill (bound {bound:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ending_on_one_replica_hands_its_conversations_to_another_at_once() {
    const EVENTS: u64 = 4;
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let mut cluster = inbound_replicas(&fake, 2).await;
    let (a, b) = (0, 1);
    // The i-th chat: i events acked on A, the next held (every chat holds one).
    let chats: Vec<i64> = (0..EVENTS as i64).map(|c| 300 + c).collect();
    let mut on_a = open(cluster.client(a), "").await;
    post_conversations(&bases(&cluster), &chats, EVENTS, true).await;
    let held = hold_some(&mut on_a, 'A', &chats, EVENTS).await;
    assert_eq!(held.len(), chats.len());

    let mut on_b = open(cluster.client(b), "").await;
    if let Some(e) = on_b.next_within(Duration::from_millis(500)).await {
        panic!("B got an event while A's stream holds every conversation: {e:?}");
    }
    // A says which conversations it holds: each chat's, for the default group.
    let claims = |text: &str| metric_value(text, "channel_gateway_inbox_claims ");
    let admin = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], cluster.replicas[i].admin));
    let (held_a, held_b) = (
        claims(&metrics_text(admin(a)).await),
        claims(&metrics_text(admin(b)).await),
    );
    assert_eq!(
        (held_a, held_b),
        (chats.len() as f64, 0.0),
        "claims held by A and B while A's stream holds every conversation"
    );
    drop(on_a);
    let dropped = Instant::now();
    let left: usize = held.iter().map(|(_, k)| (EVENTS - k) as usize).sum();
    let got = take(&mut on_b, 'B', left, Duration::from_secs(5)).await;

    let mut problems = Problems::default();
    check_taken_over(&got, &chats, &held, EVENTS, true, &mut problems);
    let bound = Duration::from_secs(1);
    let last_held = got
        .iter()
        .filter(|g| g.redelivered)
        .map(|g| g.at - dropped)
        .max();
    eprintln!(
        "A's stream held {} events unacked when it ended; B had every one again within \
         {last_held:.3?} (bound {bound:?}; A's lease is {LEASE:?}), {} events in all",
        held.len(),
        got.len()
    );
    assert!(
        cluster.replicas[a]
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none()),
        "A must still run: the handover is a release, not a failover"
    );
    assert!(problems.is_empty(), "{problems}");
    let last_held = last_held.expect("a redelivered event");
    assert!(
        last_held <= bound,
        "the held events came again {last_held:?} after the stream ended (bound {bound:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_groups_span_replicas() {
    const CHATS: i64 = 8;
    const EVENTS: u64 = 10;
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let cluster = inbound_replicas(&fake, 2).await;
    // Both groups first used before any event is stored; each streamed on one replica only.
    let g1: Arc<Mutex<Record>> = Arc::default();
    let g2: Arc<Mutex<Record>> = Arc::default();
    let bots = [
        consume(
            open(cluster.client(0), "g1").await,
            'A',
            g1.clone(),
            Duration::from_millis(10),
        ),
        consume(
            open(cluster.client(1), "g2").await,
            'B',
            g2.clone(),
            Duration::from_millis(10),
        ),
    ];
    let chats: Vec<i64> = (1..=CHATS).map(|c| 400 + c).collect();
    let total = chats.len() * EVENTS as usize;
    let began = Instant::now();
    let posts = post_conversations(&bases(&cluster), &chats, EVENTS, true).await;
    wait_received(&g1, total, Duration::from_secs(20)).await;
    wait_received(&g2, total, Duration::from_secs(5)).await;
    let received = began.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for b in bots {
        b.abort();
    }
    let mut problems = Problems::default();
    let (g1, g2) = (g1.lock().unwrap(), g2.lock().unwrap());
    check_group("g1 (on A)", &g1, &chats, EVENTS, &mut problems);
    check_group("g2 (on B)", &g2, &chats, EVENTS, &mut problems);
    eprintln!(
        "{total} events, {posts} posts to A and B; g1 on A: {} hand-outs, {} distinct; g2 on B: \
         {} hand-outs, {} distinct; all in {received:.2?}",
        g1.handed.len(),
        g1.received(),
        g2.handed.len(),
        g2.received()
    );
    assert!(problems.is_empty(), "{problems}");
}

// ---------------------------------------------------------------------------------------------
// Answers to calls the channel waits on, across replicas.

const SLACK_SECRET: &str = "replicas-slack-signing-secret";

/// Posts a slash command's form to the replica at `base`, signed as Slack does; the status
/// and body of the answer.
async fn slash_command(base: &str, trigger: &str, text: &str) -> (u16, String) {
    use hmac::{Hmac, Mac};
    let body = format!(
        "token=XXYYZZ&team_id=T0123TEAM&channel_id=C0CMD&user_id=U0HUMAN&command=%2Fask&text={text}&trigger_id={trigger}&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2F1"
    );
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SLACK_SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = http()
        .post(format!("{base}/webhooks/slack/commands"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", format!("v0={sig}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// The next `Responded` on a stream (events in between are a test failure).
async fn responded(stream: &mut Stream) -> pb::ReceiveResponded {
    match tokio::time::timeout(Duration::from_secs(10), stream.rx.next()).await {
        Ok(Some(Ok(pb::ReceiveResponse {
            kind: Some(pb::receive_response::Kind::Responded(r)),
        }))) => r,
        other => panic!("expected the answer's outcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bot_on_one_replica_answers_a_call_waiting_on_another() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let mut cluster = Replicas::new(&fake).await;
    cluster.webhooks = true;
    cluster.set_env(
        "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
        r#"[{ bot_id = "B0REPLICAS", token = "xoxb-replicas-test" }]"#,
    );
    cluster.set_env(
        "CHANNEL_GATEWAY__CHANNELS__SLACK__SIGNING_SECRET",
        SLACK_SECRET,
    );
    let (a, b) = (cluster.start().await, cluster.start().await);
    // The bot streams on B only; Slack calls A, which holds the call while B's bot answers.
    let mut on_b = open(cluster.client(b), "").await;
    let base_a = cluster.webhook_base(a);
    let post = slash_command(&base_a, "trig-x1", "status%20please");
    let bot = async {
        let e = on_b
            .next_within(Duration::from_secs(3))
            .await
            .expect("the command reaches the bot on B");
        assert_eq!(
            e.message.as_ref().map(|m| m.text.as_str()),
            Some("status please")
        );
        assert!(e.reply_by.is_some(), "the channel waits: reply_by is set");
        let started = Instant::now();
        on_b.tx
            .send(pb::ReceiveRequest {
                kind: Some(pb::receive_request::Kind::Respond(pb::ReceiveRespond {
                    event_id: e.event_id.clone(),
                    message: Some(pb::Message {
                        address: e.message.as_ref().and_then(|m| m.address.clone()),
                        text: "All green".into(),
                        ..Default::default()
                    }),
                    body: None,
                    status: 0,
                })),
            })
            .await
            .unwrap();
        let r = responded(&mut on_b).await;
        let took = started.elapsed();
        assert!(r.in_time, "answered in time across replicas: {r:?}");
        on_b.ack(&e).await;
        // A second answer to the same event is refused: the call has one.
        on_b.tx
            .send(pb::ReceiveRequest {
                kind: Some(pb::receive_request::Kind::Respond(pb::ReceiveRespond {
                    event_id: e.event_id.clone(),
                    message: None,
                    body: Some(channel_gateway::api::convert::json_to_value(
                        &json!({"text": "again"}),
                    )),
                    status: 0,
                })),
            })
            .await
            .unwrap();
        let again = responded(&mut on_b).await;
        assert!(!again.in_time, "a second answer is refused: {again:?}");
        took
    };
    let ((status, body), took) = tokio::join!(post, bot);
    eprintln!("the bot on B answered the call held by A in {took:?} (its outcome included)");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(v["text"], "All green", "{v}");
}
