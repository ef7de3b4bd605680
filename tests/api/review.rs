//! Reviewers: cases opened by review/block decisions, and the reservation lifecycle.

use serde_json::{Value, json};

use crate::helpers::{API_KEY, Backend, TestApp, no_rate_limit, payment, spawn_with};

crate::on_every_backend!(
    a_reviewed_payment_opens_a_case_a_reviewer_can_approve,
    an_approval_that_no_longer_fits_is_refused_and_the_case_stays_open,
    reservations_are_captured_or_released_once,
    held_reservations_expire_after_their_ttl,
    a_blocked_payment_can_be_declined_but_never_approved,
    an_approval_never_passes_the_per_payment_limit,
    review_endpoints_refuse_bad_input,
);

async fn post(app: &TestApp, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = app.client.post(app.url(path)).header("X-API-Key", API_KEY);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app.get(path).await;
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn a_reviewed_payment_opens_a_case_a_reviewer_can_approve(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let (_, decided) = app
        .decide_json(&payment("c_rich", "1500.00", "p_new"))
        .await;
    assert_eq!(decided["decision"], "review");
    let case_id = decided["caseId"].as_str().unwrap().to_owned();

    let (status, list) = get(&app, "/cases?status=open").await;
    assert_eq!(status, 200);
    assert_eq!(list["cases"][0]["id"], case_id.as_str());
    let (status, case) = get(&app, &format!("/cases/{case_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(case["status"], "open");
    assert_eq!(case["reasons"], json!(["new_payee_high_amount"]));
    assert_eq!(case["amount"], "1500.00");
    assert_eq!(case["requestId"], decided["requestId"]);
    assert_eq!(case["agentTrace"], decided["agentTrace"]);

    let (status, approved) = post(
        &app,
        &format!("/cases/{case_id}/resolve"),
        Some(json!({"action": "approve", "note": "customer confirmed by phone"})),
    )
    .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["resolutionNote"], "customer confirmed by phone");
    let reservation_id = approved["reservationId"].as_str().unwrap();
    let (_, reservation) = get(&app, &format!("/reservations/{reservation_id}")).await;
    assert_eq!(reservation["status"], "held");
    assert_eq!(reservation["amount"], "1500.00");
    // The approval reserved the money: 48500.00 is what is left.
    let (_, over) = app
        .decide_json(&payment("c_rich", "48500.01", "p_789"))
        .await;
    assert_eq!(over["reasons"][0], "insufficient_funds");

    // The approved payee is known from now on.
    let (_, known) = app
        .decide_json(&payment("c_rich", "1000.00", "p_new"))
        .await;
    assert_eq!(known["decision"], "allow", "{known}");

    let (status, again) = post(
        &app,
        &format!("/cases/{case_id}/resolve"),
        Some(json!({"action": "decline"})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(again["code"], "case_already_resolved");
    let (_, open) = get(&app, "/cases?status=open").await;
    assert!(
        open["cases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["id"] != case_id.as_str())
    );
    app.stop().await;
}

async fn an_approval_that_no_longer_fits_is_refused_and_the_case_stays_open(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let (_, decided) = app
        .decide_json(&payment("c_rich", "1500.00", "p_new"))
        .await;
    assert_eq!(decided["decision"], "review");
    let case_id = decided["caseId"].as_str().unwrap().to_owned();
    // Meanwhile the day's limit (10000.00) is used up by allowed payments.
    let (_, a) = app
        .decide_json(&payment("c_rich", "5000.00", "p_789"))
        .await;
    let (_, b) = app
        .decide_json(&payment("c_rich", "5000.00", "p_789"))
        .await;
    assert_eq!(
        (a["decision"].as_str(), b["decision"].as_str()),
        (Some("allow"), Some("allow"))
    );
    let resolve = format!("/cases/{case_id}/resolve");
    let (status, refused) = post(&app, &resolve, Some(json!({"action": "approve"}))).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "approval_refused");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("limit_exceeded"),
        "{refused}"
    );
    let (_, case) = get(&app, &format!("/cases/{case_id}")).await;
    assert_eq!(case["status"], "open");
    // Releasing one hold makes room; now the approval goes through.
    let hold = b["reservationId"].as_str().unwrap();
    let (status, _) = post(&app, &format!("/reservations/{hold}/release"), None).await;
    assert_eq!(status, 200);
    let (status, approved) = post(&app, &resolve, Some(json!({"action": "approve"}))).await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "approved");
    app.stop().await;
}

async fn a_blocked_payment_can_be_declined_but_never_approved(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    for body in [
        payment("c_456", "10.00", "p_blocked"),
        payment("c_rich", "6000.00", "p_789"),
        payment("c_789", "125.50", "p_789"),
    ] {
        let (_, decided) = app.decide_json(&body).await;
        assert_eq!(decided["decision"], "block", "{decided}");
        let resolve = format!("/cases/{}/resolve", decided["caseId"].as_str().unwrap());
        let (status, problem) = post(&app, &resolve, Some(json!({"action": "approve"}))).await;
        assert_eq!(status, 409, "{problem}");
        assert_eq!(problem["code"], "case_not_approvable");
        let (status, declined) = post(&app, &resolve, Some(json!({"action": "decline"}))).await;
        assert_eq!(status, 200);
        assert_eq!(declined["status"], "declined");
        assert!(declined.get("reservationId").is_none());
    }
    // Nothing was reserved for c_456 by any of that.
    let (_, all) = app.decide_json(&payment("c_456", "1000.00", "p_789")).await;
    assert_eq!(all["decision"], "allow", "{all}");
    app.stop().await;
}

async fn reservations_are_captured_or_released_once(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let (_, first) = app.decide_json(&payment("c_456", "600.00", "p_789")).await;
    let first_id = first["reservationId"].as_str().unwrap().to_owned();
    // Released: the 600.00 is available again.
    let (status, released) = post(&app, &format!("/reservations/{first_id}/release"), None).await;
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["status"], "released");
    let (status, twice) = post(&app, &format!("/reservations/{first_id}/capture"), None).await;
    assert_eq!(status, 409);
    assert_eq!(twice["code"], "reservation_not_held");
    let (_, all) = app.decide_json(&payment("c_456", "1000.00", "p_789")).await;
    assert_eq!(all["decision"], "allow", "{all}");
    // Captured: the money has left the balance for good.
    let all_id = all["reservationId"].as_str().unwrap().to_owned();
    let (status, captured) = post(&app, &format!("/reservations/{all_id}/capture"), None).await;
    assert_eq!(status, 200);
    assert_eq!(captured["status"], "captured");
    assert!(captured["settledMs"].as_i64().unwrap() > 0);
    let (_, nothing) = app.decide_json(&payment("c_456", "0.01", "p_789")).await;
    assert_eq!(nothing["reasons"][0], "insufficient_funds");
    let trace_balance = nothing["agentTrace"][1]["detail"].as_str().unwrap();
    assert_eq!(trace_balance, "balance=0.00");
    let (status, _) = post(&app, &format!("/reservations/{all_id}/release"), None).await;
    assert_eq!(status, 409);
    app.stop().await;
}

async fn held_reservations_expire_after_their_ttl(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let (_, held) = app.decide_json(&payment("c_456", "1000.00", "p_789")).await;
    let id = held["reservationId"].as_str().unwrap().to_owned();
    // A second handle on the same database runs the sweep as the background task would.
    let state = paynow::startup::build_state(app.config.clone())
        .await
        .unwrap();
    let now = paynow::store::now_ms();
    assert_eq!(
        state
            .store
            .expire_reservations(now - 60_000, now)
            .await
            .unwrap(),
        0,
        "too young"
    );
    assert_eq!(
        state.store.expire_reservations(now + 1, now).await.unwrap(),
        1
    );
    state.store.close().await;
    let (_, r) = get(&app, &format!("/reservations/{id}")).await;
    assert_eq!(r["status"], "expired");
    let (_, again) = app.decide_json(&payment("c_456", "1000.00", "p_789")).await;
    assert_eq!(
        again["decision"], "allow",
        "the expired hold gave the money back: {again}"
    );
    app.stop().await;
}

async fn review_endpoints_refuse_bad_input(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let (_, decided) = app.decide_json(&payment("c_123", "10.00", "p_789")).await;
    let case_id = decided["caseId"].as_str().unwrap().to_owned();
    let resolve = format!("/cases/{case_id}/resolve");
    for (body, field) in [
        (json!({"action": "maybe"}), "action"),
        (json!({"action": "approve", "extra": 1}), "extra"),
        (json!({"note": "no action"}), "action"),
        // The fields in order, as an array: serde alone would take it.
        (json!(["decline", "x"]), "body"),
        (
            json!({"action": "decline", "note": "x".repeat(1001)}),
            "note",
        ),
    ] {
        let (status, problem) = post(&app, &resolve, Some(body.clone())).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }
    for (path, code) in [
        ("/cases/case_nope", "case_not_found"),
        ("/reservations/res_nope", "reservation_not_found"),
        ("/cases/..%2Fetc", "case_not_found"),
        // Not UTF-8 once percent-decoded: still a problem, not the router's plain text.
        ("/cases/%FF", "case_not_found"),
        ("/cases/%C3%28", "case_not_found"),
        ("/reservations/%FF", "reservation_not_found"),
        ("/nope/x", "not_found"),
    ] {
        let res = app.get(path).await;
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], code, "{path}");
    }
    for (path, body, code) in [
        (
            "/reservations/res_nope/capture",
            None,
            "reservation_not_found",
        ),
        ("/reservations/%FF/capture", None, "reservation_not_found"),
        ("/reservations/%FF/release", None, "reservation_not_found"),
        (
            "/cases/%FF/resolve",
            Some(json!({"action": "decline"})),
            "case_not_found",
        ),
    ] {
        let (status, problem) = post(&app, path, body).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(problem["code"], code, "{path}");
    }
    for query in [
        "status=closed",
        "limit=0",
        "limit=x",
        "sort=asc",
        "status=%FF",
    ] {
        let (status, _) = get(&app, &format!("/cases?{query}")).await;
        assert_eq!(status, 422, "{query}");
    }
    // Query strings are read percent-decoded, as clients encode them.
    for query in ["status=%6Fpen", "st%61tus=open&&limit=%35"] {
        let (status, list) = get(&app, &format!("/cases?{query}")).await;
        assert_eq!(status, 200, "{query}: {list}");
        assert_eq!(list["cases"][0]["id"], case_id.as_str(), "{query}");
    }
    let res = app.client.get(app.url("/cases")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    // The case is still open after all that.
    let (_, case) = get(&app, &format!("/cases/{case_id}")).await;
    assert_eq!(case["status"], "open");
    app.stop().await;
}

/// A review from missing data never checked the per-payment limit; the approval must.
async fn an_approval_never_passes_the_per_payment_limit(backend: Backend) {
    let app = spawn_with(backend, |c| {
        no_rate_limit(c);
        c.faults = paynow::agent::tools::parse_faults("getBalance=fail").unwrap();
    })
    .await;
    let (_, over) = app
        .decide_json(&payment("c_rich", "6000.00", "p_789"))
        .await;
    assert_eq!(over["reasons"], json!(["balance_unavailable"]), "{over}");
    let resolve = format!("/cases/{}/resolve", over["caseId"].as_str().unwrap());
    let (status, refused) = post(&app, &resolve, Some(json!({"action": "approve"}))).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "approval_refused");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("limit_exceeded")
    );
    // Within the limit, the same kind of case can be approved once the reviewer checked.
    let (_, within) = app.decide_json(&payment("c_rich", "100.00", "p_789")).await;
    let resolve = format!("/cases/{}/resolve", within["caseId"].as_str().unwrap());
    let (status, approved) = post(&app, &resolve, Some(json!({"action": "approve"}))).await;
    assert_eq!(status, 200, "{approved}");
    // Control characters in a note are refused before anything is written.
    let (_, another) = app.decide_json(&payment("c_rich", "50.00", "p_789")).await;
    let resolve = format!("/cases/{}/resolve", another["caseId"].as_str().unwrap());
    let (status, problem) = post(
        &app,
        &resolve,
        Some(json!({"action": "decline", "note": "a\u{0}b"})),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "note");
    app.stop().await;
}
