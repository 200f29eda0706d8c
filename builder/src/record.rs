//! One Kafka record as the builder carries it from the reader to the block writer.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, when the broker reported one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header keys in order; a header value may be null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}
