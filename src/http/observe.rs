//! The outermost middleware: request id, deadline, problem bodies, one log line and the
//! metrics of every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, BodyLimit, X_REQUEST_ID};
use crate::domain::RequestId;
use crate::error::{AppError, InternalCause, Problem, problem_response};

/// Set by a handler when it starts its commit: from then on the request deadline no longer
/// cuts it short, so a timeout answer always means nothing was written. A commit may start
/// on another thread (the SQLite writer) while the deadline passes: whichever comes first,
/// the commit's start or the timeout's answer, wins, and the other does not happen.
#[derive(Clone, Default)]
pub struct CommitStarted(Arc<AtomicU8>);

const RUNNING: u8 = 0;
const COMMITTING: u8 = 1;
const TIMED_OUT: u8 = 2;

impl CommitStarted {
    /// The commit starts, unless the request was already answered with a timeout (`false`:
    /// then it must not).
    #[must_use]
    pub fn mark(&self) -> bool {
        self.settle(COMMITTING)
    }

    /// At the deadline: `true` if the request may be answered with a timeout (no commit
    /// started, and none will), `false` if a commit started and must be awaited.
    #[must_use]
    pub fn time_out(&self) -> bool {
        self.settle(TIMED_OUT)
    }

    /// Moves a running request to `to`; true if it is (now or already) there.
    fn settle(&self, to: u8) -> bool {
        match self
            .0
            .compare_exchange(RUNNING, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == to,
        }
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
        Err(_) if !committing.time_out() => handler.await,
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

#[cfg(test)]
mod tests {
    use super::CommitStarted;

    #[test]
    fn a_commit_and_a_timeout_never_both_happen() {
        let started = CommitStarted::default();
        assert!(started.mark());
        assert!(started.mark(), "marking twice is still started");
        assert!(!started.time_out(), "a started commit is awaited");

        let timed_out = CommitStarted::default();
        assert!(timed_out.time_out());
        assert!(
            !timed_out.mark(),
            "a request answered with a timeout must not commit"
        );
        assert!(timed_out.time_out());
    }

    #[test]
    fn racing_a_commit_against_the_deadline_has_exactly_one_winner() {
        for _ in 0..2000 {
            let state = CommitStarted::default();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let (s, b) = (state.clone(), barrier.clone());
            let writer = std::thread::spawn(move || {
                b.wait();
                s.mark()
            });
            barrier.wait();
            let timed_out = state.time_out();
            let committed = writer.join().unwrap();
            assert!(
                committed != timed_out,
                "committed={committed} timed_out={timed_out}"
            );
        }
    }
}
