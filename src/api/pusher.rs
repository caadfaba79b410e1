//! The Pusher HTTP API (`/apps/{id}/…`): events for Pusher and native clients, what the shards
//! of every node know of channels (a survey over the bus, `crate::bus::survey`), and the members of presence channels (from the presence registry, every node's).
//!
//! Every request is signed with the app's secret (`crate::pusher::sign::verify_request`), so the
//! node's `API_KEY` does not apply here; an unknown app (or none configured) is 404, a bad or stale
//! signature 401. Events are ephemeral, as in Pusher: one delivery per channel, handed to every shard
//! of this node and, with a Redis bus, to the other nodes; nothing is stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::api::ApiContext;
use crate::bus::survey::sum_shard_counts;
use crate::delivery::inbox::ShardMsg;
use crate::delivery::{Delivery, PusherEvent};
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::json_input::parse_object;
use crate::model::write_json_str;
use crate::presence::is_presence_channel;
use crate::pusher::protocol::{is_valid_channel_name, MAX_EVENT_NAME};
use crate::pusher::sign::verify_request;
use crate::pusher::socket_id::SocketId;
use crate::pusher::PusherApp;

/// How far a request's `auth_timestamp` may be from the server's clock, as Pusher allows.
const TIMESTAMP_WINDOW_S: u64 = 600;

/// What a Pusher route asks for (the app id comes first in every path).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Call {
    /// `POST /apps/{id}/events`.
    Events,
    /// `POST /apps/{id}/batch_events`.
    BatchEvents,
    /// `GET /apps/{id}/channels`.
    Channels,
    /// `GET /apps/{id}/channels/{name}`.
    Channel(String),
    /// `GET /apps/{id}/channels/{name}/users`: a presence channel's members.
    ChannelUsers(String),
    /// `POST /apps/{id}/users/{user}/terminate_connections`.
    TerminateUser(String),
}

/// One event of `events` or of `batch_events`' `batch`.
#[derive(Deserialize)]
struct EventInput {
    name: String,
    /// A string in Pusher's API; any other JSON value is taken as its JSON text.
    data: serde_json::Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
}

#[derive(Deserialize)]
struct BatchInput {
    batch: Vec<EventInput>,
}

fn bad(message: &str) -> Response {
    Response::error(400, "invalid_field", message)
}

/// Answers a Pusher HTTP API call on app `app_id`.
pub(super) async fn handle(
    ctx: &ApiContext<'_>,
    head: &RequestHead,
    body: &mut [u8],
    app_id: &str,
    call: Call,
) -> Response {
    let Some(app) = ctx.config.pusher.by_id(app_id) else {
        return Response::error(
            404,
            "not_found",
            "no Pusher app with this id on this server",
        );
    };
    if let Err(e) = check_signature(app, head, body) {
        return Response::error(401, "unauthorized", &e);
    }
    match call {
        Call::Events => {
            match parse_object::<EventInput>(body, ctx.config.max_json_depth, "the body") {
                Ok(event) => match publish(ctx, vec![event]) {
                    Ok(()) => Response::json(200, b"{}".to_vec()),
                    Err(refusal) => refusal,
                },
                Err(e) => Response::error(400, "invalid_json", &e.0),
            }
        }
        Call::BatchEvents => {
            match parse_object::<BatchInput>(body, ctx.config.max_json_depth, "the body") {
                Ok(input) if input.batch.len() > ctx.config.pusher_max_batch => bad(&format!(
                    "a batch holds at most {} events (PUSHER_MAX_BATCH)",
                    ctx.config.pusher_max_batch
                )),
                Ok(input) => match publish(ctx, input.batch) {
                    Ok(()) => Response::json(200, b"{\"batch\":[]}".to_vec()),
                    Err(refusal) => refusal,
                },
                Err(e) => Response::error(400, "invalid_json", &e.0),
            }
        }
        Call::Channels => {
            let prefix = query_param(head.query(), "filter_by_prefix")
                .map(|p| p.into_owned())
                .unwrap_or_default();
            let info = Info::of(head);
            if info.user_count && !is_presence_channel(&prefix) {
                return bad("info=user_count needs filter_by_prefix=presence-");
            }
            let counts = channel_counts(ctx, prefix, false).await;
            let mut out = b"{\"channels\":{".to_vec();
            for (i, (name, count)) in counts.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(&mut out, name);
                out.extend_from_slice(format!(":{{\"subscription_count\":{count}").as_bytes());
                if info.user_count {
                    let users = ctx.fanout.presence_members(name).await.len();
                    out.extend_from_slice(format!(",\"user_count\":{users}").as_bytes());
                }
                out.push(b'}');
            }
            out.extend_from_slice(b"}}");
            Response::json(200, out)
        }
        Call::Channel(name) => {
            if !is_valid_channel_name(&name, ctx.config.pusher_max_channel_name) {
                return bad("not a valid channel name");
            }
            let info = Info::of(head);
            if info.user_count && !is_presence_channel(&name) {
                return bad("info=user_count is for presence channels only");
            }
            let count: usize = channel_counts(ctx, name.clone(), true).await.values().sum();
            let users = if info.user_count {
                Some(ctx.fanout.presence_members(&name).await.len())
            } else {
                None
            };
            let occupied = count > 0 || users.is_some_and(|u| u > 0);
            let mut out = format!("{{\"occupied\":{occupied},\"subscription_count\":{count}");
            if let Some(users) = users {
                out.push_str(&format!(",\"user_count\":{users}"));
            }
            out.push('}');
            Response::json(200, out.into_bytes())
        }
        Call::ChannelUsers(name) => {
            if !is_valid_channel_name(&name, ctx.config.pusher_max_channel_name) {
                return bad("not a valid channel name");
            }
            if !is_presence_channel(&name) {
                return bad("users are listed for presence channels only (presence-…)");
            }
            let members = ctx.fanout.presence_members(&name).await;
            let mut out = b"{\"users\":[".to_vec();
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"id\":");
                write_json_str(&mut out, &m.user_id);
                out.push(b'}');
            }
            out.extend_from_slice(b"]}");
            Response::json(200, out)
        }
        Call::TerminateUser(user) => {
            ctx.fanout.terminate_user(&user);
            Response::json(200, b"{}".to_vec())
        }
    }
}

/// The attributes a channel query asks for (`info=user_count,subscription_count`). The subscription
/// count is always given; the user count only when asked, since it is read from every node.
struct Info {
    user_count: bool,
}

impl Info {
    fn of(head: &RequestHead) -> Info {
        let info = query_param(head.query(), "info").unwrap_or_default();
        Info {
            user_count: info.split(',').any(|a| a.trim() == "user_count"),
        }
    }
}

/// Checks the request's signed query against `app`, over the body as received.
fn check_signature(app: &PusherApp, head: &RequestHead, body: &[u8]) -> Result<(), String> {
    let now = crate::model::now_millis() / 1000;
    verify_request(
        app,
        head.method.as_str(),
        head.path(),
        head.query(),
        body,
        now.max(0) as u64,
        TIMESTAMP_WINDOW_S,
    )
    .map_err(|e| e.message())
}

/// Validates events and hands them to every shard and node, one delivery per channel. Nothing is
/// sent unless every event is valid.
fn publish(ctx: &ApiContext<'_>, events: Vec<EventInput>) -> Result<(), Response> {
    let config = ctx.config;
    let mut deliveries = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        let at = |what: &str| format!("event {i}: {what}");
        if event.name.is_empty() || event.name.len() > MAX_EVENT_NAME {
            return Err(bad(&at(&format!(
                "name must be 1 to {MAX_EVENT_NAME} bytes"
            ))));
        }
        let channels = match (event.channels, event.channel) {
            (Some(list), None) => list,
            (None, Some(one)) => vec![one],
            _ => {
                return Err(bad(&at(
                    "name the channels in channels (or one in channel)",
                )))
            }
        };
        if channels.is_empty() || channels.len() > config.pusher_max_event_channels {
            return Err(bad(&at(&format!(
                "channels lists 1 to {} channels (PUSHER_MAX_EVENT_CHANNELS)",
                config.pusher_max_event_channels
            ))));
        }
        if let Some(c) = channels
            .iter()
            .find(|c| !is_valid_channel_name(c, config.pusher_max_channel_name))
        {
            return Err(bad(&at(&format!(
                "{c:?} is not a channel name: 1 to {} bytes of A-Z a-z 0-9 _ - = @ , . ;",
                config.pusher_max_channel_name
            ))));
        }
        if let Some(socket) = &event.socket_id {
            if SocketId::parse(socket).is_none() {
                return Err(bad(&at("socket_id is not a socket id (digits.digits)")));
            }
        }
        let text = match event.data {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        if text.len() > config.pusher_max_event_bytes {
            return Err(Response::error(
                413,
                "body_too_large",
                &at(&format!(
                    "data is larger than {} bytes (PUSHER_MAX_EVENT_BYTES)",
                    config.pusher_max_event_bytes
                )),
            ));
        }
        let mut data = Vec::with_capacity(text.len() + 2);
        write_json_str(&mut data, &text);
        let data = String::from_utf8(data).unwrap_or_default();
        for channel in channels {
            deliveries.push(Arc::new(Delivery::of_pusher_event(
                &channel,
                PusherEvent {
                    name: event.name.clone(),
                    data: data.clone(),
                    except_socket: event.socket_id.as_deref().map(Into::into),
                },
            )));
        }
    }
    ctx.fanout.send_pusher_events(None, deliveries);
    Ok(())
}

/// Subscribed connections per channel over every shard of every node, for channels starting with
/// `prefix` (or the one channel `prefix` names, with `exact`): this node's shards and, with a bus,
/// the other live nodes that answer within `SURVEY_TIMEOUT_MS`, asked at the same time.
async fn channel_counts(
    ctx: &ApiContext<'_>,
    prefix: String,
    exact: bool,
) -> BTreeMap<String, usize> {
    let mut replies = Vec::new();
    for shard in 0..ctx.fanout.shard_count() {
        let (reply, answer) = futures_channel::oneshot::channel();
        ctx.fanout.send_to_shard(
            shard,
            ShardMsg::ChannelCounts {
                prefix: prefix.clone(),
                exact,
                reply,
            },
        );
        replies.push(answer);
    }
    let timeout = Duration::from_millis(ctx.config.survey_timeout_ms);
    let (mut counts, others) = futures_util::future::join(
        sum_shard_counts(replies),
        ctx.fanout
            .other_nodes_channel_counts(&prefix, exact, timeout),
    )
    .await;
    for (name, n) in others {
        *counts.entry(name).or_insert(0) += n;
    }
    counts
}
