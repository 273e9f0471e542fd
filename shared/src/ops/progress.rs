//! Live progress of a running operation: what it has committed so far in this part, for
//! whoever shows it (the CLI's spinner, `jobs show`). The operation only reports; the worker
//! or the CLI decides where it goes (see `dispatch`), so operations stay free of Redis.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a part has committed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Rows deleted (or otherwise changed) and committed.
    pub rows: u64,
    /// Batches committed.
    pub batches: u64,
}

/// Where an operation reports its [`Snapshot`]s: the latest one is kept for whoever
/// subscribed; with nobody subscribed, reporting costs a store.
#[derive(Debug, Clone)]
pub struct Progress(Arc<watch::Sender<Snapshot>>);

impl Default for Progress {
    fn default() -> Self {
        Progress(Arc::new(watch::channel(Snapshot::default()).0))
    }
}

impl Progress {
    /// Replaces the latest snapshot.
    pub fn report(&self, snapshot: Snapshot) {
        self.0.send_replace(snapshot);
    }

    /// A receiver that sees each new snapshot (at least the latest of a burst).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.0.subscribe()
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Snapshot {
        *self.0.borrow()
    }
}
