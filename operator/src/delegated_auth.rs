//! Who is calling the external metrics API, and may they: what every aggregated API server
//! does. The Kubernetes API aggregator proves itself with a client certificate of its
//! front-proxy CA and names the user in request headers (`X-Remote-User`, `X-Remote-Group`);
//! a caller reaching the operator directly shows a bearer token, which a TokenReview checks.
//! Either way a SubjectAccessReview then decides, for `list` on the metric in the namespace
//! (group `external.metrics.k8s.io`), as for any other API. Where the CA and the header names
//! come from: the ConfigMap `kube-system/extension-apiserver-authentication`, which the API
//! server publishes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The aggregator's request-header authentication, as the API server publishes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestHeaderAuth {
    /// PEM: the CA of the aggregator's client certificate.
    pub client_ca: String,
    /// Common names the client certificate may have (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
}

const AUTHENTICATION_CONFIG_MAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");

impl RequestHeaderAuth {
    /// Reads the API server's published settings; `None` when it has no front proxy (its
    /// aggregator then sends no identity, and only bearer tokens authenticate).
    pub async fn read(client: &kube::Client) -> kube::Result<Option<Self>> {
        let (ns, name) = AUTHENTICATION_CONFIG_MAP;
        let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?;
        Ok(config_map
            .and_then(|c| c.data)
            .and_then(|data| Self::from_data(&data)))
    }

    /// From the ConfigMap's data (its list values are JSON arrays).
    pub fn from_data(data: &BTreeMap<String, String>) -> Option<Self> {
        let client_ca = data.get("requestheader-client-ca-file")?.clone();
        let list = |key: &str| -> Vec<String> {
            data.get(key)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default()
        };
        Some(RequestHeaderAuth {
            client_ca,
            allowed_names: list("requestheader-allowed-names"),
            username_headers: list("requestheader-username-headers"),
            group_headers: list("requestheader-group-headers"),
        })
    }

    /// The CA's certificates, for the TLS listener to verify client certificates with.
    pub fn ca_certificates(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.client_ca.as_bytes())
            .filter_map(Result::ok)
            .collect()
    }

    /// Whether a client certificate (already verified against the CA by the TLS listener;
    /// `peer` is its DER) is the aggregator's.
    pub fn check_front_proxy(&self, peer: &[u8]) -> Result<(), String> {
        let name = common_name(peer).ok_or("the client certificate has no common name")?;
        if !self.allowed_names.is_empty() && !self.allowed_names.contains(&name) {
            return Err(format!(
                "client certificate {name:?} is not one of the API server's front proxies ({})",
                self.allowed_names.join(", ")
            ));
        }
        Ok(())
    }

    /// The user a request from the aggregator (see [`Self::check_front_proxy`]) names.
    pub fn caller(&self, peer: &[u8], headers: &HeaderMap) -> Result<Caller, String> {
        self.check_front_proxy(peer)?;
        let values = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .flat_map(|n| headers.get_all(n.as_str()))
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect()
        };
        let user = values(&self.username_headers)
            .into_iter()
            .next()
            .ok_or("the front proxy named no user")?;
        Ok(Caller {
            user,
            groups: values(&self.group_headers),
        })
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate.subject().iter_common_name().next()?;
    name.as_str().ok().map(str::to_string)
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    pub user: String,
    pub groups: Vec<String>,
}

/// The bearer token of a request, if it has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// How long a review's answer is reused: the generic API server's defaults (10 s).
const REVIEW_TTL: Duration = Duration::from_secs(10);

/// Answers of reviews, by question, with when they were given.
type Reviews<K, V> = Mutex<HashMap<K, (Instant, V)>>;

/// TokenReviews and SubjectAccessReviews, their answers kept for [`REVIEW_TTL`] (an HPA asks
/// every 15 s, so this costs about one review per HPA per query).
pub struct Reviewer {
    client: kube::Client,
    tokens: Reviews<String, Option<Caller>>,
    decisions: Reviews<(Caller, String, String), bool>,
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Self {
        Reviewer {
            client,
            tokens: Mutex::default(),
            decisions: Mutex::default(),
        }
    }

    /// The caller `token` authenticates, or `None`.
    pub async fn authenticate(&self, token: &str) -> kube::Result<Option<Caller>> {
        if let Some(caller) = fresh(&self.tokens, &token.to_string()) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?
            .status;
        let caller = status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| {
                Some(Caller {
                    user: u.username?,
                    groups: u.groups.unwrap_or_default(),
                })
            });
        remember(&self.tokens, token.to_string(), caller.clone());
        Ok(caller)
    }

    /// Whether `caller` may read external metric `metric` in `namespace`: `list`, as the
    /// API server itself judges a request for a metric's values (a collection).
    pub async fn may_read(
        &self,
        caller: &Caller,
        namespace: &str,
        metric: &str,
    ) -> kube::Result<bool> {
        let key = (caller.clone(), namespace.to_string(), metric.to_string());
        if let Some(allowed) = fresh(&self.decisions, &key) {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.user.clone()),
                groups: Some(caller.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some("list".into()),
                    group: Some("external.metrics.k8s.io".into()),
                    version: Some("v1beta1".into()),
                    resource: Some(metric.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?
            .status
            .is_some_and(|s| s.allowed);
        remember(&self.decisions, key, allowed);
        Ok(allowed)
    }
}

fn fresh<K: std::hash::Hash + Eq, V: Clone>(cache: &Reviews<K, V>, key: &K) -> Option<V> {
    let cache = cache.lock().expect("review cache");
    cache
        .get(key)
        .filter(|(at, _)| at.elapsed() < REVIEW_TTL)
        .map(|(_, v)| v.clone())
}

fn remember<K: std::hash::Hash + Eq, V>(cache: &Reviews<K, V>, key: K, v: V) {
    let mut cache = cache.lock().expect("review cache");
    cache.retain(|_, (at, _)| at.elapsed() < REVIEW_TTL);
    cache.insert(key, (Instant::now(), v));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(common_name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn auth() -> RequestHeaderAuth {
        RequestHeaderAuth::from_data(&BTreeMap::from([
            ("requestheader-client-ca-file".into(), "PEM".into()),
            (
                "requestheader-allowed-names".into(),
                r#"["front-proxy-client"]"#.into(),
            ),
            (
                "requestheader-username-headers".into(),
                r#"["X-Remote-User"]"#.into(),
            ),
            (
                "requestheader-group-headers".into(),
                r#"["X-Remote-Group"]"#.into(),
            ),
        ]))
        .unwrap()
    }

    #[test]
    fn the_front_proxy_names_the_user_in_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("X-Remote-User", "alice".parse().unwrap());
        headers.append("X-Remote-Group", "team-a".parse().unwrap());
        headers.append("X-Remote-Group", "system:authenticated".parse().unwrap());
        assert_eq!(
            auth().caller(&certificate("front-proxy-client"), &headers),
            Ok(Caller {
                user: "alice".into(),
                groups: vec!["team-a".into(), "system:authenticated".into()],
            })
        );
        // Another certificate of the CA is not the front proxy; no user named is no caller.
        let err = auth()
            .caller(&certificate("someone"), &headers)
            .unwrap_err();
        assert!(err.contains("\"someone\" is not one of"), "{err}");
        assert!(
            auth()
                .caller(&certificate("front-proxy-client"), &HeaderMap::new())
                .is_err()
        );
    }

    #[test]
    fn no_client_ca_published_means_no_request_header_authentication() {
        assert_eq!(RequestHeaderAuth::from_data(&BTreeMap::new()), None);
        assert!(auth().allowed_names == ["front-proxy-client"]);
    }

    #[test]
    fn bearer_tokens() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
