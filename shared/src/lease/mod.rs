//! The lease: "only one maintenance process touches a database at a time".
//!
//! Two halves, with different jobs (see ARCHITECTURE.md and `design.md`, "The lease and the
//! fence"):
//!
//! - **Redis lease, for efficiency.** One key per target, `SET NX PX ttl` with a random owner
//!   value ([`try_acquire`]); a keeper task renews it every `ttl / 3` by compare-and-pexpire
//!   ([`Lease::spawn_keeper`]); release is compare-and-delete ([`Lease::release`]), so a
//!   holder never deletes another holder's lease. It keeps workers from doing the same work
//!   twice, but on its own it cannot be trusted: a paused process, a Redis restart without
//!   persistence or a failover can let two processes believe they hold it.
//! - **Fencing token from the database, for correctness.** After winning the Redis key, the
//!   holder gets its token from the target database itself ([`crate::fence::issue_token_after`]),
//!   so tokens never go backwards even when Redis loses its data. Every mutating transaction
//!   checks and advances the fence ([`crate::fence::Fence::begin`]), so a holder whose token
//!   is older than the newest one changes nothing.
//!
//! Redis keys of one target share the hash slot `{<namespace>:<target>}`:
//! `<ns>:lease:{…}` (owner value, with the TTL), `<ns>:lease-holder:{…}` (worker, job id,
//! since, token — for inspection) and `<ns>:lease-token:{…}` (a counter `INCR`ed on each grant
//! and raised to the granted token; it is the floor of the next database token, which keeps
//! tokens increasing even if the database's fence table went backwards, e.g. a restore).
//! One key per namespace, `<ns>:lease-targets`, registers the targets whose lease was ever
//! acquired there (a sorted set scored by the last acquisition, bounded to
//! [`REGISTERED_TARGETS`] entries), so that [`holders`] reads those targets' holder records
//! directly instead of walking the keyspace.
//!
//! The one way to run an operation under a lease is [`with_lease`]; [`with_db_fence_only`] is
//! the Redis-less fallback.

mod config;
mod inspect;
mod keeper;
mod run;
mod scripts;

use std::sync::{Arc, Mutex};

use chrono::{NaiveDateTime, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::CancellationToken;
use crate::fence::{self, Fence, FenceError};
use crate::store::Db;

pub use config::{
    DEFAULT_BUSY_DELAY, DEFAULT_RENEW_TIMEOUT, DEFAULT_RENEWALS_PER_TTL, DEFAULT_RETRY_DELAY,
    DEFAULT_STEP_DOWN_DIVISOR, DEFAULT_TTL, LeaseConfig, MAX_TTL, MIN_TTL, busy_delay,
};
pub use inspect::{LeaseStatus, holders, holders_among, status};
pub use keeper::{KeeperHandle, LossReason};
pub use run::{LeaseRun, with_db_fence_only, with_lease};

/// Format of `since` in the Redis holder record.
const SINCE_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

/// How many targets a namespace's registry (`<ns>:lease-targets`) keeps: the most recently
/// acquired ones. A lease is held for one part of a run at a time, so one that is held right
/// now was acquired recently; older entries are trimmed on each acquisition.
pub const REGISTERED_TARGETS: usize = 1024;

/// The registry of the targets whose lease was acquired in `namespace` (not in any target's
/// hash slot: it is written and read on its own, never inside a target's script).
fn registry_key(namespace: &str) -> String {
    format!("{namespace}:lease-targets")
}

/// Who holds (or asks for) a lease. [`try_acquire`] reads only `worker` and `job_id`;
/// [`status`] and [`holders`] also fill in `since` and `token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    /// Worker name (host and process, as the worker reports itself).
    pub worker: String,
    /// The job being run under the lease.
    pub job_id: String,
    /// When the lease was acquired (UTC); `None` on a request.
    pub since: Option<NaiveDateTime>,
    /// The fencing token granted by the database; `None` on a request.
    pub token: Option<i64>,
}

impl HolderInfo {
    /// A holder request: who is asking, for which job.
    pub fn new(worker: impl Into<String>, job_id: impl Into<String>) -> HolderInfo {
        HolderInfo {
            worker: worker.into(),
            job_id: job_id.into(),
            since: None,
            token: None,
        }
    }

    /// How the holder is named in the database's fence table.
    fn fence_holder(&self) -> String {
        format!("{} job {}", self.worker, self.job_id)
    }
}

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another holder has the lease. Defer the job by [`LeaseConfig::busy_delay`]; this is
    /// not a failed attempt.
    #[error("lease on target '{target}' is busy (held by {holder})")]
    Busy {
        /// The target.
        target: String,
        /// Who holds it, as far as Redis says.
        holder: String,
    },
    /// The target or namespace cannot be used in a Redis key.
    #[error(
        "invalid lease name {0:?}: expected 1-128 characters without '{{', '}}', spaces or control characters"
    )]
    InvalidName(String),
    /// The lease timing was refused.
    #[error("invalid lease configuration: {0}")]
    Config(String),
    /// Redis failed or is unreachable.
    #[error("lease: Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Redis lease was won but the database could not issue a token; the Redis lease
    /// was released again.
    #[error(
        "cannot get a fencing token for target '{target}' from its database: {source} (no lease is held)"
    )]
    Token {
        /// The target.
        target: String,
        /// Why.
        #[source]
        source: FenceError,
    },
    /// The Redis lease expired while the database was issuing the token (the database
    /// was slower than the TTL). The token is void: a newer holder will fence it out.
    #[error(
        "lease on target '{0}' expired while its fencing token was being issued; try again later"
    )]
    LostWhileAcquiring(String),
    /// Reading the fence for inspection failed.
    #[error("lease: reading the fence failed: {0}")]
    Sql(#[from] sqlx::Error),
}

impl LeaseError {
    /// True when the lease was simply busy — held in Redis, or its database fence still locked
    /// by an older holder's transaction: the job should be deferred, not failed.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            LeaseError::Busy { .. }
                | LeaseError::Token {
                    source: FenceError::Busy(_),
                    ..
                }
        )
    }
}

/// Name of a target's fence row in its database.
pub fn fence_name(target: &str) -> String {
    format!("target:{target}")
}

/// The Redis keys of one target's lease, all in one hash slot.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    lease: String,
    holder: String,
    counter: String,
}

impl Keys {
    fn new(namespace: &str, target: &str) -> Result<Keys, LeaseError> {
        check_name(namespace)?;
        check_name(target)?;
        let tag = format!("{{{namespace}:{target}}}");
        Ok(Keys {
            lease: format!("{namespace}:lease:{tag}"),
            holder: format!("{namespace}:lease-holder:{tag}"),
            counter: format!("{namespace}:lease-token:{tag}"),
        })
    }
}

/// Names become part of a hash tag: braces would split it, whitespace makes keys unreadable.
fn check_name(name: &str) -> Result<(), LeaseError> {
    let bad = |c: char| c == '{' || c == '}' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(bad) {
        return Err(LeaseError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// `sessionfleet_lease_holds{target}`: leases this process holds, up while a [`Lease`] lives.
struct HoldGauge(String);

impl HoldGauge {
    fn new(target: &str) -> HoldGauge {
        metrics::gauge!("sessionfleet_lease_holds", "target" => target.to_string()).increment(1.0);
        HoldGauge(target.to_string())
    }
}

impl Drop for HoldGauge {
    fn drop(&mut self) {
        metrics::gauge!("sessionfleet_lease_holds", "target" => self.0.clone()).decrement(1.0);
    }
}

/// A held lease: the Redis key is ours and the database granted [`Lease::fence`].
///
/// Dropping it stops its keeper; the Redis key then expires after the TTL. Call
/// [`Lease::release`] to hand it over at once.
pub struct Lease {
    namespace: String,
    target: String,
    owner: String,
    keys: Keys,
    fence: Fence,
    holder: HolderInfo,
    cfg: LeaseConfig,
    /// Counts this lease in `sessionfleet_lease_holds` while it exists.
    _held: HoldGauge,
    /// Until when the lease is surely ours (measured from before the last successful
    /// renewal was sent). Shared with the keeper.
    valid_until: Arc<Mutex<Instant>>,
    /// Cancelled on release or drop: stops every keeper of this lease.
    stop: CancellationToken,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("target", &self.target)
            .field("owner", &self.owner)
            .field("token", &self.fence.token)
            .finish()
    }
}

/// Tries to take the lease of `target` for `holder`.
///
/// Returns `Ok(None)` when another holder has it — no token is issued then; defer the job by
/// [`LeaseConfig::busy_delay`]. On success the database has granted a new fencing token,
/// higher than every earlier one, and every older holder is fenced out from its next write.
/// If the database cannot issue the token, the Redis lease is released and
/// [`LeaseError::Token`] returned.
pub async fn try_acquire(
    redis: &ConnectionManager,
    namespace: &str,
    target: &str,
    holder: &HolderInfo,
    db: &Db,
    cfg: &LeaseConfig,
) -> Result<Option<Lease>, LeaseError> {
    cfg.validate().map_err(LeaseError::Config)?;
    let keys = Keys::new(namespace, target)?;
    let owner = uuid::Uuid::new_v4().to_string();
    let mut con = redis.clone();

    let counter: Option<i64> = scripts::ACQUIRE
        .key(&keys.lease)
        .key(&keys.counter)
        .arg(&owner)
        .arg(cfg.ttl_ms())
        .invoke_async(&mut con)
        .await?;
    let Some(counter) = counter else {
        metrics::counter!("sessionfleet_lease_acquisitions_total", "target" => target.to_string(), "result" => "busy").increment(1);
        return Ok(None);
    };

    // The database is the authority; the Redis counter only raises the floor.
    let fence = match fence::issue_token_after(
        db,
        &fence_name(target),
        &holder.fence_holder(),
        counter - 1,
    )
    .await
    {
        Ok(f) => f,
        Err(source) => {
            let _ = release_key(&mut con, &keys, &owner).await;
            return Err(LeaseError::Token {
                target: target.to_string(),
                source,
            });
        }
    };

    let since = Utc::now().naive_utc();
    let sent = Instant::now();
    let recorded: i64 = scripts::RECORD
        .key(&keys.lease)
        .key(&keys.holder)
        .key(&keys.counter)
        .arg(&owner)
        .arg(cfg.ttl_ms())
        .arg(&holder.worker)
        .arg(&holder.job_id)
        .arg(since.format(SINCE_FORMAT).to_string())
        .arg(fence.token)
        .invoke_async(&mut con)
        .await?;
    if recorded != 1 {
        return Err(LeaseError::LostWhileAcquiring(target.to_string()));
    }
    // Only inspection reads the registry: failing to write it must not cost the lease.
    if let Err(e) = register_target(&mut con, namespace, target).await {
        tracing::warn!(target, error = %e, "lease acquired, but not registered for inspection");
    }
    tracing::debug!(target, token = fence.token, worker = %holder.worker, job_id = %holder.job_id, "lease acquired");
    metrics::counter!("sessionfleet_lease_acquisitions_total", "target" => target.to_string(), "result" => "acquired").increment(1);
    Ok(Some(Lease {
        namespace: namespace.to_string(),
        target: target.to_string(),
        owner,
        keys,
        holder: HolderInfo {
            since: Some(since),
            token: Some(fence.token),
            ..holder.clone()
        },
        fence,
        cfg: cfg.clone(),
        _held: HoldGauge::new(target),
        valid_until: Arc::new(Mutex::new(sent + cfg.ttl)),
        stop: CancellationToken::new(),
    }))
}

impl Lease {
    /// The fencing token every write under this lease carries.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The random owner value stored in the Redis key.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The target this lease is for.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The namespace of the lease's Redis keys.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The holder, with `since` and `token` filled in.
    pub fn holder(&self) -> &HolderInfo {
        &self.holder
    }

    /// The timing this lease was taken with.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// How long the lease is surely still ours, counted from before the last successful
    /// renewal was sent (zero once that time has passed).
    pub fn remaining(&self) -> std::time::Duration {
        let until = *self.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        until.saturating_duration_since(Instant::now())
    }

    /// Stops renewing and deletes the Redis lease if it is still ours (compare-and-delete:
    /// never another holder's). Returns whether it was still ours.
    pub async fn release(self, redis: &ConnectionManager) -> Result<bool, LeaseError> {
        self.stop.cancel();
        let mut con = redis.clone();
        let released = release_key(&mut con, &self.keys, &self.owner).await?;
        tracing::debug!(target = %self.target, token = self.fence.token, released, "lease released");
        Ok(released)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Registers `target` in its namespace's registry (scored by now) and trims the registry to
/// the [`REGISTERED_TARGETS`] most recent. One round trip.
async fn register_target(
    con: &mut ConnectionManager,
    namespace: &str,
    target: &str,
) -> redis::RedisResult<()> {
    let key = registry_key(namespace);
    redis::pipe()
        .zadd(&key, target, Utc::now().timestamp_millis())
        .ignore()
        .cmd("ZREMRANGEBYRANK")
        .arg(&key)
        .arg(0)
        .arg(-(REGISTERED_TARGETS as i64) - 1)
        .ignore()
        .query_async(con)
        .await
}

async fn release_key(
    con: &mut ConnectionManager,
    keys: &Keys,
    owner: &str,
) -> Result<bool, LeaseError> {
    let n: i64 = scripts::RELEASE
        .key(&keys.lease)
        .key(&keys.holder)
        .arg(owner)
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}
