//! Comparison levels: how closely two normalised values of a field agree, in the manner
//! of Splink. Each kind of field has its own ordered levels, from the closest (level 0)
//! to "different" (the last); the model ([`super::model`]) gives each level a weight.
//! A value missing on either side is no level at all: it is neutral.

use crate::rules::Compare;
use rphonetic::DoubleMetaphone;

impl Compare {
    /// The labels of the levels, closest first.
    pub fn levels(self) -> &'static [&'static str] {
        match self {
            Compare::Name => &[
                "exact",
                "jaro_winkler>=0.92",
                "sounds alike or jaro_winkler>=0.85",
                "initial",
                "different",
            ],
            Compare::Date => &[
                "exact",
                "one character off",
                "day and month swapped",
                "two characters off",
                "different",
            ],
            Compare::Street => &[
                "exact",
                "same number, street similar",
                "one without number, street similar",
                "different",
            ],
            Compare::Postcode => &["exact", "one character off", "different"],
            Compare::Phone => &["exact", "one digit off", "different"],
            Compare::Email => &["exact", "same local part", "different"],
            Compare::Id => &["exact", "one edit", "different"],
            Compare::Text => &["exact", "jaro_winkler>=0.88", "different"],
        }
    }

    /// The level of two normalised values.
    pub fn level(self, a: &str, b: &str) -> usize {
        if a == b {
            return 0;
        }
        match self {
            Compare::Name => name_level(a, b),
            Compare::Date => date_level(a, b),
            Compare::Street => street_level(a, b),
            Compare::Postcode | Compare::Phone => {
                if strsim::levenshtein(a, b) <= 1 {
                    1
                } else {
                    2
                }
            }
            Compare::Email => match (a.split_once('@'), b.split_once('@')) {
                (Some((x, _)), Some((y, _))) if x == y => 1,
                _ => 2,
            },
            Compare::Id => {
                if strsim::osa_distance(a, b) <= 1 {
                    1
                } else {
                    2
                }
            }
            Compare::Text => {
                if strsim::jaro_winkler(a, b) >= 0.88 {
                    1
                } else {
                    2
                }
            }
        }
    }
}

fn name_level(a: &str, b: &str) -> usize {
    let (short, long) = if a.chars().count() <= b.chars().count() {
        (a, b)
    } else {
        (b, a)
    };
    if short.chars().count() == 1 {
        return if long.starts_with(short) { 3 } else { 4 };
    }
    let jw = strsim::jaro_winkler(a, b);
    if jw >= 0.92 {
        1
    } else if jw >= 0.85 || sounds_alike(a, b) {
        2
    } else {
        4
    }
}

/// Whether two names share a Double Metaphone code (primary or alternate).
pub fn sounds_alike(a: &str, b: &str) -> bool {
    let dm = DoubleMetaphone::default();
    let (x, y) = (dm.double_metaphone(a), dm.double_metaphone(b));
    let codes = |r: &rphonetic::DoubleMetaphoneResult| [r.primary(), r.alternate()];
    let (cx, cy) = (codes(&x), codes(&y));
    cx.iter()
        .any(|c| !c.is_empty() && cy.iter().any(|d| d == c))
}

/// A name's phonetic code (Double Metaphone, primary), for blocking.
pub fn phonetic(name: &str) -> String {
    DoubleMetaphone::default().double_metaphone(name).primary()
}

fn date_level(a: &str, b: &str) -> usize {
    let d = strsim::hamming(a, b).unwrap_or(usize::MAX);
    if d == 1 {
        return 1;
    }
    let parts = |s: &str| -> Option<(String, String, String)> {
        let mut it = s.splitn(3, '-');
        Some((
            it.next()?.to_string(),
            it.next()?.to_string(),
            it.next()?.to_string(),
        ))
    };
    if let (Some((ya, ma, da)), Some((yb, mb, db))) = (parts(a), parts(b))
        && ya == yb
        && ma == db
        && da == mb
    {
        return 2;
    }
    if d == 2 { 3 } else { 4 }
}

/// A street's house number (its first token that starts with a digit) and the rest.
pub fn split_street(s: &str) -> (Option<&str>, String) {
    let mut number = None;
    let mut rest = Vec::new();
    for w in s.split(' ') {
        if number.is_none() && w.starts_with(|c: char| c.is_ascii_digit()) {
            number = Some(w);
        } else if !w.starts_with(|c: char| c.is_ascii_digit()) {
            rest.push(w);
        }
    }
    (number, rest.join(" "))
}

fn street_level(a: &str, b: &str) -> usize {
    let ((na, sa), (nb, sb)) = (split_street(a), split_street(b));
    let similar = !sa.is_empty() && !sb.is_empty() && strsim::jaro_winkler(&sa, &sb) >= 0.88;
    match (na, nb) {
        (Some(x), Some(y)) if x != y => 3,
        (Some(_), Some(_)) if similar => 1,
        (None, _) | (_, None) if similar => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_typos_sounds_and_initials() {
        let l = |a, b| Compare::Name.level(a, b);
        assert_eq!(l("katherine", "katherine"), 0);
        assert_eq!(l("katherine", "katharine"), 1);
        assert_eq!(l("nichokas", "nicholas"), 1);
        assert_eq!(l("stephen", "steven"), 2, "sounds alike");
        assert_eq!(l("k", "katherine"), 3);
        assert_eq!(l("m", "katherine"), 4);
        assert_eq!(l("michael", "katherine"), 4);
    }

    #[test]
    fn dates_one_digit_off_and_swapped() {
        let l = |a, b| Compare::Date.level(a, b);
        assert_eq!(l("1981-04-12", "1981-04-12"), 0);
        assert_eq!(l("1981-04-12", "1981-04-13"), 1);
        assert_eq!(l("1981-04-12", "1981-12-04"), 2);
        assert_eq!(l("1981-04-12", "1918-04-12"), 3);
        assert_eq!(l("1981-04-12", "1975-09-30"), 4);
    }

    #[test]
    fn house_numbers_are_tokens_compared_exactly() {
        let l = |a, b| Compare::Street.level(a, b);
        assert_eq!(l("199 cedar ln", "199 cedar ln"), 0);
        assert_eq!(l("199 cedar ln", "199 ceder ln"), 1);
        assert_eq!(l("199 cedar ln", "259 cedar ln"), 3, "another house");
        assert_eq!(l("cedar ln", "199 cedar ln"), 2);
        assert_eq!(l("12 oak st 3", "12 oak st"), 1);
        assert_eq!(
            split_street("12 n main st 4"),
            (Some("12"), "n main st".into())
        );
    }

    #[test]
    fn emails_phones_ids() {
        assert_eq!(Compare::Email.level("ann@a.io", "ann@b.io"), 1);
        assert_eq!(Compare::Email.level("ann@a.io", "bob@a.io"), 2);
        assert_eq!(Compare::Phone.level("+14155552671", "+14155552672"), 1);
        assert_eq!(Compare::Id.level("6988048", "6980848"), 1, "swapped digits");
        assert_eq!(Compare::Id.level("6988048", "1234567"), 2);
        for c in [Compare::Name, Compare::Date, Compare::Street, Compare::Text] {
            assert_eq!(c.level("x", "x"), 0);
            assert!(c.level("abc", "zzzzzz") == c.levels().len() - 1);
        }
    }
}
