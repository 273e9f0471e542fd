//! The operations: plain async functions of (database, parameters, cancellation) → report.
//!
//! Architecture invariant: operations know SQL and the fence, never queues or Redis. The
//! worker and the CLI's local mode call them the same way; facts only the fleet knows (recent
//! job outcomes, recorded deletions) come in as plain data in the parameters.

use serde::{Deserialize, Serialize};

use crate::CancellationToken;
use crate::fence::{Fence, FenceError};
use crate::store::{Db, StoreError};

pub mod analytics;
pub mod cleanup;
pub mod full;
pub mod maintenance;
pub mod progress;

pub use progress::Progress;

/// What every operation receives besides its own parameters.
#[derive(Clone)]
pub struct OpContext {
    /// The target database.
    pub db: Db,
    /// The fencing token of the lease this run holds. `None` for read-only work; a mutating
    /// step without one fails with [`OpError::NoFence`] instead of writing unguarded.
    pub fence: Option<Fence>,
    /// Cancelled when the lease is lost, the worker shuts down, or the caller gives up.
    /// Operations stop at their next batch boundary, keeping what they committed.
    pub cancel: CancellationToken,
    /// Where the operation reports what it has committed so far (a default one goes
    /// nowhere).
    pub progress: Progress,
}

impl OpContext {
    /// The same context, reporting to `progress`.
    pub fn with_progress(self, progress: Progress) -> OpContext {
        OpContext { progress, ..self }
    }

    /// The fence, or [`OpError::NoFence`] for a step that would write.
    pub fn fence(&self) -> Result<&Fence, OpError> {
        self.fence.as_ref().ok_or(OpError::NoFence)
    }
}

/// Why an operation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// All work done.
    Completed,
    /// The time budget ran out; work remains and a continuation should follow.
    BudgetSpent,
    /// Cancelled (lost lease, shutdown); work done so far is committed.
    Cancelled,
    /// A write was refused because a newer lease holder's token reached the database first
    /// (this holder's lease lapsed before its keeper noticed). Work done so far is
    /// committed and counted; nothing was written after the refusal. A continuation
    /// follows once the newer holder is done.
    FencedOut,
    /// An error stopped it after some of its work had committed (counted here); a
    /// continuation takes over after a pause, where a retry of the whole part would lose
    /// this part's counts. An error before any work committed fails the part instead.
    Interrupted,
}

impl Outcome {
    /// The name reports and logs use (`completed`, `budget_spent`, …), as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::BudgetSpent => "budget_spent",
            Outcome::Cancelled => "cancelled",
            Outcome::FencedOut => "fenced_out",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A newer lease holder exists; nothing further was written.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// Schema or connection problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A statement failed.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// A statement ran but reported a failure in its result rows (MySQL's `ANALYZE TABLE`).
    #[error("{0}")]
    Reported(String),
    /// Parameters were refused.
    #[error("{0}")]
    Invalid(String),
    /// A mutating step ran without a fencing token.
    #[error("this step changes the database and must run under a lease (no fencing token given)")]
    NoFence,
    /// An error stopped a cleanup part after some batches, and the parts before it ended the
    /// same way (`cleanup::MAX_INTERRUPTED_PARTS`): the error recurs, so the run stops being
    /// continued and the job's retries take over. The batches before it stay committed.
    #[error(
        "stopped by an error after {batches} batches ({deleted} sessions deleted), {parts} parts in a row: {error}"
    )]
    Interrupted {
        /// Parts in a row an error stopped, this one included.
        parts: u32,
        /// Sessions this part deleted before the error.
        deleted: u64,
        /// Batches this part committed.
        batches: u64,
        /// The error.
        error: Box<OpError>,
    },
}

impl OpError {
    /// True when the failure is "fenced out": retrying under the same token is pointless.
    pub fn is_fenced_out(&self) -> bool {
        matches!(self, OpError::Fence(FenceError::FencedOut { .. }))
    }

    /// True when a statement failed in a way a fresh attempt may not repeat: a lost
    /// connection, a server restarting, a lost lock race ([`crate::store::is_transient`]).
    pub fn is_transient(&self) -> bool {
        self.statement_error()
            .is_some_and(crate::store::is_transient)
    }

    /// True when a delete was refused because another row still references the deleted one
    /// ([`crate::store::is_foreign_key_violation`]).
    pub fn is_foreign_key_violation(&self) -> bool {
        self.statement_error()
            .is_some_and(crate::store::is_foreign_key_violation)
    }

    /// The database's error, when a statement failed.
    fn statement_error(&self) -> Option<&sqlx::Error> {
        match self {
            OpError::Sql(e)
            | OpError::Fence(FenceError::Sql(e))
            | OpError::Store(StoreError::Sql(e)) => Some(e),
            _ => None,
        }
    }
}
