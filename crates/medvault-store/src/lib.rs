//! medvault-store — the backend-neutral [`Store`] trait, its SQLite (WAL, embedded default)
//! and PostgreSQL (several servers over one database) backends, the conformance suite every
//! backend must pass, and a failure-injecting wrapper.
//!
//! This room stores bytes it cannot read: record bodies arrive sealed, search values
//! arrive as blind-index tokens, secrets arrive wrapped. It must never decrypt, never
//! log row contents, and never expose a way to overwrite a stored version in place.
//! INVARIANT: every patient-scoped row carries the patient id (the shard key).
//! INVARIANT: a [`WriteBatch`] is all-or-nothing, including its audit entries, and audit
//! sequence numbers are dense: a batch that fails leaves no gap.
#![forbid(unsafe_code)]

pub mod conformance;
pub mod direct;
pub mod dump;
pub mod faulty;
mod postgres;
mod sql;
mod sqlite;
mod writer;

pub use dump::{DumpStats, Value as DumpValue, IMAGE_TAG as PAGE_IMAGE_TAG};
pub use postgres::{with_database, PgStore};
pub use sqlite::SqliteStore;

use medvault_types::PatientId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict")]
    Conflict,
    #[error("already exists")]
    Exists,
    #[error("not found")]
    NotFound,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Backend(String),
    #[error("injected failure: {0}")]
    Injected(&'static str),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// One version of a resource to be stored (the write shape). `body` is ciphertext on the
/// secure path. What comes back from a read is a [`Sealed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub patient: Option<PatientId>,
    pub rtype: String,
    pub id: String,
    pub version: u64,
    /// FHIR instant; not PHI (server time of the write).
    pub last_updated: String,
    pub deleted: bool,
    pub category: String,
    pub key_version: u32,
    pub body: Vec<u8>,
}

/// One stored version as read back from a backend: sealed (the body is ciphertext on the
/// secure path) and read-only. Its fields are private and it is made only by a backend's
/// row mapping, so holding one means "this came out of storage" — the first state of the
/// gate's typestate (`Sealed → Permitted<Sealed> → Disclosed` in `medvault-core`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed(VersionRow);

impl Sealed {
    /// Made by the backends' row mappers only.
    pub(crate) fn from_storage(row: VersionRow) -> Self {
        Sealed(row)
    }
    /// The chart (data-key owner) the version belongs to; `None` for directory resources.
    pub fn patient(&self) -> Option<&PatientId> {
        self.0.patient.as_ref()
    }
    /// FHIR resource type name.
    pub fn rtype(&self) -> &str {
        &self.0.rtype
    }
    /// FHIR logical id.
    pub fn id(&self) -> &str {
        &self.0.id
    }
    /// Version number (FHIR `meta.versionId`), from 1.
    pub fn version(&self) -> u64 {
        self.0.version
    }
    /// FHIR instant of the write (server time; not PHI).
    pub fn last_updated(&self) -> &str {
        &self.0.last_updated
    }
    /// Whether this version records a deletion (empty body).
    pub fn deleted(&self) -> bool {
        self.0.deleted
    }
    /// The data category as stored (parsed, and denied if unknown, by the gate).
    pub fn category(&self) -> &str {
        &self.0.category
    }
    /// Version of the patient's data key the body is sealed under.
    pub fn key_version(&self) -> u32 {
        self.0.key_version
    }
    /// The stored bytes: AES-256-GCM ciphertext on the secure path.
    pub fn ciphertext(&self) -> &[u8] {
        &self.0.body
    }
}

impl From<Sealed> for VersionRow {
    fn from(s: Sealed) -> Self {
        s.0
    }
}

/// A blind-index token for one search parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub param: String,
    pub token: Vec<u8>,
}

/// What the current version must be for a write to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist (create).
    Absent,
    /// The current version must be exactly this one and not deleted.
    Version(u64),
    /// The resource must exist and not be deleted; any version.
    Live,
}

#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    pub username: String,
    pub role: String,
    pub password_hash: String,
    pub totp_secret_wrapped: Vec<u8>,
    pub totp_last_step: i64,
    pub disabled: bool,
    pub created: String,
    pub practitioner_id: Option<String>,
    /// When the user last completed a sign-in (Unix seconds; 0 = never): what dormant
    /// accounts are judged by.
    pub last_login: i64,
    /// Whether the user's required security training is current; when false, PHI access
    /// is denied except under break-the-glass.
    pub training_current: bool,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// SHA-256 of the opaque token; the token itself is never stored.
    pub token_hash: Vec<u8>,
    pub kind: String,
    pub username: String,
    pub created: i64,
    pub last_seen: i64,
    pub expires: i64,
    /// Wrong second-factor attempts made against this challenge (`kind = "mfa"`).
    pub attempts: i64,
    /// When a second factor was last verified in this session (Unix seconds; 0 = never):
    /// what step-up is judged by.
    pub mfa_at: i64,
    /// The network address the session was started from.
    pub source: String,
    /// How the session was established (e.g. `password+totp`, `passkey`, `oidc:NAME`).
    pub method: String,
    /// A service client's granted SMART scopes, space-separated; empty for people.
    pub scope: String,
}

/// A failure counter of the login throttle, under an opaque key (a MAC of the account
/// name, the source address, or both): failures counted since `window_start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleRow {
    pub key: Vec<u8>,
    pub failures: i64,
    pub window_start: i64,
    pub last_failure: i64,
}

/// A credential of a user other than the password and TOTP seed: a WebAuthn passkey,
/// a recovery code, a service client's secret or key. `(kind, id)` is unique.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub kind: String,
    /// The credential's identifier (a WebAuthn credential id, a MAC of a recovery code, a
    /// client id).
    pub id: Vec<u8>,
    pub username: String,
    /// A name the owner chose ("office fingerprint reader").
    pub name: String,
    /// Kind-specific data, sealed where it is secret.
    pub data: Vec<u8>,
    pub created: i64,
    pub last_used: i64,
}

impl std::fmt::Debug for CredentialRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRow")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SessionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRow")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A break-the-glass grant (emergency access to one chart without a treatment
/// relationship): who, which patient, why, until when, and its review.
#[derive(Clone, PartialEq, Eq)]
pub struct BreakGlassRow {
    pub id: String,
    pub username: String,
    pub patient: PatientId,
    /// The reason code (`medvault_types::BreakGlassReason`).
    pub reason: String,
    /// The free-text justification, sealed under the patient's data key (it may hold PHI).
    pub justification: Vec<u8>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; the grant allows nothing from this instant on.
    pub expires: i64,
    /// The review: `""` while pending, else `appropriate` or `inappropriate`.
    pub outcome: String,
    pub reviewed_by: String,
    pub reviewed_at: i64,
    /// The reviewer's note, sealed under the patient's data key; empty while pending.
    pub note: Vec<u8>,
    /// The incident an inappropriate use opened; empty otherwise.
    pub incident: String,
}

impl std::fmt::Debug for BreakGlassRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakGlassRow")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// A privacy or security incident: the record `medvault-governance` decides about, stored
/// as its JSON document (no PHI: patient ids, user names, audit references).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentRow {
    pub id: String,
    /// Unix seconds.
    pub opened_at: i64,
    pub status: String,
    pub body: String,
}

/// One record kept for a privacy or security officer's program (detection alerts,
/// suppressions, staff profiles; later rooms' registers), by `kind` and `id`: when it was
/// last changed (`at`, Unix seconds), its `status`, whom it is about (`subject`: a user
/// name, or empty), and its `body` — JSON, sealed by the gate when it may hold PHI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GovernanceRow {
    pub kind: String,
    pub id: String,
    pub at: i64,
    pub status: String,
    pub subject: String,
    pub body: Vec<u8>,
}

/// A version of the access policy set (Cedar text): proposed by one security
/// administrator, in force once a different one approves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    pub version: i64,
    pub text: String,
    pub proposed_by: String,
    /// Unix seconds.
    pub proposed_at: i64,
    /// `proposed`, `active` or `superseded`.
    pub status: String,
    /// Empty until approved.
    pub approved_by: String,
    pub approved_at: i64,
}

/// How a caller reaches a chart: through a treatment relationship (a care team or an
/// encounter) or a live break-the-glass grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reach {
    Care,
    BreakGlass,
    /// A break-the-glass grant for a medical emergency (what consent denies and most
    /// sensitivity labels yield to).
    Emergency,
    /// A patient portal account linked to its own chart.
    Own,
    /// A portal account linked as a proxy (guardian, caregiver).
    Proxy,
}

/// A patient portal account's link to a chart, made after identity proofing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalLinkRow {
    pub username: String,
    pub patient: PatientId,
    /// `self`, `guardian` or `caregiver`.
    pub kind: String,
    /// The identity-proofing evidence the front desk saw.
    pub evidence: String,
    pub linked_by: String,
    /// Unix seconds.
    pub linked_at: i64,
}

/// A legal hold on a patient's records (litigation, investigation, a regulator's audit):
/// while active (`released_at == 0`) it blocks the chart's destruction, in the same
/// transaction as the destruction itself.
#[derive(Clone, PartialEq, Eq)]
pub struct LegalHoldRow {
    pub id: String,
    pub patient: PatientId,
    /// The matter reference (a case or docket number; no PHI).
    pub matter: String,
    /// Why, sealed under the patient's data key (free text may name the patient).
    pub reason: Vec<u8>,
    pub set_by: String,
    /// Unix seconds.
    pub set_at: i64,
    /// Empty while the hold is active.
    pub released_by: String,
    /// Unix seconds; 0 while the hold is active.
    pub released_at: i64,
}

impl std::fmt::Debug for LegalHoldRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegalHoldRow")
            .field("id", &self.id)
            .field("matter", &self.matter)
            .finish_non_exhaustive()
    }
}

/// A request to destroy a patient's chart (crypto-shredding): made by one privacy officer,
/// carried out when a second approves it. No PHI: ids, names, codes and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestructionRow {
    pub id: String,
    pub patient: PatientId,
    /// The reason code (`medvault_governance::DestructionReason`).
    pub reason: String,
    /// `requested`, `completed` or `cancelled`.
    pub status: String,
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// Empty until approved (or who cancelled it).
    pub approved_by: String,
    pub approved_at: i64,
    /// What was destroyed: `TYPE=RESOURCES/VERSIONS` pairs, space-separated, by type.
    pub records: String,
    /// The audit log index of the entry recording the destruction; -1 until known.
    pub audit_seq: i64,
    /// The size of the first signed checkpoint covering that entry; 0 until signed.
    pub checkpoint: i64,
}

/// A patient's data key as stored: wrapped (AES-256-GCM) by one version of the master key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub key_version: u32,
    pub master_version: u32,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("key_version", &self.key_version)
            .field("master_version", &self.master_version)
            .finish_non_exhaustive()
    }
}

/// One audit log entry: its dense sequence number is assigned by the store at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: u64,
    pub leaf_hash: Vec<u8>,
    pub record: Vec<u8>,
}

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone)]
pub enum Op {
    /// Appends a version, moves the current pointer, and replaces the search tokens.
    PutVersion {
        row: VersionRow,
        expect: Expect,
        index: Vec<IndexRow>,
    },
    /// Inserts a wrapped data key; fails with `Exists` if that version exists.
    PutPatientKey {
        patient: PatientId,
        key_version: u32,
        /// The master key version that wrapped it.
        master_version: u32,
        wrapped: Vec<u8>,
    },
    /// Replaces a data key's wrapping (master key rotation: the data key itself, and the
    /// records under it, are unchanged); `Conflict` unless it is still wrapped by `from`.
    RewrapPatientKey {
        patient: PatientId,
        key_version: u32,
        from: u32,
        to: u32,
        wrapped: Vec<u8>,
    },
    /// Inserts a metadata value once; fails with `Exists` if present.
    PutMetaOnce {
        key: String,
        value: Vec<u8>,
    },
    /// Inserts or replaces a user.
    PutUser(UserRow),
    /// Inserts a user; fails with `Exists` if the name is taken.
    CreateUser(UserRow),
    /// Records a used TOTP step; fails with `Conflict` unless `step` is newer than the last used.
    UseTotpStep {
        username: String,
        step: i64,
    },
    /// Counts one failed sign-in under `key` (owned by `subject`, so an unlock can clear
    /// every counter of one account): a count whose window began `window_secs` or more
    /// before `at` starts again at 1. The increment is atomic, so servers sharing a store
    /// count together.
    CountFailure {
        key: Vec<u8>,
        subject: Vec<u8>,
        at: i64,
        window_secs: i64,
    },
    /// Forgets the failure counter under `key`.
    ClearFailures {
        key: Vec<u8>,
    },
    /// Forgets every failure counter owned by `subject`.
    ClearSubjectFailures {
        subject: Vec<u8>,
    },
    PutSession(SessionRow),
    DeleteSession {
        token_hash: Vec<u8>,
    },
    /// Counts a wrong answer to a second-factor challenge; the challenge is deleted once
    /// `max_attempts` have been made.
    FailChallenge {
        token_hash: Vec<u8>,
        max_attempts: i64,
    },
    /// Uses up a second-factor challenge: `Conflict` unless it exists, is an `mfa`
    /// challenge and has had fewer than `max_attempts` wrong answers (so a right answer
    /// racing wrong ones cannot outlive the limit).
    ConsumeChallenge {
        token_hash: Vec<u8>,
        max_attempts: i64,
    },
    /// Ends every session and challenge of a user.
    RevokeSessions {
        username: String,
    },
    /// Records that a second factor was verified in this session at `at`.
    StepUp {
        token_hash: Vec<u8>,
        at: i64,
    },
    /// Inserts a credential; `Exists` if `(kind, id)` is taken.
    PutCredential(CredentialRow),
    /// Marks a credential used at `at` and replaces its data (a passkey's signature
    /// counter); `Conflict` if it is gone (revoked meanwhile).
    UseCredential {
        kind: String,
        id: Vec<u8>,
        data: Vec<u8>,
        at: i64,
    },
    /// Deletes one credential of `username`; `Conflict` if it does not exist (a one-time
    /// recovery code used twice, a passkey revoked twice).
    DeleteCredential {
        kind: String,
        id: Vec<u8>,
        username: String,
    },
    /// Sets whether a user's required training is current.
    SetTraining {
        username: String,
        current: bool,
    },
    /// Records a break-the-glass grant.
    PutBreakGlass(BreakGlassRow),
    /// Records the review of a grant; `Conflict` if it does not exist or was reviewed.
    ReviewBreakGlass {
        id: String,
        outcome: String,
        reviewed_by: String,
        reviewed_at: i64,
        note: Vec<u8>,
        incident: String,
    },
    /// Creates or replaces an incident.
    PutIncident(IncidentRow),
    /// Creates or replaces a governance record.
    PutGovernance(GovernanceRow),
    /// Deletes a governance record; nothing if absent.
    DeleteGovernance {
        kind: String,
        id: String,
    },
    /// Links a portal account to a chart; `Exists` if that link exists.
    PutPortalLink(PortalLinkRow),
    /// Removes a portal link; `Conflict` if there is none.
    DeletePortalLink {
        username: String,
        patient: PatientId,
    },
    /// Records a proposed policy version; `Exists` if that version exists.
    ProposePolicy(PolicyRow),
    /// Puts a proposed version in force (the one in force is superseded); `Conflict` unless
    /// it is proposed and `approved_by` is not its proposer.
    ApprovePolicy {
        version: i64,
        approved_by: String,
        approved_at: i64,
    },
    /// Deletes every credential of one kind of a user.
    DeleteCredentials {
        username: String,
        kind: String,
    },
    /// Records a completed sign-in.
    RecordLogin {
        username: String,
        at: i64,
    },
    /// Replaces a password hash (a new password, or a re-hash under stronger parameters).
    SetPasswordHash {
        username: String,
        hash: String,
    },
    /// Replaces a user's sealed TOTP seed and forgets the last used step (MFA reset).
    SetTotpSecret {
        username: String,
        wrapped: Vec<u8>,
    },
    /// Disables or enables an account; `Conflict` if there is no such user.
    SetDisabled {
        username: String,
        disabled: bool,
    },
    TouchSession {
        token_hash: Vec<u8>,
        last_seen: i64,
    },
    /// Stores a signed checkpoint of the audit log (ignored if one of that size exists).
    PutCheckpoint {
        size: u64,
        note: String,
    },
    /// Inserts or replaces a metadata value (settings whose changes are audited).
    PutMeta {
        key: String,
        value: Vec<u8>,
    },
    /// Deletes a metadata value (a retired service key); nothing if absent.
    DeleteMeta {
        key: String,
    },
    /// A precondition, checked in the batch's own transaction: the metadata value `key`
    /// (text, comma-separated; absent reads as `absent`) must list `member`. Otherwise the
    /// whole batch fails with [`StoreError::Unavailable`] and nothing is written — a writer
    /// whose view of a setting is out of date (the blind-index key generations a write must
    /// cover, during their rotation) retries with a fresh view.
    RequireMetaListed {
        key: String,
        member: String,
        absent: String,
    },
    /// Appends a witness cosignature line to a stored checkpoint (once).
    AddCosignature {
        size: u64,
        line: String,
    },
    /// Stores a Merkle hash tile (C2SP tlog-tiles: `level`, `index`, concatenated 32-byte
    /// hashes) at a new width. A tile only grows: a narrower copy of the stored one is
    /// ignored (another server got there first); one that disagrees with it is `Conflict`.
    PutTile {
        level: u32,
        index: u64,
        hashes: Vec<u8>,
    },
    /// Places a legal hold; `Exists` if that id exists.
    PutLegalHold(LegalHoldRow),
    /// Releases an active hold; `Conflict` if there is no active hold of that id.
    ReleaseLegalHold {
        id: String,
        released_by: String,
        released_at: i64,
    },
    /// Records a destruction request; `Conflict` while the patient is under an active legal
    /// hold or already has a pending request.
    RequestDestruction(DestructionRow),
    /// Marks a pending request completed by `approved_by` with what it destroyed;
    /// `Conflict` unless it is pending, its requester is not `approved_by`, and the patient
    /// is under no active legal hold (checked in the same transaction as the shredding).
    CompleteDestruction {
        id: String,
        approved_by: String,
        approved_at: i64,
        records: String,
    },
    /// Cancels a pending request; `Conflict` unless it is pending.
    CancelDestruction {
        id: String,
        cancelled_by: String,
        at: i64,
    },
    /// Records where a completed destruction sits in the audit log.
    SetDestructionEvidence {
        id: String,
        audit_seq: i64,
        checkpoint: i64,
    },
    /// Crypto-shreds a chart: deletes every wrapped data key of `patient` (the records'
    /// ciphertext can never be opened again), its break-the-glass grants and portal links —
    /// a few rows whatever the chart's size, so a shred takes constant time. Idempotent.
    /// The records themselves (current pointers, stored versions, search tokens) stay as
    /// ciphertext nobody can open, which reads skip, until [`Op::RemoveShredded`].
    ShredPatient {
        patient: PatientId,
    },
    /// Replaces a stored version's ciphertext and data-key version (a patient's data key
    /// rotation re-encrypting the chart; nothing else changes): the row is deleted and
    /// inserted again in the same transaction. `Conflict` if the version does not exist.
    ReencryptVersion(VersionRow),
    /// Removes a shredded chart's remaining rows: its current pointers, stored versions
    /// (ciphertext nobody can open) and search tokens. Idempotent.
    RemoveShredded {
        patient: PatientId,
    },
    /// Replaces the search tokens of a resource's current version (re-indexing after the
    /// normalization of the blind index changed); no new version. `NotFound` if absent.
    ReplaceIndex {
        rtype: String,
        id: String,
        version: u64,
        index: Vec<IndexRow>,
    },
}

/// Whether a hash tile should be written over the stored copy: yes if there is none or it
/// extends it; no if it is a prefix of it (another server got further); `Conflict` if the
/// two disagree (a tile only grows). One rule for every backend.
pub(crate) fn tile_grows(stored: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
    match stored {
        None => Ok(true),
        Some(old) if new.len() > old.len() && new.starts_with(old) => Ok(true),
        Some(old) if old.starts_with(new) => Ok(false),
        Some(_) => Err(StoreError::Conflict),
    }
}

/// Whether a comma-separated metadata value (or `absent` when there is none) lists
/// `member`: the rule of [`Op::RequireMetaListed`], one for every backend.
pub(crate) fn meta_lists(
    value: Option<&[u8]>,
    absent: &str,
    member: &str,
) -> Result<(), StoreError> {
    let text = value.map_or(absent, |v| std::str::from_utf8(v).unwrap_or(""));
    if text.split(',').any(|m| m.trim() == member) {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "{member} is not among the accepted values ({text}); retry"
        )))
    }
}

/// Changes and audit records committed atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
    /// Audit entries (leaf hash, canonical record) appended in the same transaction.
    pub audit: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The result of a commit: the audit sequence numbers assigned, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub audit_seqs: Vec<u64>,
}

/// An interval of `_lastUpdated` instants, `from <= t < to` (either side open), or every
/// instant outside it (`outside`, for the FHIR `ne` prefix). Bounds are FHIR instants in
/// UTC with milliseconds (`YYYY-MM-DDThh:mm:ss.sssZ`), the form every version is stored
/// in, so text order is time order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub from: Option<String>,
    pub to: Option<String>,
    pub outside: bool,
}

/// The order of a search's matches; every order ends with `(rtype, id)` so it is total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// By type, then logical id.
    #[default]
    Id,
    /// Oldest `_lastUpdated` first.
    LastUpdated,
    /// Newest `_lastUpdated` first.
    LastUpdatedDesc,
}

/// A search over current, non-deleted versions.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// `None` searches every type (used by `$everything`, which always sets `patient`).
    pub rtype: Option<String>,
    /// Only these types (empty = no restriction; AND with `rtype`).
    pub types: Vec<String>,
    pub patient: Option<PatientId>,
    /// Only resources in one of these charts (empty = no restriction; AND with `patient`).
    pub patients: Vec<PatientId>,
    /// Only these logical ids (empty = no restriction).
    pub ids: Vec<String>,
    /// AND over parameters, OR over each parameter's tokens.
    pub tokens: Vec<(String, Vec<Vec<u8>>)>,
    /// AND over ranges.
    pub last_updated: Vec<TimeRange>,
    /// Only these categories (empty = any, unless `scopes` is set).
    pub categories: Vec<String>,
    /// Privacy rules from security labels and patient-privacy consents, applied in the query
    /// (see [`Privacy`]); `None` applies none.
    pub privacy: Option<Privacy>,
    /// Categories visible only within some charts: with scopes, a resource matches when
    /// its category is in `categories`, or in a scope's categories and its chart in that
    /// scope's [`Charts`] (treatment relationships, break-the-glass grants). Nothing else.
    pub scopes: Vec<(Vec<String>, Charts)>,
    /// Only resources created by a batch whose first audit sequence number is below this:
    /// the store as it was when the audit log had this many entries (a search's snapshot).
    pub created_before: Option<u64>,
    pub order: Order,
    /// Only matches after this key in `order` (keyset paging): `[rtype, id]` for
    /// [`Order::Id`], `[last_updated, rtype, id]` for the `_lastUpdated` orders.
    pub after: Option<Vec<String>>,
    pub limit: usize,
    pub offset: usize,
}

/// What a search leaves out for one caller, from the blind privacy rows of the search index
/// (param `_label` on labelled resources; `_deny.{actor}` and `_grant.{actor}` on
/// patient-privacy Consents): a resource whose category (or everything) a Consent in its
/// chart denies to one of `deny_params`, and a resource — or a chart whose Patient — carrying
/// a label that no Consent in the chart grants to one of `grant_params`, or that one denies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Privacy {
    /// The `_deny.*` params naming the caller and everyone.
    pub deny_params: Vec<String>,
    /// The `_grant.*` params naming the caller and everyone.
    pub grant_params: Vec<String>,
    /// Each category's deny token, and the token denying everything.
    pub category_tokens: Vec<(String, Vec<u8>)>,
    pub everything_token: Vec<u8>,
    /// Charts where consents yield and, of the labels, only the listed tokens still need a
    /// grant: a chart under a medical-emergency grant, or a patient's own chart in the
    /// portal (psychotherapy notes stay listed).
    pub exempt: Option<(Charts, Vec<Vec<u8>>)>,
    /// Label tokens that restrict nobody here (the withheld-from-patient mark, for staff).
    pub ignored_labels: Vec<Vec<u8>>,
}

/// One row of the search index, as [`TxRead::chart_tokens`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexHit {
    pub rtype: String,
    pub id: String,
    pub param: String,
    pub token: Vec<u8>,
}

/// A set of charts, as a search scope names it (resolved inside the query, so a clinician
/// with thousands of patients costs no list of ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charts {
    /// Exactly these.
    Patients(Vec<PatientId>),
    /// Those with a `_care` index token among these (see [`TxRead::charts`]).
    Care(Vec<Vec<u8>>),
    /// Those a live break-the-glass grant of `username` opens at `now` (Unix seconds).
    Grants { username: String, now: i64 },
    /// Those a portal account `username` is linked to with one of `kinds`.
    Links {
        username: String,
        kinds: Vec<String>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub rows: Vec<Sealed>,
    pub more: bool,
}

/// Reads available inside an audited transaction.
pub trait TxRead {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError>;
    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError>;
    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError>;
    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError>;
    /// How many resources match `q` (ignoring its order, keyset, limit and offset), by
    /// stored category: `(category, count)`, each category once.
    fn tally(&self, q: &SearchQuery) -> Result<Vec<(String, u64)>, StoreError>;
    /// The charts a caller reaches: those with a care-relationship index token among
    /// `care_tokens` (param `_care` of CareTeam and Encounter rows), and those a
    /// break-the-glass grant of `username` opens at `now` (Unix seconds), and those the
    /// portal account `username` is linked to. A chart reached several ways is listed
    /// once: an emergency grant first, then a care relationship, then the others. With `patient`, only that chart.
    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError>;
    /// The index rows with one of `params` in `patient`'s chart (labels, consent rules).
    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError>;
    /// The audit log's length at this point of the transaction (before this read's own
    /// entries): a search's snapshot, without a second query.
    fn audit_len(&self) -> u64;
}

/// Called with `(seq, leaf hash, record)` for each audit row scanned; false stops the scan.
pub type AuditVisitor<'a> = dyn FnMut(u64, &[u8], &[u8]) -> bool + 'a;
/// An audit entry: (leaf hash, canonical record).
pub type AuditEntry = (Vec<u8>, Vec<u8>);
/// Whatever an audited read hands back to its caller.
pub type Payload = Box<dyn std::any::Any + Send>;
/// A read that returns the audit entries recording it, plus its result.
pub type AuditedRead =
    Box<dyn FnOnce(&dyn TxRead) -> Result<(Vec<AuditEntry>, Payload), StoreError> + Send>;

/// The storage contract. All methods are blocking; async callers use a blocking pool.
pub trait Store: Send + Sync + 'static {
    /// The backend's name, for status reports.
    fn backend(&self) -> &'static str;
    /// Runs `read` and appends the audit entries it returns in one transaction: the read
    /// and its audit record commit together, and the payload is handed back only after
    /// the entries are committed (fail closed).
    fn audited(&self, read: AuditedRead) -> Result<Payload, StoreError>;
    fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError>;
    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError>;
    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError>;
    /// Every version, newest first.
    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError>;
    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError>;
    /// The newest wrapped data key of a patient.
    fn patient_key(&self, patient: &PatientId) -> Result<Option<WrappedKey>, StoreError>;
    /// Up to `limit` data keys wrapped by a master key version below `master_version`, with
    /// their charts (what a rotation still has to re-wrap).
    fn keys_wrapped_below(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(PatientId, WrappedKey)>, StoreError>;
    /// How many data keys each master key version wraps: `(version, count)`, by version.
    fn master_key_census(&self) -> Result<Vec<(u32, u64)>, StoreError>;
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError>;
    fn users(&self) -> Result<Vec<UserRow>, StoreError>;
    fn session(&self, token_hash: &[u8]) -> Result<Option<SessionRow>, StoreError>;
    /// Every session and challenge of a user, newest first.
    fn sessions_of(&self, username: &str) -> Result<Vec<SessionRow>, StoreError>;
    /// The failure counters under these keys (those that exist).
    fn throttle(&self, keys: &[Vec<u8>]) -> Result<Vec<ThrottleRow>, StoreError>;
    /// One credential by kind and id.
    fn credential(&self, kind: &str, id: &[u8]) -> Result<Option<CredentialRow>, StoreError>;
    /// A user's credentials of one kind, oldest first.
    fn credentials(&self, username: &str, kind: &str) -> Result<Vec<CredentialRow>, StoreError>;
    /// [`TxRead::charts`], outside an audited read (deciding a write).
    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError>;
    /// Every break-the-glass grant, newest first.
    fn break_glass(&self) -> Result<Vec<BreakGlassRow>, StoreError>;
    /// Every incident, newest first.
    fn incidents(&self) -> Result<Vec<IncidentRow>, StoreError>;
    /// The governance records of one kind, newest change first.
    fn governance(&self, kind: &str) -> Result<Vec<GovernanceRow>, StoreError>;
    /// One governance record.
    fn governance_record(&self, kind: &str, id: &str) -> Result<Option<GovernanceRow>, StoreError>;
    /// Every policy version, newest first.
    fn policies(&self) -> Result<Vec<PolicyRow>, StoreError>;
    /// [`TxRead::chart_tokens`], outside an audited read (deciding a write).
    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError>;
    /// Legal holds, newest first: of one patient, or all.
    fn legal_holds(&self, patient: Option<&PatientId>) -> Result<Vec<LegalHoldRow>, StoreError>;
    /// Every destruction request, newest first.
    fn destructions(&self) -> Result<Vec<DestructionRow>, StoreError>;
    /// Every stored version of a chart (a data key rotation re-encrypts them).
    fn chart_versions(&self, patient: &PatientId) -> Result<Vec<Sealed>, StoreError>;
    /// Every wrapped data key of a patient, newest first.
    fn patient_keys(&self, patient: &PatientId) -> Result<Vec<WrappedKey>, StoreError>;
    /// What a chart holds, by resource type: `(type, resources, versions)`, by type.
    fn chart_census(&self, patient: &PatientId) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// A portal account's links, oldest first.
    fn portal_links(&self, username: &str) -> Result<Vec<PortalLinkRow>, StoreError>;
    fn audit_len(&self) -> Result<u64, StoreError>;
    /// Audit rows with `start <= seq < end`.
    fn audit_range(&self, start: u64, end: u64) -> Result<Vec<AuditRow>, StoreError>;
    /// Calls `f(seq, leaf_hash, record)` for audit rows with `start <= seq < end`, in
    /// order, without copying each row (for verifying very large logs); stops early when
    /// `f` returns false.
    fn audit_scan(&self, start: u64, end: u64, f: &mut AuditVisitor<'_>) -> Result<(), StoreError> {
        for r in self.audit_range(start, end)? {
            if !f(r.seq, &r.leaf_hash, &r.record) {
                break;
            }
        }
        Ok(())
    }
    /// Stored hash tiles of `level` with `start <= index < end`, at their stored width.
    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The stored hash tiles of `level` with these indexes (those that exist), by index.
    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = vec![];
        for &i in indexes {
            out.extend(self.tiles(level, i, i.saturating_add(1))?);
        }
        out.sort_by_key(|t| t.0);
        out.dedup_by_key(|t| t.0);
        Ok(out)
    }
    /// Every stored signed checkpoint, by size.
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError>;
    /// One stored checkpoint: of exactly `size` entries, or the latest when `None`.
    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, StoreError>;
    /// Writes a logical dump of every durable table, from one consistent read snapshot,
    /// while writers go on ([`dump`] describes the format). Nothing is decrypted.
    fn dump(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError>;
    /// Writes what a backup carries, from one consistent read snapshot while writers go
    /// on: by default the logical [`Store::dump`]; SQLite writes a page image of its file
    /// instead ([`dump`] describes both), which restores without re-inserting a row.
    /// Nothing is decrypted.
    fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        self.dump(out)
    }
    /// Loads a dump into this store, all-or-nothing; `Exists` unless the store is fresh.
    fn load(&self, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError>;
    /// Current, non-deleted resources per FHIR type.
    fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError>;
    /// After a shred: makes deleted rows unrecoverable from the database's own files where
    /// the backend can. SQLite (with `secure_delete`) checkpoints and truncates its WAL, so
    /// the zeroed pages reach the main file and no older frame keeps a copy. Returns false
    /// if readers held the old pages and the purge could not finish (it completes at the
    /// next checkpoint). PostgreSQL has no such control: dead tuples stay in heap pages
    /// until reused; only the shredded key protects them.
    fn purge_deleted(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Tells every server sharing this store to drop its cached data key for `patient`
    /// (shredding and rotation rely on it). A single-process store has nobody to tell.
    fn announce_key_eviction(&self, patient: &PatientId) -> Result<(), StoreError> {
        let _ = patient;
        Ok(())
    }
    /// Registers a callback run for every eviction announced by any server.
    fn on_key_eviction(&self, f: Box<dyn Fn(&PatientId) + Send + Sync>) {
        let _ = f;
    }
}
