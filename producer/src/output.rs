//! Where output goes: reports on stdout (text, or one JSON document with `--json`), progress
//! and logs on stderr.

use serde::Serialize;

/// Output settings of one invocation.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON document on stdout.
    pub json: bool,
}

impl Output {
    /// Prints `value` as the invocation's JSON document.
    pub fn print_json<T: Serialize + ?Sized>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode the report as JSON: {e}"),
        }
    }

    /// A progress note for people, on stderr (silent with `--json`).
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.json {
            eprintln!("{}", msg.as_ref());
        }
    }
}
