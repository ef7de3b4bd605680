//! The real binary as its own process: crash safety (kill -9), graceful shutdown, and what
//! its logs may contain.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{API_KEY, Backend, payment};

crate::on_every_backend!(every_answered_decision_survives_kill_9);

struct Server {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_binary(database_url: &str, extra_env: &[(&str, &str)], stdout: Stdio) -> Server {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paynow"));
    cmd.env_clear()
        .env("API_KEY", API_KEY)
        .env("PAYNOW_BIND", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", database_url)
        .env("PAYNOW_RATE_LIMIT_RPS", "10000")
        .env("PAYNOW_RATE_LIMIT_BURST", "10000")
        .stdout(stdout)
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start paynow");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server { child, base }
}

async fn decide(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("{base}/payments/decide"))
        .header("X-API-Key", API_KEY)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn every_answered_decision_survives_kill_9(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database_url = backend.fresh_database(dir.path()).await;
    let client = reqwest::Client::new();
    let mut server = start_binary(&database_url, &[], Stdio::null()).await;

    // 40 concurrent payments, 20 of them by c_456 whose 1000.00 covers only 10 of 100.00.
    let bodies: Vec<Value> = (0..40)
        .map(|i| match i % 4 {
            0 | 1 => payment("c_456", "100.00", "p_789"),
            2 => payment("c_123", "10.00", "p_789"),
            _ => payment("c_rich", "50.00", "p_789"),
        })
        .collect();
    let answers: Vec<(Value, bytes::Bytes)> = futures::future::join_all(bodies.iter().map(|b| {
        let client = client.clone();
        let base = server.base.clone();
        async move {
            let res = decide(&client, &base, b).await;
            assert_eq!(res.status(), 200);
            (b.clone(), res.bytes().await.unwrap())
        }
    }))
    .await;

    // No goodbye: SIGKILL right after the answers.
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let server = start_binary(&database_url, &[], Stdio::null()).await;
    for (body, answer) in &answers {
        let res = decide(&client, &server.base, body).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["idempotent-replayed"],
            "true",
            "answer lost: {body}"
        );
        assert_eq!(
            &res.bytes().await.unwrap(),
            answer,
            "replay differs: {body}"
        );
    }
    let allowed_456 = answers
        .iter()
        .filter(|(b, a)| {
            b["customerId"] == "c_456"
                && serde_json::from_slice::<Value>(a).unwrap()["decision"] == "allow"
        })
        .count();
    assert_eq!(allowed_456, 10);
    // The reservations survived with the answers: nothing left for c_456.
    let res = decide(&client, &server.base, &payment("c_456", "0.01", "p_789")).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["reasons"][0], "insufficient_funds", "{body}");
    let mut child = server.child;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("p.db").display());
    // Slow tools keep a request in flight while the signal arrives.
    let server = start_binary(
        &database_url,
        &[("PAYNOW_FAULTS", "getBalance=slow:200")],
        Stdio::null(),
    )
    .await;
    let client = reqwest::Client::new();
    let in_flight = {
        let client = client.clone();
        let base = server.base.clone();
        tokio::spawn(async move {
            decide(&client, &base, &payment("c_456", "10.00", "p_789"))
                .await
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request was finished"
    );
    let mut child = server.child;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_without_ids_or_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("p.db").display());
    let server = start_binary(&database_url, &[], Stdio::piped()).await;
    let client = reqwest::Client::new();
    for body in [
        payment("c_123", "125.50", "p_789"),
        payment("c_456", "600.00", "p_789"),
        payment("c_nope", "1.00", "p_blocked"),
    ] {
        assert_eq!(decide(&client, &server.base, &body).await.status(), 200);
    }
    let res = client
        .post(format!("{}/payments/decide", server.base))
        .header("X-API-Key", "not-the-key-42")
        .json(&payment("c_456", "1.00", "p_789"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let mut child = server.child;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || {
        child.wait().unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        out
    })
    .await
    .unwrap();

    let lines: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "http.request")
        .collect();
    assert_eq!(requests.len(), 5, "readyz + 3 decisions + 1 refused");
    for r in &requests {
        for field in ["requestId", "method", "path", "status", "latency_ms"] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
    }
    assert!(
        requests
            .iter()
            .any(|r| r["path"] == "/payments/decide" && r["status"] == 401)
    );
    let decided: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "payment.decided")
        .collect();
    assert_eq!(decided.len(), 3);
    assert!(
        decided
            .iter()
            .any(|d| d["customerId"] == "c_***23" && d["decision"] == "review")
    );
    for secret in [
        API_KEY,
        "not-the-key-42",
        "c_123",
        "c_456",
        "c_nope",
        "p_789",
        "p_blocked",
    ] {
        assert!(!output.contains(secret), "{secret:?} appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_hold_shutdown_past_the_grace_period() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("p.db").display());
    let server = start_binary(
        &database_url,
        &[("PAYNOW_REQUEST_TIMEOUT_MS", "100")],
        Stdio::null(),
    )
    .await;
    // Half a request, never finished.
    let mut stalled = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(b"POST /payments/decide HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    let mut child = server.child;
    // The deadline (0.1 s) plus the 5 s margin, and some slack for a busy machine.
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("a stalled client held the server past its grace period");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
    drop(stalled);
}
