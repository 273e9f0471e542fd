//! The janitor: removes what apalis-redis 1.0.0 leaves behind (notes §2.9 "Leaks") and hands
//! jobs of dead workers back when no live worker on their queue would. Every worker process
//! runs [`Queue::janitor_pass`] every [`JANITOR_INTERVAL`]; passes on several workers at once
//! are harmless (every step is idempotent and `SPOP` hands out disjoint ids).
//!
//! Two guards around hand-backs live here as well:
//! - **Poison jobs.** A job that kills its worker process (OOM, SIGKILL) never reaches
//!   `settle`, so its envelope's `attempt` never rises, and both hand-back paths — our
//!   janitor's `RECOVER` and apalis' own orphan re-enqueue on a peer's heartbeat, which we
//!   cannot change — put the same task back unchanged. So the count is kept where every path
//!   ends: settle begins each delivery with [`Queue::begin_delivery`] (in place of its
//!   duplicate check) and ends it with its result ([`Queue::record_delivery_result`]) or
//!   [`Queue::end_delivery`], and a delivery that finds [`worker_death_limit`]
//!   unfinished predecessors dead-letters the job instead of running it.
//!   (An apalis worker that dies on a Redis error drops its handlers while their jobs run on;
//!   a redelivery that overlaps such a job counts it as a death too.)
//! - **Malformed tasks.** An id on a ready list whose payload or meta record apalis cannot
//!   decode fails apalis' whole fetch (the batch is already moved to the worker's inflight
//!   set), which kills the apalis worker; 15 s later the id is handed back and the loop
//!   starts over. [`Queue::bury_malformed_ready`] checks the head of the ready list before
//!   fetches see it, and [`Queue::bury_malformed_claimed`] the inflight set of a worker that
//!   died (the janitor before a hand-back, the worker process when an apalis worker fails),
//!   so such an id costs at most one apalis restart and ends as a dead letter.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::keys::SLOT_TAG;
use super::{
    DeadLetter, HEARTBEAT_INTERVAL, JobResult, MISSED_HEARTBEATS, Queue, QueueError, max_attempts,
    unix_secs,
};
use crate::jobs::{JobEnvelope, JobKind, QueueClass};
use crate::scan::{SCAN_COUNT, glob_escape};

/// Time between janitor passes of one worker process.
pub const JANITOR_INTERVAL: Duration = Duration::from_secs(10);
/// Finished task ids removed per step.
pub const SWEEP_CHUNK: usize = 1000;
/// Steps per queue per pass (bounds one pass's work); also the `SCAN` steps of one pass's
/// walk for orphaned worker metadata ([`Queue::drop_orphan_worker_metadata`]).
pub const SWEEP_STEPS: usize = 50;
/// Fetches' worth of ids at the head of a ready list [`Queue::bury_malformed_ready`] checks:
/// the next two fetches of that queue's batch ([`Queue::ready_check_depth`]). A queue
/// fetched faster than the check runs can outrun it; the id then fails one fetch and
/// [`Queue::bury_malformed_claimed`] catches it.
pub const READY_CHECK_FETCHES: usize = 2;
/// Field of apalis' per-task meta hash counting deliveries of the task that began and have
/// not ended (see [`Queue::begin_delivery`]). apalis passes unknown meta fields through as
/// task metadata, and the janitor deletes the hash with the task.
pub const UNFINISHED_FIELD: &str = "sf_unfinished";

/// Deliveries of a job of `kind` whose worker process died while running them (OOM,
/// SIGKILL, a shutdown that outlasted its timeout) before the next delivery dead-letters
/// the job instead of running it. The kind's attempt budget ([`max_attempts`]): a death is
/// charged like a failed attempt, but on a budget of its own, because it never reaches the
/// envelope's `attempt`.
pub fn worker_death_limit(kind: JobKind) -> u32 {
    max_attempts(kind)
}

/// What one pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JanitorReport {
    /// Finished tasks whose ids, data and meta were deleted.
    pub finished_tasks: u64,
    /// Tasks apalis itself gave up on, moved into our dead letters.
    pub apalis_dead: u64,
    /// apalis worker entries of dead workers removed.
    pub dead_workers: u64,
    /// Jobs of dead workers handed back to their queue.
    pub recovered_jobs: u64,
    /// Tasks of dead workers that apalis could not fetch, dead-lettered instead of handed back.
    pub malformed_tasks: u64,
    /// `workers:metadata:*` hashes of gone workers deleted.
    pub worker_metadata: u64,
    /// Stale records of our own registry deleted.
    pub registry_records: u64,
    /// Oldest dead letters dropped beyond the cap.
    pub dead_letters_trimmed: u64,
}

/// What `drop_dead_workers` did on one queue.
#[derive(Debug, Default)]
struct DeadWorkers {
    workers: u64,
    recovered: u64,
    malformed: u64,
}

/// What to do with a delivery, by [`Queue::begin_delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStart {
    /// Run it, and end it with its result ([`Queue::record_delivery_result`]) or
    /// [`Queue::end_delivery`].
    Run,
    /// The job already has a result (a redelivery after a lost acknowledgement): skip it.
    Duplicate,
    /// Its workers died too often while running it: it is dead-lettered and recorded failed;
    /// acknowledge it without running it.
    Buried,
}

// Re-enqueues the inflight set of a worker (KEYS[1]) onto active (KEYS[2]) and removes the
// worker (ARGV[1]) from the workers set (KEYS[3]) if its heartbeat is still <= ARGV[2].
static RECOVER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local score = redis.call('zscore', KEYS[3], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return -1 end
local ids = redis.call('smembers', KEYS[1])
if #ids > 0 then
  redis.call('rpush', KEYS[2], unpack(ids))
  redis.call('del', KEYS[1])
end
redis.call('zrem', KEYS[3], ARGV[1])
return #ids
"#,
    )
});

// Deletes each metadata hash KEYS[2i] whose worker ARGV[i] has no entry in its queue's apalis
// workers set KEYS[2i-1]; returns how many went. One script, so a worker registering in
// between cannot lose its hash.
static DROP_UNREGISTERED_METADATA: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = 0
for i, name in ipairs(ARGV) do
  if not redis.call('zscore', KEYS[2 * i - 1], name) then
    n = n + redis.call('del', KEYS[2 * i])
  end
end
return n
"#,
    )
});

/// Adds a delivery's end to pipeline `p`: decrements the start count in the task's meta hash
/// `meta`, as plain commands inside the result's own round trip (a script there cost the
/// fleet's no-op rate about a tenth). The hash exists at this point, since apalis sweeps a
/// task only after its acknowledgement, which follows; should a stray redelivery have been
/// acknowledged and swept first, the expiry keeps the re-created hash from staying for good.
pub(crate) fn end_delivery_in(p: &mut redis::Pipeline, meta: String, expiry: Duration) {
    p.hincr(&meta, UNFINISHED_FIELD, -1).ignore();
    p.expire(&meta, expiry.as_secs().max(1) as i64).ignore();
}

// Why apalis-redis 1.0.0's fetch (`deserialize_with_meta`) would fail on task `id`, or nil.
// KEYS[2] is the data hash, ARGV[1] the meta prefix. It needs a non-empty id, a payload, a
// meta hash with `attempts` and `max_attempts` that parse as u32 and a known `status`. (It
// also fails on meta that is not UTF-8, which this does not check.)
const MALFORMED_FN: &str = r#"
local statuses = {Pending = true, Queued = true, Running = true, Done = true, Failed = true, Killed = true}
local function cut(v) return string.sub(v, 1, 40) end
local function malformed(id)
  if id == '' then return 'an empty task id' end
  if redis.call('hexists', KEYS[2], id) == 0 then return 'no payload' end
  local meta = ARGV[1] .. ':' .. id
  local kind = redis.call('type', meta)['ok']
  if kind == 'none' then return 'no meta record' end
  if kind ~= 'hash' then return 'a meta record of type ' .. kind end
  local f = redis.call('hmget', meta, 'attempts', 'max_attempts', 'status')
  for i, name in ipairs({'attempts', 'max_attempts'}) do
    local v = f[i]
    if not v then return 'no ' .. name .. ' in its meta record' end
    if not string.match(v, '^%+?%d+$') or tonumber(v) > 4294967295 then
      return name .. ' "' .. cut(v) .. '" in its meta record'
    end
  end
  if not f[3] then return 'no status in its meta record' end
  if not statuses[f[3]] then return 'status "' .. cut(f[3]) .. '" in its meta record' end
  return nil
end
local out = {}
local function found(id, why)
  table.insert(out, id)
  table.insert(out, why)
  table.insert(out, redis.call('hget', KEYS[2], id) or '')
end
"#;

// Removes from the first ARGV[2] ids of the ready list KEYS[1] every id apalis could not
// fetch; returns {id, reason, payload ('' if none), …}.
static MALFORMED_READY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{MALFORMED_FN}
for _, id in ipairs(redis.call('lrange', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  local why = malformed(id)
  if why and redis.call('lrem', KEYS[1], 1, id) == 1 then found(id, why) end
end
return out
"#
    ))
});

// Removes from the inflight set KEYS[1] every id apalis could not fetch; returns as above.
static MALFORMED_CLAIMED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{MALFORMED_FN}
for _, id in ipairs(redis.call('smembers', KEYS[1])) do
  local why = malformed(id)
  if why and redis.call('srem', KEYS[1], id) == 1 then found(id, why) end
end
return out
"#
    ))
});

impl Queue {
    /// One janitor pass over every queue.
    pub async fn janitor_pass(&self, worker: &str) -> Result<JanitorReport, QueueError> {
        let mut r = JanitorReport::default();
        for q in QueueClass::ALL {
            r.finished_tasks += self.sweep_finished(q).await?;
            r.apalis_dead += self.adopt_apalis_dead(q, worker).await?;
            let dead = self.drop_dead_workers(q, worker).await?;
            r.dead_workers += dead.workers;
            r.recovered_jobs += dead.recovered;
            r.malformed_tasks += dead.malformed;
        }
        r.worker_metadata = self.drop_orphan_worker_metadata(SWEEP_STEPS).await?;
        r.registry_records = self.drop_stale_worker_records().await?;
        r.dead_letters_trimmed = self.trim_dead_letters().await?;
        Ok(r)
    }

    /// Deletes ids, payloads and meta of finished tasks (our handler has already stored the
    /// result, so apalis' copy is dead weight that would otherwise grow forever).
    async fn sweep_finished(&self, q: QueueClass) -> Result<u64, QueueError> {
        let mut total = 0;
        for _ in 0..SWEEP_STEPS {
            let mut c = self.conn.clone();
            let ids: Vec<String> = redis::cmd("SPOP")
                .arg(self.keys.done(q))
                .arg(SWEEP_CHUNK)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            if ids.is_empty() {
                break;
            }
            self.delete_tasks(q, &ids).await?;
            total += ids.len() as u64;
            if ids.len() < SWEEP_CHUNK {
                break;
            }
        }
        Ok(total)
    }

    async fn delete_tasks(&self, q: QueueClass, ids: &[String]) -> Result<(), QueueError> {
        let mut p = redis::pipe();
        p.hdel(self.keys.data(q), ids).ignore();
        let meta: Vec<String> = ids
            .iter()
            .map(|id| format!("{}:{id}", self.keys.meta_prefix(q)))
            .collect();
        p.cmd("UNLINK").arg(&meta).ignore();
        let mut c = self.conn.clone();
        p.query_async::<()>(&mut c).await.map_err(|e| self.err(e))
    }

    /// Tasks apalis moved to its own dead set (a handler panic caught by `catch_panic`)
    /// become our dead letters, with apalis' recorded reason. One task that cannot be adopted
    /// (a Redis error on its records) is put back for the next pass; it never costs the
    /// others, which `SPOP` has already taken out of the set.
    async fn adopt_apalis_dead(&self, q: QueueClass, worker: &str) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SPOP")
            .arg(self.keys.apalis_dead(q))
            .arg(SWEEP_CHUNK)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let mut adopted = Vec::with_capacity(ids.len());
        for id in ids {
            match self.adopt_one_apalis_dead(q, &id, worker).await {
                Ok(()) => adopted.push(id),
                Err(e) => {
                    tracing::warn!(queue = q.name(), task_id = %id, error = %e, "cannot dead-letter a task apalis gave up on; trying again next pass");
                    let back: Result<(), _> = redis::cmd("SADD")
                        .arg(self.keys.apalis_dead(q))
                        .arg(&id)
                        .query_async(&mut c)
                        .await;
                    if let Err(e) = back {
                        tracing::error!(queue = q.name(), task_id = %id, error = %self.err(e), "lost a task apalis gave up on: it could not be put back");
                    }
                }
            }
        }
        if !adopted.is_empty() {
            self.delete_tasks(q, &adopted).await?;
        }
        Ok(adopted.len() as u64)
    }

    async fn adopt_one_apalis_dead(
        &self,
        q: QueueClass,
        id: &str,
        worker: &str,
    ) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let payload: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.keys.data(q))
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        // apalis' reason only explains; a meta record we cannot read (not a hash) must not
        // keep the task from becoming a dead letter.
        let reason: Option<String> = match redis::cmd("HGET")
            .arg(self.meta_key(q, id))
            .arg("result")
            .query_async(&mut c)
            .await
        {
            Ok(r) => r,
            Err(e) => Some(format!("its meta record is unreadable: {}", self.err(e))),
        };
        let reason = format!(
            "the queue gave up on it: {}",
            reason.unwrap_or_else(|| "no reason recorded".into())
        );
        self.bury(q, id, &payload.unwrap_or_default(), reason, worker)
            .await
    }

    /// Dead-letters task `task_id` of `q` that will never run, and records a decodable job
    /// failed: the handler never recorded an outcome, and a CLI waiting for the run would
    /// otherwise wait out its whole timeout. A job that already has a result is finished and
    /// this task a stray copy of it: nothing is recorded.
    async fn bury(
        &self,
        q: QueueClass,
        task_id: &str,
        payload: &[u8],
        reason: String,
        worker: &str,
    ) -> Result<(), QueueError> {
        match JobEnvelope::decode(payload) {
            Ok(env) => {
                if self.has_result(env.job_id).await? {
                    return Ok(());
                }
                // Dead letter first, as settle does: a crash between the two leaves no result,
                // so the job is not taken for finished.
                self.add_dead_letter(&DeadLetter::failed(&env, task_id, reason.clone(), worker))
                    .await?;
                self.record_result(&JobResult::failed_unrecorded(&env, reason, worker))
                    .await
            }
            Err(_) => {
                self.add_dead_letter(&DeadLetter::undecodable(
                    q, task_id, payload, reason, worker,
                ))
                .await
            }
        }
    }

    pub(crate) fn meta_key(&self, q: QueueClass, task_id: &str) -> String {
        format!("{}:{task_id}", self.keys.meta_prefix(q))
    }

    /// Called before running delivery `task_id` of `q` (`env`, decoded from `payload`):
    /// skips a job that already has a result, counts the delivery's start and says whether
    /// to run it. A job whose earlier deliveries began and never ended [`worker_death_limit`]
    /// times or more — each a worker process that died running it — is dead-lettered and
    /// recorded failed instead. One round trip in the usual case.
    pub async fn begin_delivery(
        &self,
        q: QueueClass,
        task_id: &str,
        payload: &[u8],
        env: &JobEnvelope,
        worker: &str,
    ) -> Result<DeliveryStart, QueueError> {
        let mut c = self.conn.clone();
        // Plain commands in the round trip of the duplicate check, where a script cost the
        // fleet's no-op rate about a tenth. The count is kept even for a duplicate (it is
        // never run, and its task is swept once acknowledged); a count re-created on a task
        // already swept (a stray copy) is one small hash, given an expiry when it ends.
        let (duplicate, started): (bool, i64) = redis::pipe()
            .exists(self.keys.result(&env.job_id))
            .hincr(self.meta_key(q, task_id), UNFINISHED_FIELD, 1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        if duplicate {
            return Ok(DeliveryStart::Duplicate);
        }
        let unfinished = started - 1;
        if unfinished <= 0 {
            return Ok(DeliveryStart::Run);
        }
        let deaths = u32::try_from(unfinished).unwrap_or(u32::MAX);
        tracing::warn!(queue = q.name(), task_id, job_id = %env.job_id, deaths, "redelivered after its worker died running it");
        if deaths < worker_death_limit(env.kind) {
            return Ok(DeliveryStart::Run);
        }
        // Finished after all (a delivery overlapping this one recorded its result).
        if self.has_result(env.job_id).await? {
            return Ok(DeliveryStart::Duplicate);
        }
        let reason = format!("its worker died {deaths} times while running it");
        tracing::error!(queue = q.name(), task_id, job_id = %env.job_id, %reason, "poison job; dead-lettered");
        self.bury(q, task_id, payload, reason, worker).await?;
        Ok(DeliveryStart::Buried)
    }

    /// Ends a delivery begun with [`Self::begin_delivery`] that records no result (a retry
    /// or deferral put back as a new task): the process that ran it did not die.
    pub async fn end_delivery(&self, q: QueueClass, task_id: &str) -> Result<(), QueueError> {
        let mut p = redis::pipe();
        end_delivery_in(&mut p, self.meta_key(q, task_id), self.retention);
        let mut c = self.conn.clone();
        p.query_async::<()>(&mut c).await.map_err(|e| self.err(e))
    }

    /// Ids at the head of `q`'s ready list [`Self::bury_malformed_ready`] checks:
    /// [`READY_CHECK_FETCHES`] fetches of the batch apalis fetches from `q` (two on an
    /// operation queue, which fetches one job at a time; it runs every poll interval on every
    /// worker, each id costing a few commands inside Lua).
    pub fn ready_check_depth(&self, q: QueueClass) -> usize {
        READY_CHECK_FETCHES * self.apalis_config(q).batch_size.max(1)
    }

    /// Dead-letters the ids among the first [`Self::ready_check_depth`] of `q`'s ready list
    /// that apalis' fetch could not decode, before a fetch claims them. `worker` is who gives
    /// up.
    pub async fn bury_malformed_ready(
        &self,
        q: QueueClass,
        worker: &str,
    ) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        let found: Vec<Vec<u8>> = MALFORMED_READY
            .key(self.keys.active(q))
            .key(self.keys.data(q))
            .arg(self.keys.meta_prefix(q))
            .arg(self.ready_check_depth(q))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        self.bury_malformed(q, found, worker).await
    }

    /// Dead-letters the ids in apalis worker `apalis_worker`'s inflight set of `q` that
    /// apalis' fetch could not decode: a fetch that failed on one left its whole batch there,
    /// and a hand-back would fail the next fetch the same way.
    pub async fn bury_malformed_claimed(
        &self,
        q: QueueClass,
        apalis_worker: &str,
        worker: &str,
    ) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        let found: Vec<Vec<u8>> = MALFORMED_CLAIMED
            .key(self.keys.inflight(q, apalis_worker))
            .key(self.keys.data(q))
            .arg(self.keys.meta_prefix(q))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        self.bury_malformed(q, found, worker).await
    }

    /// Dead letters for the `(id, reason, payload)` triples a malformed-task script took off
    /// the queue, then their records go.
    async fn bury_malformed(
        &self,
        q: QueueClass,
        found: Vec<Vec<u8>>,
        worker: &str,
    ) -> Result<u64, QueueError> {
        let mut ids = Vec::new();
        for t in found.chunks_exact(3) {
            let id = String::from_utf8_lossy(&t[0]).into_owned();
            let why = String::from_utf8_lossy(&t[1]);
            let reason = format!("its queue record is damaged ({why}), so it cannot be fetched");
            // The scripts already took every id here off its list: one that cannot be buried
            // now goes back on the ready list, to be found again, rather than be lost with
            // the rest of the batch.
            if let Err(e) = self.bury(q, &id, &t[2], reason.clone(), worker).await {
                tracing::warn!(queue = q.name(), task_id = %id, error = %e, "could not dead-letter a malformed task; put back for the next check");
                let mut c = self.conn.clone();
                if let Err(e) = redis::cmd("RPUSH")
                    .arg(self.keys.active(q))
                    .arg(&id)
                    .query_async::<()>(&mut c)
                    .await
                {
                    tracing::error!(queue = q.name(), task_id = %id, error = %self.scrub(&e.to_string()), "malformed task could be neither dead-lettered nor put back");
                }
                continue;
            }
            tracing::warn!(queue = q.name(), task_id = %id, %reason, "malformed task; dead-lettered");
            ids.push(id);
        }
        if !ids.is_empty() {
            self.delete_tasks(q, &ids).await?;
        }
        Ok(ids.len() as u64)
    }

    /// apalis workers whose heartbeat is older than the orphan timeout: their claimed jobs go
    /// back on the queue (apalis only does this while another worker of the same queue is
    /// heartbeating) and their entries are removed (apalis' shutdown removes the wrong member).
    /// Claimed tasks apalis could not fetch are dead-lettered instead of handed back.
    async fn drop_dead_workers(
        &self,
        q: QueueClass,
        worker: &str,
    ) -> Result<DeadWorkers, QueueError> {
        let threshold =
            unix_secs().saturating_sub((HEARTBEAT_INTERVAL * MISSED_HEARTBEATS as u32).as_secs());
        let mut c = self.conn.clone();
        let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.apalis_workers(q))
            .arg(0)
            .arg(threshold)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = DeadWorkers::default();
        for name in names {
            out.malformed += self.bury_malformed_claimed(q, &name, worker).await?;
            let n: i64 = RECOVER
                .key(self.keys.inflight(q, &name))
                .key(self.keys.active(q))
                .key(self.keys.apalis_workers(q))
                .arg(&name)
                .arg(threshold)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            if n >= 0 {
                out.workers += 1;
                out.recovered += n as u64;
                redis::cmd("DEL")
                    .arg(format!("{}{name}", self.keys.worker_metadata_prefix(q)))
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        if out.recovered > 0 {
            tracing::warn!(
                queue = q.name(),
                recovered = out.recovered,
                "handed back jobs of dead workers"
            );
        }
        Ok(out)
    }

    /// Deletes `workers:metadata:<name>` hashes, of every queue, whose worker is no longer
    /// in its queue's apalis workers set (apalis' orphan re-enqueue removes the entry but
    /// leaves the hash, with no TTL). Walks the keyspace with `SCAN`, at most `scan_steps`
    /// steps of [`SCAN_COUNT`] per call, resuming where this namespace's previous call in
    /// this process stopped, so successive janitor passes cover the whole keyspace however
    /// many keys a shared Redis holds; a call that reaches the end of the keyspace stops
    /// there and the next starts over. Returns how many hashes were deleted.
    pub async fn drop_orphan_worker_metadata(&self, scan_steps: usize) -> Result<u64, QueueError> {
        // One pattern for every queue: `<tag>:<ns>:*:workers:metadata:*`; the queue is told
        // by the key's prefix, and a key with no queue's prefix (a target's history named
        // like one) is left alone.
        let pattern = format!(
            "{}*:workers:metadata:*",
            glob_escape(&format!("{SLOT_TAG}:{}:", self.keys.namespace()))
        );
        let prefixes: Vec<(QueueClass, String)> = QueueClass::ALL
            .into_iter()
            .map(|q| (q, self.keys.worker_metadata_prefix(q)))
            .collect();
        let state = format!("{}\n{}", self.url, self.keys.namespace());
        let mut cursor = metadata_cursor(&state);
        let mut c = self.conn.clone();
        let mut removed = 0;
        for _ in 0..scan_steps {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            let mut script = DROP_UNREGISTERED_METADATA.prepare_invoke();
            let mut candidates = 0;
            for key in &keys {
                let Some((q, prefix)) = prefixes.iter().find(|(_, p)| key.starts_with(p.as_str()))
                else {
                    continue;
                };
                script
                    .key(self.keys.apalis_workers(*q))
                    .key(key)
                    .arg(&key[prefix.len()..]);
                candidates += 1;
            }
            if candidates > 0 {
                let n: u64 = script.invoke_async(&mut c).await.map_err(|e| self.err(e))?;
                removed += n;
            }
            cursor = next;
            // Kept after every step, so an error later in the call loses no progress.
            set_metadata_cursor(&state, cursor);
            if cursor == 0 {
                break;
            }
        }
        Ok(removed)
    }
}

/// Where each namespace's walk for orphaned worker metadata stands (Redis URL and namespace
/// → `SCAN` cursor), kept across janitor passes of this process. A cursor stays valid
/// however the keyspace changes meanwhile; a lost one (a restart) only starts the walk over.
static METADATA_CURSORS: LazyLock<Mutex<HashMap<String, u64>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn metadata_cursor(state: &str) -> u64 {
    let cursors = METADATA_CURSORS.lock().unwrap_or_else(|e| e.into_inner());
    cursors.get(state).copied().unwrap_or(0)
}

fn set_metadata_cursor(state: &str, cursor: u64) {
    let mut cursors = METADATA_CURSORS.lock().unwrap_or_else(|e| e.into_inner());
    cursors.insert(state.to_string(), cursor);
}
