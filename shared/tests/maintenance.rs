//! The maintenance operation against real SQLite, PostgreSQL and MariaDB databases.
//!
//! Each behaviour runs once per engine (a test per engine, so they run in parallel), on its
//! own database. Figures are compared with catalog queries written here independently.

use std::collections::BTreeSet;

use chrono::Utc;
use sessionfleet::CancellationToken;
use sessionfleet::fence::{self, Fence};
use sessionfleet::ops::cleanup::CleanupReport;
use sessionfleet::ops::full::{self, FullParams, FullReport, Stage};
use sessionfleet::ops::maintenance::{
    self, CheckStatus, MaintenanceAction, MaintenanceParams, MaintenanceReport,
};
use sessionfleet::ops::{OpContext, Outcome};
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Db, Engine, SchemaVersion};
use sessionfleet::testing::{TestDb, allow_sessions_without_a_user};
use sqlx::Row;

const SESSIONS: u64 = 400;

/// A fresh database of `engine` with demo data.
async fn seeded(engine: Engine, schema: SchemaVersion) -> TestDb {
    let tdb = TestDb::new(engine).await;
    seed_demo(
        &tdb.db,
        &SeedParams {
            sessions: SESSIONS,
            users: SeedParams::default_users(SESSIONS),
            seed: 7,
            schema,
            now: Utc::now().naive_utc(),
            reset: false,
        },
    )
    .await
    .expect("seed");
    tdb
}

async fn ctx_with_fence(db: &Db) -> (OpContext, Fence) {
    let fence = fence::issue_token(db, "target:test", "maintenance-test")
        .await
        .expect("token");
    let ctx = OpContext {
        db: db.clone(),
        fence: Some(fence.clone()),
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    (ctx, fence)
}

/// Index names of `table`, from a catalog query that does not share code with the library.
async fn catalog_index_names(db: &Db, table: &str) -> BTreeSet<String> {
    let names: Vec<String> = match db.engine() {
        Engine::Sqlite => sessionfleet::on_pool!(db, p => sqlx::query_scalar(db.sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?")).bind(table).fetch_all(p).await.unwrap()),
        Engine::Postgres => sessionfleet::on_pool!(db, p => sqlx::query_scalar(db.sql(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = ?")).bind(table).fetch_all(p).await.unwrap()),
        Engine::MySql => {
            sessionfleet::on_pool!(db, p => sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SHOW INDEX FROM {table}")))
            .fetch_all(p).await.unwrap().iter().map(|r| r.try_get::<String, _>("Key_name").unwrap()).collect())
        }
    };
    names.into_iter().collect()
}

/// Drops every foreign key of the session table, so orphans can exist on engines that
/// enforce them.
async fn drop_session_foreign_keys(db: &Db) {
    match db.engine() {
        Engine::Sqlite => {}
        Engine::Postgres => {
            let names: Vec<String> = sessionfleet::on_pool!(db, p => sqlx::query_scalar(db.sql(
                "SELECT conname::text FROM pg_constraint WHERE conrelid = 'user_sessions'::regclass AND contype = 'f'"))
                .fetch_all(p).await.unwrap());
            for n in names {
                db.execute(&format!("ALTER TABLE user_sessions DROP CONSTRAINT {n}"))
                    .await
                    .unwrap();
            }
        }
        Engine::MySql => {
            let names: Vec<String> = sessionfleet::on_pool!(db, p => sqlx::query_scalar(db.sql(
                "SELECT constraint_name FROM information_schema.referential_constraints \
                 WHERE constraint_schema = DATABASE() AND table_name = 'user_sessions'"))
                .fetch_all(p).await.unwrap());
            for n in names {
                db.execute(&format!("ALTER TABLE user_sessions DROP FOREIGN KEY {n}"))
                    .await
                    .unwrap();
            }
        }
    }
}

/// Deletes the sessions of missing users and platforms: the SQLite demo data carries them on
/// purpose, and a healthy database has none.
async fn remove_demo_orphans(db: &Db) {
    db.execute(
        "DELETE FROM user_sessions WHERE user_id NOT IN (SELECT id FROM users) \
         OR (active_platform_id IS NOT NULL AND active_platform_id NOT IN (SELECT id FROM platform_connections))",
    )
    .await
    .unwrap();
}

macro_rules! per_engine {
    ($check:ident: $($name:ident => $engine:expr),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $check($engine).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------
// Analyze

async fn analyze_figures_equal_the_catalog(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    let report = maintenance::analyze(db).await.expect("analyze");
    let s = &report.tables["user_sessions"];

    assert_eq!(
        s.row_count,
        db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap()
    );
    assert_eq!(
        s.unique_users,
        Some(
            db.scalar_i64("SELECT COUNT(*) FROM (SELECT DISTINCT user_id FROM user_sessions) d")
                .await
                .unwrap()
        )
    );
    assert!(s.oldest_record.is_some() && s.oldest_record <= s.newest_record);
    assert_eq!(
        report.tables["users"].row_count,
        db.scalar_i64("SELECT COUNT(*) FROM users").await.unwrap()
    );
    assert!(report.tables.contains_key("platform_connections"));

    // The real size, as the engine's catalog states it.
    let (table_bytes, total_bytes) = match engine {
        Engine::Sqlite => (
            db.scalar_i64("SELECT SUM(pgsize) FROM dbstat WHERE name = 'user_sessions'").await.unwrap(),
            db.scalar_i64(
                "SELECT SUM(pgsize) FROM dbstat WHERE name = 'user_sessions' OR name IN \
                 (SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'user_sessions')",
            )
            .await
            .unwrap(),
        ),
        Engine::Postgres => (
            db.scalar_i64("SELECT pg_relation_size('user_sessions')").await.unwrap(),
            db.scalar_i64("SELECT pg_total_relation_size('user_sessions')").await.unwrap(),
        ),
        Engine::MySql => (
            db.scalar_i64("SELECT CAST(data_length AS SIGNED) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'user_sessions'").await.unwrap(),
            db.scalar_i64("SELECT CAST(data_length + index_length AS SIGNED) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'user_sessions'").await.unwrap(),
        ),
    };
    assert_eq!(s.table_size_bytes, Some(table_bytes), "{}", s.size_source);
    assert_eq!(s.size_bytes, Some(total_bytes), "{}", s.size_source);
    // Not the original's "1 KiB per row" estimate.
    assert_ne!(s.size_bytes, Some(s.row_count * 1024));

    // The index listing (empty in the original) matches the catalog, with columns and uniqueness.
    let listed: BTreeSet<String> = report.indexes["user_sessions"]
        .iter()
        .map(|i| i.name.clone())
        .collect();
    assert_eq!(listed, catalog_index_names(db, "user_sessions").await);
    let by_key = report.indexes["user_sessions"]
        .iter()
        .find(|i| i.name == "ix_user_sessions_session_id")
        .expect("session id index listed");
    assert!(by_key.unique && by_key.columns == ["session_id"]);

    // v2 built by the reference DDL lacks the creation-time index, the composite index and
    // the report's two.
    assert_eq!(
        maintenance::missing_recommended_indexes(db).await.unwrap(),
        lacking(
            engine,
            &[
                "ix_user_sessions_created_at",
                "ix_user_sessions_user_platform",
                "ix_user_sessions_platform",
                "ix_user_sessions_user_active"
            ]
        )
    );
    assert!(
        report
            .recommendations
            .iter()
            .any(|r| r.starts_with("Missing recommended index: ix_user_sessions_user_platform")),
        "{:?}",
        report.recommendations
    );
    let text = report.render_text();
    assert!(text.contains("Indexes ("));
    // The session table comes first, as in the original's layout (the others follow).
    assert_eq!(
        text.lines().find(|l| l.starts_with("Table: ")),
        Some("Table: user_sessions"),
        "{text}"
    );
    // PostgreSQL with autovacuum off is told so; whether it is off is the server's setting.
    let autovacuum_advice = report
        .recommendations
        .iter()
        .any(|r| r.starts_with("Autovacuum is off on this server"));
    let server_autovacuum_off = engine == Engine::Postgres
        && db
            .scalar_i64("SELECT CAST(CASE WHEN current_setting('autovacuum') = 'off' THEN 1 ELSE 0 END AS BIGINT)")
            .await
            .unwrap()
            == 1;
    assert_eq!(
        autovacuum_advice, server_autovacuum_off,
        "{:?}",
        report.recommendations
    );
    tdb.drop_db().await;
}

per_engine!(analyze_figures_equal_the_catalog:
    analyze_figures_equal_the_catalog_sqlite => Engine::Sqlite,
    analyze_figures_equal_the_catalog_postgres => Engine::Postgres,
    analyze_figures_equal_the_catalog_mariadb => Engine::MySql);

/// The earliest creation and latest update of the sessions, and whether the engine's own
/// statistics record an analyze, read from time columns of the layouts applications use:
/// PostgreSQL `timestamptz`, MySQL `TIMESTAMP`, SQLite Unix seconds beside text. Fails if
/// analyze decodes the columns as plain date-times (it then failed with "mismatched types",
/// and so did `db --stats` and `maintenance --status`), if SQLite's ends are taken by storage
/// order (a number sorts before any text) instead of by time, or if MySQL's last analyze is
/// lost to its `timestamp` type.
async fn analyze_reads_zoned_and_numeric_time_columns(engine: Engine) {
    use chrono::{NaiveDateTime, TimeDelta, Timelike};
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    // Whole seconds, as every layout below can hold them.
    let first = NaiveDateTime::parse_from_str("2020-01-02 03:04:05", "%Y-%m-%d %H:%M:%S").unwrap();
    let last = Utc::now().naive_utc().with_nanosecond(0).unwrap() + TimeDelta::days(1);
    // Through a derived table: MySQL cannot read the table an UPDATE writes.
    let oldest_id = "(SELECT MIN(id) FROM (SELECT id FROM user_sessions) a)";
    let newest_id = "(SELECT MAX(id) FROM (SELECT id FROM user_sessions) b)";
    let set = |col: &str, id: &str, at: NaiveDateTime| {
        let value = match engine {
            // Unix seconds: a number, which SQLite sorts before every text value.
            Engine::Sqlite => at.and_utc().timestamp().to_string(),
            _ => format!("'{}'", at.format("%Y-%m-%d %H:%M:%S")),
        };
        format!("UPDATE user_sessions SET {col} = {value} WHERE id = {id}")
    };
    db.execute(&set("created_at", oldest_id, first))
        .await
        .unwrap();
    db.execute(&set("updated_at", newest_id, last))
        .await
        .unwrap();
    let _ = match engine {
        Engine::Postgres => db
            .execute(
                "ALTER TABLE user_sessions \
                 ALTER COLUMN created_at TYPE timestamptz USING created_at AT TIME ZONE 'UTC', \
                 ALTER COLUMN updated_at TYPE timestamptz USING updated_at AT TIME ZONE 'UTC'",
            )
            .await
            .unwrap(),
        Engine::MySql => {
            db.execute(
                "ALTER TABLE user_sessions MODIFY created_at TIMESTAMP(6) NULL, \
                 MODIFY updated_at TIMESTAMP(6) NULL",
            )
            .await
            .unwrap();
            db.execute("ANALYZE TABLE user_sessions").await.unwrap()
        }
        // A few more rows in Unix seconds, none at either end.
        Engine::Sqlite => db
            .execute(
                "UPDATE user_sessions SET created_at = CAST(strftime('%s', created_at) AS INTEGER) \
                 WHERE id % 3 = 0 AND typeof(created_at) = 'text'",
            )
            .await
            .unwrap(),
    };
    let report = maintenance::analyze(db).await.expect("analyze");
    let s = &report.tables["user_sessions"];
    assert_eq!(s.oldest_record, Some(first), "{engine}");
    assert_eq!(s.newest_record, Some(last), "{engine}");
    if engine == Engine::MySql {
        assert!(s.last_analyze.is_some(), "{engine}: {s:?}");
    }
    tdb.drop_db().await;
}

per_engine!(analyze_reads_zoned_and_numeric_time_columns:
    analyze_reads_zoned_and_numeric_time_columns_sqlite => Engine::Sqlite,
    analyze_reads_zoned_and_numeric_time_columns_postgres => Engine::Postgres,
    analyze_reads_zoned_and_numeric_time_columns_mariadb => Engine::MySql);

// ---------------------------------------------------------------------------------------
// Recommended indexes

/// `names` without the ones MariaDB already has: InnoDB indexes every foreign-key column
/// itself, and that index (on `active_platform_id`) serves `ix_user_sessions_platform`.
fn lacking(engine: Engine, names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .copied()
        .filter(|n| engine != Engine::MySql || *n != "ix_user_sessions_platform")
        .collect()
}

async fn create_indexes_is_idempotent_and_dry_run_creates_nothing(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    let drop = match engine {
        Engine::MySql => "DROP INDEX ix_user_sessions_expires_at ON user_sessions",
        _ => "DROP INDEX ix_user_sessions_expires_at",
    };
    db.execute(drop).await.unwrap();
    let before = catalog_index_names(db, "user_sessions").await;

    // Dry run: lists, creates nothing, needs no fence.
    let no_fence = OpContext {
        db: db.clone(),
        fence: None,
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    let dry = maintenance::create_indexes(&no_fence, true)
        .await
        .expect("dry run");
    assert!(dry.dry_run);
    let created = lacking(
        engine,
        &[
            "ix_user_sessions_created_at",
            "ix_user_sessions_user_platform",
            "ix_user_sessions_expires_at",
            "ix_user_sessions_platform",
            "ix_user_sessions_user_active",
        ],
    );
    assert_eq!(
        dry.indexes_created,
        created
            .iter()
            .map(|n| format!("{n} (would create)"))
            .collect::<Vec<_>>()
    );
    assert_eq!(catalog_index_names(db, "user_sessions").await, before);
    // A real run without a lease is refused.
    assert!(matches!(
        maintenance::create_indexes(&no_fence, false).await,
        Err(sessionfleet::ops::OpError::NoFence)
    ));

    let (ctx, _) = ctx_with_fence(db).await;
    let first = maintenance::create_indexes(&ctx, false)
        .await
        .expect("create");
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.indexes_created, created);
    let after = catalog_index_names(db, "user_sessions").await;
    assert!(
        after.contains("ix_user_sessions_user_platform")
            && after.contains("ix_user_sessions_created_at")
            && after.contains("ix_user_sessions_expires_at")
            && after.contains("ix_user_sessions_user_active")
    );
    assert!(
        maintenance::missing_recommended_indexes(db)
            .await
            .unwrap()
            .is_empty()
    );

    let second = maintenance::create_indexes(&ctx, false)
        .await
        .expect("second run");
    assert!(
        second.indexes_created.is_empty(),
        "{:?}",
        second.indexes_created
    );
    assert_eq!(
        second.indexes_skipped.len(),
        10,
        "{:?}",
        second.indexes_skipped
    );
    assert!(
        second
            .indexes_skipped
            .contains(&"ix_user_sessions_user_platform (already exists)".to_string())
    );
    assert_eq!(catalog_index_names(db, "user_sessions").await, after);
    tdb.drop_db().await;
}

per_engine!(create_indexes_is_idempotent_and_dry_run_creates_nothing:
    create_indexes_is_idempotent_and_dry_run_creates_nothing_sqlite => Engine::Sqlite,
    create_indexes_is_idempotent_and_dry_run_creates_nothing_postgres => Engine::Postgres,
    create_indexes_is_idempotent_and_dry_run_creates_nothing_mariadb => Engine::MySql);

async fn index_with_equivalent_columns_counts_as_present(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V1).await;
    let db = &tdb.db;
    for ddl in [
        "CREATE INDEX sessions_by_user_and_platform ON user_sessions (user_id, active_platform_id)",
        "CREATE INDEX sessions_by_platform ON user_sessions (active_platform_id, user_id)",
    ] {
        db.execute(ddl).await.unwrap();
    }
    let (ctx, _) = ctx_with_fence(db).await;
    let report = maintenance::create_indexes(&ctx, false).await.unwrap();
    // Only the index nothing stands in for is built.
    assert_eq!(report.indexes_created, ["ix_user_sessions_created_at"]);
    assert!(
        report.indexes_skipped.contains(
            &"ix_user_sessions_user_platform (already exists as sessions_by_user_and_platform)"
                .to_string()
        )
    );
    assert!(
        report.indexes_skipped.contains(
            &"ix_user_sessions_platform (already exists as sessions_by_platform)".to_string()
        ),
        "{:?}",
        report.indexes_skipped
    );
    assert!(
        !catalog_index_names(db, "user_sessions")
            .await
            .contains("ix_user_sessions_user_platform")
    );
    tdb.drop_db().await;
}

per_engine!(index_with_equivalent_columns_counts_as_present:
    index_with_equivalent_columns_counts_as_present_sqlite => Engine::Sqlite,
    index_with_equivalent_columns_counts_as_present_postgres => Engine::Postgres,
    index_with_equivalent_columns_counts_as_present_mariadb => Engine::MySql);

/// A partial index on a recommended index's columns serves only queries whose condition
/// implies its own, so the full index is still built (PostgreSQL and SQLite; MySQL has no
/// partial indexes). Fails if the partial index counts as present.
async fn a_partial_index_does_not_count_as_present(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V1).await;
    let db = &tdb.db;
    db.execute("CREATE INDEX sessions_created_by_known_users ON user_sessions (created_at) WHERE user_id > 0")
        .await
        .unwrap();
    let present = maintenance::table_indexes(db, "user_sessions")
        .await
        .unwrap();
    let partial: Vec<&str> = present
        .iter()
        .filter(|ix| ix.partial)
        .map(|ix| ix.name.as_str())
        .collect();
    assert_eq!(partial, ["sessions_created_by_known_users"]);
    let (ctx, _) = ctx_with_fence(db).await;
    let report = maintenance::create_indexes(&ctx, false).await.unwrap();
    assert!(
        report
            .indexes_created
            .contains(&"ix_user_sessions_created_at".to_string()),
        "{:?} / skipped {:?}",
        report.indexes_created,
        report.indexes_skipped
    );
    tdb.drop_db().await;
}

per_engine!(a_partial_index_does_not_count_as_present:
    a_partial_index_does_not_count_as_present_sqlite => Engine::Sqlite,
    a_partial_index_does_not_count_as_present_postgres => Engine::Postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_postgres_concurrent_build_is_rebuilt() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = &tdb.db;
    // A unique concurrent build over duplicate (user, platform) pairs fails after creating
    // the catalog entry: an INVALID index, exactly what an interrupted build leaves.
    let failed = db
        .execute("CREATE UNIQUE INDEX CONCURRENTLY ix_user_sessions_user_platform ON user_sessions (user_id, active_platform_id)")
        .await;
    assert!(failed.is_err(), "the seeded data has duplicate pairs");
    let valid = "SELECT COUNT(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE c.relname = 'ix_user_sessions_user_platform' AND i.indisvalid";
    let exists = "SELECT COUNT(*) FROM pg_class WHERE relname = 'ix_user_sessions_user_platform'";
    assert_eq!(db.scalar_i64(exists).await.unwrap(), 1);
    assert_eq!(db.scalar_i64(valid).await.unwrap(), 0);

    let analysis = maintenance::analyze(db).await.unwrap();
    let ix = analysis.indexes["user_sessions"]
        .iter()
        .find(|i| i.name == "ix_user_sessions_user_platform")
        .expect("listed");
    assert!(!ix.valid);
    assert!(
        analysis
            .recommendations
            .iter()
            .any(|r| r.contains("INVALID")),
        "{:?}",
        analysis.recommendations
    );
    assert_eq!(
        maintenance::missing_recommended_indexes(db).await.unwrap(),
        [
            "ix_user_sessions_created_at",
            "ix_user_sessions_user_platform",
            "ix_user_sessions_platform",
            "ix_user_sessions_user_active"
        ]
    );

    let (ctx, _) = ctx_with_fence(db).await;
    let report = maintenance::create_indexes(&ctx, false).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.invalid_indexes.len(), 1);
    assert!(report.invalid_indexes[0].starts_with("ix_user_sessions_user_platform (INVALID"));
    assert_eq!(
        report.indexes_created,
        [
            "ix_user_sessions_created_at",
            "ix_user_sessions_user_platform",
            "ix_user_sessions_platform",
            "ix_user_sessions_user_active"
        ]
    );
    assert_eq!(db.scalar_i64(valid).await.unwrap(), 1);
    assert_eq!(db.scalar_i64(exists).await.unwrap(), 1);
    tdb.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// Optimize

/// A cancelled optimize (its lease lost, the worker shutting down) runs no further
/// statement: each `VACUUM` or `OPTIMIZE TABLE` may take long, and the lease is gone. The
/// report names what was not run, and the job is continued rather than called done, like a
/// cut-short index build. Fails if the statements run anyway, or if the job ends completed
/// (it was then recorded succeeded with its statistics never refreshed).
async fn a_cancelled_optimize_runs_no_further_statement(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    let (ctx, _) = ctx_with_fence(db).await;
    ctx.cancel.cancel();
    let report = maintenance::optimize(&ctx, true).await.expect("optimize");
    assert!(
        report.operations_performed.is_empty(),
        "{:?}",
        report.operations_performed
    );
    assert!(report.cut_short(), "{report:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("cancelled") && n.contains("user_sessions")),
        "{:?}",
        report.notes
    );
    let job = sessionfleet::dispatch::OperationJob::Maintenance(MaintenanceParams {
        action: MaintenanceAction::Optimize { vacuum: true },
        dry_run: false,
    });
    let executed = job.execute(ctx.clone()).await.expect("a report");
    assert_eq!(executed.outcome, Outcome::Cancelled, "{engine}");
    assert!(executed.next.is_some(), "{engine}: a continuation follows");
    if engine == Engine::Sqlite {
        // No ANALYZE happened: SQLite would have created sqlite_stat1.
        assert_eq!(
            db.scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                .await
                .unwrap(),
            0
        );
    }
    tdb.drop_db().await;
}

per_engine!(a_cancelled_optimize_runs_no_further_statement:
    a_cancelled_optimize_runs_no_further_statement_sqlite => Engine::Sqlite,
    a_cancelled_optimize_runs_no_further_statement_postgres => Engine::Postgres,
    a_cancelled_optimize_runs_no_further_statement_mariadb => Engine::MySql);

/// Holds PostgreSQL's `SHARE UPDATE EXCLUSIVE` lock on the sessions table from a connection
/// of its own: `ANALYZE` and `VACUUM` of the table wait for it, reads and writes do not.
async fn hold_analyze_lock(url: &str) -> (Db, sessionfleet::store::DbTx<'static>) {
    let locker = Db::connect(
        url,
        &sessionfleet::store::ConnectOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut tx = locker.begin_write().await.unwrap();
    sessionfleet::on_tx!(&mut tx, c => {
        sqlx::raw_sql("SET LOCAL idle_in_transaction_session_timeout = 0; \
                       LOCK TABLE user_sessions IN SHARE UPDATE EXCLUSIVE MODE")
            .execute(&mut *c).await.map(|_| ()).unwrap()
    });
    (locker, tx)
}

/// Waits (bounded) until a statement starting with `prefix` waits for a lock.
async fn wait_for_lock_wait(db: &Db, prefix: &str) {
    let waiting = format!(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE '{prefix}%'"
    );
    let started = std::time::Instant::now();
    while db.scalar_i64(&waiting).await.unwrap() == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{prefix} never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Full maintenance cancelled while its optimize stage runs a statement (the lease lost, a
/// shutdown) hands the stage to a continuation, as its index stage does. Fails if the part
/// ends completed with the rest of the statements never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_maintenance_cut_short_in_its_optimize_stage_is_continued() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V1).await;
    let db = tdb.db.clone();
    let (locker, lock) = hold_analyze_lock(&tdb.url).await;
    let (ctx, _) = ctx_with_fence(&db).await;
    let cancel = ctx.cancel.clone();
    let part = tokio::spawn(async move {
        full::run(
            &ctx,
            &FullParams {
                stage: Stage::Optimize,
                ..FullParams::default()
            },
        )
        .await
    });
    wait_for_lock_wait(&db, "ANALYZE").await;
    cancel.cancel();
    lock.rollback().await.unwrap();
    locker.close().await;
    let part = part.await.unwrap().expect("a report");
    assert_eq!(part.outcome, Outcome::Cancelled, "{:?}", part.report);
    assert_eq!(part.next.expect("a continuation").stage, Stage::Optimize);
    let optimization = part
        .report
        .optimization
        .expect("the part's optimize report");
    assert!(
        optimization
            .notes
            .iter()
            .any(|n| n.starts_with("cancelled") && n.contains("ANALYZE users")),
        "{:?}",
        optimization.notes
    );
    tdb.drop_db().await;
}

async fn optimize_runs_the_promised_statements(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    let (ctx, _) = ctx_with_fence(db).await;

    let plain = maintenance::optimize(&ctx, false).await.expect("optimize");
    assert!(plain.errors.is_empty(), "{:?}", plain.errors);
    let statements: Vec<&str> = plain
        .operations_performed
        .iter()
        .map(|o| o.statement.as_str())
        .collect();
    let expected: Vec<&str> = match engine {
        Engine::Sqlite => vec![
            "ANALYZE user_sessions",
            "ANALYZE users",
            "ANALYZE platform_connections",
            "PRAGMA optimize",
        ],
        Engine::Postgres => vec![
            "ANALYZE user_sessions",
            "ANALYZE users",
            "ANALYZE platform_connections",
        ],
        Engine::MySql => vec![
            "ANALYZE TABLE user_sessions",
            "ANALYZE TABLE users",
            "ANALYZE TABLE platform_connections",
        ],
    };
    assert_eq!(statements, expected);
    match engine {
        // ANALYZE leaves its figures in sqlite_stat1.
        Engine::Sqlite => assert!(
            db.scalar_i64("SELECT COUNT(*) FROM sqlite_stat1 WHERE tbl = 'user_sessions'")
                .await
                .unwrap()
                > 0
        ),
        Engine::Postgres => wait_for_pg_stat(db, "last_analyze").await,
        Engine::MySql => {}
    }

    let vacuum = maintenance::optimize(&ctx, true)
        .await
        .expect("optimize --vacuum");
    assert!(vacuum.errors.is_empty(), "{:?}", vacuum.errors);
    let statements: Vec<&str> = vacuum
        .operations_performed
        .iter()
        .map(|o| o.statement.as_str())
        .collect();
    match engine {
        Engine::Sqlite => {
            assert_eq!(statements.last(), Some(&"VACUUM"));
            // auto_vacuum is NONE, as the reference leaves it: the incremental vacuum is
            // skipped and the report says why.
            assert!(!statements.contains(&"PRAGMA incremental_vacuum"));
            assert!(
                vacuum
                    .notes
                    .iter()
                    .any(|n| n.contains("auto_vacuum is NONE")),
                "{:?}",
                vacuum.notes
            );
        }
        Engine::Postgres => {
            assert_eq!(statements[0], "VACUUM (ANALYZE) user_sessions");
            assert!(!statements.iter().any(|s| s.contains("FULL")));
            wait_for_pg_stat(db, "last_vacuum").await;
        }
        Engine::MySql => assert_eq!(statements[0], "OPTIMIZE TABLE user_sessions"),
    }
    assert!(vacuum.render_text().contains("Operations:"));
    tdb.drop_db().await;
}

/// The cumulative statistics are flushed asynchronously; wait (bounded) for the column.
async fn wait_for_pg_stat(db: &Db, column: &str) {
    let sql = format!(
        "SELECT COUNT(*) FROM pg_stat_user_tables WHERE relname = 'user_sessions' AND {column} IS NOT NULL"
    );
    for _ in 0..50 {
        db.execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
        if db.scalar_i64(&sql).await.unwrap() == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("pg_stat_user_tables.{column} never set for user_sessions");
}

per_engine!(optimize_runs_the_promised_statements:
    optimize_runs_the_promised_statements_sqlite => Engine::Sqlite,
    optimize_runs_the_promised_statements_postgres => Engine::Postgres,
    optimize_runs_the_promised_statements_mariadb => Engine::MySql);

/// SQLite's statistics refresh samples each index (`analysis_limit`) instead of reading the
/// whole table: it runs in a write transaction, and a full `ANALYZE` of a large table held
/// the write lock ~1 s per million rows, past an application writer's busy timeout. The limit
/// is set on a connection of its own, never on one the pool hands out again. Fails if the
/// refresh reads every row: `sqlite_stat1` then holds what a full `ANALYZE` finds.
#[tokio::test]
async fn sqlite_optimize_samples_its_statistics() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V1).await;
    let db = &tdb.db;
    db.execute(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000) \
         INSERT INTO user_sessions (session_id, user_id, created_at, updated_at) \
         SELECT 'bulk-' || x, (SELECT MIN(id) FROM users) + x % 20, \
                datetime('now', '-' || (x % 1000) || ' minutes'), datetime('now') FROM n",
    )
    .await
    .unwrap();
    let stat1 = || async {
        let rows: Vec<(String, String)> = sessionfleet::on_pool!(db, p => sqlx::query_as(
            "SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'user_sessions' ORDER BY idx")
            .fetch_all(p).await.unwrap());
        rows
    };
    let (ctx, _) = ctx_with_fence(db).await;
    let report = maintenance::optimize(&ctx, false).await.expect("optimize");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let sampled = stat1().await;
    assert!(!sampled.is_empty());
    for mut conn in tdb.every_sqlite_connection().await {
        let limit: i64 = sqlx::query_scalar("PRAGMA analysis_limit")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(limit, 0, "a pooled connection kept the analysis limit");
    }
    // A full ANALYZE on a pooled connection (no limit), for comparison.
    db.execute("ANALYZE user_sessions").await.unwrap();
    assert_ne!(sampled, stat1().await, "optimize read every row");
    tdb.drop_db().await;
}

/// A SQLite `VACUUM` in WAL mode writes the whole compacted database into the WAL, and
/// SQLite keeps the WAL file at that length: without a cut-back the database file shrank
/// while the WAL grew by as much, and the space never went back to the file system. Fails if
/// the WAL file is left longer than the cleanup's target for it after the vacuum.
#[tokio::test]
async fn sqlite_vacuum_returns_the_space_to_the_file_system() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V1).await;
    let db = &tdb.db;
    // 48 MiB beside the sessions, half of it deleted: 24 MiB of free pages to give back.
    db.execute("CREATE TABLE filler (b BLOB)").await.unwrap();
    db.execute(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 12288) \
         INSERT INTO filler SELECT randomblob(4000) FROM n",
    )
    .await
    .unwrap();
    db.execute("DELETE FROM filler WHERE rowid % 2 = 0")
        .await
        .unwrap();
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").await.unwrap();
    let path = tdb.url.trim_start_matches("sqlite://").to_string();
    let bytes = |file: &str| std::fs::metadata(file).map_or(0, |m| m.len());
    let wal = format!("{path}-wal");
    let before = bytes(&path) + bytes(&wal);
    assert!(before > 48 << 20, "{before} bytes");

    let (ctx, _) = ctx_with_fence(db).await;
    let report = maintenance::optimize(&ctx, true).await.expect("vacuum");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        bytes(&wal) <= sessionfleet::ops::cleanup::SQLITE_WAL_FILE_TARGET,
        "WAL file left at {} bytes: {:?}",
        bytes(&wal),
        report.notes
    );
    let after = bytes(&path) + bytes(&wal);
    assert!(after < before, "{after} bytes after, {before} before");
    tdb.drop_db().await;
}

/// An optimize statement that fails (here `ANALYZE` of the sessions table, held past the
/// lock timeout by another session's lock) fails the standalone job, which the fleet then
/// retries and the CLI exits 1 for, with an error naming the statement; full maintenance,
/// which goes on past a failed stage, ends `completed_with_errors` and lists the error.
/// Fails if either reads as a success: the job was recorded succeeded and exited 0, and the
/// summary said `completed` without a word of the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimize_errors_fail_the_step_and_mark_full_maintenance() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V1).await;
    let db = &tdb.db;
    let (locker, lock) = hold_analyze_lock(&tdb.url).await;
    let (ctx, _) = ctx_with_fence(db).await;

    let job = sessionfleet::dispatch::OperationJob::Maintenance(MaintenanceParams {
        action: MaintenanceAction::Optimize { vacuum: false },
        dry_run: false,
    });
    let err = job
        .execute(ctx.clone())
        .await
        .expect_err("a failed statement fails the step");
    let message = err.to_string();
    assert!(
        message.contains("ANALYZE user_sessions") && message.contains("lock timeout"),
        "{message}"
    );
    assert!(message.contains("ANALYZE users"), "what ran: {message}");

    let run = full::run(
        &ctx,
        &FullParams {
            stage: Stage::Optimize,
            ..FullParams::default()
        },
    )
    .await
    .expect("full maintenance goes on past a failed statement");
    lock.rollback().await.unwrap();
    locker.close().await;
    let report = run.report;
    assert_eq!(report.summary.status, "completed_with_errors");
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.starts_with("optimize: ") && e.contains("ANALYZE user_sessions")),
        "{:?}",
        report.errors
    );
    assert!(
        report.render_text().contains("ANALYZE user_sessions"),
        "{}",
        report.render_text()
    );
    tdb.drop_db().await;
}

/// Index builds that fail (here a table already holds a recommended index's name) fail the
/// standalone job and make full maintenance `completed_with_errors`, never "No maintenance
/// actions required". Fails if they read as a success.
#[tokio::test]
async fn index_build_errors_fail_the_step_and_mark_full_maintenance() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V1).await;
    let db = &tdb.db;
    let missing = maintenance::missing_recommended_indexes(db).await.unwrap();
    assert!(!missing.is_empty());
    for name in &missing {
        db.execute(&format!("CREATE TABLE {name} (a INTEGER)"))
            .await
            .unwrap();
    }
    let (ctx, _) = ctx_with_fence(db).await;
    let job = sessionfleet::dispatch::OperationJob::Maintenance(MaintenanceParams {
        action: MaintenanceAction::CreateIndexes,
        dry_run: false,
    });
    let err = job
        .execute(ctx.clone())
        .await
        .expect_err("failed builds fail the step");
    assert!(err.to_string().contains(missing[0].as_str()), "{err}");

    let run = full::run(
        &ctx,
        &FullParams {
            stage: Stage::Indexes,
            ..FullParams::default()
        },
    )
    .await
    .unwrap();
    let report = run.report;
    assert_eq!(report.summary.status, "completed_with_errors");
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.starts_with("create indexes: ") && e.contains(missing[0].as_str())),
        "{:?}",
        report.errors
    );

    // Every statement of a stage failed and nothing else happened: still no "nothing to do".
    let mut failed = report.optimization.clone().expect("optimize ran");
    failed.operations_performed.clear();
    failed.errors = vec!["Error during optimization: ANALYZE user_sessions: locked".into()];
    let only_errors = FullReport {
        optimization: Some(failed),
        ..FullReport::default()
    };
    let summary = full::summarize(&only_errors);
    assert_eq!(summary.status, "completed_with_errors");
    assert!(
        !summary
            .actions_taken
            .contains(&"No maintenance actions required".to_string()),
        "{summary:?}"
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn sqlite_incremental_vacuum_runs_when_auto_vacuum_is_incremental() {
    use sqlx::ConnectOptions as _;
    use std::str::FromStr;
    // auto_vacuum is fixed when the file's first table is created: make the file first.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("incremental.db").display());
    let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
        .unwrap()
        .create_if_missing(true)
        .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE first_table (a INTEGER)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();

    let db = Db::connect(&url, &sessionfleet::store::ConnectOptions::default())
        .await
        .unwrap();
    seed_demo(
        &db,
        &SeedParams {
            sessions: 50,
            users: 10,
            seed: 1,
            schema: SchemaVersion::V2,
            now: Utc::now().naive_utc(),
            reset: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(db.scalar_i64("PRAGMA auto_vacuum").await.unwrap(), 2);
    let (ctx, _) = ctx_with_fence(&db).await;
    let report = maintenance::optimize(&ctx, true).await.unwrap();
    assert!(
        report
            .operations_performed
            .iter()
            .any(|o| o.statement == "PRAGMA incremental_vacuum")
    );
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    db.close().await;
}

// ---------------------------------------------------------------------------------------
// Integrity

async fn integrity_passes_on_a_healthy_database(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    if engine == Engine::Sqlite {
        remove_demo_orphans(db).await;
    }
    for full in [false, true] {
        let report = maintenance::integrity_check(db, full)
            .await
            .expect("integrity");
        assert_eq!(
            report.integrity_check,
            CheckStatus::Passed,
            "{:?}",
            report.issues_found
        );
        assert_eq!(
            report.foreign_key_check,
            CheckStatus::Passed,
            "{:?}",
            report.issues_found
        );
        assert!(report.issues_found.is_empty(), "{:?}", report.issues_found);
        assert_eq!(report.recommendations, ["Database integrity is good"]);
    }
    if engine == Engine::Postgres {
        // The B-tree checks really ran: the extension is there and indexes were checked.
        assert_eq!(
            db.scalar_i64("SELECT COUNT(*) FROM pg_extension WHERE extname = 'amcheck'")
                .await
                .unwrap(),
            1
        );
    }
    tdb.drop_db().await;
}

per_engine!(integrity_passes_on_a_healthy_database:
    integrity_passes_on_a_healthy_database_sqlite => Engine::Sqlite,
    integrity_passes_on_a_healthy_database_postgres => Engine::Postgres,
    integrity_passes_on_a_healthy_database_mariadb => Engine::MySql);

/// An index whose name needs quotes (mixed case, as some migration tools write them) is
/// checked like any other. Fails if its catalog name is passed to amcheck as bare text: the
/// cast to `regclass` folds it to lower case, finds no such index, and the storage check
/// ends `unavailable` on a healthy database.
#[tokio::test]
async fn postgres_integrity_checks_an_index_whose_name_needs_quotes() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = &tdb.db;
    db.execute(r#"CREATE INDEX "Ix_Sessions_Created" ON user_sessions (created_at)"#)
        .await
        .unwrap();
    let report = maintenance::integrity_check(db, false)
        .await
        .expect("integrity");
    assert_eq!(
        report.integrity_check,
        CheckStatus::Passed,
        "{:?}",
        report.issues_found
    );
    tdb.drop_db().await;
}

/// A session without a user (a nullable `user_id`: guest sessions) references nothing, as
/// SQL's own foreign keys see it: no violation. Fails if the orphan query counts NULLs.
async fn integrity_counts_no_violation_for_a_session_without_a_user(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    remove_demo_orphans(db).await;
    allow_sessions_without_a_user(db).await;
    db.execute(
        "INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) \
         VALUES ('guest', NULL, '2030-01-01 00:00:00', '2030-01-01 00:00:00', '2030-01-01 00:00:00', '2030-01-02 00:00:00', TRUE)",
    )
    .await
    .expect("guest session");
    let report = maintenance::integrity_check(db, false)
        .await
        .expect("integrity");
    assert_eq!(
        report.foreign_key_check,
        CheckStatus::Passed,
        "{engine}: {:?}",
        report.issues_found
    );
    tdb.drop_db().await;
}

per_engine!(integrity_counts_no_violation_for_a_session_without_a_user:
    integrity_counts_no_violation_for_a_session_without_a_user_sqlite => Engine::Sqlite,
    integrity_counts_no_violation_for_a_session_without_a_user_postgres => Engine::Postgres,
    integrity_counts_no_violation_for_a_session_without_a_user_mariadb => Engine::MySql);

async fn integrity_fails_on_orphaned_sessions(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    drop_session_foreign_keys(db).await;
    // Delete a user (and their platforms) that still has sessions.
    let min_user = match engine {
        Engine::Postgres => {
            "SELECT MIN(user_id)::bigint FROM user_sessions WHERE user_id IN (SELECT id FROM users)"
        }
        _ => "SELECT MIN(user_id) FROM user_sessions WHERE user_id IN (SELECT id FROM users)",
    };
    let user = db.scalar_i64(min_user).await.unwrap();
    db.execute(&format!(
        "DELETE FROM platform_connections WHERE user_id = {user}"
    ))
    .await
    .unwrap();
    db.execute(&format!("DELETE FROM users WHERE id = {user}"))
        .await
        .unwrap();
    let orphans = db
        .scalar_i64(
            "SELECT COUNT(*) FROM user_sessions WHERE user_id NOT IN (SELECT id FROM users)",
        )
        .await
        .unwrap();
    assert!(orphans > 0);

    let report = maintenance::integrity_check(db, false)
        .await
        .expect("integrity");
    assert_eq!(
        report.integrity_check,
        CheckStatus::Passed,
        "{:?}",
        report.issues_found
    );
    assert_eq!(report.foreign_key_check, CheckStatus::Failed);
    match engine {
        Engine::Sqlite => assert!(
            report.issues_found.iter().any(|i| i.starts_with("Foreign key violation: user_sessions row")),
            "{:?}",
            report.issues_found
        ),
        _ => assert!(
            report.issues_found.contains(&format!(
                "Foreign key violation: {orphans} sessions in user_sessions reference missing users (user_sessions.user_id → users.id)"
            )),
            "{:?}",
            report.issues_found
        ),
    }
    assert!(
        report
            .recommendations
            .iter()
            .any(|r| r.starts_with("Foreign key violations found"))
    );
    assert!(report.render_text().contains("Foreign Key Check: failed"));
    tdb.drop_db().await;
}

per_engine!(integrity_fails_on_orphaned_sessions:
    integrity_fails_on_orphaned_sessions_sqlite => Engine::Sqlite,
    integrity_fails_on_orphaned_sessions_postgres => Engine::Postgres,
    integrity_fails_on_orphaned_sessions_mariadb => Engine::MySql);

/// Overwrites `len` bytes at `offset` of the file with garbage.
fn scribble(path: &str, offset: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open db file");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let garbage: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(17))
        .collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test]
async fn integrity_fails_on_a_corrupted_sqlite_file() {
    let tdb = TestDb::new(Engine::Sqlite).await;
    seed_demo(
        &tdb.db,
        &SeedParams {
            sessions: 3000,
            users: 150,
            seed: 3,
            schema: SchemaVersion::V2,
            now: Utc::now().naive_utc(),
            reset: false,
        },
    )
    .await
    .unwrap();
    // Everything into the main file before scribbling on it: a checkpoint now, rather than
    // relying on the last connection's close to do it (the close may still be finishing on
    // the connection's thread when the size is read; this failed once in CI with 4096 bytes).
    tdb.db
        .execute("PRAGMA wal_checkpoint(TRUNCATE)")
        .await
        .expect("checkpoint");
    tdb.db.close().await;
    let path = tdb.url.trim_start_matches("sqlite://").to_string();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(
        size > 64 * 4096,
        "file large enough to corrupt its middle ({size} bytes)"
    );
    // Garbage over several pages in the middle of the file (the header stays intact).
    scribble(&path, size / 2 - (size / 2) % 4096, 8 * 4096);

    for full in [false, true] {
        let report = maintenance::integrity_check_url(&tdb.url, full)
            .await
            .expect("a report, not an error");
        assert_eq!(report.integrity_check, CheckStatus::Failed, "{:?}", report);
        assert!(
            report
                .issues_found
                .iter()
                .any(|i| i.starts_with("Integrity check failed: "))
        );
        assert!(
            report.recommendations.contains(
                &"Database corruption detected - consider backup and restore".to_string()
            )
        );
        assert!(report.render_text().contains("Integrity Check: failed"));
    }

    // A file whose header is garbage cannot even be opened: still a failed report.
    scribble(&path, 0, 4096);
    let report = maintenance::integrity_check_url(&tdb.url, false)
        .await
        .expect("a report, not an error");
    assert_eq!(report.integrity_check, CheckStatus::Failed);
    assert!(
        report.issues_found[0].starts_with("Integrity check failed: cannot open the database"),
        "{:?}",
        report.issues_found
    );
}

// ---------------------------------------------------------------------------------------
// Fence

async fn stale_fence_refuses_to_change_anything(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V1).await;
    let db = &tdb.db;
    let (stale_ctx, _) = ctx_with_fence(db).await;
    // A newer holder takes the lease; the first holder's token is now stale.
    let _newer = fence::issue_token(db, "target:test", "newer")
        .await
        .unwrap();
    let before = catalog_index_names(db, "user_sessions").await;

    let err = maintenance::create_indexes(&stale_ctx, false)
        .await
        .expect_err("fenced out");
    assert!(err.is_fenced_out(), "{err}");
    assert_eq!(catalog_index_names(db, "user_sessions").await, before);
    assert!(!before.contains("ix_user_sessions_user_platform"));

    for vacuum in [false, true] {
        let err = maintenance::optimize(&stale_ctx, vacuum)
            .await
            .expect_err("fenced out");
        assert!(err.is_fenced_out(), "{err}");
    }
    // Full maintenance fenced out at its index stage keeps what earlier parts did and hands
    // the stage to a continuation, without calling the refusal an error of the run.
    let mut earlier_cleanup = CleanupReport::new(Utc::now().naive_utc(), false);
    earlier_cleanup.expired_sessions_cleaned = 10;
    let earlier = FullReport {
        cleanup: Some(earlier_cleanup),
        ..FullReport::default()
    };
    // The rows a part reports are its own, not the run's so far (earlier parts counted theirs).
    let executed = sessionfleet::dispatch::OperationJob::FullMaintenance(Box::new(FullParams {
        stage: Stage::Indexes,
        partial: Some(earlier.clone()),
        ..FullParams::default()
    }))
    .execute(stale_ctx.clone())
    .await
    .expect("a fenced-out part reports");
    assert_eq!(executed.rows, 0);
    let fenced = full::run(
        &stale_ctx,
        &FullParams {
            stage: Stage::Indexes,
            partial: Some(earlier),
            ..FullParams::default()
        },
    )
    .await
    .expect("a fenced-out part reports");
    assert_eq!(fenced.outcome, Outcome::FencedOut);
    assert!(fenced.report.cleanup.is_some(), "{:?}", fenced.report);
    assert!(
        fenced.report.errors.is_empty(),
        "{:?}",
        fenced.report.errors
    );
    let next = fenced.next.expect("a continuation");
    assert_eq!(next.stage, Stage::Indexes);
    assert!(next.partial.is_some_and(|p| p.cleanup.is_some()));
    assert_eq!(catalog_index_names(db, "user_sessions").await, before);
    if engine == Engine::Sqlite {
        // No ANALYZE happened: SQLite would have created sqlite_stat1.
        assert_eq!(
            db.scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                .await
                .unwrap(),
            0
        );
    }
    tdb.drop_db().await;
}

per_engine!(stale_fence_refuses_to_change_anything:
    stale_fence_refuses_to_change_anything_sqlite => Engine::Sqlite,
    stale_fence_refuses_to_change_anything_postgres => Engine::Postgres,
    stale_fence_refuses_to_change_anything_mariadb => Engine::MySql);

// ---------------------------------------------------------------------------------------
// Statistics and the dispatcher

async fn stats_report_size_counts_and_pool(engine: Engine) {
    let tdb = seeded(engine, SchemaVersion::V2).await;
    let db = &tdb.db;
    let ctx = OpContext {
        db: db.clone(),
        fence: None,
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    let params = MaintenanceParams {
        action: MaintenanceAction::Stats,
        dry_run: false,
    };
    let MaintenanceReport::Statistics(stats) = maintenance::run(&ctx, &params).await.unwrap()
    else {
        panic!("statistics expected");
    };
    assert!(
        stats.database_size_bytes
            >= stats.table_analysis.tables["user_sessions"]
                .size_bytes
                .unwrap_or(0)
    );
    assert!(stats.connection_pool.max_connections >= 1);
    assert_eq!(stats.connection_pool.engine, engine.name());
    let text = MaintenanceReport::Statistics(stats.clone()).render_text();
    assert!(
        text.contains(&format!("Session Records: {SESSIONS}")),
        "{text}"
    );
    // Reports travel through Redis as JSON.
    let json = serde_json::to_string(&MaintenanceReport::Statistics(stats)).unwrap();
    let back: MaintenanceReport = serde_json::from_str(&json).unwrap();
    assert!(matches!(back, MaintenanceReport::Statistics(_)));

    let refused = MaintenanceParams {
        action: MaintenanceAction::Optimize { vacuum: true },
        dry_run: true,
    };
    assert!(refused.validate().is_err());
    tdb.drop_db().await;
}

per_engine!(stats_report_size_counts_and_pool:
    stats_report_size_counts_and_pool_sqlite => Engine::Sqlite,
    stats_report_size_counts_and_pool_postgres => Engine::Postgres,
    stats_report_size_counts_and_pool_mariadb => Engine::MySql);

/// Index builds a cancellation (a shutdown, a lost lease) stopped before are left for a
/// continuation, not reported done: the standalone job continues, full maintenance resumes
/// at its index stage, and the continuation builds them. Fails if a cut-short build counts
/// as finished (the job then ended with the indexes missing and exit 0).
#[tokio::test]
async fn index_builds_cut_short_by_a_cancellation_are_continued() {
    for engine in [Engine::Sqlite, Engine::Postgres] {
        let tdb = seeded(engine, SchemaVersion::V1).await;
        let db = &tdb.db;
        let before = catalog_index_names(db, "user_sessions").await;
        let (cancelled, _) = ctx_with_fence(db).await;
        cancelled.cancel.cancel();

        let r = maintenance::create_indexes(&cancelled, false)
            .await
            .unwrap();
        assert!(r.cut_short(), "{engine}: {r:?}");
        assert!(
            r.indexes_created.is_empty() && r.errors.is_empty(),
            "{engine}: {r:?}"
        );

        let job = sessionfleet::dispatch::OperationJob::Maintenance(MaintenanceParams {
            action: MaintenanceAction::CreateIndexes,
            dry_run: false,
        });
        let standalone = job.execute(cancelled.clone()).await.unwrap();
        assert_eq!(standalone.outcome, Outcome::Cancelled, "{engine}");
        assert!(
            standalone.next.is_some(),
            "{engine}: a continuation follows"
        );

        let part = full::run(
            &cancelled,
            &FullParams {
                stage: Stage::Indexes,
                ..FullParams::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(part.outcome, Outcome::Cancelled, "{engine}");
        assert_eq!(part.next.expect("a continuation").stage, Stage::Indexes);
        assert_eq!(catalog_index_names(db, "user_sessions").await, before);

        let (resumed, _) = ctx_with_fence(db).await;
        let r = maintenance::create_indexes(&resumed, false).await.unwrap();
        assert!(
            !r.cut_short() && !r.indexes_created.is_empty(),
            "{engine}: {r:?}"
        );
        assert!(catalog_index_names(db, "user_sessions").await.len() > before.len());
        tdb.drop_db().await;
    }
}

/// A concurrent index build waits for every transaction older than it (a long report, a
/// pg_dump) instead of failing after the maintenance lock timeout: such waits block no
/// application query. Fails if the build gives up after `LOCK_TIMEOUT` — it would then be
/// dropped and never built while any long transaction runs at the scheduled hour.
#[tokio::test]
async fn postgres_index_builds_outwait_a_long_transaction() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V1).await;
    let db = tdb.db.clone();
    let old = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
        .await
        .unwrap();
    // An application transaction that has written and not yet committed.
    let mut long = old.begin_write().await.unwrap();
    sessionfleet::on_tx!(&mut long, c => {
        sqlx::raw_sql("SET LOCAL idle_in_transaction_session_timeout = 0; \
                       UPDATE user_sessions SET updated_at = updated_at \
                       WHERE id = (SELECT MIN(id) FROM user_sessions)")
            .execute(&mut *c).await.map(|_| ()).unwrap()
    });
    let (ctx, _) = ctx_with_fence(&db).await;
    let build = tokio::spawn(async move { maintenance::create_indexes(&ctx, false).await });
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE 'CREATE INDEX CONCURRENTLY%'";
    let started = std::time::Instant::now();
    while db.scalar_i64(waiting).await.unwrap() == 0 {
        assert!(
            !build.is_finished(),
            "the build never waited for the old transaction"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Past the lock timeout that maintenance statements otherwise run under.
    tokio::time::sleep(maintenance::LOCK_TIMEOUT + std::time::Duration::from_secs(1)).await;
    long.rollback().await.unwrap();
    old.close().await;
    let report = build.await.unwrap().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!report.indexes_created.is_empty(), "{report:?}");
    tdb.drop_db().await;
}

/// A B-tree check that cannot run (its index locked past the lock timeout, a statement
/// timeout) says so and leaves the storage check unavailable; it is no evidence of
/// corruption, and "backup and restore" would be the wrong advice. Fails if the timeout is
/// reported as corruption.
#[tokio::test]
async fn a_postgres_index_check_that_times_out_is_not_corruption() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let locker = Db::connect(&tdb.url, &sessionfleet::store::ConnectOptions::default())
        .await
        .unwrap();
    let mut tx = locker.begin_write().await.unwrap();
    // REINDEX holds the index exclusively until the transaction ends; reads go on.
    sessionfleet::on_tx!(&mut tx, c => {
        sqlx::raw_sql("SET LOCAL idle_in_transaction_session_timeout = 0; \
                       REINDEX INDEX platform_connections_pkey")
            .execute(&mut *c).await.map(|_| ()).unwrap()
    });
    let db = tdb.db.clone();
    let check = tokio::spawn(async move { maintenance::integrity_check(&db, false).await });
    // The index's check waits for the lock, then gives up at the lock timeout; the lock goes
    // then, before the foreign-key check (whose plan reads that index too) gives up as well.
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE '%bt_index_check%'";
    let started = std::time::Instant::now();
    while tdb.db.scalar_i64(waiting).await.unwrap() == 0 {
        assert!(!check.is_finished(), "the index check never waited");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    while tdb.db.scalar_i64(waiting).await.unwrap() > 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tx.rollback().await.unwrap();
    locker.close().await;
    let report = check.await.unwrap().unwrap();
    assert_eq!(
        report.integrity_check,
        CheckStatus::Unavailable,
        "{:?}",
        report.issues_found
    );
    assert!(
        report
            .issues_found
            .iter()
            .any(|i| i.contains("platform_connections_pkey could not be checked")),
        "{:?}",
        report.issues_found
    );
    assert!(
        !report
            .recommendations
            .iter()
            .any(|r| r.contains("corruption")),
        "{:?}",
        report.recommendations
    );
    tdb.drop_db().await;
}

/// Indexes an earlier part of a full maintenance built stay "created" in the run's report
/// when a continuation resumes at the index stage (where they now exist). Fails if the
/// continuation's report replaces the earlier part's.
#[tokio::test]
async fn full_maintenance_keeps_indexes_an_earlier_part_built() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V1).await;
    let (ctx, _) = ctx_with_fence(&tdb.db).await;
    let built = maintenance::create_indexes(&ctx, false).await.unwrap();
    assert!(!built.indexes_created.is_empty());
    let earlier = FullReport {
        indexes: Some(built.clone()),
        ..FullReport::default()
    };
    let run = full::run(
        &ctx,
        &FullParams {
            stage: Stage::Indexes,
            partial: Some(earlier),
            ..FullParams::default()
        },
    )
    .await
    .unwrap();
    let indexes = run.report.indexes.expect("index report");
    assert_eq!(indexes.indexes_created, built.indexes_created);
    for name in &built.indexes_created {
        assert!(
            !indexes
                .indexes_skipped
                .iter()
                .any(|s| s.starts_with(name.as_str())),
            "{name} is not 'already exists': {:?}",
            indexes.indexes_skipped
        );
    }
    let created = format!("Created {} database indexes", built.indexes_created.len());
    assert!(
        run.report.summary.actions_taken.contains(&created),
        "{:?}",
        run.report.summary.actions_taken
    );
    tdb.drop_db().await;
}

/// Polls the sessions of this PostgreSQL database that wait for a lock until `done` holds of
/// their number; false if it still does not after a minute (a bound for a failing test, never
/// the outcome of a passing one).
async fn lock_waiters_until(db: &Db, done: impl Fn(i64) -> bool) -> bool {
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let started = std::time::Instant::now();
    while !done(db.scalar_i64(waiting).await.unwrap()) {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Full maintenance cancelled once optimize is done, while its health report reads (a worker
/// shutting down), hands the report stage to a continuation at once — no report, its queries
/// cancelled on the server with the table still locked — and the continuation, with a fresh
/// token, finishes the run from there. Fails if the report stage ignores the cancellation:
/// the part then waits out the report and ends completed, and a worker past its shutdown
/// timeout hands the job back to run cleanup, index builds and optimize again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_maintenance_cancelled_in_its_report_stage_continues_there() {
    use sessionfleet::testing::HeldLock;

    let tdb = seeded(Engine::Postgres, SchemaVersion::V2).await;
    let db = tdb.db.clone();
    // Optimize is done (planned, in a dry run) before the report waits for the table.
    let lock = HeldLock::sessions_table(&tdb.url).await;
    let (ctx, _) = ctx_with_fence(&db).await;
    let cancel = ctx.cancel.clone();
    let params = FullParams {
        stage: Stage::Optimize,
        dry_run: true,
        ..FullParams::default()
    };
    let part = tokio::spawn({
        let params = params.clone();
        async move { full::run(&ctx, &params).await }
    });
    assert!(
        lock_waiters_until(&db, |n| n > 0).await,
        "the report never waited for the lock"
    );
    cancel.cancel();
    let started = std::time::Instant::now();
    while !part.is_finished() && started.elapsed() < std::time::Duration::from_secs(60) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gave_up = part.is_finished();
    let queries_left = gave_up && !lock_waiters_until(&db, |n| n == 0).await;
    lock.release().await;
    let part = part.await.unwrap().expect("a part");
    assert_eq!(part.outcome, Outcome::Cancelled, "{:?}", part.report);
    assert!(gave_up, "the part waited for the lock");
    assert!(
        !queries_left,
        "the report's queries still wait on the server"
    );
    assert!(part.report.analytics.is_none(), "{:?}", part.report);
    let next = part.next.expect("a continuation");
    assert_eq!(next.stage, Stage::Report);
    let planned = part.report.planned_optimizations.clone();
    assert!(!planned.is_empty());

    let (resumed, _) = ctx_with_fence(&db).await;
    let done = full::run(&resumed, &next).await.expect("the continuation");
    assert_eq!(done.outcome, Outcome::Completed, "{:?}", done.report);
    assert!(done.next.is_none());
    assert!(done.report.analytics.is_some(), "{:?}", done.report);
    assert_eq!(done.report.planned_optimizations, planned, "carried over");
    assert!(done.report.errors.is_empty(), "{:?}", done.report.errors);
    tdb.drop_db().await;
}
