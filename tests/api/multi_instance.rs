//! Several instances behind a load balancer: two servers on one PostgreSQL database and one
//! Redis, driven at once. Each test fails if the guarantee it names breaks.

use std::sync::Arc;
use std::time::Duration;

use paynow::Config;
use paynow::domain::{Currency, CustomerId, Decision, IdempotencyKey, Money, PayeeId, Payment};
use paynow::store::postgres::PostgresOptions;
use paynow::store::{Begin, CommitOutcome, DecisionRecord, IdempotencyScope, now_ms};
use serde_json::Value;

use crate::helpers::{
    API_KEY, Backend, PrivateRedis, TestApp, decision_record, no_rate_limit, payment,
    redis_available, redis_url, start, use_redis,
};

/// Both PostgreSQL and Redis are needed; says so (or fails in CI) when one is missing.
fn servers_available() -> bool {
    Backend::Postgres.available() && redis_available()
}

/// Two instances on one fresh PostgreSQL database, both limited through `redis`.
async fn two_instances(redis: &str, customize: impl FnOnce(&mut Config)) -> (TestApp, TestApp) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let database_url = Backend::Postgres.fresh_database(dir.path()).await;
    let mut config = Config::with_key(API_KEY, &database_url).unwrap();
    use_redis(&mut config, redis);
    customize(&mut config);
    let a = start(config.clone(), dir.clone()).await;
    let b = start(config, dir).await;
    (a, b)
}

/// How many rate-limit checks `app` answered from its local limiter.
async fn fallbacks(app: &TestApp) -> u64 {
    let metrics: Value = app.get("/metrics").await.json().await.unwrap();
    metrics["rate_limiter_fallbacks"].as_u64().unwrap()
}

async fn query_i64(database_url: &str, sql: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_payments_on_two_instances_never_reserve_more_than_the_balance() {
    if !servers_available() {
        return;
    }
    let (a, b) = two_instances(&redis_url(), no_rate_limit).await;
    // c_456 holds 1000.00: ten payments of 300.00, half on each instance, all at once. Few
    // enough that the velocity rule stays quiet, so every refusal is for the funds.
    let sends = (0..10).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { app.decide_json(&payment("c_456", "300.00", "p_789")).await }
    });
    let answers = futures::future::join_all(sends).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let allowed = answers
        .iter()
        .filter(|(_, b)| b["decision"] == "allow")
        .count();
    assert_eq!(allowed, 3, "exactly what the balance covers is allowed");
    for (_, body) in answers.iter().filter(|(_, b)| b["decision"] != "allow") {
        assert_eq!(body["decision"], "block", "{body}");
        assert_eq!(body["reasons"][0], "insufficient_funds", "{body}");
    }
    let url = &a.config.database_url;
    let reserved = query_i64(
        url,
        "SELECT reserved_minor FROM accounts WHERE customer_id = 'c_456'",
    )
    .await;
    assert_eq!(
        reserved, 90_000,
        "the database holds exactly three reservations"
    );
    let held = query_i64(
        url,
        "SELECT coalesce(sum(amount_minor), 0)::bigint FROM reservations WHERE customer_id = 'c_456'",
    )
    .await;
    assert_eq!(held, reserved, "reservations and the account agree");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_to_both_instances_executes_once() {
    if !servers_available() {
        return;
    }
    let (a, b) = two_instances(&redis_url(), no_rate_limit).await;
    for round in 0..3 {
        let body = payment("c_456", "100.00", "p_789");
        let sends = (0..16).map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            let body = body.clone();
            async move {
                let res = app.decide(&body).await;
                let status = res.status().as_u16();
                (status, res.bytes().await.unwrap())
            }
        });
        let answers = futures::future::join_all(sends).await;
        let decided: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
        assert!(!decided.is_empty(), "round {round}: someone decided");
        for (status, body) in &answers {
            assert!(
                *status == 200 || *status == 409,
                "round {round}: {status} {}",
                String::from_utf8_lossy(body)
            );
        }
        for (_, body) in &decided {
            assert_eq!(
                body, &decided[0].1,
                "round {round}: every 200 is the one stored answer"
            );
        }
        let first: Value = serde_json::from_slice(&decided[0].1).unwrap();
        assert_eq!(first["decision"], "allow", "{first}");
        // After the dust settles both instances replay the same bytes.
        for app in [&a, &b] {
            let res = app.decide(&body).await;
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["idempotent-replayed"], "true");
            assert_eq!(res.bytes().await.unwrap(), decided[0].1);
        }
        // The key now belongs to that payment on every instance.
        let mut other = body.clone();
        other["amount"] = serde_json::json!(99.00);
        for app in [&a, &b] {
            let (status, problem) = app.decide_json(&other).await;
            assert_eq!(status, 422, "{problem}");
            assert_eq!(problem["code"], "idempotency_key_reused", "{problem}");
        }
    }
    let url = &a.config.database_url;
    assert_eq!(
        query_i64(
            url,
            "SELECT count(*) FROM decisions WHERE customer_id = 'c_456'"
        )
        .await,
        3,
        "one execution per key"
    );
    assert_eq!(
        query_i64(
            url,
            "SELECT reserved_minor FROM accounts WHERE customer_id = 'c_456'"
        )
        .await,
        30_000,
        "one reservation per key"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_both_instances() {
    if !servers_available() {
        return;
    }
    // A bucket of 4 refilled once a second: two in-process limiters would let 8 through.
    let (a, b) = two_instances(&redis_url(), |c| {
        c.rate_limit = paynow::ratelimit::Quota::new(1, 4).unwrap();
    })
    .await;
    let mut allowed = 0;
    let mut limited = 0;
    for i in 0..8 {
        let app = if i % 2 == 0 { &a } else { &b };
        match app
            .decide(&payment("c_rich", "1.00", "p_789"))
            .await
            .status()
            .as_u16()
        {
            200 => allowed += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // One token may come back while the requests run.
    assert!(
        (4..=5).contains(&allowed),
        "{allowed} of 8 allowed: the bucket is not global"
    );
    assert_eq!(allowed + limited, 8);
    for app in [&a, &b] {
        let metrics: Value = app.get("/metrics").await.json().await.unwrap();
        assert_eq!(
            metrics["rate_limiter_fallbacks"], 0,
            "Redis answered every check"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_being_answered_when_redis_stops_mid_run() {
    if !Backend::Postgres.available() {
        return;
    }
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    let (a, b) = two_instances(&redis.url(), |c| {
        c.rate_limit = paynow::ratelimit::Quota::new(50, 50).unwrap();
    })
    .await;
    let customers = ["c_rich", "c_456", "c_newdev", "c_eur"];
    let run = |round: usize| {
        let (a, b) = (&a, &b);
        async move {
            let sends = (0..24).map(|i| {
                let app = if i % 2 == 0 { a } else { b };
                let customer = customers[i % customers.len()];
                async move {
                    app.decide(&payment(customer, "1.00", "p_789"))
                        .await
                        .status()
                        .as_u16()
                }
            });
            for status in futures::future::join_all(sends).await {
                assert!(
                    status == 200 || status == 429,
                    "round {round}: answered {status}"
                );
            }
        }
    };
    run(0).await;
    assert_eq!(fallbacks(&a).await + fallbacks(&b).await, 0);

    redis.kill();
    for round in 1..4 {
        run(round).await;
    }
    assert!(
        fallbacks(&a).await > 0 && fallbacks(&b).await > 0,
        "both instances answered from their local limiter"
    );
    let ready: Value = a
        .client
        .get(a.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert!(
        ready["rate_limiter"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{ready}"
    );

    // Redis returns: both instances go back to it.
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let before = (fallbacks(&a).await, fallbacks(&b).await);
    run(4).await;
    assert_eq!(
        (fallbacks(&a).await, fallbacks(&b).await),
        before,
        "checks went back to Redis"
    );
    let ready: Value = b
        .client
        .get(b.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["rate_limiter"], "ok", "{ready}");
    a.stop().await;
    b.stop().await;
}

/// An allow an instance would commit for `payment` under `scope`, now.
fn allow_record(
    scope: &IdempotencyScope,
    payment: &Payment,
    fingerprint: [u8; 32],
) -> DecisionRecord {
    decision_record(scope, payment, fingerprint, Decision::Allow, now_ms())
}

/// Two stores (as two instances would hold) on one fresh PostgreSQL database, with this
/// claim lease.
async fn two_stores_on_one_database(
    claim_lease: Duration,
) -> (paynow::store::DynStore, paynow::store::DynStore) {
    let (first, second, _) = two_stores_and_their_database(claim_lease).await;
    (first, second)
}

/// [`two_stores_on_one_database`], and the database's URL.
async fn two_stores_and_their_database(
    claim_lease: Duration,
) -> (paynow::store::DynStore, paynow::store::DynStore, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Postgres.fresh_database(dir.path()).await;
    let options = PostgresOptions {
        claim_lease,
        ..Default::default()
    };
    let first = paynow::store::open_with(&url, options.clone())
        .await
        .unwrap();
    let second = paynow::store::open_with(&url, options).await.unwrap();
    (first, second, url)
}

/// Whether `store` gets a fresh claim on the key within `tries` attempts, 50 ms apart.
async fn claimed_within(
    store: &paynow::store::DynStore,
    scope: &IdempotencyScope,
    fingerprint: [u8; 32],
    tries: u32,
) -> bool {
    for _ in 0..tries {
        if let Begin::Fresh(..) = store
            .begin_idempotent(scope, &fingerprint, now_ms(), None)
            .await
            .unwrap()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_crashed_instance_stops_blocking_its_key_after_its_lease() {
    if !Backend::Postgres.available() {
        return;
    }
    let (first, second) = two_stores_on_one_database(Duration::from_millis(500)).await;
    first
        .seed_if_empty(&paynow::fixtures::load(None).unwrap())
        .await
        .unwrap();

    let scope = IdempotencyScope {
        caller: Arc::from("key-test"),
        key: IdempotencyKey::parse("crash-1").unwrap(),
    };
    let payment = Payment {
        customer: CustomerId::parse("c_456").unwrap(),
        payee: PayeeId::parse("p_789").unwrap(),
        amount: Money::parse("100.00", Currency::parse("USD").unwrap()).unwrap(),
        device_id: None,
        ip_country: None,
    };
    let fingerprint = payment.fingerprint();

    // The first instance claims the key, then stalls (or dies) without releasing it.
    let Begin::Fresh(stalled, _) = first
        .begin_idempotent(&scope, &fingerprint, now_ms(), None)
        .await
        .unwrap()
    else {
        panic!("a new key is fresh");
    };
    std::mem::forget(stalled);
    assert!(matches!(
        second
            .begin_idempotent(&scope, &fingerprint, now_ms(), None)
            .await
            .unwrap(),
        Begin::InProgress
    ));

    // After the lease the key is free for the other instance, which decides.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let Begin::Fresh(claim, _) = second
        .begin_idempotent(&scope, &fingerprint, now_ms(), None)
        .await
        .unwrap()
    else {
        panic!("an expired claim is taken over");
    };
    match second
        .commit_decision(allow_record(&scope, &payment, fingerprint))
        .await
        .unwrap()
    {
        CommitOutcome::Committed(c) => assert_eq!(c.outcome.decision, Decision::Allow),
        CommitOutcome::Duplicate => panic!("the new owner commits"),
    }
    drop(claim);

    // The stalled instance wakes up and tries to commit: its claim is no longer its own.
    assert!(matches!(
        first
            .commit_decision(allow_record(&scope, &payment, fingerprint))
            .await
            .unwrap(),
        CommitOutcome::Duplicate
    ));
    let account = first
        .payment_reads(&paynow::store::ReadsRequest {
            customer: payment.customer.clone(),
            payee: payment.payee.clone(),
            velocity_since_ms: 0,
            velocity_cap: u32::MAX,
        })
        .await
        .unwrap()
        .account
        .unwrap();
    assert_eq!(account.reserved_minor, 10_000, "reserved once, not twice");
    assert!(matches!(
        first
            .begin_idempotent(&scope, &fingerprint, now_ms(), None)
            .await
            .unwrap(),
        Begin::Replay(_)
    ));
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_released_without_commit_frees_its_key_at_once() {
    if !Backend::Postgres.available() {
        return;
    }
    // A long lease: only the release can free the key within this test.
    let (first, second) = two_stores_on_one_database(Duration::from_secs(600)).await;
    let scope = IdempotencyScope {
        caller: Arc::from("key-test"),
        key: IdempotencyKey::parse("released-1").unwrap(),
    };
    let fingerprint = [7u8; 32];
    let Begin::Fresh(claim, _) = first
        .begin_idempotent(&scope, &fingerprint, now_ms(), None)
        .await
        .unwrap()
    else {
        panic!("a new key is fresh");
    };
    // E.g. the request timed out before commit.
    drop(claim);
    assert!(
        claimed_within(&second, &scope, fingerprint, 40).await,
        "the released key was still blocked after 2 s"
    );
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_while_its_claim_is_being_written_leaves_no_claim_behind() {
    if !Backend::Postgres.available() {
        return;
    }
    // A long lease: only a release can free the key within this test.
    let (first, second, url) = two_stores_and_their_database(Duration::from_secs(600)).await;
    let scope = IdempotencyScope {
        caller: Arc::from("key-test"),
        key: IdempotencyKey::parse("gave-up-1").unwrap(),
    };
    let fingerprint = [9u8; 32];
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let waiting_for_locks = || query_i64(&url, "SELECT count(*) FROM pg_locks WHERE NOT granted");

    // The claim statement reads `accounts`: with that table locked, the claim's batch has
    // been sent but has not written its row yet.
    locker
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let claiming = tokio::spawn({
        let (first, scope) = (first.clone(), scope.clone());
        async move {
            first
                .begin_idempotent(&scope, &fingerprint, now_ms(), None)
                .await
        }
    });
    let mut blocked = false;
    for _ in 0..100 {
        if waiting_for_locks().await > 0 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(blocked, "the claim never reached the database");

    // Its caller gives up (a deadline, a client that hung up). Its release runs at once and
    // finds nothing to delete: the row is not there yet.
    claiming.abort();
    assert!(claiming.await.is_err_and(|e| e.is_cancelled()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.batch_execute("COMMIT").await.unwrap();

    // Now the claim's row is written, for nobody. It must not hold the key for the lease.
    assert!(
        claimed_within(&second, &scope, fingerprint, 60).await,
        "the abandoned claim still held its key after 3 s"
    );
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_gets_503s_and_nothing_half_written() {
    if !Backend::Postgres.available() {
        return;
    }
    let app = crate::helpers::spawn_with(Backend::Postgres, no_rate_limit).await;
    let url = app.config.database_url.clone();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let admin = std::env::var("PAYNOW_TEST_POSTGRES_URL").unwrap();
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(
        app.decide(&payment("c_456", "100.00", "p_789"))
            .await
            .status(),
        200
    );

    // Cut every connection and refuse new ones: the server is gone as far as PayNow knows.
    client
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{name}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    for _ in 0..3 {
        let res = app.decide(&payment("c_456", "100.00", "p_789")).await;
        assert_eq!(res.status(), 503);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "storage_unavailable", "{problem}");
    }
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    client
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let body = payment("c_456", "100.00", "p_789");
    let (status, answer) = app.decide_json(&body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["decision"], "allow", "{answer}");
    // Two allows were answered, so exactly two reservations exist: the 503s wrote nothing.
    assert_eq!(
        query_i64(
            &url,
            "SELECT reserved_minor FROM accounts WHERE customer_id = 'c_456'"
        )
        .await,
        20_000
    );
    assert_eq!(
        query_i64(&url, "SELECT count(*) FROM decisions").await,
        2,
        "no decision without an answer"
    );
    app.stop().await;
}

/// A commit stuck behind a lock past the deadline and its grace: the answer says the outcome
/// is unknown (not "nothing written"), and the same key later tells the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_answer_in_time_is_reported_as_unknown() {
    if !Backend::Postgres.available() {
        return;
    }
    let app = crate::helpers::spawn_with(Backend::Postgres, |c| {
        c.request_timeout = std::time::Duration::from_millis(100);
    })
    .await;
    let url = app.config.database_url.clone();
    let (mut locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM accounts WHERE customer_id = 'c_456' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();

    let body = payment("c_456", "100.00", "p_789");
    let started = std::time::Instant::now();
    let (status, problem) = app.decide_json(&body).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "commit_outcome_unknown");
    assert!(started.elapsed() >= paynow::http::decide::COMMIT_GRACE);

    // The lock goes; the commit that was waiting for it completes, and the key replays it.
    lock.rollback().await.unwrap();
    let mut replayed = None;
    for _ in 0..50 {
        let res = app.decide(&body).await;
        if res.headers().get("idempotent-replayed").is_some() {
            replayed = Some(res.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let replayed = replayed.expect("the stuck commit completed and is replayed");
    assert_eq!(replayed["decision"], "allow", "{replayed}");
    app.stop().await;
}
