//! Money safety under concurrency.

use serde_json::Value;

use crate::helpers::{Backend, no_rate_limit, payment, spawn_with};

crate::on_every_backend!(concurrent_payments_never_reserve_more_than_the_balance);

/// The default policy with the velocity rule out of the way: 64 payments in a moment would
/// otherwise send some to review whenever the requests happen to run less than fully in
/// parallel (e.g. with the Redis limiter's round trip in front), and this test is about money.
fn without_velocity(config: &mut paynow::Config) {
    no_rate_limit(config);
    let policy = include_str!("../../policy/default.toml")
        .replace("max_payments = 10", "max_payments = 1000000");
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    config.policy = Some(path);
}

async fn concurrent_payments_never_reserve_more_than_the_balance(backend: Backend) {
    let app = spawn_with(backend, without_velocity).await;
    // c_456 holds 1000.00; 64 payments of 100.00 at once ask for 6400.00.
    let sends = (0..64).map(|_| async {
        let (status, body) = app.decide_json(&payment("c_456", "100.00", "p_789")).await;
        assert_eq!(status, 200, "{body}");
        body
    });
    let answers: Vec<Value> = futures::future::join_all(sends).await;
    let allowed = answers.iter().filter(|b| b["decision"] == "allow").count();
    assert_eq!(allowed, 10, "exactly the balance is reserved");
    for b in answers.iter().filter(|b| b["decision"] != "allow") {
        assert_eq!(b["decision"], "block", "{b}");
        // Velocity may fire too (64 payments in a moment); funds are the first reason.
        assert_eq!(b["reasons"][0], "insufficient_funds", "{b}");
    }
    // A block whose tools still saw the funds lost the race at commit, and says so.
    for b in answers.iter().filter(|b| b["decision"] == "block") {
        let trace = b["agentTrace"].as_array().unwrap();
        let seen = trace[1]["data"]["available"]
            .as_str()
            .unwrap()
            .replace('.', "");
        let seen_minor: i64 = seen.parse().unwrap();
        let commit = trace.iter().find(|s| s["step"] == "commit");
        if seen_minor >= 10_000 {
            let commit =
                commit.unwrap_or_else(|| panic!("race lost at commit without a trace step: {b}"));
            assert!(
                commit["detail"]
                    .as_str()
                    .unwrap()
                    .contains("concurrent payment"),
                "{b}"
            );
        } else {
            assert!(commit.is_none(), "{b}");
        }
    }
    let (_, after) = app.decide_json(&payment("c_456", "0.01", "p_789")).await;
    assert_eq!(after["reasons"][0], "insufficient_funds", "{after}");
    app.stop().await;
}
