//! Helm for the tests: `e2e/helm.py` (helm-sdkpy, Helm v4's library) run with the testbed's
//! Python, and the chart's directory.

use std::path::PathBuf;
use std::time::Duration;

use crate::Testbed;

pub fn chart_dir() -> PathBuf {
    crate::source_dir().join("../charts/blocksmith")
}

fn helm_py() -> PathBuf {
    crate::source_dir().join("helm.py")
}

/// Runs `helm.py ARGS` with the testbed's python; stdout on success, stdout+stderr on failure.
pub async fn helm(tb: &Testbed, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(&tb.python)
        .arg(helm_py())
        .args(args)
        .output()
        .await
        .expect("run helm.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "helm.py {args:?} exited {}:\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `helm.py ARGS`, retried: Helm discovers every API group first, and another test may have
/// an aggregated API momentarily unavailable. A failed install is uninstalled before retrying.
pub async fn helm_retried(tb: &Testbed, args: &[&str]) -> Result<String, String> {
    let mut last = String::new();
    for attempt in 1..=3 {
        match helm(tb, args).await {
            Ok(out) => return Ok(out),
            Err(e) => {
                eprintln!("attempt {attempt}: {e}");
                last = e;
                if args[0] == "install" {
                    let _ = helm(tb, &["uninstall", args[1], args[3]]).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    Err(last)
}

/// Uninstalls a release when dropped while armed: a failed assertion must not leave it
/// installed (its cluster-wide objects would disturb the other tests).
pub struct ReleaseGuard {
    python: PathBuf,
    release: String,
    namespace: String,
    pub armed: bool,
}

impl ReleaseGuard {
    pub fn new(tb: &Testbed, release: &str, namespace: &str) -> ReleaseGuard {
        ReleaseGuard {
            python: tb.python.clone(),
            release: release.into(),
            namespace: namespace.into(),
            armed: true,
        }
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(&self.python)
                .arg(helm_py())
                .args(["uninstall", &self.release, &self.namespace])
                .status();
        }
    }
}
