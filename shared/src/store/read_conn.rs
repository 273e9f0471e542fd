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
    /// Asks the server to cancel the statement `session` is running, if it is one of ours
    /// (its text carries [`CANCELLABLE`]); the session itself stays connected. Allowed for
    /// sessions of the same database user. The marker matters behind a pooler or proxy
    /// (pgbouncer in transaction mode, ProxySQL, MaxScale), where the session id read on one
    /// statement may name another client's session by the time of the cancel.
    pub async fn cancel_statement(&self, session: ServerSession) -> Result<(), sqlx::Error> {
        let marked = format!("%{CANCELLABLE}%");
        match (self.pool(), session.engine) {
            (Pool::Postgres(p), Engine::Postgres) => {
                sqlx::query(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                     WHERE pid = CAST($1 AS INTEGER) AND query LIKE $2",
                )
                .bind(session.id)
                .bind(&marked)
                .execute(p)
                .await?;
            }
            (Pool::MySql(p), Engine::MySql) => {
                let ours: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
                     WHERE ID = ? AND INFO LIKE ?",
                )
                .bind(session.id)
                .bind(&marked)
                .fetch_optional(p)
                .await?;
                if let Some(id) = ours {
                    // An id the server gave, formatted as a number: nothing to escape.
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL QUERY {id}")))
                        .execute(p)
                        .await?;
                }
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

/// The comment every statement [`Db::cancel_statement`] may cancel starts with: it cancels
/// nothing else.
pub const CANCELLABLE: &str = "/* sessionfleet:cancellable */";

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

/// A [`ReadConnection`] whose statement is cancelled on the server if the future running it
/// is dropped part-way ([`Db::cancellable_connection`]).
///
/// A count that a run stops waiting for (a cancellation, a part cut short) is dropped here,
/// but the server would go on with it — for minutes on a large table, holding a snapshot
/// that keeps vacuum (PostgreSQL) or purge (InnoDB) from the rows the batches delete — and
/// the connection would come back to the pool still busy with it. Dropped mid-statement,
/// this connection is closed instead of pooled, so the cancel sent after it can only reach
/// its own statement.
pub struct CancellableConnection {
    db: Db,
    conn: Option<ReadConnection>,
    session: Option<ServerSession>,
    running: bool,
}

impl Db {
    /// A connection of this pool for statements to cancel on the server when their future
    /// is dropped. Costs one round trip for the server session's id (none on SQLite).
    pub async fn cancellable_connection(&self) -> Result<CancellableConnection, sqlx::Error> {
        let mut conn = self.read_connection().await?;
        let session = conn.server_session().await?;
        Ok(CancellableConnection {
            db: self.clone(),
            conn: Some(conn),
            session,
            running: false,
        })
    }
}

impl CancellableConnection {
    /// Runs `work` on the connection; dropped before `work` ends, the statement it runs is
    /// cancelled on the server.
    pub async fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut ReadConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("the connection is only taken when dropped")
        };
        self.running = true;
        let result = work(conn).await;
        self.running = false;
        result
    }
}

impl Drop for CancellableConnection {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        if let Some(conn) = self.conn.take() {
            conn.abandon();
        }
        let (Some(session), Ok(runtime)) = (self.session, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let db = self.db.clone();
        runtime.spawn(async move {
            if let Err(e) = db.cancel_statement(session).await {
                tracing::debug!(error = %e, "cancelling an abandoned statement failed");
            }
        });
    }
}
