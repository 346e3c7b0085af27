//! SMART App Launch 2.0 through the gate: app registration by a security administrator,
//! the authorization request and the user's consent, EHR launch from a chart, the token
//! exchange and refresh, and each user's grants (revocable at once). What an app's token
//! may then read is decided per record by the policy, as the user, narrowed to the app's
//! scopes (`medvault_policy::Asker::App`) and to its launch chart (`Caller::outside_launch`).

use medvault_identity::{AppClientAuth, AppGrant, AppScope, AppView};
use medvault_types::{Operation, Role};
use serde::Serialize;

use crate::auth::id_err;
use crate::caller::Assurance;
use crate::{Caller, Outcome, Vault, VaultError};

/// An authorization request (RFC 6749 §4.1.1, SMART App Launch 2.0 §"Obtain authorization
/// code"), as received.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeRequest {
    pub response_type: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub state: String,
    pub aud: String,
    pub code_challenge: String,
    pub code_challenge_method: String,
    /// The opaque value of an EHR launch.
    pub launch: Option<String>,
}

/// Why an authorization request fails: before the redirect URI is known to be the app's,
/// the user is told (never redirected); after, the app is (RFC 6749 §4.1.2.1).
#[derive(Debug)]
pub enum AuthorizeError {
    /// Shown to the user.
    Page(String),
    /// Sent to the app: `redirect_uri?error=…&error_description=…&state=…`.
    Redirect(String),
}

/// What the consent screen shows, and what approval grants.
#[derive(Debug, Clone, Serialize)]
pub struct Consent {
    pub app: AppView,
    /// The scopes approval grants: those asked for that the app is registered for.
    pub scopes: Vec<String>,
    /// Scopes asked for and not granted (unknown, or not registered for the app).
    pub dropped: Vec<String>,
    /// The chart a `patient/` grant is limited to.
    pub patient: Option<String>,
    /// Plain-language lines for the consent screen.
    pub explained: Vec<String>,
}

/// A token endpoint answer (SMART App Launch 2.0 §"Response").
#[derive(Debug, Clone, Serialize)]
pub struct AppTokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The signed-in user as a FHIR resource URL (with the `fhirUser` scope).
    #[serde(rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub need_patient_banner: bool,
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> String {
    let q = serde_urlencoded::to_string(params).unwrap_or_default();
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{q}")
}

/// Plain words for a scope, for the consent screen.
fn explain(scope: &str) -> String {
    match scope {
        "launch" | "launch/patient" => "know which patient's chart it was opened for".into(),
        "fhirUser" => "know who you are (your name in medvault)".into(),
        "offline_access" => "keep access for up to 90 days, until you revoke it".into(),
        "online_access" => "keep access while you are working today".into(),
        s => match AppScope::parse(s) {
            Ok(a) => format!(
                "read {} {}",
                a.rtype
                    .as_deref()
                    .map_or("every kind of record".to_owned(), |t| format!(
                        "{t} records"
                    )),
                if a.context == "patient" {
                    "in this patient's chart only"
                } else {
                    "that you yourself may see"
                }
            ),
            Err(_) => s.to_owned(),
        },
    }
}

impl Vault {
    /// `POST /api/apps`: registers a SMART app (security administrator, with step-up).
    /// Returns the app and, for a confidential app, its secret (shown once).
    ///
    /// # Errors
    /// `BadRequest` for a bad name, redirect URI, launch URL or scope; denied by policy;
    /// `StepUpRequired`.
    pub fn register_app(
        &self,
        c: &Caller,
        name: &str,
        redirect_uris: &[String],
        launch_url: Option<&str>,
        scopes: &str,
        confidential: bool,
    ) -> Result<(AppView, Option<String>), VaultError> {
        for x in scopes.split_whitespace() {
            if let Ok(AppScope { rtype: Some(t), .. }) = AppScope::parse(x) {
                if medvault_fhir::ResourceType::parse(&t).is_none() {
                    return Err(VaultError::BadRequest(format!(
                        "scope {x}: medvault stores no {t} resources"
                    )));
                }
            }
        }
        let step = self
            .identity
            .register_app(name, redirect_uris, launch_url, scopes, confidential)
            .map_err(id_err)?;
        let Some(mut rec) = self.operate(c, Operation::CreateClient, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        let (view, secret) = step.value;
        rec.action = "app.register".into();
        rec.detail = Some(format!(
            "app={} type={} scopes={}",
            view.client_id,
            view.client_type,
            view.scopes.join(" ")
        ));
        self.commit(step.ops, vec![rec])?;
        Ok((view, secret.map(|s| s.expose().to_owned())))
    }

    /// `GET /api/apps`: every registered app (security administrators).
    ///
    /// # Errors
    /// Denied by policy.
    pub fn apps(&self, c: &Caller) -> Result<Vec<AppView>, VaultError> {
        if let Some(rec) = self.operate(c, Operation::ListClients, None)? {
            self.audit(vec![rec])?;
        }
        self.identity.apps().map_err(id_err)
    }

    /// The apps a user may launch from a chart (those with a launch URL): names and ids
    /// only, for the chart page.
    ///
    /// # Errors
    /// `Unauthenticated` for a caller not signed in.
    pub fn launchable_apps(&self, c: &Caller) -> Result<Vec<AppView>, VaultError> {
        if c.principal().is_none() {
            return Err(VaultError::Unauthenticated);
        }
        Ok(self
            .identity
            .apps()
            .map_err(id_err)?
            .into_iter()
            .filter(|a| a.launch_url.is_some())
            .collect())
    }

    /// `DELETE /api/apps/{id}`: removes an app; every grant to it stops at once.
    ///
    /// # Errors
    /// `NotFound`; denied by policy; `StepUpRequired`.
    pub fn remove_app(&self, c: &Caller, client_id: &str) -> Result<(), VaultError> {
        let ops = self.identity.remove_app(client_id).map_err(id_err)?;
        let Some(mut rec) = self.operate(c, Operation::RevokeClient, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if !self.stepped_up(c) {
            return Err(VaultError::StepUpRequired);
        }
        rec.action = "app.remove".into();
        rec.detail = Some(format!("app={client_id}"));
        self.commit(ops, vec![rec])?;
        Ok(())
    }

    /// An EHR launch: the signed-in user opens `client_id` from `patient`'s chart. Returns
    /// the app's launch URL with `iss` (the FHIR base) and `launch` (SMART App Launch 2.0
    /// §"EHR Launch"). The launch only carries the context; what the app may read is
    /// decided when it reads.
    ///
    /// # Errors
    /// `BadRequest` for an unknown app or one without a launch URL, or a malformed id;
    /// `NotFound` (or the read's refusal) for a chart the user cannot open; `Forbidden`
    /// for a caller that is not a signed-in user.
    pub fn launch_app(
        &self,
        c: &Caller,
        client_id: &str,
        patient: &str,
        fhir_base: &str,
    ) -> Result<String, VaultError> {
        let user = match (c.assurance(), c.principal()) {
            (Assurance::Session { .. }, Some(p)) => p.username.as_str().to_owned(),
            _ => return Err(VaultError::Forbidden { withheld: vec![] }),
        };
        medvault_types::PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        // The chart must exist and be one the user may open at all (its read is audited
        // like any other); what the app then reads is decided record by record.
        let pt = medvault_fhir::ResourceType::parse("Patient")
            .ok_or_else(|| VaultError::Internal("Patient is not a supported type".into()))?;
        self.read(c, pt, patient)?;
        let step = self
            .identity
            .new_launch(&user, client_id, patient)
            .map_err(id_err)?;
        let (launch, url) = step.value;
        let mut rec = self.record(c, "app.launch", Outcome::Success);
        rec.patient = Some(patient.to_owned());
        rec.detail = Some(format!("app={client_id}"));
        self.commit(step.ops, vec![rec])?;
        Ok(redirect_with(
            &url,
            &[("iss", fhir_base), ("launch", launch.expose())],
        ))
    }

    /// Checks an authorization request for the signed-in user and says what approving it
    /// would grant.
    ///
    /// # Errors
    /// [`AuthorizeError::Page`] before the app and its redirect URI are known good;
    /// [`AuthorizeError::Redirect`] after (`unsupported_response_type`, `invalid_request`
    /// for a missing PKCE S256 challenge, `state` or `aud`, `invalid_scope`).
    pub fn authorize_app(
        &self,
        c: &Caller,
        req: &AuthorizeRequest,
        fhir_base: &str,
    ) -> Result<Consent, AuthorizeError> {
        fn internal<E>(_: E) -> AuthorizeError {
            AuthorizeError::Page("the request could not be checked; try again".into())
        }
        let app = self
            .identity
            .app(&req.client_id)
            .map_err(internal)?
            .ok_or_else(|| {
                AuthorizeError::Page("no app is registered with that client_id".into())
            })?;
        if !app.redirect_uris.contains(&req.redirect_uri) {
            return Err(AuthorizeError::Page(
                "that redirect_uri is not registered for this app".into(),
            ));
        }
        // An over-long state is not echoed back (it is refused for being over-long).
        let state = if req.state.len() <= 500 {
            req.state.as_str()
        } else {
            ""
        };
        let fail = |error: &str, description: &str| {
            AuthorizeError::Redirect(redirect_with(
                &req.redirect_uri,
                &[
                    ("error", error),
                    ("error_description", description),
                    ("state", state),
                ],
            ))
        };
        if req.response_type != "code" {
            return Err(fail(
                "unsupported_response_type",
                "response_type must be code",
            ));
        }
        if req.code_challenge_method != "S256" || req.code_challenge.len() != 43 {
            return Err(fail(
                "invalid_request",
                "PKCE is required: code_challenge_method=S256 and a code_challenge",
            ));
        }
        if req.state.is_empty() || req.state.len() > 500 {
            return Err(fail(
                "invalid_request",
                "state is required (at most 500 characters)",
            ));
        }
        if req.aud.trim_end_matches('/') != fhir_base.trim_end_matches('/') {
            return Err(fail(
                "invalid_request",
                "aud must be this server's FHIR base URL",
            ));
        }
        let user = match (c.assurance(), c.principal()) {
            (Assurance::Session { .. }, Some(p)) => p.clone(),
            _ => return Err(AuthorizeError::Page("sign in to medvault first".into())),
        };
        let (mut scopes, mut dropped) = (vec![], vec![]);
        for s in req.scope.split_whitespace() {
            if medvault_identity::scope_within(s, &app.scopes) {
                if !scopes.iter().any(|x| x == s) {
                    scopes.push(s.to_owned());
                }
            } else {
                dropped.push(s.chars().take(80).collect());
            }
        }
        let resources: Vec<AppScope> = scopes
            .iter()
            .filter_map(|s| AppScope::parse(s).ok())
            .collect();
        if resources.is_empty() {
            return Err(fail(
                "invalid_scope",
                "no resource scope (patient/… or user/…) this app is registered for was asked for",
            ));
        }
        let wants_patient = resources.iter().any(|a| a.context == "patient");
        let patient = if !wants_patient {
            None
        } else if let Some(l) = &req.launch {
            let p = self
                .identity
                .launch_patient(l, user.username.as_str(), &req.client_id)
                .map_err(internal)?;
            match p {
                Some(p) => Some(p),
                None => {
                    return Err(fail(
                        "invalid_request",
                        "the launch has expired or is not yours",
                    ))
                }
            }
        } else if scopes.iter().any(|s| s == "launch/patient") && user.role == Role::Patient {
            // A patient's standalone launch: their own chart.
            let own = self
                .my_patients(c)
                .map_err(internal)?
                .into_iter()
                .find(|(_, r)| *r == crate::Relationship::Own)
                .and_then(|(d, _)| d.patient().map(|p| p.as_str().to_owned()));
            match own {
                Some(p) => Some(p),
                None => {
                    return Err(fail(
                        "invalid_request",
                        "your account is not linked to a chart",
                    ))
                }
            }
        } else {
            return Err(fail(
                "invalid_request",
                "patient/ scopes need a patient: open the app from a chart (EHR launch), or as a patient ask for launch/patient",
            ));
        };
        let explained = scopes.iter().map(|s| explain(s)).collect();
        Ok(Consent {
            app,
            scopes,
            dropped,
            patient,
            explained,
        })
    }

    /// The user's answer on the consent screen: on approval, a grant and a one-time code
    /// sent to the app's redirect URI with its `state`; on refusal, `access_denied`. Both
    /// audited.
    ///
    /// # Errors
    /// As [`Vault::authorize_app`] (the request is checked again).
    pub fn answer_app(
        &self,
        c: &Caller,
        req: &AuthorizeRequest,
        fhir_base: &str,
        approve: bool,
    ) -> Result<String, AuthorizeError> {
        let consent = self.authorize_app(c, req, fhir_base)?;
        let internal =
            |_| AuthorizeError::Page("the answer could not be recorded; try again".into());
        let mut rec = self.record(c, "app.authorize", Outcome::Success);
        rec.patient = consent.patient.clone();
        if !approve {
            rec.outcome = Outcome::Denied;
            rec.detail = Some(format!("app={} refused by the user", req.client_id));
            self.audit(vec![rec]).map_err(internal)?;
            return Ok(redirect_with(
                &req.redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", "the user did not approve the app"),
                    ("state", &req.state),
                ],
            ));
        }
        let user = c.actor().to_owned();
        let step = self
            .identity
            .approve_app(
                &user,
                &req.client_id,
                &consent.scopes,
                consent.patient.as_deref(),
                &req.redirect_uri,
                &req.code_challenge,
            )
            .map_err(|_| AuthorizeError::Page("the app is no longer registered".into()))?;
        let (code, grant) = step.value;
        rec.detail = Some(format!(
            "app={} grant={} scopes={}",
            grant.client_id,
            grant.id,
            grant.scopes.join(" ")
        ));
        self.commit(step.ops, vec![rec]).map_err(internal)?;
        Ok(redirect_with(
            &req.redirect_uri,
            &[("code", code.expose()), ("state", &req.state)],
        ))
    }

    /// `POST /auth/token` with `grant_type=authorization_code` (`code`, `redirect_uri`,
    /// `code_verifier`) or `refresh_token` (rotating): an app's tokens. Audited as a
    /// sign-in of the user through the app.
    ///
    /// # Errors
    /// `Unauthenticated` (OAuth2 `invalid_client`); `BadRequest` (`invalid_grant`: an
    /// unknown, used or expired code or refresh token, a wrong verifier or redirect URI, a
    /// revoked grant).
    pub fn app_token(
        &self,
        c: &Caller,
        auth: &AppClientAuth<'_>,
        grant_type: &str,
        form: &dyn Fn(&str) -> Option<String>,
        fhir_base: &str,
    ) -> Result<AppTokenResponse, VaultError> {
        let step = match grant_type {
            "authorization_code" => self.identity.redeem_code(
                auth,
                &form("code").unwrap_or_default(),
                &form("redirect_uri").unwrap_or_default(),
                &form("code_verifier").unwrap_or_default(),
            ),
            _ => self
                .identity
                .refresh_app(auth, &form("refresh_token").unwrap_or_default())
                .map_err(medvault_identity::Refused::from),
        };
        let step = match step {
            Ok(s) => s,
            Err(r) => {
                let e = r.error;
                let mut rec = self.sign_in_record(c, "login", auth.client_id, Outcome::Failure);
                rec.detail = Some(format!("smart {grant_type}: {e}"));
                // A refusal may spend what was tried (a code with a wrong verifier).
                self.commit(r.ops, vec![rec])?;
                return Err(match e {
                    medvault_identity::IdentityError::BadCredentials => {
                        VaultError::Unauthenticated
                    }
                    medvault_identity::IdentityError::BadChallenge => VaultError::BadRequest(
                        "the code or refresh token is invalid, used, expired or revoked, or the redirect_uri or code_verifier does not match".into(),
                    ),
                    other => id_err(other),
                });
            }
        };
        let t = step.value;
        let g: &AppGrant = &t.grant;
        let mut rec = self.sign_in_record(c, "login", &g.username, Outcome::Success);
        rec.app = Some(g.client_id.clone());
        rec.patient = g.patient.clone();
        rec.detail = Some(format!("smart {grant_type}; grant={}", g.id));
        let fhir_user = if g.scopes.iter().any(|s| s == "fhirUser") {
            self.identity
                .practitioner_of(&g.username)
                .ok()
                .flatten()
                .map(|p| format!("{fhir_base}/Practitioner/{p}"))
        } else {
            None
        };
        self.commit(step.ops, vec![rec])?;
        Ok(AppTokenResponse {
            access_token: t.access_token.expose().to_owned(),
            token_type: "Bearer",
            expires_in: t.expires_in,
            scope: g.scopes.join(" "),
            refresh_token: t.refresh_token.as_ref().map(|r| r.expose().to_owned()),
            need_patient_banner: g.patient.is_some(),
            patient: g.patient.clone(),
            fhir_user,
        })
    }

    /// The caller's live app grants ("apps that can see my record" for a patient).
    ///
    /// # Errors
    /// `Unauthenticated` without a signed-in session.
    pub fn my_app_grants(&self, c: &Caller) -> Result<Vec<AppGrant>, VaultError> {
        match (c.assurance(), c.principal()) {
            (Assurance::Session { .. }, Some(p)) => self
                .identity
                .app_grants(p.username.as_str())
                .map_err(id_err),
            _ => Err(VaultError::Unauthenticated),
        }
    }

    /// Revokes one of the caller's grants: every token under it stops at once. Audited.
    ///
    /// # Errors
    /// `NotFound` for a grant that is not theirs; `Unauthenticated`.
    pub fn revoke_app_grant(&self, c: &Caller, id: &str) -> Result<(), VaultError> {
        let user = match (c.assurance(), c.principal()) {
            (Assurance::Session { .. }, Some(p)) => p.username.as_str().to_owned(),
            _ => return Err(VaultError::Unauthenticated),
        };
        let step = self.identity.revoke_grant(&user, id).map_err(id_err)?;
        let mut rec = self.record(c, "app.revoke", Outcome::Success);
        rec.patient = step.value.patient.clone();
        rec.app = Some(step.value.client_id.clone());
        rec.detail = Some(format!("grant={id}"));
        self.commit(step.ops, vec![rec])?;
        Ok(())
    }
}
