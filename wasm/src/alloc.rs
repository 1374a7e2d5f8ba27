//! A small global allocator for the wasm build: power-of-two size classes with one free
//! list each, carved from linear memory that only ever grows.
//!
//! **Why not the default.** Rust's wasm32 `std` ships dlmalloc (Doug Lea's allocator):
//! about 7.5 KB of wasm, a sixth of the package's allocator-free code budget, to get
//! best-fit placement and coalescing. A browser replica holds a few documents whose
//! memory mostly grows; what it needs is fast, correct and small. This is the classic
//! segregated free-list design (Knuth, TAOCP vol. 1, §2.5, "dynamic storage allocation";
//! Wilson et al., "Dynamic Storage Allocation: A Survey and Critical Review", 1995, §3.6
//! "segregated free lists" with power-of-two classes), in about 500 bytes of wasm:
//!
//! - Every request is rounded up to a power of two `c >= 16` (and at least its alignment):
//!   its *class*. A freed block goes onto its class's list (the list's link is written in
//!   the block itself) and is handed out again, whole, to the next request of that class.
//! - Blocks of class `c` are always `c`-aligned, so any alignment up to the size is met.
//!   New blocks are cut from the top of the heap; when the top is not `c`-aligned, the gap
//!   is cut into smaller aligned blocks that go onto their own lists (nothing is lost).
//! - `realloc` within a block's class keeps the block; `Vec` doubling moves up one class.
//!
//! The price: up to 2x internal fragmentation (1.33x for uniformly spread sizes), and
//! memory once used by one class is only reused by that class. The heap grows with
//! `memory.grow` and, as with dlmalloc on wasm, never shrinks.
//!
//! [`Heap`] is the logic over an abstract "grow" step so the native tests can drive it;
//! on wasm32 the `#[global_allocator]` runs it over linear memory.

/// Smallest class: 2^4 = 16 bytes (room for the free-list link; `u128`'s alignment).
const MIN_SHIFT: u32 = 4;
/// Number of classes: 2^4 .. 2^31 bytes.
const CLASSES: usize = 28;

/// The allocator's state. Addresses are `usize`; the free-list links live in the freed
/// blocks, read and written through [`Memory`].
pub struct Heap {
    /// Head of each class's free list (0: empty).
    free: [usize; CLASSES],
    /// First byte not yet handed out.
    top: usize,
    /// End of the memory obtained so far.
    end: usize,
}

/// What the heap needs from the memory under it.
pub trait Memory {
    /// Makes at least `bytes` more bytes available at the end of memory; returns the end
    /// before and after growing, or `None` when memory is exhausted.
    fn grow(&mut self, bytes: usize) -> Option<(usize, usize)>;
    /// The free-list link stored in the block at `addr`.
    fn link(&self, addr: usize) -> usize;
    /// Stores `next` as the link of the block at `addr`.
    fn set_link(&mut self, addr: usize, next: usize);
}

/// The class of a request of `size` bytes aligned to `align`, or `None` above 2^31.
#[inline]
fn class_of(size: usize, align: usize) -> Option<usize> {
    let need = size.max(align).max(1 << MIN_SHIFT);
    let shift = usize::BITS - (need - 1).leading_zeros();
    let class = (shift - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

#[inline]
fn class_size(class: usize) -> usize {
    1 << (class as u32 + MIN_SHIFT)
}

impl Heap {
    /// An empty heap; the first allocation asks [`Memory::grow`] for memory.
    pub const fn new() -> Heap {
        Heap { free: [0; CLASSES], top: 0, end: 0 }
    }

    /// A block of at least `size` bytes aligned to `align` (a power of two), or 0 when
    /// memory is exhausted.
    pub fn alloc(&mut self, mem: &mut impl Memory, size: usize, align: usize) -> usize {
        let Some(class) = class_of(size, align) else { return 0 };
        let head = self.free[class];
        if head != 0 {
            self.free[class] = mem.link(head);
            return head;
        }
        self.carve(mem, class)
    }

    /// Returns the block at `addr` of a request of `size` bytes aligned to `align`.
    pub fn dealloc(&mut self, mem: &mut impl Memory, addr: usize, size: usize, align: usize) {
        if let Some(class) = class_of(size, align) {
            self.push(mem, class, addr);
        }
    }

    /// Moves the block at `addr` (a request of `size` bytes aligned to `align`) to one of
    /// `new_size` bytes; returns the new address (the same while the class fits) or 0 when
    /// memory is exhausted, leaving the old block untouched. `copy(from, to, len)` moves
    /// the contents.
    pub fn realloc(
        &mut self,
        mem: &mut impl Memory,
        addr: usize,
        size: usize,
        align: usize,
        new_size: usize,
        copy: impl FnOnce(usize, usize, usize),
    ) -> usize {
        let (Some(old), Some(new)) = (class_of(size, align), class_of(new_size, align)) else { return 0 };
        if new <= old {
            return addr;
        }
        let to = self.alloc(mem, new_size, align);
        if to != 0 {
            copy(addr, to, size.min(new_size));
            self.push(mem, old, addr);
        }
        to
    }

    #[inline]
    fn push(&mut self, mem: &mut impl Memory, class: usize, addr: usize) {
        mem.set_link(addr, self.free[class]);
        self.free[class] = addr;
    }

    /// A new block of `class` from the top of the heap, growing memory when needed.
    #[inline(never)]
    fn carve(&mut self, mem: &mut impl Memory, class: usize) -> usize {
        let size = class_size(class);
        loop {
            let Some(start) = self.top.checked_next_multiple_of(size) else { return 0 };
            let Some(past) = start.checked_add(size) else { return 0 };
            if past <= self.end {
                // The gap below `start` becomes free blocks: `top` is 16-aligned and `start`
                // a multiple of a larger power of two, so `top`'s lowest set bit is a whole
                // aligned block that fits, each time.
                while self.top < start {
                    let piece = self.top & self.top.wrapping_neg();
                    if let Some(c) = class_of(piece, 1) {
                        self.push(mem, c, self.top);
                    }
                    self.top += piece;
                }
                self.top = past;
                return start;
            }
            let Some((old, new)) = mem.grow(past - self.end.min(past)) else { return 0 };
            if old != self.end {
                // The first call: the heap starts at the end of the memory it found.
                self.top = old;
            }
            self.end = new;
        }
    }
}

impl Default for Heap {
    fn default() -> Self {
        Heap::new()
    }
}

#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
mod global {
    //! The `#[global_allocator]`: [`super::Heap`] over wasm linear memory.
    use super::{Heap, Memory};
    use core::arch::wasm32::{memory_grow, memory_size};
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::UnsafeCell;

    const PAGE: usize = 65_536;

    struct Linear;

    impl Memory for Linear {
        fn grow(&mut self, bytes: usize) -> Option<(usize, usize)> {
            let before = memory_grow(0, bytes.div_ceil(PAGE));
            let at = |pages: usize| pages.checked_mul(PAGE);
            if before == usize::MAX {
                return None;
            }
            Some((at(before)?, at(memory_size(0))?))
        }
        fn link(&self, addr: usize) -> usize {
            // SAFETY: `addr` is a free block of at least 16 bytes owned by the heap.
            unsafe { *(addr as *const usize) }
        }
        fn set_link(&mut self, addr: usize, next: usize) {
            // SAFETY: as above; the block's owner has given it back.
            unsafe { *(addr as *mut usize) = next }
        }
    }

    struct Global(UnsafeCell<Heap>);

    // SAFETY: wasm32 without the `atomics` feature has exactly one thread.
    unsafe impl Sync for Global {}

    #[global_allocator]
    static HEAP: Global = Global(UnsafeCell::new(Heap::new()));

    unsafe impl GlobalAlloc for Global {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            (*self.0.get()).alloc(&mut Linear, l.size(), l.align()) as *mut u8
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            (*self.0.get()).dealloc(&mut Linear, p as usize, l.size(), l.align())
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
            let copy = |from: usize, to: usize, len: usize| {
                std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len)
            };
            (*self.0.get()).realloc(&mut Linear, p as usize, l.size(), l.align(), new_size, copy) as *mut u8
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use std::collections::{BTreeMap, HashMap};

    /// Simulated linear memory: links in a map, an end that grows by 64 KiB pages up to a
    /// limit.
    struct Sim {
        links: HashMap<usize, usize>,
        end: usize,
        limit: usize,
    }

    impl Memory for Sim {
        fn grow(&mut self, bytes: usize) -> Option<(usize, usize)> {
            let new = self.end + bytes.div_ceil(65_536) * 65_536;
            if new > self.limit {
                return None;
            }
            let old = std::mem::replace(&mut self.end, new);
            Some((old, new))
        }
        fn link(&self, addr: usize) -> usize {
            self.links[&addr]
        }
        fn set_link(&mut self, addr: usize, next: usize) {
            self.links.insert(addr, next);
        }
    }

    fn sim(limit: usize) -> Sim {
        Sim { links: HashMap::new(), end: 1 << 20, limit }
    }

    /// Live blocks never overlap, sit inside memory, are aligned, keep their contents
    /// through `realloc` (a tag per block stands for them), and freed memory is reused.
    #[test]
    fn random_alloc_free_realloc_never_overlaps_and_keeps_contents() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut mem = sim(usize::MAX);
            let mut heap = Heap::new();
            // start -> (size, align, tag)
            let mut live: BTreeMap<usize, (usize, usize, u64)> = BTreeMap::new();
            let mut tags: HashMap<usize, u64> = HashMap::new();
            for step in 0..2_000u64 {
                let op = rng.below(10);
                if op < 5 || live.is_empty() {
                    let size = match rng.below(4) {
                        0 => 1 + rng.below(16),
                        1 => 1 + rng.below(256),
                        2 => 1 + rng.below(5_000),
                        _ => 1 + rng.below(200_000),
                    } as usize;
                    let align = 1usize << rng.below(8);
                    let at = heap.alloc(&mut mem, size, align);
                    assert_ne!(at, 0, "seed {seed}: out of memory");
                    assert_eq!(at % align, 0, "seed {seed}: misaligned");
                    assert!(at >= 1 << 20 && at + size <= mem.end, "seed {seed}: outside memory");
                    if let Some((&s, &(len, _, _))) = live.range(..=at).next_back() {
                        assert!(s + len <= at, "seed {seed}: {at} overlaps block at {s}");
                    }
                    if let Some((&s, _)) = live.range(at..).next() {
                        assert!(at + size <= s, "seed {seed}: {at}+{size} overlaps block at {s}");
                    }
                    live.insert(at, (size, align, step));
                    tags.insert(at, step);
                } else {
                    let k = rng.below(live.len() as u64) as usize;
                    let (&at, &(size, align, tag)) = live.iter().nth(k).unwrap();
                    live.remove(&at);
                    if op < 8 {
                        heap.dealloc(&mut mem, at, size, align);
                        tags.remove(&at);
                        continue;
                    }
                    let new_size = 1 + rng.below(2 * size as u64 + 64) as usize;
                    let mut moved = None;
                    let to = heap.realloc(&mut mem, at, size, align, new_size, |from, to, len| {
                        moved = Some((from, to, len))
                    });
                    assert_ne!(to, 0);
                    assert_eq!(to % align, 0);
                    match moved {
                        Some((from, dest, len)) => {
                            assert_eq!((from, dest, len), (at, to, size.min(new_size)));
                            let t = tags.remove(&from).unwrap();
                            tags.insert(to, t);
                        }
                        None => assert_eq!(to, at, "seed {seed}: moved without copying"),
                    }
                    assert_eq!(tags[&to], tag, "seed {seed}: contents lost");
                    if let Some((&s, &(len, _, _))) = live.range(..=to).next_back() {
                        assert!(s + len <= to, "seed {seed}: realloc overlaps");
                    }
                    if let Some((&s, _)) = live.range(to..).next() {
                        assert!(to + new_size <= s, "seed {seed}: realloc overlaps");
                    }
                    live.insert(to, (new_size, align, tag));
                }
            }
        }
    }

    #[test]
    fn a_freed_block_is_handed_out_again_and_memory_does_not_grow() {
        let mut mem = sim(usize::MAX);
        let mut heap = Heap::new();
        let a = heap.alloc(&mut mem, 100, 8);
        let end = mem.end;
        heap.dealloc(&mut mem, a, 100, 8);
        for _ in 0..1_000 {
            let b = heap.alloc(&mut mem, 120, 8); // same class (128)
            assert_eq!(b, a);
            heap.dealloc(&mut mem, b, 120, 8);
        }
        assert_eq!(mem.end, end);
    }

    #[test]
    fn alignment_gaps_become_smaller_blocks() {
        let mut mem = sim(usize::MAX);
        let mut heap = Heap::new();
        let small = heap.alloc(&mut mem, 16, 1);
        let big = heap.alloc(&mut mem, 4_096, 1);
        assert_eq!(big % 4_096, 0);
        // The gap between them was cut into 16, 32, ... 2048-byte blocks: the next small
        // requests are served from it, below `big`.
        let next = heap.alloc(&mut mem, 16, 1);
        assert!(small < next && next < big, "{small} {next} {big}");
        let mid = heap.alloc(&mut mem, 2_048, 1);
        assert!(mid < big);
    }

    #[test]
    fn exhausted_memory_is_a_null_not_a_crash_and_realloc_keeps_the_old_block() {
        let mut mem = sim((1 << 20) + 4 * 65_536);
        let mut heap = Heap::new();
        let a = heap.alloc(&mut mem, 65_536, 8);
        assert_ne!(a, 0);
        assert_eq!(heap.alloc(&mut mem, 1 << 20, 8), 0);
        let mut copied = false;
        assert_eq!(heap.realloc(&mut mem, a, 65_536, 8, 1 << 20, |_, _, _| copied = true), 0);
        assert!(!copied);
        // Shrinking stays in place.
        assert_eq!(heap.realloc(&mut mem, a, 65_536, 8, 10, |_, _, _| copied = true), a);
        assert!(!copied);
        assert_eq!(heap.alloc(&mut mem, usize::MAX / 2, 8), 0);
    }
}
