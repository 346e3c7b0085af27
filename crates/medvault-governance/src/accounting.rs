//! The accounting of disclosures as a request a patient makes (45 CFR 164.528): the
//! six-year window it covers (164.528(a)), the 60 days to act on it with one 30-day
//! extension given a written reason (164.528(c)(1)), and the disclosures the rule leaves
//! out (164.528(a)(1)(i)–(ix)). Pure: `today` is a parameter.

use serde::{Deserialize, Serialize};
use time::{Date, Duration};

use crate::breach::day;
use crate::retention::{anniversary_before, date};

/// Years of disclosures an accounting covers (164.528(a)(1)).
pub const ACCOUNTING_YEARS: u32 = 6;
/// Days to act on a request (164.528(c)(1)).
pub const RESPOND_DAYS: i64 = 60;
/// The one extension's length, in days (164.528(c)(1)(ii)).
pub const EXTENSION_DAYS: i64 = 30;

/// The disclosures 164.528(a)(1) leaves out of an accounting, by paragraph: (i) treatment,
/// payment, operations; (ii) to the individual; (iii) incident to a permitted use or
/// disclosure; (iv) under an authorization (164.508); (v) the facility directory, persons
/// involved in the individual's care, and notification purposes (164.510); (vi) national
/// security or intelligence (164.512(k)(2)); (vii) correctional institutions or law
/// enforcement with custody (164.512(k)(5)); (viii) a limited data set (164.514(e)); (ix)
/// before the compliance date.
pub const EXCLUDES: &[&str] = &[
    "treatment",
    "payment",
    "operations",
    "to_individual",
    "incident_to_permitted",
    "authorization",
    "facility_directory",
    "persons_involved_in_care",
    "notification_purposes",
    "national_security",
    "correctional_custody",
    "limited_data_set",
    "before_compliance_date",
];

/// The clock of one accounting request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountingClock {
    /// The first day the accounting covers (`YYYY-MM-DD`): six years before the request.
    pub covers_from: String,
    /// The day by which the covered entity acts (`YYYY-MM-DD`).
    pub respond_by: String,
    /// The one extension the rule allows, in days.
    pub extension_once_days: i64,
    /// The disclosures left out, named as [`EXCLUDES`].
    pub excludes: Vec<String>,
}

/// The clock of a request received on `requested` (`YYYY-MM-DD`), as of `today`.
///
/// # Errors
/// A malformed date, or one after `today`.
pub fn accounting_request(requested: &str, today: Date) -> Result<AccountingClock, String> {
    let r = date("requested", requested)?;
    if r > today {
        return Err("`requested` is in the future".into());
    }
    let rule = time::macros::date!(2003 - 04 - 14);
    if r < rule {
        return Err(format!(
            "`requested` is before the Privacy Rule's compliance date ({})",
            day(rule)
        ));
    }
    Ok(AccountingClock {
        covers_from: day(anniversary_before(r, ACCOUNTING_YEARS)?),
        respond_by: day(r
            .checked_add(Duration::days(RESPOND_DAYS))
            .ok_or("the deadline runs past the calendar")?),
        extension_once_days: EXTENSION_DAYS,
        excludes: EXCLUDES.iter().map(|s| (*s).to_owned()).collect(),
    })
}

/// The new deadline when the one extension is taken: 30 days after `respond_by`.
///
/// # Errors
/// A malformed date; `already` when the extension was taken before.
pub fn extend(respond_by: &str, already: bool) -> Result<String, String> {
    if already {
        return Err(
            "the accounting deadline may be extended once (45 CFR 164.528(c)(1)(ii))".into(),
        );
    }
    let d = date("respond_by", respond_by)?;
    Ok(day(d
        .checked_add(Duration::days(EXTENSION_DAYS))
        .ok_or("the deadline runs past the calendar")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_years_back_and_sixty_days_on() {
        let today = date("t", "2026-12-01").unwrap();
        let c = accounting_request("2026-03-10", today).unwrap();
        assert_eq!(c.covers_from, "2020-03-10");
        assert_eq!(c.respond_by, "2026-05-09");
        let c = accounting_request("2024-02-29", today).unwrap();
        assert_eq!(c.covers_from, "2018-02-28");
        assert!(accounting_request("2027-01-01", today).is_err());
        assert_eq!(extend("2026-05-09", false).unwrap(), "2026-06-08");
        assert!(extend("2026-05-09", true).is_err());
    }
}
