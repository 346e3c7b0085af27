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
        self.ix()
            .blind
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
        // `since` is a FHIR date or instant (its interval's start, in UTC); a malformed one
        // is refused before anything is written, not compared as text.
        let since = since
            .map(|v| {
                medvault_fhir::date::parse(v)
                    .map(|i| i.start)
                    .map_err(|m| VaultError::BadRequest(format!("--since {m}")))
            })
            .transpose()?;
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
                if let Some(s) = since {
                    match medvault_fhir::date::parse(&r.time) {
                        Ok(t) if t.start >= s => {}
                        _ => continue,
                    }
                }
                let line = r.siem_line(row.seq, &|v| self.keyed_pseudonym(v));
                match writeln!(out, "{line}") {
                    Ok(()) => written += 1,
                    // The reader went away (`audit export | head`): stop, quietly.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(written),
                    Err(e) => return Err(VaultError::Internal(e.to_string())),
                }
            }
        }
        Ok(written)
    }
}
