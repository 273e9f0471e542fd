//! The count of sessions pointing at a missing platform: reported, never acted on.
//!
//! It reads the whole session table, so it runs beside the purge instead of after it. A
//! part the budget or a cancellation cuts short does not wait for it: on MariaDB, beside the
//! batches of a 2,000,000-session table, it took 2–3.5 minutes, so every 30-second part of
//! a fleet's cleanup took four, and its open read held InnoDB's purge back all that time.
//! Such a part cancels the count on the server and reports none; the part that completes
//! the run counts, and a run's merged report carries the last part's figure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::batch::count_in_background_on;
use super::rules::{self, Predicate};
use crate::store::{Db, Schema, ServerSession};

/// How long a cancelled count gets to end before it is cancelled once more and left.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// A missing-platform count running in the background ([`MissingPlatformCount::start`]).
pub struct MissingPlatformCount {
    db: Db,
    handle: JoinHandle<Result<u64, sqlx::Error>>,
    /// The server session counting, once it is known; `None` on SQLite.
    session: Arc<Mutex<Option<ServerSession>>>,
}

impl MissingPlatformCount {
    /// Starts counting the sessions of `schema` that point at a missing platform and that
    /// none of `rules` purges.
    pub fn start(db: &Db, schema: &Schema, rules: &[&Predicate]) -> MissingPlatformCount {
        let session = Arc::new(Mutex::new(None));
        let handle = tokio::spawn(count(
            db.clone(),
            schema.clone(),
            rules.iter().map(|p| (*p).clone()).collect(),
            session.clone(),
        ));
        MissingPlatformCount {
            db: db.clone(),
            handle,
            session,
        }
    }

    /// Waits for the count.
    pub async fn finish(self) -> Result<u64, sqlx::Error> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(sqlx::Error::Protocol(format!(
                "the missing-platform count did not finish: {e}"
            ))),
        }
    }

    /// Cancels the count on the server and returns once it has ended (or, should the
    /// cancellation arrive between two statements, after a second one and
    /// [`CANCEL_GRACE`]). On SQLite the count runs in this process and is simply left.
    pub async fn cancel(mut self) {
        for _ in 0..2 {
            let session = *self.session.lock().unwrap_or_else(|e| e.into_inner());
            let Some(session) = session else { break };
            if let Err(e) = self.db.cancel_statement(session).await {
                tracing::debug!(error = %e, "cancelling the missing-platform count failed");
            }
            if tokio::time::timeout(CANCEL_GRACE, &mut self.handle)
                .await
                .is_ok()
            {
                return;
            }
        }
        self.handle.abort();
    }
}

/// The count itself, on one connection whose server session is published first.
async fn count(
    db: Db,
    schema: Schema,
    rules: Vec<Predicate>,
    session: Arc<Mutex<Option<ServerSession>>>,
) -> Result<u64, sqlx::Error> {
    let Some(missing) = rules::missing_platform(&schema) else {
        return Ok(0);
    };
    let mut conn = db.read_connection().await?;
    *session.lock().unwrap_or_else(|e| e.into_inner()) = conn.server_session().await?;
    // Usually there are none: the plain anti-join says so without evaluating every rule on
    // every row.
    if count_in_background_on(&mut conn, &schema, Some(&missing)).await? == 0 {
        return Ok(0);
    }
    let all: Vec<&Predicate> = rules.iter().collect();
    count_in_background_on(&mut conn, &schema, Some(&missing.and_none_of(&all))).await
}
