//! Destruction and legal holds (SPEC "Keys, backup, destruction"; law 6).
//!
//! A privacy officer requests the destruction of a chart with a reason code; a second
//! privacy officer approves it (each after step-up). In one transaction the request is
//! marked completed, the chart's wrapped data keys are deleted — its ciphertext, wherever a
//! copy survives, can never be opened again — and its rows are removed, with the audit
//! entry that records it: the shred ledger lives in the audit log and travels in every
//! backup. A certificate of destruction, signed with the destruction key (never the
//! checkpoint key), names the audit checkpoint that covers that entry. An active legal hold,
//! set by a security administrator with a matter and a reason, blocks destruction, in the
//! same transaction. Chart ids are random (UUID v4) and assigned by the server, so a
//! destroyed chart's id is never issued again and the ledger names one chart only.

use medvault_audit::note::NoteSigner;
use medvault_governance::destruction::{
    self as gov, Certificate, CheckpointRef, DestructionReason,
};
use medvault_store::{DestructionRow, LegalHoldRow, Op};
use medvault_types::{Operation, PatientId};
use serde::Serialize;

use crate::{Caller, Outcome, Vault, VaultError};

/// The audit action whose successful entries form the shred ledger.
pub const SHRED_ACTION: &str = "destruction.approve";
/// The first line of a signed shred ledger.
const LEDGER_HEADER: &str = "medvault shred ledger v1";

/// The audit action of a destruction replayed in a restored copy (also in its ledger).
pub const REPLAY_ACTION: &str = "destruction.replay";

/// Longest legal-hold reason and matter reference, in characters.
const HOLD_REASON_CHARS: usize = 2000;
const MATTER_CHARS: usize = 200;

/// A destruction request as the API shows it (no PHI).
#[derive(Debug, Clone, Serialize)]
pub struct DestructionView {
    pub id: String,
    pub patient: String,
    pub reason: String,
    /// `requested`, `completed` or `cancelled`.
    pub status: String,
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// Who approved (completed) or cancelled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    /// What was destroyed: `TYPE=RESOURCES/VERSIONS`, by type.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub records: String,
    /// The audit log index of the entry recording the destruction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_entry: Option<u64>,
}

impl DestructionView {
    fn of(r: &DestructionRow) -> Self {
        let decided = !r.approved_by.is_empty();
        DestructionView {
            id: r.id.clone(),
            patient: r.patient.to_string(),
            reason: r.reason.clone(),
            status: r.status.clone(),
            requested_by: r.requested_by.clone(),
            requested_at: r.requested_at,
            decided_by: decided.then(|| r.approved_by.clone()),
            decided_at: decided.then_some(r.approved_at),
            records: r.records.clone(),
            audit_entry: u64::try_from(r.audit_seq).ok(),
        }
    }
}

/// A legal hold as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LegalHoldView {
    pub id: String,
    pub patient: String,
    pub matter: String,
    /// The reason, opened for those who may read holds; `None` once the chart is destroyed
    /// (its key is gone).
    pub reason: Option<String>,
    pub set_by: String,
    /// Unix seconds.
    pub set_at: i64,
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_at: Option<i64>,
}

/// Why a chart is refused for the holds on its record classes or paper volumes: every one
/// of them, by id and matter (their order in the store is not meaningful).
fn class_hold_refusal(holds: &[crate::HoldView]) -> String {
    let named: Vec<String> = holds
        .iter()
        .map(|h| format!("{} (matter {})", h.id, h.matter))
        .collect();
    format!(
        "the chart's records (a record class or a paper volume of it) are under legal hold {}; it cannot be destroyed until released",
        named.join(", ")
    )
}

fn hold_aad(id: &str) -> Vec<u8> {
    format!("medvault:legal-hold:v1|{id}").into_bytes()
}

use crate::fhir_instant_secs as instant;

fn patient_id(p: &str) -> Result<PatientId, VaultError> {
    PatientId::new(p).map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))
}

/// The C2SP note key name of the destruction key, beside the audit log's origin.
pub(crate) fn signer_name(audit_origin: &str) -> String {
    match audit_origin.split_once("/audit/") {
        Some((host, rest)) => format!("{host}/destruction/{rest}"),
        None => format!("{audit_origin}/destruction"),
    }
}

impl Vault {
    fn destruction(&self, id: &str) -> Result<Option<DestructionRow>, VaultError> {
        Ok(self.store.destructions()?.into_iter().find(|d| d.id == id))
    }

    fn active_holds(&self, pid: &PatientId) -> Result<Vec<LegalHoldRow>, VaultError> {
        Ok(self
            .store
            .legal_holds(Some(pid))?
            .into_iter()
            .filter(|h| h.released_at == 0)
            .collect())
    }

    /// `POST /api/patients/{id}/destruction {"reason"}` (privacy officer, step-up): asks for
    /// a chart's destruction; nothing is destroyed until a second privacy officer approves.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `BadRequest` (unknown reason code), `NotFound` (no such
    /// chart), `Duplicate` (under a legal hold, or a request is already pending).
    pub fn request_destruction(
        &self,
        c: &Caller,
        patient: &str,
        reason: &str,
    ) -> Result<DestructionView, VaultError> {
        let pid = patient_id(patient)?;
        let Some(mut rec) = self.operate(c, Operation::DestructionRequest, Some(pid.as_str()))?
        else {
            return Err(VaultError::Unauthenticated);
        };
        let reason: DestructionReason = reason
            .parse()
            .map_err(|e: gov::UnknownReason| VaultError::BadRequest(e.to_string()))?;
        if self.store.patient_key(&pid)?.is_none() {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        }
        let refuse = |rec: &mut medvault_audit::AuditRecord, why: String| {
            rec.outcome = Outcome::Failure;
            rec.detail = Some(format!("refused: {why}"));
            VaultError::Duplicate(why)
        };
        if let Some(h) = self.active_holds(&pid)?.first() {
            let e = refuse(
                &mut rec,
                format!("the chart is under legal hold {} (matter {}); it cannot be destroyed until the hold is released", h.id, h.matter),
            );
            self.audit(vec![rec])?;
            return Err(e);
        }
        let (class_holds, holds_version, guard) =
            self.holds_on_chart(c, Operation::DestructionRequest, &mut rec, &pid)?;
        if !class_holds.is_empty() {
            let e = refuse(&mut rec, class_hold_refusal(&class_holds));
            self.audit(vec![rec])?;
            return Err(e);
        }
        let id = medvault_types::random_uuid();
        let row = DestructionRow {
            id: id.clone(),
            patient: pid.clone(),
            reason: reason.as_str().to_owned(),
            status: "requested".into(),
            requested_by: c.actor().to_owned(),
            requested_at: self.clock.now().unix_timestamp(),
            approved_by: String::new(),
            approved_at: 0,
            records: String::new(),
            audit_seq: -1,
            checkpoint: 0,
        };
        rec.detail = Some(format!("destruction={id} reason={reason}"));
        match self.commit(
            vec![guard, Op::RequestDestruction(row.clone())],
            vec![rec.clone()],
        ) {
            Ok(_) => Ok(DestructionView::of(&row)),
            Err(VaultError::Conflict) => {
                let e = refuse(
                    &mut rec,
                    "a destruction of this chart is already pending, or a legal hold was just placed on it".into(),
                );
                self.audit(vec![rec])?;
                Err(e)
            }
            Err(_) if self.holds_moved(holds_version) => {
                let e = refuse(
                    &mut rec,
                    "a legal hold on a record class was placed or released meanwhile; check the holds and ask again".into(),
                );
                self.audit(vec![rec])?;
                Err(e)
            }
            Err(e) => Err(crate::audit_failed(e)),
        }
    }

    /// `POST /api/destruction/{id}/approve` (a second privacy officer, step-up): destroys
    /// the chart — its data keys shredded and rows removed in one transaction with the
    /// audit entry recording it — and returns the signed certificate of destruction.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`, `SeparationOfDuties` (the requester),
    /// `Duplicate` (not pending; under a legal hold).
    pub fn approve_destruction(&self, c: &Caller, id: &str) -> Result<String, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::DestructionApprove, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("destruction={id}"));
        let Some(row) = self.destruction(id)? else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = Some(row.patient.to_string());
        let fail = |mut rec: medvault_audit::AuditRecord, outcome, why: &str| {
            rec.outcome = outcome;
            rec.detail = Some(format!("destruction={id} refused: {why}"));
            self.audit(vec![rec])
        };
        if row.status != "requested" {
            fail(rec, Outcome::Failure, "not pending")?;
            return Err(VaultError::Duplicate(format!(
                "this destruction request is {}, not pending",
                row.status
            )));
        }
        if !gov::second_person(&row.requested_by, c.actor()) {
            fail(rec, Outcome::Denied, "one's own request")?;
            return Err(VaultError::SeparationOfDuties(
                "a destruction is approved by a privacy officer other than the one who requested it",
            ));
        }
        if let Some(h) = self.active_holds(&row.patient)?.first() {
            fail(rec, Outcome::Failure, "legal hold")?;
            return Err(VaultError::Duplicate(format!(
                "the chart is under legal hold {} (matter {}); it cannot be destroyed until the hold is released",
                h.id, h.matter
            )));
        }
        let (class_holds, holds_version, guard) =
            self.holds_on_chart(c, Operation::DestructionApprove, &mut rec, &row.patient)?;
        if !class_holds.is_empty() {
            let why = class_hold_refusal(&class_holds);
            fail(rec, Outcome::Failure, "legal hold on a record class")?;
            return Err(VaultError::Duplicate(why));
        }
        let records = self
            .store
            .chart_census(&row.patient)?
            .iter()
            .map(|(t, n, v)| format!("{t}={n}/{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        rec.detail = Some(format!(
            "destruction={id} reason={} requested_by={} records={}",
            row.reason,
            row.requested_by,
            if records.is_empty() { "none" } else { &records }
        ));
        let committed = match self.commit(
            vec![
                guard,
                Op::CompleteDestruction {
                    id: id.to_owned(),
                    approved_by: c.actor().to_owned(),
                    approved_at: self.clock.now().unix_timestamp(),
                    records,
                },
                Op::ShredPatient {
                    patient: row.patient.clone(),
                },
            ],
            vec![rec.clone()],
        ) {
            Ok(c) => c,
            Err(VaultError::Conflict) => {
                fail(rec, Outcome::Failure, "changed meanwhile")?;
                return Err(VaultError::Duplicate(
                    "the request was decided, or a legal hold placed, while you approved it; reload and check".into(),
                ));
            }
            Err(_) if self.holds_moved(holds_version) => {
                fail(rec, Outcome::Failure, "a hold changed meanwhile")?;
                return Err(VaultError::Duplicate(
                    "a legal hold on a record class was placed or released while you approved it; reload and check".into(),
                ));
            }
            Err(e) => return Err(crate::audit_failed(e)),
        };
        self.after_shred(&row.patient);
        let seq = committed.audit_seqs.first().copied();
        tracing::warn!(target: "medvault::alert", destruction = %id, patient = %row.patient, "chart destroyed (crypto-shredded)");
        self.destruction_evidence(id, seq)
            .and_then(|_| self.certificate_text(id))
    }

    /// After a chart's keys are shredded: every server forgets the key it may hold, the
    /// remaining rows (versions nobody can open, search tokens) are removed, and pushed out
    /// of the database's files. Best effort: the chart is unreadable already.
    pub(crate) fn after_shred(&self, pid: &PatientId) {
        self.keys.evict(pid);
        if let Err(e) = self.store.announce_key_eviction(pid) {
            tracing::error!(cause = %e, patient = %pid, "could not tell other servers to drop a shredded key; they drop it on restart");
        }
        if let Err(e) = self.commit(
            vec![Op::RemoveShredded {
                patient: pid.clone(),
            }],
            vec![],
        ) {
            tracing::error!(cause = %e, patient = %pid, "could not remove a shredded chart's rows; `medvault destroy ledger` lists it");
        }
        self.purge_shredded();
    }

    /// Pushes the shredded rows out of the database's files (SQLite: the WAL checkpointed
    /// over zeroed pages). Best effort: the keys are gone already.
    pub(crate) fn purge_shredded(&self) {
        match self.store.purge_deleted() {
            Ok(true) => {}
            Ok(false) => tracing::warn!("readers held old pages; the shredded rows leave the database files at the next checkpoint"),
            Err(e) => tracing::error!(cause = %e, "could not checkpoint after a shred"),
        }
    }

    /// Records where the destruction `id` sits in the audit log (`seq`, or found by
    /// scanning) and signs a checkpoint covering it if none does yet.
    fn destruction_evidence(&self, id: &str, seq: Option<u64>) -> Result<(u64, u64), VaultError> {
        let seq = match seq {
            Some(s) => s,
            None => {
                let tag = format!("destruction={id} ");
                *self
                    .scan_back(1, |s, r| {
                        (r.action == SHRED_ACTION
                            && r.outcome == Outcome::Success
                            && r.detail.as_deref().is_some_and(|d| d.starts_with(&tag)))
                        .then_some(s)
                    })?
                    .first()
                    .ok_or(VaultError::Internal(
                        "destruction entry not in the audit log".into(),
                    ))?
            }
        };
        let size = self.checkpoint_covering(seq)?.size;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.commit(
            vec![Op::SetDestructionEvidence {
                id: id.to_owned(),
                audit_seq: as_i64(seq),
                checkpoint: as_i64(size),
            }],
            vec![],
        )?;
        Ok((seq, size))
    }

    fn certificate_text(&self, id: &str) -> Result<String, VaultError> {
        let row = self.destruction(id)?.ok_or(VaultError::NotFound)?;
        if row.status != "completed" {
            return Err(VaultError::Duplicate(format!(
                "this destruction request is {}; a certificate exists once it is completed",
                row.status
            )));
        }
        let (seq, size) = match (u64::try_from(row.audit_seq), u64::try_from(row.checkpoint)) {
            (Ok(s), Ok(c)) if c > s => (s, c),
            _ => self.destruction_evidence(id, u64::try_from(row.audit_seq).ok())?,
        };
        let checkpoint = self.checkpoint_ref(size)?;
        let cert = Certificate {
            id: row.id.clone(),
            patient: row.patient.to_string(),
            reason: row
                .reason
                .parse()
                .map_err(|_| VaultError::Internal("stored reason unknown".into()))?,
            method: gov::CRYPTO_SHRED.to_owned(),
            records: row.records.clone(),
            requested_by: row.requested_by.clone(),
            requested_at: instant(row.requested_at),
            approved_by: row.approved_by.clone(),
            destroyed_at: instant(row.approved_at),
            audit_entry: seq,
            checkpoint,
            last_backup_before: self.last_backup_before(seq)?,
        };
        Ok(self.destruction_signer.sign(&cert.to_text()))
    }

    /// The signed checkpoint of `size` entries, as a certificate names it.
    fn checkpoint_ref(&self, size: u64) -> Result<CheckpointRef, VaultError> {
        let note = self
            .store
            .checkpoint(Some(size))?
            .ok_or(VaultError::Internal(
                "the covering checkpoint is missing".into(),
            ))?
            .1;
        let body = medvault_audit::note::NoteVerifier::parse(&self.log.verifier_key())
            .and_then(|v| v.verify(&note).map(str::to_owned))
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let (origin, size, root) = medvault_audit::note::parse_checkpoint(&body)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(CheckpointRef {
            origin,
            size,
            root: medvault_audit::log::b64(&root),
        })
    }

    /// A signed checkpoint covering audit entry `seq` (signed now if none does yet).
    pub(crate) fn checkpoint_covering(&self, seq: u64) -> Result<CheckpointRef, VaultError> {
        let mut size = self.store.checkpoint(None)?.map_or(0, |(s, _)| s);
        if size <= seq {
            self.sign_checkpoint_now()?;
            size = self.store.checkpoint(None)?.map_or(0, |(s, _)| s);
        }
        if size <= seq {
            return Err(VaultError::Internal(
                "no checkpoint covers the destruction".into(),
            ));
        }
        self.checkpoint_ref(size)
    }

    /// The newest backup snapshot recorded before audit entry `seq`, with its expiry: until
    /// then a copy of the destroyed chart's ciphertext exists (unreadable without the
    /// shredded key, and any restore replays the shred ledger).
    fn last_backup_before(&self, seq: u64) -> Result<Option<(String, String)>, VaultError> {
        let found = self.scan_back_from(Some(seq), 1, |_, r| {
            (r.action == medvault_types::Operation::Backup.as_str()
                && r.outcome == Outcome::Success)
                .then_some(())
                .and(r.detail)
                .and_then(|d| {
                    let rest = d.strip_prefix(crate::backup::SNAPSHOT_TAG)?;
                    let (id, exp) = rest.split_once(" expires=")?;
                    Some((id.to_owned(), exp.to_owned()))
                })
        })?;
        Ok(found.into_iter().next())
    }

    /// `GET /api/destruction/{id}/certificate`: the signed certificate of a completed
    /// destruction (C2SP signed note; verify offline with
    /// [`Vault::destruction_verifier_key`] and `medvault destroy verify`).
    ///
    /// # Errors
    /// Denied, `NotFound`, `Duplicate` (not completed).
    pub fn destruction_certificate(&self, c: &Caller, id: &str) -> Result<String, VaultError> {
        let _permit = self.permit_operation(c, Operation::DestructionRead, None)?;
        self.certificate_text(id)
    }

    /// `POST /api/destruction/{id}/cancel` (privacy officer, step-up): withdraws a pending
    /// request.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`, `Duplicate` (not pending).
    pub fn cancel_destruction(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::DestructionCancel, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("destruction={id}"));
        let Some(row) = self.destruction(id)? else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = Some(row.patient.to_string());
        match self.commit(
            vec![Op::CancelDestruction {
                id: id.to_owned(),
                cancelled_by: c.actor().to_owned(),
                at: self.clock.now().unix_timestamp(),
            }],
            vec![rec],
        ) {
            Ok(_) => Ok(()),
            Err(VaultError::Conflict) => Err(VaultError::Duplicate(format!(
                "this destruction request is {}, not pending",
                row.status
            ))),
            Err(e) => Err(crate::audit_failed(e)),
        }
    }

    /// `GET /api/destruction`: every request, newest first.
    ///
    /// # Errors
    /// Denied; storage and audit failures.
    pub fn destructions(&self, c: &Caller) -> Result<Vec<DestructionView>, VaultError> {
        let _permit = self.permit_operation(c, Operation::DestructionRead, None)?;
        Ok(self
            .store
            .destructions()?
            .iter()
            .map(DestructionView::of)
            .collect())
    }

    /// `GET /api/destruction/key`: the verifier key of certificates of destruction (C2SP
    /// note verifier key), to check them offline.
    ///
    /// # Errors
    /// Denied.
    pub fn destruction_verifier_key(&self, c: &Caller) -> Result<String, VaultError> {
        let _permit = self.permit_operation(c, Operation::DestructionRead, None)?;
        Ok(self.destruction_signer.verifier_key())
    }

    /// The same verifier key for the local operator (`medvault destroy key`): public by
    /// design, like the audit log's checkpoint key, so printing it needs no sign-in.
    pub fn destruction_verifier_key_local(&self, _operator: &crate::LocalOperator) -> String {
        self.destruction_signer.verifier_key()
    }

    /// The shred ledger: every chart destroyed (here, or replayed here after a restore),
    /// with the audit index recording it, oldest first — read from the audit log, so it
    /// travels in every backup.
    ///
    /// # Errors
    /// The log cannot be read.
    pub fn shred_ledger(&self) -> Result<Vec<(String, u64)>, VaultError> {
        // Both actions start with "destruction."; only those entries are decoded.
        let mut out = self.scan_back_containing(b"destruction.", |s, r| {
            ((r.action == SHRED_ACTION || r.action == REPLAY_ACTION)
                && r.outcome == Outcome::Success)
                .then(|| r.patient.map(|p| (p, s)))
                .flatten()
        })?;
        out.reverse();
        Ok(out)
    }

    /// The shred ledger as a C2SP signed note under the destruction key (`medvault destroy
    /// ledger`): what a restore of an older backup is given, so only this installation's
    /// own record of destructions can make it shred anything.
    ///
    /// # Errors
    /// The log cannot be read.
    pub fn signed_shred_ledger(&self) -> Result<String, VaultError> {
        let mut body = format!("{LEDGER_HEADER}\n");
        for (p, seq) in self.shred_ledger()? {
            body.push_str(&format!("{p} {seq}\n"));
        }
        Ok(self.destruction_signer.sign(&body))
    }

    /// Reads a ledger made by [`Vault::signed_shred_ledger`] on this installation (the same
    /// destruction key — a restored copy has it): `(patient id, audit index)` entries.
    ///
    /// # Errors
    /// `BadRequest` when the signature is not this installation's or the text is not a
    /// ledger.
    pub fn verify_shred_ledger(&self, note: &str) -> Result<Vec<(String, u64)>, VaultError> {
        let bad = |m: &str| {
            VaultError::BadRequest(format!("not a shred ledger of this installation: {m}"))
        };
        let v = medvault_audit::note::NoteVerifier::parse(&self.destruction_signer.verifier_key())
            .map_err(|e| bad(&e.to_string()))?;
        let text = v.verify(note).map_err(|e| bad(&e.to_string()))?;
        let mut lines = text.lines();
        if lines.next() != Some(LEDGER_HEADER) {
            return Err(bad("no ledger header"));
        }
        lines
            .map(|l| {
                let (p, seq) = l.split_once(' ').ok_or_else(|| bad("malformed line"))?;
                let seq = seq.parse().map_err(|_| bad("malformed line"))?;
                PatientId::new(p).map_err(|_| bad("malformed patient id"))?;
                Ok((p.to_owned(), seq))
            })
            .collect()
    }

    /// `POST /api/patients/{id}/legal-holds {"matter","reason"}` (security administrator,
    /// step-up): places a legal hold; while active, the chart cannot be destroyed.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `BadRequest` (missing or overlong matter or reason),
    /// `NotFound` (no such chart).
    pub fn set_legal_hold(
        &self,
        c: &Caller,
        patient: &str,
        matter: &str,
        reason: &str,
    ) -> Result<LegalHoldView, VaultError> {
        let pid = patient_id(patient)?;
        let Some(mut rec) = self.operate(c, Operation::LegalHoldSet, Some(pid.as_str()))? else {
            return Err(VaultError::Unauthenticated);
        };
        let (matter, reason) = (matter.trim(), reason.trim());
        if matter.is_empty()
            || matter.chars().count() > MATTER_CHARS
            || matter.contains(['\n', '\r'])
        {
            return Err(VaultError::BadRequest(format!(
                "a matter reference (a case or docket number, one line of at most {MATTER_CHARS} characters) is required"
            )));
        }
        if reason.chars().count() < 3 || reason.chars().count() > HOLD_REASON_CHARS {
            return Err(VaultError::BadRequest(format!(
                "a reason of 3 to {HOLD_REASON_CHARS} characters is required"
            )));
        }
        if self.store.patient_key(&pid)?.is_none() {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        }
        let id = medvault_types::random_uuid();
        let sealed = self
            .cipher_for(&pid)?
            .seal(&hold_aad(&id), reason.as_bytes())?;
        let row = LegalHoldRow {
            id: id.clone(),
            patient: pid,
            matter: matter.to_owned(),
            reason: sealed,
            set_by: c.actor().to_owned(),
            set_at: self.clock.now().unix_timestamp(),
            released_by: String::new(),
            released_at: 0,
        };
        rec.detail = Some(format!("hold={id} matter={matter}"));
        self.commit(vec![Op::PutLegalHold(row.clone())], vec![rec])
            .map_err(crate::audit_failed)?;
        self.hold_view(&row)
    }

    /// `POST /api/legal-holds/{id}/release` (security administrator, step-up).
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`, `Duplicate` (already released).
    pub fn release_legal_hold(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::LegalHoldRelease, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("hold={id}"));
        let Some(h) = self
            .store
            .legal_holds(None)?
            .into_iter()
            .find(|h| h.id == id)
        else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = Some(h.patient.to_string());
        match self.commit(
            vec![Op::ReleaseLegalHold {
                id: id.to_owned(),
                released_by: c.actor().to_owned(),
                released_at: self.clock.now().unix_timestamp(),
            }],
            vec![rec],
        ) {
            Ok(_) => Ok(()),
            Err(VaultError::Conflict) => Err(VaultError::Duplicate(
                "this legal hold was already released".into(),
            )),
            Err(e) => Err(crate::audit_failed(e)),
        }
    }

    fn hold_view(&self, h: &LegalHoldRow) -> Result<LegalHoldView, VaultError> {
        let reason = match self.store.patient_key(&h.patient)? {
            Some(_) => {
                let plain = self.open_chart_text(&h.patient, &hold_aad(&h.id), &h.reason)?;
                Some(String::from_utf8_lossy(&plain).into_owned())
            }
            None => None,
        };
        let released = h.released_at != 0;
        Ok(LegalHoldView {
            id: h.id.clone(),
            patient: h.patient.to_string(),
            matter: h.matter.clone(),
            reason,
            set_by: h.set_by.clone(),
            set_at: h.set_at,
            active: !released,
            released_by: released.then(|| h.released_by.clone()),
            released_at: released.then_some(h.released_at),
        })
    }

    /// `GET /api/legal-holds[?patient=ID]`: holds, newest first, with their reasons.
    ///
    /// # Errors
    /// Denied; `BadRequest` for an invalid patient id; storage and audit failures.
    pub fn legal_holds(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<Vec<LegalHoldView>, VaultError> {
        let pid = patient.map(patient_id).transpose()?;
        let _permit = self.permit_operation(c, Operation::LegalHoldRead, None)?;
        self.store
            .legal_holds(pid.as_ref())?
            .iter()
            .map(|h| self.hold_view(h))
            .collect()
    }
}

/// Verifies a certificate of destruction offline: its signature under `verifier_key` (the
/// C2SP note verifier key from `GET /api/destruction/key`), then its fields.
///
/// # Errors
/// `BadRequest` naming what failed: a malformed key, a bad or missing signature, a body
/// that is not a certificate.
pub fn verify_certificate(note: &str, verifier_key: &str) -> Result<Certificate, VaultError> {
    let v = medvault_audit::note::NoteVerifier::parse(verifier_key)
        .map_err(|e| VaultError::BadRequest(format!("verifier key: {e}")))?;
    let text = v
        .verify(note)
        .map_err(|e| VaultError::BadRequest(format!("certificate signature: {e}")))?;
    Certificate::parse(text).map_err(|e| VaultError::BadRequest(e.to_string()))
}

/// The signer of certificates, over the named key stored wrapped beside the others.
pub(crate) fn signer(name: &str, key: &medvault_crypto::DataKey) -> NoteSigner {
    NoteSigner::new(name, key.expose_for_derivation())
}
