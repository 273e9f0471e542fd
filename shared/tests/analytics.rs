//! The analytics operation against real SQLite, PostgreSQL and MariaDB: every figure equals an
//! independent SQL oracle (written plainly, with the reference's column names) or a small
//! fixture's known answer.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use sessionfleet::ops::analytics::{
    self, AnalyticsParams, AnalyticsReport, DbFindings, FleetFacts, Health, HealthParams,
    JobCounts, Severity, Thresholds, ThresholdsError,
};
use sessionfleet::ops::{OpContext, OpError};
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Db, Engine, SchemaVersion, schema};
use sessionfleet::testing::{ENGINES, TestDb, allow_sessions_without_a_user};
use sessionfleet::{CancellationToken, on_pool};

fn now() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2025, 3, 10)
        .and_then(|d| d.and_hms_opt(12, 0, 0))
        .expect("valid date")
}

fn params() -> HealthParams {
    HealthParams {
        now: Some(now()),
        ..HealthParams::default()
    }
}

/// The oracle: a plain COUNT query with timestamp parameters.
async fn count(db: &Db, sql: &str, times: &[NaiveDateTime]) -> u64 {
    on_pool!(db, p => {
        let mut q = sqlx::query_scalar::<_, i64>(db.sql(sql.to_string()));
        for t in times {
            q = q.bind(*t);
        }
        q.fetch_one(p).await.expect(sql) as u64
    })
}

async fn seeded(engine: Engine, version: SchemaVersion, sessions: u64) -> TestDb {
    let tdb = TestDb::new(engine).await;
    let sp = SeedParams {
        sessions,
        users: 40,
        seed: 7,
        schema: version,
        now: now(),
        reset: false,
    };
    seed_demo(&tdb.db, &sp).await.expect("seed");
    tdb
}

#[tokio::test]
async fn v2_demo_report_equals_sql_oracle_on_every_engine() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2, 1500).await;
        let db = &tdb.db;
        let n = now();
        let r = analytics::health_report(db, &params())
            .await
            .expect("report");
        let ctx = format!("{engine}");
        let active = "is_active = TRUE AND expires_at > ?";

        let c = &r.statistics.session_counts;
        assert_eq!(
            c.total_sessions,
            count(db, "SELECT COUNT(*) FROM user_sessions", &[]).await,
            "{ctx}"
        );
        assert_eq!(c.total_sessions, 1500);
        assert_eq!(
            c.active_sessions,
            count(
                db,
                &format!("SELECT COUNT(*) FROM user_sessions WHERE {active}"),
                &[n]
            )
            .await,
            "{ctx}"
        );
        assert!(
            c.active_sessions > 0 && c.active_sessions < c.total_sessions,
            "{ctx}: demo has live and expired sessions"
        );
        assert_eq!(
            c.unique_users,
            count(db, "SELECT COUNT(DISTINCT user_id) FROM user_sessions", &[]).await,
            "{ctx}"
        );

        let cr = &r.statistics.creation_rate;
        let since = |s: i64| n - Duration::seconds(s);
        assert_eq!(
            cr.created_last_5_minutes,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE created_at >= ?",
                &[since(300)]
            )
            .await
        );
        assert_eq!(
            cr.created_last_hour,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE created_at >= ?",
                &[since(3600)]
            )
            .await
        );
        assert!((cr.per_minute_last_hour - cr.created_last_hour as f64 / 60.0).abs() < 1e-9);

        let a = &r.detailed_analytics.age_distribution;
        let act = "SELECT COUNT(*) FROM user_sessions WHERE last_activity >= ?";
        assert_eq!(a.last_hour, count(db, act, &[since(3600)]).await, "{ctx}");
        assert_eq!(a.last_24h, count(db, act, &[since(86_400)]).await, "{ctx}");
        assert_eq!(
            a.last_week,
            count(db, act, &[since(7 * 86_400)]).await,
            "{ctx}"
        );
        assert_eq!(
            a.last_month,
            count(db, act, &[since(30 * 86_400)]).await,
            "{ctx}"
        );
        assert!(
            a.last_hour <= a.last_24h && a.last_week <= a.last_month,
            "cumulative windows"
        );

        let d = &r.detailed_analytics;
        assert_eq!(
            d.active_users,
            count(
                db,
                &format!("SELECT COUNT(DISTINCT user_id) FROM user_sessions WHERE {active}"),
                &[n]
            )
            .await
        );
        assert_eq!(
            d.multi_session_users,
            count(db, "SELECT COUNT(*) FROM (SELECT user_id FROM user_sessions GROUP BY user_id HAVING COUNT(*) > 1) x", &[]).await
        );
        let dist = d
            .platform_distribution
            .as_ref()
            .expect("platform table exists");
        for kind in ["pixelfed", "mastodon"] {
            let want = count(
                db,
                &format!("SELECT COUNT(*) FROM user_sessions s JOIN platform_connections p ON p.id = s.active_platform_id WHERE p.platform_type = '{kind}'"),
                &[],
            )
            .await;
            assert_eq!(
                dist.get(kind).copied().unwrap_or(0),
                want,
                "{ctx} platform {kind}"
            );
        }

        // Durations against the rows themselves.
        let rows: Vec<(NaiveDateTime, NaiveDateTime)> = on_pool!(db, p => sqlx::query_as("SELECT created_at, last_activity FROM user_sessions").fetch_all(p).await.expect("rows"));
        let secs: Vec<f64> = rows
            .iter()
            .map(|(c, l)| (*l - *c).num_milliseconds() as f64 / 1000.0)
            .collect();
        let ds = &d.session_duration_stats;
        let avg = secs.iter().sum::<f64>() / secs.len() as f64;
        assert!(
            (ds.avg_duration_seconds.expect("avg") - avg).abs() < 0.01,
            "{ctx}: avg {:?} vs {avg}",
            ds.avg_duration_seconds
        );
        assert!(
            (ds.min_duration_seconds.expect("min") - secs.iter().copied().fold(f64::MAX, f64::min))
                .abs()
                < 0.01
        );
        assert!(
            (ds.max_duration_seconds.expect("max") - secs.iter().copied().fold(f64::MIN, f64::max))
                .abs()
                < 0.01
        );

        let s = &r.security_analysis;
        assert_eq!(
            s.old_active_sessions,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE created_at < ? AND last_activity > ?",
                &[since(7 * 86_400), since(3600)]
            )
            .await
        );
        assert_eq!(
            s.orphaned_platform_sessions,
            Some(
                count(
                    db,
                    "SELECT COUNT(*) FROM user_sessions WHERE active_platform_id IS NULL",
                    &[]
                )
                .await
            )
        );
        let missing = count(
            db,
            "SELECT COUNT(*) FROM user_sessions s WHERE s.active_platform_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM platform_connections p WHERE p.id = s.active_platform_id)",
            &[],
        )
        .await;
        assert_eq!(s.missing_platform_sessions, Some(missing), "{ctx}");
        if engine == Engine::Sqlite {
            assert!(
                missing > 0,
                "SQLite demo data has sessions pointing at missing platforms"
            );
        }
        assert_eq!(
            s.users_over_session_limit.count,
            count(db, &format!("SELECT COUNT(*) FROM (SELECT user_id FROM user_sessions WHERE {active} GROUP BY user_id HAVING COUNT(*) > 5) x"), &[n]).await
        );
        for e in &s.users_over_session_limit.examples {
            assert!(e.value > 5);
        }
        let ips = s.users_with_many_ips.as_ref().expect("ip role");
        assert_eq!(
            ips.count,
            count(db, "SELECT COUNT(*) FROM (SELECT user_id FROM user_sessions WHERE last_activity >= ? GROUP BY user_id HAVING COUNT(DISTINCT ip_address) > 10) x", &[since(86_400)]).await
        );
        let uas = s.users_with_many_user_agents.as_ref().expect("ua role");
        assert_eq!(
            uas.count,
            count(db, "SELECT COUNT(*) FROM (SELECT user_id FROM user_sessions WHERE last_activity >= ? GROUP BY user_id HAVING COUNT(DISTINCT user_agent) > 5) x", &[since(86_400)]).await
        );
        assert!(s.security_score <= 100);

        // Shape: the original's top-level keys plus alerts; performance measured by the report.
        let json = serde_json::to_value(&r).expect("json");
        let keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        for k in [
            "timestamp",
            "health_status",
            "statistics",
            "detailed_analytics",
            "performance_metrics",
            "security_analysis",
            "recommendations",
            "alerts",
        ] {
            assert!(keys.contains(&k), "{ctx}: missing key {k}");
        }
        assert_eq!(
            keys.len(),
            8,
            "{ctx}: exactly the documented keys, got {keys:?}"
        );
        let pm = &r.performance_metrics;
        assert_eq!(pm.query_count as usize, pm.queries.len());
        assert!(pm.queries.iter().any(|q| q.name == "session_scan"));
        assert!(pm.connection_pool.max_connections >= 1);
        assert_eq!(
            pm.operation_success_rate, None,
            "absent without fleet facts, not invented"
        );
        assert!(pm.notes.iter().any(|n| n.contains("no fleet job outcomes")));
        // 1500 demo sessions: hundreds active > 1000? The concurrent alert must follow the figure.
        let concurrent = r.alerts.iter().any(|a| a.name == "concurrent_sessions");
        assert_eq!(concurrent, c.active_sessions > 1000, "{ctx}");
        let duration_alert = r.alerts.iter().any(|a| a.name == "avg_session_duration");
        assert_eq!(duration_alert, avg > 3600.0);
        assert!(!r.render_text().is_empty());
        tdb.drop_db().await;
    }
}

/// The figures `session_scan` yields, in a comparable form.
fn scan_figures(r: &analytics::HealthReport) -> [u64; 8] {
    let cr = &r.statistics.creation_rate;
    let a = &r.detailed_analytics.age_distribution;
    let s = &r.security_analysis;
    [
        cr.created_last_5_minutes,
        cr.created_last_hour,
        a.last_hour,
        a.last_24h,
        a.last_week,
        a.last_month,
        s.old_active_sessions,
        s.suspicious_session_count,
    ]
}

/// The same figures, each from a plain query of its own.
async fn scan_oracle(db: &Db) -> [u64; 8] {
    let since = |s: i64| now() - Duration::seconds(s);
    let created = "SELECT COUNT(*) FROM user_sessions WHERE created_at >= ?";
    let act = "SELECT COUNT(*) FROM user_sessions WHERE last_activity >= ?";
    let rapid = match db.engine() {
        Engine::Sqlite => "(julianday(last_activity) - julianday(created_at)) * 86400.0 < 10",
        Engine::Postgres => "last_activity - created_at < INTERVAL '10 seconds'",
        Engine::MySql => "TIMESTAMPDIFF(MICROSECOND, created_at, last_activity) < 10000000",
    };
    [
        count(db, created, &[since(300)]).await,
        count(db, created, &[since(3600)]).await,
        count(db, act, &[since(3600)]).await,
        count(db, act, &[since(86_400)]).await,
        count(db, act, &[since(7 * 86_400)]).await,
        count(db, act, &[since(30 * 86_400)]).await,
        count(
            db,
            "SELECT COUNT(*) FROM user_sessions WHERE created_at < ? AND last_activity > ?",
            &[since(7 * 86_400), since(3600)],
        )
        .await,
        count(
            db,
            &format!(
                "SELECT COUNT(*) FROM user_sessions WHERE created_at >= ? AND last_activity >= ? \
                 AND last_activity > created_at AND {rapid}"
            ),
            &[since(300), since(300)],
        )
        .await,
    ]
}

/// On SQLite a count over an indexed column comes from the index's range, the others from
/// one pass over the rows: the figures are the oracle's with the reference schema's indexes
/// (activity indexed, creation not), with every recommended index, and with none.
#[tokio::test]
async fn sqlite_counts_are_the_same_whichever_columns_are_indexed() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2, 1500).await;
    let db = &tdb.db;
    // Sessions made and touched in the last minutes, so every window and rule has members.
    for (i, (created_ago, touched_ago)) in [(100, 95), (200, 20), (240, 238), (1200, 30)]
        .into_iter()
        .enumerate()
    {
        let at = |s: i64| now() - Duration::seconds(s);
        on_pool!(db, p => sqlx::query("INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) VALUES (?, 1, ?, ?, ?, ?, TRUE)")
            .bind(format!("recent-{i}")).bind(at(created_ago)).bind(at(touched_ago)).bind(at(touched_ago)).bind(now() + Duration::hours(1))
            .execute(p).await.map(|_| ()).expect("recent session"));
    }
    let oracle = scan_oracle(db).await;
    assert!(
        oracle.iter().all(|n| *n > 0),
        "every figure has members: {oracle:?}"
    );
    let report = || async {
        analytics::health_report(db, &params())
            .await
            .expect("report")
    };

    assert_eq!(scan_figures(&report().await), oracle, "reference indexes");
    db.execute("CREATE INDEX ix_user_sessions_created_at ON user_sessions (created_at)")
        .await
        .expect("index");
    assert_eq!(
        scan_figures(&report().await),
        oracle,
        "every column indexed"
    );
    let names: Vec<String> = on_pool!(db, p => sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'user_sessions' AND sql IS NOT NULL")
        .fetch_all(p).await.expect("index names"));
    assert!(names.len() > 5, "{names:?}");
    for name in names {
        db.execute(&format!("DROP INDEX {name}"))
            .await
            .expect("drop index");
    }
    assert_eq!(scan_figures(&report().await), oracle, "no index");
    tdb.drop_db().await;
}

/// The report's per-query PostgreSQL plan settings (`SET LOCAL`) end with their query: no
/// pooled connection keeps them for the next user of the pool.
#[tokio::test]
async fn postgres_plan_settings_do_not_outlive_their_query() {
    let tdb = seeded(Engine::Postgres, SchemaVersion::V2, 300).await;
    let db = &tdb.db;
    analytics::health_report(db, &params())
        .await
        .expect("report");
    let mut held = tdb.every_postgres_connection().await;
    for conn in &mut held {
        let (hashjoin, work_mem): (String, String) = sqlx::query_as(
            "SELECT current_setting('enable_hashjoin'), current_setting('work_mem')",
        )
        .fetch_one(&mut **conn)
        .await
        .expect("settings");
        assert_eq!(hashjoin, "on");
        assert_ne!(work_mem, "32MB");
    }
    drop(held);
    tdb.drop_db().await;
}

#[tokio::test]
async fn v1_schema_is_reported_from_updated_at_and_max_age() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V1, 800).await;
        let db = &tdb.db;
        let n = now();
        let r = analytics::health_report(db, &params())
            .await
            .expect("v1 report");
        let cutoff = n - Duration::seconds(HealthParams::DEFAULT_MAX_AGE_SECS as i64);
        assert_eq!(r.statistics.schema.version, "v1");
        assert_eq!(
            r.statistics.session_counts.active_sessions,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE updated_at >= ?",
                &[cutoff]
            )
            .await,
            "{engine}"
        );
        assert_eq!(
            r.detailed_analytics.age_distribution.last_24h,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE updated_at >= ?",
                &[n - Duration::hours(24)]
            )
            .await
        );
        assert!(
            r.statistics
                .schema
                .unsupported
                .iter()
                .any(|u| u.contains("expires_at")),
            "says what v1 cannot support"
        );

        let t = analytics::trends_at(db, 7, None, n, HealthParams::DEFAULT_MAX_AGE_SECS)
            .await
            .expect("v1 trends");
        let start = (n.date() - Duration::days(6))
            .and_hms_opt(0, 0, 0)
            .expect("midnight");
        let age = Duration::seconds(HealthParams::DEFAULT_MAX_AGE_SECS as i64);
        assert_eq!(
            t.total_sessions_expired,
            count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE updated_at >= ? AND updated_at <= ?",
                &[start - age, n - age]
            )
            .await,
            "{engine}"
        );
        tdb.drop_db().await;
    }
}

/// A SQLite session table whose activity times are partly Unix seconds: the report says
/// that its time windows leave those out, instead of reading them as empty windows of a
/// healthy table without a word; a table of UTC text gets no such note. Fails without the
/// probe.
#[tokio::test]
async fn sqlite_times_stored_as_unix_seconds_are_named_in_the_report() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2, 300).await;
    let db = &tdb.db;
    let said = |r: &analytics::HealthReport| {
        r.statistics
            .schema
            .unsupported
            .iter()
            .any(|u| u.contains("last_activity holds integer values"))
    };
    let r = analytics::health_report(db, &params())
        .await
        .expect("report");
    assert!(!said(&r), "{:?}", r.statistics.schema.unsupported);
    db.execute(
        "UPDATE user_sessions SET last_activity = CAST(strftime('%s', last_activity) AS INTEGER) WHERE id % 3 = 0",
    )
    .await
    .expect("unix seconds");
    let r = analytics::health_report(db, &params())
        .await
        .expect("report");
    assert!(said(&r), "{:?}", r.statistics.schema.unsupported);
    tdb.drop_db().await;
}

/// Hand-built rows with known answers.
async fn fixture(engine: Engine) -> TestDb {
    let tdb = TestDb::new(engine).await;
    let db = &tdb.db;
    schema::create(db, SchemaVersion::V2).await.expect("schema");
    db.execute("INSERT INTO users (id, username, email, password_hash, is_active) VALUES (1, 'u1', 'u1@example.org', 'x', TRUE)")
        .await
        .expect("user");
    db.execute("INSERT INTO platform_connections (id, user_id, name, platform_type, instance_url, access_token) VALUES (1, 1, 'p', 'pixelfed', 'https://pixelfed.example', 't')")
        .await
        .expect("platform");
    let n = now();
    let s = |x: i64| n - Duration::seconds(x);
    // (key, platform, created, activity, expires)
    let rows = [
        (
            "brand-new-untouched",
            Some(1),
            s(60),
            s(60),
            n + Duration::hours(48),
        ),
        (
            "rapidly-updated",
            Some(1),
            s(120),
            s(115),
            n + Duration::hours(48),
        ),
        (
            "slowly-updated",
            Some(1),
            s(200),
            s(100),
            n + Duration::hours(48),
        ),
        (
            "old-but-active",
            Some(1),
            s(8 * 86_400),
            s(600),
            n + Duration::hours(24),
        ),
        (
            "expired-no-platform",
            None,
            s(3 * 86_400),
            s(60 * 3600),
            s(86_400),
        ),
    ];
    for (key, platform, created, activity, expires) in rows {
        on_pool!(db, p => sqlx::query(db.sql("INSERT INTO user_sessions (session_id, user_id, active_platform_id, created_at, updated_at, last_activity, expires_at, is_active, user_agent, ip_address) VALUES (?, 1, ?, ?, ?, ?, ?, TRUE, 'ua', '192.0.2.1')"))
            .bind(key).bind(platform).bind(created).bind(activity).bind(activity).bind(expires)
            .execute(p).await.map(|_| ()).expect("session"));
    }
    tdb
}

/// Users seen from many addresses or agents in 24 h: counted exactly, whoever else has many
/// sessions, and only within the window.
#[tokio::test]
async fn users_over_the_address_and_agent_lines_are_found_and_no_one_else() {
    for engine in ENGINES {
        let tdb = TestDb::new(engine).await;
        let db = &tdb.db;
        schema::create(db, SchemaVersion::V2).await.expect("schema");
        for id in 1..=4 {
            db.execute(&format!("INSERT INTO users (id, username, email, password_hash, is_active) VALUES ({id}, 'u{id}', 'u{id}@example.org', 'x', TRUE)"))
                .await
                .expect("user");
        }
        let n = now();
        // (user, sessions, distinct addresses, distinct agents, hours ago)
        let groups = [
            (1, 12, 12, 1, 1), // over the address line (10) only
            (2, 7, 1, 7, 2),   // over the agent line (5) only
            (3, 15, 1, 1, 3),  // many sessions, no diversity
            (4, 8, 8, 8, 30),  // diverse, but outside the 24-hour window
        ];
        for (user, sessions, ips, agents, hours) in groups {
            for i in 0..sessions {
                let at = n - Duration::hours(hours) - Duration::seconds(i64::from(i));
                on_pool!(db, p => sqlx::query(db.sql("INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active, user_agent, ip_address) VALUES (?, ?, ?, ?, ?, ?, TRUE, ?, ?)"))
                    .bind(format!("u{user}-{i}")).bind(user).bind(at).bind(at).bind(at).bind(n + Duration::hours(24))
                    .bind(format!("agent-{}", i % agents)).bind(format!("192.0.2.{}", i % ips))
                    .execute(p).await.map(|_| ()).expect("session"));
            }
        }
        let r = analytics::health_report(db, &params())
            .await
            .expect("report");
        let s = &r.security_analysis;
        // (users over the line, the listed users and their figures)
        let listed = |f: Option<&analytics::UserFinding>| {
            let f = f.expect("role present");
            let users: Vec<(i64, u64)> = f.examples.iter().map(|e| (e.user_id, e.value)).collect();
            (f.count, users)
        };
        assert_eq!(
            listed(s.users_with_many_ips.as_ref()),
            (1, vec![(1, 12)]),
            "{engine}: addresses"
        );
        assert_eq!(
            listed(s.users_with_many_user_agents.as_ref()),
            (1, vec![(2, 7)]),
            "{engine}: agents"
        );
        tdb.drop_db().await;
    }
}

/// Sessions without a user (a nullable `user_id`: guest sessions) count as sessions, never
/// as a user: not in the unique or active users, not among the users over the session
/// limit, though there are more of them than the limit. Fails if they are grouped as a user.
#[tokio::test]
async fn guest_sessions_count_as_sessions_not_as_a_user() {
    for engine in ENGINES {
        let tdb = fixture(engine).await;
        let db = &tdb.db;
        allow_sessions_without_a_user(db).await;
        let n = now();
        for i in 0..6 {
            on_pool!(db, p => sqlx::query(db.sql("INSERT INTO user_sessions (session_id, user_id, created_at, updated_at, last_activity, expires_at, is_active) VALUES (?, NULL, ?, ?, ?, ?, TRUE)"))
                .bind(format!("guest-{i}")).bind(n - Duration::hours(1)).bind(n - Duration::hours(1))
                .bind(n - Duration::hours(1)).bind(n + Duration::hours(1))
                .execute(p).await.map(|_| ()).expect("guest session"));
        }
        let r = analytics::health_report(
            db,
            &HealthParams {
                concurrent_session_limit: 3,
                ..params()
            },
        )
        .await
        .expect("report");
        let counts = &r.statistics.session_counts;
        assert_eq!(counts.total_sessions, 11, "{engine}");
        assert_eq!(counts.unique_users, 1, "{engine}");
        assert_eq!(r.detailed_analytics.active_users, 1, "{engine}");
        let over = &r.security_analysis.users_over_session_limit;
        assert_eq!(over.count, 1, "{engine}: user 1's four active sessions");
        assert!(
            over.examples.iter().all(|u| u.user_id == 1),
            "{engine}: {:?}",
            over.examples
        );
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn fixture_known_answers_and_new_sessions_are_not_suspicious() {
    for engine in ENGINES {
        let tdb = fixture(engine).await;
        let r = analytics::health_report(&tdb.db, &params())
            .await
            .expect("report");
        let s = &r.security_analysis;
        assert_eq!(
            s.suspicious_session_count, 1,
            "{engine}: only the rapidly updated session"
        );
        assert_eq!(s.suspicious_sessions.len(), 1);
        let sus = &s.suspicious_sessions[0];
        assert_eq!(sus.session_id, "rapidly-...");
        assert_eq!(sus.reason, "rapid_updates");
        assert!(
            (sus.update_frequency_seconds - 5.0).abs() < 0.01,
            "{engine}: gap {}",
            sus.update_frequency_seconds
        );
        assert_eq!(s.old_active_sessions, 1);
        assert_eq!(s.orphaned_platform_sessions, Some(1));
        assert_eq!(s.missing_platform_sessions, Some(0));
        // 100 − 10 (one suspicious) − 2 (one old active) − 1 (one without platform).
        assert_eq!(s.security_score, 87, "{engine}: {:?}", s.score_deductions);

        let st = &r.statistics;
        assert_eq!(st.session_counts.total_sessions, 5);
        assert_eq!(st.session_counts.active_sessions, 4);
        assert_eq!(st.session_counts.unique_users, 1);
        assert_eq!(st.creation_rate.created_last_5_minutes, 3);
        assert_eq!(st.creation_rate.created_last_hour, 3);
        let d = &r.detailed_analytics;
        assert_eq!(
            d.platform_distribution
                .as_ref()
                .and_then(|m| m.get("pixelfed"))
                .copied(),
            Some(4)
        );
        assert_eq!(d.active_users, 1);
        assert_eq!(d.multi_session_users, 1);
        let ds = &d.session_duration_stats;
        assert_eq!(ds.min_duration_seconds, Some(0.0));
        assert_eq!(ds.max_duration_seconds, Some((8 * 86_400 - 600) as f64));
        assert_eq!(
            (
                d.age_distribution.last_hour,
                d.age_distribution.last_24h,
                d.age_distribution.last_month
            ),
            (4, 4, 5)
        );
        assert_eq!(
            s.users_over_session_limit.count, 0,
            "4 active sessions is within the limit of 5"
        );

        // A limit of 3 puts user 1 (4 active sessions) on the list.
        let p = HealthParams {
            concurrent_session_limit: 3,
            ..params()
        };
        let r = analytics::health_report(&tdb.db, &p).await.expect("report");
        let u = &r.security_analysis.users_over_session_limit;
        assert_eq!((u.count, u.examples.len()), (1, 1));
        assert_eq!((u.examples[0].user_id, u.examples[0].value), (1, 4));
        assert!(
            r.alerts
                .iter()
                .any(|a| a.name == "users_over_session_limit")
        );
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn critical_is_never_downgraded_by_a_later_warning() {
    let tdb = fixture(Engine::Sqlite).await;
    let p = HealthParams {
        // Rule 2 (failures, critical) fires, then rule 3 (concurrency, warning) fires after it.
        thresholds: Thresholds {
            concurrent_sessions: 1.0,
            ..Thresholds::default()
        },
        fleet: Some(FleetFacts {
            jobs: Some(JobCounts {
                window_secs: 60,
                total: 40,
                succeeded: 10,
                failed: 30,
            }),
            cleanup_deleted_by_day: None,
            cleanup_recorded_from: None,
        }),
        ..params()
    };
    let r = analytics::health_report(&tdb.db, &p).await.expect("report");
    assert_eq!(r.health_status.overall_health, Health::Critical);
    let names: Vec<&str> = r.alerts.iter().map(|a| a.name.as_str()).collect();
    let failure = names
        .iter()
        .position(|n| *n == "session_failure_rate")
        .expect("failure alert");
    let concurrent = names
        .iter()
        .position(|n| *n == "concurrent_sessions")
        .expect("concurrency alert");
    assert!(
        failure < concurrent,
        "the warning rule ran after the critical one"
    );
    let a = &r.alerts[failure];
    assert_eq!(
        (a.severity, a.value, a.threshold),
        (Severity::Critical, 30.0, 10.0)
    );
    assert_eq!(r.performance_metrics.operation_success_rate, Some(25.0));
    assert!(
        r.recommendations
            .iter()
            .any(|x| x.starts_with("Investigate session operation failures")
                && x.contains("25.0% < 95%"))
    );
    assert!(
        r.health_status
            .issues
            .iter()
            .any(|i| i.contains("High number of concurrent sessions"))
    );

    // Maintenance findings become alerts; an integrity failure alone is critical.
    let p = HealthParams {
        findings: Some(DbFindings {
            missing_indexes: vec!["ix_user_sessions_user_platform".into()],
            integrity_failures: vec!["row 3 missing from index".into()],
        }),
        ..params()
    };
    let r = analytics::health_report(&tdb.db, &p).await.expect("report");
    assert_eq!(r.health_status.overall_health, Health::Critical);
    assert!(
        r.alerts
            .iter()
            .any(|a| a.name == "missing_index"
                && a.message.contains("ix_user_sessions_user_platform"))
    );
    assert!(
        r.alerts
            .iter()
            .any(|a| a.name == "integrity_failure" && a.severity == Severity::Critical)
    );
    assert!(
        r.recommendations
            .iter()
            .any(|x| x.contains("Create the recommended index ix_user_sessions_user_platform"))
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn quiet_database_is_good_and_says_so() {
    let tdb = TestDb::new(Engine::Sqlite).await;
    schema::create(&tdb.db, SchemaVersion::V2)
        .await
        .expect("schema");
    let r = analytics::health_report(&tdb.db, &params())
        .await
        .expect("report on empty table");
    assert_eq!(r.health_status.overall_health, Health::Good);
    assert_eq!(
        r.health_status.recommendations,
        vec!["Session system is operating normally".to_string()]
    );
    assert_eq!(
        r.recommendations,
        vec!["Session system is operating optimally".to_string()]
    );
    assert_eq!(
        r.detailed_analytics
            .session_duration_stats
            .avg_duration_seconds,
        None
    );
    assert!(r.alerts.is_empty());
    assert!(
        r.render_text().starts_with(
            "Session Health Report\n=================================================="
        )
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn trends_count_per_utc_day_and_refuse_bad_periods() {
    for engine in ENGINES {
        let tdb = seeded(engine, SchemaVersion::V2, 1000).await;
        let db = &tdb.db;
        let n = now();
        let mut cleanup = BTreeMap::new();
        cleanup.insert(n.date() - Duration::days(1), 42);
        let fleet = FleetFacts {
            jobs: None,
            cleanup_deleted_by_day: Some(cleanup.clone()),
            cleanup_recorded_from: None,
        };
        let t = analytics::trends_at(db, 7, Some(&fleet), n, HealthParams::DEFAULT_MAX_AGE_SECS)
            .await
            .expect("trends");
        assert_eq!(t.days.len(), 7);
        assert_eq!(
            t.days.last().map(|d| d.date.clone()),
            Some("2025-03-10".into())
        );
        for d in &t.days {
            let day = NaiveDate::parse_from_str(&d.date, "%Y-%m-%d")
                .expect("date")
                .and_hms_opt(0, 0, 0)
                .expect("midnight");
            let end = (day + Duration::days(1)).min(n + Duration::microseconds(1));
            let created = count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE created_at >= ? AND created_at < ?",
                &[day, end],
            )
            .await;
            let expired = count(
                db,
                "SELECT COUNT(*) FROM user_sessions WHERE expires_at >= ? AND expires_at < ?",
                &[day, end],
            )
            .await;
            assert_eq!(
                (d.created, d.expired),
                (created, expired),
                "{engine} {}",
                d.date
            );
        }
        assert_eq!(t.days[5].cleanup_deleted, Some(42));
        assert_eq!(t.days[0].cleanup_deleted, Some(0));
        assert_eq!(t.total_cleanup_deleted, Some(42));
        // A bounded history: the days before it are unknown, not zero.
        let partial = FleetFacts {
            cleanup_recorded_from: Some(n.date() - Duration::days(3)),
            ..fleet.clone()
        };
        let known =
            analytics::trends_at(db, 7, Some(&partial), n, HealthParams::DEFAULT_MAX_AGE_SECS)
                .await
                .expect("trends");
        let column: Vec<Option<u64>> = known.days.iter().map(|d| d.cleanup_deleted).collect();
        assert_eq!(
            column,
            [None, None, None, Some(0), Some(0), Some(42), Some(0)]
        );
        assert_eq!(known.total_cleanup_deleted, Some(42));
        assert!(
            known.notes.iter().any(|n| n.contains("known from")),
            "{:?}",
            known.notes
        );
        assert!(t.total_sessions_created > 0);
        assert!((t.average_daily_sessions - t.total_sessions_created as f64 / 7.0).abs() < 1e-9);

        let without = analytics::trends_at(db, 3, None, n, HealthParams::DEFAULT_MAX_AGE_SECS)
            .await
            .expect("trends");
        assert!(
            without.days.iter().all(|d| d.cleanup_deleted.is_none()),
            "no fleet facts: no cleanup column"
        );
        let v = serde_json::to_value(&without).expect("json");
        assert!(
            v["days"][0].get("cleanup_deleted").is_none() && v["total_cleanup_deleted"].is_null()
        );
        assert!(
            without
                .render_text()
                .contains("Session Trends (3 days)\n==============================")
        );

        for bad in [0, 367] {
            let e = analytics::trends(db, bad, HealthParams::DEFAULT_MAX_AGE_SECS, None)
                .await
                .expect_err("refused");
            assert!(
                matches!(e, OpError::Invalid(ref m) if m.contains("1 to 366")),
                "{e}"
            );
        }
        tdb.drop_db().await;
    }
}

#[tokio::test]
async fn export_follows_the_extension_and_html_is_self_contained() {
    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2, 600).await;
    let n = now();
    let mut cleanup = BTreeMap::new();
    cleanup.insert(n.date(), 1234);
    let fleet = FleetFacts {
        jobs: None,
        cleanup_deleted_by_day: Some(cleanup),
        cleanup_recorded_from: None,
    };
    let r = analytics::health_report(&tdb.db, &params())
        .await
        .expect("report");
    let t = analytics::trends_at(
        &tdb.db,
        5,
        Some(&fleet),
        n,
        HealthParams::DEFAULT_MAX_AGE_SECS,
    )
    .await
    .expect("trends");
    let dir = tempfile::tempdir().expect("dir");

    let html_path = dir.path().join("report.html");
    analytics::export(&r, Some(&t), &html_path).expect("html export");
    let html = std::fs::read_to_string(&html_path).expect("read");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg"));
    for d in &t.days {
        assert!(
            html.contains(&format!(
                "data-label=\"{}\" data-series=\"created\" data-value=\"{}\"",
                d.date, d.created
            )),
            "day {}",
            d.date
        );
        assert!(html.contains(&format!(
            "data-label=\"{}\" data-series=\"expired\" data-value=\"{}\"",
            d.date, d.expired
        )));
    }
    assert!(html.contains("data-series=\"cleaned up\" data-value=\"1234\""));
    let age = &r.detailed_analytics.age_distribution;
    assert!(html.contains(&format!(
        "data-label=\"last month\" data-series=\"sessions\" data-value=\"{}\"",
        age.last_month
    )));
    for external in ["src=\"http", "href=\"http", "<script", "<link"] {
        assert!(!html.contains(external), "found {external}");
    }

    let json_path = dir.path().join("report.json");
    analytics::export(&r, Some(&t), &json_path).expect("json export");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("read"))
            .expect("valid JSON");
    assert!(v.get("health_status").is_some() && v.get("timestamp").is_some());
    assert_eq!(v["trends"]["period_days"], 5);

    let e = analytics::export(&r, None, Path::new("report.csv")).expect_err("csv refused");
    assert!(e.to_string().contains(".json or .html"), "{e}");
    assert!(analytics::export(&r, None, Path::new("report")).is_err());
    tdb.drop_db().await;
}

#[tokio::test]
async fn run_takes_params_that_travel_through_json() {
    let tdb = fixture(Engine::Sqlite).await;
    let ctx = OpContext {
        db: tdb.db.clone(),
        fence: None,
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    let p: AnalyticsParams = serde_json::from_str(
        &serde_json::to_string(&AnalyticsParams::HealthReport(params())).expect("ser"),
    )
    .expect("de");
    let Some(AnalyticsReport::Health(h)) = analytics::run(&ctx, &p).await.expect("run") else {
        panic!("health report expected")
    };
    assert_eq!(h.statistics.session_counts.total_sessions, 5);
    let back: AnalyticsReport =
        serde_json::from_str(&serde_json::to_string(&AnalyticsReport::Health(h)).expect("ser"))
            .expect("report round-trips");
    assert!(matches!(back, AnalyticsReport::Health(_)));
    let p: AnalyticsParams =
        serde_json::from_str(r#"{"kind":"trends","days":3}"#).expect("trends params");
    assert!(
        matches!(analytics::run(&ctx, &p).await.expect("run"), Some(AnalyticsReport::Trends(t)) if t.days.len() == 3)
    );
    let p: AnalyticsParams =
        serde_json::from_str(r#"{"kind":"health_report","example_limit":0}"#).expect("params");
    assert!(
        matches!(analytics::run(&ctx, &p).await, Err(OpError::Invalid(m)) if m.contains("example_limit"))
    );
    tdb.drop_db().await;
}

#[test]
fn thresholds_file_overrides_given_keys_and_refuses_mistakes() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p
    };
    let t = Thresholds::load(&write(
        "ok.json",
        r#"{"concurrent_sessions": 500, "avg_session_duration": 1800.5}"#,
    ))
    .expect("accepted");
    assert_eq!(t.concurrent_sessions, 500.0);
    assert_eq!(t.avg_session_duration, 1800.5);
    assert_eq!(
        t.session_creation_rate, 100.0,
        "keys not given keep the spec default"
    );
    assert_eq!(t.session_failure_rate, 10.0);
    assert_eq!(t.suspicious_activity_rate, 5.0);
    assert_eq!(
        Thresholds::load(&write("empty.json", "{}")).expect("empty object"),
        Thresholds::default()
    );

    let p = write("typo.json", r#"{"concurent_sessions": 5}"#);
    let e = Thresholds::load(&p).expect_err("unknown key");
    assert!(
        matches!(e, ThresholdsError::UnknownKey { ref key, .. } if key == "concurent_sessions")
    );
    assert!(e.to_string().contains("typo.json") && !e.to_string().contains('\n'));

    let e = Thresholds::load(&write("type.json", r#"{"session_creation_rate": "fast"}"#))
        .expect_err("wrong type");
    assert!(
        matches!(e, ThresholdsError::WrongType { ref key, .. } if key == "session_creation_rate"),
        "{e}"
    );
    let e = Thresholds::load(&write("neg.json", r#"{"suspicious_activity_rate": -1}"#))
        .expect_err("negative");
    assert!(
        matches!(e, ThresholdsError::Negative { ref key, .. } if key == "suspicious_activity_rate"),
        "{e}"
    );
    assert!(e.to_string().contains("neg.json"));
    assert!(matches!(
        Thresholds::load(&write("arr.json", "[1]")),
        Err(ThresholdsError::NotAnObject { .. })
    ));
    assert!(matches!(
        Thresholds::load(&write("bad.json", "{")),
        Err(ThresholdsError::Syntax { .. })
    ));
    assert!(matches!(
        Thresholds::load(&dir.path().join("absent.json")),
        Err(ThresholdsError::Read { .. })
    ));
}

/// The report runs more queries than the pool has connections. When the first ones take
/// longer than the pool's acquire timeout (10 s on the servers; here they wait on a lock
/// another session holds, as on a table of ten million rows they take that long), the rest
/// must wait their turn instead of failing with "pool timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_of_concurrent_reports_waiting_longer_than_the_pool_timeout_wait_their_turn() {
    use sqlx::Connection;
    /// Longer than the pool's acquire timeout on PostgreSQL.
    const HOLD: std::time::Duration = std::time::Duration::from_secs(12);

    let tdb = seeded(Engine::Postgres, SchemaVersion::V2, 200).await;
    let mut locker = sqlx::PgConnection::connect(&tdb.url)
        .await
        .expect("second session");
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE user_sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let p = params();
    // Two reports on one pool, as in a worker running two analytics jobs on one target:
    // together they queue twice as many queries as the pool has connections.
    let (first, second, ()) = tokio::join!(
        analytics::health_report(&tdb.db, &p),
        analytics::health_report(&tdb.db, &p),
        async {
            // The hold counts from when the reports' queries wait on the lock (as many as
            // the pool gives turns), not from the start: on a loaded machine they may take
            // seconds to get there, and a shorter wait would not outlast the pool timeout.
            let mut monitor = sqlx::PgConnection::connect(&tdb.url).await.unwrap();
            let turns = (sessionfleet::store::ConnectOptions::DEFAULT_MAX_CONNECTIONS - 1) as i64;
            let since = std::time::Instant::now();
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&mut monitor)
                .await
                .unwrap();
                if waiting >= turns {
                    break;
                }
                assert!(
                    since.elapsed() < std::time::Duration::from_secs(120),
                    "the reports' queries never waited on the lock ({waiting} waiting)"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            monitor.close().await.ok();
            tokio::time::sleep(HOLD).await;
            sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
        }
    );
    for report in [first, second] {
        let report = report.expect("the report waits for the lock and for its connections");
        assert_eq!(report.statistics.session_counts.total_sessions, 200);
        assert!(
            report.performance_metrics.queries.len() >= 5,
            "{:?}",
            report.performance_metrics.queries
        );
    }
    locker.close().await.ok();
    tdb.drop_db().await;
}

/// A scheduled or requested health report (not only full maintenance's) warns about the
/// recommended indexes the database lacks, and stops once they exist. Fails if the report
/// runs without that finding.
#[tokio::test]
async fn a_health_report_job_warns_of_missing_recommended_indexes() {
    use sessionfleet::dispatch::{self, OperationEnv, OperationJob};
    use sessionfleet::jobs::{JobEnvelope, JobKind};
    use sessionfleet::ops::analytics::AnalyticsParams;
    use sessionfleet::ops::maintenance;
    use sessionfleet::runner::JobOutcome;

    let tdb = seeded(Engine::Sqlite, SchemaVersion::V2, 500).await;
    let settings = sessionfleet::testing::settings_for_database(&tdb.url);
    let shutdown = CancellationToken::new();
    let oe = OperationEnv {
        settings: &settings,
        redis: None,
        queue: None,
        holder: "test",
        shutdown: &shutdown,
        progress: None,
    };
    let job = OperationJob::Analytics(AnalyticsParams::HealthReport(params()));
    let env = JobEnvelope::new(JobKind::Analytics, "default", job.params(), "test");
    let missing_alerts = |outcome: JobOutcome| -> Vec<String> {
        let JobOutcome::Done { report, .. } = outcome else {
            panic!("the report ran: {outcome:?}")
        };
        report["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["name"] == "missing_index")
            .map(|a| a["message"].as_str().unwrap_or_default().to_string())
            .collect()
    };

    let missing = maintenance::missing_recommended_indexes(&tdb.db)
        .await
        .unwrap();
    assert!(
        !missing.is_empty(),
        "the demo data lacks some recommended indexes"
    );
    let alerts = missing_alerts(dispatch::run_operation(&env, &oe).await);
    assert_eq!(alerts.len(), missing.len(), "{alerts:?}");
    for name in &missing {
        assert!(
            alerts.iter().any(|a| a.contains(name.as_str())),
            "{name}: {alerts:?}"
        );
    }

    let ctx = OpContext {
        db: tdb.db.clone(),
        fence: Some(
            sessionfleet::fence::issue_token(&tdb.db, "target:default", "test")
                .await
                .unwrap(),
        ),
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };
    maintenance::create_indexes(&ctx, false).await.unwrap();
    assert!(missing_alerts(dispatch::run_operation(&env, &oe).await).is_empty());
    tdb.drop_db().await;
}

/// A health report the fleet runs carries what the target's latest integrity check found wrong
/// with its storage, as the report's critical integrity alert, and stops once a newer check
/// passes. Fails if the worker leaves the queue's integrity results out of health reports.
#[tokio::test]
async fn a_failed_integrity_check_in_the_fleet_s_history_raises_the_health_alert() {
    use sessionfleet::config::{Overrides, Settings};
    use sessionfleet::dispatch::{self, OperationEnv, OperationJob};
    use sessionfleet::jobs::{JobEnvelope, JobKind};
    use sessionfleet::ops::maintenance::{CheckStatus, IntegrityReport, MaintenanceReport};
    use sessionfleet::queue::{Queue, ResultOutcome};
    use sessionfleet::runner::JobOutcome;
    use sessionfleet::testing::{RedisKeysGuard, redis_url, unique_namespace};

    let tdb = TestDb::new(Engine::Sqlite).await;
    seed_demo(
        &tdb.db,
        &SeedParams {
            sessions: 50,
            users: 5,
            seed: 3,
            schema: SchemaVersion::V2,
            now: now(),
            reset: false,
        },
    )
    .await
    .expect("seed");
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let (db_url, redis) = (tdb.url.clone(), redis_url());
    let env_of = move |k: &str| match k {
        "DATABASE_URL" => Some(db_url.clone()),
        "REDIS_URL" => Some(redis.clone()),
        "SESSIONFLEET_NAMESPACE" => Some(ns.clone()),
        _ => None,
    };
    let settings = Settings::resolve(&Overrides::default(), &env_of, None).expect("settings");
    let queue = Queue::connect(&settings).await.expect("queue");

    let record_check = async |status: CheckStatus, issues: Vec<String>| {
        let report = MaintenanceReport::Integrity(IntegrityReport {
            timestamp: chrono::Utc::now().naive_utc(),
            integrity_check: status,
            foreign_key_check: CheckStatus::Failed,
            checks_run: vec!["PRAGMA integrity_check".into()],
            issues_found: issues,
            recommendations: Vec::new(),
        });
        let at = chrono::Utc::now();
        queue
            .record_result(&sessionfleet::testing::job_result(
                JobKind::Maintenance,
                "default",
                ResultOutcome::Succeeded,
                serde_json::to_value(&report).expect("encode"),
                at,
            ))
            .await
            .expect("record");
    };
    let integrity_alerts = async || {
        let job = OperationJob::Analytics(AnalyticsParams::HealthReport(params()));
        let env = JobEnvelope::new(JobKind::Analytics, "default", job.params(), "test");
        let shutdown = CancellationToken::new();
        let oe = OperationEnv {
            settings: &settings,
            redis: None,
            queue: Some(&queue),
            holder: "test",
            shutdown: &shutdown,
            progress: None,
        };
        let JobOutcome::Done { report, .. } = dispatch::run_operation(&env, &oe).await else {
            panic!("the health report did not finish");
        };
        let alerts: Vec<String> = report["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["name"] == "integrity_failure")
            .map(|a| a["message"].as_str().unwrap_or_default().to_string())
            .collect();
        (alerts, report["health_status"]["overall_health"].clone())
    };

    record_check(
        CheckStatus::Failed,
        vec![
            "Integrity check failed: row 7 missing from index ix_user_sessions_expires_at".into(),
            "Foreign key violation: 3 sessions in user_sessions reference missing users".into(),
        ],
    )
    .await;
    let (alerts, status) = integrity_alerts().await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(
        alerts[0].contains("row 7 missing from index") && alerts[0].contains("check of"),
        "{alerts:?}"
    );
    assert_eq!(status, "critical");

    record_check(CheckStatus::Passed, Vec::new()).await;
    let (alerts, _) = integrity_alerts().await;
    assert!(
        alerts.is_empty(),
        "a newer passing check clears it: {alerts:?}"
    );
    tdb.drop_db().await;
}

/// A security score under the critical line raises a critical alert that names that line (50),
/// not the warning line (80). Fails if the alert records the warning line.
#[tokio::test]
async fn a_critical_security_score_alert_names_the_critical_line() {
    let tdb = fixture(Engine::Sqlite).await;
    let db = &tdb.db;
    let n = now();
    let s = |x: i64| n - Duration::seconds(x);
    // Two more rapid updates (3 in all: −30) and nine more old active sessions (10: −20),
    // with the session without a platform (−1): at most 49.
    let mut rows = vec![
        ("rapid-2".to_string(), s(100), s(96)),
        ("rapid-3".to_string(), s(90), s(85)),
    ];
    rows.extend((0..9).map(|i| (format!("old-{i}"), s(8 * 86_400), s(600))));
    for (key, created, activity) in rows {
        on_pool!(db, p => sqlx::query(db.sql("INSERT INTO user_sessions (session_id, user_id, active_platform_id, created_at, updated_at, last_activity, expires_at, is_active, user_agent, ip_address) VALUES (?, 1, 1, ?, ?, ?, ?, TRUE, 'ua', '192.0.2.1')"))
            .bind(key).bind(created).bind(activity).bind(activity).bind(n + Duration::hours(24))
            .execute(p).await.map(|_| ()).expect("session"));
    }
    let r = analytics::health_report(db, &params())
        .await
        .expect("report");
    assert!(
        r.security_analysis.security_score < 50,
        "{:?}",
        r.security_analysis.score_deductions
    );
    let alert = r
        .alerts
        .iter()
        .find(|a| a.name == "security_score")
        .expect("a security-score alert");
    assert_eq!(alert.severity, Severity::Critical);
    assert_eq!(alert.threshold, 50.0);
    assert!(alert.message.ends_with("below 50"), "{}", alert.message);
    tdb.drop_db().await;
}

/// The server sessions of this database that wait for a table lock.
async fn table_lock_waiters(db: &Db) -> i64 {
    db.scalar_i64(match db.engine() {
        Engine::Postgres => {
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'"
        }
        _ => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND STATE LIKE 'Waiting for table%'"
        }
    })
    .await
    .expect("lock waiters")
}

/// Polls `done` until it holds; false if it still does not after a minute (a bound for a
/// failing test, never the outcome of a passing one).
async fn eventually(mut done: impl AsyncFnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while !done().await {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// An analytics job cancelled before its report is done (a worker's shutdown, the CLI's
/// deadline) is handed back whole — deferred at once, spending no attempt — its statements
/// cancelled on the server the moment it gives up, with the table still locked. Fails if the
/// report ignores the cancellation: it then waits for the lock and ends done, and a report of
/// a minute outlasts the worker's shutdown timeout, is counted a worker death and runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analytics_job_cancelled_mid_report_is_handed_back_and_its_queries_cancelled() {
    use sessionfleet::dispatch::{self, OperationEnv, OperationJob};
    use sessionfleet::jobs::{JobEnvelope, JobKind};
    use sessionfleet::runner::JobOutcome;
    use sessionfleet::testing::HeldLock;

    // Cancelled before it starts: no report, and the job is deferred, not done or failed.
    let tdb = fixture(Engine::Sqlite).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let ctx = OpContext {
        db: tdb.db.clone(),
        fence: None,
        cancel: cancel.clone(),
        progress: Default::default(),
    };
    let p = AnalyticsParams::HealthReport(params());
    assert!(analytics::run(&ctx, &p).await.expect("run").is_none());
    let settings = sessionfleet::testing::settings_for_database(&tdb.url);
    let job = OperationJob::Analytics(p.clone());
    let env = JobEnvelope::new(JobKind::Analytics, "default", job.params(), "test");
    let oe = OperationEnv {
        settings: &settings,
        redis: None,
        queue: None,
        holder: "test",
        shutdown: &cancel,
        progress: None,
    };
    let outcome = dispatch::run_operation(&env, &oe).await;
    assert!(
        matches!(&outcome, JobOutcome::Deferred { delay, .. } if delay.is_zero()),
        "{outcome:?}"
    );
    tdb.drop_db().await;

    // Cancelled while its queries wait for a lock on the sessions table.
    for engine in [Engine::Postgres, Engine::MySql] {
        let tdb = seeded(engine, SchemaVersion::V2, 300).await;
        let lock = HeldLock::sessions_table(&tdb.url).await;
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let (url, shutdown) = (tdb.url.clone(), shutdown.clone());
            async move {
                let settings = sessionfleet::testing::settings_for_database(&url);
                let job = OperationJob::Analytics(AnalyticsParams::HealthReport(params()));
                let env = JobEnvelope::new(JobKind::Analytics, "default", job.params(), "test");
                let oe = OperationEnv {
                    settings: &settings,
                    redis: None,
                    queue: None,
                    holder: "test",
                    shutdown: &shutdown,
                    progress: None,
                };
                dispatch::run_operation(&env, &oe).await
            }
        });
        assert!(
            eventually(async || table_lock_waiters(&tdb.db).await > 0).await,
            "{engine}: the report never waited for the lock"
        );
        shutdown.cancel();
        let gave_up = eventually(async || run.is_finished()).await;
        let queries_left =
            gave_up && !eventually(async || table_lock_waiters(&tdb.db).await == 0).await;
        lock.release().await;
        let outcome = run.await.expect("the job");
        assert!(
            matches!(&outcome, JobOutcome::Deferred { .. }),
            "{engine}: {outcome:?}"
        );
        assert!(gave_up, "{engine}: the job waited for the lock");
        assert!(
            !queries_left,
            "{engine}: the report's queries still wait on the server"
        );
        tdb.drop_db().await;
    }
}
