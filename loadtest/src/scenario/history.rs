//! `loadtest history`: history page latency for one user with a large inbox.
//!
//! Seeds one user with `--seed` notifications through `POST /api/v1/notifications/batch` (1,000 per
//! request), then, on one keep-alive connection, measures three kinds of page, `--pages` requests each:
//! the first page, deep pages (walking the `next_before` chain from the newest page towards the oldest,
//! wrapping to the first page at the end), and the first page of `unread=true`. Bounded by `--max-s`.

use std::io::{self, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use crate::http::ResponseReader;
use crate::progress::ProgressLine;

/// Highest latency the histogram records, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Notifications per seeding request; the server's batch limit.
const SEED_BATCH: u64 = 1000;

/// Options of `loadtest history`.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// The server's HTTP address; must be IPv4 loopback.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddrV4,
    /// The user whose inbox is seeded and read.
    #[arg(long, default_value = "history-user")]
    pub user: String,
    /// Notifications to seed before measuring (0 reads the inbox as it is).
    #[arg(long, default_value_t = 100_000)]
    pub seed: u64,
    /// Requests per kind of page.
    #[arg(long, default_value_t = 200)]
    pub pages: u64,
    /// Page size (`limit`).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Stop after this many seconds in all.
    #[arg(long, default_value_t = 120)]
    pub max_s: u64,
}

/// One keep-alive connection with reused buffers.
struct Client {
    stream: TcpStream,
    reader: ResponseReader,
    request: Vec<u8>,
    body: Vec<u8>,
    host: String,
}

impl Client {
    fn connect(addr: SocketAddrV4) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            reader: ResponseReader::default(),
            request: Vec::new(),
            body: Vec::new(),
            host: addr.to_string(),
        })
    }

    /// Sends one request and returns the status; the answer's body is left in `self.body`.
    fn call(&mut self, method: &str, path: &str, payload: &[u8]) -> io::Result<u16> {
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n",
            self.host
        )?;
        if !payload.is_empty() {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            )?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(payload);
        self.stream.write_all(&self.request)?;
        self.reader
            .read_response(&mut self.stream, Some(&mut self.body))
    }
}

/// Runs the scenario; prints a summary and one JSON line on stdout.
pub fn run(args: HistoryArgs) -> Result<ExitCode, String> {
    if !args.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not loopback: loadtest only targets 127.0.0.0/8",
            args.addr
        ));
    }
    if args.pages == 0 || args.limit == 0 {
        return Err("--pages and --limit must be at least 1".into());
    }
    if args.user.is_empty()
        || !args
            .user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("--user must be non-empty ASCII letters, digits, '-' or '_'".into());
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.max_s);
    let mut client =
        Client::connect(args.addr).map_err(|e| format!("connect {}: {e}", args.addr))?;
    let mut progress = ProgressLine::new();

    let mut seeded = 0;
    let mut payload = Vec::new();
    while seeded < args.seed && Instant::now() < deadline {
        let n = SEED_BATCH.min(args.seed - seeded);
        payload.clear();
        payload.extend_from_slice(b"{\"notifications\":[");
        for k in 0..n {
            if k > 0 {
                payload.push(b',');
            }
            let _ = write!(
                payload,
                "{{\"user_id\":\"{}\",\"type\":\"seed\",\"message\":\"seed {}\"}}",
                args.user,
                seeded + k
            );
        }
        payload.extend_from_slice(b"]}");
        let status = client
            .call("POST", "/api/v1/notifications/batch", &payload)
            .map_err(|e| format!("seeding: {e}"))?;
        if !(200..300).contains(&status) {
            return Err(format!(
                "seeding: batch answered {status}: {}",
                String::from_utf8_lossy(&client.body)
            ));
        }
        seeded += n;
        progress.update(&format!("history: seeded {seeded}/{}", args.seed));
    }
    let seed_s = start.elapsed().as_secs_f64();

    let first_path = format!(
        "/api/v1/notifications/user/{}?limit={}",
        args.user, args.limit
    );
    let unread_path = format!("{first_path}&unread=true");
    let mut first = new_histogram()?;
    let mut deep = new_histogram()?;
    let mut unread = new_histogram()?;
    let mut errors = 0u64;
    let mut before: Option<String> = None;
    let mut deepest_page = 0u64;
    let mut page = 0u64;
    for i in 0..args.pages {
        if Instant::now() >= deadline {
            break;
        }
        for (kind, histogram) in [(0, &mut first), (1, &mut deep), (2, &mut unread)] {
            let path = match (kind, &before) {
                (0, _) | (1, None) => first_path.clone(),
                (1, Some(id)) => format!("{first_path}&before={id}"),
                _ => unread_path.clone(),
            };
            let sent = Instant::now();
            let status = client
                .call("GET", &path, b"")
                .map_err(|e| format!("history: {e}"))?;
            let us = sent.elapsed().as_micros().min(u128::from(MAX_LATENCY_US)) as u64;
            if !(200..300).contains(&status) {
                errors += 1;
                continue;
            }
            histogram.record(us.max(1)).map_err(|e| e.to_string())?;
            if kind == 1 {
                let answer: serde_json::Value = serde_json::from_slice(&client.body)
                    .map_err(|e| format!("history page: {e}"))?;
                before = answer["next_before"].as_str().map(str::to_string);
                page = if before.is_some() { page + 1 } else { 0 };
                deepest_page = deepest_page.max(page);
            }
        }
        progress.update(&format!("history: round {}/{}", i + 1, args.pages));
    }
    progress.finish("");

    println!(
        "history of {}: seeded {seeded} notifications in {seed_s:.2} s, {errors} errors",
        args.user
    );
    let mut json = serde_json::json!({
        "scenario": "history", "user": args.user, "seeded": seeded, "seed_s": seed_s,
        "limit": args.limit, "errors": errors, "deepest_page": deepest_page,
    });
    for (name, h) in [
        ("first_page", &first),
        ("before_pages", &deep),
        ("unread_first_page", &unread),
    ] {
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{name} ({} requests, ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            h.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            h.max() as f64 / 1000.0
        );
        json[name] = serde_json::json!({
            "requests": h.len(), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
            "p999_ms": q(0.999), "max_ms": h.max() as f64 / 1000.0,
        });
    }
    println!(
        "deepest page reached with before: {deepest_page} (page size {})",
        args.limit
    );
    println!("{json}");
    Ok(if errors == 0 && !first.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn new_histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_max(MAX_LATENCY_US, 3).map_err(|e| e.to_string())
}
