//! Assembles and runs the gateway: channels, store, dispatcher, the gRPC service, health and
//! reflection, and the graceful shutdown sequence. Owns process lifecycle, nothing else.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::api::auth::Authenticator;
use crate::api::pb::{self, channel_gateway_server::ChannelGatewayServer};
use crate::api::service::GatewayService;
use crate::channels::Channels;
use crate::config::Config;
use crate::config::OutboxBackend;
use crate::delivery::Dispatcher;
use crate::metrics::Metrics;
use crate::outbox::{MemoryStore, PostgresStore, SqliteStore, Store, now_ms};

/// Drops delivered messages past their retention and expired idempotency keys, periodically.
fn spawn_compaction(
    store: Arc<dyn Store>,
    cfg: crate::config::OutboxConfig,
    idem: std::time::Duration,
) {
    // A weak handle: the task must not keep the outbox (and its file lock) alive after the
    // gateway that owns it is gone.
    let store = Arc::downgrade(&store);
    tokio::spawn(async move {
        // The first tick is immediate: what aged past the retention while the gateway was
        // down goes at start.
        let mut tick = tokio::time::interval(cfg.compact_interval);
        loop {
            tick.tick().await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let now = now_ms();
            let cutoff = now.saturating_sub(cfg.retention.as_millis() as u64);
            let idem_cutoff = now.saturating_sub(idem.as_millis() as u64);
            let n = store.compact(cutoff, idem_cutoff).await;
            if n > 0 {
                tracing::info!(compacted = n, "outbox compacted");
            }
        }
    });
}

/// How often gRPC health looks at the outbox.
const OUTBOX_WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Turns gRPC health to NOT_SERVING once the outbox stops taking writes, as `/readyz` does: a
/// mesh that health-checks over gRPC then sends elsewhere, where every Send here would be
/// refused. For good after a failed local write (a full disk, say); while it lasts for an
/// outage that ends (PostgreSQL unreachable, `Store::transient`), SERVING again after it,
/// unless the gateway is stopping (`stopping`, set by the shutdown under the same lock).
async fn watch_outbox(
    store: std::sync::Weak<dyn Store>,
    health: tonic_health::server::HealthReporter,
    every: std::time::Duration,
    stopping: Arc<tokio::sync::Mutex<bool>>,
) {
    let mut tick = tokio::time::interval(every);
    let mut down = false;
    loop {
        tick.tick().await;
        // A weak handle, as for compaction: the outbox's file lock goes with its gateway.
        let Some(store) = store.upgrade() else {
            return;
        };
        let failure = store.failure();
        let transient = store.transient();
        drop(store);
        match failure {
            Some(reason) if !transient => {
                tracing::error!(
                    %reason,
                    "outbox stopped taking writes: gRPC health is NOT_SERVING until a restart"
                );
                not_serving(&health).await;
                return;
            }
            Some(reason) if !down => {
                tracing::error!(
                    %reason,
                    "outbox unreachable: gRPC health is NOT_SERVING until it is back"
                );
                down = true;
                not_serving(&health).await;
            }
            None if down => {
                let stopping = stopping.lock().await;
                if *stopping {
                    return;
                }
                tracing::info!("outbox reachable again: gRPC health is SERVING");
                down = false;
                health
                    .set_serving::<ChannelGatewayServer<GatewayService>>()
                    .await;
                health.set_service_status("", ServingStatus::Serving).await;
            }
            _ => {}
        }
    }
}

/// NOT_SERVING for the gateway's service and for the server as a whole (`""`).
async fn not_serving(health: &tonic_health::server::HealthReporter) {
    health
        .set_not_serving::<ChannelGatewayServer<GatewayService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("channel setup: {0}")]
    Channels(String),
    #[error("outbox: {0}")]
    Outbox(String),
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on unix socket {path}: {source}")]
    Unix {
        path: String,
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("inbox: {0}")]
    Inbox(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// One listener's server, boxed so TCP, TLS and Unix-socket servers can be held alike.
type ServeFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// A gateway serving in the background (tests, embedding).
pub struct RunningGateway {
    pub addr: SocketAddr,
    /// The admin HTTP listener, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The webhook listener, when receiving is on.
    pub inbound_addr: Option<SocketAddr>,
    pub dispatcher: Dispatcher,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningGateway {
    /// Runs the same graceful shutdown as SIGTERM and waits for it.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Channels(format!("server task failed: {e}"))),
        }
    }
}

/// Accepted gRPC connections with Nagle's algorithm off. tonic applies its `tcp_nodelay` only
/// to listeners it binds itself; on ours, a response written in two segments (headers, then
/// data and trailers) waited for the client's delayed ACK, and about one call in a hundred
/// took 40 ms longer.
pub fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}

/// Admitted connections as the server takes them (TLS ones are guarded after their handshake).
fn guarded<IO>(
    admitted: impl tokio_stream::Stream<Item = crate::listener::Admitted<IO>>,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::listener::Guarded<IO>>> {
    use tokio_stream::StreamExt;
    admitted.map(|a| Ok(a.into_guarded()))
}

/// Binds the configured address and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = config.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let (running, fut) = serve(config, listener, shutdown).await?;
    drop(running);
    fut.await
}

/// Starts on the configured address (port 0 picks a free port) in the background.
pub async fn start(config: Config) -> Result<RunningGateway, ServeError> {
    let addr = config.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let (tx, rx) = oneshot::channel::<()>();
    let (started, fut) = serve(config, listener, async {
        let _ = rx.await;
    })
    .await?;
    Ok(RunningGateway {
        addr: local,
        admin_addr: started.admin_addr,
        inbound_addr: started.inbound_addr,
        dispatcher: started.dispatcher,
        stop: Some(tx),
        task: tokio::spawn(fut),
    })
}

/// What a replica runs to share delivery with the others on its database.
struct Replicas {
    leases: crate::storage::lease::Leases,
    listener: crate::storage::notify::Listener,
}

/// Leases partitions, listens for other replicas' wake-ups, and makes the dispatcher deliver
/// only what this replica holds.
async fn share_delivery(
    store: &Arc<PostgresStore>,
    pg: &crate::storage::postgres::PostgresConfig,
    dispatcher: &Dispatcher,
    metrics: &Arc<Metrics>,
) -> Result<Replicas, ServeError> {
    use crate::storage::{lease, notify};
    // A connection of its own: a renewal must not queue behind reads when the pool is busy,
    // or leases lapse under load.
    let lease_pool = crate::storage::postgres::pool(&crate::storage::postgres::PostgresConfig {
        pool_size: 1,
        ..pg.clone()
    })
    .map_err(|e| ServeError::Outbox(pg.scrub(e.to_string())))?;
    let leases = lease::Leases::start(
        lease_pool,
        lease::LeaseConfig {
            lease: pg.lease,
            renew_every: pg.renew_every,
        },
        store.replica().to_string(),
    );
    let listener = notify::Listener::start(pg, lease::PARTITIONS)
        .map_err(|e| ServeError::Outbox(pg.scrub(e.to_string())))?;
    let notifier = notify::Notifier::start(store.pool().clone());
    let cluster = crate::delivery::Cluster::new(
        store.clone(),
        leases.subscribe(),
        leases.drainer(),
        notifier,
        pg.poll_every,
    );
    let weak = Arc::downgrade(&cluster);
    store.set_on_commit(Arc::new(move |parts| {
        if let Some(c) = weak.upgrade() {
            c.committed(parts);
        }
    }));
    metrics.observe_leases(leases.subscribe());
    // Serve once the first lease round is done: a replica alone (or the first of several)
    // then holds its partitions before its first Send, so a SendProactive can answer with its
    // new address. Bounded: a database slow to answer only delays holding them.
    let mut first = leases.subscribe();
    let _ = tokio::time::timeout(pg.lease, first.changed()).await;
    dispatcher.share(cluster, listener.subscribe());
    tracing::info!(replica = %store.replica(), "sharing delivery with the replicas on this database");
    Ok(Replicas { leases, listener })
}

/// What `serve` started, for `start`.
struct Started {
    dispatcher: Dispatcher,
    admin_addr: Option<SocketAddr>,
    inbound_addr: Option<SocketAddr>,
}

async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Started, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let channels = Arc::new(Channels::from_config(&config).map_err(ServeError::Channels)?);
    let mut shared_pg: Option<Arc<PostgresStore>> = None;
    let store: Arc<dyn Store> = match config.outbox.backend {
        OutboxBackend::Sqlite => {
            let dir = &config.outbox.data_dir;
            tracing::info!(data_dir = %dir.display(), "durable outbox (SQLite)");
            Arc::new(SqliteStore::open(dir).map_err(|e| ServeError::Outbox(e.to_string()))?)
        }
        OutboxBackend::Memory => {
            tracing::warn!("in-memory outbox: accepted messages are lost on a crash or restart");
            Arc::new(MemoryStore::new())
        }
        OutboxBackend::Postgres => {
            let pg = &config.outbox.postgres;
            tracing::info!(
                database = %pg.target().unwrap_or_default(),
                pool_size = pg.pool_size,
                "durable outbox (PostgreSQL)"
            );
            let s = Arc::new(
                PostgresStore::open(pg)
                    .await
                    .map_err(|e| ServeError::Outbox(e.to_string()))?,
            );
            s.set_idempotency_window(config.server.idempotency_window);
            shared_pg = Some(s.clone());
            s
        }
    };
    let metrics = Arc::new(Metrics::new());
    metrics.observe_commits(store.commit_stats());
    metrics.start_series(&channels.enabled_ids());
    let dispatcher = Dispatcher::new(
        channels.clone(),
        store.clone(),
        config.delivery.clone(),
        metrics.clone(),
    );
    let replicas = match &shared_pg {
        Some(s) => Some(share_delivery(s, &config.outbox.postgres, &dispatcher, &metrics).await?),
        None => None,
    };
    dispatcher
        .resume()
        .await
        .map_err(|e| ServeError::Outbox(e.to_string()))?;
    let watched = Arc::downgrade(&store);
    spawn_compaction(
        store,
        config.outbox.clone(),
        config.server.idempotency_window,
    );
    let service = GatewayService::new(dispatcher.clone(), config.server.clone());
    let (inbound_stop_tx, inbound_stop_rx) = oneshot::channel::<()>();
    let (service, inbox, inbound_addr) = if config.inbound.enabled {
        let shared = shared_pg.as_ref().map(|s| (s, &config.outbox.postgres));
        let (inbox, addr) = start_inbound(&config, &channels, &metrics, shared, async {
            let _ = inbound_stop_rx.await;
        })
        .await?;
        (
            service.with_inbox(inbox.clone(), config.inbound.ack_deadline),
            Some(inbox),
            addr,
        )
    } else {
        (service, None, None)
    };
    let authenticator = Authenticator::new(&config.auth, &config.limits);
    if config.auth.is_configured() {
        tracing::info!(
            tokens = config.auth.tokens.len(),
            client_certs = config.auth.clients.len(),
            "caller authentication on"
        );
    } else {
        tracing::warn!(
            listen = %config.server.listen,
            "no caller authentication configured: any local process may send as any bot"
        );
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ChannelGatewayServer<GatewayService>>()
        .await;
    let stopping = Arc::new(tokio::sync::Mutex::new(false));
    tokio::spawn(watch_outbox(
        watched,
        health.clone(),
        OUTBOX_WATCH_EVERY,
        stopping.clone(),
    ));
    // v1alpha too: grpcurl and Python's grpcio-reflection client still ask it. Both list both.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let local = listener.local_addr().ok();
    let grace = config.server.shutdown_grace;
    let drain = dispatcher.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
    let admin_addr = if config.admin.enabled {
        let addr = config.admin_addr()?;
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = l.local_addr().ok();
        let d = dispatcher.clone();
        let ch = channels.clone();
        let refresh: crate::metrics::Refresh = Arc::new(move |m: &Metrics| {
            m.note_outbox(d.store().as_ref());
            m.queue_depth.set(d.undelivered() as i64);
            m.active_workers.set(d.active_workers() as i64);
            for (channel, total) in ch.token_fetches() {
                m.token_fetches(channel, total);
            }
        });
        let m = metrics.clone();
        tokio::spawn(async move {
            let stop = async {
                let _ = admin_stop_rx.await;
            };
            if let Err(e) = crate::metrics::serve_admin(l, m, refresh, stop).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        tracing::info!(addr = ?local, "admin listener: /metrics /healthz /readyz");
        local
    } else {
        None
    };
    metrics.set_ready(true);
    let ready = metrics.clone();
    let backend = config.outbox.backend;
    tokio::spawn(async move {
        shutdown.await;
        ready.set_ready(false);
        // Channels find the webhook port closed and retry later (or at another replica).
        let _ = inbound_stop_tx.send(());
        // Probes see NOT_SERVING first, then new sends are refused, then queues drain. Under
        // the lock the outbox watch takes, so it cannot turn SERVING again after this.
        {
            let mut stopping = stopping.lock().await;
            *stopping = true;
            not_serving(&health).await;
        }
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: draining queues"
        );
        // Replicas: the partitions are handed over as soon as nothing of them is in flight,
        // and what was in line here is delivered by their new owners.
        let handover = async {
            if let Some(r) = replicas {
                r.leases.shutdown(grace).await;
                drop(r.listener);
            }
        };
        let (left, ()) = tokio::join!(drain.shutdown(grace), handover);
        if left > 0 {
            match backend {
                crate::config::OutboxBackend::Sqlite | crate::config::OutboxBackend::Postgres => {
                    tracing::warn!(
                        undelivered = left,
                        "shutdown grace ran out; the undelivered messages stay in the durable \
                     outbox and are delivered after the next start"
                    )
                }
                crate::config::OutboxBackend::Memory => tracing::warn!(
                    undelivered = left,
                    "shutdown grace ran out; the undelivered messages are lost \
                     (outbox.backend = memory)"
                ),
            }
        } else {
            tracing::info!("queues drained");
        }
        // The gRPC server waits for open streams: Receive streams end here (what they had not
        // acked comes again after the restart).
        if let Some(inbox) = &inbox {
            inbox.close_streams();
            // Shared inbox: the other replicas take this one's conversations at once.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), inbox.release_all()).await;
        }
        let _ = stop_tx.send(());
        let _ = admin_stop_tx.send(());
        if let Some(inbox) = inbox {
            inbox.shutdown();
        }
    });

    tracing::info!(addr = ?local, tls = config.server.tls.is_some(), "channel-gateway serving gRPC");
    // Each RPC's own limit is checked as a request streams in (`api::limits`); the service's
    // decoding limit is the largest of them.
    let limits = crate::api::limits::RequestLimits::new(&config.server);
    let max_bytes = limits.largest().max(4 << 20);
    let service = Arc::new(service);
    let keepalive = Some(config.server.http2_keepalive_interval).filter(|d| !d.is_zero());
    let keepalive_timeout = config.server.http2_keepalive_timeout;
    // One router per listener (TCP, TLS, Unix socket), all sharing one service.
    let router = move || {
        let auth = authenticator.clone();
        tonic::transport::Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .layer(limits)
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ChannelGatewayServer::from_arc(service.clone())
                    .max_decoding_message_size(max_bytes),
                move |req| auth.intercept(req),
            ))
    };
    let (stop_all, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // One bound on open connections for all listeners: they share the process's open files.
    let max_connections = crate::listener::max_connections(config.server.max_connections);
    let admission =
        crate::listener::Admission::new(max_connections, config.server.handshake_timeout);
    tracing::info!(
        max_connections,
        handshake_timeout_ms = config.server.handshake_timeout.as_millis() as u64,
        "gRPC connection limits"
    );
    let tcp_admitted = admission.admit(no_delay(listener));
    let tcp: ServeFuture = match &config.server.tls {
        Some(tls_cfg) => {
            let tls =
                crate::tls::Reloadable::new(tls_cfg).map_err(|e| ServeError::Tls(e.to_string()))?;
            tls.watch(tls_cfg.clone(), tls_cfg.reload_interval);
            Box::pin(router().serve_with_incoming_shutdown(
                crate::tls::incoming(tcp_admitted, tls),
                until_stopped(),
            ))
        }
        None => {
            Box::pin(router().serve_with_incoming_shutdown(guarded(tcp_admitted), until_stopped()))
        }
    };
    let unix: Option<ServeFuture> = match &config.server.unix_socket {
        #[cfg(unix)]
        Some(path) => {
            // A stale socket file from a previous run would make bind fail.
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).map_err(|e| ServeError::Unix {
                path: path.display().to_string(),
                source: e,
            })?;
            tracing::info!(path = %path.display(), "also serving gRPC on a Unix socket");
            Some(Box::pin(router().serve_with_incoming_shutdown(
                guarded(admission.admit(tokio_stream::wrappers::UnixListenerStream::new(l))),
                until_stopped(),
            )))
        }
        #[cfg(not(unix))]
        Some(_) => {
            return Err(ServeError::Unix {
                path: "unix_socket".into(),
                source: std::io::Error::other("not supported on this platform"),
            });
        }
        None => None,
    };
    let fut = async move {
        tokio::spawn(async move {
            let _ = stop_rx.await;
            let _ = stop_all.send(true);
        });
        match unix {
            Some(u) => {
                let (a, b) = tokio::join!(tcp, u);
                a?;
                b?;
            }
            None => tcp.await?,
        }
        Ok(())
    };
    Ok((
        Started {
            dispatcher,
            admin_addr,
            inbound_addr,
        },
        fut,
    ))
}

/// Opens the inbox and starts the webhook listener in front of it (stopped by `stop`).
async fn start_inbound(
    config: &Config,
    channels: &Channels,
    metrics: &Arc<Metrics>,
    shared_pg: Option<(
        &Arc<PostgresStore>,
        &crate::storage::postgres::PostgresConfig,
    )>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(crate::inbound::Inbox, Option<SocketAddr>), ServeError> {
    let dir = match config.outbox.backend {
        OutboxBackend::Sqlite | OutboxBackend::Postgres => Some(config.outbox.data_dir.as_path()),
        OutboxBackend::Memory => {
            tracing::warn!(
                "in-memory inbox (outbox.backend = memory): received events are lost on a crash or restart"
            );
            None
        }
    };
    let inbox = match shared_pg {
        Some((store, pg)) => {
            // The same replica id as the outbox's leases: an operator reads one name per
            // process in `cg_partitions` and `inbox_claims`.
            let inbox_pg = crate::inbound::pg::PgInbox::start(
                store.pool().clone(),
                store.replica().to_string(),
            );
            let listener = crate::storage::notify::Listener::start_on(
                pg,
                crate::inbound::pg::CHANNEL,
                crate::storage::lease::PARTITIONS,
            )
            .map_err(|e| ServeError::Inbox(pg.scrub(e.to_string())))?;
            let answers = crate::storage::notify::Listener::start_on(
                pg,
                crate::inbound::pg::REPLY_CHANNEL,
                crate::storage::lease::PARTITIONS,
            )
            .map_err(|e| ServeError::Inbox(pg.scrub(e.to_string())))?;
            let inbox = crate::inbound::Inbox::open_shared(
                inbox_pg,
                listener.subscribe(),
                answers.subscribe(),
                crate::inbound::ClaimSettings {
                    lease: pg.lease,
                    renew_every: pg.renew_every,
                    poll_every: pg.poll_every,
                },
                config.inbound.inbox(),
                metrics.clone(),
            );
            tracing::info!("inbox shared with the replicas on this database");
            (inbox, Some((listener, answers)))
        }
        None => (
            crate::inbound::Inbox::open(dir, config.inbound.inbox(), metrics.clone())
                .map_err(|e| ServeError::Inbox(e.to_string()))?,
            None,
        ),
    };
    let (inbox, inbox_listener) = inbox;
    let router = crate::inbound::InboundRouter::new(channels).map_err(ServeError::Channels)?;
    let addr = config.inbound.listen_addr()?;
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = l.local_addr().ok();
    let paths = router.paths();
    if paths.is_empty() {
        tracing::info!(addr = ?local, "webhook listener up; no channel is set up to receive yet (see docs/channels/)");
    } else {
        tracing::info!(addr = ?local, paths = ?paths, "webhook listener");
    }
    let m = metrics.clone();
    let refused: crate::inbound::listener::RefusalCounter =
        Arc::new(move |channel: &str, reason: &'static str| m.inbound_refused(channel, reason));
    let limits = crate::inbound::listener::Limits {
        max_body_bytes: config.inbound.max_body_bytes,
        read_timeout: config.inbound.read_timeout,
        max_connections: config.inbound.max_connections,
    };
    let sink: Arc<dyn crate::inbound::Sink> = Arc::new(inbox.clone());
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stopped_tx.send(true);
    });
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        drop(rx.wait_for(|s| *s).await);
    };
    // Pullers (Slack Socket Mode, Telegram long polling) feed the same inbox; they confirm to
    // the channel only what it stored, so stopping them at any point loses nothing.
    let pullers: Vec<tokio::task::JoinHandle<()>> = channels
        .pullers(&sink)
        .into_iter()
        .map(tokio::spawn)
        .collect();
    if !pullers.is_empty() {
        tracing::info!(
            pullers = pullers.len(),
            "pulling events (Socket Mode, long polling)"
        );
    }
    let stop_pullers = until(stopped.clone());
    tokio::spawn(async move {
        stop_pullers.await;
        for p in pullers {
            p.abort();
        }
    });
    let stop_listener = until(stopped);
    tokio::spawn(async move {
        // The shared inbox's wake-ups stop with the webhook listener.
        let _listening = inbox_listener;
        if let Err(e) = crate::inbound::serve(l, router, sink, limits, refused, stop_listener).await
        {
            tracing::error!(error = %e, "webhook listener failed");
        }
    });
    Ok((inbox, local))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = super::no_delay(listener);
        tokio::pin!(incoming);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// The health a mesh would see for the server (`""`) and for the gateway's service.
    async fn statuses(health: &tonic_health::server::HealthReporter) -> Vec<i32> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_server::Health;
        let svc = tonic_health::server::HealthService::from_health_reporter(health.clone());
        let mut out = Vec::new();
        let gateway = <super::ChannelGatewayServer<super::GatewayService> as tonic::server::NamedService>::NAME;
        for service in ["", gateway] {
            let r = svc
                .check(tonic::Request::new(HealthCheckRequest {
                    service: service.into(),
                }))
                .await
                .unwrap();
            out.push(r.into_inner().status);
        }
        out
    }

    #[tokio::test]
    async fn grpc_health_turns_not_serving_when_the_outbox_stops_taking_writes() {
        use crate::outbox::Store;
        use tonic_health::pb::health_check_response::ServingStatus as S;
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(crate::outbox::SqliteStore::open(dir.path()).unwrap());
        let store: std::sync::Arc<dyn Store> = log.clone();
        let health = tonic_health::server::HealthReporter::new();
        health
            .set_serving::<super::ChannelGatewayServer<super::GatewayService>>()
            .await;
        let every = std::time::Duration::from_millis(10);
        let watch = tokio::spawn(super::watch_outbox(
            std::sync::Arc::downgrade(&store),
            health.clone(),
            every,
            std::sync::Arc::default(),
        ));
        tokio::time::sleep(every * 5).await;
        let serving = S::Serving as i32;
        assert_eq!(
            statuses(&health).await,
            vec![serving, serving],
            "a working outbox"
        );

        log.break_with_a_failed_write().await;
        tokio::time::timeout(std::time::Duration::from_secs(5), watch)
            .await
            .expect("the watch ends once it has seen the failure")
            .unwrap();
        let down = S::NotServing as i32;
        assert_eq!(statuses(&health).await, vec![down, down]);
    }
}

#[cfg(test)]
mod transient_tests {
    use std::sync::{Arc, Mutex};

    use futures::future::BoxFuture;

    use crate::outbox::{
        Change, Durable, IdempotencyRecord, MemoryStore, Store, StoreError, StoredMessage,
    };

    /// A store whose outage the test switches on and off, as PostgreSQL's would come and go.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: Mutex<Option<String>>,
    }

    impl Store for Flaky {
        fn append(&self, m: Vec<StoredMessage>, i: Option<(String, IdempotencyRecord)>) -> Durable {
            self.inner.append(m, i)
        }
        fn update(&self, id: u64, change: Change) -> Durable {
            self.inner.update(id, change)
        }
        fn get(&self, id: u64) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>> {
            self.inner.get(id)
        }
        fn pending(&self) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
            self.inner.pending()
        }
        fn failed(
            &self,
            after: u64,
            limit: usize,
        ) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
            self.inner.failed(after, limit)
        }
        fn next_id(&self) -> u64 {
            self.inner.next_id()
        }
        fn idempotency_get<'a>(
            &'a self,
            key: &'a str,
        ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
            self.inner.idempotency_get(key)
        }
        fn failure(&self) -> Option<String> {
            self.down.lock().unwrap().clone()
        }
        fn transient(&self) -> bool {
            true
        }
        fn compact(&self, cutoff: u64, idem: u64) -> BoxFuture<'_, usize> {
            self.inner.compact(cutoff, idem)
        }
    }

    async fn serving(health: &tonic_health::server::HealthReporter) -> bool {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_server::Health;
        let svc = tonic_health::server::HealthService::from_health_reporter(health.clone());
        let r = svc
            .check(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap();
        r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    }

    async fn until(health: &tonic_health::server::HealthReporter, want: bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while serving(health).await != want {
            assert!(std::time::Instant::now() < deadline, "never {want}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_transient_outage_turns_health_not_serving_while_it_lasts_and_readiness_follows() {
        let flaky = Arc::new(Flaky::default());
        let store: Arc<dyn Store> = flaky.clone();
        let health = tonic_health::server::HealthReporter::new();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let stopping = Arc::new(tokio::sync::Mutex::new(false));
        tokio::spawn(super::watch_outbox(
            Arc::downgrade(&store),
            health.clone(),
            std::time::Duration::from_millis(10),
            stopping.clone(),
        ));
        let m = crate::metrics::Metrics::new();
        m.set_ready(true);
        *flaky.down.lock().unwrap() = Some("PostgreSQL unavailable".into());
        until(&health, false).await;
        m.note_outbox(store.as_ref());
        assert!(!m.is_ready());
        *flaky.down.lock().unwrap() = None;
        until(&health, true).await;
        m.note_outbox(store.as_ref());
        assert!(m.is_ready(), "ready again once the outage ended");
        // Down again, and the gateway stops meanwhile: it stays NOT_SERVING.
        *flaky.down.lock().unwrap() = Some("again".into());
        until(&health, false).await;
        *stopping.lock().await = true;
        *flaky.down.lock().unwrap() = None;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !serving(&health).await,
            "a stopping gateway is not turned SERVING"
        );
    }
}
