//! Account lifecycle: password change, disable and enable, unlock, MFA reset, role
//! change, dormant accounts; sessions listed and ended. Every change that alters who
//! may act as the account ends all of its sessions at once.

use medvault_store::{Op, UserRow};
use medvault_types::Role;
use serde::Serialize;

use crate::login::{PASSKEY, RECOVERY};
use crate::throttle::{subject, Attempt, Method};
use crate::{Identity, IdentityError, Password, Principal, Refused, Step, TotpSecret};

/// One account as a security administrator sees it (no secrets).
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub username: String,
    pub role: String,
    pub disabled: bool,
    pub created: String,
    /// Unix seconds of the last completed sign-in, if any.
    pub last_login: Option<i64>,
    pub passkeys: usize,
    pub recovery_codes: usize,
    /// Seconds the account's password sign-in is locked for, from any address.
    pub locked_for: i64,
    /// The user's FHIR Practitioner (clinicians).
    pub practitioner_id: Option<String>,
    /// Whether the user's required training is current (PHI access depends on it).
    pub training_current: bool,
    /// Whether a second factor is in use: a passkey, or a TOTP code accepted since the
    /// seed was last set (an MFA reset leaves the account without one until then).
    #[serde(default)]
    pub mfa_confirmed: bool,
}

/// One session as its owner sees it: `id` is a public handle (not the token).
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: String,
    pub created: i64,
    pub last_seen: i64,
    pub expires: i64,
    pub source: String,
    pub method: String,
    pub current: bool,
}

/// A second-factor enrollment to hand to the user once (after an MFA reset).
#[derive(Debug)]
pub struct Enrollment {
    pub totp: TotpSecret,
    pub recovery_codes: Vec<String>,
}

fn session_id(token_hash: &[u8]) -> String {
    token_hash
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Identity {
    fn user_row(&self, username: &str) -> Result<UserRow, IdentityError> {
        self.store.user(username)?.ok_or(IdentityError::NoSuchUser)
    }

    /// Whether an account has gone unused past `dormant_after_days` (since its last
    /// sign-in, or its creation if it never signed in).
    pub fn is_dormant(&self, user: &UserRow) -> bool {
        let days = self.policy.dormant_after_days;
        if days <= 0 {
            return false;
        }
        let since = if user.last_login > 0 {
            user.last_login
        } else {
            time::OffsetDateTime::parse(
                &user.created,
                &time::format_description::well_known::Rfc3339,
            )
            .map(|t| t.unix_timestamp())
            .unwrap_or(self.now())
        };
        self.now() - since > days.saturating_mul(86_400)
    }

    /// Enabled accounts that are dormant: to be disabled (and audited) by the gate.
    ///
    /// # Errors
    /// `Store`.
    pub fn dormant_accounts(&self) -> Result<Vec<String>, IdentityError> {
        Ok(self
            .store
            .users()?
            .into_iter()
            .filter(|u| !u.disabled && self.is_dormant(u))
            .map(|u| u.username)
            .collect())
    }

    /// Every account, for the users API.
    ///
    /// # Errors
    /// `Store`.
    pub fn accounts(&self) -> Result<Vec<AccountView>, IdentityError> {
        let now = self.now();
        self.store
            .users()?
            .into_iter()
            .map(|u| {
                let attempt = Attempt::new(&self.mac, &u.username, None);
                let rows = self.store.throttle(&attempt.keys())?;
                let passkeys = self.store.credentials(&u.username, PASSKEY)?.len();
                Ok(AccountView {
                    mfa_confirmed: passkeys > 0 || u.totp_last_step > 0,
                    passkeys,
                    recovery_codes: self.store.credentials(&u.username, RECOVERY)?.len(),
                    locked_for: attempt.account_retry_after(&self.lockout, &rows, now),
                    last_login: (u.last_login > 0).then_some(u.last_login),
                    username: u.username,
                    role: u.role,
                    disabled: u.disabled,
                    created: u.created,
                    practitioner_id: u.practitioner_id,
                    training_current: u.training_current,
                })
            })
            .collect()
    }

    /// Disables or enables an account; disabling ends every session at once.
    ///
    /// # Errors
    /// `NoSuchUser`.
    pub fn set_disabled(&self, username: &str, disabled: bool) -> Result<Vec<Op>, IdentityError> {
        let user = self.user_row(username)?;
        let mut ops = vec![Op::SetDisabled {
            username: user.username.clone(),
            disabled,
        }];
        if disabled {
            ops.push(Op::RevokeSessions {
                username: user.username,
            });
        } else {
            // Enabling a dormant account starts its clock again.
            ops.push(Op::RecordLogin {
                username: user.username,
                at: self.now(),
            });
        }
        Ok(ops)
    }

    /// Clears every failure counter of an account (from every address).
    ///
    /// # Errors
    /// `NoSuchUser`.
    pub fn unlock(&self, username: &str) -> Result<Vec<Op>, IdentityError> {
        let user = self.user_row(username)?;
        Ok(vec![Op::ClearSubjectFailures {
            subject: subject(&self.mac, &user.username),
        }])
    }

    /// Changes a user's role; ends every session (they were granted under the old one).
    ///
    /// # Errors
    /// `NoSuchUser`.
    pub fn set_role(&self, username: &str, role: Role) -> Result<Vec<Op>, IdentityError> {
        let mut user = self.user_row(username)?;
        user.role = role.as_str().to_owned();
        let name = user.username.clone();
        Ok(vec![
            Op::PutUser(user),
            Op::RevokeSessions { username: name },
        ])
    }

    /// Records whether a user's required security training is current (the training gate:
    /// when false, PHI access is denied except under break-the-glass).
    ///
    /// # Errors
    /// `NoSuchUser`.
    pub fn set_training(&self, username: &str, current: bool) -> Result<Vec<Op>, IdentityError> {
        let user = self.user_row(username)?;
        Ok(vec![Op::SetTraining {
            username: user.username,
            current,
        }])
    }

    /// MFA reset (a lost phone): a new TOTP seed and recovery codes, every passkey
    /// revoked, every session ended. The enrollment is handed to the user once.
    ///
    /// # Errors
    /// `NoSuchUser`.
    pub fn reset_mfa(&self, username: &str) -> Result<Step<Enrollment>, IdentityError> {
        let user = self.user_row(username)?;
        let totp = TotpSecret::generate();
        let mut ops = vec![
            Op::SetTotpSecret {
                username: user.username.clone(),
                wrapped: self.seal_totp(&user.username, &totp)?,
            },
            Op::DeleteCredentials {
                username: user.username.clone(),
                kind: PASSKEY.into(),
            },
            Op::RevokeSessions {
                username: user.username.clone(),
            },
        ];
        let recovery_codes = self.recovery_codes(&user.username, &mut ops);
        Ok(Step {
            value: Enrollment {
                totp,
                recovery_codes,
            },
            ops,
        })
    }

    /// A user's own new TOTP seed (their passkeys, recovery codes and sessions stay): the
    /// enrollment to show them once. The gate requires a fresh step-up first.
    ///
    /// # Errors
    /// `Unauthenticated` for an unknown user; `Store`.
    pub fn reset_totp(&self, username: &str) -> Result<Step<TotpSecret>, IdentityError> {
        let user = self.user_row(username)?;
        let totp = TotpSecret::generate();
        let ops = vec![Op::SetTotpSecret {
            username: user.username.clone(),
            wrapped: self.seal_totp(&user.username, &totp)?,
        }];
        Ok(Step { value: totp, ops })
    }

    /// `POST /auth/password`: the current password (a wrong one counts against the
    /// throttle), then the new one by the password rules; ends every session.
    ///
    /// # Errors
    /// `BadCredentials`, `Locked`, `WeakPassword`, `Store`.
    pub fn change_password(
        &self,
        who: &Principal,
        current: &Password,
        new: &Password,
        source: Option<&str>,
    ) -> Result<Step<()>, Refused> {
        let name = who.username.as_str();
        let user = self.user_row(name)?;
        let attempt = Attempt::new(&self.mac, name, source);
        let rows = self.store.throttle(&attempt.keys())?;
        let wait = attempt.retry_after(&self.lockout, Method::Password, &rows, self.now());
        if wait > 0 {
            return Err(IdentityError::Locked { retry_after: wait }.into());
        }
        if !self.hasher.verify(&user.password_hash, current) {
            let (ops, locks) = attempt.fail(&self.lockout, &rows, self.now());
            return Err(Refused {
                error: IdentityError::BadCredentials,
                ops,
                locks,
                username: Some(name.to_owned()),
            });
        }
        Self::check_password_strength(new, Some(name))?;
        if self.hasher.verify(&user.password_hash, new) {
            return Err(IdentityError::WeakPassword("different from the current one").into());
        }
        Ok(Step {
            value: (),
            ops: vec![
                Op::SetPasswordHash {
                    username: user.username.clone(),
                    hash: self.hasher.hash(new)?,
                },
                Op::RevokeSessions {
                    username: user.username,
                },
            ],
        })
    }

    /// The sessions of a user, newest first; `current` marks the caller's own.
    ///
    /// # Errors
    /// `Store`.
    pub fn sessions(
        &self,
        username: &str,
        current: &[u8],
    ) -> Result<Vec<SessionView>, IdentityError> {
        let now = self.now();
        Ok(self
            .store
            .sessions_of(username)?
            .into_iter()
            .filter(|s| {
                s.kind == "session"
                    && s.expires > now
                    && s.last_seen + self.policy.idle_timeout_secs > now
            })
            .map(|s| SessionView {
                id: session_id(&s.token_hash),
                current: s.token_hash == current,
                created: s.created,
                last_seen: s.last_seen,
                expires: s.expires.min(s.last_seen + self.policy.idle_timeout_secs),
                source: s.source,
                method: s.method,
            })
            .collect())
    }

    /// Ends one of a user's own sessions by its public id.
    ///
    /// # Errors
    /// `NoSuchSession` when the user has no session with that id.
    pub fn end_session(&self, username: &str, id: &str) -> Result<Vec<Op>, IdentityError> {
        let s = self
            .store
            .sessions_of(username)?
            .into_iter()
            .find(|s| s.kind == "session" && session_id(&s.token_hash) == id)
            .ok_or(IdentityError::NoSuchSession)?;
        Ok(vec![Op::DeleteSession {
            token_hash: s.token_hash,
        }])
    }
}
