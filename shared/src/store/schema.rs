//! The session schema as *roles*: which table holds sessions, which column is the user, the
//! last activity, the expiry. Operations ask the [`Schema`] for a role's column name instead
//! of hard-coding it, so another framework's session table is a new [`SessionProfile`], not a
//! rewrite.
//!
//! Two profiles exist today, both Vedfolnir's (`reference/vedfolnir-behaviour.md` §1):
//! v1 (`user_sessions` with `updated_at` only) and v2 (adds `expires_at`, `is_active`,
//! `last_activity`, `session_fingerprint`). [`detect`] tells which one a database has, from
//! the columns the cleanup's rules compare (`expires_at`, `last_activity`, `is_active`), and
//! reads the type of each time column from the catalog; [`Schema::check_rules_apply`] says
//! when the rules cannot judge a table. [`create`] lays either schema out on a new database
//! with the reference's names.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sqlx::Row;

use super::references::Reference;
use super::{Db, Engine, StoreError};

/// A required table or column is absent, or the columns present cannot be judged safely.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaError {
    /// The table does not exist in the database the URL names.
    #[error(
        "table '{table}' not found in {url}: sessionfleet needs the application's session tables (create them with 'sessionfleet seed-demo' for a demo)"
    )]
    MissingTable {
        /// Missing table.
        table: String,
        /// Where it was looked for (password removed).
        url: String,
    },
    /// The table exists but lacks columns a role needs.
    #[error("table '{table}' lacks column(s) {columns} (found: {found})")]
    MissingColumns {
        /// Table name.
        table: String,
        /// Missing columns, comma-separated.
        columns: String,
        /// Columns that are present, comma-separated.
        found: String,
    },
    /// A profile names something that is not a plain SQL identifier.
    #[error("invalid identifier '{0}' in session profile (letters, digits and _ only)")]
    BadIdentifier(String),
    /// A time column the rules compare with a cutoff is not of a date/time type (PostgreSQL
    /// and MySQL/MariaDB; SQLite has no column types, see `ops::cleanup::times`): a number
    /// would be compared as a number, text as text, and a live session could match.
    #[error(
        "table '{table}' column '{column}' is {data_type}, not a date/time type: sessionfleet compares it as a time and would misjudge it"
    )]
    TimeColumnType {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
        /// The column's type as the catalog names it (`bigint`, `character varying`).
        data_type: String,
    },
    /// The expiry and activity columns present fit neither profile: v1 judges `updated_at`
    /// alone, v2 needs `expires_at` and `last_activity` together. Judging such a table by
    /// either would mean guessing which column says a session is live.
    #[error(
        "table '{table}' has {present} but not {absent}: it fits neither the v1 rules (updated_at alone) nor the v2 rules (expires_at with last_activity), and sessionfleet will not guess which column says a session is live"
    )]
    UnfitColumns {
        /// Table name.
        table: String,
        /// The expiry/activity columns present, comma-separated.
        present: String,
        /// Those the nearest profile needs but the table lacks, comma-separated.
        absent: String,
    },
}

/// Which Vedfolnir schema a database carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaVersion {
    /// `user_sessions` with `updated_at` as the only activity column.
    V1,
    /// `user_sessions` with `expires_at` and `last_activity` (the reference's v2 adds
    /// `is_active` and `session_fingerprint`; detection needs neither, see [`detect_with`]).
    V2,
}

impl std::fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchemaVersion::V1 => "v1",
            SchemaVersion::V2 => "v2",
        })
    }
}

impl std::str::FromStr for SchemaVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(SchemaVersion::V1),
            "v2" | "2" => Ok(SchemaVersion::V2),
            other => Err(format!("unknown schema '{other}' (expected v1 or v2)")),
        }
    }
}

/// Column roles of the session table. `None` means the framework has no such column.
#[derive(Debug, Clone, Serialize)]
pub struct SessionTable {
    /// Table name.
    pub table: String,
    /// Primary key (integer).
    pub id: String,
    /// The application's session key.
    pub session_key: String,
    /// Owning user's id.
    pub user_id: String,
    /// Active platform connection, if the framework tracks one.
    pub platform_id: Option<String>,
    /// Creation time.
    pub created_at: String,
    /// Last update time (v1's only activity column).
    pub updated_at: String,
    /// Last activity time, where the schema has a dedicated column.
    pub last_activity: Option<String>,
    /// Absolute expiry time, where the schema has one.
    pub expires_at: Option<String>,
    /// Soft-deactivation flag, where the schema has one.
    pub is_active: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Client IP address.
    pub ip_address: Option<String>,
    /// Client fingerprint.
    pub fingerprint: Option<String>,
}

/// Column roles of the users table.
#[derive(Debug, Clone, Serialize)]
pub struct UsersTable {
    /// Table name.
    pub table: String,
    /// Primary key.
    pub id: String,
    /// Deactivation flag; `None` if users cannot be deactivated.
    pub is_active: Option<String>,
}

/// Column roles of the platform connections table.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformsTable {
    /// Table name.
    pub table: String,
    /// Primary key.
    pub id: String,
    /// Platform kind (e.g. `pixelfed`, `mastodon`), if recorded.
    pub platform_type: Option<String>,
}

/// A framework's session tables described by roles, before detection trims the optional
/// columns down to what a database really has.
#[derive(Debug, Clone, Serialize)]
pub struct SessionProfile {
    /// Profile name shown in reports.
    pub name: String,
    /// Session table roles.
    pub sessions: SessionTable,
    /// Users table roles.
    pub users: UsersTable,
    /// Platform table roles.
    pub platforms: PlatformsTable,
}

impl SessionProfile {
    /// Vedfolnir's tables (`user_sessions`, `users`, `platform_connections`), all columns of v2.
    pub fn vedfolnir() -> SessionProfile {
        let s = |v: &str| v.to_string();
        SessionProfile {
            name: s("vedfolnir"),
            sessions: SessionTable {
                table: s("user_sessions"),
                id: s("id"),
                session_key: s("session_id"),
                user_id: s("user_id"),
                platform_id: Some(s("active_platform_id")),
                created_at: s("created_at"),
                updated_at: s("updated_at"),
                last_activity: Some(s("last_activity")),
                expires_at: Some(s("expires_at")),
                is_active: Some(s("is_active")),
                user_agent: Some(s("user_agent")),
                ip_address: Some(s("ip_address")),
                fingerprint: Some(s("session_fingerprint")),
            },
            users: UsersTable {
                table: s("users"),
                id: s("id"),
                is_active: Some(s("is_active")),
            },
            platforms: PlatformsTable {
                table: s("platform_connections"),
                id: s("id"),
                platform_type: Some(s("platform_type")),
            },
        }
    }

    fn validate(&self) -> Result<(), SchemaError> {
        let t = &self.sessions;
        let names = [
            Some(&t.table),
            Some(&t.id),
            Some(&t.session_key),
            Some(&t.user_id),
            t.platform_id.as_ref(),
            Some(&t.created_at),
            Some(&t.updated_at),
            t.last_activity.as_ref(),
            t.expires_at.as_ref(),
            t.is_active.as_ref(),
            t.user_agent.as_ref(),
            t.ip_address.as_ref(),
            t.fingerprint.as_ref(),
            Some(&self.users.table),
            Some(&self.users.id),
            self.users.is_active.as_ref(),
            Some(&self.platforms.table),
            Some(&self.platforms.id),
            self.platforms.platform_type.as_ref(),
        ];
        for name in names.into_iter().flatten() {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(SchemaError::BadIdentifier(name.clone()));
            }
        }
        Ok(())
    }
}

/// What [`detect`] found: the version and the roles this database really supports.
#[derive(Debug, Clone, Serialize)]
pub struct Schema {
    /// v1 or v2.
    pub version: SchemaVersion,
    /// The session table's roles, optional columns absent from the database set to `None`.
    pub sessions: SessionTable,
    /// Users table, if present.
    pub users: Option<UsersTable>,
    /// Platform table, if present.
    pub platforms: Option<PlatformsTable>,
    /// Foreign keys whose delete rule keeps a referenced session in place
    /// ([`references`](super::references)); the cleanup leaves those sessions alone.
    pub references: Vec<Reference>,
    /// Profile name.
    pub profile: String,
    /// Notes for people: features this schema cannot support, partial v2 columns.
    pub notes: Vec<String>,
    /// Why the cleanup's rules cannot judge this table, if they cannot (see
    /// [`Schema::check_rules_apply`]): a time column they compare that is not of a date/time
    /// type, or expiry and activity columns that fit neither profile. Each is also in
    /// `notes`, for the reports that can still run.
    #[serde(skip)]
    pub refusals: Vec<SchemaError>,
}

impl Schema {
    /// Refuses a table the cleanup's rules would misjudge: the first of
    /// [`Schema::refusals`]. A cleanup, its dry run and its stats call it before anything
    /// else, so such a table has nothing deleted and nothing counted.
    pub fn check_rules_apply(&self) -> Result<(), SchemaError> {
        match self.refusals.first() {
            Some(refusal) => Err(refusal.clone()),
            None => Ok(()),
        }
    }

    /// The column that says when a session was last used: `last_activity` where the schema has
    /// it (v2), otherwise `updated_at` (v1).
    pub fn activity_column(&self) -> &str {
        self.sessions
            .last_activity
            .as_deref()
            .unwrap_or(&self.sessions.updated_at)
    }

    /// One line naming what was found, for logs and reports.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} schema {} (table {}",
            self.profile, self.version, self.sessions.table
        );
        if let Some(u) = &self.users {
            s.push_str(&format!(", users {}", u.table));
        }
        if let Some(p) = &self.platforms {
            s.push_str(&format!(", platforms {}", p.table));
        }
        s.push(')');
        s
    }
}

/// Lists the columns of `table`, or `None` when the table does not exist.
pub async fn table_columns(db: &Db, table: &str) -> Result<Option<BTreeSet<String>>, StoreError> {
    Ok(column_types(db, table)
        .await?
        .map(|cols| cols.into_keys().collect()))
}

/// The columns of `table` with their types as the catalog names them (lowercase; SQLite's
/// declared type, which says nothing of what a column holds), or `None` when the table does
/// not exist.
async fn column_types(
    db: &Db,
    table: &str,
) -> Result<Option<BTreeMap<String, String>>, StoreError> {
    let sql = match db.engine() {
        Engine::Sqlite => "SELECT name, type FROM pragma_table_info(?)",
        Engine::Postgres => {
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = ?"
        }
        Engine::MySql => {
            "SELECT CAST(column_name AS CHAR), CAST(data_type AS CHAR) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
    };
    let rows = crate::on_pool!(db, p => sqlx::query(db.sql(sql)).bind(table).fetch_all(p).await?
        .into_iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?.to_ascii_lowercase())))
        .collect::<Result<BTreeMap<_, _>, sqlx::Error>>()?);
    Ok((!rows.is_empty()).then_some(rows))
}

/// Whether a column of catalog type `data_type` compares with a time as a time: PostgreSQL's
/// `timestamp`, `timestamptz` and `date`, MySQL's `datetime`, `timestamp` and `date`. A
/// number would be compared as a number, text as text. SQLite types nothing (its columns'
/// values are looked at by `ops::cleanup::times` instead).
fn is_time_type(engine: Engine, data_type: &str) -> bool {
    match engine {
        Engine::Sqlite => true,
        Engine::Postgres => matches!(
            data_type,
            "timestamp without time zone" | "timestamp with time zone" | "date"
        ),
        Engine::MySql => matches!(data_type, "datetime" | "timestamp" | "date"),
    }
}

/// Detects which session schema `db` has, using the Vedfolnir profile.
pub async fn detect(db: &Db) -> Result<Schema, StoreError> {
    detect_with(db, &SessionProfile::vedfolnir()).await
}

/// Detects the schema described by `profile`: required columns must exist, optional ones are
/// kept only where the database has them.
///
/// The version follows the columns the cleanup's rules compare, never
/// `session_fingerprint`, which no rule reads:
/// - `expires_at` and `last_activity`: v2 (`is_active`, where present, adds the rule for
///   sessions the application marked inactive);
/// - neither: v1, judged by `updated_at` alone (a stray `is_active` is not read);
/// - one without the other: neither profile fits. Judging such a table by `updated_at` would
///   ignore an expiry still ahead, and v2's rules need a last activity: the schema carries a
///   refusal ([`SchemaError::UnfitColumns`]), and the reports see it as v1 with a note.
///
/// On PostgreSQL and MySQL each time column is read from the catalog: one the rules compare
/// that is not of a date/time type is a refusal too ([`SchemaError::TimeColumnType`]).
pub async fn detect_with(db: &Db, profile: &SessionProfile) -> Result<Schema, StoreError> {
    profile.validate()?;
    let p = &profile.sessions;
    let Some(types) = column_types(db, &p.table).await? else {
        return Err(SchemaError::MissingTable {
            table: p.table.clone(),
            url: db.redacted_url().to_string(),
        }
        .into());
    };
    let cols: BTreeSet<&str> = types.keys().map(String::as_str).collect();
    let required = [
        &p.id,
        &p.session_key,
        &p.user_id,
        &p.created_at,
        &p.updated_at,
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|c| !cols.contains(c.as_str()))
        .map(|c| c.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(SchemaError::MissingColumns {
            table: p.table.clone(),
            columns: missing.join(", "),
            found: cols.iter().copied().collect::<Vec<_>>().join(", "),
        }
        .into());
    }
    let keep = |c: &Option<String>| c.clone().filter(|name| cols.contains(name.as_str()));
    let mut sessions = p.clone();
    sessions.platform_id = keep(&p.platform_id);
    sessions.last_activity = keep(&p.last_activity);
    sessions.expires_at = keep(&p.expires_at);
    sessions.is_active = keep(&p.is_active);
    sessions.user_agent = keep(&p.user_agent);
    sessions.ip_address = keep(&p.ip_address);
    sessions.fingerprint = keep(&p.fingerprint);

    let mut notes = Vec::new();
    let mut refusals = Vec::new();
    let version = match (&sessions.expires_at, &sessions.last_activity) {
        (Some(_), Some(_)) => {
            if let (None, Some(flag)) = (&sessions.is_active, &p.is_active) {
                notes.push(format!(
                    "table '{}' has no column {flag}: sessions the application marked inactive \
                     are not purged by age, only once expired",
                    p.table
                ));
            }
            SchemaVersion::V2
        }
        (None, None) => {
            if let Some(flag) = &sessions.is_active {
                notes.push(format!(
                    "table '{}' has {flag} but neither expiry nor last-activity column: judged \
                     as v1, by {} alone",
                    p.table, p.updated_at
                ));
            }
            // v1 judges updated_at alone: a stray flag is not read.
            sessions.is_active = None;
            SchemaVersion::V1
        }
        (expiry, activity) => {
            let roles = [
                (&p.expires_at, expiry.is_some()),
                (&p.last_activity, activity.is_some()),
            ];
            let names = |present: bool| {
                roles
                    .iter()
                    .filter(|(_, found)| *found == present)
                    .filter_map(|(name, _)| (*name).clone())
                    .chain(present.then(|| sessions.is_active.clone()).flatten())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let unfit = SchemaError::UnfitColumns {
                table: p.table.clone(),
                present: names(true),
                absent: names(false),
            };
            notes.push(format!(
                "{unfit}; the cleanup refuses it, reports judge it as v1 by {}",
                p.updated_at
            ));
            refusals.push(unfit);
            sessions.expires_at = None;
            sessions.is_active = None;
            sessions.last_activity = None;
            SchemaVersion::V1
        }
    };
    // The time columns as the catalog types them. The rules compare the activity and expiry
    // columns with a time: one of another type refuses the cleanup. The others are noted,
    // for the reports that read them.
    let compared: Vec<&String> = match version {
        SchemaVersion::V2 => [&sessions.expires_at, &sessions.last_activity]
            .into_iter()
            .flatten()
            .collect(),
        SchemaVersion::V1 => vec![&sessions.updated_at],
    };
    let time_columns = [
        Some(&sessions.created_at),
        Some(&sessions.updated_at),
        sessions.last_activity.as_ref(),
        sessions.expires_at.as_ref(),
    ];
    for column in time_columns.into_iter().flatten() {
        let data_type = &types[column];
        if is_time_type(db.engine(), data_type) {
            continue;
        }
        let wrong = SchemaError::TimeColumnType {
            table: p.table.clone(),
            column: column.clone(),
            data_type: data_type.clone(),
        };
        if compared.contains(&column) {
            notes.push(format!("{wrong}; the cleanup refuses the table"));
            refusals.push(wrong);
        } else {
            notes.push(format!(
                "table '{}' column '{column}' is {data_type}, not a date/time type: figures \
                 read from it are misjudged",
                p.table
            ));
        }
    }

    let users = match table_columns(db, &profile.users.table).await? {
        Some(ucols) if ucols.contains(&profile.users.id) => Some(UsersTable {
            table: profile.users.table.clone(),
            id: profile.users.id.clone(),
            is_active: profile
                .users
                .is_active
                .clone()
                .filter(|c| ucols.contains(c)),
        }),
        _ => {
            notes.push(format!(
                "table '{}' not found: orphaned-session detection is unavailable",
                profile.users.table
            ));
            None
        }
    };
    let platforms = match table_columns(db, &profile.platforms.table).await? {
        Some(pcols) if pcols.contains(&profile.platforms.id) => Some(PlatformsTable {
            table: profile.platforms.table.clone(),
            id: profile.platforms.id.clone(),
            platform_type: profile
                .platforms
                .platform_type
                .clone()
                .filter(|c| pcols.contains(c)),
        }),
        _ => {
            notes.push(format!(
                "table '{}' not found: platform analytics are unavailable",
                profile.platforms.table
            ));
            None
        }
    };
    let restricting = super::references::restricting(db, &sessions.table).await?;
    notes.extend(restricting.notes);
    let references = restricting.references;
    Ok(Schema {
        version,
        sessions,
        users,
        platforms,
        references,
        profile: profile.name.clone(),
        notes,
        refusals,
    })
}

/// Creates the Vedfolnir tables (`users`, `platform_connections`, `user_sessions`) with the
/// reference's column, constraint and index names, if they do not exist yet.
pub async fn create(db: &Db, version: SchemaVersion) -> Result<(), StoreError> {
    create_tables(db, version).await?;
    create_indexes(db, version).await
}

/// The tables of [`create`] without their secondary indexes. A bulk load into fresh tables
/// followed by [`create_indexes`] sorts each index once instead of updating every B-tree
/// on every row.
pub async fn create_tables(db: &Db, version: SchemaVersion) -> Result<(), StoreError> {
    run_ddl(db, ddl(db.engine(), version).tables).await
}

/// The secondary indexes of [`create`]; existing ones are left alone.
pub async fn create_indexes(db: &Db, version: SchemaVersion) -> Result<(), StoreError> {
    run_ddl(db, ddl(db.engine(), version).indexes).await
}

async fn run_ddl(db: &Db, statements: Vec<String>) -> Result<(), StoreError> {
    for stmt in statements {
        match db.execute(&stmt).await {
            Ok(_) => {}
            // MySQL (unlike MariaDB) has no CREATE INDEX IF NOT EXISTS: 1061 = "duplicate key name".
            Err(e) if super::mysql_error_number(&e) == Some(1061) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The statements of [`create`]: tables first, then their secondary indexes.
#[derive(Debug, Clone)]
pub struct Ddl {
    /// `CREATE TABLE IF NOT EXISTS`, with primary keys and constraints.
    pub tables: Vec<String>,
    /// `CREATE [UNIQUE] INDEX`, idempotent.
    pub indexes: Vec<String>,
}

/// The DDL [`create`] runs, per engine and version.
pub fn ddl(engine: Engine, version: SchemaVersion) -> Ddl {
    // Per-engine spellings of the same types; the names are the reference's (§1.2–1.4).
    let (pk, dt, now, boolean, if_not_exists_ix, table_suffix) = match engine {
        Engine::Sqlite => (
            "INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT",
            "DATETIME",
            "CURRENT_TIMESTAMP",
            "BOOLEAN",
            "IF NOT EXISTS ",
            "",
        ),
        Engine::Postgres => (
            "SERIAL NOT NULL PRIMARY KEY",
            "TIMESTAMP WITHOUT TIME ZONE",
            "(now() AT TIME ZONE 'utc')",
            "BOOLEAN",
            "IF NOT EXISTS ",
            "",
        ),
        Engine::MySql => (
            "INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY",
            "DATETIME",
            "CURRENT_TIMESTAMP",
            "BOOL",
            "",
            " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci ROW_FORMAT=DYNAMIC",
        ),
    };
    let role = match engine {
        Engine::Postgres => "VARCHAR(9)",
        Engine::Sqlite => "VARCHAR(9)",
        Engine::MySql => "ENUM('admin','moderator','reviewer','viewer')",
    };
    let mut tables = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS users (\
             id {pk}, username VARCHAR(64) NOT NULL, email VARCHAR(120) NOT NULL, \
             password_hash VARCHAR(256) NOT NULL, role {role} DEFAULT 'viewer', \
             is_active {boolean} DEFAULT TRUE, created_at {dt}, last_login {dt} NULL){table_suffix}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS platform_connections (\
             id {pk}, user_id INTEGER NOT NULL, name VARCHAR(100) NOT NULL, \
             platform_type VARCHAR(50) NOT NULL, instance_url VARCHAR(500) NOT NULL, \
             username VARCHAR(200) NULL, access_token TEXT NOT NULL, client_key TEXT, \
             client_secret TEXT, is_active {boolean} DEFAULT TRUE, is_default {boolean} DEFAULT FALSE, \
             created_at {dt}, updated_at {dt}, last_used {dt} NULL, \
             CONSTRAINT uq_user_platform_name UNIQUE (user_id, name), \
             CONSTRAINT uq_user_instance_username UNIQUE (user_id, instance_url, username), \
             FOREIGN KEY (user_id) REFERENCES users (id)){table_suffix}"
        ),
    ];
    let mut indexes = vec![
        format!("CREATE UNIQUE INDEX {if_not_exists_ix}ix_users_username ON users (username)"),
        format!("CREATE UNIQUE INDEX {if_not_exists_ix}ix_users_email ON users (email)"),
        format!(
            "CREATE INDEX {if_not_exists_ix}ix_platform_user_active ON platform_connections (user_id, is_active)"
        ),
        format!(
            "CREATE INDEX {if_not_exists_ix}ix_platform_type_active ON platform_connections (platform_type, is_active)"
        ),
        format!(
            "CREATE INDEX {if_not_exists_ix}ix_platform_instance_type ON platform_connections (instance_url, platform_type)"
        ),
    ];
    let v2_columns = match version {
        SchemaVersion::V1 => String::new(),
        SchemaVersion::V2 => format!(
            "last_activity {dt} NOT NULL DEFAULT {now}, expires_at {dt} NOT NULL, \
             is_active {boolean} NOT NULL DEFAULT TRUE, session_fingerprint TEXT NULL, "
        ),
    };
    tables.push(format!(
        "CREATE TABLE IF NOT EXISTS user_sessions (\
         id {pk}, session_id VARCHAR(255) NOT NULL, user_id INTEGER NOT NULL, \
         active_platform_id INTEGER NULL, created_at {dt} NOT NULL DEFAULT {now}, \
         updated_at {dt} NOT NULL DEFAULT {now}, {v2_columns}\
         user_agent TEXT NULL, ip_address VARCHAR(45) NULL, \
         FOREIGN KEY (user_id) REFERENCES users (id), \
         FOREIGN KEY (active_platform_id) REFERENCES platform_connections (id)){table_suffix}"
    ));
    indexes.push(format!(
        "CREATE UNIQUE INDEX {if_not_exists_ix}ix_user_sessions_session_id ON user_sessions (session_id)"
    ));
    let mut indexed = vec!["user_id", "updated_at"];
    if version == SchemaVersion::V2 {
        indexed.extend(["last_activity", "expires_at", "is_active"]);
    }
    for col in indexed {
        indexes.push(format!(
            "CREATE INDEX {if_not_exists_ix}ix_user_sessions_{col} ON user_sessions ({col})"
        ));
    }
    Ddl { tables, indexes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_rejects_non_identifiers() {
        let mut p = SessionProfile::vedfolnir();
        p.sessions.table = "user_sessions; DROP TABLE users".into();
        assert!(matches!(p.validate(), Err(SchemaError::BadIdentifier(_))));
        assert!(SessionProfile::vedfolnir().validate().is_ok());
    }

    #[test]
    fn v2_ddl_carries_the_reference_index_names() {
        let ddl = ddl(Engine::Postgres, SchemaVersion::V2);
        let ddl = [ddl.tables, ddl.indexes].concat().join("\n");
        for ix in [
            "ix_user_sessions_session_id",
            "ix_user_sessions_user_id",
            "ix_user_sessions_updated_at",
            "ix_user_sessions_last_activity",
            "ix_user_sessions_expires_at",
            "ix_user_sessions_is_active",
            "uq_user_platform_name",
            "ix_platform_type_active",
        ] {
            assert!(ddl.contains(ix), "missing {ix}");
        }
    }
}
