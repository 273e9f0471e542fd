//! `sessionfleet`: the producer CLI. Thin: it parses arguments, resolves configuration and
//! calls the library; errors become one line and a documented exit code here, nowhere else.

mod cli;
mod commands;
mod exit;
mod output;
mod plan;
mod progress;
mod render;
mod run;

use std::process::ExitCode;

use clap::Parser;
use sessionfleet::config::{LogFormat, Overrides, Settings};

use cli::{Cli, Command, ConfigAction};
use exit::{Exit, classify, one_line};
use output::Output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::OperationFailed.into();
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code.into(),
        Err(err) => {
            output::fatal(&one_line(&err));
            classify(&err).into()
        }
    };
    // Not a plain drop, which waits for every task: a background task that never yields
    // (sqlx's pool reaper once spun so, sqlx#3645) would hold the exit forever.
    runtime.shutdown_timeout(RUNTIME_EXIT_GRACE);
    code
}

/// How long the runtime's leftover background tasks get at exit; the command's work is done.
const RUNTIME_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Maps global flags onto the configuration layer they override.
fn overrides(g: &cli::GlobalArgs) -> Overrides {
    let mut o = Overrides::default();
    o.set("DATABASE_URL", g.database_url.clone());
    o.set("REDIS_URL", g.redis_url.clone());
    o.set("SESSIONFLEET_NAMESPACE", g.namespace.clone());
    o
}

/// `--local`, `--no-wait` and `--all-targets` shape how a job runs; a command that runs no
/// job refuses them rather than ignoring them (`seed-demo --all-targets` seeded one target).
fn refuse_job_flags(command: &Command, g: &cli::GlobalArgs) -> anyhow::Result<()> {
    let name = match command {
        Command::Config(_) => "config",
        Command::SeedDemo(_) => "seed-demo",
        Command::Demo(_) => "demo",
        Command::Lease => "lease",
        Command::Jobs(_) => "jobs",
        _ => return Ok(()),
    };
    // `lease` shows every target anyway: --all-targets asks for what it does.
    let all_targets_refused = g.all_targets && !matches!(command, Command::Lease);
    let given: Vec<&str> = [
        (g.local, "--local"),
        (g.no_wait, "--no-wait"),
        (all_targets_refused, "--all-targets"),
    ]
    .into_iter()
    .filter_map(|(set, flag)| set.then_some(flag))
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(exit::CliError::usage(format!(
        "{} does not apply to `{name}`, which runs no job",
        given.join(" and ")
    )))
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let g = cli.global.clone();
    // Configuration errors are printed by `main`, one line, without logs.
    let settings = Settings::load(&overrides(&g), g.config.as_deref())?;
    let out = Output::new(g.json, settings.log_format.value == LogFormat::Json);
    sessionfleet::telemetry::init(settings.log_format.value, g.verbose);
    refuse_job_flags(&cli.command, &g)?;
    match cli.command {
        Command::Config(c) => match c.action {
            ConfigAction::Show => commands::config::show(&settings, &out)?,
            ConfigAction::Keys => commands::config::keys(&out)?,
        },
        Command::SeedDemo(args) => {
            commands::seed::run(&settings, g.target.as_deref(), &args, &out).await?
        }
        Command::Demo(args) => return commands::demo::run(&settings, &g, &args, out).await,
        command => {
            let inv = run::Invocation {
                settings: &settings,
                global: &g,
                out,
            };
            return match command {
                Command::Cleanup(a) => commands::ops::cleanup(&inv, &a).await,
                Command::Analytics(a) => commands::ops::analytics(&inv, &a).await,
                Command::Db(a) => commands::ops::db(&inv, &a).await,
                Command::Maintenance(a) => commands::ops::maintenance(&inv, &a).await,
                Command::Schedule(a) => {
                    commands::schedule::run(
                        &inv,
                        a.cleanup_only
                            .then_some(&crate::plan::CleanupAsk::default()),
                    )
                    .await
                }
                Command::Jobs(a) => commands::jobs::run(&inv, &a.action).await,
                Command::Lease => commands::jobs::lease(&inv).await,
                Command::Config(_) | Command::SeedDemo(_) | Command::Demo(_) => Ok(Exit::Success),
            };
        }
    }
    Ok(Exit::Success)
}
