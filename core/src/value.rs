//! JSON-compatible values stored in registers and sets.

use crate::codec::{put_bytes, put_seq, put_varint, unzigzag, zigzag, Reader, Wire, R};
use crate::sorted::SortedMap;
use serde::{Deserialize, Deserializer, Serialize};
use std::cell::Cell;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

/// Deepest nesting of arrays/objects accepted when decoding: untrusted bytes must not be
/// able to overflow the stack.
pub const MAX_VALUE_DEPTH: u32 = 32;

/// A JSON object: keys sorted, unique.
pub type Map = SortedMap<String, Value>;

/// A JSON-compatible value. Totally ordered (floats by `total_cmp`) so it can live in sets
/// and be hashed into Merkle trees.
///
/// ```
/// use concord_core::Value;
/// let v = Value::from("rust");
/// assert_eq!(v.as_str(), Some("rust"));
/// assert!(Value::Int(1) < Value::from("a")); // ordered by kind, then content
/// ```
#[derive(Clone, Debug, Default, Serialize)]
pub enum Value {
    /// JSON `null`.
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Value>),
    /// An object with keys in sorted order.
    Object(Map),
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Str(_) => 4,
            Value::Array(_) => 5,
            Value::Object(_) => 6,
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Nesting depth (scalars are 0).
    pub fn depth(&self) -> u32 {
        match self {
            Value::Array(a) => 1 + a.iter().map(Value::depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            (Value::Array(a), Value::Array(b)) => a.cmp(b),
            (Value::Object(a), Value::Object(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u8(self.rank());
        match self {
            Value::Null => {}
            Value::Bool(b) => b.hash(state),
            Value::Int(i) => i.hash(state),
            Value::Float(f) => f.to_bits().hash(state),
            Value::Str(s) => s.hash(state),
            Value::Array(a) => a.hash(state),
            Value::Object(o) => o.hash(state),
        }
    }
}

/// The derived decoder; children go back through [`Value::deserialize`], which counts depth.
#[derive(Deserialize)]
#[serde(rename = "Value")]
enum ValueRepr {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
    Object(Map),
}

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let depth = DEPTH.with(|c| {
            let v = c.get() + 1;
            c.set(v);
            v
        });
        let out = if depth > MAX_VALUE_DEPTH + 1 {
            Err(serde::de::Error::custom("value nested too deeply"))
        } else {
            ValueRepr::deserialize(d)
        };
        DEPTH.with(|c| c.set(c.get() - 1));
        Ok(match out? {
            ValueRepr::Null => Value::Null,
            ValueRepr::Bool(b) => Value::Bool(b),
            ValueRepr::Int(i) => Value::Int(i),
            ValueRepr::Float(f) => Value::Float(f),
            ValueRepr::Str(s) => Value::Str(s),
            ValueRepr::Array(a) => Value::Array(a),
            ValueRepr::Object(o) => Value::Object(o),
        })
    }
}

impl Wire for Value {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.rank());
        match self {
            Value::Null => {}
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Int(i) => put_varint(out, zigzag(*i)),
            Value::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
            Value::Str(s) => put_bytes(out, s.as_bytes()),
            Value::Array(a) => put_seq(out, a, Value::put),
            Value::Object(o) => {
                put_varint(out, o.len() as u64);
                for (k, v) in o {
                    put_bytes(out, k.as_bytes());
                    v.put(out);
                }
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> R<Self> {
        value_at(r, 0)
    }
}

/// Reads a value nested `depth` containers deep.
fn value_at(r: &mut Reader<'_>, depth: u32) -> R<Value> {
    if depth > MAX_VALUE_DEPTH {
        return Err("value nested too deeply");
    }
    Ok(match r.varint()? {
        0 => Value::Null,
        1 => Value::Bool(r.flag()?),
        2 => Value::Int(unzigzag(r.varint()?)),
        3 => {
            let b = r.take(8)?;
            Value::Float(f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        }
        4 => Value::Str(r.string()?),
        5 => Value::Array(r.seq(|r| value_at(r, depth + 1))?),
        6 => {
            let n = r.count()?;
            let mut o = Map::new();
            for _ in 0..n {
                let k = r.string()?;
                o.insert(k, value_at(r, depth + 1)?);
            }
            Value::Object(o)
        }
        _ => return Err("unknown value kind"),
    })
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deeply_nested_bytes_are_rejected_not_overflowing_the_stack() {
        // Tag 5 (Array) with length 1, repeated: a 100,000-deep array.
        let bytes: Vec<u8> = std::iter::repeat_n([5u8, 1u8], 100_000).flatten().collect();
        assert!(postcard::from_bytes::<Value>(&bytes).is_err());
        let ok = Value::Array(vec![Value::Array(vec![Value::Int(1)])]);
        let enc = postcard::to_allocvec(&ok).unwrap();
        assert_eq!(postcard::from_bytes::<Value>(&enc).unwrap(), ok);
    }

    #[test]
    fn floats_have_a_total_order() {
        assert!(Value::Float(f64::NAN) == Value::Float(f64::NAN));
        assert!(Value::Float(-0.0) < Value::Float(0.0));
    }
}
