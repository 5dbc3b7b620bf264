//! Harness for the end-to-end tests: real nats-server processes (ephemeral loopback ports,
//! temporary store dirs, killed when dropped), gateways in-process or as real processes, and
//! workers built on `handlers`.
//!
//! Nothing here fakes JetStream. Faults are real: a killed server, a killed gateway process
//! (through the gateway's `fault-injection` hook), a killed worker process, and a TCP proxy that
//! stalls and drops connections ([`proxy`]). [`history`] and [`chaos`] are the fault suite's
//! history checker and driver (`tests/tests/faults.rs`, `scripts/faults`).
//!
//! The harness is split by subject; everything a test uses is re-exported here, so that
//! `use gateway_tests::*;` is all a test file needs:
//! - `nats`, `cluster`: nats-server processes, one or a cluster;
//! - `gateways`: gateways under test, in-process or as processes, and their routes files;
//! - `workers`: in-process workers;
//! - `http`: the client side of the HTTP contract;
//! - `streams`: what the gateway stored in JetStream;
//! - `wait`: polling with a deadline;
//! - `tools`: tools from the project's `.venv`.

pub mod chaos;
pub mod clocks;
mod cluster;
pub mod disk;
pub mod exactly_once;
mod gateways;
pub mod history;
mod http;
mod nats;
pub mod netns;
pub mod proxy;
mod streams;
mod tools;
mod wait;
mod workers;

pub use cluster::NatsCluster;
pub use gateways::{
    GatewayBuilder, GatewayProcess, InProcessGateway, NatsUrl, NewNats, TEST_ROUTES, TestGateway,
    log_field, wait_until_ready,
};
pub use http::{
    Submit, assert_monotonic, assert_problem, get_operation, get_path, get_result, http, id_of,
    json, location, poll_until_terminal, quoted, submit,
};
pub use nats::{Nats, nats_server_bin, signal_process};
pub use streams::{duplicate_request, rewritten_request, stored_outcome, stream_messages};
pub use tools::{python_command, venv_tool};
pub use wait::eventually;
pub use workers::{
    Echo, TestWorker, WorkerCounts, counter_store, counting_handler, echo, worker_config,
    worker_jetstream,
};
