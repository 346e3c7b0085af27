//! The typestate of a record on its way out of the gate (STYLE.md, after kanidm's
//! `Entry<VALID, STATE>`):
//!
//! ```text
//! Sealed (from storage) ──permit(decision, record)──► Permitted<Sealed> ──open──► Disclosed
//! ```
//!
//! * [`Sealed`] is made only by a store backend's row mapping (`medvault-store`).
//! * [`Permitted`] is made only by [`permit`], from a [`Decision`] of the policy engine
//!   (whose fields are private to `medvault-policy`), and `permit` writes the decision into
//!   the audit record it is given. Its fields are private to this module, so no other
//!   module of core — let alone a handler — can mint one.
//! * [`Disclosed`] is made only by opening a `Permitted<Sealed>` (or disclosing a
//!   `Permitted<Draft>`, a record the caller has just written) here. Renderers accept
//!   `Disclosed` alone.
//!
//! This module names nothing of the rest of core (only sibling crates), so a compile-fail
//! test can build it beside a module that tries to mint a permission and watch it fail.
//! INVARIANT: the audit record a `permit` wrote is committed in the same store transaction
//! as the read of the row, before the `Permitted` is handed back (the gate's audited read).

use medvault_audit::{AuditRecord, Outcome};
use medvault_crypto::{record_aad, RecordCipher};
use medvault_fhir::ResourceType;
use medvault_policy::Decision;
use medvault_store::Sealed;
use medvault_types::{Category, PatientId};
use serde_json::{Map, Value};

/// A value the policy engine allowed the caller to receive. Made only by [`permit`].
#[derive(Debug)]
pub struct Permitted<T> {
    inner: T,
}

impl<T> Permitted<T> {
    /// The permitted value.
    pub fn get(&self) -> &T {
        &self.inner
    }
}

/// Records `decision`'s outcome in `rec`, and, if it allows, wraps `inner` as permitted;
/// otherwise hands `inner` back. (The caller names the deciding policies in the record
/// where it wants them: `decision.policies()`.)
///
/// # Errors
/// `Err(inner)` when the decision denies; `rec` then says `Denied`.
pub fn permit<T>(decision: &Decision, inner: T, rec: &mut AuditRecord) -> Result<Permitted<T>, T> {
    if !decision.allowed() {
        rec.outcome = Outcome::Denied;
        return Err(inner);
    }
    rec.outcome = Outcome::Success;
    Ok(Permitted { inner })
}

/// Why a permitted record could not be opened (never the caller's fault: a damaged or
/// foreign row, or a missing key).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("record does not decrypt: {0}")]
    Crypto(#[from] medvault_crypto::CryptoError),
    #[error("stored record is not a JSON object")]
    NotJson,
    #[error("unknown stored resource type")]
    UnknownType,
    #[error("no data key to open the record with")]
    MissingKey,
}

/// A record the caller has just written, in plaintext, before it is handed back.
#[derive(Debug)]
pub struct Draft {
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub last_updated: String,
    pub category: Category,
    /// The chart the record belongs to (`None` for directory resources).
    pub patient: Option<PatientId>,
    pub json: Map<String, Value>,
}

/// A resource the caller may see: made only by [`open`] or [`disclose`], after a policy
/// decision that was recorded in the audit log.
#[derive(Debug, Clone)]
pub struct Disclosed {
    rtype: ResourceType,
    id: String,
    version: u64,
    last_updated: String,
    deleted: bool,
    json: Option<Map<String, Value>>,
    category: Category,
    patient: Option<PatientId>,
}

impl Disclosed {
    /// The chart the record belongs to (`None` for directory resources).
    pub fn patient(&self) -> Option<&PatientId> {
        self.patient.as_ref()
    }
    pub fn rtype(&self) -> ResourceType {
        self.rtype
    }
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn last_updated(&self) -> &str {
        &self.last_updated
    }
    pub fn deleted(&self) -> bool {
        self.deleted
    }
    pub fn category(&self) -> Category {
        self.category
    }
    /// The resource body (absent for a deletion in history).
    pub fn json(&self) -> Option<&Map<String, Value>> {
        self.json.as_ref()
    }
}

/// Opens a permitted row with the data key of its owner (`key_id`: the patient, or the
/// directory key): AES-256-GCM with the AAD binding type, id, version and owner. A deletion
/// has no body and needs no key.
///
/// # Errors
/// [`OpenError`] if the row does not decrypt under that key (or there is none), is not a
/// JSON object, or names a type or category this server does not know.
pub fn open(
    row: Permitted<Sealed>,
    cipher: Option<&RecordCipher>,
    key_id: &PatientId,
) -> Result<Disclosed, OpenError> {
    let row = row.inner;
    let rtype = ResourceType::parse(row.rtype()).ok_or(OpenError::UnknownType)?;
    let category = row.category().parse().map_err(|_| OpenError::UnknownType)?;
    let json = if row.deleted() {
        None
    } else {
        let aad = record_aad(row.rtype(), row.id(), row.version(), key_id);
        let plain = cipher
            .ok_or(OpenError::MissingKey)?
            .open(&aad, row.ciphertext())?;
        match serde_json::from_slice::<Value>(&plain) {
            Ok(Value::Object(mut m)) => {
                // Every disclosure of a 42 CFR Part 2 record carries its notice.
                medvault_fhir::privacy::mark_redisclosure(&mut m);
                Some(m)
            }
            _ => return Err(OpenError::NotJson),
        }
    };
    Ok(Disclosed {
        rtype,
        id: row.id().to_owned(),
        version: row.version(),
        last_updated: row.last_updated().to_owned(),
        deleted: row.deleted(),
        json,
        category,
        patient: row.patient().cloned(),
    })
}

/// Opens sealed free text (a recorded disclosure's recipient and description, sealed under
/// the patient's data key with `aad`) for a report the policy engine permitted.
///
/// # Errors
/// [`OpenError`] if it does not decrypt or is not the expected JSON.
pub fn open_text<T: serde::de::DeserializeOwned, P>(
    _permission: &Permitted<P>,
    cipher: &RecordCipher,
    aad: &[u8],
    sealed: &[u8],
) -> Result<T, OpenError> {
    let plain = cipher.open(aad, sealed)?;
    serde_json::from_slice(&plain).map_err(|_| OpenError::NotJson)
}

/// Discloses a record the caller just wrote, when policy lets them read it back.
pub fn disclose(draft: Permitted<Draft>) -> Disclosed {
    let d = draft.inner;
    Disclosed {
        rtype: d.rtype,
        id: d.id,
        version: d.version,
        last_updated: d.last_updated,
        deleted: false,
        json: Some(d.json),
        category: d.category,
        patient: d.patient,
    }
}
