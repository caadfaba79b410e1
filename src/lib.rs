//! notification-service: a thread-per-core real-time notification server.
//!
//! Producers call the HTTP API to notify a user or a channel; browsers, phones and services hold
//! WebSocket connections and get each notification live. Every notification is stored first: a 2xx means
//! committed, and a client that reconnects replays what it missed. The public contract is `API.md`; the
//! architecture is `docs/architecture.md`.
//!
//! # Layout
//!
//! - [`config`]: every setting, as a CLI flag and an environment variable, validated once.
//! - [`server`]: start-up (listeners, store, shards, signals) and the ordered shutdown.
//! - [`ops`]: the one-off jobs besides serving, `migrate` and `check-config`, on the same settings
//!   and the same store code as start-up.
//! - `connection`: one accepted socket's task, the top of the request path: the admission caps, the
//!   HTTP/1.1 loop (handing requests to [`api`]) and, at `GET /ws` or `GET /app/{key}`, the upgrade to
//!   a session of its kind (`connection::websocket`, the native protocol; `connection::pusher`, the
//!   Pusher Channels protocol; both read their frames through `connection::frames`). The shard's accept loop spawns it per socket.
//! - [`shard`]: one glommio executor per core, with its own `SO_REUSEPORT` listener, connections and
//!   indexes. [`shard::hub`] holds the connections (each of a [`shard::hub::ConnKind`]) and the
//!   user → connections and channel → connections indexes; [`shard::outbound`] writes frames to
//!   sockets and enforces the slow-consumer limit; `shard::socket` is a registered socket's waits and
//!   writes, shared by the HTTP loop and every session kind; `shard::reactor` is the shard's epoll set,
//!   the one place readiness for all its sockets comes from (a single poll in glommio's ring), and
//!   `shard::timeouts` the connections' deadlines, swept by the shard; [`shard::receipts`] notes each
//!   stored notification written to a connection of its user and hands the notes to the store thread
//!   in batches, which records them as `delivered_at` (docs/architecture.md, "Delivery receipts");
//!   `shard::unread` writes the users' newest unread counts (the `unread` event), coalesced per user.
//! - [`delivery`]: what crosses threads on its way to a connection: the [`delivery::Delivery`] and its
//!   frames per encoding, the server text frame ([`delivery::frame`]), and the shard inbox
//!   ([`delivery::inbox`]) through which other threads hand a shard work. Imports only [`model`]
//!   and [`preferences`] (a change of a user's preferences is an inbox message).
//! - [`http`]: the hand-rolled HTTP/1.1 request parser (httparse) and response writer, with limits.
//! - [`ws`]: the WebSocket wire: handshake, frame codec (tungstenite's frame header on our own
//!   buffers) and the JSON protocol of API.md, all pure.
//! - [`api`]: one handler per HTTP route, on an [`api::ApiContext`] (no shard, no socket), and the
//!   monitor page at `/` with its files, embedded from `web/` and `clients/js/` at build time.
//! - [`auth`]: API keys (HTTP), JWTs (WebSocket), rate limits, and the connection caps per node, IP and
//!   user that hold across shards; checked when a connection is accepted, when a request head is
//!   parsed, and at the WebSocket upgrade.
//! - [`store`]: the `Store` handle, the store thread that commits in groups, the reader threads, and the
//!   two backends behind one seam, SQLite (embedded) and PostgreSQL (shared by several nodes);
//!   migrations live in `migrations/`.
//! - [`scheduler`]: when scheduled notifications fire and retention runs, and how long an
//!   `Idempotency-Key` is remembered: the policy the store writer executes at the end of its batches.
//! - [`bus`]: fan-out of committed notifications (and client publishes) to shards, with each frame
//!   encoded once and shared; with `REDIS_URL`, [`bus::redis_bus`] joins nodes through Redis Pub/Sub
//!   (its own thread) over the connections of [`bus::link`] (with `REDIS_CLUSTER`, sharded Pub/Sub on a
//!   Redis Cluster), [`bus::interest`] tracks which shards want which users and channels (for the
//!   Redis subscriptions, and node-wide for routing every delivery to the shards it concerns),
//!   [`bus::wire`] is the envelope on Redis, [`bus::recent`] the ids delivered lately (no duplicates)
//!   and [`bus::peers`] the other nodes' liveness (a node that dies before publishing what it committed
//!   is caught up by the others from the store); [`bus::survey`] asks every node for its Pusher
//!   channel counts (the HTTP API's channel queries).
//! - [`pusher`]: the Pusher Channels protocol 7 and HTTP API, pure: the apps (`PUSHER_APPS`), the
//!   HMAC-SHA256 signatures, the protocol's messages and socket ids. Its session is
//!   `connection::pusher`, its HTTP routes `api::pusher`, its frames `delivery::Encoding::Pusher`.
//! - [`presence`]: who is on each presence channel (`presence-…`), per connection, per user on this
//!   node (across shards, one mutex touched only on presence subscribe, unsubscribe and close) and
//!   across nodes; the native `join`/`leave` events, Pusher's `member_added`/`member_removed` and the
//!   member lists come from it (native and Pusher members share it). The bus carries its changes between nodes
//!   (`bus::presence_sync`).
//! - [`model`]: the notification, its validation and its JSON encoding.
//! - [`preferences`]: per-user preferences (muted types and channels, quiet hours in an IANA time
//!   zone), their validation and JSON, the one rule that decides whether a notification is pushed to
//!   a user's connections, held until quiet hours end, or not pushed, and the node's in-memory copy
//!   of every user's ([`preferences::Registry`]), which shards, the store thread and the bus read.
//! - [`json_depth`]: the nesting bound checked before any client JSON is parsed (a deep `[[[[…` would
//!   otherwise overflow a shard's stack).
//! - [`json_input`]: the parse of client JSON (request bodies, WebSocket messages): escapes checked
//!   before simd-json sees them, and one wording for every error, naming the field and the byte.
//! - [`metrics`]: per-shard counters and histograms summed on read, the node's refusals, the process's
//!   figures, and the Prometheus text writer every part renders its families into. A leaf.
//! - [`audit`]: the audit log (`AUDIT_LOG`): one JSON line per step of a notification's life and per
//!   refused credential or rate limit, handed by any thread to one writer thread through a bounded
//!   queue that never blocks (what overflows is counted). A leaf: only [`model`].
//! - [`tls`]: TLS for the connections the server opens (PostgreSQL, Redis): rustls, trust roots, how a
//!   server's certificate is checked, and the explanation of a refused one. A leaf.
//!
//! # Layers
//!
//! A top-level module imports only modules on lower rows; `tests/architecture.rs` checks that no
//! top-level modules import each other in a cycle and that the rules of docs/architecture.md
//! ("Layers") hold.
//!
//! ```text
//! server       ops
//! connection
//! shard        api
//! bus          auth
//! config       ws          presence
//! store        delivery    json_input   pusher
//! scheduler    audit       preferences
//! model        http        json_depth   metrics   tls
//! ```
//!
//! # One notification's way
//!
//! ```text
//! producer ── POST /api/v1/notifications/send ──► shard N: connection task
//!     http::request::parse_head ─► api::notifications::send ─► model::SendInput::validate
//!     ─► store::Store::insert ══ crossbeam queue ══► store thread: group commit (one
//!        transaction for everything queued), ids assigned in commit order
//!     ─► bus::CommitFanout (CommitListener): delivery::Delivery::of_notification, then one
//!        ShardMsg::Commit per shard holding a targeted connection (bus::interest::NodeInterest;
//!        every shard for a broadcast), with the commit's deliveries and, to shard N, the reply
//!        ══ delivery::inbox ══►
//!        shard M: Hub::for_each_target (user ∪ channels ∪ broadcast, once per connection,
//!        the frame of the connection's kind, encoded once per node by the first shard needing it)
//!        ─► outbound::WriteBatch: the frames of one inbox burst, then one non-blocking
//!           sendmsg(2) per connection for all of its frames (or queue what the socket refuses)
//!     ◄── shard N's pump gives the reply after the deliveries; shard N answers 201 {"id","timestamp"}
//! ```
//!
//! With `REDIS_URL`, `bus::Fanout` also queues the commit for the bus thread, which publishes it to
//! Redis; on the other nodes the bus thread decodes it once and sends it to the inboxes of the shards
//! that hold an interested connection.
//!
//! After each commit that changed users' unread counts (kept per user by the store in the same
//! transaction, migration 4), the store thread reads them back and calls
//! `CommitListener::unread_changed`: `bus::CommitFanout` hands each count to every shard's inbox
//! (in the commit's one message) as a delivery of `delivery::Content::Unread` (and to the bus thread, which publishes a `U` envelope on
//! the user's topic); a shard keeps the newest version per user and writes it every
//! `UNREAD_COALESCE_MS` (`shard::unread`).
//!
//! Client publishes skip the store: `connection::websocket` puts the shared delivery in its own shard's
//! inbox (marked with the sender, who is skipped) and in the inboxes of the other shards that hold a
//! subscriber of the channel (the node's `bus::interest::NodeInterest`, which each shard's hub updates
//! on a channel's first subscribe and last unsubscribe before answering the client), so publishes are
//! batched like the rest and wake no shard without a subscriber.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod config;
pub(crate) mod connection;
pub mod delivery;
pub mod http;
pub mod json_depth;
pub mod json_input;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod preferences;
pub mod presence;
pub mod pusher;
pub mod scheduler;
pub mod server;
pub mod shard;
pub mod store;
pub mod tls;
pub mod ws;
