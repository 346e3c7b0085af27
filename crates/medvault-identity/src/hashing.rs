//! Password hashing (Argon2id, RFC 9106) behind a trait, so tests can count the work a
//! login does; and the password rules of NIST SP 800-63B §3.1.1.2 (length, a list of
//! common passwords, nothing derived from the account name).

use std::collections::HashSet;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::{IdentityError, Password};

/// Hashes and verifies passwords. Implementations must be deterministic in the work they
/// do per call (what the enumeration guarantee relies on).
pub trait PasswordHashing: Send + Sync + 'static {
    /// A PHC-format hash of `p` with a fresh salt.
    ///
    /// # Errors
    /// `Internal` when the hasher fails.
    fn hash(&self, p: &Password) -> Result<String, IdentityError>;
    /// Whether `p` matches the PHC-format `hash` (false for a malformed hash).
    fn verify(&self, hash: &str, p: &Password) -> bool;
    /// Whether `hash` was made with parameters at least as strong as the current ones
    /// (else it is re-hashed at the next successful login).
    fn is_current(&self, hash: &str) -> bool;
}

/// Argon2id with OWASP's minimum parameters (m = 19 MiB, t = 2, p = 1) unless raised.
pub struct Argon2id {
    argon: Argon2<'static>,
    params: Params,
}

impl Argon2id {
    /// `memory_kib`, `iterations`, `parallelism` as in RFC 9106 §3.1.
    ///
    /// # Errors
    /// `Internal` for parameters Argon2 refuses.
    pub fn new(memory_kib: u32, iterations: u32, parallelism: u32) -> Result<Self, IdentityError> {
        let params = Params::new(memory_kib, iterations, parallelism, None)
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        Ok(Argon2id {
            argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone()),
            params,
        })
    }
}

impl Default for Argon2id {
    fn default() -> Self {
        let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
        Argon2id {
            argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone()),
            params,
        }
    }
}

impl PasswordHashing for Argon2id {
    fn hash(&self, p: &Password) -> Result<String, IdentityError> {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        self.argon
            .hash_password(p.expose().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| IdentityError::Internal(e.to_string()))
    }

    fn verify(&self, hash: &str, p: &Password) -> bool {
        match PasswordHash::new(hash) {
            Ok(h) => self
                .argon
                .verify_password(p.expose().as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    }

    fn is_current(&self, hash: &str) -> bool {
        let Ok(h) = PasswordHash::new(hash) else {
            return false;
        };
        if h.algorithm != argon2::ARGON2ID_IDENT || h.version != Some(0x13) {
            return false;
        }
        let Ok(p) = Params::try_from(&h) else {
            return false;
        };
        p.m_cost() >= self.params.m_cost()
            && p.t_cost() >= self.params.t_cost()
            && p.p_cost() >= self.params.p_cost()
    }
}

/// Minimum password length in characters (SPEC "Identity").
pub const MIN_PASSWORD: usize = 12;

static COMMON_TEXT: &str = include_str!("../data/common-passwords.txt");

fn common() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_TEXT
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect()
    })
}

/// Why a chosen password is refused, or `None` when it may be used: shorter than
/// [`MIN_PASSWORD`]; on the shipped list of 20,000 common passwords, also once leading
/// and trailing digits and symbols are stripped ("Summer2024!" is "summer"); one
/// character repeated; or containing the account name.
pub fn weakness(p: &Password, username: Option<&str>) -> Option<&'static str> {
    let text = p.expose();
    if text.chars().count() < MIN_PASSWORD {
        return Some("at least 12 characters");
    }
    let lower = text.to_lowercase();
    let core = lower.trim_matches(|c: char| !c.is_alphabetic());
    if common().contains(lower.as_str()) || (core.len() >= 4 && common().contains(core)) {
        return Some("not be a common password");
    }
    let mut chars = lower.chars();
    if let Some(first) = chars.next() {
        if chars.all(|c| c == first) {
            return Some("not be one character repeated");
        }
    }
    if let Some(u) = username {
        let u = u.to_lowercase();
        if u.len() >= 3 && lower.contains(&u) {
            return Some("not contain the user name");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_and_derived_passwords_are_refused() {
        let w = |s: &str| weakness(&Password::new(s.into()), Some("ann.lee"));
        assert_eq!(w("short"), Some("at least 12 characters"));
        assert_eq!(w("Password1234"), Some("not be a common password"));
        assert_eq!(w("Summer2024!!"), Some("not be a common password"));
        assert_eq!(w("1qaz2wsx3edc"), Some("not be a common password"));
        assert_eq!(w("aaaaaaaaaaaaaa"), Some("not be one character repeated"));
        assert_eq!(w("ann.lee-is-great"), Some("not contain the user name"));
        assert_eq!(w("correct horse battery"), None);
        assert!(common().len() > 19_000, "the shipped list is loaded");
    }

    #[test]
    fn weaker_parameters_are_not_current() {
        let weak = Argon2id::new(8_192, 1, 1).unwrap_or_default();
        let strong = Argon2id::default();
        let p = Password::new("correct horse battery".into());
        let old = weak.hash(&p).unwrap_or_default();
        assert!(strong.verify(&old, &p), "old hashes still verify");
        assert!(!strong.is_current(&old));
        assert!(strong.is_current(&strong.hash(&p).unwrap_or_default()));
    }
}
