//! What the benchmarks read of this machine and its processes, from `/proc`.

use std::fmt::Display;

use anyhow::Context;

/// The 1-minute load average.
pub fn load_average() -> anyhow::Result<f64> {
    let loadavg = std::fs::read_to_string("/proc/loadavg")?;
    Ok(loadavg
        .split_whitespace()
        .next()
        .context("/proc/loadavg")?
        .parse()?)
}

/// User + system time of a process (`"self"` or a pid) from `/proc/<pid>/stat` (fields 14
/// and 15, in USER_HZ = 100 ticks/s).
pub fn cpu_seconds(pid: impl Display) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)?;
    // Counted after the parenthesised command name, which may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context(path.clone())?
        .1
        .split_whitespace()
        .collect();
    let ticks =
        |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context(path.clone())?.parse()?) };
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// A process's (`"self"` or a pid) peak resident set size so far.
pub fn peak_rss_kib(pid: impl Display) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .with_context(|| format!("no VmHWM in {path}"))?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
