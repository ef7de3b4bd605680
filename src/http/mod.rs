//! The HTTP surface: routes, the middleware stack, and the shared state.
//!
//! Order of work on `POST /payments/decide`, as the brief sets it: request id + timeout
//! (`observe`) → auth (`require_api_key`) → body validation (`ApiJson`) → rate limit →
//! idempotency → agent → one commit → response.

pub mod decide;
mod extract;
mod observe;
pub mod ops;
pub mod review;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;

use crate::agent::Agent;
use crate::config::Config;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::ratelimit::DynLimiter;
use crate::store::DynStore;

pub use extract::{ApiJson, BodyLimit, parse_json};
pub use observe::CommitStarted;

pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The handler's state: one `Arc` around [`App`]. The router clones it for every extractor
/// and middleware of every request, and one shared count costs less than one per part.
#[derive(Clone)]
pub struct AppState(Arc<App>);

/// Everything a handler needs.
pub struct App {
    pub config: Config,
    pub store: DynStore,
    pub limiter: DynLimiter,
    pub agent: Arc<Agent>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(app: App) -> Self {
        AppState(Arc::new(app))
    }
}

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// The authenticated caller: the API key's name. Idempotency keys are scoped by it.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<str>);

async fn require_api_key(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = req
        .headers()
        .get(X_API_KEY)
        .and_then(|key| app.config.api_keys.identify(key.as_bytes()));
    match caller {
        Some(name) => {
            req.extensions_mut().insert(Caller(name));
            next.run(req).await
        }
        None => AppError::Unauthorized.into_response(),
    }
}

async fn not_found() -> AppError {
    AppError::NotFound
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    AppError::Internal("handler panicked".into()).into_response()
}

/// Every route served, as (method, path). The OpenAPI test checks each is documented.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/payments/decide"),
    ("GET", "/cases"),
    ("GET", "/cases/{id}"),
    ("POST", "/cases/{id}/resolve"),
    ("GET", "/reservations/{id}"),
    ("POST", "/reservations/{id}/capture"),
    ("POST", "/reservations/{id}/release"),
    ("GET", "/metrics"),
    ("GET", "/metrics/prometheus"),
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/payments/decide", post(decide::decide_payment))
        .route("/cases", get(review::list_cases))
        .route("/cases/{id}", get(review::get_case))
        .route("/cases/{id}/resolve", post(review::resolve_case))
        .route("/reservations/{id}", get(review::get_reservation))
        .route(
            "/reservations/{id}/capture",
            post(review::capture_reservation),
        )
        .route(
            "/reservations/{id}/release",
            post(review::release_reservation),
        )
        .route("/metrics", get(ops::metrics_json))
        .route("/metrics/prometheus", get(ops::metrics_prometheus))
        .route("/openapi.json", get(ops::openapi_json))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}
