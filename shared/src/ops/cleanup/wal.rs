//! After a purge on SQLite: the WAL file cut back to size, a slice at a time.

use std::time::Duration;

use super::BATCH_LOCK_TIMEOUT;
use crate::fence::Fence;
use crate::ops::OpError;
use crate::store::Db;

/// Length the WAL file is cut back to: four times what SQLite's own checkpoint threshold
/// (1,000 pages) lets it reach in normal use with 4 KiB pages.
pub const SQLITE_WAL_FILE_TARGET: u64 = 16 * 1024 * 1024;
/// Most cut from the file by one transaction. The cut runs inside its COMMIT, under the write
/// lock: cutting a file of several hundred MiB to 16 MiB in one go made COMMITs of 50–517 ms
/// here; in these slices 632 MiB went in 1.0 s with the application's p99 at the purge's.
pub const SQLITE_WAL_CUT_STEP: u64 = 32 * 1024 * 1024;
/// Tries at starting the WAL over, at most, per run: enough for ~1.3 GB when about every
/// other try finds the WAL free. What is left waits for the next run.
const CUT_BACK_TRIES: u32 = 100;
/// Rest between two tries, so the application's readers of the old WAL can finish and its
/// writers get the lock.
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
/// the WAL grows through a whole purge (0.4–1.3 GB for a 1,000,000-session table), and
/// SQLite keeps the file at its longest. A transaction that starts the WAL over on a
/// connection with a size limit cuts the file to that limit as it commits. So, until the file
/// is down to [`SQLITE_WAL_FILE_TARGET`]: copy the WAL back into the database (`PASSIVE`:
/// waits for nobody), and if all of it went, write the fence row — the first write into a
/// fresh WAL unless an application write got in first — with the limit
/// [`SQLITE_WAL_CUT_STEP`] below the file's length. Nothing happens on server engines or
/// when the file is already short. `None` when nothing needed doing.
pub async fn cut_back(db: &Db, fence: &Fence) -> Result<Option<WalCutBack>, OpError> {
    let mut writer = db.batch_writer(BATCH_LOCK_TIMEOUT).await?;
    let before = match writer.wal_file_bytes().await? {
        Some(bytes) if bytes > SQLITE_WAL_FILE_TARGET => bytes,
        _ => return Ok(None),
    };
    let mut after = before;
    for _ in 0..CUT_BACK_TRIES {
        let keep = after
            .saturating_sub(SQLITE_WAL_CUT_STEP)
            .max(SQLITE_WAL_FILE_TARGET);
        writer.limit_wal_file(keep).await?;
        if writer.checkpoint().await?.left == 0 {
            let mut tx = writer.begin().await?;
            if let Err(e) = fence.advance(&mut tx).await {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
            tx.commit().await?;
            after = writer.wal_file_bytes().await?.unwrap_or(after);
            if after <= SQLITE_WAL_FILE_TARGET {
                break;
            }
        }
        tokio::time::sleep(CUT_BACK_REST).await;
    }
    Ok(Some(WalCutBack { before, after }))
}
