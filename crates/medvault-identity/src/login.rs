//! Signing in: the password, the second factor (TOTP, a recovery code, or a passkey
//! verified by the WebAuthn module), the session that results, and step-up.

use medvault_store::{CredentialRow, Op, SessionRow, UserRow};
use rand::RngCore;

use crate::throttle::{Attempt, Method};
use crate::{
    principal_of, totp_aad, Identity, IdentityError, Password, Principal, Refused, Step, Token,
    TotpSecret,
};

/// Credential kind of a recovery code (its id is a MAC of user and code).
pub(crate) const RECOVERY: &str = "recovery";
/// Credential kind of a WebAuthn passkey.
pub(crate) const PASSKEY: &str = "webauthn";
const RECOVERY_CODES: usize = 10;

/// First-factor success: the challenge for the second factor.
#[derive(Debug)]
pub struct Challenge {
    pub mfa_token: Token,
    pub principal: Principal,
    /// Second factors the user has: `totp`, `recovery`, `webauthn`.
    pub methods: Vec<&'static str>,
}

/// A second factor answering a challenge or a step-up.
#[derive(Debug)]
pub enum Factor<'a> {
    /// An RFC 6238 code; each 30-second step is usable once.
    Totp(&'a str),
    /// A one-time recovery code.
    Recovery(&'a str),
    /// A passkey assertion the WebAuthn module verified: the credential id and its new
    /// sealed state (signature counter).
    Passkey { id: Vec<u8>, state: Vec<u8> },
}

impl Factor<'_> {
    fn name(&self) -> &'static str {
        match self {
            Factor::Totp(_) => "totp",
            Factor::Recovery(_) => "recovery",
            Factor::Passkey { .. } => "passkey",
        }
    }
}

/// A new session.
#[derive(Debug)]
pub struct Grant {
    pub token: Token,
    pub principal: Principal,
    /// How it was established (`password+totp`, `passkey`, …).
    pub method: String,
}

/// A live session, as authentication resolves it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub principal: Principal,
    pub token_hash: Vec<u8>,
    /// When a second factor was last verified in it (Unix seconds).
    pub mfa_at: i64,
    /// For a service client's token: its granted SMART scopes (space-separated).
    pub scopes: Option<String>,
    /// For a SMART app's token: the app, its grant, resource scopes and launch patient.
    pub app: Option<crate::AppSession>,
}

impl Identity {
    fn refuse(&self, error: IdentityError, username: Option<&str>) -> Refused {
        Refused {
            error,
            ops: vec![],
            locks: vec![],
            username: username.map(str::to_owned),
        }
    }

    /// Counts a failure of `attempt` and refuses with `error`.
    fn failed(
        &self,
        attempt: &Attempt,
        rows: &[medvault_store::ThrottleRow],
        error: IdentityError,
        mut ops: Vec<Op>,
        username: Option<&str>,
    ) -> Refused {
        let (count, locks) = attempt.fail(&self.lockout, rows, self.now());
        ops.extend(count);
        Refused {
            error,
            ops,
            locks,
            username: username.map(str::to_owned),
        }
    }

    /// Whether `attempt` must wait; `Locked` with the seconds if so.
    fn throttled(
        &self,
        attempt: &Attempt,
        method: Method,
    ) -> Result<Vec<medvault_store::ThrottleRow>, IdentityError> {
        let rows = self.store.throttle(&attempt.keys())?;
        let wait = attempt.retry_after(&self.lockout, method, &rows, self.now());
        if wait > 0 {
            return Err(IdentityError::Locked { retry_after: wait });
        }
        Ok(rows)
    }

    pub(crate) fn usable(&self, user: &UserRow) -> bool {
        !user.disabled && !self.is_dormant(user)
    }

    /// First factor. On success returns a second-factor challenge. An unknown user, a
    /// wrong password and a disabled account get the same answer for the same work (one
    /// password verification); a throttled attempt gets `Locked` for any of them and does
    /// no hashing at all.
    ///
    /// # Errors
    /// `BadCredentials`, `Locked`, `Store`.
    pub fn begin_login(
        &self,
        username: &str,
        password: &Password,
        source: Option<&str>,
    ) -> Result<Step<Challenge>, Refused> {
        let attempt = Attempt::new(&self.mac, username, source);
        let user = self.store.user(username)?;
        let known = user.as_ref().map(|u| u.username.clone());
        let known = known.as_deref();
        let rows = self
            .throttled(&attempt, Method::Password)
            .map_err(|e| self.refuse(e, known))?;
        let Some(user) = user else {
            let _ = self.hasher.verify(&self.dummy_hash, password);
            return Err(self.failed(&attempt, &rows, IdentityError::BadCredentials, vec![], None));
        };
        let principal = principal_of(&user);
        let (true, true, Some(principal)) = (
            self.hasher.verify(&user.password_hash, password),
            self.usable(&user),
            principal,
        ) else {
            return Err(self.failed(
                &attempt,
                &rows,
                IdentityError::BadCredentials,
                vec![],
                known,
            ));
        };
        let mut ops = vec![];
        if !self.hasher.is_current(&user.password_hash) {
            ops.push(Op::SetPasswordHash {
                username: user.username.clone(),
                hash: self.hasher.hash(password)?,
            });
        }
        let token = Token::generate();
        let now = self.now();
        ops.push(Op::PutSession(SessionRow {
            token_hash: token.hash(),
            kind: "mfa".into(),
            username: user.username.clone(),
            created: now,
            last_seen: now,
            expires: now + self.policy.mfa_challenge_secs,
            attempts: 0,
            mfa_at: 0,
            source: source.unwrap_or("").to_owned(),
            method: "password".into(),
            scope: String::new(),
        }));
        let mut methods = vec!["totp"];
        if !self.store.credentials(&user.username, RECOVERY)?.is_empty() {
            methods.push("recovery");
        }
        if !self.store.credentials(&user.username, PASSKEY)?.is_empty() {
            methods.push("webauthn");
        }
        Ok(Step {
            value: Challenge {
                mfa_token: token,
                principal,
                methods,
            },
            ops,
        })
    }

    /// The user a live second-factor challenge belongs to.
    ///
    /// # Errors
    /// `BadChallenge` for an unknown, expired or exhausted challenge.
    pub fn challenge_user(&self, mfa_token: &Token) -> Result<UserRow, IdentityError> {
        let s = self
            .store
            .session(&mfa_token.hash())?
            .ok_or(IdentityError::BadChallenge)?;
        if s.kind != "mfa"
            || s.expires <= self.now()
            || s.attempts >= self.lockout.challenge_attempts
        {
            return Err(IdentityError::BadChallenge);
        }
        self.store
            .user(&s.username)?
            .ok_or(IdentityError::BadChallenge)
    }

    /// Checks `factor` for `user`: the operations that use it up (a TOTP step, a recovery
    /// code, a passkey's counter), or `None` when it is wrong.
    fn check_factor(
        &self,
        user: &UserRow,
        factor: &Factor<'_>,
    ) -> Result<Option<Vec<Op>>, IdentityError> {
        let now = self.now();
        Ok(match factor {
            Factor::Totp(code) => {
                let seed = self
                    .secrets
                    .open(&totp_aad(&user.username), &user.totp_secret_wrapped)
                    .map_err(|e| IdentityError::Internal(e.to_string()))?;
                let secret = TotpSecret::from_bytes(seed);
                match secret.matching_step(code, now) {
                    Some(step) if step > user.totp_last_step => Some(vec![Op::UseTotpStep {
                        username: user.username.clone(),
                        step,
                    }]),
                    _ => None,
                }
            }
            Factor::Recovery(code) => {
                let id = self.recovery_id(&user.username, code);
                match self.store.credential(RECOVERY, &id)? {
                    Some(c) if c.username == user.username => Some(vec![Op::DeleteCredential {
                        kind: RECOVERY.into(),
                        id,
                        username: user.username.clone(),
                    }]),
                    _ => None,
                }
            }
            Factor::Passkey { id, state } => match self.store.credential(PASSKEY, id)? {
                Some(c) if c.username == user.username => Some(vec![Op::UseCredential {
                    kind: PASSKEY.into(),
                    id: id.clone(),
                    data: state.clone(),
                    at: now,
                }]),
                _ => None,
            },
        })
    }

    /// Second factor against a challenge from [`Identity::begin_login`]. A wrong answer
    /// counts against the challenge (it dies after `challenge_attempts`) and the throttle.
    ///
    /// # Errors
    /// `BadChallenge`, `BadCode`, `Locked`, `Disabled`, `Store`.
    pub fn finish_login(
        &self,
        mfa_token: &Token,
        factor: &Factor<'_>,
        source: Option<&str>,
    ) -> Result<Step<Grant>, Refused> {
        let user = self.challenge_user(mfa_token)?;
        let name = Some(user.username.as_str());
        let attempt = Attempt::new(&self.mac, &user.username, source);
        let rows = self
            .throttled(&attempt, Method::Password)
            .map_err(|e| self.refuse(e, name))?;
        if !self.usable(&user) {
            return Err(self.refuse(IdentityError::Disabled, name));
        }
        let Some(mut ops) = self.check_factor(&user, factor)? else {
            let kill = vec![Op::FailChallenge {
                token_hash: mfa_token.hash(),
                max_attempts: self.lockout.challenge_attempts,
            }];
            return Err(self.failed(&attempt, &rows, IdentityError::BadCode, kill, name));
        };
        ops.insert(
            0,
            Op::ConsumeChallenge {
                token_hash: mfa_token.hash(),
                max_attempts: self.lockout.challenge_attempts,
            },
        );
        ops.extend(attempt.succeed(&rows));
        let method = format!("password+{}", factor.name());
        let grant = self.start_session(&user, method, true, source, &mut ops)?;
        Ok(Step { value: grant, ops })
    }

    /// A passkey as the only factor (where configuration allows passwordless sign-in): the
    /// WebAuthn module verified the assertion for `username`. Answers to the throttle of
    /// the account from this address and of the address, not the account-wide one.
    ///
    /// # Errors
    /// `BadCredentials`, `Locked`, `Store`.
    pub fn passkey_login(
        &self,
        username: &str,
        id: Vec<u8>,
        state: Vec<u8>,
        source: Option<&str>,
    ) -> Result<Step<Grant>, Refused> {
        let attempt = Attempt::new(&self.mac, username, source);
        let rows = self
            .throttled(&attempt, Method::Passkey)
            .map_err(|e| self.refuse(e, None))?;
        let user = self.store.user(username)?;
        let factor = Factor::Passkey { id, state };
        let checked = match &user {
            Some(u) if self.usable(u) => self.check_factor(u, &factor)?,
            _ => None,
        };
        let (Some(user), Some(mut ops)) = (user, checked) else {
            return Err(self.failed(&attempt, &rows, IdentityError::BadCredentials, vec![], None));
        };
        ops.extend(attempt.succeed(&rows));
        let grant = self.start_session(&user, "passkey".into(), true, source, &mut ops)?;
        Ok(Step { value: grant, ops })
    }

    /// A failed passkey assertion (bad signature, replayed counter, unknown credential):
    /// counted like any wrong factor.
    pub fn passkey_failed(
        &self,
        username: &str,
        mfa_token: Option<&Token>,
        source: Option<&str>,
    ) -> Refused {
        let attempt = Attempt::new(&self.mac, username, source);
        let rows = self.store.throttle(&attempt.keys()).unwrap_or_default();
        let kill = mfa_token
            .map(|t| Op::FailChallenge {
                token_hash: t.hash(),
                max_attempts: self.lockout.challenge_attempts,
            })
            .into_iter()
            .collect();
        self.failed(
            &attempt,
            &rows,
            IdentityError::BadCode,
            kill,
            Some(username),
        )
    }

    /// Starts a session for a user who has just proven who they are (a second factor
    /// now, so step-up holds for its window).
    pub(crate) fn start_session(
        &self,
        user: &UserRow,
        method: String,
        second_factor: bool,
        source: Option<&str>,
        ops: &mut Vec<Op>,
    ) -> Result<Grant, IdentityError> {
        let principal = principal_of(user).ok_or(IdentityError::BadChallenge)?;
        let token = Token::generate();
        let now = self.now();
        ops.push(Op::PutSession(SessionRow {
            token_hash: token.hash(),
            kind: "session".into(),
            username: user.username.clone(),
            created: now,
            last_seen: now,
            expires: now + self.policy.absolute_timeout_secs,
            attempts: 0,
            mfa_at: if second_factor { now } else { 0 },
            source: source.unwrap_or("").to_owned(),
            method: method.clone(),
            scope: String::new(),
        }));
        ops.push(Op::RecordLogin {
            username: user.username.clone(),
            at: now,
        });
        Ok(Grant {
            token,
            principal,
            method,
        })
    }

    /// Seconds before a browser session ends by idling (or by its absolute limit, if
    /// sooner), without touching it: what the web console's idle-logoff warning polls, so
    /// polling never keeps a session alive. `None` for an unknown, ended or expired
    /// session, a disabled account, or a token that is not a browser session.
    ///
    /// # Errors
    /// `Store`.
    pub fn session_remaining(&self, token: &Token) -> Result<Option<i64>, IdentityError> {
        let Some(s) = self.store.session(&token.hash())? else {
            return Ok(None);
        };
        let now = self.now();
        let left = (s.last_seen + self.policy.idle_timeout_secs).min(s.expires) - now;
        if s.kind != "session" || left <= 0 {
            return Ok(None);
        }
        match self.store.user(&s.username)? {
            Some(u) if !u.disabled => Ok(Some(left)),
            _ => Ok(None),
        }
    }

    /// Resolves a session token. Returns a touch operation when `last_seen` should move.
    ///
    /// # Errors
    /// `Unauthenticated` for an unknown token or challenge; `Expired` past the idle or
    /// absolute timeout; `Disabled` for a disabled account.
    pub fn authenticate(&self, token: &Token) -> Result<Step<SessionInfo>, IdentityError> {
        let s = self
            .store
            .session(&token.hash())?
            .ok_or(IdentityError::Unauthenticated)?;
        let now = self.now();
        if s.kind == "client" {
            if s.expires <= now {
                return Err(IdentityError::Expired);
            }
            return Ok(Step {
                value: SessionInfo {
                    principal: self.client_principal(&s.username)?,
                    token_hash: s.token_hash,
                    mfa_at: 0,
                    scopes: Some(s.scope),
                    app: None,
                },
                ops: vec![],
            });
        }
        if s.kind == crate::apps::ACCESS_KIND {
            // A SMART app acting for a user: the grant and the app must still exist, and
            // the user be enabled (disabling a user stops their apps at once).
            if s.expires <= now {
                return Err(IdentityError::Expired);
            }
            let (username, app) = self.app_session(&s)?;
            let user = self
                .store
                .user(&username)?
                .ok_or(IdentityError::Unauthenticated)?;
            if user.disabled {
                return Err(IdentityError::Disabled);
            }
            let principal = principal_of(&user).ok_or(IdentityError::Unauthenticated)?;
            return Ok(Step {
                value: SessionInfo {
                    principal,
                    token_hash: s.token_hash,
                    mfa_at: 0,
                    scopes: None,
                    app: Some(app),
                },
                ops: vec![],
            });
        }
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
                token_hash: s.token_hash.clone(),
                last_seen: now,
            }]
        } else {
            vec![]
        };
        Ok(Step {
            value: SessionInfo {
                principal,
                token_hash: s.token_hash,
                mfa_at: s.mfa_at,
                scopes: None,
                app: None,
            },
            ops,
        })
    }

    /// Step-up: a second factor verified inside a live session refreshes its `mfa_at`.
    /// Wrong answers count against the throttle.
    ///
    /// # Errors
    /// `Unauthenticated`, `BadCode`, `Locked`, `Store`.
    pub fn step_up(
        &self,
        session: &SessionInfo,
        factor: &Factor<'_>,
        source: Option<&str>,
    ) -> Result<Step<()>, Refused> {
        let name = session.principal.username.as_str();
        let user = self
            .store
            .user(name)?
            .ok_or(IdentityError::Unauthenticated)?;
        let attempt = Attempt::new(&self.mac, name, source);
        let rows = self
            .throttled(&attempt, Method::Password)
            .map_err(|e| self.refuse(e, Some(name)))?;
        let Some(mut ops) = self.check_factor(&user, factor)? else {
            return Err(self.failed(&attempt, &rows, IdentityError::BadCode, vec![], Some(name)));
        };
        ops.push(Op::StepUp {
            token_hash: session.token_hash.clone(),
            at: self.now(),
        });
        Ok(Step { value: (), ops })
    }

    /// Whether a second factor was verified in `session` within the step-up window.
    pub fn stepped_up(&self, mfa_at: i64) -> bool {
        mfa_at > 0 && self.now() - mfa_at < self.policy.step_up_secs
    }

    pub fn logout(&self, token: &Token) -> Vec<Op> {
        vec![Op::DeleteSession {
            token_hash: token.hash(),
        }]
    }

    pub(crate) fn recovery_id(&self, username: &str, code: &str) -> Vec<u8> {
        let norm: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        self.mac
            .tag(&[b"recovery", username.as_bytes(), norm.as_bytes()])
            .to_vec()
    }

    /// Ten fresh one-time recovery codes (`XXXX-XXXX-XXXX`, 60 bits each) replacing any the
    /// user had; only their MACs are stored. The codes are returned to show once.
    pub(crate) fn recovery_codes(&self, username: &str, ops: &mut Vec<Op>) -> Vec<String> {
        const A: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        ops.push(Op::DeleteCredentials {
            username: username.to_owned(),
            kind: RECOVERY.into(),
        });
        let now = self.now();
        (0..RECOVERY_CODES)
            .map(|_| {
                let mut b = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut b);
                let chars: Vec<char> = b
                    .iter()
                    .map(|x| char::from(*A.get(usize::from(*x) % A.len()).unwrap_or(&b'A')))
                    .collect();
                let code = chars
                    .chunks(4)
                    .map(|c| c.iter().collect::<String>())
                    .collect::<Vec<_>>()
                    .join("-");
                ops.push(Op::PutCredential(CredentialRow {
                    kind: RECOVERY.into(),
                    id: self.recovery_id(username, &code),
                    username: username.to_owned(),
                    name: "recovery code".into(),
                    data: vec![],
                    created: now,
                    last_used: 0,
                }));
                code
            })
            .collect()
    }

    /// New recovery codes for a signed-in user (the old ones stop working).
    pub fn regenerate_recovery_codes(&self, username: &str) -> Step<Vec<String>> {
        let mut ops = vec![];
        let codes = self.recovery_codes(username, &mut ops);
        Step { value: codes, ops }
    }
}
