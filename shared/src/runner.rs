//! The runner: the one seam between the queue and the operations. The worker hands it a
//! decoded [`JobEnvelope`] and gets a [`JobOutcome`] back; what the outcome means for the queue
//! (store, continue, defer, retry, dead-letter) is the worker's business, and what a kind
//! means for a database is the operations' business.
//!
//! Architecture invariant: [`execute`] never touches queue structures and never panics on
//! input; every failure becomes [`JobOutcome::Failed`] with a reason.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::CancellationToken;
use crate::config::Settings;
use crate::jobs::{JobEnvelope, JobKind, SleepParams};
use crate::queue::Queue;

/// Granularity of the diagnostic sleep: how soon it notices a cancellation.
pub const SLEEP_STEP: Duration = Duration::from_millis(20);

/// What a worker needs to run jobs.
#[derive(Clone)]
pub struct RunnerDeps {
    /// Effective configuration (targets, budgets, lease TTL…).
    pub settings: Arc<Settings>,
    /// The queue (for leases and facts only the fleet knows).
    pub queue: Queue,
    /// This worker's unique name (lease holder, `enqueued_by` of continuations).
    pub worker_name: String,
    /// Cancelled when the worker shuts down: operations stop at their next boundary and
    /// return a continuation.
    pub shutdown: CancellationToken,
}

/// How one execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// All work done.
    Done {
        /// The operation's report.
        report: serde_json::Value,
        /// Rows changed.
        rows_affected: u64,
    },
    /// Part of the work done; `next` carries the rest under the same run id.
    Continue {
        /// This part's report.
        report: serde_json::Value,
        /// Rows this part changed.
        rows_affected: u64,
        /// The continuation (same run id, part + 1).
        next: JobEnvelope,
        /// How long to wait before `next` may start: set when a newer lease holder fenced
        /// this part out, so the continuation does not take the database back from it at
        /// once where no Redis lease makes it wait (a `--local` run without Redis), and when
        /// an error stopped it, as a retry would wait.
        delay: Option<Duration>,
    },
    /// Not run now (e.g. the target's lease is busy); run again after `delay` without
    /// spending an attempt.
    Deferred {
        /// How long to wait.
        delay: Duration,
        /// Why.
        reason: String,
    },
    /// Failed.
    Failed {
        /// Why (one line, no secrets).
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// Runs one job.
pub async fn execute(env: &JobEnvelope, deps: &RunnerDeps) -> JobOutcome {
    match env.kind {
        JobKind::Noop => run_noop(env),
        JobKind::Sleep => run_sleep(env, deps).await,
        // Boxed: the operations' futures are large, and inline they would make every
        // delivery's future as large, copied on each spawn even for a no-op (a quarter of
        // the worker's CPU went to that copy at 15k jobs/s).
        JobKind::Cleanup | JobKind::Analytics | JobKind::Maintenance | JobKind::FullMaintenance => {
            Box::pin(run_operation(env, deps)).await
        }
    }
}

/// The operations' entry point: the worker's surroundings handed to
/// [`dispatch::run_operation`](crate::dispatch::run_operation), which the CLI's `--local` mode
/// uses too.
pub async fn run_operation(env: &JobEnvelope, deps: &RunnerDeps) -> JobOutcome {
    let oe = crate::dispatch::OperationEnv {
        settings: &deps.settings,
        redis: Some(deps.queue.connection()),
        queue: Some(&deps.queue),
        holder: &deps.worker_name,
        shutdown: &deps.shutdown,
        progress: None,
    };
    crate::dispatch::run_operation(env, &oe).await
}

/// The diagnostic no-op. `params.fail_attempts = n` makes its first `n` attempts fail
/// retryably, which is how tests and health checks exercise the retry path.
fn run_noop(env: &JobEnvelope) -> JobOutcome {
    let fail_attempts = env
        .params
        .get("fail_attempts")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if u64::from(env.attempt) <= fail_attempts {
        return JobOutcome::Failed {
            error: format!("diagnostic failure {} of {fail_attempts}", env.attempt),
            retryable: true,
        };
    }
    JobOutcome::Done {
        report: serde_json::json!({ "noop": true, "attempt": env.attempt }),
        rows_affected: 0,
    }
}

/// The diagnostic sleep: sleeps in [`SLEEP_STEP`]s, stops early on shutdown, and returns a
/// continuation for the remaining time when its budget (or the worker's job budget) is spent.
async fn run_sleep(env: &JobEnvelope, deps: &RunnerDeps) -> JobOutcome {
    let params: SleepParams = match serde_json::from_value(env.params.clone()) {
        Ok(p) => p,
        Err(e) => {
            return JobOutcome::Failed {
                error: format!("invalid sleep parameters: {e}"),
                retryable: false,
            };
        }
    };
    if let Err(e) = params.validate() {
        return JobOutcome::Failed {
            error: e,
            retryable: false,
        };
    }
    let total = Duration::from_millis(params.millis);
    let budget = params
        .budget_ms
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(deps.settings.job_budget_secs.value));
    let started = Instant::now();
    let mut slept = Duration::ZERO;
    let stopped_by = loop {
        if slept >= total {
            break None;
        }
        if deps.shutdown.is_cancelled() {
            break Some("shutdown");
        }
        if slept >= budget {
            break Some("budget");
        }
        let step = SLEEP_STEP
            .min(total - slept)
            .min(budget.saturating_sub(slept).max(Duration::from_millis(1)));
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = deps.shutdown.cancelled() => {}
        }
        slept = started.elapsed();
    };
    let slept_ms = slept.min(total).as_millis() as u64;
    match stopped_by {
        None => JobOutcome::Done {
            report: serde_json::json!({ "slept_ms": slept_ms }),
            rows_affected: 0,
        },
        Some(why) => {
            let rest = SleepParams {
                millis: params.millis.saturating_sub(slept_ms),
                budget_ms: params.budget_ms,
            };
            let next = env.continuation(
                serde_json::to_value(rest).unwrap_or_default(),
                deps.worker_name.clone(),
            );
            JobOutcome::Continue {
                report: serde_json::json!({ "slept_ms": slept_ms, "stopped_by": why, "remaining_ms": rest.millis }),
                rows_affected: 0,
                next,
                delay: None,
            }
        }
    }
}
