//! The `leadscore` command: parses the command line, sets up logging and
//! hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use leadscore::settings::{LogFormat, Settings};

mod tools;

/// The hot path allocates small, short-lived values on several threads (the
/// workers and their writers); mimalloc's per-thread heaps serve them without
/// glibc's arena locking.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Event-streaming lead scoring: Kafka in, decaying scores in memory and
/// Redis, segment changes and sales hand-offs out.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service.
    Run {
        /// Config file (TOML); environment variables LEADSCORE__SECTION__KEY override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print the effective settings, secrets masked.
    CheckConfig {
        /// Config file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the whole service against an in-process broker with a synthetic stream.
    Demo(tools::demo::DemoArgs),
    /// Drive a running service through the broker and report throughput and latency.
    Loadgen(tools::loadgen::LoadgenArgs),
    /// Score a file of events (NDJSON) with no Kafka and no Redis; optionally compare two rules files.
    Replay(tools::replay::ReplayArgs),
}

fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // rdkafka's second close of a consumer the service closed itself.
    let redundant = filter_fn(|m| !leadscore::kafka::consumer::is_redundant_close_error(m));
    // Colours only on a terminal: a pipe or file (a pod's log, a collector)
    // gets plain text, not escape codes around every level and target.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Json => registry
            .with(layer.json().with_filter(filter).with_filter(redundant))
            .init(),
        LogFormat::Text => registry
            .with(layer.with_filter(filter).with_filter(redundant))
            .init(),
    }
}

fn load(config: Option<&PathBuf>) -> Result<leadscore::settings::Loaded, ExitCode> {
    Settings::load(config.map(PathBuf::as_path), std::env::vars()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(loaded) => {
                print!("{}", loaded.settings.to_masked_toml());
                println!(
                    "# rules version {:?}: {} rules, {} segments",
                    loaded.rules.version,
                    loaded.rules.rules.len(),
                    loaded.rules.tiers.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let loaded = match load(config.as_ref()) {
                Ok(l) => l,
                Err(code) => return code,
            };
            init_logging(&loaded.settings.log.level, loaded.settings.log.format);
            let rt = runtime();
            let result = rt.block_on(async {
                let cancel = CancellationToken::new();
                // A second signal exits at once: as safe as a crash.
                leadscore::service::cancel_on_signals(cancel.clone(), |code| {
                    std::process::exit(code)
                });
                leadscore::service::run(loaded, cancel, |_| {}).await
            });
            // Everything that writes has stopped by now; a Redis ping or a
            // lookup still waiting on a hung Redis must not hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = chain(&e), "leadscore stopped on an error.");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo(args) => {
            init_logging(
                &std::env::var("LEADSCORE_DEMO_LOG")
                    .unwrap_or_else(|_| "warn,leadscore=warn".into()),
                LogFormat::Text,
            );
            finish(runtime().block_on(tools::demo::run(args)))
        }
        Command::Replay(args) => finish(tools::replay::run(args)),
        Command::Loadgen(args) => {
            init_logging("warn", LogFormat::Text);
            finish(runtime().block_on(tools::loadgen::run(args)))
        }
    }
}

/// An error and its causes, `outer: cause: …`, leaving out a cause whose
/// text the message already has (many errors, redis-rs's and rdkafka's among
/// them, print their cause themselves as well as returning it as source).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Invalid settings exit 2, as `run` and `check-config` do.
        Err(e)
            if e.downcast_ref::<leadscore::settings::SettingsError>()
                .is_some() =>
        {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused (os error 111)")]
    struct Refused;

    /// An error that prints its cause itself and also returns it as source.
    #[derive(Debug, thiserror::Error)]
    #[error("redis: {0}")]
    struct Wraps(#[source] Refused);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Wraps(Refused)).context("connecting to Redis at 127.0.0.1:1");
        assert_eq!(
            chain(&e),
            "connecting to Redis at 127.0.0.1:1: redis: connection refused (os error 111)"
        );
        let e = anyhow::Error::new(Refused).context("reading the rules");
        assert_eq!(
            chain(&e),
            "reading the rules: connection refused (os error 111)"
        );
    }
}
