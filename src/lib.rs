//! PayNow decides, in a few milliseconds, whether a bank should let a customer's payment
//! through: `allow`, `review` or `block`, with reasons and an agent trace.
//!
//! A tour of the modules, in the order a request meets them:
//! * [`http`] — routes and middleware: request id, auth, body parsing, rate limit,
//!   idempotency, and the `decide` handler.
//! * [`domain`] — exact money, checked ids, decisions and reasons.
//! * [`ratelimit`] — the per-customer token bucket: in-process, or global on Redis.
//! * [`agent`] — plan → tools → rules → recommendation, failing safe.
//! * [`store`] — one trait, one method per use case; SQLite embedded by default,
//!   PostgreSQL for many instances.
//! * [`policy`], [`fixtures`] — the thresholds and the demo customers, from files.
//! * [`config`], [`telemetry`], [`metrics`], [`openapi`], [`startup`] — running it.
//! * [`eval`] — the `paynow eval` client that checks decisions against `eval_cases.json`.
//! * [`bench`] — `paynow bench`, the load benchmark of the decision path.

pub mod agent;
pub mod bench;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod eval;
pub mod fixtures;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod ratelimit;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use startup::{serve, shutdown_signal};
