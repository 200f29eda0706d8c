//! What a pipeline may make the operator do on its behalf, set by whoever runs the operator:
//! which images builder pods may run, under which ServiceAccounts, and which Secrets a
//! pipeline may name. Without it, anyone who may create a BlockPipeline gets, through the
//! operator, pods running any image as any ServiceAccount of the namespace, and any Secret of
//! the namespace sent to any Kafka brokers they name.

use blocksmith_crds::BlockPipelineSpec;
use k8s_openapi::api::core::v1::Secret;

/// Allow-lists for what pipelines name; an empty list allows anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Images, or prefixes of them (see [`image_allowed`]).
    pub builder_images: Vec<String>,
    pub builder_service_accounts: Vec<String>,
    /// A label (key, value) every Secret a pipeline names must carry.
    pub secret_label: Option<(String, String)>,
}

/// The ServiceAccount builder pods run as when `spec.builders.serviceAccountName` is unset.
pub const DEFAULT_BUILDER_SERVICE_ACCOUNT: &str = "blocksmith-builder";

impl Policy {
    /// The builder image and ServiceAccount of `spec`, against the allow-lists; the error
    /// names the field, what it holds and what is allowed.
    pub fn check_builders(&self, spec: &BlockPipelineSpec) -> Result<(), String> {
        let Some(b) = &spec.builders else {
            return Ok(());
        };
        if !self.builder_images.is_empty()
            && !self
                .builder_images
                .iter()
                .any(|a| image_allowed(a, &b.image))
        {
            return Err(format!(
                "spec.builders.image: {:?} is not an image the operator's policy allows \
                 (allowed: {}); use one of those, or ask whoever runs the operator to allow it",
                b.image,
                self.builder_images.join(", ")
            ));
        }
        let account = b
            .service_account_name
            .as_deref()
            .unwrap_or(DEFAULT_BUILDER_SERVICE_ACCOUNT);
        if !self.builder_service_accounts.is_empty()
            && !self.builder_service_accounts.iter().any(|a| a == account)
        {
            return Err(format!(
                "spec.builders.serviceAccountName: {account:?} is not a ServiceAccount the \
                 operator's policy lets builders run as (allowed: {})",
                self.builder_service_accounts.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether `secret`, named by `field` of a pipeline, may be used; the error says how to
    /// allow it.
    pub fn check_secret(&self, secret: &Secret, field: &str) -> Result<(), String> {
        let Some((key, value)) = &self.secret_label else {
            return Ok(());
        };
        let labels = secret.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(key)) == Some(value) {
            return Ok(());
        }
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        Err(format!(
            "{field}: secret {name:?} lacks the label {key}={value} that the operator's policy \
             requires of every Secret a pipeline names (so that a pipeline cannot send or mount \
             a Secret nobody meant for it); if pipelines may use it: kubectl label secret {name} \
             {key}={value}"
        ))
    }
}

/// Is `image` allowed by the entry `allowed`: `*` (any image), the image itself, a repository
/// (then any tag or digest of it: `repo` allows `repo:1.0` and `repo@sha256:…`, never
/// `repo-other`), or a prefix ending in `/`, `:` or `@`.
pub fn image_allowed(allowed: &str, image: &str) -> bool {
    if allowed == "*" || allowed == image {
        return true;
    }
    let Some(rest) = image.strip_prefix(allowed) else {
        return false;
    };
    allowed.ends_with(['/', ':', '@']) || rest.starts_with([':', '@'])
}

/// Every Secret `spec` names, with the field that names it, in spec order.
pub fn secret_references(spec: &BlockPipelineSpec) -> Vec<(String, String)> {
    let mut refs = Vec::new();
    if let Some(sasl) = &spec.kafka.sasl {
        let oauth = sasl.oauthbearer.as_ref();
        for (field, selector) in [
            (
                "spec.kafka.sasl.usernameSecretRef",
                sasl.username_secret_ref.as_ref(),
            ),
            (
                "spec.kafka.sasl.passwordSecretRef",
                sasl.password_secret_ref.as_ref(),
            ),
            (
                "spec.kafka.sasl.oauthbearer.clientIdSecretRef",
                oauth.map(|o| &o.client_id_secret_ref),
            ),
            (
                "spec.kafka.sasl.oauthbearer.clientSecretSecretRef",
                oauth.map(|o| &o.client_secret_secret_ref),
            ),
        ] {
            if let Some(selector) = selector {
                refs.push((field.to_string(), selector.name.clone()));
            }
        }
    }
    if let Some(tls) = &spec.kafka.tls {
        for (field, selector) in [
            ("spec.kafka.tls.caSecretRef", &tls.ca_secret_ref),
            (
                "spec.kafka.tls.certificateSecretRef",
                &tls.certificate_secret_ref,
            ),
            ("spec.kafka.tls.keySecretRef", &tls.key_secret_ref),
        ] {
            if let Some(selector) = selector {
                refs.push((field.to_string(), selector.name.clone()));
            }
        }
    }
    if let Some(c) = &spec.output.credentials_secret_ref {
        refs.push((
            "spec.output.credentialsSecretRef".to_string(),
            c.name.clone(),
        ));
    }
    if let Some(b) = &spec.builders {
        for (i, e) in b.env.iter().enumerate() {
            let secret = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            if let Some(s) = secret {
                refs.push((
                    format!("spec.builders.env[{i}].valueFrom.secretKeyRef"),
                    s.name.clone(),
                ));
            }
        }
    }
    refs
}

/// Parses `key=value`, the form of `--secret-label`.
pub fn parse_label(label: &str) -> Result<(String, String), String> {
    match label.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{label:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_crds::BlockPipeline;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> BlockPipelineSpec {
        let mut spec = json!({
            "kafka": {"bootstrapServers": "k:9092", "topic": "t"},
            "output": {"url": "s3://b/p"},
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let bp: BlockPipeline = serde_json::from_value(json!({
            "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline",
            "metadata": {"name": "p"}, "spec": spec,
        }))
        .unwrap();
        bp.spec
    }

    #[test]
    fn images_match_whole_repositories_tags_digests_and_prefixes_only() {
        let repo = "ghcr.io/blocksmith/blocksmith";
        assert!(image_allowed(repo, repo));
        assert!(image_allowed(repo, "ghcr.io/blocksmith/blocksmith:0.1.0"));
        assert!(image_allowed(
            repo,
            "ghcr.io/blocksmith/blocksmith@sha256:ab"
        ));
        assert!(!image_allowed(repo, "ghcr.io/blocksmith/blocksmith-evil:1"));
        assert!(!image_allowed(repo, "docker.io/evil/blocksmith"));
        assert!(image_allowed(
            "registry.local/team-a/",
            "registry.local/team-a/x:1"
        ));
        assert!(!image_allowed(
            "registry.local/team-a/",
            "registry.local/team-b/x:1"
        ));
        assert!(image_allowed("repo@sha256:ab", "repo@sha256:ab"));
        assert!(!image_allowed("repo@sha256:ab", "repo@sha256:cd"));
        assert!(image_allowed("*", "anything"));
    }

    #[test]
    fn builders_outside_the_allow_lists_are_refused_naming_the_field() {
        let policy = Policy {
            builder_images: vec!["ghcr.io/blocksmith/blocksmith".into()],
            builder_service_accounts: vec![DEFAULT_BUILDER_SERVICE_ACCOUNT.into()],
            secret_label: None,
        };
        let ok = spec(json!({"builders": {"image": "ghcr.io/blocksmith/blocksmith:0.1.0"}}));
        assert_eq!(policy.check_builders(&ok), Ok(()));
        assert_eq!(policy.check_builders(&spec(json!({}))), Ok(()));
        let image = spec(json!({"builders": {"image": "evil/miner:1"}}));
        let err = policy.check_builders(&image).unwrap_err();
        assert!(
            err.starts_with("spec.builders.image: \"evil/miner:1\""),
            "{err}"
        );
        let account = spec(json!({"builders": {
            "image": "ghcr.io/blocksmith/blocksmith:0.1.0", "serviceAccountName": "admin"}}));
        let err = policy.check_builders(&account).unwrap_err();
        assert!(
            err.starts_with("spec.builders.serviceAccountName: \"admin\""),
            "{err}"
        );
        // No policy: anything goes.
        assert_eq!(Policy::default().check_builders(&image), Ok(()));
        assert_eq!(Policy::default().check_builders(&account), Ok(()));
    }

    #[test]
    fn only_secrets_with_the_label_may_be_used() {
        let policy = Policy {
            secret_label: Some(("blocksmith.io/pipeline-secret".into(), "true".into())),
            ..Policy::default()
        };
        let secret = |labels: serde_json::Value| -> Secret {
            serde_json::from_value(json!({"metadata": {"name": "s", "labels": labels}})).unwrap()
        };
        let field = "spec.output.credentialsSecretRef";
        assert_eq!(
            policy.check_secret(
                &secret(json!({"blocksmith.io/pipeline-secret": "true"})),
                field
            ),
            Ok(())
        );
        for labels in [json!({}), json!({"blocksmith.io/pipeline-secret": "false"})] {
            let err = policy.check_secret(&secret(labels), field).unwrap_err();
            assert!(err.starts_with(field), "{err}");
            assert!(
                err.contains("kubectl label secret s blocksmith.io/pipeline-secret=true"),
                "{err}"
            );
        }
        assert_eq!(
            Policy::default().check_secret(&secret(json!({})), field),
            Ok(())
        );
    }

    #[test]
    fn the_oauth_clients_secrets_are_found_with_their_fields() {
        let s = spec(json!({
            "kafka": {"bootstrapServers": "k:9092", "topic": "t", "securityProtocol": "SASL_SSL",
                      "sasl": {"mechanism": "OAUTHBEARER", "oauthbearer": {
                          "tokenEndpointUrl": "https://sso/token",
                          "clientIdSecretRef": {"name": "oauth-id", "key": "id"},
                          "clientSecretSecretRef": {"name": "oauth", "key": "secret"}}}},
            "output": {"url": "s3://b/p"},
        }));
        assert_eq!(
            secret_references(&s),
            [
                ("spec.kafka.sasl.oauthbearer.clientIdSecretRef", "oauth-id"),
                ("spec.kafka.sasl.oauthbearer.clientSecretSecretRef", "oauth"),
            ]
            .map(|(f, n)| (f.to_string(), n.to_string()))
        );
    }

    #[test]
    fn every_secret_a_spec_names_is_found_with_its_field() {
        let s = spec(json!({
            "kafka": {"bootstrapServers": "k:9092", "topic": "t", "securityProtocol": "SASL_SSL",
                      "sasl": {"mechanism": "SCRAM-SHA-512",
                               "usernameSecretRef": {"name": "user", "key": "u"},
                               "passwordSecretRef": {"name": "pass", "key": "p"}},
                      "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"},
                              "certificateSecretRef": {"name": "user", "key": "user.crt"},
                              "keySecretRef": {"name": "user-key", "key": "user.key"}}},
            "output": {"url": "s3://b/p", "credentialsSecretRef": {"name": "s3"}},
            "builders": {"image": "i", "env": [
                {"name": "A", "value": "plain"},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}},
            ]},
        }));
        let refs = secret_references(&s);
        let refs: Vec<(&str, &str)> = refs.iter().map(|(f, n)| (f.as_str(), n.as_str())).collect();
        assert_eq!(
            refs,
            [
                ("spec.kafka.sasl.usernameSecretRef", "user"),
                ("spec.kafka.sasl.passwordSecretRef", "pass"),
                ("spec.kafka.tls.caSecretRef", "ca"),
                ("spec.kafka.tls.certificateSecretRef", "user"),
                ("spec.kafka.tls.keySecretRef", "user-key"),
                ("spec.output.credentialsSecretRef", "s3"),
                ("spec.builders.env[1].valueFrom.secretKeyRef", "other"),
            ]
        );
    }

    #[test]
    fn labels_parse_as_key_equals_value() {
        assert_eq!(
            parse_label("a.io/b=c"),
            Ok(("a.io/b".to_string(), "c".to_string()))
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
    }
}
