//! The profiles store's key layout, in one place:
//!
//! | key | value |
//! | --- | --- |
//! | `p/<id>` | the profile (JSON) |
//! | `redirect/<id>` | the survivor of a merge |
//! | `survived/<id>` | the latest merge version whose transfer it absorbed |
//! | `idx/<identifier hash>` | the profile id (lookups) |
//! | `segsize/<segment>/<partition>` | members per partition |
//! | `sm/<segment>/<id>` | entry time (the members) |
//! | `hh/<hash>/<id>`, `acct/<hash>/<id>` | household and account members |
//! | `tm/<partition>/<due>/<id>` | a profile's next window edge or waiting trigger |
//! | `log/<id>/<time>/<message>`, `logn/<id>` | the kept events and their count |
//! | `seen/<id>`, `seenexp/<expiry>/<id>` | message, merge and transfer ids seen within the window |
//! | `meta/applied` | the definition versions in force |
//! | `meta/backfill` | the back-fill in progress or last done |
//! | `meta/profiles/<partition>` | profiles per partition |

use super::*;

/// Where the profiles are, in id order.
pub(crate) const PROFILE_PREFIX: &[u8] = b"p/";

pub fn profile_key(id: &str) -> Vec<u8> {
    format!("p/{id}").into_bytes()
}

pub(crate) fn redirect_key(id: &str) -> Vec<u8> {
    format!("redirect/{id}").into_bytes()
}

/// The latest version of a merge whose transfer the profile absorbed: an older merge of
/// it read later is undone already.
pub(crate) fn survived_key(id: &str) -> Vec<u8> {
    format!("survived/{id}").into_bytes()
}

/// A version stored as text (0 when absent).
pub(crate) fn get_version(txn: &Txn<'_>, key: &[u8]) -> Result<i64> {
    Ok(txn
        .get(key)?
        .and_then(|v| String::from_utf8_lossy(&v).parse().ok())
        .unwrap_or(0))
}

/// By the identifier's hash, never its value: a value in a key would outlive the
/// person's erasure in RocksDB's MANIFEST (it keeps every table file's first and last key).
pub fn index_key(kind: &str, value: &str) -> Vec<u8> {
    format!(
        "idx/{}",
        tessera_common::suppressions::identifier_hash(kind, value)
    )
    .into_bytes()
}

/// A segment's members in one partition (the API adds up the partitions it serves).
pub fn segment_size_key(segment: &str, partition: i32) -> Vec<u8> {
    format!("segsize/{segment}/{partition:05}").into_bytes()
}

/// Profiles in one partition.
pub fn profiles_count_key(partition: i32) -> Vec<u8> {
    format!("meta/profiles/{partition:05}").into_bytes()
}

/// Members of a segment: `sm/<segment>/<profile>` → entry time.
pub fn member_key_prefix(segment: &str) -> String {
    format!("sm/{segment}/")
}

/// A profile's next window edge or trigger, under its partition: an instance fires the
/// timers of the partitions it serves, and those a moved partition left here wait for
/// it to come back (by then replaying its records has brought them up to date).
pub(crate) fn timer_key(partition: i32, due: i64, id: &str) -> Vec<u8> {
    format!("{}{:020}/{id}", timer_prefix(partition), due.max(0)).into_bytes()
}

pub(crate) fn timer_prefix(partition: i32) -> String {
    format!("tm/{partition:05}/")
}

pub const META_BACKFILL: &[u8] = b"meta/backfill";

pub(crate) const META_APPLIED: &[u8] = b"meta/applied";

/// Events of a profile in event-time order (the sign bit flipped so that the decimal
/// order is the numeric order).
pub(crate) fn log_key(profile: &str, t: i64, msg: &str) -> Vec<u8> {
    format!("log/{profile}/{:020}/{msg}", (t ^ i64::MIN) as u64).into_bytes()
}

pub(crate) fn log_prefix(profile: &str) -> String {
    format!("log/{profile}/")
}

pub(crate) fn log_count_key(profile: &str) -> Vec<u8> {
    format!("logn/{profile}").into_bytes()
}

/// Members of a household (`hh`) or an account (`acct`): `<kind>/<hash>/<profile>`.
pub fn member_prefix(kind: &str, group: &str) -> String {
    format!("{kind}/{}/", deterministic_id(kind, &[group]))
}

pub(crate) fn seen_key(id: &str) -> Vec<u8> {
    format!("seen/{id}").into_bytes()
}

pub(crate) const SEEN_EXP_PREFIX: &str = "seenexp/";

/// Where a merged-away profile went, and the version of the merge that sent it there
/// (0 for a split's, and for merges of the first schema).
pub(crate) fn redirect_value(survivor: &str, version: i64) -> Vec<u8> {
    format!("{survivor} {version}").into_bytes()
}

fn parse_redirect(v: &[u8]) -> (String, i64) {
    let s = String::from_utf8_lossy(v);
    match s.split_once(' ') {
        Some((to, version)) => (to.to_string(), version.parse().unwrap_or(0)),
        None => (s.into_owned(), 0),
    }
}

/// Follows merge redirects to the live profile id.
pub fn live_id(get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>, id: &str) -> Result<String> {
    Ok(live_since(get, id, 0)?.0)
}

/// Follows the redirects of merges of version `since` or later to the profile that is
/// live for a merge of version `since`; also returns that profile's own redirect if it
/// has one (an older merge's: a later merge named it survivor, so it is live again).
///
/// Identity may merge X into Y and later Y back into X (a late event moved the anchor
/// twice), and profiles may read the two merges in either order: the redirects then
/// form a cycle, broken at its oldest redirect, whose profile is the live one.
pub(crate) fn live_since(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
    id: &str,
    since: i64,
) -> Result<(String, Option<i64>)> {
    // The profiles passed and the version of each one's redirect.
    let mut path: Vec<(String, i64)> = Vec::new();
    let mut cur = id.to_string();
    for _ in 0..32 {
        let Some(v) = get(&redirect_key(&cur))? else {
            return Ok((cur, None));
        };
        let (next, version) = parse_redirect(&v);
        if version < since {
            return Ok((cur, Some(version)));
        }
        path.push((cur, version));
        if let Some(at) = path.iter().position(|(p, _)| *p == next) {
            let (live, version) = path[at..]
                .iter()
                .min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
                .cloned()
                .expect("a cycle has a redirect");
            return Ok((live, Some(version)));
        }
        cur = next;
    }
    Err(Error::Internal(format!(
        "redirect chain from profile {id} is too long"
    )))
}
