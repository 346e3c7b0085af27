//! The gate's error: what a transport maps to a status code and an OperationOutcome
//! (`medvault-server/src/error.rs`). Messages are for people; causes of internal errors are
//! logged once, where they are handled, never shown to the client.

use medvault_fhir::FhirError;
use medvault_store::StoreError;
use medvault_types::Category;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    Fhir(#[from] FhirError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("not found")]
    NotFound,
    #[error("resource deleted")]
    Gone,
    #[error("access denied")]
    Forbidden { withheld: Vec<Category> },
    /// The caller has no treatment relationship with the patient whose records these are;
    /// `break_glass` says whether breaking the glass would let them in.
    #[error("access denied: no treatment relationship with this patient")]
    NoRelationship { break_glass: bool },
    /// The declared purpose of use is one the caller's role may use for nothing.
    #[error("purpose of use not allowed for this role")]
    PurposeNotAllowed {
        declared: medvault_types::Purpose,
        allowed: Vec<medvault_types::Purpose>,
    },
    /// The record is restricted (a sensitivity label without a grant, or the patient's
    /// privacy consent): the error names neither. `break_glass` says whether breaking the
    /// glass for a medical emergency would open it.
    #[error("access denied: restricted information")]
    Restricted { break_glass: bool },
    /// A write the caller's role may not make: `action` (create, update, delete) on a
    /// resource of type `rtype`.
    #[error("access denied: your role may not {action} {rtype}")]
    Refused { action: &'static str, rtype: String },
    #[error("version conflict")]
    Conflict,
    /// The request repeats or contradicts something already done (HTTP 409); the text says
    /// what.
    #[error("{0}")]
    Duplicate(String),
    /// Separation of duties refuses the caller this act (HTTP 403); the text says why.
    #[error("{0}")]
    SeparationOfDuties(&'static str),
    /// The caller's required security training has lapsed (HTTP 403).
    #[error("access denied: required security training has lapsed")]
    TrainingLapsed,
    /// A precondition of the request does not hold (HTTP 412): `If-Match` or
    /// `request.ifMatch` names another version, `If-None-Match` matches, or a conditional
    /// create or update matches more than one resource. The text says which.
    #[error("{0}")]
    PreconditionFailed(&'static str),
    /// The server is already doing as much of this as it will at once (HTTP 429 with
    /// `Retry-After`): too many bulk exports running.
    #[error("busy; try again in {retry_after} seconds")]
    Busy { retry_after: i64 },
    #[error("authentication required")]
    Unauthenticated,
    /// Too many failed sign-ins: try again after `retry_after` seconds (HTTP 429).
    #[error("too many failed attempts; try again in {retry_after} seconds")]
    Locked { retry_after: i64 },
    /// The action needs a second factor within the last five minutes (HTTP 401,
    /// OperationOutcome code `step-up-required`).
    #[error("this action needs a recently verified second factor (step-up)")]
    StepUpRequired,
    #[error("{0}")]
    Identity(String),
    #[error("audit log unavailable; request refused")]
    AuditUnavailable,
    #[error("storage unavailable")]
    Unavailable(String),
    /// The master key cannot be reached: a key file missing, unreadable or open to others,
    /// an HSM that refuses (HTTP 503; the text is for the operator, never a client).
    #[error("{0}")]
    MasterKeyUnavailable(String),
    /// The server runs in emergency read-only mode (45 CFR 164.308(a)(7)(ii)(C)): records
    /// are read, never changed (HTTP 503).
    #[error("this server runs in emergency read-only mode: records can be read but not changed until the primary is back")]
    ReadOnly,
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => VaultError::Conflict,
            StoreError::Exists => VaultError::Conflict,
            StoreError::NotFound => VaultError::NotFound,
            StoreError::Unavailable(m) => VaultError::Unavailable(m),
            StoreError::Injected(m) => VaultError::Unavailable(m.to_owned()),
            StoreError::Backend(m) => VaultError::Internal(m),
        }
    }
}

impl From<medvault_crypto::CryptoError> for VaultError {
    fn from(e: medvault_crypto::CryptoError) -> Self {
        match e {
            // A wrong unseal passphrase is the caller's, not the server's, failure.
            medvault_crypto::CryptoError::WrongPassphrase(_) => VaultError::Identity(e.to_string()),
            // The HSM's own words (module, token, PIN) are for the operator, not a client.
            medvault_crypto::CryptoError::Hsm(m) => {
                VaultError::MasterKeyUnavailable(format!("HSM: {m}"))
            }
            // A key file missing, unreadable or open to others: the operator's to fix.
            e @ (medvault_crypto::CryptoError::KeyFilePermissions(_)
            | medvault_crypto::CryptoError::KeyFileFormat(_)
            | medvault_crypto::CryptoError::MissingVersion(..)
            | medvault_crypto::CryptoError::Io(_)) => {
                VaultError::MasterKeyUnavailable(format!("master key: {e}"))
            }
            e => VaultError::Internal(e.to_string()),
        }
    }
}

impl From<crate::typestate::OpenError> for VaultError {
    fn from(e: crate::typestate::OpenError) -> Self {
        VaultError::Internal(e.to_string())
    }
}

impl From<medvault_audit::verify::VerifyError> for VaultError {
    fn from(e: medvault_audit::verify::VerifyError) -> Self {
        VaultError::Internal(e.0)
    }
}
