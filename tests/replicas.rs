//! Several replicas of the real binary sharing one outbox in PostgreSQL (tests/pg): any replica
//! accepts a Send, only the holder of a conversation's partition lease delivers it. Replicas are
//! killed (SIGKILL), paused past their lease (SIGSTOP, SIGCONT) and stopped (SIGTERM) while bots
//! send through all of them; nothing acknowledged may be lost, each conversation keeps its order
//! with one message in flight at the channel, whatever arrives twice is flagged
//! `possible_duplicate`, no state is written under a stale epoch, and a dead or leaving
//! replica's conversations move within the bounds the design promises.
//!
//! Always on PostgreSQL, whatever `CHANNEL_GATEWAY_TEST_BACKEND` says: each test has a database
//! of its own on the binary's shared cluster. The tests take turns (`SERIAL`): they assert
//! timings, and three gateways with PostgreSQL already fill a 2-core machine.
//!
//! Owns only this binary's checks and bots (`Traffic`); the replicas' processes are
//! tests/replica_support's, the fake channel is the Bot Framework connector of tests/common.

mod common;
mod replica_support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel_gateway::api::pb;
use channel_gateway::storage::lease::PARTITIONS;
use common::*;
use rand::{Rng, SeedableRng};
use replica_support::*;

/// A bot's call gives up after this: a SIGSTOPped replica accepts connections (the kernel does)
/// but never answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A fresh database and the delivery settings every replica of this binary runs with (the fake
/// injects faults; the tests start the replicas).
async fn outbox_replicas(fake: &FakeConnector) -> Replicas {
    let mut cluster = Replicas::new(fake).await;
    // The fake is not Teams: its conversations take messages faster than Teams allows.
    cluster.set_env(TEAMS_PACING, "false");
    // 30% faults must not fail a message, nor back it off for long.
    cluster.set_env("CHANNEL_GATEWAY__DELIVERY__BASE_RETRY_DELAY", "20ms");
    cluster.set_env("CHANNEL_GATEWAY__DELIVERY__MAX_RETRY_DELAY", "1s");
    cluster.set_env("CHANNEL_GATEWAY__DELIVERY__MAX_ATTEMPTS", "50");
    cluster.set_env("CHANNEL_GATEWAY__DELIVERY__MAX_AMBIGUOUS_RETRIES", "50");
    cluster.set_env("CHANNEL_GATEWAY__DELIVERY__REQUEST_TIMEOUT", "5s");
    cluster
}

const TEAMS_PACING: &str = "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TEAMS_PACING";

// ---------------------------------------------------------------------------------------------
// The database, read (and, for the stale-epoch check, watched) directly.

/// Each partition's holder whose lease runs now, by the database's clock.
async fn holders(db: &tokio_postgres::Client) -> Vec<Option<String>> {
    let rows = db
        .query(
            "SELECT partition, CASE WHEN lease_until > now() THEN owner END \
             FROM cg_partitions ORDER BY partition",
            &[],
        )
        .await
        .unwrap();
    let mut held = vec![None; PARTITIONS as usize];
    for row in rows {
        let p: i32 = row.get(0);
        if let Some(slot) = usize::try_from(p).ok().and_then(|p| held.get_mut(p)) {
            *slot = row.get(1);
        }
    }
    held
}

fn distinct(held: &[Option<String>]) -> BTreeSet<String> {
    held.iter().flatten().cloned().collect()
}

/// The one replica holding every partition, if there is one.
fn sole_holder(held: &[Option<String>]) -> Option<String> {
    let ids = distinct(held);
    (ids.len() == 1 && held.iter().all(Option::is_some)).then(|| ids.into_iter().next().unwrap())
}

fn describe(held: &[Option<String>]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in held {
        *counts.entry(h.as_deref().unwrap_or("(none)")).or_default() += 1;
    }
    format!("{} partitions, held by: {counts:?}", held.len())
}

/// Waits until exactly `n` replicas hold every partition between them, the same way for two
/// renewal periods (rebalancing done: a replica joining moves partitions over a few rounds).
async fn wait_shared_by(db: &tokio_postgres::Client, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    let mut since: Option<(Vec<Option<String>>, Instant)> = None;
    loop {
        let held = holders(db).await;
        if held.iter().all(Option::is_some) && distinct(&held).len() == n {
            match &since {
                Some((before, at)) if *before == held => {
                    if at.elapsed() >= RENEW_EVERY * 2 {
                        return;
                    }
                }
                _ => since = Some((held.clone(), Instant::now())),
            }
        } else {
            since = None;
        }
        assert!(
            Instant::now() < deadline,
            "the {n} replicas do not share the partitions, still, after {within:?}: {}",
            describe(&held)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The partition of every stored conversation whose id starts with `prefix`, as the outbox
/// stored it (keys are `channel/bot/conversation`).
async fn partitions_of(db: &tokio_postgres::Client, prefix: &str) -> HashMap<usize, usize> {
    db.query(
        "SELECT DISTINCT conversation, partition::int FROM outbox_messages",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .filter_map(|row| {
        let key: String = row.get(0);
        let conv = key.rsplit('/').next()?.strip_prefix(prefix)?.parse().ok()?;
        Some((conv, usize::try_from(row.get::<_, i32>(1)).ok()?))
    })
    .collect()
}

/// One stored message's final state.
#[derive(Debug)]
struct StoredRow {
    id: i64,
    state: String,
    possible_duplicate: bool,
}

/// Every stored message, by (conversation id, text).
async fn stored(db: &tokio_postgres::Client) -> HashMap<(String, String), Vec<StoredRow>> {
    let rows = db
        .query(
            "SELECT m.conversation, b.body::jsonb #>> '{message,text}', m.id, m.state, \
             m.possible_duplicate \
             FROM outbox_messages m JOIN outbox_bodies b ON b.id = m.id",
            &[],
        )
        .await
        .unwrap();
    let mut all: HashMap<(String, String), Vec<StoredRow>> = HashMap::new();
    for row in rows {
        let key: String = row.get(0);
        let conv = key.rsplit('/').next().unwrap_or_default().to_string();
        let text: Option<String> = row.get(1);
        all.entry((conv, text.unwrap_or_default()))
            .or_default()
            .push(StoredRow {
                id: row.get(2),
                state: row.get(3),
                possible_duplicate: row.get(4),
            });
    }
    all
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// Records every update of an outbox row that writes a state under an epoch other than its
/// partition's current one, into `stale_writes`. The epoch is read through `to_jsonb` so the
/// trigger also runs on a schema without the column (it then records nothing, and the test
/// says the column is missing).
const STALE_WRITES_TRIGGER: &str = "
CREATE TABLE stale_writes (
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    id BIGINT, partition INTEGER, old_epoch BIGINT, new_epoch BIGINT, current_epoch BIGINT,
    old_state TEXT, new_state TEXT
);
CREATE FUNCTION cg_test_stale_write() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_epoch BIGINT := (to_jsonb(NEW) ->> 'epoch')::BIGINT;
    old_epoch BIGINT := (to_jsonb(OLD) ->> 'epoch')::BIGINT;
    current_epoch BIGINT;
BEGIN
    IF new_epoch IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT p.epoch INTO current_epoch FROM cg_partitions p WHERE p.partition = NEW.partition;
    -- A fenced write under an epoch that is not the partition's; or a state change left
    -- under an epoch the partition has moved past (a write that skipped the fence).
    IF (new_epoch IS DISTINCT FROM old_epoch AND new_epoch IS DISTINCT FROM current_epoch)
       OR (new_epoch < current_epoch
           AND (NEW.state, NEW.attempts, NEW.possible_duplicate, NEW.receipts, NEW.error)
               IS DISTINCT FROM (OLD.state, OLD.attempts, OLD.possible_duplicate, OLD.receipts,
                                 OLD.error)) THEN
        INSERT INTO stale_writes (id, partition, old_epoch, new_epoch, current_epoch,
                                  old_state, new_state)
        VALUES (NEW.id, NEW.partition, old_epoch, new_epoch, current_epoch,
                OLD.state, NEW.state);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER cg_test_stale_write BEFORE UPDATE ON outbox_messages
    FOR EACH ROW EXECUTE FUNCTION cg_test_stale_write();
";

// ---------------------------------------------------------------------------------------------
// Bots sending: each conversation's messages one at a time, by one task.

/// (conversation, sequence) -> message id, for every Send that returned OK.
type Acked = HashMap<(usize, usize), String>;

struct Traffic {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    failed: Arc<AtomicUsize>,
    /// The first few errors, for a failure's message.
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// `conversations` conversations `{prefix}{n}`, each sent `0`, `1`, … every `every`; message
    /// `s` of conversation `n` goes through `clients[(n + s) % len]`, so consecutive messages of
    /// a conversation go through different replicas when there are several. A failed Send is
    /// not retried: its number is left unacknowledged.
    fn start(
        fake: &FakeConnector,
        clients: Vec<Client>,
        prefix: &str,
        conversations: usize,
        every: Duration,
    ) -> Traffic {
        let traffic = Traffic {
            stop: Arc::default(),
            acked: Arc::default(),
            failed: Arc::default(),
            errors: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for conv in 0..conversations {
            let address = fake.address(&format!("{prefix}{conv}"));
            let mut clients = clients.clone();
            let (stop, acked, failed, errors) = (
                traffic.stop.clone(),
                traffic.acked.clone(),
                traffic.failed.clone(),
                traffic.errors.clone(),
            );
            // Spread over the period, so the Sends do not come in waves.
            let offset = every.mul_f64(conv as f64 / conversations as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let n = clients.len();
                    let client = &mut clients[(conv + seq) % n];
                    let sent = tokio::time::timeout(
                        CALL_TIMEOUT,
                        send_text(client, &address, seq.to_string()),
                    )
                    .await;
                    match sent {
                        Ok(Ok(r)) => {
                            acked.lock().unwrap().insert((conv, seq), r.message_id);
                        }
                        Ok(Err(e)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut errors = errors.lock().unwrap();
                            if errors.len() < 5 {
                                errors.push(format!("{:?}: {}", e.code(), e.message()));
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    seq += 1;
                    tokio::time::sleep(every).await;
                }
            }));
        }
        Traffic { tasks, ..traffic }
    }

    /// Stops sending; returns what was acknowledged.
    async fn stop(self) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.acked.lock().unwrap().clone()
    }

    fn failures(&self) -> String {
        format!(
            "{} Sends failed; first errors: {:?}",
            self.failed.load(Ordering::Relaxed),
            self.errors.lock().unwrap()
        )
    }
}

/// (conversation, sequence) of a received activity of `{prefix}{n}` with text `{seq}`.
fn parse(r: &Received, prefix: &str) -> Option<(usize, usize)> {
    let conv = r.conversation.strip_prefix(prefix)?.parse().ok()?;
    Some((conv, r.text().parse().ok()?))
}

/// The acknowledged messages not received (yet), sorted. Reads the fake's record in place: it
/// holds thousands of activities, and this runs in a polling loop.
fn missing(fake: &FakeConnector, prefix: &str, acked: &Acked) -> Vec<(usize, usize)> {
    let got: HashSet<(usize, usize)> = fake
        .state
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| parse(r, prefix))
        .collect();
    let mut missing: Vec<(usize, usize)> =
        acked.keys().filter(|k| !got.contains(k)).copied().collect();
    missing.sort_unstable();
    missing
}

/// Waits until every acknowledged message arrived; returns those that did not within `within`.
async fn wait_delivered(
    fake: &FakeConnector,
    prefix: &str,
    acked: &Acked,
    within: Duration,
) -> Vec<(usize, usize)> {
    let deadline = Instant::now() + within;
    loop {
        let m = missing(fake, prefix, acked);
        if m.is_empty() || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per conversation, the receipt instants of `{prefix}{n}` in arrival order.
fn receipts_by_conversation(fake: &FakeConnector, prefix: &str) -> BTreeMap<usize, Vec<Instant>> {
    let mut by: BTreeMap<usize, Vec<Instant>> = BTreeMap::new();
    for r in fake.state.received.lock().unwrap().iter() {
        if let Some((conv, _)) = parse(r, prefix) {
            by.entry(conv).or_default().push(r.at);
        }
    }
    by
}

/// The longest time a conversation went without a receipt within [from, to]: (gap, conversation).
fn longest_gap(
    fake: &FakeConnector,
    prefix: &str,
    from: Instant,
    to: Instant,
) -> (Duration, usize) {
    let mut worst = (Duration::ZERO, 0);
    for (conv, ats) in receipts_by_conversation(fake, prefix) {
        let mut last = from;
        for at in ats.into_iter().filter(|a| *a >= from && *a <= to) {
            worst = worst.max((at - last, conv));
            last = at;
        }
        worst = worst.max((to.saturating_duration_since(last), conv));
    }
    worst
}

async fn get_delivery(client: &mut Client, id: &str) -> Result<pb::Delivery, String> {
    let r = tokio::time::timeout(
        CALL_TIMEOUT,
        client.get_delivery(pb::GetDeliveryRequest {
            message_id: id.to_string(),
        }),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
    r.into_inner()
        .delivery
        .ok_or_else(|| "no delivery in the answer".to_string())
}

// ---------------------------------------------------------------------------------------------
// The tests.

const CHAOS_CONVERSATIONS: usize = 24;
const CHAOS_FOR: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_three_replicas_sigkill_and_sigstop() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let seed: u64 = std::env::var("CHANNEL_GATEWAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (CHANNEL_GATEWAY_TEST_SEED={seed} repeats the schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let fake = FakeConnector::start().await;
    fake.set_jitter(Duration::from_millis(5));
    *fake.state.fault_kinds.lock().unwrap() = vec!["500", "500", "500", "429"];
    *fake.state.fault_rate.lock().unwrap() = 0.3;

    let mut cluster = outbox_replicas(&fake).await;
    // The first replica creates the schema; the trigger goes on it before anything is written.
    cluster.start().await;
    cluster
        .db
        .batch_execute(STALE_WRITES_TRIGGER)
        .await
        .unwrap();
    cluster.start().await;
    cluster.start().await;

    let prefix = "chaos-";
    let traffic = Traffic::start(
        &fake,
        cluster.clients(),
        prefix,
        CHAOS_CONVERSATIONS,
        Duration::from_millis(200),
    );
    let began = Instant::now();
    // Once, early enough to leave time for kills after it: a pause longer than the lease.
    let pause_at_event = rng.random_range(1..=2);
    let (mut kills, mut event) = (0, 0);
    let mut paused = None;
    while began.elapsed() < CHAOS_FOR {
        tokio::time::sleep(Duration::from_millis(rng.random_range(5_000..=10_000))).await;
        let victim = rng.random_range(0..cluster.replicas.len());
        let name = cluster.replicas[victim].name;
        if event == pause_at_event {
            cluster.signal(victim, "STOP");
            tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
            cluster.signal(victim, "CONT");
            eprintln!("{:>5.1?}: replica {name} paused for 5 s", began.elapsed());
            paused = Some(name);
        } else {
            cluster.kill(victim);
            cluster.restart(victim).await;
            kills += 1;
            eprintln!(
                "{:>5.1?}: replica {name} killed and restarted",
                began.elapsed()
            );
        }
        event += 1;
    }
    let churn_ended = Instant::now();
    let sends = traffic.failures();
    let acked = traffic.stop().await;

    let mut problems = Problems::default();
    let lost = wait_delivered(&fake, prefix, &acked, Duration::from_secs(30)).await;
    for (conv, seq) in lost {
        problems.add(
            "acknowledged messages lost",
            format!("{prefix}{conv} message {seq}"),
        );
    }
    // Final states: no more faults, and nothing left to deliver (unacknowledged messages too).
    *fake.state.fault_rate.lock().unwrap() = 0.0;
    let unfinished =
        "SELECT count(*) FROM outbox_messages WHERE state IN ('accepted', 'delivering')";
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&cluster.db, unfinished).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = count(&cluster.db, unfinished).await;
    if left > 0 {
        problems.add(
            "messages never finished",
            format!("{left} messages still accepted or delivering 10 s after the end"),
        );
    }

    let received: Vec<(usize, usize)> = fake
        .state
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| parse(r, prefix))
        .collect();
    let stored = stored(&cluster.db).await;
    let (mut duplicated, mut flagged) = (0, 0);
    for conv in 0..CHAOS_CONVERSATIONS {
        let seqs: Vec<usize> = received
            .iter()
            .filter(|(c, _)| *c == conv)
            .map(|(_, s)| *s)
            .collect();
        // Order: the first arrival of each acknowledged message, in acknowledged order.
        // (position in arrivals, seq)
        let mut seen = HashSet::new();
        let firsts: Vec<(usize, usize)> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| acked.contains_key(&(conv, **s)) && seen.insert(**s))
            .map(|(i, s)| (i, *s))
            .collect();
        if let Some(w) = firsts.windows(2).find(|w| w[0].1 > w[1].1) {
            let around = &seqs[w[0].0.saturating_sub(5)..(w[1].0 + 5).min(seqs.len())];
            problems.add(
                "conversations out of order",
                format!(
                    "{prefix}{conv}: {} arrived before {} (arrivals around: {around:?})",
                    w[0].1, w[1].1
                ),
            );
        }
        let in_flight = fake.max_in_flight(&format!("{prefix}{conv}"));
        if in_flight > 1 {
            problems.add(
                "conversations with several messages in flight at once",
                format!("{prefix}{conv}: {in_flight} at once"),
            );
        }
        // Duplicates: each must be flagged in its final state.
        let mut times: BTreeMap<usize, usize> = BTreeMap::new();
        for s in &seqs {
            *times.entry(*s).or_default() += 1;
        }
        for (seq, n) in times.into_iter().filter(|(_, n)| *n > 1) {
            duplicated += 1;
            // (message id, flagged)
            let flag = match acked.get(&(conv, seq)) {
                // Acknowledged: ask a replica, any of them.
                Some(id) => {
                    let mut client = cluster.client(seq % cluster.replicas.len());
                    get_delivery(&mut client, id)
                        .await
                        .map(|d| (id.clone(), d.possible_duplicate))
                }
                // Its Send failed (the replica died answering): its row says.
                None => match stored.get(&(format!("{prefix}{conv}"), seq.to_string())) {
                    Some(rows) if rows.len() == 1 => {
                        Ok((rows[0].id.to_string(), rows[0].possible_duplicate))
                    }
                    other => Err(format!("stored as {other:?}")),
                },
            };
            match flag {
                Ok((_, true)) => flagged += 1,
                Ok((id, false)) => {
                    // When each copy arrived, and what the row says: which replica's write
                    // came last, under which epoch.
                    let name = format!("{prefix}{conv}");
                    let arrivals: Vec<String> = fake
                        .state
                        .received
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|r| r.conversation == name && r.text() == seq.to_string())
                        .map(|r| format!("{:.2?}", r.at.saturating_duration_since(began)))
                        .collect();
                    let row = cluster
                        .db
                        .query_opt(
                            "SELECT state, attempts, epoch, partition, updated_at_ms \
                             FROM outbox_messages WHERE id = $1",
                            &[&id.parse::<i64>().unwrap_or_default()],
                        )
                        .await
                        .ok()
                        .flatten()
                        .map(|r| {
                            format!(
                                "state {}, attempts {}, epoch {:?}, partition {}",
                                r.get::<_, String>(0),
                                r.get::<_, i32>(1),
                                r.get::<_, Option<i64>>(2),
                                r.get::<_, i16>(3)
                            )
                        })
                        .unwrap_or_default();
                    problems.add(
                        "duplicates not flagged possible_duplicate",
                        format!(
                            "{prefix}{conv} message {seq} (id {id}) arrived {n} times, at \
                             {arrivals:?}; row: {row}"
                        ),
                    )
                }
                Err(e) => problems.add(
                    "duplicates whose state is unknown",
                    format!("{prefix}{conv} message {seq} arrived {n} times; its state: {e}"),
                ),
            }
        }
    }

    let has_epoch = count(
        &cluster.db,
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'outbox_messages' AND column_name = 'epoch'",
    )
    .await
        == 1;
    if !has_epoch {
        problems.add(
            "unfenced schema",
            "outbox_messages has no epoch column: state writes are not fenced".into(),
        );
    }
    let stale = cluster
        .db
        .query(
            "SELECT id, partition, old_epoch, new_epoch, current_epoch, old_state, new_state \
             FROM stale_writes ORDER BY at LIMIT 20",
            &[],
        )
        .await
        .unwrap();
    let stale_total = count(&cluster.db, "SELECT count(*) FROM stale_writes").await;
    for r in &stale {
        problems.add(
            "states written under a stale epoch",
            format!(
                "message {} in partition {}: epoch {:?} -> {:?} while the partition is at {:?} \
                 ({:?} -> {:?})",
                r.get::<_, Option<i64>>(0).unwrap_or_default(),
                r.get::<_, Option<i32>>(1).unwrap_or_default(),
                r.get::<_, Option<i64>>(2),
                r.get::<_, Option<i64>>(3),
                r.get::<_, Option<i64>>(4),
                r.get::<_, Option<String>>(5),
                r.get::<_, Option<String>>(6),
            ),
        );
    }
    if stale_total > stale.len() as i64 {
        problems.add(
            "states written under a stale epoch",
            format!("and {} more", stale_total - stale.len() as i64),
        );
    }

    let faults = fake.state.faults.lock().unwrap().clone();
    let kind = |k: &str| faults.iter().filter(|(_, f, _)| *f == k).count();
    let stall = longest_gap(&fake, prefix, began, churn_ended);
    let flagged_rows: usize = stored
        .values()
        .flatten()
        .filter(|r| r.possible_duplicate)
        .count();
    let delivered_rows = stored
        .values()
        .flatten()
        .filter(|r| r.state == "delivered")
        .count();
    eprintln!(
        "chaos over {:.1?}: {kills} kills, paused {paused:?}; {} acknowledged ({sends}); {} \
         activities received, {} distinct; {duplicated} messages arrived more than once, \
         {flagged} of them flagged; {flagged_rows} rows flagged possible_duplicate, \
         {delivered_rows} delivered; faults: {} 500s, {} 429s; longest stall {:.2?} \
         ({prefix}{})",
        churn_ended - began,
        acked.len(),
        received.len(),
        received.iter().collect::<HashSet<_>>().len(),
        kind("500"),
        kind("429"),
        stall.0,
        stall.1,
    );

    // The chaos happened as planned, or the checks above proved little.
    assert!(
        kills >= 4 && paused.is_some(),
        "{kills} kills, paused {paused:?}"
    );
    assert!(
        acked.len() >= CHAOS_CONVERSATIONS * 20,
        "only {} Sends acknowledged: {sends}",
        acked.len()
    );
    assert!(
        kind("500") > 0 && kind("429") > 0,
        "fault injection did not happen as planned"
    );
    assert!(problems.0.is_empty(), "{problems}");
    // Not a given: a run can go without a kill catching a message on its way.
    if duplicated == 0 {
        eprintln!("no message arrived twice in this run");
    }
}

const FAILOVER_CONVERSATIONS: usize = 64;

/// Replicas A and B sharing their partitions, with a steady trickle to `n` conversations sent
/// through B alone: stopping A must not stop the Sends, only A's deliveries.
async fn two_replicas_sending_through_b(
    fake: &FakeConnector,
    prefix: &str,
    n: usize,
    every: Duration,
) -> (Replicas, usize, Traffic) {
    let mut cluster = outbox_replicas(fake).await;
    let a = cluster.start().await;
    let b = cluster.start().await;
    let traffic = Traffic::start(fake, vec![cluster.client(b)], prefix, n, every);
    wait_shared_by(&cluster.db, 2, Duration::from_secs(20)).await;
    (cluster, a, traffic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_failover_resumes_within_lease_plus_renewal() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let prefix = "failover-";
    let (mut cluster, a, traffic) = two_replicas_sending_through_b(
        &fake,
        prefix,
        FAILOVER_CONVERSATIONS,
        Duration::from_millis(400),
    )
    .await;
    // Every conversation delivered, and its partition known.
    let deadline = Instant::now() + Duration::from_secs(20);
    while receipts_by_conversation(&fake, prefix).len() < FAILOVER_CONVERSATIONS {
        assert!(
            Instant::now() < deadline,
            "not every conversation delivered: {} of {FAILOVER_CONVERSATIONS}; {}",
            receipts_by_conversation(&fake, prefix).len(),
            traffic.failures()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partition = partitions_of(&cluster.db, prefix).await;
    assert_eq!(partition.len(), FAILOVER_CONVERSATIONS);
    let before = holders(&cluster.db).await;
    assert_eq!(distinct(&before).len(), 2, "{}", describe(&before));

    let killed = cluster.kill(a);
    let bound = LEASE + RENEW_EVERY + Duration::from_secs(1);
    // B ends up holding everything; A's conversations are those whose holder was the other.
    let deadline = killed + bound + Duration::from_secs(10);
    let survivor = loop {
        let held = holders(&cluster.db).await;
        if let Some(s) = sole_holder(&held) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "B does not hold every partition {:?} after A's death: {}",
            killed.elapsed(),
            describe(&held)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let taken_over = killed.elapsed();
    assert!(
        distinct(&before).contains(&survivor),
        "the survivor {survivor} held nothing before: {}",
        describe(&before)
    );
    let of_a: Vec<usize> = (0..FAILOVER_CONVERSATIONS)
        .filter(|c| before[partition[c]].as_ref() != Some(&survivor))
        .collect();
    assert!(!of_a.is_empty(), "A held none of the conversations");

    // Each of A's conversations: the time from the kill to its next delivery.
    let deadline = killed + bound + Duration::from_secs(10);
    let resumed: Vec<(usize, Duration)> = loop {
        let by = receipts_by_conversation(&fake, prefix);
        let resumed: Vec<(usize, Duration)> = of_a
            .iter()
            .filter_map(|c| {
                let at = by.get(c)?.iter().find(|at| **at > killed)?;
                Some((*c, *at - killed))
            })
            .collect();
        if resumed.len() == of_a.len() {
            break resumed;
        }
        assert!(
            Instant::now() < deadline,
            "{} of A's {} conversations not delivered {:?} after the kill",
            of_a.len() - resumed.len(),
            of_a.len(),
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let worst = resumed.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let mut sorted: Vec<Duration> = resumed.iter().map(|(_, d)| *d).collect();
    sorted.sort_unstable();
    let now = Instant::now();
    let (b_gap, b_conv) = {
        let of_b: HashSet<usize> = (0..FAILOVER_CONVERSATIONS)
            .filter(|c| !of_a.contains(c))
            .collect();
        let by = receipts_by_conversation(&fake, prefix);
        let mut worst = (Duration::ZERO, 0);
        for (c, ats) in by.iter().filter(|(c, _)| of_b.contains(c)) {
            let mut last = killed;
            for at in ats.iter().filter(|a| **a > killed) {
                worst = worst.max((*at - last, *c));
                last = *at;
            }
            worst = worst.max((now - last, *c));
        }
        worst
    };
    let acked = traffic.stop().await;
    let lost = wait_delivered(&fake, prefix, &acked, Duration::from_secs(15)).await;
    eprintln!(
        "A held {} of {FAILOVER_CONVERSATIONS} conversations; B held every partition {taken_over:.2?} \
         after the kill; A's conversations resumed after {:.2?} (median) to {worst:.2?} (worst), \
         bound {bound:?}; B's own went at most {b_gap:.2?} without a delivery ({prefix}{b_conv}); \
         {} acknowledged",
        of_a.len(),
        sorted[sorted.len() / 2],
        acked.len()
    );
    assert!(
        worst <= bound,
        "A's conversations resumed {worst:?} after its death (bound {bound:?})"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost in the failover, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

const HANDOVER_CONVERSATIONS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_partitions_over_within_a_second() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let prefix = "handover-";
    let (mut cluster, a, traffic) = two_replicas_sending_through_b(
        &fake,
        prefix,
        HANDOVER_CONVERSATIONS,
        Duration::from_millis(250),
    )
    .await;
    let partition = partitions_of(&cluster.db, prefix).await;
    let before = holders(&cluster.db).await;
    assert_eq!(distinct(&before).len(), 2, "{}", describe(&before));

    cluster.signal(a, "TERM");
    let signalled = Instant::now();
    let mut child = cluster.take_child(a);
    let exit: Arc<Mutex<Option<(Instant, ExitStatus)>>> = Arc::default();
    let waiter = {
        let exit = exit.clone();
        std::thread::spawn(move || {
            let status = child.wait().unwrap();
            *exit.lock().unwrap() = Some((Instant::now(), status));
        })
    };
    let deadline = signalled + Duration::from_secs(15);
    let (survivor, handed_over) = loop {
        let held = holders(&cluster.db).await;
        if let Some(s) = sole_holder(&held) {
            break (s, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "A's partitions not handed over {:?} after SIGTERM: {}",
            signalled.elapsed(),
            describe(&held)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        distinct(&before).contains(&survivor),
        "the survivor {survivor} held nothing before: {}",
        describe(&before)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiter.is_finished() {
        assert!(Instant::now() < deadline, "A still runs 30 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiter.join().unwrap();
    let (exited, status) = exit.lock().unwrap().take().unwrap();
    let after_signal = handed_over - signalled;
    let after_exit = handed_over.saturating_duration_since(exited);
    let moved = before
        .iter()
        .filter(|h| h.as_ref() != Some(&survivor))
        .count();
    eprintln!(
        "A's {moved} partitions were held by B {after_signal:.3?} after SIGTERM, {after_exit:.3?} \
         after A exited ({status}, {:.3?} after the signal)",
        exited - signalled
    );
    assert!(status.success(), "A's exit after SIGTERM: {status}");
    assert!(
        after_exit <= Duration::from_secs(1) || after_signal <= Duration::from_millis(1500),
        "handed over {after_signal:?} after SIGTERM, {after_exit:?} after exiting"
    );

    // A's conversations go on, delivered by B.
    let of_a: Vec<usize> = partition
        .iter()
        .filter(|(_, p)| before[**p].as_ref() != Some(&survivor))
        .map(|(c, _)| *c)
        .collect();
    assert!(!of_a.is_empty(), "A held none of the conversations");
    let deadline = handed_over + Duration::from_secs(5);
    loop {
        let by = receipts_by_conversation(&fake, prefix);
        let waiting: Vec<usize> = of_a
            .iter()
            .filter(|c| {
                !by.get(c)
                    .is_some_and(|ats| ats.iter().any(|at| *at > handed_over))
            })
            .copied()
            .collect();
        if waiting.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's conversations {waiting:?} got nothing within 5 s of the handover; {}",
            traffic.failures()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = traffic.stop().await;
    let lost = wait_delivered(&fake, prefix, &acked, Duration::from_secs(15)).await;
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost in the handover, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
}

/// A SIGTERM hands over conversations with a backlog: every message A had not sent reaches B
/// unflagged. A marks a conversation's next message durably during the call before (so the
/// next call need not wait for a commit); a mark it leaves behind makes B resend that message
/// flagged `possible_duplicate` though no call of it was made. A takes such marks back before
/// it releases a partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigterm_handover_flags_nothing_a_did_not_send() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let prefix = "unflagged-";
    let conversations = 16;
    // Calls slower than the Sends: every conversation has a line, and its next message is
    // marked while the one before it is on its way.
    for c in 0..conversations {
        fake.set_latency(&format!("{prefix}{c}"), Duration::from_millis(150));
    }
    let (mut cluster, a, traffic) =
        two_replicas_sending_through_b(&fake, prefix, conversations, Duration::from_millis(50))
            .await;
    let before = holders(&cluster.db).await;
    assert_eq!(distinct(&before).len(), 2, "{}", describe(&before));
    // Lines build up on both replicas first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let marked_ahead = count(
        &cluster.db,
        &format!(
            "SELECT count(*) FROM outbox_messages WHERE state = 'delivering' \
             AND conversation LIKE '%/{prefix}%'"
        ),
    )
    .await;
    cluster.signal(a, "TERM");
    let mut child = cluster.take_child(a);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "A's exit after SIGTERM: {status}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while sole_holder(&holders(&cluster.db).await).is_none() {
        assert!(Instant::now() < deadline, "A's partitions never reached B");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B goes on for a while with A's conversations, then everything is delivered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = traffic.stop().await;
    let lost = wait_delivered(&fake, prefix, &acked, Duration::from_secs(30)).await;
    assert!(lost.is_empty(), "{} acknowledged messages lost", lost.len());
    let stored = stored(&cluster.db).await;
    let mine = || {
        stored
            .iter()
            .filter(|((conv, _), _)| conv.starts_with(prefix))
    };
    let flagged: Vec<&(String, String)> = mine()
        .filter(|(_, rows)| rows.iter().any(|r| r.possible_duplicate))
        .map(|(k, _)| k)
        .collect();
    let received = fake.received();
    let twice = mine()
        .filter(|((conv, text), _)| {
            received
                .iter()
                .filter(|r| r.conversation == *conv && r.text() == text.as_str())
                .count()
                > 1
        })
        .count();
    eprintln!(
        "{} messages, {marked_ahead} marked delivering at the SIGTERM; after the handover {} \
         flagged possible_duplicate, {twice} received twice",
        acked.len(),
        flagged.len()
    );
    assert!(
        marked_ahead > 0,
        "no message was marked at the SIGTERM: the test shows nothing"
    );
    assert_eq!(twice, 0, "A's calls in flight finished before it let go");
    assert!(
        flagged.is_empty(),
        "{} messages no call had reached flagged possible_duplicate after the handover, e.g. {:?}",
        flagged.len(),
        &flagged[..flagged.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_sent_to_two_replicas_stores_one_message() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let mut cluster = outbox_replicas(&fake).await;
    let a = cluster.start().await;
    let b = cluster.start().await;
    const KEYS: usize = 20;
    let conv = |k: usize| format!("idem-{}", k % 4);
    let mut ids = Vec::new();
    for k in 0..KEYS {
        let request = pb::SendRequest {
            message: Some(fake.text(&conv(k), &format!("key {k}"))),
            idempotency_key: format!("replicas-key-{k}"),
            ..Default::default()
        };
        let (mut ca, mut cb) = (cluster.client(a), cluster.client(b));
        // Both calls polled together: they reach their replicas at the same moment.
        let (ra, rb) = tokio::join!(
            tokio::time::timeout(CALL_TIMEOUT, ca.send(request.clone())),
            tokio::time::timeout(CALL_TIMEOUT, cb.send(request)),
        );
        let id = |r: Result<Result<tonic::Response<pb::SendResponse>, tonic::Status>, _>,
                  via: &str| match r {
            Ok(Ok(r)) => r.into_inner().message_id,
            Ok(Err(e)) => panic!("key {k} through {via}: {:?}: {}", e.code(), e.message()),
            Err(_) => panic!("key {k} through {via}: no answer within {CALL_TIMEOUT:?}"),
        };
        let (ia, ib) = (id(ra, "A"), id(rb, "B"));
        assert_eq!(ia, ib, "key {k}: two messages accepted");
        ids.push(ia);
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), KEYS, "one id for two keys: {ids:?}");
    let texts: Vec<String> = (0..KEYS).map(|k| format!("key {k}")).collect();
    fake.wait_for(Duration::from_secs(15), "every key's message", |r| {
        let got: HashSet<&str> = r.iter().map(Received::text).collect();
        texts.iter().all(|t| got.contains(t.as_str()))
    })
    .await;
    // A second copy would be on its way by now: give it time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received: Vec<String> = fake
        .received()
        .iter()
        .map(|r| r.text().to_string())
        .collect();
    let stored = stored(&cluster.db).await;
    for (k, text) in texts.iter().enumerate() {
        let n = received.iter().filter(|t| *t == text).count();
        assert_eq!(n, 1, "key {k}: received {n} times");
        let rows = stored.get(&(conv(k), text.clone()));
        assert_eq!(rows.map_or(0, Vec::len), 1, "key {k}: stored as {rows:?}");
    }
    assert_eq!(
        count(&cluster.db, "SELECT count(*) FROM outbox_messages").await,
        KEYS as i64
    );
}

/// Teams allows an app 50 messages a second per tenant (40 a second with bursts of 10, as the
/// gateway applies it): three replicas delivering 60 conversations of one tenant must hold that
/// together, not 50 each. Counted at the fake, over every one-second window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_rate_scope_holds_across_replicas() {
    let _serial = SERIAL.lock().await;
    let _watchdog = Watchdog::start();
    let fake = FakeConnector::start().await;
    let mut cluster = outbox_replicas(&fake).await;
    cluster.set_env(TEAMS_PACING, "true");
    for _ in 0..3 {
        cluster.start().await;
    }
    wait_shared_by(&cluster.db, 3, Duration::from_secs(20)).await;
    let conversations = 60;
    let per_conversation = 6;
    let clients = cluster.clients();
    // Warm up every replica's token and connections first: a replica's first call waits for a
    // token, which would delay the first arrival the seconds are counted from.
    for conv in 0..30 {
        let mut client = clients[conv % clients.len()].clone();
        send_text(
            &mut client,
            &fake.address(&format!("warmup-{conv}")),
            "warm".into(),
        )
        .await
        .unwrap();
    }
    fake.wait_for(Duration::from_secs(30), "the warm-up", |r| {
        r.iter()
            .filter(|x| x.conversation.starts_with("warmup-"))
            .count()
            >= 30
    })
    .await;
    let mut tasks = Vec::new();
    for conv in 0..conversations {
        let mut address = fake.address(&format!("tenant-{conv}"));
        if let Some(c) = address.conversation.as_mut() {
            c.tenant_id = "tenant-1".into();
        }
        let mut client = clients[conv % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_conversation {
                let message = pb::Message {
                    address: Some(Box::new(address.clone())),
                    text: format!("{i}"),
                    ..Default::default()
                };
                client
                    .send(pb::SendRequest {
                        message: Some(message),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = conversations * per_conversation;
    fake.wait_for(Duration::from_secs(60), "every message", |r| {
        r.iter()
            .filter(|x| x.conversation.starts_with("tenant-"))
            .count()
            >= total
    })
    .await;
    let mut at: Vec<Instant> = fake
        .received()
        .iter()
        .filter(|x| x.conversation.starts_with("tenant-"))
        .map(|x| x.at)
        .collect();
    at.sort();
    // Requests in each second from the first one, and (printed only: a sliding window also
    // catches a wake-up's few milliseconds of jitter at both of its ends) in any one second.
    let mut per_second = std::collections::BTreeMap::<u64, usize>::new();
    for t in &at {
        *per_second
            .entry(t.duration_since(at[0]).as_secs())
            .or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let mut sliding = 0;
    let mut j = 0;
    for i in 0..at.len() {
        while at[i].duration_since(at[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        sliding = sliding.max(i - j + 1);
    }
    let span = at[at.len() - 1].duration_since(at[0]).as_secs_f64();
    let rate = (at.len() - 1) as f64 / span.max(0.001);
    eprintln!(
        "{} messages of one Teams tenant through 3 replicas in {span:.2}s ({rate:.1}/s); busiest \
         second {busiest} (budget 40/s, burst 10: at most 50), busiest sliding second {sliding}; \
         per second: {:?}",
        at.len(),
        per_second.values().collect::<Vec<_>>()
    );
    assert!(
        busiest <= 50,
        "{busiest} requests in one second: the replicas did not share the tenant's budget"
    );
    // Shared, not starved: the run takes about (360 - 10) / 40 s.
    assert!(rate >= 25.0, "only {rate:.1} messages a second");
}
