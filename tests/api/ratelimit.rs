//! The per-customer rate limit.

use crate::helpers::{Backend, payment, spawn_app};

crate::on_every_backend!(six_rapid_calls_for_one_customer_meet_the_limit);

async fn six_rapid_calls_for_one_customer_meet_the_limit(backend: Backend) {
    let app = spawn_app(backend).await;
    // Sent together, so that a slow machine cannot spread them over a refill: 5 rps refills
    // one token every 200 ms, and six calls one after another on a busy CI runner can take
    // longer than that.
    let bodies: Vec<_> = (0..6).map(|_| payment("c_rich", "1.00", "p_789")).collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| app.decide(b))).await;
    let mut limited: Vec<_> = answers.into_iter().filter(|r| r.status() == 429).collect();
    let res = limited
        .pop()
        .expect("at least one of 6 rapid calls is limited (5 rps, burst 5)");
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(res.headers()["ratelimit-limit"], "5");
    assert_eq!(res.headers()["ratelimit-remaining"], "0");
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    // Another customer is not affected.
    assert_eq!(
        app.decide(&payment("c_456", "1.00", "p_789"))
            .await
            .status(),
        200
    );
    let metrics: serde_json::Value = app.get("/metrics").await.json().await.unwrap();
    assert!(metrics["rate_limited"].as_u64().unwrap() >= 1);
    app.stop().await;
}
