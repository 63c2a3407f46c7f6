//! YAML definitions read into JSON values with a bound on what anchors and aliases may
//! expand to. An alias repeats the node it names, and aliases of aliases multiply: ~100 KB
//! of YAML can stand for billions of values (the "billion laughs"). The parser expands
//! aliases as the values are read, so counting them while building stops such a document
//! before it takes the memory.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// What a node costs against the budget, beside its string's bytes.
const NODE_COST: usize = 16;
/// A document may expand to this many times its own size (plus [`MIN_BUDGET`]); one
/// without aliases stays well under it.
const EXPANSION: usize = 10;
const MIN_BUDGET: usize = 1 << 20;

/// Parses a YAML document into a JSON value, refusing one whose anchors and aliases
/// would expand it beyond about ten times its own size.
pub fn parse(text: &str) -> Result<Value, String> {
    let budget = Cell::new(text.len().saturating_mul(EXPANSION) + MIN_BUDGET);
    let de = serde_yaml_ng::Deserializer::from_str(text);
    Bounded { budget: &budget }
        .deserialize(de)
        .map_err(|e| format!("invalid YAML: {e}"))
}

/// Builds a [`Value`], taking each node's cost from `budget`.
#[derive(Clone, Copy)]
struct Bounded<'b> {
    budget: &'b Cell<usize>,
}

impl Bounded<'_> {
    fn take<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let cost = NODE_COST + bytes;
        match self.budget.get().checked_sub(cost) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(
                "the document expands (through anchors and aliases) to more than ten times its size",
            )),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take(0)?;
        Ok(Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.take(0)?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.take(0)?;
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.take(0)?;
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.take(0)?;
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that JSON cannot hold (NaN or infinite)"))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.take(v.len())?;
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.take(v.len())?;
        Ok(Value::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take(0)?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take(0)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.take(key.len())?;
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_document_reads_as_serde_would() {
        let text = "kind: segment\nid: vip\ncondition: \"traits.ltv > 100\"\nscore: 1.5\nflags: [a, b]\nanchor: &x {n: 1}\nagain: *x\nnothing: ~\n";
        let want: Value = serde_yaml_ng::from_str(text).unwrap();
        assert_eq!(parse(text).unwrap(), want);
        assert!(parse("a: [").unwrap_err().starts_with("invalid YAML"));
    }

    /// The audit's finding: ~100 KB of YAML expanded to ~1.6e9 values and took all of
    /// profiles' memory. Nine levels of ten aliases each stand for 10^9 strings.
    #[test]
    fn aliases_that_multiply_are_refused_before_they_take_the_memory() {
        let mut text = String::from(
            "a0: &a0 [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n",
        );
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.contains("anchors and aliases"), "{err}");

        // One large anchor repeated many times (serde_yaml_ng's own repetition limit
        // counts alias jumps, not the values they bring).
        let big = format!("[{}]", vec!["\"xxxxxxxxxxxxxxxx\""; 5000].join(", "));
        let text = format!("big: &b {big}\nmany: [{}]\n", vec!["*b"; 2000].join(", "));
        let err = parse(&text).unwrap_err();
        assert!(err.contains("anchors and aliases"), "{err}");
    }
}
