//! The `runestone` command: run the gateway, check a config, hash a key.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use runestone::auth::{digest_key, format_digest};
use runestone::config::Config;
use runestone::server::{self, RunOptions};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// Runestone: an OpenAI-compatible LLM gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML config file to run with.
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Run in the background (Pingora's daemon mode).
    #[arg(short, long)]
    daemon: bool,
    /// Take the listening sockets over from a running instance (graceful upgrade).
    #[arg(short, long)]
    upgrade: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 when valid, or list every problem and exit 2.
    Check,
    /// Read an API key on stdin and print its `sha256:<hex>` digest for the config.
    HashKey,
    /// Validate the config, then have the running gateway (found through
    /// `server.pid_file`) hand over to a new process on it, without dropping
    /// a request. Exit 2 when the config is invalid (nothing changes).
    Reload,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::HashKey) => hash_key(),
        Some(Command::Reload) => {
            let Some(path) = cli.config else {
                eprintln!("error: --config FILE is required");
                return ExitCode::from(2);
            };
            match runestone::reload::reload_running(&path) {
                Ok(pid) => {
                    println!("reloaded: process {pid} serves {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e @ runestone::reload::ReloadError::Invalid(_)) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Check) => match load(cli.config) {
            Ok(config) => {
                for warning in config.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!(
                    "ok: {} provider(s), {} model(s), {} tenant(s), {} key(s)",
                    config.providers.len(),
                    config.models.len(),
                    config.tenants.len(),
                    config.tenants.iter().map(|t| t.keys.len()).sum::<usize>()
                );
                if let Some(redis) = &config.redis {
                    // Endpoints only: user names and passwords stay out.
                    println!(
                        "redis: {} at {}",
                        redis.target.mode(),
                        redis.target.endpoints().join(", ")
                    );
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        None => match load(cli.config.clone()) {
            Ok(config) => {
                init_tracing(&config.server.log_level);
                // A successor (`--upgrade`) takes over from the process the
                // pid file names; any other start checks it may.
                if !cli.upgrade {
                    let server = &config.server;
                    if let Err(e) = runestone::reload::may_start(&server.pid_file, server.listen) {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
                // Before any thread starts: each inherits the mask.
                runestone::reload::hold_hangups();
                let options = RunOptions {
                    daemon: cli.daemon,
                    upgrade: cli.upgrade,
                    // Absolute, so that a reload finds the same file
                    // whatever the working directory is by then.
                    config_path: cli
                        .config
                        .map(|path| std::path::absolute(&path).unwrap_or(path)),
                };
                tracing::info!(listen = %config.server.listen, "runestone starting");
                let (server, limiter) = server::build(config, options);
                server.run(pingora::server::RunArgs::default());
                // Handed over at a reload: what was settled since is left
                // for the new process.
                limiter.leave_tail();
                // Stopped (shutdown or upgrade): nothing in flight any
                // more, so every access log line is queued; write them out.
                runestone::gateway::flush_access_log(std::time::Duration::from_secs(5));
                // And every span queued, as far as the collector takes them.
                runestone::telemetry::flush(std::time::Duration::from_secs(5));
                std::process::exit(0)
            }
            Err(code) => code,
        },
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let Some(path) = path else {
        eprintln!("error: --config FILE is required");
        return Err(ExitCode::from(2));
    };
    Config::load(&path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read the key from stdin: {e}");
        return ExitCode::from(2);
    }
    let key = input.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        eprintln!("error: no key on stdin");
        return ExitCode::from(2);
    }
    println!("{}", format_digest(&digest_key(key)));
    ExitCode::SUCCESS
}

/// Logs to stderr at the level of `RUST_LOG`, else `server.log_level`. Pingora's
/// own trace- and debug-level events dump whole request headers and what it
/// read of a body (a provider's answer echoing its key, a client's
/// credentials), so they are dropped whatever `RUST_LOG` asks for; its errors about a
/// client that closed or stalled its connection are the client's doing, not
/// the gateway's, and a reload's new process waiting for the sockets is no
/// fault: neither is logged as an error.
fn init_tracing(default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let level = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let no_header_dumps = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() >= tracing::Level::DEBUG && meta.target().starts_with("pingora"))
    });
    tracing_subscriber::registry()
        .with(level)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_filter(no_header_dumps)
                .with_filter(NoFaultOfOurs),
        )
        .init();
}

/// Drops Pingora's ERROR events that are no fault of the gateway's: a
/// client closed or reset its connection, or stopped sending, while the
/// gateway read from it; or a reload's new process found the old one's
/// sockets not there yet (Pingora looks once the moment it waits for them,
/// before the old process can have sent them, and logs it as an error at
/// every reload; giving up on them is still logged).
struct NoFaultOfOurs;

impl<S> tracing_subscriber::layer::Filter<S> for NoFaultOfOurs {
    fn enabled(
        &self,
        _meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        let mut message = MessageText(String::new());
        event.record(&mut message);
        let text = message.0;
        let from_client = text.contains("Downstream")
            && [
                "ConnectionClosed",
                "ConnectionReset",
                "ReadTimedout",
                "ReadError",
                "handshake",
            ]
            .iter()
            .any(|cause| text.contains(cause));
        let sockets_not_yet_sent = text.starts_with("No incoming socket transfer");
        !(from_client || sockets_not_yet_sent)
    }
}

/// Collects an event's `message` field.
struct MessageText(String);

impl tracing::field::Visit for MessageText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
