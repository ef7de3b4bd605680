//! The OpenAPI 3.1 document, generated from the handlers' annotations.

use std::sync::OnceLock;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "PayNow", description = "Payment decisions: allow, review or block, with reasons and an agent trace."),
    paths(
        crate::http::decide::decide_payment,
        crate::http::review::list_cases,
        crate::http::review::get_case,
        crate::http::review::resolve_case,
        crate::http::review::get_reservation,
        crate::http::review::capture_reservation,
        crate::http::review::release_reservation,
        crate::http::ops::healthz,
        crate::http::ops::readyz,
        crate::http::ops::metrics_json,
        crate::http::ops::metrics_prometheus,
        crate::http::ops::openapi_json,
    ),
    components(schemas(
        crate::http::decide::DecideRequest,
        crate::http::decide::PaymentContext,
        crate::agent::DecideResponse,
        crate::error::Problem,
        crate::error::FieldError,
        crate::metrics::MetricsSnapshot,
        crate::http::review::CaseResponse,
        crate::http::review::CaseList,
        crate::http::review::ResolveRequest,
        crate::http::review::ReservationResponse,
        crate::store::CaseStatus,
        crate::store::ReservationStatus,
        crate::http::ops::Health,
        crate::http::ops::Readiness,
    )),
    modifiers(&ApiKeyScheme),
    tags(
        (name = "payments", description = "Payment decisions"),
        (name = "review", description = "Cases for reviewers and the reservation lifecycle"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The document as JSON, built once.
pub fn document_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into()))
        .clone()
}
