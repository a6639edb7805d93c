//! The `channel-gateway` command: `serve` runs the gateway; `send` and `render` are a client for
//! people and scripts. Owns argument parsing, logging setup and signal handling only.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use channel_gateway::api::convert;
use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::config::Config;
use channel_gateway::model::{self, Address, Conversation, Identity, Message, ProactiveOptions};

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
        /// Overrides server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides outbox.data_dir (default ./channel-gateway-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Send a message through a running gateway and print the result.
    Send(SendArgs),
    /// Show the native requests a message becomes, without sending.
    Render(MessageArgs),
    /// Print the SHA-256 of a caller token read from standard input, for `auth.tokens`.
    HashToken,
}

#[derive(Args)]
struct MessageArgs {
    /// Gateway address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// Caller token, sent as `authorization: Bearer`.
    #[arg(long, env = "CHANNEL_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A JSON file with the message (the model's JSON form, same field names as the proto),
    /// or a JSON array of messages for one conversation. `-` reads standard input.
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long)]
    channel: Option<String>,
    #[arg(long)]
    service_url: Option<String>,
    #[arg(long)]
    conversation: Option<String>,
    #[arg(long)]
    bot: Option<String>,
    #[arg(long)]
    user: Option<String>,
    /// Incoming activity id to reply to.
    #[arg(long)]
    reply_to: Option<String>,
    /// Thread within the conversation (Slack thread_ts).
    #[arg(long)]
    thread: Option<String>,
    #[arg(long)]
    text: Option<String>,
    /// plain, markdown or xml.
    #[arg(long)]
    text_format: Option<String>,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    message: MessageArgs,
    /// Wait for the channel's acknowledgement.
    #[arg(long)]
    wait_delivered: bool,
    /// Idempotency key for safe retries.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// Start a conversation when the address has none.
    #[arg(long)]
    proactive: bool,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Serve(#[from] channel_gateway::server::ServeError),
    #[error(transparent)]
    Config(#[from] channel_gateway::config::ConfigError),
    #[error("cannot connect to the gateway: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
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
        Command::Send(args) => send(args).await,
        Command::Render(args) => render(args).await,
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
            let token = token.trim_end_matches(['\r', '\n']);
            if token.is_empty() {
                return Err(CliError::Usage("no token on standard input".into()));
            }
            println!(
                "{}",
                channel_gateway::api::auth::sha256_hex(token.as_bytes())
            );
            Ok(())
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

fn messages_from(args: &MessageArgs) -> Result<Vec<Message>, CliError> {
    if let Some(path) = &args.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: not JSON: {e}", path.display())))?;
        let list = match v {
            Value::Array(a) => a,
            one => vec![one],
        };
        return list
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                serde_json::from_value::<Message>(m)
                    .map_err(|e| CliError::Usage(format!("{} message {i}: {e}", path.display())))
            })
            .collect();
    }
    let channel = args.channel.clone().ok_or_else(|| {
        CliError::Usage("give --file, or --channel with the address flags".into())
    })?;
    let text_format = match args.text_format.as_deref() {
        None => None,
        Some("plain") => Some(model::TextFormat::Plain),
        Some("markdown") => Some(model::TextFormat::Markdown),
        Some("xml") => Some(model::TextFormat::Xml),
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--text-format `{other}`: use plain, markdown or xml"
            )));
        }
    };
    let ident = |id: &Option<String>| {
        id.clone().map(|id| Identity {
            id,
            ..Default::default()
        })
    };
    Ok(vec![Message {
        address: Address {
            channel_id: channel,
            user: ident(&args.user),
            bot: ident(&args.bot),
            conversation: args.conversation.clone().map(|id| Conversation {
                id,
                ..Default::default()
            }),
            service_url: args.service_url.clone(),
            id: args.reply_to.clone(),
            thread_id: args.thread.clone(),
        },
        text: args.text.clone(),
        text_format,
        ..Default::default()
    }])
}

fn state_name(s: i32) -> String {
    pb::DeliveryState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("DELIVERY_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

fn result_json(r: &pb::SendResult) -> Value {
    json!({
        "message_id": r.message_id,
        "state": state_name(r.state),
        "receipts": r.receipts.iter().map(|x| json!({"native_id": x.native_id, "conversation_id": x.conversation_id})).collect::<Vec<_>>(),
        "warnings": r.warnings.iter().map(|w| json!({"code": w.code, "field": w.field, "message": w.message})).collect::<Vec<_>>(),
        "error": r.error.as_ref().map(|e| json!({"channel": e.channel, "http_status": e.http_status, "code": e.code, "message": e.message, "permanent": e.permanent})),
    })
}

fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

type Client = ChannelGatewayClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// Adds the caller token to every call.
#[derive(Clone)]
struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn client(args: &MessageArgs) -> Result<Client, CliError> {
    let channel = tonic::transport::Endpoint::from_shared(args.gateway.clone())
        .map_err(|e| CliError::Usage(format!("--gateway `{}`: {e}", args.gateway)))?
        .connect()
        .await?;
    let token =
        match &args.token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                CliError::Usage("--token has characters a header cannot carry".into())
            })?),
            None => None,
        };
    Ok(ChannelGatewayClient::with_interceptor(
        channel,
        BearerToken(token),
    ))
}

async fn send(args: SendArgs) -> Result<(), CliError> {
    let messages = messages_from(&args.message)?;
    let mut client = client(&args.message).await?;
    let wait = if args.wait_delivered {
        pb::WaitMode::Delivered
    } else {
        pb::WaitMode::Accepted
    } as i32;
    let Some(first) = messages.first() else {
        return Err(CliError::Usage("no message to send".into()));
    };
    if args.proactive || first.address.conversation_id().is_none() {
        let address = convert::address_pb(&first.address);
        let msgs = messages
            .iter()
            .map(|m| pb::Message {
                address: None,
                ..convert::message_pb(m)
            })
            .collect();
        let r = client
            .send_proactive(pb::SendProactiveRequest {
                address: Some(address),
                messages: msgs,
                options: Some(convert::options_pb(&ProactiveOptions::default())),
                idempotency_key: args.idempotency_key,
                wait,
            })
            .await?
            .into_inner();
        let addr = r.address.map(|a| json!({"channel_id": a.channel_id, "conversation_id": a.conversation.map(|c| c.id), "service_url": a.service_url}));
        print(
            &json!({"address": addr, "results": r.results.iter().map(result_json).collect::<Vec<_>>()}),
        );
        return Ok(());
    }
    if messages.len() == 1 {
        let r = client
            .send(pb::SendRequest {
                message: Some(convert::message_pb(first)),
                idempotency_key: args.idempotency_key,
                wait,
            })
            .await?
            .into_inner();
        print(&result_json(&pb::SendResult {
            message_id: r.message_id,
            state: r.state,
            receipts: r.receipts,
            warnings: r.warnings,
            error: None,
        }));
        return Ok(());
    }
    let r = client
        .send_batch(pb::SendBatchRequest {
            messages: messages.iter().map(convert::message_pb).collect(),
            idempotency_key: args.idempotency_key,
            wait,
        })
        .await?
        .into_inner();
    print(&json!({"results": r.results.iter().map(result_json).collect::<Vec<_>>()}));
    Ok(())
}

async fn render(args: MessageArgs) -> Result<(), CliError> {
    let messages = messages_from(&args)?;
    let mut client = client(&args).await?;
    let mut out = Vec::new();
    for m in &messages {
        let r = client
            .render(pb::RenderRequest {
                message: Some(convert::message_pb(m)),
                options: None,
            })
            .await?
            .into_inner();
        out.push(json!({
            "requests": r.requests.iter().map(|q| json!({
                "method": q.method,
                "url": q.url,
                "body": serde_json::from_str::<Value>(&q.body_json).unwrap_or(Value::String(q.body_json.clone())),
            })).collect::<Vec<_>>(),
            "warnings": r.warnings.iter().map(|w| json!({"code": w.code, "field": w.field, "message": w.message})).collect::<Vec<_>>(),
        }));
    }
    print(&if out.len() == 1 {
        out.remove(0)
    } else {
        Value::Array(out)
    });
    Ok(())
}
