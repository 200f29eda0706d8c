//! Helpers for the binaries' unit tests (feature `test-support`).

/// An API server that accepts connections and never answers, as a frozen one does: a client
/// of it, and the server's task (abort it when done).
pub async fn frozen_apiserver() -> (kube::Client, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), server)
}
