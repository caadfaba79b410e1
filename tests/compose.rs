//! `docker-compose.yml` against the Compose Specification's JSON schema, vendored in
//! `deploy/compose-spec.json` (see deploy/README.md for where it came from), so the check needs neither
//! Docker nor the network. Also what the file must say beyond the schema: the five services are there
//! (the server, PostgreSQL, Redis, Prometheus, Grafana), every one has a health check, each waits for
//! what it needs to be healthy, the files it mounts exist in the repository, and its ports are
//! published on the loopback address only.

use std::path::Path;

use serde_json::Value;

/// Reads a file of the repository.
fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A YAML document as the JSON value the schema speaks of.
fn yaml_to_json(text: &str) -> Result<Value, String> {
    serde_yaml::from_str::<Value>(text).map_err(|e| format!("not YAML: {e}"))
}

/// Every violation of the Compose schema, as `path: message` lines (empty: valid).
fn schema_errors(document: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(&read("deploy/compose-spec.json"))
        .expect("the vendored schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the vendored schema compiles");
    validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn docker_compose_yml_follows_the_compose_specification() {
    let document = yaml_to_json(&read("docker-compose.yml")).expect("docker-compose.yml");
    let errors = schema_errors(&document);
    assert!(errors.is_empty(), "docker-compose.yml: {errors:#?}");
}

#[test]
fn an_invalid_compose_document_is_refused() {
    for (what, text) in [
        (
            "an unknown service key",
            "services:\n  app:\n    image: x\n    restartt: always\n",
        ),
        (
            "a wrong depends_on condition",
            "services:\n  app:\n    image: x\n    depends_on:\n      db:\n        condition: when_ready\n  db:\n    image: y\n",
        ),
        ("services as a list", "services:\n  - app\n"),
        (
            "a health check that is a number",
            "services:\n  app:\n    image: x\n    healthcheck: 5\n",
        ),
    ] {
        let document = yaml_to_json(text).expect(what);
        assert!(!schema_errors(&document).is_empty(), "{what} was accepted");
    }
    // And text that is not YAML at all is a clear error, not a panic.
    assert!(yaml_to_json("services: [unclosed").is_err());
}

#[test]
fn every_service_is_health_checked_and_the_server_waits_for_healthy_dependencies() {
    let document = yaml_to_json(&read("docker-compose.yml")).expect("docker-compose.yml");
    let services = document["services"].as_object().expect("services");
    for (name, service) in services {
        assert!(
            service["healthcheck"]["test"].is_array(),
            "{name} has no health check"
        );
    }
    let depends = document["services"]["notification-service"]["depends_on"]
        .as_object()
        .expect("notification-service depends_on, in the long form");
    for dependency in ["postgres", "redis"] {
        assert_eq!(
            depends[dependency]["condition"], "service_healthy",
            "notification-service must wait for {dependency} to be healthy"
        );
    }
}

#[test]
fn the_stack_has_its_five_services_each_waiting_for_what_it_needs() {
    let document = yaml_to_json(&read("docker-compose.yml")).expect("docker-compose.yml");
    let services = document["services"].as_object().expect("services");
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    for wanted in [
        "notification-service",
        "postgres",
        "redis",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(&wanted), "no {wanted} service: {names:?}");
    }
    for (service, dependency) in [
        ("prometheus", "notification-service"),
        ("grafana", "prometheus"),
    ] {
        assert_eq!(
            services[service]["depends_on"][dependency]["condition"], "service_healthy",
            "{service} must wait for {dependency} to be healthy"
        );
    }
    // Every bind mount names a file or folder of the repository; every named volume is declared.
    let declared = document["volumes"].as_object().expect("top-level volumes");
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            let source = volume.split(':').next().unwrap();
            if let Some(relative) = source.strip_prefix("./") {
                let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    declared.contains_key(source),
                    "{name} uses the undeclared volume {source}"
                );
            }
        }
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().expect("short port syntax");
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond the loopback address"
            );
        }
    }
    // Secrets are passed through only when set: an empty API_KEY would be refused at start-up.
    let env = &services["notification-service"]["environment"];
    for secret in ["API_KEY", "JWT_SECRET", "METRICS_TOKEN"] {
        assert!(
            env.get(secret).is_some_and(Value::is_null),
            "{secret} must be passed through (no value), not set"
        );
    }
}

/// The comments say what the file does today: no "not built" or "not yet" left from earlier stages.
#[test]
fn the_compose_file_and_its_page_have_no_stale_claims() {
    for file in ["docker-compose.yml", "docs/docker.md"] {
        let text = read(file).to_lowercase();
        for stale in ["not built", "not yet", "to be added", "todo"] {
            assert!(!text.contains(stale), "{file} says {stale:?}");
        }
    }
}
