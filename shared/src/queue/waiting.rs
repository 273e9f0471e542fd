//! Where a job that has no result yet waits: ready in its queue (and how many are ahead of
//! it), delayed until a time, or taken by a worker that has not started it (a part waiting for
//! its turn, or for the database lease). A job that runs publishes its progress instead
//! ([`super::progress`]); one that finished has a result.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Queue, QueueError};
use crate::jobs::{JobEnvelope, JobKind, QueueClass};

/// A job found in its queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingJob {
    /// The job.
    pub job_id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its part number (0 for the first).
    pub part: u32,
    /// What it does.
    pub kind: JobKind,
    /// The database it is for.
    pub target: String,
    /// Its attempt (1 for the first; a retry waits with the next number).
    pub attempt: u32,
    /// The queue it waits in.
    pub queue: QueueClass,
    /// The queue task it travels as (a retry or deferral travels as a new one).
    pub task_id: String,
    /// Where it stands.
    #[serde(flatten)]
    pub state: WaitState,
}

/// Where a waiting job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WaitState {
    /// In the ready list: `position` (1 = next) of `ready` jobs.
    Ready {
        /// Its place in line, 1 being the next job a worker takes.
        position: u64,
        /// Jobs in the ready list.
        ready: u64,
    },
    /// Delayed (a retry, a deferral, a continuation's pause) until `due_at`.
    Delayed {
        /// When it comes due (second resolution).
        due_at: DateTime<Utc>,
    },
    /// Taken off the queue by a worker and not started yet; `worker` when a registered
    /// worker holds it.
    Claimed {
        /// The worker holding it.
        worker: Option<String>,
    },
}

impl Queue {
    /// Job `job_id` if it waits in a queue: enqueued (or put back for a retry) and without a
    /// result yet. `None` for a job never enqueued here, one that finished, or one whose task
    /// is gone (cleared by the janitor).
    pub async fn waiting_job(&self, job_id: Uuid) -> Result<Option<WaitingJob>, QueueError> {
        let mut c = self.conn.clone();
        let pointer: Option<String> = redis::cmd("GET")
            .arg(self.keys.queued(&job_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let Some((queue, task_id)) = pointer.as_deref().and_then(parse_pointer) else {
            return Ok(None);
        };
        let (payload, due, index, ready, workers): WhereItWaits = redis::pipe()
            .hget(self.keys.data(queue), task_id)
            .zscore(self.keys.scheduled(queue), task_id)
            .cmd("LPOS")
            .arg(self.keys.active(queue))
            .arg(task_id)
            .llen(self.keys.active(queue))
            .zrange(self.keys.apalis_workers(queue), 0, -1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let Some(env) = payload.and_then(|p| JobEnvelope::decode(&p).ok()) else {
            return Ok(None);
        };
        let state = match (index, due) {
            (Some(i), _) => WaitState::Ready {
                position: i + 1,
                ready,
            },
            (None, Some(secs)) => WaitState::Delayed {
                due_at: DateTime::from_timestamp(secs as i64, 0).unwrap_or_default(),
            },
            (None, None) => WaitState::Claimed {
                worker: self.holder(queue, task_id, &workers).await?,
            },
        };
        Ok(Some(WaitingJob {
            job_id: env.job_id,
            run_id: env.run_id,
            part: env.part,
            kind: env.kind,
            target: env.target,
            attempt: env.attempt,
            queue,
            task_id: task_id.to_string(),
            state,
        }))
    }

    /// Which of `workers` (apalis' registered workers of `queue`) holds `task_id` in flight.
    async fn holder(
        &self,
        queue: QueueClass,
        task_id: &str,
        workers: &[String],
    ) -> Result<Option<String>, QueueError> {
        if workers.is_empty() {
            return Ok(None);
        }
        let mut p = redis::pipe();
        for w in workers {
            p.sismember(self.keys.inflight(queue, w), task_id);
        }
        let mut c = self.conn.clone();
        let held: Vec<bool> = p.query_async(&mut c).await.map_err(|e| self.err(e))?;
        Ok(workers
            .iter()
            .zip(held)
            .find_map(|(w, h)| h.then(|| w.clone())))
    }
}

/// A task's payload, delayed-set score, ready-list index, the ready list's length and the
/// queue's registered workers, as one pipeline reads them.
type WhereItWaits = (Option<Vec<u8>>, Option<f64>, Option<u64>, u64, Vec<String>);

/// `"<queue> <task id>"`, as the enqueue script writes it.
fn parse_pointer(value: &str) -> Option<(QueueClass, &str)> {
    let (queue, task) = value.split_once(' ')?;
    Some((QueueClass::parse(queue)?, task))
}
