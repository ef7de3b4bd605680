//! The Redis rate limiter against a real Redis: the same answers as the in-process one, one
//! bucket for every instance, and a fallback that keeps requests answered while Redis is away.

use std::sync::Arc;
use std::time::Duration;

use paynow::metrics::Metrics;
use paynow::ratelimit::memory::MemoryLimiter;
use paynow::ratelimit::redis::RedisLimiter;
use paynow::ratelimit::{Quota, RateLimiter};
use serde_json::Value;

use crate::helpers::{
    API_KEY, Backend, PrivateRedis, payment, redis_available, redis_url, spawn_with, use_redis,
};

fn prefix() -> String {
    format!("paynow:test:{}:", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn the_redis_limiter_answers_like_the_in_process_one() {
    if !redis_available() {
        return;
    }
    let quota = Quota::new(5, 5).unwrap();
    let metrics = Arc::new(Metrics::new());
    let redis = RedisLimiter::new(&redis_url(), &prefix(), quota, metrics.clone()).unwrap();
    let memory = MemoryLimiter::new(quota);
    for i in 0..5 {
        let (r, m) = (redis.check("c_1").await, memory.check_now("c_1"));
        assert!(r.allowed && m.allowed, "request {i}");
        assert_eq!(
            (r.limit, r.remaining),
            (m.limit, m.remaining),
            "request {i}"
        );
        // Both say when the bucket is full again; only the clocks differ.
        let gap = r.reset_after.abs_diff(m.reset_after);
        assert!(
            gap <= Duration::from_millis(50),
            "request {i}: {r:?} vs {m:?}"
        );
    }
    let (r, m) = (redis.check("c_1").await, memory.check_now("c_1"));
    assert!(!r.allowed && !m.allowed);
    assert_eq!(r.remaining, 0);
    assert!(
        r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_millis(200),
        "{r:?}"
    );
    assert!(
        r.reset_after.abs_diff(m.reset_after) <= Duration::from_millis(50),
        "{r:?} vs {m:?}"
    );
    // Another customer has a bucket of their own, and tokens come back with time.
    assert!(redis.check("c_2").await.allowed);
    tokio::time::sleep(r.retry_after + Duration::from_millis(20)).await;
    assert!(redis.check("c_1").await.allowed);
    assert_eq!(metrics.snapshot().rate_limiter_fallbacks, 0);
}

#[tokio::test]
async fn two_limiters_on_one_redis_share_each_customers_bucket() {
    if !redis_available() {
        return;
    }
    let quota = Quota::new(1, 3).unwrap();
    let prefix = prefix();
    let one = RedisLimiter::new(&redis_url(), &prefix, quota, Arc::new(Metrics::new())).unwrap();
    let two = RedisLimiter::new(&redis_url(), &prefix, quota, Arc::new(Metrics::new())).unwrap();
    assert!(one.check("c_1").await.allowed);
    assert!(two.check("c_1").await.allowed);
    assert!(one.check("c_1").await.allowed);
    let refused = two.check("c_1").await;
    assert!(
        !refused.allowed,
        "the second instance sees the first one's requests"
    );
    assert!(
        refused.retry_after > Duration::from_millis(500),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_falls_back_while_redis_is_away_and_returns_to_it() {
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    let metrics = Arc::new(Metrics::new());
    let limiter = RedisLimiter::new(
        &redis.url(),
        "t:",
        Quota::new(1, 2).unwrap(),
        metrics.clone(),
    )
    .unwrap();
    assert!(limiter.check("c_1").await.allowed);
    assert!(limiter.using_redis());
    assert!(limiter.ready().await.is_ok());

    redis.kill();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        limiter.check("c_9").await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "checks did not wait for a dead Redis: {:?}",
        started.elapsed()
    );
    assert!(!limiter.using_redis());
    assert_eq!(
        metrics.snapshot().rate_limiter_fallbacks,
        20,
        "every local answer is counted"
    );
    assert!(limiter.ready().await.unwrap_err().contains("unreachable"));
    // The local bucket still limits.
    let local: Vec<bool> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(limiter.check("c_2").await.allowed);
        }
        v
    };
    assert_eq!(local, [true, true, false]);

    redis.restart().await;
    let mut back = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if limiter.using_redis() {
            back = true;
            break;
        }
    }
    assert!(back, "the limiter did not return to Redis within 4 s");
    let counted = metrics.snapshot().rate_limiter_fallbacks;
    assert!(limiter.check("c_3").await.allowed);
    assert_eq!(metrics.snapshot().rate_limiter_fallbacks, counted);
    assert!(limiter.ready().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_redis_without_gating_on_it() {
    if !redis_available() {
        return;
    }
    let app = spawn_with(Backend::Sqlite, |c| use_redis(c, &redis_url())).await;
    let ready: Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["rate_limiter"], "ok", "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");
    app.stop().await;

    // Nothing listens on port 1: the limiter is unreachable, decisions still flow.
    let app = spawn_with(Backend::Sqlite, |c| use_redis(c, "redis://127.0.0.1:1")).await;
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ready: Value = res.json().await.unwrap();
    assert!(
        ready["rate_limiter"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{ready}"
    );
    assert_eq!(
        app.decide(&payment("c_456", "1.00", "p_789"))
            .await
            .status(),
        200
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_redis_url_fails_at_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("paynow.db").display());
    let mut config = paynow::Config::with_key(API_KEY, &url).unwrap();
    config.redis_url = Some("http://127.0.0.1:6379".into());
    let err = paynow::startup::build_state(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("REDIS_URL"), "{err}");
    // Refused before the store was touched.
    assert!(!dir.path().join("paynow.db").exists());
}
