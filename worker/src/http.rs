//! `/metrics`, `/healthz` and `/readyz` on the metrics address (loopback by default).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sessionfleet::queue::Queue;

use crate::fleet::FleetState;

/// How long `/readyz` waits for Redis.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct App {
    prom: PrometheusHandle,
    queue: Queue,
    state: Arc<FleetState>,
}

/// Binds `addr` and serves until the process ends.
pub async fn serve(
    addr: &str,
    prom: PrometheusHandle,
    queue: Queue,
    state: Arc<FleetState>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(App { prom, queue, state });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn metrics(State(app): State<App>) -> String {
    app.prom.render()
}

async fn ready(State(app): State<App>) -> (StatusCode, String) {
    if app.state.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into());
    }
    // Ready only when every configured queue is consumed: a queue whose worker keeps failing
    // would otherwise sit unserved behind a ready pod.
    let down = app.state.queues_not_running();
    if !down.is_empty() {
        let names: Vec<&str> = down.iter().map(|q| q.name()).collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue workers not running: {}\n", names.join(",")),
        );
    }
    match tokio::time::timeout(READY_PING_TIMEOUT, app.queue.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            format!("ready: {} queue workers\n", app.state.queues().len()),
        ),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "redis: no answer within 1s\n".into(),
        ),
    }
}
