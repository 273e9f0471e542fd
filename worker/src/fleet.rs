//! The worker process: one supervised apalis worker per configured queue, plus the loops that
//! keep the fleet healthy (registry heartbeat, wake-ups, due-job promotion, janitor, gauges).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use apalis::prelude::*;
use apalis_redis::RedisStorage;
use chrono::Utc;
use sessionfleet::CancellationToken;
use sessionfleet::config::Settings;
use sessionfleet::jobs::QueueClass;
use sessionfleet::queue::janitor::JANITOR_INTERVAL;
use sessionfleet::queue::settle::process_delivery;
use sessionfleet::queue::workers::REGISTRY_BEAT;
use sessionfleet::queue::{Queue, WorkerInfo};
use sessionfleet::runner::RunnerDeps;
use tokio::time::Instant;

use crate::signals::StopSignals;
use crate::wake::Wakers;

/// How long the worker waits for Redis at start before giving up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How often queue-depth gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// First delay before restarting a failed apalis worker; doubles up to the max.
const RESTART_BASE: Duration = Duration::from_millis(100);
/// Longest delay before restarting a failed apalis worker.
const RESTART_MAX: Duration = Duration::from_secs(5);
/// Histogram buckets of `sessionfleet_job_duration_seconds`, in seconds. Jobs last from about
/// 10 ms (a no-op, a small cleanup part) to an hour (full maintenance of a large table), so
/// the bounds step about ×2–3 across that span. Without buckets the exporter renders the
/// metric as a summary, which `histogram_quantile` cannot read nor the fleet aggregate.
const JOB_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Shared facts about the process, for the registry, `/readyz` and shutdown.
#[derive(Default)]
pub struct FleetState {
    stopping: AtomicBool,
    running_jobs: AtomicU64,
    restarts: AtomicU64,
    /// The queues this process consumes, in `--queues` order.
    queues: Vec<QueueClass>,
    /// Each queue's apalis worker context (one per queue, kept across its restarts).
    workers: std::sync::Mutex<Vec<(QueueClass, WorkerContext)>>,
    /// Queues whose current apalis worker has registered with Redis; a queue leaves this set
    /// when its worker fails and rejoins once the restarted worker has registered again.
    registered: std::sync::Mutex<HashSet<QueueClass>>,
    /// The name of each queue's current apalis worker (the latest start or restart).
    apalis_names: std::sync::Mutex<HashMap<QueueClass, String>>,
    /// Woken when `running_jobs` drops to zero. apalis waits at shutdown only for the handlers
    /// it still has; a job whose apalis worker failed under it runs on without one, and
    /// [`wait_for_jobs`] waits for it here.
    jobs_done: tokio::sync::Notify,
    /// When the shutdown timeout ends: the first stop signal plus the timeout.
    stop_deadline: OnceLock<Instant>,
}

impl FleetState {
    /// True once a stop signal arrived.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The queues this process consumes.
    pub fn queues(&self) -> &[QueueClass] {
        &self.queues
    }

    /// The configured queues whose apalis worker is not taking jobs now: not yet started, failed
    /// and restarting (backing off, waiting for Redis, registering), or stopped.
    pub fn queues_not_running(&self) -> Vec<QueueClass> {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        self.queues
            .iter()
            .copied()
            .filter(|q| {
                let running = workers.iter().any(|(wq, ctx)| wq == q && ctx.is_running());
                !(running && registered.contains(q))
            })
            .collect()
    }

    /// Marks whether `q`'s current apalis worker has registered with Redis.
    fn set_registered(&self, q: QueueClass, yes: bool) {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        if yes {
            registered.insert(q);
        } else {
            registered.remove(&q);
        }
    }

    fn apalis_names(&self) -> Vec<(QueueClass, String)> {
        self.apalis_names
            .lock()
            .map(|m| m.iter().map(|(q, n)| (*q, n.clone())).collect())
            .unwrap_or_default()
    }
}

/// A payload exactly as stored: decoding happens in our handler, so a malformed job becomes a
/// dead letter instead of a decode error that kills the apalis worker.
#[derive(Debug, Clone)]
pub struct RawJob(pub Vec<u8>);

/// The codec that hands payload bytes through untouched.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

impl Codec<RawJob> for RawCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &RawJob) -> Result<Vec<u8>, Infallible> {
        Ok(val.0.clone())
    }

    fn decode(&self, val: &Vec<u8>) -> Result<RawJob, Infallible> {
        Ok(RawJob(val.clone()))
    }
}

/// One job counted in [`FleetState::running_jobs`] for as long as it lives (it lives in the
/// job's task, see [`spawn_job`]); the last one to end wakes [`FleetState::jobs_done`].
struct RunningJob(Arc<FleetState>);

impl RunningJob {
    fn start(state: &Arc<FleetState>) -> RunningJob {
        state.running_jobs.fetch_add(1, Ordering::Relaxed);
        RunningJob(Arc::clone(state))
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if self.0.running_jobs.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.jobs_done.notify_waiters();
        }
    }
}

/// What the handler of one queue needs.
struct QueueHandler {
    deps: RunnerDeps,
    queue: QueueClass,
    state: Arc<FleetState>,
}

async fn handle(
    job: RawJob,
    task_id: TaskId,
    h: Data<Arc<QueueHandler>>,
) -> Result<(), BoxDynError> {
    let h = Arc::clone(&h);
    let task_id = task_id.to_string();
    // Run the job on its own task: it uses both cores, and if this apalis worker dies on a
    // Redis error the job still finishes and records its result (the redelivery then sees
    // the result and is skipped) instead of being dropped half-way.
    let job_h = Arc::clone(&h);
    // (settle counts the delivery's start and end: a job whose workers keep dying while
    // running it is buried there, not run again.)
    let joined = spawn_job(&h.state, async move {
        process_delivery(&job_h.deps, job_h.queue, &task_id, &job.0).await
    })
    .await;
    match joined {
        Ok(Ok(_settled)) => Ok(()),
        // Could not record the outcome (Redis trouble): let apalis reschedule the delivery.
        Ok(Err(e)) => Err(e.into()),
        // A bug: do not retry it 25 times; apalis dead-sets it and the janitor turns it into
        // one of our dead letters with this reason.
        Err(e) => Err(AbortError::new(format!("job panicked: {e}")).into()),
    }
}

/// Runs `job` on a task of its own, counted in [`FleetState::running_jobs`] until the job
/// itself ends: apalis drops the handler awaiting it when its worker fails on a Redis error,
/// and the job runs on regardless.
fn spawn_job<F>(state: &Arc<FleetState>, job: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let running = RunningJob::start(state);
    tokio::spawn(async move {
        let _running = running;
        job.await
    })
}

/// Waits for every job of [`spawn_job`] to end, until `deadline`; after it, the number still
/// running. Called once the queue workers have stopped, so no job starts meanwhile; those left
/// are jobs whose apalis worker failed while they ran (they have been told to stop, through
/// the shutdown token, with the rest).
async fn wait_for_jobs(state: &FleetState, deadline: Instant) -> Result<(), u64> {
    let running = || state.running_jobs.load(Ordering::Acquire);
    if running() == 0 {
        return Ok(());
    }
    tracing::info!(
        jobs = running(),
        "waiting for jobs that lost their queue worker while running"
    );
    let all_ended = async {
        loop {
            // Registered before the check, so the last job's wake-up cannot slip in between.
            let ended = state.jobs_done.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if running() == 0 {
                return;
            }
            ended.await;
        }
    };
    tokio::time::timeout_at(deadline, all_ended)
        .await
        .map_err(|_| running())
}

/// Runs the worker process until a stop signal.
pub async fn run(settings: Settings, queues: Vec<QueueClass>) -> anyhow::Result<()> {
    let mut signals = StopSignals::register().context("cannot install signal handlers")?;
    let settings = Arc::new(settings);
    let queue = Queue::connect_with_patience(&settings, STARTUP_PATIENCE).await?;
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    let pid = std::process::id();
    // Host and pid alone repeat (containers are often pid 1); the random part makes every
    // start unique so apalis never refuses a restart as "still active".
    let process_name = format!(
        "{host}-{pid}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let shutdown = CancellationToken::new();
    let deps = RunnerDeps {
        settings: settings.clone(),
        queue: queue.clone(),
        worker_name: process_name.clone(),
        shutdown: shutdown.clone(),
    };
    let state = Arc::new(FleetState {
        queues: queues.clone(),
        ..FleetState::default()
    });
    let concurrency = settings.worker_concurrency.value as usize;
    let poll = Duration::from_millis(settings.poll_interval_ms.value);
    let stop_timeout = Duration::from_secs(settings.shutdown_timeout_secs.value);
    tracing::info!(
        worker = %process_name,
        redis = %queue.redacted_url(),
        namespace = queue.keys().namespace(),
        queues = %queues.iter().map(|q| q.name()).collect::<Vec<_>>().join(","),
        concurrency,
        poll_ms = poll.as_millis() as u64,
        "worker starting"
    );

    if let Some(addr) = &settings.metrics_addr.value {
        let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "sessionfleet_job_duration_seconds".into(),
                ),
                JOB_DURATION_BUCKETS,
            )
            .context("cannot configure the job duration histogram")?
            .install_recorder()
            .context("cannot install the metrics recorder")?;
        crate::http::serve(addr, prom.clone(), queue.clone(), state.clone())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(gauges(queue.clone(), prom, shutdown.clone()));
    }

    let wakers = Wakers::default();
    let background = CancellationToken::new();
    tokio::spawn(crate::wake::listen(
        queue.clone(),
        queues.clone(),
        wakers.clone(),
        background.clone(),
    ));
    tokio::spawn(promote_loop(
        queue.clone(),
        queues.clone(),
        process_name.clone(),
        poll,
        background.clone(),
    ));
    tokio::spawn(janitor_loop(
        queue.clone(),
        process_name.clone(),
        background.clone(),
    ));
    let info = WorkerInfo {
        name: process_name.clone(),
        host,
        pid,
        queues: queues.clone(),
        concurrency: concurrency as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: Utc::now(),
        last_seen: Utc::now(),
        restarts: 0,
        running: 0,
        stopping: false,
    };
    tokio::spawn(registry_loop(
        queue.clone(),
        info,
        state.clone(),
        background.clone(),
    ));

    let mut monitor = Monitor::new();
    for q in queues.iter().copied() {
        let handler = Arc::new(QueueHandler {
            deps: deps.clone(),
            queue: q,
            state: state.clone(),
        });
        let (queue, wakers, name) = (queue.clone(), wakers.clone(), process_name.clone());
        let names = state.clone();
        monitor = monitor.register(move |restarts| {
            let apalis_name = format!("{name}-{}-r{restarts}", q.name());
            if let Ok(mut m) = names.apalis_names.lock() {
                m.insert(q, apalis_name.clone());
            }
            // A (re)start: not ready for /readyz until registered with Redis.
            names.set_registered(q, false);
            let registered = names.clone();
            let storage =
                RedisStorage::<RawJob>::new(queue.connection()).with_config(queue.apalis_config(q));
            let gate = queue.clone();
            let backend = storage
                .before_start(move |_| {
                    let gate = gate.clone();
                    async move {
                        wait_before_start(&gate, restarts).await;
                        Ok(())
                    }
                })
                // After the backend's first ready poll: the worker is registered.
                .after_start(move |_| {
                    registered.set_registered(q, true);
                    async { Ok(()) }
                })
                .with_codec(RawCodec)
                .poll_with_strategy(wakers.strategy(q, poll));
            WorkerBuilder::new(apalis_name)
                .backend(backend)
                .data(handler.clone())
                .concurrency(concurrency)
                .build(handle)
        });
    }
    let restarts_state = state.clone();
    let (guard_queue, guard_queues, guard_name) =
        (queue.clone(), queues.clone(), process_name.clone());
    let monitor = monitor.should_restart(move |ctx, err| {
        // A fetch that failed on a task apalis cannot decode left its batch in this worker's
        // inflight set, to be handed back (and to fail again) once the name expires.
        tokio::spawn(bury_malformed_claims(
            guard_queue.clone(),
            guard_queues.clone(),
            ctx.name().to_string(),
            guard_name.clone(),
        ));
        if ctx.is_shutting_down() {
            return false;
        }
        restarts_state.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("sessionfleet_worker_restarts_total").increment(1);
        tracing::warn!(worker = ctx.name(), restarts = ctx.restarts() + 1, error = %guard_queue.scrub(&err.to_string()), "queue worker stopped on an error; restarting under a new name");
        true
    });
    // `register` keeps the order of `queues`.
    if let Ok(mut w) = state.workers.lock() {
        *w = queues
            .iter()
            .copied()
            .zip(monitor.context().workers().iter().cloned())
            .collect();
    }

    let stop = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move {
            let which = signals.next().await;
            tracing::info!(
                signal = which,
                timeout_secs = stop_timeout.as_secs(),
                "stopping: no new jobs; running jobs stop at their next boundary"
            );
            let _ = state.stop_deadline.set(Instant::now() + stop_timeout);
            state.stopping.store(true, Ordering::Relaxed);
            shutdown.cancel();
            tokio::spawn(async move {
                tokio::select! {
                    which = signals.next() => {
                        eprintln!("sessionfleet-worker: second {which}; exiting at once");
                        std::process::exit(130);
                    }
                    _ = tokio::time::sleep(stop_timeout) => {
                        tracing::error!(timeout_secs = stop_timeout.as_secs(), "running jobs did not stop in time; exiting (other workers will recover them)");
                        std::process::exit(1);
                    }
                }
            });
            Ok(())
        }
    };
    let outcome = monitor.run_with_signal(stop).await;
    // The monitor has waited for the handlers apalis still had; jobs whose apalis worker failed
    // under them may still run (and the registry keeps counting them meanwhile).
    shutdown.cancel();
    let deadline = state
        .stop_deadline
        .get()
        .copied()
        .unwrap_or_else(|| Instant::now() + stop_timeout);
    let left = wait_for_jobs(&state, deadline).await;
    background.cancel();
    if let Err(e) = queue.deregister_worker(&process_name).await {
        tracing::warn!(error = %e, "could not remove the worker record; the janitor will");
    }
    if let Err(n) = left {
        anyhow::bail!(
            "{n} running job(s) did not stop within the shutdown timeout ({}s); exiting (other workers will recover them)",
            stop_timeout.as_secs()
        );
    }
    match outcome {
        Ok(()) => {
            tracing::info!(worker = %process_name, "stopped cleanly");
            Ok(())
        }
        Err(e) if state.is_stopping() => {
            tracing::warn!(error = %queue.scrub(&e.to_string()), "a queue worker ended with an error during shutdown");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "queue workers stopped: {}",
            queue.scrub(&e.to_string())
        )),
    }
}

/// Before a (re)started apalis worker registers: back off after failures, and wait until Redis
/// answers, so a Redis outage does not turn supervision into a hot restart loop.
async fn wait_before_start(queue: &Queue, restarts: usize) {
    if restarts > 0 {
        tokio::time::sleep(sessionfleet::backoff::exponential(
            restarts.min(16) as u32,
            RESTART_BASE,
            RESTART_MAX,
        ))
        .await;
    }
    let mut attempt = 0u32;
    while let Err(e) = queue.ping().await {
        attempt += 1;
        if attempt == 1 || attempt.is_multiple_of(10) {
            tracing::warn!(error = %e, attempt, "waiting for Redis");
        }
        tokio::time::sleep(sessionfleet::backoff::exponential(
            attempt,
            RESTART_BASE,
            RESTART_MAX,
        ))
        .await;
    }
}

async fn registry_loop(
    queue: Queue,
    mut info: WorkerInfo,
    state: Arc<FleetState>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(REGISTRY_BEAT);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        info.last_seen = Utc::now();
        info.running = state.running_jobs.load(Ordering::Relaxed);
        info.restarts = state.restarts.load(Ordering::Relaxed);
        info.stopping = state.is_stopping();
        if let Err(e) = queue.heartbeat_worker(&info).await {
            tracing::debug!(error = %e, "registry heartbeat failed");
        }
        if info.stopping
            && let Err(e) = keep_claims_alive(&queue, &state.apalis_names()).await
        {
            tracing::warn!(error = %queue.scrub(&e.to_string()), "could not refresh the apalis heartbeats of a draining worker");
        }
    }
}

/// Stamps this process's apalis workers as alive now, the way apalis' own heartbeat
/// (`keep_alive.lua`: `ZADD <queue>:workers <unix seconds> <name>`) does. Once shutdown has
/// begun with jobs in flight, apalis-core stops polling the backend (`CallAll` returns
/// `Pending` until the handlers finish), so it heartbeats no more, while the drain may
/// outlast the orphan timeout; without this a peer's heartbeat or a janitor would hand a
/// job still running here to another worker. `XX`: an entry already gone stays gone.
async fn keep_claims_alive(
    queue: &Queue,
    names: &[(QueueClass, String)],
) -> Result<(), redis::RedisError> {
    if names.is_empty() {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut p = redis::pipe();
    for (q, name) in names {
        p.cmd("ZADD")
            .arg(queue.keys().apalis_workers(*q))
            .arg("XX")
            .arg(now)
            .arg(name)
            .ignore();
    }
    p.query_async(&mut queue.connection()).await
}

/// Dead-letters what apalis worker `apalis_name` (failed) holds that no fetch can decode.
async fn bury_malformed_claims(
    queue: Queue,
    queues: Vec<QueueClass>,
    apalis_name: String,
    worker: String,
) {
    for q in queues {
        if let Err(e) = queue.bury_malformed_claimed(q, &apalis_name, &worker).await {
            tracing::debug!(queue = q.name(), error = %e, "could not check a failed worker's claimed tasks");
        }
    }
}

async fn promote_loop(
    queue: Queue,
    queues: Vec<QueueClass>,
    worker: String,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for q in &queues {
            match queue.promote_due(*q).await {
                Ok(n) if n > 0 => tracing::debug!(queue = q.name(), moved = n, "promoted due jobs"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "promoting due jobs failed"),
            }
            // After promotion, which may have moved one to the head: a task apalis cannot
            // decode fails a whole fetch and the apalis worker with it.
            if let Err(e) = queue.bury_malformed_ready(*q, &worker).await {
                tracing::debug!(error = %e, "checking ready jobs failed");
            }
        }
    }
}

async fn janitor_loop(queue: Queue, worker: String, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sessionfleet::backoff::jitter(JANITOR_INTERVAL)) => {}
        }
        match queue.janitor_pass(&worker).await {
            Ok(r) => tracing::debug!(report = ?r, "janitor pass"),
            Err(e) => tracing::warn!(error = %e, "janitor pass failed"),
        }
    }
}

async fn gauges(
    queue: Queue,
    prom: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) {
    loop {
        if let Ok(depths) = queue.queue_depths().await {
            for d in depths {
                for (state, n) in [
                    ("ready", d.ready),
                    ("running", d.running),
                    ("scheduled", d.scheduled),
                    ("scheduled_due", d.scheduled_due),
                ] {
                    metrics::gauge!("sessionfleet_queue_depth", "queue" => d.queue.clone(), "state" => state).set(n as f64);
                }
            }
        }
        if let Ok(n) = queue.dead_letter_count().await {
            metrics::gauge!("sessionfleet_dead_letters").set(n as f64);
        }
        prom.run_upkeep();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job whose apalis handler is dropped (its worker failed on a Redis error) stays
    /// counted as running and is waited for at shutdown.
    #[tokio::test]
    async fn a_job_cut_loose_from_its_handler_stays_counted_and_is_waited_for() {
        let state = Arc::new(FleetState::default());
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let handler = tokio::spawn(async move {
            spawn_job(&st, async move {
                let _ = started_tx.send(());
                let _ = finished.await;
            })
            .await
        });
        started.await.expect("job started");
        handler.abort();
        assert!(handler.await.unwrap_err().is_cancelled());
        assert_eq!(state.running_jobs.load(Ordering::Relaxed), 1);

        let far = Instant::now() + Duration::from_secs(3600);
        let wait = tokio::spawn({
            let state = Arc::clone(&state);
            async move { wait_for_jobs(&state, far).await }
        });
        finish.send(()).expect("job still running");
        assert_eq!(wait.await.unwrap(), Ok(()));
        assert_eq!(state.running_jobs.load(Ordering::Relaxed), 0);
    }

    /// A job that outlives the shutdown deadline is reported, not waited for forever (paused
    /// clock: the deadline passes without real waiting).
    #[tokio::test(start_paused = true)]
    async fn jobs_still_running_at_the_deadline_are_counted() {
        let state = Arc::new(FleetState::default());
        let _stuck = spawn_job(&state, std::future::pending::<()>());
        let _done = spawn_job(&state, tokio::time::sleep(Duration::from_secs(5)));
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(wait_for_jobs(&state, deadline).await, Err(1));
        assert_eq!(state.running_jobs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn no_jobs_means_no_wait() {
        let state = Arc::new(FleetState::default());
        assert_eq!(wait_for_jobs(&state, Instant::now()).await, Ok(()));
    }
}
