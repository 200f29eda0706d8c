//! End-to-end tests against the real testbed (kube-apiserver + etcd, a node running pods,
//! a Kafka-protocol broker, an S3 server). Run through `e2e/run-tests`, which starts the
//! testbed.

mod bad_input_kafka;
mod bad_input_output;
mod builder;
mod chaos;
mod chart;
mod exactly_once;
mod kafka_sasl;
mod kafka_security;
mod operator;
mod outages;
mod pods;
mod policy;
mod smoke;
mod support;
mod upgrade;
