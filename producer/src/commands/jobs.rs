//! `sessionfleet jobs …` and `sessionfleet lease`.

use sessionfleet::lease;
use sessionfleet::queue::{Queue, WaitState, WaitingJob};
use sessionfleet::store::{ConnectOptions, Db};

use crate::cli::JobsAction;
use crate::exit::{CliError, Exit};
use crate::output::Output;
use crate::run::{Invocation, REDIS_PATIENCE};

async fn queue(inv: &Invocation<'_>) -> anyhow::Result<Queue> {
    Queue::connect_with_patience(inv.settings, REDIS_PATIENCE)
        .await
        .map_err(|e| CliError::fail(Exit::FleetUnreachable, e.to_string()))
}

/// Jobs and dead letters.
pub async fn run(inv: &Invocation<'_>, action: &JobsAction) -> anyhow::Result<Exit> {
    let q = queue(inv).await?;
    let out = &inv.out;
    match action {
        JobsAction::Dead { limit } => {
            let dead = q.dead_letters(*limit).await?;
            if out.json {
                out.print_json(&dead);
            } else if dead.is_empty() {
                println!("No dead letters.");
            } else {
                for d in &dead {
                    println!(
                        "{}  {}  {}  attempts {}  {}",
                        d.id,
                        d.queue.name(),
                        d.dead_at.format("%Y-%m-%d %H:%M:%S"),
                        d.attempts,
                        d.reason
                    );
                }
            }
        }
        JobsAction::Show { id } => {
            if let Ok(job_id) = id.parse::<uuid::Uuid>()
                && let Some(r) = q.result(job_id).await?
            {
                {
                    if out.json {
                        out.print_json(&r);
                    } else {
                        println!(
                            "job {} (run {}, part {}): {} on {} by {}",
                            r.job_id,
                            r.run_id,
                            r.part + 1,
                            r.outcome.as_str(),
                            r.target,
                            r.worker
                        );
                        println!(
                            "finished {} after {} ms, {} rows, {} attempt(s)",
                            r.finished_at, r.duration_ms, r.rows_affected, r.attempts
                        );
                        if let Some(e) = &r.error {
                            println!("error: {e}");
                        }
                        print!("{}", crate::render::text(r.kind, &r.report));
                    }
                    return Ok(Exit::Success);
                }
            }
            // A run id, or a job running now (its run shows what it has done so far), or one
            // still waiting in its queue.
            if let Ok(uuid) = id.parse::<uuid::Uuid>() {
                let run_id = q.running_job_run(uuid).await?.unwrap_or(uuid);
                if show_run(&q, run_id, out).await? {
                    return Ok(Exit::Success);
                }
                if let Some(w) = q.waiting_job(uuid).await? {
                    show_waiting(&w, out);
                    return Ok(Exit::Success);
                }
            }
            match q.dead_letter(id).await? {
                Some(d) => {
                    if out.json {
                        out.print_json(&d);
                    } else {
                        println!(
                            "dead letter {} from queue {}: {}",
                            d.id,
                            d.queue.name(),
                            d.reason
                        );
                        println!("payload: {}", d.payload);
                    }
                }
                None => {
                    return Err(CliError::fail(
                        Exit::OperationFailed,
                        format!(
                            "no job result, running job, run or dead letter with id {id} (results are kept SESSION_METRICS_RETENTION_DAYS days)"
                        ),
                    ));
                }
            }
        }
        JobsAction::Requeue { id } => {
            let e = q.requeue_dead(id).await?;
            if out.json {
                out.print_json(&serde_json::json!({"requeued": id, "enqueued": e}));
            } else {
                println!(
                    "requeued {id}: job {} waits in the '{}' queue (`sessionfleet jobs show {}`)",
                    e.job_id,
                    e.queue.name(),
                    e.job_id
                );
            }
        }
        JobsAction::Purge { id, all } => {
            let n = q
                .purge_dead(if *all { None } else { id.as_deref() })
                .await?;
            if out.json {
                out.print_json(&serde_json::json!({"purged": n}));
            } else {
                println!("purged {n} dead letter(s)");
            }
        }
    }
    Ok(Exit::Success)
}

/// `sessionfleet lease`: holders per target and the last token each database saw.
pub async fn lease(inv: &Invocation<'_>) -> anyhow::Result<Exit> {
    let q = queue(inv).await?;
    let mut rows = Vec::new();
    for target in inv.settings.targets.values() {
        let db = Db::connect(
            &target.url,
            &ConnectOptions {
                attempts: 1,
                ..ConnectOptions::default()
            },
        )
        .await
        .ok();
        let status = lease::status(
            &q.connection(),
            &inv.settings.namespace.value,
            &target.name,
            db.as_ref(),
        )
        .await;
        if let Some(db) = db {
            db.close().await;
        }
        rows.push((target.name.clone(), status));
    }
    if inv.out.json {
        let doc: Vec<_> = rows
            .iter()
            .map(|(t, s)| match s {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({"target": t, "error": e.to_string()}),
            })
            .collect();
        inv.out.print_json(&doc);
        return Ok(Exit::Success);
    }
    for (t, s) in rows {
        match s {
            Err(e) => println!("{t}: error: {e}"),
            Ok(s) => {
                match &s.holder {
                    Some(h) => println!(
                        "{t}: held by {} (job {}) since {}, token {}, expires in {} ms",
                        h.worker,
                        h.job_id,
                        h.since.map(|x| x.to_string()).unwrap_or_else(|| "?".into()),
                        h.token.map(|x| x.to_string()).unwrap_or_else(|| "?".into()),
                        s.ttl_ms
                            .map(|x| x.to_string())
                            .unwrap_or_else(|| "?".into())
                    ),
                    None => println!("{t}: free"),
                }
                match &s.db_fence {
                    Some(f) => println!(
                        "  database fence: token {} by {}",
                        f.token,
                        f.holder.clone().unwrap_or_default()
                    ),
                    None => {
                        println!("  database fence: no token issued yet (or database unreachable)")
                    }
                }
            }
        }
    }
    Ok(Exit::Success)
}

/// Shows where a job without a result waits (parts counted from 1, as everywhere in text).
fn show_waiting(w: &WaitingJob, out: &Output) {
    if out.json {
        out.print_json(w);
        return;
    }
    let retry = if w.attempt > 1 {
        format!(", attempt {}", w.attempt)
    } else {
        String::new()
    };
    let state = match &w.state {
        WaitState::Ready { position, ready } => {
            format!("ready, {position} of {ready} in line")
        }
        WaitState::Delayed { due_at } => format!("delayed until {due_at}"),
        WaitState::Claimed { worker: Some(w) } => format!("taken by {w}, not started yet"),
        WaitState::Claimed { worker: None } => "taken by a worker, not started yet".to_string(),
    };
    println!(
        "job {} (run {}, part {}): {} on {}, waiting in the '{}' queue: {state}{retry}",
        w.job_id,
        w.run_id,
        w.part + 1,
        w.kind.as_str(),
        w.target,
        w.queue.name()
    );
}

/// Shows run `run_id` if Redis knows it: its finished parts and the part running now with
/// what it has committed so far (parts counted from 1, as the waiting CLI shows them). False
/// when it knows neither.
async fn show_run(q: &Queue, run_id: uuid::Uuid, out: &Output) -> anyhow::Result<bool> {
    let mut parts = q.run_results(run_id).await?;
    parts.sort_by_key(|r| r.part);
    let running = q.progress(run_id).await?;
    if parts.is_empty() && running.is_none() {
        return Ok(false);
    }
    if out.json {
        out.print_json(&serde_json::json!({
            "run_id": run_id,
            "parts": parts,
            "running": running,
        }));
        return Ok(true);
    }
    println!("run {run_id}");
    for r in &parts {
        println!(
            "  part {}: {} on {} by {}, {} rows (job {})",
            r.part + 1,
            r.outcome.as_str(),
            r.target,
            r.worker,
            r.rows_affected,
            r.job_id
        );
    }
    match &running {
        Some(p) => println!(
            "  part {}: running on {} since {}: {} rows in {} batches so far (job {})",
            p.part + 1,
            p.worker,
            p.started_at,
            p.done.rows,
            p.done.batches,
            p.job_id
        ),
        None => println!("  no part running now"),
    }
    Ok(true)
}
