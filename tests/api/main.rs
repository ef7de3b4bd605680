//! The integration suite: real servers on port 0, a fresh database per test, every test run
//! once per storage backend.

mod helpers;

mod decisions;
mod idempotency;
mod money;
mod ops;
mod process;
mod ratelimit;
mod validation;
