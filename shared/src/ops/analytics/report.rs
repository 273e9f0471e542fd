//! The health report's shape. Top-level keys are the original's (`timestamp`, `health_status`,
//! `statistics`, `detailed_analytics`, `performance_metrics`, `security_analysis`,
//! `recommendations`) plus `alerts`. Figures the schema cannot support are `null` and named in
//! `statistics.schema.unsupported`, never invented.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::JobCounts;
use super::probe::QueryTiming;

/// The full health report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthReport {
    /// The "now" every window was measured from (UTC).
    pub timestamp: DateTime<Utc>,
    /// good / warning / critical, why, and what to do.
    pub health_status: HealthStatus,
    /// Session counts and creation rates.
    pub statistics: Statistics,
    /// Age, platform and duration breakdowns.
    pub detailed_analytics: DetailedAnalytics,
    /// Query times, pool figures, fleet success rate.
    pub performance_metrics: PerformanceMetrics,
    /// Security findings and score.
    pub security_analysis: SecurityAnalysis,
    /// Concrete recommendations, each with the figure and line that triggered it.
    pub recommendations: Vec<String>,
    /// Every exceeded threshold and database or performance problem.
    pub alerts: Vec<Alert>,
}

/// Overall health, ordered: a later rule can only raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Nothing crossed a line.
    Good,
    /// Something needs attention.
    Warning,
    /// Something is failing or unsafe.
    Critical,
}

impl Health {
    /// Lower-case name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Health::Good => "good",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// The `health_status` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthStatus {
    /// The worst level any rule reached.
    pub overall_health: Health,
    /// One line per rule that fired.
    pub issues: Vec<String>,
    /// What to do about the issues (the same concrete lines as the top-level list, or
    /// "Session system is operating normally").
    pub recommendations: Vec<String>,
}

/// Severity of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Needs attention.
    Warning,
    /// Failing or unsafe.
    Critical,
}

/// One alert: a figure above its line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alert {
    /// Threshold or finding name (`session_creation_rate`, `missing_index`, `slow_report_query`…).
    pub name: String,
    /// How bad.
    pub severity: Severity,
    /// The measured figure.
    pub value: f64,
    /// The line it crossed.
    pub threshold: f64,
    /// One sentence for people.
    pub message: String,
}

/// The `statistics` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statistics {
    /// Totals.
    pub session_counts: SessionCounts,
    /// Sessions created recently, from `created_at`.
    pub creation_rate: CreationRate,
    /// What "active" means on this schema.
    pub active_definition: String,
    /// Which schema was found and what it cannot support.
    pub schema: SchemaInfo,
}

/// Session totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCounts {
    /// Rows in the session table.
    pub total_sessions: u64,
    /// Active sessions (see `active_definition`).
    pub active_sessions: u64,
    /// Distinct users owning at least one session row.
    pub unique_users: u64,
}

/// Creation counts and per-minute rates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreationRate {
    /// Sessions created in the last 5 minutes.
    pub created_last_5_minutes: u64,
    /// Sessions created in the last hour.
    pub created_last_hour: u64,
    /// `created_last_5_minutes / 5`.
    pub per_minute_last_5_minutes: f64,
    /// `created_last_hour / 60`.
    pub per_minute_last_hour: f64,
}

/// The schema the report ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemaInfo {
    /// `v1` or `v2`.
    pub version: String,
    /// One-line summary of the tables found.
    pub summary: String,
    /// Figures this schema cannot support (they are `null` in the report).
    pub unsupported: Vec<String>,
    /// Detection notes.
    pub notes: Vec<String>,
}

/// The `detailed_analytics` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetailedAnalytics {
    /// Sessions by last activity, cumulative windows as in the original.
    pub age_distribution: AgeDistribution,
    /// Sessions per platform type (`null` without a platform table). Sessions with no
    /// platform or a missing one are counted in `security_analysis`, not here.
    pub platform_distribution: Option<BTreeMap<String, u64>>,
    /// Distinct users with at least one active session.
    pub active_users: u64,
    /// Users owning more than one session row.
    pub multi_session_users: u64,
    /// Activity − creation over all rows.
    pub session_duration_stats: DurationStats,
}

/// Sessions whose last activity is within each window (cumulative: the month includes the week).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgeDistribution {
    /// Within 1 hour.
    pub last_hour: u64,
    /// Within 24 hours.
    pub last_24h: u64,
    /// Within 7 days.
    pub last_week: u64,
    /// Within 30 days.
    pub last_month: u64,
}

/// Duration statistics in seconds; `null` over an empty table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DurationStats {
    /// Mean.
    pub avg_duration_seconds: Option<f64>,
    /// Minimum.
    pub min_duration_seconds: Option<f64>,
    /// Maximum.
    pub max_duration_seconds: Option<f64>,
    /// Rows considered.
    pub total_sessions_analyzed: u64,
}

/// The `performance_metrics` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerformanceMetrics {
    /// Every query the report ran, in order.
    pub queries: Vec<QueryTiming>,
    /// Number of queries.
    pub query_count: u64,
    /// Sum of their round-trip times.
    pub total_query_millis: f64,
    /// The slowest.
    pub slowest_query_millis: f64,
    /// The pool this process holds to the database.
    pub connection_pool: PoolFigures,
    /// Succeeded / finished fleet jobs × 100, when the fleet supplied its counts.
    pub operation_success_rate: Option<f64>,
    /// The fleet's counts behind it.
    pub fleet_jobs: Option<JobCounts>,
    /// Why a figure is absent.
    pub notes: Vec<String>,
}

/// Connection pool figures (sqlx).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolFigures {
    /// Engine name.
    pub engine: String,
    /// Connections open when the report started (before its own queries).
    pub size: u32,
    /// Of which idle.
    pub idle: u32,
    /// Configured maximum.
    pub max_connections: u32,
}

/// The `security_analysis` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecurityAnalysis {
    /// Rapidly updated sessions (first `example_limit`).
    pub suspicious_sessions: Vec<SuspiciousSession>,
    /// How many there are in all.
    pub suspicious_session_count: u64,
    /// Created more than 7 days ago and used within the last hour.
    pub old_active_sessions: u64,
    /// Sessions with no active platform (the original's name for them).
    pub orphaned_platform_sessions: Option<u64>,
    /// Sessions pointing at a platform row that does not exist.
    pub missing_platform_sessions: Option<u64>,
    /// Users with more active sessions than the limit.
    pub users_over_session_limit: UserFinding,
    /// Users seen from more distinct IP addresses in 24 h than the limit.
    pub users_with_many_ips: Option<UserFinding>,
    /// Users seen with more distinct user agents in 24 h than the limit.
    pub users_with_many_user_agents: Option<UserFinding>,
    /// 0–100; see [`security_score`](super::security::security_score).
    pub security_score: u32,
    /// The deductions that made the score.
    pub score_deductions: Vec<String>,
}

/// One rapidly updated session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuspiciousSession {
    /// First 8 characters of the session key, then `...`.
    pub session_id: String,
    /// Owner.
    pub user_id: i64,
    /// Always `rapid_updates`.
    pub reason: String,
    /// Seconds between creation and last activity.
    pub update_frequency_seconds: f64,
}

/// Users above a per-user limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserFinding {
    /// The limit.
    pub limit: u64,
    /// Users above it.
    pub count: u64,
    /// The worst users (at most `example_limit`).
    pub examples: Vec<UserCount>,
}

/// A user and the figure that put them on a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserCount {
    /// User id.
    pub user_id: i64,
    /// Sessions, IPs or user agents.
    pub value: u64,
}

/// Sessions per UTC calendar day.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrendsReport {
    /// Days covered (1–366), ending today.
    pub period_days: u32,
    /// When it was computed.
    pub timestamp: DateTime<Utc>,
    /// One row per day, oldest first.
    pub days: Vec<TrendDay>,
    /// Sessions created over the period (rows still in the table).
    pub total_sessions_created: u64,
    /// `total_sessions_created / period_days`.
    pub average_daily_sessions: f64,
    /// Sessions that expired over the period.
    pub total_sessions_expired: u64,
    /// Cleanup deletions over the period, when the fleet recorded them.
    pub total_cleanup_deleted: Option<u64>,
    /// What each column means on this schema.
    pub notes: Vec<String>,
}

/// One day of trends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrendDay {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// Sessions created that day.
    pub created: u64,
    /// Sessions that expired that day.
    pub expired: u64,
    /// Sessions the fleet's cleanup deleted that day (absent without fleet facts).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cleanup_deleted: Option<u64>,
}
