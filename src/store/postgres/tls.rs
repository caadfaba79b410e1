//! TLS to PostgreSQL: the `sslmode` and `sslrootcert` of a `DATABASE_URL`, with libpq's meanings, and
//! the rustls connector they make.
//!
//! | `sslmode`     | TLS                                  | the server's certificate                    |
//! |---------------|--------------------------------------|---------------------------------------------|
//! | (not given)   | no (as before TLS was supported)     | —                                           |
//! | `disable`     | no                                   | —                                           |
//! | `prefer`      | if the server offers it, else plain  | not checked (chain only with `sslrootcert`) |
//! | `require`     | yes                                  | not checked (chain only with `sslrootcert`) |
//! | `verify-ca`   | yes                                  | chains to `sslrootcert`                     |
//! | `verify-full` | yes                                  | chains to `sslrootcert` and names the host  |
//!
//! `sslrootcert` is a PEM file of trusted CA certificates, or `system` for the system's roots. Unlike
//! libpq there is no `~/.postgresql/root.crt` fallback: `verify-ca` and `verify-full` want
//! `sslrootcert`, and `sslrootcert` without an `sslmode` is refused (it would otherwise silently mean
//! no TLS). `allow` is refused: the client library has no plain-first-then-TLS mode.
//!
//! tokio-postgres parses `sslmode` itself but knows neither the `verify-*` modes nor `sslrootcert`,
//! so both are taken out of the URL (or the `key=value` string) before the rest is handed to it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::OpenError;
use crate::tls::{self, Verify};

/// A `DATABASE_URL`'s `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it.
    Prefer,
    /// TLS, the certificate unchecked (unless `sslrootcert` is given).
    Require,
    /// TLS, the certificate chains to `sslrootcert`.
    VerifyCa,
    /// TLS, the certificate chains to `sslrootcert` and names the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, OpenError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(bad(
                    "sslmode=allow is not supported (use disable, prefer, require, verify-ca or \
                     verify-full)",
                ))
            }
            _ => {
                return Err(bad(
                    "sslmode must be disable, prefer, require, verify-ca or verify-full",
                ))
            }
        })
    }

    /// The name in a URL.
    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A refusal of our own, naming the setting (the URL itself is never echoed: it may hold a password).
fn bad(why: &str) -> OpenError {
    OpenError::Url {
        reason: format!("invalid DATABASE_URL: {why}"),
        cause: None,
    }
}

/// The TLS of a PostgreSQL target: how `sslmode` and `sslrootcert` were given, and the connector
/// they make (`None`: plain TCP).
#[derive(Clone)]
pub(super) struct PgTls {
    /// The URL's `sslmode`, if it gave one.
    mode: Option<SslMode>,
    /// The URL's `sslrootcert`, if it gave one.
    rootcert: Option<String>,
    /// The rustls connector; `None` for no TLS.
    connector: Option<MakeRustlsConnect>,
}

impl PgTls {
    /// Takes `sslmode` and `sslrootcert` out of `url` (a `postgres://` URL or a libpq `key=value`
    /// string), reads the CA file, and returns the TLS set-up and the rest of the URL for
    /// tokio-postgres.
    pub(super) fn split(url: &str) -> Result<(PgTls, String), OpenError> {
        let (params, rest) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_keywords(url)?
        };
        let mut mode = None;
        let mut rootcert = None;
        for (key, value) in params {
            match key {
                Param::SslMode => mode = Some(SslMode::parse(&value)?),
                Param::SslRootCert => rootcert = Some(value),
            }
        }
        let verify =
            match (mode, &rootcert) {
                (None | Some(SslMode::Disable), None) => None,
                (None, Some(_)) => return Err(bad(
                    "sslrootcert is given without sslmode: add sslmode=verify-full (or verify-ca, \
                     require)",
                )),
                (Some(SslMode::Disable), Some(_)) => None,
                (Some(SslMode::Prefer | SslMode::Require), None) => Some(Verify::Nothing),
                (Some(SslMode::Prefer | SslMode::Require), Some(file)) => {
                    Some(Verify::Chain(roots(file)?))
                }
                (Some(SslMode::VerifyCa), Some(file)) => Some(Verify::Chain(roots(file)?)),
                (Some(SslMode::VerifyFull), Some(file)) => Some(Verify::Full(roots(file)?)),
                (Some(m @ (SslMode::VerifyCa | SslMode::VerifyFull)), None) => {
                    return Err(bad(&format!(
                    "sslmode={} needs sslrootcert=<CA file in PEM> (or sslrootcert=system for the \
                     system's trusted CAs)",
                    m.name()
                )))
                }
            };
        let connector = match verify {
            Some(verify) => Some(MakeRustlsConnect::new(
                tls::client_config(&verify).map_err(OpenError::Tls)?,
            )),
            None => None,
        };
        Ok((
            PgTls {
                mode,
                rootcert,
                connector,
            },
            rest,
        ))
    }

    /// Sets tokio-postgres's own `sslmode`: `require` for every mode that insists on TLS, so a server
    /// that does not offer it is refused rather than talked to in the clear.
    pub(super) fn apply(&self, config: &mut Config) {
        match self.mode {
            None => {} // tokio-postgres's default (prefer) without a connector: plain, as before
            Some(SslMode::Disable) => {
                config.ssl_mode(WireSslMode::Disable);
            }
            Some(SslMode::Prefer) => {
                config.ssl_mode(WireSslMode::Prefer);
            }
            Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => {
                config.ssl_mode(WireSslMode::Require);
            }
        }
    }

    /// The connector, `None` for plain TCP.
    pub(super) fn connector(&self) -> Option<&MakeRustlsConnect> {
        self.connector.as_ref()
    }
}

/// As the target is shown: ` sslmode=verify-full sslrootcert=/etc/ca.pem`, or nothing.
impl fmt::Display for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(mode) = self.mode {
            write!(f, " sslmode={}", mode.name())?;
        }
        if let Some(file) = &self.rootcert {
            write!(f, " sslrootcert={file}")?;
        }
        Ok(())
    }
}

/// The trusted roots of `sslrootcert`: a PEM file, or `system`.
fn roots(rootcert: &str) -> Result<Arc<rustls::RootCertStore>, OpenError> {
    let roots = if rootcert == "system" {
        tls::system_roots()
    } else {
        tls::load_roots(Path::new(rootcert))
    };
    roots.map(Arc::new).map_err(OpenError::Tls)
}

/// The parameters taken out of the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    SslMode,
    SslRootCert,
}

impl Param {
    fn of(key: &str) -> Option<Param> {
        match key {
            "sslmode" => Some(Param::SslMode),
            "sslrootcert" => Some(Param::SslRootCert),
            _ => None,
        }
    }
}

/// Splits a `postgres://` URL's query: our parameters (percent-decoded) and the URL without them.
/// The query starts at the first `?` after the credentials, where tokio-postgres's parser finds it
/// (it takes everything up to the first `@` as the credentials).
fn split_url(url: &str) -> Result<(Vec<(Param, String)>, String), OpenError> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return Ok((Vec::new(), url.to_owned()));
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut ours = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key)?;
        match Param::of(&key) {
            Some(param) => ours.push((param, decode(value)?)),
            None => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((ours, rest))
}

fn decode(s: &str) -> Result<String, OpenError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad("a query parameter is not UTF-8 once percent-decoded"))
}

/// Splits a libpq `key=value` string (values bare or in single quotes, `\` escaping the next
/// character, as tokio-postgres reads them): our parameters and the string without them.
fn split_keywords(s: &str) -> Result<(Vec<(Param, String)>, String), OpenError> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut ours = Vec::new();
    let mut rest = String::new();
    let mut kept_from = 0;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            // Not ours to judge: tokio-postgres reports the malformed string.
            return Ok((ours, s.to_owned()));
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let quoted = bytes.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        // Byte-wise over ASCII delimiters; the value's other bytes are copied as the UTF-8 they are.
        let mut value_bytes = Vec::new();
        while i < bytes.len() {
            let b = bytes[i];
            if (quoted && b == b'\'') || (!quoted && b.is_ascii_whitespace()) {
                break;
            }
            if b == b'\\' && i + 1 < bytes.len() {
                i += 1;
            }
            value_bytes.push(bytes[i]);
            i += 1;
        }
        if quoted {
            if bytes.get(i) != Some(&b'\'') {
                return Ok((ours, s.to_owned()));
            }
            i += 1;
        }
        let value = String::from_utf8_lossy(&value_bytes).into_owned();
        if let Some(param) = Param::of(key) {
            ours.push((param, value));
            rest.push_str(&s[kept_from..start]);
            kept_from = i;
        }
    }
    rest.push_str(&s[kept_from..]);
    Ok((ours, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> (Vec<(Param, String)>, String) {
        if url.starts_with("postgres") {
            split_url(url).unwrap()
        } else {
            split_keywords(url).unwrap()
        }
    }

    #[test]
    fn our_parameters_are_taken_out_of_a_url() {
        let (ours, rest) = params(
            "postgres://u:p?w@db:5432/n?sslmode=verify-full&options=-csearch_path%3Ds&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            ours,
            vec![
                (Param::SslMode, "verify-full".to_owned()),
                (Param::SslRootCert, "/etc/ca.pem".to_owned())
            ]
        );
        assert_eq!(rest, "postgres://u:p?w@db:5432/n?options=-csearch_path%3Ds");
        let (ours, rest) = params("postgres://db/n?sslmode=require");
        assert_eq!(ours, vec![(Param::SslMode, "require".to_owned())]);
        assert_eq!(rest, "postgres://db/n");
        let (ours, rest) = params("postgresql://db/n");
        assert!(ours.is_empty());
        assert_eq!(rest, "postgresql://db/n");
    }

    #[test]
    fn our_parameters_are_taken_out_of_a_keyword_string() {
        let (ours, rest) =
            params("host=db sslmode = verify-ca  sslrootcert='/a b/c\\'s.pem' dbname=n");
        assert_eq!(
            ours,
            vec![
                (Param::SslMode, "verify-ca".to_owned()),
                (Param::SslRootCert, "/a b/c's.pem".to_owned())
            ]
        );
        assert_eq!(rest, "host=db    dbname=n");
        assert!(rest.parse::<Config>().is_ok());
    }

    #[test]
    fn modes_follow_libpq_and_refuse_what_cannot_work() {
        let (tls, rest) = PgTls::split("postgres://db/n").unwrap();
        assert!(tls.connector().is_none());
        assert_eq!(rest, "postgres://db/n");
        let (tls, _) = PgTls::split("postgres://db/n?sslmode=disable").unwrap();
        assert!(tls.connector().is_none());
        let (tls, _) = PgTls::split("postgres://db/n?sslmode=require").unwrap();
        assert!(tls.connector().is_some());
        assert_eq!(tls.to_string(), " sslmode=require");
        let (tls, _) = PgTls::split("postgres://db/n?sslmode=prefer").unwrap();
        assert!(tls.connector().is_some());
        for (url, says) in [
            ("postgres://db/n?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://db/n?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://db/n?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            ("postgres://db/n?sslmode=bogus", "sslmode must be"),
            ("postgres://db/n?sslrootcert=/x.pem", "without sslmode"),
            (
                "postgres://db/n?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "cannot read the CA file /nonexistent/ca.pem",
            ),
        ] {
            let e = PgTls::split(url).err().expect(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(e.starts_with("invalid DATABASE_URL"), "{url}: {e}");
        }
    }
}
