//! Lease benchmark: acquire + release latency (with the database token issue) per engine,
//! the cost of renewals, and the time from a holder's death to the next holder's first
//! fenced write with default settings.
//!
//! Runs against a private `redis-server` it starts on a free port (so other Redis users do not
//! disturb the numbers, nor the numbers them) and fresh PostgreSQL / MariaDB databases and a
//! SQLite file, all dropped at the end.
//!
//! `cargo run --release -p sessionfleet-bench --bin lease -- --iterations 300 --death-reps 3`

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use redis::aio::ConnectionManager;
use sessionfleet::CancellationToken;
use sessionfleet::lease::{self, HolderInfo, LeaseConfig};
use sessionfleet::store::{ConnectOptions, Db, Engine};

#[derive(Parser)]
struct Args {
    /// Acquire + release cycles per engine.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// Leases kept alive at once for the renewal-overhead measurement.
    #[arg(long, default_value_t = 100)]
    renew_leases: usize,
    /// TTL of those leases, ms (renewed every third of it).
    #[arg(long, default_value_t = 300)]
    renew_ttl_ms: u64,
    /// Seconds to measure renewals for.
    #[arg(long, default_value_t = 10)]
    renew_secs: u64,
    /// Holder deaths per engine (each takes about one TTL).
    #[arg(long, default_value_t = 3)]
    death_reps: usize,
    /// PostgreSQL admin URL.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin: String,
    /// MariaDB admin URL.
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    mysql_admin: String,
}

struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    fn start() -> Result<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server")?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(PrivateRedis { port, child });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not start")
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database made for this run; dropped by [`BenchDb::drop_db`].
struct BenchDb {
    engine: Engine,
    db: Db,
    name: String,
    admin: Option<String>,
    _dir: Option<tempdir::Dir>,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl BenchDb {
    async fn new(engine: Engine, args: &Args) -> Result<BenchDb> {
        let name = format!("sf_bench_lease_{}", std::process::id());
        let opts = ConnectOptions::default();
        let (url, admin, dir) = match engine {
            Engine::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir)?;
                (
                    format!("sqlite://{}/lease.db", dir.display()),
                    None,
                    Some(tempdir::Dir(dir)),
                )
            }
            Engine::Postgres | Engine::MySql => {
                let admin = if engine == Engine::Postgres {
                    &args.pg_admin
                } else {
                    &args.mysql_admin
                };
                let a = Db::connect(admin, &opts).await?;
                a.execute(&format!("CREATE DATABASE {name}")).await?;
                a.close().await;
                let mut u = url::Url::parse(admin)?;
                u.set_path(&format!("/{name}"));
                (u.to_string(), Some(admin.clone()), None)
            }
        };
        let db = Db::connect(&url, &opts).await?;
        Ok(BenchDb {
            engine,
            db,
            name,
            admin,
            _dir: dir,
        })
    }

    async fn drop_db(self) {
        self.db.close().await;
        if let Some(admin) = self.admin
            && let Ok(a) = Db::connect(&admin, &ConnectOptions::default()).await
        {
            let force = if self.engine == Engine::Postgres {
                " WITH (FORCE)"
            } else {
                ""
            };
            let _ = a
                .execute(&format!("DROP DATABASE IF EXISTS {}{force}", self.name))
                .await;
            a.close().await;
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let mean = v.iter().map(|d| d.as_secs_f64()).sum::<f64>() / v.len() as f64 * 1000.0;
    format!(
        "n={} p50={:.2} ms p99={:.2} ms mean={:.2} ms max={:.2} ms",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.99),
        mean,
        pct(&v, 1.0)
    )
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10)) // USER_HZ = 100 on Linux
}

/// `calls` and `usec_per_call` of EVALSHA from INFO commandstats.
async fn evalsha_stats(redis: &ConnectionManager) -> Result<(u64, f64)> {
    let mut con = redis.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await?;
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_evalsha:") {
            let get = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            return Ok((get("calls") as u64, get("usec_per_call")));
        }
    }
    Ok((0, 0.0))
}

async fn acquire_release(redis: &ConnectionManager, bdb: &BenchDb, n: usize) -> Result<String> {
    let ns = format!("bench{}", std::process::id());
    let cfg = LeaseConfig::default();
    let h = HolderInfo::new("bench", "acquire");
    let target = format!("ar-{}", bdb.engine);
    // Warm up: creates the fence tables, loads the scripts.
    for _ in 0..5 {
        let l = lease::try_acquire(redis, &ns, &target, &h, &bdb.db, &cfg)
            .await?
            .context("free")?;
        l.release(redis).await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let l = lease::try_acquire(redis, &ns, &target, &h, &bdb.db, &cfg)
            .await?
            .context("free")?;
        l.release(redis).await?;
        times.push(t.elapsed());
    }
    Ok(summary(times))
}

async fn redis_only_baseline(redis: &ConnectionManager, n: usize) -> Result<String> {
    let mut con = redis.clone();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("SET")
            .arg("bench:base")
            .arg("x")
            .arg("NX")
            .arg("PX")
            .arg(15000)
            .query_async(&mut con)
            .await?;
        let _: i64 = redis::cmd("DEL")
            .arg("bench:base")
            .query_async(&mut con)
            .await?;
        times.push(t.elapsed());
    }
    Ok(summary(times))
}

async fn renewal_overhead(redis: &ConnectionManager, bdb: &BenchDb, args: &Args) -> Result<String> {
    let ns = format!("bench{}r", std::process::id());
    let cfg = LeaseConfig::from_ttl(Duration::from_millis(args.renew_ttl_ms));
    let cancel = CancellationToken::new();
    let mut held = Vec::new();
    for i in 0..args.renew_leases {
        let l = lease::try_acquire(
            redis,
            &ns,
            &format!("r{i}"),
            &HolderInfo::new("bench", "renew"),
            &bdb.db,
            &cfg,
        )
        .await?
        .context("free")?;
        let k = l.spawn_keeper(redis, cancel.clone());
        held.push((l, k));
    }
    tokio::time::sleep(cfg.renew_every * 2).await;
    let (calls0, _) = evalsha_stats(redis).await?;
    let cpu0 = cpu_time()?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.renew_secs)).await;
    let cpu = cpu_time()? - cpu0;
    let wall = t0.elapsed();
    let (calls1, usec) = evalsha_stats(redis).await?;
    let lost = held.iter().filter(|(_, k)| k.lost().is_some()).count();
    for (l, _) in held {
        l.release(redis).await?;
    }
    let renewals = calls1.saturating_sub(calls0).saturating_sub(1);
    let per_s = renewals as f64 / wall.as_secs_f64();
    Ok(format!(
        "{} leases, ttl {} ms (renew every {} ms): {renewals} renewals in {:.1} s = {per_s:.0}/s; \
         client CPU {:.0} ms = {:.1} us/renewal ({:.1}% of one core); Redis EVALSHA {usec:.2} us/call server-side; \
         leases lost: {lost}",
        args.renew_leases,
        args.renew_ttl_ms,
        cfg.renew_every.as_millis(),
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0,
        cpu.as_secs_f64() * 1e6 / renewals.max(1) as f64,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
    ))
}

/// A holder with default settings dies (stops renewing, no release) at a random point of its
/// renewal cycle; the next job retries on the busy delay until it gets the lease and makes
/// its first fenced write.
async fn death_to_takeover(
    redis: ConnectionManager,
    bdb: &BenchDb,
    reps: usize,
) -> Result<Vec<Duration>> {
    let ns = format!("bench{}d", std::process::id());
    let target = format!("death-{}", bdb.engine);
    let cfg = LeaseConfig::default();
    let mut out = Vec::new();
    for rep in 0..reps {
        let a = lease::try_acquire(
            &redis,
            &ns,
            &target,
            &HolderInfo::new("a", format!("a{rep}")),
            &bdb.db,
            &cfg,
        )
        .await?
        .context("free")?;
        let keeper = a.spawn_keeper(&redis, CancellationToken::new());
        let hold = Duration::from_millis(rand::random_range(
            0..cfg.renew_every.as_millis() as u64 * 2,
        ));
        tokio::time::sleep(hold).await;
        keeper.stop();
        drop(a); // died: no release
        let died = Instant::now();
        let b = loop {
            match lease::try_acquire(
                &redis,
                &ns,
                &target,
                &HolderInfo::new("b", format!("b{rep}")),
                &bdb.db,
                &cfg,
            )
            .await?
            {
                Some(l) => break l,
                None => tokio::time::sleep(cfg.busy_delay()).await,
            }
        };
        b.fence().check(&bdb.db).await?;
        out.push(died.elapsed());
        b.release(&redis).await?;
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server = PrivateRedis::start()?;
    let redis = redis::Client::open(server.url())?
        .get_connection_manager()
        .await?;
    let mut dbs = Vec::new();
    for e in [Engine::Sqlite, Engine::Postgres, Engine::MySql] {
        dbs.push(BenchDb::new(e, &args).await?);
    }

    println!("## acquire + release (default config; includes the database token issue)");
    println!(
        "- redis only (SET NX PX + DEL, no token): {}",
        redis_only_baseline(&redis, args.iterations).await?
    );
    for bdb in &dbs {
        println!(
            "- {}: {}",
            bdb.engine,
            acquire_release(&redis, bdb, args.iterations).await?
        );
    }

    println!("## renewal overhead");
    println!("- {}", renewal_overhead(&redis, &dbs[0], &args).await?);

    println!(
        "## holder death -> next holder's first fenced write (default config: ttl 15 s, busy delay 1-2 s)"
    );
    let runs = futures_join(&redis, &dbs, args.death_reps).await?;
    for (engine, times) in runs {
        let ms: Vec<String> = times
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect();
        println!("- {engine}: {}", ms.join(", "));
    }
    for bdb in dbs {
        bdb.drop_db().await;
    }
    Ok(())
}

/// The three engines' death measurements run at once: they are mostly waiting.
async fn futures_join(
    redis: &ConnectionManager,
    dbs: &[BenchDb],
    reps: usize,
) -> Result<Vec<(Engine, Vec<Duration>)>> {
    let (a, b, c) = tokio::join!(
        death_to_takeover(redis.clone(), &dbs[0], reps),
        death_to_takeover(redis.clone(), &dbs[1], reps),
        death_to_takeover(redis.clone(), &dbs[2], reps),
    );
    Ok(vec![
        (dbs[0].engine, a?),
        (dbs[1].engine, b?),
        (dbs[2].engine, c?),
    ])
}
