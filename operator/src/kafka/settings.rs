//! Connection settings from a pipeline's spec, with its Secrets read.

use std::fmt;

use blocksmith_crds::domain::default_consumer_group;
use blocksmith_crds::pipeline::OAuthBearerSpec;
use blocksmith_crds::{BlockPipeline, Reason};
use blocksmith_runtime::kafka::PropertyNames;
use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};
use kube::ResourceExt;
use kube::api::Api;

use crate::conditions::Problem;

/// Connection settings: bootstrap servers plus librdkafka properties (security, SASL, TLS),
/// with secrets already resolved. Its `Debug` names the properties without their values.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KafkaConnection {
    pub bootstrap_servers: String,
    pub group: String,
    pub properties: Vec<(String, String)>,
    /// Where the SASL credentials come from, for messages (empty without SASL).
    pub credentials: String,
}

impl fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group", &self.group)
            .field("properties", &PropertyNames(&self.properties))
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Connection settings with secrets resolved. A missing secret is a problem the user fixes.
pub async fn connection(
    bp: &BlockPipeline,
    client: &kube::Client,
) -> Result<KafkaConnection, Problem> {
    let k = &bp.spec.kafka;
    let ns = bp.namespace().unwrap_or_default();
    let group = k
        .consumer_group
        .clone()
        .unwrap_or_else(|| default_consumer_group(&ns, &bp.name_any()));
    let mut properties = Vec::new();
    properties.push((
        "security.protocol".to_string(),
        k.security_protocol.librdkafka_value().to_string(),
    ));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut credentials = String::new();
    if let Some(sasl) = &k.sasl {
        properties.push(("sasl.mechanism".into(), sasl.mechanism.to_string()));
        if let Some(oauth) = &sasl.oauthbearer {
            credentials = oauth_credentials_description(oauth);
            properties.extend(oauthbearer_properties(oauth));
            for (property, selector, field) in [
                (
                    "sasl.oauthbearer.client.id",
                    &oauth.client_id_secret_ref,
                    "spec.kafka.sasl.oauthbearer.clientIdSecretRef",
                ),
                (
                    "sasl.oauthbearer.client.secret",
                    &oauth.client_secret_secret_ref,
                    "spec.kafka.sasl.oauthbearer.clientSecretSecretRef",
                ),
            ] {
                properties.push((
                    property.into(),
                    secret_value(&secrets, selector, field).await?,
                ));
            }
        }
        if let (Some(user), Some(password)) = (&sasl.username_secret_ref, &sasl.password_secret_ref)
        {
            credentials = credentials_description(user, password);
            properties.push((
                "sasl.username".into(),
                secret_value(&secrets, user, "spec.kafka.sasl.usernameSecretRef").await?,
            ));
            properties.push((
                "sasl.password".into(),
                secret_value(&secrets, password, "spec.kafka.sasl.passwordSecretRef").await?,
            ));
        }
    }
    let tls = k.tls.as_ref();
    for (property, selector, field) in [
        (
            "ssl.ca.pem",
            tls.and_then(|t| t.ca_secret_ref.as_ref()),
            "spec.kafka.tls.caSecretRef",
        ),
        (
            "ssl.certificate.pem",
            tls.and_then(|t| t.certificate_secret_ref.as_ref()),
            "spec.kafka.tls.certificateSecretRef",
        ),
        (
            "ssl.key.pem",
            tls.and_then(|t| t.key_secret_ref.as_ref()),
            "spec.kafka.tls.keySecretRef",
        ),
    ] {
        if let Some(selector) = selector {
            properties.push((
                property.into(),
                secret_value(&secrets, selector, field).await?,
            ));
        }
    }
    Ok(KafkaConnection {
        bootstrap_servers: k.bootstrap_servers.clone(),
        group,
        properties,
        credentials,
    })
}

/// `, and the credentials in secret "kafka" (keys "username", "password")`, naming both
/// secrets when they differ.
pub fn credentials_description(user: &SecretKeySelector, password: &SecretKeySelector) -> String {
    if user.name == password.name {
        format!(
            ", and the credentials in secret {:?} (keys {:?}, {:?})",
            user.name, user.key, password.key
        )
    } else {
        format!(
            ", and the credentials in secrets {:?} (key {:?}) and {:?} (key {:?})",
            user.name, user.key, password.name, password.key
        )
    }
}

/// The librdkafka properties of an OIDC client-credentials grant (librdkafka's own
/// `sasl.oauthbearer.method=oidc`, which fetches the token and refreshes it before it
/// expires), without the client id and secret.
pub fn oauthbearer_properties(oauth: &OAuthBearerSpec) -> Vec<(String, String)> {
    let mut properties = vec![
        ("sasl.oauthbearer.method".to_string(), "oidc".to_string()),
        (
            "sasl.oauthbearer.token.endpoint.url".to_string(),
            oauth.token_endpoint_url.clone(),
        ),
    ];
    if let Some(scope) = &oauth.scope {
        properties.push(("sasl.oauthbearer.scope".into(), scope.clone()));
    }
    if !oauth.extensions.is_empty() {
        properties.push((
            "sasl.oauthbearer.extensions".into(),
            extensions_value(&oauth.extensions),
        ));
    }
    properties
}

/// librdkafka's `sasl.oauthbearer.extensions`: `key=value,key=value`.
pub fn extensions_value(extensions: &std::collections::BTreeMap<String, String>) -> String {
    extensions
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `, and the OAuth client (spec.kafka.sasl.oauthbearer) in secret "oauth" (keys "id",
/// "secret") at token endpoint "https://…"`.
pub fn oauth_credentials_description(oauth: &OAuthBearerSpec) -> String {
    let (id, secret) = (&oauth.client_id_secret_ref, &oauth.client_secret_secret_ref);
    let secrets = if id.name == secret.name {
        format!("secret {:?} (keys {:?}, {:?})", id.name, id.key, secret.key)
    } else {
        format!(
            "secrets {:?} (key {:?}) and {:?} (key {:?})",
            id.name, id.key, secret.name, secret.key
        )
    };
    format!(
        ", and the OAuth client of spec.kafka.sasl.oauthbearer in {secrets} at token endpoint {:?}",
        oauth.token_endpoint_url
    )
}

async fn secret_value(
    secrets: &Api<Secret>,
    sel: &SecretKeySelector,
    field: &str,
) -> Result<String, Problem> {
    let problem = |what: String| Problem {
        reason: Reason::SecretNotFound,
        message: format!("{field}: {what}"),
    };
    let secret = secrets
        .get_opt(&sel.name)
        .await
        .map_err(|e| problem(format!("reading secret {:?}: {e}", sel.name)))?
        .ok_or_else(|| problem(format!("secret {:?} not found", sel.name)))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&sel.key))
        .ok_or_else(|| problem(format!("secret {:?} has no key {:?}", sel.name, sel.key)))?;
    String::from_utf8(bytes.0.clone()).map_err(|_| {
        problem(format!(
            "secret {:?} key {:?} is not UTF-8",
            sel.name, sel.key
        ))
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::kafka) fn selector(name: &str, key: &str) -> SecretKeySelector {
        SecretKeySelector {
            name: name.into(),
            key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn two_secrets_are_both_named() {
        let creds = credentials_description(&selector("u", "user"), &selector("p", "pass"));
        assert_eq!(
            creds,
            r#", and the credentials in secrets "u" (key "user") and "p" (key "pass")"#
        );
    }

    #[test]
    fn an_oauth_client_is_librdkafkas_oidc_grant_and_its_secrets_are_named() {
        let oauth: OAuthBearerSpec = serde_json::from_value(serde_json::json!({
            "tokenEndpointUrl": "https://sso/token",
            "clientIdSecretRef": {"name": "oauth", "key": "id"},
            "clientSecretSecretRef": {"name": "oauth", "key": "secret"},
            "scope": "kafka",
            "extensions": {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"},
        }))
        .unwrap();
        assert_eq!(
            oauthbearer_properties(&oauth),
            [
                ("sasl.oauthbearer.method", "oidc"),
                ("sasl.oauthbearer.token.endpoint.url", "https://sso/token"),
                ("sasl.oauthbearer.scope", "kafka"),
                (
                    "sasl.oauthbearer.extensions",
                    "identityPoolId=pool-2,logicalCluster=lkc-1"
                ),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(
            oauth_credentials_description(&oauth),
            r#", and the OAuth client of spec.kafka.sasl.oauthbearer in secret "oauth" (keys "id", "secret") at token endpoint "https://sso/token""#
        );
    }
}
