//! The agent's tools: each answers one question about a payment, behind a trait so that a
//! store-backed tool, an HTTP adapter or a fault-injecting wrapper look the same to the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::Payment;
use crate::store::{Account, DynStore, PaymentReads, ReadsRequest, RiskProfile, StoreError};

#[derive(Debug, thiserror::Error, Clone)]
pub enum ToolError {
    #[error("{0}")]
    Failed(String),
}

#[async_trait]
pub trait Tool: Send + Sync {
    type Output: Send;
    fn name(&self) -> &'static str;
    async fn call(&self, payment: &Payment, ctx: &ToolContext) -> Result<Self::Output, ToolError>;

    /// The answer `call` would give, at once and without waiting for anything, from reads
    /// the store already made; `None` for a tool that has to run (a remote service, a
    /// fault to inject). Lets the agent decide where the reads were made, in the same step.
    fn answer_now(&self, _reads: &PaymentReads) -> Option<Self::Output> {
        None
    }
}

pub type BalanceTool = Arc<dyn Tool<Output = Option<Account>>>;
pub type RiskTool = Arc<dyn Tool<Output = Option<RiskProfile>>>;

/// The trace (and so the response and the case) says only that storage failed; the cause,
/// which may carry driver or server text, goes to the log.
fn store_failure(tool: &'static str, e: crate::store::StoreError) -> ToolError {
    tracing::warn!(event = "tool.store_error", tool, error = %e);
    ToolError::Failed("storage error".into())
}

/// What the tools of one assessment share: what to read about the payment, and the store
/// reads behind `getBalance` and `getRiskSignals`.
///
/// The agent calls both tools at once, each with its own deadline and retries, and both want
/// the same account row: reading it once, in one statement, costs one round trip and one
/// snapshot instead of two. The store usually made that read already, in the round trip that
/// claimed the idempotency key (`prefetched`); otherwise the first tool to ask starts the
/// read and the other waits for it. A failed or abandoned (deadline) read is not kept, so
/// the next attempt reads again. The context lives for one assessment only, so nothing read
/// is reused by another request.
pub struct ToolContext {
    pub reads: ReadsRequest,
    fetched: tokio::sync::OnceCell<PaymentReads>,
}

impl ToolContext {
    pub fn new(reads: ReadsRequest, prefetched: Option<PaymentReads>) -> Self {
        ToolContext {
            reads,
            fetched: tokio::sync::OnceCell::new_with(prefetched),
        }
    }

    async fn payment_reads(&self, store: &DynStore) -> Result<&PaymentReads, StoreError> {
        self.fetched
            .get_or_try_init(|| store.payment_reads(&self.reads))
            .await
    }
}

/// `getBalance`: the account's currency, balance, reservations and today's outflow.
pub struct StoreBalance(pub DynStore);

#[async_trait]
impl Tool for StoreBalance {
    type Output = Option<Account>;
    fn name(&self) -> &'static str {
        "getBalance"
    }
    async fn call(&self, _: &Payment, ctx: &ToolContext) -> Result<Self::Output, ToolError> {
        ctx.payment_reads(&self.0)
            .await
            .map(|reads| reads.account.clone())
            .map_err(|e| store_failure(self.name(), e))
    }
    fn answer_now(&self, reads: &PaymentReads) -> Option<Self::Output> {
        Some(reads.account.clone())
    }
}

/// `getRiskSignals`: disputes, device change, payee familiarity and recent velocity.
pub struct StoreRiskSignals(pub DynStore);

#[async_trait]
impl Tool for StoreRiskSignals {
    type Output = Option<RiskProfile>;
    fn name(&self) -> &'static str {
        "getRiskSignals"
    }
    async fn call(&self, _: &Payment, ctx: &ToolContext) -> Result<Self::Output, ToolError> {
        ctx.payment_reads(&self.0)
            .await
            .map(|reads| reads.risk.clone())
            .map_err(|e| store_failure(self.name(), e))
    }
    fn answer_now(&self, reads: &PaymentReads) -> Option<Self::Output> {
        Some(reads.risk.clone())
    }
}

/// A fault to inject into a tool, for tests and drills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every call fails.
    Fail,
    /// Every call hangs past any deadline.
    Timeout,
    /// Every call is delayed.
    Slow(Duration),
    /// The first N calls fail, later ones succeed.
    Flaky(u32),
}

/// Parses `PAYNOW_FAULTS`: `getRiskSignals=timeout,getBalance=slow:50,getBalance=flaky:1`.
pub fn parse_faults(spec: &str) -> Result<Vec<(String, Fault)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (tool, fault) = item
                .split_once('=')
                .ok_or_else(|| format!("fault {item:?} must look like TOOL=FAULT"))?;
            if !matches!(tool, "getBalance" | "getRiskSignals") {
                return Err(format!("unknown tool {tool:?} in fault {item:?}"));
            }
            let (kind, arg) = fault.split_once(':').unwrap_or((fault, ""));
            let number = || {
                arg.parse::<u32>()
                    .map_err(|_| format!("fault {item:?} needs a number after ':'"))
            };
            let fault = match kind {
                "fail" => Fault::Fail,
                "timeout" => Fault::Timeout,
                "slow" => Fault::Slow(Duration::from_millis(u64::from(number()?))),
                "flaky" => Fault::Flaky(number()?),
                _ => {
                    return Err(format!(
                        "unknown fault {kind:?}: use fail, timeout, slow:MS or flaky:N"
                    ));
                }
            };
            Ok((tool.to_owned(), fault))
        })
        .collect()
}

/// Wraps a tool and injects a fault before each call.
pub struct WithFault<T: ?Sized> {
    inner: Arc<T>,
    fault: Fault,
    calls: AtomicU32,
}

impl<T: ?Sized> WithFault<T> {
    pub fn new(inner: Arc<T>, fault: Fault) -> Self {
        WithFault {
            inner,
            fault,
            calls: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl<O: Send + 'static, T: Tool<Output = O> + ?Sized + 'static> Tool for WithFault<T> {
    type Output = O;
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn call(&self, payment: &Payment, ctx: &ToolContext) -> Result<O, ToolError> {
        match self.fault {
            Fault::Fail => return Err(ToolError::Failed("injected failure".into())),
            Fault::Timeout => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Fault::Slow(delay) => tokio::time::sleep(delay).await,
            Fault::Flaky(n) => {
                if self.calls.fetch_add(1, Ordering::Relaxed) < n {
                    return Err(ToolError::Failed("injected transient failure".into()));
                }
            }
        }
        self.inner.call(payment, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let faults = parse_faults("getRiskSignals=timeout, getBalance=slow:50").unwrap();
        assert_eq!(faults[0], ("getRiskSignals".into(), Fault::Timeout));
        assert_eq!(
            faults[1],
            ("getBalance".into(), Fault::Slow(Duration::from_millis(50)))
        );
        assert_eq!(
            parse_faults("getBalance=flaky:2").unwrap()[0].1,
            Fault::Flaky(2)
        );
        assert!(parse_faults("").unwrap().is_empty());
    }

    #[test]
    fn bad_fault_specs_are_refused() {
        assert!(parse_faults("getBalance").is_err());
        assert!(parse_faults("nope=fail").is_err());
        assert!(parse_faults("getBalance=explode").is_err());
        assert!(parse_faults("getBalance=slow:x").is_err());
    }
}
