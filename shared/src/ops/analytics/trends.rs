//! Trends: sessions created and expired per UTC calendar day, with cleanup deletions where the
//! fleet recorded them.
//!
//! The original sliced rolling 24-hour windows starting at now − N days and keyed them by the
//! slice's start date; here a day is a UTC calendar day, the last one being today (so far).
//! Two `GROUP BY day` queries, each returning at most N rows.

use std::collections::BTreeMap;

use chrono::{Duration, NaiveDateTime, Utc};

use super::FleetFacts;
use super::probe::{Arg, Kind, Probe, day_of, plus_seconds};
use super::report::{TrendDay, TrendsReport};
use crate::ops::OpError;
use crate::store::Db;
use crate::store::schema;

/// Most days a trend may cover (a leap year).
pub const MAX_TREND_DAYS: u32 = 366;

/// Trends for the last `days` UTC days (1–366), ending now. v1 schemas count a session as
/// expiring `max_age_secs` (the target's `SESSION_MAX_AGE`) after its last update.
pub async fn trends(
    db: &Db,
    days: u32,
    max_age_secs: u64,
    fleet: Option<&FleetFacts>,
) -> Result<TrendsReport, OpError> {
    trends_at(db, days, fleet, Utc::now().naive_utc(), max_age_secs).await
}

/// [`trends()`] with an explicit "now" and v1 max age (seconds).
pub async fn trends_at(
    db: &Db,
    days: u32,
    fleet: Option<&FleetFacts>,
    now: NaiveDateTime,
    max_age_secs: u64,
) -> Result<TrendsReport, OpError> {
    if !(1..=MAX_TREND_DAYS).contains(&days) {
        return Err(OpError::Invalid(format!(
            "trends need a period of 1 to {MAX_TREND_DAYS} days, got {days}"
        )));
    }
    if max_age_secs == 0 {
        return Err(OpError::Invalid("max_age_secs must be at least 1".into()));
    }
    let schema = schema::detect(db).await?;
    let e = db.engine();
    let s = &schema.sessions;
    let t = &s.table;
    let first_day = now.date() - Duration::days(i64::from(days) - 1);
    let start = first_day.and_hms_opt(0, 0, 0).unwrap_or(now);
    let mut probe = Probe::new(db);
    let mut notes = vec![
        "created counts the sessions still stored (rows cleanup already deleted are gone)"
            .to_string(),
    ];

    let created = &s.created_at;
    let sql = format!(
        "SELECT {d}, COUNT(*) FROM {t} WHERE {created} >= ? AND {created} <= ? GROUP BY 1",
        d = day_of(e, created)
    );
    let created_by_day = per_day(
        &mut probe,
        "trend_created",
        sql,
        &[Arg::Time(start), Arg::Time(now)],
    )
    .await?;

    // Expired: the recorded expiry on v2; last activity + max age on v1 (no expiry column).
    let (sql, args) = match &s.expires_at {
        Some(exp) => (
            format!(
                "SELECT {d}, COUNT(*) FROM {t} WHERE {exp} >= ? AND {exp} <= ? GROUP BY 1",
                d = day_of(e, exp)
            ),
            [Arg::Time(start), Arg::Time(now)],
        ),
        None => {
            let act = schema.activity_column();
            notes.push(format!(
                "expired = {act} + {max_age_secs} s falls on that day (v1 schema has no expires_at)"
            ));
            let age = Duration::seconds(max_age_secs as i64);
            (
                format!(
                    "SELECT {d}, COUNT(*) FROM {t} WHERE {act} >= ? AND {act} <= ? GROUP BY 1",
                    d = day_of(e, &plus_seconds(e, act, max_age_secs))
                ),
                [Arg::Time(start - age), Arg::Time(now - age)],
            )
        }
    };
    let expired_by_day = per_day(&mut probe, "trend_expired", sql, &args).await?;

    let cleanup = fleet.and_then(|f| f.cleanup_deleted_by_day.as_ref());
    let recorded_from = fleet.and_then(|f| f.cleanup_recorded_from);
    if cleanup.is_none() {
        notes.push("the fleet recorded no cleanup deletions: that column is omitted".into());
    } else if let Some(from) = recorded_from.filter(|d| *d > first_day) {
        notes.push(format!(
            "cleanup deletions are known from {from} on: the fleet keeps each database's last runs only"
        ));
    }
    let rows: Vec<TrendDay> = (0..i64::from(days))
        .map(|i| {
            let day = first_day + Duration::days(i);
            let key = day.format("%Y-%m-%d").to_string();
            TrendDay {
                created: created_by_day.get(&key).copied().unwrap_or(0),
                expired: expired_by_day.get(&key).copied().unwrap_or(0),
                cleanup_deleted: cleanup
                    .filter(|_| recorded_from.is_none_or(|from| day >= from))
                    .map(|c| c.get(&day).copied().unwrap_or(0)),
                date: key,
            }
        })
        .collect();
    let total: u64 = rows.iter().map(|d| d.created).sum();
    Ok(TrendsReport {
        period_days: days,
        timestamp: now.and_utc(),
        total_sessions_created: total,
        average_daily_sessions: total as f64 / f64::from(days),
        total_sessions_expired: rows.iter().map(|d| d.expired).sum(),
        total_cleanup_deleted: cleanup.map(|_| rows.iter().filter_map(|d| d.cleanup_deleted).sum()),
        days: rows,
        notes,
    })
}

async fn per_day(
    probe: &mut Probe<'_>,
    name: &str,
    sql: String,
    args: &[Arg],
) -> Result<BTreeMap<String, u64>, OpError> {
    let rows = probe
        .rows(name, sql, args, &[Kind::Text, Kind::Int])
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| Some((r[0].text()?.to_string(), r[1].count())))
        .collect())
}
