//! What went wrong talking to Kafka, as the condition reason and message a user sees.

use blocksmith_crds::Reason;
use blocksmith_runtime::kafka::{ConnectionError, is_auth_failure};
use rdkafka::error::KafkaError as RdError;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka is unavailable: {0}")]
    Unavailable(String),
    #[error(
        "authentication to Kafka failed: {detail}. Check spec.kafka.securityProtocol and spec.kafka.sasl against the brokers' listener{credentials}"
    )]
    AuthenticationFailed {
        detail: String,
        /// Where the credentials come from, e.g. `, and the credentials in secret "x" (keys
        /// "user", "password")`; empty without SASL.
        credentials: String,
    },
    #[error(
        "topic {0:?} does not exist: create it, or correct spec.kafka.topic (the operator never creates topics)"
    )]
    TopicNotFound(String),
    #[error(
        "partitions {missing:?} are not in topic {topic:?} (it has {available}): correct spec.kafka.partitions"
    )]
    PartitionsNotFound {
        topic: String,
        missing: Vec<i32>,
        available: usize,
    },
    #[error(
        "Kafka refused the offset commit for group {group:?}: {reason}. The group must belong to this pipeline alone (no other consumers may join it)"
    )]
    CommitRefused { group: String, reason: String },
    /// Not a Kafka error: this operator replica cannot be sure it leads for as long as a
    /// commit may take, so it makes none (see `leader::Leadership`).
    #[error(
        "not committing: this operator replica has not renewed its leader lease recently enough to be sure it still leads for the next {0:?} (the Kafka timeout); the leader commits"
    )]
    NotLeading(std::time::Duration),
}

impl KafkaError {
    /// The condition reason users see.
    pub fn reason(&self) -> Reason {
        match self {
            KafkaError::Unavailable(_) => Reason::KafkaUnavailable,
            KafkaError::AuthenticationFailed { .. } => Reason::KafkaAuthenticationFailed,
            KafkaError::TopicNotFound(_) | KafkaError::PartitionsNotFound { .. } => {
                Reason::TopicNotFound
            }
            KafkaError::CommitRefused { .. } => Reason::CommitRefused,
            // Never a condition: a replica in doubt stops acting and writes no status.
            KafkaError::NotLeading(_) => Reason::KafkaUnavailable,
        }
    }
}

pub(super) fn unavailable(e: RdError) -> KafkaError {
    KafkaError::Unavailable(e.to_string())
}

/// What a failed request means, given the last error librdkafka reported for the client's
/// broker connections (`client`). A request that failed only says
/// "timed out"; the connection error says why (connection refused, TLS handshake, SASL
/// authentication), so it goes into the message, and an authentication failure gets its
/// own reason.
pub fn classify(
    request: &RdError,
    client: Option<&ConnectionError>,
    credentials: &str,
) -> KafkaError {
    if let Some(client) = client
        && is_auth_failure(client.code())
    {
        return KafkaError::AuthenticationFailed {
            detail: client.reason.clone(),
            credentials: credentials.to_string(),
        };
    }
    if is_auth_failure(request.rdkafka_error_code()) {
        return KafkaError::AuthenticationFailed {
            detail: request.to_string(),
            credentials: credentials.to_string(),
        };
    }
    match client {
        Some(client) => KafkaError::Unavailable(format!(
            "{request}; last broker connection error: {}",
            client.reason
        )),
        None => KafkaError::Unavailable(request.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;
    use crate::kafka::settings::credentials_description;
    use crate::kafka::settings::tests::selector;

    fn connection_error(code: RDKafkaErrorCode, reason: &str) -> ConnectionError {
        ConnectionError {
            error: RdError::Global(code),
            reason: reason.to_string(),
        }
    }

    fn timed_out() -> RdError {
        RdError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut)
    }

    #[test]
    fn an_authentication_error_names_the_settings_and_the_secret() {
        let creds = credentials_description(
            &selector("kafka-creds", "username"),
            &selector("kafka-creds", "password"),
        );
        let client = connection_error(
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: Authentication failed: Invalid username or password",
        );
        let e = classify(&timed_out(), Some(&client), &creds);
        assert_eq!(e.reason(), Reason::KafkaAuthenticationFailed);
        let message = e.to_string();
        for want in [
            "authentication to Kafka failed",
            "Invalid username or password",
            "spec.kafka.sasl",
            r#"secret "kafka-creds" (keys "username", "password")"#,
        ] {
            assert!(message.contains(want), "{want:?} not in {message:?}");
        }
    }

    #[test]
    fn other_failures_are_unavailable_with_the_connection_error() {
        let e = classify(&timed_out(), None, "");
        assert_eq!(e.reason(), Reason::KafkaUnavailable);
        let client = connection_error(
            RDKafkaErrorCode::BrokerTransportFailure,
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused",
        );
        let e = classify(&timed_out(), Some(&client), "");
        assert_eq!(e.reason(), Reason::KafkaUnavailable);
        assert!(e.to_string().contains("Connection refused"), "{e}");
        // A request that itself failed authentication.
        let e = classify(
            &RdError::MetadataFetch(RDKafkaErrorCode::SaslAuthenticationFailed),
            None,
            "",
        );
        assert_eq!(e.reason(), Reason::KafkaAuthenticationFailed);
    }

    #[test]
    fn refused_authorization_is_reported_as_an_authentication_failure() {
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            let e = classify(&RdError::MetadataFetch(code), None, "");
            assert_eq!(e.reason(), Reason::KafkaAuthenticationFailed, "{code:?}");
        }
    }

    #[test]
    fn topic_messages_say_what_to_do() {
        let e = KafkaError::TopicNotFound("orders".into());
        assert!(
            e.to_string()
                .contains("create it, or correct spec.kafka.topic"),
            "{e}"
        );
        let e = KafkaError::PartitionsNotFound {
            topic: "orders".into(),
            missing: vec![7],
            available: 4,
        };
        assert!(
            e.to_string().contains("correct spec.kafka.partitions"),
            "{e}"
        );
    }
}
