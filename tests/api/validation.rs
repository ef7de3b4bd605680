//! Bad input: the right 4xx problem naming the field, and no change of state.

use serde_json::{Value, json};

use crate::helpers::{API_KEY, Backend, no_rate_limit, payment, spawn_with};

crate::on_every_backend!(
    bad_input_gets_a_clear_4xx_and_changes_nothing,
    mutated_bodies_never_get_a_5xx,
);

fn base() -> Value {
    json!({"customerId":"c_456","amount":600.00,"currency":"USD","payeeId":"p_789","idempotencyKey":"k-valid"})
}

fn with(field: &str, value: Value) -> String {
    let mut b = base();
    b[field] = value;
    b.to_string()
}

fn without(field: &str) -> String {
    let mut b = base();
    b.as_object_mut().unwrap().remove(field);
    b.to_string()
}

async fn bad_input_gets_a_clear_4xx_and_changes_nothing(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let long = "x".repeat(65);
    // (body, expected status, expected code, expected field)
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{".into(), 400, "malformed_json", ""),
        ("not json".into(), 400, "malformed_json", ""),
        (format!("{} {{}}", base()), 400, "malformed_json", ""),
        ("[]".into(), 422, "validation_failed", "body"),
        ("null".into(), 422, "validation_failed", "body"),
        ("1".into(), 422, "validation_failed", "body"),
        // The fields in order, as an array: serde alone would decide it as a payment.
        (r#"["c_456",1,"USD","p_789","k-array"]"#.into(), 422, "validation_failed", "body"),
        (without("customerId"), 422, "validation_failed", "customerId"),
        (without("amount"), 422, "validation_failed", "amount"),
        (without("currency"), 422, "validation_failed", "currency"),
        (without("payeeId"), 422, "validation_failed", "payeeId"),
        (with("surprise", json!(1)), 422, "validation_failed", "surprise"),
        (
            r#"{"customerId":"c_456","customerId":"c_123","amount":1,"currency":"USD","payeeId":"p_789","idempotencyKey":"k"}"#.into(),
            422,
            "validation_failed",
            "customerId",
        ),
        (with("customerId", json!(123)), 422, "validation_failed", "customerId"),
        (with("customerId", json!("")), 422, "validation_failed", "customerId"),
        (with("customerId", json!(long)), 422, "validation_failed", "customerId"),
        (with("customerId", json!("c 456")), 422, "validation_failed", "customerId"),
        (with("customerId", json!("c_456\n")), 422, "validation_failed", "customerId"),
        (with("payeeId", json!("p/789")), 422, "validation_failed", "payeeId"),
        (with("amount", json!(-1)), 422, "validation_failed", "amount"),
        (with("amount", json!(0)), 422, "validation_failed", "amount"),
        (with("amount", json!(0.001)), 422, "validation_failed", "amount"),
        (with("amount", json!(1.005)), 422, "validation_failed", "amount"),
        (with("amount", json!(1e15)), 422, "validation_failed", "amount"),
        (r#"{"customerId":"c_456","amount":1e400,"currency":"USD","payeeId":"p_789","idempotencyKey":"k"}"#.into(), 422, "validation_failed", "amount"),
        (with("amount", json!("abc")), 422, "validation_failed", "amount"),
        (with("amount", json!(true)), 422, "validation_failed", "amount"),
        (with("amount", json!(null)), 422, "validation_failed", "amount"),
        (with("amount", json!([1])), 422, "validation_failed", "amount"),
        (with("currency", json!("usd")), 422, "validation_failed", "currency"),
        (with("currency", json!("XYZ")), 422, "validation_failed", "currency"),
        (with("currency", json!("US")), 422, "validation_failed", "currency"),
        (with("currency", json!(840)), 422, "validation_failed", "currency"),
        (with("idempotencyKey", json!("")), 422, "validation_failed", "idempotencyKey"),
        (with("idempotencyKey", json!("k".repeat(256))), 422, "validation_failed", "idempotencyKey"),
        (with("idempotencyKey", json!("tab\tkey")), 422, "validation_failed", "idempotencyKey"),
        (with("context", json!({"deviceId": "d1", "other": 1})), 422, "validation_failed", "context.other"),
        (with("context", json!({"ipCountry": "usa"})), 422, "validation_failed", "context.ipCountry"),
        (with("context", json!("x")), 422, "validation_failed", "context"),
        (with("context", json!(["dev-1", "US"])), 422, "validation_failed", "context"),
        (with("amount", json!("1_000")), 422, "validation_failed", "amount"),
        (with("amount", json!(" 12.50")), 422, "validation_failed", "amount"),
        (with("amount", json!("+12.50")), 422, "validation_failed", "amount"),
        (with("amount", json!(".5")), 422, "validation_failed", "amount"),
        // More digits than a 96-bit decimal holds, before an exponent: never rounded to fit.
        (r#"{"customerId":"c_456","amount":0.0999999999999999999999999999999e1,"currency":"USD","payeeId":"p_789","idempotencyKey":"k"}"#.into(), 422, "validation_failed", "amount"),
        (with("amount", json!("0.0000000000000000000000000001234e28")), 422, "validation_failed", "amount"),
        (r#"{"customerId":"c_456","amount":1.0000000000000000000000000000001,"currency":"USD","payeeId":"p_789","idempotencyKey":"k"}"#.into(), 422, "validation_failed", "amount"),
    ];
    for (body, status, code, field) in &cases {
        let res = app
            .client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), *status, "{body}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], *code, "{body}: {problem}");
        assert_eq!(problem["status"], *status);
        assert_eq!(problem["requestId"], request_id.as_str());
        assert!(problem["type"].as_str().unwrap().ends_with(code));
        if !field.is_empty() {
            let fields: Vec<&str> = problem["errors"]
                .as_array()
                .unwrap_or_else(|| panic!("{body}: no errors in {problem}"))
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            assert!(
                fields.contains(field),
                "{body}: expected {field} in {fields:?}"
            );
        }
    }

    let send = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap() };
    // Wrong content type.
    let res = send(
        app.client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY)
            .header("Content-Type", "text/plain")
            .body(base().to_string()),
    )
    .await;
    assert_eq!(res.status(), 415);
    // Oversized body.
    let mut big = base();
    big["padding"] = json!("x".repeat(20 * 1024));
    let res = send(
        app.client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY)
            .json(&big),
    )
    .await;
    assert_eq!(res.status(), 413);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "payload_too_large");
    // Wrong method, unknown path.
    let res = send(
        app.client
            .get(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY),
    )
    .await;
    assert_eq!(res.status(), 405);
    let res = send(
        app.client
            .get(app.url("/nope"))
            .header("X-API-Key", API_KEY),
    )
    .await;
    assert_eq!(res.status(), 404);
    // No key, wrong key.
    let res = send(app.client.post(app.url("/payments/decide")).json(&base())).await;
    assert_eq!(res.status(), 401);
    let res = send(
        app.client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", "wrong-key-123")
            .json(&base()),
    )
    .await;
    assert_eq!(res.status(), 401);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "unauthorized");
    assert!(!problem.to_string().contains("wrong-key-123"));

    // Nothing above touched state: no decision counted, the full balance is still there.
    let metrics: Value = app.get("/metrics").await.json().await.unwrap();
    assert_eq!(metrics["decisions"]["allow"], 0);
    assert_eq!(metrics["decisions"]["block"], 0);
    let (_, body) = app.decide_json(&payment("c_456", "1000.00", "p_789")).await;
    assert_eq!(body["decision"], "allow", "{body}");
    // And the key used by the bad requests was never stored.
    let (status, body) = app.decide_json(&base()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reasons"], json!(["insufficient_funds"]));
    app.stop().await;
}

/// A small deterministic fuzz over the wire: the valid body with bytes flipped, inserted and
/// removed, sent to the live server. Nothing may answer 5xx.
async fn mutated_bodies_never_get_a_5xx(backend: Backend) {
    let app = spawn_with(backend, no_rate_limit).await;
    let valid = base().to_string().into_bytes();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"{}[]\":,.-+eE0123456789 \\nu\x00\xff";
    for i in 0..300 {
        let mut body = valid.clone();
        for _ in 0..(1 + next() % 4) {
            let pos = (next() as usize) % body.len().max(1);
            let byte = if next() % 2 == 0 {
                alphabet[(next() as usize) % alphabet.len()]
            } else {
                next() as u8
            };
            match next() % 3 {
                0 if !body.is_empty() => body[pos] = byte,
                1 => body.insert(pos, byte),
                _ if !body.is_empty() => {
                    body.remove(pos);
                }
                _ => {}
            }
        }
        let res = app
            .client
            .post(app.url("/payments/decide"))
            .header("X-API-Key", API_KEY)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", format!("fuzz-{i}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        assert!(
            matches!(status, 200 | 400 | 422),
            "{status} for {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    app.stop().await;
}
