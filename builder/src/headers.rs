//! A record's headers exactly as the broker delivered them.
//!
//! rdkafka's `Headers` API hands out keys as `&str` and panics on a key that is not UTF-8.
//! Kafka defines header keys as strings, but a producer outside the Java client can send any
//! bytes, and one such record must neither crash the builder nor fail its job: here the keys
//! are read as bytes through librdkafka's own accessors.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};
use std::ptr;

use rdkafka::bindings::{
    rd_kafka_header_add, rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t,
    rd_kafka_message_headers,
};
use rdkafka::message::{BorrowedMessage, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

/// One header: its key's bytes and its value (`None` for a null value).
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// The headers of `msg`, in order, borrowed from it.
pub fn raw_headers<'a>(msg: &'a BorrowedMessage<'_>) -> impl Iterator<Item = RawHeader<'a>> + 'a {
    let mut headers: *mut rd_kafka_headers_t = ptr::null_mut();
    // SAFETY: `msg.ptr()` is a valid message for `msg`'s lifetime; librdkafka either leaves
    // `headers` null (no headers) or points it at the message's own header list, which
    // lives as long as the message.
    let err = unsafe { rd_kafka_message_headers(msg.ptr(), &mut headers) };
    let count = if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && !headers.is_null() {
        // SAFETY: `headers` is the message's valid header list (above).
        unsafe { rd_kafka_header_cnt(headers) }
    } else {
        0
    };
    (0..count).filter_map(move |idx| {
        let mut name: *const c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size = 0usize;
        // SAFETY: `idx < count` of a valid header list; on success librdkafka points `name`
        // at a NUL-terminated key and `value` at `size` bytes (or null), both owned by the
        // message and unchanged while it lives.
        unsafe {
            let err = rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size);
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            let key = CStr::from_ptr(name).to_bytes();
            let value =
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
            Some((key, value))
        }
    })
}

/// `headers` with one more header whose key is any bytes, as a producer outside the Java
/// client can send (rdkafka's `Header` takes a `&str` key). For producing test data.
pub fn with_raw_header(headers: OwnedHeaders, key: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    let list = ptr::from_ref(headers.as_borrowed())
        .cast::<rd_kafka_headers_t>()
        .cast_mut();
    let (value_ptr, value_len) = value.map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()));
    // SAFETY: `as_borrowed` is the owned list itself (rdkafka casts the same pointer), which
    // `headers`, owned here, keeps alive and unshared; librdkafka copies key and value.
    let err = unsafe {
        rd_kafka_header_add(
            list,
            key.as_ptr().cast::<c_char>(),
            key.len() as isize,
            value_ptr.cast::<c_void>(),
            value_len as isize,
        )
    };
    assert_eq!(
        err,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        "an owned header list is writable"
    );
    headers
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    use super::*;

    #[test]
    fn keys_that_are_not_utf8_come_back_as_their_bytes() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        let headers = with_raw_header(OwnedHeaders::new(), b"ok", Some(b"1"));
        let headers = with_raw_header(headers, b"bad-\xff\xfe", None);
        let headers = with_raw_header(headers, "ü".as_bytes(), Some(b""));
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to("t")
                    .payload(b"v")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["t"]).unwrap();
        let msg = (0..100)
            .find_map(|_| consumer.poll(Duration::from_millis(100)))
            .expect("a record")
            .unwrap();
        // Why this module exists: rdkafka's own accessor panics on the second key.
        let through_rdkafka = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            use rdkafka::message::{Headers, Message};
            msg.headers().map(|h| h.iter().count())
        }));
        assert!(through_rdkafka.is_err(), "rdkafka reads such keys now");

        let got: Vec<RawHeader<'_>> = raw_headers(&msg).collect();
        let expected: Vec<RawHeader<'_>> = vec![
            (b"ok", Some(b"1")),
            (b"bad-\xff\xfe", None),
            ("ü".as_bytes(), Some(b"")),
        ];
        assert_eq!(got, expected);
    }
}
