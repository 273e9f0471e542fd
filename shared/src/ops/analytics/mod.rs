//! The analytics operation: health report, trends, security analysis, recommendations, alerts
//! and export (issue 4; reference §2.2 and §3).
//!
//! Read-only. Every figure is computed by aggregate SQL in the database (COUNT/SUM/AVG/GROUP
//! BY), a fixed number of queries returning a handful of rows each, so memory stays flat
//! whatever the table size. Facts only the fleet knows (recent job outcomes, cleanup
//! deletions) come in as plain data ([`FleetFacts`]); findings of the maintenance operation as
//! [`DbFindings`]. Without them the figures they feed are absent, never invented.
//!
//! Submodules, one job each: [`thresholds`] (the five alert lines and their file),
//! `probe` (timed queries and per-engine SQL fragments), `health` (the report's queries),
//! [`security`] (findings and score), `rules` (status, alerts, recommendations),
//! [`trends`](mod@trends), `text` (people's output) and [`html`] (export).

use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{OpContext, OpError};
use crate::CancellationToken;
use crate::store::Db;

mod health;
pub mod html;
mod probe;
mod report;
mod rules;
pub mod security;
mod text;
pub mod thresholds;
pub mod trends;

pub use html::{ExportError, export};
pub use probe::QueryTiming;
pub use report::*;
pub use rules::{
    CLEANUP_BACKLOG_LINE, SECURITY_SCORE_CRITICAL, SECURITY_SCORE_LINE, SUCCESS_RATE_LINE,
};
pub use thresholds::{Thresholds, ThresholdsError};
pub use trends::{MAX_TREND_DAYS, trends, trends_at};

/// Facts the fleet recorded (the worker reads them from Redis) and passes in as plain data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetFacts {
    /// Outcomes of the fleet's recent jobs on this database, if recorded.
    #[serde(default)]
    pub jobs: Option<JobCounts>,
    /// Sessions deleted by cleanup per UTC day, if recorded.
    #[serde(default)]
    pub cleanup_deleted_by_day: Option<BTreeMap<NaiveDate, u64>>,
    /// The first day `cleanup_deleted_by_day` covers whole: the fleet keeps a bounded history,
    /// and days before it are unknown, not zero. `None`: every day is covered.
    #[serde(default)]
    pub cleanup_recorded_from: Option<NaiveDate>,
}

/// Recent job outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JobCounts {
    /// The period the counts cover, in seconds (> 0), used for per-minute rates.
    pub window_secs: u64,
    /// Jobs finished in the window.
    pub total: u64,
    /// Of which succeeded.
    pub succeeded: u64,
    /// Of which failed.
    pub failed: u64,
}

/// Findings of the maintenance operation; each entry becomes an alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbFindings {
    /// Recommended indexes that are missing (names).
    #[serde(default)]
    pub missing_indexes: Vec<String>,
    /// Integrity check failures (one line each).
    #[serde(default)]
    pub integrity_failures: Vec<String>,
}

/// Parameters of [`health_report`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthParams {
    /// The five alert thresholds. Default: the spec's ([`Thresholds::default`]).
    pub thresholds: Thresholds,
    /// Seconds of inactivity after which a v1 session counts as expired (v1 has no
    /// `expires_at`). Default [`HealthParams::DEFAULT_MAX_AGE_SECS`] (`SESSION_MAX_AGE`).
    pub max_age_secs: u64,
    /// Active sessions one user may hold before being listed. Default
    /// [`HealthParams::DEFAULT_CONCURRENT_SESSION_LIMIT`].
    pub concurrent_session_limit: u64,
    /// Distinct IP addresses per user in 24 h above which the user is listed. Default
    /// [`HealthParams::DEFAULT_IP_DIVERSITY_LIMIT`].
    pub ip_diversity_limit: u64,
    /// Distinct user agents per user in 24 h above which the user is listed. Default
    /// [`HealthParams::DEFAULT_USER_AGENT_DIVERSITY_LIMIT`].
    pub user_agent_diversity_limit: u64,
    /// A report query slower than this many milliseconds raises an alert. Default
    /// [`HealthParams::DEFAULT_SLOW_QUERY_MS`].
    pub slow_query_ms: u64,
    /// Most rows listed per finding (suspicious sessions, users). Default
    /// [`HealthParams::DEFAULT_EXAMPLE_LIMIT`].
    pub example_limit: u64,
    /// Fleet facts, if the caller has them.
    pub fleet: Option<FleetFacts>,
    /// Maintenance findings, if the caller has them.
    pub findings: Option<DbFindings>,
    /// The "now" windows are measured from (UTC); `None` = the clock. Tests fix it.
    pub now: Option<NaiveDateTime>,
}

impl HealthParams {
    /// 48 hours, the spec's `SESSION_MAX_AGE`.
    pub const DEFAULT_MAX_AGE_SECS: u64 = 172_800;
    /// `SESSION_MAX_CONCURRENT_PER_USER` of the later reference (§3.2).
    pub const DEFAULT_CONCURRENT_SESSION_LIMIT: u64 = 5;
    /// Ten addresses a day is beyond a phone, a laptop and a few networks.
    pub const DEFAULT_IP_DIVERSITY_LIMIT: u64 = 10;
    /// Five browsers/apps a day is beyond one person's devices.
    pub const DEFAULT_USER_AGENT_DIVERSITY_LIMIT: u64 = 5;
    /// The later health checker's "response time warns" line (§3.3), 1000 ms.
    pub const DEFAULT_SLOW_QUERY_MS: u64 = 1000;
    /// Rows listed per finding.
    pub const DEFAULT_EXAMPLE_LIMIT: u64 = 10;
    /// Largest accepted `example_limit`: lists stay small whatever the table.
    pub const MAX_EXAMPLE_LIMIT: u64 = 1000;
    /// Largest accepted `max_age_secs` (ten years, as the configuration accepts).
    pub const MAX_MAX_AGE_SECS: u64 = 315_360_000;

    /// Refuses impossible values with one line.
    pub fn validate(&self) -> Result<(), OpError> {
        let bad = |m: String| Err(OpError::Invalid(m));
        self.thresholds.validate().map_err(OpError::Invalid)?;
        if !(1..=Self::MAX_MAX_AGE_SECS).contains(&self.max_age_secs) {
            return bad(format!(
                "max_age_secs must be 1..={}, got {}",
                Self::MAX_MAX_AGE_SECS,
                self.max_age_secs
            ));
        }
        for (name, v) in [
            ("concurrent_session_limit", self.concurrent_session_limit),
            ("ip_diversity_limit", self.ip_diversity_limit),
            (
                "user_agent_diversity_limit",
                self.user_agent_diversity_limit,
            ),
            ("slow_query_ms", self.slow_query_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !(1..=Self::MAX_EXAMPLE_LIMIT).contains(&self.example_limit) {
            return bad(format!(
                "example_limit must be 1..={}, got {}",
                Self::MAX_EXAMPLE_LIMIT,
                self.example_limit
            ));
        }
        if let Some(j) = self.fleet.as_ref().and_then(|f| f.jobs) {
            if j.window_secs == 0 {
                return bad("fleet job counts need a window_secs of at least 1".into());
            }
            if j.succeeded + j.failed > j.total {
                return bad(format!(
                    "fleet job counts are inconsistent: succeeded {} + failed {} > total {}",
                    j.succeeded, j.failed, j.total
                ));
            }
        }
        Ok(())
    }

    /// The report's "now".
    pub(crate) fn now(&self) -> NaiveDateTime {
        self.now.unwrap_or_else(|| Utc::now().naive_utc())
    }
}

impl Default for HealthParams {
    fn default() -> Self {
        HealthParams {
            thresholds: Thresholds::default(),
            max_age_secs: Self::DEFAULT_MAX_AGE_SECS,
            concurrent_session_limit: Self::DEFAULT_CONCURRENT_SESSION_LIMIT,
            ip_diversity_limit: Self::DEFAULT_IP_DIVERSITY_LIMIT,
            user_agent_diversity_limit: Self::DEFAULT_USER_AGENT_DIVERSITY_LIMIT,
            slow_query_ms: Self::DEFAULT_SLOW_QUERY_MS,
            example_limit: Self::DEFAULT_EXAMPLE_LIMIT,
            fleet: None,
            findings: None,
            now: None,
        }
    }
}

/// What an analytics job asks for (travels through Redis).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AnalyticsParams {
    /// `--health-report`.
    HealthReport(HealthParams),
    /// `--trends N`.
    Trends {
        /// Days, 1–366.
        days: u32,
        /// Seconds after its last update a v1 session expires (`SESSION_MAX_AGE` of the
        /// target). Absent from an older producer's payload: the 48 h default.
        #[serde(default = "default_max_age_secs")]
        max_age_secs: u64,
        /// Fleet facts (cleanup deletions per day), if any.
        #[serde(default)]
        fleet: Option<FleetFacts>,
    },
}

fn default_max_age_secs() -> u64 {
    HealthParams::DEFAULT_MAX_AGE_SECS
}

/// What an analytics job produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// One value per job, serialised straight away: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnalyticsReport {
    /// A health report.
    Health(HealthReport),
    /// A trends report.
    Trends(TrendsReport),
}

impl AnalyticsReport {
    /// Text for people.
    pub fn render_text(&self) -> String {
        match self {
            AnalyticsReport::Health(h) => h.render_text(),
            AnalyticsReport::Trends(t) => t.render_text(),
        }
    }
}

/// Runs one analytics job. Read-only: needs no fence.
///
/// `Ok(None)` when `ctx.cancel` fires before the report is done (a shutdown, the CLI's
/// deadline), or has already fired: a report half-gathered is worth nothing, so nothing is
/// kept and the job starts over when run again. Its statements in flight are given up on
/// the spot — cancelled on the server, their connections closed rather than pooled (see
/// `probe`) — so a report of a minute on a large table does not outlast a worker's
/// shutdown timeout.
pub async fn run(ctx: &OpContext, p: &AnalyticsParams) -> Result<Option<AnalyticsReport>, OpError> {
    let work = async {
        match p {
            AnalyticsParams::HealthReport(hp) => {
                Ok(AnalyticsReport::Health(health_report(&ctx.db, hp).await?))
            }
            AnalyticsParams::Trends {
                days,
                max_age_secs,
                fleet,
            } => Ok(AnalyticsReport::Trends(
                trends(&ctx.db, *days, *max_age_secs, fleet.as_ref()).await?,
            )),
        }
    };
    // Boxed: the report's concurrent queries make a large future, and inline it would make
    // every caller's as large (a test polling a job on its own thread overflowed its stack).
    until_cancelled(&ctx.cancel, Box::pin(work))
        .await
        .transpose()
}

/// `work`'s output, or `None` once `cancel` fires first — checked before `work` is first
/// polled, so a token already cancelled starts nothing. `work` is dropped part-way, so this
/// is for reads only, never for writes: the long statements, through `probe`, are cancelled
/// on the server and their connections closed; a short catalog read dropped mid-way (schema
/// detection, index lists) leaves its pooled connection to sqlx, which reads the rest of it
/// (a ping) before handing it out again.
pub(crate) async fn until_cancelled<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        done = work => Some(done),
    }
}

/// Builds the health report (see [`HealthReport`]); each exceeded threshold is also logged
/// at WARN.
pub async fn health_report(db: &Db, params: &HealthParams) -> Result<HealthReport, OpError> {
    params.validate()?;
    let figures = health::gather(db, params).await?;
    let report = rules::assemble(db, params, figures);
    for a in &report.alerts {
        tracing::warn!(alert = %a.name, severity = ?a.severity, value = a.value, threshold = a.threshold, "{}", a.message);
    }
    Ok(report)
}
