//! What every fake channel server of the tests shares: serving on 127.0.0.1, counting calls in
//! flight per key (a conversation, a PSID, a Slack channel), and waiting for what it recorded.
//! Each fake keeps only what its channel's API looks like.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;

/// Serves `app` on a free port of 127.0.0.1 for the rest of the test.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Calls in flight per key now, and the most ever seen at once.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<String, (u32, u32)>>);

impl InFlight {
    pub fn enter(&self, key: &str) {
        let mut f = self.0.lock().unwrap();
        let e = f.entry(key.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }

    pub fn leave(&self, key: &str) {
        if let Some(e) = self.0.lock().unwrap().get_mut(key) {
            e.0 -= 1;
        }
    }

    pub fn max(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).map_or(0, |x| x.1)
    }
}

/// Waits until `pred` holds for what `received` returns, or panics after `within` (a generous
/// bound for a busy machine, never an assertion on speed).
pub async fn wait_for<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    received: impl Fn() -> Vec<T>,
    pred: impl Fn(&[T]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = received();
        if pred(&got) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; received {} calls: {got:#?}",
                got.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
