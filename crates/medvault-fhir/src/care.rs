//! Treatment relationships (SPEC "Access control"): which practitioners a `CareTeam` or an
//! `Encounter` links to its patient, and on which days. The gate turns each value into a
//! blind `_care` index token of the resource, so "whose charts does this clinician treat
//! today" is one indexed lookup and the relationship itself is never stored in plaintext.
//!
//! - `Encounter` (FHIR R4 §Encounter): each `participant.individual` that is a
//!   `Practitioner/{id}` is related from 30 days before `period.start` to 30 days after
//!   `period.end`. An encounter still going on (`planned`, `arrived`, `triaged`,
//!   `in-progress`, `onleave`) without an end relates them until it is updated; one
//!   `cancelled` or `entered-in-error` relates nobody.
//! - `CareTeam` (FHIR R4 §CareTeam): each `participant.member` that is a
//!   `Practitioner/{id}`, while the team is `proposed`, `active` or without a status, over
//!   its `period` (without an end: until the team changes).

use serde_json::{Map, Value};

use crate::date;
use crate::ResourceType;

/// Days a relationship from an encounter reaches before its start and after its end.
pub const ENCOUNTER_WINDOW_DAYS: i64 = 30;
/// Longest span expressed day by day; a longer (or open) span is `ongoing`.
const MAX_DAYS: i64 = 800;
const DAY_MS: i64 = 86_400_000;
/// The value for a relationship without an end.
const ONGOING: &str = "ongoing";

/// The day number (days since 1970-01-01, UTC) of an instant in epoch milliseconds.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

fn practitioners(items: Option<&Value>, field: &str) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for p in items.and_then(Value::as_array).into_iter().flatten() {
        let r = p
            .get(field)
            .and_then(|m| m.get("reference"))
            .and_then(Value::as_str);
        if let Some(id) = r.and_then(|r| r.strip_prefix("Practitioner/")) {
            if medvault_types::is_fhir_id(id) && !out.iter().any(|x| x == id) {
                out.push(id.to_owned());
            }
        }
    }
    out
}

/// The `_care` index values of a resource: `"{practitioner id}|{day}"` for each day of the
/// relationship, or `"{practitioner id}|ongoing"`. Empty for other types.
pub fn care_values(rt: ResourceType, json: &Map<String, Value>) -> Vec<String> {
    let status = json.get("status").and_then(Value::as_str).unwrap_or("");
    let period = json.get("period");
    let bound = |k: &str| {
        period
            .and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .and_then(|s| date::parse(s).ok())
    };
    let (who, first, last) = match rt.as_str() {
        "Encounter" => {
            if matches!(status, "cancelled" | "entered-in-error") {
                return vec![];
            }
            let ongoing = matches!(
                status,
                "planned" | "arrived" | "triaged" | "in-progress" | "onleave"
            );
            let start = bound("start");
            let end = bound("end");
            let first = start
                .or(end)
                .map(|i| day_of(i.start) - ENCOUNTER_WINDOW_DAYS);
            let last = match end {
                Some(e) => Some(day_of(e.end - 1) + ENCOUNTER_WINDOW_DAYS),
                None if ongoing => None,
                None => start.map(|s| day_of(s.end - 1) + ENCOUNTER_WINDOW_DAYS),
            };
            if first.is_none() && !ongoing {
                return vec![];
            }
            (
                practitioners(json.get("participant"), "individual"),
                first,
                last,
            )
        }
        "CareTeam" => {
            if !matches!(status, "" | "proposed" | "active") {
                return vec![];
            }
            let first = bound("start").map(|i| day_of(i.start));
            let last = bound("end").map(|i| day_of(i.end - 1));
            (
                practitioners(json.get("participant"), "member"),
                first,
                last,
            )
        }
        _ => return vec![],
    };
    let span: Option<(i64, i64)> = match (first, last) {
        (Some(a), Some(b)) if b >= a && b - a <= MAX_DAYS => Some((a, b)),
        (_, Some(b)) if first.is_none_or(|a| b - a > MAX_DAYS) => Some((b - MAX_DAYS, b)),
        (_, Some(_)) => return vec![],
        (_, None) => None,
    };
    let mut out = vec![];
    for p in who {
        match span {
            Some((a, b)) => out.extend((a..=b).map(|d| format!("{p}|{d}"))),
            None => out.push(format!("{p}|{ONGOING}")),
        }
    }
    out
}

/// The `_care` values that find the charts `practitioner` is related to on the day of
/// `now_ms`: that day's, and any relationship without an end.
pub fn care_lookup(practitioner: &str, now_ms: i64) -> [String; 2] {
    [
        format!("{practitioner}|{}", day_of(now_ms)),
        format!("{practitioner}|{ONGOING}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(v: Value) -> Vec<String> {
        let rt = ResourceType::parse(v["resourceType"].as_str().unwrap()).unwrap();
        care_values(rt, v.as_object().unwrap())
    }

    fn day(s: &str) -> i64 {
        day_of(date::parse(s).unwrap().start)
    }

    #[test]
    fn an_encounter_relates_its_practitioners_thirty_days_each_side() {
        let v = values(json!({"resourceType": "Encounter", "status": "finished",
            "participant": [{"individual": {"reference": "Practitioner/dr1"}},
                            {"individual": {"reference": "RelatedPerson/x"}}],
            "period": {"start": "2026-01-10T08:00:00Z", "end": "2026-01-12T09:00:00Z"}}));
        let first = day("2026-01-10") - 30;
        let last = day("2026-01-12") + 30;
        assert_eq!(v.len() as i64, last - first + 1);
        assert!(v.contains(&format!("dr1|{first}")) && v.contains(&format!("dr1|{last}")));
        assert!(!v.contains(&format!("dr1|{}", last + 1)));
        let [today, ongoing] = care_lookup("dr1", date::parse("2026-02-11").unwrap().start);
        assert!(
            v.contains(&today),
            "the 30th day after the end still relates"
        );
        assert!(!v.contains(&ongoing));
        let [after, _] = care_lookup("dr1", date::parse("2026-02-12").unwrap().start);
        assert!(!v.contains(&after), "the 31st does not");
    }

    #[test]
    fn ongoing_cancelled_and_care_teams() {
        let ongoing = values(json!({"resourceType": "Encounter", "status": "in-progress",
            "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
            "period": {"start": "2026-01-10"}}));
        assert!(ongoing.contains(&"dr1|ongoing".to_owned()));
        let cancelled = values(json!({"resourceType": "Encounter", "status": "cancelled",
            "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
            "period": {"start": "2026-01-10"}}));
        assert!(cancelled.is_empty());
        let team = values(json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr1"}},
                            {"member": {"reference": "Practitioner/rn2"}}]}));
        assert_eq!(team, ["dr1|ongoing", "rn2|ongoing"]);
        let inactive = values(json!({"resourceType": "CareTeam", "status": "inactive",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}]}));
        assert!(inactive.is_empty());
        let ended = values(json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}],
            "period": {"start": "2026-01-01", "end": "2026-01-03"}}));
        assert_eq!(ended.len(), 3);
        let forever_ago = values(json!({"resourceType": "CareTeam",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}],
            "period": {"end": "2026-01-03"}}));
        assert_eq!(
            forever_ago.len() as i64,
            MAX_DAYS + 1,
            "a long span is capped"
        );
        assert!(values(json!({"resourceType": "Observation", "status": "final"})).is_empty());
    }
}
