//! Identifiers for ad platforms: normalised by each platform's rules, then SHA-256 (hex,
//! lower case). A value that already is a SHA-256 digest passes through unchanged, so
//! nothing is hashed twice.
//!
//! - Google (Customer Match, enhanced conversions): email trimmed and lower-cased;
//!   phone in E.164 with its `+` (`+12125650000`).
//! - Meta: email trimmed and lower-cased; phone as digits with the country code and no
//!   `+` or leading zeros (`16505551212`).

use phonenumber::country::Id as Region;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Google,
    Meta,
}

pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a value already is a SHA-256 digest in hex.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The hashed email, or None if the value is no email.
pub fn email(raw: &str) -> Option<String> {
    let t = raw.trim();
    if is_sha256(t) {
        return Some(t.to_ascii_lowercase());
    }
    let normalised = t.to_lowercase();
    let (local, domain) = normalised.split_once('@')?;
    if local.is_empty() || !domain.contains('.') {
        return None;
    }
    Some(sha256_hex(&normalised))
}

/// The phone number as the platform wants it before hashing; `region` for numbers
/// written without a country code.
pub fn normalise_phone(platform: Platform, raw: &str, region: Region) -> Option<String> {
    let n = phonenumber::parse(Some(region), raw.trim()).ok()?;
    let e164 = n.format().mode(phonenumber::Mode::E164).to_string();
    Some(match platform {
        Platform::Google => e164,
        Platform::Meta => e164.trim_start_matches('+').to_string(),
    })
}

/// The hashed phone number, or None if the value is no phone number.
pub fn phone(platform: Platform, raw: &str, region: Region) -> Option<String> {
    let t = raw.trim();
    if is_sha256(t) {
        return Some(t.to_ascii_lowercase());
    }
    normalise_phone(platform, t, region).map(|p| sha256_hex(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Region = Region::US;

    /// Meta's published examples (Conversions API, customer information parameters).
    #[test]
    fn meta_hashes_equal_the_published_examples() {
        assert_eq!(
            email(" John_Smith@gmail.com ").unwrap(),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            normalise_phone(Platform::Meta, "(650)555-1212", US).unwrap(),
            "16505551212"
        );
        assert_eq!(
            phone(Platform::Meta, "(650)555-1212", US).unwrap(),
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
        );
        // The first name example, to show the hash itself is the platform's.
        assert_eq!(
            sha256_hex("mary"),
            "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
        );
    }

    /// Google's published E.164 examples (+12125650000, +442070313000); the digests
    /// were computed independently (Python hashlib).
    #[test]
    fn google_normalises_phones_to_e164_with_plus() {
        assert_eq!(
            normalise_phone(Platform::Google, "(212) 565-0000", US).unwrap(),
            "+12125650000"
        );
        assert_eq!(
            normalise_phone(Platform::Google, "+44 20 7031 3000", US).unwrap(),
            "+442070313000"
        );
        assert_eq!(
            phone(Platform::Google, "212-565-0000", US).unwrap(),
            "d360a79e746532a6a1e7b8164440b04cdd8797e23126f7a4de7a4b67fdcdba98"
        );
        assert_eq!(
            email("  Dana@Example.com").unwrap(),
            "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"
        );
    }

    #[test]
    fn a_hashed_value_is_never_hashed_again_and_junk_is_refused() {
        let h = email("john_smith@gmail.com").unwrap();
        assert_eq!(email(&h).unwrap(), h);
        assert_eq!(email(&h.to_uppercase()).unwrap(), h);
        assert_eq!(phone(Platform::Meta, &h, US).unwrap(), h);
        assert_eq!(email("not an email"), None);
        assert_eq!(phone(Platform::Google, "call me", US), None);
    }
}
