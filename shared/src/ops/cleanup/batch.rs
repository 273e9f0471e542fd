//! One batch: find up to N candidate ids along an index, then delete them in a short fenced
//! transaction that re-checks the rule. Plus the batch-size controller and the counting query.

use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use sqlx::Row;

use super::rules::{Predicate, Rule, RuleKind, Walk, id_as_i64};
use super::stream::IdStream;
use crate::fence::Fence;
use crate::ops::OpError;
use crate::store::{BatchWriter, Db, DbTx, Engine, ReadConnection, Schema};

/// Where the walk of one rule stands: the next batch starts at (or after) this point.
#[derive(Debug, Clone, PartialEq)]
pub enum Cursor {
    /// Nothing read yet.
    Start,
    /// Walking a time column: the next batch reads values `>=` this one. Inclusive, because
    /// rows sharing the last value may have been left out by the LIMIT; those already deleted
    /// are gone, so nothing is read twice.
    Time(NaiveDateTime),
    /// [`Cursor::Time`] on SQLite, where a time column holds whatever was written: the last
    /// value as stored, bound back as it is.
    Stored(StoredValue),
    /// Walking the primary key: the next batch reads ids `>` this one.
    Id(i64),
}

/// A SQLite value as stored, in its own storage class. Bound back as the walk's lower bound
/// (`col >= ?`), it compares as the column's index orders it — numbers before text, text as
/// written — whatever the value looks like: text in any layout (`2020-06-01`), Unix
/// seconds. Read as a date-time instead, such a value failed to decode, and every run failed
/// at the same batch without deleting anything.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredValue {
    /// An integer.
    Integer(i64),
    /// A floating-point number.
    Real(f64),
    /// Text, and anything else as SQLite writes it as text.
    Text(String),
}

impl StoredValue {
    /// The value from SQLite's `typeof(v)`, `CAST(v AS TEXT)` and `CAST(v AS REAL)`.
    fn from_parts(kind: &str, text: String, real: f64) -> StoredValue {
        match kind {
            "integer" => text
                .parse()
                .map_or(StoredValue::Text(text), StoredValue::Integer),
            "real" => StoredValue::Real(real),
            _ => StoredValue::Text(text),
        }
    }
}

/// The rows one batch will delete, as the DELETE names them.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// These ids (each re-checked against the rule).
    Ids(Vec<i64>),
    /// Every row with an id in `after < id <= upto` that matches the rule.
    Range {
        /// Exclusive lower bound.
        after: i64,
        /// Inclusive upper bound.
        upto: i64,
    },
}

/// One batch's candidates and the cursor after them.
pub struct Candidates {
    /// What to delete.
    pub batch: Batch,
    /// Rows the batch covers: ids found, or the rows a range is expected to hold.
    pub rows: u32,
    /// Where the next batch starts.
    pub next: Cursor,
    /// True when this is the walk's last batch.
    pub last: bool,
}

impl Candidates {
    fn ids(ids: Vec<i64>, next: Cursor, limit: u32) -> Candidates {
        let rows = ids.len() as u32;
        Candidates {
            batch: Batch::Ids(ids),
            rows,
            next,
            last: rows < limit,
        }
    }
}

/// The stretch of primary key a range walk covers: from the first to the last row matching
/// the rule when it starts (so a continuation does not re-walk what an earlier part emptied).
/// Rows inserted later get higher ids: they are newer than the run's reference time and left
/// to the next run.
#[derive(Debug, Clone, Copy)]
pub struct IdSpan {
    first: i64,
    last: i64,
}

impl IdSpan {
    /// Reads the lowest and highest id matching `pred`; `None` when nothing matches.
    pub async fn read(
        db: &Db,
        schema: &Schema,
        pred: &Predicate,
    ) -> Result<Option<IdSpan>, sqlx::Error> {
        let t = &schema.sessions.table;
        // Cast the aggregate, not the column, so the engine reads both ends off the key.
        let id = format!("{t}.{}", schema.sessions.id);
        let sql = db.sql(format!(
            "SELECT {}, {} FROM {t} WHERE {}",
            id_as_i64(db.engine(), &format!("MIN({id})")),
            id_as_i64(db.engine(), &format!("MAX({id})")),
            pred.sql
        ));
        let (first, last): (Option<i64>, Option<i64>) = crate::on_pool!(db, p => {
            let mut q = sqlx::query_as::<_, (Option<i64>, Option<i64>)>(sql);
            for b in &pred.binds {
                q = q.bind(*b);
            }
            q.fetch_one(p).await?
        });
        Ok(match (first, last) {
            (Some(first), Some(last)) => Some(IdSpan { first, last }),
            _ => None,
        })
    }

    /// The range of the next `rows` rows of the table after `cursor`, found along the primary
    /// key, so no range holds more than `rows` rows whatever the ids look like: a stride
    /// computed from the span's average density once turned one outlying id (an explicit
    /// insert, a bumped sequence) or a stale row estimate into a batch of the whole purge.
    pub async fn next(
        &self,
        db: &Db,
        schema: &Schema,
        cursor: Cursor,
        rows: u32,
    ) -> Result<Candidates, sqlx::Error> {
        let after = match cursor {
            Cursor::Id(v) => v,
            _ => self.first - 1,
        };
        let t = &schema.sessions.table;
        let id = format!("{t}.{}", schema.sessions.id);
        let sql = db.sql(format!(
            "SELECT {} FROM {t} WHERE {id} > ? AND {id} <= ? ORDER BY {id} LIMIT 1 OFFSET ?",
            id_as_i64(db.engine(), &id)
        ));
        let rows = rows.max(1);
        let end: Option<i64> = crate::on_pool!(db, p => sqlx::query_scalar(sql)
            .bind(after)
            .bind(self.last)
            .bind(i64::from(rows) - 1)
            .fetch_optional(p)
            .await?);
        // Fewer than `rows` rows are left: the range runs to the span's end.
        let upto = end.unwrap_or(self.last);
        Ok(Candidates {
            batch: Batch::Range { after, upto },
            rows,
            next: Cursor::Id(upto),
            last: upto >= self.last,
        })
    }
}

/// Where a rule's batches come from, per its [`Walk`].
pub enum Source {
    /// Read the next ids along the index of this time column before each batch.
    Index(String),
    /// Ranges of the primary key.
    Range(IdSpan),
    /// One read streaming every matching id.
    Stream(Box<IdStream>),
}

impl Source {
    /// Opens the source of `rule`, using `prefetched` for a
    /// stream opened earlier; `None` when a range walk finds nothing to walk.
    pub async fn open(
        db: &Db,
        schema: &Schema,
        rule: &Rule,
        prefetched: Option<IdStream>,
        retried: &super::retry::RetriedReads,
    ) -> Result<Option<Source>, sqlx::Error> {
        Ok(match &rule.walk {
            Walk::Column(col) => Some(Source::Index(col.clone())),
            Walk::PrimaryKeyRange => super::retry::read_with_retries("key span", retried, || {
                IdSpan::read(db, schema, &rule.predicate)
            })
            .await?
            .map(Source::Range),
            Walk::PrimaryKey => {
                Some(Source::Stream(Box::new(prefetched.unwrap_or_else(|| {
                    IdStream::open(db, schema, &rule.predicate)
                }))))
            }
        })
    }

    /// True for one streamed read, which cannot be asked for the same ids twice.
    pub fn is_stream(&self) -> bool {
        matches!(self, Source::Stream(_))
    }

    /// A line for the report when a streamed read broke and was reopened: the batches' own
    /// retries are reported the same way.
    pub fn reopen_note(&self, rule: RuleKind) -> Option<String> {
        let Source::Stream(ids) = self else {
            return None;
        };
        let (times, last) = ids.breaks()?;
        Some(format!(
            "rule {rule:?}: its streamed read broke {times} time(s) and was reopened after the last id it delivered (last: {last})"
        ))
    }

    /// The next batch of about `limit` rows after `cursor`.
    pub async fn next(
        &mut self,
        db: &Db,
        schema: &Schema,
        pred: &Predicate,
        cursor: Cursor,
        limit: u32,
    ) -> Result<Candidates, sqlx::Error> {
        match self {
            Source::Index(col) => select_along_index(db, schema, pred, col, cursor, limit).await,
            Source::Range(span) => span.next(db, schema, cursor, limit).await,
            Source::Stream(ids) => {
                let ids = ids.next_batch(limit).await?;
                let next = ids.last().map_or(cursor, |v| Cursor::Id(*v));
                Ok(Candidates::ids(ids, next, limit))
            }
        }
    }
}

/// Reads the ids of the next `limit` rows matching `pred` along the index of `col`, from
/// `cursor` on, outside any transaction: a plain read takes no write lock, and the DELETE
/// re-checks the rule anyway.
async fn select_along_index(
    db: &Db,
    schema: &Schema,
    pred: &Predicate,
    col: &str,
    cursor: Cursor,
    limit: u32,
) -> Result<Candidates, sqlx::Error> {
    let t = &schema.sessions.table;
    let id_expr = id_as_i64(db.engine(), &format!("{t}.{}", schema.sessions.id));
    let bound_sql = match cursor {
        Cursor::Time(_) | Cursor::Stored(_) => format!(" AND {col} >= ?"),
        Cursor::Start | Cursor::Id(_) => String::new(),
    };
    // The limit is a parameter, not text: the size changes nearly every batch, and a new text
    // is a new prepared statement on the server and in the connection's cache.
    // Read back as the engine's plain date-time, which decodes as `NaiveDateTime` whatever the
    // column's type: a PostgreSQL `timestamptz` or MySQL `TIMESTAMP` column (in the session's
    // UTC) would fail to decode on every batch. On SQLite, as stored (see `StoredValue`).
    let col_value = match db.engine() {
        Engine::Postgres => format!("CAST({col} AS TIMESTAMP)"),
        Engine::MySql => format!("CAST({col} AS DATETIME(6))"),
        Engine::Sqlite => format!("typeof({col}), CAST({col} AS TEXT), CAST({col} AS REAL)"),
    };
    let sql = db.sql(format!(
        "SELECT {id_expr}, {col_value} FROM {t} WHERE ({}){bound_sql} ORDER BY {col} LIMIT ?",
        pred.sql
    ));
    let sqlite = db.engine() == Engine::Sqlite;
    let rows: Vec<(i64, Cursor)> = crate::on_pool!(db, p => {
        let mut q = sqlx::query(sql);
        for b in &pred.binds {
            q = q.bind(*b);
        }
        q = match &cursor {
            Cursor::Time(v) => q.bind(*v),
            Cursor::Stored(StoredValue::Integer(v)) => q.bind(*v),
            Cursor::Stored(StoredValue::Real(v)) => q.bind(*v),
            Cursor::Stored(StoredValue::Text(v)) => q.bind(v.clone()),
            Cursor::Start | Cursor::Id(_) => q,
        };
        q.bind(i64::from(limit)).fetch_all(p).await?.iter()
            .map(|r| {
                let at = if sqlite {
                    Cursor::Stored(StoredValue::from_parts(
                        &r.try_get::<String, _>(1)?,
                        r.try_get::<String, _>(2)?,
                        r.try_get::<f64, _>(3)?,
                    ))
                } else {
                    Cursor::Time(r.try_get::<NaiveDateTime, _>(1)?)
                };
                Ok((r.try_get::<i64, _>(0)?, at))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
    });
    let next = rows.last().map_or(cursor, |(_, at)| at.clone());
    let ids = rows.into_iter().map(|(i, _)| i).collect();
    Ok(Candidates::ids(ids, next, limit))
}

/// What one committed batch did.
pub struct BatchResult {
    /// Rows deleted.
    pub deleted: u64,
    /// Time the transaction was open: from BEGIN returning to the end of COMMIT.
    pub took: Duration,
    /// The part of `took` spent in COMMIT: tells a slow statement from a slow commit.
    pub committing: Duration,
}

/// A batch that failed.
#[derive(Debug)]
pub struct BatchFailed {
    /// Why.
    pub error: OpError,
    /// The rows its DELETE had deleted when its COMMIT failed, if that is where it failed.
    /// The server may have committed them before the reply was lost; the retry then finds
    /// them gone and deletes none, so they are in no count.
    pub unconfirmed: Option<u64>,
}

/// Deletes the rows of `batch` that still match `rule`, in one transaction that first
/// advances the fence. A session the application touched since the read no longer matches
/// and survives.
pub async fn purge_batch(
    writer: &mut BatchWriter,
    fence: &Fence,
    schema: &Schema,
    rule: &Rule,
    batch: &Batch,
) -> Result<BatchResult, BatchFailed> {
    let mut unconfirmed = None;
    let result = async {
        // Timed from the moment the write transaction is open (on SQLite: the write lock is
        // held), not while BEGIN waits for other writers: this is how long we block others.
        let mut tx = writer.begin().await?;
        let started = Instant::now();
        let work = async {
            fence.advance(&mut tx).await?;
            postgres_batch_settings(&mut tx).await?;
            plan_id_list_recheck(&mut tx, rule, batch).await?;
            Ok::<_, OpError>(delete_matching(&mut tx, schema, &rule.predicate, batch).await?)
        };
        let deleted = match work.await {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        let commit_started = Instant::now();
        unconfirmed = Some(deleted);
        tx.commit().await?;
        Ok(BatchResult {
            deleted,
            took: started.elapsed(),
            committing: commit_started.elapsed(),
        })
    }
    .await;
    match result {
        Ok(_) => writer.release_connection().await,
        Err(_) => writer.discard_connection(),
    }
    result.map_err(|error| BatchFailed { error, unconfirmed })
}

/// How long a batch's statements wait for a row lock before they give up: PostgreSQL
/// `lock_timeout` for the batch's transaction only, MySQL/MariaDB `innodb_lock_wait_timeout`
/// on the connection the batch writer takes for the batch (`store::BatchWriter`). An application transaction
/// holding a lock on an expired session — a stuck request, a connection left idle in its
/// transaction — would otherwise hold the batch, and the rows and fence it has locked, for as
/// long as it lasts (MySQL's default: 50 s), past any budget or shutdown. Given up, the batch
/// rolls back and is tried again after a backoff (`retry`); far above the application's
/// ordinary lock waits of milliseconds.
pub const BATCH_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// A PostgreSQL batch's settings, for its transaction only:
/// - `lock_timeout` = [`BATCH_LOCK_TIMEOUT`];
/// - `synchronous_commit = off`: the COMMIT does not wait for the WAL to reach the disk.
///   Waiting made the application's own commits queue behind each batch's flush of several
///   megabytes, so its operations stalled for a whole batch at a time. A crash can forget the
///   last batches of a run, at most about three `wal_writer_delay`s of them: those sessions
///   are still expired and the next run deletes them. The fence is unharmed: the token was
///   issued in a durable transaction and a batch only writes the same token again.
async fn postgres_batch_settings(tx: &mut DbTx<'_>) -> Result<(), sqlx::Error> {
    if let DbTx::Postgres(c) = tx {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL synchronous_commit = off; SET LOCAL lock_timeout = {}",
            BATCH_LOCK_TIMEOUT.as_millis()
        )))
        .execute(&mut **c)
        .await?;
    }
    Ok(())
}

/// PostgreSQL re-plans the orphan re-check of a list of more than about 1,400 ids as a hash
/// anti-join over every user — ten times the cost per row — which capped those batches there.
/// Probing the users key per listed row stays linear, so the batch can grow to its target;
/// the setting ends with the transaction.
async fn plan_id_list_recheck(
    tx: &mut DbTx<'_>,
    rule: &Rule,
    batch: &Batch,
) -> Result<(), sqlx::Error> {
    if let (DbTx::Postgres(c), RuleKind::Orphaned, Batch::Ids(_)) = (tx, rule.kind, batch) {
        sqlx::raw_sql("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
            .execute(&mut **c)
            .await?;
    }
    Ok(())
}

async fn delete_matching(
    tx: &mut DbTx<'_>,
    schema: &Schema,
    pred: &Predicate,
    batch: &Batch,
) -> Result<u64, sqlx::Error> {
    let t = &schema.sessions.table;
    let id = format!("{t}.{}", schema.sessions.id);
    // Placeholders in text order: the batch's ids or bounds, then the rule's.
    let (rows_sql, ids) = match batch {
        Batch::Ids(ids) => id_list(tx.engine(), &id, ids),
        Batch::Range { after, upto } => (
            format!("{id} > ? AND {id} <= ?"),
            IdBinds::Each(vec![*after, *upto]),
        ),
    };
    let sql = tx.sql(format!(
        "DELETE FROM {t} WHERE {rows_sql} AND ({})",
        pred.sql
    ));
    if let (DbTx::Postgres(c), IdBinds::Array(ids)) = (&mut *tx, &ids) {
        let mut q = sqlx::query(sql).bind(ids.as_slice());
        for b in &pred.binds {
            q = q.bind(*b);
        }
        return Ok(q.execute(&mut **c).await?.rows_affected());
    }
    let IdBinds::Each(ids) = ids else {
        unreachable!("an id array is only built for PostgreSQL")
    };
    crate::on_tx!(tx, c => {
        let mut q = sqlx::query(sql);
        for id in &ids {
            q = q.bind(*id);
        }
        for b in &pred.binds {
            q = q.bind(*b);
        }
        Ok(q.execute(&mut *c).await?.rows_affected())
    })
}

/// How a batch's ids are bound.
enum IdBinds {
    /// One array parameter (PostgreSQL).
    Array(Vec<i64>),
    /// One parameter each.
    Each(Vec<i64>),
}

/// The condition naming a batch's ids, and its binds. Batch sizes change nearly every batch,
/// and each distinct statement text is prepared anew — parsed while the batch holds its locks
/// (13 ms for 20,000 placeholders on PostgreSQL here) and kept in the connection's statement
/// cache and the server's memory (~250 KB per 1,500-placeholder statement on PostgreSQL). So
/// PostgreSQL gets one text for every size, `= ANY` of an array; engines without array
/// parameters get one text per [`id_list_slots`] size, padded by repeating the last id, which
/// `IN` ignores.
fn id_list(engine: Engine, id: &str, ids: &[i64]) -> (String, IdBinds) {
    if engine == Engine::Postgres {
        return (format!("{id} = ANY(?)"), IdBinds::Array(ids.to_vec()));
    }
    let slots = id_list_slots(ids.len());
    let mut binds = Vec::with_capacity(slots);
    binds.extend_from_slice(ids);
    if let Some(last) = ids.last() {
        binds.resize(slots, *last);
    }
    let sql = format!("{id} IN ({})", vec!["?"; binds.len()].join(", "));
    (sql, IdBinds::Each(binds))
}

/// Placeholders for a list of `n` ids where each needs its own: `n` rounded up to a multiple
/// of an eighth of the next power of two — four sizes per doubling, at most 25 % padding —
/// so a rule whose batch sizes wander within a factor of two uses four statements. Up to 8
/// ids, exactly `n`.
fn id_list_slots(n: usize) -> usize {
    if n <= 8 {
        return n;
    }
    let step = n.next_power_of_two() / 8;
    n.div_ceil(step) * step
}

/// Counts the session rows matching `pred` (all rows when `None`).
pub async fn count(db: &Db, schema: &Schema, pred: Option<&Predicate>) -> Result<u64, sqlx::Error> {
    count_with(db, schema, pred, None, false).await
}

/// Counts the session rows matching `pred`, but stops at `limit`: enough to tell whether a
/// rule is dense without reading all of its matches first.
pub async fn count_up_to(
    db: &Db,
    schema: &Schema,
    pred: &Predicate,
    limit: u64,
) -> Result<u64, sqlx::Error> {
    count_with(db, schema, Some(pred), Some(limit), false).await
}

/// [`count`] for a count that runs beside the batches: on one core, so it does not take the
/// cores they need (see [`DbTx::without_parallel_workers`]).
pub async fn count_in_background(
    db: &Db,
    schema: &Schema,
    pred: Option<&Predicate>,
) -> Result<u64, sqlx::Error> {
    count_with(db, schema, pred, None, true).await
}

async fn count_with(
    db: &Db,
    schema: &Schema,
    pred: Option<&Predicate>,
    limit: Option<u64>,
    background: bool,
) -> Result<u64, sqlx::Error> {
    // A count is often raced against a cancellation: one given up is cancelled on the server.
    let mut conn = db.cancellable_connection().await?;
    conn.run(async |c| count_in(c.begin().await?, schema, pred, limit, background).await)
        .await
}

/// [`count_in_background`] on `conn`, whose server session the caller knows, so it can
/// cancel the count on the server ([`Db::cancel_statement`]).
pub async fn count_in_background_on(
    conn: &mut ReadConnection,
    schema: &Schema,
    pred: Option<&Predicate>,
) -> Result<u64, sqlx::Error> {
    count_in(conn.begin().await?, schema, pred, None, true).await
}

/// Counts in `tx`, then ends it.
async fn count_in(
    mut tx: DbTx<'_>,
    schema: &Schema,
    pred: Option<&Predicate>,
    limit: Option<u64>,
    background: bool,
) -> Result<u64, sqlx::Error> {
    let t = &schema.sessions.table;
    let (where_sql, binds) = match pred {
        Some(p) => (format!(" WHERE {}", p.sql), p.binds.as_slice()),
        None => (String::new(), &[][..]),
    };
    // Marked: a count given up is cancelled on the server (`Db::cancel_statement`).
    let mark = crate::store::CANCELLABLE;
    let sql = tx.sql(match limit {
        Some(n) => format!(
            "{mark} SELECT COUNT(*) FROM (SELECT 1 AS one FROM {t}{where_sql} LIMIT {n}) AS found"
        ),
        None => format!("{mark} SELECT COUNT(*) FROM {t}{where_sql}"),
    });
    if background {
        tx.without_parallel_workers().await?;
    }
    let n: i64 = crate::on_tx!(&mut tx, c => {
        let mut q = sqlx::query_scalar::<_, i64>(sql);
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_one(&mut *c).await?
    });
    tx.rollback().await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Adapts the batch size so each transaction stays under the target duration: shrink at once
/// to what the last batch's per-row cost says fits, grow gently while well under, and stay
/// below a size that overshot twice right after growing. Cost is not always linear in rows:
/// past some IN-list length a planner may switch to a plan that costs ten times more, so
/// without that memory the size would climb back to the cliff again and again. But a single
/// overshoot is as often a stall (a checkpoint, a WAL flush) that happened to meet a growth
/// step; capping the run on it kept PostgreSQL's batches at 2,900 rows taking 5 ms each, half
/// the plain DELETE's rate.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    size: u32,
    min: u32,
    max: u32,
    target: Duration,
    /// A size that overshot the target right after growing, twice at about the same size: a
    /// confirmed cliff. Only two more such overshoots lower it.
    cliff: f64,
    /// Growth stops short of this size: the cliff, crept up with every batch on target so the
    /// cliff is probed again now and then. An overshoot at the cap lowers it to that size, but
    /// never below the cliff's own cap: stalls at the capped size cannot ratchet it down.
    ceiling: f64,
    /// A size that overshot once right after growing: a cliff if growing to about it
    /// overshoots again, a stall if a batch this large stays on target.
    suspect: Option<u32>,
    /// How the last batch's size came about.
    step: Step,
}

/// How a batch size came about, which decides what an overshoot at it means.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Same or smaller than the last batch: an overshoot is a stall or a slowdown.
    Held,
    /// A growth step into sizes not yet tried: an overshoot may be a cliff.
    Grew,
    /// Up to the ceiling's cap (which creeps): an overshoot there is a failed probe.
    Crept,
}

/// Aim below the target, so normal jitter does not cross it.
const AIM_SHARE: f64 = 0.8;
/// Largest growth step per batch (25 %).
const GROWTH_FACTOR: f64 = 1.25;
/// Grow only while a full batch took less than this share of the target: one growth step
/// later it is still expected at the aim even if its time were all per row. Batch time often
/// grows by less than its rows: on MariaDB here 26 deletions took 22 ms and 130 took 24 ms
/// (reads of index pages dominate at any size), and at half the target, as before, growth
/// stopped with batches of ~150 rows taking 22 ms.
const GROW_BELOW_SHARE: f64 = AIM_SHARE / GROWTH_FACTOR;
/// While a full batch takes less than this share of the target, the size doubles instead:
/// tiny first batches would otherwise take dozens of steps to reach a useful size.
const FAST_GROWTH_BELOW_SHARE: f64 = 0.1;
/// Growth stops at this share of a size that overshot.
const BELOW_CEILING_SHARE: f64 = 0.8;
/// An overshoot right after growing, at this share of a suspect's size or more, is taken as
/// the same size: growth steps are 25 %, so a second probe of a cliff lands within it.
const SAME_SIZE_SHARE: f64 = 0.7;
/// How much the ceiling rises with each batch that stayed on target (0.2 %: a cliff is
/// probed again about every hundred batches).
const CEILING_CREEP: f64 = 1.002;

impl BatchSizer {
    /// A controller starting at `start`, kept within `min..=max`.
    pub fn new(start: u32, min: u32, max: u32, target: Duration) -> BatchSizer {
        let min = min.max(1).min(max.max(1));
        let max = max.max(min);
        BatchSizer {
            size: start.clamp(min, max),
            min,
            max,
            target,
            cliff: f64::INFINITY,
            ceiling: f64::INFINITY,
            suspect: None,
            step: Step::Held,
        }
    }

    /// Rows to ask for in the next batch.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Feeds back how long a batch of `rows` rows took.
    pub fn observe(&mut self, rows: u32, took: Duration) {
        if rows == 0 {
            return;
        }
        let target = self.target.as_secs_f64();
        let took = took.as_secs_f64().max(1e-6);
        let fits = (f64::from(rows) * target * AIM_SHARE / took).floor();
        let next = if took > target {
            match self.step {
                // The creeping ceiling probed the cliff and it is still there — or a stall hit
                // the capped size. Either way probing stops for a while; the ceiling never
                // drops below the cap of the confirmed cliff, so stalls cannot ratchet it down.
                Step::Crept => {
                    self.ceiling = f64::from(rows).max(self.cliff * BELOW_CEILING_SHARE);
                }
                // A cliff shows again at the size it showed at; an overshoot well below the
                // suspect is a stall, and only shrinks the next batch.
                Step::Grew => {
                    let near = |size: u32| f64::from(rows) >= f64::from(size) * SAME_SIZE_SHARE;
                    match self.suspect {
                        Some(first) if near(first) => {
                            self.cliff = self.cliff.min(f64::from(rows.min(first)));
                            self.ceiling = self.cliff;
                            self.suspect = None;
                        }
                        Some(_) => {}
                        None => self.suspect = Some(rows),
                    }
                }
                Step::Held => {}
            }
            fits.min(f64::from(self.size))
        } else {
            if self.suspect.is_some_and(|s| rows >= s) {
                self.suspect = None;
            }
            self.ceiling *= CEILING_CREEP;
            if took < target * GROW_BELOW_SHARE && rows >= self.size {
                let factor = if took < target * FAST_GROWTH_BELOW_SHARE {
                    2.0
                } else {
                    GROWTH_FACTOR
                };
                (f64::from(self.size) * factor)
                    .ceil()
                    .min(fits.max(f64::from(self.size)))
                    .min((self.ceiling * BELOW_CEILING_SHARE).floor())
                    .max(f64::from(self.size))
            } else {
                f64::from(self.size)
            }
        };
        let next = (next as u32).clamp(self.min, self.max);
        self.step = if next <= self.size {
            Step::Held
        } else if f64::from(next) >= (self.ceiling * BELOW_CEILING_SHARE).floor() {
            Step::Crept
        } else {
            Step::Grew
        };
        self.size = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizer_shrinks_fast_and_grows_gently() {
        let mut s = BatchSizer::new(100, 1, 5000, Duration::from_millis(50));
        s.observe(100, Duration::from_millis(200));
        assert_eq!(
            s.size(),
            20,
            "four times over the target: aim at 80 % of what fits"
        );
        s.observe(20, Duration::from_millis(10));
        assert_eq!(
            s.size(),
            25,
            "well under: grow by a quarter, not to what fits"
        );
        s.observe(25, Duration::from_millis(40));
        assert_eq!(s.size(), 25, "near the target: hold");
        s.observe(25, Duration::from_millis(1));
        assert_eq!(s.size(), 50, "far under: double");
        for _ in 0..100 {
            s.observe(s.size(), Duration::from_micros(10));
        }
        assert_eq!(s.size(), 5000, "bounded above");
        s.observe(5000, Duration::from_secs(10_000));
        assert_eq!(s.size(), 1, "bounded below");
    }

    /// Batch time as MariaDB showed it here: 19 ms whatever the size, plus 0.05 ms per row.
    fn mariadb_like_cost(rows: u32) -> Duration {
        Duration::from_secs_f64(0.019 + 0.000_05 * f64::from(rows))
    }

    #[test]
    fn sizer_grows_through_a_fixed_cost_per_batch() {
        let cost = mariadb_like_cost;
        let mut s = BatchSizer::new(100, 1, 20_000, Duration::from_millis(50));
        for _ in 0..40 {
            let rows = s.size();
            s.observe(rows, cost(rows));
        }
        assert!(
            s.size() > 250,
            "grows while a batch takes well under the target: {}",
            s.size()
        );
        assert!(cost(s.size()) <= Duration::from_millis(40), "{}", s.size());
    }

    /// Drives a sizer for `batches` batches, batch `i` (from 1) of `rows` rows taking
    /// `took(i, rows)`, and returns the mean size it chose over the batches after `settle`.
    fn mean_late_size(
        mut s: BatchSizer,
        batches: u32,
        settle: usize,
        took: impl Fn(u32, u32) -> Duration,
    ) -> f64 {
        let mut sizes = Vec::new();
        for i in 1..=batches {
            let rows = s.size();
            s.observe(rows, took(i, rows));
            sizes.push(f64::from(s.size()));
        }
        let late = &sizes[settle..];
        late.iter().sum::<f64>() / late.len() as f64
    }

    #[test]
    fn sizer_is_not_ratcheted_down_by_occasional_stalls() {
        // MariaDB-like costs with a stalled commit (100 ms) every 30th batch.
        let s = BatchSizer::new(100, 1, 20_000, Duration::from_millis(50));
        let mean = mean_late_size(s, 600, 300, |i, rows| {
            if i % 30 == 0 {
                Duration::from_millis(100)
            } else {
                mariadb_like_cost(rows)
            }
        });
        assert!(
            mean > 220.0,
            "stalls shrink one batch each, they set no ceiling: mean late size {mean:.0}"
        );
    }

    #[test]
    fn sizer_is_not_ratcheted_down_by_stalls_near_a_ceiling() {
        // PostgreSQL as the benchmark showed it: 1 µs per row plus 2 ms, and a commit stall of
        // 60-100 ms on every 6th batch whatever its size. Two stalls right after growth steps
        // may pass for a cliff; later stalls at the capped size must not keep lowering it (the
        // rule before this test settled at a mean of 75 rows).
        let s = BatchSizer::new(100, 10, 20_000, Duration::from_millis(50));
        let mean = mean_late_size(s, 400, 200, |i, rows| {
            if i % 6 == 0 {
                Duration::from_millis(60 + u64::from(i % 5) * 10)
            } else {
                Duration::from_secs_f64(0.002 + 0.000_001 * f64::from(rows))
            }
        });
        assert!(
            mean > 8_000.0,
            "stalls shrink one batch each, they do not ratchet the size down: mean late size {mean:.0}"
        );
    }

    #[test]
    fn sizer_grows_past_a_one_off_stall() {
        // 2 µs per row, and one 150 ms stall on the first batch past 3,000 rows.
        let mut s = BatchSizer::new(100, 10, 5000, Duration::from_millis(50));
        let mut stalled = false;
        for _ in 0..30 {
            let rows = s.size();
            let mut took = Duration::from_micros(u64::from(rows) * 2);
            if rows > 3_000 && !stalled {
                stalled = true;
                took = Duration::from_millis(150);
            }
            s.observe(rows, took);
        }
        assert!(stalled, "the run reached the stall");
        assert_eq!(s.size(), 5000, "a single stall is not a cliff");
    }

    #[test]
    fn sizer_ignores_a_second_stall_well_below_the_first() {
        // 2 µs per row; a 150 ms stall on the first batch past 3,000 rows (3,200), and another
        // on the first growth step past 1,000 rows on the way back (1,706): no cliff.
        let mut s = BatchSizer::new(100, 10, 5000, Duration::from_millis(50));
        let (mut first, mut second) = (false, false);
        for _ in 0..40 {
            let rows = s.size();
            let mut took = Duration::from_micros(u64::from(rows) * 2);
            if rows > 3_000 && !first {
                first = true;
                took = Duration::from_millis(150);
            } else if first && rows > 1_000 && !second {
                second = true;
                took = Duration::from_millis(150);
            }
            s.observe(rows, took);
        }
        assert!(first && second, "the run reached both stalls");
        assert_eq!(s.size(), 5000, "stalls at different sizes are not a cliff");
    }

    #[test]
    fn sizer_stays_below_a_size_that_hit_a_cliff() {
        // Cheap per row up to 1,400 rows, ten times dearer past it (a plan change).
        let cost = |rows: u32| {
            let per_row_us = if rows > 1_400 { 120 } else { 12 };
            Duration::from_micros(u64::from(rows) * per_row_us)
        };
        let mut s = BatchSizer::new(100, 10, 5000, Duration::from_millis(50));
        let mut overshoots = 0;
        for _ in 0..200 {
            let rows = s.size();
            let took = cost(rows);
            if took > Duration::from_millis(50) {
                overshoots += 1;
            }
            s.observe(rows, took);
        }
        // Two overshoots find the cliff (once suspected, once confirmed), then the creeping
        // ceiling probes it again about every hundred batches.
        assert!(overshoots <= 4, "overshot {overshoots} times");
        assert!(
            (1_100..=1_400).contains(&s.size()),
            "settled just below the cliff: {}",
            s.size()
        );
    }

    #[test]
    fn id_lists_pad_by_at_most_a_quarter_into_four_sizes_per_doubling() {
        for n in 1..=usize::try_from(super::super::MAX_BATCH_SIZE_LIMIT).unwrap() {
            let slots = id_list_slots(n);
            assert!(slots >= n && slots * 4 <= n * 5, "{n} ids in {slots} slots");
        }
        let sizes: std::collections::BTreeSet<usize> = (1025..=2048).map(id_list_slots).collect();
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        // SQLite's default cap on parameters, which every other engine exceeds; the rules bind
        // a few more.
        assert!(id_list_slots(super::super::MAX_BATCH_SIZE_LIMIT as usize) + 16 <= 32_766);
    }

    /// A rule's batch sizes change nearly every batch; its DELETE must not become a new
    /// prepared statement with each one. Without the array (PostgreSQL) and the padded sizes
    /// (the others), each of these 60 sizes adds a statement to the connection's cache.
    #[tokio::test]
    async fn a_batch_of_any_size_reuses_a_prepared_statement() {
        use sqlx::Connection;

        use crate::store::{BatchWriter, ConnectOptions, Pool, SchemaVersion, schema};
        use crate::testing::{ENGINES, TestDb};

        for engine in ENGINES {
            let tdb = TestDb::new(engine).await;
            schema::create(&tdb.db, SchemaVersion::V2)
                .await
                .expect("schema");
            // One connection, so every batch goes through the cache counted below.
            let opts = ConnectOptions {
                max_connections: 1,
                ..ConnectOptions::default()
            };
            let db = Db::connect(&tdb.url, &opts).await.expect("connect");
            let schema = schema::detect(&db).await.expect("detect");
            let fence = crate::fence::issue_token(&db, "target:test", "test")
                .await
                .expect("token");
            let cutoffs =
                super::super::rules::Cutoffs::new(chrono::Utc::now().naive_utc(), 48 * 3600, None);
            let (rules, _) = super::super::rules::build(
                &schema,
                &cutoffs,
                super::super::rules::TimeCompare::AsStored,
            );
            let mut writer = db.batch_writer(BATCH_LOCK_TIMEOUT).await.expect("writer");
            let purge = async |writer: &mut BatchWriter, n: i64| {
                let batch = Batch::Ids((1..=n).collect());
                purge_batch(writer, &fence, &schema, &rules[0], &batch)
                    .await
                    .expect("batch");
            };
            // The first batch prepares the fence's statements too.
            purge(&mut writer, 100).await;
            let cached = async |writer: &mut BatchWriter| match (&mut *writer, db.pool()) {
                (BatchWriter::Sqlite(c), _) => c.cached_statements_size(),
                (_, Pool::Postgres(p)) => p.acquire().await.unwrap().cached_statements_size(),
                (_, Pool::MySql(p)) => p.acquire().await.unwrap().cached_statements_size(),
                (_, Pool::Sqlite(_)) => unreachable!("SQLite batches use their own connection"),
            };
            let before = cached(&mut writer).await;
            for n in 101..=160 {
                purge(&mut writer, n).await;
            }
            let added = cached(&mut writer).await - before;
            // 101..=128 and 129..=160 fall into 4 + 2 padded sizes; one is 100's own.
            let allowed = if engine == Engine::Postgres { 0 } else { 6 };
            assert!(
                added <= allowed,
                "{engine}: {added} statements for 60 batch sizes"
            );
            drop(writer);

            // The same for the reads that find a batch along a time index.
            let pooled = async || match db.pool() {
                Pool::Sqlite(p) => p.acquire().await.unwrap().cached_statements_size(),
                Pool::Postgres(p) => p.acquire().await.unwrap().cached_statements_size(),
                Pool::MySql(p) => p.acquire().await.unwrap().cached_statements_size(),
            };
            let pred = &rules[0].predicate;
            let Walk::Column(col) = &rules[0].walk else {
                panic!("the expired rule walks its time index")
            };
            let find = async |limit| {
                select_along_index(&db, &schema, pred, col, Cursor::Start, limit)
                    .await
                    .expect("read");
            };
            find(100).await;
            let before = pooled().await;
            for limit in 101..=160 {
                find(limit).await;
            }
            let added = pooled().await - before;
            assert_eq!(added, 0, "{engine}: {added} statements for 60 read sizes");
            db.close().await;
            tdb.drop_db().await;
        }
    }
}
