//! Reviewers' endpoints: cases opened by `review`/`block` decisions, and the lifecycle of the
//! reservations made by `allow` decisions and approvals.

use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::{ApiJson, AppState, CommitStarted};
use crate::domain::{Decision, Money, new_id};
use crate::error::{AppError, FieldError};
use crate::store::{
    Case, CaseResolution, CaseStatus, Reservation, ReservationStatus, Resolved, Settled,
    Settlement, now_ms,
};

/// A case as a reviewer sees it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaseResponse {
    #[schema(example = "case_21cee539fa164e24be46316a25e77d8e")]
    pub id: String,
    pub status: CaseStatus,
    #[schema(example = "review")]
    pub decision: String,
    #[schema(example = json!(["recent_disputes"]))]
    pub reasons: Vec<String>,
    pub customer_id: String,
    pub payee_id: String,
    #[schema(example = "125.50")]
    pub amount: String,
    pub currency: String,
    /// The decision request that opened the case.
    pub request_id: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The agent trace of the decision.
    #[schema(value_type = Vec<Object>)]
    pub agent_trace: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution_note: Option<String>,
    /// The reservation made by an approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CaseList {
    pub cases: Vec<CaseResponse>,
}

/// A reviewer's verdict.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolveRequest {
    /// `approve` reserves the funds (if they are still there); `decline` closes the case.
    #[schema(example = "approve")]
    pub action: String,
    /// Up to 1000 characters for the audit trail.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReservationResponse {
    #[schema(example = "res_db07292ea285478d9313ec707b8f0058")]
    pub id: String,
    pub status: ReservationStatus,
    pub customer_id: String,
    pub payee_id: String,
    #[schema(example = "600.00")]
    pub amount: String,
    pub currency: String,
    pub request_id: String,
    pub created_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_ms: Option<i64>,
}

fn amount_text(m: &Money) -> (String, String) {
    (m.to_string(), m.currency().code().to_owned())
}

impl From<Case> for CaseResponse {
    fn from(c: Case) -> Self {
        let (amount, currency) = amount_text(&c.amount);
        CaseResponse {
            id: c.id,
            status: c.status,
            decision: c.decision.as_str().to_owned(),
            reasons: c.reasons.iter().map(|r| r.as_str().to_owned()).collect(),
            customer_id: c.customer,
            payee_id: c.payee,
            amount,
            currency,
            request_id: c.request_id,
            created_ms: c.created_ms,
            agent_trace: c.trace,
            resolved_ms: c.resolved_ms,
            resolution_note: c.resolution_note,
            reservation_id: c.reservation_id,
        }
    }
}

impl From<Reservation> for ReservationResponse {
    fn from(r: Reservation) -> Self {
        let (amount, currency) = amount_text(&r.amount);
        ReservationResponse {
            id: r.id,
            status: r.status,
            customer_id: r.customer,
            payee_id: r.payee,
            amount,
            currency,
            request_id: r.request_id,
            created_ms: r.created_ms,
            settled_ms: r.settled_ms,
        }
    }
}

const NO_CASE: AppError = AppError::NoSuch {
    code: "case_not_found",
    what: "case",
};
const NO_RESERVATION: AppError = AppError::NoSuch {
    code: "reservation_not_found",
    what: "reservation",
};

/// The `{id}` of the path. One that is not UTF-8 once percent-decoded cannot name a record:
/// it reaches the handler empty and is answered as a missing record, like any malformed id,
/// instead of axum's plain-text 400.
pub struct RecordId(String);

impl<S: Send + Sync> FromRequestParts<S> for RecordId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let id = Path::<String>::from_request_parts(parts, state).await;
        Ok(RecordId(id.map(|Path(id)| id).unwrap_or_default()))
    }
}

/// Ids we issue are short and plain; anything else cannot exist.
fn checked_id(id: &str, missing: AppError) -> Result<&str, AppError> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Ok(id)
    } else {
        Err(missing)
    }
}

/// `?status=open&limit=50`
fn list_params(query: Option<&str>) -> Result<(Option<CaseStatus>, u32), AppError> {
    let (mut status, mut limit) = (None, 50);
    // Percent-encoded and `+`-for-space, as browsers and HTTP clients write query strings.
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "status" => {
                status = Some(CaseStatus::parse(&value).ok_or_else(|| {
                    AppError::Invalid(vec![FieldError::new(
                        "status",
                        "must be open, approved or declined",
                    )])
                })?)
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=500).contains(l))
                    .ok_or_else(|| {
                        AppError::Invalid(vec![FieldError::new("limit", "must be 1 to 500")])
                    })?
            }
            other => {
                return Err(AppError::Invalid(vec![FieldError::new(
                    other.to_owned(),
                    "unknown query parameter; use status and limit",
                )]));
            }
        }
    }
    Ok((status, limit))
}

/// List cases, newest first.
#[utoipa::path(get, path = "/cases", tag = "review",
    security(("api_key" = [])),
    params(
        ("status" = Option<String>, Query, description = "open, approved or declined"),
        ("limit" = Option<u32>, Query, description = "1 to 500, default 50"),
    ),
    responses(
        (status = 200, description = "Cases, newest first", body = CaseList),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad query parameter", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_cases(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<CaseList>, AppError> {
    let (status, limit) = list_params(query.as_deref())?;
    let cases = app
        .store
        .list_cases(status, limit)
        .await
        .map_err(AppError::from)?;
    Ok(Json(CaseList {
        cases: cases.into_iter().map(CaseResponse::from).collect(),
    }))
}

/// One case, with the agent trace of its decision.
#[utoipa::path(get, path = "/cases/{id}", tag = "review",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Case id")),
    responses(
        (status = 200, description = "The case", body = CaseResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such case", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_case(
    State(app): State<AppState>,
    RecordId(id): RecordId,
) -> Result<Json<CaseResponse>, AppError> {
    let case = app
        .store
        .case(checked_id(&id, NO_CASE)?)
        .await
        .map_err(AppError::from)?;
    case.map(|c| Json(c.into())).ok_or(NO_CASE)
}

/// Approve (reserving the funds if they are still available) or decline an open case.
#[utoipa::path(post, path = "/cases/{id}/resolve", tag = "review",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Case id")),
    request_body = ResolveRequest,
    responses(
        (status = 200, description = "The resolved case", body = CaseResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such case", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already resolved, a block (which cannot be approved), or the approval cannot reserve the funds (the case stays open)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid request", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn resolve_case(
    State(app): State<AppState>,
    RecordId(id): RecordId,
    Extension(committing): Extension<CommitStarted>,
    ApiJson(body): ApiJson<ResolveRequest>,
) -> Result<Json<CaseResponse>, AppError> {
    let id = checked_id(&id, NO_CASE)?.to_owned();
    let approve = match body.action.as_str() {
        "approve" => true,
        "decline" => false,
        _ => {
            return Err(AppError::Invalid(vec![FieldError::new(
                "action",
                "must be approve or decline",
            )]));
        }
    };
    if body
        .note
        .as_ref()
        .is_some_and(|n| n.chars().count() > 1000 || n.chars().any(char::is_control))
    {
        return Err(AppError::Invalid(vec![FieldError::new(
            "note",
            "must be at most 1000 characters, without control characters",
        )]));
    }
    // The daily limit is in the case's currency, which only the case knows.
    let case = app
        .store
        .case(&id)
        .await
        .map_err(AppError::from)?
        .ok_or(NO_CASE)?;
    // A block is final: its rules (blocklist, per-payment limit, unknown customer, …) are
    // not a reviewer's to waive. Only payments sent to review can be approved.
    if approve && case.decision != Decision::Review {
        return Err(AppError::Conflict(
            "case_not_approvable",
            format!(
                "a {} decision cannot be approved, only declined",
                case.decision.as_str()
            ),
        ));
    }
    // A review can come from missing data (`balance_unavailable`), in which case the
    // per-payment limit was never checked; it does not depend on the account, so check it now.
    let policy = app.agent.policy();
    let currency = case.amount.currency();
    if approve && case.amount.minor() > Money::threshold_minor(policy.per_payment_limit, currency) {
        return Err(AppError::Conflict(
            "approval_refused",
            "the funds cannot be reserved (limit_exceeded); the case stays open".into(),
        ));
    }
    let daily_limit_minor = policy.daily_limit_minor(currency);
    let resolution = CaseResolution {
        case_id: id,
        approve,
        note: body.note,
        reservation_id: new_id("res"),
        now_ms: now_ms(),
        daily_limit_minor,
    };
    if !committing.mark() {
        return Err(AppError::Timeout);
    }
    match app
        .store
        .resolve_case(resolution)
        .await
        .map_err(AppError::from)?
    {
        Resolved::Done(case) => {
            tracing::info!(
                event = "case.resolved",
                caseId = %case.id,
                status = case.status.as_str(),
                reservationId = case.reservation_id.as_deref().unwrap_or(""),
            );
            Ok(Json((*case).into()))
        }
        Resolved::NotFound => Err(NO_CASE),
        Resolved::AlreadyResolved(case) => Err(AppError::Conflict(
            "case_already_resolved",
            format!("the case was already {}", case.status.as_str()),
        )),
        Resolved::Refused(reason) => Err(AppError::Conflict(
            "approval_refused",
            format!(
                "the funds cannot be reserved ({}); the case stays open",
                reason.as_str()
            ),
        )),
    }
}

/// One reservation.
#[utoipa::path(get, path = "/reservations/{id}", tag = "review",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Reservation id")),
    responses(
        (status = 200, description = "The reservation", body = ReservationResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_reservation(
    State(app): State<AppState>,
    RecordId(id): RecordId,
) -> Result<Json<ReservationResponse>, AppError> {
    let found = app
        .store
        .reservation(checked_id(&id, NO_RESERVATION)?)
        .await
        .map_err(AppError::from)?;
    found.map(|r| Json(r.into())).ok_or(NO_RESERVATION)
}

async fn settle(
    app: AppState,
    id: String,
    to: Settlement,
    committing: CommitStarted,
) -> Result<Json<ReservationResponse>, AppError> {
    let id = checked_id(&id, NO_RESERVATION)?;
    if !committing.mark() {
        return Err(AppError::Timeout);
    }
    match app
        .store
        .settle_reservation(id, to, now_ms())
        .await
        .map_err(AppError::from)?
    {
        Settled::Done(r) => {
            tracing::info!(event = "reservation.settled", reservationId = %r.id, status = r.status.as_str());
            Ok(Json(r.into()))
        }
        Settled::NotFound => Err(NO_RESERVATION),
        Settled::NotHeld(r) => Err(AppError::Conflict(
            "reservation_not_held",
            format!("the reservation is {}, not held", r.status.as_str()),
        )),
    }
}

/// Capture a held reservation: the money leaves the balance.
#[utoipa::path(post, path = "/reservations/{id}/capture", tag = "review",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Reservation id")),
    responses(
        (status = 200, description = "The captured reservation", body = ReservationResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not held (already captured, released or expired)", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn capture_reservation(
    State(app): State<AppState>,
    RecordId(id): RecordId,
    Extension(committing): Extension<CommitStarted>,
) -> Result<Json<ReservationResponse>, AppError> {
    settle(app, id, Settlement::Capture, committing).await
}

/// Release a held reservation: the money is available again.
#[utoipa::path(post, path = "/reservations/{id}/release", tag = "review",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Reservation id")),
    responses(
        (status = 200, description = "The released reservation", body = ReservationResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not held (already captured, released or expired)", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn release_reservation(
    State(app): State<AppState>,
    RecordId(id): RecordId,
    Extension(committing): Extension<CommitStarted>,
) -> Result<Json<ReservationResponse>, AppError> {
    settle(app, id, Settlement::Release, committing).await
}
