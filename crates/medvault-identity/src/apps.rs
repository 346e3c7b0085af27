//! SMART App Launch 2.0 (<https://hl7.org/fhir/smart-app-launch/app-launch.html>): apps a
//! security administrator registers (redirect URIs, public or confidential, the scopes they
//! may ask for), the authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636, S256
//! only), EHR launch contexts, user grants (what a user approved for an app), access tokens
//! narrowed to those scopes, and refresh tokens that rotate on every use.
//!
//! Storage (all through the gate's ops, as the rest of this room):
//! - an app: credential `smart-app` (id = client id, owner `(apps)`), sealed;
//! - a grant: credential `smart-grant` (id = grant id, owner = the user), sealed — deleting
//!   it stops every token issued under it at once;
//! - an EHR launch: session row `smart-launch` (5 minutes, the user's, scope `patient:ID`);
//! - an authorization code: session row `smart-code` (60 seconds, owner `app:GRANT`, method
//!   `CLIENT REDIRECT CHALLENGE`), used once;
//! - an access token: session row `app` (owner `app:GRANT`), a refresh token `app-refresh`.
//!
//! INVARIANT: a token's scopes are a subset of its grant's, which are a subset of what the
//! user approved, which are a subset of the app's registration; the gate narrows them
//! further to the user's policy (a scope never widens it).

use medvault_store::{CredentialRow, Op, SessionRow};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Identity, IdentityError, Refused, Step, Token};

const APP: &str = "smart-app";
const GRANT: &str = "smart-grant";
const APPS: &str = "(apps)";
/// Session kinds of the grant's artefacts.
pub const CODE_KIND: &str = "smart-code";
pub const LAUNCH_KIND: &str = "smart-launch";
pub const ACCESS_KIND: &str = "app";
pub const REFRESH_KIND: &str = "app-refresh";
/// Seconds an access token lives.
pub const APP_TOKEN_SECS: i64 = 900;
/// Seconds an authorization code lives (RFC 6749 §4.1.2 recommends at most ten minutes).
const CODE_SECS: i64 = 60;
/// Seconds an EHR launch context waits for the app.
const LAUNCH_SECS: i64 = 300;
/// Days a grant with `offline_access` lasts (its refresh tokens live as long).
pub const OFFLINE_DAYS: i64 = 90;
/// Seconds a grant with `online_access` (or no refresh at all) lasts: a working day.
const ONLINE_SECS: i64 = 12 * 3600;

/// Scopes that are not about resources: launch context, identity, refresh.
///
/// `openid` is not among them: medvault issues no `id_token` (the token response carries
/// `fhirUser` instead), so an app registered for it would be promised what it cannot get.
pub const CONTEXT_SCOPES: &[&str] = &[
    "launch",
    "launch/patient",
    "fhirUser",
    "offline_access",
    "online_access",
];

/// One SMART v2 resource scope an app may hold: `patient/` or `user/`, a type (or `*`),
/// read and search only (medvault does not let apps write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppScope {
    /// `patient` or `user`.
    pub context: &'static str,
    /// `None` for `*`.
    pub rtype: Option<String>,
}

impl AppScope {
    /// Parses `patient/Type.rs`, `user/*.r`, … (SMART App Launch 2.0 §3; `.read` as in v1).
    /// Permissions other than `r` and `s` are refused.
    ///
    /// # Errors
    /// `BadScope` naming the scope.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadScope(s.chars().take(80).collect());
        let (context, rest) = if let Some(r) = s.strip_prefix("patient/") {
            ("patient", r)
        } else if let Some(r) = s.strip_prefix("user/") {
            ("user", r)
        } else {
            return Err(bad());
        };
        let (rtype, perms) = rest.split_once('.').ok_or_else(bad)?;
        let valid_type = rtype == "*"
            || (rtype.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && rtype.chars().all(|c| c.is_ascii_alphanumeric()));
        let valid_perms = matches!(perms, "r" | "s" | "rs" | "read");
        if !valid_type || !valid_perms {
            return Err(bad());
        }
        Ok(AppScope {
            context,
            rtype: (rtype != "*").then(|| rtype.to_owned()),
        })
    }

    /// The same resources as a system scope, for the gate's type and category checks.
    pub fn as_system(&self) -> String {
        format!("system/{}.rs", self.rtype.as_deref().unwrap_or("*"))
    }
}

/// Parses an app's scope list: resource scopes and [`CONTEXT_SCOPES`].
///
/// # Errors
/// `BadScope` for the first that is neither.
pub fn parse_app_scopes(s: &str) -> Result<Vec<String>, IdentityError> {
    let mut out: Vec<String> = vec![];
    for x in s.split_whitespace() {
        if !CONTEXT_SCOPES.contains(&x) {
            AppScope::parse(x)?;
        }
        if !out.iter().any(|o| o == x) {
            out.push(x.to_owned());
        }
    }
    Ok(out)
}

/// Whether scope `s` is within what an app is registered for: the same scope, or a
/// resource scope of the same context (`patient`/`user`) on a type a registered `*` (or the
/// same type) covers.
pub fn scope_within(s: &str, registered: &[String]) -> bool {
    if registered.iter().any(|r| r == s) {
        return true;
    }
    let Ok(want) = AppScope::parse(s) else {
        return false;
    };
    registered.iter().any(|r| {
        AppScope::parse(r).is_ok_and(|have| {
            have.context == want.context && (have.rtype.is_none() || have.rtype == want.rtype)
        })
    })
}

/// Whether a redirect URI may be registered: `https`, or `http` to the loopback (native
/// apps, RFC 8252 §7.3); no fragment (RFC 6749 §3.1.2).
pub fn valid_redirect_uri(u: &str) -> bool {
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| {
            u.strip_prefix(p)
                .is_some_and(|r| r.is_empty() || r.starts_with([':', '/']))
        });
    (u.starts_with("https://") || loopback)
        && u.len() <= 500
        && !u.contains('#')
        && !u.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[derive(Serialize, Deserialize)]
struct AppRecord {
    name: String,
    redirect_uris: Vec<String>,
    launch_url: Option<String>,
    scopes: Vec<String>,
    /// MAC of the secret of a confidential app; `None` for a public app (PKCE alone).
    secret_mac: Option<Vec<u8>>,
}

/// A registered app, as administrators and consent screens see it.
#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    pub client_id: String,
    pub name: String,
    pub redirect_uris: Vec<String>,
    /// Where an EHR launch sends the browser (`?iss=…&launch=…`).
    pub launch_url: Option<String>,
    pub scopes: Vec<String>,
    /// `confidential` (a client secret) or `public` (PKCE only).
    pub client_type: &'static str,
    pub created: i64,
}

/// What a user approved for an app (one authorization).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppGrant {
    pub id: String,
    pub client_id: String,
    /// The app's name when it was approved.
    pub app: String,
    pub username: String,
    pub scopes: Vec<String>,
    /// The chart a `patient/` grant is limited to.
    pub patient: Option<String>,
    pub created: i64,
    pub expires: i64,
}

/// A token issued to an app.
#[derive(Debug)]
pub struct AppTokens {
    pub access_token: Token,
    pub refresh_token: Option<Token>,
    pub expires_in: i64,
    pub grant: AppGrant,
}

/// An access token's app context, for the gate.
#[derive(Debug, Clone)]
pub struct AppSession {
    pub client_id: String,
    pub grant_id: String,
    /// Resource scopes, space-separated.
    pub scopes: String,
    pub patient: Option<String>,
}

/// How an app authenticates at the token endpoint.
#[derive(Debug)]
pub struct AppClientAuth<'a> {
    pub client_id: &'a str,
    /// A confidential app's secret.
    pub secret: Option<&'a str>,
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// RFC 7636 §4.6: `BASE64URL(SHA256(verifier)) == challenge`; the verifier is 43–128
/// unreserved characters (§4.1).
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    use base64::Engine;
    let valid = (43..=128).contains(&verifier.len())
        && verifier
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c));
    valid
        && base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier))
            == challenge
}

impl Identity {
    fn app_row(&self, client_id: &str) -> Result<Option<AppRecord>, IdentityError> {
        let Some(row) = self.store.credential(APP, client_id.as_bytes())? else {
            return Ok(None);
        };
        let plain = self
            .secrets
            .open(
                format!("medvault:{APP}:v1|{client_id}").as_bytes(),
                &row.data,
            )
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        Ok(Some(
            serde_json::from_slice(&plain).map_err(|e| IdentityError::Internal(e.to_string()))?,
        ))
    }

    fn view(client_id: &str, rec: AppRecord, created: i64) -> AppView {
        AppView {
            client_id: client_id.to_owned(),
            name: rec.name,
            redirect_uris: rec.redirect_uris,
            launch_url: rec.launch_url,
            scopes: rec.scopes,
            client_type: if rec.secret_mac.is_some() {
                "confidential"
            } else {
                "public"
            },
            created,
        }
    }

    /// Registers a SMART app. Returns its client id and, for a confidential app, its secret
    /// (shown once).
    ///
    /// # Errors
    /// `BadClient` for a bad name, redirect URI or launch URL; `BadScope`.
    pub fn register_app(
        &self,
        name: &str,
        redirect_uris: &[String],
        launch_url: Option<&str>,
        scopes: &str,
        confidential: bool,
    ) -> Result<Step<(AppView, Option<Token>)>, IdentityError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 80 || name.chars().any(char::is_control) {
            return Err(IdentityError::BadClient(
                "an app's name is 1-80 characters".into(),
            ));
        }
        if redirect_uris.is_empty() || redirect_uris.len() > 10 {
            return Err(IdentityError::BadClient(
                "an app needs 1-10 redirect URIs".into(),
            ));
        }
        if let Some(bad) = redirect_uris.iter().find(|u| !valid_redirect_uri(u)) {
            return Err(IdentityError::BadClient(format!(
                "redirect URI {} must be https (or http to 127.0.0.1/localhost) without a fragment",
                bad.chars().take(80).collect::<String>()
            )));
        }
        if launch_url.is_some_and(|u| !valid_redirect_uri(u)) {
            return Err(IdentityError::BadClient(
                "the launch URL must be https (or http to 127.0.0.1/localhost) without a fragment"
                    .into(),
            ));
        }
        let scopes = parse_app_scopes(scopes)?;
        if !scopes.iter().any(|s| AppScope::parse(s).is_ok()) {
            return Err(IdentityError::BadScope(
                "(no patient/ or user/ resource scope)".into(),
            ));
        }
        let client_id = format!("app-{}", random_id());
        let secret = confidential.then(Token::generate);
        let rec = AppRecord {
            name: name.to_owned(),
            redirect_uris: redirect_uris.to_vec(),
            launch_url: launch_url.map(str::to_owned),
            scopes,
            secret_mac: secret.as_ref().map(|s| {
                self.mac
                    .tag(&[b"app-secret", client_id.as_bytes(), s.expose().as_bytes()])
                    .to_vec()
            }),
        };
        let sealed = self
            .secrets
            .seal(
                format!("medvault:{APP}:v1|{client_id}").as_bytes(),
                &serde_json::to_vec(&rec).map_err(|e| IdentityError::Internal(e.to_string()))?,
            )
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        let now = self.now();
        Ok(Step {
            ops: vec![Op::PutCredential(CredentialRow {
                kind: APP.into(),
                id: client_id.clone().into_bytes(),
                username: APPS.into(),
                name: rec.name.clone(),
                data: sealed,
                created: now,
                last_used: 0,
            })],
            value: (Self::view(&client_id, rec, now), secret),
        })
    }

    /// Every registered app.
    ///
    /// # Errors
    /// `Store`.
    pub fn apps(&self) -> Result<Vec<AppView>, IdentityError> {
        let mut out = vec![];
        for row in self.store.credentials(APPS, APP)? {
            let id = String::from_utf8_lossy(&row.id).into_owned();
            if let Some(rec) = self.app_row(&id)? {
                out.push(Self::view(&id, rec, row.created));
            }
        }
        Ok(out)
    }

    /// One registered app.
    ///
    /// # Errors
    /// `Store`.
    pub fn app(&self, client_id: &str) -> Result<Option<AppView>, IdentityError> {
        let Some(row) = self.store.credential(APP, client_id.as_bytes())? else {
            return Ok(None);
        };
        Ok(self
            .app_row(client_id)?
            .map(|rec| Self::view(client_id, rec, row.created)))
    }

    /// Removes an app; every grant made to it stops working at once (tokens are checked
    /// against the app on every use).
    ///
    /// # Errors
    /// `NoSuchUser` for an unknown app.
    pub fn remove_app(&self, client_id: &str) -> Result<Vec<Op>, IdentityError> {
        self.app_row(client_id)?.ok_or(IdentityError::NoSuchUser)?;
        Ok(vec![Op::DeleteCredential {
            kind: APP.into(),
            id: client_id.as_bytes().to_vec(),
            username: APPS.into(),
        }])
    }

    /// An EHR launch: `username` opens `client_id` from `patient`'s chart. Returns the
    /// opaque launch value the app passes back to the authorization endpoint.
    ///
    /// # Errors
    /// `BadClient` for an unknown app or one without a launch URL.
    pub fn new_launch(
        &self,
        username: &str,
        client_id: &str,
        patient: &str,
    ) -> Result<Step<(Token, String)>, IdentityError> {
        let app = self
            .app(client_id)?
            .ok_or_else(|| IdentityError::BadClient("no such app".into()))?;
        let url = app
            .launch_url
            .ok_or_else(|| IdentityError::BadClient("that app has no launch URL".into()))?;
        let token = Token::generate();
        let now = self.now();
        Ok(Step {
            ops: vec![Op::PutSession(SessionRow {
                token_hash: token.hash(),
                kind: LAUNCH_KIND.into(),
                username: username.to_owned(),
                created: now,
                last_seen: now,
                expires: now + LAUNCH_SECS,
                attempts: 0,
                mfa_at: 0,
                source: String::new(),
                method: client_id.to_owned(),
                scope: format!("patient:{patient}"),
            })],
            value: (token, url),
        })
    }

    /// The patient of a launch `username` made for `client_id`, if it is theirs and live.
    ///
    /// # Errors
    /// `Store`.
    pub fn launch_patient(
        &self,
        launch: &str,
        username: &str,
        client_id: &str,
    ) -> Result<Option<String>, IdentityError> {
        let Some(s) = self.store.session(&Token::from_client(launch).hash())? else {
            return Ok(None);
        };
        let live = s.kind == LAUNCH_KIND
            && s.username == username
            && s.method == client_id
            && s.expires > self.now();
        Ok(live
            .then(|| s.scope.strip_prefix("patient:").map(str::to_owned))
            .flatten())
    }

    /// The user approved `scopes` for `client_id` (with `patient` as the launch context):
    /// a grant and its one-time authorization code bound to the redirect URI and the PKCE
    /// challenge.
    ///
    /// # Errors
    /// `BadClient` for an unknown app.
    pub fn approve_app(
        &self,
        username: &str,
        client_id: &str,
        scopes: &[String],
        patient: Option<&str>,
        redirect_uri: &str,
        challenge: &str,
    ) -> Result<Step<(Token, AppGrant)>, IdentityError> {
        let app = self
            .app(client_id)?
            .ok_or_else(|| IdentityError::BadClient("no such app".into()))?;
        let now = self.now();
        let offline = scopes.iter().any(|s| s == "offline_access");
        let grant = AppGrant {
            id: random_id(),
            client_id: client_id.to_owned(),
            app: app.name,
            username: username.to_owned(),
            scopes: scopes.to_vec(),
            patient: patient.map(str::to_owned),
            created: now,
            expires: now
                + if offline {
                    OFFLINE_DAYS * 86_400
                } else {
                    ONLINE_SECS
                },
        };
        let sealed = self
            .secrets
            .seal(
                format!("medvault:{GRANT}:v1|{}", grant.id).as_bytes(),
                &serde_json::to_vec(&grant).map_err(|e| IdentityError::Internal(e.to_string()))?,
            )
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        let code = Token::generate();
        Ok(Step {
            ops: vec![
                Op::PutCredential(CredentialRow {
                    kind: GRANT.into(),
                    id: grant.id.clone().into_bytes(),
                    username: username.to_owned(),
                    name: client_id.to_owned(),
                    data: sealed,
                    created: now,
                    last_used: 0,
                }),
                Op::PutSession(SessionRow {
                    token_hash: code.hash(),
                    kind: CODE_KIND.into(),
                    username: format!("app:{}", grant.id),
                    created: now,
                    last_seen: now,
                    expires: now + CODE_SECS,
                    attempts: 0,
                    mfa_at: 0,
                    source: String::new(),
                    method: format!("{client_id} {redirect_uri} {challenge}"),
                    scope: String::new(),
                }),
            ],
            value: (code, grant),
        })
    }

    fn grant_row(&self, id: &str) -> Result<Option<AppGrant>, IdentityError> {
        let Some(row) = self.store.credential(GRANT, id.as_bytes())? else {
            return Ok(None);
        };
        let plain = self
            .secrets
            .open(format!("medvault:{GRANT}:v1|{id}").as_bytes(), &row.data)
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        Ok(Some(
            serde_json::from_slice(&plain).map_err(|e| IdentityError::Internal(e.to_string()))?,
        ))
    }

    /// A user's live grants (the apps that can act for them, and see their record).
    ///
    /// # Errors
    /// `Store`.
    pub fn app_grants(&self, username: &str) -> Result<Vec<AppGrant>, IdentityError> {
        let now = self.now();
        let mut out = vec![];
        for row in self.store.credentials(username, GRANT)? {
            let id = String::from_utf8_lossy(&row.id).into_owned();
            if let Some(g) = self.grant_row(&id)? {
                if g.expires > now {
                    out.push(g);
                }
            }
        }
        out.sort_by_key(|g| std::cmp::Reverse(g.created));
        Ok(out)
    }

    /// Revokes one of `username`'s grants and every token issued under it, at once.
    ///
    /// # Errors
    /// `NoSuchSession` for a grant that is not theirs (or not there).
    pub fn revoke_grant(&self, username: &str, id: &str) -> Result<Step<AppGrant>, IdentityError> {
        let g = self
            .grant_row(id)?
            .filter(|g| g.username == username)
            .ok_or(IdentityError::NoSuchSession)?;
        Ok(Step {
            ops: vec![
                Op::DeleteCredential {
                    kind: GRANT.into(),
                    id: id.as_bytes().to_vec(),
                    username: username.to_owned(),
                },
                Op::RevokeSessions {
                    username: format!("app:{id}"),
                },
            ],
            value: g,
        })
    }

    fn check_app_client(&self, auth: &AppClientAuth<'_>) -> Result<AppRecord, IdentityError> {
        let rec = self
            .app_row(auth.client_id)?
            .ok_or(IdentityError::BadCredentials)?;
        match (&rec.secret_mac, auth.secret) {
            (None, None) => Ok(rec),
            (Some(mac), Some(secret)) => {
                if self.mac.verify(
                    &[b"app-secret", auth.client_id.as_bytes(), secret.as_bytes()],
                    mac,
                ) {
                    Ok(rec)
                } else {
                    Err(IdentityError::BadCredentials)
                }
            }
            _ => Err(IdentityError::BadCredentials),
        }
    }

    fn issue(&self, grant: AppGrant) -> Step<AppTokens> {
        let now = self.now();
        let owner = format!("app:{}", grant.id);
        let access = Token::generate();
        let mut ops = vec![Op::PutSession(SessionRow {
            token_hash: access.hash(),
            kind: ACCESS_KIND.into(),
            username: owner.clone(),
            created: now,
            last_seen: now,
            expires: (now + APP_TOKEN_SECS).min(grant.expires),
            attempts: 0,
            mfa_at: 0,
            source: String::new(),
            method: format!("smart:{}", grant.client_id),
            scope: grant.scopes.join(" "),
        })];
        let refresh = grant
            .scopes
            .iter()
            .any(|s| s == "offline_access" || s == "online_access")
            .then(Token::generate);
        if let Some(r) = &refresh {
            ops.push(Op::PutSession(SessionRow {
                token_hash: r.hash(),
                kind: REFRESH_KIND.into(),
                username: owner,
                created: now,
                last_seen: now,
                expires: grant.expires,
                attempts: 0,
                mfa_at: 0,
                source: String::new(),
                method: format!("smart:{}", grant.client_id),
                scope: String::new(),
            }));
        }
        Step {
            value: AppTokens {
                access_token: access,
                refresh_token: refresh,
                expires_in: APP_TOKEN_SECS.min(grant.expires - now),
                grant,
            },
            ops,
        }
    }

    /// `grant_type=authorization_code`: the code (once), the same redirect URI, the PKCE
    /// verifier and the app's own authentication.
    ///
    /// # Errors
    /// `BadChallenge` (`invalid_grant`: unknown, used or expired code, another app's,
    /// another redirect URI, a wrong verifier — which spends the code, in the refusal's
    /// ops — a revoked grant), `BadCredentials` (`invalid_client`).
    pub fn redeem_code(
        &self,
        auth: &AppClientAuth<'_>,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Step<AppTokens>, Refused> {
        self.check_app_client(auth)?;
        let hash = Token::from_client(code).hash();
        let s = self
            .store
            .session(&hash)?
            .filter(|s| s.kind == CODE_KIND && s.expires > self.now())
            .ok_or(IdentityError::BadChallenge)?;
        let mut bound = s.method.splitn(3, ' ');
        let (client, redirect, challenge) = (bound.next(), bound.next(), bound.next());
        // The code is spent whatever happens next (RFC 6749 §4.1.2: used once).
        let spend = Op::DeleteSession { token_hash: hash };
        if client != Some(auth.client_id)
            || redirect != Some(redirect_uri)
            || !challenge.is_some_and(|c| pkce_matches(verifier, c))
        {
            // A guessed verifier gets one try: the code is gone with the refusal.
            return Err(Refused {
                error: IdentityError::BadChallenge,
                ops: vec![spend],
                locks: vec![],
                username: None,
            });
        }
        let grant = self.grant_of(&s)?;
        let mut step = self.issue(grant);
        step.ops.insert(0, spend);
        Ok(step)
    }

    /// `grant_type=refresh_token`: a new access token and a new refresh token; the one
    /// used is spent (rotation).
    ///
    /// # Errors
    /// `BadChallenge` (`invalid_grant`), `BadCredentials` (`invalid_client`).
    pub fn refresh_app(
        &self,
        auth: &AppClientAuth<'_>,
        refresh: &str,
    ) -> Result<Step<AppTokens>, IdentityError> {
        self.check_app_client(auth)?;
        let hash = Token::from_client(refresh).hash();
        let s = self
            .store
            .session(&hash)?
            .filter(|s| s.kind == REFRESH_KIND && s.expires > self.now())
            .ok_or(IdentityError::BadChallenge)?;
        if s.method != format!("smart:{}", auth.client_id) {
            return Err(IdentityError::BadChallenge);
        }
        let grant = self.grant_of(&s)?;
        let mut step = self.issue(grant);
        step.ops.insert(0, Op::DeleteSession { token_hash: hash });
        Ok(step)
    }

    /// The Practitioner id of `username`, if they have one (the `fhirUser` of a token).
    ///
    /// # Errors
    /// `Store`.
    pub fn practitioner_of(&self, username: &str) -> Result<Option<String>, IdentityError> {
        Ok(self.store.user(username)?.and_then(|u| u.practitioner_id))
    }

    /// The live grant a code or refresh token (owned by `app:GRANT`) was issued under.
    fn grant_of(&self, s: &SessionRow) -> Result<AppGrant, IdentityError> {
        let grant_id = s.username.strip_prefix("app:").unwrap_or("");
        self.grant_row(grant_id)?
            .filter(|g| g.expires > self.now())
            .ok_or(IdentityError::BadChallenge)
    }

    /// Resolves an app's access token: the grant must still exist, and its app.
    pub(crate) fn app_session(
        &self,
        s: &SessionRow,
    ) -> Result<(String, AppSession), IdentityError> {
        let grant_id = s
            .username
            .strip_prefix("app:")
            .ok_or(IdentityError::Unauthenticated)?;
        let grant = self
            .grant_row(grant_id)?
            .ok_or(IdentityError::Unauthenticated)?;
        if self.app_row(&grant.client_id)?.is_none() {
            return Err(IdentityError::Unauthenticated);
        }
        let resources: Vec<String> = grant
            .scopes
            .iter()
            .filter_map(|x| AppScope::parse(x).ok().map(|_| x.clone()))
            .collect();
        Ok((
            grant.username.clone(),
            AppSession {
                client_id: grant.client_id,
                grant_id: grant.id,
                scopes: resources.join(" "),
                patient: grant.patient,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_scopes_parse_read_only_patient_and_user_scopes() {
        assert_eq!(
            AppScope::parse("patient/Observation.rs").unwrap(),
            AppScope {
                context: "patient",
                rtype: Some("Observation".into())
            }
        );
        assert_eq!(AppScope::parse("user/*.read").unwrap().rtype, None);
        for bad in [
            "patient/Observation.cruds",
            "patient/Observation.w",
            "system/*.rs",
            "patient/observation.rs",
            "user/*",
            "launch/encounter",
            "openid",
        ] {
            assert!(parse_app_scopes(bad).is_err(), "{bad}");
        }
        let registered = vec!["patient/*.rs".to_owned(), "launch".to_owned()];
        assert!(scope_within("patient/Observation.rs", &registered));
        assert!(scope_within("patient/Observation.read", &registered));
        assert!(!scope_within("user/Observation.rs", &registered));
        assert!(!scope_within("offline_access", &registered));
        assert_eq!(
            parse_app_scopes("launch fhirUser patient/*.rs patient/*.rs").unwrap(),
            ["launch", "fhirUser", "patient/*.rs"]
        );
    }

    #[test]
    fn pkce_s256_as_rfc_7636_appendix_b() {
        assert!(pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches("short", "x"));
    }

    #[test]
    fn redirect_uris_are_https_or_loopback() {
        for ok in [
            "https://app.example/cb",
            "http://127.0.0.1:9000/cb",
            "http://localhost/cb",
        ] {
            assert!(valid_redirect_uri(ok), "{ok}");
        }
        for bad in [
            "http://app.example/cb",
            "http://localhost.evil.example/cb",
            "https://app.example/cb#x",
            "javascript:alert(1)",
            "https://app.example/c b",
        ] {
            assert!(!valid_redirect_uri(bad), "{bad}");
        }
    }
}
