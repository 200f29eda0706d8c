//! The e2e harness: a handle on the running testbed (see `e2e/testbed`) and helpers to spawn
//! blocksmith's binaries, produce data and audit blocks.
//!
//! - [`scenario`]: the common opening of a test as one builder, and a prelude of the rest;
//! - [`cluster`]: pipelines, jobs and Events in the API;
//! - [`wait`]: polling, pipeline conditions matched by a [`wait::Cond`];
//! - [`kafka`]: producing data, a group's offsets, watermarks;
//! - [`blocks`]: output directories and the exactly-once audit;
//! - [`procs`]: operator, builder and private S3 processes;
//! - [`fake_builder`]: acting as a builder through the API;
//! - [`metrics`]: reading Prometheus endpoints;
//! - [`broker`], [`apiserver`]: private servers; [`datagen`]: test data; [`helm`]: the chart.

pub mod apiserver;
pub mod blocks;
pub mod broker;
pub mod cluster;
pub mod datagen;
pub mod fake_builder;
pub mod helm;
pub mod kafka;
pub mod metrics;
pub mod process;
pub mod procs;
pub mod scenario;
pub mod testbed;
pub mod wait;

pub use testbed::Testbed;
