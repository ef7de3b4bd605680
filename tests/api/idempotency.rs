//! Idempotency: replays, reuse, concurrency, restarts.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{API_KEY, Backend, TestApp, no_rate_limit, payment, spawn_app, spawn_with};

crate::on_every_backend!(
    the_same_key_and_payload_replays_the_identical_response,
    the_same_key_with_another_payload_is_refused,
    the_key_may_come_in_the_header,
    sixteen_concurrent_requests_with_one_key_execute_once,
    stored_answers_survive_a_restart,
    expired_answers_are_purged_and_the_key_is_free_again,
    idempotency_keys_are_scoped_by_caller,
    a_rotated_api_key_keeps_the_callers_idempotency_keys,
);

async fn the_same_key_and_payload_replays_the_identical_response(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = payment("c_456", "600.00", "p_789");
    let first = app.decide(&body).await;
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_id = first.headers()["x-request-id"].clone();
    let first = first.bytes().await.unwrap();
    // 600 and 600.00 are the same payment.
    let mut same = body.clone();
    same["amount"] = json!(600);
    let second = app.decide(&same).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["x-request-id"], first_id);
    assert_eq!(
        second.bytes().await.unwrap(),
        first,
        "byte-identical replay"
    );
    // Only one reservation was made: 400.00 is still available.
    let (_, body) = app.decide_json(&payment("c_456", "400.00", "p_789")).await;
    assert_eq!(body["decision"], "allow", "{body}");
    let metrics: Value = app.get("/metrics").await.json().await.unwrap();
    assert_eq!(metrics["idempotent_replays"], 1);
    assert_eq!(metrics["decisions"]["allow"], 2);
    app.stop().await;
}

async fn the_same_key_with_another_payload_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = payment("c_456", "10.00", "p_789");
    assert_eq!(app.decide(&body).await.status(), 200);
    let mut other = body.clone();
    other["amount"] = json!(11.00);
    let (status, problem) = app.decide_json(&other).await;
    assert_eq!(status, 422);
    assert_eq!(problem["code"], "idempotency_key_reused");
    app.stop().await;
}

async fn the_key_may_come_in_the_header(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut body = payment("c_456", "10.00", "p_789");
    body.as_object_mut().unwrap().remove("idempotencyKey");
    let send = |key: &'static str, body: Value| {
        app.client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = send("header-key-1", body.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    let again = send("header-key-1", body.clone()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    // Body and header disagree: refused, naming the field.
    let mut both = body.clone();
    both["idempotencyKey"] = json!("another");
    let res = send("header-key-2", both).await.unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "idempotencyKey");
    // Neither: refused.
    let (status, problem) = app.decide_json(&body).await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["field"], "idempotencyKey");
    app.stop().await;
}

async fn sixteen_concurrent_requests_with_one_key_execute_once(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let body = payment("c_456", "600.00", "p_789");
    let sends = (0..16).map(|_| async {
        let res = app.decide(&body).await;
        let status = res.status().as_u16();
        (status, res.bytes().await.unwrap())
    });
    let answers = futures::future::join_all(sends).await;
    let mut bodies = HashSet::new();
    for (status, bytes) in &answers {
        match status {
            200 => {
                bodies.insert(bytes.clone());
            }
            409 => {
                let problem: Value = serde_json::from_slice(bytes).unwrap();
                assert_eq!(problem["code"], "idempotency_in_progress");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(bodies.len(), 1, "every 200 carries the one stored answer");
    // Exactly one reservation of 600.00: 400.00 left, not less.
    let (_, after) = app.decide_json(&payment("c_456", "400.00", "p_789")).await;
    assert_eq!(after["decision"], "allow", "{after}");
    let metrics: Value = app.get("/metrics").await.json().await.unwrap();
    assert_eq!(metrics["decisions"]["allow"], 2, "{metrics}");
    app.stop().await;
}

async fn stored_answers_survive_a_restart(backend: Backend) {
    let app = spawn_app(backend).await;
    let bodies = [
        payment("c_456", "600.00", "p_789"),
        payment("c_123", "125.50", "p_789"),
        payment("c_789", "125.50", "p_789"),
    ];
    let mut answers = Vec::new();
    for b in &bodies {
        answers.push(app.decide(b).await.bytes().await.unwrap());
    }
    let app = app.restart().await;
    for (b, answer) in bodies.iter().zip(&answers) {
        let res = app.decide(b).await;
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(&res.bytes().await.unwrap(), answer);
    }
    // The reservation survived too.
    let (_, body) = app.decide_json(&payment("c_456", "400.01", "p_789")).await;
    assert_eq!(body["reasons"], json!(["insufficient_funds"]));
    app.stop().await;
}

async fn expired_answers_are_purged_and_the_key_is_free_again(backend: Backend) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let database_url = backend.fresh_database(dir.path()).await;
    let mut config = paynow::Config::with_key(API_KEY, &database_url).unwrap();
    config.idempotency_ttl = std::time::Duration::from_secs(1);
    let state = paynow::startup::build_state(config.clone()).await.unwrap();
    let app = crate::helpers::start(config, dir).await;
    let body = payment("c_456", "100.00", "p_789");
    let first: Value = app.decide(&body).await.json().await.unwrap();
    let replay = app.decide(&body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // Past its TTL the answer is no longer replayed: the key decides afresh.
    let again = app.decide(&body).await;
    assert!(again.headers().get("idempotent-replayed").is_none());
    let again: Value = again.json().await.unwrap();
    assert_ne!(again["requestId"], first["requestId"]);
    // The purge removes what expired (the second answer expires a second later).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let purged = state
        .store
        .purge_expired(paynow::store::now_ms())
        .await
        .unwrap();
    assert_eq!(purged, 1);
    state.store.close().await;
    app.stop().await;
}

/// An app whose callers are the `API_KEYS` given, and a payment that any of them can send.
async fn spawn_with_keys(backend: Backend, api_keys: &'static str) -> (TestApp, Value) {
    let app = spawn_with(backend, |c| {
        c.api_keys = paynow::config::ApiKeys::parse(None, Some(api_keys)).unwrap();
    })
    .await;
    (app, payment("c_456", "600.00", "p_789"))
}

async fn idempotency_keys_are_scoped_by_caller(backend: Backend) {
    let (app, body) = spawn_with_keys(backend, "bank-a:key-a-123456,bank-b:key-b-123456").await;
    let send = |key: &'static str| app.decide_as(key, &body);
    let a: Value = send("key-a-123456").await.json().await.unwrap();
    assert_eq!(a["decision"], "allow");
    // The same idempotency key from another caller is another payment, not a replay.
    let b = send("key-b-123456").await;
    assert!(b.headers().get("idempotent-replayed").is_none());
    let b: Value = b.json().await.unwrap();
    assert_eq!(b["reasons"], json!(["insufficient_funds"]), "{b}");
    // And each caller replays its own answer.
    let again = send("key-a-123456").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["requestId"], a["requestId"]);
    app.stop().await;
}

/// Rotation: the caller's new key has the name of its old one, so a retry sent with the new key
/// replays the answer given to the old one instead of paying again.
async fn a_rotated_api_key_keeps_the_callers_idempotency_keys(backend: Backend) {
    let (app, body) = spawn_with_keys(backend, "bank-a:old-key-123456,bank-a:new-key-123456").await;
    let first: Value = app
        .decide_as("old-key-123456", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["decision"], "allow", "{first}");
    let retry = app.decide_as("new-key-123456", &body).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["requestId"], first["requestId"]);
    assert_eq!(retry["reservationId"], first["reservationId"]);
    app.stop().await;
}
