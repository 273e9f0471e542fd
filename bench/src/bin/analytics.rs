//! Benchmark harness (not a test): the full analytics health report on a large seeded session
//! table, per engine — wall time, number of queries, per-query times, peak RSS.
//!
//! ```text
//! cargo run --release -p sessionfleet-bench --bin analytics -- --engine sqlite --sessions 1000000
//! ```
//!
//! The database (`sf_bench_analytics_<n>` on the servers, a file under `--dir` for SQLite) is
//! seeded once with `seed_demo` and reused by later runs. Before the report, the peak-RSS
//! counter is reset (`/proc/self/clear_refs` = 5), so VmHWM measures the report alone.

use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{NaiveDate, NaiveDateTime};
use clap::Parser;
use sessionfleet::ops::analytics::{self, HealthParams};
use sessionfleet::ops::maintenance;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, Engine, SchemaVersion, schema};

#[derive(Parser)]
struct Args {
    /// sqlite, postgres or mysql.
    #[arg(long)]
    engine: String,
    /// Sessions to seed.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: u64,
    /// Report runs after seeding (the first is reported separately as cold).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Directory for SQLite files.
    #[arg(long, default_value = "/tmp/sf-bench")]
    dir: String,
    /// Schema version to seed (v1 or v2).
    #[arg(long, default_value = "v2")]
    schema: SchemaVersion,
}

fn fixed_now() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2025, 3, 10)
        .and_then(|d| d.and_hms_opt(12, 0, 0))
        .expect("valid date")
}

fn proc_status(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn target_db(args: &Args) -> Result<Db> {
    let name = format!("sf_bench_analytics_{}_{}", args.schema, args.sessions);
    let opts = ConnectOptions::default();
    let url = match args.engine.as_str() {
        "sqlite" => {
            std::fs::create_dir_all(&args.dir)?;
            format!("sqlite://{}/{name}.db", args.dir)
        }
        "postgres" => {
            let admin = Db::connect("postgres://postgres@127.0.0.1:5432/postgres", &opts).await?;
            let exists = admin
                .scalar_i64(&format!(
                    "SELECT COUNT(*) FROM pg_database WHERE datname = '{name}'"
                ))
                .await?;
            if exists == 0 {
                admin.execute(&format!("CREATE DATABASE {name}")).await?;
            }
            admin.close().await;
            format!("postgres://postgres@127.0.0.1:5432/{name}")
        }
        "mysql" => {
            let admin = Db::connect("mysql://root@127.0.0.1:3306/test", &opts).await?;
            admin
                .execute(&format!("CREATE DATABASE IF NOT EXISTS {name}"))
                .await?;
            admin.close().await;
            format!("mysql://root@127.0.0.1:3306/{name}")
        }
        other => anyhow::bail!("unknown engine {other} (sqlite, postgres or mysql)"),
    };
    Ok(Db::connect(&url, &opts).await?)
}

/// `CREATE INDEX` for every recommended index the table lacks — the set `sessionfleet db
/// --create-indexes` builds (there online; here plainly, on a scratch database).
async fn recommended_index_ddl(db: &Db) -> Result<Vec<String>> {
    let schema = schema::detect(db).await?;
    let missing = maintenance::missing_recommended_indexes(db).await?;
    Ok(maintenance::recommended_indexes(&schema)
        .into_iter()
        .filter(|spec| missing.contains(&spec.name))
        .map(|spec| {
            format!(
                "CREATE INDEX {} ON {} ({})",
                spec.name,
                spec.table,
                spec.columns.join(", ")
            )
        })
        .collect())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let db = target_db(&args).await?;
    let engine = db.engine();
    let present = db
        .scalar_i64("SELECT COUNT(*) FROM user_sessions")
        .await
        .unwrap_or(-1);
    if present != args.sessions as i64 {
        let started = Instant::now();
        let sp = SeedParams {
            sessions: args.sessions,
            users: SeedParams::default_users(args.sessions),
            seed: 42,
            schema: args.schema,
            now: fixed_now(),
            reset: true,
        };
        let r = seed_demo(&db, &sp).await.context("seeding")?;
        eprintln!(
            "seeded {} sessions in {:.1} s",
            r.sessions,
            started.elapsed().as_secs_f64()
        );
    }
    for ddl in recommended_index_ddl(&db).await? {
        db.execute(&ddl).await?;
    }
    match engine {
        Engine::Sqlite => db.execute("ANALYZE").await.map(|_| ())?,
        // What `sessionfleet db --optimize --vacuum` (or autovacuum) leaves behind: fresh
        // statistics and a visibility map, so the per-user and platform steps run index-only.
        Engine::Postgres => db
            .execute("VACUUM (ANALYZE) user_sessions")
            .await
            .map(|_| ())?,
        Engine::MySql => mysql_analyze(&db).await?,
    }

    // Reset the peak so VmHWM measures the report, not the seeding.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let params = HealthParams {
        now: Some(fixed_now()),
        ..HealthParams::default()
    };
    let mut walls = Vec::new();
    let mut last = None;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        let r = analytics::health_report(&db, &params).await?;
        walls.push(started.elapsed().as_secs_f64() * 1000.0);
        last = Some(r);
    }
    let r = last.context("no run")?;
    let info = db.describe().await?;
    println!("engine: {} {}", engine, info.version);
    println!(
        "sessions: {} (schema {})",
        r.statistics.session_counts.total_sessions, args.schema
    );
    println!(
        "wall ms per run: {}",
        walls
            .iter()
            .map(|w| format!("{w:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("queries per report: {}", r.performance_metrics.query_count);
    for q in &r.performance_metrics.queries {
        println!("  {:<26} {:>8.1} ms  {} rows", q.name, q.millis, q.rows);
    }
    println!(
        "peak RSS during reports (VmHWM): {} KiB{}; VmRSS now {} KiB",
        proc_status("VmHWM:").unwrap_or(0),
        if reset {
            ""
        } else {
            " (could not reset the peak: includes seeding)"
        },
        proc_status("VmRSS:").unwrap_or(0)
    );
    println!(
        "health: {}; active {}; alerts {}",
        r.health_status.overall_health.name(),
        r.statistics.session_counts.active_sessions,
        r.alerts.len()
    );
    db.close().await;
    Ok(())
}

async fn mysql_analyze(db: &Db) -> Result<()> {
    // ANALYZE TABLE returns a result set; fetch and discard it.
    sessionfleet::on_pool!(db, p => {
        sqlx::query("ANALYZE TABLE user_sessions").fetch_all(p).await?;
    });
    Ok(())
}
