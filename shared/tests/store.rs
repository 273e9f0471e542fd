//! Engines, schema detection and creation, demo data and the fence, on SQLite, PostgreSQL
//! and MariaDB — each test in its own database.

use std::time::Duration;

use chrono::NaiveDate;
use sessionfleet::fence;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Engine, SchemaVersion, StoreError, schema};
use sessionfleet::testing::{ENGINES, TestDb};

fn fixed_now() -> chrono::NaiveDateTime {
    NaiveDate::from_ymd_opt(2026, 11, 1)
        .unwrap()
        .and_hms_opt(12, 0, 0)
        .unwrap()
}

fn params(sessions: u64, seed: u64, version: SchemaVersion) -> SeedParams {
    SeedParams {
        sessions,
        users: SeedParams::default_users(sessions),
        seed,
        schema: version,
        now: fixed_now(),
        reset: false,
    }
}

#[tokio::test]
async fn connect_reports_engine_and_version() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        let info = t.db.describe().await.unwrap();
        assert_eq!(info.engine, engine);
        assert!(
            info.version
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit()),
            "{engine}: {}",
            info.version
        );
        t.drop_db().await;
    }
}

#[tokio::test]
async fn unknown_scheme_and_unreachable_server_are_clear_errors() {
    let opts = sessionfleet::store::ConnectOptions {
        attempts: 2,
        initial_backoff: std::time::Duration::from_millis(10),
        ..Default::default()
    };
    let e = sessionfleet::store::Db::connect("oracle://x/y", &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::UnknownScheme(_)), "{e}");
    // Nothing listens on port 1; the password must not leak into the error.
    let e = sessionfleet::store::Db::connect("postgres://app:hunter2@127.0.0.1:1/app", &opts)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("after 2 attempts") && !msg.contains("hunter2"),
        "{msg}"
    );
}

/// A SQLite URL naming a file that does not exist is an error that names the file, at once
/// and without creating it: a wrong path, or a volume not mounted yet, must not become a new
/// empty database. Seeding asks for the file to be created. Fails if connecting creates it.
#[tokio::test]
async fn a_missing_sqlite_file_is_named_not_created() {
    use sessionfleet::store::{ConnectOptions, Db};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.db");
    let url = format!("sqlite://{}", path.display());
    let e = Db::connect(&url, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BadUrl { .. }), "{e}");
    assert!(
        e.to_string().contains("does not exist") && e.to_string().contains("app.db"),
        "{e}"
    );
    assert!(!path.exists(), "connecting created the file");
    let db = Db::connect(&url, &ConnectOptions::creating_sqlite_file())
        .await
        .expect("created for seeding");
    assert!(path.exists());
    db.close().await;
}

#[tokio::test]
async fn detects_v1_v2_and_missing_tables_on_every_engine() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        let missing = schema::detect(&t.db).await.unwrap_err().to_string();
        assert!(
            missing.contains("table 'user_sessions' not found"),
            "{engine}: {missing}"
        );

        schema::create(&t.db, SchemaVersion::V1).await.unwrap();
        let s = schema::detect(&t.db).await.unwrap();
        assert_eq!(s.version, SchemaVersion::V1, "{engine}");
        assert_eq!(s.activity_column(), "updated_at");
        assert!(s.sessions.expires_at.is_none() && s.users.is_some() && s.platforms.is_some());
        t.drop_db().await;

        let t = TestDb::new(engine).await;
        schema::create(&t.db, SchemaVersion::V2).await.unwrap();
        let s = schema::detect(&t.db).await.unwrap();
        assert_eq!(s.version, SchemaVersion::V2, "{engine}");
        assert_eq!(s.activity_column(), "last_activity");
        assert_eq!(s.sessions.expires_at.as_deref(), Some("expires_at"));
        t.drop_db().await;
    }
}

#[tokio::test]
async fn missing_columns_are_named() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        t.db.execute("CREATE TABLE user_sessions (id INTEGER PRIMARY KEY, session_id VARCHAR(255), created_at TIMESTAMP)")
            .await
            .unwrap();
        let msg = schema::detect(&t.db).await.unwrap_err().to_string();
        assert!(
            msg.contains("lacks column(s) user_id, updated_at"),
            "{engine}: {msg}"
        );
        t.drop_db().await;
    }
}

#[tokio::test]
async fn created_v2_schema_has_the_reference_names() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        schema::create(&t.db, SchemaVersion::V2).await.unwrap();
        // Idempotent: a second call changes nothing and does not fail.
        schema::create(&t.db, SchemaVersion::V2).await.unwrap();
        let cols = schema::table_columns(&t.db, "user_sessions")
            .await
            .unwrap()
            .unwrap();
        for c in [
            "id",
            "session_id",
            "user_id",
            "active_platform_id",
            "created_at",
            "updated_at",
            "last_activity",
            "expires_at",
            "is_active",
            "session_fingerprint",
            "user_agent",
            "ip_address",
        ] {
            assert!(cols.contains(c), "{engine}: column {c} missing");
        }
        let index_sql = match engine {
            Engine::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name IN \
                ('ix_user_sessions_session_id','ix_user_sessions_user_id','ix_user_sessions_updated_at',\
                 'ix_user_sessions_last_activity','ix_user_sessions_expires_at','ix_user_sessions_is_active',\
                 'ix_platform_user_active','ix_platform_type_active','ix_platform_instance_type','ix_users_username','ix_users_email')"
            }
            Engine::Postgres => {
                "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname IN \
                ('ix_user_sessions_session_id','ix_user_sessions_user_id','ix_user_sessions_updated_at',\
                 'ix_user_sessions_last_activity','ix_user_sessions_expires_at','ix_user_sessions_is_active',\
                 'ix_platform_user_active','ix_platform_type_active','ix_platform_instance_type','ix_users_username','ix_users_email')"
            }
            Engine::MySql => {
                "SELECT COUNT(DISTINCT index_name) FROM information_schema.statistics WHERE table_schema = DATABASE() AND index_name IN \
                ('ix_user_sessions_session_id','ix_user_sessions_user_id','ix_user_sessions_updated_at',\
                 'ix_user_sessions_last_activity','ix_user_sessions_expires_at','ix_user_sessions_is_active',\
                 'ix_platform_user_active','ix_platform_type_active','ix_platform_instance_type','ix_users_username','ix_users_email')"
            }
        };
        assert_eq!(t.db.scalar_i64(index_sql).await.unwrap(), 11, "{engine}");
        t.drop_db().await;
    }
}

/// A digest of every generated row, to compare two seedings.
async fn digest(t: &TestDb) -> (i64, i64, i64, i64) {
    let db = &t.db;
    // MySQL's SUM is DECIMAL; bring it back to an integer the same way everywhere.
    let int = if t.engine() == Engine::MySql {
        "SIGNED"
    } else {
        "BIGINT"
    };
    let sum = |expr: &str| format!("SELECT CAST(SUM({expr}) AS {int}) FROM user_sessions");
    (
        db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap(),
        db.scalar_i64(&sum("user_id")).await.unwrap(),
        db.scalar_i64(&sum("COALESCE(active_platform_id, 0)"))
            .await
            .unwrap(),
        db.scalar_i64(&sum("LENGTH(session_id) + LENGTH(ip_address)"))
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn seeding_is_deterministic_for_a_seed() {
    for engine in ENGINES {
        let a = TestDb::new(engine).await;
        let b = TestDb::new(engine).await;
        let c = TestDb::new(engine).await;
        seed_demo(&a.db, &params(2000, 7, SchemaVersion::V2))
            .await
            .unwrap();
        seed_demo(&b.db, &params(2000, 7, SchemaVersion::V2))
            .await
            .unwrap();
        seed_demo(&c.db, &params(2000, 8, SchemaVersion::V2))
            .await
            .unwrap();
        let (da, db_, dc) = (digest(&a).await, digest(&b).await, digest(&c).await);
        assert_eq!(da, db_, "{engine}: same seed, same rows");
        assert_ne!(da, dc, "{engine}: another seed, other rows");
        // Exact row equality on the session keys too.
        let keys = "SELECT COUNT(*) FROM user_sessions WHERE session_id LIKE '%-1999' OR session_id LIKE '%-0'";
        assert_eq!(a.db.scalar_i64(keys).await.unwrap(), 2);
        for t in [a, b, c] {
            t.drop_db().await;
        }
    }
}

#[tokio::test]
async fn seeding_produces_the_promised_proportions() {
    for engine in ENGINES {
        for version in [SchemaVersion::V1, SchemaVersion::V2] {
            let t = TestDb::new(engine).await;
            let report = seed_demo(&t.db, &params(5000, 42, version)).await.unwrap();
            assert_eq!(report.sessions, 5000);
            let total =
                t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
                    .await
                    .unwrap();
            assert_eq!(total, 5000);
            // Expired by the v1 rule (idle > 48 h before the reference time) ~60%.
            let cutoff = "2026-10-30 12:00:00";
            let idle_sql =
                format!("SELECT COUNT(*) FROM user_sessions WHERE updated_at < '{cutoff}'");
            let idle = t.db.scalar_i64(&idle_sql).await.unwrap() as f64 / total as f64;
            assert!(
                (0.55..0.65).contains(&idle),
                "{engine} {version}: expired share {idle}"
            );
            if version == SchemaVersion::V2 {
                let past =
                    "SELECT COUNT(*) FROM user_sessions WHERE expires_at < '2026-11-01 12:00:00'";
                let share = t.db.scalar_i64(past).await.unwrap() as f64 / total as f64;
                assert!(
                    (0.55..0.65).contains(&share),
                    "{engine}: expires_at share {share}"
                );
            }
            // Created over 30 days.
            let oldest =
                t.db.scalar_i64(
                    "SELECT COUNT(*) FROM user_sessions WHERE created_at < '2026-10-05 00:00:00'",
                )
                .await
                .unwrap();
            let newest =
                t.db.scalar_i64(
                    "SELECT COUNT(*) FROM user_sessions WHERE created_at > '2026-10-31 12:00:00'",
                )
                .await
                .unwrap();
            assert!(
                oldest > 0 && newest > 0,
                "{engine}: spread {oldest} {newest}"
            );
            // Sessions of deactivated users exist everywhere.
            let deactivated = t
                .db
                .scalar_i64("SELECT COUNT(*) FROM user_sessions s JOIN users u ON u.id = s.user_id WHERE u.is_active = FALSE")
                .await
                .unwrap();
            assert_eq!(deactivated as u64, report.deactivated_user, "{engine}");
            assert!(deactivated > 0);
            // Deleted users and missing platforms only where foreign keys are not enforced.
            let missing_user = t
                .db
                .scalar_i64("SELECT COUNT(*) FROM user_sessions s WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)")
                .await
                .unwrap();
            let missing_platform = t
                .db
                .scalar_i64("SELECT COUNT(*) FROM user_sessions s WHERE s.active_platform_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM platform_connections p WHERE p.id = s.active_platform_id)")
                .await
                .unwrap();
            if engine == Engine::Sqlite {
                assert!(
                    missing_user > 0 && missing_platform > 0,
                    "{engine}: orphans expected"
                );
            } else {
                assert_eq!(
                    (missing_user, missing_platform),
                    (0, 0),
                    "{engine}: FKs enforced"
                );
            }
            let v6 =
                t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions WHERE ip_address LIKE '%:%'")
                    .await
                    .unwrap();
            assert!(v6 > 0 && v6 < total, "{engine}: IPv4 and IPv6 mixed");
            t.drop_db().await;
        }
    }
}

#[tokio::test]
async fn seeding_refuses_a_populated_database_unless_reset() {
    let t = TestDb::new(Engine::Sqlite).await;
    seed_demo(&t.db, &params(100, 1, SchemaVersion::V2))
        .await
        .unwrap();
    let e = seed_demo(&t.db, &params(100, 1, SchemaVersion::V2))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--reset"), "{e}");
    let mut again = params(50, 1, SchemaVersion::V1);
    again.reset = true;
    seed_demo(&t.db, &again).await.unwrap();
    assert_eq!(
        t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        schema::detect(&t.db).await.unwrap().version,
        SchemaVersion::V1
    );
    t.drop_db().await;
}

#[tokio::test]
async fn fence_tokens_increase_and_a_stale_token_writes_nothing() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        schema::create(&t.db, SchemaVersion::V2).await.unwrap();
        let old = fence::issue_token(&t.db, "target:default", "worker-a/job-1")
            .await
            .unwrap();
        let new = fence::issue_token(&t.db, "target:default", "worker-b/job-2")
            .await
            .unwrap();
        assert!(new.token > old.token, "{engine}");

        // The new holder writes; the old one is refused and its statement never runs.
        let tx = new.begin(&t.db).await.unwrap();
        tx.commit().await.unwrap();
        let err = old.begin(&t.db).await.map(|_| ()).unwrap_err();
        assert!(
            matches!(err, fence::FenceError::FencedOut { mine, seen, .. } if mine == old.token && seen == new.token),
            "{engine}: {err}"
        );

        let row = fence::inspect(&t.db, "target:default")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (row.token, row.holder.as_deref()),
            (new.token, Some("worker-b/job-2"))
        );
        let log = fence::write_log(&t.db, "target:default").await.unwrap();
        assert_eq!(log.len(), 1, "{engine}: only the accepted token is logged");
        assert_eq!((log[0].token, log[0].writes), (new.token, 1));
        t.drop_db().await;
    }
}

/// A cleanup batch deletes matching rows from a key range. On MySQL/MariaDB, InnoDB's default
/// `REPEATABLE READ` would keep the live rows of that range locked until the batch commits, so
/// the application's update of a live session would wait for the whole batch; write
/// transactions run `READ COMMITTED`, where the rows a `DELETE` skips stay free. Fails (lock
/// wait timeout, error 1205) if the write transaction locks the skipped row.
#[tokio::test]
async fn a_write_transaction_leaves_the_rows_its_delete_skips_unlocked_on_mysql() {
    let t = TestDb::new(Engine::MySql).await;
    t.db.execute(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, expired BOOLEAN NOT NULL, touched INT NOT NULL DEFAULT 0)",
    )
    .await
    .unwrap();
    t.db.execute("INSERT INTO items (id, expired) VALUES (1, TRUE), (2, FALSE), (3, TRUE)")
        .await
        .unwrap();

    let mut batch = t.db.begin_write().await.unwrap();
    let sessionfleet::store::DbTx::MySql(b) = &mut batch else {
        unreachable!("a MySQL database opens MySQL transactions")
    };
    let deleted = sqlx::query("DELETE FROM items WHERE id > 0 AND id <= 3 AND expired = TRUE")
        .execute(&mut **b)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 2);

    // The application, while the batch is still open: it gives up after 1 s of lock wait.
    let mut app = t.db.begin_read().await.unwrap();
    let sessionfleet::store::DbTx::MySql(a) = &mut app else {
        unreachable!()
    };
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut **a)
        .await
        .unwrap();
    let touched = sqlx::query("UPDATE items SET touched = 1 WHERE id = 2")
        .execute(&mut **a)
        .await;
    sqlx::query("SET SESSION innodb_lock_wait_timeout = DEFAULT")
        .execute(&mut **a)
        .await
        .unwrap();
    let touched = touched.expect("the live row in the batch's range is not locked by the batch");
    assert_eq!(touched.rows_affected(), 1);
    app.commit().await.unwrap();
    batch.commit().await.unwrap();

    let left =
        t.db.scalar_i64("SELECT COUNT(*) FROM items WHERE id = 2 AND touched = 1")
            .await
            .unwrap();
    assert_eq!(
        left, 1,
        "the live row survived with the application's update"
    );
    t.drop_db().await;
}

/// The SQLite batch writer turns automatic checkpoints off (and sets a WAL file limit, when
/// asked) on its own connection only, and closes that connection when dropped: every
/// connection the pool hands out afterwards still checkpoints by itself and has no limit.
/// Fails if the writer's connection went back to the pool as it was.
#[tokio::test]
async fn the_sqlite_batch_writer_keeps_its_settings_out_of_the_pool() {
    let t = TestDb::new(Engine::Sqlite).await;
    let autocheckpoint = "PRAGMA wal_autocheckpoint";
    let mut writer = t.db.batch_writer(Duration::from_secs(2)).await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    let sessionfleet::store::DbTx::Sqlite(c) = &mut tx else {
        unreachable!("a SQLite database opens SQLite transactions")
    };
    let inside: i64 = sqlx::query_scalar(autocheckpoint)
        .fetch_one(&mut **c)
        .await
        .unwrap();
    assert_eq!(inside, 0, "the writer's commits leave the WAL alone");
    tx.commit().await.unwrap();
    writer.limit_wal_file(1 << 20).await.unwrap();
    let sessionfleet::store::BatchWriter::Sqlite(c) = &mut writer else {
        unreachable!("a SQLite batch writer has its own connection")
    };
    let limit: i64 = sqlx::query_scalar("PRAGMA journal_size_limit")
        .fetch_one(&mut **c)
        .await
        .unwrap();
    assert_eq!(limit, 1 << 20, "the writer's WAL file limit is set");
    let checkpoint = writer.checkpoint().await.unwrap();
    assert_eq!(checkpoint.left, 0, "no reader kept a frame from the copy");
    drop(writer);

    for mut conn in t.every_sqlite_connection().await {
        let pages: i64 = sqlx::query_scalar(autocheckpoint)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(pages, 1000, "a pooled connection checkpoints by itself");
        let limit: i64 = sqlx::query_scalar("PRAGMA journal_size_limit")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(limit, -1, "a pooled connection keeps SQLite's default");
    }
    t.drop_db().await;
}

/// The engine's own row estimate, which the cleanup uses instead of counting the table: close
/// to the true count where the engine keeps one — also after half the rows went — and absent
/// where it keeps none.
#[tokio::test]
async fn row_estimates_follow_the_table_where_the_engine_keeps_them() {
    const SESSIONS: i64 = 20_000;
    // PostgreSQL's figure moves with ANALYZE; InnoDB counts rows as they come and go.
    let analyze = |engine: Engine| (engine == Engine::Postgres).then_some("ANALYZE user_sessions");
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        seed_demo(&t.db, &params(SESSIONS as u64, 7, SchemaVersion::V2))
            .await
            .unwrap();
        let seeded = t.db.estimated_rows("user_sessions").await.unwrap();
        if engine == Engine::Postgres {
            // Never analyzed (unless autovacuum was quicker): no estimate, or a close one.
            assert!(
                seeded.is_none_or(|n| close(n, SESSIONS)),
                "{engine}: {seeded:?}"
            );
        }
        if let Some(sql) = analyze(engine) {
            t.db.execute(sql).await.unwrap();
        }
        let full = t.db.estimated_rows("user_sessions").await.unwrap();
        t.db.execute("DELETE FROM user_sessions WHERE id % 2 = 0")
            .await
            .unwrap();
        if let Some(sql) = analyze(engine) {
            t.db.execute(sql).await.unwrap();
        }
        let halved = t.db.estimated_rows("user_sessions").await.unwrap();
        let left =
            t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
                .await
                .unwrap();
        if engine == Engine::Sqlite {
            assert_eq!((seeded, full, halved), (None, None, None), "SQLite");
        } else {
            assert!(
                full.is_some_and(|n| close(n, SESSIONS)),
                "{engine}: {full:?}"
            );
            assert!(
                halved.is_some_and(|n| close(n, left)),
                "{engine}: {halved:?} for {left}"
            );
        }
        assert_eq!(
            t.db.estimated_rows("no_such_table").await.unwrap(),
            None,
            "{engine}"
        );
        t.drop_db().await;
    }
}

/// Within a tenth of `exact`.
fn close(estimate: u64, exact: i64) -> bool {
    estimate.abs_diff(exact as u64) <= exact as u64 / 10
}

/// PostgreSQL's SQLSTATE for a statement cancelled on request, and MySQL's for an
/// interrupted one (error 1317).
const QUERY_CANCELED: &str = "57014";
const QUERY_INTERRUPTED: &str = "70100";

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// `Db::cancel_statement` ends the statement another connection of the pool is running, and
/// that connection stays usable. Fails if the cancellation reaches nothing: the sleep would
/// then run its full minute and end normally.
#[tokio::test]
async fn a_cancelled_statement_ends_early_and_leaves_its_connection_usable() {
    use sessionfleet::store::ReadConnection;
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let mut conn = t.db.read_connection().await.unwrap();
        let session = conn
            .server_session()
            .await
            .unwrap()
            .expect("a server engine names its sessions");
        let sleeper = tokio::spawn(async move {
            // PostgreSQL reports a cancelled statement as an error; MariaDB ends an
            // interrupted SLEEP either with an error or with SLEEP's result 1.
            let ended_early = match &mut conn {
                ReadConnection::Postgres(c) => {
                    let slept = sqlx::query_scalar::<_, i32>(
                        "/* sessionfleet:cancellable */ SELECT 1 FROM pg_sleep(60)",
                    )
                    .fetch_one(&mut **c)
                    .await;
                    matches!(slept, Err(e) if sqlstate(&e).as_deref() == Some(QUERY_CANCELED))
                }
                ReadConnection::MySql(c) => {
                    let slept = sqlx::query_scalar::<_, i64>(
                        "/* sessionfleet:cancellable */ SELECT CAST(SLEEP(60) AS SIGNED)",
                    )
                    .fetch_one(&mut **c)
                    .await;
                    match slept {
                        Ok(interrupted) => interrupted == 1,
                        Err(e) => sqlstate(&e).as_deref() == Some(QUERY_INTERRUPTED),
                    }
                }
                ReadConnection::Sqlite(_) => unreachable!("only server engines here"),
            };
            (ended_early, conn)
        });

        // Cancel only once the sleep is running: a cancellation that arrives before its
        // statement is, by design, not kept for the next one.
        while minute_sleeps(&t.db).await == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        t.db.cancel_statement(session).await.unwrap();

        let (ended_early, mut conn) = sleeper.await.unwrap();
        assert!(ended_early, "{engine}: the sleep ran to its end");
        let usable = match &mut conn {
            ReadConnection::Postgres(c) => sqlx::query_scalar::<_, i32>("SELECT 7")
                .fetch_one(&mut **c)
                .await
                .unwrap(),
            ReadConnection::MySql(c) => sqlx::query_scalar::<_, i64>("SELECT CAST(7 AS SIGNED)")
                .fetch_one(&mut **c)
                .await
                .map(i32::try_from)
                .unwrap()
                .unwrap(),
            ReadConnection::Sqlite(_) => unreachable!(),
        };
        assert_eq!(
            usable, 7,
            "{engine}: the connection answers after the cancellation"
        );
        drop(conn);
        t.drop_db().await;
    }
}

/// The server sessions of this database (other than the asker's) running a minute's sleep.
async fn minute_sleeps(db: &sessionfleet::store::Db) -> i64 {
    sleeps(db, 60).await
}

/// The server sessions of this database (other than the asker's) sleeping `secs` seconds.
async fn sleeps(db: &sessionfleet::store::Db, secs: u32) -> i64 {
    let sql = match db.engine() {
        Engine::Postgres => format!(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'active' AND query LIKE '%pg_sleep({secs})%' AND pid <> pg_backend_pid()"
        ),
        _ => format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() \
             AND INFO LIKE '%SLEEP({secs})%' AND ID <> CONNECTION_ID()"
        ),
    };
    db.scalar_i64(&sql).await.unwrap()
}

/// A statement on a `CancellableConnection` whose future is dropped part-way ends on the
/// server then, not when it would have: a count a cleanup gives up must not keep its
/// snapshot for minutes. Fails if nothing cancels it: the sleep then runs its minute.
#[tokio::test]
async fn a_statement_given_up_on_a_cancellable_connection_ends_on_the_server() {
    use sessionfleet::store::ReadConnection;
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let mut conn = t.db.cancellable_connection().await.unwrap();
        let sleeper = tokio::spawn(async move {
            conn.run(async |c| match c {
                ReadConnection::Postgres(c) => {
                    sqlx::query("/* sessionfleet:cancellable */ SELECT pg_sleep(60)")
                        .execute(&mut **c)
                        .await
                        .map(|_| ())
                }
                ReadConnection::MySql(c) => {
                    sqlx::query("/* sessionfleet:cancellable */ SELECT SLEEP(60)")
                        .execute(&mut **c)
                        .await
                        .map(|_| ())
                }
                ReadConnection::Sqlite(_) => unreachable!("only server engines here"),
            })
            .await
        });
        while minute_sleeps(&t.db).await == 0 {
            assert!(!sleeper.is_finished(), "{engine}: the sleep never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sleeper.abort();
        assert!(sleeper.await.is_err_and(|e| e.is_cancelled()));
        let given_up = std::time::Instant::now();
        while minute_sleeps(&t.db).await > 0 {
            assert!(
                given_up.elapsed() < Duration::from_secs(30),
                "{engine}: the given-up sleep still runs on the server"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t.drop_db().await;
    }
}

/// A cancellation reaches only statements marked `CANCELLABLE`: behind a pooler the session
/// id may by then name another client's session, whose statement must run on. Fails if an
/// unmarked statement is cancelled.
#[tokio::test]
async fn only_marked_statements_are_cancelled() {
    use sessionfleet::store::ReadConnection;
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let mut conn = t.db.read_connection().await.unwrap();
        let session = conn.server_session().await.unwrap().unwrap();
        let session_id: i64 = match &mut conn {
            ReadConnection::Postgres(c) => {
                sqlx::query_scalar("SELECT CAST(pg_backend_pid() AS BIGINT)")
                    .fetch_one(&mut **c)
                    .await
                    .unwrap()
            }
            ReadConnection::MySql(c) => {
                sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                    .fetch_one(&mut **c)
                    .await
                    .unwrap()
            }
            ReadConnection::Sqlite(_) => unreachable!(),
        };
        // An unmarked statement that would run a minute. What ends it tells who did: a
        // statement cancel (`cancel_statement` ignoring the mark) or the test's own kill of the
        // whole session afterwards, which is the only way it may end.
        let sleeper = tokio::spawn(async move {
            match &mut conn {
                ReadConnection::Postgres(c) => sqlx::query("SELECT pg_sleep(60)")
                    .execute(&mut **c)
                    .await
                    .map(|_| "ran its course".to_string())
                    .unwrap_or_else(|e| match e.as_database_error().and_then(|d| d.code()) {
                        Some(code) if code == "57014" => "statement cancelled".into(),
                        _ => format!("session ended: {e}"),
                    }),
                // SLEEP returns 1 when its statement is killed; its session's end is an error.
                ReadConnection::MySql(c) => {
                    match sqlx::query_scalar::<_, i64>("SELECT CAST(SLEEP(60) AS SIGNED)")
                        .fetch_one(&mut **c)
                        .await
                    {
                        Ok(1) => "statement cancelled".into(),
                        Ok(_) => "ran its course".into(),
                        Err(e) => format!("session ended: {e}"),
                    }
                }
                ReadConnection::Sqlite(_) => unreachable!(),
            }
        });
        let since = std::time::Instant::now();
        while sleeps(&t.db, 60).await == 0 {
            assert!(since.elapsed() < Duration::from_secs(60), "never started");
            assert!(!sleeper.is_finished(), "ended before it was seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t.db.cancel_statement(session).await.unwrap();
        let kill = match engine {
            Engine::Postgres => format!(
                "SELECT CAST(pg_terminate_backend(CAST({session_id} AS INTEGER)) AS INTEGER)"
            ),
            _ => format!("KILL {session_id}"),
        };
        t.db.execute(&kill).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(60), sleeper)
            .await
            .expect("ends once its session is killed")
            .unwrap();
        assert!(ended.starts_with("session ended"), "{engine:?}: {ended}");
        t.drop_db().await;
    }
}

/// MySQL has no transaction-local lock wait, so the batch writer gives its connection back
/// only with the server's row-lock wait restored, and a fencing token sets its 5 s wait on a
/// connection that is closed afterwards: every connection the pool hands out still waits as
/// the server says. Fails if either went back to the pool with its setting (a token's 5 s then
/// bounded every later batch on that connection) or if the writer's wait is not set.
#[tokio::test]
async fn mysql_lock_waits_stay_off_the_pooled_connections() {
    let t = TestDb::new(Engine::MySql).await;
    fence::issue_token(&t.db, "target:test", "test")
        .await
        .unwrap();
    let mut writer = t.db.batch_writer(Duration::from_secs(2)).await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    let sessionfleet::store::DbTx::MySql(c) = &mut tx else {
        unreachable!("a MySQL database opens MySQL transactions")
    };
    let inside: i64 =
        sqlx::query_scalar("SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED)")
            .fetch_one(&mut **c)
            .await
            .unwrap();
    assert_eq!(inside, 2, "the writer's batches wait 2 s for a row lock");
    tx.commit().await.unwrap();
    writer.release_connection().await;

    let global: i64 =
        t.db.scalar_i64("SELECT CAST(@@GLOBAL.innodb_lock_wait_timeout AS SIGNED)")
            .await
            .unwrap();
    for mut conn in t.every_mysql_connection().await {
        let session: i64 =
            sqlx::query_scalar("SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED)")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(
            session, global,
            "a pooled connection waits as the server says"
        );
    }
    t.drop_db().await;
}

/// The version follows the columns the cleanup's rules compare, never the fingerprint: a v2
/// table without `session_fingerprint` or `is_active` is v2; a v1 table with a stray
/// `is_active` is v1; an expiry without a last activity (or the reverse) fits neither and
/// carries a refusal, while the reports see v1 with a note. And a time column the rules do
/// not compare (`created_at`) of another type is only noted. Fails when a missing
/// fingerprint made the table v1.
#[tokio::test]
async fn detection_follows_the_rules_columns_and_refuses_what_fits_neither_profile() {
    let cases: [(&str, SchemaVersion, &[&str], Option<&str>); 5] = [
        (
            "no fingerprint",
            SchemaVersion::V2,
            &["ALTER TABLE user_sessions DROP COLUMN session_fingerprint"],
            None,
        ),
        (
            "no is_active",
            SchemaVersion::V2,
            &[
                "DROP INDEX ix_user_sessions_is_active",
                "ALTER TABLE user_sessions DROP COLUMN is_active",
            ],
            None,
        ),
        (
            "v1 with a flag",
            SchemaVersion::V1,
            &["ALTER TABLE user_sessions ADD COLUMN is_active BOOLEAN"],
            None,
        ),
        (
            "expiry without activity",
            SchemaVersion::V2,
            &[
                "DROP INDEX ix_user_sessions_last_activity",
                "ALTER TABLE user_sessions DROP COLUMN last_activity",
            ],
            Some("has expires_at, is_active but not last_activity"),
        ),
        (
            "activity without expiry",
            SchemaVersion::V1,
            &["ALTER TABLE user_sessions ADD COLUMN last_activity DATETIME"],
            Some("has last_activity but not expires_at"),
        ),
    ];
    for (what, created, alter, refused) in cases {
        let t = TestDb::new(Engine::Sqlite).await;
        schema::create(&t.db, created).await.unwrap();
        for sql in alter {
            t.db.execute(sql).await.expect(sql);
        }
        let s = schema::detect(&t.db).await.unwrap();
        match refused {
            None => {
                assert!(s.check_rules_apply().is_ok(), "{what}: {:?}", s.refusals);
                assert_eq!(s.version, created, "{what}");
                assert!(
                    s.version == SchemaVersion::V2 || s.sessions.is_active.is_none(),
                    "{what}: v1 reads no flag"
                );
            }
            Some(text) => {
                let e = s.check_rules_apply().expect_err(what).to_string();
                assert!(e.contains(text), "{what}: {e}");
                assert_eq!(s.version, SchemaVersion::V1, "{what}: reports see v1");
                assert!(
                    s.notes.iter().any(|n| n.contains(text)),
                    "{what}: {:?}",
                    s.notes
                );
            }
        }
        t.drop_db().await;
    }
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        schema::create(&t.db, SchemaVersion::V2).await.unwrap();
        t.db.execute(match engine {
            Engine::Postgres => {
                "ALTER TABLE user_sessions ALTER COLUMN created_at DROP DEFAULT, \
                 ALTER COLUMN created_at TYPE BIGINT USING 0"
            }
            _ => "ALTER TABLE user_sessions MODIFY created_at BIGINT NOT NULL",
        })
        .await
        .expect("created_at as a number");
        let s = schema::detect(&t.db).await.unwrap();
        assert!(s.check_rules_apply().is_ok(), "{engine}: {:?}", s.refusals);
        assert!(
            s.notes
                .iter()
                .any(|n| n.contains("column 'created_at' is bigint, not a date/time type")),
            "{engine}: {:?}",
            s.notes
        );
        t.drop_db().await;
    }
}

/// Seeding into existing empty tables that the cleanup calls v2 but that lack a column the
/// demo rows fill (here `session_fingerprint`, which no rule uses) is refused before any row
/// is written, with the way out, instead of failing half-way on an insert.
#[tokio::test]
async fn seeding_refuses_tables_missing_a_column_it_fills() {
    let t = TestDb::new(Engine::Sqlite).await;
    sessionfleet::store::schema::create(&t.db, SchemaVersion::V2)
        .await
        .unwrap();
    t.db.execute("ALTER TABLE user_sessions DROP COLUMN session_fingerprint")
        .await
        .unwrap();
    let err = seed_demo(&t.db, &params(100, 1, SchemaVersion::V2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("session_fingerprint") && err.contains("--reset"),
        "{err}"
    );
    assert_eq!(
        t.db.scalar_i64("SELECT COUNT(*) FROM users").await.unwrap(),
        0
    );
    t.drop_db().await;
}

/// The fence's audit log keeps the latest `FENCE_LOG_KEPT_TOKENS` tokens of a name: issuing a
/// token drops the rows of older ones (and no other name's), so the table in the
/// application's database does not grow with every part ever run.
#[tokio::test]
async fn the_fence_log_keeps_only_the_latest_tokens() {
    for engine in ENGINES {
        let t = TestDb::new(engine).await;
        fence::ensure_tables(&t.db).await.unwrap();
        for (name, token) in [("target:a", 1), ("target:a", 2), ("target:b", 1)] {
            t.db.execute(&format!(
                "INSERT INTO {} (name, token, holder, first_write_at, last_write_at, writes) \
                 VALUES ('{name}', {token}, 'old', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)",
                fence::FENCE_LOG_TABLE
            ))
            .await
            .unwrap();
        }
        // A token far past them: both of a's old rows fall out of the kept window.
        let floor = 2 + fence::FENCE_LOG_KEPT_TOKENS;
        let granted = fence::issue_token_after(&t.db, "target:a", "now", floor)
            .await
            .unwrap();
        assert_eq!(granted.token, floor + 1);
        assert!(
            fence::write_log(&t.db, "target:a")
                .await
                .unwrap()
                .is_empty(),
            "{engine}: a's old tokens are gone"
        );
        assert_eq!(
            fence::write_log(&t.db, "target:b").await.unwrap().len(),
            1,
            "{engine}: b's row stays"
        );
        // Within the window, rows stay.
        t.db.execute(&format!(
            "INSERT INTO {} (name, token, holder, first_write_at, last_write_at, writes) \
             VALUES ('target:a', {}, 'recent', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)",
            fence::FENCE_LOG_TABLE,
            floor
        ))
        .await
        .unwrap();
        fence::issue_token(&t.db, "target:a", "next").await.unwrap();
        assert_eq!(fence::write_log(&t.db, "target:a").await.unwrap().len(), 1);
        t.drop_db().await;
    }
}
