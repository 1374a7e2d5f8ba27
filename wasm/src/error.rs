//! Errors as JavaScript sees them: `TypeError` for a wrong type, `RangeError` for a value
//! out of range, `Error` for everything else. Messages say what went wrong and what to do.

use concord_core::DocError;
use wasm_bindgen::JsValue;

/// A JS `TypeError`.
pub fn type_error(msg: &str) -> JsValue {
    js_sys::TypeError::new(msg).into()
}

/// A JS `RangeError`.
pub fn range_error(msg: &str) -> JsValue {
    js_sys::RangeError::new(msg).into()
}

/// A JS `Error`.
pub fn error(msg: &str) -> JsValue {
    js_sys::Error::new(msg).into()
}

/// Maps a document error to its JS class.
pub fn doc_error(e: &DocError) -> JsValue {
    let msg = e.to_string();
    match e {
        DocError::TypeMismatch { .. } => type_error(&msg),
        DocError::Range(_) => range_error(&msg),
        _ => error(&msg),
    }
}

/// The error thrown by every call on a closed client.
pub fn closed() -> JsValue {
    error("this client is closed; call Client.connect() again")
}
