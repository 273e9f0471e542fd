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
//! rules delete. But an open statement keeps its snapshot: PostgreSQL's vacuum can then
//! remove no row deleted or updated after it started (the application's own included), and
//! InnoDB's purge leaves every such row in every index. So a read whose batches stay away
//! longer than [`READ_PAUSE_LIMIT`] — an earlier rule still deleting, on a table whose
//! matches outgrow the buffer — closes its statement, and reopens it after the last id it
//! delivered once the batches want more. A read that breaks (a dropped connection, a server
//! timeout) is reopened the same way. On SQLite it is a series of short keyset reads instead
//! (see `Reader::in_chunks`).

use std::time::Duration;

use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::rules::{Predicate, id_as_i64};
use crate::store::{Db, Engine, ReadConnection, Schema};

/// Ids buffered between the read and the batches: a few batches' worth.
const BUFFERED_IDS: usize = 20_000;
/// How long a read keeps its statement open while the batches take no id. Far above a
/// batch's time, so a rule taking its own ids never pays for a reopen; far below the minutes
/// an earlier rule can delete for on a large table.
pub const READ_PAUSE_LIMIT: Duration = Duration::from_secs(2);
/// Times a broken read is reopened before the error ends the run.
const REOPEN_ATTEMPTS: u32 = 3;

/// How a read buffers and pauses: [`ReadTuning::default`] outside tests.
#[derive(Debug, Clone, Copy)]
pub struct ReadTuning {
    /// Ids held between the read and the batches ([`BUFFERED_IDS`]).
    pub buffered: usize,
    /// See [`READ_PAUSE_LIMIT`].
    pub pause_limit: Duration,
}

impl Default for ReadTuning {
    fn default() -> Self {
        ReadTuning {
            buffered: BUFFERED_IDS,
            pause_limit: READ_PAUSE_LIMIT,
        }
    }
}

/// Ids matching a predicate, in key order, as a read delivers them.
pub struct IdStream {
    reader: Reader,
    ids: mpsc::Receiver<Result<i64, sqlx::Error>>,
    /// The read's task: aborted with the stream, so a read still computing (an anti-join
    /// that finds its first row late) does not go on to read more after the run has ended.
    read: tokio::task::AbortHandle,
    last: Option<i64>,
    reopened: u32,
    /// Why the read last broke, for the report.
    last_break: Option<String>,
}

impl IdStream {
    /// Starts the read on a connection of its own (the pool always has more than one; the
    /// batches use another). Dropping the stream stops the read's task at once; a server
    /// read's connection is then closed, not pooled (see `Reader::in_one_pass`).
    pub fn open(db: &Db, schema: &Schema, pred: &Predicate) -> IdStream {
        IdStream::open_tuned(db, schema, pred, ReadTuning::default())
    }

    /// [`IdStream::open`] with its buffer and pause limit given.
    pub fn open_tuned(db: &Db, schema: &Schema, pred: &Predicate, tuning: ReadTuning) -> IdStream {
        let reader = Reader {
            db: db.clone(),
            schema: schema.clone(),
            pred: pred.clone(),
            tuning,
        };
        let (ids, read) = reader.clone().start(None);
        IdStream {
            ids,
            read,
            reader,
            last: None,
            reopened: 0,
            last_break: None,
        }
    }

    /// How often the read broke and was reopened, and the last error; `None` when it never
    /// broke.
    pub fn breaks(&self) -> Option<(u32, &str)> {
        self.last_break.as_deref().map(|e| (self.reopened, e))
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
                    self.last_break = Some(e.to_string());
                    tracing::warn!(error = %e, after_id = ?self.last, "cleanup read broke; reopening it after the last id it delivered");
                    (self.ids, self.read) = self.reader.clone().start(self.last);
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(batch)
    }
}

impl Drop for IdStream {
    fn drop(&mut self) {
        self.read.abort();
    }
}

/// A read's connection, closed when dropped ([`ReadConnection::abandon`]) unless handed back
/// to the pool with [`ClosedUnlessDone::pool`] once its result was read to the end.
struct ClosedUnlessDone(Option<ReadConnection>);

impl ClosedUnlessDone {
    fn get(&mut self) -> &mut ReadConnection {
        match self.0.as_mut() {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken when it is given back"),
        }
    }

    /// Back to the pool: its statement ended, nothing is left to read.
    fn pool(mut self) {
        drop(self.0.take());
    }
}

impl Drop for ClosedUnlessDone {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            conn.abandon();
        }
    }
}

/// One read of the ids matching a predicate.
#[derive(Clone)]
struct Reader {
    db: Db,
    schema: Schema,
    pred: Predicate,
    tuning: ReadTuning,
}

type Sink = mpsc::Sender<Result<i64, sqlx::Error>>;

/// How one statement of a read ended.
enum Ended {
    /// Every matching id was delivered.
    Done,
    /// The batches stopped taking ids: the run is over.
    Dropped,
    /// The batches took no id for the pause limit; this one was read but not delivered.
    Paused(i64),
}

impl Reader {
    /// Spawns the read of the ids after `after` (all, when `None`).
    fn start(
        self,
        after: Option<i64>,
    ) -> (
        mpsc::Receiver<Result<i64, sqlx::Error>>,
        tokio::task::AbortHandle,
    ) {
        let (tx, rx) = mpsc::channel(self.tuning.buffered);
        let task = tokio::spawn(async move {
            let read = match self.db.engine() {
                Engine::Sqlite => self.in_chunks(after, &tx).await,
                _ => self.in_one_pass(after, &tx).await,
            };
            if let Err(e) = read {
                let _ = tx.send(Err(e)).await;
            }
        });
        (rx, task.abort_handle())
    }

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
    /// core: it runs beside the batches and must not take the cores they need. Closed while
    /// the batches stay away, and reopened after the last id sent (see the module's note).
    ///
    /// Its connection goes back to the pool only once the statement has been read to its
    /// end. Whatever else ends it — a pause, an error, the stream dropped (which aborts this
    /// task wherever it waits) — closes it: pooled, it would first read the rest of the
    /// result (sqlx's ping on release), keeping the statement and its snapshot open.
    async fn in_one_pass(&self, mut after: Option<i64>, sink: &Sink) -> Result<(), sqlx::Error> {
        loop {
            let mut conn = ClosedUnlessDone(Some(self.db.read_connection().await?));
            let waiting = match self.one_statement(conn.get(), after, sink).await {
                Ok(Ended::Done) => {
                    conn.pool();
                    return Ok(());
                }
                Ok(Ended::Paused(id)) => id,
                // The rest of the result is not wanted: closed, not read to its end.
                ended @ (Ok(Ended::Dropped) | Err(_)) => return ended.map(|_| ()),
            };
            drop(conn);
            tracing::debug!(after_id = ?after, "cleanup read closed while its rule waits");
            // Wait, without a statement open, for room for the id already read.
            let Ok(permit) = sink.reserve().await else {
                return Ok(());
            };
            permit.send(Ok(waiting));
            after = Some(waiting);
        }
    }

    /// One statement of [`Reader::in_one_pass`], on `conn`.
    async fn one_statement(
        &self,
        conn: &mut ReadConnection,
        after: Option<i64>,
        sink: &Sink,
    ) -> Result<Ended, sqlx::Error> {
        let sql = self.db.sql(self.sql(after, None));
        let mut tx = conn.begin().await?;
        tx.without_parallel_workers().await?;
        let ended = crate::on_tx!(&mut tx, c => {
            let mut q = sqlx::query_scalar::<_, i64>(sql);
            for b in &self.pred.binds {
                q = q.bind(*b);
            }
            if let Some(after) = after {
                q = q.bind(after);
            }
            let mut rows = q.fetch(&mut *c);
            loop {
                let Some(id) = rows.try_next().await? else {
                    break Ended::Done;
                };
                match tokio::time::timeout(self.tuning.pause_limit, sink.reserve()).await {
                    Ok(Ok(permit)) => permit.send(Ok(id)),
                    Ok(Err(_)) => break Ended::Dropped,
                    Err(_) => break Ended::Paused(id),
                }
            }
        });
        if matches!(ended, Ended::Done) {
            // Nothing was written: ending the transaction either way only releases it.
            tx.rollback().await?;
        }
        Ok(ended)
    }

    /// SQLite: short keyset statements. A statement left open pins a WAL snapshot while the
    /// batches write, so no checkpoint can reset the WAL and it keeps growing; with one open
    /// read, the 1M-session benchmark's longest batch took 2.4 s and its RSS reached 103 MiB,
    /// with short reads 195 ms and 61 MiB. SQLite joins by index probes anyway, so one pass
    /// gains nothing there.
    async fn in_chunks(&self, mut after: Option<i64>, sink: &Sink) -> Result<(), sqlx::Error> {
        let chunk = (self.tuning.buffered / 4).max(1);
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

    /// Seeds a few v2 sessions into `db` and returns the schema detected there.
    async fn small_v2_schema(db: &Db) -> schema::Schema {
        let seed = SeedParams {
            sessions: 10,
            users: 10,
            seed: 1,
            schema: SchemaVersion::V2,
            now: chrono::Utc::now().naive_utc(),
            reset: false,
        };
        seed_demo(db, &seed).await.expect("seed");
        schema::detect(db).await.expect("schema")
    }

    /// The server session running a statement whose text contains `marker`, other than the
    /// asking one: PostgreSQL's backend pid or MySQL's connection id.
    async fn session_running(db: &Db, marker: &str) -> Option<i64> {
        let sql = match db.engine() {
            Engine::Postgres => {
                "SELECT CAST(pid AS BIGINT) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE ?"
            }
            _ => {
                "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() \
                 AND ID <> CONNECTION_ID() AND INFO LIKE ?"
            }
        };
        let pattern = format!("%{marker}%");
        crate::on_pool!(db, p => sqlx::query_scalar::<_, i64>(db.sql(sql))
            .bind(pattern)
            .fetch_optional(p)
            .await
            .expect("sessions"))
    }

    /// Whether the server session `id` is still connected.
    async fn session_alive(db: &Db, id: i64) -> bool {
        let sql = match db.engine() {
            Engine::Postgres => "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = ?",
            _ => "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
        };
        let n: i64 = crate::on_pool!(db, p => sqlx::query_scalar::<_, i64>(db.sql(sql))
            .bind(id)
            .fetch_one(p)
            .await
            .expect("session"));
        n > 0
    }

    /// A table of 20,000 plain ids whose read costs the server a millisecond a row (so a read
    /// left running stays running for ~20 s), streamed along its key; its own connection
    /// pool (`db`), the schema naming it, the statement's marker in the server's activity
    /// view, and the slow predicate.
    struct SlowIds {
        tdb: TestDb,
        db: Db,
        schema: schema::Schema,
        marker: &'static str,
        pred: Predicate,
    }

    async fn slow_ids(engine: Engine) -> SlowIds {
        let tdb = TestDb::new(engine).await;
        tdb.db
            .execute("CREATE TABLE ids_only (id BIGINT PRIMARY KEY)")
            .await
            .expect("table");
        let fill = match engine {
            Engine::Postgres => "INSERT INTO ids_only SELECT g FROM generate_series(1, 20000) g",
            // MariaDB's sequence engine.
            _ => "INSERT INTO ids_only SELECT seq FROM seq_1_to_20000",
        };
        tdb.db.execute(fill).await.expect("rows");
        if engine == Engine::Postgres {
            // Read along the key, as a real read's plan streams: sorting first would run
            // every row's sleep before the first row is out.
            let name: String = crate::on_pool!(&tdb.db, p => sqlx::query_scalar("SELECT current_database()")
                .fetch_one(p)
                .await
                .expect("name"));
            tdb.db
                .execute(&format!("ALTER DATABASE {name} SET enable_sort = off"))
                .await
                .expect("plan setting");
        }
        let db = Db::connect(&tdb.url, &crate::store::ConnectOptions::default())
            .await
            .expect("connect");
        // The read only needs a table and its key: one of plain ids.
        let mut schema = small_v2_schema(&db).await;
        schema.sessions.table = "ids_only".into();
        schema.sessions.id = "id".into();
        let (marker, slow) = match engine {
            Engine::Postgres => ("pg_sleep(0.001)", "pg_sleep(0.001)::text = ''"),
            _ => ("SLEEP(0.001)", "SLEEP(0.001) = 0"),
        };
        let pred = Predicate {
            sql: format!("ids_only.id > 0 AND {slow}"),
            binds: vec![],
        };
        SlowIds {
            tdb,
            db,
            schema,
            marker,
            pred,
        }
    }

    /// While its batches stay away longer than the pause limit, a server read ends its
    /// statement (and so its snapshot: the session is gone), then resumes after the last id
    /// it delivered: every id once, in key order. Each row costs the server a millisecond,
    /// so a read that kept its statement would still be running for ~20 s.
    async fn a_read_left_waiting_closes_its_statement_and_resumes(engine: Engine) {
        let SlowIds {
            tdb,
            db,
            schema,
            marker,
            pred,
        } = slow_ids(engine).await;
        let db = &db;
        let tuning = ReadTuning {
            buffered: 10,
            pause_limit: Duration::from_secs(1),
        };
        let mut stream = IdStream::open_tuned(db, &schema, &pred, tuning);
        let mut got = stream.next_batch(5).await.expect("first ids");
        let reader = session_running(db, marker)
            .await
            .expect("the read's statement is running");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while session_alive(db, reader).await {
            assert!(
                std::time::Instant::now() < deadline,
                "the read kept its statement open while nothing took its ids"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(stream.next_batch(200).await.expect("resumed read"));
        assert_eq!(
            got,
            (1..=205).collect::<Vec<i64>>(),
            "every id once, in key order"
        );
        assert_eq!(stream.reopened, 0, "no error was needed to resume");
        drop(stream);
        db.close().await;
        tdb.drop_db().await;
    }

    #[tokio::test]
    async fn a_postgres_read_left_waiting_closes_its_statement_and_resumes() {
        a_read_left_waiting_closes_its_statement_and_resumes(Engine::Postgres).await;
    }

    #[tokio::test]
    async fn a_mysql_read_left_waiting_closes_its_statement_and_resumes() {
        a_read_left_waiting_closes_its_statement_and_resumes(Engine::MySql).await;
    }

    /// A server read whose stream is dropped while its statement runs (the run ended, a
    /// part was cut short) closes its connection: its session ends. Fails when the aborted
    /// read's connection went back to the pool: sqlx's ping on release first read the rest
    /// of the result (~20 s of rows here), keeping the statement and its snapshot open, and
    /// the session then stayed in the pool.
    async fn a_read_dropped_mid_statement_closes_its_connection(engine: Engine) {
        let SlowIds {
            tdb,
            db,
            schema,
            marker,
            pred,
        } = slow_ids(engine).await;
        let db = &db;
        // No pause: the statement stays open for as long as the stream lives.
        let tuning = ReadTuning {
            buffered: 10,
            pause_limit: Duration::from_secs(3600),
        };
        let mut stream = IdStream::open_tuned(db, &schema, &pred, tuning);
        let got = stream.next_batch(5).await.expect("first ids");
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        let reader = session_running(db, marker)
            .await
            .expect("the read's statement is running");
        drop(stream);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while session_alive(db, reader).await {
            assert!(
                std::time::Instant::now() < deadline,
                "{engine}: the dropped read's connection was kept (pooled, or still reading)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db.close().await;
        tdb.drop_db().await;
    }

    #[tokio::test]
    async fn a_postgres_read_dropped_mid_statement_closes_its_connection() {
        a_read_dropped_mid_statement_closes_its_connection(Engine::Postgres).await;
    }

    #[tokio::test]
    async fn a_mysql_read_dropped_mid_statement_closes_its_connection() {
        a_read_dropped_mid_statement_closes_its_connection(Engine::MySql).await;
    }

    /// A read whose connection is killed mid-way resumes after the last id it delivered:
    /// every id comes out once, in order.
    #[tokio::test]
    async fn a_broken_read_resumes_after_the_last_delivered_id() {
        let tdb = TestDb::new(Engine::Postgres).await;
        let db = &tdb.db;
        let schema = small_v2_schema(db).await;
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
