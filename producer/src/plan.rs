//! What a person (or the scheduler) asks for, turned into operation parameters with the
//! configured defaults of the target: batch size, max age, budget, thresholds.

use sessionfleet::config::{Settings, Target};
use sessionfleet::dispatch::OperationJob;
use sessionfleet::ops::analytics::{AnalyticsParams, HealthParams, Thresholds};
use sessionfleet::ops::cleanup::CleanupParams;
use sessionfleet::ops::full::FullParams;
use sessionfleet::ops::maintenance::{MaintenanceAction, MaintenanceParams};

use crate::exit::CliError;

/// What kind of cleanup.
#[derive(Debug, Clone, Default)]
pub struct CleanupAsk {
    /// `--force`.
    pub force: bool,
    /// `--max-age H`.
    pub max_age_hours: Option<u32>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--batch-size`.
    pub batch_size: Option<u32>,
    /// `--budget`.
    pub budget_secs: Option<u64>,
}

/// Cleanup parameters for `target`.
pub fn cleanup_params(
    settings: &Settings,
    target: &Target,
    ask: &CleanupAsk,
) -> anyhow::Result<CleanupParams> {
    let p = CleanupParams {
        batch_size: ask
            .batch_size
            .unwrap_or_else(|| settings.batch_size_for(target)),
        target_batch_ms: settings.target_batch_ms_for(target),
        rest_ratio: settings.rest_ratio_for(target),
        parallel_reads: settings.parallel_reads_for(target),
        max_age_secs: settings.max_age_for(target).as_secs(),
        force: ask.force,
        force_max_age_hours: ask.max_age_hours,
        dry_run: ask.dry_run,
        budget_secs: Some(ask.budget_secs.unwrap_or(settings.job_budget_secs.value)),
        interval_secs: settings.cleanup_interval.value,
        ..CleanupParams::default()
    };
    p.validate().map_err(|e| CliError::usage(e.to_string()))?;
    Ok(p)
}

/// Health-report parameters: thresholds from `SESSION_ALERT_THRESHOLDS_FILE`, max age of the target.
pub fn health_params(settings: &Settings, target: &Target) -> anyhow::Result<HealthParams> {
    let thresholds = Thresholds::load_or_default(settings.alert_thresholds_file.value.as_deref())
        .map_err(|e| CliError::usage(e.to_string()))?;
    let p = HealthParams {
        thresholds,
        max_age_secs: settings.max_age_for(target).as_secs(),
        ..HealthParams::default()
    };
    p.validate().map_err(|e| CliError::usage(e.to_string()))?;
    Ok(p)
}

/// A cleanup job.
pub fn cleanup(
    settings: &Settings,
    target: &Target,
    ask: &CleanupAsk,
) -> anyhow::Result<OperationJob> {
    Ok(OperationJob::Cleanup(cleanup_params(
        settings, target, ask,
    )?))
}

/// A health-report job.
pub fn health(settings: &Settings, target: &Target) -> anyhow::Result<OperationJob> {
    Ok(OperationJob::Analytics(AnalyticsParams::HealthReport(
        health_params(settings, target)?,
    )))
}

/// A trends job on `target`, whose v1 sessions expire after its `SESSION_MAX_AGE`.
pub fn trends(settings: &Settings, target: &Target, days: u32) -> anyhow::Result<OperationJob> {
    if !(1..=366).contains(&days) {
        return Err(CliError::usage(format!(
            "--trends {days}: the number of days must be from 1 to 366"
        )));
    }
    Ok(OperationJob::Analytics(AnalyticsParams::Trends {
        days,
        max_age_secs: settings.max_age_for(target).as_secs(),
        fleet: None,
    }))
}

/// A database-maintenance job.
pub fn maintenance(action: MaintenanceAction, dry_run: bool) -> anyhow::Result<OperationJob> {
    let p = MaintenanceParams { action, dry_run };
    p.validate().map_err(|e| CliError::usage(e.to_string()))?;
    Ok(OperationJob::Maintenance(p))
}

/// A full-maintenance job.
pub fn full(settings: &Settings, target: &Target, dry_run: bool) -> anyhow::Result<OperationJob> {
    let p = FullParams {
        cleanup: cleanup_params(
            settings,
            target,
            &CleanupAsk {
                dry_run,
                ..CleanupAsk::default()
            },
        )?,
        health: health_params(settings, target)?,
        dry_run,
        ..FullParams::default()
    };
    Ok(OperationJob::FullMaintenance(Box::new(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessionfleet::config::Overrides;

    /// A trends job counts v1 expiries with the target's `SESSION_MAX_AGE`, as the health
    /// report and the cleanup do, not the 48 h default.
    #[test]
    fn trends_take_the_target_s_max_age() {
        let env = |k: &str| match k {
            "DATABASE_URL" => Some("sqlite:///tmp/plan-test.db".to_string()),
            "SESSION_MAX_AGE" => Some("86400".to_string()),
            _ => None,
        };
        let settings = Settings::resolve(&Overrides::default(), &env, None).expect("settings");
        let target = settings.target(None).expect("target");
        match trends(&settings, target, 7).expect("job") {
            OperationJob::Analytics(AnalyticsParams::Trends { max_age_secs, .. }) => {
                assert_eq!(max_age_secs, 86_400)
            }
            other => panic!("not a trends job: {other:?}"),
        }
        assert!(trends(&settings, target, 0).is_err());
    }
}
