//! `sessionfleet`: the producer CLI. Thin: it parses arguments, resolves configuration and
//! calls the library; errors become one line and a documented exit code here, nowhere else.

mod cli;
mod commands;
mod exit;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use sessionfleet::config::{Overrides, Settings};

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
    match runtime.block_on(run(cli)) {
        Ok(code) => code.into(),
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            classify(&err).into()
        }
    }
}

/// Maps global flags onto the configuration layer they override.
fn overrides(g: &cli::GlobalArgs) -> Overrides {
    let mut o = Overrides::default();
    o.set("DATABASE_URL", g.database_url.clone());
    o.set("REDIS_URL", g.redis_url.clone());
    o.set("SESSIONFLEET_NAMESPACE", g.namespace.clone());
    o
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let g = cli.global.clone();
    init_logs(g.verbose);
    let out = Output { json: g.json };
    let settings = Settings::load(&overrides(&g), g.config.as_deref())?;
    match cli.command {
        Command::Config(c) => match c.action {
            ConfigAction::Show => commands::config::show(&settings, &out)?,
            ConfigAction::Keys => commands::config::keys(&out)?,
        },
        Command::SeedDemo(args) => {
            commands::seed::run(&settings, g.target.as_deref(), &args, &out).await?
        }
        other => {
            let name = format!("{other:?}");
            let _ = Cli::command();
            return Err(exit::CliError::new(
                Exit::OperationFailed,
                format!(
                    "'{}' is not available in this build yet",
                    name.split('(').next().unwrap_or(&name).to_lowercase()
                ),
            ));
        }
    }
    Ok(Exit::Success)
}

fn init_logs(verbose: bool) {
    let filter = if verbose { "debug,sqlx=info" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SESSIONFLEET_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
