//! medvault-crypto — the key hierarchy and the record cipher.
//!
//! master key (file, 0600) ─┬─ wraps per-patient data keys (AES-256-GCM, AAD = patient id + key version)
//!                          └─ wraps the index root key, from which HKDF derives the blind-index key
//!
//! This room must never log, print or `Debug` a key, write a key file readable by
//! anyone but its owner, or reuse a nonce: every seal draws a fresh random 96-bit nonce.
//! INVARIANT: key material lives in types that zeroize on drop and print `[REDACTED]`.
#![forbid(unsafe_code)]

pub mod hsm;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use medvault_types::PatientId;
use rand::RngCore;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {0} is readable by group or others; run `chmod 600` on it")]
    KeyFilePermissions(String),
    #[error("key file {0} is not a valid medvault key")]
    KeyFileFormat(String),
    #[error("key file i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("decryption failed: wrong key, or the ciphertext was altered or moved")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
    #[error(
        "master key version {0} is not available ({1}), and something this needs is wrapped by it"
    )]
    MissingVersion(u32, String),
    #[error("the passphrase does not open {0}")]
    WrongPassphrase(String),
    #[error("HSM (PKCS#11): {0}")]
    Hsm(String),
}

macro_rules! secret_key {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);
        impl $name {
            pub fn generate() -> Self {
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                Self(k)
            }
            fn from_slice(b: &[u8]) -> Option<Self> {
                let k: [u8; 32] = b.try_into().ok()?;
                Some(Self(k))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}([REDACTED])", stringify!($name))
            }
        }
    };
}

secret_key!(
    /// A master key held in memory (from a key file, sealed or not).
    LocalMasterKey
);

/// The root of the hierarchy. Only wraps other keys; never encrypts records. Held in
/// memory (a key file, sealed or not) or inside an HSM, where it never leaves the token.
pub struct MasterKey(Root);

enum Root {
    Local(LocalMasterKey),
    Hsm(Arc<hsm::Hsm>, cryptoki::object::ObjectHandle),
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}
secret_key!(
    /// A patient's record key. Shredding it destroys the patient's records.
    DataKey
);
impl DataKey {
    /// A key from raw bytes (a backup repository's key, handed to the gate for wrapping).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    /// The raw key, for deriving a key of another algorithm from it (e.g. the Ed25519 audit
    /// signing key). Never log or store the result.
    pub fn expose_for_derivation(&self) -> &[u8; 32] {
        &self.0
    }
}

secret_key!(
    /// Root of the blind-index key, wrapped by the master key so rotation keeps indexes valid.
    IndexRootKey
);

const KEY_FILE_TAG: &str = "medvault-master-key-v1:";

impl MasterKey {
    /// A random key held in memory.
    pub fn generate() -> Self {
        MasterKey(Root::Local(LocalMasterKey::generate()))
    }

    fn from_slice(b: &[u8]) -> Option<Self> {
        LocalMasterKey::from_slice(b).map(|k| MasterKey(Root::Local(k)))
    }

    /// The key object of an HSM (never extracted).
    pub fn in_hsm(h: Arc<hsm::Hsm>, handle: cryptoki::object::ObjectHandle) -> Self {
        MasterKey(Root::Hsm(h, handle))
    }

    fn local_bytes(&self) -> Result<&[u8; 32], CryptoError> {
        match &self.0 {
            Root::Local(k) => Ok(&k.0),
            Root::Hsm(..) => Err(CryptoError::Hsm(
                "a key inside an HSM never leaves it".into(),
            )),
        }
    }

    /// AES-256-GCM under this key (in memory, or inside the token).
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.0 {
            Root::Local(k) => seal_with(&Aes256Gcm::new((&k.0).into()), aad, plain),
            Root::Hsm(h, o) => h.seal(*o, aad, plain),
        }
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.0 {
            Root::Local(k) => open_with(&Aes256Gcm::new((&k.0).into()), aad, sealed),
            Root::Hsm(h, o) => h.open_sealed(*o, aad, sealed),
        }
    }

    /// Creates a new key file with mode 0600; refuses to overwrite an existing file.
    pub fn create_file(path: &Path) -> Result<Self, CryptoError> {
        let key = Self::generate();
        let mut hex = String::with_capacity(KEY_FILE_TAG.len() + 64);
        hex.push_str(KEY_FILE_TAG);
        for b in key.local_bytes()? {
            hex.push_str(&format!("{b:02x}"));
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(hex.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        hex.zeroize();
        Ok(key)
    }

    /// Loads a key file, refusing one that group or others may read.
    pub fn load_file(path: &Path) -> Result<Self, CryptoError> {
        let name = path.display().to_string();
        let meta = fs::metadata(path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::KeyFilePermissions(name));
        }
        let mut text = fs::read_to_string(path)?;
        let parsed = text
            .trim()
            .strip_prefix(KEY_FILE_TAG)
            .and_then(decode_hex32)
            .ok_or(CryptoError::KeyFileFormat(name));
        text.zeroize();
        parsed.and_then(|b| Self::from_slice(&b).ok_or(CryptoError::Decrypt))
    }

    /// Wraps a patient's data key; the AAD binds it to the patient and key version.
    pub fn wrap_data_key(
        &self,
        patient: &PatientId,
        version: u32,
        dk: &DataKey,
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal(&dek_aad(patient, version), &dk.0)
    }

    pub fn unwrap_data_key(
        &self,
        patient: &PatientId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<DataKey, CryptoError> {
        let mut raw = self.open(&dek_aad(patient, version), wrapped)?;
        let k = DataKey::from_slice(&raw).ok_or(CryptoError::Decrypt);
        raw.zeroize();
        k
    }

    /// Wraps a service key (e.g. the identity-secrets key) under a label bound in the AAD.
    pub fn wrap_named(&self, label: &str, k: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.seal(format!("medvault:named:v1|{label}").as_bytes(), &k.0)
    }

    pub fn unwrap_named(&self, label: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let mut raw = self.open(format!("medvault:named:v1|{label}").as_bytes(), wrapped)?;
        let k = DataKey::from_slice(&raw).ok_or(CryptoError::Decrypt);
        raw.zeroize();
        k
    }

    pub fn wrap_index_root(&self, k: &IndexRootKey) -> Result<Vec<u8>, CryptoError> {
        self.seal(b"medvault:index-root:v1", &k.0)
    }

    pub fn unwrap_index_root(&self, wrapped: &[u8]) -> Result<IndexRootKey, CryptoError> {
        let mut raw = self.open(b"medvault:index-root:v1", wrapped)?;
        let k = IndexRootKey::from_slice(&raw).ok_or(CryptoError::Decrypt);
        raw.zeroize();
        k
    }
}

/// The file of master key `version` beside the configured one: version 1 is `base` itself,
/// version N is `{stem}.vN{.ext}` in the same directory (`master.key` → `master.v2.key`).
pub fn version_path(base: &Path, version: u32) -> std::path::PathBuf {
    if version <= 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "master".into());
    let name = match base.extension() {
        Some(ext) => format!("{stem}.v{version}.{}", ext.to_string_lossy()),
        None => format!("{stem}.v{version}"),
    };
    base.with_file_name(name)
}

/// Where the versions of the master key come from.
#[derive(Debug, Clone)]
pub enum KeyringSource {
    /// Key files: version 1 at this path, later versions beside it ([`version_path`]).
    Files(std::path::PathBuf),
    /// Key files sealed under a passphrase (Argon2id), laid out as `Files`.
    Sealed(std::path::PathBuf, Passphrase),
    /// Key objects inside an HSM, reached through PKCS#11.
    Pkcs11(Arc<hsm::Hsm>),
    /// One random version-1 key held in memory (benchmarks, tests).
    Ephemeral,
}

/// Every version of the master key this process has opened, loaded on first need: a server
/// started before a rotation opens the new version's file when it meets a data key wrapped
/// by it (Vault's keyring, after `vault operator rotate`).
pub struct Keyring {
    source: KeyringSource,
    keys: Mutex<std::collections::BTreeMap<u32, Arc<MasterKey>>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyring([REDACTED])")
    }
}

impl Keyring {
    /// A keyring over `source` holding `first` as version 1 (already loaded or created).
    pub fn new(source: KeyringSource, first: Option<MasterKey>) -> Self {
        let mut keys = std::collections::BTreeMap::new();
        if let Some(k) = first {
            keys.insert(1, Arc::new(k));
        }
        Keyring {
            source,
            keys: Mutex::new(keys),
        }
    }

    /// Master key `version`, loading its file on first need.
    ///
    /// # Errors
    /// [`CryptoError::MissingVersion`] when its file is absent (or the keyring is ephemeral);
    /// the errors of [`MasterKey::load_file`].
    pub fn get(&self, version: u32) -> Result<Arc<MasterKey>, CryptoError> {
        if let Some(k) = self.keys.lock().ok().and_then(|m| m.get(&version).cloned()) {
            return Ok(k);
        }
        if let KeyringSource::Pkcs11(h) = &self.source {
            let handle = h.find(version)?.ok_or_else(|| {
                CryptoError::MissingVersion(version, format!("pkcs11:{}", h.label(version)))
            })?;
            let k = Arc::new(MasterKey::in_hsm(h.clone(), handle));
            if let Ok(mut m) = self.keys.lock() {
                m.insert(version, k.clone());
            }
            return Ok(k);
        }
        let (path, pass) = self.file_of(version)?;
        if !path.exists() {
            return Err(CryptoError::MissingVersion(
                version,
                path.display().to_string(),
            ));
        }
        let k = Arc::new(match pass {
            Some(p) => MasterKey::load_sealed_file(&path, p)?,
            None => MasterKey::load_file(&path)?,
        });
        if let Ok(mut m) = self.keys.lock() {
            m.insert(version, k.clone());
        }
        Ok(k)
    }

    fn file_of(
        &self,
        version: u32,
    ) -> Result<(std::path::PathBuf, Option<&Passphrase>), CryptoError> {
        match &self.source {
            KeyringSource::Files(b) => Ok((version_path(b, version), None)),
            KeyringSource::Sealed(b, p) => Ok((version_path(b, version), Some(p))),
            KeyringSource::Pkcs11(_) | KeyringSource::Ephemeral => {
                Err(CryptoError::MissingVersion(version, "memory".into()))
            }
        }
    }

    /// Creates the file of a new version (0600; sealed under the passphrase for a sealed
    /// keyring), or opens it if a rotation that crashed had already created it.
    ///
    /// # Errors
    /// An ephemeral keyring cannot grow; file errors.
    pub fn create(&self, version: u32) -> Result<Arc<MasterKey>, CryptoError> {
        if let KeyringSource::Pkcs11(h) = &self.source {
            if h.find(version)?.is_none() {
                h.generate(version)?;
            }
            return self.get(version);
        }
        let (path, pass) = self.file_of(version)?;
        if path.exists() {
            return self.get(version);
        }
        let k = Arc::new(match pass {
            Some(p) => MasterKey::create_sealed_file(&path, p)?,
            None => MasterKey::create_file(&path)?,
        });
        if let Ok(mut m) = self.keys.lock() {
            m.insert(version, k.clone());
        }
        Ok(k)
    }

    /// Whether the file of `version` is present (an ephemeral keyring has version 1 only).
    pub fn has_file(&self, version: u32) -> bool {
        match &self.source {
            KeyringSource::Files(base) | KeyringSource::Sealed(base, _) => {
                version_path(base, version).exists()
            }
            KeyringSource::Pkcs11(h) => h.find(version).is_ok_and(|o| o.is_some()),
            KeyringSource::Ephemeral => version == 1,
        }
    }

    /// The file of `version`, if the keyring keeps files.
    pub fn path_of(&self, version: u32) -> Option<std::path::PathBuf> {
        match &self.source {
            KeyringSource::Files(base) | KeyringSource::Sealed(base, _) => {
                Some(version_path(base, version))
            }
            KeyringSource::Pkcs11(h) => Some(format!("pkcs11:{}", h.label(version)).into()),
            KeyringSource::Ephemeral => None,
        }
    }
}

/// A passphrase that seals the master key: zeroized on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(zeroize::Zeroizing<String>);

impl Passphrase {
    pub fn new(s: String) -> Self {
        Passphrase(zeroize::Zeroizing::new(s))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([REDACTED])")
    }
}

const SEALED_TAG: &str = "medvault-sealed-master-key-v1";
/// Argon2id cost of sealing (RFC 9106's second recommended option: 64 MiB, 3 passes).
const SEAL_M_KIB: u32 = 64 * 1024;
const SEAL_T: u32 = 3;

/// The key-encryption key of a sealed key file (Argon2id, RFC 9106).
fn seal_kek(
    passphrase: &Passphrase,
    salt: &[u8],
    m: u32,
    t: u32,
) -> Result<zeroize::Zeroizing<[u8; 32]>, CryptoError> {
    let params = argon2::Params::new(m, t, 1, Some(32)).map_err(|_| CryptoError::Encrypt)?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase.expose().as_bytes(), salt, &mut *k)
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(k)
}

impl MasterKey {
    /// Creates a key file sealed under `passphrase` (Argon2id, then AES-256-GCM), mode 0600;
    /// refuses to overwrite an existing file.
    pub fn create_sealed_file(path: &Path, passphrase: &Passphrase) -> Result<Self, CryptoError> {
        let key = Self::generate();
        key.seal_to_file(path, passphrase)?;
        Ok(key)
    }

    /// Writes this key to a new file sealed under `passphrase` (0600, never overwriting).
    pub fn seal_to_file(&self, path: &Path, passphrase: &Passphrase) -> Result<(), CryptoError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let kek = seal_kek(passphrase, &salt, SEAL_M_KIB, SEAL_T)?;
        let sealed = seal_with(
            &Aes256Gcm::new((&*kek).into()),
            SEALED_TAG.as_bytes(),
            self.local_bytes()?,
        )?;
        let text = format!(
            "{SEALED_TAG} argon2id m={SEAL_M_KIB} t={SEAL_T} p=1 salt={} key={}\n",
            b64.encode(salt),
            b64.encode(sealed)
        );
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// Opens a sealed key file, refusing one that group or others may read.
    ///
    /// # Errors
    /// [`CryptoError::WrongPassphrase`] when it does not open; format and file errors.
    pub fn load_sealed_file(path: &Path, passphrase: &Passphrase) -> Result<Self, CryptoError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let name = path.display().to_string();
        let meta = fs::metadata(path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::KeyFilePermissions(name));
        }
        let text = fs::read_to_string(path)?;
        let bad = || CryptoError::KeyFileFormat(name.clone());
        let mut parts = text.split_whitespace();
        if parts.next() != Some(SEALED_TAG) || parts.next() != Some("argon2id") {
            return Err(bad());
        }
        let mut field = |k: &str| {
            parts
                .next()
                .and_then(|p| p.strip_prefix(k))
                .map(str::to_owned)
                .ok_or_else(bad)
        };
        let m: u32 = field("m=")?.parse().map_err(|_| bad())?;
        let t: u32 = field("t=")?.parse().map_err(|_| bad())?;
        let _p = field("p=")?;
        let salt = b64.decode(field("salt=")?).map_err(|_| bad())?;
        let sealed = b64.decode(field("key=")?).map_err(|_| bad())?;
        if !(8 * 1024..=4 * 1024 * 1024).contains(&m) || !(1..=64).contains(&t) {
            return Err(bad());
        }
        let kek = seal_kek(passphrase, &salt, m, t)?;
        let mut raw = open_with(
            &Aes256Gcm::new((&*kek).into()),
            SEALED_TAG.as_bytes(),
            &sealed,
        )
        .map_err(|_| CryptoError::WrongPassphrase(name.clone()))?;
        let k = Self::from_slice(&raw).ok_or_else(bad);
        raw.zeroize();
        k
    }
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn dek_aad(patient: &PatientId, version: u32) -> Vec<u8> {
    format!("medvault:dek:v1|{}|{}", patient.as_str(), version).into_bytes()
}

fn seal_with(c: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = c
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Encrypt)?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_with(c: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Decrypt);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    c.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Decrypt)
}

/// Record AAD: resource type | id | version | patient id, so rows cannot be swapped or replayed.
pub fn record_aad(resource_type: &str, id: &str, version: u64, patient: &PatientId) -> Vec<u8> {
    format!(
        "medvault:rec:v1|{resource_type}|{id}|{version}|{}",
        patient.as_str()
    )
    .into_bytes()
}

/// A data key ready to seal and open records (the AES key schedule is computed once).
pub struct RecordCipher {
    cipher: Aes256Gcm,
}

impl fmt::Debug for RecordCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordCipher([REDACTED])")
    }
}

impl RecordCipher {
    pub fn new(dk: &DataKey) -> Self {
        Self {
            cipher: Aes256Gcm::new((&dk.0).into()),
        }
    }
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.cipher, aad, plaintext)
    }
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.cipher, aad, sealed)
    }
}

/// Keyed blind index: HMAC-SHA256 under a key derived (HKDF) from the index root,
/// truncated to 16 bytes. Equal inputs give equal tokens; nothing else is revealed.
#[derive(Clone)]
pub struct BlindIndexer {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for BlindIndexer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexer([REDACTED])")
    }
}

impl BlindIndexer {
    pub fn new(root: &IndexRootKey) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"medvault"), &root.0);
        let mut k = [0u8; 32];
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(b"blind-index/v1", &mut k);
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&k).unwrap_or_else(|_| unreachable_mac());
        k.zeroize();
        Self { mac }
    }

    /// The token for search parameter `param` having value `value` (already normalized).
    pub fn token(&self, scope: &str, param: &str, value: &str) -> [u8; 16] {
        let mut m = self.mac.clone();
        m.update(scope.as_bytes());
        m.update(&[0]);
        m.update(param.as_bytes());
        m.update(&[0]);
        m.update(value.as_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(full.get(..16).unwrap_or(&[0u8; 16]));
        out
    }
}

/// HMAC-SHA256 (RFC 2104) under a key derived (HKDF, RFC 5869) from the index root with
/// its own `label`: authenticates values the server hands out and later takes back, such
/// as search cursors, so a client cannot forge or alter them. Tags are 32 bytes.
#[derive(Clone)]
pub struct ServiceMac {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for ServiceMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceMac([REDACTED])")
    }
}

impl ServiceMac {
    pub fn new(root: &IndexRootKey, label: &str) -> Self {
        Self::derive(&root.0, label)
    }

    /// The MAC under `label` derived (HKDF-SHA256) from another service key, such as the
    /// identity key: for tags that must survive a rotation of the blind-index root.
    pub fn from_data_key(key: &DataKey, label: &str) -> Self {
        Self::derive(&key.0, label)
    }

    fn derive(secret: &[u8; 32], label: &str) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"medvault"), secret);
        let mut k = [0u8; 32];
        let _ = hk.expand(label.as_bytes(), &mut k);
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&k).unwrap_or_else(|_| unreachable_mac());
        k.zeroize();
        Self { mac }
    }

    /// The tag of `parts` (each length-prefixed, so no two lists share a tag).
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(&u64::try_from(p.len()).unwrap_or(u64::MAX).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(&u64::try_from(p.len()).unwrap_or(u64::MAX).to_be_bytes());
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }
}

#[expect(
    clippy::panic,
    reason = "HMAC accepts keys of any length; this cannot be reached"
)]
fn unreachable_mac() -> Hmac<Sha256> {
    panic!("hmac rejected a 32-byte key")
}

/// One patient's unwrapped data keys: by key version, and which is the newest known.
#[derive(Default)]
struct Chart {
    newest: u32,
    by_version: HashMap<u32, Arc<RecordCipher>>,
}

type CacheState = (HashMap<PatientId, Chart>, VecDeque<PatientId>);

/// Unwrapped data keys kept in memory, bounded by charts; evicted keys are zeroized on
/// drop. A record is opened under the key version it names, so a cached key that another
/// process has since superseded (a rotation) still opens what it sealed.
pub struct KeyCache {
    inner: Mutex<CacheState>,
    capacity: usize,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity: capacity.max(1),
        }
    }
    /// The key of `version` for `p`, if cached.
    pub fn get(&self, p: &PatientId, version: u32) -> Option<Arc<RecordCipher>> {
        self.inner
            .lock()
            .ok()?
            .0
            .get(p)?
            .by_version
            .get(&version)
            .cloned()
    }
    /// The newest cached key of `p` and its version.
    pub fn newest(&self, p: &PatientId) -> Option<(u32, Arc<RecordCipher>)> {
        let g = self.inner.lock().ok()?;
        let c = g.0.get(p)?;
        if c.newest == 0 {
            return None;
        }
        c.by_version.get(&c.newest).map(|k| (c.newest, k.clone()))
    }
    /// Caches `c` as version `version` of `p`'s key (`newest`: read as the newest stored).
    pub fn insert(&self, p: PatientId, version: u32, c: Arc<RecordCipher>, newest: bool) {
        if let Ok(mut g) = self.inner.lock() {
            let (map, order) = &mut *g;
            let fresh = !map.contains_key(&p);
            let chart = map.entry(p.clone()).or_default();
            chart.by_version.insert(version, c);
            if newest && version >= chart.newest {
                chart.newest = version;
            }
            if fresh {
                order.push_back(p);
            }
            while map.len() > self.capacity {
                match order.pop_front() {
                    Some(old) => {
                        map.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }
    /// Drops every key of one patient (shred, rotation, or another server's notice).
    pub fn evict(&self, p: &PatientId) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.remove(p);
            g.1.retain(|x| x != p);
        }
    }
    pub fn clear(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.clear();
            g.1.clear();
        }
    }
    /// Charts with cached keys.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// SHA-256 of `bytes` as lowercase hex (FIPS 180-4): a digest to name a document by in the
/// audit log (a policy version), not a secret.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_0600_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("mvk-{}", medvault_types::random_uuid()));
        fs::create_dir(&dir).unwrap();
        let p = dir.join("master.key");
        let k = MasterKey::create_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = MasterKey::load_file(&p).unwrap();
        let pid = PatientId::new("p1").unwrap();
        let dk = DataKey::generate();
        let w = k.wrap_data_key(&pid, 1, &dk).unwrap();
        assert_eq!(k2.unwrap_data_key(&pid, 1, &w).unwrap().0, dk.0);
        assert_eq!(k2.local_bytes().unwrap(), k.local_bytes().unwrap());
        // bound to patient and version
        assert!(k2
            .unwrap_data_key(&PatientId::new("p2").unwrap(), 1, &w)
            .is_err());
        assert!(k2.unwrap_data_key(&pid, 2, &w).is_err());
        assert!(MasterKey::create_file(&p).is_err(), "must not overwrite");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load_file(&p),
            Err(CryptoError::KeyFilePermissions(_))
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sealed_key_files_open_with_their_passphrase_only() {
        let dir = std::env::temp_dir().join(format!("mvs-{}", medvault_types::random_uuid()));
        fs::create_dir(&dir).unwrap();
        let p = dir.join("master.key");
        let pass = Passphrase::new("correct horse battery staple".into());
        let k = MasterKey::create_sealed_file(&p, &pass).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            MasterKey::load_sealed_file(&p, &pass)
                .unwrap()
                .local_bytes()
                .unwrap(),
            k.local_bytes().unwrap()
        );
        assert!(matches!(
            MasterKey::load_sealed_file(&p, &Passphrase::new("wrong".into())),
            Err(CryptoError::WrongPassphrase(_))
        ));
        assert!(MasterKey::load_file(&p).is_err(), "not a plain key file");
        assert_eq!(format!("{pass:?}"), "Passphrase([REDACTED])");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_bound_to_aad_and_tamper_evident() {
        let c = RecordCipher::new(&DataKey::generate());
        let pid = PatientId::new("p1").unwrap();
        let aad = record_aad("Observation", "o1", 1, &pid);
        let s = c.seal(&aad, b"secret").unwrap();
        assert_eq!(c.open(&aad, &s).unwrap(), b"secret");
        assert!(c
            .open(&record_aad("Observation", "o1", 2, &pid), &s)
            .is_err());
        let mut t = s.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(c.open(&aad, &t).is_err());
        assert_ne!(c.seal(&aad, b"secret").unwrap(), s, "fresh nonce per seal");
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(
            format!("{:?}", MasterKey::generate()),
            "MasterKey([REDACTED])"
        );
        assert_eq!(format!("{:?}", DataKey::generate()), "DataKey([REDACTED])");
    }

    #[test]
    fn blind_tokens_are_keyed() {
        let a = BlindIndexer::new(&IndexRootKey::generate());
        let b = BlindIndexer::new(&IndexRootKey::generate());
        assert_eq!(
            a.token("Patient", "family", "smith"),
            a.token("Patient", "family", "smith")
        );
        assert_ne!(
            a.token("Patient", "family", "smith"),
            b.token("Patient", "family", "smith")
        );
        assert_ne!(
            a.token("Patient", "family", "smith"),
            a.token("Patient", "given", "smith")
        );
    }

    #[test]
    fn cache_is_bounded_and_keeps_versions() {
        let c = KeyCache::new(2);
        for i in 0..5 {
            c.insert(
                PatientId::new(&format!("p{i}")).unwrap(),
                1,
                Arc::new(RecordCipher::new(&DataKey::generate())),
                true,
            );
        }
        assert_eq!(c.len(), 2);
        let p4 = PatientId::new("p4").unwrap();
        assert!(c.get(&p4, 1).is_some());
        c.insert(
            p4.clone(),
            2,
            Arc::new(RecordCipher::new(&DataKey::generate())),
            true,
        );
        assert_eq!(c.newest(&p4).map(|n| n.0), Some(2));
        assert!(c.get(&p4, 1).is_some(), "older versions stay");
        c.evict(&p4);
        assert!(c.get(&p4, 1).is_none() && c.newest(&p4).is_none());
    }
}
