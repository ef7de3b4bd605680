//! One decision at a time per customer, within this instance.
//!
//! The velocity rule counts a customer's earlier decisions in the store. Two payments of one
//! customer decided at the same moment would each be counted without the other, and both
//! could pass a limit that only one of them should. So a decision waits for the one of its
//! customer in progress here to be committed before it reads. (SQLite's writer also counts
//! the decisions made earlier in its own batch; this gate is what covers PostgreSQL, where
//! a decision is read, made and committed in three steps.) Payments of different customers
//! never wait for each other.
//!
//! The same idempotency key sent again while its first request runs is not made to wait: it
//! is answered `idempotency_in_progress` at once, as the contract says.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Mutex as Turn, OwnedMutexGuard};

#[derive(Default)]
pub struct CustomerGates {
    customers: Mutex<HashMap<Box<str>, Gate>>,
}

struct Gate {
    turn: Arc<Turn<()>>,
    /// The idempotency scopes (caller and key) of the requests in or waiting at this gate.
    scopes: Vec<Box<str>>,
}

/// Held from the moment a request is registered at its customer's gate until it is done;
/// dropped while still waiting (a request cut short), it leaves the gate as it found it.
struct Registration {
    gates: Arc<CustomerGates>,
    customer: Box<str>,
    scope: Box<str>,
}

/// The customer's turn: others of the same customer wait until it is dropped.
pub struct Pass {
    _turn: OwnedMutexGuard<()>,
    _registration: Registration,
}

impl CustomerGates {
    /// Waits for `customer`'s turn. `None` if a request with the same `scope` (caller and
    /// idempotency key) is already in or waiting at this customer's gate.
    pub async fn enter(self: &Arc<Self>, customer: &str, scope: &str) -> Option<Pass> {
        let (turn, registration) = {
            let mut customers = self.customers.lock();
            let gate = customers.entry(customer.into()).or_insert_with(|| Gate {
                turn: Arc::new(Turn::new(())),
                scopes: Vec::new(),
            });
            if gate.scopes.iter().any(|s| &**s == scope) {
                return None;
            }
            gate.scopes.push(scope.into());
            let registration = Registration {
                gates: Arc::clone(self),
                customer: customer.into(),
                scope: scope.into(),
            };
            (Arc::clone(&gate.turn), registration)
        };
        Some(Pass {
            _turn: turn.lock_owned().await,
            _registration: registration,
        })
    }

    /// Customers with a request in or waiting at their gate.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.customers.lock().len()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut customers = self.gates.customers.lock();
        if let Some(gate) = customers.get_mut(&self.customer) {
            gate.scopes.retain(|s| *s != self.scope);
            if gate.scopes.is_empty() {
                customers.remove(&self.customer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_customer_at_a_time_others_in_parallel_same_key_refused() {
        let gates = Arc::new(CustomerGates::default());
        let first = gates.enter("c_1", "a/k1").await.unwrap();
        // Another customer goes ahead.
        let other = gates.enter("c_2", "a/k1").await.unwrap();
        // The same key of the same customer is refused at once, not queued.
        assert!(gates.enter("c_1", "a/k1").await.is_none());
        // Another key of the same customer waits for the first.
        let waiting = tokio::spawn({
            let gates = Arc::clone(&gates);
            async move { gates.enter("c_1", "a/k2").await.map(drop).is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "it waits for the first of its customer"
        );
        drop(first);
        assert!(waiting.await.unwrap());
        drop(other);
        assert_eq!(gates.busy(), 0, "a gate goes when its last request does");
    }

    #[tokio::test]
    async fn a_request_cut_short_while_waiting_leaves_nothing_behind() {
        let gates = Arc::new(CustomerGates::default());
        let first = gates.enter("c_1", "a/k1").await.unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(20), gates.enter("c_1", "a/k2"));
        assert!(cut.await.is_err(), "it was still waiting");
        // Its key is free again, and so is the gate once the first is done.
        drop(first);
        assert!(gates.enter("c_1", "a/k2").await.is_some());
        assert_eq!(gates.busy(), 0);
    }
}
