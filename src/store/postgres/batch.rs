//! Requests that arrive together, sent to PostgreSQL as one statement.
//!
//! Most of what a decision costs PostgreSQL is per statement (parsing the bind, starting and
//! ending the executor, a round trip and a backend wake-up, a WAL flush per commit), not per
//! row. A [`Batcher`] gathers the requests waiting at the moment a connection is free and
//! runs them as one statement over arrays (`unnest`), so those costs are shared by the
//! batch. Under light load a batch is one request and nothing waits; under heavy load the
//! requests that queue while the previous statements run make up the next one.
//!
//! At most `parallel` batches run at once, each on a pooled connection of its own; a request
//! that finds them all busy waits in the queue and leaves with the next batch.
//!
//! A request whose caller has stopped waiting for it (its future was dropped) by the time
//! its batch is formed is left out of the batch. One whose caller gives up while its batch
//! runs has its answer handed to the batcher's `undelivered` hook instead, so that what the
//! statement did for nobody (a claim, say) can be undone.
//!
//! A request may name an exclusive key (for example the account a reservation updates): a
//! batch never holds two requests with the same key, because one statement cannot update one
//! row twice. The later one waits for the next batch.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::StoreError;

/// The answers of a batch, one per request, in the order the requests were given.
pub type Answers<Resp> = Vec<Result<Resp, StoreError>>;

/// A batch's answers from the rows a statement returned (`None` where a request got no row),
/// or its one error for every request.
pub fn in_order<Resp>(
    answered: Result<Vec<Option<Resp>>, StoreError>,
    count: usize,
    what: &str,
) -> Answers<Resp> {
    match answered {
        Ok(answers) => answers
            .into_iter()
            .map(|a| {
                a.ok_or_else(|| StoreError::Internal(format!("a {what} came back without its row")))
            })
            .collect(),
        Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
    }
}

type RunBatch<Req, Resp> =
    Arc<dyn Fn(Vec<Req>) -> Pin<Box<dyn Future<Output = Answers<Resp>> + Send>> + Send + Sync>;

type Undelivered<Resp> = Arc<dyn Fn(Resp) + Send + Sync>;

struct Pending<Req, Resp> {
    req: Req,
    reply: oneshot::Sender<Result<Resp, StoreError>>,
}

/// Gathers requests and runs them in batches (see the module doc).
pub struct Batcher<Req, Resp> {
    queue: mpsc::UnboundedSender<Pending<Req, Resp>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the batching task. `run` executes one batch and answers each request in order;
    /// `exclusive` gives the key no two requests of one batch may share; `undelivered` gets
    /// each successful answer whose caller stopped waiting while its batch ran.
    pub fn start<F, Fut>(
        max_batch: usize,
        parallel: usize,
        exclusive: fn(&Req) -> Option<&str>,
        run: F,
        undelivered: impl Fn(Resp) + Send + Sync + 'static,
    ) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Answers<Resp>> + Send + 'static,
    {
        let (queue, pending) = mpsc::unbounded_channel();
        let run: RunBatch<Req, Resp> = Arc::new(move |batch| Box::pin(run(batch)));
        tokio::spawn(drive(
            pending,
            max_batch.max(1),
            parallel.max(1),
            exclusive,
            run,
            Arc::new(undelivered),
        ));
        Batcher { queue }
    }

    /// Sends `req` with the next batch and waits for its answer.
    pub async fn call(&self, req: Req) -> Result<Resp, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { req, reply })
            .map_err(|_| StoreError::Unavailable("store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the batch was dropped".into()))?
    }
}

async fn drive<Req: Send + 'static, Resp: Send + 'static>(
    mut queue: mpsc::UnboundedReceiver<Pending<Req, Resp>>,
    max_batch: usize,
    parallel: usize,
    exclusive: fn(&Req) -> Option<&str>,
    run: RunBatch<Req, Resp>,
    undelivered: Undelivered<Resp>,
) {
    let slots = Arc::new(Semaphore::new(parallel));
    // Requests that met a taken exclusive key: first in the next batch.
    let mut deferred: VecDeque<Pending<Req, Resp>> = VecDeque::new();
    loop {
        // A slot first: while every batch is busy, requests gather in the queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match deferred.pop_front() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch = Vec::with_capacity(max_batch.min(64));
        let mut keys: HashSet<String> = HashSet::new();
        let mut admit = |p: Pending<Req, Resp>,
                         batch: &mut Vec<Pending<Req, Resp>>,
                         deferred: &mut VecDeque<Pending<Req, Resp>>| {
            // Its caller gave up while it waited (a request past its deadline): it is not
            // run, so no claim or write is left behind for nobody.
            if p.reply.is_closed() {
                return;
            }
            match exclusive(&p.req) {
                Some(key) if keys.contains(key) => deferred.push_back(p),
                Some(key) => {
                    keys.insert(key.to_owned());
                    batch.push(p);
                }
                None => batch.push(p),
            }
        };
        admit(first, &mut batch, &mut deferred);
        // Deferred requests keep their turn: they go before anything newer.
        let mut again = VecDeque::new();
        while batch.len() < max_batch {
            match deferred.pop_front() {
                Some(p) => admit(p, &mut batch, &mut again),
                None => break,
            }
        }
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(p) => admit(p, &mut batch, &mut again),
                Err(_) => break,
            }
        }
        again.extend(deferred.drain(..));
        deferred = again;
        if batch.is_empty() {
            continue;
        }
        let (run, undelivered) = (run.clone(), undelivered.clone());
        tokio::spawn(async move {
            let (reqs, replies): (Vec<Req>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let count = replies.len();
            let mut answers = run(reqs).await.into_iter();
            for reply in replies {
                let answer = answers.next().unwrap_or_else(|| {
                    Err(StoreError::Internal(format!(
                        "a batch of {count} requests was answered short"
                    )))
                });
                // Its caller is gone (a deadline, a client that hung up): whatever the
                // statement did for it is the hook's to undo.
                if let Err(Ok(unread)) = reply.send(answer) {
                    undelivered(unread);
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn requests_waiting_together_go_in_one_batch_and_are_answered_in_order() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Arc::new(Batcher::start(
            64,
            1,
            |_: &u32| None,
            move |batch: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(batch.len());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    batch.into_iter().map(|n| Ok(n * 10)).collect()
                }
            },
            |_| {},
        ));
        let calls: Vec<_> = (0..20)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call(n).await })
            })
            .collect();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), n as u32 * 10);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.len() < 20, "requests were batched: {sizes:?}");
    }

    #[tokio::test]
    async fn a_batch_never_holds_two_requests_with_one_exclusive_key() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<Vec<(String, u32)>>::new()));
        let seen = batches.clone();
        let running = Arc::new(AtomicUsize::new(0));
        let batcher = Arc::new(Batcher::start(
            64,
            2,
            |req: &(String, u32)| Some(req.0.as_str()),
            move |batch: Vec<(String, u32)>| {
                let (seen, running) = (seen.clone(), running.clone());
                async move {
                    running.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(batch.clone());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    batch.into_iter().map(|(_, n)| Ok(n)).collect()
                }
            },
            |_| {},
        ));
        let calls: Vec<_> = (0..30u32)
            .map(|n| {
                let batcher = batcher.clone();
                let account = format!("acct_{}", n % 3);
                tokio::spawn(async move { batcher.call((account, n)).await })
            })
            .collect();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), n as u32);
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 30);
        for batch in batches.iter() {
            let keys: HashSet<&str> = batch.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys.len(), batch.len(), "a key twice in {batch:?}");
        }
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_while_it_waited_is_not_run() {
        let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
        // The first batch holds the only slot until the test lets it go.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, held) = (ran.clone(), gate.clone());
        let batcher = Arc::new(Batcher::start(
            64,
            1,
            |_: &u32| None,
            move |batch: Vec<u32>| {
                let (seen, held) = (seen.clone(), held.clone());
                async move {
                    seen.lock().unwrap().extend(batch.iter().copied());
                    if batch.contains(&1) {
                        let _ = held.acquire().await;
                    }
                    batch.into_iter().map(Ok).collect()
                }
            },
            |_| {},
        ));
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(1).await }
        });
        while ran.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Queued behind the held batch, so it cannot have run when its caller gives up.
        let gave_up = tokio::time::timeout(Duration::from_millis(5), batcher.call(2)).await;
        assert!(gave_up.is_err());
        gate.add_permits(1);
        let third = batcher.call(3).await.unwrap();
        assert_eq!((first.await.unwrap().unwrap(), third), (1, 3));
        assert_eq!(*ran.lock().unwrap(), [1, 3]);
    }

    #[tokio::test]
    async fn an_answer_whose_caller_gave_up_while_its_batch_ran_goes_to_the_hook() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let running = Arc::new(tokio::sync::Notify::new());
        let undelivered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (held, started, lost) = (gate.clone(), running.clone(), undelivered.clone());
        let batcher = Arc::new(Batcher::start(
            64,
            1,
            |_: &u32| None,
            move |batch: Vec<u32>| {
                let (held, started) = (held.clone(), started.clone());
                async move {
                    started.notify_one();
                    let _ = held.acquire().await;
                    batch.into_iter().map(Ok).collect()
                }
            },
            move |answer: u32| lost.lock().unwrap().push(answer),
        ));
        let gives_up = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(1).await }
        });
        running.notified().await;
        // The batch holding its request is running: its caller stops waiting.
        gives_up.abort();
        assert!(gives_up.await.is_err_and(|e| e.is_cancelled()));
        gate.add_permits(1);
        // A later call waits for its answer and gets it; only the abandoned one is handed over.
        let waits = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(2).await }
        });
        running.notified().await;
        gate.add_permits(1);
        assert_eq!(waits.await.unwrap().unwrap(), 2);
        assert_eq!(*undelivered.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn at_most_parallel_batches_run_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let batcher = Arc::new(Batcher::start(
            2,
            3,
            |_: &u32| None,
            move |batch: Vec<u32>| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    batch.into_iter().map(Ok).collect()
                }
            },
            |_| {},
        ));
        let calls: Vec<_> = (0..40)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call(n).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
