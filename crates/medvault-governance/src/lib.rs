//! medvault-governance — the rules a hospital's privacy and security officers run beyond
//! access decisions: today, the review of break-the-glass grants and the incidents an
//! inappropriate use opens. Later rooms' work (detection alerts, missing paper charts,
//! breach assessment, retention, legal holds) extends the same [`Incident`] rather than
//! defining its own.
//!
//! This room is pure: it takes time as a parameter (Unix seconds), does no I/O, never sees
//! PHI (an incident names patients by id and users by name, and refers to audit entries),
//! and returns values for the gate to persist in its audit transaction.
//! INVARIANT: an incident's timeline only grows, in time order.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod breach;
pub mod destruction;
pub mod records;
pub mod response;
pub mod retention;
pub mod rights;
pub mod safeguards;
pub mod training;

use std::fmt;
use std::str::FromStr;

use medvault_types::BreakGlassReason;
use serde::{Deserialize, Serialize};

/// Errors of this room.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GovernanceError {
    #[error("unknown review outcome `{0}`: use `appropriate` or `inappropriate`")]
    UnknownOutcome(String),
    #[error("a justification is required: say in a sentence why emergency access is needed ({min} to {max} characters)")]
    Justification { min: usize, max: usize },
    #[error("a review note of at most {0} characters is required when the use was inappropriate")]
    Note(usize),
    #[error("you cannot review your own break-the-glass access")]
    SelfReview,
    #[error("this break-the-glass access was already reviewed")]
    AlreadyReviewed,
}

/// Shortest and longest break-the-glass justification, in characters.
pub const JUSTIFICATION_CHARS: (usize, usize) = (10, 2000);
/// Longest review note, in characters.
pub const NOTE_CHARS: usize = 2000;
/// Default life of a break-the-glass grant: 8 hours, as large hospitals configure it.
pub const DEFAULT_GRANT_SECS: i64 = 8 * 3600;

/// Checks a break-the-glass request's justification (trimmed).
///
/// # Errors
/// [`GovernanceError::Justification`] when it is shorter than 10 or longer than 2000
/// characters.
pub fn check_justification(text: &str) -> Result<&str, GovernanceError> {
    let t = text.trim();
    let n = t.chars().count();
    let (min, max) = JUSTIFICATION_CHARS;
    if n < min || n > max {
        return Err(GovernanceError::Justification { min, max });
    }
    Ok(t)
}

/// When a grant made at `now` for `secs` ends (Unix seconds).
pub fn grant_expiry(now: i64, secs: i64) -> i64 {
    now.saturating_add(secs.max(1))
}

/// The privacy officer's finding on one break-the-glass use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReviewOutcome {
    /// Justified: an emergency or a relationship the records did not show yet.
    Appropriate,
    /// Not justified: opens an incident.
    Inappropriate,
}

impl ReviewOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewOutcome::Appropriate => "appropriate",
            ReviewOutcome::Inappropriate => "inappropriate",
        }
    }
}

impl FromStr for ReviewOutcome {
    type Err = GovernanceError;
    fn from_str(s: &str) -> Result<Self, GovernanceError> {
        match s {
            "appropriate" => Ok(ReviewOutcome::Appropriate),
            "inappropriate" => Ok(ReviewOutcome::Inappropriate),
            other => Err(GovernanceError::UnknownOutcome(
                other.chars().take(40).collect(),
            )),
        }
    }
}

impl fmt::Display for ReviewOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A break-the-glass grant as review needs it (no PHI: the justification stays sealed in
/// the gate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub grantee: String,
    pub patient: String,
    pub reason: BreakGlassReason,
    pub created: i64,
    pub expires: i64,
    /// `None` while pending.
    pub outcome: Option<ReviewOutcome>,
}

/// What a review decides: the outcome, and the incident an inappropriate use opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub outcome: ReviewOutcome,
    pub incident: Option<Incident>,
}

/// Reviews one grant: the reviewer may not be the grantee (separation of duties), a grant
/// is reviewed once, and an inappropriate use needs a note and opens an incident
/// (`incident_id`, opened by the reviewer at `now`).
///
/// # Errors
/// [`GovernanceError::SelfReview`], [`GovernanceError::AlreadyReviewed`],
/// [`GovernanceError::Note`].
pub fn review(
    grant: &Grant,
    reviewer: &str,
    outcome: ReviewOutcome,
    note: &str,
    now: i64,
    incident_id: &str,
) -> Result<Review, GovernanceError> {
    if grant.grantee == reviewer {
        return Err(GovernanceError::SelfReview);
    }
    if grant.outcome.is_some() {
        return Err(GovernanceError::AlreadyReviewed);
    }
    let n = note.trim().chars().count();
    if n > NOTE_CHARS || (outcome == ReviewOutcome::Inappropriate && n == 0) {
        return Err(GovernanceError::Note(NOTE_CHARS));
    }
    let incident = (outcome == ReviewOutcome::Inappropriate).then(|| {
        let mut i = Incident::open(
            incident_id,
            IncidentSource::BreakGlassReview {
                grant: grant.id.clone(),
            },
            vec![grant.patient.clone()],
            reviewer,
            now,
        );
        i.record(
            grant.created,
            &grant.grantee,
            &format!("break-the-glass access ({})", grant.reason),
        );
        i.record(now, reviewer, "review: inappropriate");
        i
    });
    Ok(Review { outcome, incident })
}

/// Where an incident came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum IncidentSource {
    /// A break-the-glass use reviewed as inappropriate.
    BreakGlassReview { grant: String },
    /// A detection alert a privacy officer confirmed (`medvault-detect`): its id and type.
    DetectionAlert { alert: String, alert_type: String },
    /// A paper chart volume declared missing (`records`): its barcode.
    MissingChart { barcode: String },
    /// Opened by hand.
    Manual,
}

/// An incident's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentStatus {
    Open,
    Closed,
}

impl IncidentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::Open => "open",
            IncidentStatus::Closed => "closed",
        }
    }
}

/// One entry of an incident's timeline: when (Unix seconds), who, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
}

/// A privacy or security incident (the minimal record later issues extend): its source,
/// the patients affected (by id), who opened it and when, its status, and the timeline of
/// audited actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub source: IncidentSource,
    pub patients: Vec<String>,
    pub opened_by: String,
    pub opened_at: i64,
    pub status: IncidentStatus,
    pub timeline: Vec<TimelineEntry>,
    /// The response: severity, roles, playbook tasks, phases, evidence, scope, affected
    /// individuals and the breach decision (empty until someone works the incident).
    #[serde(default)]
    pub response: response::Response,
}

impl Incident {
    /// A new open incident.
    pub fn open(
        id: &str,
        source: IncidentSource,
        patients: Vec<String>,
        opened_by: &str,
        now: i64,
    ) -> Self {
        Incident {
            id: id.to_owned(),
            source,
            patients,
            opened_by: opened_by.to_owned(),
            opened_at: now,
            status: IncidentStatus::Open,
            timeline: vec![TimelineEntry {
                at: now,
                actor: opened_by.to_owned(),
                action: "incident opened".into(),
            }],
            response: response::Response {
                phases: response::Phases {
                    detected: Some(now),
                    ..response::Phases::default()
                },
                // Whoever opens it leads it until someone else is assigned, so the
                // notification tree always tells someone.
                roles: [("incident_lead".to_owned(), opened_by.to_owned())].into(),
                ..response::Response::default()
            },
        }
    }

    /// Adds an action to the timeline, kept in time order.
    pub fn record(&mut self, at: i64, actor: &str, action: &str) {
        let pos = self.timeline.partition_point(|e| e.at <= at);
        self.timeline.insert(
            pos,
            TimelineEntry {
                at,
                actor: actor.to_owned(),
                action: action.to_owned(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            id: "g1".into(),
            grantee: "dr.a".into(),
            patient: "p1".into(),
            reason: BreakGlassReason::MedicalEmergency,
            created: 100,
            expires: 100 + DEFAULT_GRANT_SECS,
            outcome: None,
        }
    }

    #[test]
    fn an_inappropriate_use_opens_an_incident_with_its_timeline() {
        let r = review(
            &grant(),
            "po",
            ReviewOutcome::Inappropriate,
            "no emergency",
            500,
            "i1",
        )
        .unwrap();
        let i = r.incident.unwrap();
        assert_eq!(i.patients, ["p1"]);
        assert_eq!(i.status, IncidentStatus::Open);
        assert_eq!(
            i.source,
            IncidentSource::BreakGlassReview { grant: "g1".into() }
        );
        let at: Vec<i64> = i.timeline.iter().map(|e| e.at).collect();
        assert_eq!(at, [100, 500, 500], "in time order");
        assert_eq!(i.timeline[0].actor, "dr.a");
        let back: Incident = serde_json::from_str(&serde_json::to_string(&i).unwrap()).unwrap();
        assert_eq!(back, i);
    }

    #[test]
    fn reviews_are_separated_single_and_explained() {
        let ok = review(&grant(), "po", ReviewOutcome::Appropriate, "", 500, "i1").unwrap();
        assert!(ok.incident.is_none());
        assert_eq!(
            review(&grant(), "dr.a", ReviewOutcome::Appropriate, "", 500, "i1"),
            Err(GovernanceError::SelfReview)
        );
        let mut done = grant();
        done.outcome = Some(ReviewOutcome::Appropriate);
        assert_eq!(
            review(&done, "po", ReviewOutcome::Inappropriate, "x", 500, "i1"),
            Err(GovernanceError::AlreadyReviewed)
        );
        assert_eq!(
            review(
                &grant(),
                "po",
                ReviewOutcome::Inappropriate,
                "  ",
                500,
                "i1"
            ),
            Err(GovernanceError::Note(NOTE_CHARS))
        );
        assert!("maybe".parse::<ReviewOutcome>().is_err());
    }

    #[test]
    fn justifications_are_sentences_and_grants_end() {
        assert!(check_justification("short").is_err());
        assert!(check_justification(&"x".repeat(2001)).is_err());
        assert_eq!(
            check_justification("  unconscious in ED, no ID  ").unwrap(),
            "unconscious in ED, no ID"
        );
        assert_eq!(grant_expiry(10, DEFAULT_GRANT_SECS), 10 + 28_800);
    }
}
