//! After a purge on SQLite: the WAL file cut back to size.

use std::time::Duration;

use crate::fence::Fence;
use crate::ops::OpError;
use crate::store::{Db, SQLITE_WAL_SIZE_LIMIT};

/// Tries at starting the WAL over; each after a short rest, so the application's readers of
/// the old WAL can finish.
const CUT_BACK_TRIES: u32 = 5;
/// Rest between two tries.
const CUT_BACK_REST: Duration = Duration::from_millis(20);

/// The WAL file's length before and after [`cut_back`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalCutBack {
    /// Bytes before.
    pub before: u64,
    /// Bytes after.
    pub after: u64,
}

/// SQLite starts its WAL over only when no reader is using it, so beside a busy application
/// the WAL grows through a whole purge, and SQLite keeps the file at that length afterwards.
/// A write that starts the WAL over on the batch writer's connection cuts the file back to
/// [`SQLITE_WAL_SIZE_LIMIT`] when it commits. So, a few times: copy the WAL back into the
/// database (`PASSIVE`: waits for nobody), and if all of it went, write the fence row — the
/// first write into a fresh WAL, unless an application write got in between. Nothing happens
/// on server engines or when the file is already short; readers that keep the WAL busy leave
/// it for the next run. `None` when nothing needed doing.
pub async fn cut_back(db: &Db, fence: &Fence) -> Result<Option<WalCutBack>, OpError> {
    let mut writer = db.batch_writer().await?;
    let before = match writer.wal_file_bytes().await? {
        Some(bytes) if bytes > SQLITE_WAL_SIZE_LIMIT => bytes,
        _ => return Ok(None),
    };
    let mut after = before;
    for _ in 0..CUT_BACK_TRIES {
        if writer.checkpoint().await?.left == 0 {
            let mut tx = writer.begin().await?;
            if let Err(e) = fence.advance(&mut tx).await {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
            tx.commit().await?;
            after = writer.wal_file_bytes().await?.unwrap_or(after);
            if after <= SQLITE_WAL_SIZE_LIMIT {
                break;
            }
        }
        tokio::time::sleep(CUT_BACK_REST).await;
    }
    Ok(Some(WalCutBack { before, after }))
}
