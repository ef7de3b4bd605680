//! `POST /payments/decide`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{
    ApiJson, AppState, Caller, CommitStarted, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, X_REQUEST_ID,
};
use crate::agent::{Agent, Outcome};
use crate::domain::{
    Currency, CustomerId, IdempotencyKey, Money, PayeeId, Payment, RequestId, new_id,
};
use crate::error::{AppError, FieldError, rate_limit_headers};
use crate::ratelimit::RateDecision;
use crate::store::{
    Begin, CommitOutcome, DecideNow, DecisionRecord, IdempotencyScope, Lookup, StoredResponse,
    now_ms,
};

/// How long past the request deadline a started commit is awaited before the answer becomes
/// `commit_outcome_unknown`.
pub const COMMIT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A payment to decide. Unknown fields are refused.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecideRequest {
    /// `[A-Za-z0-9_.:-]{1,64}`
    #[schema(example = "c_123")]
    pub customer_id: String,
    /// A JSON number (or a decimal string), > 0, with at most the currency's minor digits.
    /// Parsed exactly, never as a binary float.
    #[schema(schema_with = amount_schema)]
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
    #[serde(default, deserialize_with = "context_object")]
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

/// `amount` in the API document: a JSON number or a decimal string, never a binary float
/// format, so that generated clients keep the exact text.
fn amount_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    let one_of = OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Number).build())
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$"))
                .build(),
        )
        .description(Some(
            "A decimal amount, > 0, with at most the currency's minor digits; read exactly.",
        ))
        .examples([serde_json::json!(125.50), serde_json::json!("125.50")])
        .build();
    Schema::OneOf(one_of)
}

/// `context` must be a JSON object (or null): serde would otherwise also take an array of
/// the fields' values in order.
fn context_object<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PaymentContext>, D::Error> {
    struct ObjectOnly;
    impl<'de> serde::de::Visitor<'de> for ObjectOnly {
        type Value = Option<PaymentContext>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object with deviceId and/or ipCountry")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            PaymentContext::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(ObjectOnly)
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

/// The whole parse of a decide body, from raw bytes to typed values: what `ApiJson` and the
/// handler do together, in one function the fuzz tests can drive.
pub fn parse_decide_body(
    bytes: &[u8],
    header_key: Option<&HeaderValue>,
) -> Result<(Payment, IdempotencyKey), AppError> {
    parse_request(super::parse_json(bytes)?, header_key)
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

/// The `Idempotency-Key` header, if sent: the one header the handler reads, taken alone
/// rather than with a copy of the whole header map.
pub struct IdempotencyHeader(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IdempotencyHeader(
            parts.headers.get(IDEMPOTENCY_KEY).cloned(),
        ))
    }
}

fn with_rate_headers(mut res: Response, limit: &RateDecision) -> Response {
    rate_limit_headers(&mut res, limit);
    res
}

/// One request's decision, but for the agent's outcome: what its record is made of.
struct Deciding {
    agent: Arc<Agent>,
    idempotency_ttl: std::time::Duration,
    scope: IdempotencyScope,
    fingerprint: [u8; 32],
    request_id: RequestId,
    payment: Payment,
    now: i64,
}

impl Deciding {
    fn new(
        app: &AppState,
        scope: &IdempotencyScope,
        fingerprint: [u8; 32],
        request_id: &RequestId,
        payment: &Payment,
        now: i64,
    ) -> Self {
        Deciding {
            agent: app.agent.clone(),
            idempotency_ttl: app.config.idempotency_ttl,
            scope: scope.clone(),
            fingerprint,
            request_id: request_id.clone(),
            payment: payment.clone(),
            now,
        }
    }

    /// Everything the decision writes.
    fn record(self, outcome: Outcome) -> DecisionRecord {
        let currency = self.payment.amount.currency();
        DecisionRecord {
            daily_limit_minor: self.agent.policy().daily_limit_minor(currency),
            scope: self.scope,
            fingerprint: self.fingerprint,
            request_id: self.request_id,
            payment: self.payment,
            outcome,
            reservation_id: new_id("res"),
            case_id: new_id("case"),
            now_ms: self.now,
            idempotency_expires_ms: self.now + self.idempotency_ttl.as_millis() as i64,
        }
    }

    /// The decision as the store may make it, on the thread that made the claim's reads:
    /// the agent from those reads, and the commit marked as started (unless the request
    /// already timed out, in which case nothing is to be written).
    fn at_once(self, committing: CommitStarted) -> DecideNow {
        Box::new(move |reads| {
            let outcome = self.agent.assess_now(&self.payment, self.now, reads)?;
            committing.mark().then(|| self.record(outcome))
        })
    }
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
        (status = 503, description = "Storage unavailable or request timed out (nothing was written), or `commit_outcome_unknown`: the commit did not answer in time, retry with the same key", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn decide_payment(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Extension(committing): Extension<CommitStarted>,
    IdempotencyHeader(header_key): IdempotencyHeader,
    ApiJson(body): ApiJson<DecideRequest>,
) -> Result<Response, AppError> {
    let (payment, key) = parse_request(body, header_key.as_ref())?;

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
    let reads = app.agent.reads_request(&payment, now);
    let deciding = || Deciding::new(&app, &scope, fingerprint, &request_id, &payment, now);
    // Past the request deadline a started commit is still awaited (its answer is the
    // truth), but not forever: a database that stopped answering mid-commit gets an honest
    // "unknown".
    let bound = app.config.request_timeout + COMMIT_GRACE;
    let begun = if app.agent.answers_now() {
        // The tools answer from the claim's reads: the store may decide where it read.
        let decide = deciding().at_once(committing.clone());
        let begun = app
            .store
            .begin_deciding(&scope, &fingerprint, now, &reads, decide);
        match tokio::time::timeout(bound, begun).await {
            Ok(begun) => begun,
            // No commit started, and now none will: nothing was written.
            Err(_) if committing.time_out() => return Err(AppError::Timeout),
            Err(_) => return Err(AppError::CommitOutcomeUnknown),
        }
    } else {
        app.store
            .begin_idempotent(&scope, &fingerprint, now, Some(&reads))
            .await
    };
    let (claim, committed) = match begun.map_err(AppError::from)? {
        Begin::Decided(claim, committed) => (claim, committed),
        Begin::Fresh(claim, prefetched) => {
            let outcome = app.agent.assess(&payment, now, prefetched).await;
            for tool in &outcome.failed_tools {
                app.metrics.tool_failed(tool);
            }
            let record = deciding().record(outcome);
            if !committing.mark() {
                return Err(AppError::Timeout);
            }
            let committed = tokio::time::timeout(bound, app.store.commit_decision(record))
                .await
                .map_err(|_| AppError::CommitOutcomeUnknown)?
                .map_err(AppError::from)?;
            (claim, committed)
        }
        Begin::Replay(stored) => {
            app.metrics.replayed();
            return Ok(with_rate_headers(replay(stored), &limit));
        }
        Begin::Mismatch => return Err(AppError::IdempotencyKeyReused),
        Begin::InProgress => return Err(AppError::IdempotencyInProgress),
    };
    let committed = match committed {
        CommitOutcome::Committed(c) => c,
        CommitOutcome::Duplicate => {
            // Another execution answered first; ours left nothing behind. Answer with theirs.
            drop(claim);
            return match app
                .store
                .find_response(&scope, &fingerprint, now_ms())
                .await
                .map_err(AppError::from)?
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
    // One line per decision: the decision with its reasons, and the brief's event publish.
    tracing::info!(
        event = "payment.decided",
        requestId = %request_id,
        customerId = %payment.customer.masked(),
        payeeId = %payment.payee.masked(),
        decision = outcome.decision.as_str(),
        reasons = ?reasons,
        amount = %payment.amount,
        currency = %payment.amount.currency(),
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn is_client_error(e: &AppError) -> bool {
        e.status().is_client_error()
    }

    const VALID: &str = r#"{"customerId":"c_123","amount":125.50,"currency":"USD","payeeId":"p_789","idempotencyKey":"uuid-1"}"#;

    #[test]
    fn a_decision_made_after_its_request_timed_out_is_not_written() {
        use crate::agent::tools::{StoreBalance, StoreRiskSignals};
        let dir = tempfile::tempdir().unwrap();
        let store: crate::store::DynStore =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("d.db")).unwrap());
        let policy = crate::policy::Policy::parse(crate::policy::DEFAULT_POLICY).unwrap();
        let agent = Arc::new(Agent::new(
            Arc::new(policy),
            Arc::new(StoreBalance(store.clone())),
            Arc::new(StoreRiskSignals(store)),
        ));
        let (payment, key) = parse_decide_body(VALID.as_bytes(), None).unwrap();
        let deciding = || Deciding {
            agent: agent.clone(),
            idempotency_ttl: std::time::Duration::from_secs(60),
            scope: IdempotencyScope {
                caller: "test".into(),
                key: key.clone(),
            },
            fingerprint: payment.fingerprint(),
            request_id: RequestId::generate(),
            payment: payment.clone(),
            now: now_ms(),
        };
        let reads = crate::store::PaymentReads::default();

        // In time: the commit is marked started, and there is a record to write.
        let committing = CommitStarted::default();
        assert!(deciding().at_once(committing.clone())(&reads).is_some());
        assert!(!committing.time_out(), "its commit had started");

        // The deadline answered first: nothing is to be written.
        let late = CommitStarted::default();
        assert!(late.time_out());
        assert!(deciding().at_once(late)(&reads).is_none());
    }

    #[test]
    fn the_brief_request_parses_exactly() {
        let (payment, key) = parse_decide_body(VALID.as_bytes(), None).unwrap();
        assert_eq!(payment.amount.minor(), 12550);
        assert_eq!(payment.customer.as_str(), "c_123");
        assert_eq!(key.as_str(), "uuid-1");
        // A decimal string is accepted too, and means the same amount.
        let text = VALID.replace("125.50", "\"125.5\"");
        let (same, _) = parse_decide_body(text.as_bytes(), None).unwrap();
        assert_eq!(same.fingerprint(), payment.fingerprint());
    }

    #[test]
    fn amounts_beyond_f64_precision_stay_exact() {
        // Values a binary float gets wrong (0.29 * 100 = 28.999…): exact here.
        for (text, minor) in [
            ("0.29", 29),
            ("4.35", 435),
            ("1.15", 115),
            ("999999999.99", 99_999_999_999),
        ] {
            let body = VALID.replace("125.50", text);
            let (p, _) = parse_decide_body(body.as_bytes(), None).unwrap();
            assert_eq!(p.amount.minor(), minor, "{text}");
        }
        let text = VALID.replace("125.50", "0.30000000000000004");
        assert!(parse_decide_body(text.as_bytes(), None).is_err());
    }

    /// 2,000 cases in the test suite; `PROPTEST_CASES` runs more (README: *Fuzzing*).
    fn fuzz_cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

        /// Any bytes at all: a client error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse_decide_body(&bytes, None) {
                prop_assert!(is_client_error(&e));
            }
        }

        /// The valid request with one byte changed, inserted or removed.
        #[test]
        fn mutated_requests_are_parsed_or_refused(pos in 0usize..VALID.len(), byte in any::<u8>(), op in 0u8..3) {
            let mut bytes = VALID.as_bytes().to_vec();
            match op {
                0 => bytes[pos] = byte,
                1 => bytes.insert(pos, byte),
                _ => { bytes.remove(pos); }
            }
            match parse_decide_body(&bytes, None) {
                Ok((payment, _)) => prop_assert!(payment.amount.minor() > 0),
                Err(e) => prop_assert!(is_client_error(&e)),
            }
        }

        /// Any JSON value in any field.
        #[test]
        fn any_json_in_any_field(field in prop::sample::select(vec!["customerId", "amount", "currency", "payeeId", "idempotencyKey", "context"]),
                                 value in any_json()) {
            let mut body: serde_json::Value = serde_json::from_str(VALID).unwrap();
            body[field] = value;
            let bytes = serde_json::to_vec(&body).unwrap();
            match parse_decide_body(&bytes, None) {
                Ok((payment, _)) => prop_assert!(payment.amount.minor() > 0),
                Err(e) => prop_assert!(is_client_error(&e)),
            }
        }

        /// Amount text of any shape: exact minor units or a refusal.
        #[test]
        fn any_amount_text(text in "[-+0-9.eE]{1,40}") {
            let body = VALID.replace("125.50", &text);
            match parse_decide_body(body.as_bytes(), None) {
                // The number reaches `Money::parse` as written; its tests prove that exact.
                Ok((payment, _)) => {
                    prop_assert_eq!(Ok(payment.amount), Money::parse(&text, Currency::USD));
                }
                Err(e) => prop_assert!(is_client_error(&e)),
            }
        }
    }

    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[ -~]{0,80}".prop_map(serde_json::Value::String),
            "-?[0-9]{1,25}(\\.[0-9]{1,25})?"
                .prop_map(|n| serde_json::from_str(&n).unwrap_or(serde_json::Value::Null)),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
