//! Destruction of a patient's chart (45 CFR 164.310(d)(2)(i) disposal; NIST SP 800-88
//! Rev. 1 "Purge" by cryptographic erase): why a chart may be destroyed, and the
//! certificate of destruction that proves it was — a C2SP signed-note body the gate signs
//! with its own destruction key (never the audit checkpoint key), so anyone holding the
//! verifier key can check it offline.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The method every electronic destruction uses, as the certificate states it.
pub const CRYPTO_SHRED: &str = "crypto-shred: the chart's AES-256-GCM data keys deleted, then its rows removed (NIST SP 800-88 Rev. 1 Purge, cryptographic erase)";

/// The first line of every certificate (the note's "origin").
pub const CERTIFICATE_HEADER: &str = "medvault certificate of destruction v1";

/// Why a chart is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestructionReason {
    /// The retention period ended (state law, 45 CFR 164.316(b)(2) for documentation).
    RetentionPeriodEnded,
    /// The data subject asked for erasure (GDPR Art. 17) and no exception applies.
    ErasureRequest,
    /// A duplicate or wrongly created chart (merged elsewhere).
    DuplicateRecord,
    /// A court or regulator ordered it.
    CourtOrder,
}

impl DestructionReason {
    /// Every reason, in the order forms list them.
    pub const ALL: [DestructionReason; 4] = [
        DestructionReason::RetentionPeriodEnded,
        DestructionReason::ErasureRequest,
        DestructionReason::DuplicateRecord,
        DestructionReason::CourtOrder,
    ];

    /// The code, as stored and as the API takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            DestructionReason::RetentionPeriodEnded => "retention-period-ended",
            DestructionReason::ErasureRequest => "erasure-request",
            DestructionReason::DuplicateRecord => "duplicate-record",
            DestructionReason::CourtOrder => "court-order",
        }
    }

    /// A label for people.
    pub fn label(self) -> &'static str {
        match self {
            DestructionReason::RetentionPeriodEnded => "Retention period ended",
            DestructionReason::ErasureRequest => "Erasure requested by the patient (GDPR Art. 17)",
            DestructionReason::DuplicateRecord => "Duplicate or wrongly created chart",
            DestructionReason::CourtOrder => "Court or regulator order",
        }
    }
}

/// An unknown destruction reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown destruction reason `{0}`: use retention-period-ended, erasure-request, duplicate-record or court-order")]
pub struct UnknownReason(pub String);

impl FromStr for DestructionReason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, UnknownReason> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.chars().take(40).collect()))
    }
}

impl fmt::Display for DestructionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The checkpoint of the audit log that includes the entry recording a destruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// The log's origin line.
    pub origin: String,
    /// Tree size (entries) of the checkpoint.
    pub size: u64,
    /// Root hash, standard base64.
    pub root: String,
}

/// A certificate of destruction: what was destroyed, when, how, on whose request and whose
/// approval, where the audit log records it, and when the last backup taken before it
/// expires (until then a copy of the ciphertext exists, unreadable without the shredded key,
/// and any restore of it replays the shred ledger). No PHI: ids, names, codes and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub id: String,
    pub patient: String,
    pub reason: DestructionReason,
    pub method: String,
    /// `TYPE=RESOURCES/VERSIONS` pairs, by type.
    pub records: String,
    pub requested_by: String,
    /// FHIR instant.
    pub requested_at: String,
    pub approved_by: String,
    /// FHIR instant; also when the keys were shredded (same transaction).
    pub destroyed_at: String,
    /// Index of the audit entry recording the destruction.
    pub audit_entry: u64,
    pub checkpoint: CheckpointRef,
    /// The newest backup taken before the destruction and when it expires (FHIR instant),
    /// or `None` when none was taken.
    pub last_backup_before: Option<(String, String)>,
}

/// A certificate body that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a medvault certificate of destruction: {0}")]
pub struct BadCertificate(pub &'static str);

impl Certificate {
    /// The note body (C2SP signed-note text: lines ending in newlines, no blank line).
    pub fn to_text(&self) -> String {
        let backup = match &self.last_backup_before {
            Some((id, expires)) => format!("{id} expires {expires}"),
            None => "none taken before the destruction".to_owned(),
        };
        format!(
            "{CERTIFICATE_HEADER}\nid {}\npatient {}\nreason {}\nmethod {}\nrecords {}\nrequested {} by {}\napproved {} by {}\ndestroyed {}\naudit-entry {}\naudit-checkpoint {} {} {}\nlast-backup-before {}\n",
            self.id,
            self.patient,
            self.reason,
            self.method,
            if self.records.is_empty() { "none" } else { &self.records },
            self.requested_at,
            self.requested_by,
            self.destroyed_at,
            self.approved_by,
            self.destroyed_at,
            self.audit_entry,
            self.checkpoint.origin,
            self.checkpoint.size,
            self.checkpoint.root,
            backup,
        )
    }

    /// Reads a certificate body back (after its signature was verified).
    ///
    /// # Errors
    /// [`BadCertificate`] naming the first line that is missing or malformed.
    pub fn parse(text: &str) -> Result<Self, BadCertificate> {
        let mut lines = text.lines();
        if lines.next() != Some(CERTIFICATE_HEADER) {
            return Err(BadCertificate("header"));
        }
        let mut field = |name: &'static str| -> Result<String, BadCertificate> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or(BadCertificate(name))
        };
        let id = field("id")?;
        let patient = field("patient")?;
        let reason = field("reason")?
            .parse()
            .map_err(|_| BadCertificate("reason"))?;
        let method = field("method")?;
        let records = field("records")?;
        let requested = field("requested")?;
        let approved = field("approved")?;
        let destroyed_at = field("destroyed")?;
        let audit_entry = field("audit-entry")?
            .parse()
            .map_err(|_| BadCertificate("audit-entry"))?;
        let cp = field("audit-checkpoint")?;
        let backup = field("last-backup-before")?;
        let (requested_at, requested_by) = requested
            .split_once(" by ")
            .ok_or(BadCertificate("requested"))?;
        let (_, approved_by) = approved
            .split_once(" by ")
            .ok_or(BadCertificate("approved"))?;
        let mut cp = cp.split(' ');
        let (Some(origin), Some(size), Some(root), None) =
            (cp.next(), cp.next(), cp.next(), cp.next())
        else {
            return Err(BadCertificate("audit-checkpoint"));
        };
        let last_backup_before = backup
            .split_once(" expires ")
            .map(|(id, exp)| (id.to_owned(), exp.to_owned()));
        Ok(Certificate {
            id,
            patient,
            reason,
            method,
            records: if records == "none" {
                String::new()
            } else {
                records
            },
            requested_by: requested_by.to_owned(),
            requested_at: requested_at.to_owned(),
            approved_by: approved_by.to_owned(),
            destroyed_at,
            audit_entry,
            checkpoint: CheckpointRef {
                origin: origin.to_owned(),
                size: size
                    .parse()
                    .map_err(|_| BadCertificate("audit-checkpoint"))?,
                root: root.to_owned(),
            },
            last_backup_before,
        })
    }
}

/// Whether `approver` may approve a destruction `requester` asked for: never the same
/// person (two-person rule).
pub fn second_person(requester: &str, approver: &str) -> bool {
    requester != approver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_round_trips_through_its_text() {
        let c = Certificate {
            id: "d1".into(),
            patient: "p-9".into(),
            reason: DestructionReason::ErasureRequest,
            method: CRYPTO_SHRED.into(),
            records: "Observation=3/4 Patient=1/2".into(),
            requested_by: "alice".into(),
            requested_at: "2026-11-30T06:00:00.000Z".into(),
            approved_by: "bob".into(),
            destroyed_at: "2026-11-30T06:05:00.000Z".into(),
            audit_entry: 41,
            checkpoint: CheckpointRef {
                origin: "medvault.local/audit/x".into(),
                size: 42,
                root: "AAAA".into(),
            },
            last_backup_before: None,
        };
        let t = c.to_text();
        assert!(t.ends_with('\n') && !t.contains("\n\n"), "a note body");
        assert_eq!(Certificate::parse(&t).unwrap(), c);
        let with_backup = Certificate {
            last_backup_before: Some(("b-7".into(), "2027-11-30T06:00:00.000Z".into())),
            ..c
        };
        assert_eq!(
            Certificate::parse(&with_backup.to_text()).unwrap(),
            with_backup
        );
        assert_eq!(
            Certificate::parse(&t.replace("reason erasure-request", "reason whim")),
            Err(BadCertificate("reason"))
        );
        assert!(Certificate::parse("hello\n").is_err());
    }

    #[test]
    fn reasons_parse_and_two_people_are_needed() {
        for r in DestructionReason::ALL {
            assert_eq!(r.as_str().parse::<DestructionReason>().unwrap(), r);
        }
        assert!("because".parse::<DestructionReason>().is_err());
        assert!(!second_person("alice", "alice"));
        assert!(second_person("alice", "bob"));
    }
}
