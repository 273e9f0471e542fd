//! `maintenance` benchmark: analyze, create-indexes and optimize on a large session table,
//! and the latency an application sees while the indexes are built.
//!
//! The recommended indexes (except the session-key one the application needs) are dropped
//! after seeding, so create-indexes really builds five of them. Meanwhile an "application"
//! on its own pool loops: read one session by id, then touch it (UPDATE of the activity
//! columns). Its per-iteration latency is reported for a quiet baseline and for the build.
//!
//! Run: `cargo run --release -p sessionfleet-bench --bin maintenance -- --engine postgres --sessions 1000000`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rand::Rng;
use sessionfleet::CancellationToken;
use sessionfleet::fence;
use sessionfleet::ops::OpContext;
use sessionfleet::ops::maintenance;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, Engine as DbEngine, SchemaVersion};
use sessionfleet_bench::{Engine, percentile, scratch_database};

/// Measures the maintenance steps and the application's latency during online index builds.
#[derive(Parser)]
struct Args {
    /// Engine to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    engine: Engine,
    /// Sessions in the table.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: u64,
    /// Length of the quiet baseline of the application loop, in seconds.
    #[arg(long, default_value_t = 3)]
    baseline_seconds: u64,
}

/// Latency samples of the application loop.
struct AppLoop {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Vec<Duration>>,
}

/// Starts the application: read a session by id, then touch it, as fast as it can.
fn start_app(app: Db, sessions: u64) -> AppLoop {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let (s, e) = (stop.clone(), errors.clone());
    let handle = tokio::spawn(async move {
        let mut samples = Vec::new();
        let read = "SELECT session_id, user_id, expires_at FROM user_sessions WHERE id = ?";
        let touch = "UPDATE user_sessions SET last_activity = ?, updated_at = ? WHERE id = ?";
        while !s.load(Ordering::Relaxed) {
            let id = rand::rng().random_range(1..=sessions as i64);
            let now = chrono::Utc::now().naive_utc();
            let t0 = Instant::now();
            let ok = sessionfleet::on_pool!(&app, p => {
                let r = sqlx::query(app.sql(read)).bind(id).fetch_optional(p).await;
                let w = sqlx::query(app.sql(touch)).bind(now).bind(now).bind(id).execute(p).await;
                r.is_ok() && w.is_ok()
            });
            samples.push(t0.elapsed());
            if !ok {
                e.fetch_add(1, Ordering::Relaxed);
            }
        }
        samples
    });
    AppLoop {
        stop,
        errors,
        handle,
    }
}

impl AppLoop {
    async fn finish(self) -> anyhow::Result<(Vec<Duration>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.handle.await?;
        Ok((samples, self.errors.load(Ordering::Relaxed)))
    }
}

fn describe(label: &str, mut samples: Vec<Duration>, errors: u64) -> String {
    let n = samples.len();
    let p50 = percentile(&mut samples, 50.0);
    let p99 = percentile(&mut samples, 99.0);
    let max = samples.last().copied().unwrap_or_default();
    format!(
        "{label}: iterations={n} errors={errors} p50_ms={:.2} p99_ms={:.2} max_ms={:.1}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = scratch_database(args.engine).await?;
    let db = Db::connect(&scratch.url, &ConnectOptions::creating_sqlite_file()).await?;
    let t0 = Instant::now();
    seed_demo(
        &db,
        &SeedParams {
            sessions: args.sessions,
            users: SeedParams::default_users(args.sessions),
            seed: 1,
            schema: SchemaVersion::V2,
            now: chrono::Utc::now().naive_utc(),
            reset: true,
        },
    )
    .await
    .context("seeding")?;
    println!(
        "engine={} sessions={} seed_seconds={:.1}",
        db.engine(),
        args.sessions,
        t0.elapsed().as_secs_f64()
    );
    for ix in [
        "user_id",
        "updated_at",
        "last_activity",
        "expires_at",
        "is_active",
    ] {
        let sql = match db.engine() {
            DbEngine::MySql => format!("DROP INDEX ix_user_sessions_{ix} ON user_sessions"),
            _ => format!("DROP INDEX ix_user_sessions_{ix}"),
        };
        match db.execute(&sql).await {
            Ok(_) => {}
            // MySQL keeps an index a foreign key needs (1553): that one stays built.
            Err(e) if sessionfleet::store::mysql_error_number(&e) == Some(1553) => {
                println!("kept ix_user_sessions_{ix}: a foreign key needs it");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let fence = fence::issue_token(&db, "target:bench", "bench-maintenance").await?;
    let ctx = OpContext {
        db: db.clone(),
        fence: Some(fence),
        cancel: CancellationToken::new(),
        progress: Default::default(),
    };

    let t = Instant::now();
    let analysis = maintenance::analyze(&db).await?;
    println!(
        "analyze_seconds={:.2} recommendations={}",
        t.elapsed().as_secs_f64(),
        analysis.recommendations.len()
    );

    // The application gets its own pool, as a real one would.
    let app = Db::connect(
        &scratch.url,
        &ConnectOptions {
            max_connections: 2,
            ..ConnectOptions::default()
        },
    )
    .await?;
    let baseline = start_app(app.clone(), args.sessions);
    tokio::time::sleep(Duration::from_secs(args.baseline_seconds)).await;
    let (samples, errors) = baseline.finish().await?;
    println!("{}", describe("app_baseline", samples, errors));

    let during = start_app(app.clone(), args.sessions);
    let t = Instant::now();
    let built = maintenance::create_indexes(&ctx, false).await?;
    let build_seconds = t.elapsed().as_secs_f64();
    let (samples, errors) = during.finish().await?;
    println!(
        "create_indexes_seconds={build_seconds:.2} created={:?} errors={:?}",
        built.indexes_created, built.errors
    );
    println!("{}", describe("app_during_index_build", samples, errors));

    for vacuum in [false, true] {
        let t = Instant::now();
        let r = maintenance::optimize(&ctx, vacuum).await?;
        let ops: Vec<String> = r
            .operations_performed
            .iter()
            .map(|o| format!("{}={:.0}ms", o.statement, o.duration_ms))
            .collect();
        println!(
            "optimize vacuum={vacuum} seconds={:.2} ops={ops:?} errors={:?}",
            t.elapsed().as_secs_f64(),
            r.errors
        );
    }
    app.close().await;
    db.close().await;
    scratch.drop().await;
    Ok(())
}
