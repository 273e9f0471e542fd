//! Where a long series of short write transactions commits: on SQLite, one connection that
//! checkpoints the WAL between transactions instead of inside their COMMIT.

use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, Sqlite};

use super::connect::{Db, DbTx, Pool, SQLITE_BEGIN_WRITE};

/// Commits a series of write batches ([`Db::batch_writer`]).
///
/// SQLite runs an automatic checkpoint inside the COMMIT that leaves the WAL over
/// `wal_autocheckpoint` pages (1,000 by default), which after a batch of deletions is nearly
/// every COMMIT: it copies the batch's pages back into the database file and syncs both files.
/// The write lock is already free by then, but the caller waits — 40–50 ms after a batch that
/// held the lock 25 ms — so every batch looked twice as long as it held anyone up, and batch
/// sizes and rests were cut to match. This connection's commits leave the WAL alone and
/// [`BatchWriter::checkpoint`] copies it back afterwards, in the time the caller rests anyway.
pub enum BatchWriter {
    /// PostgreSQL, MySQL/MariaDB: each transaction takes any pooled connection.
    Pooled(Db),
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
    pub async fn batch_writer(&self) -> Result<BatchWriter, sqlx::Error> {
        Ok(match self.pool() {
            Pool::Sqlite(p) => {
                let mut conn = p.acquire().await?;
                conn.close_on_drop();
                sqlx::query("PRAGMA wal_autocheckpoint = 0")
                    .execute(&mut *conn)
                    .await?;
                BatchWriter::Sqlite(conn)
            }
            Pool::Postgres(_) | Pool::MySql(_) => BatchWriter::Pooled(self.clone()),
        })
    }
}

impl BatchWriter {
    /// Opens a write transaction, as [`Db::begin_write`] does.
    pub async fn begin(&mut self) -> Result<DbTx<'_>, sqlx::Error> {
        match self {
            BatchWriter::Pooled(db) => db.begin_write().await,
            BatchWriter::Sqlite(conn) => {
                Ok(DbTx::Sqlite(conn.begin_with(SQLITE_BEGIN_WRITE).await?))
            }
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
