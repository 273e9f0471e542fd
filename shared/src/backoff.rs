//! The one retry-delay policy of the project: exponential growth with full jitter.

use std::time::Duration;

use rand::Rng;

/// A random delay between half of `base` and `base`, so that many clients retrying after the
/// same outage spread out instead of hitting the server together.
pub fn jitter(base: Duration) -> Duration {
    let ms = base.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// The delay before retry number `attempt` (1-based): `base · 2^(attempt-1)`, capped at `max`,
/// then jittered.
pub fn exponential(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    jitter(base.saturating_mul(factor).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_grows_then_caps() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let d3 = exponential(3, base, max);
        assert!(
            d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4),
            "{d3:?}"
        );
        let d20 = exponential(20, base, max);
        assert!(d20 <= max && d20 >= max / 2, "{d20:?}");
    }
}
