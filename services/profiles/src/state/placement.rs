//! Which profiles this instance acts on: the partitions it owns, and sums over them.

use super::*;

/// Which profiles this instance acts on. Every input of profiles is keyed by profile id
/// and has as many partitions as `events.resolved`; the range assignor gives an
/// instance the same partition numbers of each. So a profile belongs to the partition
/// its id hashes to ([`tessera_common::kafka::partition_of`]), and this instance owns
/// it while it owns that partition of `events.resolved`.
#[derive(Clone)]
pub struct Placement {
    pub topic: String,
    pub partitions: i32,
    /// `None`: one instance that owns everything (unit tests, tools).
    pub ownership: Option<Ownership>,
}

impl Placement {
    /// A single instance that owns every profile.
    pub fn everything() -> Placement {
        Placement {
            topic: String::new(),
            partitions: 1,
            ownership: None,
        }
    }

    pub fn partition(&self, id: &str) -> i32 {
        tessera_common::kafka::partition_of(id.as_bytes(), self.partitions)
    }

    /// Whether this instance owns the profile's partition (assigned, maybe rebuilding).
    pub fn owns(&self, id: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|o| o.owns(&self.topic, self.partition(id)))
    }

    /// The partitions this instance serves: assigned and caught up.
    pub fn serving(&self) -> Vec<i32> {
        match &self.ownership {
            None => (0..self.partitions).collect(),
            Some(o) => o.serving(&self.topic),
        }
    }

    /// Whether the profile's partition is served here (its state is current).
    pub fn serves(&self, id: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|o| o.serves(&self.topic, self.partition(id)))
    }
}

/// The sum of a per-partition counter over `partitions`.
pub fn sum_partitions(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
    partitions: &[i32],
    key: impl Fn(i32) -> Vec<u8>,
) -> Result<i64> {
    let mut total = 0;
    for p in partitions {
        if let Some(v) = get(&key(*p))? {
            total += serde_json::from_slice::<i64>(&v)?;
        }
    }
    Ok(total)
}
