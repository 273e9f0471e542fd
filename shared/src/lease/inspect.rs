//! Inspection: who holds which target's lease, since when, with which token, and the last
//! token the target's database has seen. What `sessionfleet lease` shows.

use std::collections::{BTreeSet, HashMap};

use chrono::NaiveDateTime;
use redis::aio::ConnectionManager;
use serde::Serialize;

use super::{HolderInfo, Keys, LeaseError, SINCE_FORMAT, check_name, fence_name, registry_key};
use crate::fence::{self, FenceRow};
use crate::store::Db;

/// The state of one target's lease.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    /// The target.
    pub target: String,
    /// The current holder; `None` when the lease is free (or being acquired right now).
    pub holder: Option<HolderInfo>,
    /// Milliseconds until the lease expires unless renewed; `None` when free.
    pub ttl_ms: Option<u64>,
    /// The Redis token counter (a mirror of the highest token granted; the database's
    /// fence is the authority). `None` when Redis has no counter, e.g. after losing its data.
    pub redis_token: Option<i64>,
    /// The fence row in the target database: the last token it has seen. `None` when no
    /// database was given or no token was ever issued there.
    pub db_fence: Option<FenceRow>,
}

/// Reports the lease of `target`, and, when `db` is given, the target database's fence row.
pub async fn status(
    redis: &ConnectionManager,
    namespace: &str,
    target: &str,
    db: Option<&Db>,
) -> Result<LeaseStatus, LeaseError> {
    let keys = Keys::new(namespace, target)?;
    let mut con = redis.clone();
    let (pttl, fields, counter): (i64, HashMap<String, String>, Option<i64>) = redis::pipe()
        .cmd("PTTL")
        .arg(&keys.lease)
        .cmd("HGETALL")
        .arg(&keys.holder)
        .cmd("GET")
        .arg(&keys.counter)
        .query_async(&mut con)
        .await?;
    // PTTL: -2 no key, -1 no expiry (never set so by us).
    let ttl_ms = u64::try_from(pttl).ok();
    let holder = ttl_ms.and_then(|_| holder_from(&fields));
    let db_fence = match db {
        Some(db) => fence::inspect(db, &fence_name(target)).await?,
        None => None,
    };
    Ok(LeaseStatus {
        target: target.to_string(),
        holder,
        ttl_ms,
        redis_token: counter,
        db_fence,
    })
}

/// Every target of `namespace` whose lease is held right now, with its holder, sorted by
/// target: [`holders_among`] the registered targets alone.
pub async fn holders(
    redis: &ConnectionManager,
    namespace: &str,
) -> Result<Vec<(String, HolderInfo)>, LeaseError> {
    holders_among(redis, namespace, std::iter::empty::<&str>()).await
}

/// Holder records read per pipelined round trip.
const HOLDERS_PER_TRIP: usize = 256;

/// Every target of `namespace` whose lease is held right now, with its holder, sorted by
/// target, among `targets` (e.g. those configured here) and the targets registered by
/// acquisitions in the namespace (the [`super::REGISTERED_TARGETS`] most recent, wherever
/// they were acquired). Reads each candidate's holder record directly (`HGETALL`, pipelined),
/// never walking the keyspace: its cost does not grow with what else the Redis server holds.
/// Names that cannot be a lease target are skipped.
pub async fn holders_among<T: AsRef<str>>(
    redis: &ConnectionManager,
    namespace: &str,
    targets: impl IntoIterator<Item = T>,
) -> Result<Vec<(String, HolderInfo)>, LeaseError> {
    check_name(namespace)?;
    let mut con = redis.clone();
    let registered: Vec<String> = redis::cmd("ZRANGE")
        .arg(registry_key(namespace))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await?;
    let candidates: BTreeSet<String> = targets
        .into_iter()
        .map(|t| t.as_ref().to_string())
        .chain(registered)
        .collect();
    let keyed: Vec<(String, Keys)> = candidates
        .into_iter()
        .filter_map(|t| Keys::new(namespace, &t).ok().map(|k| (t, k)))
        .collect();
    let mut out = Vec::new();
    for chunk in keyed.chunks(HOLDERS_PER_TRIP) {
        let mut p = redis::pipe();
        for (_, keys) in chunk {
            p.cmd("HGETALL").arg(&keys.holder);
        }
        let records: Vec<HashMap<String, String>> = p.query_async(&mut con).await?;
        for ((target, _), fields) in chunk.iter().zip(records) {
            if let Some(h) = holder_from(&fields) {
                out.push((target.clone(), h));
            }
        }
    }
    Ok(out)
}

fn holder_from(fields: &HashMap<String, String>) -> Option<HolderInfo> {
    Some(HolderInfo {
        worker: fields.get("worker")?.clone(),
        job_id: fields.get("job_id")?.clone(),
        since: fields
            .get("since")
            .and_then(|s| NaiveDateTime::parse_from_str(s, SINCE_FORMAT).ok()),
        token: fields.get("token").and_then(|t| t.parse().ok()),
    })
}
