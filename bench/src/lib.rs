//! Shared pieces of the benchmark binaries: scratch databases, peak memory, percentiles.

use std::time::Duration;

use sessionfleet::store::{ConnectOptions, Db};

/// Engine selection for `--engine`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Engine {
    /// A scratch SQLite file under the system temp dir.
    Sqlite,
    /// A scratch database on the local PostgreSQL.
    Postgres,
    /// A scratch database on the local MariaDB/MySQL.
    Mysql,
}

/// A database created for one benchmark run.
pub struct Scratch {
    /// Its URL.
    pub url: String,
    drop_sql: Option<(String, String)>,
}

impl Scratch {
    /// Removes the scratch database.
    pub async fn drop(self) {
        match self.drop_sql {
            Some((admin, sql)) => {
                if let Ok(db) = Db::connect(&admin, &ConnectOptions::default()).await {
                    let _ = db.execute(&sql).await;
                    db.close().await;
                }
            }
            None => {
                let path = self.url.trim_start_matches("sqlite://").to_string();
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{path}{suffix}"));
                }
            }
        }
    }
}

/// Creates an empty scratch database. Admin URLs: `BENCH_PG_URL`, `BENCH_MYSQL_URL`.
pub async fn scratch_database(engine: Engine) -> anyhow::Result<Scratch> {
    let name = format!("sf_bench_{}", std::process::id());
    Ok(match engine {
        Engine::Sqlite => {
            let path = std::env::temp_dir().join(format!("{name}.db"));
            let _ = std::fs::remove_file(&path);
            Scratch {
                url: format!("sqlite://{}", path.display()),
                drop_sql: None,
            }
        }
        Engine::Postgres | Engine::Mysql => {
            let (admin, base) = match engine {
                Engine::Postgres => (
                    std::env::var("BENCH_PG_URL")
                        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
                    "postgres://postgres@127.0.0.1:5432",
                ),
                _ => (
                    std::env::var("BENCH_MYSQL_URL")
                        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
                    "mysql://root@127.0.0.1:3306",
                ),
            };
            let db = Db::connect(&admin, &ConnectOptions::default()).await?;
            db.execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await?;
            db.execute(&format!("CREATE DATABASE {name}")).await?;
            db.close().await;
            Scratch {
                url: format!("{base}/{name}"),
                drop_sql: Some((admin, format!("DROP DATABASE IF EXISTS {name}"))),
            }
        }
    })
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The p-th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let idx = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[idx.min(samples.len() - 1)]
}
