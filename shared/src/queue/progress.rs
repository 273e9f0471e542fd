//! A running part's live progress in Redis, so the CLI waiting for a run (or `jobs show`)
//! can say where it stands before the part ends: one short-lived JSON string per run,
//! written at most every [`PUBLISH_INTERVAL`] and removed when the part ends.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{Queue, QueueError};
use crate::jobs::JobEnvelope;
use crate::ops::progress::Snapshot;

/// How often a running part's progress is written at most.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a written progress lives without a refresh: a part whose worker died leaves
/// nothing behind for long.
pub const PROGRESS_TTL: Duration = Duration::from_secs(60);
/// How often a running part's progress is written again when nothing changed (a long
/// statement, an operation that reports no batches), so it outlives no part and no part
/// outlives it.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(20);

/// Deletes the job's run pointer, and the run's progress only while it is still the given
/// part's: a part of the same run that another worker took over meanwhile keeps its own.
const DELETE_IF_OWN: &str = r"
redis.call('DEL', KEYS[2])
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).job_id == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The part of a run that is running now, and what it has committed so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveProgress {
    /// The running part's job id.
    pub job_id: Uuid,
    /// Its part number (0 for the first).
    pub part: u32,
    /// Who runs it (worker name, or the CLI in `--local` mode).
    pub worker: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When this was written.
    pub updated_at: DateTime<Utc>,
    /// What it has committed so far.
    #[serde(flatten)]
    pub done: Snapshot,
}

impl LiveProgress {
    /// A part of `env` that `worker` starts now.
    pub fn starting(env: &JobEnvelope, worker: &str) -> LiveProgress {
        let now = Utc::now();
        LiveProgress {
            job_id: env.job_id,
            part: env.part,
            worker: worker.to_string(),
            started_at: now,
            updated_at: now,
            done: Snapshot::default(),
        }
    }
}

impl Queue {
    /// Writes `live` as the progress of run `run_id`.
    pub async fn set_progress(&self, run_id: Uuid, live: &LiveProgress) -> Result<(), QueueError> {
        let json = serde_json::to_string(live)
            .map_err(|e| QueueError::Corrupt(format!("progress of run {run_id}: {e}")))?;
        let mut c = self.conn.clone();
        let ttl = PROGRESS_TTL.as_secs();
        redis::pipe()
            .cmd("SET")
            .arg(self.keys.progress(&run_id))
            .arg(json)
            .arg("EX")
            .arg(ttl)
            .ignore()
            .cmd("SET")
            .arg(self.keys.progress_run(&live.job_id))
            .arg(run_id.to_string())
            .arg("EX")
            .arg(ttl)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// The run job `job_id` belongs to, while it runs and publishes its progress.
    pub async fn running_job_run(&self, job_id: Uuid) -> Result<Option<Uuid>, QueueError> {
        let mut c = self.conn.clone();
        let run: Option<String> = redis::cmd("GET")
            .arg(self.keys.progress_run(&job_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(run.and_then(|r| r.parse().ok()))
    }

    /// The progress of run `run_id`'s running part, if one is running.
    pub async fn progress(&self, run_id: Uuid) -> Result<Option<LiveProgress>, QueueError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.keys.progress(&run_id));
        self.read_json(&cmd, || format!("progress of run {run_id}"))
            .await
    }

    /// Removes run `run_id`'s progress if it is still that of job `job_id`.
    async fn clear_progress(&self, run_id: Uuid, job_id: Uuid) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        redis::Script::new(DELETE_IF_OWN)
            .key(self.keys.progress(&run_id))
            .key(self.keys.progress_run(&job_id))
            .arg(job_id.to_string())
            .invoke_async::<i64>(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

/// Publishing one part's progress while it runs.
pub struct Publishing {
    task: JoinHandle<()>,
    queue: Queue,
    run_id: Uuid,
    job_id: Uuid,
}

impl Publishing {
    /// Writes `live` now, then each new snapshot from `updates` (at most every
    /// [`PUBLISH_INTERVAL`]), and again every [`REFRESH_INTERVAL`] when nothing changed. A
    /// failed write is logged and the next one tried: progress is for people watching, never
    /// a reason to stop the work.
    pub fn start(
        queue: &Queue,
        run_id: Uuid,
        mut live: LiveProgress,
        mut updates: watch::Receiver<Snapshot>,
    ) -> Publishing {
        let q = queue.clone();
        let job_id = live.job_id;
        let task = tokio::spawn(async move {
            loop {
                live.done = *updates.borrow_and_update();
                live.updated_at = Utc::now();
                if let Err(e) = q.set_progress(run_id, &live).await {
                    tracing::debug!(error = %e, "could not publish progress");
                }
                tokio::time::sleep(PUBLISH_INTERVAL).await;
                let wait = REFRESH_INTERVAL.saturating_sub(PUBLISH_INTERVAL);
                if let Ok(Err(_)) = tokio::time::timeout(wait, updates.changed()).await {
                    return;
                }
            }
        });
        Publishing {
            task,
            queue: queue.clone(),
            run_id,
            job_id,
        }
    }

    /// Stops publishing and removes the progress (unless another part of the run has taken
    /// it over): the part's result takes over.
    pub async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Err(e) = self.queue.clear_progress(self.run_id, self.job_id).await {
            tracing::debug!(error = %e, "could not remove the progress; it expires");
        }
    }
}
