//! Metrics: Prometheus instruments, also summarised as the JSON of `GET /metrics`.
//!
//! Percentiles come from the latency histogram's buckets (linear interpolation inside the
//! bucket), so the JSON and the Prometheus view never disagree.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;

use crate::domain::{Decision, Reason};

const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    decisions: IntCounterVec,
    reasons: IntCounterVec,
    rate_limited: IntCounter,
    replays: IntCounter,
    tool_failures: IntCounterVec,
    limiter_fallbacks: IntCounter,
}

/// The JSON view of `GET /metrics`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MetricsSnapshot {
    pub total_requests: u64,
    pub requests_by_status: BTreeMap<String, u64>,
    pub decisions: BTreeMap<String, u64>,
    pub reasons: BTreeMap<String, u64>,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub decide_p95_latency_ms: f64,
    pub rate_limited: u64,
    pub idempotent_replays: u64,
    pub tool_failures: BTreeMap<String, u64>,
    pub rate_limiter_fallbacks: u64,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry: each server (and each test) has its own.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("paynow".into()), None).expect("valid prefix");
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        let m = Metrics {
            requests: counter_vec(
                &registry,
                "http_requests_total",
                "HTTP requests",
                &["route", "status"],
            ),
            latency,
            decisions: counter_vec(
                &registry,
                "decisions_total",
                "Decisions made",
                &["decision"],
            ),
            reasons: counter_vec(
                &registry,
                "decision_reasons_total",
                "Reasons given",
                &["reason"],
            ),
            rate_limited: counter(
                &registry,
                "rate_limited_total",
                "Requests refused by the rate limit",
            ),
            replays: counter(
                &registry,
                "idempotent_replays_total",
                "Stored responses replayed",
            ),
            tool_failures: counter_vec(
                &registry,
                "tool_failures_total",
                "Tool calls that failed after retries",
                &["tool"],
            ),
            limiter_fallbacks: counter(
                &registry,
                "rate_limiter_fallbacks_total",
                "Checks answered by the local limiter because Redis was unreachable",
            ),
            registry,
        };
        // Zero series exist from the start, so dashboards see them before the first event.
        for d in [Decision::Allow, Decision::Review, Decision::Block] {
            m.decisions.with_label_values(&[d.as_str()]);
        }
        for r in Reason::ALL {
            m.reasons.with_label_values(&[r.as_str()]);
        }
        m
    }

    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        let status = status.to_string();
        self.requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        self.latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    pub fn decision(&self, decision: Decision, reasons: &[Reason]) {
        self.decisions.with_label_values(&[decision.as_str()]).inc();
        for r in reasons {
            self.reasons.with_label_values(&[r.as_str()]).inc();
        }
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn replayed(&self) {
        self.replays.inc();
    }

    pub fn tool_failed(&self, tool: &str) {
        self.tool_failures.with_label_values(&[tool]).inc();
    }

    pub fn limiter_fell_back(&self) {
        self.limiter_fallbacks.inc();
    }

    /// Prometheus text exposition.
    pub fn render_prometheus(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let families = self.registry.gather();
        let mut snap = MetricsSnapshot {
            total_requests: 0,
            requests_by_status: BTreeMap::new(),
            decisions: BTreeMap::new(),
            reasons: BTreeMap::new(),
            p50_latency_ms: 0.0,
            p95_latency_ms: 0.0,
            p99_latency_ms: 0.0,
            decide_p95_latency_ms: 0.0,
            rate_limited: self.rate_limited.get(),
            idempotent_replays: self.replays.get(),
            tool_failures: BTreeMap::new(),
            rate_limiter_fallbacks: self.limiter_fallbacks.get(),
        };
        let mut all_buckets: Vec<(f64, u64)> = Vec::new();
        let mut decide_buckets: Vec<(f64, u64)> = Vec::new();
        for family in &families {
            let name = family.name().trim_start_matches("paynow_");
            for m in family.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                match name {
                    "http_requests_total" => {
                        let v = m.get_counter().get_value() as u64;
                        snap.total_requests += v;
                        *snap.requests_by_status.entry(label("status")).or_default() += v;
                    }
                    "decisions_total" => {
                        snap.decisions
                            .insert(label("decision"), m.get_counter().get_value() as u64);
                    }
                    "decision_reasons_total" => {
                        snap.reasons
                            .insert(label("reason"), m.get_counter().get_value() as u64);
                    }
                    "tool_failures_total" => {
                        snap.tool_failures
                            .insert(label("tool"), m.get_counter().get_value() as u64);
                    }
                    "http_request_duration_seconds" => {
                        let h = m.get_histogram();
                        let buckets: Vec<(f64, u64)> = h
                            .get_bucket()
                            .iter()
                            .map(|b| (b.upper_bound(), b.cumulative_count()))
                            .collect();
                        merge(&mut all_buckets, &buckets);
                        if label("route") == "/payments/decide" {
                            merge(&mut decide_buckets, &buckets);
                        }
                    }
                    _ => {}
                }
            }
        }
        snap.p50_latency_ms = quantile_ms(&all_buckets, 0.50);
        snap.p95_latency_ms = quantile_ms(&all_buckets, 0.95);
        snap.p99_latency_ms = quantile_ms(&all_buckets, 0.99);
        snap.decide_p95_latency_ms = quantile_ms(&decide_buckets, 0.95);
        snap
    }
}

fn merge(into: &mut Vec<(f64, u64)>, buckets: &[(f64, u64)]) {
    if into.is_empty() {
        into.extend_from_slice(buckets);
    } else {
        for (slot, (_, count)) in into.iter_mut().zip(buckets) {
            slot.1 += count;
        }
    }
}

/// The `q` quantile of cumulative `(upper bound, count)` buckets, in milliseconds.
fn quantile_ms(buckets: &[(f64, u64)], q: f64) -> f64 {
    let Some(&(_, total_finite)) = buckets.last() else {
        return 0.0;
    };
    // Observations above the last bound are not in any bucket; prometheus keeps them in the
    // sample count only, so the largest bound is the best answer for them.
    if total_finite == 0 {
        return 0.0;
    }
    let rank = q * total_finite as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank {
            let in_bucket = (cumulative - below) as f64;
            let fraction = if in_bucket > 0.0 {
                (rank - below as f64) / in_bucket
            } else {
                1.0
            };
            let secs = lower + (upper - lower) * fraction;
            return (secs * 1000.0 * 1000.0).round() / 1000.0;
        }
        lower = upper;
        below = cumulative;
    }
    lower * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let m = Metrics::new();
        for _ in 0..90 {
            m.observe_request("/payments/decide", 200, Duration::from_micros(800));
        }
        for _ in 0..10 {
            m.observe_request("/payments/decide", 200, Duration::from_millis(40));
        }
        let s = m.snapshot();
        assert_eq!(s.total_requests, 100);
        assert!(
            s.p50_latency_ms > 0.5 && s.p50_latency_ms <= 1.0,
            "{}",
            s.p50_latency_ms
        );
        assert!(
            s.p95_latency_ms > 25.0 && s.p95_latency_ms <= 50.0,
            "{}",
            s.p95_latency_ms
        );
        assert_eq!(s.decide_p95_latency_ms, s.p95_latency_ms);
    }

    #[test]
    fn prometheus_text_has_the_histogram_and_counters() {
        let m = Metrics::new();
        m.observe_request("/healthz", 200, Duration::from_millis(1));
        m.decision(Decision::Review, &[Reason::RecentDisputes]);
        let text = m.render_prometheus();
        assert!(text.contains("paynow_http_request_duration_seconds_bucket{route=\"/healthz\""));
        assert!(text.contains("paynow_decisions_total{decision=\"review\"} 1"));
        assert!(text.contains("paynow_decision_reasons_total{reason=\"recent_disputes\"} 1"));
    }
}
