//! `loadtest crossnode`: how fast and how soon a notification sent to one node reaches a WebSocket held
//! on another (two nodes joined by Redis), or on the same node for the single-node figure.
//!
//! `--users` WebSocket connections (one user each, `xN`, one blocking reader thread each) are opened to
//! `--ws-addr`. Then `--senders` keep-alive connections post single sends to `--send-addr` at an
//! open-loop `--rate`: send `i` is due at `start + i / rate`, targets user `x(i mod users)`, and carries
//! its due time in its `data`. A reader records, per notification, the time from that due time to the
//! frame's arrival: the latency a producer's "send" sees until the client has it (commit, publish,
//! Redis, routing and the socket write all included). The delivery rate is notifications received per
//! second of the sending window. Every send must be delivered exactly once; a missing or duplicate
//! delivery is reported and makes the run fail.

use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use crate::http::ResponseReader;
use crate::ws::{client_handshake, parse_frame, KeyGen};

/// Highest latency recorded, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;
/// The opcode of a text frame (the notifications; `ws::opcode` names only control frames).
const TEXT_OPCODE: u8 = 0x1;
/// How long readers wait for the last deliveries after the last send.
const DRAIN: Duration = Duration::from_secs(3);

/// Options of `loadtest crossnode`.
#[derive(Debug, Clone, Args)]
pub struct CrossNodeArgs {
    /// The node producers post to (IPv4 loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub send_addr: SocketAddrV4,
    /// The node the WebSocket clients hold their connections on (the same address for one node).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub ws_addr: SocketAddrV4,
    /// WebSocket connections, one distinct user each.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Sending connections.
    #[arg(long, default_value_t = 8)]
    pub senders: u64,
    /// Sends per second over all sending connections (open loop).
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
}

/// What one reader saw.
struct ReaderResult {
    latency_us: Histogram<u64>,
    /// Send indexes received, to find duplicates and losses.
    received: Vec<u64>,
}

/// Runs the scenario; prints a summary and one JSON line.
pub fn run(args: CrossNodeArgs) -> Result<ExitCode, String> {
    if !args.send_addr.ip().is_loopback() || !args.ws_addr.ip().is_loopback() {
        return Err("both addresses must be loopback".into());
    }
    let clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut keys = KeyGen::new(7);
    let mut readers = Vec::new();
    for u in 0..args.users {
        let mut stream = TcpStream::connect(args.ws_addr).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        client_handshake(
            &mut stream,
            &args.ws_addr.to_string(),
            &format!("/ws?user_id=x{u}"),
            &keys.websocket_key(),
        )
        .map_err(|e| format!("handshake: {e}"))?;
        let stop = stop.clone();
        readers.push(thread::spawn(move || reader(stream, clock, &stop)));
    }
    // Let every node subscribe before the first send.
    thread::sleep(Duration::from_secs(1));
    let start = clock.elapsed();
    let total = args.rate * args.duration_s;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..args.senders)
        .map(|_| {
            let (args, next, errors) = (args.clone(), next.clone(), errors.clone());
            thread::spawn(move || sender(&args, clock, start, total, &next, &errors))
        })
        .collect();
    for s in senders {
        s.join()
            .map_err(|_| "a sender panicked".to_string())?
            .map_err(|e| format!("sender: {e}"))?;
    }
    let sent_window = clock.elapsed() - start;
    thread::sleep(DRAIN);
    stop.store(true, Ordering::Relaxed);
    let mut latency =
        Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3).map_err(|e| e.to_string())?;
    let mut received = Vec::new();
    for r in readers {
        let r = r
            .join()
            .map_err(|_| "a reader panicked".to_string())?
            .map_err(|e| format!("reader: {e}"))?;
        latency.add(&r.latency_us).map_err(|e| e.to_string())?;
        received.extend(r.received);
    }
    received.sort_unstable();
    let count = received.len() as u64;
    received.dedup();
    let duplicates = count - received.len() as u64;
    let errors = errors.load(Ordering::Relaxed);
    let missing = (total - errors).saturating_sub(received.len() as u64);
    let rate = count as f64 / sent_window.as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "crossnode: {count} of {total} sends delivered ({errors} send errors, {missing} missing, {duplicates} duplicates) in {:.1} s: {rate:.0} deliveries/s; send→deliver latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        sent_window.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1000.0
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "crossnode",
            "send_addr": args.send_addr.to_string(),
            "ws_addr": args.ws_addr.to_string(),
            "users": args.users,
            "rate": args.rate,
            "sent": total,
            "send_errors": errors,
            "delivered": count,
            "missing": missing,
            "duplicates": duplicates,
            "deliveries_per_s": rate.round(),
            "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": latency.max() as f64 / 1000.0},
        })
    );
    Ok(if missing == 0 && duplicates == 0 && errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Posts sends `i` (taken from `next`) at their due times until `total`.
fn sender(
    args: &CrossNodeArgs,
    clock: Instant,
    start: Duration,
    total: u64,
    next: &AtomicU64,
    errors: &AtomicU64,
) -> io::Result<()> {
    let mut stream = TcpStream::connect(args.send_addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = ResponseReader::default();
    let mut request = Vec::with_capacity(512);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return Ok(());
        }
        let due = start + Duration::from_secs_f64(i as f64 / args.rate as f64);
        if let Some(wait) = due.checked_sub(clock.elapsed()) {
            thread::sleep(wait);
        }
        let body = format!(
            "{{\"user_id\":\"x{}\",\"message\":\"m\",\"data\":{{\"i\":{i},\"t\":{}}}}}",
            i % args.users,
            due.as_micros()
        );
        request.clear();
        write!(
            request,
            "POST /api/v1/notifications/send HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            args.send_addr,
            body.len()
        )?;
        stream.write_all(&request)?;
        if !(200..300).contains(&reader.read_response(&mut stream, None)?) {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads one connection's frames until `stop`, timing each notification.
fn reader(mut stream: TcpStream, clock: Instant, stop: &AtomicBool) -> io::Result<ReaderResult> {
    let mut latency_us =
        Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3).map_err(io::Error::other)?;
    let mut received = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        let now = clock.elapsed().as_micros() as u64;
        let mut at = 0;
        while let Some(frame) =
            parse_frame(&buf[at..]).map_err(|e| io::Error::other(e.to_string()))?
        {
            let payload = &buf[at + frame.payload.start..at + frame.payload.end];
            if frame.opcode == TEXT_OPCODE {
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
                if let (Some(i), Some(t)) = (v["data"]["i"].as_u64(), v["data"]["t"].as_u64()) {
                    received.push(i);
                    let us = now.saturating_sub(t).clamp(1, MAX_LATENCY_US);
                    latency_us.record(us).map_err(io::Error::other)?;
                }
            }
            at += frame.len;
        }
        buf.drain(..at);
    }
    Ok(ReaderResult {
        latency_us,
        received,
    })
}
