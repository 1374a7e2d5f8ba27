//! A map from document id to `V` as a plain vector: a client has a handful of documents
//! open, and one `BTreeMap` instantiation costs more code than this whole file.

/// String-keyed map, insertion-ordered.
pub struct VecMap<V>(Vec<(String, V)>);

impl<V> Default for VecMap<V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<V> VecMap<V> {
    /// The value under `k`.
    pub fn get(&self, k: &str) -> Option<&V> {
        self.0.iter().find(|e| e.0 == k).map(|e| &e.1)
    }

    /// The value under `k`, mutably.
    pub fn get_mut(&mut self, k: &str) -> Option<&mut V> {
        self.0.iter_mut().find(|e| e.0 == k).map(|e| &mut e.1)
    }

    /// Whether `k` is present.
    pub fn contains_key(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    /// Inserts or replaces.
    pub fn insert(&mut self, k: String, v: V) {
        match self.get_mut(&k) {
            Some(old) => *old = v,
            None => self.0.push((k, v)),
        }
    }

    /// Keys.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|e| &e.0)
    }

    /// Values, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|e| &mut e.1)
    }

    /// Entries, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut V)> {
        self.0.iter_mut().map(|e| (&e.0, &mut e.1))
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A set of document ids.
pub type Names = VecMap<()>;

impl Names {
    /// Adds a name.
    pub fn add(&mut self, k: &str) {
        if !self.contains_key(k) {
            self.0.push((k.to_owned(), ()));
        }
    }

    /// Removes and returns every name.
    pub fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.0).into_iter().map(|e| e.0).collect()
    }
}
