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

/// The machine's CPU time so far (all cores, in ticks) and the part of it the hypervisor
/// gave to other guests (`steal`), from the first line of `/proc/stat`.
#[derive(Clone, Copy, Debug)]
struct MachineCpu {
    total: u64,
    stolen: u64,
}

impl MachineCpu {
    fn read() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("/proc/stat")?;
        parse_cpu_line(line).with_context(|| format!("/proc/stat: {line}"))
    }

    /// The share of the machine's CPU time since `before` that was stolen: the benchmarks'
    /// processes were ready to run and another guest ran instead. Ratios measured in one run
    /// hold up only while this stays small.
    fn stolen_since(&self, before: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.stolen.saturating_sub(before.stolen) as f64 / total as f64
    }
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: guest time is
/// already counted in user and nice, so the total is the first eight.
fn parse_cpu_line(line: &str) -> Option<MachineCpu> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (ticks.len() == 8).then(|| MachineCpu {
        total: ticks.iter().sum(),
        stolen: ticks[7],
    })
}

/// Watches the machine over a benchmark: started before the first run, told each run's
/// load, finished after the last.
pub struct LoadWatch {
    start: f64,
    max: f64,
    cpu: MachineCpu,
}

impl LoadWatch {
    pub fn start() -> anyhow::Result<LoadWatch> {
        let start = load_average()?;
        Ok(LoadWatch {
            start,
            max: start,
            cpu: MachineCpu::read()?,
        })
    }

    /// The load just before a run.
    pub fn saw(&mut self, load_before: f64) {
        self.max = self.max.max(load_before);
    }

    pub fn finish(self) -> anyhow::Result<Load> {
        Ok(Load {
            start: self.start,
            max: self.max,
            end: load_average()?,
            stolen: MachineCpu::read()?.stolen_since(&self.cpu),
        })
    }
}

/// What else the machine was doing over a benchmark: its load before, during and after,
/// and the CPU time stolen from it.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// 1-minute load averages: at the start, the largest just before a run, at the end.
    pub start: f64,
    pub max: f64,
    pub end: f64,
    /// The share of the machine's CPU time the hypervisor stole over the benchmark.
    pub stolen: f64,
}

impl Load {
    /// The report's sentence on it.
    pub fn describe(&self) -> String {
        format!(
            "Load average (1 min): {:.1} at the start, {:.1} at most before a run, {:.1} at \
             the end. CPU time stolen by the hypervisor: {:.0}% of the machine's over the \
             benchmark.",
            self.start,
            self.max,
            self.end,
            self.stolen * 100.0
        )
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "loadAverage": [self.start, self.max, self.end],
            "stolenCpuShare": round2(self.stolen),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stolen_share_counts_steal_against_all_cpu_time() {
        let before = parse_cpu_line("cpu  100 0 50 800 10 0 5 35 0 0").unwrap();
        let after = parse_cpu_line("cpu  400 0 150 1100 10 0 5 135 7 0").unwrap();
        assert_eq!(before.total, 1000);
        // 800 ticks passed, 100 of them stolen; guest time is not counted twice.
        assert!((after.stolen_since(&before) - 0.125).abs() < 1e-9);
        assert_eq!(before.stolen_since(&before), 0.0);
        assert!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse_cpu_line("cpu  1 2 3").is_none());
    }
}
