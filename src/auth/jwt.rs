//! JWTs for WebSocket connections: who the user is (`sub`), until when (`exp`), and which channels they
//! may join (`channels`, glob patterns).
//!
//! The token is an HS256 JWT signed with `JWT_SECRET`, checked by the `jsonwebtoken` crate restricted to
//! that one algorithm: a token whose header says `none`, `RS256` or anything else is refused before its
//! signature is even looked at, which closes the classic algorithm-confusion holes. `exp` is required,
//! `nbf` honoured when present, both with `JWT_LEEWAY_S` of clock skew.
//!
//! A browser cannot set headers on a WebSocket, so the upgrade takes the token three ways, in this order:
//! `?token=<jwt>`, `Authorization: Bearer <jwt>`, and `Sec-WebSocket-Protocol: bearer, <jwt>` (the
//! subprotocol list is the one header a browser lets a page choose); the last is answered with
//! `Sec-WebSocket-Protocol: bearer`, as RFC 6455 asks for a protocol the server accepted.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::api_key::bearer_token;
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::model::validate_user_id;

/// The subprotocol name that marks the next offered protocol as a token.
pub const BEARER_PROTOCOL: &str = "bearer";

/// The claims the server reads; others are ignored.
#[derive(Debug, Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`).
    pub user_id: String,
    /// Expiry, in seconds since the Unix epoch (`exp`).
    pub expires_at: u64,
    /// The channels the user may join.
    pub grant: ChannelGrant,
}

/// Why a token was refused; each is a 401 on the handshake (or an `error` event on `refresh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No token anywhere in the upgrade request.
    Missing,
    /// Past `exp` (plus the leeway).
    Expired,
    /// Before `nbf` (minus the leeway).
    NotYetValid,
    /// The header names an algorithm other than HS256.
    WrongAlgorithm,
    /// Signed with another secret (the header and claims are well-formed HS256).
    BadSignature,
    /// Malformed, or missing a required claim.
    Invalid,
    /// `sub` is not a valid user id.
    BadSubject,
}

impl TokenError {
    /// A sentence for the error body.
    pub fn message(&self) -> &'static str {
        match self {
            TokenError::Missing => {
                "a token is required: ?token=<JWT>, Authorization: Bearer <JWT> or Sec-WebSocket-Protocol: bearer, <JWT>"
            }
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet (nbf)",
            TokenError::WrongAlgorithm => "the token must be signed with HS256",
            // One sentence for both: a client learns nothing from which part failed.
            TokenError::BadSignature | TokenError::Invalid => {
                "the token is malformed, badly signed, or lacks sub or exp"
            }
            TokenError::BadSubject => "the token's sub is not a valid user id",
        }
    }

    /// The `reason` of the audit log's `auth_refused` line (docs/audit.md).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::Expired => "expired_token",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongAlgorithm => "wrong_algorithm",
            TokenError::BadSignature => "bad_signature",
            TokenError::Invalid => "invalid_token",
            TokenError::BadSubject => "bad_subject",
        }
    }
}

/// Checks tokens against the secret.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier(HS256)")
    }
}

impl JwtVerifier {
    /// A verifier for HS256 tokens signed with `secret`, allowing `leeway_s` of clock skew.
    pub fn new(secret: &str, leeway_s: u64) -> JwtVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Audience and issuer are not part of this server's contract: ignore them if present.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data =
            jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        TokenError::WrongAlgorithm
                    }
                    _ => TokenError::Invalid,
                }
            })?;
        let claims = data.claims;
        validate_user_id(&claims.sub).map_err(|_| TokenError::BadSubject)?;
        Ok(Claims {
            user_id: claims.sub,
            expires_at: claims.exp,
            grant: ChannelGrant {
                patterns: claims.channels,
            },
        })
    }
}

/// Seconds since the Unix epoch, the time base of `exp` and `nbf`.
pub fn unix_now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Where the upgrade request carried its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedToken {
    /// The token.
    pub token: String,
    /// True when it came in `Sec-WebSocket-Protocol`, so the 101 must name `bearer`.
    pub via_subprotocol: bool,
}

/// Finds the token of an upgrade request: `?token=`, then `Authorization: Bearer`, then
/// `Sec-WebSocket-Protocol: bearer, <jwt>`.
pub fn presented_token(head: &RequestHead) -> Option<PresentedToken> {
    if let Some(token) = query_param(head.query(), "token").filter(|t| !t.is_empty()) {
        return Some(PresentedToken {
            token: token.into_owned(),
            via_subprotocol: false,
        });
    }
    if let Some(token) = bearer_token(head) {
        return Some(PresentedToken {
            token: token.to_owned(),
            via_subprotocol: false,
        });
    }
    let offered = head.header_str("sec-websocket-protocol")?;
    let mut protocols = offered.split(',').map(str::trim);
    protocols.find(|p| p.eq_ignore_ascii_case(BEARER_PROTOCOL))?;
    protocols
        .next()
        .filter(|t| !t.is_empty())
        .map(|t| PresentedToken {
            token: t.to_owned(),
            via_subprotocol: true,
        })
}

/// The channels a token lets its user join: glob patterns where `*` stands for any run of characters
/// (`team-42.*`, `*`); any other character matches itself. `*` cannot occur in a channel name, so a
/// pattern is never ambiguous. No `channels` claim grants no channel: the user still gets what is sent
/// to them and broadcasts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelGrant {
    patterns: Vec<String>,
}

impl ChannelGrant {
    /// A grant of these patterns.
    pub fn new(patterns: Vec<String>) -> ChannelGrant {
        ChannelGrant { patterns }
    }

    /// Whether `channel` matches one of the patterns.
    pub fn allows(&self, channel: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob_matches(p.as_bytes(), channel.as_bytes()))
    }
}

/// `*`-only glob matching, linear time (the classic greedy matcher with one backtrack point).
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        let grant = ChannelGrant::new(vec!["team-42.*".into(), "news".into(), "a*b*c".into()]);
        assert!(grant.allows("team-42.general"));
        assert!(grant.allows("team-42."));
        assert!(!grant.allows("team-43.general"));
        assert!(!grant.allows("xteam-42.general"));
        assert!(grant.allows("news"));
        assert!(!grant.allows("news2"));
        assert!(grant.allows("axxbyyc"));
        assert!(!grant.allows("axxbyy"));
        assert!(ChannelGrant::new(vec!["*".into()]).allows("anything"));
        assert!(!ChannelGrant::default().allows("anything"));
    }

    #[test]
    fn a_good_token_gives_its_claims_and_a_bad_one_its_reason() {
        let v = JwtVerifier::new("s3cret", 0);
        let exp = now() + 60;
        let good = token(
            Algorithm::HS256,
            "s3cret",
            serde_json::json!({"sub": "u1", "exp": exp, "channels": ["team-1.*"]}),
        );
        let claims = v.verify(&good).unwrap();
        assert_eq!(claims.user_id, "u1");
        assert_eq!(claims.expires_at, exp);
        assert!(claims.grant.allows("team-1.x"));

        let other_secret = token(
            Algorithm::HS256,
            "other",
            serde_json::json!({"sub": "u1", "exp": exp}),
        );
        assert_eq!(v.verify(&other_secret), Err(TokenError::BadSignature));
        let hs512 = token(
            Algorithm::HS512,
            "s3cret",
            serde_json::json!({"sub": "u1", "exp": exp}),
        );
        assert_eq!(v.verify(&hs512), Err(TokenError::WrongAlgorithm));
        let expired = token(
            Algorithm::HS256,
            "s3cret",
            serde_json::json!({"sub": "u1", "exp": now() - 5}),
        );
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let early = token(
            Algorithm::HS256,
            "s3cret",
            serde_json::json!({"sub": "u1", "exp": exp, "nbf": now() + 30}),
        );
        assert_eq!(v.verify(&early), Err(TokenError::NotYetValid));
        let no_exp = token(Algorithm::HS256, "s3cret", serde_json::json!({"sub": "u1"}));
        assert_eq!(v.verify(&no_exp), Err(TokenError::Invalid));
        let bad_sub = token(
            Algorithm::HS256,
            "s3cret",
            serde_json::json!({"sub": "", "exp": exp}),
        );
        assert_eq!(v.verify(&bad_sub), Err(TokenError::BadSubject));
        assert_eq!(v.verify("not.a.jwt"), Err(TokenError::Invalid));
        // The leeway forgives a little skew.
        assert!(JwtVerifier::new("s3cret", 30).verify(&expired).is_ok());
    }
}
