//! `paynow bench`: the benchmark quoted in the README's Performance section.
//!
//! One command, nothing to set up: it starts PayNow as a child process (this same binary,
//! `serve`) on a free loopback port with a fresh store in a temporary folder, seeded with
//! synthetic customers (large balances, clean risk, a known payee) and a rate limit that
//! never binds. Then it drives `POST /payments/decide` with K keep-alive connections for D
//! seconds, each request with a fresh idempotency key, then `GET /healthz` of the same server
//! the same way (the ceiling of the HTTP stack), prints a table, then where the server's
//! time went during the decisions (its threads by name: CPU per decision, time on a core and
//! time waiting for one) and what it wrote to disk, and, last, one line for scripts:
//!
//! `BENCH store=sqlite decide_rps=… healthz_rps=… ratio=… p50_ms=… p99_ms=… errors=… rss_mb=…`
//!
//! # What the spawned server gets, and why
//! * its own API key, bind address, `DATABASE_URL`, `PAYNOW_FIXTURES` and `PAYNOW_POLICY`;
//! * `PAYNOW_RATE_LIMIT_RPS`/`_BURST` of one million: the limiter runs (its cost is part of
//!   every decision) but never refuses;
//! * a policy equal to the shipped one except for the velocity rule and the daily limit,
//!   which would otherwise send the same customers to review or block after a few payments;
//! * nothing else: every other `PAYNOW_*`, `API_KEYS`, `REDIS_URL` and `RUST_LOG` is removed
//!   from its environment, so it runs the defaults (JSON logs at `info`, `synchronous=FULL`).
//!   Its logs go to a file in the temporary folder, as they would go to a file or a pipe in
//!   production.
//!
//! # The load generator
//! One tokio task per connection, each a hyper HTTP/1.1 client connection with one request
//! in flight (closed loop). Latency is measured from sending to the last byte of the body.
//! Requests started during the warm-up are not counted. Every loop is bounded by the
//! duration and the whole benchmark targets loopback addresses only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The payee every synthetic customer has paid before.
const KNOWN_PAYEE: &str = "p_bench";
/// Each synthetic account holds this much, so no benchmark can exhaust it.
const BENCH_BALANCE: &str = "100000000.00";
/// How long the server may take to become ready before the benchmark gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd server may take to finish in-flight requests and close its store.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mix {
    /// Every payment is allowed (a reservation per decision).
    Allow,
    /// 75% allow, 10% review (new payee, high amount), 10% block (blocked payee), 5% replays.
    Realistic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchStore {
    Sqlite,
    Postgres,
}

impl BenchStore {
    fn name(self) -> &'static str {
        match self {
            BenchStore::Sqlite => "sqlite",
            BenchStore::Postgres => "postgres",
        }
    }
}

/// `paynow bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Measured seconds per endpoint.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of load before measuring, per endpoint (connections open, caches warm).
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Synthetic customers seeded into the fresh store.
    #[arg(long, default_value_t = 10_000)]
    pub customers: usize,
    /// Which decisions the load asks for.
    #[arg(long, value_enum, default_value = "allow")]
    pub mix: Mix,
    /// Storage engine of the spawned server.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub store: BenchStore,
    /// With `--store postgres`: a PostgreSQL server URL; a fresh database is created there.
    #[arg(long, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Give the spawned server this `REDIS_URL` (global rate limit through Redis).
    #[arg(long, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Target a server that is already running (loopback only) instead of spawning one. It
    /// must know the bench customers: see `--write-setup`.
    #[arg(long)]
    pub base: Option<String>,
    /// API key of the server given by `--base`.
    #[arg(long, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Write the bench customers and policy to this folder, print how to start a server with
    /// them, and exit.
    #[arg(long)]
    pub write_setup: Option<PathBuf>,
    /// Keep the temporary folder (store and server log) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.connections > 4096 {
        bail!("--connections must be 1..=4096");
    }
    if args.duration_secs == 0 || args.duration_secs > 3600 {
        bail!("--duration-secs must be 1..=3600");
    }
    if args.warmup_secs > 600 {
        bail!("--warmup-secs must be at most 600");
    }
    if args.customers == 0 || args.customers > 1_000_000 {
        bail!("--customers must be 1..=1000000");
    }
    if let Some(dir) = &args.write_setup {
        return write_setup(dir, args.customers);
    }

    let mut server = None;
    let (addr, api_key) = match &args.base {
        Some(base) => {
            let key = args
                .api_key
                .clone()
                .context("--base needs --api-key (the running server's key)")?;
            (loopback_addr(base).await?, key)
        }
        None => {
            let s = Server::start(&args).await?;
            let target = (s.addr, s.api_key.clone());
            server = Some(s);
            target
        }
    };
    let result = measure(&args, addr, &api_key, server.as_mut()).await;
    if let Some(s) = server {
        let stopped = s.finish(result.is_ok() && args.keep).await;
        let mut report = result?;
        report.server = Some(stopped?);
        print_report(&args, &report);
        Ok(())
    } else {
        let report = result?;
        print_report(&args, &report);
        Ok(())
    }
}

struct Report {
    decide: PhaseStats,
    healthz: PhaseStats,
    server: Option<Stopped>,
    first_ready: Option<(Duration, &'static str)>,
}

async fn measure(
    args: &BenchArgs,
    addr: SocketAddr,
    api_key: &str,
    server: Option<&mut Server>,
) -> anyhow::Result<Report> {
    let pid = server.as_ref().map(|s| s.pid);
    let first_ready = server.as_ref().map(|s| (s.ready_in, s.ready_kind));
    if let Some(s) = &server {
        println!(
            "server pid {} on {} ready in {:.0} ms ({})",
            s.pid,
            s.addr,
            ms(s.ready_in),
            s.ready_kind
        );
    }
    let decide = Arc::new(Workload::Decide {
        host: host_header(addr)?,
        api_key: HeaderValue::from_str(api_key)
            .context("the API key is not a valid header value")?,
        customers: args.customers,
        mix: args.mix,
    });
    println!(
        "driving POST /payments/decide: {} connections, {} s warm-up + {} s, mix {:?}",
        args.connections, args.warmup_secs, args.duration_secs, args.mix
    );
    let decide = run_phase(args, addr, decide, pid).await?;
    let healthz = Arc::new(Workload::Healthz {
        host: host_header(addr)?,
    });
    println!("driving GET /healthz the same way");
    let healthz = run_phase(args, addr, healthz, pid).await?;
    Ok(Report {
        decide,
        healthz,
        server: None,
        first_ready,
    })
}

// ---------------------------------------------------------------------------------------
// The spawned server

struct Server {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    api_key: String,
    env: Vec<(String, String)>,
    log: PathBuf,
    dir: tempfile::TempDir,
    ready_in: Duration,
    ready_kind: &'static str,
}

/// What the server's end told: how it exited and how fast it restarted.
struct Stopped {
    exit: String,
    peak_rss_kib: Option<u64>,
    restart_ready: Option<Duration>,
    kept: Option<PathBuf>,
}

/// A port the kernel just handed out on loopback. Another process could take it before the
/// server binds it; the server then fails to start with a clear message and the run stops.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("cannot bind loopback")?;
    Ok(listener.local_addr()?.port())
}

/// Environment variables the spawned server must not inherit from the caller's shell.
fn inherited_setting(name: &str) -> bool {
    name.starts_with("PAYNOW_")
        || matches!(
            name,
            "API_KEY" | "API_KEYS" | "DATABASE_URL" | "REDIS_URL" | "RUST_LOG"
        )
}

impl Server {
    async fn start(args: &BenchArgs) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("paynow-bench-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let (fixtures, policy) = write_files(dir.path(), args.customers)?;
        let database_url = match args.store {
            BenchStore::Sqlite => format!("sqlite://{}", dir.path().join("bench.db").display()),
            BenchStore::Postgres => {
                let base = args
                    .database_url
                    .as_deref()
                    .context("--store postgres needs --database-url postgres://…")?;
                crate::store::postgres_test_database(base)
                    .await
                    .context("cannot create a fresh PostgreSQL database for the benchmark")?
            }
        };
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let api_key = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let mut env = vec![
            ("API_KEY".to_owned(), api_key.clone()),
            ("PAYNOW_BIND".to_owned(), addr.to_string()),
            ("DATABASE_URL".to_owned(), database_url),
            ("PAYNOW_FIXTURES".to_owned(), fixtures.display().to_string()),
            ("PAYNOW_POLICY".to_owned(), policy.display().to_string()),
            ("PAYNOW_RATE_LIMIT_RPS".to_owned(), "1000000".to_owned()),
            ("PAYNOW_RATE_LIMIT_BURST".to_owned(), "1000000".to_owned()),
            ("PAYNOW_LOG_FORMAT".to_owned(), "json".to_owned()),
        ];
        if let Some(redis) = &args.redis_url {
            env.push(("REDIS_URL".to_owned(), redis.clone()));
        }
        let log = dir.path().join("server.log");
        let (child, ready_in) = spawn_ready(&env, &log, addr).await?;
        let pid = child.id().context("the server exited at once")?;
        Ok(Server {
            child,
            pid,
            addr,
            api_key,
            env,
            log,
            dir,
            ready_in,
            ready_kind: "fresh store, customers seeded",
        })
    }

    /// Stops the server (SIGTERM, as an operator would), then starts it again on the store it
    /// left, to time a start on an existing store, and stops it again.
    async fn finish(mut self, keep: bool) -> anyhow::Result<Stopped> {
        let peak_rss_kib = proc_status_kib(self.pid, "VmHWM:");
        let exit = terminate(&mut self.child, self.pid).await?;
        let restart_ready = match spawn_ready(&self.env, &self.log, self.addr).await {
            Ok((mut child, ready)) => {
                if let Some(pid) = child.id() {
                    terminate(&mut child, pid).await?;
                }
                Some(ready)
            }
            Err(e) => {
                eprintln!("bench: the restart on the existing store failed: {e:#}");
                None
            }
        };
        let kept = keep.then(|| self.dir.keep());
        Ok(Stopped {
            exit,
            peak_rss_kib,
            restart_ready,
            kept,
        })
    }
}

/// Starts `paynow serve` with `env` and waits until `/readyz` answers 200.
async fn spawn_ready(
    env: &[(String, String)],
    log: &Path,
    addr: SocketAddr,
) -> anyhow::Result<(tokio::process::Child, Duration)> {
    let exe = std::env::current_exe().context("cannot find the paynow binary")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // If the benchmark fails half-way, the server must not outlive it.
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str().filter(|n| inherited_setting(n)) {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start the server")?;
    let host = host_header(addr)?;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited during start-up ({status}); its log ends with:\n{}",
                log_tail(log)
            );
        }
        if ready(addr, &host).await {
            return Ok((child, started.elapsed()));
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "the server was not ready after {} s; its log ends with:\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn ready(addr: SocketAddr, host: &HeaderValue) -> bool {
    let Ok(mut sender) = connect(addr).await else {
        return false;
    };
    let Ok(req) = Request::get("/readyz")
        .header(HOST, host.clone())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    matches!(sender.send_request(req).await, Ok(res) if res.status().is_success())
}

/// SIGTERM, then wait for a graceful exit; SIGKILL if it takes too long.
async fn terminate(child: &mut tokio::process::Child, pid: u32) -> anyhow::Result<String> {
    // std has no signal API; `kill(1)` is on every Linux and keeps this crate free of libc.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if !matches!(sent, Ok(s) if s.success()) {
        child.kill().await?;
        return Ok("killed (SIGTERM could not be sent)".into());
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(status) => Ok(status?.to_string()),
        Err(_) => {
            child.kill().await?;
            Ok(format!(
                "killed after {} s without exiting",
                STOP_TIMEOUT.as_secs()
            ))
        }
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`); Linux only.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A counter of `/proc/PID/io` (`write_bytes:`: bytes the process sent to the disk); Linux
/// only.
fn proc_io(pid: u32, field: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io_counter(&io, field)
}

fn io_counter(io: &str, field: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .parse()
        .ok()
}

/// One thread as sampled: its name, and the time it ran and waited so far (the kernel's
/// `schedstat`).
#[derive(Clone, Debug, PartialEq)]
struct ThreadSample {
    name: String,
    on_core: Duration,
    waiting: Duration,
}

/// What the threads of one name used between two samples: time on a core, and time
/// runnable but waiting for one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ThreadUse {
    threads: usize,
    on_core: Duration,
    waiting: Duration,
}

/// A process's threads by id; Linux only. A thread that ends while it is read is left out.
fn proc_threads(pid: u32) -> Option<BTreeMap<u32, ThreadSample>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut threads = BTreeMap::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path();
        let read = |file| std::fs::read_to_string(path.join(file)).ok();
        let (Some(name), Some(sched)) = (read("comm"), read("schedstat")) else {
            continue;
        };
        let Some((on_core, waiting)) = schedstat(&sched) else {
            continue;
        };
        let name = name.trim_end().to_owned();
        threads.insert(
            tid,
            ThreadSample {
                name,
                on_core,
                waiting,
            },
        );
    }
    (!threads.is_empty()).then_some(threads)
}

/// The first two numbers of a `schedstat` line: nanoseconds on a core, nanoseconds waiting.
fn schedstat(line: &str) -> Option<(Duration, Duration)> {
    let mut numbers = line.split_whitespace().map(|n| n.parse::<u64>().ok());
    let on_core = numbers.next()??;
    let waiting = numbers.next()??;
    Some((Duration::from_nanos(on_core), Duration::from_nanos(waiting)))
}

/// What the threads alive at the second sample used since the first (all of their time if
/// they started in between), grouped by name (tokio's workers share one), the busiest
/// first; names that used nothing are left out.
fn thread_use_between(
    before: &BTreeMap<u32, ThreadSample>,
    after: &BTreeMap<u32, ThreadSample>,
) -> Vec<(String, ThreadUse)> {
    let mut by_name = BTreeMap::<&str, ThreadUse>::new();
    for (tid, now) in after {
        let (on_core, waiting) = before
            .get(tid)
            .map_or((Duration::ZERO, Duration::ZERO), |then| {
                (then.on_core, then.waiting)
            });
        let used = by_name.entry(&now.name).or_default();
        used.threads += 1;
        used.on_core += now.on_core.saturating_sub(on_core);
        used.waiting += now.waiting.saturating_sub(waiting);
    }
    let mut used: Vec<(String, ThreadUse)> = by_name
        .into_iter()
        .filter(|(_, u)| !u.on_core.is_zero())
        .map(|(name, u)| (name.to_owned(), u))
        .collect();
    used.sort_by(|a, b| b.1.on_core.cmp(&a.1.on_core).then_with(|| a.0.cmp(&b.0)));
    used
}

// ---------------------------------------------------------------------------------------
// Set-up files

fn customer_id(i: usize) -> String {
    format!("bench_{i:07}")
}

/// The synthetic customers: large balances, clean risk, one known payee.
fn customers_json(count: usize) -> String {
    let mut out = String::with_capacity(count * 170 + 32);
    out.push_str("{\"customers\":[\n");
    for i in 0..count {
        let sep = if i + 1 < count { "," } else { "" };
        let _ = writeln!(
            out,
            "{{\"customerId\":\"{}\",\"currency\":\"USD\",\"balance\":\"{BENCH_BALANCE}\",\"recentDisputes\":0,\"deviceChange\":false,\"homeCountry\":\"US\",\"knownPayees\":[\"{KNOWN_PAYEE}\"]}}{sep}",
            customer_id(i)
        );
    }
    out.push_str("]}\n");
    out
}

/// The shipped policy with the velocity rule and the daily limit out of reach: a benchmark
/// sends hundreds of payments per customer within minutes, which those rules exist to stop.
/// The velocity window is one second, so that a customer's count still walks the payments in
/// it (about one at 10,000 customers), as for a real customer with a few recent payments,
/// instead of every payment the benchmark made for them.
fn bench_policy() -> anyhow::Result<String> {
    let mut policy: toml::Table = toml::from_str(crate::policy::DEFAULT_POLICY)
        .context("the shipped policy does not parse")?;
    policy.insert(
        "daily_limit".into(),
        toml::Value::String("1000000000.00".into()),
    );
    let velocity = policy
        .get_mut("velocity")
        .and_then(toml::Value::as_table_mut)
        .context("the shipped policy has no [velocity] table")?;
    velocity.insert("max_payments".into(), toml::Value::Integer(1_000_000_000));
    velocity.insert("window_secs".into(), toml::Value::Integer(1));
    let text = toml::to_string(&policy)?;
    Ok(format!(
        "# Written by `paynow bench`: the default policy with velocity and the daily limit out of reach.\n{text}"
    ))
}

fn write_files(dir: &Path, customers: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let fixtures = dir.join("bench-customers.json");
    let policy = dir.join("bench-policy.toml");
    std::fs::write(&fixtures, customers_json(customers))
        .with_context(|| format!("cannot write {}", fixtures.display()))?;
    std::fs::write(&policy, bench_policy()?)
        .with_context(|| format!("cannot write {}", policy.display()))?;
    Ok((fixtures, policy))
}

fn write_setup(dir: &Path, customers: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (fixtures, policy) = write_files(dir, customers)?;
    println!("Start a server on an empty store with the bench customers, e.g.:");
    println!(
        "  API_KEY=bench-key-123 PAYNOW_FIXTURES={} PAYNOW_POLICY={} \\\n  PAYNOW_RATE_LIMIT_RPS=1000000 PAYNOW_RATE_LIMIT_BURST=1000000 \\\n  DATABASE_URL=sqlite://bench.db paynow serve",
        fixtures.display(),
        policy.display()
    );
    println!(
        "then: paynow bench --base http://127.0.0.1:8000 --api-key bench-key-123 --customers {customers}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The load

/// `http://127.0.0.1:8000` → its socket address, refusing anything not on loopback.
async fn loopback_addr(base: &str) -> anyhow::Result<SocketAddr> {
    let rest = base
        .strip_prefix("http://")
        .context("--base must be an http:// URL (the benchmark speaks plain HTTP/1.1)")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&authority)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .collect();
    let addr = addrs
        .first()
        .copied()
        .context("--base resolves to no address")?;
    if !addrs.iter().all(|a| is_loopback(a.ip())) {
        bail!(
            "--base must be a loopback address (127.0.0.0/8 or ::1): the benchmark never loads another host"
        );
    }
    Ok(addr)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn host_header(addr: SocketAddr) -> anyhow::Result<HeaderValue> {
    Ok(HeaderValue::from_str(&addr.to_string())?)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    if !is_loopback(addr.ip()) {
        bail!("refusing to connect to {addr}: not a loopback address");
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

enum Workload {
    Decide {
        host: HeaderValue,
        api_key: HeaderValue,
        customers: usize,
        mix: Mix,
    },
    Healthz {
        host: HeaderValue,
    },
}

/// What one worker remembers between requests.
struct WorkerState {
    id: usize,
    seq: u64,
    rng: u64,
    /// The last decide body sent, replayed by the realistic mix.
    last_body: Option<Bytes>,
}

impl WorkerState {
    /// xorshift64: reproducible per worker, and far cheaper than the requests it shapes.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

impl Workload {
    fn request(&self, w: &mut WorkerState) -> anyhow::Result<Request<Full<Bytes>>> {
        w.seq += 1;
        match self {
            Workload::Healthz { host } => Ok(Request::get("/healthz")
                .header(HOST, host.clone())
                .body(Full::new(Bytes::new()))?),
            Workload::Decide {
                host,
                api_key,
                customers,
                mix,
            } => {
                let roll = match mix {
                    Mix::Allow => 99,
                    Mix::Realistic => w.next_random() % 100,
                };
                let body = match (roll, &w.last_body) {
                    (0..5, Some(last)) => last.clone(),
                    _ => {
                        // Workers start spread over the customers and walk them in turn.
                        let customer = (w.id * 7919 + w.seq as usize) % customers;
                        let (amount, payee) = match roll {
                            0..15 => ("25.00", "p_blocked".to_owned()),
                            15..25 => ("1500.00", format!("p_new_{}_{}", w.id, w.seq)),
                            _ => ("12.34", KNOWN_PAYEE.to_owned()),
                        };
                        let body = Bytes::from(format!(
                            "{{\"customerId\":\"{}\",\"amount\":{amount},\"currency\":\"USD\",\"payeeId\":\"{payee}\",\"idempotencyKey\":\"{}\"}}",
                            customer_id(customer),
                            // Random like a real client's keys, so the store's key index
                            // sees random inserts, not a flattering sequence.
                            uuid::Uuid::new_v4()
                        ));
                        w.last_body = Some(body.clone());
                        body
                    }
                };
                Ok(Request::builder()
                    .method(Method::POST)
                    .uri("/payments/decide")
                    .header(HOST, host.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .header("x-api-key", api_key.clone())
                    .body(Full::new(body))?)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Workload::Decide { .. } => "POST /payments/decide",
            Workload::Healthz { .. } => "GET /healthz",
        }
    }
}

/// What a phase measured.
#[derive(Default)]
struct PhaseStats {
    name: &'static str,
    elapsed: Duration,
    /// Latency of each measured request, in microseconds.
    latencies_us: Vec<u32>,
    by_status: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (connection refused, reset, closed).
    transport_errors: u64,
    /// Decide answers by decision (`allow`, …, `replayed`, `other`).
    outcomes: BTreeMap<&'static str, u64>,
    /// The server's largest resident set seen during the phase.
    peak_rss_kib: Option<u64>,
    /// CPU time the server and this load generator used while measuring.
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
    /// The server's threads by name, while measuring (see [`thread_use_between`]).
    server_threads: Vec<(String, ThreadUse)>,
    /// Bytes the server sent to the disk while measuring.
    server_disk_writes: Option<u64>,
}

impl PhaseStats {
    fn merge(&mut self, other: PhaseStats) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        for (outcome, n) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
    }

    fn requests(&self) -> u64 {
        self.latencies_us.len() as u64 + self.transport_errors
    }

    fn errors(&self) -> u64 {
        let http: u64 = self
            .by_status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        http + self.transport_errors
    }

    /// Successful (2xx) answers per second.
    fn rps(&self) -> f64 {
        let ok: u64 = self
            .by_status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile in milliseconds (`latencies_us` must be sorted).
    fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }
}

/// Nearest-rank quantile of sorted microsecond samples, in milliseconds.
fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1000.0
}

fn outcome_of(body: &[u8], replayed: bool) -> &'static str {
    if replayed {
        return "replayed";
    }
    // The response starts with the decision (see `DecideResponse`): no need to parse it all.
    for decision in ["allow", "review", "block"] {
        let prefix = format!("{{\"decision\":\"{decision}\"");
        if body.starts_with(prefix.as_bytes()) {
            return decision;
        }
    }
    "other"
}

async fn worker(
    addr: SocketAddr,
    load: Arc<Workload>,
    id: usize,
    measure_from: Instant,
    stop_at: Instant,
) -> PhaseStats {
    let mut stats = PhaseStats::default();
    let mut state = WorkerState {
        id,
        seq: 0,
        rng: 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        last_body: None,
    };
    let is_decide = matches!(*load, Workload::Decide { .. });
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while Instant::now() < stop_at {
        let conn = match &mut sender {
            Some(conn) => conn,
            None => match connect(addr).await {
                Ok(conn) => sender.insert(conn),
                Err(_) => {
                    if Instant::now() >= measure_from {
                        stats.transport_errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(req) = load.request(&mut state) else {
            stats.transport_errors += 1;
            break;
        };
        let started = Instant::now();
        let answer = async {
            conn.ready().await?;
            let res = conn.send_request(req).await?;
            let status = res.status().as_u16();
            let replayed = res.headers().contains_key("idempotent-replayed");
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, replayed, body))
        }
        .await;
        let took = started.elapsed();
        let measured = started >= measure_from;
        match answer {
            Ok((status, replayed, body)) => {
                if measured {
                    stats
                        .latencies_us
                        .push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                    *stats.by_status.entry(status).or_default() += 1;
                    if is_decide && status == 200 {
                        *stats
                            .outcomes
                            .entry(outcome_of(&body, replayed))
                            .or_default() += 1;
                    }
                }
            }
            Err(_) => {
                if measured {
                    stats.transport_errors += 1;
                }
                sender = None;
            }
        }
    }
    stats
}

/// CPU time (user + system) a process used so far, from `/proc/PID/stat`; Linux only.
fn proc_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture that matters here.
    Some(Duration::from_millis(ticks * 10))
}

/// What the sampler saw of the server while measuring.
struct ServerUse {
    peak_rss_kib: Option<u64>,
    cpu: Option<Duration>,
    threads: Vec<(String, ThreadUse)>,
    disk_writes: Option<u64>,
}

/// Drives one workload with every connection, sampling the server's RSS and CPU meanwhile.
async fn run_phase(
    args: &BenchArgs,
    addr: SocketAddr,
    load: Arc<Workload>,
    pid: Option<u32>,
) -> anyhow::Result<PhaseStats> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let stop_at = measure_from + Duration::from_secs(args.duration_secs);
    let workers: Vec<_> = (0..args.connections)
        .map(|id| tokio::spawn(worker(addr, load.clone(), id, measure_from, stop_at)))
        .collect();
    let sampler = tokio::spawn(async move {
        let server = pid.map(|p| p.to_string());
        let cpu = || {
            let server = server.as_deref().and_then(proc_cpu);
            (server, proc_cpu("self"))
        };
        let threads = || pid.and_then(proc_threads).unwrap_or_default();
        let disk_writes = || pid.and_then(|p| proc_io(p, "write_bytes:"));
        tokio::time::sleep_until(measure_from.into()).await;
        let before = cpu();
        let (threads_before, disk_before) = (threads(), disk_writes());
        let mut peak = None;
        while Instant::now() < stop_at {
            if let Some(pid) = pid {
                let rss = proc_status_kib(pid, "VmRSS:");
                peak = peak.max(rss);
            }
            let left = stop_at.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        let after = cpu();
        let (threads_after, disk_after) = (threads(), disk_writes());
        let used = |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?));
        let server = ServerUse {
            peak_rss_kib: peak,
            cpu: used(after.0, before.0),
            threads: thread_use_between(&threads_before, &threads_after),
            disk_writes: disk_after
                .zip(disk_before)
                .map(|(a, b)| a.saturating_sub(b)),
        };
        (server, used(after.1, before.1))
    });
    let mut stats = PhaseStats {
        name: load.name(),
        ..PhaseStats::default()
    };
    // A request in flight at `stop_at` may finish a little later; none may hang the bench.
    let deadline = stop_at + Duration::from_secs(30);
    for w in workers {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, w).await {
            Ok(Ok(s)) => stats.merge(s),
            Ok(Err(e)) => bail!("a load worker failed: {e}"),
            Err(_) => bail!("a request was still unanswered 30 s after the end of the run"),
        }
    }
    stats.elapsed = stop_at.saturating_duration_since(measure_from);
    stats.latencies_us.sort_unstable();
    let (server, client_cpu) = sampler.await?;
    stats.peak_rss_kib = server.peak_rss_kib;
    stats.server_cpu = server.cpu;
    stats.server_threads = server.threads;
    stats.server_disk_writes = server.disk_writes;
    stats.client_cpu = client_cpu;
    Ok(stats)
}

// ---------------------------------------------------------------------------------------
// The report

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn errors_text(s: &PhaseStats) -> String {
    let mut parts: Vec<String> = s
        .by_status
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status))
        .map(|(status, n)| format!("{status}×{n}"))
        .collect();
    if s.transport_errors > 0 {
        parts.push(format!("transport×{}", s.transport_errors));
    }
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(" ")
    }
}

/// Where the server's time went during a phase, thread by thread, and what it wrote to disk,
/// per answered request; nothing when the server is not ours to read.
fn print_threads(s: &PhaseStats) {
    if s.server_threads.is_empty() {
        return;
    }
    let answered = s.requests().max(1) as f64;
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    println!();
    println!(
        "server threads during {} (by name; time on a core, and runnable but waiting for one):",
        s.name
    );
    println!();
    println!(
        "| thread | threads | CPU µs/req | on a core (threads, mean) | waiting for a core (threads, mean) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, used) in &s.server_threads {
        println!(
            "| {name} | {} | {:.1} | {:.2} | {:.2} |",
            used.threads,
            used.on_core.as_secs_f64() * 1e6 / answered,
            used.on_core.as_secs_f64() / secs,
            used.waiting.as_secs_f64() / secs,
        );
    }
    if let Some(bytes) = s.server_disk_writes {
        println!();
        println!(
            "server disk writes during {}: {:.1} KiB per request",
            s.name,
            bytes as f64 / 1024.0 / answered
        );
    }
}

fn print_report(args: &BenchArgs, r: &Report) {
    let store = match &args.base {
        Some(_) => "external",
        None => args.store.name(),
    };
    println!();
    println!(
        "PayNow bench — store {store}, mix {:?}, {} connections, {} s per endpoint after {} s warm-up, {} customers",
        args.mix, args.connections, args.duration_secs, args.warmup_secs, args.customers
    );
    println!();
    println!(
        "| endpoint | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | peak RSS MiB | server CPU µs/req | cores: server + bench |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |");
    for s in [&r.decide, &r.healthz] {
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        let cores = |cpu: Option<Duration>| {
            cpu.map_or("n/a".into(), |c| format!("{:.2}", c.as_secs_f64() / secs))
        };
        let per_request = s.server_cpu.map_or("n/a".into(), |c| {
            format!(
                "{:.0}",
                c.as_secs_f64() * 1e6 / (s.requests().max(1) as f64)
            )
        });
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} + {} |",
            s.name,
            s.requests(),
            s.rps(),
            s.quantile_ms(0.50),
            s.quantile_ms(0.90),
            s.quantile_ms(0.99),
            s.quantile_ms(1.0),
            errors_text(s),
            s.peak_rss_kib
                .map_or("n/a".into(), |k| format!("{:.1}", mib(k))),
            per_request,
            cores(s.server_cpu),
            cores(s.client_cpu),
        );
    }
    print_threads(&r.decide);
    let ratio = r.decide.rps() / r.healthz.rps().max(1e-9);
    println!();
    println!("decisions/s ÷ healthz/s: {ratio:.3}");
    let outcomes: Vec<String> = r
        .decide
        .outcomes
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("decide answers (200): {}", outcomes.join(", "));
    if let Some((ready, kind)) = r.first_ready {
        println!("ready after start: {:.0} ms ({kind})", ms(ready));
    }
    let mut rss_mb = "n/a".to_owned();
    if let Some(s) = &r.server {
        if let Some(ready) = s.restart_ready {
            println!(
                "ready after restart on the existing store: {:.0} ms",
                ms(ready)
            );
        }
        if let Some(hwm) = s.peak_rss_kib {
            println!("server peak RSS (VmHWM, whole run): {:.1} MiB", mib(hwm));
            rss_mb = format!("{:.1}", mib(hwm));
        }
        println!("server exit after SIGTERM: {}", s.exit);
        if let Some(dir) = &s.kept {
            println!("kept the store and server log in {}", dir.display());
        }
    }
    println!(
        "BENCH store={store} decide_rps={:.0} healthz_rps={:.0} ratio={ratio:.3} p50_ms={:.2} p99_ms={:.2} errors={} rss_mb={rss_mb}",
        r.decide.rps(),
        r.healthz.rps(),
        r.decide.quantile_ms(0.50),
        r.decide.quantile_ms(0.99),
        r.decide.errors() + r.healthz.errors(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_files_are_valid_fixtures_and_policy() {
        let customers = crate::fixtures::parse(&customers_json(3)).unwrap();
        assert_eq!(customers.len(), 3);
        assert_eq!(customers[2].customer.as_str(), "bench_0000002");
        assert_eq!(customers[0].known_payees[0].as_str(), KNOWN_PAYEE);
        let policy = crate::policy::Policy::parse(&bench_policy().unwrap()).unwrap();
        assert_eq!(policy.velocity.max_payments, 1_000_000_000);
        assert_eq!(policy.velocity.window_secs, 1);
        assert!(policy.blocked_payees.contains("p_blocked"));
    }

    #[test]
    fn schedstat_and_io_lines_are_read_exactly() {
        assert_eq!(
            schedstat("1234567 890 12\n"),
            Some((Duration::from_nanos(1_234_567), Duration::from_nanos(890)))
        );
        assert_eq!(schedstat("1234567\n"), None);
        assert_eq!(schedstat("x 1 2"), None);
        let io = "rchar: 10\nwchar: 20\nwrite_bytes: 40960\ncancelled_write_bytes: 0\n";
        assert_eq!(io_counter(io, "write_bytes:"), Some(40960));
        assert_eq!(io_counter(io, "read_bytes:"), None);
    }

    #[test]
    fn thread_use_is_what_each_name_used_between_samples_busiest_first() {
        let at = |name: &str, on_core_ms, waiting_ms| ThreadSample {
            name: name.to_owned(),
            on_core: Duration::from_millis(on_core_ms),
            waiting: Duration::from_millis(waiting_ms),
        };
        let before = BTreeMap::from([
            (10, at("writer", 100, 10)),
            (11, at("worker", 50, 5)),
            (12, at("worker", 20, 1)),
            (13, at("idle", 7, 1)),
            // A worker that ended before the second sample: what it did is not counted,
            // nor does its absence take anything from the other workers.
            (14, at("worker", 900, 90)),
        ]);
        let after = BTreeMap::from([
            (10, at("writer", 130, 12)),
            (11, at("worker", 90, 25)),
            (12, at("worker", 40, 11)),
            (13, at("idle", 7, 1)),
            // Started between the samples: all of its time counts.
            (15, at("worker", 4, 2)),
        ]);
        let used = |threads, on_core_ms, waiting_ms| ThreadUse {
            threads,
            on_core: Duration::from_millis(on_core_ms),
            waiting: Duration::from_millis(waiting_ms),
        };
        assert_eq!(
            thread_use_between(&before, &after),
            vec![
                ("worker".to_owned(), used(3, 64, 32)),
                ("writer".to_owned(), used(1, 30, 2)),
            ]
        );
    }

    /// Reads this test's own process: a thread that spins shows up under its name, with the
    /// time it spent on a core.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_busy_thread_is_found_by_name_with_its_cpu_time() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("bench-spinner".into())
                .spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                })
                .unwrap()
        };
        let pid = std::process::id();
        let before = proc_threads(pid).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let after = proc_threads(pid).unwrap();
        stop.store(true, Ordering::Relaxed);
        spinning.join().unwrap();
        let used = thread_use_between(&before, &after);
        let (_, spinner) = used
            .iter()
            .find(|(name, _)| name == "bench-spinner")
            .expect("the spinning thread is listed by its name");
        assert_eq!(spinner.threads, 1);
        // 200 ms of spinning: at least a few milliseconds on a core, however busy the machine.
        assert!(spinner.on_core >= Duration::from_millis(5), "{spinner:?}");
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(quantile_ms(&samples, 0.50), 50.0);
        assert_eq!(quantile_ms(&samples, 0.99), 99.0);
        assert_eq!(quantile_ms(&samples, 1.0), 100.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
    }

    #[tokio::test]
    async fn only_loopback_targets_are_accepted() {
        assert!(loopback_addr("http://127.0.0.1:8000").await.is_ok());
        assert!(loopback_addr("http://localhost:8000/").await.is_ok());
        assert!(loopback_addr("http://10.0.0.1:8000").await.is_err());
        assert!(loopback_addr("https://127.0.0.1:8000").await.is_err());
    }

    #[test]
    fn decisions_are_read_from_the_start_of_the_body() {
        assert_eq!(
            outcome_of(br#"{"decision":"allow","reasons":[]}"#, false),
            "allow"
        );
        assert_eq!(outcome_of(br#"{"decision":"block"}"#, false), "block");
        assert_eq!(outcome_of(br#"{"decision":"allow"}"#, true), "replayed");
        assert_eq!(outcome_of(b"{}", false), "other");
    }
}
