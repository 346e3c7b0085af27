//! De-identification by the HIPAA Safe Harbor method (45 CFR 164.514(b)(2)): the 18 kinds of
//! identifier of the individual (and of relatives, employers and household members) removed
//! or generalized, so what remains is no longer protected health information.
//!
//! What this module does to a resource's JSON, whatever its type:
//! - names, telecom, photos, contacts, identifiers (MRN, SSN, plan and account numbers,
//!   licence and device numbers), URLs, attachments, narrative and free text (`text`,
//!   `note`, `comment`, `description`, `title`, `summary`, reference `display`) and every
//!   extension: removed
//!   (164.514(b)(2)(i)(A), (D)–(R); free text can hold any of them);
//! - addresses: only `state`, `country` and the first three digits of `postalCode` are kept,
//!   and those three become `000` where the three-digit area holds 20,000 people or fewer
//!   ([`RESTRICTED_ZIP3`], (B));
//! - every date, time and period: cut to the year ((C)); a patient over 89 loses the birth
//!   year too, and is marked with the age group `90+` instead;
//! - resource ids and references: replaced by keyed pseudonyms (HMAC, computed by the
//!   caller), so the same patient gets the same id in every export and a research extract
//!   can be refreshed and joined without anyone being re-identified (164.514(c): the code
//!   is not derived from the individual's information in a way that can be reversed, and
//!   the key never leaves the server).
//!
//! The method is recorded in each resource (`meta.tag` [`METHOD_SYSTEM`]|`safe-harbor`).

use serde_json::{Map, Value};

/// The code system of the de-identification method tag.
pub const METHOD_SYSTEM: &str = "https://medvault.dev/fhir/CodeSystem/deidentification";
/// The method's code.
pub const SAFE_HARBOR: &str = "safe-harbor";
/// The extension that carries a grouped age (`90+`) in place of a birth year.
pub const AGE_GROUP_URL: &str = "https://medvault.dev/fhir/StructureDefinition/age-group";

/// Three-digit ZIP areas of 20,000 people or fewer (US Census 2000, as HHS's guidance on
/// 164.514(b)(2)(i)(B) lists them): their three digits become `000`.
pub const RESTRICTED_ZIP3: &[&str] = &[
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// Elements removed wherever they appear (identifiers, contact points, free text).
const REMOVED: &[&str] = &[
    "name",
    "telecom",
    "photo",
    "contact",
    "identifier",
    "text",
    "note",
    "comment",
    "description",
    "display",
    "url",
    "extension",
    "modifierExtension",
    "content",
    "subscriberId",
    "link",
    "presentedForm",
    "conclusion",
    "valueString",
    "valueAttachment",
    "implicitRules",
    "title",
    "summary",
];

/// Address parts kept (the rest is a subdivision smaller than a state).
const ADDRESS_KEPT: &[&str] = &["state", "country", "postalCode", "use", "type"];

/// How a resource's ids become pseudonyms: `(resource type, id)` → an opaque id (the
/// caller's keyed HMAC).
pub type Pseudonymize<'a> = dyn Fn(&str, &str) -> String + 'a;

/// De-identifies one resource in place by the Safe Harbor method. `year` is the current
/// year (for the over-89 rule). Organizations and Practitioners are not the individual;
/// they are still stripped the same way, since a small practice can identify its patients.
pub fn safe_harbor(resource: &mut Map<String, Value>, year: i32, pseudonym: &Pseudonymize<'_>) {
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(id) = resource.get("id").and_then(Value::as_str) {
        let p = pseudonym(&rtype, id);
        resource.insert("id".into(), Value::String(p));
    }
    let over_89 = rtype == "Patient"
        && resource
            .get("birthDate")
            .and_then(Value::as_str)
            .and_then(year_of)
            .is_some_and(|born| year - born > 89);
    resource.remove("meta");
    let keys: Vec<String> = resource.keys().cloned().collect();
    for k in keys {
        if k == "resourceType" || k == "id" {
            continue;
        }
        if let Some(v) = resource.get_mut(&k) {
            if scrub(&k, v, pseudonym) {
                resource.remove(&k);
            }
        }
    }
    if over_89 {
        resource.remove("birthDate");
        resource.insert(
            "extension".into(),
            serde_json::json!([{"url": AGE_GROUP_URL, "valueString": "90+"}]),
        );
    }
    resource.insert(
        "meta".into(),
        serde_json::json!({"tag": [{"system": METHOD_SYSTEM, "code": SAFE_HARBOR}]}),
    );
}

/// Scrubs `v` (the value of element `key`); true when the element is to be removed.
fn scrub(key: &str, v: &mut Value, pseudonym: &Pseudonymize<'_>) -> bool {
    if REMOVED.contains(&key) {
        return true;
    }
    if key == "reference" {
        if let Some(s) = v.as_str() {
            match reference_pseudonym(s, pseudonym) {
                Some(r) => *v = Value::String(r),
                None => return true,
            }
        }
        return false;
    }
    if key == "address" {
        let list = match v {
            Value::Array(a) => a,
            Value::Object(_) => return scrub_address(v),
            _ => return true,
        };
        list.retain_mut(|a| !scrub_address(a));
        return list.is_empty();
    }
    match v {
        Value::String(s) => {
            if let Some(y) = date_year(s) {
                *s = y;
            }
            false
        }
        Value::Array(items) => {
            items.retain_mut(|item| !scrub(key, item, pseudonym));
            items.is_empty()
        }
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if let Some(inner) = m.get_mut(&k) {
                    if scrub(&k, inner, pseudonym) {
                        m.remove(&k);
                    }
                }
            }
            m.is_empty()
        }
        _ => false,
    }
}

/// Keeps a state, a country and a three-digit ZIP area; true when nothing is left.
fn scrub_address(a: &mut Value) -> bool {
    let Some(m) = a.as_object_mut() else {
        return true;
    };
    m.retain(|k, _| ADDRESS_KEPT.contains(&k.as_str()));
    if let Some(zip) = m.get("postalCode").and_then(Value::as_str) {
        let digits: String = zip.chars().filter(char::is_ascii_digit).take(3).collect();
        if digits.len() == 3 {
            let area = if RESTRICTED_ZIP3.contains(&digits.as_str()) {
                "000".to_owned()
            } else {
                digits
            };
            m.insert("postalCode".into(), Value::String(area));
        } else {
            m.remove("postalCode");
        }
    }
    !m.contains_key("state") && !m.contains_key("country") && !m.contains_key("postalCode")
}

/// `Type/id` → `Type/pseudonym`; anything else (an absolute URL, a contained `#ref`) is
/// dropped, since it could point outside the extract.
fn reference_pseudonym(r: &str, pseudonym: &Pseudonymize<'_>) -> Option<String> {
    let (t, id) = r.split_once('/')?;
    let valid = t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphanumeric())
        && !id.is_empty()
        && !id.contains('/');
    valid.then(|| format!("{t}/{}", pseudonym(t, id)))
}

fn year_of(s: &str) -> Option<i32> {
    s.get(0..4).and_then(|y| y.parse().ok())
}

/// The year of a FHIR date, dateTime or instant with more than a year in it; `None` for
/// any other string (left as it is).
fn date_year(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|x| !x.is_empty() && x.iter().all(u8::is_ascii_digit))
    };
    let dated = b.len() >= 7 && digits(0..4) && b.get(4) == Some(&b'-') && digits(5..7);
    let tail_ok = b.len() == 7
        || (b.get(7) == Some(&b'-')
            && digits(8..10)
            && (b.len() == 10 || b.get(10) == Some(&b'T')));
    (dated && tail_ok).then(|| s.chars().take(4).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pseud(t: &str, id: &str) -> String {
        format!("p-{}", crate::normalize_text(&format!("{t}{id}")).len())
    }

    #[test]
    fn safe_harbor_removes_the_eighteen_identifiers() {
        let mut p = json!({
            "resourceType": "Patient", "id": "pat-1",
            "meta": {"versionId": "3", "lastUpdated": "2026-03-04T05:06:07Z"},
            "text": {"status": "generated", "div": "<div>Zebulon Canary</div>"},
            "identifier": [{"system": "urn:mrn", "value": "MRN-CANARY-1"}],
            "name": [{"family": "Canary", "given": ["Zebulon"]}],
            "telecom": [{"system": "phone", "value": "555-0100"}],
            "gender": "female",
            "birthDate": "1960-07-14",
            "address": [{"line": ["12 Canary Lane"], "city": "Smallton", "state": "NH",
                         "postalCode": "03601-1234", "country": "US"}],
            "contact": [{"name": {"family": "Relative"}}],
            "managingOrganization": {"reference": "Organization/org-1", "display": "Clinic"},
            "extension": [{"url": "x", "valueString": "birthplace"}]
        });
        let m = p.as_object_mut().unwrap();
        safe_harbor(m, 2026, &pseud);
        let s = serde_json::to_string(&p).unwrap();
        for gone in [
            "Canary",
            "Zebulon",
            "MRN-CANARY",
            "555-0100",
            "1960-07-14",
            "Smallton",
            "Relative",
            "birthplace",
            "Clinic",
            "pat-1",
            "org-1",
            "03601",
            "2026-03-04",
        ] {
            assert!(!s.contains(gone), "{gone} left in {s}");
        }
        assert_eq!(p["birthDate"], "1960");
        // 036 is a restricted three-digit area.
        assert_eq!(p["address"][0]["postalCode"], "000");
        assert_eq!(p["address"][0]["state"], "NH");
        assert_eq!(p["meta"]["tag"][0]["code"], SAFE_HARBOR);
    }

    #[test]
    fn ages_over_89_are_grouped_and_dates_cut_to_the_year() {
        let mut p = json!({"resourceType": "Patient", "id": "a", "birthDate": "1930-01-02",
                           "address": [{"postalCode": "02139", "city": "Cambridge"}]});
        safe_harbor(p.as_object_mut().unwrap(), 2026, &pseud);
        assert!(p.get("birthDate").is_none());
        assert_eq!(p["extension"][0]["valueString"], "90+");
        assert_eq!(p["address"][0]["postalCode"], "021");
        let mut o = json!({"resourceType": "Observation", "id": "o",
            "subject": {"reference": "Patient/a"},
            "effectivePeriod": {"start": "2025-11-30T10:00:00Z", "end": "2025-12-01"},
            "issued": "2025-12-01T08:00:00.123+01:00",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "HR"},
            "valueQuantity": {"value": 72, "unit": "/min"}});
        safe_harbor(o.as_object_mut().unwrap(), 2026, &pseud);
        assert_eq!(o["effectivePeriod"]["start"], "2025");
        assert_eq!(o["issued"], "2025");
        assert_eq!(
            o["subject"]["reference"],
            format!("Patient/{}", pseud("Patient", "a"))
        );
        assert_eq!(o["code"]["coding"][0]["code"], "8867-4");
        assert!(o["code"].get("text").is_none());
        assert_eq!(o["valueQuantity"]["value"], 72);
    }

    #[test]
    fn dates_are_recognized_only_as_dates() {
        assert_eq!(date_year("2024-02-29").as_deref(), Some("2024"));
        assert_eq!(date_year("2024-02").as_deref(), Some("2024"));
        assert_eq!(date_year("2024-02-29T00:00:00Z").as_deref(), Some("2024"));
        for not in [
            "2024",
            "8867-4",
            "12-2024",
            "2024-1",
            "2024-02-29x",
            "abcd-ef",
        ] {
            assert_eq!(date_year(not), None, "{not}");
        }
    }
}
