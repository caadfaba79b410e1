//! `loadtest targeted`: C receivers, each its own user (`{prefix}0` .. `{prefix}C-1`), and durable
//! REST sends to random users among them at a set rate, open-loop (message `i` is due at
//! `start + i / rate` and stamped with that time, so a stall shows as latency rather than a lower rate).
//! Measures deliveries per second, send-to-deliver latency, and the server's CPU per million
//! deliveries; every 2xx send should make exactly one delivery.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use crate::publisher::{self, BodyWriter, RestClient};
use crate::scenario::delivery::{self, DeliveryRun, MeasureArgs, Publisher};
use crate::scenario::receivers::ReceiverArgs;
use crate::stamp;
use crate::target::WsTarget;

/// Options of `loadtest targeted`.
#[derive(Debug, Clone, Args)]
pub struct TargetedArgs {
    /// Receivers, one user each.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Sends in all.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Sends per second (open-loop); 0 sends as fast as the connections allow (closed-loop).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Keep-alive REST connections sending.
    #[arg(long, default_value_t = 16)]
    pub rest_connections: u32,
    /// How receivers connect.
    #[command(flatten)]
    pub receivers: ReceiverArgs,
    /// What is measured.
    #[command(flatten)]
    pub measure: MeasureArgs,
}

/// The user send `i` goes to: a fixed pseudo-random spread over `users` (a multiplicative hash, so
/// runs are repeatable and consecutive sends hit different users and shards).
pub fn user_of(i: u64, users: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) % users.max(1)
}

/// Runs the targeted scenario.
pub fn run(args: TargetedArgs) -> Result<ExitCode, String> {
    let messages = args.measure.message_count(args.messages, args.rate)?;
    let target = WsTarget::parse(&args.receivers.url).map_err(|e| e.to_string())?;
    let (prefix, users, rate) = (
        args.receivers.user_prefix.clone(),
        args.users,
        args.rate as f64,
    );
    let body: Arc<BodyWriter> = Arc::new(move |i, stamp_ns, out: &mut Vec<u8>| {
        out.extend_from_slice(b"{\"user_id\":\"");
        out.extend_from_slice(prefix.as_bytes());
        stamp::write_u64(out, user_of(i, users));
        out.extend_from_slice(b"\",\"type\":\"load\",\"message\":\"targeted ");
        stamp::write_u64(out, i);
        out.extend_from_slice(b"\",\"data\":");
        stamp::write_stamp_object(out, stamp_ns);
        out.push(b'}');
    });
    let connections = args.rest_connections;
    let publisher = Publisher::Parent(Box::new(move |_held, progress| {
        let client = RestClient::keep_alive(target.addr, connections);
        let p = publisher::publish_over_rest(&client, messages, rate, body, progress)
            .map_err(|e| format!("publisher: {e}"))?;
        let expected = p.ok;
        Ok((p, expected))
    }));
    delivery::run(
        &args.receivers,
        &args.measure,
        DeliveryRun {
            scenario: "targeted",
            receivers: args.users,
            channel: None,
            room_size: 0,
            messages,
            rate: args.rate,
            publisher,
            params: vec![
                ("users", json!(args.users)),
                ("messages", json!(messages)),
                ("rate", json!(args.rate)),
                ("soak_s", json!(args.measure.soak_s)),
            ],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_spread_over_every_user() {
        let mut hits = [0u32; 10];
        for i in 0..10_000 {
            hits[user_of(i, 10) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
        assert_eq!(user_of(5, 1), 0);
    }
}
