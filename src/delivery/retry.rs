//! Backoff between attempts: exponential with full jitter, honouring the channel's Retry-After,
//! clamped to a maximum. Pure, so the schedule can be tested without waiting.

use std::time::Duration;

/// The wait before attempt `attempt + 1` (attempt counts from 1). `hint` is the channel's
/// Retry-After; it is a floor, jitter only spreads waits above it, and `max` caps everything.
pub fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    hint: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(max);
    // Full jitter: uniformly in [0, ceiling]; `jitter` is that uniform draw in [0, 1].
    let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
    match hint {
        Some(h) => h.max(jittered).min(max),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_exponentially_within_the_clamp() {
        let base = 100 * MS;
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, base, max, None, 1.0), 100 * MS);
        assert_eq!(backoff(3, base, max, None, 1.0), 400 * MS);
        assert_eq!(backoff(10, base, max, None, 1.0), max);
        assert_eq!(backoff(3, base, max, None, 0.5), 200 * MS);
        assert_eq!(
            backoff(40, base, max, None, 1.0),
            max,
            "no overflow on many attempts"
        );
    }

    #[test]
    fn retry_after_is_a_floor_but_clamped() {
        let base = 100 * MS;
        let max = Duration::from_secs(10);
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(3)), 0.0),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(300)), 0.0),
            max
        );
    }
}
