//! TLS for the connections this server opens (to PostgreSQL and to Redis): rustls on the ring provider,
//! the trust roots (a CA file in PEM, or the system's), the three ways a server's certificate is
//! checked, and the one-line explanation of a refused certificate that start-up errors carry.
//!
//! Both clients (tokio-postgres through `tokio-postgres-rustls`, and the `redis` crate) use rustls, so
//! one provider and one vocabulary serve both. The `redis` crate builds its own rustls configuration
//! from the process-wide default provider, hence [`install_default_provider`].
//!
//! A leaf module: it knows nothing of the store or the bus, which each map their settings
//! (`sslmode`/`sslrootcert`, `rediss://`/`REDIS_CA_FILE`) onto [`Verify`].

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why a TLS set-up could not be made: a CA file that cannot be used, or roots rustls refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("cannot read the CA file {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        cause: std::io::Error,
    },
    /// The CA file is not PEM, or holds no certificate.
    #[error("the CA file {} holds no usable PEM certificate{}", path.display(), why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said, when it said something.
        why: Option<String>,
    },
    /// The system's trust roots could not be loaded (none found, or unreadable).
    #[error("cannot load the system's trusted CA certificates: {0}")]
    SystemRoots(String),
    /// rustls refused the roots or the configuration.
    #[error("TLS set-up refused: {0}")]
    Rustls(#[source] rustls::Error),
}

/// How a server's certificate is checked.
#[derive(Clone)]
pub enum Verify {
    /// Not at all: the connection is encrypted, but anyone in the middle can present any certificate
    /// (libpq's `sslmode=require` without a root file, `rediss://…#insecure`). The handshake's own
    /// signatures are still checked, as libpq's OpenSSL does.
    Nothing,
    /// The certificate must chain to one of these roots; its names are not checked (libpq's
    /// `verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The certificate must chain to one of these roots and name the host connected to (libpq's
    /// `verify-full`; what every HTTPS client does).
    Full(Arc<RootCertStore>),
}

/// The crypto provider of every TLS connection: ring (no C toolchain beyond ring's own build).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default rustls provider, once. The `redis` crate builds its rustls
/// configurations from the default provider; without one installed it could not tell which to use
/// should a second provider ever be compiled in.
pub fn install_default_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error only means another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Reads a CA file (PEM, one or more certificates) and checks that it holds at least one
/// certificate; returns its bytes, as the `redis` crate wants them.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })?;
    certificates(path, &pem)?;
    Ok(pem)
}

/// The certificates of a PEM document; an error if there is none or one does not parse.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: path.to_owned(),
            why: Some(e.to_string()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            why: None,
        });
    }
    Ok(certs)
}

/// The roots of a CA file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, &pem)? {
        roots.add(cert).map_err(TlsError::Rustls)?;
    }
    Ok(roots)
}

/// The system's trusted roots (`/etc/ssl/certs` and the like, or `SSL_CERT_FILE`/`SSL_CERT_DIR`).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = match found.errors.first() {
            Some(e) => e.to_string(),
            None => "none found".to_owned(),
        };
        return Err(TlsError::SystemRoots(why));
    }
    Ok(roots)
}

/// A client configuration that checks the server's certificate as `verify` says, and offers no
/// client certificate.
pub fn client_config(verify: &Verify) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let config = match verify {
        Verify::Full(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        Verify::Chain(roots) => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName { inner }))
                .with_no_client_auth()
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Checks the chain, not the names (`verify-ca`): a name mismatch is the one error let through.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Takes any certificate (`require`), but still checks that the server signed the handshake with the
/// key of the certificate it presented.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What an operator should read when `error` (or one of its causes) is a TLS failure, naming
/// `trust_setting` (where the trusted CA comes from: `sslrootcert`, `REDIS_CA_FILE`) when the
/// certificate's issuer is not trusted; `None` when no TLS error is in the chain.
pub fn explain(error: &(dyn Error + 'static), trust_setting: &str) -> Option<String> {
    match find_rustls_error(error) {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            Some(explain_certificate(&format!("{cert:?}"), trust_setting))
        }
        Some(other) => Some(format!("TLS handshake failed: {other}")),
        // The `redis` crate's cluster client keeps only the text of a node's error ("Failed to
        // create initial connections - Io: invalid peer certificate: UnknownIssuer"), so rustls'
        // wording is looked for in the text too.
        None => {
            let text = error.to_string();
            let (_, refused) = text.split_once("invalid peer certificate: ")?;
            Some(explain_certificate(refused, trust_setting))
        }
    }
}

/// The explanation of a refused certificate, from rustls' name of the reason (`UnknownIssuer`,
/// `NotValidForName`, … possibly followed by details).
fn explain_certificate(reason: &str, trust_setting: &str) -> String {
    let name: String = reason
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    match name.as_str() {
        "UnknownIssuer" | "BadSignature" => format!(
            "TLS: the server's certificate is not signed by a trusted CA (check {trust_setting})"
        ),
        "NotValidForName" | "NotValidForNameContext" => {
            "TLS: the server's certificate does not name the host connected to".to_owned()
        }
        "Expired" | "ExpiredContext" => "TLS: the server's certificate has expired".to_owned(),
        "NotValidYet" | "NotValidYetContext" => {
            "TLS: the server's certificate is not valid yet (check the clocks)".to_owned()
        }
        _ => format!("TLS: the server's certificate was refused ({name})"),
    }
}

/// The rustls error in `error`'s chain. Two wrappers hide the error they hold from `source()` (each
/// returns that error's own source instead): an `io::Error`, and the `Arc` the `redis` crate keeps its
/// causes in; each is also looked into.
fn find_rustls_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(found) = error.downcast_ref::<rustls::Error>() {
        return Some(found);
    }
    let wrapped: Option<&'a (dyn Error + 'static)> =
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn Error + 'static))
        } else if let Some(shared) = error.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
            Some(&**shared as &(dyn Error + 'static))
        } else {
            None
        };
    wrapped
        .and_then(find_rustls_error)
        .or_else(|| error.source().and_then(find_rustls_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_explained_through_an_io_error() {
        let refused = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let hint = explain(&io, "sslrootcert").unwrap();
        assert!(
            hint.contains("not signed by a trusted CA (check sslrootcert)"),
            "{hint}"
        );
        let name = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
        );
        assert!(explain(&name, "x")
            .unwrap()
            .contains("does not name the host"));
        let shared: Arc<dyn Error + Send + Sync> =
            Arc::new(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert!(explain(&shared, "x").unwrap().contains("expired"));
        let text = std::io::Error::other(
            "Failed to create initial connections - Io: invalid peer certificate: UnknownIssuer",
        );
        assert!(explain(&text, "REDIS_CA_FILE")
            .unwrap()
            .contains("(check REDIS_CA_FILE)"));
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(explain(&plain, "x"), None);
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = read_ca_file(&missing).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the CA file"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err().to_string();
        assert!(e.contains("holds no usable PEM certificate"), "{e}");
        assert!(load_roots(&empty).is_err());
    }
}
