//! The fleet end to end: real `sessionfleet-worker` processes against real Redis. Timeouts
//! here only keep a broken build from hanging; nothing asserts on speed.

use std::time::{Duration, Instant};

use sessionfleet::jobs::{JobEnvelope, QueueClass};
use sessionfleet::queue::{EnqueueOptions, Queue, ResultOutcome};
use sessionfleet::testing::{RedisKeysGuard, redis_url, unique_namespace};
use sessionfleet_e2e::*;

const HANG_GUARD: Duration = Duration::from_secs(240);

async fn live_on(queue: &Queue, q: QueueClass, n: usize) -> Vec<sessionfleet::queue::WorkerInfo> {
    eventually(HANG_GUARD, "live workers", || async {
        let live = queue.live_workers(Some(q)).await.ok()?;
        (live.len() >= n).then_some(live)
    })
    .await
}

async fn all_results(queue: &Queue, ids: &[uuid::Uuid]) -> bool {
    let mut c = queue.connection();
    for chunk in ids.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|id| queue.keys().result(id)).collect();
        let n: u64 = redis::cmd("EXISTS")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .unwrap_or(0);
        if n as usize != chunk.len() {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_enqueued_by_another_process_is_picked_up_and_endpoints_answer() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "pickup");
    spec.queues = "diag".into();
    let w = Worker::start(&spec);
    let live = live_on(&queue, QueueClass::Diag, 1).await;
    assert!(
        queue
            .live_workers(Some(QueueClass::Cleanup))
            .await
            .unwrap()
            .is_empty(),
        "nobody consumes cleanup"
    );

    let env = JobEnvelope::noop("e2e");
    let enq = queue.enqueue(&env).await.unwrap();
    assert!(enq.accepted);
    let r = queue
        .wait_for_result(env.job_id, HANG_GUARD)
        .await
        .expect("result");
    assert_eq!(r.outcome, ResultOutcome::Succeeded);
    assert_eq!(r.worker, live[0].name);

    let (code, body) = http_get(w.metrics_port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = eventually(HANG_GUARD, "readyz", || async {
        let r = http_get(w.metrics_port, "/readyz").await?;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(w.metrics_port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("sessionfleet_jobs_total"), "{metrics}");
    assert!(metrics.contains(r#"outcome="succeeded""#), "{metrics}");
    // A histogram (buckets), not a summary, so `histogram_quantile` can read it.
    assert!(
        metrics.contains(r#"sessionfleet_job_duration_seconds_bucket{kind="noop",le="0.01"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sessionfleet_job_duration_seconds_bucket{kind="noop",le="+Inf"} 1"#),
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "noop"), ("outcome", "succeeded")]
        ),
        Some(1.0),
        "{metrics}"
    );

    // The same job delivered again (a redelivery after a lost ack): its result is kept, the
    // delivery is counted a duplicate and not run.
    let k = queue.keys().clone();
    let mut c = queue.connection();
    let _: () = redis::pipe()
        .hset(k.data(QueueClass::Diag), "again-1", env.to_bytes())
        .hset_multiple(
            format!("{}:again-1", k.meta_prefix(QueueClass::Diag)),
            &[
                ("attempts", "0"),
                ("max_attempts", "25"),
                ("status", "Pending"),
            ],
        )
        .rpush(k.active(QueueClass::Diag), "again-1")
        .query_async(&mut c)
        .await
        .unwrap();
    let metrics = metrics_until(w.metrics_port, HANG_GUARD, "the duplicate counted", |b| {
        metric_sample(
            b,
            "sessionfleet_jobs_total",
            &[("kind", "noop"), ("outcome", "duplicate")],
        )
        .is_some()
    })
    .await;
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "noop"), ("outcome", "duplicate")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "noop"), ("outcome", "succeeded")]
        ),
        Some(1.0),
        "not run again: {metrics}"
    );
    let kept = queue.result(env.job_id).await.unwrap().expect("result");
    assert_eq!(kept.finished_at, r.finished_at, "the first result stays");
    drop_namespace(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_enqueued_at_once_are_all_processed() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "10k");
    spec.queues = "diag".into();
    spec.concurrency = 64;
    let _w = Worker::start(&spec);
    live_on(&queue, QueueClass::Diag, 1).await;

    let jobs: Vec<JobEnvelope> = (0..10_000).map(|_| JobEnvelope::noop("e2e")).collect();
    let ids: Vec<_> = jobs.iter().map(|j| j.job_id).collect();
    queue
        .enqueue_batch(jobs, EnqueueOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    eventually(HANG_GUARD, "10,000 results", || async {
        all_results(&queue, &ids).await.then_some(())
    })
    .await;
    println!(
        "10,000 no-op jobs processed in {:?} (debug build)",
        started.elapsed()
    );
    assert!(queue.dead_letters(1).await.unwrap().is_empty());
    drop_namespace(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_dead_lettered_while_valid_jobs_keep_flowing() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "garbage");
    spec.queues = "diag".into();
    let w = Worker::start(&spec);
    live_on(&queue, QueueClass::Diag, 1).await;

    let k = queue.keys().clone();
    let q = QueueClass::Diag;
    let cleanup = JobEnvelope::new(
        sessionfleet::jobs::JobKind::Cleanup,
        "default",
        serde_json::json!({}),
        "x",
    );
    let samples: Vec<Vec<u8>> = vec![
        b"\x00\x01\xfe\xff binary".to_vec(),
        b"{ truncated".to_vec(),
        b"[]".to_vec(),
        b"{}".to_vec(),
        br#"{"v":2,"kind":"noop"}"#.to_vec(),
        br#"{"v":1,"kind":"noop"}"#.to_vec(),
        br#"{"v":1,"job_id":"nope","kind":"drop_everything"}"#.to_vec(),
        cleanup.to_bytes(), // a valid job on the wrong queue
        b"null".to_vec(),
        "\u{1F4A3}".repeat(10).into_bytes(),
    ];
    let mut valid = Vec::new();
    let mut c = queue.connection();
    for i in 0..100 {
        // A broken producer writing apalis' structures directly.
        let id = format!("bad-{i:03}");
        let _: () = redis::pipe()
            .hset(k.data(q), &id, &samples[i % samples.len()])
            .hset_multiple(
                format!("{}:{id}", k.meta_prefix(q)),
                &[
                    ("attempts", "0"),
                    ("max_attempts", "25"),
                    ("status", "Pending"),
                ],
            )
            .rpush(k.active(q), &id)
            .query_async(&mut c)
            .await
            .unwrap();
        let env = JobEnvelope::noop("e2e");
        valid.push(env.job_id);
        queue.enqueue(&env).await.unwrap();
    }
    eventually(HANG_GUARD, "valid results", || async {
        all_results(&queue, &valid).await.then_some(())
    })
    .await;
    let dead = eventually(HANG_GUARD, "100 dead letters", || async {
        let d = queue.dead_letters(1000).await.ok()?;
        (d.len() >= 100).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 100);
    assert!(
        dead.iter()
            .all(|d| d.id.starts_with("task:bad-") && !d.reason.is_empty())
    );
    assert!(
        dead.iter()
            .any(|d| d.reason.contains("arrived on queue diag"))
    );
    assert!(
        dead.iter()
            .any(|d| d.reason.contains("unsupported envelope version 2"))
    );
    // Still healthy afterwards.
    let after = JobEnvelope::noop("e2e");
    queue.enqueue(&after).await.unwrap();
    queue
        .wait_for_result(after.job_id, HANG_GUARD)
        .await
        .expect("worker still running");
    assert!(
        !w.log_text().contains("restarting under a new name"),
        "garbage must not kill the queue worker"
    );
    // The metrics agree: 100 dead letters present (the gauge, refreshed every few seconds)
    // and added on the diag queue; those that reached the job handler (the rest apalis could
    // not fetch and were buried before) counted as dead-lettered jobs of no known kind; the
    // valid jobs (and the one after) succeeded.
    let handled = dead
        .iter()
        .filter(|d| !d.reason.starts_with("its queue record is damaged"))
        .count() as f64;
    assert!(handled > 0.0, "some garbage reached the handler: {dead:?}");
    let metrics = metrics_until(
        w.metrics_port,
        HANG_GUARD,
        "the dead-letter gauge at 100",
        |b| metric_sample(b, "sessionfleet_dead_letters", &[]) == Some(100.0),
    )
    .await;
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_dead_letters_total",
            &[("queue", "diag")]
        ),
        Some(100.0),
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "unknown"), ("outcome", "dead_lettered")]
        ),
        Some(handled),
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "noop"), ("outcome", "succeeded")]
        ),
        Some(101.0),
        "{metrics}"
    );
    drop_namespace(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_of_a_killed_worker_completes_on_another_worker() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "victim");
    spec.queues = "diag".into();
    let mut victim = Worker::start(&spec);
    let first = live_on(&queue, QueueClass::Diag, 1).await;

    // Killed as soon as the registry (beat: 500 ms) shows it running the job, long before
    // the job could end; the rescuer starts only afterwards, so the victim never has the
    // chance to finish it first.
    let env = JobEnvelope::sleep(10_000, None, "e2e");
    queue.enqueue(&env).await.unwrap();
    eventually(HANG_GUARD, "victim running the job", || async {
        let live = queue.live_workers(Some(QueueClass::Diag)).await.ok()?;
        live.iter()
            .any(|w| w.name == first[0].name && w.running == 1)
            .then_some(())
    })
    .await;
    victim.kill9();
    let killed_at = Instant::now();
    assert!(
        queue.result(env.job_id).await.unwrap().is_none(),
        "the victim had not finished the job: {}",
        victim.log_text()
    );
    spec.label = "rescuer".into();
    let _rescuer = Worker::start(&spec);

    let r = queue
        .wait_for_result(env.job_id, HANG_GUARD)
        .await
        .expect("job completed after the kill");
    let recovery = killed_at.elapsed();
    println!(
        "recovery after kill -9: {recovery:?} (orphan timeout {:?})",
        sessionfleet::queue::HEARTBEAT_INTERVAL * sessionfleet::queue::MISSED_HEARTBEATS as u32
    );
    assert_eq!(r.outcome, ResultOutcome::Succeeded);
    assert_ne!(r.worker, first[0].name, "finished by the other worker");
    drop_namespace(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_reconnect_after_a_redis_restart_and_every_job_completes() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut spec = WorkerSpec::new(&url, &ns, &format!("rr{i}"));
        spec.queues = "diag".into();
        workers.push(Worker::start(&spec));
    }
    live_on(&queue, QueueClass::Diag, 2).await;

    let jobs: Vec<JobEnvelope> = (0..120)
        .map(|_| JobEnvelope::sleep(200, None, "e2e"))
        .collect();
    let ids: Vec<_> = jobs.iter().map(|j| j.job_id).collect();
    queue
        .enqueue_batch(jobs, EnqueueOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.shutdown_save();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    let restarted = Instant::now();

    eventually(HANG_GUARD, "every job after the Redis restart", || async {
        all_results(&queue, &ids).await.then_some(())
    })
    .await;
    println!(
        "all 120 jobs complete {:?} after Redis came back",
        restarted.elapsed()
    );
    // Jobs enqueued after the restart are picked up too.
    let after = JobEnvelope::noop("e2e");
    queue.enqueue(&after).await.unwrap();
    queue
        .wait_for_result(after.job_id, HANG_GUARD)
        .await
        .expect("pickup after restart");
    // Each worker lived through it: it still answers.
    for w in &workers {
        let health = http_get(w.metrics_port, "/healthz").await;
        assert_eq!(health.map(|(code, _)| code), Some(200), "{}", w.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_enqueues_the_continuation_and_exits_zero() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "sigterm");
    spec.queues = "diag".into();
    let mut w = Worker::start(&spec);
    let live = live_on(&queue, QueueClass::Diag, 1).await;

    let env = JobEnvelope::sleep(60_000, Some(30_000), "e2e");
    queue.enqueue(&env).await.unwrap();
    eventually(HANG_GUARD, "job running", || async {
        let l = queue.live_workers(Some(QueueClass::Diag)).await.ok()?;
        l.iter().any(|x| x.running == 1).then_some(())
    })
    .await;
    w.signal("TERM");
    let status = w.wait_exit(HANG_GUARD).expect("worker exited");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        w.log_text()
    );

    let part = queue
        .result(env.job_id)
        .await
        .unwrap()
        .expect("part result stored");
    assert_eq!(part.outcome, ResultOutcome::Continued);
    assert_eq!(part.report["stopped_by"], "shutdown");
    let mut c = queue.connection();
    let ids: Vec<String> = redis::cmd("LRANGE")
        .arg(queue.keys().active(QueueClass::Diag))
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ids.len(), 1, "one continuation waiting");
    let payload: Vec<u8> = redis::cmd("HGET")
        .arg(queue.keys().data(QueueClass::Diag))
        .arg(&ids[0])
        .query_async(&mut c)
        .await
        .unwrap();
    let next = JobEnvelope::decode(&payload).unwrap();
    assert_eq!((next.run_id, next.part), (env.run_id, 1));
    assert!(next.params["millis"].as_u64().unwrap() < 60_000);
    assert!(
        queue
            .live_workers(None)
            .await
            .unwrap()
            .iter()
            .all(|x| x.name != live[0].name),
        "record removed"
    );
    drop_namespace(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_host_and_pid_is_never_refused() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "pid1-a");
    spec.queues = "diag".into();
    spec.pid_namespace = true; // pid 1, as in a container, on every start
    let mut first = Worker::start(&spec);
    let a = live_on(&queue, QueueClass::Diag, 1).await;
    assert_eq!(a[0].pid, 1);
    first.signal("TERM");
    first.wait_exit(HANG_GUARD).expect("first stopped");
    // apalis 1.0 leaves a gracefully stopped worker registered (defect 5); a name made of host
    // and pid alone would now be refused as "still active".
    let left: Vec<(String, u64)> = queue.apalis_workers(QueueClass::Diag).await.unwrap();
    assert!(
        !left.is_empty(),
        "expected apalis' stale entry to still be there"
    );

    spec.label = "pid1-b".into();
    let second = Worker::start(&spec);
    let b = live_on(&queue, QueueClass::Diag, 1).await;
    assert_eq!((b[0].pid, &b[0].host), (1, &a[0].host));
    assert_ne!(b[0].name, a[0].name);
    let env = JobEnvelope::noop("e2e");
    queue.enqueue(&env).await.unwrap();
    let r = queue
        .wait_for_result(env.job_id, HANG_GUARD)
        .await
        .expect("restarted worker runs jobs");
    assert_eq!(r.worker, b[0].name);
    assert!(
        !second.log_text().contains("still active"),
        "{}",
        second.log_text()
    );
    drop_namespace(&queue).await;
}

/// TLS Redis (`rediss://`) with a password and a private CA: the worker and the CLI run a
/// cleanup through it when told the CA (`REDIS_CA_CERT`); without it the certificate is
/// refused in one line; the password appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_a_password_and_a_private_ca_carries_the_fleet() {
    use sessionfleet::seed::{SeedParams, seed_demo};
    use sessionfleet::store::{Engine, SchemaVersion};
    use sessionfleet::testing::TestDb;

    const PASSWORD: &str = "tls-s3cret-pw";
    let (redis, ca) = RedisServer::start_tls(PASSWORD);
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let t = TestDb::new(Engine::Sqlite).await;
    seed_demo(
        &t.db,
        &SeedParams::new(400, 21, SchemaVersion::V2, chrono::Utc::now().naive_utc()),
    )
    .await
    .unwrap();
    let ca = ca.display().to_string();
    let mut spec = WorkerSpec::new(&url, &ns, "tls");
    spec.queues = "cleanup".into();
    spec.env.push(("DATABASE_URL".into(), t.url.clone()));
    spec.env.push(("REDIS_CA_CERT".into(), ca.clone()));
    let w = Worker::start(&spec);

    let cli = |args: &[&str], with_ca: bool| {
        let mut c = binary("sessionfleet");
        c.args(args)
            .env("DATABASE_URL", &t.url)
            .env("REDIS_URL", &url)
            .env("SESSIONFLEET_NAMESPACE", &ns);
        if with_ca {
            c.env("REDIS_CA_CERT", &ca);
        }
        c.output().expect("run sessionfleet")
    };
    let out = cli(&["cleanup", "--once", "--json", "--timeout", "120"], true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["expired_sessions_cleaned"].as_i64().unwrap() > 0,
        "{report}"
    );

    let refused = cli(&["jobs", "dead"], false);
    assert_eq!(refused.status.code(), Some(5), "fleet unreachable");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    for text in [stderr.to_string(), err.to_string(), w.log_text()] {
        assert!(!text.contains(PASSWORD), "password leaked: {text}");
    }
    t.drop_db().await;
}

/// Waits for a live worker on `q` whose name is not in `seen`, and adds it.
async fn new_live_worker(queue: &Queue, q: QueueClass, seen: &mut Vec<String>) -> String {
    let name = eventually(HANG_GUARD, "a new live worker", || async {
        let live = queue.live_workers(Some(q)).await.ok()?;
        live.into_iter().map(|w| w.name).find(|n| !seen.contains(n))
    })
    .await;
    seen.push(name.clone());
    name
}

/// Waits until worker process `name` reports a running job.
async fn running_on(queue: &Queue, q: QueueClass, name: &str) {
    eventually(HANG_GUARD, "the job running", || async {
        let live = queue.live_workers(Some(q)).await.ok()?;
        live.iter()
            .any(|w| w.name == name && w.running == 1)
            .then_some(())
    })
    .await;
}

/// A job that kills every worker process running it (here: kill -9 while it runs, as an
/// OOM kill would) is handed back unchanged each time, and its envelope's attempt never
/// rises. Once its workers have died the kind's limit of times, the next worker dead-letters
/// it and records it failed, so a waiting CLI learns why, instead of running it again. Fails
/// if hand-backs are not counted: the third worker runs the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_killing_its_workers_is_dead_lettered() {
    use sessionfleet::jobs::JobKind;
    use sessionfleet::queue::janitor::worker_death_limit;
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let q = QueueClass::Diag;
    let mut spec = WorkerSpec::new(&url, &ns, "poison-0");
    spec.queues = "diag".into();
    spec.concurrency = 1;
    let mut seen = Vec::new();
    let mut current = Worker::start(&spec);
    let mut current_name = new_live_worker(&queue, q, &mut seen).await;

    let env = JobEnvelope::sleep(600_000, Some(600_000), "e2e");
    queue.enqueue(&env).await.unwrap();
    let limit = worker_death_limit(JobKind::Sleep);
    for death in 1..=limit {
        running_on(&queue, q, &current_name).await;
        // The next worker is up before this one dies, so it is the one that gets the job.
        spec.label = format!("poison-{death}");
        let next = Worker::start(&spec);
        let next_name = new_live_worker(&queue, q, &mut seen).await;
        current.kill9();
        (current, current_name) = (next, next_name);
    }

    let r = queue
        .wait_for_result(env.job_id, HANG_GUARD)
        .await
        .expect("a result");
    let reason = format!("its worker died {limit} times while running it");
    assert_eq!(r.outcome, ResultOutcome::Failed, "{r:?}");
    assert_eq!(r.error.as_deref(), Some(reason.as_str()));
    assert_eq!(r.worker, current_name, "buried by the last worker");
    let letter = queue
        .dead_letter(&env.job_id.to_string())
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(letter.reason, reason);
    assert!(
        current.log_text().contains("poison job; dead-lettered"),
        "{}",
        current.log_text()
    );
    drop_namespace(&queue).await;
}

/// A worker told to stop waits for its running jobs, and apalis heartbeats no more while it
/// does; a drain longer than the orphan timeout must not let a peer (its apalis heartbeat
/// re-enqueues orphans) or a janitor hand the running job to another worker. The job here
/// waits on a database that never answers, which no shutdown interrupts, until the test
/// lets go — after the peer has heartbeated well past the moment the draining worker's
/// claim would have expired. Fails if the draining worker's claim is handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_keeps_its_running_job_past_the_orphan_timeout() {
    use sessionfleet::jobs::JobKind;
    use sessionfleet::ops::cleanup::CleanupParams;
    use sessionfleet::queue::{HEARTBEAT_INTERVAL, MISSED_HEARTBEATS};
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let q = QueueClass::Cleanup;
    let silent = SilentServer::start();
    let mut spec = WorkerSpec::new(&url, &ns, "drainer");
    spec.queues = "cleanup".into();
    spec.env.push((
        "DATABASE_URL".into(),
        format!("postgres://sf@127.0.0.1:{}/sf", silent.port),
    ));
    spec.env
        .push(("SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS".into(), "600".into()));
    let mut seen = Vec::new();
    let mut drainer = Worker::start(&spec);
    let drainer_name = new_live_worker(&queue, q, &mut seen).await;

    let env = JobEnvelope::new(
        JobKind::Cleanup,
        "default",
        serde_json::to_value(CleanupParams::default()).unwrap(),
        "e2e",
    );
    let task = queue.enqueue(&env).await.unwrap().task_id;
    running_on(&queue, q, &drainer_name).await;
    spec.label = "peer".into();
    let peer = Worker::start(&spec);
    let peer_name = new_live_worker(&queue, q, &mut seen).await;

    drainer.signal("TERM");
    eventually(HANG_GUARD, "the drainer stopping", || async {
        let live = queue.live_workers(Some(q)).await.ok()?;
        live.iter().all(|w| w.name != drainer_name).then_some(())
    })
    .await;
    let apalis_entry = |process: String| {
        let queue = queue.clone();
        async move {
            queue
                .apalis_workers(q)
                .await
                .ok()?
                .into_iter()
                .find(|(n, _)| n.starts_with(&format!("{process}-")))
        }
    };
    let (drainer_apalis, stopped_at) = apalis_entry(drainer_name.clone()).await.unwrap();
    // apalis may heartbeat once more as the stop lands; past that, an unrefreshed claim is
    // taken by the first orphan check after `expired`.
    let orphaned_after = (HEARTBEAT_INTERVAL * MISSED_HEARTBEATS as u32).as_secs();
    let expired = stopped_at + HEARTBEAT_INTERVAL.as_secs() + orphaned_after + 1;
    let (_, beat) = eventually(
        HANG_GUARD,
        "the peer's heartbeat past the orphan timeout",
        || {
            let e = apalis_entry(peer_name.clone());
            async move { e.await.filter(|(_, at)| *at > expired) }
        },
    )
    .await;
    // The re-enqueue runs right after the heartbeat's stamp: wait for the next one.
    eventually(HANG_GUARD, "another heartbeat of the peer", || {
        let e = apalis_entry(peer_name.clone());
        async move { e.await.filter(|(_, at)| *at > beat) }
    })
    .await;

    let mut c = queue.connection();
    let still_claimed: bool = redis::cmd("SISMEMBER")
        .arg(queue.keys().inflight(q, &drainer_apalis))
        .arg(&task)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        still_claimed,
        "the draining worker's running job was handed back; peer log:\n{}",
        peer.log_text()
    );

    drop(silent); // the job's database fails now; the job ends and the drain with it
    let status = drainer.wait_exit(HANG_GUARD).expect("drainer exited");
    assert!(status.success(), "{status:?}; log:\n{}", drainer.log_text());
    assert!(
        drainer.log_text().contains(&task),
        "the drainer ran task {task}"
    );
    assert!(
        !peer.log_text().contains(&task),
        "the peer never runs task {task}:\n{}",
        peer.log_text()
    );
    drop_namespace(&queue).await;
}

/// Ids on a ready list whose records apalis' fetch cannot decode — no meta record, a
/// non-numeric attempt count — fail the whole fetch, and the apalis worker with it, every
/// time they are handed back. The worker dead-letters them instead (and records their jobs
/// failed), and the jobs around them run. Fails if the malformed ids stay on the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_apalis_cannot_fetch_are_dead_lettered_while_jobs_keep_flowing() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let q = QueueClass::Diag;
    let mut spec = WorkerSpec::new(&url, &ns, "malformed");
    spec.queues = "diag".into();
    let _w = Worker::start(&spec);
    live_on(&queue, q, 1).await;

    let k = queue.keys().clone();
    let (no_meta, bad_attempts) = (JobEnvelope::noop("e2e"), JobEnvelope::noop("e2e"));
    let mut valid = Vec::new();
    for _ in 0..3 {
        let env = JobEnvelope::noop("e2e");
        valid.push(env.job_id);
        queue.enqueue(&env).await.unwrap();
    }
    let mut c = queue.connection();
    let _: () = redis::pipe()
        .hset(k.data(q), "no-meta", no_meta.to_bytes())
        .hset(k.data(q), "attempts-abc", bad_attempts.to_bytes())
        .hset_multiple(
            format!("{}:attempts-abc", k.meta_prefix(q)),
            &[
                ("attempts", "abc"),
                ("max_attempts", "25"),
                ("status", "Pending"),
            ],
        )
        .rpush(k.active(q), "no-meta")
        .rpush(k.active(q), "attempts-abc")
        .query_async(&mut c)
        .await
        .unwrap();
    for _ in 0..3 {
        let env = JobEnvelope::noop("e2e");
        valid.push(env.job_id);
        queue.enqueue(&env).await.unwrap();
    }

    for (env, why) in [(&no_meta, "no meta record"), (&bad_attempts, "attempts")] {
        let letter = eventually(HANG_GUARD, "a dead letter", || async {
            queue.dead_letter(&env.job_id.to_string()).await.ok()?
        })
        .await;
        assert!(letter.reason.contains(why), "{}", letter.reason);
        let r = queue.result(env.job_id).await.unwrap().expect("a result");
        assert_eq!(r.outcome, ResultOutcome::Failed);
    }
    eventually(HANG_GUARD, "the valid jobs' results", || async {
        all_results(&queue, &valid).await.then_some(())
    })
    .await;
    let after = JobEnvelope::noop("e2e");
    queue.enqueue(&after).await.unwrap();
    let r = queue
        .wait_for_result(after.job_id, HANG_GUARD)
        .await
        .expect("the worker keeps processing jobs");
    assert_eq!(r.outcome, ResultOutcome::Succeeded);
    drop_namespace(&queue).await;
}

/// `/readyz` answers ready only when every configured queue's worker runs. Cleanup's apalis
/// worker cannot register while its worker set in Redis holds a value of the wrong type, so it
/// fails at every start and is restarted again and again while the three other queues run: the
/// process is unready and names that queue. Once the key is gone, the restarted worker
/// registers and the process is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_unready_while_one_queue_worker_keeps_failing_and_names_it() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let blocker = queue.keys().apalis_workers(QueueClass::Cleanup);
    let mut c = queue.connection();
    let _: () = redis::cmd("SET")
        .arg(&blocker)
        .arg("not a sorted set")
        .query_async(&mut c)
        .await
        .unwrap();
    let w = Worker::start(&WorkerSpec::new(&url, &ns, "readyz-queues"));

    // Once cleanup's worker has failed (not merely not registered yet) and the other three run.
    let (code, body) = eventually(HANG_GUARD, "readyz naming only cleanup", || async {
        let failed = w
            .log_text()
            .contains("queue worker stopped on an error; restarting");
        let r = http_get(w.metrics_port, "/readyz").await?;
        (failed && r.1 == "queue workers not running: cleanup\n").then_some(r)
    })
    .await;
    assert_eq!(code, 503, "{body}");

    let _: () = redis::cmd("DEL")
        .arg(&blocker)
        .query_async(&mut c)
        .await
        .unwrap();
    let (code, body) = eventually(
        HANG_GUARD,
        "readyz after cleanup's worker registered",
        || async {
            let r = http_get(w.metrics_port, "/readyz").await?;
            (r.0 == 200).then_some(r)
        },
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "ready: 4 queue workers\n"));
    // Every restart counted, once each, and no more follow once the worker runs.
    let restarted = w
        .log_text()
        .matches("queue worker stopped on an error; restarting under a new name")
        .count() as f64;
    assert!(restarted >= 1.0, "{}", w.log_text());
    let (_, metrics) = http_get(w.metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_sample(&metrics, "sessionfleet_worker_restarts_total", &[]),
        Some(restarted),
        "{metrics}"
    );
    drop(w);
    drop_namespace(&queue).await;
}

/// A cleanup run through a worker, seen in its metrics: deferred while the test holds the
/// target's lease (and the busy acquisition counted), one part per batch (a zero budget stops
/// each part after its first batch) counted `continued` until the last, `succeeded`; the rows
/// deleted counted under `rows_affected_total`, exactly as many as left the table; a job for a
/// target nobody configured dead-lettered (jobs, dead letters added, the dead-letter gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_metrics_count_deferrals_parts_dead_letters_and_deleted_rows() {
    use sessionfleet::dispatch::OperationJob;
    use sessionfleet::lease::{self, HolderInfo, LeaseConfig};
    use sessionfleet::ops::cleanup::CleanupParams;
    use sessionfleet::seed::{SeedParams, seed_demo};
    use sessionfleet::store::{Engine, SchemaVersion};

    let t = sessionfleet::testing::TestDb::new(Engine::Sqlite).await;
    seed_demo(
        &t.db,
        &SeedParams::new(400, 21, SchemaVersion::V2, chrono::Utc::now().naive_utc()),
    )
    .await
    .unwrap();
    let count = || async {
        t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap()
    };
    let before = count().await;
    assert!(
        doomed_v2(&t.db).await > 100,
        "several batches of 50 to delete"
    );
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let redis = queue.connection();
    let held = lease::try_acquire(
        &redis,
        &ns,
        "default",
        &HolderInfo::new("e2e", "holding the lease"),
        &t.db,
        &LeaseConfig::from_ttl(Duration::from_secs(300)),
    )
    .await
    .unwrap()
    .expect("the lease is free");
    let mut spec = WorkerSpec::new(&url, &ns, "cleanup-metrics");
    spec.queues = "cleanup".into();
    spec.env.push(("DATABASE_URL".into(), t.url.clone()));
    let w = Worker::start(&spec);

    let job = OperationJob::Cleanup(CleanupParams {
        batch_size: 50,
        max_batch_size: 50,
        budget_secs: Some(0),
        ..CleanupParams::default()
    });
    let run = JobEnvelope::new(job.kind(), "default", job.params(), "e2e");
    queue.enqueue(&run).await.unwrap();
    let deferred = [("kind", "cleanup"), ("outcome", "deferred")];
    metrics_until(w.metrics_port, HANG_GUARD, "the run deferred", |b| {
        metric_sample(b, "sessionfleet_jobs_total", &deferred).is_some()
    })
    .await;
    assert!(
        held.release(&redis).await.unwrap(),
        "still the test's lease"
    );
    let parts = queue.wait_for_run(run.run_id, HANG_GUARD).await.unwrap();
    let last = parts.last().expect("parts");
    assert_eq!(last.outcome, ResultOutcome::Succeeded, "{parts:?}");
    let continued = parts
        .iter()
        .filter(|p| p.outcome == ResultOutcome::Continued)
        .count();
    assert!(continued >= 1, "{parts:?}");
    assert_eq!(continued + 1, parts.len(), "{parts:?}");
    let deleted = before - count().await;
    assert!(deleted > 100, "{deleted}");
    assert_eq!(
        parts.iter().map(|p| p.rows_affected).sum::<u64>(),
        deleted as u64,
        "{parts:?}"
    );

    let nowhere = JobEnvelope::new(job.kind(), "nowhere", job.params(), "e2e");
    queue.enqueue(&nowhere).await.unwrap();
    let failed = queue
        .wait_for_result(nowhere.job_id, HANG_GUARD)
        .await
        .unwrap();
    assert_eq!(failed.outcome, ResultOutcome::Failed, "{failed:?}");

    let metrics = metrics_until(
        w.metrics_port,
        HANG_GUARD,
        "the dead-letter gauge at 1",
        |b| metric_sample(b, "sessionfleet_dead_letters", &[]) == Some(1.0),
    )
    .await;
    let jobs = |outcome: &str| {
        metric_sample(
            &metrics,
            "sessionfleet_jobs_total",
            &[("kind", "cleanup"), ("outcome", outcome)],
        )
    };
    assert!(jobs("deferred") >= Some(1.0), "{metrics}");
    assert_eq!(jobs("continued"), Some(continued as f64), "{metrics}");
    assert_eq!(jobs("succeeded"), Some(1.0), "{metrics}");
    assert_eq!(jobs("dead_lettered"), Some(1.0), "{metrics}");
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_rows_affected_total",
            &[("kind", "cleanup")]
        ),
        Some(deleted as f64),
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "sessionfleet_dead_letters_total",
            &[("queue", "cleanup")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_sample(
            &metrics,
            "sessionfleet_lease_acquisitions_total",
            &[("target", "default"), ("result", "busy")]
        ) >= Some(1.0),
        "{metrics}"
    );
    drop(w);
    t.drop_db().await;
}

/// A cleanup whose database cannot be reached fails with a retryable error: the worker puts
/// it back for another attempt and counts the delivery `retrying`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_database_is_down_is_counted_retrying() {
    let closed = sessionfleet::testing::ClosedPort::new();
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "db-down");
    spec.queues = "cleanup".into();
    spec.env.push((
        "DATABASE_URL".into(),
        format!("postgres://postgres@127.0.0.1:{}/sessions", closed.port()),
    ));
    let w = Worker::start(&spec);
    let job = sessionfleet::dispatch::OperationJob::Cleanup(Default::default());
    let env = JobEnvelope::new(job.kind(), "default", job.params(), "e2e");
    queue.enqueue(&env).await.unwrap();
    let retrying = [("kind", "cleanup"), ("outcome", "retrying")];
    let metrics = metrics_until(w.metrics_port, HANG_GUARD, "a retrying delivery", |b| {
        metric_sample(b, "sessionfleet_jobs_total", &retrying).is_some()
    })
    .await;
    assert_eq!(
        metric_sample(&metrics, "sessionfleet_jobs_total", &retrying),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        w.log_text().contains("failed; will retry"),
        "{}",
        w.log_text()
    );
}

/// `sessionfleet_queue_depth` per queue and state: jobs waiting on a queue this worker does
/// not consume (ready, and scheduled an hour ahead, none of them due) and the one job it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_gauges_show_ready_scheduled_and_running_jobs() {
    let (url, ns) = (redis_url(), unique_namespace());
    let _keys = RedisKeysGuard::new(&ns);
    let queue = queue(&url, &ns).await;
    let mut spec = WorkerSpec::new(&url, &ns, "depth");
    spec.queues = "diag".into();
    let w = Worker::start(&spec);
    live_on(&queue, QueueClass::Diag, 1).await;
    let job = sessionfleet::dispatch::OperationJob::Cleanup(Default::default());
    let cleanup = || JobEnvelope::new(job.kind(), "default", job.params(), "e2e");
    queue
        .enqueue_batch(
            (0..3).map(|_| cleanup()).collect(),
            EnqueueOptions::default(),
        )
        .await
        .unwrap();
    queue
        .enqueue_batch(
            (0..2).map(|_| cleanup()).collect(),
            EnqueueOptions {
                delay: Some(Duration::from_secs(3600)),
            },
        )
        .await
        .unwrap();
    // Runs until the worker is stopped at the end of the test.
    queue
        .enqueue(&JobEnvelope::sleep(600_000, None, "e2e"))
        .await
        .unwrap();
    let depth = |b: &str, queue: &str, state: &str| {
        metric_sample(
            b,
            "sessionfleet_queue_depth",
            &[("queue", queue), ("state", state)],
        )
    };
    let expected = [
        ("cleanup", "ready", 3.0),
        ("cleanup", "scheduled", 2.0),
        ("cleanup", "scheduled_due", 0.0),
        ("cleanup", "running", 0.0),
        ("diag", "running", 1.0),
        ("diag", "ready", 0.0),
    ];
    let metrics = metrics_until(w.metrics_port, HANG_GUARD, "the queue depths", |b| {
        expected
            .iter()
            .all(|(q, state, n)| depth(b, q, state) == Some(*n))
    })
    .await;
    for (q, state, n) in expected {
        assert_eq!(depth(&metrics, q, state), Some(n), "{q} {state}");
    }
}
