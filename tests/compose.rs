//! `docker-compose.yml` against the Compose Specification's JSON schema, vendored in
//! `deploy/compose-spec.json` (see deploy/README.md for where it came from), so the check needs neither
//! Docker nor the network. Also what the file must say beyond the schema: every service has a health
//! check, and the server waits for its dependencies to be healthy.

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
