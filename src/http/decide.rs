//! `POST /payments/decide`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiJson, AppState, Caller, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, X_REQUEST_ID};
use crate::domain::{
    Currency, CustomerId, IdempotencyKey, Money, PayeeId, Payment, RequestId, new_id,
};
use crate::error::{AppError, FieldError, rate_limit_headers};
use crate::ratelimit::RateDecision;
use crate::store::{
    Begin, CommitOutcome, DecisionRecord, IdempotencyScope, Lookup, StoreError, StoredResponse,
    now_ms,
};

/// A payment to decide. Unknown fields are refused.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecideRequest {
    /// `[A-Za-z0-9_.:-]{1,64}`
    #[schema(example = "c_123")]
    pub customer_id: String,
    /// A JSON number (or a decimal string), > 0, with at most the currency's minor digits.
    /// Parsed exactly, never as a binary float.
    #[schema(value_type = f64, example = 125.50)]
    pub amount: serde_json::Value,
    /// ISO 4217 code.
    #[schema(example = "USD")]
    pub currency: String,
    /// `[A-Za-z0-9_.:-]{1,64}`
    #[schema(example = "p_789")]
    pub payee_id: String,
    /// 1–255 printable ASCII characters; may come in the `Idempotency-Key` header instead.
    #[serde(default)]
    #[schema(example = "uuid-1")]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub context: Option<PaymentContext>,
}

/// Optional signals from the channel.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentContext {
    /// The device the payment comes from.
    #[serde(default)]
    pub device_id: Option<String>,
    /// ISO 3166 alpha-2 country of the client's IP address.
    #[serde(default)]
    pub ip_country: Option<String>,
}

fn amount_text(value: &serde_json::Value) -> Result<String, &'static str> {
    match value {
        // With serde_json's exact number mode, this is the literal text of the request.
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::String(s) => Ok(s.clone()),
        _ => Err("must be a number such as 125.50"),
    }
}

/// Parses the wire request into a [`Payment`] and its idempotency key, collecting every bad
/// field.
fn parse_request(
    body: DecideRequest,
    header_key: Option<&HeaderValue>,
) -> Result<(Payment, IdempotencyKey), AppError> {
    let mut errors = Vec::new();
    let mut bad = |field: &str, message: String| errors.push(FieldError::new(field, message));

    let customer = CustomerId::parse(&body.customer_id)
        .map_err(|e| bad("customerId", e.to_string()))
        .ok();
    let payee = PayeeId::parse(&body.payee_id)
        .map_err(|e| bad("payeeId", e.to_string()))
        .ok();
    let currency = Currency::parse(&body.currency)
        .map_err(|e| bad("currency", e.to_string()))
        .ok();
    let amount = match amount_text(&body.amount) {
        Err(message) => {
            bad("amount", message.into());
            None
        }
        // Without a valid currency the precision cannot be checked; USD's is the common case.
        Ok(text) => Money::parse(&text, currency.unwrap_or(Currency::USD))
            .map_err(|e| bad("amount", e.to_string()))
            .ok()
            .filter(|_| currency.is_some()),
    };

    let header_key = match header_key.map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            bad("Idempotency-Key", "must be printable ASCII".into());
            None
        }
    };
    let key = match (header_key, body.idempotency_key.as_deref()) {
        (Some(h), Some(b)) if h != b => {
            bad(
                "idempotencyKey",
                "differs from the Idempotency-Key header; send one, or the same in both".into(),
            );
            None
        }
        (Some(k), _) => IdempotencyKey::parse(k)
            .map_err(|e| bad("Idempotency-Key", e.to_string()))
            .ok(),
        (None, Some(k)) => IdempotencyKey::parse(k)
            .map_err(|e| bad("idempotencyKey", e.to_string()))
            .ok(),
        (None, None) => {
            bad(
                "idempotencyKey",
                "is required (in the body or the Idempotency-Key header)".into(),
            );
            None
        }
    };

    let (device_id, ip_country) = match body.context {
        None => (None, None),
        Some(ctx) => {
            let device = ctx.device_id.filter(|d| {
                let ok = !d.is_empty()
                    && d.len() <= 128
                    && d.bytes().all(|b| (0x21..=0x7e).contains(&b));
                if !ok {
                    bad(
                        "context.deviceId",
                        "must be 1 to 128 printable ASCII characters".into(),
                    );
                }
                ok
            });
            let country = ctx.ip_country.filter(|c| {
                let ok = c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase());
                if !ok {
                    bad(
                        "context.ipCountry",
                        "must be an ISO 3166 alpha-2 code such as US".into(),
                    );
                }
                ok
            });
            (device, country)
        }
    };

    match (customer, payee, amount, key) {
        (Some(customer), Some(payee), Some(amount), Some(key)) if errors.is_empty() => Ok((
            Payment {
                customer,
                payee,
                amount,
                device_id,
                ip_country,
            },
            key,
        )),
        _ => Err(AppError::Invalid(errors)),
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut res = (status, stored.body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if let Ok(id) = HeaderValue::from_str(stored.request_id.as_str()) {
        h.insert(X_REQUEST_ID, id);
    }
    res
}

fn store_error(e: StoreError) -> AppError {
    AppError::StoreUnavailable(e.to_string())
}

fn with_rate_headers(mut res: Response, limit: &RateDecision) -> Response {
    rate_limit_headers(&mut res, limit);
    res
}

/// Decide a payment: allow (funds reserved), review or block (a case is opened).
#[utoipa::path(post, path = "/payments/decide", tag = "payments",
    security(("api_key" = [])),
    request_body = DecideRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of the body field"),
        ("X-Request-Id" = Option<String>, Header, description = "Kept if valid, else generated"),
    ),
    responses(
        (status = 200, description = "The decision (header `Idempotent-Replayed: true` on a replay)", body = crate::agent::DecideResponse),
        (status = 400, description = "Malformed JSON", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Same idempotency key still in progress", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content type is not JSON", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field, or idempotency key reused for another payment", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit exceeded (see Retry-After)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage unavailable or request timed out; nothing was written", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn decide_payment(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<DecideRequest>,
) -> Result<Response, AppError> {
    let (payment, key) = parse_request(body, headers.get(IDEMPOTENCY_KEY))?;

    let limit = app.limiter.check(payment.customer.as_str()).await;
    if !limit.allowed {
        app.metrics.rate_limited();
        return Err(AppError::RateLimited(limit));
    }

    let now = now_ms();
    let scope = IdempotencyScope {
        caller: Arc::clone(&caller),
        key,
    };
    let fingerprint = payment.fingerprint();
    let claim = match app
        .store
        .begin_idempotent(&scope, &fingerprint, now)
        .await
        .map_err(store_error)?
    {
        Begin::Fresh(claim) => claim,
        Begin::Replay(stored) => {
            app.metrics.replayed();
            return Ok(with_rate_headers(replay(stored), &limit));
        }
        Begin::Mismatch => return Err(AppError::IdempotencyKeyReused),
        Begin::InProgress => return Err(AppError::IdempotencyInProgress),
    };

    let outcome = app.agent.assess(&payment, now).await;
    for tool in &outcome.failed_tools {
        app.metrics.tool_failed(tool);
    }
    let daily_limit_minor =
        Money::threshold_minor(app.agent.policy().daily_limit, payment.amount.currency());
    let record = DecisionRecord {
        scope: scope.clone(),
        fingerprint,
        request_id: request_id.clone(),
        payment: payment.clone(),
        outcome,
        reservation_id: new_id("res"),
        case_id: new_id("case"),
        now_ms: now,
        idempotency_expires_ms: now + app.config.idempotency_ttl.as_millis() as i64,
        daily_limit_minor,
    };
    let committed = match app
        .store
        .commit_decision(record)
        .await
        .map_err(store_error)?
    {
        CommitOutcome::Committed(c) => c,
        CommitOutcome::Duplicate => {
            // Another execution answered first; ours left nothing behind. Answer with theirs.
            drop(claim);
            return match app
                .store
                .find_response(&scope, &fingerprint, now_ms())
                .await
                .map_err(store_error)?
            {
                Some(Lookup::Replay(stored)) => {
                    app.metrics.replayed();
                    Ok(with_rate_headers(replay(stored), &limit))
                }
                Some(Lookup::Mismatch) => Err(AppError::IdempotencyKeyReused),
                None => Err(AppError::IdempotencyInProgress),
            };
        }
    };
    drop(claim);

    let outcome = &committed.outcome;
    app.metrics.decision(outcome.decision, &outcome.reasons);
    let reasons: Vec<&str> = outcome.reasons.iter().map(|r| r.as_str()).collect();
    let customer = payment.customer.masked();
    tracing::info!(
        event = "decision",
        requestId = %request_id,
        customerId = %customer,
        decision = outcome.decision.as_str(),
        reasons = ?reasons,
        amount = %payment.amount,
        currency = %payment.amount.currency(),
    );
    tracing::info!(
        event = "payment.decided",
        requestId = %request_id,
        customerId = %customer,
        payeeId = %payment.payee.masked(),
        decision = outcome.decision.as_str(),
        reasons = ?reasons,
        reservationId = committed.reservation_id.as_deref().unwrap_or(""),
        caseId = committed.case_id.as_deref().unwrap_or(""),
    );

    let mut res = (StatusCode::OK, committed.body.clone()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(with_rate_headers(res, &limit))
}
