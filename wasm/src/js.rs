//! Bindings to the few globals the replica needs that every runtime has (browsers,
//! workers, Node 20): timers, the clock, randomness.

use js_sys::Function;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(cb: &Function, ms: f64) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: &JsValue);
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(buf: &mut [u8]);
}

/// Milliseconds since the Unix epoch.
pub fn now() -> f64 {
    js_sys::Date::now()
}

/// A random `u64` from `crypto.getRandomValues`.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    get_random_values(&mut b);
    u64::from_le_bytes(b)
}

/// A random number in `[0, 1)` (jitter only; not for ids).
pub fn random() -> f64 {
    js_sys::Math::random()
}

/// A one-shot timer slot: arming it again replaces the pending timer.
#[derive(Default)]
pub struct Timer(Option<JsValue>);

impl Timer {
    /// Runs `cb` after `ms`, cancelling whatever this slot had pending.
    pub fn arm(&mut self, cb: &Function, ms: f64) {
        self.cancel();
        self.0 = Some(set_timeout(cb, ms));
    }

    /// Whether a timer is pending.
    pub fn is_armed(&self) -> bool {
        self.0.is_some()
    }

    /// Marks the timer as fired (call first thing in its callback).
    pub fn fired(&mut self) {
        self.0 = None;
    }

    /// Cancels a pending timer.
    pub fn cancel(&mut self) {
        if let Some(id) = self.0.take() {
            clear_timeout(&id);
        }
    }
}
