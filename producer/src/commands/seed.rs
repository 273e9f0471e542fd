//! `sessionfleet seed-demo`.

use anyhow::Context;
use sessionfleet::config::Settings;
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{ConnectOptions, Db, SchemaVersion};

use crate::cli::SeedArgs;
use crate::exit::CliError;
use crate::output::Output;

/// Seeds the selected target with demo data.
pub async fn run(
    settings: &Settings,
    target: Option<&str>,
    args: &SeedArgs,
    out: &Output,
) -> anyhow::Result<()> {
    let schema: SchemaVersion = args
        .schema
        .parse()
        .map_err(|e: String| CliError::usage(format!("--schema: {e}")))?;
    if args.sessions == 0 {
        return Err(CliError::usage("--sessions must be at least 1"));
    }
    let now = match &args.now {
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map_err(|e| {
                CliError::usage(format!(
                    "--now {t:?}: {e} (expected RFC 3339, e.g. 2026-11-01T12:00:00Z)"
                ))
            })?
            .naive_utc(),
        None => chrono::Utc::now().naive_utc(),
    };
    let target = settings.target(target)?;
    let db = Db::connect(&target.url, &ConnectOptions::creating_sqlite_file()).await?;
    let params = SeedParams {
        sessions: args.sessions,
        users: args
            .users
            .unwrap_or_else(|| SeedParams::default_users(args.sessions)),
        seed: args.seed,
        schema,
        now,
        reset: args.reset,
    };
    out.info(format!(
        "seeding {} sessions into {} ({} schema)",
        params.sessions,
        db.redacted_url(),
        schema
    ));
    let report = seed_demo(&db, &params)
        .await
        .with_context(|| format!("seeding {}", db.redacted_url()))?;
    db.close().await;
    if out.json {
        out.print_json(&report);
    } else {
        println!("Demo data written to {}", target.redacted_url());
        println!("{}", "=".repeat(40));
        println!(
            "users: {} ({} deactivated)",
            report.users, report.deactivated_users
        );
        println!("platform connections: {}", report.platforms);
        println!("sessions: {}", report.sessions);
        println!("  expired: {}", report.expired);
        println!("  of deactivated users: {}", report.deactivated_user);
        println!("  of deleted users: {}", report.missing_user);
        println!("  with a missing platform: {}", report.missing_platform);
        println!("duration_seconds: {:.2}", report.duration_seconds);
    }
    Ok(())
}
