//! Enqueueing: one job or a batch, straight into apalis-redis' structures with our own script.
//!
//! Why not apalis' `push_bulk`: its Rust side gives every task `run_at = max(requested, now)`,
//! so even an immediate job lands in the `scheduled` set, and ~8,000 due entries wedge the
//! queue (notes §2.9). Our script writes the same records apalis reads (`data`, `meta:<id>`,
//! `active` / `scheduled`, `idempotency:<key>`) but puts immediate jobs directly on `active`,
//! sets the dedupe marker with a TTL (defect 1), and publishes one wake-up per call so idle
//! workers pick the job up at once.

use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    ENQUEUE_CHUNK, MAX_DUE_PER_SECOND, PROMOTE_CHUNK, Queue, QueueError, unix_millis, unix_secs,
};
use crate::jobs::{JobEnvelope, QueueClass};

/// Options of one enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnqueueOptions {
    /// Run no earlier than this from now (second resolution). Default: at once.
    pub delay: Option<Duration>,
}

/// What happened to one enqueued job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The envelope's job id.
    pub job_id: Uuid,
    /// The run id.
    pub run_id: Uuid,
    /// The queue task id it travels under (new for every delivery).
    pub task_id: String,
    /// The queue.
    pub queue: QueueClass,
    /// False when a job with the same dedupe key was already enqueued: nothing was added.
    pub accepted: bool,
    /// For a duplicate, the task id of the job that holds the dedupe key.
    pub duplicate_of: Option<String>,
}

// KEYS: 1 data hash, 2 active list, 3 meta prefix, 4 scheduled zset, 5 idempotency prefix
// ARGV: 1 idempotency ttl (s), 2 now (unix s), 3 wake channel,
//       then per task: task_id, payload, run_at (unix s, 0 = now), dedupe key ("" = none)
// Returns per task: "" when added, else the task id holding the dedupe key.
static PUSH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local ttl = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local out = {}
local immediate = 0
for i = 4, #ARGV, 4 do
  local id, payload, run_at, key = ARGV[i], ARGV[i+1], tonumber(ARGV[i+2]), ARGV[i+3]
  local holder = false
  if #key > 0 then
    local marker = KEYS[5] .. ':' .. key
    if not redis.call('set', marker, id, 'NX', 'EX', ttl) then
      holder = redis.call('get', marker) or '?'
    end
  end
  if holder then
    table.insert(out, holder)
  else
    if redis.call('hsetnx', KEYS[1], id, payload) == 1 then
      redis.call('hset', KEYS[3] .. ':' .. id, 'attempts', 0, 'max_attempts', 25, 'status', 'Pending', 'idempotency_key', key)
      if run_at > now then
        redis.call('zadd', KEYS[4], run_at, id)
      else
        redis.call('rpush', KEYS[2], id)
        immediate = immediate + 1
      end
    end
    table.insert(out, '')
  end
end
if immediate > 0 then
  redis.call('publish', ARGV[3], immediate)
end
return out
"#,
    )
});

// Moves up to ARGV[2] due ids from scheduled (KEYS[1]) to active (KEYS[2]).
// ARGV: 1 now (unix s), 2 limit. Returns the number moved.
static PROMOTE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local ids = redis.call('zrangebyscore', KEYS[1], 0, ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
  redis.call('rpush', KEYS[2], unpack(ids))
  redis.call('zrem', KEYS[1], unpack(ids))
end
return #ids
"#,
    )
});

/// The second (the scheduled set's unit) at which a job delayed by `delay` comes due: the
/// first whole second at or after now + `delay`, so a delay is never cut short (truncated to
/// whole seconds, a jittered 1.9 s retry came due at the next second boundary, at times 1 ms
/// later). `None` for no delay.
fn due_second(delay: Duration) -> Option<u64> {
    if delay.is_zero() {
        return None;
    }
    let due_ms = unix_millis().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
    Some(due_ms.div_ceil(1000))
}

impl Queue {
    /// Enqueues one job.
    pub async fn enqueue(&self, env: &JobEnvelope) -> Result<Enqueued, QueueError> {
        self.enqueue_with(env, EnqueueOptions::default()).await
    }

    /// Enqueues one job with options (a delay).
    pub async fn enqueue_with(
        &self,
        env: &JobEnvelope,
        opts: EnqueueOptions,
    ) -> Result<Enqueued, QueueError> {
        let run_at = opts.delay.and_then(due_second).unwrap_or(0);
        let mut out = self.push_chunk(env.queue(), &[(env, run_at)]).await?;
        out.pop()
            .ok_or_else(|| QueueError::Redis("enqueue script returned nothing".into()))
    }

    /// Enqueues many jobs (any mix of queues) in chunks of [`ENQUEUE_CHUNK`], so tens of
    /// thousands at once neither block Redis nor wedge a queue. Results are in input order.
    /// With a delay, jobs are spread over successive seconds so that at most
    /// [`MAX_DUE_PER_SECOND`] come due together.
    pub async fn enqueue_batch(
        &self,
        jobs: Vec<JobEnvelope>,
        opts: EnqueueOptions,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let base = opts.delay.and_then(due_second);
        let mut results = Vec::with_capacity(jobs.len());
        for q in QueueClass::ALL {
            let of_queue: Vec<(usize, &JobEnvelope)> = jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.queue() == q)
                .collect();
            for chunk in of_queue.chunks(ENQUEUE_CHUNK) {
                let items: Vec<(&JobEnvelope, u64)> = chunk
                    .iter()
                    .map(|(i, j)| (*j, base.map_or(0, |b| b + (*i / MAX_DUE_PER_SECOND) as u64)))
                    .collect();
                let done = self.push_chunk(q, &items).await?;
                results.extend(chunk.iter().map(|(i, _)| *i).zip(done));
            }
        }
        results.sort_by_key(|(i, _)| *i);
        Ok(results.into_iter().map(|(_, e)| e).collect())
    }

    async fn push_chunk(
        &self,
        q: QueueClass,
        items: &[(&JobEnvelope, u64)],
    ) -> Result<Vec<Enqueued>, QueueError> {
        for (env, _) in items {
            env.validate()
                .map_err(|e| QueueError::Invalid(e.to_string()))?;
        }
        let keys = &self.keys;
        let mut inv = PUSH.prepare_invoke();
        inv.key(keys.data(q))
            .key(keys.active(q))
            .key(keys.meta_prefix(q))
            .key(keys.scheduled(q))
            .key(keys.idempotency_prefix(q))
            .arg(super::DEDUPE_TTL.as_secs())
            .arg(unix_secs())
            .arg(keys.wake_channel(q));
        let mut task_ids = Vec::with_capacity(items.len());
        for (env, run_at) in items {
            let task_id = Uuid::new_v4().to_string();
            inv.arg(&task_id)
                .arg(env.to_bytes())
                .arg(*run_at)
                .arg(env.dedupe_key.as_deref().unwrap_or(""));
            task_ids.push(task_id);
        }
        let mut c = self.conn.clone();
        let holders: Vec<String> = inv.invoke_async(&mut c).await.map_err(|e| self.err(e))?;
        if holders.len() != items.len() {
            return Err(QueueError::Redis(format!(
                "enqueue script answered {} of {} jobs",
                holders.len(),
                items.len()
            )));
        }
        Ok(items
            .iter()
            .zip(task_ids)
            .zip(holders)
            .map(|(((env, _), task_id), holder)| Enqueued {
                job_id: env.job_id,
                run_id: env.run_id,
                task_id,
                queue: q,
                accepted: holder.is_empty(),
                duplicate_of: (!holder.is_empty()).then_some(holder),
            })
            .collect())
    }

    /// Moves due delayed jobs of `q` to the ready list, [`PROMOTE_CHUNK`] at a time, until
    /// fewer than a chunk remain due (apalis' own fetch then handles the rest safely).
    /// Workers call it every poll interval; it is what keeps a deploy gap or a burst of
    /// retries from growing the due set past apalis' unpack limit. Returns how many moved.
    pub async fn promote_due(&self, q: QueueClass) -> Result<u64, QueueError> {
        let mut moved = 0u64;
        loop {
            let mut c = self.conn.clone();
            let n: u64 = PROMOTE
                .key(self.keys.scheduled(q))
                .key(self.keys.active(q))
                .arg(unix_secs())
                .arg(PROMOTE_CHUNK)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            moved += n;
            if (n as usize) < PROMOTE_CHUNK {
                return Ok(moved);
            }
        }
    }
}
