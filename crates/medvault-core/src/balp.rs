//! The audit log as FHIR R4 AuditEvents profiled by IHE Basic Audit Log Patterns (BALP).

use medvault_audit::{AuditRecord, Outcome};
use medvault_store::Op;
use serde_json::{json, Map, Value};

use crate::{Caller, Role, Vault, VaultError};

const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/";

fn profile_and_action(r: &AuditRecord) -> (&'static str, &'static str, &'static str) {
    // (BALP profile, restful-interaction subtype, AuditEvent.action)
    match r.action.as_str() {
        "read" | "vread" | "history" => ("IHE.BasicAudit.PatientRead", "read", "R"),
        "search" | "everything" => ("IHE.BasicAudit.PatientQuery", "search-type", "E"),
        "create" => ("IHE.BasicAudit.PatientCreate", "create", "C"),
        "update" => ("IHE.BasicAudit.PatientUpdate", "update", "U"),
        "delete" => ("IHE.BasicAudit.PatientDelete", "delete", "D"),
        "login" | "mfa" => ("IHE.BasicAudit.Login", "", "E"),
        "logout" => ("IHE.BasicAudit.Logout", "", "E"),
        _ => ("IHE.BasicAudit.PatientRead", "", "E"),
    }
}

/// One audit record as a BALP AuditEvent (id = its index in the log).
pub fn audit_event(index: u64, r: &AuditRecord) -> Value {
    let (profile, interaction, action) = profile_and_action(r);
    let auth = matches!(r.action.as_str(), "login" | "mfa" | "logout");
    let mut ev = Map::new();
    ev.insert("resourceType".into(), json!("AuditEvent"));
    ev.insert("id".into(), json!(index.to_string()));
    ev.insert(
        "meta".into(),
        json!({"profile": [format!("{BALP}{profile}")]}),
    );
    if auth {
        ev.insert("type".into(), json!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110114", "display": "User Authentication"}));
        let sub = if r.action == "logout" {
            ("110123", "Logout")
        } else {
            ("110122", "Login")
        };
        ev.insert("subtype".into(), json!([{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": sub.0, "display": sub.1}]));
    } else {
        ev.insert("type".into(), json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"}));
        if !interaction.is_empty() {
            ev.insert(
                "subtype".into(),
                json!([{"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}]),
            );
        }
    }
    ev.insert("action".into(), json!(action));
    ev.insert("recorded".into(), json!(r.time));
    let (code, desc) = match r.outcome {
        Outcome::Success => ("0", "success"),
        Outcome::NotFound => ("4", "not found"),
        Outcome::Denied => ("4", "denied by policy"),
        Outcome::Failure => ("4", "failed"),
    };
    ev.insert("outcome".into(), json!(code));
    let mut desc = desc.to_owned();
    if !r.categories_withheld.is_empty() {
        desc.push_str(&format!("; withheld: {}", r.categories_withheld.join(", ")));
    }
    ev.insert("outcomeDesc".into(), json!(desc));
    if let Some(p) = &r.purpose {
        ev.insert("purposeOfEvent".into(), json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}]));
    }
    let mut agent = json!({
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]},
        "who": {"identifier": {"system": "https://medvault.dev/sid/username", "value": r.actor}},
        "requestor": true
    });
    if let (Some(role), Some(a)) = (&r.role, agent.as_object_mut()) {
        a.insert(
            "role".into(),
            json!([{"coding": [{"system": "https://medvault.dev/role", "code": role}]}]),
        );
    }
    if let (Some(src), Some(a)) = (&r.source, agent.as_object_mut()) {
        a.insert("network".into(), json!({"address": src, "type": "2"}));
    }
    ev.insert("agent".into(), json!([agent]));
    ev.insert("source".into(), json!({"observer": {"display": "medvault"},
        "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]}));
    let mut entities = vec![];
    if let Some(p) = &r.patient {
        entities.push(json!({"what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}}));
    }
    if let Some(res) = &r.resource {
        if res.contains('/') {
            entities.push(json!({"what": {"reference": res},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"}}));
        }
    }
    if let Some(rid) = (!r.request_id.is_empty()).then_some(&r.request_id) {
        entities.push(json!({"what": {"identifier": {"value": rid}},
            "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType", "code": "XrequestId"}}));
    }
    if !entities.is_empty() {
        ev.insert("entity".into(), Value::Array(entities));
    }
    Value::Object(ev)
}

impl Vault {
    /// `GET /fhir/AuditEvent?patient=&agent=&date=&action=` for privacy officers and auditors:
    /// newest first, at most `count`. Reading the log is itself audited.
    pub fn audit_events(
        &self,
        c: &Caller,
        params: &[(String, String)],
    ) -> Result<Vec<Value>, VaultError> {
        let (mut patient, mut agent, mut date, mut action, mut count) =
            (None, None, None, None, 100usize);
        for (k, v) in params {
            match k.as_str() {
                "patient" => patient = Some(v.strip_prefix("Patient/").unwrap_or(v).to_owned()),
                "agent" => agent = Some(v.clone()),
                "date" => date = Some(v.strip_prefix("eq").unwrap_or(v).to_owned()),
                "action" => {
                    if !["C", "R", "U", "D", "E"].contains(&v.as_str()) {
                        return Err(VaultError::BadRequest(
                            "action is one of C, R, U, D, E".into(),
                        ));
                    }
                    action = Some(v.clone())
                }
                "_count" => {
                    count = v
                        .parse::<usize>()
                        .map_err(|_| VaultError::BadRequest("_count must be a number".into()))?
                        .clamp(1, 1000)
                }
                other => {
                    return Err(VaultError::BadRequest(format!(
                        "unknown AuditEvent search parameter `{}`",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        let mut rec = self.record(c, "audit.search", Outcome::Success);
        rec.patient = patient.clone();
        if !matches!(c.principal.role, Role::PrivacyOfficer | Role::Auditor) {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        let total = self.store.audit_len()?;
        let mut out = vec![];
        let mut end = total;
        while end > 0 && out.len() < count {
            let start = end.saturating_sub(5_000);
            let rows = self.store.audit_range(start, end)?;
            for row in rows.iter().rev() {
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                if patient
                    .as_ref()
                    .is_some_and(|p| r.patient.as_deref() != Some(p.as_str()))
                    || agent.as_ref().is_some_and(|a| &r.actor != a)
                    || date
                        .as_ref()
                        .is_some_and(|d| !r.time.starts_with(d.as_str()))
                {
                    continue;
                }
                let ev = audit_event(row.seq, &r);
                if action
                    .as_ref()
                    .is_some_and(|a| ev.get("action").and_then(Value::as_str) != Some(a.as_str()))
                {
                    continue;
                }
                out.push(ev);
                if out.len() >= count {
                    break;
                }
            }
            end = start;
        }
        rec.detail = Some(format!("returned={}", out.len()));
        self.audit(vec![rec])?;
        Ok(out)
    }
}

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

    fn require_privacy(&self, c: &Caller, action: &str, patient: &str) -> Result<(), VaultError> {
        let mut rec = self.record(c, action, Outcome::Success);
        rec.patient = Some(patient.to_owned());
        if !matches!(c.principal.role, Role::PrivacyOfficer | Role::Auditor) {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        self.audit(vec![rec])
    }

    /// `GET /api/patients/{id}/access-report`: who accessed the chart, when, which categories,
    /// for what purpose (newest first).
    pub fn access_report(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        self.require_privacy(c, "audit.access-report", patient)?;
        self.patient_history(patient, &|r| !r.action.starts_with("audit."), 10_000)
    }

    /// `GET /api/patients/{id}/disclosures`: the HIPAA accounting of disclosures — recorded
    /// disclosures and accesses for purposes outside treatment, payment and operations, in the
    /// six years before `now`.
    pub fn disclosures(&self, c: &Caller, patient: &str) -> Result<Vec<Access>, VaultError> {
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        self.require_privacy(c, "audit.disclosures", patient)?;
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
        let mut rec = self.record(c, "disclosure", Outcome::Success);
        rec.patient = Some(patient.to_owned());
        rec.purpose = Some(purpose.as_str().to_owned());
        if !matches!(c.principal.role, Role::PrivacyOfficer) {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
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

impl Vault {
    /// The keyed pseudonym (HMAC) `audit export` puts in place of an identifier; an
    /// investigator computes it for a known user or patient to find their lines.
    pub fn pseudonym(&self, value: &str) -> String {
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
        since: Option<&str>,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, VaultError> {
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
                let line = json!({
                    "index": row.seq,
                    "time": r.time,
                    "action": r.action,
                    "outcome": r.outcome,
                    "actor": self.pseudonym(&r.actor),
                    "role": r.role,
                    "patient": r.patient.as_deref().map(|p| self.pseudonym(p)),
                    "resource_type": r.resource.as_deref().and_then(|x| x.split('/').next()),
                    "categories_disclosed": r.categories_disclosed,
                    "categories_withheld": r.categories_withheld,
                    "purpose": r.purpose,
                    "source": r.source.as_deref().map(|s| self.pseudonym(s)),
                    "request_id": r.request_id,
                });
                writeln!(out, "{line}").map_err(|e| VaultError::Internal(e.to_string()))?;
                written += 1;
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balp_events_validate_as_fhir_r4() {
        for action in [
            "read",
            "search",
            "create",
            "update",
            "delete",
            "login",
            "mfa",
            "logout",
            "everything",
        ] {
            for outcome in [Outcome::Success, Outcome::Denied, Outcome::NotFound] {
                let mut r = AuditRecord::new(
                    action,
                    "dr.who",
                    outcome,
                    "2026-11-24T10:00:00.000Z".into(),
                    "req-1",
                );
                r.role = Some("physician".into());
                r.purpose = Some("TREAT".into());
                r.source = Some("127.0.0.1".into());
                r.patient = Some("p-1".into());
                r.resource = Some("Observation/o-1/_history/2".into());
                r.categories_withheld = vec!["billing".into()];
                let ev = audit_event(7, &r);
                if let Err(issues) = medvault_fhir::validate_any(ev.as_object().unwrap()) {
                    panic!("{action}: {issues:?}\n{ev}");
                }
            }
        }
    }
}
