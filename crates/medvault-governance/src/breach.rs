//! Breach assessment and notification deadlines: HIPAA's Breach Notification Rule (45 CFR
//! 164.400–414) and GDPR Articles 33 and 34, as one pure function over a JSON contract
//! (`medvault breach assess --facts FILE --json`, and the incident workflow).
//!
//! HIPAA, in the order the rule applies:
//! 1. The exceptions of 164.402(1) take an event out of the definition of breach: (i) an
//!    unintentional, good-faith use within the scope of authority; (ii) an inadvertent
//!    disclosure between persons authorized at the same entity; (iii) a recipient who could
//!    not reasonably have retained the information. (i) and (ii) hold only when the
//!    information was not further used or disclosed; with `further_disclosed` none applies.
//! 2. Secured PHI (the HHS guidance under HITECH §13402(h)(2): encrypted, and the key not
//!    compromised) needs no notification: the encryption safe harbour.
//! 3. Otherwise a breach is presumed unless the four-factor assessment of 164.402(2)
//!    documents a low probability of compromise; here, only when the recipient is itself
//!    obliged to protect PHI, the PHI was not viewed or acquired, and its return or
//!    destruction is attested.
//!
//! Deadlines are calendar dates in the covered entity's time zone: individuals within 60
//! days of discovery (164.404(b)); HHS at the same time when 500 or more were affected,
//! else in the annual log due 60 days after the end of the calendar year of discovery
//! (164.408(b), (c)); prominent media in every state or jurisdiction with more than 500
//! affected residents, within the same 60 days (164.406); a business associate tells the
//! covered entity within 60 days of its own discovery (164.410(b)). A law-enforcement
//! delay (164.412) postpones notification for the time a written statement specifies, or at
//! most 30 days from an oral one; the deadlines above are still given, from discovery.
//!
//! GDPR: the supervisory authority within 72 hours of awareness unless the breach is
//! unlikely to result in a risk to rights and freedoms (Art. 33(1); then documented, Art.
//! 33(5)); data subjects without undue delay when the risk is high (Art. 34(1)), unless the
//! data were unintelligible to the recipient, i.e. encrypted with a key not compromised
//! (Art. 34(3)(a)).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, Duration, Month, OffsetDateTime};

use crate::retention::date as parse_date;

/// Days to notify individuals, the media, HHS (500 or more) and, for a business associate,
/// the covered entity (45 CFR 164.404(b), 164.406(b), 164.408(b), 164.410(b)).
pub const NOTIFY_DAYS: i64 = 60;
/// Individuals affected from which HHS is told with the individuals (164.408(b)).
pub const HHS_CONTEMPORANEOUS_AT: u64 = 500;
/// Residents of one state above which the media are told (164.406(a): "more than 500").
pub const MEDIA_MORE_THAN: u64 = 500;
/// Longest delay an oral law-enforcement statement allows (164.412(b)).
pub const ORAL_DELAY_DAYS: i64 = 30;
/// Hours to tell the supervisory authority (GDPR Art. 33(1)).
pub const SUPERVISORY_AUTHORITY_HOURS: i64 = 72;

/// The states and jurisdictions of the United States whose residents are counted (USPS
/// codes): the 50 states, DC, and the territories.
pub const US_JURISDICTIONS: &[&str] = &[
    "AK", "AL", "AR", "AS", "AZ", "CA", "CO", "CT", "DC", "DE", "FL", "GA", "GU", "HI", "IA", "ID",
    "IL", "IN", "KS", "KY", "LA", "MA", "MD", "ME", "MI", "MN", "MO", "MP", "MS", "MT", "NC", "ND",
    "NE", "NH", "NJ", "NM", "NV", "NY", "OH", "OK", "OR", "PA", "PR", "RI", "SC", "SD", "TN", "TX",
    "UT", "VA", "VI", "VT", "WA", "WI", "WV", "WY",
];
/// The member states of the European Economic Area (ISO 3166-1 alpha-2), for GDPR counts.
pub const EEA_STATES: &[&str] = &[
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IS",
    "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// A law-enforcement request to delay notification (164.412).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LawEnforcementDelay {
    /// `oral` or `written`.
    pub kind: String,
    /// The date of the statement (`YYYY-MM-DD`).
    pub requested: String,
    /// The end of the delay the official stated (required for a written statement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// The facts of one event, as `medvault breach assess --facts FILE` reads them. Every
/// field is optional; absent facts take the law's default (HIPAA, not encrypted, a breach
/// presumed). Dates are `YYYY-MM-DD` or RFC 3339 (whose local date is used for HIPAA).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovered: Option<String>,
    /// Affected individuals by state of residence (USPS code; EEA country code for GDPR).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub affected: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affected_eu_subjects: Option<u64>,
    /// Affected individuals whose state of residence is not known (they count toward the
    /// 500 for HHS, not toward any state's media threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affected_unknown_residence: Option<u64>,
    /// `HIPAA` (default) or `GDPR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phi_encrypted_at_rest: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_compromised: Option<bool>,
    /// One of the 164.402(1) exceptions: `unintentional_good_faith_within_scope`,
    /// `inadvertent_between_authorized`, `unable_to_retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub further_disclosed: Option<bool>,
    /// What happened, in the HHS report's terms where it can (`theft`, `loss`,
    /// `hacking_it_incident`, `unauthorized_access_disclosure`, `improper_disposal`) or in
    /// words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_is_covered_entity: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phi_viewed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned_or_destroyed_attested: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub law_enforcement_delay: Option<LawEnforcementDelay>,
    /// GDPR Art. 34: the breach is likely to result in a high risk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_risk: Option<bool>,
    /// GDPR Art. 33(1): `true`/`"likely"` (a risk to rights and freedoms, the default),
    /// `false`/`"unlikely"`, or `"high"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<serde_json::Value>,
    /// When a business associate discovered the breach (164.410).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ba_discovered: Option<String>,
}

/// Why the decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    #[serde(rename = "presumed_breach")]
    PresumedBreach,
    #[serde(rename = "safe_harbor_secured_phi")]
    SafeHarborSecuredPhi,
    #[serde(rename = "exception_164_402_1_i")]
    ExceptionI,
    #[serde(rename = "exception_164_402_1_ii")]
    ExceptionIi,
    #[serde(rename = "exception_164_402_1_iii")]
    ExceptionIii,
    #[serde(rename = "low_probability_of_compromise_documented")]
    LowProbability,
    #[serde(rename = "gdpr_risk_to_rights")]
    GdprRisk,
    #[serde(rename = "gdpr_unlikely_risk")]
    GdprUnlikely,
}

impl Reason {
    /// The contract's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PresumedBreach => "presumed_breach",
            Reason::SafeHarborSecuredPhi => "safe_harbor_secured_phi",
            Reason::ExceptionI => "exception_164_402_1_i",
            Reason::ExceptionIi => "exception_164_402_1_ii",
            Reason::ExceptionIii => "exception_164_402_1_iii",
            Reason::LowProbability => "low_probability_of_compromise_documented",
            Reason::GdprRisk => "gdpr_risk_to_rights",
            Reason::GdprUnlikely => "gdpr_unlikely_risk",
        }
    }

    /// The reason in a sentence, for the incident page and letters.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::PresumedBreach => "an impermissible use or disclosure of unsecured PHI is presumed a breach (45 CFR 164.402(2))",
            Reason::SafeHarborSecuredPhi => "the PHI was encrypted at rest and the key was not compromised: secured PHI needs no notification (HITECH 13402(h))",
            Reason::ExceptionI => "unintentional, good-faith use within the scope of authority, not further disclosed (164.402(1)(i))",
            Reason::ExceptionIi => "inadvertent disclosure between persons authorized at the same entity, not further disclosed (164.402(1)(ii))",
            Reason::ExceptionIii => "the recipient could not reasonably have retained the information (164.402(1)(iii))",
            Reason::LowProbability => "the four-factor assessment documents a low probability that the PHI was compromised (164.402(2))",
            Reason::GdprRisk => "a personal data breach likely to result in a risk to rights and freedoms (GDPR Art. 33(1))",
            Reason::GdprUnlikely => "unlikely to result in a risk to rights and freedoms: documented, not notified (GDPR Art. 33(1), 33(5))",
        }
    }
}

/// When HHS is told (164.408).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hhs {
    /// 500 or more: with the individuals.
    Contemporaneous,
    /// Fewer than 500: the annual log.
    AnnualLog,
}

/// The decision for one set of facts. Fields that do not apply are absent from the JSON;
/// `media` is always present for HIPAA decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub breach: bool,
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub individuals_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hhs: Option<Hhs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hhs_by: Option<String>,
    /// States with more than 500 affected residents (sorted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_delayed_until_at_most: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisory_authority_by: Option<String>,
    /// `required` or `not_required_but_documented`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisory_authority: Option<String>,
    /// `without_undue_delay` or `not_required`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_subjects: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ba_must_notify_covered_entity_by: Option<String>,
}

impl Decision {
    /// The deadlines this decision sets, soonest first: `(what, YYYY-MM-DD or RFC 3339)`.
    pub fn deadlines(&self) -> Vec<(&'static str, String)> {
        let mut d: Vec<(&'static str, String)> = [
            ("individuals", &self.individuals_by),
            ("HHS", &self.hhs_by),
            ("media", &self.media_by),
            ("supervisory authority", &self.supervisory_authority_by),
            (
                "covered entity (business associate)",
                &self.ba_must_notify_covered_entity_by,
            ),
        ]
        .into_iter()
        .filter_map(|(w, v)| v.clone().map(|v| (w, v)))
        .collect();
        d.sort_by(|a, b| a.1.get(..10).cmp(&b.1.get(..10)));
        d
    }
}

/// A calendar date as `YYYY-MM-DD`.
pub fn day(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// A date or an instant, as the facts give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Day(Date),
    Instant(OffsetDateTime),
}

impl When {
    fn parse(field: &str, v: &str) -> Result<When, String> {
        let v = v.trim();
        if v.len() > 10 {
            OffsetDateTime::parse(v, &Rfc3339)
                .map(When::Instant)
                .map_err(|_| {
                    format!(
                        "`{field}` must be a date YYYY-MM-DD or an RFC 3339 instant, not `{}`",
                        v.chars().take(40).collect::<String>()
                    )
                })
        } else {
            parse_date(field, v).map(When::Day)
        }
    }

    /// The local calendar date (the covered entity's time zone is the offset written).
    fn date(self) -> Date {
        match self {
            When::Day(d) => d,
            When::Instant(t) => t.date(),
        }
    }
}

fn plus_days(d: Date, n: i64) -> Result<Date, String> {
    d.checked_add(Duration::days(n))
        .ok_or_else(|| "the deadline runs past the calendar".to_owned())
}

/// Rejects a date after `now` (the latest local date anywhere is 14 hours ahead of UTC).
fn not_future(field: &str, w: When, now: OffsetDateTime) -> Result<(), String> {
    let late = match w {
        When::Day(d) => d > (now + Duration::hours(14)).date(),
        When::Instant(t) => t > now + Duration::minutes(5),
    };
    if late {
        return Err(format!("`{field}` is in the future"));
    }
    Ok(())
}

fn flag(v: Option<bool>) -> bool {
    v.unwrap_or(false)
}

/// The GDPR risk level the facts state: 0 unlikely, 1 a risk (default), 2 high.
fn gdpr_risk(f: &Facts) -> Result<u8, String> {
    let stated = match &f.risk {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(u8::from(*b)),
        Some(serde_json::Value::String(s)) => Some(match s.trim().to_ascii_lowercase().as_str() {
            "unlikely" | "none" | "no" | "low" => 0,
            "likely" | "risk" | "yes" => 1,
            "high" => 2,
            other => {
                return Err(format!(
                    "`risk` must be true, false, `likely`, `unlikely` or `high`, not `{}`",
                    other.chars().take(40).collect::<String>()
                ))
            }
        }),
        Some(_) => {
            return Err("`risk` must be true, false, `likely`, `unlikely` or `high`".into());
        }
    };
    match (stated, f.high_risk) {
        (Some(0), Some(true)) => {
            Err("contradictory facts: `risk` is unlikely but `high_risk` is true".into())
        }
        (Some(2), Some(false)) => {
            Err("contradictory facts: `risk` is high but `high_risk` is false".into())
        }
        (_, Some(true)) => Ok(2),
        (Some(r), _) => Ok(r),
        (None, _) => Ok(1),
    }
}

/// The total affected individuals the facts count.
pub fn affected_total(f: &Facts) -> u64 {
    f.affected
        .values()
        .fold(0u64, |a, n| a.saturating_add(*n))
        .saturating_add(f.affected_unknown_residence.unwrap_or(0))
        .max(f.affected_eu_subjects.unwrap_or(0))
}

/// Whether the facts are GDPR's.
///
/// # Errors
/// An unknown jurisdiction.
pub fn is_gdpr(f: &Facts) -> Result<bool, String> {
    match f
        .jurisdiction
        .as_deref()
        .map(|j| j.trim().to_ascii_uppercase())
        .as_deref()
    {
        None | Some("" | "HIPAA") => Ok(false),
        Some("GDPR") => Ok(true),
        Some(other) => Err(format!(
            "unknown jurisdiction `{}`: HIPAA or GDPR",
            other.chars().take(40).collect::<String>()
        )),
    }
}

/// Decides whether the facts are a notifiable breach and by when each party must be told,
/// as of `now` (dates after it are refused).
///
/// # Errors
/// A one-line message for an unknown jurisdiction, state, exception or delay kind, a
/// malformed or future date, a missing discovery date, or contradictory facts (a stated
/// unlikely risk with `high_risk`, a 164.402(1) exception under GDPR, a delay that ends
/// before it was requested, a written delay without its end).
pub fn assess(f: &Facts, now: OffsetDateTime) -> Result<Decision, String> {
    let gdpr = is_gdpr(f)?;
    let allowed = if gdpr { EEA_STATES } else { US_JURISDICTIONS };
    for state in f.affected.keys() {
        let s = state.trim().to_ascii_uppercase();
        if !allowed.contains(&s.as_str()) {
            return Err(format!(
                "unknown state `{}` in `affected`: use {}",
                state.chars().take(40).collect::<String>(),
                if gdpr {
                    "an EEA country code such as DE or FR"
                } else {
                    "a USPS state or territory code such as CA or PR"
                }
            ));
        }
    }
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for (k, n) in &f.affected {
        let e = by_state.entry(k.trim().to_ascii_uppercase()).or_default();
        *e = e.saturating_add(*n);
    }
    let when = |field: &str, v: &Option<String>| -> Result<Option<When>, String> {
        let Some(v) = v else { return Ok(None) };
        let w = When::parse(field, v)?;
        not_future(field, w, now)?;
        Ok(Some(w))
    };
    let discovered = when("discovered", &f.discovered)?;
    let ba = when("ba_discovered", &f.ba_discovered)?;
    // Neither rule reaches back before it took effect.
    let (rule, effective) = if gdpr {
        ("GDPR applied", time::macros::date!(2018 - 05 - 25))
    } else {
        (
            "the Breach Notification Rule took effect",
            time::macros::date!(2009 - 09 - 23),
        )
    };
    for (field, w) in [("discovered", discovered), ("ba_discovered", ba)] {
        if w.is_some_and(|w| w.date() < effective) {
            return Err(format!("`{field}` is before {rule} ({})", day(effective)));
        }
    }
    let Some(start) = discovered.or(ba) else {
        return Err(
            "`discovered` is required (or `ba_discovered` for a business associate's breach)"
                .into(),
        );
    };
    let encrypted_safe = flag(f.phi_encrypted_at_rest) && !flag(f.key_compromised);

    if gdpr {
        if f.exception.as_deref().is_some_and(|e| !e.trim().is_empty()) {
            return Err(
                "contradictory facts: the exceptions of 45 CFR 164.402(1) are HIPAA's, not GDPR's"
                    .into(),
            );
        }
        if f.law_enforcement_delay.is_some() {
            return Err("contradictory facts: `law_enforcement_delay` is HIPAA's (45 CFR 164.412); under GDPR give the delay's reasons with the notification (Art. 33(1))".into());
        }
        let risk = gdpr_risk(f)?;
        if risk == 0 {
            return Ok(Decision {
                breach: false,
                reason: Reason::GdprUnlikely,
                supervisory_authority: Some("not_required_but_documented".into()),
                data_subjects: Some("not_required".into()),
                ..empty(Reason::GdprUnlikely)
            });
        }
        let by = match start {
            When::Instant(t) => (t + Duration::hours(SUPERVISORY_AUTHORITY_HOURS))
                .format(&Rfc3339)
                .map_err(|e| e.to_string())?,
            When::Day(d) => day(plus_days(d, SUPERVISORY_AUTHORITY_HOURS / 24)?),
        };
        let subjects = if risk == 2 && !encrypted_safe {
            "without_undue_delay"
        } else {
            "not_required"
        };
        return Ok(Decision {
            breach: true,
            supervisory_authority: Some("required".into()),
            supervisory_authority_by: Some(by),
            data_subjects: Some(subjects.into()),
            ..empty(Reason::GdprRisk)
        });
    }

    let delay = f
        .law_enforcement_delay
        .as_ref()
        .map(|d| law_enforcement_delay(d, now))
        .transpose()?;
    if let Some(le) = &f.law_enforcement_delay {
        let requested = When::parse("law_enforcement_delay.requested", &le.requested)?.date();
        if requested < start.date() {
            return Err("contradictory facts: the law-enforcement delay was requested before the breach was discovered".into());
        }
    }
    let further = flag(f.further_disclosed);
    let exception = match f.exception.as_deref().map(str::trim) {
        None | Some("") => None,
        Some("unintentional_good_faith_within_scope") => Some(Reason::ExceptionI),
        Some("inadvertent_between_authorized") => Some(Reason::ExceptionIi),
        Some("unable_to_retain") => Some(Reason::ExceptionIii),
        Some(other) => {
            return Err(format!(
                "unknown exception `{}`: unintentional_good_faith_within_scope, inadvertent_between_authorized or unable_to_retain",
                other.chars().take(60).collect::<String>()
            ))
        }
    };
    let not_breach = |reason| Decision {
        media: Some(Vec::new()),
        ..empty(reason)
    };
    if let Some(r) = exception {
        if !further {
            return Ok(not_breach(r));
        }
    }
    if encrypted_safe {
        return Ok(not_breach(Reason::SafeHarborSecuredPhi));
    }
    if flag(f.recipient_is_covered_entity)
        && f.phi_viewed == Some(false)
        && flag(f.returned_or_destroyed_attested)
    {
        return Ok(not_breach(Reason::LowProbability));
    }

    let d = start.date();
    let by = day(plus_days(d, NOTIFY_DAYS)?);
    let total = by_state
        .values()
        .fold(0u64, |a, n| a.saturating_add(*n))
        .saturating_add(f.affected_unknown_residence.unwrap_or(0));
    let (hhs, hhs_by) = if total >= HHS_CONTEMPORANEOUS_AT {
        (Hhs::Contemporaneous, by.clone())
    } else {
        let end =
            Date::from_calendar_date(d.year(), Month::December, 31).map_err(|e| e.to_string())?;
        (Hhs::AnnualLog, day(plus_days(end, NOTIFY_DAYS)?))
    };
    let media: Vec<String> = by_state
        .iter()
        .filter(|(_, n)| **n > MEDIA_MORE_THAN)
        .map(|(s, _)| s.clone())
        .collect();
    let ba_by = ba
        .map(|b| plus_days(b.date(), NOTIFY_DAYS).map(day))
        .transpose()?;
    Ok(Decision {
        breach: true,
        individuals_by: Some(by.clone()),
        hhs: Some(hhs),
        hhs_by: Some(hhs_by),
        media_by: (!media.is_empty()).then_some(by),
        media: Some(media),
        notification_delayed_until_at_most: delay.map(day),
        ba_must_notify_covered_entity_by: ba_by,
        ..empty(Reason::PresumedBreach)
    })
}

fn empty(reason: Reason) -> Decision {
    Decision {
        breach: false,
        reason,
        individuals_by: None,
        hhs: None,
        hhs_by: None,
        media: None,
        media_by: None,
        notification_delayed_until_at_most: None,
        supervisory_authority_by: None,
        supervisory_authority: None,
        data_subjects: None,
        ba_must_notify_covered_entity_by: None,
    }
}

/// The last day notification may be delayed (164.412): a written statement's stated end;
/// an oral statement's stated end or 30 days from it, whichever is sooner.
fn law_enforcement_delay(d: &LawEnforcementDelay, now: OffsetDateTime) -> Result<Date, String> {
    let requested = When::parse("law_enforcement_delay.requested", &d.requested)?;
    not_future("law_enforcement_delay.requested", requested, now)?;
    let requested = requested.date();
    let until = d
        .until
        .as_deref()
        .map(|u| When::parse("law_enforcement_delay.until", u).map(When::date))
        .transpose()?;
    if until.is_some_and(|u| u < requested) {
        return Err(
            "contradictory facts: `law_enforcement_delay.until` is before `requested`".into(),
        );
    }
    match d.kind.trim().to_ascii_lowercase().as_str() {
        "written" => until.ok_or_else(|| {
            "a written law-enforcement statement specifies the time of the delay: give `until`"
                .to_owned()
        }),
        "oral" => {
            let cap = plus_days(requested, ORAL_DELAY_DAYS)?;
            Ok(until.map_or(cap, |u| u.min(cap)))
        }
        other => Err(format!(
            "unknown law_enforcement_delay kind `{}`: oral or written",
            other.chars().take(40).collect::<String>()
        )),
    }
}

/// Parses facts from JSON text, with the field at fault named.
///
/// # Errors
/// The JSON error (unknown fields, wrong types, negative counts).
pub fn parse_facts(text: &str) -> Result<Facts, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(e) => Err(format!("not JSON: {e}")),
        Ok(serde_json::Value::Object(_)) => serde_json::from_str(text).map_err(|e| e.to_string()),
        Ok(_) => Err("facts must be a JSON object {\"discovered\", \"affected\", …}".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-12-01T12:00:00Z", &Rfc3339).unwrap()
    }

    fn decide(v: serde_json::Value) -> Result<Decision, String> {
        assess(&parse_facts(&v.to_string())?, now())
    }

    #[test]
    fn the_annual_log_is_due_sixty_days_after_the_year_even_in_a_leap_year() {
        let d =
            decide(serde_json::json!({"discovered": "2023-05-01", "affected": {"CA": 3}})).unwrap();
        assert_eq!(d.hhs_by.as_deref(), Some("2024-02-29"));
        let d =
            decide(serde_json::json!({"discovered": "2024-05-01", "affected": {"CA": 3}})).unwrap();
        assert_eq!(d.hhs_by.as_deref(), Some("2025-03-01"));
    }

    #[test]
    fn an_exception_does_not_survive_further_disclosure() {
        let d = decide(serde_json::json!({"discovered": "2026-01-01",
            "exception": "inadvertent_between_authorized", "further_disclosed": true}))
        .unwrap();
        assert_eq!(d.reason, Reason::PresumedBreach);
        assert!(
            decide(serde_json::json!({"discovered": "2026-01-01", "exception": "maybe"})).is_err()
        );
    }

    #[test]
    fn deadlines_sort_soonest_first() {
        let d = decide(
            serde_json::json!({"discovered": "2026-03-01", "ba_discovered": "2026-01-01",
            "affected": {"TX": 600}}),
        )
        .unwrap();
        let order: Vec<&str> = d.deadlines().iter().map(|x| x.0).collect();
        assert_eq!(order.first(), Some(&"covered entity (business associate)"));
    }
}
