//! Criterion micro-benchmarks of the hot paths (issue 6, item 3): what every request, frame and delivery
//! costs in CPU on one core, with no socket and no executor in the way.
//!
//! Groups (see `bench/README.md` for the results table):
//! - `http_parse`: `http::request::parse_head` on a producer's send, a small GET, and 16 pipelined sends;
//! - `ws_frame`: `ws::codec::Decoder::decode` of client frames, `encode_text`, `write_text_header`;
//! - `notification_json`: the notification object encoded by hand (`Notification::to_json`), by
//!   serde_json and by simd-json from an equivalent `#[derive(Serialize)]` struct; a send body decoded into
//!   `SendInput` by simd-json and by serde_json;
//! - `routing`: `Delivery::of_notification` and `Hub::for_each_target` over 10,000 local connections.
//!
//! Run with `cargo bench --bench hot_paths` (a filter such as `-- routing` runs one group). Runs are kept
//! short (2 s of measurement per benchmark) because the build machine has two shared cores.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use notification_service::delivery::frame::write_text_header;
use notification_service::delivery::Delivery;
use notification_service::http::request::{parse_head, Limits, Parsed};
use notification_service::model::{format_time, Millis, Notification, SendInput};
use notification_service::shard::hub::{ConnKind, Hub};
use notification_service::ws::codec::{encode_text, Decoder, Incoming};

/// The server's allocator (src/main.rs), so allocation costs here are the ones the server pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The API's default WebSocket message limit (64 KiB).
const MAX_MESSAGE: usize = 64 * 1024;

/// Connections on the shard in the routing benchmarks.
const CONNECTIONS: u32 = 10_000;

/// A fixed creation time: 2024-01-29T10:30:00.123Z.
const CREATED_AT: Millis = 1_706_524_200_123;

// ---------------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------------

/// A typical send body (~330 bytes): user, two channels, a `data` object with five keys. The keys of
/// `data` are in sorted order so that serde_json's `Value` (a BTreeMap) re-encodes them byte for byte.
const SEND_BODY: &str = concat!(
    r#"{"user_id":"user-12345","type":"order","title":"Your order has shipped","#,
    r#""message":"Order #A-10293 left our warehouse this morning and should arrive on Thursday between 9 and 12.","#,
    r#""channels":["orders","alerts"],"#,
    r#""data":{"action_url":"https://shop.example/orders/A-10293","amount":42.5,"currency":"EUR","order_id":10293,"priority":"high"}}"#
);

/// The head of a typical `POST /api/v1/notifications/send` from a producer: 8 header fields.
fn send_head() -> String {
    format!(
        "POST /api/v1/notifications/send HTTP/1.1\r\n\
         Host: notifications.internal:8080\r\n\
         User-Agent: GuzzleHttp/7 curl/8.5.0 PHP/8.3.4\r\n\
         Accept: application/json\r\n\
         Content-Type: application/json\r\n\
         Authorization: Bearer 6f1d0c3a9b2e4f5d8a7c6b5e4d3c2b1a\r\n\
         X-Request-Id: 0190a2b4-7c3e-7d2f-9a1b-3c4d5e6f7a8b\r\n\
         Accept-Encoding: gzip, deflate\r\n\
         Content-Length: {}\r\n\r\n",
        SEND_BODY.len()
    )
}

/// A small GET (unread count), as a dashboard polls it.
const SMALL_GET: &str = "GET /api/v1/notifications/user-12345/unread-count HTTP/1.1\r\n\
                         Host: notifications.internal:8080\r\n\
                         Accept: */*\r\n\r\n";

/// 16 sends, head and body each, back to back in one buffer (a pipelining client, or a burst read at once).
fn pipelined_sends(count: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    for _ in 0..count {
        buf.extend_from_slice(send_head().as_bytes());
        buf.extend_from_slice(SEND_BODY.as_bytes());
    }
    buf
}

/// Masking key of the client frames. Every byte is below 0x80, so an ASCII payload stays ASCII when
/// masked: the decoder unmasks in place, and decoding the same buffer again masks it back, so the benchmark
/// can decode one buffer over and over (alternately masked and unmasked, both valid UTF-8) with no copy.
const MASK: [u8; 4] = [0x1b, 0x2c, 0x3d, 0x4e];

/// One masked client frame (`opcode` with FIN as given) carrying `payload`.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// An ASCII JSON text of exactly `len` bytes, like a client's `publish` action.
fn json_text(len: usize) -> Vec<u8> {
    let head = br#"{"action":"publish","channel":"room-42","data":{"text":""#;
    let tail = br#""}}"#;
    let mut out = head.to_vec();
    out.resize(len - tail.len(), b'x');
    out.extend_from_slice(tail);
    assert_eq!(out.len(), len);
    out
}

/// The stored notification behind [`SEND_BODY`], as the store thread hands it to the bus.
fn notification() -> Notification {
    let input: SendInput = serde_json::from_str(SEND_BODY).expect("fixture parses");
    let new = input.validate().expect("fixture is valid");
    let id = Uuid::parse_str("0190a2b4-7c3e-7d2f-9a1b-3c4d5e6f7a8b").expect("fixture id");
    new.into_notification(id, CREATED_AT)
}

/// The same notification object as `Notification::write_json` writes, as the `#[derive(Serialize)]` struct
/// a serde-based server would keep: owned fields, `data` as a parsed `serde_json::Value`, times formatted
/// at serialization with the same `format_time` the hand-written writer uses.
#[derive(Serialize)]
struct NotificationDoc {
    #[serde(serialize_with = "ser_uuid")]
    id: Uuid,
    #[serde(rename = "type")]
    kind: String,
    title: String,
    message: String,
    user_id: Option<String>,
    channels: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    broadcast: bool,
    data: serde_json::Value,
    #[serde(serialize_with = "ser_time")]
    timestamp: Millis,
    read: bool,
    #[serde(serialize_with = "ser_opt_time")]
    read_at: Option<Millis>,
    #[serde(serialize_with = "ser_opt_time")]
    delivered_at: Option<Millis>,
    #[serde(serialize_with = "ser_opt_time")]
    seen_at: Option<Millis>,
    #[serde(serialize_with = "ser_opt_time")]
    scheduled_at: Option<Millis>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn ser_uuid<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = Uuid::encode_buffer();
    s.serialize_str(id.hyphenated().encode_lower(&mut buf))
}

fn ser_time<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*ms))
}

fn ser_opt_time<S: Serializer>(ms: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_time(*ms)),
        None => s.serialize_none(),
    }
}

impl NotificationDoc {
    fn of(n: &Notification) -> NotificationDoc {
        NotificationDoc {
            id: n.id,
            kind: n.kind.clone(),
            title: n.title.clone(),
            message: n.message.clone(),
            user_id: n.user_id.clone(),
            channels: n.channels.clone(),
            broadcast: n.broadcast,
            data: serde_json::from_str(&n.data).expect("data is JSON"),
            timestamp: n.created_at,
            read: n.read_at.is_some(),
            read_at: n.read_at,
            delivered_at: n.delivered_at,
            seen_at: n.seen_at,
            scheduled_at: n.scheduled_at,
        }
    }
}

/// Criterion settings for a shared 2-core machine: short runs, few samples.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .without_plots()
}

// ---------------------------------------------------------------------------------------------------
// http_parse
// ---------------------------------------------------------------------------------------------------

fn http_parse(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("http_parse");

    let send = send_head();
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_head_8_headers", |b| {
        b.iter(|| parse_head(black_box(send.as_bytes()), &limits))
    });
    group.bench_function("small_get", |b| {
        b.iter(|| parse_head(black_box(SMALL_GET.as_bytes()), &limits))
    });

    const PIPELINED: usize = 16;
    let buf = pipelined_sends(PIPELINED);
    group.throughput(Throughput::Elements(PIPELINED as u64));
    group.bench_function("pipelined_16_sends", |b| {
        b.iter(|| {
            let buf = black_box(buf.as_slice());
            let mut at = 0;
            let mut requests = 0;
            while at < buf.len() {
                match parse_head(&buf[at..], &limits) {
                    Ok(Parsed::Complete { head, head_len }) => {
                        at += head_len + head.content_length;
                        requests += 1;
                    }
                    other => panic!("pipelined request {requests} did not parse: {other:?}"),
                }
            }
            assert_eq!(requests, PIPELINED);
            requests
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------------
// ws_frame
// ---------------------------------------------------------------------------------------------------

/// Decodes every frame of `buf`, checking that exactly `messages` text messages came out.
fn decode_all(buf: &mut [u8], messages: usize) -> usize {
    let mut decoder = Decoder::new();
    let mut seen = 0;
    let mut bytes = 0;
    let consumed = decoder
        .decode(buf, MAX_MESSAGE, |m| {
            if let Incoming::Text(text) = m {
                seen += 1;
                bytes += black_box(text).len();
            }
        })
        .expect("valid frames");
    assert_eq!((consumed, seen), (buf.len(), messages));
    bytes
}

fn ws_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_frame");
    group.throughput(Throughput::Elements(1));

    let mut single = client_frame(true, 0x1, &json_text(200));
    group.bench_function("decode_masked_text_200B", |b| {
        b.iter(|| decode_all(black_box(&mut single), 1))
    });

    let text = json_text(600);
    let mut fragmented = client_frame(false, 0x1, &text[..200]);
    fragmented.extend(client_frame(false, 0x0, &text[200..400]));
    fragmented.extend(client_frame(true, 0x0, &text[400..]));
    group.bench_function("decode_3_fragments_600B", |b| {
        b.iter(|| decode_all(black_box(&mut fragmented), 1))
    });

    let payload = json_text(300);
    group.bench_function("encode_text_300B", |b| {
        b.iter(|| encode_text(black_box(&payload)))
    });

    let mut out = Vec::with_capacity(16);
    group.bench_function("write_text_header", |b| {
        b.iter(|| {
            out.clear();
            write_text_header(black_box(300), &mut out);
            out.len()
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------------
// notification_json
// ---------------------------------------------------------------------------------------------------

fn notification_json(c: &mut Criterion) {
    let n = notification();
    let doc = NotificationDoc::of(&n);

    // The three encoders must write the same document, or the comparison means nothing.
    let hand = n.to_json();
    let serde = serde_json::to_vec(&doc).expect("serde_json encodes");
    let simd = simd_json::serde::to_vec(&doc).expect("simd-json encodes");
    assert_eq!(
        String::from_utf8_lossy(&serde),
        String::from_utf8_lossy(&hand)
    );
    assert_eq!(
        String::from_utf8_lossy(&simd),
        String::from_utf8_lossy(&hand)
    );

    let mut group = c.benchmark_group("notification_json");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode/hand_written", |b| {
        b.iter(|| black_box(&n).to_json())
    });
    group.bench_function("encode/serde_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&doc)).expect("encodes"))
    });
    group.bench_function("encode/simd_json", |b| {
        b.iter(|| simd_json::serde::to_vec(black_box(&doc)).expect("encodes"))
    });
    // The derive struct's `data` alone: what walking a `serde_json::Value` costs, where the hand-written
    // writer copies the producer's text.
    group.bench_function("encode/serde_json_data_only", |b| {
        b.iter(|| serde_json::to_vec(black_box(&doc.data)).expect("encodes"))
    });
    // Part of all three encoders: `timestamp` is formatted once per encoding.
    group.bench_function("encode/format_time_only", |b| {
        b.iter(|| format_time(black_box(CREATED_AT)))
    });

    // Decoding a send body. simd-json parses in place, so it gets a fresh copy of the body each time
    // (the copy is made outside the timed section); in the server it parses the read buffer directly.
    let body = SEND_BODY.as_bytes().to_vec();
    group.bench_function("decode_send/simd_json", |b| {
        b.iter_batched_ref(
            || body.clone(),
            |buf| simd_json::serde::from_slice::<SendInput>(buf).expect("decodes"),
            BatchSize::SmallInput,
        )
    });
    let mut buffers = simd_json::Buffers::new(body.len());
    group.bench_function("decode_send/simd_json_reused_buffers", |b| {
        b.iter_batched_ref(
            || body.clone(),
            |buf| {
                simd_json::serde::from_slice_with_buffers::<SendInput>(buf, &mut buffers)
                    .expect("decodes")
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decode_send/serde_json", |b| {
        b.iter(|| serde_json::from_slice::<SendInput>(black_box(&body)).expect("decodes"))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------------
// routing
// ---------------------------------------------------------------------------------------------------

/// A hub holding `CONNECTIONS` fake WebSocket connections of distinct users, all subscribed to `ch`.
fn hub_one_channel() -> Hub {
    let mut hub = Hub::new();
    for i in 0..CONNECTIONS {
        let id = hub.add(-1);
        hub.upgrade(id, &format!("user-{i}"), ConnKind::WebSocket);
        hub.subscribe(id, "ch", 10).expect("subscribes");
    }
    hub
}

/// A hub of `CONNECTIONS` users with one connection each, plus a second connection for `user-42`.
fn hub_many_users() -> Hub {
    let mut hub = Hub::new();
    for i in 0..CONNECTIONS {
        let id = hub.add(-1);
        hub.upgrade(id, &format!("user-{i}"), ConnKind::WebSocket);
    }
    let id = hub.add(-1);
    hub.upgrade(id, "user-42", ConnKind::WebSocket);
    hub
}

/// A notification to `user` and `channels`, with the fixture's text and data.
fn notification_to(user: Option<&str>, channels: &[&str]) -> Notification {
    let mut n = notification();
    n.user_id = user.map(str::to_owned);
    n.channels = channels.iter().map(|c| c.to_string()).collect();
    n
}

/// Runs one delivery through the hub and returns how many connections it reached.
fn route(hub: &mut Hub, delivery: &Delivery) -> usize {
    let mut count = 0;
    hub.for_each_target(delivery, None, |id, _, frame| {
        black_box((id, frame));
        count += 1;
    });
    count
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing");

    // Encoding the frames once per notification (plain + one per channel), which routing then shares.
    // The notification is shared with the store thread's batch (an `Arc`), as in the server.
    let two_channels = Arc::new(notification());
    group.throughput(Throughput::Elements(1));
    group.bench_function("of_notification_user_2_channels", |b| {
        b.iter(|| Delivery::of_notification(black_box(two_channels.clone())))
    });

    let mut hub = hub_one_channel();
    let to_channel = Delivery::of_notification(Arc::new(notification_to(None, &["ch"])));
    assert_eq!(route(&mut hub, &to_channel), CONNECTIONS as usize);
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("channel_10k_subscribers", |b| {
        b.iter(|| route(&mut hub, black_box(&to_channel)))
    });

    let mut hub = hub_many_users();
    let to_user = Delivery::of_notification(Arc::new(notification_to(Some("user-42"), &[])));
    assert_eq!(route(&mut hub, &to_user), 2);
    group.throughput(Throughput::Elements(2));
    group.bench_function("user_2_conns_among_10k_users", |b| {
        b.iter(|| route(&mut hub, black_box(&to_user)))
    });

    // The common case on a multi-shard node: every shard gets every delivery, most hold no target.
    let to_absent =
        Delivery::of_notification(Arc::new(notification_to(Some("user-absent"), &["nobody"])));
    assert_eq!(route(&mut hub, &to_absent), 0);
    group.throughput(Throughput::Elements(1));
    group.bench_function("miss_user_and_channel_not_on_shard", |b| {
        b.iter(|| route(&mut hub, black_box(&to_absent)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = http_parse, ws_frame, notification_json, routing
}
criterion_main!(benches);
