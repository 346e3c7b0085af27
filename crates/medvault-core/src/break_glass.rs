//! Break-the-glass (SPEC "Access control"): a clinician without a treatment relationship
//! asks for emergency access to one chart with a reason code and a justification, after a
//! step-up; the grant is time-boxed (`access.break_glass_secs`, default 8 hours), every access
//! under it is flagged in the audit, and privacy officers review each use — an
//! inappropriate one opens an incident (`medvault-governance`). A request from someone who
//! already treats the patient makes no grant and no review noise.

use medvault_governance::{self as gov, Incident, ReviewOutcome};
use medvault_policy::Relationship;
use medvault_store::{BreakGlassRow, IncidentRow, Op};
use medvault_types::{BreakGlassReason, Operation, PatientId};
use serde::Serialize;

use crate::{Caller, Outcome, Vault, VaultError};

/// The answer to a break-the-glass request.
#[derive(Debug, Clone, Serialize)]
pub struct BreakGlassGrant {
    /// The grant's id; `None` when no grant was needed.
    pub id: Option<String>,
    pub patient: String,
    /// Unix seconds; `None` when no grant was needed.
    pub expires_at: Option<i64>,
    /// Set when the caller already has a treatment relationship with the patient: no grant
    /// is made and nothing is queued for review.
    pub suppressed: Option<&'static str>,
}

/// A grant as the review queue shows it to a privacy officer.
#[derive(Debug, Clone, Serialize)]
pub struct BreakGlassView {
    pub id: String,
    pub user: String,
    pub patient: String,
    pub reason: String,
    /// The clinician's justification (opened for the reviewer; it may hold PHI).
    pub justification: String,
    /// Unix seconds.
    pub created: i64,
    pub expires: i64,
    pub active: bool,
    /// `pending`, `appropriate` or `inappropriate`.
    pub status: String,
    pub reviewed_by: Option<String>,
    pub reviewed_at: Option<i64>,
    pub note: Option<String>,
    pub incident: Option<String>,
    /// The AuditEvent search listing what was accessed under the grant.
    pub audit_query: String,
}

fn aad(id: &str, what: &str) -> Vec<u8> {
    format!("medvault:break-glass:v1|{id}|{what}").into_bytes()
}

fn gov_err(e: gov::GovernanceError) -> VaultError {
    match e {
        gov::GovernanceError::SelfReview => VaultError::Forbidden { withheld: vec![] },
        gov::GovernanceError::AlreadyReviewed => {
            VaultError::Duplicate("this break-the-glass access was already reviewed".into())
        }
        other => VaultError::BadRequest(other.to_string()),
    }
}

impl Vault {
    /// `POST /api/break-glass {"patient","reason","justification"}` (step-up): a time-boxed
    /// grant to one chart, recorded and queued for review.
    ///
    /// # Errors
    /// Denied (non-clinical roles, the wrong purpose), `StepUpRequired`, `BadRequest` (an
    /// unknown reason, a missing justification), `NotFound` (no such patient).
    pub fn break_glass(
        &self,
        c: &Caller,
        patient: &str,
        reason: &str,
        justification: &str,
    ) -> Result<BreakGlassGrant, VaultError> {
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("patient must be a Patient id".into()))?;
        let Some(mut rec) = self.operate(c, Operation::BreakGlass, Some(pid.as_str()))? else {
            return Err(VaultError::Unauthenticated);
        };
        let reason: BreakGlassReason = reason.parse().map_err(|_| {
            VaultError::BadRequest(format!(
                "unknown reason; use one of: {}",
                BreakGlassReason::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let text = gov::check_justification(justification)
            .map_err(|e| VaultError::BadRequest(e.to_string()))?;
        match self.store.current("Patient", pid.as_str())? {
            Some(r) if !r.deleted() => {}
            _ => {
                rec.outcome = Outcome::NotFound;
                self.audit(vec![rec])?;
                return Err(VaultError::NotFound);
            }
        }
        let username = c.actor().to_owned();
        // A clinician who already treats the patient needs no grant — unless it is a
        // medical emergency, which is what overrides the patient's consent (and is
        // reviewed like any other).
        let current = c.principal().is_none_or(|p| p.training_current);
        if reason != BreakGlassReason::MedicalEmergency
            && current
            && self.write_relationship(c, &[], Some(&pid))? == Relationship::Treatment
        {
            rec.detail = Some(format!(
                "reason={reason} suppressed: treatment relationship"
            ));
            self.audit(vec![rec])?;
            return Ok(BreakGlassGrant {
                id: None,
                patient: pid.to_string(),
                expires_at: None,
                suppressed: Some("you already have a treatment relationship with this patient; no emergency access is needed"),
            });
        }
        let now = self.clock.now().unix_timestamp();
        // One live grant per clinician and chart: asking again returns it.
        if let Some(g) = self.store.break_glass()?.into_iter().find(|g| {
            g.username == username
                    && g.patient == pid
                    && g.expires > now
                    // A medical emergency upgrades a lesser live grant.
                    && (g.reason == BreakGlassReason::MedicalEmergency.as_str()
                        || reason != BreakGlassReason::MedicalEmergency)
        }) {
            rec.detail = Some(format!("reason={reason} grant={} already active", g.id));
            self.audit(vec![rec])?;
            return Ok(BreakGlassGrant {
                id: Some(g.id),
                patient: pid.to_string(),
                expires_at: Some(g.expires),
                suppressed: Some("a grant for this patient is already active"),
            });
        }
        let id = medvault_types::random_uuid();
        let expires = gov::grant_expiry(now, self.options.break_glass_secs);
        let cipher = self.cipher_for(&pid)?;
        let sealed = cipher.seal(&aad(&id, "justification"), text.as_bytes())?;
        rec.break_glass = true;
        rec.detail = Some(format!("grant={id} reason={reason} expires={expires}"));
        self.commit(
            vec![Op::PutBreakGlass(BreakGlassRow {
                id: id.clone(),
                username: username.clone(),
                patient: pid.clone(),
                reason: reason.as_str().to_owned(),
                justification: sealed,
                created: now,
                expires,
                outcome: String::new(),
                reviewed_by: String::new(),
                reviewed_at: 0,
                note: vec![],
                incident: String::new(),
            })],
            vec![rec],
        )
        .map_err(crate::audit_failed)?;
        // The alert privacy officers act on: the review queue, and this line for the SIEM
        // (no PHI: ids and the reason code only).
        tracing::warn!(target: "medvault::alert", grant = %id, user = %username, patient = %pid, reason = %reason, "break-the-glass access granted; review required");
        Ok(BreakGlassGrant {
            id: Some(id),
            patient: pid.to_string(),
            expires_at: Some(expires),
            suppressed: None,
        })
    }

    fn grant_view(&self, g: &BreakGlassRow, now: i64) -> Result<BreakGlassView, VaultError> {
        let open = |what: &str, b: &[u8]| -> Result<String, VaultError> {
            let plain = self.open_chart_text(&g.patient, &aad(&g.id, what), b)?;
            Ok(String::from_utf8_lossy(&plain).into_owned())
        };
        let reviewed = !g.outcome.is_empty();
        let since = medvault_types::fhir_instant(
            time::OffsetDateTime::from_unix_timestamp(g.created)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        );
        Ok(BreakGlassView {
            id: g.id.clone(),
            user: g.username.clone(),
            patient: g.patient.to_string(),
            reason: g.reason.clone(),
            justification: open("justification", &g.justification)?,
            created: g.created,
            expires: g.expires,
            active: g.expires > now,
            status: if reviewed {
                g.outcome.clone()
            } else {
                "pending".into()
            },
            reviewed_by: reviewed.then(|| g.reviewed_by.clone()),
            reviewed_at: reviewed.then_some(g.reviewed_at),
            note: match reviewed && !g.note.is_empty() {
                true => Some(open("note", &g.note)?),
                false => None,
            },
            incident: (!g.incident.is_empty()).then(|| g.incident.clone()),
            audit_query: format!(
                "/fhir/AuditEvent?patient={}&agent={}&date=ge{}",
                g.patient, g.username, since
            ),
        })
    }

    /// `GET /api/break-glass/reviews[?status=pending|all]` (privacy officers): grants,
    /// newest first.
    ///
    /// # Errors
    /// Denied; storage and audit failures.
    pub fn break_glass_reviews(
        &self,
        c: &Caller,
        pending_only: bool,
    ) -> Result<Vec<BreakGlassView>, VaultError> {
        let _permit = self.permit_operation(c, Operation::BreakGlassReviews, None)?;
        let now = self.clock.now().unix_timestamp();
        self.store
            .break_glass()?
            .iter()
            .filter(|g| !pending_only || g.outcome.is_empty())
            .map(|g| self.grant_view(g, now))
            .collect()
    }

    /// `POST /api/break-glass/{id}/review {"outcome","note"}` (privacy officers, never the
    /// grantee): records the finding; an inappropriate use opens an incident.
    ///
    /// # Errors
    /// Denied (including reviewing one's own access), `NotFound`, `Conflict` (already
    /// reviewed), `BadRequest` (unknown outcome, missing note).
    pub fn review_break_glass(
        &self,
        c: &Caller,
        id: &str,
        outcome: &str,
        note: &str,
    ) -> Result<BreakGlassView, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::BreakGlassReview, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        let outcome: ReviewOutcome = outcome.parse().map_err(gov_err)?;
        let Some(g) = self.store.break_glass()?.into_iter().find(|g| g.id == id) else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        rec.patient = Some(g.patient.to_string());
        let now = self.clock.now().unix_timestamp();
        let grant = gov::Grant {
            id: g.id.clone(),
            grantee: g.username.clone(),
            patient: g.patient.to_string(),
            reason: g
                .reason
                .parse()
                .unwrap_or(BreakGlassReason::MedicalEmergency),
            created: g.created,
            expires: g.expires,
            outcome: (!g.outcome.is_empty()).then_some(ReviewOutcome::Appropriate),
        };
        let incident_id = medvault_types::random_uuid();
        let review = match gov::review(&grant, c.actor(), outcome, note, now, &incident_id) {
            Ok(mut r) => {
                // The incident's timeline: what was accessed under the grant (audit entries
                // flagged break-the-glass, by the grantee, in this chart; the latest 100).
                if let Some(i) = r.incident.as_mut() {
                    let accesses = self.scan_back(100, |seq, rec| {
                        let mine = rec.break_glass
                            && rec.actor == g.username
                            && rec.action != "break-glass"
                            && rec.patient.as_deref() == Some(g.patient.as_str());
                        let at = medvault_fhir::date::parse(&rec.time)
                            .map(|t| t.start / 1000)
                            .unwrap_or(0);
                        (mine && at >= g.created).then(|| {
                            let what = rec.resource.unwrap_or_default();
                            let what = what.split("/_history").next().unwrap_or("").to_owned();
                            (
                                at,
                                format!(
                                    "{} {what} under break-the-glass (audit entry {seq})",
                                    rec.action
                                ),
                            )
                        })
                    })?;
                    // Oldest first, as a timeline reads.
                    for (at, what) in accesses.into_iter().rev() {
                        i.record(at, &g.username, &what);
                    }
                }
                r
            }
            Err(e) => {
                rec.outcome = Outcome::Denied;
                rec.detail = Some(format!("grant={id} refused: {e}"));
                self.audit(vec![rec])?;
                return Err(gov_err(e));
            }
        };
        let cipher = self.cipher_for(&g.patient)?;
        let note = note.trim();
        let sealed = match note.is_empty() {
            true => vec![],
            false => cipher.seal(&aad(&g.id, "note"), note.as_bytes())?,
        };
        let mut ops = vec![Op::ReviewBreakGlass {
            id: g.id.clone(),
            outcome: outcome.as_str().to_owned(),
            reviewed_by: c.actor().to_owned(),
            reviewed_at: now,
            note: sealed,
            incident: review
                .incident
                .as_ref()
                .map(|i| i.id.clone())
                .unwrap_or_default(),
        }];
        if let Some(i) = &review.incident {
            ops.push(Op::PutIncident(incident_row(i)?));
        }
        rec.detail = Some(format!(
            "grant={id} outcome={outcome}{}",
            review
                .incident
                .as_ref()
                .map(|i| format!(" incident={}", i.id))
                .unwrap_or_default()
        ));
        self.commit(ops, vec![rec])?;
        let g = self
            .store
            .break_glass()?
            .into_iter()
            .find(|x| x.id == id)
            .ok_or(VaultError::NotFound)?;
        self.grant_view(&g, now)
    }

    /// `GET /api/incidents` (privacy officers): every incident, newest first.
    ///
    /// # Errors
    /// Denied; storage and audit failures.
    pub fn incidents(&self, c: &Caller) -> Result<Vec<Incident>, VaultError> {
        let _permit = self.permit_operation(c, Operation::Incidents, None)?;
        self.store
            .incidents()?
            .iter()
            .map(|r| {
                serde_json::from_str(&r.body)
                    .map_err(|e| VaultError::Internal(format!("stored incident: {e}")))
            })
            .collect()
    }
}

impl Vault {
    /// Whether `c` holds a live break-the-glass grant (to `patient`'s chart, or to any):
    /// the training gate's one exception, for searches and `$everything` too.
    pub(crate) fn has_live_grant(
        &self,
        c: &Caller,
        patient: Option<&str>,
    ) -> Result<bool, VaultError> {
        if c.principal().is_none() {
            return Ok(false);
        }
        let now = self.now_unix();
        Ok(self.store.break_glass()?.iter().any(|g| {
            g.username == c.actor()
                && g.expires > now
                && patient.is_none_or(|p| g.patient.as_str() == p)
        }))
    }
}

pub(crate) fn incident_row(i: &Incident) -> Result<IncidentRow, VaultError> {
    Ok(IncidentRow {
        id: i.id.clone(),
        opened_at: i.opened_at,
        status: i.status.as_str().to_owned(),
        body: serde_json::to_string(i).map_err(|e| VaultError::Internal(e.to_string()))?,
    })
}
