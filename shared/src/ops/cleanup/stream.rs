//! The ids of a rule no index can find (orphaned sessions, v1 sessions without activity),
//! read by one query and handed out a batch at a time.
//!
//! Finding orphans means joining every session against `users`. Done once, the engine uses a
//! hash anti-join (PostgreSQL: about 0.5 s for 1M sessions); done per batch, each batch pays
//! an index probe per row scanned or a hash build, several seconds over a large table. So one
//! plain read streams the matching ids in key order into a small bounded channel, and batches
//! take from it: memory stays flat (backpressure reaches the server through the socket), and
//! the read takes no lock — each DELETE re-checks the rule as before.
//!
//! The read may be opened before its rule's turn, so the engine computes it while earlier
//! rules delete. On SQLite it is a series of short keyset reads instead (see
//! `Reader::in_chunks`). A read that breaks (a dropped connection, MySQL's `net_write_timeout` on a
//! consumer that paused too long) is reopened after the last id it delivered.

use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::rules::{Predicate, id_as_i64};
use crate::store::{Db, Engine, Schema};

/// Ids buffered between the read and the batches: a few batches' worth.
const BUFFERED_IDS: usize = 20_000;
/// Times a broken read is reopened before the error ends the run.
const REOPEN_ATTEMPTS: u32 = 3;

/// Ids matching a predicate, in key order, as a read delivers them.
pub struct IdStream {
    db: Db,
    schema: Schema,
    pred: Predicate,
    ids: mpsc::Receiver<Result<i64, sqlx::Error>>,
    last: Option<i64>,
    reopened: u32,
}

impl IdStream {
    /// Starts the read on a connection of its own (the pool always has more than one; the
    /// batches use another). Dropping the stream stops the read.
    pub fn open(db: &Db, schema: &Schema, pred: &Predicate) -> IdStream {
        IdStream {
            ids: start_read(db, schema, pred, None),
            db: db.clone(),
            schema: schema.clone(),
            pred: pred.clone(),
            last: None,
            reopened: 0,
        }
    }

    /// The next up to `limit` ids; fewer only at the end of the read.
    pub async fn next_batch(&mut self, limit: u32) -> Result<Vec<i64>, sqlx::Error> {
        let mut batch = Vec::with_capacity(limit as usize);
        while batch.len() < limit as usize {
            match self.ids.recv().await {
                Some(Ok(id)) => {
                    self.last = Some(id);
                    batch.push(id);
                }
                Some(Err(e)) if self.reopened < REOPEN_ATTEMPTS => {
                    self.reopened += 1;
                    tracing::warn!(error = %e, after_id = ?self.last, "cleanup read broke; reopening it after the last id it delivered");
                    self.ids = start_read(&self.db, &self.schema, &self.pred, self.last);
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(batch)
    }
}

/// Spawns the read of the ids matching `pred` (after `after`, when given).
fn start_read(
    db: &Db,
    schema: &Schema,
    pred: &Predicate,
    after: Option<i64>,
) -> mpsc::Receiver<Result<i64, sqlx::Error>> {
    let (tx, rx) = mpsc::channel(BUFFERED_IDS);
    let reader = Reader {
        db: db.clone(),
        schema: schema.clone(),
        pred: pred.clone(),
    };
    tokio::spawn(async move {
        let read = match reader.db.engine() {
            Engine::Sqlite => reader.in_chunks(after, &tx).await,
            _ => reader.in_one_pass(after, &tx).await,
        };
        if let Err(e) = read {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

/// One read of the ids matching a predicate.
struct Reader {
    db: Db,
    schema: Schema,
    pred: Predicate,
}

type Sink = mpsc::Sender<Result<i64, sqlx::Error>>;

impl Reader {
    fn sql(&self, after: Option<i64>, limit: Option<usize>) -> String {
        let t = &self.schema.sessions.table;
        let id = format!("{t}.{}", self.schema.sessions.id);
        let after_sql = if after.is_some() {
            format!(" AND {id} > ?")
        } else {
            String::new()
        };
        let limit_sql = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        format!(
            "SELECT {} FROM {t} WHERE ({}){after_sql} ORDER BY {id}{limit_sql}",
            id_as_i64(self.db.engine(), &id),
            self.pred.sql
        )
    }

    /// Server engines: one statement, streamed (their hash anti-join needs one pass), on one
    /// core: it runs beside the batches and must not take the cores they need.
    async fn in_one_pass(&self, after: Option<i64>, sink: &Sink) -> Result<(), sqlx::Error> {
        let sql = self.db.sql(self.sql(after, None));
        let mut tx = self.db.begin_read().await?;
        tx.without_parallel_workers().await?;
        crate::on_tx!(&mut tx, c => {
            let mut q = sqlx::query_scalar::<_, i64>(sql);
            for b in &self.pred.binds {
                q = q.bind(*b);
            }
            if let Some(after) = after {
                q = q.bind(after);
            }
            let mut rows = q.fetch(&mut *c);
            while let Some(id) = rows.try_next().await? {
                if sink.send(Ok(id)).await.is_err() {
                    break; // The run stopped taking batches.
                }
            }
        });
        // Nothing was written: ending the transaction either way only releases the snapshot.
        tx.rollback().await
    }

    /// SQLite: short keyset statements. A statement left open pins a WAL snapshot while the
    /// batches write, so no checkpoint can reset the WAL and it keeps growing; with one open
    /// read, the 1M-session benchmark's longest batch took 2.4 s and its RSS reached 103 MiB,
    /// with short reads 195 ms and 61 MiB. SQLite joins by index probes anyway, so one pass
    /// gains nothing there.
    async fn in_chunks(&self, mut after: Option<i64>, sink: &Sink) -> Result<(), sqlx::Error> {
        let chunk = BUFFERED_IDS / 4;
        loop {
            let ids: Vec<i64> = crate::on_pool!(self.db, p => {
                let sql = self.db.sql(self.sql(after, Some(chunk)));
                let mut q = sqlx::query_scalar::<_, i64>(sql);
                for b in &self.pred.binds {
                    q = q.bind(*b);
                }
                if let Some(after) = after {
                    q = q.bind(after);
                }
                q.fetch_all(p).await?
            });
            let done = ids.len() < chunk;
            after = ids.last().copied().or(after);
            for id in ids {
                if sink.send(Ok(id)).await.is_err() {
                    return Ok(());
                }
            }
            if done {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{SeedParams, seed_demo};
    use crate::store::SchemaVersion;
    use crate::store::schema;
    use crate::testing::TestDb;

    /// A read whose connection is killed mid-way resumes after the last id it delivered:
    /// every id comes out once, in order.
    #[tokio::test]
    async fn a_broken_read_resumes_after_the_last_delivered_id() {
        let tdb = TestDb::new(Engine::Postgres).await;
        let db = &tdb.db;
        let seed = SeedParams {
            sessions: 10,
            users: 10,
            seed: 1,
            schema: SchemaVersion::V2,
            now: chrono::Utc::now().naive_utc(),
            reset: false,
        };
        seed_demo(db, &seed).await.expect("seed");
        // Enough rows that the server is still sending when the read is broken.
        db.execute(
            "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
             SELECT 'bulk-' || g, (SELECT MIN(id) FROM users), now(), now(), now(), now(), TRUE FROM generate_series(1, 300000) g",
        )
        .await
        .expect("bulk rows");
        let expected: Vec<i64> = crate::on_pool!(db, p => {
            sqlx::query_scalar("SELECT CAST(id AS BIGINT) FROM user_sessions ORDER BY id")
                .fetch_all(p)
                .await
                .expect("ids")
        });
        let schema = schema::detect(db).await.expect("schema");
        let all = Predicate {
            sql: "user_sessions.id > 0".into(),
            binds: vec![],
        };
        let mut stream = IdStream::open(db, &schema, &all);
        let mut got = stream.next_batch(1000).await.expect("first batch");
        // Kill every other backend of this database: the read's connection among them.
        let killed: Vec<bool> = crate::on_pool!(db, p => {
            sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(p)
            .await
            .expect("terminate")
        });
        assert!(killed.iter().any(|k| *k), "the read's backend was killed");
        loop {
            let batch = stream.next_batch(5000).await.expect("resumed read");
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
        }
        assert_eq!(stream.reopened, 1, "the read was reopened once");
        assert_eq!(got.len(), expected.len(), "every id once");
        assert!(got == expected, "in key order, no gap, no repeat");
        tdb.drop_db().await;
    }
}
