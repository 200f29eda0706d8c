//! Reading the binaries' Prometheus endpoints.

/// A plain HTTP GET on loopback (metrics endpoints); returns the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
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
