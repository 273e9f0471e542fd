//! Whose "now" a cleanup measures expiry against. The rules compare stored UTC times with a
//! cutoff taken from a clock; a clock ahead of the application's, or times written in a zone
//! ahead of UTC, would make live sessions look expired.
//!
//! - The reference time is the earlier of this worker's clock and the database server's: a
//!   worker whose clock runs ahead cannot purge sessions early.
//! - Activity later than that reference time by more than [`FUTURE_ACTIVITY_LIMIT`] means
//!   the application does not write UTC (or its server's clock is far off): the cleanup
//!   refuses to run rather than judge every session by the wrong hour.

use chrono::{NaiveDateTime, TimeDelta};

use crate::ops::OpError;
use crate::store::{Db, Engine, Schema};

/// How far the latest recorded activity may lie past the reference time before the table is
/// taken to hold local times ahead of UTC. Below an hour, no time zone offset; above the
/// seconds two servers' clocks differ by.
pub const FUTURE_ACTIVITY_LIMIT: TimeDelta = TimeDelta::minutes(30);

/// The database server's clock, UTC; `None` on SQLite, which runs on this process's clock.
async fn database_now(db: &Db) -> Result<Option<NaiveDateTime>, sqlx::Error> {
    let sql = match db.engine() {
        Engine::Sqlite => return Ok(None),
        Engine::Postgres => "SELECT CAST(statement_timestamp() AT TIME ZONE 'UTC' AS TIMESTAMP)",
        Engine::MySql => "SELECT UTC_TIMESTAMP(6)",
    };
    Ok(Some(
        crate::on_pool!(db, p => sqlx::query_scalar::<_, NaiveDateTime>(sql).fetch_one(p).await?),
    ))
}

/// The earlier of `worker_now` and the database's clock, with a note when they differ by more
/// than `allowance`.
pub async fn reference_now(
    db: &Db,
    worker_now: NaiveDateTime,
    allowance: TimeDelta,
) -> Result<(NaiveDateTime, Option<String>), OpError> {
    let Some(server) = database_now(db).await? else {
        return Ok((worker_now, None));
    };
    let note = ((worker_now - server).abs() > allowance).then(|| {
        format!(
            "this worker's clock ({worker_now}) and the database server's ({server}, UTC) differ; \
             the earlier one was taken as now: keep both in sync with NTP"
        )
    });
    Ok((worker_now.min(server), note))
}

/// Refuses a session table whose latest activity lies more than [`FUTURE_ACTIVITY_LIMIT`]
/// after `now` (one read off the activity column's index where it has one).
pub async fn check_activity_not_ahead(
    db: &Db,
    schema: &Schema,
    now: NaiveDateTime,
) -> Result<(), OpError> {
    let t = &schema.sessions.table;
    let col = schema.activity_column();
    let latest = match db.engine() {
        // SQLite's text compares as stored; the time-column check has made sure it parses.
        Engine::Sqlite => {
            let sql = db.sql(format!("SELECT MAX({col}) FROM {t}"));
            let text: Option<String> =
                crate::on_pool!(db, p => sqlx::query_scalar(sql).fetch_one(p).await?);
            text.and_then(|v| super::times::parse_utc_text(&v))
        }
        Engine::Postgres => {
            let sql = db.sql(format!("SELECT CAST(MAX({col}) AS TIMESTAMP) FROM {t}"));
            crate::on_pool!(db, p => sqlx::query_scalar(sql).fetch_one(p).await?)
        }
        Engine::MySql => {
            let sql = db.sql(format!("SELECT CAST(MAX({col}) AS DATETIME(6)) FROM {t}"));
            crate::on_pool!(db, p => sqlx::query_scalar(sql).fetch_one(p).await?)
        }
    };
    match latest {
        Some(latest) if latest > now + FUTURE_ACTIVITY_LIMIT => Err(OpError::Invalid(format!(
            "{t}.{col} holds activity at {latest}, {} minutes after now ({now} UTC): the \
             application seems to write local time ahead of UTC, which would make live sessions \
             look expired; store UTC times (nothing was deleted)",
            (latest - now).num_minutes()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;

    /// A worker whose clock runs a day ahead takes the database server's time as now, and says
    /// so. Fails if the cutoffs follow the worker's clock alone.
    #[tokio::test]
    async fn a_worker_clock_ahead_of_the_server_is_not_taken_as_now() {
        for engine in [Engine::Postgres, Engine::MySql] {
            let tdb = TestDb::new(engine).await;
            let real = chrono::Utc::now().naive_utc();
            let ahead = real + TimeDelta::days(1);
            let (now, note) = reference_now(&tdb.db, ahead, TimeDelta::minutes(1))
                .await
                .expect("reference time");
            assert!(now < real + TimeDelta::minutes(5), "{engine}: {now}");
            assert!(
                note.is_some_and(|n| n.contains("differ")),
                "{engine}: the difference is noted"
            );
            let (now, note) = reference_now(&tdb.db, real, TimeDelta::minutes(1))
                .await
                .expect("reference time");
            assert!(now <= real && note.is_none(), "{engine}: in sync");
            tdb.drop_db().await;
        }
    }
}
