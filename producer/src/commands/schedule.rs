//! `sessionfleet schedule` (and `cleanup --daemon`): enqueue cleanup every
//! `SESSION_CLEANUP_INTERVAL`, full maintenance daily, a health report hourly — for every
//! target. Any number of replicas may run: each tick is enqueued exactly once (tick-derived
//! dedupe keys) and a tick missed during downtime is caught up once.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use sessionfleet::config::Target;
use sessionfleet::dispatch::OperationJob;
use sessionfleet::jobs::JobEnvelope;
use sessionfleet::queue::{EnqueueOptions, Queue};
use sessionfleet::schedule::{self, Cadence, Schedule, TickDecision};
use tokio::signal::unix::{SignalKind, signal};

use crate::exit::{CliError, Exit};
use crate::plan::{self, CleanupAsk};
use crate::run::{Invocation, hostname};

/// Longest sleep between passes (also how soon a Redis outage is retried).
const MAX_NAP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum What {
    Cleanup,
    Full,
    Health,
}

fn job(
    inv: &Invocation<'_>,
    what: What,
    target: &Target,
    ask: &CleanupAsk,
) -> anyhow::Result<OperationJob> {
    match what {
        What::Cleanup => plan::cleanup(inv.settings, target, ask),
        What::Full => plan::full(inv.settings, target, false),
        What::Health => plan::health(inv.settings, target),
    }
}

/// The schedule name of a cleanup: `cleanup` for the default one, and one naming its
/// parameters otherwise (`cleanup+force+max_age=24`), so a `cleanup --daemon --force` beside
/// the scheduler keeps its own tick record and dedupe keys instead of sharing the plain
/// cleanup's (whichever enqueued a tick first decided which cleanup ran).
fn cleanup_schedule_name(ask: &CleanupAsk) -> String {
    let mut name = String::from("cleanup");
    if ask.force {
        name.push_str("+force");
    }
    let numbers = [
        ("max_age", ask.max_age_hours.map(u64::from)),
        ("batch_size", ask.batch_size.map(u64::from)),
        ("budget", ask.budget_secs),
    ];
    for (key, value) in numbers {
        if let Some(v) = value {
            name.push_str(&format!("+{key}={v}"));
        }
    }
    name
}

/// Runs the scheduler until SIGTERM or SIGINT: every schedule, or with `cleanup_only` (the
/// `cleanup --daemon` form) only cleanups of that kind. `--target` keeps it to one target,
/// otherwise it schedules every configured one.
pub async fn run(inv: &Invocation<'_>, cleanup_only: Option<&CleanupAsk>) -> anyhow::Result<Exit> {
    let s = inv.settings;
    if inv.global.local || inv.global.no_wait {
        return Err(CliError::usage(
            "the scheduler only enqueues jobs for the fleet's workers: --local and --no-wait do not apply",
        ));
    }
    crate::run::refuse_database_url_for_workers(inv.global)?;
    if cleanup_only.is_some_and(|ask| ask.dry_run) {
        return Err(CliError::usage(
            "--dry-run does not apply to a schedule: run `cleanup --dry-run` once instead",
        ));
    }
    let targets: Vec<&Target> = match &inv.global.target {
        Some(_) => inv.targets()?,
        None => s.targets.values().collect(),
    };
    let target_names = targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let ask = cleanup_only.cloned().unwrap_or_default();
    let cleanup_only = cleanup_only.is_some();
    let parse = |expr: &str| Cadence::parse(expr).map_err(CliError::usage);
    let mut plans = vec![(
        What::Cleanup,
        cleanup_schedule_name(&ask),
        parse(&s.cleanup_schedule())?,
    )];
    if !cleanup_only {
        plans.push((
            What::Full,
            "full_maintenance".to_string(),
            parse(&s.schedules.full_maintenance)?,
        ));
        if s.monitoring_enabled.value {
            plans.push((
                What::Health,
                "health_report".to_string(),
                parse(&s.schedules.health_report)?,
            ));
        }
    }
    let queue = Queue::connect(s)
        .await
        .map_err(|e| CliError::fail(Exit::FleetUnreachable, e.to_string()))?;
    // Each job is planned afresh on every pass (the thresholds file is re-read), but checked
    // once here: a bad configuration stops the start, and a later bad edit keeps the last
    // good plan (with a warning) instead of stopping every schedule.
    let mut last_good: HashMap<(usize, String), OperationJob> = HashMap::new();
    for (i, (what, _, _)) in plans.iter().enumerate() {
        for target in &targets {
            last_good.insert((i, target.name.clone()), job(inv, *what, target, &ask)?);
        }
    }
    let mut conn = queue.connection();
    // Both made once, before the loop: a signal that comes during a pass waits for the next
    // `select!` instead of being lost with a listener made afresh each time.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let who = format!("scheduler@{}-{}", hostname(), std::process::id());
    let names: Vec<&str> = plans.iter().map(|p| p.1.as_str()).collect();
    tracing::info!(schedules = ?names, targets = %target_names, "scheduler started");
    inv.out.info(format!(
        "scheduler started: {} on targets {target_names}",
        names.join(", "),
    ));
    loop {
        // Redis' clock, shared by every replica; this host's only when Redis refuses TIME
        // (said, as replicas may then disagree), and when Redis is down the pass fails and
        // is retried anyway.
        let now = match schedule::server_now(&mut conn).await {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Redis server's clock (TIME); judging ticks by this host's");
                Utc::now()
            }
        };
        let mut all = Vec::new();
        for (i, (what, name, cadence)) in plans.iter().enumerate() {
            for target in &targets {
                let sched = Schedule {
                    name: format!("{name}:{}", target.name),
                    cadence: cadence.clone(),
                    // A cleanup starts at once; maintenance and reports keep to their hour.
                    fire_on_first_sight: matches!(what, What::Cleanup),
                };
                all.push(sched.clone());
                let key = (i, target.name.clone());
                let op = match job(inv, *what, target, &ask) {
                    Ok(op) => {
                        last_good.insert(key, op.clone());
                        op
                    }
                    Err(e) => {
                        tracing::warn!(schedule = %sched.name, error = %e, "configuration no longer valid; keeping the last good plan");
                        match last_good.get(&key) {
                            Some(op) => op.clone(),
                            None => continue,
                        }
                    }
                };
                let q = queue.clone();
                let by = who.clone();
                let tname = target.name.clone();
                let enqueue = |tick: chrono::DateTime<Utc>, key: String| async move {
                    let env =
                        JobEnvelope::new(op.kind(), tname, op.params(), by).with_dedupe_key(key);
                    let r = q.enqueue_with(&env, EnqueueOptions::default()).await;
                    if r.is_ok() {
                        tracing::info!(job_id = %env.job_id, tick = %tick, kind = env.kind.as_str(), "tick enqueued");
                    }
                    r.map(|_| ())
                };
                match schedule::pass(&mut conn, &s.namespace.value, &sched, now, enqueue).await {
                    Ok(TickDecision::Fired(t)) => {
                        inv.out.info(format!("{} tick {t} enqueued", sched.name))
                    }
                    Ok(TickDecision::CaughtUp { tick, missed }) => {
                        tracing::warn!(schedule = %sched.name, tick, missed, "no scheduler ran for a while: caught up the latest tick once, skipped the older ones");
                        inv.out.info(format!(
                            "{} tick {tick} enqueued as a catch-up ({missed} missed ticks skipped)",
                            sched.name
                        ))
                    }
                    Ok(TickDecision::FutureRecordReplaced { tick, recorded }) => {
                        tracing::warn!(schedule = %sched.name, tick, recorded, "the last-fired record was ahead of this clock: a replica's clock runs fast; replaced it and enqueued the current tick");
                        inv.out.info(format!("{} tick {tick} enqueued", sched.name))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(schedule = %sched.name, error = %e, "scheduler pass failed; retrying")
                    }
                }
            }
        }
        let after = schedule::server_now(&mut conn)
            .await
            .unwrap_or_else(|_| Utc::now());
        let nap = schedule::sleep_until_next(&all, after, MAX_NAP);
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    inv.out.info("scheduler stopped");
    Ok(Exit::Success)
}
