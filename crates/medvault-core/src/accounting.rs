//! Privacy reports over the audit log: who accessed a chart (access report), the HIPAA
//! accounting of disclosures (45 CFR 164.528), and disclosures made outside the system,
//! recorded with their free text sealed under the patient's data key. The rules are
//! `medvault_audit::accounting`; the free text opens only under the report's permission.

use medvault_audit::accounting::{
    accountable, in_access_report, text_aad, text_id, Access, DisclosureText, RECIPIENT_KINDS,
    RECORDED_DISCLOSURE,
};
use medvault_store::Op;
use medvault_types::{Category, Operation, PatientId, Purpose};

use crate::typestate::{self, Permitted};
use crate::{AuditRecord, Caller, Outcome, Vault, VaultError};

/// The most lines a report returns (newest first).
const REPORT_LIMIT: usize = 10_000;

fn patient_id(patient: &str) -> Result<PatientId, VaultError> {
    PatientId::new(patient).map_err(|_| VaultError::BadRequest("invalid patient id".into()))
}

impl Vault {
    /// Reads the log newest first, keeping up to `limit` of what `keep` makes of each
    /// `(index, record)` (records that do not parse are skipped).
    pub(crate) fn scan_back<T>(
        &self,
        limit: usize,
        keep: impl FnMut(u64, AuditRecord) -> Option<T>,
    ) -> Result<Vec<T>, VaultError> {
        self.scan_back_from(None, limit, keep)
    }

    /// As [`Vault::scan_back`], parsing only the entries whose canonical bytes contain
    /// `needle` (a whole-log scan for a rare action, such as the shred ledger, need not
    /// decode every entry).
    pub(crate) fn scan_back_containing<T>(
        &self,
        needle: &[u8],
        mut keep: impl FnMut(u64, AuditRecord) -> Option<T>,
    ) -> Result<Vec<T>, VaultError> {
        let finder = memchr::memmem::Finder::new(needle);
        let mut out = vec![];
        let mut end = self.store.audit_len()?;
        while end > 0 {
            let start = end.saturating_sub(20_000);
            for row in self.store.audit_range(start, end)?.into_iter().rev() {
                if finder.find(&row.record).is_none() {
                    continue;
                }
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                out.extend(keep(row.seq, r));
            }
            end = start;
        }
        Ok(out)
    }

    /// As [`Vault::scan_back`], starting below entry `before` (or at the end of the log).
    pub(crate) fn scan_back_from<T>(
        &self,
        before: Option<u64>,
        limit: usize,
        mut keep: impl FnMut(u64, AuditRecord) -> Option<T>,
    ) -> Result<Vec<T>, VaultError> {
        let mut out = vec![];
        let len = self.store.audit_len()?;
        let mut end = before.map_or(len, |b| b.min(len));
        while end > 0 && out.len() < limit {
            let start = end.saturating_sub(5_000);
            for row in self.store.audit_range(start, end)?.into_iter().rev() {
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                if let Some(t) = keep(row.seq, r) {
                    out.push(t);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            end = start;
        }
        Ok(out)
    }

    /// A patient's entries that `include` keeps, as report lines, with recorded
    /// disclosures' free text opened under `permission`.
    fn patient_history(
        &self,
        permission: &Permitted<Operation>,
        pid: &PatientId,
        include: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<Access>, VaultError> {
        self.scan_back(REPORT_LIMIT, |index, r| {
            if r.patient.as_deref() != Some(pid.as_str()) || !include(&r) {
                return None;
            }
            let text = text_id(&r)
                .map(|id| self.disclosure_text(permission, pid, id))
                .unwrap_or_default();
            Some(Access::new(index, r, text))
        })
    }

    /// `GET /api/patients/{id}/access-report`: who accessed the chart, when, which categories,
    /// for what purpose (newest first). Policy action `audit.access-report`.
    pub fn access_report(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        let pid = patient_id(patient)?;
        let permission = self.permit_operation(c, Operation::AccessReport, Some(patient))?;
        self.patient_history(&permission, &pid, &in_access_report)
    }

    /// `GET /api/patients/{id}/disclosures`: the HIPAA accounting of disclosures — recorded
    /// disclosures and accesses for purposes outside treatment, payment and operations, in the
    /// six years before now. Policy action `audit.disclosures`.
    pub fn disclosures(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        let pid = patient_id(patient)?;
        let permission = self.permit_operation(c, Operation::Disclosures, Some(patient))?;
        let since =
            medvault_types::fhir_instant(self.clock.now() - time::Duration::days(6 * 365 + 1));
        self.patient_history(&permission, &pid, &|r| accountable(r, &since))
    }

    /// The sealed free text `id` of a disclosure, or nothing if it is gone with the
    /// patient's key (destroyed means destroyed).
    fn disclosure_text(
        &self,
        permission: &Permitted<Operation>,
        pid: &PatientId,
        id: &str,
    ) -> DisclosureText {
        let opened = (|| {
            let sealed = self.store.meta(&format!("disclosure/{id}")).ok()??;
            let aad = text_aad(id, pid.as_str());
            self.ciphers_for(pid)
                .ok()?
                .iter()
                .find_map(|c| typestate::open_text(permission, c, &aad, &sealed).ok())
        })();
        opened.unwrap_or_default()
    }

    /// `POST /api/disclosures`: records a disclosure made outside the system in the audit log.
    /// The recipient is a kind from [`RECIPIENT_KINDS`]; the recipient's name and address and
    /// a description of what was disclosed ([`DisclosureText`]) are sealed under the
    /// patient's data key in the same transaction, and the audit record carries only a
    /// pointer to them. Policy action `disclosure.record`. Returns the record's log index.
    pub fn record_disclosure(
        &self,
        c: &Caller,
        patient: &str,
        recipient: &str,
        purpose: &str,
        categories: &[String],
        text: &DisclosureText,
    ) -> Result<u64, VaultError> {
        let pid = patient_id(patient)?;
        let purpose: Purpose = purpose
            .parse()
            .map_err(|_| VaultError::BadRequest("unknown purpose of use code".into()))?;
        if !RECIPIENT_KINDS.contains(&recipient) {
            return Err(VaultError::BadRequest(format!(
                "recipient must be one of {}",
                RECIPIENT_KINDS.join(", ")
            )));
        }
        text.check().map_err(VaultError::BadRequest)?;
        for cat in categories {
            cat.parse::<Category>()
                .map_err(|_| VaultError::BadRequest("unknown data category".into()))?;
        }
        let Some(mut rec) = self.operate(c, Operation::RecordDisclosure, Some(patient))? else {
            return Err(VaultError::Unauthenticated);
        };
        // A disclosure that needs an authorization (164.508) is refused without one on file.
        let basis = match self.disclosure_basis(pid.as_str(), recipient, purpose.as_str()) {
            Ok(b) => b,
            Err(e) => {
                rec.outcome = Outcome::Failure;
                rec.detail = Some("refused: no authorization on file".into());
                self.audit(vec![rec])?;
                return Err(e);
            }
        };
        rec.action = RECORDED_DISCLOSURE.into();
        rec.purpose = Some(purpose.as_str().to_owned());
        let basis = basis.map(|b| format!(" {b}")).unwrap_or_default();
        rec.detail = Some(format!("recipient={recipient}{basis}"));
        rec.categories_disclosed = categories.to_vec();
        let mut ops = vec![];
        if !text.is_empty() {
            if self.store.patient_key(&pid)?.is_none() {
                return Err(VaultError::NotFound);
            }
            let id = medvault_types::random_uuid();
            let plain =
                serde_json::to_vec(text).map_err(|e| VaultError::Internal(e.to_string()))?;
            let sealed = self
                .cipher_for(&pid)?
                .seal(&text_aad(&id, patient), &plain)?;
            ops.push(Op::PutMetaOnce {
                key: format!("disclosure/{id}"),
                value: sealed,
            });
            rec.detail = Some(format!("recipient={recipient}{basis} text={id}"));
        }
        let committed = self.commit(ops, vec![rec])?;
        committed
            .audit_seqs
            .first()
            .copied()
            .ok_or(VaultError::Internal("no audit sequence".into()))
    }
}
