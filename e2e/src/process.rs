//! Child processes that die with the test: killed on drop, output captured to a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// Whether the test stopped it ([`Proc::kill`], [`Proc::terminate`]).
    stopped_by_test: bool,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Proc> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawning {name} ({cmd:?}): {e}"))?;
        // Recorded in the testbed's pids dir so `e2e/testbed down` kills it even when the
        // test process itself was killed and never ran its destructors.
        if let Ok(dir) = std::env::var("BLOCKSMITH_TESTBED") {
            let _ = std::fs::write(pid_file(&dir, child.id()), child.id().to_string());
        }
        Ok(Proc {
            name: name.into(),
            child,
            log,
            stopped_by_test: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up (a crashed pod).
    pub fn kill(&mut self) {
        self.stopped_by_test = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes sends on pod deletion; returns the exit status.
    pub fn terminate(&mut self, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
        self.stopped_by_test = true;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.kill();
        None
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn pid_file(testbed: &str, pid: u32) -> PathBuf {
    Path::new(testbed).join("pids").join(format!("test-{pid}"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failing test's message is about what it waited for; a process that had died on
        // its own (an operator that lost its lease, say) is often why.
        if std::thread::panicking()
            && !self.stopped_by_test
            && let Ok(Some(status)) = self.child.try_wait()
        {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            eprintln!(
                "{} had exited on its own ({status}) before the test failed; the end of {}:",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("  {}", line.chars().take(400).collect::<String>());
            }
        }
        self.kill();
        if let Ok(dir) = std::env::var("BLOCKSMITH_TESTBED") {
            let _ = std::fs::remove_file(pid_file(&dir, self.pid()));
        }
    }
}
