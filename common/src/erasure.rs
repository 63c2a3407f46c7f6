//! When a profile id was erased. Profiles and activation remember it (`erased/<profile>`
//! in their state), so a record about the profile received before the erasure, still on
//! its way on another topic, is dropped instead of bringing the person back or getting a
//! new key for them. A person who comes back afterwards starts afresh.

use crate::Result;
use crate::store::Txn;

fn key(profile: &str) -> Vec<u8> {
    format!("erased/{profile}").into_bytes()
}

/// Remembers that `profile` was erased by a request made at `at` (ingest's clock, as the
/// records' `received_at`).
pub fn mark(txn: &mut Txn<'_>, profile: &str, at: i64) -> Result<()> {
    txn.put_json(key(profile), &at)
}

/// Whether a record about `profile` received at `received_at` was sent before the
/// profile was erased.
pub fn sent_before(txn: &Txn<'_>, profile: &str, received_at: i64) -> Result<bool> {
    Ok(txn
        .get_json::<i64>(&key(profile))?
        .is_some_and(|at| received_at <= at))
}
