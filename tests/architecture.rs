//! The module layering of docs/architecture.md ("Layers"), checked from the source text.
//!
//! Every file under `src/` is read, comments and string literals are blanked out, and each path that
//! names a top-level module of the crate (`use crate::x`, `use crate::{x, y}`, `crate::x::…` anywhere,
//! including inside functions, and `super::` chains that climb to the crate root) becomes an edge
//! "the file's top-level module → x". The test fails on a cycle among top-level modules and on an edge
//! that breaks a layer rule, printing each offending edge with the file and line that makes it.
//!
//! Why from the text and not from rustc: the rules are about which module may name which, and a
//! name in the source is exactly that; the scan needs no extra dependency and runs in milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Modules that may import nothing of the crate but the listed ones (an empty list: nothing at all).
/// Each rule says why the module sits where it does.
const ONLY_IMPORTS: &[(&str, &[&str], &str)] = &[
    (
        "model",
        &[],
        "the notification is the vocabulary of every layer, so it depends on none",
    ),
    (
        "http",
        &[],
        "the HTTP/1.1 parser and writer are generic: they know no notification module",
    ),
    (
        "metrics",
        &[],
        "counters and the Prometheus writer are used by every layer, so they depend on none",
    ),
    (
        "tls",
        &[],
        "TLS set-up for outgoing connections is generic: the store and the bus map their settings onto it",
    ),
    (
        "delivery",
        &["model", "preferences"],
        "what crosses threads (deliveries, frames, shard inbox messages) is the shared leaf",
    ),
    (
        "pusher",
        &["model", "http", "json_depth"],
        "the Pusher protocol and signatures are pure: the session lives in `connection`, the routes in `api`, the frames in `delivery`",
    ),
    (
        "presence",
        &["model", "delivery"],
        "the presence registry is node-wide state that shards, the bus thread and the API all touch, so it names none of them",
    ),
    (
        "preferences",
        &["model"],
        "users' preferences are read by the store thread, the shards and the bus, so they sit below them",
    ),
    (
        "audit",
        &["model"],
        "the audit log is a sink that every layer (api, auth, bus, shard) writes to, so it sits below them",
    ),
];

/// Imports that break a layer: `(module, forbidden imports, why)`.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "store",
        &["bus", "shard", "http", "ws", "api", "connection", "server"],
        "the store returns data; fan-out, shards and protocols sit above it",
    ),
    (
        "bus",
        &["shard", "http", "ws", "api", "connection", "server"],
        "the bus hands deliveries to shard inboxes through `delivery`, never into a shard",
    ),
    (
        "config",
        &["bus", "shard", "ws", "api", "connection", "server"],
        "settings are read once and handed down; they depend on no running part",
    ),
    (
        "shard",
        &["api", "connection", "server"],
        "a shard holds connections and routes deliveries; the connection task above it speaks HTTP",
    ),
    (
        "ws",
        &["shard", "api", "connection", "server"],
        "the WebSocket wire (handshake, codec, protocol) is pure; sessions live in `connection`",
    ),
    (
        "api",
        &["shard", "ws", "connection", "server"],
        "handlers take a narrow context, so they run (and are tested) without a shard",
    ),
];

/// Where an edge was seen first.
#[derive(Debug, Clone)]
struct Witness {
    file: PathBuf,
    line: usize,
}

#[test]
fn top_level_modules_form_no_cycle_and_keep_their_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level_modules(&src);
    let mut failures = Vec::new();
    for (module, _, _) in ONLY_IMPORTS.iter().chain(FORBIDDEN) {
        if !modules.contains(*module) {
            failures.push(format!(
                "the layer rules name `{module}`, which is not a top-level module of src/: \
                 update tests/architecture.rs with the module map"
            ));
        }
    }
    let edges = crate_edges(&src, &modules);
    for ((from, to), w) in &edges {
        for (module, allowed, why) in ONLY_IMPORTS {
            if from == module && !allowed.contains(&to.as_str()) {
                failures.push(format!(
                    "{from} → {to} ({}:{}): `{module}` may import only {allowed:?} ({why})",
                    w.file.display(),
                    w.line
                ));
            }
        }
        for (module, forbidden, why) in FORBIDDEN {
            if from == module && forbidden.contains(&to.as_str()) {
                failures.push(format!(
                    "{from} → {to} ({}:{}): `{module}` must not import `{to}` ({why})",
                    w.file.display(),
                    w.line
                ));
            }
        }
    }
    for cycle in cycles(&edges) {
        let mut text = format!("cycle among top-level modules: {}", cycle.join(" → "));
        for pair in cycle.windows(2) {
            let w = &edges[&(pair[0].clone(), pair[1].clone())];
            text.push_str(&format!(
                "\n    {} → {} ({}:{})",
                pair[0],
                pair[1],
                w.file.display(),
                w.line
            ));
        }
        failures.push(text);
    }
    assert!(
        failures.is_empty(),
        "the module layering is broken (docs/architecture.md, \"Layers\"):\n{}",
        failures.join("\n")
    );
}

/// The scanner itself: what counts as an import and what does not.
#[test]
fn the_scanner_sees_every_form_of_crate_path_and_nothing_in_comments_or_strings() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = r##"
        use crate::a::thing;
        use crate::{b::x, c};
        fn f() { let _ = crate::d::g(); }
        // crate::e::not_this
        /// [`link`](crate::e::not_this_either)
        const S: &str = "crate::e::nor_this";
        const R: &str = r#"crate::e::nor "this""#;
        use super::super::f::y;
    "##;
    let found: BTreeSet<String> = crate_paths(&blank_comments_and_strings(text), &["z", "w"])
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| modules.contains(m))
        .collect();
    let expected: BTreeSet<String> = ["a", "b", "c", "d", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
}

/// The names of `src/`'s top-level modules: `src/x.rs` and `src/x/`.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            if p.is_dir() {
                Some(p.file_name()?.to_str()?.to_owned())
            } else if p.extension()? == "rs" {
                let stem = p.file_stem()?.to_str()?;
                (stem != "lib" && stem != "main").then(|| stem.to_owned())
            } else {
                None
            }
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The edges between distinct top-level modules, each with the first place that makes it.
fn crate_edges(src: &Path, modules: &BTreeSet<String>) -> BTreeMap<(String, String), Witness> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut edges = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let module_path = module_path_of(relative);
        let Some(from) = module_path.first().cloned() else {
            continue; // lib.rs and main.rs are the root: they declare modules, they sit in no layer.
        };
        let text = blank_comments_and_strings(&fs::read_to_string(&file).unwrap());
        let segments: Vec<&str> = module_path.iter().map(String::as_str).collect();
        for (to, offset) in crate_paths(&text, &segments) {
            if to != from && modules.contains(&to) {
                let line = text[..offset].matches('\n').count() + 1;
                edges.entry((from.clone(), to)).or_insert(Witness {
                    file: Path::new("src").join(relative),
                    line,
                });
            }
        }
    }
    edges
}

/// A file's module path: `a/b.rs` and `a/b/mod.rs` are `[a, b]`; `lib.rs` and `main.rs` are `[]`.
fn module_path_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_str().unwrap().to_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.strip_suffix(".rs").unwrap();
    if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
        parts.push(stem.to_owned());
    }
    parts
}

/// The top-level module each crate path in `text` names, with its byte offset: `crate::x`,
/// `crate::{x, y::…}`, and `super::…::x` when the `super`s climb from `module_path` to the root.
fn crate_paths(text: &str, module_path: &[&str]) -> Vec<(String, usize)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        if !at_word_start {
            i += 1;
            continue;
        }
        if text[i..].starts_with("crate") && !bytes.get(i + 5).copied().is_some_and(is_ident) {
            let rest = skip_space(text, i + 5);
            if text[rest..].starts_with("::") {
                names_after(text, rest + 2, i, &mut found);
            }
            i += 5;
            continue;
        }
        if text[i..].starts_with("super") && !bytes.get(i + 5).copied().is_some_and(is_ident) {
            // Count the chain of `super::`; from a file's module path of depth d, d of them reach
            // the root (inline modules such as `mod tests` add a level; this is checked only for the
            // common case, where climbing past the file's own path is what matters).
            let mut j = i;
            let mut supers = 0;
            while text[j..].starts_with("super") {
                let after = skip_space(text, j + 5);
                if !text[after..].starts_with("::") {
                    break;
                }
                supers += 1;
                j = skip_space(text, after + 2);
            }
            if supers > 0 && supers >= module_path.len() {
                names_after(text, j, i, &mut found);
            }
            i = j.max(i + 5);
            continue;
        }
        i += 1;
    }
    found
}

/// The top-level names at `start`: one identifier, or each first identifier in a `{…}` group.
fn names_after(text: &str, start: usize, offset: usize, found: &mut Vec<(String, usize)>) {
    let start = skip_space(text, start);
    let bytes = text.as_bytes();
    if bytes.get(start) == Some(&b'{') {
        // `crate::{a::x, b, c::{d, e}}`: the first identifier of each top-level item.
        let mut depth = 0;
        let mut expect_name = true;
        let mut k = start;
        while k < bytes.len() {
            match bytes[k] {
                b'{' => {
                    depth += 1;
                    expect_name = depth == 1;
                    k += 1;
                }
                b'}' => {
                    depth -= 1;
                    k += 1;
                    if depth == 0 {
                        break;
                    }
                }
                b',' => {
                    expect_name = depth == 1;
                    k += 1;
                }
                c if is_ident(c) => {
                    let end = ident_end(text, k);
                    if expect_name {
                        found.push((text[k..end].to_owned(), offset));
                        expect_name = false;
                    }
                    k = end;
                }
                _ => k += 1,
            }
        }
    } else if bytes.get(start).copied().is_some_and(is_ident) {
        let end = ident_end(text, start);
        found.push((text[start..end].to_owned(), offset));
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_end(text: &str, start: usize) -> usize {
    start + text[start..].bytes().take_while(|&c| is_ident(c)).count()
}

fn skip_space(text: &str, start: usize) -> usize {
    start
        + text[start..]
            .bytes()
            .take_while(u8::is_ascii_whitespace)
            .count()
}

/// The text with comments (line, block, doc) and string and char literals replaced by spaces,
/// newlines kept, so offsets still give line numbers and no path inside them counts as an import.
fn blank_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if (b[i] == b'r' || (b[i] == b'b' && b.get(i + 1) == Some(&b'r')))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // A raw string: r"…", r#"…"#, br"…".
            let start = i;
            let mut j = i + if b[i] == b'b' { 2 } else { 1 };
            let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
            j += hashes;
            if b.get(j) != Some(&b'"') {
                i += 1;
                continue;
            }
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            j += 1;
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            let end = (j + close.len()).min(b.len());
            blank(&mut out, start, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\''), not a lifetime ('a) or a loop label.
            let len = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(3)
            } else {
                None
            };
            match len {
                Some(len) if i + len <= b.len() => {
                    blank(&mut out, i, i + len);
                    i += len;
                }
                _ => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

/// Every elementary cycle's representative: for each strongly connected component with more than one
/// module, one cycle through it (enough to name the edges to break).
fn cycles(edges: &BTreeMap<(String, String), Witness>) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().push(to);
        graph.entry(to).or_default();
    }
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out = Vec::new();
    // For each edge a → b not yet reported, a shortest way back b ⇝ a closes a cycle.
    for (from, to) in edges.keys() {
        if reported.contains(&(from.clone(), to.clone())) {
            continue;
        }
        if let Some(back) = shortest_path(&graph, to, from) {
            let mut cycle = vec![from.clone()];
            cycle.extend(back.iter().map(|s| s.to_string()));
            for pair in cycle.windows(2) {
                reported.insert((pair[0].clone(), pair[1].clone()));
            }
            out.push(cycle);
        }
    }
    out
}

/// The shortest path `from ⇝ to` (both included), breadth first.
fn shortest_path<'a>(
    graph: &BTreeMap<&'a str, Vec<&'a str>>,
    from: &'a str,
    to: &'a str,
) -> Option<Vec<&'a str>> {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = BTreeSet::from([from]);
    while let Some(node) = queue.pop_front() {
        if node == to {
            let mut path = vec![to];
            let mut at = to;
            while at != from {
                at = previous[at];
                path.push(at);
            }
            path.reverse();
            return Some(path);
        }
        for &next in &graph[node] {
            if seen.insert(next) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}
