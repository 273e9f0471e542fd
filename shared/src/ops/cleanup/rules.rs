//! What "expired" and "orphaned" mean, as SQL predicates built from the schema's roles.
//!
//! Every rule is evaluated against one reference time (`as_of`) fixed at the start of a run,
//! so a session whose expiry falls while the run is going is not touched: it was live at
//! `as_of`. The same predicate text serves the batch SELECT, the re-check inside the DELETE,
//! the dry-run counts and the stats, so they cannot drift apart.

use chrono::{Duration as ChronoDuration, NaiveDateTime};
use serde::{Deserialize, Serialize};

use crate::store::{Engine, Schema};

/// The reason a session is purged. Rules run in this order; a row matching several rules is
/// counted under the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// v2: `expires_at` before `as_of`. v1: last activity NULL or older than the max age.
    Expired,
    /// v2 only: already marked `is_active = false` by the application and idle longer than
    /// the max age.
    InactiveStale,
    /// `force` with a max age of H hours: idle for more than H hours.
    Idle,
    /// The session's user is missing or deactivated (`is_active` false; NULL does not count).
    Orphaned,
}

/// A SQL boolean expression with its `?` placeholders' values, in text order.
#[derive(Debug, Clone)]
pub struct Predicate {
    /// SQL text; columns are qualified with the session table's name.
    pub sql: String,
    /// Values of the placeholders.
    pub binds: Vec<NaiveDateTime>,
}

impl Predicate {
    fn new(sql: String, binds: Vec<NaiveDateTime>) -> Predicate {
        Predicate { sql, binds }
    }

    /// `self AND NOT (any of others)`, where a rule that is NULL for a row counts as "did not
    /// match" — exactly the rows a sequential run would purge under `self`.
    pub fn and_none_of(&self, others: &[&Predicate]) -> Predicate {
        let mut sql = format!("({})", self.sql);
        let mut binds = self.binds.clone();
        for other in others {
            sql.push_str(&format!(" AND NOT COALESCE(({}), FALSE)", other.sql));
            binds.extend(other.binds.iter().copied());
        }
        Predicate { sql, binds }
    }

    /// `(a) OR (b) OR …`; `None` when `preds` is empty.
    pub fn any_of(preds: &[&Predicate]) -> Option<Predicate> {
        if preds.is_empty() {
            return None;
        }
        let sql = preds
            .iter()
            .map(|p| format!("({})", p.sql))
            .collect::<Vec<_>>()
            .join(" OR ");
        let binds = preds.iter().flat_map(|p| p.binds.iter().copied()).collect();
        Some(Predicate { sql, binds })
    }
}

/// How a rule's batches find their rows and name them to the DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// Walk the index of this (qualified) time column upwards (keyset on the column); delete
    /// the ids found.
    Column(String),
    /// No index finds the rows: one read streams every matching id in key order, and each
    /// batch deletes the next ids it delivered (see `stream`). For rules with few, scattered
    /// rows, found by a join (orphans) or a NULL (v1 sessions without activity).
    PrimaryKey,
    /// Walk the primary key upwards in strides: each batch deletes the rows among the table's
    /// next N rows (found along the key: at most N whatever the ids) that match the rule. For dense rules: the DELETE reads one
    /// stretch of the key in order, as a bulk DELETE does, instead of probing the key once
    /// per id (several times the cost per row), and no read ahead of it is needed.
    PrimaryKeyRange,
}

/// One purge rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which count it feeds.
    pub kind: RuleKind,
    /// Which rows it purges: `as_written`, less the sessions a restricting foreign key keeps.
    pub predicate: Predicate,
    /// The rule as the definitions state it. What later rules and the report-only counts
    /// leave out as "an earlier rule's": without the reference probes, which inside their
    /// `NOT COALESCE(…)` no engine turns into a join (a probe per row, on every count), and
    /// which each rule's own `predicate` already applies.
    pub as_written: Predicate,
    /// How batches find them.
    pub walk: Walk,
}

impl Rule {
    fn new(kind: RuleKind, predicate: Predicate, walk: Walk) -> Rule {
        Rule {
            kind,
            as_written: predicate.clone(),
            predicate,
            walk,
        }
    }
}

/// The cutoffs of one run, all derived from `as_of`.
#[derive(Debug, Clone, Copy)]
pub struct Cutoffs {
    /// The reference time.
    pub as_of: NaiveDateTime,
    /// Activity older than this is beyond the max age.
    pub max_age: NaiveDateTime,
    /// `force --max-age H`: activity older than this is idle.
    pub idle: Option<NaiveDateTime>,
}

impl Cutoffs {
    /// Derives the cutoffs from `as_of`, the max age and the optional forced idle limit.
    pub fn new(as_of: NaiveDateTime, max_age_secs: u64, idle_hours: Option<u32>) -> Cutoffs {
        let secs = i64::try_from(max_age_secs).unwrap_or(i64::MAX / 2);
        Cutoffs {
            as_of,
            max_age: as_of - ChronoDuration::seconds(secs),
            idle: idle_hours.map(|h| as_of - ChronoDuration::hours(i64::from(h))),
        }
    }
}

/// The rules a database's schema supports, in run order, plus notes about rules it cannot
/// support. A session another row still points at through a restricting foreign key
/// (`Schema::references`) matches none of them: deleting it would fail the whole batch, on
/// every run.
pub fn build(schema: &Schema, cutoffs: &Cutoffs, compare: TimeCompare) -> (Vec<Rule>, Vec<String>) {
    let (mut rules, notes) = rules_as_written(schema, cutoffs, compare);
    let t = &schema.sessions.table;
    for rule in &mut rules {
        for reference in &schema.references {
            // Plain `AND NOT EXISTS`, which every engine plans as an anti-join or a probe.
            rule.predicate.sql = format!(
                "({}) AND NOT {}",
                rule.predicate.sql,
                reference.exists_for(t)
            );
        }
    }
    (rules, notes)
}

/// Sessions one of `rules` (from [`build`]) matches as written but leaves in place because
/// another row still references them; `None` when the schema has no restricting foreign key.
/// Reported, so people can see what keeps them.
pub fn kept_by_references(schema: &Schema, rules: &[Rule]) -> Option<Predicate> {
    if schema.references.is_empty() {
        return None;
    }
    let any = Predicate::any_of(&rules.iter().map(|r| &r.as_written).collect::<Vec<_>>())?;
    let t = &schema.sessions.table;
    let referenced = schema
        .references
        .iter()
        .map(|r| r.exists_for(t))
        .collect::<Vec<_>>()
        .join(" OR ");
    Some(Predicate::new(
        format!("({}) AND ({referenced})", any.sql),
        any.binds,
    ))
}

/// How the rules compare a time column with a cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeCompare {
    /// As stored: typed columns, or SQLite text in the layout the cutoff is written in.
    AsStored,
    /// SQLite columns seen holding other values (`cleanup::times`): the text comparison, which
    /// the column's index answers, is re-checked as a time. `julianday` reads UTC text in any
    /// layout SQLite knows, converts a UTC offset, and is NULL for anything else (Unix seconds,
    /// unreadable text), so a session whose time would be misread never matches. Not the
    /// default: any extra term makes SQLite's deletes about 30 % slower.
    JuliandayRecheck,
}

/// `col` strictly before `at`.
fn earlier_than(compare: TimeCompare, col: &str, at: NaiveDateTime) -> Predicate {
    match compare {
        TimeCompare::JuliandayRecheck => Predicate::new(
            format!("{col} < ? AND julianday({col}) < julianday(?)"),
            vec![at, at],
        ),
        TimeCompare::AsStored => Predicate::new(format!("{col} < ?"), vec![at]),
    }
}

/// The rules as the definitions state them, before referenced sessions are set aside.
fn rules_as_written(
    schema: &Schema,
    cutoffs: &Cutoffs,
    compare: TimeCompare,
) -> (Vec<Rule>, Vec<String>) {
    let s = &schema.sessions;
    let t = &s.table;
    let activity = format!("{t}.{}", schema.activity_column());
    let mut rules = Vec::new();
    let mut notes = Vec::new();

    match &s.expires_at {
        Some(expires) => rules.push(Rule::new(
            RuleKind::Expired,
            earlier_than(compare, &format!("{t}.{expires}"), cutoffs.as_of),
            Walk::Column(format!("{t}.{expires}")),
        )),
        None => {
            // v1: the original's `_is_session_expired` — no activity recorded, or older than
            // the max age (strictly). Split in two so each half walks an index.
            rules.push(Rule::new(
                RuleKind::Expired,
                earlier_than(compare, &activity, cutoffs.max_age),
                Walk::Column(activity.clone()),
            ));
            rules.push(Rule::new(
                RuleKind::Expired,
                Predicate::new(format!("{activity} IS NULL"), vec![]),
                Walk::PrimaryKey,
            ));
        }
    }
    if let Some(active) = &s.is_active {
        let stale = earlier_than(compare, &activity, cutoffs.max_age);
        rules.push(Rule::new(
            RuleKind::InactiveStale,
            Predicate::new(
                format!("{t}.{active} = FALSE AND {}", stale.sql),
                stale.binds,
            ),
            Walk::Column(activity.clone()),
        ));
    }
    if let Some(idle) = cutoffs.idle {
        rules.push(Rule::new(
            RuleKind::Idle,
            earlier_than(compare, &activity, idle),
            Walk::Column(activity.clone()),
        ));
    }
    match &schema.users {
        Some(users) => {
            let u = &users.table;
            // A session without a user (an application's guest sessions, where the column is
            // nullable) never had one to lose: only the expiry rules remove it. Left to the
            // anti-join alone, a NULL id would match no user row and count as orphaned.
            let has_user = format!("{t}.{} IS NOT NULL", s.user_id);
            let missing = format!(
                "{has_user} AND NOT EXISTS (SELECT 1 FROM {u} u WHERE u.{} = {t}.{})",
                users.id, s.user_id
            );
            let sql = match &users.is_active {
                // Missing or deactivated = no user row that is not deactivated. One NOT EXISTS
                // (not "missing OR deactivated") so every engine plans it as an anti-join that
                // probes the users key, instead of evaluating two subqueries per row.
                Some(flag) => format!(
                    "{has_user} AND NOT EXISTS (SELECT 1 FROM {u} u WHERE u.{} = {t}.{} AND (u.{flag} IS NULL OR u.{flag} <> FALSE))",
                    users.id, s.user_id
                ),
                None => {
                    notes.push(format!(
                        "table '{u}' has no activation flag: only sessions of missing users count as orphaned"
                    ));
                    missing
                }
            };
            rules.push(Rule::new(
                RuleKind::Orphaned,
                Predicate::new(sql, vec![]),
                Walk::PrimaryKey,
            ));
        }
        None => notes.push("users table not found: the orphaned-session rule was skipped".into()),
    }
    (rules, notes)
}

/// Sessions whose platform id points at a platform row that does not exist. Reported only:
/// this condition never causes a deletion or a change.
pub fn missing_platform(schema: &Schema) -> Option<Predicate> {
    let s = &schema.sessions;
    let pid = s.platform_id.as_ref()?;
    let platforms = schema.platforms.as_ref()?;
    let t = &s.table;
    Some(Predicate::new(
        format!(
            "{t}.{pid} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {} p WHERE p.{} = {t}.{pid})",
            platforms.table, platforms.id
        ),
        vec![],
    ))
}

/// The primary key as a 64-bit integer on every engine (PostgreSQL's SERIAL is 32-bit).
pub fn id_as_i64(engine: Engine, qualified_id: &str) -> String {
    match engine {
        Engine::Sqlite => qualified_id.to_string(),
        Engine::Postgres => format!("CAST({qualified_id} AS BIGINT)"),
        Engine::MySql => format!("CAST({qualified_id} AS SIGNED)"),
    }
}
