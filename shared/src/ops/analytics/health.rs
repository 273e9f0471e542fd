//! The health report's queries: five or six aggregate statements, each returning at most a few
//! rows, run concurrently on the pool's connections.
//!
//! 1. `session_scan` — the per-row counts (creation rate, age windows, old-but-active, rapid
//!    updates): on SQLite each from an index range where its column is indexed, otherwise
//!    in one pass over the session table; and `session_durations` — the duration
//!    statistics, a second pass except on PostgreSQL, where they fold into the scan;
//! 2. `per_user` — sessions grouped per user: total and active sessions, unique,
//!    multi-session, active and over-limit users, with the worst users listed (window
//!    functions give totals and list in one go);
//! 3. `platforms` — sessions per platform id first (index-only), then joined to the platform
//!    table: distribution by type, sessions without a platform and sessions pointing at a
//!    missing one;
//! 4. `suspicious_list` — the rapidly updated sessions themselves (last 5 minutes only);
//! 5. `diversity_24h` — distinct addresses and agents per user among sessions active in
//!    the last 24 hours, counted only for users with more sessions than the lower limit,
//!    through the user index (examples are the users furthest over either line).
//!
//! Column names always come from the detected schema's roles.

use chrono::{Duration, NaiveDateTime};

use super::HealthParams;
use super::probe::{
    Arg, Cell, Kind, Probe, QueryTiming, count_if, float_type, int_type, seconds_between,
};
use super::report::UserCount;
use crate::ops::OpError;
use crate::store::schema::{self, Schema};
use crate::store::{Db, Engine, SchemaVersion};

/// A session updated within this many seconds of its creation, inside the recent window,
/// counts as rapidly updated (the original's rule).
pub(crate) const RAPID_UPDATE_SECS: i64 = 10;
/// The recent window for rapid updates and the short creation rate (5 minutes).
pub(crate) const RECENT_WINDOW_SECS: i64 = 300;
/// "Old" for old-but-active sessions: created more than 7 days ago…
pub(crate) const OLD_SESSION_DAYS: i64 = 7;
/// …and used within the last hour.
pub(crate) const STILL_USED_SECS: i64 = 3600;

/// Everything the queries found, before rules turn it into a report.
#[derive(Debug, Clone)]
pub(crate) struct Figures {
    pub now: NaiveDateTime,
    pub schema: Schema,
    pub active_definition: String,
    pub unsupported: Vec<String>,
    pub total: u64,
    pub active: u64,
    pub created_5m: u64,
    pub created_1h: u64,
    pub age: [u64; 4],
    pub old_active: u64,
    pub without_platform: Option<u64>,
    pub duration: [Option<f64>; 3],
    pub suspicious_count: u64,
    pub suspicious: Vec<(String, i64, f64)>,
    pub unique_users: u64,
    pub multi_session_users: u64,
    pub active_users: u64,
    pub users_over_limit: u64,
    pub users_over_limit_examples: Vec<UserCount>,
    pub platform_distribution: Option<Vec<(String, u64)>>,
    pub missing_platform: Option<u64>,
    pub many_ips: Option<(u64, Vec<UserCount>)>,
    pub many_agents: Option<(u64, Vec<UserCount>)>,
    pub timings: Vec<QueryTiming>,
    pub pool: (u32, u32, u32),
}

/// Times [`pool_figures`] looks again at a pool that seems full, [`POOL_SETTLE_PAUSE`] apart.
const POOL_SETTLE_TRIES: u32 = 5;
/// Pause between two looks at a pool that seems full.
const POOL_SETTLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The pool's (open connections, idle ones, maximum). A connection its user just let go is not
/// idle until a task of its own has handed it back, so a pool used a moment ago can look full
/// with no one using it (the report then advised a bigger pool on an idle database). A full
/// pool counts only when it stays full for [`POOL_SETTLE_TRIES`] looks.
pub(crate) async fn pool_figures(db: &Db) -> (u32, u32, u32) {
    let look = || crate::on_pool!(db, p => (p.size(), p.num_idle() as u32, p.options().get_max_connections()));
    let mut figures = look();
    for _ in 1..POOL_SETTLE_TRIES {
        let (size, idle, max) = figures;
        if size < max || idle > 0 {
            break;
        }
        tokio::time::sleep(POOL_SETTLE_PAUSE).await;
        figures = look();
    }
    figures
}

/// Runs the report's queries.
pub(crate) async fn gather(db: &Db, params: &HealthParams) -> Result<Figures, OpError> {
    // Pool figures before the report's own queries, which run concurrently and would
    // otherwise always find every connection busy (their own).
    let pool = pool_figures(db).await;
    let schema = schema::detect(db).await?;
    let now = params.now();
    let e = db.engine();
    let s = &schema.sessions;
    let t = &s.table;
    let uid = &s.user_id;
    let created = &s.created_at;
    let act = schema.activity_column().to_string();
    let probe = Probe::new(db);
    let mut unsupported = Vec::new();

    // Active: v2 trusts the application's flag and expiry; v1 has only the activity column.
    let (active_pred, active_arg, active_definition) = match (&s.is_active, &s.expires_at) {
        (Some(flag), Some(exp)) => (
            format!("{flag} = TRUE AND {exp} > ?"),
            Arg::Time(now),
            format!("{flag} is true and {exp} is in the future"),
        ),
        _ => (
            format!("{act} >= ?"),
            Arg::Time(now - Duration::seconds(params.max_age_secs as i64)),
            format!(
                "{act} within the last {} seconds (max age; schema has no expiry column)",
                params.max_age_secs
            ),
        ),
    };
    if schema.version == SchemaVersion::V1 {
        unsupported.push(
            "expires_at/is_active (v1 schema): active and expired are judged by updated_at and the max age".into(),
        );
    }
    // SQLite compares the times as stored: a report over Unix seconds would count every time
    // window 0 and call the table healthy without a word.
    for odd in crate::ops::cleanup::times::odd_sqlite_time_columns(db, &schema).await? {
        unsupported.push(format!(
            "{}: the time windows, durations and activity counts include only values SQLite reads as UTC text",
            odd.describe()
        ));
    }

    // 1. session_scan: every per-row figure in one pass.
    let dur = seconds_between(e, created, &act);
    let recent = now - Duration::seconds(RECENT_WINDOW_SECS);
    let rapid = format!(
        "{created} >= ? AND {act} >= ? AND {act} > {created} AND {dur} < {RAPID_UPDATE_SECS}"
    );
    // Totals and the active count come from `per_user` (its window sums see every row), and
    // sessions without a platform from `platforms`: a per-row count costs as much as a pass.
    // A count whose condition ranges over an indexed column is read from that index's range
    // instead of from every row (see [`range_counts`]); the rest share the one pass.
    let ranged = if range_counts(e) {
        leading_index_columns(db, t).await?
    } else {
        Vec::new()
    };
    let tally = |pred: String, key: &str| {
        if ranged.iter().any(|c| c.eq_ignore_ascii_case(key)) {
            format!("(SELECT COUNT(*) FROM {t} WHERE {pred})")
        } else {
            count_if(e, &pred)
        }
    };
    let mut cols: Vec<(String, Vec<Arg>)> = vec![
        (
            tally(format!("{created} >= ?"), created),
            vec![Arg::Time(recent)],
        ),
        (
            tally(format!("{created} >= ?"), created),
            vec![Arg::Time(now - Duration::hours(1))],
        ),
        (
            tally(format!("{act} >= ?"), &act),
            vec![Arg::Time(now - Duration::hours(1))],
        ),
        (
            tally(format!("{act} >= ?"), &act),
            vec![Arg::Time(now - Duration::hours(24))],
        ),
        (
            tally(format!("{act} >= ?"), &act),
            vec![Arg::Time(now - Duration::days(7))],
        ),
        (
            tally(format!("{act} >= ?"), &act),
            vec![Arg::Time(now - Duration::days(30))],
        ),
        (
            tally(format!("{created} < ? AND {act} > ?"), &act),
            vec![
                Arg::Time(now - Duration::days(OLD_SESSION_DAYS)),
                Arg::Time(now - Duration::seconds(STILL_USED_SECS)),
            ],
        ),
        (
            tally(rapid.clone(), &act),
            vec![Arg::Time(recent), Arg::Time(recent)],
        ),
    ];
    let mut kinds = vec![Kind::Int; cols.len()];
    let f = float_type(e);
    // PostgreSQL aggregates the durations as intervals in the same pass, converting three
    // results instead of every row (scan and durations: 0.15 + 0.33 s → 0.23 s at 1M rows).
    let durations_in_scan = e == Engine::Postgres;
    let durations_at = cols.len();
    if durations_in_scan {
        let gap = format!("{act} - {created}");
        for agg in ["AVG", "MIN", "MAX"] {
            cols.push((
                format!("CAST(EXTRACT(EPOCH FROM {agg}({gap})) AS {f})"),
                vec![],
            ));
            kinds.push(Kind::Float);
        }
    }
    let platform_less_in_scan = s.platform_id.is_some() && schema.platforms.is_none();
    let platform_less_at = cols.len();
    if let Some(pid) = s.platform_id.as_ref().filter(|_| platform_less_in_scan) {
        cols.push((tally(format!("{pid} IS NULL"), pid), vec![]));
        kinds.push(Kind::Int);
    } else if s.platform_id.is_none() {
        unsupported.push("platform role: sessions without a platform cannot be counted".into());
    }
    let args: Vec<Arg> = cols.iter().flat_map(|c| c.1.iter().copied()).collect();
    let select: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
    // When every count reads an index range, no pass over the rows is left.
    let from = if cols.iter().all(|c| c.0.starts_with("(SELECT COUNT(*)")) {
        String::new()
    } else {
        format!(" FROM {t}")
    };
    let sql = format!("SELECT {}{from}", select.join(", "));
    let scan = probe.one("session_scan", sql, &args, &kinds);

    // 1b. session_durations elsewhere: a second pass, because parsing two timestamps per row
    //     for three aggregates costs as much as every count above; on its own it runs on
    //     another core.
    let durations_sql = (!durations_in_scan).then(|| match e {
        // LIMIT -1 keeps SQLite from flattening the subquery, so each row's duration is
        // computed once instead of once per aggregate (0.8 s → 0.3 s at 1M rows).
        Engine::Sqlite => format!(
            "SELECT CAST(AVG(d) AS {f}), CAST(MIN(d) AS {f}), CAST(MAX(d) AS {f}) \
             FROM (SELECT {dur} AS d FROM {t} LIMIT -1) x"
        ),
        _ => format!(
            "SELECT CAST(AVG({dur}) AS {f}), CAST(MIN({dur}) AS {f}), CAST(MAX({dur}) AS {f}) FROM {t}"
        ),
    });
    let durations = async {
        match durations_sql {
            Some(sql) => probe
                .one("session_durations", sql, &[], &[Kind::Float; 3])
                .await
                .map(Some),
            None => Ok(None),
        }
    };

    // 2. per_user: the window sums see every group; LIMIT only trims the listed rows.
    let it = int_type(e);
    let limit = params.concurrent_session_limit;
    // Sessions without a user (a nullable user_id: guest sessions) form one group: counted
    // in the session totals, never as a user.
    let sql = format!(
        "SELECT user_id, a, \
         CAST(SUM(CASE WHEN user_id IS NOT NULL THEN 1 ELSE 0 END) OVER () AS {it}), \
         CAST(SUM(CASE WHEN user_id IS NOT NULL AND n > 1 THEN 1 ELSE 0 END) OVER () AS {it}), \
         CAST(SUM(CASE WHEN user_id IS NOT NULL AND a > 0 THEN 1 ELSE 0 END) OVER () AS {it}), \
         CAST(SUM(CASE WHEN user_id IS NOT NULL AND a > {limit} THEN 1 ELSE 0 END) OVER () AS {it}), \
         CAST(SUM(n) OVER () AS {it}), CAST(SUM(a) OVER () AS {it}) \
         FROM (SELECT {uid} AS user_id, COUNT(*) AS n, {a} AS a FROM {t} GROUP BY {uid}) x \
         ORDER BY a DESC, user_id LIMIT {n}",
        a = count_if(e, &active_pred),
        n = params.example_limit
    );
    let per_user_args = [active_arg];
    let per_user = probe.rows("per_user", sql, &per_user_args, &[Kind::Int; 8]);

    // 3. platforms: aggregate the big table per platform id before joining the other table,
    //    then group by platform type only, with sessions without a platform and those
    //    pointing at a missing one as sums: a handful of groups the engines hash, where
    //    grouping by a computed kind made PostgreSQL sort every platform id on disk.
    let platform_sql = match (&s.platform_id, &schema.platforms) {
        (Some(pid), Some(pt)) => {
            let (ptype, group) = match &pt.platform_type {
                Some(c) => (format!("p.{c}"), format!(" GROUP BY p.{c}")),
                None => ("NULL".to_string(), String::new()),
            };
            let pk = &pt.id;
            Some(format!(
                "SELECT {ptype}, \
                 CAST(SUM(CASE WHEN x.pid IS NULL THEN x.n ELSE 0 END) AS {it}), \
                 CAST(SUM(CASE WHEN x.pid IS NOT NULL AND p.{pk} IS NULL THEN x.n ELSE 0 END) AS {it}), \
                 CAST(SUM(CASE WHEN p.{pk} IS NOT NULL THEN x.n ELSE 0 END) AS {it}) \
                 FROM (SELECT {pid} AS pid, COUNT(*) AS n FROM {t} GROUP BY {pid}) x \
                 LEFT JOIN {ptable} p ON p.{pk} = x.pid{group}",
                ptable = pt.table,
            ))
        }
        _ => None,
    };
    let platforms = async {
        match platform_sql {
            // The grouped ids leave the index in id order and the platform table's key
            // gives the same order: PostgreSQL merges them instead of hashing every
            // platform id (which spilled to disk with the default 4 MB `work_mem`):
            // 606 → 335 ms standalone at 1M sessions.
            Some(sql) => probe
                .rows_planned(
                    "platforms",
                    sql,
                    &[],
                    &[Kind::Text, Kind::Int, Kind::Int, Kind::Int],
                    Some("SET LOCAL enable_hashjoin = off"),
                )
                .await
                .map(Some),
            None => Ok(None),
        }
    };

    // 4. suspicious_list: only sessions touched in the last 5 minutes qualify.
    let sql = format!(
        "SELECT {key}, {uid}, CAST({dur} AS {f}) FROM {t} WHERE {rapid} ORDER BY {act} DESC, {id} LIMIT {n}",
        key = s.session_key,
        id = s.id,
        f = float_type(e),
        n = params.example_limit
    );
    let suspicious_args = [Arg::Time(recent), Arg::Time(recent)];
    let suspicious_list = probe.rows(
        "suspicious_list",
        sql,
        &suspicious_args,
        &[Kind::Text, Kind::Int, Kind::Float],
    );

    // 5. diversity of addresses and agents per user over the last 24 hours, one grouped
    //    pass for both; the window sums count every offender, the list keeps the worst.
    let (ip_lim, ua_lim) = (params.ip_diversity_limit, params.user_agent_diversity_limit);
    let distinct = |col: &Option<String>| {
        col.as_ref().map_or("0".to_string(), |c| {
            format!(
                "(SELECT COUNT(DISTINCT s.{c}) FROM {t} s WHERE s.{uid} = c.candidate AND s.{act} >= ?)"
            )
        })
    };
    // Only users with more sessions than the lower limit can have more distinct values than
    // it: a cheap grouped count finds them, and only their rows — looked up through the
    // user index, per candidate — go through the distinct counting. On MariaDB,
    // COUNT(DISTINCT) over every user took 27-43 s at 1M sessions, and 24 s with the
    // candidates as an IN filter on a second full scan. A join back let PostgreSQL hash the
    // whole day's rows (and build the candidates once per parallel worker): 0.6-0.7 s; the
    // per-candidate lookups 0.3 s.
    let floor = [
        s.ip_address.as_ref().map(|_| ip_lim),
        s.user_agent.as_ref().map(|_| ua_lim),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    let diversity_sql = (s.ip_address.is_some() || s.user_agent.is_some()).then(|| {
        format!(
            "SELECT user_id, ki, ku, \
             CAST(SUM(CASE WHEN ki > {ip_lim} THEN 1 ELSE 0 END) OVER () AS {it}), \
             CAST(SUM(CASE WHEN ku > {ua_lim} THEN 1 ELSE 0 END) OVER () AS {it}) \
             FROM (SELECT c.candidate AS user_id, {ki} AS ki, {ku} AS ku \
             FROM (SELECT {uid} AS candidate FROM {t}{scan_all} WHERE {act} >= ? \
             GROUP BY {uid} HAVING COUNT(*) > {floor}) c{keep_apart}) x \
             WHERE ki > {ip_lim} OR ku > {ua_lim} ORDER BY ki + ku DESC, user_id LIMIT {n}",
            ki = distinct(&s.ip_address),
            ku = distinct(&s.user_agent),
            n = params.example_limit,
            // The candidates' pass reads the whole day: SQLite would otherwise walk a user_id
            // index to avoid sorting and fetch every row through it (5x slower than one
            // sequential pass at 1M rows), MariaDB its activity index (random reads).
            scan_all = match e {
                Engine::Sqlite => " NOT INDEXED",
                Engine::MySql => " USE INDEX ()",
                Engine::Postgres => "",
            },
            // Keeps the engines from merging `x` into the outer query, which would run each
            // lookup again for the filter and the ordering.
            keep_apart = match e {
                Engine::Sqlite => " LIMIT -1",
                Engine::MySql | Engine::Postgres => " GROUP BY c.candidate",
            },
        )
    });
    // One bound "a day ago" per lookup, then the candidates' own.
    let lookups = usize::from(s.ip_address.is_some()) + usize::from(s.user_agent.is_some());
    let day_ago = vec![Arg::Time(now - Duration::hours(24)); lookups + 1];
    let diversity = async {
        match diversity_sql {
            // PostgreSQL hashes the day's users to find the candidates: 200k groups at 1M
            // sessions need 29 MB and spilled to disk with the default 4 MB `work_mem`
            // (617 → 502 ms standalone). Bounded: a larger table spills past 32 MB.
            Some(sql) => probe
                .rows_planned(
                    "diversity_24h",
                    sql,
                    &day_ago,
                    &[Kind::Int; 5],
                    Some("SET LOCAL work_mem = '32MB'"),
                )
                .await
                .map(Some),
            None => Ok(None),
        }
    };

    // The queries are independent: run them at once on the pool's connections. Polled, and
    // so given the connections, longest first: the queries outnumber the connections, and a
    // long query that starts last finishes alone on one core.
    let (row, diversity_rows, users, dur_row, platform_rows, suspicious_rows) = tokio::try_join!(
        scan,
        diversity,
        per_user,
        durations,
        platforms,
        suspicious_list
    )?;
    let dur_row = dur_row.unwrap_or_else(|| row[durations_at..durations_at + 3].to_vec());
    let first = users.first();
    let total_of = |i: usize| first.map_or(0, |r| r[i].count());
    let users_over_limit_examples = users
        .iter()
        .filter(|r| !matches!(r[0], Cell::Null) && r[1].count() > limit)
        .map(|r| UserCount {
            user_id: r[0].int(),
            value: r[1].count(),
        })
        .collect();

    let (platform_distribution, missing_platform, without_platform) = match platform_rows {
        Some(rows) => {
            let mut dist = Vec::new();
            let (mut none, mut missing) = (0, 0);
            for r in &rows {
                none += r[1].count();
                missing += r[2].count();
                if r[3].count() > 0 {
                    dist.push((r[0].text().unwrap_or("unknown").to_string(), r[3].count()));
                }
            }
            (Some(dist), Some(missing), Some(none))
        }
        None => {
            unsupported
                .push("platform table: platform distribution and missing-platform sessions".into());
            let without = platform_less_in_scan.then(|| row[platform_less_at].count());
            (None, None, without)
        }
    };
    let suspicious = suspicious_rows
        .into_iter()
        .map(|r| {
            (
                r[0].text().unwrap_or_default().to_string(),
                r[1].int(),
                r[2].millis().unwrap_or(0.0),
            )
        })
        .collect();
    let (many_ips, many_agents) = match diversity_rows {
        None => (None, None),
        Some(rows) => {
            let pick = |col: usize, lim: u64| {
                let mut v: Vec<UserCount> = rows
                    .iter()
                    .filter(|r| r[col].count() > lim)
                    .map(|r| UserCount {
                        user_id: r[0].int(),
                        value: r[col].count(),
                    })
                    .collect();
                v.sort_by(|a, b| b.value.cmp(&a.value).then(a.user_id.cmp(&b.user_id)));
                (rows.first().map_or(0, |r| r[col + 2].count()), v)
            };
            (
                s.ip_address.as_ref().map(|_| pick(1, ip_lim)),
                s.user_agent.as_ref().map(|_| pick(2, ua_lim)),
            )
        }
    };
    if many_ips.is_none() {
        unsupported.push("ip_address role: users seen from many addresses".into());
    }
    if many_agents.is_none() {
        unsupported.push("user_agent role: users seen with many user agents".into());
    }

    Ok(Figures {
        now,
        active_definition,
        unsupported,
        total: total_of(6),
        active: total_of(7),
        created_5m: row[0].count(),
        created_1h: row[1].count(),
        age: [
            row[2].count(),
            row[3].count(),
            row[4].count(),
            row[5].count(),
        ],
        old_active: row[6].count(),
        suspicious_count: row[7].count(),
        duration: [
            dur_row[0].millis(),
            dur_row[1].millis(),
            dur_row[2].millis(),
        ],
        without_platform,
        suspicious,
        unique_users: total_of(2),
        multi_session_users: total_of(3),
        active_users: total_of(4),
        users_over_limit: total_of(5),
        users_over_limit_examples,
        platform_distribution,
        missing_platform,
        many_ips,
        many_agents,
        timings: probe.into_timings(&[
            "session_scan",
            "session_durations",
            "per_user",
            "platforms",
            "suspicious_list",
            "diversity_24h",
        ]),
        pool,
        schema,
    })
}

/// Whether counts over an indexed column's range are read from the index (`session_scan`).
///
/// SQLite counts an index range without touching rows: at 1M sessions the four age windows,
/// both creation windows, old-but-active and rapid updates take about 0.1 s together from the
/// `created_at` and activity indexes, against 0.67 s for the one pass that evaluates them on
/// every row. PostgreSQL keeps the pass: an index-only count needs an all-visible map (fresh
/// rows after the last vacuum are fetched from the heap one by one), and its parallel pass,
/// which also folds in the durations, takes about 0.25 s. MySQL/MariaDB keep it too until
/// measured.
fn range_counts(engine: Engine) -> bool {
    engine == Engine::Sqlite
}

/// The first column of every usable index on `table`: a condition on one of them is an index
/// range.
async fn leading_index_columns(db: &Db, table: &str) -> Result<Vec<String>, OpError> {
    Ok(crate::ops::maintenance::table_indexes(db, table)
        .await?
        .into_iter()
        // A partial index cannot answer the windows' plain ranges: counting "through" it
        // would read the whole table once per window.
        .filter(|ix| ix.valid && !ix.partial)
        .filter_map(|ix| ix.columns.into_iter().next())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ConnectOptions, Pool};

    #[tokio::test]
    async fn a_pool_is_full_while_its_connections_are_held_and_not_just_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("pool.db").display());
        let db = Db::connect(&url, &ConnectOptions::creating_sqlite_file())
            .await
            .expect("connect");
        let Pool::Sqlite(pool) = db.pool() else {
            unreachable!("a SQLite URL")
        };
        let max = pool.options().get_max_connections();
        let mut held = Vec::new();
        for _ in 0..max {
            held.push(pool.acquire().await.expect("connection"));
        }
        assert_eq!(
            pool_figures(&db).await,
            (max, 0, max),
            "every connection held"
        );
        // Let go: the connections go back to the pool on tasks that have not run yet.
        drop(held);
        let (size, idle, _) = pool_figures(&db).await;
        assert!(
            idle > 0,
            "a pool let go of a moment ago is not full: {size} open, {idle} idle"
        );
    }
}
