//! THE EDGE: HTTP in, HTTP out (axum, tower, hyper). Never names async-nats: every JetStream read
//! or write goes through one handle, [`crate::operations::Operations`] (the core's pure helpers,
//! the Idempotency-Key parser and the callback destination check, are called directly), and
//! every error leaves as an [`error::ApiError`], which becomes problem+json in one place.
//!
//! By request family, as in restate's ingress: [`submit`] (a configured route), `reads`
//! (status, result, cancel), `events` (SSE), `health`. Around them: [`router`] (the routes and the
//! layer stack in one chain), `layers` (identify, head caps, spans, counting, `Retry-After`),
//! [`state`] (what handlers share, and admission), `extract` (the operation a request names, the
//! wait it asks for), `responses` (the headers of answers about an operation), [`auth`], [`prefer`],
//! [`openapi`], and [`server`] (the hyper loop with its connection caps).

pub mod auth;
mod batches;
mod body;
pub mod error;
mod events;
mod extract;
mod failed;
mod health;
mod layers;
pub mod openapi;
pub mod prefer;
mod reads;
mod responses;
mod router;
pub mod server;
mod slots;
pub mod state;
mod submit;
#[cfg(test)]
mod tests;

pub use router::router;
pub use state::AppState;
