//! From a job to an operation call: decode the parameters for the job's kind, decide whether
//! the work writes (and so needs the lease and a fencing token), run it under the lease, and
//! say what should happen next. Shared by the worker (through [`crate::runner`]) and the
//! CLI's `--local` mode, so both run an operation the same way.
//!
//! Read-only work — analytics, statistics, analysis, integrity checks and every dry run —
//! takes no lease and no token: it cannot corrupt anything, and a dry run must change
//! nothing anywhere, not even the fence table.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::CancellationToken;
use crate::config::Settings;
use crate::jobs::{JobEnvelope, JobKind};
use crate::lease::{self, HolderInfo, LeaseConfig};
use crate::ops::analytics::{self, AnalyticsParams, FleetFacts, JobCounts};
use crate::ops::cleanup::{self, CleanupParams};
use crate::ops::full::{self, FullParams};
use crate::ops::maintenance::{self, MaintenanceAction, MaintenanceParams};
use crate::ops::{OpContext, OpError, Outcome, Progress};
use crate::queue::progress::Publishing;
use crate::queue::{LiveProgress, Queue, ResultOutcome, RunSummary};
use crate::runner::JobOutcome;
use crate::store::{ConnectOptions, Db, StoreError};

/// Window of recent runs summarised into [`FleetFacts`] for health reports.
pub const FLEET_FACTS_RUNS: usize = 200;
/// Period the job-outcome counts of [`FleetFacts`] cover.
pub const FLEET_FACTS_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A job's parameters, decoded for its kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OperationJob {
    /// Cleanup.
    Cleanup(CleanupParams),
    /// Analytics (health report or trends).
    Analytics(AnalyticsParams),
    /// One database-maintenance step.
    Maintenance(MaintenanceParams),
    /// Full maintenance (boxed: it carries the partial report of earlier parts).
    FullMaintenance(Box<FullParams>),
}

impl OperationJob {
    /// Decodes `env.params` for `env.kind`.
    pub fn decode(env: &JobEnvelope) -> Result<OperationJob, String> {
        let p = env.params.clone();
        let bad = |e: serde_json::Error| format!("invalid {} parameters: {e}", env.kind.as_str());
        Ok(match env.kind {
            JobKind::Cleanup => OperationJob::Cleanup(serde_json::from_value(p).map_err(bad)?),
            JobKind::Analytics => OperationJob::Analytics(serde_json::from_value(p).map_err(bad)?),
            JobKind::Maintenance => {
                OperationJob::Maintenance(serde_json::from_value(p).map_err(bad)?)
            }
            JobKind::FullMaintenance => {
                OperationJob::FullMaintenance(Box::new(serde_json::from_value(p).map_err(bad)?))
            }
            other => return Err(format!("'{}' is not an operation", other.as_str())),
        })
    }

    /// The job kind.
    pub fn kind(&self) -> JobKind {
        match self {
            OperationJob::Cleanup(_) => JobKind::Cleanup,
            OperationJob::Analytics(_) => JobKind::Analytics,
            OperationJob::Maintenance(_) => JobKind::Maintenance,
            OperationJob::FullMaintenance(_) => JobKind::FullMaintenance,
        }
    }

    /// The parameters as JSON, for an envelope.
    pub fn params(&self) -> serde_json::Value {
        let v = match self {
            OperationJob::Cleanup(p) => serde_json::to_value(p),
            OperationJob::Analytics(p) => serde_json::to_value(p),
            OperationJob::Maintenance(p) => serde_json::to_value(p),
            OperationJob::FullMaintenance(p) => serde_json::to_value(p),
        };
        v.unwrap_or_default()
    }

    /// Whether the job changes the database (and so runs under the lease with a token).
    pub fn is_mutating(&self) -> bool {
        match self {
            OperationJob::Cleanup(p) => !p.dry_run,
            OperationJob::Analytics(_) => false,
            OperationJob::Maintenance(p) => match p.action {
                MaintenanceAction::CreateIndexes => !p.dry_run,
                MaintenanceAction::Optimize { .. } => true,
                _ => false,
            },
            OperationJob::FullMaintenance(p) => !p.dry_run,
        }
    }

    /// Adds to analytics and full maintenance what the fleet knows of `target` beyond its
    /// database: its recent outcomes and recorded deletions (its history in `queue`, read
    /// once), the storage failures of its latest integrity check, and, for a health report,
    /// the recommended indexes `db` lacks. Without a queue only the last is added.
    pub async fn with_fleet_knowledge(
        self,
        db: &Db,
        queue: Option<&Queue>,
        target: &str,
    ) -> OperationJob {
        let history = match (
            queue,
            matches!(
                self,
                OperationJob::Analytics(_) | OperationJob::FullMaintenance(_)
            ),
        ) {
            (Some(q), true) => q.recent_runs(target, FLEET_FACTS_RUNS).await.ok(),
            _ => None,
        };
        let facts = history
            .as_deref()
            .and_then(|runs| fleet_facts(runs, queue.and_then(Queue::history_kept_since)));
        let integrity = match (queue, history.as_deref()) {
            (Some(q), Some(runs)) if self.makes_health_report() => {
                last_integrity_failures(q, runs).await
            }
            _ => None,
        };
        self.with_fleet_facts(facts)
            .with_db_findings(db)
            .await
            .with_integrity_failures(integrity)
    }

    /// Adds what only the fleet knows (recent outcomes, recorded deletions) to analytics.
    fn with_fleet_facts(mut self, facts: Option<FleetFacts>) -> OperationJob {
        let Some(facts) = facts else { return self };
        match &mut self {
            OperationJob::Analytics(AnalyticsParams::HealthReport(h)) => {
                h.fleet.get_or_insert(facts);
            }
            OperationJob::Analytics(AnalyticsParams::Trends { fleet, .. }) => {
                fleet.get_or_insert(facts);
            }
            OperationJob::FullMaintenance(p) => {
                p.health.fleet.get_or_insert(facts);
            }
            _ => {}
        }
        self
    }

    /// Whether the job ends in a health report (a health report, or full maintenance).
    fn makes_health_report(&self) -> bool {
        matches!(
            self,
            OperationJob::Analytics(AnalyticsParams::HealthReport(_))
                | OperationJob::FullMaintenance(_)
        )
    }

    /// Adds what the target's latest integrity check found wrong with its storage
    /// ([`last_integrity_failures`]) to a health report's database findings, so a corrupt
    /// database raises the report's critical integrity alert until a check passes again.
    fn with_integrity_failures(mut self, failures: Option<Vec<String>>) -> OperationJob {
        let Some(failures) = failures.filter(|f| !f.is_empty()) else {
            return self;
        };
        let health = match &mut self {
            OperationJob::Analytics(AnalyticsParams::HealthReport(h)) => h,
            OperationJob::FullMaintenance(p) => &mut p.health,
            _ => return self,
        };
        let findings = health.findings.get_or_insert_with(Default::default);
        if findings.integrity_failures.is_empty() {
            findings.integrity_failures = failures;
        }
        self
    }

    /// Adds the recommended indexes `db` lacks to a health report that carries no database
    /// findings, so its missing-index warnings fire outside full maintenance too (one
    /// catalog read). A failed read leaves the findings absent, as before.
    async fn with_db_findings(mut self, db: &Db) -> OperationJob {
        if let OperationJob::Analytics(AnalyticsParams::HealthReport(h)) = &mut self
            && h.findings.is_none()
        {
            match maintenance::missing_recommended_indexes(db).await {
                Ok(missing) => {
                    h.findings = Some(analytics::DbFindings {
                        missing_indexes: missing,
                        ..Default::default()
                    })
                }
                Err(e) => tracing::debug!(error = %e, "recommended indexes not read"),
            }
        }
        self
    }

    /// Runs the operation with `ctx`.
    pub async fn execute(&self, ctx: OpContext) -> Result<Executed, OpError> {
        match self {
            OperationJob::Cleanup(p) => {
                let r = cleanup::run(&ctx, p).await?;
                let rows = if r.dry_run { 0 } else { r.total_cleaned() };
                let next = (r.outcome != Outcome::Completed)
                    .then(|| OperationJob::Cleanup(p.continuation(&r)));
                Ok(Executed {
                    report: to_json(&r),
                    rows,
                    outcome: r.outcome,
                    next,
                })
            }
            OperationJob::Analytics(p) => Ok(match analytics::run(&ctx, p).await? {
                Some(r) => Executed {
                    report: to_json(&r),
                    rows: 0,
                    outcome: Outcome::Completed,
                    next: None,
                },
                // Cancelled before its report was done: nothing to keep or continue; the job
                // is handed back whole ([`run_operation`] defers it).
                None => Executed {
                    report: serde_json::Value::Null,
                    rows: 0,
                    outcome: Outcome::Cancelled,
                    next: None,
                },
            }),
            OperationJob::Maintenance(p) => {
                let r = maintenance::run(&ctx, p).await?;
                // An index build or optimize a cancellation cut short is continued, not
                // called done.
                let cut_short = r.cut_short();
                Ok(Executed {
                    report: to_json(&r),
                    rows: 0,
                    outcome: if cut_short {
                        Outcome::Cancelled
                    } else {
                        Outcome::Completed
                    },
                    next: cut_short.then(|| OperationJob::Maintenance(p.clone())),
                })
            }
            OperationJob::FullMaintenance(p) => {
                let r = full::run(&ctx, p).await?;
                // This part's rows: the report's figure is the run's so far.
                let rows = r.rows;
                Ok(Executed {
                    report: to_json(&r.report),
                    rows,
                    outcome: r.outcome,
                    next: r.next.map(|n| OperationJob::FullMaintenance(Box::new(n))),
                })
            }
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v)
        .unwrap_or_else(|e| serde_json::json!({ "error": format!("report not encodable: {e}") }))
}

/// What one execution produced.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The report, as JSON.
    pub report: serde_json::Value,
    /// Rows changed.
    pub rows: u64,
    /// Why it stopped.
    pub outcome: Outcome,
    /// The rest of the work, when it stopped early. `None` with an outcome other than
    /// completed: stopped before it did anything worth keeping (an analytics report
    /// cancelled part-way), so the whole job is to run again.
    pub next: Option<OperationJob>,
}

/// What running an operation needs from its surroundings.
pub struct OperationEnv<'a> {
    /// Configuration (targets, lease TTL).
    pub settings: &'a Settings,
    /// Redis, for the lease; `None` runs under the database fence alone.
    pub redis: Option<ConnectionManager>,
    /// The queue, for fleet facts; optional.
    pub queue: Option<&'a Queue>,
    /// Who runs it (worker name, or `cli@host`).
    pub holder: &'a str,
    /// Fires on shutdown: the operation stops at its next boundary.
    pub shutdown: &'a CancellationToken,
    /// Where the operation reports its progress, for a caller that shows it (the CLI's
    /// `--local` mode); `None` gives it one of its own. Either way, with a queue, the running
    /// part's progress is also published in Redis ([`crate::queue::progress`]).
    pub progress: Option<Progress>,
}

/// Runs the operation `env` names and says what should happen next.
pub async fn run_operation(env: &JobEnvelope, oe: &OperationEnv<'_>) -> JobOutcome {
    let job = match OperationJob::decode(env) {
        Ok(j) => j,
        Err(error) => {
            return JobOutcome::Failed {
                error,
                retryable: false,
            };
        }
    };
    let target = match oe.settings.target(Some(&env.target)) {
        Ok(t) => t,
        Err(e) => {
            return JobOutcome::Failed {
                error: e.to_string(),
                retryable: false,
            };
        }
    };
    let role = if job.is_mutating() {
        PoolRole::Writes
    } else {
        PoolRole::Reads
    };
    let db = match shared_db(&target.url, role).await {
        Ok(db) => db,
        // Not tried now (a failure within the memory): the job waits out the memory without
        // spending an attempt, since the database was not asked. Retries at their usual
        // delays would all fall inside it and a short restart would use up every attempt.
        Err(e) if e.is_remembered() && !e.is_permanent() => {
            return JobOutcome::Deferred {
                delay: e.retry_in() + crate::backoff::jitter(CONNECT_RETRY_SPREAD),
                reason: e.to_string(),
            };
        }
        // A URL that cannot work fails the job as a target missing from the configuration
        // does: retries would fail the same way, only later.
        Err(e) => {
            return JobOutcome::Failed {
                retryable: !e.is_permanent(),
                error: e.to_string(),
            };
        }
    };
    let job = job.with_fleet_knowledge(&db, oe.queue, &env.target).await;
    let holder = HolderInfo::new(oe.holder, env.job_id.to_string());
    let lease_cfg = LeaseConfig::from_ttl(Duration::from_millis(oe.settings.lease_ttl_ms.value));

    let result = if !job.is_mutating() {
        let ctx = OpContext {
            db: db.clone(),
            fence: None,
            cancel: oe.shutdown.child_token(),
            progress: Default::default(),
        };
        Ok((execute_reporting(&job, ctx, env, oe).await, None))
    } else if let Some(redis) = &oe.redis {
        lease::with_lease(
            redis,
            &oe.settings.namespace.value,
            &env.target,
            &holder,
            &db,
            &lease_cfg,
            oe.shutdown,
            |ctx| execute_reporting(&job, ctx, env, oe),
        )
        .await
        .map(|run| (run.value, run.lost))
    } else {
        lease::with_db_fence_only(&db, &env.target, &holder, oe.shutdown, |ctx| {
            execute_reporting(&job, ctx, env, oe)
        })
        .await
        .map(|run| (run.value, run.lost))
    };

    match result {
        Err(e) if e.is_busy() => JobOutcome::Deferred {
            delay: lease_cfg.busy_delay(),
            reason: e.to_string(),
        },
        Err(e) => JobOutcome::Failed {
            error: e.to_string(),
            retryable: true,
        },
        Ok((Err(e), _)) if e.is_fenced_out() => JobOutcome::Deferred {
            delay: lease_cfg.busy_delay(),
            reason: format!("{e}; retrying once the newer holder is done"),
        },
        Ok((Err(e @ OpError::Invalid(_)), _)) => JobOutcome::Failed {
            error: e.to_string(),
            retryable: false,
        },
        Ok((Err(e), _)) => JobOutcome::Failed {
            error: e.to_string(),
            retryable: true,
        },
        // Cancelled (a shutdown, the CLI's deadline) before it produced anything: handed
        // back as it came, ready at once for another worker, spending no attempt — as a
        // busy lease is. Failing it would spend one, and a report left to run past the
        // worker's shutdown timeout counted as a worker death and ran again in full.
        Ok((Ok(done), _)) if done.outcome != Outcome::Completed && done.next.is_none() => {
            JobOutcome::Deferred {
                delay: Duration::ZERO,
                reason: format!(
                    "{} stopped before its report was done; nothing kept, it starts over",
                    env.kind.as_str()
                ),
            }
        }
        Ok((Ok(done), lost)) => {
            if let Some(reason) = lost {
                tracing::warn!(job_id = %env.job_id, ?reason, "lease lost during the run; the rest continues later");
            }
            match done.next {
                Some(next) => JobOutcome::Continue {
                    report: done.report,
                    rows_affected: done.rows,
                    next: env.continuation(next.params(), oe.holder),
                    delay: match done.outcome {
                        Outcome::FencedOut => Some(lease_cfg.busy_delay()),
                        Outcome::Interrupted => Some(crate::queue::retry_delay(2)),
                        _ => None,
                    },
                },
                None => JobOutcome::Done {
                    report: done.report,
                    rows_affected: done.rows,
                },
            }
        }
    }
}

/// Runs `job` in `ctx` (its lease, if any, already held), reporting to the caller's progress
/// and, with a queue, publishing it under the run for the CLI and `jobs show`.
async fn execute_reporting(
    job: &OperationJob,
    ctx: OpContext,
    env: &JobEnvelope,
    oe: &OperationEnv<'_>,
) -> Result<Executed, OpError> {
    let progress = oe.progress.clone().unwrap_or_default();
    let publishing = oe.queue.map(|q| {
        Publishing::start(
            q,
            env.run_id,
            LiveProgress::starting(env, oe.holder),
            progress.subscribe(),
        )
    });
    let executed = job.execute(ctx.with_progress(progress)).await;
    if let Some(p) = publishing {
        p.finish().await;
    }
    executed
}

/// Which of a target's two pools a job draws its connections from.
///
/// Read-only work (reports, statistics, dry runs) can hold every connection of its pool for a
/// long time — a health report runs its queries on all of them at once, for a minute on a
/// large table — and takes no lease, so it may run beside the one writer the lease admits.
/// Giving writes their own pool keeps that writer from waiting out the pool's acquire timeout
/// behind a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolRole {
    /// Mutating work, under the lease: at most one such job per target at a time.
    Writes,
    /// Read-only work: any number of jobs, sharing the pool's connections.
    Reads,
}

/// How long a failed attempt to open a target's pool is remembered. Opening retries an
/// unreachable server for up to about a minute (five attempts, each waiting up to the pool's
/// connect timeout, with backoff between them), one job at a time per pool: without a memory, every job queued for a target
/// that is down paid that minute in turn, each holding one of the worker's job slots, so one
/// dead database held up the jobs of every other. Within the window the pool's jobs get the
/// same error at once and are deferred past its end without spending an attempt (the
/// database was not asked); after it the next job tries again, so a target that comes back
/// is used within this long.
pub const CONNECT_FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// Spread of the deferrals of jobs that met a remembered failure, past its end, so they do
/// not all try at the same instant.
const CONNECT_RETRY_SPREAD: Duration = Duration::from_secs(2);

/// Why a target's pool could not be opened ([`shared_db`]). Its text names the URL with the
/// password removed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectFailure {
    message: String,
    permanent: bool,
    /// For a remembered failure, how long until the next attempt may be made.
    remembered: Option<Duration>,
}

impl ConnectFailure {
    fn new(e: &StoreError, url: &str) -> ConnectFailure {
        ConnectFailure {
            message: e.to_string(),
            // Only a URL that cannot be used as written: an unknown scheme, or one its
            // driver cannot read. Credentials or a database the server refuses, or a SQLite
            // file that is not there, can come right without a change here (a password
            // rotation under way, a database being restored, a volume mounted late), so
            // those are tried again like a server that does not answer.
            permanent: matches!(e, StoreError::UnknownScheme(_))
                || crate::store::check_url(url).is_err(),
            remembered: None,
        }
    }

    /// Whether trying again cannot help until the configuration (or the server's accounts)
    /// change: a job failing so is not retried.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// Whether this is the failure of an earlier attempt, within [`CONNECT_FAILURE_MEMORY`],
    /// given without trying again.
    pub fn is_remembered(&self) -> bool {
        self.remembered.is_some()
    }

    /// How long until the pool may be tried again (zero for a failure not remembered).
    pub fn retry_in(&self) -> Duration {
        self.remembered.unwrap_or_default()
    }

    fn remembered(&self, age: Duration) -> ConnectFailure {
        ConnectFailure {
            message: format!(
                "{} (remembered from the attempt {}s ago; the next is {}s after it)",
                self.message,
                age.as_secs(),
                CONNECT_FAILURE_MEMORY.as_secs()
            ),
            remembered: Some(CONNECT_FAILURE_MEMORY.saturating_sub(age)),
            ..self.clone()
        }
    }
}

/// A pool of [`shared_db`]: the connection, once opened, and the last failed attempt.
#[derive(Default)]
struct SharedPool {
    db: tokio::sync::OnceCell<Db>,
    /// When the last attempt failed, and how.
    failed: std::sync::Mutex<Option<(Instant, ConnectFailure)>>,
    /// Attempts made to open it ([`connect_attempts`]).
    attempts: AtomicU64,
}

impl SharedPool {
    async fn get(&self, url: &str) -> Result<Db, ConnectFailure> {
        self.db
            .get_or_try_init(|| async {
                if let Some(recent) = self.recent_failure() {
                    return Err(recent);
                }
                self.attempts.fetch_add(1, Ordering::Relaxed);
                Db::connect(url, &ConnectOptions::default())
                    .await
                    .map_err(|e| {
                        let failure = ConnectFailure::new(&e, url);
                        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((Instant::now(), failure.clone()));
                        failure
                    })
            })
            .await
            .cloned()
    }

    /// The last failure, if within [`CONNECT_FAILURE_MEMORY`].
    fn recent_failure(&self) -> Option<ConnectFailure> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let (at, failure) = failed.as_ref()?;
        let age = at.elapsed();
        (age < CONNECT_FAILURE_MEMORY).then(|| failure.remembered(age))
    }
}

/// Every [`shared_db`] pool of this process, by URL and role.
type SharedPools = Mutex<HashMap<(String, PoolRole), Arc<SharedPool>>>;

fn shared_pools() -> &'static SharedPools {
    static POOLS: OnceLock<SharedPools> = OnceLock::new();
    POOLS.get_or_init(Mutex::default)
}

async fn shared_pool(url: &str, role: PoolRole) -> Arc<SharedPool> {
    shared_pools()
        .lock()
        .await
        .entry((url.to_string(), role))
        .or_default()
        .clone()
}

/// One pool per database URL and [`PoolRole`] per process, shared by every job of that role
/// on that target (so at most twice [`ConnectOptions::DEFAULT_MAX_CONNECTIONS`] connections
/// per target per worker).
///
/// Connecting (with its retries, up to a minute for an unreachable server) happens outside
/// the map's lock, one job at a time per pool: jobs for one target wait for that target's
/// connection only, never for another's. A failed attempt is remembered for
/// [`CONNECT_FAILURE_MEMORY`]: the jobs waiting for it, and those arriving within that time,
/// get its error without trying again; the first job after it tries again.
pub async fn shared_db(url: &str, role: PoolRole) -> Result<Db, ConnectFailure> {
    shared_pool(url, role).await.get(url).await
}

/// How many times this process has tried to open the [`shared_db`] pool of `url` and `role`
/// (a failure remembered is not an attempt), for tests and diagnostics.
pub async fn connect_attempts(url: &str, role: PoolRole) -> u64 {
    shared_pool(url, role)
        .await
        .attempts
        .load(Ordering::Relaxed)
}

/// Shortest period a failure rate is taken over, seconds: a burst of runs within seconds
/// would otherwise read as thousands a minute.
const MIN_RATE_WINDOW_SECS: i64 = 60;

/// Most maintenance results [`last_integrity_failures`] reads looking for an integrity check.
const INTEGRITY_LOOKUP_RESULTS: usize = 50;

/// What the latest integrity check among a target's recent `runs` (newest first) found wrong
/// with its storage, each line stamped with the check's time: empty when it passed, `None`
/// when no check is among them (or its result has expired). Read-only work takes no lease,
/// so the check is a job like any other and its report lives in the queue's results.
pub async fn last_integrity_failures(queue: &Queue, runs: &[RunSummary]) -> Option<Vec<String>> {
    let maintenance = runs
        .iter()
        .filter(|r| r.kind == JobKind::Maintenance && r.outcome == ResultOutcome::Succeeded)
        .take(INTEGRITY_LOOKUP_RESULTS);
    for run in maintenance {
        let Ok(Some(result)) = queue.result(run.job_id).await else {
            continue;
        };
        if let Ok(maintenance::MaintenanceReport::Integrity(r)) =
            serde_json::from_value(result.report)
        {
            let when = r.timestamp.format("%Y-%m-%d %H:%M UTC");
            return Some(
                r.storage_failures()
                    .into_iter()
                    .map(|f| format!("{f} (check of {when})"))
                    .collect(),
            );
        }
    }
    None
}

/// Summarises a target's recent runs (its history, at most [`FLEET_FACTS_RUNS`], none older
/// than `kept_since`, the retention's start) for the health report and trends.
pub fn fleet_facts(
    runs: &[RunSummary],
    kept_since: Option<chrono::DateTime<Utc>>,
) -> Option<FleetFacts> {
    if runs.is_empty() {
        return None;
    }
    let now = Utc::now();
    let window_start = now - chrono::Duration::from_std(FLEET_FACTS_WINDOW).ok()?;
    // The history keeps the last FLEET_FACTS_RUNS runs: when it is full, older runs are gone,
    // and the runs read cover only the time since the oldest of them. Rates over the whole
    // window would then be understated (at most 200 failures a day, 0.14 a minute).
    let full = runs.len() >= FLEET_FACTS_RUNS;
    let oldest = runs.iter().map(|r| r.finished_at).min().unwrap_or(now);
    let since = if full {
        window_start.max(oldest)
    } else {
        window_start
    };
    let recent: Vec<_> = runs.iter().filter(|r| r.finished_at >= since).collect();
    let failed = recent
        .iter()
        .filter(|r| r.outcome == ResultOutcome::Failed)
        .count() as u64;
    let mut by_day: BTreeMap<chrono::NaiveDate, u64> = BTreeMap::new();
    for r in runs
        .iter()
        .filter(|r| matches!(r.kind, JobKind::Cleanup | JobKind::FullMaintenance))
    {
        *by_day.entry(r.finished_at.date_naive()).or_default() += r.rows_affected;
    }
    // A full history starts part-way through its oldest day, and so does one the retention
    // cut on that day.
    let cut_by_retention = kept_since.is_some_and(|k| k.date_naive() >= oldest.date_naive());
    let cleanup_recorded_from = if full || cut_by_retention {
        oldest.date_naive().succ_opt()
    } else {
        Some(oldest.date_naive())
    };
    Some(FleetFacts {
        jobs: (!recent.is_empty()).then(|| JobCounts {
            window_secs: (now - since).num_seconds().max(MIN_RATE_WINDOW_SECS) as u64,
            total: recent.len() as u64,
            succeeded: recent.len() as u64 - failed,
            failed,
        }),
        cleanup_deleted_by_day: Some(by_day),
        cleanup_recorded_from,
    })
}
