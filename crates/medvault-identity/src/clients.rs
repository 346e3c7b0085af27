//! Service clients: other systems calling medvault with OAuth2 client credentials (RFC 6749
//! §4.4), authenticated by a client secret (stored only as a MAC) or by a signed JWT
//! assertion (`private_key_jwt`, RFC 7523, as SMART Backend Services requires), and given
//! short-lived access tokens limited to SMART v2 scopes such as `system/Observation.rs`.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use medvault_store::{CredentialRow, Op, SessionRow};
use medvault_types::{Role, Username};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::throttle::{Attempt, Method};
use crate::{Identity, IdentityError, Principal, Refused, Step, Token};

const CLIENT: &str = "client";
const JTI: &str = "client-jti";
/// The owner name of every client row (clients are listed together).
const CLIENTS: &str = "(clients)";
/// Seconds an access token lives.
pub const CLIENT_TOKEN_SECS: i64 = 300;
/// The longest a client assertion may be valid for (SMART Backend Services: 5 minutes).
const ASSERTION_MAX_SECS: i64 = 300;

/// One SMART v2 system scope: a resource type (or every type) and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartScope {
    /// `None` for `*`.
    pub rtype: Option<String>,
    /// `r` or `s`: read and search.
    pub read: bool,
    /// `c` or `u`: create and update (`d` is never granted to a client).
    pub write: bool,
}

impl SmartScope {
    /// Parses `system/Type.cruds` (SMART App Launch 2.0 §3, permissions in order) or the
    /// v1 forms `system/Type.read|write|*`.
    ///
    /// # Errors
    /// `BadScope` naming the scope.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadScope(s.chars().take(80).collect());
        let rest = s.strip_prefix("system/").ok_or_else(bad)?;
        let (rtype, perms) = rest.split_once('.').ok_or_else(bad)?;
        let valid_type = rtype == "*"
            || (rtype.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && rtype.chars().all(|c| c.is_ascii_alphanumeric()));
        if !valid_type {
            return Err(bad());
        }
        let (read, write) = match perms {
            "read" => (true, false),
            "write" => (false, true),
            "*" => (true, true),
            p => {
                let order = "cruds";
                let mut last = None;
                for ch in p.chars() {
                    let i = order.find(ch).ok_or_else(bad)?;
                    if last.is_some_and(|l| i <= l) || ch == 'd' {
                        return Err(bad());
                    }
                    last = Some(i);
                }
                if p.is_empty() {
                    return Err(bad());
                }
                (
                    p.contains('r') || p.contains('s'),
                    p.contains('c') || p.contains('u'),
                )
            }
        };
        Ok(SmartScope {
            rtype: (rtype != "*").then(|| rtype.to_owned()),
            read,
            write,
        })
    }
}

/// Parses a space-separated scope list.
///
/// # Errors
/// `BadScope` for the first scope that does not parse, or an empty list.
pub fn parse_scopes(s: &str) -> Result<Vec<(String, SmartScope)>, IdentityError> {
    let list: Vec<(String, SmartScope)> = s
        .split_whitespace()
        .map(|x| SmartScope::parse(x).map(|p| (x.to_owned(), p)))
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(IdentityError::BadScope("(none)".into()));
    }
    Ok(list)
}

#[derive(Serialize, Deserialize)]
struct ClientRecord {
    name: String,
    scopes: Vec<String>,
    /// MAC of the secret under the identity key; `None` for `private_key_jwt` clients.
    secret_mac: Option<Vec<u8>>,
    /// The public JWK for `private_key_jwt`.
    jwk: Option<Value>,
}

/// A registered client, as a security administrator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub client_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// `client_secret` or `private_key_jwt`.
    pub auth: &'static str,
    pub created: i64,
}

/// A new client's id, and its secret to show once (none for `private_key_jwt`).
#[derive(Debug)]
pub struct NewClient {
    pub client_id: String,
    pub client_secret: Option<Token>,
}

/// How a client authenticates at the token endpoint.
#[derive(Debug)]
pub enum ClientAuth<'a> {
    /// `client_secret_basic` or `client_secret_post`.
    Secret { client_id: &'a str, secret: &'a str },
    /// `private_key_jwt`: the client assertion (RFC 7523 §2.2).
    Assertion { jwt: &'a str },
}

/// An access token for a client.
#[derive(Debug)]
pub struct ClientGrant {
    pub token: Token,
    pub scope: String,
    pub expires_in: i64,
    /// The client's principal name (`client.{name}`), for the audit record.
    pub client: String,
}

#[derive(Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    exp: i64,
    jti: String,
}

fn bad_client() -> IdentityError {
    IdentityError::BadCredentials
}

impl Identity {
    fn client_row(
        &self,
        client_id: &str,
    ) -> Result<Option<(CredentialRow, ClientRecord)>, IdentityError> {
        let Some(row) = self.store.credential(CLIENT, client_id.as_bytes())? else {
            return Ok(None);
        };
        let rec: ClientRecord = serde_json::from_slice(
            &self
                .secrets
                .open(
                    format!("medvault:{CLIENT}:v1|{client_id}").as_bytes(),
                    &row.data,
                )
                .map_err(|e| IdentityError::Internal(e.to_string()))?,
        )
        .map_err(|e| IdentityError::Internal(e.to_string()))?;
        Ok(Some((row, rec)))
    }

    /// Registers a client named `name` (a-z, 0-9, `-`) with `scopes`; with a public `jwk`
    /// it authenticates by `private_key_jwt`, else by a generated secret shown once.
    ///
    /// # Errors
    /// `BadScope`; `BadRequest`-worthy `WeakPassword`-free errors as `BadScope` for a bad
    /// name or JWK.
    pub fn new_client(
        &self,
        name: &str,
        scopes: &str,
        jwk: Option<Value>,
    ) -> Result<Step<NewClient>, IdentityError> {
        if name.is_empty()
            || name.len() > 40
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(IdentityError::BadClient(
                "a client name is 1-40 of a-z, 0-9 and -".into(),
            ));
        }
        let scopes: Vec<String> = parse_scopes(scopes)?.into_iter().map(|(s, _)| s).collect();
        if let Some(j) = &jwk {
            let k: Jwk = serde_json::from_value(j.clone())
                .map_err(|_| IdentityError::BadClient("the key is not a JWK".into()))?;
            // Only asymmetric keys: a shared (`oct`) key would be a secret stored in the clear.
            if !matches!(j.get("kty").and_then(Value::as_str), Some("RSA" | "EC")) {
                return Err(IdentityError::BadClient(
                    "the JWK must be an RSA or EC public key (RS384 or ES384)".into(),
                ));
            }
            DecodingKey::from_jwk(&k).map_err(|_| {
                IdentityError::BadClient("the JWK is not a usable public key".into())
            })?;
            if j.get("d").is_some() {
                return Err(IdentityError::BadClient(
                    "that JWK holds a private key; register the public key only".into(),
                ));
            }
        }
        let mut b = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut b);
        let client_id = format!(
            "{name}-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        let secret = jwk.is_none().then(Token::generate);
        let rec = ClientRecord {
            name: name.to_owned(),
            scopes,
            secret_mac: secret.as_ref().map(|s| {
                self.mac
                    .tag(&[
                        b"client-secret",
                        client_id.as_bytes(),
                        s.expose().as_bytes(),
                    ])
                    .to_vec()
            }),
            jwk,
        };
        let sealed = self
            .secrets
            .seal(
                format!("medvault:{CLIENT}:v1|{client_id}").as_bytes(),
                &serde_json::to_vec(&rec).map_err(|e| IdentityError::Internal(e.to_string()))?,
            )
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
        Ok(Step {
            value: NewClient {
                client_id: client_id.clone(),
                client_secret: secret,
            },
            ops: vec![Op::PutCredential(CredentialRow {
                kind: CLIENT.into(),
                id: client_id.into_bytes(),
                username: CLIENTS.into(),
                name: name.to_owned(),
                data: sealed,
                created: self.now(),
                last_used: 0,
            })],
        })
    }

    /// Every registered client.
    ///
    /// # Errors
    /// `Store`.
    pub fn clients(&self) -> Result<Vec<ClientView>, IdentityError> {
        self.store
            .credentials(CLIENTS, CLIENT)?
            .into_iter()
            .map(|row| {
                let id = String::from_utf8_lossy(&row.id).into_owned();
                let (_, rec) = self.client_row(&id)?.ok_or(IdentityError::NoSuchUser)?;
                Ok(ClientView {
                    client_id: id,
                    name: rec.name,
                    scopes: rec.scopes,
                    auth: if rec.jwk.is_some() {
                        "private_key_jwt"
                    } else {
                        "client_secret"
                    },
                    created: row.created,
                })
            })
            .collect()
    }

    /// Revokes a client and every token it holds, at once.
    ///
    /// # Errors
    /// `NoSuchUser` for an unknown client id.
    pub fn revoke_client(&self, client_id: &str) -> Result<Vec<Op>, IdentityError> {
        self.client_row(client_id)?
            .ok_or(IdentityError::NoSuchUser)?;
        Ok(vec![
            Op::DeleteCredential {
                kind: CLIENT.into(),
                id: client_id.as_bytes().to_vec(),
                username: CLIENTS.into(),
            },
            Op::RevokeSessions {
                username: format!("client:{client_id}"),
            },
        ])
    }

    /// `POST /auth/token` (`grant_type=client_credentials`): authenticates the client and
    /// issues a token for the requested scopes (each must be one the client holds; none
    /// requested: all of them). Failures count against the throttle for the client id and
    /// the address. `token_url` is the audience a client assertion must name.
    ///
    /// # Errors
    /// `BadCredentials` (unknown client, wrong secret, bad or replayed assertion),
    /// `BadScope`, `Locked`, `Store`.
    pub fn client_token(
        &self,
        auth: &ClientAuth<'_>,
        requested: Option<&str>,
        token_url: &str,
        source: Option<&str>,
    ) -> Result<Step<ClientGrant>, Refused> {
        let claimed = match auth {
            ClientAuth::Secret { client_id, .. } => (*client_id).to_owned(),
            ClientAuth::Assertion { jwt } => {
                // The issuer is only a claim until the signature verifies below.
                let unverified = jwt.split('.').nth(1).and_then(|p| {
                    use base64::Engine;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(p.trim_end_matches('='))
                        .ok()
                });
                unverified
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| v.get("iss").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default()
            }
        };
        let attempt = Attempt::new(&self.mac, &format!("client:{claimed}"), source);
        let rows = self.store.throttle(&attempt.keys())?;
        let wait = attempt.retry_after(&self.lockout, Method::Password, &rows, self.now());
        if wait > 0 {
            return Err(IdentityError::Locked { retry_after: wait }.into());
        }
        let fail = |error: IdentityError| {
            let (ops, locks) = attempt.fail(&self.lockout, &rows, self.now());
            Refused {
                error,
                ops,
                locks,
                username: None,
            }
        };
        let Some((_, rec)) = self.client_row(&claimed)? else {
            return Err(fail(bad_client()));
        };
        let mut ops = vec![];
        let method = match (auth, &rec.secret_mac, &rec.jwk) {
            (ClientAuth::Secret { client_id, secret }, Some(mac), _) => {
                if !self.mac.verify(
                    &[b"client-secret", client_id.as_bytes(), secret.as_bytes()],
                    mac,
                ) {
                    return Err(fail(bad_client()));
                }
                "client_secret"
            }
            (ClientAuth::Assertion { jwt }, _, Some(jwk)) => {
                match self.verify_assertion(jwt, &claimed, jwk, token_url) {
                    Some(jti) => {
                        ops.push(Op::PutCredential(CredentialRow {
                            kind: JTI.into(),
                            id: Sha256::digest(format!("{claimed}|{jti}")).to_vec(),
                            username: CLIENTS.into(),
                            name: String::new(),
                            data: vec![],
                            created: self.now(),
                            last_used: 0,
                        }));
                        "private_key_jwt"
                    }
                    None => return Err(fail(bad_client())),
                }
            }
            _ => return Err(fail(bad_client())),
        };
        let granted: Vec<String> = match requested.map(str::trim).filter(|r| !r.is_empty()) {
            None => rec.scopes.clone(),
            Some(r) => {
                let want: Vec<String> = r.split_whitespace().map(str::to_owned).collect();
                if let Some(extra) = want.iter().find(|w| !rec.scopes.contains(w)) {
                    return Err(IdentityError::BadScope(extra.chars().take(80).collect()).into());
                }
                want
            }
        };
        let token = Token::generate();
        let now = self.now();
        ops.push(Op::PutSession(SessionRow {
            token_hash: token.hash(),
            kind: CLIENT.into(),
            username: format!("client:{claimed}"),
            created: now,
            last_seen: now,
            expires: now + CLIENT_TOKEN_SECS,
            attempts: 0,
            mfa_at: 0,
            source: source.unwrap_or("").to_owned(),
            method: method.into(),
            scope: granted.join(" "),
        }));
        ops.extend(attempt.succeed(&rows));
        Ok(Step {
            value: ClientGrant {
                token,
                scope: granted.join(" "),
                expires_in: CLIENT_TOKEN_SECS,
                client: format!("client.{}", rec.name),
            },
            ops,
        })
    }

    /// Verifies a client assertion (RFC 7523 §3; SMART Backend Services): signed by the
    /// registered key, `iss` = `sub` = the client, `aud` = the token endpoint, `exp` in the
    /// future and at most five minutes away, a `jti`. Returns the `jti` (its single use is
    /// enforced by the store).
    fn verify_assertion(
        &self,
        jwt: &str,
        client_id: &str,
        jwk: &Value,
        token_url: &str,
    ) -> Option<String> {
        let header = decode_header(jwt).ok()?;
        let k: Jwk = serde_json::from_value(jwk.clone()).ok()?;
        let key = DecodingKey::from_jwk(&k).ok()?;
        let allowed = [
            Algorithm::RS384,
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::ES256,
            Algorithm::PS384,
        ];
        if !allowed.contains(&header.alg) {
            return None;
        }
        let mut v = Validation::new(header.alg);
        v.set_audience(&[token_url]);
        v.set_issuer(&[client_id]);
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        v.leeway = 30;
        let data = decode::<AssertionClaims>(jwt, &key, &v).ok()?;
        let c = data.claims;
        let now = self.now();
        if c.sub != client_id
            || c.iss != client_id
            || c.exp < now
            || c.exp - now > ASSERTION_MAX_SECS + 30
        {
            return None;
        }
        (!c.jti.is_empty()).then_some(c.jti)
    }

    /// Resolves a client's access token: the principal (`client.{name}`, role `service`)
    /// and its granted scopes.
    pub(crate) fn client_principal(&self, username: &str) -> Result<Principal, IdentityError> {
        let id = username
            .strip_prefix("client:")
            .ok_or(IdentityError::Unauthenticated)?;
        let (_, rec) = self.client_row(id)?.ok_or(IdentityError::Unauthenticated)?;
        Ok(Principal {
            username: Username::new(&format!("client.{}", rec.name))
                .map_err(|_| IdentityError::Unauthenticated)?,
            role: Role::Service,
            practitioner: None,
            training_current: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_scopes_parse_and_refuse() {
        let s = SmartScope::parse("system/Observation.rs").unwrap();
        assert_eq!(
            (s.rtype.as_deref(), s.read, s.write),
            (Some("Observation"), true, false)
        );
        let s = SmartScope::parse("system/*.cru").unwrap();
        assert_eq!((s.rtype, s.read, s.write), (None, true, true));
        assert!(SmartScope::parse("system/Patient.read").unwrap().read);
        for bad in [
            "patient/Observation.rs",
            "system/Observation.sr",
            "system/Observation.d",
            "system/Observation.cruds",
            "system/observation.rs",
            "system/Observation",
            "system/Observation.rs?category=x",
        ] {
            assert!(SmartScope::parse(bad).is_err(), "{bad}");
        }
    }
}
