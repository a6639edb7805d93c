//! The outbox on PostgreSQL (`outbox.backend = "postgres"`, one replica), against throwaway
//! clusters (tests/pg): the store through its public API (reopen, overlay, compaction, text
//! PostgreSQL cannot hold, an outage that ends), an in-process gateway (order, GetDelivery,
//! ListFailed/Redeliver, idempotency across a restart), and a database outage under a running
//! gateway (UNAVAILABLE, not ready, then back; messages in line wait for it). The SIGKILL tests
//! (tests/crash.rs) run on PostgreSQL with the rest of the suite (`scripts/test.sh`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::*;
use serde_json::json;
use tonic::Code;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::config::{OutboxBackend, Secret};
use channel_gateway::outbox::{
    Change, DeliveryState, IdempotencyRecord, Outcome, PostgresStore, StateRecord, Store,
    StoreError, StoredMessage, now_ms,
};
use channel_gateway::storage::postgres::PostgresConfig;

fn pg_config(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url),
        pool_size: 4,
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::default()
    }
}

fn msg(id: u64, conversation: &str) -> StoredMessage {
    StoredMessage {
        id,
        conversation: conversation.into(),
        message: Default::default(),
        proactive: None,
        accepted_at_ms: now_ms(),
        record: StateRecord::new(DeliveryState::Accepted, now_ms()),
        warnings: vec![],
        op: None,
    }
}

fn finished(state: DeliveryState, attempts: u32) -> Outcome {
    Outcome {
        state,
        receipts: vec![],
        error: None,
        attempts,
        possible_duplicate: false,
    }
}

/// Runs a blocking cluster operation off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn scalar(url: &str, sql: &str) -> i64 {
    let pool = channel_gateway::storage::postgres::connect(&pg_config(url))
        .await
        .unwrap();
    let c = channel_gateway::storage::postgres::get(&pool)
        .await
        .unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_reopen_and_tracks_states() {
    let url = PgCluster::shared().create_database();
    {
        let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
        assert_eq!(s.next_id() % (1 << 40), 0, "a whole block of ids per start");
        s.append(
            vec![msg(1, "c"), msg(2, "c"), msg(3, "c")],
            Some((
                "k".into(),
                IdempotencyRecord {
                    created_at_ms: 5,
                    message_ids: vec![1, 2, 3],
                },
            )),
        )
        .await
        .unwrap();
        s.update(1, Change::Delivering { attempts: 1 })
            .await
            .unwrap();
        s.update(2, Change::Finished(finished(DeliveryState::Failed, 2)))
            .await
            .unwrap();
        // Seen at once, before it is committed.
        s.record(3, Change::Delivering { attempts: 1 });
        assert_eq!(
            s.get(3).await.unwrap().unwrap().record.state,
            DeliveryState::Delivering
        );
        s.record(3, Change::Waiting { attempts: 1 });
        // Give the writer its moment: nothing waits for a record.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    assert!(
        s.next_id() > 3 && s.next_id() % (1 << 40) == 0,
        "a new block per start"
    );
    let pending: Vec<(u64, DeliveryState)> = s
        .pending()
        .await
        .unwrap()
        .iter()
        .map(|m| (m.id, m.record.state))
        .collect();
    assert_eq!(
        pending,
        vec![(1, DeliveryState::Delivering), (3, DeliveryState::Accepted)]
    );
    let failed: Vec<u64> = s
        .failed(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(failed, vec![2]);
    assert_eq!(
        s.idempotency_get("k").await.unwrap().unwrap().message_ids,
        vec![1, 2, 3]
    );
    // Redelivered after a reopen: its state is not in memory, the change sets its columns.
    s.update(2, Change::Requeued).await.unwrap();
    let m = s.get(2).await.unwrap().unwrap();
    assert_eq!(
        (m.record.state, m.record.attempts),
        (DeliveryState::Accepted, 2)
    );
    assert!(s.failed(0, 10).await.unwrap().is_empty());
    s.update(2, Change::Delivering { attempts: 3 })
        .await
        .unwrap();
    let done = finished(DeliveryState::Delivered, 3);
    s.update(2, Change::Finished(done.clone())).await.unwrap();
    assert_eq!(s.get(2).await.unwrap().unwrap().outcome(), done);
    // The rows as an operator sees them.
    assert_eq!(
        scalar(
            &url,
            "SELECT count(*) FROM outbox_messages WHERE state = 'delivered' AND attempts = 3"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &url,
            "SELECT count(DISTINCT partition)::int8 FROM outbox_messages"
        )
        .await,
        1,
        "one conversation, one partition"
    );
    // Compaction: the delivered one goes, the old key goes, ids are never reused.
    assert_eq!(s.compact(u64::MAX, 6).await, 1);
    assert!(s.get(2).await.unwrap().is_none());
    assert!(s.idempotency_get("k").await.unwrap().is_none());
    let first = s.next_id();
    drop(s);
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    assert!(s.next_id() > first, "ids are never reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_postgresql_cannot_hold_reads_back_as_written() {
    let url = PgCluster::shared().create_database();
    let conversation = "msteams/B1/a\0b\\0c\\";
    let key = "send\u{1f}bot\u{1f}k\0\\0";
    {
        let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
        let mut m = msg(7, conversation);
        std::sync::Arc::make_mut(&mut m.message).text = Some("nul \0 and 😀".into());
        s.append(
            vec![m],
            Some((
                key.into(),
                IdempotencyRecord {
                    created_at_ms: now_ms(),
                    message_ids: vec![7],
                },
            )),
        )
        .await
        .unwrap();
        // A key that differs only where the escape would collide is another key.
        assert!(
            s.idempotency_get("send\u{1f}bot\u{1f}k\\0\\0")
                .await
                .unwrap()
                .is_none()
        );
    }
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    let back = s.get(7).await.unwrap().unwrap();
    assert_eq!(back.conversation, conversation);
    assert_eq!(back.message.text.as_deref(), Some("nul \0 and 😀"));
    assert_eq!(
        s.idempotency_get(key).await.unwrap().unwrap().message_ids,
        vec![7]
    );
    // The partition is the key's, as every replica computes it, not the stored form's.
    let partition = scalar(
        &url,
        "SELECT partition::bigint FROM outbox_messages WHERE id = 7",
    )
    .await;
    assert_eq!(
        partition,
        i64::from(channel_gateway::storage::lease::partition_of(conversation))
    );
    assert_ne!(
        channel_gateway::storage::lease::partition_of(conversation),
        channel_gateway::storage::lease::partition_of("msteams/B1/a\\0b\\\\0c\\\\"),
        "the stored form hashes elsewhere (else this test could not fail)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_changes_share_commits_and_a_repeated_key_does_not_fail_its_group() {
    let url = PgCluster::shared().create_database();
    let s = Arc::new(PostgresStore::open(&pg_config(&url)).await.unwrap());
    // Every write transaction takes a transaction id (and this query one more).
    let xid = "SELECT pg_current_xact_id()::text::int8";
    let xid_before = scalar(&url, xid).await;
    let n = 4000u64;
    let begun = Instant::now();
    let mut waits = Vec::new();
    for id in 1..=n {
        let idem = (id % 100 == 0).then(|| {
            (
                // The same key twice in a row: both likely in one group.
                format!("k{}", id / 200),
                IdempotencyRecord {
                    created_at_ms: now_ms(),
                    message_ids: vec![id],
                },
            )
        });
        waits.push(s.append(vec![msg(id, &format!("c{}", id % 50))], idem));
    }
    let mut taken = 0;
    for w in waits {
        match w.await {
            Ok(()) => {}
            Err(StoreError::KeyTaken) => taken += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let took = begun.elapsed();
    // k1..k19 were each given twice: the second acceptance of each found the key taken.
    assert_eq!(taken, 19, "a key's second acceptance is refused, alone");
    let commits = scalar(&url, xid).await - xid_before - 1;
    println!(
        "{n} appends (one message each) committed in {took:?} ({:.0} msg/s) by {commits} \
         transactions",
        n as f64 / took.as_secs_f64()
    );
    assert!(commits >= 1);
    assert!(
        (commits as u64) < n / 10,
        "{commits} transactions for {n} appends: they do not share commits"
    );
    assert_eq!(
        scalar(&url, "SELECT count(*) FROM outbox_messages").await,
        n as i64 - 19,
        "a refused acceptance stores nothing"
    );
    assert_eq!(s.pending().await.unwrap().len(), n as usize - 19);
    assert_eq!(
        s.idempotency_get("k1").await.unwrap().unwrap().message_ids,
        vec![200],
        "the first acceptance of a key within its window wins (replicas may race)"
    );
    assert!(s.get(300).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_refuses_writes_quickly_keeps_unwaited_changes_and_ends() {
    let _watchdog = Watchdog::start();
    let cluster = Arc::new(blocking(PgCluster::start).await);
    let url = cluster.url().to_string();
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    assert!(s.transient());
    s.append(vec![msg(1, "c"), msg(2, "c")], None)
        .await
        .unwrap();
    s.update(1, Change::Delivering { attempts: 1 })
        .await
        .unwrap();
    assert!(s.failure().is_none());

    let c = cluster.clone();
    blocking(move || c.stop()).await;
    let begun = Instant::now();
    let err = s
        .append(vec![msg(3, "c")], None)
        .await
        .unwrap_err()
        .to_string();
    println!(
        "an append during the outage failed in {:?}: {err}",
        begun.elapsed()
    );
    // Well under connect_timeout (2 s): a refused connection is not waited out.
    assert!(
        begun.elapsed() < Duration::from_secs(1),
        "{:?}",
        begun.elapsed()
    );
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(s.failure().is_some(), "the outage is reported");
    // Outcomes nobody waits for, recorded during the outage, are kept.
    let mut delivered = finished(DeliveryState::Delivered, 1);
    delivered
        .receipts
        .push(channel_gateway::channels::NativeReceipt {
            native_id: "n1".into(),
            conversation_id: "c".into(),
        });
    s.record(1, Change::Finished(delivered.clone()));
    s.record(2, Change::Delivering { attempts: 1 });
    assert!(s.get(3).await.is_err(), "a read says it cannot answer");
    tokio::time::sleep(Duration::from_millis(600)).await;

    let c = cluster.clone();
    blocking(move || c.start_again()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.failure().is_some() {
        assert!(Instant::now() < deadline, "the outage never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.append(vec![msg(4, "c")], None).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    assert_eq!(s.get(1).await.unwrap().unwrap().outcome(), delivered);
    assert_eq!(
        s.get(2).await.unwrap().unwrap().record.state,
        DeliveryState::Delivering
    );
    assert!(s.get(3).await.unwrap().is_none(), "refused, so not stored");
    assert!(s.get(4).await.unwrap().is_some());
    assert!(s.next_id() > 4);
}

#[tokio::test]
async fn open_errors_never_show_the_password() {
    let cluster = PgCluster::shared();
    let url = format!(
        "postgres://nobody_here:Hunter2-Secret@127.0.0.1:{}/test",
        cluster.port()
    );
    let e = match PostgresStore::open(&pg_config(&url)).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened with a role that does not exist"),
    };
    assert!(!e.contains("Hunter2"), "{e}");
    assert!(e.contains("nobody_here"), "{e}");
}

// ---- An in-process gateway on PostgreSQL ----

fn gateway_config(
    fake: &FakeConnector,
    url: &str,
    data_dir: &std::path::Path,
) -> channel_gateway::config::Config {
    let mut c = config_for(fake);
    c.outbox.backend = OutboxBackend::Postgres;
    c.outbox.postgres = pg_config(url);
    c.outbox.data_dir = data_dir.to_path_buf();
    c.delivery.idle_timeout = Duration::from_millis(20);
    c
}

async fn delivered(
    client: &mut ChannelGatewayClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Delivery {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = delivery(client, id).await;
        if d.state == pb::DeliveryState::Delivered as i32 {
            return d;
        }
        assert!(Instant::now() < deadline, "{id} not delivered: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_postgres_delivers_in_order_lists_failed_and_redelivers() {
    let _watchdog = Watchdog::start();
    let url = PgCluster::shared().create_database();
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (gateway, mut c) = start_gateway(gateway_config(&fake, &url, dir.path())).await;

    let mut ids = Vec::new();
    for i in 0..20 {
        let r = send_text(&mut c, &fake.address("order"), format!("m{i}"))
            .await
            .unwrap();
        ids.push(r.message_id);
    }
    fake.wait_for(Duration::from_secs(15), "twenty messages", |r| {
        r.iter().filter(|x| x.conversation == "order").count() >= 20
    })
    .await;
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(fake.texts("order"), want);
    let d = delivered(&mut c, &ids[19]).await;
    assert_eq!(d.receipts.len(), 1);

    // A refusal: failed, listed, redelivered.
    fake.script(
        "lf",
        vec![Scripted {
            status: 404,
            body: json!({"error": {"code": "ConversationNotFound", "message": "Conversation not found."}}),
            retry_after: None,
        }],
    );
    let id = send_text(&mut c, &fake.address("lf"), "first try fails".into())
        .await
        .unwrap()
        .message_id;
    send_text(&mut c, &fake.address("lf"), "next one goes".into())
        .await
        .unwrap();
    fake.wait_for(Duration::from_secs(10), "the next message", |r| {
        r.iter().any(|x| x.text() == "next one goes")
    })
    .await;
    let d = delivery(&mut c, &id).await;
    assert_eq!(d.state, pb::DeliveryState::Failed as i32);
    let list = c
        .list_failed(pb::ListFailedRequest {
            bot_id: BOT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<&str> = list
        .deliveries
        .iter()
        .map(|d| d.message_id.as_str())
        .collect();
    assert_eq!(listed, [id.as_str()]);
    c.redeliver(pb::RedeliverRequest {
        message_ids: vec![id.clone()],
    })
    .await
    .unwrap();
    let d = delivered(&mut c, &id).await;
    assert_eq!(d.receipts.len(), 1);
    assert!(
        c.list_failed(pb::ListFailedRequest::default())
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    drop(c);
    gateway.shutdown().await.unwrap();
    // What the database says once the gateway is gone.
    assert_eq!(
        scalar(
            &url,
            "SELECT count(*) FROM outbox_messages WHERE state <> 'delivered'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_returns_the_first_answer_also_after_a_restart() {
    let _watchdog = Watchdog::start();
    let url = PgCluster::shared().create_database();
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let req = pb::SendRequest {
        message: Some(fake.text("idem", "only once")),
        idempotency_key: "order-42".into(),
        wait: pb::WaitMode::Delivered as i32,
    };
    let (gateway, mut c) = start_gateway(gateway_config(&fake, &url, dir.path())).await;
    let first = c.send(req.clone()).await.unwrap().into_inner();
    let again = c.send(req.clone()).await.unwrap().into_inner();
    assert_eq!(again.message_id, first.message_id);
    drop(c);
    gateway.shutdown().await.unwrap();

    // A new gateway on the same database (and a new data directory: nothing local carries it).
    let dir = tempfile::tempdir().unwrap();
    let (gateway, mut c) = start_gateway(gateway_config(&fake, &url, dir.path())).await;
    let again = c.send(req).await.unwrap().into_inner();
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(again.receipts, first.receipts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.for_conversation("idem").len(), 1, "sent twice");
    // New ids continue past the old ones.
    let next = send_text(&mut c, &fake.address("idem"), "later".into())
        .await
        .unwrap();
    assert!(
        next.message_id.parse::<u64>().unwrap() > first.message_id.parse::<u64>().unwrap(),
        "{} after {}",
        next.message_id,
        first.message_id
    );
    drop(c);
    gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_unavailable_turns_not_ready_and_ends_without_a_restart() {
    let _watchdog = Watchdog::start();
    let cluster = Arc::new(blocking(PgCluster::start).await);
    let url = cluster.url().to_string();
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (gateway, mut c) = start_gateway(gateway_config(&fake, &url, dir.path())).await;
    let admin = gateway.admin_addr.unwrap();
    let readyz = || async move {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(readyz().await, 200);
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = send_text(&mut c, &fake.address("out"), format!("before {i}"))
            .await
            .unwrap();
        acked.push(r.message_id);
    }
    for id in &acked {
        delivered(&mut c, id).await;
    }

    let cl = cluster.clone();
    blocking(move || cl.stop()).await;
    let begun = Instant::now();
    let err = send_text(&mut c, &fake.address("out"), "during".into())
        .await
        .unwrap_err();
    let took = begun.elapsed();
    println!(
        "a Send during the outage answered {:?} in {took:?}",
        err.code()
    );
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!err.message().contains(&url), "{}", err.message());
    assert_eq!(readyz().await, 503, "not ready while the database is down");
    // GetDelivery cannot answer either: UNAVAILABLE, not NOT_FOUND.
    let e = c
        .get_delivery(pb::GetDeliveryRequest {
            message_id: acked[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    let cl = cluster.clone();
    blocking(move || cl.start_again()).await;
    let back = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match send_text(&mut c, &fake.address("out"), "after".into()).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                assert!(Instant::now() < deadline, "Sends never worked again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    println!(
        "Sends work again {:?} after the database is back",
        back.elapsed()
    );
    delivered(&mut c, &after.message_id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz().await != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &acked {
        let d = delivery(&mut c, id).await;
        assert_eq!(d.state, pb::DeliveryState::Delivered as i32, "{id}: {d:?}");
    }
    let texts = fake.texts("out");
    assert_eq!(
        texts,
        [
            "before 0", "before 1", "before 2", "before 3", "before 4", "after"
        ]
    );
    drop(c);
    gateway.shutdown().await.unwrap();
}

/// Accepted messages still in their line when the database goes away wait for it, rather than
/// fail: each needs its delivering mark written before its call, and an outage that ends is
/// not a reason to give up on a message the bot was told is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_line_during_an_outage_wait_for_the_database_and_are_delivered_in_order() {
    let _watchdog = Watchdog::start();
    let cluster = Arc::new(blocking(PgCluster::start).await);
    let url = cluster.url().to_string();
    let fake = FakeConnector::start().await;
    // Each call takes 400 ms: the line is still long when the database stops.
    fake.set_latency("line", Duration::from_millis(400));
    let dir = tempfile::tempdir().unwrap();
    let (gateway, mut c) = start_gateway(gateway_config(&fake, &url, dir.path())).await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = send_text(&mut c, &fake.address("line"), format!("m{i}"))
            .await
            .unwrap();
        acked.push(r.message_id);
    }
    let cl = cluster.clone();
    blocking(move || {
        cl.stop();
        // Long enough for the messages behind the first to need their marks meanwhile.
        std::thread::sleep(Duration::from_millis(1500));
        cl.start_again();
    })
    .await;
    for id in &acked {
        let d = delivered(&mut c, id).await;
        assert!(d.error.is_none(), "{id}: {d:?}");
    }
    assert_eq!(fake.texts("line"), ["m0", "m1", "m2", "m3", "m4"]);
    drop(c);
    gateway.shutdown().await.unwrap();
}

/// The partition's owner appends the head of an idle conversation already marked `delivering`
/// (`PostgresStore::append_fenced`): the mark is stored, with its epoch, only while the fence
/// holds at the insert, as a fenced update's would be; otherwise the row is `accepted` and its
/// owner marks it before sending, so a row read back as `delivering` always names whose mark
/// it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owners_mark_at_append_is_stored_only_under_its_fence() {
    use channel_gateway::outbox::Fence;
    let url = PgCluster::shared().create_database();
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    let partition = channel_gateway::storage::lease::partition_of("c");
    let pool = channel_gateway::storage::postgres::connect(&pg_config(&url))
        .await
        .unwrap();
    let db = channel_gateway::storage::postgres::get(&pool)
        .await
        .unwrap();
    let own = |owner: &str, epoch: i64| {
        let (db, owner) = (&db, owner.to_string());
        async move {
            db.execute(
                "UPDATE cg_partitions SET owner = $1, epoch = $2, \
                 lease_until = now() + interval '1 hour' WHERE partition = $3",
                &[&owner, &epoch, &(partition as i32)],
            )
            .await
            .unwrap();
        }
    };
    let marked = |id: u64| StoredMessage {
        record: StateRecord::new(DeliveryState::Delivering, now_ms()),
        ..msg(id, "c")
    };
    let fence = |epoch: i64| Some(Fence { partition, epoch });
    let row = |id: u64| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    "SELECT state, epoch FROM outbox_messages WHERE id = $1",
                    &[&(id as i64)],
                )
                .await
                .unwrap();
            (r.get::<_, String>(0), r.get::<_, Option<i64>>(1))
        }
    };
    own(s.replica(), 5).await;
    // Held at epoch 5: the mark is kept, with its epoch.
    s.append_fenced(vec![marked(1)], None, fence(5))
        .await
        .unwrap();
    assert_eq!(row(1).await, ("delivering".into(), Some(5)));
    // An epoch this replica does not hold (an older take): stored, not marked.
    s.append_fenced(vec![marked(2)], None, fence(4))
        .await
        .unwrap();
    assert_eq!(row(2).await, ("accepted".into(), None));
    // In a batch, the fence goes with the marked message only.
    s.append_fenced(vec![marked(3), msg(4, "c")], None, fence(5))
        .await
        .unwrap();
    assert_eq!(row(3).await, ("delivering".into(), Some(5)));
    assert_eq!(row(4).await, ("accepted".into(), None));
    // The partition moved to another replica before the insert ran.
    own("another-replica", 6).await;
    s.append_fenced(vec![marked(5)], None, fence(5))
        .await
        .unwrap();
    assert_eq!(row(5).await, ("accepted".into(), None));
    // A lease that has run out is no fence either.
    db.execute(
        "UPDATE cg_partitions SET owner = $1, epoch = 7, lease_until = now() - interval '1 s' \
         WHERE partition = $2",
        &[&s.replica(), &(partition as i32)],
    )
    .await
    .unwrap();
    s.append_fenced(vec![marked(6)], None, fence(7))
        .await
        .unwrap();
    assert_eq!(row(6).await, ("accepted".into(), None));
    // Without a fence (one replica's own store), a row is stored as given.
    s.append_fenced(vec![marked(7)], None, None).await.unwrap();
    assert_eq!(row(7).await, ("delivering".into(), None));
}

/// The plans of the statements planned once per connection (`planned_once`): made for any
/// values, they must not read a whole outbox table, neither when made on a new, empty database
/// (as at a first start) nor on a full one. A plan made on empty tables is kept while they
/// grow, so one that hashes a table for a join would get slower with every message (the
/// reason the gateway planned every execution before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_planned_once_read_no_whole_table_empty_or_full() {
    let url = PgCluster::shared().create_database();
    let s = PostgresStore::open(&pg_config(&url)).await.unwrap();
    // A session as the feed's: plans made once, with the settings that go with them (the
    // writer sets the same for its commits).
    let pool = channel_gateway::storage::postgres::pool_planned(
        &pg_config(&url),
        channel_gateway::storage::postgres::Plans::Once,
    )
    .unwrap();
    let db = channel_gateway::storage::postgres::get(&pool)
        .await
        .unwrap();
    let check = |when: &'static str| {
        let db = &db;
        async move {
            for (i, (name, sql)) in channel_gateway::outbox::planned_once()
                .into_iter()
                .enumerate()
            {
                let params = db.prepare(&sql).await.unwrap().params().len();
                let stmt = format!("planned_{when}_{i}");
                db.batch_execute(&format!("PREPARE {stmt} AS {sql}"))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let args = vec!["NULL"; params].join(", ");
                let plan: Vec<String> = db
                    .query(&format!("EXPLAIN EXECUTE {stmt}({args})"), &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                let whole = reads_whole_table(&plan);
                let plan = plan.join("\n");
                assert!(
                    whole.is_none(),
                    "{when}: the plan of {name} reads a whole table ({}):\n{plan}",
                    whole.unwrap_or_default()
                );
                if name == "feed" {
                    assert!(
                        plan.contains("Index Scan using outbox_feed"),
                        "{when}: the feed does not read its range from outbox_feed:\n{plan}"
                    );
                }
            }
        }
    };
    check("empty").await;
    // A few rows, not analyzed: where a plan made once chose to scan the table (the cheapest
    // way while it is a page) and kept doing so at 100,000 rows.
    db.batch_execute(
        "INSERT INTO outbox_messages (id, conversation, partition, state, attempts, \
         possible_duplicate, accepted_at_ms, updated_at_ms, seq) \
         SELECT g, 'c', 0, 'accepted', 0, false, 1, 1, g FROM generate_series(100001, 100010) g; \
         INSERT INTO outbox_bodies SELECT g, '{}' FROM generate_series(100001, 100010) g",
    )
    .await
    .unwrap();
    check("small").await;
    // 50,000 messages, a tenth of them unfinished, and as many keys, analyzed.
    db.batch_execute(
        "INSERT INTO outbox_messages (id, conversation, partition, state, attempts, \
         possible_duplicate, accepted_at_ms, updated_at_ms, seq) \
         SELECT g, 'c' || (g % 1000), g % 256, \
         CASE WHEN g % 10 = 0 THEN 'accepted' ELSE 'delivered' END, 0, false, 1, 1, g \
         FROM generate_series(1, 50000) g; \
         INSERT INTO outbox_bodies SELECT g, '{}' FROM generate_series(1, 50000) g; \
         INSERT INTO outbox_idempotency SELECT 'k' || g, 1, '[' || g || ']' \
         FROM generate_series(1, 50000) g; \
         ANALYZE outbox_messages; ANALYZE outbox_bodies; ANALYZE outbox_idempotency",
    )
    .await
    .unwrap();
    check("full").await;
    drop(s);
}

/// The first scan of an outbox table in `plan` (EXPLAIN's lines) that reads it whole: a
/// sequential scan, or an index scan with no condition on the index.
fn reads_whole_table(plan: &[String]) -> Option<String> {
    for (i, line) in plan.iter().enumerate() {
        if !line.contains(" on outbox_") {
            continue;
        }
        if line.contains("Seq Scan") {
            return Some(line.trim().to_string());
        }
        if line.contains("Index Scan") || line.contains("Index Only Scan") {
            // Its details: the lines after it, up to the next node.
            let has_cond = plan[i + 1..]
                .iter()
                .take_while(|l| !l.contains("->"))
                .any(|l| l.contains("Index Cond"));
            if !has_cond {
                return Some(line.trim().to_string());
            }
        }
    }
    None
}
