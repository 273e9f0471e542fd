//! The job queue: apalis-redis set up so that its reproduced 1.0.0 defects (listed in
//! ARCHITECTURE.md) cannot hurt us, plus what apalis lacks — results and run history, our
//! dead letters, our retry policy, a live-worker registry and a janitor.
//!
//! Architecture invariant: the queue knows no SQL; it carries [`JobEnvelope`]s. apalis stays
//! behind this module: the worker binary gets its apalis `Config` from [`Queue::apalis_config`]
//! and everything else goes through [`Queue`], so apalis could be replaced by our own backend
//! without touching the operations.
//!
//! Guards, by defect (notes §0):
//! 1. idempotency keys: our enqueue script sets the marker with a TTL ([`DEDUPE_TTL`]);
//! 2. the ~8,000-due unpack wedge: immediate jobs go straight to `active`, never through
//!    `scheduled`; batches are chunked ([`ENQUEUE_CHUNK`]); delayed batches are spread so at
//!    most [`MAX_DUE_PER_SECOND`] come due per second; and workers drain due entries in chunks
//!    ([`Queue::promote_due`]) before apalis' fetch can see thousands at once;
//! 3. pickup latency: workers poll every `SESSIONFLEET_POLL_INTERVAL_MS` and are also woken by
//!    a pub/sub message the enqueue script publishes;
//! 4. Redis errors kill apalis workers: a `ConnectionManager` with [`RESPONSE_TIMEOUT`] instead
//!    of 500 ms, `Monitor::should_restart`, and a fresh worker name per restart (worker binary);
//! 5. same-name restarts refused: names carry host, pid, a random id and the restart count;
//! 6. `persist_results(false)` re-runs: kept `true`;
//! 7. `task-tracking`: not enabled;
//! 8. Cluster slots: every key carries `{core:apalis:queues:list}` ([`keys`]);
//! 9. ignored `max_attempts`: handlers always succeed towards apalis; our policy retries
//!    ([`retry_delay`], [`max_attempts`]) and dead-letters;
//!    leaks: the [`janitor`] removes done ids, task data/meta, stale worker records.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::jobs::{JobEnvelope, JobKind, QueueClass};
use crate::secret::redact_url;

pub mod dead;
pub mod enqueue;
mod forget;
pub mod janitor;
pub mod keys;
pub mod progress;
pub mod results;
pub mod settle;
pub mod waiting;
pub mod workers;

pub use dead::DeadLetter;
pub use enqueue::{EnqueueOptions, Enqueued};
pub use keys::Keys;
pub use progress::LiveProgress;
pub use results::{JobResult, ResultOutcome, RunSummary};
pub use waiting::{WaitState, WaitingJob};
pub use workers::WorkerInfo;

/// How long one Redis reply may take before the call fails (redis-rs' 500 ms default turns a
/// slow Lua script into a fatal worker error, notes §2.9).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long establishing one connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Queue::connect`] keeps retrying an unreachable Redis before giving up.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// apalis heartbeat interval: how often a worker proves it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// Heartbeats a worker may miss before its claimed jobs are handed to another worker. With
/// [`HEARTBEAT_INTERVAL`] the orphan timeout is 15 s (apalis' default is 300 s); long enough
/// to ride out a stalled runtime on a busy machine, short enough that a killed worker's job
/// resumes well within a minute.
pub const MISSED_HEARTBEATS: usize = 5;
/// Jobs one fetch claims from the operation queues. One: operation jobs run for seconds to
/// minutes and a claimed job belongs to its worker until done, so a larger claim would let
/// one busy worker sit on jobs for other databases while its peers idle.
pub const FETCH_BATCH: usize = 1;
/// Jobs per fetch for the diagnostic queue, where jobs are tiny.
pub const DIAG_FETCH_BATCH: usize = 100;
/// Lifetime of a dedupe marker: a second job with the same key is dropped for this long.
pub const DEDUPE_TTL: Duration = Duration::from_secs(6 * 3600);
/// Jobs per enqueue script call; well below Lua's unpack limit (~8,000) and short enough not
/// to block Redis noticeably.
pub const ENQUEUE_CHUNK: usize = 1000;
/// Most delayed jobs a batch lets come due in one second (apalis promotes all due entries with
/// one `unpack`, which fails at about 8,000).
pub const MAX_DUE_PER_SECOND: usize = 2000;
/// Due entries moved from `scheduled` to `active` per [`Queue::promote_due`] step.
pub const PROMOTE_CHUNK: usize = 1000;

/// Base delay of our retry backoff.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Attempts of a cleanup job before it is dead-lettered.
pub const MAX_ATTEMPTS_CLEANUP: u32 = 5;
/// Attempts of an analytics job.
pub const MAX_ATTEMPTS_ANALYTICS: u32 = 3;
/// Attempts of a maintenance job (each may be long and heavy).
pub const MAX_ATTEMPTS_MAINTENANCE: u32 = 3;
/// Attempts of a diagnostic job.
pub const MAX_ATTEMPTS_DIAG: u32 = 2;

/// Attempts a kind gets before its job is dead-lettered.
pub fn max_attempts(kind: JobKind) -> u32 {
    match kind {
        JobKind::Cleanup => MAX_ATTEMPTS_CLEANUP,
        JobKind::Analytics => MAX_ATTEMPTS_ANALYTICS,
        JobKind::Maintenance | JobKind::FullMaintenance => MAX_ATTEMPTS_MAINTENANCE,
        JobKind::Noop | JobKind::Sleep => MAX_ATTEMPTS_DIAG,
    }
}

/// Delay before attempt `next_attempt` (2 = first retry): jittered exponential backoff.
pub fn retry_delay(next_attempt: u32) -> Duration {
    crate::backoff::exponential(next_attempt.saturating_sub(1), RETRY_BASE, RETRY_MAX)
}

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis could not be reached at all.
    #[error("cannot reach Redis at {url} after {attempts} attempts: {reason}")]
    Unreachable {
        /// The URL, password removed.
        url: String,
        /// Connection attempts made.
        attempts: u32,
        /// The last error (password removed).
        reason: String,
    },
    /// A Redis command failed.
    #[error("Redis error: {0}")]
    Redis(String),
    /// Stored data could not be decoded.
    #[error("corrupt record in Redis: {0}")]
    Corrupt(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Waiting for a result took longer than allowed.
    #[error("no result for job {0} within {1:?}")]
    Timeout(String, Duration),
    /// A request was refused.
    #[error("{0}")]
    Invalid(String),
}

impl QueueError {
    pub(crate) fn redis(e: redis::RedisError, url: &str) -> QueueError {
        QueueError::Redis(crate::secret::redact_text(&e.to_string(), url))
    }
}

/// Jobs waiting in one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDepth {
    /// Queue name.
    pub queue: String,
    /// Ready to be claimed (`active` list).
    pub ready: u64,
    /// Claimed by a worker and not yet acknowledged (all inflight sets).
    pub running: u64,
    /// Delayed (retries, deferrals, scheduled) in the `scheduled` set.
    pub scheduled: u64,
    /// Of those, already due (a growing number means no worker is polling).
    pub scheduled_due: u64,
}

/// Producer and inspection handle on the fleet's Redis. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pub(crate) conn: ConnectionManager,
    pub(crate) client: redis::Client,
    pub(crate) keys: Keys,
    pub(crate) retention: Duration,
    pub(crate) url: String,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.keys.namespace())
            .finish()
    }
}

impl Queue {
    /// Connects to `REDIS_URL` (`redis://` or `rediss://`, password allowed), retrying with
    /// backoff for [`CONNECT_PATIENCE`], then failing with one line naming the redacted URL.
    pub async fn connect(settings: &Settings) -> Result<Queue, QueueError> {
        Self::connect_with_patience(settings, CONNECT_PATIENCE).await
    }

    /// [`Queue::connect`] with an explicit patience (the worker waits much longer at start).
    pub async fn connect_with_patience(
        settings: &Settings,
        patience: Duration,
    ) -> Result<Queue, QueueError> {
        let url = settings.redis_url.value.clone();
        let redacted = redact_url(&url);
        let client =
            redis_client(&url, settings.redis_ca_cert.value.as_deref()).map_err(|reason| {
                QueueError::Unreachable {
                    url: redacted.clone(),
                    attempts: 0,
                    reason,
                }
            })?;
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        let conn = loop {
            attempt += 1;
            match client
                .get_connection_manager_with_config(manager_config())
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    let reason = crate::secret::redact_text(&e.to_string(), &url);
                    if started.elapsed() >= patience {
                        return Err(QueueError::Unreachable {
                            url: redacted,
                            attempts: attempt,
                            reason,
                        });
                    }
                    tracing::warn!(url = %redacted, attempt, %reason, "Redis not reachable yet; retrying");
                    tokio::time::sleep(crate::backoff::exponential(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                    ))
                    .await;
                }
            }
        };
        Ok(Queue {
            conn,
            client,
            keys: Keys::new(&settings.namespace.value),
            retention: Duration::from_secs(
                u64::from(settings.metrics_retention_days.value) * 86_400,
            ),
            url,
        })
    }

    /// The multiplexed, auto-reconnecting connection (apalis storages share it).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The client, for dedicated connections (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Key names of this namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Retention of results and history.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The Redis URL without its password.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// `text` with this Redis URL's password removed (for driver errors quoted in logs).
    pub fn scrub(&self, text: &str) -> String {
        crate::secret::redact_text(text, &self.url)
    }

    pub(crate) fn err(&self, e: redis::RedisError) -> QueueError {
        QueueError::redis(e, &self.url)
    }

    /// The JSON document `cmd` reads (a GET, an HGET), decoded; `what` names it in the
    /// error when it does not decode.
    pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        cmd: &redis::Cmd,
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, QueueError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = cmd.query_async(&mut c).await.map_err(|e| self.err(e))?;
        raw.map(|s| {
            serde_json::from_str(&s).map_err(|e| QueueError::Corrupt(format!("{}: {e}", what())))
        })
        .transpose()
    }

    /// The apalis configuration of queue `q`: explicit hash-tagged name, orphan timeout of
    /// [`HEARTBEAT_INTERVAL`] × [`MISSED_HEARTBEATS`], idempotency TTL set, results persisted
    /// (false would make another worker re-run finished jobs), no lock step (its per-task
    /// `LREM` is O(backlog) and the inflight set already is the claim), no pub/sub events
    /// (nobody listens; they cost a PUBLISH per job).
    pub fn apalis_config(&self, q: QueueClass) -> apalis_redis::Config {
        apalis_redis::Config::default()
            .queue(self.keys.apalis_queue(q))
            .batch_size(if q == QueueClass::Diag {
                DIAG_FETCH_BATCH
            } else {
                FETCH_BATCH
            })
            .heartbeat_interval(HEARTBEAT_INTERVAL)
            .missed_heartbeats(MISSED_HEARTBEATS)
            .idempotency_ttl(Some(DEDUPE_TTL))
            .persist_results(true)
            .lock_tasks(false)
            .emit_events(false)
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Depth of every queue: ready, running, delayed (incl. due).
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>, QueueError> {
        let mut out = Vec::new();
        let now = unix_secs();
        for q in QueueClass::ALL {
            let mut c = self.conn.clone();
            let (ready, scheduled, due, workers): (u64, u64, u64, Vec<String>) = redis::pipe()
                .llen(self.keys.active(q))
                .zcard(self.keys.scheduled(q))
                .zcount(self.keys.scheduled(q), 0, now)
                .zrange(self.keys.apalis_workers(q), 0, -1)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
            let mut running = 0u64;
            if !workers.is_empty() {
                let mut p = redis::pipe();
                for w in &workers {
                    p.scard(self.keys.inflight(q, w));
                }
                let counts: Vec<u64> = p.query_async(&mut c).await.map_err(|e| self.err(e))?;
                running = counts.iter().sum();
            }
            out.push(QueueDepth {
                queue: q.name().to_string(),
                ready,
                running,
                scheduled,
                scheduled_due: due,
            });
        }
        Ok(out)
    }
}

/// A Redis client for `url`; with `ca_cert`, `rediss://` servers are verified against that
/// PEM bundle instead of the public web roots. Errors are one line, password removed.
fn redis_client(url: &str, ca_cert: Option<&std::path::Path>) -> Result<redis::Client, String> {
    let scrub = |e: redis::RedisError| crate::secret::redact_text(&e.to_string(), url);
    let Some(path) = ca_cert else {
        return redis::Client::open(url).map_err(scrub);
    };
    if !url.to_ascii_lowercase().starts_with("rediss://") {
        return Err(format!(
            "REDIS_CA_CERT ({}) is set but REDIS_URL is not a rediss:// (TLS) URL",
            path.display()
        ));
    }
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read REDIS_CA_CERT {}: {e}", path.display()))?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(scrub)
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2))
}

pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The envelope's JSON, for logs and dead letters.
pub(crate) fn envelope_json(env: &JobEnvelope) -> String {
    String::from_utf8(env.to_bytes()).unwrap_or_default()
}
