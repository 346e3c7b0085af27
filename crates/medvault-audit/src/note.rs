//! Signed checkpoints: C2SP `tlog-checkpoint` bodies in C2SP `signed-note` envelopes,
//! Ed25519 (signature type 0x01).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;
use crate::AuditError;

const ED25519: u8 = 0x01;

fn key_hash(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519]);
    h.update(public);
    let d: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 4];
    out.copy_from_slice(d.get(..4).unwrap_or(&[0u8; 4]));
    out
}

/// Signs notes under a key name (the log's origin).
pub struct NoteSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({}, [REDACTED])", self.name)
    }
}

impl NoteSigner {
    pub fn new(name: &str, secret: &[u8; 32]) -> Self {
        NoteSigner {
            name: name.to_owned(),
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The verifier key in C2SP note form: `name+hexkeyhash+base64(0x01 ‖ public key)`.
    pub fn verifier_key(&self) -> String {
        let public = self.key.verifying_key().to_bytes();
        let mut raw = vec![ED25519];
        raw.extend_from_slice(&public);
        let kh: String = key_hash(&self.name, &public)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}+{kh}+{}", self.name, B64.encode(raw))
    }

    /// `text` (ending in a newline) followed by a blank line and this key's signature line.
    pub fn sign(&self, text: &str) -> String {
        let public = self.key.verifying_key().to_bytes();
        let sig = self.key.sign(text.as_bytes()).to_bytes();
        let mut blob = key_hash(&self.name, &public).to_vec();
        blob.extend_from_slice(&sig);
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// Verifies notes signed by one key.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    hash: [u8; 4],
    key: VerifyingKey,
}

impl NoteVerifier {
    pub fn parse(vkey: &str) -> Result<Self, AuditError> {
        let bad = || AuditError::Note("malformed verifier key".into());
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let raw = B64.decode(key).map_err(|_| bad())?;
        let (Some(&ED25519), Some(public)) = (raw.first(), raw.get(1..)) else {
            return Err(bad());
        };
        let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
        let key = VerifyingKey::from_bytes(&public).map_err(|_| bad())?;
        let want = key_hash(name, &public);
        let got: String = want.iter().map(|b| format!("{b:02x}")).collect();
        if got != hash {
            return Err(bad());
        }
        Ok(NoteVerifier {
            name: name.to_owned(),
            hash: want,
            key,
        })
    }

    /// Checks the note carries a valid signature by this key; returns the signed text.
    pub fn verify<'a>(&self, note: &'a str) -> Result<&'a str, AuditError> {
        let bad = |m: &str| AuditError::Note(m.to_owned());
        let split = note
            .find("\n\n")
            .ok_or_else(|| bad("note has no signature block"))?;
        let text = note
            .get(..split + 1)
            .ok_or_else(|| bad("note is malformed"))?;
        let sigs = note.get(split + 2..).unwrap_or("");
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                continue;
            };
            let Some((name, b64)) = rest.split_once(' ') else {
                continue;
            };
            if name != self.name {
                continue;
            }
            let Ok(blob) = B64.decode(b64) else { continue };
            if blob.get(..4) != Some(&self.hash[..]) {
                continue;
            }
            let Some(sig) = blob.get(4..).and_then(|s| <[u8; 64]>::try_from(s).ok()) else {
                continue;
            };
            if self
                .key
                .verify(text.as_bytes(), &Signature::from_bytes(&sig))
                .is_ok()
            {
                return Ok(text);
            }
            return Err(bad("signature does not verify"));
        }
        Err(bad("no signature by this log's key"))
    }
}

/// A checkpoint body (C2SP tlog-checkpoint): origin, tree size, base64 root hash.
pub fn checkpoint_text(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// Parses a checkpoint body into (origin, size, root).
pub fn parse_checkpoint(text: &str) -> Result<(String, u64, Hash), AuditError> {
    let bad = || AuditError::Note("malformed checkpoint".into());
    let mut lines = text.lines();
    let origin = lines.next().filter(|o| !o.is_empty()).ok_or_else(bad)?;
    let size: u64 = lines.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let root = lines
        .next()
        .and_then(|r| B64.decode(r).ok())
        .and_then(|r| <Hash>::try_from(r.as_slice()).ok())
        .ok_or_else(bad)?;
    Ok((origin.to_owned(), size, root))
}

const COSIGNATURE_V1: u8 = 0x04;

fn cosig_key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([COSIGNATURE_V1]);
    h.update(public);
    let d: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 4];
    out.copy_from_slice(d.get(..4).unwrap_or(&[0u8; 4]));
    out
}

fn cosigned_message(timestamp: u64, checkpoint_text: &str) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{checkpoint_text}")
}

/// A witness key (C2SP tlog-cosignature, `cosignature/v1`, Ed25519).
pub struct Witness {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Witness({}, [REDACTED])", self.name)
    }
}

impl Witness {
    pub fn new(name: &str, secret: &[u8; 32]) -> Self {
        Witness {
            name: name.to_owned(),
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The witness's verifier key: `name+hexkeyid+base64(0x04 ‖ public key)`.
    pub fn verifier_key(&self) -> String {
        let public = self.key.verifying_key().to_bytes();
        let mut raw = vec![COSIGNATURE_V1];
        raw.extend_from_slice(&public);
        let kh: String = cosig_key_id(&self.name, &public)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}+{kh}+{}", self.name, B64.encode(raw))
    }

    /// The cosignature line for a checkpoint body at `timestamp` (seconds since the epoch).
    pub fn cosign(&self, checkpoint_text: &str, timestamp: u64) -> String {
        let public = self.key.verifying_key().to_bytes();
        let sig = self
            .key
            .sign(cosigned_message(timestamp, checkpoint_text).as_bytes())
            .to_bytes();
        let mut blob = cosig_key_id(&self.name, &public).to_vec();
        blob.extend_from_slice(&timestamp.to_be_bytes());
        blob.extend_from_slice(&sig);
        format!("\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// Checks a witness cosignature on a note against the witness's verifier key.
pub fn verify_cosignature(note: &str, witness_vkey: &str) -> Result<u64, AuditError> {
    let bad = |m: &str| AuditError::Note(m.to_owned());
    let mut parts = witness_vkey.trim().splitn(3, '+');
    let (Some(name), Some(_), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("malformed witness key"));
    };
    let raw = B64.decode(key).map_err(|_| bad("malformed witness key"))?;
    let (Some(&COSIGNATURE_V1), Some(public)) = (raw.first(), raw.get(1..)) else {
        return Err(bad("not a cosignature/v1 key"));
    };
    let public: [u8; 32] = public
        .try_into()
        .map_err(|_| bad("malformed witness key"))?;
    let vk = VerifyingKey::from_bytes(&public).map_err(|_| bad("malformed witness key"))?;
    let split = note
        .find("\n\n")
        .ok_or_else(|| bad("note has no signature block"))?;
    let text = note.get(..split + 1).ok_or_else(|| bad("malformed note"))?;
    for line in note.get(split + 2..).unwrap_or("").lines() {
        let Some((n, b64)) = line
            .strip_prefix("\u{2014} ")
            .and_then(|r| r.split_once(' '))
        else {
            continue;
        };
        let Ok(blob) = B64.decode(b64) else { continue };
        if n != name || blob.len() != 76 || blob.get(..4) != Some(&cosig_key_id(name, &public)[..])
        {
            continue;
        }
        let ts = blob
            .get(4..12)
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let Some(sig) = blob.get(12..).and_then(|s| <[u8; 64]>::try_from(s).ok()) else {
            continue;
        };
        if vk
            .verify(
                cosigned_message(ts, text).as_bytes(),
                &Signature::from_bytes(&sig),
            )
            .is_ok()
        {
            return Ok(ts);
        }
    }
    Err(bad("no valid cosignature by this witness"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_tamper() {
        let s = NoteSigner::new("medvault.example/log", &[7u8; 32]);
        let v = NoteVerifier::parse(&s.verifier_key()).unwrap();
        let note = s.sign(&checkpoint_text("medvault.example/log", 42, &[9u8; 32]));
        let text = v.verify(&note).unwrap();
        assert_eq!(
            parse_checkpoint(text).unwrap(),
            ("medvault.example/log".into(), 42, [9u8; 32])
        );
        let forged = note.replace("\n42\n", "\n43\n");
        assert!(v.verify(&forged).is_err());
        let other = NoteVerifier::parse(
            &NoteSigner::new("medvault.example/log", &[8u8; 32]).verifier_key(),
        )
        .unwrap();
        assert!(other.verify(&note).is_err());
        assert!(NoteVerifier::parse("junk").is_err());
    }
}
