//! A topic's id (KIP-516): what tells a topic from another of the same name, deleted and
//! created again, whose offsets start over with other records.
//!
//! rdkafka does not expose topic ids; librdkafka's `DescribeTopics` admin request reports
//! them, and any client handle (a consumer too) can send it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::ptr;
use std::time::Duration;

use rdkafka::bindings::{
    rd_kafka_AdminOptions_destroy, rd_kafka_AdminOptions_new, rd_kafka_AdminOptions_set_broker,
    rd_kafka_AdminOptions_set_request_timeout, rd_kafka_AdminOptions_t, rd_kafka_DescribeTopics,
    rd_kafka_DescribeTopics_result_topics, rd_kafka_TopicCollection_destroy,
    rd_kafka_TopicCollection_of_topic_names, rd_kafka_TopicCollection_t,
    rd_kafka_TopicDescription_error, rd_kafka_TopicDescription_name,
    rd_kafka_TopicDescription_topic_id, rd_kafka_Uuid_base64str,
    rd_kafka_Uuid_least_significant_bits, rd_kafka_Uuid_most_significant_bits, rd_kafka_admin_op_t,
    rd_kafka_error_code, rd_kafka_event_DescribeTopics_result, rd_kafka_event_destroy,
    rd_kafka_event_error, rd_kafka_event_t, rd_kafka_queue_destroy, rd_kafka_queue_new,
    rd_kafka_queue_poll, rd_kafka_queue_t,
};
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaRespErr;

/// The id of `topic` as the brokers report it, in the base64 form Kafka's own tools print,
/// or `None` when they report none (brokers before Kafka 2.8 answer with zeros). Fetches the
/// topic's metadata to find a broker to ask; callers that just fetched it use
/// [`topic_id_from`] with [`any_broker`] of it, saving that round trip.
pub fn topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<String>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    if let Some(err) = metadata.topics().iter().find_map(|t| t.error()) {
        return Err(KafkaError::MetadataFetch(err.into()));
    }
    topic_id_from(client, topic, any_broker(&metadata)?, timeout)
}

/// A broker of `metadata` to send `DescribeTopics` to. librdkafka sends it to the controller
/// unless told which broker, and the mock cluster names none: any broker answers it.
pub fn any_broker(metadata: &Metadata) -> Result<i32, KafkaError> {
    metadata
        .brokers()
        .first()
        .map(|b| b.id())
        .ok_or(KafkaError::MetadataFetch(
            RDKafkaErrorCode::BrokerNotAvailable,
        ))
}

/// [`topic_id`], asked of `broker` (see [`any_broker`]).
pub fn topic_id_from<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    broker: i32,
    timeout: Duration,
) -> Result<Option<String>, KafkaError> {
    // DescribeTopics is a metadata request.
    let failed = |code: RDKafkaErrorCode| Err(KafkaError::MetadataFetch(code));
    let Ok(name) = CString::new(topic) else {
        return failed(RDKafkaErrorCode::InvalidTopic);
    };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: `rk` is the client's live handle for this whole call. Every object created
    // here is owned by a guard that destroys it once, after the last use of anything it
    // owns: the descriptions read belong to the event, which outlives their use.
    unsafe {
        let mut names = [name.as_ptr()];
        let topics = Owned(
            rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1),
            rd_kafka_TopicCollection_destroy
                as unsafe extern "C" fn(*mut rd_kafka_TopicCollection_t),
        );
        let options = Owned(
            rd_kafka_AdminOptions_new(rk, rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS),
            rd_kafka_AdminOptions_destroy as unsafe extern "C" fn(*mut rd_kafka_AdminOptions_t),
        );
        let mut errstr = [0 as c_char; 256];
        rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        rd_kafka_AdminOptions_set_broker(options.0, broker, errstr.as_mut_ptr(), errstr.len());
        let queue = Owned(
            rd_kafka_queue_new(rk),
            rd_kafka_queue_destroy as unsafe extern "C" fn(*mut rd_kafka_queue_t),
        );
        rd_kafka_DescribeTopics(rk, topics.0, options.0, queue.0);
        // The request's own timeout answers first; this one only guards against none.
        let event = Owned(
            rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1000)),
            rd_kafka_event_destroy as unsafe extern "C" fn(*mut rd_kafka_event_t),
        );
        if event.0.is_null() {
            return failed(RDKafkaErrorCode::OperationTimedOut);
        }
        let err = rd_kafka_event_error(event.0);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return failed(err.into());
        }
        let result = rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return failed(RDKafkaErrorCode::Fail);
        }
        let mut count = 0usize;
        let descriptions = rd_kafka_DescribeTopics_result_topics(result, &mut count);
        for i in 0..count {
            let description = *descriptions.add(i);
            if CStr::from_ptr(rd_kafka_TopicDescription_name(description)).to_bytes()
                != topic.as_bytes()
            {
                continue;
            }
            let error = rd_kafka_TopicDescription_error(description);
            if !error.is_null() {
                return failed(rd_kafka_error_code(error).into());
            }
            let id = rd_kafka_TopicDescription_topic_id(description);
            if id.is_null()
                || (rd_kafka_Uuid_most_significant_bits(id) == 0
                    && rd_kafka_Uuid_least_significant_bits(id) == 0)
            {
                return Ok(None);
            }
            let text = rd_kafka_Uuid_base64str(id);
            if text.is_null() {
                return Ok(None);
            }
            return Ok(Some(CStr::from_ptr(text).to_string_lossy().into_owned()));
        }
        failed(RDKafkaErrorCode::UnknownTopicOrPartition)
    }
}

/// A librdkafka object destroyed with its destructor when dropped (unless null).
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the matching constructor and is destroyed once.
            unsafe { (self.1)(self.0) };
            self.0 = ptr::null_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::*;

    fn consumer(cluster: &MockCluster<'_, DefaultProducerContext>) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "topic-id-test")
            .create()
            .unwrap()
    }

    #[test]
    fn each_topic_has_its_own_id_and_keeps_it() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("a", 1, 1).unwrap();
        cluster.create_topic("b", 1, 1).unwrap();
        let consumer = consumer(&cluster);
        let timeout = Duration::from_secs(10);
        let a = topic_id(consumer.client(), "a", timeout).unwrap().unwrap();
        let b = topic_id(consumer.client(), "b", timeout).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22, "base64 of 16 bytes without padding: {a}");
        assert_eq!(topic_id(consumer.client(), "a", timeout).unwrap(), Some(a));
    }

    #[test]
    fn a_missing_topic_is_an_error() {
        let cluster = MockCluster::new(1).unwrap();
        let consumer = consumer(&cluster);
        let err = topic_id(consumer.client(), "missing", Duration::from_secs(10)).unwrap_err();
        assert_eq!(
            err.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition),
            "{err}"
        );
    }
}
