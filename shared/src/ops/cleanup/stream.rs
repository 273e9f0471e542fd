//! The ids of a rule no index can find (orphaned sessions, v1 sessions without activity),
//! read by one query and handed out a batch at a time.
//!
//! Finding orphans means joining every session against `users`. Done once, the engine uses a
//! hash anti-join (PostgreSQL: about 0.5 s for 1M sessions); done per batch, each batch pays
//! an index probe per row scanned or a hash build, several seconds over a large table. So one
//! plain read streams the matching ids in key order into a small bounded channel, and batches
//! take from it: memory stays flat (backpressure reaches the server through the socket), and
//! the read takes no lock — each DELETE re-checks the rule as before.
//!
//! The read may be opened before its rule's turn, so the engine computes it while earlier
//! rules delete. A read that breaks (a dropped connection, MySQL's `net_write_timeout` on a
//! consumer that paused too long) is reopened after the last id it delivered.

use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::rules::{Predicate, id_as_i64};
use crate::store::{Db, Schema};

/// Ids buffered between the read and the batches: a few batches' worth.
const BUFFERED_IDS: usize = 20_000;
/// Times a broken read is reopened before the error ends the run.
const REOPEN_ATTEMPTS: u32 = 3;

/// Ids matching a predicate, in key order, as a read delivers them.
pub struct IdStream {
    db: Db,
    schema: Schema,
    pred: Predicate,
    ids: mpsc::Receiver<Result<i64, sqlx::Error>>,
    last: Option<i64>,
    reopened: u32,
}

impl IdStream {
    /// Starts the read on a connection of its own (the pool always has more than one; the
    /// batches use another). Dropping the stream stops the read.
    pub fn open(db: &Db, schema: &Schema, pred: &Predicate) -> IdStream {
        IdStream {
            ids: start_read(db, schema, pred, None),
            db: db.clone(),
            schema: schema.clone(),
            pred: pred.clone(),
            last: None,
            reopened: 0,
        }
    }

    /// The next up to `limit` ids; fewer only at the end of the read.
    pub async fn next_batch(&mut self, limit: u32) -> Result<Vec<i64>, sqlx::Error> {
        let mut batch = Vec::with_capacity(limit as usize);
        while batch.len() < limit as usize {
            match self.ids.recv().await {
                Some(Ok(id)) => {
                    self.last = Some(id);
                    batch.push(id);
                }
                Some(Err(e)) if self.reopened < REOPEN_ATTEMPTS => {
                    self.reopened += 1;
                    tracing::warn!(error = %e, after_id = ?self.last, "cleanup read broke; reopening it after the last id it delivered");
                    self.ids = start_read(&self.db, &self.schema, &self.pred, self.last);
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(batch)
    }
}

/// Spawns the read of the ids matching `pred` (after `after`, when given).
fn start_read(
    db: &Db,
    schema: &Schema,
    pred: &Predicate,
    after: Option<i64>,
) -> mpsc::Receiver<Result<i64, sqlx::Error>> {
    let t = &schema.sessions.table;
    let id = format!("{t}.{}", schema.sessions.id);
    let after_sql = if after.is_some() {
        format!(" AND {id} > ?")
    } else {
        String::new()
    };
    let sql = db.sql(format!(
        "SELECT {} FROM {t} WHERE ({}){after_sql} ORDER BY {id}",
        id_as_i64(db.engine(), &id),
        pred.sql
    ));
    let binds = pred.binds.clone();
    let db = db.clone();
    let (tx, rx) = mpsc::channel(BUFFERED_IDS);
    tokio::spawn(async move {
        let read = async {
            crate::on_pool!(db, p => {
                let mut q = sqlx::query_scalar::<_, i64>(sql);
                for b in &binds {
                    q = q.bind(*b);
                }
                if let Some(after) = after {
                    q = q.bind(after);
                }
                let mut rows = q.fetch(p);
                while let Some(id) = rows.try_next().await? {
                    if tx.send(Ok(id)).await.is_err() {
                        // The run stopped taking batches.
                        return Ok(());
                    }
                }
            });
            Ok::<(), sqlx::Error>(())
        };
        if let Err(e) = read.await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}
