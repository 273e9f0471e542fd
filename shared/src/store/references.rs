//! Foreign keys that forbid deleting a session row while another row points at it.
//!
//! An application may keep rows that reference its sessions (an audit log, an order placed in
//! a session) with `ON DELETE RESTRICT` or `NO ACTION`. PostgreSQL and MySQL/MariaDB refuse a
//! DELETE that would leave such a row dangling, and the whole batch rolls back — the same batch
//! on every run, so the cleanup never gets past it. SQLite enforces them only on connections
//! that turn foreign keys on, which ours do not (a key naming a missing table would then fail
//! every delete), but the schema still says such a session must stay. The cleanup reads these
//! keys from the catalog and leaves the referenced sessions in place (`ops::cleanup::rules`),
//! counting them for the report. `CASCADE`, `SET NULL` and `SET DEFAULT` keys do not block a
//! delete and are left to the database.

use serde::Serialize;
use sqlx::Row;

use super::{Db, Engine, StoreError};

/// One foreign key from another table (or the session table itself) to the session table,
/// whose delete rule forbids deleting a referenced session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reference {
    /// The constraint's name, for people.
    pub constraint: String,
    /// The referencing table as written in SQL: quoted, and on PostgreSQL schema-qualified.
    pub table: String,
    /// Column pairs in key order: (referencing column, session-table column), both quoted.
    pub columns: Vec<(String, String)>,
    /// The key runs from the session table to itself (a parent session, say).
    pub from_sessions_table: bool,
}

impl Reference {
    /// `EXISTS (…)`: a row of the referencing table points at the session row of `sessions`
    /// (the session table's name as the rules qualify its columns).
    pub fn exists_for(&self, sessions: &str) -> String {
        let on = self
            .columns
            .iter()
            .map(|(from, to)| format!("r.{from} = {sessions}.{to}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        format!("EXISTS (SELECT 1 FROM {} r WHERE {on})", self.table)
    }

    /// `table(columns)`, for notes and logs.
    pub fn describe(&self) -> String {
        let cols = self
            .columns
            .iter()
            .map(|(from, _)| from.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        format!("{}({cols}) [{}]", self.table, self.constraint)
    }
}

/// What [`restricting`] found: the keys the cleanup can honour, and notes on those it cannot.
#[derive(Debug, Default)]
pub struct Restricting {
    /// Keys the rules probe.
    pub references: Vec<Reference>,
    /// One line per key left out, and why: a session it still references stops the batch
    /// that meets it.
    pub notes: Vec<String>,
}

/// The foreign keys referencing `sessions_table` whose delete rule is `RESTRICT` or `NO
/// ACTION`, one entry per constraint, in a stable order. A key the rules cannot probe is
/// left out with a note: one whose table this connection may not read (PostgreSQL checks a
/// key as the table's owner, so a cleanup role needs no privilege there to delete, but a
/// probe does), and on MySQL (not MariaDB, which allows it since 10.3.1) a key from the
/// session table to itself, since MySQL refuses a DELETE whose condition reads its own table.
pub async fn restricting(db: &Db, sessions_table: &str) -> Result<Restricting, StoreError> {
    // Each row: constraint, referencing table (quoted on PostgreSQL), referencing column,
    // referenced column (both unquoted), 1 when the key is the session table's own, in key
    // order within a constraint.
    let sql = match db.engine() {
        // `to` is NULL when the key names the parent's primary key implicitly.
        Engine::Sqlite => {
            "SELECT m.name || '#' || f.id, m.name, f.\"from\", f.\"to\", \
                    CAST(m.name = f.\"table\" COLLATE NOCASE AS INTEGER) \
             FROM sqlite_master m, pragma_foreign_key_list(m.name) f \
             WHERE m.type = 'table' AND f.\"table\" = ? COLLATE NOCASE \
               AND f.on_delete IN ('RESTRICT', 'NO ACTION') \
             ORDER BY m.name, f.id, f.seq"
        }
        // Constraints cloned onto partitions (conparentid set) are covered by their parent's.
        Engine::Postgres => {
            "SELECT c.conname::text, format('%I.%I', n.nspname, cl.relname), \
                    a.attname::text, af.attname::text, CAST((c.conrelid = c.confrelid)::int AS BIGINT) \
             FROM pg_constraint c \
             JOIN pg_class cl ON cl.oid = c.conrelid \
             JOIN pg_namespace n ON n.oid = cl.relnamespace \
             CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(attnum, fattnum, ord) \
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum \
             JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = k.fattnum \
             WHERE c.contype = 'f' AND c.confdeltype IN ('a', 'r') AND c.conparentid = 0 \
               AND c.confrelid = to_regclass(?) \
             ORDER BY 2, 1, k.ord"
        }
        Engine::MySql => {
            "SELECT CAST(k.CONSTRAINT_NAME AS CHAR), CAST(k.TABLE_NAME AS CHAR), \
                    CAST(k.COLUMN_NAME AS CHAR), CAST(k.REFERENCED_COLUMN_NAME AS CHAR), \
                    CAST(k.TABLE_NAME = r.REFERENCED_TABLE_NAME AS SIGNED) \
             FROM information_schema.REFERENTIAL_CONSTRAINTS r \
             JOIN information_schema.KEY_COLUMN_USAGE k \
               ON k.CONSTRAINT_SCHEMA = r.CONSTRAINT_SCHEMA \
              AND k.CONSTRAINT_NAME = r.CONSTRAINT_NAME AND k.TABLE_NAME = r.TABLE_NAME \
             WHERE r.CONSTRAINT_SCHEMA = DATABASE() AND r.UNIQUE_CONSTRAINT_SCHEMA = DATABASE() \
               AND k.TABLE_SCHEMA = DATABASE() AND k.REFERENCED_TABLE_NAME IS NOT NULL \
               AND r.REFERENCED_TABLE_NAME = ? AND r.DELETE_RULE IN ('RESTRICT', 'NO ACTION') \
             ORDER BY k.TABLE_NAME, k.CONSTRAINT_NAME, k.ORDINAL_POSITION"
        }
    };
    type Row = (String, String, String, Option<String>, i64);
    let rows: Vec<Row> = crate::on_pool!(db, p => {
        sqlx::query(db.sql(sql)).bind(sessions_table).fetch_all(p).await?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?
    });
    let engine = db.engine();
    let mut refs: Vec<Reference> = Vec::new();
    for (constraint, table, from, to, own) in rows {
        let table = match engine {
            Engine::Postgres => table,
            _ => quote(engine, &table),
        };
        // An empty session-table column: not named (SQLite's implicit primary key), filled in
        // below or the key left out.
        let column = (
            quote(engine, &from),
            to.map(|c| quote(engine, &c)).unwrap_or_default(),
        );
        match refs.last_mut() {
            Some(last) if last.constraint == constraint && last.table == table => {
                last.columns.push(column);
            }
            _ => refs.push(Reference {
                constraint,
                table,
                columns: vec![column],
                from_sessions_table: own == 1,
            }),
        }
    }
    if engine == Engine::Sqlite {
        fill_implicit_primary_key(db, sessions_table, &mut refs).await?;
    }
    let mysql_proper = engine == Engine::MySql
        && refs.iter().any(|r| r.from_sessions_table)
        && !db
            .describe()
            .await?
            .version
            .to_ascii_lowercase()
            .contains("mariadb");
    let mut found = Restricting::default();
    for r in refs {
        let unusable = if r.columns.iter().any(|(_, to)| to.is_empty()) {
            Some("its columns on the session table could not be resolved".to_string())
        } else if mysql_proper && r.from_sessions_table {
            Some("it runs from the session table to itself, which MySQL cannot read inside the DELETE".into())
        } else {
            readable(db, &r.table).await.err()
        };
        match unusable {
            Some(why) => found.notes.push(format!(
                "foreign key {} forbids deleting the sessions it references, but {why}: a session it still references stops the batch that meets it",
                r.describe()
            )),
            None => found.references.push(r),
        }
    }
    Ok(found)
}

/// Whether this connection may read `table` (quoted): `Err` with the reason if not.
async fn readable(db: &Db, table: &str) -> Result<(), String> {
    let probe = format!("SELECT 1 FROM {table} WHERE 1 = 0");
    db.execute(&probe)
        .await
        .map(|_| ())
        .map_err(|e| format!("this connection cannot read {table} ({e})"))
}

/// SQLite leaves the parent column out of `REFERENCES sessions` (no column list): the key is
/// the parent's primary key, in order.
async fn fill_implicit_primary_key(
    db: &Db,
    sessions_table: &str,
    refs: &mut [Reference],
) -> Result<(), StoreError> {
    if refs
        .iter()
        .all(|r| r.columns.iter().all(|(_, to)| !to.is_empty()))
    {
        return Ok(());
    }
    let crate::store::Pool::Sqlite(p) = db.pool() else {
        return Ok(());
    };
    let pk: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk")
            .bind(sessions_table)
            .fetch_all(p)
            .await?;
    for r in refs.iter_mut() {
        if r.columns.iter().any(|(_, to)| to.is_empty()) && r.columns.len() == pk.len() {
            for ((_, to), name) in r.columns.iter_mut().zip(&pk) {
                *to = quote(Engine::Sqlite, name);
            }
        }
    }
    Ok(())
}

/// `name` as a quoted identifier of `engine`.
fn quote(engine: Engine, name: &str) -> String {
    match engine {
        Engine::MySql => format!("`{}`", name.replace('`', "``")),
        Engine::Sqlite | Engine::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_for_their_engine() {
        assert_eq!(quote(Engine::MySql, "a`b"), "`a``b`");
        assert_eq!(
            quote(Engine::Postgres, "Audit \"x\""),
            "\"Audit \"\"x\"\"\""
        );
    }

    #[test]
    fn a_reference_probes_every_column_of_its_key() {
        let r = Reference {
            constraint: "fk".into(),
            table: "\"audit\"".into(),
            columns: vec![
                ("\"sid\"".into(), "\"id\"".into()),
                ("\"skey\"".into(), "\"session_id\"".into()),
            ],
            from_sessions_table: false,
        };
        assert_eq!(
            r.exists_for("user_sessions"),
            "EXISTS (SELECT 1 FROM \"audit\" r WHERE r.\"sid\" = user_sessions.\"id\" AND r.\"skey\" = user_sessions.\"session_id\")"
        );
    }
}
