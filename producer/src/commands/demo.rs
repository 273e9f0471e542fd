//! `sessionfleet demo`: the quick start. Seeds a demo SQLite database, starts a real worker
//! process, runs full maintenance through Redis and prints the summary — the main job,
//! end to end, on the embedded default.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sessionfleet::config::{Overrides, Settings};
use sessionfleet::jobs::QueueClass;
use sessionfleet::queue::Queue;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, SchemaVersion};

use crate::cli::{DemoArgs, GlobalArgs};
use crate::exit::{CliError, Exit};
use crate::output::Output;
use crate::run::{self, Invocation};

/// How long the demo waits for its worker to register.
const WORKER_START: Duration = Duration::from_secs(60);

/// Runs the demo.
pub async fn run(
    base: &Settings,
    g: &GlobalArgs,
    args: &DemoArgs,
    out: Output,
) -> anyhow::Result<Exit> {
    let file = std::env::current_dir()?.join(&args.file);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    let url = format!("sqlite://{}", file.display());
    let namespace = format!("demo-{}", std::process::id());
    let mut flags = Overrides::default();
    flags.set("DATABASE_URL", Some(&url));
    flags.set("SESSIONFLEET_NAMESPACE", Some(&namespace));
    flags.set("REDIS_URL", Some(&base.redis_url.value));
    let settings = Settings::load(&flags, g.config.as_deref())?;

    out.info(format!(
        "1/4 seeding {} demo sessions into {}",
        args.sessions,
        file.display()
    ));
    let db = Db::connect(&url, &ConnectOptions::creating_sqlite_file()).await?;
    let seeded = seed_demo(
        &db,
        &SeedParams {
            reset: true,
            ..SeedParams::new(
                args.sessions,
                1,
                SchemaVersion::V2,
                chrono::Utc::now().naive_utc(),
            )
        },
    )
    .await?;
    db.close().await;
    out.info(format!(
        "    {} sessions ({} expired, {} of deactivated users, {} of deleted users) in {:.1}s",
        seeded.sessions,
        seeded.expired,
        seeded.deactivated_user,
        seeded.missing_user,
        seeded.duration_seconds
    ));

    let queue = Queue::connect_with_patience(&settings, run::REDIS_PATIENCE)
        .await
        .map_err(|e| CliError::fail(Exit::FleetUnreachable, format!("{e} (the demo runs the fleet: start Redis, e.g. `redis-server --daemonize yes`)")))?;
    out.info("2/4 starting a worker");
    let mut worker = WorkerProcess::start(&settings, &url, &out)?;
    let started = Instant::now();
    loop {
        if queue
            .live_workers(Some(QueueClass::Maintenance))
            .await?
            .iter()
            .any(|w| !w.stopping)
        {
            break;
        }
        if let Some(status) = worker.child.try_wait()? {
            return Err(CliError::fail(
                Exit::FleetUnreachable,
                format!("the worker exited at start ({status}); see its log above"),
            ));
        }
        if started.elapsed() > WORKER_START {
            return Err(CliError::fail(
                Exit::FleetUnreachable,
                "the worker did not register within 60 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out.info(format!(
        "    worker pid {} is consuming the queues (namespace {namespace})",
        worker.child.id()
    ));

    out.info("3/4 enqueueing full maintenance and waiting for the worker");
    // The demo's own worker was started on this URL: the job runs where the flag says.
    let global = GlobalArgs {
        database_url: None,
        target: None,
        all_targets: false,
        no_wait: false,
        local: false,
        ..g.clone()
    };
    let inv = Invocation {
        settings: &settings,
        global: &global,
        out,
    };
    let runs = run::run(&inv, |t| crate::plan::full(&settings, t, false)).await;
    out.info("4/4 stopping the worker");
    worker.stop();
    // The demo's namespace is its own: leave nothing of it on the user's Redis (lease
    // counters and worker records never expire). The run's results were read already.
    match queue.forget_namespace().await {
        Ok(n) => out.info(format!(
            "    removed the {n} Redis keys of namespace {namespace}"
        )),
        Err(e) => out.info(format!(
            "    the Redis keys of namespace {namespace} stay: {e}"
        )),
    }
    let runs = runs?.unwrap_or_default();
    let exit = crate::render::finished(&runs, &out);
    if !out.json {
        if let Some(c) = runs.first().and_then(|r| r.report.get("cleanup")) {
            println!(
                "\nCleanup detail: {} expired and {} orphaned sessions deleted in {} batches (longest {} ms); {} sessions with a missing platform reported, not deleted.",
                c["expired_sessions_cleaned"],
                c["orphaned_sessions_cleaned"],
                c["batches"],
                c["longest_batch_ms"],
                c["missing_platform_sessions"]
            );
        }
        println!("Demo database: {}", file.display());
    }
    // A critical health report is what a neglected table looks like; the demo itself worked.
    Ok(if exit == Exit::HealthCritical {
        Exit::Success
    } else {
        exit
    })
}

struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    fn start(settings: &Settings, url: &str, out: &Output) -> anyhow::Result<WorkerProcess> {
        let bin = worker_binary(out)?;
        let child = Command::new(&bin)
            .env("DATABASE_URL", url)
            .env("REDIS_URL", &settings.redis_url.value)
            .env("SESSIONFLEET_NAMESPACE", &settings.namespace.value)
            .env("SESSIONFLEET_METRICS_ADDR", "off")
            // Warnings and errors only: the demo prints the outcome itself.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("SESSIONFLEET_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(WorkerProcess { child })
    }

    /// SIGTERM, then wait for the graceful exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
    }
}

/// `sessionfleet-worker` beside this binary. Under `cargo run` it is built (or brought up to
/// date: a no-op when it is) first, so the demo never runs a worker older than the CLI's own
/// source; installed, the one beside it is used.
fn worker_binary(out: &Output) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let bin = dir.join("sessionfleet-worker");
    // `cargo run` of this package names it; CARGO alone could be another project's cargo
    // (an installed binary started from its tests or scripts).
    let under_our_cargo_run =
        std::env::var("CARGO_PKG_NAME").is_ok_and(|name| name == env!("CARGO_PKG_NAME"));
    let cargo = std::env::var("CARGO").ok().filter(|_| under_our_cargo_run);
    let Some(cargo) = cargo else {
        if bin.exists() {
            return Ok(bin);
        }
        return Err(CliError::fail(
            Exit::OperationFailed,
            format!(
                "{} not found: install both binaries side by side (cargo build --workspace)",
                bin.display()
            ),
        ));
    };
    out.info("    building sessionfleet-worker (if it is not up to date)…");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "sessionfleet-worker"]);
    // The workspace of the running CLI, wherever `cargo run --manifest-path …` was typed.
    if let Ok(package) = std::env::var("CARGO_MANIFEST_DIR") {
        cmd.arg("--manifest-path")
            .arg(Path::new(&package).join("Cargo.toml"));
    }
    // `cargo run` gives this process its package's CARGO_* variables; passed on, they would
    // make the nested build see another environment and rebuild dependencies.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            cmd.env_remove(&key);
        }
    }
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() || !bin.exists() {
        if bin.exists() {
            out.info("    could not bring sessionfleet-worker up to date; using the one there");
            return Ok(bin);
        }
        return Err(CliError::fail(
            Exit::OperationFailed,
            "could not build sessionfleet-worker",
        ));
    }
    Ok(bin)
}
