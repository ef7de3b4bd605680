//! The velocity count at the store, on each engine: a customer's decisions in the window,
//! counted up to the rule's limit, whatever else is written around them.

use paynow::domain::{CustomerId, Decision, PayeeId};
use paynow::store::{DynStore, ReadsRequest};

use crate::helpers::{Backend, commit_at, fresh_store};

/// A reviewed payment of `customer` decided at `at_ms` (a review reserves nothing, so any
/// number of them fit).
async fn decide_at(store: &DynStore, customer: &str, at_ms: i64) {
    assert_eq!(
        commit_at(store, customer, "1.00", Decision::Review, at_ms).await,
        Decision::Review
    );
}

async fn count(store: &DynStore, customer: &str, since_ms: i64, cap: u32) -> u32 {
    let reads = store
        .payment_reads(&ReadsRequest {
            customer: CustomerId::parse(customer).unwrap(),
            payee: PayeeId::parse("p_789").unwrap(),
            velocity_since_ms: since_ms,
            velocity_cap: cap,
        })
        .await
        .unwrap();
    reads.risk.expect("a known customer").recent_payments
}

crate::on_each_engine!(
    counts_a_customers_decisions_in_the_window_up_to_the_limit,
    decisions_made_together_are_each_counted,
);

async fn counts_a_customers_decisions_in_the_window_up_to_the_limit(backend: Backend) {
    let (store, _dir) = fresh_store(backend).await;
    let base = paynow::store::now_ms() - 3_600_000;
    assert_eq!(count(&store, "c_rich", 0, 100).await, 0);
    // c_rich at base+1s … base+5s, with c_456 in between.
    for i in 1..=5 {
        decide_at(&store, "c_rich", base + i * 1000).await;
        decide_at(&store, "c_456", base + i * 1000 + 500).await;
    }
    assert_eq!(count(&store, "c_rich", 0, 100).await, 5);
    assert_eq!(count(&store, "c_456", 0, 100).await, 5);
    // The window starts at a decision (inclusive) or between two.
    assert_eq!(count(&store, "c_rich", base + 3000, 100).await, 3);
    assert_eq!(count(&store, "c_rich", base + 3001, 100).await, 2);
    assert_eq!(count(&store, "c_rich", base + 6000, 100).await, 0);
    // Counted up to the limit and no further.
    assert_eq!(count(&store, "c_rich", 0, 4).await, 4);
    assert_eq!(count(&store, "c_rich", 0, 5).await, 5);
    assert_eq!(count(&store, "c_rich", 0, 1).await, 1);
    assert_eq!(count(&store, "c_rich", 0, 0).await, 0);
    assert_eq!(count(&store, "c_rich", base + 4000, 1).await, 1);
    // A customer with no decisions counts none.
    assert_eq!(count(&store, "c_123", 0, 100).await, 0);
    // A request that started earlier may commit later: it still counts, and does not hide
    // the ones before it.
    decide_at(&store, "c_123", base + 2000).await;
    decide_at(&store, "c_123", base + 1000).await;
    assert_eq!(count(&store, "c_123", base + 1500, 100).await, 1);
    assert_eq!(count(&store, "c_123", base + 500, 100).await, 2);
    assert_eq!(count(&store, "c_123", base + 2001, 100).await, 0);
    decide_at(&store, "c_123", base + 3000).await;
    assert_eq!(count(&store, "c_123", base + 1500, 100).await, 2);
    assert_eq!(count(&store, "c_123", base + 1000, 100).await, 3);
    assert_eq!(count(&store, "c_123", base + 1000, 2).await, 2);
    store.close().await;
}

async fn decisions_made_together_are_each_counted(backend: Backend) {
    let (store, _dir) = fresh_store(backend).await;
    let now = paynow::store::now_ms();
    // Concurrent decisions of one customer go to the store together (one SQLite batch, one
    // PostgreSQL statement), interleaved with another customer's.
    let sends = (0..24).map(|i| {
        let store = store.clone();
        let customer = if i % 3 == 0 { "c_456" } else { "c_rich" };
        async move { decide_at(&store, customer, now).await }
    });
    futures::future::join_all(sends).await;
    assert_eq!(count(&store, "c_rich", now, 100).await, 16);
    assert_eq!(count(&store, "c_456", now, 100).await, 8);
    decide_at(&store, "c_rich", now + 1).await;
    assert_eq!(count(&store, "c_rich", now, 100).await, 17);
    assert_eq!(count(&store, "c_rich", now + 1, 100).await, 1);
    store.close().await;
}
