//! Text output for people, in the original's layout (reference §2.2), with the new figures
//! appended after the original's lines.

use std::fmt::Write;

use super::report::{HealthReport, TrendsReport};

impl HealthReport {
    /// The report as the original printed it, followed by alerts and key figures.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let h = &self.health_status;
        let _ = writeln!(o, "Session Health Report\n{}", "=".repeat(50));
        let _ = writeln!(o, "Overall Health: {}", h.overall_health.name());
        if !h.issues.is_empty() {
            let _ = writeln!(o, "\nIssues:");
            for i in &h.issues {
                let _ = writeln!(o, "  - {i}");
            }
        }
        let _ = writeln!(o, "\nRecommendations:");
        for r in &self.recommendations {
            let _ = writeln!(o, "  - {r}");
        }
        let d = &self.detailed_analytics;
        let _ = writeln!(o, "Active Users: {}", d.active_users);
        let _ = writeln!(o, "Multi-Session Users: {}", d.multi_session_users);
        let _ = writeln!(o, "Sessions (Last 24h): {}", d.age_distribution.last_24h);

        let c = &self.statistics.session_counts;
        let _ = writeln!(o, "\nTotal Sessions: {}", c.total_sessions);
        let _ = writeln!(o, "Active Sessions: {}", c.active_sessions);
        let _ = writeln!(o, "Unique Users: {}", c.unique_users);
        let _ = writeln!(
            o,
            "Creation Rate: {:.1}/min (5 min), {:.1}/min (1 h)",
            self.statistics.creation_rate.per_minute_last_5_minutes,
            self.statistics.creation_rate.per_minute_last_hour
        );
        let _ = writeln!(
            o,
            "Security Score: {}",
            self.security_analysis.security_score
        );
        let p = &self.performance_metrics;
        let _ = writeln!(
            o,
            "Report Queries: {} in {:.0} ms",
            p.query_count, p.total_query_millis
        );
        match p.operation_success_rate {
            Some(r) => {
                let _ = writeln!(o, "Fleet Success Rate: {r:.1}%");
            }
            None => {
                let _ = writeln!(o, "Fleet Success Rate: not recorded");
            }
        }
        if !self.alerts.is_empty() {
            let _ = writeln!(o, "\nAlerts:");
            for a in &self.alerts {
                let sev = match a.severity {
                    super::Severity::Warning => "WARNING",
                    super::Severity::Critical => "CRITICAL",
                };
                let _ = writeln!(o, "  - [{sev}] {}", a.message);
            }
        }
        let unsupported = &self.statistics.schema.unsupported;
        if !unsupported.is_empty() {
            let _ = writeln!(o, "\nNot available on this schema:");
            for u in unsupported {
                let _ = writeln!(o, "  - {u}");
            }
        }
        o
    }
}

impl TrendsReport {
    /// The trends as the original printed them, each day followed by expired and cleanup counts.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Session Trends ({} days)\n{}",
            self.period_days,
            "=".repeat(30)
        );
        for d in &self.days {
            let _ = write!(
                o,
                "{}: {} sessions ({} expired",
                d.date, d.created, d.expired
            );
            if let Some(c) = d.cleanup_deleted {
                let _ = write!(o, ", {c} cleaned up");
            }
            let _ = writeln!(o, ")");
        }
        let _ = writeln!(o, "\nTotal: {} sessions", self.total_sessions_created);
        let _ = writeln!(
            o,
            "Average: {:.1} sessions/day",
            self.average_daily_sessions
        );
        let _ = writeln!(o, "Expired: {} sessions", self.total_sessions_expired);
        if let Some(c) = self.total_cleanup_deleted {
            let _ = writeln!(o, "Cleaned up: {c} sessions");
        }
        o
    }
}
