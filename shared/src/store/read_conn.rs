//! A pooled connection for one long streamed read that may be given up half-way.
//!
//! A result set must be read to its end before its connection can run anything else: sqlx
//! reads (and drops) the rest of it when the connection next runs a statement or goes back
//! to the pool, and the server keeps the statement — with its snapshot — open meanwhile.
//! Given up, this connection is closed instead, which ends the statement at once.

use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, Postgres, Sqlite};

use super::connect::{Db, DbTx, Pool};

/// One connection taken from a [`Db`]'s pool ([`Db::read_connection`]).
pub enum ReadConnection {
    /// SQLite.
    Sqlite(PoolConnection<Sqlite>),
    /// PostgreSQL.
    Postgres(PoolConnection<Postgres>),
    /// MySQL/MariaDB.
    MySql(PoolConnection<MySql>),
}

impl Db {
    /// Takes a connection for a read that may be given up before its end
    /// ([`ReadConnection::abandon`]).
    pub async fn read_connection(&self) -> Result<ReadConnection, sqlx::Error> {
        Ok(match self.pool() {
            Pool::Sqlite(p) => ReadConnection::Sqlite(p.acquire().await?),
            Pool::Postgres(p) => ReadConnection::Postgres(p.acquire().await?),
            Pool::MySql(p) => ReadConnection::MySql(p.acquire().await?),
        })
    }
}

impl ReadConnection {
    /// Opens a transaction on this connection, as [`Db::begin_read`] does on any.
    pub async fn begin(&mut self) -> Result<DbTx<'_>, sqlx::Error> {
        Ok(match self {
            ReadConnection::Sqlite(c) => DbTx::Sqlite(c.begin().await?),
            ReadConnection::Postgres(c) => DbTx::Postgres(c.begin().await?),
            ReadConnection::MySql(c) => DbTx::MySql(c.begin().await?),
        })
    }

    /// Closes the connection without reading the rest of a result set it is in the middle
    /// of: the server ends the statement and its transaction when it next writes to the
    /// closed socket. Drop the transaction first; its rollback is then never waited for.
    pub fn abandon(self) {
        match self {
            ReadConnection::Sqlite(mut c) => c.close_on_drop(),
            ReadConnection::Postgres(mut c) => c.close_on_drop(),
            ReadConnection::MySql(mut c) => c.close_on_drop(),
        }
    }
}
