//! The lease with real worker processes: several workers on one database never write at the
//! same time; a holder paused past its TTL (SIGSTOP) is fenced out when it wakes; Redis
//! losing every lease and counter mid-run still leaves one writer; different databases are
//! worked on in parallel by different workers. (kill -9 of a holder: tests/fleet.rs.)

use std::time::Duration;

use sqlx::Connection;

use sessionfleet::dispatch::OperationJob;
use sessionfleet::fence;
use sessionfleet::jobs::{JobEnvelope, QueueClass};
use sessionfleet::lease;
use sessionfleet::ops::cleanup::CleanupParams;
use sessionfleet::ops::maintenance::{MaintenanceAction, MaintenanceParams};
use sessionfleet::queue::{EnqueueOptions, Queue};
use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Engine, SchemaVersion};
use sessionfleet::testing::{RedisKeysGuard, TestDb, redis_url, unique_namespace};
use sessionfleet_e2e::{RedisServer, Worker, WorkerSpec, eventually, queue};

fn spec(ns: &str, db_url: &str, label: &str, ttl_ms: &str) -> WorkerSpec {
    spec_on(&redis_url(), ns, db_url, label, ttl_ms)
}

fn spec_on(redis: &str, ns: &str, db_url: &str, label: &str, ttl_ms: &str) -> WorkerSpec {
    let mut s = WorkerSpec::new(redis, ns, label);
    s.env.push(("DATABASE_URL".into(), db_url.into()));
    s.env
        .push(("SESSIONFLEET_LEASE_TTL_MS".into(), ttl_ms.into()));
    s
}

fn envelope(job: OperationJob) -> JobEnvelope {
    JobEnvelope::new(job.kind(), "default", job.params(), "lease-e2e")
}

async fn all_done(q: &Queue, envs: &[JobEnvelope]) -> bool {
    for e in envs {
        if q.result(e.job_id).await.ok().flatten().is_none() {
            return false;
        }
    }
    true
}

/// Every accepted token is in the database's log; tokens grow and the holders' write
/// intervals never overlap.
async fn assert_single_writer(db: &TestDb) -> usize {
    let log = fence::write_log(&db.db, &lease::fence_name("default"))
        .await
        .unwrap();
    for pair in log.windows(2) {
        assert!(pair[0].token < pair[1].token);
        assert!(
            pair[0].last_write_at < pair[1].first_write_at,
            "token {} wrote until {} but token {} started at {}",
            pair[0].token,
            pair[0].last_write_at,
            pair[1].token,
            pair[1].first_write_at
        );
    }
    log.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_thirty_mutating_jobs_one_writer_at_a_time() {
    let t = TestDb::new(Engine::Sqlite).await;
    seed_demo(
        &t.db,
        &SeedParams {
            sessions: 500,
            users: 100,
            seed: 5,
            schema: SchemaVersion::V2,
            now: chrono::Utc::now().naive_utc(),
            reset: false,
        },
    )
    .await
    .unwrap();
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(&spec(&ns, &t.url, &format!("w{i}"), "3000")))
        .collect();
    let q = queue(&redis_url(), &ns).await;
    let optimize = OperationJob::Maintenance(MaintenanceParams {
        action: MaintenanceAction::Optimize { vacuum: false },
        dry_run: false,
    });
    let envs: Vec<JobEnvelope> = (0..30).map(|_| envelope(optimize.clone())).collect();
    q.enqueue_batch(envs.clone(), EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(300), "30 jobs done", || async {
        all_done(&q, &envs).await.then_some(())
    })
    .await;
    for e in &envs {
        let r = q.result(e.job_id).await.unwrap().unwrap();
        assert!(r.error.is_none(), "{:?}", r.error);
    }
    assert_eq!(
        assert_single_writer(&t).await,
        30,
        "every job's token was accepted and logged"
    );
    // The workers' metrics agree: 30 acquisitions in all, none held any more.
    let mut acquired = 0.0;
    for w in &workers {
        let (_, body) = sessionfleet_e2e::http_get(w.metrics_port, "/metrics")
            .await
            .expect("metrics");
        acquired += metric(
            &body,
            "sessionfleet_lease_acquisitions_total",
            "result=\"acquired\"",
        );
        assert_eq!(
            metric(&body, "sessionfleet_lease_holds", "target="),
            0.0,
            "{body}"
        );
    }
    assert_eq!(acquired, 30.0);
    t.drop_db().await;
}

/// A holder paused (SIGSTOP) past its TTL while its batch waits for the fence row is fenced
/// out when it wakes, and another worker finishes the work meanwhile. The pause lands at a
/// known point: the test holds the fence row (`FOR UPDATE`) until the holder's batch waits for
/// it, stops the holder, and issues a newer token on that row before letting go, so the
/// frozen holder's fence check has already read the newer token when it wakes — whatever its
/// keeper does first, its batch meets the fence. Fails if the fence let a stale token write
/// (the stale token's write count grows, and no refusal is logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_ttl_is_fenced_out_when_it_wakes() {
    // PostgreSQL. The frozen holder's session, idle in its batch transaction, keeps the fence
    // row locked until the server ends it (idle_in_transaction_session_timeout,
    // store::STALLED_TRANSACTION_TIMEOUT); the next holder's token request waits, is
    // deferred, and succeeds after that.
    let t = TestDb::new(Engine::Postgres).await;
    seed_demo(
        &t.db,
        &SeedParams {
            sessions: 6000,
            users: 1500,
            seed: 9,
            schema: SchemaVersion::V2,
            now: chrono::Utc::now().naive_utc(),
            reset: false,
        },
    )
    .await
    .unwrap();
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let a = Worker::start(&spec(&ns, &t.url, "a", "1000"));
    let q = queue(&redis_url(), &ns).await;
    // A long run, so the pause lands mid-cleanup.
    let first = envelope(OperationJob::Cleanup(slow_cleanup()));
    q.enqueue(&first).await.unwrap();
    let holder = wait_for_holder(&q, &ns).await;
    let fence_name = lease::fence_name("default");
    let stale_token = eventually(
        Duration::from_secs(30),
        "the holder's first write",
        || async {
            let log = fence::write_log(&t.db, &fence_name).await.ok()?;
            log.last().map(|l| l.token)
        },
    )
    .await;
    assert!(
        holder.worker.contains(&a.pid().to_string()),
        "worker a holds it: {holder:?}"
    );
    // Hold the fence row until the holder's next batch waits for it, then freeze the holder.
    let mut row_holder = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut row_holder).await.unwrap();
    let held: i64 =
        sqlx::query_scalar("SELECT token FROM sessionfleet_fence WHERE name = $1 FOR UPDATE")
            .bind(&fence_name)
            .fetch_one(&mut row_holder)
            .await
            .unwrap();
    assert_eq!(held, stale_token, "still the holder's token");
    eventually(
        Duration::from_secs(60),
        "the holder's batch waiting for the fence row",
        || async {
            let waiting =
                t.db.scalar_i64(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND query LIKE '%sessionfleet_fence%FOR UPDATE%' \
                     AND pid <> pg_backend_pid()",
                )
                .await
                .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
    a.signal("STOP");
    // A newer token, issued on the row the frozen holder waits for: once the row is let go,
    // the holder's fence check reads it (the reply waits in its socket).
    sqlx::query(
        "UPDATE sessionfleet_fence SET token = token + 1, holder = 'e2e: a newer holder' \
         WHERE name = $1",
    )
    .bind(&fence_name)
    .execute(&mut row_holder)
    .await
    .unwrap();
    sqlx::query("COMMIT")
        .execute(&mut row_holder)
        .await
        .unwrap();
    row_holder.close().await.unwrap();
    // Another worker takes over once the TTL has run out and finishes the work.
    let b = Worker::start(&spec(&ns, &t.url, "b", "1000"));
    let second = envelope(OperationJob::Cleanup(CleanupParams::default()));
    q.enqueue(&second).await.unwrap();
    let done = eventually(
        Duration::from_secs(120),
        "the second holder's run",
        || async { q.result(second.job_id).await.ok().flatten() },
    )
    .await;
    assert!(done.error.is_none(), "{:?}", done.error);
    let newer = fence::inspect(&t.db, &fence_name)
        .await
        .unwrap()
        .unwrap()
        .token;
    assert!(newer > stale_token + 1, "the second holder's own token");
    let log_before = fence::write_log(&t.db, &fence_name).await.unwrap();
    assert!(
        !part_ended(&a, first.job_id),
        "frozen, it settled nothing: {}",
        a.log_text()
    );
    a.signal("CONT");
    // Awake, its batch reads the newer token: the fence refuses it, and the part ends there
    // (a later part gets a token of its own).
    let refused = format!("this holder's token {stale_token} is stale");
    eventually(
        Duration::from_secs(60),
        "the stale holder fenced out",
        || async {
            a.log_text()
                .lines()
                .any(|l| l.contains("a newer lease holder took over") && l.contains(&refused))
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "the stale holder's part to end",
        || async { part_ended(&a, first.job_id).then_some(()) },
    )
    .await;
    let log_after = fence::write_log(&t.db, &fence_name).await.unwrap();
    let writes_of = |log: &[fence::FenceLogEntry]| {
        log.iter()
            .find(|l| l.token == stale_token)
            .map(|l| l.writes)
    };
    assert!(writes_of(&log_before).is_some(), "the holder wrote before");
    assert_eq!(
        writes_of(&log_before),
        writes_of(&log_after),
        "no write with the stale token after the pause"
    );
    assert_single_writer(&t).await;
    // It goes on cleanly: the worker process still serves, nothing panicked.
    let health = sessionfleet_e2e::http_get(a.metrics_port, "/healthz").await;
    assert_eq!(
        health.map(|(status, _)| status),
        Some(200),
        "{}",
        a.log_text()
    );
    assert!(!a.log_text().contains("panicked"), "{}", a.log_text());
    drop(b);
    t.drop_db().await;
}

/// A lease taken from a holder while it works (here: while its batch waits for the fence row
/// the test holds, so the run cannot end first) is lost: the keeper's next renewal finds
/// another owner, cancels the run and counts the loss in `sessionfleet_lease_losses_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_from_a_working_holder_is_counted_lost() {
    let t = seeded(Engine::Postgres, 3000, 15).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let w = Worker::start(&spec(&ns, &t.url, "taken", "3000"));
    let q = queue(&redis_url(), &ns).await;
    let job = envelope(OperationJob::Cleanup(slow_cleanup()));
    q.enqueue(&job).await.unwrap();
    wait_for_holder(&q, &ns).await;
    let fence_name = lease::fence_name("default");
    eventually(
        Duration::from_secs(30),
        "the holder's first write",
        || async {
            let log = fence::write_log(&t.db, &fence_name).await.ok()?;
            (!log.is_empty()).then_some(())
        },
    )
    .await;
    let mut row_holder = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut row_holder).await.unwrap();
    sqlx::query("SELECT token FROM sessionfleet_fence WHERE name = $1 FOR UPDATE")
        .bind(&fence_name)
        .execute(&mut row_holder)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the holder's batch waiting for the fence row",
        || async {
            let waiting =
                t.db.scalar_i64(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND query LIKE '%sessionfleet_fence%FOR UPDATE%' \
                     AND pid <> pg_backend_pid()",
                )
                .await
                .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
    // Another owner for the lease (it expires by itself in a minute).
    let key = format!("{ns}:lease:{{{ns}:default}}");
    let mut c = q.connection();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("intruder")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let losses = [("target", "default")];
    let metrics = sessionfleet_e2e::metrics_until(
        w.metrics_port,
        Duration::from_secs(60),
        "the loss counted",
        |b| {
            sessionfleet_e2e::metric_sample(b, "sessionfleet_lease_losses_total", &losses).is_some()
        },
    )
    .await;
    assert_eq!(
        sessionfleet_e2e::metric_sample(&metrics, "sessionfleet_lease_losses_total", &losses),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        w.log_text()
            .contains("lease taken by another holder (intruder)"),
        "{}",
        w.log_text()
    );
    sqlx::query("ROLLBACK")
        .execute(&mut row_holder)
        .await
        .unwrap();
    row_holder.close().await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the holder's part to end",
        || async { part_ended(&w, job.job_id).then_some(()) },
    )
    .await;
    drop(w);
    t.drop_db().await;
}

/// The sum of the samples of `name` whose labels contain `label` (0 when absent).
fn metric(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a worker logs, inside the job's span, when it settles a part: any outcome.
const PART_SETTLED: [&str; 5] = [
    "job succeeded",
    "part done; continuation enqueued",
    "deferred",
    "failed; will retry",
    "job failed; dead-lettered",
];

/// True once `w`'s log shows it settled a part of job `id`.
fn part_ended(w: &Worker, id: uuid::Uuid) -> bool {
    let id = id.to_string();
    w.log_text()
        .lines()
        .any(|l| l.contains(&id) && PART_SETTLED.iter().any(|m| l.contains(m)))
}

/// Waits until someone holds the `default` target's lease in namespace `ns`.
async fn wait_for_holder(q: &Queue, ns: &str) -> lease::HolderInfo {
    eventually(Duration::from_secs(60), "a lease holder", || async {
        lease::status(&q.connection(), ns, "default", None)
            .await
            .ok()
            .and_then(|s| s.holder)
    })
    .await
}

/// Small batches and no budget: a cleanup that runs long enough to be interrupted.
fn slow_cleanup() -> CleanupParams {
    CleanupParams {
        batch_size: 10,
        max_batch_size: 10,
        budget_secs: None,
        ..CleanupParams::default()
    }
}

async fn seeded(engine: Engine, sessions: u64, seed: u64) -> TestDb {
    let t = TestDb::new(engine).await;
    seed_demo(
        &t.db,
        &SeedParams::new(
            sessions,
            seed,
            SchemaVersion::V2,
            chrono::Utc::now().naive_utc(),
        ),
    )
    .await
    .unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_mid_run_still_leaves_one_writer() {
    let t = seeded(Engine::Postgres, 6000, 11).await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let _workers: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&spec_on(&url, &ns, &t.url, &format!("rl{i}"), "1000")))
        .collect();
    let q = queue(&url, &ns).await;
    let first = envelope(OperationJob::Cleanup(slow_cleanup()));
    q.enqueue(&first).await.unwrap();
    wait_for_holder(&q, &ns).await;
    let stale_token = eventually(
        Duration::from_secs(30),
        "the holder's first write",
        || async {
            let log = fence::write_log(&t.db, &lease::fence_name("default"))
                .await
                .ok()?;
            log.last().map(|l| l.token)
        },
    )
    .await;

    // Queues, the lease and the token counter are gone; the holder keeps working until its
    // renewal finds the lease missing.
    redis.crash_and_restart();
    let second = envelope(OperationJob::Cleanup(CleanupParams::default()));
    eventually(
        Duration::from_secs(30),
        "enqueue after the restart",
        || async { q.enqueue(&second).await.ok() },
    )
    .await;
    let done = eventually(
        Duration::from_secs(120),
        "the run after the restart",
        || async { q.result(second.job_id).await.ok().flatten() },
    )
    .await;
    assert!(done.error.is_none(), "{:?}", done.error);
    // The Redis counter restarted at zero, yet the new holder got a token above the old one
    // (the database is the authority) and was not fenced out.
    let newer = fence::inspect(&t.db, &lease::fence_name("default"))
        .await
        .unwrap()
        .unwrap()
        .token;
    assert!(newer > stale_token, "{newer} > {stale_token}");
    assert!(assert_single_writer(&t).await >= 2);
    let remaining =
        t.db.scalar_i64(&format!(
            "SELECT COUNT(*) FROM user_sessions WHERE expires_at < '{}'",
            done.started_at.naive_utc().format("%Y-%m-%d %H:%M:%S")
        ))
        .await
        .unwrap();
    assert_eq!(
        remaining, 0,
        "the run after the restart finished the cleanup"
    );
    t.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_databases_are_worked_on_in_parallel_by_different_workers() {
    let dbs = [
        seeded(Engine::Sqlite, 4000, 12).await,
        seeded(Engine::Sqlite, 4000, 13).await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("targets.toml");
    std::fs::write(
        &config,
        format!(
            "default_target = \"a\"\n[targets.a]\nurl = \"{}\"\n[targets.b]\nurl = \"{}\"\n",
            dbs[0].url, dbs[1].url
        ),
    )
    .unwrap();
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let workers: Vec<Worker> = (0..2)
        .map(|i| {
            let mut s = spec(&ns, &dbs[0].url, &format!("tt{i}"), "3000");
            s.concurrency = 1;
            s.env
                .push(("SESSIONFLEET_CONFIG".into(), config.display().to_string()));
            Worker::start(&s)
        })
        .collect();
    let q = queue(&redis_url(), &ns).await;
    // Both polling before the jobs arrive: a worker still starting could leave both jobs to
    // the other, one after the other, which would say nothing about the lease.
    eventually(Duration::from_secs(60), "two live workers", || async {
        let live = q.live_workers(Some(QueueClass::Cleanup)).await.ok()?;
        (live.len() >= 2).then_some(())
    })
    .await;
    let job = OperationJob::Cleanup(slow_cleanup());
    let envs: Vec<JobEnvelope> = ["a", "b"]
        .iter()
        .map(|target| JobEnvelope::new(job.kind(), *target, job.params(), "lease-e2e"))
        .collect();
    q.enqueue_batch(envs.clone(), EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(180), "both runs", || async {
        all_done(&q, &envs).await.then_some(())
    })
    .await;
    let a = q.result(envs[0].job_id).await.unwrap().unwrap();
    let b = q.result(envs[1].job_id).await.unwrap().unwrap();
    assert!(a.error.is_none() && b.error.is_none(), "{a:?} {b:?}");
    assert_ne!(a.worker, b.worker, "each database had its own worker");
    assert!(
        a.started_at < b.finished_at && b.started_at < a.finished_at,
        "the runs overlapped in time: a {}..{}, b {}..{}",
        a.started_at,
        a.finished_at,
        b.started_at,
        b.finished_at
    );
    for (d, target) in dbs.iter().zip(["a", "b"]) {
        let log = fence::write_log(&d.db, &lease::fence_name(target))
            .await
            .unwrap();
        assert!(
            !log.is_empty(),
            "target {target} was written under its own fence"
        );
    }
    drop(workers);
    for d in dbs {
        d.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_and_nothing_is_lost_or_deleted_twice() {
    let t = seeded(Engine::Postgres, 6000, 14).await;
    let before =
        t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap();
    let doomed = sessionfleet_e2e::doomed_v2(&t.db).await;
    assert!(doomed > 1000);
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&spec(&ns, &t.url, &format!("k{i}"), "1000")))
        .collect();
    let q = queue(&redis_url(), &ns).await;
    let job = envelope(OperationJob::Cleanup(slow_cleanup()));
    q.enqueue(&job).await.unwrap();
    let holder = wait_for_holder(&q, &ns).await;
    eventually(
        Duration::from_secs(30),
        "the holder's first batch",
        || async { (sessionfleet_e2e::doomed_v2(&t.db).await < doomed).then_some(()) },
    )
    .await;
    let victim = workers
        .iter()
        .position(|w| holder.worker.contains(&format!("-{}-", w.pid())))
        .expect("the holder is one of our workers");
    workers[victim].kill9();
    let killed = workers[victim].pid();

    // The claimed job is recovered from the dead worker, the lease expires, and the other
    // worker finishes the cleanup.
    let done = eventually(
        Duration::from_secs(120),
        "the job after the kill",
        || async { q.result(job.job_id).await.ok().flatten() },
    )
    .await;
    assert!(done.error.is_none(), "{:?}", done.error);
    assert!(
        !done.worker.contains(&format!("-{killed}-")),
        "{}",
        done.worker
    );
    assert_eq!(
        sessionfleet_e2e::doomed_v2(&t.db).await,
        0,
        "nothing left behind"
    );
    let after =
        t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
            .await
            .unwrap();
    assert_eq!(
        after,
        before - doomed,
        "exactly the doomed sessions are gone"
    );
    assert!(
        assert_single_writer(&t).await >= 2,
        "two holders wrote, one after the other"
    );
    t.drop_db().await;
}
