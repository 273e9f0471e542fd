//! Fleet benchmark: no-op throughput through the full worker stack, batch enqueue rate, and
//! enqueue→start latency at a low rate. Run in release (see bench/results/fleet.md).
//!
//! cargo build --release -p sessionfleet-worker -p sessionfleet-bench --bin fleet --bin sessionfleet-worker
//! target/release/fleet --jobs 100000

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use sessionfleet::config::{Overrides, Settings};
use sessionfleet::jobs::{JobEnvelope, QueueClass};
use sessionfleet::queue::{EnqueueOptions, Queue};

#[derive(Debug, Parser)]
struct Args {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// No-op jobs for the throughput run.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Concurrency per worker.
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Jobs for the latency run.
    #[arg(long, default_value_t = 500)]
    latency_jobs: usize,
    /// Jobs per second in the latency run.
    #[arg(long, default_value_t = 50)]
    latency_rate: u64,
    /// The worker binary.
    #[arg(long, default_value = "target/release/sessionfleet-worker")]
    worker_bin: PathBuf,
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn settings(url: &str, ns: &str) -> anyhow::Result<Settings> {
    let (url, ns) = (url.to_string(), ns.to_string());
    let env = move |k: &str| match k {
        "REDIS_URL" => Some(url.clone()),
        "SESSIONFLEET_NAMESPACE" => Some(ns.clone()),
        _ => None,
    };
    Ok(Settings::resolve(&Overrides::default(), &env, None)?)
}

fn start_workers(a: &Args, ns: &str) -> anyhow::Result<Workers> {
    let mut v = Vec::new();
    for _ in 0..a.workers {
        v.push(
            Command::new(&a.worker_bin)
                .args([
                    "--queues",
                    "diag",
                    "--concurrency",
                    &a.concurrency.to_string(),
                    "--metrics-addr",
                    "off",
                ])
                .env("REDIS_URL", &a.redis_url)
                .env("SESSIONFLEET_NAMESPACE", ns)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start {}", a.worker_bin.display()))?,
        );
    }
    Ok(Workers(v))
}

async fn wait_live(q: &Queue, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    while q.live_workers(Some(QueueClass::Diag)).await?.len() < n {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("workers did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Removes the run's namespace, its members of apalis' shared registry included (deleting
/// its keys alone left one registry entry per queue behind on every run).
async fn drop_ns(q: &Queue) {
    if let Err(e) = q.forget_namespace().await {
        eprintln!("could not remove namespace {}: {e}", q.keys().namespace());
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];

    // 1. Batch enqueue rate (no worker running).
    let ns = format!("bench-enq-{run}");
    let q = Queue::connect(&settings(&a.redis_url, &ns)?).await?;
    let jobs: Vec<JobEnvelope> = (0..a.jobs).map(|_| JobEnvelope::noop("bench")).collect();
    let t = Instant::now();
    q.enqueue_batch(jobs, EnqueueOptions::default()).await?;
    let enq = t.elapsed();
    println!(
        "enqueue_batch: {} jobs in {:.3}s = {:.0} jobs/s",
        a.jobs,
        enq.as_secs_f64(),
        a.jobs as f64 / enq.as_secs_f64()
    );
    drop_ns(&q).await;

    // 2. Throughput: workers idle and ready, then the whole batch at once.
    let ns = format!("bench-tp-{run}");
    let q = Queue::connect(&settings(&a.redis_url, &ns)?).await?;
    let _w = start_workers(&a, &ns)?;
    wait_live(&q, a.workers).await?;
    let jobs: Vec<JobEnvelope> = (0..a.jobs).map(|_| JobEnvelope::noop("bench")).collect();
    let t = Instant::now();
    q.enqueue_batch(jobs, EnqueueOptions::default()).await?;
    let enq_tp = t.elapsed();
    loop {
        let d = q.queue_depths().await?;
        let diag = d
            .iter()
            .find(|d| d.queue == "diag")
            .map(|d| d.ready + d.running)
            .unwrap_or(0);
        if diag == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("throughput run did not drain");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = t.elapsed();
    // Results are written before the ack, so the drained queue means stored results.
    let mut c = q.connection();
    let stored: usize = {
        let mut n = 0usize;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!(
                    "{}:{}:sf:result:*",
                    sessionfleet::queue::keys::SLOT_TAG,
                    ns
                ))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut c)
                .await?;
            n += keys.len();
            cursor = next;
            if cursor == 0 {
                break n;
            }
        }
    };
    println!(
        "throughput: {} no-op jobs ({} stored results) in {:.3}s incl. enqueue ({:.3}s) = {:.0} jobs/s with {} worker(s) x concurrency {}",
        a.jobs,
        stored,
        total.as_secs_f64(),
        enq_tp.as_secs_f64(),
        a.jobs as f64 / total.as_secs_f64(),
        a.workers,
        a.concurrency
    );
    drop(_w);
    drop_ns(&q).await;

    // 2b. Processing rate of a prefilled queue (how queue benchmarks such as BullMQ's count):
    //     the jobs wait in the queue, workers start, and the window runs from the first job's
    //     start to the last job's finish as the stored results record them.
    let ns = format!("bench-pf-{run}");
    let q = Queue::connect(&settings(&a.redis_url, &ns)?).await?;
    let jobs: Vec<JobEnvelope> = (0..a.jobs).map(|_| JobEnvelope::noop("bench")).collect();
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.job_id).collect();
    q.enqueue_batch(jobs, EnqueueOptions::default()).await?;
    let _w = start_workers(&a, &ns)?;
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = q.queue_depths().await?;
        if d.iter()
            .all(|d| d.queue != "diag" || d.ready + d.running == 0)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("prefilled run did not drain");
        }
    }
    let (mut first, mut last) = (None, None);
    for chunk in ids.chunks(1000) {
        let results = futures::future::join_all(chunk.iter().map(|id| q.result(*id))).await;
        for r in results {
            let r = r?.context("a job has no result")?;
            first = Some(
                first.map_or(r.started_at, |f: chrono::DateTime<chrono::Utc>| {
                    f.min(r.started_at)
                }),
            );
            last = Some(
                last.map_or(r.finished_at, |l: chrono::DateTime<chrono::Utc>| {
                    l.max(r.finished_at)
                }),
            );
        }
    }
    let window = (last.context("no results")? - first.context("no results")?)
        .num_microseconds()
        .unwrap_or(1) as f64
        / 1e6;
    println!(
        "prefilled: {} no-op jobs processed in {:.3}s (first start to last finish) = {:.0} jobs/s with {} worker(s) x concurrency {}",
        a.jobs,
        window,
        a.jobs as f64 / window,
        a.workers,
        a.concurrency
    );
    drop(_w);
    drop_ns(&q).await;

    // 3. Latency at a low rate: enqueue → handler start (the result's started_at).
    let ns = format!("bench-lat-{run}");
    let q = Queue::connect(&settings(&a.redis_url, &ns)?).await?;
    let _w = start_workers(&a, &ns)?;
    wait_live(&q, a.workers).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gap = Duration::from_micros(1_000_000 / a.latency_rate.max(1));
    let mut sent = Vec::with_capacity(a.latency_jobs);
    let mut tick = tokio::time::interval(gap);
    for _ in 0..a.latency_jobs {
        tick.tick().await;
        let env = JobEnvelope::noop("bench");
        let at = chrono::Utc::now();
        q.enqueue(&env).await?;
        sent.push((env.job_id, at));
    }
    let mut lat = Vec::with_capacity(sent.len());
    for (id, at) in sent {
        let r = q.wait_for_result(id, Duration::from_secs(60)).await?;
        lat.push((r.started_at - at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "latency enqueue->start at {}/s over {} jobs: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        a.latency_rate,
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    drop(_w);
    drop_ns(&q).await;
    Ok(())
}
