//! Hostile clients: slowloris, clients that never read, request and message floods, and too many
//! connections per user or per node. Each is refused the documented way while others are still served.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::auth::{request_with, token, ws_with_token, SECRET};
use common::{parse_responses, TestServer, WsClient, WAIT};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tungstenite::Message;

/// A connection to `server` from the local address `source` (any of 127.0.0.0/8 works on loopback).
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// One `GET /health` over `stream`; the status.
fn health_over(mut stream: TcpStream) -> u16 {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_responses(&raw).remove(0).status
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// A slowloris client: starts a request and sends one more header byte every `every`, until the
/// server answers; returns the answer.
fn trickle(mut stream: TcpStream, every: Duration) -> Vec<u8> {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .unwrap();
    stream.set_read_timeout(Some(every)).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stream.write_all(b"a").is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    raw
}

/// The first text frame as JSON, or the close code if the server closed first.
fn first_frame(client: &mut WsClient) -> Result<serde_json::Value, Option<u16>> {
    loop {
        match client.ws.read() {
            Ok(Message::Text(t)) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(frame)) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(_) => continue,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

#[test]
fn slowloris_cannot_exhaust_the_server() {
    let server =
        TestServer::start_with(&[("MAX_CONNECTIONS_PER_IP", "6"), ("HEADER_TIMEOUT_S", "2")]);
    let started = Instant::now();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let stream = connect_from("127.0.0.1", server.addr);
            std::thread::spawn(move || trickle(stream, Duration::from_millis(300)))
        })
        .collect();
    // Let every shard accept its share (well within the 2 s header timeout).
    std::thread::sleep(Duration::from_millis(500));

    // The attacker's address is at its cap: a 503, and the slot is not taken.
    let mut over = connect_from("127.0.0.1", server.addr);
    let mut raw = Vec::new();
    let _ = over.read_to_end(&mut raw);
    let refused = parse_responses(&raw).remove(0);
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_code(), "too_many_connections");

    // Everyone else is still served, at once.
    assert_eq!(health_over(connect_from("127.0.0.2", server.addr)), 200);
    assert_eq!(health_over(connect_from("127.0.0.3", server.addr)), 200);

    // The header timeout ends each slow request with 408, however often it sends a byte.
    for t in slow {
        let raw = t.join().unwrap();
        let r = parse_responses(&raw);
        assert_eq!(r.first().map(|r| r.status), Some(408), "{raw:?}");
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    // And their slots are back.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(health_over(connect_from("127.0.0.1", server.addr)), 200);
}

#[test]
fn a_pipelining_client_that_never_reads_is_throttled_not_buffered() {
    let server = TestServer::start_with(&[("HEADER_TIMEOUT_S", "3")]);
    let before = rss_kib(server.pid());
    let mut flood = connect_from("127.0.0.1", server.addr);
    flood.set_nonblocking(true).unwrap();
    // A route answered without the store (404), so answers pile up as fast as the server can make them.
    let request = b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n";
    let chunk: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * 512)
        .collect();
    let mut accepted = 0usize;
    let mut stalled_since: Option<Instant> = None;
    // Write until the server has stopped taking bytes for a second: it reads only as fast as it can
    // answer, and it cannot answer a client that does not read.
    while stalled_since.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
        match flood.write(&chunk) {
            Ok(n) => {
                accepted += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalled_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the server closed the flood early: {e}"),
        }
        assert!(
            accepted < 256 << 20,
            "the server took 256 MiB of requests without their answers being read"
        );
    }
    let grown_mib = rss_kib(server.pid()).saturating_sub(before) / 1024;
    // Socket buffers on both sides plus one read buffer: a few MiB, not the flood.
    assert!(grown_mib < 64, "the server grew by {grown_mib} MiB");
    assert_eq!(health_over(connect_from("127.0.0.2", server.addr)), 200);

    // The stuck answers time out (the write timeout is HEADER_TIMEOUT_S) and the server hangs up.
    flood.set_nonblocking(false).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let mut sink = vec![0u8; 1 << 20];
    let deadline = Instant::now() + WAIT;
    loop {
        match flood.read(&mut sink) {
            Ok(0) => break,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the stuck connection open")
            }
            Err(_) => break, // reset: it closed with our unread requests still queued
            Ok(_) => assert!(Instant::now() < deadline, "the server never hung up"),
        }
    }
}

#[test]
fn api_requests_over_the_key_rate_get_429_with_retry_after() {
    let server = TestServer::start_with(&[
        ("API_KEY", "producer-a,producer-b"),
        ("RATE_LIMIT_API", "1"),
        ("RATE_LIMIT_API_BURST", "3"),
    ]);
    let get = |key: &str| {
        request_with(
            &server,
            "GET",
            "/api/v1/notifications/user/u1",
            None,
            &[("X-API-Key", key)],
        )
    };
    let started = Instant::now();
    let statuses: Vec<u16> = (0..8).map(|_| get("producer-a").status).collect();
    let elapsed_s = started.elapsed().as_secs() as usize;
    assert_eq!(&statuses[..3], &[200, 200, 200], "the burst passes");
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!(passed <= 3 + elapsed_s + 1, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");

    let limited = get("producer-a");
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error_code(), "rate_limited");
    let retry: u64 = limited.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    // Another key has its own bucket; /health is never limited.
    assert_eq!(get("producer-b").status, 200);
    assert_eq!(server.get("/health").status, 200);
    // After Retry-After, the key works again.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(get("producer-a").status, 200);
}

#[test]
fn a_websocket_flooding_messages_gets_rate_limited_then_1008() {
    let server = TestServer::start_with(&[("RATE_LIMIT_WS", "1"), ("RATE_LIMIT_WS_BURST", "2")]);
    let mut calm = server.ws("user_id=calm");
    let mut flood = server.ws("user_id=flood");
    for _ in 0..10 {
        flood.send_json(json!({"action": "ping"}));
    }
    flood.expect_event("pong");
    flood.expect_event("pong");
    assert_eq!(flood.expect_event("error")["code"], "rate_limited");
    assert_eq!(flood.expect_close(), Some(1008));
    // A connection within its rate is untouched.
    calm.send_json(json!({"action": "ping"}));
    calm.expect_event("pong");
}

#[test]
fn connections_over_the_per_user_cap_close_with_1013() {
    let server =
        TestServer::start_with(&[("JWT_SECRET", SECRET), ("MAX_CONNECTIONS_PER_USER", "2")]);
    let jwt = token("alice", &[]);
    let first = ws_with_token(&server, &jwt, "");
    let _second = ws_with_token(&server, &jwt, "");
    // The third is upgraded (so a browser sees a close code) and closed at once with 1013.
    let (mut third, _) = common::auth::try_ws(&server, &format!("token={jwt}"), &[]).unwrap();
    assert_eq!(third.expect_close(), Some(1013));
    // Another user is not affected; a closed connection gives its slot back.
    let _bob = ws_with_token(&server, &token("bob", &[]), "");
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut again, _) = common::auth::try_ws(&server, &format!("token={jwt}"), &[]).unwrap();
        match first_frame(&mut again) {
            Ok(v) => {
                assert_eq!(v["event"], "connected");
                break;
            }
            Err(code) => {
                assert_eq!(code, Some(1013));
                assert!(Instant::now() < deadline, "the slot never came back");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn connections_over_the_node_cap_get_503_on_every_shard() {
    let server = TestServer::start_with(&[("MAX_CONNECTIONS", "3")]);
    let a = server.ws("user_id=a");
    let _b = server.ws("user_id=b");
    let _c = server.ws("user_id=c");
    // Whichever shard the kernel picks, the node is full.
    for _ in 0..4 {
        let mut raw = Vec::new();
        let _ = server.tcp().read_to_end(&mut raw);
        let r = parse_responses(&raw).remove(0);
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), "too_many_connections");
    }
    drop(a);
    common::wait_until("the slot to come back", WAIT, || {
        server.get("/health").status == 200
    });
}
