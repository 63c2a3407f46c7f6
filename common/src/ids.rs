//! Deterministic ids: the same inputs always give the same id, so a replay after a
//! crash produces records a consumer can de-duplicate (brief, principle 4).
//!
//! Many ids are derived from personal data (a profile id from its anchor identifier,
//! an identifier's key in the state from its value, a subject key's name from the
//! visitor's id). They are keyed hashes (HMAC-SHA-256) under the deployment's
//! pseudonym secret (`privacy.pseudonym_secret`), so that nobody without the secret can
//! tell whose they are by hashing a list of emails: a profile id, a state key or a
//! record key names nobody.
//!
//! The secret is the deployment's, the same in every service and every instance, and
//! never changes (every id in the state and on the topics depends on it). Each service
//! installs it once at start ([`install_secret`]); until then (unit tests, tools) the
//! demo secret is used, the one demo mode configures.

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::{Error, Result};

/// The secret of demo mode (`demo.toml`), and of code that installed none.
pub const DEMO_PSEUDONYM_SECRET: &str = "demo-pseudonym-secret-not-for-production";

static SECRET: OnceLock<String> = OnceLock::new();

/// Sets this process's pseudonym secret. A process serves one deployment: installing
/// another secret than the one installed is an error.
pub fn install_secret(secret: &str) -> Result<()> {
    let installed = SECRET.get_or_init(|| secret.to_string());
    if installed != secret {
        return Err(Error::Config(
            "this process already uses another privacy.pseudonym_secret: the services of \
             one process must belong to one deployment"
                .into(),
        ));
    }
    Ok(())
}

fn secret() -> &'static [u8] {
    SECRET
        .get()
        .map_or(DEMO_PSEUDONYM_SECRET.as_bytes(), |s| s.as_bytes())
}

/// The keyed hash of `kind` and `parts`, separated so that ("ab","c") and ("a","bc")
/// differ.
pub fn keyed_hash(kind: &str, parts: &[&str]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret()).expect("HMAC takes any key length");
    mac.update(kind.as_bytes());
    for p in parts {
        mac.update(&[0x1f]);
        mac.update(p.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// A UUID (version 8, the custom one) from the keyed hash of the parts.
pub fn deterministic_id(kind: &str, parts: &[&str]) -> String {
    let h = keyed_hash(kind, parts);
    Uuid::new_v8(h[..16].try_into().expect("16 bytes")).to_string()
}

/// What tells one secret from another without revealing it: the keys topic records the
/// deployment's, and a service with another secret refuses to start.
pub fn secret_fingerprint() -> String {
    keyed_hash("pseudonym-secret-fingerprint", &[])[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A subject's name on the keys topic and in sealed records.
pub type SubjectHash = [u8; 16];

/// A keyed hash ([`keyed_hash`]): the keys topic's record keys and a sealed
/// record's header name the subject, and nobody without the pseudonym secret can tell
/// whose key it is by hashing a list of ids.
pub fn subject_hash(subject: &str) -> SubjectHash {
    keyed_hash("subject-key", &[subject])[..16]
        .try_into()
        .expect("16 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_parts_same_id_and_separator_matters() {
        assert_eq!(
            deterministic_id("x", &["a", "b"]),
            deterministic_id("x", &["a", "b"])
        );
        assert_ne!(
            deterministic_id("x", &["ab", "c"]),
            deterministic_id("x", &["a", "bc"])
        );
        assert_ne!(deterministic_id("x", &["a"]), deterministic_id("y", &["a"]));
    }

    /// The audit's finding: ids were UUIDv5 under a constant namespace, so anyone could
    /// compute a person's profile id, and the key of her email in the state, from her
    /// email. Keyed, they are not what the public formula gives.
    #[test]
    fn an_id_is_not_the_unkeyed_formula_of_its_parts() {
        const OLD_NAMESPACE: Uuid = Uuid::from_u128(0x7e55e7a0_cd90_4c1b_9a57_4f3d2b1c0e11);
        let unkeyed = Uuid::new_v5(
            &OLD_NAMESPACE,
            "profile\u{1f}email\u{1f}jane@example.com".as_bytes(),
        );
        let id = deterministic_id("profile", &["email", "jane@example.com"]);
        assert_ne!(id, unkeyed.to_string());
        assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 8);
    }

    #[test]
    fn the_secret_changes_every_id() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"another secret").unwrap();
        mac.update(b"profile\x1femail\x1fjane@example.com");
        let other: [u8; 32] = mac.finalize().into_bytes().into();
        assert_ne!(other, keyed_hash("profile", &["email", "jane@example.com"]));
    }
}
