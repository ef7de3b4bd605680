//! The outermost middleware: request id, deadline, problem bodies, one log line and the
//! metrics of every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, BodyLimit, X_REQUEST_ID};
use crate::domain::RequestId;
use crate::error::{AppError, InternalCause, Problem, problem_response};

/// Set by a handler when it starts its commit: from then on the request deadline no longer
/// cuts it short, so a timeout answer always means nothing was written.
#[derive(Clone, Default)]
pub struct CommitStarted(Arc<AtomicBool>);

impl CommitStarted {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn started(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub async fn observe(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(RequestId::from_header)
        .unwrap_or_else(RequestId::generate);
    // The route template, never the raw path: bounded label values, no ids in logs.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    req.extensions_mut().insert(request_id.clone());
    req.extensions_mut()
        .insert(BodyLimit(app.config.body_limit_bytes));

    let committing = CommitStarted::default();
    req.extensions_mut().insert(committing.clone());
    let handler = next.run(req);
    tokio::pin!(handler);
    let mut res = match tokio::time::timeout(app.config.request_timeout, &mut handler).await {
        Ok(res) => res,
        // Past the deadline but already writing: the answer exists (or will in a moment), and
        // a 503 would tell the client nothing was done. Wait for it instead.
        Err(_) if committing.started() => handler.await,
        Err(_) => AppError::Timeout.into_response(),
    };

    let status = res.status();
    let mut code = "";
    if let Some(mut problem) = res.extensions_mut().remove::<Problem>() {
        code = problem.code;
        problem.request_id = Some(request_id.as_str().to_owned());
        let cause = res.extensions_mut().remove::<InternalCause>();
        if let Some(InternalCause(cause)) = cause {
            tracing::error!(event = "http.error", requestId = %request_id, code, cause = %cause);
        }
        let headers = std::mem::take(res.headers_mut());
        res = problem_response(status, &problem);
        for (name, value) in headers.iter() {
            if name != axum::http::header::CONTENT_LENGTH {
                res.headers_mut().insert(name, value.clone());
            }
        }
    }
    if !res.headers().contains_key(X_REQUEST_ID)
        && let Ok(value) = HeaderValue::from_str(request_id.as_str())
    {
        res.headers_mut().insert(X_REQUEST_ID, value);
    }

    let elapsed = started.elapsed();
    app.metrics
        .observe_request(&route, status.as_u16(), elapsed);
    tracing::info!(
        event = "http.request",
        requestId = %request_id,
        method = %method,
        path = %route,
        status = status.as_u16(),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        code,
    );
    res
}
