//! `external.metrics.k8s.io/v1beta1`, served over TLS for the API aggregator: each
//! pipeline's queue depth (claimable jobs) as `blocksmith-queue-depth{pipeline=<name>}`.
//!
//! Every replica answers (not only the leader), from a watch cache of the BlockPipelines it
//! may read: their `status.queueDepth`, which the leader writes at each reconcile. So an HPA's
//! request costs no API request, whatever the number of jobs. Callers are authenticated and
//! authorized as by any aggregated API server ([`crate::delegated_auth`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum_server::tls::TlsInfo;
use blocksmith_crds::BlockPipeline;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, reflector as reflect, watcher};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use serde_json::json;

use crate::builders::QUEUE_METRIC;
use crate::delegated_auth::{Caller, RequestHeaderAuth, Reviewer, bearer_token};

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

async fn discovery(
    State(served): State<Served>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    headers: HeaderMap,
) -> Response {
    // The aggregator checks the API's availability here with its client certificate and no
    // user; anyone else must be authenticated.
    let front_proxy = served.access.front_proxy(tls_info(&tls));
    if !front_proxy && let Err(refused) = served.access.caller(tls_info(&tls), &headers).await {
        return refused;
    }
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [{
            "name": QUEUE_METRIC, "singularName": "", "namespaced": true,
            "kind": "ExternalMetricValueList", "verbs": ["get"],
        }],
    }))
    .into_response()
}

/// Who may read: the API server's published request-header settings (re-read with the
/// certificate) and the reviews.
pub struct Access {
    request_header: RwLock<Option<RequestHeaderAuth>>,
    reviewer: Reviewer,
}

impl Access {
    pub fn new(client: kube::Client, request_header: Option<RequestHeaderAuth>) -> Self {
        Access {
            request_header: RwLock::new(request_header),
            reviewer: Reviewer::new(client),
        }
    }

    fn request_header(&self) -> Option<RequestHeaderAuth> {
        self.request_header.read().expect("access lock").clone()
    }

    /// Whether the request comes from the API server's front proxy (its client certificate,
    /// verified against the CA by the TLS listener, with an allowed name).
    fn front_proxy(&self, tls: Option<&TlsInfo>) -> bool {
        let (Some(auth), Some(peer)) = (
            self.request_header(),
            tls.and_then(|t| t.peer_certificates.first()),
        ) else {
            return false;
        };
        auth.check_front_proxy(peer).is_ok()
    }

    /// The authenticated caller, or the refusal to answer with.
    async fn caller(&self, tls: Option<&TlsInfo>, headers: &HeaderMap) -> Result<Caller, Response> {
        let peer = tls.and_then(|t| t.peer_certificates.first());
        if let (Some(auth), Some(peer)) = (self.request_header(), peer) {
            return auth
                .caller(peer, headers)
                .map_err(|e| status(StatusCode::UNAUTHORIZED, e));
        }
        let Some(token) = bearer_token(headers) else {
            return Err(status(
                StatusCode::UNAUTHORIZED,
                "no credentials: ask through the Kubernetes API (kubectl get --raw \
                 /apis/external.metrics.k8s.io/v1beta1/...) or with a bearer token"
                    .into(),
            ));
        };
        match self.reviewer.authenticate(token).await {
            Ok(Some(caller)) => Ok(caller),
            Ok(None) => Err(status(
                StatusCode::UNAUTHORIZED,
                "the bearer token is not valid".into(),
            )),
            Err(e) => Err(status(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reviewing the bearer token: {e}"),
            )),
        }
    }

    /// The caller, if they may read `metric` in `namespace`; otherwise the refusal.
    async fn authorize(
        &self,
        tls: Option<&TlsInfo>,
        headers: &HeaderMap,
        namespace: &str,
        metric: &str,
    ) -> Result<Caller, Response> {
        let caller = self.caller(tls, headers).await?;
        match self.reviewer.may_read(&caller, namespace, metric).await {
            Ok(true) => Ok(caller),
            Ok(false) => Err(status(
                StatusCode::FORBIDDEN,
                format!(
                    "{:?} may not list external metric {metric:?} in namespace {namespace:?} \
                     (RBAC: list on {metric} in API group external.metrics.k8s.io)",
                    caller.user
                ),
            )),
            Err(e) => Err(status(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reviewing access: {e}"),
            )),
        }
    }
}

fn tls_info(tls: &Option<Extension<Arc<TlsInfo>>>) -> Option<&TlsInfo> {
    tls.as_ref().map(|Extension(info)| info.as_ref())
}

/// What the server answers with.
#[derive(Clone)]
struct Served {
    depths: QueueDepths,
    access: Arc<Access>,
}

fn status(code: StatusCode, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

/// Where queue depths come from: a watch cache of BlockPipelines per watched namespace (one
/// for every namespace, under "", when the operator watches them all).
#[derive(Clone)]
pub struct QueueDepths {
    stores: Arc<BTreeMap<String, Store<BlockPipeline>>>,
}

impl QueueDepths {
    /// Watches the pipelines of `namespaces` (all namespaces when empty), in the background.
    pub fn watch(client: &kube::Client, namespaces: &[String]) -> Self {
        let apis: Vec<(String, Api<BlockPipeline>)> = if namespaces.is_empty() {
            vec![(String::new(), Api::all(client.clone()))]
        } else {
            namespaces
                .iter()
                .map(|ns| (ns.clone(), Api::namespaced(client.clone(), ns)))
                .collect()
        };
        let stores = apis
            .into_iter()
            .map(|(namespace, api)| {
                let (reader, writer) = reflector::store();
                let updates = reflect(
                    writer,
                    watcher(api, watcher::Config::default())
                        .default_backoff()
                        .modify(|p| p.managed_fields_mut().clear()),
                )
                .for_each(|event| async move {
                    if let Err(e) = event {
                        tracing::warn!(error = %e, "watching BlockPipelines for queue depths");
                    }
                });
                tokio::spawn(updates);
                (namespace, reader)
            })
            .collect();
        QueueDepths {
            stores: Arc::new(stores),
        }
    }

    fn store(&self, namespace: &str) -> Option<&Store<BlockPipeline>> {
        self.stores.get(namespace).or_else(|| self.stores.get(""))
    }
}

/// Each pipeline of `namespace` (those `wanted`, or all) with its queue depth; a wanted
/// pipeline that does not exist (yet) has 0.
pub fn queue_depths<'a>(
    pipelines: impl IntoIterator<Item = &'a BlockPipeline>,
    namespace: &str,
    wanted: Option<&[String]>,
) -> BTreeMap<String, i64> {
    let mut depth: BTreeMap<String, i64> = wanted
        .into_iter()
        .flatten()
        .map(|p| (p.clone(), 0))
        .collect();
    for p in pipelines {
        let name = p.name_any();
        if p.namespace().as_deref() != Some(namespace) || wanted.is_some_and(|w| !w.contains(&name))
        {
            continue;
        }
        depth.insert(name, p.status.as_ref().map_or(0, |s| s.queue_depth));
    }
    depth
}

/// How long a request waits for a cache that has not listed its pipelines yet.
const SYNC_WAIT: Duration = Duration::from_secs(5);

async fn metric(
    State(served): State<Served>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<MetricQuery>,
) -> Response {
    if let Err(refused) = served
        .access
        .authorize(tls_info(&tls), &headers, &namespace, &name)
        .await
    {
        return refused;
    }
    let depths = &served.depths;
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
    let Some(store) = depths.store(&namespace) else {
        return status(
            StatusCode::NOT_FOUND,
            format!(
                "blocksmith does not watch namespace {namespace:?}: add it to the chart's \
                 builders.namespaces (the operator's --namespace)"
            ),
        );
    };
    if tokio::time::timeout(SYNC_WAIT, store.wait_until_ready())
        .await
        .is_err()
    {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the BlockPipelines of {namespace:?} are not listed yet"),
        );
    }
    let pipelines = store.state();
    let depth = queue_depths(
        pipelines.iter().map(|p| p.as_ref()),
        &namespace,
        wanted.as_deref(),
    );
    let now = Timestamp::now();
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

fn router(served: Served) -> axum::Router {
    axum::Router::new()
        .route("/apis/external.metrics.k8s.io/v1beta1", get(discovery))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(metric),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(served)
}

/// How often the serving certificate (from files, which cert-manager renews in place
/// through the mounted Secret) and the API server's request-header settings are read again.
const RELOAD: Duration = Duration::from_secs(60);

/// The serving certificate and key (PEM).
struct ServingCertificate {
    dir: Option<PathBuf>,
    self_signed: (String, String),
}

impl ServingCertificate {
    fn new(dir: Option<PathBuf>, addr: SocketAddr) -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec![
            "blocksmith-external-metrics".to_string(),
            addr.ip().to_string(),
        ])?;
        Ok(ServingCertificate {
            dir,
            self_signed: (cert.cert.pem(), cert.signing_key.serialize_pem()),
        })
    }

    fn read(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok(match &self.dir {
            Some(dir) => (
                std::fs::read(dir.join("tls.crt"))?,
                std::fs::read(dir.join("tls.key"))?,
            ),
            None => (
                self.self_signed.0.clone().into_bytes(),
                self.self_signed.1.clone().into_bytes(),
            ),
        })
    }
}

/// TLS with `certificate`, asking for a client certificate of the front proxy's CA (without
/// requiring one: direct callers show a bearer token instead).
fn tls_config(
    certificate: &ServingCertificate,
    request_header: Option<&RequestHeaderAuth>,
) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key) = certificate.read()?;
    let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let client_cas = request_header.map(RequestHeaderAuth::ca_certificates);
    let mut config = match client_cas.filter(|cas| !cas.is_empty()) {
        Some(cas) => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots.add(ca)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the API over TLS until the process ends: with the certificate and key in
/// `certificate_dir` (`tls.crt`, `tls.key`, a `kubernetes.io/tls` Secret mounted), or
/// without one a self-signed certificate (which only an APIService with
/// `insecureSkipTLSVerify` accepts). Both it and the API server's request-header settings
/// are read again every minute.
pub async fn serve(
    addr: SocketAddr,
    client: kube::Client,
    depths: QueueDepths,
    certificate_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let certificate = ServingCertificate::new(certificate_dir, addr)?;
    let request_header = RequestHeaderAuth::read(&client).await?;
    if request_header.is_none() {
        tracing::warn!(
            "the API server publishes no front-proxy CA (kube-system/extension-apiserver-authentication): \
             only bearer tokens authenticate, and HPA requests through the aggregator are refused"
        );
    }
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls_config(
        &certificate,
        request_header.as_ref(),
    )?));
    let access = Arc::new(Access::new(client.clone(), request_header));
    let (reloaded, reloaded_access) = (tls.clone(), access.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RELOAD).await;
            let request_header = match RequestHeaderAuth::read(&client).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the API server's request-header settings");
                    continue;
                }
            };
            match tls_config(&certificate, request_header.as_ref()) {
                Ok(config) => reloaded.reload_from_config(Arc::new(config)),
                Err(e) => tracing::warn!(error = %e, "reloading the external metrics certificate"),
            }
            *reloaded_access.request_header.write().expect("access lock") = request_header;
        }
    });
    tracing::info!(%addr, "serving external.metrics.k8s.io/v1beta1");
    let served = Served { depths, access };
    axum_server::bind_rustls(addr, tls)
        .serve(router(served).into_make_service())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(namespace: &str, name: &str, queue_depth: Option<i64>) -> BlockPipeline {
        let mut p: BlockPipeline = serde_json::from_value(json!({
            "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"kafka": {"bootstrapServers": "k:9092", "topic": "t"},
                     "output": {"url": "s3://b/p"}},
        }))
        .unwrap();
        p.status = queue_depth.map(|queue_depth| blocksmith_crds::BlockPipelineStatus {
            queue_depth,
            ..Default::default()
        });
        p
    }

    #[test]
    fn queue_depths_come_from_the_pipelines_status_in_the_namespace() {
        let pipelines = [
            pipeline("a", "orders", Some(3)),
            pipeline("a", "new", None),
            pipeline("b", "orders", Some(9)),
        ];
        let depths = |wanted: Option<&[String]>| queue_depths(&pipelines, "a", wanted);
        assert_eq!(
            depths(None),
            BTreeMap::from([("orders".to_string(), 3), ("new".to_string(), 0)])
        );
        let wanted = ["orders".to_string(), "missing".to_string()];
        assert_eq!(
            depths(Some(&wanted)),
            BTreeMap::from([("orders".to_string(), 3), ("missing".to_string(), 0)])
        );
    }

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
