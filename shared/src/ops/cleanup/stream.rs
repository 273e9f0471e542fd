//! The ids of a rule no index can find (orphaned sessions, v1 sessions without activity),
//! read by one query and handed out a batch at a time.
//!
//! Finding orphans means joining every session against `users`. Done once, the engine uses a
//! hash anti-join (PostgreSQL: about 0.5 s for 1M sessions); done per batch, each batch pays
//! an index probe per row scanned or a hash build, several seconds over a large table. So one
//! plain read streams the matching ids in key order into a small bounded channel, and batches
//! take from it: memory stays flat (backpressure reaches the server through the socket), and
//! the read takes no lock — each DELETE re-checks the rule as before.

use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::rules::{Rule, id_as_i64};
use crate::store::{Db, Schema};

/// Ids buffered between the read and the batches: a few batches' worth.
const BUFFERED_IDS: usize = 20_000;

/// Matching ids, in key order, as the read delivers them.
pub struct IdStream {
    ids: mpsc::Receiver<Result<i64, sqlx::Error>>,
}

impl IdStream {
    /// Starts the read on a connection of its own (the pool always has more than one; the
    /// batches use another). Dropping the stream stops the read.
    pub fn open(db: &Db, schema: &Schema, rule: &Rule) -> IdStream {
        let t = &schema.sessions.table;
        let id = format!("{t}.{}", schema.sessions.id);
        let sql = db.sql(format!(
            "SELECT {} FROM {t} WHERE {} ORDER BY {id}",
            id_as_i64(db.engine(), &id),
            rule.predicate.sql
        ));
        let binds = rule.predicate.binds.clone();
        let db = db.clone();
        let (tx, rx) = mpsc::channel(BUFFERED_IDS);
        tokio::spawn(async move {
            let read = async {
                crate::on_pool!(db, p => {
                    let mut q = sqlx::query_scalar::<_, i64>(sql);
                    for b in &binds {
                        q = q.bind(*b);
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
        IdStream { ids: rx }
    }

    /// The next up to `limit` ids; fewer only at the end of the read.
    pub async fn next_batch(&mut self, limit: u32) -> Result<Vec<i64>, sqlx::Error> {
        let mut batch = Vec::with_capacity(limit as usize);
        while batch.len() < limit as usize {
            match self.ids.recv().await {
                Some(id) => batch.push(id?),
                None => break,
            }
        }
        Ok(batch)
    }
}
