//! `VecMap`: an ordered map kept as one sorted vector, for the small maps an aggregate holds
//! (its operations, downstreams, exception types and cohorts).
//!
//! A B-tree's node always has room for eleven entries: an aggregate's map of one downstream took
//! eleven entries' memory, and history keeps about seventy aggregates per version under analysis.
//! A sorted vector takes what its entries take (`shrink_to_fit` for one kept unchanged), is
//! searched by bisection, and walks in key order like the `BTreeMap` it replaces, whose methods
//! it offers under the same names. Inserting a new key moves the entries after it. The catalog's
//! caps bound what that costs: a second's bucket gains each of its operations once (at the cap of
//! 200, arriving in random order, some 20,000 entry moves a second per version, against a few
//! hundred for a service of twenty operations), and a version's baselines gain a key only when a
//! feature is first seen.

use std::borrow::Borrow;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VecMap<K, V> {
    /// Sorted by key, each key once.
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap { entries: Vec::new() }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for VecMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A pair of references to an entry, as `BTreeMap::iter` yields.
fn pair<K, V>(entry: &(K, V)) -> (&K, &V) {
    (&entry.0, &entry.1)
}

fn pair_mut<K, V>(entry: &mut (K, V)) -> (&K, &mut V) {
    (&entry.0, &mut entry.1)
}

pub type Iter<'a, K, V> = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
pub type IterMut<'a, K, V> =
    std::iter::Map<std::slice::IterMut<'a, (K, V)>, fn(&'a mut (K, V)) -> (&'a K, &'a mut V)>;

impl<K, V> VecMap<K, V> {
    pub fn new() -> Self {
        VecMap::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries there is room for without growing, for memory accounting.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Gives back the room for entries it does not hold.
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }

    /// The map of `entries`, which must be sorted by key, each key once (as a map's own entries
    /// read back are): `None` where they are not.
    pub fn from_sorted(entries: Vec<(K, V)>) -> Option<Self>
    where
        K: Ord,
    {
        entries
            .windows(2)
            .all(|pair| pair[0].0 < pair[1].0)
            .then_some(VecMap { entries })
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        self.entries.iter().map(pair as fn(&(K, V)) -> (&K, &V))
    }

    pub fn iter_mut(&mut self) -> IterMut<'_, K, V> {
        self.entries
            .iter_mut()
            .map(pair_mut as fn(&mut (K, V)) -> (&K, &mut V))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    /// Sets `key`'s value, giving back the one it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// The value of `key`, inserted as the default when absent: only then is the key copied
    /// (for a key of the map's own type, cloned: a shared name's clone is a count).
    pub fn get_or_default<Q>(&mut self, key: &Q) -> &mut V
    where
        K: Borrow<Q>,
        Q: Ord + ToOwned<Owned = K> + ?Sized,
        V: Default,
    {
        let i = match self.find(key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (key.to_owned(), V::default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// `get_or_default`, looking first at `place` (where the caller expects the key: where it
    /// was found in a map like this one, or just past the key before it when merging one sorted
    /// map into another) and bisecting only when it is not there; `place` is then set to where
    /// the key is. A key of shared text (`Arc<str>`) that is the entry's own copy matches there
    /// without comparing the text, where bisection compares it with three or four keys (routes
    /// alike up to their last segment).
    pub fn get_or_default_at<Q>(&mut self, key: &Q, place: &mut usize) -> &mut V
    where
        K: Borrow<Q>,
        Q: Ord + ToOwned<Owned = K> + ?Sized,
        V: Default,
    {
        let i = match self.entries.get(*place) {
            Some((k, _)) if k.borrow() == key => *place,
            _ => match self.find(key) {
                Ok(i) => i,
                Err(i) => {
                    self.entries.insert(i, (key.to_owned(), V::default()));
                    i
                }
            },
        };
        *place = i;
        &mut self.entries[i].1
    }

    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let at = self.find(&key);
        Entry { map: self, key, at }
    }
}

/// A key's place in a `VecMap`, found once: `or_default` and `or_insert` fill it when vacant.
pub struct Entry<'a, K, V> {
    map: &'a mut VecMap<K, V>,
    key: K,
    at: Result<usize, usize>,
}

impl<'a, K, V> Entry<'a, K, V> {
    pub fn or_insert_with(self, make: impl FnOnce() -> V) -> &'a mut V {
        let i = match self.at {
            Ok(i) => i,
            Err(i) => {
                self.map.entries.insert(i, (self.key, make()));
                i
            }
        };
        &mut self.map.entries[i].1
    }

    pub fn or_insert(self, value: V) -> &'a mut V {
        self.or_insert_with(|| value)
    }

    pub fn or_default(self) -> &'a mut V
    where
        V: Default,
    {
        self.or_insert_with(V::default)
    }
}

/// `map[key]`, which panics when the key is absent, as `BTreeMap`'s does.
impl<K: Ord + Borrow<Q>, Q: Ord + ?Sized, V> std::ops::Index<&Q> for VecMap<K, V> {
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry for the key in VecMap")
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// As `BTreeMap` does: in key order, a key given twice keeps its last value.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = VecMap::new();
        map.extend(iter);
        map
    }
}

impl<K: Ord, V> Extend<(K, V)> for VecMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<'a, K, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, K, V> IntoIterator for &'a mut VecMap<K, V> {
    type Item = (&'a K, &'a mut V);
    type IntoIter = IterMut<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<K, V> IntoIterator for VecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// Stored as a map, as the `BTreeMap` it replaces was: records written before read the same.
impl<K: Serialize, V: Serialize> Serialize for VecMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for VecMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(std::marker::PhantomData<(K, V)>);

        impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for MapVisitor<K, V> {
            type Value = VecMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                // Sorted once; a key given twice keeps its last value, as a `BTreeMap` would.
                entries.reverse();
                entries.sort_by(|a: &(K, V), b: &(K, V)| a.0.cmp(&b.0));
                entries.dedup_by(|later, earlier| later.0 == earlier.0);
                Ok(VecMap { entries })
            }
        }

        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Add(u8, u32),
        /// Added through `get_or_default_at`, looked for first at the key's own place (an even
        /// number) or at a place that may be anywhere.
        AddAt(u8, u32, usize),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (any::<u8>(), 0..100u32).prop_map(|(k, v)| Op::Add(k, v)),
            (any::<u8>(), 0..100u32, 0..300usize).prop_map(|(k, v, at)| Op::AddAt(k, v, at)),
            any::<u8>().prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Whatever is done to it, it holds, walks and stores what a `BTreeMap` would.
        #[test]
        fn it_behaves_as_a_btree_map(ops in proptest::collection::vec(op(), 0..200)) {
            let mut mine: VecMap<String, u64> = VecMap::new();
            let mut theirs: BTreeMap<String, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(
                        mine.insert(k.to_string(), v.into()),
                        theirs.insert(k.to_string(), v.into())
                    ),
                    Op::Add(k, v) => {
                        *mine.entry(k.to_string()).or_default() += u64::from(v);
                        *theirs.entry(k.to_string()).or_default() += u64::from(v);
                    }
                    Op::AddAt(k, v, at) => {
                        let key = k.to_string();
                        let mut place = match at % 2 {
                            0 => mine.keys().position(|known| *known == key).unwrap_or(at),
                            _ => at,
                        };
                        *mine.get_or_default_at(k.to_string().as_str(), &mut place) += u64::from(v);
                        *theirs.entry(k.to_string()).or_default() += u64::from(v);
                        // The place is where the key now is: the next lookup there finds it.
                        prop_assert_eq!(mine.keys().nth(place), Some(&k.to_string()));
                    }
                    Op::Remove(k) => prop_assert_eq!(mine.remove(&k.to_string()), theirs.remove(&k.to_string())),
                }
            }
            prop_assert!(mine.iter().eq(theirs.iter()));
            prop_assert_eq!(mine.len(), theirs.len());
            for k in 0..=255u8 {
                prop_assert_eq!(mine.get(k.to_string().as_str()), theirs.get(k.to_string().as_str()));
            }
            let stored = serde_json::to_string(&mine).expect("serializes");
            prop_assert_eq!(&stored, &serde_json::to_string(&theirs).expect("serializes"));
            let read: VecMap<String, u64> = serde_json::from_str(&stored).expect("reads back");
            prop_assert_eq!(read, mine);
        }
    }

    #[test]
    fn a_stored_map_with_a_key_twice_keeps_the_last_value() {
        let read: VecMap<String, u32> = serde_json::from_str(r#"{"b":1,"a":2,"b":3}"#).expect("reads");
        let theirs: BTreeMap<String, u32> = serde_json::from_str(r#"{"b":1,"a":2,"b":3}"#).expect("reads");
        assert!(read.iter().eq(theirs.iter()));
    }

    #[test]
    fn a_kept_map_takes_only_its_entries() {
        let mut map: VecMap<String, u64> = (0..3).map(|i| (i.to_string(), i)).collect();
        map.shrink_to_fit();
        assert_eq!(map.capacity(), 3);
    }
}
