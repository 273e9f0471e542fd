//! Which statement errors are worth another try: the connection was lost or the server is
//! restarting, or the statement lost a lock race that a second attempt usually wins.
//!
//! A long purge meets these in production — a failover, a proxy or the server ending idle
//! connections, a deadlock with the application — and should not be thrown away for one of
//! them. Everything else (a syntax or permission error, a missing table, a fenced-out token)
//! fails the same way again.

/// True when `e` may well not happen again on a fresh attempt (and a fresh connection).
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            postgres_transient(&code)
                || super::mysql_error_number(e).is_some_and(mysql_transient)
                || (db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && sqlite_transient(&code))
        }
        _ => false,
    }
}

/// True when a delete was refused because a row of another table still references the row
/// (PostgreSQL 23503, MySQL/MariaDB 1451 and 1217). The cleanup leaves referenced sessions out
/// of its rules (`store::references`), so this means a reference committed between the
/// batch's snapshot and the database's own check: the batch, tried again, re-checks the rule
/// and leaves that session alone. SQLite is not listed: the cleanup's connections leave its
/// foreign keys off.
pub fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| pg.code() == "23503")
                || super::mysql_error_number(e).is_some_and(|n| matches!(n, 1451 | 1217))
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs: connection exceptions (class 08), the server shutting down or
/// starting (57P01–57P03), serialization failures and deadlocks (40001, 40P01), a lock not
/// available at once (55P03) and too many connections (53300).
fn postgres_transient(sqlstate: &str) -> bool {
    sqlstate.len() == 5
        && (sqlstate.starts_with("08")
            || matches!(
                sqlstate,
                "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03" | "53300"
            ))
}

/// MySQL/MariaDB error numbers: too many connections (1040), server shutdown (1053), lock
/// wait timeout (1205), deadlock (1213), connection killed (MariaDB 1927). A lost connection
/// (2006, 2013) reaches sqlx as an I/O error.
fn mysql_transient(number: u16) -> bool {
    matches!(number, 1040 | 1053 | 1205 | 1213 | 1927)
}

/// SQLite result codes, primary or extended (the low byte is the primary code): `BUSY` (5)
/// and `LOCKED` (6) — another writer held the lock past the busy timeout.
fn sqlite_transient(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_and_lock_races_are_transient_and_the_rest_is_not() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_transient(&io));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::Protocol("bad message".into())));

        for code in ["08006", "57P01", "40P01", "40001", "55P03", "53300"] {
            assert!(postgres_transient(code), "{code}");
        }
        // Syntax error, undefined table, insufficient privilege, statement timeout.
        for code in ["42601", "42P01", "42501", "57014", "08"] {
            assert!(!postgres_transient(code), "{code}");
        }
        assert!(mysql_transient(1213) && mysql_transient(1927));
        assert!(!mysql_transient(1146) && !mysql_transient(1064));
        // BUSY, BUSY_SNAPSHOT (517), LOCKED; not CONSTRAINT (19) or READONLY (8).
        for code in ["5", "517", "6"] {
            assert!(sqlite_transient(code), "{code}");
        }
        for code in ["19", "8", "x"] {
            assert!(!sqlite_transient(code), "{code}");
        }
    }
}
