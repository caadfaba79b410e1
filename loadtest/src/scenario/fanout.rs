//! `loadtest fanout`: C receivers subscribed to one channel; M messages published to it, over a
//! WebSocket `publish` (ephemeral) or a durable REST send to the channel (`--via`). Measures deliveries
//! per second, publish-to-deliver latency, and the server's CPU-seconds per million deliveries.
//!
//! With `--via ws` the publisher is one more connection (user `{prefix}pub`), subscribed to the channel
//! because this server requires it; the server does not echo a publish to its sender, so each message
//! should make exactly C deliveries. `--via rest` posts `{"channels":[channel],"data":{"lt_ns":...}}`
//! to `/api/v1/notifications/send` on the same host and port as the URL. `--via pusher` (with
//! `--pusher-app`, receivers speaking the Pusher protocol) posts signed events to `POST /apps/ID/events`
//! on that host and port: ephemeral, as Pusher events are, and what any Pusher-protocol server accepts.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::publisher::{self, BodyWriter, RestClient};
use crate::pusher;
use crate::scenario::delivery::{self, DeliveryRun, MeasureArgs, Publisher};
use crate::scenario::receivers::ReceiverArgs;
use crate::stamp;
use crate::target::WsTarget;

/// How the messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `{"action":"publish"}` on a WebSocket: ephemeral, not stored.
    Ws,
    /// `POST /api/v1/notifications/send` to the channel: stored, then delivered.
    Rest,
    /// `POST /apps/ID/events` (the Pusher HTTP API, signed), to receivers on the Pusher protocol.
    Pusher,
}

/// Options of `loadtest fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Receivers subscribed to the channel.
    #[arg(long, default_value_t = 1_000)]
    pub subscribers: u64,
    /// Messages to publish.
    #[arg(long, default_value_t = 1_000)]
    pub messages: u64,
    /// Messages per second (open-loop); 0 publishes as fast as the connection takes them.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Publish over a WebSocket or as durable REST sends.
    #[arg(long, value_enum, default_value = "ws")]
    pub via: Via,
    /// The channel.
    #[arg(long, default_value = "lt-fanout")]
    pub channel: String,
    /// Keep-alive connections for `--via rest` and `--via pusher`.
    #[arg(long, default_value_t = 8)]
    pub rest_connections: u32,
    /// How receivers connect.
    #[command(flatten)]
    pub receivers: ReceiverArgs,
    /// What is measured.
    #[command(flatten)]
    pub measure: MeasureArgs,
}

/// Runs the fan-out scenario.
pub fn run(args: FanoutArgs) -> Result<ExitCode, String> {
    let messages = args.measure.message_count(args.messages, args.rate)?;
    let target = WsTarget::parse(&args.receivers.url).map_err(|e| e.to_string())?;
    let (channel, rate) = (args.channel.clone(), args.rate as f64);
    if (args.via == Via::Pusher) != args.receivers.pusher_app.is_some() {
        return Err(
            "--via pusher goes with --pusher-app, and --pusher-app with --via pusher".into(),
        );
    }
    let publisher: Publisher = match args.via {
        Via::Ws => {
            let user = format!("{}pub", args.receivers.user_prefix);
            Publisher::Parent(Box::new(move |held, progress| {
                let p = publisher::publish_over_websocket(
                    &target, &user, &channel, messages, rate, &progress,
                )
                .map_err(|e| format!("publisher: {e}"))?;
                let expected = p.ok * held;
                Ok((p, expected))
            }))
        }
        Via::Rest => {
            let connections = args.rest_connections;
            let body: Arc<BodyWriter> = Arc::new(move |i, stamp_ns, out: &mut Vec<u8>| {
                out.extend_from_slice(b"{\"channels\":[\"");
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(b"\"],\"type\":\"load\",\"message\":\"fanout ");
                stamp::write_u64(out, i);
                out.extend_from_slice(b"\",\"data\":");
                stamp::write_stamp_object(out, stamp_ns);
                out.push(b'}');
            });
            rest_publisher(
                RestClient::keep_alive(target.addr, connections),
                body,
                messages,
                rate,
            )
        }
        Via::Pusher => {
            let client = RestClient {
                pusher: args.receivers.pusher_app.clone(),
                ..RestClient::keep_alive(target.addr, args.rest_connections)
            };
            let body: Arc<BodyWriter> = Arc::new(move |_, stamp_ns, out: &mut Vec<u8>| {
                pusher::write_event_body(out, &channel, "lt", stamp_ns)
            });
            rest_publisher(client, body, messages, rate)
        }
    };
    let via = format!("{:?}", args.via).to_lowercase();
    let protocol = format!("{:?}", args.receivers.protocol()).to_lowercase();
    delivery::run(
        &args.receivers,
        &args.measure,
        DeliveryRun {
            scenario: "fanout",
            receivers: args.subscribers,
            channel: Some(args.channel.clone()),
            room_size: 0,
            messages,
            rate: args.rate,
            publisher,
            params: vec![
                ("via", json!(via)),
                ("protocol", json!(protocol)),
                ("subscribers", json!(args.subscribers)),
                ("messages", json!(messages)),
                ("rate", json!(args.rate)),
                ("soak_s", json!(args.measure.soak_s)),
            ],
        },
    )
}

/// A publisher of `messages` REST requests at `rate` through `client`, each message expected at every
/// receiver held.
fn rest_publisher(
    client: RestClient,
    body: Arc<BodyWriter>,
    messages: u64,
    rate: f64,
) -> Publisher {
    Publisher::Parent(Box::new(move |held, progress| {
        let p = publisher::publish_over_rest(&client, messages, rate, body, progress)
            .map_err(|e| format!("publisher: {e}"))?;
        let expected = p.ok * held;
        Ok((p, expected))
    }))
}
