//! `sessionfleet-worker`: the fleet member. Claims jobs from the configured queues and runs
//! them; all behaviour lives in the `sessionfleet` library, this binary wires it together.
//!
//! Exit codes: 0 clean stop; 1 runtime failure (Redis unreachable at start, shutdown timeout
//! exceeded, bind failure); 2 configuration refused; 130 a second signal during shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sessionfleet::config::{Overrides, Settings};
use sessionfleet::jobs::QueueClass;

/// Each delivery allocates and frees many small, short-lived buffers across threads (Redis
/// replies, envelopes, results, spans); glibc's allocator spent 28% of the worker's CPU
/// on them under a no-op job load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod fleet;
mod http;
mod signals;
mod wake;

/// Claims sessionfleet jobs from Redis and runs them.
#[derive(Parser)]
#[command(name = "sessionfleet-worker", version, about)]
struct Args {
    /// TOML configuration file (also SESSIONFLEET_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Queues to consume, comma-separated.
    #[arg(
        long,
        env = "SESSIONFLEET_QUEUES",
        default_value = "cleanup,analytics,maintenance,diag"
    )]
    queues: String,
    /// Jobs run at once per queue (SESSIONFLEET_WORKER_CONCURRENCY).
    #[arg(long)]
    concurrency: Option<u32>,
    /// How often an idle worker looks for jobs, ms (SESSIONFLEET_POLL_INTERVAL_MS).
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Address of /metrics, /healthz, /readyz, or 'off' (SESSIONFLEET_METRICS_ADDR).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Seconds a stopping worker waits for running jobs (SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS).
    #[arg(long)]
    shutdown_timeout_secs: Option<u64>,
    /// Log format: text or json (SESSIONFLEET_LOG_FORMAT).
    #[arg(long)]
    log_format: Option<String>,
    /// Redis URL (REDIS_URL).
    #[arg(long)]
    redis_url: Option<String>,
    /// Redis key namespace (SESSIONFLEET_NAMESPACE).
    #[arg(long)]
    namespace: Option<String>,
    /// More detailed logs.
    #[arg(long, short)]
    verbose: bool,
}

/// By hand: `--redis-url` may carry a password.
impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Args {
            config,
            queues,
            concurrency,
            poll_interval_ms,
            metrics_addr,
            shutdown_timeout_secs,
            log_format,
            redis_url,
            namespace,
            verbose,
        } = self;
        f.debug_struct("Args")
            .field("config", config)
            .field("queues", queues)
            .field("concurrency", concurrency)
            .field("poll_interval_ms", poll_interval_ms)
            .field("metrics_addr", metrics_addr)
            .field("shutdown_timeout_secs", shutdown_timeout_secs)
            .field("log_format", log_format)
            .field(
                "redis_url",
                &redis_url.as_deref().map(sessionfleet::secret::redact_url),
            )
            .field("namespace", namespace)
            .field("verbose", verbose)
            .finish()
    }
}

impl Args {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set("SESSIONFLEET_WORKER_CONCURRENCY", self.concurrency);
        o.set("SESSIONFLEET_POLL_INTERVAL_MS", self.poll_interval_ms);
        o.set("SESSIONFLEET_METRICS_ADDR", self.metrics_addr.clone());
        o.set(
            "SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS",
            self.shutdown_timeout_secs,
        );
        o.set("SESSIONFLEET_LOG_FORMAT", self.log_format.clone());
        o.set("REDIS_URL", self.redis_url.clone());
        o.set("SESSIONFLEET_NAMESPACE", self.namespace.clone());
        o
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(&args.overrides(), args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sessionfleet-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let queues = match QueueClass::parse_list(&args.queues) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("sessionfleet-worker: --queues: {e}");
            return ExitCode::from(2);
        }
    };
    sessionfleet::telemetry::init(settings.log_format.value, args.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessionfleet-worker: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(fleet::run(settings, queues)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sessionfleet-worker: {e:#}");
            ExitCode::from(1)
        }
    };
    // The fleet has shut down gracefully by now; what is left are background tasks. A plain
    // drop waits for every one, and one that never yields (sqlx's pool reaper once spun so,
    // sqlx#3645) would keep a stopped worker's process alive forever.
    runtime.shutdown_timeout(RUNTIME_EXIT_GRACE);
    code
}

/// How long leftover background tasks get once the fleet has stopped.
const RUNTIME_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Threads of the async runtime: one core fewer than the machine has, at least one. The queue
/// workers are polled on the main thread (`block_on`) and the jobs run on the runtime's
/// threads; a runtime thread per core on top made every Redis reply a cross-thread wake-up.
/// On the two-core machine of the benchmark, one runtime thread instead of two processed
/// no-op jobs 13% faster (7 of 8 alternating pairs; bench/results/fleet.md).
fn runtime_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_redis_password() {
        let args = Args::parse_from([
            "sessionfleet-worker",
            "--redis-url",
            "redis://fleet:hunter2@redis.internal:6379/0",
            "--namespace",
            "prod",
        ]);
        let shown = format!("{args:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://fleet:***@redis.internal:6379/0"),
            "{shown}"
        );
        assert!(shown.contains("prod"), "{shown}");
    }
}
