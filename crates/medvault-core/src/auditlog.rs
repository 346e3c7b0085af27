//! The verifiable audit log: checkpoints signed over the Merkle tree, the tree stored as
//! C2SP tlog-tiles as it grows, proofs read from those tiles, full verification, and the
//! transparency views (who may see commitments, who may see records).

use std::collections::{BTreeMap, HashMap};

use medvault_audit::merkle::Hash;
use medvault_audit::tiles::{self, Tiles};
use medvault_audit::AuditRecord;
use medvault_store::{Op, WriteBatch};
use medvault_types::Role;

use crate::{Caller, Outcome, Vault, VaultError};

/// The outcome of recomputing the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditVerdict {
    /// Every entry is present, in sequence, canonical, and matches its leaf hash.
    Intact {
        size: u64,
        root: [u8; 32],
        checkpoints: usize,
    },
    /// The first entry found wrong, and what is wrong with it.
    Broken { index: u64, problem: String },
}

/// Tile updates are committed in groups of this many while catching up a large backlog.
const TILE_FLUSH: usize = 256;
/// Entries read per round trip when integrating or verifying (a whole number of tiles, so
/// chunks start at tile boundaries).
const CHUNK: u64 = 256 * 256;

fn to_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

fn from_bytes(b: &[u8]) -> Vec<Hash> {
    b.chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

impl Vault {
    /// The log's checkpoint verifier key (C2SP note verifier-key form).
    pub fn audit_verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The root signed in one of this log's checkpoints (signature checked).
    fn signed_root(&self, note: &str, size: u64) -> Result<Hash, VaultError> {
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        verifier
            .verify(note)
            .and_then(medvault_audit::note::parse_checkpoint)
            .ok()
            .filter(|(origin, s, _)| *origin == self.origin && *s == size)
            .map(|(_, _, root)| root)
            .ok_or_else(|| {
                VaultError::Internal(format!(
                    "the stored checkpoint of size {size} is not validly signed; run `medvault audit verify`"
                ))
            })
    }

    /// Integrates entries `[t.size(), end)` into `t`, committing changed tiles in groups;
    /// returns the tile writes not yet committed.
    fn integrate(&self, t: &mut Tiles, end: u64) -> Result<Vec<Op>, VaultError> {
        let mut pending: BTreeMap<(u32, u64), Vec<Hash>> = BTreeMap::new();
        while t.size() < end {
            let rows = self
                .store
                .audit_range(t.size(), end.min(t.size().saturating_add(CHUNK)))?;
            if rows.is_empty() {
                return Err(VaultError::Internal("audit log has a gap".into()));
            }
            let mut leaves = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter().enumerate() {
                if r.seq != t.size() + i as u64 {
                    return Err(VaultError::Internal("audit log has a gap".into()));
                }
                leaves.push(medvault_audit::record_leaf(&r.record));
            }
            for (level, index, hashes) in t.append(leaves) {
                pending.insert((level, index), hashes);
            }
            if pending.len() >= TILE_FLUSH {
                let ops = tile_ops(std::mem::take(&mut pending));
                self.store.commit(WriteBatch { ops, audit: vec![] })?;
            }
        }
        Ok(tile_ops(pending))
    }

    /// The tiled tree at the latest checkpoint `(size, note)`: resumed from the stored right
    /// edge, or rebuilt from the entries when tiles are missing (a log from before tiles).
    /// Either way its root must equal the signed one, or nothing more is signed.
    fn tree_at(&self, latest: Option<&(u64, String)>) -> Result<Tiles, VaultError> {
        let Some((size, note)) = latest else {
            return Ok(Tiles::new());
        };
        let signed = self.signed_root(note, *size)?;
        let mut failed = None;
        let resumed = Tiles::resume(*size, |level, index| {
            match self.store.tiles(level, index, index + 1) {
                Ok(v) => v.into_iter().next().map(|(_, b)| from_bytes(&b)),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        let t = match resumed {
            Some(t) => t,
            None => {
                let mut t = Tiles::new();
                let ops = self.integrate(&mut t, *size)?;
                if t.root() == signed {
                    self.store.commit(WriteBatch { ops, audit: vec![] })?;
                }
                t
            }
        };
        if t.root() != signed {
            return Err(VaultError::Internal(format!(
                "the audit tree no longer matches the checkpoint signed at size {size}; \
                 nothing more is signed; run `medvault audit verify`"
            )));
        }
        Ok(t)
    }

    /// Brings this server's copy of the tree's right edge to the latest stored checkpoint
    /// (resuming from tiles, or rebuilding them from the entries if they are missing).
    /// Returns that checkpoint's size.
    fn sync_tree(&self, tree: &mut Tiles) -> Result<u64, VaultError> {
        let latest = self.store.checkpoint(None)?;
        let s = latest.as_ref().map(|l| l.0).unwrap_or(0);
        if tree.size() != s {
            // First use since start, or another server signed since our last checkpoint.
            *tree = self.tree_at(latest.as_ref())?;
        }
        Ok(s)
    }

    fn lock_tree(&self) -> Result<std::sync::MutexGuard<'_, Tiles>, VaultError> {
        self.tiles
            .lock()
            .map_err(|_| VaultError::Internal("tree lock poisoned".into()))
    }

    /// Integrates new entries into the stored tiles, signs a checkpoint of the log if it
    /// grew since the last one, and stores both. Returns the new checkpoint's size and note.
    pub fn checkpoint(&self) -> Result<Option<(u64, String)>, VaultError> {
        let mut tree = self.lock_tree()?;
        let s = self.sync_tree(&mut tree)?;
        let n = self.store.audit_len()?;
        if n == 0 || n <= s {
            return Ok(None);
        }
        let mut fresh = tree.clone();
        let mut ops = self.integrate(&mut fresh, n)?;
        let note = self.signer.sign(&medvault_audit::note::checkpoint_text(
            &self.origin,
            n,
            &fresh.root(),
        ));
        ops.push(Op::PutCheckpoint {
            size: n,
            note: note.clone(),
        });
        self.store.commit(WriteBatch { ops, audit: vec![] })?;
        *tree = fresh;
        Ok(Some((n, note)))
    }

    /// Makes sure the stored tiles cover `want` entries: the latest checkpoint does, or, for
    /// an authenticated reader (whose request is itself audited), one is signed now.
    /// Anonymous callers (public transparency) get proofs within signed trees only, so they
    /// cannot make the server sign on demand.
    fn covered(&self, c: Option<&Caller>, want: u64) -> Result<(), VaultError> {
        let s = {
            let mut tree = self.lock_tree()?;
            self.sync_tree(&mut tree)?
        };
        if s >= want {
            return Ok(());
        }
        if c.is_none() {
            return Err(VaultError::BadRequest(format!(
                "the latest signed checkpoint covers {s} entries; ask within it"
            )));
        }
        self.checkpoint()?;
        Ok(())
    }

    /// Runs `walk` over complete-subtree hashes read from stored tiles. The walk's reads
    /// depend only on indexes and sizes, never on hash values, so a first pass records which
    /// tiles it needs, those are fetched in one query per level, and a second pass computes.
    fn with_tiles<T>(
        &self,
        walk: impl Fn(&mut dyn FnMut(u32, u64) -> Result<Hash, VaultError>) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
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
            for (index, bytes) in self.store.tiles_at(level, &indexes)? {
                loaded.insert((level, index), from_bytes(&bytes));
            }
        }
        walk(&mut |height, index| {
            let (level, tile, first, count) = tiles::locate(height, index);
            loaded
                .get(&(level, tile))
                .and_then(|t| tiles::subtree_from_tile(t, first, count))
                .ok_or_else(|| VaultError::Internal(format!("hash tile {level}/{tile} is missing")))
        })
    }

    /// Inclusion proof and root from the stored tiles (no access check, no audit record).
    pub(crate) fn prove_inclusion(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(Hash, Vec<Hash>, Hash), VaultError> {
        self.with_tiles(|get| {
            let leaf = get(0, index)?;
            let proof = tiles::inclusion_proof(index, size, get)?;
            let root = tiles::root(size, get)?;
            Ok((leaf, proof, root))
        })
    }

    /// Recomputes every leaf hash, the Merkle tree and its tiles from the whole audit log,
    /// streaming it (every core reads and hashes its own chunks; this thread folds them into
    /// the tree in order), and checks
    /// every stored checkpoint (its signature, and that the tree of that size still has the
    /// signed root) and every stored hash tile. Reports the first entry (or range) found
    /// wrong. Entries no checkpoint covers yet are also checked to be canonical records;
    /// covered ones are when their checkpoint does not match, to name the entry.
    pub fn verify_audit(&self, progress: &dyn Fn(u64, u64)) -> Result<AuditVerdict, VaultError> {
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut checkpoints: Vec<(u64, Hash)> = vec![];
        for (size, note) in self.store.checkpoints()? {
            let parsed = verifier
                .verify(&note)
                .and_then(medvault_audit::note::parse_checkpoint)
                .ok()
                .filter(|(origin, s, _)| *origin == self.origin && *s == size);
            match parsed {
                Some((_, s, root)) => checkpoints.push((s, root)),
                None => {
                    let problem = format!(
                        "the checkpoint of size {size} is not validly signed by this log's key"
                    );
                    return Ok(AuditVerdict::Broken {
                        index: size,
                        problem,
                    });
                }
            }
        }
        checkpoints.sort_by_key(|c| c.0);
        let covered = checkpoints.last().map(|c| c.0).unwrap_or(0);
        let total = self.store.audit_len()?;
        // Every core reads and hashes its own chunks (chunk k on reader k mod R); this thread
        // takes them in order and folds them into the tree.
        let readers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8) as u64;
        let chunks = total.div_ceil(CHUNK);
        std::thread::scope(|scope| {
            let mut inbox = vec![];
            for r in 0..readers {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Scanned, VaultError>>(1);
                inbox.push(rx);
                let spawned = std::thread::Builder::new()
                    .name("audit-verify".into())
                    .spawn_scoped(scope, move || {
                        let mut k = r;
                        while k < chunks {
                            let from = k * CHUNK;
                            let scanned = self.scan_chunk(from, (from + CHUNK).min(total), covered);
                            let failed = scanned.is_err();
                            if tx.send(scanned).is_err() || failed {
                                return;
                            }
                            k += readers;
                        }
                    });
                if spawned.is_err() {
                    return Err(VaultError::Internal(
                        "cannot start a verification thread".into(),
                    ));
                }
            }
            self.fold_chunks(&inbox, &checkpoints, covered, total, progress)
        })
    }

    /// Reads entries `[from, to)` and hashes them: leaves, the roots of complete level-0
    /// tiles (`from` is a tile boundary), and the first thing wrong, if any.
    fn scan_chunk(&self, from: u64, to: u64, covered: u64) -> Result<Scanned, VaultError> {
        let mut leaves: Vec<Hash> = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0));
        let mut problem: Option<(u64, String)> = None;
        let mut expected = from;
        self.store
            .audit_scan(from, to, &mut |seq, stored, record| {
                if seq != expected {
                    problem = Some((
                        expected,
                        format!("entry is missing (the next stored entry is {seq})"),
                    ));
                    return false;
                }
                let leaf = medvault_audit::record_leaf(record);
                if stored != leaf.as_slice() {
                    problem = Some((seq, "record does not match its leaf hash".into()));
                    return false;
                }
                if seq >= covered && !is_canonical(record) {
                    problem = Some((seq, "not a canonical audit record".into()));
                    return false;
                }
                leaves.push(leaf);
                expected += 1;
                true
            })?;
        if problem.is_none() && expected < to {
            problem = Some((expected, "entry is missing".into()));
        }
        let roots = leaves
            .chunks(tiles::WIDTH)
            .filter(|c| c.len() == tiles::WIDTH)
            .map(tiles::perfect_root)
            .collect();
        Ok(Scanned {
            leaves,
            roots,
            problem,
        })
    }

    fn fold_chunks(
        &self,
        inbox: &[std::sync::mpsc::Receiver<Result<Scanned, VaultError>>],
        checkpoints: &[(u64, Hash)],
        covered: u64,
        total: u64,
        progress: &dyn Fn(u64, u64),
    ) -> Result<AuditVerdict, VaultError> {
        let mut next_cp = checkpoints.iter().peekable();
        let mut last_good: u64 = 0;
        let mut tree = Tiles::new();
        let mut k = 0usize;
        while tree.size() < total {
            let got = inbox
                .get(k % inbox.len().max(1))
                .ok_or_else(|| VaultError::Internal("no audit reader".into()))?
                .recv();
            k += 1;
            let Ok(scanned) = got else {
                return Err(VaultError::Internal("audit reader stopped".into()));
            };
            let Scanned {
                leaves,
                roots,
                problem,
            } = scanned?;
            if let Some((index, problem)) = problem {
                // Entries before it in this chunk are fine, but checkpoints among them are
                // still checked first, so the earliest evidence is reported.
                let good = usize::try_from(index - tree.size()).unwrap_or(0);
                let v = self.fold(
                    &mut tree,
                    leaves.get(..good).unwrap_or(&leaves),
                    &roots,
                    &mut next_cp,
                    &mut last_good,
                )?;
                return Ok(v.unwrap_or(AuditVerdict::Broken { index, problem }));
            }
            if leaves.is_empty() {
                return Ok(AuditVerdict::Broken {
                    index: tree.size(),
                    problem: "entry is missing".into(),
                });
            }
            let before = tree.size();
            let mut updates: BTreeMap<(u32, u64), Vec<Hash>> = BTreeMap::new();
            if let Some(v) = self.fold_into(
                &mut tree,
                &leaves,
                &roots,
                &mut next_cp,
                &mut last_good,
                &mut updates,
            )? {
                return Ok(v);
            }
            debug_assert_eq!(tree.size(), before + leaves.len() as u64);
            if let Some(v) = self.compare_tiles(&updates, covered)? {
                return Ok(v);
            }
            progress(tree.size(), total);
        }
        if let Some(&&(size, _)) = next_cp.peek() {
            let problem = format!("the log was truncated: a signed checkpoint covers {size} entries, the log has {total}");
            return Ok(AuditVerdict::Broken {
                index: total,
                problem,
            });
        }
        Ok(AuditVerdict::Intact {
            size: tree.size(),
            root: tree.root(),
            checkpoints: checkpoints.len(),
        })
    }

    fn fold(
        &self,
        tree: &mut Tiles,
        leaves: &[Hash],
        roots: &[Hash],
        next_cp: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, Hash)>>,
        last_good: &mut u64,
    ) -> Result<Option<AuditVerdict>, VaultError> {
        let mut ignored = BTreeMap::new();
        self.fold_into(tree, leaves, roots, next_cp, last_good, &mut ignored)
    }

    /// Folds a chunk's leaves into the tree in order (its level-0 tile roots precomputed),
    /// stopping at every checkpoint size on the way to compare the signed root.
    fn fold_into(
        &self,
        tree: &mut Tiles,
        leaves: &[Hash],
        roots: &[Hash],
        next_cp: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, Hash)>>,
        last_good: &mut u64,
        updates: &mut BTreeMap<(u32, u64), Vec<Hash>>,
    ) -> Result<Option<AuditVerdict>, VaultError> {
        let first_tile = tree.size() / tiles::WIDTH as u64;
        let level0_root = |i: u64| {
            i.checked_sub(first_tile)
                .and_then(|k| roots.get(usize::try_from(k).ok()?).copied())
        };
        let mut rest = leaves;
        while !rest.is_empty() {
            let stop = match next_cp.peek() {
                Some(&&(size, _)) if size > tree.size() => usize::try_from(size - tree.size())
                    .unwrap_or(usize::MAX)
                    .min(rest.len()),
                _ => rest.len(),
            };
            let (now, later) = rest.split_at(stop);
            for (level, index, hashes) in tree.append_with(now.iter().copied(), &level0_root) {
                updates.insert((level, index), hashes);
            }
            rest = later;
            while let Some(&&(size, root)) = next_cp.peek() {
                if size != tree.size() {
                    break;
                }
                if tree.root() != root {
                    return self.diagnose(*last_good, size).map(Some);
                }
                *last_good = size;
                next_cp.next();
            }
        }
        Ok(None)
    }

    /// Entries `[from, to)` do not give the root signed at `to`: name a non-canonical
    /// entry among them if there is one, else the range.
    fn diagnose(&self, from: u64, to: u64) -> Result<AuditVerdict, VaultError> {
        let mut at = from;
        while at < to {
            let rows = self
                .store
                .audit_range(at, to.min(at.saturating_add(CHUNK)))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if !is_canonical(&r.record) {
                    return Ok(AuditVerdict::Broken {
                        index: r.seq,
                        problem: "not a canonical audit record".into(),
                    });
                }
                at = r.seq + 1;
            }
        }
        let problem = format!(
            "entries {from}..{to} do not match the checkpoint signed at size {to} (edited, reordered or replaced)"
        );
        Ok(AuditVerdict::Broken {
            index: from,
            problem,
        })
    }

    /// Compares recomputed tiles with the stored ones: each stored tile must agree with the
    /// recomputed hashes, and every tile the latest checkpoint (`covered` entries) needs must
    /// be there, or proofs would be served from a tree other than the log.
    fn compare_tiles(
        &self,
        updates: &BTreeMap<(u32, u64), Vec<Hash>>,
        covered: u64,
    ) -> Result<Option<AuditVerdict>, VaultError> {
        let mut by_level: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for &(level, index) in updates.keys() {
            let e = by_level.entry(level).or_insert((index, index));
            e.0 = e.0.min(index);
            e.1 = e.1.max(index);
        }
        for (level, (lo, hi)) in by_level {
            let stored: HashMap<u64, Vec<u8>> =
                self.store.tiles(level, lo, hi + 1)?.into_iter().collect();
            for index in lo..=hi {
                let Some(computed) = updates.get(&(level, index)) else {
                    continue;
                };
                let need = tiles::count_at(covered, level)
                    .saturating_sub(index * tiles::WIDTH as u64)
                    .min(computed.len() as u64) as usize;
                let first_leaf = |pos: u64| ((index * tiles::WIDTH as u64) + pos) << (8 * level);
                let got = stored
                    .get(&index)
                    .map(|b| from_bytes(b))
                    .unwrap_or_default();
                if let Some(pos) = computed.iter().zip(&got).position(|(a, b)| a != b) {
                    return Ok(Some(AuditVerdict::Broken {
                        index: first_leaf(pos as u64),
                        problem: format!(
                            "stored hash tile {level}/{index} does not match the entries (tiles altered)"
                        ),
                    }));
                }
                if got.len() < need {
                    return Ok(Some(AuditVerdict::Broken {
                        index: first_leaf(got.len() as u64),
                        problem: format!(
                            "stored hash tile {level}/{index} is missing or cut short"
                        ),
                    }));
                }
            }
        }
        Ok(None)
    }
}

fn tile_ops(pending: BTreeMap<(u32, u64), Vec<Hash>>) -> Vec<Op> {
    pending
        .into_iter()
        .map(|((level, index), hashes)| Op::PutTile {
            level,
            index,
            hashes: to_bytes(&hashes),
        })
        .collect()
}

/// Proof of one entry's inclusion in the tree of a given size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InclusionProof {
    pub index: u64,
    pub size: u64,
    pub leaf_hash: String,
    pub root: String,
    pub proof: Vec<String>,
}

/// Proof that the tree of size `old` is a prefix of the tree of size `new`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsistencyProof {
    pub old: u64,
    pub new: u64,
    pub old_root: String,
    pub new_root: String,
    pub proof: Vec<String>,
}

pub(crate) fn b64(h: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(h)
}

impl Vault {
    /// The latest signed checkpoint (C2SP signed note), if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, VaultError> {
        Ok(self.store.checkpoint(None)?.map(|(_, n)| n))
    }

    /// Audit settings are part of the log: a change is recorded when the server starts with it.
    pub(crate) fn record_audit_settings(&self) -> Result<(), VaultError> {
        let value =
            format!("public_transparency={}", self.options.public_transparency).into_bytes();
        if self.store.meta("audit.settings")?.as_deref() == Some(value.as_slice()) {
            return Ok(());
        }
        let mut rec = AuditRecord::new(
            "audit.settings",
            "system",
            Outcome::Success,
            self.now_instant(),
            "startup",
        );
        rec.detail = Some(String::from_utf8_lossy(&value).into_owned());
        self.commit(
            vec![Op::PutMeta {
                key: "audit.settings".into(),
                value,
            }],
            vec![rec],
        )?;
        Ok(())
    }

    /// Who may read the transparency views (commitments only): anyone when
    /// `audit.public_transparency` is on, otherwise privacy officers and auditors.
    pub fn transparency_reader(&self, c: Option<&Caller>, action: &str) -> Result<(), VaultError> {
        match c {
            Some(c) if !self.options.public_transparency => self.require_audit_reader(c, action),
            Some(_) => Ok(()),
            None if self.options.public_transparency => Ok(()),
            None => Err(VaultError::Unauthenticated),
        }
    }

    pub(crate) fn require_audit_reader(&self, c: &Caller, action: &str) -> Result<(), VaultError> {
        let mut rec = self.record(c, action, Outcome::Success);
        if !matches!(c.principal.role, Role::PrivacyOfficer | Role::Auditor) {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        self.audit(vec![rec])
    }

    /// Full audit records `[start, end)` (at most 1000) for privacy officers and auditors;
    /// each is checkable against its leaf hash. Reading them is itself audited.
    pub fn audit_entries(
        &self,
        c: &Caller,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, String, String, AuditRecord)>, VaultError> {
        if end < start || end - start > 1000 {
            return Err(VaultError::BadRequest(
                "ask for at most 1000 entries with start <= end".into(),
            ));
        }
        self.require_audit_reader(c, "audit.entries")?;
        let rows = self.store.audit_range(start, end)?;
        rows.into_iter()
            .map(|r| {
                let rec = AuditRecord::from_canonical(&r.record)
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                Ok((
                    r.seq,
                    b64(&medvault_audit::commitment(&r.record)),
                    b64(&r.leaf_hash),
                    rec,
                ))
            })
            .collect()
    }

    /// RFC 6962 inclusion proof of entry `index` in the tree of `size` entries, read from
    /// the stored tiles.
    pub fn inclusion_proof(
        &self,
        c: Option<&Caller>,
        index: u64,
        size: u64,
    ) -> Result<InclusionProof, VaultError> {
        self.transparency_reader(c, "audit.proof")?;
        if index >= size || size > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need index < size <= the log's size".into(),
            ));
        }
        self.covered(c, size)?;
        let (leaf, proof, root) = self.prove_inclusion(index, size)?;
        Ok(InclusionProof {
            index,
            size,
            leaf_hash: b64(&leaf),
            root: b64(&root),
            proof: proof.iter().map(|h| b64(h)).collect(),
        })
    }

    /// RFC 6962 consistency proof between the trees of `old` and `new` entries, read from
    /// the stored tiles.
    pub fn consistency_proof(
        &self,
        c: Option<&Caller>,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof, VaultError> {
        self.transparency_reader(c, "audit.proof")?;
        if old == 0 || old > new || new > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need 0 < old <= new <= the log's size".into(),
            ));
        }
        self.covered(c, new)?;
        let (proof, old_root, new_root) = self.with_tiles(|get| {
            Ok((
                tiles::consistency_proof(old, new, get)?,
                tiles::root(old, get)?,
                tiles::root(new, get)?,
            ))
        })?;
        Ok(ConsistencyProof {
            old,
            new,
            old_root: b64(&old_root),
            new_root: b64(&new_root),
            proof: proof.iter().map(|h| b64(h)).collect(),
        })
    }

    /// The bytes of a hash tile or entry bundle of the latest checkpointed tree, or
    /// `NotFound` when that tree does not (yet) hold it. Hash tiles are served from storage.
    pub fn tile(&self, c: Option<&Caller>, t: TileRef) -> Result<Vec<u8>, VaultError> {
        self.transparency_reader(c, "audit.tile")?;
        let size = self.store.checkpoint(None)?.map(|(s, _)| s).unwrap_or(0);
        let (level, index, width) = match t {
            TileRef::Hashes {
                level,
                index,
                width,
            } => (level, index, width),
            TileRef::Entries { index, width } => (0, index, width),
        };
        let full = tiles::WIDTH as u64;
        let first = index.checked_mul(full).ok_or(VaultError::NotFound)?;
        let available = tiles::count_at(size, level).saturating_sub(first).min(full);
        let want = width.unwrap_or(full);
        if available == 0 || want > available || (width.is_none() && available < full) {
            return Err(VaultError::NotFound);
        }
        let want = usize::try_from(want).map_err(|_| VaultError::NotFound)?;
        if let TileRef::Entries { .. } = t {
            let rows = self.store.audit_range(first, first + want as u64)?;
            if rows.len() != want {
                return Err(VaultError::Internal("audit log has a gap".into()));
            }
            let mut out = Vec::with_capacity(want * 34);
            for r in rows {
                out.extend_from_slice(&32u16.to_be_bytes());
                out.extend_from_slice(&medvault_audit::commitment(&r.record));
            }
            return Ok(out);
        }
        let stored = self.store.tiles(level, index, index + 1)?;
        match stored.into_iter().next() {
            Some((_, bytes)) if bytes.len() >= want * 32 => {
                Ok(bytes.get(..want * 32).unwrap_or_default().to_vec())
            }
            _ => Err(VaultError::Internal(format!(
                "hash tile {level}/{index} is missing"
            ))),
        }
    }
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

impl Vault {
    /// The stored checkpoint of exactly `size` entries, with any witness cosignatures.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<String>, VaultError> {
        Ok(self.store.checkpoint(Some(size))?.map(|(_, n)| n))
    }

    /// `POST /audit/checkpoint`: signs a checkpoint now and returns the latest (privacy
    /// officers and auditors; audited).
    pub fn checkpoint_now(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.require_audit_reader(c, "audit.checkpoint")?;
        self.checkpoint()?;
        self.latest_checkpoint()
    }

    /// Accepts a witness's cosigned copy of one of this log's checkpoints: the note must carry
    /// this log's valid signature over a checkpoint it stored; the other signature lines are
    /// appended to the stored checkpoint. Privacy officers and auditors (who run witnesses).
    pub fn add_cosignatures(&self, c: &Caller, note: &str) -> Result<usize, VaultError> {
        self.require_audit_reader(c, "audit.cosign")?;
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let text = verifier
            .verify(note)
            .map_err(|_| VaultError::BadRequest("not a checkpoint signed by this log".into()))?;
        let (origin, size, _) = medvault_audit::note::parse_checkpoint(text)
            .map_err(|e| VaultError::BadRequest(e.to_string()))?;
        let stored = self.checkpoint_at(size)?.ok_or(VaultError::NotFound)?;
        if origin != self.origin || !stored.starts_with(text) {
            return Err(VaultError::BadRequest(
                "checkpoint does not match the stored one".into(),
            ));
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
        let ops = lines
            .into_iter()
            .map(|line| Op::AddCosignature { size, line })
            .collect();
        self.store.commit(WriteBatch { ops, audit: vec![] })?;
        Ok(n)
    }
}

fn is_canonical(record: &[u8]) -> bool {
    matches!(AuditRecord::from_canonical(record), Ok(r) if r.canonical() == record)
}

/// One chunk of the log, read and hashed.
struct Scanned {
    leaves: Vec<Hash>,
    /// Roots of the chunk's complete level-0 tiles, in order.
    roots: Vec<Hash>,
    /// The first entry found wrong in the chunk (leaves stop before it).
    problem: Option<(u64, String)>,
}

#[cfg(test)]
mod tile_tests {
    use super::TileRef;

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

#[cfg(test)]
mod log_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::Arc;

    use crate::{
        Caller, MasterKey, Outcome, Role, SqliteStore, Store, Vault, VaultError, VaultOptions,
    };
    use medvault_types::ManualClock;

    fn open(store: Arc<dyn Store>, master: &std::path::Path) -> Vault {
        let clock = Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        ));
        Vault::open(
            store,
            MasterKey::load_file(master).unwrap(),
            clock,
            VaultOptions {
                public_transparency: true,
                ..VaultOptions::default()
            },
        )
        .unwrap()
    }

    fn grow(v: &Vault, n: usize) {
        let c = Caller::cli(Role::Auditor);
        let recs = (0..n)
            .map(|_| v.record(&c, "test", Outcome::Success))
            .collect();
        v.audit(recs).unwrap();
    }

    fn leaves(v: &Vault, n: u64) -> Vec<[u8; 32]> {
        v.store
            .audit_range(0, n)
            .unwrap()
            .iter()
            .map(|r| medvault_audit::record_leaf(&r.record))
            .collect()
    }

    #[test]
    fn proofs_from_tiles_survive_a_restart_and_anonymous_callers_cannot_force_signing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        let master = dir.path().join("master.key");
        MasterKey::create_file(&master).unwrap();
        let v = open(store.clone(), &master);
        grow(&v, 700);
        let (signed, _) = v.checkpoint().unwrap().unwrap();
        grow(&v, 10);
        // Anonymous (public transparency): within the signed tree only.
        assert!(v.inclusion_proof(None, 3, signed).is_ok());
        assert!(matches!(
            v.inclusion_proof(None, 3, signed + 5),
            Err(VaultError::BadRequest(_))
        ));
        // A restarted server resumes from the stored tiles and extends them.
        drop(v);
        let v = open(store, &master);
        grow(&v, 300);
        let n = v.store.audit_len().unwrap();
        let auditor = Caller::cli(Role::Auditor);
        let p = v.inclusion_proof(Some(&auditor), 650, n - 1).unwrap();
        let all = leaves(&v, n - 1);
        let expected: Vec<String> = medvault_audit::merkle::inclusion_proof(&all, 650)
            .unwrap()
            .iter()
            .map(|h| super::b64(h))
            .collect();
        assert_eq!(p.proof, expected);
        assert_eq!(p.root, super::b64(&medvault_audit::merkle::root(&all)));
        let cp = v.consistency_proof(None, signed, n - 1);
        assert!(
            cp.is_ok(),
            "the auditor's request signed a tree covering it"
        );
        assert!(matches!(
            v.verify_audit(&|_, _| {}).unwrap(),
            crate::AuditVerdict::Intact { .. }
        ));
    }
}
