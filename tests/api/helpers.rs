//! Test harness: a real PayNow server on port 0 with a fresh database per test.

use std::time::Duration;

use paynow::Config;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const API_KEY: &str = "test-key-0123456789";

/// The storage engine a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Whether this machine can run the backend; explains itself when it cannot.
    /// In CI (`CI=true`) a missing server fails the test instead of skipping it.
    pub fn available(self) -> bool {
        match self {
            Backend::Sqlite => true,
            Backend::Postgres => {
                let ok = std::env::var("PAYNOW_TEST_POSTGRES_URL").is_ok_and(|u| !u.is_empty());
                if !ok {
                    assert!(
                        std::env::var("CI").is_err(),
                        "CI must set PAYNOW_TEST_POSTGRES_URL (see .ci/run)"
                    );
                    say_skipped(
                        "SKIPPED: PAYNOW_TEST_POSTGRES_URL is not set; the PostgreSQL tests did not run",
                    );
                }
                ok
            }
        }
    }

    /// A fresh, empty database for one test.
    pub async fn fresh_database(self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("paynow.db").display()),
            Backend::Postgres => postgres_fresh_database().await,
        }
    }
}

/// Creates an empty PostgreSQL database named after a random id and returns its URL.
async fn postgres_fresh_database() -> String {
    let base = std::env::var("PAYNOW_TEST_POSTGRES_URL").expect("checked by available()");
    paynow::store::postgres_test_database(&base)
        .await
        .expect("create a fresh PostgreSQL database")
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    pub dir: std::sync::Arc<tempfile::TempDir>,
}

/// Starts a server with the default configuration on `backend`.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_with(backend, |_| {}).await
}

/// Starts a server after `customize` has adjusted the configuration.
pub async fn spawn_with(backend: Backend, customize: impl FnOnce(&mut Config)) -> TestApp {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    let database_url = backend.fresh_database(dir.path()).await;
    let mut config = Config::with_key(API_KEY, &database_url).expect("valid config");
    if REDIS_LIMITER.try_with(|on| *on).unwrap_or(false) {
        use_redis(&mut config, &redis_url());
    }
    customize(&mut config);
    start(config, dir).await
}

/// Says, once per test run, that a group of tests did not run. Written to the process's
/// stderr directly: the test harness captures `eprintln!` of passing tests, and a skip must
/// be seen.
pub fn say_skipped(message: &'static str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(&message) {
        said.push(message);
        let _ = writeln!(std::io::stderr(), "{message}");
    }
}

tokio::task_local! {
    /// Set for the `redis_limiter` runs of `on_every_backend!`: servers the test starts use
    /// the Redis limiter.
    pub static REDIS_LIMITER: bool;
}

/// Whether tests can use the Redis at `PAYNOW_TEST_REDIS_URL`; explains itself when they
/// cannot. In CI (`CI=true`) a missing URL fails the test instead of skipping it.
pub fn redis_available() -> bool {
    let ok = std::env::var("PAYNOW_TEST_REDIS_URL").is_ok_and(|u| !u.is_empty());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must set PAYNOW_TEST_REDIS_URL (see .ci/run)"
        );
        say_skipped("SKIPPED: PAYNOW_TEST_REDIS_URL is not set; the Redis tests did not run");
        return false;
    }
    // The limiter would quietly fall back to memory, and the Redis runs would prove nothing.
    static ANSWERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let answers = *ANSWERS.get_or_init(|| {
        redis::Client::open(redis_url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    });
    assert!(
        answers,
        "PAYNOW_TEST_REDIS_URL is set but Redis does not answer there"
    );
    true
}

pub fn redis_url() -> String {
    std::env::var("PAYNOW_TEST_REDIS_URL").expect("checked by redis_available()")
}

/// Points the rate limiter at Redis, under a key prefix of its own so that tests sharing
/// one Redis (and customer ids) never share buckets.
pub fn use_redis(config: &mut Config, url: &str) {
    config.redis_url = Some(url.to_owned());
    config.redis_key_prefix = format!("paynow:test:{}:", uuid::Uuid::new_v4().simple());
}

/// A `redis-server` of the test's own on a free loopback port, which the test may kill and
/// start again. Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` (after saying so) when `redis-server` is not installed; in CI that fails.
    pub async fn start() -> Option<PrivateRedis> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var("CI").is_err(),
                "CI needs redis-server on PATH for this test"
            );
            say_skipped(
                "SKIPPED: redis-server is not installed; the tests that stop Redis did not run",
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = PrivateRedis { port, child: None };
        redis.restart().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("valid URL");
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// `kill -9`: the server vanishes mid-conversation.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a server on an existing configuration (e.g. a restart on the same database).
pub async fn start(config: Config, dir: std::sync::Arc<tempfile::TempDir>) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let state = paynow::startup::build_state(config.clone())
        .await
        .expect("server builds");
    let server = tokio::spawn(paynow::startup::serve_state(state, listener, async {
        let _ = rx.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        config,
        shutdown: Some(tx),
        server: Some(server),
        dir,
    }
}

impl TestApp {
    /// Stops the server gracefully and waits until the store is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }

    /// Stops this server and starts another on the same database.
    pub async fn restart(self) -> TestApp {
        let config = self.config.clone();
        let dir = self.dir.clone();
        self.stop().await;
        start(config, dir).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `POST /payments/decide` with the test API key and a JSON body.
    pub async fn decide(&self, body: &Value) -> reqwest::Response {
        self.decide_as(API_KEY, body).await
    }

    /// [`TestApp::decide`] by the caller holding `api_key`.
    pub async fn decide_as(&self, api_key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/payments/decide"))
            .header("X-API-Key", api_key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Sends a decide request and returns status and JSON body.
    pub async fn decide_json(&self, body: &Value) -> (u16, Value) {
        let res = self.decide(body).await;
        let status = res.status().as_u16();
        let body = res.json().await.expect("JSON body");
        (status, body)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("request sent")
    }
}

/// A payment body with a fresh idempotency key.
pub fn payment(customer: &str, amount: &str, payee: &str) -> Value {
    payment_in(customer, amount, "USD", payee)
}

pub fn payment_in(customer: &str, amount: &str, currency: &str, payee: &str) -> Value {
    let amount: Value = serde_json::from_str(amount).expect("amount is a JSON number");
    json!({
        "customerId": customer,
        "amount": amount,
        "currency": currency,
        "payeeId": payee,
        "idempotencyKey": uuid::Uuid::new_v4().to_string(),
    })
}

/// Raises the rate limit so tests that send many payments for one customer are not limited.
pub fn no_rate_limit(config: &mut Config) {
    config.rate_limit = paynow::ratelimit::Quota::new(100_000, 100_000).expect("valid quota");
}

/// Generates, for each listed `async fn name(backend: Backend)`, one test per storage engine
/// (`sqlite::name`, `postgres::name`).
#[macro_export]
macro_rules! on_each_engine {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::helpers::Backend::Postgres.available() {
                        super::$name($crate::helpers::Backend::Postgres).await
                    }
                }
            )*
        }
    };
}

/// Generates, for each listed `async fn name(backend: Backend)`, one test per backend, and
/// one more on SQLite with the Redis rate limiter (`redis_limiter::name`).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::on_each_engine!($($name),*);
        mod redis_limiter {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::helpers::redis_available() {
                        $crate::helpers::REDIS_LIMITER
                            .scope(true, super::$name($crate::helpers::Backend::Sqlite))
                            .await
                    }
                }
            )*
        }
    };
}

/// A store on a fresh database of `backend`, seeded with the shipped customers.
pub async fn fresh_store(backend: Backend) -> (paynow::store::DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database(dir.path()).await;
    let store = paynow::store::open(&url).await.unwrap();
    store
        .seed_if_empty(&paynow::fixtures::load(None).unwrap())
        .await
        .unwrap();
    (store, dir)
}

/// Claims a fresh key and commits a `decision` on a payment of `amount` by `customer` to
/// `p_789`, stamped `at_ms`, as a request would: what the store made of it.
pub async fn commit_at(
    store: &paynow::store::DynStore,
    customer: &str,
    amount: &str,
    decision: paynow::domain::Decision,
    at_ms: i64,
) -> paynow::domain::Decision {
    use paynow::domain::{Currency, CustomerId, IdempotencyKey, Money, PayeeId, Payment};
    use paynow::store::{Begin, CommitOutcome, IdempotencyScope};
    let payment = Payment {
        customer: CustomerId::parse(customer).unwrap(),
        payee: PayeeId::parse("p_789").unwrap(),
        amount: Money::parse(amount, Currency::USD).unwrap(),
        device_id: None,
        ip_country: None,
    };
    let scope = IdempotencyScope {
        caller: "store-test".into(),
        key: IdempotencyKey::parse(&uuid::Uuid::new_v4().to_string()).unwrap(),
    };
    let fingerprint = payment.fingerprint();
    let Begin::Fresh(claim, _) = store
        .begin_idempotent(&scope, &fingerprint, at_ms, None)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    let record = decision_record(&scope, &payment, fingerprint, decision, at_ms);
    let CommitOutcome::Committed(committed) = store.commit_decision(record).await.unwrap() else {
        panic!("a fresh key commits");
    };
    drop(claim);
    committed.outcome.decision
}

/// A record an instance would commit for `payment` under `scope`: `decision` with one reason
/// if it is not an allow, decided at `now_ms`.
pub fn decision_record(
    scope: &paynow::store::IdempotencyScope,
    payment: &paynow::domain::Payment,
    fingerprint: [u8; 32],
    decision: paynow::domain::Decision,
    now_ms: i64,
) -> paynow::store::DecisionRecord {
    use paynow::domain::{Decision, Reason, RequestId, TraceStep, new_id};
    let reasons = match decision {
        Decision::Allow => Vec::new(),
        _ => vec![Reason::RecentDisputes],
    };
    paynow::store::DecisionRecord {
        scope: scope.clone(),
        fingerprint,
        request_id: RequestId::generate(),
        payment: payment.clone(),
        outcome: paynow::agent::Outcome {
            decision,
            reasons,
            trace: vec![TraceStep::new("plan", "Check balance, risk, and limits")],
            failed_tools: Vec::new(),
        },
        reservation_id: new_id("res"),
        case_id: new_id("case"),
        now_ms,
        idempotency_expires_ms: now_ms + 86_400_000,
        daily_limit_minor: 1_000_000,
    }
}
