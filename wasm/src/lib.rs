//! # concord-wasm
//!
//! The browser replica: [`concord_core`] compiled to WebAssembly as a sans-IO state
//! machine. Data path:
//!
//! - [`api`]: the `#[wasm_bindgen]` shim (`Replica`, `DocHandle`, and `Host`, the JS
//!   object outputs go to): argument conversion only.
//! - [`replica`]: open documents and the relay session; frames and writes in, [`Out`]s
//!   (frames for the relay and the other tabs, outbox entries, change events) out.
//! - [`channel`]: the tab-to-tab whole-document frame.
//! - [`value`]: JSON-compatible JS values <-> [`concord_core::Value`].
//! - [`error`]: JS error classes.
//!
//! **Why the transports are in JavaScript.** The WebSocket (failover, backoff, liveness),
//! the `BroadcastChannel` and IndexedDB live in the package's hand-written `js/client.js`.
//! They decide nothing about data — every protocol decision is the core's, made here —
//! but written with web-sys they cost ~15 KB gzipped of wasm and generated glue (each
//! closure, promise and DOM call is wasm code plus a JS shim), where the same code in JS
//! is ~3 KB minified. See `npm run size`.
//!
//! Runs in browsers (ESM, Vite) and in Node 20+.

pub mod api;
pub mod channel;
pub mod error;
pub mod replica;
pub mod value;
pub mod vecmap;

pub use api::{DocHandle, Replica};
pub use replica::Out;

/// With the `panic-hook` feature, Rust panics are logged to the console with their
/// message instead of a bare `unreachable` trap.
#[cfg(feature = "panic-hook")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The global allocator: power-of-two size classes with one free list each, carved from
/// pages taken with `memory.grow`. A few hundred bytes of wasm where dlmalloc is ~8 KB.
///
/// Trade-offs, written down: a block is rounded up to a power of two (up to half of it
/// unused), and freed blocks are reused only for their own class, never coalesced (wasm
/// memory never shrinks anyway, whatever the allocator). Sound only single-threaded:
/// compiled only for wasm32 without the `atomics` feature.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static HEAP: heap::Heap<fn(usize) -> usize> = heap::Heap::new(heap::wasm_grow);

/// The allocator's logic, independent of where pages come from (so it is tested natively).
pub mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;
    use core::ptr::null_mut;

    /// A wasm page.
    pub const PAGE: usize = 65536;
    /// Size classes 2^0 ..= 2^63 (classes below 2^3 are never used).
    const CLASSES: usize = usize::BITS as usize;

    struct State {
        /// Head of each class's free list; a free block holds the next one's address.
        free: [*mut u8; CLASSES],
        /// The unused part of the last pages taken.
        next: usize,
        end: usize,
    }

    /// Size-class allocator over pages from `grow(pages)`, which returns the address of
    /// `pages` fresh, page-aligned pages or `usize::MAX`.
    pub struct Heap<G> {
        state: UnsafeCell<State>,
        grow: G,
    }

    // SAFETY: the global instance exists only on wasm32 without threads (see `HEAP`).
    unsafe impl<G: Sync> Sync for Heap<G> {}

    /// `memory.grow` on memory 0.
    #[cfg(target_arch = "wasm32")]
    pub fn wasm_grow(pages: usize) -> usize {
        match core::arch::wasm32::memory_grow(0, pages) {
            usize::MAX => usize::MAX,
            old => old * PAGE,
        }
    }

    /// The class of a layout: log2 of its block size, a power of two at least as large
    /// as its size and its alignment (so a block of the class is aligned enough).
    fn class(l: &Layout) -> Option<usize> {
        let size = l.size().max(l.align()).max(8).checked_next_power_of_two()?;
        Some(size.trailing_zeros() as usize)
    }

    impl<G: Fn(usize) -> usize> Heap<G> {
        /// An empty heap.
        pub const fn new(grow: G) -> Self {
            Heap { state: UnsafeCell::new(State { free: [null_mut(); CLASSES], next: 0, end: 0 }), grow }
        }

        /// A fresh block of `size` (a power of two) aligned to `min(size, PAGE)`.
        unsafe fn carve(&self, s: &mut State, size: usize) -> *mut u8 {
            let align = size.min(PAGE);
            let fits = |s: &State| {
                let start = s.next.checked_add(align - 1)? & !(align - 1);
                let stop = start.checked_add(size)?;
                (stop <= s.end).then_some((start, stop))
            };
            if fits(s).is_none() {
                // Enough pages for the block wherever the free space starts.
                let Some(pages) = size.checked_add(align).map(|n| n.div_ceil(PAGE)) else {
                    return null_mut();
                };
                let base = (self.grow)(pages);
                if base == usize::MAX {
                    return null_mut();
                }
                if base != s.end {
                    s.next = base;
                }
                s.end = base + pages * PAGE;
            }
            match fits(s) {
                Some((start, stop)) => {
                    s.next = stop;
                    start as *mut u8
                }
                None => null_mut(),
            }
        }
    }

    unsafe impl<G: Fn(usize) -> usize> GlobalAlloc for Heap<G> {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            // Blocks above a page are only page-aligned.
            let Some(k) = class(&l).filter(|_| l.align() <= PAGE) else { return null_mut() };
            // SAFETY: one thread, and no call re-enters the allocator.
            let s = unsafe { &mut *self.state.get() };
            let head = s.free[k];
            if !head.is_null() {
                // SAFETY: a free block of this class holds the next free block's address.
                s.free[k] = unsafe { *(head as *mut *mut u8) };
                return head;
            }
            unsafe { self.carve(s, 1 << k) }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let Some(k) = class(&l) else { return };
            // SAFETY: as in `alloc`; `p` is a block of class `k` (at least 8 bytes,
            // 8-aligned), now unused: it can hold the list's next pointer.
            let s = unsafe { &mut *self.state.get() };
            unsafe { *(p as *mut *mut u8) = s.free[k] };
            s.free[k] = p;
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller guarantees `new_size` with `l.align()` is a valid layout.
            let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
            if class(&l) == class(&new) {
                return p; // the block already has room
            }
            let q = unsafe { self.alloc(new) };
            if !q.is_null() {
                // SAFETY: both blocks are live, distinct, and at least this long.
                unsafe {
                    core::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                    self.dealloc(p, l);
                }
            }
            q
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::cell::Cell;

        /// A heap over a fixed arena of `n` pages.
        fn arena(n: usize) -> Heap<impl Fn(usize) -> usize> {
            let base =
                unsafe { std::alloc::alloc(Layout::from_size_align(n * PAGE, PAGE).unwrap()) } as usize;
            let used = Cell::new(0);
            Heap::new(move |pages| {
                if used.get() + pages > n {
                    return usize::MAX;
                }
                used.set(used.get() + pages);
                base + (used.get() - pages) * PAGE
            })
        }

        #[test]
        fn blocks_are_aligned_disjoint_reused_and_keep_their_bytes() {
            let h = arena(2048);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
            for i in 0..20_000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 3 == 0 && !live.is_empty() {
                    let (p, l, fill) = live.swap_remove((x as usize / 3) % live.len());
                    let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
                    assert!(bytes.iter().all(|b| *b == fill), "a block was overwritten");
                    if x % 2 == 0 {
                        unsafe { h.dealloc(p, l) };
                    } else {
                        // Grow or shrink: the prefix survives.
                        let size = (x as usize >> 8) % 3000 + 1;
                        let q = unsafe { h.realloc(p, l, size) };
                        assert!(!q.is_null());
                        let nl = Layout::from_size_align(size, l.align()).unwrap();
                        let kept = unsafe { std::slice::from_raw_parts(q, l.size().min(size)) };
                        assert!(kept.iter().all(|b| *b == fill));
                        unsafe { q.write_bytes(fill, size) };
                        live.push((q, nl, fill));
                    }
                    continue;
                }
                let size = (x as usize >> 4) % if x % 10 == 0 { 70_000 } else { 200 } + 1;
                let align = 1 << ((x >> 40) % 8);
                let l = Layout::from_size_align(size, align).unwrap();
                let p = unsafe { h.alloc(l) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "misaligned");
                let fill = i as u8;
                unsafe { p.write_bytes(fill, size) };
                live.push((p, l, fill));
            }
            for (p, l, fill) in live {
                let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
                assert!(bytes.iter().all(|b| *b == fill), "a block was overwritten");
            }
        }

        #[test]
        fn an_exhausted_arena_or_a_huge_alignment_gives_null_not_a_bad_block() {
            let h = arena(2);
            assert!(unsafe { h.alloc(Layout::from_size_align(3 * PAGE, 8).unwrap()) }.is_null());
            assert!(unsafe { h.alloc(Layout::from_size_align(8, 2 * PAGE).unwrap()) }.is_null());
            let p = unsafe { h.alloc(Layout::from_size_align(100, 8).unwrap()) };
            assert!(!p.is_null());
        }
    }
}
