//! Waiting: polling until a check holds, pipeline conditions matched by a [`Cond`], Events.

use std::future::Future;
use std::time::{Duration, Instant};

use blocksmith_crds::{BlockJob, BlockPipeline};

use crate::Testbed;
use crate::cluster::{get_pipeline, jobs, pipeline_events};

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A pipeline condition as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// Asserts that `message` says each of `words`.
#[track_caller]
pub fn assert_says(message: &str, words: &[&str]) {
    for want in words {
        assert!(message.contains(want), "{want:?} not in {message:?}");
    }
}

/// The condition `type_` of a pipeline.
pub fn condition(bp: &BlockPipeline, type_: &str) -> Option<Condition> {
    bp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| Condition {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
}

/// What a pipeline condition must be: its type, and any of status, reason and words of its
/// message; waited for within 30 s unless [`Cond::within`] says otherwise.
/// `Cond::new("Ready").status("False").reason("InvalidSpec")`.
#[derive(Clone, Debug)]
pub struct Cond {
    type_: String,
    status: Option<String>,
    reason: Option<String>,
    message_contains: Vec<String>,
    timeout: Duration,
}

impl Cond {
    pub fn new(type_: &str) -> Cond {
        Cond {
            type_: type_.into(),
            status: None,
            reason: None,
            message_contains: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// `Ready=False` for `reason`.
    pub fn ready_false(reason: &str) -> Cond {
        Cond::new("Ready").status("False").reason(reason)
    }

    /// `Ready=True/Reconciled`.
    pub fn reconciled() -> Cond {
        Cond::new("Ready").status("True").reason("Reconciled")
    }

    pub fn status(mut self, status: &str) -> Cond {
        self.status = Some(status.into());
        self
    }

    pub fn reason(mut self, reason: &str) -> Cond {
        self.reason = Some(reason.into());
        self
    }

    pub fn message_contains(mut self, words: &str) -> Cond {
        self.message_contains.push(words.into());
        self
    }

    pub fn within(mut self, timeout: Duration) -> Cond {
        self.timeout = timeout;
        self
    }

    pub fn matches(&self, c: &Condition) -> bool {
        self.status.as_ref().is_none_or(|s| *s == c.status)
            && self.reason.as_ref().is_none_or(|r| *r == c.reason)
            && self.message_contains.iter().all(|w| c.message.contains(w))
    }
}

impl std::fmt::Display for Cond {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let any = "*".to_string();
        write!(
            f,
            "{}={}/{}",
            self.type_,
            self.status.as_ref().unwrap_or(&any),
            self.reason.as_ref().unwrap_or(&any)
        )?;
        if !self.message_contains.is_empty() {
            write!(f, " saying {:?}", self.message_contains)?;
        }
        Ok(())
    }
}

/// Waits until pipeline `name` has a condition matching `cond`; returns the pipeline.
pub async fn wait_pipeline(tb: &Testbed, ns: &str, name: &str, cond: &Cond) -> BlockPipeline {
    let mut last = None;
    let found = tokio::time::timeout(cond.timeout, async {
        loop {
            let bp = get_pipeline(tb, ns, name).await;
            let c = condition(&bp, &cond.type_);
            if c.as_ref().is_some_and(|c| cond.matches(c)) {
                return bp;
            }
            last = c;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "{ns}/{name}: no {cond} within {:?}; last: {last:?}",
            cond.timeout
        )
    })
}

/// Waits until pipeline `name` has a condition matching `cond`; returns that condition.
pub async fn wait_condition(tb: &Testbed, ns: &str, name: &str, cond: &Cond) -> Condition {
    let bp = wait_pipeline(tb, ns, name, cond).await;
    condition(&bp, &cond.type_).expect("the condition just matched")
}

/// Waits up to 60 s for exactly `n` jobs of `pipeline`; returns them.
pub async fn wait_jobs(tb: &Testbed, ns: &str, pipeline: &str, n: usize) -> Vec<BlockJob> {
    wait_for(&format!("{n} jobs"), Duration::from_secs(60), || async {
        let jobs = jobs(tb, ns, pipeline).await;
        (jobs.len() == n).then_some(jobs)
    })
    .await
}

/// Waits up to 30 s for an Event on `pipeline` with `reason`; returns its note.
pub async fn wait_event(tb: &Testbed, ns: &str, pipeline: &str, reason: &str) -> String {
    let what = format!("a {reason} Event");
    wait_event_where(tb, ns, pipeline, &what, |_, r, _| r == reason)
        .await
        .2
}

/// Waits for an Event on `pipeline` (type, reason, note) that `matches`: the operator posts
/// Events after the status they go with, so they can trail a condition a test waited for.
pub async fn wait_event_where(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
    what: &str,
    matches: impl Fn(&str, &str, &str) -> bool,
) -> (String, String, String) {
    wait_for(
        &format!("{what} on {pipeline}"),
        Duration::from_secs(30),
        || async {
            pipeline_events(tb, ns, pipeline)
                .await
                .into_iter()
                .find(|(t, r, n)| matches(t, r, n))
        },
    )
    .await
}
