//! A Kafka-protocol broker for the testbed: librdkafka's mock cluster, kept up as a process.
//!
//! Writes `{"bootstrap": "...", "control": "..."}` to `--ready-file` (and stdout) once up.
//! The control address takes one command per line and answers `ok` or `error: ...`:
//!   create-topic NAME PARTITIONS | broker-down ID | broker-up ID | broker-rtt ID MILLIS | ping

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = MockCluster::new(args.brokers)?;
    let listener = TcpListener::bind(&args.control)?;
    let ready = serde_json::json!({
        "bootstrap": cluster.bootstrap_servers(),
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

fn serve(
    cluster: &MockCluster<'static, DefaultProducerContext>,
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
    cluster: &MockCluster<'static, DefaultProducerContext>,
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
