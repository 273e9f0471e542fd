//! Deterministic demo data: users, platform connections and sessions that look like a real
//! application's table after a month without maintenance.
//!
//! For a given seed and reference time the rows are identical on every run and engine. About
//! 60% of the sessions are expired; some belong to deactivated users; where the engine does not
//! enforce foreign keys (SQLite, as the reference application ran it) some belong to deleted
//! users or point at missing platform connections. Rows are streamed in multi-row INSERTs, a
//! few thousand per transaction, so memory stays flat at any size.

use chrono::{Duration as ChronoDuration, NaiveDateTime};
use serde::Serialize;
use sqlx::QueryBuilder;

use crate::store::{Db, Engine, SchemaVersion, StoreError, schema};

/// Parameters of [`seed_demo`].
#[derive(Debug, Clone)]
pub struct SeedParams {
    /// Number of sessions to create.
    pub sessions: u64,
    /// Number of users; default [`SeedParams::default_users`].
    pub users: u64,
    /// Random seed: same seed, same rows.
    pub seed: u64,
    /// Schema to create.
    pub schema: SchemaVersion,
    /// The "now" the data is relative to (UTC).
    pub now: NaiveDateTime,
    /// Drop and recreate the demo tables first.
    pub reset: bool,
}

impl SeedParams {
    /// Default share of expired sessions.
    pub const EXPIRED_SHARE: f64 = 0.60;
    /// Share of users that are deactivated.
    pub const DEACTIVATED_USER_SHARE: f64 = 0.05;
    /// Share of sessions pointing at a deleted user (only where foreign keys are not enforced).
    pub const MISSING_USER_SHARE: f64 = 0.02;
    /// Share of sessions pointing at a missing platform (only where foreign keys are not enforced).
    pub const MISSING_PLATFORM_SHARE: f64 = 0.02;
    /// Share of sessions with no active platform.
    pub const NO_PLATFORM_SHARE: f64 = 0.10;
    /// Share of expired v2 sessions the application already marked inactive.
    pub const MARKED_INACTIVE_SHARE: f64 = 0.30;
    /// Days over which creation times spread.
    pub const SPREAD_DAYS: i64 = 30;
    /// Sessions per multi-row INSERT.
    pub const ROWS_PER_STATEMENT: usize = 500;
    /// Statements per transaction (50,000 rows: commits are rare, the WAL stays bounded).
    pub const STATEMENTS_PER_TX: usize = 100;

    /// `sessions` sessions of the default number of users, relative to `now`, into an empty
    /// database (no reset).
    pub fn new(sessions: u64, seed: u64, schema: SchemaVersion, now: NaiveDateTime) -> SeedParams {
        SeedParams {
            sessions,
            users: Self::default_users(sessions),
            seed,
            schema,
            now,
            reset: false,
        }
    }

    /// One user for every 4 sessions, at least 10.
    pub fn default_users(sessions: u64) -> u64 {
        (sessions / 4).max(10)
    }
}

/// What [`seed_demo`] wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeedReport {
    /// Users inserted.
    pub users: u64,
    /// Of which deactivated.
    pub deactivated_users: u64,
    /// Platform connections inserted.
    pub platforms: u64,
    /// Sessions inserted.
    pub sessions: u64,
    /// Sessions generated as expired.
    pub expired: u64,
    /// Sessions of deleted (missing) users.
    pub missing_user: u64,
    /// Sessions of deactivated users.
    pub deactivated_user: u64,
    /// Sessions pointing at a missing platform.
    pub missing_platform: u64,
    /// Seconds spent.
    pub duration_seconds: f64,
}

/// A small, portable, seeded generator (SplitMix64): the same seed gives the same stream on
/// every platform and crate version, unlike `StdRng`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn seconds(&mut self, lo: i64, hi: i64) -> ChronoDuration {
        ChronoDuration::seconds(lo + self.below((hi - lo).max(1) as u64) as i64)
    }
}

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile Safari/537.36",
    "Tusky/27.2 Android/15",
    "Ivory/2.3 iOS/18.1",
    "curl/8.11.0",
];

struct SessionRow {
    session_id: String,
    user_id: i64,
    platform_id: Option<i64>,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
    last_activity: NaiveDateTime,
    expires_at: NaiveDateTime,
    is_active: bool,
    fingerprint: String,
    user_agent: String,
    ip_address: String,
}

/// Creates the schema if needed and fills it with demo data.
pub async fn seed_demo(db: &Db, params: &SeedParams) -> Result<SeedReport, StoreError> {
    let started = std::time::Instant::now();
    if params.reset {
        for table in ["user_sessions", "platform_connections", "users"] {
            db.execute(&format!("DROP TABLE IF EXISTS {table}")).await?;
        }
    }
    // Fresh tables are loaded first and indexed afterwards: one sort per index instead of
    // seven random B-tree updates per row (minutes instead of seconds at a million rows).
    let fresh = schema::table_columns(db, "user_sessions").await?.is_none();
    if fresh {
        schema::create_tables(db, params.schema).await?;
    } else {
        schema::create(db, params.schema).await?;
    }
    let existing = db.scalar_i64("SELECT COUNT(*) FROM users").await?
        + db.scalar_i64("SELECT COUNT(*) FROM user_sessions").await?;
    if existing > 0 {
        return Err(StoreError::BadUrl {
            url: db.redacted_url().to_string(),
            reason: "the database already holds users or sessions; seed a fresh database or pass --reset (drops the demo tables)".into(),
        });
    }
    let detected = schema::detect(db).await?;
    if detected.version != params.schema {
        return Err(StoreError::BadUrl {
            url: db.redacted_url().to_string(),
            reason: format!(
                "existing tables are schema {}, not {}; pass --reset to recreate them",
                detected.version, params.schema
            ),
        });
    }
    // Detection tells the rules' profile, not every column the rows below fill (a v2 table
    // without `session_fingerprint` is v2 to the cleanup): ask for them all before any row
    // is written.
    let columns = match params.schema {
        SchemaVersion::V2 => SEEDED_V2_COLUMNS,
        SchemaVersion::V1 => SEEDED_V1_COLUMNS,
    };
    if let Err(e) = db
        .execute(&format!("SELECT {columns} FROM user_sessions WHERE 1 = 0"))
        .await
    {
        return Err(StoreError::BadUrl {
            url: db.redacted_url().to_string(),
            reason: format!(
                "cannot read the columns the demo rows fill from the existing user_sessions table ({columns}): {e}; if one is missing, pass --reset to recreate the demo tables"
            ),
        });
    }
    let fk_enforced = db.engine() != Engine::Sqlite;
    let mut rng = Rng(params.seed);
    let mut report = SeedReport::default();
    let users = params.users.max(1);
    let now = params.now;

    // Users: a deterministic subset is deactivated.
    let mut deactivated = vec![false; users as usize + 1];
    let mut ids: Vec<u64> = (1..=users).collect();
    for chunk in ids.chunks_mut(1000) {
        let mut tx = db.begin_write().await?;
        let rows: Vec<(i64, bool, NaiveDateTime)> = chunk
            .iter()
            .map(|&id| {
                let off = rng.chance(SeedParams::DEACTIVATED_USER_SHARE);
                deactivated[id as usize] = off;
                (
                    id as i64,
                    !off,
                    now - rng.seconds(30 * 86_400, 400 * 86_400),
                )
            })
            .collect();
        report.deactivated_users += rows.iter().filter(|r| !r.1).count() as u64;
        crate::on_tx!(&mut tx, c => {
            let mut qb = QueryBuilder::new("INSERT INTO users (id, username, email, password_hash, role, is_active, created_at) ");
            qb.push_values(&rows, |mut b, (id, active, created)| {
                b.push_bind(*id).push_bind(format!("user{id}")).push_bind(format!("user{id}@example.org"))
                    .push_bind("pbkdf2:sha256:demo").push_bind("viewer").push_bind(*active).push_bind(*created);
            });
            qb.build().execute(&mut *c).await?;
        });
        tx.commit().await?;
    }
    report.users = users;

    // Platforms: one or two per user.
    let mut platform_count: u64 = 0;
    let mut platform_rows = Vec::new();
    for user in 1..=users {
        for n in 0..(1 + rng.below(2)) {
            platform_count += 1;
            let kind = if rng.chance(0.5) {
                "pixelfed"
            } else {
                "mastodon"
            };
            platform_rows.push((
                platform_count as i64,
                user as i64,
                format!("{kind}-{n}"),
                kind,
                format!("https://{kind}{n}-{}.example.social", user % 97),
            ));
        }
        if platform_rows.len() >= 1000 || user == users {
            let mut tx = db.begin_write().await?;
            crate::on_tx!(&mut tx, c => {
                let mut qb = QueryBuilder::new("INSERT INTO platform_connections (id, user_id, name, platform_type, instance_url, username, access_token, is_active, is_default, created_at, updated_at) ");
                qb.push_values(&platform_rows, |mut b, (id, user, name, kind, url)| {
                    b.push_bind(*id).push_bind(*user).push_bind(name.clone()).push_bind(*kind).push_bind(url.clone())
                        .push_bind(format!("u{user}")).push_bind("gAAAAA-demo-token").push_bind(true).push_bind(name.ends_with("-0"))
                        .push_bind(now - ChronoDuration::days(60)).push_bind(now - ChronoDuration::days(1));
                });
                qb.build().execute(&mut *c).await?;
            });
            tx.commit().await?;
            platform_rows.clear();
        }
    }
    report.platforms = platform_count;

    // Sessions, streamed. Into tables that already had their indexes, random session keys
    // land all over seven B-trees; on SQLite, a larger page cache for this connection keeps
    // them in memory instead of reading pages back from disk on every insert.
    let mut pending: Vec<SessionRow> = Vec::with_capacity(SeedParams::ROWS_PER_STATEMENT);
    let mut statements_in_tx = 0;
    let mut tx = db.begin_write().await?;
    if !fresh {
        grow_sqlite_cache(&mut tx).await?;
    }
    for i in 0..params.sessions {
        let row = generate_session(
            &mut rng,
            i,
            params,
            users,
            platform_count,
            fk_enforced,
            &deactivated,
            &mut report,
        );
        pending.push(row);
        if pending.len() == SeedParams::ROWS_PER_STATEMENT || i + 1 == params.sessions {
            insert_sessions(&mut tx, params.schema, &pending).await?;
            report.sessions += pending.len() as u64;
            pending.clear();
            statements_in_tx += 1;
            if statements_in_tx == SeedParams::STATEMENTS_PER_TX {
                tx.commit().await?;
                tx = db.begin_write().await?;
                if !fresh {
                    grow_sqlite_cache(&mut tx).await?;
                }
                statements_in_tx = 0;
            }
        }
    }
    tx.commit().await?;
    if fresh {
        schema::create_indexes(db, params.schema).await?;
    }
    if db.engine() == Engine::Postgres {
        // Explicit ids leave the SERIAL sequences behind; move them past the demo rows.
        for table in ["users", "platform_connections"] {
            db.execute(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT COALESCE(MAX(id), 1) FROM {table}))"
            ))
            .await?;
        }
    }
    report.duration_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Page cache for seeding connections, KiB (SQLite's `cache_size` takes negative KiB).
const SEED_SQLITE_CACHE_KIB: i64 = 256 * 1024;

async fn grow_sqlite_cache(tx: &mut crate::store::DbTx<'_>) -> Result<(), sqlx::Error> {
    if let crate::store::DbTx::Sqlite(t) = tx {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA cache_size = -{SEED_SQLITE_CACHE_KIB}"
        )))
        .execute(&mut **t)
        .await?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn generate_session(
    rng: &mut Rng,
    index: u64,
    params: &SeedParams,
    users: u64,
    platforms: u64,
    fk_enforced: bool,
    deactivated: &[bool],
    report: &mut SeedReport,
) -> SessionRow {
    let now = params.now;
    let lifetime = ChronoDuration::hours(48);
    let spread = SeedParams::SPREAD_DAYS * 86_400;
    let expired = rng.chance(SeedParams::EXPIRED_SHARE);
    let (created_at, last_activity, expires_at, is_active) = if expired {
        // Idle for more than 48 h (plus an hour of margin) and past its expiry.
        let created = now - rng.seconds(49 * 3600 + 3600, spread);
        let idle_room = ((now - created).num_seconds() - 49 * 3600 - 60).max(1);
        let last = created + rng.seconds(0, idle_room.min(2 * 86_400));
        let marked_inactive = rng.chance(SeedParams::MARKED_INACTIVE_SHARE);
        (created, last, created + lifetime, !marked_inactive)
    } else {
        // Live: used within the last day, expiry extended into the future.
        let created = now - rng.seconds(3600, spread);
        let idle = rng.seconds(0, (now - created).num_seconds().min(86_400));
        (
            created,
            now - idle,
            now + rng.seconds(3600, 47 * 3600),
            true,
        )
    };
    if expired {
        report.expired += 1;
    }
    let mut user_id = 1 + rng.below(users) as i64;
    if !fk_enforced && rng.chance(SeedParams::MISSING_USER_SHARE) {
        user_id = users as i64 + 1 + rng.below(1000) as i64;
        report.missing_user += 1;
    } else if deactivated[user_id as usize] {
        report.deactivated_user += 1;
    }
    let platform_id = if rng.chance(SeedParams::NO_PLATFORM_SHARE) {
        None
    } else if !fk_enforced && rng.chance(SeedParams::MISSING_PLATFORM_SHARE) {
        report.missing_platform += 1;
        Some(platforms as i64 + 1 + rng.below(1000) as i64)
    } else {
        Some(1 + rng.below(platforms.max(1)) as i64)
    };
    let ip_address = if rng.chance(0.2) {
        format!(
            "2001:db8:{:x}:{:x}::{:x}",
            rng.below(0xffff),
            rng.below(0xffff),
            rng.below(0xffff)
        )
    } else {
        format!(
            "{}.{}.{}.{}",
            1 + rng.below(223),
            rng.below(256),
            rng.below(256),
            1 + rng.below(254)
        )
    };
    SessionRow {
        session_id: format!("{:016x}{:016x}-{index}", rng.next(), params.seed),
        user_id,
        platform_id,
        created_at,
        updated_at: last_activity,
        last_activity,
        expires_at,
        is_active,
        fingerprint: format!("{:016x}", rng.next()),
        user_agent: USER_AGENTS[rng.below(USER_AGENTS.len() as u64) as usize].to_string(),
        ip_address,
    }
}

/// The columns a demo v2 session row fills, in the order `insert_sessions` binds them.
const SEEDED_V2_COLUMNS: &str = "session_id, user_id, active_platform_id, created_at, updated_at, last_activity, expires_at, is_active, session_fingerprint, user_agent, ip_address";
/// The columns a demo v1 session row fills, in the order `insert_sessions` binds them.
const SEEDED_V1_COLUMNS: &str =
    "session_id, user_id, active_platform_id, created_at, updated_at, user_agent, ip_address";

async fn insert_sessions(
    tx: &mut crate::store::DbTx<'_>,
    version: SchemaVersion,
    rows: &[SessionRow],
) -> Result<(), sqlx::Error> {
    crate::on_tx!(tx, c => {
        match version {
            SchemaVersion::V2 => {
                let mut qb = QueryBuilder::new(format!("INSERT INTO user_sessions ({SEEDED_V2_COLUMNS}) "));
                qb.push_values(rows, |mut b, r| {
                    b.push_bind(r.session_id.clone()).push_bind(r.user_id).push_bind(r.platform_id)
                        .push_bind(r.created_at).push_bind(r.updated_at).push_bind(r.last_activity)
                        .push_bind(r.expires_at).push_bind(r.is_active).push_bind(r.fingerprint.clone())
                        .push_bind(r.user_agent.clone()).push_bind(r.ip_address.clone());
                });
                qb.build().execute(&mut *c).await?;
            }
            SchemaVersion::V1 => {
                let mut qb = QueryBuilder::new(format!("INSERT INTO user_sessions ({SEEDED_V1_COLUMNS}) "));
                qb.push_values(rows, |mut b, r| {
                    b.push_bind(r.session_id.clone()).push_bind(r.user_id).push_bind(r.platform_id)
                        .push_bind(r.created_at).push_bind(r.updated_at)
                        .push_bind(r.user_agent.clone()).push_bind(r.ip_address.clone());
                });
                qb.build().execute(&mut *c).await?;
            }
        }
    });
    Ok(())
}
