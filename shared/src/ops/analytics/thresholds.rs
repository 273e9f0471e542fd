//! The five alert thresholds of the spec, and the JSON file (`SESSION_ALERT_THRESHOLDS_FILE`)
//! that overrides them.
//!
//! The original hard-coded these numbers and never read the file the documentation names
//! (reference §3.1); here the file is real: a JSON object whose keys are a subset of the five
//! names. Keys it gives replace the default, keys it omits keep it. Anything else — an unknown
//! key (usually a typo that would silently keep a default), a value that is not a number, a
//! negative number — is refused with one line naming the key and the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Alert thresholds. A figure strictly above its threshold raises an alert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Sessions created per minute (measured over the last 5 minutes). Default
    /// [`Thresholds::DEFAULT_SESSION_CREATION_RATE`].
    #[serde(default = "d_creation")]
    pub session_creation_rate: f64,
    /// Failed fleet jobs per minute (needs [`FleetFacts`](super::FleetFacts)). Default
    /// [`Thresholds::DEFAULT_SESSION_FAILURE_RATE`].
    #[serde(default = "d_failure")]
    pub session_failure_rate: f64,
    /// Mean session duration in seconds (activity − creation). Default
    /// [`Thresholds::DEFAULT_AVG_SESSION_DURATION`].
    #[serde(default = "d_duration")]
    pub avg_session_duration: f64,
    /// Active sessions in total. Default [`Thresholds::DEFAULT_CONCURRENT_SESSIONS`].
    #[serde(default = "d_concurrent")]
    pub concurrent_sessions: f64,
    /// Suspicious (rapidly updated) sessions per minute over the last 5 minutes. Default
    /// [`Thresholds::DEFAULT_SUSPICIOUS_ACTIVITY_RATE`].
    #[serde(default = "d_suspicious")]
    pub suspicious_activity_rate: f64,
}

fn d_creation() -> f64 {
    Thresholds::DEFAULT_SESSION_CREATION_RATE
}
fn d_failure() -> f64 {
    Thresholds::DEFAULT_SESSION_FAILURE_RATE
}
fn d_duration() -> f64 {
    Thresholds::DEFAULT_AVG_SESSION_DURATION
}
fn d_concurrent() -> f64 {
    Thresholds::DEFAULT_CONCURRENT_SESSIONS
}
fn d_suspicious() -> f64 {
    Thresholds::DEFAULT_SUSPICIOUS_ACTIVITY_RATE
}

impl Thresholds {
    /// Spec default: 100 sessions created per minute.
    pub const DEFAULT_SESSION_CREATION_RATE: f64 = 100.0;
    /// Spec default: 10 failures per minute.
    pub const DEFAULT_SESSION_FAILURE_RATE: f64 = 10.0;
    /// Spec default: 3600 seconds.
    pub const DEFAULT_AVG_SESSION_DURATION: f64 = 3600.0;
    /// Spec default: 1000 concurrent sessions.
    pub const DEFAULT_CONCURRENT_SESSIONS: f64 = 1000.0;
    /// Spec default: 5 suspicious sessions per minute.
    pub const DEFAULT_SUSPICIOUS_ACTIVITY_RATE: f64 = 5.0;
    /// The key names the file may use.
    pub const KEYS: [&'static str; 5] = [
        "session_creation_rate",
        "session_failure_rate",
        "avg_session_duration",
        "concurrent_sessions",
        "suspicious_activity_rate",
    ];

    /// Reads a thresholds file: a JSON object with any of the five keys, each a number ≥ 0.
    pub fn load(path: &Path) -> Result<Thresholds, ThresholdsError> {
        let text = std::fs::read_to_string(path).map_err(|e| ThresholdsError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Thresholds::parse(&text, path)
    }

    /// Parses the file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Thresholds, ThresholdsError> {
        let file = || path.to_path_buf();
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ThresholdsError::Syntax {
                path: file(),
                reason: e.to_string(),
            })?;
        let serde_json::Value::Object(map) = value else {
            return Err(ThresholdsError::NotAnObject { path: file() });
        };
        let mut t = Thresholds::default();
        for (key, v) in &map {
            let slot = match key.as_str() {
                "session_creation_rate" => &mut t.session_creation_rate,
                "session_failure_rate" => &mut t.session_failure_rate,
                "avg_session_duration" => &mut t.avg_session_duration,
                "concurrent_sessions" => &mut t.concurrent_sessions,
                "suspicious_activity_rate" => &mut t.suspicious_activity_rate,
                _ => {
                    return Err(ThresholdsError::UnknownKey {
                        key: key.clone(),
                        path: file(),
                    });
                }
            };
            let Some(n) = v.as_f64() else {
                return Err(ThresholdsError::WrongType {
                    key: key.clone(),
                    path: file(),
                    found: v.to_string(),
                });
            };
            if n < 0.0 || !n.is_finite() {
                return Err(ThresholdsError::Negative {
                    key: key.clone(),
                    path: file(),
                    value: n,
                });
            }
            *slot = n;
        }
        Ok(t)
    }

    /// The file named by `path` when given, else the defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Thresholds, ThresholdsError> {
        path.map_or(Ok(Thresholds::default()), Thresholds::load)
    }

    /// Refuses negative or non-finite values (for thresholds that arrived through serde).
    pub fn validate(&self) -> Result<(), String> {
        let values = [
            self.session_creation_rate,
            self.session_failure_rate,
            self.avg_session_duration,
            self.concurrent_sessions,
            self.suspicious_activity_rate,
        ];
        for (key, v) in Thresholds::KEYS.iter().zip(values) {
            if v < 0.0 || !v.is_finite() {
                return Err(format!(
                    "alert threshold {key} must be a number >= 0, got {v}"
                ));
            }
        }
        Ok(())
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            session_creation_rate: Thresholds::DEFAULT_SESSION_CREATION_RATE,
            session_failure_rate: Thresholds::DEFAULT_SESSION_FAILURE_RATE,
            avg_session_duration: Thresholds::DEFAULT_AVG_SESSION_DURATION,
            concurrent_sessions: Thresholds::DEFAULT_CONCURRENT_SESSIONS,
            suspicious_activity_rate: Thresholds::DEFAULT_SUSPICIOUS_ACTIVITY_RATE,
        }
    }
}

/// Why a thresholds file was refused. Each message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ThresholdsError {
    /// The file could not be read.
    #[error("cannot read alert thresholds file {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// Not valid JSON.
    #[error("alert thresholds file {} is not valid JSON: {reason}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Valid JSON, but not an object.
    #[error("alert thresholds file {} must hold a JSON object such as {{\"concurrent_sessions\": 500}}", path.display())]
    NotAnObject {
        /// The file.
        path: PathBuf,
    },
    /// A key that is not one of the five.
    #[error("unknown key '{key}' in alert thresholds file {} (expected one of: session_creation_rate, session_failure_rate, avg_session_duration, concurrent_sessions, suspicious_activity_rate)", path.display())]
    UnknownKey {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A value that is not a number.
    #[error("key '{key}' in alert thresholds file {} must be a number, got {found}", path.display())]
    WrongType {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
        /// The JSON found instead.
        found: String,
    },
    /// A negative number.
    #[error("key '{key}' in alert thresholds file {} must be >= 0, got {value}", path.display())]
    Negative {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
        /// The value found.
        value: f64,
    },
}
