//! The lease against real Redis and real databases: compare-and-delete, busy leases, tokens
//! that never go backwards (even when Redis loses its data), stale holders fenced out after a
//! pause, mutual exclusion under contention on all three engines, and parallel targets.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sessionfleet::CancellationToken;
use sessionfleet::fence::{self, Fence, FenceError};
use sessionfleet::lease::{self, HolderInfo, LeaseConfig, LeaseError, LossReason};
use sessionfleet::store::{ConnectOptions, Db, Engine};
use sessionfleet::testing::{ENGINES, RedisKeysGuard, TestDb, redis_url, unique_namespace};

const TARGET: &str = "default";
/// A short TTL so expiry-based tests run in about a second.
const SHORT_TTL: Duration = Duration::from_millis(1000);

async fn connect_redis(url: &str) -> ConnectionManager {
    redis::Client::open(url)
        .expect("redis url")
        .get_connection_manager()
        .await
        .expect("connect redis")
}

fn short_cfg() -> LeaseConfig {
    let mut cfg = LeaseConfig::from_ttl(SHORT_TTL);
    cfg.busy_delay = Duration::from_millis(20);
    cfg
}

fn holder(worker: &str, job: &str) -> HolderInfo {
    HolderInfo::new(worker, job)
}

fn lease_key(ns: &str, target: &str) -> String {
    format!("{ns}:lease:{{{ns}:{target}}}")
}

async fn create_probe(db: &Db) {
    db.execute(
        "CREATE TABLE IF NOT EXISTS lease_probe (token BIGINT NOT NULL, seq BIGINT NOT NULL)",
    )
    .await
    .expect("create probe table");
}

/// One fenced write: a row tagged with the writer's token.
async fn fenced_insert(db: &Db, fence: &Fence, seq: i64) -> Result<(), FenceError> {
    let mut tx = fence.begin(db).await?;
    let sql = tx.sql("INSERT INTO lease_probe (token, seq) VALUES (?, ?)");
    sessionfleet::on_tx!(&mut tx, c => { sqlx::query(sql).bind(fence.token).bind(seq).execute(&mut *c).await?; });
    tx.commit().await?;
    Ok(())
}

async fn rows_of(db: &Db, token: i64) -> i64 {
    db.scalar_i64(&format!(
        "SELECT COUNT(*) FROM lease_probe WHERE token = {token}"
    ))
    .await
    .expect("count probe rows")
}

async fn acquire(
    redis: &ConnectionManager,
    ns: &str,
    h: &HolderInfo,
    db: &Db,
    cfg: &LeaseConfig,
) -> lease::Lease {
    lease::try_acquire(redis, ns, TARGET, h, db, cfg)
        .await
        .expect("try_acquire")
        .expect("lease free")
}

/// Retries until the lease is free (another holder's expired), or panics after 10 s.
async fn acquire_when_free(
    redis: &ConnectionManager,
    ns: &str,
    h: &HolderInfo,
    db: &Db,
    cfg: &LeaseConfig,
) -> lease::Lease {
    for _ in 0..200 {
        match lease::try_acquire(redis, ns, TARGET, h, db, cfg).await {
            Ok(Some(l)) => return l,
            Ok(None) | Err(LeaseError::Redis(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("acquire failed: {e}"),
        }
    }
    panic!("lease never became free");
}

/// Asserts the audit log shows holders one after another: ordered by first write, tokens
/// strictly increase and no token's write interval overlaps the next one's.
fn assert_serial(log: &[fence::FenceLogEntry]) {
    let mut by_time = log.to_vec();
    by_time.sort_by_key(|e| e.first_write_at);
    for w in by_time.windows(2) {
        assert!(
            w[0].token < w[1].token,
            "tokens out of order: {:?}",
            by_time
        );
        assert!(
            w[0].last_write_at < w[1].first_write_at,
            "token {} wrote until {} but token {} started at {}",
            w[0].token,
            w[0].last_write_at,
            w[1].token,
            w[1].first_write_at
        );
    }
}

/// A redis-server of this test's own, so restarting or flushing it leaves the shared one alone.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = sessionfleet::testing::free_port();
        let mut r = PrivateRedis { port, child: None };
        r.spawn();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server did not start");
    }

    /// kill -9 and start again on the same port: every key is lost (no persistence).
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn release_never_deletes_another_holders_lease() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let cfg = LeaseConfig::from_ttl(lease::MIN_TTL);

    let a = acquire(&redis, &ns, &holder("w-a", "job-a"), &tdb.db, &cfg).await;
    // No keeper: A's lease runs out.
    tokio::time::sleep(lease::MIN_TTL + Duration::from_millis(200)).await;
    let b = acquire(&redis, &ns, &holder("w-b", "job-b"), &tdb.db, &cfg).await;

    assert!(
        !a.release(&redis).await.expect("release A"),
        "A's release must report the lease was not its own"
    );
    let st = lease::status(&redis, &ns, TARGET, None)
        .await
        .expect("status");
    let h = st.holder.expect("B still holds the lease");
    assert_eq!(h.worker, "w-b");
    assert_eq!(h.token, Some(b.fence().token));
    assert!(st.ttl_ms.is_some());
    assert!(b.release(&redis).await.expect("release B"));
    assert!(
        lease::status(&redis, &ns, TARGET, None)
            .await
            .expect("status")
            .holder
            .is_none()
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn busy_lease_returns_none_and_issues_no_token() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Postgres).await;
    let cfg = short_cfg();

    let a = acquire(&redis, &ns, &holder("w-a", "job-a"), &tdb.db, &cfg).await;
    let name = lease::fence_name(TARGET);
    let before = fence::inspect(&tdb.db, &name)
        .await
        .expect("inspect")
        .expect("fence row");
    assert_eq!(before.token, a.fence().token);

    let b = lease::try_acquire(&redis, &ns, TARGET, &holder("w-b", "job-b"), &tdb.db, &cfg)
        .await
        .expect("try_acquire");
    assert!(b.is_none(), "the lease is held by A");
    let run = lease::with_lease(
        &redis,
        &ns,
        TARGET,
        &holder("w-b", "job-b"),
        &tdb.db,
        &cfg,
        &CancellationToken::new(),
        |_ctx| async { panic!("must not run while busy") },
    )
    .await;
    match run {
        Err(e @ LeaseError::Busy { .. }) => {
            assert!(e.is_busy());
            assert!(e.to_string().contains("w-a job job-a"), "{e}");
        }
        other => panic!("expected Busy, got {:?}", other.map(|r| r.token)),
    }
    let after = fence::inspect(&tdb.db, &name)
        .await
        .expect("inspect")
        .expect("fence row");
    assert_eq!(
        after.token,
        a.fence().token,
        "a busy acquisition must not issue a token"
    );
    assert_eq!(after.holder.as_deref(), Some("w-a job job-a"));
    let d = cfg.busy_delay();
    assert!(d >= cfg.busy_delay / 2 && d <= cfg.busy_delay);
    a.release(&redis).await.expect("release");
    tdb.drop_db().await;
}

#[tokio::test]
async fn status_and_holders_report_the_holder_and_the_database_fence() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::MySql).await;
    let cfg = short_cfg();

    let l = acquire(
        &redis,
        &ns,
        &holder("host-1/worker-7", "job-42"),
        &tdb.db,
        &cfg,
    )
    .await;
    let st = lease::status(&redis, &ns, TARGET, Some(&tdb.db))
        .await
        .expect("status");
    let h = st.holder.expect("holder");
    assert_eq!(
        (h.worker.as_str(), h.job_id.as_str()),
        ("host-1/worker-7", "job-42")
    );
    assert_eq!(h.token, Some(l.fence().token));
    assert!(h.since.is_some());
    assert!(st.ttl_ms.is_some_and(|t| t <= SHORT_TTL.as_millis() as u64));
    assert_eq!(st.redis_token, Some(l.fence().token));
    let row = st.db_fence.expect("fence row");
    assert_eq!(row.token, l.fence().token);
    assert_eq!(row.holder.as_deref(), Some("host-1/worker-7 job job-42"));

    let all = lease::holders(&redis, &ns).await.expect("holders");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, TARGET);
    assert_eq!(all[0].1.job_id, "job-42");
    l.release(&redis).await.expect("release");
    assert!(
        lease::holders(&redis, &ns)
            .await
            .expect("holders")
            .is_empty()
    );
    tdb.drop_db().await;
}

#[tokio::test]
async fn token_failure_releases_the_redis_lease() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let closed = Db::connect(&tdb.url, &ConnectOptions::default())
        .await
        .expect("connect");
    closed.close().await;

    let err = lease::try_acquire(
        &redis,
        &ns,
        TARGET,
        &holder("w", "j"),
        &closed,
        &short_cfg(),
    )
    .await
    .expect_err("token cannot be issued on a closed pool");
    assert!(matches!(err, LeaseError::Token { .. }), "{err}");
    let st = lease::status(&redis, &ns, TARGET, None)
        .await
        .expect("status");
    assert!(
        st.ttl_ms.is_none(),
        "the Redis lease must have been released"
    );
    // And the next holder gets it at once.
    let l = acquire(&redis, &ns, &holder("w2", "j2"), &tdb.db, &short_cfg()).await;
    l.release(&redis).await.expect("release");
    tdb.drop_db().await;
}

/// A's keeper renews the lease: the key outlives the expiry it was created with, still
/// A's, and B cannot take it then. The TTL is roomy (renewal every 1.7 s, so a stalled test
/// machine does not lose it) and the test waits for the lease to be past its first expiry
/// rather than for a time window. Fails without renewal: the key is gone once Redis' clock
/// passes that first expiry.
#[tokio::test]
async fn renewal_keeps_the_lease_past_its_ttl() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let mut cfg = LeaseConfig::from_ttl(Duration::from_secs(5));
    cfg.busy_delay = Duration::from_millis(20);

    let a = acquire(&redis, &ns, &holder("w-a", "job-a"), &tdb.db, &cfg).await;
    let cancel = CancellationToken::new();
    let keeper = a.spawn_keeper(&redis, cancel.clone());
    let mut con = redis.clone();
    let key = lease_key(&ns, TARGET);
    // The expiry the lease was created with, in Redis' own clock (unix ms).
    let first_expiry: i64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("PEXPIRETIME");
    assert!(first_expiry > 0, "the lease key has an expiry");
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let owner: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("GET");
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut con)
            .await
            .expect("TIME");
        assert_eq!(
            owner.as_deref(),
            Some(a.owner()),
            "A's lease must stay held while its keeper renews it (lost: {:?})",
            keeper.lost()
        );
        if secs * 1000 + micros / 1000 > first_expiry {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "Redis' clock never passed the lease's first expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = lease::try_acquire(&redis, &ns, TARGET, &holder("w-b", "job-b"), &tdb.db, &cfg)
        .await
        .expect("try");
    assert!(b.is_none(), "B cannot take a renewed lease");
    assert!(keeper.lost().is_none());
    assert!(!cancel.is_cancelled());
    assert!(a.release(&redis).await.expect("release"));
    keeper.join().await;
    assert!(!cancel.is_cancelled(), "a release is not a loss");
    tdb.drop_db().await;
}

#[tokio::test]
async fn keeper_cancels_the_operation_when_another_owner_appears() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let a = acquire(&redis, &ns, &holder("w-a", "job-a"), &tdb.db, &short_cfg()).await;
    let cancel = CancellationToken::new();
    let keeper = a.spawn_keeper(&redis, cancel.clone());

    let mut con = redis.clone();
    let _: () = redis::cmd("SET")
        .arg(lease_key(&ns, TARGET))
        .arg("intruder")
        .query_async(&mut con)
        .await
        .expect("set");
    tokio::time::timeout(Duration::from_secs(10), cancel.cancelled())
        .await
        .expect("cancel fires on loss");
    assert_eq!(
        keeper.lost(),
        Some(LossReason::Taken {
            owner: "intruder".into()
        })
    );
    assert!(
        !a.release(&redis).await.expect("release"),
        "must not delete the intruder's lease"
    );
    let owner: Option<String> = redis::cmd("GET")
        .arg(lease_key(&ns, TARGET))
        .query_async(&mut con)
        .await
        .expect("get");
    assert_eq!(owner.as_deref(), Some("intruder"));
    tdb.drop_db().await;
}

/// The in-process analogue of SIGSTOP: holder A runs on a runtime of its own whose only
/// thread is frozen past the TTL, keeper included. B takes the lease and writes; when A
/// wakes, its write is refused by the fence and its keeper cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_holder_is_fenced_out_and_cancelled() {
    for engine in ENGINES {
        let tdb = TestDb::new(engine).await;
        create_probe(&tdb.db).await;
        let ns = unique_namespace();
        let _keys = RedisKeysGuard::new(&ns);
        let cfg = short_cfg();
        let (acquired_tx, acquired_rx) = std::sync::mpsc::channel::<i64>();
        let (b_wrote_tx, b_wrote_rx) = std::sync::mpsc::channel::<()>();
        let url = tdb.url.clone();
        let (ns_a, cfg_a) = (ns.clone(), cfg.clone());
        let holder_a = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let redis = connect_redis(&redis_url()).await;
                let db = Db::connect(&url, &ConnectOptions::default())
                    .await
                    .expect("connect");
                let lease = acquire(&redis, &ns_a, &holder("w-a", "job-a"), &db, &cfg_a).await;
                let cancel = CancellationToken::new();
                let keeper = lease.spawn_keeper(&redis, cancel.clone());
                fenced_insert(&db, lease.fence(), 1)
                    .await
                    .expect("first write while holding");
                acquired_tx.send(lease.fence().token).expect("send");
                // Freeze the whole runtime (keeper too) until B has taken over and written.
                std::thread::sleep(SHORT_TTL);
                b_wrote_rx.recv().expect("B wrote");
                let stale = fenced_insert(&db, lease.fence(), 2).await;
                let cancelled = tokio::time::timeout(Duration::from_secs(10), cancel.cancelled())
                    .await
                    .is_ok();
                let released = lease.release(&redis).await.expect("release");
                db.close().await;
                (stale, cancelled, keeper.lost(), released)
            })
        });

        let redis = connect_redis(&redis_url()).await;
        let token_a = tokio::task::spawn_blocking(move || acquired_rx.recv().expect("A acquired"))
            .await
            .expect("join");
        let b = acquire_when_free(&redis, &ns, &holder("w-b", "job-b"), &tdb.db, &cfg).await;
        assert!(b.fence().token > token_a);
        fenced_insert(&tdb.db, b.fence(), 1)
            .await
            .expect("B writes");
        b_wrote_tx.send(()).expect("send");
        let (stale, cancelled, lost, released) =
            tokio::task::spawn_blocking(move || holder_a.join().expect("holder A"))
                .await
                .expect("join");

        match stale {
            Err(FenceError::FencedOut { mine, seen, .. }) => {
                assert_eq!((mine, seen), (token_a, b.fence().token))
            }
            other => panic!("{engine}: stale write must be fenced out, got {other:?}"),
        }
        assert!(cancelled, "{engine}: A's keeper must cancel its operation");
        assert!(lost.is_some(), "{engine}: A's keeper must record the loss");
        assert!(!released, "{engine}: A must not release B's lease");
        assert_eq!(
            rows_of(&tdb.db, token_a).await,
            1,
            "{engine}: the stale holder changed nothing after its pause"
        );
        assert_eq!(rows_of(&tdb.db, b.fence().token).await, 1);
        let st = lease::status(&redis, &ns, TARGET, None)
            .await
            .expect("status");
        assert_eq!(st.holder.expect("B holds").worker, "w-b");
        assert_serial(
            &fence::write_log(&tdb.db, &lease::fence_name(TARGET))
                .await
                .expect("log"),
        );
        b.release(&redis).await.expect("release");
        tdb.drop_db().await;
    }
}

/// Redis restarted without persistence while B holds the lease: C is granted the lease too,
/// but the database issues C a higher token, so B is fenced out — and C and later holders
/// are not fenced out by a counter that restarted at zero.
#[tokio::test]
async fn tokens_keep_increasing_when_redis_loses_its_data() {
    let mut private = PrivateRedis::start();
    let redis = connect_redis(&private.url()).await;
    for engine in ENGINES {
        let tdb = TestDb::new(engine).await;
        create_probe(&tdb.db).await;
        let ns = unique_namespace();
        let _keys = RedisKeysGuard::new(&ns);
        let cfg = short_cfg();

        let a = acquire_when_free(&redis, &ns, &holder("w-a", "a"), &tdb.db, &cfg).await;
        fenced_insert(&tdb.db, a.fence(), 1)
            .await
            .expect("A writes");
        let token_a = a.fence().token;
        a.release(&redis).await.expect("release A");

        let b = acquire_when_free(&redis, &ns, &holder("w-b", "b"), &tdb.db, &cfg).await;
        let cancel_b = CancellationToken::new();
        let keeper_b = b.spawn_keeper(&redis, cancel_b.clone());
        fenced_insert(&tdb.db, b.fence(), 1)
            .await
            .expect("B writes");
        assert!(b.fence().token > token_a);

        private.restart();

        let c = acquire_when_free(&redis, &ns, &holder("w-c", "c"), &tdb.db, &cfg).await;
        let (token_b, token_c) = (b.fence().token, c.fence().token);
        assert!(
            c.fence().token > b.fence().token,
            "{engine}: token went backwards after Redis lost its data"
        );
        let refused = fenced_insert(&tdb.db, b.fence(), 2).await;
        assert!(
            matches!(refused, Err(FenceError::FencedOut { .. })),
            "{engine}: B must be fenced out: {refused:?}"
        );
        fenced_insert(&tdb.db, c.fence(), 1)
            .await
            .expect("C writes");
        tokio::time::timeout(Duration::from_secs(10), cancel_b.cancelled())
            .await
            .expect("B's keeper notices");
        assert!(
            matches!(
                keeper_b.lost(),
                Some(LossReason::Expired | LossReason::Taken { .. })
            ),
            "{:?}",
            keeper_b.lost()
        );
        assert!(!b.release(&redis).await.expect("release B"));
        assert!(c.release(&redis).await.expect("release C"));

        let d = acquire_when_free(&redis, &ns, &holder("w-d", "d"), &tdb.db, &cfg).await;
        assert!(d.fence().token > token_c);
        fenced_insert(&tdb.db, d.fence(), 1)
            .await
            .expect("D is not fenced out");
        d.release(&redis).await.expect("release D");

        assert_eq!(rows_of(&tdb.db, token_b).await, 1);
        let log = fence::write_log(&tdb.db, &lease::fence_name(TARGET))
            .await
            .expect("log");
        assert_eq!(log.len(), 4);
        assert_serial(&log);
        tdb.drop_db().await;
    }
}

/// The other direction: the database's fence went back (restored from a backup) while Redis
/// remembers later grants; the Redis counter keeps the next token above them.
#[tokio::test]
async fn tokens_stay_above_the_redis_counter_when_the_fence_table_goes_back() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Postgres).await;
    let cfg = short_cfg();
    let mut last = 0;
    for i in 0..3 {
        let l = acquire(&redis, &ns, &holder("w", &format!("j{i}")), &tdb.db, &cfg).await;
        last = l.fence().token;
        l.release(&redis).await.expect("release");
    }
    tdb.db
        .execute(&format!("DELETE FROM {}", fence::FENCE_TABLE))
        .await
        .expect("simulate restore");
    let l = acquire(&redis, &ns, &holder("w", "after-restore"), &tdb.db, &cfg).await;
    assert!(
        l.fence().token > last,
        "token {} not above {last}",
        l.fence().token
    );
    l.release(&redis).await.expect("release");
    tdb.drop_db().await;
}

/// On MySQL/MariaDB, issuing a token holds the named lock that non-transactional maintenance
/// (`SessionLock`) takes until the new token is committed: released earlier, an old holder
/// could take the lock and pass its fence check on the old token in between, then run an
/// `OPTIMIZE TABLE` beside the new holder's batches. The issuer is held at the fence row by
/// another transaction, and the lock must be taken all that time. Fails if it is released
/// before the row.
#[tokio::test]
async fn a_token_being_issued_keeps_maintenance_out_until_it_is_committed() {
    let tdb = TestDb::new(Engine::MySql).await;
    let db = tdb.db.clone();
    let name = "target:issuing";
    fence::issue_token(&db, name, "first")
        .await
        .expect("first token");
    let lock_name = fence::mysql_lock_name(name);
    let used = async |db: &Db| -> bool {
        db.scalar_i64(&format!(
            "SELECT COUNT(*) FROM (SELECT IS_USED_LOCK('{lock_name}') AS holder) l WHERE holder IS NOT NULL"
        ))
        .await
        .expect("is_used_lock")
            > 0
    };
    let blocker = Db::connect(&tdb.url, &ConnectOptions::default())
        .await
        .expect("blocker");
    let mut row = blocker.begin_write().await.expect("begin");
    let hold = row.sql(format!(
        "SELECT token FROM {} WHERE name = ? FOR UPDATE",
        fence::FENCE_TABLE
    ));
    sessionfleet::on_tx!(&mut row, c => sqlx::query(hold).bind(name).execute(&mut *c).await.map(|_| ()).expect("hold the row"));

    let issuing = {
        let db = db.clone();
        tokio::spawn(async move { fence::issue_token(&db, name, "second").await })
    };
    // Until the issuer waits for the row (its statement running for a while).
    let started = std::time::Instant::now();
    while db
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND INFO LIKE '%{}%' AND INFO NOT LIKE '%PROCESSLIST%' AND TIME_MS > 300",
            fence::FENCE_TABLE
        ))
        .await
        .expect("processlist")
        == 0
    {
        assert!(!issuing.is_finished(), "the issuer did not wait for the row");
        assert!(started.elapsed() < Duration::from_secs(30), "no issuer waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        used(&db).await,
        "the maintenance lock is free while a token is being issued"
    );
    row.commit().await.expect("let the issuer go");
    let second = issuing.await.expect("task").expect("second token");
    assert_eq!(second.token, 2);
    assert!(!used(&db).await, "released once the token is stored");
    blocker.close().await;
    tdb.drop_db().await;
}

/// 3 contenders × 10 jobs on one target, each job three fenced writes through `with_lease`:
/// every job runs alone (no job is fenced out), every accepted token is in the audit log, and
/// the holders' write intervals follow one another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contenders_take_turns_on_every_engine() {
    const CONTENDERS: usize = 3;
    const JOBS: usize = 10;
    const WRITES: i64 = 3;
    let redis = connect_redis(&redis_url()).await;
    for engine in ENGINES {
        let tdb = TestDb::new(engine).await;
        create_probe(&tdb.db).await;
        let ns = unique_namespace();
        let _keys = RedisKeysGuard::new(&ns);
        let mut tasks = Vec::new();
        for w in 0..CONTENDERS {
            let (redis, db, ns) = (redis.clone(), tdb.db.clone(), ns.clone());
            tasks.push(tokio::spawn(async move {
                let cfg = short_cfg();
                let shutdown = CancellationToken::new();
                let mut tokens = Vec::new();
                for j in 0..JOBS {
                    let h = holder(&format!("w{w}"), &format!("job-{w}-{j}"));
                    loop {
                        let run = lease::with_lease(
                            &redis,
                            &ns,
                            TARGET,
                            &h,
                            &db,
                            &cfg,
                            &shutdown,
                            |ctx| async move {
                                let fence = ctx.fence.clone().expect("fence");
                                for seq in 0..WRITES {
                                    fenced_insert(&ctx.db, &fence, seq).await?;
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                                Ok::<_, FenceError>(())
                            },
                        )
                        .await;
                        match run {
                            Ok(r) => {
                                r.value
                                    .expect("no job may be fenced out while it holds the lease");
                                assert!(r.lost.is_none() && r.released);
                                tokens.push(r.token);
                                break;
                            }
                            Err(e) if e.is_busy() => tokio::time::sleep(cfg.busy_delay()).await,
                            Err(e) => panic!("with_lease: {e}"),
                        }
                    }
                }
                tokens
            }));
        }
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.extend(t.await.expect("contender"));
        }
        let log = fence::write_log(&tdb.db, &lease::fence_name(TARGET))
            .await
            .expect("log");
        assert_eq!(
            log.len(),
            CONTENDERS * JOBS,
            "{engine}: one log entry per accepted token"
        );
        tokens.sort();
        assert_eq!(
            log.iter().map(|e| e.token).collect::<Vec<_>>(),
            tokens,
            "{engine}"
        );
        assert!(log.iter().all(|e| e.writes == WRITES), "{engine}: {log:?}");
        assert_serial(&log);
        let total = tdb
            .db
            .scalar_i64("SELECT COUNT(*) FROM lease_probe")
            .await
            .expect("count");
        assert_eq!(total, (CONTENDERS * JOBS) as i64 * WRITES);
        tdb.drop_db().await;
    }
}

/// Leases are per target: two targets' operations hold their leases at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_targets_run_in_parallel() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let (pg, my) = (
        TestDb::new(Engine::Postgres).await,
        TestDb::new(Engine::MySql).await,
    );
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let run = |target: &'static str, db: Db| {
        let (redis, ns, barrier) = (redis.clone(), ns.clone(), barrier.clone());
        let (redis2, ns2) = (redis.clone(), ns.clone());
        async move {
            let cfg = short_cfg();
            lease::with_lease(
                &redis,
                &ns,
                target,
                &holder("w", target),
                &db,
                &cfg,
                &CancellationToken::new(),
                |ctx| async move {
                    let (redis, ns) = (redis2, ns2);
                    // Both must be inside their lease at once to pass the barrier.
                    let met = tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                        .await
                        .is_ok();
                    let held = lease::holders(&redis, &ns).await.expect("holders");
                    fenced_insert_probe(&ctx).await;
                    (met, held.len())
                },
            )
            .await
            .expect("with_lease")
        }
    };
    create_probe(&pg.db).await;
    create_probe(&my.db).await;
    let (a, b) = tokio::join!(run("pg", pg.db.clone()), run("my", my.db.clone()));
    assert!(
        a.value.0 && b.value.0,
        "both leases must be held at the same time"
    );
    assert_eq!((a.value.1, b.value.1), (2, 2));
    assert!(a.released && b.released);
    pg.drop_db().await;
    my.drop_db().await;
}

async fn fenced_insert_probe(ctx: &sessionfleet::ops::OpContext) {
    let fence = ctx.fence().expect("fence");
    fenced_insert(&ctx.db, fence, 0).await.expect("write");
}

#[tokio::test]
async fn db_fence_only_run_fences_out_an_older_lease_holder() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    create_probe(&tdb.db).await;
    let a = acquire(&redis, &ns, &holder("w-a", "job-a"), &tdb.db, &short_cfg()).await;
    let run = lease::with_db_fence_only(
        &tdb.db,
        TARGET,
        &holder("cli", "local"),
        &CancellationToken::new(),
        |ctx| async move {
            fenced_insert_probe(&ctx).await;
            ctx.fence.map(|f| f.token)
        },
    )
    .await
    .expect("db-only run");
    assert!(run.token > a.fence().token);
    assert_eq!(run.value, Some(run.token));
    assert!(matches!(
        fenced_insert(&tdb.db, a.fence(), 1).await,
        Err(FenceError::FencedOut { .. })
    ));
    assert_eq!(rows_of(&tdb.db, a.fence().token).await, 0);
    a.release(&redis).await.expect("release");
    tdb.drop_db().await;
}

/// When Redis grants the lease twice (data loss, failover), both holders hit the fence row at
/// once: token issues and fenced writes must queue on it, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fence_access_queues_instead_of_failing() {
    for engine in ENGINES {
        let tdb = TestDb::new(engine).await;
        create_probe(&tdb.db).await;
        let name = lease::fence_name(TARGET);
        fence::issue_token(&tdb.db, &name, "seed")
            .await
            .expect("first token creates the row");
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (db, name) = (tdb.db.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let f = fence::issue_token(&db, &name, &format!("h{i}")).await?;
                match fenced_insert(&db, &f, i).await {
                    Ok(()) | Err(FenceError::FencedOut { .. }) => Ok(f.token),
                    Err(e) => Err(e),
                }
            }));
        }
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(
                t.await
                    .expect("task")
                    .unwrap_or_else(|e| panic!("{engine}: {e}")),
            );
        }
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), 6, "{engine}: every issue got its own token");
        assert_serial(&fence::write_log(&tdb.db, &name).await.expect("log"));
        tdb.drop_db().await;
    }
}

/// A holder running statements that cannot sit in a transaction (an online index build,
/// `VACUUM`, MySQL's `ANALYZE TABLE`) holds the database's session lock for the fence. A new
/// token is not issued meanwhile: the request ends `Busy` (its job is deferred, not failed).
/// Once the lock is let go, the next request gets a newer token, and the old holder's next
/// checked statement is fenced out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_holder_defers_the_next_token_and_is_fenced_out_after() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let name = lease::fence_name(TARGET);
        let holder = fence::issue_token(&t.db, &name, "holder").await.unwrap();
        let mut lock = fence::SessionLock::acquire(&t.db, &holder)
            .await
            .expect("session lock");
        lock.execute_checked("SELECT 1")
            .await
            .expect("the holder's statement");

        let request = fence::issue_token(&t.db, &name, "next").await;
        assert!(
            matches!(request, Err(FenceError::Busy(_))),
            "{engine}: {request:?}"
        );
        lock.release().await.expect("release");

        let newer = fence::issue_token(&t.db, &name, "next")
            .await
            .expect("a token once the lock is free");
        assert!(newer.token > holder.token, "{engine}");
        let mut again = fence::SessionLock::acquire(&t.db, &holder)
            .await
            .expect("the lock itself is free");
        let stale = again.execute_checked("SELECT 1").await;
        assert!(
            matches!(stale, Err(FenceError::FencedOut { .. })),
            "{engine}: {stale:?}"
        );
        again.release().await.expect("release");
        t.drop_db().await;
    }
}

/// A holder frozen *inside* a fenced transaction (a SIGSTOP between two statements of a
/// batch) keeps the fence row locked. The next holder's token request gives up after the lock
/// wait with `Busy` (so its job is deferred, not failed); once the server ends the stalled
/// session, the next request gets a newer token, and the frozen holder's batch is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_mid_transaction_is_rolled_back_by_the_server() {
    for engine in [Engine::Postgres] {
        let t = TestDb::new(engine).await;
        create_probe(&t.db).await;
        let name = lease::fence_name(TARGET);
        let stale = fence::issue_token(&t.db, &name, "frozen").await.unwrap();
        // The frozen holder: a batch that wrote one row and never commits.
        let mut tx = stale.begin(&t.db).await.unwrap();
        let sql = tx.sql("INSERT INTO lease_probe (token, seq) VALUES (?, 1)");
        sessionfleet::on_tx!(&mut tx, c => { sqlx::query(sql).bind(stale.token).execute(&mut *c).await.unwrap(); });

        let first = fence::issue_token(&t.db, &name, "next").await;
        assert!(
            matches!(first, Err(FenceError::Busy(_))),
            "{engine}: {first:?}"
        );
        // The server ends the stalled session after STALLED_TRANSACTION_TIMEOUT; without
        // that limit every request stays Busy and the attempts run out.
        let mut newer = None;
        for _ in 0..6 {
            match fence::issue_token(&t.db, &name, "next").await {
                Ok(f) => {
                    newer = Some(f);
                    break;
                }
                Err(FenceError::Busy(_)) => continue,
                Err(e) => panic!("{engine}: {e}"),
            }
        }
        let newer = newer.expect("a newer token once the server ended the frozen session");
        assert!(newer.token > stale.token);
        assert!(
            tx.commit().await.is_err(),
            "{engine}: the frozen batch commits nothing"
        );
        assert_eq!(rows_of(&t.db, stale.token).await, 0, "{engine}");
        t.drop_db().await;
    }
}

/// A session lock dropped without `release` (an error or a cancelled task) must not stay
/// with a pooled connection: the connection is closed and the server frees the lock.
#[tokio::test]
async fn a_session_lock_dropped_without_release_is_freed_by_the_server() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let name = lease::fence_name(TARGET);
        let first = fence::issue_token(&t.db, &name, "first").await.unwrap();
        let lock = fence::SessionLock::acquire(&t.db, &first).await.unwrap();
        drop(lock);
        // Another process, with its own pool: issuing a token takes the same session lock
        // and gives up after the lock wait if the dropped holder still had it.
        let other = Db::connect(&t.url, &ConnectOptions::default())
            .await
            .unwrap();
        let next = fence::issue_token(&other, &name, "next").await;
        assert!(next.is_ok(), "{engine}: {next:?}");
        other.close().await;
        t.drop_db().await;
    }
}

/// A session lock's session ends by itself once it sits idle for `SESSION_LOCK_IDLE_LIMIT`
/// (a holder frozen between two maintenance statements must not keep the target's writers
/// out for as long as it stays frozen), and its session never reaches the pool: its
/// connection is closed even after a clean release. Fails if the session has no idle limit,
/// if a pooled PostgreSQL connection carries the lock's `idle_session_timeout` afterwards, or
/// if the lock's MySQL connection is among the pool's afterwards. (On MySQL every pooled
/// connection has `wait_timeout` = 60 s by design, `store::MYSQL_IDLE_CONNECTION_TIMEOUT`, so
/// a setting cannot tell the lock's connection apart: its connection id does.)
#[tokio::test]
async fn a_session_lock_s_session_has_an_idle_limit_that_stays_with_it() {
    for engine in [Engine::Postgres, Engine::MySql] {
        let t = TestDb::new(engine).await;
        let name = lease::fence_name(TARGET);
        let first = fence::issue_token(&t.db, &name, "first").await.unwrap();
        let mut lock = fence::SessionLock::acquire(&t.db, &first).await.unwrap();
        // 60 s, as each engine spells it.
        assert_eq!(fence::SESSION_LOCK_IDLE_LIMIT.as_secs(), 60);
        let (setting, expected) = match engine {
            Engine::Postgres => ("idle_session_timeout", "1min"),
            _ => ("wait_timeout", "60"),
        };
        let seen = lock.setting(setting).await.unwrap();
        assert_eq!(seen.as_deref(), Some(expected), "{engine}");
        // MySQL/MariaDB: `pseudo_thread_id` is the session's connection id.
        let lock_session = match engine {
            Engine::MySql => lock.setting("pseudo_thread_id").await.unwrap(),
            _ => None,
        };
        lock.release().await.unwrap();
        match engine {
            Engine::Postgres => {
                for mut c in t.every_postgres_connection().await {
                    let v: String =
                        sqlx::query_scalar("SELECT current_setting('idle_session_timeout')")
                            .fetch_one(&mut *c)
                            .await
                            .unwrap();
                    assert_eq!(v, "0", "a pooled connection has no idle limit");
                }
            }
            _ => {
                let lock_session: u64 = lock_session
                    .expect("the lock's connection id")
                    .parse()
                    .unwrap();
                for mut c in t.every_mysql_connection().await {
                    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                        .fetch_one(&mut *c)
                        .await
                        .unwrap();
                    assert_ne!(
                        id, lock_session,
                        "the session lock's connection went back to the pool"
                    );
                }
            }
        }
        t.drop_db().await;
    }
}

fn registry_key(ns: &str) -> String {
    format!("{ns}:lease-targets")
}

/// `holders_among` reads the holder records of the targets it is given and of those the
/// namespace's registry lists (every acquisition registers its target), never walking the
/// keyspace: a lease key that no acquisition registered and nobody asks about stays unseen.
#[tokio::test]
async fn holders_are_read_by_target_from_the_configuration_and_the_registry() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let cfg = short_cfg();
    let mut con = redis.clone();

    // Acquired elsewhere: a target this process does not configure, found by the registry.
    let elsewhere = lease::try_acquire(
        &redis,
        &ns,
        "elsewhere",
        &holder("w-2", "job-2"),
        &tdb.db,
        &cfg,
    )
    .await
    .expect("try_acquire")
    .expect("lease free");
    let registered: Vec<String> = redis::cmd("ZRANGE")
        .arg(registry_key(&ns))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(registered, vec!["elsewhere".to_string()]);
    let held = lease::holders_among(&redis, &ns, ["configured"])
        .await
        .expect("holders");
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].0, "elsewhere");
    assert_eq!(held[0].1.job_id, "job-2");
    assert_eq!(held[0].1.token, Some(elsewhere.fence().token));

    // A configured target whose acquisition left no registry entry (its registration failed,
    // or an older worker took it) is still found: it is read by name.
    let configured = lease::try_acquire(
        &redis,
        &ns,
        "configured",
        &holder("w-1", "job-1"),
        &tdb.db,
        &cfg,
    )
    .await
    .expect("try_acquire")
    .expect("lease free");
    let _: i64 = redis::cmd("ZREM")
        .arg(registry_key(&ns))
        .arg("configured")
        .query_async(&mut con)
        .await
        .unwrap();
    let held = lease::holders_among(&redis, &ns, ["configured", "not a target", "free"])
        .await
        .expect("holders");
    let names: Vec<&str> = held.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["configured", "elsewhere"], "sorted by target");
    assert_eq!(held[0].1.job_id, "job-1");
    let names: Vec<String> = lease::holders(&redis, &ns)
        .await
        .expect("holders")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        names,
        ["elsewhere"],
        "without configuration, the registry alone"
    );

    // Not found by walking keys: a held lease nobody registered or asked about.
    let ghost = format!("{ns}:lease-holder:{{{ns}:ghost}}");
    let _: () = redis::cmd("HSET")
        .arg(&ghost)
        .arg(&[
            "owner", "o", "worker", "w-3", "job_id", "job-3", "token", "1",
        ])
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(lease_key(&ns, "ghost"))
        .arg("o")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut con)
        .await
        .unwrap();
    let names: Vec<String> = lease::holders_among(&redis, &ns, ["configured"])
        .await
        .expect("holders")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(names, ["configured", "elsewhere"]);

    configured.release(&redis).await.expect("release");
    elsewhere.release(&redis).await.expect("release");
    assert!(
        lease::holders_among(&redis, &ns, ["configured"])
            .await
            .expect("holders")
            .is_empty(),
        "released leases are free, though still registered"
    );
    tdb.drop_db().await;
}

/// The registry keeps the most recently acquired targets, at most `REGISTERED_TARGETS`.
#[tokio::test]
async fn the_lease_registry_is_bounded_to_the_latest_targets() {
    let redis = connect_redis(&redis_url()).await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let tdb = TestDb::new(Engine::Sqlite).await;
    let mut con = redis.clone();
    let key = registry_key(&ns);
    let over = lease::REGISTERED_TARGETS + 10;
    let mut p = redis::pipe();
    for i in 0..over {
        p.zadd(&key, format!("old-{i}"), i as i64).ignore();
    }
    let _: () = p.query_async(&mut con).await.unwrap();

    let l = acquire(&redis, &ns, &holder("w", "j"), &tdb.db, &short_cfg()).await;
    let count: usize = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(count, lease::REGISTERED_TARGETS);
    let newest: Vec<String> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(-1)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(newest, vec![TARGET.to_string()]);
    let oldest_left: Option<f64> = redis::cmd("ZSCORE")
        .arg(&key)
        .arg("old-0")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(oldest_left, None, "the oldest entries went");
    let held = lease::holders(&redis, &ns).await.expect("holders");
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].0, TARGET);
    l.release(&redis).await.expect("release");
    tdb.drop_db().await;
}
