//! Audit records as FHIR R4 AuditEvents profiled by IHE Basic Audit Log Patterns (BALP):
//! PatientRead, PatientQuery, PatientCreate/Update/Delete, Login and Logout. Pure rendering;
//! which records a caller may see is the gate's decision.

use serde_json::{json, Map, Value};

use crate::{AuditRecord, Outcome};

const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/";

fn profile_and_action(r: &AuditRecord) -> (&'static str, &'static str, &'static str) {
    // (BALP profile, restful-interaction subtype, AuditEvent.action)
    match r.action.as_str() {
        "read" | "vread" | "history" => ("IHE.BasicAudit.PatientRead", "read", "R"),
        "search" | "everything" => ("IHE.BasicAudit.PatientQuery", "search-type", "E"),
        "create" => ("IHE.BasicAudit.PatientCreate", "create", "C"),
        "update" => ("IHE.BasicAudit.PatientUpdate", "update", "U"),
        "delete" => ("IHE.BasicAudit.PatientDelete", "delete", "D"),
        "logout" => ("IHE.BasicAudit.Logout", "", "E"),
        a if is_authentication(a) => ("IHE.BasicAudit.Login", "", "E"),
        _ => ("IHE.BasicAudit.PatientRead", "", "E"),
    }
}

/// Whether an audit action is an identity event (rendered as BALP Login or Logout, with
/// the user as the authenticating agent).
pub fn is_authentication(action: &str) -> bool {
    // Account and client administration (`user.*`, `client.*`) are identity events too.
    action.starts_with("user.")
        || action.starts_with("client.")
        || matches!(
            action,
            "login"
                | "mfa"
                | "logout"
                | "step-up"
                | "lockout"
                | "password.change"
                | "recovery-codes"
                | "passkey.add"
                | "passkey.revoke"
        )
}

/// One audit record as a BALP AuditEvent (id = its index in the log).
pub fn audit_event(index: u64, r: &AuditRecord) -> Value {
    let (profile, interaction, action) = profile_and_action(r);
    let auth = is_authentication(&r.action);
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
    if let (true, Some(d)) = (auth, &r.detail) {
        // Identity events' details carry no PHI: say what happened ("account from this
        // address locked for 30 s after 5 failures").
        desc = format!("{desc}: {d}");
    }
    ev.insert("outcomeDesc".into(), json!(desc));
    let mut purposes = vec![];
    if let Some(p) = &r.purpose {
        purposes.push(json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}));
    }
    if r.break_glass {
        // HL7 v3 PurposeOfUse BTG: access under an emergency override of policy.
        purposes.push(json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG", "display": "break the glass"}]}));
    }
    if !purposes.is_empty() {
        ev.insert("purposeOfEvent".into(), json!(purposes));
    }
    // The user is the information recipient of a data access, and the authenticating
    // agent (a human user) of an identity event.
    let agent_type = if auth {
        json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser", "display": "human user"}]})
    } else {
        json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]})
    };
    let mut agent = json!({
        "type": agent_type,
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

/// A search of the log as AuditEvents (`GET /fhir/AuditEvent?patient=&agent=&date=&action=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEventQuery {
    pub patient: Option<String>,
    pub agent: Option<String>,
    /// A prefix of the event's instant (`2026`, `2026-11`, `2026-11-29`, …).
    pub date: Option<String>,
    /// `AuditEvent.action`: C, R, U, D or E.
    pub action: Option<String>,
    /// Most events returned, newest first (1 to 1000; default 100).
    pub count: usize,
}

impl AuditEventQuery {
    /// Parses the query parameters.
    ///
    /// # Errors
    /// A message naming an unknown parameter or a bad value.
    pub fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut q = AuditEventQuery {
            patient: None,
            agent: None,
            date: None,
            action: None,
            count: 100,
        };
        for (k, v) in params {
            match k.as_str() {
                "patient" => q.patient = Some(v.strip_prefix("Patient/").unwrap_or(v).to_owned()),
                "agent" => q.agent = Some(v.clone()),
                "date" => q.date = Some(v.strip_prefix("eq").unwrap_or(v).to_owned()),
                "action" if ["C", "R", "U", "D", "E"].contains(&v.as_str()) => {
                    q.action = Some(v.clone())
                }
                "action" => return Err("action is one of C, R, U, D, E".into()),
                "_count" => {
                    q.count = v
                        .parse::<usize>()
                        .map_err(|_| "_count must be a number".to_owned())?
                        .clamp(1, 1000)
                }
                other => {
                    return Err(format!(
                        "unknown AuditEvent search parameter `{}`",
                        other.chars().take(40).collect::<String>()
                    ))
                }
            }
        }
        Ok(q)
    }

    /// Entry `index` as an AuditEvent, if it matches.
    pub fn event(&self, index: u64, r: &AuditRecord) -> Option<Value> {
        let wrong = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_some_and(|w| have != Some(w))
        };
        if wrong(&self.patient, r.patient.as_deref())
            || wrong(&self.agent, Some(r.actor.as_str()))
            || self.date.as_deref().is_some_and(|d| !r.time.starts_with(d))
        {
            return None;
        }
        let ev = audit_event(index, r);
        if wrong(&self.action, ev.get("action").and_then(Value::as_str)) {
            return None;
        }
        Some(ev)
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
            "lockout",
            "step-up",
            "user.disable",
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
