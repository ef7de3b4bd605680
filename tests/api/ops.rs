//! Operating PayNow: health, readiness, metrics, the API document and the evals.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{API_KEY, Backend, payment, spawn_app};

crate::on_every_backend!(
    health_needs_no_key_and_readiness_follows_the_store,
    metrics_count_requests_decisions_and_latency,
    the_shipped_eval_cases_all_pass_against_a_fresh_server,
);

async fn health_needs_no_key_and_readiness_follows_the_store(backend: Backend) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let database_url = backend.fresh_database(dir.path()).await;
    let config = paynow::Config::with_key(API_KEY, &database_url).unwrap();
    let state = paynow::startup::build_state(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(paynow::startup::serve_state(
        state.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["store"], "ok");
    // Everything else needs the key.
    for path in ["/metrics", "/metrics/prometheus", "/openapi.json"] {
        let res = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    // The store goes away: not ready, and decisions answer 503 without writing anything.
    state.store.close().await;
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let res = client
        .post(format!("{base}/payments/decide"))
        .header("X-API-Key", API_KEY)
        .json(&payment("c_456", "1.00", "p_789"))
        .send()
        .await
        .unwrap();
    // A closed store may still answer reads; the write must fail and say so.
    assert_eq!(res.status(), 503);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "storage_unavailable");
    assert!(
        !problem["detail"].as_str().unwrap().contains("closed"),
        "5xx bodies are opaque"
    );
    let _ = stop.send(());
    let _ = server.await;
}

async fn metrics_count_requests_decisions_and_latency(backend: Backend) {
    let app = spawn_app(backend).await;
    app.decide(&payment("c_456", "10.00", "p_789")).await;
    app.decide(&payment("c_123", "10.00", "p_789")).await;
    app.decide(&payment("c_789", "100.00", "p_789")).await;
    let m: Value = app.get("/metrics").await.json().await.unwrap();
    assert_eq!(m["total_requests"], 3, "{m}");
    assert_eq!(m["decisions"]["allow"], 1);
    assert_eq!(m["decisions"]["review"], 1);
    assert_eq!(m["decisions"]["block"], 1);
    assert_eq!(m["reasons"]["recent_disputes"], 1);
    assert!(m["p95_latency_ms"].as_f64().unwrap() > 0.0);
    let text = app.get("/metrics/prometheus").await.text().await.unwrap();
    assert!(
        text.contains("paynow_http_request_duration_seconds_bucket{route=\"/payments/decide\"")
    );
    assert!(text.contains("paynow_decisions_total{decision=\"allow\"} 1"));
    assert!(text.contains("paynow_http_requests_total{route=\"/metrics\",status=\"200\"} 1"));
    app.stop().await;
}

async fn the_shipped_eval_cases_all_pass_against_a_fresh_server(backend: Backend) {
    let app = spawn_app(backend).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_paynow"))
        .args([
            "eval",
            concat!(env!("CARGO_MANIFEST_DIR"), "/eval_cases.json"),
        ])
        .args(["--base", &app.base, "--api-key", API_KEY])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let cases = paynow::eval::load_cases(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/eval_cases.json"
    )))
    .unwrap();
    assert!(cases.len() >= 12);
    assert!(
        stdout.contains(&format!("✅ {n}/{n} correct", n = cases.len())),
        "{stdout}"
    );
    // Every reason of the default policy a live server can give is covered.
    let covered: BTreeSet<&str> = cases
        .iter()
        .flat_map(|c| c.expect.reasons.iter().map(String::as_str))
        .collect();
    for reason in paynow::domain::Reason::ALL {
        let needs_fault = reason.as_str().ends_with("_unavailable");
        assert!(
            needs_fault || covered.contains(reason.as_str()),
            "no eval case for {}",
            reason.as_str()
        );
    }
    // A wrong expectation fails with exit 1 and the ❌ summary.
    let bad = app.dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"name":"wrong","request":{"customerId":"c_789","amount":1.00,"currency":"USD","payeeId":"p_789"},"expect":{"decision":"block","reasons":["insufficient_funds"]}}]"#,
    )
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_paynow"))
        .arg("eval")
        .arg(&bad)
        .args(["--base", &app.base, "--api-key", API_KEY])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("❌ 0/1 correct"), "{stdout}");
    assert!(stdout.contains("FAIL wrong"), "{stdout}");
    app.stop().await;
}

#[tokio::test]
async fn every_routed_path_is_in_the_openapi_document() {
    let app = spawn_app(Backend::Sqlite).await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let routed: BTreeSet<String> = paynow::http::ROUTES
        .iter()
        .map(|(_, p)| p.to_string())
        .collect();
    assert_eq!(documented, routed);
    // Each documented operation is routed on the live server: no 405, and no 404 from the
    // fallback (`not_found`); a handler's own 404 (`case_not_found`, …) means it was reached.
    for (method, path) in paynow::http::ROUTES {
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is not documented");
        let concrete = path.replace("{id}", "x");
        let res = app
            .client
            .request(method.parse().unwrap(), app.url(&concrete))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        assert_ne!(status, 405, "{method} {path}");
        assert_ne!(body["code"], "not_found", "{method} {path} is not routed");
    }
    // Error responses are documented for the decision endpoint.
    let responses = doc["paths"]["/payments/decide"]["post"]["responses"]
        .as_object()
        .unwrap();
    for code in [
        "200", "400", "401", "409", "413", "415", "422", "429", "503",
    ] {
        assert!(responses.contains_key(code), "decide lacks {code}");
    }
    // Money is never described as a binary float.
    let amount = &doc["components"]["schemas"]["DecideRequest"]["properties"]["amount"];
    assert!(amount["oneOf"].is_array(), "{amount}");
    assert!(!amount.to_string().contains("double") && !amount.to_string().contains("float"));
    for schema in ["DecideRequest", "DecideResponse", "Problem"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    app.stop().await;
}
