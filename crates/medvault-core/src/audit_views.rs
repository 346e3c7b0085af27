//! The audit log as FHIR: `GET /fhir/AuditEvent?patient=&agent=&date=&action=`, BALP
//! AuditEvents (`medvault_audit::balp`) for privacy officers and auditors.

use medvault_audit::balp::AuditEventQuery;
use medvault_types::Operation;
use serde_json::Value;

use crate::{Caller, Vault, VaultError};

impl Vault {
    /// `GET /fhir/AuditEvent?patient=&agent=&date=&action=`: newest first, at most
    /// `_count`. Policy action `audit.search`; reading the log is itself audited.
    pub fn audit_events(
        &self,
        c: &Caller,
        params: &[(String, String)],
    ) -> Result<Vec<Value>, VaultError> {
        let q = AuditEventQuery::parse(params).map_err(VaultError::BadRequest)?;
        let Some(mut rec) = self.operate(c, Operation::AuditSearch, q.patient.as_deref())? else {
            return Err(VaultError::Unauthenticated);
        };
        let out = self.scan_back(q.count, |index, r| q.event(index, &r))?;
        rec.detail = Some(format!("returned={}", out.len()));
        self.audit(vec![rec])?;
        Ok(out)
    }
}
