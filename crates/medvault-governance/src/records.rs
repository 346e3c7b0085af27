//! Paper records (issue 15): chart volumes with barcodes, storage rooms and cabinets with
//! the staff authorized to enter them, the custody chain of every volume (check-out to a
//! person or department with a due date, return, transfer, missing, found, destroyed),
//! cabinet keys and lock combinations as custody items, camera coverage, badge-access
//! correlation, the visitor log, retention schedules by record class and jurisdiction, and
//! the NIST SP 800-88 Rev. 1 methods of destroying paper.
//!
//! Pure: time is a parameter (Unix seconds), nothing here does I/O. The gate stores these
//! values sealed and audits every act. INVARIANT: a volume's custody chain only grows, in
//! time order, and its status is the one its last event left.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::Date;

use crate::retention::{self, Case, Policy, Verdict};

/// Errors of the paper registry, each a sentence for the clerk at the desk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("{0}")]
    Invalid(String),
    #[error("volume {barcode} is already checked out to {holder}; return or transfer it first")]
    AlreadyCheckedOut { barcode: String, holder: String },
    #[error("volume {barcode} is not checked out (it is {status})")]
    NotCheckedOut { barcode: String, status: String },
    #[error("volume {barcode} is checked out to {holder}, not {by}: the holder returns it, or transfer it first")]
    ReturnedBySomeoneElse {
        barcode: String,
        holder: String,
        by: String,
    },
    #[error("volume {barcode} is {status}; it cannot be {act}")]
    Unavailable {
        barcode: String,
        status: String,
        act: &'static str,
    },
    #[error("key {key} is already issued to {holder}; it must be returned first")]
    KeyIssued { key: String, holder: String },
    #[error("key {0} is not issued")]
    KeyNotIssued(String),
}

fn invalid(m: impl Into<String>) -> RecordsError {
    RecordsError::Invalid(m.into())
}

/// Checks an identifier a person types or a scanner reads (barcode, room, cabinet, key,
/// door, user name): 1–64 characters of letters, digits and `-_.@`, not only dots (ids
/// go into paths and file names).
///
/// # Errors
/// [`RecordsError::Invalid`] naming the field.
pub fn ident<'a>(field: &str, v: &'a str) -> Result<&'a str, RecordsError> {
    let v = v.trim();
    let ok = !v.is_empty()
        && v.chars().count() <= 64
        && !v.chars().all(|c| c == '.')
        && v.chars().all(|c| c.is_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(v)
    } else {
        Err(invalid(format!(
            "`{field}` must be 1 to 64 letters, digits or -_.@ (got `{}`)",
            v.chars().take(40).collect::<String>()
        )))
    }
}

/// Checks free text (a name, purpose, note): one line, 1 to `max` characters once trimmed.
///
/// # Errors
/// [`RecordsError::Invalid`] naming the field.
pub fn line<'a>(field: &str, v: &'a str, max: usize) -> Result<&'a str, RecordsError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > max || v.contains(['\n', '\r']) {
        return Err(invalid(format!(
            "`{field}` is required: one line of at most {max} characters"
        )));
    }
    Ok(v)
}

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in the order forms list them.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The code, as stored and as the API takes it.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
        }
        impl FromStr for $name {
            type Err = RecordsError;
            fn from_str(s: &str) -> Result<Self, RecordsError> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s.trim()).ok_or_else(|| {
                    invalid(format!(
                        concat!("unknown ", $what, " `{}`: use {}"),
                        s.chars().take(40).collect::<String>(),
                        Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

code_enum!(
    /// The record classes retention schedules are written for.
    RecordClass, "record class" {
        AdultChart => "adult_chart",
        MinorChart => "minor_chart",
        Billing => "billing",
        Imaging => "imaging",
        /// HIPAA policies, procedures and the other documentation 45 CFR 164.316 requires.
        Documentation => "documentation",
        AuditLog => "audit_log",
    }
);

code_enum!(
    /// How paper is destroyed: the NIST SP 800-88 Rev. 1 "Destroy" techniques for paper
    /// (Appendix A, hard copy: shred, pulp, incinerate).
    PaperMethod, "destruction method" {
        CrossCutShredding => "cross-cut-shredding",
        Pulping => "pulping",
        Incineration => "incineration",
    }
);

impl PaperMethod {
    /// The method as a certificate states it.
    pub fn label(self) -> &'static str {
        match self {
            PaperMethod::CrossCutShredding => {
                "cross-cut shredding (NIST SP 800-88 Rev. 1 Destroy: shred to 1 mm x 5 mm particles or smaller)"
            }
            PaperMethod::Pulping => "pulping (NIST SP 800-88 Rev. 1 Destroy: pulp)",
            PaperMethod::Incineration => "incineration (NIST SP 800-88 Rev. 1 Destroy: incinerate)",
        }
    }
}

/// One retention schedule: how long one record class is kept in one jurisdiction.
/// Charts (and billing and imaging records) count from the last encounter, with an optional
/// minimum age for minors; documentation and audit logs count from creation or the last
/// effective date, whichever is later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// `default` (the shipped schedules), or a state or country code such as `US-NY`.
    pub jurisdiction: String,
    pub record_class: RecordClass,
    /// Years kept after the last encounter (charts, billing, imaging) or from creation or
    /// last effective date (documentation, audit log).
    pub years: u32,
    /// Kept at least until the patient reaches this age (minors' records).
    #[serde(default)]
    pub until_age: Option<u32>,
    /// Where the rule comes from (a statute or regulation), for the people who check it.
    #[serde(default)]
    pub citation: String,
}

impl Schedule {
    /// The schedule's key: `JURISDICTION/CLASS`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.jurisdiction, self.record_class)
    }

    /// Checks a proposed schedule.
    ///
    /// # Errors
    /// [`RecordsError::Invalid`]: a bad jurisdiction, more than 100 years, an age over 30,
    /// an age on a class that is not about a patient, or an overlong citation.
    pub fn check(&self) -> Result<(), RecordsError> {
        ident("jurisdiction", &self.jurisdiction)?;
        if self.years == 0 || self.years > 100 {
            return Err(invalid("`years` must be 1 to 100"));
        }
        if let Some(a) = self.until_age {
            if a == 0 || a > 30 {
                return Err(invalid("`until_age` must be 1 to 30"));
            }
            if self.counts_from_creation() {
                return Err(invalid(format!(
                    "`until_age` does not apply to {}",
                    self.record_class
                )));
            }
        }
        if self.citation.chars().count() > 200 || self.citation.contains(['\n', '\r']) {
            return Err(invalid("`citation` is one line of at most 200 characters"));
        }
        Ok(())
    }

    fn counts_from_creation(&self) -> bool {
        matches!(
            self.record_class,
            RecordClass::Documentation | RecordClass::AuditLog
        )
    }

    /// Decides one record under this schedule as of `today`: `born` and `last_encounter`
    /// for patient records, `created` and `last_effective` for documentation; `hold` when
    /// a legal hold covers it.
    ///
    /// # Errors
    /// A message naming a date the rule needs that is missing.
    pub fn evaluate(
        &self,
        dates: &RecordDates,
        hold: bool,
        today: Date,
    ) -> Result<Verdict, String> {
        let text = |d: Option<Date>| d.map(|d| format!("{d}"));
        let case = if self.counts_from_creation() {
            Case {
                record_class: Some("documentation".into()),
                legal_hold: hold,
                policy: Policy {
                    adult_years_after_last_encounter: None,
                    minor_until_age: None,
                    documentation_years: Some(self.years),
                },
                policy_document_created: text(dates.created),
                last_effective: text(dates.last_effective),
                ..Case::default()
            }
        } else {
            Case {
                born: text(dates.born),
                last_encounter: text(dates.last_encounter),
                record_class: Some("chart".into()),
                legal_hold: hold,
                policy: Policy {
                    adult_years_after_last_encounter: Some(self.years),
                    minor_until_age: self.until_age,
                    documentation_years: None,
                },
                ..Case::default()
            }
        };
        let mut v = retention::evaluate(&case, today)?;
        if !hold {
            v.rule = format!("{} {}: {}", self.jurisdiction, self.record_class, v.rule);
        }
        Ok(v)
    }
}

/// The dates a retention rule reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordDates {
    pub born: Option<Date>,
    pub last_encounter: Option<Date>,
    pub created: Option<Date>,
    pub last_effective: Option<Date>,
}

/// The shipped schedules (jurisdiction `default`): the common US floor — adults 7 years
/// after the last encounter; minors until 21 or 7 years after the last encounter, whichever
/// is later; billing 7 years (False Claims Act look-back); imaging 5 years (minors until
/// 21); HIPAA documentation and audit logs 6 years (45 CFR 164.316(b)(2)(i)).
pub fn default_schedules() -> Vec<Schedule> {
    let s = |class, years, until_age, citation: &str| Schedule {
        jurisdiction: "default".into(),
        record_class: class,
        years,
        until_age,
        citation: citation.into(),
    };
    vec![
        s(
            RecordClass::AdultChart,
            7,
            None,
            "common state floor (AHIMA retention guidance)",
        ),
        s(
            RecordClass::MinorChart,
            7,
            Some(21),
            "common state floor: age of majority plus the statute of limitations",
        ),
        s(
            RecordClass::Billing,
            7,
            None,
            "31 U.S.C. 3731(b) False Claims Act look-back",
        ),
        s(
            RecordClass::Imaging,
            5,
            Some(21),
            "42 CFR 482.26(d)(2) radiology records",
        ),
        s(
            RecordClass::Documentation,
            6,
            None,
            "45 CFR 164.316(b)(2)(i)",
        ),
        s(
            RecordClass::AuditLog,
            6,
            None,
            "45 CFR 164.316(b)(2)(i); 164.312(b)",
        ),
    ]
}

/// The schedule for `class` in `jurisdiction` among `active`, falling back to the
/// `default` jurisdiction, then to the shipped defaults.
pub fn schedule_for(active: &[Schedule], jurisdiction: &str, class: RecordClass) -> Schedule {
    let find = |j: &str| {
        active
            .iter()
            .find(|s| s.jurisdiction == j && s.record_class == class)
            .cloned()
    };
    find(jurisdiction)
        .or_else(|| find("default"))
        .or_else(|| {
            default_schedules()
                .into_iter()
                .find(|s| s.record_class == class)
        })
        .unwrap_or(Schedule {
            jurisdiction: "default".into(),
            record_class: class,
            years: 7,
            until_age: None,
            citation: String::new(),
        })
}

/// The class of a patient's chart: a minor's while the patient was under 18 at the last
/// encounter (or has no encounter and is under 18 today).
pub fn chart_class(born: Option<Date>, last_encounter: Option<Date>, today: Date) -> RecordClass {
    let at = last_encounter.unwrap_or(today);
    match born.and_then(|b| retention::anniversary(b, 18).ok()) {
        Some(adult) if at < adult => RecordClass::MinorChart,
        _ => RecordClass::AdultChart,
    }
}

/// What a legal hold covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scope", content = "target", rename_all = "snake_case")]
pub enum HoldScope {
    /// Every record of one patient, electronic and paper.
    Patient(String),
    /// Every record of one class.
    RecordClass(RecordClass),
    /// One paper volume (barcode).
    Volume(String),
}

impl HoldScope {
    /// `patient:ID`, `record_class:CLASS` or `volume:BARCODE`.
    pub fn subject(&self) -> String {
        match self {
            HoldScope::Patient(p) => format!("patient:{p}"),
            HoldScope::RecordClass(c) => format!("record_class:{c}"),
            HoldScope::Volume(b) => format!("volume:{b}"),
        }
    }

    /// Whether this hold covers a record of `patient`, of class `class`, in volume
    /// `volume` (paper) or electronic (`None`).
    pub fn covers(&self, patient: &str, class: RecordClass, volume: Option<&str>) -> bool {
        match self {
            HoldScope::Patient(p) => p == patient,
            HoldScope::RecordClass(c) => *c == class,
            HoldScope::Volume(b) => volume == Some(b.as_str()),
        }
    }
}

/// Who holds a checked-out volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Custodian {
    Person(String),
    Department(String),
}

impl Custodian {
    /// The name, person or department.
    pub fn name(&self) -> &str {
        match self {
            Custodian::Person(n) | Custodian::Department(n) => n,
        }
    }
}

impl fmt::Display for Custodian {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Custodian::Person(n) => write!(f, "{n}"),
            Custodian::Department(n) => write!(f, "department {n}"),
        }
    }
}

code_enum!(
    /// Where a volume is.
    VolumeStatus, "volume status" {
        InStorage => "in_storage",
        CheckedOut => "checked_out",
        Missing => "missing",
        Destroyed => "destroyed",
    }
);

/// One link of a volume's custody chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyEvent {
    /// Unix seconds.
    pub at: i64,
    /// `registered`, `checked_out`, `returned`, `transferred`, `missing`, `found`,
    /// `destroyed`.
    pub action: String,
    /// Who recorded it (the signed-in user).
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Who physically took it from the storage room (a check-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieved_by: Option<String>,
    /// Due back, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A paper chart volume: barcode, the patient's electronic chart it belongs to, where it
/// is stored, where it is now, and its custody chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub barcode: String,
    /// The Patient id of the electronic chart.
    pub patient: String,
    /// Volume number within the patient's paper chart, from 1.
    pub volume: u32,
    pub record_class: RecordClass,
    /// Home room and cabinet.
    pub room: String,
    pub cabinet: String,
    /// The last date written in the volume (`YYYY-MM-DD`): its retention counts from here
    /// when the electronic chart knows no later encounter.
    #[serde(default)]
    pub last_entry: Option<String>,
    pub status: VolumeStatus,
    #[serde(default)]
    pub holder: Option<Custodian>,
    /// Unix seconds.
    #[serde(default)]
    pub due: Option<i64>,
    pub custody: Vec<CustodyEvent>,
}

impl Volume {
    /// A new volume, in storage at `room`/`cabinet`, registered by `by` at `now`.
    pub fn register(
        barcode: &str,
        patient: &str,
        volume: u32,
        class: RecordClass,
        (room, cabinet): (&Room, &str),
        by: &str,
        now: i64,
    ) -> Result<Volume, RecordsError> {
        let barcode = ident("barcode", barcode)?;
        if !room.cabinets.iter().any(|c| c.id == cabinet) {
            return Err(invalid(format!(
                "room {} has no cabinet `{}`",
                room.id,
                cabinet.chars().take(40).collect::<String>()
            )));
        }
        if volume == 0 {
            return Err(invalid("`volume` numbers start at 1"));
        }
        Ok(Volume {
            barcode: barcode.to_owned(),
            patient: patient.to_owned(),
            volume,
            record_class: class,
            room: room.id.clone(),
            cabinet: cabinet.to_owned(),
            last_entry: None,
            status: VolumeStatus::InStorage,
            holder: None,
            due: None,
            custody: vec![CustodyEvent {
                at: now,
                action: "registered".into(),
                by: by.to_owned(),
                from: None,
                to: Some(format!("{}/{}", room.id, cabinet)),
                retrieved_by: None,
                due: None,
                note: String::new(),
            }],
        })
    }

    fn push(&mut self, e: CustodyEvent) {
        let pos = self.custody.partition_point(|x| x.at <= e.at);
        self.custody.insert(pos, e);
    }

    fn event(&self, at: i64, action: &str, by: &str) -> CustodyEvent {
        CustodyEvent {
            at,
            action: action.into(),
            by: by.into(),
            from: None,
            to: None,
            retrieved_by: None,
            due: None,
            note: String::new(),
        }
    }

    /// Who has the volume now.
    ///
    /// # Errors
    /// [`RecordsError::NotCheckedOut`] unless it is checked out.
    fn current_holder(&self) -> Result<Custodian, RecordsError> {
        self.holder
            .clone()
            .filter(|_| self.status == VolumeStatus::CheckedOut)
            .ok_or_else(|| RecordsError::NotCheckedOut {
                barcode: self.barcode.clone(),
                status: self.status.as_str().replace('_', " "),
            })
    }

    fn unavailable(&self, act: &'static str) -> RecordsError {
        RecordsError::Unavailable {
            barcode: self.barcode.clone(),
            status: self.status.as_str().replace('_', " "),
            act,
        }
    }

    /// Checks the volume out of storage to `to` until `due`; `retrieved_by` took it from
    /// the room.
    ///
    /// # Errors
    /// [`RecordsError::AlreadyCheckedOut`], [`RecordsError::Unavailable`] (missing or
    /// destroyed), [`RecordsError::Invalid`] for a due date not after `now`.
    pub fn check_out(
        &mut self,
        to: Custodian,
        due: i64,
        retrieved_by: &str,
        by: &str,
        now: i64,
    ) -> Result<CustodyEvent, RecordsError> {
        match (self.status, &self.holder) {
            (VolumeStatus::CheckedOut, Some(h)) => {
                return Err(RecordsError::AlreadyCheckedOut {
                    barcode: self.barcode.clone(),
                    holder: h.to_string(),
                })
            }
            (VolumeStatus::InStorage, _) => {}
            _ => return Err(self.unavailable("checked out")),
        }
        if due <= now {
            return Err(invalid("the due date must be in the future"));
        }
        let mut e = self.event(now, "checked_out", by);
        e.from = Some(format!("{}/{}", self.room, self.cabinet));
        e.to = Some(to.to_string());
        e.retrieved_by = Some(retrieved_by.to_owned());
        e.due = Some(due);
        self.status = VolumeStatus::CheckedOut;
        self.holder = Some(to);
        self.due = Some(due);
        self.push(e.clone());
        Ok(e)
    }

    /// Returns the volume to storage, handed back by `returned_by`: the person it is
    /// checked out to (anyone for a department).
    ///
    /// # Errors
    /// [`RecordsError::NotCheckedOut`], [`RecordsError::ReturnedBySomeoneElse`].
    pub fn check_in(
        &mut self,
        returned_by: &str,
        by: &str,
        now: i64,
    ) -> Result<CustodyEvent, RecordsError> {
        let holder = self.current_holder()?;
        if let Custodian::Person(p) = &holder {
            if p != returned_by {
                return Err(RecordsError::ReturnedBySomeoneElse {
                    barcode: self.barcode.clone(),
                    holder: p.clone(),
                    by: returned_by.to_owned(),
                });
            }
        }
        let mut e = self.event(now, "returned", by);
        e.from = Some(format!("{holder} (handed back by {returned_by})"));
        e.to = Some(format!("{}/{}", self.room, self.cabinet));
        self.status = VolumeStatus::InStorage;
        self.holder = None;
        self.due = None;
        self.push(e.clone());
        Ok(e)
    }

    /// Passes a checked-out volume from its holder to `to` (a new due date, or the old one).
    ///
    /// # Errors
    /// [`RecordsError::NotCheckedOut`]; [`RecordsError::Invalid`] for a due date not after
    /// `now` or a transfer to the current holder.
    pub fn transfer(
        &mut self,
        to: Custodian,
        due: Option<i64>,
        by: &str,
        now: i64,
    ) -> Result<CustodyEvent, RecordsError> {
        let holder = self.current_holder()?;
        if holder == to {
            return Err(invalid(format!(
                "volume {} is already with {to}",
                self.barcode
            )));
        }
        let due = due.or(self.due).unwrap_or(now);
        if due <= now {
            return Err(invalid("the due date must be in the future"));
        }
        let mut e = self.event(now, "transferred", by);
        e.from = Some(holder.to_string());
        e.to = Some(to.to_string());
        e.due = Some(due);
        self.holder = Some(to);
        self.due = Some(due);
        self.push(e.clone());
        Ok(e)
    }

    /// Declares the volume missing (not where the registry says it is).
    ///
    /// # Errors
    /// [`RecordsError::Unavailable`] when it is missing or destroyed already.
    pub fn mark_missing(
        &mut self,
        note: &str,
        by: &str,
        now: i64,
    ) -> Result<CustodyEvent, RecordsError> {
        if matches!(self.status, VolumeStatus::Missing | VolumeStatus::Destroyed) {
            return Err(self.unavailable("declared missing"));
        }
        let mut e = self.event(now, "missing", by);
        e.from = self.holder.as_ref().map(ToString::to_string);
        e.note = note.to_owned();
        self.status = VolumeStatus::Missing;
        self.push(e.clone());
        Ok(e)
    }

    /// A missing volume is found and put back in storage.
    ///
    /// # Errors
    /// [`RecordsError::Unavailable`] unless it is missing.
    pub fn found(&mut self, note: &str, by: &str, now: i64) -> Result<CustodyEvent, RecordsError> {
        if self.status != VolumeStatus::Missing {
            return Err(self.unavailable("found (it is not missing)"));
        }
        let mut e = self.event(now, "found", by);
        e.to = Some(format!("{}/{}", self.room, self.cabinet));
        e.note = note.to_owned();
        self.status = VolumeStatus::InStorage;
        self.holder = None;
        self.due = None;
        self.push(e.clone());
        Ok(e)
    }

    /// Records the volume's destruction (after the two-person approval).
    ///
    /// # Errors
    /// [`RecordsError::Unavailable`] unless it is in storage.
    pub fn destroy(
        &mut self,
        note: &str,
        by: &str,
        now: i64,
    ) -> Result<CustodyEvent, RecordsError> {
        if self.status != VolumeStatus::InStorage {
            return Err(self.unavailable("destroyed (only a volume in storage is)"));
        }
        let mut e = self.event(now, "destroyed", by);
        e.from = Some(format!("{}/{}", self.room, self.cabinet));
        e.note = note.to_owned();
        self.status = VolumeStatus::Destroyed;
        self.push(e.clone());
        Ok(e)
    }

    /// Whether the volume is checked out past its due date at `now`.
    pub fn overdue(&self, now: i64) -> bool {
        self.status == VolumeStatus::CheckedOut && self.due.is_some_and(|d| d < now)
    }
}

/// A cabinet in a storage room, locked by a key or a combination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cabinet {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// Camera coverage of a storage room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cameras {
    /// What the cameras see, in words ("door and aisles 1-4").
    pub coverage: String,
    /// Days footage is kept before it is overwritten.
    pub footage_retention_days: u32,
}

/// A records storage room: its badge door, cabinets, the staff authorized to enter and
/// retrieve, and its camera coverage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Room {
    /// The room's code (from the path in `PUT /api/records/rooms/{id}`).
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// The door's name in the badge system's export.
    #[serde(default)]
    pub door: Option<String>,
    /// User names authorized to enter and retrieve.
    #[serde(default)]
    pub authorized: Vec<String>,
    #[serde(default)]
    pub cabinets: Vec<Cabinet>,
    #[serde(default)]
    pub cameras: Option<Cameras>,
}

impl Room {
    /// Checks a room as an administrator enters it.
    ///
    /// # Errors
    /// [`RecordsError::Invalid`] naming the field: ids, names, duplicate cabinets, camera
    /// retention over ten years.
    pub fn check(&self) -> Result<(), RecordsError> {
        ident("id", &self.id)?;
        line("name", &self.name, 120)?;
        if let Some(d) = &self.door {
            ident("door", d)?;
        }
        for u in &self.authorized {
            ident("authorized", u)?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.cabinets {
            ident("cabinet", &c.id)?;
            if !seen.insert(c.id.as_str()) {
                return Err(invalid(format!("cabinet `{}` is listed twice", c.id)));
            }
        }
        if let Some(c) = &self.cameras {
            line("cameras.coverage", &c.coverage, 200)?;
            if c.footage_retention_days == 0 || c.footage_retention_days > 3650 {
                return Err(invalid(
                    "`cameras.footage_retention_days` must be 1 to 3650",
                ));
            }
        }
        Ok(())
    }

    /// Whether `user` may enter this room and retrieve from it.
    pub fn authorizes(&self, user: &str) -> bool {
        self.authorized.iter().any(|u| u == user)
    }
}

/// One badge reader event from the door system's export (CSV `time, user, door,
/// direction, granted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadgeEvent {
    /// Unix seconds.
    pub at: i64,
    pub user: String,
    pub door: String,
    /// `true` for `in`.
    pub inward: bool,
    pub granted: bool,
}

/// Parses a badge-access export: a header `time,user,door,direction,granted` then one
/// event per line; `time` is RFC 3339, `direction` `in` or `out`, `granted` `true`/`false`
/// (or `yes`/`no`, `1`/`0`).
///
/// # Errors
/// [`RecordsError::Invalid`] naming the first bad line; nothing is returned then.
pub fn parse_badge_csv(text: &str) -> Result<Vec<BadgeEvent>, RecordsError> {
    let mut out = vec![];
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header = lines
        .next()
        .map(|(_, l)| {
            l.split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if header != ["time", "user", "door", "direction", "granted"] {
        return Err(invalid(
            "a badge export starts with the header `time,user,door,direction,granted`",
        ));
    }
    for (n, l) in lines {
        let bad = |what: &str| invalid(format!("badge export line {}: {what}", n + 1));
        let cols: Vec<&str> = l.split(',').map(str::trim).collect();
        let [time, user, door, direction, granted] = cols.as_slice() else {
            return Err(bad("expected 5 columns"));
        };
        let at = time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .map_err(|_| bad("`time` must be RFC 3339, e.g. 2026-11-30T08:15:00Z"))?
            .unix_timestamp();
        let user = ident("user", user).map_err(|e| bad(&e.to_string()))?;
        let door = ident("door", door).map_err(|e| bad(&e.to_string()))?;
        let inward = match direction.to_ascii_lowercase().as_str() {
            "in" => true,
            "out" => false,
            _ => return Err(bad("`direction` must be in or out")),
        };
        let granted = match granted.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "granted" => true,
            "false" | "no" | "0" | "denied" => false,
            _ => return Err(bad("`granted` must be true or false")),
        };
        out.push(BadgeEvent {
            at,
            user: user.to_owned(),
            door: door.to_owned(),
            inward,
            granted,
        });
    }
    Ok(out)
}

/// A chart movement the badge log and room list contradict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// `unauthorized_retrieval`, `badge_outside_building`, `visitor_without_escort`,
    /// `visitor_after_closing`.
    pub kind: String,
    /// Unix seconds of what was flagged.
    pub at: i64,
    /// The user (or visitor id) concerned.
    pub subject: String,
    /// The volume's barcode, or the room.
    pub target: String,
    pub evidence: String,
}

/// Looks back this far (seconds) in the badge log for where a person was.
pub const BADGE_LOOKBACK_SECS: i64 = 16 * 3600;

/// Correlates a retrieval of `barcode` from `room` by `user` at `at` with the room's
/// access list and the badge log: a retrieval by someone not authorized for the room, or
/// while their last granted badge event (within [`BADGE_LOOKBACK_SECS`]) was an exit
/// through a building entrance (`perimeter` doors), is flagged.
pub fn correlate_retrieval(
    user: &str,
    barcode: &str,
    room: &Room,
    at: i64,
    badges: &[BadgeEvent],
    perimeter: &[String],
) -> Vec<Flag> {
    let mut out = vec![];
    let flag = |kind: &str, evidence: String| Flag {
        kind: kind.into(),
        at,
        subject: user.into(),
        target: barcode.into(),
        evidence,
    };
    if !room.authorizes(user) {
        out.push(flag(
            "unauthorized_retrieval",
            format!("{user} is not on the access list of room {}", room.id),
        ));
    }
    let last = badges
        .iter()
        .filter(|b| b.user == user && b.granted && b.at <= at && at - b.at <= BADGE_LOOKBACK_SECS)
        .max_by_key(|b| b.at);
    if let Some(b) = last {
        if !b.inward && perimeter.contains(&b.door) {
            out.push(flag(
                "badge_outside_building",
                format!(
                    "the badge of {user} last left the building through {} {} s before",
                    b.door,
                    at - b.at
                ),
            ));
        }
    }
    out
}

/// A visitor to a records area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visitor {
    pub id: String,
    pub name: String,
    /// The identity document checked (kind and last digits, e.g. "driver licence ...4821").
    pub identity: String,
    /// Who the visitor came to see (a user).
    pub host: String,
    pub purpose: String,
    /// The staff member escorting the visitor, if any.
    #[serde(default)]
    pub escort: Option<String>,
    pub room: String,
    /// Unix seconds.
    pub time_in: i64,
    #[serde(default)]
    pub time_out: Option<i64>,
    pub signed_in_by: String,
}

/// Flags a visitor at `now`: present without an escort, or still signed in after
/// `closing` (Unix seconds of today's closing time) — or since before yesterday's.
pub fn visitor_flags(v: &Visitor, now: i64, closing: i64) -> Vec<Flag> {
    let mut out = vec![];
    if v.time_out.is_some() {
        return out;
    }
    let flag = |kind: &str, at: i64, evidence: String| Flag {
        kind: kind.into(),
        at,
        subject: v.id.clone(),
        target: v.room.clone(),
        evidence,
    };
    if v.escort.is_none() {
        out.push(flag(
            "visitor_without_escort",
            v.time_in,
            format!("visitor {} is in room {} without an escort", v.id, v.room),
        ));
    }
    if now >= closing || v.time_in < closing - 86_400 {
        out.push(flag(
            "visitor_after_closing",
            closing,
            format!("visitor {} is still signed in after closing", v.id),
        ));
    }
    out
}

/// A key or lock combination: who holds it, and its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyItem {
    pub id: String,
    /// `key` or `combination`.
    pub kind: String,
    pub room: String,
    #[serde(default)]
    pub cabinet: Option<String>,
    /// A key's holder, or the people who know a combination.
    #[serde(default)]
    pub holders: Vec<String>,
    pub history: Vec<CustodyEvent>,
}

impl KeyItem {
    /// Issues a physical key to `to`.
    ///
    /// # Errors
    /// [`RecordsError::KeyIssued`]; [`RecordsError::Invalid`] for a combination.
    pub fn issue(&mut self, to: &str, by: &str, now: i64) -> Result<(), RecordsError> {
        if self.kind != "key" {
            return Err(invalid(
                "a combination is not issued: change it and name who knows it",
            ));
        }
        if let Some(h) = self.holders.first() {
            return Err(RecordsError::KeyIssued {
                key: self.id.clone(),
                holder: h.clone(),
            });
        }
        self.holders = vec![to.to_owned()];
        self.log(now, "issued", by, Some(to.to_owned()));
        Ok(())
    }

    /// A key handed back.
    ///
    /// # Errors
    /// [`RecordsError::KeyNotIssued`].
    pub fn give_back(&mut self, by: &str, now: i64) -> Result<(), RecordsError> {
        if self.kind != "key" || self.holders.is_empty() {
            return Err(RecordsError::KeyNotIssued(self.id.clone()));
        }
        let from = self.holders.pop();
        self.log(now, "returned", by, None);
        if let Some(e) = self.history.last_mut() {
            e.from = from;
        }
        Ok(())
    }

    /// A combination changed; `known_by` now know it (never the combination itself).
    ///
    /// # Errors
    /// [`RecordsError::Invalid`] for a key.
    pub fn change_combination(
        &mut self,
        known_by: Vec<String>,
        by: &str,
        now: i64,
    ) -> Result<(), RecordsError> {
        if self.kind != "combination" {
            return Err(invalid(
                "only a combination is changed; a key is issued and returned",
            ));
        }
        self.holders = known_by;
        let to = self.holders.join(" ");
        self.log(now, "combination_changed", by, Some(to));
        Ok(())
    }

    fn log(&mut self, at: i64, action: &str, by: &str, to: Option<String>) {
        self.history.push(CustodyEvent {
            at,
            action: action.into(),
            by: by.into(),
            from: None,
            to,
            retrieved_by: None,
            due: None,
            note: String::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Room {
        Room {
            id: "hr-1".into(),
            name: "Records room B1".into(),
            door: Some("B1-door".into()),
            authorized: vec!["clerk".into()],
            cabinets: vec![Cabinet {
                id: "C1".into(),
                name: String::new(),
            }],
            cameras: None,
        }
    }

    fn vol() -> Volume {
        Volume::register(
            "V1",
            "p1",
            1,
            RecordClass::AdultChart,
            (&room(), "C1"),
            "clerk",
            10,
        )
        .unwrap()
    }

    #[test]
    fn custody_chain_records_every_movement_in_order() {
        let mut v = vol();
        v.check_out(
            Custodian::Person("dr.a".into()),
            1000,
            "clerk",
            "clerk",
            100,
        )
        .unwrap();
        assert!(!v.overdue(999) && v.overdue(1001));
        v.transfer(
            Custodian::Department("cardiology".into()),
            None,
            "clerk",
            200,
        )
        .unwrap();
        v.check_in("anyone-from-cardiology", "clerk", 300).unwrap();
        let actions: Vec<&str> = v.custody.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["registered", "checked_out", "transferred", "returned"]
        );
        assert_eq!(v.status, VolumeStatus::InStorage);
        assert!(!v.overdue(10_000));
    }

    #[test]
    fn double_check_out_and_return_by_someone_else_are_refused() {
        let mut v = vol();
        v.check_out(
            Custodian::Person("dr.a".into()),
            1000,
            "clerk",
            "clerk",
            100,
        )
        .unwrap();
        let before = v.clone();
        assert!(matches!(
            v.check_out(
                Custodian::Person("dr.b".into()),
                1000,
                "clerk",
                "clerk",
                110
            ),
            Err(RecordsError::AlreadyCheckedOut { .. })
        ));
        assert!(matches!(
            v.check_in("dr.b", "clerk", 120),
            Err(RecordsError::ReturnedBySomeoneElse { .. })
        ));
        assert_eq!(v, before, "a refused act changes nothing");
        v.check_in("dr.a", "clerk", 130).unwrap();
        assert!(matches!(
            v.check_in("dr.a", "clerk", 140),
            Err(RecordsError::NotCheckedOut { .. })
        ));
        assert!(
            v.check_out(Custodian::Person("dr.a".into()), 100, "clerk", "clerk", 150)
                .is_err(),
            "a due date in the past"
        );
    }

    #[test]
    fn missing_volumes_are_found_and_destroyed_ones_stay_destroyed() {
        let mut v = vol();
        v.mark_missing("not in C1", "clerk", 50).unwrap();
        assert!(v.mark_missing("again", "clerk", 51).is_err());
        assert!(v
            .check_out(Custodian::Person("dr.a".into()), 1000, "clerk", "clerk", 52)
            .is_err());
        v.found("misfiled in C2", "clerk", 60).unwrap();
        v.destroy("certificate d1", "po", 70).unwrap();
        assert!(v.found("x", "clerk", 80).is_err());
        assert!(v.destroy("x", "po", 80).is_err());
    }

    #[test]
    fn retrievals_by_unauthorized_or_absent_people_are_flagged() {
        let r = room();
        let perimeter = vec!["main-entrance".to_string()];
        let b = |at, user: &str, door: &str, inward| BadgeEvent {
            at,
            user: user.into(),
            door: door.into(),
            inward,
            granted: true,
        };
        let badges = vec![
            b(1000, "clerk", "main-entrance", true),
            b(1000, "dr.x", "main-entrance", true),
            b(2000, "dr.x", "main-entrance", false),
            b(1500, "clerk", "B1-door", true),
        ];
        assert!(correlate_retrieval("clerk", "V1", &r, 3000, &badges, &perimeter).is_empty());
        let f = correlate_retrieval("dr.x", "V1", &r, 3000, &badges, &perimeter);
        let kinds: Vec<&str> = f.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, ["unauthorized_retrieval", "badge_outside_building"]);
        // Leaving the records room is not leaving the building; old events do not count.
        let later = [
            b(100, "clerk", "main-entrance", false),
            b(2500, "clerk", "B1-door", false),
        ];
        assert!(correlate_retrieval(
            "clerk",
            "V1",
            &r,
            100 + BADGE_LOOKBACK_SECS + 1,
            &later[..1],
            &perimeter
        )
        .is_empty());
        assert!(correlate_retrieval("clerk", "V1", &r, 3000, &later[1..], &perimeter).is_empty());
    }

    #[test]
    fn badge_exports_parse_or_name_the_bad_line() {
        let ok = parse_badge_csv(
            "time,user,door,direction,granted\n2026-11-30T08:00:00Z,clerk,B1-door,in,true\n\n2026-11-30T09:00:00Z,clerk,B1-door,OUT,no\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert!(ok[0].inward && ok[0].granted && !ok[1].inward && !ok[1].granted);
        let e = parse_badge_csv(
            "time,user,door,direction,granted\n2026-11-30T08:00:00Z,clerk,B1,sideways,true\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_badge_csv("when,who\n").is_err());
    }

    #[test]
    fn visitors_without_escort_or_after_closing_are_flagged() {
        let v = Visitor {
            id: "v1".into(),
            name: "A. Auditor".into(),
            identity: "passport ...12".into(),
            host: "clerk".into(),
            purpose: "external audit".into(),
            escort: None,
            room: "hr-1".into(),
            time_in: 100,
            time_out: None,
            signed_in_by: "clerk".into(),
        };
        let kinds = |v: &Visitor, now| {
            visitor_flags(v, now, 500)
                .into_iter()
                .map(|f| f.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&v, 200), ["visitor_without_escort"]);
        let escorted = Visitor {
            escort: Some("clerk".into()),
            ..v.clone()
        };
        assert!(kinds(&escorted, 200).is_empty());
        assert_eq!(kinds(&escorted, 500), ["visitor_after_closing"]);
        let overnight = Visitor {
            time_in: 500 - 86_400 - 1,
            ..escorted.clone()
        };
        assert_eq!(
            kinds(&overnight, 200),
            ["visitor_after_closing"],
            "since yesterday"
        );
        let gone = Visitor {
            time_out: Some(300),
            ..v
        };
        assert!(kinds(&gone, 900).is_empty());
    }

    #[test]
    fn keys_are_issued_once_and_combinations_change() {
        let mut k = KeyItem {
            id: "K1".into(),
            kind: "key".into(),
            room: "hr-1".into(),
            cabinet: Some("C1".into()),
            holders: vec![],
            history: vec![],
        };
        k.issue("clerk", "admin", 1).unwrap();
        assert!(matches!(
            k.issue("other", "admin", 2),
            Err(RecordsError::KeyIssued { .. })
        ));
        k.give_back("admin", 3).unwrap();
        assert!(k.give_back("admin", 4).is_err());
        assert!(k.change_combination(vec![], "admin", 5).is_err());
        let mut c = KeyItem {
            kind: "combination".into(),
            ..k.clone()
        };
        c.change_combination(vec!["clerk".into(), "po".into()], "admin", 6)
            .unwrap();
        assert_eq!(c.holders, ["clerk", "po"]);
        assert!(c.issue("x", "admin", 7).is_err());
    }

    #[test]
    fn schedules_decide_by_class_and_fall_back_to_the_defaults() {
        let d = |s| retention::date("t", s).unwrap();
        let today = d("2026-11-30");
        let adult = schedule_for(&[], "US-NY", RecordClass::AdultChart);
        assert_eq!((adult.years, adult.jurisdiction.as_str()), (7, "default"));
        let dates = RecordDates {
            born: Some(d("1950-02-28")),
            last_encounter: Some(d("2019-11-30")),
            ..RecordDates::default()
        };
        let v = adult.evaluate(&dates, false, today).unwrap();
        assert!(v.destroy_eligible, "the seventh anniversary is today");
        assert_eq!(v.retain_until.as_deref(), Some("2026-11-30"));
        assert!(v.rule.starts_with("default adult_chart: "), "{}", v.rule);
        let ny = Schedule {
            jurisdiction: "US-NY".into(),
            record_class: RecordClass::AdultChart,
            years: 10,
            until_age: None,
            citation: "10 NYCRR 405.10".into(),
        };
        ny.check().unwrap();
        let v = schedule_for(&[ny], "US-NY", RecordClass::AdultChart)
            .evaluate(&dates, false, today)
            .unwrap();
        assert_eq!(v.retain_until.as_deref(), Some("2029-11-30"));
        let minor = RecordDates {
            born: Some(d("2016-02-29")),
            last_encounter: Some(d("2020-01-01")),
            ..RecordDates::default()
        };
        assert_eq!(
            chart_class(minor.born, minor.last_encounter, today),
            RecordClass::MinorChart
        );
        let v = schedule_for(&[], "default", RecordClass::MinorChart)
            .evaluate(&minor, false, today)
            .unwrap();
        assert_eq!(
            v.retain_until.as_deref(),
            Some("2037-02-28"),
            "age 21 on a common-year 28 February"
        );
        let held = adult.evaluate(&dates, true, today).unwrap();
        assert!(!held.destroy_eligible && held.retain_until.is_none());
        let doc = schedule_for(&[], "default", RecordClass::AuditLog);
        let v = doc
            .evaluate(
                &RecordDates {
                    created: Some(d("2020-11-30")),
                    ..RecordDates::default()
                },
                false,
                today,
            )
            .unwrap();
        assert_eq!(
            (v.destroy_eligible, v.retain_until.as_deref()),
            (true, Some("2026-11-30"))
        );
        let bad = Schedule {
            until_age: Some(21),
            ..doc
        };
        assert!(bad.check().is_err());
        assert!("paper".parse::<RecordClass>().is_err());
        for path_like in ["../etc", "V/1", "..", "a:b"] {
            assert!(ident("barcode", path_like).is_err(), "{path_like}");
        }
        assert!(ident("user", "dr.ames@example.org").is_ok());
        assert_eq!(
            "pulping".parse::<PaperMethod>().unwrap(),
            PaperMethod::Pulping
        );
    }

    #[test]
    fn holds_cover_their_scope_only() {
        let p = HoldScope::Patient("p1".into());
        let c = HoldScope::RecordClass(RecordClass::Billing);
        let v = HoldScope::Volume("V1".into());
        assert!(p.covers("p1", RecordClass::AdultChart, None));
        assert!(!p.covers("p2", RecordClass::AdultChart, Some("V1")));
        assert!(c.covers("p2", RecordClass::Billing, None));
        assert!(!c.covers("p2", RecordClass::AdultChart, None));
        assert!(v.covers("p9", RecordClass::AdultChart, Some("V1")));
        assert!(
            !v.covers("p9", RecordClass::AdultChart, None),
            "a volume hold is paper only"
        );
        assert_eq!(c.subject(), "record_class:billing");
        let back: HoldScope = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}
