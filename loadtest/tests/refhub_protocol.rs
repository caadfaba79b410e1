//! The reference hub speaks the frames of docs/API.md that the load scenarios rely on, so the same
//! client code measures both servers. Starts the real `refhub` binary on 127.0.0.1:0 and talks to it
//! over real sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

/// How long any single expectation may wait before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// A running `refhub`, killed when dropped.
struct RefHub {
    child: Child,
    addr: SocketAddr,
}

impl RefHub {
    fn start() -> RefHub {
        let mut child = Command::new(env!("CARGO_BIN_EXE_refhub"))
            .args(["--port", "0", "--threads", "2"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start refhub");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("refhub's first line");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        RefHub { child, addr }
    }

    fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// A client connected with `query`, its `connected` event checked and consumed.
    fn ws(&self, query: &str) -> Client {
        let url = format!("ws://{}/ws?{query}", self.addr);
        let (ws, response) =
            tungstenite::client::client(url, self.tcp()).expect("websocket handshake");
        assert_eq!(response.status(), 101);
        let mut client = Client(ws);
        let connected = client.next_json();
        assert_eq!(connected["event"], "connected", "first frame: {connected}");
        assert!(connected["connection_id"].is_string());
        assert!(connected["heartbeat_s"].is_u64());
        client
    }
}

impl Drop for RefHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client(tungstenite::WebSocket<TcpStream>);

impl Client {
    fn send(&mut self, v: Value) {
        self.0.send(Message::text(v.to_string())).expect("send");
    }

    fn next_json(&mut self) -> Value {
        loop {
            match self.0.read().expect("read a frame") {
                Message::Text(t) => return serde_json::from_str(&t).expect("frame is JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

#[test]
fn connected_then_subscribed_when_channels_are_in_the_query() {
    let hub = RefHub::start();
    let mut a = hub.ws("user_id=a&channels=room,other");
    assert_eq!(
        a.next_json(),
        json!({"event": "subscribed", "channels": ["room", "other"]})
    );
}

#[test]
fn a_publish_reaches_the_other_subscribers_as_a_message_event_and_not_the_sender() {
    let hub = RefHub::start();
    let mut listener = hub.ws("user_id=listener&channels=room");
    listener.next_json();
    let mut publisher = hub.ws("user_id=publisher");
    publisher.send(json!({"action": "subscribe", "channels": ["room"]}));
    assert_eq!(
        publisher.next_json(),
        json!({"event": "subscribed", "channels": ["room"]})
    );

    publisher.send(json!({"action": "publish", "channel": "room", "data": {"n": 1}}));
    assert_eq!(
        listener.next_json(),
        json!({"event": "message", "channel": "room", "from": "publisher", "data": {"n": 1}})
    );
    // The publisher gets nothing back: its next frame is the answer to its ping.
    publisher.send(json!({"action": "ping"}));
    assert_eq!(publisher.next_json(), json!({"event": "pong"}));
}

#[test]
fn publishing_to_a_channel_not_subscribed_is_an_error_event() {
    let hub = RefHub::start();
    let mut c = hub.ws("user_id=c");
    c.send(json!({"action": "publish", "channel": "room", "data": {}}));
    assert_eq!(c.next_json()["code"], "not_subscribed");
    c.send(json!({"action": "dance"}));
    assert_eq!(c.next_json()["code"], "unknown_action");
}

#[test]
fn an_upgrade_without_user_id_is_refused_with_400() {
    let hub = RefHub::start();
    let mut s = hub.tcp();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "answer: {answer:?}");
}
