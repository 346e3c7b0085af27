//! Authentication and user administration through the gate: every event is committed
//! together with its audit record.

use medvault_fhir::Resource;
use medvault_identity::{
    AccountView, Factor, IdentityError, PasskeyView, Password, Principal, Refused, SessionView,
    Token,
};
use medvault_store::Op;
use medvault_types::{Operation, Purpose, Role, Username};
use serde_json::json;

use crate::caller::Assurance;
use crate::write::Plan;
use crate::{Caller, Outcome, Vault, VaultError};

fn factor_name(f: &Factor<'_>) -> &'static str {
    match f {
        Factor::Totp(_) => "totp",
        Factor::Recovery(_) => "recovery code",
        Factor::Passkey { .. } => "passkey",
    }
}

/// A second-factor enrollment to show once (after an MFA reset).
#[derive(Debug)]
pub struct EnrollmentInfo {
    pub totp_secret: String,
    pub totp_uri: String,
    pub recovery_codes: Vec<String>,
}

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
    pub recovery_codes: Vec<String>,
    pub practitioner_id: Option<String>,
}

pub(crate) fn id_err(e: IdentityError) -> VaultError {
    match e {
        IdentityError::Store(s) => s.into(),
        IdentityError::Internal(m) => VaultError::Internal(m),
        IdentityError::Locked { retry_after } => VaultError::Locked { retry_after },
        IdentityError::WeakPassword(_)
        | IdentityError::UserExists
        | IdentityError::BadScope(_)
        | IdentityError::BadClient(_) => VaultError::BadRequest(e.to_string()),
        IdentityError::NoSuchUser | IdentityError::NoSuchSession => VaultError::NotFound,
        other => VaultError::Identity(other.to_string()),
    }
}

/// A WebAuthn ceremony that cannot begin (dead challenge, no passkey): one answer for all,
/// so a caller learns nothing about the account.
fn ceremony_err(e: IdentityError) -> VaultError {
    match e {
        IdentityError::Store(s) => s.into(),
        IdentityError::Internal(m) => VaultError::Internal(m),
        _ => VaultError::Unauthenticated,
    }
}

/// Actor recorded for a sign-in attempt naming no existing account.
pub(crate) const UNKNOWN_USER: &str = "(unknown user)";

impl Vault {
    /// A record of a sign-in step by a caller not yet signed in, naming whom they claim
    /// to be.
    pub(crate) fn sign_in_record(
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

    /// Commits a refused identity step — its counters and dying challenge, a record of
    /// the failure and one of each lock it started — and maps its error. The failure's
    /// record says why only in words a privacy officer may read (never the secret given).
    fn refused(&self, c: &Caller, action: &str, r: Refused) -> VaultError {
        if let IdentityError::Store(e) = r.error {
            return e.into();
        }
        let actor = r.username.as_deref().unwrap_or(UNKNOWN_USER);
        let mut rec = self.sign_in_record(c, action, actor, Outcome::Failure);
        rec.detail = Some(r.error.to_string());
        let mut recs = vec![rec];
        for lock in &r.locks {
            let mut l = self.sign_in_record(c, "lockout", actor, Outcome::Failure);
            l.detail = Some(format!(
                "{} locked for {} s after {} failures",
                lock.scope, lock.seconds, lock.failures
            ));
            recs.push(l);
        }
        if let Err(e) = self.commit(r.ops, recs) {
            return crate::audit_failed(e);
        }
        match r.error {
            IdentityError::Locked { retry_after } => VaultError::Locked { retry_after },
            IdentityError::WeakPassword(_) => VaultError::BadRequest(r.error.to_string()),
            _ => VaultError::Unauthenticated,
        }
    }

    /// `POST /auth/login`: password, for a caller not yet signed in
    /// ([`Caller::anonymous`]). Same answer and work for unknown users, wrong passwords
    /// and disabled accounts; `Locked` (HTTP 429) while the throttle holds, whatever the
    /// password.
    ///
    /// # Errors
    /// `Unauthenticated`, `Locked`, `AuditUnavailable`.
    pub fn login(
        &self,
        c: &Caller,
        username: &str,
        password: &Password,
    ) -> Result<LoginChallenge, VaultError> {
        match self
            .identity
            .begin_login(username, password, c.source.as_deref())
        {
            Ok(step) => {
                let ch = step.value;
                let mut rec = self.sign_in_record(
                    c,
                    "login",
                    ch.principal.username.as_str(),
                    Outcome::Success,
                );
                rec.role = Some(ch.principal.role.as_str().to_owned());
                rec.detail = Some("password accepted; second factor required".into());
                self.commit(step.ops, vec![rec])?;
                Ok(LoginChallenge {
                    mfa_token: ch.mfa_token,
                    methods: ch.methods,
                })
            }
            Err(r) => Err(self.refused(c, "login", r)),
        }
    }

    /// `POST /auth/mfa/totp`, `/auth/mfa/recovery`: the second factor; returns the
    /// session. Wrong answers count against the challenge (three, then back to the
    /// password) and the throttle.
    ///
    /// # Errors
    /// `Unauthenticated`, `Locked`, `AuditUnavailable`.
    pub fn login_factor(
        &self,
        c: &Caller,
        mfa_token: &Token,
        factor: &Factor<'_>,
    ) -> Result<SessionGrant, VaultError> {
        match self
            .identity
            .finish_login(mfa_token, factor, c.source.as_deref())
        {
            Ok(step) => self.grant(c, step),
            Err(r) => Err(self.refused(c, "mfa", r)),
        }
    }

    /// Commits a new session with its audit record.
    pub(crate) fn grant(
        &self,
        c: &Caller,
        step: medvault_identity::Step<medvault_identity::Grant>,
    ) -> Result<SessionGrant, VaultError> {
        let g = step.value;
        let mut rec =
            self.sign_in_record(c, "mfa", g.principal.username.as_str(), Outcome::Success);
        rec.role = Some(g.principal.role.as_str().to_owned());
        rec.detail = Some(format!("{}; session started", g.method));
        match self.commit(step.ops, vec![rec]) {
            Ok(_) => {}
            // The factor or the challenge was used concurrently: a replay.
            Err(VaultError::Conflict) => return Err(VaultError::Unauthenticated),
            Err(e) => return Err(e),
        }
        Ok(SessionGrant {
            token: g.token,
            principal: g.principal,
            expires_in: self.identity.session_policy().idle_timeout_secs,
        })
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
                let caller = Caller::from_session(
                    step.value,
                    purpose,
                    c.source.clone(),
                    c.request_id.clone(),
                );
                // A declared purpose the role may use for nothing is refused outright, naming
                // the ones it may declare (minimum necessary starts with an honest purpose).
                if purpose.is_some() {
                    let allowed = self.purposes_of(&caller);
                    if !allowed.contains(&caller.purpose) {
                        return Err(VaultError::PurposeNotAllowed {
                            declared: caller.purpose,
                            allowed,
                        });
                    }
                }
                Ok(caller)
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(_) => Err(VaultError::Unauthenticated),
        }
    }

    /// Seconds before the browser session `token` ends by idling, without touching it
    /// (the web console's idle-logoff warning polls this); `None` once it has ended, been
    /// ended by its user or an administrator, or its account was disabled. Not audited:
    /// it reveals nothing but the caller's own session clock.
    ///
    /// # Errors
    /// `Unavailable`/`Internal` when the store fails.
    pub fn session_remaining(&self, token: &Token) -> Result<Option<i64>, VaultError> {
        self.identity.session_remaining(token).map_err(id_err)
    }

    /// The names of the configured OpenID providers (`[[oidc]]`), for sign-in buttons.
    pub fn oidc_provider_names(&self) -> Vec<String> {
        self.identity.oidc_provider_names()
    }

    /// Whether `c` may do a step-up action now: the local operator always; a session
    /// whose second factor was verified within the step-up window.
    pub(crate) fn stepped_up(&self, c: &Caller) -> bool {
        match c.assurance() {
            Assurance::Local => true,
            Assurance::Session { mfa_at, .. } => self.identity.stepped_up(*mfa_at),
            Assurance::None | Assurance::Client(_) | Assurance::App(_) => false,
        }
    }

    /// `POST /auth/step-up/totp` (or a passkey): verifies a second factor inside the
    /// caller's session, so step-up actions are allowed for the next five minutes.
    ///
    /// # Errors
    /// `Unauthenticated` (wrong code, no session), `Locked`, `AuditUnavailable`.
    pub fn step_up(&self, c: &Caller, factor: &Factor<'_>) -> Result<(), VaultError> {
        let Some(session) = self.session_of(c) else {
            return Err(VaultError::Unauthenticated);
        };
        match self.identity.step_up(&session, factor, c.source.as_deref()) {
            Ok(step) => {
                let mut rec = self.record(c, "step-up", Outcome::Success);
                rec.detail = Some(format!("{} verified", factor_name(factor)));
                self.commit(step.ops, vec![rec])?;
                Ok(())
            }
            Err(r) => Err(self.refused(c, "step-up", r)),
        }
    }

    fn session_of(&self, c: &Caller) -> Option<medvault_identity::SessionInfo> {
        match (c.assurance(), c.principal()) {
            (Assurance::Session { token_hash, mfa_at }, Some(p)) => {
                Some(medvault_identity::SessionInfo {
                    principal: p.clone(),
                    token_hash: token_hash.clone(),
                    mfa_at: *mfa_at,
                    scopes: None,
                    app: None,
                })
            }
            _ => None,
        }
    }

    /// `POST /auth/logout`.
    pub fn logout(&self, c: &Caller, token: &Token) -> Result<(), VaultError> {
        let rec = self.record(c, "logout", Outcome::Success);
        self.commit(self.identity.logout(token), vec![rec])?;
        Ok(())
    }

    /// `GET /auth/sessions`: the caller's own live sessions.
    ///
    /// # Errors
    /// `Unauthenticated` without a session.
    pub fn sessions(&self, c: &Caller) -> Result<Vec<SessionView>, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        self.identity
            .sessions(s.principal.username.as_str(), &s.token_hash)
            .map_err(id_err)
    }

    /// `DELETE /auth/sessions/{id}`: ends one of the caller's own sessions.
    ///
    /// # Errors
    /// `NotFound` for an id that is not one of the caller's sessions.
    pub fn end_session(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        let ops = self
            .identity
            .end_session(s.principal.username.as_str(), id)
            .map_err(id_err)?;
        let mut rec = self.record(c, "logout", Outcome::Success);
        rec.detail = Some("session ended from the session list".into());
        self.commit(ops, vec![rec])?;
        Ok(())
    }

    /// "My account": the caller replaces their own TOTP seed (a new phone). Needs a
    /// second factor verified within the step-up window (the old code, a passkey or a
    /// recovery code), so a borrowed session cannot move the factor to another device.
    /// Returns the new enrollment, shown once.
    ///
    /// # Errors
    /// `Unauthenticated` without a session, `StepUpRequired`, `AuditUnavailable`.
    pub fn reset_own_totp(&self, c: &Caller) -> Result<EnrollmentInfo, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        let name = s.principal.username.as_str();
        let step = self.identity.reset_totp(name).map_err(id_err)?;
        let mut rec = self.record(c, "totp.reset", Outcome::Success);
        rec.detail = Some("authenticator app re-enrolled by its user".into());
        self.commit(step.ops, vec![rec])?;
        Ok(EnrollmentInfo {
            totp_secret: step.value.base32(),
            totp_uri: step.value.uri("medvault", name),
            recovery_codes: vec![],
        })
    }

    /// `POST /auth/password`: the current password, then a new one by the password
    /// rules; every session of the account ends (sign in again).
    ///
    /// # Errors
    /// `Unauthenticated` (wrong current password), `Locked`, `BadRequest` (weak password).
    pub fn change_password(
        &self,
        c: &Caller,
        current: &Password,
        new: &Password,
    ) -> Result<(), VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        match self
            .identity
            .change_password(&s.principal, current, new, c.source.as_deref())
        {
            Ok(step) => {
                let mut rec = self.record(c, "password.change", Outcome::Success);
                rec.detail = Some("password changed; every session ended".into());
                self.commit(step.ops, vec![rec])?;
                Ok(())
            }
            Err(r) => Err(self.refused(c, "password.change", r)),
        }
    }

    /// `POST /auth/recovery-codes` (step-up): ten new one-time recovery codes, shown once;
    /// the old ones stop working.
    ///
    /// # Errors
    /// `StepUpRequired`, `Unauthenticated`.
    pub fn new_recovery_codes(&self, c: &Caller) -> Result<Vec<String>, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        let step = self
            .identity
            .regenerate_recovery_codes(s.principal.username.as_str());
        let mut rec = self.record(c, "recovery-codes", Outcome::Success);
        rec.detail = Some("recovery codes replaced".into());
        self.commit(step.ops, vec![rec])?;
        Ok(step.value)
    }

    /// Sets the WebAuthn relying party from the URL clients reach the server at (the
    /// server calls it once it knows its address).
    ///
    /// # Errors
    /// `BadRequest` for a URL that cannot name a relying party.
    pub fn set_relying_party(&self, public_url: &str) -> Result<(), VaultError> {
        self.identity
            .set_relying_party(public_url)
            .map_err(|e| VaultError::BadRequest(e.to_string()))
    }

    /// `POST /auth/webauthn/register/start` (step-up): creation options for a new passkey.
    ///
    /// # Errors
    /// `Unauthenticated`, `StepUpRequired`.
    pub fn passkey_registration_start(&self, c: &Caller) -> Result<serde_json::Value, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        let step = self
            .identity
            .passkey_registration_start(&s)
            .map_err(id_err)?;
        self.commit(step.ops, vec![])?;
        Ok(step.value)
    }

    /// `POST /auth/webauthn/register/finish`: stores the new passkey (audited); returns
    /// its id.
    ///
    /// # Errors
    /// `Unauthenticated`; `BadRequest` when the authenticator's answer does not verify.
    pub fn passkey_registration_finish(
        &self,
        c: &Caller,
        name: &str,
        credential: serde_json::Value,
    ) -> Result<String, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        let step = self
            .identity
            .passkey_registration_finish(&s, name, credential)
            .map_err(|e| match e {
                IdentityError::BadCode => VaultError::BadRequest(
                    "the passkey registration did not verify (origin, challenge or user verification), or none is in progress".into(),
                ),
                other => id_err(other),
            })?;
        let mut rec = self.record(c, "passkey.add", Outcome::Success);
        rec.detail = Some(format!("passkey {} registered", step.value));
        match self.commit(step.ops, vec![rec]) {
            Err(VaultError::Conflict) => Err(VaultError::BadRequest(
                "this registration was already finished".into(),
            )),
            other => other.map(|_| step.value),
        }
    }

    /// `POST /auth/webauthn/login/start {"mfa_token"}`: request options for the user's
    /// passkeys.
    ///
    /// # Errors
    /// `Unauthenticated` for a dead challenge or a user without passkeys.
    pub fn passkey_login_start(
        &self,
        _c: &Caller,
        mfa_token: &Token,
    ) -> Result<serde_json::Value, VaultError> {
        let step = self
            .identity
            .passkey_login_start(mfa_token)
            .map_err(ceremony_err)?;
        self.commit(step.ops, vec![])?;
        Ok(step.value)
    }

    /// `POST /auth/webauthn/login/finish {"mfa_token","credential"}`: the passkey as the
    /// second factor; returns the session.
    ///
    /// # Errors
    /// `Unauthenticated`, `Locked`, `AuditUnavailable`.
    pub fn passkey_login_finish(
        &self,
        c: &Caller,
        mfa_token: &Token,
        credential: serde_json::Value,
    ) -> Result<SessionGrant, VaultError> {
        match self
            .identity
            .passkey_login_finish(mfa_token, credential, c.source.as_deref())
        {
            Ok(step) => self.grant(c, step),
            Err(r) => Err(self.refused(c, "mfa", r)),
        }
    }

    /// `POST /auth/webauthn/passwordless/start {"username"}` (when `session.passwordless`
    /// is on): request options and a ceremony handle; the same answer whether or not the
    /// account exists or has passkeys.
    ///
    /// # Errors
    /// `NotFound` when passwordless sign-in is off.
    pub fn passwordless_start(
        &self,
        _c: &Caller,
        username: &str,
    ) -> Result<serde_json::Value, VaultError> {
        if !self.identity.session_policy().passwordless {
            return Err(VaultError::NotFound);
        }
        let step = self.identity.passwordless_start(username).map_err(id_err)?;
        if !step.ops.is_empty() {
            self.commit(step.ops, vec![])?;
        }
        Ok(step.value)
    }

    /// `POST /auth/webauthn/passwordless/finish {"username","ceremony","credential"}`:
    /// the session.
    ///
    /// # Errors
    /// `NotFound` when off; `Unauthenticated`, `Locked`.
    pub fn passwordless_finish(
        &self,
        c: &Caller,
        username: &str,
        ceremony: &str,
        credential: serde_json::Value,
    ) -> Result<SessionGrant, VaultError> {
        if !self.identity.session_policy().passwordless {
            return Err(VaultError::NotFound);
        }
        match self
            .identity
            .passwordless_finish(username, ceremony, credential, c.source.as_deref())
        {
            Ok(step) => self.grant(c, step),
            Err(r) => Err(self.refused(c, "login", r)),
        }
    }

    /// `POST /auth/step-up/webauthn/start`: request options to step up with a passkey.
    ///
    /// # Errors
    /// `Unauthenticated` without a session or without passkeys.
    pub fn passkey_step_up_start(&self, c: &Caller) -> Result<serde_json::Value, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        let step = self
            .identity
            .passkey_step_up_start(&s)
            .map_err(ceremony_err)?;
        self.commit(step.ops, vec![])?;
        Ok(step.value)
    }

    /// `POST /auth/step-up/webauthn/finish {"credential"}`: step-up with a passkey.
    ///
    /// # Errors
    /// `Unauthenticated` (assertion refused), `Locked`.
    pub fn passkey_step_up_finish(
        &self,
        c: &Caller,
        credential: serde_json::Value,
    ) -> Result<(), VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        match self
            .identity
            .passkey_step_up_finish(&s, credential, c.source.as_deref())
        {
            Ok(step) => {
                let mut rec = self.record(c, "step-up", Outcome::Success);
                rec.detail = Some("passkey verified".into());
                match self.commit(step.ops, vec![rec]) {
                    Err(VaultError::Conflict) => Err(VaultError::Unauthenticated),
                    other => other.map(|_| ()),
                }
            }
            Err(r) => Err(self.refused(c, "step-up", r)),
        }
    }

    /// `GET /auth/webauthn/credentials`: the caller's passkeys.
    ///
    /// # Errors
    /// `Unauthenticated`.
    pub fn passkeys(&self, c: &Caller) -> Result<Vec<PasskeyView>, VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        self.identity
            .passkeys(s.principal.username.as_str())
            .map_err(id_err)
    }

    /// `DELETE /auth/webauthn/credentials/{id}` (step-up): revokes one of the caller's
    /// passkeys.
    ///
    /// # Errors
    /// `Unauthenticated`, `StepUpRequired`, `NotFound`.
    pub fn revoke_passkey(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let s = self.session_of(c).ok_or(VaultError::Unauthenticated)?;
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        let ops = self
            .identity
            .revoke_passkey(s.principal.username.as_str(), id)
            .map_err(id_err)?;
        let mut rec = self.record(c, "passkey.revoke", Outcome::Success);
        rec.detail = Some(format!("passkey {id} revoked"));
        self.commit(ops, vec![rec])?;
        Ok(())
    }

    /// Sets the OpenID providers of `[[oidc]]` (the binary calls it once at start).
    pub fn set_oidc_providers(&self, providers: Vec<medvault_identity::OidcProvider>) {
        self.identity.set_oidc_providers(providers);
    }

    /// `GET /auth/oidc/{name}/start`: where to send the browser (the IdP's authorization
    /// URL with state, nonce and PKCE challenge).
    ///
    /// # Errors
    /// `NotFound` for an unknown provider; `Unavailable` when the IdP cannot be reached.
    pub fn oidc_start(&self, _c: &Caller, name: &str) -> Result<String, VaultError> {
        let step = self.identity.oidc_start(name).map_err(|e| match e {
            IdentityError::NoSuchProvider => VaultError::NotFound,
            IdentityError::Sso(m) => VaultError::Unavailable(m),
            other => id_err(other),
        })?;
        self.commit(step.ops, vec![])?;
        Ok(step.value)
    }

    /// `GET /auth/oidc/{name}/callback?code&state`: verifies the IdP's answer, signs the
    /// user in (creating the account `{name}.{user}` on first sign-in, in the role its
    /// groups map to), audited either way.
    ///
    /// # Errors
    /// `BadRequest` for an unknown, used or expired state; `Unauthenticated` for a refused
    /// exchange or ID token; `Forbidden` when the groups map to no role; `NotFound` for an
    /// unknown provider.
    pub fn oidc_callback(
        &self,
        c: &Caller,
        name: &str,
        code: &str,
        state: &str,
    ) -> Result<SessionGrant, VaultError> {
        let actor = format!("(sso:{})", name.chars().take(40).collect::<String>());
        let fail = |why: String, err: VaultError| -> VaultError {
            tracing::warn!(provider = %name, reason = %why, "single sign-on refused");
            let mut rec = self.sign_in_record(c, "login", &actor, Outcome::Failure);
            rec.detail = Some(why);
            match self.commit(vec![], vec![rec]) {
                Ok(_) => err,
                Err(e) => crate::audit_failed(e),
            }
        };
        let who = match self.identity.oidc_finish(name, code, state) {
            Ok(w) => w,
            Err(IdentityError::NoSuchProvider) => return Err(VaultError::NotFound),
            Err(IdentityError::Store(e)) => return Err(e.into()),
            Err(IdentityError::BadChallenge) => {
                return Err(fail(
                    "single sign-on: unknown, used or expired state".into(),
                    VaultError::BadRequest(
                        "unknown, used or expired sign-in state; start again".into(),
                    ),
                ))
            }
            Err(IdentityError::NoRole) => {
                return Err(fail(
                    "single sign-on: the IdP's groups map to no role".into(),
                    VaultError::Forbidden { withheld: vec![] },
                ))
            }
            Err(e) => return Err(fail(e.to_string(), VaultError::Unauthenticated)),
        };
        let mut ops = who.ops.clone();
        let grant = match self
            .identity
            .sso_session(&who, name, c.source.as_deref(), &mut ops)
        {
            Ok(g) => g,
            Err(IdentityError::Store(e)) => return Err(e.into()),
            Err(e) => return Err(fail(e.to_string(), VaultError::Unauthenticated)),
        };
        let mut rec = self.sign_in_record(c, "mfa", who.username.as_str(), Outcome::Success);
        rec.role = Some(who.role.as_str().to_owned());
        rec.detail = Some(format!("{}; session started", who.detail));
        match self.commit(ops, vec![rec]) {
            Ok(_) => {}
            // The state was used concurrently: a replay.
            Err(VaultError::Conflict) => {
                return Err(VaultError::BadRequest(
                    "unknown, used or expired sign-in state; start again".into(),
                ))
            }
            Err(e) => return Err(e),
        }
        Ok(SessionGrant {
            token: grant.token,
            principal: grant.principal,
            expires_in: self.identity.session_policy().idle_timeout_secs,
        })
    }

    /// Registers a service client (`medvault client add`): policy action `client.create`
    /// (step-up over HTTP). `scopes` are SMART v2 system scopes of types medvault stores;
    /// `jwk` a public key for `private_key_jwt`, else a secret is generated and shown once.
    ///
    /// # Errors
    /// Denied; `BadRequest` for a bad name, scope, type or key.
    pub fn add_client(
        &self,
        c: &Caller,
        name: &str,
        scopes: &str,
        jwk: Option<serde_json::Value>,
    ) -> Result<medvault_identity::NewClient, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::CreateClient, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        for (text, sc) in medvault_identity::parse_scopes(scopes).map_err(id_err)? {
            if let Some(t) = &sc.rtype {
                if medvault_fhir::ResourceType::parse(t).is_none() {
                    return Err(VaultError::BadRequest(format!(
                        "scope {text}: medvault stores no {t} resources"
                    )));
                }
            }
        }
        let step = self
            .identity
            .new_client(name, scopes, jwk)
            .map_err(id_err)?;
        rec.detail = Some(format!("client={} scopes={scopes}", step.value.client_id));
        self.commit(step.ops, vec![rec])?;
        Ok(step.value)
    }

    /// `medvault client list`: policy action `client.list`.
    ///
    /// # Errors
    /// Denied.
    pub fn clients(&self, c: &Caller) -> Result<Vec<medvault_identity::ClientView>, VaultError> {
        if let Some(rec) = self.operate(c, Operation::ListClients, None)? {
            self.audit(vec![rec])?;
        }
        self.identity.clients().map_err(id_err)
    }

    /// `medvault client revoke ID`: the client and every token it holds, at once.
    ///
    /// # Errors
    /// Denied; `NotFound` for an unknown client.
    pub fn revoke_client(&self, c: &Caller, client_id: &str) -> Result<(), VaultError> {
        self.change_account(c, Operation::RevokeClient, client_id, || {
            self.identity.revoke_client(client_id)
        })
    }

    /// `POST /auth/token` with `grant_type=client_credentials`: a short-lived access token
    /// for a service client; audited (BALP Login) either way.
    ///
    /// # Errors
    /// `Unauthenticated` (OAuth2 `invalid_client`), `BadRequest` (`invalid_scope`),
    /// `Locked`.
    pub fn client_token(
        &self,
        c: &Caller,
        auth: &medvault_identity::ClientAuth<'_>,
        scope: Option<&str>,
        token_url: &str,
    ) -> Result<medvault_identity::ClientGrant, VaultError> {
        match self
            .identity
            .client_token(auth, scope, token_url, c.source.as_deref())
        {
            Ok(step) => {
                let mut rec = self.sign_in_record(c, "login", &step.value.client, Outcome::Success);
                rec.role = Some(Role::Service.as_str().to_owned());
                rec.detail = Some(format!("client credentials; scope={}", step.value.scope));
                match self.commit(step.ops, vec![rec]) {
                    // A client assertion's jti used twice: a replay.
                    Err(VaultError::Conflict) => Err(VaultError::Unauthenticated),
                    Err(e) => Err(e),
                    Ok(_) => Ok(step.value),
                }
            }
            Err(r) if matches!(r.error, IdentityError::BadScope(_)) => {
                Err(VaultError::BadRequest(r.error.to_string()))
            }
            Err(r) => Err(self.refused(c, "login", r)),
        }
    }

    /// `GET /api/users`: every account, no secrets. Policy action `user.list`.
    ///
    /// # Errors
    /// Denied by policy.
    pub fn users(&self, c: &Caller) -> Result<Vec<AccountView>, VaultError> {
        if let Some(rec) = self.operate(c, Operation::ListUsers, None)? {
            self.audit(vec![rec])?;
        }
        self.identity.accounts().map_err(id_err)
    }

    /// Applies an account change decided by policy (with step-up), audited with `detail`.
    fn change_account(
        &self,
        c: &Caller,
        op: Operation,
        target: &str,
        change: impl FnOnce() -> Result<Vec<Op>, IdentityError>,
    ) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, op, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        // Separation of duties: nobody changes their own role or training record.
        if matches!(op, Operation::ChangeRole | Operation::SetTraining) && target == c.actor() {
            rec.outcome = Outcome::Denied;
            rec.detail = Some(format!("target={target} refused: one's own account"));
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        let ops = change().map_err(id_err)?;
        rec.detail = Some(format!("target={target}"));
        self.commit(ops, vec![rec])?;
        Ok(())
    }

    /// `POST /api/users/{name}/disable` (step-up): ends every session at once.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`.
    pub fn set_user_disabled(
        &self,
        c: &Caller,
        name: &str,
        disabled: bool,
    ) -> Result<(), VaultError> {
        let op = if disabled {
            Operation::DisableUser
        } else {
            Operation::EnableUser
        };
        self.change_account(c, op, name, || self.identity.set_disabled(name, disabled))
    }

    /// `POST /api/users/{name}/unlock` (step-up): clears the account's failure counters.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`.
    pub fn unlock_user(&self, c: &Caller, name: &str) -> Result<(), VaultError> {
        self.change_account(c, Operation::UnlockUser, name, || {
            self.identity.unlock(name)
        })
    }

    /// `POST /api/users/{name}/role` (step-up): a new role; every session ends.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`, `BadRequest` for a role no person may hold.
    pub fn set_user_role(&self, c: &Caller, name: &str, role: Role) -> Result<(), VaultError> {
        if !role.is_staff() {
            return Err(VaultError::BadRequest(format!(
                "role `{role}` cannot be given to a user"
            )));
        }
        self.change_account(c, Operation::ChangeRole, name, || {
            self.identity.set_role(name, role)
        })
    }

    /// `POST /api/users/{name}/training {"current": bool}` (step-up): records whether the
    /// user's required security training is current, effective at their next request.
    ///
    /// # Errors
    /// Denied (including one's own account), `StepUpRequired`, `NotFound`.
    pub fn set_user_training(
        &self,
        c: &Caller,
        name: &str,
        current: bool,
    ) -> Result<(), VaultError> {
        // A block an administrator sets holds against the training program (a completion
        // does not lift it); setting the training current lifts it.
        let block = self.put(
            crate::compliance::TRAINING_BLOCK,
            name,
            if current { "lifted" } else { "blocked" },
            name,
            &serde_json::json!({"user": name, "blocked": !current}),
        )?;
        self.change_account(c, Operation::SetTraining, name, || {
            let mut ops = self.identity.set_training(name, current)?;
            ops.push(block);
            Ok(ops)
        })
    }

    /// `POST /api/users/{name}/mfa-reset` (step-up): a new TOTP seed and recovery codes,
    /// passkeys revoked, sessions ended; returns the enrollment to hand to the user once.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `NotFound`.
    pub fn reset_mfa(&self, c: &Caller, name: &str) -> Result<EnrollmentInfo, VaultError> {
        let mut out = None;
        self.change_account(c, Operation::ResetMfa, name, || {
            let step = self.identity.reset_mfa(name)?;
            out = Some(step.value);
            Ok(step.ops)
        })?;
        let e = out.ok_or(VaultError::Internal("no enrollment".into()))?;
        Ok(EnrollmentInfo {
            totp_secret: e.totp.base32(),
            totp_uri: e.totp.uri("medvault", name),
            recovery_codes: e.recovery_codes,
        })
    }

    /// Disables every account unused past `session.dormant_after_days`, one audit record
    /// each (the server's own work, [`Caller::system`]). Returns the names disabled.
    ///
    /// # Errors
    /// Denied by policy; storage.
    pub fn disable_dormant(&self, c: &Caller) -> Result<Vec<String>, VaultError> {
        self.permit_operation(c, Operation::DisableDormant, None)?;
        let names = self.identity.dormant_accounts().map_err(id_err)?;
        for name in &names {
            let ops = self.identity.set_disabled(name, true).map_err(id_err)?;
            let mut rec = self.record(c, Operation::DisableDormant.as_str(), Outcome::Success);
            rec.detail = Some(format!(
                "target={name}; no sign-in for {} days",
                self.identity.session_policy().dormant_after_days
            ));
            self.commit(ops, vec![rec])?;
        }
        Ok(names)
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
            recovery_codes: u.recovery_codes,
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
pub fn check_password(p: &Password, username: Option<&str>) -> Result<(), VaultError> {
    medvault_identity::Identity::check_password_strength(p, username).map_err(id_err)
}
