//! Configuration: every setting with its environment variable, TOML key, default and accepted
//! form in one table ([`KEYS`]), resolved with the precedence flag > env > file > default.
//!
//! The binaries turn their flags into the same names as the environment variables
//! ([`Overrides`]), so a value is parsed and validated in exactly one place whatever layer it
//! came from. Every refusal is one line naming the variable and the accepted form.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::secret::redact_url;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Env,
    /// The TOML configuration file.
    File,
    /// The built-in default.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
        })
    }
}

/// A configuration value that was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value does not have the accepted form.
    #[error("invalid {name}={value:?} (from {origin}): expected {form}")]
    Invalid {
        /// Variable name (the environment variable's, also used for flags and file keys).
        name: String,
        /// The refused value (passwords removed).
        value: String,
        /// Which layer gave it.
        origin: Source,
        /// What is accepted.
        form: String,
    },
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {reason}")]
    Unreadable {
        /// File path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The configuration file is not valid TOML or has the wrong shape.
    #[error("configuration file {path}: {reason}")]
    BadFile {
        /// File path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A key in the configuration file is not known.
    #[error("configuration file {path}: unknown key '{key}' (known keys: {known})")]
    UnknownKey {
        /// File path.
        path: String,
        /// The unknown key, with its section.
        key: String,
        /// The accepted keys of that section.
        known: String,
    },
    /// No `--target`, and neither a `default_target` nor a single target to fall back on.
    #[error(
        "no target given and no default target: pass --target NAME or set default_target (SESSIONFLEET_DEFAULT_TARGET) to one of: {0}"
    )]
    NoDefaultTarget(String),
    /// `--target` names no configured target.
    #[error("unknown target '{0}' (configured: {1})")]
    UnknownTarget(String, String),
}

/// One setting: its names in every layer, its default and accepted form.
#[derive(Debug)]
pub struct Key {
    /// Environment variable (also the name flags map to).
    pub env: &'static str,
    /// Top-level key in the TOML file.
    pub file: &'static str,
    /// Built-in default, in the accepted form ("" means unset).
    pub default: &'static str,
    /// The accepted form, for error messages and docs.
    pub form: &'static str,
    /// What it controls.
    pub help: &'static str,
}

/// Default SQLite database: a file in the working directory (opened, not created: only seeding
/// creates a missing file, so a mistyped path is an error, not an empty database).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://sessionfleet.db";
/// Default Redis.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The largest starting batch size (`SESSION_CLEANUP_BATCH_SIZE`, `--batch-size`).
pub const MAX_CLEANUP_BATCH_SIZE: u32 = 100_000;
/// The longest budget of one job, seconds (`SESSIONFLEET_JOB_BUDGET_SECS`, `--budget`): a day.
pub const MAX_JOB_BUDGET_SECS: u64 = 86_400;

/// Every setting sessionfleet reads. The README's configuration table is generated from the
/// same facts (`sessionfleet config keys`).
pub const KEYS: &[Key] = &[
    Key {
        env: "DATABASE_URL",
        file: "database_url",
        default: DEFAULT_DATABASE_URL,
        form: "a URL starting with sqlite:, postgres:, postgresql:, mysql: or mariadb: that its driver reads (a port from 1 to 65535, options it knows)",
        help: "database of the 'default' target",
    },
    Key {
        env: "REDIS_URL",
        file: "redis_url",
        default: DEFAULT_REDIS_URL,
        form: "a URL starting with redis:// or rediss://",
        help: "Redis holding queues, leases and results",
    },
    Key {
        env: "REDIS_CA_CERT",
        file: "redis_ca_cert",
        default: "",
        form: "the path of a readable PEM file",
        help: "CA certificate(s) that signed the rediss:// server's certificate (default: the public web roots)",
    },
    Key {
        env: "SESSION_CLEANUP_INTERVAL",
        file: "cleanup_interval",
        default: "3600",
        form: "a whole number of seconds from 1 to 31536000",
        help: "seconds between scheduled cleanups",
    },
    Key {
        env: "SESSION_CLEANUP_BATCH_SIZE",
        file: "cleanup_batch_size",
        default: "100",
        form: "a whole number from 1 to 100000",
        help: "rows per cleanup batch to start with (adapts to the target duration)",
    },
    Key {
        env: "SESSION_MAX_AGE",
        file: "max_age",
        default: "172800",
        form: "a whole number of seconds from 1 to 315360000",
        help: "idle seconds after which a session counts as expired",
    },
    Key {
        env: "SESSION_MONITORING_ENABLED",
        file: "monitoring_enabled",
        default: "true",
        form: "true or false (also 1/0, yes/no, on/off)",
        help: "whether the scheduler enqueues the hourly health report",
    },
    Key {
        env: "SESSION_METRICS_RETENTION_DAYS",
        file: "metrics_retention_days",
        default: "7",
        form: "a whole number of days from 1 to 3650",
        help: "days job results and run history are kept in Redis",
    },
    Key {
        env: "SESSION_ALERT_THRESHOLDS_FILE",
        file: "alert_thresholds_file",
        default: "",
        form: "a path to a readable JSON file",
        help: "JSON file overriding the five alert thresholds",
    },
    Key {
        env: "SESSION_CLEANUP_TARGET_BATCH_MS",
        file: "cleanup_target_batch_ms",
        default: "",
        form: "a whole number of milliseconds from 1 to 60000, or empty for the engine's default",
        help: "duration each cleanup transaction aims to stay under (default: 50, on SQLite 20)",
    },
    Key {
        env: "SESSION_CLEANUP_REST_RATIO",
        file: "cleanup_rest_ratio",
        default: "",
        form: "a number from 0 to 100, or empty for the engine's default",
        help: "rest after each cleanup batch, as a multiple of the batch's time (default: 1 on SQLite and MySQL, 0 on PostgreSQL)",
    },
    Key {
        env: "SESSION_CLEANUP_PARALLEL_READS",
        file: "cleanup_parallel_reads",
        default: "true",
        form: "true or false",
        help: "run the cleanup's reads (counts, candidates, statistics) beside its deletes; false: one statement at a time, slower and gentler on a database server with few cores",
    },
    Key {
        env: "SESSIONFLEET_NAMESPACE",
        file: "namespace",
        default: "sessionfleet",
        form: "1-64 characters of letters, digits, '-' and '_'",
        help: "prefix of every Redis key, so several fleets can share one Redis",
    },
    Key {
        env: "SESSIONFLEET_DEFAULT_TARGET",
        file: "default_target",
        default: "default",
        form: "the name of a configured target",
        help: "target used when --target is not given",
    },
    Key {
        env: "SESSIONFLEET_WORKER_CONCURRENCY",
        file: "worker_concurrency",
        default: "4",
        form: "a whole number from 1 to 1024",
        help: "jobs one worker process runs at once (per queue)",
    },
    Key {
        env: "SESSIONFLEET_POLL_INTERVAL_MS",
        file: "poll_interval_ms",
        default: "200",
        form: "a whole number of milliseconds from 10 to 60000",
        help: "how often an idle worker looks for new jobs",
    },
    Key {
        env: "SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS",
        file: "shutdown_timeout_secs",
        default: "30",
        form: "a whole number of seconds from 1 to 3600",
        help: "how long a stopping worker waits for running jobs",
    },
    Key {
        env: "SESSIONFLEET_METRICS_ADDR",
        file: "metrics_addr",
        default: "127.0.0.1:9464",
        form: "host:port to listen on, or 'off'",
        help: "address of the worker's /metrics, /healthz and /readyz",
    },
    Key {
        env: "SESSIONFLEET_LEASE_TTL_MS",
        file: "lease_ttl_ms",
        default: "15000",
        form: "a whole number of milliseconds from 300 to 600000",
        help: "lifetime of a database lease; renewed every third of it",
    },
    Key {
        env: "SESSIONFLEET_JOB_BUDGET_SECS",
        file: "job_budget_secs",
        default: "30",
        form: "a whole number of seconds from 1 to 86400",
        help: "time one cleanup job works before it enqueues its continuation",
    },
    Key {
        env: "SESSIONFLEET_LOG_FORMAT",
        file: "log_format",
        default: "text",
        form: "text or json",
        help: "log line format (logs go to stderr)",
    },
];

/// Settings given on the command line, keyed by the environment variable they stand for.
#[derive(Debug, Default, Clone)]
pub struct Overrides(pub HashMap<&'static str, String>);

impl Overrides {
    /// Records a flag's value under the variable it overrides (ignored when `None`).
    pub fn set(&mut self, env: &'static str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.0.insert(env, v.to_string());
        }
    }
}

/// A value with the layer it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

/// One database the fleet maintains. `Debug` shows the URL without its password.
#[derive(Clone, Serialize)]
pub struct Target {
    /// Target name (`default`, or the TOML section name).
    pub name: String,
    /// Database URL. Contains secrets: print [`Target::redacted_url`] instead.
    #[serde(skip)]
    pub url: String,
    /// Where the URL came from.
    pub source: Source,
    /// Per-target batch size override.
    pub cleanup_batch_size: Option<u32>,
    /// Per-target max-age override (seconds).
    pub max_age: Option<u64>,
    /// Per-target batch duration target override (milliseconds).
    pub cleanup_target_batch_ms: Option<u64>,
    /// Per-target rest ratio override.
    pub cleanup_rest_ratio: Option<f64>,
    /// Per-target override of whether the cleanup's reads run beside its deletes.
    pub cleanup_parallel_reads: Option<bool>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("source", &self.source)
            .field("cleanup_batch_size", &self.cleanup_batch_size)
            .field("max_age", &self.max_age)
            .field("cleanup_target_batch_ms", &self.cleanup_target_batch_ms)
            .field("cleanup_rest_ratio", &self.cleanup_rest_ratio)
            .field("cleanup_parallel_reads", &self.cleanup_parallel_reads)
            .finish()
    }
}

impl Target {
    /// The URL with its password removed.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Which database the URL names, whoever connects and however: engine, host, port and
    /// database name (a SQLite file's path). Two targets with one identity would be two
    /// leases on one database. `None` where it cannot be told (an in-memory SQLite database,
    /// a URL that does not parse).
    pub fn database_identity(&self) -> Option<String> {
        let engine = crate::store::Engine::from_url(&self.url).ok()?;
        if engine == crate::store::Engine::Sqlite {
            let rest = self.url.split_once(':')?.1;
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split('?').next().unwrap_or_default();
            return (!path.is_empty() && !path.contains(":memory:"))
                .then(|| format!("{engine}:{path}"));
        }
        let url = url::Url::parse(&self.url).ok()?;
        let port = url.port().unwrap_or(match engine {
            crate::store::Engine::Postgres => 5432,
            _ => 3306,
        });
        Some(format!(
            "{engine}://{}:{port}/{}",
            url.host_str()?.to_ascii_lowercase(),
            url.path().trim_matches('/')
        ))
    }
}

/// Cron schedules of the scheduler (six fields, seconds first; five-field expressions get a
/// leading `0`).
#[derive(Debug, Clone, Serialize)]
pub struct Schedules {
    /// Cleanup; default derived from `SESSION_CLEANUP_INTERVAL`.
    pub cleanup: Option<String>,
    /// Full maintenance; default daily at 02:00 UTC.
    pub full_maintenance: String,
    /// Health report; default hourly.
    pub health_report: String,
}

/// Default full-maintenance schedule: daily at 02:00 UTC.
pub const DEFAULT_FULL_MAINTENANCE_CRON: &str = "0 0 2 * * *";
/// Default health-report schedule: hourly.
pub const DEFAULT_HEALTH_REPORT_CRON: &str = "0 0 * * * *";

/// The effective configuration. `Debug` shows no password (see its impl).
#[derive(Clone, Serialize)]
pub struct Settings {
    /// Redis URL (may contain a password).
    #[serde(skip)]
    pub redis_url: Sourced<String>,
    /// CA bundle for `rediss://` servers with a private CA; `None` = the public web roots.
    pub redis_ca_cert: Sourced<Option<PathBuf>>,
    /// Seconds between scheduled cleanups.
    pub cleanup_interval: Sourced<u64>,
    /// Starting batch size.
    pub cleanup_batch_size: Sourced<u32>,
    /// Max idle age in seconds.
    pub max_age: Sourced<u64>,
    /// Monitoring on/off.
    pub monitoring_enabled: Sourced<bool>,
    /// Retention of results and history, days.
    pub metrics_retention_days: Sourced<u32>,
    /// Alert thresholds file.
    pub alert_thresholds_file: Sourced<Option<PathBuf>>,
    /// Target duration of a cleanup batch, ms; `None` = the engine's default.
    pub cleanup_target_batch_ms: Sourced<Option<u64>>,
    /// Rest after each cleanup batch, as a multiple of its time; `None` = the engine's default.
    pub cleanup_rest_ratio: Sourced<Option<f64>>,
    /// Whether the cleanup's reads run beside its deletes.
    pub cleanup_parallel_reads: Sourced<bool>,
    /// Redis key namespace.
    pub namespace: Sourced<String>,
    /// Default target name.
    pub default_target: Sourced<String>,
    /// Worker concurrency.
    pub worker_concurrency: Sourced<u32>,
    /// Worker poll interval, ms.
    pub poll_interval_ms: Sourced<u64>,
    /// Worker shutdown timeout, s.
    pub shutdown_timeout_secs: Sourced<u64>,
    /// Metrics listen address, `None` = off.
    pub metrics_addr: Sourced<Option<String>>,
    /// Lease TTL, ms.
    pub lease_ttl_ms: Sourced<u64>,
    /// Cleanup job time budget, s.
    pub job_budget_secs: Sourced<u64>,
    /// Log format.
    pub log_format: Sourced<LogFormat>,
    /// Configured targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Scheduler cron expressions.
    pub schedules: Schedules,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Environment variable naming the TOML file (the `--config` flag overrides it).
pub const CONFIG_FILE_ENV: &str = "SESSIONFLEET_CONFIG";

const TARGET_KEYS: &[&str] = &[
    "url",
    "cleanup_batch_size",
    "max_age",
    "cleanup_target_batch_ms",
    "cleanup_rest_ratio",
    "cleanup_parallel_reads",
];
const SCHEDULE_KEYS: &[&str] = &["cleanup", "full_maintenance", "health_report"];

/// The serialized form, which leaves the secrets out (targets' URLs, the Redis URL), with the
/// Redis URL added back redacted: a `{:?}` of the settings in a log line prints no password.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rest = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.debug_struct("Settings")
            .field("redis_url", &redact_url(&self.redis_url.value))
            .field("targets", &self.targets)
            .field("rest", &format_args!("{rest}"))
            .finish()
    }
}

impl Settings {
    /// Resolves settings from the process environment, the file named by `--config` or
    /// `SESSIONFLEET_CONFIG`, and `flags`.
    pub fn load(flags: &Overrides, config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::resolve(flags, &env, config_file)
    }

    /// Resolves settings from explicit layers (tests pass their own environment).
    pub fn resolve(
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
        config_file: Option<&Path>,
    ) -> Result<Settings, ConfigError> {
        let file_path = config_file
            .map(Path::to_path_buf)
            .or_else(|| env(CONFIG_FILE_ENV).map(PathBuf::from));
        let file = match &file_path {
            Some(p) => Some(FileLayer::read(p)?),
            None => None,
        };
        let layers = Layers {
            flags,
            env,
            file: file.as_ref(),
        };

        let database_url = layers.get("DATABASE_URL", parse_db_url)?;
        let redis_url = layers.get("REDIS_URL", parse_redis_url)?;
        let cleanup_interval = layers.get("SESSION_CLEANUP_INTERVAL", range_u64(1, 31_536_000))?;
        let cleanup_batch_size = layers.get(
            "SESSION_CLEANUP_BATCH_SIZE",
            range_u32(1, MAX_CLEANUP_BATCH_SIZE),
        )?;
        let max_age = layers.get(
            "SESSION_MAX_AGE",
            range_u64(1, crate::ops::cleanup::MAX_AGE_LIMIT_SECS),
        )?;
        let settings = Settings {
            monitoring_enabled: layers.get("SESSION_MONITORING_ENABLED", parse_bool)?,
            metrics_retention_days: layers
                .get("SESSION_METRICS_RETENTION_DAYS", range_u32(1, 3650))?,
            alert_thresholds_file: layers.get(
                "SESSION_ALERT_THRESHOLDS_FILE",
                optional(parse_readable_file),
            )?,
            redis_ca_cert: layers.get("REDIS_CA_CERT", optional(parse_readable_file))?,
            cleanup_target_batch_ms: layers.get(
                "SESSION_CLEANUP_TARGET_BATCH_MS",
                optional(range_u64(1, 60_000)),
            )?,
            cleanup_rest_ratio: layers
                .get("SESSION_CLEANUP_REST_RATIO", optional(parse_rest_ratio))?,
            cleanup_parallel_reads: layers.get("SESSION_CLEANUP_PARALLEL_READS", parse_bool)?,
            namespace: layers.get("SESSIONFLEET_NAMESPACE", parse_namespace)?,
            default_target: layers.get("SESSIONFLEET_DEFAULT_TARGET", |s| Ok(s.to_string()))?,
            worker_concurrency: layers
                .get("SESSIONFLEET_WORKER_CONCURRENCY", range_u32(1, 1024))?,
            poll_interval_ms: layers.get("SESSIONFLEET_POLL_INTERVAL_MS", range_u64(10, 60_000))?,
            shutdown_timeout_secs: layers
                .get("SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS", range_u64(1, 3600))?,
            metrics_addr: layers.get("SESSIONFLEET_METRICS_ADDR", parse_listen_addr)?,
            lease_ttl_ms: layers.get("SESSIONFLEET_LEASE_TTL_MS", range_u64(300, 600_000))?,
            job_budget_secs: layers.get(
                "SESSIONFLEET_JOB_BUDGET_SECS",
                range_u64(1, MAX_JOB_BUDGET_SECS),
            )?,
            log_format: layers.get("SESSIONFLEET_LOG_FORMAT", parse_log_format)?,
            targets: BTreeMap::new(),
            schedules: Schedules {
                cleanup: None,
                full_maintenance: DEFAULT_FULL_MAINTENANCE_CRON.into(),
                health_report: DEFAULT_HEALTH_REPORT_CRON.into(),
            },
            config_file: file_path,
            redis_url,
            cleanup_interval,
            cleanup_batch_size,
            max_age,
        };
        let mut settings = settings;
        if let Some(file) = &file {
            settings.targets = file.targets()?;
            settings.schedules = file.schedules()?;
        }
        // The 'default' target is DATABASE_URL's: always when it is given (flag, env, the
        // file's `database_url`; over a file's own [targets.default] from a flag or the
        // environment), and with its built-in value only when the file names no targets — a
        // phantom local SQLite file beside configured targets would be scheduled and fail on
        // every tick.
        let explicit = match database_url.source {
            Source::Flag | Source::Env => true,
            Source::File => !settings.targets.contains_key("default"),
            _ => false,
        };
        let from_flag = matches!(database_url.source, Source::Flag);
        if explicit || settings.targets.is_empty() {
            let default = Target {
                name: "default".into(),
                url: database_url.value,
                source: database_url.source,
                cleanup_batch_size: None,
                max_age: None,
                cleanup_target_batch_ms: None,
                cleanup_rest_ratio: None,
                cleanup_parallel_reads: None,
            };
            // DATABASE_URL naming a database the file already names (as the deploy examples
            // do, with the password in the environment) is that target, connected to with
            // DATABASE_URL (its credentials, its options); the file's per-target settings
            // stay. A second name would be a second lease on the same database.
            let same = default.database_identity().and_then(|id| {
                settings
                    .targets
                    .values_mut()
                    .find(|t| t.name != "default" && t.database_identity().as_ref() == Some(&id))
            });
            let chosen = match same {
                Some(target) => {
                    target.url = default.url;
                    target.source = default.source.clone();
                    target.name.clone()
                }
                None => {
                    settings.targets.insert("default".into(), default);
                    "default".to_string()
                }
            };
            // DATABASE_URL picks the database a command works on unless a default target
            // was chosen as explicitly (a command-line flag beats the file's choice).
            let flag_beats_choice =
                from_flag && !matches!(settings.default_target.source, Source::Flag);
            if settings.default_target.source == Source::Default || flag_beats_choice {
                settings.default_target.value = chosen;
            }
        }
        check_one_target_per_database(&settings.targets)?;
        // Left unset beside a file's targets, the default is the only target there is, or
        // none: commands then name theirs (`--target`), and the scheduler takes them all.
        let unset = settings.default_target.source == Source::Default;
        if unset
            && !settings
                .targets
                .contains_key(&settings.default_target.value)
            && settings.targets.len() == 1
            && let Some(only) = settings.targets.keys().next()
        {
            settings.default_target.value = only.clone();
        }
        if !unset
            && !settings
                .targets
                .contains_key(&settings.default_target.value)
        {
            return Err(ConfigError::Invalid {
                name: "SESSIONFLEET_DEFAULT_TARGET".into(),
                value: settings.default_target.value.clone(),
                origin: settings.default_target.source.clone(),
                form: format!(
                    "one of the configured targets ({})",
                    settings.target_names()
                ),
            });
        }
        Ok(settings)
    }

    /// Names of the configured targets, comma-separated.
    pub fn target_names(&self) -> String {
        self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The target called `name`, or the default target when `None`.
    pub fn target(&self, name: Option<&str>) -> Result<&Target, ConfigError> {
        let given = name.is_some();
        let name = name.unwrap_or(&self.default_target.value);
        self.targets.get(name).ok_or_else(|| {
            if given {
                ConfigError::UnknownTarget(name.to_string(), self.target_names())
            } else {
                ConfigError::NoDefaultTarget(self.target_names())
            }
        })
    }

    /// Effective batch size for a target.
    pub fn batch_size_for(&self, target: &Target) -> u32 {
        target
            .cleanup_batch_size
            .unwrap_or(self.cleanup_batch_size.value)
    }

    /// Effective max age for a target.
    pub fn max_age_for(&self, target: &Target) -> Duration {
        Duration::from_secs(target.max_age.unwrap_or(self.max_age.value))
    }

    /// Effective batch duration target for a target, ms; `None` = the engine's default.
    pub fn target_batch_ms_for(&self, target: &Target) -> Option<u64> {
        target
            .cleanup_target_batch_ms
            .or(self.cleanup_target_batch_ms.value)
    }

    /// Effective rest ratio for a target; `None` = the engine's default.
    pub fn rest_ratio_for(&self, target: &Target) -> Option<f64> {
        target.cleanup_rest_ratio.or(self.cleanup_rest_ratio.value)
    }

    /// Whether the cleanup's reads run beside its deletes on a target.
    pub fn parallel_reads_for(&self, target: &Target) -> bool {
        target
            .cleanup_parallel_reads
            .unwrap_or(self.cleanup_parallel_reads.value)
    }

    /// The cleanup schedule: the file's, or "every SESSION_CLEANUP_INTERVAL seconds".
    pub fn cleanup_schedule(&self) -> String {
        self.schedules
            .cleanup
            .clone()
            .unwrap_or_else(|| format!("every {}s", self.cleanup_interval.value))
    }

    /// Rows for `sessionfleet config show`: (name, value, source), passwords removed.
    pub fn rows(&self) -> Vec<(String, String, Source)> {
        fn row<T: ToString>(name: &str, s: &Sourced<T>) -> (String, String, Source) {
            (name.to_string(), s.value.to_string(), s.source.clone())
        }
        // A setting whose default differs per engine: unset reads "(engine's default)".
        fn per_engine<T: ToString>(name: &str, s: &Sourced<Option<T>>) -> (String, String, Source) {
            let value = s.value.as_ref().map_or(ENGINE_DEFAULT.into(), T::to_string);
            (name.to_string(), value, s.source.clone())
        }
        let opt = |name: &str, s: &Sourced<Option<String>>, none: &str| {
            (
                name.to_string(),
                s.value.clone().unwrap_or_else(|| none.into()),
                s.source.clone(),
            )
        };
        let path = |name: &str, s: &Sourced<Option<PathBuf>>, none: &str| {
            (
                name.to_string(),
                s.value
                    .as_ref()
                    .map_or(none.into(), |p| p.display().to_string()),
                s.source.clone(),
            )
        };
        let mut rows = vec![
            (
                "REDIS_URL".to_string(),
                redact_url(&self.redis_url.value),
                self.redis_url.source.clone(),
            ),
            path("REDIS_CA_CERT", &self.redis_ca_cert, "(public web roots)"),
            row("SESSION_CLEANUP_INTERVAL", &self.cleanup_interval),
            row("SESSION_CLEANUP_BATCH_SIZE", &self.cleanup_batch_size),
            row("SESSION_MAX_AGE", &self.max_age),
            row("SESSION_MONITORING_ENABLED", &self.monitoring_enabled),
            row(
                "SESSION_METRICS_RETENTION_DAYS",
                &self.metrics_retention_days,
            ),
            path(
                "SESSION_ALERT_THRESHOLDS_FILE",
                &self.alert_thresholds_file,
                "(built-in thresholds)",
            ),
            per_engine(
                "SESSION_CLEANUP_TARGET_BATCH_MS",
                &self.cleanup_target_batch_ms,
            ),
            per_engine("SESSION_CLEANUP_REST_RATIO", &self.cleanup_rest_ratio),
            row(
                "SESSION_CLEANUP_PARALLEL_READS",
                &self.cleanup_parallel_reads,
            ),
            row("SESSIONFLEET_NAMESPACE", &self.namespace),
            row("SESSIONFLEET_DEFAULT_TARGET", &self.default_target),
            row("SESSIONFLEET_WORKER_CONCURRENCY", &self.worker_concurrency),
            row("SESSIONFLEET_POLL_INTERVAL_MS", &self.poll_interval_ms),
            row(
                "SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS",
                &self.shutdown_timeout_secs,
            ),
            opt("SESSIONFLEET_METRICS_ADDR", &self.metrics_addr, "off"),
            row("SESSIONFLEET_LEASE_TTL_MS", &self.lease_ttl_ms),
            row("SESSIONFLEET_JOB_BUDGET_SECS", &self.job_budget_secs),
            (
                "SESSIONFLEET_LOG_FORMAT".into(),
                format!("{:?}", self.log_format.value).to_lowercase(),
                self.log_format.source.clone(),
            ),
        ];
        for t in self.targets.values() {
            rows.push((
                format!("target.{}.url", t.name),
                t.redacted_url(),
                t.source.clone(),
            ));
            if let Some(b) = t.cleanup_batch_size {
                rows.push((
                    format!("target.{}.cleanup_batch_size", t.name),
                    b.to_string(),
                    Source::File,
                ));
            }
            if let Some(a) = t.max_age {
                rows.push((
                    format!("target.{}.max_age", t.name),
                    a.to_string(),
                    Source::File,
                ));
            }
            if let Some(ms) = t.cleanup_target_batch_ms {
                rows.push((
                    format!("target.{}.cleanup_target_batch_ms", t.name),
                    ms.to_string(),
                    Source::File,
                ));
            }
            if let Some(r) = t.cleanup_rest_ratio {
                rows.push((
                    format!("target.{}.cleanup_rest_ratio", t.name),
                    r.to_string(),
                    Source::File,
                ));
            }
            if let Some(p) = t.cleanup_parallel_reads {
                rows.push((
                    format!("target.{}.cleanup_parallel_reads", t.name),
                    p.to_string(),
                    Source::File,
                ));
            }
        }
        rows.push((
            "schedule.cleanup".into(),
            self.cleanup_schedule(),
            if self.schedules.cleanup.is_some() {
                Source::File
            } else {
                Source::Default
            },
        ));
        // Only the file sets these; one equal to the default is shown as the default.
        let source = |value: &str, default: &str| {
            if value == default {
                Source::Default
            } else {
                Source::File
            }
        };
        rows.push((
            "schedule.full_maintenance".into(),
            self.schedules.full_maintenance.clone(),
            source(
                &self.schedules.full_maintenance,
                DEFAULT_FULL_MAINTENANCE_CRON,
            ),
        ));
        rows.push((
            "schedule.health_report".into(),
            self.schedules.health_report.clone(),
            source(&self.schedules.health_report, DEFAULT_HEALTH_REPORT_CRON),
        ));
        rows
    }
}

struct Layers<'a> {
    flags: &'a Overrides,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: Option<&'a FileLayer>,
}

impl Layers<'_> {
    /// Picks the highest layer that sets `env_name` and parses it with `parse`.
    fn get<T>(
        &self,
        env_name: &str,
        parse: impl Fn(&str) -> Result<T, ()>,
    ) -> Result<Sourced<T>, ConfigError> {
        let key = KEYS
            .iter()
            .find(|k| k.env == env_name)
            .expect("every setting is listed in KEYS");
        let (raw, source) = if let Some(v) = self.flags.0.get(key.env) {
            (v.clone(), Source::Flag)
        } else if let Some(v) = (self.env)(key.env) {
            (v, Source::Env)
        } else if let Some(v) = self.file.and_then(|f| f.top.get(key.file)) {
            (v.clone(), Source::File)
        } else {
            (key.default.to_string(), Source::Default)
        };
        parse(raw.trim())
            .map(|value| Sourced {
                value,
                source: source.clone(),
            })
            .map_err(|()| ConfigError::Invalid {
                name: key.env.to_string(),
                value: redact_url(&raw),
                origin: source,
                form: key.form.to_string(),
            })
    }
}

/// The TOML file, flattened to strings so values go through the same parsers as env vars.
struct FileLayer {
    path: String,
    top: HashMap<String, String>,
    raw_targets: BTreeMap<String, toml::Table>,
    raw_schedule: Option<toml::Table>,
}

impl FileLayer {
    fn read(path: &Path) -> Result<FileLayer, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::BadFile {
                    path: shown.clone(),
                    reason: toml_error(&text, &e),
                })?;
        let mut layer = FileLayer {
            path: shown.clone(),
            top: HashMap::new(),
            raw_targets: BTreeMap::new(),
            raw_schedule: None,
        };
        let bad = |reason: String| ConfigError::BadFile {
            path: shown.clone(),
            reason,
        };
        for (k, v) in table {
            match (k.as_str(), v) {
                ("targets", toml::Value::Table(t)) => {
                    for (name, section) in t {
                        match section {
                            toml::Value::Table(s) => {
                                layer.raw_targets.insert(name, s);
                            }
                            _ => return Err(bad(format!("[targets.{name}] must be a table"))),
                        }
                    }
                }
                ("schedule", toml::Value::Table(s)) => layer.raw_schedule = Some(s),
                ("targets" | "schedule", _) => return Err(bad(format!("'{k}' must be a table"))),
                (key, value) => {
                    if !KEYS.iter().any(|x| x.file == key) {
                        let mut known: Vec<&str> = KEYS.iter().map(|x| x.file).collect();
                        known.extend(["[targets.NAME]", "[schedule]"]);
                        return Err(ConfigError::UnknownKey {
                            path: shown.clone(),
                            key: key.to_string(),
                            known: known.join(", "),
                        });
                    }
                    layer.top.insert(
                        key.to_string(),
                        scalar(&value).map_err(|e| bad(format!("'{key}': {e}")))?,
                    );
                }
            }
        }
        Ok(layer)
    }

    fn targets(&self) -> Result<BTreeMap<String, Target>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, section) in &self.raw_targets {
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || name.is_empty()
            {
                return Err(ConfigError::BadFile {
                    path: self.path.clone(),
                    reason: format!("target name '{name}' must use letters, digits, '-' and '_'"),
                });
            }
            for key in section.keys() {
                if !TARGET_KEYS.contains(&key.as_str()) {
                    return Err(ConfigError::UnknownKey {
                        path: self.path.clone(),
                        key: format!("targets.{name}.{key}"),
                        known: TARGET_KEYS.join(", "),
                    });
                }
            }
            let field = |key: &str| -> Result<Option<String>, ConfigError> {
                section
                    .get(key)
                    .map(|v| {
                        scalar(v).map_err(|e| ConfigError::BadFile {
                            path: self.path.clone(),
                            reason: format!("targets.{name}.{key}: {e}"),
                        })
                    })
                    .transpose()
            };
            let invalid = |key: &str, value: String, form: &str| ConfigError::Invalid {
                name: format!("targets.{name}.{key}"),
                value: redact_url(&value),
                origin: Source::File,
                form: form.to_string(),
            };
            let url = field("url")?.ok_or_else(|| ConfigError::BadFile {
                path: self.path.clone(),
                reason: format!("[targets.{name}] needs a url"),
            })?;
            let url = parse_db_url(&url).map_err(|()| invalid("url", url.clone(), KEYS[0].form))?;
            let num =
                |key: &str, lo: u64, hi: u64, form: &str| -> Result<Option<u64>, ConfigError> {
                    field(key)?
                        .map(|v| range_u64(lo, hi)(&v).map_err(|()| invalid(key, v.clone(), form)))
                        .transpose()
                };
            out.insert(
                name.clone(),
                Target {
                    name: name.clone(),
                    url,
                    source: Source::File,
                    cleanup_batch_size: num(
                        "cleanup_batch_size",
                        1,
                        100_000,
                        "a whole number from 1 to 100000",
                    )?
                    .map(|v| v as u32),
                    max_age: num(
                        "max_age",
                        1,
                        crate::ops::cleanup::MAX_AGE_LIMIT_SECS,
                        "a whole number of seconds from 1 to 315360000",
                    )?,
                    cleanup_target_batch_ms: num(
                        "cleanup_target_batch_ms",
                        1,
                        60_000,
                        "a whole number of milliseconds from 1 to 60000",
                    )?,
                    cleanup_rest_ratio: field("cleanup_rest_ratio")?
                        .map(|v| {
                            parse_rest_ratio(&v).map_err(|()| {
                                invalid("cleanup_rest_ratio", v.clone(), "a number from 0 to 100")
                            })
                        })
                        .transpose()?,
                    cleanup_parallel_reads: field("cleanup_parallel_reads")?
                        .map(|v| {
                            parse_bool(&v).map_err(|()| {
                                invalid("cleanup_parallel_reads", v.clone(), "true or false")
                            })
                        })
                        .transpose()?,
                },
            );
        }
        Ok(out)
    }

    fn schedules(&self) -> Result<Schedules, ConfigError> {
        let mut s = Schedules {
            cleanup: None,
            full_maintenance: DEFAULT_FULL_MAINTENANCE_CRON.into(),
            health_report: DEFAULT_HEALTH_REPORT_CRON.into(),
        };
        let Some(table) = &self.raw_schedule else {
            return Ok(s);
        };
        for (key, value) in table {
            if !SCHEDULE_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: self.path.clone(),
                    key: format!("schedule.{key}"),
                    known: SCHEDULE_KEYS.join(", "),
                });
            }
            let raw = scalar(value).map_err(|e| ConfigError::BadFile {
                path: self.path.clone(),
                reason: format!("schedule.{key}: {e}"),
            })?;
            let expr = parse_cron(&raw).map_err(|form| ConfigError::Invalid {
                name: format!("schedule.{key}"),
                value: raw.clone(),
                origin: Source::File,
                form,
            })?;
            match key.as_str() {
                "cleanup" => s.cleanup = Some(expr),
                "full_maintenance" => s.full_maintenance = expr,
                _ => s.health_report = expr,
            }
        }
        Ok(s)
    }
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

/// Refuses two targets that name one database: each target has its own lease and fence, so
/// two names would let two maintenance processes work on it at once.
fn check_one_target_per_database(targets: &BTreeMap<String, Target>) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<String, &Target> = BTreeMap::new();
    for t in targets.values() {
        let Some(id) = t.database_identity() else {
            continue;
        };
        if let Some(first) = seen.insert(id, t) {
            return Err(ConfigError::Invalid {
                name: format!("targets.{}.url", t.name),
                value: t.redacted_url(),
                origin: t.source.clone(),
                form: format!(
                    "a database no other target names (target '{}' names it too; one database needs one target, or two leases let two processes maintain it at once)",
                    first.name
                ),
            });
        }
    }
    Ok(())
}

/// A cron expression in the seconds-first form the scheduler uses ([`normalize_cron`]), or
/// what it should have been, to follow "expected": crontab's day of month *and* day of week
/// (crontab fires on either, the cron crate only on both), or a date that never comes (30
/// February), which would leave a scheduler running without ever firing.
pub fn parse_cron(expr: &str) -> Result<String, String> {
    let Some(six) = normalize_cron(expr) else {
        return Err(match expr.split_whitespace().collect::<Vec<_>>()[..] {
            [_, _, day, _, weekday]
                if !matches!(day, "*" | "?") && !matches!(weekday, "*" | "?") =>
            {
                "a day of month or a day of week, not both (crontab fires on either, which this scheduler cannot express): keep one of them".into()
            }
            _ => "a cron expression ('0 2 * * *' or with seconds '0 0 2 * * *')".into(),
        });
    };
    use std::str::FromStr;
    let fires = cron::Schedule::from_str(&six)
        .map(|s| s.upcoming(chrono::Utc).next().is_some())
        .unwrap_or(false);
    if !fires {
        return Err("a cron expression that fires: this one names no date to come".into());
    }
    Ok(six)
}

/// Accepts five-field (minute first) or six/seven-field (seconds first) cron expressions and
/// returns the seconds-first form the scheduler uses; `None` if it is not a cron expression.
///
/// Five fields are read as Unix cron reads them: day of week 0 or 7 is Sunday, 1 Monday. The
/// cron crate counts 1 = Sunday to 7 = Saturday, so a five-field day of week is translated
/// ([`unix_days_of_week`]); six or seven fields are the crate's own syntax, unchanged.
pub fn normalize_cron(expr: &str) -> Option<String> {
    let expr = expr.trim();
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = if let [minute, hour, day, month, weekday] = fields[..] {
        // crontab runs when either day field matches if both are restricted; the cron crate
        // needs both. Such an expression would silently run on fewer days: refused.
        if !matches!(day, "*" | "?") && !matches!(weekday, "*" | "?") {
            return None;
        }
        let weekday = unix_days_of_week(weekday)?;
        format!("0 {minute} {hour} {day} {month} {weekday}")
    } else {
        expr.to_string()
    };
    use std::str::FromStr;
    cron::Schedule::from_str(&six).ok().map(|_| six)
}

/// A Unix cron day-of-week field (0-7, 0 and 7 Sunday; names; lists, ranges, steps) in the
/// cron crate's numbering (1 = Sunday), as an explicit list. `None` for a day out of range,
/// an unknown name or a backwards range.
fn unix_days_of_week(field: &str) -> Option<String> {
    if field == "*" || field == "?" {
        return Some(field.to_string());
    }
    const NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    // Names become crontab's numbers first, so "1-FRI" reads as one range.
    let numbered = field.to_ascii_uppercase();
    let numbered = NAMES
        .iter()
        .enumerate()
        .fold(numbered, |f, (n, name)| f.replace(name, &n.to_string()));
    let mut days: Vec<String> = Vec::new();
    for item in numbered.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, step.parse::<usize>().ok().filter(|s| *s > 0)?),
            None => (item, 1),
        };
        let (first, last): (u32, u32) = match range.split_once('-') {
            _ if range == "*" => (0, 6),
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            // "n/step": from n to the end of the week (7, Sunday again).
            None if item.contains('/') => (range.parse().ok()?, 7),
            None => (range.parse().ok()?, range.parse().ok()?),
        };
        if first > last || last > 7 {
            return None;
        }
        for day in (first..=last).step_by(step) {
            let crate_day = (day % 7 + 1).to_string();
            if !days.contains(&crate_day) {
                days.push(crate_day);
            }
        }
    }
    Some(days.join(","))
}

/// How `config show` names a setting left to the engine's default.
const ENGINE_DEFAULT: &str = "(engine's default)";

/// `parse`, or `None` for an empty value.
fn optional<T>(parse: impl Fn(&str) -> Result<T, ()>) -> impl Fn(&str) -> Result<Option<T>, ()> {
    move |s| {
        if s.is_empty() {
            Ok(None)
        } else {
            parse(s).map(Some)
        }
    }
}

fn range_u64(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, ()> {
    move |s| match s.parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(()),
    }
}

fn range_u32(lo: u32, hi: u32) -> impl Fn(&str) -> Result<u32, ()> {
    move |s| match s.parse::<u32>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(()),
    }
}

fn parse_bool(s: &str) -> Result<bool, ()> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(()),
    }
}

/// A TOML error as one line: where (line and column) and what, never the line's text, which
/// may hold a password (toml's own `Display` quotes it).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end();
    let Some(span) = e.span() else {
        return what.to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: {what}")
}

fn parse_db_url(s: &str) -> Result<String, ()> {
    crate::store::check_url(s)
        .map(|()| s.to_string())
        .map_err(|_| ())
}

fn parse_redis_url(s: &str) -> Result<String, ()> {
    let scheme = s
        .split("://")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if (scheme == "redis" || scheme == "rediss") && s.contains("://") && url::Url::parse(s).is_ok()
    {
        Ok(s.to_string())
    } else {
        Err(())
    }
}

/// A rest ratio from 0 to [`crate::ops::cleanup::MAX_REST_RATIO`].
fn parse_rest_ratio(s: &str) -> Result<f64, ()> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=crate::ops::cleanup::MAX_REST_RATIO).contains(&r) => Ok(r),
        _ => Err(()),
    }
}

fn parse_readable_file(s: &str) -> Result<PathBuf, ()> {
    let p = PathBuf::from(s);
    std::fs::File::open(&p).map(|_| p).map_err(|_| ())
}

fn parse_namespace(s: &str) -> Result<String, ()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok { Ok(s.to_string()) } else { Err(()) }
}

fn parse_listen_addr(s: &str) -> Result<Option<String>, ()> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(Some(s.to_string()))
        }
        _ => Err(()),
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, ()> {
    match s.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(()),
    }
}
