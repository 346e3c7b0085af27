//! medvault-types — the shared vocabulary of medvault: identifiers, data categories,
//! purposes of use, roles, actions and the clock.
//!
//! This room must never depend on another medvault crate, hold secrets, or perform I/O.
//! INVARIANT: every identifier type here is validated at construction, so a value of
//! one of these types is always safe to put in a SQL parameter, a path or an AAD.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Errors raised when a value from outside does not fit the vocabulary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypesError {
    #[error("invalid id: must be 1-64 characters of A-Z, a-z, 0-9, '-' or '.'")]
    InvalidId,
    #[error("unknown role `{0}`")]
    UnknownRole(String),
    #[error("unknown purpose of use `{0}`")]
    UnknownPurpose(String),
    #[error("invalid user name: must be 1-64 characters of a-z, 0-9, '.', '_' or '-'")]
    InvalidUsername,
    #[error("unknown value `{0}`")]
    UnknownValue(String),
}

/// Is `s` a valid FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`)?
pub fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s` as a FHIR logical id.
            pub fn new(s: &str) -> Result<Self, TypesError> {
                if is_fhir_id(s) { Ok(Self(s.to_owned())) } else { Err(TypesError::InvalidId) }
            }
            /// A fresh random id (UUID v4 form).
            pub fn random() -> Self {
                Self(random_uuid())
            }
            pub fn as_str(&self) -> &str { &self.0 }
        }
        impl TryFrom<String> for $name {
            type Error = TypesError;
            fn try_from(s: String) -> Result<Self, TypesError> { Self::new(&s) }
        }
        impl From<$name> for String { fn from(v: $name) -> String { v.0 } }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{}({})", stringify!($name), self.0) }
        }
    };
}

id_type!(
    /// A patient's logical id: the shard key every patient-scoped row carries.
    PatientId
);
id_type!(
    /// A FHIR resource's logical id.
    ResourceId
);

/// A random UUID v4 in its canonical text form.
pub fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A staff user's login name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(String);

impl Username {
    pub fn new(s: &str) -> Result<Self, TypesError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(TypesError::InvalidUsername)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Username {
    type Error = TypesError;
    fn try_from(s: String) -> Result<Self, TypesError> {
        Self::new(&s)
    }
}
impl From<Username> for String {
    fn from(v: Username) -> String {
        v.0
    }
}
impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Username({})", self.0)
    }
}

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident, $err:ident { $($var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($var),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),+ } }
        }
        impl FromStr for $name {
            type Err = TypesError;
            fn from_str(s: &str) -> Result<Self, TypesError> {
                match s { $($s => Ok($name::$var),)+ _ => Err(TypesError::$err(s.chars().take(40).collect())) }
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
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

str_enum!(
    /// Staff roles. A role grants data categories through policy, never by itself.
    /// `records_clerk` is health information management staff: the paper chart registry,
    /// retention and the destruction queue, and no clinical data by role.
    Role, UnknownRole {
        Physician => "physician",
        Nurse => "nurse",
        FrontDesk => "front_desk",
        Billing => "billing",
        SecurityAdmin => "security_admin",
        PrivacyOfficer => "privacy_officer",
        Auditor => "auditor",
        RecordsClerk => "records_clerk",
        Importer => "importer",
        System => "system",
        Service => "service",
        Patient => "patient",
    }
);

impl Role {
    /// The purpose of use assumed when a request does not declare one.
    pub fn default_purpose(self) -> Purpose {
        match self {
            Role::Physician | Role::Nurse => Purpose::Treat,
            Role::Billing => Purpose::Payment,
            Role::Patient => Purpose::PatientRequest,
            _ => Purpose::Operations,
        }
    }
    /// Roles a human account may hold (the importer is the CLI's own principal; system is
    /// the server's own background work, such as signing audit checkpoints; service is a
    /// backend client authenticated by OAuth2 client credentials, limited by its scopes).
    pub fn is_staff(self) -> bool {
        !matches!(self, Role::Importer | Role::System | Role::Service)
    }
}

str_enum!(
    /// HL7 v3 PurposeOfUse codes medvault understands.
    Purpose, UnknownPurpose {
        Treat => "TREAT",
        EmergencyTreat => "ETREAT",
        Payment => "HPAYMT",
        Operations => "HOPERAT",
        PublicHealth => "PUBHLTH",
        Research => "HRESCH",
        PatientRequest => "PATRQT",
        Legal => "HLEGAL",
        Coverage => "COVERAGE",
    }
);

str_enum!(
    /// Data categories: the unit of least privilege (law 4).
    Category, UnknownValue {
        Demographics => "demographics",
        Encounters => "encounters",
        Vitals => "vitals",
        Labs => "labs",
        Medications => "medications",
        Allergies => "allergies",
        Problems => "problems",
        Procedures => "procedures",
        Immunizations => "immunizations",
        CarePlans => "care_plans",
        Notes => "notes",
        Billing => "billing",
        Directory => "directory",
        Consents => "consents",
    }
);

str_enum!(
    /// Why a clinician breaks the glass (the reason codes of the emergency-access request).
    BreakGlassReason, UnknownValue {
        MedicalEmergency => "medical-emergency",
        UnableToConsent => "patient-unable-to-consent",
        ContinuityOfCare => "continuity-of-care",
        NewRelationship => "care-relationship-not-yet-recorded",
    }
);

str_enum!(
    /// What a caller does to a record.
    Action, UnknownValue {
        Read => "read",
        Search => "search",
        Create => "create",
        Update => "update",
        Delete => "delete",
    }
);

str_enum!(
    /// What a caller does through the gate that is not an action on a chart's records:
    /// audit views, the accounting of disclosures, transparency reads, key and user
    /// administration. Each is a Cedar action of the same name (`medvault-policy`), so who
    /// may do it is written in the policy files alone.
    Operation, UnknownValue {
        AuditSearch => "audit.search",
        AccessReport => "audit.access-report",
        Disclosures => "audit.disclosures",
        RecordDisclosure => "disclosure.record",
        AuditEntries => "audit.entries",
        AuditExport => "audit.export",
        AuditVerify => "audit.verify",
        SignCheckpoint => "audit.checkpoint",
        SignScheduledCheckpoint => "audit.sign",
        ReadCheckpoint => "audit.checkpoint.read",
        Cosign => "audit.cosign",
        Proof => "audit.proof",
        Tile => "audit.tile",
        VerifierKey => "audit.key",
        EvictKey => "keys.evict",
        Status => "status",
        CreateUser => "user.create",
        Reindex => "index.rebuild",
        ListUsers => "user.list",
        DisableUser => "user.disable",
        EnableUser => "user.enable",
        UnlockUser => "user.unlock",
        ResetMfa => "user.mfa-reset",
        ChangeRole => "user.role",
        DisableDormant => "user.disable-dormant",
        CreateClient => "client.create",
        ListClients => "client.list",
        RevokeClient => "client.revoke",
        BreakGlass => "break-glass",
        BreakGlassReviews => "break-glass.reviews",
        BreakGlassReview => "break-glass.review",
        SetTraining => "user.training",
        Incidents => "incident.list",
        ReadPolicies => "policy.read",
        ProposePolicy => "policy.propose",
        ApprovePolicy => "policy.approve",
        LinkPortal => "portal.link",
        DestructionRequest => "destruction.request",
        DestructionApprove => "destruction.approve",
        DestructionCancel => "destruction.cancel",
        DestructionRead => "destruction.read",
        LegalHoldSet => "legal-hold.set",
        LegalHoldRelease => "legal-hold.release",
        LegalHoldRead => "legal-hold.read",
        KeysStatus => "keys.status",
        KeysRotate => "keys.rotate",
        Backup => "backup",
        BackupRun => "backup.run",
        BackupRead => "backup.read",
        StaffImport => "staff.import",
        StaffEdit => "staff.edit",
        StaffRead => "staff.read",
        Alerts => "detect.alerts",
        AlertTriage => "detect.triage",
        Suppress => "detect.suppress",
        DetectRun => "detect.run",
        RecordsRead => "records.read",
        RecordsManage => "records.manage",
        RecordsCustody => "records.custody",
        RetentionRead => "retention.read",
        RetentionPropose => "retention.propose",
        RetentionApprove => "retention.approve",
        PrivacyRequests => "privacy.requests",
        IncidentManage => "incident.manage",
        TrainingManage => "training.manage",
        TrainingRead => "training.read",
        TrainingComplete => "training.complete",
        ComplianceRead => "compliance.read",
        ComplianceManage => "compliance.manage",
        BulkExport => "export.bulk",
    }
);

impl Operation {
    /// Whether this changes what the store holds about charts (their records, keys, holds,
    /// destruction, portal access): refused by a server in emergency read-only mode.
    pub fn changes_charts(self) -> bool {
        use Operation::*;
        matches!(
            self,
            DestructionRequest
                | DestructionApprove
                | DestructionCancel
                | LegalHoldSet
                | LegalHoldRelease
                | RecordsManage
                | RecordsCustody
                | KeysRotate
                | LinkPortal
        )
    }

    /// Whether a signed-in caller needs a second factor within the step-up window to do
    /// this (SPEC "Identity": user, role, policy and key changes).
    pub fn needs_step_up(self) -> bool {
        use Operation::*;
        matches!(
            self,
            CreateUser
                | DisableUser
                | EnableUser
                | UnlockUser
                | ResetMfa
                | ChangeRole
                | CreateClient
                | RevokeClient
                | BreakGlass
                | SetTraining
                | ProposePolicy
                | ApprovePolicy
                | LinkPortal
                | DestructionRequest
                | DestructionApprove
                | DestructionCancel
                | LegalHoldSet
                | LegalHoldRelease
                | RetentionPropose
                | RetentionApprove
                | BackupRun
        )
    }
}

/// The source of "now". Production wires the system clock in the binary; tests use
/// [`ManualClock`]. INVARIANT: nothing in the library crates reads the wall clock.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// A clock that only moves when told to.
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self(Mutex::new(start))
    }
    pub fn advance(&self, d: time::Duration) {
        if let Ok(mut t) = self.0.lock() {
            *t += d;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        self.0
            .lock()
            .map(|t| *t)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// FHIR `instant` text for `t` (UTC, millisecond precision).
pub fn fhir_instant(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_traversal_and_junk() {
        assert!(PatientId::new("abc-123.x").is_ok());
        for bad in ["", "..", ".", "a/b", "../etc", "a b", "é", &"x".repeat(65)] {
            assert_eq!(PatientId::new(bad), Err(TypesError::InvalidId), "{bad}");
        }
        assert!(is_fhir_id(&random_uuid()));
    }

    #[test]
    fn enums_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
        }
        assert!("root".parse::<Role>().is_err());
        assert_eq!("TREAT".parse::<Purpose>().unwrap(), Purpose::Treat);
        assert_eq!(Role::Billing.default_purpose(), Purpose::Payment);
    }

    #[test]
    fn instant_format() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(fhir_instant(t), "2023-11-14T22:13:20.000Z");
    }
}
