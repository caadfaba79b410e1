//! The Grafana dashboard of deploy/grafana/ against a live server: every PromQL expression in it parses
//! (with `promql-parser`), and every metric it reads is one the server exposes (a live scrape of a node
//! joined to Redis, so the bus's families are there too). Also what ties the deploy files together:
//! the panels' data source is the provisioned one, the provider loads the folder compose mounts, the
//! Prometheus job scrapes what the dashboard filters on with the token file compose writes, and the
//! README lists the dashboard's panels.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::prometheus::Scrape;
use common::redis::TestRedis;
use common::TestServer;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/dashboards/notification-service.json";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included, rows themselves left out.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            if p["type"] != "row" {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The metric names a PromQL expression selects.
fn selected_metrics(expr: &str) -> Result<BTreeSet<String>, String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            let selector = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = selector {
                let name = vs
                    .name
                    .clone()
                    .ok_or_else(|| format!("a selector without a metric name: {vs}"))?;
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let ast = parser::parse(expr)?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &ast)?;
    Ok(names.0)
}

/// The family a sample name belongs to: a histogram's `_bucket`, `_sum` and `_count` are its own.
fn family_of(name: &str, histograms: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

#[test]
fn the_scanner_finds_every_selector_and_refuses_bad_promql() {
    let names = selected_metrics(
        r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="$job"}[5m]))) / on() group_left b + scalar(c)"#
            .replace("$job", "x")
            .as_str(),
    )
    .unwrap();
    assert_eq!(
        names,
        BTreeSet::from(["a_bucket".into(), "b".into(), "c".into()])
    );
    assert!(selected_metrics("sum(rate(x[1m])").is_err(), "unbalanced");
    assert!(selected_metrics(r#"{job="x"}"#).is_err(), "no metric name");
    let histograms = BTreeSet::from(["h".to_owned()]);
    assert_eq!(family_of("h_bucket", &histograms), "h");
    assert_eq!(family_of("x_count", &histograms), "x_count");
}

#[test]
fn every_metric_the_dashboard_queries_is_exposed_by_a_live_server() {
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    let server = TestServer::start_with(&[
        ("REDIS_URL", redis.url.as_str()),
        ("REDIS_PREFIX", redis.prefix.as_str()),
    ]);
    // The Redis families are there once the bus has connected.
    common::wait_until("the bus to connect", common::WAIT, || {
        Scrape::of(&server, None).find("notif_redis_up", &[]) == Some(1.0)
    });
    let scrape = Scrape::of(&server, None);
    let exposed = scrape.families();
    let histograms: BTreeSet<String> = scrape
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .map(str::to_owned)
        .collect();

    let dashboard = dashboard();
    let mut queried = BTreeSet::new();
    let mut failures = Vec::new();
    let panels = panels(&dashboard);
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if targets.is_empty() {
            failures.push(format!("panel {title:?} has no query"));
        }
        for target in targets {
            // Grafana replaces `$job` before Prometheus sees the query.
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$job", "j");
            match selected_metrics(&expr) {
                Ok(names) if names.is_empty() => {
                    failures.push(format!("{title:?}: selects no metric: {expr}"))
                }
                Ok(names) => queried.extend(names),
                Err(e) => failures.push(format!("{title:?}: not PromQL ({e}): {expr}")),
            }
        }
    }
    // The `job` variable's query, `label_values(<metric>, job)`.
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"].as_str().unwrap_or_default();
        if let Some(metric) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split(',').next())
        {
            queried.insert(metric.trim().to_owned());
        }
    }
    for name in &queried {
        if !exposed.contains(&family_of(name, &histograms)) {
            failures.push(format!("{name} is queried but not exposed"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\nexposed: {exposed:#?}");
    // And the dashboard shows the operator's first questions: at least these families.
    for family in [
        "notif_websocket_connections",
        "notif_deliveries_by_kind_total",
        "notif_send_to_commit_seconds_bucket",
        "notif_commit_to_write_seconds_bucket",
        "notif_store_commits_total",
        "notif_store_batch_size_bucket",
        "notif_redis_up",
        "notif_refused_total",
        "notif_http_responses_total",
    ] {
        assert!(
            queried.contains(family),
            "the dashboard does not show {family}"
        );
    }
}

#[test]
fn the_deploy_files_agree_with_each_other() {
    let dashboard = dashboard();
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"], "prometheus");
    let uid = source["uid"].as_str().expect("the data source has a uid");
    for panel in panels(&dashboard) {
        assert_eq!(
            panel["datasource"]["uid"], uid,
            "panel {} uses another data source",
            panel["title"]
        );
    }

    // Compose mounts the provisioning and the dashboards where the provider looks.
    let compose = yaml("docker-compose.yml");
    let grafana_volumes: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .expect("grafana volumes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let providers = yaml("deploy/grafana/provisioning/dashboards/notification-service.yml");
    let dashboards_path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(
        grafana_volumes
            .contains(&format!("./deploy/grafana/dashboards:{dashboards_path}:ro").as_str()),
        "{grafana_volumes:?}"
    );
    assert!(grafana_volumes.contains(&"./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"));
    assert!(source["url"]
        .as_str()
        .unwrap()
        .starts_with("http://prometheus:"));

    // The scrape job is the dashboard's default `job`, sends the token compose writes, and finds the
    // server's containers by the service name.
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    let job_name = job["job_name"].as_str().unwrap();
    assert_eq!(
        dashboard["templating"]["list"][0]["current"]["value"], job_name,
        "the dashboard's default job"
    );
    assert_eq!(job["metrics_path"], "/metrics");
    assert_eq!(job["authorization"]["type"], "Bearer");
    let token_file = job["authorization"]["credentials_file"].as_str().unwrap();
    let entrypoint = compose["services"]["prometheus"]["entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        entrypoint.contains(&format!("> {token_file}")),
        "compose must write the token to {token_file}: {entrypoint}"
    );
    assert!(entrypoint.contains("--config.file=/etc/prometheus/prometheus.yml"));
    assert_eq!(job["dns_sd_configs"][0]["names"][0], "notification-service");
    assert_eq!(job["dns_sd_configs"][0]["port"], 8080);
    assert!(compose["services"]["notification-service"].is_object());
}

#[test]
fn the_readme_lists_the_dashboards_panels() {
    let readme = read("README.md");
    let dashboard = dashboard();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap();
        assert!(
            readme.contains(&format!("| {title} |")),
            "README.md does not list the panel {title:?}"
        );
    }
}
