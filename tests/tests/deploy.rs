//! The deployment files agree with the code: every manifest parses, and the ports, paths,
//! environment names, secret keys, queue names, binaries and flags they name exist.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use sessionfleet::config::KEYS;
use sessionfleet::jobs::QueueClass;
use sessionfleet::queue::Keys;
use sessionfleet::testing::free_port;
use sessionfleet_e2e::{RedisServer, binary, workspace_root};

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn yaml_docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn known_env(name: &str) -> bool {
    KEYS.iter().any(|k| k.env == name) || name == "SESSIONFLEET_CONFIG"
}

/// Runs `bin` with a deployment's real arguments and environment against a private Redis,
/// and returns why it did not get past its configuration, if it did not. `--help` would not
/// do: clap stops at it, before the binaries check the values (`--queues cleanp` passed).
///
/// Past its configuration means: a long-running process (the worker, the scheduler) said it
/// started — it is then stopped with SIGTERM and must exit 0 — or a job command reached the
/// fleet and found no worker consuming its queue (exit 5; none runs here). A refused flag,
/// variable or file value exits 2 before either.
fn refusal(
    bin: &str,
    args: &[&str],
    env: &[(String, String)],
    redis: &RedisServer,
) -> Option<String> {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let mut child = binary(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("REDIS_URL", redis.url())
        // The manifests' fixed port may be taken on a test machine.
        .env(
            "SESSIONFLEET_METRICS_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let started = |l: &String| l.contains("worker starting") || l.contains("scheduler started");
    let begun = Instant::now();
    let (status, signalled) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status, false);
        }
        if lines.lock().unwrap().iter().any(started) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            break (child.wait().unwrap(), true);
        }
        if begun.elapsed() > Duration::from_secs(60) {
            // Hang guard only: neither started nor ended.
            let _ = child.kill();
            let _ = child.wait();
            break (child.wait().unwrap(), false);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let stderr = lines.lock().unwrap().join("\n");
    let ok = match status.code() {
        Some(0) => signalled,
        Some(5) => stderr.contains("no live worker"),
        _ => false,
    };
    (!ok).then(|| format!("{bin} {args:?}: {status}, stderr:\n{stderr}"))
}

/// `data` of the ConfigMap the containers take their environment from.
fn configmap_env() -> Vec<(String, String)> {
    let config = &yaml_docs("k8s/configmap.yaml")[0];
    config["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect()
}

/// The settings of the systemd units' environment file, where the installed configuration
/// file is the example (the test machine has no /etc/sessionfleet).
fn systemd_env() -> Vec<(String, String)> {
    let env = std::fs::read_to_string(deploy("systemd/sessionfleet.env.example")).unwrap();
    env.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `args` with the installed configuration file's path replaced by the example's.
fn with_example_config<'a>(args: &[&'a str], example: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|a| if *a == INSTALLED_CONFIG { example } else { *a })
        .collect()
}

const INSTALLED_CONFIG: &str = "/etc/sessionfleet/sessionfleet.toml";

#[test]
fn kubernetes_manifests_match_the_code() {
    let config = &yaml_docs("k8s/configmap.yaml")[0];
    let data = config["data"].as_mapping().unwrap();
    for (k, _) in data {
        let k = k.as_str().unwrap();
        assert!(
            known_env(k) || k == "REDIS_ADDRESS",
            "configmap names unknown variable {k}"
        );
    }
    let secret = &yaml_docs("k8s/secret.example.yaml")[0];
    let secret_keys: Vec<&str> = secret["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    let metrics_port: u16 = data[&serde_yaml::Value::from("SESSIONFLEET_METRICS_ADDR")]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let shutdown: u64 = data[&serde_yaml::Value::from("SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS")]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let http = std::fs::read_to_string(workspace_root().join("worker/src/http.rs")).unwrap();
    let redis = RedisServer::start();
    let env = configmap_env();

    for file in ["k8s/worker.yaml", "k8s/scheduler.yaml"] {
        for doc in yaml_docs(file) {
            if doc["kind"] != "Deployment" {
                continue;
            }
            let spec = &doc["spec"]["template"]["spec"];
            let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
            for c in spec["containers"].as_sequence().unwrap() {
                for e in c["env"].as_sequence().into_iter().flatten() {
                    let name = e["name"].as_str().unwrap();
                    // REDIS_PASSWORD is the KEDA scaler's, read from the worker container.
                    assert!(
                        known_env(name) || name == "REDIS_PASSWORD",
                        "{file}: unknown env {name}"
                    );
                    if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                        assert!(
                            secret_keys.contains(&key),
                            "{file}: secret key {key} not in the secret"
                        );
                    }
                }
                let args: Vec<&str> = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                if file.contains("worker") {
                    assert!(
                        grace > shutdown,
                        "grace {grace}s must exceed the worker's shutdown timeout {shutdown}s"
                    );
                    if let Some(why) = refusal("sessionfleet-worker", &args, &env, &redis) {
                        panic!("{file}: the worker refuses its arguments: {why}");
                    }
                    // The check sees a typo in a value, which `--help` let through.
                    let typo: Vec<String> = args
                        .iter()
                        .map(|a| a.replace("cleanup", "cleanp"))
                        .collect();
                    let typo: Vec<&str> = typo.iter().map(String::as_str).collect();
                    assert_ne!(typo, args, "{file}: the worker names the cleanup queue");
                    let why = refusal("sessionfleet-worker", &typo, &env, &redis)
                        .unwrap_or_else(|| panic!("{file}: {typo:?} accepted"));
                    assert!(
                        why.contains("exit status: 2") && why.contains("unknown queue 'cleanp'"),
                        "{why}"
                    );
                    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
                    assert_eq!(port, u64::from(metrics_port));
                    for probe in ["livenessProbe", "readinessProbe"] {
                        let path = c[probe]["httpGet"]["path"].as_str().unwrap();
                        assert!(
                            http.contains(&format!("\"{path}\"")),
                            "worker serves no {path}"
                        );
                    }
                    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                } else {
                    if let Some(why) = refusal("sessionfleet", &args, &env, &redis) {
                        panic!("{file}: the CLI refuses its arguments: {why}");
                    }
                    // A target nobody configured: refused only once the command runs.
                    let typo = [&["--target", "nosuch"][..], &args].concat();
                    let why = refusal("sessionfleet", &typo, &env, &redis)
                        .unwrap_or_else(|| panic!("{file}: {typo:?} accepted"));
                    assert!(
                        why.contains("exit status: 2") && why.contains("nosuch"),
                        "{why}"
                    );
                }
            }
        }
    }
    let ns = data[&serde_yaml::Value::from("SESSIONFLEET_NAMESPACE")]
        .as_str()
        .unwrap();
    let keys = Keys::new(ns);
    let scaled = &yaml_docs("k8s/keda-scaledobject.yaml")[0];
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        "sessionfleet-worker"
    );
    // The scaler reads the queues with the fleet's Redis password, from the worker's env.
    let worker = std::fs::read_to_string(workspace_root().join("deploy/k8s/worker.yaml")).unwrap();
    for t in scaled["spec"]["triggers"].as_sequence().unwrap() {
        let password = t["metadata"]["passwordFromEnv"]
            .as_str()
            .expect("passwordFromEnv");
        assert!(
            secret_keys.contains(&password),
            "{password} not in the secret"
        );
        assert!(
            worker.contains(&format!("name: {password}")),
            "{password} not in the worker's env"
        );
    }
    let lists: Vec<&str> = scaled["spec"]["triggers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t["metadata"]["listName"].as_str().unwrap())
        .collect();
    for q in [
        QueueClass::Cleanup,
        QueueClass::Analytics,
        QueueClass::Maintenance,
    ] {
        assert!(
            lists.contains(&keys.active(q).as_str()),
            "KEDA does not watch {}",
            keys.active(q)
        );
    }
}

#[test]
fn systemd_units_and_cron_lines_name_real_binaries_and_flags() {
    let default_shutdown: u64 = KEYS
        .iter()
        .find(|k| k.env == "SESSIONFLEET_SHUTDOWN_TIMEOUT_SECS")
        .unwrap()
        .default
        .parse()
        .unwrap();
    let redis = RedisServer::start();
    let example = deploy("sessionfleet.toml.example").display().to_string();
    for (unit, bin) in [
        ("systemd/sessionfleet-worker.service", "sessionfleet-worker"),
        ("systemd/sessionfleet-scheduler.service", "sessionfleet"),
    ] {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{unit}: no {key}"))
        };
        let exec: Vec<&str> = value("ExecStart").split_whitespace().collect();
        assert!(exec[0].ends_with(&format!("/{bin}")), "{unit}: {exec:?}");
        assert!(
            exec.contains(&INSTALLED_CONFIG),
            "{unit}: reads {INSTALLED_CONFIG}: {exec:?}"
        );
        let args = with_example_config(&exec[1..], &example);
        if let Some(why) = refusal(bin, &args, &systemd_env(), &redis) {
            panic!("{unit}: {why}");
        }
        assert!(value("User") == "sessionfleet" && value("Restart") == "always");
        if bin == "sessionfleet-worker" {
            let stop: u64 = value("TimeoutStopSec").parse().unwrap();
            assert!(
                stop > default_shutdown,
                "TimeoutStopSec {stop} must exceed the shutdown timeout {default_shutdown}"
            );
        }
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ] {
            assert!(text.contains(hardening), "{unit}: {hardening}");
        }
        // Where systemd is installed, let it check the unit too.
        if let Ok(out) = Command::new("systemd-analyze")
            .args(["verify", deploy(unit).to_str().unwrap()])
            .output()
        {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !err.contains("Unknown key") && !err.contains("Invalid"),
                "{unit}: {err}"
            );
        }
    }
    let env = std::fs::read_to_string(deploy("systemd/sessionfleet.env.example")).unwrap();
    for line in env
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let name = line.trim_start_matches('#').split('=').next().unwrap();
        assert!(known_env(name), "env file names unknown {name}");
    }
    let cron = std::fs::read_to_string(deploy("cron/sessionfleet.cron")).unwrap();
    let jobs: Vec<&str> = cron
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit() || c == '*'))
        .collect();
    assert_eq!(jobs.len(), 2);
    for line in jobs {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // minute hour dom month dow user command args… >>log 2>&1
        assert_eq!(fields[6], "sessionfleet");
        let args: Vec<&str> = fields[7..]
            .iter()
            .take_while(|a| !a.starts_with(">>"))
            .copied()
            .collect();
        let env = vec![("SESSIONFLEET_CONFIG".to_string(), example.clone())];
        assert!(
            cron.contains(&format!("SESSIONFLEET_CONFIG={INSTALLED_CONFIG}")),
            "the cron lines read {INSTALLED_CONFIG}"
        );
        if let Some(why) = refusal("sessionfleet", &args, &env, &redis) {
            panic!("cron line: {why}");
        }
    }
}

#[test]
fn container_files_build_the_binaries_the_workspace_has() {
    let dockerfile = std::fs::read_to_string(deploy("docker/Dockerfile")).unwrap();
    for needle in [
        "-p sessionfleet-worker",
        "-p sessionfleet-cli",
        // Copied out of the cached target directory, which is not part of the image.
        "cp target/release/sessionfleet target/release/sessionfleet-worker /out/",
        "COPY --from=build /out/sessionfleet-worker ",
        "COPY --from=build /out/sessionfleet ",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle}");
    }
    // The build context leaves out what would only slow it and leak into the cache.
    let ignored = std::fs::read_to_string(workspace_root().join(".dockerignore"))
        .expect(".dockerignore beside the workspace manifest");
    for entry in ["target", ".git"] {
        assert!(
            ignored.lines().any(|l| l.trim_matches('/') == entry),
            ".dockerignore lacks {entry}"
        );
    }
    let compose = &yaml_docs("docker/compose.yaml")[0];
    let services = compose["services"].as_mapping().unwrap();
    for name in ["redis", "postgres", "worker", "scheduler"] {
        assert!(services.contains_key(name), "compose lacks {name}");
    }
    assert_eq!(compose["services"]["worker"]["deploy"]["replicas"], 2);
    assert_eq!(compose["services"]["scheduler"]["command"][0], "schedule");
    let env = compose["x-env"].as_mapping().unwrap();
    for (k, _) in env {
        assert!(
            known_env(k.as_str().unwrap()),
            "compose names unknown {k:?}"
        );
    }
}

#[test]
fn example_configuration_is_accepted() {
    let out = binary("sessionfleet")
        .args([
            "--config",
            deploy("sessionfleet.toml.example").to_str().unwrap(),
            "config",
            "show",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = doc["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"target.app.url") && names.contains(&"target.legacy.url"),
        "{names:?}"
    );
}
