//! Printing finished runs: text for people, one JSON document for scripts, and the exit code
//! the results call for.

use sessionfleet::jobs::JobKind;
use sessionfleet::ops::analytics::{AnalyticsReport, Health};
use sessionfleet::ops::cleanup::CleanupReport;
use sessionfleet::ops::full::FullReport;
use sessionfleet::ops::maintenance::MaintenanceReport;

use crate::exit::Exit;
use crate::output::Output;
use crate::run::Finished;

/// Prints the runs and returns the exit code: 1 if any failed (or a full maintenance went on
/// past a failed stage), else 4 if any was cut short by `--timeout`, else 3 if a health report
/// is critical, else 0.
pub fn finished(runs: &[Finished], out: &Output) -> Exit {
    if out.json {
        if runs.len() == 1 && runs[0].error.is_none() {
            out.print_json(&runs[0].report);
        } else {
            out.print_json(runs);
        }
    } else {
        for (i, r) in runs.iter().enumerate() {
            if runs.len() > 1 {
                if i > 0 {
                    println!();
                }
                println!("## target {}", r.target);
            }
            // A run stopped part-way (interrupted, a later part failed) still shows what its
            // finished parts did, before the error.
            if !r.report.is_null() {
                print!("{}", text(r.kind, &r.report));
            }
            if let Some(e) = &r.error {
                println!("Error: {e}");
            }
        }
    }
    for r in runs {
        if stage_failed(r.kind, &r.report) {
            let errors: Vec<&str> = r
                .report
                .pointer("/errors")
                .and_then(|e| e.as_array())
                .map(|e| e.iter().filter_map(|e| e.as_str()).collect())
                .unwrap_or_default();
            out.error(format!(
                "{} on target {} completed with errors: {}",
                r.kind.as_str(),
                r.target,
                errors.join("; ")
            ));
        }
        if let Some(e) = &r.error {
            let verb = if r.timed_out { "stopped" } else { "failed" };
            out.error(format!(
                "{} on target {} {verb}: {e}",
                r.kind.as_str(),
                r.target
            ));
        }
    }
    // A failure outranks a timeout: a script must not read "try again later" for a run that
    // failed beside one that ran out of time.
    if runs
        .iter()
        .any(|r| (r.error.is_some() && !r.timed_out) || stage_failed(r.kind, &r.report))
    {
        Exit::OperationFailed
    } else if runs.iter().any(|r| r.timed_out) {
        Exit::Timeout
    } else if runs.iter().any(|r| critical(r.kind, &r.report)) {
        Exit::HealthCritical
    } else {
        Exit::Success
    }
}

/// The report in the original's text layout.
pub fn text(kind: JobKind, report: &serde_json::Value) -> String {
    let decoded = match kind {
        JobKind::Cleanup => {
            serde_json::from_value::<CleanupReport>(report.clone()).map(|r| r.render_text())
        }
        JobKind::Analytics => {
            serde_json::from_value::<AnalyticsReport>(report.clone()).map(|r| r.render_text())
        }
        JobKind::Maintenance => {
            serde_json::from_value::<MaintenanceReport>(report.clone()).map(|r| r.render_text())
        }
        JobKind::FullMaintenance => {
            serde_json::from_value::<FullReport>(report.clone()).map(|r| r.render_text())
        }
        _ => Ok(serde_json::to_string_pretty(report).unwrap_or_default()),
    };
    let mut s =
        decoded.unwrap_or_else(|_| serde_json::to_string_pretty(report).unwrap_or_default());
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Full maintenance that went on past a failed stage (its summary says
/// `completed_with_errors`): the run kept its report and counts, but a script must not read
/// success.
fn stage_failed(kind: JobKind, report: &serde_json::Value) -> bool {
    kind == JobKind::FullMaintenance
        && report.pointer("/summary/status").and_then(|s| s.as_str())
            == Some("completed_with_errors")
}

fn critical(kind: JobKind, report: &serde_json::Value) -> bool {
    let health = match kind {
        JobKind::Analytics => report.pointer("/health_status/overall_health"),
        JobKind::FullMaintenance => report.pointer("/analytics/health_status/overall_health"),
        _ => None,
    };
    health.and_then(|h| serde_json::from_value::<Health>(h.clone()).ok()) == Some(Health::Critical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_maintenance(status: &str) -> Finished {
        Finished {
            target: "default".into(),
            kind: JobKind::FullMaintenance,
            run_id: "r".into(),
            parts: 1,
            report: serde_json::json!({
                "summary": {"status": status},
                "errors": ["optimize: ANALYZE user_sessions: lock timeout"],
            }),
            error: None,
            timed_out: false,
            ran: "fleet",
        }
    }

    #[test]
    fn full_maintenance_past_a_failed_stage_exits_as_a_failure() {
        let json = Output::new(true, false);
        assert_eq!(
            finished(&[full_maintenance("completed_with_errors")], &json),
            Exit::OperationFailed
        );
        assert_eq!(
            finished(&[full_maintenance("completed")], &json),
            Exit::Success
        );
    }
}
