//! The agentic orchestrator: plan → tools → rules → recommendation, with a trace.
//!
//! # Determinism
//! The agent is deterministic: the same payment, tool answers and policy give the same
//! decision, reasons and trace steps (only durations vary). Tools run concurrently but the
//! trace lists them in plan order.
//!
//! # Failing safe
//! Every tool call has a deadline and a bounded number of attempts. A tool that still fails
//! is written to the trace, and its `*_unavailable` reason sends the payment to review: the
//! agent never answers `allow` on data it could not get.

pub mod rules;
pub mod tools;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::domain::{Decision, Payment, Reason, RequestId, StepData, TraceStep};
use crate::policy::{Policy, ToolPolicy};
use crate::store::{Account, PaymentReads, ReadsRequest, RiskProfile};
use rules::{Facts, Fetched};
use tools::{BalanceTool, RiskTool, Tool, ToolContext, ToolError};

pub const PLAN: &str = "Check balance, risk, and limits";

/// What the agent concluded, before and after commit.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub decision: Decision,
    pub reasons: Vec<Reason>,
    pub trace: Vec<TraceStep>,
    /// Tools that failed after all their attempts (for metrics).
    pub failed_tools: Vec<&'static str>,
}

/// The body of a decision response.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecideResponse<'a> {
    #[schema(value_type = String, example = "review")]
    pub decision: Decision,
    #[schema(value_type = Vec<String>, example = json!(["recent_disputes"]))]
    pub reasons: &'a [Reason],
    #[schema(value_type = Vec<Object>)]
    pub agent_trace: &'a [TraceStep],
    #[schema(example = "req_3f2a…")]
    pub request_id: &'a str,
    /// The funds held for this payment (allow only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<&'a str>,
    /// The case opened for a reviewer (review and block).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case_id: Option<&'a str>,
    /// The amount decided, as an exact decimal string.
    #[schema(example = "125.50")]
    pub amount: String,
    #[schema(example = "USD")]
    pub currency: &'a str,
}

impl Outcome {
    /// The reservation did not fit any more at commit (a concurrent payment took the funds,
    /// or the daily limit): the answer becomes a block and the trace says so.
    pub fn refuse_at_commit(&mut self, reason: Reason, detail: String) {
        self.decision = Decision::Block;
        self.reasons = vec![reason];
        self.trace.push(TraceStep::new("commit", detail));
    }

    pub fn render(
        &self,
        request_id: &RequestId,
        reservation_id: &str,
        case_id: &str,
        payment: &Payment,
    ) -> Vec<u8> {
        let allowed = self.decision == Decision::Allow;
        let currency = payment.amount.currency();
        let body = DecideResponse {
            decision: self.decision,
            reasons: &self.reasons,
            agent_trace: &self.trace,
            request_id: request_id.as_str(),
            reservation_id: allowed.then_some(reservation_id),
            case_id: (!allowed).then_some(case_id),
            amount: payment.amount.to_string(),
            currency: currency.code(),
        };
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

pub struct Agent {
    policy: Arc<Policy>,
    balance: BalanceTool,
    risk: RiskTool,
    /// Both tools answer from the store's reads at once (see [`Tool::answer_now`]).
    answers_now: bool,
}

/// A tool's answer after retries, with what it cost.
struct Called<T> {
    result: Result<T, ToolError>,
    attempts: u32,
    elapsed_us: u64,
}

async fn call_with_retries<T: Send>(
    tool: &dyn Tool<Output = T>,
    limits: &ToolPolicy,
    payment: &Payment,
    ctx: &ToolContext,
) -> Called<T> {
    let started = Instant::now();
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let result = match tokio::time::timeout(limits.deadline(), tool.call(payment, ctx)).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::Failed(format!(
                "timed out after {} ms",
                limits.deadline_ms
            ))),
        };
        match result {
            Ok(v) => break Ok(v),
            Err(e) if attempts >= limits.max_attempts => break Err(e),
            Err(e) => {
                tracing::warn!(tool = tool.name(), attempt = attempts, error = %e, "tool call failed; retrying");
                tokio::time::sleep(limits.backoff()).await;
            }
        }
    };
    Called {
        result,
        attempts,
        elapsed_us: started.elapsed().as_micros() as u64,
    }
}

/// How a tool's answer reads in the trace: a detail line and the structured facts.
trait Describe {
    /// The detail when the tool found nothing for the customer.
    const MISSING: &'static str;
    fn describe(&self) -> (String, StepData);
}

impl Describe for Account {
    const MISSING: &'static str = "no account for customer";
    fn describe(&self) -> (String, StepData) {
        let data = StepData::Balance {
            currency: self.balance.currency(),
            available_minor: self.available_minor(),
            reserved_minor: self.reserved_minor,
        };
        (format!("balance={}", self.balance), data)
    }
}

impl Describe for RiskProfile {
    const MISSING: &'static str = "no risk profile for customer";
    fn describe(&self) -> (String, StepData) {
        let detail = format!(
            "recent_disputes={}, device_change={}",
            self.recent_disputes, self.device_change
        );
        let data = StepData::Risk {
            known_payee: self.known_payee,
            recent_payments: self.recent_payments,
        };
        (detail, data)
    }
}

/// Writes a tool's answer to the trace and turns it into a fact for the rules.
fn record<'a, T: Describe>(
    name: &'static str,
    called: &'a Called<Option<T>>,
    trace: &mut Vec<TraceStep>,
    failed_tools: &mut Vec<&'static str>,
) -> Fetched<'a, T> {
    let (detail, data, fetched) = match &called.result {
        Ok(Some(found)) => {
            let (detail, data) = found.describe();
            (Cow::Owned(detail), Some(data), Fetched::Found(found))
        }
        Ok(None) => (Cow::Borrowed(T::MISSING), None, Fetched::Missing),
        Err(e) => {
            failed_tools.push(name);
            let detail = format!("unavailable after {} attempts: {e}", called.attempts);
            (Cow::Owned(detail), None, Fetched::Unavailable)
        }
    };
    trace.push(TraceStep {
        step: Cow::Owned(format!("tool:{name}")),
        detail,
        duration_us: Some(called.elapsed_us),
        attempts: Some(called.attempts),
        data,
    });
    fetched
}

impl Agent {
    pub fn new(policy: Arc<Policy>, balance: BalanceTool, risk: RiskTool) -> Self {
        let reads = PaymentReads::default();
        let answers_now = balance.answer_now(&reads).is_some() && risk.answer_now(&reads).is_some();
        Agent {
            policy,
            balance,
            risk,
            answers_now,
        }
    }

    /// Whether [`Agent::assess_now`] can assess: both tools answer from the store's reads.
    pub fn answers_now(&self) -> bool {
        self.answers_now
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What the tools will read to assess `payment` at `now_ms`.
    pub fn reads_request(&self, payment: &Payment, now_ms: i64) -> ReadsRequest {
        ReadsRequest {
            customer: payment.customer.clone(),
            payee: payment.payee.clone(),
            velocity_since_ms: now_ms - (self.policy.velocity.window_secs as i64) * 1000,
            velocity_cap: self.policy.velocity.max_payments,
        }
    }

    /// Plans, calls the tools, applies the rules and recommends. `prefetched` is what the
    /// store already read for the tools (see [`ToolContext`]).
    pub async fn assess(
        &self,
        payment: &Payment,
        now_ms: i64,
        prefetched: Option<PaymentReads>,
    ) -> Outcome {
        let limits = &self.policy.tools;
        let ctx = ToolContext::new(self.reads_request(payment, now_ms), prefetched);
        let (balance, risk) = tokio::join!(
            call_with_retries(&*self.balance, limits, payment, &ctx),
            call_with_retries(&*self.risk, limits, payment, &ctx),
        );
        self.conclude(payment, now_ms, balance, risk)
    }

    /// [`Agent::assess`] from reads the store made, where they were made: both tools answer
    /// at once (one attempt each), so nothing is awaited. `None` if a tool has to run.
    pub fn assess_now(
        &self,
        payment: &Payment,
        now_ms: i64,
        reads: &PaymentReads,
    ) -> Option<Outcome> {
        fn at_once<T: Send>(
            tool: &dyn Tool<Output = T>,
            reads: &PaymentReads,
        ) -> Option<Called<T>> {
            let started = Instant::now();
            let answer = tool.answer_now(reads)?;
            Some(Called {
                result: Ok(answer),
                attempts: 1,
                elapsed_us: started.elapsed().as_micros() as u64,
            })
        }
        let balance = at_once(&*self.balance, reads)?;
        let risk = at_once(&*self.risk, reads)?;
        Some(self.conclude(payment, now_ms, balance, risk))
    }

    /// The trace of the tools' answers, the rules, and the recommendation.
    fn conclude(
        &self,
        payment: &Payment,
        now_ms: i64,
        balance: Called<Option<Account>>,
        risk: Called<Option<RiskProfile>>,
    ) -> Outcome {
        let mut trace = vec![TraceStep::new("plan", PLAN)];
        let mut failed_tools = Vec::new();
        let account = record(self.balance.name(), &balance, &mut trace, &mut failed_tools);
        let signals = record(self.risk.name(), &risk, &mut trace, &mut failed_tools);

        let facts = Facts {
            payment,
            account,
            risk: signals,
            day: now_ms.div_euclid(86_400_000),
        };
        let findings = rules::evaluate(&self.policy, &facts);
        let decision = rules::decision_of(&findings);
        let recommend = match decision {
            Decision::Allow => "allow and reserve funds",
            Decision::Review => "route to manual review",
            Decision::Block => "block payment",
        };
        let reasons = findings.iter().map(|f| f.reason).collect();
        let mut step = TraceStep::new("tool:recommend", recommend);
        if !findings.is_empty() {
            // Each fired rule with the numbers behind it, for the reviewer.
            let whys = findings.into_iter().map(|f| (f.reason, f.why)).collect();
            step.data = Some(StepData::Findings(whys));
        }
        trace.push(step);

        Outcome {
            decision,
            reasons,
            trace,
            failed_tools,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, CustomerId, Money, PayeeId};
    use crate::policy::DEFAULT_POLICY;
    use crate::store::DynStore;
    use tools::{Fault, StoreBalance, StoreRiskSignals, WithFault};

    fn store(dir: &std::path::Path) -> DynStore {
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.join("a.db")).unwrap())
    }

    fn agent(store: &DynStore, fault: Option<Fault>) -> Agent {
        let policy = Arc::new(Policy::parse(DEFAULT_POLICY).unwrap());
        let mut balance: BalanceTool = Arc::new(StoreBalance(store.clone()));
        if let Some(fault) = fault {
            balance = Arc::new(WithFault::new(balance, fault));
        }
        Agent::new(policy, balance, Arc::new(StoreRiskSignals(store.clone())))
    }

    fn payment(amount: &str) -> Payment {
        Payment {
            customer: CustomerId::parse("c_1").unwrap(),
            payee: PayeeId::parse("p_1").unwrap(),
            amount: Money::parse(amount, Currency::USD).unwrap(),
            device_id: None,
            ip_country: None,
        }
    }

    fn reads(balance: &str, disputes: u32, known_payee: bool) -> PaymentReads {
        PaymentReads {
            account: Some(Account {
                customer: CustomerId::parse("c_1").unwrap(),
                balance: Money::parse(balance, Currency::USD).unwrap(),
                reserved_minor: 0,
                outflow_day: 0,
                outflow_minor: 0,
            }),
            risk: Some(RiskProfile {
                recent_disputes: disputes,
                device_change: false,
                home_country: None,
                known_payee,
                recent_payments: 0,
            }),
        }
    }

    /// The trace without its timings, which are all that may differ.
    fn untimed(outcome: &Outcome) -> Vec<(String, String, Option<u32>, String)> {
        outcome
            .trace
            .iter()
            .map(|s| {
                let data = s.data.as_ref().map(|d| serde_json::to_string(d).unwrap());
                let data = data.unwrap_or_default();
                (s.step.to_string(), s.detail.to_string(), s.attempts, data)
            })
            .collect()
    }

    #[tokio::test]
    async fn deciding_at_once_from_the_reads_gives_what_calling_the_tools_gives() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let agent = agent(&store, None);
        assert!(agent.answers_now());
        let now = 1_700_000_000_000;
        let cases = [
            ("125.50", reads("1000.00", 0, true)),
            ("125.50", reads("100.00", 0, true)),
            ("900.00", reads("1000.00", 2, false)),
            ("125.50", PaymentReads::default()),
        ];
        for (amount, reads) in cases {
            let payment = payment(amount);
            let called = agent.assess(&payment, now, Some(reads.clone())).await;
            let at_once = agent.assess_now(&payment, now, &reads).unwrap();
            assert_eq!(at_once.decision, called.decision, "{amount} {reads:?}");
            assert_eq!(at_once.reasons, called.reasons, "{amount} {reads:?}");
            assert_eq!(untimed(&at_once), untimed(&called), "{amount} {reads:?}");
            assert!(at_once.failed_tools.is_empty());
        }
    }

    #[tokio::test]
    async fn a_tool_with_a_fault_is_always_called() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let agent = agent(&store, Some(Fault::Fail));
        assert!(!agent.answers_now());
        let reads = reads("1000.00", 0, true);
        assert!(agent.assess_now(&payment("1.00"), 0, &reads).is_none());
        let called = agent.assess(&payment("1.00"), 0, Some(reads)).await;
        assert_eq!(called.failed_tools, vec!["getBalance"]);
    }
}
