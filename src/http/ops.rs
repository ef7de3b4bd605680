//! Operational endpoints: liveness, readiness, metrics, the API document.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use crate::metrics::MetricsSnapshot;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// `ok`, or why the store does not answer.
    pub store: String,
    /// `ok`, `not_used`, or why the rate limiter's backend does not answer.
    pub rate_limiter: String,
}

/// Liveness: the process serves HTTP. No auth, no I/O.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the store (and Redis, when used) answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready to decide payments", body = Readiness),
        (status = 503, description = "A dependency does not answer", body = Readiness)))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    let store = match app.store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let rate_limiter = match app.limiter.backend() {
        "memory" => "not_used".to_owned(),
        _ => match app.limiter.ready().await {
            Ok(()) => "ok".to_owned(),
            Err(e) => e,
        },
    };
    // The limiter falls back to memory when Redis is away, so only the store gates readiness.
    let ready = store == "ok";
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        store,
        rate_limiter,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Counters and latency percentiles as JSON.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Metrics summary", body = MetricsSnapshot),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn metrics_json(State(app): State<AppState>) -> Json<MetricsSnapshot> {
    Json(app.metrics.snapshot())
}

/// Prometheus text exposition, with the latency histogram by route.
#[utoipa::path(get, path = "/metrics/prometheus", tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn metrics_prometheus(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render_prometheus(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}
