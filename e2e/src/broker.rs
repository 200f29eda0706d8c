//! Client for the testbed broker's control port (see `blocksmith-broker`).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

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
