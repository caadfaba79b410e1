//! `GET /openapi.yaml`: the OpenAPI 3.1 description of the HTTP API (`docs/openapi.yaml`), built into
//! the binary so the server always serves the description of the routes it has.
//!
//! Open like `/health` (see `crate::auth`): a description of the routes is no secret, and client
//! generators and API explorers fetch it before they have a key.

use crate::http::response::Response;

/// Media type of the description (RFC 9512).
pub const OPENAPI_CONTENT_TYPE: &str = "application/yaml";

/// The description, as committed in `docs/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

/// `GET /openapi.yaml`.
pub fn openapi() -> Response {
    Response::text(200, OPENAPI_CONTENT_TYPE, OPENAPI_YAML.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pusher::Call as PusherCall;
    use crate::api::{path_segments, resolve, Endpoint};
    use crate::http::request::Method;

    /// Every endpoint once, numbered by an exhaustive match: a new endpoint does not compile until it
    /// has a number here, and then [`every_route_of_the_router_is_described`] fails until the
    /// description has an operation that reaches it.
    const ENDPOINTS: usize = 28;

    fn number(e: &Endpoint) -> usize {
        match e {
            Endpoint::Send => 0,
            Endpoint::Batch => 1,
            Endpoint::Schedule => 2,
            Endpoint::GetScheduled(_) => 3,
            Endpoint::CancelScheduled(_) => 4,
            Endpoint::History(_) => 5,
            Endpoint::HistoryByQuery => 6,
            Endpoint::Read(_, _) => 7,
            Endpoint::ReadAll(_) => 8,
            Endpoint::Delete(_, _) => 9,
            Endpoint::Health => 10,
            Endpoint::Metrics => 11,
            Endpoint::OpenApi => 12,
            Endpoint::WebSocket => 13,
            Endpoint::Page => 14,
            Endpoint::Asset(_) => 15,
            Endpoint::Stream => 16,
            Endpoint::Poll => 17,
            Endpoint::Seen(_) => 18,
            Endpoint::Pusher(_, call) => match call {
                PusherCall::Events => 19,
                PusherCall::BatchEvents => 20,
                PusherCall::Channels => 21,
                PusherCall::Channel(_) => 22,
                PusherCall::TerminateUser(_) => 23,
                PusherCall::ChannelUsers(_) => 27,
            },
            Endpoint::Presence(_) => 24,
            Endpoint::GetPreferences(_) => 25,
            Endpoint::PutPreferences(_) => 26,
        }
    }

    /// The description's operations as (method, path template).
    fn described_operations() -> Vec<(Method, String)> {
        let doc: serde_yaml::Value = serde_yaml::from_str(OPENAPI_YAML).expect("the YAML parses");
        assert_eq!(doc["openapi"].as_str(), Some("3.1.0"));
        let paths = doc["paths"].as_mapping().expect("paths");
        let mut operations = Vec::new();
        for (path, item) in paths {
            let path = path.as_str().expect("a path is a string");
            for (key, _) in item.as_mapping().expect("a path item") {
                let method = match key.as_str() {
                    Some("get") => Method::Get,
                    Some("post") => Method::Post,
                    Some("put") => Method::Put,
                    Some("delete") => Method::Delete,
                    Some("parameters") => continue,
                    other => panic!("{path}: an operation the router has no method for: {other:?}"),
                };
                operations.push((method, path.to_owned()));
            }
        }
        operations
    }

    /// A path template with every `{parameter}` filled in (a user id the router takes as one).
    fn filled(template: &str) -> String {
        template
            .split('/')
            .map(|segment| match segment {
                "{user_id}" => "u1",
                "{name}" => "monitor.js",
                "{channel}" => "presence-room",
                s if s.starts_with('{') => "0190b3c4-5d6e-7f00-8a00-0123456789ab",
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn every_route_of_the_router_is_described() {
        let mut reached = [false; ENDPOINTS];
        for (method, template) in described_operations() {
            let path = filled(&template);
            let endpoint = resolve(method, &path_segments(&path).unwrap())
                .unwrap_or_else(|| panic!("{method} {template} is described but not routed"));
            reached[number(&endpoint)] = true;
        }
        // The router's other way to a route: `/notifications?user_id=` is the same endpoint as its
        // own operation, and HEAD is GET (described once in the info text), so no endpoint is missed
        // for them.
        for (i, reached) in reached.iter().enumerate() {
            assert!(
                reached,
                "endpoint number {i} of `number` has no operation in docs/openapi.yaml"
            );
        }
    }

    #[test]
    fn the_description_is_served_as_yaml() {
        let r = openapi();
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, Some("application/yaml"));
        assert_eq!(r.body, OPENAPI_YAML.as_bytes());
    }
}
