use serde_json::{Value, json};

use crate::helpers::{Backend, payment, spawn_app};

crate::on_every_backend!(the_brief_example_is_reviewed_for_recent_disputes);

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
    let steps: Vec<(&str, &str)> = body["agentTrace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["detail"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("plan", "Check balance, risk, and limits"),
            ("tool:getBalance", "balance=300.00"),
            ("tool:getRiskSignals", "recent_disputes=2, device_change=true"),
            ("tool:recommend", "route to manual review"),
        ]
    );
    assert!(body["caseId"].as_str().unwrap().starts_with("case_"));
    let _ = payment;
    app.stop().await;
}
