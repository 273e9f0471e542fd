//! The fence: the database-side half of "only one maintenance process touches a database at a
//! time".
//!
//! Each target database holds a table the tool owns, `sessionfleet_fence`, with one row per
//! lease name: the highest fencing token granted, its holder and when. Tokens are issued *by
//! the database* ([`issue_token`]: read-modify-write of that row under its row lock), so they
//! never go backwards, even when Redis loses its data.
//!
//! Every mutating transaction starts with [`Fence::begin`], which locks the row, compares the
//! stored token with its own and aborts with [`FenceError::FencedOut`] if a newer holder
//! exists. The row lock is held until commit, so a newer holder's token cannot be issued while
//! an older holder's batch is in flight: a write with a stale token is impossible by
//! construction, not by timing. (A transaction whose one long statement should not hold the
//! row — the cleanup's `ANALYZE` — calls [`Fence::advance`] last instead, just before commit:
//! the same guarantee.) `sessionfleet_fence_log` keeps, per granted token, the first and last
//! accepted write — the audit trail that shows holders never overlapped.
//!
//! Statements that cannot run in a transaction (`VACUUM`, `CREATE INDEX CONCURRENTLY`,
//! `OPTIMIZE TABLE`) go through [`SessionLock`], which pins one connection, takes the engine's
//! session lock on it (PostgreSQL advisory lock, MySQL `GET_LOCK`) and checks the fence on that
//! same connection just before each statement.

use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::pool::PoolConnection;

use crate::store::{Db, DbTx, Engine, Pool, dialect_sql};

/// Name of the fence table in every target database.
pub const FENCE_TABLE: &str = "sessionfleet_fence";
/// Name of the per-token audit table.
pub const FENCE_LOG_TABLE: &str = "sessionfleet_fence_log";
/// How long issuing a token or taking a session lock may wait for a busy holder.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long the server lets a [`SessionLock`]'s session sit idle between statements before
/// ending it, and the lock with it: MySQL's limit on all our connections
/// (`store::MYSQL_IDLE_CONNECTION_TIMEOUT`), on PostgreSQL too.
pub const SESSION_LOCK_IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// A holder with a newer token exists: this process lost its lease and must stop.
    #[error(
        "fenced out: lease '{name}' has moved to token {seen} (held by {holder}); this holder's token {mine} is stale"
    )]
    FencedOut {
        /// Lease name.
        name: String,
        /// Our token.
        mine: i64,
        /// The highest token the database has seen.
        seen: i64,
        /// Who holds the newer token.
        holder: String,
    },
    /// Another process holds the engine's session lock for non-transactional maintenance.
    #[error("lease '{0}' is busy: another process holds the database session lock")]
    Busy(String),
    /// The fence statements themselves failed.
    #[error("fence: {0}")]
    Sql(#[from] sqlx::Error),
}

/// One row of the fence table, as [`inspect`] reports it.
#[derive(Debug, Clone, Serialize)]
pub struct FenceRow {
    /// Lease name.
    pub name: String,
    /// Highest token granted.
    pub token: i64,
    /// Holder of that token.
    pub holder: Option<String>,
    /// When it was last advanced (UTC).
    pub updated_at: Option<NaiveDateTime>,
}

/// A granted fencing token, carried by everything one lease holder writes.
#[derive(Debug, Clone, Serialize)]
pub struct Fence {
    /// Lease name, normally `target:<name>`.
    pub name: String,
    /// The token; higher tokens win.
    pub token: i64,
    /// Who holds it (worker name and job id), for inspection.
    pub holder: String,
}

/// Creates the fence tables if they do not exist.
pub async fn ensure_tables(db: &Db) -> Result<(), sqlx::Error> {
    let (dt, log_pk) = match db.engine() {
        Engine::Sqlite => ("TEXT", "INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT"),
        Engine::Postgres => ("TIMESTAMP(6) WITHOUT TIME ZONE", "BIGSERIAL PRIMARY KEY"),
        Engine::MySql => ("DATETIME(6)", "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY"),
    };
    db.execute(&format!(
        "CREATE TABLE IF NOT EXISTS {FENCE_TABLE} (\
         name VARCHAR(191) NOT NULL PRIMARY KEY, token BIGINT NOT NULL, \
         holder VARCHAR(255) NULL, updated_at {dt} NULL)"
    ))
    .await?;
    db.execute(&format!(
        "CREATE TABLE IF NOT EXISTS {FENCE_LOG_TABLE} (\
         id {log_pk}, name VARCHAR(191) NOT NULL, token BIGINT NOT NULL, \
         holder VARCHAR(255) NULL, first_write_at {dt} NOT NULL, last_write_at {dt} NOT NULL, \
         writes BIGINT NOT NULL, UNIQUE (name, token))"
    ))
    .await?;
    Ok(())
}

/// Issues the next fencing token for `name` from the database itself and records `holder` as
/// its owner. Any holder of an older token is fenced out from its next write on.
///
/// Waits at most [`LOCK_WAIT`] for a holder that is inside a fenced transaction or holds the
/// session lock, then fails with [`FenceError::Busy`]; so does a request the server ends as a
/// deadlock's victim.
pub async fn issue_token(db: &Db, name: &str, holder: &str) -> Result<Fence, FenceError> {
    issue_token_after(db, name, holder, 0).await
}

/// Like [`issue_token`], but the new token is also higher than `floor`: the highest token
/// known elsewhere (the lease's Redis counter). This keeps tokens increasing when the
/// database side went backwards — restored from a backup, fence table dropped — while Redis
/// still remembers later grants, so a holder of such a later token is still fenced out.
pub async fn issue_token_after(
    db: &Db,
    name: &str,
    holder: &str,
    floor: i64,
) -> Result<Fence, FenceError> {
    ensure_tables(db).await?;
    let busy = |e: sqlx::Error| {
        if is_lock_contention(&e) {
            FenceError::Busy(name.to_string())
        } else {
            FenceError::Sql(e)
        }
    };
    // On MySQL the lock wait below is a session setting: the connection it is set on is closed
    // afterwards, not returned to the pool, where it would bound every later batch instead.
    let mut conn = db.scoped_connection().await.map_err(busy)?;
    let mut tx = conn.begin_write().await.map_err(busy)?;
    set_lock_timeout(&mut tx).await.map_err(busy)?;
    if !try_session_lock_xact(&mut tx, name).await.map_err(busy)? {
        tx.rollback().await?;
        return Err(FenceError::Busy(name.to_string()));
    }
    // An older holder inside a batch keeps the row locked until it commits, or until the
    // server ends its stalled session (store::STALLED_TRANSACTION_TIMEOUT).
    let (current, _) = lock_row(&mut tx, name).await.map_err(busy)?;
    let token = current.max(floor) + 1;
    write_row(&mut tx, name, token, holder)
        .await
        .map_err(busy)?;
    prune_log(&mut tx, name, token).await.map_err(busy)?;
    tx.commit().await.map_err(busy)?;
    // MySQL's named lock belongs to the session, not the transaction: let it go now that the
    // token is stored (closing the connection would release it too, a moment later).
    if let crate::store::ScopedConnection::MySql(c) = &mut conn {
        let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(mysql_lock_name(name))
            .execute(&mut **c)
            .await;
    }
    Ok(Fence {
        name: name.to_string(),
        token,
        holder: holder.to_string(),
    })
}

/// True when a statement lost to another session over a lock: it gave up waiting
/// (PostgreSQL `lock_not_available`, MySQL/MariaDB 1205, SQLite `SQLITE_BUSY`) or was chosen
/// as a deadlock's victim (PostgreSQL `40P01`, MySQL/MariaDB 1213). Either way the server
/// rolled the statement back and a later request succeeds: the job is deferred, not failed.
fn is_lock_contention(e: &sqlx::Error) -> bool {
    if matches!(crate::store::mysql_error_number(e), Some(1205 | 1213)) {
        return true;
    }
    match e {
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("55P03" | "40P01" | "5" | "517"))
        }
        _ => false,
    }
}

/// Reads the fence row of `name`, if any token was ever issued.
pub async fn inspect(db: &Db, name: &str) -> Result<Option<FenceRow>, sqlx::Error> {
    ensure_tables(db).await?;
    let sql = format!("SELECT token, holder, updated_at FROM {FENCE_TABLE} WHERE name = ?");
    let row = crate::on_pool!(db, p => sqlx::query(db.sql(sql)).bind(name).fetch_optional(p).await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get::<i64, _>(0)?, r.try_get::<Option<String>, _>(1)?, r.try_get::<Option<NaiveDateTime>, _>(2)?)))
        .transpose()?);
    Ok(row.map(|(token, holder, updated_at)| FenceRow {
        name: name.to_string(),
        token,
        holder,
        updated_at,
    }))
}

/// One line of the audit log: the first and last accepted write of one token.
#[derive(Debug, Clone, Serialize)]
pub struct FenceLogEntry {
    /// Token.
    pub token: i64,
    /// Holder.
    pub holder: Option<String>,
    /// First accepted fenced transaction.
    pub first_write_at: NaiveDateTime,
    /// Last accepted fenced transaction.
    pub last_write_at: NaiveDateTime,
    /// Number of accepted fenced transactions.
    pub writes: i64,
}

/// The audit log of `name`, oldest token first.
pub async fn write_log(db: &Db, name: &str) -> Result<Vec<FenceLogEntry>, sqlx::Error> {
    ensure_tables(db).await?;
    let sql = format!(
        "SELECT token, holder, first_write_at, last_write_at, writes FROM {FENCE_LOG_TABLE} \
         WHERE name = ? ORDER BY token"
    );
    crate::on_pool!(db, p => sqlx::query(db.sql(sql)).bind(name).fetch_all(p).await?
        .into_iter()
        .map(|r| Ok(FenceLogEntry {
            token: r.try_get(0)?,
            holder: r.try_get(1)?,
            first_write_at: r.try_get(2)?,
            last_write_at: r.try_get(3)?,
            writes: r.try_get(4)?,
        }))
        .collect())
}

impl Fence {
    /// Opens a write transaction whose first act is to check and advance this fence. The
    /// caller does its batch in the returned transaction and commits it; if a newer token
    /// exists, nothing is written and [`FenceError::FencedOut`] is returned.
    pub async fn begin(&self, db: &Db) -> Result<DbTx<'static>, FenceError> {
        let mut tx = db.begin_write().await?;
        if let Err(e) = self.advance(&mut tx).await {
            let _ = tx.rollback().await;
            return Err(e);
        }
        Ok(tx)
    }

    /// Checks and advances the fence inside an already open write transaction.
    pub async fn advance(&self, tx: &mut DbTx<'_>) -> Result<(), FenceError> {
        let (seen, holder) = lock_row(tx, &self.name).await?;
        if seen > self.token {
            return Err(FenceError::FencedOut {
                name: self.name.clone(),
                mine: self.token,
                seen,
                holder: holder.unwrap_or_else(|| "unknown".into()),
            });
        }
        write_row(tx, &self.name, self.token, &self.holder).await?;
        log_write(tx, self).await?;
        Ok(())
    }

    /// Checks the fence in a transaction of its own and commits nothing else: for the
    /// moment just before a statement that cannot run inside a transaction.
    pub async fn check(&self, db: &Db) -> Result<(), FenceError> {
        self.begin(db).await?.commit().await?;
        Ok(())
    }
}

/// Stable 63-bit key for advisory locks, derived from the lease name (FNV-1a).
pub fn advisory_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"sessionfleet:".iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h >> 1) as i64
}

/// MySQL lock names are limited to 64 characters.
/// The MySQL/MariaDB named lock (`GET_LOCK`) guarding the fence row `name`: held by a
/// [`SessionLock`] for its whole life and by [`issue_token`] until its new token is committed.
/// `SELECT IS_USED_LOCK(…)` on it names the holding connection.
pub fn mysql_lock_name(name: &str) -> String {
    format!("sessionfleet:{:016x}", advisory_key(name))
}

async fn set_lock_timeout(tx: &mut DbTx<'_>) -> Result<(), sqlx::Error> {
    let ms = LOCK_WAIT.as_millis();
    match tx {
        DbTx::Postgres(t) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = {ms}"
            )))
            .execute(&mut **t)
            .await?;
        }
        // Session-wide on MySQL: only on a `ScopedConnection`.
        DbTx::MySql(t) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET SESSION innodb_lock_wait_timeout = {}",
                LOCK_WAIT.as_secs().max(1)
            )))
            .execute(&mut **t)
            .await?;
        }
        // SQLite: BEGIN IMMEDIATE already waited on the busy timeout.
        DbTx::Sqlite(_) => {}
    }
    Ok(())
}

/// Takes the session lock that [`SessionLock`] holders keep, until the transaction ends
/// (PostgreSQL's transaction-level advisory lock) or the caller releases it after the commit
/// (MySQL's named lock belongs to the connection): a token is never issued while someone
/// runs non-transactional maintenance, nor a SessionLock taken while a token is issued.
async fn try_session_lock_xact(tx: &mut DbTx<'_>, name: &str) -> Result<bool, sqlx::Error> {
    let key = advisory_key(name);
    Ok(match tx {
        DbTx::Postgres(t) => {
            // Wait (bounded by lock_timeout) rather than fail at once: holders are short.
            match sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut **t)
                .await
            {
                Ok(_) => true,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => false,
                Err(e) => return Err(e),
            }
        }
        DbTx::MySql(t) => {
            let name = mysql_lock_name(name);
            let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                .bind(&name)
                .bind(LOCK_WAIT.as_secs() as i64)
                .fetch_one(&mut **t)
                .await?;
            // Kept until the new token is committed (released by the caller, or by the
            // connection's close): released here, a SessionLock could be taken and its
            // check pass on the old token between this and the commit, and its statement
            // then run beside the new holder's batches.
            got == Some(1)
        }
        DbTx::Sqlite(_) => true,
    })
}

/// Makes sure the fence row exists, locks it for the rest of the transaction and returns the
/// stored token and holder.
async fn lock_row(tx: &mut DbTx<'_>, name: &str) -> Result<(i64, Option<String>), sqlx::Error> {
    let insert = match tx.engine() {
        Engine::Sqlite => {
            format!("INSERT OR IGNORE INTO {FENCE_TABLE} (name, token) VALUES (?, 0)")
        }
        Engine::Postgres => format!(
            "INSERT INTO {FENCE_TABLE} (name, token) VALUES (?, 0) ON CONFLICT (name) DO NOTHING"
        ),
        // Not INSERT IGNORE: on an existing row it takes a *shared* lock, and two holders
        // upgrading it with FOR UPDATE below deadlock (InnoDB error 1213). A no-op
        // ON DUPLICATE KEY UPDATE takes the exclusive lock at once, so holders queue.
        Engine::MySql => format!(
            "INSERT INTO {FENCE_TABLE} (name, token) VALUES (?, 0) ON DUPLICATE KEY UPDATE token = token"
        ),
    };
    // SQLite needs no FOR UPDATE: BEGIN IMMEDIATE holds the database write lock.
    let select = match tx.engine() {
        Engine::Sqlite => format!("SELECT token, holder FROM {FENCE_TABLE} WHERE name = ?"),
        _ => format!("SELECT token, holder FROM {FENCE_TABLE} WHERE name = ? FOR UPDATE"),
    };
    let insert = tx.sql(insert);
    let select = tx.sql(select);
    crate::on_tx!(tx, c => {
        sqlx::query(insert).bind(name).execute(&mut *c).await?;
        let row = sqlx::query(select).bind(name).fetch_one(&mut *c).await?;
        Ok((row.try_get::<i64, _>(0)?, row.try_get::<Option<String>, _>(1)?))
    })
}

async fn write_row(
    tx: &mut DbTx<'_>,
    name: &str,
    token: i64,
    holder: &str,
) -> Result<(), sqlx::Error> {
    let sql = tx.sql(format!(
        "UPDATE {FENCE_TABLE} SET token = ?, holder = ?, updated_at = ? WHERE name = ?"
    ));
    let now = Utc::now().naive_utc();
    crate::on_tx!(tx, c => { sqlx::query(sql).bind(token).bind(holder).bind(now).bind(name).execute(&mut *c).await?; });
    Ok(())
}

/// How many of a name's latest tokens the audit log keeps. It gains a row per mutating part,
/// in the application's own database; the latest thousand tell who wrote what lately, and
/// older rows would only grow the table.
pub const FENCE_LOG_KEPT_TOKENS: i64 = 1000;

/// The most audit rows one token issuance deletes.
const PRUNE_ROWS: u32 = 1000;

/// Drops the audit rows of `name` older than the last [`FENCE_LOG_KEPT_TOKENS`] tokens, in
/// the transaction issuing `token` (along the (name, token) key; usually one row, at most
/// [`PRUNE_ROWS`]).
async fn prune_log(tx: &mut DbTx<'_>, name: &str, token: i64) -> Result<(), sqlx::Error> {
    // At most PRUNE_ROWS a time, so the first issuance after an upgrade does not hold the
    // fence row through a long delete; later issuances take the rest.
    let sql = tx.sql(match tx.engine() {
        Engine::MySql => format!(
            "DELETE FROM {FENCE_LOG_TABLE} WHERE name = ? AND token <= ? LIMIT {PRUNE_ROWS}"
        ),
        Engine::Postgres | Engine::Sqlite => format!(
            "DELETE FROM {FENCE_LOG_TABLE} WHERE id IN (SELECT id FROM {FENCE_LOG_TABLE} \
             WHERE name = ? AND token <= ? LIMIT {PRUNE_ROWS})"
        ),
    });
    let oldest_dropped = token - FENCE_LOG_KEPT_TOKENS;
    crate::on_tx!(tx, c => { sqlx::query(sql).bind(name).bind(oldest_dropped).execute(&mut *c).await?; });
    Ok(())
}

async fn log_write(tx: &mut DbTx<'_>, fence: &Fence) -> Result<(), sqlx::Error> {
    let now = Utc::now().naive_utc();
    let sql = match tx.engine() {
        Engine::Sqlite | Engine::Postgres => format!(
            "INSERT INTO {FENCE_LOG_TABLE} AS l (name, token, holder, first_write_at, last_write_at, writes) \
             VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (name, token) DO UPDATE \
             SET last_write_at = excluded.last_write_at, writes = l.writes + 1"
        ),
        Engine::MySql => format!(
            "INSERT INTO {FENCE_LOG_TABLE} (name, token, holder, first_write_at, last_write_at, writes) \
             VALUES (?, ?, ?, ?, ?, 1) ON DUPLICATE KEY UPDATE \
             last_write_at = VALUES(last_write_at), writes = writes + 1"
        ),
    };
    let sql = tx.sql(sql);
    crate::on_tx!(tx, c => {
        sqlx::query(sql)
            .bind(&fence.name).bind(fence.token).bind(&fence.holder).bind(now).bind(now)
            .execute(&mut *c).await?;
    });
    Ok(())
}

/// One pinned connection holding the engine's session lock for a lease, for statements that
/// cannot run inside a transaction. [`SessionLock::release`] unlocks; either way the
/// connection is closed when the lock is dropped, never pooled, so the server ends the
/// session and any lock with it: a pooled connection never carries a forgotten session lock
/// (or this lock's session settings) to its next user, even if the lock request's reply was
/// still in flight when its task was cancelled. A holder that freezes (SIGSTOP, a paused
/// VM) between statements leaves the session idle, where the server ends it after
/// [`SESSION_LOCK_IDLE_LIMIT`] (PostgreSQL 14+ `idle_session_timeout`; MySQL's
/// `wait_timeout` on every connection of ours): its lock does not stall the target's writers
/// for as long as the process stays frozen.
pub struct SessionLock {
    conn: LockedConn,
    fence: Fence,
    released: bool,
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        // Server connections close on drop from the start (see `acquire`); SQLite's, which
        // holds no session lock, goes back to the pool unless dropped part-way.
        if let LockedConn::Sqlite(c) = &mut self.conn
            && !self.released
        {
            c.close_on_drop();
        }
    }
}

enum LockedConn {
    Sqlite(PoolConnection<sqlx::Sqlite>),
    Postgres(PoolConnection<sqlx::Postgres>),
    MySql(PoolConnection<sqlx::MySql>),
}

impl SessionLock {
    /// Pins a connection and takes the session lock for `fence.name`, waiting at most
    /// [`LOCK_WAIT`]. SQLite has no session lock; there each statement's own write lock and the
    /// fence check before it are the guard.
    pub async fn acquire(db: &Db, fence: &Fence) -> Result<SessionLock, FenceError> {
        let key = advisory_key(&fence.name);
        let conn = match db.pool() {
            Pool::Sqlite(p) => LockedConn::Sqlite(p.acquire().await?),
            Pool::Postgres(p) => {
                let mut c = p.acquire().await?;
                c.close_on_drop();
                let limit = format!(
                    "SET idle_session_timeout = {}",
                    SESSION_LOCK_IDLE_LIMIT.as_millis()
                );
                match sqlx::query(sqlx::AssertSqlSafe(limit))
                    .execute(&mut *c)
                    .await
                {
                    Ok(_) => {}
                    // Before PostgreSQL 14: no such setting; the session then lasts until
                    // the server's TCP keepalive finds its host gone.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => {}
                    Err(e) => return Err(e.into()),
                }
                let deadline = tokio::time::Instant::now() + LOCK_WAIT;
                loop {
                    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(key)
                        .fetch_one(&mut *c)
                        .await?;
                    if got {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(FenceError::Busy(fence.name.clone()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                LockedConn::Postgres(c)
            }
            Pool::MySql(p) => {
                let mut c = p.acquire().await?;
                c.close_on_drop();
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                    .bind(mysql_lock_name(&fence.name))
                    .bind(LOCK_WAIT.as_secs() as i64)
                    .fetch_one(&mut *c)
                    .await?;
                if got != Some(1) {
                    return Err(FenceError::Busy(fence.name.clone()));
                }
                LockedConn::MySql(c)
            }
        };
        Ok(SessionLock {
            conn,
            fence: fence.clone(),
            released: false,
        })
    }

    /// Checks the fence on the pinned connection, then runs `sql` there outside any
    /// transaction. Returns rows affected.
    pub async fn execute_checked(&mut self, sql: &str) -> Result<u64, FenceError> {
        self.check().await?;
        let engine = self.engine();
        let stmt = dialect_sql(engine, sql.to_string());
        Ok(match &mut self.conn {
            LockedConn::Sqlite(c) => sqlx::query(stmt).execute(&mut **c).await?.rows_affected(),
            LockedConn::Postgres(c) => sqlx::query(stmt).execute(&mut **c).await?.rows_affected(),
            LockedConn::MySql(c) => sqlx::query(stmt).execute(&mut **c).await?.rows_affected(),
        })
    }

    /// Like [`execute_checked`](Self::execute_checked), but returns every row with each column
    /// as text (`None` for NULL or non-text values): MySQL's `ANALYZE`, `OPTIMIZE` and
    /// `CHECK TABLE` report failures as result rows, not as errors, so callers must read them.
    pub async fn fetch_text_checked(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, FenceError> {
        self.check().await?;
        let stmt = dialect_sql(self.engine(), sql.to_string());
        macro_rules! text_rows {
            ($c:expr) => {
                sqlx::query(stmt)
                    .fetch_all(&mut **$c)
                    .await?
                    .iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get::<Option<String>, _>(i).ok().flatten())
                            .collect()
                    })
                    .collect()
            };
        }
        Ok(match &mut self.conn {
            LockedConn::Sqlite(c) => text_rows!(c),
            LockedConn::Postgres(c) => text_rows!(c),
            LockedConn::MySql(c) => text_rows!(c),
        })
    }

    /// Checks (and advances) the fence in a short transaction on the pinned connection.
    pub async fn check(&mut self) -> Result<(), FenceError> {
        let mut tx = match &mut self.conn {
            LockedConn::Sqlite(c) => DbTx::Sqlite(sqlx::Connection::begin(&mut **c).await?),
            LockedConn::Postgres(c) => DbTx::Postgres(sqlx::Connection::begin(&mut **c).await?),
            LockedConn::MySql(c) => DbTx::MySql(sqlx::Connection::begin(&mut **c).await?),
        };
        let result = self.fence.advance(&mut tx).await;
        match result {
            Ok(()) => tx.commit().await?,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Releases the session lock and returns the connection to the pool.
    pub async fn release(mut self) -> Result<(), sqlx::Error> {
        let key = advisory_key(&self.fence.name);
        match &mut self.conn {
            LockedConn::Sqlite(_) => {}
            LockedConn::Postgres(c) => {
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut **c)
                    .await?;
            }
            LockedConn::MySql(c) => {
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(mysql_lock_name(&self.fence.name))
                    .execute(&mut **c)
                    .await?;
            }
        }
        self.released = true;
        Ok(())
    }

    /// A server setting as this lock's session sees it (PostgreSQL `current_setting`, MySQL
    /// `@@session.`), for diagnostics and checks; `None` on SQLite.
    pub async fn setting(&mut self, name: &str) -> Result<Option<String>, sqlx::Error> {
        Ok(match &mut self.conn {
            LockedConn::Sqlite(_) => None,
            LockedConn::Postgres(c) => Some(
                sqlx::query_scalar("SELECT current_setting($1)")
                    .bind(name)
                    .fetch_one(&mut **c)
                    .await?,
            ),
            LockedConn::MySql(c) => {
                if !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                {
                    return Err(sqlx::Error::Protocol(format!("not a setting name: {name}")));
                }
                let sql = format!("SELECT CAST(@@session.{name} AS CHAR)");
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&mut **c)
                    .await?
            }
        })
    }

    fn engine(&self) -> Engine {
        match self.conn {
            LockedConn::Sqlite(_) => Engine::Sqlite,
            LockedConn::Postgres(_) => Engine::Postgres,
            LockedConn::MySql(_) => Engine::MySql,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;

    async fn lock_row_of(tx: &mut DbTx<'_>, id: i64) -> Result<(), sqlx::Error> {
        let select = tx.sql("SELECT id FROM t WHERE id = ? FOR UPDATE");
        crate::on_tx!(tx, c => {
            sqlx::query(select).bind(id).fetch_one(&mut *c).await?;
            Ok(())
        })
    }

    /// Two transactions that lock two rows in opposite orders deadlock; the server ends one
    /// of them. That loser is contention (a token request that meets it is deferred as
    /// `Busy`), not an SQL failure that would cost its job an attempt. Fails if the
    /// deadlock codes (`40P01`, 1213) are not classified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deadlock_victim_counts_as_lock_contention() {
        for engine in [Engine::Postgres, Engine::MySql] {
            let tdb = TestDb::new(engine).await;
            let db = &tdb.db;
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
                .await
                .expect("table");
            db.execute("INSERT INTO t (id) VALUES (1), (2)")
                .await
                .expect("rows");
            let mut first = db.begin_write().await.expect("first transaction");
            let mut second = db.begin_write().await.expect("second transaction");
            lock_row_of(&mut first, 1).await.expect("row 1");
            lock_row_of(&mut second, 2).await.expect("row 2");
            // The first now waits for row 2; the second's request for row 1 closes the cycle.
            let waiter = tokio::spawn(async move {
                let outcome = lock_row_of(&mut first, 2).await;
                let _ = first.rollback().await;
                outcome
            });
            let closer = lock_row_of(&mut second, 1).await;
            let _ = second.rollback().await;
            let waited = waiter.await.expect("waiter task");
            let errors: Vec<sqlx::Error> = [closer, waited]
                .into_iter()
                .filter_map(Result::err)
                .collect();
            assert_eq!(errors.len(), 1, "{engine}: one victim: {errors:?}");
            assert!(is_lock_contention(&errors[0]), "{engine}: {:?}", errors[0]);
            tdb.drop_db().await;
        }
    }
}
