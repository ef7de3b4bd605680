//! The agent's tools: each answers one question about a payment, behind a trait so that a
//! store-backed tool, an HTTP adapter or a fault-injecting wrapper look the same to the agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use parking_lot::Mutex;

use crate::domain::{CustomerId, PayeeId, Payment};
use crate::store::{Account, DynStore, PaymentReads, RiskProfile, StoreError};

#[derive(Debug, thiserror::Error, Clone)]
pub enum ToolError {
    #[error("{0}")]
    Failed(String),
}

#[async_trait]
pub trait Tool: Send + Sync {
    type Output: Send;
    fn name(&self) -> &'static str;
    /// `velocity_since_ms` is the start of the velocity window, for tools that count payments.
    async fn call(
        &self,
        payment: &Payment,
        velocity_since_ms: i64,
    ) -> Result<Self::Output, ToolError>;
}

pub type BalanceTool = Arc<dyn Tool<Output = Option<Account>>>;
pub type RiskTool = Arc<dyn Tool<Output = Option<RiskProfile>>>;

/// The trace (and so the response and the case) says only that storage failed; the cause,
/// which may carry driver or server text, goes to the log.
fn store_failure(tool: &'static str, e: crate::store::StoreError) -> ToolError {
    tracing::warn!(event = "tool.store_error", tool, error = %e);
    ToolError::Failed("storage error".into())
}

/// The store reads behind `getBalance` and `getRiskSignals`, shared between the two.
///
/// The agent calls both tools at once, each with its own deadline and retries, and both
/// want the same account row. Reading it once, in one statement, costs one round trip and
/// one snapshot instead of two. The first call for a payment starts the read; a call for the
/// same customer, payee and velocity window that comes while the read runs (or up to
/// [`REUSE_FOR`] after it succeeded) takes its answer. Since the window starts at the
/// request's clock in milliseconds, only the two tools of one request, or requests of the
/// same customer and payee begun in the same millisecond, ever meet here; commit re-checks
/// the funds whatever was read. A failed read is never reused, so a retry reads again, and a
/// read whose callers all gave up (deadline) is dropped with them, freeing its connection.
pub struct PaymentReadsCache {
    store: DynStore,
    reads: Mutex<Reads>,
}

struct Reads {
    by_key: HashMap<ReadKey, Entry>,
    /// Stale entries are swept when the map grows past this, which then doubles what is
    /// left: a sweep walks the whole map, so it must stay rare (amortised O(1) a read).
    sweep_above: usize,
}

/// How long a successful read may answer the other tool of the same request. The agent
/// calls both tools together, so the second asks microseconds after the first.
const REUSE_FOR: Duration = Duration::from_millis(10);

/// The smallest map that is swept.
const SWEEP_ABOVE: usize = 64;

type ReadKey = (CustomerId, PayeeId, i64);
type SharedRead = Shared<BoxFuture<'static, Result<PaymentReads, StoreError>>>;

enum Entry {
    Running(WeakShared<BoxFuture<'static, Result<PaymentReads, StoreError>>>),
    Done(Instant, PaymentReads),
}

impl PaymentReadsCache {
    pub fn new(store: DynStore) -> Arc<Self> {
        Arc::new(PaymentReadsCache {
            store,
            reads: Mutex::new(Reads {
                by_key: HashMap::new(),
                sweep_above: SWEEP_ABOVE,
            }),
        })
    }

    async fn get(
        self: &Arc<Self>,
        payment: &Payment,
        since_ms: i64,
    ) -> Result<PaymentReads, StoreError> {
        let key: ReadKey = (payment.customer.clone(), payment.payee.clone(), since_ms);
        let read = {
            let mut reads = self.reads.lock();
            let reads = &mut *reads;
            match reads.by_key.get(&key) {
                Some(Entry::Done(at, found)) if at.elapsed() < REUSE_FOR => {
                    return Ok(found.clone());
                }
                Some(Entry::Running(weak)) => weak.upgrade(),
                _ => None,
            }
            .unwrap_or_else(|| {
                let read = self.start(key.clone());
                if reads.by_key.len() >= reads.sweep_above {
                    let now = Instant::now();
                    reads.by_key.retain(|_, entry| match entry {
                        Entry::Done(at, _) => now.duration_since(*at) < REUSE_FOR,
                        Entry::Running(weak) => weak.upgrade().is_some(),
                    });
                    reads.sweep_above = (reads.by_key.len() * 2).max(SWEEP_ABOVE);
                }
                if let Some(weak) = read.downgrade() {
                    reads.by_key.insert(key, Entry::Running(weak));
                }
                read
            })
        };
        read.await
    }

    fn start(self: &Arc<Self>, key: ReadKey) -> SharedRead {
        let this = Arc::clone(self);
        async move {
            let (customer, payee, since_ms) = &key;
            let result = this
                .store
                .payment_reads(customer, payee, since_ms.to_owned())
                .await;
            let mut reads = this.reads.lock();
            match &result {
                Ok(found) => reads
                    .by_key
                    .insert(key, Entry::Done(Instant::now(), found.clone())),
                Err(_) => reads.by_key.remove(&key),
            };
            result
        }
        .boxed()
        .shared()
    }
}

/// `getBalance`: the account's currency, balance, reservations and today's outflow.
pub struct StoreBalance(pub Arc<PaymentReadsCache>);

#[async_trait]
impl Tool for StoreBalance {
    type Output = Option<Account>;
    fn name(&self) -> &'static str {
        "getBalance"
    }
    async fn call(&self, payment: &Payment, since_ms: i64) -> Result<Self::Output, ToolError> {
        self.0
            .get(payment, since_ms)
            .await
            .map(|reads| reads.account)
            .map_err(|e| store_failure(self.name(), e))
    }
}

/// `getRiskSignals`: disputes, device change, payee familiarity and recent velocity.
pub struct StoreRiskSignals(pub Arc<PaymentReadsCache>);

#[async_trait]
impl Tool for StoreRiskSignals {
    type Output = Option<RiskProfile>;
    fn name(&self) -> &'static str {
        "getRiskSignals"
    }
    async fn call(&self, payment: &Payment, since_ms: i64) -> Result<Self::Output, ToolError> {
        self.0
            .get(payment, since_ms)
            .await
            .map(|reads| reads.risk)
            .map_err(|e| store_failure(self.name(), e))
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
    async fn call(&self, payment: &Payment, since_ms: i64) -> Result<O, ToolError> {
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
        self.inner.call(payment, since_ms).await
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
