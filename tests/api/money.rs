//! Money safety under concurrency.

use serde_json::Value;

use crate::helpers::{Backend, no_rate_limit, payment, payment_in, spawn_with};

crate::on_every_backend!(
    concurrent_payments_never_reserve_more_than_the_balance,
    payments_of_many_customers_decided_together_are_each_exact,
    an_amount_is_reserved_exactly_however_it_is_written,
);

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

/// Many customers at once, as a store that commits decisions together sees them: each
/// account's funds and daily limit stay exact, and every other decision is unaffected by
/// the ones it shared a commit with.
async fn payments_of_many_customers_decided_together_are_each_exact(backend: Backend) {
    let app = spawn_with(backend, without_velocity).await;
    let mut bodies = Vec::new();
    // c_456 holds 1000.00: three of eight 300.00 payments fit.
    bodies.extend((0..8).map(|_| ("c_456", payment("c_456", "300.00", "p_789"))));
    // c_rich has 50000.00 but a daily limit of 10000.00: six of ten 1500.00 payments fit.
    bodies.extend((0..10).map(|_| ("c_rich", payment("c_rich", "1500.00", "p_789"))));
    bodies.push(("c_789", payment("c_789", "125.50", "p_789")));
    bodies.push(("c_123", payment("c_123", "125.50", "p_789")));
    bodies.push(("c_nope", payment("c_nope", "10.00", "p_789")));
    bodies.push(("blocked", payment_in("c_eur", "10.00", "EUR", "p_blocked")));
    bodies.push(("c_newdev", payment("c_newdev", "1200.00", "p_789")));
    let sends = bodies.iter().map(|(who, body)| {
        let app = &app;
        async move {
            let (status, answer) = app.decide_json(body).await;
            assert_eq!(status, 200, "{answer}");
            (*who, answer)
        }
    });
    let answers: Vec<(&str, Value)> = futures::future::join_all(sends).await;
    let of = |who: &'static str| -> Vec<&Value> {
        answers
            .iter()
            .filter(|(w, _)| *w == who)
            .map(|(_, b)| b)
            .collect()
    };
    let allowed = |who| of(who).iter().filter(|b| b["decision"] == "allow").count();
    assert_eq!(allowed("c_456"), 3, "exactly what the balance holds");
    for b in of("c_456").iter().filter(|b| b["decision"] != "allow") {
        assert_eq!(b["reasons"][0], "insufficient_funds", "{b}");
    }
    assert_eq!(allowed("c_rich"), 6, "exactly what the daily limit holds");
    for b in of("c_rich").iter().filter(|b| b["decision"] != "allow") {
        assert_eq!(b["reasons"][0], "limit_exceeded", "{b}");
    }
    let only = |who| of(who)[0].clone();
    assert_eq!(
        only("c_789")["reasons"],
        serde_json::json!(["insufficient_funds"])
    );
    assert_eq!(only("c_123")["decision"], "review", "{}", only("c_123"));
    assert_eq!(
        only("c_nope")["reasons"],
        serde_json::json!(["unknown_customer"])
    );
    assert_eq!(
        only("blocked")["reasons"],
        serde_json::json!(["blocked_payee"])
    );
    assert_eq!(
        only("c_newdev")["reasons"],
        serde_json::json!(["new_device_high_amount"])
    );
    // What is left is exactly what the allowed payments did not take.
    let (_, rest) = app.decide_json(&payment("c_456", "100.00", "p_789")).await;
    assert_eq!(rest["decision"], "allow", "{rest}");
    let (_, over) = app.decide_json(&payment("c_456", "0.01", "p_789")).await;
    assert_eq!(over["reasons"][0], "insufficient_funds", "{over}");
    app.stop().await;
}

/// JSON allows any number of digits and any exponent; the amount reserved is the amount
/// written, never a rounding of it.
async fn an_amount_is_reserved_exactly_however_it_is_written(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    // The longest number accepted, 64 characters, with an exponent.
    let longest = format!("1e{}2", "0".repeat(61));
    for (written, reserved) in [
        ("0.00000000000000000000000000015e28", "1.50"),
        ("0.000000000000000000000000000050e28", "0.50"),
        ("150e-2", "1.50"),
        ("0.00000000000000000000000000000000000000001250E42", "12.50"),
        ("1.000000000000000000000000000000000", "1.00"),
        (longest.as_str(), "100.00"),
    ] {
        let (status, body) = app.decide_json(&payment("c_456", written, "p_789")).await;
        assert_eq!(status, 200, "{written}: {body}");
        assert_eq!(body["decision"], "allow", "{written}: {body}");
        let id = body["reservationId"].as_str().unwrap();
        let reservation: Value = app
            .get(&format!("/reservations/{id}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(reservation["amount"], reserved, "{written}: {reservation}");
    }
    app.stop().await;
}
