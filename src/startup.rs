//! Building the application from its configuration, and serving it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::agent::tools::{
    BalanceTool, Fault, RiskTool, StoreBalance, StoreRiskSignals, WithFault,
};
use crate::config::Config;
use crate::http::{App, AppState, router};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::ratelimit::DynLimiter;
use crate::ratelimit::memory::MemoryLimiter;
use crate::ratelimit::redis::RedisLimiter;
use crate::{fixtures, store};

/// How often expired idempotency records are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How much longer than the request timeout an idempotency claim blocks its key on
/// PostgreSQL when its instance dies.
const CLAIM_LEASE_MARGIN: Duration = Duration::from_secs(20);

fn fault_for<'a>(faults: &'a [(String, Fault)], tool: &str) -> Option<&'a Fault> {
    faults.iter().rev().find(|(t, _)| t == tool).map(|(_, f)| f)
}

/// Opens the store, seeds it if empty, and wires the agent, limiter and metrics.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let policy = Arc::new(Policy::load(config.policy.as_deref())?);
    let customers = fixtures::load(config.fixtures.as_deref())?;
    let metrics = Arc::new(Metrics::new());
    // Before the store: a bad REDIS_URL fails start-up before anything touches the database.
    let limiter: DynLimiter = match &config.redis_url {
        Some(url) => Arc::new(RedisLimiter::new(
            url,
            &config.redis_key_prefix,
            config.rate_limit,
            metrics.clone(),
        )?),
        None => Arc::new(MemoryLimiter::new(config.rate_limit)),
    };
    let store = store::open_with(
        &config.database_url,
        store::postgres::PostgresOptions {
            pool_size: config.db_pool_size,
            fast_pool_size: store::postgres::fast_pool_size(config.db_pool_size),
            // A claim must outlive any request still allowed to run; past that, its owner
            // was stopped by the timeout (and released it) or died (and never will).
            claim_lease: config.request_timeout + CLAIM_LEASE_MARGIN,
            ..Default::default()
        },
    )
    .await?;
    let seeded = store.seed_if_empty(&customers).await?;

    let mut balance: BalanceTool = Arc::new(StoreBalance(store.clone()));
    let mut risk: RiskTool = Arc::new(StoreRiskSignals(store.clone()));
    if let Some(fault) = fault_for(&config.faults, "getBalance") {
        balance = Arc::new(WithFault::new(balance, fault.clone()));
    }
    if let Some(fault) = fault_for(&config.faults, "getRiskSignals") {
        risk = Arc::new(WithFault::new(risk, fault.clone()));
    }
    let agent = Arc::new(Agent::new(policy, balance, risk));

    tracing::info!(
        event = "paynow.starting",
        store = store.engine(),
        customers_seeded = seeded,
        rate_limiter = limiter.backend(),
        api_keys = config.api_keys_count(),
        faults = config.faults.len(),
    );
    Ok(AppState::new(App {
        config,
        store,
        limiter,
        agent,
        metrics,
    }))
}

/// Serves until `shutdown` resolves, then finishes in-flight requests and closes the store.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = build_state(config).await?;
    serve_state(state, listener, shutdown).await
}

pub async fn serve_state(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let purge = tokio::spawn(purge_loop(state.clone()));
    let app = router(state.clone());
    tracing::info!(event = "paynow.listening", addr = %listener.local_addr()?);
    // Graceful, but not forever: a connection that is still open one request deadline (plus
    // a margin) after the signal holds no request worth waiting for (a stalled or
    // half-sent one), so it is closed and the store shut down cleanly all the same.
    let grace = state.config.request_timeout + Duration::from_secs(5);
    let signalled = Arc::new(tokio::sync::Notify::new());
    let notify = signalled.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        notify.notify_one();
    });
    tokio::select! {
        served = server => served?,
        () = async {
            signalled.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(event = "paynow.shutdown_forced", grace_ms = grace.as_millis() as u64,
                "connections still open after the grace period were closed");
        }
    }
    purge.abort();
    state.store.close().await;
    tracing::info!(event = "paynow.stopped");
    Ok(())
}

async fn purge_loop(state: AppState) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        let now = store::now_ms();
        match state.store.purge_expired(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(event = "idempotency.purged", records = n),
            Err(e) => tracing::warn!(event = "idempotency.purge_failed", error = %e),
        }
        let held_since = now - state.config.reservation_ttl.as_millis() as i64;
        match state.store.expire_reservations(held_since, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(event = "reservations.expired", reservations = n),
            Err(e) => tracing::warn!(event = "reservations.expire_failed", error = %e),
        }
        state.limiter.maintain();
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!(
        event = "paynow.shutdown",
        "signal received; finishing in-flight requests"
    );
}
