//! `sessionfleet maintenance --status`: cleanup statistics, health, database statistics and
//! the fleet. Each part degrades to an `error` entry on its own, so a down Redis or database
//! gives a clear partial answer, not an error dump.

use serde_json::{Value, json};
use sessionfleet::lease;
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

/// Prints the status.
pub async fn run(inv: &Invocation<'_>) -> anyhow::Result<Exit> {
    let quick = ConnectOptions {
        attempts: 1,
        ..ConnectOptions::default()
    };
    let mut targets = serde_json::Map::new();
    let mut critical = false;
    for target in inv.targets()? {
        let entry = match Db::connect(&target.url, &quick).await {
            Err(e) => json!({ "error": e.to_string() }),
            Ok(db) => {
                let cparams = plan::cleanup_params(inv.settings, target, &CleanupAsk::default())?;
                let hparams = plan::health_params(inv.settings, target)?;
                let stats = section(cleanup::stats(&db, &cparams).await);
                let health = analytics::health_report(&db, &hparams).await;
                if let Ok(h) = &health {
                    critical |= h.health_status.overall_health == analytics::Health::Critical;
                }
                let health = section(health.map(|h| h.health_status));
                let dbstats = section(maintenance::statistics(&db).await);
                db.close().await;
                json!({ "cleanup": stats, "health": health, "database": dbstats })
            }
        };
        targets.insert(target.name.clone(), entry);
    }
    let fleet = fleet_status(inv).await;
    let doc = json!({ "targets": targets, "fleet": fleet });
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

async fn fleet_status(inv: &Invocation<'_>) -> Value {
    let queue = match Queue::connect_with_patience(inv.settings, REDIS_PATIENCE).await {
        Ok(q) => q,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let mut last_runs = serde_json::Map::new();
    for name in inv.settings.targets.keys() {
        last_runs.insert(name.clone(), section(queue.recent_runs(name, 5).await));
    }
    json!({
        "queues": section(queue.queue_depths().await),
        "dead_letters": section(queue.dead_letter_count().await),
        "workers": section(queue.live_workers(None).await),
        "leases": section(lease::holders(&queue.connection(), &inv.settings.namespace.value).await.map(|v| {
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
