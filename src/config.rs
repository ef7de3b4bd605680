//! Configuration: environment variables (the names are part of the contract) mirrored by
//! command-line flags. Everything is checked here, at start-up, never at the first request.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::agent::tools::{Fault, parse_faults};
use crate::ratelimit::Quota;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// `paynow serve` flags; each falls back to its environment variable.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// One API key.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Comma-separated API keys, each `key` or `name:key` (for rotation).
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// Listen address.
    #[arg(long, env = "PAYNOW_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// `sqlite://FILE` (embedded default) or `postgres://USER@HOST:PORT/DB` (many instances).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://paynow.db",
        hide_env_values = true
    )]
    pub database_url: String,
    /// PostgreSQL connections kept by this instance.
    #[arg(long, env = "PAYNOW_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// When set, rate limits are global through Redis.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of the rate-limit keys in Redis (deployments sharing one Redis use distinct ones).
    #[arg(long, env = "PAYNOW_REDIS_KEY_PREFIX", default_value = "paynow:rl:")]
    pub redis_key_prefix: String,
    /// Per-customer token refill rate (requests per second).
    #[arg(long, env = "PAYNOW_RATE_LIMIT_RPS", default_value_t = 5)]
    pub rate_limit_rps: u32,
    /// Per-customer bucket size.
    #[arg(long, env = "PAYNOW_RATE_LIMIT_BURST", default_value_t = 5)]
    pub rate_limit_burst: u32,
    /// How long responses are kept for replay.
    #[arg(long, env = "PAYNOW_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// Held reservations not captured or released within this time are released.
    #[arg(long, env = "PAYNOW_RESERVATION_TTL_SECS", default_value_t = 7 * 86_400)]
    pub reservation_ttl_secs: u64,
    /// Customers file loaded into an empty store (default: the shipped demo customers).
    #[arg(long, env = "PAYNOW_FIXTURES")]
    pub fixtures: Option<PathBuf>,
    /// Policy file (default: the shipped default policy).
    #[arg(long, env = "PAYNOW_POLICY")]
    pub policy: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "PAYNOW_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Largest accepted request body.
    #[arg(long, env = "PAYNOW_BODY_LIMIT_BYTES", default_value_t = 16 * 1024)]
    pub body_limit_bytes: usize,
    /// Requests running longer than this are answered 503.
    #[arg(long, env = "PAYNOW_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Fault injection for drills: `getRiskSignals=timeout,getBalance=slow:50`.
    #[arg(long, env = "PAYNOW_FAULTS", default_value = "")]
    pub faults: String,
}

/// One accepted API key: who it is, and a digest of the secret.
#[derive(Clone)]
struct ApiKey {
    name: Arc<str>,
    digest: [u8; 32],
}

/// The accepted API keys. `Debug` shows names only.
#[derive(Clone)]
pub struct ApiKeys(Vec<ApiKey>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| &*k.name))
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl ApiKeys {
    /// Parses `API_KEY` and/or `API_KEYS` (`key` or `name:key`, comma-separated).
    pub fn parse(single: Option<&str>, list: Option<&str>) -> Result<Self, String> {
        let mut keys = Vec::new();
        // `API_KEY` is one secret, taken whole (it may contain ':'); `API_KEYS` entries may
        // be `name:key`.
        let single = single
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| (None, k));
        let listed = list
            .into_iter()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| match e.split_once(':') {
                Some((name, secret)) => (Some(name.trim()), secret.trim()),
                None => (None, e),
            });
        for (name, secret) in single.into_iter().chain(listed) {
            let name = match name {
                Some(name) => name.to_owned(),
                // An unnamed key is known by a digest prefix: stable, and not the secret.
                None => format!("key-{}", hex::encode(&digest(secret.as_bytes())[..4])),
            };
            if secret.len() < 8 || secret.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                return Err(format!(
                    "API key {name:?} must be at least 8 printable characters without spaces"
                ));
            }
            if name.is_empty() {
                return Err("API key names (before ':') must not be empty".into());
            }
            // A name may have several keys: rotating a caller's key means giving its new key
            // the same name, so that its retries keep their idempotency scope. One key under
            // two names would make the caller's identity ambiguous.
            let digest = digest(secret.as_bytes());
            if let Some(other) = keys.iter().find(|k: &&ApiKey| k.digest == digest) {
                if *other.name != *name {
                    return Err(format!(
                        "one API key is given under two names, {:?} and {name:?}",
                        &*other.name
                    ));
                }
                continue;
            }
            keys.push(ApiKey {
                name: name.into(),
                digest,
            });
        }
        if keys.is_empty() {
            return Err(
                "no API key: set API_KEY (or API_KEYS=name:key,...) to start PayNow".into(),
            );
        }
        Ok(ApiKeys(keys))
    }

    /// The caller's identity if `presented` is one of the keys. Compares digests in constant
    /// time and always checks every key, so timing tells nothing about which part matched.
    pub fn identify(&self, presented: &[u8]) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut found = None;
        for key in &self.0 {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(key.name.clone());
            }
        }
        found
    }
}

/// The service's whole configuration, checked.
#[derive(Clone, Debug)]
pub struct Config {
    pub api_keys: ApiKeys,
    pub bind: SocketAddr,
    pub database_url: String,
    /// PostgreSQL connections kept by this instance (unused with SQLite).
    pub db_pool_size: usize,
    pub redis_url: Option<String>,
    pub redis_key_prefix: String,
    pub rate_limit: Quota,
    pub idempotency_ttl: Duration,
    pub reservation_ttl: Duration,
    pub fixtures: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub log_format: LogFormat,
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    pub faults: Vec<(String, Fault)>,
}

impl Config {
    pub fn api_keys_count(&self) -> usize {
        self.api_keys.0.len()
    }

    pub fn from_args(args: &ServeArgs) -> Result<Self, String> {
        if args.body_limit_bytes < 256 {
            return Err("PAYNOW_BODY_LIMIT_BYTES must be at least 256".into());
        }
        // Upper bounds keep every derived millisecond count far inside an i64.
        const TEN_YEARS_SECS: u64 = 10 * 366 * 86_400;
        if args.reservation_ttl_secs == 0 || args.reservation_ttl_secs > TEN_YEARS_SECS {
            return Err("PAYNOW_RESERVATION_TTL_SECS must be 1 second to 10 years".into());
        }
        if args.idempotency_ttl_secs == 0 || args.idempotency_ttl_secs > TEN_YEARS_SECS {
            return Err("PAYNOW_IDEMPOTENCY_TTL_SECS must be 1 second to 10 years".into());
        }
        if args.request_timeout_ms == 0 || args.request_timeout_ms > 600_000 {
            return Err("PAYNOW_REQUEST_TIMEOUT_MS must be 1 to 600000".into());
        }
        if !(1..=1_000).contains(&args.db_pool_size) {
            return Err("PAYNOW_DB_POOL_SIZE must be between 1 and 1000".into());
        }
        if args.redis_key_prefix.is_empty() {
            return Err("PAYNOW_REDIS_KEY_PREFIX must not be empty".into());
        }
        Ok(Config {
            api_keys: ApiKeys::parse(args.api_key.as_deref(), args.api_keys.as_deref())?,
            bind: args.bind,
            database_url: args.database_url.clone(),
            db_pool_size: args.db_pool_size,
            redis_url: args.redis_url.clone().filter(|u| !u.is_empty()),
            redis_key_prefix: args.redis_key_prefix.clone(),
            rate_limit: Quota::new(args.rate_limit_rps, args.rate_limit_burst)?,
            idempotency_ttl: Duration::from_secs(args.idempotency_ttl_secs),
            reservation_ttl: Duration::from_secs(args.reservation_ttl_secs),
            fixtures: args.fixtures.clone(),
            policy: args.policy.clone(),
            log_format: args.log_format,
            body_limit_bytes: args.body_limit_bytes,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            faults: parse_faults(&args.faults).map_err(|e| format!("PAYNOW_FAULTS: {e}"))?,
        })
    }

    /// The documented defaults with one API key and the given database: a start for tests
    /// and tools that build a configuration in code (the environment is not read).
    pub fn with_key(api_key: &str, database_url: &str) -> Result<Self, String> {
        Ok(Config {
            api_keys: ApiKeys::parse(Some(api_key), None)?,
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database_url: database_url.to_owned(),
            db_pool_size: 16,
            redis_url: None,
            redis_key_prefix: "paynow:rl:".into(),
            rate_limit: Quota::new(5, 5)?,
            idempotency_ttl: Duration::from_secs(86_400),
            reservation_ttl: Duration::from_secs(7 * 86_400),
            fixtures: None,
            policy: None,
            log_format: LogFormat::Json,
            body_limit_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(10),
            faults: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(flags: &[&str]) -> ServeArgs {
        use clap::Parser;
        let argv = ["paynow", "--api-key", "local-dev-key"].iter().chain(flags);
        crate::cli::Cli::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn the_multi_instance_settings_are_checked_at_start() {
        let ok = Config::from_args(&serve_args(&[
            "--db-pool-size",
            "4",
            "--redis-key-prefix",
            "x:",
        ]))
        .unwrap();
        assert_eq!((ok.db_pool_size, ok.redis_key_prefix.as_str()), (4, "x:"));
        let err = Config::from_args(&serve_args(&["--db-pool-size", "0"])).unwrap_err();
        assert!(err.contains("PAYNOW_DB_POOL_SIZE"), "{err}");
        let err = Config::from_args(&serve_args(&["--redis-key-prefix", ""])).unwrap_err();
        assert!(err.contains("PAYNOW_REDIS_KEY_PREFIX"), "{err}");
    }

    #[test]
    fn keys_are_parsed_with_optional_names() {
        let keys = ApiKeys::parse(
            Some("local-dev-key"),
            Some("ops:ops-secret-1, new:rotated-key-2"),
        )
        .unwrap();
        assert!(keys.identify(b"local-dev-key").unwrap().starts_with("key-"));
        assert_eq!(&*keys.identify(b"ops-secret-1").unwrap(), "ops");
        assert_eq!(&*keys.identify(b"rotated-key-2").unwrap(), "new");
        assert!(keys.identify(b"wrong").is_none());
        assert!(keys.identify(b"").is_none());
    }

    #[test]
    fn a_single_key_is_taken_whole_even_with_a_colon() {
        let keys = ApiKeys::parse(Some("my:secret-key-123"), None).unwrap();
        assert!(keys.identify(b"my:secret-key-123").is_some());
        assert!(keys.identify(b"secret-key-123").is_none());
    }

    #[test]
    fn a_rotated_key_keeps_its_callers_name() {
        let keys = ApiKeys::parse(None, Some("app:old-key-1111, app:new-key-2222")).unwrap();
        assert_eq!(&*keys.identify(b"old-key-1111").unwrap(), "app");
        assert_eq!(&*keys.identify(b"new-key-2222").unwrap(), "app");
        let err = ApiKeys::parse(None, Some("a:same-key-1111,b:same-key-1111")).unwrap_err();
        assert!(err.contains("two names"), "{err}");
        assert!(err.contains("\"a\"") && err.contains("\"b\""), "{err}");
        assert!(
            !err.contains("same-key-1111"),
            "the secret is not shown: {err}"
        );
        assert_eq!(
            ApiKeys::parse(None, Some("a:same-key-1111,a:same-key-1111"))
                .unwrap()
                .0
                .len(),
            1
        );
    }

    #[test]
    fn no_key_refuses_to_start_naming_the_variable() {
        let err = ApiKeys::parse(None, None).unwrap_err();
        assert!(err.contains("API_KEY"), "{err}");
        assert!(ApiKeys::parse(Some("  "), Some(",,")).is_err());
        assert!(ApiKeys::parse(Some("short"), None).is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let keys = ApiKeys::parse(Some("local-dev-key"), None).unwrap();
        let shown = format!("{keys:?}");
        assert!(!shown.contains("local-dev-key"), "{shown}");
    }
}
