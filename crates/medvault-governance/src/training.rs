//! Workforce security training (45 CFR 164.308(a)(5)): courses assigned by role, completions
//! with the learner's attestation, renewal every six months by default, a grace period
//! after which lapsed staff lose PHI access (the `training_current` fact of the access
//! policy; break-the-glass excepted), phishing-exercise results, and completion per
//! department. Pure: `today` is a parameter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Date, Duration, Month};

use crate::breach::day;
use crate::retention::date;

/// The topics a course may cover (the list, and HICP practice 10's).
pub const TOPICS: &[&str] = &[
    "security_awareness",
    "phishing",
    "passwords",
    "mobile_devices",
    "suspicious_activity",
    "privacy",
];
/// Months between renewals unless a course says otherwise (twice a year).
pub const DEFAULT_RENEWAL_MONTHS: u32 = 6;
/// Days after a course falls due before PHI access closes, unless configured.
pub const DEFAULT_GRACE_DAYS: u32 = 14;
/// Longest course title or attestation, in characters.
pub const TEXT_CHARS: usize = 500;

/// A course and the roles it is assigned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Course {
    /// Letters, digits, `-` and `_`.
    pub id: String,
    pub title: String,
    /// One of [`TOPICS`].
    pub topic: String,
    /// Role names (`nurse`, `physician`, …) whose members must take it.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Months a completion stays current (1–36; default 6).
    #[serde(default = "default_renewal")]
    pub renewal_months: u32,
    /// When it was assigned (`YYYY-MM-DD`): staff who never took it are due from here.
    #[serde(default)]
    pub assigned: String,
}

fn default_renewal() -> u32 {
    DEFAULT_RENEWAL_MONTHS
}

/// One completion: who, which course, when, and what they attested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub user: String,
    pub course: String,
    /// `YYYY-MM-DD`.
    pub completed: String,
    pub attestation: String,
    /// Who recorded it (the learner, or an officer importing a vendor's record).
    pub recorded_by: String,
}

/// One phishing-exercise result (CSV `user,campaign,clicked,reported,date`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhishingResult {
    pub user: String,
    pub campaign: String,
    pub clicked: bool,
    pub reported: bool,
    /// `YYYY-MM-DD`.
    pub date: String,
}

/// A course's state for one learner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CourseState {
    /// Completed and not yet due again.
    Current,
    /// Due (never taken or expired) but within the grace period: access stays.
    Due,
    /// Past the grace period: PHI access closes.
    Lapsed,
}

/// One course as one learner stands with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CourseStanding {
    pub course: String,
    pub title: String,
    pub state: CourseState,
    /// The last completion, `YYYY-MM-DD`.
    pub completed: Option<String>,
    /// When it is (or was) due again, `YYYY-MM-DD`.
    pub due: String,
    /// When access closes unless completed, `YYYY-MM-DD`.
    pub lapses: String,
}

/// A learner's standing: `current` is false once any assigned course is lapsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    pub user: String,
    pub role: String,
    pub current: bool,
    pub courses: Vec<CourseStanding>,
}

/// `months` after `d` (the last day of a shorter month when the day does not exist).
pub fn add_months(d: Date, months: u32) -> Date {
    let total = i64::from(d.year()) * 12 + i64::from(u8::from(d.month())) - 1 + i64::from(months);
    let y = i32::try_from(total.div_euclid(12)).unwrap_or(9999);
    let m = Month::try_from(u8::try_from(total.rem_euclid(12) + 1).unwrap_or(1))
        .unwrap_or(Month::January);
    let mut day = d.day();
    loop {
        if let Ok(x) = Date::from_calendar_date(y, m, day) {
            return x;
        }
        if day <= 28 {
            return d;
        }
        day -= 1;
    }
}

/// Checks a course (trimmed, in place).
///
/// # Errors
/// A message naming the field.
pub fn check_course(c: &mut Course, today: Date) -> Result<(), String> {
    c.id = c.id.trim().to_owned();
    if c.id.is_empty()
        || c.id.len() > 64
        || !c
            .id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        return Err("`id` must be 1–64 letters, digits, `-` or `_`".into());
    }
    c.title = c.title.trim().to_owned();
    if c.title.is_empty() || c.title.chars().count() > TEXT_CHARS {
        return Err(format!("`title` must be 1–{TEXT_CHARS} characters"));
    }
    if !TOPICS.contains(&c.topic.trim()) {
        return Err(format!(
            "unknown topic `{}`: one of {}",
            c.topic.chars().take(40).collect::<String>(),
            TOPICS.join(", ")
        ));
    }
    c.topic = c.topic.trim().to_owned();
    if !(1..=36).contains(&c.renewal_months) {
        return Err("`renewal_months` must be 1 to 36".into());
    }
    if c.assigned.trim().is_empty() {
        c.assigned = day(today);
    } else {
        let a = date("assigned", &c.assigned)?;
        if a > today {
            return Err("`assigned` is in the future".into());
        }
        c.assigned = day(a);
    }
    c.roles = c
        .roles
        .iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect();
    c.roles.sort();
    c.roles.dedup();
    Ok(())
}

/// Where `user` (in `role`) stands with every course assigned to the role, as of `today`,
/// with `grace_days` after a due date before a course is lapsed. A role with no course is
/// current.
pub fn standing(
    user: &str,
    role: &str,
    courses: &[Course],
    completions: &[Completion],
    grace_days: u32,
    today: Date,
) -> Standing {
    let mut out = vec![];
    for c in courses.iter().filter(|c| c.roles.iter().any(|r| r == role)) {
        let last = completions
            .iter()
            .filter(|x| x.user == user && x.course == c.id)
            .filter_map(|x| date("completed", &x.completed).ok())
            .max();
        let assigned = date("assigned", &c.assigned).unwrap_or(today);
        let due = match last {
            Some(l) => add_months(l, c.renewal_months),
            None => assigned,
        };
        let lapses = due
            .checked_add(Duration::days(i64::from(grace_days)))
            .unwrap_or(due);
        let state = if last.is_some() && today < due {
            CourseState::Current
        } else if today < lapses {
            CourseState::Due
        } else {
            CourseState::Lapsed
        };
        out.push(CourseStanding {
            course: c.id.clone(),
            title: c.title.clone(),
            state,
            completed: last.map(day),
            due: day(due),
            lapses: day(lapses),
        });
    }
    Standing {
        user: user.to_owned(),
        role: role.to_owned(),
        current: out.iter().all(|c| c.state != CourseState::Lapsed),
        courses: out,
    }
}

/// Completion per department: `(department, learners with assigned courses, learners
/// with every course current)`.
pub fn by_department(
    standings: &[Standing],
    department: &BTreeMap<String, String>,
) -> Vec<(String, usize, usize)> {
    let mut m: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for s in standings.iter().filter(|s| !s.courses.is_empty()) {
        let d = department
            .get(&s.user)
            .cloned()
            .unwrap_or_else(|| "(no department)".into());
        let e = m.entry(d).or_default();
        e.0 += 1;
        if s.courses.iter().all(|c| c.state == CourseState::Current) {
            e.1 += 1;
        }
    }
    m.into_iter().map(|(d, (n, ok))| (d, n, ok)).collect()
}

/// Parses a phishing-exercise export (CSV with the header `user,campaign,clicked,reported,
/// date`; booleans `true`/`false`/`yes`/`no`/`1`/`0`), refusing dates after `today`.
///
/// # Errors
/// A message naming the line.
pub fn parse_phishing_csv(text: &str, today: Date) -> Result<Vec<PhishingResult>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(
            "the file is empty: expected the header user,campaign,clicked,reported,date".into(),
        );
    };
    let cols: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    if cols != ["user", "campaign", "clicked", "reported", "date"] {
        return Err("line 1: the header must be user,campaign,clicked,reported,date".into());
    }
    let flag = |n: usize, f: &str, v: &str| match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "y" => Ok(true),
        "false" | "no" | "0" | "n" | "" => Ok(false),
        _ => Err(format!("line {n}: `{f}` must be true or false")),
    };
    let mut out = vec![];
    for (i, l) in lines {
        let n = i + 1;
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        let [user, campaign, clicked, reported, when] = f.as_slice() else {
            return Err(format!("line {n}: expected 5 fields, found {}", f.len()));
        };
        if user.is_empty() || campaign.is_empty() || campaign.chars().count() > 200 {
            return Err(format!("line {n}: `user` and `campaign` are required"));
        }
        let d = date("date", when).map_err(|e| format!("line {n}: {e}"))?;
        if d > today {
            return Err(format!("line {n}: `date` is in the future"));
        }
        out.push(PhishingResult {
            user: (*user).to_owned(),
            campaign: (*campaign).to_owned(),
            clicked: flag(n, "clicked", clicked)?,
            reported: flag(n, "reported", reported)?,
            date: day(d),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        date("d", s).unwrap()
    }

    #[test]
    fn a_completion_lasts_six_months_then_the_grace_period() {
        let mut c = Course {
            id: "sec".into(),
            title: "Security awareness".into(),
            topic: "security_awareness".into(),
            roles: vec!["nurse".into()],
            renewal_months: 6,
            assigned: "2026-01-01".into(),
        };
        check_course(&mut c, d("2026-12-01")).unwrap();
        let done = |when: &str| Completion {
            user: "n".into(),
            course: "sec".into(),
            completed: when.into(),
            attestation: "I completed it".into(),
            recorded_by: "n".into(),
        };
        let st =
            |comps: &[Completion], today| standing("n", "nurse", &[c.clone()], comps, 14, d(today));
        assert_eq!(
            st(&[done("2026-03-31")], "2026-09-29").courses[0].state,
            CourseState::Current
        );
        assert_eq!(
            st(&[done("2026-03-31")], "2026-09-30").courses[0].due,
            "2026-09-30"
        );
        assert_eq!(
            st(&[done("2026-03-31")], "2026-10-13").courses[0].state,
            CourseState::Due
        );
        assert!(!st(&[done("2026-03-31")], "2026-10-14").current);
        assert!(
            !st(&[], "2026-01-15").current,
            "never taken, past the grace"
        );
        assert!(st(&[], "2026-01-14").current);
        assert!(standing("p", "physician", &[c.clone()], &[], 0, d("2030-01-01")).current);
        assert_eq!(add_months(d("2026-08-31"), 6), d("2027-02-28"));
    }

    #[test]
    fn phishing_exports_are_read_line_by_line() {
        let r = parse_phishing_csv(
            "user,campaign,clicked,reported,date\nn,Q3,yes,no,2026-07-01\n",
            d("2026-12-01"),
        )
        .unwrap();
        assert!(r[0].clicked && !r[0].reported);
        let e = parse_phishing_csv(
            "user,campaign,clicked,reported,date\nn,Q3,maybe,no,2026-07-01\n",
            d("2026-12-01"),
        )
        .unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }
}
