//! `loadtest ingest`: durable REST ingest throughput and the latency of the 2xx answers.
//!
//! C threads each hold one keep-alive connection and post `send` (one notification) or `batch`
//! (`--batch-size` notifications) requests to users spread over `--users` ids. Closed-loop by default:
//! each connection sends its next request as soon as the previous answer is in. With `--rate R` the run
//! is open-loop: request `i` is due at `start + i / R`, and its latency is measured from that intended
//! time, so a stalled server shows up as latency instead of silently slowing the client down
//! (no coordinated omission). The run stops after `--requests` requests or `--max-s` seconds.
//! While it runs, the server's CPU time (`utime + stime`) is read to give CPU-seconds per 1,000
//! requests, a figure a shared machine's load does not distort.

use std::io::{self, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;

use crate::http::ResponseReader;
use crate::progress::ProgressLine;
use crate::server_probe::{self, clock_ticks_per_second, ServerProcesses};

/// Highest latency the histogram records, in microseconds (a minute); slower answers are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Which REST route is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IngestRoute {
    /// `POST /api/v1/notifications/send`, one notification per request.
    Send,
    /// `POST /api/v1/notifications/batch`, `--batch-size` notifications per request.
    Batch,
}

/// Options of `loadtest ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// The server's HTTP address; must be IPv4 loopback.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddrV4,
    /// Route to load.
    #[arg(long, value_enum, default_value = "send")]
    pub route: IngestRoute,
    /// Notifications per batch request (the server accepts up to 1,000).
    #[arg(long, default_value_t = 100)]
    pub batch_size: u32,
    /// Concurrent keep-alive connections, one client thread each.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// Requests to send in all (a batch counts as one request).
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 30)]
    pub max_s: u64,
    /// Distinct user ids the notifications are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Open-loop request rate per second over all connections; 0 runs closed-loop.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

/// What one client thread measured.
struct ThreadResult {
    latency_us: Histogram<u64>,
    errors: u64,
}

/// Runs the scenario; prints a summary and one JSON line on stdout.
pub fn run(args: IngestArgs) -> Result<ExitCode, String> {
    if !args.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not loopback: loadtest only targets 127.0.0.0/8",
            args.addr
        ));
    }
    if args.connections == 0 || args.requests == 0 || args.users == 0 {
        return Err("--connections, --requests and --users must be at least 1".into());
    }
    if args.route == IngestRoute::Batch && !(1..=1000).contains(&args.batch_size) {
        return Err("--batch-size must be 1 to 1000".into());
    }
    let server = ServerProcesses {
        pids: server_probe::find_listener_pids(args.addr.port()).unwrap_or_default(),
    };
    let cpu_before = server.cpu_ticks().ok();

    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.max_s);
    let mut threads = Vec::new();
    for _ in 0..args.connections {
        let (args, next, done, stop) = (args.clone(), next.clone(), done.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            client_loop(&args, start, deadline, &next, &done, &stop)
        }));
    }

    let mut progress = ProgressLine::new();
    while done.load(Ordering::Relaxed) < args.requests
        && Instant::now() < deadline
        && !threads.iter().all(|t| t.is_finished())
    {
        thread::sleep(Duration::from_millis(250));
        let n = done.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        progress.update(&format!(
            "ingest: {n}/{} requests, {:.0}/s",
            args.requests,
            n as f64 / secs
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut latency_us =
        Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3).map_err(|e| e.to_string())?;
    let mut errors = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(r)) => {
                latency_us.add(&r.latency_us).map_err(|e| e.to_string())?;
                errors += r.errors;
            }
            Ok(Err(e)) => return Err(format!("client connection: {e}")),
            Err(_) => return Err("a client thread panicked".into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    progress.finish("");
    let cpu_after = server.cpu_ticks().ok();

    let ok = latency_us.len();
    let per_request = if args.route == IngestRoute::Batch {
        u64::from(args.batch_size)
    } else {
        1
    };
    let server_cpu_s = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some((a - b) as f64 / clock_ticks_per_second() as f64),
        _ => None,
    };
    let cpu_per_1k = server_cpu_s
        .filter(|_| ok > 0)
        .map(|s| s * 1000.0 / ok as f64);
    let q = |p: f64| latency_us.value_at_quantile(p) as f64 / 1000.0;
    let route = format!("{:?}", args.route).to_lowercase();
    println!(
        "ingest {route}: {ok} requests 2xx ({} notifications), {errors} errors in {secs:.2} s: {:.0} req/s, {:.0} notifications/s",
        ok * per_request,
        ok as f64 / secs,
        (ok * per_request) as f64 / secs
    );
    println!(
        "latency of the 2xx (ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        latency_us.max() as f64 / 1000.0
    );
    match cpu_per_1k {
        Some(c) => println!(
            "server CPU: {:.2} s, {c:.4} CPU-s per 1,000 requests",
            server_cpu_s.unwrap_or(0.0)
        ),
        None => println!(
            "server CPU: not read (no listener pid found for port {})",
            args.addr.port()
        ),
    }
    let json = serde_json::json!({
        "scenario": "ingest", "route": route, "mode": if args.rate == 0 { "closed" } else { "open" },
        "rate": args.rate, "connections": args.connections, "batch_size": per_request,
        "requests_ok": ok, "errors": errors, "notifications_ok": ok * per_request, "seconds": secs,
        "requests_per_s": ok as f64 / secs, "notifications_per_s": (ok * per_request) as f64 / secs,
        "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999),
        "max_ms": latency_us.max() as f64 / 1000.0,
        "server_cpu_s": server_cpu_s, "server_cpu_s_per_1k_requests": cpu_per_1k,
    });
    println!("{json}");
    Ok(if errors == 0 && ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One connection: claims request numbers until the count, the deadline or the stop flag ends it.
fn client_loop(
    args: &IngestArgs,
    start: Instant,
    deadline: Instant,
    next: &AtomicU64,
    done: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<ThreadResult> {
    let mut stream = TcpStream::connect(args.addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut latency_us =
        Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3).map_err(io::Error::other)?;
    let mut errors = 0;
    let mut request = Vec::with_capacity(64 * 1024);
    let mut body = Vec::with_capacity(64 * 1024);
    let mut reader = ResponseReader::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.requests || stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = if args.rate == 0 {
            Instant::now()
        } else {
            let due = start + Duration::from_secs_f64(i as f64 / args.rate as f64);
            if due > deadline {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            due
        };
        if Instant::now() >= deadline {
            break;
        }
        build_request(args, i, &mut body, &mut request);
        stream.write_all(&request)?;
        let status = reader.read_response(&mut stream, None)?;
        if (200..300).contains(&status) {
            let us = intended
                .elapsed()
                .as_micros()
                .min(u128::from(MAX_LATENCY_US)) as u64;
            latency_us.record(us.max(1)).map_err(io::Error::other)?;
        } else {
            errors += 1;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(ThreadResult { latency_us, errors })
}

/// Writes request `i` (headers and body) into `request`, reusing both buffers.
fn build_request(args: &IngestArgs, i: u64, body: &mut Vec<u8>, request: &mut Vec<u8>) {
    body.clear();
    let (path, count) = match args.route {
        IngestRoute::Send => ("/api/v1/notifications/send", 1),
        IngestRoute::Batch => ("/api/v1/notifications/batch", u64::from(args.batch_size)),
    };
    if args.route == IngestRoute::Batch {
        body.extend_from_slice(b"{\"notifications\":[");
    }
    for k in 0..count {
        if k > 0 {
            body.push(b',');
        }
        let user = (i * count + k) % args.users;
        let _ = write!(
            body,
            "{{\"user_id\":\"u{user}\",\"type\":\"load\",\"message\":\"ingest {i}.{k}\"}}"
        );
    }
    if args.route == IngestRoute::Batch {
        body.extend_from_slice(b"]}");
    }
    request.clear();
    let _ = write!(
        request,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        args.addr,
        body.len()
    );
    request.extend_from_slice(body);
}
