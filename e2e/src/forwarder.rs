//! A way into the API server for one process that a test can cut: the process's kubeconfig
//! names a TCP forwarder on loopback, and [`CuttableApiserver::cut`] makes every connection
//! through it go silent (kept open, nothing delivered, as when a partition drops packets),
//! while everyone else still reaches the API server directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::Testbed;
use crate::procs::free_port;

pub struct CuttableApiserver {
    cut: watch::Sender<bool>,
    _stop: oneshot::Sender<()>,
}

impl CuttableApiserver {
    /// Starts the forwarder (on a thread of its own, so a test blocked in a synchronous call
    /// never stalls it) and returns it with a copy of `tb` whose spawned binaries reach the
    /// API server of `tb`'s kubeconfig through it. The copy's own client still goes direct.
    pub fn start(tb: &Testbed, name: &str) -> (CuttableApiserver, Testbed) {
        let own = tb
            .kubeconfig
            .clone()
            .unwrap_or_else(|| tb.dir.join("kubeconfig"));
        let shared = std::fs::read_to_string(&own).expect("testbed kubeconfig");
        let server = shared
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("the kubeconfig names its server")
            .trim()
            .to_string();
        let target: SocketAddr = server
            .trim_start_matches("https://")
            .parse()
            .expect("the kubeconfig's server is https://IP:PORT");
        let port = free_port();
        let dir = tb.dir.join("cuttable-apiservers");
        std::fs::create_dir_all(&dir).expect("forwarder dir");
        let kubeconfig: PathBuf = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            shared.replace(&server, &format!("https://127.0.0.1:{port}")),
        )
        .expect("write kubeconfig");

        let (cut, cut_rx) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind forwarder");
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("forwarder runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("forwarder listener");
                tokio::select! {
                    _ = forward(listener, target, cut_rx) => {}
                    _ = stop_rx => {}
                }
            });
        });
        let via = Testbed {
            kubeconfig: Some(kubeconfig),
            ..tb.clone()
        };
        (CuttableApiserver { cut, _stop: stop }, via)
    }

    /// From now on nothing passes, in either direction, on old or new connections.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

async fn forward(listener: TcpListener, target: SocketAddr, cut: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        connections.spawn(relay(client, target, cut.clone()));
    }
}

/// Relays one connection until it closes or the forwarder is cut; after a cut, holds both
/// sockets open and silent until the forwarder stops (they drop with this future).
async fn relay(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow() {
        return std::future::pending().await;
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let relayed = tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => true,
        _ = cut.wait_for(|cut| *cut) => false,
    };
    if !relayed {
        std::future::pending::<()>().await;
    }
}
