//! Prometheus metrics and the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
//!
//! Owns metric names, labels and the text exposition. Other modules record through `Metrics`'
//! methods; nothing here decides anything about delivery.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value. Every outcome and the channel ids the gateway ships with are static, so
/// counting a message allocates nothing (labels are built for every delivered message); an id
/// added in configuration is copied.
pub type LabelValue = Cow<'static, str>;

/// The channel ids of the default configuration.
fn known_channels() -> impl Iterator<Item = &'static str> {
    crate::channels::default_channel_ids()
}

pub fn channel_label(channel: &str) -> LabelValue {
    match known_channels().find(|k| *k == channel) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(channel.to_string()),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub channel: LabelValue,
    /// A fixed phrase from the channel's verification, never text from the request.
    pub reason: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub channel: LabelValue,
    pub outcome: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub channel: LabelValue,
    /// A bounded class of the channel's error (`error_class`), never its own code or text.
    pub error: &'static str,
}

/// What kind of failure ended a message, from a small fixed set: the channel's own codes are
/// unbounded, so they stay in the message's status, not in a label.
pub fn error_class(e: Option<&crate::channels::ChannelError>) -> &'static str {
    use crate::channels::{ErrorCategory, FailureKind};
    let Some(e) = e else { return "unknown" };
    match (e.category, e.http_status, e.kind) {
        (Some(ErrorCategory::NotFound), _, _) | (None, Some(404), _) => "not_found",
        (Some(ErrorCategory::Unauthorized), _, _) | (None, Some(401 | 403), _) => "unauthorized",
        (Some(ErrorCategory::InvalidRequest), _, _) | (None, Some(400 | 413 | 422), _) => {
            "invalid_request"
        }
        (Some(ErrorCategory::Refused), _, _) => "refused",
        (None, Some(429), _) => "rate_limited",
        (None, Some(500..=599), _) => "server_error",
        (None, Some(_), _) => "other_http",
        // No answer: a timeout or reset after sending, the channel unreachable, or the gateway
        // refusing to send (no credentials, a service URL not allowed).
        (None, None, FailureKind::Ambiguous) => "no_answer",
        (None, None, FailureKind::Retryable) => "unreachable",
        (None, None, FailureKind::Permanent) => "not_sent",
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: channel calls and end-to-end delivery both fit.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

pub struct Metrics {
    registry: Registry,
    commit_stats: Arc<std::sync::OnceLock<Arc<crate::outbox::CommitStats>>>,
    leases: Arc<std::sync::OnceLock<LeaseWatch>>,
    accepted: Family<ChannelLabel, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    retried: Family<ChannelLabel, Counter>,
    delivery_latency: Family<ChannelLabel, Histogram, fn() -> Histogram>,
    request_latency: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    rate_limit_pauses: Family<ChannelLabel, Counter>,
    inbound_refused: Family<RefusalLabels, Counter>,
    inbound_events: Family<OutcomeLabels, Counter>,
    /// Received events in the inbox that some consumer group has not acked.
    pub inbound_pending: Gauge,
    /// Open Receive streams.
    pub receivers: Gauge,
    /// Shared inbox: conversations (per consumer group) this replica holds.
    pub inbox_claims: Gauge,
    /// Shared inbox: claims this replica lost to another (their lease ran out).
    pub inbox_claim_losses: Counter,
    room_wait: Family<ChannelLabel, Histogram, fn() -> Histogram>,
    pub queue_depth: Gauge,
    pub active_workers: Gauge,
    token_refreshes: Family<ChannelLabel, Counter>,
    /// Open WatchDeliveries streams.
    pub watchers: Gauge,
    /// Messages read back from the outbox to tell watchers of a change: one per change, however
    /// many watch.
    pub watch_reads: Counter,
    ready: AtomicBool,
    /// Set once the outbox refused writes for good (not ready until a restart), or while a
    /// transient one is unreachable.
    outbox_failed: AtomicBool,
    /// The series every delivered message touches, for each built-in channel id (in
    /// `known_channels` order), taken from the families on first use: `get_or_create` takes a
    /// lock and hashes its label set with SipHash, three times per message (~1% of the
    /// instructions per delivered message). A metric's clone shares its value. Ids added in
    /// configuration go through the families.
    hot: Box<[std::sync::OnceLock<Hot>]>,
}

struct Hot {
    accepted: Counter,
    delivered: Counter,
    delivery_latency: Histogram,
    request_ok: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // `process_*` are the standard unprefixed names; the gateway's own are prefixed.
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let commit_stats = Arc::new(std::sync::OnceLock::new());
        root.register_collector(Box::new(CommitCollector(commit_stats.clone())));
        let leases = Arc::new(std::sync::OnceLock::new());
        root.register_collector(Box::new(LeaseCollector(leases.clone())));
        let registry = root.sub_registry_with_prefix("channel_gateway");
        let accepted = Family::<ChannelLabel, Counter>::default();
        let finished = Family::<OutcomeLabels, Counter>::default();
        let failed = Family::<FailureLabels, Counter>::default();
        let retried = Family::<ChannelLabel, Counter>::default();
        let delivery_latency =
            Family::<ChannelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let request_latency =
            Family::<OutcomeLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let rate_limit_pauses = Family::<ChannelLabel, Counter>::default();
        let inbound_refused = Family::<RefusalLabels, Counter>::default();
        let inbound_events = Family::<OutcomeLabels, Counter>::default();
        let inbound_pending = Gauge::default();
        let receivers = Gauge::default();
        let inbox_claims = Gauge::default();
        let inbox_claim_losses = Counter::default();
        let room_wait = Family::<ChannelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let queue_depth = Gauge::default();
        let active_workers = Gauge::default();
        let token_refreshes = Family::<ChannelLabel, Counter>::default();
        let watchers = Gauge::default();
        let watch_reads = Counter::default();
        registry.register("watchers", "Open WatchDeliveries streams", watchers.clone());
        registry.register(
            "watch_outbox_reads",
            "Messages read back from the outbox for WatchDeliveries (one per state change, however many watch)",
            watch_reads.clone(),
        );
        registry.register(
            "build",
            "The running build",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        registry.register(
            "messages_accepted",
            "Messages accepted, by channel",
            accepted.clone(),
        );
        registry.register(
            "messages_finished",
            "Messages finished, by channel and outcome (delivered, failed, expired)",
            finished.clone(),
        );
        registry.register(
            "messages_failed",
            "Messages failed or expired, by channel and error class (not_found, unauthorized, \
             invalid_request, refused, rate_limited, server_error, other_http, no_answer, \
             unreachable, not_sent, expired, unknown)",
            failed.clone(),
        );
        registry.register(
            "messages_retried",
            "Channel calls retried, by channel",
            retried.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From acceptance to the channel's acknowledgement, by channel",
            delivery_latency.clone(),
        );
        registry.register(
            "channel_request_duration_seconds",
            "One channel HTTP call, by channel and outcome (ok, error)",
            request_latency.clone(),
        );
        registry.register(
            "rate_limit_pauses",
            "Rate-limit scopes paused by a 429, by channel",
            rate_limit_pauses.clone(),
        );
        registry.register(
            "inbound_refused",
            "Webhook calls refused before anything was stored, by channel and a fixed reason \
             (bad signature, missing header, unreadable body, ...)",
            inbound_refused.clone(),
        );
        registry.register(
            "inbound_events",
            "Received events by channel and outcome: stored, duplicate (a channel retry of a \
             stored event, answered 2xx and not stored again), redelivered (sent to a bot again \
             after a nack, a missed ack deadline or a stream that ended), expired (kept past \
             inbound.retention with no ack)",
            inbound_events.clone(),
        );
        registry.register(
            "inbound_pending",
            "Received events in the inbox not yet acked by every consumer group",
            inbound_pending.clone(),
        );
        registry.register("receive_streams", "Open Receive streams", receivers.clone());
        registry.register(
            "inbox_claims",
            "Shared inbox (several replicas): conversations, per consumer group, this replica \
             holds and hands out",
            inbox_claims.clone(),
        );
        registry.register(
            "inbox_claim_losses",
            "Shared inbox: conversations this replica held and lost to another replica (it \
             paused or lost the database longer than the lease)",
            inbox_claim_losses.clone(),
        );
        registry.register(
            "room_wait_seconds",
            "How long a Send waited for room in its conversation's full line before it was accepted (delivery.max_wait_for_room), by channel",
            room_wait.clone(),
        );
        registry.register(
            "queue_depth",
            "Messages accepted and not yet finished",
            queue_depth.clone(),
        );
        registry.register(
            "active_conversation_workers",
            "Conversation workers alive",
            active_workers.clone(),
        );
        registry.register(
            "token_refreshes",
            "Channel access tokens fetched, by the channel whose message needed one (a Bot \
             Framework token then serves every Bot Framework channel id of its bot)",
            token_refreshes.clone(),
        );
        Self {
            registry: root,
            commit_stats,
            leases,
            accepted,
            finished,
            failed,
            retried,
            delivery_latency,
            request_latency,
            rate_limit_pauses,
            inbound_refused,
            inbound_events,
            inbound_pending,
            receivers,
            inbox_claims,
            inbox_claim_losses,
            room_wait,
            queue_depth,
            active_workers,
            token_refreshes,
            watchers,
            watch_reads,
            ready: AtomicBool::new(false),
            outbox_failed: AtomicBool::new(false),
            hot: known_channels().map(|_| Default::default()).collect(),
        }
    }

    /// Runs `f` on the hot series of `channel` if it is a built-in id; false otherwise.
    fn with_hot(&self, channel: &str, f: impl FnOnce(&Hot)) -> bool {
        let Some(i) = known_channels().position(|k| k == channel) else {
            return false;
        };
        let Some(slot) = self.hot.get(i) else {
            return false;
        };
        f(slot.get_or_init(|| {
            let outcome = |o: &'static str| OutcomeLabels {
                channel: channel_label(channel),
                outcome: Cow::Borrowed(o),
            };
            let ch = Self::ch(channel);
            Hot {
                accepted: self.accepted.get_or_create(&ch).clone(),
                delivered: self.finished.get_or_create(&outcome("delivered")).clone(),
                delivery_latency: self.delivery_latency.get_or_create(&ch).clone(),
                request_ok: self.request_latency.get_or_create(&outcome("ok")).clone(),
            }
        }));
        true
    }

    fn ch(channel: &str) -> ChannelLabel {
        ChannelLabel {
            channel: channel_label(channel),
        }
    }

    pub fn accepted(&self, channel: &str, n: u64) {
        if !self.with_hot(channel, |h| {
            h.accepted.inc_by(n);
        }) {
            self.accepted.get_or_create(&Self::ch(channel)).inc_by(n);
        }
    }

    /// Creates every counter of each channel id at 0, so a scrape before any traffic shows
    /// them (a rate over a series that appears with its first event misses that event).
    pub fn start_series(&self, channels: &[(String, bool)]) {
        for (id, fetches_tokens) in channels {
            if *fetches_tokens {
                let _ = self.token_refreshes.get_or_create(&Self::ch(id));
            }
        }
        for id in channels.iter().map(|(id, _)| id.as_str()) {
            let ch = Self::ch(id);
            let _ = self.accepted.get_or_create(&ch);
            let _ = self.retried.get_or_create(&ch);
            let _ = self.rate_limit_pauses.get_or_create(&ch);
            for outcome in ["delivered", "failed", "expired"] {
                let _ = self.finished.get_or_create(&OutcomeLabels {
                    channel: channel_label(id),
                    outcome: Cow::Borrowed(outcome),
                });
            }
        }
    }

    /// A webhook call refused before anything was stored.
    pub fn inbound_refused(&self, channel: &str, reason: &'static str) {
        self.inbound_refused
            .get_or_create(&RefusalLabels {
                channel: channel_label(channel),
                reason: Cow::Borrowed(reason),
            })
            .inc();
    }

    /// Received events by outcome (`stored`, `duplicate`, `redelivered`, `expired`).
    pub fn inbound_events(&self, channel: &str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.inbound_events
                .get_or_create(&OutcomeLabels {
                    channel: channel_label(channel),
                    outcome: Cow::Borrowed(outcome),
                })
                .inc_by(n);
        }
    }

    /// Takes in a client's running count of token fetches for one channel id.
    pub fn token_fetches(&self, channel: LabelValue, total: u64) {
        let c = self
            .token_refreshes
            .get_or_create(&ChannelLabel { channel });
        c.inc_by(total.saturating_sub(c.get()));
    }

    pub fn finished(
        &self,
        channel: &str,
        outcome: &'static str,
        error: Option<&crate::channels::ChannelError>,
        since_accept: Option<Duration>,
    ) {
        if outcome != "delivered" {
            self.failed
                .get_or_create(&FailureLabels {
                    channel: channel_label(channel),
                    error: if outcome == "expired" {
                        "expired"
                    } else {
                        error_class(error)
                    },
                })
                .inc();
        }
        if outcome == "delivered"
            && self.with_hot(channel, |h| {
                h.delivered.inc();
                if let Some(d) = since_accept {
                    h.delivery_latency.observe(d.as_secs_f64());
                }
            })
        {
            return;
        }
        self.finished
            .get_or_create(&OutcomeLabels {
                channel: channel_label(channel),
                outcome: Cow::Borrowed(outcome),
            })
            .inc();
        if let Some(d) = since_accept {
            self.delivery_latency
                .get_or_create(&Self::ch(channel))
                .observe(d.as_secs_f64());
        }
    }

    pub fn retried(&self, channel: &str) {
        self.retried.get_or_create(&Self::ch(channel)).inc();
    }

    pub fn request(&self, channel: &str, ok: bool, took: Duration) {
        if ok
            && self.with_hot(channel, |h| {
                h.request_ok.observe(took.as_secs_f64());
            })
        {
            return;
        }
        self.request_latency
            .get_or_create(&OutcomeLabels {
                channel: channel_label(channel),
                outcome: Cow::Borrowed(if ok { "ok" } else { "error" }),
            })
            .observe(took.as_secs_f64());
    }

    pub fn rate_limit_pause(&self, channel: &str) {
        self.rate_limit_pauses
            .get_or_create(&Self::ch(channel))
            .inc();
    }

    pub fn waited_for_room(&self, channel: &str, took: Duration) {
        self.room_wait
            .get_or_create(&Self::ch(channel))
            .observe(took.as_secs_f64());
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.outbox_failed.load(Ordering::SeqCst)
    }

    /// Reports the outbox writer's commits (once; a store without a writer has none).
    pub fn observe_commits(&self, stats: Option<Arc<crate::outbox::CommitStats>>) {
        if let Some(s) = stats {
            let _ = self.commit_stats.set(s);
        }
    }

    /// A replica sharing its database: its partition leases, read at each scrape.
    pub fn observe_leases(
        &self,
        rx: tokio::sync::watch::Receiver<Arc<crate::storage::lease::Ownership>>,
    ) {
        let _ = self.leases.set(LeaseWatch(rx));
    }

    /// Takes in whether the outbox still takes writes: once a local write failed, the gateway
    /// is not ready until a restart; while an engine across the network is unreachable
    /// (`Store::transient`), until it is back.
    pub fn note_outbox(&self, store: &dyn crate::outbox::Store) {
        let failed = store.failure().is_some();
        if failed || store.transient() {
            self.outbox_failed.store(failed, Ordering::SeqCst);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The outbox writer's commits, read from its counters at each scrape (the store is opened
/// before the metrics exist, so it hands them over once: `observe_commits`).
#[derive(Debug)]
struct CommitCollector(Arc<std::sync::OnceLock<Arc<crate::outbox::CommitStats>>>);

impl prometheus_client::collector::Collector for CommitCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use std::sync::atomic::Ordering::Relaxed;
        let Some(s) = self.0.get() else {
            return Ok(());
        };
        let series: [(&str, &str, f64); 3] = [
            (
                "channel_gateway_outbox_commits",
                "Outbox commits (each a transaction and one durable write for all it carries)",
                s.commits.load(Relaxed) as f64,
            ),
            (
                "channel_gateway_outbox_commit_changes",
                "Changes the outbox commits carried (messages appended, states changed)",
                s.rows.load(Relaxed) as f64,
            ),
            (
                "channel_gateway_outbox_commit_failures",
                "Outbox commits that failed (a full disk; the database unreachable)",
                s.failures.load(Relaxed) as f64,
            ),
        ];
        for (name, help, v) in series {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        s.seconds.encode(encoder.encode_descriptor(
            "channel_gateway_outbox_commit_seconds",
            "How long outbox commits took, in seconds",
            None,
            MetricType::Histogram,
        )?)?;
        Ok(())
    }
}

/// The lease manager's published ownership.
struct LeaseWatch(tokio::sync::watch::Receiver<Arc<crate::storage::lease::Ownership>>);

impl std::fmt::Debug for LeaseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseWatch")
    }
}

/// Partitions this replica holds, and its lease renewals and losses since it started.
#[derive(Debug)]
struct LeaseCollector(Arc<std::sync::OnceLock<LeaseWatch>>);

impl prometheus_client::collector::Collector for LeaseCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(w) = self.0.get() else {
            return Ok(());
        };
        let own = w.0.borrow().clone();
        let now = std::time::Instant::now();
        let owned = own
            .held
            .keys()
            .filter(|p| own.epoch_for(**p, now).is_some())
            .count();
        ConstGauge::new(owned as i64).encode(encoder.encode_descriptor(
            "channel_gateway_partitions_owned",
            "Outbox partitions this replica holds a lease on and delivers",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, v) in [
            (
                "channel_gateway_partition_lease_renewals",
                "Partition leases renewed by this replica",
                own.renewals,
            ),
            (
                "channel_gateway_partition_lease_losses",
                "Partition leases this replica lost to another (it paused or lost the database \
                 longer than the lease)",
                own.losses,
            ),
        ] {
            ConstCounter::new(v as f64).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

/// `process_*` read from `/proc/self` at each scrape (prometheus-client has no process
/// collector). Off Linux, or when `/proc` cannot be read, the series are left out.
#[derive(Debug)]
struct ProcessCollector;

/// The kernel reports CPU times in USER_HZ, which is 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

impl ProcessCollector {
    /// utime + stime in seconds, and the start time in ticks since boot, from `/proc/self/stat`.
    fn stat() -> Option<(f64, f64)> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields start after the last `)`.
        let rest = text.get(text.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name, field 3 (state) is index 0: utime is field 14, starttime field 22.
        let num = |i: usize| fields.get(i)?.parse::<f64>().ok();
        Some(((num(11)? + num(12)?) / USER_HZ, num(19)?))
    }

    fn status_kib(key: &str) -> Option<f64> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn boot_time() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }

    fn max_fds() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let gauge = |encoder: &mut prometheus_client::encoding::DescriptorEncoder,
                     name: &str,
                     help: &str,
                     v: Option<f64>| {
            match v {
                Some(v) => ConstGauge::new(v).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Gauge,
                )?),
                None => Ok(()),
            }
        };
        let stat = Self::stat();
        if let Some((cpu, _)) = stat {
            ConstCounter::new(cpu).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            Self::status_kib("VmRSS:").map(|k| k * 1024.0),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            Self::status_kib("VmSize:").map(|k| k * 1024.0),
        )?;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Most open file descriptors allowed",
            Self::max_fds(),
        )?;
        let start = stat
            .zip(Self::boot_time())
            .map(|((_, ticks), boot)| boot + ticks / USER_HZ);
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            start,
        )?;
        Ok(())
    }
}

/// Something that refreshes gauges just before a scrape.
pub type Refresh = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Serves `/metrics`, `/healthz` (the process is up) and `/readyz` (serving, not draining, and
/// the outbox still taking writes).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Refresh,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((m, r)): State<(Arc<Metrics>, Refresh)>| async move {
                r(&m);
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State((m, r)): State<(Arc<Metrics>, Refresh)>| async move {
                // The refresh also learns whether the outbox still takes writes.
                r(&m);
                if m.is_ready() {
                    (StatusCode::OK, "ready").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                }
            }),
        )
        .with_state((metrics, refresh));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The admin listener's address as configured.
pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_channel_labels_are_not_copied_and_others_are_kept_whole() {
        for id in known_channels() {
            assert!(matches!(channel_label(id), Cow::Borrowed(b) if b == id));
        }
        let added = channel_label("line");
        assert!(matches!(&added, Cow::Owned(o) if o == "line"));
        // Counted under their own ids, a configured id next to a built-in one.
        let m = Metrics::new();
        m.finished("webchat", "delivered", None, None);
        m.finished("line", "delivered", None, None);
        m.finished("line", "delivered", None, None);
        let text = m.encode();
        assert!(
            text.contains(r#"channel="webchat",outcome="delivered"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"channel="line",outcome="delivered"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn inbound_refusals_count_by_channel_and_reason() {
        let m = Metrics::new();
        m.inbound_refused("slack", "bad signature");
        m.inbound_refused("slack", "bad signature");
        m.inbound_refused("telegram", "wrong secret token");
        let text = m.encode();
        for line in [
            r#"channel_gateway_inbound_refused_total{channel="slack",reason="bad signature"} 2"#,
            r#"channel_gateway_inbound_refused_total{channel="telegram",reason="wrong secret token"} 1"#,
        ] {
            assert!(text.contains(line), "{text}");
        }
    }

    /// Built-in ids count through the cached series, configured ones through the families:
    /// both must land in the same exposed series.
    #[test]
    fn cached_and_family_series_expose_the_same_counts() {
        let m = Metrics::new();
        for channel in ["msteams", "line"] {
            m.accepted(channel, 3);
            m.finished(channel, "delivered", None, Some(Duration::from_millis(5)));
            m.finished(channel, "delivered", None, None);
            m.finished(channel, "failed", None, None);
            m.request(channel, true, Duration::from_millis(2));
            m.request(channel, true, Duration::from_millis(2));
            m.request(channel, false, Duration::from_millis(2));
        }
        let text = m.encode();
        for channel in ["msteams", "line"] {
            for line in [
                format!(r#"channel_gateway_messages_accepted_total{{channel="{channel}"}} 3"#),
                format!(r#"{{channel="{channel}",outcome="delivered"}} 2"#),
                format!(r#"{{channel="{channel}",outcome="failed"}} 1"#),
                format!(
                    r#"channel_gateway_delivery_latency_seconds_count{{channel="{channel}"}} 1"#
                ),
                format!(
                    r#"channel_gateway_channel_request_duration_seconds_count{{channel="{channel}",outcome="ok"}} 2"#
                ),
                format!(
                    r#"channel_gateway_channel_request_duration_seconds_count{{channel="{channel}",outcome="error"}} 1"#
                ),
            ] {
                assert!(text.contains(&line), "{line} missing in\n{text}");
            }
        }
    }

    #[tokio::test]
    async fn the_outbox_writers_commits_are_counted() {
        use crate::outbox::{DeliveryState, StateRecord, Store, StoredMessage};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::outbox::SqliteStore::open(dir.path()).unwrap();
        let m = Metrics::new();
        assert!(
            !m.encode().contains("outbox_commits"),
            "no store, no series"
        );
        m.observe_commits(store.commit_stats());
        let message = |id| StoredMessage {
            id,
            conversation: "c".into(),
            message: Default::default(),
            proactive: None,
            accepted_at_ms: 1,
            record: StateRecord::new(DeliveryState::Accepted, 1),
            warnings: vec![],
            op: None,
        };
        store
            .append(vec![message(1), message(2)], None)
            .await
            .unwrap();
        store.append(vec![message(3)], None).await.unwrap();
        let text = m.encode();
        for line in [
            "channel_gateway_outbox_commits_total 2",
            "channel_gateway_outbox_commit_changes_total 3",
            "channel_gateway_outbox_commit_failures_total 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            text.contains("channel_gateway_outbox_commit_seconds_count 2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_failed_outbox_makes_the_gateway_not_ready_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::outbox::SqliteStore::open(dir.path()).unwrap();
        let m = Metrics::new();
        assert!(!m.is_ready(), "not ready before serving");
        m.set_ready(true);
        m.note_outbox(&store);
        assert!(m.is_ready(), "a working outbox");
        store.break_with_a_failed_write().await;
        m.note_outbox(&store);
        assert!(!m.is_ready());
        m.set_ready(true);
        assert!(!m.is_ready(), "serving again does not clear it");
    }
}
