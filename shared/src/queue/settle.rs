//! What a worker does with one delivery: decode, skip a duplicate, execute, and settle the
//! outcome — store the result, enqueue a continuation, defer, retry with backoff, or
//! dead-letter. Towards apalis every delivery that reaches here ends as a success (the job is
//! settled in our own structures), so apalis' hard-coded 25 linear retries never apply.

use std::time::Instant;

use chrono::Utc;
use tracing::Instrument;

use super::janitor::DeliveryStart;
use super::{
    DeadLetter, EnqueueOptions, JobResult, QueueError, ResultOutcome, max_attempts, retry_delay,
};
use crate::jobs::{JobEnvelope, QueueClass};
use crate::runner::{self, JobOutcome, RunnerDeps};

/// The longest wait between two looks of a deferred job at its busy lease.
pub const MAX_DEFERRAL_DELAY: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a deferred job waits before its next look: what its outcome asked for, growing
/// with how long it has been deferred already (`deferred_since`; an eighth of it, at most
/// [`MAX_DEFERRAL_DELAY`]). Scheduled runs queued behind an hours-long purge would otherwise
/// each look at the lease every two seconds for hours. A job handed back at once (asked
/// zero, as a cancelled report is) is not held back.
pub fn deferral_delay(
    asked: std::time::Duration,
    waited: std::time::Duration,
) -> std::time::Duration {
    if asked.is_zero() {
        return asked;
    }
    asked.max((waited / 8).min(MAX_DEFERRAL_DELAY))
}

/// How a delivery was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Finished; result stored.
    Succeeded,
    /// Part done; continuation enqueued.
    Continued,
    /// Put back after a delay without spending an attempt.
    Deferred,
    /// Failed; retry enqueued (attempt number of the retry).
    Retrying(u32),
    /// Dead-lettered (undecodable, not retryable, or out of attempts).
    DeadLettered,
    /// A redelivery of a job that already has a result; not run again.
    Duplicate,
}

impl Settled {
    /// Metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Settled::Succeeded => "succeeded",
            Settled::Continued => "continued",
            Settled::Deferred => "deferred",
            Settled::Retrying(_) => "retrying",
            Settled::DeadLettered => "dead_lettered",
            Settled::Duplicate => "duplicate",
        }
    }
}

/// Handles one delivery of queue `q` with task id `task_id` and raw `payload`. An error means
/// the outcome could not be recorded (Redis trouble); the delivery should then stay unacked.
pub async fn process_delivery(
    deps: &RunnerDeps,
    q: QueueClass,
    task_id: &str,
    payload: &[u8],
) -> Result<Settled, QueueError> {
    let queue = &deps.queue;
    let env = match JobEnvelope::decode(payload) {
        Ok(env) if env.queue() != q => {
            let reason = format!(
                "job of kind {} arrived on queue {} (expected {})",
                env.kind,
                q,
                env.queue()
            );
            return dead_letter_undecodable(deps, q, task_id, payload, reason).await;
        }
        Ok(env) => env,
        Err(e) => return dead_letter_undecodable(deps, q, task_id, payload, e.to_string()).await,
    };
    let span = tracing::info_span!(
        "job",
        job_id = %env.job_id,
        run_id = %env.run_id,
        target = %env.target,
        kind = %env.kind,
        part = env.part,
        attempt = env.attempt,
        task_id = %task_id,
    );
    async move {
        // At-least-once delivery: a redelivered job whose result is already stored (the ack
        // was lost, or the worker died after finishing) is not run twice; one whose workers
        // keep dying while running it is buried. The start is counted until the delivery
        // ends with its result or is put back.
        match queue.begin_delivery(q, task_id, payload, &env, &deps.worker_name).await? {
            DeliveryStart::Run => {}
            DeliveryStart::Duplicate => {
                tracing::info!("already finished; skipping redelivery");
                metrics::counter!("sessionfleet_jobs_total", "kind" => env.kind.as_str(), "outcome" => "duplicate").increment(1);
                return Ok(Settled::Duplicate);
            }
            DeliveryStart::Buried => {
                metrics::counter!("sessionfleet_jobs_total", "kind" => env.kind.as_str(), "outcome" => "dead_lettered").increment(1);
                return Ok(Settled::DeadLettered);
            }
        }
        let delivery = Some((q, task_id));
        let started_at = Utc::now();
        let clock = Instant::now();
        let outcome = runner::execute(&env, deps).await;
        let elapsed = clock.elapsed();
        // A deferral did no work (a busy lease): timing it would swamp the real durations.
        if !matches!(outcome, JobOutcome::Deferred { .. }) {
            metrics::histogram!("sessionfleet_job_duration_seconds", "kind" => env.kind.as_str()).record(elapsed.as_secs_f64());
        }
        let result = |outcome: ResultOutcome, report: serde_json::Value, error: Option<String>, rows: u64| JobResult {
            job_id: env.job_id,
            run_id: env.run_id,
            part: env.part,
            kind: env.kind,
            target: env.target.clone(),
            outcome,
            report,
            error,
            attempts: env.attempt,
            worker: deps.worker_name.clone(),
            started_at,
            finished_at: Utc::now(),
            duration_ms: elapsed.as_millis() as u64,
            rows_affected: rows,
        };
        let settled = async { Ok::<Settled, QueueError>(match outcome {
            JobOutcome::Done { report, rows_affected } => {
                queue.record_delivery_result(&result(ResultOutcome::Succeeded, report, None, rows_affected), delivery).await?;
                count_rows(&env, rows_affected);
                // Diagnostic jobs can run by the thousand per second: keep them out of info logs.
                if env.kind.is_diagnostic() {
                    tracing::debug!(duration_ms = elapsed.as_millis() as u64, "job succeeded");
                } else {
                    tracing::info!(duration_ms = elapsed.as_millis() as u64, rows_affected, "job succeeded");
                }
                Settled::Succeeded
            }
            JobOutcome::Continue { report, rows_affected, next, delay } => {
                // Continuation first: if we die before recording, the redelivered part yields
                // the same continuation (same job id and dedupe key), which is then dropped.
                let enq = queue.enqueue_with(&next, EnqueueOptions { delay }).await?;
                queue.record_delivery_result(&result(ResultOutcome::Continued, report, None, rows_affected), delivery).await?;
                count_rows(&env, rows_affected);
                tracing::info!(next_job = %next.job_id, next_part = next.part, duplicate = !enq.accepted, "part done; continuation enqueued");
                Settled::Continued
            }
            JobOutcome::Deferred { delay, reason } => {
                let now = Utc::now();
                let since = env.deferred_since.unwrap_or(now);
                let delay = deferral_delay(delay, (now - since).to_std().unwrap_or_default());
                let mut again = env.clone();
                again.deferred_since = Some(since);
                again.dedupe_key = None; // the original still holds the marker
                queue.enqueue_with(&again, EnqueueOptions { delay: Some(delay) }).await?;
                end_delivery(deps, q, task_id).await;
                tracing::info!(delay_ms = delay.as_millis() as u64, %reason, "deferred");
                Settled::Deferred
            }
            JobOutcome::Failed { error, retryable } if retryable && env.attempt < max_attempts(env.kind) => {
                let mut again = env.clone();
                again.attempt += 1;
                again.deferred_since = None;
                again.dedupe_key = None;
                let delay = retry_delay(again.attempt);
                queue.enqueue_with(&again, EnqueueOptions { delay: Some(delay) }).await?;
                end_delivery(deps, q, task_id).await;
                tracing::warn!(%error, next_attempt = again.attempt, delay_ms = delay.as_millis() as u64, "failed; will retry");
                Settled::Retrying(again.attempt)
            }
            JobOutcome::Failed { error, retryable } => {
                let reason = if retryable {
                    format!("gave up after {} attempts: {error}", env.attempt)
                } else {
                    error.clone()
                };
                // Dead letter first: a redelivery after a crash between the two finds no result
                // and fails again, where the other order would skip it and lose the dead letter.
                queue.add_dead_letter(&DeadLetter::failed(&env, task_id, reason.clone(), &deps.worker_name)).await?;
                queue.record_delivery_result(&result(ResultOutcome::Failed, serde_json::Value::Null, Some(reason.clone()), 0), delivery).await?;
                tracing::error!(%reason, "job failed; dead-lettered");
                Settled::DeadLettered
            }
        }) }
        .await;
        // Not settled (Redis trouble): apalis puts the delivery back. This process lived, so
        // its end is counted if it still can be; else it would read as a worker death.
        if settled.is_err() {
            end_delivery(deps, q, task_id).await;
        }
        let settled = settled?;
        metrics::counter!("sessionfleet_jobs_total", "kind" => env.kind.as_str(), "outcome" => settled.as_str()).increment(1);
        Ok(settled)
    }
    .instrument(span)
    .await
}

/// Ends a delivery that records no result (put back as a new task). Best effort: once the
/// new task is enqueued, failing the delivery would have apalis put this one back too, and
/// the job would run twice; a lost end only counts as one death against the job's limit.
async fn end_delivery(deps: &RunnerDeps, q: QueueClass, task_id: &str) {
    if let Err(e) = deps.queue.end_delivery(q, task_id).await {
        tracing::warn!(error = %e, "could not count the end of a delivery");
    }
}

fn count_rows(env: &JobEnvelope, rows: u64) {
    if rows > 0 {
        metrics::counter!("sessionfleet_rows_affected_total", "kind" => env.kind.as_str())
            .increment(rows);
    }
}

async fn dead_letter_undecodable(
    deps: &RunnerDeps,
    q: QueueClass,
    task_id: &str,
    payload: &[u8],
    reason: String,
) -> Result<Settled, QueueError> {
    tracing::warn!(queue = q.name(), task_id, %reason, "undecodable job; dead-lettered");
    deps.queue
        .add_dead_letter(&DeadLetter::undecodable(
            q,
            task_id,
            payload,
            reason,
            &deps.worker_name,
        ))
        .await?;
    metrics::counter!("sessionfleet_jobs_total", "kind" => "unknown", "outcome" => "dead_lettered")
        .increment(1);
    Ok(Settled::DeadLettered)
}

#[cfg(test)]
mod deferral_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_deferral_grows_with_the_wait_up_to_its_cap() {
        let busy = Duration::from_secs(2);
        assert_eq!(deferral_delay(busy, Duration::ZERO), busy);
        assert_eq!(deferral_delay(busy, Duration::from_secs(8)), busy);
        assert_eq!(
            deferral_delay(busy, Duration::from_secs(160)),
            Duration::from_secs(20)
        );
        assert_eq!(
            deferral_delay(busy, Duration::from_secs(6 * 3600)),
            MAX_DEFERRAL_DELAY
        );
        // A longer ask (a remembered connect failure's rest) is kept.
        let rest = Duration::from_secs(45);
        assert_eq!(deferral_delay(rest, Duration::from_secs(3600)), rest);
        // Handed back at once stays at once.
        assert_eq!(
            deferral_delay(Duration::ZERO, Duration::from_secs(3600)),
            Duration::ZERO
        );
    }
}
