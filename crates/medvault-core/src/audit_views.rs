//! The audit log as FHIR: `GET /fhir/AuditEvent?patient=&agent=&date=&action=`, BALP
//! AuditEvents (`medvault_audit::balp`) for privacy officers and auditors.

use medvault_audit::balp::audit_event;
use medvault_types::Operation;
use serde_json::Value;

use crate::{AuditRecord, Caller, Vault, VaultError};

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
        let Some(mut rec) = self.operate(c, Operation::AuditSearch, patient.as_deref())? else {
            return Err(VaultError::Unauthenticated);
        };
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
