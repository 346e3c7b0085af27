//! Live privacy monitoring and intrusion detection (SPEC "Detection"): staff profiles, the
//! consumer that feeds the audit log to the detectors of `medvault-detect` off the request
//! path, alerts with their lifecycle, suppressions, and automatic responses.
//!
//! - Staff profiles (an HR roster line each) are governance records of kind `staff`, their
//!   body sealed under the directory data key (home addresses are PHI-grade).
//! - The consumer reads the audit log by index from a persisted cursor (`detect.cursor`),
//!   and commits the cursor with the alerts it raised in one batch guarded by the cursor's
//!   old value: a restart misses nothing, and when several servers share a store only one
//!   commits each stretch (the others' batches fail and they re-read).
//! - Alerts are governance records of kind `alert`, sealed (they name a patient and say
//!   what a user did); each is audited as `detect.alert` when raised, and every change of
//!   status as `detect.triage`. Confirming one opens an incident whose source is the alert.
//! - A patient's facts (names, address, emergency contact, flags, care team, encounters)
//!   are read through a policy decision for the consumer (`detect.run`), each load audited
//!   as `detect.run` on that chart, and cached until the chart changes.
//!
//! INVARIANT: the consumer's own audit records (actor `system.*`) are never fed back to it.

use std::collections::{BTreeMap, HashMap};

use medvault_audit::{AuditRecord, Outcome};
use medvault_detect::lifecycle::{self, AlertStatus, Suppression};
use medvault_detect::scan::{self, RosterEntry};
use medvault_detect::{AlertLine, AlertType, Detector, Directory, PersonKey, Thresholds};
use medvault_governance::{Incident, IncidentSource};
use medvault_store::{GovernanceRow, Op, StoreError};
use medvault_types::{Operation, PatientId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{directory_key_id, Caller, Vault, VaultError};

const STAFF: &str = "staff";
const ALERT: &str = "alert";
const SUPPRESSION: &str = "suppression";
const CURSOR: &str = "detect.cursor";

/// The resource types a chart's detection facts come from (names, address, contact and
/// flags; care team; encounters).
const FACT_TYPES: [&str; 3] = ["Patient", "CareTeam", "Encounter"];
/// `{consumer id}|{expiry, Unix seconds}`: the consumer the cluster's servers defer to.
const LEASE: &str = "detect.lease";
/// Seconds a consumer's lease lasts past its last commit (it commits at least every
/// [`CURSOR_SECS`]); another server's consumer takes over once it lapses.
const LEASE_SECS: i64 = 15;
/// Audit entries replayed (without raising alerts) when a consumer starts, so baselines
/// and windows are warm.
const WARM_ENTRIES: u64 = 200_000;
/// Seconds between reloads of the staff profiles and suppressions.
const REFRESH_SECS: i64 = 30;
/// Longest a consumer keeps a quiet stretch (no alerts, no facts read) before committing
/// its cursor; a restart re-reads at most this much, which raised nothing.
const CURSOR_SECS: i64 = 5;

/// What the server does on its own when an alert of a type is raised (config `[detect]`).
#[derive(Debug, Clone)]
pub struct DetectResponses {
    /// Disable the account and end its sessions (a security administrator re-enables it).
    pub lock: Vec<AlertType>,
    /// End the account's sessions.
    pub revoke_sessions: Vec<AlertType>,
    /// Require a fresh second factor before the account's next sensitive action.
    pub step_up: Vec<AlertType>,
}

impl Default for DetectResponses {
    fn default() -> Self {
        DetectResponses {
            lock: vec![AlertType::BruteForce],
            revoke_sessions: vec![AlertType::TokenNewAddress],
            step_up: vec![AlertType::MassExport, AlertType::Enumeration],
        }
    }
}

/// One change in an alert's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertChange {
    /// Unix seconds.
    pub at: i64,
    pub by: String,
    pub status: AlertStatus,
    pub reason: String,
}

/// An alert as privacy officers see it: what the detector raised, where it stands, and
/// what was done about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    pub id: String,
    #[serde(flatten)]
    pub alert: AlertLine,
    pub status: AlertStatus,
    /// When it was raised (Unix seconds).
    pub raised_at: i64,
    /// The audit log entry that raised it.
    pub audit_index: u64,
    pub history: Vec<AlertChange>,
    pub incident: Option<String>,
    pub suppression: Option<String>,
    /// Automatic responses taken (`lock`, `revoke_sessions`, `step_up`).
    pub responses: Vec<String>,
}

/// The live consumer's state: the detectors with their baselines, and the facts they
/// compare against. One per server process; [`Vault::detect_step`] feeds it.
pub struct LiveDetection {
    det: Detector,
    dir: Directory,
    responses: DetectResponses,
    /// Patients whose facts are loaded (cleared when their chart changes).
    loaded: HashMap<String, bool>,
    practitioners: HashMap<String, String>,
    suppressions: Vec<Suppression>,
    refreshed: Option<i64>,
    warm: bool,
    /// Audit records of the facts loaded this step, committed with the step's batch.
    reads: Vec<AuditRecord>,
    /// Where the cursor is, as this consumer last committed or read it, and when.
    committed: Option<(u64, i64)>,
    /// This consumer's id in the lease.
    id: String,
}

impl LiveDetection {
    pub fn new(thresholds: Thresholds, responses: DetectResponses) -> Self {
        LiveDetection {
            det: Detector::new(thresholds),
            dir: Directory::default(),
            responses,
            loaded: HashMap::new(),
            practitioners: HashMap::new(),
            suppressions: vec![],
            refreshed: None,
            warm: false,
            reads: vec![],
            committed: None,
            id: medvault_types::random_uuid(),
        }
    }
}

/// What one step of the consumer did.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Another server's consumer holds the lease: this one stood by.
    pub standby: bool,
    /// Audit entries read.
    pub entries: u64,
    /// The cursor after the step (next entry to read).
    pub cursor: u64,
    pub alerts: Vec<AlertView>,
}

/// An audit record read as an access event, or `None` for records that are not access
/// events (administration, the server's own work). The one mapping behind both
/// [`event_line`] (what an offline scan reads) and the live consumer's events.
fn event_fields(rec: &AuditRecord) -> Option<(scan::EventFields<'_>, Option<String>)> {
    if rec.actor.starts_with("system.")
        || matches!(rec.role.as_deref(), Some("system" | "importer"))
    {
        return None;
    }
    let ok = rec.outcome == Outcome::Success;
    let (action, patient) = match rec.action.as_str() {
        "login" => ("login", None),
        "mfa" if !ok => ("login", None),
        "read" | "vread" | "history" | "everything" => ("read", rec.patient.as_deref()),
        // One record per chart in the results follows the search's own: the opening of a
        // chart is what the detectors judge, not its line in a result list.
        "search" if rec.patient.is_some() => return None,
        "search" => ("search", None),
        "create" => ("create", rec.patient.as_deref()),
        "update" | "delete" => ("update", rec.patient.as_deref()),
        _ => return None,
    };
    let user = (rec.actor != crate::auth::UNKNOWN_USER).then_some(rec.actor.as_str());
    let category = rec
        .categories_disclosed
        .iter()
        .chain(rec.categories_withheld.iter())
        .find_map(|c| scan::category_of(c))
        .map(|c| c.as_str());
    let query = (action == "search").then(|| {
        let params = rec
            .detail
            .as_deref()
            .and_then(|d| d.strip_prefix("params="))
            .map(|d| d.split(' ').next().unwrap_or(""))
            .unwrap_or("");
        params
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| format!("{p}="))
            .collect::<Vec<_>>()
            .join("&")
    });
    let f = scan::EventFields {
        time: Some(rec.time.as_str()),
        user,
        action: Some(action),
        patient,
        category,
        outcome: Some(if ok { "success" } else { "failure" }),
        source_ip: rec.source.as_deref(),
        department: None,
        break_glass: rec.break_glass,
        query: None,
    };
    Some((f, query))
}

/// The offline scan's event line for one audit record (`events.jsonl`), or `None` for
/// records that are not access events. The live consumer feeds the detectors the same
/// fields, so a scan of these lines raises the same alerts. A search's parameter values
/// are never in the audit log: a search by name becomes `name=` (a name search that may
/// have found anyone).
pub fn event_line(rec: &AuditRecord) -> Option<Value> {
    let (f, query) = event_fields(rec)?;
    Some(json!({
        "time": f.time,
        "user": f.user,
        "action": f.action,
        "patient": f.patient,
        "category": f.category,
        "outcome": f.outcome,
        "source_ip": f.source_ip,
        "purpose": rec.purpose,
        "break_glass": f.break_glass,
        "query": query,
    }))
}

fn bad(m: impl Into<String>) -> VaultError {
    VaultError::BadRequest(m.into())
}

impl Vault {
    /// The gate's clock, Unix seconds (what expiries are measured against).
    pub fn now_unix(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Every staff profile's department (user → department), unaudited: for the training
    /// dashboard's per-department completion, which its caller's read already records.
    pub(crate) fn staff_profiles_unaudited(&self) -> Result<Vec<(String, String)>, VaultError> {
        let rows: Vec<RosterEntry> = self
            .store
            .governance(STAFF)?
            .iter()
            .map(|r| self.open_governance(r))
            .collect::<Result<_, _>>()?;
        Ok(rows
            .into_iter()
            .filter(|r| !r.department.is_empty())
            .map(|r| (r.user, r.department))
            .collect())
    }

    pub(crate) fn seal_governance(
        &self,
        kind: &str,
        id: &str,
        body: &Value,
    ) -> Result<Vec<u8>, VaultError> {
        let cipher = self.cipher_for(&directory_key_id())?;
        let text = serde_json::to_vec(body).map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(cipher.seal(format!("governance|{kind}|{id}").as_bytes(), &text)?)
    }

    pub(crate) fn open_governance<T: serde::de::DeserializeOwned>(
        &self,
        row: &GovernanceRow,
    ) -> Result<T, VaultError> {
        let plain = self.open_chart_text(
            &directory_key_id(),
            format!("governance|{}|{}", row.kind, row.id).as_bytes(),
            &row.body,
        )?;
        serde_json::from_slice(&plain)
            .map_err(|e| VaultError::Internal(format!("stored {} record: {e}", row.kind)))
    }

    /// `medvault staff import roster.csv` and `POST /api/staff/import` (security
    /// administrators): replaces the profile of every user the roster lists (department,
    /// shift, home address, own chart), sealed; users it does not list keep theirs.
    /// Returns how many profiles were written.
    ///
    /// # Errors
    /// `BadRequest` naming the roster line for malformed CSV (nothing is written); denied.
    pub fn import_staff(&self, c: &Caller, csv: &[u8]) -> Result<usize, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::StaffImport, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let entries = match scan::parse_roster(csv) {
            Ok(e) => e,
            Err(e) => {
                rec.outcome = Outcome::Failure;
                rec.detail = Some("roster refused".into());
                self.audit(vec![rec])?;
                return Err(bad(e.to_string()));
            }
        };
        let now = self.clock.now().unix_timestamp();
        let mut ops = vec![];
        for e in &entries {
            ops.push(self.staff_op(e, now)?);
        }
        rec.detail = Some(format!("profiles={}", entries.len()));
        self.commit(ops, vec![rec])?;
        Ok(entries.len())
    }

    fn staff_op(&self, e: &RosterEntry, now: i64) -> Result<Op, VaultError> {
        let body = serde_json::to_value(e).map_err(|x| VaultError::Internal(x.to_string()))?;
        Ok(Op::PutGovernance(GovernanceRow {
            kind: STAFF.into(),
            id: e.user.clone(),
            at: now,
            status: "active".into(),
            subject: e.user.clone(),
            body: self.seal_governance(STAFF, &e.user, &body)?,
        }))
    }

    /// `PUT /api/staff/{user}` (security administrators): one profile, created or replaced.
    ///
    /// # Errors
    /// `BadRequest` for a profile whose user differs from the path, or with a bad shift
    /// or date; denied.
    pub fn put_staff(&self, c: &Caller, entry: RosterEntry) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::StaffEdit, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if let Err(m) = entry.check() {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!("profile refused: {m}"));
            self.audit(vec![rec])?;
            return Err(bad(m));
        }
        rec.detail = Some(format!("profile={}", entry.user));
        let now = self.clock.now().unix_timestamp();
        self.commit(vec![self.staff_op(&entry, now)?], vec![rec])?;
        Ok(())
    }

    /// `GET /api/staff` (security administrators, privacy officers): every profile, by user.
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn staff(&self, c: &Caller) -> Result<Vec<RosterEntry>, VaultError> {
        self.permit_operation(c, Operation::StaffRead, None)?;
        self.staff_profiles()
    }

    fn staff_profiles(&self) -> Result<Vec<RosterEntry>, VaultError> {
        let mut out: Vec<RosterEntry> = self
            .store
            .governance(STAFF)?
            .iter()
            .map(|r| self.open_governance(r))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(out)
    }

    /// The live stream as the offline scan's `events.jsonl` lines, from audit entry `from`
    /// (privacy officers): what the consumer feeds the detectors, for a re-scan offline.
    ///
    /// # Errors
    /// Denied; storage failures.
    pub fn detection_events(&self, c: &Caller, from: u64) -> Result<Vec<String>, VaultError> {
        self.permit_operation(c, Operation::Alerts, None)?;
        let total = self.store.audit_len()?;
        let mut out = vec![];
        for row in self.store.audit_range(from, total)? {
            if let Some(line) = AuditRecord::from_canonical(&row.record)
                .ok()
                .as_ref()
                .and_then(event_line)
            {
                out.push(line.to_string());
            }
        }
        Ok(out)
    }

    /// Reloads staff profiles, the practitioner → user map and suppressions.
    fn refresh_detection(&self, live: &mut LiveDetection) -> Result<(), VaultError> {
        for e in self.staff_profiles()? {
            live.dir.add_staff(&e);
        }
        live.practitioners = self
            .store
            .users()?
            .into_iter()
            .filter_map(|u| u.practitioner_id.map(|p| (p, u.username)))
            .collect();
        live.suppressions = self.stored_suppressions()?;
        // A profile naming a chart as its employee's own marks that chart's facts
        // (`Directory::add_staff`); the rest of what is loaded stays true.
        Ok(())
    }

    /// Loads one chart's facts for the detectors (audited as a read for detection): from
    /// its [`FACT_TYPES`] resources.
    fn load_facts(
        &self,
        c: &Caller,
        live: &mut LiveDetection,
        patient: &str,
    ) -> Result<(), VaultError> {
        live.loaded.insert(patient.to_owned(), true);
        let Ok(pid) = PatientId::new(patient) else {
            return Ok(());
        };
        let decision = self.decide_operation(c, Operation::DetectRun);
        // Recorded as the detection operation on this chart (not a clinician's `read`):
        // the access report shows the server's monitoring read it.
        let mut rec = self.record(c, Operation::DetectRun.as_str(), Outcome::Success);
        rec.patient = Some(patient.to_owned());
        rec.detail = Some("facts: names, address, contact, flags, care team, encounters".into());
        let rows: Vec<_> = match self.store.chart_versions(&pid) {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // The newest stored version of each Patient, CareTeam and Encounter.
        let mut newest: BTreeMap<(String, String), medvault_store::Sealed> = BTreeMap::new();
        for r in rows {
            if !FACT_TYPES.contains(&r.rtype()) {
                continue;
            }
            let k = (r.rtype().to_owned(), r.id().to_owned());
            if newest.get(&k).is_none_or(|o| o.version() < r.version()) {
                newest.insert(k, r);
            }
        }
        if newest.is_empty() {
            return Ok(());
        }
        let mut permitted = vec![];
        for (_, r) in newest {
            if r.deleted() {
                continue;
            }
            match crate::typestate::permit(&decision, r, &mut rec) {
                Ok(p) => permitted.push(p),
                Err(_) => {
                    self.audit(vec![rec])?;
                    return Err(VaultError::Forbidden { withheld: vec![] });
                }
            }
        }
        // INVARIANT: what is opened here never leaves the consumer; its record is
        // committed with the step (or the step, and what it derived, is thrown away).
        live.reads.push(rec);
        let mut facts = medvault_detect::PatientFacts::default();
        let p = live.dir.patient(patient);
        for d in self.open_all(permitted)? {
            let Some(j) = d.json() else { continue };
            match d.rtype().as_str() {
                "Patient" => patient_facts(j, &mut facts),
                "CareTeam" => {
                    for m in practitioner_refs(j.get("participant"), "member") {
                        if let Some(u) = live.practitioners.get(&m) {
                            let u = live.dir.user(u);
                            facts.care_team.push(u);
                        }
                    }
                }
                "Encounter" => {
                    let period = j.get("period");
                    let when = |k: &str| {
                        period
                            .and_then(|p| p.get(k))
                            .and_then(Value::as_str)
                            .and_then(scan::parse_when)
                            .map(|t| t.0)
                    };
                    let Some(start) = when("start") else { continue };
                    let end = when("end").unwrap_or(i64::MAX / 4);
                    let dept = department_of(j).map(|d| live.dir.department(&d));
                    let who = practitioner_refs(j.get("participant"), "individual");
                    let users: Vec<_> = who
                        .iter()
                        .filter_map(|m| live.practitioners.get(m).cloned())
                        .collect();
                    if users.is_empty() {
                        users_or_none(&mut facts, None, dept, start, end);
                    }
                    for u in users {
                        let u = live.dir.user(&u);
                        users_or_none(&mut facts, Some(u), dept, start, end);
                    }
                }
                _ => {}
            }
        }
        // An employee's own chart, as the profiles say.
        let employee = live.dir.facts_of(p).and_then(|f| f.employee);
        facts.employee = employee.or(facts.employee);
        if let Some(f) = live.dir.facts.get_mut(p as usize) {
            *f = facts;
        }
        Ok(())
    }

    /// One step of the live consumer (the server runs it every second, off the request
    /// path): reads up to `max` audit entries from the persisted cursor, feeds them to the
    /// detectors, stores and audits the alerts they raise with the automatic responses, and
    /// moves the cursor and renews its lease — all in one batch. While another consumer's
    /// lease (15 s past its last commit) lasts, it stands by (`standby`).
    ///
    /// # Errors
    /// Denied (only the server's own `system` caller runs it); `Unavailable` when another
    /// server moved the cursor meanwhile (nothing of this step is kept; the next step
    /// re-reads); storage failures.
    pub fn detect_step(
        &self,
        c: &Caller,
        live: &mut LiveDetection,
        max: u64,
    ) -> Result<StepReport, VaultError> {
        self.decide_unrecorded(c, Operation::DetectRun)?;
        let now = self.clock.now().unix_timestamp();
        if live
            .refreshed
            .is_none_or(|t| now - t >= REFRESH_SECS || now < t)
        {
            self.refresh_detection(live)?;
            live.refreshed = Some(now);
        }
        // One consumer per cluster: the lease's holder, until it lapses.
        if let Some(v) = self.store.meta(LEASE)? {
            let v = String::from_utf8_lossy(&v).into_owned();
            let (holder, until) = v.split_once('|').unwrap_or(("", "0"));
            if holder != live.id && until.parse::<i64>().unwrap_or(0) > now {
                live.warm = false;
                live.committed = None;
                return Ok(StepReport {
                    standby: true,
                    ..StepReport::default()
                });
            }
        }
        let stored = self.store.meta(CURSOR)?;
        let persisted = stored
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        // Where this consumer got to, if that is ahead of what is stored and nobody else
        // moved the stored cursor meanwhile.
        let (cursor, fresh) = match live.committed {
            Some((at, _)) if at >= persisted && live.warm => (at, false),
            _ => {
                live.committed = Some((persisted, now));
                (persisted, true)
            }
        };
        if !live.warm {
            // Warm the baselines on what came before, raising nothing.
            let from = cursor.saturating_sub(WARM_ENTRIES);
            let mut at = from;
            while at < cursor {
                let end = cursor.min(at + 10_000);
                let rows = self.store.audit_range(at, end)?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    at = row.seq + 1;
                    let _ = self.feed(c, live, &row.record)?;
                }
            }
            live.warm = true;
        }
        let total = self.store.audit_len()?;
        let end = total.min(cursor.saturating_add(max.max(1)));
        let mut raised: Vec<(u64, AlertLine)> = vec![];
        let mut entries = 0u64;
        if end > cursor {
            for row in self.store.audit_range(cursor, end)? {
                entries += 1;
                for a in self.feed(c, live, &row.record)? {
                    raised.push((row.seq, a));
                }
            }
        }
        let last_commit = live.committed.map_or(now, |c| c.1);
        // A consumer (re)starting commits at once, to hold the lease.
        let quiet = raised.is_empty() && live.reads.is_empty() && !fresh;
        if quiet && now - last_commit < CURSOR_SECS && now >= last_commit {
            live.committed = Some((end.max(cursor), last_commit));
            return Ok(StepReport {
                standby: false,
                entries,
                cursor: end.max(cursor),
                alerts: vec![],
            });
        }
        let mut ops = vec![
            Op::RequireMetaListed {
                key: CURSOR.into(),
                member: persisted.to_string(),
                absent: "0".into(),
            },
            Op::PutMeta {
                key: CURSOR.into(),
                value: end.max(cursor).to_string().into_bytes(),
            },
            Op::PutMeta {
                key: LEASE.into(),
                value: format!("{}|{}", live.id, now.saturating_add(LEASE_SECS)).into_bytes(),
            },
        ];
        let mut recs = std::mem::take(&mut live.reads);
        let mut views = vec![];
        for (seq, a) in raised {
            let id = medvault_types::random_uuid();
            let suppression = live
                .suppressions
                .iter()
                .find(|s| s.matches(&a, now))
                .map(|s| s.id.clone());
            let mut responses = vec![];
            if suppression.is_none() {
                if let Some(u) = a.user.as_deref() {
                    if self.store.user(u)?.is_some() {
                        if live.responses.lock.contains(&a.kind) {
                            ops.push(Op::SetDisabled {
                                username: u.to_owned(),
                                disabled: true,
                            });
                            ops.push(Op::RevokeSessions {
                                username: u.to_owned(),
                            });
                            responses.push("lock".to_owned());
                        } else if live.responses.revoke_sessions.contains(&a.kind) {
                            ops.push(Op::RevokeSessions {
                                username: u.to_owned(),
                            });
                            responses.push("revoke_sessions".to_owned());
                        } else if live.responses.step_up.contains(&a.kind) {
                            for s in self.store.sessions_of(u)? {
                                ops.push(Op::StepUp {
                                    token_hash: s.token_hash,
                                    at: 0,
                                });
                            }
                            responses.push("step_up".to_owned());
                        }
                    }
                }
            }
            let view = AlertView {
                id: id.clone(),
                alert: a,
                status: if suppression.is_some() {
                    AlertStatus::Suppressed
                } else {
                    AlertStatus::Open
                },
                raised_at: now,
                audit_index: seq,
                history: vec![],
                incident: None,
                suppression,
                responses,
            };
            let mut rec = self.record(c, "detect.alert", Outcome::Success);
            rec.patient = view.alert.patient.clone();
            rec.detail = Some(format!(
                "alert={id} type={} user={} entry={seq} status={}{}",
                view.alert.kind,
                view.alert.user.as_deref().unwrap_or("-"),
                view.status.as_str(),
                if view.responses.is_empty() {
                    String::new()
                } else {
                    format!(" responses={}", view.responses.join(","))
                }
            ));
            recs.push(rec);
            ops.push(self.alert_op(&view)?);
            views.push(view);
        }
        self.commit(ops, recs)
            .inspect_err(|_| {
                // What was read this step is forgotten with the records of its reading,
                // and the consumer starts again from the stored cursor.
                live.loaded.clear();
                live.committed = None;
            })
            .map_err(|e| match e {
                VaultError::Unavailable(_) => {
                    // Another consumer got there first: start again from its cursor.
                    live.warm = false;
                    live.det = Detector::new(live.det.thresholds.clone());
                    e
                }
                other => crate::audit_failed(other),
            })?;
        live.committed = Some((end.max(cursor), now));
        for v in &views {
            tracing::warn!(
                target: "medvault::siem",
                alert = %v.id,
                alert_type = %v.alert.kind,
                user = v.alert.user.as_deref().unwrap_or("-"),
                source_ip = v.alert.source_ip.as_deref().unwrap_or("-"),
                score = v.alert.score,
                status = v.status.as_str(),
                "detection alert"
            );
        }
        Ok(StepReport {
            standby: false,
            entries,
            cursor: end.max(cursor),
            alerts: views,
        })
    }

    /// Feeds one canonical audit record to the detectors; returns what it raises.
    fn feed(
        &self,
        c: &Caller,
        live: &mut LiveDetection,
        canonical: &[u8],
    ) -> Result<Vec<AlertLine>, VaultError> {
        let Ok(rec) = AuditRecord::from_canonical(canonical) else {
            return Ok(vec![]);
        };
        // Profiles, accounts and suppressions change through the gate, so the stream says
        // when: the detectors see the change exactly where it happened.
        if rec.outcome == Outcome::Success
            && matches!(
                rec.action.as_str(),
                "staff.import" | "staff.edit" | "detect.suppress" | "user.create"
            )
        {
            self.refresh_detection(live)?;
        }
        // A write changes what the detectors know of the chart when it writes one of the
        // resources the facts come from (an Observation changes none of them; reloading the
        // chart after each made every write cost a read of the whole chart). A record
        // naming no resource (an import) reloads.
        if matches!(
            rec.action.as_str(),
            "create" | "update" | "delete" | "import"
        ) && rec
            .resource
            .as_deref()
            .is_none_or(|r| FACT_TYPES.iter().any(|t| r.split('/').next() == Some(*t)))
        {
            if let Some(p) = &rec.patient {
                live.loaded.remove(p);
            }
        }
        let Some((fields, query)) = event_fields(&rec) else {
            return Ok(vec![]);
        };
        if let Some(p) = fields.patient {
            if !live.loaded.contains_key(p) {
                self.load_facts(c, live, p)?;
            }
        }
        let fields = scan::EventFields {
            query: query.as_deref(),
            ..fields
        };
        let Ok(e) = scan::build_event(&mut live.dir, &fields) else {
            return Ok(vec![]);
        };
        let mut out = vec![];
        live.det.observe_into(&live.dir, &e, &mut out);
        Ok(out.iter().map(|a| a.render(&live.dir)).collect())
    }

    fn alert_op(&self, v: &AlertView) -> Result<Op, VaultError> {
        let body = serde_json::to_value(v).map_err(|e| VaultError::Internal(e.to_string()))?;
        let at = v.history.last().map_or(v.raised_at, |h| h.at);
        Ok(Op::PutGovernance(GovernanceRow {
            kind: ALERT.into(),
            id: v.id.clone(),
            at,
            status: v.status.as_str().into(),
            subject: v
                .alert
                .user
                .clone()
                .or_else(|| v.alert.source_ip.clone())
                .unwrap_or_default(),
            body: self.seal_governance(ALERT, &v.id, &body)?,
        }))
    }

    fn stored_alerts(&self) -> Result<Vec<AlertView>, VaultError> {
        self.store
            .governance(ALERT)?
            .iter()
            .map(|r| self.open_governance(r))
            .collect()
    }

    /// `GET /api/alerts?status=&user=&patient=` (privacy officers): alerts, newest change
    /// first, optionally only those with a status, about a user, or naming a patient.
    ///
    /// # Errors
    /// `BadRequest` for an unknown status; denied.
    pub fn alerts(
        &self,
        c: &Caller,
        status: Option<&str>,
        user: Option<&str>,
        patient: Option<&str>,
    ) -> Result<Vec<AlertView>, VaultError> {
        let status = status
            .filter(|s| !s.is_empty())
            .map(AlertStatus::parse)
            .transpose()
            .map_err(bad)?;
        self.permit_operation(c, Operation::Alerts, patient)?;
        Ok(self
            .stored_alerts()?
            .into_iter()
            .filter(|a| status.is_none_or(|s| a.status == s))
            .filter(|a| user.is_none_or(|u| a.alert.user.as_deref() == Some(u)))
            .filter(|a| patient.is_none_or(|p| a.alert.patient.as_deref() == Some(p)))
            .collect())
    }

    /// `GET /api/alerts/{id}` (privacy officers).
    ///
    /// # Errors
    /// `NotFound`; denied.
    pub fn alert(&self, c: &Caller, id: &str) -> Result<AlertView, VaultError> {
        self.permit_operation(c, Operation::Alerts, None)?;
        let row = self
            .store
            .governance_record(ALERT, id)?
            .ok_or(VaultError::NotFound)?;
        self.open_governance(&row)
    }

    /// `POST /api/alerts/{id}/status {"status","reason"}` (privacy officers): triage, false
    /// positive (a reason is required) or confirmed — which opens an incident whose source
    /// is the alert, linked to its patient. Audited as `detect.triage`.
    ///
    /// # Errors
    /// `BadRequest` for an unknown status, a change the lifecycle does not allow, or a
    /// missing reason; `NotFound`; denied.
    pub fn set_alert_status(
        &self,
        c: &Caller,
        id: &str,
        status: &str,
        reason: &str,
    ) -> Result<AlertView, VaultError> {
        let to = AlertStatus::parse(status).map_err(bad)?;
        let Some(mut rec) = self.operate(c, Operation::AlertTriage, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let Some(row) = self.store.governance_record(ALERT, id)? else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        let mut view: AlertView = self.open_governance(&row)?;
        let reason = match lifecycle::transition(view.status, to, reason) {
            Ok(r) => r,
            Err(m) => {
                rec.outcome = Outcome::Failure;
                rec.detail = Some(format!("alert={id} refused: {m}"));
                self.audit(vec![rec])?;
                return Err(bad(m));
            }
        };
        let now = self.clock.now().unix_timestamp();
        view.status = to;
        view.history.push(AlertChange {
            at: now,
            by: c.actor().to_owned(),
            status: to,
            reason,
        });
        let mut ops = vec![];
        if to == AlertStatus::Confirmed {
            let incident_id = medvault_types::random_uuid();
            let mut i = Incident::open(
                &incident_id,
                IncidentSource::DetectionAlert {
                    alert: id.to_owned(),
                    alert_type: view.alert.kind.as_str().to_owned(),
                },
                view.alert.patient.iter().cloned().collect(),
                c.actor(),
                now,
            );
            i.record(
                now,
                c.actor(),
                &format!(
                    "alert confirmed: {} by {}",
                    view.alert.kind,
                    view.alert.user.as_deref().unwrap_or("an unknown user")
                ),
            );
            ops.push(Op::PutIncident(crate::break_glass::incident_row(&i)?));
            view.incident = Some(incident_id);
        }
        rec.patient = view.alert.patient.clone();
        rec.detail = Some(format!(
            "alert={id} status={}{}",
            to.as_str(),
            view.incident
                .as_deref()
                .filter(|_| to == AlertStatus::Confirmed)
                .map(|i| format!(" incident={i}"))
                .unwrap_or_default()
        ));
        ops.push(self.alert_op(&view)?);
        self.commit(ops, vec![rec])?;
        Ok(view)
    }

    fn stored_suppressions(&self) -> Result<Vec<Suppression>, VaultError> {
        self.store
            .governance(SUPPRESSION)?
            .iter()
            .map(|r| self.open_governance(r))
            .collect()
    }

    /// `GET /api/suppressions` (privacy officers): every suppression, in force or not.
    ///
    /// # Errors
    /// Denied.
    pub fn suppressions(&self, c: &Caller) -> Result<Vec<Suppression>, VaultError> {
        self.permit_operation(c, Operation::Suppress, None)?;
        self.stored_suppressions()
    }

    /// `POST /api/suppressions {"type","user","patient","reason","expires"}` (privacy
    /// officers): holds back matching alerts (they are kept as `suppressed`) until
    /// `expires` (Unix seconds); the caller is its owner.
    ///
    /// # Errors
    /// `BadRequest` for a suppression that names nothing, lacks a reason, or expires in the
    /// past or more than a year ahead; denied.
    pub fn add_suppression(
        &self,
        c: &Caller,
        kind: Option<AlertType>,
        user: Option<String>,
        patient: Option<String>,
        reason: &str,
        expires: i64,
    ) -> Result<Suppression, VaultError> {
        let now = self.clock.now().unix_timestamp();
        let s = Suppression {
            id: medvault_types::random_uuid(),
            kind,
            user: user.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()),
            patient: patient
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty()),
            reason: reason.trim().to_owned(),
            owner: c.actor().to_owned(),
            created: now,
            expires,
            ended: None,
        };
        // Who may, first; then what.
        let Some(mut rec) = self.operate(c, Operation::Suppress, s.patient.as_deref())? else {
            return Err(VaultError::Unauthenticated);
        };
        let unknown = match s.user.as_deref() {
            Some(u) => self.store.user(u)?.is_none(),
            None => false,
        };
        let checked = match (s.check(now), unknown) {
            (Err(m), _) => Err(m),
            (Ok(()), true) => Err("no such user: a suppression names an account".to_owned()),
            (Ok(()), false) => Ok(()),
        };
        if let Err(m) = checked {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!("suppression refused: {m}"));
            self.audit(vec![rec])?;
            return Err(bad(m));
        }
        rec.detail = Some(format!(
            "suppression={} type={} user={} expires={expires}",
            s.id,
            s.kind.map_or("-", AlertType::as_str),
            s.user.as_deref().unwrap_or("-")
        ));
        self.commit(vec![self.suppression_op(&s)?], vec![rec])?;
        Ok(s)
    }

    fn suppression_op(&self, s: &Suppression) -> Result<Op, VaultError> {
        let body = serde_json::to_value(s).map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(Op::PutGovernance(GovernanceRow {
            kind: SUPPRESSION.into(),
            id: s.id.clone(),
            at: s.ended.unwrap_or(s.created),
            status: if s.ended.is_some() { "ended" } else { "active" }.into(),
            subject: s.user.clone().unwrap_or_default(),
            body: self.seal_governance(SUPPRESSION, &s.id, &body)?,
        }))
    }

    /// `DELETE /api/suppressions/{id}` (privacy officers): ends a suppression now (it is
    /// kept, ended, for the record).
    ///
    /// # Errors
    /// `NotFound`; `BadRequest` if it already ended; denied.
    pub fn end_suppression(&self, c: &Caller, id: &str) -> Result<Suppression, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::Suppress, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let Some(row) = self.store.governance_record(SUPPRESSION, id)? else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        let mut s: Suppression = self.open_governance(&row)?;
        let now = self.clock.now().unix_timestamp();
        if !s.active(now) {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!("suppression={id} already ended"));
            self.audit(vec![rec])?;
            return Err(bad("this suppression has already ended"));
        }
        s.ended = Some(now);
        rec.detail = Some(format!("suppression={id} ended"));
        self.commit(vec![self.suppression_op(&s)?], vec![rec])?;
        Ok(s)
    }
}

fn users_or_none(
    facts: &mut medvault_detect::PatientFacts,
    user: Option<u32>,
    department: Option<u32>,
    start: i64,
    end: i64,
) {
    facts.encounters.push(medvault_detect::EncounterFact {
        user,
        department,
        start,
        end: end.max(start),
    });
}

/// `Practitioner/{id}` references of `items[*].{field}`.
fn practitioner_refs(items: Option<&Value>, field: &str) -> Vec<String> {
    items
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get(field)?.get("reference")?.as_str())
        .filter_map(|r| r.strip_prefix("Practitioner/"))
        .map(str::to_owned)
        .collect()
}

/// An encounter's department: `serviceType` (text, or its first coding's display or
/// code), else its first `location`'s display.
fn department_of(j: &Map<String, Value>) -> Option<String> {
    let st = j.get("serviceType");
    let text = st
        .and_then(|s| s.get("text"))
        .and_then(Value::as_str)
        .or_else(|| {
            let c = st?.get("coding")?.as_array()?.first()?;
            c.get("display")
                .and_then(Value::as_str)
                .or_else(|| c.get("code").and_then(Value::as_str))
        })
        .or_else(|| {
            j.get("location")?
                .as_array()?
                .first()?
                .get("location")?
                .get("display")?
                .as_str()
        })?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

pub(crate) fn name_parts(n: Option<&Value>) -> (String, String) {
    let family = n
        .and_then(|n| n.get("family"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let given = n
        .and_then(|n| n.get("given"))
        .and_then(Value::as_array)
        .map(|g| {
            g.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    (family, given)
}

fn address_text(a: Option<&Value>) -> String {
    let Some(a) = a else { return String::new() };
    let mut parts: Vec<String> = a
        .get("line")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(c) = a.get("city").and_then(Value::as_str) {
        parts.push(c.to_owned());
    }
    parts.join(", ")
}

/// Names, address, emergency contact, VIP and employee flags and date of death from a FHIR
/// Patient (R4 §Patient; `meta.security` `CELEB` / `VIP` mark a VIP).
fn patient_facts(j: &Map<String, Value>, f: &mut medvault_detect::PatientFacts) {
    let first = |k: &str| j.get(k).and_then(Value::as_array).and_then(|a| a.first());
    let (family, given) = name_parts(first("name"));
    f.person = PersonKey::new(&family, &given, &address_text(first("address")));
    if let Some(c) = first("contact") {
        let (family, given) = name_parts(c.get("name"));
        f.contact = Some(PersonKey::new(
            &family,
            &given,
            &address_text(c.get("address")),
        ));
    }
    f.vip = j
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter()
                .any(|c| matches!(c.get("code").and_then(Value::as_str), Some("CELEB" | "VIP")))
        });
    f.deceased = match (j.get("deceasedDateTime"), j.get("deceasedBoolean")) {
        (Some(Value::String(d)), _) => scan::parse_when(d).map(|t| t.0).or(Some(0)),
        (_, Some(Value::Bool(true))) => Some(0),
        _ => None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use medvault_types::Role;

    #[test]
    fn audit_records_become_the_scans_event_lines() {
        let mut r = AuditRecord::new(
            "read",
            "nina",
            Outcome::Denied,
            "2026-03-01T10:00:00.000Z".into(),
            "r",
        );
        r.patient = Some("p1".into());
        r.categories_withheld = vec!["care_plans".into()];
        r.source = Some("10.0.0.1".into());
        let l = event_line(&r).unwrap();
        assert_eq!(
            (
                l["action"].as_str(),
                l["outcome"].as_str(),
                l["category"].as_str(),
                l["patient"].as_str()
            ),
            (Some("read"), Some("failure"), Some("plans"), Some("p1"))
        );
        let mut s = AuditRecord::new(
            "search",
            "nina",
            Outcome::Success,
            "2026-03-01T10:00:00.000Z".into(),
            "r",
        );
        s.detail = Some("params=name,birthdate matched=3 returned=3".into());
        assert_eq!(event_line(&s).unwrap()["query"], "name=&birthdate=");
        s.patient = Some("p1".into());
        assert!(
            event_line(&s).is_none(),
            "a chart in a result list is not an opening"
        );
        let sys = AuditRecord::new("read", "system.detect", Outcome::Success, "t".into(), "r");
        assert!(
            event_line(&sys).is_none(),
            "the consumer never reads its own records"
        );
        let mut role = AuditRecord::new("create", "ops", Outcome::Success, "t".into(), "r");
        role.role = Some(Role::Importer.as_str().into());
        assert!(event_line(&role).is_none());
        let login = AuditRecord::new(
            "login",
            crate::auth::UNKNOWN_USER,
            Outcome::Failure,
            "t".into(),
            "r",
        );
        assert!(event_line(&login).unwrap()["user"].is_null());
    }

    #[test]
    fn patient_facts_come_from_the_fhir_patient() {
        let j = json!({"resourceType":"Patient","name":[{"family":"Okafor","given":["Nina","J"]}],
            "address":[{"line":["12 Oak Street"],"city":"Springfield"}],
            "contact":[{"name":{"family":"Lund","given":["Ed"]}}],
            "meta":{"security":[{"code":"CELEB"}]},"deceasedDateTime":"2026-01-02"});
        let mut f = medvault_detect::PatientFacts::default();
        patient_facts(j.as_object().unwrap(), &mut f);
        assert_eq!(
            f.person,
            PersonKey::new("Okafor", "Nina J", "12 Oak Street, Springfield")
        );
        assert_eq!(f.contact.unwrap().family.as_deref(), Some("lund"));
        assert!(f.vip);
        assert_eq!(f.deceased, Some(1_767_312_000));
        let e = json!({"serviceType":{"coding":[{"display":"Cardiology"}]}});
        assert_eq!(
            department_of(e.as_object().unwrap()).as_deref(),
            Some("Cardiology")
        );
    }
}
