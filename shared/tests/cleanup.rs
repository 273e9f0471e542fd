//! The cleanup operation against real SQLite, PostgreSQL and MariaDB, on v1 and v2 schemas.
//!
//! The oracle below is written independently of `ops::cleanup::rules`, straight from the
//! definitions in issue 3 (NOT IN instead of NOT EXISTS, one OR'ed WHERE clause).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{Duration as ChronoDuration, NaiveDate, NaiveDateTime};
use sessionfleet::CancellationToken;
use sessionfleet::fence::{self, Fence};
use sessionfleet::ops::cleanup::{self, CleanupParams, CleanupReport};
use sessionfleet::ops::{OpContext, OpError, Outcome};
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Db, Engine, SchemaVersion, dialect_sql};
use sessionfleet::testing::{ENGINES, HeldLock, TestDb, allow_sessions_without_a_user};
use sqlx::Row;

const VERSIONS: [SchemaVersion; 2] = [SchemaVersion::V1, SchemaVersion::V2];
const SESSIONS: u64 = 400;
const MAX_AGE_SECS: u64 = 48 * 3600;

/// The fixed "now" of the demo data, also the runs' `as_of`.
fn t0() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2025, 6, 1)
        .and_then(|d| d.and_hms_opt(12, 0, 0))
        .expect("valid date")
}

fn params() -> CleanupParams {
    CleanupParams {
        as_of: Some(t0()),
        max_age_secs: MAX_AGE_SECS,
        batch_size: 5,
        max_batch_size: 40,
        ..Default::default()
    }
}

async fn seeded(engine: Engine, version: SchemaVersion) -> TestDb {
    let tdb = TestDb::new(engine).await;
    let seed = SeedParams {
        sessions: SESSIONS,
        users: 30,
        seed: 42,
        schema: version,
        now: t0(),
        reset: false,
    };
    seed_demo(&tdb.db, &seed).await.expect("seed");
    add_edge_rows(&tdb.db, version).await;
    tdb
}

const ACTIVE_USER: i64 = 900_001;
const NULL_ACTIVE_USER: i64 = 900_002;
const DEACTIVATED_USER: i64 = 900_003;
const MISSING_USER: i64 = 999_999;
const MISSING_PLATFORM: i64 = 999_999;

struct Edge {
    label: &'static str,
    user: i64,
    platform: Option<i64>,
    activity: NaiveDateTime,
    expires: NaiveDateTime,
    active: bool,
    /// Whether the cleanup (without force) must delete it.
    purge: bool,
}

fn edges(version: SchemaVersion) -> Vec<Edge> {
    let as_of = t0();
    let cutoff = as_of - ChronoDuration::seconds(MAX_AGE_SECS as i64);
    let hour = ChronoDuration::hours(1);
    let sec = ChronoDuration::seconds(1);
    let live = |label, user, platform, purge| Edge {
        label,
        user,
        platform,
        activity: as_of - hour,
        expires: as_of + hour,
        active: true,
        purge,
    };
    let mut v = vec![
        live("user-null-active", NULL_ACTIVE_USER, None, false),
        live("user-deactivated", DEACTIVATED_USER, None, true),
        live("user-missing", MISSING_USER, None, true),
        live(
            "platform-missing",
            ACTIVE_USER,
            Some(MISSING_PLATFORM),
            false,
        ),
    ];
    match version {
        SchemaVersion::V2 => v.extend([
            // Expires one second after as_of, i.e. "during the run": live at as_of.
            Edge {
                expires: as_of + sec,
                ..live("expires-during-run", ACTIVE_USER, None, false)
            },
            Edge {
                expires: as_of,
                ..live("expires-at-as-of", ACTIVE_USER, None, false)
            },
            Edge {
                expires: as_of - sec,
                ..live("expired-just-now", ACTIVE_USER, None, true)
            },
            Edge {
                active: false,
                ..live("inactive-recent", ACTIVE_USER, None, false)
            },
            Edge {
                active: false,
                activity: cutoff - sec,
                ..live("inactive-old", ACTIVE_USER, None, true)
            },
            Edge {
                active: false,
                activity: cutoff,
                ..live("inactive-at-cutoff", ACTIVE_USER, None, false)
            },
        ]),
        SchemaVersion::V1 => v.extend([
            Edge {
                activity: cutoff,
                ..live("idle-at-cutoff", ACTIVE_USER, None, false)
            },
            Edge {
                activity: cutoff - sec,
                ..live("idle-past-cutoff", ACTIVE_USER, None, true)
            },
            Edge {
                activity: cutoff + sec,
                ..live("idle-before-cutoff", ACTIVE_USER, None, false)
            },
        ]),
    }
    v
}

/// Hand-made rows for the edges; foreign keys are switched off for the insert where the
/// engine enforces them, as the reference application's SQLite never enforced them.
async fn add_edge_rows(db: &Db, version: SchemaVersion) {
    let mut tx = db.begin_write().await.expect("begin");
    let fk_off = match db.engine() {
        Engine::Sqlite => None,
        Engine::Postgres => Some("SET LOCAL session_replication_role = replica"),
        Engine::MySql => Some("SET FOREIGN_KEY_CHECKS = 0"),
    };
    let users = [
        (ACTIVE_USER, Some(true)),
        (NULL_ACTIVE_USER, None),
        (DEACTIVATED_USER, Some(false)),
    ];
    let engine = db.engine();
    let user_sql = "INSERT INTO users (id, username, email, password_hash, role, is_active, created_at) VALUES (?, ?, ?, 'x', 'viewer', ?, ?)";
    let session_sql = (match version {
        SchemaVersion::V2 => "INSERT INTO user_sessions (session_id, user_id, active_platform_id, created_at, updated_at, last_activity, expires_at, is_active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        SchemaVersion::V1 => "INSERT INTO user_sessions (session_id, user_id, active_platform_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
    })
    .to_string();
    let rows = edges(version);
    sessionfleet::on_tx!(&mut tx, c => {
        if let Some(off) = fk_off {
            sqlx::query(off).execute(&mut *c).await.expect("fk off");
        }
        for (id, active) in users {
            sqlx::query(dialect_sql(engine, user_sql)).bind(id).bind(format!("edge{id}")).bind(format!("edge{id}@example.org"))
                .bind(active).bind(t0()).execute(&mut *c).await.expect("insert user");
        }
        for e in &rows {
            let mut q = sqlx::query(dialect_sql(engine, session_sql.clone())).bind(e.label).bind(e.user).bind(e.platform)
                .bind(e.activity - ChronoDuration::hours(1)).bind(e.activity);
            if version == SchemaVersion::V2 {
                q = q.bind(e.activity).bind(e.expires).bind(e.active);
            }
            q.execute(&mut *c).await.expect("insert session");
        }
        if db.engine() == Engine::MySql {
            sqlx::query("SET FOREIGN_KEY_CHECKS = 1").execute(&mut *c).await.expect("fk on");
        }
    });
    tx.commit().await.expect("commit");
}

fn big(engine: Engine, col: &str) -> String {
    match engine {
        Engine::Sqlite => col.to_string(),
        Engine::Postgres => format!("CAST({col} AS BIGINT)"),
        Engine::MySql => format!("CAST({col} AS SIGNED)"),
    }
}

/// Ids a cleanup must delete at `as_of`, by the definitions of issue 3.
async fn oracle(
    db: &Db,
    version: SchemaVersion,
    idle_hours: Option<i64>,
    with_users: bool,
) -> BTreeSet<i64> {
    let as_of = t0();
    let cutoff = as_of - ChronoDuration::seconds(MAX_AGE_SECS as i64);
    let mut binds = Vec::new();
    let (mut clause, activity) = match version {
        SchemaVersion::V2 => {
            binds.extend([as_of, cutoff]);
            (
                "expires_at < ? OR (is_active = FALSE AND last_activity < ?)".to_string(),
                "last_activity",
            )
        }
        SchemaVersion::V1 => {
            binds.push(cutoff);
            (
                "updated_at IS NULL OR updated_at < ?".to_string(),
                "updated_at",
            )
        }
    };
    if with_users {
        clause.push_str(
            " OR user_id NOT IN (SELECT id FROM users WHERE is_active IS NULL OR is_active = TRUE)",
        );
    }
    if let Some(h) = idle_hours {
        clause.push_str(&format!(" OR {activity} < ?"));
        binds.push(as_of - ChronoDuration::hours(h));
    }
    let sql = db.sql(format!(
        "SELECT {} FROM user_sessions WHERE {clause}",
        big(db.engine(), "id")
    ));
    sessionfleet::on_pool!(db, p => {
        let mut q = sqlx::query_scalar::<_, i64>(sql);
        for b in &binds {
            q = q.bind(*b);
        }
        q.fetch_all(p).await.expect("oracle").into_iter().collect()
    })
}

/// Ids pointing at a platform that does not exist.
async fn missing_platform_ids(db: &Db) -> BTreeSet<i64> {
    let sql = db.sql(format!(
        "SELECT {} FROM user_sessions WHERE active_platform_id IS NOT NULL AND active_platform_id NOT IN (SELECT id FROM platform_connections)",
        big(db.engine(), "id")
    ));
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).fetch_all(p).await.expect("missing platforms").into_iter().collect())
}

/// Every session row, by id, as comparable text.
async fn snapshot(db: &Db, version: SchemaVersion) -> BTreeMap<i64, String> {
    let e = db.engine();
    let v2 = if version == SchemaVersion::V2 {
        ", last_activity, expires_at, is_active"
    } else {
        ""
    };
    let sql = db.sql(format!(
        "SELECT {}, session_id, {}, {}, updated_at{v2} FROM user_sessions",
        big(e, "id"),
        big(e, "user_id"),
        big(e, "active_platform_id")
    ));
    sessionfleet::on_pool!(db, p => {
        sqlx::query(sql).fetch_all(p).await.expect("snapshot").iter().map(|r| {
            let mut s = format!(
                "{}|{:?}|{:?}|{}",
                r.get::<String, _>(1), r.get::<Option<i64>, _>(2), r.get::<Option<i64>, _>(3), r.get::<NaiveDateTime, _>(4)
            );
            if version == SchemaVersion::V2 {
                s.push_str(&format!("|{}|{}|{}", r.get::<NaiveDateTime, _>(5), r.get::<NaiveDateTime, _>(6), r.get::<bool, _>(7)));
            }
            (r.get::<i64, _>(0), s)
        }).collect()
    })
}

async fn labels_left(db: &Db) -> BTreeSet<String> {
    let sql = db.sql("SELECT session_id FROM user_sessions WHERE user_id >= 900000");
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, String>(sql).fetch_all(p).await.expect("labels").into_iter().collect())
}

/// Whether the server is configured to refresh statistics after large changes by itself.
async fn engine_refreshes_statistics(db: &Db) -> bool {
    let sql = match db.engine() {
        Engine::Sqlite => return false,
        Engine::Postgres => {
            "SELECT CAST(CASE WHEN setting = 'on' THEN 1 ELSE 0 END AS BIGINT) FROM pg_settings WHERE name = 'autovacuum'"
        }
        Engine::MySql => "SELECT CAST(@@GLOBAL.innodb_stats_auto_recalc AS SIGNED)",
    };
    let on: i64 = sessionfleet::on_pool!(db, p => sqlx::query_scalar(sql).fetch_one(p).await.expect("read the setting"));
    on == 1
}

async fn ctx(db: &Db) -> OpContext {
    let fence = fence::issue_token(db, "target:test", "cleanup-test")
        .await
        .expect("token");
    OpContext {
        db: db.clone(),
        fence: Some(fence),
        cancel: CancellationToken::new(),
        progress: Default::default(),
    }
}

/// A dry run with the tests' parameters.
async fn dry_run(db: &Db) -> CleanupReport {
    cleanup::run(
        &read_only(db),
        &CleanupParams {
            dry_run: true,
            ..params()
        },
    )
    .await
    .expect("dry run")
}

fn read_only(db: &Db) -> OpContext {
    OpContext {
        db: db.clone(),
        fence: None,
        cancel: CancellationToken::new(),
        progress: Default::default(),
    }
}

/// `before` minus `purged`, every kept row byte-for-byte unchanged.
fn assert_exactly_purged(
    before: &BTreeMap<i64, String>,
    after: &BTreeMap<i64, String>,
    purged: &BTreeSet<i64>,
    what: &str,
) {
    let expected: BTreeMap<i64, String> = before
        .iter()
        .filter(|(id, _)| !purged.contains(id))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let deleted_wrongly: Vec<_> = expected
        .keys()
        .filter(|id| !after.contains_key(id))
        .collect();
    let kept_wrongly: Vec<_> = after.keys().filter(|id| purged.contains(id)).collect();
    assert!(
        deleted_wrongly.is_empty(),
        "{what}: rows outside the oracle deleted: {deleted_wrongly:?}"
    );
    assert!(
        kept_wrongly.is_empty(),
        "{what}: oracle rows kept: {kept_wrongly:?}"
    );
    assert_eq!(&expected, after, "{what}: a kept row changed");
}

#[tokio::test]
async fn deletes_exactly_the_oracle_set_and_dry_run_predicts_it() {
    for engine in ENGINES {
        for version in VERSIONS {
            let what = format!("{engine} {version}");
            let tdb = seeded(engine, version).await;
            let db = &tdb.db;
            let before = snapshot(db, version).await;
            let purge = oracle(db, version, None, true).await;
            assert!(
                purge.len() > SESSIONS as usize / 3,
                "{what}: demo data has plenty to purge"
            );

            let dry = dry_run(db).await;
            assert!(dry.dry_run);
            assert_eq!(
                snapshot(db, version).await,
                before,
                "{what}: dry run changed rows"
            );
            assert_eq!(
                dry.total_cleaned(),
                purge.len() as u64,
                "{what}: dry-run count"
            );

            let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
            let after = snapshot(db, version).await;
            assert_exactly_purged(&before, &after, &purge, &what);
            assert_eq!(report.outcome, Outcome::Completed, "{what}");
            assert_eq!(report.remaining, Some(0), "{what}");
            assert_eq!(report.as_of, t0(), "{what}");
            assert_eq!(
                report.total_cleaned(),
                purge.len() as u64,
                "{what}: reported count"
            );
            assert_eq!(
                report.rules, dry.rules,
                "{what}: per-rule counts, dry vs real"
            );
            assert!(
                report.orphaned_sessions_cleaned >= 2,
                "{what}: the deactivated and the missing user's sessions"
            );
            assert!(
                report.batches > 3,
                "{what}: worked in batches ({})",
                report.batches
            );
            // After a large purge, statistics are refreshed: by us, or — where the engine
            // refreshes them by itself (PostgreSQL autovacuum, InnoDB auto-recalc) — by the
            // engine, which we leave to it and say so.
            if !engine_refreshes_statistics(db).await {
                assert!(
                    report.database_optimizations >= 1,
                    "{what}: statistics refreshed after a large purge"
                );
            } else {
                assert_eq!(report.database_optimizations, 0, "{what}");
                assert!(
                    report.notes.iter().any(|n| n.contains("automatic")),
                    "{what}: says who refreshes statistics: {:?}",
                    report.notes
                );
            }
            assert!(report.forced_cleanup.is_none());

            // Edge rows: exactly the ones marked to purge are gone.
            let left = labels_left(db).await;
            for e in edges(version) {
                assert_eq!(
                    !left.contains(e.label),
                    e.purge,
                    "{what}: edge row {}",
                    e.label
                );
            }
            // Missing-platform sessions: counted and kept.
            let missing_kept: BTreeSet<i64> = missing_platform_ids(db).await;
            assert!(
                !missing_kept.is_empty(),
                "{what}: the hand-made missing-platform row is kept"
            );
            assert_eq!(
                report.missing_platform_sessions,
                Some(missing_kept.len() as u64),
                "{what}: missing-platform count"
            );
            assert_eq!(
                dry.missing_platform_sessions, report.missing_platform_sessions,
                "{what}"
            );
            tdb.drop_db().await;
        }
    }
}

/// Tables of the application that point at sessions: an audit log with the default delete
/// rule (NO ACTION), orders that RESTRICT, notes that CASCADE.
async fn add_referencing_tables(db: &Db) {
    for (table, rule) in [
        ("session_audit", ""),
        ("session_orders", " ON DELETE RESTRICT"),
        ("session_notes", " ON DELETE CASCADE"),
    ] {
        db.execute(&format!(
            "CREATE TABLE {table} (id INTEGER NOT NULL PRIMARY KEY, session_ref INTEGER NOT NULL, \
             FOREIGN KEY (session_ref) REFERENCES user_sessions (id){rule})"
        ))
        .await
        .expect("create a referencing table");
    }
}

async fn insert_references(db: &Db, table: &str, ids: &[i64]) {
    for (n, id) in ids.iter().enumerate() {
        db.execute(&format!(
            "INSERT INTO {table} (id, session_ref) VALUES ({}, {id})",
            n + 1
        ))
        .await
        .expect("insert a reference");
    }
}

/// Every session's id.
async fn session_ids(db: &Db) -> BTreeSet<i64> {
    let sql = db.sql(format!(
        "SELECT {} FROM user_sessions",
        big(db.engine(), "id")
    ));
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).fetch_all(p).await.expect("session ids").into_iter().collect())
}

async fn ids_in(db: &Db, table: &str) -> BTreeSet<i64> {
    let sql = db.sql(format!(
        "SELECT {} FROM {table}",
        big(db.engine(), "session_ref")
    ));
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).fetch_all(p).await.expect("references").into_iter().collect())
}

/// A session due for cleanup that another row still points at through a foreign key whose
/// delete rule forbids the delete is kept and counted, on every engine and schema, while the
/// rest of the oracle set goes; a CASCADE key takes its rows along where the engine enforces
/// it. Once the references are gone, the next run deletes those sessions. Fails without the
/// feature: on PostgreSQL and MariaDB the first batch holding such a session fails, on every
/// run; on SQLite the sessions were deleted, leaving the references dangling.
#[tokio::test]
async fn sessions_still_referenced_are_kept_counted_and_go_with_their_references() {
    for engine in ENGINES {
        for version in VERSIONS {
            let what = format!("{engine} {version}");
            let tdb = seeded(engine, version).await;
            let db = &tdb.db;
            add_referencing_tables(db).await;
            let purge: Vec<i64> = oracle(db, version, None, true).await.into_iter().collect();
            let every_fifth = |offset: usize| -> Vec<i64> {
                purge.iter().skip(offset).step_by(5).copied().collect()
            };
            let (audited, ordered, noted) = (every_fifth(0), every_fifth(1), every_fifth(2));
            let live = snapshot(db, version)
                .await
                .into_keys()
                .find(|id| !purge.contains(id))
                .expect("a live session");
            insert_references(db, "session_audit", &audited).await;
            insert_references(db, "session_orders", &ordered).await;
            insert_references(db, "session_notes", &[&noted[..], &[live]].concat()).await;
            let kept: BTreeSet<i64> = audited.iter().chain(&ordered).copied().collect();
            let first: BTreeSet<i64> = purge
                .iter()
                .filter(|id| !kept.contains(id))
                .copied()
                .collect();
            let before = snapshot(db, version).await;

            let dry = dry_run(db).await;
            assert_eq!(
                dry.total_cleaned(),
                first.len() as u64,
                "{what}: dry-run count"
            );
            assert_eq!(
                dry.referenced_sessions_kept,
                Some(kept.len() as u64),
                "{what}: dry run"
            );
            let stats = cleanup::stats(db, &params()).await.expect("stats");
            assert_eq!(
                stats.referenced_sessions_kept,
                Some(kept.len() as u64),
                "{what}: stats"
            );

            // A part cut by its budget counts what a continuation can delete: not the
            // sessions the references keep.
            let part = cleanup::run(
                &ctx(db).await,
                &CleanupParams {
                    batch_size: 1,
                    max_batch_size: 1,
                    budget_secs: Some(0),
                    ..params()
                },
            )
            .await
            .expect("a budgeted part");
            assert_eq!(part.outcome, Outcome::BudgetSpent, "{what}");
            assert_eq!(
                part.remaining,
                Some(first.len() as u64 - part.total_cleaned()),
                "{what}: remaining"
            );

            let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
            assert_eq!(
                report.outcome,
                Outcome::Completed,
                "{what}: {:?}",
                report.errors
            );
            assert!(report.errors.is_empty(), "{what}: {:?}", report.errors);
            assert_exactly_purged(&before, &snapshot(db, version).await, &first, &what);
            assert_eq!(
                report.total_cleaned() + part.total_cleaned(),
                first.len() as u64,
                "{what}"
            );
            assert_eq!(
                report.referenced_sessions_kept,
                Some(kept.len() as u64),
                "{what}"
            );
            assert!(
                report
                    .notes
                    .iter()
                    .any(|n| n.contains("session_orders") && n.contains("session_audit")),
                "{what}: the note names the keys: {:?}",
                report.notes
            );
            // SQLite's connections leave foreign keys off: no cascade there.
            let notes_left: BTreeSet<i64> = match engine {
                Engine::Sqlite => noted.iter().copied().chain([live]).collect(),
                _ => BTreeSet::from([live]),
            };
            assert_eq!(
                ids_in(db, "session_notes").await,
                notes_left,
                "{what}: the CASCADE key's rows went with their sessions where enforced"
            );

            db.execute("DELETE FROM session_audit")
                .await
                .expect("clear");
            db.execute("DELETE FROM session_orders")
                .await
                .expect("clear");
            let before = snapshot(db, version).await;
            let report = cleanup::run(&ctx(db).await, &params())
                .await
                .expect("second run");
            assert_exactly_purged(&before, &snapshot(db, version).await, &kept, &what);
            assert_eq!(
                report.referenced_sessions_kept,
                Some(0),
                "{what}: nothing kept"
            );
            tdb.drop_db().await;
        }
    }
}

/// A key from the session table to itself (a parent session) keeps an expired parent while a
/// live child points at it, on PostgreSQL, SQLite and MariaDB. MySQL cannot read the table a
/// DELETE deletes from, so there the key is named in the schema's notes instead of probed.
#[tokio::test]
async fn a_session_referenced_by_another_session_is_kept_where_the_engine_can_probe_it() {
    for engine in ENGINES {
        let what = engine.to_string();
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let add = match engine {
            Engine::MySql => {
                "ALTER TABLE user_sessions ADD COLUMN parent_id INTEGER NULL, \
                 ADD CONSTRAINT fk_parent FOREIGN KEY (parent_id) REFERENCES user_sessions (id)"
            }
            _ => {
                "ALTER TABLE user_sessions ADD COLUMN parent_id INTEGER NULL REFERENCES user_sessions (id)"
            }
        };
        db.execute(add).await.expect("add the parent key");
        let schema = sessionfleet::store::schema::detect(db)
            .await
            .expect("schema");
        let mysql_proper = engine == Engine::MySql
            && !db
                .describe()
                .await
                .expect("describe")
                .version
                .to_ascii_lowercase()
                .contains("mariadb");
        if mysql_proper {
            assert!(schema.references.is_empty(), "{what}");
            assert!(
                schema
                    .notes
                    .iter()
                    .any(|n| n.contains("to itself") && n.contains("parent_id")),
                "{what}: {:?}",
                schema.notes
            );
            tdb.drop_db().await;
            continue;
        }
        assert_eq!(schema.references.len(), 1, "{what}");
        let purge = oracle(db, SchemaVersion::V2, None, true).await;
        let parent = *purge.iter().next().expect("an expired session");
        let child = snapshot(db, SchemaVersion::V2)
            .await
            .into_keys()
            .find(|id| !purge.contains(id))
            .expect("a live session");
        db.execute(&format!(
            "UPDATE user_sessions SET parent_id = {parent} WHERE id = {child}"
        ))
        .await
        .expect("link");
        let before = snapshot(db, SchemaVersion::V2).await;
        let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
        let mut gone = purge.clone();
        gone.remove(&parent);
        assert_exactly_purged(
            &before,
            &snapshot(db, SchemaVersion::V2).await,
            &gone,
            &what,
        );
        assert_eq!(report.referenced_sessions_kept, Some(1), "{what}");
        tdb.drop_db().await;
    }
}

/// A key on a table the cleanup's database user may not read is named in the schema's notes
/// and left out of the rules: PostgreSQL checks a key as the referencing table's owner, so
/// such a user could always delete, and a probe it may not run would fail every batch. Fails
/// if the unreadable table's key is probed ("permission denied" on every run).
#[tokio::test]
async fn a_key_on_a_table_the_cleanup_may_not_read_is_noted_not_probed() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = &tdb.db;
    add_referencing_tables(db).await;
    let role = format!(
        "sf_cleaner_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    for stmt in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT ALL ON SCHEMA public TO {role}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"),
        format!("REVOKE ALL ON session_audit FROM {role}"),
    ] {
        db.execute(&stmt).await.expect("role setup");
    }
    // The same server and database, as the new role (trust authentication here).
    let (scheme, rest) = tdb.url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://{role}@{host}");
    let cleaner = Db::connect(&url, &sessionfleet::store::ConnectOptions::default())
        .await
        .expect("connect as the cleanup role");
    let schema = sessionfleet::store::schema::detect(&cleaner)
        .await
        .expect("schema");
    let probed: Vec<&str> = schema.references.iter().map(|r| r.table.as_str()).collect();
    assert!(
        probed.iter().any(|t| t.contains("session_orders"))
            && !probed.iter().any(|t| t.contains("session_audit")),
        "{probed:?}"
    );
    assert!(
        schema
            .notes
            .iter()
            .any(|n| n.contains("session_audit") && n.contains("cannot read")),
        "{:?}",
        schema.notes
    );
    let purge = oracle(db, SchemaVersion::V2, None, true).await;
    let before = snapshot(db, SchemaVersion::V2).await;
    let report = cleanup::run(&ctx(&cleaner).await, &params())
        .await
        .expect("the run as the cleanup role");
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    assert_exactly_purged(
        &before,
        &snapshot(db, SchemaVersion::V2).await,
        &purge,
        "postgres",
    );
    cleaner.close().await;
    for stmt in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        db.execute(&stmt).await.expect("role teardown");
    }
    tdb.drop_db().await;
}

/// A CASCADE key into a table whose own restricting key points at the cascaded rows makes the
/// database refuse a delete the rules cannot foresee. The batch is tried again once (a
/// reference committed meanwhile would be gone from the candidates then), and the second
/// refusal ends the part with the database's error, which names the key, and the earlier
/// batches counted. Fails if such a refusal is retried like a lost connection (five times).
#[tokio::test]
async fn a_refusal_the_rules_cannot_foresee_is_retried_once_then_named() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = &tdb.db;
    add_referencing_tables(db).await;
    db.execute(
        "CREATE TABLE note_items (id INTEGER NOT NULL PRIMARY KEY, note_id INTEGER NOT NULL, \
         CONSTRAINT fk_note_items_note FOREIGN KEY (note_id) REFERENCES session_notes (id))",
    )
    .await
    .expect("create");
    let purge = oracle(db, SchemaVersion::V2, None, true).await;
    let last = *purge.iter().next_back().expect("a session to purge");
    insert_references(db, "session_notes", &[last]).await;
    db.execute("INSERT INTO note_items (id, note_id) VALUES (1, 1)")
        .await
        .expect("insert");
    let report = cleanup::run(&ctx(db).await, &params())
        .await
        .expect("earlier batches committed: the part reports");
    assert_eq!(report.outcome, Outcome::Interrupted, "{report:?}");
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("fk_note_items_note")),
        "{:?}",
        report.errors
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains(": 1 batch attempt(s)")),
        "retried once: {:?}",
        report.notes
    );
    tdb.drop_db().await;
}

/// On MariaDB a unique key may share its name with a foreign key of the same table; the
/// catalog join then returns a row without a referenced column. The key is still found, with
/// its columns. Fails if that row costs the key.
#[tokio::test]
async fn a_foreign_key_named_like_a_unique_key_is_still_read_on_mariadb() {
    let tdb = seeded(Engine::MySql, SchemaVersion::V2).await;
    let db = &tdb.db;
    db.execute(
        "CREATE TABLE session_tags (id INTEGER NOT NULL PRIMARY KEY, sid INTEGER NOT NULL, \
         UNIQUE KEY fk_tag (sid), \
         CONSTRAINT fk_tag FOREIGN KEY (sid) REFERENCES user_sessions (id))",
    )
    .await
    .expect("create");
    let schema = sessionfleet::store::schema::detect(db)
        .await
        .expect("schema");
    assert_eq!(
        schema.references.len(),
        1,
        "{:?} {:?}",
        schema.references,
        schema.notes
    );
    assert_eq!(
        schema.references[0].columns,
        vec![("`sid`".to_string(), "`id`".to_string())]
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn forced_idle_rule_matches_the_oracle() {
    for engine in ENGINES {
        for version in VERSIONS {
            let what = format!("{engine} {version} forced 12 h");
            let tdb = seeded(engine, version).await;
            let db = &tdb.db;
            let before = snapshot(db, version).await;
            let purge = oracle(db, version, Some(12), true).await;
            let without_force = oracle(db, version, None, true).await;
            assert!(
                purge.len() > without_force.len(),
                "{what}: the idle rule adds rows"
            );
            let p = CleanupParams {
                force: true,
                force_max_age_hours: Some(12),
                ..params()
            };
            let dry = cleanup::run(
                &read_only(db),
                &CleanupParams {
                    dry_run: true,
                    ..p.clone()
                },
            )
            .await
            .expect("dry run");
            let report = cleanup::run(&ctx(db).await, &p).await.expect("run");
            assert_exactly_purged(&before, &snapshot(db, version).await, &purge, &what);
            assert_eq!(report.rules, dry.rules, "{what}");
            assert!(report.rules.idle > 0, "{what}: idle rule counted");
            assert_eq!(report.forced_cleanup, Some(true));
            assert_eq!(report.custom_max_age_hours, Some(12));
            tdb.drop_db().await;
        }
    }
}

#[tokio::test]
async fn cancelled_then_resumed_ends_like_an_uninterrupted_run() {
    for engine in ENGINES {
        let version = SchemaVersion::V2;
        let whole = seeded(engine, version).await;
        cleanup::run(&ctx(&whole.db).await, &params())
            .await
            .expect("uninterrupted run");
        let expected = snapshot(&whole.db, version).await;

        let split = seeded(engine, version).await;
        let db = split.db.clone();
        let initial = snapshot(&db, version).await.len();
        let to_purge = oracle(&db, version, None, true).await.len() as u64;
        let c = ctx(&db).await;
        // Cancel once a few one-row batches have committed.
        let watcher = {
            let (db, cancel) = (db.clone(), c.cancel.clone());
            tokio::spawn(async move {
                loop {
                    let n = db
                        .scalar_i64("SELECT COUNT(*) FROM user_sessions")
                        .await
                        .expect("count");
                    if (n as usize) + 3 <= initial {
                        cancel.cancel();
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let one_row = CleanupParams {
            batch_size: 1,
            max_batch_size: 1,
            ..params()
        };
        let first = cleanup::run(&c, &one_row).await.expect("first part");
        watcher.await.expect("watcher");
        assert_eq!(
            first.outcome,
            Outcome::Cancelled,
            "{engine}: cut by cancellation"
        );
        assert!(
            first.total_cleaned() >= 3 && first.total_cleaned() < to_purge,
            "{engine}: {first:?}"
        );
        assert_eq!(
            first.remaining, None,
            "{engine}: a cancelled part stops without counting what is left"
        );
        let resumed = CleanupParams {
            as_of: Some(first.as_of),
            ..params()
        };
        let second = cleanup::run(&ctx(&db).await, &resumed)
            .await
            .expect("resumed part");
        assert_eq!(second.outcome, Outcome::Completed);
        assert_eq!(
            first.total_cleaned() + second.total_cleaned(),
            to_purge,
            "{engine}: the parts together purged exactly the oracle's rows"
        );
        assert_eq!(
            snapshot(&db, version).await,
            expected,
            "{engine}: same final state"
        );
        whole.drop_db().await;
        split.drop_db().await;
    }
}

#[tokio::test]
async fn budget_stop_reports_remaining_and_continuations_finish_the_job() {
    for engine in ENGINES {
        let version = SchemaVersion::V1;
        let tdb = seeded(engine, version).await;
        let db = &tdb.db;
        let before = snapshot(db, version).await;
        let purge = oracle(db, version, None, true).await;
        let c = ctx(db).await;
        let tiny = CleanupParams {
            batch_size: 1,
            max_batch_size: 1,
            budget_secs: Some(0),
            ..params()
        };
        let first = cleanup::run(&c, &tiny).await.expect("first part");
        assert_eq!(first.outcome, Outcome::BudgetSpent, "{engine}");
        assert_eq!(
            first.batches, 1,
            "{engine}: a zero budget still makes one batch of progress"
        );
        assert_eq!(first.total_cleaned(), 1);
        assert_eq!(
            first.remaining,
            Some(purge.len() as u64 - 1),
            "{engine}: remaining"
        );

        // Continuations with a larger batch until done; the merged report covers the run.
        let mut merged: CleanupReport = first.clone();
        let next = CleanupParams {
            batch_size: 50,
            max_batch_size: 50,
            as_of: Some(first.as_of),
            ..tiny
        };
        for _ in 0..100 {
            let part = cleanup::run(&c, &next).await.expect("continuation");
            merged.merge(&part);
            if part.outcome == Outcome::Completed {
                break;
            }
        }
        assert_eq!(merged.outcome, Outcome::Completed, "{engine}");
        assert_eq!(
            merged.total_cleaned(),
            purge.len() as u64,
            "{engine}: merged count"
        );
        assert_exactly_purged(
            &before,
            &snapshot(db, version).await,
            &purge,
            &format!("{engine} budgeted"),
        );
        tdb.drop_db().await;
    }
}

/// A run cut by its budget into parts that each delete far less than the refresh share
/// (`ANALYZE_AFTER_SHARE_PCT`) still refreshes statistics once the parts together have:
/// each continuation carries the deletes no refresh has seen.
#[tokio::test]
async fn small_budgeted_parts_refresh_statistics_once_their_purge_together_is_large() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let table = db
            .scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .expect("count") as u64;
        let purge = oracle(db, SchemaVersion::V2, None, true).await.len() as u64;
        // At most 8 rows a part: under 8 % of any table this run leaves (over 100 rows).
        let per_part = 8;
        assert!(
            table - purge > 100,
            "{engine}: {table} rows, {purge} to purge"
        );
        let c = ctx(db).await;
        let mut p = CleanupParams {
            batch_size: per_part,
            max_batch_size: per_part,
            budget_secs: Some(0),
            ..params()
        };
        let (mut parts, mut refreshing_parts) = (0, 0);
        let mut merged: Option<CleanupReport> = None;
        for _ in 0..200 {
            let part = cleanup::run(&c, &p).await.expect("part");
            parts += 1;
            assert!(part.total_cleaned() <= u64::from(per_part), "{engine}");
            if part.database_optimizations > 0 {
                refreshing_parts += 1;
            }
            let done = part.outcome == Outcome::Completed;
            p = p.continuation(&part);
            match &mut merged {
                Some(m) => m.merge(&part),
                None => merged = Some(part),
            }
            if done {
                break;
            }
        }
        let merged = merged.expect("at least one part");
        assert_eq!(merged.outcome, Outcome::Completed, "{engine}");
        assert_eq!(merged.total_cleaned(), purge, "{engine}");
        if engine_refreshes_statistics(db).await {
            assert!(
                merged.notes.iter().any(|n| n.contains("automatic")),
                "{engine}: says the engine refreshes statistics: {:?}",
                merged.notes
            );
        } else {
            assert!(
                refreshing_parts >= 1,
                "{engine}: no part of {parts} refreshed statistics after {purge} of {table} rows"
            );
            assert!(
                refreshing_parts * 3 < parts,
                "{engine}: refreshes only once enough is carried, not every part ({refreshing_parts} of {parts})"
            );
        }
        tdb.drop_db().await;
    }
}

/// One-row batches with rests: a run of a few hundred short transactions, long enough to
/// act on while it runs.
fn one_row_batches() -> CleanupParams {
    CleanupParams {
        batch_size: 1,
        max_batch_size: 1,
        rest_ratio: Some(2.0),
        ..params()
    }
}

/// Waits until the sessions table holds fewer than `seeded` rows: a batch has committed.
async fn until_a_batch_committed(db: &Db, seeded: usize) {
    let started = std::time::Instant::now();
    while db
        .scalar_i64("SELECT COUNT(*) FROM user_sessions")
        .await
        .expect("count")
        == seeded as i64
    {
        assert!(started.elapsed() < Duration::from_secs(60), "no batch");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Starts a run of one-row batches on `db` (holding `seeded` rows) and returns once its
/// first batch has committed, with the run still going.
async fn a_slow_run_under_way(
    db: &Db,
    seeded: usize,
) -> tokio::task::JoinHandle<Result<cleanup::CleanupReport, sessionfleet::ops::OpError>> {
    a_slow_part_under_way(db, seeded, one_row_batches()).await
}

/// [`a_slow_run_under_way`] with `params` (one-row batches or others as slow).
async fn a_slow_part_under_way(
    db: &Db,
    seeded: usize,
    params: CleanupParams,
) -> tokio::task::JoinHandle<Result<cleanup::CleanupReport, sessionfleet::ops::OpError>> {
    let c = ctx(db).await;
    let run = tokio::spawn(async move { cleanup::run(&c, &params).await });
    until_a_batch_committed(db, seeded).await;
    assert!(!run.is_finished(), "the run ended after its first batch");
    run
}

/// Connections dropped under a run (a failover, a proxy restart) cost retries, not the run:
/// a batch is tried again on a fresh connection, and the run purges exactly what an
/// uninterrupted one does, with its retries in the report. The kills land on batches caught
/// waiting for a row lock the test holds, so each one breaks a batch in flight (a kill aimed
/// at whatever statement was running could land after it ended, on an idle pooled connection
/// the pool replaces without an error to report).
#[tokio::test]
async fn a_run_whose_connections_are_killed_retries_and_completes() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let version = SchemaVersion::V2;
        let tdb = seeded(engine, version).await;
        let db = tdb.db.clone();
        let before = snapshot(&db, version).await;
        let purge = oracle(&db, version, None, true).await;
        let killer = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
            .await
            .expect("killer connection");
        let run = a_slow_run_under_way(&db, before.len()).await;
        let rows = HeldLock::every_session(&tdb.url).await;
        let started = std::time::Instant::now();
        let mut killed = 0;
        while killed < 3 && !run.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{engine}: no batch waited for the locked rows"
            );
            killed += kill_lock_waiters(&killer).await;
            // InnoDB refreshes its transaction table for readers at most every 100 ms.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        rows.release().await;
        let report = run
            .await
            .expect("task")
            .expect("the run survives its killed connections");
        assert!(killed >= 3, "{engine}: the run ended after {killed} kills");
        assert_eq!(report.outcome, Outcome::Completed, "{engine}");
        assert_exactly_purged(
            &before,
            &snapshot(&db, version).await,
            &purge,
            &format!("{engine} with killed connections"),
        );
        // Every kill broke a batch before its COMMIT, so every deleted row is counted.
        assert_eq!(report.total_cleaned(), purge.len() as u64, "{engine}");
        assert!(
            report.notes.iter().any(|n| n.contains("were retried")),
            "{engine}: the retries are reported: notes {:?}, errors {:?}",
            report.notes,
            report.errors
        );
        killer.close().await;
        tdb.drop_db().await;
    }
}

/// On SQLite each batch holds the write lock for its own statement only: an application
/// writer waiting with an ordinary busy timeout (5 s) never fails with "database is locked",
/// and it gets in between batches, not only after the whole purge. Each of the application's
/// writes logs how many sessions it saw; a purge that held the lock throughout (one
/// statement, or one transaction) would leave only the first and last counts in that log.
#[tokio::test]
async fn sqlite_application_writers_get_in_between_batches_and_never_fail() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::str::FromStr;
    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::Sqlite, version).await;
    let db = tdb.db.clone();
    let before = snapshot(&db, version).await;
    let purge = oracle(&db, version, None, true).await;
    db.execute("CREATE TABLE app_log (seen INTEGER NOT NULL)")
        .await
        .expect("log table");
    let app = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(&tdb.url)
                .expect("url")
                .busy_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("application connection");
    let live = *before
        .keys()
        .find(|id| !purge.contains(id))
        .expect("a live session");
    let stop = CancellationToken::new();
    let writer = tokio::spawn({
        let (app, stop) = (app.clone(), stop.clone());
        async move {
            let mut failures = Vec::new();
            while !stop.is_cancelled() {
                let write = async {
                    let mut tx = app.begin_with("BEGIN IMMEDIATE").await?;
                    sqlx::query(
                        "UPDATE user_sessions SET last_activity = last_activity WHERE id = ?",
                    )
                    .bind(live)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("INSERT INTO app_log (seen) SELECT COUNT(*) FROM user_sessions")
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await
                };
                if let Err(e) = write.await {
                    failures.push(e.to_string());
                }
                tokio::task::yield_now().await;
            }
            failures
        }
    });
    let c = ctx(&db).await;
    let report = cleanup::run(&c, &one_row_batches()).await.expect("run");
    stop.cancel();
    let failures = writer.await.expect("writer");
    assert!(
        failures.is_empty(),
        "application writes failed: {failures:?}"
    );
    assert_eq!(report.outcome, Outcome::Completed);
    let after = snapshot(&db, version).await;
    assert_exactly_purged(
        &before,
        &after,
        &purge,
        "sqlite beside an application writer",
    );
    let seen: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT seen FROM app_log")
        .fetch_all(&app)
        .await
        .expect("log");
    let (first, last) = (before.len() as i64, after.len() as i64);
    let between = seen.iter().filter(|&&n| n < first && n > last).count();
    assert!(
        between >= 2,
        "the application wrote only before or after the purge ({first} to {last}); it saw {seen:?}"
    );
    app.close().await;
    tdb.drop_db().await;
}

/// The server sessions of this database that wait for a table lock.
async fn lock_waiters(db: &Db) -> i64 {
    db.scalar_i64(match db.engine() {
        Engine::Postgres => {
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'"
        }
        Engine::MySql => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND STATE LIKE 'Waiting for table%'"
        }
        Engine::Sqlite => unreachable!("SQLite has no server sessions"),
    })
    .await
    .expect("lock waiters")
}

/// Ends the server sessions of this database that wait for a table or row lock; how many
/// were ended (a session that ended meanwhile is not counted).
async fn kill_lock_waiters(killer: &Db) -> usize {
    match killer.engine() {
        // The call in the select list runs only for the rows the inner query keeps.
        Engine::Postgres => killer
            .scalar_i64(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) AS ended \
                 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()) waiters \
                 WHERE ended",
            )
            .await
            .expect("terminate") as usize,
        Engine::MySql => {
            // A table lock's waiters show in the processlist, a row lock's in InnoDB's
            // transactions.
            let sql = "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
                       WHERE DB = DATABASE() AND (STATE LIKE 'Waiting for table%' OR ID IN \
                       (SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX \
                        WHERE trx_state = 'LOCK WAIT'))";
            let ids: Vec<i64> = sessionfleet::on_pool!(killer, p => sqlx::query_scalar(sql)
                .fetch_all(p).await.expect("processlist"));
            let mut ended = 0;
            for id in &ids {
                // It may have ended meanwhile.
                if killer
                    .execute(&format!("KILL CONNECTION {id}"))
                    .await
                    .is_ok()
                {
                    ended += 1;
                }
            }
            ended
        }
        Engine::Sqlite => unreachable!("SQLite has no server sessions to end"),
    }
}

/// Runs `work` while the sessions table is locked, ends its server sessions twice as they wait
/// for the lock, then releases the lock and returns what `work` returned.
async fn with_connections_killed_twice<T: Send + 'static>(
    tdb: &TestDb,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let killer = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
        .await
        .expect("killer connection");
    let lock = HeldLock::sessions_table(&tdb.url).await;
    let run = tokio::spawn(work);
    let started = std::time::Instant::now();
    let mut killed = 0;
    while killed < 2 {
        assert!(
            !run.is_finished(),
            "{}: the work ended before it was killed twice",
            tdb.engine()
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}: nothing waited for the lock",
            tdb.engine()
        );
        if kill_lock_waiters(&killer).await > 0 {
            killed += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.release().await;
    killer.close().await;
    run.await.expect("task")
}

/// A run waiting for a rule's count — a long read on a large table, or one stuck behind a
/// table lock — stops as soon as it is cancelled (a shutdown, a lost lease), with nothing
/// deleted, instead of waiting for the count, and the count it gave up ends on the server
/// too instead of running on with its snapshot. Fails if the run waits for the lock's
/// release, or if its count still waits for the lock after the run has ended (on PostgreSQL:
/// MariaDB also ends a waiting statement whose client has gone, so there only the first
/// holds; `store` tests the cancel itself on both).
#[tokio::test]
async fn a_run_cancelled_while_it_counts_stops_without_waiting_for_the_count() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let before = snapshot(&tdb.db, SchemaVersion::V2).await;
        let watcher = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
            .await
            .expect("watcher connection");
        let c = ctx(&tdb.db).await;
        let cancel = c.cancel.clone();
        let lock = HeldLock::sessions_table(&tdb.url).await;
        let run = tokio::spawn(async move { cleanup::run(&c, &params()).await });
        let started = std::time::Instant::now();
        while lock_waiters(&watcher).await == 0 {
            assert!(
                !run.is_finished(),
                "{engine}: the run ended before it counted"
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{engine}: no count waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        // The lock is still held: a run that waits for its count cannot end (the guard only
        // keeps a broken build from hanging the suite).
        let report = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("a cancelled run ends while its count still waits for the lock")
            .expect("task")
            .expect("run");
        // Still locked: only a cancel on the server ends the count's wait.
        let gave_up = std::time::Instant::now();
        while lock_waiters(&watcher).await > 0 {
            assert!(
                gave_up.elapsed() < Duration::from_secs(30),
                "{engine}: the run's abandoned read still waits for the lock on the server"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lock.release().await;
        assert_eq!(report.outcome, Outcome::Cancelled, "{engine}");
        assert_eq!(report.total_cleaned(), 0, "{engine}");
        assert_eq!(
            snapshot(&tdb.db, SchemaVersion::V2).await,
            before,
            "{engine}: nothing deleted"
        );
        watcher.close().await;
        tdb.drop_db().await;
    }
}

/// A dry run and the statistics read only, so a dropped connection under them (a failover, a
/// proxy restart) costs a retry of the statement it broke, not the report: both give the
/// same figures as without the kills.
#[tokio::test]
async fn a_dry_run_and_stats_outlast_connections_killed_under_them() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let dry = CleanupParams {
            dry_run: true,
            ..params()
        };
        let quiet = cleanup::run(&read_only(&tdb.db), &dry)
            .await
            .expect("dry run");
        assert!(quiet.rules.total() > 0, "{engine}: something to count");
        let quiet_stats = cleanup::stats(&tdb.db, &params()).await.expect("stats");

        let (db, p) = (tdb.db.clone(), dry.clone());
        let killed =
            with_connections_killed_twice(
                &tdb,
                async move { cleanup::run(&read_only(&db), &p).await },
            )
            .await
            .expect("the dry run survives its killed connections");
        assert_eq!(killed.rules, quiet.rules, "{engine}: dry-run counts");
        assert_retries_noted(&quiet.notes, &killed.notes, &format!("{engine} dry run"));

        let db = tdb.db.clone();
        let killed =
            with_connections_killed_twice(
                &tdb,
                async move { cleanup::stats(&db, &params()).await },
            )
            .await
            .expect("the statistics survive their killed connections");
        assert_eq!(
            (
                killed.total_sessions,
                killed.old_sessions_48h,
                killed.rules,
                killed.missing_platform_sessions
            ),
            (
                quiet_stats.total_sessions,
                quiet_stats.old_sessions_48h,
                quiet_stats.rules,
                quiet_stats.missing_platform_sessions
            ),
            "{engine}: statistics"
        );
        assert_retries_noted(
            &quiet_stats.notes,
            &killed.notes,
            &format!("{engine} statistics"),
        );
        tdb.drop_db().await;
    }
}

/// A report whose reads were tried again says so; the same report without kills does not.
fn assert_retries_noted(quiet: &[String], killed: &[String], what: &str) {
    let retried = |notes: &[String]| notes.iter().any(|n| n.contains("were retried"));
    assert!(!retried(quiet), "{what}: no retry without kills: {quiet:?}");
    assert!(
        retried(killed),
        "{what}: the retried reads are noted: {killed:?}"
    );
}

/// The missing-platform count is reported, never acted on: when it fails after a completed
/// purge (here its table is gone; on MariaDB it runs after the purge), the purge stands and
/// the report says what failed, instead of the whole run failing uncounted.
#[tokio::test]
async fn a_failed_missing_platform_count_leaves_the_purge_standing() {
    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::MySql, version).await;
    let db = tdb.db.clone();
    let before = snapshot(&db, version).await;
    let purge = oracle(&db, version, None, true).await;
    let run = a_slow_run_under_way(&db, before.len()).await;
    // Sessions still reference it: drop it past the foreign key, on one connection.
    let drop_platforms = "SET foreign_key_checks = 0; DROP TABLE platform_connections; \
                          SET foreign_key_checks = 1";
    sessionfleet::on_pool!(&tdb.db, p => sqlx::raw_sql(drop_platforms).execute(p).await.map(|_| ()))
        .expect("drop the platforms");
    let report = run.await.expect("task").expect("the purge stands");
    assert_eq!(report.outcome, Outcome::Completed);
    assert_exactly_purged(&before, &snapshot(&db, version).await, &purge, "mysql");
    assert_eq!(report.total_cleaned(), purge.len() as u64);
    assert_eq!(report.missing_platform_sessions, None);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("platform is missing") && e.contains("platform_connections")),
        "{:?}",
        report.errors
    );
    tdb.drop_db().await;
}

/// Sessions of this database whose statement waits for a row lock. On MariaDB, a batch
/// DELETE running for over half a second on these few hundred rows: its waiting transaction
/// does not show in `INNODB_TRX` there.
async fn row_lock_waiters(db: &Db) -> i64 {
    db.scalar_i64(match db.engine() {
        Engine::Postgres => {
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'"
        }
        Engine::MySql => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND INFO LIKE 'DELETE FROM user_sessions%' AND TIME_MS > 500"
        }
        Engine::Sqlite => unreachable!("SQLite has no row locks"),
    })
    .await
    .expect("row lock waiters")
}

/// Runs a cleanup while the application's transaction `tx` holds a lock on a session the run
/// will take; commits `tx` once a batch waits for that lock, and returns the completed run's
/// report.
async fn run_until_a_batch_waits_then_commit(
    db: &Db,
    tx: sessionfleet::store::DbTx<'_>,
) -> CleanupReport {
    let engine = db.engine();
    let c = ctx(db).await;
    let run = tokio::spawn(async move { cleanup::run(&c, &params()).await });
    let started = std::time::Instant::now();
    while row_lock_waiters(db).await == 0 {
        assert!(
            !run.is_finished(),
            "{engine}: the run ended without meeting the lock"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{engine}: no batch waited for the application's lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.commit()
        .await
        .expect("commit the application's transaction");
    let report = run.await.expect("task").expect("run");
    assert_eq!(
        report.outcome,
        Outcome::Completed,
        "{engine}: {:?}",
        report.errors
    );
    report
}

/// The application inserts a row referencing an expired session while a batch that took that
/// session waits for the insert's lock on it: the batch's snapshot did not see the reference,
/// so the database refuses the delete once the insert commits. The batch is tried again, its
/// re-check sees the reference and leaves the session, and the run completes. Fails if that
/// refusal ends the run — on PostgreSQL: MariaDB re-reads the row's condition, subquery
/// included, once it has the lock, and skips the session itself.
#[tokio::test]
async fn a_reference_committed_under_a_waiting_batch_keeps_its_session() {
    let version = SchemaVersion::V2;
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, version).await;
        let db = tdb.db.clone();
        add_referencing_tables(&db).await;
        let before = snapshot(&db, version).await;
        let mut purge = oracle(&db, version, None, true).await;
        let referenced = *purge.iter().next().expect("a row to purge");
        let app = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
            .await
            .expect("application connection");
        let mut tx = app.begin_write().await.expect("begin");
        let insert =
            tx.sql("INSERT INTO session_audit (id, session_ref) VALUES (1, ?)".to_string());
        sessionfleet::on_tx!(&mut tx, c => sqlx::query(insert)
            .bind(referenced as i32)
            .execute(&mut *c)
            .await
            .map(|_| ())
            .expect("reference the session"));
        let report = run_until_a_batch_waits_then_commit(&db, tx).await;
        purge.remove(&referenced);
        assert_exactly_purged(
            &before,
            &snapshot(&db, version).await,
            &purge,
            &format!("{engine} with a new reference"),
        );
        assert_eq!(report.referenced_sessions_kept, Some(1), "{engine}");
        app.close().await;
        tdb.drop_db().await;
    }
}

/// The application refreshes an expired session while a batch that selected it waits for the
/// application's lock on it: once the refresh commits, the session is live, and the batch's
/// delete, which re-checks its rule on the row it locks, must leave it. Fails if a batch
/// deletes the ids it selected without its rule — the one way a cleanup could delete a live
/// session.
#[tokio::test]
async fn a_session_refreshed_under_a_waiting_batch_is_not_deleted() {
    let version = SchemaVersion::V2;
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, version).await;
        let db = tdb.db.clone();
        let before = snapshot(&db, version).await;
        let purge = oracle(&db, version, None, true).await;
        // Expired, and by that rule alone: its user exists and is active.
        let pick = db.sql(format!(
            "SELECT {} FROM user_sessions WHERE expires_at < ? AND is_active = TRUE \
             AND user_id IN (SELECT id FROM users WHERE is_active = TRUE) ORDER BY id",
            big(engine, "id")
        ));
        let refreshed: i64 = sessionfleet::on_pool!(&db, p => sqlx::query_scalar(pick)
            .bind(t0())
            .fetch_all(p)
            .await
            .expect("expired sessions"))
        .into_iter()
        .find(|id| purge.contains(id))
        .expect("an expired session of an active user");
        let app = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
            .await
            .expect("application connection");
        let mut tx = app.begin_write().await.expect("begin");
        let refresh = tx.sql(
            "UPDATE user_sessions SET expires_at = ?, last_activity = ? WHERE id = ?".to_string(),
        );
        sessionfleet::on_tx!(&mut tx, c => sqlx::query(refresh)
            .bind(t0() + ChronoDuration::days(1))
            .bind(t0())
            .bind(refreshed)
            .execute(&mut *c)
            .await
            .map(|_| ())
            .expect("refresh the session"));
        let report = run_until_a_batch_waits_then_commit(&db, tx).await;
        let after = snapshot(&db, version).await;
        assert!(
            after.contains_key(&refreshed),
            "{engine}: the refreshed, live session was deleted"
        );
        let expected: BTreeSet<i64> = before
            .keys()
            .filter(|id| !purge.contains(id) || **id == refreshed)
            .copied()
            .collect();
        assert_eq!(
            after.keys().copied().collect::<BTreeSet<_>>(),
            expected,
            "{engine}: exactly the other expired sessions went"
        );
        assert_eq!(
            report.total_cleaned(),
            purge.len() as u64 - 1,
            "{engine}: the kept session is not counted"
        );
        app.close().await;
        tdb.drop_db().await;
    }
}

/// An application transaction holding a lock on an expired session does not hold a batch for
/// as long as it lasts: the batch gives up after `BATCH_LOCK_TIMEOUT`, rolls back and is tried
/// again, and the row goes once the lock is released. (MySQL's own wait is 50 s by default.)
#[tokio::test]
async fn a_batch_gives_up_a_row_lock_held_by_the_application_and_tries_again() {
    let version = SchemaVersion::V2;
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, version).await;
        let db = tdb.db.clone();
        let before = snapshot(&db, version).await;
        let purge = oracle(&db, version, None, true).await;
        let locked = *purge.iter().next().expect("a row to purge");
        let app = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
            .await
            .expect("application connection");
        let mut tx = app.begin_write().await.expect("begin");
        let lock = tx.sql("SELECT id FROM user_sessions WHERE id = ? FOR UPDATE".to_string());
        sessionfleet::on_tx!(&mut tx, c => sqlx::query(lock)
            .bind(locked as i32)
            .execute(&mut *c)
            .await
            .map(|_| ())
            .expect("lock the row"));
        let c = ctx(&db).await;
        let run = tokio::spawn(async move { cleanup::run(&c, &params()).await });
        // Longer than one lock timeout, far shorter than the retries.
        tokio::time::sleep(cleanup::BATCH_LOCK_TIMEOUT + Duration::from_secs(1)).await;
        tx.rollback().await.expect("release the lock");
        let report = run.await.expect("task").expect("run");
        assert_eq!(report.outcome, Outcome::Completed, "{engine}");
        assert_exactly_purged(
            &before,
            &snapshot(&db, version).await,
            &purge,
            &format!("{engine} with a locked row"),
        );
        assert!(
            report.notes.iter().any(|n| {
                let n = n.to_lowercase();
                n.contains("lock timeout") || n.contains("lock wait timeout")
            }),
            "{engine}: the batch gave up the lock and was retried: {:?}",
            report.notes
        );
        app.close().await;
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn stale_fence_token_changes_nothing() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let before = snapshot(db, SchemaVersion::V2).await;
        let old: Fence = fence::issue_token(db, "target:test", "old-holder")
            .await
            .expect("old token");
        let _new = fence::issue_token(db, "target:test", "new-holder")
            .await
            .expect("new token");
        let c = OpContext {
            db: db.clone(),
            fence: Some(old),
            cancel: CancellationToken::new(),
            progress: Default::default(),
        };
        let report = cleanup::run(&c, &params())
            .await
            .expect("a fenced-out run reports");
        assert_eq!(report.outcome, Outcome::FencedOut, "{engine}");
        assert_eq!(report.total_cleaned(), 0, "{engine}: {report:?}");
        assert!(
            report.notes.iter().any(|n| n.contains("fenced out")),
            "{engine}: {:?}",
            report.notes
        );
        assert_eq!(
            snapshot(db, SchemaVersion::V2).await,
            before,
            "{engine}: nothing changed"
        );
        tdb.drop_db().await;
    }
}

/// A holder whose lease lapsed unnoticed is fenced out at its next batch once a newer holder
/// has its token: it stops there, deletes nothing more, and its report counts exactly the
/// rows it deleted before, so the run's history keeps them.
#[tokio::test]
async fn a_run_fenced_out_midway_reports_what_it_deleted_and_stops() {
    let version = SchemaVersion::V2;
    for engine in ENGINES {
        let tdb = seeded(engine, version).await;
        let db = tdb.db.clone();
        let seeded_rows = snapshot(&db, version).await.len();
        let to_purge = oracle(&db, version, None, true).await.len();
        let run = a_slow_run_under_way(&db, seeded_rows).await;
        // Waits for a batch in flight: no write with the old token can follow.
        fence::issue_token(&db, "target:test", "newer-holder")
            .await
            .expect("newer token");
        let at_takeover = snapshot(&db, version).await;
        let report = run.await.expect("task").expect("a fenced-out run reports");
        assert_eq!(report.outcome, Outcome::FencedOut, "{engine}: {report:?}");
        assert_eq!(
            snapshot(&db, version).await,
            at_takeover,
            "{engine}: nothing deleted with the stale token"
        );
        let deleted = seeded_rows - at_takeover.len();
        assert!(
            deleted >= 1 && deleted < to_purge,
            "{engine}: {deleted} of {to_purge}"
        );
        assert_eq!(
            report.total_cleaned(),
            deleted as u64,
            "{engine}: the report counts every committed delete"
        );
        assert_eq!(report.remaining, None, "{engine}");
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn max_age_zero_and_missing_fence_are_refused() {
    let zero = CleanupParams {
        force: true,
        force_max_age_hours: Some(0),
        ..params()
    };
    let msg = zero.validate().expect_err("0 refused").to_string();
    assert!(msg.contains("--max-age 0"), "{msg}");
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2).await;
    let before = snapshot(&tdb.db, SchemaVersion::V2).await;
    assert!(matches!(
        cleanup::run(&ctx(&tdb.db).await, &zero).await,
        Err(OpError::Invalid(_))
    ));
    assert!(matches!(
        cleanup::run(&read_only(&tdb.db), &params()).await,
        Err(OpError::NoFence)
    ));
    assert_eq!(snapshot(&tdb.db, SchemaVersion::V2).await, before);
    let future = CleanupParams {
        as_of: Some(chrono::Utc::now().naive_utc() + ChronoDuration::hours(1)),
        ..params()
    };
    assert!(
        future.validate().is_err(),
        "a future as_of would purge live sessions"
    );
    // A payload's as_of near chrono's lowest date made the cutoffs overflow: a panic.
    let ancient = CleanupParams {
        as_of: Some(chrono::NaiveDateTime::MIN),
        ..params()
    };
    assert!(matches!(
        cleanup::run(
            &read_only(&tdb.db),
            &CleanupParams {
                dry_run: true,
                ..ancient.clone()
            }
        )
        .await,
        Err(OpError::Invalid(_))
    ));
    assert!(matches!(
        cleanup::stats(&tdb.db, &ancient).await,
        Err(OpError::Invalid(_))
    ));
    tdb.drop_db().await;
}

#[tokio::test]
async fn without_users_table_the_orphan_rule_is_skipped_with_a_note() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V1).await;
    let db = &tdb.db;
    db.execute("DROP TABLE users").await.expect("drop users");
    let before = snapshot(db, SchemaVersion::V1).await;
    let purge = oracle(db, SchemaVersion::V1, None, false).await;
    let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
    assert_eq!(report.orphaned_sessions_cleaned, 0);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("orphaned-session rule was skipped")),
        "{:?}",
        report.notes
    );
    assert_exactly_purged(
        &before,
        &snapshot(db, SchemaVersion::V1).await,
        &purge,
        "no users table",
    );
    tdb.drop_db().await;
}

/// A session without a user (a nullable `user_id`, as for an application's guest sessions)
/// is not orphaned: it never had a user to lose. The expiry rules still remove it once it has
/// expired. Fails if the orphan rule's anti-join is left to match a NULL user id.
#[tokio::test]
async fn a_session_without_a_user_is_not_orphaned() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        allow_sessions_without_a_user(db).await;
        let hour = ChronoDuration::hours(1);
        let insert = "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
             VALUES (?, NULL, ?, ?, ?, ?, TRUE)";
        for (label, expires) in [("guest-live", t0() + hour), ("guest-expired", t0() - hour)] {
            sessionfleet::on_pool!(db, p => {
                sqlx::query(db.sql(insert))
                    .bind(label).bind(t0() - hour).bind(t0() - hour).bind(t0() - hour).bind(expires)
                    .execute(p).await.expect("guest session");
            });
        }
        let before = snapshot(db, SchemaVersion::V2).await;
        let purge = oracle(db, SchemaVersion::V2, None, true).await;
        let dry = dry_run(db).await;
        assert_eq!(dry.total_cleaned(), purge.len() as u64, "{engine}: dry run");
        cleanup::run(&ctx(db).await, &params()).await.expect("run");
        assert_exactly_purged(
            &before,
            &snapshot(db, SchemaVersion::V2).await,
            &purge,
            &format!("{engine}: guest sessions"),
        );
        let guests: BTreeSet<String> = sessionfleet::on_pool!(db, p => sqlx::query_scalar(
            "SELECT session_id FROM user_sessions WHERE user_id IS NULL"
        ).fetch_all(p).await.expect("guests").into_iter().collect());
        assert_eq!(
            guests,
            BTreeSet::from(["guest-live".to_string()]),
            "{engine}"
        );
        tdb.drop_db().await;
    }
}

/// A run reports each committed batch to its context's progress: the snapshots a watcher
/// sees only grow, and the last one is the report's rows and batches. Fails if the purge
/// reports nothing, or reports before its commit counts are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reports_its_committed_batches_as_progress() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let progress = sessionfleet::ops::Progress::default();
        let mut updates = progress.subscribe();
        let watcher = tokio::spawn(async move {
            let mut seen = Vec::new();
            while updates.changed().await.is_ok() {
                seen.push(*updates.borrow_and_update());
            }
            seen
        });
        let ctx = ctx(db).await.with_progress(progress.clone());
        let report = cleanup::run(&ctx, &params()).await.expect("run");
        drop(ctx);
        let last = progress.latest();
        drop(progress);
        let seen = watcher.await.expect("watcher");
        assert!(report.batches > 1, "{engine}: several batches");
        assert_eq!(
            (last.rows, last.batches),
            (report.total_cleaned(), report.batches),
            "{engine}"
        );
        assert!(!seen.is_empty(), "{engine}: a watcher saw progress");
        assert!(
            seen.windows(2)
                .all(|w| w[0].rows <= w[1].rows && w[0].batches < w[1].batches),
            "{engine}: {seen:?}"
        );
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn stats_agree_with_a_dry_run() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let stats = cleanup::stats(db, &params()).await.expect("stats");
        let dry = cleanup::run(
            &read_only(db),
            &CleanupParams {
                dry_run: true,
                ..params()
            },
        )
        .await
        .expect("dry");
        assert_eq!(stats.rules, dry.rules, "{engine}");
        assert_eq!(
            stats.total_sessions,
            snapshot(db, SchemaVersion::V2).await.len() as u64
        );
        assert!(
            stats.old_sessions_48h >= stats.very_old_sessions_week
                && stats.very_old_sessions_week > 0
        );
        assert!(stats.recent_sessions_24h > 0);
        assert_eq!(
            (
                stats.cleanup_interval,
                stats.batch_size,
                stats.max_session_age
            ),
            (3600, 5, MAX_AGE_SECS)
        );
        let text = stats.render_text();
        assert!(
            text.starts_with(&format!(
                "Session Cleanup Statistics:\n{}\n",
                "=".repeat(40)
            )),
            "{text}"
        );
        tdb.drop_db().await;
    }
}

/// One matching row with an outlying id (an explicit insert, a bumped sequence) does not make
/// a key-range batch larger than its size: the range ends at the id of the table's N-th next
/// row. Fails with a stride computed from the span's average density, which turned this
/// table's first batch into its whole purge.
#[tokio::test]
async fn an_outlying_id_does_not_make_a_key_range_batch_larger() {
    for engine in ENGINES {
        let version = SchemaVersion::V2;
        let tdb = seeded(engine, version).await;
        let db = &tdb.db;
        let expired = *oracle(db, version, None, true)
            .await
            .iter()
            .next()
            .expect("an expired session");
        let copy = format!(
            "INSERT INTO user_sessions (id, session_id, user_id, active_platform_id, created_at, \
             updated_at, last_activity, expires_at, is_active) SELECT 2000000000, 'outlier', \
             user_id, active_platform_id, created_at, updated_at, last_activity, expires_at, \
             is_active FROM user_sessions WHERE id = {expired}"
        );
        db.execute(&copy).await.expect("the outlying row");
        let purge = oracle(db, version, None, true).await;
        assert!(purge.contains(&2_000_000_000));
        let one_batch = CleanupParams {
            batch_size: 5,
            budget_secs: Some(0),
            ..params()
        };
        let first = cleanup::run(&ctx(db).await, &one_batch)
            .await
            .expect("first part");
        assert_eq!(first.batches, 1, "{engine}");
        assert!(
            first.total_cleaned() <= 5,
            "{engine}: a batch of 5 deleted {} of {}",
            first.total_cleaned(),
            purge.len()
        );
        tdb.drop_db().await;
    }
}

/// On SQLite a session whose expiry is stored as a number (Unix seconds) or as text with a
/// UTC offset is never deleted on a misreading: both sort before the text cutoff, so both
/// matched the expired rule, though one expires tomorrow and the other is live in UTC. The
/// report names the column. Fails without the rules' `julianday` re-check, which deleted both.
#[tokio::test]
async fn sqlite_sessions_whose_times_are_not_utc_text_are_not_deleted_on_a_misreading() {
    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::Sqlite, version).await;
    let db = &tdb.db;
    let live: Vec<i64> = sessionfleet::on_pool!(db, p => sqlx::query_scalar(
        "SELECT id FROM user_sessions WHERE expires_at > ? AND is_active = TRUE \
         AND user_id IN (SELECT id FROM users WHERE is_active = TRUE) ORDER BY id LIMIT 2")
        .bind(t0())
        .fetch_all(p)
        .await
        .expect("live sessions"));
    let [in_seconds, with_offset] = live[..] else {
        panic!("two live sessions: {live:?}")
    };
    let tomorrow = (t0() + ChronoDuration::days(1)).and_utc().timestamp();
    db.execute(&format!(
        "UPDATE user_sessions SET expires_at = {tomorrow} WHERE id = {in_seconds}"
    ))
    .await
    .expect("store a number");
    // 18:00 UTC, six hours after as_of, but "10:00" sorts before "12:00".
    db.execute(&format!(
        "UPDATE user_sessions SET expires_at = '2025-06-01 10:00:00-08:00' WHERE id = {with_offset}"
    ))
    .await
    .expect("store an offset");
    let misread = oracle(db, version, None, true).await;
    assert!(misread.contains(&in_seconds) && misread.contains(&with_offset));
    let purge: BTreeSet<i64> = misread
        .iter()
        .filter(|id| ![in_seconds, with_offset].contains(id))
        .copied()
        .collect();
    let before = session_ids(db).await;

    let dry = dry_run(db).await;
    assert_eq!(dry.total_cleaned(), purge.len() as u64, "dry-run count");
    let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
    assert_eq!(report.total_cleaned(), purge.len() as u64);
    assert_eq!(
        session_ids(db).await,
        before.difference(&purge).copied().collect::<BTreeSet<_>>(),
        "both sessions kept, every other due one deleted"
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("user_sessions.expires_at") && n.contains("integer")),
        "{:?}",
        report.notes
    );
    tdb.drop_db().await;
}

/// Time columns of the zoned types (PostgreSQL `timestamptz`, MySQL `TIMESTAMP`) are walked
/// and purged like plain ones. Fails if the index walk decodes the column as it is: sqlx
/// refuses those types as `NaiveDateTime`, and every run failed before its first batch.
#[tokio::test]
async fn zoned_time_columns_are_walked_and_purged_exactly() {
    let version = SchemaVersion::V2;
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, version).await;
        let db = &tdb.db;
        db.execute(match engine {
            Engine::Postgres => {
                "ALTER TABLE user_sessions \
                 ALTER COLUMN expires_at TYPE timestamptz USING expires_at AT TIME ZONE 'UTC', \
                 ALTER COLUMN last_activity TYPE timestamptz USING last_activity AT TIME ZONE 'UTC'"
            }
            _ => {
                "ALTER TABLE user_sessions MODIFY expires_at TIMESTAMP(6) NULL, \
                 MODIFY last_activity TIMESTAMP(6) NULL"
            }
        })
        .await
        .expect("zoned columns");
        let before = session_ids(db).await;
        let purge = oracle(db, version, None, true).await;
        let report = cleanup::run(&ctx(db).await, &params())
            .await
            .expect("a run over zoned columns");
        assert_eq!(report.outcome, Outcome::Completed, "{engine}");
        assert!(
            report.rules.inactive_stale > 0,
            "{engine}: the inactive rule walked its index"
        );
        assert_eq!(
            session_ids(db).await,
            before.difference(&purge).copied().collect::<BTreeSet<_>>(),
            "{engine}: exactly the oracle's rows went"
        );
        tdb.drop_db().await;
    }
}

/// The same oracle equality when the expired rule is sparse (the steady state of an hourly
/// cleanup): the rule is then walked along its time index, not the primary key. Also with
/// one statement at a time, where each rule's count runs when the rule comes up.
#[tokio::test]
async fn sparse_rules_walk_their_index_and_still_delete_exactly_the_oracle_set() {
    for (engine, parallel_reads) in ENGINES.into_iter().flat_map(|e| [(e, true), (e, false)]) {
        let version = SchemaVersion::V2;
        let what = format!("{engine} sparse, parallel reads {parallel_reads}");
        let tdb = seeded(engine, version).await;
        let db = &tdb.db;
        // Revive all but every 25th session: fewer than the dense share stay expired.
        let live_until = t0() + ChronoDuration::days(1);
        let sql = db.sql(
            "UPDATE user_sessions SET expires_at = ?, is_active = TRUE, last_activity = ? \
             WHERE id % 25 <> 0",
        );
        sessionfleet::on_pool!(db, p => {
            sqlx::query(sql).bind(live_until).bind(t0()).execute(p).await.expect("revive");
        });
        let total = db
            .scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap();
        let before = snapshot(db, version).await;
        let purge = oracle(db, version, None, true).await;
        assert!(!purge.is_empty(), "{what}");
        assert!(
            (purge.len() as f64) < cleanup::DENSE_RULE_SHARE * total as f64,
            "{what}: sparse ({} of {total})",
            purge.len()
        );
        let report = cleanup::run(
            &ctx(db).await,
            &CleanupParams {
                parallel_reads,
                ..params()
            },
        )
        .await
        .expect("run");
        assert_exactly_purged(&before, &snapshot(db, version).await, &purge, &what);
        assert_eq!(report.total_cleaned(), purge.len() as u64, "{what}");
        tdb.drop_db().await;
    }
}

/// The table's size comes from the engine's estimate, which can be far off (a stale ANALYZE):
/// it steers only how batches are shaped, never which rows go. Forced far too low and far too
/// high on PostgreSQL (superuser may write `pg_class`), the run still deletes exactly the
/// oracle set.
#[tokio::test]
async fn a_wrong_row_estimate_changes_no_deleted_row() {
    let version = SchemaVersion::V2;
    for factor in [0.02, 50.0] {
        let what = format!("postgres, estimate x{factor}");
        let tdb = seeded(Engine::Postgres, version).await;
        let db = &tdb.db;
        db.execute("ANALYZE user_sessions").await.unwrap();
        db.execute(&format!(
            "UPDATE pg_class SET reltuples = reltuples * {factor} \
             WHERE oid = 'user_sessions'::regclass"
        ))
        .await
        .unwrap();
        let total = db
            .scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap();
        let estimate = db.estimated_rows("user_sessions").await.unwrap().unwrap();
        assert!(
            estimate.abs_diff(total as u64) > total as u64 / 2,
            "{what}: the estimate ({estimate}) is off the count ({total})"
        );
        let before = snapshot(db, version).await;
        let purge = oracle(db, version, None, true).await;
        let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
        assert_exactly_purged(&before, &snapshot(db, version).await, &purge, &what);
        assert_eq!(report.total_cleaned(), purge.len() as u64, "{what}");
        assert_eq!(report.outcome, Outcome::Completed, "{what}");
        tdb.drop_db().await;
    }
}

/// A worker serves several targets from one process: while it retries a connection to a
/// target that is down (about 50 s here), jobs for the other targets get their pools. Fails if
/// connecting holds the lock shared by every target's pool.
#[tokio::test]
async fn an_unreachable_target_does_not_hold_up_the_pools_of_the_others() {
    use sessionfleet::dispatch::{self, PoolRole};

    // Nothing listens on port 1: every attempt is refused, and the retries back off.
    let down = tokio::spawn(dispatch::shared_db(
        "postgres://postgres@127.0.0.1:1/down",
        PoolRole::Writes,
    ));
    // Lets the task start connecting (the test runs on one thread).
    tokio::task::yield_now().await;
    let tdb = TestDb::new(Engine::Sqlite).await;
    dispatch::shared_db(&tdb.url, PoolRole::Writes)
        .await
        .expect("the reachable target's pool");
    assert!(
        !down.is_finished(),
        "the reachable target waited for the unreachable one's retries"
    );
    down.abort();
    tdb.drop_db().await;
}

/// A worker runs read-only jobs beside the one writer the lease admits: a long health report
/// holding every connection of its pool must not make a cleanup wait out the pool's acquire
/// timeout and fail.
#[tokio::test]
async fn cleanup_runs_while_reports_hold_every_read_connection() {
    use sessionfleet::dispatch::{self, OperationEnv, OperationJob, PoolRole};
    use sessionfleet::jobs::{JobEnvelope, JobKind};
    use sessionfleet::runner::JobOutcome;
    use sessionfleet::store::{ConnectOptions, Pool};

    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2).await;
    let expected = oracle(&tdb.db, SchemaVersion::V2, None, true).await;
    assert!(!expected.is_empty(), "the seed must leave work to do");

    // A report's queries, simulated by holding every connection of the read pool.
    let reads = dispatch::shared_db(&tdb.url, PoolRole::Reads)
        .await
        .expect("read pool");
    let Pool::Sqlite(pool) = reads.pool() else {
        unreachable!("SQLite test database")
    };
    let mut held = Vec::new();
    for _ in 0..ConnectOptions::DEFAULT_MAX_CONNECTIONS {
        held.push(pool.acquire().await.expect("read connection"));
    }

    let settings = sessionfleet::testing::settings_for_database(&tdb.url);
    let job = OperationJob::Cleanup(params());
    let env = JobEnvelope::new(JobKind::Cleanup, "default", job.params(), "test");
    let shutdown = CancellationToken::new();
    let oe = OperationEnv {
        settings: &settings,
        redis: None,
        queue: None,
        holder: "test",
        shutdown: &shutdown,
        progress: None,
    };
    match dispatch::run_operation(&env, &oe).await {
        JobOutcome::Done { rows_affected, .. } => {
            assert_eq!(rows_affected, expected.len() as u64)
        }
        other => panic!("cleanup did not finish beside a busy read pool: {other:?}"),
    }
    drop(held);
    tdb.drop_db().await;
}

/// An error that outlasts the batch retries after some batches have committed ends the part
/// with those batches counted (outcome `interrupted`, the error in the report) instead of
/// failing it: a retry of the whole part would report none of them. The continuation then
/// finishes the run, and the parts together purge exactly the oracle's rows.
#[tokio::test]
async fn a_part_stopped_by_an_error_keeps_the_counts_of_its_committed_batches() {
    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::Sqlite, version).await;
    let db = tdb.db.clone();
    let before = snapshot(&db, version).await;
    let purge = oracle(&db, version, None, true).await;
    let run = a_slow_run_under_way(&db, before.len()).await;
    // Gone from under the run: its next batch fails, and so do its retries.
    db.execute("ALTER TABLE user_sessions RENAME TO user_sessions_away")
        .await
        .expect("rename");
    let first = run
        .await
        .expect("task")
        .expect("a part with committed batches reports");
    db.execute("ALTER TABLE user_sessions_away RENAME TO user_sessions")
        .await
        .expect("rename back");
    assert_eq!(first.outcome, Outcome::Interrupted, "{first:?}");
    let deleted = before.len() - snapshot(&db, version).await.len();
    assert!(deleted > 0 && (deleted as u64) < purge.len() as u64);
    assert_eq!(
        first.total_cleaned(),
        deleted as u64,
        "every committed batch counted"
    );
    assert!(
        first.errors.iter().any(|e| e.contains("stopped after")),
        "{:?}",
        first.errors
    );
    let resumed = CleanupParams {
        as_of: Some(first.as_of),
        ..params()
    };
    let second = cleanup::run(&ctx(&db).await, &resumed)
        .await
        .expect("continuation");
    assert_eq!(second.outcome, Outcome::Completed);
    assert_eq!(
        first.total_cleaned() + second.total_cleaned(),
        purge.len() as u64
    );
    assert_exactly_purged(&before, &snapshot(&db, version).await, &purge, "sqlite");
    tdb.drop_db().await;
}

/// Parts stopped by an error are continued only so many times in a row: the continuation of
/// an interrupted part counts it, a part that ends otherwise resets the count, and at
/// `MAX_INTERRUPTED_PARTS` the next error after committed batches fails the part (naming
/// what it deleted), so the job's retries and dead letter take over instead of a continuation
/// after every few batches until the rows run out. Fails if that part is still continued.
#[tokio::test]
async fn an_error_that_stops_part_after_part_ends_the_continuations() {
    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::Sqlite, version).await;
    let db = tdb.db.clone();
    let seeded_rows = snapshot(&db, version).await.len();
    let last_allowed = CleanupParams {
        interrupted_parts: cleanup::MAX_INTERRUPTED_PARTS,
        ..one_row_batches()
    };
    let run = a_slow_part_under_way(&db, seeded_rows, last_allowed.clone()).await;
    db.execute("ALTER TABLE user_sessions RENAME TO user_sessions_away")
        .await
        .expect("rename");
    let ended = run.await.expect("task");
    db.execute("ALTER TABLE user_sessions_away RENAME TO user_sessions")
        .await
        .expect("rename back");
    let deleted = (seeded_rows - snapshot(&db, version).await.len()) as u64;
    match ended {
        Err(OpError::Interrupted {
            parts,
            deleted: counted,
            ..
        }) => {
            assert_eq!(parts, cleanup::MAX_INTERRUPTED_PARTS + 1);
            assert_eq!(counted, deleted, "the error names what the part deleted");
        }
        other => panic!("the part was not failed: {other:?}"),
    }

    let mut part = CleanupReport::new(t0(), false);
    part.outcome = Outcome::Interrupted;
    let once = params().continuation(&part);
    assert_eq!(once.interrupted_parts, 1);
    assert_eq!(once.continuation(&part).interrupted_parts, 2);
    part.outcome = Outcome::BudgetSpent;
    assert_eq!(once.continuation(&part).interrupted_parts, 0);
    tdb.drop_db().await;
}

/// A part fenced out midway becomes a continuation, not a retry of the same part: its deletes
/// are recorded with the part, and the next part waits a while before it takes the database
/// back (with no Redis lease to make it wait, it would fence the newer holder out at once).
#[tokio::test]
async fn a_fenced_out_part_is_continued_later_with_its_deletes_recorded() {
    use sessionfleet::dispatch::{self, OperationEnv, OperationJob};
    use sessionfleet::jobs::{JobEnvelope, JobKind};
    use sessionfleet::runner::JobOutcome;

    let version = SchemaVersion::V2;
    let tdb = seeded(Engine::Sqlite, version).await;
    let seeded_rows = snapshot(&tdb.db, version).await.len();
    let settings = sessionfleet::testing::settings_for_database(&tdb.url);
    let env = JobEnvelope::new(
        JobKind::Cleanup,
        "default",
        OperationJob::Cleanup(one_row_batches()).params(),
        "test",
    );
    let shutdown = CancellationToken::new();
    let oe = OperationEnv {
        settings: &settings,
        redis: None,
        queue: None,
        holder: "test",
        shutdown: &shutdown,
        progress: None,
    };
    let take_over = async {
        until_a_batch_committed(&tdb.db, seeded_rows).await;
        fence::issue_token(
            &tdb.db,
            &sessionfleet::lease::fence_name("default"),
            "newer",
        )
        .await
        .expect("newer token");
        snapshot(&tdb.db, version).await.len()
    };
    let (outcome, left_at_takeover) = tokio::join!(dispatch::run_operation(&env, &oe), take_over);
    let JobOutcome::Continue {
        report,
        rows_affected,
        next,
        delay,
    } = outcome
    else {
        panic!("a fenced-out part must be continued: {outcome:?}")
    };
    assert_eq!(report["outcome"], "fenced_out", "{report}");
    assert_eq!(rows_affected, (seeded_rows - left_at_takeover) as u64);
    assert!(rows_affected > 0);
    assert!(delay.is_some_and(|d| !d.is_zero()), "{delay:?}");
    assert_eq!((next.run_id, next.part), (env.run_id, env.part + 1));
    assert_eq!(next.params["as_of"], report["as_of"], "same reference time");
    tdb.drop_db().await;
}

/// A PostgreSQL batch commits without waiting for its WAL flush and the orphan batches switch
/// hash and merge joins off, each for its own transaction only (`SET LOCAL`). If either leaked
/// to the pooled connection, the next fence token (issued on the same pool) would commit
/// without durability and unrelated queries would lose their join plans.
#[tokio::test]
async fn postgres_batch_settings_do_not_outlive_their_batch() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = &tdb.db;
    let c = OpContext {
        db: db.clone(),
        fence: Some(
            fence::issue_token(db, "target:test", "settings")
                .await
                .expect("token"),
        ),
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    let r = cleanup::run(&c, &params()).await.expect("cleanup");
    assert!(
        r.expired_sessions_cleaned > 0 && r.orphaned_sessions_cleaned > 0,
        "both kinds of batch ran: {r:?}"
    );
    let mut held = tdb.every_postgres_connection().await;
    for conn in &mut held {
        let settings: (String, String, String) = sqlx::query_as(
            "SELECT current_setting('synchronous_commit'), current_setting('enable_hashjoin'), \
             current_setting('enable_mergejoin')",
        )
        .fetch_one(&mut **conn)
        .await
        .expect("settings");
        assert_eq!(settings, ("on".into(), "on".into(), "on".into()));
    }
    drop(held);
    tdb.drop_db().await;
}

/// On SQLite the batches commit without checkpointing and the WAL is copied back after each
/// one, so the next batch starts the WAL over: it stays about one batch long (here ~0.4 MB,
/// against a 1.8 MB database; a background read can make a restart wait a batch). Fails if
/// the copy between batches is missing — the WAL then holds every batch's pages (~30 MB).
#[tokio::test]
async fn sqlite_batches_keep_the_wal_about_one_batch_long() {
    let tdb = TestDb::new(Engine::Sqlite).await;
    let seed = SeedParams {
        sessions: 4_000,
        users: 200,
        seed: 42,
        schema: SchemaVersion::V2,
        now: t0(),
        reset: false,
    };
    seed_demo(&tdb.db, &seed).await.expect("seed");
    // Start from an empty WAL file: it never shrinks, so its size then tells what the run wrote.
    tdb.db
        .execute("PRAGMA wal_checkpoint(TRUNCATE)")
        .await
        .expect("truncate the WAL");
    let path = tdb.url.trim_start_matches("sqlite://").to_string();
    let r = cleanup::run(&ctx(&tdb.db).await, &params())
        .await
        .expect("cleanup");
    assert!(r.batches >= 40, "many batches ran: {r:?}");
    let size = |p: &str| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (db_bytes, wal_bytes) = (size(&path), size(&format!("{path}-wal")));
    assert!(
        wal_bytes < db_bytes,
        "WAL {wal_bytes} bytes after {} batches, database {db_bytes} bytes",
        r.batches
    );
    tdb.drop_db().await;
}

/// Beside a reader that keeps SQLite from starting the WAL over, a purge grows the WAL file
/// past `SQLITE_WAL_FILE_TARGET`, and SQLite keeps a WAL file at the longest it ever was. The
/// run does not wait for the reader; once it is gone, the next run (nothing left to delete)
/// cuts the file back, more than one step's worth. Fails if no write of ours starts the WAL
/// over with a size limit on.
#[tokio::test]
async fn a_sqlite_wal_grown_beside_a_reader_is_cut_back_by_the_next_run() {
    use sessionfleet::ops::cleanup::{SQLITE_WAL_CUT_STEP, SQLITE_WAL_FILE_TARGET};
    use sqlx::Connection;

    let tdb = TestDb::new(Engine::Sqlite).await;
    let seed = SeedParams {
        sessions: 8_000,
        users: 400,
        seed: 42,
        schema: SchemaVersion::V2,
        now: t0(),
        reset: false,
    };
    seed_demo(&tdb.db, &seed).await.expect("seed");
    let path = tdb.url.trim_start_matches("sqlite://").to_string();
    let wal_bytes = || std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len());

    let mut reader = sqlx::SqliteConnection::connect(&tdb.url)
        .await
        .expect("reader");
    let mut read = reader.begin().await.expect("read transaction");
    let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_sessions")
        .fetch_one(&mut *read)
        .await
        .expect("read");
    let context = ctx(&tdb.db).await;
    let first = cleanup::run(&context, &params()).await.expect("cleanup");
    assert!(first.total_cleaned() > 0, "{first:?}");
    let grown = wal_bytes();
    assert!(
        grown > SQLITE_WAL_FILE_TARGET + SQLITE_WAL_CUT_STEP,
        "the reader kept the WAL from starting over: {grown} bytes"
    );

    read.rollback().await.expect("end the read");
    reader.close().await.expect("close the reader");
    let second = cleanup::run(&context, &params()).await.expect("cleanup");
    assert_eq!(second.total_cleaned(), 0, "{second:?}");
    let after = wal_bytes();
    assert!(
        after <= SQLITE_WAL_FILE_TARGET,
        "WAL file {after} bytes after the second run, {grown} after the first"
    );
    tdb.drop_db().await;
}

/// A connection holding a lock on `platform_connections` that keeps every other session from
/// reading it: the missing-platform count then waits, while the purge never reads that table.
enum PlatformLock {
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
}

impl PlatformLock {
    async fn take(engine: Engine, url: &str) -> PlatformLock {
        use sqlx::Connection;
        match engine {
            Engine::Postgres => {
                let mut c = sqlx::PgConnection::connect(url).await.expect("connect");
                sqlx::raw_sql("BEGIN; LOCK TABLE platform_connections IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut c)
                    .await
                    .expect("lock");
                PlatformLock::Postgres(c)
            }
            _ => {
                let mut c = sqlx::MySqlConnection::connect(url).await.expect("connect");
                sqlx::raw_sql("LOCK TABLES platform_connections WRITE")
                    .execute(&mut c)
                    .await
                    .expect("lock");
                PlatformLock::MySql(c)
            }
        }
    }

    async fn release(self) {
        match self {
            PlatformLock::Postgres(mut c) => {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut c)
                    .await
                    .expect("unlock");
            }
            PlatformLock::MySql(mut c) => {
                sqlx::raw_sql("UNLOCK TABLES")
                    .execute(&mut c)
                    .await
                    .expect("unlock");
            }
        }
    }
}

/// Sessions of this database waiting for a table lock, the holder's aside.
async fn waiting_for_a_table_lock(db: &Db) -> i64 {
    let sql = match db.engine() {
        Engine::Postgres => {
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        }
        _ => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND STATE LIKE 'Waiting for table%'"
        }
    };
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.expect("waiting sessions"))
}

/// A part cut short by its budget returns without waiting for the missing-platform count:
/// it cancels the count on the server (on InnoDB it never started one); the part that
/// completes the run counts. The count is kept
/// waiting on a table lock for as long as the part runs, so a part that waited for it would
/// never return.
#[tokio::test]
async fn a_part_cut_by_its_budget_leaves_the_missing_platform_count_to_the_last_part() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, SchemaVersion::V2).await;
        let db = &tdb.db;
        let c = ctx(db).await;
        let missing = missing_platform_ids(db).await.len() as u64;
        assert!(
            missing > 0,
            "{engine}: the data has missing-platform sessions"
        );
        let lock = PlatformLock::take(engine, &tdb.url).await;
        let cut = CleanupParams {
            budget_secs: Some(0),
            ..params()
        };
        let first = tokio::time::timeout(Duration::from_secs(120), cleanup::run(&c, &cut))
            .await
            .unwrap_or_else(|_| panic!("{engine}: the part waited for the blocked count"))
            .expect("first part");
        assert_eq!(first.outcome, Outcome::BudgetSpent, "{engine}");
        assert_eq!(
            first.missing_platform_sessions, None,
            "{engine}: not counted"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while waiting_for_a_table_lock(db).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{engine}: the count still waits on the server"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lock.release().await;

        let rest = CleanupParams {
            budget_secs: None,
            as_of: Some(first.as_of),
            ..params()
        };
        let last = cleanup::run(&c, &rest).await.expect("last part");
        assert_eq!(last.outcome, Outcome::Completed, "{engine}");
        assert_eq!(last.missing_platform_sessions, Some(missing), "{engine}");
        let mut merged = first.clone();
        merged.merge(&last);
        assert_eq!(merged.missing_platform_sessions, Some(missing), "{engine}");
        tdb.drop_db().await;
    }
}

/// On InnoDB the missing-platform count starts only once the purge is over: beside the
/// batches its index-only scan went to the clustered index for nearly every record and read
/// for minutes (`cleanup::missing`). So it does on any engine when the run keeps to one
/// statement at a time (`parallel_reads` false; PostgreSQL here, which otherwise counts
/// beside). The count is held on a table lock, so the first session seen waiting for that
/// lock is the count; by then every row the rules purge must be gone.
#[tokio::test]
async fn the_missing_platform_count_starts_once_the_purge_is_over_on_innodb_and_one_at_a_time() {
    for (engine, parallel_reads) in [(Engine::MySql, true), (Engine::Postgres, false)] {
        missing_platform_count_starts_after_the_purge(engine, parallel_reads).await;
    }
}

async fn missing_platform_count_starts_after_the_purge(engine: Engine, parallel_reads: bool) {
    let version = SchemaVersion::V2;
    let tdb = seeded(engine, version).await;
    let db = &tdb.db;
    let c = ctx(db).await;
    let missing = missing_platform_ids(db).await.len() as u64;
    assert!(missing > 0, "the data has missing-platform sessions");
    let before = snapshot(db, version).await;
    let purged = oracle(db, version, None, true).await;
    assert!(purged.len() > 100, "the data has rows to purge");
    let lock = PlatformLock::take(engine, &tdb.url).await;
    // One row a batch: the purge lasts long enough for a count beside it to be seen waiting.
    let one_by_one = CleanupParams {
        batch_size: 1,
        max_batch_size: 1,
        parallel_reads,
        ..params()
    };
    let run = tokio::spawn(async move { cleanup::run(&c, &one_by_one).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while waiting_for_a_table_lock(db).await == 0 {
        assert!(
            !run.is_finished(),
            "{engine}: the run ended without waiting to count"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{engine}: nothing waited for the locked platforms table"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let present: BTreeSet<i64> = snapshot(db, version).await.into_keys().collect();
    let left = purged.intersection(&present).count();
    assert_eq!(
        left,
        0,
        "{engine}: the count started while {left} of {} rows to purge were still there",
        purged.len()
    );
    lock.release().await;
    let report = run.await.expect("run task").expect("run");
    assert_eq!(report.outcome, Outcome::Completed, "{engine}");
    assert_eq!(report.missing_platform_sessions, Some(missing), "{engine}");
    let what = format!("{engine}, parallel reads {parallel_reads}");
    assert_exactly_purged(&before, &snapshot(db, version).await, &purged, &what);
    tdb.drop_db().await;
}

/// A fresh v2 database with one active user (id 1) and its tables shaped by `alter` (run
/// before any row goes in).
async fn v2_shaped(engine: Engine, alter: &[&str]) -> TestDb {
    let tdb = TestDb::new(engine).await;
    let db = &tdb.db;
    sessionfleet::store::schema::create(db, SchemaVersion::V2)
        .await
        .expect("v2 tables");
    for sql in alter {
        db.execute(sql).await.expect(sql);
    }
    let user = "INSERT INTO users (id, username, email, password_hash, role, is_active, created_at) \
         VALUES (1, 'u1', 'u1@example.org', 'x', 'viewer', TRUE, ?)";
    sessionfleet::on_pool!(db, p => {
        sqlx::query(db.sql(user)).bind(t0()).execute(p).await.expect("insert user");
    });
    tdb
}

/// The session labels (`session_id`) left in the table.
async fn every_label(db: &Db) -> BTreeSet<String> {
    sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, String>("SELECT session_id FROM user_sessions")
        .fetch_all(p).await.expect("labels").into_iter().collect())
}

/// A run, its dry run and its stats all fail with the same schema error; returns its text.
async fn refused_everywhere(db: &Db) -> (sessionfleet::store::schema::SchemaError, String) {
    use sessionfleet::store::StoreError;
    let refusal = |r: Result<(), OpError>, what: &str| match r {
        Err(OpError::Store(StoreError::Schema(e))) => e,
        other => panic!(
            "{}: {what}: expected a schema refusal, got {other:?}",
            db.engine()
        ),
    };
    let run = refusal(
        cleanup::run(&ctx(db).await, &params()).await.map(drop),
        "run",
    );
    let dry = refusal(
        cleanup::run(
            &read_only(db),
            &CleanupParams {
                dry_run: true,
                ..params()
            },
        )
        .await
        .map(drop),
        "dry run",
    );
    let stats = refusal(cleanup::stats(db, &params()).await.map(drop), "stats");
    let text = run.to_string();
    assert_eq!(dry.to_string(), text, "the dry run says the same");
    assert_eq!(stats.to_string(), text, "the stats say the same");
    assert!(!text.contains('\n'), "one line: {text}");
    (run, text)
}

/// On PostgreSQL and MariaDB an `expires_at` that is not a date/time column (Unix seconds in
/// a BIGINT, text in a VARCHAR) is refused by the cleanup, its dry run and its stats with an
/// error naming the table, the column and its type; nothing is deleted. Fails without the
/// catalog check: MariaDB compared the number (or the text) with the cutoff and deleted the
/// session expiring in 2099; PostgreSQL failed with an operator error.
#[tokio::test]
async fn an_expiry_column_that_is_not_a_time_is_refused_and_nothing_is_deleted() {
    let day = ChronoDuration::days(1);
    let cases = [
        (
            "BIGINT",
            (t0() + day).and_utc().timestamp().to_string(),
            (t0() - day).and_utc().timestamp().to_string(),
        ),
        (
            "VARCHAR(32)",
            "01/01/2099 00:00".to_string(),
            "2020-01-01 00:00:00".to_string(),
        ),
    ];
    for engine in [Engine::MySql, Engine::Postgres] {
        for (sql_type, live, expired) in &cases {
            let alter = match engine {
                Engine::Postgres => format!(
                    "ALTER TABLE user_sessions ALTER COLUMN expires_at TYPE {sql_type} USING NULL"
                ),
                _ => format!("ALTER TABLE user_sessions MODIFY expires_at {sql_type} NOT NULL"),
            };
            let tdb = v2_shaped(engine, &[&alter]).await;
            let db = &tdb.db;
            let cast = match (engine, *sql_type) {
                (Engine::Postgres, "BIGINT") => "CAST(? AS BIGINT)",
                _ => "?",
            };
            let insert = format!(
                "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
                 VALUES (?, 1, ?, ?, ?, {cast}, TRUE)"
            );
            for (label, expires) in [("live", live), ("expired", expired)] {
                let recent = t0() - ChronoDuration::hours(1);
                sessionfleet::on_pool!(db, p => {
                    sqlx::query(db.sql(insert.clone())).bind(label).bind(recent).bind(recent).bind(recent)
                        .bind(expires.as_str()).execute(p).await.expect("insert session");
                });
            }
            let (refusal, text) = refused_everywhere(db).await;
            let data_type = match (engine, *sql_type) {
                (_, "BIGINT") => "bigint",
                (Engine::Postgres, _) => "character varying",
                _ => "varchar",
            };
            assert!(
                matches!(
                    &refusal,
                    sessionfleet::store::schema::SchemaError::TimeColumnType { table, column, data_type: t }
                        if table == "user_sessions" && column == "expires_at" && t == data_type
                ),
                "{engine} {sql_type}: {refusal:?}"
            );
            assert!(
                text.contains(&format!(
                    "column 'expires_at' is {data_type}, not a date/time type"
                )),
                "{engine} {sql_type}: {text}"
            );
            assert_eq!(
                every_label(db).await,
                BTreeSet::from(["live".to_string(), "expired".to_string()]),
                "{engine} {sql_type}: nothing deleted"
            );
            tdb.drop_db().await;
        }
    }
}

/// A table with `expires_at`, `last_activity` and `is_active` but no `session_fingerprint`
/// (which no rule reads) is judged by the v2 rules: a session idle three days whose expiry
/// is 27 days ahead stays, an expired one goes. Fails when any missing v2 column made the
/// table v1: `updated_at` older than the max age then deleted the unexpired session.
#[tokio::test]
async fn a_v2_table_without_a_fingerprint_keeps_its_unexpired_idle_sessions() {
    for engine in ENGINES {
        let tdb = v2_shaped(
            engine,
            &["ALTER TABLE user_sessions DROP COLUMN session_fingerprint"],
        )
        .await;
        let db = &tdb.db;
        let insert = "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
             VALUES (?, 1, ?, ?, ?, ?, TRUE)";
        let idle = t0() - ChronoDuration::days(3);
        for (label, expires) in [
            ("idle-unexpired", t0() + ChronoDuration::days(27)),
            ("expired", t0() - ChronoDuration::hours(1)),
        ] {
            sessionfleet::on_pool!(db, p => {
                sqlx::query(db.sql(insert)).bind(label).bind(idle).bind(idle).bind(idle)
                    .bind(expires).execute(p).await.expect("insert session");
            });
        }
        let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
        assert_eq!(report.expired_sessions_cleaned, 1, "{engine}");
        assert_eq!(
            every_label(db).await,
            BTreeSet::from(["idle-unexpired".to_string()]),
            "{engine}"
        );
        tdb.drop_db().await;
    }
}

/// An expiry column without a last-activity column fits neither profile: v1 would judge
/// `updated_at` and ignore an expiry still ahead, and v2's rules need the last activity. The
/// cleanup refuses the table, naming what it has and lacks, and deletes nothing. Fails when
/// such a table was judged as v1: the session idle three days but expiring in 27 was deleted.
#[tokio::test]
async fn an_expiry_without_a_last_activity_column_is_refused() {
    for engine in ENGINES {
        // SQLite drops no column an index names; the others drop the index with it.
        let drop: &[&str] = match engine {
            Engine::Sqlite => &[
                "DROP INDEX ix_user_sessions_last_activity",
                "ALTER TABLE user_sessions DROP COLUMN last_activity",
            ],
            _ => &["ALTER TABLE user_sessions DROP COLUMN last_activity"],
        };
        let tdb = v2_shaped(engine, drop).await;
        let db = &tdb.db;
        let insert = "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, expires_at, is_active) \
             VALUES (?, 1, ?, ?, ?, TRUE)";
        let idle = t0() - ChronoDuration::days(3);
        for (label, expires) in [
            ("idle-unexpired", t0() + ChronoDuration::days(27)),
            ("expired", t0() - ChronoDuration::hours(1)),
        ] {
            sessionfleet::on_pool!(db, p => {
                sqlx::query(db.sql(insert)).bind(label).bind(idle).bind(idle)
                    .bind(expires).execute(p).await.expect("insert session");
            });
        }
        let (refusal, text) = refused_everywhere(db).await;
        assert!(
            matches!(
                refusal,
                sessionfleet::store::schema::SchemaError::UnfitColumns { .. }
            ),
            "{engine}: {refusal:?}"
        );
        assert!(
            text.contains("has expires_at, is_active but not last_activity"),
            "{engine}: {text}"
        );
        assert_eq!(
            every_label(db).await,
            BTreeSet::from(["idle-unexpired".to_string(), "expired".to_string()]),
            "{engine}: nothing deleted"
        );
        tdb.drop_db().await;
    }
}

/// On SQLite a time column holds whatever was written. An expired session whose expiry is a
/// date without a time ('2020-06-01') is deleted with the others, and the walk along the
/// expiry index (the rule is sparse: 4 of 54 rows), one row a batch, goes on past it and past
/// a Julian day number (a REAL, which SQLite's `julianday` reads as a time). Fails when the
/// walk read its cursor as a date-time: the bare date failed to decode, so every run failed
/// before its first batch and nothing was ever deleted.
#[tokio::test]
async fn a_sqlite_expiry_written_as_a_bare_date_is_walked_past_and_deleted() {
    let tdb = v2_shaped(Engine::Sqlite, &[]).await;
    let db = &tdb.db;
    let recent = t0() - ChronoDuration::hours(1);
    let insert = "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
         VALUES (?, 1, ?, ?, ?, ?, TRUE)";
    let live = 50;
    for i in 0..live {
        sessionfleet::on_pool!(db, p => {
            sqlx::query(db.sql(insert)).bind(format!("live-{i}")).bind(recent).bind(recent).bind(recent)
                .bind(t0() + ChronoDuration::days(1)).execute(p).await.expect("insert live");
        });
    }
    for (label, expires) in [
        ("expired-1", (t0() - ChronoDuration::hours(1)).to_string()),
        ("expired-2", (t0() - ChronoDuration::hours(2)).to_string()),
        ("expired-bare-date", "2020-06-01".to_string()),
    ] {
        sessionfleet::on_pool!(db, p => {
            sqlx::query(db.sql(insert)).bind(label).bind(recent).bind(recent).bind(recent)
                .bind(expires).execute(p).await.expect("insert expired");
        });
    }
    // 2020-01-01 00:00 UTC as a Julian day number.
    sessionfleet::on_pool!(db, p => {
        sqlx::query(db.sql(insert)).bind("expired-julian-day").bind(recent).bind(recent).bind(recent)
            .bind(2_458_849.5_f64).execute(p).await.expect("insert expired");
    });
    let total = live + 4;
    assert!(
        4.0 < cleanup::DENSE_RULE_SHARE * f64::from(total),
        "the expired rule is sparse, so it walks the expiry index"
    );
    let one_by_one = CleanupParams {
        batch_size: 1,
        max_batch_size: 1,
        ..params()
    };
    let report = cleanup::run(&ctx(db).await, &one_by_one)
        .await
        .expect("a run past a bare date");
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    assert_eq!(report.expired_sessions_cleaned, 4, "{report:?}");
    assert!(report.batches >= 4, "one row a batch: {}", report.batches);
    let left = every_label(db).await;
    assert_eq!(left.len(), live as usize, "{left:?}");
    assert!(left.iter().all(|l| l.starts_with("live-")), "{left:?}");
    tdb.drop_db().await;
}

/// A rule whose time column no index leads with (the application dropped or never built
/// it) walks primary-key ranges instead of scanning and sorting the table for every batch,
/// says so in a note, and still deletes exactly the oracle's rows.
#[tokio::test]
async fn a_time_column_without_an_index_is_walked_by_key_ranges() {
    for engine in ENGINES {
        let version = SchemaVersion::V2;
        let what = format!("{engine} without ix_user_sessions_expires_at");
        let tdb = seeded(engine, version).await;
        let db = &tdb.db;
        let drop = match engine {
            Engine::MySql => "DROP INDEX ix_user_sessions_expires_at ON user_sessions",
            _ => "DROP INDEX ix_user_sessions_expires_at",
        };
        db.execute(drop).await.expect("drop the index");
        // Sparse, so the index walk would have been chosen had the index been there.
        let live_until = t0() + ChronoDuration::days(1);
        let sql = db.sql(
            "UPDATE user_sessions SET expires_at = ?, is_active = TRUE, last_activity = ? \
             WHERE id % 25 <> 0",
        );
        sessionfleet::on_pool!(db, p => {
            sqlx::query(sql).bind(live_until).bind(t0()).execute(p).await.expect("revive");
        });
        let before = snapshot(db, version).await;
        let purge = oracle(db, version, None, true).await;
        assert!(!purge.is_empty(), "{what}");
        let report = cleanup::run(&ctx(db).await, &params()).await.expect("run");
        assert_exactly_purged(&before, &snapshot(db, version).await, &purge, &what);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("leads with expires_at") && n.contains("--create-indexes")),
            "{what}: {:?}",
            report.notes
        );
        // The indexed activity column is still walked along its index: no note for it.
        assert!(
            !report
                .notes
                .iter()
                .any(|n| n.contains("leads with last_activity")),
            "{what}: {:?}",
            report.notes
        );
        tdb.drop_db().await;
    }
}
