//! Per-customer rate limiting.
//!
//! # Contract
//! Each customer has a token bucket of `burst` tokens refilled at `rps` per second. Every
//! decide request (replays included) takes one token after its body is validated; an empty
//! bucket answers 429 with `Retry-After` and the `RateLimit-*` headers. The in-process limiter
//! ([`memory::MemoryLimiter`]) is exact for one instance; with `REDIS_URL`,
//! [`redis::RedisLimiter`] makes the limit global across instances, falling back to the
//! in-process one while Redis is unreachable.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// The limiter's answer, with what the `RateLimit-*` headers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Bucket size.
    pub limit: u32,
    /// Tokens left after this request.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// Until the next request would be let through (only when refused).
    pub retry_after: Duration,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn check(&self, key: &str) -> RateDecision;
    /// Whether the backing service answers (for `/readyz`).
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// Periodic housekeeping (forgetting idle buckets).
    fn maintain(&self) {}
}

pub type DynLimiter = Arc<dyn RateLimiter>;

/// Rate and burst, checked at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub rps: u32,
    pub burst: u32,
}

impl Quota {
    pub fn new(rps: u32, burst: u32) -> Result<Self, String> {
        if rps == 0 || burst == 0 {
            return Err(
                "PAYNOW_RATE_LIMIT_RPS and PAYNOW_RATE_LIMIT_BURST must be at least 1".into(),
            );
        }
        Ok(Quota { rps, burst })
    }

    /// Time to earn one token.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.rps))
    }
}
