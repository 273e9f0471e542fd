//! Support for the end-to-end tests: builds the real binaries once per test run, starts worker
//! processes and private Redis servers, and cleans them up when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sessionfleet::CancellationToken;
use sessionfleet::config::{Overrides, Settings};
use sessionfleet::queue::Queue;
use sessionfleet::runner::RunnerDeps;
use sessionfleet::testing::free_port;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds `sessionfleet-worker` and `sessionfleet` once per test run; returns the directory
/// holding them.
pub fn binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let mut cmd = Command::new(env!("CARGO"));
        // The variables `cargo test` sets for this process would make the nested build see a
        // different environment and rebuild half the dependency tree every run.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
                || k.ends_with("MAKEFLAGS")
                || k == "MFLAGS"
            {
                cmd.env_remove(&k);
            }
        }
        let status = cmd
            .args([
                "build",
                "-p",
                "sessionfleet-worker",
                "-p",
                "sessionfleet-cli",
                "--bins",
            ])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug")
    })
}

/// A command running one of the project's binaries (`sessionfleet`, `sessionfleet-worker`)
/// with [`without_shell_settings`].
pub fn binary(name: &str) -> Command {
    let mut cmd = Command::new(binaries().join(name));
    without_shell_settings(&mut cmd);
    cmd
}

/// Leaves out of `cmd`'s environment the settings of the shell that ran the tests that change
/// what the binaries do: ours (`SESSION_*`, `SESSIONFLEET_*`, `DATABASE_URL`, `REDIS_*`,
/// `RUST_LOG`) and libpq's (`PG*`, which sqlx's PostgreSQL driver reads beside a URL: an
/// `sslmode`, a `statement_timeout` in `PGOPTIONS`), so each test sees the defaults it was
/// written against plus what it sets. (`HOSTNAME` names the fleet's members and is kept.)
pub fn without_shell_settings(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SESSION_")
            || k.starts_with("SESSIONFLEET_")
            || k.starts_with("REDIS_")
            || k.starts_with("PG")
            || k == "DATABASE_URL"
            || k == "RUST_LOG"
        {
            cmd.env_remove(&k);
        }
    }
}

/// Sessions a cleanup must delete now under the v2 rules and the default max age (48 h),
/// counted by SQL written independently of the tool.
pub async fn doomed_v2(db: &sessionfleet::store::Db) -> i64 {
    let now = chrono::Utc::now().naive_utc();
    let cutoff = (now - chrono::Duration::seconds(172_800))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let stamp = now.format("%Y-%m-%d %H:%M:%S").to_string();
    db.scalar_i64(&format!(
        "SELECT COUNT(*) FROM user_sessions s WHERE s.expires_at < '{stamp}' \
         OR (s.is_active = FALSE AND s.last_activity < '{cutoff}') \
         OR (s.user_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)) \
         OR EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id AND u.is_active = FALSE)"
    ))
    .await
    .expect("count doomed sessions")
}

fn log_dir() -> PathBuf {
    let dir = workspace_root().join("target").join("e2e-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Settings for namespace `ns` on `redis_url`.
pub fn settings(redis_url: &str, ns: &str) -> Settings {
    let (url, ns) = (redis_url.to_string(), ns.to_string());
    let env = move |k: &str| match k {
        "REDIS_URL" => Some(url.clone()),
        "SESSIONFLEET_NAMESPACE" => Some(ns.clone()),
        _ => None,
    };
    Settings::resolve(&Overrides::default(), &env, None).expect("settings")
}

/// A producer-side queue handle for namespace `ns`.
pub async fn queue(redis_url: &str, ns: &str) -> Queue {
    Queue::connect(&settings(redis_url, ns))
        .await
        .expect("connect to Redis")
}

/// Runner dependencies for library-level calls from a test.
pub fn deps(queue: &Queue, redis_url: &str, ns: &str) -> RunnerDeps {
    RunnerDeps {
        settings: Arc::new(settings(redis_url, ns)),
        queue: queue.clone(),
        worker_name: "e2e-test".into(),
        shutdown: CancellationToken::new(),
    }
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Redis URL.
    pub redis_url: String,
    /// Namespace.
    pub namespace: String,
    /// `--queues`.
    pub queues: String,
    /// `--concurrency`.
    pub concurrency: u32,
    /// Run in a new PID namespace (`unshare -p -f`), so it is pid 1 like in a container.
    pub pid_namespace: bool,
    /// Log file name stem.
    pub label: String,
    /// Extra environment (targets: `DATABASE_URL`, `SESSIONFLEET_CONFIG`, lease TTL …),
    /// applied after the defaults.
    pub env: Vec<(String, String)>,
}

impl WorkerSpec {
    /// Defaults for `ns`: all queues, concurrency 4.
    pub fn new(redis_url: &str, ns: &str, label: &str) -> WorkerSpec {
        WorkerSpec {
            redis_url: redis_url.into(),
            namespace: ns.into(),
            queues: "cleanup,analytics,maintenance,diag".into(),
            concurrency: 4,
            pid_namespace: false,
            label: label.into(),
            env: Vec::new(),
        }
    }
}

/// A running `sessionfleet-worker`; killed when dropped.
pub struct Worker {
    child: Child,
    pid_namespace: bool,
    /// Port of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_port: u16,
    /// Its log file (`target/e2e-logs`), removed with the worker unless the test fails.
    pub log: PathBuf,
}

impl Worker {
    /// Starts a worker.
    pub fn start(spec: &WorkerSpec) -> Worker {
        let metrics_port = free_port();
        let log = log_dir().join(format!("{}-{}.log", spec.namespace, spec.label));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let bin = binaries().join("sessionfleet-worker");
        let mut cmd = if spec.pid_namespace {
            let mut c = Command::new("unshare");
            // When the test stops `unshare`, the worker inside gets SIGTERM.
            c.args(["-p", "-f", "--kill-child=SIGTERM"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        without_shell_settings(&mut cmd);
        let dir = std::env::temp_dir();
        cmd.args([
            "--queues",
            &spec.queues,
            "--concurrency",
            &spec.concurrency.to_string(),
        ])
        .env("REDIS_URL", &spec.redis_url)
        .env("SESSIONFLEET_NAMESPACE", &spec.namespace)
        .env(
            "SESSIONFLEET_METRICS_ADDR",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("SESSIONFLEET_POLL_INTERVAL_MS", "100")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/sf-e2e-unused.db", dir.display()),
        )
        .env("RUST_LOG", "info,sessionfleet=debug")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let child = cmd.spawn().expect("start sessionfleet-worker");
        Worker {
            child,
            pid_namespace: spec.pid_namespace,
            metrics_port,
            log,
        }
    }

    /// The process id (of `unshare` when in a PID namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the worker (inside a PID namespace: to the worker, not `unshare`,
    /// which blocks SIGTERM while it waits).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        let target = if self.pid_namespace {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()
                .and_then(|s| s.split_whitespace().next().map(str::to_string))
                .unwrap_or_else(|| pid.to_string())
        } else {
            pid.to_string()
        };
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &target])
            .status();
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    /// Stops the worker; its log stays only when the test is failing at that moment, for
    /// inspection (each test's namespace names a new file, so kept logs would pile up run after
    /// run). A test that checks something after dropping its workers should read their logs
    /// first.
    fn drop(&mut self) {
        if self.pid_namespace {
            // Killing `unshare` would only SIGTERM the worker inside, which then shuts down at
            // its own pace and could write to Redis after the test's key guard has run. Killed
            // itself, it is gone once `unshare`, which waits for it, has exited.
            self.signal("KILL");
            let _ = self.wait_exit(Duration::from_secs(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A private `redis-server` (no persistence except an explicit `SHUTDOWN SAVE`), so a test can
/// restart Redis without disturbing the rest of the suite.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    /// Listening flags (plain port, or TLS port with certificates and a password).
    listen: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut s = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            listen: vec!["--port".into(), port.to_string()],
        };
        s.spawn();
        s
    }

    /// Starts one that speaks only TLS, with a certificate for 127.0.0.1 signed by a fresh
    /// private CA, and requires `password`. Returns the server and the CA's PEM file.
    pub fn start_tls(password: &str) -> (RedisServer, PathBuf) {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=sessionfleet test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let path = |f: &str| d.join(f).display().to_string();
        let listen = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path("server.pem"),
            "--tls-key-file".into(),
            path("server.key"),
            "--tls-ca-cert-file".into(),
            path("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            password.into(),
        ];
        let ca = d.join("ca.pem");
        let mut s = RedisServer {
            child: None,
            port,
            dir,
            listen,
        };
        s.spawn();
        (s, ca)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.listen)
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Saves a snapshot and stops (like a maintenance restart), then waits for the exit.
    pub fn shutdown_save(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SHUTDOWN", "SAVE"])
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Kills the server without saving and starts an empty one on the same port: everything
    /// it held (queues, leases, token counters) is lost, as after a restart without
    /// persistence or a failover to a replica that missed the writes.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        self.spawn();
    }

    /// Starts again on the same port from the saved snapshot.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A database that never answers: a loopback port whose connections the kernel accepts and
/// nobody ever reads, so a client waits until its own timeout. Dropped, the port closes: the
/// waiting clients get a reset and new ones are refused.
pub struct SilentServer {
    _listener: std::net::TcpListener,
    /// Its port.
    pub port: u16,
}

impl SilentServer {
    /// Starts listening on a free loopback port.
    pub fn start() -> SilentServer {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("local address").port();
        SilentServer {
            _listener: listener,
            port,
        }
    }
}

/// `GET path` on loopback `port`; returns (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` (hang guard only).
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes every key of namespace `ns`.
pub async fn drop_namespace(queue: &Queue) {
    let pattern = format!(
        "{}:{}:*",
        sessionfleet::queue::keys::SLOT_TAG,
        queue.keys().namespace()
    );
    let mut c = queue.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
    }
}

/// The sum of the samples of metric `name` in the Prometheus text `body` whose labels include
/// every `key="value"` of `labels` (a sample without labels when `labels` is empty); `None`
/// when no sample matches, as for a counter never incremented.
pub fn metric_sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let present: Vec<&str> = series_labels.split(',').collect();
        if labels
            .iter()
            .all(|(k, v)| present.contains(&format!("{k}=\"{v}\"").as_str()))
            && let Ok(v) = value.parse::<f64>()
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Scrapes `/metrics` on `port` until `accept` takes the body, which it returns; panics after
/// `limit` (hang guard only) with the last body.
pub async fn metrics_until(
    port: u16,
    limit: Duration,
    what: &str,
    accept: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let body = http_get(port, "/metrics").await.map(|(_, b)| b);
        if let Some(b) = &body
            && accept(b)
        {
            return body.unwrap_or_default();
        }
        assert!(
            start.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}; last /metrics:\n{}",
            body.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
