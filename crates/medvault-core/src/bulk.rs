//! FHIR Bulk Data Access 2.0 (`$export`, <https://hl7.org/fhir/uv/bulkdata/export.html>):
//! the async kick-off, status polling, NDJSON files per resource type, cancellation — every
//! resource read through the same gate as a single read, as the caller, so what the caller
//! may not see is not in the files.
//!
//! - Cohorts: `Group/my-patients/$export` (the charts the caller is related to),
//!   `Patient/$export` (every chart the caller reaches: their charts for a user, every
//!   chart its scopes reach for a backend client) and system `$export` (backend clients
//!   only: the charts and the directory).
//! - Each chart is read as a Patient `$everything` audited under the action `export`, with
//!   the job, the recipient and the purpose: an export for a purpose outside treatment,
//!   payment and operations is in the patient's accounting of disclosures (45 CFR 164.528)
//!   without anyone recording it.
//! - An export for research (purpose `HRESCH`) is always de-identified by the Safe Harbor
//!   method ([`medvault_fhir::deid`]) with keyed pseudonymous ids, and says so in its
//!   manifest and its audit records; it is not a disclosure of PHI, so it is not accounted.
//! - A 42 CFR Part 2 record leaves with its no-redisclosure label (`NORDSCLCD`) and the
//!   export carries the 42 CFR 2.32 notice as an OperationOutcome file.
//! - Files are sealed (AES-256-GCM) under a key that lives only in this process, in frames
//!   bound to the job, the file and their order, while they wait; each is deleted once
//!   downloaded, and every job an hour after it completes. A restart leaves nothing
//!   readable behind (the spool is emptied at start).
//! - Interactive users need a second factor within the step-up window; SMART apps acting
//!   for a user cannot export.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use medvault_crypto::{DataKey, RecordCipher};
use medvault_fhir::ResourceType;
use medvault_types::{Operation, PatientId, Purpose};
use serde::Serialize;
use serde_json::Value;

use crate::caller::Assurance;
use crate::typestate::Disclosed;
use crate::{Caller, Outcome, Vault, VaultError};

/// How long a completed export's files wait for download, in seconds.
pub const EXPORT_TTL_SECS: i64 = 3600;
/// Exports running at once, server-wide (more are answered `429`).
pub const MAX_RUNNING_EXPORTS: usize = 2;
/// Charts of one export read at once.
const EXPORT_WORKERS: usize = 4;
/// Plaintext bytes per sealed frame of a waiting file.
const FRAME_BYTES: usize = 1 << 20;
/// Resources read per `$everything` page while exporting a chart.
const PAGE: &str = "1000";
/// The virtual Group of the caller's charts (care teams, encounters, grants, portal links).
pub const MY_PATIENTS_GROUP: &str = "my-patients";

/// The 42 CFR 2.32 notice that goes with every disclosure of a Part 2 record.
pub const PART2_NOTICE: &str = "This record which has been disclosed to you is protected by federal confidentiality rules (42 CFR part 2). These rules prohibit you from using or disclosing this record, or testimony that describes the information contained in this record, in any civil, criminal, administrative, or legislative proceedings by any Federal, State, or local authority, against the patient, unless authorized by the consent of the patient, except as provided at 42 CFR 2.12(c)(5) or as authorized by a court in accordance with 42 CFR 2.64 or 2.65. In addition, the Federal rules prohibit you from making any other use or disclosure of this record unless at least one of the following applies: (1) Further use or disclosure is expressly permitted by the written consent of the individual whose information is being disclosed in this record or as otherwise permitted by 42 CFR part 2. (2) You are a covered entity or business associate and have received the record for treatment, payment, or health care operations, or (3) You have received the record from a covered entity or business associate as permitted by 45 CFR part 164, subparts A and E. A general authorization for the release of medical or other information is NOT sufficient to meet the required elements of written consent to further use or redisclose the record (see 42 CFR 2.31).";

/// What is exported (Bulk Data §"Endpoint").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportLevel {
    /// `[base]/$export`: backend clients only.
    System,
    /// `[base]/Patient/$export`.
    Patient,
    /// `[base]/Group/{id}/$export`.
    Group(String),
}

/// One output file as the manifest lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportOutput {
    /// The resource type of every line.
    #[serde(rename = "type")]
    pub rtype: String,
    /// The file's name in the job (`Observation.ndjson`).
    pub name: String,
    /// Resources in the file.
    pub count: u64,
    /// Bytes of NDJSON.
    pub bytes: u64,
    /// Downloaded already (and so deleted).
    pub downloaded: bool,
}

/// A job's state as its owner (and the console) sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportView {
    pub id: String,
    /// Who asked (the audit name).
    pub owner: String,
    pub level: String,
    /// `accepted`, `in-progress`, `complete`, `failed`, `cancelled`.
    pub state: String,
    /// Charts done and charts in the cohort.
    pub done: usize,
    pub total: usize,
    /// FHIR instant of the kick-off (the manifest's `transactionTime`).
    pub transaction_time: String,
    /// The request as sent (the manifest's `request`).
    pub request: String,
    pub purpose: String,
    /// `safe-harbor` for a de-identified export.
    pub deidentified: Option<String>,
    pub output: Vec<ExportOutput>,
    /// Why it failed, for a failed job.
    pub error: Option<String>,
    /// Unix seconds after which the files are deleted (set at completion).
    pub expires: Option<i64>,
    /// Whether a 42 CFR Part 2 record is in the export (its notice goes with it).
    pub part2: bool,
}

struct SpoolFile {
    out: ExportOutput,
    path: PathBuf,
    frames: u32,
}

struct Job {
    view: ExportView,
    caller: Caller,
    types: Vec<ResourceType>,
    since: Option<String>,
    filters: Vec<(ResourceType, Vec<(String, String)>)>,
    cipher: Arc<RecordCipher>,
    files: Vec<SpoolFile>,
    cancelled: bool,
}

/// The jobs of this process and where their files wait.
#[derive(Default)]
pub(crate) struct Exports {
    jobs: Mutex<HashMap<String, Arc<Mutex<Job>>>>,
    spool: std::sync::RwLock<Option<PathBuf>>,
}

fn bad(m: impl Into<String>) -> VaultError {
    VaultError::BadRequest(m.into())
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, VaultError> {
    m.lock()
        .map_err(|_| VaultError::Internal("export registry poisoned".into()))
}

fn frame_aad(job: &str, name: &str, n: u32) -> Vec<u8> {
    format!("medvault:export:v1|{job}|{name}|{n}").into_bytes()
}

/// The parsed kick-off parameters (Bulk Data §"Query Parameters").
type Parsed = (
    Vec<ResourceType>,
    Option<String>,
    Vec<(ResourceType, Vec<(String, String)>)>,
);

fn parse_params(params: &[(String, String)]) -> Result<Parsed, VaultError> {
    let mut types = vec![];
    let mut since = None;
    let mut filters: Vec<(ResourceType, Vec<(String, String)>)> = vec![];
    let parse_type = |t: &str| {
        ResourceType::parse(t.trim()).ok_or_else(|| {
            bad(format!(
                "_type: unsupported resource type `{}`",
                t.chars().take(40).collect::<String>()
            ))
        })
    };
    for (k, v) in params {
        match k.as_str() {
            "_outputFormat" => {
                if !matches!(
                    v.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(bad("_outputFormat: only application/fhir+ndjson is offered"));
                }
            }
            "_type" => {
                for t in v.split(',') {
                    let rt = parse_type(t)?;
                    if !types.contains(&rt) {
                        types.push(rt);
                    }
                }
            }
            "_since" => {
                medvault_fhir::date::parse(v).map_err(|m| bad(format!("_since {m}")))?;
                if v.len() < 20 || !v.contains('T') {
                    return Err(bad("_since must be a FHIR instant (with time and zone)"));
                }
                since = Some(v.clone());
            }
            "_typeFilter" => {
                for f in v.split(',') {
                    let (t, q) = f.split_once('?').ok_or_else(|| {
                        bad("_typeFilter: each filter is Type?search-parameters")
                    })?;
                    let rt = parse_type(t)?;
                    let q: Vec<(String, String)> = serde_urlencoded::from_str(q)
                        .map_err(|_| bad("_typeFilter: malformed search parameters"))?;
                    if q.is_empty()
                        || q.iter().any(|(k, _)| {
                            k.starts_with("_include")
                                || k.starts_with("_revinclude")
                                || k.starts_with("_has")
                                || k == "_count"
                                || k == "_cursor"
                                || k == "patient"
                                || k == "subject"
                        })
                    {
                        return Err(bad(
                            "_typeFilter: search parameters only (no _include, _has, _count, patient)",
                        ));
                    }
                    // Refused now, not half-way through the export.
                    medvault_fhir::search::parse(rt, &q, true)?;
                    filters.push((rt, q));
                }
            }
            "_elements" | "patient" | "includeAssociatedData" | "_format" => {
                return Err(bad(format!(
                    "{k} is not supported by this server's $export (_type, _since, _typeFilter and _outputFormat are)"
                )))
            }
            other => {
                return Err(bad(format!(
                    "$export does not support `{}` (_type, _since, _typeFilter and _outputFormat are)",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    if types.is_empty() {
        types = medvault_fhir::SUPPORTED_TYPES
            .iter()
            .filter_map(|t| ResourceType::parse(t))
            .collect();
    }
    for (rt, _) in &filters {
        if !types.contains(rt) {
            return Err(bad(format!(
                "_typeFilter names {rt}, which _type leaves out"
            )));
        }
    }
    Ok((types, since, filters))
}

impl Exports {
    fn spool(&self) -> Result<PathBuf, VaultError> {
        self.spool
            .read()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                VaultError::Unavailable("bulk export is not set up on this server".into())
            })
    }
}

impl Vault {
    /// Where export files wait (`{data dir}/exports`); emptied now, since files sealed
    /// under an earlier process's keys can never be read again.
    ///
    /// # Errors
    /// `Internal` when the directory cannot be made.
    pub fn set_export_spool(&self, dir: PathBuf) -> Result<(), VaultError> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| VaultError::Internal(e.to_string()))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| VaultError::Internal(e.to_string()))?;
        if let Ok(mut s) = self.exports.spool.write() {
            *s = Some(dir);
        }
        Ok(())
    }

    /// Bulk Data kick-off: checks who may export what, records the request, and returns
    /// the job's id; the caller then runs [`Vault::run_export`] in the background.
    /// `request` is the kick-off URL as sent (the manifest repeats it).
    ///
    /// # Errors
    /// `BadRequest` for an unsupported or malformed parameter (nothing is started),
    /// `StepUpRequired` for a user without a recent second factor, `Forbidden`/`Refused`
    /// for a caller the policy or its scopes do not let export, `NotFound` for an unknown
    /// group, `Busy` when [`MAX_RUNNING_EXPORTS`] are running.
    pub fn export_kickoff(
        &self,
        c: &Caller,
        level: ExportLevel,
        params: &[(String, String)],
        request: &str,
    ) -> Result<String, VaultError> {
        let (mut types, since, filters) = parse_params(params)?;
        if let ExportLevel::Group(g) = &level {
            if g != MY_PATIENTS_GROUP {
                return Err(VaultError::NotFound);
            }
        }
        let level_name = match &level {
            ExportLevel::System => "system".to_owned(),
            ExportLevel::Patient => "Patient".to_owned(),
            ExportLevel::Group(g) => format!("Group/{g}"),
        };
        match c.assurance() {
            Assurance::Client(s) => {
                // A backend client's export is decided by its scopes, type by type, then
                // record by record by the policy; a type it cannot read is refused now.
                if matches!(level, ExportLevel::Group(_)) {
                    return Err(bad(
                        "Group/my-patients is the charts of a signed-in user; a backend client exports Patient or system level",
                    ));
                }
                if params.iter().any(|(k, _)| k == "_type") {
                    if let Some(t) = types.iter().find(|t| !s.allows(t.as_str(), false)) {
                        return Err(VaultError::Refused {
                            action: "read",
                            rtype: t.as_str().to_owned(),
                        });
                    }
                } else {
                    types.retain(|t| s.allows(t.as_str(), false));
                }
            }
            Assurance::App(_) => {
                return Err(VaultError::Refused {
                    action: "read",
                    rtype: "$export (a SMART app acting for a user cannot export)".into(),
                })
            }
            _ => {
                if level == ExportLevel::System {
                    return Err(VaultError::Forbidden { withheld: vec![] });
                }
                self.permit_operation(c, Operation::BulkExport, None)?;
                if !self.stepped_up(c) {
                    return Err(VaultError::StepUpRequired);
                }
            }
        }
        let spool = self.exports.spool()?;
        self.sweep_exports();
        let running = lock(&self.exports.jobs)?
            .values()
            .filter(|j| {
                j.lock()
                    .map(|j| matches!(j.view.state.as_str(), "accepted" | "in-progress"))
                    .unwrap_or(false)
            })
            .count();
        if running >= MAX_RUNNING_EXPORTS {
            return Err(VaultError::Busy { retry_after: 30 });
        }
        let id = medvault_types::random_uuid();
        std::fs::create_dir_all(spool.join(&id))
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let deidentified = (c.purpose == Purpose::Research).then(|| "safe-harbor".to_owned());
        let mut rec = self.record(c, "export.kickoff", Outcome::Success);
        rec.resource = Some(format!("{level_name}/$export"));
        rec.detail = Some(format!(
            "job={id} types={} since={} filters={}{}",
            types.len(),
            since.as_deref().unwrap_or("-"),
            filters.len(),
            deidentified
                .as_ref()
                .map(|m| format!(" deidentified={m}"))
                .unwrap_or_default()
        ));
        self.audit(vec![rec])?;
        let view = ExportView {
            id: id.clone(),
            owner: c.actor().to_owned(),
            level: level_name,
            state: "accepted".into(),
            done: 0,
            total: 0,
            transaction_time: self.now_instant(),
            request: request.chars().take(2000).collect(),
            purpose: c.purpose.as_str().to_owned(),
            deidentified,
            output: vec![],
            error: None,
            expires: None,
            part2: false,
        };
        let job = Job {
            view,
            caller: c.clone(),
            types,
            since,
            filters,
            cipher: Arc::new(RecordCipher::new(&DataKey::generate())),
            files: vec![],
            cancelled: false,
        };
        lock(&self.exports.jobs)?.insert(id.clone(), Arc::new(Mutex::new(job)));
        Ok(id)
    }

    fn job(&self, id: &str) -> Result<Arc<Mutex<Job>>, VaultError> {
        lock(&self.exports.jobs)?
            .get(id)
            .cloned()
            .ok_or(VaultError::NotFound)
    }

    /// Runs an accepted export to its end (the server calls it on a blocking thread right
    /// after the kick-off). Failures are kept in the job for its status to report.
    pub fn run_export(&self, id: &str) {
        let Ok(job) = self.job(id) else {
            return;
        };
        let outcome = self.run_export_inner(id, &job);
        if let Ok(mut j) = job.lock() {
            match outcome {
                Ok(()) if j.cancelled => {}
                Ok(()) => {
                    j.view.state = "complete".into();
                    j.view.expires = Some(self.clock.now().unix_timestamp() + EXPORT_TTL_SECS);
                }
                Err(e) => {
                    tracing::warn!(job = %id, cause = %e, "bulk export failed");
                    j.view.state = "failed".into();
                    j.view.error = Some(match e {
                        VaultError::AuditUnavailable => "the audit log was unavailable".into(),
                        VaultError::TrainingLapsed => {
                            "required security training has lapsed".into()
                        }
                        VaultError::Forbidden { .. } | VaultError::Refused { .. } => {
                            "the policy does not allow this export".into()
                        }
                        _ => "the export could not be completed".into(),
                    });
                    for f in &j.files {
                        let _ = std::fs::remove_file(&f.path);
                    }
                    j.files.clear();
                    j.view.output.clear();
                }
            }
        };
    }

    fn run_export_inner(&self, id: &str, job: &Arc<Mutex<Job>>) -> Result<(), VaultError> {
        let (c, level, types, since, filters, deid) = {
            let mut j = lock(job)?;
            j.view.state = "in-progress".into();
            (
                j.caller.clone(),
                j.view.level.clone(),
                j.types.clone(),
                j.since.clone(),
                j.filters.clone(),
                j.view.deidentified.is_some(),
            )
        };
        let cohort = self.export_cohort(&c, &level)?;
        lock(job)?.view.total = cohort.len();
        let mut writer = SpoolWriter::new(self.exports.spool()?.join(id), id, job.clone());
        let year = self.clock.now().year();
        let pseudonym = |t: &str, i: &str| -> String {
            self.ix()
                .blind
                .token("deidentify", t, i)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let type_list = types
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let tag = ExportTag {
            detail: format!(
                "job={id} recipient={}{}",
                c.actor(),
                if deid {
                    " deidentified=safe-harbor"
                } else {
                    ""
                }
            ),
        };
        // Charts are read by a few workers at once (each chart's audit append is its own
        // commit; several in flight share the log's group commit) and written here, in
        // the order they arrive.
        let workers = EXPORT_WORKERS.min(cohort.len()).max(1);
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<Vec<Disclosed>, VaultError>>(workers * 2);
        let mut failure: Option<VaultError> = None;
        std::thread::scope(|scope| {
            for w in 0..workers {
                let tx = tx.clone();
                let charts: Vec<&PatientId> = cohort.iter().skip(w).step_by(workers).collect();
                let (c, types, type_list, since, filters, tag, job) =
                    (&c, &types, &type_list, &since, &filters, &tag, job.clone());
                scope.spawn(move || {
                    for pid in charts {
                        if job.lock().map_or(true, |j| j.cancelled) {
                            break;
                        }
                        let r = self.export_chart(
                            c,
                            pid,
                            types,
                            type_list,
                            since.as_deref(),
                            filters,
                            tag,
                        );
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            for r in rx {
                let wrote = match r {
                    Ok(entries) => self.export_write(
                        &entries,
                        &types,
                        deid,
                        year,
                        &pseudonym,
                        &mut seen,
                        &mut writer,
                        job,
                    ),
                    Err(e) => Err(e),
                };
                match wrote {
                    Ok(()) => {
                        if let Ok(mut j) = job.lock() {
                            j.view.done += 1;
                        }
                    }
                    Err(e) => {
                        // Stop the workers; keep the first cause.
                        if let Ok(mut j) = job.lock() {
                            j.cancelled = true;
                        }
                        failure.get_or_insert(e);
                    }
                }
            }
        });
        if let Some(e) = failure {
            if let Ok(mut j) = job.lock() {
                j.cancelled = false;
            }
            return Err(e);
        }
        if lock(job)?.cancelled {
            return Ok(());
        }
        // The directory, for a system-level export.
        if level == "system" && !deid {
            for rt in types.iter().filter(|t| {
                medvault_fhir::categories_of_type(**t) == [medvault_types::Category::Directory]
            }) {
                let mut params = vec![("_count".to_owned(), PAGE.to_owned())];
                if let Some(s) = &since {
                    params.push(("_lastUpdated".into(), format!("ge{s}")));
                }
                loop {
                    let r = self.search(&c, *rt, &params, true)?;
                    for d in &r.entries {
                        if seen.insert((rt.as_str().to_owned(), d.id().to_owned())) {
                            if let Some(j) = d.json() {
                                let line = serde_json::to_vec(j)
                                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                                writer.push(rt.as_str(), &line)?;
                            }
                        }
                    }
                    match r.next {
                        Some(cur) => {
                            params.retain(|(k, _)| k != "_cursor");
                            params.push(("_cursor".into(), cur));
                        }
                        None => break,
                    }
                }
            }
        }
        if lock(job)?.view.part2 {
            let notice = medvault_fhir::operation_outcome(
                &[medvault_fhir::Issue::info(
                    medvault_fhir::IssueCode::Informational,
                    PART2_NOTICE.to_owned(),
                )],
                None,
            );
            let line =
                serde_json::to_vec(&notice).map_err(|e| VaultError::Internal(e.to_string()))?;
            writer.push("OperationOutcome", &line)?;
        }
        writer.finish()
    }

    /// One chart of an export, read through the gate as the caller: its `$everything`
    /// pages (with the directory resources they reference), less what `_typeFilter`
    /// leaves out. A chart the caller may not open is left out (its refusal is audited).
    #[expect(
        clippy::too_many_arguments,
        reason = "one chart's share of the job's parameters"
    )]
    fn export_chart(
        &self,
        c: &Caller,
        pid: &PatientId,
        types: &[ResourceType],
        type_list: &str,
        since: Option<&str>,
        filters: &[(ResourceType, Vec<(String, String)>)],
        tag: &ExportTag,
    ) -> Result<Vec<Disclosed>, VaultError> {
        // _typeFilter: the ids of each filtered type that match one of its filters.
        let mut kept: HashMap<ResourceType, HashSet<String>> = HashMap::new();
        for (rt, q) in filters {
            let set = kept.entry(*rt).or_default();
            let mut params = q.clone();
            params.push(("patient".into(), pid.as_str().to_owned()));
            params.push(("_count".into(), PAGE.into()));
            loop {
                let r = self.search(c, *rt, &params, true)?;
                set.extend(r.entries.iter().map(|d| d.id().to_owned()));
                match r.next {
                    Some(cur) => {
                        params.retain(|(k, _)| k != "_cursor");
                        params.push(("_cursor".into(), cur));
                    }
                    None => break,
                }
            }
        }
        let mut params: Vec<(String, String)> = vec![
            ("_type".into(), type_list.to_owned()),
            ("_count".into(), PAGE.into()),
        ];
        if let Some(s) = since {
            params.push(("_since".into(), s.to_owned()));
        }
        let mut out = vec![];
        loop {
            let r = match self.everything_tagged(c, pid.as_str(), &params, Some(tag)) {
                Ok(r) => r,
                Err(
                    VaultError::NotFound
                    | VaultError::Gone
                    | VaultError::Forbidden { .. }
                    | VaultError::Restricted { .. }
                    | VaultError::NoRelationship { .. },
                ) => break,
                Err(e) => return Err(e),
            };
            let next = r.next.clone();
            out.extend(r.entries.into_iter().chain(r.included).filter(|d| {
                types.contains(&d.rtype())
                    && kept.get(&d.rtype()).is_none_or(|s| s.contains(d.id()))
            }));
            match next {
                Some(cur) => {
                    params.retain(|(k, _)| k != "_cursor");
                    params.push(("_cursor".into(), cur));
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Writes one chart's resources to the job's files: each resource once, de-identified
    /// for research, Part 2 records noted (their notice goes with the export).
    #[expect(
        clippy::too_many_arguments,
        reason = "the writer's state, lent for one chart"
    )]
    fn export_write(
        &self,
        entries: &[Disclosed],
        types: &[ResourceType],
        deid: bool,
        year: i32,
        pseudonym: &medvault_fhir::deid::Pseudonymize<'_>,
        seen: &mut HashSet<(String, String)>,
        writer: &mut SpoolWriter,
        job: &Arc<Mutex<Job>>,
    ) -> Result<(), VaultError> {
        for d in entries {
            let rt = d.rtype();
            if !types.contains(&rt) || !seen.insert((rt.as_str().to_owned(), d.id().to_owned())) {
                continue;
            }
            let Some(json) = d.json() else { continue };
            let mut json = json.clone();
            if deid {
                // The directory (who treated whom) is not the research subject.
                if d.patient().is_none() {
                    continue;
                }
                medvault_fhir::deid::safe_harbor(&mut json, year, pseudonym);
            } else if medvault_fhir::privacy::labels(&json)
                .iter()
                .any(|l| *l == "SUD" || *l == "ETH")
            {
                lock(job)?.view.part2 = true;
            }
            let line = serde_json::to_vec(&Value::Object(json))
                .map_err(|e| VaultError::Internal(e.to_string()))?;
            writer.push(rt.as_str(), &line)?;
        }
        Ok(())
    }

    /// The charts an export reads, in id order.
    fn export_cohort(&self, c: &Caller, level: &str) -> Result<Vec<PatientId>, VaultError> {
        let mut out: Vec<PatientId> = if c.client_scopes().is_some() {
            // Every chart: its ids only, read in one audited read that discloses nothing
            // (each chart's records are then decided one by one as the client reads them).
            let detail = format!("{level} export: the charts to read (ids only)");
            self.audited_read(c, move |cx, tx| {
                let mut rec = cx.record("export.cohort", Outcome::Success);
                rec.resource = Some("Patient".into());
                let mut ids = vec![];
                let mut after = None;
                loop {
                    let page = tx.search(&medvault_store::SearchQuery {
                        rtype: Some("Patient".into()),
                        order: medvault_store::Order::Id,
                        after: after.take(),
                        limit: 1000,
                        ..Default::default()
                    })?;
                    let last = page
                        .rows
                        .last()
                        .map(|r| vec!["Patient".to_owned(), r.id().to_owned()]);
                    ids.extend(
                        page.rows
                            .iter()
                            .filter(|r| !r.deleted())
                            .filter_map(|r| r.patient().cloned()),
                    );
                    match (page.more, last) {
                        (true, Some(l)) => after = Some(l),
                        _ => break,
                    }
                }
                rec.detail = Some(format!("{detail}; {} charts", ids.len()));
                Ok((vec![rec], Ok(ids)))
            })?
        } else {
            self.my_patients(c)?
                .into_iter()
                .filter_map(|(d, _)| d.patient().cloned())
                .collect()
        };
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Deletes expired jobs and their files (the server calls it every minute; every
    /// export call does too).
    pub fn sweep_exports(&self) {
        let now = self.clock.now().unix_timestamp();
        let Ok(mut jobs) = self.exports.jobs.lock() else {
            return;
        };
        let spool = self.exports.spool().ok();
        jobs.retain(|id, j| {
            let expired = j.lock().map_or(true, |j| {
                j.view.expires.is_some_and(|e| e <= now)
                    || (j.view.state == "failed"
                        && medvault_fhir::date::parse(&j.view.transaction_time)
                            .is_ok_and(|t| t.start / 1000 + EXPORT_TTL_SECS <= now))
            });
            if expired {
                if let Some(s) = &spool {
                    let _ = std::fs::remove_dir_all(s.join(id));
                }
            }
            !expired
        });
    }

    /// `GET $export-status`: the job as its owner sees it (only its owner).
    ///
    /// # Errors
    /// `NotFound` for an unknown, expired or cancelled job, or another caller's.
    pub fn export_status(&self, c: &Caller, id: &str) -> Result<ExportView, VaultError> {
        self.sweep_exports();
        let job = self.job(id)?;
        let j = lock(&job)?;
        if j.view.owner != c.actor() {
            return Err(VaultError::NotFound);
        }
        Ok(j.view.clone())
    }

    /// `DELETE $export-status`: cancels a job (or deletes a finished one) and its files.
    ///
    /// # Errors
    /// `NotFound` as for [`Vault::export_status`].
    pub fn cancel_export(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let job = self.job(id)?;
        {
            let mut j = lock(&job)?;
            if j.view.owner != c.actor() {
                return Err(VaultError::NotFound);
            }
            j.cancelled = true;
            j.view.state = "cancelled".into();
            for f in &j.files {
                let _ = std::fs::remove_file(&f.path);
            }
            j.files.clear();
        }
        let mut rec = self.record(c, "export.cancel", Outcome::Success);
        rec.detail = Some(format!("job={id}"));
        self.audit(vec![rec])?;
        lock(&self.exports.jobs)?.remove(id);
        if let Ok(s) = self.exports.spool() {
            let _ = std::fs::remove_dir_all(s.join(id));
        }
        Ok(())
    }

    /// The caller's export jobs, newest first (the console's list).
    ///
    /// # Errors
    /// `Internal` only.
    pub fn exports(&self, c: &Caller) -> Result<Vec<ExportView>, VaultError> {
        self.sweep_exports();
        let mut out: Vec<ExportView> = lock(&self.exports.jobs)?
            .values()
            .filter_map(|j| j.lock().ok().map(|j| j.view.clone()))
            .filter(|v| v.owner == c.actor())
            .collect();
        out.sort_by(|a, b| b.transaction_time.cmp(&a.transaction_time));
        Ok(out)
    }

    /// Downloads one output file (NDJSON) of a complete job: its frames opened and checked
    /// in order, the access audited, and the file deleted (it is handed out once).
    ///
    /// # Errors
    /// `NotFound` for an unknown job or file, another caller's, or a file already
    /// downloaded; `Duplicate` (409) while the job is still running; `Internal` for a damaged
    /// file.
    pub fn export_file(&self, c: &Caller, id: &str, name: &str) -> Result<Vec<u8>, VaultError> {
        self.sweep_exports();
        let job = self.job(id)?;
        let mut j = lock(&job)?;
        if j.view.owner != c.actor() {
            return Err(VaultError::NotFound);
        }
        if j.view.state != "complete" {
            return Err(VaultError::Duplicate(
                "the export has not completed; poll its status".into(),
            ));
        }
        let cipher = j.cipher.clone();
        let Some(f) = j.files.iter_mut().find(|f| f.out.name == name) else {
            return Err(VaultError::NotFound);
        };
        if f.out.downloaded {
            return Err(VaultError::NotFound);
        }
        let raw = std::fs::read(&f.path).map_err(|_| VaultError::NotFound)?;
        let mut out = Vec::with_capacity(usize::try_from(f.out.bytes).unwrap_or(0));
        let mut at = 0usize;
        let mut n = 0u32;
        while at < raw.len() {
            let len = raw
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| VaultError::Internal("export file truncated".into()))?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let sealed = raw
                .get(at + 4..at.saturating_add(4).saturating_add(len))
                .ok_or_else(|| VaultError::Internal("export file truncated".into()))?;
            let plain = cipher
                .open(&frame_aad(id, name, n), sealed)
                .map_err(|_| VaultError::Internal("export file damaged".into()))?;
            out.extend_from_slice(&plain);
            at += 4 + len;
            n += 1;
        }
        if n != f.frames {
            return Err(VaultError::Internal("export file truncated".into()));
        }
        let mut rec = self.record(c, "export.download", Outcome::Success);
        rec.resource = Some(format!("{}/$export", f.out.rtype));
        rec.detail = Some(format!(
            "job={id} file={name} resources={} bytes={}",
            f.out.count, f.out.bytes
        ));
        self.audit(vec![rec])?;
        let _ = std::fs::remove_file(&f.path);
        f.out.downloaded = true;
        let out_view = f.out.clone();
        if let Some(o) = j.view.output.iter_mut().find(|o| o.name == out_view.name) {
            *o = out_view;
        }
        Ok(out)
    }
}

/// How an export's chart reads are recorded: action `export` and this detail.
pub(crate) struct ExportTag {
    pub detail: String,
}

/// Writes each type's NDJSON to its file in sealed frames as it grows.
struct SpoolWriter {
    dir: PathBuf,
    id: String,
    job: Arc<Mutex<Job>>,
    buffers: HashMap<String, Vec<u8>>,
}

impl SpoolWriter {
    fn new(dir: PathBuf, id: &str, job: Arc<Mutex<Job>>) -> Self {
        SpoolWriter {
            dir,
            id: id.to_owned(),
            job,
            buffers: HashMap::new(),
        }
    }

    fn push(&mut self, rtype: &str, line: &[u8]) -> Result<(), VaultError> {
        {
            let mut j = lock(&self.job)?;
            let name = format!("{rtype}.ndjson");
            if !j.files.iter().any(|f| f.out.name == name) {
                j.files.push(SpoolFile {
                    out: ExportOutput {
                        rtype: rtype.to_owned(),
                        name: name.clone(),
                        count: 0,
                        bytes: 0,
                        downloaded: false,
                    },
                    path: self.dir.join(&name),
                    frames: 0,
                });
            }
            if let Some(f) = j.files.iter_mut().find(|f| f.out.name == name) {
                f.out.count += 1;
                f.out.bytes += line.len() as u64 + 1;
            }
        }
        let buf = self.buffers.entry(rtype.to_owned()).or_default();
        buf.extend_from_slice(line);
        buf.push(b'\n');
        if buf.len() >= FRAME_BYTES {
            self.flush(rtype)?;
        }
        Ok(())
    }

    fn flush(&mut self, rtype: &str) -> Result<(), VaultError> {
        let Some(buf) = self.buffers.get_mut(rtype) else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        let plain = std::mem::take(buf);
        let name = format!("{rtype}.ndjson");
        let mut j = lock(&self.job)?;
        let cipher = j.cipher.clone();
        let Some(f) = j.files.iter_mut().find(|f| f.out.name == name) else {
            return Ok(());
        };
        let sealed = cipher
            .seal(&frame_aad(&self.id, &name, f.frames), &plain)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f.path)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let len = u32::try_from(sealed.len())
            .map_err(|_| VaultError::Internal("export frame too large".into()))?;
        file.write_all(&len.to_be_bytes())
            .and_then(|()| file.write_all(&sealed))
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        f.frames += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(), VaultError> {
        let types: Vec<String> = self.buffers.keys().cloned().collect();
        for t in types {
            self.flush(&t)?;
        }
        let mut j = lock(&self.job)?;
        j.files.sort_by(|a, b| a.out.name.cmp(&b.out.name));
        j.view.output = j.files.iter().map(|f| f.out.clone()).collect();
        Ok(())
    }
}
