//! The tiled log as a server keeps it: the right edge of the Merkle tree (C2SP tlog-tiles,
//! height 8), integrated as entries arrive and resumed from stored tiles after a restart;
//! signed checkpoints (C2SP tlog-checkpoint in a signed note); proofs read from stored
//! tiles (RFC 6962 / RFC 9162); the tiles and entry bundles a verifier fetches; witness
//! cosignatures (C2SP tlog-cosignature).
//!
//! What is stored, and where, is the gate's: it implements [`TileStore`] over its store and
//! persists what this module decides. Who may ask for what is the policy engine's.
//! INVARIANT: nothing is signed over a tree whose root differs from the last signed root's
//! extension — a server that finds its stored edge disagreeing with its last checkpoint
//! signs nothing more.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::merkle::Hash;
use crate::note::{checkpoint_text, parse_checkpoint, NoteSigner, NoteVerifier};
use crate::tiles::{self, hashes_from_bytes, hashes_to_bytes, TileRef, Tiles};
use crate::verify::CHUNK;

/// Tile updates are stored in groups of this many while catching up a large backlog.
const TILE_FLUSH: usize = 256;

/// Why the log could not answer (beside the store's own errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The request is outside what the log holds or has signed (the caller's to fix).
    #[error("{0}")]
    OutOfRange(String),
    /// No such tile or bundle in the latest signed tree.
    #[error("not found")]
    NotFound,
    /// The note is not a checkpoint this log signed and stored.
    #[error("{0}")]
    NotOurs(String),
    /// Stored evidence disagrees with itself: a gap, a missing tile, an edge that does not
    /// give the signed root, a checkpoint that does not verify.
    #[error("{0}")]
    Broken(String),
}

/// A tile's new contents: `(level, index, concatenated hashes)`.
pub type TileWrite = (u32, u64, Vec<u8>);

/// What the log reads and writes of the gate's storage. `E` is the gate's error.
pub trait TileStore {
    type Error: From<LogError>;
    /// Number of entries in the log.
    fn size(&self) -> Result<u64, Self::Error>;
    /// `(seq, canonical record)` of entries `start <= seq < end`, in order.
    fn records(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, Self::Error>;
    /// Stored tiles of `level` with these indexes (those that exist).
    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, Self::Error>;
    /// The stored checkpoint of exactly `size` entries, or the latest when `None`.
    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, Self::Error>;
    /// Stores tiles and, when given, a signed checkpoint `(size, note)`, in one transaction.
    fn put(
        &self,
        tiles: Vec<TileWrite>,
        checkpoint: Option<(u64, String)>,
    ) -> Result<(), Self::Error>;
    /// Appends witness cosignature lines to the stored checkpoint of `size`.
    fn cosign(&self, size: u64, lines: Vec<String>) -> Result<(), Self::Error>;
}

/// One server's view of the log: its signing key, origin, and the tree's right edge as of
/// its last checkpoint.
pub struct TiledLog {
    signer: NoteSigner,
    origin: String,
    edge: Mutex<Tiles>,
}

impl TiledLog {
    /// A log named `origin` (the checkpoint's first line), signed with `signer`.
    pub fn new(origin: String, signer: NoteSigner) -> Self {
        TiledLog {
            signer,
            origin,
            edge: Mutex::new(Tiles::new()),
        }
    }

    /// The checkpoint verifier key (C2SP note verifier-key form).
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The log's origin line.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn verifier(&self) -> Result<NoteVerifier, LogError> {
        NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| LogError::Broken(e.to_string()))
    }

    /// The root signed in one of this log's checkpoints (signature checked).
    fn signed_root(&self, note: &str, size: u64) -> Result<Hash, LogError> {
        self.verifier()?
            .verify(note)
            .and_then(parse_checkpoint)
            .ok()
            .filter(|(origin, s, _)| *origin == self.origin && *s == size)
            .map(|(_, _, root)| root)
            .ok_or_else(|| {
                LogError::Broken(format!(
                    "the stored checkpoint of size {size} is not validly signed; run `medvault audit verify`"
                ))
            })
    }

    /// Integrates entries `[t.size(), end)` into `t`, storing changed tiles in groups;
    /// returns the tile writes not yet stored.
    fn integrate<S: TileStore>(
        &self,
        s: &S,
        t: &mut Tiles,
        end: u64,
    ) -> Result<Vec<TileWrite>, S::Error> {
        let mut pending: BTreeMap<(u32, u64), Vec<Hash>> = BTreeMap::new();
        while t.size() < end {
            let rows = s.records(t.size(), end.min(t.size().saturating_add(CHUNK)))?;
            if rows.is_empty() {
                return Err(LogError::Broken("audit log has a gap".into()).into());
            }
            let mut leaves = Vec::with_capacity(rows.len());
            for (i, (seq, record)) in rows.iter().enumerate() {
                if *seq != t.size() + i as u64 {
                    return Err(LogError::Broken("audit log has a gap".into()).into());
                }
                leaves.push(crate::record_leaf(record));
            }
            for (level, index, hashes) in t.append(leaves) {
                pending.insert((level, index), hashes);
            }
            if pending.len() >= TILE_FLUSH {
                s.put(writes(std::mem::take(&mut pending)), None)?;
            }
        }
        Ok(writes(pending))
    }

    /// The tiled tree at the latest checkpoint `(size, note)`: resumed from the stored right
    /// edge, or rebuilt from the entries when tiles are missing (a log from before tiles).
    /// Either way its root must equal the signed one, or nothing more is signed.
    fn tree_at<S: TileStore>(
        &self,
        s: &S,
        latest: Option<&(u64, String)>,
    ) -> Result<Tiles, S::Error> {
        let Some((size, note)) = latest else {
            return Ok(Tiles::new());
        };
        let signed = self.signed_root(note, *size)?;
        let mut failed = None;
        let resumed = Tiles::resume(*size, |level, index| match s.tiles_at(level, &[index]) {
            Ok(v) => v.into_iter().next().map(|(_, b)| hashes_from_bytes(&b)),
            Err(e) => {
                failed = Some(e);
                None
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let t = match resumed {
            Some(t) => t,
            None => {
                let mut t = Tiles::new();
                let ops = self.integrate(s, &mut t, *size)?;
                if t.root() == signed {
                    s.put(ops, None)?;
                }
                t
            }
        };
        if t.root() != signed {
            return Err(LogError::Broken(format!(
                "the audit tree no longer matches the checkpoint signed at size {size}; \
                 nothing more is signed; run `medvault audit verify`"
            ))
            .into());
        }
        Ok(t)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tiles>, LogError> {
        self.edge
            .lock()
            .map_err(|_| LogError::Broken("tree lock poisoned".into()))
    }

    /// Brings the right edge to the latest stored checkpoint (another server may have
    /// signed since ours) and returns that checkpoint's size.
    fn sync<S: TileStore>(&self, s: &S, tree: &mut Tiles) -> Result<u64, S::Error> {
        let latest = s.checkpoint(None)?;
        let size = latest.as_ref().map(|l| l.0).unwrap_or(0);
        if tree.size() != size {
            *tree = self.tree_at(s, latest.as_ref())?;
        }
        Ok(size)
    }

    /// Size of the latest signed checkpoint (the edge brought up to it).
    pub fn signed_size<S: TileStore>(&self, s: &S) -> Result<u64, S::Error> {
        let mut tree = self.lock()?;
        self.sync(s, &mut tree)
    }

    /// Integrates new entries into the stored tiles and signs and stores a checkpoint if
    /// the log grew since the last one. Returns the new checkpoint's size and note.
    pub fn sign<S: TileStore>(&self, s: &S) -> Result<Option<(u64, String)>, S::Error> {
        let mut tree = self.lock()?;
        let signed = self.sync(s, &mut tree)?;
        let n = s.size()?;
        if n == 0 || n <= signed {
            return Ok(None);
        }
        let mut fresh = tree.clone();
        let ops = self.integrate(s, &mut fresh, n)?;
        let note = self
            .signer
            .sign(&checkpoint_text(&self.origin, n, &fresh.root()));
        s.put(ops, Some((n, note.clone())))?;
        *tree = fresh;
        Ok(Some((n, note)))
    }

    /// Runs `walk` over complete-subtree hashes read from stored tiles. The walk's reads
    /// depend only on indexes and sizes, never on hash values, so a first pass records which
    /// tiles it needs, those are fetched in one query per level, and a second pass computes.
    fn with_tiles<S: TileStore, T>(
        &self,
        s: &S,
        walk: impl Fn(&mut dyn FnMut(u32, u64) -> Result<Hash, LogError>) -> Result<T, LogError>,
    ) -> Result<T, S::Error> {
        let mut needed: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        walk(&mut |height, index| {
            let (level, tile, _, _) = tiles::locate(height, index);
            let at = needed.entry(level).or_default();
            if !at.contains(&tile) {
                at.push(tile);
            }
            Ok([0u8; 32])
        })?;
        let mut loaded: HashMap<(u32, u64), Vec<Hash>> = HashMap::new();
        for (level, indexes) in needed {
            for (index, bytes) in s.tiles_at(level, &indexes)? {
                loaded.insert((level, index), hashes_from_bytes(&bytes));
            }
        }
        Ok(walk(&mut |height, index| {
            let (level, tile, first, count) = tiles::locate(height, index);
            loaded
                .get(&(level, tile))
                .and_then(|t| tiles::subtree_from_tile(t, first, count))
                .ok_or_else(|| LogError::Broken(format!("hash tile {level}/{tile} is missing")))
        })?)
    }

    /// `(leaf hash, proof, root)`: RFC 6962 inclusion of entry `index` in the tree of
    /// `size`, from stored tiles; the tiles must cover `size` (see [`TiledLog::sign`]).
    pub fn inclusion_proof<S: TileStore>(
        &self,
        s: &S,
        index: u64,
        size: u64,
    ) -> Result<(Hash, Vec<Hash>, Hash), S::Error> {
        self.with_tiles(s, |get| {
            let leaf = get(0, index)?;
            let proof = tiles::inclusion_proof(index, size, get)?;
            let root = tiles::root(size, get)?;
            Ok((leaf, proof, root))
        })
    }

    /// `(proof, old root, new root)`: RFC 6962 consistency between the trees of `old` and
    /// `new` entries, from stored tiles.
    pub fn consistency_proof<S: TileStore>(
        &self,
        s: &S,
        old: u64,
        new: u64,
    ) -> Result<(Vec<Hash>, Hash, Hash), S::Error> {
        self.with_tiles(s, |get| {
            Ok((
                tiles::consistency_proof(old, new, get)?,
                tiles::root(old, get)?,
                tiles::root(new, get)?,
            ))
        })
    }

    /// The bytes of a hash tile or entry bundle of the latest checkpointed tree, cut to the
    /// width asked for; [`LogError::NotFound`] when that tree does not (yet) hold it.
    pub fn tile<S: TileStore>(&self, s: &S, t: TileRef) -> Result<Vec<u8>, S::Error> {
        let size = s.checkpoint(None)?.map(|(n, _)| n).unwrap_or(0);
        let (level, index, width) = match t {
            TileRef::Hashes {
                level,
                index,
                width,
            } => (level, index, width),
            TileRef::Entries { index, width } => (0, index, width),
        };
        let full = tiles::WIDTH as u64;
        let first = index.checked_mul(full).ok_or(LogError::NotFound)?;
        let available = tiles::count_at(size, level).saturating_sub(first).min(full);
        let want = width.unwrap_or(full);
        if available == 0 || want > available || (width.is_none() && available < full) {
            return Err(LogError::NotFound.into());
        }
        let want = usize::try_from(want).map_err(|_| LogError::NotFound)?;
        if let TileRef::Entries { .. } = t {
            let rows = s.records(first, first + want as u64)?;
            if rows.len() != want {
                return Err(LogError::Broken("audit log has a gap".into()).into());
            }
            let mut out = Vec::with_capacity(want * 34);
            for (_, record) in rows {
                out.extend_from_slice(&32u16.to_be_bytes());
                out.extend_from_slice(&crate::commitment(&record));
            }
            return Ok(out);
        }
        match s.tiles_at(level, &[index])?.into_iter().next() {
            Some((_, bytes)) if bytes.len() >= want * 32 => {
                Ok(bytes.get(..want * 32).unwrap_or_default().to_vec())
            }
            _ => Err(LogError::Broken(format!("hash tile {level}/{index} is missing")).into()),
        }
    }

    /// Accepts a witness's cosigned copy of one of this log's checkpoints: the note must
    /// carry this log's valid signature over a checkpoint it stored; the other signature
    /// lines are appended to the stored checkpoint. Returns how many were added.
    pub fn cosign<S: TileStore>(&self, s: &S, note: &str) -> Result<usize, S::Error> {
        let text = self
            .verifier()?
            .verify(note)
            .map_err(|_| LogError::NotOurs("not a checkpoint signed by this log".into()))?;
        let (origin, size, _) =
            parse_checkpoint(text).map_err(|e| LogError::NotOurs(e.to_string()))?;
        let stored = s
            .checkpoint(Some(size))?
            .map(|(_, n)| n)
            .ok_or(LogError::NotFound)?;
        if origin != self.origin || !stored.starts_with(text) {
            return Err(
                LogError::NotOurs("checkpoint does not match the stored one".into()).into(),
            );
        }
        let own = format!("\u{2014} {} ", self.origin);
        let lines: Vec<String> = note
            .get(text.len() + 1..)
            .unwrap_or("")
            .lines()
            .filter(|l| l.starts_with('\u{2014}') && !l.starts_with(&own) && l.len() < 400)
            .map(|l| format!("{l}\n"))
            .collect();
        let n = lines.len();
        s.cosign(size, lines)?;
        Ok(n)
    }
}

fn writes(pending: BTreeMap<(u32, u64), Vec<Hash>>) -> Vec<TileWrite> {
    pending
        .into_iter()
        .map(|((level, index), hashes)| (level, index, hashes_to_bytes(&hashes)))
        .collect()
}

/// A hash (or any bytes) in standard base64, as the JSON proofs carry them.
pub fn b64(h: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(h)
}

/// `GET /api/audit/proof/inclusion`: entry `index`'s inclusion in the tree of `size`
/// entries (RFC 6962 §2.1.1), hashes in base64.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InclusionProof {
    pub index: u64,
    pub size: u64,
    pub leaf_hash: String,
    pub root: String,
    pub proof: Vec<String>,
}

impl InclusionProof {
    pub fn new(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> Self {
        InclusionProof {
            index,
            size,
            leaf_hash: b64(leaf),
            root: b64(root),
            proof: proof.iter().map(|h| b64(h)).collect(),
        }
    }
}

/// `GET /api/audit/proof/consistency`: the tree of `old` entries is a prefix of the tree of
/// `new` (RFC 6962 §2.1.2), hashes in base64.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsistencyProof {
    pub old: u64,
    pub new: u64,
    pub old_root: String,
    pub new_root: String,
    pub proof: Vec<String>,
}

impl ConsistencyProof {
    pub fn new(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> Self {
        ConsistencyProof {
            old,
            new,
            old_root: b64(old_root),
            new_root: b64(new_root),
            proof: proof.iter().map(|h| b64(h)).collect(),
        }
    }
}
