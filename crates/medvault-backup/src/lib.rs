//! medvault-backup — encrypted, content-addressed, signed backups (SPEC "Keys, backup,
//! destruction"), after restic's repository design.
//!
//! A repository is a directory: `config.json` (the repository key wrapped by the master key
//! and sealed to an X25519 recovery public key, the manifest signer's public key),
//! `chunks/xx/ID` (content-defined chunks of the snapshot stream — FastCDC — each named by a
//! keyed hash of its plaintext, compressed with LZ4, then sealed with AES-256-GCM under the
//! repository key with its id as associated data), and `snapshots/ID.json` (a manifest
//! signed with Ed25519: the chunks in order with the SHA-256 of each stored file, what the
//! snapshot holds, and the shred ledger). A snapshot is written chunks first, manifest last
//! (renamed into place), so a backup cut short is never listed or verified as valid.
//!
//! This room must never write a plaintext byte of a snapshot to disk, never log key
//! material, and never call a snapshot valid unless every chunk it names is present and
//! intact. The stream it stores is the gate's dump: record bodies inside are still sealed
//! under the patients' data keys.
#![forbid(unsafe_code)]

pub mod recovery;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use hmac::{Hmac, Mac};
use medvault_core::{Caller, SnapshotStats, Vault, VaultError};
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use recovery::{RecoveryPublic, RecoverySecret};

/// Errors of this room. Each names what failed (a chunk, a file) without key material.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Vault(#[from] VaultError),
    // The cause is in the message and not chained as a source, so it is printed once.
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{0} is not a medvault backup repository (no config.json)")]
    NotARepository(String),
    #[error("repository config: {0}")]
    Config(String),
    #[error("snapshot manifest {0}: {1}")]
    Manifest(String, String),
    #[error("chunk {0} is missing")]
    MissingChunk(String),
    #[error("chunk {0} is corrupt: its stored bytes do not match the manifest's hash")]
    CorruptChunk(String),
    #[error("chunk {0} does not decrypt: wrong key, or altered")]
    UndecryptableChunk(String),
    #[error("the repository key does not open with this key: {0}")]
    WrongKey(String),
    #[error("recovery key: {0}")]
    Recovery(String),
    #[error("another backup created the repository {0} at the same moment; open it")]
    Raced(String),
    #[error("snapshot stream: {0}")]
    Stream(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |cause| BackupError::Io {
        path: path.display().to_string(),
        cause,
    }
}

/// Content-defined chunking bounds, in bytes (restic's are 512 KiB–8 MiB; smaller chunks
/// find more of an append-mostly store unchanged).
pub const CHUNK_MIN: u32 = 128 * 1024;
pub const CHUNK_AVG: u32 = 256 * 1024;
pub const CHUNK_MAX: u32 = 1024 * 1024;

const FORMAT: &str = "medvault-backup-repository-v1";
const FILES_MAGIC: &[u8; 6] = b"MVBF1\n";

/// The repository key: AES-256-GCM for chunks, HMAC for chunk ids, Ed25519 for manifests,
/// all derived (HKDF-SHA256) from one 32-byte secret.
pub struct RepoKey {
    raw: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKey([REDACTED])")
    }
}

impl RepoKey {
    fn derive(&self, label: &str) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"medvault-backup"), &*self.raw);
        let mut k = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(label.as_bytes(), &mut *k);
        k
    }
    /// The chunks' AES-256-GCM key (NIST SP 800-38D), in ring's implementation: its
    /// assembly stitches AES-NI with carry-less multiplication, several times the speed of
    /// a portable one on the backup's hot path. The same algorithm as before: files sealed
    /// by either open with the other.
    fn cipher(&self) -> Result<LessSafeKey, BackupError> {
        UnboundKey::new(&AES_256_GCM, &*self.derive("chunk-seal/v1"))
            .map(LessSafeKey::new)
            .map_err(|_| BackupError::Stream("the chunk key was refused".into()))
    }
    fn chunk_id(&self, plain: &[u8]) -> String {
        chunk_id_with(&self.derive("chunk-id/v1"), plain)
    }
    fn signer(&self) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&self.derive("manifest-signing/v1"))
    }
    /// The manifests' verifier key (base64 Ed25519 public key).
    pub fn verifier(&self) -> String {
        B64.encode(self.signer().verifying_key().to_bytes())
    }
}

/// A chunk's id: HMAC-SHA256 of its plaintext under the chunk-id key, hex (so equal chunks
/// share one file, and the id reveals nothing without the key).
fn chunk_id_with(id_key: &[u8; 32], plain: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(id_key)
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new(&Default::default()));
    m.update(plain);
    hex(&m.finalize().into_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// FHIR instant with milliseconds of `t` (snapshots are ordered and named by it).
fn instant(t: time::OffsetDateTime) -> String {
    let base = medvault_core::fhir_instant_secs(t.unix_timestamp());
    match base.strip_suffix(".000Z") {
        Some(b) => format!("{b}.{:03}Z", t.millisecond()),
        None => base,
    }
}

/// A snapshot found in a repository: its manifest file and what it says.
pub type Listed = (PathBuf, Manifest);
/// The data-directory files a snapshot carries: name and contents.
pub type CarriedFiles = Vec<(String, Zeroizing<Vec<u8>>)>;

/// `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub id: String,
    pub created: String,
    /// The repository key wrapped by the master key (`version`).
    pub master: WrappedByMaster,
    /// The repository key sealed to the recovery public key.
    pub recovery: recovery::Sealed,
    /// The manifests' verifier key.
    pub signer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrappedByMaster {
    pub version: u32,
    pub wrapped: String,
}

/// One chunk of a snapshot, in stream order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: String,
    /// Plaintext length.
    pub len: u64,
    /// SHA-256 of the stored (sealed) file, hex: checkable without any key.
    pub sha256: String,
}

/// What a snapshot holds (signed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub repository: String,
    /// FHIR instant when the snapshot was taken.
    pub created: String,
    /// When retention lets it go (FHIR instant).
    pub expires: String,
    /// The data-directory files carried (configuration, key files, certificate).
    pub files: Vec<String>,
    pub stats: SnapshotStats,
    /// Charts destroyed up to this snapshot: (patient id, audit index of the destruction).
    pub shred_ledger: Vec<(String, u64)>,
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Bytes of the snapshot stream (the carried files and the store's snapshot, before
    /// compression): what `backup create` reported as the snapshot's size.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedManifest {
    manifest: Manifest,
    /// Ed25519 over the manifest's JSON bytes, base64.
    signature: String,
}

/// A repository opened from its directory.
#[derive(Debug)]
pub struct Repo {
    pub dir: PathBuf,
    pub config: RepoConfig,
}

/// What `backup create` did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    pub snapshot: String,
    pub manifest: String,
    /// Bytes of the snapshot stream (before compression and dedup).
    pub bytes: u64,
    pub chunks: usize,
    /// Chunks written now (the rest were already stored).
    pub new_chunks: usize,
    /// Bytes written now (sealed).
    pub new_bytes: u64,
    pub seconds: f64,
}

/// What `backup verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshot: String,
    /// `integrity` (signature and every chunk's stored hash) or `read-data` (also every
    /// chunk decrypted, its id checked, and the stream parsed to its end).
    pub level: &'static str,
    pub chunks: usize,
    pub bytes: u64,
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader sees the
/// whole file or none; `durable` waits for the disk first (config and manifests; chunks are
/// made durable together, by one filesystem sync before their manifest is written).
fn write_file(path: &Path, data: &[u8], durable: bool) -> Result<(), BackupError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    if durable {
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BackupError> {
    write_file(path, data, true)
}

/// A lock on the repository: shared by backups (several may run at once), exclusive for a
/// prune (which must not delete a chunk a running backup found and counts on).
struct RepoLock(#[allow(dead_code)] fs::File);

fn lock(dir: &Path, exclusive: bool) -> Result<RepoLock, BackupError> {
    let p = dir.join("lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io_err(&p))?;
    let op = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    rustix::fs::flock(&f, op).map_err(|e| io_err(&p)(e.into()))?;
    Ok(RepoLock(f))
}

/// Flushes every file written to the repository's filesystem (syncfs(2)): the snapshot's
/// chunks reach the disk before the manifest that names them.
fn sync_repository(dir: &Path) -> Result<(), BackupError> {
    let d = fs::File::open(dir).map_err(io_err(dir))?;
    rustix::fs::syncfs(&d).map_err(|e| io_err(dir)(e.into()))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex(&b)
}

impl Repo {
    /// Opens the repository at `dir`.
    ///
    /// # Errors
    /// Not a repository; an unreadable or malformed config.
    pub fn open(dir: &Path) -> Result<Repo, BackupError> {
        let p = dir.join("config.json");
        if !p.exists() {
            return Err(BackupError::NotARepository(dir.display().to_string()));
        }
        let text = fs::read(&p).map_err(io_err(&p))?;
        let config: RepoConfig =
            serde_json::from_slice(&text).map_err(|e| BackupError::Config(e.to_string()))?;
        if config.format != FORMAT {
            return Err(BackupError::Config(format!(
                "unknown format {}",
                config.format
            )));
        }
        Ok(Repo {
            dir: dir.to_owned(),
            config,
        })
    }

    /// Creates a repository at `dir` (empty or absent) with a new repository key, wrapped
    /// by the master key through the gate and sealed to `recovery`.
    ///
    /// # Errors
    /// `dir` holds something else; the gate refuses; file errors.
    pub fn init(
        dir: &Path,
        vault: &Vault,
        c: &Caller,
        recovery: &RecoveryPublic,
        now: time::OffsetDateTime,
    ) -> Result<(Repo, RepoKey), BackupError> {
        // Empty, or only what a concurrent `init` is making (it will win; `open` it then).
        if dir.exists() {
            for e in fs::read_dir(dir).map_err(io_err(dir))? {
                let name = e.map_err(io_err(dir))?.file_name();
                let ours = matches!(name.to_str(), Some("chunks" | "snapshots" | "lock"))
                    || name.to_str().is_some_and(|n| n.starts_with("config.json"));
                if !ours {
                    return Err(BackupError::NotARepository(format!(
                        "{} (it is not empty)",
                        dir.display()
                    )));
                }
            }
        }
        for d in ["", "chunks", "snapshots"] {
            fs::create_dir_all(dir.join(d)).map_err(io_err(dir))?;
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *raw);
        let id = random_id();
        let (version, wrapped) = vault.wrap_backup_key(c, &id, &raw)?;
        let key = RepoKey { raw };
        let config = RepoConfig {
            format: FORMAT.into(),
            id,
            created: instant(now),
            master: WrappedByMaster {
                version,
                wrapped: B64.encode(wrapped),
            },
            recovery: recovery.seal(&key.raw)?,
            signer: key.verifier(),
        };
        let repo = Repo {
            dir: dir.to_owned(),
            config,
        };
        // Linked into place, never over a config another `init` wrote a moment before.
        let text = serde_json::to_vec_pretty(&repo.config)
            .map_err(|e| BackupError::Config(e.to_string()))?;
        let tmp = dir.join(format!("config.json.tmp{}", random_id()));
        write_file(&tmp, &text, true)?;
        let linked = fs::hard_link(&tmp, dir.join("config.json"));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok((repo, key)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(BackupError::Raced(dir.display().to_string()))
            }
            Err(e) => Err(io_err(dir)(e)),
        }
    }

    fn save_config(&self) -> Result<(), BackupError> {
        let text = serde_json::to_vec_pretty(&self.config)
            .map_err(|e| BackupError::Config(e.to_string()))?;
        write_atomic(&self.dir.join("config.json"), &text)
    }

    /// The repository key through the gate's master key; re-wraps it under the master key
    /// version in force when an older one wrapped it (so a retired master key file can go).
    ///
    /// # Errors
    /// The gate refuses; the master key version is gone; the key does not open.
    pub fn key_from_vault(&mut self, vault: &Vault, c: &Caller) -> Result<RepoKey, BackupError> {
        let wrapped = B64
            .decode(&self.config.master.wrapped)
            .map_err(|_| BackupError::Config("master wrapping is not base64".into()))?;
        let raw = vault
            .unwrap_backup_key(c, &self.config.id, self.config.master.version, &wrapped)
            .map_err(|e| {
                BackupError::WrongKey(match e {
                    VaultError::Internal(m)
                    | VaultError::Unavailable(m)
                    | VaultError::MasterKeyUnavailable(m) => format!(
                        "this installation's master key does not open it ({m}); use its recovery key"
                    ),
                    e => e.to_string(),
                })
            })?;
        let key = RepoKey { raw };
        self.check_key(&key)?;
        let (version, rewrapped) = vault.wrap_backup_key(c, &self.config.id, &key.raw)?;
        if version != self.config.master.version {
            self.config.master = WrappedByMaster {
                version,
                wrapped: B64.encode(rewrapped),
            };
            self.save_config()?;
        }
        Ok(key)
    }

    /// The repository key through the recovery secret (the master key lost).
    ///
    /// # Errors
    /// The secret does not open this repository's sealed key.
    pub fn key_from_recovery(&self, secret: &RecoverySecret) -> Result<RepoKey, BackupError> {
        let raw = secret.open(&self.config.recovery)?;
        let key = RepoKey { raw };
        self.check_key(&key)?;
        Ok(key)
    }

    fn check_key(&self, key: &RepoKey) -> Result<(), BackupError> {
        if key.verifier() != self.config.signer {
            return Err(BackupError::WrongKey(
                "it does not match the repository's config (another repository's key, or a config.json whose signer was changed)".into(),
            ));
        }
        Ok(())
    }

    fn chunk_path(&self, id: &str) -> PathBuf {
        chunk_path(&self.dir, id)
    }

    /// Takes a snapshot: `files` (data-directory files, sealed like the rest), then the
    /// gate's consistent dump, chunked, deduplicated, compressed, sealed; the signed
    /// manifest last. `progress(bytes so far)` after every write of the stream.
    ///
    /// # Errors
    /// The gate refuses or fails; file errors. A failure leaves no manifest.
    #[expect(
        clippy::too_many_arguments,
        reason = "the snapshot's inputs, each needed"
    )]
    pub fn create(
        &self,
        key: &RepoKey,
        vault: &Vault,
        c: &Caller,
        files: &[(String, Vec<u8>)],
        now: time::OffsetDateTime,
        expires: &str,
        progress: &dyn Fn(u64),
    ) -> Result<CreateReport, BackupError> {
        let _lock = lock(&self.dir, false)?;
        let started = std::time::Instant::now();
        let id = random_id();
        let created = instant(now);
        let known = self.known_chunks()?;
        // A pipeline: this thread writes the store's snapshot into the stream and cuts it at
        // content-defined boundaries; the sealers name, compress, encrypt and store each
        // chunk (in any order, on every core); the chunk list is put back in stream order.
        let sealer = Sealer {
            repo: self,
            cipher: key.cipher()?,
            id_key: key.derive("chunk-id/v1"),
            known,
            failed: std::sync::atomic::AtomicBool::new(false),
        };
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<Job>(SEAL_QUEUE);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Result<Sealed, BackupError>)>();
        let work_rx = std::sync::Mutex::new(work_rx);
        let (stats, total, sealed, ledger) = std::thread::scope(|scope| {
            let sealer = &sealer;
            let work_rx = &work_rx;
            // The shred ledger, read from the audit log meanwhile: it names every chart
            // destroyed before the snapshot (and perhaps some destroyed during it, which a
            // restore then destroys again: never one too few).
            let ledger = scope.spawn(|| vault.shred_ledger());
            for _ in 0..SEAL_WORKERS {
                let done_tx = done_tx.clone();
                let mut scratch = medvault_core::AlignedBuf::default();
                scope.spawn(move || loop {
                    let job = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let r = match (
                        sealer.failed.load(std::sync::atomic::Ordering::Relaxed),
                        job.buf.get(job.range.clone()),
                    ) {
                        (false, Some(plain)) => sealer.seal_one(plain, &mut scratch),
                        (true, _) => Err(BackupError::Stream("stopped".into())),
                        (_, None) => Err(BackupError::Stream("chunk bounds".into())),
                    };
                    if r.is_err() {
                        sealer
                            .failed
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if done_tx.send((job.n, r)).is_err() {
                        return;
                    }
                });
            }
            drop(done_tx);
            let mut w = ChunkWriter {
                buf: Vec::with_capacity(CUT_AT),
                cutting: Cutting::ContentDefined,
                next: 0,
                out: Some(work_tx),
                total: 0,
                progress,
                error: None,
                failed: &sealer.failed,
            };
            // The files end a chunk, so the store's stream starts one (a page image's grid
            // starts at its first byte).
            let dumped = write_files(&mut w, files)
                .map_err(|e| w.error.take().unwrap_or(BackupError::Stream(e.to_string())))
                .and_then(|()| w.cut(true))
                .and_then(|()| {
                    w.cutting = Cutting::Undecided;
                    vault
                        .backup_snapshot(c, &id, expires, &mut w)
                        .map_err(|e| w.error.take().unwrap_or(BackupError::Vault(e)))
                })
                .and_then(|stats| w.cut(true).map(|()| stats));
            let (total, cut) = (w.total, w.next);
            w.out = None;
            let mut done: Vec<(usize, Result<Sealed, BackupError>)> = done_rx.iter().collect();
            done.sort_by_key(|d| d.0);
            // A chunk's own failure is the cause when the stream also failed (the stream
            // stopped because it did).
            let mut chunks = Vec::with_capacity(done.len());
            let (mut new_chunks, mut new_bytes) = (0, 0);
            let mut first_error = None;
            for (_, r) in done {
                match r {
                    Ok(s) => {
                        if let Some(n) = s.written {
                            new_chunks += 1;
                            new_bytes += n;
                        }
                        chunks.push(s.chunk);
                    }
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
            }
            let ledger = ledger
                .join()
                .unwrap_or_else(|_| {
                    Err(medvault_core::VaultError::Internal(
                        "the shred ledger's reader stopped".into(),
                    ))
                })
                .map_err(BackupError::Vault);
            match (first_error, dumped, ledger) {
                (Some(e), ..) | (None, Err(e), _) | (None, Ok(_), Err(e)) => Err(e),
                (None, Ok(stats), Ok(ledger)) if cut == chunks.len() => Ok((
                    stats,
                    total,
                    SealedAll {
                        chunks,
                        new_chunks,
                        new_bytes,
                    },
                    ledger,
                )),
                (None, Ok(_), Ok(_)) => Err(BackupError::Stream("a chunk went missing".into())),
            }
        })?;
        sync_repository(&self.dir)?;
        let manifest = Manifest {
            format: "medvault-backup-snapshot-v1".into(),
            id: id.clone(),
            repository: self.config.id.clone(),
            created,
            expires: expires.to_owned(),
            files: files.iter().map(|f| f.0.clone()).collect(),
            stats,
            shred_ledger: ledger,
            chunks: sealed.chunks,
        };
        let body = serde_json::to_vec(&manifest).map_err(|e| BackupError::Stream(e.to_string()))?;
        let signed = SignedManifest {
            signature: B64.encode(key.signer().sign(&body).to_bytes()),
            manifest,
        };
        let path = self.dir.join("snapshots").join(format!("{id}.json"));
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&signed).map_err(|e| BackupError::Stream(e.to_string()))?,
        )?;
        Ok(CreateReport {
            snapshot: id,
            manifest: path.display().to_string(),
            bytes: total,
            chunks: signed.manifest.chunks.len(),
            new_chunks: sealed.new_chunks,
            new_bytes: sealed.new_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The chunks the repository's snapshots name, with the SHA-256 of each stored file:
    /// a backup reuses one it finds here without reading it again (restic's index).
    fn known_chunks(&self) -> Result<std::collections::HashMap<String, String>, BackupError> {
        let (snaps, _) = self.snapshots()?;
        Ok(snaps
            .into_iter()
            .flat_map(|(_, m)| m.chunks)
            .map(|c| (c.id, c.sha256))
            .collect())
    }

    /// Reads and checks a manifest's signature (against the repository's signer).
    ///
    /// # Errors
    /// Unreadable, malformed, from another repository, or the signature does not verify.
    pub fn manifest(&self, path: &Path) -> Result<Manifest, BackupError> {
        let name = path.display().to_string();
        let bad = |m: &str| BackupError::Manifest(name.clone(), m.to_owned());
        let text = fs::read(path).map_err(io_err(path))?;
        let signed: SignedManifest =
            serde_json::from_slice(&text).map_err(|_| bad("not a snapshot manifest"))?;
        // Said first: another repository's manifest also fails this one's signature check.
        if signed.manifest.repository != self.config.id {
            return Err(bad(&format!(
                "it belongs to another repository ({}), not to {} ({})",
                signed.manifest.repository,
                self.dir.display(),
                self.config.id
            )));
        }
        let body = serde_json::to_vec(&signed.manifest).map_err(|_| bad("not JSON"))?;
        let public: [u8; 32] = B64
            .decode(&self.config.signer)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("the repository's signer key is malformed"))?;
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&public)
            .map_err(|_| bad("the repository's signer key is malformed"))?;
        let sig: [u8; 64] = B64
            .decode(&signed.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("malformed signature"))?;
        vk.verify(&body, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| bad("the signature does not verify"))?;
        Ok(signed.manifest)
    }

    /// Every complete snapshot (a signed manifest), oldest first; manifests that fail to
    /// verify are reported beside them.
    ///
    /// # Errors
    /// The snapshots directory cannot be read.
    pub fn snapshots(&self) -> Result<(Vec<Listed>, Vec<BackupError>), BackupError> {
        let dir = self.dir.join("snapshots");
        let mut ok = vec![];
        let mut bad = vec![];
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let p = e.map_err(io_err(&dir))?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match self.manifest(&p) {
                Ok(m) => ok.push((p, m)),
                Err(e) => bad.push(e),
            }
        }
        ok.sort_by(|a, b| (&a.1.created, &a.1.id).cmp(&(&b.1.created, &b.1.id)));
        Ok((ok, bad))
    }

    /// Checks a snapshot: always its signature and every chunk file's SHA-256 (no key
    /// needed); with `key`, also decrypts every chunk, checks its id, and parses the stream
    /// to its end (restic's `check --read-data`).
    ///
    /// # Errors
    /// The first chunk missing, corrupt or undecryptable, named.
    pub fn verify(
        &self,
        manifest: &Manifest,
        key: Option<&RepoKey>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<VerifyReport, BackupError> {
        let total: u64 = manifest.chunks.iter().map(|c| c.len).sum();
        match key {
            None => {
                let mut done = 0;
                let mut bad = vec![];
                for c in &manifest.chunks {
                    if let Err(e) = self.read_chunk_file(c) {
                        bad.push(e);
                    }
                    done += c.len;
                    progress(done, total);
                }
                match bad.len() {
                    0 => {}
                    1 => return Err(bad.remove(0)),
                    n => {
                        return Err(BackupError::Stream(format!(
                            "{n} chunks are damaged: {}",
                            bad.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        )))
                    }
                }
                Ok(VerifyReport {
                    snapshot: manifest.id.clone(),
                    level: "integrity",
                    chunks: manifest.chunks.len(),
                    bytes: total,
                })
            }
            Some(k) => {
                let mut r = self.reader(manifest, k, progress);
                let checked = read_files(&mut r).and_then(|(_files, rest)| {
                    medvault_core::check_dump(rest)
                        .map(|_| ())
                        .map_err(|e| BackupError::Stream(e.to_string()))
                });
                if let Err(e) = checked {
                    let first = r.error().unwrap_or(e);
                    drop(r);
                    // A damaged chunk stops the stream; name every other damaged one too,
                    // so one run tells the whole story.
                    let cipher = k.cipher()?;
                    let mut bad: Vec<BackupError> = manifest
                        .chunks
                        .iter()
                        .filter_map(|c| open_chunk(&self.dir, k, &cipher, c).err())
                        .collect();
                    return Err(match bad.len() {
                        0 => first,
                        1 => bad.remove(0),
                        n => BackupError::Stream(format!(
                            "{n} chunks are damaged: {}",
                            bad.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        )),
                    });
                }
                Ok(VerifyReport {
                    snapshot: manifest.id.clone(),
                    level: "read-data",
                    chunks: manifest.chunks.len(),
                    bytes: total,
                })
            }
        }
    }

    fn read_chunk_file(&self, c: &ChunkRef) -> Result<Vec<u8>, BackupError> {
        read_chunk_file(&self.dir, c)
    }

    /// The snapshot's plaintext stream, chunk by chunk (each checked, decrypted, its id
    /// verified). A failure surfaces as an I/O error whose cause [`SnapshotReader::error`]
    /// keeps.
    pub fn reader<'a>(
        &self,
        manifest: &Manifest,
        key: &RepoKey,
        progress: &'a dyn Fn(u64, u64),
    ) -> SnapshotReader<'a> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let chunks = std::sync::Arc::new(manifest.chunks.clone());
        // Chunk i is opened by worker i mod OPEN_WORKERS; the reader takes them back in
        // stream order, one queue after the other.
        let rxs = (0..OPEN_WORKERS)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
                let (dir, chunks, key2, halt) = (
                    self.dir.clone(),
                    chunks.clone(),
                    RepoKey {
                        raw: key.raw.clone(),
                    },
                    stop.clone(),
                );
                std::thread::spawn(move || {
                    let cipher = match key2.cipher() {
                        Ok(cipher) => cipher,
                        Err(e) => {
                            let _ = tx.send((0, Err(e)));
                            return;
                        }
                    };
                    for c in chunks.iter().skip(w).step_by(OPEN_WORKERS) {
                        if halt.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let opened = open_chunk(&dir, &key2, &cipher, c);
                        let failed = opened.is_err();
                        if tx.send((c.len, opened)).is_err() || failed {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        SnapshotReader {
            rxs,
            next: 0,
            total: manifest.chunks.iter().map(|c| c.len).sum(),
            done: 0,
            cur: vec![],
            pos: 0,
            progress,
            error: None,
            stop,
        }
    }

    /// Deletes all but the newest `keep` snapshots, then every chunk no remaining snapshot
    /// names. Returns (snapshots removed, chunks removed).
    ///
    /// # Errors
    /// File errors.
    pub fn prune(&self, keep: usize) -> Result<(usize, usize), BackupError> {
        let _lock = lock(&self.dir, true)?;
        let (snaps, _) = self.snapshots()?;
        let drop_n = snaps.len().saturating_sub(keep.max(1));
        for (p, _) in snaps.iter().take(drop_n) {
            fs::remove_file(p).map_err(io_err(p))?;
        }
        let live: std::collections::HashSet<&str> = snaps
            .iter()
            .skip(drop_n)
            .flat_map(|(_, m)| m.chunks.iter().map(|c| c.id.as_str()))
            .collect();
        let mut removed = 0;
        let root = self.dir.join("chunks");
        for d in fs::read_dir(&root).map_err(io_err(&root))? {
            let d = d.map_err(io_err(&root))?.path();
            if !d.is_dir() {
                continue;
            }
            for f in fs::read_dir(&d).map_err(io_err(&d))? {
                let f = f.map_err(io_err(&d))?.path();
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !live.contains(name) {
                    fs::remove_file(&f).map_err(io_err(&f))?;
                    removed += 1;
                }
            }
        }
        Ok((drop_n, removed))
    }
}

/// Blocks of the stream waiting for the sealer (each a dump buffer, about 256 KiB): enough
/// to keep both stages busy, little enough to bound memory.
const SEAL_QUEUE: usize = 32;
/// Chunks each opening worker of a reader opens ahead of its consumer.
const READ_AHEAD: usize = 4;
/// Threads opening (checking, decrypting, decompressing) a snapshot's chunks.
const OPEN_WORKERS: usize = 4;

/// One chunk to seal: its number in stream order, and where it lies in a buffer the
/// chunks of one cut share (no copy per chunk).
struct Job {
    n: usize,
    buf: std::sync::Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

/// How much of the stream is gathered before it is cut into chunks: a whole number of
/// [`FIXED_CHUNK`]s.
const CUT_AT: usize = 4 * CHUNK_MAX as usize;

/// The chunk size of a page image: 1 MiB, restic's average chunk, a whole number of pages
/// of any SQLite page size ([`medvault_core::PAGE_IMAGE_TAG`]).
pub const FIXED_CHUNK: usize = 1024 * 1024;

/// How the stream is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cutting {
    /// Content-defined (FastCDC): a row inserted early in a logical dump shifts every byte
    /// after it, and the cuts move with them, so the chunks after it are found unchanged.
    ContentDefined,
    /// The store's stream has not begun: its first byte chooses.
    Undecided,
    /// Fixed [`FIXED_CHUNK`]-byte blocks from the start of a page image: its pages never
    /// move, so a fixed grid finds every unchanged block, and costs nothing per byte.
    Fixed,
}

/// Where to cut `buf` (offset, length), in stream order: every chunk when the stream
/// ended (`last`), else every chunk whose end is known (a content-defined cut needs the
/// bytes after it; a fixed one does not).
fn cuts(cutting: Cutting, buf: &[u8], last: bool) -> Vec<(usize, usize)> {
    match cutting {
        Cutting::Fixed => {
            let end = if last {
                buf.len()
            } else {
                buf.len() - buf.len() % FIXED_CHUNK
            };
            (0..end)
                .step_by(FIXED_CHUNK)
                .map(|off| (off, FIXED_CHUNK.min(end - off)))
                .collect()
        }
        Cutting::ContentDefined | Cutting::Undecided => {
            let mut cuts: Vec<(usize, usize)> =
                fastcdc::v2020::FastCDC::new(buf, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                    .map(|c| (c.offset, c.length))
                    .collect();
            if !last {
                cuts.pop();
            }
            cuts
        }
    }
}

/// The first stage of a backup: gathers the stream, cuts it (at content-defined
/// boundaries, or on a page image's fixed grid) and hands each chunk, numbered in stream
/// order, to the sealers.
struct ChunkWriter<'a> {
    /// The stream not yet cut: always shorter than [`CUT_AT`] between writes.
    buf: Vec<u8>,
    cutting: Cutting,
    /// The next chunk's number (after the last cut: how many chunks there are).
    next: usize,
    out: Option<std::sync::mpsc::SyncSender<Job>>,
    total: u64,
    progress: &'a dyn Fn(u64),
    error: Option<BackupError>,
    /// Set by a sealer that failed.
    failed: &'a std::sync::atomic::AtomicBool,
}

impl ChunkWriter<'_> {
    /// Cuts the buffer: a chunk is cut only once its end is known (or the stream ended,
    /// `last`), so the cuts equal those of chunking the whole stream at once, and an
    /// unchanged region gives the same chunks every time.
    fn cut(&mut self, last: bool) -> Result<(), BackupError> {
        let cuts = cuts(self.cutting, &self.buf, last);
        let consumed = cuts.last().map_or(0, |&(off, len)| off + len);
        // What stays uncut starts the next buffer (nothing, on a fixed grid); the cut part
        // is shared by its chunks.
        let mut rest = Vec::with_capacity(CUT_AT);
        rest.extend_from_slice(self.buf.get(consumed..).unwrap_or_default());
        let mut whole = std::mem::replace(&mut self.buf, rest);
        whole.truncate(consumed);
        let whole = std::sync::Arc::new(whole);
        let out = self
            .out
            .as_ref()
            .ok_or_else(|| BackupError::Stream("the stream is closed".into()))?;
        for &(off, len) in &cuts {
            out.send(Job {
                n: self.next,
                buf: whole.clone(),
                range: off..off + len,
            })
            .map_err(|_| BackupError::Stream("the sealing threads stopped".into()))?;
            self.next += 1;
        }
        Ok(())
    }
}

/// Threads sealing chunks.
const SEAL_WORKERS: usize = 2;

/// One chunk sealed: its reference, and the bytes written if this backup stored it.
struct Sealed {
    chunk: ChunkRef,
    written: Option<u64>,
}

/// Every chunk of a snapshot, in stream order, and what this backup stored.
struct SealedAll {
    chunks: Vec<ChunkRef>,
    new_chunks: usize,
    new_bytes: u64,
}

/// The sealing stage, shared by its threads: names, compresses, seals and stores chunks.
struct Sealer<'a> {
    repo: &'a Repo,
    cipher: LessSafeKey,
    /// The chunk-id MAC key (derived once).
    id_key: Zeroizing<[u8; 32]>,
    /// Chunks already stored, with their files' SHA-256.
    known: std::collections::HashMap<String, String>,
    /// Set when a chunk failed: the other stages stop.
    failed: std::sync::atomic::AtomicBool,
}

impl Sealer<'_> {
    /// Names one chunk and stores it unless the repository has it; `scratch` is the
    /// thread's buffer for the sealed file (grown once, reused: no allocation per chunk).
    fn seal_one(
        &self,
        plain: &[u8],
        scratch: &mut medvault_core::AlignedBuf,
    ) -> Result<Sealed, BackupError> {
        let id = chunk_id_with(&self.id_key, plain);
        let path = self.repo.chunk_path(&id);
        let (sha256, written) = match self.known.get(&id) {
            Some(sha) if path.exists() => (sha.clone(), None),
            _ => match fs::read(&path) {
                Ok(existing) => (hex(&Sha256::digest(&existing)), None),
                Err(_) => self.put_chunk(&path, plain, &id, scratch)?,
            },
        };
        Ok(Sealed {
            chunk: ChunkRef {
                id,
                len: plain.len() as u64,
                sha256,
            },
            written,
        })
    }

    /// Seals and stores one chunk unless another backup stored it first (several may run at
    /// once: the file is renamed into place only if no file has that name, never over one);
    /// returns the SHA-256 of the file that is now stored, whichever backup wrote it, and
    /// the bytes written when this backup wrote it.
    fn put_chunk(
        &self,
        path: &Path,
        plain: &[u8],
        id: &str,
        scratch: &mut medvault_core::AlignedBuf,
    ) -> Result<(String, Option<u64>), BackupError> {
        // nonce ‖ AES-256-GCM(u32-LE length ‖ LZ4 block) ‖ tag, compressed straight into
        // the file's buffer and sealed in place.
        let header = || BackupError::Stream("chunk header".into());
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let len = u32::try_from(plain.len())
            .map_err(|_| BackupError::Stream("chunk too large".into()))?;
        scratch.reserve(16 + lz4_flex::block::get_maximum_output_size(plain.len()) + 16);
        let buf = scratch.block();
        let (head, body) = buf.split_at_mut(16);
        head.get_mut(..12)
            .ok_or_else(header)?
            .copy_from_slice(&nonce);
        head.get_mut(12..)
            .ok_or_else(header)?
            .copy_from_slice(&len.to_le_bytes());
        let packed = lz4_flex::block::compress_into(plain, body)
            .map_err(|e| BackupError::Stream(format!("compression failed: {e}")))?;
        let end = 16 + packed;
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                buf.get_mut(12..end).ok_or_else(header)?,
            )
            .map_err(|_| BackupError::Stream("encryption failed".into()))?;
        buf.get_mut(end..end + 16)
            .ok_or_else(header)?
            .copy_from_slice(tag.as_ref());
        let file_len = end + 16;
        let sha256 = hex(&Sha256::digest(buf.get(..file_len).ok_or_else(header)?));
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let tmp = path.with_extension(format!("tmp{}-{}", std::process::id(), random_id()));
        // Straight to the disk where the file system allows (O_DIRECT): no page-cache copy,
        // and the sync before the manifest has little left to wait for.
        medvault_core::write_new_file(&tmp, scratch, file_len).map_err(io_err(&tmp))?;
        let placed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        match placed {
            Ok(()) => Ok((sha256, Some(file_len as u64))),
            Err(rustix::io::Errno::EXIST) => {
                let _ = fs::remove_file(&tmp);
                let existing = fs::read(path).map_err(io_err(path))?;
                Ok((hex(&Sha256::digest(&existing)), None))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(io_err(path)(e.into()))
            }
        }
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            let e = BackupError::Stream("a chunk could not be stored".into());
            let msg = e.to_string();
            self.error = Some(e);
            return Err(std::io::Error::other(msg));
        }
        if self.cutting == Cutting::Undecided {
            if let Some(&first) = b.first() {
                self.cutting = if first == medvault_core::PAGE_IMAGE_TAG {
                    Cutting::Fixed
                } else {
                    Cutting::ContentDefined
                };
            }
        }
        // The buffer fills to exactly `CUT_AT`, a whole number of fixed chunks: a page
        // image is cut with no bytes left over to copy.
        let mut rest = b;
        while !rest.is_empty() {
            let (now, later) = rest.split_at(rest.len().min(CUT_AT.saturating_sub(self.buf.len())));
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() >= CUT_AT {
                if let Err(e) = self.cut(false) {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let before = self.total;
        self.total += b.len() as u64;
        // Progress once per MiB: writes may come a database page at a time.
        if before >> 20 != self.total >> 20 {
            (self.progress)(self.total);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One chunk opened by a reader's worker: its plaintext length (from the manifest) and its
/// plaintext, or why it would not open.
type Opened = (u64, Result<Vec<u8>, BackupError>);

/// A snapshot's plaintext stream. Two threads read, check and decrypt the chunks ahead of
/// the reader (a few each), so a restore writes while the next chunks open.
pub struct SnapshotReader<'a> {
    /// One queue per opening worker.
    rxs: Vec<std::sync::mpsc::Receiver<Opened>>,
    /// Index of the next chunk in stream order.
    next: usize,
    total: u64,
    done: u64,
    cur: Vec<u8>,
    pos: usize,
    progress: &'a dyn Fn(u64, u64),
    error: Option<BackupError>,
    /// Set when the reader is dropped early, so the prefetching thread stops.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SnapshotReader<'_> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads one chunk file, checks its stored hash, decrypts it and checks its id.
fn open_chunk(
    dir: &Path,
    key: &RepoKey,
    cipher: &LessSafeKey,
    c: &ChunkRef,
) -> Result<Vec<u8>, BackupError> {
    let mut file = read_chunk_file(dir, c)?;
    let undecryptable = || BackupError::UndecryptableChunk(c.id.clone());
    if file.len() < 12 {
        return Err(undecryptable());
    }
    let (nonce, ct) = file.split_at_mut(12);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| undecryptable())?;
    let packed = cipher
        .open_in_place(nonce, Aad::from(c.id.as_bytes()), ct)
        .map_err(|_| undecryptable())?;
    let plain = lz4_flex::decompress_size_prepended(packed).map_err(|_| undecryptable())?;
    if plain.len() as u64 != c.len || key.chunk_id(&plain) != c.id {
        return Err(undecryptable());
    }
    Ok(plain)
}

fn chunk_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("chunks")
        .join(id.get(..2).unwrap_or("00"))
        .join(id)
}

fn read_chunk_file(dir: &Path, c: &ChunkRef) -> Result<Vec<u8>, BackupError> {
    let p = chunk_path(dir, &c.id);
    let data = match fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::MissingChunk(c.id.clone()))
        }
        Err(e) => return Err(io_err(&p)(e)),
    };
    if hex(&Sha256::digest(&data)) != c.sha256 {
        return Err(BackupError::CorruptChunk(c.id.clone()));
    }
    Ok(data)
}

impl SnapshotReader<'_> {
    /// Why the stream stopped, if a chunk failed.
    pub fn error(&mut self) -> Option<BackupError> {
        self.error.take()
    }
}

impl Read for SnapshotReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            let Some(Ok((len, next))) = self
                .rxs
                .get(self.next % OPEN_WORKERS)
                .map(std::sync::mpsc::Receiver::recv)
            else {
                return Ok(0);
            };
            self.next += 1;
            match next {
                Ok(p) => {
                    self.cur = p;
                    self.pos = 0;
                    self.done += len;
                    (self.progress)(self.done, self.total);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        if let (Some(o), Some(s)) = (out.get_mut(..n), self.cur.get(self.pos..self.pos + n)) {
            o.copy_from_slice(s);
        }
        self.pos += n;
        Ok(n)
    }
}

fn write_files(w: &mut dyn Write, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    w.write_all(FILES_MAGIC)?;
    w.write_all(&u16::try_from(files.len()).unwrap_or(0).to_le_bytes())?;
    for (name, data) in files {
        w.write_all(&u16::try_from(name.len()).unwrap_or(0).to_le_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&u32::try_from(data.len()).unwrap_or(0).to_le_bytes())?;
        w.write_all(data)?;
    }
    Ok(())
}

/// The files section of a snapshot stream, and the stream positioned at the dump.
///
/// # Errors
/// The stream is not a snapshot, or a chunk failed.
pub fn read_files<R: Read>(r: &mut R) -> Result<(CarriedFiles, &mut R), BackupError> {
    let bad = |e: std::io::Error| BackupError::Stream(e.to_string());
    let mut magic = [0u8; 6];
    r.read_exact(&mut magic).map_err(bad)?;
    if &magic != FILES_MAGIC {
        return Err(BackupError::Stream("not a medvault snapshot".into()));
    }
    let mut n = [0u8; 2];
    r.read_exact(&mut n).map_err(bad)?;
    let mut files = vec![];
    for _ in 0..u16::from_le_bytes(n) {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).map_err(bad)?;
        let mut name = vec![0u8; usize::from(u16::from_le_bytes(l))];
        r.read_exact(&mut name).map_err(bad)?;
        let mut l = [0u8; 4];
        r.read_exact(&mut l).map_err(bad)?;
        let len = u32::from_le_bytes(l) as usize;
        if len > 64 * 1024 * 1024 {
            return Err(BackupError::Stream("a carried file is too large".into()));
        }
        let mut data = Zeroizing::new(vec![0u8; len]);
        r.read_exact(&mut data).map_err(bad)?;
        let name = String::from_utf8(name).map_err(|_| BackupError::Stream("file name".into()))?;
        files.push((name, data));
    }
    Ok((files, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_keyed_and_files_round_trip() {
        let a = RepoKey {
            raw: Zeroizing::new([1; 32]),
        };
        let b = RepoKey {
            raw: Zeroizing::new([2; 32]),
        };
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.verifier(), b.verifier());
        let mut buf = vec![];
        write_files(&mut buf, &[("medvault.toml".into(), b"a=1".to_vec())]).unwrap();
        buf.extend_from_slice(b"rest");
        let mut r: &[u8] = &buf;
        let (files, rest) = read_files(&mut r).unwrap();
        assert_eq!(files[0].0, "medvault.toml");
        assert_eq!(&*files[0].1, b"a=1");
        let mut tail = vec![];
        rest.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, b"rest");
    }

    #[test]
    fn chunks_sealed_before_ring_still_open() {
        // 0.9.0's chunk files were sealed with the `aes-gcm` crate: the same AES-256-GCM,
        // nonce first and tag last, the id as associated data.
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key = RepoKey {
            raw: Zeroizing::new([5; 32]),
        };
        let plain = b"a page or two".repeat(100);
        let id = key.chunk_id(&plain);
        let packed = lz4_flex::compress_prepend_size(&plain);
        let nonce = [9u8; 12];
        let sealed = aes_gcm::Aes256Gcm::new((&*key.derive("chunk-seal/v1")).into())
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: &packed,
                    aad: id.as_bytes(),
                },
            )
            .unwrap();
        let file = [&nonce[..], &sealed].concat();
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkRef {
            id: id.clone(),
            len: plain.len() as u64,
            sha256: hex(&Sha256::digest(&file)),
        };
        std::fs::create_dir_all(chunk_path(dir.path(), &id).parent().unwrap()).unwrap();
        std::fs::write(chunk_path(dir.path(), &id), &file).unwrap();
        let cipher = key.cipher().unwrap();
        assert_eq!(open_chunk(dir.path(), &key, &cipher, &c).unwrap(), plain);
        // And one byte changed does not open.
        let mut bad = file.clone();
        bad[20] ^= 1;
        std::fs::write(chunk_path(dir.path(), &id), &bad).unwrap();
        let c = ChunkRef {
            sha256: hex(&Sha256::digest(&bad)),
            ..c
        };
        assert!(matches!(
            open_chunk(dir.path(), &key, &cipher, &c),
            Err(BackupError::UndecryptableChunk(_))
        ));
    }

    /// The chunks (their bytes) a backup cuts from `stream`, written `step` bytes at a time
    /// after the files' chunk, as `Repo::create` writes it.
    fn chunks_of(stream: &[u8], step: usize) -> Vec<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut w = ChunkWriter {
            buf: Vec::with_capacity(CUT_AT),
            cutting: Cutting::ContentDefined,
            next: 0,
            out: Some(tx),
            total: 0,
            progress: &|_| {},
            error: None,
            failed: &failed,
        };
        write_files(&mut w, &[]).unwrap();
        w.cut(true).unwrap();
        w.cutting = Cutting::Undecided;
        for part in stream.chunks(step) {
            w.write_all(part).unwrap();
        }
        w.cut(true).unwrap();
        drop(w);
        let jobs: Vec<Job> = rx.iter().collect();
        assert!(jobs.iter().enumerate().all(|(i, j)| j.n == i));
        jobs.iter()
            .skip(1)
            .map(|j| j.buf[j.range.clone()].to_vec())
            .collect()
    }

    /// Bytes that do not repeat (as FastCDC needs to find cuts).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn a_page_image_is_cut_on_a_fixed_grid_so_a_changed_page_changes_one_chunk() {
        // A page image: its tag, a header padded to one 4 KiB page, then pages.
        let mut image = noise(4096 + 5 * FIXED_CHUNK / 2, 7);
        image[0] = medvault_core::PAGE_IMAGE_TAG;
        for step in [4096, 1000, 3 * FIXED_CHUNK] {
            let chunks = chunks_of(&image, step);
            let lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
            assert_eq!(
                lens,
                [FIXED_CHUNK, FIXED_CHUNK, FIXED_CHUNK / 2 + 4096],
                "written {step} bytes at a time"
            );
            assert_eq!(chunks.concat(), image);
        }
        // One page rewritten: one chunk differs, the rest are found unchanged.
        let mut changed = image.clone();
        changed[4096 * 300..4096 * 301].copy_from_slice(&noise(4096, 9));
        let (a, b) = (chunks_of(&image, 4096), chunks_of(&changed, 4096));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 1);
    }

    #[test]
    fn a_logical_dump_is_cut_where_its_content_says() {
        // Any other first byte (a logical dump's table frame): content-defined chunks, so
        // bytes inserted early leave the later chunks as they were.
        let mut dump = noise(6 * FIXED_CHUNK, 11);
        dump[0] = b'T';
        let chunks = chunks_of(&dump, 4096);
        assert_eq!(chunks.concat(), dump);
        assert!(chunks.len() > 6, "{}", chunks.len());
        assert!(chunks
            .iter()
            .rev()
            .skip(1)
            .all(|c| (CHUNK_MIN as usize..=CHUNK_MAX as usize).contains(&c.len())));
        let mut longer = dump.clone();
        longer.splice(100..100, noise(1000, 13));
        let after = chunks_of(&longer, 4096);
        let shared = after.iter().filter(|c| chunks.contains(c)).count();
        assert!(shared + 2 >= chunks.len(), "{shared} of {}", chunks.len());
    }
}
