//! At most one log line per period for a kind of event a peer can cause at will (refused
//! connections, failed authentication): a flood then writes one line a second that counts the
//! lines it stands for, instead of filling the disk at the attacker's pace.
//!
//! Owns only the decision to log; callers write the line.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogLimit {
    every: Duration,
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were left out since the
    /// last one; `None` when this one is left out (and counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = s
            .last
            .is_none_or(|l| now.saturating_duration_since(l) >= self.every);
        if due {
            s.last = Some(now);
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_rest() {
        let l = LogLimit::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 0..5 {
            assert_eq!(l.allow(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), None);
    }
}
