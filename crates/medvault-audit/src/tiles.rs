//! The Merkle tree stored as C2SP tlog-tiles of height 8, and RFC 6962 proofs read from them.
//!
//! A tile at level `L`, index `i` holds up to 256 consecutive hashes of tree level `8·L`:
//! level 0 tiles hold leaf hashes, level 1 tiles the roots of 256-leaf subtrees, and so on.
//! A partial tile is a prefix of the full tile it becomes, so storing each tile at its
//! newest width serves every older tree size too. [`Tiles`] integrates new leaves and says
//! which tiles changed; [`subtree`], [`inclusion_proof`] and [`consistency_proof`] read any
//! complete subtree's hash from tiles, so a proof costs O(log n) tile reads at any log size.

use crate::merkle::{empty_root, node_hash, Hash};

/// Hashes per full tile (tile height 8).
pub const WIDTH: usize = 256;
const HEIGHT: u32 = 8;

/// The right edge of the tiled tree: for each tile level, the hashes of its rightmost,
/// incomplete tile. Enough to integrate more leaves and to compute the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tiles {
    size: u64,
    /// `partial[L]`: hashes of the incomplete tile at level L (fewer than 256).
    partial: Vec<Vec<Hash>>,
}

/// A tile that changed: (level, index, hashes). Full tiles have 256 hashes.
pub type TileUpdate = (u32, u64, Vec<Hash>);

/// Hashes at tree level `8·level` in a tree of `size` leaves.
pub fn count_at(size: u64, level: u32) -> u64 {
    size.checked_shr(HEIGHT * level).unwrap_or(0)
}

impl Tiles {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The partial tiles a tree of `size` leaves has: (level, index, width).
    pub fn partial_tiles(size: u64) -> Vec<(u32, u64, usize)> {
        let mut out = vec![];
        let mut level = 0;
        loop {
            let n = count_at(size, level);
            if n == 0 {
                break;
            }
            let width = (n % WIDTH as u64) as usize;
            if width > 0 {
                out.push((level, n / WIDTH as u64, width));
            }
            level += 1;
        }
        out
    }

    /// Resumes from stored partial tiles (as listed by [`Tiles::partial_tiles`], each
    /// truncated to its width). `None` if a tile is missing or too narrow.
    pub fn resume(size: u64, mut load: impl FnMut(u32, u64) -> Option<Vec<Hash>>) -> Option<Self> {
        let mut partial = vec![];
        for (level, index, width) in Self::partial_tiles(size) {
            let mut hashes = load(level, index)?;
            if hashes.len() < width {
                return None;
            }
            hashes.truncate(width);
            let at = usize::try_from(level).ok()?;
            while partial.len() <= at {
                partial.push(vec![]);
            }
            *partial.get_mut(at)? = hashes;
        }
        // Levels above with no partial tile still need a (empty) slot up to the top.
        let mut levels = 0;
        while count_at(size, levels) > 0 {
            levels += 1;
        }
        while partial.len() < levels as usize {
            partial.push(vec![]);
        }
        Some(Tiles { size, partial })
    }

    /// Integrates leaf hashes in order; returns every tile that changed (tiles completed,
    /// then the new partial tiles), in level-then-index order.
    pub fn append(&mut self, leaves: impl IntoIterator<Item = Hash>) -> Vec<TileUpdate> {
        self.append_with(leaves, &|_| None)
    }

    /// As [`Tiles::append`], taking the root of a completed level-0 tile from
    /// `level0_root(tile index)` when it has one (computed in parallel by the caller from
    /// the same leaves) instead of hashing it here.
    pub fn append_with(
        &mut self,
        leaves: impl IntoIterator<Item = Hash>,
        level0_root: &dyn Fn(u64) -> Option<Hash>,
    ) -> Vec<TileUpdate> {
        let mut full: Vec<TileUpdate> = vec![];
        let mut touched: Vec<bool> = vec![];
        for leaf in leaves {
            self.size += 1;
            let mut level = 0usize;
            let mut hash = leaf;
            loop {
                if self.partial.len() <= level {
                    self.partial.push(vec![]);
                }
                if touched.len() <= level {
                    touched.push(false);
                }
                if let Some(t) = touched.get_mut(level) {
                    *t = true;
                }
                let Some(tile) = self.partial.get_mut(level) else {
                    break;
                };
                tile.push(hash);
                if tile.len() < WIDTH {
                    break;
                }
                let done = std::mem::replace(tile, Vec::with_capacity(WIDTH));
                let index = count_at(self.size, level as u32 + 1) - 1;
                hash = match level {
                    0 => level0_root(index).unwrap_or_else(|| perfect_root(&done)),
                    _ => perfect_root(&done),
                };
                full.push((level as u32, index, done));
                level += 1;
            }
        }
        let mut out = full;
        for (level, tile) in self.partial.iter().enumerate() {
            if !tile.is_empty() && touched.get(level).copied().unwrap_or(false) {
                let index = count_at(self.size, level as u32) / WIDTH as u64;
                out.push((level as u32, index, tile.clone()));
            }
        }
        out.sort_by_key(|t| (t.0, t.1));
        out
    }

    /// The RFC 6962 root of the tree integrated so far.
    pub fn root(&self) -> Hash {
        // Complete subtrees left to right: higher tile levels first; within a level the
        // partial tile's hashes split by the binary digits of its width.
        let mut subtrees: Vec<Hash> = vec![];
        for tile in self.partial.iter().rev() {
            let mut rest: &[Hash] = tile;
            while !rest.is_empty() {
                let take = 1usize << (usize::BITS - 1 - rest.len().leading_zeros());
                let (head, tail) = rest.split_at(take);
                subtrees.push(perfect_root(head));
                rest = tail;
            }
        }
        let mut it = subtrees.into_iter().rev();
        let Some(mut acc) = it.next() else {
            return empty_root();
        };
        for left in it {
            acc = node_hash(&left, &acc);
        }
        acc
    }
}

/// The root of a perfect tree over a power-of-two number of hashes.
pub fn perfect_root(hashes: &[Hash]) -> Hash {
    let mut level: Vec<Hash> = hashes.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| match p {
                [l, r] => node_hash(l, r),
                [one] => *one,
                _ => empty_root(),
            })
            .collect();
    }
    level.first().copied().unwrap_or_else(empty_root)
}

/// Where a complete subtree's hash lives: the hash at tree level `height`, index `index`
/// is the root over hashes `[first, first + count)` of the tile `(level, tile)`.
pub fn locate(height: u32, index: u64) -> (u32, u64, usize, usize) {
    let level = height / HEIGHT;
    let r = height % HEIGHT;
    let at = index << r;
    let tile = at / WIDTH as u64;
    let first = (at % WIDTH as u64) as usize;
    (level, tile, first, 1usize << r)
}

/// The hash of the complete subtree at `height`, `index`, from the tile that holds it.
pub fn subtree_from_tile(tile_hashes: &[Hash], first: usize, count: usize) -> Option<Hash> {
    tile_hashes
        .get(first..first.checked_add(count)?)
        .map(perfect_root)
}

/// MTH(D[lo:hi]) for a range aligned as in RFC 6962's recursion, from complete subtrees.
fn range_hash<E>(
    lo: u64,
    hi: u64,
    get: &mut (impl FnMut(u32, u64) -> Result<Hash, E> + ?Sized),
) -> Result<Hash, E> {
    let mut parts: Vec<Hash> = vec![];
    let mut at = lo;
    while at < hi {
        let mut h = 0u32;
        while h < 63 && at % (1u64 << (h + 1)) == 0 && at + (1u64 << (h + 1)) <= hi {
            h += 1;
        }
        parts.push(get(h, at >> h)?);
        at += 1u64 << h;
    }
    let mut it = parts.into_iter().rev();
    let Some(mut acc) = it.next() else {
        return Ok(empty_root());
    };
    for left in it {
        acc = node_hash(&left, &acc);
    }
    Ok(acc)
}

fn split(n: u64) -> u64 {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The RFC 6962 root of the first `size` leaves, from complete subtrees.
pub fn root<E>(
    size: u64,
    get: &mut (impl FnMut(u32, u64) -> Result<Hash, E> + ?Sized),
) -> Result<Hash, E> {
    range_hash(0, size, get)
}

/// PATH(index, D[0:size]) (RFC 6962 §2.1.1); `get(height, i)` returns complete subtree hashes.
pub fn inclusion_proof<E>(
    index: u64,
    size: u64,
    get: &mut (impl FnMut(u32, u64) -> Result<Hash, E> + ?Sized),
) -> Result<Vec<Hash>, E> {
    let mut out = vec![];
    let (mut lo, mut hi) = (0u64, size);
    let mut siblings = vec![];
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            siblings.push((lo + k, hi));
            hi = lo + k;
        } else {
            siblings.push((lo, lo + k));
            lo += k;
        }
    }
    for (a, b) in siblings.into_iter().rev() {
        out.push(range_hash(a, b, get)?);
    }
    Ok(out)
}

/// PROOF(old, D[0:new]) (RFC 6962 §2.1.2), for 0 < old <= new.
pub fn consistency_proof<E>(
    old: u64,
    new: u64,
    get: &mut (impl FnMut(u32, u64) -> Result<Hash, E> + ?Sized),
) -> Result<Vec<Hash>, E> {
    let mut out_rev: Vec<(u64, u64)> = vec![];
    let (mut lo, mut hi, mut complete) = (0u64, new, true);
    let m = old;
    loop {
        if m == hi {
            if !complete {
                out_rev.push((lo, hi));
            }
            break;
        }
        if hi - lo <= 1 {
            break;
        }
        let k = split(hi - lo);
        if m <= lo + k {
            out_rev.push((lo + k, hi));
            hi = lo + k;
        } else {
            out_rev.push((lo, lo + k));
            lo += k;
            complete = false;
        }
    }
    let mut out = vec![];
    for (a, b) in out_rev.into_iter().rev() {
        out.push(range_hash(a, b, get)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| crate::leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    /// Integrates `n` leaves in uneven batches into a tile store; returns it and the builder.
    fn build(n: u64, batch: usize) -> (BTreeMap<(u32, u64), Vec<Hash>>, Tiles) {
        let l = leaves(n);
        let mut store: BTreeMap<(u32, u64), Vec<Hash>> = BTreeMap::new();
        let mut t = Tiles::new();
        for chunk in l.chunks(batch.max(1)) {
            for (level, index, hashes) in t.append(chunk.iter().copied()) {
                let slot = store.entry((level, index)).or_default();
                assert!(hashes.starts_with(slot), "a tile only grows");
                *slot = hashes;
            }
        }
        (store, t)
    }

    fn getter(
        store: &BTreeMap<(u32, u64), Vec<Hash>>,
    ) -> impl FnMut(u32, u64) -> Result<Hash, String> + '_ {
        |h, i| {
            let (level, tile, first, count) = locate(h, i);
            let t = store.get(&(level, tile)).ok_or("no tile")?;
            subtree_from_tile(t, first, count).ok_or_else(|| "tile too narrow".to_string())
        }
    }

    #[test]
    fn tiled_roots_and_proofs_match_the_in_memory_tree() {
        for (n, batch) in [
            (1u64, 1usize),
            (255, 7),
            (256, 256),
            (257, 1),
            (70_000, 999),
        ] {
            let (store, t) = build(n, batch);
            let l = leaves(n);
            assert_eq!(t.root(), crate::merkle::root(&l), "n={n}");
            assert_eq!(root(n, &mut getter(&store)).unwrap(), t.root());
            for size in [1, n / 3 + 1, n] {
                let size = size.min(n);
                let prefix = &l[..size as usize];
                assert_eq!(
                    root(size, &mut getter(&store)).unwrap(),
                    crate::merkle::root(prefix)
                );
                for idx in [0, size / 2, size - 1] {
                    assert_eq!(
                        inclusion_proof(idx, size, &mut getter(&store)).unwrap(),
                        crate::merkle::inclusion_proof(prefix, idx as usize).unwrap(),
                        "n={n} size={size} idx={idx}"
                    );
                }
                for old in [1, size / 2 + 1, size] {
                    let old = old.min(size);
                    assert_eq!(
                        consistency_proof(old, size, &mut getter(&store)).unwrap(),
                        crate::merkle::consistency_proof(prefix, old as usize).unwrap(),
                        "n={n} size={size} old={old}"
                    );
                }
            }
        }
    }

    #[test]
    fn resumes_from_stored_partial_tiles() {
        let (store, t) = build(70_001, 333);
        let resumed = Tiles::resume(70_001, |l, i| store.get(&(l, i)).cloned()).unwrap();
        assert_eq!(resumed, t);
        // Continue from the resumed edge and compare with building it all at once.
        let mut a = resumed;
        let mut b = t;
        let more: Vec<Hash> = leaves(70_600).split_off(70_001);
        assert_eq!(a.append(more.clone()), b.append(more));
        assert_eq!(a.root(), crate::merkle::root(&leaves(70_600)));
        assert!(Tiles::resume(70_001, |_, _| None).is_none());
    }

    #[test]
    fn precomputed_level0_roots_give_the_same_tree() {
        let l = leaves(5_000);
        let roots: Vec<Hash> = l
            .chunks(WIDTH)
            .filter(|c| c.len() == WIDTH)
            .map(perfect_root)
            .collect();
        let mut a = Tiles::new();
        let mut b = Tiles::new();
        for (x, y) in [(0, 700), (700, 701), (701, 5_000)] {
            let ua = a.append(l[x..y].iter().copied());
            let ub = b.append_with(l[x..y].iter().copied(), &|i| roots.get(i as usize).copied());
            assert_eq!(ua, ub);
        }
        assert_eq!(a.root(), b.root());
        // A wrong precomputed root changes the tree: the caller's roots are not trusted blindly
        // by verification, which compares the result with signed checkpoints.
        let mut c = Tiles::new();
        c.append_with(l.iter().copied(), &|i| (i == 3).then_some([7u8; 32]));
        assert_ne!(c.root(), a.root());
    }
}

/// Concatenated 32-byte hashes, as a stored tile holds them.
pub fn hashes_to_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

/// A stored tile's bytes as hashes (a trailing partial hash is ignored).
pub fn hashes_from_bytes(b: &[u8]) -> Vec<Hash> {
    b.chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

/// What a C2SP tlog-tiles path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileRef {
    /// A hash tile: level (in tiles of height 8), index, width if partial.
    Hashes {
        level: u32,
        index: u64,
        width: Option<u64>,
    },
    /// An entry bundle: index, width if partial.
    Entries { index: u64, width: Option<u64> },
}

impl TileRef {
    /// Parses `L/N[.p/W]` or `entries/N[.p/W]`, N written in 3-digit path elements with
    /// `x` before all but the last (C2SP tlog-tiles).
    pub fn parse(path: &str) -> Option<TileRef> {
        let mut parts: Vec<&str> = path.split('/').collect();
        let first = *parts.first()?;
        let width = match parts.len() {
            n if n >= 3 && parts.get(n - 2).is_some_and(|p| p.ends_with(".p")) => {
                let w: u64 = parts.last()?.parse().ok()?;
                if !(1..=255).contains(&w) || parts.last()?.starts_with('0') {
                    return None;
                }
                parts.pop();
                let last = parts.pop()?;
                parts.push(last.strip_suffix(".p")?);
                Some(w)
            }
            _ => None,
        };
        let idx_parts = parts.get(1..)?;
        if idx_parts.is_empty() {
            return None;
        }
        let mut index: u64 = 0;
        for (i, p) in idx_parts.iter().enumerate() {
            let digits = if i + 1 < idx_parts.len() {
                p.strip_prefix('x')?
            } else {
                p
            };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Canonical form only: no leading `x000` group (`entries/x000/000` is
            // `entries/000` written twice; two paths for one tile would be two cache
            // entries, and C2SP tlog-tiles names each tile once).
            if i == 0 && idx_parts.len() > 1 && digits == "000" {
                return None;
            }
            index = index.checked_mul(1000)?.checked_add(digits.parse().ok()?)?;
        }
        if first == "entries" {
            return Some(TileRef::Entries { index, width });
        }
        let level: u32 = first
            .parse()
            .ok()
            .filter(|l| *l < 64 && !(first.len() > 1 && first.starts_with('0')))?;
        Some(TileRef::Hashes {
            level,
            index,
            width,
        })
    }
}

#[cfg(test)]
mod tile_tests {
    use super::TileRef;

    #[test]
    fn tile_paths_with_a_leading_zero_group_are_not_canonical() {
        // Found by `fuzz_tile_paths_never_panic`.
        for bad in ["entries/x000/000", "0/x000/x001/234", "1/x000/005.p/3"] {
            assert_eq!(TileRef::parse(bad), None, "{bad}");
        }
        assert!(TileRef::parse("0/x001/000").is_some());
        assert!(TileRef::parse("entries/000").is_some());
    }

    #[test]
    fn tile_paths() {
        assert_eq!(
            TileRef::parse("0/000"),
            Some(TileRef::Hashes {
                level: 0,
                index: 0,
                width: None
            })
        );
        assert_eq!(
            TileRef::parse("1/x001/x234/067"),
            Some(TileRef::Hashes {
                level: 1,
                index: 1_234_067,
                width: None
            })
        );
        assert_eq!(
            TileRef::parse("0/001.p/17"),
            Some(TileRef::Hashes {
                level: 0,
                index: 1,
                width: Some(17)
            })
        );
        assert_eq!(
            TileRef::parse("entries/000.p/5"),
            Some(TileRef::Entries {
                index: 0,
                width: Some(5)
            })
        );
        for bad in [
            "",
            "0",
            "0/1",
            "0/0001",
            "x/000",
            "0/000.p/0",
            "0/000.p/256",
            "0/001/002",
            "00/000",
            "0/000.p/05",
            "0/../000",
        ] {
            assert_eq!(TileRef::parse(bad), None, "{bad}");
        }
    }
}
