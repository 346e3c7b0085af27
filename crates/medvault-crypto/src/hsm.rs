//! The PKCS#11 key provider (`keys.provider = "pkcs11"`): the master key is an AES-256 key
//! generated inside a hardware security module (tested with SoftHSM2), marked sensitive
//! and non-extractable, so it never exists outside the token; wrapping and unwrapping are
//! AES-256-GCM operations the token performs (PKCS#11 v2.40 `CKM_AES_GCM`), with the same
//! random 96-bit nonce, associated data and output layout as a key held in memory. Each
//! version is a key object labelled `LABEL` (version 1) or `LABEL.vN`.

use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rand::RngCore;

use crate::CryptoError;

fn hsm(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Hsm(e.to_string())
}

/// Where the HSM is: the PKCS#11 module, the token's label, the user PIN, the key label.
#[derive(Clone)]
pub struct HsmConfig {
    pub module: std::path::PathBuf,
    pub token: String,
    pub pin: crate::Passphrase,
    pub key_label: String,
}

impl std::fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

/// A signed-in session on the token (PKCS#11 sessions are used by one thread at a time).
pub struct Hsm {
    // Field order: the session closes before the library is finalized.
    session: Mutex<Session>,
    _ctx: Pkcs11,
    key_label: String,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hsm([REDACTED])")
    }
}

impl Hsm {
    /// Loads the module, finds the token by label, opens a read-write session and signs in
    /// as the user.
    ///
    /// # Errors
    /// [`CryptoError::Hsm`] naming what failed (module, token, PIN).
    pub fn open(cfg: &HsmConfig) -> Result<Self, CryptoError> {
        let ctx = Pkcs11::new(&cfg.module)
            .map_err(|e| hsm(format!("cannot load {}: {e}", cfg.module.display())))?;
        ctx.initialize(CInitializeArgs::OsThreads).map_err(hsm)?;
        let slot = ctx
            .get_slots_with_token()
            .map_err(hsm)?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| t.label().trim() == cfg.token)
                    .unwrap_or(false)
            })
            .ok_or_else(|| hsm(format!("no token labelled `{}`", cfg.token)))?;
        let session = ctx.open_rw_session(slot).map_err(hsm)?;
        session
            .login(
                UserType::User,
                Some(&AuthPin::from(cfg.pin.expose().to_owned())),
            )
            .map_err(|e| hsm(format!("sign-in to the token refused: {e}")))?;
        Ok(Hsm {
            session: Mutex::new(session),
            _ctx: ctx,
            key_label: cfg.key_label.clone(),
        })
    }

    /// The label of the key object of `version`.
    pub fn label(&self, version: u32) -> String {
        if version <= 1 {
            self.key_label.clone()
        } else {
            format!("{}.v{version}", self.key_label)
        }
    }

    /// The token's key object of `version`, if there is one.
    pub fn find(&self, version: u32) -> Result<Option<ObjectHandle>, CryptoError> {
        let s = self.session.lock().map_err(|_| hsm("session lock"))?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.label(version).into_bytes()),
            ])
            .map_err(hsm)?;
        Ok(found.first().copied())
    }

    /// Generates the key object of `version` inside the token: AES-256, persistent,
    /// private, sensitive, never extractable.
    pub fn generate(&self, version: u32) -> Result<ObjectHandle, CryptoError> {
        let s = self.session.lock().map_err(|_| hsm("session lock"))?;
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(self.label(version).into_bytes()),
            ],
        )
        .map_err(hsm)
    }

    /// AES-256-GCM inside the token: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(
        &self,
        key: ObjectHandle,
        aad: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, aad, 128u64.into()).map_err(hsm)?;
        let s = self.session.lock().map_err(|_| hsm("session lock"))?;
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), key, plain)
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens what [`Hsm::seal`] made.
    pub fn open_sealed(
        &self,
        key: ObjectHandle,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < 12 + 16 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ct) = sealed.split_at(12);
        let mut iv = [0u8; 12];
        iv.copy_from_slice(nonce);
        let params = GcmParams::new(&mut iv, aad, 128u64.into()).map_err(hsm)?;
        let s = self.session.lock().map_err(|_| hsm("session lock"))?;
        s.decrypt(&Mechanism::AesGcm(params), key, ct)
            .map_err(|_| CryptoError::Decrypt)
    }
}
