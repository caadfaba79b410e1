//! The WebSocket wire: the upgrade handshake, the frame codec and the JSON protocol of API.md.
//!
//! All three are pure (bytes in, values out), so they are tested and fuzzed alone, and they sit below the
//! shard: its heartbeat sends [`codec`]'s ping and its close requests carry [`codec::close_code`]s. The
//! session that ties them to a socket, the hub and the store is a connection kind, in
//! `connection::websocket`.

pub mod codec;
pub mod handshake;
pub mod protocol;
