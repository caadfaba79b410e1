//! The server under test, as named by a `ws://` URL.
//!
//! The load generator opens tens of thousands of sockets, so a typo in the URL must never aim it at
//! another machine: only IPv4 loopback hosts are accepted (`127.0.0.0/8`, or `localhost`, read as
//! `127.0.0.1` without asking a resolver). IPv6 is refused because the tool spreads connections over
//! source addresses `127.0.0.2`, `127.0.0.3`, ... and `::1` has no such range.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Port assumed when a `ws://` URL names none.
const DEFAULT_WS_PORT: u16 = 80;

/// Where the WebSocket endpoint lives: a loopback address and the request path (with any query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsTarget {
    /// Address to connect to; always in `127.0.0.0/8`.
    pub addr: SocketAddrV4,
    /// Text for the `Host:` header, as written in the URL (`localhost:8080` stays that way).
    pub host_header: String,
    /// Path and query of the upgrade request, such as `/ws` or `/ws?channels=a`.
    pub path: String,
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// Only `ws://` is spoken; `wss://` would need TLS, which this tool does not measure.
    Scheme(String),
    /// The authority part (host and port) is missing or malformed.
    Authority(String),
    /// The host is not an IPv4 loopback address.
    NotLoopback(String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::Scheme(url) => write!(f, "{url}: only ws:// URLs are supported"),
            TargetError::Authority(url) => write!(f, "{url}: expected ws://HOST:PORT/PATH"),
            TargetError::NotLoopback(host) => write!(
                f,
                "{host} is not an IPv4 loopback address: loadtest only targets 127.0.0.0/8 or localhost"
            ),
        }
    }
}

impl std::error::Error for TargetError {}

impl WsTarget {
    /// Parses `ws://HOST[:PORT][/PATH[?QUERY]]` and refuses any host outside IPv4 loopback.
    pub fn parse(url: &str) -> Result<WsTarget, TargetError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| TargetError::Scheme(url.to_string()))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(TargetError::Authority(url.to_string()));
        }
        if authority.starts_with('[') {
            return Err(TargetError::NotLoopback(authority.to_string()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| TargetError::Authority(url.to_string()))?;
                (host, port)
            }
            None => (authority, DEFAULT_WS_PORT),
        };
        if port == 0 {
            return Err(TargetError::Authority(url.to_string()));
        }
        let ip = loopback_host(host)?;
        Ok(WsTarget {
            addr: SocketAddrV4::new(ip, port),
            host_header: authority.to_string(),
            path,
        })
    }

    /// The request path for one user: the URL's path with `user_id=` appended to its query.
    pub fn path_for_user(&self, user_id: &str) -> String {
        let separator = if self.path.contains('?') { '&' } else { '?' };
        format!("{}{}user_id={}", self.path, separator, user_id)
    }
}

/// Resolves a URL host to an IPv4 loopback address, without DNS.
fn loopback_host(host: &str) -> Result<Ipv4Addr, TargetError> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(Ipv4Addr::LOCALHOST);
    }
    match host.parse::<Ipv4Addr>() {
        Ok(ip) if ip.is_loopback() => Ok(ip),
        _ => Err(TargetError::NotLoopback(host.to_string())),
    }
}

/// Parses one source address for client sockets; it must be IPv4 loopback, like the target.
pub fn parse_source_ip(text: &str) -> Result<Ipv4Addr, TargetError> {
    match text.trim().parse::<Ipv4Addr>() {
        Ok(ip) if ip.is_loopback() => Ok(ip),
        _ => Err(TargetError::NotLoopback(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_loopback_url_gives_address_host_and_path() {
        let t = WsTarget::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert_eq!(t.path, "/ws");
    }

    #[test]
    fn localhost_means_127_0_0_1_and_the_port_defaults_to_80() {
        let t = WsTarget::parse("ws://localhost/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(t.host_header, "localhost");
    }

    #[test]
    fn any_address_in_127_slash_8_is_loopback() {
        let t = WsTarget::parse("ws://127.9.8.7:9000").unwrap();
        assert_eq!(t.addr, "127.9.8.7:9000".parse().unwrap());
        assert_eq!(t.path, "/");
    }

    #[test]
    fn a_user_id_is_appended_to_the_query() {
        let t = WsTarget::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.path_for_user("u7"), "/ws?user_id=u7");
        let t = WsTarget::parse("ws://127.0.0.1:8080/ws?channels=a,b").unwrap();
        assert_eq!(t.path_for_user("u7"), "/ws?channels=a,b&user_id=u7");
        let t = WsTarget::parse("ws://127.0.0.1:8080?channels=a").unwrap();
        assert_eq!(t.path_for_user("u7"), "/?channels=a&user_id=u7");
    }

    #[test]
    fn remote_hosts_are_refused() {
        for url in [
            "ws://10.0.0.1:8080/ws",
            "ws://example.com/ws",
            "ws://0.0.0.0:8080/ws",
            "ws://192.0.2.2:8080/ws",
            "ws://[::1]:8080/ws",
        ] {
            assert!(
                matches!(WsTarget::parse(url), Err(TargetError::NotLoopback(_))),
                "{url} should be refused"
            );
        }
    }

    #[test]
    fn malformed_urls_are_refused() {
        assert!(matches!(
            WsTarget::parse("http://127.0.0.1:8080/ws"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            WsTarget::parse("wss://127.0.0.1:8080/ws"),
            Err(TargetError::Scheme(_))
        ));
        for url in [
            "ws:///ws",
            "ws://127.0.0.1:port/ws",
            "ws://127.0.0.1:0/ws",
            "ws://user@127.0.0.1/ws",
        ] {
            assert!(
                matches!(WsTarget::parse(url), Err(TargetError::Authority(_))),
                "{url} should be malformed"
            );
        }
    }

    #[test]
    fn source_addresses_must_be_loopback_too() {
        assert_eq!(
            parse_source_ip(" 127.0.0.3").unwrap(),
            Ipv4Addr::new(127, 0, 0, 3)
        );
        assert!(parse_source_ip("192.168.1.1").is_err());
        assert!(parse_source_ip("nonsense").is_err());
    }
}
