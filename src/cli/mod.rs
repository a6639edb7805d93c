//! The client subcommands (`send`, `update`, `delete`, `stream`, `render`, `status`, `failed`,
//! `redeliver`, `capabilities`, `watch`): one gRPC call (or stream) to a running gateway, its answer printed as JSON on
//! standard output. Owns the client's arguments, connection and output; the gateway decides
//! everything else.

mod message_json;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use channel_gateway::api::convert;
use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::model::{self, Address, Conversation, Identity, Message, ProactiveOptions};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Serve(#[from] channel_gateway::server::ServeError),
    #[error(transparent)]
    Config(#[from] channel_gateway::config::ConfigError),
    #[error(
        "cannot connect to the gateway at {addr}: {reason}. Is `channel-gateway serve` running \
         there? (--gateway sets the address){hint}"
    )]
    Connect {
        addr: String,
        reason: String,
        hint: &'static str,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// Standard output was closed by its reader; main exits quietly.
    #[error("standard output closed")]
    PipeClosed,
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
}

/// Where the gateway listens and who calls it; shared by every client subcommand.
#[derive(Args)]
pub struct GatewayArgs {
    /// A running gateway's gRPC address: host:port, or http(s)://host:port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    gateway: String,
    /// Caller token, sent as `authorization: Bearer`.
    #[arg(long, env = "CHANNEL_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
pub struct MessageArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// A JSON file with the message, or a JSON array of messages for one conversation; `-`
    /// reads standard input. The model's form (snake_case, as the proto names fields) or the
    /// proto's JSON mapping (camelCase, enum names like TEXT_FORMAT_MARKDOWN); unknown keys are
    /// an error. Not combined with the address and text flags.
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
    /// Incoming activity id to reply to (Telegram: the message_id quoted).
    #[arg(long)]
    reply_to: Option<String>,
    /// Thread within the conversation (Slack thread_ts, Telegram forum topic id).
    #[arg(long)]
    thread: Option<String>,
    #[arg(long)]
    text: Option<String>,
    /// plain, markdown or xml.
    #[arg(long)]
    text_format: Option<String>,
}

/// How `send`, `update` and `delete` follow what they accepted, and retry safely.
#[derive(Args)]
pub struct FollowArgs {
    /// Wait for the channel's acknowledgement (or failure), at most --timeout.
    #[arg(long)]
    wait_delivered: bool,
    /// How long --wait-delivered waits, e.g. 30s or 2m; the gateway goes on even after.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Idempotency key for safe retries.
    #[arg(long, default_value = "")]
    idempotency_key: String,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    message: MessageArgs,
    #[command(flatten)]
    follow: FollowArgs,
    /// Start a conversation when the address has none.
    #[arg(long)]
    proactive: bool,
}

#[derive(Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The id `send` printed for the message to change.
    message_id: String,
    /// The new text (the message keeps its address).
    #[arg(long)]
    text: Option<String>,
    /// plain, markdown or xml.
    #[arg(long)]
    text_format: Option<String>,
    /// A JSON file with the whole new message (as `send --file` takes one; its address may be
    /// left out); `-` reads standard input. Not combined with --text.
    #[arg(long)]
    file: Option<PathBuf>,
    #[command(flatten)]
    follow: FollowArgs,
}

#[derive(Args)]
pub struct StreamArgs {
    /// The reply's address (and any text to begin with); its text then grows with what comes
    /// on standard input, as it comes, until end of input.
    #[command(flatten)]
    message: MessageArgs,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The id `send` printed for the message to remove.
    message_id: String,
    #[command(flatten)]
    follow: FollowArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The message id that send printed.
    message_id: String,
}

#[derive(Args)]
pub struct FailedArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Only this bot's messages.
    #[arg(long)]
    bot: Option<String>,
    /// At most this many (the gateway caps it at 1000).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// From a previous answer's next_page_token.
    #[arg(long)]
    page_token: Option<String>,
}

#[derive(Args)]
pub struct RedeliverArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Ids of failed or expired messages.
    #[arg(required = true)]
    message_ids: Vec<String>,
}

#[derive(Args)]
pub struct CapabilitiesArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// A channel id such as msteams, webchat, facebook, slack or telegram.
    channel: String,
}

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[arg(long)]
    bot: Option<String>,
    #[arg(long)]
    channel: Option<String>,
    #[arg(long)]
    conversation: Option<String>,
}

#[derive(Args)]
pub struct ListenArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Only this bot's events (repeatable); none: every bot the caller may act as.
    #[arg(long = "bot")]
    bots: Vec<String>,
    /// Only this channel's events (repeatable).
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// The consumer group. Each group gets every event: listen in a group of its own to watch
    /// beside a running bot without taking its events.
    #[arg(long, default_value = "default")]
    group: String,
    /// Print without acking: the events stay in the inbox and come again after the ack deadline.
    #[arg(long)]
    no_ack: bool,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match channel_gateway::config::parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

/// One line on standard output; a reader that went away is `PipeClosed`, not a panic.
pub fn print_line(line: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => CliError::PipeClosed,
            _ => CliError::Output(e),
        })
}

fn print(v: &Value) -> Result<(), CliError> {
    print_line(&serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()))
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

/// `127.0.0.1:50051` as `http://127.0.0.1:50051`; a URL is kept.
fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// An error and its causes on one line: tonic's own says only "transport error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

async fn connect(gw: &GatewayArgs, hint: &'static str) -> Result<Client, CliError> {
    let url = endpoint_url(&gw.gateway);
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| {
            CliError::Usage(format!(
                "--gateway `{}` is not host:port or a URL ({e})",
                gw.gateway
            ))
        })?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| CliError::Connect {
        addr: gw.gateway.clone(),
        reason: error_chain(&e),
        hint,
    })?;
    let token =
        match &gw.token {
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

fn messages_from(args: &MessageArgs) -> Result<Vec<Message>, CliError> {
    if let Some(path) = &args.file {
        let flags = [
            ("--channel", args.channel.is_some()),
            ("--service-url", args.service_url.is_some()),
            ("--conversation", args.conversation.is_some()),
            ("--bot", args.bot.is_some()),
            ("--user", args.user.is_some()),
            ("--reply-to", args.reply_to.is_some()),
            ("--thread", args.thread.is_some()),
            ("--text", args.text.is_some()),
            ("--text-format", args.text_format.is_some()),
        ];
        let given: Vec<&str> = flags.iter().filter(|(_, s)| *s).map(|(f, _)| *f).collect();
        if !given.is_empty() {
            return Err(CliError::Usage(format!(
                "--file cannot be combined with {}: the file holds the whole message",
                given.join(", ")
            )));
        }
        let v = read_json(path)?;
        let list = match v {
            Value::Array(a) => a,
            one => vec![one],
        };
        return list
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                message_json::message(m)
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

fn is_final(state: i32) -> bool {
    matches!(
        pb::DeliveryState::try_from(state),
        Ok(pb::DeliveryState::Delivered | pb::DeliveryState::Failed | pb::DeliveryState::Expired)
    )
}

fn receipts_json(r: &[pb::Receipt]) -> Value {
    r.iter()
        .map(|x| json!({"native_id": x.native_id, "conversation_id": x.conversation_id}))
        .collect()
}

fn warnings_json(w: &[pb::Warning]) -> Value {
    w.iter()
        .map(|w| json!({"code": w.code, "field": w.field, "message": w.message}))
        .collect()
}

fn error_json(e: &Option<pb::ChannelError>) -> Value {
    e.as_ref().map_or(Value::Null, |e| {
        json!({"channel": e.channel, "http_status": e.http_status, "code": e.code,
               "message": e.message, "permanent": e.permanent,
               "possible_duplicate": e.possible_duplicate, "attempts": e.attempts})
    })
}

fn result_json(r: &pb::SendResult) -> Value {
    json!({
        "message_id": r.message_id,
        "state": state_name(r.state),
        "receipts": receipts_json(&r.receipts),
        "warnings": warnings_json(&r.warnings),
        "error": error_json(&r.error),
    })
}

fn time_json(t: &Option<prost_types::Timestamp>) -> Value {
    let Some(t) = t else { return Value::Null };
    time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|d| {
            d.replace_nanosecond(u32::try_from(t.nanos).unwrap_or(0))
                .ok()
        })
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

fn delivery_json(d: &pb::Delivery) -> Value {
    json!({
        "message_id": d.message_id,
        "state": state_name(d.state),
        "channel_id": d.channel_id,
        "bot_id": d.bot_id,
        "conversation_id": d.conversation_id,
        "attempts": d.attempts,
        "possible_duplicate": d.possible_duplicate,
        "accepted_at": time_json(&d.accepted_at),
        "updated_at": time_json(&d.updated_at),
        "receipts": receipts_json(&d.receipts),
        "warnings": warnings_json(&d.warnings),
        "error": error_json(&d.error),
    })
}

pub async fn send(args: SendArgs) -> Result<(), CliError> {
    let messages = messages_from(&args.message)?;
    let Some(first) = messages.first() else {
        return Err(CliError::Usage("no message to send".into()));
    };
    let mut client = connect(&args.message.gateway, "").await?;
    // Waiting for delivery is done here, not in the call: a call that timed out would leave
    // no id to follow the message by.
    let wait = pb::WaitMode::Accepted as i32;
    let mut results: Vec<pb::SendResult>;
    let mut extra = None;
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
                idempotency_key: args.follow.idempotency_key.clone(),
                wait,
            })
            .await?
            .into_inner();
        extra = Some(r.address.map(|a| json!({"channel_id": a.channel_id, "conversation_id": a.conversation.map(|c| c.id), "service_url": a.service_url})));
        results = r.results;
    } else if messages.len() == 1 {
        let r = client
            .send(pb::SendRequest {
                message: Some(convert::message_pb(first)),
                idempotency_key: args.follow.idempotency_key.clone(),
                wait,
            })
            .await?
            .into_inner();
        results = vec![pb::SendResult {
            message_id: r.message_id,
            state: r.state,
            receipts: r.receipts,
            warnings: r.warnings,
            error: None,
        }];
    } else {
        results = client
            .send_batch(pb::SendBatchRequest {
                messages: messages.iter().map(convert::message_pb).collect(),
                idempotency_key: args.follow.idempotency_key.clone(),
                wait,
            })
            .await?
            .into_inner()
            .results;
    }
    let mut waiting = Vec::new();
    if args.follow.wait_delivered {
        waiting = wait_delivered(&mut client, &mut results, args.follow.timeout).await?;
    }
    let out: Vec<Value> = results.iter().map(result_json).collect();
    match (extra, out.len()) {
        (Some(address), _) => print(&json!({"address": address, "results": out}))?,
        (None, 1) => print(&out[0])?,
        (None, _) => print(&json!({ "results": out }))?,
    }
    if !waiting.is_empty() {
        return Err(CliError::Usage(format!(
            "not delivered within {:?} (--timeout): {}; the gateway goes on delivering: \
             follow with `channel-gateway status ID`",
            args.follow.timeout,
            waiting.join(", ")
        )));
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| {
            matches!(
                pb::DeliveryState::try_from(r.state),
                Ok(pb::DeliveryState::Failed | pb::DeliveryState::Expired)
            )
        })
        .map(|r| format!("{} {}", r.message_id, state_name(r.state)))
        .collect();
    if !failed.is_empty() {
        return Err(CliError::Usage(format!(
            "not delivered: {} (see `error` above)",
            failed.join(", ")
        )));
    }
    Ok(())
}

/// Follows each accepted message until it is delivered, failed or expired, or `timeout` passes;
/// updates `results` and returns the ids still on their way (as "ID state").
async fn wait_delivered(
    client: &mut Client,
    results: &mut [pb::SendResult],
    timeout: Duration,
) -> Result<Vec<String>, CliError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        for r in results.iter_mut().filter(|r| !is_final(r.state)) {
            let d = client
                .get_delivery(pb::GetDeliveryRequest {
                    message_id: r.message_id.clone(),
                })
                .await?
                .into_inner()
                .delivery
                .unwrap_or_default();
            r.state = d.state;
            r.receipts = d.receipts;
            r.error = d.error;
            if !d.warnings.is_empty() {
                r.warnings = d.warnings;
            }
        }
        let pending: Vec<String> = results
            .iter()
            .filter(|r| !is_final(r.state))
            .map(|r| format!("{} {}", r.message_id, state_name(r.state)))
            .collect();
        if pending.is_empty() || started.elapsed() >= timeout {
            return Ok(pending);
        }
        tokio::time::sleep(pause.min(timeout.saturating_sub(started.elapsed()))).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

pub async fn render(args: MessageArgs) -> Result<(), CliError> {
    let messages = messages_from(&args)?;
    let mut client = connect(
        &args.gateway,
        " (render asks a running gateway; it needs no channel credentials)",
    )
    .await?;
    let mut out = Vec::new();
    for m in &messages {
        let r = client
            .render(pb::RenderRequest {
                message: Some(convert::message_pb(m)),
                options: None,
                change: None,
            })
            .await?
            .into_inner();
        out.push(json!({
            "requests": r.requests.iter().map(|q| json!({
                "method": q.method,
                "url": q.url,
                "body": serde_json::from_str::<Value>(&q.body_json).unwrap_or(Value::String(q.body_json.clone())),
            })).collect::<Vec<_>>(),
            "warnings": warnings_json(&r.warnings),
        }));
    }
    print(&if out.len() == 1 {
        out.remove(0)
    } else {
        Value::Array(out)
    })
}

/// The JSON in the file at `path` (`-`: standard input).
fn read_json(path: &std::path::Path) -> Result<Value, CliError> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{}: not JSON: {e}", path.display())))
}

/// The new message of `update`: the file's, or one of the text flags (its address comes from the
/// message it changes).
fn update_message_of(args: &UpdateArgs) -> Result<Message, CliError> {
    if let Some(path) = &args.file {
        if args.text.is_some() || args.text_format.is_some() {
            return Err(CliError::Usage(
                "--file cannot be combined with --text or --text-format: the file holds the \
                 whole message"
                    .into(),
            ));
        }
        let v = read_json(path)?;
        return message_json::message(v)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())));
    }
    let Some(text) = args.text.clone() else {
        return Err(CliError::Usage(
            "give the new message: --text, or --file".into(),
        ));
    };
    Ok(Message {
        text: Some(text),
        text_format: text_format_of(args.text_format.as_deref())?,
        ..Default::default()
    })
}

fn text_format_of(s: Option<&str>) -> Result<Option<model::TextFormat>, CliError> {
    Ok(match s {
        None => None,
        Some("plain") => Some(model::TextFormat::Plain),
        Some("markdown") => Some(model::TextFormat::Markdown),
        Some("xml") => Some(model::TextFormat::Xml),
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--text-format `{other}`: use plain, markdown or xml"
            )));
        }
    })
}

/// Prints a change's result (following it with --wait-delivered); an error when it was not
/// carried out.
async fn change_result(
    client: &mut Client,
    mut result: pb::SendResult,
    follow: &FollowArgs,
) -> Result<(), CliError> {
    let timeout = follow.timeout;
    let mut waiting = Vec::new();
    if follow.wait_delivered {
        waiting = wait_delivered(client, std::slice::from_mut(&mut result), timeout).await?;
    }
    let mut out = result_json(&result);
    if let Some(o) = out.as_object_mut()
        && let Some(id) = o.remove("message_id")
    {
        o.insert("change_id".into(), id);
    }
    print(&out)?;
    if !waiting.is_empty() {
        return Err(CliError::Usage(format!(
            "not carried out within {timeout:?} (--timeout): {}; the gateway goes on: follow \
             with `channel-gateway status ID`",
            waiting.join(", ")
        )));
    }
    if matches!(
        pb::DeliveryState::try_from(result.state),
        Ok(pb::DeliveryState::Failed | pb::DeliveryState::Expired)
    ) {
        return Err(CliError::Usage(format!(
            "not carried out: {} {} (see `error` above)",
            result.message_id,
            state_name(result.state)
        )));
    }
    Ok(())
}

pub async fn update(args: UpdateArgs) -> Result<(), CliError> {
    let message = update_message_of(&args)?;
    let mut client = connect(&args.gateway, "").await?;
    let mut m = convert::message_pb(&message);
    // The address comes from the message changed, unless the file names one.
    if message.address == Address::default() {
        m.address = None;
    }
    let r = client
        .update_message(pb::UpdateMessageRequest {
            message_id: args.message_id,
            message: Some(m),
            idempotency_key: args.follow.idempotency_key.clone(),
            wait: pb::WaitMode::Accepted as i32,
        })
        .await?
        .into_inner();
    let result = pb::SendResult {
        message_id: r.change_id,
        state: r.state,
        receipts: r.receipts,
        warnings: r.warnings,
        error: None,
    };
    change_result(&mut client, result, &args.follow).await
}

pub async fn delete(args: DeleteArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let r = client
        .delete_message(pb::DeleteMessageRequest {
            message_id: args.message_id,
            idempotency_key: args.follow.idempotency_key.clone(),
            wait: pb::WaitMode::Accepted as i32,
        })
        .await?
        .into_inner();
    let result = pb::SendResult {
        message_id: r.change_id,
        state: r.state,
        receipts: Vec::new(),
        warnings: r.warnings,
        error: None,
    };
    change_result(&mut client, result, &args.follow).await
}

/// Most bytes read from standard input for one chunk.
const STREAM_READ_BYTES: usize = 4096;

pub async fn stream(args: StreamArgs) -> Result<(), CliError> {
    let mut messages = messages_from(&args.message)?;
    if messages.len() != 1 {
        return Err(CliError::Usage(
            "stream takes one message (its address and any text to begin with)".into(),
        ));
    }
    let start = messages.remove(0);
    let mut client = connect(&args.message.gateway, "").await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::StreamReplyRequest>(16);
    tx.send(pb::StreamReplyRequest {
        kind: Some(pb::stream_reply_request::Kind::Start(convert::message_pb(
            &start,
        ))),
    })
    .await
    .map_err(|_| CliError::Usage("the stream ended before it started".into()))?;
    // Standard input is read on a thread of its own, each read sent as it comes; bytes of a
    // character cut by a read wait for the next.
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut input = std::io::stdin().lock();
        let mut buf = vec![0u8; STREAM_READ_BYTES];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            let valid = match std::str::from_utf8(&carry) {
                Ok(_) => carry.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                // Not UTF-8 at all: sent as the replacement character.
                Err(_) => carry.len(),
            };
            let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
            carry.drain(..valid);
            if !text.is_empty()
                && tx
                    .blocking_send(pb::StreamReplyRequest {
                        kind: Some(pb::stream_reply_request::Kind::Chunk(text)),
                    })
                    .is_err()
            {
                return;
            }
        }
        let _ = tx.blocking_send(pb::StreamReplyRequest {
            kind: Some(pb::stream_reply_request::Kind::Finish(
                pb::Message::default(),
            )),
        });
    });
    let r = client
        .stream_reply(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The reply is finished: what is still typed is not part of it.
    drop(reader);
    let result = pb::SendResult {
        message_id: r.message_id,
        state: r.state,
        receipts: r.receipts,
        warnings: r.warnings,
        error: r.error,
    };
    let mut out = result_json(&result);
    if let Some(o) = out.as_object_mut() {
        o.insert("incomplete".into(), r.incomplete.into());
    }
    print(&out)?;
    if !matches!(
        pb::DeliveryState::try_from(result.state),
        Ok(pb::DeliveryState::Delivered)
    ) || r.incomplete
    {
        return Err(CliError::Usage(format!(
            "the reply {} was not shown whole (see `error` above)",
            result.message_id
        )));
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let d = client
        .get_delivery(pb::GetDeliveryRequest {
            message_id: args.message_id,
        })
        .await?
        .into_inner()
        .delivery
        .unwrap_or_default();
    print(&delivery_json(&d))
}

pub async fn failed(args: FailedArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let r = client
        .list_failed(pb::ListFailedRequest {
            bot_id: args.bot.unwrap_or_default(),
            page_size: args.page_size,
            page_token: args.page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print(&json!({
        "deliveries": r.deliveries.iter().map(delivery_json).collect::<Vec<_>>(),
        "next_page_token": r.next_page_token,
    }))
}

pub async fn redeliver(args: RedeliverArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let r = client
        .redeliver(pb::RedeliverRequest {
            message_ids: args.message_ids,
        })
        .await?
        .into_inner();
    print(&json!({ "message_ids": r.message_ids }))
}

pub async fn capabilities(args: CapabilitiesArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let c = client
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: args.channel,
        })
        .await?
        .into_inner()
        .capabilities
        .unwrap_or_default();
    print(&json!({
        "channel_id": c.channel_id,
        "implementation": c.implementation,
        "configured": c.configured,
        "typing": c.typing,
        "typing_interval": c.typing_interval.map(|d| format!("{}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)),
        "carousel": c.carousel,
        "max_buttons_per_card": c.max_buttons_per_card,
        "max_suggested_actions": c.max_suggested_actions,
        "max_text_length": c.max_text_length,
        "max_payload_bytes": c.max_payload_bytes,
        "markdown_flavor": c.markdown_flavor,
        "update_delete": c.update_delete,
        "proactive": c.proactive,
        "proactive_note": c.proactive_note,
    }))
}

pub async fn watch(args: WatchArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let mut stream = client
        .watch_deliveries(pb::WatchDeliveriesRequest {
            bot_id: args.bot.unwrap_or_default(),
            channel_id: args.channel.unwrap_or_default(),
            conversation_id: args.conversation.unwrap_or_default(),
        })
        .await?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let d = ev?.delivery.unwrap_or_default();
        print_line(&delivery_json(&d).to_string())?;
    }
    Ok(())
}

/// One received event as a JSON line: the message in the model's form (the same form `send
/// --file` reads), so its `address` can be pasted into a reply.
fn event_json(e: pb::ReceivedEvent) -> Value {
    let mut v = convert::Violations::default();
    let message = e.message.map(|m| convert::message(&mut v, &"message", m));
    json!({
        "event_id": e.event_id,
        "attempt": e.attempt,
        "redelivered": e.redelivered,
        "received_at": time_json(&e.received_at),
        "reply_by": time_json(&e.reply_by),
        "message": message.map_or(Value::Null, |m| serde_json::to_value(m).unwrap_or(Value::Null)),
    })
}

pub async fn listen(args: ListenArgs) -> Result<(), CliError> {
    let mut client = connect(&args.gateway, "").await?;
    let (tx, input) = tokio::sync::mpsc::channel::<pb::ReceiveRequest>(64);
    let subscribe = pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Subscribe(
            pb::ReceiveSubscription {
                group: args.group,
                bot_ids: args.bots,
                channel_ids: args.channels,
                max_in_flight: 0,
            },
        )),
    };
    // The channel has room: the first send cannot wait.
    let _ = tx.send(subscribe).await;
    let mut stream = client
        .receive(tokio_stream::wrappers::ReceiverStream::new(input))
        .await?
        .into_inner();
    while let Some(r) = stream.next().await {
        match r?.kind {
            Some(pb::receive_response::Kind::Subscribed(s)) => {
                eprintln!(
                    "listening (group {}, {} at once); one JSON line per event",
                    s.group, s.max_in_flight
                );
            }
            Some(pb::receive_response::Kind::Event(e)) => {
                let id = e.event_id.clone();
                print_line(&event_json(e).to_string())?;
                if !args.no_ack {
                    let ack = pb::ReceiveRequest {
                        kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
                            event_ids: vec![id],
                        })),
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                }
            }
            // `listen` answers nothing, so it is never told of an answer.
            Some(pb::receive_response::Kind::Responded(_)) | None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_gets_a_scheme() {
        assert_eq!(endpoint_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(
            endpoint_url("https://gw.example:443"),
            "https://gw.example:443"
        );
    }
}
