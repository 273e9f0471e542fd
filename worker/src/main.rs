//! `sessionfleet-worker`: the fleet member. Claims jobs from the configured queues and runs
//! them; all behaviour lives in the `sessionfleet` library, this binary wires it together.
//!
//! Exit codes: see [`AFTER_HELP`] (`--help` shows them).

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

/// What `--help` shows after the flags: where settings come from, exit codes, examples.
const AFTER_HELP: &str = "\
A flag overrides its environment variable, which overrides the key of the configuration file
(--config), which overrides the default shown.

Exit codes:
  0    stopped cleanly after SIGTERM or SIGINT (also --help, --version)
  1    runtime failure: Redis unreachable for 30 s at start, the metrics address cannot be
       bound, the queue workers failed, or running jobs outlived the shutdown timeout
       (other workers take them over)
  2    configuration refused (a flag, variable or configuration file value)
  130  a second SIGTERM or SIGINT during shutdown: exited at once

Examples:
  sessionfleet-worker --config /etc/sessionfleet/sessionfleet.toml
  REDIS_URL=redis://redis.internal:6379 sessionfleet-worker --queues cleanup,maintenance";

/// Claims sessionfleet jobs from Redis and runs them.
#[derive(Parser)]
#[command(name = "sessionfleet-worker", version, about, after_help = AFTER_HELP)]
struct Args {
    /// TOML configuration file [env: SESSIONFLEET_CONFIG] [default: none]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Queues to consume, comma-separated (not read from the configuration file)
    #[arg(
        long,
        env = "SESSIONFLEET_QUEUES",
        default_value = "cleanup,analytics,maintenance,diag"
    )]
    queues: String,
    /// Jobs run at once per queue [env: SESSIONFLEET_WORKER_CONCURRENCY] [file: worker_concurrency] [default: 4]
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// How often an idle worker looks for jobs, in milliseconds [env: SESSIONFLEET_POLL_INTERVAL_MS] [file: poll_interval_ms] [default: 200]
    #[arg(long, value_name = "MS")]
    poll_interval_ms: Option<u64>,
    /// Address of /metrics, /healthz and /readyz, or 'off' [env: SESSIONFLEET_METRICS_ADDR] [file: metrics_addr] [default: 127.0.0.1:9464]
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Seconds a stopping worker waits for running jobs [env: SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS] [file: shutdown_timeout_secs] [default: 30]
    #[arg(long, value_name = "SECS")]
    shutdown_timeout_secs: Option<u64>,
    /// Log format, text or json [env: SESSIONFLEET_LOG_FORMAT] [file: log_format] [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Redis holding the queues, leases and results [env: REDIS_URL] [file: redis_url] [default: redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key [env: SESSIONFLEET_NAMESPACE] [file: namespace] [default: sessionfleet]
    #[arg(long, value_name = "NAME")]
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
    use clap::CommandFactory;
    use sessionfleet::config::KEYS;

    /// Each setting flag's help states the variable, file key and default that the settings
    /// really use (`config::KEYS`), and `--help` ends with the exit codes.
    #[test]
    fn help_shows_the_real_defaults_and_the_exit_codes() {
        let help = Args::command()
            .term_width(10_000)
            .render_long_help()
            .to_string();
        let blocks: Vec<&str> = help.split("\n\n").collect();
        for (flag, env) in [
            ("--concurrency", "SESSIONFLEET_WORKER_CONCURRENCY"),
            ("--poll-interval-ms", "SESSIONFLEET_POLL_INTERVAL_MS"),
            ("--metrics-addr", "SESSIONFLEET_METRICS_ADDR"),
            (
                "--shutdown-timeout-secs",
                "SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS",
            ),
            ("--log-format", "SESSIONFLEET_LOG_FORMAT"),
            ("--redis-url", "REDIS_URL"),
            ("--namespace", "SESSIONFLEET_NAMESPACE"),
        ] {
            let key = KEYS.iter().find(|k| k.env == env).expect("a setting");
            let block = blocks
                .iter()
                .find(|b| b.trim_start().starts_with(&format!("{flag} ")))
                .unwrap_or_else(|| panic!("{flag} in {help}"));
            let want = format!(
                "[env: {}] [file: {}] [default: {}]",
                key.env, key.file, key.default
            );
            assert!(block.contains(&want), "{flag}: want {want} in {block}");
        }
        assert!(help.contains("[default: cleanup,analytics,maintenance,diag]"));
        assert!(help.contains("Exit codes:\n"), "{help}");
        for line in ["  0    ", "  1    ", "  2    ", "  130  "] {
            assert!(help.contains(line), "{line} in {help}");
        }
        assert!(help.contains("Examples:\n  sessionfleet-worker"), "{help}");
    }

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
