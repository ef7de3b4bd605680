//! Decisions: the brief's example and every reason of the default policy.

use serde_json::{Value, json};

use crate::helpers::{Backend, no_rate_limit, payment, payment_in, spawn_app, spawn_with};

crate::on_every_backend!(
    the_brief_example_is_reviewed_for_recent_disputes,
    a_payment_is_allowed_once_then_blocked_for_insufficient_funds,
    every_block_reason_of_the_default_policy_fires,
    every_review_reason_of_the_default_policy_fires,
    the_daily_limit_counts_what_was_reserved_today,
    too_many_payments_in_the_window_go_to_review,
    a_failing_risk_tool_fails_safe_to_review,
    a_timing_out_balance_tool_fails_safe_to_review,
    a_transient_tool_failure_is_retried,
    a_request_past_its_deadline_answers_503,
    a_timeout_answer_means_nothing_was_written,
);

fn steps(body: &Value) -> Vec<(String, String)> {
    body["agentTrace"]
        .as_array()
        .expect("agentTrace is an array")
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_owned(),
                s["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn the_brief_example_is_reviewed_for_recent_disputes(backend: Backend) {
    let app = spawn_app(backend).await;
    let res = app
        .decide(&json!({"customerId":"c_123","amount":125.50,"currency":"USD","payeeId":"p_789","idempotencyKey":"uuid-1"}))
        .await;
    assert_eq!(res.status(), 200);
    let header_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["decision"], "review");
    assert_eq!(body["reasons"], json!(["recent_disputes"]));
    assert_eq!(body["requestId"], header_id.as_str());
    assert!(header_id.starts_with("req_"));
    let expected = [
        ("plan", "Check balance, risk, and limits"),
        ("tool:getBalance", "balance=300.00"),
        (
            "tool:getRiskSignals",
            "recent_disputes=2, device_change=true",
        ),
        ("tool:recommend", "route to manual review"),
    ];
    let got = steps(&body);
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for ((step, detail), (want_step, want_detail)) in got.iter().zip(expected) {
        assert_eq!((step.as_str(), detail.as_str()), (want_step, want_detail));
    }
    assert!(body["caseId"].as_str().unwrap().starts_with("case_"));
    assert!(body.get("reservationId").is_none());
    app.stop().await;
}

async fn a_payment_is_allowed_once_then_blocked_for_insufficient_funds(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, first) = app.decide_json(&payment("c_456", "600.00", "p_789")).await;
    assert_eq!(status, 200);
    assert_eq!(first["decision"], "allow", "{first}");
    assert_eq!(first["reasons"], json!([]));
    assert!(first["reservationId"].as_str().unwrap().starts_with("res_"));
    let (_, second) = app.decide_json(&payment("c_456", "600.00", "p_789")).await;
    assert_eq!(second["decision"], "block", "{second}");
    assert_eq!(second["reasons"], json!(["insufficient_funds"]));
    // What is left is exactly 400.00: to the cent.
    let (_, over) = app.decide_json(&payment("c_456", "400.01", "p_789")).await;
    assert_eq!(over["reasons"], json!(["insufficient_funds"]));
    let (_, exact) = app.decide_json(&payment("c_456", "400.00", "p_789")).await;
    assert_eq!(exact["decision"], "allow", "{exact}");
    app.stop().await;
}

async fn expect(app: &crate::helpers::TestApp, body: Value, decision: &str, reasons: Value) {
    let (status, got) = app.decide_json(&body).await;
    assert_eq!(status, 200, "{body} -> {got}");
    assert_eq!(got["decision"], decision, "{body} -> {got}");
    assert_eq!(got["reasons"], reasons, "{body} -> {got}");
}

async fn every_block_reason_of_the_default_policy_fires(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let cases = [
        (
            payment("c_789", "125.50", "p_789"),
            "block",
            json!(["insufficient_funds"]),
        ),
        (
            payment("c_eur", "10.00", "p_789"),
            "block",
            json!(["currency_mismatch"]),
        ),
        (
            payment_in("c_eur", "10.00", "EUR", "p_789"),
            "allow",
            json!([]),
        ),
        (
            payment("c_rich", "6000.00", "p_789"),
            "block",
            json!(["limit_exceeded"]),
        ),
        (
            payment("c_456", "10.00", "p_blocked"),
            "block",
            json!(["blocked_payee"]),
        ),
        (
            payment("c_nope", "10.00", "p_789"),
            "block",
            json!(["unknown_customer"]),
        ),
        // Several rules: block reasons first, then review reasons.
        (
            payment("c_123", "1500.00", "p_blocked"),
            "block",
            json!([
                "insufficient_funds",
                "blocked_payee",
                "recent_disputes",
                "new_device_high_amount",
                "new_payee_high_amount"
            ]),
        ),
        // Other currencies keep their own minor units.
        (
            payment_in("c_jpy", "1000", "JPY", "p_789"),
            "allow",
            json!([]),
        ),
        (
            payment_in("c_bhd", "1.234", "BHD", "p_789"),
            "allow",
            json!([]),
        ),
    ];
    for (body, decision, reasons) in cases {
        expect(&app, body, decision, reasons).await;
    }
    app.stop().await;
}

async fn every_review_reason_of_the_default_policy_fires(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    // In order: a payee paid once (allowed) is known from then on.
    let cases = [
        (payment("c_rich", "1500.00", "p_789"), "allow", json!([])),
        (
            payment("c_rich", "1500.00", "p_new"),
            "review",
            json!(["new_payee_high_amount"]),
        ),
        (payment("c_rich", "999.99", "p_new2"), "allow", json!([])),
        (
            payment("c_newdev", "1200.00", "p_789"),
            "review",
            json!(["new_device_high_amount"]),
        ),
        (payment("c_newdev", "999.99", "p_789"), "allow", json!([])),
        (
            payment("c_123", "10.00", "p_789"),
            "review",
            json!(["recent_disputes"]),
        ),
        (payment("c_rich", "10.00", "p_fresh"), "allow", json!([])),
        (payment("c_rich", "1000.00", "p_fresh"), "allow", json!([])),
    ];
    for (body, decision, reasons) in cases {
        expect(&app, body, decision, reasons).await;
    }
    app.stop().await;
}

async fn the_daily_limit_counts_what_was_reserved_today(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    expect(
        &app,
        payment("c_rich", "5000.00", "p_789"),
        "allow",
        json!([]),
    )
    .await;
    expect(
        &app,
        payment("c_rich", "5000.00", "p_789"),
        "allow",
        json!([]),
    )
    .await;
    let (_, body) = app.decide_json(&payment("c_rich", "0.01", "p_789")).await;
    assert_eq!(body["decision"], "block");
    assert_eq!(body["reasons"], json!(["limit_exceeded"]));
    app.stop().await;
}

async fn too_many_payments_in_the_window_go_to_review(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    for i in 0..10 {
        let (_, body) = app.decide_json(&payment("c_rich", "1.00", "p_789")).await;
        assert_eq!(body["decision"], "allow", "payment {i}: {body}");
    }
    let (_, body) = app.decide_json(&payment("c_rich", "1.00", "p_789")).await;
    assert_eq!(body["decision"], "review", "{body}");
    assert_eq!(body["reasons"], json!(["high_velocity"]));
    app.stop().await;
}

async fn a_failing_risk_tool_fails_safe_to_review(backend: Backend) {
    let app = spawn_with(backend, |c| {
        c.faults = paynow::agent::tools::parse_faults("getRiskSignals=fail").unwrap();
    })
    .await;
    let (_, body) = app.decide_json(&payment("c_456", "10.00", "p_789")).await;
    assert_eq!(body["decision"], "review", "{body}");
    assert_eq!(body["reasons"], json!(["risk_signals_unavailable"]));
    let trace = steps(&body);
    let risk = trace
        .iter()
        .find(|(s, _)| s == "tool:getRiskSignals")
        .unwrap();
    assert!(risk.1.contains("unavailable after 3 attempts"), "{risk:?}");
    let metrics: Value = app.get("/metrics").await.json().await.unwrap();
    assert_eq!(metrics["tool_failures"]["getRiskSignals"], 1);
    app.stop().await;
}

async fn a_timing_out_balance_tool_fails_safe_to_review(backend: Backend) {
    let app = spawn_with(backend, |c| {
        c.faults = paynow::agent::tools::parse_faults("getBalance=timeout").unwrap();
    })
    .await;
    let (_, body) = app.decide_json(&payment("c_456", "10.00", "p_789")).await;
    assert_eq!(body["decision"], "review", "{body}");
    assert_eq!(body["reasons"], json!(["balance_unavailable"]));
    let trace = steps(&body);
    let balance = trace.iter().find(|(s, _)| s == "tool:getBalance").unwrap();
    assert!(balance.1.contains("timed out"), "{balance:?}");
    // Never allow on missing data, and hold nothing.
    assert!(body.get("reservationId").is_none());
    app.stop().await;
}

async fn a_transient_tool_failure_is_retried(backend: Backend) {
    let app = spawn_with(backend, |c| {
        c.faults = paynow::agent::tools::parse_faults("getBalance=flaky:1").unwrap();
    })
    .await;
    let (_, body) = app.decide_json(&payment("c_456", "10.00", "p_789")).await;
    assert_eq!(body["decision"], "allow", "{body}");
    let balance = &body["agentTrace"][1];
    assert_eq!(balance["step"], "tool:getBalance");
    assert_eq!(balance["attempts"], 2);
    app.stop().await;
}

async fn a_request_past_its_deadline_answers_503(backend: Backend) {
    let app = spawn_with(backend, |c| {
        c.request_timeout = std::time::Duration::from_millis(100);
        c.faults = paynow::agent::tools::parse_faults("getBalance=slow:200").unwrap();
    })
    .await;
    let body = payment("c_456", "10.00", "p_789");
    let (status, problem) = app.decide_json(&body).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "request_timeout");
    assert!(problem["requestId"].as_str().unwrap().starts_with("req_"));
    app.stop().await;
}

/// Deadlines that land before, during and after commits: every 503 must mean nothing was
/// stored, and every 200 must be replayable.
async fn a_timeout_answer_means_nothing_was_written(backend: Backend) {
    let mut app = spawn_with(backend, no_rate_limit).await;
    let mut sent: Vec<(Value, u16, bytes::Bytes)> = Vec::new();
    // A sweep of deadlines, so that some land inside commits whatever this machine's speed.
    for deadline_ms in [5, 15, 30, 50, 80, 120] {
        app.config.request_timeout = std::time::Duration::from_millis(deadline_ms);
        app = app.restart().await;
        let bodies: Vec<Value> = (0..40)
            .map(|_| payment("c_rich", "1.00", "p_789"))
            .collect();
        let answers = futures::future::join_all(bodies.iter().map(|b| async {
            let res = app.decide(b).await;
            (res.status().as_u16(), res.bytes().await.unwrap())
        }))
        .await;
        sent.extend(bodies.into_iter().zip(answers).map(|(b, (s, a))| (b, s, a)));
    }
    app.config.request_timeout = std::time::Duration::from_secs(10);
    let app = app.restart().await;
    let (mut ok, mut timed_out) = (0, 0);
    for (body, status, answer) in &sent {
        let again = app.decide(body).await;
        let replayed = again.headers().get("idempotent-replayed").is_some();
        match status {
            200 => {
                ok += 1;
                assert!(replayed, "an answered decision must replay");
                assert_eq!(&again.bytes().await.unwrap(), answer);
            }
            503 => {
                timed_out += 1;
                let problem: Value = serde_json::from_slice(answer).unwrap();
                assert_eq!(problem["code"], "request_timeout");
                assert!(!replayed, "a 503 answer was stored: {body}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    eprintln!("deadline sweep: {ok} answered, {timed_out} timed out");
    assert!(ok > 0, "the sweep must answer some decisions");
    if backend == Backend::Postgres {
        // Its reads wait on a pool, so the shortest deadlines always land before commit.
        assert!(timed_out > 0, "the sweep must time some decisions out");
    }
    app.stop().await;
}
