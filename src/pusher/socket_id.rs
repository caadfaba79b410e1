//! Socket ids: `"<node>.<connection>"`, both decimal, as the protocol wants them (`\d+\.\d+`).
//!
//! `<node>` is a random number drawn once per process, so ids differ across nodes; `<connection>`
//! packs the connection's sequence number on its shard, the shard and the connection's hub slot, so
//! ids differ on one node and whoever holds one (an HTTP API call's `socket_id` exclusion, on any
//! node) can tell which shard's connection it names without a lookup table.

use std::sync::OnceLock;

/// A decoded socket id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketId {
    /// The node's random number.
    pub node: u32,
    /// The shard the connection lives on.
    pub shard: u16,
    /// The connection's slot in its shard's hub.
    pub slot: u32,
    /// The connection's sequence number on its shard (slots are reused, sequence numbers are not).
    pub seq: u64,
}

/// This process's node number: random, drawn on first use.
pub fn node_number() -> u32 {
    static NODE: OnceLock<u32> = OnceLock::new();
    *NODE.get_or_init(|| {
        // A v7 UUID's last bytes are random; the top bit clear keeps ids short of u32's edge.
        let bytes = uuid::Uuid::now_v7().into_bytes();
        u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) & 0x7fff_ffff
    })
}

impl SocketId {
    /// The id of a connection of this node.
    pub fn local(shard: usize, slot: u32, seq: u64) -> SocketId {
        SocketId {
            node: node_number(),
            shard: shard as u16,
            slot,
            seq,
        }
    }

    /// The id as clients see it.
    pub fn render(&self) -> String {
        let connection =
            (u128::from(self.seq) << 48) | (u128::from(self.shard) << 32) | u128::from(self.slot);
        format!("{}.{connection}", self.node)
    }

    /// Reads an id; `None` when it is not of this form.
    pub fn parse(text: &str) -> Option<SocketId> {
        let (node, connection) = text.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(node) || !digits(connection) {
            return None;
        }
        let connection: u128 = connection.parse().ok()?;
        Some(SocketId {
            node: node.parse().ok()?,
            shard: (connection >> 32) as u16,
            slot: connection as u32,
            seq: u64::try_from(connection >> 48).ok()?,
        })
    }

    /// Whether the id names a connection of this node.
    pub fn is_local(&self) -> bool {
        self.node == node_number()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_id_reads_back_and_has_the_protocols_form() {
        let id = SocketId::local(3, 17, 123_456);
        let text = id.render();
        let (a, b) = text.split_once('.').unwrap();
        assert!(
            a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()),
            "{text}"
        );
        assert_eq!(SocketId::parse(&text), Some(id));
        assert!(id.is_local());
        assert_ne!(SocketId::local(3, 17, 123_457).render(), text);
        assert_eq!(SocketId::parse("1.x"), None);
        assert_eq!(SocketId::parse("12"), None);
        assert_eq!(SocketId::parse("-1.2"), None);
    }
}
