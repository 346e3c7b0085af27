//! `medvault audit export`: the audit log as JSON lines for a SIEM, identifiers replaced by
//! keyed pseudonyms (HMAC under the blind-index key).

use medvault_types::Operation;

use crate::{AuditRecord, Caller, Vault, VaultError};

impl Vault {
    /// The keyed pseudonym (HMAC) `audit export` puts in place of an identifier; an
    /// investigator computes it for a known user or patient to find their lines.
    pub fn pseudonym(&self, c: &Caller, value: &str) -> Result<String, VaultError> {
        self.permit_operation(c, Operation::AuditExport, None)?;
        Ok(self.keyed_pseudonym(value))
    }

    fn keyed_pseudonym(&self, value: &str) -> String {
        self.indexer
            .token("audit-export", "id", value)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `medvault audit export`: JSON lines for a SIEM, oldest first, from `since` (a FHIR
    /// instant prefix) on; users, patients and source addresses replaced by keyed HMACs.
    pub fn export_audit(
        &self,
        c: &Caller,
        since: Option<&str>,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, VaultError> {
        self.permit_operation(c, Operation::AuditExport, None)?;
        let total = self.store.audit_len()?;
        let mut written = 0u64;
        let mut at = 0u64;
        while at < total {
            let rows = self
                .store
                .audit_range(at, total.min(at.saturating_add(10_000)))?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                at = row.seq + 1;
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                if since.is_some_and(|s| r.time.as_str() < s) {
                    continue;
                }
                let line = r.siem_line(row.seq, &|v| self.keyed_pseudonym(v));
                writeln!(out, "{line}").map_err(|e| VaultError::Internal(e.to_string()))?;
                written += 1;
            }
        }
        Ok(written)
    }
}
