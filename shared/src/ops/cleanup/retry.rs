//! Another attempt at a batch, a count or read beside the batches, or the statistics refresh
//! after a transient database error (a lost connection, a server restarting, a lost lock race:
//! `store::is_transient`); for a batch also after a reference to one of its sessions appeared
//! while it ran (`store::is_foreign_key_violation`).
//!
//! A batch is idempotent — its transaction either committed or rolled back, and the DELETE
//! re-checks the rule — so it can be tried again from the same cursor with the same
//! candidates, on a fresh pooled connection. Without this, one dropped connection threw away
//! a long run, and its committed batches went uncounted (a failed part reports nothing).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::CancellationToken;
use crate::ops::OpError;

/// Attempts in a row one batch gets after transient errors before the run fails.
pub const BATCH_RETRIES: u32 = 5;
/// Wait before the first retry; it doubles up to [`BATCH_RETRY_MAX`], each wait jittered down
/// to half, so the five retries span 3–6 s — a restart or failover of a few seconds.
pub const BATCH_RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
pub const BATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// The wait before retry number `failures` (1-based).
fn retry_delay(failures: u32) -> Duration {
    crate::backoff::exponential(failures, BATCH_RETRY_BASE, BATCH_RETRY_MAX)
}

/// The retries of one rule's batches.
#[derive(Default)]
pub struct BatchRetry {
    /// Failures in a row of the current batch.
    failures: u32,
    /// Attempts retried over the whole rule.
    retried: u64,
    /// The last transient error, for the report.
    last: Option<String>,
    /// The current batch was already tried again after a foreign-key refusal.
    reference_retried: bool,
    /// Batches whose COMMIT failed after their DELETE: how many, and the rows they deleted.
    unconfirmed: Option<(u64, u64)>,
}

impl BatchRetry {
    /// After a failed attempt: true when `e` is transient, or the batch's first foreign-key
    /// refusal (a reference to one of its sessions committed after the batch read its rule:
    /// the retry's re-check leaves that session out), and the batch has retries left, once the
    /// backoff has passed (or the run was cancelled meanwhile: the caller's next check stops
    /// it). False: the error ends the run. A second refusal is no race but a key the rules
    /// cannot see (a cascade into a restricting key, a key the catalog read left out), and
    /// retrying it again would only delay the error that names it.
    pub async fn wait_to_retry(&mut self, e: &OpError, cancel: &CancellationToken) -> bool {
        let reference_race = e.is_foreign_key_violation() && !self.reference_retried;
        if !(e.is_transient() || reference_race) || self.failures >= BATCH_RETRIES {
            return false;
        }
        self.reference_retried |= reference_race;
        self.failures += 1;
        self.retried += 1;
        self.last = Some(e.to_string());
        let delay = retry_delay(self.failures);
        tracing::warn!(error = %e, attempt = self.failures, delay_ms = delay.as_millis() as u64, "cleanup batch failed with a transient database error, or a session it took was referenced meanwhile; trying it again");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => {}
        }
        true
    }

    /// A batch's COMMIT failed after its DELETE had deleted `rows` rows. The server may have
    /// committed before the reply was lost (a dropped connection): the retry then finds those
    /// rows gone, and they are in no count. The report says the count may be short by them.
    pub fn commit_unconfirmed(&mut self, rows: u64, e: &OpError) {
        if rows == 0 {
            return;
        }
        tracing::warn!(error = %e, rows, "a cleanup batch's COMMIT failed: its deletions may have committed without being counted");
        let (batches, total) = self.unconfirmed.unwrap_or((0, 0));
        self.unconfirmed = Some((batches + 1, total + rows));
    }

    /// A line for the report when a batch's COMMIT failed after its DELETE.
    pub fn unconfirmed_note(&self, rule: super::RuleKind) -> Option<String> {
        let (batches, rows) = self.unconfirmed?;
        Some(format!(
            "rule {rule:?}: {batches} batch COMMIT(s) failed after deleting {rows} session(s); had the server committed before its reply was lost, those deletions are missing from this count, which may be short by up to {rows}"
        ))
    }

    /// The batch went through: the next one starts with all its retries.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.reference_retried = false;
    }

    /// A line for the report when any attempt was retried.
    pub fn note(&self, rule: super::RuleKind) -> Option<String> {
        let last = self.last.as_ref()?;
        Some(format!(
            "rule {rule:?}: {} batch attempt(s) failed with a transient database error or a new reference to a session and were retried (last: {last})",
            self.retried
        ))
    }
}

/// The reads and other steps beside the batches (counts, the key span, the schema, the
/// statistics refresh) that a run or a report tried again after a transient error, for its
/// notes: a dropped connection under them costs a retry, and the report says so as it does
/// for a retried batch. Cloned into the tasks that read beside the batches; the clones share
/// one record.
#[derive(Clone, Default)]
pub struct RetriedReads(Arc<Mutex<RetriedLog>>);

#[derive(Default)]
struct RetriedLog {
    /// Retries per step, in the order the steps were first retried.
    steps: Vec<(&'static str, u64)>,
    last: Option<String>,
}

impl RetriedReads {
    fn record(&self, what: &'static str, e: &dyn std::fmt::Display) {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match log.steps.iter_mut().find(|(w, _)| *w == what) {
            Some((_, n)) => *n += 1,
            None => log.steps.push((what, 1)),
        }
        log.last = Some(e.to_string());
    }

    /// A line for the report when any step was tried again.
    pub fn note(&self) -> Option<String> {
        let log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let last = log.last.as_ref()?;
        let steps = log
            .steps
            .iter()
            .map(|(what, n)| format!("{what} ({n})"))
            .collect::<Vec<_>>()
            .join(", ");
        Some(format!(
            "reads and other steps beside the batches failed with a transient database error and were retried: {steps} (last: {last})"
        ))
    }
}

/// Runs the read `attempt` makes, again after a transient error (at most [`BATCH_RETRIES`]
/// times in a row, with the batches' backoff): the counts and reads beside the batches, so a
/// dropped connection does not fail a run whose batches survive it. `what` names the read in
/// the log and in `retried`.
pub async fn read_with_retries<T, F, Fut>(
    what: &'static str,
    retried: &RetriedReads,
    attempt: F,
) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    with_retries(what, crate::store::is_transient, retried, attempt).await
}

/// Runs `attempt`, again while it fails with an error `transient` accepts, at most
/// [`BATCH_RETRIES`] times in a row with the batches' backoff. `what` names the work in the
/// log and in `retried`.
pub async fn with_retries<T, E, F, Fut>(
    what: &'static str,
    transient: impl Fn(&E) -> bool,
    retried: &RetriedReads,
    mut attempt: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut failures = 0;
    loop {
        match attempt().await {
            Err(e) if transient(&e) && failures < BATCH_RETRIES => {
                failures += 1;
                retried.record(what, &e);
                let delay = retry_delay(failures);
                tracing::warn!(error = %e, work = what, attempt = failures, delay_ms = delay.as_millis() as u64, "cleanup step failed with a transient database error; trying it again");
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    /// Fails with `first` for the first `fails` attempts, then succeeds; counts the attempts.
    async fn flaky(fails: u32, first: fn() -> sqlx::Error) -> (Result<u32, sqlx::Error>, u32) {
        let tries = std::cell::Cell::new(0);
        let result = read_with_retries("test", &RetriedReads::default(), || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move { if n <= fails { Err(first()) } else { Ok(n) } }
        })
        .await;
        (result, tries.get())
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_up_to_the_limit_and_others_not_at_all() {
        let (ok, tries) = flaky(BATCH_RETRIES, reset).await;
        assert_eq!(
            (ok.ok(), tries),
            (Some(BATCH_RETRIES + 1), BATCH_RETRIES + 1)
        );

        let (failed, tries) = flaky(BATCH_RETRIES + 1, reset).await;
        assert!(matches!(failed, Err(sqlx::Error::Io(_))));
        assert_eq!(tries, BATCH_RETRIES + 1, "the sixth failure ends it");

        let (failed, tries) = flaky(1, || sqlx::Error::RowNotFound).await;
        assert!(matches!(failed, Err(sqlx::Error::RowNotFound)));
        assert_eq!(tries, 1, "a permanent error is not retried");
    }

    /// A COMMIT that fails after its DELETE leaves the count possibly short: the report says
    /// by how much. A failed COMMIT of a batch that deleted nothing, or none at all, is no note.
    #[test]
    fn batches_whose_commit_failed_after_deleting_are_noted_as_a_possibly_short_count() {
        let mut retry = BatchRetry::default();
        let e = OpError::Sql(reset());
        assert_eq!(
            retry.unconfirmed_note(super::super::RuleKind::Expired),
            None
        );
        retry.commit_unconfirmed(0, &e);
        assert_eq!(
            retry.unconfirmed_note(super::super::RuleKind::Expired),
            None
        );
        retry.commit_unconfirmed(40, &e);
        retry.commit_unconfirmed(2, &e);
        let note = retry
            .unconfirmed_note(super::super::RuleKind::Expired)
            .expect("a note");
        assert!(
            note.contains("2 batch COMMIT(s) failed after deleting 42 session(s)")
                && note.contains("may be short by up to 42"),
            "{note}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retried_reads_are_noted_per_step_and_a_clean_run_has_no_note() {
        let retried = RetriedReads::default();
        let failing_first = |n: u32| {
            let tries = std::cell::Cell::new(0);
            move || {
                tries.set(tries.get() + 1);
                let t = tries.get();
                async move { if t <= n { Err(reset()) } else { Ok(t) } }
            }
        };
        read_with_retries("rule count", &retried, failing_first(0))
            .await
            .unwrap();
        assert_eq!(retried.note(), None, "nothing was retried");
        read_with_retries("key span", &retried, failing_first(2))
            .await
            .unwrap();
        read_with_retries("rule count", &retried.clone(), failing_first(1))
            .await
            .unwrap();
        let note = retried.note().expect("a note");
        assert!(note.contains("key span (2), rule count (1)"), "{note}");
        assert!(note.contains("connection reset"), "{note}");
    }
}
