//! A synthetic customer base with ground truth, for identity quality and speed figures.
//!
//! People live in households (a shared surname and address, different first names and
//! birth dates; now and then twins). Each has one to three devices browsing anonymously;
//! registered people log in (user id + device) and give an email; some households share
//! a device that several members log in on. A CRM import holds a record for many people
//! (crm id, names, birth date, address, sometimes the email); a shop loyalty feed holds
//! records with typos in names, a differently written address, now and then a wrong
//! birth-date digit, and no email. Names come from small pools, so different people
//! share first names, surnames and birthdays by chance.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

pub const FIRST: &[&str] = &[
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "william",
    "elizabeth",
    "david",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "christopher",
    "nancy",
    "daniel",
    "lisa",
    "matthew",
    "betty",
    "anthony",
    "margaret",
    "mark",
    "sandra",
    "donald",
    "ashley",
    "steven",
    "kimberly",
    "paul",
    "emily",
    "andrew",
    "donna",
    "joshua",
    "michelle",
    "kenneth",
    "dorothy",
    "kevin",
    "carol",
    "brian",
    "amanda",
    "george",
    "melissa",
    "edward",
    "deborah",
    "ronald",
    "stephanie",
    "timothy",
    "rebecca",
    "jason",
    "sharon",
    "jeffrey",
    "laura",
    "ryan",
    "cynthia",
    "jacob",
    "kathleen",
    "gary",
    "amy",
    "nicholas",
    "shirley",
    "eric",
    "angela",
    "jonathan",
    "helen",
    "stephen",
    "anna",
    "larry",
    "brenda",
    "justin",
    "pamela",
    "scott",
    "nicole",
    "brandon",
    "emma",
];
pub const LAST: &[&str] = &[
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "torres",
    "nguyen",
    "hill",
    "flores",
    "green",
    "adams",
    "nelson",
    "baker",
    "hall",
    "rivera",
    "campbell",
    "mitchell",
    "carter",
    "roberts",
    "gomez",
    "phillips",
    "evans",
    "turner",
    "diaz",
    "parker",
    "cruz",
    "edwards",
    "collins",
    "reyes",
    "stewart",
    "morris",
];
const STREETS: &[&str] = &[
    "oak",
    "maple",
    "cedar",
    "pine",
    "elm",
    "washington",
    "lake",
    "hill",
    "park",
    "main",
    "view",
    "sunset",
    "river",
    "church",
    "mill",
    "spring",
    "ridge",
    "meadow",
    "forest",
    "highland",
];
const CITIES: &[&str] = &[
    "springfield",
    "riverside",
    "fairview",
    "franklin",
    "greenville",
    "madison",
    "clinton",
    "salem",
];

/// One event as the tracking API would receive it, with when it happened.
#[derive(Debug, Clone)]
pub struct SynthEvent {
    pub message_id: String,
    pub kind: &'static str,
    pub event_time: i64,
    pub message: Value,
}

/// The generated events and, for every identifier `(type, value)`, the true person.
pub struct World {
    pub events: Vec<SynthEvent>,
    pub truth: Vec<((String, String), usize)>,
    pub people: usize,
}

struct Person {
    first: String,
    last: String,
    birthday: String,
    street: String,
    city: String,
    postcode: String,
    phone: Option<String>,
    user: Option<String>,
    email: Option<String>,
    devices: Vec<String>,
}

fn typo(rng: &mut StdRng, s: &str) -> String {
    let mut c: Vec<char> = s.chars().collect();
    if c.len() < 4 {
        return s.to_string();
    }
    let i = rng.random_range(1..c.len() - 1);
    match rng.random_range(0..3) {
        0 => {
            c.swap(i, i + 1);
        }
        1 => {
            c[i] = (b'a' + rng.random_range(0..26u8)) as char;
        }
        _ => {
            c.remove(i);
        }
    }
    c.into_iter().collect()
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

pub fn generate(people: usize, seed: u64) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut persons: Vec<Person> = Vec::with_capacity(people);
    while persons.len() < people {
        let size = *[1, 1, 2, 2, 2, 3, 4].choose(&mut rng).unwrap();
        let last = LAST.choose(&mut rng).unwrap().to_string();
        let number = rng.random_range(1..3000);
        let street = format!("{number} {} Street", cap(STREETS.choose(&mut rng).unwrap()));
        let city = CITIES.choose(&mut rng).unwrap().to_string();
        let postcode = format!("{:05}", rng.random_range(1000..99999));
        let twin_birthday = format!(
            "{}-{:02}-{:02}",
            rng.random_range(1950..2008),
            rng.random_range(1..13),
            rng.random_range(1..29)
        );
        let shared_device =
            (size > 1 && rng.random_bool(0.1)).then(|| format!("dev-shared-{}", persons.len()));
        let mut used_first: Vec<String> = Vec::new();
        for m in 0..size {
            let n = persons.len();
            let mut first = FIRST.choose(&mut rng).unwrap().to_string();
            while used_first.contains(&first) {
                first = FIRST.choose(&mut rng).unwrap().to_string();
            }
            used_first.push(first.clone());
            // The first member has the household's "twin" birthday; now and then the
            // second shares it.
            let birthday = if m == 0 || (m == 1 && rng.random_bool(0.1)) {
                twin_birthday.clone()
            } else {
                format!(
                    "{}-{:02}-{:02}",
                    rng.random_range(1950..2008),
                    rng.random_range(1..13),
                    rng.random_range(1..29)
                )
            };
            let registered = rng.random_bool(0.7);
            // Unregistered people browse on one device: nothing could link two.
            let device_count = if registered {
                rng.random_range(1..4)
            } else {
                1
            };
            let mut devices: Vec<String> =
                (0..device_count).map(|d| format!("dev-{n}-{d}")).collect();
            if let Some(s) = &shared_device
                && registered
            {
                devices.push(s.clone());
            }
            persons.push(Person {
                first,
                last: last.clone(),
                birthday,
                street: street.clone(),
                city: city.clone(),
                postcode: postcode.clone(),
                phone: rng
                    .random_bool(0.4)
                    .then(|| format!("+1415{:07}", rng.random_range(2_000_000..9_999_999))),
                user: registered.then(|| format!("user-{n}")),
                email: (registered || rng.random_bool(0.3))
                    .then(|| format!("p{n}.{}@mail.test", persons.len() % 97)),
                devices,
            });
            if persons.len() == people {
                break;
            }
        }
    }

    let mut events = Vec::new();
    let mut truth = Vec::new();
    let mut t: i64 = 1_700_000_000_000;
    let mut next = |rng: &mut StdRng| {
        t += rng.random_range(1..2000);
        t
    };
    let push = |events: &mut Vec<SynthEvent>, kind: &'static str, time: i64, message: Value| {
        let id = format!("msg-{}", events.len());
        events.push(SynthEvent {
            message_id: id,
            kind,
            event_time: time,
            message,
        });
    };
    for (n, p) in persons.iter().enumerate() {
        // A shared device belongs to no one person: it is left out of the truth.
        for d in p.devices.iter().filter(|d| !d.starts_with("dev-shared")) {
            truth.push((("anonymous_id".to_string(), d.clone()), n));
        }
        if let Some(u) = &p.user {
            truth.push((("user_id".into(), u.clone()), n));
        }
        if let Some(e) = &p.email {
            truth.push((("email".into(), e.clone()), n));
        }
        // Anonymous browsing on every device, then a login on each (registered people),
        // or an email capture (some unregistered people).
        for d in &p.devices {
            for _ in 0..rng.random_range(1..4) {
                let at = next(&mut rng);
                push(
                    &mut events,
                    "track",
                    at,
                    json!({"type": "track", "anonymousId": d, "event": "Page Viewed"}),
                );
            }
            let at = next(&mut rng);
            match (&p.user, &p.email) {
                (Some(u), _) => push(
                    &mut events,
                    "identify",
                    at,
                    json!({"type": "identify", "userId": u, "anonymousId": d, "traits": {"email": p.email}}),
                ),
                (None, Some(e)) if !d.starts_with("dev-shared") => push(
                    &mut events,
                    "track",
                    at,
                    json!({"type": "track", "anonymousId": d, "event": "Newsletter Signed Up", "context": {"traits": {"email": e}}}),
                ),
                _ => {}
            }
        }
        // The CRM knows customers by email (written its own way).
        let crm_email = p.email.clone().filter(|_| rng.random_bool(0.6));
        if let Some(email) = &crm_email {
            let crm = format!("crm-{n}");
            truth.push((("crm_id".into(), crm.clone()), n));
            let mut traits = json!({
                "crm_id": crm, "firstName": cap(&p.first), "lastName": cap(&p.last), "birthday": p.birthday,
                "address": {"street": p.street, "city": cap(&p.city), "postalCode": p.postcode},
            });
            if let Some(ph) = &p.phone {
                traits["phone"] = json!(ph);
            }
            traits["email"] = json!(format!(" {} ", email.to_uppercase()));
            let at = next(&mut rng);
            push(
                &mut events,
                "identify",
                at,
                json!({"type": "identify", "anonymousId": format!("crm-import-{n}"), "traits": traits}),
            );
            truth.push((("anonymous_id".into(), format!("crm-import-{n}")), n));
        }
        // The shop feed has no email for CRM customers (the fuzzy match must link
        // them); others signed up with their email.
        let shop_email = if crm_email.is_some() {
            None
        } else {
            p.email.clone()
        };
        if (crm_email.is_some() || shop_email.is_some()) && rng.random_bool(0.6) {
            let loyalty = format!("loy-{n}");
            truth.push((("loyalty_id".into(), loyalty.clone()), n));
            let first = if rng.random_bool(0.25) {
                typo(&mut rng, &p.first)
            } else {
                p.first.clone()
            };
            let last = if rng.random_bool(0.15) {
                typo(&mut rng, &p.last)
            } else {
                p.last.clone()
            };
            let birthday = if rng.random_bool(0.05) {
                let mut b: Vec<char> = p.birthday.chars().collect();
                b[9] = char::from(b'0' + ((b[9] as u8 - b'0' + 1) % 10));
                b.into_iter().collect()
            } else {
                p.birthday.clone()
            };
            let street = p
                .street
                .replace("Street", if rng.random_bool(0.5) { "St." } else { "St" });
            let mut traits = json!({
                "loyalty_id": loyalty, "first_name": first.to_uppercase(), "last_name": last, "dob": birthday,
                "address": {"street": street, "city": p.city, "postalCode": p.postcode},
            });
            if let Some(e) = &shop_email {
                traits["email"] = json!(e);
            }
            if let Some(ph) = &p.phone
                && rng.random_bool(0.5)
            {
                traits["phone"] = json!(ph.replacen("+1", "", 1));
            }
            let at = next(&mut rng);
            push(
                &mut events,
                "identify",
                at,
                json!({"type": "identify", "anonymousId": format!("shop-{n}"), "traits": traits}),
            );
            truth.push((("anonymous_id".into(), format!("shop-{n}")), n));
        }
    }
    // Later browsing by known people, on their devices.
    for (n, p) in persons.iter().enumerate() {
        if let (Some(u), Some(d)) = (&p.user, p.devices.first())
            && n % 2 == 0
        {
            let at = next(&mut rng);
            push(
                &mut events,
                "track",
                at,
                json!({"type": "track", "userId": u, "anonymousId": d, "event": "Order Completed"}),
            );
        }
    }
    truth.sort();
    truth.dedup();
    World {
        events,
        truth,
        people: persons.len(),
    }
}

/// Pairwise precision and recall of a clustering against the truth, over identifiers.
pub struct Quality {
    pub identifiers: usize,
    pub profiles: usize,
    pub people: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

pub fn quality(assigned: &[(usize, String)]) -> Quality {
    use std::collections::HashMap;
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    let mut cell: HashMap<(&str, usize), u64> = HashMap::new();
    let mut by_profile: HashMap<&str, u64> = HashMap::new();
    let mut by_person: HashMap<usize, u64> = HashMap::new();
    for (person, profile) in assigned {
        *cell.entry((profile, *person)).or_default() += 1;
        *by_profile.entry(profile).or_default() += 1;
        *by_person.entry(*person).or_default() += 1;
    }
    let tp: u64 = cell.values().map(|n| pairs(*n)).sum();
    let predicted: u64 = by_profile.values().map(|n| pairs(*n)).sum();
    let actual: u64 = by_person.values().map(|n| pairs(*n)).sum();
    let precision = if predicted == 0 {
        1.0
    } else {
        tp as f64 / predicted as f64
    };
    let recall = if actual == 0 {
        1.0
    } else {
        tp as f64 / actual as f64
    };
    Quality {
        identifiers: assigned.len(),
        profiles: by_profile.len(),
        people: by_person.len(),
        precision,
        recall,
        f1: 2.0 * precision * recall / (precision + recall),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_quality_counts_pairs() {
        let a = generate(200, 7);
        let b = generate(200, 7);
        assert_eq!(a.events.len(), b.events.len());
        assert_eq!(a.truth, b.truth);
        assert!(a.events.len() > 400);
        // Two people, three identifiers each; one wrong identifier in the second.
        let assigned = vec![
            (0, "p".to_string()),
            (0, "p".to_string()),
            (0, "p".to_string()),
            (1, "q".to_string()),
            (1, "q".to_string()),
            (1, "p".to_string()),
        ];
        let q = quality(&assigned);
        assert_eq!(q.profiles, 2);
        // Predicted pairs: C(4,2)+C(2,2)=7, true pairs 3+3=6, both 3+1=4.
        assert!((q.precision - 4.0 / 7.0).abs() < 1e-9);
        assert!((q.recall - 4.0 / 6.0).abs() < 1e-9);
    }
}
