//! The `paynow` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "paynow",
    version,
    about = "Payment decisions: allow, review or block"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` flags, when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Run decision cases against a running server.
    Eval {
        /// The cases file, e.g. eval_cases.json.
        cases: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        base: String,
        #[arg(long, env = "API_KEY", hide_env_values = true)]
        api_key: String,
    },
    /// Benchmark decisions against a freshly started server (see the README's Performance).
    Bench(crate::bench::BenchArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "sqlite://paynow.db",
            hide_env_values = true
        )]
        database_url: String,
    },
}

/// Runs the command line; returns the process exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paynow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Eval {
                cases,
                base,
                api_key,
            }) => {
                return crate::eval::run(&cases, &base, &api_key).await;
            }
            Some(Command::Bench(args)) => crate::bench::run(args).await,
            Some(Command::Migrate { database_url }) => {
                let store = crate::store::open(&database_url).await?;
                store.close().await;
                println!("paynow: {} schema is up to date", store.engine());
                Ok(())
            }
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paynow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(&args).map_err(anyhow::Error::msg)?;
    // Held until `serve` returns, so the last lines (shutdown) are written out.
    let _logs = crate::telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (PAYNOW_BIND): {e}", config.bind))?;
    crate::serve(config, listener, crate::shutdown_signal()).await
}
