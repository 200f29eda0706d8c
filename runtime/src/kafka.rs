//! What both binaries need around librdkafka: a client context that keeps the errors
//! librdkafka reports for the broker connections (apart from the requests they fail), and
//! which errors mean the brokers refused the credentials or the ACLs forbid the request.

use std::fmt;
use std::sync::{Mutex, MutexGuard};

use rdkafka::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Whether `code` says the brokers refused who the client is (authentication) or what it asked
/// for (authorization): retrying will not help until the credentials or ACLs change.
pub fn is_auth_failure(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
}

/// Whether the client will not recover from `error` by itself: an authentication or
/// authorization failure, or a fatal consumer error.
pub fn is_unrecoverable(error: &KafkaError) -> bool {
    is_auth_failure(error.rdkafka_error_code())
        || matches!(error, KafkaError::MessageConsumptionFatal(_))
}

/// librdkafka properties shown by name only: their values may be credentials (a SASL
/// password, a private key), which must not reach a log through a `Debug` format.
pub struct PropertyNames<'a>(pub &'a [(String, String)]);

impl fmt::Debug for PropertyNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

/// An error librdkafka reported, with its explanation.
#[derive(Clone, Debug)]
pub struct ConnectionError {
    pub error: KafkaError,
    /// e.g. `127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused`.
    pub reason: String,
}

impl ConnectionError {
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        self.error.rdkafka_error_code()
    }
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error, self.reason)
    }
}

/// A client context that logs and keeps the errors librdkafka reports for the client's
/// connections, so that a request that only failed with "timed out", or a read that stalled,
/// can say why. Those errors reach the context only while the client is polled.
#[derive(Default)]
pub struct ConnectionErrors {
    noted: Mutex<Noted>,
}

#[derive(Default)]
struct Noted {
    latest: Option<ConnectionError>,
    cause: Option<ConnectionError>,
    unrecoverable: Option<KafkaError>,
}

impl ConnectionErrors {
    /// Logs and keeps `error`; also for errors that a request or a poll returned.
    pub fn note(&self, error: &KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error");
        let noted = ConnectionError {
            error: error.clone(),
            reason: reason.to_string(),
        };
        let mut kept = self.noted();
        // "1/1 brokers are down" follows the error that says why: keep that one as the cause.
        if !(noted.code() == Some(RDKafkaErrorCode::AllBrokersDown) && kept.cause.is_some()) {
            kept.cause = Some(noted.clone());
        }
        kept.latest = Some(noted);
    }

    /// The last error noted, taken: it is not reported twice.
    pub fn take_latest(&self) -> Option<ConnectionError> {
        self.noted().latest.take()
    }

    /// The error that says why the connections fail: the last one noted, except that "all
    /// brokers are down" does not replace the error before it.
    pub fn cause(&self) -> Option<ConnectionError> {
        self.noted().cause.clone()
    }

    /// The last error the client reported that it will not recover from (see
    /// [`is_unrecoverable`]), taken.
    pub fn take_unrecoverable(&self) -> Option<KafkaError> {
        self.noted().unrecoverable.take()
    }

    /// Forgets every error noted: the brokers answered.
    pub fn clear(&self) {
        *self.noted() = Noted::default();
    }

    fn noted(&self) -> MutexGuard<'_, Noted> {
        self.noted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for ConnectionErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.note(&error, reason);
        if is_unrecoverable(&error) {
            self.noted().unrecoverable = Some(error);
        }
    }
}

impl ConsumerContext for ConnectionErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_names_show_no_value() {
        let properties = [("sasl.password", "hunter2"), ("ssl.key.pem", "-----BEGIN")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let shown = format!("{:?}", PropertyNames(&properties));
        assert_eq!(shown, r#"["sasl.password", "ssl.key.pem"]"#);
    }

    #[test]
    fn authentication_and_authorization_failures_are_auth_failures() {
        for (code, auth) in [
            (RDKafkaErrorCode::Authentication, true),
            (RDKafkaErrorCode::SaslAuthenticationFailed, true),
            (RDKafkaErrorCode::TopicAuthorizationFailed, true),
            (RDKafkaErrorCode::ClusterAuthorizationFailed, true),
            (RDKafkaErrorCode::GroupAuthorizationFailed, false),
            (RDKafkaErrorCode::BrokerTransportFailure, false),
            (RDKafkaErrorCode::AllBrokersDown, false),
            (RDKafkaErrorCode::OperationTimedOut, false),
            (RDKafkaErrorCode::UnknownTopicOrPartition, false),
        ] {
            assert_eq!(is_auth_failure(Some(code)), auth, "{code:?}");
            assert_eq!(
                is_unrecoverable(&KafkaError::MetadataFetch(code)),
                auth,
                "{code:?}"
            );
        }
        assert!(!is_auth_failure(None));
        assert!(is_unrecoverable(&KafkaError::MessageConsumptionFatal(
            RDKafkaErrorCode::Fatal
        )));
    }

    fn report(errors: &ConnectionErrors, code: RDKafkaErrorCode, reason: &str) {
        errors.error(KafkaError::Global(code), reason);
    }

    #[test]
    fn all_brokers_down_does_not_hide_why() {
        let errors = ConnectionErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "Connection refused",
        );
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        assert_eq!(errors.cause().unwrap().reason, "Connection refused");
        let latest = errors.take_latest().unwrap();
        assert_eq!(latest.code(), Some(RDKafkaErrorCode::AllBrokersDown));
        assert!(
            latest.to_string().ends_with(": 1/1 brokers are down"),
            "{latest}"
        );
        assert!(errors.take_latest().is_none(), "taken");
        // With nothing before it, "all brokers are down" is the cause.
        errors.clear();
        assert!(errors.cause().is_none());
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        assert_eq!(errors.cause().unwrap().reason, "1/1 brokers are down");
    }

    #[test]
    fn unrecoverable_errors_are_kept_until_taken() {
        let errors = ConnectionErrors::default();
        report(&errors, RDKafkaErrorCode::BrokerTransportFailure, "refused");
        assert!(errors.take_unrecoverable().is_none());
        report(&errors, RDKafkaErrorCode::Authentication, "bad password");
        assert_eq!(
            errors
                .take_unrecoverable()
                .and_then(|e| e.rdkafka_error_code()),
            Some(RDKafkaErrorCode::Authentication)
        );
        assert!(errors.take_unrecoverable().is_none());
        // Noting an error a request returned is no report from the client.
        errors.note(
            &KafkaError::MetadataFetch(RDKafkaErrorCode::Authentication),
            "consuming",
        );
        assert!(errors.take_unrecoverable().is_none());
    }
}
