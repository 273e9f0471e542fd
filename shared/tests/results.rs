//! Reading a run's results against a real Redis: the full read (`run_results`, by `MGET`)
//! equals one `GET` per listed part, and the incremental read (`new_run_results`) returns
//! exactly the parts recorded since the last read, without reading the earlier ones again.

use std::collections::HashSet;

use sessionfleet::config::{Overrides, Settings};
use sessionfleet::jobs::JobKind;
use sessionfleet::queue::results::{MGET_CHUNK, RunCursor};
use sessionfleet::queue::{JobResult, Queue, ResultOutcome};
use sessionfleet::testing::{RedisKeysGuard, job_result, redis_url, unique_namespace};
use uuid::Uuid;

struct Ns {
    queue: Queue,
    _keys: RedisKeysGuard,
}

impl Ns {
    async fn new() -> Ns {
        let ns = unique_namespace();
        let keys = RedisKeysGuard::new(&ns);
        let url = redis_url();
        let env = move |k: &str| match k {
            "REDIS_URL" => Some(url.clone()),
            "SESSIONFLEET_NAMESPACE" => Some(ns.clone()),
            "SESSION_METRICS_RETENTION_DAYS" => Some("3".into()),
            _ => None,
        };
        let settings = Settings::resolve(&Overrides::default(), &env, None).expect("settings");
        let queue = Queue::connect(&settings).await.expect("connect");
        Ns { queue, _keys: keys }
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.queue.connection()
    }

    /// The reading before `MGET`: the run's list, then one `GET` per distinct job id.
    async fn one_get_per_part(&self, run_id: Uuid) -> Vec<JobResult> {
        let ids: Vec<String> = redis::cmd("LRANGE")
            .arg(self.queue.keys().run(&run_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in ids {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Ok(job_id) = Uuid::parse_str(&id) else {
                continue;
            };
            if let Some(r) = self.queue.result(job_id).await.unwrap() {
                out.push(r);
            }
        }
        out
    }

    /// Part `part` of run `run_id`: continued, with `part` rows.
    async fn record_part(&self, run_id: Uuid, part: u32) -> JobResult {
        let r = JobResult {
            run_id,
            part,
            rows_affected: u64::from(part),
            ..job_result(
                JobKind::Cleanup,
                "db1",
                ResultOutcome::Continued,
                serde_json::json!({ "part": part }),
                chrono::Utc::now(),
            )
        };
        self.queue.record_result(&r).await.unwrap();
        r
    }
}

fn job_ids(rs: &[JobResult]) -> Vec<Uuid> {
    rs.iter().map(|r| r.job_id).collect()
}

#[tokio::test]
async fn the_full_read_equals_one_get_per_part_across_mget_chunks() {
    let t = Ns::new().await;
    let run_id = Uuid::new_v4();
    let n = MGET_CHUNK * 2 + 17;
    let mut recorded = Vec::new();
    for part in 0..n as u32 {
        recorded.push(t.record_part(run_id, part).await);
    }
    // A redelivered part recorded twice, a part whose result is gone, and a list entry that
    // is no job id: the old reading reported the first once and left the others out.
    t.queue.record_result(&recorded[3]).await.unwrap();
    t.queue.forget_result(recorded[5].job_id).await.unwrap();
    redis::cmd("RPUSH")
        .arg(t.queue.keys().run(&run_id))
        .arg("not-a-job-id")
        .query_async::<()>(&mut t.conn())
        .await
        .unwrap();

    let full = t.queue.run_results(run_id).await.unwrap();
    assert_eq!(full, t.one_get_per_part(run_id).await);
    assert_eq!(full.len(), n - 1);
    let mut expected = recorded.clone();
    expected.remove(5);
    assert_eq!(full, expected, "completion order, each part once");
    assert!(
        t.queue
            .run_results(Uuid::new_v4())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_incremental_read_returns_exactly_the_new_parts_in_order() {
    let t = Ns::new().await;
    let run_id = Uuid::new_v4();
    let mut cursor = RunCursor::default();
    assert!(
        t.queue
            .new_run_results(run_id, &mut cursor)
            .await
            .unwrap()
            .is_empty(),
        "nothing recorded yet"
    );

    let mut first = Vec::new();
    for part in 0..3 {
        first.push(t.record_part(run_id, part).await);
    }
    let read = t.queue.new_run_results(run_id, &mut cursor).await.unwrap();
    assert_eq!(read, first);
    assert!(
        t.queue
            .new_run_results(run_id, &mut cursor)
            .await
            .unwrap()
            .is_empty(),
        "nothing new"
    );

    // The parts already read are not read again: were they, this one would be corrupt.
    redis::cmd("SET")
        .arg(t.queue.keys().result(&first[0].job_id))
        .arg("{not json")
        .query_async::<()>(&mut t.conn())
        .await
        .unwrap();
    let mut second = Vec::new();
    for part in 3..6 {
        second.push(t.record_part(run_id, part).await);
    }
    // A redelivery of a part already read comes back no more.
    t.queue.record_result(&first[1]).await.unwrap();
    let read = t.queue.new_run_results(run_id, &mut cursor).await.unwrap();
    assert_eq!(job_ids(&read), job_ids(&second));
    assert_eq!(read, second);
    assert_eq!(cursor.parts_read(), 6);
    assert_eq!(cursor.position(), 7, "six parts and one redelivery listed");
}

#[tokio::test]
async fn a_part_whose_result_is_gone_is_read_when_it_is_recorded_again() {
    let t = Ns::new().await;
    let run_id = Uuid::new_v4();
    let failed = JobResult {
        outcome: ResultOutcome::Failed,
        ..t.record_part(run_id, 0).await
    };
    // As a requeue of the dead letter leaves it: listed, its result forgotten.
    t.queue.record_result(&failed).await.unwrap();
    t.queue.forget_result(failed.job_id).await.unwrap();
    let mut cursor = RunCursor::default();
    assert!(
        t.queue
            .new_run_results(run_id, &mut cursor)
            .await
            .unwrap()
            .is_empty()
    );
    let rerun = JobResult {
        outcome: ResultOutcome::Succeeded,
        ..failed.clone()
    };
    t.queue.record_result(&rerun).await.unwrap();
    let read = t.queue.new_run_results(run_id, &mut cursor).await.unwrap();
    assert_eq!(read, vec![rerun.clone()]);
    assert_eq!(t.queue.run_results(run_id).await.unwrap(), vec![rerun]);
}

#[tokio::test]
async fn waiting_for_a_run_returns_every_part_once_it_ends() {
    let t = Ns::new().await;
    let run_id = Uuid::new_v4();
    let mut parts = Vec::new();
    for part in 0..4 {
        parts.push(t.record_part(run_id, part).await);
    }
    let last = JobResult {
        outcome: ResultOutcome::Succeeded,
        ..job_result(
            JobKind::Cleanup,
            "db1",
            ResultOutcome::Succeeded,
            serde_json::json!({}),
            chrono::Utc::now(),
        )
    };
    let last = JobResult {
        run_id,
        part: 4,
        ..last
    };
    let queue = t.queue.clone();
    let waiter = tokio::spawn(async move {
        queue
            .wait_for_run(run_id, std::time::Duration::from_secs(10))
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    t.queue.record_result(&last).await.unwrap();
    parts.push(last);
    assert_eq!(waiter.await.unwrap().unwrap(), parts);
}

/// A run list that came back shorter than the cursor (Redis failed over to a replica that had
/// not seen the last pushes) is read again from its start: a part recorded after that lands
/// below the cursor and must still be returned, once.
#[tokio::test]
async fn a_run_list_that_lost_entries_is_read_again_from_its_start() {
    let t = Ns::new().await;
    let run_id = Uuid::new_v4();
    let mut cursor = RunCursor::default();
    let mut firsts = Vec::new();
    for part in 0..3 {
        firsts.push(t.record_part(run_id, part).await);
    }
    assert_eq!(
        t.queue
            .new_run_results(run_id, &mut cursor)
            .await
            .unwrap()
            .len(),
        3
    );
    // The failover: the last two pushes are gone (their results too).
    let _: () = redis::cmd("LTRIM")
        .arg(t.queue.keys().run(&run_id))
        .arg(0)
        .arg(0)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let later = t.record_part(run_id, 3).await;
    let got = t.queue.new_run_results(run_id, &mut cursor).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.job_id).collect::<Vec<_>>(),
        vec![later.job_id],
        "the part recorded after the loss, once"
    );
    assert!(
        t.queue
            .new_run_results(run_id, &mut cursor)
            .await
            .unwrap()
            .is_empty()
    );
}
