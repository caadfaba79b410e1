//! `loadtest chat`: clients publishing to each other through channels. C clients are grouped in rooms
//! of `--room-size` (connection `i` joins channel `{channel}-{i / room_size}`); together they publish
//! M messages at a total rate, round-robin over the clients, each to its own room, and every other
//! member of the room should receive it (the server does not echo a publish to its sender). The
//! publishing happens in the worker processes, from the same connections that receive.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::scenario::delivery::{self, DeliveryRun, MeasureArgs, Publisher};
use crate::scenario::receivers::ReceiverArgs;

/// Options of `loadtest chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Clients, each its own user.
    #[arg(long, default_value_t = 1_000)]
    pub clients: u64,
    /// Clients per room (channel).
    #[arg(long, default_value_t = 10)]
    pub room_size: u64,
    /// Messages published in all.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Messages per second over all clients (open-loop).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Prefix of the room channels.
    #[arg(long, default_value = "lt-chat")]
    pub channel: String,
    /// How clients connect.
    #[command(flatten)]
    pub receivers: ReceiverArgs,
    /// What is measured.
    #[command(flatten)]
    pub measure: MeasureArgs,
}

/// Runs the chat scenario.
pub fn run(args: ChatArgs) -> Result<ExitCode, String> {
    if args.room_size < 2 {
        return Err("--room-size must be at least 2 (a publish reaches the other members)".into());
    }
    if args.rate == 0 {
        return Err("--rate must be at least 1".into());
    }
    let messages = args.measure.message_count(args.messages, args.rate)?;
    delivery::run(
        &args.receivers,
        &args.measure,
        DeliveryRun {
            scenario: "chat",
            receivers: args.clients,
            channel: Some(args.channel.clone()),
            room_size: args.room_size,
            messages,
            rate: args.rate,
            publisher: Publisher::Workers { count: messages },
            params: vec![
                ("clients", json!(args.clients)),
                ("room_size", json!(args.room_size)),
                ("messages", json!(messages)),
                ("rate", json!(args.rate)),
                ("soak_s", json!(args.measure.soak_s)),
            ],
        },
    )
}
