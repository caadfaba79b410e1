//! A `/metrics` scrape, parsed with a real Prometheus text-format parser (`prometheus-parse`) after a
//! strict line-by-line check of the format (that parser skips lines it cannot read, so the check is
//! what makes a malformed line fail the test).
#![allow(dead_code)]

use std::collections::BTreeSet;

use prometheus_parse::Value;

use super::auth::request_with;
use super::TestServer;

/// One scrape of a server's `/metrics`.
pub struct Scrape {
    /// The exposition as served.
    pub text: String,
    /// As parsed.
    pub parsed: prometheus_parse::Scrape,
}

impl Scrape {
    /// Scrapes `server` (with `Authorization: Bearer <token>` when given), asserting a 200 in the
    /// text format and a well-formed body.
    pub fn of(server: &TestServer, token: Option<&str>) -> Scrape {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("Authorization", b)])
            .unwrap_or_default();
        let r = request_with(server, "GET", "/metrics", None, &headers);
        assert_eq!(
            r.status,
            200,
            "scrape: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
            "content type {:?}",
            r.header("content-type")
        );
        let text = String::from_utf8(r.body).expect("the exposition is UTF-8");
        check_format(&text);
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("the exposition parses");
        Scrape { text, parsed }
    }

    /// Every family named by a `# TYPE` line.
    pub fn families(&self) -> BTreeSet<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect()
    }

    /// The value of the counter, gauge or untyped sample `name` whose labels include `labels`
    /// (summed when several match); `None` when none does.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.parsed.samples {
            if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            let v = match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => continue,
            };
            found = Some(found.unwrap_or(0.0) + v);
        }
        found
    }

    /// Like [`Scrape::find`], failing the test when the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} missing from:\n{}", self.text))
    }

    /// A histogram's cumulative buckets `(le, count)`, as parsed.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        self.parsed
            .samples
            .iter()
            .find_map(|s| match &s.value {
                Value::Histogram(b) if s.metric == name => {
                    Some(b.iter().map(|h| (h.less_than, h.count)).collect())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("histogram {name} missing from:\n{}", self.text))
    }

    /// A histogram's observation count (its `_count` sample).
    pub fn count(&self, name: &str) -> f64 {
        self.value(&format!("{name}_count"), &[])
    }
}

/// Fails on any line that is not a `# HELP`, a `# TYPE` or a sample of the text format, on a sample
/// of a family without `# TYPE`, and on a family declared twice.
fn check_format(text: &str) {
    let mut declared = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(rest.split_once(' ').is_some(), "HELP without text: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "unknown type: {line}"
            );
            assert!(is_metric_name(name), "bad family name: {line}");
            assert!(declared.insert(name.to_owned()), "declared twice: {line}");
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample: name value");
        assert!(
            value == "+Inf" || value == "-Inf" || value == "NaN" || value.parse::<f64>().is_ok(),
            "bad value: {line}"
        );
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(is_metric_name(k) && !k.contains(':'), "bad label: {line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value: {line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(is_metric_name(name), "bad metric name: {line}");
        let (family, kind) = current
            .as_ref()
            .unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
        let belongs = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family))
        } else {
            name == family
        };
        assert!(belongs, "sample {name} is not of family {family}: {line}");
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}
