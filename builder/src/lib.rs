//! blocksmith's builder: claims BlockJobs, reads exactly their offset range from Kafka, and
//! writes one immutable Parquet block (data, then manifest) to object storage.
//!
//! Pure-ish pieces: [`block`] (Parquet writer), [`manifest`]. I/O: [`reader`] (Kafka range, with
//! [`headers`] read as bytes),
//! [`store`] (object storage), [`data_writer`] (a data object written as it is encoded), [`lease`] (claim/renew/report), [`runner`] (one block),
//! [`worker`] (the claim loop).

pub mod block;
pub mod data_writer;
pub mod headers;
pub mod lease;
pub mod manifest;
pub mod metrics;
pub mod reader;
pub mod record;
pub mod runner;
pub mod store;
pub mod worker;
