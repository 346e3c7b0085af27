//! The offline recovery key: an X25519 key pair whose private half `medvault init` prints
//! once (or splits M-of-N among named officers with Shamir's secret sharing, as Vault does
//! for unsealing), so backups restore when the master key is lost and no single person can
//! open every backup. A repository key is sealed to the public half: ephemeral X25519
//! agreement (RFC 7748), HKDF-SHA256 (RFC 5869), AES-256-GCM.
//!
//! Text forms: `MVRK1-…` (the private key), `MVRP1-…` (the public key), `MVRS1-…` (one
//! share), each base32 (RFC 4648, no padding) with a 4-byte SHA-256 checksum, so a
//! mistyped key is refused rather than tried.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::BackupError;

const INFO: &[u8] = b"medvault backup recovery v1";

fn err(m: impl Into<String>) -> BackupError {
    BackupError::Recovery(m.into())
}

fn encode(prefix: &str, body: &[u8]) -> String {
    let mut b = body.to_vec();
    b.extend_from_slice(Sha256::digest(body).get(..4).unwrap_or(&[0; 4]));
    format!("{prefix}{}", data_encoding::BASE32_NOPAD.encode(&b))
}

fn decode(prefix: &str, text: &str) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let t: String = text.trim().chars().filter(|c| !c.is_whitespace()).collect();
    let rest = t
        .strip_prefix(prefix)
        .ok_or_else(|| err(format!("expected text starting with {prefix}")))?;
    let upper = rest.to_ascii_uppercase();
    let raw = Zeroizing::new(
        data_encoding::BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|e| match e.kind {
                data_encoding::DecodeKind::Symbol => err(format!(
                    "character {} after {prefix} ({:?}) is not one of A-Z and 2-7",
                    e.position + 1,
                    upper.chars().nth(e.position).unwrap_or('?')
                )),
                data_encoding::DecodeKind::Length => err("a character is missing or one too many"),
                _ => err("checksum mismatch: a character is wrong"),
            })?,
    );
    if raw.len() < 5 {
        return Err(err("too short"));
    }
    let (body, sum) = raw.split_at(raw.len() - 4);
    if Sha256::digest(body).get(..4) != Some(sum) {
        return Err(err("checksum mismatch: a character is wrong"));
    }
    Ok(Zeroizing::new(body.to_vec()))
}

/// The recovery public key (kept in the data directory; not secret).
#[derive(Clone)]
pub struct RecoveryPublic(PublicKey);

impl std::fmt::Debug for RecoveryPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecoveryPublic({})", self.to_text())
    }
}

/// The recovery private key (printed once; kept offline).
pub struct RecoverySecret(StaticSecret);

impl std::fmt::Debug for RecoverySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoverySecret([REDACTED])")
    }
}

/// A repository key sealed to a recovery public key (in the repository's config).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    /// The recovery public key it is sealed to (`MVRP1-…`).
    pub public_key: String,
    /// The ephemeral X25519 public key, base64.
    pub ephemeral: String,
    /// Nonce ‖ AES-256-GCM ciphertext of the repository key, base64.
    pub sealed: String,
    /// Shares needed when the private key was split (M of `holders`).
    #[serde(default)]
    pub threshold: Option<u8>,
    #[serde(default)]
    pub holders: Vec<String>,
}

fn kek(shared: &[u8; 32], epk: &[u8; 32], rpk: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(INFO), shared);
    let mut k = Zeroizing::new([0u8; 32]);
    let mut info = INFO.to_vec();
    info.extend_from_slice(epk);
    info.extend_from_slice(rpk);
    let _ = hk.expand(&info, &mut *k);
    k
}

impl RecoveryPublic {
    pub fn to_text(&self) -> String {
        encode("MVRP1-", self.0.as_bytes())
    }

    /// # Errors
    /// Not an `MVRP1-` key, or a checksum mismatch.
    pub fn from_text(t: &str) -> Result<Self, BackupError> {
        let b = decode("MVRP1-", t)?;
        let k: [u8; 32] = b.as_slice().try_into().map_err(|_| err("wrong length"))?;
        Ok(RecoveryPublic(PublicKey::from(k)))
    }

    /// Seals a repository key to this public key.
    ///
    /// # Errors
    /// Encryption failure (not expected).
    pub fn seal(&self, raw: &[u8; 32]) -> Result<Sealed, BackupError> {
        let e = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let epk = PublicKey::from(&e);
        let shared = Zeroizing::new(e.diffie_hellman(&self.0).to_bytes());
        let k = kek(&shared, epk.as_bytes(), self.0.as_bytes());
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = Aes256Gcm::new((&*k).into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: raw,
                    aad: INFO,
                },
            )
            .map_err(|_| err("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(Sealed {
            public_key: self.to_text(),
            ephemeral: B64.encode(epk.as_bytes()),
            sealed: B64.encode(out),
            threshold: None,
            holders: vec![],
        })
    }
}

impl RecoverySecret {
    /// A new key pair.
    pub fn generate() -> Self {
        RecoverySecret(StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    pub fn public(&self) -> RecoveryPublic {
        RecoveryPublic(PublicKey::from(&self.0))
    }

    /// The private key's text form, to print once.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(encode("MVRK1-", &self.0.to_bytes()))
    }

    /// # Errors
    /// Not an `MVRK1-` key, or a checksum mismatch.
    pub fn from_text(t: &str) -> Result<Self, BackupError> {
        let b = decode("MVRK1-", t)?;
        let k: [u8; 32] = b.as_slice().try_into().map_err(|_| err("wrong length"))?;
        Ok(RecoverySecret(StaticSecret::from(k)))
    }

    /// Splits the private key into `n` shares, any `m` of which rebuild it (Shamir over
    /// GF(256), the `blahaj` crate: `sharks` with uniformly random coefficients,
    /// RUSTSEC-2024-0398).
    ///
    /// # Errors
    /// `m` below 2 or above `n`, or `n` above 255.
    pub fn split(&self, m: u8, n: u8) -> Result<Vec<Zeroizing<String>>, BackupError> {
        if m < 2 || m > n {
            return Err(err("a split needs 2 <= M <= N shares"));
        }
        let secret = Zeroizing::new(self.0.to_bytes());
        let dealer = blahaj::Sharks(m).dealer(&*secret);
        Ok(dealer
            .take(usize::from(n))
            .map(|s| {
                let b = Zeroizing::new(Vec::from(&s));
                let mut body = vec![m];
                body.extend_from_slice(&b);
                Zeroizing::new(encode("MVRS1-", &body))
            })
            .collect())
    }

    /// Rebuilds the private key from shares (`MVRS1-…`).
    ///
    /// # Errors
    /// A malformed share, or fewer than the threshold.
    pub fn combine(shares: &[String]) -> Result<Self, BackupError> {
        let mut parsed = vec![];
        let mut seen: Vec<Zeroizing<Vec<u8>>> = vec![];
        let mut m = 0u8;
        for s in shares {
            let b = decode("MVRS1-", s)?;
            if seen.contains(&b) {
                return Err(err(
                    "the same share was given twice: give M different holders' shares",
                ));
            }
            seen.push(b.clone());
            let (&t, rest) = b.split_first().ok_or_else(|| err("empty share"))?;
            m = t;
            parsed.push(blahaj::Share::try_from(rest).map_err(|_| err("malformed share"))?);
        }
        if parsed.len() < usize::from(m) {
            return Err(err(format!(
                "{} of the {m} shares needed were given",
                parsed.len()
            )));
        }
        let secret = Zeroizing::new(
            blahaj::Sharks(m)
                .recover(&parsed)
                .map_err(|_| err("the shares do not rebuild a key"))?,
        );
        let k: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| err("the shares rebuild a key of the wrong length"))?;
        Ok(RecoverySecret(StaticSecret::from(k)))
    }

    /// Opens a repository key sealed to this key's public half.
    ///
    /// # Errors
    /// Sealed to another key, or altered.
    pub fn open(&self, s: &Sealed) -> Result<Zeroizing<[u8; 32]>, BackupError> {
        let rpk = PublicKey::from(&self.0);
        if RecoveryPublic(rpk).to_text() != s.public_key {
            return Err(err(
                "this repository's key is sealed to another recovery key",
            ));
        }
        let epk: [u8; 32] = B64
            .decode(&s.ephemeral)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| err("malformed sealed key"))?;
        let blob = B64
            .decode(&s.sealed)
            .map_err(|_| err("malformed sealed key"))?;
        let shared = Zeroizing::new(self.0.diffie_hellman(&PublicKey::from(epk)).to_bytes());
        let k = kek(&shared, &epk, rpk.as_bytes());
        let (nonce, ct) = (blob.get(..12), blob.get(12..));
        let (Some(nonce), Some(ct)) = (nonce, ct) else {
            return Err(err("malformed sealed key"));
        };
        let raw = Zeroizing::new(
            Aes256Gcm::new((&*k).into())
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: INFO })
                .map_err(|_| err("the sealed key does not open"))?,
        );
        let out: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| err("the sealed key has the wrong length"))?;
        Ok(Zeroizing::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_split_combine_and_typos() {
        let s = RecoverySecret::generate();
        let p = RecoveryPublic::from_text(&s.public().to_text()).unwrap();
        let sealed = p.seal(&[7; 32]).unwrap();
        let back = RecoverySecret::from_text(&s.to_text()).unwrap();
        assert_eq!(*back.open(&sealed).unwrap(), [7; 32]);
        assert!(RecoverySecret::generate().open(&sealed).is_err());
        let shares = s.split(2, 3).unwrap();
        let two: Vec<String> = shares.iter().skip(1).map(|x| x.to_string()).collect();
        assert_eq!(
            *RecoverySecret::combine(&two)
                .unwrap()
                .open(&sealed)
                .unwrap(),
            [7; 32]
        );
        assert!(
            RecoverySecret::combine(&two[..1]).is_err(),
            "below the threshold"
        );
        let twice = vec![two[0].clone(), two[0].clone()];
        let e = RecoverySecret::combine(&twice).err().unwrap().to_string();
        assert!(e.contains("same share was given twice"), "{e}");
        let mut typo = s.to_text().to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        assert!(RecoverySecret::from_text(&typo).is_err(), "checksum");
        // Every kind of typo is told as one, never as "not base32".
        let text = s.to_text().to_string();
        let mut zero = text.clone();
        zero.replace_range(10..11, "0");
        let e = RecoverySecret::from_text(&zero).err().unwrap().to_string();
        assert!(
            e.contains("is not one of A-Z and 2-7") && e.contains("'0'"),
            "{e}"
        );
        let e = RecoverySecret::from_text(&text[..text.len() - 1])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("a character is"), "{e}");
        for last in ['A', 'B', 'Q', '7'] {
            let mut t = text.clone();
            t.pop();
            t.push(last);
            if t != text {
                let e = RecoverySecret::from_text(&t).err().unwrap().to_string();
                assert!(e.contains("a character is"), "{last}: {e}");
            }
        }
        assert!(s.split(1, 3).is_err());
        assert!(format!("{s:?}").contains("REDACTED"));
    }
}
