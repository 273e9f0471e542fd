//! Whose "now" a cleanup measures expiry against. The rules compare stored UTC times with a
//! cutoff taken from a clock; a clock running ahead would make live sessions look expired.
//! The reference time is the earlier of this worker's clock and the database server's, so a
//! worker whose clock runs ahead cannot purge sessions early.

use chrono::{NaiveDateTime, TimeDelta};

use crate::ops::OpError;
use crate::store::{Db, Engine};

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
