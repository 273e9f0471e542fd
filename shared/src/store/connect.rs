//! Connecting to a database by URL, with retries, and describing what was reached.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, ConnectOptions as _, MySql, Postgres, Row, Sqlite, Transaction};

use super::{StoreError, nodelay};
use crate::secret::{redact_text, redact_url};

/// The database engines sessionfleet supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// SQLite, the embedded default.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

impl Engine {
    /// Picks the engine from a URL's scheme.
    pub fn from_url(url: &str) -> Result<Engine, StoreError> {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Ok(Engine::Sqlite),
            "postgres" | "postgresql" => Ok(Engine::Postgres),
            "mysql" | "mariadb" => Ok(Engine::MySql),
            _ if !url.contains(':') => Err(StoreError::UnknownScheme(String::new())),
            _ => Err(StoreError::UnknownScheme(scheme)),
        }
    }

    /// A stable lower-case name, used in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to connect: pool size, timeouts and the retry policy for unreachable servers.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Maximum connections in the pool. Maintenance needs few; default [`Self::DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// How many times to try before giving up on an unreachable server (at least 1).
    pub attempts: u32,
    /// First delay between attempts; doubles each time (with jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Upper bound of the delay between attempts.
    pub max_backoff: Duration,
    /// SQLite's busy timeout: how long a statement waits for another writer's lock.
    pub sqlite_busy_timeout: Duration,
    /// Create a SQLite database file that does not exist yet (seeding a demo, tests). Off by
    /// default: a wrong path, or a volume not mounted yet, is an error rather than a new
    /// empty database that every later step calls "table not found", or that a status
    /// probe leaves behind.
    pub create_sqlite_file: bool,
}

impl ConnectOptions {
    /// Default pool size.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;
    /// Default number of connection attempts.
    pub const DEFAULT_ATTEMPTS: u32 = 5;
    /// Default SQLite busy timeout, the same order as common application settings.
    pub const DEFAULT_SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

    /// The defaults, creating a SQLite database file that does not exist yet (seeding).
    pub fn creating_sqlite_file() -> ConnectOptions {
        ConnectOptions {
            create_sqlite_file: true,
            ..ConnectOptions::default()
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            attempts: Self::DEFAULT_ATTEMPTS,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            sqlite_busy_timeout: Self::DEFAULT_SQLITE_BUSY_TIMEOUT,
            create_sqlite_file: false,
        }
    }
}

/// An engine-specific connection pool.
#[derive(Debug, Clone)]
pub enum Pool {
    /// SQLite pool.
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL pool.
    Postgres(sqlx::PgPool),
    /// MySQL/MariaDB pool.
    MySql(sqlx::MySqlPool),
}

/// An open transaction on one of the engines.
pub enum DbTx<'c> {
    /// SQLite transaction (opened with `BEGIN IMMEDIATE` for writes).
    Sqlite(Transaction<'c, Sqlite>),
    /// PostgreSQL transaction.
    Postgres(Transaction<'c, Postgres>),
    /// MySQL/MariaDB transaction.
    MySql(Transaction<'c, MySql>),
}

impl DbTx<'_> {
    /// Keeps this transaction's PostgreSQL plans on one core (no parallel workers), for
    /// background reads that must leave the rest of a small machine to the foreground work —
    /// a parallel anti-join beside a cleanup's first batches slowed them tenfold on two cores.
    /// Ends with the transaction; a no-op on the other engines.
    pub async fn without_parallel_workers(&mut self) -> Result<(), sqlx::Error> {
        if let DbTx::Postgres(t) = self {
            sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0")
                .execute(&mut **t)
                .await?;
        }
        Ok(())
    }

    /// Commits the transaction.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            DbTx::Sqlite(t) => t.commit().await,
            DbTx::Postgres(t) => t.commit().await,
            DbTx::MySql(t) => t.commit().await,
        }
    }

    /// Rolls the transaction back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            DbTx::Sqlite(t) => t.rollback().await,
            DbTx::Postgres(t) => t.rollback().await,
            DbTx::MySql(t) => t.rollback().await,
        }
    }

    /// Prepares SQL text for this transaction's engine (see [`Db::sql`]).
    pub fn sql(&self, sql: impl Into<Cow<'static, str>>) -> AssertSqlSafe<Cow<'static, str>> {
        dialect_sql(self.engine(), sql)
    }

    /// The engine of this transaction.
    pub fn engine(&self) -> Engine {
        match self {
            DbTx::Sqlite(_) => Engine::Sqlite,
            DbTx::Postgres(_) => Engine::Postgres,
            DbTx::MySql(_) => Engine::MySql,
        }
    }
}

/// What [`Db::describe`] found at the other end.
#[derive(Debug, Clone, Serialize)]
pub struct DbInfo {
    /// Engine family.
    pub engine: Engine,
    /// Server (or library) version string as the engine reports it.
    pub version: String,
    /// The URL, password removed.
    pub url: String,
}

/// How a SQLite write transaction begins: taking the write lock up front (see
/// [`Db::begin_write`]).
pub(super) const SQLITE_BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// How a MySQL/MariaDB write transaction begins: `READ COMMITTED` (see [`Db::begin_write`]).
/// `SET TRANSACTION` applies to the next transaction only, so it cannot outlive this one on
/// a pooled connection.
pub(super) const MYSQL_BEGIN_WRITE: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// How long PostgreSQL lets one of our sessions sit idle inside a transaction before it ends
/// the session and rolls the transaction back. Our transactions are short batches; a session
/// idle in one is a frozen process (SIGSTOP, VM pause) whose row locks would otherwise keep
/// the next lease holder from issuing its fencing token for as long as the freeze lasts.
/// Below the default lease TTL, so the lock is gone by the time the lease can change hands.
pub const STALLED_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// MySQL/MariaDB have no idle-in-transaction timeout; `wait_timeout` on our sessions ends a
/// frozen holder's connection (and rolls back its transaction) after this long idle.
pub const MYSQL_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// sqlx logs statements slower than this at WARN with their SQL text; a maintenance tool runs
/// such statements by design (exact counts, ANALYZE, VACUUM) and reports its own timings, so
/// they go to [`SLOW_STATEMENT_LEVEL`] instead: there with `RUST_LOG=sqlx=debug`, not in
/// every operator's log.
pub const SLOW_STATEMENT_AFTER: Duration = Duration::from_secs(1);
/// See [`SLOW_STATEMENT_AFTER`].
pub const SLOW_STATEMENT_LEVEL: log::LevelFilter = log::LevelFilter::Debug;

/// A connected database: the pool plus what is needed to speak its dialect.
#[derive(Debug, Clone)]
pub struct Db {
    engine: Engine,
    pool: Pool,
    redacted_url: String,
    /// Turns for long queries, shared by every clone (see [`Db::query_turn`]).
    turns: Arc<tokio::sync::Semaphore>,
}

impl Db {
    /// Connects to `url`, retrying with jittered exponential backoff while the server is
    /// unreachable. SQLite files are created on first use and opened in WAL mode with a
    /// busy timeout; foreign keys stay off, as the reference application leaves them.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Db, StoreError> {
        let engine = Engine::from_url(url)?;
        let redacted_url = redact_url(url);
        let bad_url = |e: sqlx::Error| StoreError::BadUrl {
            url: redacted_url.clone(),
            reason: redact_text(&e.to_string(), url),
        };
        let attempts = opts.attempts.max(1);
        let mut delay = opts.initial_backoff;
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let result = match engine {
                Engine::Sqlite => {
                    let o = SqliteConnectOptions::from_str(url)
                        .map_err(bad_url)?
                        .create_if_missing(opts.create_sqlite_file)
                        .journal_mode(SqliteJournalMode::Wal)
                        // In WAL mode NORMAL is corruption-safe and spares an fsync per commit;
                        // a power cut may forget the last batches, which the next run redoes.
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(opts.sqlite_busy_timeout)
                        .foreign_keys(false)
                        .log_slow_statements(SLOW_STATEMENT_LEVEL, SLOW_STATEMENT_AFTER);
                    if let Some(reason) = missing_sqlite_file(url, &o, opts) {
                        return Err(StoreError::BadUrl {
                            url: redacted_url.clone(),
                            reason,
                        });
                    }
                    SqlitePoolOptions::new()
                        .max_connections(opts.max_connections)
                        .acquire_timeout(Duration::from_secs(30))
                        .connect_with(o)
                        .await
                        .map(Pool::Sqlite)
                }
                Engine::Postgres => {
                    let o = PgConnectOptions::from_str(url)
                        .map_err(bad_url)?
                        .application_name("sessionfleet")
                        .options([(
                            "idle_in_transaction_session_timeout",
                            STALLED_TRANSACTION_TIMEOUT.as_millis(),
                        )])
                        .log_slow_statements(SLOW_STATEMENT_LEVEL, SLOW_STATEMENT_AFTER);
                    let server =
                        nodelay::Server::new(o.get_host(), o.get_port(), o.get_socket().is_some());
                    PgPoolOptions::new()
                        .max_connections(opts.max_connections)
                        .acquire_timeout(Duration::from_secs(10))
                        .after_connect(move |_, _| {
                            let server = server.clone();
                            Box::pin(async move {
                                if let Some(server) = server {
                                    server.set_nodelay_on_connections().await;
                                }
                                Ok(())
                            })
                        })
                        .connect_with(o)
                        .await
                        .map(Pool::Postgres)
                }
                Engine::MySql => {
                    let normalized = mysql_url(url);
                    let o = MySqlConnectOptions::from_str(&normalized)
                        .map_err(bad_url)?
                        .log_slow_statements(SLOW_STATEMENT_LEVEL, SLOW_STATEMENT_AFTER);
                    let server =
                        nodelay::Server::new(o.get_host(), o.get_port(), o.get_socket().is_some());
                    MySqlPoolOptions::new()
                        .max_connections(opts.max_connections)
                        .acquire_timeout(Duration::from_secs(10))
                        // Retire idle connections before the server's wait_timeout does.
                        .idle_timeout(MYSQL_IDLE_CONNECTION_TIMEOUT / 2)
                        .after_connect(move |conn, _| {
                            let server = server.clone();
                            Box::pin(async move {
                                if let Some(server) = server {
                                    server.set_nodelay_on_connections().await;
                                }
                                // UTC, so DATETIME comparisons mean the same as on the other engines.
                                sqlx::query("SET time_zone = '+00:00'")
                                    .execute(&mut *conn)
                                    .await?;
                                sqlx::query(sqlx::AssertSqlSafe(format!(
                                    "SET SESSION wait_timeout = {}",
                                    MYSQL_IDLE_CONNECTION_TIMEOUT.as_secs()
                                )))
                                .execute(&mut *conn)
                                .await?;
                                Ok(())
                            })
                        })
                        .connect_with(o)
                        .await
                        .map(Pool::MySql)
                }
            };
            match result {
                Ok(pool) => {
                    return Ok(Db {
                        engine,
                        pool,
                        redacted_url,
                        turns: Arc::new(tokio::sync::Semaphore::new(
                            opts.max_connections.saturating_sub(1).max(1) as usize,
                        )),
                    });
                }
                Err(e) if is_permanent(&e) => return Err(bad_url(e)),
                Err(e) => {
                    last_error = redact_text(&e.to_string(), url);
                    if attempt < attempts {
                        tracing::warn!(url = %redacted_url, attempt, error = %last_error, "database unreachable; retrying");
                        tokio::time::sleep(crate::backoff::jitter(delay)).await;
                        delay = (delay * 2).min(opts.max_backoff);
                    }
                }
            }
        }
        Err(StoreError::Unreachable {
            url: redacted_url,
            attempts,
            reason: last_error,
        })
    }

    /// The engine family.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The engine-specific pool, for [`on_pool!`](crate::on_pool).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The URL this database was opened with, password removed. Safe to log.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// Prepares SQL text for this engine: `?` placeholders become `$n` on PostgreSQL.
    ///
    /// SQL here is written by sessionfleet itself; identifiers interpolated into it come from
    /// a [`SessionProfile`](super::SessionProfile), whose names are validated as plain identifiers.
    pub fn sql(&self, sql: impl Into<Cow<'static, str>>) -> AssertSqlSafe<Cow<'static, str>> {
        dialect_sql(self.engine, sql)
    }

    /// Reports the engine and its version.
    pub async fn describe(&self) -> Result<DbInfo, StoreError> {
        let version: String = match &self.pool {
            Pool::Sqlite(p) => sqlx::query("SELECT sqlite_version()")
                .fetch_one(p)
                .await?
                .try_get(0)?,
            Pool::Postgres(p) => sqlx::query("SHOW server_version")
                .fetch_one(p)
                .await?
                .try_get(0)?,
            Pool::MySql(p) => sqlx::query("SELECT VERSION()")
                .fetch_one(p)
                .await?
                .try_get(0)?,
        };
        Ok(DbInfo {
            engine: self.engine,
            version,
            url: self.redacted_url.clone(),
        })
    }

    /// Waits for a turn to run one long query. Work that starts more queries than the pool
    /// has connections — a health report, or two reports at once in one worker — waits
    /// here, in order, as long as it takes, instead of in the pool's acquire, whose timeout
    /// (10 s on the servers) a long query on a large table outlasts. There is one turn
    /// fewer than connections (at least one), so the quick queries around them (schema
    /// detection, index checks) always find a connection. Shared by every clone of this
    /// `Db`. `None` cannot happen: the semaphore is never closed.
    pub async fn query_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.turns.acquire().await.ok()
    }

    /// Opens a transaction for reading (`BEGIN`, deferred on SQLite), so the read can tune
    /// its own settings with `SET LOCAL` (see [`DbTx::without_parallel_workers`]).
    pub async fn begin_read(&self) -> Result<DbTx<'static>, sqlx::Error> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => DbTx::Sqlite(p.begin().await?),
            Pool::Postgres(p) => DbTx::Postgres(p.begin().await?),
            Pool::MySql(p) => DbTx::MySql(p.begin().await?),
        })
    }

    /// Opens a transaction meant to write. On SQLite it is `BEGIN IMMEDIATE`, which takes the
    /// write lock up front so two writers queue on the busy timeout instead of deadlocking on
    /// a lock upgrade. On MySQL/MariaDB it is `READ COMMITTED`: under InnoDB's default
    /// `REPEATABLE READ` a `DELETE` over a key range keeps every row it reads locked until
    /// commit, the live sessions it skips and the gaps between them too, so the application's
    /// updates of those sessions would wait for the whole batch. Statements that change rows
    /// read the latest committed version at either level; only our locks differ.
    pub async fn begin_write(&self) -> Result<DbTx<'static>, sqlx::Error> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => DbTx::Sqlite(p.begin_with(SQLITE_BEGIN_WRITE).await?),
            Pool::Postgres(p) => DbTx::Postgres(p.begin().await?),
            Pool::MySql(p) => DbTx::MySql(p.begin_with(MYSQL_BEGIN_WRITE).await?),
        })
    }

    /// Runs one statement without results (DDL, maintenance) outside any transaction.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        crate::on_pool!(self, p => Ok(sqlx::query(self.sql(sql.to_string())).execute(p).await?.rows_affected()))
    }

    /// Runs a query returning one integer (a count, a size), binding no parameters.
    pub async fn scalar_i64(&self, sql: &str) -> Result<i64, sqlx::Error> {
        crate::on_pool!(self, p => sqlx::query_scalar::<_, i64>(self.sql(sql.to_string())).fetch_one(p).await)
    }

    /// Whether PostgreSQL's autovacuum is on for the server; `None` on the other engines or
    /// when the setting cannot be read. Cast to 64 bits: a 32-bit answer would not decode.
    pub async fn postgres_autovacuum(&self) -> Option<bool> {
        if self.engine != Engine::Postgres {
            return None;
        }
        self.scalar_i64(
            "SELECT CAST(CASE WHEN current_setting('autovacuum') = 'on' THEN 1 ELSE 0 END AS BIGINT)",
        )
        .await
        .ok()
        .map(|on| on == 1)
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        crate::on_pool!(self, p => p.close().await)
    }
}

/// Prepares SQL text for `engine` (see [`Db::sql`]).
pub fn dialect_sql(
    engine: Engine,
    sql: impl Into<Cow<'static, str>>,
) -> AssertSqlSafe<Cow<'static, str>> {
    let sql = sql.into();
    if engine != Engine::Postgres || !sql.contains('?') {
        return AssertSqlSafe(sql);
    }
    AssertSqlSafe(Cow::Owned(super::placeholders(&sql, true).into_owned()))
}

/// sqlx speaks the MySQL protocol for MariaDB too; accept `mariadb:` as an alias.
/// Checks that `url` is a database URL its engine's driver reads (a port in range, options it
/// knows), without connecting: configuration refuses a malformed URL at load, with exit code
/// 2, instead of every job failing on it later.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    let bad_url = |e: sqlx::Error| StoreError::BadUrl {
        url: redact_url(url),
        reason: redact_text(&e.to_string(), url),
    };
    match Engine::from_url(url)? {
        Engine::Sqlite => SqliteConnectOptions::from_str(url).map(drop),
        Engine::Postgres => PgConnectOptions::from_str(url).map(drop),
        Engine::MySql => MySqlConnectOptions::from_str(&mysql_url(url)).map(drop),
    }
    .map_err(bad_url)
}

fn mysql_url(url: &str) -> String {
    match url.strip_prefix("mariadb:") {
        Some(rest) => format!("mysql:{rest}"),
        None => url.to_string(),
    }
}

/// Why connecting to the SQLite file `o` names must stop at once: it does not exist and
/// `opts` does not ask for it to be created (an in-memory database always exists).
fn missing_sqlite_file(
    url: &str,
    o: &SqliteConnectOptions,
    opts: &ConnectOptions,
) -> Option<String> {
    let path = o.get_filename();
    if opts.create_sqlite_file
        || url.contains(":memory:")
        || url.contains("mode=memory")
        || path.exists()
    {
        return None;
    }
    Some(format!(
        "SQLite database file {} does not exist; sessionfleet does not create application databases (check the path, or run 'sessionfleet seed-demo' to create a demo database)",
        path.display()
    ))
}

/// Errors that retrying cannot fix: bad credentials, unknown database, bad configuration.
fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => {
            // PostgreSQL: 28xxx auth, 3D000 unknown database. MySQL: 1044/1045 access, 1049 unknown db.
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            code.starts_with("28")
                || code == "3D000"
                || matches!(super::mysql_error_number(e), Some(1044 | 1045 | 1049))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_follows_the_scheme() {
        assert_eq!(Engine::from_url("sqlite://x.db").unwrap(), Engine::Sqlite);
        assert_eq!(
            Engine::from_url("postgresql://h/db").unwrap(),
            Engine::Postgres
        );
        assert_eq!(Engine::from_url("mariadb://h/db").unwrap(), Engine::MySql);
        assert!(
            matches!(Engine::from_url("oracle://h/db"), Err(StoreError::UnknownScheme(s)) if s == "oracle")
        );
    }
}
