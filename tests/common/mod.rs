//! Test harness: starts the real `notification-service` binary on 127.0.0.1:0 with its own SQLite file,
//! and talks to it over real sockets (plain HTTP/1.1 and tungstenite WebSocket clients).
#![allow(dead_code)]

pub mod auth;
pub mod node;
pub mod pg;
pub mod prometheus;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod sse;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether CI runs the tests (`CI=true`): then a missing tool or service fails a test instead of
/// skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Fails under CI, else notes the skip of a `kind` test (Redis, TLS…) for `what` is missing; returns
/// `None` for the caller to return early.
pub fn unavailable<T>(kind: &str, what: &str) -> Option<T> {
    if in_ci() {
        panic!("{what}, and CI=true requires it");
    }
    eprintln!("note: skipping a {kind} test: {what}");
    None
}

/// A TCP port nothing listens on right now (for a private server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The last `lines` lines of a tool's stdout and stderr, for a failure message.
pub fn output_tail(out: &std::process::Output, lines: usize) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// How long any single expectation may wait before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// How often [`wait_for`] and [`wait_until`] look again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it gives `Some`, and returns that; fails the test, naming `what`, when
/// `within` has passed. The one deadline loop of the test suite.
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `check` until it holds; fails the test, naming `what`, when `within` has passed.
pub fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    wait_for(what, within, || check().then_some(()))
}

/// A running server process, killed when dropped.
pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error.code` of an API error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Asserts an API error (`name` labels the case): the status, `error.code`, and a non-empty
    /// `error.message`.
    pub fn assert_error(&self, name: &str, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.error_code(), code, "{name}");
        assert!(
            self.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
}

impl TestServer {
    /// A server with two shards and default settings.
    pub fn start() -> TestServer {
        TestServer::start_with(&[])
    }

    /// A server with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        TestServer::start_in(dir, env)
    }

    /// A server on the database of `dir` (to restart on the same data).
    pub fn start_in(dir: Arc<tempfile::TempDir>, env: &[(&str, &str)]) -> TestServer {
        let db = format!("sqlite://{}/notifications.db", dir.path().display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_notification-service"))
            .env_clear()
            .env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("SHARDS", "2")
            .env("DATABASE_URL", db)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(stderr) as Box<dyn Read + Send>, None),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(tx) = &tx {
                        if line.contains("listening") {
                            // Text logs say `addr=127.0.0.1:1234`; JSON logs `"addr":"127.0.0.1:1234"`.
                            let addr = line
                                .split("addr=")
                                .nth(1)
                                .and_then(|a| a.split_whitespace().next())
                                .or_else(|| {
                                    line.split("\"addr\":\"")
                                        .nth(1)
                                        .and_then(|a| a.split('"').next())
                                });
                            if let Some(addr) = addr {
                                let _ = tx.send(addr.to_owned());
                            }
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(WAIT) {
            Ok(addr) => addr.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start: {:#?}", log.lock().unwrap());
            }
        };
        TestServer {
            child: Some(child),
            addr,
            dir,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for the process to exit by itself (after a signal the test sent).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + WAIT * 2;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                // Killed first, so that a failing test leaves no process behind.
                let _ = child.kill();
                panic!(
                    "server did not exit after SIGTERM: {:#?}",
                    self.log.lock().unwrap()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// One value of `/metrics` (a counter or gauge without labels).
    pub fn metric(&self, name: &str) -> u64 {
        let metrics = String::from_utf8(self.get("/metrics").body).unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
            .parse()
            .unwrap()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// A fresh TCP connection with read/write timeouts.
    pub fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// One HTTP request on its own connection (`Connection: close`).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        let raw = self.raw(req.as_bytes());
        parse_responses(&raw).into_iter().next().unwrap_or_else(|| {
            panic!(
                "no response to {method} {path}: {:?}",
                String::from_utf8_lossy(&raw)
            )
        })
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("POST", path, Some(&body.to_string()))
    }

    /// Sends a notification and returns its id, asserting 201.
    pub fn send(&self, body: Value) -> String {
        let r = self.post("/api/v1/notifications/send", &body);
        assert_eq!(
            r.status,
            201,
            "send failed: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// Writes raw bytes and reads until the server closes (or the timeout).
    pub fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.tcp();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// A WebSocket client connected with this query string (e.g. `user_id=u1&channels=a`). Consumes the
    /// `connected` event.
    pub fn ws(&self, query: &str) -> WsClient {
        self.ws_with_socket(query, self.tcp())
    }

    /// Like [`TestServer::ws`], over a socket the caller prepared (small buffers, and so on).
    pub fn ws_with_socket(&self, query: &str, stream: TcpStream) -> WsClient {
        let url = format!("ws://{}/ws?{query}", self.addr);
        let (ws, response) = tungstenite::client::client(url, stream).expect("websocket handshake");
        assert_eq!(response.status(), 101);
        let mut client = WsClient {
            ws,
            connection_id: String::new(),
            unread_seen: Vec::new(),
        };
        let connected = client.next_json();
        assert_eq!(connected["event"], "connected", "first frame: {connected}");
        client.connection_id = connected["connection_id"].as_str().unwrap().to_owned();
        client
    }

    /// A WebSocket client of `user` that landed on `shard` (retries until the kernel's SO_REUSEPORT hash
    /// puts one there).
    pub fn ws_on_shard(&self, query: &str, shard: usize) -> WsClient {
        for _ in 0..200 {
            let c = self.ws(query);
            if c.shard() == shard {
                return c;
            }
        }
        panic!("no connection landed on shard {shard}");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A handle on a running server's address, usable from other threads (the server stays owned by the
/// test).
pub struct TestServerRef(pub SocketAddr);

impl TestServerRef {
    /// Sends a notification and returns its id, asserting 201.
    pub fn send(&self, body: Value) -> String {
        let r = self.post_raw("/api/v1/notifications/send", &body.to_string(), &[]);
        assert_eq!(r.status, 201);
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// POSTs a JSON body with extra headers on its own connection.
    pub fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let mut s = TcpStream::connect(self.0).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        parse_responses(&raw)
            .into_iter()
            .next()
            .expect("a response")
    }
}

/// Parses every complete HTTP response in `raw`.
pub fn parse_responses(raw: &[u8]) -> Vec<HttpResponse> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_string();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let body_start = end + 4;
        let body = rest[body_start..(body_start + len).min(rest.len())].to_vec();
        rest = &rest[(body_start + len).min(rest.len())..];
        out.push(HttpResponse {
            status,
            headers,
            body,
        });
    }
    out
}

/// A WebSocket test client.
pub struct WsClient {
    pub ws: WebSocket<TcpStream>,
    pub connection_id: String,
    /// The counts of the `unread` events [`WsClient::next_json`] skipped, in order.
    pub unread_seen: Vec<u64>,
}

impl WsClient {
    /// The shard the server put this connection on (connection ids are `<shard>-<n>`).
    pub fn shard(&self) -> usize {
        self.connection_id
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// The next text frame as JSON, skipping `unread` events: they follow every change of the user's
    /// unread count, and a test of something else must not depend on when they come. Their counts
    /// are kept in [`WsClient::unread_seen`]; [`WsClient::next_any_json`] sees them.
    pub fn next_json(&mut self) -> Value {
        loop {
            let v = self.next_any_json();
            if v["event"] != "unread" {
                return v;
            }
            self.unread_seen
                .push(v["count"].as_u64().expect("unread count"));
        }
    }

    /// The next text frame as JSON, whatever it is (pings are answered by tungstenite and skipped).
    pub fn next_any_json(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no frame within {WAIT:?}");
            match self.ws.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).expect("frame is JSON"),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(other) => panic!("unexpected frame {other:?}"),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// The next frame that is a control event named `event`, failing on anything else.
    pub fn expect_event(&mut self, event: &str) -> Value {
        let v = self.next_json();
        assert_eq!(v["event"], event, "expected {event}, got {v}");
        v
    }

    /// The next frame, which must be a notification (it has an id and no event).
    pub fn expect_notification(&mut self) -> Value {
        let v = self.next_json();
        assert!(
            v.get("event").is_none() && v["id"].is_string(),
            "expected a notification, got {v}"
        );
        v
    }

    /// Asserts that no text frame arrives within `dur` (`unread` events aside, as for
    /// [`WsClient::next_json`]).
    pub fn expect_silence(&mut self, dur: Duration) {
        let until = Instant::now() + dur;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.ws.get_mut().set_read_timeout(Some(left)).unwrap();
            let got = self.ws.read();
            self.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
            match got {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("frame is JSON");
                    if v["event"] != "unread" {
                        panic!("expected silence, got {t}");
                    }
                    self.unread_seen
                        .push(v["count"].as_u64().expect("unread count"));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return
                }
                Err(e) => panic!("connection failed while expecting silence: {e}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code (None if the socket just ended).
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "server did not close within {WAIT:?}"
            );
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return None,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("server did not close: {e}")
                }
                Err(_) => return None,
            }
        }
    }
}

/// A raw WebSocket handshake on a plain socket, for sending malformed frames by hand. Returns the socket
/// after the 101 response and the `connected` frame were read.
pub fn raw_ws(server: &TestServer, user: &str) -> TcpStream {
    let mut s = server.tcp();
    let req = format!(
        "GET /ws?user_id={user} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    read_server_frame(&mut s); // connected
    read_server_frame(&mut s); // unread
    s
}

/// Reads one unmasked server frame: (opcode, payload).
pub fn read_server_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

/// Reads server frames until a close frame; returns its code.
pub fn read_close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (op, payload) = read_server_frame(s);
        if op == 8 {
            assert!(payload.len() >= 2, "close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A masked client frame built by hand (so tests can send what tungstenite refuses to).
pub fn client_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}
