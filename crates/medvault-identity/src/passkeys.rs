//! WebAuthn passkeys (W3C Web Authentication Level 2, through webauthn-rs): platform
//! authenticators — fingerprint, face — and security keys, user verification required.
//! Ceremony state and credentials are sealed in the store, so any server sharing it can
//! finish a ceremony another began. A passkey answers a second-factor challenge like a
//! TOTP code and counts against the same throttle when it fails.

use std::sync::OnceLock;

use medvault_store::{CredentialRow, Op};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use webauthn_rs::prelude::{
    Passkey, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, Url, Uuid, Webauthn, WebauthnBuilder,
};

use crate::login::{Factor, Grant, SessionInfo, PASSKEY};
use crate::{Identity, IdentityError, Refused, Step, Token};

const REGISTERING: &str = "webauthn-registration";
const AUTHENTICATING: &str = "webauthn-authentication";
/// Seconds a ceremony may take.
const CEREMONY_SECS: i64 = 300;

/// The relying party, known once the server knows the URL it is reached at.
#[derive(Default)]
pub(crate) struct RelyingParty(OnceLock<Webauthn>);

/// One registered passkey, as its owner sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PasskeyView {
    /// The credential id, base64url.
    pub id: String,
    pub name: String,
    pub created: i64,
    /// Unix seconds of its last use; 0 = never.
    pub last_used: i64,
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn bad(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Internal(e.to_string())
}

impl Identity {
    /// Sets the WebAuthn relying party from the public URL (`https://host[:port]`): the RP
    /// ID is the host. An IP address cannot be an RP ID (WebAuthn §5.1.4.1), so a loopback
    /// address becomes `localhost`, which browsers treat as a secure context; a server
    /// reached by another address needs `server.public_base_url` with a DNS name.
    ///
    /// # Errors
    /// `Internal` for a URL webauthn-rs refuses (an IP address that is not loopback).
    pub fn set_relying_party(&self, public_url: &str) -> Result<(), IdentityError> {
        let mut url = Url::parse(public_url).map_err(bad)?;
        let loopback = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback());
        if loopback {
            url.set_host(Some("localhost")).map_err(bad)?;
        }
        let _ = self
            .public_url
            .set(public_url.trim_end_matches('/').to_owned());
        let host = url.host_str().unwrap_or("localhost").to_owned();
        let w = WebauthnBuilder::new(&host, &url)
            .map_err(bad)?
            .rp_name("medvault")
            .build()
            .map_err(bad)?;
        let _ = self.rp.0.set(w);
        Ok(())
    }

    fn webauthn(&self) -> Result<&Webauthn, IdentityError> {
        self.rp.0.get().ok_or(IdentityError::Internal(
            "passkeys are not configured".into(),
        ))
    }

    fn seal_json<T: Serialize>(
        &self,
        kind: &str,
        user: &str,
        v: &T,
    ) -> Result<Vec<u8>, IdentityError> {
        let json = serde_json::to_vec(v).map_err(bad)?;
        self.secrets
            .seal(format!("medvault:{kind}:v1|{user}").as_bytes(), &json)
            .map_err(bad)
    }

    fn open_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        user: &str,
        sealed: &[u8],
    ) -> Result<T, IdentityError> {
        let json = self
            .secrets
            .open(format!("medvault:{kind}:v1|{user}").as_bytes(), sealed)
            .map_err(bad)?;
        serde_json::from_slice(&json).map_err(bad)
    }

    fn stored_passkeys(
        &self,
        username: &str,
    ) -> Result<Vec<(CredentialRow, Passkey)>, IdentityError> {
        self.store
            .credentials(username, PASSKEY)?
            .into_iter()
            .map(|row| {
                let pk: Passkey = self.open_json(PASSKEY, username, &row.data)?;
                Ok((row, pk))
            })
            .collect()
    }

    /// A user's passkeys (no key material).
    ///
    /// # Errors
    /// `Store`.
    pub fn passkeys(&self, username: &str) -> Result<Vec<PasskeyView>, IdentityError> {
        Ok(self
            .store
            .credentials(username, PASSKEY)?
            .into_iter()
            .map(|r| PasskeyView {
                id: b64(&r.id),
                name: r.name,
                created: r.created,
                last_used: r.last_used,
            })
            .collect())
    }

    /// Revokes one of a user's passkeys by its base64url id.
    ///
    /// # Errors
    /// `NoSuchSession` (reused as "no such credential") when the user has none by that id.
    pub fn revoke_passkey(&self, username: &str, id: &str) -> Result<Vec<Op>, IdentityError> {
        let row = self
            .store
            .credentials(username, PASSKEY)?
            .into_iter()
            .find(|r| b64(&r.id) == id)
            .ok_or(IdentityError::NoSuchSession)?;
        Ok(vec![Op::DeleteCredential {
            kind: PASSKEY.into(),
            id: row.id,
            username: username.to_owned(),
        }])
    }

    fn user_handle(&self, username: &str) -> Uuid {
        let tag = self
            .mac
            .tag(&[b"webauthn/user-handle", username.as_bytes()]);
        let mut b = [0u8; 16];
        b.copy_from_slice(tag.get(..16).unwrap_or(&[0; 16]));
        Uuid::from_bytes(b)
    }

    /// Begins registering a passkey for the signed-in user: the `PublicKeyCredentialCreationOptions`
    /// (JSON, as browsers' `navigator.credentials.create` takes them), excluding the
    /// user's existing passkeys.
    ///
    /// # Errors
    /// `Internal` when passkeys are not configured; `Store`.
    pub fn passkey_registration_start(
        &self,
        session: &SessionInfo,
    ) -> Result<Step<Value>, IdentityError> {
        let name = session.principal.username.as_str();
        let existing = self
            .stored_passkeys(name)?
            .into_iter()
            .map(|(_, pk)| pk.cred_id().clone())
            .collect::<Vec<_>>();
        let (options, state) = self
            .webauthn()?
            .start_passkey_registration(self.user_handle(name), name, name, Some(existing))
            .map_err(bad)?;
        let now = self.now();
        let ops = vec![
            Op::DeleteCredentials {
                username: name.to_owned(),
                kind: REGISTERING.into(),
            },
            Op::PutCredential(CredentialRow {
                kind: REGISTERING.into(),
                id: Sha256::digest([b"reg".as_slice(), &session.token_hash].concat()).to_vec(),
                username: name.to_owned(),
                name: String::new(),
                data: self.seal_json(REGISTERING, name, &state)?,
                created: now,
                last_used: 0,
            }),
        ];
        Ok(Step {
            value: serde_json::to_value(options).map_err(bad)?,
            ops,
        })
    }

    /// Finishes a registration begun in this session with the authenticator's answer;
    /// stores the passkey under `label`. Returns its id.
    ///
    /// # Errors
    /// `BadCode` for an answer that does not verify (wrong origin, challenge, no user
    /// verification) or no registration in progress.
    pub fn passkey_registration_finish(
        &self,
        session: &SessionInfo,
        label: &str,
        credential: Value,
    ) -> Result<Step<String>, IdentityError> {
        let name = session.principal.username.as_str();
        let id = Sha256::digest([b"reg".as_slice(), &session.token_hash].concat()).to_vec();
        let row = self
            .store
            .credential(REGISTERING, &id)?
            .filter(|r| r.username == name && r.created + CEREMONY_SECS > self.now())
            .ok_or(IdentityError::BadCode)?;
        let state: PasskeyRegistration = self.open_json(REGISTERING, name, &row.data)?;
        let reg: RegisterPublicKeyCredential =
            serde_json::from_value(credential).map_err(|_| IdentityError::BadCode)?;
        let pk = self
            .webauthn()?
            .finish_passkey_registration(&reg, &state)
            .map_err(|_| IdentityError::BadCode)?;
        let cred_id = pk.cred_id().to_vec();
        let now = self.now();
        let label: String = label.chars().filter(|c| !c.is_control()).take(64).collect();
        Ok(Step {
            value: b64(&cred_id),
            ops: vec![
                Op::DeleteCredential {
                    kind: REGISTERING.into(),
                    id,
                    username: name.to_owned(),
                },
                Op::PutCredential(CredentialRow {
                    kind: PASSKEY.into(),
                    id: cred_id,
                    username: name.to_owned(),
                    name: if label.is_empty() {
                        "passkey".into()
                    } else {
                        label
                    },
                    data: self.seal_json(PASSKEY, name, &pk)?,
                    created: now,
                    last_used: 0,
                }),
            ],
        })
    }

    fn authentication_id(mfa_token: &Token) -> Vec<u8> {
        Sha256::digest([b"auth".as_slice(), &mfa_token.hash()].concat()).to_vec()
    }

    fn step_up_id(session: &SessionInfo) -> Vec<u8> {
        Sha256::digest([b"step-up".as_slice(), &session.token_hash].concat()).to_vec()
    }

    /// Request options for `username`'s passkeys (user verification required), the
    /// ceremony remembered under `ceremony`.
    fn assertion_start(
        &self,
        username: &str,
        ceremony: Vec<u8>,
    ) -> Result<Step<Value>, IdentityError> {
        let keys: Vec<Passkey> = self
            .stored_passkeys(username)?
            .into_iter()
            .map(|(_, pk)| pk)
            .collect();
        if keys.is_empty() {
            return Err(IdentityError::BadCode);
        }
        let (options, state) = self
            .webauthn()?
            .start_passkey_authentication(&keys)
            .map_err(bad)?;
        Ok(Step {
            value: serde_json::to_value(options).map_err(bad)?,
            ops: vec![
                Op::DeleteCredentials {
                    username: username.to_owned(),
                    kind: AUTHENTICATING.into(),
                },
                Op::PutCredential(CredentialRow {
                    kind: AUTHENTICATING.into(),
                    id: ceremony,
                    username: username.to_owned(),
                    name: String::new(),
                    data: self.seal_json(AUTHENTICATING, username, &state)?,
                    created: self.now(),
                    last_used: 0,
                }),
            ],
        })
    }

    /// Verifies an assertion against the ceremony `ceremony` of `username`: the passkey's
    /// id and its new sealed state (signature counter).
    fn assertion_verify(
        &self,
        username: &str,
        ceremony: &[u8],
        credential: Value,
    ) -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
        let row = self
            .store
            .credential(AUTHENTICATING, ceremony)?
            .filter(|r| r.username == username && r.created + CEREMONY_SECS > self.now())
            .ok_or(IdentityError::BadCode)?;
        let state: PasskeyAuthentication = self.open_json(AUTHENTICATING, username, &row.data)?;
        let pkc: PublicKeyCredential =
            serde_json::from_value(credential).map_err(|_| IdentityError::BadCode)?;
        let result = self
            .webauthn()?
            .finish_passkey_authentication(&pkc, &state)
            .map_err(|_| IdentityError::BadCode)?;
        let (row, mut pk) = self
            .stored_passkeys(username)?
            .into_iter()
            .find(|(_, pk)| pk.cred_id() == result.cred_id())
            .ok_or(IdentityError::BadCode)?;
        pk.update_credential(&result);
        Ok((row.id, self.seal_json(PASSKEY, username, &pk)?))
    }

    fn ceremony_used(username: &str, ceremony: Vec<u8>) -> Op {
        Op::DeleteCredential {
            kind: AUTHENTICATING.into(),
            id: ceremony,
            username: username.to_owned(),
        }
    }

    /// Begins a passkey answer to a second-factor challenge: the
    /// `PublicKeyCredentialRequestOptions` for the user's passkeys (user verification
    /// required).
    ///
    /// # Errors
    /// `BadChallenge`; `BadCode` when the user has no passkey.
    pub fn passkey_login_start(&self, mfa_token: &Token) -> Result<Step<Value>, IdentityError> {
        let user = self.challenge_user(mfa_token)?;
        self.assertion_start(&user.username, Self::authentication_id(mfa_token))
    }

    /// Finishes a passkey answer to a second-factor challenge. The ceremony is used once
    /// (a replayed assertion finds none); a failed assertion counts against the challenge
    /// and the throttle like a wrong code.
    ///
    /// # Errors
    /// `BadChallenge`, `BadCode`, `Locked`, `Store`.
    pub fn passkey_login_finish(
        &self,
        mfa_token: &Token,
        credential: Value,
        source: Option<&str>,
    ) -> Result<Step<Grant>, Refused> {
        let user = self.challenge_user(mfa_token)?;
        let id = Self::authentication_id(mfa_token);
        match self.assertion_verify(&user.username, &id, credential) {
            Ok((cred, state)) => {
                let mut step =
                    self.finish_login(mfa_token, &Factor::Passkey { id: cred, state }, source)?;
                step.ops.insert(0, Self::ceremony_used(&user.username, id));
                Ok(step)
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(_) => {
                let mut r = self.passkey_failed(&user.username, Some(mfa_token), source);
                // The ceremony dies with a failed answer (it may have been used already).
                if self.store.credential(AUTHENTICATING, &id)?.is_some() {
                    r.ops.push(Self::ceremony_used(&user.username, id));
                }
                Err(r)
            }
        }
    }

    /// Begins step-up with a passkey inside a session.
    ///
    /// # Errors
    /// `BadCode` when the user has no passkey.
    pub fn passkey_step_up_start(
        &self,
        session: &SessionInfo,
    ) -> Result<Step<Value>, IdentityError> {
        self.assertion_start(
            session.principal.username.as_str(),
            Self::step_up_id(session),
        )
    }

    /// Finishes step-up with a passkey: the session's second factor is fresh again. A
    /// failed assertion counts against the throttle.
    ///
    /// # Errors
    /// `BadCode`, `Locked`, `Store`.
    pub fn passkey_step_up_finish(
        &self,
        session: &SessionInfo,
        credential: Value,
        source: Option<&str>,
    ) -> Result<Step<()>, Refused> {
        let name = session.principal.username.as_str();
        let id = Self::step_up_id(session);
        match self.assertion_verify(name, &id, credential) {
            Ok((cred, state)) => {
                let mut step =
                    self.step_up(session, &Factor::Passkey { id: cred, state }, source)?;
                step.ops.insert(0, Self::ceremony_used(name, id));
                Ok(step)
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(_) => {
                let mut r = self.passkey_failed(name, None, source);
                if self.store.credential(AUTHENTICATING, &id)?.is_some() {
                    r.ops.push(Self::ceremony_used(name, id));
                }
                Err(r)
            }
        }
    }

    /// Passwordless sign-in, step one (where `session.passwordless` allows it): request
    /// options for `username`'s passkeys and a ceremony handle. An unknown user, or one
    /// without passkeys, gets options of the same shape naming a decoy credential derived
    /// from the name (stable, so repeated asks look alike): the answer never tells whether
    /// the account exists.
    ///
    /// # Errors
    /// `Internal` when passkeys are not configured.
    pub fn passwordless_start(&self, username: &str) -> Result<Step<Value>, IdentityError> {
        let mut h = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut h);
        let handle = b64(&h);
        let ceremony = Sha256::digest(format!("passwordless|{handle}")).to_vec();
        let rp_id = self
            .webauthn()?
            .get_allowed_origins()
            .first()
            .and_then(|o| o.host_str().map(str::to_owned))
            .unwrap_or_default();
        let real = match self.store.user(username)? {
            Some(u) if !self.stored_passkeys(&u.username)?.is_empty() => {
                Some(self.assertion_start(&u.username, ceremony)?)
            }
            _ => None,
        };
        let (options, ops) = match real {
            Some(step) => (step.value, step.ops),
            None => {
                let mut challenge = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut challenge);
                let decoy = self.mac.tag(&[b"webauthn/decoy", username.as_bytes()]);
                let options = serde_json::json!({"publicKey": {
                    "challenge": b64(&challenge),
                    "timeout": 300_000,
                    "rpId": rp_id,
                    "allowCredentials": [{"type": "public-key", "id": b64(decoy.get(..16).unwrap_or(&[]))}],
                    "userVerification": "required",
                }});
                (options, vec![])
            }
        };
        // The same fields for real and decoy answers.
        let pk = options.get("publicKey").cloned().unwrap_or_default();
        let allow: Vec<Value> = pk
            .get("allowCredentials")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|c| serde_json::json!({"type": "public-key", "id": c.get("id").cloned().unwrap_or_default()}))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Step {
            value: serde_json::json!({
                "ceremony": handle,
                "publicKey": {
                    "challenge": pk.get("challenge").cloned().unwrap_or_default(),
                    "timeout": pk.get("timeout").cloned().unwrap_or_default(),
                    "rpId": pk.get("rpId").cloned().unwrap_or_default(),
                    "allowCredentials": allow,
                    "userVerification": "required",
                }
            }),
            ops,
        })
    }

    /// Passwordless sign-in, step two: the assertion for the ceremony `handle` of
    /// `username`. Answers to the throttle of the account from this address and of the
    /// address, not the account-wide one (a sprayer elsewhere cannot lock her out).
    ///
    /// # Errors
    /// `BadCredentials`, `Locked`, `Store`.
    pub fn passwordless_finish(
        &self,
        username: &str,
        handle: &str,
        credential: Value,
        source: Option<&str>,
    ) -> Result<Step<Grant>, Refused> {
        let ceremony = Sha256::digest(format!("passwordless|{handle}")).to_vec();
        let name = self
            .store
            .user(username)?
            .map(|u| u.username)
            .unwrap_or_default();
        match self.assertion_verify(&name, &ceremony, credential) {
            Ok((cred, state)) => {
                let mut step = self.passkey_login(&name, cred, state, source)?;
                step.ops.insert(0, Self::ceremony_used(&name, ceremony));
                Ok(step)
            }
            Err(IdentityError::Store(e)) => Err(e.into()),
            Err(_) => {
                let mut r = self.passkey_failed(username, None, source);
                r.error = IdentityError::BadCredentials;
                if !name.is_empty() && self.store.credential(AUTHENTICATING, &ceremony)?.is_some() {
                    r.ops.push(Self::ceremony_used(&name, ceremony));
                }
                Err(r)
            }
        }
    }
}
