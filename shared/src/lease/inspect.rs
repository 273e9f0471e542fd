//! Inspection: who holds which target's lease, since when, with which token, and the last
//! token the target's database has seen. What `sessionfleet lease` shows.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use redis::aio::ConnectionManager;
use serde::Serialize;

use super::{HolderInfo, Keys, LeaseError, SINCE_FORMAT, check_name, fence_name};
use crate::fence::{self, FenceRow};
use crate::scan::{glob_escape, scan_all};
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
/// target. Uses `SCAN`, so it does not block Redis on a large keyspace.
pub async fn holders(
    redis: &ConnectionManager,
    namespace: &str,
) -> Result<Vec<(String, HolderInfo)>, LeaseError> {
    check_name(namespace)?;
    let mut con = redis.clone();
    let prefix = format!("{namespace}:lease:{{{namespace}:");
    let pattern = format!("{}*}}", glob_escape(&prefix));
    let mut targets: Vec<String> = scan_all(&mut con, &pattern)
        .await?
        .iter()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .strip_suffix('}')
                .map(str::to_string)
        })
        .collect();
    targets.sort();
    targets.dedup();
    let mut out = Vec::new();
    for target in targets {
        let Ok(keys) = Keys::new(namespace, &target) else {
            continue;
        };
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.holder)
            .query_async(&mut con)
            .await?;
        if let Some(h) = holder_from(&fields) {
            out.push((target, h));
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
