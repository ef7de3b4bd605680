//! The daily limit at the store, on each engine, when decisions commit in another order than
//! their times: a request stamped just before midnight may commit after one of the new day.

use paynow::domain::Decision;
use paynow::store::{DynStore, now_ms};

use crate::helpers::{Backend, commit_at, fresh_store};

const DAY_MS: i64 = 86_400_000;

/// An allow of `amount` by `customer`, stamped `at_ms`, committed now: what the store made of it.
async fn allow_at(store: &DynStore, customer: &str, amount: &str, at_ms: i64) -> Decision {
    commit_at(store, customer, amount, Decision::Allow, at_ms).await
}

crate::on_each_engine!(a_payment_of_the_day_before_that_commits_late_counts_toward_the_new_day);

async fn a_payment_of_the_day_before_that_commits_late_counts_toward_the_new_day(backend: Backend) {
    let (store, _dir) = fresh_store(backend).await;
    let midnight = (now_ms().div_euclid(DAY_MS) + 1) * DAY_MS;
    // c_rich holds 50,000.00; the daily limit is 10,000.00.
    assert_eq!(
        allow_at(&store, "c_rich", "5000.00", midnight + 1_000).await,
        Decision::Allow
    );
    // Stamped before midnight, committed after: it must not take the new day's count back to
    // the old day (which would start the new day over from nothing).
    assert_eq!(
        allow_at(&store, "c_rich", "1.00", midnight - 100).await,
        Decision::Allow
    );
    assert_eq!(
        allow_at(&store, "c_rich", "4999.00", midnight + 2_000).await,
        Decision::Allow,
        "5000.00 + 1.00 + 4999.00 is the limit exactly"
    );
    assert_eq!(
        allow_at(&store, "c_rich", "0.01", midnight + 3_000).await,
        Decision::Block,
        "the new day is at its limit"
    );
    store.close().await;
}
