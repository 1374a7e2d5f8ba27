//! The `#[wasm_bindgen]` surface: two classes, `Replica` and `DocHandle`, each method a
//! one-line call into [`crate::client`] or [`concord_core::Document`] plus argument
//! conversion. The hand-written `js/client.js` builds the public `Client`/`Doc` API on
//! top; its TypeScript types are authored in `js/index.d.ts`.

use crate::client::{Client, Options};
use crate::error::range_error;
use crate::value::{from_js, to_js};
use concord_core::{Document, Kind};
use js_sys::{Array, Function, Promise};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// A replica: the documents of one `Client.connect()` and their transports.
#[wasm_bindgen]
pub struct Replica(Client);

#[wasm_bindgen]
impl Replica {
    /// Starts a replica; resolves once IndexedDB is open (it connects in the background).
    pub fn start(options: JsValue) -> Promise {
        future_to_promise(async move {
            let opts = Options::from_js(&options)?;
            Ok(Replica(Client::start(opts).await?).into())
        })
    }

    /// Opens (loads) a document; resolves to a `DocHandle`.
    pub fn open(&self, id: String) -> Promise {
        let c = self.0.clone();
        future_to_promise(async move {
            c.open(&id).await?;
            Ok(DocHandle { client: c, id }.into())
        })
    }

    /// "connecting" | "online" | "offline".
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        self.0.status().as_str().to_owned()
    }

    /// This session's replica id, 16 hex digits.
    #[wasm_bindgen(getter, js_name = replicaId)]
    pub fn replica_id(&self) -> String {
        self.0.replica_id()
    }

    /// `f(kind, detail)`: `("status", "online")`, `("error", Error)`.
    #[wasm_bindgen(js_name = setListener)]
    pub fn set_listener(&self, f: Option<Function>) {
        self.0.set_listener(f);
    }

    /// Closes sockets, channel and database; pending writes are still saved.
    pub fn close(&self) {
        self.0.close();
    }
}

/// One open document.
#[wasm_bindgen(js_name = DocHandle)]
pub struct DocHandle {
    client: Client,
    id: String,
}

/// A counter increment from JS: a whole number of magnitude at most 2^53 - 1.
fn count(n: f64) -> Result<i64, JsValue> {
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_991.0 {
        Ok(n as i64)
    } else {
        Err(range_error("counter amounts must be whole numbers (safe integers)"))
    }
}

#[wasm_bindgen(js_class = DocHandle)]
impl DocHandle {
    /// The document id.
    #[wasm_bindgen(getter)]
    pub fn id(&self) -> String {
        self.id.clone()
    }

    /// Adds `n >= 0` to the G-Counter at `key`.
    pub fn increment(&self, key: &str, n: f64) -> Result<(), JsValue> {
        let n = count(n)?;
        if n < 0 {
            return Err(range_error("a counter only grows: increment by n >= 0, or use a pnCounter"));
        }
        self.client.write(&self.id, &mut |d| d.increment(key, n as u64).map(Some))
    }

    /// Adds `n` (may be negative) to the PN-Counter at `key`.
    #[wasm_bindgen(js_name = pnAdd)]
    pub fn pn_add(&self, key: &str, n: f64) -> Result<(), JsValue> {
        let n = count(n)?;
        self.client.write(&self.id, &mut |d| d.pn_add(key, n).map(Some))
    }

    /// Writes the register at `key`.
    #[wasm_bindgen(js_name = setRegister)]
    pub fn set_register(&self, key: &str, value: &JsValue) -> Result<(), JsValue> {
        let mut v = from_js(value)?;
        let now = crate::js::now() as u64;
        self.client.write(&self.id, &mut |d| d.set_register(key, std::mem::take(&mut v), now).map(Some))
    }

    /// Adds `value` to the set at `key`.
    #[wasm_bindgen(js_name = setAdd)]
    pub fn set_add(&self, key: &str, value: &JsValue) -> Result<(), JsValue> {
        let mut v = from_js(value)?;
        self.client.write(&self.id, &mut |d| d.set_add(key, std::mem::take(&mut v)).map(Some))
    }

    /// Removes `value` from the set at `key` (a no-op when absent).
    #[wasm_bindgen(js_name = setRemove)]
    pub fn set_remove(&self, key: &str, value: &JsValue) -> Result<(), JsValue> {
        let v = from_js(value)?;
        self.client.write(&self.id, &mut |d| d.set_remove(key, &v))
    }

    /// The G-Counter's value (0 when unset).
    pub fn counter(&self, key: &str) -> Result<f64, JsValue> {
        self.client.read(&self.id, |d| d.counter(key) as f64)
    }

    /// The PN-Counter's value (0 when unset).
    #[wasm_bindgen(js_name = pnCounter)]
    pub fn pn_counter(&self, key: &str) -> Result<f64, JsValue> {
        self.client.read(&self.id, |d| d.pn_counter(key) as f64)
    }

    /// The register's value, `undefined` when never written.
    pub fn register(&self, key: &str) -> Result<JsValue, JsValue> {
        self.client.read(&self.id, |d| d.register(key).map_or(JsValue::UNDEFINED, |(v, _)| to_js(v)))
    }

    /// Whether the set at `key` holds `value`.
    #[wasm_bindgen(js_name = setHas)]
    pub fn set_has(&self, key: &str, value: &JsValue) -> Result<bool, JsValue> {
        let v = from_js(value)?;
        self.client.read(&self.id, |d| d.set_contains(key, &v))
    }

    /// The set's elements, sorted.
    #[wasm_bindgen(js_name = setValues)]
    pub fn set_values(&self, key: &str) -> Result<Array, JsValue> {
        self.client.read(&self.id, |d| d.set_values(key).iter().map(to_js).collect())
    }

    /// The type `key` holds: "counter" | "pn-counter" | "register" | "set" | undefined.
    #[wasm_bindgen(js_name = kindOf)]
    pub fn kind_of(&self, key: &str) -> Result<Option<String>, JsValue> {
        self.client.read(&self.id, |d| d.kind_of(key).map(|k: Kind| k.name().to_owned()))
    }

    /// Keys, sorted.
    pub fn keys(&self) -> Result<Array, JsValue> {
        self.client.read(&self.id, |d: &Document| {
            let mut keys: Vec<&str> = d.keys().collect();
            concord_core::sort::sort(&mut keys);
            keys.into_iter().map(JsValue::from_str).collect()
        })
    }

    /// The whole document as plain data: `{ likes: 1, tags: ["rust"], ... }`.
    #[wasm_bindgen(js_name = toJSON)]
    pub fn to_json(&self) -> Result<JsValue, JsValue> {
        self.client.read(&self.id, |d| to_js(&d.to_value()))
    }

    /// `f(local: boolean, keys: string[])` after every change.
    #[wasm_bindgen(js_name = setListener)]
    pub fn set_listener(&self, f: Option<Function>) -> Result<(), JsValue> {
        self.client.set_doc_listener(&self.id, f)
    }

    /// Resolves once the relay holds everything this replica has now and this replica
    /// has caught up with the relay.
    pub fn synced(&self) -> Result<Promise, JsValue> {
        self.client.synced(&self.id)
    }
}

/// The same calls for Rust callers (tests), without promises.
impl Replica {
    /// [`Replica::start`] with parsed options.
    pub async fn connect(opts: Options) -> Result<Replica, JsValue> {
        Ok(Replica(Client::start(opts).await?))
    }

    /// [`Replica::open`].
    pub async fn open_doc(&self, id: &str) -> Result<DocHandle, JsValue> {
        self.0.open(id).await?;
        Ok(DocHandle { client: self.0.clone(), id: id.to_owned() })
    }
}
