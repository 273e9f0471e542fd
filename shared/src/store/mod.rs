//! Database access for the three engines sessionfleet maintains.
//!
//! One entry point, [`Db::connect`], turns a URL into a pool for SQLite, PostgreSQL or
//! MySQL/MariaDB and reports what it reached ([`Db::describe`]). Operations write their SQL
//! side by side per engine and run it through [`on_pool!`](crate::on_pool) /
//! [`on_tx!`](crate::on_tx), so no operation needs its own connection code.
//!
//! Architecture invariant: this module knows about connections, dialects and the session
//! schema, never about queues or leases.

mod connect;
mod estimate;
pub mod nodelay;
mod read_conn;
pub mod references;
pub mod schema;
mod scoped;
mod sql;
mod transient;
mod writer;

pub use connect::{ConnectOptions, Db, DbInfo, DbTx, Engine, Pool, check_url, dialect_sql};
pub use read_conn::{CANCELLABLE, CancellableConnection, ReadConnection, ServerSession};
pub use schema::{Schema, SchemaVersion, SessionProfile};
pub use scoped::ScopedConnection;
pub use sql::{mysql_row_errors, placeholders, sqlite_datetime};
pub use transient::{is_foreign_key_violation, is_transient};
pub use writer::{BatchWriter, Checkpoint};

/// Errors raised while reaching or inspecting a database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL's scheme is not one of the supported engines.
    #[error(
        "unsupported database URL scheme '{0}' (expected sqlite:, postgres:, postgresql:, mysql: or mariadb:)"
    )]
    UnknownScheme(String),
    /// The URL could not be parsed at all.
    #[error("invalid database URL {url}: {reason}")]
    BadUrl {
        /// The URL with its password removed.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The database could not be reached after the configured retries.
    #[error("cannot connect to {url} after {attempts} attempts: {reason}")]
    Unreachable {
        /// The URL with its password removed.
        url: String,
        /// How many times a connection was tried.
        attempts: u32,
        /// The last error, with any password removed.
        reason: String,
    },
    /// The tables or columns a feature needs are not there.
    #[error("{0}")]
    Schema(#[from] schema::SchemaError),
    /// A statement failed.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The server's own error number of a MySQL/MariaDB error (e.g. 1061), which `code()` does
/// not give (it returns the SQLSTATE).
pub fn mysql_error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|m| m.number()),
        _ => None,
    }
}

/// Runs `$body` with `$p` bound to the engine-specific pool of a [`Db`].
///
/// Each arm is type-checked separately, so the body may use any sqlx API that all three
/// drivers implement (binding `i64`, `String`, `bool`, `chrono::NaiveDateTime`, decoding rows).
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db.pool() {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
            $crate::store::Pool::MySql($p) => $body,
        }
    };
}

/// Runs `$body` with `$c` bound to the engine-specific connection of an open [`DbTx`].
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        match $tx {
            $crate::store::DbTx::Sqlite(t) => {
                let $c = &mut **t;
                $body
            }
            $crate::store::DbTx::Postgres(t) => {
                let $c = &mut **t;
                $body
            }
            $crate::store::DbTx::MySql(t) => {
                let $c = &mut **t;
                $body
            }
        }
    };
}
