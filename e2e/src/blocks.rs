//! Where blocks land and how they are checked: output directories, the exactly-once audit
//! (`e2e/audit.py`, an independent Parquet reader).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::Testbed;
use crate::datagen::Produced;
use crate::kafka::{high_watermarks, wait_all_committed};

/// A fresh local output directory (the builder does not create a missing file:// root, as
/// it would not create a missing bucket: it usually means a volume is not mounted).
pub fn blocks_dir(tb: &Testbed, test: &str) -> PathBuf {
    let dir = tb
        .dir
        .join("blocks")
        .join(format!("{test}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `file://` URL of a directory.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Waits until `group` committed everything `produced` (its high watermarks), then audits
/// the blocks under `blocks` exactly; returns the commits.
pub async fn wait_committed_then_audit(
    tb: &Testbed,
    group: &str,
    topic: &str,
    blocks: &Path,
    produced: &Produced,
    timeout: Duration,
) -> BTreeMap<i32, i64> {
    let committed = wait_all_committed(tb, group, topic, &high_watermarks(produced), timeout).await;
    audit_exact(tb, blocks, produced, &committed);
    committed
}

/// Audits the blocks under `blocks` against `produced`: every record below `committed`
/// exactly once with equal content, nothing else; panics with the report otherwise.
pub fn audit_exact(
    tb: &Testbed,
    blocks: &Path,
    produced: &Produced,
    committed: &BTreeMap<i32, i64>,
) -> Value {
    let (report, exact) = audit_produced(tb, blocks, produced, Some(committed));
    println!("audit: {report}");
    assert!(exact, "audit not exact: {report}");
    assert_eq!(
        report["expected"].as_u64(),
        Some(produced.total()),
        "{report}"
    );
    assert_eq!(
        report["records"].as_u64(),
        Some(produced.total()),
        "{report}"
    );
    report
}

/// Runs `e2e/audit.py` over a directory of blocks against `produced` (written to a CSV of
/// the expected records first); returns its JSON report and whether the audit was exact.
pub fn audit_produced(
    tb: &Testbed,
    blocks: &Path,
    produced: &Produced,
    committed: Option<&BTreeMap<i32, i64>>,
) -> (Value, bool) {
    let expected_csv = tb
        .dir
        .join(format!("expected-{:08x}.csv", rand::random::<u32>()));
    produced
        .write_csv(&expected_csv)
        .expect("write expected csv");
    let script = crate::source_dir().join("audit.py");
    let mut cmd = std::process::Command::new(&tb.python);
    cmd.arg(script)
        .arg("--blocks")
        .arg(blocks)
        .arg("--expected")
        .arg(&expected_csv);
    if let Some(c) = committed {
        let map: BTreeMap<String, i64> = c.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        cmd.arg("--committed")
            .arg(serde_json::to_string(&map).unwrap());
    }
    let out = cmd.output().expect("run audit.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "audit.py printed no report: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.success())
}

/// Every file under `dir`, relative to it.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}
