//! From figures to verdicts: health status, alerts and recommendations.
//!
//! Health status starts at `good`; each rule below that fires *raises* it to its level and
//! never lowers it (the original assigned each level in turn, so a later warning could
//! downgrade a critical):
//!
//! | rule | level |
//! |---|---|
//! | creation rate (last 5 min) > `session_creation_rate` | warning |
//! | fleet failures per minute > `session_failure_rate` | critical |
//! | active sessions > `concurrent_sessions` | warning |
//! | mean session duration > `avg_session_duration` | warning |
//! | suspicious sessions per minute (last 5 min) > `suspicious_activity_rate` | warning |
//! | an integrity failure reported by maintenance | critical |
//! | a recommended index reported missing | warning |
//! | a report query slower than `slow_query_ms` | warning |
//! | security score < [`SECURITY_SCORE_LINE`] (80) | warning |
//! | security score < [`SECURITY_SCORE_CRITICAL`] (50) | critical |
//! | users over the concurrent-session or diversity limits | warning |
//!
//! Each rule adds one issue line, one or more alerts, and a recommendation naming the figure
//! and the line it crossed.

use super::health::{Figures, RECENT_WINDOW_SECS};
use super::report::*;
use super::{HealthParams, security};
use crate::store::Db;

/// Security score below which sessions need review (original rule).
pub const SECURITY_SCORE_LINE: u32 = 80;
/// Security score below which health is critical.
pub const SECURITY_SCORE_CRITICAL: u32 = 50;
/// Sessions last active 7–30 days ago above which cleanup should be more aggressive (original).
pub const CLEANUP_BACKLOG_LINE: u64 = 100;
/// Fleet job success rate (%) below which failures need investigation (original).
pub const SUCCESS_RATE_LINE: f64 = 95.0;

/// Collects issues, alerts and recommendations while keeping the worst level.
struct Verdict {
    status: Health,
    issues: Vec<String>,
    alerts: Vec<Alert>,
    recommendations: Vec<String>,
}

impl Verdict {
    /// Raises (never lowers) the status, and records what fired.
    fn fire(&mut self, level: Health, issue: String, recommendation: Option<String>) {
        self.status = self.status.max(level);
        self.issues.push(issue);
        if let Some(r) = recommendation
            && !self.recommendations.contains(&r)
        {
            self.recommendations.push(r);
        }
    }

    fn alert(
        &mut self,
        name: &str,
        severity: Severity,
        value: f64,
        threshold: f64,
        message: String,
    ) {
        self.alerts.push(Alert {
            name: name.into(),
            severity,
            value,
            threshold,
            message,
        });
    }
}

fn level(s: Severity) -> Health {
    match s {
        Severity::Warning => Health::Warning,
        Severity::Critical => Health::Critical,
    }
}

/// Turns figures into the report.
pub(crate) fn assemble(db: &Db, p: &HealthParams, f: Figures) -> HealthReport {
    let th = &p.thresholds;
    let minutes = RECENT_WINDOW_SECS as f64 / 60.0;
    let rate_5m = f.created_5m as f64 / minutes;
    let security = security::analyse(&f, p);
    let mut v = Verdict {
        status: Health::Good,
        issues: vec![],
        alerts: vec![],
        recommendations: vec![],
    };

    // Threshold rules, in the original's order first (creation, failure, concurrency).
    let threshold_rule = |v: &mut Verdict,
                          name: &str,
                          sev: Severity,
                          value: f64,
                          line: f64,
                          issue: &str,
                          unit: &str,
                          advice: &str| {
        if value > line {
            let msg =
                format!("{issue}: {name} is {value:.2}{unit}, above the threshold {line}{unit}");
            v.alert(name, sev, value, line, msg.clone());
            v.fire(
                level(sev),
                msg,
                Some(format!("{advice} ({name} {value:.2}{unit} > {line}{unit})")),
            );
        }
    };
    threshold_rule(
        &mut v,
        "session_creation_rate",
        Severity::Warning,
        rate_5m,
        th.session_creation_rate,
        "High session creation rate detected",
        "/min",
        "Review session management configuration: sessions are being created unusually fast",
    );
    let jobs = p.fleet.as_ref().and_then(|fl| fl.jobs);
    if let Some(j) = jobs {
        let per_min = j.failed as f64 / (j.window_secs as f64 / 60.0);
        threshold_rule(
            &mut v,
            "session_failure_rate",
            Severity::Critical,
            per_min,
            th.session_failure_rate,
            "High session error rate detected",
            "/min",
            "Investigate the failing maintenance jobs in the fleet's dead-letter list",
        );
    }
    threshold_rule(
        &mut v,
        "concurrent_sessions",
        Severity::Warning,
        f.active as f64,
        th.concurrent_sessions,
        "High number of concurrent sessions",
        "",
        "Consider implementing session cleanup policies or a shorter session lifetime",
    );
    if let Some(avg) = f.duration[0] {
        threshold_rule(
            &mut v,
            "avg_session_duration",
            Severity::Warning,
            avg,
            th.avg_session_duration,
            "Long average session duration",
            " s",
            "Consider a shorter idle timeout: sessions stay in use for a long time",
        );
    }
    let suspicious_rate = f.suspicious_count as f64 / minutes;
    threshold_rule(
        &mut v,
        "suspicious_activity_rate",
        Severity::Warning,
        suspicious_rate,
        th.suspicious_activity_rate,
        "High rate of rapidly updated sessions",
        "/min",
        "Review session security - rapidly updated sessions detected",
    );

    // Database findings from the maintenance operation.
    if let Some(fd) = &p.findings {
        for failure in &fd.integrity_failures {
            let msg = format!("Database integrity check failed: {failure}");
            v.alert(
                "integrity_failure",
                Severity::Critical,
                1.0,
                0.0,
                msg.clone(),
            );
            v.fire(Health::Critical, msg, Some("Database corruption detected - consider backup and restore (integrity check failed)".into()));
        }
        for ix in &fd.missing_indexes {
            let msg = format!("Missing recommended index: {ix}");
            v.alert("missing_index", Severity::Warning, 1.0, 0.0, msg.clone());
            v.fire(
                Health::Warning,
                msg,
                Some(format!(
                    "Create the recommended index {ix} (reported missing by database maintenance)"
                )),
            );
        }
    }

    // Performance degradation: the report's own queries.
    let slow_line = p.slow_query_ms as f64;
    for q in f.timings.iter().filter(|q| q.millis > slow_line) {
        let msg = format!(
            "Slow report query: {} took {:.0} ms, above {} ms",
            q.name, q.millis, p.slow_query_ms
        );
        v.alert(
            "slow_report_query",
            Severity::Warning,
            q.millis,
            slow_line,
            msg.clone(),
        );
        v.fire(Health::Warning, msg, Some(format!(
            "Run database maintenance (analyze, recommended indexes): report query {} took {:.0} ms > {} ms",
            q.name, q.millis, p.slow_query_ms
        )));
    }

    // Security.
    let score = security.security_score;
    if score < SECURITY_SCORE_LINE {
        // The alert names the line it crossed: the critical one when it is critical.
        let (sev, line) = if score < SECURITY_SCORE_CRITICAL {
            (Severity::Critical, SECURITY_SCORE_CRITICAL)
        } else {
            (Severity::Warning, SECURITY_SCORE_LINE)
        };
        let msg = format!("Security score {score} is below {line}");
        v.alert(
            "security_score",
            sev,
            score as f64,
            line as f64,
            msg.clone(),
        );
        v.fire(level(sev), msg, Some(format!(
            "Review session security - suspicious activity detected (security score {score} < {SECURITY_SCORE_LINE}: {})",
            security.score_deductions.join("; ")
        )));
    }
    let user_rule = |v: &mut Verdict, name: &str, what: &str, finding: Option<&UserFinding>| {
        let Some(u) = finding.filter(|u| u.count > 0) else {
            return;
        };
        let eg = u.examples.first().map_or(String::new(), |e| {
            format!(", e.g. user {} with {}", e.user_id, e.value)
        });
        let msg = format!("{} users have more than {} {what}{eg}", u.count, u.limit);
        v.alert(name, Severity::Warning, u.count as f64, 0.0, msg.clone());
        v.fire(
            Health::Warning,
            msg.clone(),
            Some(format!("Review these users' sessions: {msg}")),
        );
    };
    user_rule(
        &mut v,
        "users_over_session_limit",
        "active sessions",
        Some(&security.users_over_session_limit),
    );
    user_rule(
        &mut v,
        "users_with_many_ips",
        "IP addresses in 24 h",
        security.users_with_many_ips.as_ref(),
    );
    user_rule(
        &mut v,
        "users_with_many_user_agents",
        "user agents in 24 h",
        security.users_with_many_user_agents.as_ref(),
    );

    // The original's remaining recommendation rules (pool, cleanup backlog, success rate).
    let (size, idle, max) = f.pool;
    if size >= max && idle == 0 {
        v.recommendations.push(format!(
            "Consider increasing database connection pool size: all {max} connections were busy"
        ));
    }
    let backlog = f.age[3].saturating_sub(f.age[2]);
    if backlog > CLEANUP_BACKLOG_LINE {
        v.recommendations.push(format!(
            "Consider more aggressive session cleanup policies: {backlog} sessions were last active 7-30 days ago (line: {CLEANUP_BACKLOG_LINE})"
        ));
    }
    let mut notes = Vec::new();
    let success_rate = match jobs {
        Some(j) if j.succeeded + j.failed > 0 => {
            let rate = j.succeeded as f64 * 100.0 / (j.succeeded + j.failed) as f64;
            if rate < SUCCESS_RATE_LINE {
                v.recommendations.push(format!(
                    "Investigate session operation failures: fleet success rate {rate:.1}% < {SUCCESS_RATE_LINE}% ({} of {} jobs failed)",
                    j.failed, j.succeeded + j.failed
                ));
            }
            Some(rate)
        }
        Some(_) => {
            notes.push(
                "the fleet recorded no finished jobs in the window: success rate not computed"
                    .into(),
            );
            None
        }
        None => {
            notes.push(
                "no fleet job outcomes were supplied: success rate and failure rate not computed"
                    .into(),
            );
            None
        }
    };
    let health_recs = if v.issues.is_empty() {
        vec!["Session system is operating normally".to_string()]
    } else {
        v.recommendations.clone()
    };
    if v.recommendations.is_empty() {
        v.recommendations
            .push("Session system is operating optimally".into());
    }

    let timings = f.timings;
    let total_ms: f64 = timings.iter().map(|q| q.millis).sum();
    let slowest = timings.iter().map(|q| q.millis).fold(0.0, f64::max);
    let ts = f.now.and_utc();
    let mut unsupported = f.unsupported;
    unsupported.extend(f.schema.notes.iter().cloned());
    HealthReport {
        timestamp: ts,
        health_status: HealthStatus {
            overall_health: v.status,
            issues: v.issues,
            recommendations: health_recs,
        },
        statistics: Statistics {
            session_counts: SessionCounts {
                total_sessions: f.total,
                active_sessions: f.active,
                unique_users: f.unique_users,
            },
            creation_rate: CreationRate {
                created_last_5_minutes: f.created_5m,
                created_last_hour: f.created_1h,
                per_minute_last_5_minutes: rate_5m,
                per_minute_last_hour: f.created_1h as f64 / 60.0,
            },
            active_definition: f.active_definition,
            schema: SchemaInfo {
                version: f.schema.version.to_string(),
                summary: f.schema.summary(),
                unsupported,
                notes: vec![format!(
                    "windows end at {} UTC; rates use created_at; rapid updates are sessions created and used within {} s, used less than {} s after creation but not untouched",
                    ts.format("%Y-%m-%d %H:%M:%S"),
                    RECENT_WINDOW_SECS,
                    super::health::RAPID_UPDATE_SECS
                )],
            },
        },
        detailed_analytics: DetailedAnalytics {
            age_distribution: AgeDistribution {
                last_hour: f.age[0],
                last_24h: f.age[1],
                last_week: f.age[2],
                last_month: f.age[3],
            },
            platform_distribution: f.platform_distribution.map(|d| d.into_iter().collect()),
            active_users: f.active_users,
            multi_session_users: f.multi_session_users,
            session_duration_stats: DurationStats {
                avg_duration_seconds: f.duration[0],
                min_duration_seconds: f.duration[1],
                max_duration_seconds: f.duration[2],
                total_sessions_analyzed: f.total,
            },
        },
        performance_metrics: PerformanceMetrics {
            query_count: timings.len() as u64,
            total_query_millis: total_ms,
            slowest_query_millis: slowest,
            queries: timings,
            connection_pool: PoolFigures {
                engine: db.engine().name().into(),
                size,
                idle,
                max_connections: max,
            },
            operation_success_rate: success_rate,
            fleet_jobs: jobs,
            notes,
        },
        security_analysis: security,
        recommendations: v.recommendations,
        alerts: v.alerts,
    }
}
