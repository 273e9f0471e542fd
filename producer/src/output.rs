//! Where output goes: reports on stdout (text, or one JSON document with `--json`), progress
//! and logs on stderr.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// Whether stderr carries JSON logs, for the last error `main` prints after the command.
static LOG_JSON: AtomicBool = AtomicBool::new(false);

/// Output settings of one invocation.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON document on stdout.
    pub json: bool,
    /// Logs are JSON (`SESSIONFLEET_LOG_FORMAT=json`): notes for people go out as log events
    /// too, so every line on stderr stays one JSON object.
    pub log_json: bool,
}

impl Output {
    /// The output of an invocation: `json` is `--json`, `log_json` the JSON log format.
    pub fn new(json: bool, log_json: bool) -> Output {
        LOG_JSON.store(log_json, Ordering::Relaxed);
        Output { json, log_json }
    }

    /// A warning people and scripts must see whatever the output mode (stderr, one line).
    pub fn warn(&self, msg: impl AsRef<str>) {
        if self.log_json {
            json_line("WARN", msg.as_ref());
        } else {
            eprintln!("warning: {}", msg.as_ref());
        }
    }

    /// An error line (stderr, whatever the output mode).
    pub fn error(&self, msg: impl AsRef<str>) {
        if self.log_json {
            json_line("ERROR", msg.as_ref());
        } else {
            eprintln!("error: {}", msg.as_ref());
        }
    }

    /// Prints `value` as the invocation's JSON document.
    pub fn print_json<T: Serialize + ?Sized>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode the report as JSON: {e}"),
        }
    }

    /// A progress note for people, on stderr (silent with `--json`; a log event when logs
    /// are JSON).
    pub fn info(&self, msg: impl AsRef<str>) {
        if self.json {
            return;
        }
        if self.log_json {
            json_line("INFO", msg.as_ref());
        } else {
            eprintln!("{}", msg.as_ref());
        }
    }
}

/// The error that ends the command, as [`Output::error`] prints it (plain before the
/// configuration, and with it the log format, is known).
pub fn fatal(msg: &str) {
    Output::new(false, LOG_JSON.load(Ordering::Relaxed)).error(msg);
}

/// One line in the JSON log format (the fields tracing's JSON lines have), written directly
/// rather than as a tracing event: a `RUST_LOG` narrowed to other targets (`sqlx=debug`)
/// must not silence a warning or the error that ends the command.
fn json_line(level: &str, message: &str) {
    let line = serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": level,
        "message": message,
        "target": "sessionfleet",
    });
    eprintln!("{line}");
}
