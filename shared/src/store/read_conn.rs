//! A pooled connection for one long streamed read that may be given up half-way.
//!
//! A result set must be read to its end before its connection can run anything else: sqlx
//! reads (and drops) the rest of it when the connection next runs a statement or goes back
//! to the pool, and the server keeps the statement — with its snapshot — open meanwhile.
//! Given up, this connection is closed instead, which ends the statement once the server next
//! writes to it. A statement that writes nothing until its end (a count) is cancelled on the
//! server instead ([`Db::cancel_statement`]).

use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, Postgres, Sqlite};

use super::connect::{Db, DbTx, Engine, Pool};

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
    /// Asks the server to cancel the statement `session` is running, if any; the session
    /// itself stays connected. Allowed for sessions of the same database user.
    pub async fn cancel_statement(&self, session: ServerSession) -> Result<(), sqlx::Error> {
        match (self.pool(), session.engine) {
            (Pool::Postgres(p), Engine::Postgres) => {
                sqlx::query("SELECT pg_cancel_backend(CAST($1 AS INTEGER))")
                    .bind(session.id)
                    .execute(p)
                    .await?;
            }
            (Pool::MySql(p), Engine::MySql) => {
                // An id the server gave, formatted as a number: nothing to escape.
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL QUERY {}", session.id)))
                    .execute(p)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

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

/// A server session to cancel statements of: PostgreSQL's backend pid, MySQL's connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSession {
    engine: Engine,
    id: i64,
}

impl ReadConnection {
    /// The server session behind this connection; `None` on SQLite, which runs in-process.
    pub async fn server_session(&mut self) -> Result<Option<ServerSession>, sqlx::Error> {
        let (engine, id) = match self {
            ReadConnection::Sqlite(_) => return Ok(None),
            ReadConnection::Postgres(c) => (
                Engine::Postgres,
                sqlx::query_scalar::<_, i64>("SELECT CAST(pg_backend_pid() AS BIGINT)")
                    .fetch_one(&mut **c)
                    .await?,
            ),
            ReadConnection::MySql(c) => (
                Engine::MySql,
                sqlx::query_scalar::<_, i64>("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                    .fetch_one(&mut **c)
                    .await?,
            ),
        };
        Ok(Some(ServerSession { engine, id }))
    }

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
