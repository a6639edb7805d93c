//! The shared inbox's storage half (`channel_gateway::inbound::pg::PgInbox`) on a real
//! PostgreSQL (tests/pg): two handles on one database play two replicas. Dedupe across
//! replicas, deliveries per consumer group, exclusive conversation claims with an expiry on the
//! database's clock, filters, the feed's commit order and its head (a row committed late is
//! never skipped), conditional and forced releases, acks and attempts, and the sweep.
//!
//! Every test has its own database on the binary's shared cluster, except the head's, which
//! holds a transaction open and so gets a cluster of its own: transaction ids are the
//! cluster's, and an open one holds back every database's head. Tests on the shared cluster
//! read what they just appended with a bounded retry (`load_until`, `feed_until`): another
//! test's transaction that is open at that instant holds the head back for as long as it runs.

#[path = "pg/mod.rs"]
mod pg;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use channel_gateway::inbound::pg::{Filter, PgInbox, Row};
use channel_gateway::inbound::store::{DEFAULT_GROUP, NewEvent};
use channel_gateway::model::{Address, Conversation, Identity, Message};
use channel_gateway::outbox::now_ms;
use pg::PgCluster;

/// A lease no test outlives.
const LONG: Duration = Duration::from_secs(60);

/// How long a read may wait for a commit to come below the head (another test's transaction).
const SETTLE: Duration = Duration::from_secs(5);

fn group(name: &str) -> Arc<str> {
    Arc::from(name)
}

fn default() -> Arc<str> {
    group(DEFAULT_GROUP)
}

/// The conversation key the inbox stores: `channel/bot/conversation`.
fn conv(channel: &str, bot: &str, conversation: &str) -> Arc<str> {
    Arc::from(format!("{channel}/{bot}/{conversation}"))
}

/// An event as the inbox stores it: the message's JSON as the body, received now.
fn event(channel: &str, bot: &str, conversation: &str, key: &str, text: &str) -> NewEvent {
    let message = Message {
        address: Address {
            channel_id: channel.into(),
            bot: Some(Identity {
                id: bot.into(),
                ..Default::default()
            }),
            conversation: Some(Conversation {
                id: conversation.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        text: Some(text.into()),
        ..Default::default()
    };
    NewEvent {
        channel: channel.into(),
        bot_id: bot.into(),
        conversation: conv(channel, bot, conversation),
        dedupe_key: key.into(),
        received_at_ms: now_ms(),
        body: serde_json::to_vec(&message).unwrap(),
        message: Arc::new(message),
        reply: None,
    }
}

/// The text of a stored event (its body decoded).
fn text(row: &Row) -> String {
    let m: Message = serde_json::from_slice(&row.body).unwrap();
    m.text.unwrap_or_default()
}

fn texts(rows: &[Row]) -> Vec<String> {
    rows.iter().map(text).collect()
}

async fn append(pg: &PgInbox, events: Vec<NewEvent>) -> Vec<Option<u64>> {
    let reply_by = vec![None; events.len()];
    pg.append(&events, &reply_by).await.unwrap()
}

/// One event appended on its own; its id.
async fn append_one(pg: &PgInbox, e: NewEvent) -> u64 {
    append(pg, vec![e]).await[0].expect("a new event is stored")
}

/// Two replicas' handles on the database at `url`, each with its own pool as a replica has.
async fn replicas(url: &str) -> (Arc<PgInbox>, Arc<PgInbox>) {
    let a = PgInbox::start(pg::migrated_pool(url).await, "replica-a".into());
    let b = PgInbox::start(pg::migrated_pool(url).await, "replica-b".into());
    (a, b)
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `load`, again until it returns at least `n` rows or [`SETTLE`] passed; the last answer.
async fn load_until(pg: &PgInbox, group: &Arc<str>, convs: &[Arc<str>], n: usize) -> Vec<Row> {
    let end = Instant::now() + SETTLE;
    loop {
        let (rows, _) = pg.load(group, convs).await.unwrap();
        if rows.len() >= n || Instant::now() >= end {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `feed` from `after`, again from each returned cursor, until `n` rows came or [`SETTLE`]
/// passed; every row read, in the order read, and the last cursor.
async fn feed_until(pg: &PgInbox, mut after: i64, n: usize) -> (Vec<Row>, i64) {
    let end = Instant::now() + SETTLE;
    let mut all = Vec::new();
    loop {
        let (rows, next) = pg.feed(after).await.unwrap();
        assert!(
            next >= after,
            "the feed's cursor went back: {after} -> {next}"
        );
        all.extend(rows);
        after = next;
        if all.len() >= n || Instant::now() >= end {
            return (all, after);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(rows: &[Row]) -> Vec<u64> {
    rows.iter().map(|r| r.id).collect()
}

fn claimed(list: &[channel_gateway::inbound::pg::Claimed]) -> BTreeSet<String> {
    list.iter().map(|c| c.conversation.to_string()).collect()
}

fn set(items: &[&Arc<str>]) -> BTreeSet<String> {
    items.iter().map(|c| c.to_string()).collect()
}

/// The claim row of (group, conversation): its holder, if any.
async fn holder(db: &tokio_postgres::Client, group: &str, conversation: &str) -> Option<String> {
    db.query_opt(
        "SELECT replica FROM inbox_claims WHERE grp = $1 AND conversation = $2",
        &[&group, &conversation],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_retry_through_another_replica_is_stored_once() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let c = conv("slack", "bot-1", "c1");

    let first = append(&a, vec![event("slack", "bot-1", "c1", "k1", "first")]).await;
    assert!(first[0].is_some(), "a new event is stored: {first:?}");
    let retry = append(&b, vec![event("slack", "bot-1", "c1", "k1", "retry")]).await;
    assert_eq!(retry, vec![None], "the retry through B is left out");

    // The key is the channel's: another channel's event with the same id is its own.
    let other = append(&b, vec![event("telegram", "bot-1", "c1", "k1", "telegram")]).await;
    assert!(
        other[0].is_some(),
        "another channel's key is new: {other:?}"
    );

    // Two events with one key in one batch: the first is the one stored.
    let batch = append(
        &b,
        vec![
            event("slack", "bot-1", "c1", "k2", "batch first"),
            event("slack", "bot-1", "c1", "k2", "batch second"),
        ],
    )
    .await;
    assert!(batch[0].is_some() && batch[1].is_none(), "{batch:?}");

    let rows = load_until(&a, &default(), std::slice::from_ref(&c), 2).await;
    assert_eq!(texts(&rows), ["first", "batch first"]);
    assert_eq!(ids(&rows), [first[0].unwrap(), batch[0].unwrap()]);
    assert_eq!(
        a.recount().await.unwrap().0,
        3,
        "slack k1, slack k2, telegram k1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_existing_at_the_append_gets_a_delivery_and_a_later_group_none() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let c = conv("slack", "bot-1", "c1");
    b.add_group("g1").await.unwrap();
    // Adding an existing group changes nothing.
    a.add_group("g1").await.unwrap();
    assert_eq!(a.groups("g1").await.unwrap(), (true, 2));

    let id = append_one(&a, event("slack", "bot-1", "c1", "k1", "before g2")).await;
    let convs = [c.clone()];
    for g in [default(), group("g1")] {
        let rows = load_until(&b, &g, &convs, 1).await;
        assert_eq!(ids(&rows), [id], "group {g}");
        assert_eq!(&*rows[0].group, &*g);
    }

    a.add_group("g2").await.unwrap();
    assert_eq!(a.groups("g2").await.unwrap(), (true, 3));
    assert_eq!(a.groups("g3").await.unwrap(), (false, 3));
    let later = append_one(&b, event("slack", "bot-1", "c1", "k2", "after g2")).await;
    // The default group sees both once the later one is below the head, so g2's read is too.
    assert_eq!(
        ids(&load_until(&a, &default(), &convs, 2).await),
        [id, later]
    );
    let (rows, _) = a.load(&group("g2"), &convs).await.unwrap();
    assert_eq!(ids(&rows), [later], "g2 gets only what came after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_exclusive_until_its_lease_runs_out_and_renewing_keeps_it() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let c = conv("slack", "bot-1", "c1");
    append_one(&a, event("slack", "bot-1", "c1", "k1", "hello")).await;
    let lease = Duration::from_millis(800);
    let any = Filter::default();
    let held = [(default(), c.clone())];

    let got = a.claim(DEFAULT_GROUP, &any, 10, lease).await.unwrap();
    let claimed_at = Instant::now();
    assert_eq!(claimed(&got), set(&[&c]));
    assert!(!got[0].taken_over, "nobody held it before");
    assert!(
        b.claim(DEFAULT_GROUP, &any, 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "B took a conversation A holds"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let renew_sent = Instant::now();
    let kept = a.renew(&held, lease).await.unwrap();
    assert!(kept.contains(&held[0]), "A's running claim was not renewed");

    // Past the first lease (counted from when the claim returned), within the renewed one.
    tokio::time::sleep_until((claimed_at + Duration::from_millis(950)).into()).await;
    assert!(
        b.claim(DEFAULT_GROUP, &any, 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "B took a conversation A renewed"
    );
    assert!(
        renew_sent.elapsed() < lease,
        "the machine stalled: the check ran after the renewed lease ({:?})",
        renew_sent.elapsed()
    );

    // A stops renewing: B takes it once the renewed lease ran out on the database's clock.
    let end = Instant::now() + Duration::from_secs(5);
    let taken = loop {
        let got = b.claim(DEFAULT_GROUP, &any, 10, lease).await.unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < end, "B never took the lapsed claim");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        renew_sent.elapsed() >= lease,
        "B took it {:?} after A's renewal of {lease:?}",
        renew_sent.elapsed()
    );
    assert_eq!(claimed(&taken), set(&[&c]));
    assert!(taken[0].taken_over, "a lapsed claim taken is flagged");
    assert!(
        a.renew(&held, lease).await.unwrap().is_empty(),
        "A renewed a claim B holds"
    );

    // A clean hand-over: B gives it up (forced, the event is still there), A takes it unflagged.
    assert_eq!(b.release(vec![(default(), c.clone(), true)]).await, [true]);
    let again = a.claim(DEFAULT_GROUP, &any, 10, LONG).await.unwrap();
    assert_eq!(claimed(&again), set(&[&c]));
    assert!(
        !again[0].taken_over,
        "a released conversation is not a take-over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_claiming_at_once_never_both_get_a_conversation() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let events: Vec<NewEvent> = (0..60)
        .map(|i| event("slack", "bot-1", &format!("c{i}"), &format!("k{i}"), "x"))
        .collect();
    append(&a, events).await;
    let any = Filter::default();
    // Small rounds, so the two race for the same candidates many times.
    let round = |pg: Arc<PgInbox>| {
        let any = any.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..20 {
                got.extend(pg.claim(DEFAULT_GROUP, &any, 5, LONG).await.unwrap());
            }
            claimed(&got)
        })
    };
    let (ga, gb) = (round(a.clone()), round(b.clone()));
    let (ga, gb) = (ga.await.unwrap(), gb.await.unwrap());
    let both: Vec<&String> = ga.intersection(&gb).collect();
    assert!(both.is_empty(), "claimed by both replicas: {both:?}");
    assert_eq!(ga.len() + gb.len(), 60, "A {} + B {}", ga.len(), gb.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_only_conversations_its_filter_accepts() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    a.add_group("g1").await.unwrap();
    a.add_group("g2").await.unwrap();
    let slack_x = conv("slack", "bot-x", "c1");
    let slack_y = conv("slack", "bot-y", "c2");
    let tg_x = conv("telegram", "bot-x", "c3");
    let tg_y = conv("telegram", "bot-y", "c4");
    append(
        &a,
        vec![
            event("slack", "bot-x", "c1", "k1", "1"),
            event("slack", "bot-y", "c2", "k2", "2"),
            event("telegram", "bot-x", "c3", "k3", "3"),
            event("telegram", "bot-y", "c4", "k4", "4"),
        ],
    )
    .await;
    let filter = |bots: Option<&[&str]>, channels: Option<&[&str]>| Filter {
        bots: bots.map(|b| b.iter().map(|s| s.to_string()).collect()),
        channels: channels.map(|c| c.iter().map(|s| s.to_string()).collect()),
    };

    let unknown = a
        .claim(DEFAULT_GROUP, &filter(Some(&["bot-z"]), None), 10, LONG)
        .await
        .unwrap();
    assert!(unknown.is_empty(), "{unknown:?}");
    let by_bot = a
        .claim(DEFAULT_GROUP, &filter(Some(&["bot-x"]), None), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&by_bot), set(&[&slack_x, &tg_x]));
    let by_channel = b
        .claim("g1", &filter(None, Some(&["telegram"])), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&by_channel), set(&[&tg_x, &tg_y]));
    let both = b
        .claim("g2", &filter(Some(&["bot-y"]), Some(&["slack"])), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&both), set(&[&slack_y]));
    // What the filters left is there for anyone.
    let rest = b
        .claim(DEFAULT_GROUP, &Filter::default(), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&rest), set(&[&slack_y, &tg_y]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_returns_only_this_replicas_conversations_in_commit_order() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let mine = Filter {
        bots: Some(vec!["bot-a".into()]),
        channels: None,
    };
    let e1 = append_one(&a, event("slack", "bot-a", "c1", "k1", "a1")).await;
    let e2 = append_one(&b, event("slack", "bot-b", "c2", "k2", "b1")).await;
    let got = a.claim(DEFAULT_GROUP, &mine, 10, LONG).await.unwrap();
    assert_eq!(claimed(&got), set(&[&conv("slack", "bot-a", "c1")]));
    let got = b
        .claim(DEFAULT_GROUP, &Filter::default(), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&got), set(&[&conv("slack", "bot-b", "c2")]));
    // Stored through the other replica, in one batch with an event nobody holds: ids and the
    // batch's order are not what orders the feed, the commit is.
    let batch = append(
        &b,
        vec![
            event("slack", "bot-a", "c1", "k3", "a2"),
            event("slack", "bot-c", "c3", "k4", "nobody's"),
            event("slack", "bot-a", "c1", "k5", "a3"),
        ],
    )
    .await;
    let (e3, e5) = (batch[0].unwrap(), batch[2].unwrap());

    let (rows, cursor) = feed_until(&a, 0, 3).await;
    assert_eq!(ids(&rows), [e1, e3, e5], "A's feed: {:?}", texts(&rows));
    assert!(
        rows.windows(2).all(|w| w[0].seq < w[1].seq),
        "not in seq order"
    );
    assert!(
        cursor >= rows[2].seq,
        "the cursor {cursor} is behind what it returned"
    );
    let (again, next) = a.feed(cursor).await.unwrap();
    assert!(again.is_empty(), "read twice: {:?}", texts(&again));
    assert!(next >= cursor);

    let e6 = append_one(&b, event("slack", "bot-a", "c1", "k6", "a4")).await;
    let e7 = append_one(&a, event("slack", "bot-b", "c2", "k7", "b2")).await;
    let (rows, later) = feed_until(&a, next, 1).await;
    assert_eq!(ids(&rows), [e6], "A's next feed: {:?}", texts(&rows));
    assert!(rows[0].seq > cursor && later >= rows[0].seq);

    let (rows, _) = feed_until(&b, 0, 2).await;
    assert_eq!(ids(&rows), [e2, e7], "B's feed: {:?}", texts(&rows));
}

/// Inserts an event and its delivery in `tx`'s transaction as an append does (its seq from
/// this transaction's id): another replica's append that began early and commits late.
async fn append_in(tx: &tokio_postgres::Client, conversation: &str, text: &str) -> i64 {
    let body = serde_json::to_vec(&Message {
        text: Some(text.into()),
        ..Default::default()
    })
    .unwrap();
    let id: i64 = tx
        .query_one("SELECT nextval('cg_inbox_event_id')", &[])
        .await
        .unwrap()
        .get(0);
    tx.execute(
        "INSERT INTO inbox_events (id, channel, bot_id, conversation, received_at_ms, body) \
         VALUES ($1, 'slack', 'bot-1', $2, $3, $4)",
        &[&id, &conversation, &(now_ms() as i64), &body],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO inbox_deliveries (grp, event_id, conversation, channel, bot_id, seq) \
         VALUES ('default', $1, $2, 'slack', 'bot-1', pg_current_xact_id()::text::int8 << 24)",
        &[&id, &conversation],
    )
    .await
    .unwrap();
    id
}

async fn seq_of(db: &tokio_postgres::Client, id: u64) -> i64 {
    db.query_one(
        "SELECT seq FROM inbox_deliveries WHERE event_id = $1 AND grp = 'default'",
        &[&(id as i64)],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_an_older_open_transaction_waits_below_the_head() {
    // Its own cluster: the open transactions below hold back every database's head.
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = cluster.url().to_string();
    let (a, _b) = replicas(&url).await;
    let c = conv("slack", "bot-1", "c1");
    let convs = [c.clone()];
    let db = raw(&url).await;
    let e1 = append_one(&a, event("slack", "bot-1", "c1", "k1", "e1")).await;
    let got = a
        .claim(DEFAULT_GROUP, &Filter::default(), 10, LONG)
        .await
        .unwrap();
    assert_eq!(claimed(&got), set(&[&c]));
    let (rows, cursor) = feed_until(&a, 0, 1).await;
    assert_eq!(ids(&rows), [e1]);

    // Another replica's append has begun (it has a transaction id) and inserted its event.
    let late = raw(&url).await;
    late.batch_execute("BEGIN").await.unwrap();
    let late_id = append_in(&late, &c, "late").await;
    // This append begins after it and commits first.
    let e2 = append_one(&a, event("slack", "bot-1", "c1", "k2", "e2")).await;
    let e2_seq = seq_of(&db, e2).await;
    let visible: i64 = db
        .query_one(
            "SELECT count(*) FROM inbox_deliveries WHERE event_id = $1",
            &[&(e2 as i64)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, 1, "e2 is committed: only the head holds it back");
    for _ in 0..3 {
        let (rows, next) = a.feed(cursor).await.unwrap();
        assert!(rows.is_empty(), "read above the head: {:?}", texts(&rows));
        assert!(
            next < e2_seq,
            "the cursor {next} passed e2 ({e2_seq}) while an older transaction is open"
        );
        let (rows, head) = a.load(&default(), &convs).await.unwrap();
        assert_eq!(
            ids(&rows),
            [e1],
            "load read above the head: {:?}",
            texts(&rows)
        );
        assert!(head < e2_seq);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    late.batch_execute("COMMIT").await.unwrap();
    let late_seq = seq_of(&db, late_id as u64).await;
    assert!(
        late_seq < e2_seq,
        "the late row's seq is its (older) transaction's"
    );
    let (rows, cursor) = feed_until(&a, cursor, 2).await;
    assert_eq!(
        ids(&rows),
        [late_id as u64, e2],
        "the row committed late must come, before e2: {:?}",
        texts(&rows)
    );
    let (rows, _) = a.load(&default(), &convs).await.unwrap();
    assert_eq!(ids(&rows), [e1, late_id as u64, e2]);

    // A transaction that only took an id and rolls back holds the head as long.
    let idle = raw(&url).await;
    idle.batch_execute("BEGIN").await.unwrap();
    idle.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    let e3 = append_one(&a, event("slack", "bot-1", "c1", "k3", "e3")).await;
    let e3_seq = seq_of(&db, e3).await;
    let (rows, next) = a.feed(cursor).await.unwrap();
    assert!(rows.is_empty(), "read above the head: {:?}", texts(&rows));
    assert!(next < e3_seq, "the cursor {next} passed e3 ({e3_seq})");
    let (rows, _) = a.load(&default(), &convs).await.unwrap();
    assert_eq!(ids(&rows), [e1, late_id as u64, e2]);
    idle.batch_execute("ROLLBACK").await.unwrap();
    let (rows, _) = feed_until(&a, next, 1).await;
    assert_eq!(ids(&rows), [e3]);
    assert_eq!(
        ids(&a.load(&default(), &convs).await.unwrap().0),
        [e1, late_id as u64, e2, e3]
    );
    drop((a, db, late, idle));
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_gives_a_conversation_up_only_when_empty_unless_forced_and_only_by_its_holder() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let db = raw(&url).await;
    let any = Filter::default();
    let (c1, c2, c3) = (
        conv("slack", "bot-1", "c1"),
        conv("slack", "bot-1", "c2"),
        conv("slack", "bot-1", "c3"),
    );
    let id1 = append_one(&a, event("slack", "bot-1", "c1", "k1", "1")).await;
    let got = a.claim(DEFAULT_GROUP, &any, 10, LONG).await.unwrap();
    assert_eq!(claimed(&got), set(&[&c1]));

    // Conditional, with a delivery left: kept.
    assert_eq!(
        a.release(vec![(default(), c1.clone(), false)]).await,
        [false]
    );
    assert_eq!(
        holder(&db, DEFAULT_GROUP, &c1).await.as_deref(),
        Some("replica-a")
    );
    // Acked, then conditional: gone.
    a.ack(default(), id1);
    a.flush().await;
    assert_eq!(
        a.release(vec![(default(), c1.clone(), false)]).await,
        [true]
    );
    assert_eq!(holder(&db, DEFAULT_GROUP, &c1).await, None);

    // Forced, with a delivery left: gone, the delivery stays for the next holder.
    let id2 = append_one(&a, event("slack", "bot-1", "c2", "k2", "2")).await;
    let got = a.claim(DEFAULT_GROUP, &any, 10, LONG).await.unwrap();
    assert_eq!(claimed(&got), set(&[&c2]));
    assert_eq!(a.release(vec![(default(), c2.clone(), true)]).await, [true]);
    assert_eq!(holder(&db, DEFAULT_GROUP, &c2).await, None);
    assert_eq!(
        ids(&a
            .load(&default(), std::slice::from_ref(&c2))
            .await
            .unwrap()
            .0),
        [id2]
    );

    // Not the holder: neither kind of release touches A's claim.
    append_one(&a, event("slack", "bot-1", "c3", "k3", "3")).await;
    let got = a.claim(DEFAULT_GROUP, &any, 1, LONG).await.unwrap();
    let held = got[0].conversation.clone();
    assert_eq!(
        b.release(vec![
            (default(), held.clone(), true),
            (default(), held.clone(), false)
        ])
        .await,
        [false, false]
    );
    assert_eq!(
        holder(&db, DEFAULT_GROUP, &held).await.as_deref(),
        Some("replica-a")
    );
    // And a release of something nobody holds answers false.
    assert_eq!(
        b.release(vec![(group("g-none"), c3.clone(), true)]).await,
        [false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_goes_once_every_group_acked_it_and_attempts_only_rise() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let c1 = conv("slack", "bot-1", "c1");
    let c2 = conv("slack", "bot-1", "c2");
    let c3 = conv("slack", "bot-1", "c3");

    // One group: its ack removes the event.
    let id1 = append_one(&a, event("slack", "bot-1", "c1", "k1", "1")).await;
    assert_eq!(a.recount().await.unwrap().0, 1);
    b.ack(default(), id1);
    b.flush().await;
    assert_eq!(a.recount().await.unwrap().0, 0, "the acked event stayed");
    assert!(
        a.load(&default(), std::slice::from_ref(&c1))
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // Two groups: it stays until both acked, whichever replica acks.
    a.add_group("g1").await.unwrap();
    let id2 = append_one(&a, event("slack", "bot-1", "c2", "k2", "2")).await;
    a.ack(default(), id2);
    a.flush().await;
    assert_eq!(a.recount().await.unwrap().0, 1, "g1 has not acked it");
    assert!(
        a.load(&default(), std::slice::from_ref(&c2))
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let rows = load_until(&a, &group("g1"), std::slice::from_ref(&c2), 1).await;
    assert_eq!(ids(&rows), [id2]);
    b.ack(group("g1"), id2);
    b.flush().await;
    assert_eq!(a.recount().await.unwrap().0, 0, "both groups acked it");

    // Attempts: raised, never lowered, per group.
    let id3 = append_one(&a, event("slack", "bot-1", "c3", "k3", "3")).await;
    let attempts = |rows: Vec<Row>| rows.iter().map(|r| r.attempts).collect::<Vec<_>>();
    let convs = [c3.clone()];
    assert_eq!(attempts(load_until(&a, &default(), &convs, 1).await), [0]);
    a.attempt(default(), id3, 3);
    a.flush().await;
    assert_eq!(attempts(a.load(&default(), &convs).await.unwrap().0), [3]);
    b.attempt(default(), id3, 1);
    b.flush().await;
    assert_eq!(
        attempts(a.load(&default(), &convs).await.unwrap().0),
        [3],
        "an attempt count went down"
    );
    a.attempt(default(), id3, 5);
    a.flush().await;
    assert_eq!(attempts(a.load(&default(), &convs).await.unwrap().0), [5]);
    assert_eq!(
        attempts(a.load(&group("g1"), &convs).await.unwrap().0),
        [0],
        "another group's count moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_expires_unheld_old_events_idle_groups_and_old_dedupe_keys() {
    let url = PgCluster::shared().create_database();
    let (a, b) = replicas(&url).await;
    let db = raw(&url).await;
    a.add_group("g-idle").await.unwrap();
    a.add_group("g-used").await.unwrap();
    let hour_ago = now_ms() - 3_600_000;
    let old = |channel: &str, bot: &str, c: &str, key: &str| NewEvent {
        received_at_ms: hour_ago,
        ..event(channel, bot, c, key, key)
    };
    let ids = append(
        &a,
        vec![
            old("slack", "bot-1", "c1", "old-slack"),
            old("slack", "bot-held", "c2", "old-held"),
            old("telegram", "bot-1", "c3", "old-telegram"),
            event("slack", "bot-1", "c4", "fresh", "fresh"),
        ],
    )
    .await;
    assert!(ids.iter().all(Option::is_some), "{ids:?}");
    let held = conv("slack", "bot-held", "c2");
    let fresh = conv("slack", "bot-1", "c4");
    let got = b
        .claim(
            DEFAULT_GROUP,
            &Filter {
                bots: Some(vec!["bot-held".into()]),
                channels: None,
            },
            10,
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(claimed(&got), set(&[&held]));
    // Age what the API stamps with the time: g-idle and `default` unseen for a day, one key
    // seen a day ago.
    db.batch_execute(
        "UPDATE inbox_groups SET seen_at_ms = seen_at_ms - 86400000 \
           WHERE name IN ('g-idle', 'default'); \
         UPDATE inbox_dedupe SET seen_at_ms = seen_at_ms - 86400000 WHERE key = 'old-slack'",
    )
    .await
    .unwrap();
    let all = [
        conv("slack", "bot-1", "c1"),
        held.clone(),
        conv("telegram", "bot-1", "c3"),
        fresh.clone(),
    ];
    assert_eq!(load_until(&a, &default(), &all, 4).await.len(), 4);

    let cutoff = now_ms() - 600_000;
    let swept = a.sweep(cutoff, cutoff, cutoff, &[]).await.unwrap();
    let mut expired = swept.expired.clone();
    expired.sort();
    // Claims are per group: g-used holds nothing, so its delivery of the held conversation
    // expires too. g-idle's deliveries went with the group, uncounted.
    assert_eq!(
        expired,
        [("slack".to_string(), 3), ("telegram".to_string(), 2)],
        "per channel: default's c1, g-used's c1 and c2; default's and g-used's c3"
    );
    assert_eq!(swept.groups_removed, 1);
    assert_eq!(a.groups("g-idle").await.unwrap(), (false, 2));
    assert!(a.groups("default").await.unwrap().0, "default removed");
    assert!(
        a.groups("g-used").await.unwrap().0,
        "a group in use removed"
    );
    let idle_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM inbox_deliveries WHERE grp = 'g-idle'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(idle_rows, 0, "the removed group's deliveries stayed");

    let left = a.load(&default(), &all).await.unwrap().0;
    assert_eq!(
        left.iter()
            .map(|r| r.conversation.to_string())
            .collect::<Vec<_>>(),
        [held.to_string(), fresh.to_string()],
        "the held old event and the fresh one stay"
    );
    let used = a.load(&group("g-used"), &all).await.unwrap().0;
    assert_eq!(
        used.iter()
            .map(|r| r.conversation.to_string())
            .collect::<Vec<_>>(),
        [fresh.to_string()]
    );
    assert_eq!(
        a.recount().await.unwrap().0,
        2,
        "expired events stayed stored"
    );

    // The old key is forgotten: its event is new again; the recent ones are still retries.
    let again = append(
        &b,
        vec![
            old("slack", "bot-1", "c1", "old-slack"),
            old("telegram", "bot-1", "c3", "old-telegram"),
            event("slack", "bot-1", "c4", "fresh", "fresh"),
        ],
    )
    .await;
    assert!(again[0].is_some(), "a forgotten key still dedupes");
    assert_eq!(&again[1..], [None, None], "a recent key was forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_short_of_credit_claims_the_longest_waiting_conversation_first() {
    let url = PgCluster::shared().create_database();
    let (a, _b) = replicas(&url).await;
    // Stored z, m, a: the names sort the other way, so a claim in name order would take the
    // newest first and could leave z behind for good.
    for (n, c) in ["z1", "m1", "a1"].iter().enumerate() {
        append_one(&a, event("slack", "bot", c, &format!("k{n}"), c)).await;
    }
    let lease = Duration::from_secs(30);
    let mut order = Vec::new();
    for _ in 0..3 {
        let got = a
            .claim(&default(), &Filter::default(), 1, lease)
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "one conversation per claim of one");
        order.push(got[0].conversation.to_string());
    }
    assert_eq!(
        order,
        vec![
            conv("slack", "bot", "z1").to_string(),
            conv("slack", "bot", "m1").to_string(),
            conv("slack", "bot", "a1").to_string(),
        ]
    );
}
