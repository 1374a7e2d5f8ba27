//! JSON-compatible JS values <-> [`concord_core::Value`].
//!
//! Hand-written over `js_sys` rather than through `serde-wasm-bindgen`: the mapping is
//! not serde's default anyway (JSON numbers must split into `Int`/`Float`, objects must be
//! plain objects, depth is bounded), and a direct walk is a fraction of the code size.
//!
//! Numbers that are safe integers (`Number.isSafeInteger`) become [`Value::Int`], other
//! finite numbers [`Value::Float`]; `NaN` and infinities are refused, as JSON refuses them.
//! Object properties whose value is `undefined` are skipped, as `JSON.stringify` does.

use crate::error::{range_error, type_error};
use concord_core::value::{Map, MAX_VALUE_DEPTH};
use concord_core::Value;
use js_sys::{Array, Object, Reflect};
use wasm_bindgen::{JsCast, JsValue};

const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

/// Converts a JS value; `TypeError`/`RangeError` when it is not JSON-compatible.
pub fn from_js(v: &JsValue) -> Result<Value, JsValue> {
    convert(v, 0)
}

fn convert(v: &JsValue, depth: u32) -> Result<Value, JsValue> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = v.as_f64() {
        return number(n);
    }
    if let Some(s) = v.as_string() {
        return Ok(Value::Str(s));
    }
    if v.is_undefined() {
        return Err(type_error("undefined is not a JSON value; use null"));
    }
    if depth >= MAX_VALUE_DEPTH && v.is_object() {
        return Err(range_error("value is nested more than 32 levels deep (or is circular); flatten it"));
    }
    if Array::is_array(v) {
        let a: &Array = v.unchecked_ref();
        let mut out = Vec::with_capacity(a.length() as usize);
        for x in a.iter() {
            // JSON.stringify writes holes and undefined in arrays as null.
            out.push(if x.is_undefined() { Value::Null } else { convert(&x, depth + 1)? });
        }
        return Ok(Value::Array(out));
    }
    if is_plain_object(v) {
        let o: &Object = v.unchecked_ref();
        let mut out = Map::new();
        for k in Object::keys(o).iter() {
            let x = Reflect::get(o, &k)?;
            if !x.is_undefined() {
                out.insert(k.as_string().unwrap_or_default(), convert(&x, depth + 1)?);
            }
        }
        return Ok(Value::Object(out));
    }
    Err(type_error(
        "values must be JSON-compatible (null, boolean, number, string, array or plain object); \
         convert BigInt, Date, Map, Set, class instances and functions first",
    ))
}

fn number(n: f64) -> Result<Value, JsValue> {
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        Ok(Value::Int(n as i64))
    } else if n.is_finite() {
        Ok(Value::Float(n))
    } else {
        Err(range_error("NaN and Infinity are not JSON values; store null or a string instead"))
    }
}

fn is_plain_object(v: &JsValue) -> bool {
    if !v.is_object() || v.is_function() {
        return false;
    }
    let proto = Object::get_prototype_of(v);
    proto.is_null() || Object::get_prototype_of(&proto).is_null()
}

/// Converts a value to plain JS data (numbers, strings, arrays, plain objects).
pub fn to_js(v: &Value) -> JsValue {
    match v {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Int(i) => JsValue::from_f64(*i as f64),
        Value::Float(f) => JsValue::from_f64(*f),
        Value::Str(s) => JsValue::from_str(s),
        Value::Array(a) => a.iter().map(to_js).collect::<Array>().into(),
        Value::Object(o) => {
            let out = Object::new();
            for (k, x) in o {
                set(&out, k, &to_js(x));
            }
            out.into()
        }
    }
}

/// Sets an own data property, even one named `__proto__` (which `obj[k] = v` would
/// treat as the prototype setter).
pub fn set(obj: &Object, key: &str, v: &JsValue) {
    let k = JsValue::from_str(key);
    if key == "__proto__" {
        let desc = Object::new();
        for (name, val) in [
            ("value", v.clone()),
            ("writable", true.into()),
            ("enumerable", true.into()),
            ("configurable", true.into()),
        ] {
            let _ = Reflect::set(&desc, &name.into(), &val);
        }
        Object::define_property(obj, &k, &desc);
    } else {
        let _ = Reflect::set(obj, &k, v);
    }
}
