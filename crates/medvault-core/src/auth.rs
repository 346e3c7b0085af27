//! Authentication and user administration through the gate: every event is committed
//! together with its audit record.

use medvault_fhir::Resource;
use medvault_identity::{IdentityError, Password, Principal, Token};
use medvault_types::{Operation, Purpose, Role, Username};
use serde_json::json;

use crate::write::Plan;
use crate::{Caller, Outcome, Vault, VaultError};

/// First-factor success: the challenge for the second factor.
#[derive(Debug)]
pub struct LoginChallenge {
    pub mfa_token: Token,
    pub methods: Vec<&'static str>,
}

/// A live session.
#[derive(Debug)]
pub struct SessionGrant {
    pub token: Token,
    pub principal: Principal,
    pub expires_in: i64,
}

/// A new user's one-time secrets, to show once.
#[derive(Debug)]
pub struct NewUserInfo {
    pub username: Username,
    pub role: Role,
    pub password: Password,
    pub totp_secret: String,
    pub totp_uri: String,
    pub practitioner_id: Option<String>,
}

fn id_err(e: IdentityError) -> VaultError {
    match e {
        IdentityError::Store(s) => s.into(),
        IdentityError::Internal(m) => VaultError::Internal(m),
        IdentityError::WeakPassword | IdentityError::UserExists => {
            VaultError::BadRequest(e.to_string())
        }
        other => VaultError::Identity(other.to_string()),
    }
}

impl Vault {
    /// A record of a sign-in step by a caller not yet signed in, naming whom they claim
    /// to be.
    fn sign_in_record(
        &self,
        c: &Caller,
        action: &str,
        actor: &str,
        outcome: Outcome,
    ) -> crate::AuditRecord {
        let mut r =
            crate::AuditRecord::new(action, actor, outcome, self.now_instant(), &c.request_id);
        r.source = c.source.clone();
        r
    }

    /// `POST /auth/login`: password, for a caller not yet signed in
    /// ([`Caller::anonymous`]). Same error for unknown users and wrong passwords.
    pub fn login(
        &self,
        c: &Caller,
        username: &str,
        password: &Password,
    ) -> Result<LoginChallenge, VaultError> {
        let known = Username::new(username)
            .ok()
            .map(|u| self.store.user(u.as_str()))
            .transpose()?
            .flatten()
            .is_some();
        let actor = if known { username } else { "(unknown user)" };
        match self.identity.begin_login(username, password) {
            Ok(step) => {
                let mut rec = self.sign_in_record(c, "login", actor, Outcome::Success);
                rec.role = Some(step.value.1.role.as_str().to_owned());
                rec.detail = Some("password accepted; second factor required".into());
                self.commit(step.ops, vec![rec])?;
                Ok(LoginChallenge {
                    mfa_token: step.value.0,
                    methods: vec!["totp"],
                })
            }
            Err(step) => {
                if let IdentityError::Store(e) = step.value {
                    return Err(e.into());
                }
                let mut rec = self.sign_in_record(c, "login", actor, Outcome::Failure);
                rec.detail = Some("invalid credentials".into());
                self.commit(step.ops, vec![rec])?;
                Err(VaultError::Unauthenticated)
            }
        }
    }

    /// `POST /auth/mfa/totp`: second factor; returns the session.
    pub fn login_totp(
        &self,
        c: &Caller,
        mfa_token: &Token,
        code: &str,
    ) -> Result<SessionGrant, VaultError> {
        match self.identity.finish_totp(mfa_token, code) {
            Ok(step) => {
                let (token, principal) = step.value;
                let mut rec =
                    self.sign_in_record(c, "mfa", principal.username.as_str(), Outcome::Success);
                rec.role = Some(principal.role.as_str().to_owned());
                rec.detail = Some("totp; session started".into());
                match self.commit(step.ops, vec![rec]) {
                    Ok(_) => {}
                    // The TOTP step was used concurrently: a replay.
                    Err(VaultError::Conflict) => return Err(VaultError::Unauthenticated),
                    Err(e) => return Err(e),
                }
                Ok(SessionGrant {
                    token,
                    principal,
                    expires_in: self.identity.session_policy().idle_timeout_secs,
                })
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(e) => {
                let actor = self
                    .identity
                    .challenge_user(mfa_token)
                    .map(|p| p.username.to_string())
                    .unwrap_or_else(|_| "(unknown user)".into());
                let mut rec = self.sign_in_record(c, "mfa", &actor, Outcome::Failure);
                rec.detail = Some(e.to_string());
                self.commit(vec![], vec![rec])?;
                Err(VaultError::Unauthenticated)
            }
        }
    }

    /// Turns a caller not yet signed in ([`Caller::anonymous`], carrying the request's
    /// source and id) and the bearer token or session cookie it presented into the signed-in
    /// caller, with its declared purpose of use (else the role's default).
    ///
    /// # Errors
    /// `Unauthenticated` for an unknown, expired or idle session.
    pub fn authenticate(
        &self,
        c: &Caller,
        token: &Token,
        purpose: Option<Purpose>,
    ) -> Result<Caller, VaultError> {
        match self.identity.authenticate(token) {
            Ok(step) => {
                if !step.ops.is_empty() {
                    self.commit(step.ops, vec![])?;
                }
                Ok(Caller::new(
                    step.value,
                    purpose,
                    c.source.clone(),
                    c.request_id.clone(),
                ))
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(_) => Err(VaultError::Unauthenticated),
        }
    }

    /// `POST /auth/logout`.
    pub fn logout(&self, c: &Caller, token: &Token) -> Result<(), VaultError> {
        let rec = self.record(c, "logout", Outcome::Success);
        self.commit(self.identity.logout(token), vec![rec])?;
        Ok(())
    }

    /// Adds a staff user (and, for clinical roles, their FHIR Practitioner).
    pub fn add_user(
        &self,
        c: &Caller,
        username: &str,
        role: Role,
        password: Option<Password>,
    ) -> Result<NewUserInfo, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::CreateUser, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if !role.is_staff() {
            return Err(VaultError::BadRequest(format!(
                "role `{role}` cannot be given to a user"
            )));
        }
        let name = Username::new(username).map_err(|e| VaultError::BadRequest(e.to_string()))?;
        let mut plan = Plan::default();
        let practitioner_id = if matches!(role, Role::Physician | Role::Nurse) {
            let body = json!({
                "resourceType": "Practitioner",
                "active": true,
                "identifier": [{"system": "https://medvault.dev/sid/username", "value": name.as_str()}],
                "name": [{"text": name.as_str()}],
            });
            let res = Resource::from_value(body, None)?;
            let id = medvault_types::random_uuid();
            let (w, _) =
                self.plan_put(c, &mut plan, res, id, None, medvault_store::Expect::Absent)?;
            Some(w.id)
        } else {
            None
        };
        let step = self
            .identity
            .new_user(name, role, password, practitioner_id.clone())
            .map_err(id_err)?;
        rec.detail = Some(format!("target={} role={role}", step.value.username));
        plan.ops.extend(step.ops);
        plan.audit.push(rec);
        self.commit_plan(plan)?;
        let u = step.value;
        Ok(NewUserInfo {
            totp_secret: u.totp.base32(),
            totp_uri: u.totp.uri("medvault", u.username.as_str()),
            username: u.username,
            role: u.role,
            password: u.password,
            practitioner_id,
        })
    }
}

/// Checks a chosen password against the password rules (at least 12 characters, not on
/// the common-password list), before anything is created with it.
///
/// # Errors
/// `BadRequest` saying which rule it breaks.
pub fn check_password(p: &Password) -> Result<(), VaultError> {
    medvault_identity::Identity::check_password_strength(p).map_err(id_err)
}
