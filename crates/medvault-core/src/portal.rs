//! The patient portal's links (SPEC "Access control"): a `patient`-role account reaches a
//! chart only through a link the front desk records after identity proofing — its own
//! (`self`), or as a proxy (`guardian`, `caregiver`); the relationship lookup returns them
//! as `"self"` / `"proxy"` for the policy to decide on.

use medvault_store::Op;
use medvault_types::{Operation, PatientId};

use crate::{Caller, Vault, VaultError};

/// Identity-proofing evidence the front desk may record for a portal link (NIST SP 800-63A
/// evidence kinds, as a front desk sees them).
pub const PORTAL_EVIDENCE: &[&str] = &[
    "government-photo-id",
    "in-person-known-patient",
    "court-order",
    "patient-authorization",
];

impl Vault {
    /// Checks, before anything is created, that a portal link to `patient` with `evidence`
    /// could be made (the local operator's `user add --patient`).
    ///
    /// # Errors
    /// `BadRequest` (a bad id or evidence kind), `NotFound` (no such patient).
    pub fn check_portal_link(
        &self,
        _operator: &crate::LocalOperator,
        patient: &str,
        evidence: &str,
    ) -> Result<(), VaultError> {
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))?;
        match self.linkable(&pid, evidence)? {
            true => Ok(()),
            false => Err(VaultError::BadRequest(format!("no patient with id {pid}"))),
        }
    }

    /// Checks the evidence kind; whether the chart exists.
    fn linkable(&self, pid: &PatientId, evidence: &str) -> Result<bool, VaultError> {
        if !PORTAL_EVIDENCE.contains(&evidence) {
            return Err(VaultError::BadRequest(format!(
                "evidence must be one of: {}",
                PORTAL_EVIDENCE.join(", ")
            )));
        }
        Ok(matches!(self.store.current("Patient", pid.as_str())?, Some(r) if !r.deleted()))
    }

    /// `POST /api/patients/{id}/portal-links {"username","relationship","evidence"}`
    /// (front desk, step-up): links a `patient`-role account to a chart after identity
    /// proofing — `self` (one per account), or as a proxy: `guardian` or `caregiver`.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `BadRequest` (unknown relationship or evidence, not a
    /// portal account), `NotFound` (no such user or patient), `Conflict` (linked already,
    /// or the account already has its own chart).
    pub fn link_portal(
        &self,
        c: &Caller,
        patient: &str,
        username: &str,
        kind: &str,
        evidence: &str,
    ) -> Result<(), VaultError> {
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))?;
        let Some(mut rec) = self.operate(c, Operation::LinkPortal, Some(pid.as_str()))? else {
            return Err(VaultError::Unauthenticated);
        };
        if !["self", "guardian", "caregiver"].contains(&kind) {
            return Err(VaultError::BadRequest(
                "relationship must be self, guardian or caregiver".into(),
            ));
        }
        let chart_exists = self.linkable(&pid, evidence)?;
        let user = self.store.user(username)?.ok_or(VaultError::NotFound)?;
        if user.role != medvault_types::Role::Patient.as_str() {
            return Err(VaultError::BadRequest(
                "only a patient portal account (role patient) is linked to a chart".into(),
            ));
        }
        if !chart_exists {
            return Err(VaultError::NotFound);
        }
        let links = self.store.portal_links(username)?;
        if links.iter().any(|l| l.patient == pid) {
            return Err(VaultError::Duplicate(
                "this account is already linked to this chart".into(),
            ));
        }
        if kind == "self" && links.iter().any(|l| l.kind == "self") {
            return Err(VaultError::Duplicate(
                "this account already has its own chart; a proxy link is `guardian` or `caregiver`"
                    .into(),
            ));
        }
        rec.detail = Some(format!(
            "target={username} relationship={kind} evidence={evidence}"
        ));
        self.commit(
            vec![Op::PutPortalLink(medvault_store::PortalLinkRow {
                username: username.to_owned(),
                patient: pid,
                kind: kind.to_owned(),
                evidence: evidence.to_owned(),
                linked_by: c.actor().to_owned(),
                linked_at: self.clock.now().unix_timestamp(),
            })],
            vec![rec],
        )?;
        Ok(())
    }
}

impl Vault {
    /// `DELETE /api/patients/{id}/portal-links/{username}` (front desk, step-up): ends a
    /// portal account's link to a chart (a guardian whose ward came of age, a mistake).
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound` (no such link).
    pub fn unlink_portal(
        &self,
        c: &Caller,
        patient: &str,
        username: &str,
    ) -> Result<(), VaultError> {
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))?;
        let Some(mut rec) = self.operate(c, Operation::LinkPortal, Some(pid.as_str()))? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("target={username} unlinked"));
        match self.commit(
            vec![Op::DeletePortalLink {
                username: username.to_owned(),
                patient: pid,
            }],
            vec![rec],
        ) {
            Err(VaultError::Conflict) => Err(VaultError::NotFound),
            other => other.map(|_| ()),
        }
    }
}
