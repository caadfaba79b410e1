//! `docs/openapi.yaml` against the running server: it is served at `/openapi.yaml`, names every route of
//! docs/API.md, and every answer the server gives (schemathesis's generated requests, and the framing,
//! auth and limit answers schemathesis cannot provoke: 401, 408, 411, 413, 415, 422, 429, 431, 503,
//! 505) is one the description lists for that operation, with a body that validates against its schema.
//!
//! schemathesis is found as `$SCHEMATHESIS`, or `schemathesis` on `PATH`, or `python3 -m
//! schemathesis.cli` (`.ci/run` installs it from PyPI). Without it the schemathesis test fails under
//! `CI=true` and is skipped with a note elsewhere.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{parse_responses, HttpResponse, TestServer};
use serde_json::{json, Value};

/// The description, relative to the crate root.
const DESCRIPTION: &str = "docs/openapi.yaml";

/// The one operation schemathesis leaves out: the SSE stream, an endless response.
const STREAM_PATH: &str = "/api/v1/notifications/stream";

/// The pinned schemathesis release (`.ci/run` installs this one).
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Test cases schemathesis generates per operation and phase: about half a minute on two cores
/// against a debug build.
const SCHEMATHESIS_EXAMPLES: &str = "100";

/// The seed of the run, so that a failure in CI replays the same requests (`SCHEMATHESIS_SEED`
/// overrides it, to explore further).
const SCHEMATHESIS_SEED: &str = "3";

/// The checks: no 5xx, and every status, content type, body and required header as described; plus
/// that requests outside the description (wrong types, missing required parameters) are refused, and
/// that what a 201 created can be read and what a 204 deleted cannot.
const SCHEMATHESIS_CHECKS: &str = "not_a_server_error,status_code_conformance,\
content_type_conformance,response_schema_conformance,response_headers_conformance,\
negative_data_rejection,missing_required_header,use_after_free,ensure_resource_availability";

/// How long the schemathesis run may take before the test gives up on it.
const SCHEMATHESIS_DEADLINE: Duration = Duration::from_secs(600);

/// Lines of schemathesis's output shown when the run fails.
const OUTPUT_TAIL_LINES: usize = 150;

/// The API key of the servers these tests start.
const KEY: &str = "openapi-test-key";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The description as JSON.
fn description() -> Value {
    serde_yaml::from_str(&read(DESCRIPTION)).expect("docs/openapi.yaml is YAML")
}

/// Follows a local `$ref` (`#/components/responses/NotFound`) to what it names.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("not a local reference: {reference}"));
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling reference {reference}")),
            )
        }
        None => value,
    }
}

/// Every described operation as `METHOD /path/{param}`.
fn described_operations(doc: &Value) -> BTreeSet<String> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if method != "parameters" {
                operations.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations
}

/// The routes of docs/API.md's route table (`| \`GET /api/v1/notifications/user/:user_id\` | ...`),
/// as `METHOD /path/{param}`.
fn api_md_routes() -> BTreeSet<String> {
    let api = read("docs/API.md");
    let start = api
        .find("| method and path |")
        .expect("API.md's route table");
    api[start..]
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cell = line.split('`').nth(1).expect("a route in backticks");
            let (method, target) = cell.split_once(' ').expect("METHOD /path");
            let path = target.split('?').next().unwrap_or(target);
            let path: Vec<String> = path
                .split('/')
                .map(|s| match s.strip_prefix(':') {
                    Some(param) => format!("{{{param}}}"),
                    None => s.to_owned(),
                })
                .collect();
            format!("{method} {}", path.join("/"))
        })
        .collect()
}

/// A validator for `schema`, a schema of the description (its `$ref`s resolved within it).
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    let object = root.as_object_mut().expect("a schema object");
    object.insert("components".into(), doc["components"].clone());
    jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("schema {schema}: {e}"))
}

/// Asserts that `response` is one the description lists for `operation` (`POST /notifications`):
/// its status among the operation's responses (or the `fallback` response of the components, for
/// answers no operation lists, like 405), its content type, the body valid against the schema, and
/// the required headers present.
fn assert_described(doc: &Value, operation: &str, response: &HttpResponse, fallback: Option<&str>) {
    let (method, path) = operation.split_once(' ').unwrap();
    let status = response.status.to_string();
    let body_text = String::from_utf8_lossy(&response.body);
    let described = &doc["paths"][path][method.to_lowercase()];
    assert!(described.is_object(), "{operation} is not described");
    let listed = match described["responses"].get(&status) {
        Some(listed) => listed,
        None => {
            let name = fallback.unwrap_or_else(|| {
                panic!("{operation}: {status} is not a described answer: {body_text}")
            });
            &doc["components"]["responses"][name]
        }
    };
    let listed = resolve(doc, listed);
    for (name, header) in listed["headers"].as_object().into_iter().flatten() {
        if header["required"] == true {
            assert!(
                response.header(name).is_some(),
                "{operation} {status}: no {name} header"
            );
        }
    }
    let Some(content) = listed["content"].as_object() else {
        assert!(
            response.body.is_empty(),
            "{operation} {status}: a body where none is described: {body_text}"
        );
        return;
    };
    let content_type = response
        .header("content-type")
        .unwrap_or_else(|| panic!("{operation} {status}: no Content-Type"));
    let media_type = content_type.split(';').next().unwrap().trim();
    let media = content
        .get(media_type)
        .unwrap_or_else(|| panic!("{operation} {status}: {content_type} is not described"));
    if media_type == "application/json" {
        let body: Value = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("{operation} {status}: not JSON ({e}): {body_text}"));
        let errors: Vec<String> = validator(doc, &media["schema"])
            .iter_errors(&body)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{operation} {status}: {body_text} does not match the description: {errors:#?}"
        );
    }
}

/// Writes `request` on a connection of its own and reads the first answer (the server closes after
/// every answer these tests provoke, or the request says `Connection: close`).
fn exchange(server: &TestServer, request: &[u8]) -> HttpResponse {
    let raw = server.raw(request);
    parse_responses(&raw).into_iter().next().unwrap_or_else(|| {
        panic!(
            "no answer to {:?}: {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&raw)
        )
    })
}

/// A request with the key and `Connection: close`; `headers` are extra header lines.
fn with_key(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-API-Key: {KEY}\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn the_description_is_served_openly_and_is_the_committed_file() {
    let server = TestServer::start_with(&[("API_KEY", KEY)]);
    // No key: the description is open, like /health.
    let r = server.get("/openapi.yaml");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/yaml"));
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        read(DESCRIPTION),
        "the served description is not docs/openapi.yaml"
    );
    let served: Value = serde_yaml::from_slice(&r.body).expect("the served description parses");
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served["info"]["title"], "notification-service");
    // HEAD, as on every GET route: the headers without the body.
    let head = server.raw(b"HEAD /openapi.yaml HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD answered a body: {head}");
    // The rest of the API still wants the key.
    let r = server.get("/api/v1/notifications/user/u1");
    assert_eq!(r.status, 401);
}

#[test]
fn the_description_names_every_route_of_api_md_and_no_other() {
    let doc = description();
    let described = described_operations(&doc);
    let mut documented = api_md_routes();
    // The WebSocket upgrade is documented in API.md's own section rather than in the table.
    assert!(
        read("docs/API.md").contains("Connect with `GET /ws?user_id=user123`"),
        "API.md no longer documents GET /ws"
    );
    documented.insert("GET /ws".into());
    assert!(
        documented.len() >= 14,
        "API.md's route table was not read: {documented:?}"
    );
    assert_eq!(
        described, documented,
        "docs/openapi.yaml and docs/API.md name different routes"
    );
    // Every operation has an id, a 2xx or 101 answer, and every reference resolves.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            assert!(operation["operationId"].is_string(), "{method} {path}");
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s == "101"),
                "{method} {path} has no success answer"
            );
            for response in responses.values() {
                let response = resolve(&doc, response);
                for media in response["content"].as_object().into_iter().flatten() {
                    validator(&doc, &media.1["schema"]);
                }
            }
        }
    }
}

/// The answers schemathesis cannot provoke, from one server with small limits: each is listed for its
/// operation, in the error shape the description gives.
#[test]
fn framing_auth_and_limit_answers_are_described() {
    let doc = description();
    let server = TestServer::start_with(&[
        ("API_KEY", KEY),
        ("MAX_BODY", "1024"),
        ("MAX_BATCH_BODY", "3000"),
        ("MAX_HEADER_BYTES", "2048"),
        ("HEADER_TIMEOUT_S", "1"),
    ]);
    let send = "POST /api/v1/notifications/send";
    let message = r#"{"user_id":"u1","message":"hi"}"#;
    let cases: Vec<(&str, &str, u16, Vec<u8>)> = vec![
        (
            "no Content-Length",
            send,
            411,
            format!("POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n")
                .into_bytes(),
        ),
        (
            "chunked",
            send,
            411,
            format!(
                "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "a Content-Length over both limits, from the head",
            send,
            413,
            format!(
                "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\
                 Content-Length: 100000\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "a body over MAX_BODY",
            send,
            413,
            with_key("POST", "/api/v1/notifications/send", "", &"x".repeat(2000)),
        ),
        (
            "a batch over MAX_BATCH_BODY",
            "POST /api/v1/notifications/batch",
            413,
            // Declared only: refused from the head, so the body is never sent (the server would
            // close on unread bytes).
            format!(
                "POST /api/v1/notifications/batch HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\
                 Content-Length: 4000\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "a Content-Length over the limits on a GET",
            "GET /api/v1/notifications/user/{user_id}",
            413,
            format!(
                "GET /api/v1/notifications/user/u1 HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\
                 Content-Length: 100000\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "form data",
            send,
            415,
            with_key(
                "POST",
                "/api/v1/notifications/send",
                "Content-Type: application/x-www-form-urlencoded\r\n",
                "user_id=u1&message=hi",
            ),
        ),
        (
            "text to the alias",
            "POST /notifications",
            415,
            with_key("POST", "/notifications", "Content-Type: text/plain\r\n", message),
        ),
        (
            "a head over MAX_HEADER_BYTES",
            "GET /api/v1/notifications/user/{user_id}",
            431,
            format!(
                "GET /api/v1/notifications/user/u1 HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(3000)
            )
            .into_bytes(),
        ),
        (
            "HTTP/2.0",
            "GET /health",
            505,
            b"GET /health HTTP/2.0\r\nHost: t\r\n\r\n".to_vec(),
        ),
        (
            "a malformed header",
            "GET /health",
            400,
            b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n".to_vec(),
        ),
        (
            "no key",
            send,
            401,
            format!(
                "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{message}",
                message.len()
            )
            .into_bytes(),
        ),
        (
            "a wrong key",
            "GET /notifications",
            401,
            b"GET /notifications?user_id=u1 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer nope\r\n\r\n"
                .to_vec(),
        ),
        (
            "not JSON",
            send,
            400,
            with_key("POST", "/api/v1/notifications/send", "", "{\"message\":"),
        ),
        (
            "no target",
            send,
            400,
            with_key("POST", "/api/v1/notifications/send", "", r#"{"message":"hi"}"#),
        ),
        (
            "a history limit of 0",
            "GET /api/v1/notifications/user/{user_id}",
            400,
            with_key("GET", "/api/v1/notifications/user/u1?limit=0", "", ""),
        ),
        (
            "read of an unknown notification",
            "PUT /api/v1/notifications/{user_id}/{notification_id}/read",
            404,
            with_key(
                "PUT",
                "/api/v1/notifications/u1/0190b3c4-5d6e-7f00-8a00-0123456789ab/read",
                "",
                "",
            ),
        ),
        (
            "a scheduled id that is not a UUID",
            "DELETE /api/v1/notifications/scheduled/{id}",
            400,
            with_key("DELETE", "/api/v1/notifications/scheduled/nope", "", ""),
        ),
        (
            "GET /ws without an upgrade",
            "GET /ws",
            400,
            b"GET /ws?user_id=u1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
        ),
    ];
    for (what, operation, status, request) in cases {
        let r = exchange(&server, &request);
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_described(&doc, operation, &r, None);
    }

    // 405: no operation lists it (it is the answer to a method no operation has); the components
    // describe it.
    let r = exchange(
        &server,
        &with_key("PATCH", "/api/v1/notifications/send", "", ""),
    );
    assert_eq!(r.status, 405);
    assert_described(
        &doc,
        "POST /api/v1/notifications/send",
        &r,
        Some("MethodNotAllowed"),
    );

    // 408: a head that stops half-way.
    let mut s = server.tcp();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_responses(&raw).into_iter().next().expect("an answer");
    assert_eq!(r.status, 408);
    assert_described(&doc, "GET /health", &r, None);

    // 422: an Idempotency-Key used again with another body.
    let first = with_key(
        "POST",
        "/api/v1/notifications/send",
        "Idempotency-Key: k-1\r\n",
        message,
    );
    let r = exchange(&server, &first);
    assert_eq!(r.status, 201);
    assert_described(&doc, send, &r, None);
    let r = exchange(
        &server,
        &with_key(
            "POST",
            "/api/v1/notifications/send",
            "Idempotency-Key: k-1\r\n",
            r#"{"user_id":"u1","message":"other"}"#,
        ),
    );
    assert_eq!(r.status, 422);
    assert_described(&doc, send, &r, None);
}

/// 429 and `503 too_many_connections` need a server of their own (a rate limit and a connection cap).
#[test]
fn rate_limit_and_connection_cap_answers_are_described() {
    let doc = description();
    let server = TestServer::start_with(&[
        ("API_KEY", KEY),
        ("RATE_LIMIT_API", "1"),
        ("RATE_LIMIT_API_BURST", "1"),
        ("MAX_CONNECTIONS", "2"),
    ]);
    let history = "GET /api/v1/notifications/user/{user_id}";
    let request = with_key("GET", "/api/v1/notifications/user/u1", "", "");
    let first = exchange(&server, &request);
    assert_eq!(first.status, 200);
    assert_described(&doc, history, &first, None);
    let limited = exchange(&server, &request);
    assert_eq!(limited.status, 429);
    assert_described(&doc, history, &limited, None);

    // Two connections held open, each admitted (answered on a kept-alive connection); the third is
    // over MAX_CONNECTIONS.
    let _held: Vec<_> = (0..2).map(|_| admitted_connection(&server)).collect();
    let over = exchange(
        &server,
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(over.status, 503, "{}", String::from_utf8_lossy(&over.body));
    assert_described(&doc, "GET /health", &over, None);
    assert_described(&doc, history, &over, None);
}

/// A kept-alive connection the server admitted: it answered a request on it. The connections of
/// earlier requests give their slots back only once the server has closed them, so a new one may be
/// refused for a moment; it is then tried again.
fn admitted_connection(server: &TestServer) -> TcpStream {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let mut s = server.tcp();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        // One whole answer: its head, then as many bytes as its Content-Length says.
        let answer = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break None,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if let Some(r) = parse_responses(&raw).into_iter().next() {
                let declared = r.header("content-length").map_or(0, |v| v.parse().unwrap());
                if r.body.len() == declared {
                    break Some(r);
                }
            }
        };
        if answer.is_some_and(|r| r.status == 200) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no connection was admitted within {:?}",
            common::WAIT
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to run schemathesis here, or `None` (with a note, or a panic under `CI=true`).
fn find_schemathesis() -> Option<Vec<String>> {
    let candidates = std::env::var("SCHEMATHESIS")
        .ok()
        .map(|s| vec![s])
        .into_iter()
        .chain([
            vec!["schemathesis".to_owned()],
            vec!["python3".into(), "-m".into(), "schemathesis.cli".into()],
        ]);
    for candidate in candidates {
        let version = Command::new(&candidate[0])
            .args(&candidate[1..])
            .arg("--version")
            .output();
        if let Ok(out) = version {
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !text.contains(SCHEMATHESIS_VERSION) {
                    eprintln!(
                        "note: {} is not the pinned {SCHEMATHESIS_VERSION}: {}",
                        candidate.join(" "),
                        text.trim()
                    );
                }
                return Some(candidate);
            }
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "schemathesis is not installed and CI=true requires it: \
             python3 -m pip install schemathesis=={SCHEMATHESIS_VERSION}"
        );
    }
    eprintln!(
        "note: skipping the schemathesis test: schemathesis is not installed \
         (python3 -m pip install schemathesis=={SCHEMATHESIS_VERSION})"
    );
    None
}

/// Runs `command` to its end, killing it after `deadline`.
fn run_with_deadline(mut command: Command, deadline: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start schemathesis");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis ran longer than {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

#[test]
fn schemathesis_finds_no_answer_outside_the_description() {
    let Some(schemathesis) = find_schemathesis() else {
        return;
    };
    // A long-poll that finds nothing answers at once here (`timeout_s` is at most 0), instead of
    // parking each generated request.
    let server = TestServer::start_with(&[("API_KEY", KEY), ("MAX_POLL_TIMEOUT_S", "0")]);
    // A few notifications in an inbox, so that history pages are not all empty.
    for i in 0..3 {
        let r = exchange(
            &server,
            &with_key(
                "POST",
                "/api/v1/notifications/send",
                "",
                &json!({"user_id": "user123", "message": format!("m{i}"), "data": {"i": i}})
                    .to_string(),
            ),
        );
        assert_eq!(r.status, 201);
    }
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| SCHEMATHESIS_SEED.into());
    // schemathesis and Hypothesis keep state in the working directory (failures they replay first,
    // examples they reuse): a fresh one, so that a run depends on its seed alone and leaves nothing in
    // the repository.
    let workdir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(&schemathesis[0]);
    command
        .args(&schemathesis[1..])
        .current_dir(workdir.path())
        .env("NO_COLOR", "1")
        .arg("run")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(DESCRIPTION))
        .arg("--url")
        .arg(format!("http://{}", server.addr))
        .arg("--header")
        .arg(format!("Authorization: Bearer {KEY}"))
        .args(["--checks", SCHEMATHESIS_CHECKS])
        .args(["--max-examples", SCHEMATHESIS_EXAMPLES])
        .args(["--seed", &seed])
        // The SSE stream never ends by itself, so a generated request would only time out; its
        // answers are checked by tests/sse.rs.
        .args(["--exclude-path", STREAM_PATH])
        .args(["--request-timeout", "10", "--no-color"]);
    let out = run_with_deadline(command, SCHEMATHESIS_DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found answers outside docs/openapi.yaml (seed {seed}, exit {}):\n{}",
        out.status,
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
    // It really ran every operation (a description it could not load also ends in a message).
    let operations = described_operations(&description()).len();
    let selected = operations - 1;
    assert!(
        text.contains(&format!("{selected} selected / {operations} total")),
        "schemathesis did not select every operation:\n{}",
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
    assert!(
        text.contains(&format!("Tested: {selected}")),
        "schemathesis did not test every operation:\n{}",
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
}
