//! `external.metrics.k8s.io/v1beta1`, served over TLS for the API aggregator: each
//! pipeline's queue depth (claimable jobs) as `blocksmith-queue-depth{pipeline=<name>}`.
//!
//! Every replica answers (not only the leader): the value is counted from the BlockJobs
//! at request time. Requests are not authenticated against the aggregator's client CA;
//! the values are job counts, and the listener should only be reachable by the API server.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use blocksmith_crds::BlockJob;
use blocksmith_crds::domain::LABEL_PIPELINE;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use serde::Deserialize;
use serde_json::json;

use crate::builders::QUEUE_METRIC;
use crate::lifecycle::is_claimable;

const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";

/// `pipeline=a`, `pipeline==a`, `pipeline in (a,b)`: the pipelines a selector asks for, or
/// `None` for every pipeline. Other keys are ignored (no pipeline has other labels).
pub fn selected_pipelines(selector: Option<&str>) -> Result<Option<Vec<String>>, String> {
    let Some(selector) = selector.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let mut wanted: Option<Vec<String>> = None;
    for term in split_terms(selector) {
        let term = term.trim();
        let values = if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k.trim() == "pipeline").then(|| vec![v.trim().to_string()])
        } else if let Some((k, rest)) = term.split_once(" in ") {
            let list = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'));
            let list = list.ok_or_else(|| format!("cannot parse selector term {term:?}"))?;
            (k.trim() == "pipeline")
                .then(|| list.split(',').map(|v| v.trim().to_string()).collect())
        } else {
            return Err(format!(
                "unsupported selector term {term:?}: use pipeline=<name>"
            ));
        };
        if let Some(values) = values {
            wanted = Some(match wanted {
                None => values,
                Some(prev) => prev.into_iter().filter(|p| values.contains(p)).collect(),
            });
        }
    }
    Ok(wanted)
}

/// Splits on commas outside parentheses.
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
}

#[derive(Deserialize)]
struct MetricQuery {
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
}

async fn discovery() -> Json<serde_json::Value> {
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [{
            "name": QUEUE_METRIC, "singularName": "", "namespaced": true,
            "kind": "ExternalMetricValueList", "verbs": ["get"],
        }],
    }))
}

fn status(code: StatusCode, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

async fn metric(
    State(client): State<kube::Client>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<MetricQuery>,
) -> Response {
    if name != QUEUE_METRIC {
        return status(
            StatusCode::NOT_FOUND,
            format!("no external metric {name:?}; this server serves {QUEUE_METRIC}"),
        );
    }
    let wanted = match selected_pipelines(q.label_selector.as_deref()) {
        Ok(w) => w,
        Err(e) => return status(StatusCode::BAD_REQUEST, e),
    };
    let api: Api<BlockJob> = Api::namespaced(client, &namespace);
    let jobs = match api
        .list(&ListParams::default().labels(LABEL_PIPELINE))
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("listing BlockJobs: {e}"),
            );
        }
    };
    let now = Timestamp::now();
    let mut depth: BTreeMap<String, i64> = BTreeMap::new();
    if let Some(w) = &wanted {
        for p in w {
            depth.insert(p.clone(), 0);
        }
    }
    for j in &jobs {
        let p = &j.spec.pipeline;
        if wanted.as_ref().is_some_and(|w| !w.contains(p)) {
            continue;
        }
        *depth.entry(p.clone()).or_default() += i64::from(is_claimable(j.status.as_ref(), now));
    }
    let items: Vec<_> = depth
        .into_iter()
        .map(|(pipeline, value)| {
            json!({
                "metricName": QUEUE_METRIC,
                "metricLabels": {"pipeline": pipeline},
                "timestamp": Time(now),
                "value": value.to_string(),
            })
        })
        .collect();
    Json(json!({
        "kind": "ExternalMetricValueList",
        "apiVersion": GROUP_VERSION,
        "metadata": {},
        "items": items,
    }))
    .into_response()
}

pub fn router(client: kube::Client) -> axum::Router {
    axum::Router::new()
        .route("/apis/external.metrics.k8s.io/v1beta1", get(discovery))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(metric),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(client)
}

/// Serves the API over TLS with a self-signed certificate made at start-up (the APIService
/// uses `insecureSkipTLSVerify`), until the process ends.
pub async fn serve(addr: SocketAddr, client: kube::Client) -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec![
        "blocksmith-external-metrics".to_string(),
        addr.ip().to_string(),
    ])?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert.cert.pem().into_bytes(),
        cert.signing_key.serialize_pem().into_bytes(),
    )
    .await?;
    tracing::info!(%addr, "serving external.metrics.k8s.io/v1beta1");
    axum_server::bind_rustls(addr, tls)
        .serve(router(client).into_make_service())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let sel = |s| selected_pipelines(Some(s));
        assert_eq!(selected_pipelines(None), Ok(None));
        assert_eq!(sel(""), Ok(None));
        assert_eq!(sel("pipeline=orders"), Ok(Some(vec!["orders".into()])));
        assert_eq!(sel("pipeline==orders"), Ok(Some(vec!["orders".into()])));
        assert_eq!(
            sel("pipeline in (a, b)"),
            Ok(Some(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            sel("pipeline in (a,b),pipeline=b"),
            Ok(Some(vec!["b".into()]))
        );
        assert_eq!(sel("team=x"), Ok(None));
        assert!(sel("pipeline").is_err());
    }
}
