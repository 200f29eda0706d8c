//! The signal to stop.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when the process is asked to stop: SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
