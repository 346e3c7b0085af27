//! Paper records and the records lifecycle (issue 15; rules in
//! `medvault_governance::records`): the paper chart registry (rooms, cabinets, volumes and
//! their custody chain, keys and combinations, camera coverage and footage reviews), badge
//! correlation, the visitor log, retention schedules edited by two people, the retention
//! due list over electronic charts and paper volumes, legal holds on record classes and
//! paper volumes, and paper destruction with a signed certificate.
//!
//! Everything is a sealed governance record (under the directory data key: visitor names,
//! hold reasons) written through the gate with its audit record in the same transaction.
//! Every change to the registry is guarded by one version counter (`records.version`), so
//! two clerks scanning the same barcode at once cannot both check it out, and a hold placed
//! while a destruction is approved makes the approval fail rather than race it.

use std::collections::{BTreeMap, BTreeSet};

use medvault_audit::AuditRecord;
use medvault_governance::destruction::{self as gov, Certificate, DestructionReason};
use medvault_governance::records::{
    self as rules, BadgeEvent, Custodian, CustodyEvent, Flag, HoldScope, KeyItem, PaperMethod,
    RecordClass, RecordDates, RecordsError, Room, Schedule, Visitor, Volume, VolumeStatus,
};
use medvault_governance::retention::Verdict;
use medvault_governance::{Incident, IncidentSource};
use medvault_store::{GovernanceRow, Op, Order, SearchQuery};
use medvault_types::{Operation, PatientId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Date, OffsetDateTime, UtcOffset};

use crate::{Caller, Outcome, Vault, VaultError};

const ROOM: &str = "records.room";
const VOLUME: &str = "records.volume";
const KEY: &str = "records.key";
const BADGES: &str = "records.badges";
const FLAG: &str = "records.flag";
const VISITOR: &str = "records.visitor";
const HOLD: &str = "records.hold";
const PAPER: &str = "records.paper-destruction";
const FOOTAGE: &str = "records.footage-review";
const SITE: &str = "records.site";
const SCHEDULE: &str = "retention.schedule";
/// The registry's version counter: every registry change is guarded by it.
const VERSION: &str = "records.version";
/// The version of the holds on record classes and volumes, bumped by each hold change:
/// a chart's destruction commits guarded by it (it need not wait for other registry work).
const HOLDS_VERSION: &str = "records.holds-version";

/// Longest note, reason, finding, in characters.
const TEXT_CHARS: usize = 2000;

/// Serializes registry changes within one process (the version guard covers several).
static REGISTRY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The verdict for a record under a legal hold (as the retention rules give it).
fn held_verdict() -> Verdict {
    Verdict {
        destroy_eligible: false,
        destroy_eligible_from: None,
        retain_until: None,
        rule: "legal hold: kept until the hold is released".into(),
    }
}

fn bad(e: impl std::fmt::Display) -> VaultError {
    VaultError::BadRequest(e.to_string())
}

fn refused(e: RecordsError) -> VaultError {
    match e {
        RecordsError::Invalid(m) => VaultError::BadRequest(m),
        e => VaultError::Duplicate(e.to_string()),
    }
}

/// Site settings of the records areas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Badge doors that are building entrances: an `out` there means the person left.
    #[serde(default)]
    pub perimeter_doors: Vec<String>,
    /// When the records areas close, `HH:MM` local time: visitors still signed in after
    /// it are flagged.
    #[serde(default = "default_closing")]
    pub closing: String,
    /// The site's offset from UTC, `+HH:MM` (due dates given as a date end that local day).
    #[serde(default = "default_offset")]
    pub utc_offset: String,
    /// The jurisdiction whose retention schedules apply (`default` when none is set).
    #[serde(default = "default_jurisdiction")]
    pub jurisdiction: String,
}

fn default_closing() -> String {
    "18:00".into()
}
fn default_offset() -> String {
    "+00:00".into()
}
fn default_jurisdiction() -> String {
    "default".into()
}

impl Default for Site {
    fn default() -> Self {
        Site {
            perimeter_doors: vec![],
            closing: default_closing(),
            utc_offset: default_offset(),
            jurisdiction: default_jurisdiction(),
        }
    }
}

impl Site {
    pub(crate) fn offset(&self) -> Result<UtcOffset, VaultError> {
        let fmt = time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]");
        UtcOffset::parse(self.utc_offset.trim(), &fmt)
            .map_err(|_| bad("`utc_offset` must look like +01:00 or -05:00"))
    }

    fn closing_time(&self) -> Result<time::Time, VaultError> {
        let fmt = time::macros::format_description!("[hour]:[minute]");
        time::Time::parse(self.closing.trim(), &fmt)
            .map_err(|_| bad("`closing` must be a time HH:MM"))
    }

    fn check(&self) -> Result<(), VaultError> {
        for d in &self.perimeter_doors {
            rules::ident("perimeter_doors", d).map_err(refused)?;
        }
        self.offset()?;
        self.closing_time()?;
        rules::ident("jurisdiction", &self.jurisdiction).map_err(refused)?;
        Ok(())
    }

    /// Today's closing time at `now`, Unix seconds.
    fn closing_at(&self, now: i64) -> Result<i64, VaultError> {
        let off = self.offset()?;
        let local = OffsetDateTime::from_unix_timestamp(now)
            .map_err(|_| VaultError::Internal("clock out of range".into()))?
            .to_offset(off);
        Ok(local.replace_time(self.closing_time()?).unix_timestamp())
    }

    /// A due time from `YYYY-MM-DD` (the end of that local day) or RFC 3339.
    fn when(&self, field: &str, v: &str) -> Result<i64, VaultError> {
        let v = v.trim();
        if let Ok(t) = OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339) {
            return Ok(t.unix_timestamp());
        }
        let d = medvault_governance::retention::date(field, v).map_err(bad)?;
        Ok(d.with_hms(23, 59, 59)
            .map_err(|_| bad(format!("`{field}` is out of range")))?
            .assume_offset(self.offset()?)
            .unix_timestamp())
    }

    fn today(&self, now: i64) -> Result<Date, VaultError> {
        Ok(OffsetDateTime::from_unix_timestamp(now)
            .map_err(|_| VaultError::Internal("clock out of range".into()))?
            .to_offset(self.offset()?)
            .date())
    }
}

/// A new paper volume (`POST /api/records/volumes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVolume {
    pub barcode: String,
    /// The Patient id of the electronic chart.
    pub patient: String,
    #[serde(default = "one")]
    pub volume: u32,
    /// Inferred from the electronic chart (adult or minor) when absent.
    #[serde(default)]
    pub record_class: Option<RecordClass>,
    pub room: String,
    pub cabinet: String,
    /// The last date written in the volume, `YYYY-MM-DD`.
    #[serde(default)]
    pub last_entry: Option<String>,
}

fn one() -> u32 {
    1
}

/// A custody act on one volume (`POST /api/records/volumes/{barcode}/{act}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "act", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CustodyAct {
    /// To a person (`to`) or a department (`department`), due back at `due`
    /// (`YYYY-MM-DD` or RFC 3339); `retrieved_by` took it from the room (default: the
    /// signed-in clerk).
    CheckOut {
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        department: Option<String>,
        due: String,
        #[serde(default)]
        retrieved_by: Option<String>,
    },
    /// Handed back by `returned_by` (the holder).
    Return {
        returned_by: String,
    },
    Transfer {
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        department: Option<String>,
        #[serde(default)]
        due: Option<String>,
    },
    /// Not where the registry says: opens an incident.
    Missing {
        note: String,
    },
    Found {
        note: String,
    },
}

fn custodian(to: Option<String>, department: Option<String>) -> Result<Custodian, VaultError> {
    match (to, department) {
        (Some(p), None) => Ok(Custodian::Person(
            rules::ident("to", &p).map_err(refused)?.to_owned(),
        )),
        (None, Some(d)) => Ok(Custodian::Department(
            rules::line("department", &d, 120)
                .map_err(refused)?
                .to_owned(),
        )),
        _ => Err(bad("name either a person (`to`) or a `department`")),
    }
}

/// A volume as the API shows it: where it is, whether it is overdue, the holds covering
/// it, and what was flagged about it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    #[serde(flatten)]
    pub volume: Volume,
    pub overdue: bool,
    pub holds: Vec<HoldView>,
    pub flags: Vec<FlagView>,
}

/// A stored flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlagView {
    pub id: String,
    #[serde(flatten)]
    pub flag: Flag,
}

/// A legal hold of any scope (patient holds live with the chart's destruction register).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldView {
    pub id: String,
    #[serde(flatten)]
    pub scope: HoldScope,
    pub matter: String,
    pub reason: Option<String>,
    pub set_by: String,
    pub set_at: i64,
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<i64>,
}

/// A retention schedule change waiting for its second person, or in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    pub id: String,
    #[serde(flatten)]
    pub schedule: Schedule,
    /// `proposed`, `active`, `superseded` or `shipped` (a default nobody changed).
    pub status: String,
    #[serde(default)]
    pub proposed_by: String,
    #[serde(default)]
    pub proposed_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<i64>,
}

/// One line of the retention due list: an electronic chart or a paper volume, its class,
/// the verdict and the rule that decided, and the holds that stop it.
#[derive(Debug, Clone, Serialize)]
pub struct DueItem {
    /// `electronic` or `paper`.
    pub medium: String,
    pub patient: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub barcode: Option<String>,
    pub record_class: RecordClass,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Ids of the active holds covering it.
    pub holds: Vec<String>,
}

/// A paper destruction: requested by one person, approved by another, certified.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaperDestruction {
    pub id: String,
    pub patient: String,
    pub volumes: Vec<String>,
    pub reason: DestructionReason,
    pub method: PaperMethod,
    pub vendor: String,
    pub witness: String,
    /// The day of destruction, `YYYY-MM-DD`.
    pub date: String,
    pub requested_by: String,
    pub requested_at: i64,
    /// `requested`, `completed` or `cancelled`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_entry: Option<u64>,
    /// The signed certificate (C2SP note), once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// A paper destruction request (`POST /api/records/destruction`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperRequest {
    pub volumes: Vec<String>,
    pub reason: String,
    pub method: String,
    pub vendor: String,
    pub witness: String,
    /// `YYYY-MM-DD`.
    pub date: String,
}

/// A visitor signing in (`POST /api/records/visitors`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVisitor {
    pub name: String,
    /// The document checked, e.g. "driver licence ...4821".
    pub identity: String,
    /// Must be true: the clerk saw the document.
    pub identity_checked: bool,
    pub host: String,
    pub purpose: String,
    #[serde(default)]
    pub escort: Option<String>,
    pub room: String,
}

/// A visitor with what is flagged about them now.
#[derive(Debug, Clone, Serialize)]
pub struct VisitorView {
    #[serde(flatten)]
    pub visitor: Visitor,
    pub flags: Vec<Flag>,
}

/// A footage review logged against an incident.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FootageReview {
    #[serde(default)]
    pub id: String,
    pub room: String,
    pub incident: String,
    /// The stretch reviewed, RFC 3339.
    pub from: String,
    pub to: String,
    pub finding: String,
    #[serde(default)]
    pub reviewer: String,
    #[serde(default)]
    pub at: i64,
}

/// A key or combination act (`POST /api/records/keys/{id}/{act}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "act", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeyAct {
    Issue { to: String },
    Return,
    ChangeCombination { known_by: Vec<String> },
}

/// The registry dashboard: what needs someone's attention now.
#[derive(Debug, Clone, Serialize)]
pub struct Dashboard {
    pub overdue: Vec<Volume>,
    pub missing: Vec<Volume>,
    pub flags: Vec<FlagView>,
    pub visitors: Vec<VisitorView>,
    pub checked_out: usize,
    pub in_storage: usize,
}

impl Vault {
    pub(crate) fn rows<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<T>, VaultError> {
        self.store
            .governance(kind)?
            .iter()
            .map(|r| self.open_governance(r))
            .collect()
    }

    pub(crate) fn row<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<T>, VaultError> {
        self.store
            .governance_record(kind, id)?
            .map(|r| self.open_governance(&r))
            .transpose()
    }

    pub(crate) fn put<T: Serialize>(
        &self,
        kind: &str,
        id: &str,
        status: &str,
        subject: &str,
        body: &T,
    ) -> Result<Op, VaultError> {
        let v = serde_json::to_value(body).map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(Op::PutGovernance(GovernanceRow {
            kind: kind.into(),
            id: id.into(),
            at: self.now_unix(),
            status: status.into(),
            subject: subject.into(),
            body: self.seal_governance(kind, id, &v)?,
        }))
    }

    /// A counter in the store's metadata (0 when absent).
    fn counter(&self, key: &str) -> Result<u64, VaultError> {
        Ok(self
            .store
            .meta(key)?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0u64))
    }

    /// The ops that move the holds' version on (with a guard on the version read).
    fn bump_holds(&self) -> Result<Vec<Op>, VaultError> {
        let v = self.counter(HOLDS_VERSION)?;
        Ok(vec![
            Op::RequireMetaListed {
                key: HOLDS_VERSION.into(),
                member: v.to_string(),
                absent: "0".into(),
            },
            Op::PutMeta {
                key: HOLDS_VERSION.into(),
                value: (v + 1).to_string().into_bytes(),
            },
        ])
    }

    /// Whether a hold on a class or volume was placed or released since `version`.
    pub(crate) fn holds_moved(&self, version: u64) -> bool {
        self.counter(HOLDS_VERSION).map_or(true, |v| v != version)
    }

    /// The registry's version and the guard that makes a batch fail if it moved.
    pub(crate) fn records_guard(&self) -> Result<(u64, Op), VaultError> {
        let v = self.counter(VERSION)?;
        Ok((
            v,
            Op::RequireMetaListed {
                key: VERSION.into(),
                member: v.to_string(),
                absent: "0".into(),
            },
        ))
    }

    /// Commits a registry change guarded by the version read before it was decided.
    fn registry_commit(
        &self,
        version: u64,
        mut ops: Vec<Op>,
        recs: Vec<AuditRecord>,
    ) -> Result<medvault_store::Committed, VaultError> {
        ops.insert(
            0,
            Op::RequireMetaListed {
                key: VERSION.into(),
                member: version.to_string(),
                absent: "0".into(),
            },
        );
        ops.push(Op::PutMeta {
            key: VERSION.into(),
            value: (version + 1).to_string().into_bytes(),
        });
        match self.commit(ops, recs) {
            Ok(c) => Ok(c),
            Err(e) => {
                if self.records_guard()?.0 != version {
                    Err(VaultError::Duplicate(
                        "the registry changed while you worked (someone else scanned or changed it); try again".into(),
                    ))
                } else {
                    Err(crate::audit_failed(e))
                }
            }
        }
    }

    /// Runs one audited registry act: permits `op`, holds the registry lock, reads the
    /// version, lets `f` decide (returning the ops, the detail, and a value), and commits
    /// them with the audit record. A refusal from `f` is audited as a failure and changes
    /// nothing.
    fn registry_act<T>(
        &self,
        c: &Caller,
        op: Operation,
        f: impl FnOnce(&mut AuditRecord) -> Result<(Vec<Op>, T), VaultError>,
    ) -> Result<T, VaultError> {
        let Some(mut rec) = self.operate(c, op, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let _lock = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let (version, _) = self.records_guard()?;
        match f(&mut rec) {
            Ok((ops, out)) => {
                self.registry_commit(version, ops, vec![rec])?;
                Ok(out)
            }
            Err(e) => {
                rec.outcome = match e {
                    VaultError::NotFound => Outcome::NotFound,
                    VaultError::SeparationOfDuties(_) => Outcome::Denied,
                    _ => Outcome::Failure,
                };
                let why = e.to_string();
                let prefix = rec
                    .detail
                    .take()
                    .map(|d| format!("{d} "))
                    .unwrap_or_default();
                rec.detail = Some(format!(
                    "{prefix}refused: {}",
                    why.chars().take(200).collect::<String>()
                ));
                self.audit(vec![rec])?;
                Err(e)
            }
        }
    }

    /// A read of the registry, audited.
    fn registry_read(&self, c: &Caller, op: Operation, detail: String) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, op, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(detail);
        self.audit(vec![rec])
    }

    /// The site settings (defaults until set).
    pub(crate) fn site(&self) -> Result<Site, VaultError> {
        Ok(self.row(SITE, "site")?.unwrap_or_default())
    }

    /// `GET /api/records/site`.
    ///
    /// # Errors
    /// Denied.
    pub fn records_site(&self, c: &Caller) -> Result<Site, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "site".into())?;
        self.site()
    }

    /// `PUT /api/records/site` (records clerk, security administrator).
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` for a malformed door, time, offset or jurisdiction.
    pub fn set_records_site(&self, c: &Caller, site: Site) -> Result<Site, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some("site".into());
            site.check()?;
            Ok((
                vec![self.put(SITE, "site", "active", "site", &site)?],
                site.clone(),
            ))
        })
    }

    /// `GET /api/records/rooms`.
    ///
    /// # Errors
    /// Denied.
    pub fn records_rooms(&self, c: &Caller) -> Result<Vec<Room>, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "rooms".into())?;
        self.rows(ROOM)
    }

    /// `PUT /api/records/rooms/{id}`: creates or replaces a storage room (its access list,
    /// cabinets, door, cameras). A cabinet that still holds volumes cannot be removed.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` naming the bad field, `Duplicate` when a removed
    /// cabinet holds volumes.
    pub fn put_records_room(&self, c: &Caller, room: Room) -> Result<Room, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some(format!(
                "room={} authorized={}",
                room.id.chars().take(64).collect::<String>(),
                room.authorized.join(",")
            ));
            room.check().map_err(refused)?;
            let vols: Vec<Volume> = self.rows(VOLUME)?;
            if let Some(v) = vols.iter().find(|v| {
                v.room == room.id
                    && v.status != VolumeStatus::Destroyed
                    && !room.cabinets.iter().any(|c| c.id == v.cabinet)
            }) {
                return Err(VaultError::Duplicate(format!(
                    "cabinet {} still holds volume {}; move it first",
                    v.cabinet, v.barcode
                )));
            }
            Ok((
                vec![self.put(ROOM, &room.id, "active", &room.id, &room)?],
                room.clone(),
            ))
        })
    }

    /// Reads the dates the retention rules need for the charts in `only` (all charts when
    /// `None`): each Patient's birth date and its newest Encounter. The caller's decision on
    /// `op` permits the reads; `rec` records them.
    fn chart_dates(
        &self,
        c: &Caller,
        op: Operation,
        rec: &mut AuditRecord,
        only: Option<&PatientId>,
    ) -> Result<BTreeMap<String, RecordDates>, VaultError> {
        let decision = self.decide_operation(c, op);
        let mut out: BTreeMap<String, RecordDates> = BTreeMap::new();
        let date_of = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .and_then(|s| s.get(..10))
                .and_then(|s| medvault_governance::retention::date("d", s).ok())
        };
        for rtype in ["Patient", "Encounter"] {
            let mut after = None;
            loop {
                let page = self.store.search(&SearchQuery {
                    rtype: Some(rtype.into()),
                    patient: only.cloned(),
                    order: Order::Id,
                    after: after.clone(),
                    limit: 500,
                    ..Default::default()
                })?;
                let more = page.more;
                if let Some(last) = page.rows.last() {
                    after = Some(vec![last.rtype().to_owned(), last.id().to_owned()]);
                }
                let mut permitted = vec![];
                for r in page.rows {
                    if r.deleted() {
                        continue;
                    }
                    permitted.push(
                        crate::typestate::permit(&decision, r, rec)
                            .map_err(|_| VaultError::Forbidden { withheld: vec![] })?,
                    );
                }
                for d in self.open_all(permitted)? {
                    let Some(j) = d.json() else { continue };
                    let Some(p) = d.patient().map(|p| p.to_string()) else {
                        continue;
                    };
                    let e = out.entry(p).or_default();
                    if rtype == "Patient" {
                        e.born = date_of(j.get("birthDate"));
                    } else {
                        let period = j.get("period");
                        let when = date_of(period.and_then(|p| p.get("end")))
                            .or_else(|| date_of(period.and_then(|p| p.get("start"))));
                        if when > e.last_encounter {
                            e.last_encounter = when;
                        }
                    }
                }
                if !more {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The active schedules: shipped defaults, replaced by approved ones.
    fn active_schedules(&self) -> Result<Vec<ScheduleView>, VaultError> {
        let stored: Vec<ScheduleView> = self.rows(SCHEDULE)?;
        let mut out: BTreeMap<String, ScheduleView> = rules::default_schedules()
            .into_iter()
            .map(|s| {
                (
                    s.key(),
                    ScheduleView {
                        id: s.key(),
                        schedule: s,
                        status: "shipped".into(),
                        proposed_by: String::new(),
                        proposed_at: 0,
                        approved_by: None,
                        approved_at: None,
                    },
                )
            })
            .collect();
        for s in stored.into_iter().filter(|s| s.status == "active") {
            out.insert(s.schedule.key(), s);
        }
        Ok(out.into_values().collect())
    }

    /// `GET /api/retention/schedules`: those in force (shipped or approved) and those
    /// proposed, waiting for a second person.
    ///
    /// # Errors
    /// Denied.
    pub fn retention_schedules(&self, c: &Caller) -> Result<Vec<ScheduleView>, VaultError> {
        self.registry_read(c, Operation::RetentionRead, "schedules".into())?;
        let mut out = self.active_schedules()?;
        let stored: Vec<ScheduleView> = self.rows(SCHEDULE)?;
        out.extend(stored.into_iter().filter(|s| s.status == "proposed"));
        Ok(out)
    }

    /// `POST /api/retention/schedules`: proposes a schedule (new jurisdiction or class, or
    /// a change); in force once a second person approves it.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` for a schedule that does not check.
    pub fn propose_schedule(&self, c: &Caller, s: Schedule) -> Result<ScheduleView, VaultError> {
        self.registry_act(c, Operation::RetentionPropose, |rec| {
            rec.detail = Some(format!("schedule={} years={}", s.key(), s.years));
            s.check().map_err(refused)?;
            let view = ScheduleView {
                id: medvault_types::random_uuid(),
                schedule: s.clone(),
                status: "proposed".into(),
                proposed_by: c.actor().to_owned(),
                proposed_at: self.now_unix(),
                approved_by: None,
                approved_at: None,
            };
            rec.detail = Some(format!(
                "schedule={} proposal={} years={}{}",
                s.key(),
                view.id,
                s.years,
                s.until_age
                    .map(|a| format!(" until_age={a}"))
                    .unwrap_or_default()
            ));
            Ok((
                vec![self.put(SCHEDULE, &view.id, "proposed", &s.key(), &view)?],
                view,
            ))
        })
    }

    /// `POST /api/retention/schedules/{id}/approve`: a second person puts a proposed
    /// schedule in force (the one it replaces is superseded).
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `SeparationOfDuties` (the proposer), `Duplicate` (not
    /// proposed).
    pub fn approve_schedule(&self, c: &Caller, id: &str) -> Result<ScheduleView, VaultError> {
        self.registry_act(c, Operation::RetentionApprove, |rec| {
            rec.detail = Some(format!("proposal={}", id.chars().take(64).collect::<String>()));
            let mut view: ScheduleView = self.row(SCHEDULE, id)?.ok_or(VaultError::NotFound)?;
            if view.status != "proposed" {
                return Err(VaultError::Duplicate(format!(
                    "this schedule is {}, not proposed",
                    view.status
                )));
            }
            if !gov::second_person(&view.proposed_by, c.actor()) {
                return Err(VaultError::SeparationOfDuties(
                    "a retention schedule is approved by someone other than the person who proposed it",
                ));
            }
            let mut ops = vec![];
            let stored: Vec<ScheduleView> = self.rows(SCHEDULE)?;
            for mut old in stored
                .into_iter()
                .filter(|o| o.status == "active" && o.schedule.key() == view.schedule.key())
            {
                old.status = "superseded".into();
                ops.push(self.put(SCHEDULE, &old.id, "superseded", &old.schedule.key(), &old)?);
            }
            view.status = "active".into();
            view.approved_by = Some(c.actor().to_owned());
            view.approved_at = Some(self.now_unix());
            rec.detail = Some(format!(
                "schedule={} proposal={id} proposed_by={}",
                view.schedule.key(),
                view.proposed_by
            ));
            ops.push(self.put(SCHEDULE, id, "active", &view.schedule.key(), &view)?);
            Ok((ops, view))
        })
    }

    /// Every active hold, of any scope.
    fn active_holds_all(&self) -> Result<Vec<HoldView>, VaultError> {
        let mut out: Vec<HoldView> = self
            .rows::<HoldView>(HOLD)?
            .into_iter()
            .filter(|h| h.active)
            .collect();
        for h in self.store.legal_holds(None)? {
            if h.released_at == 0 {
                out.push(HoldView {
                    id: h.id.clone(),
                    scope: HoldScope::Patient(h.patient.to_string()),
                    matter: h.matter.clone(),
                    reason: None,
                    set_by: h.set_by.clone(),
                    set_at: h.set_at,
                    active: true,
                    released_by: None,
                    released_at: None,
                });
            }
        }
        Ok(out)
    }

    /// The classes of records an electronic chart holds: its chart class, and billing
    /// and imaging when it holds such resources.
    fn electronic_classes(
        &self,
        pid: &PatientId,
        dates: &RecordDates,
        today: Date,
    ) -> Result<Vec<RecordClass>, VaultError> {
        let mut out = vec![rules::chart_class(dates.born, dates.last_encounter, today)];
        let census = self.store.chart_census(pid)?;
        let has = |types: &[&str]| {
            census
                .iter()
                .any(|(t, n, _)| *n > 0 && types.contains(&t.as_str()))
        };
        if has(&[
            "Claim",
            "ExplanationOfBenefit",
            "Coverage",
            "Account",
            "Invoice",
            "ChargeItem",
        ]) {
            out.push(RecordClass::Billing);
        }
        if has(&["ImagingStudy"]) {
            out.push(RecordClass::Imaging);
        }
        Ok(out)
    }

    /// The active holds that stop destroying an electronic chart: on the patient, or on a
    /// class of records it holds. Used by the chart destruction itself (its caller's
    /// decision on `op` permits reading the dates). Returns the holds, the holds' version
    /// and the guard to commit with (a hold placed meanwhile fails the commit; see
    /// [`Vault::holds_moved`]).
    pub(crate) fn holds_on_chart(
        &self,
        c: &Caller,
        op: Operation,
        rec: &mut AuditRecord,
        pid: &PatientId,
    ) -> Result<(Vec<HoldView>, u64, Op), VaultError> {
        let version = self.counter(HOLDS_VERSION)?;
        let guard = Op::RequireMetaListed {
            key: HOLDS_VERSION.into(),
            member: version.to_string(),
            absent: "0".into(),
        };
        let holds = self.active_holds_all()?;
        // The patient's paper volumes: a hold on one of them, or on its class, keeps the
        // patient's records — the electronic chart too (a hold blocks destruction
        // everywhere).
        let volumes: Vec<Volume> = self
            .rows::<Volume>(VOLUME)?
            .into_iter()
            .filter(|v| v.patient == pid.as_str() && v.status != VolumeStatus::Destroyed)
            .collect();
        let on_paper: Vec<HoldView> = holds
            .iter()
            .filter(|h| {
                !matches!(h.scope, HoldScope::Patient(_))
                    && volumes
                        .iter()
                        .any(|v| h.scope.covers(&v.patient, v.record_class, Some(&v.barcode)))
            })
            .cloned()
            .collect();
        if !on_paper.is_empty()
            || !holds
                .iter()
                .any(|h| matches!(h.scope, HoldScope::RecordClass(_)))
        {
            return Ok((on_paper, version, guard));
        }
        let dates = self
            .chart_dates(c, op, rec, Some(pid))?
            .remove(pid.as_str())
            .unwrap_or_default();
        let today = self.site()?.today(self.now_unix())?;
        let classes = self.electronic_classes(pid, &dates, today)?;
        Ok((
            holds
                .into_iter()
                .filter(|h| matches!(&h.scope, HoldScope::RecordClass(k) if classes.contains(k)))
                .collect(),
            version,
            guard,
        ))
    }

    /// `GET /api/retention/due[?jurisdiction=J]` and `medvault retention evaluate --json`:
    /// every electronic chart and paper volume with the date it becomes eligible for
    /// destruction, whether it is now, the rule that decided and the holds that stop it;
    /// soonest first. Reading the charts' birth dates and encounters is audited.
    ///
    /// # Errors
    /// Denied; `BadRequest` for a bad jurisdiction.
    pub fn retention_due(
        &self,
        c: &Caller,
        jurisdiction: Option<&str>,
    ) -> Result<Vec<DueItem>, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::RetentionRead, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let site = self.site()?;
        let j = match jurisdiction.map(str::trim).filter(|j| !j.is_empty()) {
            Some(j) => rules::ident("jurisdiction", j).map_err(refused)?.to_owned(),
            None => site.jurisdiction.clone(),
        };
        rec.detail = Some(format!(
            "due list jurisdiction={j}: Patient.birthDate, Encounter.period"
        ));
        let dates = match self.chart_dates(c, Operation::RetentionRead, &mut rec, None) {
            Ok(d) => d,
            Err(e) => {
                rec.outcome = Outcome::Failure;
                self.audit(vec![rec])?;
                return Err(e);
            }
        };
        self.audit(vec![rec])?;
        let today = site.today(self.now_unix())?;
        let schedules: Vec<Schedule> = self
            .active_schedules()?
            .into_iter()
            .map(|s| s.schedule)
            .collect();
        let holds = self.active_holds_all()?;
        let covering = |patient: &str, class: RecordClass, volume: Option<&str>| -> Vec<String> {
            holds
                .iter()
                .filter(|h| h.scope.covers(patient, class, volume))
                .map(|h| h.id.clone())
                .collect()
        };
        let mut out = vec![];
        for (p, d) in &dates {
            let Ok(pid) = PatientId::new(p) else { continue };
            let classes = self.electronic_classes(&pid, d, today)?;
            let held: BTreeSet<String> =
                classes.iter().flat_map(|k| covering(p, *k, None)).collect();
            let class = classes.first().copied().unwrap_or(RecordClass::AdultChart);
            let verdict = if !held.is_empty() {
                held_verdict()
            } else if d.last_encounter.is_none() {
                Verdict {
                    destroy_eligible: false,
                    destroy_eligible_from: None,
                    retain_until: None,
                    rule: "no encounter on record: nothing has started the retention period".into(),
                }
            } else {
                rules::schedule_for(&schedules, &j, class)
                    .evaluate(d, false, today)
                    .unwrap_or_else(|m| Verdict {
                        destroy_eligible: false,
                        destroy_eligible_from: None,
                        retain_until: None,
                        rule: m,
                    })
            };
            out.push(DueItem {
                medium: "electronic".into(),
                patient: p.clone(),
                barcode: None,
                record_class: class,
                verdict,
                holds: held.into_iter().collect(),
            });
        }
        for v in self.rows::<Volume>(VOLUME)? {
            if v.status == VolumeStatus::Destroyed {
                continue;
            }
            let mut d = dates.get(&v.patient).copied().unwrap_or_default();
            let entry = v
                .last_entry
                .as_deref()
                .and_then(|s| medvault_governance::retention::date("last_entry", s).ok());
            if entry > d.last_encounter {
                d.last_encounter = entry;
            }
            let held = covering(&v.patient, v.record_class, Some(&v.barcode));
            let verdict = if !held.is_empty() {
                held_verdict()
            } else if d.last_encounter.is_none() {
                Verdict {
                    destroy_eligible: false,
                    destroy_eligible_from: None,
                    retain_until: None,
                    rule: "no encounter or last entry on record: nothing has started the retention period".into(),
                }
            } else {
                rules::schedule_for(&schedules, &j, v.record_class)
                    .evaluate(&d, false, today)
                    .unwrap_or_else(|m| Verdict {
                        destroy_eligible: false,
                        destroy_eligible_from: None,
                        retain_until: None,
                        rule: m,
                    })
            };
            out.push(DueItem {
                medium: "paper".into(),
                patient: v.patient.clone(),
                barcode: Some(v.barcode.clone()),
                record_class: v.record_class,
                verdict,
                holds: held,
            });
        }
        out.sort_by(|a, b| {
            let key = |i: &DueItem| {
                (
                    i.verdict.destroy_eligible_from.is_none(),
                    i.verdict.destroy_eligible_from.clone(),
                    i.patient.clone(),
                    i.barcode.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        Ok(out)
    }

    /// `POST /api/records/holds {"scope","target","matter","reason"}` (security
    /// administrator, step-up): a legal hold on a record class or a paper volume (a
    /// patient's hold is the chart's, [`Vault::set_legal_hold`]).
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` (scope, matter, reason), `NotFound` (no such volume).
    pub fn set_records_hold(
        &self,
        c: &Caller,
        scope: HoldScope,
        matter: &str,
        reason: &str,
    ) -> Result<HoldView, VaultError> {
        if let HoldScope::Patient(p) = &scope {
            let h = self.set_legal_hold(c, p, matter, reason)?;
            return Ok(HoldView {
                id: h.id,
                scope,
                matter: h.matter,
                reason: h.reason,
                set_by: h.set_by,
                set_at: h.set_at,
                active: true,
                released_by: None,
                released_at: None,
            });
        }
        self.registry_act(c, Operation::LegalHoldSet, |rec| {
            rec.detail = Some(format!(
                "hold on {}",
                scope.subject().chars().take(80).collect::<String>()
            ));
            let matter = rules::line("matter", matter, 200).map_err(refused)?;
            let reason = rules::line("reason", reason, TEXT_CHARS).map_err(refused)?;
            if reason.chars().count() < 3 {
                return Err(bad("a reason of 3 to 2000 characters is required"));
            }
            if let HoldScope::Volume(b) = &scope {
                let v: Volume = self.row(VOLUME, b)?.ok_or(VaultError::NotFound)?;
                rec.patient = Some(v.patient);
            }
            let view = HoldView {
                id: medvault_types::random_uuid(),
                scope: scope.clone(),
                matter: matter.to_owned(),
                reason: Some(reason.to_owned()),
                set_by: c.actor().to_owned(),
                set_at: self.now_unix(),
                active: true,
                released_by: None,
                released_at: None,
            };
            rec.detail = Some(format!(
                "hold={} on {} matter={matter}",
                view.id,
                scope.subject()
            ));
            Ok((
                [
                    self.bump_holds()?,
                    vec![self.put(HOLD, &view.id, "active", &scope.subject(), &view)?],
                ]
                .concat(),
                view,
            ))
        })
    }

    /// `POST /api/records/holds/{id}/release` (security administrator, step-up): releases
    /// a hold of any scope.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `Duplicate` (already released).
    pub fn release_records_hold(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        if self.row::<HoldView>(HOLD, id)?.is_none() {
            return self.release_legal_hold(c, id);
        }
        self.registry_act(c, Operation::LegalHoldRelease, |rec| {
            rec.detail = Some(format!("hold={id}"));
            let mut h: HoldView = self.row(HOLD, id)?.ok_or(VaultError::NotFound)?;
            if !h.active {
                return Err(VaultError::Duplicate(
                    "this legal hold was already released".into(),
                ));
            }
            h.active = false;
            h.released_by = Some(c.actor().to_owned());
            h.released_at = Some(self.now_unix());
            Ok((
                [
                    self.bump_holds()?,
                    vec![self.put(HOLD, id, "released", &h.scope.subject(), &h)?],
                ]
                .concat(),
                (),
            ))
        })
    }

    /// `GET /api/records/holds`: every hold of every scope, newest first.
    ///
    /// # Errors
    /// Denied.
    pub fn records_holds(&self, c: &Caller) -> Result<Vec<HoldView>, VaultError> {
        let mut out: Vec<HoldView> = self.rows(HOLD)?;
        for h in self.legal_holds(c, None)? {
            out.push(HoldView {
                id: h.id,
                scope: HoldScope::Patient(h.patient),
                matter: h.matter,
                reason: h.reason,
                set_by: h.set_by,
                set_at: h.set_at,
                active: h.active,
                released_by: h.released_by,
                released_at: h.released_at,
            });
        }
        out.sort_by_key(|x| std::cmp::Reverse(x.set_at));
        Ok(out)
    }

    /// `POST /api/records/volumes`: registers a paper volume of a patient's chart in a
    /// room's cabinet.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` (fields; no such room or cabinet; no such chart),
    /// `Duplicate` (the barcode is taken).
    pub fn register_volume(&self, c: &Caller, n: NewVolume) -> Result<Volume, VaultError> {
        self.registry_act(c, Operation::RecordsCustody, |rec| {
            rec.detail = Some(format!(
                "volume={}",
                n.barcode.chars().take(64).collect::<String>()
            ));
            let pid = PatientId::new(n.patient.trim())
                .map_err(|_| bad("`patient` must be a Patient id"))?;
            rec.patient = Some(pid.to_string());
            let barcode = rules::ident("barcode", &n.barcode).map_err(refused)?;
            if self.store.governance_record(VOLUME, barcode)?.is_some() {
                return Err(VaultError::Duplicate(format!(
                    "barcode {barcode} is already registered"
                )));
            }
            if self.store.patient_key(&pid)?.is_none() {
                return Err(bad(format!(
                    "no electronic chart {pid}: register the patient first"
                )));
            }
            let room: Room = self.row(ROOM, n.room.trim())?.ok_or_else(|| {
                bad(format!(
                    "no storage room `{}`",
                    n.room.chars().take(64).collect::<String>()
                ))
            })?;
            let class = match n.record_class {
                Some(k) => k,
                None => {
                    let dates = self
                        .chart_dates(c, Operation::RecordsCustody, rec, Some(&pid))?
                        .remove(pid.as_str())
                        .unwrap_or_default();
                    rules::chart_class(
                        dates.born,
                        dates.last_encounter,
                        self.site()?.today(self.now_unix())?,
                    )
                }
            };
            let mut v = Volume::register(
                barcode,
                pid.as_str(),
                n.volume,
                class,
                (&room, n.cabinet.trim()),
                c.actor(),
                self.now_unix(),
            )
            .map_err(refused)?;
            if let Some(d) = n.last_entry.as_deref() {
                let when = medvault_governance::retention::date("last_entry", d).map_err(bad)?;
                if when > self.site()?.today(self.now_unix())? {
                    return Err(bad("`last_entry` is in the future"));
                }
                v.last_entry = Some(d.trim().to_owned());
            }
            rec.detail = Some(format!(
                "volume={barcode} registered in {}/{}",
                v.room, v.cabinet
            ));
            Ok((
                vec![self.put(VOLUME, barcode, v.status.as_str(), &v.patient, &v)?],
                v,
            ))
        })
    }

    fn volume_view(&self, v: Volume) -> Result<VolumeView, VaultError> {
        let holds = self
            .active_holds_all()?
            .into_iter()
            .filter(|h| h.scope.covers(&v.patient, v.record_class, Some(&v.barcode)))
            .collect();
        let flags = self
            .rows::<FlagView>(FLAG)?
            .into_iter()
            .filter(|f| f.flag.target == v.barcode)
            .collect();
        Ok(VolumeView {
            overdue: v.overdue(self.now_unix()),
            volume: v,
            holds,
            flags,
        })
    }

    /// `GET /api/records/volumes/{barcode}` and `medvault charts scan BARCODE`: one volume
    /// with its custody chain, holds and flags (the scanner's lookup, audited).
    ///
    /// # Errors
    /// Denied, `NotFound` (unknown barcode).
    pub fn scan_volume(&self, c: &Caller, barcode: &str) -> Result<VolumeView, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::RecordsRead, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!(
            "scan volume={}",
            barcode.chars().take(64).collect::<String>()
        ));
        let found = rules::ident("barcode", barcode)
            .ok()
            .map(|b| self.row::<Volume>(VOLUME, b))
            .transpose()?
            .flatten();
        let Some(v) = found else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = Some(v.patient.clone());
        self.audit(vec![rec])?;
        self.volume_view(v)
    }

    /// `GET /api/records/volumes[?patient=ID]`: every volume, by barcode.
    ///
    /// # Errors
    /// Denied.
    pub fn volumes(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<Vec<VolumeView>, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "volumes".into())?;
        self.rows::<Volume>(VOLUME)?
            .into_iter()
            .filter(|v| patient.is_none_or(|p| v.patient == p))
            .map(|v| self.volume_view(v))
            .collect()
    }

    /// `POST /api/records/volumes/{barcode}/custody`: check-out, return, transfer, missing
    /// or found. A check-out is correlated with the room's access list and the badge log
    /// (flags are stored, audited and logged as alerts); a missing volume opens an
    /// incident.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound` (unknown barcode), `BadRequest` (fields, dates),
    /// `Duplicate` (double check-out, return by someone else, not checked out, …). A
    /// refused act changes nothing.
    pub fn volume_custody(
        &self,
        c: &Caller,
        barcode: &str,
        act: CustodyAct,
    ) -> Result<VolumeView, VaultError> {
        let v = self.registry_act(c, Operation::RecordsCustody, |rec| {
            rec.detail = Some(format!("volume={}", barcode.chars().take(64).collect::<String>()));
            let barcode = rules::ident("barcode", barcode).map_err(refused)?;
            let mut v: Volume = self.row(VOLUME, barcode)?.ok_or(VaultError::NotFound)?;
            rec.patient = Some(v.patient.clone());
            let now = self.now_unix();
            let site = self.site()?;
            let me = c.actor();
            let mut ops = vec![];
            let e: CustodyEvent = match act {
                CustodyAct::CheckOut {
                    to,
                    department,
                    due,
                    retrieved_by,
                } => {
                    let to = custodian(to, department)?;
                    let due = site.when("due", &due)?;
                    let by = match retrieved_by.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                        Some(r) => rules::ident("retrieved_by", r).map_err(refused)?.to_owned(),
                        None => me.to_owned(),
                    };
                    let e = v.check_out(to, due, &by, me, now).map_err(refused)?;
                    let room: Option<Room> = self.row(ROOM, &v.room)?;
                    if let Some(room) = room {
                        let badges: Vec<BadgeEvent> = self
                            .rows::<Vec<BadgeEvent>>(BADGES)?
                            .into_iter()
                            .flatten()
                            .filter(|b| b.user == by)
                            .collect();
                        for f in rules::correlate_retrieval(&by, &v.barcode, &room, now, &badges, &site.perimeter_doors) {
                            let id = medvault_types::random_uuid();
                            tracing::warn!(target: "medvault::alert", kind = %f.kind, volume = %v.barcode, user = %by, "paper chart retrieval flagged");
                            let subject = f.subject.clone();
                            ops.push(self.put(FLAG, &id, "open", &subject, &FlagView { id: id.clone(), flag: f })?);
                        }
                    }
                    e
                }
                CustodyAct::Return { returned_by } => {
                    let r = rules::ident("returned_by", &returned_by).map_err(refused)?;
                    v.check_in(r, me, now).map_err(refused)?
                }
                CustodyAct::Transfer { to, department, due } => {
                    let to = custodian(to, department)?;
                    let due = due
                        .as_deref()
                        .filter(|d| !d.trim().is_empty())
                        .map(|d| site.when("due", d))
                        .transpose()?;
                    v.transfer(to, due, me, now).map_err(refused)?
                }
                CustodyAct::Missing { note } => {
                    let note = rules::line("note", &note, TEXT_CHARS).map_err(refused)?;
                    let e = v.mark_missing(note, me, now).map_err(refused)?;
                    let incident_id = medvault_types::random_uuid();
                    let mut i = Incident::open(
                        &incident_id,
                        IncidentSource::MissingChart {
                            barcode: v.barcode.clone(),
                        },
                        vec![v.patient.clone()],
                        me,
                        now,
                    );
                    i.record(now, me, &format!("paper volume {} declared missing", v.barcode));
                    ops.push(Op::PutIncident(crate::break_glass::incident_row(&i)?));
                    tracing::warn!(target: "medvault::alert", volume = %v.barcode, incident = %incident_id, "paper chart missing");
                    let mut e = e;
                    e.note = format!("{note} (incident {incident_id})");
                    if let Some(last) = v.custody.iter_mut().rev().find(|x| x.action == "missing") {
                        last.note = e.note.clone();
                    }
                    e
                }
                CustodyAct::Found { note } => {
                    let note = rules::line("note", &note, TEXT_CHARS).map_err(refused)?;
                    v.found(note, me, now).map_err(refused)?
                }
            };
            let flags = ops.len();
            rec.detail = Some(format!(
                "volume={} {}{}{}{}",
                v.barcode,
                e.action,
                e.to.as_deref().map(|t| format!(" to={t}")).unwrap_or_default(),
                e.retrieved_by.as_deref().map(|t| format!(" retrieved_by={t}")).unwrap_or_default(),
                if e.action == "checked_out" && flags > 0 {
                    format!(" flags={flags}")
                } else {
                    String::new()
                }
            ));
            if e.action == "missing" {
                rec.detail = Some(format!("volume={} missing; {}", v.barcode, e.note));
            }
            ops.push(self.put(VOLUME, &v.barcode, v.status.as_str(), &v.patient, &v)?);
            Ok((ops, v))
        })?;
        self.volume_view(v)
    }

    /// `POST /api/records/badge-events` (CSV `time,user,door,direction,granted`): imports
    /// the door system's export for correlation. Returns how many events were imported.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` naming the first bad line (nothing is imported).
    pub fn import_badge_events(&self, c: &Caller, csv: &str) -> Result<usize, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some("badge import".into());
            let events = rules::parse_badge_csv(csv).map_err(refused)?;
            rec.detail = Some(format!("badge import events={}", events.len()));
            let id = medvault_types::random_uuid();
            Ok((
                vec![self.put(BADGES, &id, "imported", "badges", &events)?],
                events.len(),
            ))
        })
    }

    /// `GET /api/records/keys`.
    ///
    /// # Errors
    /// Denied.
    pub fn records_keys(&self, c: &Caller) -> Result<Vec<KeyItem>, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "keys".into())?;
        self.rows(KEY)
    }

    /// `POST /api/records/keys {"id","kind","room","cabinet"}`: a new key or combination
    /// lock in the register.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest`, `Duplicate` (the id is taken).
    pub fn add_records_key(&self, c: &Caller, k: KeyItem) -> Result<KeyItem, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some(format!("key={}", k.id.chars().take(64).collect::<String>()));
            rules::ident("id", &k.id).map_err(refused)?;
            if !matches!(k.kind.as_str(), "key" | "combination") {
                return Err(bad("`kind` is key or combination"));
            }
            let room: Room = self
                .row(ROOM, &k.room)?
                .ok_or_else(|| bad("no such storage room"))?;
            if let Some(cab) = &k.cabinet {
                if !room.cabinets.iter().any(|x| &x.id == cab) {
                    return Err(bad(format!("room {} has no cabinet `{cab}`", room.id)));
                }
            }
            if self.store.governance_record(KEY, &k.id)?.is_some() {
                return Err(VaultError::Duplicate(format!(
                    "key {} is already registered",
                    k.id
                )));
            }
            let k = KeyItem {
                holders: vec![],
                history: vec![],
                ..k
            };
            Ok((vec![self.put(KEY, &k.id, "active", &k.room, &k)?], k))
        })
    }

    /// `POST /api/records/keys/{id}/custody`: issue, return, or change a combination.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `Duplicate` (issued already, not issued), `BadRequest`.
    pub fn records_key_act(
        &self,
        c: &Caller,
        id: &str,
        act: KeyAct,
    ) -> Result<KeyItem, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some(format!("key={}", id.chars().take(64).collect::<String>()));
            let mut k: KeyItem = self.row(KEY, id)?.ok_or(VaultError::NotFound)?;
            let now = self.now_unix();
            let what = match act {
                KeyAct::Issue { to } => {
                    let to = rules::ident("to", &to).map_err(refused)?;
                    k.issue(to, c.actor(), now).map_err(refused)?;
                    format!("issued to={to}")
                }
                KeyAct::Return => {
                    k.give_back(c.actor(), now).map_err(refused)?;
                    "returned".to_owned()
                }
                KeyAct::ChangeCombination { known_by } => {
                    for u in &known_by {
                        rules::ident("known_by", u).map_err(refused)?;
                    }
                    let n = known_by.len();
                    k.change_combination(known_by, c.actor(), now)
                        .map_err(refused)?;
                    format!("combination changed known_by={n}")
                }
            };
            rec.detail = Some(format!("key={id} {what}"));
            Ok((vec![self.put(KEY, id, "active", &k.room, &k)?], k))
        })
    }

    /// `POST /api/records/footage-reviews`: a camera footage review logged against an
    /// incident (added to its timeline).
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` (fields, times, a room without cameras, footage
    /// already overwritten), `NotFound` (no such incident).
    pub fn log_footage_review(
        &self,
        c: &Caller,
        r: FootageReview,
    ) -> Result<FootageReview, VaultError> {
        self.registry_act(c, Operation::RecordsManage, |rec| {
            rec.detail = Some(format!(
                "footage review incident={}",
                r.incident.chars().take(64).collect::<String>()
            ));
            let room: Room = self
                .row(ROOM, r.room.trim())?
                .ok_or_else(|| bad("no such storage room"))?;
            let Some(cams) = &room.cameras else {
                return Err(bad(format!("room {} records no camera coverage", room.id)));
            };
            let t = |f: &str, v: &str| {
                OffsetDateTime::parse(v.trim(), &time::format_description::well_known::Rfc3339)
                    .map(|t| t.unix_timestamp())
                    .map_err(|_| bad(format!("`{f}` must be RFC 3339")))
            };
            let (from, to) = (t("from", &r.from)?, t("to", &r.to)?);
            let now = self.now_unix();
            if to < from {
                return Err(bad("`to` is before `from`"));
            }
            if now - from > i64::from(cams.footage_retention_days) * 86_400 {
                return Err(bad(format!(
                    "footage of room {} is kept {} days; that stretch is already overwritten",
                    room.id, cams.footage_retention_days
                )));
            }
            let finding = rules::line("finding", &r.finding, TEXT_CHARS).map_err(refused)?;
            let row = self
                .store
                .incidents()?
                .into_iter()
                .find(|i| i.id == r.incident.trim())
                .ok_or(VaultError::NotFound)?;
            let mut incident: Incident = serde_json::from_str(&row.body)
                .map_err(|e| VaultError::Internal(format!("stored incident: {e}")))?;
            let review = FootageReview {
                id: medvault_types::random_uuid(),
                room: room.id.clone(),
                incident: incident.id.clone(),
                from: r.from.trim().to_owned(),
                to: r.to.trim().to_owned(),
                finding: finding.to_owned(),
                reviewer: c.actor().to_owned(),
                at: now,
            };
            incident.record(
                now,
                c.actor(),
                &format!(
                    "camera footage of room {} reviewed ({} to {})",
                    room.id, review.from, review.to
                ),
            );
            rec.detail = Some(format!(
                "footage review={} room={} incident={}",
                review.id, room.id, incident.id
            ));
            Ok((
                vec![
                    self.put(FOOTAGE, &review.id, "logged", &incident.id, &review)?,
                    Op::PutIncident(crate::break_glass::incident_row(&incident)?),
                ],
                review,
            ))
        })
    }

    /// `GET /api/records/footage-reviews`.
    ///
    /// # Errors
    /// Denied.
    pub fn footage_reviews(&self, c: &Caller) -> Result<Vec<FootageReview>, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "footage reviews".into())?;
        let mut out: Vec<FootageReview> = self.rows(FOOTAGE)?;
        out.sort_by_key(|x| std::cmp::Reverse(x.at));
        Ok(out)
    }

    /// `POST /api/records/visitors`: signs a visitor in to a records area.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` (fields; identity not checked; no such room).
    pub fn sign_in_visitor(&self, c: &Caller, n: NewVisitor) -> Result<VisitorView, VaultError> {
        let v = self.registry_act(c, Operation::RecordsCustody, |rec| {
            rec.detail = Some("visitor sign-in".into());
            if !n.identity_checked {
                return Err(bad(
                    "check the visitor's identity document first (identity_checked)",
                ));
            }
            let name = rules::line("name", &n.name, 120).map_err(refused)?;
            let identity = rules::line("identity", &n.identity, 120).map_err(refused)?;
            let host = rules::ident("host", &n.host).map_err(refused)?;
            let purpose = rules::line("purpose", &n.purpose, 200).map_err(refused)?;
            let escort = n
                .escort
                .as_deref()
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| rules::ident("escort", e).map(str::to_owned))
                .transpose()
                .map_err(refused)?;
            if self.store.governance_record(ROOM, n.room.trim())?.is_none() {
                return Err(bad("no such storage room"));
            }
            let v = Visitor {
                id: medvault_types::random_uuid(),
                name: name.to_owned(),
                identity: identity.to_owned(),
                host: host.to_owned(),
                purpose: purpose.to_owned(),
                escort,
                room: n.room.trim().to_owned(),
                time_in: self.now_unix(),
                time_out: None,
                signed_in_by: c.actor().to_owned(),
            };
            rec.detail = Some(format!(
                "visitor={} in room={} host={host} escort={}",
                v.id,
                v.room,
                v.escort.as_deref().unwrap_or("none")
            ));
            Ok((vec![self.put(VISITOR, &v.id, "in", &v.room, &v)?], v))
        })?;
        self.visitor_view(v)
    }

    fn visitor_view(&self, v: Visitor) -> Result<VisitorView, VaultError> {
        let now = self.now_unix();
        let closing = self.site()?.closing_at(now)?;
        Ok(VisitorView {
            flags: rules::visitor_flags(&v, now, closing),
            visitor: v,
        })
    }

    /// `POST /api/records/visitors/{id}/sign-out`.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `Duplicate` (signed out already).
    pub fn sign_out_visitor(&self, c: &Caller, id: &str) -> Result<VisitorView, VaultError> {
        let v = self.registry_act(c, Operation::RecordsCustody, |rec| {
            rec.detail = Some(format!(
                "visitor={} sign-out",
                id.chars().take(64).collect::<String>()
            ));
            let mut v: Visitor = self.row(VISITOR, id)?.ok_or(VaultError::NotFound)?;
            if v.time_out.is_some() {
                return Err(VaultError::Duplicate(
                    "this visitor already signed out".into(),
                ));
            }
            v.time_out = Some(self.now_unix());
            Ok((vec![self.put(VISITOR, id, "out", &v.room, &v)?], v))
        })?;
        self.visitor_view(v)
    }

    /// `GET /api/records/visitors`: the visitor log, newest first, with today's flags.
    ///
    /// # Errors
    /// Denied.
    pub fn visitors(&self, c: &Caller) -> Result<Vec<VisitorView>, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "visitor log".into())?;
        let mut out = self
            .rows::<Visitor>(VISITOR)?
            .into_iter()
            .map(|v| self.visitor_view(v))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|x| std::cmp::Reverse(x.visitor.time_in));
        Ok(out)
    }

    /// `GET /api/records/dashboard`: overdue and missing volumes, flagged retrievals, and
    /// visitors flagged now.
    ///
    /// # Errors
    /// Denied.
    pub fn records_dashboard(&self, c: &Caller) -> Result<Dashboard, VaultError> {
        self.registry_read(c, Operation::RecordsRead, "dashboard".into())?;
        let now = self.now_unix();
        let vols: Vec<Volume> = self.rows(VOLUME)?;
        let mut flags: Vec<FlagView> = self.rows(FLAG)?;
        flags.sort_by_key(|x| std::cmp::Reverse(x.flag.at));
        let visitors = self
            .rows::<Visitor>(VISITOR)?
            .into_iter()
            .filter(|v| v.time_out.is_none())
            .map(|v| self.visitor_view(v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dashboard {
            overdue: vols.iter().filter(|v| v.overdue(now)).cloned().collect(),
            missing: vols
                .iter()
                .filter(|v| v.status == VolumeStatus::Missing)
                .cloned()
                .collect(),
            flags,
            visitors,
            checked_out: vols
                .iter()
                .filter(|v| v.status == VolumeStatus::CheckedOut)
                .count(),
            in_storage: vols
                .iter()
                .filter(|v| v.status == VolumeStatus::InStorage)
                .count(),
        })
    }

    /// `POST /api/records/destruction`: asks for the destruction of paper volumes of one
    /// patient (the NIST SP 800-88 method, vendor, witness and date); nothing happens until
    /// a second person approves. Volumes must be in storage, not held, and — for
    /// `retention-period-ended` — past their retention.
    ///
    /// # Errors
    /// Denied, step-up, `BadRequest` (fields, mixed patients, unknown barcode), `Duplicate`
    /// (held, not in storage, not yet eligible, already queued).
    pub fn request_paper_destruction(
        &self,
        c: &Caller,
        r: PaperRequest,
    ) -> Result<PaperDestruction, VaultError> {
        let today = self.site()?.today(self.now_unix())?;
        let due = if r.reason.trim() == DestructionReason::RetentionPeriodEnded.as_str() {
            Some(self.retention_due(c, None)?)
        } else {
            None
        };
        self.registry_act(c, Operation::DestructionRequest, |rec| {
            rec.detail = Some(format!("paper destruction volumes={}", r.volumes.join(",").chars().take(200).collect::<String>()));
            let reason: DestructionReason = r.reason.trim().parse().map_err(bad)?;
            let method: PaperMethod = r.method.parse().map_err(refused)?;
            let vendor = rules::line("vendor", &r.vendor, 120).map_err(refused)?;
            let witness = rules::line("witness", &r.witness, 120).map_err(refused)?;
            let date = medvault_governance::retention::date("date", &r.date).map_err(bad)?;
            if date < today || (date - today).whole_days() > 90 {
                return Err(bad(
                    "`date` is the day of destruction: today or within the next 90 days",
                ));
            }
            if r.volumes.is_empty() || r.volumes.len() > 500 {
                return Err(bad("`volumes` lists 1 to 500 barcodes"));
            }
            let holds = self.active_holds_all()?;
            let queued: BTreeSet<String> = self
                .rows::<PaperDestruction>(PAPER)?
                .into_iter()
                .filter(|d| d.status == "requested")
                .flat_map(|d| d.volumes)
                .collect();
            let mut patient: Option<String> = None;
            let mut barcodes = BTreeSet::new();
            for b in &r.volumes {
                let b = rules::ident("volumes", b).map_err(refused)?;
                let v: Volume = self
                    .row(VOLUME, b)?
                    .ok_or_else(|| bad(format!("unknown barcode {b}")))?;
                if patient.get_or_insert_with(|| v.patient.clone()) != &v.patient {
                    return Err(bad("one destruction covers the volumes of one patient"));
                }
                if let Some(h) = holds.iter().find(|h| h.scope.covers(&v.patient, v.record_class, Some(b))) {
                    return Err(VaultError::Duplicate(format!(
                        "volume {b} is under legal hold {} (matter {}); it cannot be destroyed until the hold is released",
                        h.id, h.matter
                    )));
                }
                if v.status != VolumeStatus::InStorage {
                    return Err(VaultError::Duplicate(format!(
                        "volume {b} is {}; only a volume in storage is destroyed",
                        v.status.as_str().replace('_', " ")
                    )));
                }
                if queued.contains(b) {
                    return Err(VaultError::Duplicate(format!("volume {b} is already in the destruction queue")));
                }
                if let Some(due) = &due {
                    let eligible = due
                        .iter()
                        .find(|i| i.barcode.as_deref() == Some(b))
                        .is_some_and(|i| i.verdict.destroy_eligible);
                    if !eligible {
                        return Err(VaultError::Duplicate(format!(
                            "volume {b} is not past its retention period yet (see the retention due list)"
                        )));
                    }
                }
                barcodes.insert(b.to_owned());
            }
            let patient = patient.unwrap_or_default();
            rec.patient = Some(patient.clone());
            let d = PaperDestruction {
                id: medvault_types::random_uuid(),
                patient: patient.clone(),
                volumes: barcodes.into_iter().collect(),
                reason,
                method,
                vendor: vendor.to_owned(),
                witness: witness.to_owned(),
                date: format!("{date}"),
                requested_by: c.actor().to_owned(),
                requested_at: self.now_unix(),
                status: "requested".into(),
                decided_by: None,
                decided_at: None,
                audit_entry: None,
                certificate: None,
            };
            rec.detail = Some(format!(
                "paper destruction={} volumes={} reason={reason} method={method}",
                d.id,
                d.volumes.join(",")
            ));
            Ok((vec![self.put(PAPER, &d.id, "requested", &patient, &d)?], d))
        })
    }

    /// `POST /api/records/destruction/{id}/approve` (a second person, privacy officer,
    /// step-up): the volumes are recorded destroyed, in one transaction with the audit
    /// entry; then the certificate of destruction is signed with the destruction key,
    /// naming the audit checkpoint that covers that entry, and returned.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `SeparationOfDuties` (the requester), `Duplicate`
    /// (not pending; a hold placed meanwhile; a volume moved meanwhile).
    pub fn approve_paper_destruction(&self, c: &Caller, id: &str) -> Result<String, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::DestructionApprove, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!(
            "paper destruction={}",
            id.chars().take(64).collect::<String>()
        ));
        let lock = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let (version, _) = self.records_guard()?;
        let decided = (|| -> Result<(Vec<Op>, PaperDestruction), VaultError> {
            let mut d: PaperDestruction = self.row(PAPER, id)?.ok_or(VaultError::NotFound)?;
            rec.patient = Some(d.patient.clone());
            if d.status != "requested" {
                return Err(VaultError::Duplicate(format!(
                    "this destruction request is {}, not pending",
                    d.status
                )));
            }
            if !gov::second_person(&d.requested_by, c.actor()) {
                return Err(VaultError::SeparationOfDuties(
                    "a destruction is approved by someone other than the person who requested it",
                ));
            }
            let holds = self.active_holds_all()?;
            let now = self.now_unix();
            let mut ops = vec![];
            for b in &d.volumes {
                let mut v: Volume = self.row(VOLUME, b)?.ok_or(VaultError::NotFound)?;
                if let Some(h) = holds
                    .iter()
                    .find(|h| h.scope.covers(&v.patient, v.record_class, Some(b)))
                {
                    return Err(VaultError::Duplicate(format!(
                        "volume {b} is under legal hold {} (matter {}); it cannot be destroyed until the hold is released",
                        h.id, h.matter
                    )));
                }
                v.destroy(&format!("destruction {id}"), c.actor(), now)
                    .map_err(refused)?;
                ops.push(self.put(VOLUME, b, v.status.as_str(), &v.patient, &v)?);
            }
            d.status = "completed".into();
            d.decided_by = Some(c.actor().to_owned());
            d.decided_at = Some(now);
            Ok((ops, d))
        })();
        let (mut ops, mut d) = match decided {
            Ok(x) => x,
            Err(e) => {
                rec.outcome = match e {
                    VaultError::NotFound => Outcome::NotFound,
                    VaultError::SeparationOfDuties(_) => Outcome::Denied,
                    _ => Outcome::Failure,
                };
                rec.detail = Some(format!(
                    "paper destruction={id} refused: {}",
                    e.to_string().chars().take(200).collect::<String>()
                ));
                self.audit(vec![rec])?;
                return Err(e);
            }
        };
        rec.detail = Some(format!(
            "paper destruction={id} volumes={} method={} vendor={} witness={} requested_by={}",
            d.volumes.join(","),
            d.method,
            d.vendor,
            d.witness,
            d.requested_by
        ));
        ops.push(self.put(PAPER, id, "completed", &d.patient, &d)?);
        let committed = self.registry_commit(version, ops, vec![rec])?;
        drop(lock);
        let seq = committed
            .audit_seqs
            .first()
            .copied()
            .ok_or_else(|| VaultError::Internal("destruction not audited".into()))?;
        let checkpoint = self.checkpoint_covering(seq)?;
        let cert = Certificate {
            id: d.id.clone(),
            patient: d.patient.clone(),
            reason: d.reason,
            method: format!(
                "paper: {}; vendor {}; witness {}; on {}",
                d.method.label(),
                d.vendor,
                d.witness,
                d.date
            ),
            records: format!("paper-volumes={}", d.volumes.join(",")),
            requested_by: d.requested_by.clone(),
            requested_at: crate::fhir_instant_secs(d.requested_at),
            approved_by: c.actor().to_owned(),
            destroyed_at: crate::fhir_instant_secs(d.decided_at.unwrap_or_default()),
            audit_entry: seq,
            checkpoint,
            last_backup_before: None,
        };
        let text = self.destruction_signer.sign(&cert.to_text());
        d.audit_entry = Some(seq);
        d.certificate = Some(text.clone());
        let _lock = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        self.commit(
            vec![self.put(PAPER, id, "completed", &d.patient, &d)?],
            vec![],
        )?;
        tracing::warn!(target: "medvault::alert", destruction = %id, volumes = %d.volumes.join(","), "paper chart volumes destroyed");
        Ok(text)
    }

    /// `POST /api/records/destruction/{id}/cancel`.
    ///
    /// # Errors
    /// Denied, step-up, `NotFound`, `Duplicate` (not pending).
    pub fn cancel_paper_destruction(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        self.registry_act(c, Operation::DestructionCancel, |rec| {
            rec.detail = Some(format!(
                "paper destruction={}",
                id.chars().take(64).collect::<String>()
            ));
            let mut d: PaperDestruction = self.row(PAPER, id)?.ok_or(VaultError::NotFound)?;
            rec.patient = Some(d.patient.clone());
            if d.status != "requested" {
                return Err(VaultError::Duplicate(format!(
                    "this destruction request is {}, not pending",
                    d.status
                )));
            }
            d.status = "cancelled".into();
            d.decided_by = Some(c.actor().to_owned());
            d.decided_at = Some(self.now_unix());
            Ok((vec![self.put(PAPER, id, "cancelled", &d.patient, &d)?], ()))
        })
    }

    /// `GET /api/records/destruction`: the paper destruction queue and its history, newest
    /// first, with certificates.
    ///
    /// # Errors
    /// Denied.
    pub fn paper_destructions(&self, c: &Caller) -> Result<Vec<PaperDestruction>, VaultError> {
        let _permit = self.permit_operation(c, Operation::DestructionRead, None)?;
        let mut out: Vec<PaperDestruction> = self.rows(PAPER)?;
        out.sort_by_key(|x| std::cmp::Reverse(x.requested_at));
        Ok(out)
    }

    /// `GET /api/records/destruction/{id}/certificate`.
    ///
    /// # Errors
    /// Denied, `NotFound`, `Duplicate` (not completed).
    pub fn paper_certificate(&self, c: &Caller, id: &str) -> Result<String, VaultError> {
        let _permit = self.permit_operation(c, Operation::DestructionRead, None)?;
        let d: PaperDestruction = self.row(PAPER, id)?.ok_or(VaultError::NotFound)?;
        d.certificate.ok_or_else(|| {
            VaultError::Duplicate(format!(
                "this destruction request is {}; a certificate exists once it is completed",
                d.status
            ))
        })
    }
}
