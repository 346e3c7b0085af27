//! Search parameter extraction. Values are normalized here; the caller turns each
//! token into a keyed blind index, so no searchable value reaches storage in clear.

use serde_json::{Map, Value};

use crate::ResourceType;

/// One searchable (parameter, normalized value) pair of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchToken {
    pub param: &'static str,
    pub value: String,
}

/// What FHIR string search compares (FHIR R4 §3.1.1.5.8: "case- and accent-insensitive"):
/// compatibility-decomposed (Unicode NFKD), combining marks removed, lowercased, and
/// whitespace collapsed — so "Jürgen", its decomposed form and "JURGEN" are one value.
pub fn normalize_text(s: &str) -> String {
    use unicode_normalization::char::is_combining_mark;
    use unicode_normalization::UnicodeNormalization;
    let folded: String = s
        .nfkd()
        .filter(|c| !is_combining_mark(*c))
        .collect::<String>()
        .to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Version of the blind index's normalization; a store indexed under an older one is
/// re-indexed when opened. 2: accent-insensitive strings and date precision markers.
/// 3: `_care` tokens of the treatment relationships CareTeams and Encounters establish.
pub const INDEX_VERSION: u32 = 3;

/// Shortest string prefix that `name`, `family` and `given` searches match.
pub const MIN_PREFIX: usize = 2;

fn push_string_prefixes(out: &mut Vec<SearchToken>, param: &'static str, s: &str) {
    let n = normalize_text(s);
    for word in n.split(' ').chain(std::iter::once(n.as_str())) {
        let chars: Vec<(usize, char)> = word.char_indices().collect();
        for (i, _) in chars.iter().enumerate().skip(MIN_PREFIX - 1) {
            let end = chars.get(i + 1).map(|(b, _)| *b).unwrap_or(word.len());
            if let Some(p) = word.get(..end) {
                out.push(SearchToken {
                    param,
                    value: p.to_owned(),
                });
            }
        }
    }
}

/// Year, month and day tokens of a date as written (`2026`, `2026-11`, `2026-11-22`), and
/// for a value written only to month or year precision its marker (`2026-11~`, `2026~`),
/// so a range search can find coarse values without every day of their month or year
/// (see [`crate::date::covering_tokens`]).
fn push_date(out: &mut Vec<SearchToken>, param: &'static str, s: &str) {
    let date = s.get(..10).unwrap_or(s);
    for len in [4, 7, 10] {
        if let Some(p) = date.get(..len) {
            out.push(SearchToken {
                param,
                value: p.to_owned(),
            });
        }
    }
    if matches!(date.len(), 4 | 7) {
        out.push(SearchToken {
            param,
            value: format!("{date}~"),
        });
    }
}

/// The end of a Period-valued date parameter (`effectivePeriod.end`, `period.end`,
/// `performedPeriod.end`), if the resource has one.
fn date_end_of<'a>(rt: ResourceType, param: &str, o: &'a Map<String, Value>) -> Option<&'a str> {
    if param != "date" {
        return None;
    }
    match rt.as_str() {
        "Observation" | "DiagnosticReport" if o.get("effectiveDateTime").is_none() => {
            str_at(o, &["effectivePeriod", "end"])
        }
        "Encounter" | "CarePlan" => str_at(o, &["period", "end"]),
        "Procedure" if o.get("performedDateTime").is_none() => {
            str_at(o, &["performedPeriod", "end"])
        }
        _ => None,
    }
}

/// Whether the `date` parameter of this resource is a Period.
fn is_period(rt: ResourceType, o: &Map<String, Value>) -> bool {
    match rt.as_str() {
        "Observation" | "DiagnosticReport" => {
            o.get("effectiveDateTime").is_none() && o.get("effectivePeriod").is_some()
        }
        "Encounter" | "CarePlan" => o.get("period").is_some(),
        "Procedure" => o.get("performedDateTime").is_none() && o.get("performedPeriod").is_some(),
        _ => false,
    }
}

/// The interval a date search parameter compares with in a resource (FHIR R4 §3.1.1.5.6):
/// the value's own interval, or for a Period from its start's beginning to its end's end
/// (open-ended when the Period has no end).
pub fn date_interval_of(
    rt: ResourceType,
    param: &str,
    o: &Map<String, Value>,
) -> Option<crate::date::Interval> {
    let start = crate::date::parse(date_of(rt, param, o)?).ok()?;
    if param != "date" || !is_period(rt, o) {
        return Some(start);
    }
    let end = match date_end_of(rt, param, o) {
        Some(e) => crate::date::parse(e).ok()?.end,
        None => i64::MAX,
    };
    Some(crate::date::Interval {
        start: start.start,
        end: end.max(start.end),
    })
}

/// The value a date search parameter (`birthdate`, `date`) compares with in a resource,
/// as written: the element FHIR R4 names for that parameter and type (for a Period, its
/// start).
pub fn date_of<'a>(rt: ResourceType, param: &str, o: &'a Map<String, Value>) -> Option<&'a str> {
    if param == "birthdate" {
        return o.get("birthDate").and_then(Value::as_str);
    }
    if param != "date" {
        return None;
    }
    match rt.as_str() {
        "Observation" | "DiagnosticReport" => {
            str_at(o, &["effectiveDateTime"]).or_else(|| str_at(o, &["effectivePeriod", "start"]))
        }
        "Encounter" | "CarePlan" => str_at(o, &["period", "start"]),
        "Condition" => str_at(o, &["onsetDateTime"]).or_else(|| str_at(o, &["recordedDate"])),
        "Procedure" => {
            str_at(o, &["performedDateTime"]).or_else(|| str_at(o, &["performedPeriod", "start"]))
        }
        "Immunization" => str_at(o, &["occurrenceDateTime"]),
        "MedicationRequest" => str_at(o, &["authoredOn"]),
        "MedicationStatement" => {
            str_at(o, &["effectiveDateTime"]).or_else(|| str_at(o, &["dateAsserted"]))
        }
        "AllergyIntolerance" => str_at(o, &["recordedDate"]),
        "Claim" | "ExplanationOfBenefit" => str_at(o, &["created"]),
        "DocumentReference" | "Consent" => {
            str_at(o, &["date"]).or_else(|| str_at(o, &["dateTime"]))
        }
        _ => None,
    }
}

fn push_codings(out: &mut Vec<SearchToken>, param: &'static str, v: Option<&Value>) {
    let items: Vec<&Value> = match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(x) => vec![x],
        None => return,
    };
    for cc in items {
        if let Some(Value::Array(codings)) = cc.get("coding") {
            for c in codings {
                if let Some(code) = c.get("code").and_then(Value::as_str) {
                    out.push(SearchToken {
                        param,
                        value: code.to_owned(),
                    });
                    if let Some(sys) = c.get("system").and_then(Value::as_str) {
                        out.push(SearchToken {
                            param,
                            value: format!("{sys}|{code}"),
                        });
                    }
                }
            }
        }
    }
}

fn str_at<'a>(o: &'a Map<String, Value>, path: &[&str]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    let mut v = o.get(*first)?;
    for p in rest {
        v = v.get(*p)?;
    }
    v.as_str()
}

/// Every searchable token of a resource (excluding `_id`, `_lastUpdated` and `patient`,
/// which are stored as plain, non-identifying columns).
pub fn search_tokens(rt: ResourceType, o: &Map<String, Value>) -> Vec<SearchToken> {
    let mut out = vec![];
    if let Some(Value::Array(ids)) = o.get("identifier") {
        for i in ids {
            if let Some(v) = i.get("value").and_then(Value::as_str) {
                out.push(SearchToken {
                    param: "identifier",
                    value: v.to_owned(),
                });
                if let Some(s) = i.get("system").and_then(Value::as_str) {
                    out.push(SearchToken {
                        param: "identifier",
                        value: format!("{s}|{v}"),
                    });
                }
            }
        }
    }
    if let Some(Value::Array(names)) = o.get("name") {
        if matches!(rt.as_str(), "Patient" | "Practitioner") {
            for n in names {
                if let Some(f) = n.get("family").and_then(Value::as_str) {
                    push_string_prefixes(&mut out, "family", f);
                    push_string_prefixes(&mut out, "name", f);
                }
                if let Some(Value::Array(given)) = n.get("given") {
                    for g in given.iter().filter_map(Value::as_str) {
                        push_string_prefixes(&mut out, "given", g);
                        push_string_prefixes(&mut out, "name", g);
                    }
                }
                if let Some(t) = n.get("text").and_then(Value::as_str) {
                    push_string_prefixes(&mut out, "name", t);
                }
            }
        }
    } else if let Some(n) = o.get("name").and_then(Value::as_str) {
        push_string_prefixes(&mut out, "name", n);
    }
    if let Some(b) = date_of(rt, "birthdate", o) {
        push_date(&mut out, "birthdate", b);
    }
    if let Some(s) = o.get("status").and_then(Value::as_str) {
        out.push(SearchToken {
            param: "status",
            value: s.to_owned(),
        });
    }
    match rt.as_str() {
        "Condition" => {
            push_codings(&mut out, "code", o.get("code"));
            push_codings(&mut out, "category", o.get("category"));
            push_codings(&mut out, "status", o.get("clinicalStatus"));
        }
        "MedicationRequest" | "MedicationStatement" => {
            push_codings(&mut out, "code", o.get("medicationCodeableConcept"));
            push_codings(&mut out, "category", o.get("category"));
        }
        "Immunization" => push_codings(&mut out, "code", o.get("vaccineCode")),
        "Encounter" => {
            push_codings(&mut out, "code", o.get("type"));
            if let Some(c) = o
                .get("class")
                .and_then(|c| c.get("code"))
                .and_then(Value::as_str)
            {
                out.push(SearchToken {
                    param: "category",
                    value: c.to_owned(),
                });
            }
        }
        "Coverage" | "Claim" | "ExplanationOfBenefit" => {
            push_codings(&mut out, "code", o.get("type"))
        }
        _ => {
            push_codings(&mut out, "code", o.get("code"));
            push_codings(&mut out, "category", o.get("category"));
            if rt.as_str() == "DocumentReference" {
                push_codings(&mut out, "code", o.get("type"));
            }
        }
    }
    let date = date_of(rt, "date", o);
    // A Period is found by its start and its end (a range covering either finds it; the
    // comparison after decryption uses the whole interval).
    if let Some(end) = date_end_of(rt, "date", o) {
        push_date(&mut out, "date", end);
    } else if date.is_some() && is_period(rt, o) {
        // An ongoing Period (no end) reaches every later date: found by any range open
        // to the future (see crate::date::OPEN_END).
        out.push(SearchToken {
            param: "date",
            value: crate::date::OPEN_END.to_owned(),
        });
    }
    if let Some(d) = date {
        push_date(&mut out, "date", d);
    }
    out.sort_by(|a, b| (a.param, &a.value).cmp(&(b.param, &b.value)));
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patient_tokens() {
        let p = json!({"resourceType": "Patient", "name": [{"family": "Smith", "given": ["Ann Marie"]}],
            "birthDate": "1980-05-17", "identifier": [{"system": "urn:mrn", "value": "M1"}]});
        let t = search_tokens(
            ResourceType::parse("Patient").unwrap(),
            p.as_object().unwrap(),
        );
        let has = |p: &str, v: &str| t.iter().any(|x| x.param == p && x.value == v);
        assert!(has("family", "sm") && has("family", "smith") && !has("family", "s"));
        assert!(has("given", "ann") && has("given", "marie") && has("given", "ann marie"));
        assert!(
            has("birthdate", "1980")
                && has("birthdate", "1980-05")
                && has("birthdate", "1980-05-17")
        );
        assert!(has("identifier", "M1") && has("identifier", "urn:mrn|M1"));
    }
}
