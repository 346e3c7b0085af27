//! What backups need from the gate (SPEC "Keys, backup, destruction"; `medvault-backup`
//! does the rest): a consistent dump of the store — ciphertext, wrapped keys, the audit log
//! with its shred ledger — recorded in the audit log first; the repository key wrapped and
//! unwrapped by the master key; after a restore, the replay of destructions the restored
//! copy does not know yet; and the drill's record. Policy action `backup` (the local
//! operator; security administrators for status).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use medvault_crypto::DataKey;
use medvault_store::{Op, Store};
use medvault_types::{Operation, PatientId};
use zeroize::Zeroizing;

use crate::{Caller, Outcome, Storage, Vault, VaultError};

pub use medvault_store::DumpStats as SnapshotStats;
pub use medvault_store::PAGE_IMAGE_TAG;

/// How a snapshot's audit entry begins (`backup.create snapshot=ID expires=INSTANT`): what a
/// certificate of destruction reads the last backup before the destruction from.
pub(crate) const SNAPSHOT_TAG: &str = "backup.create snapshot=";

/// Reads a whole dump stream without loading it (a backup's `--read-data` check).
///
/// # Errors
/// The stream is cut, malformed or unreadable.
pub fn check_dump(input: &mut dyn Read) -> Result<SnapshotStats, VaultError> {
    Ok(medvault_store::dump::check(input)?)
}

/// Meta key of the last drill's report (JSON).
pub(crate) const LAST_DRILL: &str = "backup.last_drill";

fn label(repo: &str) -> String {
    format!("backup-repository:{repo}")
}

impl Vault {
    /// Writes a consistent snapshot of the whole store to `out` (one read transaction,
    /// while others keep writing; a page image on SQLite, a logical dump on PostgreSQL),
    /// after recording `backup.create` for `snapshot`. Nothing is decrypted: bodies stay
    /// sealed, keys stay wrapped.
    ///
    /// # Errors
    /// Denied; the audit record cannot be written; storage or `out` failures.
    pub fn backup_snapshot(
        &self,
        c: &Caller,
        snapshot: &str,
        expires: &str,
        out: &mut dyn Write,
    ) -> Result<SnapshotStats, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::Backup, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("{SNAPSHOT_TAG}{snapshot} expires={expires}"));
        self.audit(vec![rec])?;
        Ok(self.store.snapshot(out)?)
    }

    /// Wraps a backup repository's key `raw` under the master key version in force:
    /// `(master version, wrapped)`.
    ///
    /// # Errors
    /// Denied; the master key is unavailable.
    pub fn wrap_backup_key(
        &self,
        c: &Caller,
        repo: &str,
        raw: &[u8; 32],
    ) -> Result<(u32, Vec<u8>), VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        let (v, m) = self.wrapping_master()?;
        Ok((v, m.wrap_named(&label(repo), &DataKey::from_bytes(*raw))?))
    }

    /// Unwraps a backup repository's key wrapped by [`Vault::wrap_backup_key`].
    ///
    /// # Errors
    /// Denied; that master key version is unavailable; the blob does not open.
    pub fn unwrap_backup_key(
        &self,
        c: &Caller,
        repo: &str,
        master_version: u32,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        let k = self
            .keyring
            .get(master_version)?
            .unwrap_named(&label(repo), wrapped)?;
        Ok(Zeroizing::new(*k.expose_for_derivation()))
    }

    /// Current, non-deleted resources per FHIR type (what a drill compares with the
    /// snapshot's manifest).
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn census(&self, c: &Caller) -> Result<BTreeMap<String, u64>, VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        Ok(self.store.census()?)
    }

    /// After a restore: shreds each chart of `ledger` (patient id, audit index of its
    /// destruction in the log it came from) that the restored copy still holds — its keys
    /// deleted, its records unreachable — each with an audit entry `destruction.replay`.
    /// Returns the charts shredded now (law 6); [`Vault::remove_shredded`] then removes
    /// their rows.
    ///
    /// # Errors
    /// Denied; storage and audit failures.
    pub fn replay_shred_ledger(
        &self,
        c: &Caller,
        ledger: &[(String, u64)],
    ) -> Result<Vec<String>, VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        let mut shredded = vec![];
        for (p, seq) in ledger {
            let Ok(pid) = PatientId::new(p) else { continue };
            if self.store.patient_key(&pid)?.is_none() && self.store.chart_census(&pid)?.is_empty()
            {
                continue;
            }
            let mut rec = self.record(c, crate::destruction::REPLAY_ACTION, Outcome::Success);
            rec.patient = Some(pid.to_string());
            rec.detail = Some(format!(
                "restored copy: chart destroyed at audit entry {seq} of the source log"
            ));
            self.commit(
                vec![Op::ShredPatient {
                    patient: pid.clone(),
                }],
                vec![rec],
            )
            .map_err(crate::audit_failed)?;
            self.keys.evict(&pid);
            shredded.push(pid.to_string());
        }
        Ok(shredded)
    }

    /// Removes what shredded charts left behind — stored versions nobody can open, search
    /// tokens — and pushes it out of the database's files: after [`Vault::replay_shred_ledger`],
    /// or to finish a destruction cut short. Returns the charts cleaned.
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn remove_shredded(&self, c: &Caller) -> Result<usize, VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        let mut n = 0;
        for (p, _) in self.shred_ledger()? {
            let Ok(pid) = PatientId::new(&p) else {
                continue;
            };
            if self.store.chart_census(&pid)?.is_empty() {
                continue;
            }
            self.commit(vec![Op::RemoveShredded { patient: pid }], vec![])?;
            n += 1;
        }
        if n > 0 {
            self.purge_shredded();
        }
        Ok(n)
    }

    /// Decides (and for a run, records) a console request about backups: `read` (the
    /// repository's snapshots and the last drill) or a run (`backup`, `verify`, `drill`) —
    /// which the server's own operator capability then carries out.
    ///
    /// # Errors
    /// Denied; `StepUpRequired` for a run; audit failures.
    pub fn authorize_backup(&self, c: &Caller, act: &str) -> Result<(), VaultError> {
        if act == "read" {
            self.permit_operation(c, Operation::BackupRead, None)?;
            return Ok(());
        }
        let Some(mut rec) = self.operate(c, Operation::BackupRun, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("console: {act}"));
        self.audit(vec![rec])
    }

    /// Records, before it takes effect, that backups made from now on are sealed to a new
    /// recovery key (`detail`: its public key, and how it is split among whom; no secret).
    /// Fail-closed: when this cannot be recorded, the key is not replaced.
    ///
    /// # Errors
    /// Denied; audit failures.
    pub fn record_recovery_key(&self, c: &Caller, detail: &str) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::Backup, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("backup.recovery-key {detail}"));
        self.audit(vec![rec])
    }

    /// Records a restore drill's report (JSON, no PHI) in the audit log and as the last
    /// drill shown by status pages.
    ///
    /// # Errors
    /// Denied; audit failures.
    pub fn record_drill(&self, c: &Caller, report: &serde_json::Value) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::Backup, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("backup.drill {report}"));
        // When it ran, for the safeguards report's evidence.
        let mut report = report.clone();
        if let Some(o) = report.as_object_mut() {
            o.insert("drilled_at".into(), serde_json::json!(self.now_unix()));
        }
        self.commit(
            vec![Op::PutMeta {
                key: LAST_DRILL.into(),
                value: report.to_string().into_bytes(),
            }],
            vec![rec],
        )
        .map_err(crate::audit_failed)
        .map(|_| ())
    }

    /// The last drill's report, if one ran.
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn last_drill(&self, c: &Caller) -> Result<Option<serde_json::Value>, VaultError> {
        self.decide_unrecorded(c, Operation::Backup)?;
        Ok(self
            .store
            .meta(LAST_DRILL)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

/// Loads a dump into a fresh store at `storage` (a restore's first step, before the gate
/// is opened over it). All-or-nothing.
///
/// # Errors
/// `Duplicate` if the target already holds data; the dump is malformed or cut; storage
/// failures.
pub fn restore_store(storage: &Storage, input: &mut dyn Read) -> Result<SnapshotStats, VaultError> {
    let loaded = match storage {
        Storage::Sqlite(path) => medvault_store::SqliteStore::restore(path, input),
        Storage::Postgres(url) => {
            let store: std::sync::Arc<dyn Store> = medvault_store::PgStore::open(url)?;
            store.load(input)
        }
    };
    match loaded {
        Ok(s) => Ok(s),
        Err(medvault_store::StoreError::Exists) => Err(VaultError::Duplicate(
            "the restore target already holds data; restore into a new directory or database"
                .into(),
        )),
        Err(e) => Err(e.into()),
    }
}
