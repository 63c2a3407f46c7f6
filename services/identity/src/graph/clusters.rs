//! The union of identifiers into profiles under the rules: limits per type, priorities,
//! separations, fuzzy dedupe. What [`Graph`] uses to recompute a part of the graph.

use super::*;

/// Clusters of identifiers being built by the greedy rule, in memory.
#[derive(Default)]
pub(crate) struct Clusters {
    pub(crate) of: HashMap<Identifier, usize>,
    pub(crate) sets: Vec<Cluster>,
}

#[derive(Clone)]
pub(crate) struct Cluster {
    pub(crate) alive: bool,
    pub(crate) ids: BTreeSet<(usize, Identifier)>,
    pub(crate) anchor: ((usize, i64, String), Identifier),
    pub(crate) max_order: Option<Order>,
    pub(crate) separations: BTreeSet<String>,
    pub(crate) detached: bool,
}

pub(crate) struct Context<'a> {
    pub(crate) rules: &'a Rules,
    pub(crate) separations: &'a BTreeMap<String, Separation>,
    pub(crate) detached: &'a BTreeSet<Identifier>,
}

impl Clusters {
    pub(crate) fn cluster_of(
        &mut self,
        ctx: &Context<'_>,
        i: &Identifier,
        first: (i64, String),
    ) -> usize {
        if let Some(c) = self.of.get(i) {
            return *c;
        }
        let prio = ctx.rules.priority(&i.kind);
        let separations = ctx
            .separations
            .values()
            .filter(|s| s.left.contains(i) || s.right.contains(i))
            .map(|s| s.id.clone())
            .collect();
        // At least its first sighting: the fast path must never see a fact older than an
        // identifier's first sighting as in order (one-identifier events are not facts).
        let max_order = (first.0 != i64::MAX).then(|| Order {
            t: first.0,
            msg: first.1.clone(),
            rank: 0,
            key: String::new(),
        });
        self.sets.push(Cluster {
            alive: true,
            ids: BTreeSet::from([(prio, i.clone())]),
            anchor: ((prio, first.0, first.1), i.clone()),
            max_order,
            separations,
            detached: ctx.detached.contains(i),
        });
        self.of.insert(i.clone(), self.sets.len() - 1);
        self.sets.len() - 1
    }

    /// Whether `members` may join. A limit bounds what a link adds: the joined profile
    /// may hold no more values of a kind than the limit, or than one member already
    /// holds (a profile past its limit through deduplication). A fuzzy link may join
    /// values of a `dedupe` kind beyond it.
    pub(crate) fn allowed(&self, ctx: &Context<'_>, members: &[usize], fuzzy: bool) -> bool {
        let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
        for &c in members {
            let mut own: HashMap<&str, usize> = HashMap::new();
            for (_, i) in &self.sets[c].ids {
                *own.entry(i.kind.as_str()).or_default() += 1;
            }
            for (kind, n) in own {
                let (total, most) = counts.entry(kind).or_default();
                *total += n;
                *most = (*most).max(n);
            }
        }
        for (kind, (total, most)) in counts {
            if total > ctx.rules.limit(kind).max(most) && !(fuzzy && ctx.rules.dedupes(kind)) {
                return false;
            }
        }
        let seps: BTreeSet<&String> = members
            .iter()
            .flat_map(|&c| self.sets[c].separations.iter())
            .collect();
        for s in seps {
            let Some(sep) = ctx.separations.get(s) else {
                continue;
            };
            let has = |side: &[Identifier]| {
                members.iter().any(|&c| {
                    side.iter()
                        .any(|i| self.sets[c].ids.iter().any(|(_, x)| x == i))
                })
            };
            if has(&sep.left) && has(&sep.right) {
                return false;
            }
        }
        true
    }

    /// Applies one fact; `first` gives an identifier's first-seen time for anchors.
    pub(crate) fn step(
        &mut self,
        ctx: &Context<'_>,
        fact: &Fact,
        first: &dyn Fn(&Identifier) -> (i64, String),
    ) {
        for i in &fact.ids {
            self.cluster_of(ctx, i, first(i));
        }
        let mut linking: Vec<&Identifier> = fact
            .ids
            .iter()
            .filter(|i| !ctx.detached.contains(*i))
            .collect();
        while linking.len() > 1 {
            let mut members: Vec<usize> = linking.iter().map(|i| self.of[*i]).collect();
            members.sort_unstable();
            members.dedup();
            if self.allowed(ctx, &members, fact.rule.is_some()) {
                self.union(&members);
                break;
            }
            linking.pop();
        }
        for i in &fact.ids {
            let root = self.of[i];
            let m = &mut self.sets[root].max_order;
            if m.as_ref().is_none_or(|m| *m < fact.order) {
                *m = Some(fact.order.clone());
            }
        }
    }

    pub(crate) fn union(&mut self, members: &[usize]) {
        let Some((&into, rest)) = members.split_first() else {
            return;
        };
        for &c in rest {
            let placeholder = self.sets[into].anchor.clone();
            let taken = std::mem::replace(
                &mut self.sets[c],
                Cluster {
                    alive: false,
                    ids: BTreeSet::new(),
                    anchor: placeholder,
                    max_order: None,
                    separations: BTreeSet::new(),
                    detached: false,
                },
            );
            for (_, i) in &taken.ids {
                self.of.insert(i.clone(), into);
            }
            let target = &mut self.sets[into];
            target.ids.extend(taken.ids);
            target.separations.extend(taken.separations);
            if taken.anchor < target.anchor {
                target.anchor = taken.anchor;
            }
            if taken.max_order > target.max_order {
                target.max_order = taken.max_order;
            }
        }
    }

    pub(crate) fn nodes(&self) -> Vec<Node> {
        self.sets
            .iter()
            .filter(|c| c.alive)
            .map(|c| Node {
                id: profile_id_of(&c.anchor.1),
                anchor: c.anchor.1.clone(),
                anchor_order: c.anchor.0.clone(),
                identifiers: c.ids.iter().map(|(_, i)| i.clone()).collect(),
                max_order: c.max_order.clone().unwrap_or(Order {
                    t: i64::MIN,
                    msg: String::new(),
                    rank: 0,
                    key: String::new(),
                }),
                separations: c.separations.iter().cloned().collect(),
                detached: c.detached,
            })
            .collect()
    }

    pub(crate) fn add_node(&mut self, ctx: &Context<'_>, n: &Node) {
        let idx = self.sets.len();
        self.sets.push(Cluster {
            alive: true,
            ids: n
                .identifiers
                .iter()
                .map(|i| (ctx.rules.priority(&i.kind), i.clone()))
                .collect(),
            anchor: (n.anchor_order.clone(), n.anchor.clone()),
            max_order: Some(n.max_order.clone()),
            separations: n.separations.iter().cloned().collect(),
            detached: n.detached,
        });
        for i in &n.identifiers {
            self.of.insert(i.clone(), idx);
        }
    }
}
