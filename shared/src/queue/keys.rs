//! Redis key names: every key the fleet uses, in one place.
//!
//! All keys share the hash tag `{core:apalis:queues:list}` (apalis notes §2.9): apalis-redis
//! scripts touch its global registry key `core:apalis:queues:list` together with the queue's
//! own keys, so on Redis Cluster the queue must sit in that slot or registration fails. Our own
//! keys (results, dead letters, the worker registry) use the same tag so scripts that move a
//! job between our structures and apalis' stay single-slot. Everything below the tag is
//! prefixed by the namespace (`SESSIONFLEET_NAMESPACE`), so fleets and tests can share a Redis.

use crate::jobs::QueueClass;

/// The hash tag every key starts with.
pub const SLOT_TAG: &str = "{core:apalis:queues:list}";

/// Glob patterns that together match every key of namespace `ns` and nothing else: the
/// queues' and our own records (under [`SLOT_TAG`]), the leases' (`<ns>:lease:`,
/// `:lease-holder:`, `:lease-token:`, see `lease`) and the scheduler's last ticks
/// (`{sessionfleet:<ns>}:…`, see `schedule`). apalis' registry key itself, shared by every
/// namespace, holds members of `ns` that these do not match.
pub fn namespace_patterns(ns: &str) -> [String; 3] {
    let ns = crate::scan::glob_escape(ns);
    [
        format!("{SLOT_TAG}:{ns}:*"),
        format!("{ns}:lease*"),
        format!("{{sessionfleet:{ns}}}:*"),
    ]
}

/// apalis' registry of queues, shared by every namespace (the hash tag's own key).
pub fn apalis_registry() -> &'static str {
    SLOT_TAG.trim_matches(['{', '}'])
}

/// Key names for one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// Keys of namespace `ns`.
    pub fn new(ns: &str) -> Keys {
        Keys { ns: ns.to_string() }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The apalis queue name of `q`; apalis derives `<name>:active`, `:data`, … from it.
    pub fn apalis_queue(&self, q: QueueClass) -> String {
        format!("{SLOT_TAG}:{}:{}", self.ns, q.name())
    }

    /// apalis' ready list.
    pub fn active(&self, q: QueueClass) -> String {
        format!("{}:active", self.apalis_queue(q))
    }
    /// apalis' delayed set (ZSET id → unix seconds).
    pub fn scheduled(&self, q: QueueClass) -> String {
        format!("{}:scheduled", self.apalis_queue(q))
    }
    /// apalis' payload hash (id → bytes).
    pub fn data(&self, q: QueueClass) -> String {
        format!("{}:data", self.apalis_queue(q))
    }
    /// Prefix of apalis' per-task meta hashes (`<prefix>:<id>`).
    pub fn meta_prefix(&self, q: QueueClass) -> String {
        format!("{}:meta", self.apalis_queue(q))
    }
    /// Prefix of apalis' idempotency markers (`<prefix>:<key>`).
    pub fn idempotency_prefix(&self, q: QueueClass) -> String {
        format!("{}:idempotency", self.apalis_queue(q))
    }
    /// apalis' done set (ids), emptied by the janitor.
    pub fn done(&self, q: QueueClass) -> String {
        format!("{}:done", self.apalis_queue(q))
    }
    /// apalis' dead set (ids), moved into our dead letters by the janitor.
    pub fn apalis_dead(&self, q: QueueClass) -> String {
        format!("{}:dead", self.apalis_queue(q))
    }
    /// apalis' worker registry (ZSET name → last heartbeat).
    pub fn apalis_workers(&self, q: QueueClass) -> String {
        format!("{}:workers", self.apalis_queue(q))
    }
    /// apalis' per-worker inflight set.
    pub fn inflight(&self, q: QueueClass, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.apalis_queue(q))
    }
    /// Prefix of apalis' per-worker metadata hashes.
    pub fn worker_metadata_prefix(&self, q: QueueClass) -> String {
        format!("{}:workers:metadata:", self.apalis_queue(q))
    }

    fn ours(&self, rest: &str) -> String {
        format!("{SLOT_TAG}:{}:sf:{rest}", self.ns)
    }
    /// Pub/sub channel workers of `q` listen on; the enqueue script publishes after a push.
    pub fn wake_channel(&self, q: QueueClass) -> String {
        self.ours(&format!("wake:{}", q.name()))
    }
    /// One job's result (JSON string, with the retention TTL).
    pub fn result(&self, job_id: &uuid::Uuid) -> String {
        self.ours(&format!("result:{job_id}"))
    }
    /// The job ids of a run, in completion order (LIST, retention TTL).
    pub fn run(&self, run_id: &uuid::Uuid) -> String {
        self.ours(&format!("run:{run_id}"))
    }
    /// The running part of a run: its live progress (JSON string, short TTL).
    pub fn progress(&self, run_id: &uuid::Uuid) -> String {
        self.ours(&format!("progress:{run_id}"))
    }
    /// The run a running job belongs to, while its progress is published (string, short
    /// TTL): `jobs show JOB_ID` finds a running job's progress through it.
    pub fn progress_run(&self, job_id: &uuid::Uuid) -> String {
        self.ours(&format!("progress-run:{job_id}"))
    }
    /// Recent runs of a target (LIST, newest first, bounded).
    pub fn history(&self, target: &str) -> String {
        self.ours(&format!("history:{target}"))
    }
    /// Dead letters by id (HASH id → JSON).
    pub fn dead_items(&self) -> String {
        self.ours("dead:items")
    }
    /// Dead-letter order (ZSET id → unix ms).
    pub fn dead_index(&self) -> String {
        self.ours("dead:index")
    }
    /// Our worker registry (HASH name → JSON [`super::WorkerInfo`]).
    pub fn workers(&self) -> String {
        self.ours("workers")
    }
    /// Our worker registry's liveness (ZSET name → last heartbeat, unix ms).
    pub fn workers_seen(&self) -> String {
        self.ours("workers:seen")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_slot_tag_and_namespace() {
        let k = Keys::new("ns1");
        for key in [
            k.active(QueueClass::Diag),
            k.result(&uuid::Uuid::nil()),
            k.dead_items(),
            k.workers(),
        ] {
            assert!(key.starts_with("{core:apalis:queues:list}:ns1:"), "{key}");
        }
        assert_eq!(
            k.apalis_queue(QueueClass::Maintenance),
            "{core:apalis:queues:list}:ns1:maintenance"
        );
    }
}
