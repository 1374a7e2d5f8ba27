//! IndexedDB persistence.
//!
//! Schema (database `concord` by default, version 1, two object stores):
//!
//! - `snapshots`: key `[docId, replicaHex]` -> `Uint8Array` of `Document::encode()`; one
//!   per document per client session that wrote it, so tabs never overwrite each other.
//! - `outbox`: key `[docId, replicaHex, seq]` -> `Uint8Array` of `Delta::encode()`; every
//!   local write, persisted at once (one small put), until a snapshot covers it.
//!
//! A snapshot, the deletion of the outbox entries it covers and of the older snapshots
//! merged into it are written in one transaction, so at every instant each write is
//! durable in an outbox entry or a snapshot. The replica id is part of every key: it is
//! written in the same transaction as the data it minted.

use concord_core::{Dot, ReplicaId};
use js_sys::{Array, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    IdbDatabase, IdbFactory, IdbKeyRange, IdbObjectStore, IdbOpenDbRequest, IdbRequest, IdbTransactionMode,
};

const SNAPSHOTS: &str = "snapshots";
const OUTBOX: &str = "outbox";

/// An open database.
pub struct Store {
    db: IdbDatabase,
}

/// What one transaction writes.
#[derive(Default)]
pub struct Batch {
    /// `(key, bytes)` puts into `snapshots`.
    pub snapshots: Vec<(JsValue, Vec<u8>)>,
    /// `(key, bytes)` puts into `outbox`.
    pub outbox: Vec<(JsValue, Vec<u8>)>,
    /// Keys deleted from `snapshots`.
    pub drop_snapshots: Vec<JsValue>,
    /// Keys deleted from `outbox`.
    pub drop_outbox: Vec<JsValue>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
            && self.outbox.is_empty()
            && self.drop_snapshots.is_empty()
            && self.drop_outbox.is_empty()
    }
}

/// What is stored of one document.
pub struct Loaded {
    /// Snapshots with their keys, in key order.
    pub snapshots: Vec<(JsValue, Vec<u8>)>,
    /// Outbox entries with their keys, in key order.
    pub outbox: Vec<(JsValue, Vec<u8>)>,
}

/// 16 lowercase hex digits, as `ReplicaId`'s `Display` (without the formatting machinery:
/// this runs on every persisted write).
pub fn hex_id(r: ReplicaId) -> String {
    (0..16).rev().map(|i| char::from_digit(((r.0 >> (i * 4)) & 0xf) as u32, 16).unwrap_or('0')).collect()
}

fn hex(r: ReplicaId) -> JsValue {
    JsValue::from_str(&hex_id(r))
}

/// Key of a snapshot written by `replica`.
pub fn snapshot_key(doc: &str, replica: ReplicaId) -> JsValue {
    Array::of2(&doc.into(), &hex(replica)).into()
}

/// Key of an outbox entry.
pub fn outbox_key(doc: &str, dot: Dot) -> JsValue {
    Array::of3(&doc.into(), &hex(dot.replica), &(dot.seq as f64).into()).into()
}

/// Watches a request from now on (attach before yielding to the event loop: an event
/// fired before the handler is set is lost).
struct Watched(IdbRequest, JsFuture);

fn watch(req: IdbRequest) -> Watched {
    let p = Promise::new(&mut |ok, err| {
        req.set_onsuccess(Some(&ok));
        req.set_onerror(Some(&err));
    });
    Watched(req, JsFuture::from(p))
}

impl Watched {
    /// The request's result once it succeeded.
    async fn result(self) -> Result<JsValue, JsValue> {
        self.1.await.map_err(idb_error)?;
        self.0.result()
    }
}

fn idb_error(e: JsValue) -> JsValue {
    // An error event: report the request's DOMException when there is one.
    let inner = js_sys::Reflect::get(&e, &"target".into())
        .and_then(|t| js_sys::Reflect::get(&t, &"error".into()))
        .ok()
        .filter(|x| !x.is_null() && !x.is_undefined());
    inner.unwrap_or(e)
}

impl Store {
    /// Opens (creating if needed) the database `name`; `None` where the runtime has no
    /// IndexedDB (Node).
    pub async fn open(name: &str) -> Result<Option<Store>, JsValue> {
        let factory = js_sys::Reflect::get(&js_sys::global(), &"indexedDB".into())?;
        if factory.is_undefined() || factory.is_null() {
            return Ok(None);
        }
        let factory: IdbFactory = factory.unchecked_into();
        let req: IdbOpenDbRequest = factory.open_with_u32(name, 1)?;
        let upgrade = Closure::once_into_js(move |ev: web_sys::Event| {
            let Some(req) = ev.target().map(|t| t.unchecked_into::<IdbRequest>()) else { return };
            let Ok(db) = req.result().map(|d| d.unchecked_into::<IdbDatabase>()) else { return };
            for store in [SNAPSHOTS, OUTBOX] {
                if !db.object_store_names().contains(store) {
                    let _ = db.create_object_store(store);
                }
            }
        });
        req.set_onupgradeneeded(Some(upgrade.unchecked_ref()));
        let db = watch(req.clone().into()).result().await?;
        req.set_onupgradeneeded(None);
        Ok(Some(Store { db: db.unchecked_into() }))
    }

    /// Reads every snapshot and outbox entry of `doc`.
    pub async fn load(&self, doc: &str) -> Result<Loaded, JsValue> {
        let tx = self.db.transaction_with_str_sequence_and_mode(
            &Array::of2(&SNAPSHOTS.into(), &OUTBOX.into()),
            IdbTransactionMode::Readonly,
        )?;
        // Keys [doc, ...] sort between [doc] and [doc, []] (arrays sort after strings).
        let range = IdbKeyRange::bound(&Array::of1(&doc.into()), &Array::of2(&doc.into(), &Array::new()))?;
        // Issue every request before awaiting any: the transaction commits once it has
        // no pending request, and an await may return after that.
        let mut reqs = Vec::new();
        for name in [SNAPSHOTS, OUTBOX] {
            let store: IdbObjectStore = tx.object_store(name)?;
            reqs.push((watch(store.get_all_keys_with_key(&range)?), watch(store.get_all_with_key(&range)?)));
        }
        let mut out = Vec::new();
        for (keys, values) in reqs {
            let keys: Array = keys.result().await?.unchecked_into();
            let values: Array = values.result().await?.unchecked_into();
            out.push(
                keys.iter()
                    .zip(values.iter())
                    .map(|(k, v)| (k, v.dyn_into::<Uint8Array>().map(|b| b.to_vec()).unwrap_or_default()))
                    .collect::<Vec<_>>(),
            );
        }
        let outbox = out.pop().unwrap_or_default();
        let snapshots = out.pop().unwrap_or_default();
        Ok(Loaded { snapshots, outbox })
    }

    /// Writes `batch` in one transaction; the promise settles when it is durable.
    pub fn write(&self, batch: Batch) -> Result<Promise, JsValue> {
        let tx = self.db.transaction_with_str_sequence_and_mode(
            &Array::of2(&SNAPSHOTS.into(), &OUTBOX.into()),
            IdbTransactionMode::Readwrite,
        )?;
        let snaps = tx.object_store(SNAPSHOTS)?;
        let outbox = tx.object_store(OUTBOX)?;
        for k in &batch.drop_snapshots {
            snaps.delete(k)?;
        }
        for k in &batch.drop_outbox {
            outbox.delete(k)?;
        }
        for (k, v) in &batch.snapshots {
            snaps.put_with_key(&Uint8Array::from(&v[..]), k)?;
        }
        for (k, v) in &batch.outbox {
            outbox.put_with_key(&Uint8Array::from(&v[..]), k)?;
        }
        Ok(Promise::new(&mut |ok, err| {
            tx.set_oncomplete(Some(&ok));
            tx.set_onerror(Some(&err));
            tx.set_onabort(Some(&err));
        }))
    }

    /// Closes the connection (pending transactions still complete).
    pub fn close(&self) {
        self.db.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_match_the_display_form() {
        for id in [0, 7, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(hex_id(ReplicaId(id)), ReplicaId(id).to_string());
        }
    }
}
