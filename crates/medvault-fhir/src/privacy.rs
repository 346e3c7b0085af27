//! Privacy facts a record carries, as the gate indexes them (blind) and the policy decides
//! on them: HL7 security labels on `meta.security` (FHIR R4 §Security Labels) and patient
//! privacy consents (FHIR R4 §Consent, scope `patient-privacy`).
//!
//! - **Labels** that need an explicit grant (SPEC "Access control"): confidentiality `R`
//!   (restricted) and `V` (very restricted), and the sensitivity codes `PSY`, `PSYTHPN`
//!   (psychotherapy notes), `ETH` and `SUD` (substance use, 42 CFR Part 2), `HIV`, `STD`,
//!   `SDV`, `SEX`, `GDIS`, and `CELEB` / `EMP` (a VIP's or an employee's chart, as `R`).
//!   Other labels (`N`, `M`, `L`, `U`) need nothing.
//! - **Consents**: an `active` Consent whose `scope` is `patient-privacy` contributes its
//!   provisions (the root and one level of nested ones). A `deny` provision denies its
//!   actors (`provision.actor.reference` to a `Practitioner`; none = everyone) the records
//!   of its data classes (`provision.class`, FHIR resource type names, mapped to medvault's
//!   categories; none = every category) and of its `securityLabel`s. A `permit` provision
//!   with `securityLabel`s is the explicit grant those labels need, for its actors.

use serde_json::{Map, Value};

use crate::{categories_of_type, ResourceType};

/// Security label codes that need an explicit grant.
pub const RESTRICTING_LABELS: &[&str] = &[
    "R", "V", "PSY", "PSYTHPN", "ETH", "SUD", "HIV", "STD", "SDV", "SEX", "GDIS", "CELEB", "EMP",
];

/// The label that never reaches the patient portal or billing, and that emergency access
/// does not open: psychotherapy notes (45 CFR 164.501, 164.508(a)(2)).
pub const PSYCHOTHERAPY_NOTES: &str = "PSYTHPN";

/// Labels emergency (break-the-glass for a medical emergency) access opens without a
/// grant: every restricting label but psychotherapy notes.
pub fn emergency_opens(label: &str) -> bool {
    label != PSYCHOTHERAPY_NOTES
}

/// The mark a clinician puts on a record to keep it from the patient portal (the 45 CFR
/// 171.201 preventing-harm exception): `meta.security` code `withheld-from-patient` in the
/// system [`MEDVAULT_LABELS`]. It restricts nobody else.
pub const WITHHELD_FROM_PATIENT: &str = "withheld-from-patient";
/// medvault's own security-label code system (for the one mark HL7 has no code for).
pub const MEDVAULT_LABELS: &str = "https://medvault.dev/CodeSystem/security-label";

/// The restricting labels on a resource's `meta.security` (and the withheld-from-patient
/// mark), each once.
pub fn labels(json: &Map<String, Value>) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = vec![];
    let codes = json
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array);
    for c in codes.into_iter().flatten() {
        let code = c.get("code").and_then(Value::as_str).unwrap_or("");
        if let Some(l) = RESTRICTING_LABELS.iter().find(|l| **l == code) {
            if !out.contains(l) {
                out.push(l);
            }
        }
        let ours = c.get("system").and_then(Value::as_str) == Some(MEDVAULT_LABELS);
        if ours && code == WITHHELD_FROM_PATIENT && !out.contains(&WITHHELD_FROM_PATIENT) {
            out.push(WITHHELD_FROM_PATIENT);
        }
    }
    out
}

/// Marks a 42 CFR Part 2 record (labelled `SUD` or `ETH`) on its way out with the HL7
/// obligation `NORDSCLCD` ("no redisclosure without consent directive"), the notice 42 CFR
/// 2.32 requires with every disclosure of such a record. Idempotent.
pub fn mark_redisclosure(json: &mut Map<String, Value>) {
    let part2 = labels(json).iter().any(|l| *l == "SUD" || *l == "ETH");
    if !part2 {
        return;
    }
    let meta = json
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let security = meta
        .entry("security")
        .or_insert_with(|| Value::Array(vec![]));
    let Some(list) = security.as_array_mut() else {
        return;
    };
    if !list
        .iter()
        .any(|c| c.get("code").and_then(Value::as_str) == Some("NORDSCLCD"))
    {
        list.push(serde_json::json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "NORDSCLCD",
            "display": "no redisclosure without consent directive"
        }));
    }
}

/// Whom a consent provision names: a Practitioner id, or everyone.
pub const ANYONE: &str = "*";

/// What a consent provision denies: a category (`demographics`, `vitals`, …), a label
/// (`label:HIV`), or everything (`*`).
fn denied_targets(p: &Value) -> Vec<String> {
    let mut out = vec![];
    for c in p
        .get("class")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rt) = c
            .get("code")
            .and_then(Value::as_str)
            .and_then(ResourceType::parse)
        else {
            continue;
        };
        for cat in categories_of_type(rt) {
            let t = cat.as_str().to_owned();
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    for l in p
        .get("securityLabel")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(code) = l.get("code").and_then(Value::as_str) {
            out.push(format!("label:{code}"));
        }
    }
    if out.is_empty() {
        out.push(ANYONE.to_owned());
    }
    out
}

/// The Practitioners a provision names; everyone when it names no actor at all; nobody
/// medvault can identify when its actors are not Practitioners (an insurer, a relative).
fn actors(p: &Value) -> Vec<String> {
    let mut out = vec![];
    let listed = p.get("actor").and_then(Value::as_array);
    for a in listed.into_iter().flatten() {
        let r = a
            .get("reference")
            .and_then(|r| r.get("reference"))
            .and_then(Value::as_str);
        if let Some(id) = r.and_then(|r| r.strip_prefix("Practitioner/")) {
            if medvault_types::is_fhir_id(id) {
                out.push(id.to_owned());
            }
        }
    }
    if listed.is_none_or(|l| l.is_empty()) {
        out.push(ANYONE.to_owned());
    }
    out
}

/// What medvault cannot enforce in a patient-privacy Consent, as sentences (empty when it
/// can all be enforced): an actor that is not a `Practitioner/{id}`, a class that is not a
/// resource type medvault stores, a security label it does not know, and a root `deny`
/// with nested exceptions (express it as a root `permit` with nested `deny`s).
pub fn consent_problems(rt: ResourceType, json: &Map<String, Value>) -> Vec<String> {
    if rt.as_str() != "Consent" || !in_force(json) {
        return vec![];
    }
    let mut out = vec![];
    let Some(root) = json.get("provision") else {
        return out;
    };
    let nested: Vec<&Value> = root
        .get("provision")
        .and_then(Value::as_array)
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    if root.get("type").and_then(Value::as_str) == Some("deny") && !nested.is_empty() {
        out.push("a root deny with nested exceptions is not enforced; record a root permit with nested deny provisions".into());
    }
    for p in std::iter::once(root).chain(nested.iter().copied()) {
        for unsupported in ["period", "data", "purpose", "action", "code", "dataPeriod"] {
            if p.get(unsupported).is_some() {
                out.push(format!(
                    "provision.{unsupported} is not enforced; record the provision without it"
                ));
            }
        }
    }
    for p in &nested {
        if p.get("provision").is_some() {
            out.push("provisions nested more than one level are not enforced".into());
        }
    }
    for p in std::iter::once(root).chain(nested) {
        for a in p
            .get("actor")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = a
                .get("reference")
                .and_then(|r| r.get("reference"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let ok = r
                .strip_prefix("Practitioner/")
                .is_some_and(medvault_types::is_fhir_id);
            if !ok {
                out.push(format!(
                    "provision.actor.reference must be Practitioner/{{id}}, not `{}`",
                    r.chars().take(60).collect::<String>()
                ));
            }
        }
        for c in p
            .get("class")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let code = c.get("code").and_then(Value::as_str).unwrap_or("");
            if ResourceType::parse(code).is_none() {
                out.push(format!(
                    "provision.class `{}` is not a resource type medvault stores",
                    code.chars().take(40).collect::<String>()
                ));
            }
        }
        for l in p
            .get("securityLabel")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let code = l.get("code").and_then(Value::as_str).unwrap_or("");
            if !RESTRICTING_LABELS.contains(&code) {
                out.push(format!(
                    "provision.securityLabel `{}` is not one medvault enforces ({})",
                    code.chars().take(40).collect::<String>(),
                    RESTRICTING_LABELS.join(", ")
                ));
            }
        }
    }
    out
}

/// Whether a Consent is an active patient-privacy consent.
fn in_force(json: &Map<String, Value>) -> bool {
    let active = json.get("status").and_then(Value::as_str) == Some("active");
    let privacy = json
        .get("scope")
        .and_then(|s| s.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c.get("code").and_then(Value::as_str) == Some("patient-privacy"));
    active && privacy
}

/// The provisions a consent enforces: `(deny, actor, target)` — `deny` false for a permit
/// (only permits of labels are kept: they are grants). Empty for anything but an active
/// patient-privacy Consent.
pub fn consent_rules(rt: ResourceType, json: &Map<String, Value>) -> Vec<(bool, String, String)> {
    if rt.as_str() != "Consent" || !in_force(json) {
        return vec![];
    }
    let mut provisions: Vec<&Value> = vec![];
    if let Some(root) = json.get("provision") {
        provisions.push(root);
        for p in root
            .get("provision")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            provisions.push(p);
        }
    }
    let mut out = vec![];
    for p in provisions {
        let deny = match p.get("type").and_then(Value::as_str) {
            Some("deny") => true,
            Some("permit") => false,
            _ => continue,
        };
        for actor in actors(p) {
            for target in denied_targets(p) {
                if deny || target.starts_with("label:") {
                    let rule = (deny, actor.clone(), target);
                    if !out.contains(&rule) {
                        out.push(rule);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn consent(v: Value) -> Vec<(bool, String, String)> {
        consent_rules(
            ResourceType::parse("Consent").unwrap(),
            v.as_object().unwrap(),
        )
    }

    #[test]
    fn restricting_labels_are_found_once() {
        let o = json!({"meta": {"security": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"},
            {"code": "HIV"}, {"code": "N"}]}});
        assert_eq!(labels(o.as_object().unwrap()), ["R", "HIV"]);
        let w = json!({"meta": {"security": [{"system": MEDVAULT_LABELS, "code": "withheld-from-patient"},
            {"system": "http://example.org/other", "code": "withheld-from-patient"}]}});
        assert_eq!(labels(w.as_object().unwrap()), [WITHHELD_FROM_PATIENT]);
        assert!(labels(json!({}).as_object().unwrap()).is_empty());
        assert!(emergency_opens("SUD") && !emergency_opens("PSYTHPN"));
    }

    #[test]
    fn part_2_records_carry_the_redisclosure_notice_once() {
        let mut sud = json!({"meta": {"security": [{"code": "SUD"}]}});
        let o = sud.as_object_mut().unwrap();
        mark_redisclosure(o);
        mark_redisclosure(o);
        let codes: Vec<&str> = o["meta"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["code"].as_str())
            .collect();
        assert_eq!(codes, ["SUD", "NORDSCLCD"]);
        let mut hiv = json!({"meta": {"security": [{"code": "HIV"}]}});
        mark_redisclosure(hiv.as_object_mut().unwrap());
        assert_eq!(hiv["meta"]["security"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn consents_deny_by_actor_class_and_label_and_grant_labels() {
        let privacy = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]});
        let c = json!({"resourceType": "Consent", "status": "active", "scope": privacy,
            "provision": {"type": "permit", "provision": [
                {"type": "deny", "actor": [{"role": {"text": "x"}, "reference": {"reference": "Practitioner/dr1"}}],
                 "class": [{"code": "Observation"}]},
                {"type": "deny", "securityLabel": [{"code": "HIV"}]},
                {"type": "permit", "actor": [{"role": {"text": "x"}, "reference": {"reference": "Practitioner/psy"}}],
                 "securityLabel": [{"code": "PSY"}]}]}});
        let rules = consent(c.clone());
        assert!(rules.contains(&(true, "dr1".into(), "vitals".into())));
        assert!(rules.contains(&(true, "dr1".into(), "labs".into())));
        assert!(rules.contains(&(true, "*".into(), "label:HIV".into())));
        assert!(rules.contains(&(false, "psy".into(), "label:PSY".into())));
        assert_eq!(
            rules.len(),
            4,
            "a root permit of everything is no rule: {rules:?}"
        );
        let mut inactive = c.clone();
        inactive["status"] = json!("inactive");
        assert!(consent(inactive).is_empty());
        let mut research = c;
        research["scope"]["coding"][0]["code"] = json!("research");
        assert!(consent(research).is_empty());
        let deny_all = json!({"resourceType": "Consent", "status": "active", "scope": privacy,
            "provision": {"type": "deny"}});
        assert_eq!(consent(deny_all), [(true, "*".to_owned(), "*".to_owned())]);
    }
}
