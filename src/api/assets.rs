//! The monitor and demo page: `GET /` and its static files under `/assets/`, embedded in the binary at
//! build time (`web/` and the JavaScript SDK of `clients/js/`), so a deployment has nothing to copy
//! beside the executable and the page always speaks the protocol of the server that serves it.
//!
//! These routes are open like `/health` (see `crate::auth`): the files hold no data, and the page asks
//! for an API key, a token or a metrics token itself when the server wants one.

use crate::http::response::Response;

/// One embedded file.
struct Asset {
    /// The name under `/assets/` (the page itself is `/`).
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The page at `/`.
const INDEX: &[u8] = include_bytes!("../../web/index.html");

/// The files under `/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "monitor.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/monitor.js"),
    },
    Asset {
        name: "monitor.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/monitor.css"),
    },
    // The SDK as published (clients/js/index.js): the page is built on it, and browsers may load it
    // from here too.
    Asset {
        name: "notifications.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../clients/js/index.js"),
    },
];

/// What the page may load and connect to: its own origin only (WebSocket included), no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; base-uri 'none'; frame-ancestors 'none'";

/// `GET /`.
pub fn index() -> Response {
    with_static_headers(Response::text(
        200,
        "text/html; charset=utf-8",
        INDEX.to_vec(),
    ))
    .with_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
}

/// `GET /assets/:name`; `404 not_found` for a name that is not embedded.
pub fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => with_static_headers(Response::text(200, a.content_type, a.body.to_vec())),
        None => Response::error(404, "not_found", "no such asset"),
    }
}

/// Caching: `no-cache` (revalidate), since a new binary may serve new files under the same names.
fn with_static_headers(response: Response) -> Response {
    response
        .with_header("Cache-Control", "no-cache")
        .with_header("X-Content-Type-Options", "nosniff")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let page = std::str::from_utf8(INDEX).unwrap();
        for a in ASSETS.iter().filter(|a| a.name != "notifications.js") {
            assert!(
                page.contains(&format!("/assets/{}", a.name)),
                "{} unused",
                a.name
            );
        }
        let script = std::str::from_utf8(asset("monitor.js").body.as_slice())
            .unwrap()
            .to_owned();
        assert!(script.contains("./notifications.js"));
        assert_eq!(asset("notifications.js").status, 200);
        assert_eq!(asset("nope.js").status, 404);
        assert_eq!(index().content_type, Some("text/html; charset=utf-8"));
    }
}
