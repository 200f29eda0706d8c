//! Publishing a pipeline's status: written only when it changed, with Kubernetes Events for
//! condition transitions.

use blocksmith_crds::{BlockPipeline, BlockPipelineStatus, Reason};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use tracing::warn;

use crate::conditions::{self, Observed};
use crate::context::{Context, Error};
use crate::jobs::STATUS_MANAGER;

/// Writes the status when it changed, and records Events for condition transitions.
pub async fn publish(
    bp: &BlockPipeline,
    ctx: &Context,
    old: &BlockPipelineStatus,
    mut status: BlockPipelineStatus,
    observed: &Observed,
    now: Timestamp,
) -> Result<(), Error> {
    status.conditions =
        conditions::conditions(&old.conditions, observed, bp.metadata.generation, now);
    let ns = bp.namespace().unwrap_or_default();
    ctx.metrics.pipeline_status(
        &ns,
        &bp.name_any(),
        status
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str())),
        observed.problems.iter().map(|p| p.reason),
    );
    if status == *old {
        return Ok(());
    }
    let api: Api<BlockPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockPipeline",
        "status": status,
    });
    ctx.metrics.api_write("pipeline_status");
    api.patch_status(
        &bp.name_any(),
        &PatchParams::apply(STATUS_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    record(
        bp,
        ctx,
        transition_events(&old.conditions, &status.conditions),
    )
    .await;
    Ok(())
}

/// Publishes Events on the pipeline; a failure to publish is logged, never fatal.
pub async fn record(bp: &BlockPipeline, ctx: &Context, events: Vec<Event>) {
    for event in events {
        ctx.metrics.api_write("event");
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        if let Err(e) = recorder.publish(&event, &bp.object_ref(&())).await {
            warn!(error = %e, "publishing event");
        }
    }
}

/// The Warning a user gets when `spec.kafka.skipMissingData` let the pipeline continue past
/// offsets `[committed, low)` that retention deleted before they were written to a block.
pub fn skipped_data_event(partition: i32, committed: i64, low: i64) -> Event {
    Event {
        type_: EventType::Warning,
        reason: Reason::SkippedMissingData.into(),
        note: Some(format!(
            "partition {partition}: offsets [{committed}, {low}) ({} records) were deleted by retention before they were written to a block; continuing from offset {low} because spec.kafka.skipMissingData is true. Those records are lost",
            low - committed
        )),
        action: "Plan".into(),
        secondary: None,
    }
}

fn transition_events(old: &[Condition], new: &[Condition]) -> Vec<Event> {
    let mut events = Vec::new();
    let changed = |t: &str| {
        let o = conditions::find(old, t);
        let n = conditions::find(new, t)?;
        match o {
            Some(o) if o.status == n.status && o.reason == n.reason => None,
            _ => Some(n.clone()),
        }
    };
    if let Some(d) = changed(conditions::DEGRADED) {
        if d.status == "True" {
            events.push(Event {
                type_: EventType::Warning,
                reason: d.reason.clone(),
                note: Some(truncate(&d.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            });
        } else if conditions::find(old, conditions::DEGRADED).is_some() {
            events.push(Event {
                type_: EventType::Normal,
                reason: Reason::Recovered.into(),
                note: Some("the pipeline is healthy again".into()),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    if let Some(s) = changed(conditions::SUSPENDED)
        && conditions::find(old, conditions::SUSPENDED).is_some()
    {
        let (reason, note) = if s.status == "True" {
            (Reason::Suspended, "planning stopped; running jobs finish")
        } else {
            (Reason::Resumed, "planning resumed")
        };
        events.push(Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    events
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_data_event_names_the_partition_range_and_setting() {
        let e = skipped_data_event(3, 100, 2600);
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.reason, "SkippedMissingData");
        let note = e.note.unwrap();
        crate::testing::assert_mentions(
            &note,
            &[
                "partition 3",
                "[100, 2600)",
                "2500 records",
                "continuing from offset 2600",
                "spec.kafka.skipMissingData",
            ],
        );
        assert!(note.len() <= 1024, "Event notes are limited to 1 KiB");
    }
}
