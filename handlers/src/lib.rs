//! The messaging library shared by the gateway and its workers.
//!
//! # Layout
//! - [`claim_check`]: bodies too large for a message, kept in the JetStream Object Store (a
//!   request's, read by workers; a reply's, written by them).
//! - [`contract`]: the wire contract: subjects, header names, and the request and result
//!   message shapes. The only place that defines how messages look.
//! - [`progress`]: progress reports of pending operations (advisory).
//! - [`handler`]: what a worker's code implements and returns (no NATS in it).
//! - [`jetstream`]: the JetStream primitives both sides use: create-if-absent, direct get,
//!   first-writer-wins result writes.
//! - [`retry`]: a route's retry policy (carried in each request) and the retry state a worker
//!   reports after a failed attempt.
//! - [`stateful`]: stateful handlers: state, processed marker and reply committed in one atomic
//!   batch, at most once per operation (the outbox pattern on JetStream).
//! - [`trace`]: W3C trace context across the async hop (request in, reply out).
//! - [`worker`]: the worker API: register a handler per route, run, and the library consumes,
//!   replies, acks and retries.
//!
//! A worker in another language needs none of this code: docs/wire-contract.md is the same
//! contract in prose, and a plain NATS client is enough to follow it.

pub mod claim_check;
pub mod contract;
pub mod faults;
pub mod handler;
pub mod jetstream;
pub mod progress;
pub mod retry;
pub mod stateful;
pub mod trace;
pub mod worker;

pub use contract::{Outcome, Request, RequestHead, ResultRecord, Subjects};
pub use handler::{Handler, HandlerError, Permanent, Response, RetryAfter};
pub use progress::{Progress, ProgressReporter};
pub use retry::{RetryPolicy, RetryState};
pub use stateful::{StateStore, StatefulContext};
pub use worker::{Worker, WorkerConfig, WorkerStats};
