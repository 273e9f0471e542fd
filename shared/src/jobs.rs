//! Jobs: the versioned envelope every queued job travels in, the job kinds, and the queue each
//! kind belongs to.
//!
//! Architecture invariant: this module knows no SQL and no Redis. An operation's own
//! parameters stay opaque JSON here (`params`); the runner decodes them for the operation.
//! Changing the wire form means a new [`ENVELOPE_VERSION`] and a decoder that still reads
//! the old one, because jobs outlive deploys.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version written into every new envelope.
pub const ENVELOPE_VERSION: u32 = 1;

/// Largest payload the worker accepts (bytes); anything larger is dead-lettered undecoded.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Purge expired and orphaned sessions.
    Cleanup,
    /// Health report, trends, security analysis.
    Analytics,
    /// One database maintenance step (analyze, index, optimize, integrity check…).
    Maintenance,
    /// The whole maintenance sequence.
    FullMaintenance,
    /// Does nothing; used by health checks, tests and benchmarks.
    Noop,
    /// Sleeps cooperatively (`params: {"millis": n}`); used by tests and benchmarks.
    Sleep,
}

impl JobKind {
    /// Every kind.
    pub const ALL: [JobKind; 6] = [
        JobKind::Cleanup,
        JobKind::Analytics,
        JobKind::Maintenance,
        JobKind::FullMaintenance,
        JobKind::Noop,
        JobKind::Sleep,
    ];

    /// The queue this kind is carried on.
    pub fn queue(self) -> QueueClass {
        match self {
            JobKind::Cleanup => QueueClass::Cleanup,
            JobKind::Analytics => QueueClass::Analytics,
            JobKind::Maintenance | JobKind::FullMaintenance => QueueClass::Maintenance,
            JobKind::Noop | JobKind::Sleep => QueueClass::Diag,
        }
    }

    /// The snake_case name (as in JSON and metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Cleanup => "cleanup",
            JobKind::Analytics => "analytics",
            JobKind::Maintenance => "maintenance",
            JobKind::FullMaintenance => "full_maintenance",
            JobKind::Noop => "noop",
            JobKind::Sleep => "sleep",
        }
    }

    /// True for the diagnostic kinds, which never touch a database and are kept out of the
    /// per-target run history so health checks do not pollute trends.
    pub fn is_diagnostic(self) -> bool {
        matches!(self, JobKind::Noop | JobKind::Sleep)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A queue: one per job class, so a backlog of one class never delays another and each can
/// get its own concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueClass {
    /// Cleanup jobs.
    Cleanup,
    /// Analytics jobs.
    Analytics,
    /// Maintenance and full maintenance.
    Maintenance,
    /// Noop and Sleep.
    Diag,
}

impl QueueClass {
    /// Every queue.
    pub const ALL: [QueueClass; 4] = [
        QueueClass::Cleanup,
        QueueClass::Analytics,
        QueueClass::Maintenance,
        QueueClass::Diag,
    ];

    /// The queue's explicit name (part of its Redis keys; never derived from a Rust type).
    pub fn name(self) -> &'static str {
        match self {
            QueueClass::Cleanup => "cleanup",
            QueueClass::Analytics => "analytics",
            QueueClass::Maintenance => "maintenance",
            QueueClass::Diag => "diag",
        }
    }

    /// Parses a queue name as written in `--queues`.
    pub fn parse(name: &str) -> Option<QueueClass> {
        QueueClass::ALL
            .into_iter()
            .find(|q| q.name() == name.trim())
    }

    /// Parses a comma-separated list; an unknown name is refused with a one-line message.
    pub fn parse_list(list: &str) -> Result<Vec<QueueClass>, String> {
        let mut out = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let q = QueueClass::parse(part).ok_or_else(|| {
                format!("unknown queue '{part}' (known: cleanup, analytics, maintenance, diag)")
            })?;
            if !out.contains(&q) {
                out.push(q);
            }
        }
        if out.is_empty() {
            return Err("no queue given (known: cleanup, analytics, maintenance, diag)".into());
        }
        Ok(out)
    }
}

impl std::fmt::Display for QueueClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One job on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEnvelope {
    /// Envelope version ([`ENVELOPE_VERSION`]).
    pub v: u32,
    /// This job (one part of a run; a retry keeps it).
    pub job_id: Uuid,
    /// The run this job belongs to; continuations share it.
    pub run_id: Uuid,
    /// Continuation index within the run, 0 first.
    pub part: u32,
    /// What to do.
    pub kind: JobKind,
    /// The configured target (database) name.
    pub target: String,
    /// The operation's parameters, decoded by the runner.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Jobs with the same key enqueued while the marker lives are dropped as duplicates.
    #[serde(default)]
    pub dedupe_key: Option<String>,
    /// Who enqueued it (`cli@host`, `scheduler@host`, a worker name for continuations).
    pub enqueued_by: String,
    /// When it was first enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// Delivery attempt under our retry policy, 1 first (absent in older envelopes = 1).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// When this delivery's run of deferrals (a busy lease, a database found down) began;
    /// the next look waits longer the longer it has been deferred. Cleared by a retry; a
    /// continuation is a new envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_since: Option<DateTime<Utc>>,
}

fn first_attempt() -> u32 {
    1
}

/// Why a payload is not a job we can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not JSON, or not an envelope.
    #[error("payload is not a job envelope: {0}")]
    Malformed(String),
    /// Written by a newer (or unknown) producer.
    #[error("unsupported envelope version {0} (this build reads version {ENVELOPE_VERSION})")]
    Version(u32),
    /// Decoded, but a field has an impossible value.
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

impl JobEnvelope {
    /// A new first-part job with fresh job and run ids.
    pub fn new(
        kind: JobKind,
        target: impl Into<String>,
        params: serde_json::Value,
        enqueued_by: impl Into<String>,
    ) -> JobEnvelope {
        JobEnvelope {
            v: ENVELOPE_VERSION,
            job_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            part: 0,
            kind,
            target: target.into(),
            params,
            dedupe_key: None,
            enqueued_by: enqueued_by.into(),
            enqueued_at: Utc::now(),
            attempt: 1,
            deferred_since: None,
        }
    }

    /// A diagnostic no-op job.
    pub fn noop(enqueued_by: impl Into<String>) -> JobEnvelope {
        JobEnvelope::new(JobKind::Noop, "diag", serde_json::json!({}), enqueued_by)
    }

    /// A diagnostic sleep of `millis`, optionally with a time budget after which it returns a
    /// continuation for the rest.
    pub fn sleep(
        millis: u64,
        budget_ms: Option<u64>,
        enqueued_by: impl Into<String>,
    ) -> JobEnvelope {
        let params = serde_json::to_value(SleepParams { millis, budget_ms }).unwrap_or_default();
        JobEnvelope::new(JobKind::Sleep, "diag", params, enqueued_by)
    }

    /// Sets the dedupe key.
    pub fn with_dedupe_key(mut self, key: impl Into<String>) -> JobEnvelope {
        self.dedupe_key = Some(key.into());
        self
    }

    /// The queue it goes to.
    pub fn queue(&self) -> QueueClass {
        self.kind.queue()
    }

    /// The next part of the same run with new parameters: same run id, `part + 1`, a job id
    /// derived from (run id, part) so a duplicate delivery of this part produces the same
    /// continuation, and a dedupe key that drops such a duplicate at enqueue time.
    pub fn continuation(
        &self,
        params: serde_json::Value,
        enqueued_by: impl Into<String>,
    ) -> JobEnvelope {
        let part = self.part + 1;
        let name = format!("{}:{part}", self.run_id);
        JobEnvelope {
            v: ENVELOPE_VERSION,
            job_id: Uuid::new_v5(&self.run_id, name.as_bytes()),
            run_id: self.run_id,
            part,
            kind: self.kind,
            target: self.target.clone(),
            params,
            dedupe_key: Some(format!("cont:{name}")),
            enqueued_by: enqueued_by.into(),
            enqueued_at: Utc::now(),
            attempt: 1,
            deferred_since: None,
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of plain fields and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload, refusing anything that is not a version-1 envelope.
    pub fn decode(bytes: &[u8]) -> Result<JobEnvelope, DecodeError> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        // Read the version first so a newer producer gets a precise reason.
        #[derive(Deserialize)]
        struct Probe {
            v: Option<u32>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match probe.v {
            Some(ENVELOPE_VERSION) => {}
            Some(other) => return Err(DecodeError::Version(other)),
            None => return Err(DecodeError::Malformed("missing field `v`".into())),
        }
        let env: JobEnvelope =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        env.validate()?;
        Ok(env)
    }

    /// Refuses impossible values.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.target.is_empty() || self.target.len() > 128 {
            return Err(DecodeError::Invalid(
                "target must be 1-128 characters".into(),
            ));
        }
        if self.attempt == 0 {
            return Err(DecodeError::Invalid("attempt starts at 1".into()));
        }
        if self.enqueued_by.len() > 256 {
            return Err(DecodeError::Invalid(
                "enqueued_by longer than 256 characters".into(),
            ));
        }
        Ok(())
    }
}

/// Parameters of [`JobKind::Sleep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SleepParams {
    /// How long to sleep in total, milliseconds.
    pub millis: u64,
    /// Time budget of one part, milliseconds; when spent the job returns a continuation for
    /// the remaining time. `None` = no budget (the worker's job budget still applies).
    #[serde(default)]
    pub budget_ms: Option<u64>,
}

/// Longest sleep a diagnostic job may ask for (one hour).
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);

impl SleepParams {
    /// Refuses impossible values.
    pub fn validate(&self) -> Result<(), String> {
        if self.millis > MAX_SLEEP.as_millis() as u64 {
            return Err(format!(
                "sleep of {} ms exceeds the {} ms limit",
                self.millis,
                MAX_SLEEP.as_millis()
            ));
        }
        if self.budget_ms == Some(0) {
            return Err("budget_ms must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let env = JobEnvelope::new(
            JobKind::FullMaintenance,
            "default",
            serde_json::json!({"dry_run": true}),
            "test",
        );
        let back = JobEnvelope::decode(&env.to_bytes()).expect("decode");
        assert_eq!(back, env);
        assert!(
            String::from_utf8(env.to_bytes())
                .unwrap()
                .contains("\"kind\":\"full_maintenance\"")
        );
    }

    #[test]
    fn garbage_and_future_versions_are_refused_with_reasons() {
        assert!(matches!(
            JobEnvelope::decode(b"\xff\x00not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            JobEnvelope::decode(br#"{"v":2}"#),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            JobEnvelope::decode(br#"{"hello":1}"#),
            Err(DecodeError::Malformed(_))
        ));
        let mut v = serde_json::to_value(JobEnvelope::noop("t")).unwrap();
        v["kind"] = "drop_tables".into();
        assert!(matches!(
            JobEnvelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn continuation_is_deterministic_per_run_and_part() {
        let env = JobEnvelope::sleep(10, Some(5), "t");
        let a = env.continuation(serde_json::json!({}), "w");
        let b = env.continuation(serde_json::json!({}), "w");
        assert_eq!(a.job_id, b.job_id);
        assert_eq!(a.run_id, env.run_id);
        assert_eq!(a.part, 1);
        assert_ne!(a.job_id, env.job_id);
    }

    #[test]
    fn kinds_map_to_queues() {
        assert_eq!(JobKind::FullMaintenance.queue(), QueueClass::Maintenance);
        assert_eq!(JobKind::Sleep.queue(), QueueClass::Diag);
        assert_eq!(
            QueueClass::parse_list("cleanup, diag").unwrap(),
            vec![QueueClass::Cleanup, QueueClass::Diag]
        );
        assert!(QueueClass::parse_list("cleanup,nope").is_err());
    }
}
