//! Removing a whole namespace from Redis: what a one-off fleet (the demo) leaves behind.
//! Lease-token counters, scheduler ticks and apalis' worker records carry no expiry, so they
//! would otherwise stay on the user's Redis for good.

use super::keys::{SLOT_TAG, apalis_registry, namespace_patterns};
use super::{Queue, QueueError};
use crate::scan::{SCAN_COUNT, scan_all};

impl Queue {
    /// Deletes every key of this queue's namespace and its members of apalis' registry;
    /// returns how many keys went. For a namespace no worker uses any more: a live worker
    /// would re-register. Walks the keyspace with `SCAN`, so Redis keeps serving meanwhile.
    pub async fn forget_namespace(&self) -> Result<u64, QueueError> {
        let ns = self.keys().namespace().to_string();
        let mut c = self.connection();
        let mut deleted = 0;
        for pattern in namespace_patterns(&ns) {
            let keys = scan_all(&mut c, &pattern).await.map_err(|e| self.err(e))?;
            for chunk in keys.chunks(SCAN_COUNT) {
                let n: u64 = redis::cmd("DEL")
                    .arg(chunk)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.err(e))?;
                deleted += n;
            }
        }
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(apalis_registry())
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let prefix = format!("{SLOT_TAG}:{ns}:");
        let ours: Vec<&String> = members.iter().filter(|m| m.starts_with(&prefix)).collect();
        if !ours.is_empty() {
            let _: u64 = redis::cmd("ZREM")
                .arg(apalis_registry())
                .arg(ours)
                .query_async(&mut c)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(deleted)
    }
}
