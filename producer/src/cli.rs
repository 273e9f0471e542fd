//! The command line: every invocation of the original utilities, with the same flag names.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use sessionfleet::config::{MAX_CLEANUP_BATCH_SIZE, MAX_JOB_BUDGET_SECS};

/// Keeps application session tables healthy: purges expired and orphaned sessions in short
/// fenced batches, reports on session health, and maintains the tables — on SQLite,
/// PostgreSQL and MySQL/MariaDB, through a fleet of workers fed by Redis.
///
/// By default a command enqueues a job and waits for a worker to run it; --no-wait returns
/// the job id at once; --local runs it in this process under the same lease and fence.
#[derive(Debug, Parser)]
#[command(
    name = "sessionfleet",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
#[command(after_help = "Examples:
  sessionfleet cleanup --once                      purge expired and orphaned sessions now
  sessionfleet cleanup --stats                     counts only, changes nothing
  sessionfleet analytics --health-report --export report.html
  sessionfleet db --create-indexes --dry-run       list the indexes that would be built
  sessionfleet maintenance --full-maintenance      cleanup, indexes, optimize, health report
  sessionfleet maintenance --status --json         fleet and database status for scripts
  sessionfleet --local cleanup --once              no workers: run here, under the same lease

Exit codes: 0 success, 1 operation failed, 2 usage or configuration error, 3 health critical,
4 timed out, 5 fleet unreachable (Redis down or no worker consuming the queue).")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes (before or after the command name).
#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// TOML configuration file (targets, schedules, defaults) [env: SESSIONFLEET_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database of the default target; for jobs, only with --local (a worker uses its own configuration's) [env: DATABASE_URL] [default: sqlite://sessionfleet.db]
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Redis holding the queues, leases and results [env: REDIS_URL] [default: redis://127.0.0.1:6379]
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Configured target (database) to work on [default: the configured default target]
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        conflicts_with = "all_targets"
    )]
    pub target: Option<String>,
    /// Fan out one job per configured target
    #[arg(long, global = true)]
    pub all_targets: bool,
    /// Print one JSON document on stdout (logs stay on stderr)
    #[arg(long, global = true)]
    pub json: bool,
    /// Debug logging
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,
    /// Enqueue, print the job id and return without waiting
    #[arg(long, global = true, conflicts_with = "local")]
    pub no_wait: bool,
    /// Run the operation in this process (under the same lease and fence), without workers
    #[arg(long, global = true)]
    pub local: bool,
    /// Give up after this many seconds (exit code 4); with --local, the operation stops at its next batch boundary
    #[arg(long, global = true, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    /// Redis key namespace, to run several fleets on one Redis [env: SESSIONFLEET_NAMESPACE]
    #[arg(long, global = true, value_name = "NAME")]
    pub namespace: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Purge expired and orphaned sessions (session_cleanup.py)
    Cleanup(CleanupArgs),
    /// Health report, trends, alerts, export (session_analytics.py)
    Analytics(AnalyticsArgs),
    /// Table analysis, recommended indexes, optimize, integrity, statistics (session_db_maintenance.py)
    Db(DbArgs),
    /// The unified CLI: full maintenance, status, and each utility (session_maintenance.py)
    Maintenance(MaintenanceArgs),
    /// Run the scheduler: cleanup every SESSION_CLEANUP_INTERVAL, full maintenance daily, health hourly
    Schedule(ScheduleArgs),
    /// Jobs and dead letters: list, show, requeue, purge
    Jobs(JobsArgs),
    /// Show who holds each database's lease and the last fence token the database saw
    Lease,
    /// Show the effective configuration (passwords removed) and where each value came from
    Config(ConfigArgs),
    /// Fill a database with deterministic demo sessions
    SeedDemo(SeedArgs),
    /// Quick start: seed a demo SQLite database, start a worker, run full maintenance through the fleet
    Demo(DemoArgs),
}

/// `sessionfleet cleanup`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet cleanup --dry-run                   count, per rule, what a run would delete
  sessionfleet cleanup --once                      one run through the fleet; waits for its report
  sessionfleet cleanup --force --max-age 24        also purge every session idle over 24 hours
  sessionfleet --all-targets cleanup --once        one job per configured database
  sessionfleet --no-wait --json cleanup --once     enqueue; print the job and run ids and return
  sessionfleet cleanup --daemon                    the scheduler's cleanup-only form")]
#[command(group(ArgGroup::new("mode").args(["once", "daemon", "stats"])))]
pub struct CleanupArgs {
    /// Run one cleanup cycle
    #[arg(long)]
    pub once: bool,
    /// Keep running: a cleanup every SESSION_CLEANUP_INTERVAL seconds (the scheduler's cleanup-only form)
    #[arg(long, conflicts_with = "dry_run")]
    pub daemon: bool,
    /// Cleanup that also purges every session idle longer than --max-age hours (once, or with --daemon every interval)
    #[arg(long, conflicts_with = "stats")]
    pub force: bool,
    /// With --force: idle hours after which any session is purged (1 to 87600)
    #[arg(long, value_name = "HOURS", requires = "force")]
    pub max_age: Option<u32>,
    /// Show cleanup statistics (counts only; changes nothing)
    #[arg(long)]
    pub stats: bool,
    /// Count what would be deleted, per rule, and delete nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per batch to start with, 1 to 100000 [env: SESSION_CLEANUP_BATCH_SIZE] [default: 100]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CLEANUP_BATCH_SIZE)))]
    pub batch_size: Option<u32>,
    /// Seconds one job works before it hands over to a continuation, 1 to 86400 [env: SESSIONFLEET_JOB_BUDGET_SECS] [default: 30]
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=MAX_JOB_BUDGET_SECS))]
    pub budget: Option<u64>,
}

/// `sessionfleet analytics`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet analytics --health-report                       exit code 3 when critical
  sessionfleet analytics --health-report --export report.html  or .json
  sessionfleet analytics --trends 30 --json")]
#[command(group(ArgGroup::new("mode").args(["health_report", "trends"])))]
pub struct AnalyticsArgs {
    /// Generate the health report
    #[arg(long)]
    pub health_report: bool,
    /// Show per-day session trends for the last N days (1-366)
    #[arg(long, value_name = "DAYS")]
    pub trends: Option<u32>,
    /// With --health-report: write the report to FILE (.json or .html, by extension)
    #[arg(long, value_name = "FILE", requires = "health_report")]
    pub export: Option<PathBuf>,
}

/// `sessionfleet db`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet db --analyze                        sizes, bloat, indexes, recommendations
  sessionfleet db --create-indexes --dry-run       list the indexes that would be built
  sessionfleet db --optimize --vacuum              statistics, then reclaim space (never VACUUM FULL)
  sessionfleet db --integrity-check --full")]
#[command(group(ArgGroup::new("mode").args(["analyze", "create_indexes", "optimize", "integrity_check", "stats"])))]
pub struct DbArgs {
    /// Analyze the session tables: rows, sizes, bloat, indexes, recommendations
    #[arg(long)]
    pub analyze: bool,
    /// Create the recommended indexes, online (with --dry-run: list them only)
    #[arg(long)]
    pub create_indexes: bool,
    /// Refresh planner statistics (with --vacuum: also reclaim space)
    #[arg(long)]
    pub optimize: bool,
    /// With --optimize: VACUUM / VACUUM (ANALYZE) / OPTIMIZE TABLE (never VACUUM FULL)
    #[arg(long, requires = "optimize")]
    pub vacuum: bool,
    /// Check integrity and foreign keys
    #[arg(long)]
    pub integrity_check: bool,
    /// With --integrity-check: the thorough check (SQLite integrity_check instead of quick_check)
    #[arg(long, requires = "integrity_check")]
    pub full: bool,
    /// Database statistics: size, counts, pool, table analysis
    #[arg(long)]
    pub stats: bool,
    /// Say what would change and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `sessionfleet maintenance`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet maintenance --full-maintenance      cleanup, indexes, optimize, health report
  sessionfleet maintenance --full-maintenance --dry-run
  sessionfleet maintenance --status --json         counts, health, database, fleet
  sessionfleet maintenance --cleanup --dry-run")]
#[command(group(ArgGroup::new("mode").args(["full_maintenance", "status", "cleanup", "analytics", "database"])))]
pub struct MaintenanceArgs {
    /// Cleanup, then recommended indexes, then optimize, then a health report: one run, one summary
    #[arg(long)]
    pub full_maintenance: bool,
    /// Cleanup statistics, health, database statistics and the fleet (queues, workers, leases, last runs)
    #[arg(long)]
    pub status: bool,
    /// Cleanup operations (with --once, --daemon, --force [--max-age H], --dry-run; alone: statistics)
    #[arg(long)]
    pub cleanup: bool,
    /// Analytics operations (with --health [--export F]; alone: --trends, default 7 days)
    #[arg(long)]
    pub analytics: bool,
    /// Database operations (with --analyze, --create-indexes, --optimize [--vacuum], --integrity-check; alone: statistics)
    #[arg(long)]
    pub database: bool,
    /// With --cleanup: one cycle
    #[arg(long, requires = "cleanup")]
    pub once: bool,
    /// With --cleanup: run as a daemon
    #[arg(long, requires = "cleanup")]
    pub daemon: bool,
    /// With --cleanup: forced cleanup
    #[arg(long, requires = "cleanup")]
    pub force: bool,
    /// With --cleanup --force: idle hours
    #[arg(long, value_name = "HOURS", requires = "force")]
    pub max_age: Option<u32>,
    /// With --analytics: the health report
    #[arg(long, requires = "analytics")]
    pub health: bool,
    /// With --analytics (not with --health): trends over DAYS days
    #[arg(
        long,
        value_name = "DAYS",
        conflicts_with = "health",
        requires = "analytics"
    )]
    pub trends: Option<u32>,
    /// With --analytics --health: export to FILE (.json or .html)
    #[arg(long, value_name = "FILE", requires = "health")]
    pub export: Option<PathBuf>,
    /// With --database: analyze tables
    #[arg(long, requires = "database")]
    pub analyze: bool,
    /// With --database: create recommended indexes
    #[arg(long, requires = "database")]
    pub create_indexes: bool,
    /// With --database: optimize
    #[arg(long, requires = "database")]
    pub optimize: bool,
    /// With --database --optimize: vacuum too
    #[arg(long, requires = "optimize")]
    pub vacuum: bool,
    /// With --database: integrity check
    #[arg(long, requires = "database")]
    pub integrity_check: bool,
    /// Change nothing anywhere; say what would happen
    #[arg(long)]
    pub dry_run: bool,
}

/// `sessionfleet schedule`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet schedule                            every schedule, every configured target
  sessionfleet --target app schedule --cleanup-only

Any number of replicas may run: each tick is enqueued once.")]
pub struct ScheduleArgs {
    /// Only the cleanup schedule (what `cleanup --daemon` runs)
    #[arg(long)]
    pub cleanup_only: bool,
}

/// `sessionfleet jobs`
#[derive(Debug, Args, Clone)]
#[command(after_help = "Examples:
  sessionfleet jobs dead                           dead letters, newest first
  sessionfleet jobs show JOB_OR_RUN_ID             where a job waits, or its run's report
  sessionfleet jobs requeue DEAD_LETTER_ID
  sessionfleet jobs purge --all")]
pub struct JobsArgs {
    #[command(subcommand)]
    pub action: JobsAction,
}

/// What to do with jobs.
#[derive(Debug, Subcommand, Clone)]
pub enum JobsAction {
    /// List dead letters (jobs that failed for good or could not be decoded)
    Dead {
        /// How many to list
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show a job's result; a run's finished parts and the progress of the part running now;
    /// or a dead letter's payload and reason
    Show {
        /// Job id (a job running now shows its run), run id, or dead-letter id
        id: String,
    },
    /// Put a dead letter back on its queue
    Requeue {
        /// Dead-letter id
        id: String,
    },
    /// Delete dead letters
    Purge {
        /// Dead-letter id
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every dead letter
        #[arg(long)]
        all: bool,
    },
}

/// `sessionfleet config`
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

/// Configuration views.
#[derive(Debug, Subcommand, Clone)]
pub enum ConfigAction {
    /// The effective configuration and the source of each value
    Show,
    /// Every setting: environment variable, TOML key, default, accepted form
    Keys,
}

/// `sessionfleet seed-demo`
#[derive(Debug, Args, Clone)]
pub struct SeedArgs {
    /// Sessions to create
    #[arg(long, value_name = "N")]
    pub sessions: u64,
    /// Users to create [default: sessions/4, at least 10]
    #[arg(long, value_name = "U")]
    pub users: Option<u64>,
    /// Random seed: the same seed gives the same rows
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// Schema to create: v1 (updated_at only) or v2 (expires_at, is_active, last_activity)
    #[arg(long, value_name = "v1|v2", default_value = "v2")]
    pub schema: String,
    /// Drop and recreate the demo tables first (destroys their data)
    #[arg(long)]
    pub reset: bool,
    /// Reference time the data is relative to, RFC 3339 [default: now]
    #[arg(long, value_name = "TIME")]
    pub now: Option<String>,
}

/// `sessionfleet demo`
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Sessions in the demo database
    #[arg(long, default_value_t = 100_000)]
    pub sessions: u64,
    /// Demo database file (recreated)
    #[arg(long, default_value = "sessionfleet-demo.db")]
    pub file: PathBuf,
}

/// Without the URLs' passwords: a `{:?}` of the arguments may reach a log line.
impl std::fmt::Debug for GlobalArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |url: &Option<String>| url.as_deref().map(sessionfleet::secret::redact_url);
        f.debug_struct("GlobalArgs")
            .field("config", &self.config)
            .field("database_url", &redacted(&self.database_url))
            .field("redis_url", &redacted(&self.redis_url))
            .field("target", &self.target)
            .field("all_targets", &self.all_targets)
            .field("json", &self.json)
            .field("verbose", &self.verbose)
            .field("no_wait", &self.no_wait)
            .field("local", &self.local)
            .field("timeout", &self.timeout)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_password() {
        let cli = Cli::try_parse_from([
            "sessionfleet",
            "--database-url",
            "postgres://app:hunter2@db/app",
            "--redis-url",
            "redis://:s3cret@cache:6379",
            "lease",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(
            shown.contains("db/app") && shown.contains("cache:6379"),
            "{shown}"
        );
    }
}
