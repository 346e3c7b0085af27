//! medvault-detect — privacy monitoring and intrusion detection over access events: the
//! snooping, behaviour and attack detectors, their per-user and per-department baselines,
//! and the alerts they raise. One detector core serves both modes: live, fed by the gate
//! from its own audit log, and offline ([`scan`]), fed by another EHR's exported log.
//!
//! This room is pure: it takes time from the events it is given (Unix seconds), does no I/O
//! of its own beyond reading the readers it is handed, and never decides what happens to an
//! alert — the gate stores, seals, audits and acts on what it returns.
//! It sees names and addresses (a roster's and a patient's) only to compare them; an alert's
//! evidence names the kind of match ("same surname and street as the user"), never the
//! values matched, so alerts can be shown and logged without sealing their evidence.
//! INVARIANT: events are fed in time order; each alert is raised at most once per
//! (type, user or address, patient, local day).
#![forbid(unsafe_code)]

pub mod lifecycle;
pub mod scan;
pub mod scenario;

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

/// Errors of this room.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A malformed input line: which file, which line (1-based), what is wrong.
    #[error("{file} line {line}: {msg}")]
    Input {
        file: String,
        line: u64,
        msg: String,
    },
    #[error("{0}")]
    Io(String),
}

impl DetectError {
    /// The same error naming the file as the user gave it (the readers name the role of
    /// the input: `roster.csv`, `patients.jsonl`, `events.jsonl`).
    pub fn in_file(self, name: &str) -> Self {
        match self {
            DetectError::Input { line, msg, .. } => DetectError::Input {
                file: name.to_owned(),
                line,
                msg,
            },
            other => other,
        }
    }
}

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// The detector types; their names are the offline scan's `type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertType {
    FamilySnooping,
    CoworkerSnooping,
    SelfAccess,
    VipSnooping,
    DeceasedAccess,
    NoRelationship,
    SearchThenOpen,
    AfterHours,
    VolumeSpike,
    MassExport,
    DormantAccount,
    BreakGlassOveruse,
    BruteForce,
    CredentialStuffing,
    Enumeration,
    /// A session's token used from an address other than the one it signed in from.
    TokenNewAddress,
}

impl AlertType {
    pub const ALL: &'static [AlertType] = &[
        AlertType::FamilySnooping,
        AlertType::CoworkerSnooping,
        AlertType::SelfAccess,
        AlertType::VipSnooping,
        AlertType::DeceasedAccess,
        AlertType::NoRelationship,
        AlertType::SearchThenOpen,
        AlertType::AfterHours,
        AlertType::VolumeSpike,
        AlertType::MassExport,
        AlertType::DormantAccount,
        AlertType::BreakGlassOveruse,
        AlertType::BruteForce,
        AlertType::CredentialStuffing,
        AlertType::Enumeration,
        AlertType::TokenNewAddress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertType::FamilySnooping => "family_snooping",
            AlertType::CoworkerSnooping => "coworker_snooping",
            AlertType::SelfAccess => "self_access",
            AlertType::VipSnooping => "vip_snooping",
            AlertType::DeceasedAccess => "deceased_access",
            AlertType::NoRelationship => "no_relationship",
            AlertType::SearchThenOpen => "search_then_open",
            AlertType::AfterHours => "after_hours",
            AlertType::VolumeSpike => "volume_spike",
            AlertType::MassExport => "mass_export",
            AlertType::DormantAccount => "dormant_account",
            AlertType::BreakGlassOveruse => "break_glass_overuse",
            AlertType::BruteForce => "brute_force",
            AlertType::CredentialStuffing => "credential_stuffing",
            AlertType::Enumeration => "enumeration",
            AlertType::TokenNewAddress => "token_new_address",
        }
    }

    /// Snooping, behaviour or attack (the three families).
    pub fn family(self) -> &'static str {
        match self {
            AlertType::FamilySnooping
            | AlertType::CoworkerSnooping
            | AlertType::SelfAccess
            | AlertType::VipSnooping
            | AlertType::DeceasedAccess
            | AlertType::NoRelationship
            | AlertType::SearchThenOpen => "snooping",
            AlertType::AfterHours
            | AlertType::VolumeSpike
            | AlertType::MassExport
            | AlertType::DormantAccount
            | AlertType::BreakGlassOveruse => "behaviour",
            AlertType::BruteForce
            | AlertType::CredentialStuffing
            | AlertType::Enumeration
            | AlertType::TokenNewAddress => "attack",
        }
    }
}

impl fmt::Display for AlertType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AlertType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AlertType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown alert type `{}`",
                    s.chars().take(40).collect::<String>()
                )
            })
    }
}

impl Serialize for AlertType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AlertType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventAction {
    Login,
    Read,
    Search,
    Create,
    Update,
    Export,
}

impl EventAction {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "login" => EventAction::Login,
            "read" => EventAction::Read,
            "search" => EventAction::Search,
            "create" => EventAction::Create,
            "update" => EventAction::Update,
            "export" => EventAction::Export,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            EventAction::Login => "login",
            EventAction::Read => "read",
            EventAction::Search => "search",
            EventAction::Create => "create",
            EventAction::Update => "update",
            EventAction::Export => "export",
        }
    }
    /// Charting: a write on the chart (a treatment relationship for the next 24 hours).
    fn charts(self) -> bool {
        matches!(self, EventAction::Create | EventAction::Update)
    }
}

/// The data category an event touched (the offline scan's vocabulary; `scan` documents how
/// medvault's own categories map onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventCategory {
    Demographics,
    Vitals,
    Labs,
    Medications,
    Problems,
    Notes,
    Allergies,
    Plans,
    Billing,
}

impl EventCategory {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "demographics" => EventCategory::Demographics,
            "vitals" => EventCategory::Vitals,
            "labs" => EventCategory::Labs,
            "medications" => EventCategory::Medications,
            "problems" => EventCategory::Problems,
            "notes" => EventCategory::Notes,
            "allergies" => EventCategory::Allergies,
            "plans" => EventCategory::Plans,
            "billing" => EventCategory::Billing,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            EventCategory::Demographics => "demographics",
            EventCategory::Vitals => "vitals",
            EventCategory::Labs => "labs",
            EventCategory::Medications => "medications",
            EventCategory::Problems => "problems",
            EventCategory::Notes => "notes",
            EventCategory::Allergies => "allergies",
            EventCategory::Plans => "plans",
            EventCategory::Billing => "billing",
        }
    }
    /// Front-office data: what registration and billing staff work with.
    fn front_office(self) -> bool {
        matches!(self, EventCategory::Demographics | EventCategory::Billing)
    }
}

/// The kind of work a staff member does, as far as the detectors care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Job {
    /// Physicians, nurses and other clinicians: their reads need a treatment relationship.
    #[default]
    Clinical,
    /// Registration (front desk) and billing: demographics and billing are their job.
    FrontOffice,
}

impl Job {
    /// From a roster `role` (medvault's roles and common HR titles).
    pub fn of_role(role: &str) -> Job {
        let r = role.trim().to_ascii_lowercase();
        let front = [
            "front_desk",
            "front desk",
            "registration",
            "registrar",
            "clerk",
            "billing",
            "coder",
            "patient access",
            "scheduler",
        ];
        if front.iter().any(|f| r.contains(f)) {
            Job::FrontOffice
        } else {
            Job::Clinical
        }
    }
}

/// Interned ids: dense indexes into the [`Directory`]'s tables.
pub type UserIx = u32;
pub type PatientIx = u32;
pub type DeptIx = u32;
pub type AddrIx = u32;

/// Names and addresses reduced to what comparison needs: lowercased, accents and
/// punctuation dropped, whitespace collapsed. `None` for empty input.
pub fn normalize(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.extend(c.to_lowercase());
        } else {
            space = true;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The street of an address: its first comma-separated part, normalized, without the
/// leading house number ("12B Oak Street, Springfield" → "oak street"). `None` when
/// nothing is left.
pub fn street_of(raw: &str) -> Option<String> {
    let first = raw.split(',').next().unwrap_or("");
    let n = normalize(first)?;
    let rest: Vec<&str> = n
        .split(' ')
        .skip_while(|w| w.chars().any(|c| c.is_ascii_digit()))
        .collect();
    let s = rest.join(" ");
    (!s.is_empty()).then_some(s)
}

/// A person's identifying facts as detectors compare them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersonKey {
    pub family: Option<String>,
    pub given: Option<String>,
    /// The whole address, normalized.
    pub address: Option<String>,
    /// The street without the house number, normalized.
    pub street: Option<String>,
}

impl PersonKey {
    pub fn new(family: &str, given: &str, address: &str) -> Self {
        PersonKey {
            family: normalize(family),
            given: normalize(given),
            address: normalize(address),
            street: street_of(address),
        }
    }
}

/// One staff member's profile (an HR roster line): department, shift, home, own chart.
#[derive(Debug, Clone, Default)]
pub struct StaffFacts {
    pub person: PersonKey,
    pub department: Option<DeptIx>,
    pub job: Job,
    /// Shift start and end hours (0–23, local time); a shift may wrap midnight; equal
    /// hours mean round the clock. `None`: no shift known, so never "after hours".
    pub shift: Option<(u8, u8)>,
    /// The employee's own chart.
    pub own_chart: Option<PatientIx>,
    /// Hire date (Unix seconds, start of day).
    pub hired: Option<i64>,
    /// The user appears in the roster.
    pub on_roster: bool,
}

/// One encounter as detectors need it: who, in which department, when (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncounterFact {
    pub user: Option<UserIx>,
    pub department: Option<DeptIx>,
    pub start: i64,
    pub end: i64,
}

/// One patient's facts: identity to compare, flags, and treatment relationships.
#[derive(Debug, Clone, Default)]
pub struct PatientFacts {
    pub person: PersonKey,
    /// The emergency contact (FHIR `Patient.contact`), if any.
    pub contact: Option<PersonKey>,
    pub vip: bool,
    /// The patient is this employee.
    pub employee: Option<UserIx>,
    /// Date of death (Unix seconds, start of day).
    pub deceased: Option<i64>,
    pub care_team: Vec<UserIx>,
    pub encounters: Vec<EncounterFact>,
}

/// String interner: dense ids for names seen once.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    ids: FxHashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ids.insert(s.to_owned(), i);
        self.names.push(s.to_owned());
        i
    }
    pub fn find(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
    pub fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map(String::as_str).unwrap_or("")
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Everything the detectors know about people: staff profiles and patient facts, by
/// interned id. Users and patients seen only in events get empty facts.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    pub users: Interner,
    pub staff: Vec<StaffFacts>,
    pub patients: Interner,
    pub facts: Vec<PatientFacts>,
    pub departments: Interner,
    pub addresses: Interner,
    /// Names searched for (normalized).
    pub names: Interner,
}

impl Directory {
    pub fn user(&mut self, name: &str) -> UserIx {
        let i = self.users.intern(name);
        while self.staff.len() <= i as usize {
            self.staff.push(StaffFacts::default());
        }
        i
    }
    pub fn patient(&mut self, id: &str) -> PatientIx {
        let i = self.patients.intern(id);
        while self.facts.len() <= i as usize {
            self.facts.push(PatientFacts::default());
        }
        i
    }
    pub fn department(&mut self, name: &str) -> DeptIx {
        self.departments.intern(&name.trim().to_ascii_lowercase())
    }
    pub fn address(&mut self, ip: &str) -> AddrIx {
        self.addresses.intern(ip)
    }
    pub fn staff_of(&self, u: UserIx) -> Option<&StaffFacts> {
        self.staff.get(u as usize)
    }
    pub fn facts_of(&self, p: PatientIx) -> Option<&PatientFacts> {
        self.facts.get(p as usize)
    }
}

/// One access event, interned. `time` is Unix seconds (UTC); `offset` the event's own UTC
/// offset in seconds (local hour and day come from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub time: i64,
    pub offset: i32,
    pub user: Option<UserIx>,
    pub action: EventAction,
    pub patient: Option<PatientIx>,
    pub category: Option<EventCategory>,
    pub success: bool,
    pub source_ip: Option<AddrIx>,
    pub department: Option<DeptIx>,
    pub break_glass: bool,
    /// The name a search looked a patient up by (`name`, `family`, `given`, `phonetic`,
    /// normalized, interned in [`Directory::names`]).
    pub name_search: Option<u32>,
}

impl Event {
    fn local(&self) -> i64 {
        self.time.saturating_add(i64::from(self.offset))
    }
    /// Local day number (days since 1970-01-01).
    pub fn day(&self) -> i64 {
        self.local().div_euclid(DAY)
    }
    /// Local hour, 0–23.
    pub fn hour(&self) -> u8 {
        u8::try_from(self.local().rem_euclid(DAY) / HOUR).unwrap_or(0)
    }
}

/// The name a search query looks a patient up by (FHIR `name`, `family`, `given`,
/// `phonetic`, or free text `q`/`_content`; URL-encoded `+` and `%20` are spaces),
/// normalized; `None` when it is not a search by name.
pub fn name_searched(query: &str) -> Option<String> {
    let mut words = vec![];
    for kv in query.trim_start_matches('?').split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = k.split(':').next().unwrap_or("");
        if matches!(
            k,
            "name" | "family" | "given" | "phonetic" | "q" | "_content"
        ) {
            let v = v.replace('+', " ").replace("%20", " ").replace("%2C", ",");
            // A name searched without its value (medvault's own audit log records
            // parameter names only) is a name search that may have found anyone: "".
            words.push(normalize(&v).unwrap_or_default());
        }
    }
    (!words.is_empty()).then(|| words.join(" ").trim().to_owned())
}

/// Whether a patient answers a name search: every searched word starts one of the
/// patient's names (FHIR string search matches from the start, ignoring case and accents).
pub fn answers(searched: &str, p: &PersonKey) -> bool {
    let names: Vec<&str> = [&p.family, &p.given]
        .into_iter()
        .flatten()
        .flat_map(|n| n.split(' '))
        .collect();
    !names.is_empty()
        && searched
            .split(' ')
            .filter(|w| !w.is_empty())
            .all(|w| names.iter().any(|n| n.starts_with(w)))
}

/// Who an alert is about: a user, or (for attacks from one address over many accounts)
/// a source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    User(UserIx),
    Address(AddrIx),
}

/// One alert, interned (render with [`Alert::render`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertType,
    pub user: Option<UserIx>,
    pub source_ip: Option<AddrIx>,
    pub patient: Option<PatientIx>,
    /// When the deciding event happened (Unix seconds, UTC).
    pub time: i64,
    /// 0–1: how sure the detector is (and how urgent review is).
    pub score: f64,
    /// A sentence a privacy officer can act on; names kinds of matches, never values.
    pub evidence: String,
}

/// An alert as the offline scan writes it and the gate stores it (`alerts.jsonl` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertLine {
    #[serde(rename = "type")]
    pub kind: AlertType,
    pub user: Option<String>,
    pub source_ip: Option<String>,
    pub patient: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    pub score: f64,
    pub evidence: String,
}

impl Alert {
    pub fn render(&self, dir: &Directory) -> AlertLine {
        AlertLine {
            kind: self.kind,
            user: self.user.map(|u| dir.users.name(u).to_owned()),
            source_ip: self.source_ip.map(|a| dir.addresses.name(a).to_owned()),
            patient: self.patient.map(|p| dir.patients.name(p).to_owned()),
            time: rfc3339(self.time),
            score: (self.score * 100.0).round() / 100.0,
            evidence: self.evidence.clone(),
        }
    }
}

/// RFC 3339 text (UTC, seconds) of Unix seconds.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The detectors' thresholds. The defaults are what the scenario test scores against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Days before and after an encounter that it relates its clinicians (and department).
    pub encounter_window_days: i64,
    /// Hours after charting on a patient that the author stays related.
    pub charting_hours: i64,
    /// Minutes after a name search that an open counts as "after a name search".
    pub search_open_minutes: i64,
    /// Hours of slack before a shift starts and after it ends.
    pub shift_grace_hours: i64,
    /// Hours around an ongoing encounter in which night work on it is on-call work.
    pub on_call_hours: i64,
    /// Distinct patients a day below which no volume is a spike.
    pub volume_min: u32,
    /// Times the user's own (and their department's) daily mean that is a spike.
    pub volume_factor: f32,
    /// Times the department's colleagues' level today that is a spike (an emergency
    /// department surge raises everyone).
    pub volume_peer_factor: f32,
    /// Active days of history needed before a baseline is trusted.
    pub baseline_days: u32,
    /// Distinct patients exported in a day that is a mass export.
    pub mass_export: u32,
    /// Days without activity after which an account is dormant.
    pub dormant_days: i64,
    /// Distinct patients opened under break-the-glass in seven days that is overuse.
    pub break_glass_week: u32,
    /// Failed sign-ins on one account within ten minutes.
    pub brute_force: u32,
    /// Accounts failing sign-in from one address within ten minutes.
    pub stuffing_accounts: u32,
    /// Failed reads or searches by one user within ten minutes.
    pub enumeration_failures: u32,
    /// Searches by one user within ten minutes.
    pub enumeration_searches: u32,
    /// Hours a session may last (token use from a new address within it is suspect).
    pub session_hours: i64,
    /// Raise `token_new_address`. On for the live log, whose sign-ins and sessions are
    /// medvault's own; the offline scan turns it off by default, because another EHR's
    /// export rarely ties a workstation's events to its sign-in.
    pub session_address: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            encounter_window_days: 30,
            charting_hours: 24,
            search_open_minutes: 15,
            shift_grace_hours: 1,
            on_call_hours: 12,
            volume_min: 30,
            volume_factor: 3.0,
            volume_peer_factor: 2.0,
            baseline_days: 5,
            mass_export: 50,
            dormant_days: 30,
            break_glass_week: 4,
            brute_force: 10,
            stuffing_accounts: 10,
            enumeration_failures: 20,
            enumeration_searches: 40,
            session_hours: 12,
            session_address: true,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct UserState {
    last_seen: Option<i64>,
    failed_logins: VecDeque<(i64, Option<AddrIx>)>,
    failed_reads: VecDeque<i64>,
    searches: VecDeque<i64>,
    break_glass: VecDeque<(i64, PatientIx)>,
    /// When overuse was last raised: one alert per seven-day window.
    break_glass_raised: Option<i64>,
    last_name_search: Option<(i64, u32)>,
    login: Option<(AddrIx, i64)>,
    today: u32,
    exports_today: u32,
    baseline_days: u32,
    baseline_total: u64,
    /// The department the user's volume counts toward today.
    dept_today: Option<DeptIx>,
}

#[derive(Debug, Default, Clone)]
struct DeptState {
    baseline_days: u64,
    baseline_total: u64,
    today_total: u64,
    today_users: u32,
}

/// The detector core: feed it events in time order with [`Detector::observe`]; it returns
/// the alerts each event raises. State (baselines, windows) lives here; facts come from the
/// [`Directory`] passed with each event, so the gate can refresh them between events.
#[derive(Debug, Default)]
pub struct Detector {
    pub thresholds: Thresholds,
    users: Vec<UserState>,
    depts: Vec<DeptState>,
    ip_failures: FxHashMap<AddrIx, VecDeque<(i64, UserIx)>>,
    charted: FxHashMap<(UserIx, PatientIx), i64>,
    seen_today: FxHashSet<(UserIx, PatientIx)>,
    exported_today: FxHashSet<(UserIx, PatientIx)>,
    emitted: FxHashSet<(AlertType, Subject, Option<PatientIx>, i64)>,
    day: Option<i64>,
    stream_start: Option<i64>,
    /// Failed sign-ins under no known user name, each counted as an account of its own
    /// (the gate never records a name that is not an account: it may be a password).
    unnamed: u32,
    /// Events observed.
    pub events: u64,
}

/// The snooping facts found for one access, most specific first.
struct Snoop {
    kind: AlertType,
    score: f64,
    evidence: String,
}

impl Detector {
    pub fn new(thresholds: Thresholds) -> Self {
        Detector {
            thresholds,
            ..Detector::default()
        }
    }

    fn user_state(&mut self, u: UserIx) -> &mut UserState {
        let i = u as usize;
        if self.users.len() <= i {
            self.users.resize_with(i + 1, UserState::default);
        }
        #[expect(clippy::indexing_slicing, reason = "resized just above")]
        &mut self.users[i]
    }

    fn dept_state(&mut self, d: DeptIx) -> &mut DeptState {
        let i = d as usize;
        if self.depts.len() <= i {
            self.depts.resize_with(i + 1, DeptState::default);
        }
        #[expect(clippy::indexing_slicing, reason = "resized just above")]
        &mut self.depts[i]
    }

    /// Closes the day: today's volumes join the baselines.
    fn roll_day(&mut self) {
        for u in &mut self.users {
            if u.today > 0 {
                u.baseline_days += 1;
                u.baseline_total += u64::from(u.today);
            }
            u.today = 0;
            u.exports_today = 0;
            u.dept_today = None;
        }
        for d in &mut self.depts {
            if d.today_users > 0 {
                d.baseline_days += u64::from(d.today_users);
                d.baseline_total += d.today_total;
            }
            d.today_total = 0;
            d.today_users = 0;
        }
        self.seen_today.clear();
        self.exported_today.clear();
    }

    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        out: &mut Vec<Alert>,
        kind: AlertType,
        subject: Subject,
        patient: Option<PatientIx>,
        e: &Event,
        score: f64,
        evidence: String,
    ) {
        if !self.emitted.insert((kind, subject, patient, e.day())) {
            return;
        }
        let (user, source_ip) = match subject {
            Subject::User(u) => (Some(u), e.source_ip),
            Subject::Address(a) => (None, Some(a)),
        };
        out.push(Alert {
            kind,
            user,
            source_ip,
            patient,
            time: e.time,
            score: score.clamp(0.0, 1.0),
            evidence,
        });
    }

    /// Feeds one event; returns the alerts it raises (usually none).
    pub fn observe(&mut self, dir: &Directory, e: &Event) -> Vec<Alert> {
        let mut out = Vec::new();
        self.observe_into(dir, e, &mut out);
        out
    }

    /// [`Detector::observe`] appending to `out` (no allocation when nothing is raised).
    pub fn observe_into(&mut self, dir: &Directory, e: &Event, out: &mut Vec<Alert>) {
        self.events += 1;
        let day = e.day();
        match self.day {
            Some(d) if day > d => {
                self.roll_day();
                self.day = Some(day);
            }
            None => self.day = Some(day),
            _ => {}
        }
        if self.stream_start.is_none() {
            self.stream_start = Some(e.time);
        }
        self.attacks(e, out);
        let Some(u) = e.user else { return };
        if e.success {
            self.dormant(dir, u, e, out);
        }
        if e.action == EventAction::Login {
            if e.success {
                if let Some(ip) = e.source_ip {
                    self.user_state(u).login = Some((ip, e.time));
                }
            }
            return;
        }
        if !e.success {
            self.refused_attempt(dir, u, e, out);
            return;
        }
        self.session_address(u, e, out);
        if e.action == EventAction::Search {
            let t = &self.thresholds;
            let (win, max) = (10 * MINUTE, t.enumeration_searches);
            let s = self.user_state(u);
            if let Some(n) = e.name_search {
                s.last_name_search = Some((e.time, n));
            }
            push_window(&mut s.searches, e.time, win);
            if s.searches.len() >= max as usize {
                self.raise(
                    out,
                    AlertType::Enumeration,
                    Subject::User(u),
                    None,
                    e,
                    0.8,
                    format!("{max} or more searches within ten minutes"),
                );
            }
        }
        let Some(p) = e.patient else { return };
        // Borrowed, not cloned: this runs for every event (a profile holds strings).
        let unknown = StaffFacts::default();
        let staff = dir.staff_of(u).unwrap_or(&unknown);
        let facts = dir.facts_of(p);
        let related = self.related(staff, facts, u, p, e);
        if e.action.charts() {
            self.charted.insert((u, p), e.time);
        }
        if let Some(facts) = facts {
            if let Some(s) = self.snooping(dir, staff, facts, u, p, e, related) {
                self.raise(
                    out,
                    s.kind,
                    Subject::User(u),
                    Some(p),
                    e,
                    s.score,
                    s.evidence,
                );
            }
            self.after_hours(staff, facts, u, p, e, out);
        }
        if e.break_glass {
            self.break_glass(u, p, e, out);
        }
        // Exports have their own detector; the volume is of charts opened.
        if e.action == EventAction::Export {
            self.mass_export(staff, u, p, e, out);
        } else {
            self.volume(staff, u, p, e, out);
        }
    }

    /// A refused attempt on a chart that is the user's own, a relative's, a coworker's, a
    /// VIP's or a deceased patient's is still an attempt (a refused read of any other chart
    /// is left to the enumeration detector).
    fn refused_attempt(&mut self, dir: &Directory, u: UserIx, e: &Event, out: &mut Vec<Alert>) {
        let Some(p) = e.patient else { return };
        let Some(facts) = dir.facts_of(p) else { return };
        if !matches!(e.action, EventAction::Read | EventAction::Export) {
            return;
        }
        // Borrowed, not cloned: this runs for every event (a profile holds strings).
        let unknown = StaffFacts::default();
        let staff = dir.staff_of(u).unwrap_or(&unknown);
        let related = self.related(staff, Some(facts), u, p, e);
        let Some(s) = self.snooping(dir, staff, facts, u, p, e, related) else {
            return;
        };
        if matches!(
            s.kind,
            AlertType::NoRelationship | AlertType::SearchThenOpen
        ) {
            return;
        }
        let evidence = format!("{} (the access was refused)", s.evidence);
        self.raise(
            out,
            s.kind,
            Subject::User(u),
            Some(p),
            e,
            s.score * 0.8,
            evidence,
        );
    }

    /// A treatment relationship (care team, an encounter of the user or of their
    /// department within the window, or charting within 24 hours), or, for registration
    /// and billing staff, a patient being seen within the window.
    fn related(
        &self,
        staff: &StaffFacts,
        facts: Option<&PatientFacts>,
        u: UserIx,
        p: PatientIx,
        e: &Event,
    ) -> Option<&'static str> {
        // Charting is clinical work in the open, not a look.
        if e.action.charts() {
            return Some("charting on the patient");
        }
        if let Some(&at) = self.charted.get(&(u, p)) {
            if e.time - at <= self.thresholds.charting_hours * HOUR {
                return Some("charted on the patient within 24 hours");
            }
        }
        let facts = facts?;
        if facts.care_team.contains(&u) {
            return Some("on the patient's care team");
        }
        let w = self.thresholds.encounter_window_days * DAY;
        let dept = e.department.or(staff.department);
        for enc in &facts.encounters {
            if e.time < enc.start - w || e.time > enc.end + w {
                continue;
            }
            if enc.user == Some(u) {
                return Some("an encounter with the user within 30 days");
            }
            if dept.is_some() && enc.department == dept {
                return Some("an encounter in the user's department within 30 days");
            }
            if staff.job == Job::FrontOffice {
                return Some("an encounter within 30 days (registration and billing)");
            }
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn snooping(
        &self,
        dir: &Directory,
        staff: &StaffFacts,
        facts: &PatientFacts,
        u: UserIx,
        p: PatientIx,
        e: &Event,
        related: Option<&'static str>,
    ) -> Option<Snoop> {
        if staff.own_chart == Some(p) || facts.employee == Some(u) {
            return Some(Snoop {
                kind: AlertType::SelfAccess,
                score: 0.9,
                evidence: "the user opened their own chart".into(),
            });
        }
        if related.is_some() {
            return None;
        }
        if let Some(ev) = family_match(&staff.person, facts) {
            return Some(Snoop {
                kind: AlertType::FamilySnooping,
                score: ev.1,
                evidence: format!("{}; no care team, encounter or charting in ±30 days", ev.0),
            });
        }
        if let Some(other) = facts.employee {
            if other != u {
                return Some(Snoop {
                    kind: AlertType::CoworkerSnooping,
                    score: 0.85,
                    evidence: "the patient is an employee the user does not treat".into(),
                });
            }
        }
        // Under break-the-glass the grant's review decides; overuse is its own detector.
        if e.break_glass {
            return None;
        }
        if facts.vip {
            return Some(Snoop {
                kind: AlertType::VipSnooping,
                score: 0.85,
                evidence: "a VIP chart opened without a treatment relationship".into(),
            });
        }
        let front_office_job =
            staff.job == Job::FrontOffice && e.category.is_none_or(EventCategory::front_office);
        if let Some(dead) = facts.deceased {
            if e.time >= dead && !front_office_job {
                return Some(Snoop {
                    kind: AlertType::DeceasedAccess,
                    score: 0.7,
                    evidence: "a deceased patient's chart opened without a treatment relationship"
                        .into(),
                });
            }
        }
        if front_office_job {
            return None;
        }
        if let Some((at, name)) = self.users.get(u as usize).and_then(|s| s.last_name_search) {
            if e.time - at <= self.thresholds.search_open_minutes * MINUTE
                && answers(dir.names.name(name), &facts.person)
            {
                return Some(Snoop {
                    kind: AlertType::SearchThenOpen,
                    score: 0.75,
                    evidence: "opened after a name search, without a treatment relationship".into(),
                });
            }
        }
        Some(Snoop {
            kind: AlertType::NoRelationship,
            score: 0.6,
            evidence: "no care team, encounter or charting in ±30 days".into(),
        })
    }

    fn after_hours(
        &mut self,
        staff: &StaffFacts,
        facts: &PatientFacts,
        u: UserIx,
        p: PatientIx,
        e: &Event,
        out: &mut Vec<Alert>,
    ) {
        let Some((start, end)) = staff.shift else {
            return;
        };
        if e.break_glass || on_shift(start, end, e.hour(), self.thresholds.shift_grace_hours) {
            return;
        }
        // On-call work: an encounter of the user or their department going on now.
        let slack = self.thresholds.on_call_hours * HOUR;
        let dept = e.department.or(staff.department);
        let on_call = facts.encounters.iter().any(|enc| {
            (enc.user == Some(u) || (dept.is_some() && enc.department == dept))
                && e.time >= enc.start - slack
                && e.time <= enc.end + slack
        }) || facts.care_team.contains(&u) && self.charted.contains_key(&(u, p));
        if on_call {
            return;
        }
        self.raise(
            out,
            AlertType::AfterHours,
            Subject::User(u),
            Some(p),
            e,
            0.6,
            format!(
                "opened at {:02}:00, outside the user's {start:02}:00–{end:02}:00 shift, with no encounter going on",
                e.hour()
            ),
        );
    }

    fn break_glass(&mut self, u: UserIx, p: PatientIx, e: &Event, out: &mut Vec<Alert>) {
        let max = self.thresholds.break_glass_week as usize;
        let s = self.user_state(u);
        while s
            .break_glass
            .front()
            .is_some_and(|(t, _)| e.time - t > 7 * DAY)
        {
            s.break_glass.pop_front();
        }
        if !s.break_glass.iter().any(|(_, q)| *q == p) {
            s.break_glass.push_back((e.time, p));
        }
        let quiet = s
            .break_glass_raised
            .is_some_and(|at| e.time - at <= 7 * DAY);
        if s.break_glass.len() >= max && !quiet {
            s.break_glass_raised = Some(e.time);
            self.raise(
                out,
                AlertType::BreakGlassOveruse,
                Subject::User(u),
                None,
                e,
                0.7,
                format!("break-the-glass on {max} or more patients within seven days"),
            );
        }
    }

    fn volume(
        &mut self,
        staff: &StaffFacts,
        u: UserIx,
        p: PatientIx,
        e: &Event,
        out: &mut Vec<Alert>,
    ) {
        if !self.seen_today.insert((u, p)) {
            return;
        }
        let dept = e.department.or(staff.department);
        let t = self.thresholds.clone();
        let s = self.user_state(u);
        s.today += 1;
        let first_today = s.today == 1;
        let today = s.today;
        let own = (s.baseline_days >= t.baseline_days)
            .then(|| s.baseline_total as f32 / s.baseline_days.max(1) as f32);
        let dept = if first_today {
            dept
        } else {
            s.dept_today.or(dept)
        };
        s.dept_today = dept;
        let Some(d) = dept else { return };
        let ds = self.dept_state(d);
        ds.today_total += 1;
        if first_today {
            ds.today_users += 1;
        }
        if today < t.volume_min {
            return;
        }
        let Some(own) = own else { return };
        let dept_mean = if ds.baseline_days > 0 {
            ds.baseline_total as f32 / ds.baseline_days as f32
        } else {
            own
        };
        let peers = ds.today_users.saturating_sub(1);
        let peer_today = if peers > 0 {
            (ds.today_total.saturating_sub(u64::from(today))) as f32 / peers as f32
        } else {
            0.0
        };
        let today_f = today as f32;
        if today_f > t.volume_factor * own
            && today_f > t.volume_factor * dept_mean
            && today_f > t.volume_peer_factor * peer_today
        {
            self.raise(
                out,
                AlertType::VolumeSpike,
                Subject::User(u),
                None,
                e,
                0.7,
                format!(
                    "{today} patients today against a usual {own:.0} (department {dept_mean:.0}, colleagues today {peer_today:.0})"
                ),
            );
        }
    }

    fn mass_export(
        &mut self,
        staff: &StaffFacts,
        u: UserIx,
        p: PatientIx,
        e: &Event,
        out: &mut Vec<Alert>,
    ) {
        if staff.job == Job::FrontOffice && e.category == Some(EventCategory::Billing) {
            return;
        }
        if !self.exported_today.insert((u, p)) {
            return;
        }
        let max = self.thresholds.mass_export;
        let s = self.user_state(u);
        s.exports_today += 1;
        if s.exports_today >= max {
            self.raise(
                out,
                AlertType::MassExport,
                Subject::User(u),
                None,
                e,
                0.85,
                format!("{max} or more patients' records exported today"),
            );
        }
    }

    fn dormant(&mut self, dir: &Directory, u: UserIx, e: &Event, out: &mut Vec<Alert>) {
        let limit = self.thresholds.dormant_days * DAY;
        let start = self.stream_start.unwrap_or(e.time);
        let hired = dir.staff_of(u).and_then(|s| s.hired);
        let s = self.user_state(u);
        let gap = match s.last_seen {
            Some(last) => e.time - last,
            // Never seen: dormant since the log (or the hire date, if later) began.
            None => e.time - hired.map_or(start, |h| h.max(start)),
        };
        s.last_seen = Some(e.time);
        if gap >= limit {
            let days = gap / DAY;
            self.raise(
                out,
                AlertType::DormantAccount,
                Subject::User(u),
                None,
                e,
                0.65,
                format!("active again after {days} days without activity"),
            );
        }
    }

    fn session_address(&mut self, u: UserIx, e: &Event, out: &mut Vec<Alert>) {
        let Some(ip) = e.source_ip.filter(|_| self.thresholds.session_address) else {
            return;
        };
        let hours = self.thresholds.session_hours;
        let Some((login_ip, at)) = self.users.get(u as usize).and_then(|s| s.login) else {
            return;
        };
        if login_ip != ip && e.time - at <= hours * HOUR {
            self.raise(
                out,
                AlertType::TokenNewAddress,
                Subject::User(u),
                None,
                e,
                0.8,
                "the session was used from an address other than the one it signed in from".into(),
            );
        }
    }

    fn attacks(&mut self, e: &Event, out: &mut Vec<Alert>) {
        let win = 10 * MINUTE;
        if e.action == EventAction::Login && !e.success {
            if let Some(u) = e.user {
                let max = self.thresholds.brute_force;
                let s = self.user_state(u);
                while s
                    .failed_logins
                    .front()
                    .is_some_and(|(t, _)| e.time - t > win)
                {
                    s.failed_logins.pop_front();
                }
                s.failed_logins.push_back((e.time, e.source_ip));
                if s.failed_logins.len() >= max as usize {
                    let mut from: Vec<Option<AddrIx>> =
                        s.failed_logins.iter().map(|(_, a)| *a).collect();
                    from.sort_unstable();
                    from.dedup();
                    let whence = match from.len() {
                        1 => String::new(),
                        n => format!(", from {n} addresses"),
                    };
                    self.raise(
                        out,
                        AlertType::BruteForce,
                        Subject::User(u),
                        None,
                        e,
                        0.9,
                        format!(
                            "{max} or more failed sign-ins on the account within ten minutes{whence}"
                        ),
                    );
                }
            }
            if let Some(ip) = e.source_ip {
                let max = self.thresholds.stuffing_accounts as usize;
                let q = self.ip_failures.entry(ip).or_default();
                while q.front().is_some_and(|(t, _)| e.time - t > win) {
                    q.pop_front();
                }
                let account = match e.user {
                    Some(u) => u,
                    None => {
                        self.unnamed = self.unnamed.wrapping_add(1);
                        u32::MAX - (self.unnamed % (1 << 30))
                    }
                };
                let q = self.ip_failures.entry(ip).or_default();
                q.push_back((e.time, account));
                let mut accounts: Vec<UserIx> = q.iter().map(|(_, u)| *u).collect();
                accounts.sort_unstable();
                accounts.dedup();
                if accounts.len() >= max {
                    let n = accounts.len();
                    self.raise(
                        out,
                        AlertType::CredentialStuffing,
                        Subject::Address(ip),
                        None,
                        e,
                        0.9,
                        format!(
                            "failed sign-ins on {n} accounts from one address within ten minutes"
                        ),
                    );
                }
            }
            return;
        }
        if !e.success && matches!(e.action, EventAction::Read | EventAction::Search) {
            if let Some(u) = e.user {
                let max = self.thresholds.enumeration_failures;
                let s = self.user_state(u);
                push_window(&mut s.failed_reads, e.time, win);
                if s.failed_reads.len() >= max as usize {
                    self.raise(
                        out,
                        AlertType::Enumeration,
                        Subject::User(u),
                        None,
                        e,
                        0.8,
                        format!("{max} or more failed reads or searches within ten minutes"),
                    );
                }
            }
        }
    }
}

fn push_window(q: &mut VecDeque<i64>, t: i64, win: i64) {
    while q.front().is_some_and(|x| t - x > win) {
        q.pop_front();
    }
    q.push_back(t);
}

/// Whether local hour `h` falls within the shift `[start, end)`, widened by `grace` hours
/// either side; a shift may wrap midnight; `start == end` is round the clock.
pub fn on_shift(start: u8, end: u8, h: u8, grace: i64) -> bool {
    if start == end {
        return true;
    }
    let (s, e, h) = (i64::from(start), i64::from(end), i64::from(h));
    let len = (e - s).rem_euclid(24) + 2 * grace;
    if len >= 24 {
        return true;
    }
    let from = (s - grace).rem_euclid(24);
    (h - from).rem_euclid(24) < len
}

/// What a staff member shares with a patient (or the patient's emergency contact): the
/// evidence and its score, or `None`.
fn family_match(user: &PersonKey, p: &PatientFacts) -> Option<(&'static str, f64)> {
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    let surname = same(&user.family, &p.person.family);
    let address = same(&user.address, &p.person.address);
    let street = same(&user.street, &p.person.street);
    if let Some(c) = &p.contact {
        let named = same(&user.family, &c.family) && same(&user.given, &c.given);
        if named {
            return Some(("the user is the patient's emergency contact", 0.95));
        }
        if same(&user.address, &c.address) {
            return Some((
                "the patient's emergency contact lives at the user's address",
                0.9,
            ));
        }
    }
    match (surname, address, street) {
        (true, true, _) => Some(("same surname and address as the user", 0.95)),
        (false, true, _) => Some(("same address as the user", 0.9)),
        (true, false, true) => Some(("same surname and street as the user", 0.9)),
        (false, false, true) => Some(("same street as the user (a neighbour)", 0.75)),
        (true, false, false) => Some(("same surname as the user", 0.65)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
