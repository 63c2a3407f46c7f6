//! What sharding costs, in memory.

use super::*;

/// Not a test: what sharding costs on a shop's stream, in memory (`cargo test --release
/// -p tessera-identity --lib shards_cost -- --ignored --nocapture`). 20,000 people with
/// one to three devices each; 15 % identify (device, user id, email), 45 % track with the
/// user id once the device logged in, the rest anonymous; 3 % of events arrive late.
/// Events arrive at their device's shard, as ingest keys them. Prints, for 1, 2 and 4
/// shards: the messages between shards per event, the shares of events forwarded to the
/// owner of their user id and of events that gathered, and the time per event of all
/// shards together (one thread).
#[test]
#[ignore]
fn shards_cost() {
    let rules = rules();
    let people = 20_000u64;
    let events = 200_000u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut logged_in: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut facts = Vec::new();
    for n in 0..events {
        let p = next() % people;
        let d = next() % (1 + p % 3);
        let anon = id("anonymous_id", &format!("a-{p}-{d}"));
        let user = id("user_id", &format!("u-{p}"));
        let roll = next() % 100;
        let ids = if roll < 15 {
            logged_in.insert((p, d));
            vec![anon, user, id("email", &format!("p{p}@mail.test"))]
        } else if roll < 60 && logged_in.contains(&(p, d)) {
            vec![anon, user]
        } else {
            vec![anon]
        };
        let late = next() % 100 < 3;
        let t = n as i64 - if late { (next() % 5_000) as i64 } else { 0 };
        facts.push(Fact::new(&rules, &ids, t, &format!("m{n}"), "src", None));
    }
    let distinct: BTreeSet<&str> = facts
        .iter()
        .filter(|f| f.ids.len() > 1)
        .map(|f| f.key.as_str())
        .collect();
    println!(
        "{events} events, {} of them with several identifiers, {} distinct such facts",
        facts.iter().filter(|f| f.ids.len() > 1).count(),
        distinct.len()
    );
    for shards in [1u32, 2, 4] {
        let mut sim = Sim::new(&rules, shards, &[], 1, true);
        let started = std::time::Instant::now();
        let mut gathered = 0usize;
        for f in facts.iter().cloned().map(Carried::Event) {
            let at = arrival(&f, shards, true);
            let before = sim.links - sim.forwarded;
            sim.events[at as usize].push_back(f);
            sim.run();
            gathered += usize::from(sim.links - sim.forwarded > before);
        }
        let per_event = started.elapsed().as_secs_f64() * 1e6 / events as f64;
        println!(
            "{shards} shards: {:.2} messages per event, {:.1} % of events forwarded, {:.1} % gathered, {per_event:.1} µs per event",
            sim.links as f64 / events as f64,
            100.0 * sim.forwarded as f64 / events as f64,
            100.0 * gathered as f64 / events as f64,
        );
    }
}
