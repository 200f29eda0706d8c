//! Client for the testbed broker's control port (see `blocksmith-broker`), and private
//! brokers for tests that inject broker faults without disturbing the other tests.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::Testbed;
use crate::process::Proc;

pub fn control(addr: &str, command: &str) -> anyhow::Result<()> {
    let stream = TcpStream::connect(addr)?;
    writeln!(&stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    match reply.trim() {
        "ok" => Ok(()),
        other => anyhow::bail!("broker control {command:?}: {other}"),
    }
}

pub fn create_topic(addr: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    control(addr, &format!("create-topic {topic} {partitions}"))
}

/// A one-broker mock cluster of its own (broker id 1).
pub struct PrivateBroker {
    pub proc: Proc,
    pub bootstrap: String,
    pub control: String,
}

impl PrivateBroker {
    pub fn spawn(tb: &Testbed, name: &str) -> PrivateBroker {
        Self::spawn_with(tb, name, &[])
    }

    /// Served and advertised on the testbed node's address, so pods reach it too.
    pub fn spawn_on_node(tb: &Testbed, name: &str) -> PrivateBroker {
        let node_ip = std::env::var("BLOCKSMITH_NODE_IP").expect("BLOCKSMITH_NODE_IP");
        Self::spawn_with(tb, name, &["--advertise", &node_ip])
    }

    /// Served and advertised only through TLS, requiring client certificates signed by the
    /// CA in `dir` (see [`crate::pki::TestPki::generate`]).
    pub fn spawn_tls(tb: &Testbed, name: &str, dir: &std::path::Path) -> PrivateBroker {
        Self::spawn_with(tb, name, &["--tls", dir.to_str().expect("UTF-8 path")])
    }

    /// A broker served only through SASL: `config` is written to the `--sasl` file (users and
    /// OAuth issuer, see `sasl::SaslConfig`); with `tls`, SASL_SSL (see `spawn_tls`).
    pub fn spawn_sasl(
        tb: &Testbed,
        name: &str,
        config: &serde_json::Value,
        tls: Option<&std::path::Path>,
    ) -> PrivateBroker {
        let file = tb.dir.join(format!("{name}-sasl.json"));
        std::fs::write(&file, config.to_string()).expect("write the SASL file");
        let mut args = vec!["--sasl", file.to_str().expect("UTF-8 path")];
        if let Some(dir) = tls {
            args.extend(["--tls", dir.to_str().expect("UTF-8 path")]);
        }
        Self::spawn_with(tb, name, &args)
    }

    fn spawn_with(tb: &Testbed, name: &str, args: &[&str]) -> PrivateBroker {
        let ready = tb.dir.join(format!("{name}-broker.json"));
        // A ready file of an earlier run on this testbed names a broker that is gone.
        let _ = std::fs::remove_file(&ready);
        let mut cmd = tb.command("blocksmith-broker");
        cmd.arg("--ready-file").arg(&ready).args(args);
        let proc = tb.spawn(&format!("{name}-broker"), cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        let info: serde_json::Value = loop {
            if let Some(v) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
            {
                break v;
            }
            assert!(Instant::now() < deadline, "private broker did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        let field = |k: &str| info[k].as_str().unwrap().to_string();
        PrivateBroker {
            proc,
            bootstrap: field("bootstrap"),
            control: field("control"),
        }
    }

    /// `tb` with this broker in place of the testbed's.
    pub fn testbed(&self, tb: &Testbed) -> Testbed {
        Testbed {
            kafka_bootstrap: self.bootstrap.clone(),
            kafka_control: self.control.clone(),
            ..tb.clone()
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic(&self.control, topic, partitions).expect("create topic");
    }

    /// The cluster id its Metadata responses carry (unique per mock cluster).
    pub fn cluster_id(&self) -> String {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("kafka client");
        client
            .client()
            .fetch_cluster_id(Duration::from_secs(10))
            .expect("the broker reports a cluster id")
    }

    pub fn down(&self) {
        control(&self.control, "broker-down 1").expect("broker down");
    }

    pub fn up(&self) {
        control(&self.control, "broker-up 1").expect("broker up");
    }

    /// Delays every request by `rtt`, so that reads take seconds instead of milliseconds.
    pub fn set_round_trip_time(&self, rtt: Duration) {
        control(&self.control, &format!("broker-rtt 1 {}", rtt.as_millis()))
            .expect("broker round-trip time");
    }
}
