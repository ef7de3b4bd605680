//! The integration suite: real servers on port 0, a fresh database per test, every test run
//! once per storage backend (and once more with the Redis rate limiter).

mod helpers;

mod daily_limit;
mod decisions;
mod idempotency;
mod money;
mod multi_instance;
mod ops;
mod process;
mod ratelimit;
mod ratelimit_redis;
mod review;
mod validation;
mod velocity;
