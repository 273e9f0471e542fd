//! Running an operation the way the user asked: enqueue and wait (default), enqueue only
//! (`--no-wait`), or in this process (`--local`, and automatically when Redis is down).

use std::time::{Duration, Instant};

use sessionfleet::CancellationToken;
use sessionfleet::config::{Settings, Target};
use sessionfleet::dispatch::{self, OperationEnv, OperationJob};
use sessionfleet::jobs::{JobEnvelope, JobKind};
use sessionfleet::ops::Progress;
use sessionfleet::ops::cleanup::CleanupReport;
use sessionfleet::queue::results::RunCursor;
use sessionfleet::queue::{EnqueueOptions, JobResult, Queue, ResultOutcome};
use sessionfleet::runner::JobOutcome;

use crate::cli::GlobalArgs;
use crate::exit::{CliError, Exit};
use crate::output::Output;
use crate::progress::{Running, Spinner};

/// How long a waiting command looks for a live worker before saying there is none.
pub const WORKER_PROBE: Duration = Duration::from_secs(2);
/// How long the CLI tries to reach Redis before falling back to local mode.
pub const REDIS_PATIENCE: Duration = Duration::from_secs(2);
/// The longest `--timeout` honoured (a year); larger values mean the same.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Poll interval while waiting for results.
const RESULT_POLL: Duration = Duration::from_millis(100);

/// One finished run, per target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finished {
    /// Target name.
    pub target: String,
    /// Job kind.
    pub kind: JobKind,
    /// Run id (all parts).
    pub run_id: String,
    /// Parts the run took.
    pub parts: u32,
    /// The report of the parts that finished (cleanup parts merged); `null` when none did.
    pub report: serde_json::Value,
    /// The error of a failed run.
    pub error: Option<String>,
    /// The run was cut short by `--timeout` (then `error` says where it stood): exit code 4.
    pub timed_out: bool,
    /// Where it ran: `fleet` or `local`.
    pub ran: &'static str,
}

/// The invocation's surroundings.
pub struct Invocation<'a> {
    /// Configuration.
    pub settings: &'a Settings,
    /// Global flags.
    pub global: &'a GlobalArgs,
    /// Output mode.
    pub out: Output,
}

impl Invocation<'_> {
    /// The targets this invocation addresses.
    pub fn targets(&self) -> anyhow::Result<Vec<&Target>> {
        if self.global.all_targets {
            return Ok(self.settings.targets.values().collect());
        }
        Ok(vec![self.settings.target(self.global.target.as_deref())?])
    }

    fn who(&self) -> String {
        format!("cli@{}", hostname())
    }

    /// `--timeout`, capped at [`MAX_TIMEOUT`] so that a deadline can always be computed.
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.global.timeout).min(MAX_TIMEOUT)
    }
}

/// Host name for `enqueued_by` and lease holders.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Refuses `--database-url` where a worker would run the job. A job carries its target's
/// name, and the worker connects to the database its own configuration names for it: the
/// flag would be ignored, and the command would work on another database than the one named.
pub fn refuse_database_url_for_workers(global: &GlobalArgs) -> anyhow::Result<()> {
    if global.database_url.is_some() && !global.local {
        return Err(CliError::usage(
            "--database-url applies only with --local: a worker runs the job on the database its own configuration names for the target; add --local to work on this URL here, or configure it on the workers and pick it with --target",
        ));
    }
    Ok(())
}

/// Builds one job per target with `build` and runs them as the flags say. Returns `None`
/// for `--no-wait` (ids already printed).
pub async fn run(
    inv: &Invocation<'_>,
    build: impl Fn(&Target) -> anyhow::Result<OperationJob>,
) -> anyhow::Result<Option<Vec<Finished>>> {
    refuse_database_url_for_workers(inv.global)?;
    let mut envs = Vec::new();
    for target in inv.targets()? {
        let job = build(target)?;
        envs.push(JobEnvelope::new(
            job.kind(),
            target.name.clone(),
            job.params(),
            inv.who(),
        ));
    }
    if inv.global.local {
        let redis = Queue::connect_with_patience(inv.settings, REDIS_PATIENCE)
            .await
            .ok();
        if redis.is_none() {
            inv.out.warn(
                "Redis unreachable: running locally, kept single-writer by the database fence alone",
            );
        }
        return Ok(Some(run_locally(inv, envs, redis).await?));
    }
    let queue = match Queue::connect_with_patience(inv.settings, REDIS_PATIENCE).await {
        Ok(q) => q,
        Err(e) if inv.global.no_wait => {
            return Err(CliError::fail(Exit::FleetUnreachable, e.to_string()));
        }
        Err(e) => {
            inv.out.warn(format!(
                "{e}; running locally instead, kept single-writer by the database fence alone"
            ));
            return Ok(Some(run_locally(inv, envs, None).await?));
        }
    };
    let class = envs[0].queue();
    if !inv.global.no_wait {
        ensure_worker(&queue, class, &inv.out).await?;
    }
    let enqueued = queue
        .enqueue_batch(envs.clone(), EnqueueOptions::default())
        .await?;
    if inv.global.no_wait {
        let ids: Vec<_> = envs
            .iter()
            .zip(&enqueued)
            .map(|(e, q)| serde_json::json!({"job_id": e.job_id, "run_id": e.run_id, "target": e.target, "kind": e.kind, "queue": class.name(), "task_id": q.task_id, "accepted": q.accepted}))
            .collect();
        if inv.out.json {
            inv.out.print_json(&ids);
        } else {
            for e in &envs {
                println!("{}", e.job_id);
            }
        }
        return Ok(None);
    }
    // One deadline for the whole invocation: a run that times out is reported with its job
    // id (it keeps running), and so is every run after it, rather than lost with an error.
    let deadline = Instant::now() + inv.timeout();
    let mut finished = Vec::new();
    for env in &envs {
        finished.push(wait_for_run(&queue, env, inv, deadline).await?);
    }
    Ok(Some(finished))
}

/// Fails with exit code 5 when no live worker consumes `class` within [`WORKER_PROBE`].
async fn ensure_worker(
    queue: &Queue,
    class: sessionfleet::jobs::QueueClass,
    out: &Output,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let live = queue.live_workers(Some(class)).await?;
        if live.iter().any(|w| !w.stopping) {
            return Ok(());
        }
        if started.elapsed() >= WORKER_PROBE {
            return Err(CliError::fail(
                Exit::FleetUnreachable,
                format!(
                    "no live worker consumes the '{}' queue: start one with `sessionfleet-worker` (same REDIS_URL and namespace), or run this command with --local",
                    class.name()
                ),
            ));
        }
        out.info(format!(
            "waiting for a worker on the '{}' queue…",
            class.name()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_for_run(
    queue: &Queue,
    env: &JobEnvelope,
    inv: &Invocation<'_>,
    deadline: Instant,
) -> anyhow::Result<Finished> {
    let progress = Spinner::new(&inv.out, env);
    // Parts already read stay decoded here: a poll reads only the parts recorded since.
    let mut cursor = RunCursor::default();
    let mut parts: Vec<JobResult> = Vec::new();
    loop {
        let new = queue.new_run_results(env.run_id, &mut cursor).await?;
        if !new.is_empty() {
            parts.extend(new);
            parts.sort_by_key(|r| r.part);
        }
        // Shown, never relied on: a failed read leaves the display as it was.
        let live = queue.progress(env.run_id).await.ok().flatten();
        progress.update(
            parts.len(),
            parts.iter().map(|p| p.rows_affected).sum(),
            live.as_ref().map(|l| Running {
                part: l.part,
                worker: &l.worker,
                done: l.done,
            }),
        );
        let finished = |error: Option<String>, timed_out: bool| Finished {
            target: env.target.clone(),
            kind: env.kind,
            run_id: env.run_id.to_string(),
            parts: parts.len() as u32,
            report: merge_parts(env.kind, &parts),
            error,
            timed_out,
            ran: "fleet",
        };
        if let Some(last) = parts.iter().find(|r| r.outcome != ResultOutcome::Continued) {
            progress.finish();
            let error = (last.outcome == ResultOutcome::Failed)
                .then(|| last.error.clone().unwrap_or_else(|| "failed".into()));
            return Ok(finished(error, false));
        }
        if Instant::now() >= deadline {
            progress.finish();
            return Ok(finished(
                Some(format!(
                    "timed out after {}s waiting for job {} (run {}); it keeps running — `sessionfleet jobs show {}` shows where it stands",
                    inv.global.timeout, env.job_id, env.run_id, env.run_id
                )),
                true,
            ));
        }
        tokio::time::sleep(RESULT_POLL).await;
    }
}

/// Cleanup parts are merged into one report; other kinds carry their whole report in the
/// last part.
fn merge_parts(kind: JobKind, parts: &[JobResult]) -> serde_json::Value {
    let reports: Vec<&serde_json::Value> = parts
        .iter()
        .map(|p| &p.report)
        .filter(|r| !r.is_null())
        .collect();
    merge_reports(kind, &reports)
}

fn merge_reports(kind: JobKind, reports: &[&serde_json::Value]) -> serde_json::Value {
    if kind == JobKind::Cleanup {
        let mut merged: Option<CleanupReport> = None;
        for r in reports {
            if let Ok(part) = serde_json::from_value::<CleanupReport>((*r).clone()) {
                match &mut merged {
                    Some(m) => m.merge(&part),
                    None => merged = Some(part),
                }
            }
        }
        if let Some(m) = merged {
            return serde_json::to_value(m).unwrap_or_default();
        }
    }
    reports
        .last()
        .map(|r| (*r).clone())
        .unwrap_or(serde_json::Value::Null)
}

/// Runs the jobs in this process, one after the other, continuing and waiting out a busy
/// lease until done, Ctrl-C or `--timeout`. Both stop the operation at its next safe point
/// (a cleanup: the next batch boundary) with what it did so far committed and reported; the
/// runs not started by then are reported as such.
async fn run_locally(
    inv: &Invocation<'_>,
    envs: Vec<JobEnvelope>,
    queue: Option<Queue>,
) -> anyhow::Result<Vec<Finished>> {
    let shutdown = CancellationToken::new();
    let ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let deadline = Instant::now() + inv.timeout();
    let timed_out = CancellationToken::new();
    let timer = tokio::spawn({
        let (shutdown, timed_out) = (shutdown.clone(), timed_out.clone());
        async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {
                    timed_out.cancel();
                    shutdown.cancel();
                }
                // Ctrl-C came first: what follows is its stop, not a timeout.
                () = shutdown.cancelled() => {}
            }
        }
    });
    let holder = format!("{}-local-{}", inv.who(), std::process::id());
    let mut oe = OperationEnv {
        settings: inv.settings,
        redis: queue.as_ref().map(Queue::connection),
        queue: queue.as_ref(),
        holder: &holder,
        shutdown: &shutdown,
        progress: None,
    };
    let secs = inv.global.timeout;
    // Why the operation stopped early, once it has: Ctrl-C or the deadline.
    let stopped = || {
        if timed_out.is_cancelled() {
            format!("timed out after {secs}s")
        } else {
            "interrupted".to_string()
        }
    };
    let mut finished = Vec::new();
    for first in envs {
        if shutdown.is_cancelled() {
            finished.push(Finished {
                target: first.target.clone(),
                kind: first.kind,
                run_id: first.run_id.to_string(),
                parts: 0,
                report: serde_json::Value::Null,
                error: Some(format!("not started: {}", stopped())),
                timed_out: timed_out.is_cancelled(),
                ran: "local",
            });
            continue;
        }
        let mut env = first.clone();
        let mut reports = Vec::new();
        let mut error = None;
        let spinner = Spinner::new(&inv.out, &first);
        let mut rows_done = 0;
        loop {
            let progress = Progress::default();
            oe.progress = Some(progress.clone());
            let outcome =
                run_showing_progress(&env, &oe, &progress, &spinner, reports.len(), rows_done)
                    .await;
            if let JobOutcome::Continue { rows_affected, .. } = &outcome {
                rows_done += rows_affected;
            }
            match outcome {
                JobOutcome::Done { report, .. } => {
                    reports.push(report);
                    break;
                }
                JobOutcome::Continue {
                    report,
                    rows_affected,
                    next,
                    delay,
                } => {
                    reports.push(report);
                    let part = env.part + 1;
                    if shutdown.is_cancelled() {
                        spinner.info(
                            &inv.out,
                            format!(
                                "{}: part {part} stopped after {rows_affected} rows: {}",
                                env.target,
                                stopped()
                            ),
                        );
                        error = Some(format!("{}; run the command again to finish", stopped()));
                        break;
                    }
                    match delay {
                        // Fenced out (another holder works on the database now) or stopped by
                        // an error: the next part waits a little. The part's report says which.
                        Some(delay) => {
                            let why = "stopped early by a newer lease holder or an error";
                            if Instant::now() + delay >= deadline {
                                timed_out.cancel();
                                shutdown.cancel();
                                error = Some(format!(
                                    "part {part} {why} after {rows_affected} rows; timed out after {secs}s before continuing; run the command again to finish"
                                ));
                                break;
                            }
                            spinner.info(&inv.out, format!(
                                "{}: part {part} {why} after {rows_affected} rows; continuing in {:.1}s",
                                env.target,
                                delay.as_secs_f64()
                            ));
                            if !pause(delay, &shutdown).await {
                                error =
                                    Some(format!("{}; run the command again to finish", stopped()));
                                break;
                            }
                        }
                        None => spinner.info(
                            &inv.out,
                            format!(
                                "{}: part {part} done ({rows_affected} rows), continuing",
                                env.target
                            ),
                        ),
                    }
                    env = next;
                }
                JobOutcome::Deferred { delay, reason } => {
                    if shutdown.is_cancelled() || Instant::now() + delay >= deadline {
                        if !shutdown.is_cancelled() {
                            timed_out.cancel();
                            shutdown.cancel();
                        }
                        error = Some(format!("{}: {reason}", stopped()));
                        break;
                    }
                    spinner.info(
                        &inv.out,
                        format!("{reason}; retrying in {:.1}s", delay.as_secs_f64()),
                    );
                    if !pause(delay, &shutdown).await {
                        error = Some(format!("{}: {reason}", stopped()));
                        break;
                    }
                }
                JobOutcome::Failed { error: e, .. } => {
                    error = Some(e);
                    break;
                }
            }
        }
        spinner.finish();
        let refs: Vec<&serde_json::Value> = reports.iter().collect();
        finished.push(Finished {
            target: first.target.clone(),
            kind: first.kind,
            run_id: first.run_id.to_string(),
            parts: reports.len() as u32,
            report: merge_reports(first.kind, &refs),
            timed_out: error.is_some() && timed_out.is_cancelled(),
            error,
            ran: "local",
        });
    }
    timer.abort();
    Ok(finished)
}

/// Runs one part in this process, showing what it has committed as it goes.
async fn run_showing_progress(
    env: &JobEnvelope,
    oe: &OperationEnv<'_>,
    progress: &Progress,
    spinner: &Spinner,
    parts_done: usize,
    rows_done: u64,
) -> JobOutcome {
    let mut updates = progress.subscribe();
    let run = dispatch::run_operation(env, oe);
    tokio::pin!(run);
    loop {
        tokio::select! {
            outcome = &mut run => return outcome,
            // `oe` keeps a sender, so this only ends with a new snapshot.
            Ok(()) = updates.changed() => {
                let done = *updates.borrow_and_update();
                spinner.update(parts_done, rows_done, Some(Running { part: env.part, worker: oe.holder, done }));
            }
        }
    }
}

/// Sleeps for `delay`; false when `shutdown` comes first.
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}
