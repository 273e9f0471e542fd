//! The keeper: a task of its own that renews a lease every `renew_every`, so a busy
//! operation cannot starve renewal, and that cancels the operation as soon as the lease is
//! no longer surely ours.

use std::sync::{Arc, Mutex};

use redis::aio::ConnectionManager;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};

use super::{Keys, Lease, LeaseConfig, scripts};
use crate::CancellationToken;

/// Why a holder lost its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum LossReason {
    /// The lease key was gone at renewal: it expired, or Redis lost its data.
    Expired,
    /// Another holder has the lease now.
    Taken {
        /// The other holder's owner value.
        owner: String,
    },
    /// Renewals kept failing until the lease was about to expire.
    RenewalFailed {
        /// The last error.
        error: String,
    },
    /// The keeper itself ran too late to renew in time: the process or its runtime was
    /// paused (stopped process, blocked thread) past the step-down point.
    Overdue {
        /// How far past the step-down point it woke, in milliseconds.
        late_ms: u64,
    },
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::Expired => f.write_str("lease expired (key gone at renewal)"),
            LossReason::Taken { owner } => write!(f, "lease taken by another holder ({owner})"),
            LossReason::RenewalFailed { error } => write!(f, "lease renewal kept failing: {error}"),
            LossReason::Overdue { late_ms } => {
                write!(
                    f,
                    "lease renewal overdue by {late_ms} ms (holder was paused)"
                )
            }
        }
    }
}

/// A running keeper. Dropping the handle leaves the keeper running until the lease is
/// released, dropped or lost.
#[derive(Debug)]
pub struct KeeperHandle {
    lost: Arc<Mutex<Option<LossReason>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl KeeperHandle {
    /// Why the lease was lost, once the keeper noticed; `None` while it is held.
    pub fn lost(&self) -> Option<LossReason> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops renewing without releasing: the lease then runs out after its TTL. For tests
    /// and benchmarks that need a holder that "died".
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for the keeper task to end (after loss, stop, release or drop of the lease).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

impl Lease {
    /// Starts the keeper on its own task: it renews every `renew_every` with a
    /// compare-and-pexpire script and, when the lease is lost — the key is gone or has
    /// another owner, or renewals kept failing (or could not run) until `step_down_margin`
    /// before expiry — records why and cancels `cancel_on_loss`. The operation then stops at
    /// its next batch boundary; its writes are refused by the fence anyway once a newer
    /// holder has a token.
    pub fn spawn_keeper(
        &self,
        redis: &ConnectionManager,
        cancel_on_loss: CancellationToken,
    ) -> KeeperHandle {
        let lost = Arc::new(Mutex::new(None));
        let stop = self.stop.child_token();
        let keeper = Keeper {
            redis: redis.clone(),
            keys: self.keys.clone(),
            owner: self.owner.clone(),
            target: self.target.clone(),
            cfg: self.cfg.clone(),
            valid_until: self.valid_until.clone(),
            stop: stop.clone(),
            cancel_on_loss,
            lost: lost.clone(),
        };
        let task = tokio::spawn(keeper.run());
        KeeperHandle { lost, stop, task }
    }
}

struct Keeper {
    redis: ConnectionManager,
    keys: Keys,
    owner: String,
    target: String,
    cfg: LeaseConfig,
    valid_until: Arc<Mutex<Instant>>,
    stop: CancellationToken,
    cancel_on_loss: CancellationToken,
    lost: Arc<Mutex<Option<LossReason>>>,
}

enum Renewal {
    Renewed,
    Gone,
    Taken(String),
}

impl Keeper {
    async fn run(mut self) {
        let mut next = self.valid_until() - self.cfg.ttl + self.cfg.renew_every;
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                _ = sleep_until(next) => {}
            }
            let step_down_at = self.step_down_at();
            let now = Instant::now();
            if now >= step_down_at {
                let reason = match last_error.take() {
                    Some(error) => LossReason::RenewalFailed { error },
                    None => LossReason::Overdue {
                        late_ms: (now - step_down_at).as_millis() as u64,
                    },
                };
                return self.lose(reason);
            }
            match timeout(self.cfg.renew_timeout, self.renew()).await {
                Ok(Ok(Renewal::Renewed)) => {
                    self.set_valid_until(now + self.cfg.ttl);
                    last_error = None;
                    next = now + self.cfg.renew_every;
                }
                Ok(Ok(Renewal::Gone)) => return self.lose(LossReason::Expired),
                Ok(Ok(Renewal::Taken(owner))) => return self.lose(LossReason::Taken { owner }),
                Ok(Err(e)) => {
                    tracing::warn!(target = %self.target, error = %e, "lease renewal failed; retrying");
                    last_error = Some(e.to_string());
                    next = (Instant::now() + self.cfg.retry_delay).min(step_down_at);
                }
                Err(_) => {
                    tracing::warn!(target = %self.target, "lease renewal timed out; retrying");
                    last_error = Some(format!(
                        "no answer within {} ms",
                        self.cfg.renew_timeout.as_millis()
                    ));
                    next = (Instant::now() + self.cfg.retry_delay).min(step_down_at);
                }
            }
        }
    }

    async fn renew(&mut self) -> redis::RedisResult<Renewal> {
        let (code, other): (i64, String) = scripts::RENEW
            .key(&self.keys.lease)
            .key(&self.keys.holder)
            .arg(&self.owner)
            .arg(self.cfg.ttl_ms())
            .invoke_async(&mut self.redis)
            .await?;
        Ok(match code {
            1 => Renewal::Renewed,
            0 => Renewal::Gone,
            _ => Renewal::Taken(other),
        })
    }

    /// Records the loss and cancels the operation — unless the lease is being released, in
    /// which case nothing was lost.
    fn lose(self, reason: LossReason) {
        if self.stop.is_cancelled() {
            return;
        }
        tracing::warn!(target = %self.target, %reason, "lease lost; cancelling the operation");
        metrics::counter!("sessionfleet_lease_losses_total", "target" => self.target.clone())
            .increment(1);
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.cancel_on_loss.cancel();
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_valid_until(&self, until: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    fn step_down_at(&self) -> Instant {
        self.valid_until() - self.cfg.step_down_margin
    }
}
