//! Results and run history: every finished job's result, kept for
//! `SESSION_METRICS_RETENTION_DAYS`, addressable by job id and by run id, plus a bounded
//! per-target list of recent runs that status and trends read.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Queue, QueueError};
use crate::jobs::{JobKind, QueueClass};

/// Entries kept in a target's history list.
pub const HISTORY_LEN: usize = 200;
/// How often [`Queue::wait_for_result`] looks, at most.
pub const WAIT_POLL_MAX: Duration = Duration::from_millis(200);

/// Results read per `MGET` by [`Queue::run_results`] and [`Queue::new_run_results`].
pub const MGET_CHUNK: usize = 500;

/// How far a reader of one run's results has got ([`Queue::new_run_results`]): the position
/// in the run's list of job ids, and the parts already returned. Start from `default()`.
#[derive(Debug, Clone, Default)]
pub struct RunCursor {
    next: usize,
    seen: std::collections::HashSet<Uuid>,
}

impl RunCursor {
    /// How many of the run's list entries have been read.
    pub fn position(&self) -> usize {
        self.next
    }

    /// How many parts have been returned.
    pub fn parts_read(&self) -> usize {
        self.seen.len()
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultOutcome {
    /// All work done.
    Succeeded,
    /// This part is done and a continuation was enqueued under the same run id.
    Continued,
    /// Failed for good (not retryable, or attempts exhausted); also dead-lettered.
    Failed,
}

impl ResultOutcome {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultOutcome::Succeeded => "succeeded",
            ResultOutcome::Continued => "continued",
            ResultOutcome::Failed => "failed",
        }
    }
}

/// One finished job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Job id.
    pub job_id: Uuid,
    /// Run id.
    pub run_id: Uuid,
    /// Continuation index.
    pub part: u32,
    /// Kind.
    pub kind: JobKind,
    /// Target name.
    pub target: String,
    /// How it ended.
    pub outcome: ResultOutcome,
    /// The operation's report (JSON), `null` on failure.
    pub report: serde_json::Value,
    /// The error of a failed job.
    pub error: Option<String>,
    /// Attempts used (1 = first try).
    pub attempts: u32,
    /// Worker that ran the last attempt.
    pub worker: String,
    /// When the last attempt started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// Duration of the last attempt, milliseconds.
    pub duration_ms: u64,
    /// Rows the job changed (deleted, updated).
    pub rows_affected: u64,
}

/// One line of a target's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Job id.
    pub job_id: Uuid,
    /// Run id.
    pub run_id: Uuid,
    /// Continuation index.
    pub part: u32,
    /// Kind.
    pub kind: JobKind,
    /// How it ended.
    pub outcome: ResultOutcome,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// Duration, milliseconds.
    pub duration_ms: u64,
    /// Rows changed.
    pub rows_affected: u64,
}

impl JobResult {
    /// The result of a job whose handler ended without recording one (a panic the queue
    /// caught): failed, with `reason`, timed at the moment it was found.
    pub fn failed_unrecorded(
        env: &crate::jobs::JobEnvelope,
        reason: String,
        worker: &str,
    ) -> JobResult {
        let now = Utc::now();
        JobResult {
            job_id: env.job_id,
            run_id: env.run_id,
            part: env.part,
            kind: env.kind,
            target: env.target.clone(),
            outcome: ResultOutcome::Failed,
            report: serde_json::Value::Null,
            error: Some(reason),
            attempts: env.attempt,
            worker: worker.to_string(),
            started_at: now,
            finished_at: now,
            duration_ms: 0,
            rows_affected: 0,
        }
    }
}

impl From<&JobResult> for RunSummary {
    fn from(r: &JobResult) -> Self {
        RunSummary {
            job_id: r.job_id,
            run_id: r.run_id,
            part: r.part,
            kind: r.kind,
            outcome: r.outcome,
            finished_at: r.finished_at,
            duration_ms: r.duration_ms,
            rows_affected: r.rows_affected,
        }
    }
}

impl Queue {
    /// Stores a result under its job id and run id (with the retention TTL) and, for
    /// non-diagnostic kinds, pushes it onto the target's bounded history. One round trip.
    pub async fn record_result(&self, r: &JobResult) -> Result<(), QueueError> {
        self.record_delivery_result(r, None).await
    }

    /// [`Self::record_result`] that also ends delivery `(queue, task id)`, begun with
    /// [`Self::begin_delivery`], in the same round trip.
    pub async fn record_delivery_result(
        &self,
        r: &JobResult,
        delivery: Option<(QueueClass, &str)>,
    ) -> Result<(), QueueError> {
        let ttl = self.retention.as_secs().max(1);
        let json = serde_json::to_string(r).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let mut p = redis::pipe();
        p.set_ex(self.keys.result(&r.job_id), json, ttl).ignore();
        p.rpush(self.keys.run(&r.run_id), r.job_id.to_string())
            .ignore();
        p.expire(self.keys.run(&r.run_id), ttl as i64).ignore();
        if !r.kind.is_diagnostic() {
            let line = serde_json::to_string(&RunSummary::from(r))
                .map_err(|e| QueueError::Corrupt(e.to_string()))?;
            let h = self.keys.history(&r.target);
            p.lpush(&h, line).ignore();
            p.ltrim(&h, 0, HISTORY_LEN as isize - 1).ignore();
            p.expire(&h, ttl as i64).ignore();
        }
        if let Some((q, task_id)) = delivery {
            super::janitor::end_delivery_in(&mut p, self.meta_key(q, task_id), self.retention);
        }
        let mut c = self.conn.clone();
        p.query_async::<()>(&mut c).await.map_err(|e| self.err(e))
    }

    /// Whether job `job_id` has a retained result (a redelivery of a finished job). Cheaper
    /// than [`Self::result`]: nothing travels back but a flag.
    pub async fn has_result(&self, job_id: Uuid) -> Result<bool, QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(self.keys.result(&job_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// Removes the stored result of one job, so that it can run again (a requeued dead
    /// letter); its run keeps listing it, and takes the new result when there is one.
    pub async fn forget_result(&self, job_id: Uuid) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.keys.result(&job_id))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// The result of one job, if it finished and is still retained.
    pub async fn result(&self, job_id: Uuid) -> Result<Option<JobResult>, QueueError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.keys.result(&job_id));
        self.read_json(&cmd, || format!("result {job_id}")).await
    }

    /// The results of a run's parts, in completion order: one `LRANGE` and one `MGET` per
    /// [`MGET_CHUNK`] parts.
    pub async fn run_results(&self, run_id: Uuid) -> Result<Vec<JobResult>, QueueError> {
        self.new_run_results(run_id, &mut RunCursor::default())
            .await
    }

    /// The results of a run's parts recorded since `cursor` last read (all of them on a new
    /// cursor), in completion order, advancing `cursor`. A poll costs the new parts only:
    /// `LRANGE` from where the cursor stands, then `MGET` of the new job ids. A part recorded
    /// twice (a redelivery) comes back once; a listed part whose result is gone (expired, or
    /// forgotten for a requeue) is left out, and read when it is recorded again.
    pub async fn new_run_results(
        &self,
        run_id: Uuid,
        cursor: &mut RunCursor,
    ) -> Result<Vec<JobResult>, QueueError> {
        let mut c = self.conn.clone();
        let (length, listed): (usize, Vec<String>) = redis::pipe()
            .cmd("LLEN")
            .arg(self.keys.run(&run_id))
            .cmd("LRANGE")
            .arg(self.keys.run(&run_id))
            .arg(cursor.next)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        // A list shorter than the cursor lost entries (a failover to a replica that had not
        // seen the last pushes): parts recorded again land below the cursor, so read it all
        // again; the ids already seen are skipped.
        let listed = if length < cursor.next {
            cursor.next = 0;
            redis::cmd("LRANGE")
                .arg(self.keys.run(&run_id))
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?
        } else {
            listed
        };
        let mut wanted: Vec<Uuid> = Vec::new();
        let mut listed_now = std::collections::HashSet::new();
        for id in &listed {
            let Ok(job_id) = Uuid::parse_str(id) else {
                continue;
            };
            if !cursor.seen.contains(&job_id) && listed_now.insert(job_id) {
                wanted.push(job_id);
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(MGET_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|id| self.keys.result(id)).collect();
            let raw: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            for (job_id, json) in chunk.iter().zip(raw) {
                let Some(json) = json else {
                    continue;
                };
                let r: JobResult = serde_json::from_str(&json)
                    .map_err(|e| QueueError::Corrupt(format!("result {job_id}: {e}")))?;
                out.push(r);
            }
        }
        // Advanced only now: a failed read leaves the cursor where it was.
        cursor.next += listed.len();
        cursor.seen.extend(out.iter().map(|r| r.job_id));
        Ok(out)
    }

    /// Waits until job `job_id` has a result, polling with a growing interval.
    pub async fn wait_for_result(
        &self,
        job_id: Uuid,
        timeout: Duration,
    ) -> Result<JobResult, QueueError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(r) = self.result(job_id).await? {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueueError::Timeout(job_id.to_string(), timeout));
            }
            tokio::time::sleep(
                pause.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            pause = (pause * 2).min(WAIT_POLL_MAX);
        }
    }

    /// Waits until run `run_id` has a final (not `continued`) result and returns all parts.
    pub async fn wait_for_run(
        &self,
        run_id: Uuid,
        timeout: Duration,
    ) -> Result<Vec<JobResult>, QueueError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        let mut cursor = RunCursor::default();
        let mut parts = Vec::new();
        loop {
            parts.extend(self.new_run_results(run_id, &mut cursor).await?);
            if parts.iter().any(|r| r.outcome != ResultOutcome::Continued) {
                return Ok(parts);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueueError::Timeout(format!("run {run_id}"), timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WAIT_POLL_MAX);
        }
    }

    /// The start of the retention period: history older than this is not reported.
    pub fn history_kept_since(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::Duration::from_std(self.retention)
            .ok()
            .and_then(|kept| chrono::Utc::now().checked_sub_signed(kept))
    }

    /// The `n` most recent runs of a target, newest first, within the retention period.
    ///
    /// Every new result renews the history list's expiry, so on a busy target its oldest
    /// lines outlive `SESSION_METRICS_RETENTION_DAYS` until the length cap trims them: they
    /// are left out here, so nothing reports from runs older than the retention promises.
    pub async fn recent_runs(&self, target: &str, n: usize) -> Result<Vec<RunSummary>, QueueError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let lines: Vec<String> = redis::cmd("LRANGE")
            .arg(self.keys.history(target))
            .arg(0)
            .arg(n as i64 - 1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let oldest = self.history_kept_since();
        let mut runs = Vec::with_capacity(lines.len());
        for line in &lines {
            let run: RunSummary = serde_json::from_str(line)
                .map_err(|e| QueueError::Corrupt(format!("history of {target}: {e}")))?;
            if oldest.is_none_or(|oldest| run.finished_at >= oldest) {
                runs.push(run);
            }
        }
        Ok(runs)
    }
}
