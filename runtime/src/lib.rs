//! Process plumbing shared by the operator and the builder: structured logs, the HTTP
//! endpoints `/metrics`, `/healthz` and `/readyz` with the [`metrics`] behind them, the
//! shutdown signal, default [`identity`]s, and the [`kafka`] client context.

pub mod health;
pub mod identity;
pub mod kafka;
pub mod metrics;
mod shutdown;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod topic_id;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Instant;

use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use tracing_subscriber::EnvFilter;

/// What `/metrics` serves: prometheus-client encodes OpenMetrics text, and Prometheus picks its
/// parser by this header (with `text/plain` it would misread the counters).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub use health::Health;
pub use shutdown::shutdown_signal;

/// Logs to stderr: JSON when it is not a terminal (in a pod), human-readable otherwise.
/// `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// Serves [`probe_router`] until the process ends.
pub async fn serve_probes(
    addr: SocketAddr,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    health: Health,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, probe_router(encode, health)).await?;
    Ok(())
}

/// `/metrics`: the text `encode` returns.
///
/// `/healthz` (liveness): 200 `ok` unless a heartbeat of `health` is past its deadline; then
/// 503 with one line per stale heartbeat, naming it and how long it has been stuck (also
/// logged, as the kubelet keeps only the status code).
///
/// `/readyz` (readiness): 200 `ready` once [`Health::set_ready`] was called, 503 `starting`
/// before.
pub fn probe_router(
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    health: Health,
) -> axum::Router {
    let live = health.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], encode()) }),
        )
        .route(
            "/healthz",
            get(move || async move {
                match live.check(Instant::now()) {
                    Ok(()) => (StatusCode::OK, "ok".to_string()),
                    Err(stale) => {
                        let lines: Vec<String> = stale.iter().map(|s| s.to_string()).collect();
                        tracing::warn!(stuck = ?lines, "liveness check failed");
                        let mut body = lines.join("\n");
                        body.push('\n');
                        (StatusCode::SERVICE_UNAVAILABLE, body)
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                if health.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves the router on an ephemeral port and GETs `path`: (status, body).
    async fn get(router: axum::Router, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        server.abort();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// GETs `path` from the probe router over `health` serving one fixed metric.
    async fn probe(health: &Health, path: &str) -> (u16, String) {
        get(
            probe_router(|| "metric 1\n".to_string(), health.clone()),
            path,
        )
        .await
    }

    #[tokio::test]
    async fn readyz_is_503_until_ready() {
        let health = Health::default();
        assert_eq!(probe(&health, "/readyz").await, (503, "starting".into()));
        health.set_ready();
        assert_eq!(probe(&health, "/readyz").await, (200, "ready".into()));
    }

    #[tokio::test]
    async fn healthz_is_503_naming_what_is_stuck() {
        let health = Health::default();
        assert_eq!(probe(&health, "/healthz").await, (200, "ok".into()));
        // Armed and beaten within its deadline: fine.
        health.arm("lease-renewal", Duration::from_secs(3600));
        assert_eq!(probe(&health, "/healthz").await, (200, "ok".into()));
        // Past their deadlines: both named, with how long.
        health.arm("work-loop", Duration::ZERO);
        let op = health.start("reconcile", "ns/p", Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (status, body) = probe(&health, "/healthz").await;
        assert_eq!(status, 503);
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 2, "{body}");
        assert!(
            lines[0].starts_with("reconcile ns/p: in progress for "),
            "{body}"
        );
        assert!(
            lines[1].starts_with("work-loop: no progress for "),
            "{body}"
        );
        // Readiness is a separate matter.
        assert_eq!(probe(&health, "/readyz").await, (503, "starting".into()));
        // A stale heartbeat that is disarmed no longer counts.
        health.disarm("work-loop");
        drop(op);
        assert_eq!(probe(&health, "/healthz").await, (200, "ok".into()));
    }

    #[tokio::test]
    async fn metrics_serves_the_encoded_text() {
        let health = Health::default();
        assert_eq!(probe(&health, "/metrics").await, (200, "metric 1\n".into()));
    }
}
