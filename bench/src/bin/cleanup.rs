//! Cleanup benchmark: our batched, fenced cleanup versus one plain `DELETE` on identical data,
//! each while an application loop reads and updates live sessions at a fixed rate.
//!
//! The parent seeds two identical databases, then runs each side in a child process (this
//! binary with `--side`), so each side's peak RSS (VmHWM) is its own. Results go to stdout as
//! a Markdown table; see `bench/results/cleanup.md`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{NaiveDateTime, Utc};
use clap::Parser;
use rand::Rng;
use serde_json::json;
use sessionfleet::CancellationToken;
use sessionfleet::fence;
use sessionfleet::ops::OpContext;
use sessionfleet::ops::cleanup::{self, CleanupParams};
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, Engine, SchemaVersion};
use sessionfleet::testing::TestDb;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// sqlite, postgres or mysql.
    #[arg(long, default_value = "sqlite")]
    engine: String,
    /// Sessions to seed (about 60 % expired).
    #[arg(long, default_value_t = 1_000_000)]
    sessions: u64,
    /// Application operations per second (each: read one live session, update its activity).
    #[arg(long, default_value_t = 200)]
    app_rate: u32,
    /// Seconds of application load measured before the cleanup starts (after a warm-up second
    /// that is not measured).
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Cleanup target transaction duration, ms; the engine's default
    /// (`cleanup::default_target_batch_ms`) when not given.
    #[arg(long)]
    target_batch_ms: Option<u64>,
    /// Cleanup rest after each batch, as a multiple of the batch's time; the engine's default
    /// (`cleanup::default_rest_ratio`) when not given.
    #[arg(long)]
    rest_ratio: Option<f64>,
    /// Cleanup reads beside its deletes (`CleanupParams::parallel_reads`); `false` keeps it
    /// to one statement at a time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    parallel_reads: bool,
    /// Where the application loop runs: `own` — a runtime and threads of its own, as an
    /// application is another process; `shared` — this process's runtime workers, which the
    /// cleanup's client work also needs (the harness's only mode before 2026-12-04 evening).
    #[arg(long, default_value = "own", value_parser = ["own", "shared"])]
    app_runtime: String,
    /// PostgreSQL: whether the application's commits wait for their WAL to reach the disk
    /// (its `synchronous_commit`; `on` is the server's default and the document's runs). A
    /// diagnostic: each such commit also writes out the WAL our batches left unflushed, and
    /// `off` shows how much of the application's latency that is.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    app_sync_commit: bool,
    /// Which sides to run, comma-separated: `ours`, `plain` (the document's runs use both),
    /// and two controls that delete nothing, for what the application's latency does without
    /// a cleanup: `none` (its window is `--control-secs` of nothing: the measurement's own
    /// noise) and `cpu` (`--control-threads` threads spinning for that time: CPU contention
    /// alone). Checked before any database is seeded.
    #[arg(long, default_value = "ours,plain", value_delimiter = ',',
          value_parser = ["ours", "plain", "none", "cpu"])]
    sides: Vec<String>,
    /// Length of the control sides' window, seconds.
    #[arg(long, default_value_t = 20)]
    control_secs: u64,
    /// Spinning threads of the `cpu` control side.
    #[arg(long, default_value_t = 1)]
    control_threads: u32,
    /// Also write every application operation of each side to `DIR/<side>-app.csv`: its
    /// scheduled start in ms relative to the cleanup's start, and its latency in ms.
    #[arg(long, value_name = "DIR")]
    app_trace: Option<std::path::PathBuf>,
    /// Runs of every side (each on freshly seeded data). Above 1, a pooled table follows the
    /// runs: the application's percentiles over every run's operations together, since one
    /// run's cleanup window holds only a few hundred of them on a fast engine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// MariaDB: after the cleanup, keep the application running until InnoDB has purged the
    /// rows the side deleted (at most `PURGE_WAIT_LIMIT`), and report that time, the I/O to
    /// then and the application's latency over it. A committed DELETE only marks its rows;
    /// the purge that removes them from the table and its indexes comes after, and the plain
    /// side's would otherwise never be seen.
    #[arg(long)]
    until_purged: bool,
    /// Internal: run one side (`ours` or `plain`) against `--url` and print JSON.
    #[arg(long)]
    side: Option<String>,
    /// Internal: database URL for `--side`.
    #[arg(long)]
    url: Option<String>,
    /// Internal: the seed's reference time (RFC 3339 naive) for `--side`.
    #[arg(long)]
    as_of: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // RUST_LOG=sessionfleet=debug shows each cleanup batch.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match args.side.clone() {
        Some(side) => child(&args, &side).await,
        None => parent(&args).await,
    }
}

fn engine_of(name: &str) -> Result<Engine> {
    Ok(match name {
        "sqlite" => Engine::Sqlite,
        "postgres" | "postgresql" => Engine::Postgres,
        "mysql" | "mariadb" => Engine::MySql,
        other => bail!("unknown engine {other}"),
    })
}

async fn parent(args: &Args) -> Result<()> {
    let engine = engine_of(&args.engine)?;
    let now = Utc::now().naive_utc();
    let now =
        now - chrono::Duration::nanoseconds(i64::from(now.and_utc().timestamp_subsec_nanos()));
    let mut results = Vec::new();
    let runs =
        (1..=args.repeat).flat_map(|run| args.sides.iter().map(move |side| (run, side.as_str())));
    for (run, side) in runs {
        let tdb = TestDb::new(engine).await;
        let seed = SeedParams {
            sessions: args.sessions,
            users: SeedParams::default_users(args.sessions),
            seed: 7,
            schema: SchemaVersion::V2,
            now,
            reset: false,
        };
        let t = Instant::now();
        let rep = seed_demo(&tdb.db, &seed).await?;
        eprintln!(
            "{side}: seeded {} sessions in {:.1}s",
            rep.sessions,
            t.elapsed().as_secs_f64()
        );
        if engine != Engine::Sqlite {
            tdb.db.execute("ANALYZE user_sessions").await.ok();
        }
        let t = Instant::now();
        settle_writes(&tdb.db).await?;
        eprintln!(
            "{side}: seed's writes settled in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--engine", &args.engine, "--side", side, "--url", &tdb.url])
            .args([
                "--app-rate",
                &args.app_rate.to_string(),
                "--idle-secs",
                &args.idle_secs.to_string(),
                "--control-secs",
                &args.control_secs.to_string(),
                "--control-threads",
                &args.control_threads.to_string(),
            ])
            .args(
                args.target_batch_ms
                    .iter()
                    .flat_map(|ms| ["--target-batch-ms".to_string(), ms.to_string()]),
            )
            .args(
                args.rest_ratio
                    .iter()
                    .flat_map(|r| ["--rest-ratio".to_string(), r.to_string()]),
            )
            .args(["--parallel-reads", &args.parallel_reads.to_string()])
            .args(["--app-runtime", &args.app_runtime])
            .args(["--app-sync-commit", &args.app_sync_commit.to_string()])
            .args(["--as-of", &now.format("%Y-%m-%dT%H:%M:%S").to_string()])
            .args(args.until_purged.then_some("--until-purged"))
            .args(trace_dir(args, run)?.iter().flat_map(|d| {
                [
                    std::ffi::OsString::from("--app-trace"),
                    d.clone().into_os_string(),
                ]
            }))
            .output()?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("{side} side failed");
        }
        let mut v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("child output")?;
        v["run"] = json!(run);
        results.push(v);
        tdb.drop_db().await;
    }
    let pooled = pool_runs(&mut results);
    println!("{}", serde_json::to_string_pretty(&results)?);
    println!();
    println!(
        "| side (run) | rows deleted | seconds | rows/s | longest tx ms | batches | peak RSS MiB | app p50 idle/during ms | app p99 idle/during ms | app max idle/during ms | app errors | engine I/O during | busy cores: machine / this process |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for v in &results {
        println!(
            "| {} ({}) | {} | {:.2} | {:.0} | {:.1} | {} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} | {} | {} | {:.2} / {:.2} |",
            v["side"].as_str().unwrap_or("?"),
            v["run"],
            v["deleted"],
            v["seconds"].as_f64().unwrap_or(0.0),
            v["rows_per_second"].as_f64().unwrap_or(0.0),
            v["longest_tx_ms"].as_f64().unwrap_or(0.0),
            v["batches"],
            v["peak_rss_mib"].as_f64().unwrap_or(0.0),
            v["idle"]["p50"].as_f64().unwrap_or(0.0),
            v["during"]["p50"].as_f64().unwrap_or(0.0),
            v["idle"]["p99"].as_f64().unwrap_or(0.0),
            v["during"]["p99"].as_f64().unwrap_or(0.0),
            v["idle"]["max"].as_f64().unwrap_or(0.0),
            v["during"]["max"].as_f64().unwrap_or(0.0),
            v["app_errors"],
            io_text(&v["engine_io"]),
            v["machine_busy_cores"].as_f64().unwrap_or(0.0),
            v["process_busy_cores"].as_f64().unwrap_or(0.0),
        );
    }
    print_rate_ratios(&results, args.repeat);
    if args.repeat > 1 {
        print_pooled(&pooled);
    }
    for v in results.iter().filter(|v| !v["until_purged"].is_null()) {
        let p = &v["until_purged"];
        println!();
        println!(
            "{} ({}): purged {:.2} s after the start; app after the cleanup until then p50 {:.2} / p99 {:.2} / max {:.1} ms ({} ops); engine I/O to then: {}",
            v["side"].as_str().unwrap_or("?"),
            v["run"],
            p["seconds"].as_f64().unwrap_or(0.0),
            p["app_after_cleanup"]["p50"].as_f64().unwrap_or(0.0),
            p["app_after_cleanup"]["p99"].as_f64().unwrap_or(0.0),
            p["app_after_cleanup"]["max"].as_f64().unwrap_or(0.0),
            p["app_after_cleanup"]["n"],
            io_text(&p["engine_io"]),
        );
    }
    Ok(())
}

/// Where run `run` writes its application trace: `DIR` itself for a single run, `DIR/run<N>`
/// when repeating (created here).
fn trace_dir(args: &Args, run: u32) -> Result<Option<std::path::PathBuf>> {
    let Some(dir) = &args.app_trace else {
        return Ok(None);
    };
    if args.repeat == 1 {
        return Ok(Some(dir.clone()));
    }
    let dir = dir.join(format!("run{run}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Some(dir))
}

/// One side over every run: the range of its cleanup times, its longest transaction, and
/// every run's application latencies together.
struct Pooled {
    side: String,
    runs: usize,
    seconds: (f64, f64),
    longest_tx_ms: f64,
    idle: Vec<f64>,
    during: Vec<f64>,
    app_errors: u64,
}

/// Gathers each side's runs, taking the raw latencies out of `results` (too long to print).
fn pool_runs(results: &mut [serde_json::Value]) -> Vec<Pooled> {
    let mut pooled: Vec<Pooled> = Vec::new();
    for v in results.iter_mut() {
        let side = v["side"].as_str().unwrap_or("?").to_string();
        let at = match pooled.iter().position(|p| p.side == side) {
            Some(i) => i,
            None => {
                pooled.push(Pooled {
                    side,
                    runs: 0,
                    seconds: (f64::MAX, 0.0),
                    longest_tx_ms: 0.0,
                    idle: Vec::new(),
                    during: Vec::new(),
                    app_errors: 0,
                });
                pooled.len() - 1
            }
        };
        let p = &mut pooled[at];
        let secs = v["seconds"].as_f64().unwrap_or(0.0);
        p.runs += 1;
        p.seconds = (p.seconds.0.min(secs), p.seconds.1.max(secs));
        p.longest_tx_ms = p
            .longest_tx_ms
            .max(v["longest_tx_ms"].as_f64().unwrap_or(0.0));
        p.app_errors += v["app_errors"].as_u64().unwrap_or(0);
        if let Some(obj) = v.as_object_mut() {
            p.idle.extend(take_latencies(obj.remove("idle_ms")));
            p.during.extend(take_latencies(obj.remove("during_ms")));
        }
    }
    pooled
}

fn take_latencies(v: Option<serde_json::Value>) -> Vec<f64> {
    match v {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_f64()).collect(),
        _ => Vec::new(),
    }
}

/// Our rows per second over the plain DELETE's, run by run (point 8's first target).
fn print_rate_ratios(results: &[serde_json::Value], repeat: u32) {
    let rate = |run: u32, side: &str| {
        results
            .iter()
            .find(|v| v["run"] == run && v["side"] == side)
            .and_then(|v| v["rows_per_second"].as_f64())
    };
    let ratios: Vec<String> = (1..=repeat)
        .filter_map(|run| Some(format!("{:.2}×", rate(run, "ours")? / rate(run, "plain")?)))
        .collect();
    if !ratios.is_empty() {
        println!();
        println!("ours ÷ plain rows/s, by run: {}", ratios.join(", "));
    }
}

fn print_pooled(pooled: &[Pooled]) {
    println!();
    println!(
        "| side | runs | seconds | longest tx ms | pooled app ops idle / during | app p50 idle/during ms | app p99 idle/during ms | p99 during ÷ idle | app max idle/during ms | app errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // The idle windows of all sides are the same application on the same kind of data, so
    // together they are the steadiest baseline (per side it moved 2x within one batch of runs).
    let all_idle = summary(pooled.iter().flat_map(|p| p.idle.iter().copied()).collect());
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut against_all_idle = Vec::new();
    for p in pooled {
        let (idle, during) = (summary(p.idle.clone()), summary(p.during.clone()));
        against_all_idle.push(format!(
            "{} {:.2}×",
            p.side,
            f(&during, "p99") / f(&all_idle, "p99")
        ));
        println!(
            "| {} | {} | {:.2}–{:.2} | {:.1} | {} / {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× | {:.1} / {:.1} | {} |",
            p.side,
            p.runs,
            p.seconds.0,
            p.seconds.1,
            p.longest_tx_ms,
            idle["n"],
            during["n"],
            f(&idle, "p50"),
            f(&during, "p50"),
            f(&idle, "p99"),
            f(&during, "p99"),
            f(&during, "p99") / f(&idle, "p99"),
            f(&idle, "max"),
            f(&during, "max"),
            p.app_errors,
        );
    }
    println!();
    println!(
        "idle, every side's runs together: {} ops, p99 {:.2} ms; p99 during ÷ that: {}",
        all_idle["n"],
        f(&all_idle, "p99"),
        against_all_idle.join(", ")
    );
}

/// `name value, …` of a side's engine I/O, or `—` where the engine has no counters.
fn io_text(io: &serde_json::Value) -> String {
    match io.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "—".to_string(),
    }
}

/// Time the application loop runs before its idle window starts: its first operations wait
/// for new connections, which no later operation does.
const APP_WARM_UP: Duration = Duration::from_secs(1);

/// The application's load: at a fixed rate, read one live session and touch its activity.
/// Each operation is its own task, timed from its scheduled start, so a stalled database shows
/// up as latency instead of silently lowering the rate.
struct AppLoop {
    stop: CancellationToken,
    done: tokio::sync::oneshot::Receiver<Result<AppLatencies>>,
}

/// Every operation's scheduled start and latency (ms), and the count of failed operations.
type AppLatencies = (Vec<(Instant, f64)>, u64);

/// Worker threads of the application's own runtime (`--app-runtime own`): a small web
/// application's.
const APP_RUNTIME_THREADS: usize = 2;

/// Starts the application loop with its own pool of `url`. With `own_runtime` it runs on a
/// runtime and threads of its own, as an application is a process of its own: it then meets
/// the cleanup only in the database and in the machine's CPU scheduler. Otherwise it shares
/// this process's runtime workers with the cleanup, and each of its operations also waits for
/// a worker the cleanup's own client work may hold.
fn start_app(url: String, live: Vec<i64>, rate: u32, own_runtime: bool) -> Result<AppLoop> {
    let stop = CancellationToken::new();
    let (tx, done) = tokio::sync::oneshot::channel();
    let work = run_app(url, live, rate, stop.clone());
    if own_runtime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(APP_RUNTIME_THREADS)
            .thread_name("app")
            .enable_all()
            .build()
            .context("building the application's runtime")?;
        std::thread::Builder::new()
            .name("app-main".into())
            .spawn(move || {
                let _ = tx.send(runtime.block_on(work));
            })
            .context("starting the application's thread")?;
    } else {
        tokio::spawn(async move {
            let _ = tx.send(work.await);
        });
    }
    Ok(AppLoop { stop, done })
}

impl AppLoop {
    /// Stops scheduling operations and returns every finished one's latency.
    async fn finish(self) -> Result<AppLatencies> {
        self.stop.cancel();
        self.done
            .await
            .context("the application loop ended early")?
    }
}

async fn run_app(
    url: String,
    live: Vec<i64>,
    rate: u32,
    stop: CancellationToken,
) -> Result<AppLatencies> {
    let db = Db::connect(
        &url,
        &ConnectOptions {
            max_connections: 8,
            ..Default::default()
        },
    )
    .await?;
    if db.engine() == Engine::Postgres {
        let setting: String = sessionfleet::on_pool!(db, p => {
            sqlx::query_scalar("SHOW synchronous_commit").fetch_one(p).await?
        });
        eprintln!("application: synchronous_commit = {setting}");
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Result<f64, String>)>();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !stop.is_cancelled() {
        let at = tick.tick().await.into_std();
        let id = live[rand::rng().random_range(0..live.len())];
        let (db, tx) = (db.clone(), tx.clone());
        tokio::spawn(async move {
            let r = app_op(&db, id)
                .await
                .map(|_| at.elapsed().as_secs_f64() * 1000.0)
                .map_err(|e| e.to_string());
            let _ = tx.send((at, r));
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some((at, r)) = rx.recv().await {
        match r {
            Ok(ms) => lat.push((at, ms)),
            Err(e) => {
                if errors < 3 {
                    eprintln!("app error: {e}");
                }
                errors += 1
            }
        }
    }
    db.close().await;
    Ok((lat, errors))
}

async fn app_op(db: &Db, id: i64) -> Result<(), sqlx::Error> {
    let now = Utc::now().naive_utc();
    let read = db.sql("SELECT session_id, user_id, expires_at FROM user_sessions WHERE id = ?");
    let write = db.sql("UPDATE user_sessions SET last_activity = ?, updated_at = ? WHERE id = ?");
    sessionfleet::on_pool!(db, p => {
        sqlx::query(read).bind(id).fetch_optional(p).await?;
        sqlx::query(write).bind(now).bind(now).bind(id).execute(p).await?;
    });
    Ok(())
}

/// The server's own I/O counters, to read as differences across one side's cleanup: what the
/// rows cost the engine, not just how long they took. PostgreSQL: WAL bytes written (its
/// per-database block counters are flushed lazily, the WAL position is exact). MariaDB:
/// InnoDB pages read from disk, pages flushed to it, and row lock waits and the time spent in
/// them (server-wide, so they include the application loop, the same on both sides). SQLite
/// has no such counters; its WAL file's growth is reported instead: it grows while
/// checkpoints cannot start the WAL over, and does not shrink by itself.
async fn engine_io(db: &Db) -> Result<Vec<(&'static str, f64)>> {
    Ok(match db.engine() {
        Engine::Postgres => {
            let wal = db
                .scalar_i64("SELECT CAST(pg_current_wal_lsn() - '0/0' AS BIGINT)")
                .await?;
            vec![("wal_mib", wal as f64 / 1_048_576.0)]
        }
        Engine::MySql => {
            let names = [
                ("pages_read", "Innodb_buffer_pool_reads"),
                ("pages_flushed", "Innodb_buffer_pool_pages_flushed"),
                ("row_lock_waits", "Innodb_row_lock_waits"),
                ("row_lock_wait_ms", "Innodb_row_lock_time"),
            ];
            let values = global_status(db, &names.map(|(_, var)| var)).await?;
            names
                .iter()
                .zip(values)
                .map(|((key, _), v)| (*key, v.unwrap_or(0.0)))
                .collect()
        }
        Engine::Sqlite => {
            let file: String = sessionfleet::on_pool!(db, p => sqlx::query_scalar(
                "SELECT file FROM pragma_database_list WHERE name = 'main'").fetch_one(p).await?);
            let wal = std::fs::metadata(format!("{file}-wal")).map_or(0, |m| m.len());
            vec![("wal_file_mib", wal as f64 / 1_048_576.0)]
        }
    })
}

/// How often [`RedoSampler`] reads InnoDB's checkpoint age.
const REDO_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Share of its limit from which InnoDB's checkpoint age makes the page cleaner flush hard
/// (its "async" flush point, 7/8); at the limit itself writes wait for a checkpoint.
const REDO_HARD_FLUSH_SHARE: f64 = 0.875;

/// On MariaDB, InnoDB's checkpoint age as a share of its limit (`Innodb_checkpoint_age` ÷
/// `Innodb_checkpoint_max_age`), sampled through one side's window: whether InnoDB spent it
/// flushing at its redo log's limit, which stalls single batches and COMMITs whatever the
/// cleanup does (bench/results/cleanup.md, 2026-12-03 22:13–22:46).
struct RedoSampler {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Vec<f64>>,
}

impl RedoSampler {
    /// Starts sampling on MariaDB; `None` elsewhere, or when the server does not report it.
    async fn start(db: &Db) -> Option<RedoSampler> {
        redo_log_share(db).await?;
        let (db, stop) = (db.clone(), CancellationToken::new());
        let until = stop.clone();
        let handle = tokio::spawn(async move {
            let mut shares = Vec::new();
            while !until.is_cancelled() {
                shares.extend(redo_log_share(&db).await);
                tokio::select! {
                    () = tokio::time::sleep(REDO_SAMPLE_EVERY) => {}
                    () = until.cancelled() => {}
                }
            }
            shares
        });
        Some(RedoSampler { stop, handle })
    }

    /// Stops sampling and adds to `io` the highest share seen and the share of samples at or
    /// over [`REDO_HARD_FLUSH_SHARE`], both in percent.
    async fn finish(self, io: &mut serde_json::Value) -> Result<()> {
        self.stop.cancel();
        let shares = self.handle.await?;
        if let (Some(io), false) = (io.as_object_mut(), shares.is_empty()) {
            let max = shares.iter().copied().fold(0.0, f64::max);
            let hard = shares
                .iter()
                .filter(|s| **s >= REDO_HARD_FLUSH_SHARE)
                .count();
            io.insert("redo_full_max_pct".into(), json!((max * 100.0).round()));
            io.insert(
                "redo_over_7_8_pct_of_time".into(),
                json!((hard as f64 * 100.0 / shares.len() as f64).round()),
            );
        }
        Ok(())
    }
}

/// InnoDB's checkpoint age as a share of its limit; `None` when it cannot be read (or off
/// MySQL/MariaDB).
async fn redo_log_share(db: &Db) -> Option<f64> {
    if db.engine() != Engine::MySql {
        return None;
    }
    let names = ["Innodb_checkpoint_age", "Innodb_checkpoint_max_age"];
    match global_status(db, &names).await.ok()?[..] {
        [Some(age), Some(max)] if max > 0.0 => Some(age / max),
        _ => None,
    }
}

/// MySQL/MariaDB global status variables by name, in the order asked; `None` for one the
/// server does not report. One `SHOW GLOBAL STATUS` for all of them.
async fn global_status(db: &Db, names: &[&str]) -> Result<Vec<Option<f64>>, sqlx::Error> {
    let list = names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SHOW GLOBAL STATUS WHERE Variable_name IN ({list})");
    let rows: Vec<(String, String)> = sessionfleet::on_pool!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?);
    Ok(names
        .iter()
        .map(|name| {
            rows.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.parse::<f64>().ok())
        })
        .collect())
}

/// `after - before` per counter, as JSON.
fn io_delta(before: &[(&str, f64)], after: &[(&str, f64)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (name.to_string(), json!((a - b).round())))
        .collect();
    serde_json::Value::Object(map)
}

/// Writes the seed left behind in memory to disk before the side starts, so neither side's
/// cleanup shares the disk with write-back of the seed (a million rows and their indexes): a
/// PostgreSQL `CHECKPOINT`, InnoDB's dirty pages flushed (its dirty-page limit at 0 until
/// they are, then restored), SQLite's WAL checkpointed into the database file.
async fn settle_writes(db: &Db) -> Result<()> {
    match db.engine() {
        Engine::Postgres => {
            db.execute("CHECKPOINT").await?;
        }
        Engine::MySql => {
            // A fraction (90.000000 by default): kept as text to be restored exactly.
            let before: String = sessionfleet::on_pool!(db, p => sqlx::query_scalar(
                "SELECT CAST(@@GLOBAL.innodb_max_dirty_pages_pct AS CHAR)").fetch_one(p).await?);
            db.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
                .await?;
            let flushed = wait_for_no_dirty_pages(db, Duration::from_secs(600)).await;
            // Restored whatever happened: it is a server-wide setting.
            db.execute(&format!("SET GLOBAL innodb_max_dirty_pages_pct = {before}"))
                .await?;
            if !flushed? {
                eprintln!("warning: InnoDB still had dirty pages after 600 s; starting anyway");
            }
        }
        Engine::Sqlite => {
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
        }
    }
    Ok(())
}

/// Polls InnoDB's dirty-page count until it is zero (true) or `limit` has passed (false).
async fn wait_for_no_dirty_pages(db: &Db, limit: Duration) -> Result<bool> {
    let dirty = "SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY'";
    let deadline = Instant::now() + limit;
    while db.scalar_i64(dirty).await? > 0 {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(true)
}

/// Longest wait for InnoDB's purge after a side's cleanup (`--until-purged`).
const PURGE_WAIT_LIMIT: Duration = Duration::from_secs(900);
/// InnoDB's count of deleted rows its purge has removed: the history list length would not
/// do, it counts transactions, and the plain side's is one.
const PURGED_ROWS_METRIC: &str = "purge_del_mark_records";

/// Starts counting InnoDB's purged deleted rows: turns its monitor on if it is off, then
/// reads the count to measure from (read after, so turning it on cannot move the baseline).
/// Returns that count and whether this side turned the monitor on (to turn it off again with
/// [`stop_counting_purged_rows`]); `None` on other engines.
async fn start_counting_purged_rows(db: &Db) -> Result<Option<(i64, bool)>> {
    if db.engine() != Engine::MySql {
        return Ok(None);
    }
    let enabled = db
        .scalar_i64(&format!(
            "SELECT CAST(ENABLED AS SIGNED) FROM information_schema.INNODB_METRICS \
             WHERE NAME = '{PURGED_ROWS_METRIC}'"
        ))
        .await?;
    let turned_on = enabled == 0;
    if turned_on {
        db.execute(&format!(
            "SET GLOBAL innodb_monitor_enable = '{PURGED_ROWS_METRIC}'"
        ))
        .await?;
    }
    Ok(Some((purged_rows(db).await?, turned_on)))
}

/// InnoDB's count of purged deleted rows (its monitor must be on).
async fn purged_rows(db: &Db) -> Result<i64> {
    let sql = format!(
        "SELECT CAST(`COUNT` AS SIGNED) FROM information_schema.INNODB_METRICS \
         WHERE NAME = '{PURGED_ROWS_METRIC}'"
    );
    Ok(db.scalar_i64(&sql).await?)
}

/// Turns the purged-rows monitor off again when this side turned it on.
async fn stop_counting_purged_rows(db: &Db, turned_on: bool) -> Result<()> {
    if turned_on {
        db.execute(&format!(
            "SET GLOBAL innodb_monitor_disable = '{PURGED_ROWS_METRIC}'"
        ))
        .await?;
    }
    Ok(())
}

/// Waits until InnoDB has purged `deleted` rows more than `before` (or [`PURGE_WAIT_LIMIT`]
/// has passed, with a warning) and returns when.
async fn wait_for_purge(db: &Db, before: i64, deleted: u64) -> Result<Instant> {
    let started = Instant::now();
    loop {
        let purged = purged_rows(db).await? - before;
        if purged >= deleted as i64 {
            return Ok(Instant::now());
        }
        if started.elapsed() >= PURGE_WAIT_LIMIT {
            eprintln!("warning: InnoDB purged {purged} of {deleted} deleted rows; stopped waiting");
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One line per application operation: scheduled start relative to the cleanup's start (ms,
/// negative while idle) and latency (ms), to line up with the cleanup's debug log.
fn write_app_trace(path: &std::path::Path, lat: &[(Instant, f64)], start: Instant) -> Result<()> {
    let mut out = String::from("start_ms,latency_ms\n");
    for (at, ms) in lat {
        let offset = if *at >= start {
            (*at - start).as_secs_f64()
        } else {
            -(start - *at).as_secs_f64()
        };
        out.push_str(&format!("{:.1},{ms:.2}\n", offset * 1000.0));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The machine's CPU time so far from `/proc/stat`, in clock ticks: (busy, all). Busy is all
/// but idle and I/O wait.
fn machine_cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let all: u64 = ticks.iter().sum();
    let waiting = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((all - waiting, all))
}

/// Cores the whole machine kept busy on average since `before` (database server, this
/// process and anything else): what the side cost in CPU, against the machine's cores.
fn busy_cores_since(before: (u64, u64)) -> Result<f64> {
    let after = machine_cpu_ticks()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (busy, all) = (after.0 - before.0, after.1 - before.1);
    Ok(if all == 0 {
        0.0
    } else {
        busy as f64 / all as f64 * cores
    })
}

/// This process's CPU time so far (user and system, every thread), in clock ticks, from
/// `/proc/self/stat`.
fn process_cpu_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // The command name in parentheses may hold spaces: count fields after its closing one.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/self/stat has no command name")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("/proc/self/stat: no CPU times")
    };
    Ok(tick(11)? + tick(12)?)
}

/// Clock ticks per second of `/proc`'s CPU times (`USER_HZ`): 100 on Linux.
const USER_HZ: f64 = 100.0;

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    json!({"n": v.len(), "p50": q(0.5), "p99": q(0.99), "max": v[v.len() - 1]})
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn child(args: &Args, side: &str) -> Result<()> {
    let url = args.url.clone().context("--url")?;
    let as_of: NaiveDateTime = NaiveDateTime::parse_from_str(
        args.as_of.as_deref().context("--as-of")?,
        "%Y-%m-%dT%H:%M:%S",
    )?;
    let db = Db::connect(&url, &ConnectOptions::default()).await?;
    let live: Vec<i64> = {
        let sql = db.sql(match db.engine() {
            Engine::Postgres => "SELECT CAST(id AS BIGINT) FROM user_sessions WHERE expires_at > ? AND is_active = TRUE LIMIT 5000",
            Engine::MySql => "SELECT CAST(id AS SIGNED) FROM user_sessions WHERE expires_at > ? AND is_active = TRUE LIMIT 5000",
            Engine::Sqlite => "SELECT id FROM user_sessions WHERE expires_at > ? AND is_active = TRUE LIMIT 5000",
        });
        sessionfleet::on_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).bind(as_of).fetch_all(p).await?)
    };
    let total_before = db.scalar_i64("SELECT COUNT(*) FROM user_sessions").await?;
    let app_url = if args.app_sync_commit || db.engine() != Engine::Postgres {
        url.clone()
    } else {
        let mut u = url::Url::parse(&url)?;
        u.query_pairs_mut()
            .append_pair("options", "-c synchronous_commit=off");
        u.to_string()
    };
    let app = start_app(app_url, live, args.app_rate, args.app_runtime == "own")?;
    // The first operations open the application's connections (~100 ms each on PostgreSQL
    // here): they would set the idle window's p99, so they are left out of both windows.
    tokio::time::sleep(APP_WARM_UP).await;
    let idle_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let io_before = engine_io(&db).await?;
    let purged_before = if args.until_purged {
        start_counting_purged_rows(&db).await?
    } else {
        None
    };
    let redo = RedoSampler::start(&db).await;
    let cpu_before = machine_cpu_ticks()?;
    let own_cpu_before = process_cpu_ticks()?;
    let cleanup_start = Instant::now();
    // The wall clock of the start, to line the app trace up with the debug log's timestamps.
    eprintln!(
        "{side}: cleanup started at {}",
        Utc::now().format("%H:%M:%S%.6f")
    );
    let (deleted, longest_ms, batches) = match side {
        "ours" => {
            let fence = fence::issue_token(&db, "target:bench", "bench").await?;
            let ctx = OpContext {
                db: db.clone(),
                fence: Some(fence),
                cancel: CancellationToken::new(),
                progress: Default::default(),
            };
            let params = CleanupParams {
                as_of: Some(as_of),
                target_batch_ms: args.target_batch_ms,
                rest_ratio: args.rest_ratio,
                parallel_reads: args.parallel_reads,
                ..Default::default()
            };
            let r = cleanup::run(&ctx, &params).await?;
            eprintln!("{}", r.render_text());
            (r.total_cleaned(), r.longest_batch_ms, r.batches)
        }
        "plain" => {
            // The same rows as our rules, in one statement.
            let sql = db.sql(
                "DELETE FROM user_sessions WHERE expires_at < ? OR (is_active = FALSE AND last_activity < ?) \
                 OR NOT EXISTS (SELECT 1 FROM users u WHERE u.id = user_sessions.user_id) \
                 OR EXISTS (SELECT 1 FROM users u WHERE u.id = user_sessions.user_id AND u.is_active = FALSE)",
            );
            let cutoff = as_of - chrono::Duration::seconds(cleanup::DEFAULT_MAX_AGE_SECS as i64);
            let t = Instant::now();
            let n = sessionfleet::on_pool!(db, p => sqlx::query(sql).bind(as_of).bind(cutoff).execute(p).await?.rows_affected());
            (n, t.elapsed().as_secs_f64() * 1000.0, 1)
        }
        "none" => {
            tokio::time::sleep(Duration::from_secs(args.control_secs)).await;
            (0, 0.0, 0)
        }
        "cpu" => {
            let until = Instant::now() + Duration::from_secs(args.control_secs);
            // Blocking-pool threads, as a busy database backend is a process of its own: not
            // runtime workers, which would also hold the application's tasks back directly.
            let spinners: Vec<_> = (0..args.control_threads)
                .map(|_| {
                    tokio::task::spawn_blocking(move || {
                        while Instant::now() < until {
                            std::hint::black_box((0..1_000u64).sum::<u64>());
                        }
                    })
                })
                .collect();
            for spinner in spinners {
                spinner.await?;
            }
            (0, 0.0, 0)
        }
        other => bail!("unknown side {other}"),
    };
    let cleanup_end = Instant::now();
    let busy_cores = busy_cores_since(cpu_before)?;
    // This process alone: the cleanup's client work (or the plain side's wait) plus the
    // application loop's, the latter the same on every side.
    let own_cores = (process_cpu_ticks()? - own_cpu_before) as f64
        / USER_HZ
        / (cleanup_end - cleanup_start)
            .as_secs_f64()
            .max(f64::EPSILON);
    let mut io = io_delta(&io_before, &engine_io(&db).await?);
    if let Some(redo) = redo {
        redo.finish(&mut io).await?;
    }
    let seconds = (cleanup_end - cleanup_start).as_secs_f64();
    let purge_end = match purged_before {
        Some((before, turned_on)) => {
            let end = wait_for_purge(&db, before, deleted).await;
            stop_counting_purged_rows(&db, turned_on).await?;
            Some(end?)
        }
        None => None,
    };
    // Let in-flight operations scheduled during the cleanup finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lat, app_errors) = app.finish().await?;
    let idle: Vec<f64> = lat
        .iter()
        .filter(|(at, _)| *at >= idle_start && *at < cleanup_start)
        .map(|(_, ms)| *ms)
        .collect();
    let during: Vec<f64> = lat
        .iter()
        .filter(|(at, _)| *at >= cleanup_start && *at < cleanup_end)
        .map(|(_, ms)| *ms)
        .collect();
    let purge_tail: Option<Vec<f64>> = purge_end.map(|end| {
        lat.iter()
            .filter(|(at, _)| *at >= cleanup_end && *at < end)
            .map(|(_, ms)| *ms)
            .collect()
    });
    let purge = match purge_end {
        Some(end) => json!({
            "seconds": (end - cleanup_start).as_secs_f64(),
            "engine_io": io_delta(&io_before, &engine_io(&db).await?),
            "app_after_cleanup": summary(purge_tail.unwrap_or_default()),
        }),
        None => serde_json::Value::Null,
    };
    if let Some(dir) = &args.app_trace {
        write_app_trace(&dir.join(format!("{side}-app.csv")), &lat, cleanup_start)?;
    }
    let out = json!({
        "side": side,
        "engine": db.engine().name(),
        "sessions_before": total_before,
        "deleted": deleted,
        "seconds": seconds,
        "rows_per_second": deleted as f64 / seconds,
        "longest_tx_ms": longest_ms,
        "batches": batches,
        "peak_rss_mib": peak_rss_mib(),
        "idle": summary(idle.clone()),
        "during": summary(during.clone()),
        "idle_ms": idle,
        "during_ms": during,
        "app_errors": app_errors,
        "engine_io": io,
        "machine_busy_cores": busy_cores,
        "process_busy_cores": own_cores,
        "until_purged": purge,
    });
    println!("{out}");
    Ok(())
}
