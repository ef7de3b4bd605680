//! One error type for the HTTP edge, rendered as RFC 9457 problem details.
//!
//! Every error has a stable snake_case `code` clients can key on. 5xx bodies are opaque: the
//! cause is logged once, at the edge, and never sent. The `requestId` member is filled in by
//! the request middleware, which knows the id.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::ratelimit::RateDecision;

/// One bad field of a request.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `amount` or `context.deviceId`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("missing or invalid X-API-Key header")]
    Unauthorized,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request is invalid")]
    Invalid(Vec<FieldError>),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error("rate limit exceeded for this customer")]
    RateLimited(RateDecision),
    #[error("this idempotency key was used for a different payment")]
    IdempotencyKeyReused,
    #[error("a request with this idempotency key is still being processed; retry shortly")]
    IdempotencyInProgress,
    /// No route matches the path.
    #[error("no such resource")]
    NotFound,
    /// The route exists, the record does not; `code` says which kind, e.g. `case_not_found`.
    #[error("no such {what}")]
    NoSuch {
        code: &'static str,
        what: &'static str,
    },
    /// The resource is not in a state that allows this; the code says which.
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("the request took too long and was stopped; nothing was written")]
    Timeout,
    /// The commit was sent but has not answered in time: it may or may not have happened.
    #[error(
        "the decision's commit did not answer in time; its outcome is unknown: retry with the same idempotency key to learn it"
    )]
    CommitOutcomeUnknown,
    #[error("storage is unavailable; nothing was written")]
    StoreUnavailable(String),
    #[error("internal error")]
    Internal(String),
}

pub type Result<T, E = AppError> = std::result::Result<T, E>;

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(cause) => AppError::StoreUnavailable(cause),
            // A schema that does not match the code is our bug, not an outage.
            crate::store::StoreError::Internal(cause) => AppError::Internal(cause),
            crate::store::StoreError::OutcomeUnknown(_) => AppError::CommitOutcomeUnknown,
        }
    }
}

/// RFC 9457 problem details, plus `code`, `requestId` and per-field `errors`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code, e.g. `validation_failed`.
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The internal cause of a 5xx, kept out of the body and logged by the middleware.
#[derive(Clone, Debug)]
pub struct InternalCause(pub String);

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AppError::Invalid(_) | AppError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::IdempotencyInProgress | AppError::Conflict(..) => StatusCode::CONFLICT,
            AppError::NotFound | AppError::NoSuch { .. } => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Timeout | AppError::CommitOutcomeUnknown | AppError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::Unauthorized => "unauthorized",
            AppError::MalformedJson(_) => "malformed_json",
            AppError::Invalid(_) => "validation_failed",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::UnsupportedMediaType => "unsupported_media_type",
            AppError::RateLimited(_) => "rate_limited",
            AppError::IdempotencyKeyReused => "idempotency_key_reused",
            AppError::IdempotencyInProgress => "idempotency_in_progress",
            AppError::NotFound => "not_found",
            AppError::NoSuch { code, .. } => code,
            AppError::Conflict(code, _) => code,
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Timeout => "request_timeout",
            AppError::CommitOutcomeUnknown => "commit_outcome_unknown",
            AppError::StoreUnavailable(_) => "storage_unavailable",
            AppError::Internal(_) => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            AppError::Unauthorized => "Unauthorized",
            AppError::MalformedJson(_) => "Malformed JSON",
            AppError::Invalid(_) => "Invalid request",
            AppError::PayloadTooLarge(_) => "Payload too large",
            AppError::UnsupportedMediaType => "Unsupported media type",
            AppError::RateLimited(_) => "Too many requests",
            AppError::IdempotencyKeyReused => "Idempotency key reused",
            AppError::IdempotencyInProgress => "Request in progress",
            AppError::NotFound | AppError::NoSuch { .. } => "Not found",
            AppError::Conflict(..) => "Conflict",
            AppError::MethodNotAllowed => "Method not allowed",
            AppError::Timeout => "Request timeout",
            AppError::CommitOutcomeUnknown => "Outcome unknown",
            AppError::StoreUnavailable(_) => "Service unavailable",
            AppError::Internal(_) => "Internal server error",
        }
    }

    pub fn problem(&self) -> Problem {
        let detail = match self {
            AppError::Invalid(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            // Opaque: the cause goes to the log only.
            AppError::StoreUnavailable(_) | AppError::Internal(_) => self.to_string(),
            other => other.to_string(),
        };
        Problem {
            type_uri: format!("urn:paynow:problem:{}", self.code()),
            title: self.title(),
            status: self.status().as_u16(),
            detail,
            code: self.code(),
            request_id: None,
            errors: match self {
                AppError::Invalid(errors) => errors.clone(),
                _ => Vec::new(),
            },
        }
    }
}

pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Writes a problem as the response body.
pub fn problem_response(status: StatusCode, problem: &Problem) -> Response {
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut res = (status, body).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, PROBLEM_JSON);
    res
}

/// Adds the `RateLimit-*` headers (IETF draft) that describe a customer's bucket.
pub fn rate_limit_headers(res: &mut Response, d: &RateDecision) {
    let h = res.headers_mut();
    h.insert("ratelimit-limit", d.limit.into());
    h.insert("ratelimit-remaining", d.remaining.into());
    h.insert(
        "ratelimit-reset",
        (d.reset_after.as_secs_f64().ceil() as u64).into(),
    );
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let mut res = problem_response(self.status(), &problem);
        if let AppError::RateLimited(d) = &self {
            rate_limit_headers(&mut res, d);
            let secs = d.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            res.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        if let AppError::StoreUnavailable(cause) | AppError::Internal(cause) = &self {
            res.extensions_mut().insert(InternalCause(cause.clone()));
        }
        res.extensions_mut().insert(problem);
        res
    }
}
