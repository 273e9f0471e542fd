//! The `sessionfleet` CLI end to end: the real binary against real Redis, SQLite and
//! PostgreSQL, with real worker processes where the fleet is involved.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sessionfleet::seed::{SeedParams, seed_demo};
use sessionfleet::store::{Engine, SchemaVersion};
use sessionfleet::testing::{ClosedPort, RedisKeysGuard, TestDb, redis_url, unique_namespace};
use sessionfleet_e2e::{Worker, WorkerSpec, binary, eventually, queue};

/// One invocation of `sessionfleet` with its own namespace and database.
struct Cli {
    ns: String,
    db_url: String,
    redis: String,
    extra: Vec<(String, String)>,
    /// The namespace's keys go when the `Cli` that made it goes.
    _keys: Option<RedisKeysGuard>,
}

impl Cli {
    fn new(db_url: &str) -> Cli {
        let ns = unique_namespace();
        Cli {
            _keys: Some(RedisKeysGuard::new(&ns)),
            ns,
            db_url: db_url.into(),
            redis: redis_url(),
            extra: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = binary("sessionfleet");
        c.args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.redis)
            .env("SESSIONFLEET_NAMESPACE", &self.ns)
            .envs(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run sessionfleet")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(
            out.status.success() || out.status.code() == Some(3),
            "{args:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: stdout is not one JSON document ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Waits until a worker of this namespace polls the cleanup queue: a waiting command
    /// gives up after two seconds without one.
    async fn wait_for_a_worker(&self) {
        let q = queue(&self.redis, &self.ns).await;
        eventually(Duration::from_secs(60), "a live worker", || async {
            let live = q
                .live_workers(Some(sessionfleet::jobs::QueueClass::Cleanup))
                .await
                .ok()?;
            (!live.is_empty()).then_some(())
        })
        .await;
    }

    fn worker(&self, label: &str) -> Worker {
        let mut spec = WorkerSpec::new(&self.redis, &self.ns, label);
        spec.env.push(("DATABASE_URL".into(), self.db_url.clone()));
        spec.env.extend(self.extra.iter().cloned());
        Worker::start(&spec)
    }
}

/// One-row batches, each followed by a rest 100 times as long: a cleanup of a couple of
/// thousand demo sessions then lasts minutes, long enough to act on while it runs.
fn slow_cleanup() -> Vec<(String, String)> {
    [
        ("SESSION_CLEANUP_BATCH_SIZE", "1"),
        ("SESSION_CLEANUP_TARGET_BATCH_MS", "1"),
        ("SESSION_CLEANUP_REST_RATIO", "100"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// Expired plus orphaned sessions in a text cleanup report.
fn reported_deletions(stdout: &str) -> i64 {
    let field = |name: &str| -> i64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in: {stdout}"))
            .parse()
            .expect("a number")
    };
    field("expired_sessions_cleaned") + field("orphaned_sessions_cleaned")
}

/// A `sessionfleet` process whose stdout and stderr are collected as they come; killed and
/// waited for when dropped, so a failing test leaves no process behind.
struct Spawned {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    fn start(mut cmd: Command) -> Spawned {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sessionfleet");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (err_sink, out_sink) = (stderr.clone(), stdout.clone());
        let err = child.stderr.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    err_sink.lock().unwrap().push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = std::io::Read::read_to_end(&mut out, &mut buf);
                out_sink.lock().unwrap().extend(buf);
            }),
        ];
        Spawned {
            child,
            stderr,
            stdout,
            readers,
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The first stderr line containing `needle`, once written; panics if the process ends
    /// first, or after `limit` (a hang guard only: the outcome never depends on it).
    async fn line_with(&mut self, needle: &str, limit: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                if let Some(l) = self
                    .stderr
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return l.clone();
                }
                panic!(
                    "ended ({status}) before writing {needle:?}: {}",
                    self.stderr_text()
                );
            }
            assert!(
                started.elapsed() < limit,
                "no {needle:?} after {limit:?}: {}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
    }

    /// Waits for the process to end: its status, stdout and stderr.
    fn finish(&mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.child.wait().expect("wait");
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout = String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned();
        (status, stdout, self.stderr_text())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Expired plus orphaned sessions in a JSON cleanup report.
fn reported(report: &serde_json::Value) -> i64 {
    let field = |name: &str| {
        report[name]
            .as_i64()
            .unwrap_or_else(|| panic!("no {name} in: {report}"))
    };
    field("expired_sessions_cleaned") + field("orphaned_sessions_cleaned")
}

fn now() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

async fn seeded(engine: Engine, sessions: u64) -> TestDb {
    let t = TestDb::new(engine).await;
    seed_demo(
        &t.db,
        &SeedParams::new(sessions, 3, SchemaVersion::V2, now()),
    )
    .await
    .unwrap();
    t
}

/// Sessions a cleanup must delete (v2 rules), counted independently of the tool.
async fn doomed(t: &TestDb) -> i64 {
    sessionfleet_e2e::doomed_v2(&t.db).await
}

async fn total(t: &TestDb) -> i64 {
    t.db.scalar_i64("SELECT COUNT(*) FROM user_sessions")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_once_through_the_fleet_deletes_exactly_the_doomed_sessions() {
    for engine in [Engine::Sqlite, Engine::Postgres] {
        let t = seeded(engine, 3000).await;
        let (before, doomed_before) = (total(&t).await, doomed(&t).await);
        assert!(doomed_before > 0);
        let cli = Cli::new(&t.url);
        let _w = cli.worker("cleanup");
        let report = cli.json(&["cleanup", "--once", "--json", "--timeout", "120"]);
        let cleaned = report["expired_sessions_cleaned"].as_i64().unwrap()
            + report["orphaned_sessions_cleaned"].as_i64().unwrap();
        assert_eq!(cleaned, doomed_before, "{engine}: {report}");
        assert_eq!(total(&t).await, before - doomed_before, "{engine}");
        assert_eq!(doomed(&t).await, 0, "{engine}");
        t.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_without_a_worker_says_so_and_names_local() {
    let t = seeded(Engine::Sqlite, 100).await;
    let cli = Cli::new(&t.url);
    let started = Instant::now();
    let out = cli.run(&["cleanup", "--once"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no live worker")
            && err.contains("--local")
            && err.contains("sessionfleet-worker"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it must not hang"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "one error line: {err}"
    );
    t.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_runs_without_workers_and_without_redis() {
    let t = seeded(Engine::Sqlite, 2000).await;
    let doomed_before = doomed(&t).await;
    let cli = Cli::new(&t.url);
    let report = cli.json(&["--local", "cleanup", "--once", "--json"]);
    let cleaned = report["expired_sessions_cleaned"].as_i64().unwrap()
        + report["orphaned_sessions_cleaned"].as_i64().unwrap();
    assert_eq!(cleaned, doomed_before);

    // Redis down: the command still runs, fenced by the database alone, and says so.
    let t2 = seeded(Engine::Sqlite, 2000).await;
    let doomed2 = doomed(&t2).await;
    let mut down = Cli::new(&t2.url);
    let redis_down = ClosedPort::new();
    down.redis = format!("redis://127.0.0.1:{}", redis_down.port());
    let out = down.run(&["cleanup", "--once", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("database fence alone"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["expired_sessions_cleaned"].as_i64().unwrap()
            + report["orphaned_sessions_cleaned"].as_i64().unwrap(),
        doomed2
    );
    let fence = t2
        .db
        .scalar_i64("SELECT COUNT(*) FROM sessionfleet_fence")
        .await
        .unwrap();
    assert_eq!(fence, 1, "a token was issued by the database");
    t.drop_db().await;
    t2.drop_db().await;
}

/// Ctrl-C during a local cleanup: it stops at the next batch boundary, and the report of
/// what it deleted is still printed, with the error after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_local_cleanup_shows_what_it_deleted() {
    let t = seeded(Engine::Sqlite, 2000).await;
    let before = total(&t).await;
    let mut cli = Cli::new(&t.url);
    // Tiny batches with long rests: the run lasts long enough to be interrupted mid-way.
    cli.extra = slow_cleanup();
    let mut run = Spawned::start(cli.command(&["--local", "cleanup", "--once"]));
    // A local run shows where it stands, from the operation itself: read until it does,
    // however long the machine takes (the run lasts minutes).
    run.line_with(
        "cleanup on default: part 1 running on ",
        Duration::from_secs(120),
    )
    .await;
    let started = Instant::now();
    while total(&t).await == before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no batch committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.signal("INT");
    let (status, stdout, stderr) = run.finish();
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    let deleted = before - total(&t).await;
    assert!(
        deleted > 0 && doomed(&t).await > 0,
        "interrupted mid-way: {deleted} deleted"
    );
    assert_eq!(
        reported_deletions(&stdout),
        deleted,
        "the report counts what was deleted: {stdout}"
    );
    for expected in [
        "outcome: cancelled",
        "remaining: not counted",
        "Error: interrupted",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in: {stdout}");
    }
    assert!(
        stderr.contains("stopped after") && !stderr.contains("continuing"),
        "{stderr}"
    );
    t.drop_db().await;
}

/// `--timeout` bounds a `--local` run itself, not only waits: a cleanup that would take
/// minutes stops at its next batch boundary once the time is up, exits 4 and reports what it
/// deleted (whatever that is when the time runs out: the report and the table agree). Fails
/// if the run goes on to the end (exit 0) or ends as a failure (exit 1). Its progress lines
/// are checked without a deadline, in `an_interrupted_local_cleanup_shows_what_it_deleted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cleanup_stops_at_its_timeout_and_exits_4() {
    let t = seeded(Engine::Sqlite, 2000).await;
    let before = total(&t).await;
    let mut cli = Cli::new(&t.url);
    // One-row batches, each followed by a rest 100 times as long: over a thousand rows to
    // delete take minutes (over 100 s on the 2-core CI machine), far beyond the three
    // seconds allowed.
    cli.extra = slow_cleanup();
    let out = cli.run(&["--local", "--timeout", "3", "cleanup", "--once"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(doomed(&t).await > 0, "stopped before the end");
    let deleted = before - total(&t).await;
    assert_eq!(
        reported_deletions(&stdout),
        deleted,
        "the report counts what was deleted: {stdout}"
    );
    for expected in ["outcome: cancelled", "Error: timed out after 3s"] {
        assert!(stdout.contains(expected), "{expected:?} in: {stdout}");
    }
    assert!(stderr.contains("timed out after 3s"), "{stderr}");
    t.drop_db().await;
}

/// With several targets, a failure (1) outranks a timeout (4), as the README's exit-code
/// table says: `--all-targets --local` over a target whose database file does not exist
/// (refused at once, before any deadline) and one whose slowed cleanup cannot finish within
/// the 3 s allowed. The same invocation with the missing database replaced by a real one
/// exits 4, so the 1 comes from the failure, not from the timeout. Fails if the timeout's
/// code wins, or the failed target is dropped from the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_targets_a_failure_outranks_a_timeout() {
    let slow = seeded(Engine::Sqlite, 2000).await;
    let small = seeded(Engine::Sqlite, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}/missing.db", dir.path().display());
    let config = |a_url: &str| {
        let path = dir
            .path()
            .join(format!("sf-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &path,
            format!(
                "default_target = \"b_slow\"\n[targets.a_first]\nurl = \"{a_url}\"\n\
                 [targets.b_slow]\nurl = \"{}\"\n",
                slow.url
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let mut cli = Cli::new(&slow.url);
    cli.extra = slow_cleanup();
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config(&missing)));
    let args = [
        "--local",
        "--all-targets",
        "--timeout",
        "3",
        "cleanup",
        "--once",
        "--json",
    ];
    let out = cli.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let run = |name: &str| {
        doc.as_array()
            .expect("one entry per target")
            .iter()
            .find(|r| r["target"] == name)
            .unwrap_or_else(|| panic!("no run of {name}: {doc}"))
            .clone()
    };
    let (failed, timed) = (run("a_first"), run("b_slow"));
    assert_eq!(failed["timed_out"], false, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing.db") && e.contains("does not exist")),
        "{failed}"
    );
    assert_eq!(timed["timed_out"], true, "{timed}");
    assert!(doomed(&slow).await > 0, "the slow target did not finish");
    for (target, what) in [("a_first", "failed"), ("b_slow", "timed out")] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error:") && l.contains(target) && l.contains(what)),
            "{target} {what}: {stderr}"
        );
    }

    // The control: the same targets with a real database first time out, and only that.
    cli.extra.pop();
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config(&small.url)));
    let out = cli.run(&args);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slow.drop_db().await;
    small.drop_db().await;
}

/// A command that needs Redis and finds it down exits 5 with one line saying so, and does
/// not fall back to a local run: `--no-wait` (which only enqueues) and the scheduler. Fails
/// if either runs locally, waits forever, or reports another code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_and_the_scheduler_exit_5_when_redis_is_down() {
    let t = seeded(Engine::Sqlite, 300).await;
    let doomed_before = doomed(&t).await;
    assert!(doomed_before > 0);
    let mut cli = Cli::new(&t.url);
    let redis_down = ClosedPort::new();
    cli.redis = format!("redis://127.0.0.1:{}", redis_down.port());
    for args in [&["--no-wait", "cleanup", "--once"][..], &["schedule"][..]] {
        let out = cli.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(
            matches!(errors[..], [line] if line.contains(&format!("127.0.0.1:{}", redis_down.port()))),
            "{args:?}: one error line naming Redis: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: no job id printed");
    }
    assert_eq!(doomed(&t).await, doomed_before, "nothing ran locally");
    t.drop_db().await;
}

/// A wait for the fleet that runs out is exit 4 and names the job, which goes on in the
/// worker; with `--json` the document says `timed_out` for that run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_the_fleet_that_times_out_exits_4_and_names_the_job() {
    let t = seeded(Engine::Sqlite, 2000).await;
    let mut cli = Cli::new(&t.url);
    cli.extra = slow_cleanup();
    let _w = cli.worker("timeout");
    cli.wait_for_a_worker().await;
    let out = cli.run(&["--timeout", "3", "cleanup", "--once", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let run = &doc[0];
    assert_eq!(run["timed_out"], true, "{doc}");
    let error = run["error"].as_str().expect("an error");
    assert!(
        error.contains("timed out after 3s waiting for job") && error.contains("keeps running"),
        "{error}"
    );
    assert!(stderr.contains("stopped: timed out"), "{stderr}");
    t.drop_db().await;
}

/// While a part runs, what it has committed so far is published in Redis with who runs it,
/// and the waiting CLI shows it; the published rows grow as batches commit. Fails if parts
/// publish nothing, or the CLI still says "waiting for a worker" once one runs the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_part_s_progress_is_published_and_shown() {
    let t = seeded(Engine::Sqlite, 2000).await;
    let mut cli = Cli::new(&t.url);
    cli.extra = slow_cleanup();
    let _w = cli.worker("progress");
    cli.wait_for_a_worker().await;
    // No short timeout: the CLI waits as long as the job runs (minutes), and the test reads
    // its stderr until the progress line shows, however long the machine takes.
    let mut waiting = Spawned::start(cli.command(&["cleanup", "--once"]));
    waiting
        .line_with(
            "cleanup on default: part 1 running on ",
            Duration::from_secs(120),
        )
        .await;
    // The job's ids, from its payload in the queue (the only job of this namespace).
    let q = queue(&cli.redis, &cli.ns).await;
    let payloads: Vec<String> = redis::cmd("HVALS")
        .arg(sessionfleet::queue::Keys::new(&cli.ns).data(sessionfleet::jobs::QueueClass::Cleanup))
        .query_async(&mut q.connection())
        .await
        .unwrap();
    let [payload] = &payloads[..] else {
        panic!("one cleanup job: {payloads:?}")
    };
    let payload = payload.replace('\\', "");
    let id_of = |field: &str| -> uuid::Uuid {
        payload
            .split(&format!("\"{field}\":\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in: {payload}"))
    };
    let (run_id, job_id) = (id_of("run_id"), id_of("job_id"));
    // The job runs in the worker: its published rows keep growing.
    let first = eventually(Duration::from_secs(60), "published progress", || async {
        q.progress(run_id)
            .await
            .ok()
            .flatten()
            .filter(|p| p.done.rows > 0)
    })
    .await;
    assert_eq!(first.part, 0);
    // `jobs show` with the run id, or the running job's id, says the same.
    for id in [run_id.to_string(), job_id.to_string()] {
        let show = cli.run(&["jobs", "show", &id]);
        let shown = String::from_utf8_lossy(&show.stdout);
        assert!(show.status.success(), "{id}: {shown}");
        assert!(
            shown.contains(&format!("part 1: running on {}", first.worker))
                && shown.contains("rows in"),
            "{id}: {shown}"
        );
    }
    let live = q.live_workers(None).await.expect("live workers");
    assert!(
        live.iter().any(|w| w.name == first.worker),
        "published by the worker that runs it: {first:?} {live:?}"
    );
    eventually(Duration::from_secs(60), "more rows committed", || async {
        q.progress(run_id)
            .await
            .ok()
            .flatten()
            .filter(|p| p.done.rows > first.done.rows && p.done.batches > first.done.batches)
    })
    .await;
    // Ctrl-C ends the wait, not the job (the worker goes on with it until it is stopped).
    waiting.signal("INT");
    waiting.finish();
    t.drop_db().await;
}

/// `--database-url` names the database for `--local` runs: a job command given it for the
/// fleet refuses it in one line and enqueues nothing, since the worker would run the job on
/// the database its own configuration names (here the other one). Fails if the flag is
/// silently ignored and the worker's database is cleaned instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_flag_is_not_sent_to_a_worker_that_would_ignore_it() {
    let workers_db = seeded(Engine::Sqlite, 300).await;
    let named = seeded(Engine::Sqlite, 300).await;
    let cli = Cli::new(&workers_db.url);
    let _w = cli.worker("dburl");
    cli.wait_for_a_worker().await;
    let before = (doomed(&workers_db).await, doomed(&named).await);
    assert!(before.0 > 0 && before.1 > 0, "{before:?}");
    for args in [
        &["--database-url", &named.url, "cleanup", "--once"][..],
        &[
            "--database-url",
            &named.url,
            "--no-wait",
            "cleanup",
            "--once",
        ][..],
        &["--database-url", &named.url, "schedule"][..],
    ] {
        let out = cli.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--database-url applies only with --local") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    let q = queue(&cli.redis, &cli.ns).await;
    let depths = q.queue_depths().await.unwrap();
    assert!(
        depths
            .iter()
            .all(|d| d.ready + d.running + d.scheduled == 0),
        "nothing enqueued: {depths:?}"
    );
    assert_eq!(
        doomed(&workers_db).await,
        before.0,
        "the worker's database untouched"
    );
    // With --local the flag's database is the one cleaned.
    let out = cli.run(&["--database-url", &named.url, "--local", "cleanup", "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(doomed(&named).await, 0);
    assert_eq!(doomed(&workers_db).await, before.0);
    workers_db.drop_db().await;
    named.drop_db().await;
}

/// A job enqueued with `--no-wait` before any worker runs: `jobs show` says where it waits,
/// in text and JSON, and once a worker has run it, its result. Fails if a queued job is
/// reported unknown, or the enqueue's JSON lacks its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_shows_where_it_waits_then_its_result() {
    let t = seeded(Engine::Sqlite, 300).await;
    let cli = Cli::new(&t.url);
    let enqueued = cli.json(&["--no-wait", "--json", "cleanup", "--once"]);
    let [job] = enqueued.as_array().expect("one job per target").as_slice() else {
        panic!("one target: {enqueued}")
    };
    assert_eq!(job["accepted"], true, "{job}");
    let task = job["task_id"].as_str().expect("task id");
    let job_id = job["job_id"].as_str().expect("job id").to_string();
    let out = cli.run(&["jobs", "show", &job_id]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("waiting in the 'cleanup' queue: ready, 1 of 1 in line"),
        "{shown}"
    );
    let waiting = cli.json(&["jobs", "show", &job_id, "--json"]);
    assert_eq!(waiting["state"], "ready", "{waiting}");
    assert_eq!(waiting["run_id"], job["run_id"], "{waiting}");
    assert_eq!(waiting["task_id"].as_str(), Some(task), "{waiting}");

    let _w = cli.worker("queued");
    let q = queue(&cli.redis, &cli.ns).await;
    let id: uuid::Uuid = job_id.parse().unwrap();
    eventually(Duration::from_secs(120), "the job's result", || async {
        q.result(id).await.ok().flatten()
    })
    .await;
    let done = cli.json(&["jobs", "show", &job_id, "--json"]);
    assert_eq!(done["outcome"], "succeeded", "{done}");
    t.drop_db().await;
}

/// `log_format = "json"` in the configuration file makes the CLI's logs JSON, as it does the
/// worker's (only the environment variable used to). Fails if the logs stay text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_s_log_format_applies_to_the_cli() {
    let t = seeded(Engine::Sqlite, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("json.toml");
    std::fs::write(&config, "log_format = \"json\"\n").unwrap();
    let mut cli = Cli::new(&t.url);
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config.display().to_string()));
    let out = cli.run(&["-v", "cleanup", "--local", "--once"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["level"].is_string())
        .collect();
    assert!(!logs.is_empty(), "no JSON log line: {stderr}");

    // With JSON logs, every stderr line is one JSON object: the notes for people and the
    // warning of a fall-back to a local run (Redis down) too, not plain lines among them.
    // A RUST_LOG narrowed to another target must not silence them.
    let redis_down = ClosedPort::new();
    cli.redis = format!("redis://127.0.0.1:{}", redis_down.port());
    cli.extra.push(("RUST_LOG".into(), "sqlx=warn".into()));
    let out = cli.run(&["cleanup", "--once"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}\n{stderr}"
        );
    }
    assert!(
        stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("database fence alone"))),
        "the fall-back warning is not a JSON event: {stderr}"
    );
    t.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_fans_out_one_job_per_database() {
    let dbs = [
        seeded(Engine::Sqlite, 800).await,
        seeded(Engine::Sqlite, 900).await,
        seeded(Engine::Postgres, 700).await,
    ];
    let mut expected = Vec::new();
    for d in &dbs {
        expected.push(total(d).await - doomed(d).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sf.toml");
    std::fs::write(
        &config,
        format!(
            "default_target = \"a\"\n[targets.a]\nurl = \"{}\"\n[targets.b]\nurl = \"{}\"\n[targets.c]\nurl = \"{}\"\n",
            dbs[0].url, dbs[1].url, dbs[2].url
        ),
    )
    .unwrap();
    let mut cli = Cli::new(&dbs[0].url);
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config.display().to_string()));
    let _w = cli.worker("targets");
    let doc = cli.json(&[
        "--all-targets",
        "cleanup",
        "--once",
        "--json",
        "--timeout",
        "120",
    ]);
    let runs = doc.as_array().expect("one entry per target");
    let names: BTreeSet<&str> = runs.iter().map(|r| r["target"].as_str().unwrap()).collect();
    // DATABASE_URL names database a: that is target a, not a second target on it.
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
    for (d, want) in dbs.iter().zip(expected) {
        assert_eq!(total(d).await, want);
    }
    for d in dbs {
        d.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_maintenance_summary_and_dry_run() {
    let t = seeded(Engine::Sqlite, 3000).await;
    let before = total(&t).await;
    let cli = Cli::new(&t.url);
    let _w = cli.worker("full");

    let dry = cli.json(&[
        "maintenance",
        "--full-maintenance",
        "--dry-run",
        "--json",
        "--timeout",
        "120",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(total(&t).await, before, "a dry run deletes nothing");
    let fence_tables =
        t.db.scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sessionfleet_fence'")
            .await
            .unwrap();
    assert_eq!(
        fence_tables, 0,
        "a dry run writes nothing, not even the fence table"
    );
    assert!(
        dry["summary"]["actions_taken"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("Would clean"))
    );

    let doomed_before = doomed(&t).await;
    let full = cli.json(&[
        "maintenance",
        "--full-maintenance",
        "--json",
        "--timeout",
        "120",
    ]);
    let summary = &full["summary"];
    // Every stage succeeded: not "completed_with_errors", and no error listed.
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(full["errors"].as_array().map(Vec::len), Some(0), "{full}");
    let actions: Vec<&str> = summary["actions_taken"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("Cleaned") && a.ends_with("expired sessions")),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("Created") && a.ends_with("database indexes")),
        "{actions:?}"
    );
    assert!(
        !summary["recommendations"].as_array().unwrap().is_empty(),
        "the summary carries the recommendations"
    );
    assert!(full["analytics"]["health_status"]["overall_health"].is_string());
    assert_eq!(total(&t).await, before - doomed_before);
    t.drop_db().await;
}

/// Full maintenance goes on past a stage that fails and exits 1 end to end: the report is
/// printed with `completed_with_errors` and the failure, the other stages did their work,
/// and stderr has one line naming it. The failure is real and certain: a table holding the
/// name of a recommended index the database lacks, so SQLite refuses to build that index.
/// Fails if the run stops at the failed stage, exits 0, or hides the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_maintenance_past_a_failed_stage_exits_1_with_the_report() {
    use sessionfleet::ops::maintenance;

    let t = seeded(Engine::Sqlite, 1000).await;
    let missing = maintenance::missing_recommended_indexes(&t.db)
        .await
        .unwrap();
    let [blocked, rest @ ..] = &missing[..] else {
        panic!("the demo data lacks recommended indexes")
    };
    assert!(!rest.is_empty(), "{missing:?}");
    t.db.execute(&format!("CREATE TABLE {blocked} (x INTEGER)"))
        .await
        .unwrap();
    let (before, doomed_before) = (total(&t).await, doomed(&t).await);
    assert!(doomed_before > 0);
    let cli = Cli::new(&t.url);
    let _w = cli.worker("failed-stage");
    cli.wait_for_a_worker().await;
    let out = cli.run(&[
        "maintenance",
        "--full-maintenance",
        "--json",
        "--timeout",
        "120",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is printed ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(full["summary"]["status"], "completed_with_errors", "{full}");
    let errors: Vec<&str> = full["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{full}"))
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        matches!(errors[..], [e] if e.starts_with("create indexes:") && e.contains(blocked.as_str()) && e.contains("already a table")),
        "{errors:?}"
    );
    // The stages around the failed build ran: the cleanup before it, the other index builds,
    // the health report after.
    assert_eq!(doomed(&t).await, 0);
    assert_eq!(total(&t).await, before - doomed_before);
    assert_eq!(
        reported(&full["cleanup"]),
        doomed_before,
        "{}",
        full["cleanup"]
    );
    let still_missing = maintenance::missing_recommended_indexes(&t.db)
        .await
        .unwrap();
    assert_eq!(
        still_missing,
        vec![blocked.clone()],
        "only the blocked index is missing"
    );
    assert!(
        full["analytics"]["health_status"]["overall_health"].is_string(),
        "{full}"
    );
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        matches!(error_lines[..], [l] if l.contains("completed with errors") && l.contains(blocked.as_str())),
        "one error line naming the failure: {stderr}"
    );
    t.drop_db().await;
}

/// `sessionfleet demo` runs in a namespace of its own (`demo-<pid>`) and leaves none of its
/// keys in Redis: lease counters and worker records never expire, so without the clean-up
/// they would stay on the user's Redis forever. Small (5,000 sessions) to stay quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_leaves_no_keys_of_its_namespace_in_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = binary("sessionfleet");
    cmd.args(["demo", "--sessions", "5000"])
        .env("REDIS_URL", redis_url())
        .current_dir(dir.path())
        .stdin(Stdio::null());
    let mut demo = Spawned::start(cmd);
    let namespace = format!("demo-{}", demo.child.id());
    let (status, stdout, stderr) = demo.finish();
    assert!(status.success(), "{status}: {stdout}\n{stderr}");
    assert!(
        stderr.contains("removed the ")
            && stderr.contains(&format!("Redis keys of namespace {namespace}")),
        "{stderr}"
    );
    assert!(
        stdout.contains("Cleanup detail: "),
        "the demo ran: {stdout}"
    );
    let q = queue(&redis_url(), &namespace).await;
    let mut conn = q.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{namespace}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    // `demo-12` must not count `demo-123`'s keys: the namespace ends a key or is followed by
    // a separator.
    let left: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.split(namespace.as_str())
                .skip(1)
                .any(|after| !after.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    assert!(left.is_empty(), "keys of {namespace} left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_invocation_has_an_equivalent() {
    for engine in [Engine::Sqlite, Engine::Postgres] {
        let t = seeded(engine, 1500).await;
        let cli = Cli::new(&t.url);
        let _w = cli.worker("spec");
        let stats = cli.json(&["cleanup", "--stats", "--json"]);
        assert_eq!(stats["total_sessions"].as_i64(), Some(total(&t).await));
        // Nothing configured: the engine's own batch target and rest, decided by the worker.
        let (target_ms, rest) = if engine == Engine::Sqlite {
            (20, 1.0)
        } else {
            (50, 0.0)
        };
        assert_eq!(stats["target_batch_ms"], target_ms, "{engine}: {stats}");
        assert_eq!(stats["rest_ratio"], rest, "{engine}: {stats}");
        assert_eq!(stats["parallel_reads"], true, "{engine}: {stats}");
        // Set by the producer's configuration: it travels in the job to the same worker.
        let tuned = Cli {
            _keys: None,
            ns: cli.ns.clone(),
            db_url: cli.db_url.clone(),
            redis: cli.redis.clone(),
            extra: vec![
                ("SESSION_CLEANUP_TARGET_BATCH_MS".into(), "35".into()),
                ("SESSION_CLEANUP_REST_RATIO".into(), "0.5".into()),
                ("SESSION_CLEANUP_PARALLEL_READS".into(), "false".into()),
            ],
        };
        let stats = tuned.json(&["cleanup", "--stats", "--json"]);
        assert_eq!(stats["target_batch_ms"], 35, "{engine}: {stats}");
        assert_eq!(stats["rest_ratio"], 0.5, "{engine}: {stats}");
        assert_eq!(stats["parallel_reads"], false, "{engine}: {stats}");
        let health = cli.json(&["analytics", "--health-report", "--json"]);
        for key in [
            "timestamp",
            "health_status",
            "statistics",
            "detailed_analytics",
            "performance_metrics",
            "security_analysis",
            "recommendations",
        ] {
            assert!(
                health.get(key).is_some(),
                "{engine}: health report lacks {key}"
            );
        }
        let trends = cli.json(&["analytics", "--trends", "7", "--json"]);
        assert_eq!(trends["period_days"], 7, "{engine}: {trends}");
        let analysis = cli.json(&["db", "--analyze", "--json"]);
        assert_eq!(
            analysis["tables"]["user_sessions"]["row_count"].as_i64(),
            Some(total(&t).await),
            "{engine}: {analysis}"
        );
        let planned = cli.json(&["db", "--create-indexes", "--dry-run", "--json"]);
        assert_eq!(planned["dry_run"], true);
        let optimized = cli.json(&["db", "--optimize", "--json"]);
        assert!(
            !optimized["operations_performed"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        // A healthy database: the check ran and found nothing (not "unavailable", not
        // "failed").
        let integrity = cli.json(&["db", "--integrity-check", "--json"]);
        assert_eq!(
            integrity["integrity_check"], "passed",
            "{engine}: {integrity}"
        );
        // The size the database itself gives: SQLite's pages (stable while nothing writes);
        // PostgreSQL's directory, which its background processes change a little, so there
        // within a tenth of what the server says now and above the session table's own size.
        let dbstats = cli.json(&["db", "--stats", "--json"]);
        let size = dbstats["database_size_bytes"]
            .as_i64()
            .unwrap_or_else(|| panic!("{engine}: {dbstats}"));
        if engine == Engine::Sqlite {
            let pages =
                t.db.scalar_i64(
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                )
                .await
                .unwrap();
            assert_eq!(size, pages, "{engine}: {dbstats}");
        } else {
            let server =
                t.db.scalar_i64("SELECT pg_database_size(current_database())")
                    .await
                    .unwrap();
            let table =
                t.db.scalar_i64("SELECT pg_total_relation_size('user_sessions')")
                    .await
                    .unwrap();
            assert!(
                size > table && (size - server).abs() * 10 <= server,
                "{engine}: {size} bytes reported, the server says {server}, the table {table}"
            );
        }
        assert_eq!(
            dbstats["table_analysis"]["tables"]["user_sessions"]["row_count"].as_i64(),
            Some(total(&t).await),
            "{engine}: {dbstats}"
        );
        let status = cli.json(&["maintenance", "--status", "--json"]);
        assert_eq!(
            status["targets"]["default"]["cleanup"]["total_sessions"].as_i64(),
            Some(total(&t).await),
            "{engine}: {status}"
        );
        assert!(
            status["fleet"]["workers"]
                .as_array()
                .is_some_and(|w| !w.is_empty()),
            "{status}"
        );
        let (before, doomed_before) = (total(&t).await, doomed(&t).await);
        assert!(
            doomed_before > 0,
            "{engine}: the demo data has doomed sessions"
        );
        let unified_dry = cli.json(&["maintenance", "--cleanup", "--dry-run", "--json"]);
        assert_eq!(unified_dry["dry_run"], true, "{unified_dry}");
        assert_eq!(
            reported(&unified_dry),
            doomed_before,
            "{engine}: a dry run counts what a cleanup would delete: {unified_dry}"
        );
        assert_eq!(
            total(&t).await,
            before,
            "{engine}: a dry run deletes nothing"
        );
        let unified = cli.json(&["maintenance", "--cleanup", "--once", "--json"]);
        assert_eq!(
            reported(&unified),
            doomed_before,
            "{engine}: the report counts what was deleted: {unified}"
        );
        assert_eq!(doomed(&t).await, 0, "{engine}: {unified}");
        assert_eq!(total(&t).await, before - doomed_before, "{engine}");

        // The forced cleanup, on what the expiry rules leave: sessions used within the last
        // day. A quarter of them are made idle for 30 hours; the rest are kept at least an
        // hour away from the 24-hour line, so no session crosses it while the test runs.
        let day_ago = now() - chrono::Duration::hours(24);
        let stamp = |t: chrono::NaiveDateTime| t.format("%Y-%m-%d %H:%M:%S").to_string();
        t.db.execute(&format!(
            "UPDATE user_sessions SET last_activity = '{}' WHERE id % 4 = 0",
            stamp(day_ago - chrono::Duration::hours(6))
        ))
        .await
        .unwrap();
        t.db.execute(&format!(
            "UPDATE user_sessions SET last_activity = '{}' WHERE id % 4 <> 0 AND last_activity < '{}'",
            stamp(day_ago + chrono::Duration::hours(12)),
            stamp(day_ago + chrono::Duration::hours(1))
        ))
        .await
        .unwrap();
        let idle_sql = format!(
            "SELECT COUNT(*) FROM user_sessions WHERE last_activity < '{}'",
            stamp(day_ago)
        );
        let idle_before = t.db.scalar_i64(&idle_sql).await.unwrap();
        assert!(idle_before > 0, "{engine}: sessions idle past 24 h");
        let before = total(&t).await;
        let forced = cli.json(&["cleanup", "--force", "--max-age", "24", "--json"]);
        assert_eq!(forced["forced_cleanup"], true);
        assert_eq!(forced["custom_max_age_hours"], 24);
        assert_eq!(
            reported(&forced),
            idle_before,
            "{engine}: the forced cleanup deletes the idle sessions: {forced}"
        );
        assert_eq!(
            forced["rules"]["idle"].as_i64(),
            Some(idle_before),
            "{forced}"
        );
        assert_eq!(t.db.scalar_i64(&idle_sql).await.unwrap(), 0, "{engine}");
        assert_eq!(total(&t).await, before - idle_before, "{engine}");
        let unified_health = cli.json(&["maintenance", "--analytics", "--health", "--json"]);
        assert!(unified_health["health_status"].is_object());
        let unified_db = cli.json(&["maintenance", "--database", "--analyze", "--json"]);
        assert!(unified_db["tables"].is_object());
        // Export by extension.
        let dir = tempfile::tempdir().unwrap();
        let html = dir.path().join("report.html");
        let out = cli.run(&[
            "analytics",
            "--health-report",
            "--export",
            html.to_str().unwrap(),
        ]);
        assert!(
            out.status.success() || out.status.code() == Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
        t.drop_db().await;
    }
}

#[tokio::test]
async fn usage_errors_help_and_exit_codes() {
    let cli = Cli::new("sqlite:///nonexistent-dir/x.db");
    let out = cli.run(&["cleanup", "--force", "--max-age", "0", "--local"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("max"));
    // Billions of hours back is past the calendar: refused, not a panic.
    let out = cli.run(&["cleanup", "--force", "--max-age", "4000000000", "--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--max-age must be at most"), "{err}");
    let out = cli.run(&["cleanup", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    // Job flags on a command that runs no job are refused, not ignored.
    for args in [
        &["--all-targets", "seed-demo", "--sessions", "10"][..],
        &["--local", "lease"][..],
        &["--no-wait", "config", "show"][..],
    ] {
        let out = cli.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("does not apply"), "{args:?}: {err}");
    }
    // --batch-size and --budget keep to the ranges their settings accept.
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--batch-size", "500000"),
        ("--budget", "0"),
        ("--budget", "90000"),
    ] {
        let out = cli.run(&["cleanup", "--once", "--local", flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains("is not in 1..="),
            "{err}"
        );
    }
    // --export writes one waited-for report: not several targets', nor one never waited for.
    for args in [
        &[
            "--all-targets",
            "analytics",
            "--health-report",
            "--export",
            "r.json",
        ][..],
        &[
            "--no-wait",
            "analytics",
            "--health-report",
            "--export",
            "r.json",
        ][..],
        // The legacy form: an export needs the health report it writes (it was dropped).
        &["maintenance", "--analytics", "--export", "r.json"][..],
    ] {
        let out = cli.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--export"), "{args:?}: {err}");
    }
    // Trends are a report of their own, not an addition to the health report (they were
    // dropped silently).
    let out = cli.run(&["maintenance", "--analytics", "--health", "--trends", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--trends"), "{err}");
    // A sub-flag without the mode it belongs to is refused, not ignored: `--vacuum` without
    // `--optimize` printed statistics, a bare `--force` printed help.
    for (args, named) in [
        (&["maintenance", "--database", "--vacuum"][..], "--optimize"),
        (&["maintenance", "--force"][..], "--cleanup"),
        (
            &["maintenance", "--cleanup", "--max-age", "3"][..],
            "--force",
        ),
        (&["maintenance", "--analyze"][..], "--database"),
        (&["maintenance", "--trends", "3"][..], "--analytics"),
        // Beside another mode, where clap's `requires` lets them through.
        (
            &["maintenance", "--full-maintenance", "--force"][..],
            "--cleanup",
        ),
        (&["maintenance", "--status", "--once"][..], "--cleanup"),
        (
            &["maintenance", "--database", "--health"][..],
            "--analytics",
        ),
        (
            &["maintenance", "--cleanup", "--analyze", "--once"][..],
            "--database",
        ),
        (&["maintenance", "--status", "--dry-run"][..], "--dry-run"),
    ] {
        let out = cli.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
    }
    let out = cli.run(&["analytics", "--trends", "0", "--local"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No mode: help, as the spec wants (the original printed trends).
    let out = cli.run(&["analytics"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--health-report"));
    let mut bad = Cli::new("oracle://x/y");
    bad.redis = "redis://127.0.0.1:6379".into();
    let out = bad.run(&["config", "show"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DATABASE_URL") && err.lines().count() == 1,
        "{err}"
    );
    let secret = Cli::new("postgres://app:hunter2@127.0.0.1:1/app");
    let out = secret.run(&["config", "show"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
    // A database nobody listens on: retried, then the operation fails (exit 1, not a panic's
    // 101 nor a usage error's 2) with one error line that names what failed, password hidden.
    let out = secret.run(&["--local", "cleanup", "--once"]);
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        matches!(
            errors[..],
            [line] if line.contains("cannot connect to postgres://app:***@127.0.0.1:1/app")
        ),
        "one error line naming the database: {err}"
    );
    assert!(
        !err.contains("hunter2") && !stdout.contains("hunter2"),
        "{stdout}\n{err}"
    );
}

/// One tick a scheduler enqueued.
#[derive(Debug, Clone, Copy)]
struct FiredTick {
    tick: i64,
    catch_up: bool,
}

/// A scheduler process whose stderr lines are collected.
struct Scheduler {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    fn start(cli: &Cli) -> Scheduler {
        Scheduler::start_with(cli, &["schedule"])
    }

    fn start_with(cli: &Cli, args: &[&str]) -> Scheduler {
        let mut child = cli
            .command(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Scheduler {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn fired(&self) -> Vec<i64> {
        self.fired_ticks().into_iter().map(|f| f.tick).collect()
    }

    /// The ticks of one schedule (`health_report`, `cleanup`…) this scheduler enqueued.
    fn fired_of(&self, schedule: &str) -> usize {
        let prefix = format!("{schedule}:");
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" enqueued") && l.contains(&prefix))
            .count()
    }

    /// The ticks this scheduler reported enqueuing (`<schedule> tick <secs> enqueued…`), in
    /// order, each marked when the scheduler said it was a catch-up.
    fn fired_ticks(&self) -> Vec<FiredTick> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" enqueued"))
            .filter_map(|l| {
                let mut words = l.split_whitespace().skip_while(|w| *w != "tick");
                let tick = words.nth(1)?.parse().ok()?;
                Some(FiredTick {
                    tick,
                    catch_up: l.contains("catch-up"),
                })
            })
            .collect()
    }

    fn stop(self) -> Vec<i64> {
        self.stop_reporting_ticks()
            .into_iter()
            .map(|f| f.tick)
            .collect()
    }

    fn stop_reporting_ticks(mut self) -> Vec<FiredTick> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "scheduler exits 0 on SIGTERM: {status:?}");
        // The reader ends at end of stream, so every line the scheduler wrote is in.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.fired_ticks()
    }
}

impl Drop for Scheduler {
    /// A test that fails while its schedulers run leaves none behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn schedule_config(dir: &Path, db_url: &str) -> String {
    let path = dir.join("sched.toml");
    std::fs::write(&path, format!("[targets.default]\nurl = \"{db_url}\"\n[schedule]\ncleanup = \"*/2 * * * * *\"\nfull_maintenance = \"0 0 2 1 1 *\"\nhealth_report = \"0 0 2 1 1 *\"\n")).unwrap();
    path.display().to_string()
}

async fn cleanup_jobs_enqueued(cli: &Cli) -> u64 {
    let q = queue(&cli.redis, &cli.ns).await;
    q.queue_depths()
        .await
        .unwrap()
        .iter()
        .filter(|d| d.queue == "cleanup")
        .map(|d| d.ready + d.scheduled)
        .sum()
}

/// `cleanup --daemon` schedules the cleanup its flags describe, for the target it names — not
/// a default cleanup of every target — and refuses flags a schedule cannot honour (a
/// "dry-run" daemon once deleted for real) with a one-line usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_daemon_schedules_what_its_flags_say_and_refuses_the_rest() {
    use sessionfleet::jobs::QueueClass;
    use sessionfleet::queue::Keys;

    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::new(&format!("sqlite://{}/a.db", dir.path().display()));
    let config = dir.path().join("two.toml");
    std::fs::write(
        &config,
        format!(
            "default_target = \"a\"\n[targets.a]\nurl = \"sqlite://{d}/a.db\"\n\
             [targets.b]\nurl = \"sqlite://{d}/b.db\"\n[schedule]\ncleanup = \"*/2 * * * * *\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config.display().to_string()));

    for args in [
        &["cleanup", "--daemon", "--dry-run"][..],
        &["maintenance", "--cleanup", "--daemon", "--dry-run"][..],
        &["cleanup", "--daemon", "--local"][..],
    ] {
        let out = cli.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && (first.contains("dry-run") || first.contains("local")),
            "{args:?}: a clear error: {err}"
        );
    }
    assert_eq!(
        cleanup_jobs_enqueued(&cli).await,
        0,
        "refused: nothing enqueued"
    );

    let daemon = Scheduler::start_with(
        &cli,
        &[
            "cleanup",
            "--daemon",
            "--target",
            "b",
            "--batch-size",
            "7",
            "--force",
            "--max-age",
            "5",
        ],
    );
    let started = Instant::now();
    while daemon.fired().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "no tick fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop();
    let q = queue(&cli.redis, &cli.ns).await;
    let mut conn = q.connection();
    let payloads: Vec<String> = redis::cmd("HVALS")
        .arg(Keys::new(&cli.ns).data(QueueClass::Cleanup))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!payloads.is_empty());
    for p in &payloads {
        let p = p.replace(['\\', ' '], "");
        assert!(p.contains(r#""target":"b""#), "only target b: {p}");
        assert!(
            p.contains(r#""batch_size":7"#),
            "the daemon's batch size: {p}"
        );
        assert!(
            p.contains(r#""force":true"#) && p.contains(r#""force_max_age_hours":5"#),
            "the daemon's forced cleanup: {p}"
        );
        // Its own ticks: a plain scheduler's cleanup ticks do not stand in for them.
        assert!(
            p.contains(r#""dedupe_key":"schedule:cleanup+force+max_age=5+batch_size=7:b:"#),
            "{p}"
        );
    }
}

/// The scheduler re-reads the alert thresholds file on every pass; a bad edit while it runs
/// keeps the last good thresholds, with a warning, instead of stopping the process (and
/// with it every schedule, on every replica). Fails if the scheduler exits or its health
/// ticks stop after the edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_thresholds_edit_does_not_stop_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::new(&format!("sqlite://{}/s.db", dir.path().display()));
    let config = dir.path().join("sched.toml");
    std::fs::write(
        &config,
        format!(
            "[targets.default]\nurl = \"{}\"\n[schedule]\ncleanup = \"0 0 2 1 1 *\"\n\
             full_maintenance = \"0 0 2 1 1 *\"\nhealth_report = \"*/2 * * * * *\"\n",
            cli.db_url
        ),
    )
    .unwrap();
    let thresholds = dir.path().join("thresholds.json");
    std::fs::write(&thresholds, "{}").unwrap();
    cli.extra
        .push(("SESSIONFLEET_CONFIG".into(), config.display().to_string()));
    cli.extra.push((
        "SESSION_ALERT_THRESHOLDS_FILE".into(),
        thresholds.display().to_string(),
    ));
    let scheduler = Scheduler::start(&cli);
    let started = Instant::now();
    while scheduler.fired_of("health_report") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no health tick"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&thresholds, r#"{"concurrent_sessions": "x"}"#).unwrap();
    let edited = scheduler.fired_of("health_report");
    while scheduler.fired_of("health_report") < edited + 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "health ticks stopped after the bad edit: {:?}",
            scheduler.lines.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still running: it stops on SIGTERM with status 0.
    scheduler.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scheduler_replicas_enqueue_each_tick_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::new(&format!("sqlite://{}/s.db", dir.path().display()));
    cli.extra.push((
        "SESSIONFLEET_CONFIG".into(),
        schedule_config(dir.path(), &cli.db_url),
    ));
    let replicas: Vec<Scheduler> = (0..3).map(|_| Scheduler::start(&cli)).collect();
    let started = Instant::now();
    while replicas
        .iter()
        .flat_map(Scheduler::fired)
        .collect::<BTreeSet<_>>()
        .len()
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "ticks did not fire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ticks = BTreeSet::new();
    for r in replicas {
        ticks.extend(r.stop());
    }
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert_eq!(
        cleanup_jobs_enqueued(&cli).await,
        ticks.len() as u64,
        "one job per tick across three replicas: {ticks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_stopped_across_ticks_catches_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::new(&format!("sqlite://{}/s.db", dir.path().display()));
    cli.extra.push((
        "SESSIONFLEET_CONFIG".into(),
        schedule_config(dir.path(), &cli.db_url),
    ));
    let first = Scheduler::start(&cli);
    let started = Instant::now();
    while first.fired().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = first.stop();
    let last_before = *before.iter().max().unwrap();
    let jobs_before = cleanup_jobs_enqueued(&cli).await;
    assert_eq!(jobs_before, before.len() as u64);
    // Down across at least three two-second ticks. However long the second scheduler takes
    // to start, its first pass finds ticks it never fired: it must enqueue only the latest
    // of them, once, and say it was a catch-up — a burst would show the older ones too.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let second = Scheduler::start(&cli);
    let restarted = Instant::now();
    while second.fired().is_empty() {
        assert!(restarted.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = second.stop_reporting_ticks();
    let first_after = after[0];
    assert!(
        first_after.catch_up,
        "the first tick after downtime is a catch-up: {after:?}"
    );
    assert!(
        first_after.tick > last_before + 2,
        "older missed ticks are skipped, not fired (last before {last_before}): {after:?}"
    );
    assert_eq!(
        after.iter().filter(|f| f.catch_up).count(),
        1,
        "exactly one catch-up: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].tick == w[0].tick + 2),
        "after the catch-up, every tick once and in order: {after:?}"
    );
    assert_eq!(
        cleanup_jobs_enqueued(&cli).await,
        jobs_before + after.len() as u64
    );
}

/// `sessionfleet jobs` over real dead letters and a real worker; `sessionfleet lease` over a
/// lease held by this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_lease_commands_show_and_repair_what_the_fleet_holds() {
    use sessionfleet::dispatch::OperationJob;
    use sessionfleet::jobs::{JobEnvelope, QueueClass};
    use sessionfleet::lease::{self, HolderInfo, LeaseConfig};
    use sessionfleet::ops::cleanup::CleanupParams;
    use sessionfleet::queue::DeadLetter;

    let t = seeded(Engine::Sqlite, 600).await;
    let doomed_before = doomed(&t).await;
    assert!(doomed_before > 0);
    let cli = Cli::new(&t.url);
    let q = queue(&cli.redis, &cli.ns).await;

    // Two dead letters: a cleanup that failed for good, and a payload that never decoded.
    let job = OperationJob::Cleanup(CleanupParams::default());
    let failed = JobEnvelope::new(job.kind(), "default", job.params(), "e2e");
    q.add_dead_letter(&DeadLetter::failed(
        &failed,
        "t-1",
        "database unreachable after 5 attempts".into(),
        "w-gone",
    ))
    .await
    .unwrap();
    let garbage = DeadLetter::undecodable(
        QueueClass::Maintenance,
        "t-2",
        b"{ truncated",
        "payload is not a job envelope".into(),
        "w-gone",
    );
    q.add_dead_letter(&garbage).await.unwrap();

    let listed = cli.json(&["jobs", "dead", "--json"]);
    let ids: BTreeSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    let failed_id = failed.job_id.to_string();
    assert_eq!(
        ids,
        BTreeSet::from([failed_id.as_str(), garbage.id.as_str()])
    );
    let shown = cli.json(&["jobs", "show", &garbage.id, "--json"]);
    assert_eq!(shown["reason"], "payload is not a job envelope");
    assert_eq!(shown["payload"], "{ truncated");

    // An undecodable payload cannot be requeued: one line, nothing lost.
    let refused = cli.run(&["jobs", "requeue", &garbage.id]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("can only be purged"), "{err}");
    assert_eq!(q.dead_letter_count().await.unwrap(), 2);

    // Requeue the failed cleanup; a worker runs it and `jobs show` reports its result.
    let requeued = cli.run(&["jobs", "requeue", &failed_id]);
    assert!(
        requeued.status.success(),
        "{}",
        String::from_utf8_lossy(&requeued.stderr)
    );
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);
    let _w = cli.worker("jobs");
    let result = sessionfleet_e2e::eventually(Duration::from_secs(120), "requeued job", || {
        let q = q.clone();
        async move { q.result(failed.job_id).await.ok().flatten() }
    })
    .await;
    assert_eq!(result.outcome.as_str(), "succeeded");
    let shown = cli.json(&["jobs", "show", &failed_id, "--json"]);
    assert_eq!(shown["outcome"], "succeeded");
    assert_eq!(shown["rows_affected"].as_i64(), Some(doomed_before));
    assert_eq!(doomed(&t).await, 0);

    let purged = cli.json(&["jobs", "purge", "--all", "--json"]);
    assert_eq!(purged["purged"], 1);
    assert!(
        cli.json(&["jobs", "dead", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let missing = cli.run(&["jobs", "show", "no-such-job"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr)
            .trim()
            .lines()
            .count(),
        1
    );

    // A lease held by someone else is shown with its holder and the database's token.
    let held = lease::try_acquire(
        &q.connection(),
        &cli.ns,
        "default",
        &HolderInfo::new("e2e-holder", "job-42"),
        &t.db,
        &LeaseConfig::default(),
    )
    .await
    .unwrap()
    .expect("the lease is free");
    let token = held.fence().token;
    let status = cli.json(&["lease", "--json"]);
    let row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "default")
        .expect("default target listed")
        .clone();
    assert_eq!(row["holder"]["worker"], "e2e-holder");
    assert_eq!(row["holder"]["job_id"], "job-42");
    assert_eq!(row["holder"]["token"].as_i64(), Some(token));
    assert_eq!(row["db_fence"]["token"].as_i64(), Some(token));
    assert!(held.release(&q.connection()).await.unwrap());
    let status = cli.json(&["lease", "--json"]);
    let row = &status.as_array().unwrap()[0];
    assert!(row["holder"].is_null(), "{row}");
    assert_eq!(row["db_fence"]["token"].as_i64(), Some(token));
    sessionfleet_e2e::drop_namespace(&q).await;
    t.drop_db().await;
}

/// Status with Redis down, then with the database down: each part says what is wrong in one
/// line, the rest is still reported, and no password is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_degrades_part_by_part_when_redis_or_the_database_is_down() {
    let t = seeded(Engine::Sqlite, 500).await;
    let mut cli = Cli::new(&t.url);
    let redis_down = ClosedPort::new();
    cli.redis = format!("redis://:hunter2@127.0.0.1:{}", redis_down.port());
    let doc = cli.json(&["maintenance", "--status", "--json"]);
    assert_eq!(
        doc["targets"]["default"]["cleanup"]["total_sessions"].as_i64(),
        Some(total(&t).await),
        "{doc}"
    );
    let fleet_error = doc["fleet"]["error"].as_str().expect("fleet error");
    assert!(fleet_error.contains("127.0.0.1"), "{fleet_error}");
    assert!(!doc.to_string().contains("hunter2"), "{doc}");
    let text = cli.run(&["maintenance", "--status"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("Fleet:\n  unavailable:"), "{stdout}");
    assert!(stdout.contains("Total Sessions: 500"), "{stdout}");

    // Database down (a PostgreSQL port nobody listens on), Redis up.
    let database_down = ClosedPort::new();
    let mut cli = Cli::new(&format!(
        "postgres://app:hunter2@127.0.0.1:{}/app",
        database_down.port()
    ));
    cli.redis = redis_url();
    let doc = cli.json(&["maintenance", "--status", "--json"]);
    let db_error = doc["targets"]["default"]["error"]
        .as_str()
        .expect("target error");
    assert!(db_error.contains("cannot connect"), "{db_error}");
    assert!(doc["fleet"]["queues"].is_array(), "{doc}");
    assert!(!doc.to_string().contains("hunter2"), "{doc}");
    t.drop_db().await;
}

/// `maintenance --status` judges health as a worker's health report does: with the fleet's
/// history (the latest integrity check's storage failures) and the recommended indexes the
/// database lacks. Fails if the status reads the database alone, as it did: a corrupt
/// database then showed "good" and exited 0 while `analytics --health-report` exited 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_raises_the_same_fleet_and_index_alerts_as_the_health_report() {
    use sessionfleet::jobs::JobKind;
    use sessionfleet::ops::maintenance::{self, CheckStatus, IntegrityReport, MaintenanceReport};
    use sessionfleet::queue::ResultOutcome;

    let t = seeded(Engine::Sqlite, 300).await;
    let missing = maintenance::missing_recommended_indexes(&t.db)
        .await
        .unwrap();
    assert!(
        !missing.is_empty(),
        "the demo data lacks recommended indexes"
    );
    let cli = Cli::new(&t.url);
    let issues = |doc: &serde_json::Value| -> Vec<String> {
        doc["targets"]["default"]["health"]["issues"]
            .as_array()
            .unwrap_or_else(|| panic!("health issues: {doc}"))
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_string())
            .collect()
    };
    let doc = cli.json(&["maintenance", "--status", "--json"]);
    for name in &missing {
        assert!(
            issues(&doc).iter().any(|i| i.contains(name.as_str())),
            "{name}: {doc}"
        );
    }

    let check = MaintenanceReport::Integrity(IntegrityReport {
        timestamp: now(),
        integrity_check: CheckStatus::Failed,
        foreign_key_check: CheckStatus::Passed,
        checks_run: vec!["PRAGMA integrity_check".into()],
        issues_found: vec!["Integrity check failed: page 12 is never used".into()],
        recommendations: Vec::new(),
    });
    queue(&cli.redis, &cli.ns)
        .await
        .record_result(&sessionfleet::testing::job_result(
            JobKind::Maintenance,
            "default",
            ResultOutcome::Succeeded,
            serde_json::to_value(&check).unwrap(),
            chrono::Utc::now(),
        ))
        .await
        .unwrap();
    let out = cli.run(&["maintenance", "--status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "critical health exits 3");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["targets"]["default"]["health"]["overall_health"], "critical",
        "{doc}"
    );
    assert!(
        issues(&doc)
            .iter()
            .any(|i| i.contains("page 12 is never used")),
        "{doc}"
    );
    t.drop_db().await;
}

/// `SESSION_ALERT_THRESHOLDS_FILE` reaches the health report: a line set below the table's
/// active sessions raises that alert, which the spec's default (1,000) does not at this size,
/// and keys the file leaves out keep their defaults. A file with a mistake is refused in one
/// line that names it, as a usage error, before any report runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_thresholds_file_reaches_the_health_report() {
    let t = seeded(Engine::Sqlite, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path.display().to_string()
    };
    let alert = |doc: &serde_json::Value, name: &str| {
        doc["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
    };
    let report = ["--local", "analytics", "--health-report", "--json"];
    let plain = Cli::new(&t.url).json(&report);
    let active = plain["statistics"]["session_counts"]["active_sessions"]
        .as_f64()
        .expect("active sessions");
    assert!(active > 1.0 && active < 1000.0, "{plain}");
    assert!(alert(&plain, "concurrent_sessions").is_none(), "{plain}");

    let mut tuned = Cli::new(&t.url);
    tuned.extra.push((
        "SESSION_ALERT_THRESHOLDS_FILE".into(),
        write("low.json", r#"{"concurrent_sessions": 1}"#),
    ));
    let doc = tuned.json(&report);
    let raised = alert(&doc, "concurrent_sessions").expect("the lowered line raises its alert");
    assert_eq!(raised["threshold"], 1.0, "{raised}");
    assert_eq!(raised["value"].as_f64(), Some(active), "{raised}");
    assert_eq!(
        alert(&doc, "suspicious_activity_rate").is_some(),
        alert(&plain, "suspicious_activity_rate").is_some(),
        "a key the file leaves out keeps its default"
    );

    tuned.extra = vec![(
        "SESSION_ALERT_THRESHOLDS_FILE".into(),
        write("typo.json", r#"{"concurent_sessions": 5}"#),
    )];
    let out = tuned.run(&report);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("typo.json") && err.contains("concurent_sessions"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty(), "no report after a refused file");
    t.drop_db().await;
}
