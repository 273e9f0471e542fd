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

/// Payload entries one `HSCAN` step reads.
const SCAN_STEP: usize = 1000;

impl Queue {
    /// Job `job_id` if it waits in a queue: enqueued (or put back for a retry) and without a
    /// result yet. `None` for a job never enqueued here, one that finished, or one whose task
    /// is gone (cleared by the janitor).
    ///
    /// Walks every queue's payloads with `HSCAN` (Redis keeps serving meanwhile): a lookup
    /// costs in proportion to the backlog, where a pointer per job would have cost every
    /// enqueue a write (a third of the batch enqueue rate), for an answer few ask for.
    pub async fn waiting_job(&self, job_id: Uuid) -> Result<Option<WaitingJob>, QueueError> {
        // Between its result and apalis' acknowledgement a finished job is still in flight.
        if self.has_result(job_id).await? {
            return Ok(None);
        }
        let needle = job_id.to_string();
        for queue in QueueClass::ALL {
            let mut tasks = self.tasks_of(queue, job_id, needle.as_bytes()).await?;
            // A retry or deferral is a newer task than the finished delivery before it.
            tasks.sort_by_key(|(_, env)| std::cmp::Reverse(env.attempt));
            for (task_id, env) in tasks {
                if let Some(state) = self.wait_state(queue, &task_id).await? {
                    return Ok(Some(WaitingJob {
                        job_id: env.job_id,
                        run_id: env.run_id,
                        part: env.part,
                        kind: env.kind,
                        target: env.target,
                        attempt: env.attempt,
                        queue,
                        task_id,
                        state,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The tasks of `queue` whose payload is job `job_id` (`needle` is its text, a cheap
    /// filter before decoding).
    async fn tasks_of(
        &self,
        queue: QueueClass,
        job_id: Uuid,
        needle: &[u8],
    ) -> Result<Vec<(String, JobEnvelope)>, QueueError> {
        let mut c = self.conn.clone();
        let mut cursor = "0".to_string();
        let mut found = Vec::new();
        loop {
            let (next, flat): (String, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                .arg(self.keys.data(queue))
                .arg(&cursor)
                .arg("COUNT")
                .arg(SCAN_STEP)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            for pair in flat.chunks_exact(2) {
                let (task, payload) = (&pair[0], &pair[1]);
                if !payload.windows(needle.len()).any(|w| w == needle) {
                    continue;
                }
                if let Ok(env) = JobEnvelope::decode(payload)
                    && env.job_id == job_id
                {
                    found.push((String::from_utf8_lossy(task).into_owned(), env));
                }
            }
            if next == "0" {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// Where task `task_id` of `queue` stands; `None` when it is in none of the places a
    /// waiting task is (a finished delivery awaiting the janitor).
    async fn wait_state(
        &self,
        queue: QueueClass,
        task_id: &str,
    ) -> Result<Option<WaitState>, QueueError> {
        let mut c = self.conn.clone();
        let (due, index, ready, done, workers): WhereItWaits = redis::pipe()
            .zscore(self.keys.scheduled(queue), task_id)
            .cmd("LPOS")
            .arg(self.keys.active(queue))
            .arg(task_id)
            .llen(self.keys.active(queue))
            .sismember(self.keys.done(queue), task_id)
            .zrange(self.keys.apalis_workers(queue), 0, -1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(match (index, due) {
            (Some(i), _) => Some(WaitState::Ready {
                position: i + 1,
                ready,
            }),
            (None, Some(secs)) => Some(WaitState::Delayed {
                due_at: DateTime::from_timestamp(secs as i64, 0).unwrap_or_default(),
            }),
            (None, None) => match self.holder(queue, task_id, &workers).await? {
                Some(worker) => Some(WaitState::Claimed {
                    worker: Some(worker),
                }),
                // Acknowledged: finished (or settled as a retry or deferral, a newer task).
                None if done => None,
                // Taken by a worker no longer registered, before the janitor hands it back.
                None => Some(WaitState::Claimed { worker: None }),
            },
        })
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

/// A task's delayed-set score, ready-list index, the ready list's length, whether it was
/// acknowledged, and the queue's registered workers, as one pipeline reads them.
type WhereItWaits = (Option<f64>, Option<u64>, u64, bool, Vec<String>);
