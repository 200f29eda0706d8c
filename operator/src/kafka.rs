//! The operator's view of Kafka: a topic's partitions, their watermarks, and the pipeline's
//! consumer-group offsets, read and committed without joining the group. Blocking calls with
//! timeouts; callers run them on the blocking pool.
//!
//! [`settings`] reads the connection settings from the pipeline and its Secrets, [`client`]
//! talks to the brokers, [`error`] says what went wrong. The client context and the check for
//! authentication failures are shared with the builder, in `blocksmith_runtime::kafka`.

pub mod client;
pub mod error;
pub mod settings;

pub use client::KafkaOffsets;
pub use error::{KafkaError, classify};
pub use settings::{
    KafkaConnection, connection, credentials_description, extensions_value,
    oauth_credentials_description, oauthbearer_properties,
};
