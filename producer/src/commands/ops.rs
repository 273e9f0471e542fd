//! `cleanup`, `analytics`, `db` and `maintenance`: the original utilities' modes.

use sessionfleet::ops::analytics::{self, AnalyticsReport, HealthReport};
use sessionfleet::ops::cleanup;
use sessionfleet::ops::maintenance::MaintenanceAction;
use sessionfleet::store::{ConnectOptions, Db};

use crate::cli::{AnalyticsArgs, CleanupArgs, DbArgs, MaintenanceArgs};
use crate::exit::{CliError, Exit};
use crate::plan::{self, CleanupAsk};
use crate::render;
use crate::run::{self, Invocation};

/// Prints the subcommand's help (no mode given) and succeeds, as the original did.
fn help(name: &str) -> anyhow::Result<Exit> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    if let Some(sub) = cmd.find_subcommand_mut(name) {
        let _ = sub.print_help();
    }
    Ok(Exit::Success)
}

async fn finish(inv: &Invocation<'_>, runs: Option<Vec<run::Finished>>) -> anyhow::Result<Exit> {
    Ok(match runs {
        Some(r) => render::finished(&r, &inv.out),
        None => Exit::Success,
    })
}

/// `sessionfleet cleanup`.
pub async fn cleanup(inv: &Invocation<'_>, a: &CleanupArgs) -> anyhow::Result<Exit> {
    if a.stats {
        return cleanup_stats(inv).await;
    }
    let ask = CleanupAsk {
        force: a.force,
        max_age_hours: a.max_age,
        dry_run: a.dry_run,
        batch_size: a.batch_size,
        budget_secs: a.budget,
    };
    if a.daemon {
        return crate::commands::schedule::run(inv, Some(&ask)).await;
    }
    if !(a.once || a.force || a.dry_run) {
        return help("cleanup");
    }
    if a.max_age.is_some() && !a.force {
        return Err(CliError::usage("--max-age applies with --force"));
    }
    let runs = run::run(inv, |t| plan::cleanup(inv.settings, t, &ask)).await?;
    finish(inv, runs).await
}

/// `cleanup --stats`: counts, read in this process (nothing to lock or queue).
pub async fn cleanup_stats(inv: &Invocation<'_>) -> anyhow::Result<Exit> {
    let mut docs = Vec::new();
    for target in inv.targets()? {
        let db = Db::connect(&target.url, &ConnectOptions::default()).await?;
        let params = plan::cleanup_params(inv.settings, target, &CleanupAsk::default())?;
        let stats = cleanup::stats(&db, &params).await?;
        db.close().await;
        if !inv.out.json {
            if inv.global.all_targets {
                println!("## target {}", target.name);
            }
            print!("{}", stats.render_text());
        }
        docs.push(stats);
    }
    if inv.out.json {
        if docs.len() == 1 {
            inv.out.print_json(&docs[0]);
        } else {
            inv.out.print_json(&docs);
        }
    }
    Ok(Exit::Success)
}

/// `sessionfleet analytics`.
pub async fn analytics(inv: &Invocation<'_>, a: &AnalyticsArgs) -> anyhow::Result<Exit> {
    if let Some(days) = a.trends {
        let runs = run::run(inv, |t| plan::trends(inv.settings, t, days)).await?;
        return finish(inv, runs).await;
    }
    if !a.health_report {
        return help("analytics");
    }
    if let Some(path) = &a.export {
        check_export_path(path)?;
        // One file holds one report, and only a report waited for can be written.
        if inv.global.all_targets {
            return Err(CliError::usage(
                "--export writes one target's report: name it with --target instead of --all-targets",
            ));
        }
        if inv.global.no_wait {
            return Err(CliError::usage(
                "--export needs the finished report: drop --no-wait",
            ));
        }
    }
    let runs = run::run(inv, |t| plan::health(inv.settings, t)).await?;
    let Some(runs) = runs else {
        return Ok(Exit::Success);
    };
    if let Some(path) = &a.export {
        let Some(first) = runs.iter().find(|r| r.error.is_none()) else {
            return Ok(render::finished(&runs, &inv.out));
        };
        let report: HealthReport =
            match serde_json::from_value::<AnalyticsReport>(first.report.clone())? {
                AnalyticsReport::Health(h) => h,
                AnalyticsReport::Trends(_) => {
                    return Err(CliError::fail(
                        Exit::OperationFailed,
                        "the worker returned trends instead of a health report",
                    ));
                }
            };
        // The HTML report charts the last 30 days; trends are a cheap read done here. This
        // host may not reach the database the worker read (a SQLite file on the worker's
        // host): the report is then exported without them, and the log says why.
        let target = inv.settings.target(Some(&first.target))?;
        let max_age = inv.settings.max_age_for(target).as_secs();
        let trends = match Db::connect(&target.url, &ConnectOptions::default()).await {
            Ok(db) => {
                let trends = analytics::trends(&db, 30, max_age, None).await;
                db.close().await;
                trends.map_err(anyhow::Error::from)
            }
            Err(e) => Err(e.into()),
        };
        let trends = trends
            .inspect_err(
                |e| tracing::warn!(error = %e, "trends not read: the export goes without them"),
            )
            .ok();
        analytics::export(&report, trends.as_ref(), path)?;
        if inv.out.json {
            inv.out
                .print_json(&serde_json::json!({"exported": path.display().to_string()}));
        } else {
            println!("Health report exported to {}", path.display());
        }
        return Ok(
            if report.health_status.overall_health == analytics::Health::Critical {
                Exit::HealthCritical
            } else {
                Exit::Success
            },
        );
    }
    Ok(render::finished(&runs, &inv.out))
}

fn check_export_path(path: &std::path::Path) -> anyhow::Result<()> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("json" | "html" | "htm") => Ok(()),
        _ => Err(CliError::usage(format!(
            "--export {}: the file must end in .json or .html",
            path.display()
        ))),
    }
}

/// `sessionfleet db`.
pub async fn db(inv: &Invocation<'_>, a: &DbArgs) -> anyhow::Result<Exit> {
    let action = if a.analyze {
        MaintenanceAction::Analyze
    } else if a.create_indexes {
        MaintenanceAction::CreateIndexes
    } else if a.optimize {
        MaintenanceAction::Optimize { vacuum: a.vacuum }
    } else if a.integrity_check {
        MaintenanceAction::IntegrityCheck { full: a.full }
    } else if a.stats {
        MaintenanceAction::Stats
    } else {
        return help("db");
    };
    let job = plan::maintenance(action, a.dry_run)?;
    let runs = run::run(inv, |_| Ok(job.clone())).await?;
    finish(inv, runs).await
}

/// A sub-flag given with a mode it does not belong to. Clap's `requires` refuses one given
/// with no mode, but lets it through beside another mode (the modes exclude each other), and
/// the mode then ran without it: `--full-maintenance --force` was a plain full maintenance.
fn misplaced_flag(a: &MaintenanceArgs) -> Option<String> {
    /// A mode's flag, whether it was given, and its sub-flags, each with whether it was given.
    type Mode<'a> = (&'a str, bool, &'a [(&'a str, bool)]);
    let modes: [Mode; 3] = [
        (
            "--cleanup",
            a.cleanup,
            &[
                ("--once", a.once),
                ("--daemon", a.daemon),
                ("--force", a.force),
                ("--max-age", a.max_age.is_some()),
            ],
        ),
        (
            "--analytics",
            a.analytics,
            &[
                ("--health", a.health),
                ("--trends", a.trends.is_some()),
                ("--export", a.export.is_some()),
            ],
        ),
        (
            "--database",
            a.database,
            &[
                ("--analyze", a.analyze),
                ("--create-indexes", a.create_indexes),
                ("--optimize", a.optimize),
                ("--vacuum", a.vacuum),
                ("--integrity-check", a.integrity_check),
            ],
        ),
    ];
    for (mode, chosen, flags) in modes {
        if let Some((flag, _)) = flags.iter().find(|(_, given)| *given && !chosen) {
            return Some(format!("{flag} applies only with {mode}"));
        }
    }
    (a.dry_run && (a.status || a.analytics)).then(|| {
        "--dry-run applies only with --full-maintenance, --cleanup or --database".to_string()
    })
}

/// `sessionfleet maintenance` (the unified CLI).
pub async fn maintenance(inv: &Invocation<'_>, a: &MaintenanceArgs) -> anyhow::Result<Exit> {
    if let Some(message) = misplaced_flag(a) {
        return Err(CliError::usage(message));
    }
    if a.full_maintenance {
        let runs = run::run(inv, |t| plan::full(inv.settings, t, a.dry_run)).await?;
        return finish(inv, runs).await;
    }
    if a.status {
        return crate::commands::status::run(inv).await;
    }
    if a.cleanup {
        let c = CleanupArgs {
            once: a.once,
            daemon: a.daemon,
            force: a.force,
            max_age: a.max_age,
            // Alone it shows statistics; with --dry-run it counts what a cleanup would
            // delete (it used to show statistics and drop the --dry-run unsaid).
            stats: !(a.once || a.daemon || a.force || a.dry_run),
            dry_run: a.dry_run,
            batch_size: None,
            budget: None,
        };
        return cleanup(inv, &c).await;
    }
    if a.analytics {
        let an = AnalyticsArgs {
            health_report: a.health,
            trends: if a.health {
                None
            } else {
                Some(a.trends.unwrap_or(7))
            },
            export: a.export.clone(),
        };
        return analytics(inv, &an).await;
    }
    if a.database {
        let d = DbArgs {
            analyze: a.analyze,
            create_indexes: a.create_indexes,
            optimize: a.optimize,
            vacuum: a.vacuum,
            integrity_check: a.integrity_check,
            full: false,
            stats: !(a.analyze || a.create_indexes || a.optimize || a.integrity_check),
            dry_run: a.dry_run,
        };
        return db(inv, &d).await;
    }
    help("maintenance")
}
