//! `Stripe-Signature` verification, matching Stripe's official libraries and closing their gaps:
//! the tolerance applies on both sides of now (the libraries only check the past), wrong-length
//! and empty signatures are refused before any comparison, and several secrets are accepted so a
//! secret can be rotated without dropping deliveries.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::problem::Error;

type HmacSha256 = Hmac<Sha256>;

const SIGNATURE_LEN: usize = 32;
/// Headers longer than this are not Stripe's; refusing them bounds the parsing work.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub v1: Vec<[u8; SIGNATURE_LEN]>,
}

/// Parses `t=<unix>,v1=<hex>[,v1=<hex>…]`; `v0` and unknown schemes are ignored.
pub fn parse_header(header: &str) -> Result<SignatureHeader, Error> {
    let header = header.trim();
    if header.is_empty() {
        return Err(Error::SignatureMissing);
    }
    if header.len() > MAX_HEADER_LEN {
        return Err(Error::SignatureMalformed("header is too long"));
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let Some((scheme, value)) = item.trim().split_once('=') else {
            return Err(Error::SignatureMalformed("an item has no '='"));
        };
        match scheme.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err(Error::SignatureMalformed("more than one timestamp"));
                }
                let value = value.trim();
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Error::SignatureMalformed("the timestamp is not a number"));
                }
                let parsed = value
                    .parse::<i64>()
                    .map_err(|_| Error::SignatureMalformed("the timestamp is out of range"))?;
                timestamp = Some(parsed);
            }
            "v1" => v1.push(decode_signature(value.trim())?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(Error::SignatureMalformed("no timestamp (t=)"))?;
    if v1.is_empty() {
        return Err(Error::SignatureNoV1);
    }
    Ok(SignatureHeader { timestamp, v1 })
}

fn decode_signature(hex_sig: &str) -> Result<[u8; SIGNATURE_LEN], Error> {
    if hex_sig.is_empty() {
        return Err(Error::SignatureMalformed("an empty v1 signature"));
    }
    if hex_sig.len() != SIGNATURE_LEN * 2 {
        return Err(Error::SignatureMalformed(
            "a v1 signature is not 64 hex characters",
        ));
    }
    let mut out = [0u8; SIGNATURE_LEN];
    hex::decode_to_slice(hex_sig, &mut out)
        .map_err(|_| Error::SignatureMalformed("a v1 signature is not hexadecimal"))?;
    Ok(out)
}

fn compute(secret: &[u8], timestamp: i64, payload: &[u8]) -> [u8; SIGNATURE_LEN] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// A `Stripe-Signature` header value for `payload`, as Stripe would send it.
pub fn sign_header(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(compute(secret.as_bytes(), timestamp, payload))
    )
}

/// The `whsec_…` secrets of a watched file, as HMAC keys.
pub type SecretFile = crate::reload::WatchedFile<Vec<Vec<u8>>>;

#[derive(Clone)]
pub struct SignatureVerifier {
    /// The `whsec_…` strings, used as HMAC keys exactly as Stripe's libraries do (not decoded).
    secrets: Vec<Vec<u8>>,
    /// More secrets, from a file re-read when it changes.
    file: Option<Arc<SecretFile>>,
    tolerance_s: u64,
}

impl std::fmt::Debug for SignatureVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureVerifier")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("file", &self.file.is_some())
            .field("tolerance_s", &self.tolerance_s)
            .finish()
    }
}

impl SignatureVerifier {
    pub fn new(secrets: Vec<String>, tolerance_s: u64) -> Self {
        Self {
            secrets: secrets.into_iter().map(String::into_bytes).collect(),
            file: None,
            tolerance_s,
        }
    }

    /// Also accepts the secrets of `file`, whichever it holds at the time of each delivery.
    pub fn with_file(mut self, file: Arc<SecretFile>) -> Self {
        self.file = Some(file);
        self
    }

    /// The secret file to watch, if there is one.
    pub fn secret_file(&self) -> Option<&Arc<SecretFile>> {
        self.file.as_ref()
    }

    pub fn has_secrets(&self) -> bool {
        // A watched file always holds a secret: one that holds none is refused.
        !self.secrets.is_empty() || self.file.is_some()
    }

    /// Verifies `header` over the raw `payload` at time `now` (unix seconds) and returns the
    /// signed timestamp. The signature is checked before the time so that a tolerance error
    /// means "authentic but replayed or skewed", as with Stripe's libraries.
    pub fn verify(&self, payload: &[u8], header: &str, now: i64) -> Result<i64, Error> {
        if !self.has_secrets() {
            return Err(Error::WebhookSecretMissing);
        }
        let parsed = parse_header(header)?;
        let mut matched = subtle::Choice::from(0);
        let from_file = self.file.as_ref().map(|file| file.current());
        let file_secrets = from_file.as_ref().map(|f| f.as_slice()).unwrap_or_default();
        for secret in self.secrets.iter().chain(file_secrets) {
            let expected = compute(secret, parsed.timestamp, payload);
            for candidate in &parsed.v1 {
                matched |= expected.ct_eq(candidate);
            }
        }
        if !bool::from(matched) {
            return Err(Error::SignatureMismatch);
        }
        let skew_s = now.saturating_sub(parsed.timestamp);
        if skew_s.unsigned_abs() > self.tolerance_s {
            return Err(Error::SignatureTimestampOutOfTolerance {
                skew_s,
                tolerance_s: self.tolerance_s,
            });
        }
        Ok(parsed.timestamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;
    const T: i64 = 1_492_774_577;
    const VECTOR: &str = "88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a";

    fn verifier() -> SignatureVerifier {
        SignatureVerifier::new(vec![SECRET.to_owned()], 300)
    }

    fn good_header() -> String {
        format!("t={T},v1={VECTOR}")
    }

    #[test]
    fn matches_the_published_test_vector() {
        assert_eq!(sign_header(SECRET, T, BODY), good_header());
        assert!(matches!(verifier().verify(BODY, &good_header(), T), Ok(t) if t == T));
    }

    #[test]
    fn accepts_any_v1_against_any_secret_and_ignores_v0_and_unknown_schemes() {
        let rotated = SignatureVerifier::new(vec!["whsec_new".to_owned(), SECRET.to_owned()], 300);
        let header = format!("t={T},v0=abc,v1={},v1={VECTOR},scheme9=x", "0".repeat(64));
        assert!(rotated.verify(BODY, &header, T).is_ok());
        assert!(
            rotated
                .verify(BODY, &sign_header("whsec_new", T, BODY), T)
                .is_ok()
        );
    }

    #[test]
    fn tolerance_holds_in_both_directions() {
        let v = verifier();
        assert!(v.verify(BODY, &good_header(), T + 300).is_ok());
        assert!(v.verify(BODY, &good_header(), T - 300).is_ok());
        assert!(matches!(
            v.verify(BODY, &good_header(), T + 301),
            Err(Error::SignatureTimestampOutOfTolerance { skew_s: 301, .. })
        ));
        assert!(matches!(
            v.verify(BODY, &good_header(), T - 301),
            Err(Error::SignatureTimestampOutOfTolerance { skew_s: -301, .. })
        ));
    }

    #[test]
    fn rejects_every_malformed_or_wrong_header() {
        let v = verifier();
        type Expectation = fn(&Error) -> bool;
        let cases: &[(&str, Expectation)] = &[
            ("", |e| matches!(e, Error::SignatureMissing)),
            ("   ", |e| matches!(e, Error::SignatureMissing)),
            ("garbage", |e| matches!(e, Error::SignatureMalformed(_))),
            ("v1=88a0", |e| matches!(e, Error::SignatureMalformed(_))),
            ("t=1492774577,v1=", |e| {
                matches!(e, Error::SignatureMalformed(_))
            }),
            ("t=1492774577,v1=abcd", |e| {
                matches!(e, Error::SignatureMalformed(_))
            }),
            ("t=abc,v1=00", |e| matches!(e, Error::SignatureMalformed(_))),
            ("t=-5,v1=00", |e| matches!(e, Error::SignatureMalformed(_))),
            ("t=1,t=2,v1=00", |e| {
                matches!(e, Error::SignatureMalformed(_))
            }),
            ("t=1492774577", |e| matches!(e, Error::SignatureNoV1)),
            ("t=1492774577,v0=abc", |e| matches!(e, Error::SignatureNoV1)),
        ];
        for (header, expected) in cases {
            let err = v.verify(BODY, header, T).expect_err(header);
            assert!(expected(&err), "{header:?} gave {err:?}");
        }
        let not_hex = format!("t={T},v1={}", "zz".repeat(32));
        assert!(matches!(
            v.verify(BODY, &not_hex, T),
            Err(Error::SignatureMalformed(_))
        ));
        let wrong = format!("t={T},v1={}", "ab".repeat(32));
        assert!(matches!(
            v.verify(BODY, &wrong, T),
            Err(Error::SignatureMismatch)
        ));
        let tampered_body = br#"{"id":"evt_test_webhook","object":"evenT"}"#;
        assert!(matches!(
            v.verify(tampered_body, &good_header(), T),
            Err(Error::SignatureMismatch)
        ));
        let other_time = format!("t={},v1={VECTOR}", T + 1);
        assert!(matches!(
            v.verify(BODY, &other_time, T),
            Err(Error::SignatureMismatch)
        ));
        let no_secret = SignatureVerifier::new(vec![], 300);
        assert!(matches!(
            no_secret.verify(BODY, &good_header(), T),
            Err(Error::WebhookSecretMissing)
        ));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        assert!(!format!("{:?}", verifier()).contains("whsec"));
    }

    proptest! {
        #[test]
        fn parser_never_panics(header in ".{0,300}") {
            let _ = parse_header(&header);
        }

        #[test]
        fn parser_never_panics_on_header_like_input(
            items in prop::collection::vec(("[tv01x ]{0,3}", "[0-9a-fA-F=, -]{0,70}"), 0..6)
        ) {
            let header = items.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            let _ = verifier().verify(BODY, &header, T);
        }

        #[test]
        fn what_we_sign_verifies(body in prop::collection::vec(any::<u8>(), 0..512), t in 0i64..4_000_000_000) {
            prop_assert!(verifier().verify(&body, &sign_header(SECRET, t, &body), t).is_ok());
        }
    }
}
