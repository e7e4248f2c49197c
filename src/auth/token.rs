//! JWT verification with keys from configuration: HMAC secrets, PEM public keys, and a JWKS
//! file that is reloaded when it changes. The algorithm must belong to the key's family, so an
//! RSA public key can never be used as an HMAC secret, and `alg: none` does not parse at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};

use crate::reload::{Reload, WatchedFile, split_secrets, utf8};

/// RFC 7518 §3.2: an HMAC key at least as long as the hash.
pub const MIN_HMAC_SECRET_LEN: usize = 32;
pub const SHORT_HMAC_SECRET: &str = "HMAC secrets must be at least 32 bytes (RFC 7518 §3.2); generate one with `openssl rand -hex 32`";

/// Longer tokens are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token was given")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    UnsupportedAlgorithm,
    #[error("no configured key can verify a {0} token")]
    NoKeyForAlgorithm(String),
    #[error("the token names key id '{}', which the key set does not hold", crate::problem::quoted(.0))]
    UnknownKid(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token lacks the required claim '{0}'")]
    MissingClaim(String),
    #[error("the token's claim '{0}' has the wrong type")]
    BadClaim(String),
    #[error("the token's claim '{claim}' is not a valid tenant id: it {defect}")]
    BadTenantClaim {
        claim: String,
        defect: crate::ops::IdDefect,
    },
    #[error(
        "token verification is not configured (set CORESDK_JWT_SECRET, CORESDK_JWT_PUBLIC_KEY_FILE or CORESDK_JWKS_FILE)"
    )]
    NotConfigured,
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct KeyConfigError {
    pub setting: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub subject: String,
    pub tenant_id: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub issuer: String,
    pub audience: Vec<String>,
    pub all: Map<String, Value>,
}

pub struct TokenSettings {
    pub hmac_secrets: Vec<Vec<u8>>,
    /// More HMAC secrets, comma or newline separated; the files are re-read when they change.
    pub hmac_secret_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub tenant_claim: String,
    pub leeway_s: u64,
}

/// Verified tokens kept at most; the cache is emptied when full (tokens are short-lived, and
/// a miss only costs one verification).
const VERIFIED_CACHE_MAX: usize = 16_384;

pub struct TokenVerifier {
    /// Exact token text → its verified claims. A hit skips the signature check (the text,
    /// signature included, is identical) but never the time checks.
    verified: DashMap<String, Arc<Claims>>,
    /// Bumped when a key file changes: a verification that began under the old keys must not
    /// leave its answer in the cache emptied for the new ones.
    key_generation: AtomicU64,
    leeway_s: i64,
    hmac: Vec<DecodingKey>,
    hmac_file: Option<WatchedFile<Vec<DecodingKey>>>,
    public_key: Option<WatchedFile<DecodingKey>>,
    jwks: Option<WatchedFile<JwkSet>>,
    validation_base: Validation,
    tenant_claim: String,
}

fn parse_jwks(path: &Path, bytes: &[u8]) -> Result<JwkSet, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{} is not a JWK set: {e}", path.display()))
}

fn parse_public_key(path: &Path, pem: &[u8]) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| {
            format!(
                "{} is not an RSA, EC or Ed25519 public key in PEM",
                path.display()
            )
        })
}

fn parse_hmac_secrets(path: &Path, bytes: &[u8]) -> Result<Vec<DecodingKey>, String> {
    let secrets: Vec<String> = split_secrets(utf8(path, bytes)?).collect();
    if secrets.is_empty() {
        return Err(format!(
            "{} holds no secret; put the HMAC secret(s) in it, comma or newline separated",
            path.display()
        ));
    }
    if secrets.iter().any(|s| s.len() < MIN_HMAC_SECRET_LEN) {
        return Err(format!("{}: {SHORT_HMAC_SECRET}", path.display()));
    }
    Ok(secrets
        .iter()
        .map(|s| DecodingKey::from_secret(s.as_bytes()))
        .collect())
}

/// A watched key file, its error naming the setting.
fn watched<T: Send + Sync + 'static>(
    setting: &'static str,
    path: Option<&Path>,
    parse: crate::reload::Parse<T>,
) -> Result<Option<WatchedFile<T>>, KeyConfigError> {
    path.map(|path| WatchedFile::load(setting, path, parse))
        .transpose()
        .map_err(|message| KeyConfigError { setting, message })
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => TokenError::BadClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::UnsupportedAlgorithm
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenError::Malformed,
        _ => TokenError::BadSignature,
    }
}

fn strings(value: Option<&Value>, split_spaces: bool) -> Vec<String> {
    match value {
        Some(Value::String(s)) if split_spaces => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

impl TokenVerifier {
    pub fn new(settings: TokenSettings) -> Result<Self, KeyConfigError> {
        let hmac_file = watched(
            "CORESDK_JWT_SECRET_FILE",
            settings.hmac_secret_file.as_deref(),
            parse_hmac_secrets,
        )?;
        let public_key = watched(
            "CORESDK_JWT_PUBLIC_KEY_FILE",
            settings.public_key_file.as_deref(),
            parse_public_key,
        )?;
        let jwks = watched(
            "CORESDK_JWKS_FILE",
            settings.jwks_file.as_deref(),
            parse_jwks,
        )?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = settings.leeway_s;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        // jsonwebtoken checks `iss` and `aud` only when a token has them: a configured issuer
        // or audience must also make them required, or a token without one passes.
        match &settings.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".to_owned());
            }
            None => validation.iss = None,
        }
        if settings.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&settings.audience);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        Ok(Self {
            verified: DashMap::new(),
            key_generation: AtomicU64::new(0),
            leeway_s: i64::try_from(settings.leeway_s).unwrap_or(i64::MAX),
            hmac: settings
                .hmac_secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s))
                .collect(),
            hmac_file,
            public_key,
            jwks,
            validation_base: validation,
            tenant_claim: settings.tenant_claim,
        })
    }

    /// The claim that names a token's tenant.
    pub fn tenant_claim(&self) -> &str {
        &self.tenant_claim
    }

    /// Public keys (a PEM key or a JWKS) usually belong to an identity provider that signs
    /// tokens for many applications; without a required audience, a token it issued for any of
    /// them is accepted here.
    pub fn accepts_other_apps_tokens(&self) -> bool {
        (self.public_key.is_some() || self.jwks.is_some()) && !self.validation_base.validate_aud
    }

    /// Whether any key comes from a file, to be re-read when it changes.
    pub fn has_key_files(&self) -> bool {
        self.hmac_file.is_some() || self.public_key.is_some() || self.jwks.is_some()
    }

    pub fn is_configured(&self) -> bool {
        !self.hmac.is_empty()
            || self.hmac_file.is_some()
            || self.public_key.is_some()
            || self.jwks.is_some()
    }

    fn candidate_keys(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Vec<DecodingKey>, TokenError> {
        let family = alg.family();
        if family == jsonwebtoken::AlgorithmFamily::Hmac {
            let mut keys = self.hmac.clone();
            if let Some(file) = &self.hmac_file {
                keys.extend(file.current().iter().cloned());
            }
            if keys.is_empty() {
                return Err(TokenError::NoKeyForAlgorithm(format!("{alg:?}")));
            }
            return Ok(keys);
        }
        let mut keys = Vec::new();
        let jwk_matches = |jwk: &jsonwebtoken::jwk::Jwk| {
            jwk.common
                .key_algorithm
                .is_none_or(|a| format!("{a:?}") == format!("{alg:?}"))
        };
        if let Some(jwks) = &self.jwks {
            let jwks = jwks.current();
            match kid {
                Some(kid) => {
                    let jwk = jwks
                        .find(kid)
                        .ok_or_else(|| TokenError::UnknownKid(kid.to_owned()))?;
                    if jwk_matches(jwk)
                        && let Ok(key) = DecodingKey::from_jwk(jwk)
                    {
                        keys.push(key);
                    }
                }
                None => {
                    for jwk in jwks.keys.iter().filter(|j| jwk_matches(j)) {
                        if let Ok(key) = DecodingKey::from_jwk(jwk) {
                            keys.push(key);
                        }
                    }
                }
            }
        }
        if let Some(key) = &self.public_key {
            keys.push(key.current().as_ref().clone());
        }
        keys.retain(|k| k.family() == family);
        if keys.is_empty() {
            return Err(TokenError::NoKeyForAlgorithm(format!("{alg:?}")));
        }
        Ok(keys)
    }

    /// Verifies `token`, answering from the cache of verified tokens when it can.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        if let Some(hit) = self.verified.get(token) {
            let now = crate::time::now_s();
            let fresh = hit
                .expires_at
                .is_some_and(|exp| now <= exp.saturating_add(self.leeway_s))
                && hit
                    .all
                    .get("nbf")
                    .and_then(Value::as_i64)
                    .is_none_or(|nbf| nbf <= now.saturating_add(self.leeway_s));
            if fresh {
                return Ok(hit.clone());
            }
        }
        let generation = self.key_generation.load(Ordering::SeqCst);
        let claims = Arc::new(self.verify_uncached(token)?);
        if self.verified.len() >= VERIFIED_CACHE_MAX {
            self.verified.clear();
        }
        self.verified.insert(token.to_owned(), claims.clone());
        // The reload bumps the generation before emptying the cache: an entry inserted after
        // that emptying sees the bump here and goes too.
        if self.key_generation.load(Ordering::SeqCst) != generation {
            self.verified.remove(token);
        }
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, TokenError> {
        if !self.is_configured() {
            return Err(TokenError::NotConfigured);
        }
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => TokenError::UnsupportedAlgorithm,
            other => map_error(other),
        })?;
        let keys = self.candidate_keys(header.alg, header.kid.as_deref())?;
        let mut validation = self.validation_base.clone();
        validation.algorithms = vec![header.alg];
        let mut last = TokenError::BadSignature;
        for key in &keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => return self.claims(data.claims),
                Err(e) => {
                    last = map_error(e.kind());
                    // Only a signature failure means "try the next key".
                    if last != TokenError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// The claims of a verified token. A tenant claim, when present, must be a valid tenant id:
    /// the signature vouches for who issued it, not for what the issuer put in it.
    fn claims(&self, all: Map<String, Value>) -> Result<Claims, TokenError> {
        let tenant_id = match all.get(&self.tenant_claim) {
            None => String::new(),
            Some(Value::String(tenant)) => match crate::ops::id_defect(tenant) {
                None => tenant.clone(),
                Some(defect) => {
                    return Err(TokenError::BadTenantClaim {
                        claim: self.tenant_claim.clone(),
                        defect,
                    });
                }
            },
            Some(_) => return Err(TokenError::BadClaim(self.tenant_claim.clone())),
        };
        let text = |name: &str| {
            all.get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let mut scopes = strings(all.get("scope"), true);
        scopes.extend(strings(all.get("scp"), true));
        Ok(Claims {
            subject: text("sub"),
            tenant_id,
            roles: strings(all.get("roles"), true),
            scopes,
            issued_at: all.get("iat").and_then(Value::as_i64),
            expires_at: all.get("exp").and_then(Value::as_i64),
            issuer: text("iss"),
            audience: strings(all.get("aud"), false),
            all,
        })
    }
}

impl Reload for TokenVerifier {
    /// Re-reads the key files that changed; a broken new file keeps the old keys.
    fn reload_if_changed(&self) {
        // Every file is checked, whatever the others did.
        let hmac = self
            .hmac_file
            .as_ref()
            .is_some_and(|f| f.reload_if_changed());
        let public_key = self
            .public_key
            .as_ref()
            .is_some_and(|f| f.reload_if_changed());
        let jwks = self.jwks.as_ref().is_some_and(|f| f.reload_if_changed());
        if hmac || public_key || jwks {
            // A key that left must stop vouching for tokens at once.
            self.key_generation.fetch_add(1, Ordering::SeqCst);
            self.verified.clear();
        }
    }

    fn staleness(&self, out: &mut Vec<(&'static str, bool)>) {
        if let Some(file) = &self.hmac_file {
            out.push((file.setting(), file.stale()));
        }
        if let Some(file) = &self.public_key {
            out.push((file.setting(), file.stale()));
        }
        if let Some(jwks) = &self.jwks {
            out.push((jwks.setting(), jwks.stale()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::IdDefect;
    use serde_json::json;

    const SECRET: &[u8] = b"unit-test-secret-that-is-32-bytes-long";

    fn verifier(leeway_s: u64) -> TokenVerifier {
        TokenVerifier::new(TokenSettings {
            hmac_secrets: vec![SECRET.to_vec()],
            hmac_secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            tenant_claim: "tenant_id".into(),
            leeway_s,
        })
        .expect("valid settings")
    }

    fn token(exp: i64) -> String {
        signed(&serde_json::json!({"sub": "u", "tenant_id": "t", "exp": exp}))
    }

    fn signed(claims: &Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .expect("encodes")
    }

    #[test]
    fn public_keys_without_an_audience_are_flagged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, r#"{"keys":[]}"#).expect("write");
        let with = |hmac: bool, jwks_file: Option<PathBuf>, audience: &[&str]| {
            TokenVerifier::new(TokenSettings {
                hmac_secrets: if hmac {
                    vec![SECRET.to_vec()]
                } else {
                    Vec::new()
                },
                hmac_secret_file: None,
                public_key_file: None,
                jwks_file,
                issuer: None,
                audience: audience.iter().map(|a| (*a).to_owned()).collect(),
                tenant_claim: "tenant_id".into(),
                leeway_s: 0,
            })
            .expect("valid settings")
            .accepts_other_apps_tokens()
        };
        assert!(with(false, Some(jwks.clone()), &[]));
        assert!(with(true, Some(jwks.clone()), &[]));
        assert!(!with(false, Some(jwks), &["my-app"]));
        // A shared HMAC secret is this application's own.
        assert!(!with(true, None, &[]));
    }

    #[test]
    fn a_tenant_claim_must_be_a_valid_tenant_id() {
        let verifier = verifier(0);
        let exp = crate::time::now_s() + 600;
        let with_tenant = |tenant: Value| {
            signed(&serde_json::json!({"sub": "u", "tenant_id": tenant, "exp": exp}))
        };
        for (tenant, defect) in [
            (json!(""), IdDefect::Empty),
            (json!("t".repeat(4096)), IdDefect::TooLong),
            (
                json!("acme\u{202E}corp"),
                IdDefect::Unprintable {
                    code_point: 0x202E,
                    position: 5,
                },
            ),
        ] {
            assert_eq!(
                verifier.verify(&with_tenant(tenant)),
                Err(TokenError::BadTenantClaim {
                    claim: "tenant_id".into(),
                    defect
                })
            );
        }
        assert_eq!(
            verifier.verify(&with_tenant(json!(42))),
            Err(TokenError::BadClaim("tenant_id".into()))
        );
        let tenantless = verifier
            .verify(&signed(&serde_json::json!({"sub": "u", "exp": exp})))
            .expect("a token without a tenant is still a valid token");
        assert_eq!(tenantless.tenant_id, "");
        let accented = verifier
            .verify(&with_tenant(json!("müller-gmbh")))
            .expect("letters of any script");
        assert_eq!(accented.tenant_id, "müller-gmbh");
    }

    #[test]
    fn a_cached_token_still_expires() {
        let verifier = verifier(0);
        let token = token(crate::time::now_s() + 1);
        assert_eq!(
            verifier.verify(&token).map(|c| c.tenant_id.clone()),
            Ok("t".into())
        );
        assert!(verifier.verify(&token).is_ok(), "served from the cache");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(verifier.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn unconfigured_verification_says_so() {
        let verifier = TokenVerifier::new(TokenSettings {
            hmac_secrets: Vec::new(),
            hmac_secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            tenant_claim: "tenant_id".into(),
            leeway_s: 60,
        })
        .expect("valid settings");
        assert_eq!(
            verifier.verify(&token(i64::MAX)),
            Err(TokenError::NotConfigured)
        );
    }
}
