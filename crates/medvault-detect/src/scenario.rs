//! A labelled hospital scenario for scoring the detectors: a roster, patients with their
//! care teams and encounters, a month of legitimate access that includes every hard
//! negative the detectors must keep quiet on, and injected incidents of every alert type,
//! each with the alert it should raise (its label).
//!
//! Hard negatives generated: the same surname within a treatment relationship, on-call
//! night work on an ongoing encounter, an emergency department surge, an employee treated
//! by colleagues on their care team, a single break-the-glass in an emergency, billing
//! exports of billing data and registration reads of demographics, name searches followed
//! by opening a related chart, a mistyped password before a good one, a shared ward kiosk,
//! an occasional denied read, and staff back from a ten-day holiday.
//!
//! Deterministic: the same seed and size give the same files, byte for byte.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{normalize, street_of, AlertLine, AlertType};

const DAY: i64 = 86_400;
const HOUR: i64 = 3600;
const MINUTE: i64 = 60;
/// The scenario's local time zone (US Eastern Standard Time), as the events carry it.
pub const OFFSET_SECS: i32 = -5 * 3600;
/// Day number of the scenario's first day, 2026-03-02 (a Monday).
const FIRST_DAY: i64 = 20_514;

const SURNAMES: &[&str] = &[
    "Abara",
    "Achterberg",
    "Adeyemi",
    "Aguilar",
    "Ahlberg",
    "Akhtar",
    "Alvarado",
    "Amato",
    "Andersen",
    "Aoki",
    "Arnaud",
    "Asante",
    "Bakker",
    "Balogun",
    "Barros",
    "Bauer",
    "Becker",
    "Bergstrom",
    "Bianchi",
    "Bjork",
    "Bondarenko",
    "Bosco",
    "Brandt",
    "Brennan",
    "Caruso",
    "Castro",
    "Chowdhury",
    "Costa",
    "Dahl",
    "Dalton",
    "Delacroix",
    "Dimitrov",
    "Dubois",
    "Duarte",
    "Eklund",
    "Esposito",
    "Fagerlund",
    "Farouk",
    "Ferreira",
    "Fischer",
    "Fontaine",
    "Fujita",
    "Gallo",
    "Gashi",
    "Gorski",
    "Haddad",
    "Halvorsen",
    "Hansen",
    "Hartmann",
    "Hoang",
    "Horvath",
    "Ibarra",
    "Iyer",
    "Jablonski",
    "Jensen",
    "Kaczmarek",
    "Kamau",
    "Karlsson",
    "Kaur",
    "Keller",
    "Kowalski",
    "Kruger",
    "Laine",
    "Lambert",
    "Larsen",
    "Lindqvist",
    "Lombardi",
    "Lund",
    "Machado",
    "Mahlaba",
    "Marin",
    "Mazur",
    "Mensah",
    "Meyer",
    "Moreau",
    "Mwangi",
    "Nakamura",
    "Nilsson",
    "Novak",
    "Nyberg",
    "Obi",
    "Oliveira",
    "Ortega",
    "Osei",
    "Petrov",
    "Quinn",
    "Rahman",
    "Ricci",
    "Rossi",
    "Sato",
    "Schmidt",
    "Silva",
    "Sorensen",
    "Tanaka",
    "Vogel",
    "Wagner",
    "Yilmaz",
    "Zeller",
    "Ueda",
    "Varga",
];
const GIVEN: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Daniel",
    "Lisa",
    "Matthew",
    "Nancy",
    "Anthony",
    "Betty",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Kenneth",
    "Carol",
];
const STREETS: &[&str] = &[
    "Oak",
    "Maple",
    "Cedar",
    "Pine",
    "Elm",
    "Birch",
    "Walnut",
    "Chestnut",
    "Willow",
    "Ash",
    "Spruce",
    "Hickory",
    "Magnolia",
    "Poplar",
    "Sycamore",
    "Laurel",
    "Juniper",
    "Hawthorn",
    "Linden",
    "Alder",
    "Cypress",
    "Dogwood",
    "Redwood",
    "Sequoia",
    "Aspen",
    "Beech",
    "Holly",
    "Hemlock",
    "Larch",
    "Locust",
    "Mulberry",
    "Olive",
    "Palm",
    "Pecan",
    "Plum",
    "Rowan",
    "Sassafras",
    "Tamarack",
    "Yew",
    "Acacia",
];
const SUFFIXES: &[&str] = &[
    "Street", "Avenue", "Road", "Lane", "Drive", "Court", "Way", "Place",
];
const CLINICAL: &[&str] = &[
    "emergency",
    "cardiology",
    "oncology",
    "pediatrics",
    "surgery",
    "medicine",
];
const CLINICAL_CATEGORIES: &[&str] = &[
    "vitals",
    "labs",
    "medications",
    "problems",
    "notes",
    "allergies",
    "plans",
];

/// One `roster.csv` row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RosterRow {
    pub user: String,
    pub family: String,
    pub given: String,
    pub address: String,
    pub department: String,
    pub role: String,
    pub shift_start: Option<u8>,
    pub shift_end: Option<u8>,
    pub patient_id: String,
    pub hired: String,
}

/// One encounter of a `patients.jsonl` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncounterRow {
    pub user: String,
    pub department: String,
    pub start: String,
    pub end: String,
}

/// An emergency contact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContactRow {
    pub family: String,
    pub given: String,
    pub address: String,
}

/// One `patients.jsonl` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatientRow {
    pub id: String,
    pub family: String,
    pub given: String,
    pub address: String,
    pub birth_date: String,
    pub vip: bool,
    pub employee_user: String,
    pub deceased_date: String,
    pub care_team: Vec<String>,
    pub encounters: Vec<EncounterRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency_contact: Option<ContactRow>,
}

/// One `events.jsonl` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRow {
    pub time: String,
    pub user: Option<String>,
    pub action: String,
    pub patient: Option<String>,
    pub category: Option<String>,
    pub outcome: String,
    pub source_ip: Option<String>,
    pub workstation: Option<String>,
    pub department: Option<String>,
    pub purpose: Option<String>,
    pub break_glass: bool,
    pub query: Option<String>,
}

/// The alert an injected incident should raise: type, user (or address), patient, local day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub patient: Option<String>,
    pub day: i64,
}

impl Label {
    /// The label an alert line would match.
    pub fn of_alert(a: &AlertLine) -> Option<Label> {
        let subject = match a.kind {
            AlertType::CredentialStuffing => a.source_ip.clone()?,
            _ => a.user.clone()?,
        };
        let (t, off) = crate::scan::parse_when(&a.time)?;
        let _ = off;
        Some(Label {
            kind: a.kind.as_str().to_owned(),
            subject,
            patient: a.patient.clone(),
            day: (t + i64::from(OFFSET_SECS)).div_euclid(DAY),
        })
    }
}

/// How big a hospital and how long a log.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Clinicians per clinical department (half physicians, half nurses).
    pub staff_per_department: usize,
    pub patients: usize,
    pub days: i64,
    /// Inject stolen sessions (`token_new_address`), which only a scan with the session
    /// detector on raises.
    pub session_hijack: bool,
}

impl Default for Size {
    fn default() -> Self {
        Size {
            staff_per_department: 12,
            patients: 2000,
            days: 35,
            session_hijack: true,
        }
    }
}

/// A generated scenario: the scan's three inputs and the labels.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub roster: Vec<RosterRow>,
    pub patients: Vec<PatientRow>,
    pub events: Vec<EventRow>,
    pub labels: Vec<Label>,
}

impl Scenario {
    /// `roster.csv` text.
    pub fn roster_csv(&self) -> String {
        let mut s = String::from(
            "user,family,given,address,department,role,shift_start,shift_end,patient_id,hired\n",
        );
        for r in &self.roster {
            let h = |v: Option<u8>| v.map(|v| v.to_string()).unwrap_or_default();
            s.push_str(&format!(
                "{},{},{},\"{}\",{},{},{},{},{},{}\n",
                r.user,
                r.family,
                r.given,
                r.address.replace('"', "\"\""),
                r.department,
                r.role,
                h(r.shift_start),
                h(r.shift_end),
                r.patient_id,
                r.hired
            ));
        }
        s
    }

    fn jsonl<T: Serialize>(rows: &[T]) -> String {
        let mut s = String::new();
        for r in rows {
            s.push_str(&serde_json::to_string(r).unwrap_or_default());
            s.push('\n');
        }
        s
    }

    /// `patients.jsonl` text.
    pub fn patients_jsonl(&self) -> String {
        Self::jsonl(&self.patients)
    }

    /// `events.jsonl` text.
    pub fn events_jsonl(&self) -> String {
        Self::jsonl(&self.events)
    }
}

/// Per-type counts of a scoring: true positives, false positives, false negatives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
}

impl Tally {
    pub fn precision(&self) -> f64 {
        if self.tp + self.fp == 0 {
            return 1.0;
        }
        self.tp as f64 / (self.tp + self.fp) as f64
    }
    pub fn recall(&self) -> f64 {
        if self.tp + self.fn_ == 0 {
            return 1.0;
        }
        self.tp as f64 / (self.tp + self.fn_) as f64
    }
}

/// Scores alerts against labels, per type.
pub fn score(labels: &[Label], alerts: &[AlertLine]) -> std::collections::BTreeMap<String, Tally> {
    let truth: BTreeSet<Label> = labels.iter().cloned().collect();
    let got: BTreeSet<Label> = alerts.iter().filter_map(Label::of_alert).collect();
    let mut out = std::collections::BTreeMap::<String, Tally>::new();
    for t in AlertType::ALL {
        out.insert(t.as_str().to_owned(), Tally::default());
    }
    for l in &got {
        let e = out.entry(l.kind.clone()).or_default();
        if truth.contains(l) {
            e.tp += 1;
        } else {
            e.fp += 1;
        }
    }
    for l in &truth {
        if !got.contains(l) {
            out.entry(l.kind.clone()).or_default().fn_ += 1;
        }
    }
    out
}

#[derive(Clone)]
struct Staff {
    user: String,
    family: String,
    given: String,
    address: String,
    dept: String,
    role: &'static str,
    shift: (u8, u8),
    ip: String,
    own_chart: Option<usize>,
}

struct Enc {
    dept: String,
    user: String,
    start: i64,
    end: i64,
}

struct Pat {
    id: String,
    family: String,
    given: String,
    address: String,
    vip: bool,
    employee: Option<usize>,
    deceased: Option<i64>,
    care_team: Vec<usize>,
    encs: Vec<Enc>,
    contact: Option<ContactRow>,
}

struct Gen {
    rng: ChaCha8Rng,
    size: Size,
    staff: Vec<Staff>,
    pats: Vec<Pat>,
    /// (local seconds, row)
    events: Vec<(i64, EventRow)>,
    labels: Vec<Label>,
    /// Users injected as dormant: no legitimate traffic.
    dormant: BTreeSet<usize>,
    /// (user, first day, last day) of holidays.
    holidays: Vec<(usize, i64, i64)>,
    /// Patients that legitimate traffic never opens (injected relatives, strangers).
    hidden: BTreeSet<usize>,
    /// Users with an injected incident.
    injected: BTreeSet<usize>,
}

fn date_text(day: i64) -> String {
    time::Date::from_julian_day(i32::try_from(day + 2_440_588).unwrap_or(0))
        .map(|d| format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()))
        .unwrap_or_default()
}

/// RFC 3339 text, with the scenario's offset, of local seconds.
fn local_text(local: i64) -> String {
    let utc = local - i64::from(OFFSET_SECS);
    let off = time::UtcOffset::from_whole_seconds(OFFSET_SECS).unwrap_or(time::UtcOffset::UTC);
    time::OffsetDateTime::from_unix_timestamp(utc)
        .ok()
        .map(|t| t.to_offset(off))
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Gen {
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        let i = self.rng.gen_range(0..xs.len().max(1));
        // INVARIANT: callers pass non-empty slices.
        #[allow(clippy::indexing_slicing)]
        &xs[i]
    }

    fn address(&mut self, street: &str) -> String {
        let n = self.rng.gen_range(1..999);
        format!("{n} {street}, Springfield")
    }

    fn shares(&self, s: usize, p: usize) -> bool {
        let (Some(st), Some(pt)) = (self.staff.get(s), self.pats.get(p)) else {
            return true;
        };
        normalize(&st.family) == normalize(&pt.family)
            || street_of(&st.address) == street_of(&pt.address)
            || pt.contact.as_ref().is_some_and(|c| {
                normalize(&c.address) == normalize(&st.address)
                    || (normalize(&c.family) == normalize(&st.family)
                        && normalize(&c.given) == normalize(&st.given))
            })
    }

    fn related(&self, s: usize, p: usize, t: i64) -> bool {
        let (Some(st), Some(pt)) = (self.staff.get(s), self.pats.get(p)) else {
            return false;
        };
        pt.care_team.contains(&s)
            || pt.encs.iter().any(|e| {
                t >= e.start - 30 * DAY
                    && t <= e.end + 30 * DAY
                    && (e.user == st.user
                        || e.dept == st.dept
                        || st.role != "physician" && st.role != "nurse")
            })
    }

    fn emit(&mut self, local: i64, row: EventRow) {
        self.events.push((local, row));
    }

    #[allow(clippy::too_many_arguments)]
    fn ev(
        &mut self,
        local: i64,
        s: usize,
        action: &str,
        patient: Option<usize>,
        category: Option<&str>,
        success: bool,
        break_glass: bool,
        query: Option<&str>,
    ) {
        let Some(st) = self.staff.get(s).cloned() else {
            return;
        };
        let purpose = match st.role {
            "billing" => "HPAYMT",
            "front_desk" => "HOPERAT",
            _ if break_glass => "ETREAT",
            _ => "TREAT",
        };
        let row = EventRow {
            time: local_text(local),
            user: Some(st.user.clone()),
            action: action.into(),
            patient: patient.and_then(|p| self.pats.get(p)).map(|p| p.id.clone()),
            category: category.map(str::to_owned),
            outcome: if success { "success" } else { "failure" }.into(),
            source_ip: Some(st.ip.clone()),
            workstation: Some(format!("ws-{}", st.ip.replace('.', "-"))),
            department: Some(st.dept.clone()),
            purpose: Some(purpose.into()),
            break_glass,
            query: query.map(str::to_owned),
        };
        self.emit(local, row);
    }

    /// A failed sign-in from outside (no workstation, no department).
    fn failed_login(&mut self, t: i64, user: String, ip: &str) {
        let row = EventRow {
            time: local_text(t),
            user: Some(user),
            action: "login".into(),
            patient: None,
            category: None,
            outcome: "failure".into(),
            source_ip: Some(ip.to_owned()),
            workstation: None,
            department: None,
            purpose: None,
            break_glass: false,
            query: None,
        };
        self.emit(t, row);
    }

    /// `s` searches for patient `p` by name (`param=` the patient's surname).
    fn name_search(&mut self, t: i64, s: usize, p: usize, param: &str) {
        let name = self
            .pats
            .get(p)
            .map(|x| x.family.clone())
            .unwrap_or_default();
        let q = format!("{param}={name}");
        self.ev(
            t,
            s,
            "search",
            None,
            Some("demographics"),
            true,
            false,
            Some(&q),
        );
    }

    fn label(&mut self, kind: AlertType, subject: &str, patient: Option<usize>, local: i64) {
        let patient = patient.and_then(|p| self.pats.get(p)).map(|p| p.id.clone());
        self.labels.push(Label {
            kind: kind.as_str().to_owned(),
            subject: subject.to_owned(),
            patient,
            day: local.div_euclid(DAY),
        });
    }

    fn build_staff(&mut self) {
        let mut n = 0usize;
        let mut street_ix = 0usize;
        let mut next_street = |g: &mut Gen| {
            // Staff live on streets of their own ("<tree> <suffix>" pairs patients never use).
            let s = format!(
                "{} {}",
                STREETS
                    .get(street_ix % STREETS.len())
                    .copied()
                    .unwrap_or("Oak"),
                ["Terrace", "Row", "Crescent", "Gardens"]
                    .get((street_ix / STREETS.len()) % 4)
                    .copied()
                    .unwrap_or("Row")
            );
            street_ix += 1;
            g.address(&s)
        };
        let mut add = |g: &mut Gen, dept: &str, role: &'static str, shift: (u8, u8), subnet: u8| {
            n += 1;
            let family = g.pick(SURNAMES).to_string();
            let given = g.pick(GIVEN).to_string();
            let address = next_street(g);
            g.staff.push(Staff {
                user: format!("u{n:04}"),
                family,
                given,
                address,
                dept: dept.to_owned(),
                role,
                shift,
                // The medicine ward signs in at a shared kiosk.
                ip: if dept == "medicine" {
                    "10.9.9.9".to_owned()
                } else {
                    format!("10.{subnet}.0.{}", n % 250 + 2)
                },
                own_chart: None,
            });
        };
        for (d, dept) in CLINICAL.iter().enumerate() {
            let subnet = u8::try_from(d + 1).unwrap_or(1);
            for i in 0..self.size.staff_per_department {
                let role = if i % 2 == 0 { "physician" } else { "nurse" };
                let shift = match i % 4 {
                    0 | 1 => (7, 19),
                    2 => (19, 7),
                    _ => (8, 17),
                };
                add(self, dept, role, shift, subnet);
            }
        }
        for _ in 0..8 {
            add(self, "registration", "front_desk", (7, 19), 20);
        }
        for _ in 0..6 {
            add(self, "billing", "billing", (8, 17), 21);
        }
    }

    fn new_patient(&mut self) -> usize {
        let i = self.pats.len();
        let street = format!("{} {}", self.pick(STREETS), self.pick(SUFFIXES));
        let address = self.address(&street);
        let contact = if self.rng.gen_bool(0.5) {
            let street = format!("{} {}", self.pick(STREETS), self.pick(SUFFIXES));
            Some(ContactRow {
                family: self.pick(SURNAMES).to_string(),
                given: self.pick(GIVEN).to_string(),
                address: self.address(&street),
            })
        } else {
            None
        };
        let family = self.pick(SURNAMES).to_string();
        let given = self.pick(GIVEN).to_string();
        self.pats.push(Pat {
            id: format!("p{i:05}"),
            family,
            given,
            address,
            vip: false,
            employee: None,
            deceased: None,
            care_team: vec![],
            encs: vec![],
            contact,
        });
        i
    }

    fn clinicians_of(&self, dept: &str) -> Vec<usize> {
        self.staff
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dept == dept)
            .map(|(i, _)| i)
            .collect()
    }

    fn build_patients(&mut self) {
        let first = FIRST_DAY * DAY;
        let span = self.size.days * DAY;
        for _ in 0..self.size.patients {
            let p = self.new_patient();
            let encs = self.rng.gen_range(1..=2);
            for _ in 0..encs {
                let dept = self.pick(CLINICAL).to_string();
                let who = self.clinicians_of(&dept);
                let who_ix = *self.pick(&who);
                let user = self
                    .staff
                    .get(who_ix)
                    .map(|s| s.user.clone())
                    .unwrap_or_default();
                let start = first - 20 * DAY + self.rng.gen_range(0..span + 20 * DAY);
                let len = if dept == "emergency" {
                    self.rng.gen_range(2 * HOUR..12 * HOUR)
                } else {
                    self.rng.gen_range(DAY..6 * DAY)
                };
                if let Some(pt) = self.pats.get_mut(p) {
                    pt.encs.push(Enc {
                        dept,
                        user,
                        start,
                        end: start + len,
                    });
                }
            }
        }
        // VIPs, with encounters (their clinicians may open them).
        for p in 0..10.min(self.pats.len()) {
            if let Some(pt) = self.pats.get_mut(p * 7) {
                pt.vip = true;
            }
        }
        // Deceased: died during the month, after their encounter.
        for p in 0..20.min(self.pats.len()) {
            let idx = p * 11 + 3;
            if let Some(pt) = self.pats.get_mut(idx) {
                if pt.vip {
                    continue;
                }
                let end = pt.encs.iter().map(|e| e.end).max().unwrap_or(first);
                pt.deceased = Some((end / DAY + 1) * DAY);
            }
        }
        // Employees' own charts: one clinician in five has one, with a care team of two
        // colleagues from another department (the hard negative: colleagues treating one of
        // their own).
        let n_staff = self.staff.len();
        for s in (0..n_staff).step_by(5) {
            let p = self.new_patient();
            let Some(st) = self.staff.get(s).cloned() else {
                continue;
            };
            let other = CLINICAL
                .iter()
                .find(|d| **d != st.dept)
                .copied()
                .unwrap_or("medicine");
            let team: Vec<usize> = self.clinicians_of(other).into_iter().take(2).collect();
            if let Some(pt) = self.pats.get_mut(p) {
                pt.employee = Some(s);
                pt.family = st.family.clone();
                pt.given = st.given.clone();
                pt.address = st.address.clone();
                pt.care_team = team;
                pt.contact = None;
            }
            if let Some(x) = self.staff.get_mut(s) {
                x.own_chart = Some(p);
            }
        }
    }

    /// A legitimate shift's traffic for staff member `s` on `day`.
    fn shift(&mut self, s: usize, day: i64, volume: usize) {
        let Some(st) = self.staff.get(s).cloned() else {
            return;
        };
        let (a, b) = st.shift;
        let len = (i64::from(b) - i64::from(a)).rem_euclid(24) * HOUR;
        let start = day * DAY + i64::from(a) * HOUR;
        let mut t = start + self.rng.gen_range(0..10 * MINUTE);
        // A mistyped password now and then.
        if self.rng.gen_bool(0.1) {
            self.ev(t, s, "login", None, None, false, false, None);
            t += 20;
        }
        self.ev(t, s, "login", None, None, true, false, None);
        let pool: Vec<usize> = self.candidates(s, t);
        if pool.is_empty() {
            return;
        }
        let step = (len - 20 * MINUTE) / i64::try_from(volume.max(1)).unwrap_or(1);
        for _ in 0..volume {
            t += self.rng.gen_range(step / 2..step.max(2));
            let p = *self.pick(&pool);
            match st.role {
                "billing" => {
                    self.ev(t, s, "read", Some(p), Some("billing"), true, false, None);
                    if self.rng.gen_bool(0.5) {
                        self.ev(
                            t + 30,
                            s,
                            "export",
                            Some(p),
                            Some("billing"),
                            true,
                            false,
                            None,
                        );
                    }
                }
                "front_desk" => {
                    if self.rng.gen_bool(0.4) {
                        self.name_search(t, s, p, "family");
                    }
                    self.ev(
                        t + 20,
                        s,
                        "read",
                        Some(p),
                        Some("demographics"),
                        true,
                        false,
                        None,
                    );
                }
                _ => {
                    if self.rng.gen_bool(0.15) {
                        self.name_search(t, s, p, "name");
                    } else if self.rng.gen_bool(0.2) {
                        self.ev(
                            t,
                            s,
                            "search",
                            None,
                            Some("labs"),
                            true,
                            false,
                            Some("code=718-7&_count=20"),
                        );
                    }
                    for k in 0..self.rng.gen_range(1..4) {
                        let c = self.pick(CLINICAL_CATEGORIES).to_string();
                        self.ev(
                            t + 15 + k * 40,
                            s,
                            "read",
                            Some(p),
                            Some(&c),
                            true,
                            false,
                            None,
                        );
                    }
                    if self.rng.gen_bool(0.2) {
                        self.ev(
                            t + 200,
                            s,
                            "create",
                            Some(p),
                            Some("notes"),
                            true,
                            false,
                            None,
                        );
                    }
                    // An occasional denied read (a sensitive note the policy withholds).
                    if self.rng.gen_bool(0.02) {
                        self.ev(
                            t + 220,
                            s,
                            "read",
                            Some(p),
                            Some("notes"),
                            false,
                            false,
                            None,
                        );
                    }
                }
            }
        }
    }

    /// Patients `s` may legitimately open at `t` (never their own chart, never hidden ones).
    fn candidates(&self, s: usize, t: i64) -> Vec<usize> {
        let Some(st) = self.staff.get(s) else {
            return vec![];
        };
        self.pats
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !self.hidden.contains(i)
                    && st.own_chart != Some(*i)
                    && p.encs.iter().any(|e| {
                        let near = t >= e.start - 3 * DAY && t <= e.end + 3 * DAY;
                        near && (st.role == "front_desk"
                            || st.role == "billing"
                            || e.dept == st.dept)
                    })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// A patient `s` has no relationship with and shares nothing with at `t`.
    fn stranger(&mut self, s: usize, t: i64) -> usize {
        for _ in 0..10_000 {
            let p = self
                .rng
                .gen_range(0..self.size.patients.min(self.pats.len()).max(1));
            let ok = self
                .pats
                .get(p)
                .is_some_and(|x| !x.vip && x.deceased.is_none() && x.employee.is_none())
                && !self.related(s, p, t)
                && !self.shares(s, p)
                && !self.hidden.contains(&p);
            if ok {
                self.hidden.insert(p);
                return p;
            }
        }
        // A fresh patient nobody treats.
        let p = self.new_patient();
        self.hidden.insert(p);
        p
    }

    fn legit(&mut self) {
        let days = self.size.days;
        let surge = FIRST_DAY + 20;
        for d in 0..days {
            let day = FIRST_DAY + d;
            // Emergency department surge: extra ED encounters that day.
            if day == surge {
                let who = self.clinicians_of("emergency");
                for _ in 0..(who.len() * 40) {
                    let p = self.new_patient();
                    let who_ix = *self.pick(&who);
                    let u = self
                        .staff
                        .get(who_ix)
                        .map(|s| s.user.clone())
                        .unwrap_or_default();
                    let start = day * DAY + self.rng.gen_range(0..20 * HOUR);
                    if let Some(pt) = self.pats.get_mut(p) {
                        pt.encs.push(Enc {
                            dept: "emergency".into(),
                            user: u,
                            start,
                            end: start + 6 * HOUR,
                        });
                    }
                }
            }
            for s in 0..self.staff.len() {
                if self.dormant.contains(&s) {
                    continue;
                }
                if self
                    .holidays
                    .iter()
                    .any(|(u, a, b)| *u == s && day >= *a && day <= *b)
                {
                    continue;
                }
                // Five shifts a week: each works the days where (s + d) % 7 < 5.
                if (s as i64 + d) % 7 >= 5 {
                    continue;
                }
                let st = self.staff.get(s).cloned();
                let Some(st) = st else { continue };
                let mut volume = match st.role {
                    "front_desk" => 30,
                    "billing" => 40,
                    _ => self.rng.gen_range(12..22),
                };
                if day == surge && st.dept == "emergency" {
                    volume *= 3;
                }
                self.shift(s, day, volume);
            }
        }
        self.on_call();
        self.employee_treated();
        self.true_emergency();
        self.same_surname_treated();
    }

    /// On-call night work: a physician signs in at 02:00 from home and opens a patient
    /// whose encounter in their department is going on.
    fn on_call(&mut self) {
        for d in (1..self.size.days).step_by(3) {
            let day = FIRST_DAY + d;
            let dept = CLINICAL
                .get(usize::try_from(d).unwrap_or(0) % CLINICAL.len())
                .copied()
                .unwrap_or("medicine");
            let Some(s) = self.clinicians_of(dept).into_iter().find(|s| {
                self.staff
                    .get(*s)
                    .is_some_and(|x| x.shift == (7, 19) && x.role == "physician")
                    && !self.dormant.contains(s)
            }) else {
                continue;
            };
            let t = day * DAY + 2 * HOUR;
            let ongoing: Vec<usize> = self
                .pats
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    !self.hidden.contains(i)
                        && p.employee.is_none()
                        && p.encs
                            .iter()
                            .any(|e| e.dept == dept && e.start <= t && e.end >= t)
                })
                .map(|(i, _)| i)
                .collect();
            if ongoing.is_empty() {
                continue;
            }
            let p = *self.pick(&ongoing);
            let user = self
                .staff
                .get(s)
                .map(|x| x.user.clone())
                .unwrap_or_default();
            let home = format!("198.51.100.{}", s % 200 + 1);
            for (k, (action, cat)) in [
                ("login", None),
                ("read", Some("labs")),
                ("update", Some("medications")),
            ]
            .into_iter()
            .enumerate()
            {
                let t = t + i64::try_from(k).unwrap_or(0) * 60;
                self.emit(
                    t,
                    EventRow {
                        time: local_text(t),
                        user: Some(user.clone()),
                        action: action.into(),
                        patient: (action != "login")
                            .then(|| self.pats.get(p).map(|x| x.id.clone()))
                            .flatten(),
                        category: cat.map(str::to_owned),
                        outcome: "success".into(),
                        source_ip: Some(home.clone()),
                        workstation: None,
                        department: Some(dept.into()),
                        purpose: Some("TREAT".into()),
                        break_glass: false,
                        query: None,
                    },
                );
            }
        }
    }

    /// Colleagues on an employee's care team open the employee's chart: quiet.
    fn employee_treated(&mut self) {
        for p in 0..self.pats.len() {
            let Some(pt) = self.pats.get(p) else { continue };
            if pt.employee.is_none() {
                continue;
            }
            let team = pt.care_team.clone();
            for (k, s) in team.into_iter().enumerate() {
                if self.dormant.contains(&s) || self.injected.contains(&s) {
                    continue;
                }
                let (_, t) = self.working(s, 3 + i64::try_from(p % 17 + k).unwrap_or(0));
                self.ev(t + 600, s, "read", Some(p), Some("labs"), true, false, None);
            }
        }
    }

    /// One break-the-glass in a true emergency: an ED physician opens an unknown
    /// patient's chart once.
    fn true_emergency(&mut self) {
        let ed = self.clinicians_of("emergency");
        let ed: Vec<usize> = ed
            .into_iter()
            .filter(|s| {
                self.staff.get(*s).is_some_and(|x| x.role == "physician")
                    && !self.injected.contains(s)
                    && !self.dormant.contains(s)
            })
            .collect();
        for (k, s) in ed.iter().enumerate() {
            let day = FIRST_DAY + 2 + i64::try_from(k).unwrap_or(0) % (self.size.days - 3).max(1);
            let t = day * DAY + 11 * HOUR;
            let p = self.stranger(*s, t);
            self.ev(t, *s, "read", Some(p), Some("allergies"), true, true, None);
            self.ev(
                t + 60,
                *s,
                "read",
                Some(p),
                Some("medications"),
                true,
                true,
                None,
            );
        }
    }

    /// A clinician treats a patient who shares their surname (care team): quiet.
    fn same_surname_treated(&mut self) {
        let n = self.staff.len();
        for s in (1..n).step_by(9) {
            if self.dormant.contains(&s) {
                continue;
            }
            let Some(st) = self.staff.get(s).cloned() else {
                continue;
            };
            if st.role != "physician" && st.role != "nurse" {
                continue;
            }
            let p = self.new_patient();
            if let Some(pt) = self.pats.get_mut(p) {
                pt.family = st.family.clone();
                pt.care_team = vec![s];
            }
            self.hidden.insert(p);
            let day = FIRST_DAY + 5 + i64::try_from(s).unwrap_or(0) % 20;
            if (s as i64 + day - FIRST_DAY) % 7 >= 5 {
                continue;
            }
            let t = day * DAY + i64::from(st.shift.0) * HOUR + 2 * HOUR;
            self.ev(t, s, "read", Some(p), Some("problems"), true, false, None);
        }
    }

    /// A working time for `s` on a day they work (shift start + 3 h), and that day.
    fn working(&self, s: usize, near: i64) -> (i64, i64) {
        let st = self.staff.get(s);
        let shift = st.map(|x| x.shift.0).unwrap_or(8);
        let mut day = FIRST_DAY + near;
        while (s as i64 + day - FIRST_DAY) % 7 >= 5
            || self
                .holidays
                .iter()
                .any(|(u, a, b)| *u == s && day >= *a && day <= *b)
        {
            day += 1;
        }
        (day, day * DAY + i64::from(shift) * HOUR + 3 * HOUR)
    }

    fn inject(&mut self) {
        let n = self.staff.len();
        let clin: Vec<usize> = (0..n)
            .filter(|s| {
                self.staff
                    .get(*s)
                    .is_some_and(|x| x.role == "physician" || x.role == "nurse")
            })
            .collect();
        let front: Vec<usize> = (0..n)
            .filter(|s| self.staff.get(*s).is_some_and(|x| x.role == "front_desk"))
            .collect();
        let days = self.size.days;
        let mut k = 0i64;
        let next_day = |k: &mut i64| {
            *k += 1;
            8 + (*k * 5) % (days - 10).max(1)
        };
        let users: Vec<usize> = clin.iter().copied().step_by(2).take(40).collect();
        for (i, &s) in users.iter().enumerate() {
            self.injected.insert(s);
            let Some(st) = self.staff.get(s).cloned() else {
                continue;
            };
            let (day, t) = self.working(s, next_day(&mut k));
            let _ = day;
            match i % 10 {
                // A relative: same surname and address, nobody treats them.
                0 => {
                    let p = self.new_patient();
                    if let Some(pt) = self.pats.get_mut(p) {
                        pt.family = st.family.clone();
                        pt.address = st.address.clone();
                        pt.contact = None;
                    }
                    self.hidden.insert(p);
                    self.ev(t, s, "read", Some(p), Some("problems"), true, false, None);
                    self.label(AlertType::FamilySnooping, &st.user, Some(p), t);
                }
                // The user is the patient's emergency contact.
                1 => {
                    let p = self.stranger(s, t);
                    if let Some(pt) = self.pats.get_mut(p) {
                        pt.contact = Some(ContactRow {
                            family: st.family.clone(),
                            given: st.given.clone(),
                            address: st.address.clone(),
                        });
                    }
                    self.ev(t, s, "read", Some(p), Some("notes"), true, false, None);
                    self.label(AlertType::FamilySnooping, &st.user, Some(p), t);
                }
                // A coworker's chart.
                2 => {
                    let other = (0..n).find(|o| {
                        *o != s
                            && self.staff.get(*o).is_some_and(|x| x.own_chart.is_some())
                            && self
                                .staff
                                .get(*o)
                                .and_then(|x| x.own_chart)
                                .is_some_and(|p| !self.related(s, p, t) && !self.shares(s, p))
                    });
                    let Some(o) = other else { continue };
                    let p = self.staff.get(o).and_then(|x| x.own_chart).unwrap_or(0);
                    self.ev(t, s, "read", Some(p), Some("labs"), true, false, None);
                    self.label(AlertType::CoworkerSnooping, &st.user, Some(p), t);
                }
                // Their own chart.
                3 => {
                    let p = match st.own_chart {
                        Some(p) => p,
                        None => {
                            let p = self.new_patient();
                            if let Some(pt) = self.pats.get_mut(p) {
                                pt.employee = Some(s);
                                pt.family = st.family.clone();
                                pt.given = st.given.clone();
                                pt.address = st.address.clone();
                                pt.contact = None;
                            }
                            if let Some(x) = self.staff.get_mut(s) {
                                x.own_chart = Some(p);
                            }
                            self.hidden.insert(p);
                            p
                        }
                    };
                    self.ev(t, s, "read", Some(p), Some("labs"), true, false, None);
                    self.label(AlertType::SelfAccess, &st.user, Some(p), t);
                }
                // A VIP.
                4 => {
                    let vip = (0..self.pats.len()).find(|p| {
                        self.pats.get(*p).is_some_and(|x| x.vip)
                            && !self.related(s, *p, t)
                            && !self.shares(s, *p)
                    });
                    let Some(p) = vip else { continue };
                    self.ev(t, s, "read", Some(p), Some("notes"), true, false, None);
                    self.label(AlertType::VipSnooping, &st.user, Some(p), t);
                }
                // A deceased patient.
                5 => {
                    let dead = (0..self.pats.len()).find(|p| {
                        self.pats.get(*p).is_some_and(|x| {
                            x.deceased.is_some_and(|d| d <= t) && !x.vip && x.employee.is_none()
                        }) && !self.related(s, *p, t)
                            && !self.shares(s, *p)
                    });
                    let Some(p) = dead else { continue };
                    self.ev(t, s, "read", Some(p), Some("notes"), true, false, None);
                    self.label(AlertType::DeceasedAccess, &st.user, Some(p), t);
                }
                // No relationship.
                6 => {
                    let p = self.stranger(s, t);
                    self.ev(
                        t,
                        s,
                        "read",
                        Some(p),
                        Some("medications"),
                        true,
                        false,
                        None,
                    );
                    self.ev(t + 90, s, "read", Some(p), Some("notes"), true, false, None);
                    self.label(AlertType::NoRelationship, &st.user, Some(p), t);
                }
                // A name search, then the chart.
                7 => {
                    let p = self.stranger(s, t);
                    self.name_search(t, s, p, "name");
                    self.ev(
                        t + 40,
                        s,
                        "read",
                        Some(p),
                        Some("demographics"),
                        true,
                        false,
                        None,
                    );
                    self.label(AlertType::SearchThenOpen, &st.user, Some(p), t);
                }
                // Break-the-glass on five strangers in three days.
                8 => {
                    for j in 0..5 {
                        let tj = t + j * 14 * HOUR;
                        let p = self.stranger(s, tj);
                        self.ev(tj, s, "read", Some(p), Some("notes"), true, true, None);
                        if j == 3 {
                            self.label(AlertType::BreakGlassOveruse, &st.user, None, tj);
                        }
                    }
                }
                // After hours, at 02:00 (or 14:00 for night staff), on related patients
                // whose encounters are over.
                _ => {
                    let hour = if st.shift.0 >= 12 { 14 } else { 2 };
                    let tn = (t / DAY) * DAY + hour * HOUR;
                    let pool: Vec<usize> = self
                        .pats
                        .iter()
                        .enumerate()
                        .filter(|(i, p)| {
                            !self.hidden.contains(i)
                                && p.employee.is_none()
                                && !p.vip
                                && p.deceased.is_none()
                                && p.encs.iter().any(|e| e.dept == st.dept)
                                && p.encs
                                    .iter()
                                    .all(|e| tn > e.end + 13 * HOUR || tn < e.start - 13 * HOUR)
                                && p.encs.iter().any(|e| {
                                    tn >= e.start - 30 * DAY
                                        && tn <= e.end + 30 * DAY
                                        && e.dept == st.dept
                                })
                        })
                        .map(|(i, _)| i)
                        .collect();
                    self.ev(tn - 60, s, "login", None, None, true, false, None);
                    for j in 0..3.min(pool.len()) {
                        let p = *self.pick(&pool);
                        if self.shares(s, p)
                            || self.pats.get(p).is_some_and(|x| x.care_team.contains(&s))
                        {
                            continue;
                        }
                        let tj = tn + i64::try_from(j).unwrap_or(0) * 300;
                        self.ev(tj, s, "read", Some(p), Some("notes"), true, false, None);
                        self.label(AlertType::AfterHours, &st.user, Some(p), tj);
                    }
                }
            }
        }
        // A registration clerk looks up a neighbour by name.
        for &s in front.iter().take(3) {
            let Some(st) = self.staff.get(s).cloned() else {
                continue;
            };
            let (_, t) = self.working(s, next_day(&mut k));
            let p = self.new_patient();
            let street = st
                .address
                .split(',')
                .next()
                .unwrap_or("")
                .split(' ')
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ");
            let addr = format!("{} {street}, Springfield", self.rng.gen_range(1000..2000));
            if let Some(pt) = self.pats.get_mut(p) {
                pt.address = addr;
                pt.contact = None;
                if normalize(&pt.family) == normalize(&st.family) {
                    pt.family = "Zimmermann".into();
                }
            }
            self.hidden.insert(p);
            self.name_search(t, s, p, "family");
            self.ev(
                t + 30,
                s,
                "read",
                Some(p),
                Some("demographics"),
                true,
                false,
                None,
            );
            self.label(AlertType::FamilySnooping, &st.user, Some(p), t);
        }
        // Behaviour and attacks, on other clinicians.
        let rest: Vec<usize> = clin.iter().copied().skip(1).step_by(2).take(28).collect();
        for (i, &s) in rest.iter().enumerate() {
            self.injected.insert(s);
            let Some(st) = self.staff.get(s).cloned() else {
                continue;
            };
            let (day, t) = self.working(s, next_day(&mut k));
            match i % 7 {
                // Five times their usual patients in a day, all in their department.
                0 => {
                    let mut all: Vec<usize> = self
                        .pats
                        .iter()
                        .enumerate()
                        .filter(|(i, p)| {
                            !self.hidden.contains(i)
                                && p.employee.is_none()
                                && !p.vip
                                && p.deceased.is_none()
                                && p.encs.iter().any(|e| {
                                    e.dept == st.dept
                                        && t >= e.start - 29 * DAY
                                        && t <= e.end + 29 * DAY
                                })
                                && !self.shares(s, *i)
                        })
                        .map(|(i, _)| i)
                        .collect();
                    all.shuffle(&mut self.rng);
                    for (j, p) in all.iter().take(110).enumerate() {
                        let tj = t + i64::try_from(j).unwrap_or(0) * 120;
                        self.ev(tj, s, "read", Some(*p), Some("vitals"), true, false, None);
                    }
                    if all.len() >= 100 {
                        self.label(AlertType::VolumeSpike, &st.user, None, t);
                    }
                }
                // A mass export of related patients.
                1 => {
                    let pool: Vec<usize> = self
                        .pats
                        .iter()
                        .enumerate()
                        .filter(|(i, p)| {
                            !self.hidden.contains(i)
                                && p.employee.is_none()
                                && p.encs.iter().any(|e| {
                                    e.dept == st.dept
                                        && t >= e.start - 29 * DAY
                                        && t <= e.end + 29 * DAY
                                })
                                && !self.shares(s, *i)
                        })
                        .map(|(i, _)| i)
                        .take(80)
                        .collect();
                    for (j, p) in pool.iter().enumerate() {
                        self.ev(
                            t + i64::try_from(j).unwrap_or(0) * 5,
                            s,
                            "export",
                            Some(*p),
                            Some("labs"),
                            true,
                            false,
                            None,
                        );
                    }
                    if pool.len() >= 50 {
                        self.label(AlertType::MassExport, &st.user, None, t);
                    }
                }
                // Brute force on this account from outside.
                2 => {
                    for j in 0..15 {
                        let tj = t + j * 20;
                        self.failed_login(tj, st.user.clone(), "203.0.113.66");
                    }
                    self.label(AlertType::BruteForce, &st.user, None, t + 9 * 20);
                }
                // Enumeration of patient ids.
                3 => {
                    for j in 0..30 {
                        let tj = t + j * 10;
                        let row = EventRow {
                            time: local_text(tj),
                            user: Some(st.user.clone()),
                            action: "read".into(),
                            patient: Some(format!("p9{j:04}")),
                            category: Some("demographics".into()),
                            outcome: "failure".into(),
                            source_ip: Some(st.ip.clone()),
                            workstation: None,
                            department: Some(st.dept.clone()),
                            purpose: Some("TREAT".into()),
                            break_glass: false,
                            query: None,
                        };
                        self.emit(tj, row);
                    }
                    self.label(AlertType::Enumeration, &st.user, None, t);
                }
                // Credential stuffing from one address over many accounts.
                4 => {
                    let ip = format!("192.0.2.{}", 10 + i);
                    for j in 0..25i64 {
                        let tj = t + j * 7;
                        let who = if j % 2 == 0 {
                            self.staff
                                .get(usize::try_from(j).unwrap_or(0) * 3 % n)
                                .map(|x| x.user.clone())
                                .unwrap_or_default()
                        } else {
                            format!("admin{j}")
                        };
                        self.failed_login(tj, who, &ip);
                    }
                    self.label(AlertType::CredentialStuffing, &ip, None, t);
                }
                // A stolen session: the user's token is used from another address.
                5 if self.size.session_hijack => {
                    let pool: Vec<usize> = self
                        .candidates(s, t)
                        .into_iter()
                        .filter(|p| {
                            !self.shares(s, *p)
                                && self
                                    .pats
                                    .get(*p)
                                    .is_some_and(|x| x.employee.is_none() && !x.vip)
                        })
                        .collect();
                    if pool.is_empty() {
                        continue;
                    }
                    let p = *self.pick(&pool);
                    let row = EventRow {
                        time: local_text(t),
                        user: Some(st.user.clone()),
                        action: "read".into(),
                        patient: self.pats.get(p).map(|x| x.id.clone()),
                        category: Some("medications".into()),
                        outcome: "success".into(),
                        source_ip: Some("203.0.113.200".into()),
                        workstation: None,
                        department: Some(st.dept.clone()),
                        purpose: Some("TREAT".into()),
                        break_glass: false,
                        query: None,
                    };
                    self.emit(t, row);
                    self.label(AlertType::TokenNewAddress, &st.user, None, t);
                }
                5 => {}
                // Dormant: this account does nothing until the last days, then reads.
                _ => {
                    let _ = day;
                    self.dormant.insert(s);
                    let late = FIRST_DAY + self.size.days - 2;
                    let tl = late * DAY + 10 * HOUR;
                    self.ev(tl, s, "login", None, None, true, false, None);
                    self.label(AlertType::DormantAccount, &st.user, None, tl);
                }
            }
        }
    }

    fn finish(mut self) -> Scenario {
        // Every login, once: the dormant accounts' and the attackers' are already labelled.
        self.events.sort_by_key(|(t, _)| *t);
        let roster = self
            .staff
            .iter()
            .map(|s| RosterRow {
                user: s.user.clone(),
                family: s.family.clone(),
                given: s.given.clone(),
                address: s.address.clone(),
                department: s.dept.clone(),
                role: s.role.to_owned(),
                shift_start: Some(s.shift.0),
                shift_end: Some(s.shift.1),
                patient_id: s
                    .own_chart
                    .and_then(|p| self.pats.get(p))
                    .map(|p| p.id.clone())
                    .unwrap_or_default(),
                hired: date_text(FIRST_DAY - 400),
            })
            .collect();
        let patients = self
            .pats
            .iter()
            .map(|p| PatientRow {
                id: p.id.clone(),
                family: p.family.clone(),
                given: p.given.clone(),
                address: p.address.clone(),
                birth_date: "1970-01-01".into(),
                vip: p.vip,
                employee_user: p
                    .employee
                    .and_then(|s| self.staff.get(s))
                    .map(|s| s.user.clone())
                    .unwrap_or_default(),
                deceased_date: p.deceased.map(|d| date_text(d / DAY)).unwrap_or_default(),
                care_team: p
                    .care_team
                    .iter()
                    .filter_map(|s| self.staff.get(*s))
                    .map(|s| s.user.clone())
                    .collect(),
                encounters: p
                    .encs
                    .iter()
                    .map(|e| EncounterRow {
                        user: e.user.clone(),
                        department: e.dept.clone(),
                        start: local_text(e.start),
                        end: local_text(e.end),
                    })
                    .collect(),
                emergency_contact: p.contact.clone(),
            })
            .collect();
        let mut labels = self.labels;
        labels.sort();
        labels.dedup();
        Scenario {
            roster,
            patients,
            events: self.events.into_iter().map(|(_, r)| r).collect(),
            labels,
        }
    }
}

/// Generates a scenario.
pub fn generate(seed: u64, size: Size) -> Scenario {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        size,
        staff: vec![],
        pats: vec![],
        events: vec![],
        labels: vec![],
        dormant: BTreeSet::new(),
        holidays: vec![],
        hidden: BTreeSet::new(),
        injected: BTreeSet::new(),
    };
    g.build_staff();
    g.build_patients();
    // Holidays: every seventh member of staff takes ten days off mid-month.
    for s in (3..g.staff.len()).step_by(7) {
        g.holidays.push((s, FIRST_DAY + 10, FIRST_DAY + 19));
    }
    // Incidents first (they choose their strangers and dormant accounts), then the month
    // of legitimate work around them.
    g.inject();
    g.legit();
    g.finish()
}
