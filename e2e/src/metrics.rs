//! Reading the binaries' Prometheus endpoints.

/// The `kind`s of `blocksmith_api_writes_total` that write BlockJobs: an operator's writes
/// per job are their sum over the jobs.
pub const OPERATOR_JOB_WRITE_KINDS: [&str; 6] = [
    "create_job",
    "label_job",
    "finish_job",
    "release_job",
    "reset_job",
    "delete_job",
];

/// A plain HTTP GET on loopback (metrics endpoints); returns the body.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_with_headers(port, path).1
}

/// The value of one series (`name{labels}` as exported, or a bare name) in a scrape of `port`.
pub fn sample(port: u16, series: &str) -> Option<f64> {
    http_get(port, "/metrics").lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// A plain HTTP GET on loopback; returns the status line and headers, and the body.
pub fn http_get_with_headers(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_string(), body.to_string())
}

/// The value of header `name` (case-insensitive) in `head`.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Parses a scrape with the Prometheus project's strict OpenMetrics parser
/// (`e2e/check_metrics.py`); returns its summary (`families`, `samples`, `names`), or panics
/// with the parser's error.
pub fn parse_openmetrics(python: &std::path::Path, scrape: &str) -> serde_json::Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(python)
        .arg(crate::source_dir().join("check_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run check_metrics.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{scrape}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check_metrics.py prints JSON")
}

/// `(labels, value)` of every sample of `name` in a Prometheus text exposition.
pub fn prometheus_samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| Some((labels, value.parse().ok()?)))?
        })
        .collect()
}

/// Sum of a Prometheus counter family in a text exposition, optionally only the samples
/// whose labels contain `label` (e.g. `kind="create_job"`).
pub fn counter_sum(exposition: &str, name: &str, label: Option<&str>) -> f64 {
    prometheus_samples(exposition, name)
        .iter()
        .filter(|(labels, _)| label.is_none_or(|want| labels.contains(want)))
        .map(|(_, v)| v)
        .sum()
}
