//! The engine timeouts every maintenance statement runs under, and the two ways statements
//! are run: a read transaction for catalog queries, and a fenced [`SessionLock`] connection
//! for statements that cannot run inside a transaction.

use std::time::{Duration, Instant};

use crate::fence::{Fence, FenceError, SessionLock};
use crate::store::{Db, DbTx, Engine, ScopedConnection};

use super::OpError;

/// How long any maintenance statement may wait for a lock the application holds (PostgreSQL
/// `lock_timeout`, MySQL `lock_wait_timeout` and `innodb_lock_wait_timeout`). Short, because
/// while DDL waits for a lock, the application's queries queue behind it. (PostgreSQL's
/// concurrent index builds are the exception: their waits hold up no query, see `indexes`.)
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// PostgreSQL `statement_timeout` of catalog and count queries (analyze, statistics, orphans).
pub const READ_STATEMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// PostgreSQL `statement_timeout` of long maintenance statements: online index builds,
/// `VACUUM`, amcheck. Generous: these do not block the application, they only take time.
pub const MAINTENANCE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// SQLite busy timeout of maintenance connections: how long a statement waits for the
/// application's write lock before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Session-level statements that put a connection under the maintenance timeouts.
fn session_timeouts(engine: Engine, statement_timeout: Duration) -> Vec<String> {
    let lock_ms = LOCK_TIMEOUT.as_millis();
    let lock_s = LOCK_TIMEOUT.as_secs().max(1);
    match engine {
        Engine::Sqlite => vec![format!(
            "PRAGMA busy_timeout = {}",
            SQLITE_BUSY_TIMEOUT.as_millis()
        )],
        Engine::Postgres => vec![
            format!("SET lock_timeout = {lock_ms}"),
            format!("SET statement_timeout = {}", statement_timeout.as_millis()),
        ],
        Engine::MySql => vec![
            format!("SET SESSION lock_wait_timeout = {lock_s}"),
            format!("SET SESSION innodb_lock_wait_timeout = {lock_s}"),
        ],
    }
}

/// Statements that give a pooled connection its defaults back.
fn reset_timeouts(engine: Engine) -> Vec<&'static str> {
    match engine {
        // The pool's own busy timeout is the same order; nothing to undo.
        Engine::Sqlite => vec![],
        Engine::Postgres => vec!["RESET lock_timeout", "RESET statement_timeout"],
        Engine::MySql => vec![
            "SET SESSION lock_wait_timeout = DEFAULT",
            "SET SESSION innodb_lock_wait_timeout = DEFAULT",
        ],
    }
}

/// Opens a read transaction under the maintenance timeouts, on `conn`. PostgreSQL uses
/// `SET LOCAL`, so the settings end with the transaction. MySQL has no transaction-local form:
/// its session values stay on the connection, which [`ScopedConnection`] closes when dropped
/// rather than returning it to the pool — on every path, errors included.
pub(super) async fn read_tx(conn: &mut ScopedConnection) -> Result<DbTx<'_>, sqlx::Error> {
    let mut tx = conn.begin_read().await?;
    let engine = tx.engine();
    let statements: Vec<String> = match engine {
        Engine::Postgres => session_timeouts(Engine::Postgres, READ_STATEMENT_TIMEOUT)
            .into_iter()
            .map(|s| s.replacen("SET ", "SET LOCAL ", 1))
            .collect(),
        other => session_timeouts(other, READ_STATEMENT_TIMEOUT),
    };
    for s in statements {
        let sql = tx.sql(s);
        crate::on_tx!(&mut tx, c => { sqlx::query(sql).execute(&mut *c).await?; });
    }
    Ok(tx)
}

/// A [`SessionLock`] connection under the maintenance timeouts: the engine's session lock is
/// held, and the fence is checked on this connection before every statement.
pub(super) struct FencedConn {
    lock: SessionLock,
    engine: Engine,
}

impl FencedConn {
    /// Pins a connection, takes the session lock and applies the timeouts.
    pub(super) async fn open(
        db: &Db,
        fence: &Fence,
        statement_timeout: Duration,
    ) -> Result<FencedConn, OpError> {
        let lock = SessionLock::acquire(db, fence).await?;
        let mut conn = FencedConn {
            lock,
            engine: db.engine(),
        };
        for s in session_timeouts(db.engine(), statement_timeout) {
            if let Err(e) = conn.lock.execute_checked(&s).await {
                conn.close().await;
                return Err(e.into());
            }
        }
        Ok(conn)
    }

    /// The engine of the pinned connection.
    pub(super) fn engine(&self) -> Engine {
        self.engine
    }

    /// Checks the fence, runs `sql` and returns how long it took.
    pub(super) async fn run(&mut self, sql: &str) -> Result<Duration, FenceError> {
        let started = Instant::now();
        self.lock.execute_checked(sql).await?;
        Ok(started.elapsed())
    }

    /// Checks the fence, runs `sql` and returns its rows as text, with the time it took.
    pub(super) async fn rows(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<Vec<Option<String>>>, Duration), FenceError> {
        let started = Instant::now();
        let rows = self.lock.fetch_text_checked(sql).await?;
        Ok((rows, started.elapsed()))
    }

    /// Resets the timeouts (when the fence still holds) and releases the session lock. Never
    /// fails. When a reset fails, the connection is closed instead of going back to the pool
    /// with maintenance timeouts (the server drops the lock with it).
    pub(super) async fn close(mut self) {
        for s in reset_timeouts(self.engine) {
            if self.lock.execute_checked(s).await.is_err() {
                return; // dropping an unreleased SessionLock closes its connection
            }
        }
        if let Err(e) = self.lock.release().await {
            tracing::warn!(error = %e, "releasing the maintenance session lock failed");
        }
    }
}

/// True when a fence error means "stop": fenced out or the lease is busy. Plain SQL errors
/// of one statement are reported and the step goes on.
pub(super) fn is_fatal(e: &FenceError) -> bool {
    matches!(e, FenceError::FencedOut { .. } | FenceError::Busy(_))
}

/// Milliseconds of a duration, for reports.
pub(super) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
