//! medvault-identity — who is calling: staff users, Argon2id passwords, TOTP second
//! factor, MFA challenges and sessions.
//!
//! Functions here decide and return the store operations to apply; the gate commits
//! them together with the audit record of the event, so an authentication event is
//! never recorded without its audit entry (law 2).
//! This room must never log or return a password, TOTP seed or token except to the
//! caller that created it, never store a token (only its SHA-256), and never tell a
//! caller whether a user name exists.
#![forbid(unsafe_code)]

mod totp;

use std::fmt;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use medvault_crypto::{DataKey, RecordCipher};
use medvault_store::{Op, SessionRow, Store, StoreError, UserRow};
use medvault_types::{Clock, Role, Username};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use totp::{totp_code, totp_now, TotpSecret};

/// Password text: zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Password(String);

impl Password {
    pub fn new(s: String) -> Self {
        Password(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// A random password from an unambiguous alphabet (~119 bits).
    pub fn generate() -> Self {
        const A: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
        let mut b = [0u8; 20];
        rand::rngs::OsRng.fill_bytes(&mut b);
        let s = b
            .iter()
            .map(|x| char::from(*A.get(usize::from(*x) % A.len()).unwrap_or(&b'x')))
            .collect();
        b.zeroize();
        Password(s)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

/// A bearer token handed to a client once; only its hash is stored.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn from_client(s: &str) -> Self {
        Token(s.to_owned())
    }
    fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        let t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        b.zeroize();
        Token(t)
    }
    pub fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid credentials")]
    BadCredentials,
    #[error("invalid or expired multi-factor challenge")]
    BadChallenge,
    #[error("invalid authentication code")]
    BadCode,
    #[error("not authenticated")]
    Unauthenticated,
    #[error("session expired")]
    Expired,
    #[error("password must be at least {MIN_PASSWORD} characters and not a common password")]
    WeakPassword,
    #[error("user already exists")]
    UserExists,
    #[error("account is disabled")]
    Disabled,
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

pub const MIN_PASSWORD: usize = 12;
const COMMON: &[&str] = &[
    "password1234",
    "123456789012",
    "qwertyuiop12",
    "passwordpassword",
    "iloveyou1234",
    "letmein12345",
    "administrator",
    "welcome12345",
    "changeme1234",
    "medvault1234",
];

/// Session lifetimes, from configuration.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    pub idle_timeout_secs: i64,
    pub absolute_timeout_secs: i64,
    pub mfa_challenge_secs: i64,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            idle_timeout_secs: 900,
            absolute_timeout_secs: 43_200,
            mfa_challenge_secs: 300,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub username: Username,
    pub role: Role,
}

/// Result of a successful step, with the store operations that record it.
#[derive(Debug)]
pub struct Step<T> {
    pub value: T,
    pub ops: Vec<Op>,
}

/// A new user's one-time secrets.
#[derive(Debug)]
pub struct NewUser {
    pub username: Username,
    pub role: Role,
    pub password: Password,
    pub totp: TotpSecret,
}

pub struct Identity {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    secrets: RecordCipher,
    policy: SessionPolicy,
    argon: Argon2<'static>,
    /// A hash to verify against for unknown users (equal work), made on first need.
    dummy_hash: std::sync::OnceLock<String>,
}

fn argon() -> Argon2<'static> {
    // OWASP: Argon2id, m = 19 MiB, t = 2, p = 1.
    let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl Identity {
    /// `secrets_key` seals TOTP seeds at rest.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        secrets_key: &DataKey,
        policy: SessionPolicy,
    ) -> Self {
        Identity {
            store,
            clock,
            secrets: RecordCipher::new(secrets_key),
            policy,
            argon: argon(),
            dummy_hash: std::sync::OnceLock::new(),
        }
    }

    pub fn session_policy(&self) -> SessionPolicy {
        self.policy
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    pub fn check_password_strength(p: &Password) -> Result<(), IdentityError> {
        let lower = p.expose().to_lowercase();
        if p.expose().chars().count() < MIN_PASSWORD || COMMON.contains(&lower.as_str()) {
            return Err(IdentityError::WeakPassword);
        }
        Ok(())
    }

    /// Prepares a new user: hashes the password, seals a fresh TOTP seed.
    pub fn new_user(
        &self,
        username: Username,
        role: Role,
        password: Option<Password>,
        practitioner_id: Option<String>,
    ) -> Result<Step<NewUser>, IdentityError> {
        if self.store.user(username.as_str())?.is_some() {
            return Err(IdentityError::UserExists);
        }
        let password = match password {
            Some(p) => {
                Self::check_password_strength(&p)?;
                p
            }
            None => Password::generate(),
        };
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let hash = self
            .argon
            .hash_password(password.expose().as_bytes(), &salt)
            .map_err(|e| IdentityError::Internal(e.to_string()))?
            .to_string();
        let totp = TotpSecret::generate();
        let sealed = self
            .secrets
            .seal(&totp_aad(username.as_str()), totp.bytes())
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        let row = UserRow {
            username: username.as_str().to_owned(),
            role: role.as_str().to_owned(),
            password_hash: hash,
            totp_secret_wrapped: sealed,
            totp_last_step: 0,
            disabled: false,
            failed_logins: 0,
            created: medvault_types::fhir_instant(self.clock.now()),
            practitioner_id,
        };
        Ok(Step {
            value: NewUser {
                username,
                role,
                password,
                totp,
            },
            ops: vec![Op::CreateUser(row)],
        })
    }

    /// First factor. On success returns an MFA challenge token. The error is the same
    /// for an unknown user and a wrong password, and costs the same time.
    pub fn begin_login(
        &self,
        username: &str,
        password: &Password,
    ) -> Result<Step<(Token, Principal)>, Step<IdentityError>> {
        let fail = |ops| Step {
            value: IdentityError::BadCredentials,
            ops,
        };
        let user = match self.store.user(username) {
            Ok(u) => u,
            Err(e) => {
                return Err(Step {
                    value: e.into(),
                    ops: vec![],
                })
            }
        };
        let Some(user) = user else {
            let dummy = self.dummy_hash.get_or_init(|| {
                let salt = SaltString::generate(&mut rand::rngs::OsRng);
                self.argon
                    .hash_password(b"medvault-dummy-password", &salt)
                    .map(|h| h.to_string())
                    .unwrap_or_default()
            });
            let _ = self.verify_hash(dummy, password);
            return Err(fail(vec![]));
        };
        if !self.verify_hash(&user.password_hash, password) || user.disabled {
            let op = Op::SetFailedLogins {
                username: user.username.clone(),
                count: user.failed_logins.saturating_add(1),
            };
            return Err(fail(vec![op]));
        }
        let principal = match principal_of(&user) {
            Some(p) => p,
            None => return Err(fail(vec![])),
        };
        let token = Token::generate();
        let now = self.now();
        let mut ops = vec![Op::PutSession(SessionRow {
            token_hash: token.hash(),
            kind: "mfa".into(),
            username: user.username.clone(),
            created: now,
            last_seen: now,
            expires: now + self.policy.mfa_challenge_secs,
        })];
        if user.failed_logins != 0 {
            ops.push(Op::SetFailedLogins {
                username: user.username.clone(),
                count: 0,
            });
        }
        Ok(Step {
            value: (token, principal),
            ops,
        })
    }

    fn verify_hash(&self, hash: &str, password: &Password) -> bool {
        match PasswordHash::new(hash) {
            Ok(h) => self
                .argon
                .verify_password(password.expose().as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// The user an MFA challenge token belongs to, if it is live.
    pub fn challenge_user(&self, mfa_token: &Token) -> Result<Principal, IdentityError> {
        let s = self
            .store
            .session(&mfa_token.hash())?
            .ok_or(IdentityError::BadChallenge)?;
        if s.kind != "mfa" || s.expires <= self.now() {
            return Err(IdentityError::BadChallenge);
        }
        let user = self
            .store
            .user(&s.username)?
            .ok_or(IdentityError::BadChallenge)?;
        principal_of(&user).ok_or(IdentityError::BadChallenge)
    }

    /// Second factor: a TOTP code (RFC 6238; each step usable once). Returns a session token.
    pub fn finish_totp(
        &self,
        mfa_token: &Token,
        code: &str,
    ) -> Result<Step<(Token, Principal)>, IdentityError> {
        let principal = self.challenge_user(mfa_token)?;
        let user = self
            .store
            .user(principal.username.as_str())?
            .ok_or(IdentityError::BadChallenge)?;
        if user.disabled {
            return Err(IdentityError::Disabled);
        }
        let seed = self
            .secrets
            .open(&totp_aad(&user.username), &user.totp_secret_wrapped)
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        let secret = TotpSecret::from_bytes(seed);
        let step = secret
            .matching_step(code, self.now())
            .ok_or(IdentityError::BadCode)?;
        if step <= user.totp_last_step {
            return Err(IdentityError::BadCode);
        }
        let token = Token::generate();
        let now = self.now();
        let ops = vec![
            Op::UseTotpStep {
                username: user.username.clone(),
                step,
            },
            Op::DeleteSession {
                token_hash: mfa_token.hash(),
            },
            Op::PutSession(SessionRow {
                token_hash: token.hash(),
                kind: "session".into(),
                username: user.username.clone(),
                created: now,
                last_seen: now,
                expires: now + self.policy.absolute_timeout_secs,
            }),
        ];
        Ok(Step {
            value: (token, principal),
            ops,
        })
    }

    /// Resolves a session token. Returns a touch operation when `last_seen` should move.
    pub fn authenticate(&self, token: &Token) -> Result<Step<Principal>, IdentityError> {
        let s = self
            .store
            .session(&token.hash())?
            .ok_or(IdentityError::Unauthenticated)?;
        let now = self.now();
        if s.kind != "session" {
            return Err(IdentityError::Unauthenticated);
        }
        if s.expires <= now || s.last_seen + self.policy.idle_timeout_secs <= now {
            return Err(IdentityError::Expired);
        }
        let user = self
            .store
            .user(&s.username)?
            .ok_or(IdentityError::Unauthenticated)?;
        if user.disabled {
            return Err(IdentityError::Disabled);
        }
        let principal = principal_of(&user).ok_or(IdentityError::Unauthenticated)?;
        let ops = if now - s.last_seen >= 30 {
            vec![Op::TouchSession {
                token_hash: s.token_hash,
                last_seen: now,
            }]
        } else {
            vec![]
        };
        Ok(Step {
            value: principal,
            ops,
        })
    }

    pub fn logout(&self, token: &Token) -> Vec<Op> {
        vec![Op::DeleteSession {
            token_hash: token.hash(),
        }]
    }
}

fn totp_aad(username: &str) -> Vec<u8> {
    format!("medvault:totp:v1|{username}").into_bytes()
}

fn principal_of(u: &UserRow) -> Option<Principal> {
    Some(Principal {
        username: Username::new(&u.username).ok()?,
        role: u.role.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords() {
        assert!(Identity::check_password_strength(&Password::new("short".into())).is_err());
        assert!(Identity::check_password_strength(&Password::new("Password1234".into())).is_err());
        assert!(Identity::check_password_strength(&Password::generate()).is_ok());
        assert_eq!(
            format!("{:?}", Password::generate()),
            "Password([REDACTED])"
        );
    }
}
