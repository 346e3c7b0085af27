//! Operations for security administrators: status and key eviction. No PHI.

use medvault_types::{Operation, PatientId};

use crate::{Caller, Vault, VaultError};

/// What `GET /api/status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub key_cache_entries: usize,
    pub audit_entries: u64,
}

impl Vault {
    /// Drops a patient's cached data key here and on every server sharing the store
    /// (what shredding and key rotation rely on). Policy action `keys.evict`; audited.
    ///
    /// # Errors
    /// Denied by policy; `BadRequest` for an invalid patient id.
    pub fn evict_key(&self, c: &Caller, patient: &str) -> Result<(), VaultError> {
        let rec = self.operate(c, Operation::EvictKey, Some(patient))?;
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        if let Some(rec) = rec {
            self.audit(vec![rec])?;
        }
        self.keys.evict(&pid);
        Ok(self.store.announce_key_eviction(&pid)?)
    }

    /// Operational status (no PHI): backend, cache and log sizes. Policy action `status`.
    pub fn status(&self, c: &Caller) -> Result<Status, VaultError> {
        self.permit_operation(c, Operation::Status, None)?;
        Ok(Status {
            backend: self.store.backend(),
            key_cache_entries: self.keys.len(),
            audit_entries: self.store.audit_len()?,
        })
    }
}
