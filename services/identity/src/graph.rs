//! The identity graph: identifier → profile, kept in the state store.
//!
//! Keys: `id/<kind>/<value>` → profile id; `pr/<profile id>` → [`ProfileNode`];
//! `mergedinto/<profile id>` → survivor id (so a stale id still resolves).
//!
//! Rules of this first version (issue 3 makes them declarative):
//! - identifiers: `user_id`, `anonymous_id`, `email` (trimmed, lower-cased), taken from
//!   `userId`, `anonymousId`, `traits.email`, `context.traits.email`, and `previousId` of
//!   an alias (looked up as user id or anonymous id);
//! - blocked values (`null`, `undefined`, `anonymous`, only zeros or dashes, ...) are
//!   never used;
//! - a profile id is derived from the first identifier that created it, so a replay
//!   creates the same id;
//! - an event whose identifiers point at several profiles merges them, except that two
//!   profiles with different user ids are never merged (a shared device must not join
//!   two known people); the survivor is the profile with a user id, then the older one,
//!   then the smaller id.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use tessera_common::Result;
use tessera_common::ids::deterministic_id;
use tessera_common::records::{Identifier, IngestedEvent, ProfileMerge};
use tessera_common::store::Txn;

pub const USER_ID: &str = "user_id";
pub const ANONYMOUS_ID: &str = "anonymous_id";
pub const EMAIL: &str = "email";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileNode {
    pub id: String,
    /// Event time of the event that created it.
    pub created_at: i64,
    pub identifiers: Vec<Identifier>,
}

impl ProfileNode {
    fn user_ids(&self) -> impl Iterator<Item = &str> {
        self.identifiers
            .iter()
            .filter(|i| i.kind == USER_ID)
            .map(|i| i.value.as_str())
    }
    fn is_known(&self) -> bool {
        self.user_ids().next().is_some()
    }
}

fn id_key(i: &Identifier) -> Vec<u8> {
    format!("id/{}/{}", i.kind, i.value).into_bytes()
}
fn node_key(profile: &str) -> Vec<u8> {
    format!("pr/{profile}").into_bytes()
}
fn merged_key(profile: &str) -> Vec<u8> {
    format!("mergedinto/{profile}").into_bytes()
}

/// Values that identify nobody; SDKs and forms send them by mistake.
pub fn is_blocked(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    v.is_empty()
        || matches!(
            v.as_str(),
            "null"
                | "undefined"
                | "anonymous"
                | "none"
                | "nil"
                | "unknown"
                | "n/a"
                | "[object object]"
        )
        || v.chars().all(|c| c == '0' || c == '-')
}

pub fn normalise_email(raw: &str) -> Option<String> {
    let e = raw.trim().to_lowercase();
    let (local, domain) = e.split_once('@')?;
    (!local.is_empty() && domain.contains('.') && !e.contains(char::is_whitespace)).then_some(e)
}

/// The identifiers an event carries, normalised, blocked values removed, in priority
/// order (user id, email, anonymous id).
pub fn extract(event: &IngestedEvent, payload: &Value) -> Vec<Identifier> {
    let mut out = Vec::new();
    let mut push = |kind: &str, value: &str| {
        if !is_blocked(value) {
            let id = Identifier {
                kind: kind.into(),
                value: value.to_string(),
            };
            if !out.contains(&id) {
                out.push(id);
            }
        }
    };
    if let Some(u) = &event.user_id {
        push(USER_ID, u);
    }
    for path in [
        &["traits", "email"][..],
        &["context", "traits", "email"][..],
    ] {
        let mut v = payload;
        for p in path {
            v = &v[*p];
        }
        if let Some(e) = v.as_str().and_then(normalise_email) {
            push(EMAIL, &e);
        }
    }
    if let Some(a) = &event.anonymous_id {
        push(ANONYMOUS_ID, a);
    }
    out
}

/// What resolving one event did.
#[derive(Debug, Default, PartialEq)]
pub struct Resolution {
    pub profile_id: String,
    pub merges: Vec<ProfileMerge>,
    pub created: bool,
}

/// Resolves an event's identifiers to one profile, creating, extending and merging
/// profiles as the rules say. Deterministic in the event and the graph.
pub fn resolve(
    txn: &mut Txn<'_>,
    event: &IngestedEvent,
    identifiers: &[Identifier],
    previous_id: Option<&str>,
) -> Result<Resolution> {
    // Which profile each identifier points at now.
    let mut linked: Vec<(Identifier, Option<String>)> = Vec::new();
    for i in identifiers {
        let p = txn
            .get(&id_key(i))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        linked.push((i.clone(), p));
    }
    let mut found: Vec<ProfileNode> = Vec::new();
    let add_found = |txn: &Txn<'_>, pid: &str, found: &mut Vec<ProfileNode>| -> Result<()> {
        if found.iter().any(|n| n.id == pid) {
            return Ok(());
        }
        if let Some(n) = txn.get_json::<ProfileNode>(&node_key(pid))? {
            found.push(n);
        }
        Ok(())
    };
    for (_, p) in &linked {
        if let Some(pid) = p {
            add_found(txn, pid, &mut found)?;
        }
    }
    // alias: the previous id's profile joins too.
    if let Some(prev) = previous_id.filter(|p| !is_blocked(p)) {
        for kind in [USER_ID, ANONYMOUS_ID] {
            let i = Identifier {
                kind: kind.into(),
                value: prev.to_string(),
            };
            if let Some(b) = txn.get(&id_key(&i))? {
                add_found(txn, &String::from_utf8_lossy(&b), &mut found)?;
            }
        }
    }

    let event_user = identifiers
        .iter()
        .find(|i| i.kind == USER_ID)
        .map(|i| i.value.as_str());
    // Profiles that may join: never a profile known under another user id.
    let compatible = |n: &ProfileNode| match event_user {
        Some(u) => n.user_ids().all(|x| x == u),
        None => true,
    };
    let mut joinable: Vec<ProfileNode> = found.iter().filter(|n| compatible(n)).cloned().collect();
    if event_user.is_none() && joinable.iter().filter(|n| n.is_known()).count() > 1 {
        // Several known people share these identifiers: merge none; use the profile of
        // the highest-priority identifier, or (when they were found only through an
        // alias's previousId) the one the survivor rule picks.
        let keep = linked
            .iter()
            .find_map(|(_, p)| p.clone())
            .or_else(|| pick_survivor(&joinable).map(|n| n.id.clone()));
        joinable.retain(|n| Some(&n.id) == keep.as_ref());
    }

    let mut res = Resolution::default();
    let mut survivor = match pick_survivor(&joinable) {
        Some(s) => s.clone(),
        None => {
            let Some(first) = identifiers.first() else {
                // Every identifier was blocked: a profile of its own, keyed by the message.
                let id = deterministic_id("profile-unidentified", &[&event.message_id]);
                res.profile_id = id;
                res.created = true;
                return Ok(res);
            };
            res.created = true;
            ProfileNode {
                id: deterministic_id("profile", &[&first.kind, &first.value]),
                created_at: event.event_time,
                identifiers: Vec::new(),
            }
        }
    };
    for merged in joinable.iter().filter(|n| n.id != survivor.id) {
        for i in &merged.identifiers {
            if !survivor.identifiers.contains(i) {
                survivor.identifiers.push(i.clone());
            }
            txn.put(id_key(i), survivor.id.clone());
        }
        survivor.created_at = survivor.created_at.min(merged.created_at);
        txn.delete(node_key(&merged.id));
        txn.put(merged_key(&merged.id), survivor.id.clone());
        res.merges.push(ProfileMerge {
            merge_id: deterministic_id("merge", &[&survivor.id, &merged.id, &event.message_id]),
            survivor: survivor.id.clone(),
            merged: merged.id.clone(),
            cause_message_id: event.message_id.clone(),
            event_time: event.event_time,
            received_at: event.received_at,
        });
    }
    // New identifiers join the survivor; ones owned by an incompatible profile stay there.
    for (i, owner) in &linked {
        let owned_elsewhere = owner
            .as_ref()
            .is_some_and(|o| o != &survivor.id && !joinable.iter().any(|n| &n.id == o));
        if !owned_elsewhere && !survivor.identifiers.contains(i) {
            survivor.identifiers.push(i.clone());
            txn.put(id_key(i), survivor.id.clone());
        }
    }
    txn.put_json(node_key(&survivor.id), &survivor)?;
    res.profile_id = survivor.id;
    Ok(res)
}

fn pick_survivor(nodes: &[ProfileNode]) -> Option<&ProfileNode> {
    nodes.iter().min_by(|a, b| {
        b.is_known()
            .cmp(&a.is_known())
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_common::store::{MemStore, Store};

    /// The profile an identifier resolves to.
    fn lookup(txn: &Txn<'_>, kind: &str, value: &str) -> Result<Option<String>> {
        let i = Identifier {
            kind: kind.into(),
            value: value.into(),
        };
        Ok(txn
            .get(&id_key(&i))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn event(msg: &str, user: Option<&str>, anon: Option<&str>, t: i64) -> IngestedEvent {
        IngestedEvent {
            message_id: msg.into(),
            source: "s".into(),
            kind: "track".into(),
            user_id: user.map(Into::into),
            anonymous_id: anon.map(Into::into),
            event: Some("E".into()),
            received_at: t,
            event_time: t,
            payload: "{}".into(),
        }
    }

    fn apply(store: &MemStore, e: &IngestedEvent) -> Resolution {
        let ids = extract(e, &json!({}));
        let mut txn = Txn::new(store);
        let r = resolve(&mut txn, e, &ids, None).unwrap();
        store.write(txn.into_batch()).unwrap();
        r
    }

    #[test]
    fn anonymous_then_known_merges_into_the_known_profile() {
        let s = MemStore::default();
        let a = apply(&s, &event("1", None, Some("anon-1"), 1));
        assert!(a.created);
        let k = apply(&s, &event("2", Some("user-1"), None, 2));
        assert_ne!(a.profile_id, k.profile_id);
        let both = apply(&s, &event("3", Some("user-1"), Some("anon-1"), 3));
        assert_eq!(both.profile_id, k.profile_id, "the known profile survives");
        assert_eq!(both.merges.len(), 1);
        assert_eq!(both.merges[0].merged, a.profile_id);
        let txn = Txn::new(&s);
        assert_eq!(
            lookup(&txn, ANONYMOUS_ID, "anon-1").unwrap(),
            Some(k.profile_id.clone())
        );
        // The same event again changes nothing and merges nothing.
        let again = apply(&s, &event("3", Some("user-1"), Some("anon-1"), 3));
        assert_eq!(
            again,
            Resolution {
                profile_id: k.profile_id,
                merges: vec![],
                created: false
            }
        );
    }

    #[test]
    fn a_shared_device_never_merges_two_known_people() {
        let s = MemStore::default();
        let p1 = apply(&s, &event("1", Some("alice"), Some("device"), 1));
        let p2 = apply(&s, &event("2", Some("bob"), Some("device"), 2));
        assert_ne!(p1.profile_id, p2.profile_id);
        assert!(p2.merges.is_empty());
        let txn = Txn::new(&s);
        assert_eq!(
            lookup(&txn, ANONYMOUS_ID, "device").unwrap(),
            Some(p1.profile_id)
        );
    }

    #[test]
    fn email_links_profiles_and_blocked_values_are_ignored() {
        let s = MemStore::default();
        let e1 = event("1", None, Some("a1"), 1);
        let mut txn = Txn::new(&s);
        let ids = extract(&e1, &json!({"traits": {"email": "  Ann@Example.COM "}}));
        assert_eq!(
            ids[0],
            Identifier {
                kind: EMAIL.into(),
                value: "ann@example.com".into()
            }
        );
        let r1 = resolve(&mut txn, &e1, &ids, None).unwrap();
        s.write(txn.into_batch()).unwrap();
        let e2 = event("2", Some("undefined"), Some("a2"), 2);
        let ids2 = extract(
            &e2,
            &json!({"context": {"traits": {"email": "ann@example.com"}}}),
        );
        assert!(
            ids2.iter().all(|i| i.kind != USER_ID),
            "'undefined' is blocked"
        );
        let mut txn = Txn::new(&s);
        let r2 = resolve(&mut txn, &e2, &ids2, None).unwrap();
        assert_eq!(r2.profile_id, r1.profile_id);
        assert!(
            is_blocked("0000") && is_blocked("--") && is_blocked(" NULL ") && !is_blocked("u-1")
        );
    }

    #[test]
    fn an_alias_whose_previous_id_is_ambiguous_merges_nobody() {
        let s = MemStore::default();
        // Two known people who share the anonymous id "shared" ...
        let alice = apply(&s, &event("1", Some("alice"), Some("shared"), 1));
        let _bob = apply(&s, &event("2", Some("bob"), Some("bob-device"), 2));
        // ... and bob's user id is also an anonymous id somewhere: the alias below finds
        // both known profiles through previousId alone.
        let mut txn = Txn::new(&s);
        let both = Identifier {
            kind: ANONYMOUS_ID.into(),
            value: "bob".into(),
        };
        txn.put(id_key(&both), alice.profile_id.clone());
        s.write(txn.into_batch()).unwrap();
        let alias = event("3", None, Some("new-visitor"), 3);
        let ids = extract(&alias, &json!({}));
        let mut txn = Txn::new(&s);
        let r = resolve(&mut txn, &alias, &ids, Some("bob")).unwrap();
        assert!(
            r.merges.is_empty(),
            "two known people are never merged: {r:?}"
        );
    }

    #[test]
    fn profile_ids_are_deterministic() {
        let a = apply(&MemStore::default(), &event("1", Some("u"), None, 1));
        let b = apply(&MemStore::default(), &event("9", Some("u"), Some("x"), 5));
        assert_eq!(a.profile_id, b.profile_id);
    }
}
