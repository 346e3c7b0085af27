//! The verifiable audit log, as the gate serves it: checkpoints signed over the Merkle
//! tree, the tree stored as C2SP tlog-tiles as it grows, proofs read from those tiles,
//! verification of the whole log (the algorithm lives in `medvault_audit::verify`; this
//! module lends it a read-only view of the store), and the transparency reads. Who may do
//! each is decided by the policies (`audit.*` actions; `Anonymous` when public
//! transparency is on).

use std::collections::{BTreeMap, HashMap};

use medvault_audit::merkle::Hash;
use medvault_audit::tiles::{
    self, hashes_from_bytes as from_bytes, hashes_to_bytes as to_bytes, TileRef, Tiles,
};
use medvault_audit::verify::{AuditVerdict, EntryVisitor, LogSource, VerifyError, CHUNK};
use medvault_audit::AuditRecord;
use medvault_store::{Op, Store, WriteBatch};
use medvault_types::Operation;

use crate::{Caller, Outcome, Vault, VaultError};

/// Tile updates are committed in groups of this many while catching up a large backlog.
const TILE_FLUSH: usize = 256;

/// A read-only view of the store's audit log for `medvault_audit::verify`.
struct StoreLog<'a>(&'a dyn Store);

fn unreadable(e: medvault_store::StoreError) -> VerifyError {
    VerifyError(e.to_string())
}

impl LogSource for StoreLog<'_> {
    fn size(&self) -> Result<u64, VerifyError> {
        self.0.audit_len().map_err(unreadable)
    }
    fn scan(&self, start: u64, end: u64, f: &mut EntryVisitor<'_>) -> Result<(), VerifyError> {
        self.0.audit_scan(start, end, f).map_err(unreadable)
    }
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, VerifyError> {
        self.0.checkpoints().map_err(unreadable)
    }
    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, VerifyError> {
        self.0.tiles(level, start, end).map_err(unreadable)
    }
}

impl Vault {
    /// `GET /audit/key`: the log's checkpoint verifier key (C2SP note verifier-key form).
    pub fn audit_verifier_key(&self, c: &Caller) -> Result<String, VaultError> {
        self.operate_now(c, Operation::VerifierKey, None)?;
        Ok(self.signer.verifier_key())
    }

    /// `medvault audit verify`: recomputes the whole log, its tree and tiles, and checks
    /// every stored checkpoint and tile (`medvault_audit::verify`). Decided by policy
    /// (`audit.verify`) but not appended to the log it examines, so verifying leaves the
    /// evidence as it found it and two runs over a quiet log agree. `progress(done, total)`
    /// as it goes.
    ///
    /// # Errors
    /// Denied by policy; the log cannot be read.
    pub fn verify_audit(
        &self,
        c: &Caller,
        progress: &dyn Fn(u64, u64),
    ) -> Result<AuditVerdict, VaultError> {
        self.decide_unrecorded(c, Operation::AuditVerify)?;
        Ok(medvault_audit::verify::verify(
            &StoreLog(&*self.store),
            &self.signer.verifier_key(),
            &self.origin,
            progress,
        )?)
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
    /// grew since the last one, and stores both (the server's background work, every
    /// second: `Caller::system`). Returns the new checkpoint's size and note. The signed
    /// checkpoint is its own record.
    pub fn checkpoint(&self, c: &Caller) -> Result<Option<(u64, String)>, VaultError> {
        self.decide_unrecorded(c, Operation::SignScheduledCheckpoint)?;
        self.sign_checkpoint()
    }

    fn sign_checkpoint(&self) -> Result<Option<(u64, String)>, VaultError> {
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
    fn covered(&self, c: &Caller, want: u64) -> Result<(), VaultError> {
        let s = {
            let mut tree = self.lock_tree()?;
            self.sync_tree(&mut tree)?
        };
        if s >= want {
            return Ok(());
        }
        if c.principal().is_none() {
            return Err(VaultError::BadRequest(format!(
                "the latest signed checkpoint covers {s} entries; ask within it"
            )));
        }
        self.sign_checkpoint()?;
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
    /// `GET /audit/checkpoint`: the latest signed checkpoint (C2SP signed note), if any.
    pub fn latest_checkpoint(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.operate_now(c, Operation::ReadCheckpoint, None)?;
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
        self.operate_now(c, Operation::AuditEntries, None)?;
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
        c: &Caller,
        index: u64,
        size: u64,
    ) -> Result<InclusionProof, VaultError> {
        self.operate_now(c, Operation::Proof, None)?;
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
        c: &Caller,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof, VaultError> {
        self.operate_now(c, Operation::Proof, None)?;
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
    pub fn tile(&self, c: &Caller, t: TileRef) -> Result<Vec<u8>, VaultError> {
        self.operate_now(c, Operation::Tile, None)?;
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

impl Vault {
    /// `GET /audit/checkpoint?size=N`: the stored checkpoint of exactly `size` entries, with
    /// any witness cosignatures.
    pub fn checkpoint_at(&self, c: &Caller, size: u64) -> Result<Option<String>, VaultError> {
        self.operate_now(c, Operation::ReadCheckpoint, None)?;
        Ok(self.store.checkpoint(Some(size))?.map(|(_, n)| n))
    }

    /// `POST /audit/checkpoint`: signs a checkpoint now and returns the latest (privacy
    /// officers and auditors; audited).
    pub fn checkpoint_now(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.operate_now(c, Operation::SignCheckpoint, None)?;
        self.sign_checkpoint()?;
        Ok(self.store.checkpoint(None)?.map(|(_, n)| n))
    }

    /// Accepts a witness's cosigned copy of one of this log's checkpoints: the note must carry
    /// this log's valid signature over a checkpoint it stored; the other signature lines are
    /// appended to the stored checkpoint. Privacy officers and auditors (who run witnesses).
    pub fn add_cosignatures(&self, c: &Caller, note: &str) -> Result<usize, VaultError> {
        self.operate_now(c, Operation::Cosign, None)?;
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let text = verifier
            .verify(note)
            .map_err(|_| VaultError::BadRequest("not a checkpoint signed by this log".into()))?;
        let (origin, size, _) = medvault_audit::note::parse_checkpoint(text)
            .map_err(|e| VaultError::BadRequest(e.to_string()))?;
        let stored = self
            .store
            .checkpoint(Some(size))?
            .map(|(_, n)| n)
            .ok_or(VaultError::NotFound)?;
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

#[cfg(test)]
mod log_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::Arc;

    use crate::{Caller, MasterKeySource, Outcome, Role, Vault, VaultError, VaultOptions};
    use medvault_store::{SqliteStore, Store};
    use medvault_types::ManualClock;

    fn open(store: Arc<dyn Store>, master: &std::path::Path) -> Vault {
        let clock = Arc::new(ManualClock::new(
            time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap(),
        ));
        Vault::open_with_store(
            store,
            &MasterKeySource::File(master.to_owned()),
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
        medvault_crypto::MasterKey::create_file(&master).unwrap();
        let v = open(store.clone(), &master);
        grow(&v, 700);
        let (signed, _) = v.checkpoint(&Caller::system("test")).unwrap().unwrap();
        grow(&v, 10);
        // Anonymous (public transparency): within the signed tree only.
        let anonymous = Caller::anonymous(None, "test".into());
        assert!(v.inclusion_proof(&anonymous, 3, signed).is_ok());
        assert!(matches!(
            v.inclusion_proof(&anonymous, 3, signed + 5),
            Err(VaultError::BadRequest(_))
        ));
        // A restarted server resumes from the stored tiles and extends them.
        drop(v);
        let v = open(store, &master);
        grow(&v, 300);
        let n = v.store.audit_len().unwrap();
        let auditor = Caller::cli(Role::Auditor);
        let p = v.inclusion_proof(&auditor, 650, n - 1).unwrap();
        let all = leaves(&v, n - 1);
        let expected: Vec<String> = medvault_audit::merkle::inclusion_proof(&all, 650)
            .unwrap()
            .iter()
            .map(|h| super::b64(h))
            .collect();
        assert_eq!(p.proof, expected);
        assert_eq!(p.root, super::b64(&medvault_audit::merkle::root(&all)));
        let cp = v.consistency_proof(&anonymous, signed, n - 1);
        assert!(
            cp.is_ok(),
            "the auditor's request signed a tree covering it"
        );
        assert!(matches!(
            v.verify_audit(&auditor, &|_, _| {}).unwrap(),
            crate::AuditVerdict::Intact { .. }
        ));
    }
}
