//! medvault-identity — who is calling: staff users, Argon2id passwords, the login
//! throttle, TOTP, recovery codes and WebAuthn passkeys, MFA challenges, sessions and
//! step-up, account lifecycle.
//!
//! Functions here decide and return the store operations to apply; the gate commits
//! them together with the audit record of the event, so an authentication event is
//! never recorded without its audit entry (law 2).
//! This room must never log or return a password, TOTP seed or token except to the
//! caller that created it, never store a token (only its SHA-256), and never tell a
//! caller whether a user name exists.
#![forbid(unsafe_code)]

mod account;
mod apps;
mod clients;
mod hashing;
mod login;
mod oidc;
mod passkeys;
mod throttle;
mod totp;

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use medvault_crypto::{DataKey, RecordCipher, ServiceMac};
use medvault_store::{Op, Store, StoreError, UserRow};
use medvault_types::{Clock, Role, Username};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use account::{AccountView, Enrollment, SessionView};
pub use apps::{
    parse_app_scopes, pkce_matches, scope_within, valid_redirect_uri, AppClientAuth, AppGrant,
    AppScope, AppSession, AppTokens, AppView, APP_TOKEN_SECS, CONTEXT_SCOPES, OFFLINE_DAYS,
};
pub use clients::{
    parse_scopes, ClientAuth, ClientGrant, ClientView, NewClient, SmartScope, CLIENT_TOKEN_SECS,
};
pub use hashing::{weakness, Argon2id, PasswordHashing, MIN_PASSWORD};
pub use login::{Challenge, Factor, Grant, SessionInfo};
pub use oidc::{OidcProvider, SsoIdentity};
pub use passkeys::PasskeyView;
pub use throttle::{LockEvent, LockoutPolicy, Method};
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
        // A token never begins with `-`, so a command line never takes it for an option
        // (the first character only is remapped; 256 bits of randomness remain ~255).
        let mut t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        if t.starts_with('-') {
            t.replace_range(..1, "A");
        }
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
    /// Too many failures: try again in `retry_after` seconds (HTTP 429 `Retry-After`).
    #[error("too many failed attempts; try again in {retry_after} seconds")]
    Locked { retry_after: i64 },
    #[error("password must be {0}")]
    WeakPassword(&'static str),
    #[error("user already exists")]
    UserExists,
    #[error("no such user")]
    NoSuchUser,
    #[error("no such session")]
    NoSuchSession,
    #[error("account is disabled")]
    Disabled,
    /// Single sign-on failed: the IdP's answer was refused (the text says why; no secret).
    #[error("single sign-on failed: {0}")]
    Sso(String),
    /// The IdP's groups for this user map to no medvault role.
    #[error("your identity provider account has no medvault role")]
    NoRole,
    #[error("no such identity provider")]
    NoSuchProvider,
    /// A scope that is not a SMART v2 system scope medvault grants, or one the client
    /// does not hold (OAuth2 `invalid_scope`).
    #[error("invalid scope: {0}")]
    BadScope(String),
    /// A client registration that cannot be made (name or key).
    #[error("{0}")]
    BadClient(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

/// Session lifetimes, from configuration (HIPAA 164.312(a)(2)(iii) automatic logoff).
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    /// Seconds without a request after which a session ends.
    pub idle_timeout_secs: i64,
    /// Seconds after sign-in at which a session ends however busy.
    pub absolute_timeout_secs: i64,
    /// Seconds a second-factor challenge lives.
    pub mfa_challenge_secs: i64,
    /// Seconds a verified second factor counts for step-up (SPEC: 300).
    pub step_up_secs: i64,
    /// Days without a sign-in after which an account is disabled (0 = never).
    pub dormant_after_days: i64,
    /// Whether a passkey alone may sign in (user verification makes it two factors in
    /// one: something you have, unlocked by something you are or know).
    pub passwordless: bool,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            idle_timeout_secs: 900,
            absolute_timeout_secs: 43_200,
            mfa_challenge_secs: 300,
            step_up_secs: 300,
            dormant_after_days: 90,
            passwordless: false,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub username: Username,
    pub role: Role,
    /// The id of the user's FHIR `Practitioner` (clinicians): what care teams and
    /// encounters name, so what treatment relationships are found by.
    pub practitioner: Option<String>,
    /// Whether the user's required security training is current (the training gate).
    pub training_current: bool,
}

/// Result of a successful step, with the store operations that record it.
#[derive(Debug)]
pub struct Step<T> {
    pub value: T,
    pub ops: Vec<Op>,
}

/// A refused step, with the store operations that record the failure (counters, a dying
/// challenge) and the locks it started, for the audit log.
#[derive(Debug)]
pub struct Refused {
    pub error: IdentityError,
    pub ops: Vec<Op>,
    pub locks: Vec<LockEvent>,
    /// The account the attempt was for, when it exists (audit actor).
    pub username: Option<String>,
}

impl From<IdentityError> for Refused {
    fn from(error: IdentityError) -> Self {
        Refused {
            error,
            ops: vec![],
            locks: vec![],
            username: None,
        }
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        IdentityError::Store(e).into()
    }
}

/// A new user's one-time secrets.
#[derive(Debug)]
pub struct NewUser {
    pub username: Username,
    pub role: Role,
    pub password: Password,
    pub totp: TotpSecret,
    pub recovery_codes: Vec<String>,
}

/// Identity's view of the store, clock and keys.
pub struct Identity {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    secrets: RecordCipher,
    mac: ServiceMac,
    hasher: Arc<dyn PasswordHashing>,
    /// A hash verified for unknown users, so they cost what known ones cost.
    dummy_hash: String,
    policy: SessionPolicy,
    lockout: LockoutPolicy,
    /// The WebAuthn relying party, once the public URL is known.
    rp: passkeys::RelyingParty,
    /// The URL clients reach the server at (OIDC redirect URIs are built from it).
    public_url: std::sync::OnceLock<String>,
    /// Configured OpenID providers.
    oidc: oidc::Providers,
}

impl Identity {
    /// `secrets_key` seals TOTP seeds and passkeys at rest and keys the MACs of throttle
    /// counters and recovery codes.
    ///
    /// # Errors
    /// `Internal` when the hasher cannot make the unknown-user hash.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        secrets_key: &DataKey,
        policy: SessionPolicy,
        lockout: LockoutPolicy,
        hasher: Arc<dyn PasswordHashing>,
    ) -> Result<Self, IdentityError> {
        let dummy_hash = hasher.hash(&Password::generate())?;
        Ok(Identity {
            store,
            clock,
            secrets: RecordCipher::new(secrets_key),
            mac: ServiceMac::from_data_key(secrets_key, "identity/v1"),
            hasher,
            dummy_hash,
            policy,
            lockout,
            rp: passkeys::RelyingParty::default(),
            public_url: std::sync::OnceLock::new(),
            oidc: oidc::Providers::default(),
        })
    }

    pub fn session_policy(&self) -> SessionPolicy {
        self.policy
    }

    pub fn lockout_policy(&self) -> LockoutPolicy {
        self.lockout
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Checks a chosen password against the rules of [`weakness`].
    ///
    /// # Errors
    /// `WeakPassword` naming the rule it breaks.
    pub fn check_password_strength(
        p: &Password,
        username: Option<&str>,
    ) -> Result<(), IdentityError> {
        match weakness(p, username) {
            Some(rule) => Err(IdentityError::WeakPassword(rule)),
            None => Ok(()),
        }
    }

    fn seal_totp(&self, username: &str, totp: &TotpSecret) -> Result<Vec<u8>, IdentityError> {
        self.secrets
            .seal(&totp_aad(username), totp.bytes())
            .map_err(|e| IdentityError::Internal(e.to_string()))
    }

    /// Prepares a new user: hashes the password, seals a fresh TOTP seed, makes ten
    /// recovery codes.
    ///
    /// # Errors
    /// `UserExists`; `WeakPassword` for a chosen password that breaks the rules.
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
                Self::check_password_strength(&p, Some(username.as_str()))?;
                p
            }
            None => Password::generate(),
        };
        let hash = self.hasher.hash(&password)?;
        let totp = TotpSecret::generate();
        let row = UserRow {
            username: username.as_str().to_owned(),
            role: role.as_str().to_owned(),
            password_hash: hash,
            totp_secret_wrapped: self.seal_totp(username.as_str(), &totp)?,
            totp_last_step: 0,
            disabled: false,
            created: medvault_types::fhir_instant(self.clock.now()),
            practitioner_id,
            last_login: 0,
            training_current: true,
        };
        let mut ops = vec![Op::CreateUser(row)];
        let codes = self.recovery_codes(username.as_str(), &mut ops);
        Ok(Step {
            value: NewUser {
                username,
                role,
                password,
                totp,
                recovery_codes: codes,
            },
            ops,
        })
    }
}

fn totp_aad(username: &str) -> Vec<u8> {
    format!("medvault:totp:v1|{username}").into_bytes()
}

fn principal_of(u: &UserRow) -> Option<Principal> {
    Some(Principal {
        username: Username::new(&u.username).ok()?,
        role: u.role.parse().ok()?,
        practitioner: u.practitioner_id.clone(),
        training_current: u.training_current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(
            format!("{:?}", Password::generate()),
            "Password([REDACTED])"
        );
        assert!(Identity::check_password_strength(&Password::generate(), None).is_ok());
    }

    /// A bearer token that began with `-` was taken for an option by `medvault audit
    /// witness --token` (about one run in 64 failed).
    #[test]
    fn tokens_never_begin_with_a_hyphen() {
        for _ in 0..2000 {
            assert!(!Token::generate().expose().starts_with('-'));
        }
    }
}
