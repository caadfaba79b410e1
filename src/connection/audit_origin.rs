//! What the audit log (`crate::audit`) needs from a connection: the peer's address, and who the
//! events of a live WebSocket session come from. Kept apart so the session and the HTTP loop each
//! record an event in one line.

use std::net::IpAddr;

use uuid::Uuid;

use crate::audit::{Credential, Event, Origin};
use crate::shard::socket::Connection;

/// The peer's address, asked of the socket only while the audit log is on (nothing else needs it
/// after admission).
pub(crate) fn peer_ip(conn: &Connection) -> Option<IpAddr> {
    if !conn.shard.auth.audit().is_on() {
        return None;
    }
    conn.stream.peer_addr().ok().map(|a| a.ip())
}

/// The origin of an event on the WebSocket session of `user`; `jwt`: the session was opened with a
/// token, whose `sub` is `user`.
pub(crate) fn session_origin(conn: &Connection, user: &str, jwt: bool) -> Box<Origin> {
    let credential = if jwt {
        Credential::Jwt(user.to_owned())
    } else {
        Credential::None
    };
    Origin::websocket(credential, peer_ip(conn))
}

/// A `read` action marked notification `id` of `user` read.
pub(crate) fn read(conn: &Connection, user: &str, jwt: bool, id: Uuid) {
    conn.shard.auth.audit().emit(|| Event::Read {
        id,
        user_id: user.to_owned(),
        by: session_origin(conn, user, jwt),
    });
}

/// A session went over `RATE_LIMIT_WS` (recorded once per streak of refused messages, when the
/// client is told).
pub(crate) fn rate_limited(conn: &Connection, user: &str, jwt: bool) {
    conn.shard.auth.audit().emit(|| Event::RateLimited {
        limit: "ws_messages",
        by: session_origin(conn, user, jwt),
    });
}
