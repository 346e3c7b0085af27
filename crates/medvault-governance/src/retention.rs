//! Retention schedules (issue 15, first slice): how long a record must be kept, and from
//! when it may be destroyed, by record class — a chart ("adult: N years after the last
//! encounter; minor: until age M or N years after the last encounter, whichever is later")
//! or HIPAA documentation (45 CFR 164.316(b)(2)(i): six years from its creation or the date
//! it was last in effect, whichever is later). Pure: `as_of` is a parameter.
//!
//! Calendar rule: a period ends on its anniversary date, which is both `retain_until` and
//! `destroy_eligible_from`; the anniversary of 29 February is 28 February in a common year.
//! Under a legal hold nothing is eligible and neither date is given.

use serde::{Deserialize, Serialize};
use time::{Date, Month};

/// Years HIPAA documentation is kept (45 CFR 164.316(b)(2)(i)).
pub const DOCUMENTATION_YEARS: u32 = 6;

/// A retention policy (the parts a case needs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Years a chart is kept after the last encounter (required for a chart).
    #[serde(default)]
    pub adult_years_after_last_encounter: Option<u32>,
    /// A minor's chart is kept at least until this age; `None`: no minor rule.
    #[serde(default)]
    pub minor_until_age: Option<u32>,
    /// Years documentation is kept (default 6).
    #[serde(default)]
    pub documentation_years: Option<u32>,
}

/// One case (`medvault retention evaluate --case FILE`): dates are `YYYY-MM-DD`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default)]
    pub as_of: Option<String>,
    #[serde(default)]
    pub born: Option<String>,
    #[serde(default)]
    pub last_encounter: Option<String>,
    /// `chart` or `documentation`; inferred when absent (documentation when
    /// `policy_document_created` is given).
    #[serde(default)]
    pub record_class: Option<String>,
    #[serde(default)]
    pub legal_hold: bool,
    pub policy: Policy,
    #[serde(default)]
    pub policy_document_created: Option<String>,
    #[serde(default)]
    pub last_effective: Option<String>,
}

/// The decision for one case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub destroy_eligible: bool,
    /// `YYYY-MM-DD`, or `null` under a legal hold.
    pub destroy_eligible_from: Option<String>,
    /// `YYYY-MM-DD` (the same date), or `null` under a legal hold.
    pub retain_until: Option<String>,
    /// The rule that decided, in words.
    pub rule: String,
}

/// A calendar date from `YYYY-MM-DD`.
///
/// # Errors
/// A message naming the field.
pub fn date(field: &str, v: &str) -> Result<Date, String> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(v.trim(), &fmt).map_err(|_| {
        format!(
            "`{field}` must be a date YYYY-MM-DD, not `{}`",
            v.chars().take(40).collect::<String>()
        )
    })
}

fn text(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The anniversary of `d`, `years` later: 29 February falls on 28 February in a common
/// year.
pub fn anniversary(d: Date, years: u32) -> Result<Date, String> {
    let y = i32::try_from(years)
        .ok()
        .and_then(|n| d.year().checked_add(n))
        .ok_or("the period runs past the calendar")?;
    Date::from_calendar_date(y, d.month(), d.day())
        .or_else(|_| Date::from_calendar_date(y, Month::February, 28))
        .map_err(|_| "the period runs past the calendar".to_owned())
}

/// The date `years` before `d`: 29 February falls on 28 February in a common year.
///
/// # Errors
/// A date before the calendar's start.
pub fn anniversary_before(d: Date, years: u32) -> Result<Date, String> {
    let y = i32::try_from(years)
        .ok()
        .and_then(|n| d.year().checked_sub(n))
        .ok_or("the period runs past the calendar")?;
    Date::from_calendar_date(y, d.month(), d.day())
        .or_else(|_| Date::from_calendar_date(y, Month::February, 28))
        .map_err(|_| "the period runs past the calendar".to_owned())
}

/// Decides one case as of `today` (used when the case gives no `as_of`).
///
/// # Errors
/// A message for a malformed date, an unknown record class, or a date the rule needs that
/// is missing (`last_encounter` for a chart, `born` with a minor rule,
/// `policy_document_created` for documentation).
pub fn evaluate(case: &Case, today: Date) -> Result<Verdict, String> {
    let opt = |field: &str, v: &Option<String>| -> Result<Option<Date>, String> {
        v.as_deref().map(|s| date(field, s)).transpose()
    };
    let as_of = opt("as_of", &case.as_of)?.unwrap_or(today);
    let born = opt("born", &case.born)?;
    let last = opt("last_encounter", &case.last_encounter)?;
    let created = opt("policy_document_created", &case.policy_document_created)?;
    let effective = opt("last_effective", &case.last_effective)?;
    if let Some(b) = born {
        if b > as_of {
            return Err("`born` is after `as_of`".into());
        }
        if last.is_some_and(|l| l < b) {
            return Err("`last_encounter` is before `born`".into());
        }
    }
    if let (Some(c), Some(e)) = (created, effective) {
        if e < c {
            return Err("`last_effective` is before `policy_document_created`".into());
        }
    }
    let class = match case.record_class.as_deref().map(str::trim) {
        None | Some("") => {
            if created.is_some() {
                "documentation"
            } else {
                "chart"
            }
        }
        Some("chart" | "adult_chart" | "minor_chart") => "chart",
        Some("documentation") => "documentation",
        Some(other) => {
            return Err(format!(
                "unknown record_class `{}`: chart or documentation",
                other.chars().take(40).collect::<String>()
            ))
        }
    };
    let (until, rule) = if class == "documentation" {
        let created = created.ok_or("documentation needs `policy_document_created`")?;
        let years = case
            .policy
            .documentation_years
            .unwrap_or(DOCUMENTATION_YEARS);
        let (from, which) = match effective {
            Some(e) if e > created => (e, "its last effective date"),
            _ => (created, "its creation"),
        };
        (
            anniversary(from, years)?,
            format!("documentation: {years} years from {which} (45 CFR 164.316(b)(2)(i))"),
        )
    } else {
        let last = last.ok_or("a chart needs `last_encounter`")?;
        let n = case
            .policy
            .adult_years_after_last_encounter
            .ok_or("a chart needs `policy.adult_years_after_last_encounter`")?;
        let adult = anniversary(last, n)?;
        match case.policy.minor_until_age {
            None => (adult, format!("adult: {n} years after the last encounter")),
            Some(age) => {
                let born = born.ok_or("a minor rule needs `born`")?;
                let minor = anniversary(born, age)?;
                if minor > adult {
                    (
                        minor,
                        format!(
                            "minor: until age {age}, later than {n} years after the last encounter"
                        ),
                    )
                } else {
                    (
                        adult,
                        format!("{n} years after the last encounter, later than age {age}"),
                    )
                }
            }
        }
    };
    if case.legal_hold {
        return Ok(Verdict {
            destroy_eligible: false,
            destroy_eligible_from: None,
            retain_until: None,
            rule: "legal hold: kept until the hold is released".into(),
        });
    }
    Ok(Verdict {
        destroy_eligible: as_of >= until,
        destroy_eligible_from: Some(text(until)),
        retain_until: Some(text(until)),
        rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        date("t", s).unwrap()
    }

    fn case(v: serde_json::Value) -> Case {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_adult_chart_is_kept_seven_years_after_the_last_encounter_to_the_day() {
        let c = case(
            serde_json::json!({"born": "1970-05-01", "last_encounter": "2018-03-15",
            "policy": {"adult_years_after_last_encounter": 7}}),
        );
        let on = evaluate(&c, d("2025-03-15")).unwrap();
        assert_eq!(on.retain_until.as_deref(), Some("2025-03-15"));
        assert_eq!(on.destroy_eligible_from, on.retain_until);
        assert!(on.destroy_eligible, "eligible on the anniversary itself");
        assert!(
            !evaluate(&c, d("2025-03-14")).unwrap().destroy_eligible,
            "not the day before"
        );
        assert_eq!(on.rule, "adult: 7 years after the last encounter");
    }

    #[test]
    fn a_minors_chart_is_kept_until_the_age_or_the_years_whichever_is_later() {
        let p = serde_json::json!({"adult_years_after_last_encounter": 7, "minor_until_age": 21});
        // Seen at 5: age 21 (2031) is later than 2021.
        let c = case(
            serde_json::json!({"born": "2010-06-30", "last_encounter": "2014-01-01", "policy": p}),
        );
        let v = evaluate(&c, d("2030-01-01")).unwrap();
        assert_eq!(v.retain_until.as_deref(), Some("2031-06-30"));
        assert!(!v.destroy_eligible && v.rule.starts_with("minor: until age 21"));
        // Seen at 17: seven years after (2034) is later than age 21 (2031).
        let c = case(
            serde_json::json!({"born": "2010-06-30", "last_encounter": "2027-06-30", "policy": p}),
        );
        let v = evaluate(&c, d("2034-06-30")).unwrap();
        assert_eq!(
            (v.retain_until.as_deref(), v.destroy_eligible),
            (Some("2034-06-30"), true)
        );
        // Both on the same day: that day.
        let c = case(
            serde_json::json!({"born": "2010-06-30", "last_encounter": "2024-06-30", "policy": p}),
        );
        assert_eq!(
            evaluate(&c, d("2031-06-30"))
                .unwrap()
                .retain_until
                .as_deref(),
            Some("2031-06-30")
        );
    }

    #[test]
    fn the_anniversary_of_29_february_is_28_february_in_a_common_year() {
        assert_eq!(anniversary(d("2024-02-29"), 7).unwrap(), d("2031-02-28"));
        assert_eq!(anniversary(d("2024-02-29"), 4).unwrap(), d("2028-02-29"));
        let c = case(
            serde_json::json!({"born": "2004-02-29", "last_encounter": "2010-01-01",
            "policy": {"adult_years_after_last_encounter": 7, "minor_until_age": 21}}),
        );
        let v = evaluate(&c, d("2025-02-28")).unwrap();
        assert_eq!(
            (v.retain_until.as_deref(), v.destroy_eligible),
            (Some("2025-02-28"), true)
        );
        assert!(!evaluate(&c, d("2025-02-27")).unwrap().destroy_eligible);
    }

    #[test]
    fn documentation_is_kept_six_years_from_creation_or_last_effective_whichever_is_later() {
        let p = serde_json::json!({"adult_years_after_last_encounter": 7});
        let c = case(
            serde_json::json!({"policy_document_created": "2015-01-10", "last_effective": "2019-12-31", "policy": p}),
        );
        let v = evaluate(&c, d("2025-12-31")).unwrap();
        assert_eq!(
            (v.retain_until.as_deref(), v.destroy_eligible),
            (Some("2025-12-31"), true)
        );
        assert!(v.rule.contains("last effective date"));
        let c = case(serde_json::json!({"policy_document_created": "2015-01-10", "policy": p}));
        let v = evaluate(&c, d("2021-01-09")).unwrap();
        assert_eq!(
            (v.retain_until.as_deref(), v.destroy_eligible),
            (Some("2021-01-10"), false)
        );
    }

    #[test]
    fn a_legal_hold_makes_nothing_eligible_and_gives_no_dates() {
        let c = case(
            serde_json::json!({"last_encounter": "2000-01-01", "legal_hold": true,
            "policy": {"adult_years_after_last_encounter": 7}}),
        );
        let v = evaluate(&c, d("2030-01-01")).unwrap();
        assert_eq!(
            (v.destroy_eligible, v.destroy_eligible_from, v.retain_until),
            (false, None, None)
        );
    }

    #[test]
    fn bad_cases_say_what_is_wrong() {
        let p = serde_json::json!({"adult_years_after_last_encounter": 7});
        for (v, want) in [
            (serde_json::json!({"policy": p}), "needs `last_encounter`"),
            (
                serde_json::json!({"last_encounter": "2020-02-30", "policy": p}),
                "`last_encounter` must be a date",
            ),
            (
                serde_json::json!({"last_encounter": "2020-01-01", "record_class": "x", "policy": p}),
                "unknown record_class",
            ),
            (
                serde_json::json!({"last_encounter": "2020-01-01", "policy": {"adult_years_after_last_encounter": 7, "minor_until_age": 21}}),
                "needs `born`",
            ),
            (
                serde_json::json!({"record_class": "documentation", "policy": p}),
                "needs `policy_document_created`",
            ),
        ] {
            let e = evaluate(&case(v), d("2026-01-01")).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(anniversary(d("9990-01-01"), 100).is_err());
    }

    #[test]
    fn empty_implausible_and_irrelevant_inputs_found_by_the_newcomer_trial() {
        let today = d("2026-11-30");
        let p = serde_json::json!({"adult_years_after_last_encounter": 7});
        for bad in [
            serde_json::json!({"as_of": "", "last_encounter": "2019-01-01", "policy": p}),
            serde_json::json!({"born": "", "last_encounter": "2019-01-01", "policy": p}),
            serde_json::json!({"born": "2030-01-01", "last_encounter": "2019-01-01", "policy": p}),
            serde_json::json!({"born": "2000-01-01", "last_encounter": "1999-01-01", "policy": p}),
            serde_json::json!({"last_encounter": "2019-01-01", "policy": {}}),
        ] {
            assert!(evaluate(&case(bad.clone()), today).is_err(), "{bad}");
        }
        let doc = case(serde_json::json!({"policy_document_created": "2018-01-01", "policy": {}}));
        assert_eq!(
            evaluate(&doc, today).unwrap().retain_until.as_deref(),
            Some("2024-01-01"),
            "documentation needs no chart rule"
        );
    }
}
