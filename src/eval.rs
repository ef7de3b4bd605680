//! `paynow eval CASES.json --base URL --api-key KEY`: sends each case to a running server and
//! compares the decision and reasons with what the case expects.
//!
//! A case may list `setup` requests that run first (their answers are not checked), so each
//! case carries the history it needs and the cases are independent of each other and of
//! order. Every request gets a fresh idempotency key.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalCase {
    pub name: String,
    #[serde(default)]
    pub setup: Vec<Value>,
    pub request: Value,
    pub expect: Expected,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    pub decision: String,
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// Outcome of one case: `None` if it passed, else what went wrong.
async fn run_case(
    client: &reqwest::Client,
    base: &str,
    api_key: &str,
    case: &EvalCase,
    run_id: &str,
) -> Option<String> {
    let url = format!("{}/payments/decide", base.trim_end_matches('/'));
    let send = |body: &Value, n: usize| {
        let mut body = body.clone();
        if let Some(obj) = body.as_object_mut() {
            obj.insert(
                "idempotencyKey".into(),
                Value::String(format!("eval-{run_id}-{}-{n}", case.name)),
            );
        }
        client
            .post(&url)
            .header("X-API-Key", api_key)
            .json(&body)
            .send()
    };
    for (n, step) in case.setup.iter().enumerate() {
        // Setup requests are paced under the default rate limit (5/s per customer).
        loop {
            match send(step, n).await {
                Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(r) if r.status().is_success() => break,
                Ok(r) => return Some(format!("setup request {n} answered {}", r.status())),
                Err(e) => return Some(format!("setup request {n} failed: {e}")),
            }
        }
    }
    let response = loop {
        match send(&case.request, usize::MAX).await {
            Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(r) => break r,
            Err(e) => return Some(format!("request failed: {e}")),
        }
    };
    let status = response.status();
    let body: Value = match response.json().await {
        Ok(v) => v,
        Err(e) => return Some(format!("status {status}, unreadable body: {e}")),
    };
    if !status.is_success() {
        return Some(format!("status {status}: {body}"));
    }
    let decision = body["decision"].as_str().unwrap_or("").to_owned();
    let reasons: Vec<String> = body["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if decision == case.expect.decision && reasons == case.expect.reasons {
        None
    } else {
        Some(format!(
            "expected {} {:?}, got {} {:?}",
            case.expect.decision, case.expect.reasons, decision, reasons
        ))
    }
}

pub fn load_cases(path: &Path) -> anyhow::Result<Vec<EvalCase>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let cases: Vec<EvalCase> = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid cases in {}: {e}", path.display()))?;
    // An empty file would "pass" while checking nothing.
    if cases.is_empty() {
        anyhow::bail!("no cases in {}", path.display());
    }
    Ok(cases)
}

/// Runs every case and prints failures and a summary; exit 0 only if all pass.
pub async fn run(path: &Path, base: &str, api_key: &str) -> anyhow::Result<ExitCode> {
    let cases = load_cases(path)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let run_id = &run_id[..12];
    let mut failed = 0;
    for case in &cases {
        if let Some(problem) = run_case(&client, base, api_key, case, run_id).await {
            failed += 1;
            println!("FAIL {}: {problem}", case.name);
        }
    }
    let passed = cases.len() - failed;
    if failed == 0 {
        println!("✅ {passed}/{} correct", cases.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("❌ {passed}/{} correct", cases.len());
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_case_file_is_an_error_not_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.json");
        std::fs::write(&path, "[]").unwrap();
        let Err(err) = super::load_cases(&path) else {
            panic!("an empty file loaded");
        };
        let err = err.to_string();
        assert!(err.contains("no cases"), "{err}");
    }
}
