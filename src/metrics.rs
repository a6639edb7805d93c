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
    crate::config::DEFAULT_BOTFRAMEWORK_CHANNEL_IDS
        .into_iter()
        .chain([
            crate::channels::facebook::render::CHANNEL,
            crate::channels::slack::render::CHANNEL_ID,
        ])
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
pub struct OutcomeLabels {
    pub channel: LabelValue,
    pub outcome: LabelValue,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: channel calls and end-to-end delivery both fit.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

pub struct Metrics {
    registry: Registry,
    accepted: Family<ChannelLabel, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    retried: Family<ChannelLabel, Counter>,
    delivery_latency: Family<ChannelLabel, Histogram, fn() -> Histogram>,
    request_latency: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    rate_limit_pauses: Family<ChannelLabel, Counter>,
    room_wait: Family<ChannelLabel, Histogram, fn() -> Histogram>,
    pub queue_depth: Gauge,
    pub active_workers: Gauge,
    pub token_refreshes: Family<ChannelLabel, Gauge>,
    /// Open WatchDeliveries streams.
    pub watchers: Gauge,
    /// Messages read back from the outbox to tell watchers of a change: one per change, however
    /// many watch.
    pub watch_reads: Counter,
    ready: AtomicBool,
    /// Set once the outbox refused writes for good: not ready until a restart.
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
        let mut registry = Registry::with_prefix("channel_gateway");
        let accepted = Family::<ChannelLabel, Counter>::default();
        let finished = Family::<OutcomeLabels, Counter>::default();
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
        let room_wait = Family::<ChannelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let queue_depth = Gauge::default();
        let active_workers = Gauge::default();
        let token_refreshes = Family::<ChannelLabel, Gauge>::default();
        let watchers = Gauge::default();
        let watch_reads = Counter::default();
        registry.register("watchers", "Open WatchDeliveries streams", watchers.clone());
        registry.register(
            "watch_outbox_reads",
            "Messages read back from the outbox for WatchDeliveries (one per state change, however many watch)",
            watch_reads.clone(),
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
            "Channel access tokens fetched, by channel",
            token_refreshes.clone(),
        );
        Self {
            registry,
            accepted,
            finished,
            retried,
            delivery_latency,
            request_latency,
            rate_limit_pauses,
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

    pub fn finished(&self, channel: &str, outcome: &'static str, since_accept: Option<Duration>) {
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

    /// Takes in whether the outbox still takes writes: once it stopped, the gateway is not
    /// ready until a restart.
    pub fn note_outbox(&self, store: &dyn crate::outbox::Store) {
        if store.failure().is_some() {
            self.outbox_failed.store(true, Ordering::SeqCst);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
        m.finished("webchat", "delivered", None);
        m.finished("line", "delivered", None);
        m.finished("line", "delivered", None);
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

    /// Built-in ids count through the cached series, configured ones through the families:
    /// both must land in the same exposed series.
    #[test]
    fn cached_and_family_series_expose_the_same_counts() {
        let m = Metrics::new();
        for channel in ["msteams", "line"] {
            m.accepted(channel, 3);
            m.finished(channel, "delivered", Some(Duration::from_millis(5)));
            m.finished(channel, "delivered", None);
            m.finished(channel, "failed", None);
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
    async fn a_failed_outbox_makes_the_gateway_not_ready_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::outbox::LogStore::open(dir.path(), 1 << 20).unwrap();
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
