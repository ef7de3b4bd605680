//! The in-process limiter: `governor`'s keyed GCRA, exact for a single instance.

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;

use super::{Quota, RateDecision, RateLimiter};

type Keyed = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    DefaultClock,
    StateInformationMiddleware,
>;

pub struct MemoryLimiter {
    limiter: Keyed,
    quota: Quota,
}

impl MemoryLimiter {
    pub fn new(quota: Quota) -> Self {
        let rps = NonZeroU32::new(quota.rps).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
        let limiter =
            governor::RateLimiter::keyed(governor::Quota::per_second(rps).allow_burst(burst))
                .with_middleware::<StateInformationMiddleware>();
        MemoryLimiter { limiter, quota }
    }

    /// Forgets buckets that are full again, so memory follows active customers only.
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Synchronous check, also used as the fallback of the Redis limiter.
    pub fn check_now(&self, key: &str) -> RateDecision {
        let interval = self.quota.emission_interval();
        match self.limiter.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = self.quota.burst.saturating_sub(remaining);
                RateDecision {
                    allowed: true,
                    limit: self.quota.burst,
                    remaining,
                    reset_after: interval * missing,
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                RateDecision {
                    allowed: false,
                    limit: self.quota.burst,
                    remaining: 0,
                    reset_after: interval * self.quota.burst,
                    retry_after: wait,
                }
            }
        }
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn check(&self, key: &str) -> RateDecision {
        self.check_now(key)
    }

    fn maintain(&self) {
        self.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait() {
        let limiter = MemoryLimiter::new(Quota::new(5, 5).unwrap());
        for i in 0..5 {
            let d = limiter.check_now("c_1");
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let refused = limiter.check_now("c_1");
        assert!(!refused.allowed);
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_millis(200));
        // Another customer has a bucket of their own.
        assert!(limiter.check_now("c_2").allowed);
    }
}
