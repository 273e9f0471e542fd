//! Where a long series of short write transactions commits: on SQLite, one connection that
//! checkpoints the WAL between transactions instead of inside their COMMIT.

use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, Sqlite};

use super::connect::{Db, DbTx, MYSQL_BEGIN_WRITE, Pool, SQLITE_BEGIN_WRITE};

/// Commits a series of write batches ([`Db::batch_writer`]).
///
/// SQLite runs an automatic checkpoint inside the COMMIT that leaves the WAL over
/// `wal_autocheckpoint` pages (1,000 by default), which after a batch of deletions is nearly
/// every COMMIT: it copies the batch's pages back into the database file and syncs both files.
/// The write lock is already free by then, but the caller waits — 40–50 ms after a batch that
/// held the lock 25 ms — so every batch looked twice as long as it held anyone up, and batch
/// sizes and rests were cut to match. This connection's commits leave the WAL alone and
/// [`BatchWriter::checkpoint`] copies it back afterwards, in the time the caller rests anyway.
///
/// On MySQL it also bounds how long a batch waits for a row lock the application holds.
/// MySQL has no transaction-local form of that wait (`innodb_lock_wait_timeout`): the writer
/// sets it on the connection it takes for a batch and gives the connection back only with the
/// server's value restored ([`BatchWriter::release_connection`]); otherwise it closes it.
pub enum BatchWriter {
    /// PostgreSQL: each transaction takes any pooled connection.
    Pooled(Db),
    /// MySQL/MariaDB: a pooled connection per batch, with the row-lock wait set from
    /// [`BatchWriter::begin`] until it is released or discarded.
    MySql {
        /// Where connections come from.
        db: Db,
        /// The row-lock wait to set on them.
        row_lock_wait: Duration,
        /// The current batch's connection, if one is held.
        conn: Option<PoolConnection<MySql>>,
    },
    /// SQLite: one connection for the whole series, with automatic checkpoints off (and the
    /// WAL file's size limit, once set). It is closed when dropped, so the settings never
    /// reach the pool.
    Sqlite(PoolConnection<Sqlite>),
}

/// What [`BatchWriter::checkpoint`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checkpoint {
    /// Frames (pages) the WAL held (0 on server engines).
    pub wal_frames: i64,
    /// Frames left uncopied because a reader still needed them.
    pub left: i64,
    /// How long it took.
    pub took: Duration,
}

impl Db {
    /// A [`BatchWriter`] for this database. On SQLite it holds one pooled connection until
    /// dropped; a pool of one connection would leave none for anything else.
    ///
    /// `row_lock_wait`: how long a statement of a batch waits for a row lock before failing,
    /// on MySQL/MariaDB (whole seconds, rounded up). PostgreSQL batches set theirs per
    /// transaction (`SET LOCAL lock_timeout`, in one round trip with their other settings);
    /// SQLite writers queue on the busy timeout instead.
    pub async fn batch_writer(&self, row_lock_wait: Duration) -> Result<BatchWriter, sqlx::Error> {
        Ok(match self.pool() {
            Pool::Sqlite(p) => {
                let mut conn = p.acquire().await?;
                conn.close_on_drop();
                sqlx::query("PRAGMA wal_autocheckpoint = 0")
                    .execute(&mut *conn)
                    .await?;
                BatchWriter::Sqlite(conn)
            }
            Pool::MySql(_) => BatchWriter::MySql {
                db: self.clone(),
                row_lock_wait,
                conn: None,
            },
            Pool::Postgres(_) => BatchWriter::Pooled(self.clone()),
        })
    }
}

impl BatchWriter {
    /// Opens a write transaction, as [`Db::begin_write`] does.
    pub async fn begin(&mut self) -> Result<DbTx<'_>, sqlx::Error> {
        match self {
            BatchWriter::Pooled(db) => db.begin_write().await,
            BatchWriter::MySql {
                db,
                row_lock_wait,
                conn,
            } => {
                let conn = match conn {
                    Some(c) => c,
                    None => {
                        let Pool::MySql(pool) = db.pool() else {
                            unreachable!("a MySQL batch writer is made from a MySQL pool")
                        };
                        conn.insert(pool.acquire().await?)
                    }
                };
                // Set first, in the same round trip: if BEGIN fails, the connection is
                // discarded anyway.
                let begin = format!(
                    "SET SESSION innodb_lock_wait_timeout = {}; {MYSQL_BEGIN_WRITE}",
                    mysql_lock_wait_secs(*row_lock_wait)
                );
                Ok(DbTx::MySql(
                    conn.begin_with(sqlx::AssertSqlSafe(begin)).await?,
                ))
            }
            BatchWriter::Sqlite(conn) => {
                Ok(DbTx::Sqlite(conn.begin_with(SQLITE_BEGIN_WRITE).await?))
            }
        }
    }

    /// After a committed transaction: on MySQL the connection goes back to the pool with the
    /// server's row-lock wait restored, or is closed if that fails. Nothing elsewhere.
    pub async fn release_connection(&mut self) {
        if let BatchWriter::MySql { conn, .. } = self
            && let Some(mut c) = conn.take()
        {
            let restored = sqlx::query("SET SESSION innodb_lock_wait_timeout = DEFAULT")
                .execute(&mut *c)
                .await;
            if restored.is_err() {
                c.close_on_drop();
            }
        }
    }

    /// After a failed transaction: on MySQL the connection is closed, not returned — the
    /// failure may have been the connection itself (the error a retry is for), and its row-lock
    /// wait is still set. The next transaction takes a fresh one. Nothing elsewhere:
    /// PostgreSQL takes a pooled connection per transaction, and SQLite's is in-process.
    pub fn discard_connection(&mut self) {
        if let BatchWriter::MySql { conn, .. } = self
            && let Some(mut c) = conn.take()
        {
            c.close_on_drop();
        }
    }

    /// On SQLite, the length of the WAL file in bytes (0 when there is none); `None` on
    /// server engines.
    pub async fn wal_file_bytes(&mut self) -> Result<Option<u64>, sqlx::Error> {
        let BatchWriter::Sqlite(conn) = self else {
            return Ok(None);
        };
        let file: String =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(&mut **conn)
                .await?;
        // An in-memory or temporary database has no file name, and no WAL file.
        if file.is_empty() {
            return Ok(Some(0));
        }
        Ok(Some(
            std::fs::metadata(format!("{file}-wal")).map_or(0, |m| m.len()),
        ))
    }

    /// On SQLite, makes this connection's next transaction that starts the WAL over cut the
    /// WAL file to `bytes` when it commits (`journal_size_limit`; SQLite otherwise keeps the
    /// file at its longest). The cut happens inside that COMMIT, under the write lock, and
    /// costs about as much as the length cut. Nothing elsewhere.
    pub async fn limit_wal_file(&mut self, bytes: u64) -> Result<(), sqlx::Error> {
        if let BatchWriter::Sqlite(conn) = self {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA journal_size_limit = {bytes}"
            )))
            .execute(&mut **conn)
            .await?;
        }
        Ok(())
    }

    /// On SQLite, copies what the WAL holds back into the database file without waiting for
    /// anyone (`PASSIVE`: readers and writers go on; what a reader still needs is left for
    /// the next time), so the next writer can start the WAL over. Nothing elsewhere.
    pub async fn checkpoint(&mut self) -> Result<Checkpoint, sqlx::Error> {
        let BatchWriter::Sqlite(conn) = self else {
            return Ok(Checkpoint::default());
        };
        let started = Instant::now();
        // Columns: busy (another checkpoint was running), frames in the WAL, frames copied
        // so far; -1 when there is no WAL.
        let (_busy, wal_frames, copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut **conn)
                .await?;
        Ok(Checkpoint {
            wal_frames: wal_frames.max(0),
            left: (wal_frames - copied).max(0),
            took: started.elapsed(),
        })
    }
}

impl Drop for BatchWriter {
    /// A writer dropped in the middle of a batch (a cancelled task) closes the MySQL
    /// connection it holds rather than return it with the row-lock wait set.
    fn drop(&mut self) {
        self.discard_connection();
    }
}

/// `innodb_lock_wait_timeout` in whole seconds, rounded up: the server takes no fractions and
/// 0 would mean "fail at once".
fn mysql_lock_wait_secs(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_waits_round_up_to_whole_seconds_of_at_least_one() {
        assert_eq!(mysql_lock_wait_secs(Duration::from_secs(2)), 2);
        assert_eq!(mysql_lock_wait_secs(Duration::from_millis(2500)), 3);
        assert_eq!(mysql_lock_wait_secs(Duration::from_millis(10)), 1);
        assert_eq!(mysql_lock_wait_secs(Duration::ZERO), 1);
    }
}
