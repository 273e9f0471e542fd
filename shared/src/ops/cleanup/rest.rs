//! The rest after each batch: how long, and on MySQL/MariaDB whether InnoDB needs it now.

use std::time::Duration;

use crate::store::{Db, Engine, Pool};

/// Highest accepted `rest_ratio`.
pub const MAX_REST_RATIO: f64 = 100.0;

/// Shortest rest between two SQLite batches, whatever the ratio: a writer polling for the lock
/// must find it free now and then.
pub const SQLITE_MIN_REST: Duration = Duration::from_millis(10);

/// Default `rest_from_redo` (`SESSION_CLEANUP_REST_FROM_REDO`): on MySQL/MariaDB, batches rest
/// only while InnoDB's checkpoint age is at least half its limit. InnoDB flushes dirty pages
/// hard from 7/8 of that limit and stalls writes at it; on this machine's default server
/// (96 MiB redo log) the age sat at 88–100 % of the limit all through a 1,000,000-session
/// purge even with rests, while a server with a 1 GiB redo log reached 43 % at the end of the
/// same purge without any (bench/results/cleanup.md, 2026-12-03 22:13).
pub const DEFAULT_REST_FROM_REDO: f64 = 0.5;

/// The rest after each batch, as a multiple of the batch's time, when `rest_ratio` is not set.
///
/// - **SQLite: 1.0.** One writer at a time and no queue for waiting writers: their busy
///   handlers poll with growing sleeps, so back-to-back batches starve them until their busy
///   timeout runs out. Resting as long as the lock was held leaves it free half the time.
/// - **MySQL/MariaDB: 1.0, while InnoDB's redo log is under pressure** (see `rest_from_redo`).
///   Lock waiters queue fairly, but under back-to-back deletes single batches and COMMITs
///   stall on a server whose buffer pool and redo log the table outgrows (MariaDB's defaults,
///   128 MiB and 96 MiB: InnoDB flushed at the redo log's limit all through the purge). There,
///   at 1,000,000 sessions, the longest transaction was over 100 ms in 6 of 8 runs without
///   rests and in 3 of 12 with. With 2 GiB and 1 GiB it was 55 ms without rests, and a rest
///   after every batch only halved the rate — hence resting only under pressure.
/// - **PostgreSQL: 0.** Rests lowered the application's median latency but not its p99, and
///   cost a quarter to two fifths of the rate (bench/results/cleanup.md, 2026-12-03 08:58–10:30).
pub fn default_rest_ratio(engine: Engine) -> f64 {
    match engine {
        Engine::Sqlite | Engine::MySql => 1.0,
        Engine::Postgres => 0.0,
    }
}

/// How full InnoDB's redo log is: its checkpoint age as a share of the largest it may reach
/// (MariaDB's `Innodb_checkpoint_age` ÷ `Innodb_checkpoint_max_age`). `None` where the server
/// does not report both (MySQL, other engines).
pub async fn redo_log_share(db: &Db) -> Result<Option<f64>, sqlx::Error> {
    let Pool::MySql(pool) = db.pool() else {
        return Ok(None);
    };
    // information_schema rather than SHOW STATUS: a fifth of the time (0.2 ms here).
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT UPPER(VARIABLE_NAME), VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME IN ('INNODB_CHECKPOINT_AGE', 'INNODB_CHECKPOINT_MAX_AGE')",
    )
    .fetch_all(pool)
    .await?;
    let value = |name: &str| {
        rows.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.parse::<f64>().ok())
    };
    Ok(
        match (
            value("INNODB_CHECKPOINT_AGE"),
            value("INNODB_CHECKPOINT_MAX_AGE"),
        ) {
            (Some(age), Some(max)) if max > 0.0 => Some(age / max),
            _ => None,
        },
    )
}

/// Decides the rest after each batch of one rule's walk.
pub(super) struct Rests {
    engine: Engine,
    ratio: f64,
    from_redo: f64,
    /// False once the server turned out not to report its redo log's fill.
    probing: bool,
}

impl Rests {
    /// Rests of `ratio` times each batch on `engine`; on MySQL/MariaDB only while the redo log
    /// is at least `from_redo` full (0: always).
    pub(super) fn new(engine: Engine, ratio: f64, from_redo: f64) -> Rests {
        Rests {
            engine,
            ratio,
            from_redo,
            probing: engine == Engine::MySql && ratio > 0.0 && from_redo > 0.0,
        }
    }

    /// How long to rest after a batch that `held` its locks, less `already` spent since its
    /// commit (see [`rest_after`]).
    pub(super) async fn after(&mut self, db: &Db, held: Duration, already: Duration) -> Duration {
        let ratio = if self.needed(db).await {
            self.ratio
        } else {
            0.0
        };
        rest_after(self.engine, ratio, held, already)
    }

    /// Whether this batch calls for a rest at all. Without a reading of the redo log, it does:
    /// the rests are the safe side.
    async fn needed(&mut self, db: &Db) -> bool {
        if !self.probing {
            return true;
        }
        match redo_log_share(db).await {
            Ok(Some(share)) => redo_calls_for_rest(share, self.from_redo),
            Ok(None) => {
                self.probing = false;
                tracing::debug!(
                    "the server does not report InnoDB's checkpoint age; resting after every batch"
                );
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading InnoDB's checkpoint age failed; resting");
                true
            }
        }
    }
}

/// Whether a redo log `share` full calls for a rest when rests start at `from`.
fn redo_calls_for_rest(share: f64, from: f64) -> bool {
    share >= from
}

/// How long to sleep after a batch that `held` its locks: `ratio` times that (at least
/// [`SQLITE_MIN_REST`] on SQLite), less the work done since the commit that held no lock
/// (`already`: the SQLite WAL checkpoint).
fn rest_after(engine: Engine, ratio: f64, held: Duration, already: Duration) -> Duration {
    let mut rest = held.mul_f64(ratio);
    if engine == Engine::Sqlite {
        rest = rest.max(SQLITE_MIN_REST);
    }
    rest.saturating_sub(already)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_follows_the_ratio_with_sqlite_s_floor_and_counts_the_checkpoint() {
        let ms = Duration::from_millis;
        assert_eq!(rest_after(Engine::MySql, 1.0, ms(40), ms(0)), ms(40));
        assert_eq!(rest_after(Engine::MySql, 0.5, ms(40), ms(0)), ms(20));
        assert_eq!(rest_after(Engine::Postgres, 0.0, ms(40), ms(0)), ms(0));
        assert_eq!(rest_after(Engine::Postgres, 2.0, ms(40), ms(0)), ms(80));
        assert_eq!(
            rest_after(Engine::Sqlite, 0.0, ms(40), ms(0)),
            SQLITE_MIN_REST
        );
        assert_eq!(rest_after(Engine::Sqlite, 1.0, ms(40), ms(15)), ms(25));
        assert_eq!(rest_after(Engine::Sqlite, 1.0, ms(40), ms(60)), ms(0));
    }

    #[test]
    fn the_redo_log_calls_for_rests_from_its_threshold_up() {
        assert!(!redo_calls_for_rest(0.0, DEFAULT_REST_FROM_REDO));
        assert!(!redo_calls_for_rest(0.43, DEFAULT_REST_FROM_REDO));
        assert!(redo_calls_for_rest(0.5, DEFAULT_REST_FROM_REDO));
        assert!(redo_calls_for_rest(0.95, DEFAULT_REST_FROM_REDO));
        assert!(redo_calls_for_rest(1.0, 1.0));
    }

    #[test]
    fn only_mysql_with_a_rest_and_a_threshold_reads_the_redo_log() {
        let probes = |e, ratio, from| Rests::new(e, ratio, from).probing;
        assert!(probes(Engine::MySql, 1.0, 0.5));
        assert!(!probes(Engine::MySql, 0.0, 0.5), "no rest to decide");
        assert!(!probes(Engine::MySql, 1.0, 0.0), "threshold 0: always rest");
        assert!(!probes(Engine::Postgres, 1.0, 0.5));
        assert!(!probes(Engine::Sqlite, 1.0, 0.5));
    }
}
