//! `sessionfleet-bench` (default binary): seeding throughput — how fast `seed-demo` fills a
//! database — with peak memory. The other benchmarks are the binaries in `src/bin/`.
//!
//! Run: `cargo run --release -p sessionfleet-bench -- --engine sqlite --sessions 1000000`

use anyhow::Context;
use clap::Parser;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, SchemaVersion};
use sessionfleet_bench::{Engine, peak_rss_mib, scratch_database};

/// Measures demo-data seeding.
#[derive(Parser)]
struct Args {
    /// Engine to seed.
    #[arg(long, value_enum, default_value = "sqlite")]
    engine: Engine,
    /// Sessions to write.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = scratch_database(args.engine).await?;
    let db = Db::connect(&scratch.url, &ConnectOptions::creating_sqlite_file()).await?;
    let params = SeedParams {
        reset: true,
        ..SeedParams::new(
            args.sessions,
            1,
            SchemaVersion::V2,
            chrono::Utc::now().naive_utc(),
        )
    };
    let report = seed_demo(&db, &params).await.context("seeding")?;
    db.close().await;
    scratch.drop().await;
    println!(
        "engine={:?} sessions={} seconds={:.2} rows_per_second={:.0} peak_rss_mib={:.1}",
        args.engine,
        report.sessions,
        report.duration_seconds,
        report.sessions as f64 / report.duration_seconds,
        peak_rss_mib()
    );
    Ok(())
}
