//! Lease timing: how long a lease lives, how it is kept alive, when its holder steps down.

use std::time::Duration;

/// Default lease lifetime; the `SESSIONFLEET_LEASE_TTL_MS` setting's default.
pub const DEFAULT_TTL: Duration = Duration::from_millis(15_000);
/// Renewals per TTL: the keeper renews every `ttl / DEFAULT_RENEWALS_PER_TTL`.
pub const DEFAULT_RENEWALS_PER_TTL: u32 = 3;
/// Upper bound of one renewal's own timeout.
pub const DEFAULT_RENEW_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound of the pause between renewal retries after a failure.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(250);
/// The holder steps down `ttl / DEFAULT_STEP_DOWN_DIVISOR` before its lease would expire.
pub const DEFAULT_STEP_DOWN_DIVISOR: u32 = 5;
/// Base delay before a job that found its lease busy tries again (jittered to half..full).
pub const DEFAULT_BUSY_DELAY: Duration = Duration::from_secs(2);
/// Shortest accepted TTL (the same bound as the `SESSIONFLEET_LEASE_TTL_MS` setting).
pub const MIN_TTL: Duration = Duration::from_millis(300);
/// Longest accepted TTL.
pub const MAX_TTL: Duration = Duration::from_secs(600);

/// Timing of one lease. Build it with [`LeaseConfig::from_ttl`] (or `default()`), which
/// derives every other field from the TTL, then adjust fields if needed and call
/// [`LeaseConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Lifetime of the Redis lease key, renewed while the holder works. Millisecond
    /// precision. Default [`DEFAULT_TTL`] (15 s), range [`MIN_TTL`]..=[`MAX_TTL`].
    pub ttl: Duration,
    /// How often the keeper renews the lease. Default `ttl / 3`
    /// ([`DEFAULT_RENEWALS_PER_TTL`]).
    pub renew_every: Duration,
    /// How long one renewal may take before it counts as failed. Default the smaller of
    /// [`DEFAULT_RENEW_TIMEOUT`] (1 s) and `renew_every / 2`.
    pub renew_timeout: Duration,
    /// Pause before retrying a failed renewal. Default the smaller of
    /// [`DEFAULT_RETRY_DELAY`] (250 ms) and `renew_every / 4`.
    pub retry_delay: Duration,
    /// How long before the lease would expire the holder gives up when it could not renew
    /// (Redis errors, or its process was paused): it then cancels its operation, so it
    /// stops while the lease is still its own rather than after. Default `ttl / 5`
    /// ([`DEFAULT_STEP_DOWN_DIVISOR`]).
    pub step_down_margin: Duration,
    /// Base delay before a job that found the lease busy tries again; [`Self::busy_delay`]
    /// jitters it to between half and all of it. Default [`DEFAULT_BUSY_DELAY`] (2 s).
    pub busy_delay: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig::from_ttl(DEFAULT_TTL)
    }
}

impl LeaseConfig {
    /// The default timing for a lease of `ttl` (the `SESSIONFLEET_LEASE_TTL_MS` setting).
    pub fn from_ttl(ttl: Duration) -> LeaseConfig {
        let renew_every = ttl / DEFAULT_RENEWALS_PER_TTL;
        LeaseConfig {
            ttl,
            renew_every,
            renew_timeout: DEFAULT_RENEW_TIMEOUT.min(renew_every / 2),
            retry_delay: DEFAULT_RETRY_DELAY.min(renew_every / 4),
            step_down_margin: ttl / DEFAULT_STEP_DOWN_DIVISOR,
            busy_delay: DEFAULT_BUSY_DELAY,
        }
    }

    /// Refuses timings under which the keeper could not keep the lease, with one line
    /// saying which.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl < MIN_TTL || self.ttl > MAX_TTL {
            return Err(format!(
                "lease ttl {} ms is outside {}..={} ms",
                self.ttl.as_millis(),
                MIN_TTL.as_millis(),
                MAX_TTL.as_millis()
            ));
        }
        if self.step_down_margin >= self.ttl {
            return Err(format!(
                "lease step_down_margin {} ms must be shorter than the ttl {} ms",
                self.step_down_margin.as_millis(),
                self.ttl.as_millis()
            ));
        }
        let trust = self.ttl - self.step_down_margin;
        if self.renew_every.is_zero() || self.renew_timeout.is_zero() || self.retry_delay.is_zero()
        {
            return Err(
                "lease renew_every, renew_timeout and retry_delay must be above zero".into(),
            );
        }
        if self.renew_every + self.renew_timeout >= trust {
            return Err(format!(
                "lease renew_every {} ms + renew_timeout {} ms must be below ttl - step_down_margin = {} ms, \
                 or a renewal could not finish before the holder steps down",
                self.renew_every.as_millis(),
                self.renew_timeout.as_millis(),
                trust.as_millis()
            ));
        }
        if self.busy_delay.is_zero() {
            return Err("lease busy_delay must be above zero".into());
        }
        Ok(())
    }

    /// A jittered delay before retrying a busy lease: between half and all of `busy_delay`,
    /// so workers waiting for the same target do not retry in lockstep.
    pub fn busy_delay(&self) -> Duration {
        crate::backoff::jitter(self.busy_delay)
    }

    pub(super) fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }
}

/// The jittered delay before retrying a busy lease with the default settings. A job that
/// finds its lease busy is deferred by this much; it does not count as a failed attempt.
pub fn busy_delay() -> Duration {
    crate::backoff::jitter(DEFAULT_BUSY_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_ttl_and_validate() {
        let c = LeaseConfig::default();
        assert_eq!(c.ttl, Duration::from_secs(15));
        assert_eq!(c.renew_every, Duration::from_secs(5));
        assert_eq!(c.step_down_margin, Duration::from_secs(3));
        c.validate().unwrap();
        LeaseConfig::from_ttl(MIN_TTL).validate().unwrap();
        LeaseConfig::from_ttl(MAX_TTL).validate().unwrap();
    }

    #[test]
    fn impossible_timings_are_refused() {
        assert!(
            LeaseConfig::from_ttl(Duration::from_millis(100))
                .validate()
                .is_err()
        );
        let mut c = LeaseConfig::default();
        c.renew_every = c.ttl;
        let msg = c.validate().unwrap_err();
        assert!(msg.contains("renew_every"), "{msg}");
        let mut c = LeaseConfig::default();
        c.step_down_margin = c.ttl;
        assert!(c.validate().is_err());
        let c = LeaseConfig {
            busy_delay: Duration::ZERO,
            ..LeaseConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn busy_delay_is_jittered_within_bounds() {
        for _ in 0..50 {
            let d = busy_delay();
            assert!(
                d >= DEFAULT_BUSY_DELAY / 2 && d <= DEFAULT_BUSY_DELAY,
                "{d:?}"
            );
        }
    }
}
