//! The cleanup operation: purge expired and orphaned sessions in short fenced batches.
//!
//! Reference: `spec/session-maintenance-utilities.md` §1 and `reference/vedfolnir-behaviour.md`
//! §1.5 and §2.1. What a session must be to go ([`rules`]):
//! - **expired**, v1: last activity (`updated_at`) NULL or older than the max age
//!   (`SESSION_MAX_AGE`, which the original ignored in favour of a hard-coded 48 h);
//! - **expired**, v2: `expires_at` before the reference time; and rows the application
//!   already marked `is_active = false` once their last activity is older than the max age;
//! - **idle** (`force` with `--max-age H`): last activity older than H hours;
//! - **orphaned**: the user row is missing or deactivated (`users.is_active` false; NULL does
//!   not count);
//! - sessions whose platform id points at a missing platform are only **reported**.
//!
//! How ([`run`]): the cutoffs are computed once from `as_of`. Each batch is one transaction
//! that advances the fence, deletes rows *that still match the rule*, and commits; what names
//! the rows depends on the rule ([`rules::Walk`]): the next N ids read along its time index;
//! for a rule matching a large share of the table ([`DENSE_RULE_SHARE`]), a stride of the
//! primary key; for orphans, the next N ids of one streamed read. N adapts so each
//! transaction stays under the target duration. Cancellation and the time budget are checked between batches;
//! whatever was committed is counted, and `remaining` says what is left for a continuation.

mod analyze;
mod batch;
mod clock;
mod missing;
mod report;
mod retry;
pub mod rules;
mod stream;
pub(crate) mod times;
mod wal;

use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

pub use analyze::{ANALYZE_AFTER_SHARE_PCT, SQLITE_ANALYSIS_LIMIT};
pub use batch::{BATCH_LOCK_TIMEOUT, BatchSizer};
pub use report::{CleanupReport, CleanupStats, RuleCounts};
pub use retry::{BATCH_RETRIES, BATCH_RETRY_BASE, BATCH_RETRY_MAX};
pub use rules::RuleKind;
pub use wal::{SQLITE_WAL_CUT_STEP, SQLITE_WAL_FILE_TARGET};
// Also after maintenance's VACUUM, which leaves the WAL file as long as the database.
pub(crate) use wal::cut_back;

use batch::{Batch, Cursor, Source, count, count_in_background, count_up_to, purge_batch};
use missing::MissingPlatformCount;
use retry::{BatchRetry, RetriedReads, read_with_retries};
use rules::{Cutoffs, Predicate, TimeCompare};
use stream::IdStream;

use super::progress::Snapshot;
use super::{OpContext, OpError, Outcome};
use crate::store::{Db, Engine, Schema, StoreError, schema};

/// Default starting batch size (`SESSION_CLEANUP_BATCH_SIZE`).
pub const DEFAULT_BATCH_SIZE: u32 = 100;
/// Default upper bound of the adaptive batch size.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 20_000;
/// Highest accepted `max_batch_size`: on MySQL and SQLite one DELETE binds every id (padded by
/// up to a quarter), and engines cap the placeholders per statement (65,535 on MySQL, 32,766
/// on SQLite); PostgreSQL binds the ids as one array.
pub const MAX_BATCH_SIZE_LIMIT: u32 = 20_000;
/// Smallest batch the controller shrinks to.
pub const MIN_BATCH_SIZE: u32 = 10;
/// Default target duration of one delete transaction on PostgreSQL and MySQL, ms
/// (`SESSION_CLEANUP_TARGET_BATCH_MS`); see [`default_target_batch_ms`].
pub const DEFAULT_TARGET_BATCH_MS: u64 = 50;
/// Default target duration of one delete transaction on SQLite, ms; see
/// [`default_target_batch_ms`].
pub const SQLITE_TARGET_BATCH_MS: u64 = 20;
/// Default max age, seconds (`SESSION_MAX_AGE`, 48 h).
pub const DEFAULT_MAX_AGE_SECS: u64 = 172_800;
/// How far ahead of this process's clock a job's `as_of` may be — a continuation carries the
/// reference time of the worker that ran the part before, whose clock may run ahead — before
/// it is refused rather than taken as now. Clocks kept by NTP differ by milliseconds.
pub const CLOCK_SKEW_ALLOWANCE: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
/// The longest max age accepted, seconds (10 years), for `SESSION_MAX_AGE` and a job's
/// `max_age_secs` alike: far past any session's life, and well inside the calendar's range,
/// which a cutoff billions of hours back would leave (it panicked in chrono).
pub const MAX_AGE_LIMIT_SECS: u64 = 315_360_000;
/// The most rows a budget stop counts as `remaining` (more is reported as "at least" this):
/// an exact count reads the whole table — seconds per million rows, under the lease — after
/// every part of a long purge.
pub const REMAINING_COUNT_LIMIT: u64 = 100_000;
/// The longest `--force --max-age`, hours (10 years, as [`MAX_AGE_LIMIT_SECS`]).
pub const FORCE_MAX_AGE_LIMIT_HOURS: u32 = 87_600;
/// Default interval between scheduled cleanups, seconds (`SESSION_CLEANUP_INTERVAL`).
pub const DEFAULT_INTERVAL_SECS: u64 = 3_600;
/// A rule matching at least this share of the table deletes primary-key ranges instead of
/// walking its time index ([`rules::Walk::PrimaryKeyRange`]): the rows then come in key
/// (mostly physical) order, each batch's DELETE reads one stretch of the table as a bulk
/// DELETE does, and most rows it reads match. Sparse rules — the steady state of an hourly
/// cleanup — keep the index walk, which reads only matching rows.
pub const DENSE_RULE_SHARE: f64 = 0.2;
/// Consecutive batches that find candidates but delete none before a rule is given up
/// (rows changing under us faster than we can purge them; a safety net against looping).
const MAX_FRUITLESS_BATCHES: u32 = 3;
/// Parts of one run in a row that an error may stop after some batches
/// ([`Outcome::Interrupted`]) and hand to a continuation. The next such error fails its part,
/// so the job's retries and then the dead-letter queue take over: an error that recurs after
/// every few batches (a trigger refusing some deletes, a server restarting in a loop) no
/// longer keeps a run going until the rows run out.
pub const MAX_INTERRUPTED_PARTS: u32 = 5;

/// Parameters of [`run`] and [`stats`]. Travels through Redis as part of a job payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CleanupParams {
    /// Rows in the first batch; the size then adapts to `target_batch_ms`. Default
    /// [`DEFAULT_BATCH_SIZE`]. Values above `max_batch_size` start at `max_batch_size`.
    pub batch_size: u32,
    /// Upper bound of the adaptive batch size, rows. Default [`DEFAULT_MAX_BATCH_SIZE`], at
    /// most [`MAX_BATCH_SIZE_LIMIT`].
    pub max_batch_size: u32,
    /// Duration each delete transaction aims to stay under, ms. `None`: the engine's default
    /// ([`default_target_batch_ms`]). Left out of the payload when `None`, so a worker of an
    /// older version reads its own default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_batch_ms: Option<u64>,
    /// Rest after each batch, as a multiple of the time the batch took (pt-archiver's
    /// `--sleep-coef`): 1.0 keeps the database free of our writes half the time. `None`: the
    /// engine's default ([`default_rest_ratio`]). From 0 to [`MAX_REST_RATIO`]. Left out of the
    /// payload when `None`, like `target_batch_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_ratio: Option<f64>,
    /// Whether reads run beside the batches (default true): the later rules' counts and
    /// candidate reads, the missing-platform count (not on InnoDB, see `missing`) and the
    /// statistics refresh. False keeps the run to one statement at a time: slower, and on a
    /// database server with few cores shared with the application, gentler on it (at
    /// 1,000,000 sessions on a two-core PostgreSQL: 1.1 cores busy instead of 1.7-1.8, the
    /// application's p99 2.7-4.2x idle instead of 5-7x, for 0.47-0.58x the plain DELETE's
    /// rate instead of 0.75-0.83x; BENCHMARKS.md).
    pub parallel_reads: bool,
    /// Idle seconds after which a session counts as expired (v1) or a session marked inactive
    /// is purged (v2). Default [`DEFAULT_MAX_AGE_SECS`].
    pub max_age_secs: u64,
    /// The original's `--force`. With `force_max_age_hours` it adds the idle rule; alone it
    /// only marks the report (`forced_cleanup`).
    pub force: bool,
    /// `--max-age H` (with `force`): also purge sessions idle for more than H hours. `None`:
    /// no idle rule. 0 is refused (it would purge every session).
    pub force_max_age_hours: Option<u32>,
    /// Count what would be deleted, per rule, and delete nothing. Needs no fence.
    pub dry_run: bool,
    /// Time budget, seconds: stop at the first batch boundary after it is spent, with outcome
    /// `budget_spent` and `remaining` set. Checked after each batch, so every part makes
    /// progress (0 = exactly one batch). `None`: no budget.
    pub budget_secs: Option<u64>,
    /// Reference time of every cutoff (UTC). `None`: now, at the start. A continuation passes
    /// the first part's `as_of`, so one logical run uses one set of cutoffs. A time in the
    /// future would purge sessions that are still live: up to [`CLOCK_SKEW_ALLOWANCE`] ahead
    /// (another worker's clock) it is taken as now, further ahead it is refused.
    pub as_of: Option<NaiveDateTime>,
    /// Seconds between scheduled cleanups; reported by [`stats`] only. Default
    /// [`DEFAULT_INTERVAL_SECS`].
    pub interval_secs: u64,
    /// Rows earlier parts of this run deleted that no statistics refresh has seen yet; set by
    /// [`CleanupParams::continuation`], 0 otherwise. The statistics refresh judges the run's
    /// whole purge against [`ANALYZE_AFTER_SHARE_PCT`]: a run cut by its budget into parts
    /// that each delete less than that share would otherwise never refresh. Left out of the
    /// payload when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub carried_deletes: u64,
    /// Parts in a row, just before this one, that an error stopped after some batches; set
    /// by [`CleanupParams::continuation`], 0 otherwise. See [`MAX_INTERRUPTED_PARTS`]. Left
    /// out of the payload when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub interrupted_parts: u32,
}

fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

impl Default for CleanupParams {
    fn default() -> Self {
        CleanupParams {
            batch_size: DEFAULT_BATCH_SIZE,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            target_batch_ms: None,
            rest_ratio: None,
            parallel_reads: true,
            max_age_secs: DEFAULT_MAX_AGE_SECS,
            force: false,
            force_max_age_hours: None,
            dry_run: false,
            budget_secs: None,
            as_of: None,
            interval_secs: DEFAULT_INTERVAL_SECS,
            carried_deletes: 0,
            interrupted_parts: 0,
        }
    }
}

impl CleanupParams {
    /// Refuses impossible or dangerous values with a one-line message.
    pub fn validate(&self) -> Result<(), OpError> {
        let bad = |m: String| Err(OpError::Invalid(m));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if self.max_batch_size == 0 || self.max_batch_size > MAX_BATCH_SIZE_LIMIT {
            return bad(format!(
                "max batch size must be from 1 to {MAX_BATCH_SIZE_LIMIT}, not {}",
                self.max_batch_size
            ));
        }
        if self.target_batch_ms == Some(0) {
            return bad("target batch duration must be at least 1 ms".into());
        }
        if let Some(r) = self.rest_ratio
            && !(0.0..=MAX_REST_RATIO).contains(&r)
        {
            return bad(format!(
                "rest ratio must be from 0 to {MAX_REST_RATIO}, not {r}"
            ));
        }
        if self.max_age_secs == 0 {
            return bad(
                "max age must be at least 1 second (0 would make every session expired)".into(),
            );
        }
        if self.max_age_secs > MAX_AGE_LIMIT_SECS {
            return bad(format!(
                "max age must be at most {MAX_AGE_LIMIT_SECS} seconds (10 years), not {}",
                self.max_age_secs
            ));
        }
        if self.interval_secs == 0 {
            return bad("cleanup interval must be at least 1 second".into());
        }
        match self.force_max_age_hours {
            Some(0) => {
                return bad(
                    "--max-age 0 would purge every session; give a positive number of hours".into(),
                );
            }
            Some(_) if !self.force => {
                return bad("--max-age only applies together with --force".into());
            }
            Some(h) if h > FORCE_MAX_AGE_LIMIT_HOURS => {
                return bad(format!(
                    "--max-age must be at most {FORCE_MAX_AGE_LIMIT_HOURS} hours (10 years), not {h}"
                ));
            }
            _ => {}
        }
        if let Some(t) = self.as_of
            && t > Utc::now().naive_utc() + CLOCK_SKEW_ALLOWANCE
        {
            return bad(format!(
                "as_of {t} is in the future; it would purge live sessions"
            ));
        }
        // Far enough from chrono's lowest date for every cutoff: `as_of` less ten years.
        if let Some(t) = self.as_of
            && t.and_utc().timestamp() < 0
        {
            return bad(format!("as_of {t} is before 1970"));
        }
        Ok(())
    }

    /// The target batch duration in effect on `engine`, ms: the one asked for, or the engine's
    /// default.
    pub fn effective_target_batch_ms(&self, engine: Engine) -> u64 {
        self.target_batch_ms
            .unwrap_or_else(|| default_target_batch_ms(engine))
    }

    /// The rest ratio in effect on `engine`: the one asked for, or the engine's default.
    pub fn effective_rest_ratio(&self, engine: Engine) -> f64 {
        self.rest_ratio
            .unwrap_or_else(|| default_rest_ratio(engine))
    }

    /// The reference time: `as_of`, but never later than `now` (see [`CLOCK_SKEW_ALLOWANCE`]);
    /// without it, `now`. Truncated to microseconds (what every engine stores).
    fn reference_time(&self, now: NaiveDateTime) -> NaiveDateTime {
        let now = now
            - chrono::Duration::nanoseconds(i64::from(
                now.and_utc().timestamp_subsec_nanos() % 1000,
            ));
        self.as_of.map_or(now, |t| t.min(now))
    }

    /// The parameters of the part that continues a run `part` cut short: the same reference
    /// time, the deletes no statistics refresh has seen yet (see `carried_deletes`), and how
    /// many parts in a row an error has stopped (`interrupted_parts`).
    pub fn continuation(&self, part: &CleanupReport) -> CleanupParams {
        let carried_deletes = if part.database_optimizations > 0 {
            0
        } else {
            self.carried_deletes.saturating_add(part.total_cleaned())
        };
        let interrupted_parts = if part.outcome == Outcome::Interrupted {
            self.interrupted_parts.saturating_add(1)
        } else {
            0
        };
        CleanupParams {
            as_of: Some(part.as_of),
            carried_deletes,
            interrupted_parts,
            ..self.clone()
        }
    }

    /// The cutoffs at `now` (see [`reference_now`]).
    fn cutoffs(&self, now: NaiveDateTime) -> Cutoffs {
        let idle = if self.force {
            self.force_max_age_hours
        } else {
            None
        };
        Cutoffs::new(self.reference_time(now), self.max_age_secs, idle)
    }
}

/// Rules that would walk a time column no usable index leads with walk the primary key in
/// ranges instead, with a note naming the column. Along an unindexed column every batch
/// would scan and sort the whole table (and the sizer, seeing slow batches, would make them
/// smaller and so more numerous); key ranges read the table once in all. An index list that
/// cannot be read leaves the rules as they are, with a note.
async fn walk_unindexed_columns_by_key(
    db: &Db,
    schema: &Schema,
    mut rules: Vec<rules::Rule>,
) -> (Vec<rules::Rule>, Vec<String>) {
    let indexes = match crate::ops::maintenance::table_indexes(db, &schema.sessions.table).await {
        Ok(indexes) => indexes,
        Err(e) => {
            return (
                rules,
                vec![format!(
                    "the session table's indexes could not be read ({e}): its time columns were taken to be indexed"
                )],
            );
        }
    };
    let leading: std::collections::HashSet<String> = indexes
        .iter()
        .filter(|i| i.valid && !i.partial)
        .filter_map(|i| i.columns.first().map(|c| c.to_ascii_lowercase()))
        .collect();
    let mut unindexed: Vec<String> = Vec::new();
    for rule in &mut rules {
        let rules::Walk::Column(qualified) = &rule.walk else {
            continue;
        };
        let column = qualified
            .rsplit('.')
            .next()
            .unwrap_or(qualified)
            .to_string();
        if leading.contains(&column.to_ascii_lowercase()) {
            continue;
        }
        tracing::warn!(rule = ?rule.kind, %column, "no index leads with the rule's time column: walking primary-key ranges");
        rule.walk = rules::Walk::PrimaryKeyRange;
        if !unindexed.contains(&column) {
            unindexed.push(column);
        }
    }
    let notes = unindexed
        .into_iter()
        .map(|column| {
            format!(
                "no index of {} leads with {column}: the rules on it walked the primary key in ranges, reading the table once (`sessionfleet db --create-indexes` builds the index, so a run reads only what it deletes)",
                schema.sessions.table
            )
        })
        .collect();
    (rules, notes)
}

/// Runs one cleanup (or one part of it, when a budget cuts it short).
///
/// A real run needs `ctx.fence`. A write refused by the fence ends the run there with
/// [`Outcome::FencedOut`]: the report counts what committed before it, so the run's history
/// keeps those deletes, and nothing is written after it. A dry run reads only.
pub async fn run(ctx: &OpContext, params: &CleanupParams) -> Result<CleanupReport, OpError> {
    params.validate()?;
    let started = Instant::now();
    let db = &ctx.db;
    let retried = RetriedReads::default();
    let (schema, compare) = detect_schema(db, &retried).await?;
    let (now, clock_note) = reference_now(db, &retried).await?;
    let cutoffs = params.cutoffs(now);
    let (rules, notes) = rules::build(&schema, &cutoffs, compare);
    // A dry run only counts: it walks nothing, so it reads no index list.
    let (rules, unindexed) = if params.dry_run {
        (rules, Vec::new())
    } else {
        walk_unindexed_columns_by_key(db, &schema, rules).await
    };
    let mut report = CleanupReport::new(cutoffs.as_of, params.dry_run);
    report.notes = schema.notes.clone();
    report.notes.extend(clock_note);
    report.notes.extend(notes);
    report.notes.extend(unindexed);
    if params.force {
        report.forced_cleanup = Some(true);
        report.custom_max_age_hours = params.force_max_age_hours;
    }
    let all_rules: Vec<&Predicate> = rules.iter().map(|r| &r.as_written).collect();
    // Independent of the purge (it counts rows no rule touches), so it runs alongside it,
    // except on InnoDB, where it waits for the purge to end (see `missing`), and without
    // parallel reads.
    let missing_platform =
        MissingPlatformCount::start(db, &schema, &all_rules, params.parallel_reads, &retried);
    let worked = if params.dry_run {
        count_per_rule(db, &schema, &rules, &retried)
            .await
            .map(|counts| report.rules = counts)
    } else {
        match purge(ctx, params, &schema, &rules, started, &mut report, &retried).await {
            Err(e) if e.is_fenced_out() => {
                tracing::warn!(error = %e, deleted = report.rules.total(), "fenced out: a newer lease holder took over; this part stops here");
                // A note, not an error: the continuation finishes the run.
                report.notes.push(e.to_string());
                report.outcome = Outcome::FencedOut;
                report.remaining = None;
                report.remaining_at_least = false;
                Ok(())
            }
            // Batches committed before the error: keep their counts (and the statistics
            // refresh they call for) with this part; the continuation goes on from there —
            // up to MAX_INTERRUPTED_PARTS parts in a row, then the error fails the part.
            Err(e) if report.batches > 0 && !matches!(e, OpError::Invalid(_)) => {
                if params.interrupted_parts >= MAX_INTERRUPTED_PARTS {
                    // Not a return: the count beside the purge is cancelled below.
                    Err(OpError::Interrupted {
                        parts: params.interrupted_parts + 1,
                        deleted: report.rules.total(),
                        batches: report.batches,
                        error: Box::new(e),
                    })
                } else {
                    tracing::warn!(error = %e, deleted = report.rules.total(), "stopped by an error after some batches; a continuation takes over");
                    report.errors.push(format!(
                        "stopped after {} batches by an error; a continuation takes over: {e}",
                        report.batches
                    ));
                    report.outcome = Outcome::Interrupted;
                    report.remaining = None;
                    report.remaining_at_least = false;
                    Ok(())
                }
            }
            purged => purged,
        }
    };
    // A part cut short leaves the count to the part that completes the run (see `missing`).
    match worked {
        // Report-only: a failed count leaves the figure out, not the purge beside it.
        Ok(()) if report.outcome == Outcome::Completed => {
            match missing_platform.finish().await {
                Ok(n) => report.missing_platform_sessions = Some(n),
                Err(e) => report.errors.push(format!(
                    "counting sessions whose platform is missing failed: {e}"
                )),
            }
            count_kept_by_references(ctx, &schema, &rules, &mut report, &retried).await;
        }
        worked => {
            missing_platform.cancel().await;
            worked?;
        }
    }
    report.notes.extend(retried.note());
    report.duration_seconds = started.elapsed().as_secs_f64();
    report.settle();
    Ok(report)
}

/// The real run: each rule in turn, in fenced batches, then fresh planner statistics when a
/// large share of the table went. Stops early on cancellation or a spent budget (`report`
/// says so and counts what is left).
async fn purge(
    ctx: &OpContext,
    params: &CleanupParams,
    schema: &Schema,
    rules: &[rules::Rule],
    started: Instant,
    report: &mut CleanupReport,
    retried: &RetriedReads,
) -> Result<(), OpError> {
    let db = &ctx.db;
    let all_rules: Vec<&Predicate> = rules.iter().map(|r| &r.as_written).collect();
    let fence = ctx.fence()?;
    // Reads before the first batch (the table's size, a rule's count) can take long on a
    // large table, or wait behind a table lock: a shutdown or a lost lease ends the run at
    // once instead of after them.
    let Some(size) = unless_cancelled(ctx, table_size(db, schema, retried)).await else {
        report.outcome = Outcome::Cancelled;
        return Ok(());
    };
    let (table_rows, estimated) = size?;
    // Dropped with this function: a count still running for a rule the run never reaches
    // is stopped with it, not left to start the next.
    let mut counting = tokio::task::JoinSet::new();
    let mut matching = count_index_walked(
        db,
        schema,
        rules,
        table_rows,
        params.parallel_reads,
        &mut counting,
        retried,
    );
    tracing::debug!(
        table_rows,
        estimated,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "table size known"
    );
    let mut prefetched: Vec<Option<IdStream>> = Vec::new();
    let mut early_refresh: Option<EarlyRefresh> = None;
    for (i, rule) in rules.iter().enumerate() {
        let matching = match matching[i].take() {
            Some(pending) => match unless_cancelled(ctx, pending).await {
                Some(counted) => Some(counted?),
                None => {
                    report.outcome = Outcome::Cancelled;
                    break;
                }
            },
            None => None,
        };
        if i == 0 && params.parallel_reads {
            // Streamed rules start reading once the first rule can start deleting (not
            // before: on two cores their reads slowed the count it waits for), so the engine
            // finds their rows while earlier rules delete; each read leaves out rows an
            // earlier rule purges, as a sequential run counts.
            prefetched = rules
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    (rule.walk == rules::Walk::PrimaryKey).then(|| {
                        let earlier: Vec<&Predicate> = all_rules[..i].to_vec();
                        IdStream::open(db, schema, &rule.predicate.and_none_of(&earlier))
                    })
                })
                .collect();
        }
        let prefetched = prefetched.get_mut(i).and_then(Option::take);
        let Some(rule) = &plan_walk(rule, matching, table_rows) else {
            continue;
        };
        let Some(source) = Source::open(db, schema, rule, prefetched, retried).await? else {
            continue;
        };
        if let Some(stop) = purge_rule(ctx, params, schema, rule, source, started, report).await? {
            report.outcome = stop;
            break;
        }
        if params.parallel_reads && early_refresh.is_none() && i + 1 < rules.len() {
            early_refresh = EarlyRefresh::start(
                db,
                fence,
                schema,
                table_rows,
                params.carried_deletes,
                report,
                retried,
            )
            .await;
        }
    }
    // Only a budget stop counts what is left: a cancelled run must end now (see `remaining`).
    if report.outcome == Outcome::Cancelled {
        report.remaining = None;
        report.remaining_at_least = false;
    } else if report.outcome == Outcome::BudgetSpent
        // The rules as run: sessions still referenced are left to no continuation.
        && let Some(any) = Predicate::any_of(&rules.iter().map(|r| &r.predicate).collect::<Vec<_>>())
    {
        // Informative: the continuation follows the budget stop either way, so a cancellation
        // (a shutdown, a lost lease) meanwhile drops it rather than wait seconds for it.
        let remaining = read_with_retries("remaining count", retried, || {
            batch::count_up_to(db, schema, &any, REMAINING_COUNT_LIMIT)
        });
        match unless_cancelled(ctx, remaining).await {
            Some(Ok(n)) => {
                report.remaining = Some(n);
                report.remaining_at_least = n >= REMAINING_COUNT_LIMIT;
            }
            Some(Err(e)) => report.errors.push(format!(
                "counting the rows left for the continuation failed: {e}"
            )),
            None => report.notes.push(
                "the rows left for the continuation were not counted: the run was cancelled".into(),
            ),
        }
    }
    if report.outcome != Outcome::Cancelled {
        let carried = params.carried_deletes;
        refresh_statistics_after(
            ctx,
            schema,
            table_rows,
            carried,
            early_refresh,
            report,
            retried,
        )
        .await?;
        cut_back_wal(db, fence, report).await?;
    } else if let Some(early) = early_refresh {
        early.finish(report).await?;
    }
    Ok(())
}

/// The session table's rows, and whether that is the engine's estimate: the walk and the
/// statistics refresh only need its order of magnitude, and counting
/// exactly reads the whole table on every run. Counted when the engine has no estimate (or
/// it cannot be read).
async fn table_size(
    db: &Db,
    schema: &Schema,
    retried: &RetriedReads,
) -> Result<(u64, bool), OpError> {
    match db.estimated_rows(&schema.sessions.table).await {
        Ok(Some(rows)) => return Ok((rows, true)),
        Ok(None) => {}
        Err(e) => {
            tracing::debug!(error = %e, "the engine's row estimate could not be read; counting")
        }
    }
    Ok((
        read_with_retries("table size", retried, || count(db, schema, None)).await?,
        false,
    ))
}

/// The output of `work`, or `None` when the run is cancelled first (`work` is dropped).
async fn unless_cancelled<T>(ctx: &OpContext, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        () = ctx.cancel.cancelled() => None,
    }
}

/// [`schema::detect`], tried again after a transient error like the counts: the first
/// statements of a run or a report.
/// The session table's schema, and how its times compare: re-checked as times where SQLite
/// columns were seen holding values other than UTC text (named in the schema's notes).
/// A table the rules would misjudge (`Schema::check_rules_apply`: a time column of another
/// type, expiry and activity columns that fit neither profile) is refused here, before any
/// count or delete.
async fn detect_schema(db: &Db, retried: &RetriedReads) -> Result<(Schema, TimeCompare), OpError> {
    let transient =
        |e: &StoreError| matches!(e, StoreError::Sql(e) if crate::store::is_transient(e));
    let mut schema = retry::with_retries("schema detection", transient, retried, || {
        schema::detect(db)
    })
    .await?;
    schema.check_rules_apply().map_err(StoreError::from)?;
    let odd_times =
        retry::with_retries("time column probe", OpError::is_transient, retried, || {
            times::unreadable_sqlite_times(db, &schema)
        })
        .await?;
    let compare = if odd_times.is_empty() {
        TimeCompare::AsStored
    } else {
        TimeCompare::JuliandayRecheck
    };
    schema.notes.extend(odd_times);
    Ok((schema, compare))
}

/// "Now" for a run's cutoffs: the earlier of this worker's clock and the database server's,
/// with a note when they differ (see [`clock`]); the server's clock is read again after a
/// transient error.
async fn reference_now(
    db: &Db,
    retried: &RetriedReads,
) -> Result<(NaiveDateTime, Option<String>), OpError> {
    retry::with_retries("clock read", OpError::is_transient, retried, || {
        clock::reference_now(db, Utc::now().naive_utc(), CLOCK_SKEW_ALLOWANCE)
    })
    .await
}

/// [`wal::cut_back`], logged; a failure is noted in `report`, only a fenced-out error is
/// returned.
async fn cut_back_wal(
    db: &Db,
    fence: &crate::fence::Fence,
    report: &mut CleanupReport,
) -> Result<(), OpError> {
    const MIB: f64 = 1_048_576.0;
    match wal::cut_back(db, fence).await {
        Ok(None) => {}
        Ok(Some(w)) if w.after <= wal::SQLITE_WAL_FILE_TARGET => tracing::info!(
            before_mib = w.before as f64 / MIB,
            after_mib = w.after as f64 / MIB,
            "SQLite WAL file cut back"
        ),
        Ok(Some(w)) => tracing::info!(
            mib = w.after as f64 / MIB,
            "SQLite WAL file left long: readers kept the WAL in use; the next run tries again"
        ),
        Err(e) if e.is_fenced_out() => return Err(e),
        Err(e) => report
            .errors
            .push(format!("cutting the SQLite WAL file back failed: {e}")),
    }
    Ok(())
}

/// A statistics refresh started while later rules still delete: once the rules so far have
/// removed a large share of the table, the remaining ones (orphans: a few percent) change its
/// statistics little, and on PostgreSQL the `ANALYZE` (0.3-0.5 s for a million rows) then
/// overlaps their batches instead of following them.
struct EarlyRefresh {
    /// Rows deleted when it started: what it cannot have seen is deleted after that.
    deleted_before: u64,
    /// The refresh's task, alone in its set so that it ends with the run: a run that stops
    /// without waiting for it (an error, a fenced-out batch) must not leave an `ANALYZE`
    /// running on the database after the part has ended and its lease has gone to another
    /// holder. Its deletes then stay unseen by any refresh and are carried to the next part.
    task: tokio::task::JoinSet<Result<u64, OpError>>,
}

impl EarlyRefresh {
    /// Starts the refresh if what is deleted so far (with `carried`, earlier parts' deletes)
    /// calls for one and the engine does not refresh statistics itself.
    async fn start(
        db: &Db,
        fence: &crate::fence::Fence,
        schema: &Schema,
        table_rows: u64,
        carried: u64,
        report: &CleanupReport,
        retried: &RetriedReads,
    ) -> Option<EarlyRefresh> {
        let deleted = report.rules.total();
        let unseen = carried.saturating_add(deleted);
        if !analyze::worth_refreshing(unseen, table_rows.saturating_sub(deleted))
            || analyze::engine_refreshes_statistics(db).await
        {
            return None;
        }
        let (db, fence, table) = (db.clone(), fence.clone(), schema.sessions.table.clone());
        let retried = retried.clone();
        tracing::debug!(
            deleted,
            "statistics refresh started alongside the remaining rules"
        );
        let mut task = tokio::task::JoinSet::new();
        task.spawn(async move {
            let t = Instant::now();
            let result = analyze::refresh_statistics(&db, &fence, &table, &retried).await;
            tracing::debug!(
                ms = t.elapsed().as_secs_f64() * 1000.0,
                "statistics refreshed"
            );
            result
        });
        Some(EarlyRefresh {
            deleted_before: deleted,
            task,
        })
    }

    /// Waits for the refresh and records it in `report`; only a fenced-out error is returned.
    async fn finish(mut self, report: &mut CleanupReport) -> Result<(), OpError> {
        let result = match self.task.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled by the runtime's shutdown (the set holds its one task until here).
            Some(Err(e)) => {
                report
                    .errors
                    .push(format!("refreshing planner statistics did not finish: {e}"));
                return Ok(());
            }
            None => unreachable!("the refresh's set holds its task until it is joined"),
        };
        record_refresh(result, report)
    }
}

/// Counts a statistics refresh in `report`, or its error; a fenced-out error ends the run.
fn record_refresh(result: Result<u64, OpError>, report: &mut CleanupReport) -> Result<(), OpError> {
    match result {
        Ok(n) => report.database_optimizations += n,
        Err(e) if e.is_fenced_out() => return Err(e),
        Err(e) => report
            .errors
            .push(format!("refreshing planner statistics failed: {e}")),
    }
    Ok(())
}

/// Deletes one rule's rows batch by batch from `source` until it runs dry, the rule gives up,
/// or the run must stop — then returns why.
async fn purge_rule(
    ctx: &OpContext,
    params: &CleanupParams,
    schema: &Schema,
    rule: &rules::Rule,
    mut source: Source,
    started: Instant,
    report: &mut CleanupReport,
) -> Result<Option<Outcome>, OpError> {
    let db = &ctx.db;
    let fence = ctx.fence()?;
    let budget = params.budget_secs.map(Duration::from_secs);
    // Each rule learns its own batch size: a row costs very different amounts to find and
    // delete under different rules (a key range against scattered ids).
    let mut sizer = BatchSizer::new(
        params.batch_size.min(params.max_batch_size),
        MIN_BATCH_SIZE.min(params.batch_size),
        params.max_batch_size,
        Duration::from_millis(params.effective_target_batch_ms(db.engine())),
    );
    let rest_ratio = params.effective_rest_ratio(db.engine());
    let mut writer = db.batch_writer(BATCH_LOCK_TIMEOUT).await?;
    let mut cursor = Cursor::Start;
    let mut fruitless = 0;
    let mut retry = BatchRetry::default();
    // Candidates whose delete failed with a transient error, to delete on the next attempt:
    // a streamed rule's ids are not read twice.
    let mut pending = None;
    let rule_started = Instant::now();
    let deleted_before = report.rules.total();
    // Every exit of the loop, an error's too, leaves its retries and reopens in the notes: an
    // interrupted part's report goes out with them.
    let stop = loop {
        if let Some(stop) = stop_reason(ctx, budget, started, report.batches) {
            break Ok(Some(stop));
        }
        let limit = sizer.size();
        let found = match pending.take() {
            Some(found) => found,
            None => match source
                .next(db, schema, &rule.predicate, cursor.clone(), limit)
                .await
            {
                Ok(found) => found,
                // A stream reopens a broken read itself; its error is final.
                Err(e) => {
                    let e = OpError::from(e);
                    if source.is_stream() || !retry.wait_to_retry(&e, &ctx.cancel).await {
                        break Err(e);
                    }
                    continue;
                }
            },
        };
        if found.rows == 0 {
            break Ok(None);
        }
        let done = match purge_batch(&mut writer, fence, schema, rule, &found.batch).await {
            Ok(done) => done,
            Err(failed) => {
                let e = failed.error;
                if let Some(rows) = failed.unconfirmed {
                    retry.commit_unconfirmed(rows, &e);
                }
                if !retry.wait_to_retry(&e, &ctx.cancel).await {
                    break Err(e);
                }
                pending = Some(found);
                continue;
            }
        };
        retry.succeeded();
        report.batches += 1;
        report.rules.add(rule.kind, done.deleted);
        report.longest_batch_ms = report
            .longest_batch_ms
            .max(done.took.as_secs_f64() * 1000.0);
        sizer.observe(found.rows, done.took);
        ctx.progress.report(Snapshot {
            rows: report.rules.total(),
            batches: report.batches,
        });
        let checkpoint = match writer.checkpoint().await {
            Ok(checkpoint) => checkpoint,
            Err(e) => break Err(e.into()),
        };
        tracing::debug!(rule = ?rule.kind, rows = found.rows, deleted = done.deleted, ms = done.took.as_secs_f64() * 1000.0, commit_ms = done.committing.as_secs_f64() * 1000.0, checkpoint_ms = checkpoint.took.as_secs_f64() * 1000.0, wal_frames = checkpoint.wal_frames, frames_left = checkpoint.left, "batch committed");
        // A cancellation ends the rest at once: with a large ratio it can last seconds.
        let rest = rest_after(db.engine(), rest_ratio, done.took, checkpoint.took);
        tokio::select! {
            () = tokio::time::sleep(rest) => {}
            () = ctx.cancel.cancelled() => {}
        }
        cursor = found.next;
        // A range may hold no match at all; found ids that all vanished are suspect.
        fruitless = match found.batch {
            Batch::Ids(_) if done.deleted == 0 => fruitless + 1,
            _ => 0,
        };
        if fruitless >= MAX_FRUITLESS_BATCHES {
            report.errors.push(format!(
                "rule {:?}: {MAX_FRUITLESS_BATCHES} batches in a row found candidates that no longer matched; left for the next run",
                rule.kind
            ));
            break Ok(None);
        }
        if found.last {
            break Ok(None);
        }
    };
    report.notes.extend(retry.note(rule.kind));
    report.notes.extend(retry.unconfirmed_note(rule.kind));
    report.notes.extend(source.reopen_note(rule.kind));
    tracing::debug!(
        rule = ?rule.kind,
        walk = ?rule.walk,
        deleted = report.rules.total() - deleted_before,
        secs = rule_started.elapsed().as_secs_f64(),
        "rule done"
    );
    stop
}

/// After a purge that removed a large share of the table, fresh planner statistics: ours,
/// unless the engine refreshes them itself (then the report says so). The purge is this
/// part's deletes plus `carried`, earlier parts' that no refresh has seen. When one was
/// started early ([`EarlyRefresh`]), it is repeated only if the rules after its start removed
/// a large share of what was left.
async fn refresh_statistics_after(
    ctx: &OpContext,
    schema: &Schema,
    table_rows: u64,
    carried: u64,
    early: Option<EarlyRefresh>,
    report: &mut CleanupReport,
    retried: &RetriedReads,
) -> Result<(), OpError> {
    let (db, fence) = (&ctx.db, ctx.fence()?);
    let deleted = report.rules.total();
    let left = table_rows.saturating_sub(deleted);
    let unseen = match early {
        Some(early) => {
            let unseen = deleted - early.deleted_before;
            early.finish(report).await?;
            unseen
        }
        None => carried.saturating_add(deleted),
    };
    if !analyze::worth_refreshing(unseen, left) {
        return Ok(());
    }
    if analyze::engine_refreshes_statistics(db).await {
        report.notes.push(format!(
            "planner statistics: left to {}'s automatic refresh after this large purge",
            db.engine()
        ));
        return Ok(());
    }
    let t = Instant::now();
    let result = analyze::refresh_statistics(db, fence, &schema.sessions.table, retried).await;
    tracing::debug!(
        ms = t.elapsed().as_secs_f64() * 1000.0,
        "statistics refreshed"
    );
    record_refresh(result, report)
}

/// The original `--stats`, plus what a cleanup with `params` would delete per rule.
pub async fn stats(db: &Db, params: &CleanupParams) -> Result<CleanupStats, OpError> {
    params.validate()?;
    let retried = RetriedReads::default();
    let (schema, compare) = detect_schema(db, &retried).await?;
    let (now, clock_note) = reference_now(db, &retried).await?;
    let cutoffs = params.cutoffs(now);
    let as_of = cutoffs.as_of;
    let (rules, notes) = rules::build(&schema, &cutoffs, compare);
    let activity = format!("{}.{}", schema.sessions.table, schema.activity_column());
    let bucket = |op: &str, hours: i64| Predicate {
        sql: format!("{activity} {op} ?"),
        binds: vec![as_of - chrono::Duration::hours(hours)],
    };
    let counted = async |pred: Option<&Predicate>| {
        read_with_retries("statistics count", &retried, || count(db, &schema, pred)).await
    };
    let by_rule = count_per_rule(db, &schema, &rules, &retried).await?;
    let all_rules: Vec<&Predicate> = rules.iter().map(|r| &r.as_written).collect();
    let total_sessions = counted(None).await?;
    let recent_sessions_24h = counted(Some(&bucket(">=", 24))).await?;
    let old_sessions_48h = counted(Some(&bucket("<", 48))).await?;
    let very_old_sessions_week = counted(Some(&bucket("<", 7 * 24))).await?;
    let missing_platform_sessions =
        MissingPlatformCount::start(db, &schema, &all_rules, false, &retried)
            .finish()
            .await?;
    let referenced_sessions_kept = match rules::kept_by_references(&schema, &rules) {
        Some(kept) => Some(counted(Some(&kept)).await?),
        None => None,
    };
    let mut all_notes = schema.notes.clone();
    all_notes.extend(clock_note);
    all_notes.extend(notes);
    all_notes.extend(retried.note());
    Ok(CleanupStats {
        timestamp: Utc::now(),
        as_of,
        schema: schema.version.to_string(),
        total_sessions,
        recent_sessions_24h,
        old_sessions_48h,
        very_old_sessions_week,
        rules: by_rule,
        expired_sessions: by_rule.expired_total(),
        orphaned_sessions: by_rule.orphaned,
        missing_platform_sessions,
        referenced_sessions_kept,
        cleanup_interval: params.interval_secs,
        batch_size: params.batch_size,
        max_session_age: params.max_age_secs,
        target_batch_ms: params.effective_target_batch_ms(db.engine()),
        rest_ratio: params.effective_rest_ratio(db.engine()),
        parallel_reads: params.parallel_reads,
        notes: all_notes,
    })
}

/// A rule's count: running in the background, or to run when awaited.
type PendingCount = futures::future::BoxFuture<'static, Result<u64, sqlx::Error>>;

/// For each index-walked rule, the rows it will delete (matching it and no earlier rule),
/// counted one after another: with `in_background`, the first rule starts as soon as its own
/// count is in and the later counts run while it deletes; without, each count runs when its
/// rule comes up. The first count stops at the dense share of `table_rows`
/// ([`DENSE_RULE_SHARE`]): past it only "dense" matters, and a rule matching most of the
/// table (the first big purge) is then known in a third of the reading. `None` for other
/// walks. The background counts run in a task of `tasks`, which ends them when dropped.
fn count_index_walked(
    db: &Db,
    schema: &Schema,
    rules: &[rules::Rule],
    table_rows: u64,
    in_background: bool,
    tasks: &mut tokio::task::JoinSet<()>,
    retried: &RetriedReads,
) -> Vec<Option<PendingCount>> {
    let all: Vec<&Predicate> = rules.iter().map(|r| &r.as_written).collect();
    let mut counts: Vec<(usize, PendingCount)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if matches!(rule.walk, rules::Walk::Column(_)) {
            let (db, schema, retried) = (db.clone(), schema.clone(), retried.clone());
            let pred = rule.predicate.and_none_of(&all[..i]);
            let first = counts.is_empty();
            counts.push((
                i,
                Box::pin(async move {
                    read_with_retries("rule count", &retried, || async {
                        if first {
                            count_up_to(&db, &schema, &pred, dense_rows(table_rows)).await
                        } else {
                            count_in_background(&db, &schema, Some(&pred)).await
                        }
                    })
                    .await
                }),
            ));
        }
    }
    let mut pending: Vec<Option<PendingCount>> = rules.iter().map(|_| None).collect();
    if !in_background {
        for (i, count) in counts {
            pending[i] = Some(count);
        }
        return pending;
    }
    let mut queue = Vec::new();
    for (i, count) in counts {
        let (answer, rx) = tokio::sync::oneshot::channel();
        queue.push((count, answer));
        pending[i] = Some(Box::pin(async move {
            rx.await.map_err(|_| {
                sqlx::Error::Protocol("the rule count task ended without an answer".into())
            })?
        }));
    }
    tasks.spawn(async move {
        for (count, answer) in queue {
            if answer.send(count.await).is_err() {
                return; // The run ended.
            }
        }
    });
    pending
}

/// Matching rows from which a rule in a table of `table_rows` rows is dense.
fn dense_rows(table_rows: u64) -> u64 {
    ((DENSE_RULE_SHARE * table_rows as f64).ceil() as u64).max(1)
}

/// The rule with the walk its density calls for (see [`DENSE_RULE_SHARE`]), or `None` when an
/// index-walked rule has nothing to delete (walking its index to find that out can take
/// seconds). `matching` is its count from [`count_index_walked`].
fn plan_walk(rule: &rules::Rule, matching: Option<u64>, table_rows: u64) -> Option<rules::Rule> {
    let mut rule = rule.clone();
    if let Some(matching) = matching {
        if matching == 0 {
            return None;
        }
        if matching >= dense_rows(table_rows) {
            tracing::debug!(rule = ?rule.kind, matching, table_rows, "dense rule (count stops at the dense share): deleting primary-key ranges");
            rule.walk = rules::Walk::PrimaryKeyRange;
        }
    }
    Some(rule)
}

/// The target batch duration, ms, when `target_batch_ms` is not set.
///
/// - **PostgreSQL and MySQL/MariaDB: [`DEFAULT_TARGET_BATCH_MS`] (50).** A batch there locks only
///   the rows it deletes; the application barely waits for it.
/// - **SQLite: [`SQLITE_TARGET_BATCH_MS`] (20).** A batch holds the database's one write lock,
///   so an application write arriving meanwhile waits for the whole batch, and single batches
///   stall now and then to twice or three times their size's usual time (cause not
///   established). At 1,000,000 sessions, both sides in each run: at 50 ms the longest
///   transaction took 74–79 ms (119 ms in an ours-only run the same hour) and the
///   application's p99 was 58 ms; at 20 ms 32–37 ms and 36 ms, for 13–17 % less rate
///   (bench/results/cleanup.md, 2026-12-03 17:00–17:14).
pub fn default_target_batch_ms(engine: Engine) -> u64 {
    match engine {
        Engine::Sqlite => SQLITE_TARGET_BATCH_MS,
        Engine::Postgres | Engine::MySql => DEFAULT_TARGET_BATCH_MS,
    }
}

/// How long to sleep after a batch that `held` its locks: `ratio` times that (at least
/// [`SQLITE_MIN_REST`] on SQLite), less the work done since the commit that held no lock
/// (`already`: the SQLite WAL checkpoint).
fn rest_after(engine: Engine, ratio: f64, held: Duration, already: Duration) -> Duration {
    let mut rest = held.mul_f64(ratio);
    if engine == Engine::Sqlite {
        rest = rest.max(SQLITE_MIN_REST);
    }
    rest.saturating_sub(already)
}

/// The rest after each batch, as a multiple of the batch's time, when `rest_ratio` is not set.
///
/// - **SQLite: 1.0.** One writer at a time and no queue for waiting writers: their busy
///   handlers poll with growing sleeps, so back-to-back batches starve them until their busy
///   timeout runs out. Resting as long as the lock was held leaves it free half the time.
/// - **MySQL/MariaDB: 1.0.** Lock waiters queue fairly, but under back-to-back deletes single
///   batches and COMMITs stall on a server whose buffer pool and redo log the table outgrows
///   (MariaDB's defaults, 128 MiB and 96 MiB). There, at 1,000,000 sessions, the longest
///   transaction was over 100 ms in 6 of 8 runs without rests and in 4 of 18 with, at
///   0.86–1.56× the plain `DELETE`'s rate instead of 1.52–1.93×. With 2 GiB and 1 GiB it was
///   55–86 ms without rests, and a rest of 1 only halved the rate: set 0 for a server sized
///   for its data. With only one of the two enlarged, rests were never worse for the longest
///   transaction (bench/results/cleanup.md, 2026-12-03 22:13–22:46). Replicas apply the
///   batches one after another too, so rests also bound their lag.
/// - **PostgreSQL: 0.** Rests lowered the application's median latency but not its p99, and
///   cost a quarter to two fifths of the rate (bench/results/cleanup.md, 2026-12-03 08:58–10:30).
pub fn default_rest_ratio(engine: Engine) -> f64 {
    match engine {
        Engine::Sqlite | Engine::MySql => 1.0,
        Engine::Postgres => 0.0,
    }
}

/// Highest accepted `rest_ratio`.
pub const MAX_REST_RATIO: f64 = 100.0;

/// Shortest rest between two SQLite batches, whatever the ratio: a writer polling for the lock
/// must find it free now and then.
pub const SQLITE_MIN_REST: Duration = Duration::from_millis(10);

/// Why the run should stop before the next batch, if it should. The budget only counts once
/// a batch has run, so every part makes progress.
fn stop_reason(
    ctx: &OpContext,
    budget: Option<Duration>,
    started: Instant,
    batches: u64,
) -> Option<Outcome> {
    if ctx.cancel.is_cancelled() {
        return Some(Outcome::Cancelled);
    }
    match budget {
        Some(b) if batches > 0 && started.elapsed() >= b => Some(Outcome::BudgetSpent),
        _ => None,
    }
}

/// Counts the sessions a rule matches but a restricting foreign key keeps (see
/// `store::references`), into the report with a note naming the keys. After the purge, they
/// are what is left of the rules' rows, so the count is short except for the orphan rule's
/// join. Report-only: a failed count leaves the figure out, and so does a cancellation (a
/// stopping worker does not wait for it; the count is stopped on the server).
async fn count_kept_by_references(
    ctx: &OpContext,
    schema: &Schema,
    rules: &[rules::Rule],
    report: &mut CleanupReport,
    retried: &RetriedReads,
) {
    let Some(kept) = rules::kept_by_references(schema, rules) else {
        return;
    };
    let db = &ctx.db;
    let counting = read_with_retries("referenced-session count", retried, || {
        count(db, schema, Some(&kept))
    });
    match unless_cancelled(ctx, counting).await {
        None => report.notes.push(
            "the count of sessions kept by references was cut short by a cancellation".into(),
        ),
        Some(Ok(n)) => {
            report.referenced_sessions_kept = Some(n);
            if n > 0 {
                tracing::warn!(
                    sessions = n,
                    "sessions due for cleanup are kept: other rows still reference them"
                );
                report.notes.push(referenced_note(schema, n));
            }
        }
        Some(Err(e)) => report
            .errors
            .push(format!("counting sessions kept by references failed: {e}")),
    }
}

/// Why `n` sessions a rule matches were left in place.
fn referenced_note(schema: &Schema, n: u64) -> String {
    let keys = schema
        .references
        .iter()
        .map(|r| r.describe())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{n} session(s) due for cleanup were kept: rows in {keys} still reference them and the key's ON DELETE rule forbids deleting them; they go once those rows do"
    )
}

/// Rows each rule would delete in a sequential run: matching it and none of the rules before.
async fn count_per_rule(
    db: &Db,
    schema: &Schema,
    rules: &[rules::Rule],
    retried: &RetriedReads,
) -> Result<RuleCounts, OpError> {
    let mut counts = RuleCounts::default();
    for (i, rule) in rules.iter().enumerate() {
        let earlier: Vec<&Predicate> = rules[..i].iter().map(|r| &r.as_written).collect();
        let exclusive = rule.predicate.and_none_of(&earlier);
        let n = read_with_retries("rule count", retried, || {
            count(db, schema, Some(&exclusive))
        })
        .await?;
        counts.add(rule.kind, n);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_follows_the_ratio_with_sqlite_s_floor_and_counts_the_checkpoint() {
        let ms = Duration::from_millis;
        assert_eq!(rest_after(Engine::MySql, 1.0, ms(40), ms(0)), ms(40));
        assert_eq!(rest_after(Engine::MySql, 0.5, ms(40), ms(0)), ms(20));
        assert_eq!(rest_after(Engine::Postgres, 0.0, ms(40), ms(0)), ms(0));
        assert_eq!(rest_after(Engine::Postgres, 2.0, ms(40), ms(0)), ms(80));
        assert_eq!(
            rest_after(Engine::Sqlite, 0.0, ms(40), ms(0)),
            SQLITE_MIN_REST
        );
        assert_eq!(rest_after(Engine::Sqlite, 1.0, ms(40), ms(15)), ms(25));
        assert_eq!(rest_after(Engine::Sqlite, 1.0, ms(40), ms(60)), ms(0));
    }

    #[test]
    fn each_engine_has_its_own_batch_target_and_rest_unless_told_otherwise() {
        let default = CleanupParams::default();
        let effective = |p: &CleanupParams, e: Engine| {
            (p.effective_target_batch_ms(e), p.effective_rest_ratio(e))
        };
        assert_eq!(effective(&default, Engine::Sqlite), (20, 1.0));
        assert_eq!(effective(&default, Engine::MySql), (50, 1.0));
        assert_eq!(effective(&default, Engine::Postgres), (50, 0.0));
        let chosen = CleanupParams {
            target_batch_ms: Some(75),
            rest_ratio: Some(0.25),
            ..CleanupParams::default()
        };
        for engine in [Engine::Sqlite, Engine::Postgres, Engine::MySql] {
            assert_eq!(effective(&chosen, engine), (75, 0.25));
        }
        let zero = CleanupParams {
            target_batch_ms: Some(0),
            ..CleanupParams::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn a_payload_without_a_target_leaves_it_to_the_engine_and_an_old_one_keeps_its_own() {
        let json = serde_json::to_value(CleanupParams::default()).expect("serialize");
        for key in ["target_batch_ms", "rest_ratio"] {
            assert!(
                json.get(key).is_none(),
                "an unset {key} is left out, so an older worker reads its own default: {json}"
            );
        }
        let old: CleanupParams =
            serde_json::from_str(r#"{"batch_size": 100, "target_batch_ms": 50}"#)
                .expect("old payload");
        assert_eq!(old.target_batch_ms, Some(50));
        assert_eq!(old.effective_target_batch_ms(Engine::Sqlite), 50);
        assert!(
            old.parallel_reads,
            "a payload from before parallel_reads keeps the reads beside the batches"
        );
    }

    #[test]
    fn a_rest_ratio_out_of_range_is_refused() {
        for bad in [-0.5, MAX_REST_RATIO + 1.0, f64::NAN, f64::INFINITY] {
            let p = CleanupParams {
                rest_ratio: Some(bad),
                ..CleanupParams::default()
            };
            let err = p.validate().expect_err("refused").to_string();
            assert!(err.contains("rest ratio must be from 0 to"), "{err}");
        }
        for good in [0.0, 0.5, MAX_REST_RATIO] {
            let p = CleanupParams {
                rest_ratio: Some(good),
                ..CleanupParams::default()
            };
            assert!(p.validate().is_ok(), "{good}");
        }
    }

    /// Cutoffs billions of hours back leave chrono's calendar and panicked the worker: the
    /// largest ages are refused, and the largest accepted still make cutoffs.
    #[test]
    fn ages_past_ten_years_are_refused_and_the_limits_still_make_cutoffs() {
        let payload = CleanupParams {
            max_age_secs: u64::MAX,
            ..CleanupParams::default()
        };
        let err = payload.validate().expect_err("refused").to_string();
        assert!(err.contains("max age must be at most"), "{err}");
        let forced = CleanupParams {
            force: true,
            force_max_age_hours: Some(u32::MAX),
            ..CleanupParams::default()
        };
        let err = forced.validate().expect_err("refused").to_string();
        assert!(err.contains("--max-age must be at most"), "{err}");
        let longest = CleanupParams {
            max_age_secs: MAX_AGE_LIMIT_SECS,
            force: true,
            force_max_age_hours: Some(FORCE_MAX_AGE_LIMIT_HOURS),
            ..CleanupParams::default()
        };
        assert!(longest.validate().is_ok());
        let c = longest.cutoffs(Utc::now().naive_utc());
        assert!(c.max_age < c.as_of && c.idle.is_some_and(|i| i < c.as_of));
    }

    /// A continuation's `as_of` comes from another worker's clock: a little ahead of ours it
    /// is taken as now (never later: that would purge live sessions), far ahead it is refused.
    /// Fails if a skewed clock dead-letters the continuation.
    #[test]
    fn an_as_of_slightly_ahead_is_taken_as_now_and_far_ahead_refused() {
        let now = Utc::now().naive_utc();
        let ahead = CleanupParams {
            as_of: Some(now + chrono::TimeDelta::seconds(5)),
            ..CleanupParams::default()
        };
        assert!(
            ahead.validate().is_ok(),
            "a few seconds of skew is no error"
        );
        assert!(ahead.cutoffs(Utc::now().naive_utc()).as_of <= Utc::now().naive_utc());
        let far = CleanupParams {
            as_of: Some(now + CLOCK_SKEW_ALLOWANCE + chrono::TimeDelta::seconds(5)),
            ..CleanupParams::default()
        };
        let err = far.validate().expect_err("refused").to_string();
        assert!(err.contains("in the future"), "{err}");
        let past = now - chrono::TimeDelta::hours(1);
        let earlier = CleanupParams {
            as_of: Some(past),
            ..CleanupParams::default()
        };
        assert_eq!(
            earlier.cutoffs(Utc::now().naive_utc()).as_of,
            past,
            "a past as_of is kept"
        );
    }
}
