//! medvault-audit — audit records: what was done, by whom, to whose chart, with what
//! outcome; their canonical serialization and leaf hashes for the Merkle log.
//!
//! A record carries identifiers (user names, opaque patient and resource ids, category
//! names, parameter names) and never clinical content or search values.
//! This room must never drop, reorder or rewrite a record once built, and its canonical
//! form must never change meaning: fields are serialized in one fixed order.
//! INVARIANT: log entry = SHA-256(canonical record) (a salted commitment); leaf hash =
//! SHA-256(0x00 ‖ entry), as RFC 6962 / RFC 9162 leaves.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod balp;
#[cfg(test)]
mod fuzz;
pub mod log;
pub mod merkle;
pub mod note;
pub mod tiles;
pub mod verify;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit record is not canonical JSON: {0}")]
    Decode(String),
    #[error("{0}")]
    Note(String),
}

/// Outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    Denied,
    NotFound,
    Failure,
}

/// One audit record. Fields are declared in alphabetical order; serde keeps declaration
/// order, which makes `serde_json::to_vec` the canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// e.g. `read`, `search`, `create`, `update`, `delete`, `import`, `login`, `mfa`, `logout`, `user.create`.
    pub action: String,
    pub actor: String,
    /// The SMART app (client id) the actor acted through (absent otherwise, so records from
    /// before the field hash as they did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The access was made under a break-the-glass grant (absent, not `false`, otherwise,
    /// so records from before the field hash as they did).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    pub categories_disclosed: Vec<String>,
    pub categories_withheld: Vec<String>,
    /// For a write: the digest of the version it stored (`sha256:HEX` over the stored row,
    /// ciphertext included), so the store can be cross-checked against the log (absent on
    /// other records and on writes from before the field, which hash as they did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Non-PHI detail: parameter names, counts, policy ids, error kind.
    pub detail: Option<String>,
    pub outcome: Outcome,
    pub patient: Option<String>,
    pub purpose: Option<String>,
    pub request_id: String,
    /// `Type/id/_history/version` or `Type`.
    pub resource: Option<String>,
    pub role: Option<String>,
    /// Random salt so a leaf hash reveals nothing by guessing.
    pub salt: String,
    pub source: Option<String>,
    pub time: String,
}

impl AuditRecord {
    /// A record with a fresh salt; fill in the rest with the builder methods.
    pub fn new(
        action: &str,
        actor: &str,
        outcome: Outcome,
        time: String,
        request_id: &str,
    ) -> Self {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        AuditRecord {
            action: action.to_owned(),
            actor: actor.to_owned(),
            app: None,
            break_glass: false,
            categories_disclosed: vec![],
            categories_withheld: vec![],
            content: None,
            detail: None,
            outcome,
            patient: None,
            purpose: None,
            request_id: request_id.to_owned(),
            resource: None,
            role: None,
            salt: hex(&salt),
            source: None,
            time,
        }
    }

    /// A copy with a fresh salt (for one event recorded against several patients).
    pub fn resalted(&self) -> Self {
        let fresh = AuditRecord::new("", "", self.outcome, String::new(), "");
        AuditRecord {
            salt: fresh.salt,
            ..self.clone()
        }
    }

    /// The canonical bytes committed to the log.
    pub fn canonical(&self) -> Vec<u8> {
        // Serializing plain strings, vectors and options cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_canonical(b: &[u8]) -> Result<Self, AuditError> {
        serde_json::from_slice(b).map_err(|e| AuditError::Decode(e.to_string()))
    }

    /// (leaf hash, canonical bytes), ready to append.
    /// The record as one SIEM export line (`medvault audit export`), entry `index`, with
    /// the actor, patient and source address replaced by `pseudonym(value)` (a keyed HMAC).
    pub fn siem_line(&self, index: u64, pseudonym: &dyn Fn(&str) -> String) -> serde_json::Value {
        serde_json::json!({
            "index": index,
            "time": self.time,
            "action": self.action,
            "outcome": self.outcome,
            "actor": pseudonym(&self.actor),
            "role": self.role,
            "patient": self.patient.as_deref().map(pseudonym),
            "resource_type": self.resource.as_deref().and_then(|x| x.split('/').next()),
            "categories_disclosed": self.categories_disclosed,
            "categories_withheld": self.categories_withheld,
            "purpose": self.purpose,
            "source": self.source.as_deref().map(pseudonym),
            "request_id": self.request_id,
        })
    }

    pub fn to_leaf(&self) -> (Vec<u8>, Vec<u8>) {
        let c = self.canonical();
        (record_leaf(&c).to_vec(), c)
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        for nibble in [x >> 4, x & 0xf] {
            s.push(char::from(
                D.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    s
}

/// The log entry for a canonical record: its commitment, SHA-256(record). The tree, its
/// tiles and its proofs carry commitments only, so they reveal nothing about who accessed
/// whom; the salted record behind a commitment is shown only to privacy officers and auditors.
pub fn commitment(canonical_record: &[u8]) -> [u8; 32] {
    Sha256::digest(canonical_record).into()
}

/// The Merkle leaf hash of a canonical record: SHA-256(0x00 ‖ SHA-256(record)).
pub fn record_leaf(canonical_record: &[u8]) -> [u8; 32] {
    leaf_hash(&commitment(canonical_record))
}

/// RFC 6962 leaf hash.
pub fn leaf_hash(entry: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_is_stable_and_salted() {
        let a = AuditRecord::new("read", "ann", Outcome::Success, "t".into(), "r1");
        let b = AuditRecord::new("read", "ann", Outcome::Success, "t".into(), "r1");
        assert_ne!(
            a.to_leaf().0,
            b.to_leaf().0,
            "salt makes equal events distinct"
        );
        let back = AuditRecord::from_canonical(&a.canonical()).unwrap();
        assert_eq!(back.canonical(), a.canonical());
        let text = String::from_utf8(a.canonical()).unwrap();
        assert!(text.starts_with("{\"action\":\"read\",\"actor\":\"ann\",\"categories_disclosed\""));
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(Sha256::digest(a.canonical()));
        assert_eq!(a.to_leaf().0, h.finalize().to_vec());
    }
}
