//! A connection for transactions that change a per-connection setting the engine cannot
//! scope to a transaction.
//!
//! PostgreSQL's `SET LOCAL` ends with its transaction. MySQL/MariaDB have no such form for
//! the lock waits (`innodb_lock_wait_timeout`, `lock_wait_timeout`): a `SET SESSION` stays on
//! the connection, and a pooled connection would hand it to its next user — a lock wait of
//! 5 s meant for a fencing token bounding every later batch on that connection. SQLite's
//! pragmas (`analysis_limit`) belong to the connection too. Resetting them afterwards misses
//! every early return and error path, so on MySQL and SQLite the connection is instead closed
//! when dropped, never returned to the pool. That costs one new connection (a few
//! milliseconds; SQLite's is in-process) per use: used for rare transactions (a fencing token,
//! a maintenance read, the statistics refresh after a purge).

use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, Sqlite};

use super::connect::{Db, DbTx, MYSQL_BEGIN_WRITE, Pool, SQLITE_BEGIN_WRITE};

/// A connection whose session settings never reach the pool ([`Db::scoped_connection`]).
pub enum ScopedConnection {
    /// PostgreSQL: the pool itself. Settings there are per transaction (`SET LOCAL`).
    Pooled(Db),
    /// MySQL/MariaDB: a connection of its own, closed when dropped.
    MySql(PoolConnection<MySql>),
    /// SQLite: a connection of its own, closed when dropped.
    Sqlite(PoolConnection<Sqlite>),
}

impl Db {
    /// A [`ScopedConnection`]: on MySQL/MariaDB and SQLite one pooled connection, closed when
    /// dropped.
    pub async fn scoped_connection(&self) -> Result<ScopedConnection, sqlx::Error> {
        Ok(match self.pool() {
            Pool::MySql(p) => ScopedConnection::MySql(closing_connection(p).await?),
            Pool::Sqlite(p) => ScopedConnection::Sqlite(closing_connection(p).await?),
            Pool::Postgres(_) => ScopedConnection::Pooled(self.clone()),
        })
    }
}

impl ScopedConnection {
    /// Opens a write transaction, as [`Db::begin_write`] does.
    pub async fn begin_write(&mut self) -> Result<DbTx<'_>, sqlx::Error> {
        match self {
            ScopedConnection::Pooled(db) => db.begin_write().await,
            ScopedConnection::MySql(c) => Ok(DbTx::MySql(c.begin_with(MYSQL_BEGIN_WRITE).await?)),
            ScopedConnection::Sqlite(c) => {
                Ok(DbTx::Sqlite(c.begin_with(SQLITE_BEGIN_WRITE).await?))
            }
        }
    }

    /// Opens a read transaction, as [`Db::begin_read`] does.
    pub async fn begin_read(&mut self) -> Result<DbTx<'_>, sqlx::Error> {
        match self {
            ScopedConnection::Pooled(db) => db.begin_read().await,
            ScopedConnection::MySql(c) => Ok(DbTx::MySql(c.begin().await?)),
            ScopedConnection::Sqlite(c) => Ok(DbTx::Sqlite(c.begin().await?)),
        }
    }
}

/// A pooled connection that is closed when dropped instead of going back to the pool.
async fn closing_connection<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<PoolConnection<DB>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    Ok(conn)
}
