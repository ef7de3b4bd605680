//! The global limiter: GCRA in one Lua script on Redis, shared by every instance.
//!
//! # Why GCRA in a script
//! A customer's bucket is one integer in Redis, its *theoretical arrival time* (TAT). A check
//! is one `EVALSHA` that reads it, decides and writes it back atomically, so instances never
//! race each other, and the time comes from the Redis server's clock (`TIME`), so skewed
//! clocks on the instances do not matter. The key expires when the bucket is full again, so
//! Redis only holds active customers.
//!
//! # One round trip for many checks
//! Checks are not sent one by one: a batching task sends every check waiting at that moment
//! (up to [`MAX_BATCH`]) as one `EVALSHA` over all their keys, and the next batch when that
//! answer is back. The script runs the same GCRA step for each key in turn, atomically, so a
//! customer appearing twice in one batch takes two tokens in order, exactly as two separate
//! calls would. Under load this turns dozens of round trips (each a Redis wake-up, a script
//! call and a client wake-up) into one; alone, a check costs the same single round trip as
//! before. All keys of a batch go to one Redis, so this needs a single Redis server (or a
//! primary with replicas), not Redis Cluster.
//!
//! # When Redis is away
//! Every call has a short deadline ([`REDIS_TIMEOUT`]). On the first failure the limiter
//! logs one warning and answers from an in-process [`MemoryLimiter`]: the limit then holds
//! per instance instead of globally, and requests keep being answered. Each such check is
//! counted (`rate_limiter_fallbacks_total`). Meanwhile a background task pings Redis; when it
//! answers, the limiter logs once and goes back to it. While Redis is known to be down, checks
//! do not wait for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::memory::MemoryLimiter;
use super::{Quota, RateDecision, RateLimiter};
use crate::metrics::Metrics;

/// Longest a check waits for Redis before answering from the local limiter.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// How often an unreachable Redis is tried again.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Most checks sent in one script call.
const MAX_BATCH: usize = 128;

/// KEYS: the customers' buckets, in the order checked. ARGV[1]: emission interval (µs),
/// ARGV[2]: burst. Returns, for each key in turn, {allowed, remaining, reset_after µs,
/// retry_after µs}, flattened into one array.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local out = {}
for _, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local n = #out
  if new_tat - now > tolerance then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, 0, tat - now, new_tat - now - tolerance
  else
    redis.call('SET', key, string.format('%d', new_tat),
      'PX', math.floor((new_tat - now) / 1000) + 1)
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] =
      1, math.floor((tolerance - (new_tat - now)) / interval), new_tat - now, 0
  end
end
return out
";

/// One check waiting for its batch: the bucket key and where its answer goes.
struct Pending {
    bucket: String,
    answer: oneshot::Sender<Result<RateDecision, String>>,
}

/// What the batching task needs; it holds no reference back to the limiter, so it ends when
/// the limiter (and with it the sending half of its queue) is dropped.
struct Batcher {
    conn: ConnectionManager,
    script: ::redis::Script,
    quota: Quota,
    interval_us: u64,
}

impl Batcher {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Pending>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            // A caller past its deadline has fallen back to the local limiter already; taking
            // a Redis token for it too would charge the customer twice.
            batch.retain(|pending| !pending.answer.is_closed());
            if batch.is_empty() {
                continue;
            }
            let answers = self.gcra(&batch).await;
            for (i, pending) in batch.drain(..).enumerate() {
                let answer = match &answers {
                    Ok(decisions) => decisions
                        .get(i)
                        .copied()
                        .ok_or_else(|| "script answered too few checks".to_owned()),
                    Err(e) => Err(e.clone()),
                };
                // The caller may have stopped waiting (its deadline); nothing to do then.
                let _ = pending.answer.send(answer);
            }
        }
    }

    async fn gcra(&mut self, batch: &[Pending]) -> Result<Vec<RateDecision>, String> {
        let mut call = self.script.prepare_invoke();
        for pending in batch {
            call.key(&pending.bucket);
        }
        call.arg(self.interval_us).arg(self.quota.burst);
        let answer: Vec<i64> =
            tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut self.conn))
                .await
                .map_err(|_| format!("no answer within {} ms", REDIS_TIMEOUT.as_millis()))?
                .map_err(|e| e.to_string())?;
        if answer.len() != batch.len() * 4 {
            return Err(format!(
                "unexpected script answer: {} numbers for {} checks",
                answer.len(),
                batch.len()
            ));
        }
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(answer
            .chunks_exact(4)
            .map(|d| RateDecision {
                allowed: d[0] == 1,
                limit: self.quota.burst,
                remaining: u32::try_from(d[1]).unwrap_or(0),
                reset_after: micros(d[2]),
                retry_after: micros(d[3]),
            })
            .collect())
    }
}

pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    script: ::redis::Script,
    prefix: String,
    quota: Quota,
    interval_us: u64,
    /// The batching task's queue, started by the first check (which runs inside the
    /// runtime; building the limiter need not).
    queue: OnceLock<mpsc::UnboundedSender<Pending>>,
    fallback: MemoryLimiter,
    metrics: Arc<Metrics>,
    /// False while Redis is known to be unreachable and checks go to `fallback`.
    healthy: AtomicBool,
    /// Why Redis was last unreachable, for `/readyz`.
    last_error: Mutex<String>,
}

impl RedisLimiter {
    /// Checks the URL now (a bad one fails start-up) but connects lazily: an unreachable Redis
    /// at start is the same as one that goes away later.
    pub fn new(
        url: &str,
        prefix: &str,
        quota: Quota,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = ::redis::Client::open(url).map_err(|e| {
            anyhow::anyhow!("REDIS_URL is not a valid Redis URL (redis://HOST:PORT/DB): {e}")
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT * 2))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            // Reconnection is retried by the probe; the manager should give up fast so that
            // a returning Redis is noticed at the next probe.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(REDIS_TIMEOUT);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("cannot set up the Redis connection: {e}"))?;
        let interval_us = (1_000_000 / u64::from(quota.rps)).max(1);
        Ok(RedisLimiter {
            shared: Arc::new(Shared {
                conn,
                script: ::redis::Script::new(GCRA),
                prefix: prefix.to_owned(),
                quota,
                interval_us,
                queue: OnceLock::new(),
                fallback: MemoryLimiter::new(quota),
                metrics,
                healthy: AtomicBool::new(true),
                last_error: Mutex::new(String::new()),
            }),
        })
    }

    /// Whether checks currently go to Redis (false while falling back).
    pub fn using_redis(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }
}

impl Shared {
    async fn gcra(&self, key: &str) -> Result<RateDecision, String> {
        let queue = self.queue.get_or_init(|| {
            let (send, receive) = mpsc::unbounded_channel();
            let batcher = Batcher {
                conn: self.conn.clone(),
                script: self.script.clone(),
                quota: self.quota,
                interval_us: self.interval_us,
            };
            tokio::spawn(batcher.run(receive));
            send
        });
        let mut bucket = String::with_capacity(self.prefix.len() + key.len());
        bucket.push_str(&self.prefix);
        bucket.push_str(key);
        let (answer, answered) = oneshot::channel();
        queue
            .send(Pending { bucket, answer })
            .map_err(|_| "the Redis batching task stopped".to_owned())?;
        // The deadline covers the wait for the batch before ours as well as our own.
        tokio::time::timeout(REDIS_TIMEOUT, answered)
            .await
            .map_err(|_| format!("no answer within {} ms", REDIS_TIMEOUT.as_millis()))?
            .map_err(|_| "the Redis batching task stopped".to_owned())?
    }

    async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let pong = tokio::time::timeout(
            REDIS_TIMEOUT,
            ::redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", REDIS_TIMEOUT.as_millis())),
        }
    }

    /// Switches to the local limiter (once) and starts watching for Redis to return.
    fn fall_back(self: &Arc<Self>, error: String) {
        *self.last_error.lock() = error.clone();
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                event = "ratelimit.redis_unreachable",
                error = %error,
                "Redis does not answer; rate limits are per instance until it returns"
            );
            tokio::spawn(probe(Arc::downgrade(self)));
        }
    }
}

/// Pings Redis until it answers, then sends checks back to it. Ends with the limiter.
async fn probe(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.ping().await {
            Ok(()) => {
                shared.healthy.store(true, Ordering::Release);
                tracing::info!(
                    event = "ratelimit.redis_recovered",
                    "Redis answers again; rate limits are global again"
                );
                return;
            }
            Err(e) => *shared.last_error.lock() = e,
        }
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn check(&self, key: &str) -> RateDecision {
        if self.shared.healthy.load(Ordering::Acquire) {
            match self.shared.gcra(key).await {
                Ok(decision) => return decision,
                Err(e) => self.shared.fall_back(e),
            }
        }
        self.shared.metrics.limiter_fell_back();
        self.shared.fallback.check_now(key)
    }

    async fn ready(&self) -> Result<(), String> {
        if !self.shared.healthy.load(Ordering::Acquire) {
            let why = self.shared.last_error.lock().clone();
            return Err(format!(
                "redis unreachable ({why}); using the in-process limiter"
            ));
        }
        self.shared.ping().await.map_err(|e| {
            self.shared.fall_back(e.clone());
            format!("redis unreachable ({e}); using the in-process limiter")
        })
    }

    fn maintain(&self) {
        self.shared.fallback.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_fails_at_start_naming_the_variable() {
        let metrics = Arc::new(Metrics::new());
        let quota = Quota::new(5, 5).unwrap();
        for bad in ["http://127.0.0.1:6379", "not a url", "redis://"] {
            match RedisLimiter::new(bad, "t:", quota, metrics.clone()) {
                Ok(_) => panic!("{bad:?} was accepted"),
                Err(e) => assert!(e.to_string().contains("REDIS_URL"), "{e}"),
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_falls_back_to_the_local_limit_and_counts_it() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let metrics = Arc::new(Metrics::new());
        let limiter = RedisLimiter::new(
            "redis://127.0.0.1:1",
            "t:",
            Quota::new(1, 2).unwrap(),
            metrics.clone(),
        )
        .unwrap();
        assert!(limiter.check("c_1").await.allowed);
        assert!(!limiter.using_redis());
        assert!(limiter.check("c_1").await.allowed);
        assert!(
            !limiter.check("c_1").await.allowed,
            "the local bucket holds the limit"
        );
        assert_eq!(metrics.snapshot().rate_limiter_fallbacks, 3);
        assert!(limiter.ready().await.unwrap_err().contains("in-process"));
    }
}
