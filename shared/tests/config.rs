//! Configuration precedence (flag > env > file > default) and every refusal.

use std::collections::HashMap;
use std::io::Write;

use sessionfleet::config::{ConfigError, Overrides, Settings, Source};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn refusal(flags: &Overrides, env: &[(&str, &str)], file: Option<&std::path::Path>) -> String {
    match Settings::resolve(flags, &env_of(env), file) {
        Ok(_) => panic!("configuration was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_are_the_specs() {
    let s = Settings::resolve(&Overrides::default(), &env_of(&[]), None).unwrap();
    assert_eq!(s.cleanup_interval.value, 3600);
    assert_eq!(s.cleanup_batch_size.value, 100);
    assert_eq!(s.max_age.value, 172_800);
    assert!(s.monitoring_enabled.value);
    assert_eq!(s.metrics_retention_days.value, 7);
    assert!(s.alert_thresholds_file.value.is_none());
    assert_eq!(s.redis_url.value, "redis://127.0.0.1:6379");
    assert_eq!(s.target(None).unwrap().url, "sqlite://sessionfleet.db");
    assert_eq!(s.cleanup_interval.source, Source::Default);
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let file = file_with("cleanup_batch_size = 300\nmax_age = 1000\ncleanup_interval = 60\n");
    let env = [
        ("SESSION_CLEANUP_BATCH_SIZE", "200"),
        ("SESSION_MAX_AGE", "2000"),
    ];
    let mut flags = Overrides::default();
    flags.set("SESSION_CLEANUP_BATCH_SIZE", Some(100u32 + 1));
    let s = Settings::resolve(&flags, &env_of(&env), Some(file.path())).unwrap();
    assert_eq!(
        (s.cleanup_batch_size.value, s.cleanup_batch_size.source),
        (101, Source::Flag)
    );
    assert_eq!((s.max_age.value, s.max_age.source), (2000, Source::Env));
    assert_eq!(
        (s.cleanup_interval.value, s.cleanup_interval.source),
        (60, Source::File)
    );
    assert_eq!(s.metrics_retention_days.source, Source::Default);
}

#[test]
fn config_file_may_come_from_the_environment() {
    let file = file_with("max_age = 42\n");
    let path = file.path().display().to_string();
    let s = Settings::resolve(
        &Overrides::default(),
        &env_of(&[("SESSIONFLEET_CONFIG", &path)]),
        None,
    )
    .unwrap();
    assert_eq!(s.max_age.value, 42);
}

#[test]
fn targets_come_from_the_file_with_overrides() {
    let file = file_with(
        "default_target = \"eu\"\n\
         [targets.eu]\nurl = \"postgres://app:pw@db-eu/app\"\ncleanup_batch_size = 500\n\
         [targets.us]\nurl = \"mysql://app@db-us/app\"\nmax_age = 3600\n",
    );
    let s = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(file.path())).unwrap();
    assert_eq!(s.target(None).unwrap().name, "eu");
    let eu = s.target(Some("eu")).unwrap();
    assert_eq!(s.batch_size_for(eu), 500);
    let us = s.target(Some("us")).unwrap();
    assert_eq!(s.max_age_for(us).as_secs(), 3600);
    assert_eq!(s.batch_size_for(us), 100);
    assert!(
        !s.targets.contains_key("default"),
        "no phantom built-in target beside the file's: {}",
        s.target_names()
    );
    let with_env = Settings::resolve(
        &Overrides::default(),
        &env_of(&[("DATABASE_URL", "postgres://app@db-asia/app")]),
        Some(file.path()),
    )
    .unwrap();
    assert!(
        with_env.targets.contains_key("default"),
        "DATABASE_URL's own database stays available as 'default'"
    );
    let err = s.target(Some("asia")).unwrap_err().to_string();
    assert!(
        err.contains("unknown target 'asia'") && err.contains("eu"),
        "{err}"
    );
}

/// One database, one target: the lease and the fence are per target, so a database named by
/// two targets could be maintained by two processes at once. DATABASE_URL naming a database
/// the file names (the deploy examples: the password in the environment, the rest in the
/// file) is that target, not a second one; two file targets naming one database are refused.
#[test]
fn one_database_is_one_target() {
    let file = file_with(
        "[targets.app]\nurl = \"postgres://sessionfleet@DB.internal/app\"\n\
         [targets.legacy]\nurl = \"sqlite:///var/lib/legacy.db\"\n",
    );
    let env = [(
        "DATABASE_URL",
        "postgresql://sessionfleet:s3cr3t@db.internal:5432/app?sslmode=require",
    )];
    let s = Settings::resolve(&Overrides::default(), &env_of(&env), Some(file.path())).unwrap();
    assert_eq!(s.target_names(), "app, legacy");
    let app = s.target(None).unwrap();
    assert_eq!(app.name, "app", "DATABASE_URL's database");
    assert_eq!(
        app.url, env[0].1,
        "connected to with DATABASE_URL: its password and options"
    );

    // On the command line, DATABASE_URL picks the database over the file's default_target.
    let chosen = file_with(
        "default_target = \"app\"\n[targets.app]\nurl = \"postgres://sessionfleet@db.internal/app\"\n\
         [targets.legacy]\nurl = \"sqlite:///var/lib/legacy.db\"\n",
    );
    let mut flag = Overrides::default();
    flag.set(
        "DATABASE_URL",
        Some("sqlite:///var/lib/legacy.db".to_string()),
    );
    let s = Settings::resolve(&flag, &env_of(&[]), Some(chosen.path())).unwrap();
    assert_eq!(s.target(None).unwrap().name, "legacy");
    let mut other = Overrides::default();
    other.set(
        "DATABASE_URL",
        Some("sqlite:///tmp/elsewhere.db".to_string()),
    );
    let s = Settings::resolve(&other, &env_of(&[]), Some(chosen.path())).unwrap();
    assert_eq!(s.target(None).unwrap().name, "default");
    assert_eq!(s.target(None).unwrap().url, "sqlite:///tmp/elsewhere.db");

    let twice = file_with(
        "[targets.a]\nurl = \"mysql://u:pw1@db:3306/app\"\n\
         [targets.b]\nurl = \"mysql://v:pw2@db/app\"\n",
    );
    let err = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(twice.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("targets.b.url") && err.contains("target 'a'"),
        "{err}"
    );
    assert!(!err.contains("pw1") && !err.contains("pw2"), "{err}");

    let apart = file_with(
        "[targets.a]\nurl = \"mysql://u@db/app\"\n[targets.b]\nurl = \"mysql://u@db/other\"\n\
         [targets.c]\nurl = \"mysql://u@db:3307/app\"\n",
    );
    // The file's own database_url is the 'default' target beside its other targets.
    let with_key = file_with(
        "database_url = \"postgres://app@db/app\"\n[targets.legacy]\nurl = \"sqlite:///l.db\"\n",
    );
    let s = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(with_key.path())).unwrap();
    assert_eq!(s.target_names(), "default, legacy");
    assert_eq!(s.target(None).unwrap().name, "default");

    let apart = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(apart.path())).unwrap();
    let err = apart.target(None).unwrap_err().to_string();
    assert!(
        err.contains("--target") && err.contains("a, b, c"),
        "no default among three: {err}"
    );
}

#[test]
fn batch_target_and_rest_are_the_engine_s_unless_set_globally_or_per_target() {
    let file = file_with(
        "[targets.lite]\nurl = \"sqlite://app.db\"\n\
         cleanup_target_batch_ms = 35\ncleanup_rest_ratio = 0.25\n\
         [targets.pg]\nurl = \"postgres://app@db/app\"\n",
    );
    let pick = |s: &Settings, name: &str| {
        let t = s.target(Some(name)).unwrap();
        (s.target_batch_ms_for(t), s.rest_ratio_for(t))
    };
    let unset = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(file.path())).unwrap();
    assert_eq!(pick(&unset, "pg"), (None, None), "the engine decides");
    assert_eq!(pick(&unset, "lite"), (Some(35), Some(0.25)));

    let env = [
        ("SESSION_CLEANUP_TARGET_BATCH_MS", "80"),
        ("SESSION_CLEANUP_REST_RATIO", "2"),
    ];
    let global =
        Settings::resolve(&Overrides::default(), &env_of(&env), Some(file.path())).unwrap();
    assert_eq!(pick(&global, "pg"), (Some(80), Some(2.0)));
    assert_eq!(
        pick(&global, "lite"),
        (Some(35), Some(0.25)),
        "a target's own values beat the global ones"
    );

    let bad = file_with("[targets.x]\nurl = \"sqlite://x.db\"\ncleanup_rest_ratio = 500\n");
    let msg = refusal(&Overrides::default(), &[], Some(bad.path()));
    assert!(
        msg.contains("targets.x.cleanup_rest_ratio") && msg.contains("from 0 to 100"),
        "{msg}"
    );
}

#[test]
fn parallel_reads_are_on_unless_turned_off_globally_or_per_target() {
    let file = file_with(
        "[targets.small]\nurl = \"postgres://app@small/app\"\ncleanup_parallel_reads = false\n\
         [targets.big]\nurl = \"postgres://app@big/app\"\n",
    );
    let pick = |s: &Settings, name: &str| s.parallel_reads_for(s.target(Some(name)).unwrap());
    let unset = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(file.path())).unwrap();
    assert!(pick(&unset, "big"), "on by default");
    assert!(!pick(&unset, "small"), "off for the target that says so");

    let env = [("SESSION_CLEANUP_PARALLEL_READS", "false")];
    let global =
        Settings::resolve(&Overrides::default(), &env_of(&env), Some(file.path())).unwrap();
    assert!(
        !pick(&global, "big"),
        "off for every target without its own value"
    );

    let on = file_with("[targets.x]\nurl = \"sqlite://x.db\"\ncleanup_parallel_reads = true\n");
    let s = Settings::resolve(&Overrides::default(), &env_of(&env), Some(on.path())).unwrap();
    assert!(pick(&s, "x"), "a target's own value beats the global one");

    let bad =
        file_with("[targets.x]\nurl = \"sqlite://x.db\"\ncleanup_parallel_reads = \"often\"\n");
    let msg = refusal(&Overrides::default(), &[], Some(bad.path()));
    assert!(
        msg.contains("targets.x.cleanup_parallel_reads") && msg.contains("true or false"),
        "{msg}"
    );
}

#[test]
fn every_invalid_value_is_refused_with_the_variable_and_the_form() {
    let none = Overrides::default();
    let cases: &[(&str, &str, &str)] = &[
        (
            "SESSION_CLEANUP_INTERVAL",
            "hourly",
            "whole number of seconds",
        ),
        ("SESSION_CLEANUP_BATCH_SIZE", "0", "from 1 to 100000"),
        ("SESSION_MAX_AGE", "-5", "whole number of seconds"),
        ("SESSION_MONITORING_ENABLED", "maybe", "true or false"),
        ("SESSION_METRICS_RETENTION_DAYS", "0", "days"),
        (
            "SESSION_ALERT_THRESHOLDS_FILE",
            "/nonexistent/thresholds.json",
            "readable JSON file",
        ),
        ("DATABASE_URL", "oracle://db/app", "sqlite:, postgres:"),
        ("REDIS_URL", "http://cache:6379", "redis:// or rediss://"),
        ("SESSIONFLEET_LOG_FORMAT", "xml", "text or json"),
        ("SESSION_CLEANUP_REST_RATIO", "-1", "a number from 0 to 100"),
        (
            "SESSION_CLEANUP_PARALLEL_READS",
            "sometimes",
            "true or false",
        ),
        (
            "SESSION_CLEANUP_TARGET_BATCH_MS",
            "0",
            "milliseconds from 1 to 60000",
        ),
        (
            "SESSION_CLEANUP_REST_RATIO",
            "lots",
            "a number from 0 to 100",
        ),
    ];
    for (var, value, form) in cases {
        let msg = refusal(&none, &[(var, value)], None);
        assert!(msg.contains(var), "{var}: {msg}");
        assert!(msg.contains(form), "{var}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}

#[test]
fn flag_values_are_validated_like_env_values() {
    let mut flags = Overrides::default();
    flags.set("SESSION_CLEANUP_BATCH_SIZE", Some("0"));
    let msg = refusal(&flags, &[], None);
    assert!(
        msg.contains("SESSION_CLEANUP_BATCH_SIZE") && msg.contains("from flag"),
        "{msg}"
    );
}

#[test]
fn unreadable_and_malformed_files_are_refused() {
    let msg = refusal(
        &Overrides::default(),
        &[],
        Some(std::path::Path::new("/nonexistent/sf.toml")),
    );
    assert!(
        msg.contains("cannot read configuration file /nonexistent/sf.toml"),
        "{msg}"
    );
    let bad = file_with("max_age = [1, 2]\n");
    let msg = refusal(&Overrides::default(), &[], Some(bad.path()));
    assert!(msg.contains("max_age"), "{msg}");
    let broken = file_with("max_age = \n");
    assert!(matches!(
        Settings::resolve(&Overrides::default(), &env_of(&[]), Some(broken.path())),
        Err(ConfigError::BadFile { .. })
    ));
    // A syntax error says where, in one line, without quoting the line (it may hold a
    // password).
    let duplicate =
        file_with("redis_url = \"redis://:s3cret@cache:6379\"\nmax_age = 5\nmax_age = 6\n");
    let msg = refusal(&Overrides::default(), &[], Some(duplicate.path()));
    assert!(msg.contains("line 3, column 1"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    let unquoted = file_with("max_age = 5\ndatabase_url = postgres://app:s3cret@db/app\n");
    let msg = refusal(&Overrides::default(), &[], Some(unquoted.path()));
    assert!(msg.contains("line 2, column "), "{msg}");
    assert!(!msg.contains("s3cret") && msg.lines().count() == 1, "{msg}");
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    for (text, key) in [
        ("max_agee = 5\n", "max_agee"),
        (
            "[targets.eu]\nurl = \"sqlite://x.db\"\nbatch = 5\n",
            "targets.eu.batch",
        ),
        ("[schedule]\nnightly = \"0 2 * * *\"\n", "schedule.nightly"),
    ] {
        let f = file_with(text);
        let msg = refusal(&Overrides::default(), &[], Some(f.path()));
        assert!(msg.contains(&format!("unknown key '{key}'")), "{msg}");
    }
}

#[test]
fn schedules_accept_five_and_six_field_cron() {
    let f =
        file_with("[schedule]\ncleanup = \"*/15 * * * *\"\nfull_maintenance = \"0 30 3 * * *\"\n");
    let s = Settings::resolve(&Overrides::default(), &env_of(&[]), Some(f.path())).unwrap();
    assert_eq!(s.schedules.cleanup.as_deref(), Some("0 */15 * * * *"));
    assert_eq!(s.schedules.full_maintenance, "0 30 3 * * *");
    // `config show` says where each came from.
    let source_of = |key: &str| {
        s.rows()
            .into_iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, source)| source)
            .unwrap()
    };
    assert_eq!(source_of("schedule.full_maintenance"), Source::File);
    assert_eq!(source_of("schedule.health_report"), Source::Default);
    let bad = file_with("[schedule]\nhealth_report = \"every hour\"\n");
    let msg = refusal(&Overrides::default(), &[], Some(bad.path()));
    assert!(
        msg.contains("schedule.health_report") && msg.contains("cron expression"),
        "{msg}"
    );
    // Crontab's day of month and day of week together is explained, not called malformed; a
    // date that never comes is refused rather than left to a scheduler that never fires.
    for (expr, says) in [
        ("0 3 1 * 1", "not both"),
        ("0 2 30 2 *", "names no date to come"),
    ] {
        let bad = file_with(&format!("[schedule]\nfull_maintenance = \"{expr}\"\n"));
        let msg = refusal(&Overrides::default(), &[], Some(bad.path()));
        assert!(
            msg.contains("schedule.full_maintenance") && msg.contains(says),
            "{expr}: {msg}"
        );
    }
}

#[test]
fn passwords_never_appear_in_output_or_errors() {
    let env = [
        ("DATABASE_URL", "postgres://app:hunter2@db/app"),
        ("REDIS_URL", "redis://:s3cret@cache:6379"),
    ];
    let s = Settings::resolve(&Overrides::default(), &env_of(&env), None).unwrap();
    let shown = format!("{:?}", s.rows());
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
    // A `{:?}` of the settings, or of one target, as a log line might print them.
    let debugged = format!("{s:?} {:?}", s.target(None).unwrap());
    assert!(
        !debugged.contains("hunter2") && !debugged.contains("s3cret"),
        "{debugged}"
    );
    assert!(
        debugged.contains("db/app") && debugged.contains("cache:6379"),
        "{debugged}"
    );
    let msg = refusal(
        &Overrides::default(),
        &[("DATABASE_URL", "oracle://app:hunter2@db/app")],
        None,
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    // Mistyped URLs, missing their slashes or their scheme, keep their password too.
    for url in [
        "postgres//app:hunter2@db/app",
        "app:hunter2@db/app",
        "redis:/:hunter2@cache:6379",
    ] {
        let msg = refusal(&Overrides::default(), &[("DATABASE_URL", url)], None);
        assert!(
            !msg.contains("hunter2") && msg.contains("DATABASE_URL"),
            "{msg}"
        );
    }
    let msg = refusal(
        &Overrides::default(),
        &[("REDIS_URL", "redis:/:hunter2@cache:6379")],
        None,
    );
    assert!(
        !msg.contains("hunter2") && msg.contains("REDIS_URL"),
        "{msg}"
    );
    // One that passes the scheme check shows no password either.
    let s = Settings::resolve(
        &Overrides::default(),
        &env_of(&[("DATABASE_URL", "postgres:/app:hunter2@db/app")]),
        None,
    );
    let shown = match s {
        Ok(s) => format!("{:?}", s.rows()),
        Err(e) => e.to_string(),
    };
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// A database URL its driver cannot read is refused when the configuration loads, naming the
/// variable, not on every job later (exit 1, retried). Fails if only the scheme is checked.
#[test]
fn a_database_url_the_driver_cannot_read_is_refused_at_load() {
    for url in [
        "postgres://db:99999/app",
        "mysql://db:0x10/app",
        "mariadb://root@db:70000/test",
        "postgres://db/app?sslmode=sometimes",
    ] {
        let msg = refusal(&Overrides::default(), &[("DATABASE_URL", url)], None);
        assert!(
            msg.contains("DATABASE_URL") && msg.lines().count() == 1,
            "{url}: {msg}"
        );
    }
    for url in [
        "postgres://app:pw@db:5432/app?sslmode=require",
        "mariadb://root@127.0.0.1:3306/test",
        "sqlite://sessionfleet.db",
        "sqlite::memory:",
    ] {
        Settings::resolve(
            &Overrides::default(),
            &env_of(&[("DATABASE_URL", url)]),
            None,
        )
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}
