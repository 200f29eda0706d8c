//! A Kafka-protocol broker for the testbed: librdkafka's mock cluster, kept up as a process.
//!
//! Writes `{"bootstrap": "...", "control": "..."}` to `--ready-file` (and stdout) once up.
//! The control address takes one command per line and answers `ok` or `error: ...`:
//!   create-topic NAME PARTITIONS | broker-down ID | broker-up ID | broker-rtt ID MILLIS | ping
//!
//! The mock brokers listen on 127.0.0.1 only, which a pod's network namespace cannot reach.
//! With `--advertise HOST` each broker is also served on HOST (a forwarder to its loopback
//! port) and advertised there, so pods and local processes use the same addresses.
//!
//! With `--tls DIR` each broker is served and advertised only through TLS (the mock speaks
//! plaintext), requiring a client certificate: what brokers with mTLS listeners (Strimzi's
//! `tls` authentication) ask of clients. DIR holds `ca.pem` (which client certificates must
//! chain to), `server.pem` and `server-key.pem`.
//!
//! With `--sasl FILE` each broker is served and advertised only through SASL (PLAIN,
//! SCRAM-SHA-256/512, OAUTHBEARER; see `blocksmith_e2e::sasl`), SASL_SSL with `--tls` too.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::client::Client;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

mod front {
    //! TLS (client certificates required) and SASL in front of the mock brokers, either or
    //! both.

    use std::path::Path;
    use std::sync::Arc;
    use std::time::SystemTime;

    use blocksmith_e2e::sasl::{Authenticator, Outcome, SaslConfig, authenticate};
    use rdkafka::client::Client;
    use rdkafka::producer::DefaultProducerContext;
    use rustls::RootCertStore;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::server::WebPkiClientVerifier;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio_rustls::TlsAcceptor;

    /// Serves each broker on `host` through a listener that takes TLS (with a client
    /// certificate chaining to `tls`/ca.pem) and/or SASL (the users and OAuth issuer of the
    /// JSON file `sasl`), forwarding to its loopback port, and advertises it there. Returns
    /// the new bootstrap list.
    pub fn serve(
        client: &Client<DefaultProducerContext>,
        loopback: &str,
        host: &str,
        tls: Option<&Path>,
        sasl: Option<&Path>,
    ) -> anyhow::Result<String> {
        let acceptor = match tls {
            Some(dir) => Some(TlsAcceptor::from(Arc::new(server_config(dir)?))),
            None => None,
        };
        let auth = match sasl {
            Some(file) => {
                let config: SaslConfig = serde_json::from_slice(&std::fs::read(file)?)?;
                eprintln!("SASL: {config:?}");
                Some(Arc::new(Authenticator::new(&config)?))
            }
            None => None,
        };
        // The forwarders live as long as the process.
        let runtime = Box::leak(Box::new(tokio::runtime::Runtime::new()?));
        let mut advertised = Vec::new();
        for (index, upstream) in loopback.split(',').enumerate() {
            let listener = std::net::TcpListener::bind((host, 0))?;
            listener.set_nonblocking(true)?;
            let port = listener.local_addr()?.port();
            super::set_advertised_address(client, index as i32 + 1, host, port)?;
            let (acceptor, auth, upstream) = (acceptor.clone(), auth.clone(), upstream.to_string());
            runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((stream, peer)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let (acceptor, auth, upstream) =
                        (acceptor.clone(), auth.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let Some(acceptor) = acceptor else {
                            return connection(stream, &upstream, auth.as_deref(), peer).await;
                        };
                        match acceptor.accept(stream).await {
                            Ok(tls) => connection(tls, &upstream, auth.as_deref(), peer).await,
                            Err(e) => eprintln!("TLS handshake with {peer} refused: {e}"),
                        }
                    });
                }
            });
            advertised.push(format!("{host}:{port}"));
        }
        Ok(advertised.join(","))
    }

    /// One client connection: authenticated first when `auth` is set, then forwarded both
    /// ways until either side closes (or, for OAUTHBEARER, the token expires).
    async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        upstream: &str,
        auth: Option<&Authenticator>,
        peer: std::net::SocketAddr,
    ) {
        let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let _ = plain.set_nodelay(true);
        let mut expires = None;
        if let Some(auth) = auth {
            match authenticate(&mut stream, &mut plain, auth).await {
                Outcome::Authenticated {
                    principal,
                    mechanism,
                    expires: until,
                } => {
                    eprintln!("SASL: {peer} authenticated as {principal:?} with {mechanism}");
                    expires = until;
                }
                Outcome::Closed(why) => return eprintln!("SASL: {peer} refused: {why}"),
            }
        }
        let forward = tokio::io::copy_bidirectional(&mut stream, &mut plain);
        match expires {
            None => {
                let _ = forward.await;
            }
            Some(at) => {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                if tokio::time::timeout(left, forward).await.is_err() {
                    eprintln!("SASL: {peer}'s token expired: connection closed");
                }
            }
        }
    }

    fn server_config(dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
            roots.add(ca?)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem"))?;
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?)
    }
}

#[derive(Parser)]
struct Args {
    /// Number of brokers in the mock cluster.
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Address for the control protocol.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: String,
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Also serve and advertise the brokers on this address (e.g. the testbed node's).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve and advertise the brokers only through TLS with client certificates; the
    /// directory holds ca.pem, server.pem and server-key.pem.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Serve and advertise the brokers only through SASL (with `--tls`, SASL_SSL): the JSON
    /// file holds the users (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and the OAUTHBEARER
    /// issuer, see `blocksmith_e2e::sasl::SaslConfig`.
    #[arg(long)]
    sasl: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A client that owns the mock cluster, so its native handle is at hand for
    // `advertise_on` (the rdkafka crate does not wrap the advertised-address setter).
    let owner: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", args.brokers.to_string())
        .create()?;
    let cluster = owner
        .client()
        .mock_cluster()
        .ok_or_else(|| anyhow::anyhow!("librdkafka made no mock cluster"))?;
    let bootstrap = match (&args.tls, &args.sasl, &args.advertise) {
        (None, None, Some(host)) => {
            advertise_on(owner.client(), &cluster.bootstrap_servers(), host)?
        }
        (None, None, None) => cluster.bootstrap_servers(),
        (tls, sasl, host) => front::serve(
            owner.client(),
            &cluster.bootstrap_servers(),
            host.as_deref().unwrap_or("127.0.0.1"),
            tls.as_deref(),
            sasl.as_deref(),
        )?,
    };
    let listener = TcpListener::bind(&args.control)?;
    let ready = serde_json::json!({
        "bootstrap": bootstrap,
        "control": listener.local_addr()?.to_string(),
    })
    .to_string();
    println!("{ready}");
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &ready)?;
        std::fs::rename(tmp, path)?;
    }
    // One client at a time: the mock cluster is not shared across threads.
    for stream in listener.incoming() {
        if let Err(e) = serve(&cluster, stream?) {
            eprintln!("control connection: {e}");
        }
    }
    Ok(())
}

/// Serves each broker (ids 1.., in the order of `loopback`, the mock's own bootstrap list)
/// on `host` through a forwarder to its loopback port, and makes the broker advertise that
/// address in metadata. Returns the new bootstrap list.
fn advertise_on(
    client: &Client<DefaultProducerContext>,
    loopback: &str,
    host: &str,
) -> anyhow::Result<String> {
    let mut advertised = Vec::new();
    for (index, upstream) in loopback.split(',').enumerate() {
        let listener = TcpListener::bind((host, 0))?;
        let port = listener.local_addr()?.port();
        set_advertised_address(client, index as i32 + 1, host, port)?;
        let upstream = upstream.to_string();
        std::thread::spawn(move || forward(listener, &upstream));
        advertised.push(format!("{host}:{port}"));
    }
    Ok(advertised.join(","))
}

#[allow(unsafe_code)]
pub(crate) fn set_advertised_address(
    client: &Client<DefaultProducerContext>,
    broker: i32,
    host: &str,
    port: u16,
) -> anyhow::Result<()> {
    use rdkafka::bindings::{rd_kafka_handle_mock_cluster, rd_kafka_mock_broker_set_host_port};
    let host = CString::new(host)?;
    // SAFETY: `client` is alive for the call and owns the mock cluster the handle returns;
    // librdkafka copies `host` under the cluster's lock.
    unsafe {
        let mock = rd_kafka_handle_mock_cluster(client.native_ptr());
        anyhow::ensure!(!mock.is_null(), "the client has no mock cluster");
        rd_kafka_mock_broker_set_host_port(mock, broker, host.as_ptr(), port.into());
    }
    Ok(())
}

/// Forwards every connection accepted on `listener` to `upstream`, both ways, until either
/// side closes.
fn forward(listener: TcpListener, upstream: &str) {
    for downstream in listener.incoming().flatten() {
        let Ok(upstream) = TcpStream::connect(upstream) else {
            let _ = downstream.shutdown(Shutdown::Both);
            continue;
        };
        let _ = downstream.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        for (mut from, mut to) in [
            (downstream.try_clone(), upstream.try_clone()),
            (upstream.try_clone(), downstream.try_clone()),
        ]
        .into_iter()
        .filter_map(|(a, b)| a.ok().zip(b.ok()))
        {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
                let _ = from.shutdown(Shutdown::Read);
            });
        }
    }
}

fn serve(
    cluster: &MockCluster<'_, DefaultProducerContext>,
    stream: TcpStream,
) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let reply = match execute(
            cluster,
            line.split_whitespace().collect::<Vec<_>>().as_slice(),
        ) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        eprintln!("control: {line} -> {reply}");
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

fn execute(
    cluster: &MockCluster<'_, DefaultProducerContext>,
    words: &[&str],
) -> anyhow::Result<()> {
    match words {
        ["create-topic", name, partitions] => {
            Ok(cluster.create_topic(name, partitions.parse()?, 1)?)
        }
        ["broker-down", id] => Ok(cluster.broker_down(id.parse()?)?),
        ["broker-up", id] => Ok(cluster.broker_up(id.parse()?)?),
        ["broker-rtt", id, millis] => {
            Ok(cluster
                .broker_round_trip_time(id.parse()?, Duration::from_millis(millis.parse()?))?)
        }
        ["ping"] => Ok(()),
        _ => anyhow::bail!("unknown command {words:?}"),
    }
}
