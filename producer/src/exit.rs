//! Exit codes, documented in `--help` and the README, and the mapping from errors to them.

use std::process::ExitCode;

/// Why the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done.
    Success = 0,
    /// The operation ran and failed.
    OperationFailed = 1,
    /// Bad flags or configuration.
    Usage = 2,
    /// The health report is critical.
    HealthCritical = 3,
    /// A wait ran out (`--timeout`).
    Timeout = 4,
    /// Redis is unreachable, or no worker consumes the queue.
    FleetUnreachable = 5,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// An error that knows its exit code. Anything else is an operation failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// One line for people.
    pub message: String,
    /// The exit code.
    pub exit: Exit,
}

impl CliError {
    /// A usage or configuration error.
    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        CliError {
            message: message.into(),
            exit: Exit::Usage,
        }
        .into()
    }

    /// An error with an explicit exit code.
    pub fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        CliError {
            message: message.into(),
            exit,
        }
        .into()
    }
}

/// The exit code for an error that reached `main`.
pub fn classify(err: &anyhow::Error) -> Exit {
    if let Some(e) = err.downcast_ref::<CliError>() {
        return e.exit;
    }
    if err
        .downcast_ref::<sessionfleet::config::ConfigError>()
        .is_some()
    {
        return Exit::Usage;
    }
    Exit::OperationFailed
}

/// One line: the error and its causes, joined.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
