//! The count of sessions pointing at a missing platform: reported, never acted on.
//!
//! It reads the whole session table, so it runs beside the purge, except on InnoDB, where
//! it runs after it ([`counts_beside_the_purge`]), and when the run keeps to one statement at
//! a time (`CleanupParams::parallel_reads` false). A part the budget or a cancellation cuts
//! short reports none: it cancels a count running beside it on the server rather than wait
//! (on MariaDB, beside the batches of a 2,000,000-session table, a 30-second part of a
//! fleet's cleanup once ended 1:52 to 3:21 minutes late waiting for it, its open read holding
//! InnoDB's purge back all that time), and on InnoDB it never starts one. The part that
//! completes the run counts, and a run's merged report carries the last part's figure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::batch::count_in_background_on;
use super::retry::{RetriedReads, read_with_retries};
use super::rules::{self, Predicate};
use crate::store::{Db, Engine, Schema, ServerSession};

/// How long a cancelled count gets to end before it is cancelled once more and left.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// What the count and its canceller share. The count clears `session` before its connection
/// goes back to the pool, and a cancel is sent with the lock held, so a cancel never reaches
/// a pooled connection that has moved on to other work.
#[derive(Default)]
struct Shared {
    /// The server session counting; `None` before it is known, after the count, and on SQLite.
    session: Option<ServerSession>,
    /// Set by [`MissingPlatformCount::cancel`]: start no further statement.
    cancelled: bool,
}

/// A missing-platform count, running beside the purge or left for after it
/// ([`MissingPlatformCount::start`]).
pub struct MissingPlatformCount {
    db: Db,
    work: Work,
    retried: RetriedReads,
}

enum Work {
    /// Counting in a task of its own.
    Beside {
        handle: JoinHandle<Result<u64, sqlx::Error>>,
        shared: Arc<Mutex<Shared>>,
    },
    /// Counted by [`MissingPlatformCount::finish`], once the purge is over (InnoDB, or one
    /// statement at a time).
    After {
        schema: Box<Schema>,
        rules: Vec<Predicate>,
    },
}

impl MissingPlatformCount {
    /// Starts counting the sessions of `schema` that point at a missing platform and that
    /// none of `rules` purges; on InnoDB ([`counts_beside_the_purge`]) or without `beside`,
    /// only notes what to count.
    pub fn start(
        db: &Db,
        schema: &Schema,
        rules: &[&Predicate],
        beside: bool,
        retried: &RetriedReads,
    ) -> MissingPlatformCount {
        let rules: Vec<Predicate> = rules.iter().map(|p| (*p).clone()).collect();
        let work = if beside && counts_beside_the_purge(db.engine()) {
            let shared = Arc::new(Mutex::new(Shared::default()));
            let (db, schema) = (db.clone(), schema.clone());
            let counter = shared.clone();
            let retried = retried.clone();
            let handle = tokio::spawn(async move {
                read_with_retries("missing-platform count", &retried, || {
                    count(db.clone(), schema.clone(), rules.clone(), counter.clone())
                })
                .await
            });
            Work::Beside { handle, shared }
        } else {
            Work::After {
                schema: Box::new(schema.clone()),
                rules,
            }
        };
        MissingPlatformCount {
            db: db.clone(),
            work,
            retried: retried.clone(),
        }
    }

    /// The count: waited for, or run now if it was left for after the purge.
    pub async fn finish(self) -> Result<u64, sqlx::Error> {
        let handle = match self.work {
            Work::Beside { handle, .. } => handle,
            Work::After { schema, rules } => {
                return read_with_retries("missing-platform count", &self.retried, || {
                    count(
                        self.db.clone(),
                        (*schema).clone(),
                        rules.clone(),
                        Arc::default(),
                    )
                })
                .await;
            }
        };
        match handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(sqlx::Error::Protocol(format!(
                "the missing-platform count did not finish: {e}"
            ))),
        }
    }

    /// Cancels the count on the server and returns once it has ended (or, should the
    /// cancellation arrive just before a statement, after a second one and
    /// [`CANCEL_GRACE`]). On SQLite the count runs in this process and is simply left; a
    /// count left for after the purge never starts.
    pub async fn cancel(self) {
        let Work::Beside { mut handle, shared } = self.work else {
            return;
        };
        for _ in 0..2 {
            {
                let mut shared = shared.lock().await;
                shared.cancelled = true;
                let Some(session) = shared.session else { break };
                if let Err(e) = self.db.cancel_statement(session).await {
                    tracing::debug!(error = %e, "cancelling the missing-platform count failed");
                }
            }
            if tokio::time::timeout(CANCEL_GRACE, &mut handle)
                .await
                .is_ok()
            {
                return;
            }
        }
        handle.abort();
    }
}

/// Whether the count runs beside the purge. Not on InnoDB, where it is an index-only scan of
/// the platform column's index (the foreign key's) that is cheap alone and ruinous beside the
/// batches: a secondary-index page changed after the count's snapshot sends it to the
/// clustered index for every record on the page, and the batches change nearly every page.
/// At 1,000,000 sessions on MariaDB it took 0.4–0.7 s after the purge and 109–150 s beside
/// it, and the run around it took 122–181 s instead of 37–45 s (bench/results/cleanup.md).
fn counts_beside_the_purge(engine: Engine) -> bool {
    engine != Engine::MySql
}

/// The count itself, on one connection whose server session is shared while it counts.
async fn count(
    db: Db,
    schema: Schema,
    rules: Vec<Predicate>,
    shared: Arc<Mutex<Shared>>,
) -> Result<u64, sqlx::Error> {
    let Some(missing) = rules::missing_platform(&schema) else {
        return Ok(0);
    };
    let started = std::time::Instant::now();
    let mut conn = db.read_connection().await?;
    shared.lock().await.session = conn.server_session().await?;
    let counted = async {
        let go_on = || async {
            if shared.lock().await.cancelled {
                Err(sqlx::Error::Protocol(
                    "the missing-platform count was cancelled".into(),
                ))
            } else {
                Ok(())
            }
        };
        go_on().await?;
        // Usually there are none: the plain anti-join says so without evaluating every
        // rule on every row.
        if count_in_background_on(&mut conn, &schema, Some(&missing)).await? == 0 {
            return Ok(0);
        }
        go_on().await?;
        let all: Vec<&Predicate> = rules.iter().collect();
        count_in_background_on(&mut conn, &schema, Some(&missing.and_none_of(&all))).await
    }
    .await;
    shared.lock().await.session = None;
    drop(conn);
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        counted = ?counted.as_ref().ok(),
        "missing-platform count ended"
    );
    counted
}
