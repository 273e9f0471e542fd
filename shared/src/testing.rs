//! Test support (feature `testing`): every test gets its own database — a temporary SQLite
//! file, or a freshly created PostgreSQL / MariaDB database — and its own Redis namespace, so
//! the suite runs in parallel against the real services.
//!
//! Admin URLs can be pointed elsewhere with `SESSIONFLEET_TEST_PG_URL`,
//! `SESSIONFLEET_TEST_MYSQL_URL` and `SESSIONFLEET_TEST_REDIS_URL`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::{ConnectOptions, Db, Engine};

/// Admin URL of the local PostgreSQL (trust auth).
pub fn pg_admin_url() -> String {
    std::env::var("SESSIONFLEET_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Admin URL of the local MariaDB.
pub fn mysql_admin_url() -> String {
    std::env::var("SESSIONFLEET_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// URL of the shared test Redis.
pub fn redis_url() -> String {
    std::env::var("SESSIONFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The recorded result of a `kind` job on `target` that ended `outcome` at `at` with
/// `report`, for tests that fill a queue's results and history.
pub fn job_result(
    kind: crate::jobs::JobKind,
    target: &str,
    outcome: crate::queue::ResultOutcome,
    report: serde_json::Value,
    at: chrono::DateTime<chrono::Utc>,
) -> crate::queue::JobResult {
    crate::queue::JobResult {
        job_id: uuid::Uuid::new_v4(),
        run_id: uuid::Uuid::new_v4(),
        part: 0,
        kind,
        target: target.into(),
        outcome,
        report,
        error: None,
        attempts: 1,
        worker: "w".into(),
        started_at: at,
        finished_at: at,
        duration_ms: 1,
        rows_affected: 0,
    }
}

/// Settings with every value at its default but `DATABASE_URL`: one `default` target on
/// `url`, as the CLI and worker resolve it with nothing else configured.
pub fn settings_for_database(url: &str) -> crate::config::Settings {
    let url = url.to_string();
    let env_of = move |k: &str| (k == "DATABASE_URL").then(|| url.clone());
    crate::config::Settings::resolve(&crate::config::Overrides::default(), &env_of, None)
        .expect("settings for a test database")
}

/// A Redis namespace no other test uses. Pair it with a [`RedisKeysGuard`], or the keys that
/// carry no expiry (lease-token counters, the scheduler's last ticks) stay in Redis.
pub fn unique_namespace() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Deletes every key of a test's namespace (any key containing it: `<ns>:lease…`,
/// `{sessionfleet:<ns>}:…`), and its entries in apalis' queue registry, when dropped, unless the test is failing: like a [`TestDb`], a
/// failed test's keys stay for inspection. The keys are gone when the test ends, even on a
/// developer's Redis that keeps its data.
pub struct RedisKeysGuard {
    namespace: String,
}

impl RedisKeysGuard {
    /// Guards the keys of `namespace` (from [`unique_namespace`]).
    pub fn new(namespace: &str) -> RedisKeysGuard {
        RedisKeysGuard {
            namespace: namespace.to_string(),
        }
    }
}

impl Drop for RedisKeysGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // Blocking on purpose: Drop cannot await, and it is a handful of keys on a local server.
        let deleted = (|| -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(redis_url())?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("*{}*", self.namespace))
                .query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).exec(&mut conn)?;
            }
            // apalis registers each queue's worker set in its global registry (the hash
            // tag's own key), which outlives any namespace.
            let registry = crate::queue::keys::apalis_registry();
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(registry)
                .arg(0)
                .arg(-1)
                .query(&mut conn)?;
            let ours: Vec<&String> = members
                .iter()
                .filter(|m| m.contains(&format!(":{}:", self.namespace)))
                .collect();
            if !ours.is_empty() {
                redis::cmd("ZREM").arg(registry).arg(ours).exec(&mut conn)?;
            }
            Ok(())
        })();
        if let Err(e) = deleted {
            eprintln!("leaving Redis keys of {}: {e}", self.namespace);
        }
    }
}

/// Lowest port handed out: above the well-known services' ports.
const FIRST_TEST_PORT: u16 = 10_000;

/// A free TCP port on loopback, for a server a test starts (a worker's metrics, a private
/// `redis-server`), which binds it a moment later.
///
/// Not port 0's pick: that comes from the ephemeral range, which every outgoing connection
/// of the parallel suite also draws from, so one could take the port before the server binds
/// it. These come from outside that range (below it, or above it where the range starts
/// low), and never twice in one test binary (cargo runs the test binaries one after another).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let (ephemeral_start, ephemeral_end) =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| {
                let mut bounds = r.split_whitespace().map(|n| n.parse::<u16>().ok());
                Some((bounds.next()??, bounds.next()??))
            })
            .unwrap_or((32_768, 60_999));
    let below = (FIRST_TEST_PORT, ephemeral_start.max(FIRST_TEST_PORT));
    let above = (
        ephemeral_end.saturating_add(1).max(FIRST_TEST_PORT),
        u16::MAX,
    );
    let (low, high) = if below.1 - below.0 >= above.1 - above.0 {
        below
    } else {
        above
    };
    assert!(
        high - low >= 100,
        "no room for test ports outside the ephemeral range {ephemeral_start}-{ephemeral_end}"
    );
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = low + (uuid::Uuid::new_v4().as_u128() % u128::from(high - low)) as u16;
        if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// A loopback TCP port bound for as long as the value lives and never listened on: a
/// connection to it is refused, as by a server that is down, and no other process can take
/// the port meanwhile (a port found free and let go could be, and would then answer).
pub struct ClosedPort {
    _socket: socket2::Socket,
    port: u16,
}

impl ClosedPort {
    /// Binds a fresh port on 127.0.0.1 without listening on it.
    pub fn new() -> ClosedPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
        socket.bind(&any.into()).expect("bind a closed port");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("bound address")
            .port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A lock a test holds on a database from a connection of its own (a pool of one, so the
/// lock's statements all run on one server session), until [`HeldLock::release`].
pub struct HeldLock {
    locker: Db,
    /// The open transaction holding the locks; none for MySQL's `LOCK TABLES`.
    tx: Option<crate::store::DbTx<'static>>,
}

impl HeldLock {
    /// Every row of the sessions table, `SELECT … FOR UPDATE`: reads go on, and each cleanup
    /// batch waits for a row lock at its DELETE (a statement in flight that a kill surely
    /// breaks, or that ends at the batch's lock timeout).
    pub async fn every_session(url: &str) -> HeldLock {
        let locker = Self::one_connection(url).await;
        let tx = Self::hold_open(&locker, "SELECT id FROM user_sessions FOR UPDATE").await;
        HeldLock {
            locker,
            tx: Some(tx),
        }
    }

    /// The sessions table itself, a lock every read waits behind: PostgreSQL `ACCESS
    /// EXCLUSIVE`, MySQL `LOCK TABLES … WRITE`.
    pub async fn sessions_table(url: &str) -> HeldLock {
        let locker = Self::one_connection(url).await;
        if locker.engine() == Engine::MySql {
            locker
                .execute("LOCK TABLES user_sessions WRITE")
                .await
                .expect("lock");
            return HeldLock { locker, tx: None };
        }
        let tx =
            Self::hold_open(&locker, "LOCK TABLE user_sessions IN ACCESS EXCLUSIVE MODE").await;
        HeldLock {
            locker,
            tx: Some(tx),
        }
    }

    /// Lets go of the lock and closes its connection.
    pub async fn release(self) {
        match self.tx {
            Some(tx) => tx.rollback().await.expect("unlock"),
            None => {
                self.locker.execute("UNLOCK TABLES").await.expect("unlock");
            }
        }
        self.locker.close().await;
    }

    async fn one_connection(url: &str) -> Db {
        let opts = ConnectOptions {
            max_connections: 1,
            ..Default::default()
        };
        Db::connect(url, &opts).await.expect("locker connection")
    }

    /// Runs `sql` in a write transaction on `locker` and leaves it open, with the locks it
    /// took, for as long as the test says (on PostgreSQL past our sessions'
    /// idle-in-transaction limit).
    async fn hold_open(locker: &Db, sql: &str) -> crate::store::DbTx<'static> {
        let mut tx = locker.begin_write().await.expect("begin");
        let sql = match locker.engine() {
            Engine::Postgres => format!("SET LOCAL idle_in_transaction_session_timeout = 0; {sql}"),
            _ => sql.to_string(),
        };
        crate::on_tx!(&mut tx, c => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *c).await.map(|_| ()).expect("lock"));
        tx
    }
}

/// Makes `user_sessions.user_id` nullable, as in an application with guest sessions. SQLite
/// cannot drop a NOT NULL: the table is rebuilt under its own DDL minus that constraint.
pub async fn allow_sessions_without_a_user(db: &Db) {
    match db.engine() {
        Engine::Postgres => {
            db.execute("ALTER TABLE user_sessions ALTER COLUMN user_id DROP NOT NULL")
                .await
                .expect("nullable user_id");
        }
        Engine::MySql => {
            db.execute("ALTER TABLE user_sessions MODIFY user_id INTEGER NULL")
                .await
                .expect("nullable user_id");
        }
        Engine::Sqlite => {
            let ddl: Vec<String> = crate::on_pool!(db, p => sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'user_sessions' AND sql IS NOT NULL ORDER BY type DESC"
            ).fetch_all(p).await.expect("ddl"));
            let (table, indexes) = ddl.split_first().expect("the table's DDL");
            assert!(table.contains("user_id INTEGER NOT NULL"), "{table}");
            let mut rebuild = vec![
                "ALTER TABLE user_sessions RENAME TO user_sessions_old".to_string(),
                table.replace("user_id INTEGER NOT NULL", "user_id INTEGER"),
                "INSERT INTO user_sessions SELECT * FROM user_sessions_old".to_string(),
                "DROP TABLE user_sessions_old".to_string(),
            ];
            rebuild.extend(indexes.iter().cloned());
            // One transaction on one connection: another pooled connection could still plan
            // against the schema it read before the rebuild.
            let mut tx = db.begin_write().await.expect("begin");
            crate::on_tx!(&mut tx, c => {
                for sql in &rebuild {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut *c)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
            });
            tx.commit().await.expect("commit");
        }
    }
}

/// The three engines, for tests that run on each.
pub const ENGINES: [Engine; 3] = [Engine::Sqlite, Engine::Postgres, Engine::MySql];

/// A database created for one test. Call [`TestDb::drop_db`] at the end; a failed test leaves
/// its database behind for inspection (names start with `sf_test_`).
pub struct TestDb {
    /// Connected pool.
    pub db: Db,
    /// URL of the database (no password on the local services).
    pub url: String,
    engine: Engine,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// Creates an empty database on `engine`.
    pub async fn new(engine: Engine) -> TestDb {
        let name = format!(
            "sf_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let (url, dir) = match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path: PathBuf = dir.path().join(format!("{name}.db"));
                (format!("sqlite://{}", path.display()), Some(dir))
            }
            Engine::Postgres => {
                let admin = Db::connect(&pg_admin_url(), &ConnectOptions::default())
                    .await
                    .expect("PostgreSQL admin connection");
                admin
                    .execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                admin.close().await;
                let base = pg_admin_url();
                (replace_db(&base, &name), None)
            }
            Engine::MySql => {
                let admin = Db::connect(&mysql_admin_url(), &ConnectOptions::default())
                    .await
                    .expect("MariaDB admin connection");
                admin
                    .execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                admin.close().await;
                (replace_db(&mysql_admin_url(), &name), None)
            }
        };
        let db = Db::connect(&url, &ConnectOptions::creating_sqlite_file())
            .await
            .expect("connect test database");
        TestDb {
            db,
            url,
            engine,
            name,
            _dir: dir,
        }
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Every connection the PostgreSQL pool has opened, held at once, so a test can check
    /// that no session setting outlived the transaction that set it. Panics on other engines.
    pub async fn every_postgres_connection(
        &self,
    ) -> Vec<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        let crate::store::Pool::Postgres(pool) = self.db.pool() else {
            panic!("every_postgres_connection on a {} database", self.engine);
        };
        hold_every_connection(pool).await
    }

    /// [`TestDb::every_postgres_connection`] for SQLite, whose settings are per connection too.
    pub async fn every_sqlite_connection(&self) -> Vec<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        let crate::store::Pool::Sqlite(pool) = self.db.pool() else {
            panic!("every_sqlite_connection on a {} database", self.engine);
        };
        hold_every_connection(pool).await
    }

    /// [`TestDb::every_postgres_connection`] for MySQL/MariaDB.
    pub async fn every_mysql_connection(&self) -> Vec<sqlx::pool::PoolConnection<sqlx::MySql>> {
        let crate::store::Pool::MySql(pool) = self.db.pool() else {
            panic!("every_mysql_connection on a {} database", self.engine);
        };
        hold_every_connection(pool).await
    }

    /// Drops the database (SQLite: the temporary directory goes with the value).
    pub async fn drop_db(self) {
        self.db.close().await;
        let admin_url = match self.engine {
            Engine::Sqlite => return,
            Engine::Postgres => pg_admin_url(),
            Engine::MySql => mysql_admin_url(),
        };
        // A database left behind is a leak every later run adds to: a DROP that keeps failing
        // fails the test rather than pass in silence.
        let admin = Db::connect(&admin_url, &ConnectOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connect to drop test database {}: {e}", self.name));
        let force = if self.engine == Engine::Postgres {
            " WITH (FORCE)"
        } else {
            ""
        };
        let drop = format!("DROP DATABASE IF EXISTS {}{force}", self.name);
        let mut attempt = 1;
        while let Err(e) = admin.execute(&drop).await {
            assert!(attempt < 3, "{drop}: {e}");
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        admin.close().await;
    }
}

fn replace_db(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("admin URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// Acquires as many connections as `pool` has open, so each one it had is among them.
async fn hold_every_connection<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Vec<sqlx::pool::PoolConnection<DB>> {
    let mut held = Vec::new();
    while held.len() < pool.size() as usize {
        held.push(pool.acquire().await.expect("connection"));
    }
    assert!(!held.is_empty(), "the pool has opened no connection");
    held
}
