//! Compliance (issue 16; rules in `medvault_governance::{breach, accounting, training,
//! response, safeguards}`): the accounting-of-disclosures request workflow, the training
//! program that keeps each user's `training_current` fact, incident response with breach
//! assessment (affected individuals from the audit log, counted per state of residence;
//! the notification letter and the HHS report's fields), the asset inventory, and the
//! Security Rule self-assessment with live evidence, attestations and the risk register.
//!
//! Every act is a sealed governance record (or an incident) written through the gate with
//! its audit record in the same transaction; a refusal is audited too.

use std::collections::{BTreeMap, BTreeSet};

use medvault_audit::AuditRecord;
use medvault_governance::accounting::{self as acct, AccountingClock};
use medvault_governance::breach::{self, Decision, Facts};
use medvault_governance::response::{self, Asset, EvidenceRef, Notice, Severity, Task};
use medvault_governance::safeguards::{self, Assessed, Attestation, Evidence, Risk};
use medvault_governance::training::{self, Completion, Course, PhishingResult, Standing};
use medvault_governance::{Incident, IncidentSource, IncidentStatus};
use medvault_store::Op;
use medvault_types::{Operation, PatientId, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use time::{Date, OffsetDateTime};

use crate::{Caller, Outcome, Vault, VaultError};

const ACCOUNTING: &str = "privacy.accounting-request";
const COURSE: &str = "training.course";
const COMPLETION: &str = "training.completion";
const PHISHING: &str = "training.phishing";
const TRAINING_SETTINGS: &str = "training.settings";
const ASSET: &str = "incident.asset";
const EVIDENCE: &str = "incident.evidence";
const ATTESTATION: &str = "compliance.attestation";
const RISK: &str = "compliance.risk";
const REVIEW: &str = "compliance.review";
const SETTINGS: &str = "compliance.settings";
/// An administrator's block on a user's training standing (`POST
/// /api/users/{name}/training {"current": false}`): status `blocked` or `lifted`.
pub(crate) const TRAINING_BLOCK: &str = "training.block";

/// Largest evidence attachment, in bytes.
pub const EVIDENCE_BYTES: usize = 1 << 20;
/// Longest note, in characters.
const TEXT_CHARS: usize = 2000;

/// Serializes compliance changes within one process (an incident is read, changed and
/// written back whole).
static COMPLIANCE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bad(e: impl std::fmt::Display) -> VaultError {
    VaultError::BadRequest(e.to_string())
}

fn day_text(d: Date) -> String {
    breach::day(d)
}

fn text(field: &str, v: &str, max: usize) -> Result<String, VaultError> {
    let t = v.trim();
    if t.is_empty() || t.chars().count() > max {
        return Err(bad(format!("`{field}` must be 1–{max} characters")));
    }
    Ok(t.to_owned())
}

/// One accounting-of-disclosures request (45 CFR 164.528) and its clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountingRequest {
    pub id: String,
    pub patient: String,
    /// `YYYY-MM-DD`.
    pub requested: String,
    #[serde(flatten)]
    pub clock: AccountingClock,
    /// The written reason for the one extension, when taken.
    #[serde(default)]
    pub extension_reason: Option<String>,
    /// `open` or `provided`.
    pub status: String,
    pub recorded_by: String,
}

/// Training program settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSettings {
    /// Days after a course falls due before PHI access closes.
    pub grace_days: u32,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        TrainingSettings {
            grace_days: training::DEFAULT_GRACE_DAYS,
        }
    }
}

/// A completion as a request gives it: `user` absent means the caller (self-attestation,
/// dated today); an officer may record another's completion with its date.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionInput {
    #[serde(default)]
    pub user: Option<String>,
    pub course: String,
    #[serde(default)]
    pub completed: Option<String>,
    pub attestation: String,
}

/// The training dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingDashboard {
    pub settings: TrainingSettings,
    pub courses: Vec<Course>,
    pub standings: Vec<Standing>,
    /// `(department, learners, current)`.
    pub departments: Vec<(String, usize, usize)>,
    pub phishing: Vec<PhishingResult>,
}

/// What an officer does to an incident (`POST /api/incidents/{id}` with `{"action": …}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum IncidentAction {
    /// Sets the severity (the notification tree tells more roles as it rises).
    Severity { severity: String },
    /// Gives a response role to a user.
    Assign { role: String, user: String },
    /// Applies a playbook: its tasks join the task list.
    Playbook { playbook: String },
    /// Marks a task done.
    Task { task: u32 },
    /// Records a phase (`contained`, `eradicated`, `recovered`, or `detected` to correct the
    /// detection time); `at` RFC 3339, default now.
    Phase {
        phase: String,
        #[serde(default)]
        at: Option<String>,
    },
    /// The caller acknowledges their notice.
    Acknowledge,
    /// Attaches evidence (sealed).
    Evidence { name: String, content: String },
    /// The accounts and the window under investigation (RFC 3339).
    Scope {
        accounts: Vec<String>,
        from: String,
        to: String,
    },
    /// Computes the affected individuals from the audit log for the scope.
    ComputeAffected,
    /// Links the asset (inventory id) a lost-device incident is about.
    Asset { asset: String },
    /// Assesses breach from what the incident knows, with `facts` overriding.
    Assess {
        #[serde(default)]
        facts: Option<Value>,
    },
    /// A note on the timeline.
    Note { text: String },
    /// Closes the incident.
    Close { note: String },
}

/// A new incident opened by hand.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewIncident {
    pub title: String,
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub playbook: Option<String>,
    #[serde(default)]
    pub patients: Vec<String>,
}

/// The HHS breach report's fields (the OCR breach portal's form), from an incident.
#[derive(Debug, Clone, Serialize)]
pub struct HhsReport {
    pub report_type: &'static str,
    pub breach_start: String,
    pub breach_end: String,
    pub discovery_date: String,
    pub approximate_individuals_affected: u64,
    pub individuals_by_state: BTreeMap<String, u64>,
    pub type_of_breach: String,
    pub location_of_breached_information: String,
    pub type_of_phi_involved: Vec<&'static str>,
    pub brief_description: String,
    pub safeguards_in_place_prior: Vec<&'static str>,
    pub individual_notice_provided_by: Option<String>,
    pub substitute_notice_required: bool,
    pub media_notice_required_in: Vec<String>,
    pub actions_taken: Vec<String>,
    pub decision: Decision,
}

/// The environment facts the server knows (TLS), passed to the safeguards report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// E.g. `TLS 1.3 only`.
    pub tls: Option<String>,
    /// The serving certificate's `notAfter` (Unix seconds).
    pub certificate_not_after: Option<i64>,
    /// The dependency advisory check of the running build.
    pub supply_chain: Option<SupplyChain>,
}

/// The result of checking the running build's dependencies against a vulnerability
/// advisory database (RustSec), for the safeguards report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SupplyChain {
    /// An advisory database was read.
    pub checked: bool,
    /// It names no vulnerability in the build.
    pub clean: bool,
    /// What was found, with the database's date and the build's age.
    pub text: String,
}

/// The covered entity's contact procedures for breach notices (45 CFR 164.404(c)(1)(E)):
/// a toll-free number, an e-mail address, a postal address, a web site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeSettings {
    pub organization: String,
    pub toll_free_phone: String,
    pub email: String,
    pub postal_address: String,
    #[serde(default)]
    pub website: Option<String>,
}

/// The safeguards report.
#[derive(Debug, Clone, Serialize)]
pub struct SafeguardsReport {
    pub generated_at: i64,
    pub assessed: Vec<Assessed>,
    /// HICP practice → in place now.
    pub practices: Vec<(u8, bool)>,
    /// HICP practices in place at every review of the last 12 months (HITECH §13412).
    pub practices_12_months: Vec<u8>,
    pub reviews_12_months: usize,
    /// Failing live evidence.
    pub findings: Vec<Assessed>,
    pub risks: Vec<Risk>,
    pub last_review: Option<String>,
    pub next_review_due: String,
}

/// One reminder shown on sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reminder {
    /// `YYYY-MM-DD` or RFC 3339.
    pub due: String,
    pub text: String,
    /// A console path to act on it.
    pub link: String,
    pub overdue: bool,
}

impl Vault {
    /// Tells the gate what the serving process knows about its transport (TLS versions,
    /// certificate expiry), for the safeguards report's evidence.
    pub fn set_environment(&self, env: Environment) {
        if let Ok(mut e) = self.environment.write() {
            *e = env;
        }
    }

    fn environment_now(&self) -> Environment {
        self.environment
            .read()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Now, by the gate's clock (what rules taking time as a parameter are given).
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    fn today(&self) -> Date {
        self.clock.now().date()
    }

    /// An act of the compliance program: decided, run, committed with its audit record; a
    /// refusal recorded with why.
    pub(crate) fn comply<T>(
        &self,
        c: &Caller,
        op: Operation,
        detail: String,
        f: impl FnOnce(&mut AuditRecord) -> Result<(Vec<Op>, Vec<AuditRecord>, T), VaultError>,
    ) -> Result<T, VaultError> {
        let Some(mut rec) = self.operate(c, op, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(detail);
        let _lock = COMPLIANCE.lock().unwrap_or_else(|p| p.into_inner());
        match f(&mut rec) {
            Ok((ops, mut more, out)) => {
                more.insert(0, rec);
                self.commit(ops, more)?;
                Ok(out)
            }
            Err(e) => {
                rec.outcome = match e {
                    VaultError::NotFound => Outcome::NotFound,
                    VaultError::SeparationOfDuties(_) => Outcome::Denied,
                    _ => Outcome::Failure,
                };
                let why: String = e.to_string().chars().take(200).collect();
                rec.detail = Some(format!(
                    "{} refused: {why}",
                    rec.detail.take().unwrap_or_default()
                ));
                self.audit(vec![rec])?;
                Err(e)
            }
        }
    }

    /// A read of the program, audited.
    pub(crate) fn comply_read(
        &self,
        c: &Caller,
        op: Operation,
        detail: &str,
    ) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, op, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(detail.to_owned());
        self.audit(vec![rec])
    }

    // ---- Accounting of disclosures requests (164.528) ----------------------------------

    /// `medvault disclosures request`, `POST /api/patients/{id}/accounting-requests`
    /// (privacy officers): records a patient's request for an accounting of disclosures
    /// received on `requested` (`YYYY-MM-DD`), with its clock.
    ///
    /// # Errors
    /// Denied; `BadRequest` for a malformed or future date or patient id; `NotFound` for a
    /// patient without a chart.
    pub fn request_accounting(
        &self,
        c: &Caller,
        patient: &str,
        requested: &str,
    ) -> Result<AccountingRequest, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            "accounting request".into(),
            |rec| {
                let pid = PatientId::new(patient.trim()).map_err(|_| bad("invalid patient id"))?;
                rec.patient = Some(pid.as_str().to_owned());
                if self.store.patient_key(&pid)?.is_none() {
                    return Err(VaultError::NotFound);
                }
                let clock = acct::accounting_request(requested, self.today()).map_err(bad)?;
                let r = AccountingRequest {
                    id: medvault_types::random_uuid(),
                    patient: pid.as_str().to_owned(),
                    requested: requested.trim().to_owned(),
                    clock,
                    extension_reason: None,
                    status: "open".into(),
                    recorded_by: c.actor().to_owned(),
                };
                rec.detail = Some(format!(
                    "accounting request={} respond_by={}",
                    r.id, r.clock.respond_by
                ));
                let op = self.put(ACCOUNTING, &r.id, &r.status, &r.patient, &r)?;
                Ok((vec![op], vec![], r))
            },
        )
    }

    /// `GET /api/accounting-requests`: every request, soonest deadline first.
    ///
    /// # Errors
    /// Denied.
    pub fn accounting_requests(&self, c: &Caller) -> Result<Vec<AccountingRequest>, VaultError> {
        self.comply_read(c, Operation::PrivacyRequests, "accounting requests")?;
        let mut v: Vec<AccountingRequest> = self.rows(ACCOUNTING)?;
        v.sort_by(|a, b| a.clock.respond_by.cmp(&b.clock.respond_by));
        Ok(v)
    }

    /// `POST /api/accounting-requests/{id}/extend {"reason"}`: the one 30-day extension,
    /// with the written reason the patient is given (164.528(c)(1)(ii));
    /// `POST /api/accounting-requests/{id}/provided`: the accounting was provided.
    ///
    /// # Errors
    /// Denied; `NotFound`; `Duplicate` for a second extension or a closed request.
    pub fn update_accounting(
        &self,
        c: &Caller,
        id: &str,
        extend_reason: Option<&str>,
    ) -> Result<AccountingRequest, VaultError> {
        self.comply(
            c,
            Operation::PrivacyRequests,
            format!(
                "accounting request={}",
                id.chars().take(64).collect::<String>()
            ),
            |rec| {
                let mut r: AccountingRequest = self
                    .row(ACCOUNTING, id.trim())?
                    .ok_or(VaultError::NotFound)?;
                rec.patient = Some(r.patient.clone());
                if r.status != "open" {
                    return Err(VaultError::Duplicate(
                        "the accounting was already provided".into(),
                    ));
                }
                match extend_reason {
                    Some(reason) => {
                        let reason = text("reason", reason, TEXT_CHARS)?;
                        r.clock.respond_by =
                            acct::extend(&r.clock.respond_by, r.extension_reason.is_some())
                                .map_err(VaultError::Duplicate)?;
                        r.extension_reason = Some(reason);
                        rec.detail = Some(format!(
                            "accounting request={} extended respond_by={}",
                            r.id, r.clock.respond_by
                        ));
                    }
                    None => {
                        r.status = "provided".into();
                        rec.detail = Some(format!("accounting request={} provided", r.id));
                    }
                }
                let op = self.put(ACCOUNTING, &r.id, &r.status, &r.patient, &r)?;
                Ok((vec![op], vec![], r))
            },
        )
    }

    // ---- Training (164.308(a)(5)) --------------------------------------------------------

    fn training_settings_now(&self) -> Result<TrainingSettings, VaultError> {
        Ok(self.row(TRAINING_SETTINGS, "settings")?.unwrap_or_default())
    }

    /// Users an administrator has blocked (their training is not current whatever they
    /// complete).
    fn training_blocks(&self) -> Result<BTreeSet<String>, VaultError> {
        Ok(self
            .store
            .governance(TRAINING_BLOCK)?
            .into_iter()
            .filter(|r| r.status == "blocked")
            .map(|r| r.subject)
            .collect())
    }

    /// The training program as stored: courses, completions, settings.
    fn program(&self) -> Result<(Vec<Course>, Vec<Completion>, TrainingSettings), VaultError> {
        Ok((
            self.rows(COURSE)?,
            self.rows(COMPLETION)?,
            self.training_settings_now()?,
        ))
    }

    /// The training facts to write so every user with assigned courses has the
    /// `training_current` their standing gives (users whose role has no course keep the
    /// value an administrator set), and one audit record per change.
    fn training_sync(
        &self,
        courses: &[Course],
        completions: &[Completion],
        settings: &TrainingSettings,
        by: &Caller,
    ) -> Result<Synced, VaultError> {
        let today = self.today();
        let mut ops = vec![];
        let mut recs = vec![];
        let mut out = vec![];
        let blocked = self.training_blocks()?;
        for u in self.identity.accounts().map_err(crate::auth::id_err)? {
            if blocked.contains(&u.username) {
                // An administrator's block holds: the program neither lifts nor reports it.
                let mut s = training::standing(
                    &u.username,
                    &u.role,
                    courses,
                    completions,
                    settings.grace_days,
                    today,
                );
                s.current = false;
                out.push(s);
                continue;
            }
            let s = training::standing(
                &u.username,
                &u.role,
                courses,
                completions,
                settings.grace_days,
                today,
            );
            if !s.courses.is_empty() && s.current != u.training_current {
                ops.extend(
                    self.identity
                        .set_training(&u.username, s.current)
                        .map_err(crate::auth::id_err)?,
                );
                let mut r = self.record(by, Operation::SetTraining.as_str(), Outcome::Success);
                r.detail = Some(format!(
                    "user={} training_current={} (training program)",
                    u.username, s.current
                ));
                recs.push(r);
            }
            out.push(s);
        }
        Ok((ops, recs, out))
    }

    /// The server's periodic training sweep (and after every training change): closes PHI
    /// access for staff whose courses lapsed past the grace period, reopens it for those now
    /// current. Returns the users changed.
    ///
    /// # Errors
    /// Storage and audit failures.
    pub fn training_sweep(&self, system: &Caller) -> Result<Vec<String>, VaultError> {
        let _lock = COMPLIANCE.lock().unwrap_or_else(|p| p.into_inner());
        let courses: Vec<Course> = self.rows(COURSE)?;
        if courses.is_empty() {
            return Ok(vec![]);
        }
        let completions: Vec<Completion> = self.rows(COMPLETION)?;
        let (ops, recs, _) = self.training_sync(
            &courses,
            &completions,
            &self.training_settings_now()?,
            system,
        )?;
        let changed = recs.iter().filter_map(|r| r.detail.clone()).collect();
        if !recs.is_empty() {
            self.commit(ops, recs)?;
        }
        Ok(changed)
    }

    /// `PUT /api/training/courses/{id}` (privacy and security officers): adds or changes a
    /// course and the roles it is assigned to; standings are recomputed at once.
    ///
    /// # Errors
    /// Denied; `BadRequest` for a malformed course.
    pub fn put_course(&self, c: &Caller, mut course: Course) -> Result<Course, VaultError> {
        self.comply(
            c,
            Operation::TrainingManage,
            "training course".into(),
            |rec| {
                training::check_course(&mut course, self.today()).map_err(bad)?;
                for r in &course.roles {
                    let role: Role = r.parse().map_err(|_| {
                        bad(format!(
                            "unknown role `{}`",
                            r.chars().take(40).collect::<String>()
                        ))
                    })?;
                    if !role.is_staff() {
                        return Err(bad(format!("role `{role}` is not staff")));
                    }
                }
                rec.detail = Some(format!(
                    "training course={} roles={}",
                    course.id,
                    course.roles.join("+")
                ));
                let (mut courses, completions, settings) = self.program()?;
                courses.retain(|x| x.id != course.id);
                courses.push(course.clone());
                let (mut ops, recs, _) =
                    self.training_sync(&courses, &completions, &settings, c)?;
                ops.push(self.put(COURSE, &course.id, "active", "", &course)?);
                Ok((ops, recs, course))
            },
        )
    }

    /// `PUT /api/training/settings {"grace_days"}` (0–180).
    ///
    /// # Errors
    /// Denied; `BadRequest`.
    pub fn set_training_settings(
        &self,
        c: &Caller,
        s: TrainingSettings,
    ) -> Result<TrainingSettings, VaultError> {
        self.comply(
            c,
            Operation::TrainingManage,
            format!("training grace_days={}", s.grace_days),
            |_| {
                if s.grace_days > 180 {
                    return Err(bad("`grace_days` must be 0 to 180"));
                }
                let (courses, completions, _) = self.program()?;
                let (mut ops, recs, _) = self.training_sync(&courses, &completions, &s, c)?;
                ops.push(self.put(TRAINING_SETTINGS, "settings", "active", "", &s)?);
                Ok((ops, recs, s))
            },
        )
    }

    /// `POST /api/training/completions`: a completion with its attestation — the
    /// learner's own (any member of staff, dated today), or another's recorded by a privacy
    /// or security officer (with the date the vendor reports). PHI access reopens at once
    /// when the learner is now current.
    ///
    /// # Errors
    /// Denied; `BadRequest` for an unknown course or user, a course not assigned to the
    /// learner's role, a future date, a missing attestation.
    pub fn record_completion(
        &self,
        c: &Caller,
        input: CompletionInput,
    ) -> Result<Standing, VaultError> {
        let learner = input
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .unwrap_or(c.actor())
            .to_owned();
        let own = learner == c.actor();
        let op = if own {
            Operation::TrainingComplete
        } else {
            Operation::TrainingManage
        };
        self.comply(
            c,
            op,
            format!(
                "training completion user={} course={}",
                learner.chars().take(64).collect::<String>(),
                input.course.chars().take(64).collect::<String>()
            ),
            |_| {
                let (courses, mut completions, settings) = self.program()?;
                let course = courses
                    .iter()
                    .find(|x| x.id == input.course.trim())
                    .ok_or_else(|| bad("no such course"))?;
                let accounts = self.identity.accounts().map_err(crate::auth::id_err)?;
                let account = accounts
                    .iter()
                    .find(|a| a.username == learner)
                    .ok_or_else(|| bad("no such user"))?;
                if !course.roles.contains(&account.role) {
                    return Err(bad(format!(
                        "course {} is not assigned to role {}",
                        course.id, account.role
                    )));
                }
                let today = self.today();
                let completed = match input.completed.as_deref().filter(|d| !d.trim().is_empty()) {
                    Some(_) if own => return Err(bad("your own completion is dated today")),
                    Some(d) => {
                        let d =
                            medvault_governance::retention::date("completed", d).map_err(bad)?;
                        if d > today {
                            return Err(bad("`completed` is in the future"));
                        }
                        d
                    }
                    None => today,
                };
                let attestation = text("attestation", &input.attestation, training::TEXT_CHARS)?;
                let done = Completion {
                    user: learner.clone(),
                    course: course.id.clone(),
                    completed: day_text(completed),
                    attestation,
                    recorded_by: c.actor().to_owned(),
                };
                completions.push(done.clone());
                let (mut ops, recs, standings) =
                    self.training_sync(&courses, &completions, &settings, c)?;
                ops.push(self.put(
                    COMPLETION,
                    &medvault_types::random_uuid(),
                    "recorded",
                    &learner,
                    &done,
                )?);
                let s = standings
                    .into_iter()
                    .find(|s| s.user == learner)
                    .ok_or(VaultError::NotFound)?;
                Ok((ops, recs, s))
            },
        )
    }

    /// `POST /api/training/phishing` (CSV `user,campaign,clicked,reported,date`): imports
    /// a phishing exercise's results. Returns how many were imported.
    ///
    /// # Errors
    /// Denied; `BadRequest` naming the line.
    pub fn import_phishing(&self, c: &Caller, csv: &str) -> Result<usize, VaultError> {
        self.comply(
            c,
            Operation::TrainingManage,
            "phishing import".into(),
            |rec| {
                let rows = training::parse_phishing_csv(csv, self.today()).map_err(bad)?;
                let known: BTreeSet<String> = self
                    .identity
                    .accounts()
                    .map_err(crate::auth::id_err)?
                    .into_iter()
                    .map(|x| x.username)
                    .collect();
                if let Some(r) = rows.iter().find(|r| !known.contains(&r.user)) {
                    return Err(bad(format!(
                        "the result for `{}` (campaign {}) names no account; nothing was imported",
                        r.user.chars().take(64).collect::<String>(),
                        r.campaign.chars().take(64).collect::<String>()
                    )));
                }
                let mut ops = vec![];
                for r in &rows {
                    ops.push(self.put(
                        PHISHING,
                        &medvault_types::random_uuid(),
                        if r.clicked { "clicked" } else { "passed" },
                        &r.user,
                        r,
                    )?);
                }
                rec.detail = Some(format!("phishing import rows={}", rows.len()));
                Ok((ops, vec![], rows.len()))
            },
        )
    }

    /// `GET /api/training`: courses, every user's standing, completion per department,
    /// phishing results.
    ///
    /// # Errors
    /// Denied.
    pub fn training_dashboard(&self, c: &Caller) -> Result<TrainingDashboard, VaultError> {
        self.comply_read(c, Operation::TrainingRead, "training dashboard")?;
        let (courses, completions, settings) = self.program()?;
        let today = self.today();
        let blocked = self.training_blocks()?;
        let standings: Vec<Standing> = self
            .identity
            .accounts()
            .map_err(crate::auth::id_err)?
            .iter()
            .filter(|u| u.role != "patient")
            .map(|u| {
                let mut s = training::standing(
                    &u.username,
                    &u.role,
                    &courses,
                    &completions,
                    settings.grace_days,
                    today,
                );
                s.current &= !blocked.contains(&u.username);
                s
            })
            .collect();
        let departments: BTreeMap<String, String> =
            self.staff_profiles_unaudited()?.into_iter().collect();
        let mut phishing: Vec<PhishingResult> = self.rows(PHISHING)?;
        phishing.sort_by(|a, b| b.date.cmp(&a.date));
        Ok(TrainingDashboard {
            departments: training::by_department(&standings, &departments),
            settings,
            courses,
            standings,
            phishing,
        })
    }

    /// `GET /api/training/mine`: the caller's own standing (what sign-in reminds them of).
    ///
    /// # Errors
    /// `Unauthenticated` for a caller without an account.
    pub fn my_training(&self, c: &Caller) -> Result<Standing, VaultError> {
        let Some(role) = c.role() else {
            return Err(VaultError::Unauthenticated);
        };
        let (courses, completions, s) = self.program()?;
        let mut out = training::standing(
            c.actor(),
            role.as_str(),
            &courses,
            &completions,
            s.grace_days,
            self.today(),
        );
        out.current &= !self.training_blocks()?.contains(c.actor());
        Ok(out)
    }

    // ---- Incidents ------------------------------------------------------------------------

    fn load_incident(&self, id: &str) -> Result<Incident, VaultError> {
        let row = self
            .store
            .incidents()?
            .into_iter()
            .find(|i| i.id == id.trim())
            .ok_or(VaultError::NotFound)?;
        serde_json::from_str(&row.body)
            .map_err(|e| VaultError::Internal(format!("stored incident: {e}")))
    }

    /// `GET /api/incidents/{id}`.
    ///
    /// # Errors
    /// Denied; `NotFound`.
    pub fn incident(&self, c: &Caller, id: &str) -> Result<Incident, VaultError> {
        self.comply_read(
            c,
            Operation::Incidents,
            &format!("incident={}", id.chars().take(64).collect::<String>()),
        )?;
        self.load_incident(id)
    }

    /// `POST /api/incidents` (privacy and security officers): opens an incident by hand.
    ///
    /// # Errors
    /// Denied; `BadRequest` for an empty title, unknown severity or playbook, a bad
    /// patient id.
    pub fn open_incident(&self, c: &Caller, n: NewIncident) -> Result<Incident, VaultError> {
        self.comply(
            c,
            Operation::IncidentManage,
            "incident open".into(),
            |rec| {
                let title = text("title", &n.title, 300)?;
                let severity = n
                    .severity
                    .as_deref()
                    .map(Severity::parse)
                    .transpose()
                    .map_err(bad)?
                    .unwrap_or_default();
                let mut patients = vec![];
                for p in &n.patients {
                    let pid = PatientId::new(p.trim()).map_err(|_| bad("invalid patient id"))?;
                    if self.store.patient_key(&pid)?.is_none() {
                        return Err(bad(format!("no chart for patient {}", pid.as_str())));
                    }
                    patients.push(pid.as_str().to_owned());
                }
                let now = self.now_unix();
                let id = medvault_types::random_uuid();
                let mut i = Incident::open(&id, IncidentSource::Manual, patients, c.actor(), now);
                i.response.title = title;
                i.response.severity = severity;
                if let Some(p) = n.playbook.as_deref().filter(|p| !p.trim().is_empty()) {
                    apply_playbook(&mut i, p)?;
                    i.record(now, c.actor(), &format!("playbook {} applied", p.trim()));
                }
                rec.detail = Some(format!(
                    "incident={id} opened severity={}",
                    severity.as_str()
                ));
                Ok((
                    vec![Op::PutIncident(crate::break_glass::incident_row(&i)?)],
                    vec![],
                    i,
                ))
            },
        )
    }

    /// `POST /api/incidents/{id}` with an [`IncidentAction`]: one step of the response,
    /// on the timeline and in the audit log.
    ///
    /// # Errors
    /// Denied; `NotFound`; `BadRequest` for a malformed step; `Duplicate` for a closed
    /// incident or a repeated step.
    pub fn act_on_incident(
        &self,
        c: &Caller,
        id: &str,
        action: IncidentAction,
    ) -> Result<Incident, VaultError> {
        // Acknowledging one's own notice is open to whoever holds the role.
        let op = if matches!(action, IncidentAction::Acknowledge) {
            Operation::Incidents
        } else {
            Operation::IncidentManage
        };
        let detail = format!("incident={}", id.chars().take(64).collect::<String>());
        self.comply(c, op, detail.clone(), |rec| {
            let mut i = self.load_incident(id)?;
            if i.status == IncidentStatus::Closed {
                return Err(VaultError::Duplicate("the incident is closed".into()));
            }
            let now = self.now_unix();
            let me = c.actor().to_owned();
            let mut ops = vec![];
            let mut more = vec![];
            let what: String = match action {
                IncidentAction::Severity { severity } => {
                    let s = Severity::parse(&severity).map_err(bad)?;
                    i.response.severity = s;
                    format!("severity set to {}", s.as_str())
                }
                IncidentAction::Assign { role, user } => {
                    let role = role.trim().to_owned();
                    if !response::ROLES.contains(&role.as_str()) {
                        return Err(bad(format!(
                            "unknown response role: one of {}",
                            response::ROLES.join(", ")
                        )));
                    }
                    let user = user.trim().to_owned();
                    let accounts = self.identity.accounts().map_err(crate::auth::id_err)?;
                    if !accounts
                        .iter()
                        .any(|a| a.username == user && !a.disabled && a.role != "patient")
                    {
                        return Err(bad("no such member of staff"));
                    }
                    i.response.roles.insert(role.clone(), user.clone());
                    format!("{user} is {role}")
                }
                IncidentAction::Playbook { playbook } => {
                    apply_playbook(&mut i, &playbook)?;
                    format!("playbook {} applied", playbook.trim())
                }
                IncidentAction::Task { task } => {
                    let t = i
                        .response
                        .tasks
                        .iter_mut()
                        .find(|t| t.id == task)
                        .ok_or_else(|| bad("no such task"))?;
                    if t.done_at.is_some() {
                        return Err(VaultError::Duplicate("that task is already done".into()));
                    }
                    t.done_by = Some(me.clone());
                    t.done_at = Some(now);
                    format!("task {task} done: {}", t.text)
                }
                IncidentAction::Phase { phase, at } => {
                    let at = match at.as_deref() {
                        Some(a) => {
                            let t = OffsetDateTime::parse(
                                a.trim(),
                                &time::format_description::well_known::Rfc3339,
                            )
                            .map_err(|_| bad("`at` must be RFC 3339"))?
                            .unix_timestamp();
                            if t > now + 300 {
                                return Err(bad("`at` is in the future"));
                            }
                            t
                        }
                        None => now,
                    };
                    i.response
                        .phases
                        .set(&phase, at, i.opened_at)
                        .map_err(bad)?;
                    format!("phase {}", phase.trim())
                }
                IncidentAction::Acknowledge => {
                    let n = i
                        .response
                        .notices
                        .iter_mut()
                        .filter(|n| n.user == me && n.acknowledged_at.is_none())
                        .fold(0, |k, n| {
                            n.acknowledged_at = Some(now);
                            k + 1
                        });
                    if n == 0 {
                        return Err(bad("you have no notice to acknowledge on this incident"));
                    }
                    "notice acknowledged".into()
                }
                IncidentAction::Evidence { name, content } => {
                    let name = text("name", &name, 200)?;
                    if content.is_empty() || content.len() > EVIDENCE_BYTES {
                        return Err(bad(format!("evidence must be 1 to {EVIDENCE_BYTES} bytes")));
                    }
                    let eid = medvault_types::random_uuid();
                    let digest = format!(
                        "sha256:{}",
                        sha2::Sha256::digest(content.as_bytes())
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                    );
                    ops.push(self.put(
                        EVIDENCE,
                        &eid,
                        "sealed",
                        &i.id,
                        &serde_json::json!({"incident": i.id, "name": name, "content": content}),
                    )?);
                    i.response.evidence.push(EvidenceRef {
                        id: eid,
                        name: name.clone(),
                        sha256: digest.clone(),
                        bytes: content.len() as u64,
                        added_by: me.clone(),
                        added_at: now,
                    });
                    format!("evidence attached: {name} ({digest})")
                }
                IncidentAction::Scope { accounts, from, to } => {
                    let t = |f: &str, v: &str| {
                        OffsetDateTime::parse(
                            v.trim(),
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map(|t| t.unix_timestamp())
                        .map_err(|_| bad(format!("`{f}` must be RFC 3339")))
                    };
                    let (from, to) = (t("from", &from)?, t("to", &to)?);
                    if to < from {
                        return Err(bad("`to` is before `from`"));
                    }
                    if from > now + 300 {
                        return Err(bad("`from` is in the future"));
                    }
                    if to > now + 86_400 || from < now - 10 * 366 * 86_400 {
                        return Err(bad(
                            "the window must lie within the last ten years and end by tomorrow",
                        ));
                    }
                    let mut a: Vec<String> = accounts
                        .iter()
                        .map(|x| x.trim().to_owned())
                        .filter(|x| !x.is_empty())
                        .collect();
                    a.sort();
                    a.dedup();
                    if a.is_empty() || a.len() > 100 {
                        return Err(bad("`accounts` must name 1 to 100 accounts"));
                    }
                    let known: BTreeSet<String> = self
                        .identity
                        .accounts()
                        .map_err(crate::auth::id_err)?
                        .into_iter()
                        .map(|x| x.username)
                        .collect();
                    if let Some(x) = a.iter().find(|x| !known.contains(*x)) {
                        return Err(bad(format!(
                            "no such account: {}",
                            x.chars().take(64).collect::<String>()
                        )));
                    }
                    i.response.accounts = a.clone();
                    i.response.window = Some((from, to));
                    format!("scope: {} account(s), window set", a.len())
                }
                IncidentAction::ComputeAffected => {
                    let (by_state, ids, reads) = self.affected_from_log(c, &i)?;
                    let total: u64 = by_state.values().sum();
                    more.extend(reads);
                    i.response.affected = by_state;
                    let mut all: BTreeSet<String> = i.patients.iter().cloned().collect();
                    all.extend(ids);
                    i.patients = all.into_iter().collect();
                    format!("affected individuals computed from the audit log: {total}")
                }
                IncidentAction::Asset { asset } => {
                    let a: Asset = self
                        .row(ASSET, asset.trim())?
                        .ok_or_else(|| bad("no such asset in the inventory"))?;
                    i.response.asset = Some(a.id.clone());
                    format!(
                        "asset {} ({}, {}) linked",
                        a.id,
                        a.kind,
                        if response::device_encrypted(&a) {
                            "encrypted"
                        } else {
                            "not known to be encrypted"
                        }
                    )
                }
                IncidentAction::Assess { facts } => {
                    let f = self.incident_facts(&i, facts)?;
                    let d = breach::assess(&f, self.clock.now()).map_err(bad)?;
                    let line = format!(
                        "breach assessed: {} ({})",
                        if d.breach {
                            "breach"
                        } else {
                            "not a notifiable breach"
                        },
                        d.reason.as_str()
                    );
                    i.response.facts = Some(f);
                    i.response.decision = Some(d);
                    line
                }
                IncidentAction::Note { text: t } => text("text", &t, TEXT_CHARS)?,
                IncidentAction::Close { note } => {
                    let note = text("note", &note, TEXT_CHARS)?;
                    i.status = IncidentStatus::Closed;
                    i.response.closed_at = Some(now);
                    format!("closed: {note}")
                }
            };
            // The notification tree: whoever the severity calls for and holds a role is told.
            for (role, user) in i.response.due_notices() {
                i.response.notices.push(Notice {
                    role: role.clone(),
                    user: user.clone(),
                    notified_at: now,
                    acknowledged_at: None,
                });
                i.record(
                    now,
                    &me,
                    &format!(
                        "notified {user} ({role}) at severity {}",
                        i.response.severity.as_str()
                    ),
                );
            }
            i.record(now, &me, &what);
            rec.detail = Some(format!(
                "{detail} {}",
                what.chars().take(120).collect::<String>()
            ));
            ops.push(Op::PutIncident(crate::break_glass::incident_row(&i)?));
            Ok((ops, more, i))
        })
    }

    /// The facts an incident gives the breach rule: discovery from its detection, the
    /// affected per state, the lost device's encryption; `overrides` (the officer's
    /// findings, the contract's fields) win.
    fn incident_facts(&self, i: &Incident, overrides: Option<Value>) -> Result<Facts, VaultError> {
        let overrides = match overrides {
            None => serde_json::Map::new(),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(bad("`facts` must be an object")),
        };
        // Dates are the covered entity's: the site's offset from UTC (records settings).
        let offset = self.site()?.offset()?;
        let local = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(|t| t.to_offset(offset).date())
                .map_err(bad)
        };
        let detected = i.response.phases.detected.unwrap_or(i.opened_at);
        let mut base = serde_json::Map::new();
        let gdpr = overrides
            .get("jurisdiction")
            .and_then(Value::as_str)
            .is_some_and(|j| j.trim().eq_ignore_ascii_case("GDPR"));
        // HIPAA counts calendar days in the covered entity's time zone; GDPR's 72 hours run
        // from the instant of awareness.
        let discovered = if gdpr {
            OffsetDateTime::from_unix_timestamp(detected)
                .map_err(bad)?
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(bad)?
        } else {
            day_text(local(detected)?)
        };
        base.insert("discovered".into(), Value::String(discovered));
        let total: u64 = i.response.affected.values().sum();
        if gdpr {
            // GDPR counts data subjects, not residents of US states.
            if total > 0 {
                base.insert("affected_eu_subjects".into(), serde_json::json!(total));
            }
        } else {
            let known: BTreeMap<&String, &u64> = i
                .response
                .affected
                .iter()
                .filter(|(k, _)| k.as_str() != UNKNOWN_STATE)
                .collect();
            if !known.is_empty() {
                base.insert("affected".into(), serde_json::to_value(known).map_err(bad)?);
            }
            if let Some(n) = i.response.affected.get(UNKNOWN_STATE) {
                base.insert("affected_unknown_residence".into(), serde_json::json!(n));
            }
        }
        // The lost device's encryption comes from the inventory: a finding that says
        // otherwise contradicts it.
        if let Some(a) = &i.response.asset {
            if let Some(asset) = self.row::<Asset>(ASSET, a)? {
                let enc = response::device_encrypted(&asset);
                if overrides
                    .get("phi_encrypted_at_rest")
                    .is_some_and(|v| v.as_bool() != Some(enc))
                {
                    return Err(bad(format!(
                        "contradictory facts: the inventory says asset {} is {}; correct the inventory, not the assessment",
                        asset.id,
                        if enc { "encrypted (checked)" } else { "not known to be encrypted" }
                    )));
                }
                base.insert("phi_encrypted_at_rest".into(), serde_json::json!(enc));
            }
        }
        for (k, v) in overrides {
            base.insert(k, v);
        }
        let f = breach::parse_facts(&Value::Object(base).to_string()).map_err(bad)?;
        // A breach is not discovered before it began.
        if let (Some(d), Some((from, _))) = (f.discovered.as_deref(), i.response.window) {
            let began = day_text(local(from)?);
            if d.get(..10).is_some_and(|d| d < began.as_str()) {
                return Err(bad(format!(
                    "contradictory facts: `discovered` ({d}) is before the incident's window begins ({began})"
                )));
            }
        }
        Ok(f)
    }

    /// The patients the incident's accounts opened (records disclosed to them) within its
    /// window, counted per state of residence from each chart's Patient address; each
    /// chart's address read is audited as this incident's work.
    #[expect(
        clippy::type_complexity,
        reason = "counts, ids and the reads' records, used once"
    )]
    fn affected_from_log(
        &self,
        c: &Caller,
        i: &Incident,
    ) -> Result<(BTreeMap<String, u64>, Vec<String>, Vec<AuditRecord>), VaultError> {
        let Some((from, to)) = i.response.window else {
            return Err(bad("set the incident's scope (accounts and window) first"));
        };
        let accounts: BTreeSet<&str> = i.response.accounts.iter().map(String::as_str).collect();
        let fmt = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(medvault_types::fhir_instant)
                .map_err(bad)
        };
        let (lo, hi) = (fmt(from)?, fmt(to)?);
        let mut patients: BTreeSet<String> = BTreeSet::new();
        let end = self.store.audit_len()?;
        let mut start = 0;
        while start < end {
            let stop = (start + 20_000).min(end);
            for row in self.store.audit_range(start, stop)? {
                let Ok(r) = AuditRecord::from_canonical(&row.record) else {
                    continue;
                };
                if r.outcome == Outcome::Success
                    && accounts.contains(r.actor.as_str())
                    && !r.categories_disclosed.is_empty()
                    && r.time.as_str() >= lo.as_str()
                    && r.time.as_str() <= hi.as_str()
                {
                    if let Some(p) = r.patient {
                        patients.insert(p);
                    }
                }
            }
            start = stop;
        }
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        let mut reads = vec![];
        for p in &patients {
            let (state, rec) = self.residence_state(c, p, &i.id)?;
            reads.extend(rec);
            *by_state
                .entry(state.unwrap_or_else(|| UNKNOWN_STATE.to_owned()))
                .or_default() += 1;
        }
        Ok((by_state, patients.into_iter().collect(), reads))
    }

    /// The newest Patient resource of a chart, opened under the incident operation's
    /// permission (audited with the returned record), as JSON.
    fn incident_patient(
        &self,
        c: &Caller,
        patient: &str,
        incident: &str,
        why: &str,
    ) -> Result<OpenedPatient, VaultError> {
        let Ok(pid) = PatientId::new(patient) else {
            return Ok((None, None));
        };
        let rows = match self.store.chart_versions(&pid) {
            Ok(r) => r,
            Err(medvault_store::StoreError::NotFound) => return Ok((None, None)),
            Err(e) => return Err(e.into()),
        };
        let Some(newest) = rows
            .into_iter()
            .filter(|r| r.rtype() == "Patient" && !r.deleted())
            .max_by_key(medvault_store::Sealed::version)
        else {
            return Ok((None, None));
        };
        let decision = self.decide_operation(c, Operation::IncidentManage);
        let mut rec = self.record(c, Operation::IncidentManage.as_str(), Outcome::Success);
        rec.patient = Some(patient.to_owned());
        rec.detail = Some(format!("incident={incident} {why}"));
        rec.categories_disclosed = vec!["demographics".into()];
        let Ok(p) = crate::typestate::permit(&decision, newest, &mut rec) else {
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        };
        let opened = self.open_all(vec![p])?;
        let json = opened.into_iter().find_map(|d| d.json().cloned());
        Ok((json, Some(rec)))
    }

    fn residence_state(
        &self,
        c: &Caller,
        patient: &str,
        incident: &str,
    ) -> Result<(Option<String>, Option<AuditRecord>), VaultError> {
        let (j, rec) = self.incident_patient(
            c,
            patient,
            incident,
            "residence state for breach notification",
        )?;
        let state = j.as_ref().and_then(|j| {
            let s = home_address(j)?
                .get("state")?
                .as_str()?
                .trim()
                .to_ascii_uppercase();
            breach::US_JURISDICTIONS.contains(&s.as_str()).then_some(s)
        });
        Ok((state, rec))
    }

    /// `GET /api/incidents/{id}/letter?patient=P` (privacy officers): the individual notice
    /// of 45 CFR 164.404(c) for one affected patient, addressed from the chart (the read is
    /// audited).
    ///
    /// # Errors
    /// Denied; `NotFound`; `BadRequest` before the breach is assessed as one, or for a
    /// patient the incident does not list.
    pub fn breach_letter(&self, c: &Caller, id: &str, patient: &str) -> Result<String, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::IncidentManage, Some(patient))? else {
            return Err(VaultError::Unauthenticated);
        };
        let i = self.load_incident(id)?;
        if i.response
            .facts
            .as_ref()
            .is_some_and(|f| breach::is_gdpr(f).unwrap_or(false))
        {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!(
                "incident={} letter refused: assessed under GDPR",
                i.id
            ));
            self.audit(vec![rec])?;
            return Err(bad("the incident is assessed under GDPR: the 45 CFR 164.404 letter does not apply (GDPR Art. 34 communication is written by the controller)"));
        }
        let Some(d) = i.response.decision.as_ref().filter(|d| d.breach) else {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!(
                "incident={} letter refused: not assessed as a breach",
                i.id
            ));
            self.audit(vec![rec])?;
            return Err(bad("the incident is not assessed as a notifiable breach"));
        };
        if !i.patients.iter().any(|p| p == patient) {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!(
                "incident={} letter refused: patient not affected",
                i.id
            ));
            self.audit(vec![rec])?;
            return Err(bad(
                "that patient is not among the incident's affected individuals",
            ));
        }
        let Some(notice) = self.row::<NoticeSettings>(SETTINGS, "notice")? else {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!(
                "incident={} letter refused: no contact procedures",
                i.id
            ));
            self.audit(vec![rec])?;
            return Err(bad(
                "set the notice's contact procedures first (45 CFR 164.404(c)(1)(E)): PUT /api/compliance/notice {organization, toll_free_phone, email, postal_address, website}",
            ));
        };
        let (j, read) = self.incident_patient(c, patient, &i.id, "breach notification letter")?;
        let j = j.ok_or(VaultError::NotFound)?;
        let name = {
            let (family, given) = crate::detection::name_parts(
                j.get("name")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first()),
            );
            let n = format!("{given} {family}").trim().to_owned();
            if n.is_empty() {
                "Patient".to_owned()
            } else {
                n
            }
        };
        let address = home_address(&j)
            .map(|a| {
                let mut lines: Vec<String> = a
                    .get("line")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                let f = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                lines.push(
                    format!("{} {} {}", f("city"), f("state"), f("postalCode"))
                        .trim()
                        .to_owned(),
                );
                lines.join("\n")
            })
            .unwrap_or_default();
        let when = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(|t| day_text(t.date()))
                .unwrap_or_default()
        };
        let discovered = i
            .response
            .facts
            .as_ref()
            .and_then(|f| f.discovered.clone())
            .unwrap_or_else(|| when(i.opened_at));
        let began = i
            .response
            .window
            .map_or_else(|| discovered.clone(), |w| when(w.0));
        let letter = format!(
            "{org}\n{org_address}\n\n{name}\n{address}\n\nNotice of a breach of your health information\n\n\
What happened. On {discovered} we discovered that your health information was accessed or disclosed without \
authorization. The access began on or about {began}.\n\n\
What information was involved. The information in your medical record that was involved may include your name, \
address, date of birth, and clinical information such as diagnoses, medications and test results.\n\n\
What you can do. Review the statements you receive from your health plan and providers, and tell us about any \
service you did not receive. You may ask us for an accounting of disclosures of your health information and for \
a copy of your record.\n\n\
What we are doing. We have investigated the incident, limited the access that caused it, applied our sanctions \
policy, and are reviewing our safeguards to prevent it from happening again.\n\n\
For more information. Contact our Privacy Officer: telephone {phone} (toll-free), e-mail {email}, \
{web}or write to {org_address_line}; please quote reference {id}.\n\n\
This notice is provided under 45 CFR 164.404. It is sent no later than {by}.\n",
            id = i.id,
            by = d.individuals_by.clone().unwrap_or_default(),
            org = notice.organization,
            org_address = notice.postal_address,
            org_address_line = notice.postal_address.replace('\n', ", "),
            phone = notice.toll_free_phone,
            email = notice.email,
            web = notice
                .website
                .as_deref()
                .map(|w| format!("web {w}, "))
                .unwrap_or_default(),
        );
        rec.detail = Some(format!("incident={} breach letter", i.id));
        let mut recs = vec![rec];
        recs.extend(read);
        self.commit(vec![], recs)?;
        Ok(letter)
    }

    /// `GET /api/incidents/{id}/hhs-report`: the HHS breach report's fields.
    ///
    /// # Errors
    /// Denied; `NotFound`; `BadRequest` before the breach is assessed as one.
    pub fn hhs_report(&self, c: &Caller, id: &str) -> Result<HhsReport, VaultError> {
        self.comply_read(
            c,
            Operation::Incidents,
            &format!(
                "incident={} hhs report",
                id.chars().take(64).collect::<String>()
            ),
        )?;
        let i = self.load_incident(id)?;
        if i.response
            .facts
            .as_ref()
            .is_some_and(|f| breach::is_gdpr(f).unwrap_or(false))
        {
            return Err(bad(
                "the incident is assessed under GDPR: there is no HHS report",
            ));
        }
        let (Some(d), Some(f)) = (
            i.response.decision.clone().filter(|d| d.breach),
            i.response.facts.clone(),
        ) else {
            return Err(bad("the incident is not assessed as a notifiable breach"));
        };
        let when = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(|t| day_text(t.date()))
                .unwrap_or_default()
        };
        let (start, end) = i
            .response
            .window
            .map_or((when(i.opened_at), when(i.opened_at)), |w| {
                (when(w.0), when(w.1))
            });
        let total = breach::affected_total(&f);
        let kind = match (
            &i.source,
            i.response.playbook.as_deref(),
            f.cause.as_deref(),
        ) {
            (_, _, Some(c)) if !c.trim().is_empty() => c.trim().to_owned(),
            (_, Some("lost_or_stolen_device"), _) => "Theft or loss".into(),
            (_, Some("ransomware"), _) => "Hacking/IT Incident".into(),
            (IncidentSource::MissingChart { .. }, _, _) | (_, Some("missing_paper_chart"), _) => {
                "Loss".into()
            }
            _ => "Unauthorized Access/Disclosure".into(),
        };
        let location = match (&i.source, i.response.playbook.as_deref()) {
            (IncidentSource::MissingChart { .. }, _) | (_, Some("missing_paper_chart")) => {
                "Paper/Films"
            }
            (_, Some("lost_or_stolen_device")) => "Laptop or other portable electronic device",
            (_, Some("ransomware")) => "Network Server",
            _ => "Electronic Medical Record",
        };
        Ok(HhsReport {
            report_type: if d.hhs == Some(breach::Hhs::Contemporaneous) { "Breach affecting 500 or more individuals" } else { "Breach affecting fewer than 500 individuals (annual log)" },
            breach_start: start,
            breach_end: end,
            discovery_date: f.discovered.clone().unwrap_or_default(),
            approximate_individuals_affected: total,
            individuals_by_state: {
                let mut m = f.affected.clone();
                if let Some(n) = f.affected_unknown_residence.filter(|n| *n > 0) {
                    m.insert(UNKNOWN_STATE.into(), n);
                }
                m
            },
            type_of_breach: kind,
            location_of_breached_information: location.into(),
            type_of_phi_involved: vec!["Demographic", "Clinical"],
            brief_description: if i.response.title.is_empty() { format!("Incident {}", i.id) } else { i.response.title.clone() },
            safeguards_in_place_prior: vec!["Privacy Rule safeguards (training, policies, sanctions)", "Security Rule technical safeguards (access controls, audit logs, encryption at rest)"],
            individual_notice_provided_by: d.individuals_by.clone(),
            substitute_notice_required: false,
            media_notice_required_in: d.media.clone().unwrap_or_default(),
            actions_taken: i.timeline.iter().map(|e| e.action.clone()).collect(),
            decision: d,
        })
    }

    /// `POST /api/breach/assess` (privacy and security officers): the breach rule alone
    /// over `facts` (JSON text); nothing is stored, the use is audited.
    ///
    /// # Errors
    /// Denied; `BadRequest` with the rule's message.
    pub fn assess_breach(&self, c: &Caller, facts: &str) -> Result<Decision, VaultError> {
        self.comply_read(
            c,
            Operation::IncidentManage,
            "breach assessment of stated facts",
        )?;
        breach::parse_facts(facts)
            .and_then(|f| breach::assess(&f, self.now()))
            .map_err(bad)
    }

    /// `GET /api/compliance/notice`: the contact procedures breach letters give.
    ///
    /// # Errors
    /// Denied; `NotFound` until set.
    pub fn notice_settings(&self, c: &Caller) -> Result<NoticeSettings, VaultError> {
        self.comply_read(c, Operation::ComplianceRead, "notice settings")?;
        self.row(SETTINGS, "notice")?.ok_or(VaultError::NotFound)
    }

    /// `PUT /api/compliance/notice` (privacy and security officers).
    ///
    /// # Errors
    /// Denied; `BadRequest` for an empty or over-long field, a phone without digits, an
    /// e-mail without `@`.
    pub fn set_notice_settings(
        &self,
        c: &Caller,
        mut n: NoticeSettings,
    ) -> Result<NoticeSettings, VaultError> {
        self.comply(
            c,
            Operation::ComplianceManage,
            "notice settings".into(),
            |_| {
                n.organization = text("organization", &n.organization, 200)?;
                n.toll_free_phone = text("toll_free_phone", &n.toll_free_phone, 40)?;
                n.email = text("email", &n.email, 200)?;
                n.postal_address = text("postal_address", &n.postal_address, 500)?;
                if !n.toll_free_phone.chars().any(|ch| ch.is_ascii_digit()) {
                    return Err(bad("`toll_free_phone` must be a telephone number"));
                }
                if !n.email.contains('@') {
                    return Err(bad("`email` must be an e-mail address"));
                }
                n.website = n
                    .website
                    .as_deref()
                    .map(str::trim)
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned);
                let op = self.put(SETTINGS, "notice", "active", "", &n)?;
                Ok((vec![op], vec![], n))
            },
        )
    }

    // ---- Asset inventory --------------------------------------------------------------------

    /// `PUT /api/assets/{id}` (privacy and security officers): adds or changes an asset.
    ///
    /// # Errors
    /// Denied; `BadRequest`.
    pub fn put_asset(&self, c: &Caller, mut a: Asset) -> Result<Asset, VaultError> {
        self.comply(c, Operation::IncidentManage, "asset".into(), |rec| {
            response::check_asset(&mut a, self.today()).map_err(bad)?;
            rec.detail = Some(format!(
                "asset={} status={} encrypted={}",
                a.id, a.status, a.encrypted
            ));
            let op = self.put(ASSET, &a.id, &a.status, "", &a)?;
            Ok((vec![op], vec![], a))
        })
    }

    /// `GET /api/assets`.
    ///
    /// # Errors
    /// Denied.
    pub fn assets(&self, c: &Caller) -> Result<Vec<Asset>, VaultError> {
        self.comply_read(c, Operation::ComplianceRead, "asset inventory")?;
        let mut v: Vec<Asset> = self.rows(ASSET)?;
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    // ---- Risk assessment ----------------------------------------------------------------------

    /// `POST /api/compliance/attestations`: an officer attests a safeguard without live
    /// evidence (owner, date, note).
    ///
    /// # Errors
    /// Denied; `BadRequest` for an unknown safeguard, a safeguard with live evidence, a
    /// future date.
    pub fn attest_safeguard(
        &self,
        c: &Caller,
        mut a: Attestation,
    ) -> Result<Attestation, VaultError> {
        self.comply(
            c,
            Operation::ComplianceManage,
            "safeguard attestation".into(),
            |rec| {
                let s = safeguards::SAFEGUARDS
                    .iter()
                    .find(|s| s.id == a.safeguard.trim())
                    .ok_or_else(|| bad("unknown safeguard"))?;
                if s.evidence.is_some() {
                    return Err(bad(format!(
                        "{} is decided by live evidence, not attestation",
                        s.id
                    )));
                }
                a.safeguard = s.id.to_owned();
                a.owner = text("owner", &a.owner, 200)?;
                a.note = text("note", &a.note, TEXT_CHARS)?;
                let d = if a.date.trim().is_empty() {
                    self.today()
                } else {
                    medvault_governance::retention::date("date", &a.date).map_err(bad)?
                };
                if d > self.today() {
                    return Err(bad("`date` is in the future"));
                }
                a.date = day_text(d);
                rec.detail = Some(format!(
                    "safeguard={} attested in_place={}",
                    a.safeguard, a.in_place
                ));
                let op = self.put(
                    ATTESTATION,
                    &medvault_types::random_uuid(),
                    "attested",
                    &a.safeguard,
                    &a,
                )?;
                Ok((vec![op], vec![], a))
            },
        )
    }

    /// `PUT /api/compliance/risks/{id}`: adds or changes a risk of the register.
    ///
    /// # Errors
    /// Denied; `BadRequest`.
    pub fn put_risk(&self, c: &Caller, mut r: Risk) -> Result<Risk, VaultError> {
        self.comply(c, Operation::ComplianceManage, "risk".into(), |rec| {
            r.check().map_err(bad)?;
            if r.id.trim().is_empty() {
                r.id = medvault_types::random_uuid();
            }
            rec.detail = Some(format!("risk={} score={}", r.id, r.score()));
            let op = self.put(RISK, &r.id, &r.treatment, "", &r)?;
            Ok((vec![op], vec![], r))
        })
    }

    /// `POST /api/compliance/reviews`: records the quarterly review — a snapshot of which
    /// HICP practices are in place now (what the 12-month view of recognized security
    /// practices is built from).
    ///
    /// # Errors
    /// Denied.
    pub fn record_review(&self, c: &Caller) -> Result<SafeguardsReport, VaultError> {
        let env = &self.environment_now();
        let report = self.safeguards_now(env)?;
        self.comply(c, Operation::ComplianceManage, "risk review".into(), |rec| {
            let snap = serde_json::json!({"date": day_text(self.today()), "practices": report.practices});
            rec.detail = Some(format!("risk review recorded; practices in place: {}", report.practices.iter().filter(|p| p.1).count()));
            let op = self.put(REVIEW, &medvault_types::random_uuid(), "recorded", "", &snap)?;
            Ok((vec![op], vec![], ()))
        })?;
        self.safeguards_now(env)
    }

    /// `GET /api/compliance/safeguards`: the Security Rule self-assessment with live
    /// evidence, findings, the risk register and the review cadence.
    ///
    /// # Errors
    /// Denied.
    pub fn safeguards(&self, c: &Caller) -> Result<SafeguardsReport, VaultError> {
        self.comply_read(c, Operation::ComplianceRead, "safeguards report")?;
        self.safeguards_now(&self.environment_now())
    }

    fn safeguards_now(&self, env: &Environment) -> Result<SafeguardsReport, VaultError> {
        let now = self.now_unix();
        let today = self.today();
        let evidence = self.live_evidence(env, now)?;
        let attestations: Vec<Attestation> = self.rows(ATTESTATION)?;
        let assessed = safeguards::assess(&evidence, &attestations, today);
        let practices = safeguards::practices_in_place(&assessed);
        let mut risks: Vec<Risk> = self.rows(RISK)?;
        risks.sort_by(|a, b| b.score().cmp(&a.score()).then(a.title.cmp(&b.title)));
        let reviews = self.reviews()?;
        let year_ago = day_text(today - time::Duration::days(365));
        let recent: Vec<&(String, Vec<(u8, bool)>)> =
            reviews.iter().filter(|r| r.0 >= year_ago).collect();
        let practices_12_months = (1..=10u8)
            .filter(|p| {
                !recent.is_empty() && recent.iter().all(|r| r.1.iter().any(|x| x.0 == *p && x.1))
            })
            .collect();
        let last_review = reviews.iter().map(|r| r.0.clone()).max();
        let next_review_due = last_review
            .as_deref()
            .and_then(|d| medvault_governance::retention::date("d", d).ok())
            .map_or_else(
                || day_text(today),
                |d| day_text(training::add_months(d, safeguards::REVIEW_MONTHS)),
            );
        Ok(SafeguardsReport {
            generated_at: now,
            findings: assessed
                .iter()
                .filter(|a| a.source == "live" && a.status == "not_met")
                .cloned()
                .collect(),
            assessed,
            practices,
            practices_12_months,
            reviews_12_months: recent.len(),
            risks,
            last_review,
            next_review_due,
        })
    }

    fn reviews(&self) -> Result<Vec<Review>, VaultError> {
        let v: Vec<Value> = self.rows(REVIEW)?;
        Ok(v.into_iter()
            .filter_map(|r| {
                Some((
                    r.get("date")?.as_str()?.to_owned(),
                    serde_json::from_value(r.get("practices")?.clone()).ok()?,
                ))
            })
            .collect())
    }

    /// What medvault knows now about each evidence key of the safeguards.
    fn live_evidence(&self, env: &Environment, now: i64) -> Result<Vec<Evidence>, VaultError> {
        let ev = |key: &str, ok: Option<bool>, text: String| Evidence {
            key: key.into(),
            ok,
            text,
        };
        let mut out = vec![];
        let keys = self.key_status_now()?;
        out.push(ev("encryption", Some(true), format!(
            "every record sealed (AES-256-GCM) under a per-patient data key; master key version {}{}",
            keys.current_version,
            keys.rotating_to.map(|v| format!(", rotating to {v}")).unwrap_or_default()
        )));
        let accounts = self.identity.accounts().map_err(crate::auth::id_err)?;
        let active: Vec<_> = accounts.iter().filter(|a| !a.disabled).collect();
        let without: Vec<&str> = active
            .iter()
            .filter(|a| !a.mfa_confirmed)
            .map(|a| a.username.as_str())
            .collect();
        out.push(ev(
            "mfa",
            Some(without.is_empty()),
            if without.is_empty() {
                format!("all {} active accounts use a second factor", active.len())
            } else {
                format!(
                    "{} of {} active accounts have no second factor in use: {}",
                    without.len(),
                    active.len(),
                    without
                        .iter()
                        .take(20)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ));
        let dormant = self
            .identity
            .dormant_accounts()
            .map_err(crate::auth::id_err)?;
        out.push(ev(
            "dormant_accounts",
            Some(dormant.is_empty()),
            if dormant.is_empty() {
                "no enabled account is past the dormancy limit".into()
            } else {
                format!(
                    "{} enabled account(s) unused past the dormancy limit: {}",
                    dormant.len(),
                    dormant
                        .iter()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ));
        out.push(ev(
            "unique_users",
            Some(true),
            format!(
                "{} named accounts; every sign-in and audit entry names one person or client",
                accounts.len()
            ),
        ));
        let policies = self.store.policies()?;
        let active_policy = policies
            .iter()
            .filter(|p| !p.approved_by.is_empty())
            .max_by_key(|p| p.version);
        out.push(ev(
            "policy_approval",
            Some(active_policy.is_none_or(|p| p.approved_by != p.proposed_by)),
            match active_policy {
                Some(p) => format!(
                    "policy version {} proposed by {} and approved by {}",
                    p.version, p.proposed_by, p.approved_by
                ),
                None => "the shipped policy set is in force (no local change)".into(),
            },
        ));
        let (courses, completions, settings) = self.program()?;
        let today = self.today();
        let standings: Vec<Standing> = accounts
            .iter()
            .filter(|a| !a.disabled && a.role != "patient")
            .map(|u| {
                training::standing(
                    &u.username,
                    &u.role,
                    &courses,
                    &completions,
                    settings.grace_days,
                    today,
                )
            })
            .filter(|s| !s.courses.is_empty())
            .collect();
        let lapsed = standings.iter().filter(|s| !s.current).count();
        out.push(ev(
            "training",
            if courses.is_empty() {
                Some(false)
            } else {
                Some(lapsed == 0)
            },
            if courses.is_empty() {
                "no training course is assigned".into()
            } else {
                format!(
                    "{} of {} assigned staff current; {lapsed} lapsed",
                    standings.len() - lapsed,
                    standings.len()
                )
            },
        ));
        let incidents = self.store.incidents()?;
        let stale: usize = incidents
            .iter()
            .filter(|r| r.status == "open" && now - r.opened_at > 30 * 86_400)
            .count();
        let open = incidents.iter().filter(|r| r.status == "open").count();
        out.push(ev(
            "incidents",
            Some(stale == 0),
            format!("{open} open incident(s); {stale} open longer than 30 days"),
        ));
        let alerts = self.store.governance("alert")?;
        let untriaged = alerts
            .iter()
            .filter(|a| a.status == "new" && now - a.at > 7 * 86_400)
            .count();
        let new = alerts.iter().filter(|a| a.status == "new").count();
        out.push(ev(
            "alerts_triaged",
            Some(untriaged == 0),
            format!("{new} alert(s) awaiting triage; {untriaged} older than 7 days"),
        ));
        let drill: Option<Value> = self
            .store
            .meta(crate::backup::LAST_DRILL)?
            .and_then(|v| serde_json::from_slice(&v).ok());
        out.push(match drill {
            None => ev(
                "backup_drill",
                Some(false),
                "no restore drill recorded".into(),
            ),
            Some(d) => {
                let at = d.get("drilled_at").and_then(Value::as_i64);
                let age = at.map(|a| (now - a) / 86_400);
                let ok = d.get("audit_verified").and_then(Value::as_bool) == Some(true)
                    && age.is_some_and(|a| a <= 90);
                ev(
                    "backup_drill",
                    Some(ok),
                    format!(
                        "last restore drill {}; RTO {:.1} s; audit verified: {}",
                        age.map_or("at an unknown time".into(), |a| format!("{a} day(s) ago")),
                        d.get("rto_seconds").and_then(Value::as_f64).unwrap_or(0.0),
                        d.get("audit_verified")
                            .and_then(Value::as_bool)
                            .unwrap_or(false)
                    ),
                )
            }
        });
        let len = self.store.audit_len()?;
        let cp = self.store.checkpoint(None)?;
        out.push(match cp {
            None => ev("audit_log", Some(len == 0), format!("{len} entries; no signed checkpoint yet")),
            Some((size, note)) => {
                let sigs = note.lines().filter(|l| l.starts_with('\u{2014}')).count();
                ev("audit_log", Some(sigs >= 2 && size + 10_000 >= len), format!(
                    "{len} entries; latest signed checkpoint covers {size}; {} witness cosignature(s)",
                    sigs.saturating_sub(1)
                ))
            }
        });
        let pending = self
            .store
            .break_glass()?
            .into_iter()
            .filter(|g| g.outcome.is_empty() && now - g.created > 7 * 86_400)
            .count();
        out.push(ev(
            "break_glass_reviews",
            Some(pending == 0),
            format!("{pending} break-the-glass use(s) unreviewed after 7 days"),
        ));
        let assets: Vec<Asset> = self.rows(ASSET)?;
        let weak: Vec<&str> = assets
            .iter()
            .filter(|a| a.holds_phi && a.status == "in_service" && !response::device_encrypted(a))
            .map(|a| a.id.as_str())
            .collect();
        out.push(if assets.is_empty() {
            ev(
                "assets",
                None,
                "no devices or media in the inventory".into(),
            )
        } else {
            ev(
                "assets",
                Some(weak.is_empty()),
                if weak.is_empty() {
                    format!(
                        "{} asset(s); every one holding PHI is encrypted and checked",
                        assets.len()
                    )
                } else {
                    format!(
                        "{} asset(s) hold PHI without checked encryption: {}",
                        weak.len(),
                        weak.join(", ")
                    )
                },
            )
        });
        let days_left = env.certificate_not_after.map(|t| (t - now) / 86_400);
        out.push(match (&env.tls, days_left) {
            // CA/Browser Forum baseline: a server certificate lives at most 397 days; a
            // longer one is a finding (scanners rate it high), as is one about to expire.
            (Some(t), Some(d)) => ev(
                "tls",
                Some(d > 30 && d <= 397),
                if d > 397 {
                    format!("{t}; certificate valid for {d} more day(s), longer than the 397 days scanners accept: renew it with a shorter lifetime")
                } else {
                    format!("{t}; certificate valid for {d} more day(s)")
                },
            ),
            (Some(t), None) => ev("tls", None, format!("{t}; certificate expiry unknown")),
            _ => ev("tls", None, "not known outside the server".into()),
        });
        out.push(match &env.supply_chain {
            Some(sc) => ev(
                "advisories",
                sc.checked.then_some(sc.clean),
                sc.text.clone(),
            ),
            None => ev(
                "advisories",
                None,
                "no dependency advisory check has been recorded".into(),
            ),
        });
        let reviews = self.reviews()?;
        let last = reviews.iter().map(|r| r.0.clone()).max();
        let due = last
            .as_deref()
            .and_then(|d| medvault_governance::retention::date("d", d).ok())
            .map(|d| training::add_months(d, safeguards::REVIEW_MONTHS));
        out.push(ev(
            "risk_review",
            Some(due.is_some_and(|d| d >= today)),
            match (&last, due) {
                (Some(l), Some(d)) => format!("last risk review {l}; next due {}", day_text(d)),
                _ => "no risk review recorded".into(),
            },
        ));
        Ok(out)
    }

    // ---- Reminders --------------------------------------------------------------------------

    /// `GET /api/reminders`: what the caller should act on — their own training, and for
    /// officers every notification deadline of an open incident and their unacknowledged
    /// notices, and accounting requests and the quarterly review due within 30 days (or
    /// overdue).
    ///
    /// # Errors
    /// `Unauthenticated`.
    pub fn reminders(&self, c: &Caller) -> Result<Vec<Reminder>, VaultError> {
        let today = self.today();
        let soon = day_text(today + time::Duration::days(30));
        let now_day = day_text(today);
        let mut out = vec![];
        // Breach notification deadlines show from the decision on; the rest within 30 days.
        let mut add = |due: String, text: String, link: String| {
            if link.starts_with("/incidents/") || due.get(..10).is_some_and(|d| d <= soon.as_str())
            {
                let overdue = due.get(..10).is_some_and(|d| d < now_day.as_str());
                out.push(Reminder {
                    due,
                    text,
                    link,
                    overdue,
                });
            }
        };
        if self.training_blocks()?.contains(c.actor()) {
            add(
                now_day.clone(),
                "a security administrator has closed your access to patient information until your training is confirmed; ask them".into(),
                "/training".into(),
            );
        }
        if let Ok(s) = self.my_training(c) {
            for cs in s
                .courses
                .iter()
                .filter(|x| x.state != training::CourseState::Current)
            {
                add(
                    cs.lapses.clone(),
                    format!(
                        "complete training “{}” (PHI access closes on {})",
                        cs.title, cs.lapses
                    ),
                    "/training".into(),
                );
            }
        }
        if self.decide_operation(c, Operation::Incidents).allowed() {
            for r in self.store.incidents()? {
                let Ok(i) = serde_json::from_str::<Incident>(&r.body) else {
                    continue;
                };
                if i.status == IncidentStatus::Closed {
                    continue;
                }
                if let Some(d) = &i.response.decision {
                    for (who, by) in d.deadlines() {
                        add(
                            by,
                            format!("incident {}: notify {who}", short(&i.id)),
                            format!("/incidents/{}", i.id),
                        );
                    }
                }
                for n in i
                    .response
                    .notices
                    .iter()
                    .filter(|n| n.user == c.actor() && n.acknowledged_at.is_none())
                {
                    add(
                        now_day.clone(),
                        format!(
                            "incident {}: acknowledge your notice as {}",
                            short(&i.id),
                            n.role
                        ),
                        format!("/incidents/{}", i.id),
                    );
                }
            }
        }
        if self
            .decide_operation(c, Operation::PrivacyRequests)
            .allowed()
        {
            let v: Vec<AccountingRequest> = self.rows(ACCOUNTING)?;
            for r in v.iter().filter(|r| r.status == "open") {
                add(
                    r.clock.respond_by.clone(),
                    format!("accounting of disclosures for patient {} due", r.patient),
                    "/privacy/requests".into(),
                );
            }
        }
        if self
            .decide_operation(c, Operation::ComplianceManage)
            .allowed()
        {
            let reviews = self.reviews()?;
            let due = reviews
                .iter()
                .map(|r| r.0.clone())
                .max()
                .and_then(|d| medvault_governance::retention::date("d", &d).ok())
                .map_or(today, |d| {
                    training::add_months(d, safeguards::REVIEW_MONTHS)
                });
            add(
                day_text(due),
                "quarterly risk review".into(),
                "/compliance".into(),
            );
        }
        out.sort_by(|a, b| a.due.cmp(&b.due));
        Ok(out)
    }
}

/// What a training sync writes: the account changes, their audit records, and every
/// learner's standing.
type Synced = (Vec<Op>, Vec<AuditRecord>, Vec<Standing>);
/// A chart's Patient resource (if it has one) and the audit record of opening it.
type OpenedPatient = (Option<serde_json::Map<String, Value>>, Option<AuditRecord>);
/// A quarterly review: its date and which HICP practices were in place.
type Review = (String, Vec<(u8, bool)>);

/// A Patient's home address (`use` home), else its first: where a patient lives for the
/// breach counts and where their letter goes — one address for both.
fn home_address(j: &serde_json::Map<String, Value>) -> Option<&Value> {
    let addrs = j.get("address")?.as_array()?;
    addrs
        .iter()
        .find(|a| a.get("use").and_then(Value::as_str) == Some("home"))
        .or_else(|| addrs.first())
}

/// The state recorded for an affected individual whose chart gives no US state.
pub const UNKNOWN_STATE: &str = "unknown";

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn apply_playbook(i: &mut Incident, name: &str) -> Result<(), VaultError> {
    let tasks = response::playbook(name).map_err(bad)?;
    if i.response.playbook.as_deref() == Some(name.trim()) {
        return Err(VaultError::Duplicate(
            "that playbook is already applied".into(),
        ));
    }
    i.response.playbook = Some(name.trim().to_owned());
    let first = i.response.tasks.iter().map(|t| t.id).max().unwrap_or(0) + 1;
    for (next, t) in (first..).zip(tasks.iter()) {
        i.response.tasks.push(Task {
            id: next,
            text: (*t).to_owned(),
            done_by: None,
            done_at: None,
        });
    }
    Ok(())
}
