//! The `channel-gateway` command: `serve` runs the gateway; the other subcommands are a client
//! of a running gateway for people and scripts (in `cli`). Owns argument parsing, logging setup
//! and signal handling only.
#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use channel_gateway::config::Config;

use cli::CliError;

// The hot path makes many small, short-lived allocations on both runtime threads; glibc's
// malloc took about a fifth of the gateway's CPU in the benchmark profile (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "channel-gateway",
    version,
    about = "gRPC gateway from bots to chat channels, in order"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (gRPC on 127.0.0.1:50051 unless configured).
    Serve {
        /// TOML config file; CHANNEL_GATEWAY__SECTION__KEY environment variables override it.
        #[arg(long, env = "CHANNEL_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides server.listen (host:port; localhost is 127.0.0.1).
        #[arg(long)]
        listen: Option<String>,
        /// Overrides outbox.data_dir (default ./channel-gateway-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Send a message through a running gateway and print the result.
    Send(cli::SendArgs),
    /// Change a message sent before, in line with its conversation (UpdateMessage).
    Update(cli::UpdateArgs),
    /// Remove a message sent before from its conversation (DeleteMessage).
    Delete(cli::DeleteArgs),
    /// Stream a reply from standard input as it comes, shown growing (StreamReply).
    Stream(cli::StreamArgs),
    /// Show the native requests a message becomes, without sending. Asks a running gateway
    /// (`channel-gateway serve`; no channel credentials needed for this).
    Render(cli::MessageArgs),
    /// Where one message stands (GetDelivery).
    Status(cli::StatusArgs),
    /// Failed and expired messages still in the outbox, oldest first (ListFailed).
    Failed(cli::FailedArgs),
    /// Put failed or expired messages back in line (Redeliver).
    Redeliver(cli::RedeliverArgs),
    /// What a channel supports and its limits, and whether it is configured (GetCapabilities).
    Capabilities(cli::CapabilitiesArgs),
    /// Print state changes as they happen, one JSON line each (WatchDeliveries).
    Watch(cli::WatchArgs),
    /// Print the events people send on the channels, one JSON line each, acking each (Receive).
    Listen(cli::ListenArgs),
    /// Print the SHA-256 of a caller token read from standard input, for `auth.tokens`.
    HashToken,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Nothing left to wait for: `stream`'s reader of standard input may still block on a read
    // the reply no longer needs.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): what it wanted it has; nothing to complain about.
        Err(CliError::PipeClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            if let Some(l) = listen {
                env.push(("CHANNEL_GATEWAY__SERVER__LISTEN".into(), toml_string(&l)));
            }
            let mut config = Config::load(config.as_deref(), env)?;
            if let Some(d) = data_dir {
                config.outbox.data_dir = d;
            }
            init_logging(&config);
            channel_gateway::server::run(config, shutdown_signal()).await?;
            Ok(())
        }
        Command::Send(args) => cli::send(args).await,
        Command::Update(args) => cli::update(args).await,
        Command::Delete(args) => cli::delete(args).await,
        Command::Stream(args) => cli::stream(args).await,
        Command::Render(args) => cli::render(args).await,
        Command::Status(args) => cli::status(args).await,
        Command::Failed(args) => cli::failed(args).await,
        Command::Redeliver(args) => cli::redeliver(args).await,
        Command::Capabilities(args) => cli::capabilities(args).await,
        Command::Watch(args) => cli::watch(args).await,
        Command::Listen(args) => cli::listen(args).await,
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
            let token = token.trim_end_matches(['\r', '\n']);
            if token.is_empty() {
                return Err(CliError::Usage("no token on standard input".into()));
            }
            cli::print_line(&channel_gateway::api::auth::sha256_hex(token.as_bytes()))
        }
    }
}

/// A TOML string literal, so any text survives the environment-override parser.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(e) => {
            if std::env::var_os("RUST_LOG").is_some() {
                eprintln!("warning: RUST_LOG is not a log filter ({e}); using log.level");
            }
            tracing_subscriber::EnvFilter::new(&config.log.level)
        }
    };
    // Colour codes only for a person at a terminal: in a file or a log collector they are noise.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if config.log.format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = &config.log.otlp_endpoint {
        match otlp_layer(endpoint) {
            Ok(layer) => {
                registry.with(layer).init();
                tracing::info!(endpoint, "exporting traces over OTLP");
                return;
            }
            Err(e) => eprintln!("warning: OTLP export disabled: {e}"),
        }
    }
    registry.init();
}

#[cfg(feature = "otlp")]
fn otlp_layer<S>(endpoint: &str) -> Result<impl tracing_subscriber::Layer<S>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("channel-gateway")
                .build(),
        )
        .build();
    let tracer = provider.tracer("channel-gateway");
    opentelemetry::global::set_tracer_provider(provider);
    Ok(tracing_opentelemetry::layer().with_tracer(tracer))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
