//! How deliveries are signed: `X-Finetuned-Signature` (HMAC-SHA256 of the body, keyed by the
//! secret as written) always when the server has a secret, and the Standard Webhooks headers
//! (`webhook-signature`, over the delivery id, timestamp and body) when the secret has their
//! form, so that receivers can verify with a Standard Webhooks library and refuse replays.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};

/// How Standard Webhooks secrets begin; the rest is the key in base64.
const STANDARD_PREFIX: &str = "whsec_";

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `sha256=<hex HMAC-SHA256 of body>`, the value of `X-Finetuned-Signature`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let hex: String = hmac_sha256(secret.as_bytes(), &[body]).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The key of `webhook-signature`: `Some` when `secret` is `whsec_` and base64 (padded or
/// not), `None` for a secret of another form; `Err` says why a `whsec_` secret is unusable.
pub fn standard_key(secret: &str) -> Result<Option<Vec<u8>>, String> {
    let Some(encoded) = secret.strip_prefix(STANDARD_PREFIX) else { return Ok(None) };
    let lenient = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    match lenient.decode(encoded) {
        Ok(key) if !key.is_empty() => Ok(Some(key)),
        Ok(_) => Err("the key after `whsec_` is empty".into()),
        Err(e) => Err(format!("the key after `whsec_` is not base64: {e}")),
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, Standard Webhooks' signature.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    format!("v1,{}", STANDARD.encode(hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])))
}

/// The server's webhook secret, ready to sign.
#[derive(Debug, Clone)]
pub struct Signer {
    secret: String,
    standard: Option<Vec<u8>>,
}

impl Signer {
    /// `Err` when a `whsec_` secret does not hold a base64 key.
    pub fn new(secret: &str) -> Result<Self, String> {
        Ok(Self { secret: secret.to_string(), standard: standard_key(secret)? })
    }

    /// The signature headers of one attempt of delivery `id` at `timestamp` (Unix seconds).
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        let mut headers = vec![("x-finetuned-signature", signature(&self.secret, body))];
        if let Some(key) = &self.standard {
            headers.push(("webhook-signature", standard_signature(key, id, timestamp, body)));
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Made with the `standardwebhooks` Python package (1.1.0): Webhook(secret).sign(id, time, body).
        let key = standard_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap().unwrap();
        let sig = standard_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn only_whsec_secrets_get_the_standard_signature() {
        assert_eq!(standard_key("s3cret"), Ok(None));
        assert!(standard_key("whsec_not base64!").unwrap_err().contains("not base64"));
        assert!(standard_key("whsec_").unwrap_err().contains("empty"));
        let plain = Signer::new("s3cret").unwrap().headers("1", 0, b"{}");
        assert_eq!(plain.iter().map(|(h, _)| *h).collect::<Vec<_>>(), ["x-finetuned-signature"]);
        let standard = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap().headers("1", 0, b"{}");
        assert_eq!(standard.iter().map(|(h, _)| *h).collect::<Vec<_>>(), ["x-finetuned-signature", "webhook-signature"]);
    }
}
