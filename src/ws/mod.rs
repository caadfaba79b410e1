//! WebSocket: the upgrade handshake, frame codec, the JSON protocol of API.md, and the per-connection
//! session that ties them to a shard.
//!
//! `codec`, `handshake` and `protocol` are pure (bytes in, values out) so they are tested and fuzzed
//! alone; `session` is the only part that touches sockets, the hub and the store.

pub mod codec;
pub mod handshake;
pub mod protocol;
pub(crate) mod session;
