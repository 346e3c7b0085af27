//! The verifiable audit log, as the gate serves it: who may read checkpoints, tiles and
//! proofs, sign a checkpoint on demand, cosign or verify is decided by the policies
//! (`audit.*` actions; `Anonymous` when public transparency is on); the log itself —
//! tiles, checkpoints, proofs, verification — is `medvault_audit::log` and
//! `medvault_audit::verify`, reading and writing the store through the adapters here.

use medvault_audit::log::{b64, ConsistencyProof, InclusionProof, LogError, TileStore, TileWrite};
use medvault_audit::tiles::TileRef;
use medvault_audit::verify::{AuditVerdict, EntryVisitor, LogSource, VerifyError};
use medvault_audit::AuditRecord;
use medvault_store::{Op, Store, WriteBatch};
use medvault_types::Operation;

use crate::{Caller, Outcome, Vault, VaultError};

/// The store as the audit room sees it: entries, tiles and checkpoints, nothing else.
struct LogStore<'a>(&'a dyn Store);

impl TileStore for LogStore<'_> {
    type Error = VaultError;
    fn size(&self) -> Result<u64, VaultError> {
        Ok(self.0.audit_len()?)
    }
    fn records(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, VaultError> {
        let rows = self.0.audit_range(start, end)?;
        Ok(rows.into_iter().map(|r| (r.seq, r.record)).collect())
    }
    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, VaultError> {
        Ok(self.0.tiles_at(level, indexes)?)
    }
    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, VaultError> {
        Ok(self.0.checkpoint(size)?)
    }
    fn put(
        &self,
        tiles: Vec<TileWrite>,
        checkpoint: Option<(u64, String)>,
    ) -> Result<(), VaultError> {
        let mut ops: Vec<Op> = tiles
            .into_iter()
            .map(|(level, index, hashes)| Op::PutTile {
                level,
                index,
                hashes,
            })
            .collect();
        if let Some((size, note)) = checkpoint {
            ops.push(Op::PutCheckpoint { size, note });
        }
        self.0.commit(WriteBatch { ops, audit: vec![] })?;
        Ok(())
    }
    fn cosign(&self, size: u64, lines: Vec<String>) -> Result<(), VaultError> {
        let ops = lines
            .into_iter()
            .map(|line| Op::AddCosignature { size, line })
            .collect();
        self.0.commit(WriteBatch { ops, audit: vec![] })?;
        Ok(())
    }
}

fn unreadable(e: medvault_store::StoreError) -> VerifyError {
    VerifyError(e.to_string())
}

impl LogSource for LogStore<'_> {
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

impl From<LogError> for VaultError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::OutOfRange(m) | LogError::NotOurs(m) => VaultError::BadRequest(m),
            LogError::NotFound => VaultError::NotFound,
            LogError::Broken(m) => VaultError::Internal(m),
        }
    }
}

impl Vault {
    fn log_store(&self) -> LogStore<'_> {
        LogStore(&*self.store)
    }

    /// `GET /audit/key`: the log's checkpoint verifier key (C2SP note verifier-key form).
    pub fn audit_verifier_key(&self, c: &Caller) -> Result<String, VaultError> {
        self.permit_operation(c, Operation::VerifierKey, None)?;
        Ok(self.log.verifier_key())
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
            &self.log_store(),
            &self.log.verifier_key(),
            self.log.origin(),
            progress,
        )?)
    }

    /// Integrates new entries into the stored tiles, signs a checkpoint of the log if it
    /// grew since the last one, and stores both (the server's background work, every
    /// second: `Caller::system`). Returns the new checkpoint's size and note. The signed
    /// checkpoint is its own record.
    pub fn checkpoint(&self, c: &Caller) -> Result<Option<(u64, String)>, VaultError> {
        self.decide_unrecorded(c, Operation::SignScheduledCheckpoint)?;
        self.log.sign(&self.log_store())
    }

    /// Integrates new entries and signs a checkpoint now, for the gate's own evidence (a
    /// certificate of destruction names the checkpoint covering its entry). Unrecorded,
    /// like the scheduled checkpoint: the signed checkpoint is its own record.
    pub(crate) fn sign_checkpoint_now(&self) -> Result<Option<(u64, String)>, VaultError> {
        self.log.sign(&self.log_store())
    }

    /// `POST /audit/checkpoint`: signs a checkpoint now and returns the latest.
    pub fn checkpoint_now(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.permit_operation(c, Operation::SignCheckpoint, None)?;
        self.log.sign(&self.log_store())?;
        Ok(self.store.checkpoint(None)?.map(|(_, n)| n))
    }

    /// `GET /audit/checkpoint`: the latest signed checkpoint (C2SP signed note), if any.
    pub fn latest_checkpoint(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.permit_operation(c, Operation::ReadCheckpoint, None)?;
        Ok(self.store.checkpoint(None)?.map(|(_, n)| n))
    }

    /// `GET /audit/checkpoint/{size}`: the stored checkpoint of exactly `size` entries, with
    /// any witness cosignatures.
    pub fn checkpoint_at(&self, c: &Caller, size: u64) -> Result<Option<String>, VaultError> {
        self.permit_operation(c, Operation::ReadCheckpoint, None)?;
        Ok(self.store.checkpoint(Some(size))?.map(|(_, n)| n))
    }

    /// Accepts a witness's cosigned copy of one of this log's checkpoints (C2SP
    /// tlog-cosignature); returns how many cosignatures were added.
    pub fn add_cosignatures(&self, c: &Caller, note: &str) -> Result<usize, VaultError> {
        self.permit_operation(c, Operation::Cosign, None)?;
        self.log.cosign(&self.log_store(), note)
    }

    /// Makes sure the stored tiles cover `want` entries: the latest checkpoint does, or, for
    /// a signed-in reader (whose request is itself audited), one is signed now. Anonymous
    /// callers (public transparency) get proofs within signed trees only, so they cannot
    /// make the server sign on demand.
    fn covered(&self, c: &Caller, want: u64) -> Result<(), VaultError> {
        let signed = self.log.signed_size(&self.log_store())?;
        if signed >= want {
            return Ok(());
        }
        if c.principal().is_none() {
            return Err(VaultError::BadRequest(format!(
                "the latest signed checkpoint covers {signed} entries; ask within it"
            )));
        }
        self.log.sign(&self.log_store())?;
        Ok(())
    }

    /// `GET /api/audit/proof/inclusion`: RFC 6962 inclusion proof of entry `index` in the
    /// tree of `size` entries, read from the stored tiles.
    pub fn inclusion_proof(
        &self,
        c: &Caller,
        index: u64,
        size: u64,
    ) -> Result<InclusionProof, VaultError> {
        self.permit_operation(c, Operation::Proof, None)?;
        if index >= size || size > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need index < size <= the log's size".into(),
            ));
        }
        self.covered(c, size)?;
        let (leaf, proof, root) = self.log.inclusion_proof(&self.log_store(), index, size)?;
        Ok(InclusionProof::new(index, size, &leaf, &proof, &root))
    }

    /// `GET /api/audit/proof/consistency`: RFC 6962 consistency proof between the trees of
    /// `old` and `new` entries, read from the stored tiles.
    pub fn consistency_proof(
        &self,
        c: &Caller,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof, VaultError> {
        self.permit_operation(c, Operation::Proof, None)?;
        if old == 0 || old > new || new > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need 0 < old <= new <= the log's size".into(),
            ));
        }
        self.covered(c, new)?;
        let (proof, old_root, new_root) =
            self.log.consistency_proof(&self.log_store(), old, new)?;
        Ok(ConsistencyProof::new(
            old, new, &old_root, &new_root, &proof,
        ))
    }

    /// `GET /audit/tile/…`: a hash tile or entry bundle of the latest checkpointed tree, or
    /// `NotFound` when that tree does not (yet) hold it.
    pub fn tile(&self, c: &Caller, t: TileRef) -> Result<Vec<u8>, VaultError> {
        self.permit_operation(c, Operation::Tile, None)?;
        self.log.tile(&self.log_store(), t)
    }

    /// `GET /api/audit/entries`: full audit records `[start, end)` (at most 1000), each
    /// with its commitment and leaf hash to check it against. Reading them is audited.
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
        self.permit_operation(c, Operation::AuditEntries, None)?;
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
}
