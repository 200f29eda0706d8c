//! Process plumbing shared by the operator and the builder: structured logs, and the HTTP
//! endpoints `/metrics`, `/healthz` and `/readyz`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use axum::routing::get;
use tracing_subscriber::EnvFilter;

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

/// Serves `/metrics` (the text `encode` returns), `/healthz` (always ok) and `/readyz`
/// (ok once `ready` is set) until the process ends.
pub async fn serve_probes(
    addr: SocketAddr,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}
