//! Dead letters: jobs that cannot be decoded, failed for good, or exhausted their attempts.
//! Kept with the reason and the payload until an operator requeues or purges them; the worker
//! never stops over one.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Enqueued, Queue, QueueError, unix_millis};
use crate::jobs::{JobEnvelope, QueueClass};

/// Most dead letters kept; the janitor drops the oldest beyond this.
pub const MAX_DEAD_LETTERS: usize = 100_000;
/// Dead letters removed per command when trimming (so a burst far beyond the cap is trimmed
/// in short steps other clients' commands can pass between, never in one long command;
/// well below Lua's `unpack` limit).
pub const TRIM_CHUNK: usize = 1000;
/// Longest payload excerpt stored for an undecodable job (bytes).
pub const MAX_DEAD_PAYLOAD: usize = 64 * 1024;

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id: the job id when the payload decoded, else `task:<queue task id>`.
    pub id: String,
    /// The queue it came from.
    pub queue: QueueClass,
    /// Why it is here.
    pub reason: String,
    /// The payload as received (lossy UTF-8, truncated to [`MAX_DEAD_PAYLOAD`]).
    pub payload: String,
    /// The decoded envelope, when it decoded.
    pub envelope: Option<JobEnvelope>,
    /// Attempts made.
    pub attempts: u32,
    /// The queue task id of the last delivery.
    pub task_id: String,
    /// The worker that gave up.
    pub worker: String,
    /// When.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A dead letter for a payload that could not be decoded.
    pub fn undecodable(
        queue: QueueClass,
        task_id: &str,
        payload: &[u8],
        reason: String,
        worker: &str,
    ) -> DeadLetter {
        let cut = &payload[..payload.len().min(MAX_DEAD_PAYLOAD)];
        DeadLetter {
            id: format!("task:{task_id}"),
            queue,
            reason,
            payload: String::from_utf8_lossy(cut).into_owned(),
            envelope: None,
            attempts: 1,
            task_id: task_id.to_string(),
            worker: worker.to_string(),
            dead_at: Utc::now(),
        }
    }

    /// A dead letter for a decoded job that failed for good.
    pub fn failed(env: &JobEnvelope, task_id: &str, reason: String, worker: &str) -> DeadLetter {
        DeadLetter {
            id: env.job_id.to_string(),
            queue: env.queue(),
            reason,
            payload: super::envelope_json(env),
            envelope: Some(env.clone()),
            attempts: env.attempt,
            task_id: task_id.to_string(),
            worker: worker.to_string(),
            dead_at: Utc::now(),
        }
    }
}

impl Queue {
    /// Stores a dead letter (replacing one with the same id).
    pub async fn add_dead_letter(&self, d: &DeadLetter) -> Result<(), QueueError> {
        let json = serde_json::to_string(d).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        redis::pipe()
            .hset(self.keys.dead_items(), &d.id, json)
            .ignore()
            .zadd(self.keys.dead_index(), &d.id, unix_millis())
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        metrics::counter!("sessionfleet_dead_letters_total", "queue" => d.queue.name())
            .increment(1);
        Ok(())
    }

    /// Number of dead letters.
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(self.keys.dead_index())
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// The newest `limit` dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.keys.dead_index())
            .arg(0)
            .arg(limit as i64 - 1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.dead_items())
            .arg(&ids)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        raw.into_iter()
            .flatten()
            .map(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| QueueError::Corrupt(format!("dead letter: {e}")))
            })
            .collect()
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, QueueError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys.dead_items()).arg(id);
        self.read_json(&cmd, || format!("dead letter {id}")).await
    }

    /// Puts a dead job back on its queue with a fresh attempt budget and no dedupe key, then
    /// removes the dead letter. Undecodable payloads cannot be requeued. The job's stored
    /// failure goes first: a delivery whose job has a result is skipped as a duplicate, and
    /// the requeued job would never run. (The run's history keeps the failure.)
    pub async fn requeue_dead(&self, id: &str) -> Result<Enqueued, QueueError> {
        let d = self
            .dead_letter(id)
            .await?
            .ok_or_else(|| QueueError::NotFound(format!("no dead letter with id {id}")))?;
        let mut env = d.envelope.ok_or_else(|| {
            QueueError::Invalid(format!(
                "dead letter {id} is not a decodable job ({}); it can only be purged",
                d.reason
            ))
        })?;
        env.attempt = 1;
        env.dedupe_key = None;
        self.forget_result(env.job_id).await?;
        let done = self.enqueue(&env).await?;
        self.purge_dead(Some(id)).await?;
        Ok(done)
    }

    /// Removes one dead letter (`Some(id)`) or all of them (`None`); returns how many.
    pub async fn purge_dead(&self, id: Option<&str>) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        match id {
            Some(id) => {
                let (n, _): (u64, u64) = redis::pipe()
                    .hdel(self.keys.dead_items(), id)
                    .zrem(self.keys.dead_index(), id)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(n)
            }
            None => {
                let n: u64 = redis::cmd("HLEN")
                    .arg(self.keys.dead_items())
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.err(e))?;
                // UNLINK: both may be huge, and Redis frees them in the background.
                redis::pipe()
                    .unlink(self.keys.dead_items())
                    .ignore()
                    .unlink(self.keys.dead_index())
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(n)
            }
        }
    }

    /// Drops the oldest dead letters beyond [`MAX_DEAD_LETTERS`]; returns how many.
    pub(crate) async fn trim_dead_letters(&self) -> Result<u64, QueueError> {
        self.trim_dead_letters_to(MAX_DEAD_LETTERS, TRIM_CHUNK)
            .await
    }

    /// Drops the oldest dead letters beyond `cap`, at most `chunk` per step (each step one
    /// short script, its own round trip, so other clients' commands pass between); returns
    /// how many. Each step measures the excess anew, so janitors trimming at once never drop
    /// more than the excess.
    pub async fn trim_dead_letters_to(&self, cap: usize, chunk: usize) -> Result<u64, QueueError> {
        let chunk = chunk.max(1);
        let mut c = self.conn.clone();
        let mut removed = 0;
        loop {
            let n: u64 = TRIM_STEP
                .key(self.keys.dead_index())
                .key(self.keys.dead_items())
                .arg(cap)
                .arg(chunk)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            removed += n;
            if n < chunk as u64 {
                return Ok(removed);
            }
        }
    }
}

// Removes the oldest of dead-letter index KEYS[1] beyond ARGV[1] entries, at most ARGV[2],
// with their items in hash KEYS[2]; returns how many.
static TRIM_STEP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local excess = redis.call('zcard', KEYS[1]) - tonumber(ARGV[1])
local take = math.min(excess, tonumber(ARGV[2]))
if take <= 0 then return 0 end
local ids = redis.call('zrange', KEYS[1], 0, take - 1)
redis.call('hdel', KEYS[2], unpack(ids))
redis.call('zrem', KEYS[1], unpack(ids))
return #ids
"#,
    )
});

/// The id a dead letter of this job has.
pub fn dead_letter_id(job_id: Uuid) -> String {
    job_id.to_string()
}
