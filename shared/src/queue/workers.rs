//! Our live-worker registry: each worker process writes a heartbeat record every
//! [`REGISTRY_BEAT`], so a CLI can tell within [`LIVE_WINDOW`] whether anything consumes a
//! queue. (apalis' own `workers` set is per apalis worker, keeps dead names, and its
//! heartbeat is far too slow for that question.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Queue, QueueError};
use crate::jobs::QueueClass;

/// How often a worker process refreshes its record.
pub const REGISTRY_BEAT: Duration = Duration::from_millis(500);
/// A record older than this is not live.
pub const LIVE_WINDOW: Duration = Duration::from_secs(2);
/// Records older than this are deleted by the janitor.
pub const STALE_RECORD: Duration = Duration::from_secs(3600);

/// One worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique process name (host, pid, random id).
    pub name: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Queues it consumes.
    pub queues: Vec<QueueClass>,
    /// Jobs it runs at once per queue.
    pub concurrency: u32,
    /// Build version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// apalis worker restarts so far (Redis errors survived).
    pub restarts: u64,
    /// Jobs it is running now.
    pub running: u64,
    /// True once it has begun a graceful shutdown (no longer claims jobs).
    pub stopping: bool,
}

impl Queue {
    /// Redis' own clock, in milliseconds since the epoch: worker heartbeats are stamped and
    /// judged by it, so hosts whose clocks disagree (a CLI 3 s ahead of the workers, with a
    /// 2 s [`LIVE_WINDOW`]) still agree on who is alive.
    async fn redis_millis(&self) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Writes (or refreshes) a worker's record.
    pub async fn heartbeat_worker(&self, info: &WorkerInfo) -> Result<(), QueueError> {
        let json = serde_json::to_string(info).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let now = self.redis_millis().await?;
        let mut c = self.conn.clone();
        redis::pipe()
            .hset(self.keys.workers(), &info.name, json)
            .ignore()
            .zadd(self.keys.workers_seen(), &info.name, now)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// Removes a worker's record (graceful exit).
    pub async fn deregister_worker(&self, name: &str) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .hdel(self.keys.workers(), name)
            .ignore()
            .zrem(self.keys.workers_seen(), name)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// Worker processes seen within [`LIVE_WINDOW`] that consume `queue` (all when `None`).
    pub async fn live_workers(
        &self,
        queue: Option<QueueClass>,
    ) -> Result<Vec<WorkerInfo>, QueueError> {
        let since = self
            .redis_millis()
            .await?
            .saturating_sub(LIVE_WINDOW.as_millis() as u64);
        let mut c = self.conn.clone();
        let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.workers_seen())
            .arg(since)
            .arg("+inf")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.workers())
            .arg(&names)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for s in raw.into_iter().flatten() {
            let info: WorkerInfo = serde_json::from_str(&s)
                .map_err(|e| QueueError::Corrupt(format!("worker record: {e}")))?;
            if queue.is_none_or(|q| info.queues.contains(&q)) && !info.stopping {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Deletes registry records not refreshed for [`STALE_RECORD`]; returns how many.
    pub(crate) async fn drop_stale_worker_records(&self) -> Result<u64, QueueError> {
        let before = self
            .redis_millis()
            .await?
            .saturating_sub(STALE_RECORD.as_millis() as u64);
        let mut c = self.conn.clone();
        let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.workers_seen())
            .arg(0)
            .arg(before)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        if names.is_empty() {
            return Ok(0);
        }
        redis::pipe()
            .hdel(self.keys.workers(), &names)
            .ignore()
            .zrem(self.keys.workers_seen(), &names)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(names.len() as u64)
    }

    /// All apalis worker names registered on queue `q` with their last heartbeat (unix s).
    pub async fn apalis_workers(&self, q: QueueClass) -> Result<Vec<(String, u64)>, QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("ZRANGE")
            .arg(self.keys.apalis_workers(q))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }
}
