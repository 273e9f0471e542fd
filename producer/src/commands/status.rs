//! `sessionfleet maintenance --status`: cleanup statistics, health, database statistics and
//! the fleet. Each part degrades to an `error` entry on its own, so a down Redis or database
//! gives a clear partial answer, not an error dump.

use serde_json::{Value, json};
use sessionfleet::config::Target;
use sessionfleet::dispatch::OperationJob;
use sessionfleet::lease;
use sessionfleet::ops::analytics::AnalyticsParams;
use sessionfleet::ops::{analytics, cleanup, maintenance};
use sessionfleet::queue::Queue;
use sessionfleet::store::{ConnectOptions, Db};

use crate::exit::Exit;
use crate::plan::{self, CleanupAsk};
use crate::run::{Invocation, REDIS_PATIENCE};

fn section<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Value {
    match r {
        Ok(v) => serde_json::to_value(v).unwrap_or(Value::Null),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Prints the status. Targets, the parts of each target and the fleet are gathered
/// concurrently: the answer takes as long as the slowest part, not the sum of all. Redis is
/// connected to once, by whichever part asks first; the others wait for that same attempt.
pub async fn run(inv: &Invocation<'_>) -> anyhow::Result<Exit> {
    let targets = inv.targets()?;
    let mut prepared = Vec::with_capacity(targets.len());
    for target in targets {
        let cparams = plan::cleanup_params(inv.settings, target, &CleanupAsk::default())?;
        let hparams = plan::health_params(inv.settings, target)?;
        prepared.push((target, cparams, hparams));
    }
    let queue = RedisOnce::default();
    let per_target =
        futures::future::join_all(prepared.iter().map(|(target, cparams, hparams)| {
            target_status(inv, &queue, target, cparams, hparams)
        }));
    let (entries, fleet) = tokio::join!(per_target, fleet_status(inv, &queue));
    let mut doc_targets = serde_json::Map::new();
    let mut critical = false;
    for ((target, _, _), (entry, is_critical)) in prepared.iter().zip(entries) {
        critical |= is_critical;
        doc_targets.insert(target.name.clone(), entry);
    }
    let doc = json!({ "targets": doc_targets, "fleet": fleet });
    if inv.out.json {
        inv.out.print_json(&doc);
    } else {
        print_text(&doc);
    }
    Ok(if critical {
        Exit::HealthCritical
    } else {
        Exit::Success
    })
}

/// The fleet's Redis, connected to once for the whole status.
#[derive(Default)]
struct RedisOnce(tokio::sync::OnceCell<Result<Queue, String>>);

impl RedisOnce {
    async fn get(&self, inv: &Invocation<'_>) -> &Result<Queue, String> {
        self.0
            .get_or_init(|| async {
                Queue::connect_with_patience(inv.settings, REDIS_PATIENCE)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
    }
}

/// One target's cleanup statistics, health and database statistics, and whether its health
/// is critical. A database that cannot be reached becomes an `error` entry. The health
/// report gets what a worker's gets from the fleet (its failure rate, its latest integrity
/// check, the recommended indexes the database lacks), so both raise the same alerts; the
/// statistics do not wait for Redis.
async fn target_status(
    inv: &Invocation<'_>,
    redis: &RedisOnce,
    target: &Target,
    cparams: &cleanup::CleanupParams,
    hparams: &analytics::HealthParams,
) -> (Value, bool) {
    let quick = ConnectOptions {
        attempts: 1,
        ..ConnectOptions::default()
    };
    let db = match Db::connect(&target.url, &quick).await {
        Ok(db) => db,
        Err(e) => return (json!({ "error": e.to_string() }), false),
    };
    let health = async {
        let queue = redis.get(inv).await.as_ref().ok();
        let job = OperationJob::Analytics(AnalyticsParams::HealthReport(hparams.clone()))
            .with_fleet_knowledge(&db, queue, &target.name)
            .await;
        let OperationJob::Analytics(AnalyticsParams::HealthReport(enriched)) = job else {
            unreachable!("with_fleet_knowledge keeps the job's kind")
        };
        analytics::health_report(&db, &enriched).await
    };
    let (stats, health, dbstats) = tokio::join!(
        cleanup::stats(&db, cparams),
        health,
        maintenance::statistics(&db)
    );
    db.close().await;
    let critical =
        matches!(&health, Ok(h) if h.health_status.overall_health == analytics::Health::Critical);
    let entry = json!({
        "cleanup": section(stats),
        "health": section(health.map(|h| h.health_status)),
        "database": section(dbstats),
    });
    (entry, critical)
}

async fn fleet_status(inv: &Invocation<'_>, redis: &RedisOnce) -> Value {
    let queue = match redis.get(inv).await {
        Ok(q) => q,
        Err(e) => return json!({ "error": e }),
    };
    let names: Vec<&String> = inv.settings.targets.keys().collect();
    let redis = queue.connection();
    let (runs, depths, dead, workers, leases) = tokio::join!(
        futures::future::join_all(names.iter().map(|name| queue.recent_runs(name, 5))),
        queue.queue_depths(),
        queue.dead_letter_count(),
        queue.live_workers(None),
        lease::holders_among(&redis, &inv.settings.namespace.value, &names),
    );
    let last_runs: serde_json::Map<String, Value> = names
        .into_iter()
        .zip(runs)
        .map(|(name, r)| (name.clone(), section(r)))
        .collect();
    json!({
        "queues": section(depths),
        "dead_letters": section(dead),
        "workers": section(workers),
        "leases": section(leases.map(|v| {
            v.into_iter().map(|(t, h)| json!({"target": t, "holder": h})).collect::<Vec<_>>()
        })),
        "last_runs": last_runs,
    })
}

fn print_text(doc: &Value) {
    println!("Session System Status");
    println!("{}", "=".repeat(30));
    if let Some(targets) = doc["targets"].as_object() {
        for (name, t) in targets {
            println!("\nTarget: {name}");
            if let Some(e) = t["error"].as_str() {
                println!("  Error: {e}");
                continue;
            }
            let get = |p: &str| {
                t.pointer(p)
                    .map(|v| v.to_string().trim_matches('"').to_string())
                    .unwrap_or_else(|| "unavailable".into())
            };
            println!("  Overall Health: {}", get("/health/overall_health"));
            println!("  Total Sessions: {}", get("/cleanup/total_sessions"));
            println!("  Recent (24h): {}", get("/cleanup/recent_sessions_24h"));
            println!(
                "  Expired: {}  Orphaned: {}",
                get("/cleanup/expired_sessions"),
                get("/cleanup/orphaned_sessions")
            );
            println!("  Database Size: {} MB", get("/database/database_size_mb"));
            if let Some(issues) = t
                .pointer("/health/issues")
                .and_then(Value::as_array)
                .filter(|i| !i.is_empty())
            {
                println!("  Issues:");
                for i in issues {
                    println!("    - {}", i.as_str().unwrap_or_default());
                }
            }
        }
    }
    let fleet = &doc["fleet"];
    println!("\nFleet:");
    if let Some(e) = fleet["error"].as_str() {
        println!("  unavailable: {e}");
        return;
    }
    if let Some(qs) = fleet["queues"].as_array() {
        for q in qs {
            println!(
                "  queue {}: ready {}, running {}, scheduled {}",
                q["queue"].as_str().unwrap_or("?"),
                q["ready"],
                q["running"],
                q["scheduled"]
            );
        }
    }
    println!("  dead letters: {}", fleet["dead_letters"]);
    let workers = fleet["workers"].as_array().map_or(0, Vec::len);
    println!("  live workers: {workers}");
    if let Some(ls) = fleet["leases"].as_array() {
        for l in ls {
            println!(
                "  lease {}: {} (token {})",
                l["target"].as_str().unwrap_or("?"),
                l["holder"]["worker"].as_str().unwrap_or("?"),
                l["holder"]["token"]
            );
        }
    }
    if let Some(runs) = fleet["last_runs"].as_object() {
        for (t, rs) in runs {
            for r in rs.as_array().into_iter().flatten().take(3) {
                println!(
                    "  last run on {t}: {} {} at {} ({} rows)",
                    r["kind"].as_str().unwrap_or("?"),
                    r["outcome"].as_str().unwrap_or("?"),
                    r["finished_at"].as_str().unwrap_or("?"),
                    r["rows_affected"]
                );
            }
        }
    }
}
