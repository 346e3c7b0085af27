//! OpenID Connect single sign-on (OpenID Connect Core 1.0, through the openidconnect
//! crate): authorization code flow with PKCE (RFC 7636), state and nonce checked, the ID
//! token's signature, issuer, audience and expiry verified; the IdP's groups mapped to a
//! medvault role by configuration. The flow's secrets (PKCE verifier, nonce) are sealed in
//! the store under the state, so any server can finish what another began, once.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use medvault_store::{CredentialRow, Op};
use medvault_types::{Role, Username};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Identity, IdentityError};

const FLOW: &str = "oidc-flow";
/// Seconds a sign-in at the IdP may take.
const FLOW_SECS: i64 = 600;
/// How long discovered provider metadata (and its keys) is reused.
const METADATA_TTL: Duration = Duration::from_secs(600);

/// One configured identity provider (`[[oidc]]` in `medvault.toml`).
#[derive(Clone)]
pub struct OidcProvider {
    /// The name in URLs (`/auth/oidc/{name}/start`) and in user names (`{name}.{user}`).
    pub name: String,
    /// The issuer identifier; discovery reads `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// The ID token claim holding the user's groups (a string or a list of strings).
    pub role_claim: String,
    /// Group → role, first match wins.
    pub roles: Vec<(String, Role)>,
    /// `amr` values that count as a second factor at the IdP (RFC 8176).
    pub mfa_amr: Vec<String>,
    /// The claim naming the user (`preferred_username`; else the subject).
    pub username_claim: String,
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The providers and their discovered metadata.
#[derive(Default)]
pub(crate) struct Providers {
    list: OnceLock<Vec<OidcProvider>>,
    metadata: Mutex<Vec<(String, Instant, CoreProviderMetadata)>>,
}

#[derive(Serialize, Deserialize)]
struct Flow {
    verifier: String,
    nonce: String,
}

/// Who the IdP says signed in, checked and mapped.
#[derive(Debug)]
pub struct SsoIdentity {
    /// `{provider}.{user}`: SSO accounts never share a name with a local one.
    pub username: Username,
    pub role: Role,
    /// Whether the IdP reports a second factor (`amr`), so step-up holds at once.
    pub mfa: bool,
    /// What was verified, for the audit record.
    pub detail: String,
    /// Uses up the flow's state.
    pub ops: Vec<Op>,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(15))
        .build()
}

fn sso(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Sso(e.to_string())
}

fn state_id(state: &str) -> Vec<u8> {
    Sha256::digest([b"oidc-state|".as_slice(), state.as_bytes()].concat()).to_vec()
}

/// The claim `name` of a JWT's payload (read after the token was verified).
fn payload(jwt: &str) -> Result<Value, IdentityError> {
    let part = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| sso("malformed ID token"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(sso)?;
    serde_json::from_slice(&bytes).map_err(sso)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    }
}

impl Identity {
    /// Sets the configured identity providers (once).
    pub fn set_oidc_providers(&self, providers: Vec<OidcProvider>) {
        let _ = self.oidc.list.set(providers);
    }

    /// The configured providers' names.
    pub fn oidc_provider_names(&self) -> Vec<String> {
        self.oidc
            .list
            .get()
            .map(|l| l.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default()
    }

    fn provider(&self, name: &str) -> Result<OidcProvider, IdentityError> {
        self.oidc
            .list
            .get()
            .and_then(|l| l.iter().find(|p| p.name == name))
            .cloned()
            .ok_or(IdentityError::NoSuchProvider)
    }

    fn client(
        &self,
        p: &OidcProvider,
    ) -> Result<
        CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        IdentityError,
    > {
        let cached = self
            .oidc
            .metadata
            .lock()
            .map_err(|_| sso("metadata cache poisoned"))?
            .iter()
            .find(|(n, at, _)| n == &p.name && at.elapsed() < METADATA_TTL)
            .map(|(_, _, m)| m.clone());
        let meta = match cached {
            Some(m) => m,
            None => {
                let m = CoreProviderMetadata::discover(
                    &IssuerUrl::new(p.issuer.clone()).map_err(sso)?,
                    &agent(),
                )
                .map_err(|e| sso(format!("discovery at {} failed: {e}", p.issuer)))?;
                if let Ok(mut c) = self.oidc.metadata.lock() {
                    c.retain(|(n, _, _)| n != &p.name);
                    c.push((p.name.clone(), Instant::now(), m.clone()));
                }
                m
            }
        };
        let base = self
            .public_url
            .get()
            .ok_or_else(|| sso("the server's public URL is not known yet"))?;
        let redirect = format!("{base}/auth/oidc/{}/callback", p.name);
        Ok(CoreClient::from_provider_metadata(
            meta,
            ClientId::new(p.client_id.clone()),
            Some(ClientSecret::new(p.client_secret.clone())),
        )
        .set_redirect_uri(RedirectUrl::new(redirect).map_err(sso)?))
    }

    /// `GET /auth/oidc/{name}/start`: the IdP's authorization URL (code flow, PKCE S256,
    /// fresh state and nonce) and the operations that remember the flow.
    ///
    /// # Errors
    /// `NoSuchProvider`; `Sso` when discovery fails.
    pub fn oidc_start(&self, name: &str) -> Result<crate::Step<String>, IdentityError> {
        let p = self.provider(name)?;
        let client = self.client(&p)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        let flow = Flow {
            verifier: verifier.secret().clone(),
            nonce: nonce.secret().clone(),
        };
        let sealed = self
            .secrets
            .seal(
                format!("medvault:{FLOW}:v1|{name}").as_bytes(),
                &serde_json::to_vec(&flow).map_err(sso)?,
            )
            .map_err(sso)?;
        Ok(crate::Step {
            value: url.to_string(),
            ops: vec![Op::PutCredential(CredentialRow {
                kind: FLOW.into(),
                id: state_id(state.secret()),
                username: name.to_owned(),
                name: String::new(),
                data: sealed,
                created: self.now(),
                last_used: 0,
            })],
        })
    }

    /// `GET /auth/oidc/{name}/callback?code&state`: the state must name a live flow begun
    /// here for this provider (used once); the code is exchanged with the PKCE verifier;
    /// the ID token's signature, issuer, audience, expiry and nonce are verified; its
    /// groups must map to a role.
    ///
    /// # Errors
    /// `BadChallenge` (unknown, used or expired state), `Sso` (exchange or token refused),
    /// `NoRole`, `NoSuchProvider`.
    pub fn oidc_finish(
        &self,
        name: &str,
        code: &str,
        state: &str,
    ) -> Result<SsoIdentity, IdentityError> {
        let p = self.provider(name)?;
        let id = state_id(state);
        let row = self
            .store
            .credential(FLOW, &id)?
            .filter(|r| r.username == p.name && r.created + FLOW_SECS > self.now())
            .ok_or(IdentityError::BadChallenge)?;
        let flow: Flow = serde_json::from_slice(
            &self
                .secrets
                .open(format!("medvault:{FLOW}:v1|{name}").as_bytes(), &row.data)
                .map_err(sso)?,
        )
        .map_err(sso)?;
        let used = Op::DeleteCredential {
            kind: FLOW.into(),
            id,
            username: p.name.clone(),
        };
        let client = self.client(&p)?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(sso)?
            .set_pkce_verifier(PkceCodeVerifier::new(flow.verifier))
            .request(&agent())
            .map_err(|e| sso(format!("code exchange refused: {e}")))?;
        let id_token = token
            .id_token()
            .ok_or_else(|| sso("the IdP returned no ID token"))?;
        id_token
            .claims(&client.id_token_verifier(), &Nonce::new(flow.nonce))
            .map_err(|e| sso(format!("ID token refused: {e}")))?;
        let claims = payload(&id_token.to_string())?;
        let groups = strings(claims.get(&p.role_claim));
        let role = p
            .roles
            .iter()
            .find(|(g, _)| groups.contains(g))
            .map(|(_, r)| *r)
            .ok_or(IdentityError::NoRole)?;
        let who = claims
            .get(&p.username_claim)
            .or_else(|| claims.get("sub"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_lowercase();
        let username = Username::new(&format!("{}.{who}", p.name))
            .map_err(|_| sso("the IdP's user name is not usable here"))?;
        let amr = strings(claims.get("amr"));
        let mfa = amr.iter().any(|a| p.mfa_amr.contains(a));
        Ok(SsoIdentity {
            detail: format!(
                "sso {}; amr={}; groups -> {role}",
                p.name,
                if amr.is_empty() {
                    "-".into()
                } else {
                    amr.join("+")
                }
            ),
            username,
            role,
            mfa,
            ops: vec![used],
        })
    }

    /// Signs in an account the IdP vouched for, creating it or moving it to the role its
    /// groups map to now (a role change ends its other sessions). `mfa` from the IdP's
    /// `amr` makes step-up hold at once; otherwise step-up needs a local second factor.
    ///
    /// # Errors
    /// `Disabled` for a disabled or dormant account.
    pub fn sso_session(
        &self,
        who: &SsoIdentity,
        provider: &str,
        source: Option<&str>,
        ops: &mut Vec<Op>,
    ) -> Result<crate::Grant, IdentityError> {
        let user = match self.store.user(who.username.as_str())? {
            Some(u) => {
                if !self.usable(&u) {
                    return Err(IdentityError::Disabled);
                }
                if u.role != who.role.as_str() {
                    let mut moved = u.clone();
                    moved.role = who.role.as_str().to_owned();
                    ops.push(Op::PutUser(moved.clone()));
                    ops.push(Op::RevokeSessions {
                        username: u.username.clone(),
                    });
                    moved
                } else {
                    u
                }
            }
            None => {
                let step = self.new_user(who.username.clone(), who.role, None, None)?;
                let row = step.ops.iter().find_map(|op| match op {
                    Op::CreateUser(row) => Some(row.clone()),
                    _ => None,
                });
                ops.extend(step.ops);
                row.ok_or(IdentityError::Internal("no user row".into()))?
            }
        };
        self.start_session(&user, format!("oidc:{provider}"), who.mfa, source, ops)
    }
}
