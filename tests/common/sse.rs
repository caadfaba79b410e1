//! An `EventSource`-style client for the SSE stream (`GET /api/v1/notifications/stream`): a plain HTTP
//! client that sends the request (with `Last-Event-ID` when it reconnects) and reads `text/event-stream`
//! line by line, as a browser does; and the long-poll (`GET /api/v1/notifications/poll`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::{parse_responses, HttpResponse, WAIT};

/// One dispatched event of the stream (or a comment line, with `name` `":"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `event:`, `"message"` when absent (as `EventSource` has it), `":"` for a comment.
    pub name: String,
    /// `id:`, if the event has one.
    pub id: Option<String>,
    /// `data:` lines joined by `\n` (the comment's text for a comment).
    pub data: String,
    /// `retry:`, if the event block has one.
    pub retry: Option<u64>,
}

impl Event {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// An open stream.
pub struct SseClient {
    reader: BufReader<TcpStream>,
    /// The response's headers.
    pub headers: Vec<(String, String)>,
    /// The `id:` of the last event that had one: what an `EventSource` reconnects with.
    pub last_event_id: Option<String>,
    /// The counts of the `unread` events [`SseClient::next`] set aside, in order.
    pub unread_seen: Vec<u64>,
}

/// Opens a stream at `addr` with `query` and extra request `headers`; `Err` with the response when
/// the server answered anything but `200`.
pub fn open(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<SseClient, HttpResponse> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut req = format!(
        "GET /api/v1/notifications/stream?{query} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    (&s).write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .expect("read the response head");
        assert!(n > 0, "the server closed before answering: {head:?}");
        head.extend_from_slice(&line);
    }
    let parsed = parse_responses(&head).pop().expect("a response head");
    if parsed.status != 200 {
        let mut raw = head;
        let _ = reader.read_to_end(&mut raw);
        return Err(parse_responses(&raw).pop().expect("a response"));
    }
    assert!(
        parsed
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{:?}",
        parsed.headers
    );
    Ok(SseClient {
        reader,
        headers: parsed.headers,
        last_event_id: None,
        unread_seen: Vec::new(),
    })
}

impl SseClient {
    /// The next event or comment; `None` at the end of the stream. Panics after the read timeout.
    /// `unread` events (the user's unread count, sent after `connected` and on every change) are
    /// set aside in [`SseClient::unread_seen`], as the WebSocket test client does, so tests of
    /// other events need not expect them.
    pub fn next(&mut self) -> Option<Event> {
        loop {
            let event = self.next_any()?;
            if event.name != "unread" {
                return Some(event);
            }
            self.unread_seen
                .push(event.json()["count"].as_u64().expect("a count"));
        }
    }

    /// The next event or comment, `unread` included.
    pub fn next_any(&mut self) -> Option<Event> {
        let mut event = Event {
            name: "message".into(),
            id: None,
            data: String::new(),
            retry: None,
        };
        let mut has_data = false;
        let mut any = false;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .expect("read the stream (timed out?)");
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if any {
                    if event.id.is_some() {
                        self.last_event_id = event.id.clone();
                    }
                    return Some(event);
                }
                continue;
            }
            any = true;
            if let Some(comment) = line.strip_prefix(':') {
                event.name = ":".into();
                event.data = comment.trim().to_owned();
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.name = value.to_owned(),
                "id" => event.id = Some(value.to_owned()),
                "retry" => event.retry = value.parse().ok(),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                other => panic!("unknown field {other:?} in {line:?}"),
            }
        }
    }

    /// The next event that is not a comment.
    pub fn next_event(&mut self) -> Event {
        loop {
            let e = self.next().expect("an event, not the end of the stream");
            if e.name != ":" {
                return e;
            }
        }
    }

    /// The next event, which must be the control event `name`; its JSON.
    pub fn expect_event(&mut self, name: &str) -> Value {
        let e = self.next_event();
        assert_eq!(e.name, name, "{e:?}");
        let v = e.json();
        assert_eq!(v["event"], name, "{e:?}");
        assert!(e.id.is_none(), "a control event has no id: {e:?}");
        v
    }

    /// The next event, which must be a notification whose `id:` is its id; its JSON.
    pub fn expect_notification(&mut self) -> Value {
        let e = self.next_event();
        assert_eq!(e.name, "notification", "{e:?}");
        let v = e.json();
        assert_eq!(e.id.as_deref(), v["id"].as_str(), "{e:?}");
        v
    }

    /// Asserts that no event (comments and `unread` events aside, see [`SseClient::next`]) arrives
    /// for `dur`.
    pub fn expect_silence(&mut self, dur: Duration) {
        self.reader.get_ref().set_read_timeout(Some(dur)).unwrap();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("the stream ended"),
                Ok(_) if line.starts_with(':') || line == "\n" => continue,
                Ok(_) if line == "event: unread\n" => {
                    // The rest of the event: its data line and the blank line.
                    let mut data = String::new();
                    self.reader
                        .read_line(&mut data)
                        .expect("the unread event's data");
                    let count = serde_json::from_str::<Value>(
                        data.trim_end().strip_prefix("data: ").expect("a data line"),
                    )
                    .expect("JSON")["count"]
                        .as_u64()
                        .expect("a count");
                    self.unread_seen.push(count);
                }
                Ok(_) => panic!("expected silence, got {line:?}"),
                Err(_) => break,
            }
        }
        self.reader.get_ref().set_read_timeout(Some(WAIT)).unwrap();
    }

    /// Reads events until the stream ends; what came before the end.
    pub fn until_end(&mut self) -> Vec<Event> {
        let mut got = Vec::new();
        while let Some(e) = self.next() {
            got.push(e);
        }
        got
    }
}

/// One long-poll (`GET /api/v1/notifications/poll?{query}`), on its own connection.
pub fn poll(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut req = format!("GET /api/v1/notifications/poll?{query} HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_responses(&raw)
        .pop()
        .unwrap_or_else(|| panic!("no answer to the poll: {:?}", String::from_utf8_lossy(&raw)))
}

/// The ids of a poll answer's notifications.
pub fn poll_ids(answer: &HttpResponse) -> Vec<String> {
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}
