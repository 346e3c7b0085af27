//! Individuals' rights and the permissions behind disclosures: HIPAA authorizations (45 CFR
//! 164.508) with scope, expiry and revocation; the Notice of Privacy Practices
//! acknowledgement (164.520(c)(2)(ii)); GDPR lawful bases and consent per processing
//! activity (Art. 6, 7(3), 9(2)) and the record of processing activities (Art. 30); and
//! data-subject requests with their clocks — access (HIPAA 164.524(b)(2): 30 days, one
//! 30-day extension; GDPR Art. 12(3): one month, extendable by two), amendment or
//! rectification (164.526(b)(2): 60 days, one 30-day extension), restriction, erasure
//! (through the destruction workflow where retention law allows it), portability and
//! objection. Pure: `today` is a parameter.

use serde::{Deserialize, Serialize};
use time::{Date, Duration};

use crate::breach::day;
use crate::retention::date;
use crate::training::add_months;

/// The kinds of request an individual makes.
pub const REQUEST_KINDS: &[&str] = &[
    "access",
    "rectification",
    "restriction",
    "erasure",
    "portability",
    "objection",
];

/// GDPR Art. 6(1) lawful bases.
pub const LAWFUL_BASES: &[&str] = &[
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
];

/// The clock of a request: `(due, extension days or months as text, extended due)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestClock {
    /// `YYYY-MM-DD`.
    pub due: String,
    /// What the one extension allows, in words (`30 days`, `2 months`).
    pub extension: String,
    /// The rule, cited.
    pub rule: String,
}

/// The clock of a request of `kind` received on `received` under `jurisdiction` (`HIPAA`
/// or `GDPR`), as of `today`.
///
/// # Errors
/// An unknown kind or jurisdiction; a malformed or future date.
pub fn request_clock(
    kind: &str,
    received: &str,
    jurisdiction: &str,
    today: Date,
) -> Result<RequestClock, String> {
    if !REQUEST_KINDS.contains(&kind) {
        return Err(format!(
            "unknown request kind `{}`: one of {}",
            kind.chars().take(40).collect::<String>(),
            REQUEST_KINDS.join(", ")
        ));
    }
    let r = date("received", received)?;
    if r > today {
        return Err("`received` is in the future".into());
    }
    let days = |n: i64| {
        r.checked_add(Duration::days(n))
            .map(day)
            .ok_or("the deadline runs past the calendar".to_owned())
    };
    Ok(
        match (jurisdiction.trim().to_ascii_uppercase().as_str(), kind) {
            ("GDPR", _) => RequestClock {
                due: day(add_months(r, 1)),
                extension: "2 months".into(),
                rule: "GDPR Art. 12(3): one month, extendable by two further months".into(),
            },
            ("HIPAA" | "", "rectification") => RequestClock {
                due: days(60)?,
                extension: "30 days".into(),
                rule: "45 CFR 164.526(b)(2): 60 days, one 30-day extension".into(),
            },
            ("HIPAA" | "", _) => RequestClock {
                due: days(30)?,
                extension: "30 days".into(),
                rule: "45 CFR 164.524(b)(2): 30 days, one 30-day extension".into(),
            },
            (other, _) => {
                return Err(format!(
                    "unknown jurisdiction `{}`: HIPAA or GDPR",
                    other.chars().take(40).collect::<String>()
                ))
            }
        },
    )
}

/// The deadline after the one extension.
///
/// # Errors
/// A malformed date.
pub fn extended(clock: &RequestClock) -> Result<String, String> {
    let d = date("due", &clock.due)?;
    Ok(day(if clock.extension == "2 months" {
        add_months(d, 2)
    } else {
        d.checked_add(Duration::days(30))
            .ok_or("the deadline runs past the calendar")?
    }))
}

/// A HIPAA authorization (164.508(c)): who may disclose what to whom, for what, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    #[serde(default)]
    pub id: String,
    pub patient: String,
    /// The recipient kind (`research`, `other`, …) the disclosure goes to.
    pub recipient: String,
    /// The HL7 purpose of use it covers (e.g. `HRESCH`).
    pub purpose: String,
    /// What may be disclosed, described (sealed).
    pub description: String,
    /// `YYYY-MM-DD` signed.
    pub signed: String,
    /// `YYYY-MM-DD` it expires (164.508(c)(1)(v)).
    pub expires: String,
    /// `authorization` (signed by the individual) or `irb_waiver` (164.512(i)).
    #[serde(default = "authorization_kind")]
    pub kind: String,
    #[serde(default)]
    pub revoked: Option<String>,
}

fn authorization_kind() -> String {
    "authorization".into()
}

impl Authorization {
    /// Checks the dates and kind (trimmed, in place).
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&mut self, today: Date) -> Result<(), String> {
        let s = date("signed", &self.signed)?;
        let e = date("expires", &self.expires)?;
        if s > today {
            return Err("`signed` is in the future".into());
        }
        if e < s {
            return Err("contradictory dates: `expires` is before `signed`".into());
        }
        if !matches!(self.kind.trim(), "authorization" | "irb_waiver") {
            return Err("`kind` is authorization or irb_waiver".into());
        }
        let d = self.description.trim();
        if d.is_empty() || d.chars().count() > 2000 {
            return Err("`description` must be 1–2000 characters".into());
        }
        self.signed = day(s);
        self.expires = day(e);
        self.kind = self.kind.trim().to_owned();
        Ok(())
    }

    /// Whether it covers a disclosure to `recipient` for `purpose` on `today`.
    pub fn covers(&self, recipient: &str, purpose: &str, today: Date) -> bool {
        self.revoked.is_none()
            && self.recipient == recipient
            && self.purpose == purpose
            && date("signed", &self.signed).is_ok_and(|s| s <= today)
            && date("expires", &self.expires).is_ok_and(|e| e >= today)
    }
}

/// Whether a disclosure needs an authorization (or an IRB waiver) on file: research
/// (164.508 unless 164.512(i)).
pub fn needs_authorization(recipient: &str, purpose: &str) -> bool {
    recipient == "research" || purpose == "HRESCH"
}

/// A processing activity of the GDPR Art. 30 record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingActivity {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub purposes: Vec<String>,
    /// One of [`LAWFUL_BASES`].
    pub lawful_basis: String,
    /// The Art. 9(2) condition for health data (e.g. `9(2)(h) health care`).
    pub special_category_condition: String,
    pub data_subjects: Vec<String>,
    pub data_categories: Vec<String>,
    pub recipients: Vec<String>,
    #[serde(default)]
    pub third_country_transfers: Vec<String>,
    pub retention: String,
    pub security_measures: String,
}

impl ProcessingActivity {
    /// Checks the activity (in place).
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&mut self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.purposes.is_empty() {
            return Err("`name` and `purposes` are required".into());
        }
        if !LAWFUL_BASES.contains(&self.lawful_basis.trim()) {
            return Err(format!(
                "unknown lawful basis: one of {}",
                LAWFUL_BASES.join(", ")
            ));
        }
        if self.special_category_condition.trim().is_empty() {
            return Err(
                "health data needs an Art. 9(2) condition (`special_category_condition`)".into(),
            );
        }
        self.lawful_basis = self.lawful_basis.trim().to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_follow_the_rule_that_applies() {
        let t = date("t", "2026-12-01").unwrap();
        assert_eq!(
            request_clock("access", "2026-01-31", "HIPAA", t)
                .unwrap()
                .due,
            "2026-03-02"
        );
        assert_eq!(
            request_clock("access", "2026-01-31", "GDPR", t)
                .unwrap()
                .due,
            "2026-02-28"
        );
        assert_eq!(
            request_clock("rectification", "2026-01-01", "HIPAA", t)
                .unwrap()
                .due,
            "2026-03-02"
        );
        let c = request_clock("erasure", "2026-01-31", "GDPR", t).unwrap();
        assert_eq!(extended(&c).unwrap(), "2026-04-28");
        assert!(request_clock("forget", "2026-01-01", "HIPAA", t).is_err());
        assert!(request_clock("access", "2027-01-01", "HIPAA", t).is_err());
    }
}
