//! The e2e harness: a handle on the running testbed (see `e2e/testbed`) and helpers to spawn
//! blocksmith's binaries, produce data and audit blocks.
//!
//! - [`bench`]: job ranges and building them, for the benchmarks;
//! - [`scenario`]: the common opening of a test as one builder, and a prelude of the rest;
//! - [`cluster`]: pipelines, jobs and Events in the API;
//! - [`wait`]: polling, pipeline conditions matched by a [`wait::Cond`];
//! - [`kafka`]: producing data, a group's offsets, watermarks;
//! - [`blocks`]: output directories and the exactly-once audit;
//! - [`procs`]: operator, builder and private S3 processes;
//! - [`fake_builder`]: acting as a builder through the API;
//! - [`metrics`]: reading Prometheus endpoints;
//! - [`broker`], [`apiserver`]: private servers; [`sasl`]: the test broker's SASL front;
//!   [`oidc`]: an identity provider issuing OAuth tokens; [`forwarder`]: an API server a test cuts
//!   off for one process; [`datagen`]: test data; [`helm`]: the chart.

pub mod apiserver;
pub mod bench;
pub mod blocks;
pub mod broker;
pub mod cluster;
pub mod datagen;
pub mod fake_builder;
pub mod forwarder;
pub mod helm;
pub mod host;
pub mod kafka;
pub mod metrics;
pub mod oidc;
pub mod pki;
pub mod process;
pub mod procs;
pub mod sasl;
pub mod scenario;
pub mod testbed;
pub mod wait;

/// The `e2e` folder of the checkout the tests run from. (Read when they run: `env!` would keep
/// the path of whichever checkout built them first when checkouts share a target directory.)
pub fn source_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(Into::into)
        .expect("run by cargo test")
}

pub use testbed::Testbed;
