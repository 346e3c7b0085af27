//! Privacy reports over the audit log: who accessed a chart (access report), the HIPAA
//! accounting of disclosures (45 CFR 164.528), and disclosures made outside the system,
//! recorded with their free text sealed under the patient's data key.

use medvault_store::Op;
use medvault_types::Operation;

use crate::{AuditRecord, Caller, Outcome, Vault, VaultError};

/// One line of a patient's access report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Access {
    pub index: u64,
    pub time: String,
    pub who: String,
    pub role: Option<String>,
    pub action: String,
    pub outcome: Outcome,
    pub categories: Vec<String>,
    pub withheld: Vec<String>,
    pub purpose: Option<String>,
    pub detail: Option<String>,
    /// For a recorded disclosure: who received it (name, address), decrypted for the report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    /// For a recorded disclosure: a brief description of what was disclosed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The free text of a recorded disclosure (45 CFR 164.528(b)(2): the recipient's name and
/// address, a description of what was disclosed). It may name people and conditions, so it
/// is sealed under the patient's data key, never put in the audit record, and destroyed
/// with the patient's key.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DisclosureText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn text_aad(id: &str, patient: &str) -> Vec<u8> {
    format!("disclosure|{id}|{patient}").into_bytes()
}

/// Kinds of recipient a recorded disclosure may name.
pub const RECIPIENT_KINDS: &[&str] = &[
    "public_health",
    "health_oversight",
    "law_enforcement",
    "court_order",
    "research",
    "coroner",
    "organ_procurement",
    "other",
];

/// Purposes that are treatment, payment or health-care operations (45 CFR 164.528(a)(1)(i)
/// exempts those from the accounting of disclosures).
const TPO: &[&str] = &["TREAT", "ETREAT", "HPAYMT", "HOPERAT", "COVERAGE"];

impl Vault {
    fn patient_history(
        &self,
        patient: &str,
        filter: &dyn Fn(&AuditRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<Access>, VaultError> {
        let total = self.store.audit_len()?;
        let mut out = vec![];
        let mut end = total;
        while end > 0 && out.len() < limit {
            let start = end.saturating_sub(5_000);
            for row in self.store.audit_range(start, end)?.iter().rev() {
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                if r.patient.as_deref() != Some(patient) || !filter(&r) {
                    continue;
                }
                let detail = if r.action == "disclosure" {
                    r.detail.clone()
                } else {
                    None
                };
                let text = match &detail {
                    Some(d) => self.disclosure_text(patient, d),
                    None => DisclosureText::default(),
                };
                out.push(Access {
                    recipient_name: text.recipient_name,
                    description: text.description,
                    index: row.seq,
                    time: r.time,
                    who: r.actor,
                    role: r.role,
                    action: r.action,
                    outcome: r.outcome,
                    categories: r.categories_disclosed,
                    withheld: r.categories_withheld,
                    purpose: r.purpose,
                    detail,
                });
                if out.len() >= limit {
                    break;
                }
            }
            end = start;
        }
        Ok(out)
    }

    /// `GET /api/patients/{id}/access-report`: who accessed the chart, when, which categories,
    /// for what purpose (newest first).
    pub fn access_report(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        self.operate_now(c, Operation::AccessReport, Some(patient))?;
        self.patient_history(patient, &|r| !r.action.starts_with("audit."), 10_000)
    }

    /// `GET /api/patients/{id}/disclosures`: the HIPAA accounting of disclosures — recorded
    /// disclosures and accesses for purposes outside treatment, payment and operations, in the
    /// six years before `now`.
    pub fn disclosures(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        self.operate_now(c, Operation::Disclosures, Some(patient))?;
        let since =
            medvault_types::fhir_instant(self.clock.now() - time::Duration::days(6 * 365 + 1));
        self.patient_history(
            patient,
            &|r| {
                r.time >= since
                    && r.outcome == Outcome::Success
                    && (r.action == "disclosure"
                        || (!r.categories_disclosed.is_empty()
                            && r.purpose.as_deref().is_some_and(|p| !TPO.contains(&p))))
            },
            10_000,
        )
    }

    /// The sealed free text a disclosure record points to (`text=<id>` in its detail), or
    /// nothing if there is none or the patient's key is gone (destroyed means destroyed).
    fn disclosure_text(&self, patient: &str, detail: &str) -> DisclosureText {
        let Some(id) = detail
            .split(' ')
            .find_map(|part| part.strip_prefix("text="))
        else {
            return DisclosureText::default();
        };
        let opened = (|| {
            let pid = medvault_types::PatientId::new(patient).ok()?;
            let sealed = self.store.meta(&format!("disclosure/{id}")).ok()??;
            let cipher = self.cipher_for(&pid).ok()?;
            let plain = cipher.open(&text_aad(id, patient), &sealed).ok()?;
            serde_json::from_slice::<DisclosureText>(&plain).ok()
        })();
        opened.unwrap_or_default()
    }

    /// `POST /api/disclosures`: records a disclosure made outside the system in the audit log.
    /// The recipient is a kind from [`RECIPIENT_KINDS`]; the recipient's name and address and
    /// a description of what was disclosed ([`DisclosureText`]) are sealed under the
    /// patient's data key in the same transaction, and the audit record carries only a
    /// pointer to them.
    pub fn record_disclosure(
        &self,
        c: &Caller,
        patient: &str,
        recipient: &str,
        purpose: &str,
        categories: &[String],
        text: &DisclosureText,
    ) -> Result<u64, VaultError> {
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        let purpose: medvault_types::Purpose = purpose
            .parse()
            .map_err(|_| VaultError::BadRequest("unknown purpose of use code".into()))?;
        if !RECIPIENT_KINDS.contains(&recipient) {
            return Err(VaultError::BadRequest(format!(
                "recipient must be one of {}",
                RECIPIENT_KINDS.join(", ")
            )));
        }
        for (field, value, max) in [
            ("recipient_name", &text.recipient_name, 500),
            ("description", &text.description, 2000),
        ] {
            if let Some(v) = value {
                if v.trim().is_empty()
                    || v.chars().count() > max
                    || v.chars().any(|ch| ch.is_control() && ch != '\n')
                {
                    return Err(VaultError::BadRequest(format!(
                        "{field} must be 1 to {max} characters of text"
                    )));
                }
            }
        }
        for cat in categories {
            cat.parse::<medvault_types::Category>()
                .map_err(|_| VaultError::BadRequest("unknown data category".into()))?;
        }
        let Some(mut rec) = self.operate(c, Operation::RecordDisclosure, Some(patient))? else {
            return Err(VaultError::Unauthenticated);
        };
        // The log's word for a recorded disclosure (what the accounting looks for).
        rec.action = "disclosure".into();
        rec.purpose = Some(purpose.as_str().to_owned());
        rec.detail = Some(format!("recipient={recipient}"));
        rec.categories_disclosed = categories.to_vec();
        let mut ops = vec![];
        if text.recipient_name.is_some() || text.description.is_some() {
            let pid = medvault_types::PatientId::new(patient)
                .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
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
            rec.detail = Some(format!("recipient={recipient} text={id}"));
        }
        let committed = self.commit(ops, vec![rec])?;
        committed
            .audit_seqs
            .first()
            .copied()
            .ok_or(VaultError::Internal("no audit sequence".into()))
    }
}
