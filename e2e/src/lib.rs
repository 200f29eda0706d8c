//! The e2e harness: a handle on the running testbed (see `e2e/testbed`) and helpers to spawn
//! blocksmith's binaries, produce data and audit blocks.

pub mod apiserver;
pub mod broker;
pub mod datagen;
pub mod helm;
pub mod process;
pub mod scenario;
pub mod testbed;

pub use testbed::Testbed;
