//! The queue against a real Redis, each test in its own namespace.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{TaskBuilder, WorkerContext};
use sessionfleet::CancellationToken;
use sessionfleet::config::{Overrides, Settings};
use sessionfleet::jobs::{JobEnvelope, JobKind, QueueClass};
use sessionfleet::queue::results::HISTORY_LEN;
use sessionfleet::queue::settle::{Settled, process_delivery};
use sessionfleet::queue::{
    EnqueueOptions, JobResult, Keys, MAX_DUE_PER_SECOND, Queue, QueueError, ResultOutcome,
    WaitState,
};
use sessionfleet::runner::RunnerDeps;
use sessionfleet::testing::{RedisKeysGuard, redis_url, unique_namespace};

struct Ns {
    queue: Queue,
    deps: RunnerDeps,
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
        let deps = RunnerDeps {
            settings: Arc::new(settings),
            queue: queue.clone(),
            worker_name: "test-worker".into(),
            shutdown: CancellationToken::new(),
        };
        Ns {
            queue,
            deps,
            _keys: keys,
        }
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.queue.connection()
    }

    async fn llen(&self, key: String) -> u64 {
        redis::cmd("LLEN")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }

    async fn zcard(&self, key: String) -> u64 {
        redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }

    /// Takes the next ready job of `q` the way a worker would: pops its id, reads its payload.
    async fn take(&self, q: QueueClass) -> Option<(String, Vec<u8>)> {
        let k = self.queue.keys();
        let id: Option<String> = redis::cmd("LPOP")
            .arg(k.active(q))
            .query_async(&mut self.conn())
            .await
            .unwrap();
        let id = id?;
        let data: Vec<u8> = redis::cmd("HGET")
            .arg(k.data(q))
            .arg(&id)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        Some((id, data))
    }

    async fn cleanup(self) {
        let pattern = format!(
            "{}:{}:*",
            sessionfleet::queue::keys::SLOT_TAG,
            self.queue.keys().namespace()
        );
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut self.conn())
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn dedupe_key_keeps_one_job_where_apalis_defaults_keep_every_copy() {
    let t = Ns::new().await;
    let a = JobEnvelope::noop("test").with_dedupe_key("tick:42");
    let b = JobEnvelope::noop("test").with_dedupe_key("tick:42");
    let first = t.queue.enqueue(&a).await.unwrap();
    let second = t.queue.enqueue(&b).await.unwrap();
    assert!(first.accepted);
    assert!(
        !second.accepted,
        "the second job with the same key must be dropped"
    );
    assert_eq!(second.duplicate_of.as_deref(), Some(first.task_id.as_str()));
    assert_eq!(t.llen(t.queue.keys().active(QueueClass::Diag)).await, 1);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!(
            "{}:tick:42",
            t.queue.keys().idempotency_prefix(QueueClass::Diag)
        ))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(ttl > 0, "the dedupe marker must expire, ttl={ttl}");

    // The same two pushes through apalis' own producer with its default config: both stored.
    let cfg = apalis_redis::Config::default().queue(format!(
        "{}-apalis-default",
        t.queue.keys().apalis_queue(QueueClass::Diag)
    ));
    for _ in 0..2 {
        let task = TaskBuilder::new(b"{}".to_vec())
            .idempotency_key("tick:42")
            .build();
        apalis_redis::queries::push_tasks(&mut t.conn(), &cfg, &[task])
            .await
            .unwrap();
    }
    assert_eq!(
        t.zcard(cfg.scheduled_jobs_set()).await,
        2,
        "apalis' default config does not deduplicate"
    );
    let _: () = redis::cmd("DEL")
        .arg(cfg.scheduled_jobs_set())
        .arg(cfg.job_data_hash())
        .query_async(&mut t.conn())
        .await
        .unwrap();
    t.cleanup().await;
}

#[tokio::test]
async fn batch_of_ten_thousand_is_ready_at_once_without_touching_the_scheduled_set() {
    let t = Ns::new().await;
    let jobs: Vec<JobEnvelope> = (0..10_000).map(|_| JobEnvelope::noop("test")).collect();
    let ids: Vec<_> = jobs.iter().map(|j| j.job_id).collect();
    let done = t
        .queue
        .enqueue_batch(jobs, EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(done.len(), 10_000);
    assert!(done.iter().all(|e| e.accepted));
    assert_eq!(
        done.iter().map(|e| e.job_id).collect::<Vec<_>>(),
        ids,
        "results in input order"
    );
    assert_eq!(
        t.llen(t.queue.keys().active(QueueClass::Diag)).await,
        10_000
    );
    assert_eq!(t.zcard(t.queue.keys().scheduled(QueueClass::Diag)).await, 0);
    t.cleanup().await;
}

#[tokio::test]
async fn delayed_batch_never_lets_more_than_the_limit_come_due_together() {
    let t = Ns::new().await;
    let jobs: Vec<JobEnvelope> = (0..5_000).map(|_| JobEnvelope::noop("test")).collect();
    t.queue
        .enqueue_batch(
            jobs,
            EnqueueOptions {
                delay: Some(Duration::from_secs(60)),
            },
        )
        .await
        .unwrap();
    let entries: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(t.queue.keys().scheduled(QueueClass::Diag))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(entries.len(), 5_000);
    let mut per_second = std::collections::HashMap::<u64, usize>::new();
    for (_, s) in entries {
        *per_second.entry(s).or_default() += 1;
    }
    assert!(
        per_second.values().all(|n| *n <= MAX_DUE_PER_SECOND),
        "{per_second:?}"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn due_backlog_that_wedges_apalis_fetch_is_drained_by_promotion() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // 9,000 due entries, as a deploy gap or a burst of retries would leave them.
    for chunk in (0..9_000).collect::<Vec<u32>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            let id = format!("00000000-0000-4000-8000-{i:012}");
            p.zadd(k.scheduled(q), &id, now - 1).ignore();
            p.hset(k.data(q), &id, JobEnvelope::noop("t").to_bytes())
                .ignore();
            p.hset_multiple(
                format!("{}:{id}", k.meta_prefix(q)),
                &[
                    ("attempts", "0"),
                    ("max_attempts", "25"),
                    ("status", "Pending"),
                ],
            )
            .ignore();
        }
        let _: () = p.query_async(&mut t.conn()).await.unwrap();
    }
    let cfg = t.queue.apalis_config(q);
    let worker = WorkerContext::new("probe");
    let _: () = redis::cmd("ZADD")
        .arg(k.apalis_workers(q))
        .arg(now)
        .arg("probe")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let wedged = apalis_redis::queries::fetch_next(&mut t.conn(), &worker, &cfg).await;
    assert!(
        wedged.is_err(),
        "apalis' fetch should fail on 9,000 due entries (the defect this guards)"
    );

    let moved = t.queue.promote_due(q).await.unwrap();
    assert_eq!(moved, 9_000);
    assert_eq!(t.zcard(k.scheduled(q)).await, 0);
    let fetched = apalis_redis::queries::fetch_next(&mut t.conn(), &worker, &cfg)
        .await
        .expect("fetch works again");
    assert_eq!(fetched.len(), cfg.batch_size);
    t.cleanup().await;
}

#[tokio::test]
async fn undecodable_and_failed_jobs_become_dead_letters_that_can_be_inspected_requeued_and_purged()
{
    let t = Ns::new().await;
    let settled = process_delivery(
        &t.deps,
        QueueClass::Cleanup,
        "task-garbage",
        b"\x00\xffnot json",
    )
    .await
    .unwrap();
    assert_eq!(settled, Settled::DeadLettered);
    let wrong_version = br#"{"v":9,"kind":"cleanup"}"#;
    process_delivery(&t.deps, QueueClass::Cleanup, "task-v9", wrong_version)
        .await
        .unwrap();

    // A decodable envelope whose parameters the operation refuses: fails for good.
    let env = JobEnvelope::new(
        JobKind::Cleanup,
        "default",
        serde_json::json!({ "batch_size": "lots" }),
        "test",
    );
    let settled = process_delivery(&t.deps, QueueClass::Cleanup, "task-ok", &env.to_bytes())
        .await
        .unwrap();
    assert_eq!(settled, Settled::DeadLettered);

    let all = t.queue.dead_letters(10).await.unwrap();
    assert_eq!(all.len(), 3);
    let garbage = t
        .queue
        .dead_letter("task:task-garbage")
        .await
        .unwrap()
        .expect("listed by id");
    assert!(
        garbage.reason.contains("not a job envelope"),
        "{}",
        garbage.reason
    );
    assert!(garbage.envelope.is_none());
    let v9 = t.queue.dead_letter("task:task-v9").await.unwrap().unwrap();
    assert!(
        v9.reason.contains("unsupported envelope version 9"),
        "{}",
        v9.reason
    );
    let failed = t
        .queue
        .dead_letter(&env.job_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(
        failed.reason.contains("invalid cleanup parameters"),
        "{}",
        failed.reason
    );
    assert_eq!(failed.envelope.as_ref().map(|e| e.job_id), Some(env.job_id));
    // The failure is also a result, so a waiting CLI learns about it.
    let r = t.queue.result(env.job_id).await.unwrap().unwrap();
    assert_eq!(r.outcome, ResultOutcome::Failed);

    assert!(matches!(
        t.queue.requeue_dead("task:task-garbage").await,
        Err(QueueError::Invalid(_))
    ));
    let back = t.queue.requeue_dead(&env.job_id.to_string()).await.unwrap();
    assert!(back.accepted);
    assert!(
        t.queue
            .dead_letter(&env.job_id.to_string())
            .await
            .unwrap()
            .is_none()
    );
    let (_, payload) = t
        .take(QueueClass::Cleanup)
        .await
        .expect("requeued job is ready");
    assert_eq!(JobEnvelope::decode(&payload).unwrap().job_id, env.job_id);

    assert_eq!(t.queue.purge_dead(Some("task:task-v9")).await.unwrap(), 1);
    assert_eq!(t.queue.dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(t.queue.purge_dead(None).await.unwrap(), 1);
    assert!(t.queue.dead_letters(10).await.unwrap().is_empty());
    t.cleanup().await;
}

#[tokio::test]
async fn retryable_failures_back_off_then_succeed_or_dead_letter() {
    let t = Ns::new().await;
    // Fails once, then succeeds: one retry, delayed in the scheduled set.
    let env = JobEnvelope::new(
        JobKind::Noop,
        "diag",
        serde_json::json!({"fail_attempts": 1}),
        "test",
    );
    let failed_before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let s = process_delivery(&t.deps, QueueClass::Diag, "t1", &env.to_bytes())
        .await
        .unwrap();
    assert_eq!(s, Settled::Retrying(2));
    // The retry that was scheduled: the next attempt, due no sooner than its backoff allows
    // (the first retry waits RETRY_BASE, jitter shortens it by at most half).
    let k = t.queue.keys();
    let scheduled: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(k.scheduled(QueueClass::Diag))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let [(task, due)] = scheduled.as_slice() else {
        panic!("one scheduled retry: {scheduled:?}")
    };
    let earliest = failed_before + sessionfleet::queue::RETRY_BASE / 2;
    assert!(
        *due >= earliest.as_secs_f64().floor(),
        "due at {due} s, the failure started at {failed_before:?}"
    );
    let payload: Vec<u8> = redis::cmd("HGET")
        .arg(k.data(QueueClass::Diag))
        .arg(task)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let retry = JobEnvelope::decode(&payload).expect("the retry's envelope");
    assert_eq!((retry.job_id, retry.attempt), (env.job_id, 2));
    assert_eq!(
        process_delivery(&t.deps, QueueClass::Diag, "t2", &payload)
            .await
            .unwrap(),
        Settled::Succeeded
    );
    assert_eq!(
        t.queue.result(env.job_id).await.unwrap().unwrap().attempts,
        2
    );

    // Always fails: dead-lettered once the kind's attempts are spent.
    let mut env = JobEnvelope::new(
        JobKind::Noop,
        "diag",
        serde_json::json!({"fail_attempts": 99}),
        "test",
    );
    env.attempt = sessionfleet::queue::max_attempts(JobKind::Noop);
    assert_eq!(
        process_delivery(&t.deps, QueueClass::Diag, "t3", &env.to_bytes())
            .await
            .unwrap(),
        Settled::DeadLettered
    );
    let d = t
        .queue
        .dead_letter(&env.job_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(d.reason.starts_with("gave up after"), "{}", d.reason);
    t.cleanup().await;
}

/// A job that failed for good and was requeued from the dead letters (`jobs requeue`) runs
/// again: its stored failure does not make the delivery look like a duplicate of a finished
/// job. Fails if the requeued job is skipped — it would then never run, and its dead letter
/// is gone.
#[tokio::test]
async fn a_requeued_dead_letter_runs_again() {
    let t = Ns::new().await;
    let max = sessionfleet::queue::max_attempts(JobKind::Noop);
    let mut env = JobEnvelope::new(
        JobKind::Noop,
        "diag",
        serde_json::json!({ "fail_attempts": max }),
        "test",
    );
    env.attempt = max;
    assert_eq!(
        process_delivery(&t.deps, QueueClass::Diag, "dead", &env.to_bytes())
            .await
            .unwrap(),
        Settled::DeadLettered
    );
    t.queue.requeue_dead(&env.job_id.to_string()).await.unwrap();
    assert!(t.queue.dead_letters(10).await.unwrap().is_empty());
    let mut again = env.clone();
    again.attempt = 1;
    again.dedupe_key = None;
    assert_eq!(
        process_delivery(&t.deps, QueueClass::Diag, "again", &again.to_bytes())
            .await
            .unwrap(),
        Settled::Retrying(2),
        "the requeued job ran (and failed its first attempt, as its parameters say)"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn results_are_addressable_by_job_and_run_with_retention_and_redelivery_is_skipped() {
    let t = Ns::new().await;
    let env = JobEnvelope::sleep(60, Some(20), "test");
    let s = process_delivery(&t.deps, QueueClass::Diag, "p0", &env.to_bytes())
        .await
        .unwrap();
    assert_eq!(s, Settled::Continued);
    let (_, next) = t
        .take(QueueClass::Diag)
        .await
        .expect("continuation enqueued");
    let next = JobEnvelope::decode(&next).unwrap();
    assert_eq!((next.run_id, next.part), (env.run_id, 1));
    // Finish the run.
    let mut part = next;
    loop {
        match process_delivery(&t.deps, QueueClass::Diag, "pn", &part.to_bytes())
            .await
            .unwrap()
        {
            Settled::Succeeded => break,
            Settled::Continued => {
                part = JobEnvelope::decode(&t.take(QueueClass::Diag).await.unwrap().1).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let first = t.queue.result(env.job_id).await.unwrap().unwrap();
    assert_eq!(first.outcome, ResultOutcome::Continued);
    let run = t
        .queue
        .wait_for_run(env.run_id, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(run.len() >= 2);
    assert_eq!(run.last().unwrap().outcome, ResultOutcome::Succeeded);
    let ttl: i64 = redis::cmd("TTL")
        .arg(t.queue.keys().result(&env.job_id))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(
        ttl > 2 * 86_400 && ttl <= 3 * 86_400,
        "retention of 3 days, ttl={ttl}"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(t.queue.keys().run(&env.run_id))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(ttl > 0);
    // A redelivery of a finished part is not run again.
    assert_eq!(
        process_delivery(&t.deps, QueueClass::Diag, "p0-again", &env.to_bytes())
            .await
            .unwrap(),
        Settled::Duplicate
    );
    assert_eq!(
        t.llen(t.queue.keys().active(QueueClass::Diag)).await,
        0,
        "no second continuation"
    );
    t.cleanup().await;
}

/// The result of a cleanup job on `target` that ended `outcome` at `at`.
fn cleanup_result(
    target: &str,
    outcome: ResultOutcome,
    at: chrono::DateTime<chrono::Utc>,
) -> JobResult {
    sessionfleet::testing::job_result(JobKind::Cleanup, target, outcome, serde_json::json!({}), at)
}

#[tokio::test]
async fn target_history_is_bounded_and_newest_first() {
    let t = Ns::new().await;
    let now = chrono::Utc::now();
    for i in 0..(HISTORY_LEN + 30) {
        let r = JobResult {
            duration_ms: i as u64,
            rows_affected: i as u64,
            ..cleanup_result("db1", ResultOutcome::Succeeded, now)
        };
        t.queue.record_result(&r).await.unwrap();
    }
    let runs = t.queue.recent_runs("db1", 1000).await.unwrap();
    assert_eq!(runs.len(), HISTORY_LEN);
    assert_eq!(
        runs[0].rows_affected,
        (HISTORY_LEN + 29) as u64,
        "newest first"
    );
    assert_eq!(t.queue.recent_runs("db1", 5).await.unwrap().len(), 5);
    // Diagnostic jobs stay out of the history.
    let noop = JobEnvelope::noop("t");
    process_delivery(&t.deps, QueueClass::Diag, "n", &noop.to_bytes())
        .await
        .unwrap();
    assert!(t.queue.recent_runs("diag", 10).await.unwrap().is_empty());
    t.cleanup().await;
}

/// Runs older than the retention period (3 days here) are not reported, although every new
/// result keeps the history list itself alive. Fails if a busy target's history reports from
/// runs older than `SESSION_METRICS_RETENTION_DAYS` promises.
#[tokio::test]
async fn target_history_leaves_out_runs_older_than_the_retention() {
    let t = Ns::new().await;
    let now = chrono::Utc::now();
    let old = JobResult {
        rows_affected: 1,
        ..cleanup_result(
            "db1",
            ResultOutcome::Succeeded,
            now - chrono::Duration::days(4),
        )
    };
    let kept = JobResult {
        rows_affected: 2,
        ..cleanup_result(
            "db1",
            ResultOutcome::Succeeded,
            now - chrono::Duration::days(2),
        )
    };
    let new = JobResult {
        rows_affected: 3,
        ..cleanup_result("db1", ResultOutcome::Succeeded, now)
    };
    for r in [&old, &kept, &new] {
        t.queue.record_result(r).await.unwrap();
    }
    let rows: Vec<u64> = t
        .queue
        .recent_runs("db1", 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.rows_affected)
        .collect();
    assert_eq!(rows, [3, 2]);
    t.cleanup().await;
}

/// A full history (the last FLEET_FACTS_RUNS runs) covers only the time since its oldest run:
/// the failure rate is taken over that span, not over the whole day, and the cleanup column
/// is known from the first whole day it covers. Fails if 200 failures in a few seconds read as
/// 200 a day (0.14 a minute, under every threshold).
#[tokio::test]
async fn fleet_facts_measure_rates_over_the_span_the_history_covers() {
    use sessionfleet::dispatch::{FLEET_FACTS_RUNS, fleet_facts};
    let t = Ns::new().await;
    let now = chrono::Utc::now();
    for i in 0..FLEET_FACTS_RUNS {
        let at = now - chrono::Duration::milliseconds((FLEET_FACTS_RUNS - i) as i64);
        let r = JobResult {
            error: Some("boom".into()),
            ..cleanup_result("db1", ResultOutcome::Failed, at)
        };
        t.queue.record_result(&r).await.unwrap();
    }
    let history = t.queue.recent_runs("db1", FLEET_FACTS_RUNS).await.unwrap();
    let facts = fleet_facts(&history, t.queue.history_kept_since()).expect("facts");
    let jobs = facts.jobs.expect("job counts");
    assert_eq!(jobs.failed, FLEET_FACTS_RUNS as u64);
    assert!(
        jobs.window_secs <= 120,
        "the rate's window is the span the history covers: {} s",
        jobs.window_secs
    );
    let oldest = (now - chrono::Duration::milliseconds(FLEET_FACTS_RUNS as i64)).date_naive();
    assert_eq!(facts.cleanup_recorded_from, oldest.succ_opt());
    t.cleanup().await;
}

#[tokio::test]
async fn janitor_removes_finished_tasks_and_dead_workers_and_hands_back_their_jobs() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let done = t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();
    let orphan = t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();
    let _: () = redis::pipe()
        .lrem(k.active(q), 0, &done.task_id)
        .lrem(k.active(q), 0, &orphan.task_id)
        .sadd(k.done(q), &done.task_id)
        .sadd(k.inflight(q, "gone-worker"), &orphan.task_id)
        .zadd(k.apalis_workers(q), "gone-worker", 1)
        .hset(
            format!("{}gone-worker", k.worker_metadata_prefix(q)),
            "backend",
            "x",
        )
        .hset(
            format!("{}older-gone", k.worker_metadata_prefix(q)),
            "backend",
            "x",
        )
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let r = t.queue.janitor_pass("test").await.unwrap();
    assert_eq!(r.finished_tasks, 1);
    assert_eq!((r.dead_workers, r.recovered_jobs), (1, 1));
    assert_eq!(
        r.worker_metadata, 1,
        "the metadata of a worker with no entry left (the dead one's went with it)"
    );
    let exists: bool = redis::cmd("HEXISTS")
        .arg(k.data(q))
        .arg(&done.task_id)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(!exists, "finished task data removed");
    let (id, _) = t.take(q).await.expect("orphaned job handed back");
    assert_eq!(id, orphan.task_id);
    t.cleanup().await;
}

/// A job whose handler panicked ends in apalis' dead set with no result of ours; the janitor
/// makes it a dead letter and records it failed, so a CLI waiting for the run learns of it
/// instead of waiting out its timeout. Fails if no result is recorded.
#[tokio::test]
async fn a_job_the_queue_gave_up_on_is_dead_lettered_and_recorded_failed() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let env = JobEnvelope::noop("t");
    let task = t.queue.enqueue(&env).await.unwrap();
    // What apalis leaves when a handler panics: the task in its dead set, with a reason.
    let _: () = redis::pipe()
        .lrem(k.active(q), 0, &task.task_id)
        .sadd(k.apalis_dead(q), &task.task_id)
        .hset(
            format!("{}:{}", k.meta_prefix(q), task.task_id),
            "result",
            "job panicked: boom",
        )
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let r = t.queue.janitor_pass("test").await.unwrap();
    assert_eq!(r.apalis_dead, 1);
    let letter = t.queue.dead_letter(&env.job_id.to_string()).await.unwrap();
    assert!(letter.is_some_and(|d| d.reason.contains("job panicked: boom")));
    let result = t.queue.result(env.job_id).await.unwrap().expect("a result");
    assert_eq!(result.outcome, ResultOutcome::Failed);
    assert!(
        result
            .error
            .is_some_and(|e| e.contains("job panicked: boom"))
    );
    assert_eq!(t.queue.run_results(env.run_id).await.unwrap().len(), 1);
    t.cleanup().await;
}

/// A delayed job comes due no earlier than its delay, whatever the moment within the second
/// it is enqueued: the jitter of busy-lease delays and retries survives the scheduled set's
/// whole-second scores. Fails if a delay is truncated to whole seconds.
#[tokio::test]
async fn a_delay_is_never_cut_short_by_whole_second_scores() {
    let t = Ns::new().await;
    for delay_ms in [1_001, 1_500, 1_999, 2_500] {
        let before_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let enq = t
            .queue
            .enqueue_with(
                &JobEnvelope::noop("t"),
                EnqueueOptions {
                    delay: Some(Duration::from_millis(delay_ms)),
                },
            )
            .await
            .unwrap();
        let due: u64 = redis::cmd("ZSCORE")
            .arg(t.queue.keys().scheduled(QueueClass::Diag))
            .arg(&enq.task_id)
            .query_async(&mut t.conn())
            .await
            .unwrap();
        assert!(
            due * 1000 >= before_ms + delay_ms,
            "due at {due} s, enqueued at {before_ms} ms with a {delay_ms} ms delay"
        );
        assert!(
            due * 1000 < before_ms + delay_ms + 2_000,
            "and not much later"
        );
    }
    t.cleanup().await;
}

/// Writes the keys of namespace `ns` that never expire — a lease-token counter, a scheduler
/// tick — and a member of apalis' registry, as a fleet leaves them.
async fn plant_unexpiring_keys(c: &mut (impl redis::aio::ConnectionLike + Send), ns: &str) {
    for key in [
        format!("{ns}:lease-token:{{{ns}:default}}"),
        format!("{{sessionfleet:{ns}}}:schedule:cleanup:last"),
    ] {
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .query_async(c)
            .await
            .unwrap();
    }
    let member = Keys::new(ns).apalis_workers(QueueClass::Cleanup);
    let () = redis::cmd("ZADD")
        .arg(sessionfleet::queue::keys::apalis_registry())
        .arg(0)
        .arg(member)
        .query_async(c)
        .await
        .unwrap();
}

/// Keys naming `ns`, and its members of apalis' registry.
async fn keys_and_members(
    c: &mut (impl redis::aio::ConnectionLike + Send),
    ns: &str,
) -> (usize, usize) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{ns}*"))
        .query_async(c)
        .await
        .unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(sessionfleet::queue::keys::apalis_registry())
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await
        .unwrap();
    (
        keys.len(),
        members.iter().filter(|m| m.contains(ns)).count(),
    )
}

/// A test's namespace leaves nothing in Redis: the guard deletes every key that names it,
/// expiring or not, and its entries in apalis' queue registry — and nothing of another
/// namespace.
#[tokio::test]
async fn a_test_namespace_leaves_no_keys_behind() {
    let (mine, other) = (unique_namespace(), unique_namespace());
    let _other_keys = RedisKeysGuard::new(&other);
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for ns in [&mine, &other] {
        plant_unexpiring_keys(&mut c, ns).await;
    }
    drop(RedisKeysGuard::new(&mine));
    assert_eq!(
        keys_and_members(&mut c, &mine).await,
        (0, 0),
        "the namespace's keys are gone"
    );
    assert_eq!(
        keys_and_members(&mut c, &other).await,
        (2, 1),
        "another namespace's keys stay"
    );
}

/// A one-off fleet (the demo) leaves nothing behind: forgetting its namespace deletes its
/// queue keys, lease counters and scheduler ticks (none of which expire) and its members of
/// apalis' registry, and nothing of another namespace.
#[tokio::test]
async fn forgetting_a_namespace_removes_its_keys_and_only_its_keys() {
    let (gone, kept) = (Ns::new().await, Ns::new().await);
    for t in [&gone, &kept] {
        t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();
        plant_unexpiring_keys(&mut t.conn(), t.queue.keys().namespace()).await;
    }
    let left = async |t: &Ns| keys_and_members(&mut t.conn(), t.queue.keys().namespace()).await;
    let before = left(&kept).await;
    assert!(
        before.0 >= 4,
        "the job's keys, the lease's and the schedule's: {before:?}"
    );
    let deleted = gone.queue.forget_namespace().await.unwrap();
    assert!(deleted >= 4, "{deleted}");
    assert_eq!(left(&gone).await, (0, 0), "the namespace is gone");
    assert_eq!(left(&kept).await, before, "another namespace is untouched");
}

/// A cleanup whose target's lease another holder has is deferred: put back with a delay, its
/// attempt unchanged, with no result and no dead letter. Fails if a busy lease is charged an
/// attempt, which would dead-letter a job waiting behind a long maintenance.
#[tokio::test]
async fn a_job_whose_lease_is_held_elsewhere_is_deferred_without_using_an_attempt() {
    use sessionfleet::lease::{self, HolderInfo, LeaseConfig};
    use sessionfleet::ops::cleanup::CleanupParams;
    use sessionfleet::store::Engine;
    use sessionfleet::testing::TestDb;

    let tdb = TestDb::new(Engine::Sqlite).await;
    let ns = unique_namespace();
    let keys = RedisKeysGuard::new(&ns);
    let (db_url, redis) = (tdb.url.clone(), redis_url());
    let namespace = ns.clone();
    let env_of = move |k: &str| match k {
        "DATABASE_URL" => Some(db_url.clone()),
        "REDIS_URL" => Some(redis.clone()),
        "SESSIONFLEET_NAMESPACE" => Some(namespace.clone()),
        _ => None,
    };
    let settings = Settings::resolve(&Overrides::default(), &env_of, None).expect("settings");
    let queue = Queue::connect(&settings).await.expect("connect");
    let t = Ns {
        deps: RunnerDeps {
            settings: Arc::new(settings),
            queue: queue.clone(),
            worker_name: "test-worker".into(),
            shutdown: CancellationToken::new(),
        },
        queue,
        _keys: keys,
    };
    let held = lease::try_acquire(
        &t.queue.connection(),
        &ns,
        "default",
        &HolderInfo::new("another-worker", "job-0"),
        &tdb.db,
        &LeaseConfig::default(),
    )
    .await
    .expect("lease")
    .expect("the lease is free");

    let env = JobEnvelope::new(
        JobKind::Cleanup,
        "default",
        serde_json::to_value(CleanupParams::default()).unwrap(),
        "test",
    );
    let settled = process_delivery(&t.deps, QueueClass::Cleanup, "t1", &env.to_bytes())
        .await
        .unwrap();
    assert_eq!(settled, Settled::Deferred);
    let k = t.queue.keys();
    let tasks: Vec<String> = redis::cmd("ZRANGE")
        .arg(k.scheduled(QueueClass::Cleanup))
        .arg(0)
        .arg(-1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let [task] = tasks.as_slice() else {
        panic!("one deferred job: {tasks:?}")
    };
    let payload: Vec<u8> = redis::cmd("HGET")
        .arg(k.data(QueueClass::Cleanup))
        .arg(task)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let again = JobEnvelope::decode(&payload).expect("the deferred envelope");
    assert_eq!((again.job_id, again.attempt), (env.job_id, env.attempt));
    assert!(t.queue.result(env.job_id).await.unwrap().is_none());
    assert!(t.queue.dead_letters(10).await.unwrap().is_empty());
    assert!(held.release(&t.queue.connection()).await.unwrap());
    t.cleanup().await;
    tdb.drop_db().await;
}

/// A history the retention cut on its oldest day starts part-way through that day: trends
/// have no cleanup figure for it rather than an undercount. Fails if that day is taken as
/// recorded in full.
#[test]
fn a_history_cut_by_the_retention_leaves_its_first_day_unrecorded() {
    use sessionfleet::dispatch::fleet_facts;
    use sessionfleet::queue::RunSummary;
    let day = (chrono::Utc::now() - chrono::Duration::days(3)).date_naive();
    let at = |h: u32| day.and_hms_opt(h, 0, 0).unwrap().and_utc();
    let run = RunSummary::from(&cleanup_result("db1", ResultOutcome::Succeeded, at(2)));
    let facts = fleet_facts(std::slice::from_ref(&run), Some(at(1))).expect("facts");
    assert_eq!(facts.cleanup_recorded_from, day.succ_opt());
    let facts = fleet_facts(std::slice::from_ref(&run), None).expect("facts");
    assert_eq!(
        facts.cleanup_recorded_from,
        Some(day),
        "nothing cut: the day is whole"
    );
}

/// A part's progress is published while it runs, refreshed on each new snapshot, and removed
/// when it finishes — unless another part of the run (a takeover) has written its own since,
/// which stays. Fails if finishing deletes whatever is there.
#[tokio::test]
async fn a_part_s_progress_goes_with_it_but_not_a_takeover_s() {
    use sessionfleet::ops::Progress;
    use sessionfleet::ops::progress::Snapshot;
    use sessionfleet::queue::LiveProgress;
    use sessionfleet::queue::progress::Publishing;

    let t = Ns::new().await;
    let env = JobEnvelope::sleep(60, None, "test");
    let progress = Progress::default();
    let publishing = Publishing::start(
        &t.queue,
        env.run_id,
        LiveProgress::starting(&env, "worker-a"),
        progress.subscribe(),
    );
    progress.report(Snapshot {
        rows: 7,
        batches: 2,
    });
    let seen = async {
        loop {
            if let Some(p) = t.queue.progress(env.run_id).await.unwrap()
                && p.done.rows == 7
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let seen = tokio::time::timeout(Duration::from_secs(30), seen)
        .await
        .expect("the new snapshot published");
    assert_eq!(
        (seen.job_id, seen.worker.as_str()),
        (env.job_id, "worker-a")
    );
    assert_eq!(
        t.queue.running_job_run(env.job_id).await.unwrap(),
        Some(env.run_id),
        "a running job leads to its run"
    );
    publishing.finish().await;
    assert_eq!(t.queue.progress(env.run_id).await.unwrap(), None);
    assert_eq!(t.queue.running_job_run(env.job_id).await.unwrap(), None);

    // A takeover's progress outlives the finish of the part it replaced.
    let publishing = Publishing::start(
        &t.queue,
        env.run_id,
        LiveProgress::starting(&env, "worker-a"),
        progress.subscribe(),
    );
    let mut other = env.clone();
    other.job_id = uuid::Uuid::new_v4();
    let takeover = LiveProgress::starting(&other, "worker-b");
    // The first write of the publisher lands before the takeover's.
    tokio::time::timeout(Duration::from_secs(30), async {
        while t.queue.progress(env.run_id).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("first write");
    t.queue.set_progress(env.run_id, &takeover).await.unwrap();
    publishing.finish().await;
    assert_eq!(
        t.queue
            .progress(env.run_id)
            .await
            .unwrap()
            .map(|p| p.job_id),
        Some(other.job_id)
    );
}

/// A job without a result says where it waits: its place in the ready list, the time a
/// delayed retry comes due (under the same job id, as a new task), the worker that took it;
/// nothing once its result is stored, nor for an id never enqueued. Fails if a queued job is
/// not found, or a finished one still reads as waiting.
#[tokio::test]
async fn a_job_without_a_result_says_where_it_waits() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let first = JobEnvelope::noop("t");
    let second = JobEnvelope::new(
        JobKind::Noop,
        "diag",
        serde_json::json!({"fail_attempts": 1}),
        "test",
    );
    t.queue.enqueue(&first).await.unwrap();
    let second_task = t.queue.enqueue(&second).await.unwrap().task_id;
    let waiting = |job| {
        let queue = t.queue.clone();
        async move { queue.waiting_job(job).await.unwrap() }
    };
    let w = waiting(first.job_id).await.expect("first job waits");
    assert_eq!(
        w.state,
        WaitState::Ready {
            position: 1,
            ready: 2
        }
    );
    assert_eq!((w.run_id, w.queue, w.attempt), (first.run_id, q, 1));
    let w = waiting(second.job_id).await.expect("second job waits");
    assert_eq!(
        w.state,
        WaitState::Ready {
            position: 2,
            ready: 2
        }
    );
    assert_eq!(w.task_id, second_task);
    let json = serde_json::to_value(&w).unwrap();
    assert_eq!(
        (json["state"].as_str(), json["position"].as_u64()),
        (Some("ready"), Some(2))
    );
    assert!(
        waiting(uuid::Uuid::new_v4()).await.is_none(),
        "never enqueued"
    );

    // A registered worker takes both (apalis' own fetch): they are claimed, by it.
    let _: () = redis::cmd("ZADD")
        .arg(k.apalis_workers(q))
        .arg(1)
        .arg("probe")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let cfg = t.queue.apalis_config(q);
    let fetched =
        apalis_redis::queries::fetch_next(&mut t.conn(), &WorkerContext::new("probe"), &cfg)
            .await
            .expect("fetch");
    assert_eq!(fetched.len(), 2);
    assert_eq!(
        waiting(first.job_id).await.expect("claimed").state,
        WaitState::Claimed {
            worker: Some("probe".into())
        }
    );

    // The first finishes: its result replaces where it waited.
    let s = process_delivery(&t.deps, q, "t-first", &first.to_bytes())
        .await
        .unwrap();
    assert_eq!(s, Settled::Succeeded);
    assert!(waiting(first.job_id).await.is_none(), "finished");
    // The second fails once: its retry waits, delayed, as attempt 2 under the same job id.
    let before = chrono::Utc::now();
    let s = process_delivery(&t.deps, q, &second_task, &second.to_bytes())
        .await
        .unwrap();
    assert_eq!(s, Settled::Retrying(2));
    let w = waiting(second.job_id).await.expect("the retry waits");
    assert_eq!(w.attempt, 2);
    assert_ne!(w.task_id, second_task, "a retry travels as a new task");
    let WaitState::Delayed { due_at } = w.state else {
        panic!("delayed retry: {w:?}")
    };
    // Delayed by at least the first retry's shortest delay (half of RETRY_BASE, jittered).
    let earliest = before + sessionfleet::queue::RETRY_BASE / 2;
    assert!(
        due_at >= chrono::SubsecRound::trunc_subsecs(earliest, 0),
        "due at {due_at}, failed at {before}"
    );
    t.cleanup().await;
}

/// Takes the next ready task of `q` the way an apalis worker named `worker` claims it (into
/// its inflight set) and registers that worker with a heartbeat long past, as if it died
/// running the task.
async fn claim_as_dead_worker(t: &Ns, q: QueueClass, worker: &str) -> (String, Vec<u8>) {
    let (id, payload) = t.take(q).await.expect("a ready task");
    let k = t.queue.keys();
    let _: () = redis::pipe()
        .sadd(k.inflight(q, worker), &id)
        .zadd(k.apalis_workers(q), worker, 1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    (id, payload)
}

/// A job that kills every worker running it (OOM, SIGKILL) is handed back unchanged each
/// time; once its workers have died the kind's limit of times, the next delivery buries it
/// — a dead letter saying so and a failed result for a waiting CLI — instead of running it.
/// Deliveries that end, whatever their outcome, are no deaths. Fails if hand-backs are not
/// counted (the job would run forever).
#[tokio::test]
async fn a_job_whose_workers_keep_dying_is_dead_lettered_and_recorded_failed() {
    use sessionfleet::queue::janitor::{DeliveryStart, worker_death_limit};
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let env = JobEnvelope::noop("t");
    t.queue.enqueue(&env).await.unwrap();
    let limit = worker_death_limit(JobKind::Noop);
    assert!(limit >= 2, "the test needs a limit of at least two");
    for death in 0..limit {
        let (id, payload) = claim_as_dead_worker(&t, q, &format!("killed-{death}")).await;
        let start = t
            .queue
            .begin_delivery(q, &id, &payload, &env, "test")
            .await
            .unwrap();
        assert_eq!(start, DeliveryStart::Run, "delivery {} runs", death + 1);
        // The process dies here: no end_delivery, no settle. The janitor hands the task back.
        let r = t.queue.janitor_pass("test").await.unwrap();
        assert_eq!((r.dead_workers, r.recovered_jobs), (1, 1));
    }
    let (id, payload) = claim_as_dead_worker(&t, q, "next").await;
    let start = t
        .queue
        .begin_delivery(q, &id, &payload, &env, "test")
        .await
        .unwrap();
    assert_eq!(start, DeliveryStart::Buried);
    let reason = format!("its worker died {limit} times while running it");
    let letter = t
        .queue
        .dead_letter(&env.job_id.to_string())
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(letter.reason, reason);
    let result = t.queue.result(env.job_id).await.unwrap().expect("a result");
    assert_eq!(result.outcome, ResultOutcome::Failed);
    assert_eq!(result.error.as_deref(), Some(reason.as_str()));

    // Deliveries that end are no deaths, however often the task comes back (a lost ack).
    let other = JobEnvelope::noop("t");
    t.queue.enqueue(&other).await.unwrap();
    let (id, payload) = t.take(q).await.unwrap();
    for _ in 0..=limit {
        let start = t
            .queue
            .begin_delivery(q, &id, &payload, &other, "test")
            .await
            .unwrap();
        assert_eq!(start, DeliveryStart::Run);
        t.queue.end_delivery(q, &id).await.unwrap();
    }
    assert!(t.queue.result(other.job_id).await.unwrap().is_none());
    // A delivery settle runs is counted when it starts and ends with its result, in the same
    // round trips: no death left (and none counted at all without that wiring).
    let fresh = JobEnvelope::noop("t");
    t.queue.enqueue(&fresh).await.unwrap();
    let (id, payload) = t.take(q).await.unwrap();
    let s = process_delivery(&t.deps, q, &id, &payload).await.unwrap();
    assert_eq!(s, Settled::Succeeded);
    let unfinished: Option<i64> = redis::cmd("HGET")
        .arg(format!("{}:{id}", t.queue.keys().meta_prefix(q)))
        .arg(sessionfleet::queue::janitor::UNFINISHED_FIELD)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(
        unfinished,
        Some(0),
        "the delivery's start and end both counted"
    );
    let again = process_delivery(&t.deps, q, &id, &payload).await.unwrap();
    assert_eq!(again, Settled::Duplicate);
    t.cleanup().await;
}

/// A malformed task that cannot be dead-lettered (here its run's record is of the wrong
/// type) goes back on the ready list for the next check; the others found with it are still
/// dead-lettered. Fails if one failure loses the rest of the batch.
#[tokio::test]
async fn a_malformed_task_that_cannot_be_buried_goes_back_and_costs_no_other_its_dead_letter() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let stuck = JobEnvelope::noop("t");
    let other = JobEnvelope::noop("t");
    plant_task(&t, q, "stuck", Some(&stuck.to_bytes()), None).await;
    plant_task(&t, q, "other", Some(&other.to_bytes()), None).await;
    let _: () = redis::pipe()
        .rpush(k.active(q), "stuck")
        .ignore()
        .rpush(k.active(q), "other")
        .ignore()
        .set(k.run(&stuck.run_id), "not a list")
        .ignore()
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(t.queue.bury_malformed_ready(q, "test").await.unwrap(), 1);
    assert!(
        t.queue
            .dead_letter(&other.job_id.to_string())
            .await
            .unwrap()
            .is_some(),
        "the other malformed task is dead-lettered"
    );
    let ready: Vec<String> = redis::cmd("LRANGE")
        .arg(k.active(q))
        .arg(0)
        .arg(-1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(ready, vec!["stuck".to_string()], "put back, not lost");
    t.cleanup().await;
}

/// Writes task `id` of `q` the way a broken producer or a half-swept task leaves it: the
/// payload when given, and the meta record `meta` (`None`: no meta record at all).
async fn plant_task(
    t: &Ns,
    q: QueueClass,
    id: &str,
    data: Option<&[u8]>,
    meta: Option<&[(&str, &str)]>,
) {
    let k = t.queue.keys();
    let mut p = redis::pipe();
    if let Some(data) = data {
        p.hset(k.data(q), id, data).ignore();
    }
    if let Some(meta) = meta {
        p.hset_multiple(format!("{}:{id}", k.meta_prefix(q)), meta)
            .ignore();
    }
    let _: () = p.query_async(&mut t.conn()).await.unwrap();
}

const GOOD_META: &[(&str, &str)] = &[
    ("attempts", "0"),
    ("max_attempts", "25"),
    ("status", "Pending"),
];

/// Tasks whose records apalis' fetch cannot decode fail the whole fetch, and the apalis
/// worker with it. Found at the head of the ready list they become dead letters before a
/// fetch sees them; found in a failed worker's inflight set (a fetch got there first) they
/// become dead letters instead of being handed back to fail again. Either way apalis'
/// fetch works on what is left. Fails if the malformed tasks stay on the queue.
#[tokio::test]
async fn tasks_apalis_cannot_fetch_are_dead_lettered_instead_of_failing_fetches() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let first = t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();
    let no_meta = JobEnvelope::noop("t");
    let bad_attempts = JobEnvelope::noop("t");
    let wrong_type = JobEnvelope::noop("t");
    let bad_status = JobEnvelope::noop("t");
    plant_task(&t, q, "no-meta", Some(&no_meta.to_bytes()), None).await;
    plant_task(
        &t,
        q,
        "attempts-abc",
        Some(&bad_attempts.to_bytes()),
        Some(&[
            ("attempts", "abc"),
            ("max_attempts", "25"),
            ("status", "Pending"),
        ]),
    )
    .await;
    plant_task(&t, q, "no-data", None, Some(GOOD_META)).await;
    plant_task(&t, q, "meta-string", Some(&wrong_type.to_bytes()), None).await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}:meta-string", k.meta_prefix(q)))
        .arg("x")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    plant_task(
        &t,
        q,
        "bad-status",
        Some(&bad_status.to_bytes()),
        Some(&[
            ("attempts", "0"),
            ("max_attempts", "25"),
            ("status", "Sleeping"),
        ]),
    )
    .await;
    let mut p = redis::pipe();
    for id in [
        "no-meta",
        "attempts-abc",
        "no-data",
        "meta-string",
        "bad-status",
    ] {
        p.rpush(k.active(q), id).ignore();
    }
    let _: () = p.query_async(&mut t.conn()).await.unwrap();
    let last = t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();

    assert_eq!(t.queue.bury_malformed_ready(q, "test").await.unwrap(), 5);
    let ready: Vec<String> = redis::cmd("LRANGE")
        .arg(k.active(q))
        .arg(0)
        .arg(-1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(ready, [first.task_id.clone(), last.task_id.clone()]);
    for (env, why) in [
        (&no_meta, "no meta record"),
        (&bad_attempts, r#"attempts "abc""#),
        (&wrong_type, "a meta record of type string"),
        (&bad_status, r#"status "Sleeping""#),
    ] {
        let letter = t
            .queue
            .dead_letter(&env.job_id.to_string())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("a dead letter for the task with {why}"));
        assert!(letter.reason.contains(why), "{}", letter.reason);
        let result = t.queue.result(env.job_id).await.unwrap().expect("a result");
        assert_eq!(result.outcome, ResultOutcome::Failed);
    }
    let undecodable = t.queue.dead_letter("task:no-data").await.unwrap();
    assert!(undecodable.is_some_and(|d| d.reason.contains("no payload")));
    let left: u64 = redis::cmd("EXISTS")
        .arg(format!("{}:meta-string", k.meta_prefix(q)))
        .arg(format!("{}:no-data", k.meta_prefix(q)))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(left, 0, "the damaged records go with their tasks");

    let cfg = t.queue.apalis_config(q);
    let probe = WorkerContext::new("probe");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let _: () = redis::cmd("ZADD")
        .arg(k.apalis_workers(q))
        .arg(now)
        .arg("probe")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let fetched = apalis_redis::queries::fetch_next(&mut t.conn(), &probe, &cfg)
        .await
        .expect("apalis fetches what is left");
    assert_eq!(fetched.len(), 2);

    // A fetch that got there first: it fails and leaves its batch claimed.
    let good = t.queue.enqueue(&JobEnvelope::noop("t")).await.unwrap();
    plant_task(
        &t,
        q,
        "late-no-meta",
        Some(&JobEnvelope::noop("t").to_bytes()),
        None,
    )
    .await;
    let _: () = redis::cmd("RPUSH")
        .arg(k.active(q))
        .arg("late-no-meta")
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let failed = apalis_redis::queries::fetch_next(&mut t.conn(), &probe, &cfg).await;
    assert!(
        failed.is_err(),
        "apalis' fetch fails on a task with no meta (the defect)"
    );
    assert_eq!(
        t.queue
            .bury_malformed_claimed(q, "probe", "test")
            .await
            .unwrap(),
        1
    );
    let claimed: Vec<String> = redis::cmd("SMEMBERS")
        .arg(k.inflight(q, "probe"))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(claimed.contains(&good.task_id));
    assert!(!claimed.contains(&"late-no-meta".to_string()));
    t.cleanup().await;
}

/// One task apalis gave up on whose records the janitor cannot use costs no other task its
/// dead letter: a meta record of the wrong type still gives a dead letter (with no reason
/// from apalis), a task whose failure cannot be recorded goes back to apalis' dead set for
/// the next pass, and the rest are adopted. Fails if the pass stops at the first error
/// (the tasks it had already taken out of the set would be lost).
#[tokio::test]
async fn a_task_the_janitor_cannot_adopt_costs_no_other_task_its_dead_letter() {
    let t = Ns::new().await;
    let q = QueueClass::Diag;
    let k = t.queue.keys().clone();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let env = JobEnvelope::noop("t");
        let task = t.queue.enqueue(&env).await.unwrap();
        let _: () = redis::pipe()
            .lrem(k.active(q), 0, &task.task_id)
            .sadd(k.apalis_dead(q), &task.task_id)
            .hset(
                format!("{}:{}", k.meta_prefix(q), task.task_id),
                "result",
                "job panicked: boom",
            )
            .query_async(&mut t.conn())
            .await
            .unwrap();
        tasks.push((env, task.task_id));
    }
    let (wrong_meta, stuck) = (&tasks[0], &tasks[1]);
    let _: () = redis::pipe()
        .del(format!("{}:{}", k.meta_prefix(q), wrong_meta.1))
        .set(format!("{}:{}", k.meta_prefix(q), wrong_meta.1), "x")
        // Recording this one's failure appends to its run's list, here a string.
        .set(k.run(&stuck.0.run_id), "x")
        .query_async(&mut t.conn())
        .await
        .unwrap();

    let r = t
        .queue
        .janitor_pass("test")
        .await
        .expect("the pass goes on");
    assert_eq!(r.apalis_dead, 3);
    for (env, _) in [&tasks[0], &tasks[2], &tasks[3]] {
        let letter = t.queue.dead_letter(&env.job_id.to_string()).await.unwrap();
        assert!(letter.is_some(), "job {} dead-lettered", env.job_id);
        let result = t.queue.result(env.job_id).await.unwrap().expect("a result");
        assert_eq!(result.outcome, ResultOutcome::Failed);
    }
    let letter = t
        .queue
        .dead_letter(&wrong_meta.0.job_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(letter.reason.contains("unreadable"), "{}", letter.reason);
    let kept: bool = redis::cmd("SISMEMBER")
        .arg(k.apalis_dead(q))
        .arg(&stuck.1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert!(
        kept,
        "the task whose failure could not be recorded waits for the next pass"
    );
    let _: () = redis::cmd("DEL")
        .arg(k.run(&stuck.0.run_id))
        .query_async(&mut t.conn())
        .await
        .unwrap();
    t.cleanup().await;
}

/// A namespace whose worker serves one `default` target at `db_url`.
async fn ns_for_database(db_url: &str) -> Ns {
    let ns = unique_namespace();
    let keys = RedisKeysGuard::new(&ns);
    let (db_url, redis) = (db_url.to_string(), redis_url());
    let namespace = ns.clone();
    let env_of = move |k: &str| match k {
        "DATABASE_URL" => Some(db_url.clone()),
        "REDIS_URL" => Some(redis.clone()),
        "SESSIONFLEET_NAMESPACE" => Some(namespace.clone()),
        _ => None,
    };
    let settings = Settings::resolve(&Overrides::default(), &env_of, None).expect("settings");
    let queue = Queue::connect(&settings).await.expect("connect");
    Ns {
        deps: RunnerDeps {
            settings: Arc::new(settings),
            queue: queue.clone(),
            worker_name: "test-worker".into(),
            shutdown: CancellationToken::new(),
        },
        queue,
        _keys: keys,
    }
}

/// A health-report job for the `default` target.
fn health_report_job() -> JobEnvelope {
    use sessionfleet::ops::analytics::{AnalyticsParams, HealthParams};
    JobEnvelope::new(
        JobKind::Analytics,
        "default",
        serde_json::to_value(AnalyticsParams::HealthReport(HealthParams::default())).unwrap(),
        "test",
    )
}

/// A target that is down is tried once for the jobs waiting on it and those that come within
/// the failure's memory: they fail at once with its error, retried later as before. Fails if
/// each job makes its own attempt (up to a minute each against a host that drops packets,
/// one after another, each holding a job slot of the worker).
#[tokio::test]
async fn a_target_that_is_down_is_tried_once_for_the_jobs_that_wait_on_it() {
    use sessionfleet::dispatch::{self, CONNECT_FAILURE_MEMORY, PoolRole};
    use sessionfleet::testing::ClosedPort;

    let down = ClosedPort::new();
    let url = format!("postgres://postgres@127.0.0.1:{}/down", down.port());
    // Two jobs at once: one makes the attempt, the other waits for it and takes its error.
    let (a, b) = tokio::join!(
        dispatch::shared_db(&url, PoolRole::Reads),
        dispatch::shared_db(&url, PoolRole::Reads)
    );
    let (a, b) = (a.expect_err("down"), b.expect_err("down"));
    assert_eq!(dispatch::connect_attempts(&url, PoolRole::Reads).await, 1);
    let (tried, waited) = if a.is_remembered() { (b, a) } else { (a, b) };
    assert!(
        !tried.is_remembered() && waited.is_remembered(),
        "{tried} / {waited}"
    );
    assert!(
        waited.to_string().starts_with(&tried.to_string()),
        "the same error: {tried} / {waited}"
    );
    assert!(!tried.is_permanent() && !waited.is_permanent());

    assert!(
        waited.retry_in() > std::time::Duration::ZERO
            && waited.retry_in() <= CONNECT_FAILURE_MEMORY
    );

    // A job that comes later, within the memory: not tried, and deferred past the memory's
    // end without spending an attempt (its retries would all fall inside it otherwise, and a
    // short restart would use up every attempt of the job).
    let t = ns_for_database(&url).await;
    let env = health_report_job();
    let left = dispatch::shared_db(&url, PoolRole::Reads)
        .await
        .expect_err("still remembered")
        .retry_in();
    let before = chrono::Utc::now();
    let settled = process_delivery(&t.deps, env.queue(), "t1", &env.to_bytes())
        .await
        .unwrap();
    assert_eq!(settled, Settled::Deferred);
    let w = t
        .queue
        .waiting_job(env.job_id)
        .await
        .unwrap()
        .expect("it waits");
    assert_eq!(w.attempt, 1, "no attempt spent");
    // Due no sooner than the memory's end (less a second for the delivery itself).
    let WaitState::Delayed { due_at } = w.state else {
        panic!("deferred past the memory: {w:?}")
    };
    let earliest = before + left.saturating_sub(std::time::Duration::from_secs(1));
    assert!(
        due_at >= chrono::SubsecRound::trunc_subsecs(earliest, 0),
        "due at {due_at}, memory ends about {earliest}"
    );
    assert_eq!(dispatch::connect_attempts(&url, PoolRole::Reads).await, 1);
    // The writers' pool of the same target is a pool of its own.
    assert_eq!(dispatch::connect_attempts(&url, PoolRole::Writes).await, 0);
    t.cleanup().await;
}

/// A target URL its driver cannot read is a permanent failure (a job on it is not retried;
/// the configuration refuses such URLs at load, so this guards what slips past). One whose
/// database refuses it — a SQLite file that is not there, a database the server does not
/// have — is retried: a restore, a late volume or a password rotation can make it right
/// without a change here. Fails if those are dead-lettered at their first failure.
#[tokio::test]
async fn a_refused_database_is_retried_and_only_an_unreadable_url_is_permanent() {
    use sessionfleet::dispatch::{self, PoolRole};
    let unreadable =
        dispatch::shared_db("postgres://postgres@127.0.0.1:99999/app", PoolRole::Reads)
            .await
            .expect_err("port out of range");
    assert!(unreadable.is_permanent(), "{unreadable}");

    let dir = tempfile::tempdir().unwrap();
    let missing_file = dir.path().join("missing.db");
    for (url, why) in [
        (
            format!("sqlite://{}", missing_file.display()),
            "does not exist",
        ),
        (
            "postgres://postgres@127.0.0.1:5432/sessionfleet_no_such_database".to_string(),
            "sessionfleet_no_such_database",
        ),
    ] {
        let t = ns_for_database(&url).await;
        let env = health_report_job();
        let settled = process_delivery(&t.deps, env.queue(), "t1", &env.to_bytes())
            .await
            .unwrap();
        assert_eq!(settled, Settled::Retrying(2), "{url}");
        let failure = dispatch::shared_db(&url, PoolRole::Reads)
            .await
            .expect_err("still refused");
        assert!(
            !failure.is_permanent() && failure.to_string().contains(why),
            "{url}: {failure}"
        );
        t.cleanup().await;
    }
    assert!(!missing_file.exists(), "no database file was created");
}

/// apalis' orphan re-enqueue removes a dead worker's entry but leaves its
/// `workers:metadata:<name>` hash, with no TTL, so the janitor walks the keyspace for such
/// hashes. On a Redis holding far more keys than one pass visits, successive passes must
/// carry on where the last stopped: here each pass may take one `SCAN` step among thousands
/// of other keys. Fails if a pass starts over from the beginning (the orphans beyond the
/// first step are never found) or if a live worker's hash or a look-alike key goes.
#[tokio::test]
async fn orphaned_worker_metadata_is_found_however_many_keys_one_pass_cannot_visit() {
    use sessionfleet::queue::keys::SLOT_TAG;
    let t = Ns::new().await;
    let k = t.queue.keys().clone();
    let ns = k.namespace().to_string();
    let mut c = t.conn();
    for chunk in (0..6000).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.set(format!("{SLOT_TAG}:{ns}:filler:{i}"), 1).ignore();
        }
        let _: () = p.query_async(&mut c).await.unwrap();
    }
    let mut orphans = Vec::new();
    let mut p = redis::pipe();
    for (i, q) in QueueClass::ALL.into_iter().cycle().take(24).enumerate() {
        let key = format!("{}gone-{i}", k.worker_metadata_prefix(q));
        p.hset(&key, "backend", "x").ignore();
        orphans.push(key);
    }
    let live = format!("{}live", k.worker_metadata_prefix(QueueClass::Cleanup));
    let look_alike = format!("{SLOT_TAG}:{ns}:sf:history:a:workers:metadata:b");
    p.hset(&live, "backend", "x")
        .ignore()
        .zadd(k.apalis_workers(QueueClass::Cleanup), "live", 1)
        .ignore()
        .rpush(&look_alike, "x")
        .ignore();
    let _: () = p.query_async(&mut c).await.unwrap();

    // A whole walk takes about (hash table size / SCAN's COUNT) steps; allow several.
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    let passes = 4 * keys.next_power_of_two() / sessionfleet::scan::SCAN_COUNT as u64 + 50;
    let mut removed = 0;
    let mut left = orphans.len();
    for _ in 0..passes {
        removed += t.queue.drop_orphan_worker_metadata(1).await.unwrap();
        let mut p = redis::pipe();
        for key in &orphans {
            p.exists(key);
        }
        let exist: Vec<bool> = p.query_async(&mut c).await.unwrap();
        left = exist.iter().filter(|e| **e).count();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "orphaned metadata left after {passes} passes");
    assert_eq!(removed, orphans.len() as u64);
    let (live_exists, look_alike_exists): (bool, bool) = redis::pipe()
        .exists(&live)
        .exists(&look_alike)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(live_exists, "a registered worker's metadata stays");
    assert!(
        look_alike_exists,
        "a key of no queue's worker metadata stays"
    );
    t.cleanup().await;
}

/// The malformed-task check runs every poll interval on every worker, a few commands per id
/// it looks at, so it looks only as deep as the queue's next two fetches: two ids on an
/// operation queue (one job per fetch), not the diagnostic queue's two hundred. Fails if an
/// operation queue is checked as deep as the diagnostic one.
#[tokio::test]
async fn the_ready_check_looks_as_deep_as_the_queue_s_next_two_fetches() {
    let t = Ns::new().await;
    let q = QueueClass::Cleanup;
    let k = t.queue.keys().clone();
    assert_eq!(t.queue.ready_check_depth(q), 2);
    assert_eq!(t.queue.ready_check_depth(QueueClass::Diag), 200);
    for id in ["good-1", "good-2"] {
        plant_task(
            &t,
            q,
            id,
            Some(&JobEnvelope::noop("t").to_bytes()),
            Some(GOOD_META),
        )
        .await;
    }
    plant_task(
        &t,
        q,
        "no-meta",
        Some(&JobEnvelope::noop("t").to_bytes()),
        None,
    )
    .await;
    let _: () = redis::cmd("RPUSH")
        .arg(k.active(q))
        .arg(&["good-1", "good-2", "no-meta"])
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(
        t.queue.bury_malformed_ready(q, "test").await.unwrap(),
        0,
        "the third id is beyond the next two fetches"
    );
    assert_eq!(t.llen(k.active(q)).await, 3);
    t.take(q).await.expect("the first good task");
    assert_eq!(t.queue.bury_malformed_ready(q, "test").await.unwrap(), 1);
    assert_eq!(t.llen(k.active(q)).await, 1);
    t.cleanup().await;
}

/// Dead letters beyond the cap are dropped oldest first, a chunk per step, down to exactly
/// the cap.
#[tokio::test]
async fn dead_letters_beyond_the_cap_are_trimmed_in_chunks_to_exactly_the_cap() {
    let t = Ns::new().await;
    let k = t.queue.keys().clone();
    let mut p = redis::pipe();
    for i in 0..25u64 {
        let id = format!("d{i:02}");
        p.hset(k.dead_items(), &id, "{}")
            .ignore()
            .zadd(k.dead_index(), &id, 1000 + i)
            .ignore();
    }
    let _: () = p.query_async(&mut t.conn()).await.unwrap();
    assert_eq!(t.queue.trim_dead_letters_to(10, 4).await.unwrap(), 15);
    let kept: Vec<String> = redis::cmd("ZRANGE")
        .arg(k.dead_index())
        .arg(0)
        .arg(-1)
        .query_async(&mut t.conn())
        .await
        .unwrap();
    let newest: Vec<String> = (15..25).map(|i| format!("d{i:02}")).collect();
    assert_eq!(kept, newest, "the newest ten are kept");
    let items: u64 = redis::cmd("HLEN")
        .arg(k.dead_items())
        .query_async(&mut t.conn())
        .await
        .unwrap();
    assert_eq!(items, 10);
    assert_eq!(t.queue.trim_dead_letters_to(10, 4).await.unwrap(), 0);
    assert_eq!(t.queue.purge_dead(None).await.unwrap(), 10);
    assert_eq!(t.zcard(k.dead_index()).await, 0);
    t.cleanup().await;
}
