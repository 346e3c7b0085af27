//! The offline scan (`medvault detect scan`): an HR roster, another EHR's patients and its
//! exported access log in, alerts out, through the same [`Detector`] the live consumer runs.
//!
//! Inputs (SPEC "Detection"):
//! - `roster.csv` (RFC 4180, header row): `user,family,given,address,department,role,
//!   shift_start,shift_end,patient_id,hired` — shift hours 0–23 (a shift may wrap
//!   midnight; both empty: no shift), `patient_id` the employee's own chart, `hired` a date.
//! - `patients.jsonl`: `id, family, given, address, birth_date, vip, employee_user,
//!   deceased_date, care_team [users], encounters [{user, department, start, end}]`, and
//!   optionally `emergency_contact {family, given, address}`; an empty string is none; an
//!   encounter without an end is going on.
//! - `events.jsonl`, in time order: `time` (RFC 3339), `user`, `action`
//!   (`login|read|search|create|update|export`), `patient`, `category`, `outcome`
//!   (`success|failure`), `source_ip`, `workstation`, `department`, `purpose`,
//!   `break_glass`, `query`; JSON `null`, an absent field or an empty string is none.
//!
//! medvault's own data categories map onto the scan's as [`category_of`] says: care plans
//! → `plans`; encounters and procedures → `notes`; immunizations → `medications`;
//! directory and consents → `demographics`; the rest by name.

use std::borrow::Cow;
use std::io::{BufRead, Write};

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{
    name_searched, DetectError, Detector, Directory, EncounterFact, Event, EventAction,
    EventCategory, Job, PersonKey, StaffFacts, Thresholds,
};

/// The scan's category for one of medvault's data categories (`medvault_types::Category`
/// names); `None` for a category the scan has no word for.
pub fn category_of(medvault: &str) -> Option<EventCategory> {
    Some(match medvault {
        "demographics" | "directory" | "consents" => EventCategory::Demographics,
        "vitals" => EventCategory::Vitals,
        "labs" => EventCategory::Labs,
        "medications" | "immunizations" => EventCategory::Medications,
        "allergies" => EventCategory::Allergies,
        "problems" => EventCategory::Problems,
        "encounters" | "procedures" | "notes" => EventCategory::Notes,
        "care_plans" => EventCategory::Plans,
        "billing" => EventCategory::Billing,
        _ => return None,
    })
}

fn bad(file: &str, line: u64, msg: impl Into<String>) -> DetectError {
    DetectError::Input {
        file: file.to_owned(),
        line,
        msg: msg.into(),
    }
}

/// A JSON Lines line, as serde reads it: a byte-order mark on the first line is dropped,
/// and a line that is not an object says so plainly.
fn json_line<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, String> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    if !line.trim_start().starts_with('{') {
        return Err("each line must be one JSON object ({...})".into());
    }
    serde_json::from_str(line).map_err(|e| e.to_string())
}

/// Unix seconds and UTC offset (seconds) of an RFC 3339 instant or a `YYYY-MM-DD` date
/// (midnight UTC). `None` when it is neither.
pub fn parse_when(s: &str) -> Option<(i64, i32)> {
    let s = s.trim();
    if s.len() == 10 {
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let d = time::Date::parse(s, &fmt).ok()?;
        return Some((d.midnight().assume_utc().unix_timestamp(), 0));
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some((t.unix_timestamp(), t.offset().whole_seconds()))
}

fn some<'s>(s: &'s Option<Cow<'_, str>>) -> Option<&'s str> {
    s.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

const ROSTER_COLUMNS: [&str; 10] = [
    "user",
    "family",
    "given",
    "address",
    "department",
    "role",
    "shift_start",
    "shift_end",
    "patient_id",
    "hired",
];

/// One staff member's profile, as an HR roster line gives it (and as the gate stores it,
/// sealed, for the live detectors): shift hours 0–23, dates `YYYY-MM-DD`, empty = none.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RosterEntry {
    /// The account name (over HTTP, the path names it).
    #[serde(default, deserialize_with = "text_or_null")]
    pub user: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub family: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub given: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub address: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub department: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub role: String,
    #[serde(default)]
    pub shift_start: Option<u8>,
    #[serde(default)]
    pub shift_end: Option<u8>,
    #[serde(default, deserialize_with = "text_or_null")]
    pub patient_id: String,
    #[serde(default, deserialize_with = "text_or_null")]
    pub hired: String,
}

/// A text field where JSON `null` means empty, as everywhere else in these inputs.
fn text_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl RosterEntry {
    /// Checks one profile: a user name, both shift hours 0–23 or neither, a hire date.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.user.trim().is_empty() {
            return Err("empty `user`".into());
        }
        for (v, name) in [
            (self.shift_start, "shift_start"),
            (self.shift_end, "shift_end"),
        ] {
            if v.is_some_and(|h| h > 23) {
                return Err(format!("`{name}` must be an hour 0–23"));
            }
        }
        if self.shift_start.is_some() != self.shift_end.is_some() {
            return Err("give both `shift_start` and `shift_end`, or neither".into());
        }
        if !self.hired.trim().is_empty() && parse_when(&self.hired).is_none() {
            return Err(format!("`hired` is not a date: `{}`", clip(&self.hired)));
        }
        Ok(())
    }
}

impl Directory {
    /// Adds (or replaces) one staff member's profile.
    pub fn add_staff(&mut self, r: &RosterEntry) {
        let u = self.user(r.user.trim());
        let department = match r.department.trim() {
            "" => None,
            d => Some(self.department(d)),
        };
        let own_chart = match r.patient_id.trim() {
            "" => None,
            p => Some(self.patient(p)),
        };
        if let Some(p) = own_chart {
            if let Some(facts) = self.facts.get_mut(p as usize) {
                facts.employee = Some(u);
            }
        }
        let facts = StaffFacts {
            person: PersonKey::new(&r.family, &r.given, &r.address),
            department,
            job: Job::of_role(&r.role),
            shift: r.shift_start.zip(r.shift_end),
            own_chart,
            hired: parse_when(&r.hired).map(|t| t.0),
            on_roster: true,
        };
        if let Some(s) = self.staff.get_mut(u as usize) {
            *s = facts;
        }
    }
}

/// Parses an HR roster (`roster.csv`, RFC 4180 with a header row naming the columns, in
/// any order).
///
/// # Errors
/// [`DetectError::Input`] naming the line for a missing column, an empty user, a shift
/// hour outside 0–23 (or only one of the two), a malformed hire date, or a user listed
/// twice.
pub fn parse_roster(input: impl std::io::Read) -> Result<Vec<RosterEntry>, DetectError> {
    const F: &str = "roster.csv";
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(input);
    let header = r.headers().map_err(|e| bad(F, 1, e.to_string()))?.clone();
    let mut col = [0usize; 10];
    for (i, name) in ROSTER_COLUMNS.iter().enumerate() {
        let at = header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                bad(
                    F,
                    1,
                    format!(
                        "missing column `{name}` (need {})",
                        ROSTER_COLUMNS.join(",")
                    ),
                )
            })?;
        if let Some(c) = col.get_mut(i) {
            *c = at;
        }
    }
    let mut out = vec![];
    let mut seen = rustc_hash::FxHashSet::default();
    for (i, rec) in r.records().enumerate() {
        let line = i as u64 + 2;
        let rec = rec.map_err(|e| bad(F, line, e.to_string()))?;
        let f = |k: usize| -> &str { col.get(k).and_then(|&c| rec.get(c)).unwrap_or("") };
        let hour = |v: &str, name: &str| -> Result<Option<u8>, DetectError> {
            if v.is_empty() {
                return Ok(None);
            }
            match v.parse::<u8>() {
                Ok(h) if h < 24 => Ok(Some(h)),
                _ => Err(bad(
                    F,
                    line,
                    format!("`{name}` must be an hour 0–23, not `{}`", clip(v)),
                )),
            }
        };
        let entry = RosterEntry {
            user: f(0).to_owned(),
            family: f(1).to_owned(),
            given: f(2).to_owned(),
            address: f(3).to_owned(),
            department: f(4).to_owned(),
            role: f(5).to_owned(),
            shift_start: hour(f(6), "shift_start")?,
            shift_end: hour(f(7), "shift_end")?,
            patient_id: f(8).to_owned(),
            hired: f(9).to_owned(),
        };
        entry.check().map_err(|m| bad(F, line, m))?;
        if !seen.insert(entry.user.clone()) {
            return Err(bad(
                F,
                line,
                format!("user `{}` is listed twice", clip(&entry.user)),
            ));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Reads an HR roster (`roster.csv`) into `dir`; returns the number of staff.
///
/// # Errors
/// As [`parse_roster`].
pub fn read_roster(dir: &mut Directory, input: impl std::io::Read) -> Result<u64, DetectError> {
    let entries = parse_roster(input)?;
    for e in &entries {
        dir.add_staff(e);
    }
    Ok(entries.len() as u64)
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[derive(Deserialize)]
struct RawPatient<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    family: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    given: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    address: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    #[allow(dead_code)]
    birth_date: Option<Cow<'a, str>>,
    #[serde(default)]
    vip: Option<bool>,
    #[serde(borrow, default)]
    employee_user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    deceased_date: Option<Cow<'a, str>>,
    #[serde(default)]
    care_team: Option<Vec<String>>,
    #[serde(default)]
    encounters: Option<Vec<RawEncounter>>,
    #[serde(default)]
    emergency_contact: Option<RawContact>,
}

#[derive(Deserialize)]
struct RawEncounter {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    department: Option<String>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
}

#[derive(Deserialize)]
struct RawContact {
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    given: Option<String>,
    #[serde(default)]
    address: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Reads `patients.jsonl` into `dir`; returns the number of patients.
///
/// # Errors
/// [`DetectError::Input`] naming the line for malformed JSON, a missing `id`, a patient
/// listed twice, or a malformed date.
pub fn read_patients(dir: &mut Directory, input: impl BufRead) -> Result<u64, DetectError> {
    const F: &str = "patients.jsonl";
    let mut n = 0u64;
    let mut seen = rustc_hash::FxHashSet::default();
    for (i, line) in input.lines().enumerate() {
        let ln = i as u64 + 1;
        let line = line.map_err(|e| bad(F, ln, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawPatient<'_> = json_line(&line).map_err(|m| bad(F, ln, m))?;
        let id = some(&raw.id).ok_or_else(|| bad(F, ln, "missing `id`"))?;
        if !seen.insert(id.to_owned()) {
            return Err(bad(
                F,
                ln,
                format!("patient `{}` is listed twice", clip(id)),
            ));
        }
        let date = |v: Option<&str>, name: &str| -> Result<Option<i64>, DetectError> {
            v.map(|v| {
                parse_when(v)
                    .map(|t| t.0)
                    .ok_or_else(|| bad(F, ln, format!("`{name}` is not a date: `{}`", clip(v))))
            })
            .transpose()
        };
        let p = dir.patient(id);
        let employee = some(&raw.employee_user).map(|u| dir.user(u));
        let care_team = raw
            .care_team
            .iter()
            .flatten()
            .filter(|u| !u.trim().is_empty())
            .map(|u| dir.user(u.trim()))
            .collect();
        let mut encounters = vec![];
        for e in raw.encounters.iter().flatten() {
            let start = date(nonempty(&e.start), "encounters.start")?
                .ok_or_else(|| bad(F, ln, "an encounter needs a `start`"))?;
            let end = date(nonempty(&e.end), "encounters.end")?.unwrap_or(i64::MAX / 4);
            encounters.push(EncounterFact {
                user: nonempty(&e.user).map(|u| dir.user(u)),
                department: nonempty(&e.department).map(|d| dir.department(d)),
                start,
                end: end.max(start),
            });
        }
        let contact = raw.emergency_contact.as_ref().map(|c| {
            PersonKey::new(
                nonempty(&c.family).unwrap_or(""),
                nonempty(&c.given).unwrap_or(""),
                nonempty(&c.address).unwrap_or(""),
            )
        });
        let deceased = date(some(&raw.deceased_date), "deceased_date")?;
        let person = PersonKey::new(
            some(&raw.family).unwrap_or(""),
            some(&raw.given).unwrap_or(""),
            some(&raw.address).unwrap_or(""),
        );
        if let Some(f) = dir.facts.get_mut(p as usize) {
            f.person = person;
            f.contact = contact;
            f.vip = raw.vip.unwrap_or(false);
            // The roster's `patient_id` may already have named the employee.
            f.employee = employee.or(f.employee);
            f.deceased = deceased;
            f.care_team = care_team;
            f.encounters = encounters;
        }
        n += 1;
    }
    Ok(n)
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    patient: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    category: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source_ip: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    department: Option<Cow<'a, str>>,
    #[serde(default)]
    break_glass: Option<bool>,
    #[serde(borrow, default)]
    query: Option<Cow<'a, str>>,
}

/// One event's fields as text, however they arrived (an `events.jsonl` line, or an audit
/// record of medvault's own); `None` or empty is none.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventFields<'a> {
    pub time: Option<&'a str>,
    pub user: Option<&'a str>,
    pub action: Option<&'a str>,
    pub patient: Option<&'a str>,
    pub category: Option<&'a str>,
    pub outcome: Option<&'a str>,
    pub source_ip: Option<&'a str>,
    pub department: Option<&'a str>,
    pub break_glass: bool,
    pub query: Option<&'a str>,
}

/// Builds an [`Event`] from its fields, interning names into `dir`: the one constructor
/// both the offline scan and the live consumer use.
///
/// # Errors
/// A message for a missing or malformed `time`, or an unknown `action`, `category` or
/// `outcome`.
pub fn build_event(dir: &mut Directory, f: &EventFields<'_>) -> Result<Event, String> {
    fn s(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    let time = s(f.time).ok_or("missing `time`")?;
    let (time, offset) =
        parse_when(time).ok_or_else(|| format!("`time` is not RFC 3339: `{}`", clip(time)))?;
    let action = s(f.action).ok_or("missing `action`")?;
    let action = EventAction::parse(action).ok_or_else(|| {
        format!(
            "unknown action `{}` (login, read, search, create, update, export)",
            clip(action)
        )
    })?;
    let category = match s(f.category) {
        None => None,
        Some(c) => Some(EventCategory::parse(c).ok_or_else(|| {
            format!(
                "unknown category `{}` (demographics, vitals, labs, medications, problems, notes, allergies, plans, billing)",
                clip(c)
            )
        })?),
    };
    let success = match s(f.outcome) {
        None | Some("success") => true,
        Some("failure") => false,
        Some(o) => return Err(format!("unknown outcome `{}` (success, failure)", clip(o))),
    };
    Ok(Event {
        time,
        offset,
        user: s(f.user).map(|u| dir.user(u)),
        action,
        patient: s(f.patient).map(|p| dir.patient(p)),
        category,
        success,
        source_ip: s(f.source_ip).map(|a| dir.address(a)),
        department: s(f.department).map(|d| dir.department(d)),
        break_glass: f.break_glass,
        name_search: s(f.query)
            .and_then(name_searched)
            .map(|n| dir.names.intern(&n)),
    })
}

/// Parses one `events.jsonl` line into an [`Event`], interning its names into `dir`.
///
/// # Errors
/// A message for malformed JSON, a missing or malformed `time`, or an unknown `action`,
/// `category` or `outcome`.
pub fn parse_event(dir: &mut Directory, line: &str) -> Result<Event, String> {
    let raw: RawEvent<'_> = json_line(line)?;
    build_event(
        dir,
        &EventFields {
            time: raw.time.as_deref(),
            user: raw.user.as_deref(),
            action: raw.action.as_deref(),
            patient: raw.patient.as_deref(),
            category: raw.category.as_deref(),
            outcome: raw.outcome.as_deref(),
            source_ip: raw.source_ip.as_deref(),
            department: raw.department.as_deref(),
            break_glass: raw.break_glass.unwrap_or(false),
            query: raw.query.as_deref(),
        },
    )
}

/// How far (seconds) an event may be earlier than the latest before it: concurrent
/// requests, and servers' clocks, disorder a log by a moment.
pub const MAX_SKEW_SECS: i64 = 2;

/// What a scan read and raised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub events: u64,
    pub alerts: u64,
}

/// Runs the detectors over `events.jsonl`, writing one alert per line to `out`.
/// `progress` is told the bytes read so far, now and then.
///
/// # Errors
/// [`DetectError::Input`] naming the line for a malformed event or one earlier than the
/// line before it; [`DetectError::Io`] when reading or writing fails.
pub fn scan(
    dir: &mut Directory,
    thresholds: Thresholds,
    events: impl BufRead,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<ScanStats, DetectError> {
    const F: &str = "events.jsonl";
    let mut det = Detector::new(thresholds);
    let mut stats = ScanStats::default();
    let mut alerts = Vec::new();
    let mut last = i64::MIN;
    let mut read = 0u64;
    for (i, line) in events.lines().enumerate() {
        let ln = i as u64 + 1;
        let line = line.map_err(|e| bad(F, ln, e.to_string()))?;
        read += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let e = parse_event(dir, &line).map_err(|m| bad(F, ln, m))?;
        // Servers' clocks and concurrent requests may disorder a log by a moment.
        if e.time < last.saturating_sub(MAX_SKEW_SECS) {
            return Err(bad(
                F,
                ln,
                format!("events must be in time order (up to {MAX_SKEW_SECS} s of disorder is tolerated): this one is earlier than the lines before"),
            ));
        }
        last = last.max(e.time);
        det.observe_into(dir, &e, &mut alerts);
        stats.events += 1;
        for a in alerts.drain(..) {
            let line = serde_json::to_string(&a.render(dir))
                .map_err(|e| DetectError::Io(e.to_string()))?;
            writeln!(out, "{line}").map_err(|e| DetectError::Io(e.to_string()))?;
            stats.alerts += 1;
        }
        if stats.events % 65_536 == 0 {
            progress(read);
        }
    }
    progress(read);
    Ok(stats)
}
