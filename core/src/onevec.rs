//! A `Vec` that holds a single element inline.
//!
//! A delta is small: one counter entry, one set element, one dot in a causal context's
//! cloud. Keeping a lone element inline means making and dropping such a delta never
//! touches the allocator, which is most of the cost of a local mutation. (The same idea
//! as `smallvec`, cut down to the one case the data path needs.)

use std::ops::{Deref, DerefMut, Range};

/// Zero or many elements in a `Vec`, or exactly one inline. Derefs to a slice.
#[derive(Clone)]
pub(crate) enum OneOrVec<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrVec<T> {
    fn default() -> Self {
        OneOrVec::new()
    }
}

impl<T> OneOrVec<T> {
    /// No element, no allocation.
    pub(crate) const fn new() -> Self {
        OneOrVec::Many(Vec::new())
    }

    /// The `Vec`, allocating one if the element was inline.
    fn vec(&mut self) -> &mut Vec<T> {
        if let OneOrVec::One(_) = self {
            let OneOrVec::One(x) = std::mem::take(self) else { unreachable!() };
            let mut v = Vec::with_capacity(4);
            v.push(x);
            *self = OneOrVec::Many(v);
        }
        match self {
            OneOrVec::Many(v) => v,
            OneOrVec::One(_) => unreachable!(),
        }
    }

    /// Appends `x`.
    #[inline]
    pub(crate) fn push(&mut self, x: T) {
        match self {
            OneOrVec::Many(v) if v.capacity() > 0 => v.push(x),
            _ => self.push_cold(x),
        }
    }

    /// [`Self::push`] onto no allocation: kept out of line, so appending to a large map
    /// inlines to `Vec::push`.
    #[cold]
    #[inline(never)]
    fn push_cold(&mut self, x: T) {
        match self {
            OneOrVec::Many(v) if v.capacity() > 0 => v.push(x),
            OneOrVec::Many(_) => *self = OneOrVec::One(x),
            OneOrVec::One(_) => self.vec().push(x),
        }
    }

    /// Inserts `x` at position `i`.
    #[inline]
    pub(crate) fn insert(&mut self, i: usize, x: T) {
        match self {
            OneOrVec::Many(v) if v.capacity() == 0 => *self = OneOrVec::One(x),
            _ => self.vec().insert(i, x),
        }
    }

    /// Removes and returns the element at `i`, the last element taking its place.
    pub(crate) fn swap_remove(&mut self, i: usize) -> T {
        match self {
            OneOrVec::Many(v) => v.swap_remove(i),
            OneOrVec::One(_) => self.take_one(i),
        }
    }

    /// Removes and returns the element at `i`, shifting the rest down.
    pub(crate) fn remove(&mut self, i: usize) -> T {
        match self {
            OneOrVec::Many(v) => v.remove(i),
            OneOrVec::One(_) => self.take_one(i),
        }
    }

    fn take_one(&mut self, i: usize) -> T {
        assert_eq!(i, 0, "index out of bounds");
        match std::mem::take(self) {
            OneOrVec::One(x) => x,
            OneOrVec::Many(_) => unreachable!(),
        }
    }

    /// Removes the elements at positions `range`.
    pub(crate) fn drain_range(&mut self, range: Range<usize>) {
        match self {
            OneOrVec::Many(v) => {
                v.drain(range);
            }
            OneOrVec::One(_) => {
                if range.start < range.end {
                    self.take_one(range.start);
                }
            }
        }
    }

    /// Keeps the elements for which `keep` says so, in order.
    pub(crate) fn retain_mut(&mut self, mut keep: impl FnMut(&mut T) -> bool) {
        match self {
            OneOrVec::Many(v) => v.retain_mut(keep),
            OneOrVec::One(x) => {
                if !keep(x) {
                    *self = OneOrVec::new();
                }
            }
        }
    }

    /// Room for `additional` more elements.
    pub(crate) fn reserve(&mut self, additional: usize) {
        if additional > 0 {
            self.vec().reserve(additional);
        }
    }

    /// The elements as a `Vec`.
    #[cfg(test)]
    fn into_vec(self) -> Vec<T> {
        self.into_iter().collect()
    }
}

/// The elements of a [`OneOrVec`] by value; a lone element without allocating.
pub(crate) type IntoIter<T> = std::iter::Chain<std::option::IntoIter<T>, std::vec::IntoIter<T>>;

impl<T> IntoIterator for OneOrVec<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;

    fn into_iter(self) -> IntoIter<T> {
        match self {
            OneOrVec::One(x) => Some(x).into_iter().chain(Vec::new()),
            OneOrVec::Many(v) => None.into_iter().chain(v),
        }
    }
}

impl<T> From<Vec<T>> for OneOrVec<T> {
    fn from(v: Vec<T>) -> Self {
        OneOrVec::Many(v)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for OneOrVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> Deref for OneOrVec<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            OneOrVec::One(x) => std::slice::from_ref(x),
            OneOrVec::Many(v) => v,
        }
    }
}

impl<T> DerefMut for OneOrVec<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            OneOrVec::One(x) => std::slice::from_mut(x),
            OneOrVec::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_element_stays_inline_and_more_behave_like_a_vec() {
        let mut x: OneOrVec<u32> = OneOrVec::new();
        let mut v: Vec<u32> = Vec::new();
        x.push(5);
        assert!(matches!(x, OneOrVec::One(5)));
        v.push(5);
        for (i, n) in [(0, 1), (2, 9), (1, 4), (4, 7)] {
            x.insert(i, n);
            v.insert(i, n);
        }
        assert_eq!(*x, *v);
        assert_eq!(x.remove(1), v.remove(1));
        assert_eq!(x.swap_remove(0), v.swap_remove(0));
        x.drain_range(1..2);
        v.drain(1..2);
        x.retain_mut(|n| *n != 9);
        v.retain_mut(|n| *n != 9);
        assert_eq!(*x, *v);
        assert_eq!(x.clone().into_vec(), v);
        let mut one = OneOrVec::new();
        one.push(3u32);
        one.drain_range(0..1);
        assert!(one.is_empty());
    }
}
