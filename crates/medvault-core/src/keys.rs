//! Master key versions and rotation (SPEC "Keys, backup, destruction").
//!
//! Each data key names the master key version that wraps it. `medvault keys rotate` creates
//! the next version, records it as the rotation target (from then on new data keys are
//! wrapped by it, on every server), re-wraps the service keys beside the old ones, then
//! re-wraps every data key in batches — the data keys and the records under them are
//! untouched, so reads and writes go on. A crash leaves the target recorded: the next run
//! resumes. When nothing is wrapped by the old version any more the target becomes current,
//! and the old version is retired: its file can be deleted.

use std::sync::Arc;

use medvault_crypto::{record_aad, DataKey, Keyring, MasterKey, RecordCipher};
use medvault_store::{Op, Store, StoreError, VersionRow, WriteBatch};
use medvault_types::{Operation, PatientId};
use serde::Serialize;

use crate::{Caller, Outcome, Vault, VaultError};

/// Meta key: the master key version in force (absent: 1).
const CURRENT: &str = "key.master_version";
/// Meta key: the version a rotation is moving to (absent or empty: none).
const TARGET: &str = "key.master_rotation";
/// The service keys stored wrapped in meta, with the label bound into their wrapping (the
/// blind-index root has its own wrapping).
const NAMED: [(&str, &str); 3] = [
    ("key.identity", "identity"),
    ("key.audit_signing", "audit-signing"),
    ("key.destruction_signing", "destruction-signing"),
];

fn meta_u32(store: &Arc<dyn Store>, key: &str) -> Result<Option<u32>, VaultError> {
    Ok(store
        .meta(key)?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|v| *v > 0))
}

/// The master key version in force.
pub(crate) fn master_version(store: &Arc<dyn Store>) -> Result<u32, VaultError> {
    Ok(meta_u32(store, CURRENT)?.unwrap_or(1))
}

/// The meta key of a service key wrapped by master key `version`.
pub(crate) fn versioned_name(name: &str, version: u32) -> String {
    versioned(name, version)
}

fn versioned(name: &str, version: u32) -> String {
    if version <= 1 {
        name.to_owned()
    } else {
        format!("{name}@v{version}")
    }
}

/// A service key: the copy wrapped by the newest version up to `current` that exists,
/// created under `current` on first use.
pub(crate) fn service_key<T>(
    store: &Arc<dyn Store>,
    ring: &Keyring,
    current: u32,
    name: &str,
    wrap_new: impl Fn(&MasterKey) -> Result<Vec<u8>, VaultError>,
    unwrap: impl Fn(&MasterKey, &[u8]) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    for v in (1..=current).rev() {
        if let Some(w) = store.meta(&versioned(name, v))? {
            return unwrap(&*ring.get(v)?, &w);
        }
    }
    let key = versioned(name, current);
    let w = wrap_new(&*ring.get(current)?)?;
    match store.commit(WriteBatch {
        ops: vec![Op::PutMetaOnce {
            key: key.clone(),
            value: w.clone(),
        }],
        audit: vec![],
    }) {
        Ok(_) => unwrap(&*ring.get(current)?, &w),
        Err(StoreError::Exists) => {
            let w = store
                .meta(&key)?
                .ok_or(VaultError::Internal("meta vanished".into()))?;
            unwrap(&*ring.get(current)?, &w)
        }
        Err(e) => Err(e.into()),
    }
}

/// A named service key (identity, audit signing, destruction signing).
pub(crate) fn named_service_key(
    store: &Arc<dyn Store>,
    ring: &Keyring,
    current: u32,
    name: &str,
    label: &str,
) -> Result<DataKey, VaultError> {
    service_key(
        store,
        ring,
        current,
        name,
        |m| Ok(m.wrap_named(label, &DataKey::generate())?),
        |m, w| Ok(m.unwrap_named(label, w)?),
    )
}

/// `medvault keys status`: the master key versions and what each still wraps.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub current_version: u32,
    /// The version a rotation is moving to, while one is under way (or crashed).
    pub rotating_to: Option<u32>,
    /// Data keys the rotation has still to re-wrap.
    pub remaining: u64,
    pub versions: Vec<KeyVersion>,
    /// The blind-index key: its generation and any rotation under way.
    pub index: crate::IndexKeyStatus,
}

/// One master key version.
#[derive(Debug, Clone, Serialize)]
pub struct KeyVersion {
    pub version: u32,
    /// `current`, `rotation-target`, `in-use` (still wraps data keys) or `retired`.
    pub state: &'static str,
    /// Data keys it wraps.
    pub data_keys: u64,
    /// Its key file (absent for an in-memory key).
    pub file: Option<String>,
    pub file_present: bool,
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct RotationReport {
    pub from_version: u32,
    pub to_version: u32,
    /// Data keys re-wrapped by this run.
    pub rewrapped: u64,
    /// Whether this run resumed a rotation that had stopped.
    pub resumed: bool,
    /// Versions now retired whose files may be deleted.
    pub retired_files: Vec<String>,
}

/// What a patient's data key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct PatientRotation {
    pub patient: String,
    pub from_key_version: u32,
    pub to_key_version: u32,
    /// Stored versions re-encrypted under the new key.
    pub reencrypted: usize,
}

impl Vault {
    /// Every data key of a chart, newest first, unwrapped (opening text sealed before a
    /// rotation: break-the-glass justifications, hold reasons, disclosure descriptions).
    pub(crate) fn ciphers_for(
        &self,
        pid: &PatientId,
    ) -> Result<Vec<Arc<RecordCipher>>, VaultError> {
        self.store
            .patient_keys(pid)?
            .iter()
            .map(|wk| self.cipher_at(pid, wk.key_version))
            .collect()
    }

    /// Opens text sealed under any of a chart's data keys (newest first).
    pub(crate) fn open_chart_text(
        &self,
        pid: &PatientId,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let mut last = VaultError::Internal("no data key".into());
        for c in self.ciphers_for(pid)? {
            match c.open(aad, sealed) {
                Ok(p) => return Ok(p),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    /// `medvault keys rotate --patient ID` (the local operator): a new data key for one
    /// chart, and every stored version of it re-encrypted under the new key in one
    /// transaction, each re-encryption recorded in the audit log with the digest of what is
    /// now stored (so `audit verify --records` still vouches for it). Older key versions
    /// stay wrapped for text sealed under them before (the ciphertext of the records under
    /// them is gone).
    ///
    /// # Errors
    /// Denied; `NotFound` (no such chart); a stored version that does not open; storage and
    /// audit failures.
    pub fn rotate_patient_key(
        &self,
        c: &Caller,
        patient: &str,
    ) -> Result<PatientRotation, VaultError> {
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))?;
        let Some(mut rec) = self.operate(c, Operation::KeysRotate, Some(pid.as_str()))? else {
            return Err(VaultError::Unauthenticated);
        };
        let Some(current) = self.store.patient_key(&pid)? else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        let mut old: std::collections::HashMap<u32, Arc<RecordCipher>> =
            std::collections::HashMap::new();
        for wk in self.store.patient_keys(&pid)? {
            old.insert(wk.key_version, self.cipher_at(&pid, wk.key_version)?);
        }
        let to = current.key_version.saturating_add(1);
        let dk = DataKey::generate();
        let fresh = RecordCipher::new(&dk);
        let (mv, master) = self.wrapping_master()?;
        let mut ops = vec![Op::PutPatientKey {
            patient: pid.clone(),
            key_version: to,
            master_version: mv,
            wrapped: master.wrap_data_key(&pid, to, &dk)?,
        }];
        let mut recs = vec![];
        let versions = self.store.chart_versions(&pid)?;
        for v in &versions {
            let aad = record_aad(v.rtype(), v.id(), v.version(), &pid);
            let body = if v.deleted() || v.ciphertext().is_empty() {
                vec![]
            } else {
                let under = old.get(&v.key_version()).ok_or(VaultError::Internal(
                    "a version's data key is missing".into(),
                ))?;
                let plain = zeroize::Zeroizing::new(under.open(&aad, v.ciphertext())?);
                fresh.seal(&aad, &plain)?
            };
            let mut row = VersionRow::from(v.clone());
            row.key_version = to;
            row.body = body;
            let mut r = self.record(c, Operation::KeysRotate.as_str(), Outcome::Success);
            r.patient = Some(pid.to_string());
            r.resource = Some(format!("{}/{}/_history/{}", row.rtype, row.id, row.version));
            r.content = Some(crate::integrity::version_digest(
                &crate::integrity::StoredVersion {
                    rtype: &row.rtype,
                    id: &row.id,
                    version: row.version,
                    patient: Some(pid.as_str()),
                    deleted: row.deleted,
                    category: &row.category,
                    key_version: row.key_version,
                    body: &row.body,
                },
            ));
            r.detail = Some(format!("re-encrypted under data key version {to}"));
            recs.push(r);
            ops.push(Op::ReencryptVersion(row));
        }
        rec.detail = Some(format!(
            "patient data key rotated from={} to={to} versions={}",
            current.key_version,
            versions.len()
        ));
        recs.insert(0, rec);
        self.commit(ops, recs).map_err(crate::audit_failed)?;
        self.keys.evict(&pid);
        if let Err(e) = self.store.announce_key_eviction(&pid) {
            tracing::error!(cause = %e, patient = %pid, "could not tell other servers to drop a rotated key; they drop it on restart");
        }
        Ok(PatientRotation {
            patient: pid.to_string(),
            from_key_version: current.key_version,
            to_key_version: to,
            reencrypted: versions.len(),
        })
    }

    /// The master key version new data keys are wrapped by: a rotation's target while one
    /// is under way (so nothing new needs re-wrapping), else the version in force. Read
    /// from the store each time, so every server follows a rotation another process runs.
    /// Whether a master key rotation is under way (or stopped part-way).
    pub(crate) fn master_rotation_pending(&self) -> Result<bool, VaultError> {
        Ok(meta_u32(&self.store, TARGET)?.is_some())
    }

    pub(crate) fn wrapping_master(&self) -> Result<(u32, Arc<MasterKey>), VaultError> {
        let v = match meta_u32(&self.store, TARGET)? {
            Some(t) => t,
            None => master_version(&self.store)?,
        };
        Ok((v, self.keyring.get(v)?))
    }

    pub(crate) fn key_status_now(&self) -> Result<KeyStatus, VaultError> {
        let current = master_version(&self.store)?;
        let target = meta_u32(&self.store, TARGET)?;
        let census = self.store.master_key_census()?;
        let top = census
            .iter()
            .map(|c| c.0)
            .chain([current, target.unwrap_or(0)])
            .max()
            .unwrap_or(current);
        let count = |v: u32| census.iter().find(|c| c.0 == v).map_or(0, |c| c.1);
        let goal = target.unwrap_or(current);
        let remaining = census.iter().filter(|c| c.0 < goal).map(|c| c.1).sum();
        let versions = (1..=top)
            .map(|v| KeyVersion {
                version: v,
                state: if Some(v) == target {
                    "rotation-target"
                } else if v == current {
                    "current"
                } else if count(v) > 0 {
                    "in-use"
                } else {
                    "retired"
                },
                data_keys: count(v),
                file: self.keyring.path_of(v).map(|p| p.display().to_string()),
                file_present: self.keyring.has_file(v),
            })
            .collect();
        Ok(KeyStatus {
            current_version: current,
            rotating_to: target,
            remaining,
            versions,
            index: self.index_key_status()?,
        })
    }

    /// `medvault keys status`, `GET /api/keys/status`: versions, what each wraps, and the
    /// progress of a rotation. No key material.
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn key_status(&self, c: &Caller) -> Result<KeyStatus, VaultError> {
        let _permit = self.permit_operation(c, Operation::KeysStatus, None)?;
        self.key_status_now()
    }

    /// `medvault keys rotate` (the local operator): moves every data key to a new master key
    /// version while the servers keep serving; resumes a rotation that stopped.
    /// `progress(done, total)` after each batch of `batch` keys.
    ///
    /// # Errors
    /// Denied; the new key file cannot be created; an old version's file is missing while
    /// data keys are still wrapped by it; storage and audit failures.
    pub fn rotate_master_key(
        &self,
        c: &Caller,
        batch: usize,
        progress: &dyn Fn(u64, u64),
    ) -> Result<RotationReport, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::KeysRotate, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let current = master_version(&self.store)?;
        let resumed_target = meta_u32(&self.store, TARGET)?;
        if resumed_target.is_none() && self.index_rotation_pending()? {
            return Err(VaultError::Unprocessable(
                "a blind-index key rotation is under way: run `medvault keys rotate --index` to finish it first".into(),
            ));
        }
        let target = resumed_target.unwrap_or(current.saturating_add(1));
        let new = self.keyring.create(target)?;
        if resumed_target.is_none() {
            rec.detail = Some(format!("started from=v{current} to=v{target}"));
            self.commit(
                vec![Op::PutMeta {
                    key: TARGET.into(),
                    value: target.to_string().into_bytes(),
                }],
                vec![rec.clone()],
            )
            .map_err(crate::audit_failed)?;
        }
        // The service keys, wrapped by the new version beside their old copies.
        let mut ops = vec![];
        for g in self.live_index_generations()? {
            let name = crate::index_keys::root_name(g);
            if self.store.meta(&versioned(&name, target))?.is_some() {
                continue;
            }
            let root = service_key(
                &self.store,
                &self.keyring,
                current,
                &name,
                |_| Err(VaultError::Internal("blind-index root missing".into())),
                |m, w| Ok(m.unwrap_index_root(w)?),
            )?;
            ops.push(Op::PutMetaOnce {
                key: versioned(&name, target),
                value: new.wrap_index_root(&root)?,
            });
        }
        for (name, label) in NAMED {
            if self.store.meta(&versioned(name, target))?.is_some() {
                continue;
            }
            let k = named_service_key(&self.store, &self.keyring, current, name, label)?;
            ops.push(Op::PutMetaOnce {
                key: versioned(name, target),
                value: new.wrap_named(label, &k)?,
            });
        }
        for op in ops {
            match self.commit(vec![op], vec![]) {
                // Another run stored it first (`Exists`).
                Ok(_) | Err(VaultError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
        // The data keys, a batch at a time, each re-wrapped from the version it names.
        let total: u64 = self
            .store
            .master_key_census()?
            .iter()
            .filter(|c| c.0 < target)
            .map(|c| c.1)
            .sum();
        let mut done = 0u64;
        progress(done, total);
        loop {
            let rows = self.store.keys_wrapped_below(target, batch.max(1))?;
            if rows.is_empty() {
                break;
            }
            let mut ops = Vec::with_capacity(rows.len());
            for (patient, wk) in &rows {
                let dk = self.keyring.get(wk.master_version)?.unwrap_data_key(
                    patient,
                    wk.key_version,
                    &wk.wrapped,
                )?;
                ops.push(Op::RewrapPatientKey {
                    patient: patient.clone(),
                    key_version: wk.key_version,
                    from: wk.master_version,
                    to: target,
                    wrapped: new.wrap_data_key(patient, wk.key_version, &dk)?,
                });
            }
            let n = u64::try_from(ops.len()).unwrap_or(0);
            match self.commit(ops.clone(), vec![]) {
                Ok(_) => {}
                // A chart destroyed meanwhile: re-wrap the rest one by one.
                Err(VaultError::Conflict) => {
                    for op in ops {
                        match self.commit(vec![op], vec![]) {
                            Ok(_) | Err(VaultError::Conflict) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            done += n;
            progress(done.min(total.max(done)), total.max(done));
        }
        let mut rec = self.record(c, Operation::KeysRotate.as_str(), Outcome::Success);
        rec.detail = Some(format!(
            "completed from=v{current} to=v{target} rewrapped={done}"
        ));
        self.commit(
            vec![
                Op::PutMeta {
                    key: CURRENT.into(),
                    value: target.to_string().into_bytes(),
                },
                Op::PutMeta {
                    key: TARGET.into(),
                    value: vec![],
                },
            ],
            vec![rec],
        )
        .map_err(crate::audit_failed)?;
        let status = self.key_status_now()?;
        Ok(RotationReport {
            from_version: current,
            to_version: target,
            rewrapped: done,
            resumed: resumed_target.is_some(),
            retired_files: status
                .versions
                .iter()
                .filter(|v| v.state == "retired" && v.file_present)
                .filter_map(|v| v.file.clone())
                .collect(),
        })
    }
}
