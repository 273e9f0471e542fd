//! The scheduler's clock: which tick is due, and the guarantee that N replicas enqueue
//! exactly one job per tick and catch a missed tick up once, never in a burst.
//!
//! apalis-cron fires on every replica (apalis-1.0-notes §3), so ticks are computed here and
//! turned into jobs with a dedupe key derived from the tick (`schedule:<name>:<unix secs>`):
//! however many replicas enqueue the same tick, the queue keeps one job. A per-schedule
//! record in Redis (`last fired tick`, advanced by compare-and-set) makes a replica that comes
//! back after downtime fire only the *latest* missed tick, once. Every replica reads "now" from
//! the Redis server ([`server_now`]), so their own clocks' errors do not matter.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Cadence {
    /// At every multiple of this many seconds since the Unix epoch (so replicas agree).
    Every(u64),
    /// A cron expression, seconds first, in UTC.
    Cron(String),
}

impl Cadence {
    /// Parses `every 3600s` or a (six-field) cron expression.
    pub fn parse(s: &str) -> Result<Cadence, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("every ") {
            let secs = rest
                .trim_end_matches('s')
                .parse::<u64>()
                .map_err(|_| format!("'{s}': expected 'every <seconds>s'"))?;
            if secs == 0 {
                return Err(format!("'{s}': the interval must be at least 1 second"));
            }
            return Ok(Cadence::Every(secs));
        }
        let normalized = crate::config::parse_cron(s)
            .map_err(|expected| format!("'{s}': expected {expected}"))?;
        Ok(Cadence::Cron(normalized))
    }

    /// The latest tick at or before `now`, if any.
    pub fn latest_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Cadence::Every(secs) => {
                let t = now.timestamp();
                let secs = *secs as i64;
                Utc.timestamp_opt(t - t.rem_euclid(secs), 0).single()
            }
            Cadence::Cron(expr) => {
                let schedule = cron::Schedule::from_str(expr).ok()?;
                // Walking back from the next whole second finds the tick however long ago it
                // was (a monthly or yearly schedule); the walk back is strictly before.
                let next_second = Utc.timestamp_opt(now.timestamp() + 1, 0).single()?;
                schedule.after(&next_second).next_back()
            }
        }
    }

    /// How many ticks fall strictly between `after` and `before`, counting at most `cap`
    /// (a scheduler down for a year on a per-second cadence is reported as "at least cap").
    pub fn ticks_between(&self, after: DateTime<Utc>, before: DateTime<Utc>, cap: u64) -> u64 {
        match self {
            Cadence::Every(secs) => {
                let gap = (before.timestamp() - after.timestamp()).max(0) as u64;
                // Both ends are ticks in practice; count the multiples strictly inside.
                (gap.saturating_sub(1) / secs).min(cap)
            }
            Cadence::Cron(expr) => match cron::Schedule::from_str(expr) {
                Ok(schedule) => schedule
                    .after(&after)
                    .take_while(|t| *t < before)
                    .take(cap as usize)
                    .count() as u64,
                Err(_) => 0,
            },
        }
    }

    /// The first tick strictly after `now`.
    pub fn next_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Cadence::Every(secs) => {
                let t = now.timestamp();
                let secs = *secs as i64;
                Utc.timestamp_opt(t - t.rem_euclid(secs) + secs, 0).single()
            }
            Cadence::Cron(expr) => cron::Schedule::from_str(expr).ok()?.after(&now).next(),
        }
    }
}

/// One named schedule and the job it enqueues.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    /// Name, used in Redis keys and dedupe keys (`cleanup`, `full_maintenance`, `health_report`).
    pub name: String,
    /// When it fires.
    pub cadence: Cadence,
    /// Whether the first pass that finds no record fires the latest tick at once (a cleanup
    /// daemon cleans when it starts, as the original's did) instead of only recording it
    /// (full maintenance waits for its hour rather than starting at install time).
    pub fire_on_first_sight: bool,
}

/// The dedupe key of one tick: identical on every replica.
pub fn tick_dedupe_key(schedule: &str, tick: DateTime<Utc>) -> String {
    format!("schedule:{schedule}:{}", tick.timestamp())
}

/// Redis key holding the last fired tick of a schedule (one hash slot per namespace).
pub fn last_tick_key(namespace: &str, schedule: &str) -> String {
    format!("{{sessionfleet:{namespace}}}:schedule:{schedule}:last")
}

/// Advances the last-fired record to `tick` only if it is newer: returns true when this call
/// moved it (compare-and-set, atomic in Redis).
const ADVANCE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1";

/// Replaces a record found in the future (see [`FUTURE_RECORD_ALLOWANCE`]) only if it still
/// holds what this pass read, so a concurrent advance by another replica is never undone.
const REPLACE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1";

/// How far ahead of "now" (the Redis server's clock, [`server_now`]) a last-fired record may
/// be before it is taken for a clock fault: Redis failed over to a host whose clock is
/// behind, its clock set back, or a scheduler that judged by its own fast clock. A record a
/// day ahead would otherwise silence every replica until that day came.
pub const FUTURE_RECORD_ALLOWANCE: Duration = Duration::from_secs(300);

/// Missed ticks are counted up to this many; counting further only costs time.
pub const MISSED_TICKS_COUNT_CAP: u64 = 10_000;

/// What one scheduler pass decided for one schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TickDecision {
    /// First sight of a schedule that does not fire on it: the record was set to the latest
    /// tick, nothing fired (installing a scheduler does not start its maintenance at once).
    Initialized(i64),
    /// The tick was enqueued (or found already enqueued by another replica) and recorded.
    Fired(i64),
    /// Ticks were missed (every scheduler was down): only the latest, `tick`, was enqueued,
    /// and `missed` older ones were skipped rather than fired in a burst.
    CaughtUp {
        /// The tick that was enqueued (Unix seconds).
        tick: i64,
        /// Ticks between the last recorded one and `tick` that were skipped (capped at
        /// [`MISSED_TICKS_COUNT_CAP`]).
        missed: u64,
    },
    /// The record was ahead of this replica's clock by more than
    /// [`FUTURE_RECORD_ALLOWANCE`] (a replica with a clock running fast wrote it): it was
    /// replaced by `tick`, which was enqueued (the dedupe key keeps it to one job).
    FutureRecordReplaced {
        /// The tick that was enqueued (Unix seconds).
        tick: i64,
        /// The record found (Unix seconds).
        recorded: i64,
    },
    /// Nothing due.
    Idle,
}

/// Runs one pass for `schedule` at `now`: if a tick newer than the record is due, enqueue it
/// through `enqueue` (which must deduplicate on the key it is given) and then advance the
/// record. Only the latest due tick is enqueued, so downtime yields one catch-up, not a burst.
///
/// The order — enqueue, then record — means a replica that dies in between leaves the tick to
/// the next pass of any replica, and the dedupe key keeps that from becoming a second job.
pub async fn pass<F, Fut, E>(
    redis: &mut redis::aio::ConnectionManager,
    namespace: &str,
    schedule: &Schedule,
    now: DateTime<Utc>,
    enqueue: F,
) -> Result<TickDecision, ScheduleError>
where
    F: FnOnce(DateTime<Utc>, String) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Some(tick) = schedule.cadence.latest_tick(now) else {
        return Ok(TickDecision::Idle);
    };
    let key = last_tick_key(namespace, &schedule.name);
    let last: Option<i64> = redis::cmd("GET").arg(&key).query_async(redis).await?;
    // What this pass does: whether it fires the tick, and how it reports it.
    let allowance = FUTURE_RECORD_ALLOWANCE.as_secs() as i64;
    let decision = match last {
        None if schedule.fire_on_first_sight => TickDecision::Fired(tick.timestamp()),
        None => TickDecision::Initialized(tick.timestamp()),
        Some(last) if last > now.timestamp().saturating_add(allowance) => {
            TickDecision::FutureRecordReplaced {
                tick: tick.timestamp(),
                recorded: last,
            }
        }
        Some(last) if last >= tick.timestamp() => return Ok(TickDecision::Idle),
        Some(last) => {
            let missed = Utc
                .timestamp_opt(last, 0)
                .single()
                .map(|last| {
                    schedule
                        .cadence
                        .ticks_between(last, tick, MISSED_TICKS_COUNT_CAP)
                })
                .unwrap_or(0);
            match missed {
                0 => TickDecision::Fired(tick.timestamp()),
                missed => TickDecision::CaughtUp {
                    tick: tick.timestamp(),
                    missed,
                },
            }
        }
    };
    if !matches!(decision, TickDecision::Initialized(_)) {
        enqueue(tick, tick_dedupe_key(&schedule.name, tick))
            .await
            .map_err(|e| ScheduleError::Enqueue(e.to_string()))?;
    }
    let _: i64 = match decision {
        TickDecision::FutureRecordReplaced { recorded, .. } => {
            redis::Script::new(REPLACE_SCRIPT)
                .key(&key)
                .arg(recorded)
                .arg(tick.timestamp())
                .invoke_async(redis)
                .await?
        }
        _ => {
            redis::Script::new(ADVANCE_SCRIPT)
                .key(&key)
                .arg(tick.timestamp())
                .invoke_async(redis)
                .await?
        }
    };
    Ok(decision)
}

/// The Redis server's clock (`TIME`): the one clock every replica's passes are judged by, so
/// a replica whose own clock runs fast or slow neither fires early nor rewinds the others'
/// record (each would otherwise judge the record by its own "now").
pub async fn server_now(
    redis: &mut redis::aio::ConnectionManager,
) -> Result<DateTime<Utc>, ScheduleError> {
    let (secs, micros): (i64, u32) = redis::cmd("TIME").query_async(redis).await?;
    Ok(Utc
        .timestamp_opt(secs, micros.saturating_mul(1000))
        .single()
        .unwrap_or_else(Utc::now))
}

/// How long to sleep before the next pass: until the soonest next tick, at most `max`.
pub fn sleep_until_next(schedules: &[Schedule], now: DateTime<Utc>, max: Duration) -> Duration {
    schedules
        .iter()
        .filter_map(|s| s.cadence.next_tick(now))
        .map(|t| (t - now).to_std().unwrap_or_default())
        .min()
        .unwrap_or(max)
        .min(max)
        // A little past the tick, so `latest_tick` sees it.
        + Duration::from_millis(50)
}

/// Scheduler failures.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Redis failed.
    #[error("scheduler: redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The job could not be enqueued.
    #[error("scheduler: enqueue failed: {0}")]
    Enqueue(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_ticks_align_to_the_epoch() {
        let c = Cadence::parse("every 3600s").unwrap();
        assert_eq!(
            c.latest_tick(at("2026-11-28T03:14:15Z")),
            Some(at("2026-11-28T03:00:00Z"))
        );
        assert_eq!(
            c.next_tick(at("2026-11-28T03:14:15Z")),
            Some(at("2026-11-28T04:00:00Z"))
        );
    }

    #[test]
    fn cron_latest_tick_is_the_last_past_fire_time() {
        let c = Cadence::parse("0 2 * * *").unwrap();
        assert_eq!(
            c.latest_tick(at("2026-11-28T01:00:00Z")),
            Some(at("2026-11-27T02:00:00Z"))
        );
        assert_eq!(
            c.latest_tick(at("2026-11-28T02:00:00Z")),
            Some(at("2026-11-28T02:00:00Z"))
        );
        assert_eq!(
            c.next_tick(at("2026-11-28T02:00:00Z")),
            Some(at("2026-11-29T02:00:00Z"))
        );
    }

    /// However rare the schedule, its latest tick is found: a monthly one started mid-month
    /// records the 1st (so the next 1st fires), rather than finding none and then taking the
    /// next 1st for its first start and swallowing it.
    #[test]
    fn rare_schedules_find_their_latest_tick() {
        let monthly = Cadence::parse("0 3 1 * *").unwrap();
        assert_eq!(
            monthly.latest_tick(at("2026-11-20T12:00:00Z")),
            Some(at("2026-11-01T03:00:00Z"))
        );
        assert_eq!(
            monthly.latest_tick(at("2026-12-01T03:00:00.250Z")),
            Some(at("2026-12-01T03:00:00Z"))
        );
        assert_eq!(
            monthly.latest_tick(at("2026-12-01T02:59:59.999Z")),
            Some(at("2026-11-01T03:00:00Z"))
        );
        let yearly = Cadence::parse("0 0 2 1 1 *").unwrap();
        assert_eq!(
            yearly.latest_tick(at("2026-11-28T00:00:00Z")),
            Some(at("2026-01-01T02:00:00Z"))
        );
    }

    #[test]
    fn missed_ticks_are_the_ones_strictly_between() {
        let every = Cadence::parse("every 2s").unwrap();
        let (from, to) = (at("2026-11-28T03:00:00Z"), at("2026-11-28T03:00:08Z"));
        assert_eq!(every.ticks_between(from, to, 100), 3);
        assert_eq!(
            every.ticks_between(from, at("2026-11-28T03:00:02Z"), 100),
            0
        );
        assert_eq!(every.ticks_between(from, to, 2), 2);
        let hourly = Cadence::parse("0 * * * *").unwrap();
        assert_eq!(
            hourly.ticks_between(at("2026-11-28T01:00:00Z"), at("2026-11-28T05:00:00Z"), 100),
            3
        );
    }

    /// Five fields are Unix cron: day of week 0 or 7 is Sunday, 1 Monday. (The cron crate
    /// counts 1 = Sunday; untranslated, "Monday 02:00" ran on Sunday and 0 was refused.)
    #[test]
    fn five_field_days_of_week_count_as_unix_cron_does() {
        // 2026-11-28 is a Saturday.
        let from = at("2026-11-28T00:00:00Z");
        for (expr, next) in [
            ("0 2 * * 1", "2026-11-30T02:00:00Z"),
            ("0 2 * * 0", "2026-11-29T02:00:00Z"),
            ("0 2 * * 7", "2026-11-29T02:00:00Z"),
            ("0 2 * * 1-5", "2026-11-30T02:00:00Z"),
            ("0 2 * * 5-7", "2026-11-28T02:00:00Z"),
            ("0 2 * * 2,4", "2026-12-01T02:00:00Z"),
            ("0 2 * * */3", "2026-11-28T02:00:00Z"), // Sun, Wed, Sat
            ("0 2 * * MON", "2026-11-30T02:00:00Z"),
            ("0 2 * * MON-FRI", "2026-11-30T02:00:00Z"),
        ] {
            let c = Cadence::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            let from = if expr.ends_with("5-7") {
                at("2026-11-27T03:00:00Z")
            } else {
                from
            };
            assert_eq!(c.next_tick(from), Some(at(next)), "{expr}");
        }
        // Saturday 02:00 is not in Monday to Friday; the week's ticks are five.
        let weekdays = Cadence::parse("0 2 * * 1-5").unwrap();
        assert_eq!(
            weekdays.ticks_between(at("2026-11-29T00:00:00Z"), at("2026-12-06T00:00:00Z"), 100),
            5
        );
        assert!(Cadence::parse("0 2 * * 8").is_err());
        assert!(Cadence::parse("0 2 * * 3-1").is_err());
        // Names and numbers mix as in crontab; "n/step" runs to the week's end (7 = Sunday).
        let mon_to_fri = Cadence::parse("0 2 * * 1-FRI").unwrap();
        assert_eq!(
            mon_to_fri.ticks_between(at("2026-11-29T00:00:00Z"), at("2026-12-06T00:00:00Z"), 100),
            5
        );
        let fri_sun = Cadence::parse("0 2 * * 5/2").unwrap();
        assert_eq!(
            fri_sun.next_tick(at("2026-11-28T00:00:00Z")),
            Some(at("2026-11-29T02:00:00Z"))
        );
        // Day of month and day of week both restricted: crontab takes either, the crate both.
        assert!(Cadence::parse("0 3 1 * 1").is_err());
        assert!(Cadence::parse("0 3 1 * *").is_ok());
    }

    #[test]
    fn bad_cadences_are_refused() {
        assert!(Cadence::parse("every 0s").is_err());
        assert!(Cadence::parse("sometimes").is_err());
    }
}
