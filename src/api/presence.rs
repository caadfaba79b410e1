//! `GET /api/v1/channels/:channel/presence`: who is on a presence channel, across nodes.

use crate::api::ApiContext;
use crate::http::response::Response;
use crate::model::{validate_channel_list, write_json_str, write_json_str_array};
use crate::presence::is_presence_channel;

/// `GET /api/v1/channels/:channel/presence`: `{"channel","users":[…],"user_count":N}`, the users
/// sorted. A channel that is not a presence channel is `400 invalid_field`: its subscribers are not
/// tracked, so an empty list would be a wrong answer.
pub async fn members(ctx: &ApiContext<'_>, channel: String) -> Response {
    if let Err(e) = validate_channel_list("channel", std::slice::from_ref(&channel)) {
        return Response::error(400, "invalid_field", &e.message);
    }
    if !is_presence_channel(&channel) {
        return Response::error(
            400,
            "invalid_field",
            "channel must be a presence channel (a name starting with presence-)",
        );
    }
    let users: Vec<String> = ctx
        .fanout
        .presence_members(&channel)
        .await
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    let mut body = Vec::with_capacity(64 + channel.len() + users.len() * 16);
    body.extend_from_slice(b"{\"channel\":");
    write_json_str(&mut body, &channel);
    body.extend_from_slice(b",\"users\":");
    write_json_str_array(&mut body, &users);
    body.extend_from_slice(format!(",\"user_count\":{}}}", users.len()).as_bytes());
    Response::json(200, body)
}
