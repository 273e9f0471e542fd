//! Running an operation under a lease: the one way the worker and the CLI's `--local` mode
//! do it.

use std::future::Future;

use redis::aio::ConnectionManager;
use serde::Serialize;

use super::{HolderInfo, LeaseConfig, LeaseError, LossReason, fence_name, status, try_acquire};
use crate::CancellationToken;
use crate::fence;
use crate::ops::OpContext;
use crate::store::Db;

/// What a run under a lease produced.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRun<T> {
    /// What the operation returned.
    pub value: T,
    /// Set when the lease was lost during the run: the operation was cancelled and should
    /// be retried later (its committed batches stay; its later writes were refused).
    pub lost: Option<LossReason>,
    /// The fencing token the run held.
    pub token: i64,
    /// Whether the lease was released at the end (false when it was lost, or Redis could
    /// not be reached; it then expires on its own).
    pub released: bool,
}

/// Runs `f` under the lease of `target`.
///
/// Acquires the lease (or returns [`LeaseError::Busy`], which the caller turns into a
/// deferral by [`LeaseConfig::busy_delay`], not a failed attempt), starts the keeper, and
/// calls `f` with an [`OpContext`] carrying the lease's fence and a cancellation token that
/// fires when `shutdown` does or the lease is lost. Afterwards it releases the lease and
/// reports whether it was lost during the run. A panic in `f` drops the lease, which stops
/// the keeper; the key then expires after the TTL.
#[allow(clippy::too_many_arguments)] // the one entry point; each argument is a different concern
pub async fn with_lease<T, F, Fut>(
    redis: &ConnectionManager,
    namespace: &str,
    target: &str,
    holder: &HolderInfo,
    db: &Db,
    cfg: &LeaseConfig,
    shutdown: &CancellationToken,
    f: F,
) -> Result<LeaseRun<T>, LeaseError>
where
    F: FnOnce(OpContext) -> Fut,
    Fut: Future<Output = T>,
{
    let Some(lease) = try_acquire(redis, namespace, target, holder, db, cfg).await? else {
        let current = status(redis, namespace, target, None)
            .await
            .ok()
            .and_then(|s| s.holder);
        return Err(LeaseError::Busy {
            target: target.to_string(),
            holder: current
                .map(|h| format!("{} job {}", h.worker, h.job_id))
                .unwrap_or_else(|| "another holder".into()),
        });
    };
    let cancel = shutdown.child_token();
    let keeper = lease.spawn_keeper(redis, cancel.clone());
    let ctx = OpContext {
        db: db.clone(),
        fence: Some(lease.fence().clone()),
        cancel,
        progress: Default::default(),
    };
    let token = lease.fence().token;
    let value = f(ctx).await;
    let lost = keeper.lost();
    let released = match lease.release(redis).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target, error = %e, "could not release the lease; it expires after its TTL");
            false
        }
    };
    Ok(LeaseRun {
        value,
        lost,
        token,
        released,
    })
}

/// Runs `f` with a fencing token from the database alone, for when Redis is unreachable
/// (the CLI's `--local` mode without Redis).
///
/// Single-writer is then kept by the database fence alone: the token issued here is newer
/// than every earlier one, so any other holder — a worker with a Redis lease included — is
/// fenced out from its next write, and this run is in turn fenced out if anyone issues a
/// newer token. What is lost is only the efficiency half: nothing keeps two processes from
/// *trying* to work at once; the later one wins and the earlier one stops with "fenced out".
/// No keeper runs, so `lost` is always `None` and the cancellation token fires only with
/// `shutdown`.
pub async fn with_db_fence_only<T, F, Fut>(
    db: &Db,
    target: &str,
    holder: &HolderInfo,
    shutdown: &CancellationToken,
    f: F,
) -> Result<LeaseRun<T>, LeaseError>
where
    F: FnOnce(OpContext) -> Fut,
    Fut: Future<Output = T>,
{
    super::check_name(target)?;
    let fence = fence::issue_token(db, &fence_name(target), &holder.fence_holder())
        .await
        .map_err(|source| LeaseError::Token {
            target: target.to_string(),
            source,
        })?;
    let token = fence.token;
    let ctx = OpContext {
        db: db.clone(),
        fence: Some(fence),
        cancel: shutdown.child_token(),
        progress: Default::default(),
    };
    let value = f(ctx).await;
    Ok(LeaseRun {
        value,
        lost: None,
        token,
        released: true,
    })
}
