//! `medvault backup …`: create, list, verify, restore, drill, prune, and the recovery key
//! (SPEC "Keys, backup, destruction"); and the server's scheduled snapshots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use medvault_backup::{Manifest, RecoveryPublic, RecoverySecret, Repo, RepoKey};
use medvault_core::{Caller, Clock, LocalOperator, Role, Vault};
use serde_json::json;

use crate::config::{self, Config};

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a snapshot now (online, consistent); prints its manifest's path.
    Create {
        /// The repository (default: `backup.repository`, else DATA_DIR-backups).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Read the store no faster than this many KiB/s (spares a busy server's disk).
        #[arg(long)]
        limit_kbps: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// List the repository's complete snapshots, oldest first.
    List {
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot (its manifest file): signature and every chunk's hash without any
    /// key; with the master key (or a recovery key) also decrypt every chunk.
    Verify {
        snapshot: PathBuf,
        /// Require the full check (restic's `--read-data`): fail unless every chunk can be
        /// decrypted, i.e. the data directory's master key or a recovery key is at hand.
        #[arg(long)]
        read_data: bool,
        #[command(flatten)]
        recovery: RecoveryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (its manifest file) into a new data directory, replaying the shred
    /// ledger of every later snapshot (and of --ledger) so nothing destroyed comes back.
    Restore {
        snapshot: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// Restore into this (empty) PostgreSQL database instead of SQLite.
        #[arg(long)]
        postgres: Option<String>,
        /// A shred ledger from the live system (`medvault destroy ledger --json`).
        #[arg(long)]
        ledger: Vec<PathBuf>,
        #[command(flatten)]
        recovery: RecoveryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Restore the newest snapshot into a temporary directory, verify its audit log, count
    /// records per type against the manifest, and report recovery time (RTO) and the age
    /// of the newest data (RPO).
    Drill {
        #[arg(long)]
        out: Option<PathBuf>,
        /// Open the backup with a recovery key (or shares) instead of the master key: the
        /// drill of the day the master key is lost.
        #[command(flatten)]
        recovery: RecoveryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete all but the newest N snapshots and the chunks only they used.
    Prune {
        #[arg(long)]
        out: Option<PathBuf>,
        /// Snapshots to keep (default `backup.retain`; at least 1: prune never deletes
        /// every snapshot).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Make a new recovery key (printed once; optionally split M-of-N among named holders).
    /// Repositories created afterwards seal their key to it.
    RecoveryKey {
        /// Split the key: any M of N shares rebuild it, e.g. `3-of-5`.
        #[arg(long, value_parser = parse_split, requires = "holders")]
        split: Option<(u8, u8)>,
        /// The share holders, comma-separated (N names; with --split).
        #[arg(long, requires = "split")]
        holders: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `--split M-of-N` (1 ≤ M ≤ N ≤ 255; the shares' own limits are checked when made).
fn parse_split(spec: &str) -> std::result::Result<(u8, u8), String> {
    spec.split_once("-of-")
        .and_then(|(m, n)| Some((m.parse::<u8>().ok()?, n.parse::<u8>().ok()?)))
        .ok_or_else(|| "takes M-of-N, e.g. 3-of-5".to_owned())
}

/// The recovery key, when the master key is not at hand.
#[derive(clap::Args, Debug)]
pub struct RecoveryArgs {
    /// A file holding the recovery key (`MVRK1-…`).
    #[arg(long)]
    recovery_key_file: Option<PathBuf>,
    /// Files each holding one share (`MVRS1-…`); give M of them.
    #[arg(long)]
    share_file: Vec<PathBuf>,
}

impl RecoveryArgs {
    /// Whether a recovery key or shares were given.
    fn given(&self) -> bool {
        self.recovery_key_file.is_some() || !self.share_file.is_empty()
    }

    fn secret(&self) -> Result<Option<RecoverySecret>> {
        if let Some(f) = &self.recovery_key_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            return Ok(Some(RecoverySecret::from_text(&t)?));
        }
        if !self.share_file.is_empty() {
            let mut shares = vec![];
            for f in &self.share_file {
                shares.push(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
                );
            }
            return Ok(Some(RecoverySecret::combine(&shares)?));
        }
        Ok(None)
    }
}

/// After a master key rotation: re-wraps the key of the installation's repository (if it
/// exists) under the version in force; returns its path when it did.
///
/// # Errors
/// The repository's config cannot be read or written, or its key does not open.
pub fn rewrap_repository(dir: &Path, vault: &Vault, c: &Caller) -> Result<Option<String>> {
    let cfg = Config::load(dir)?;
    let path = repository(dir, &cfg, None);
    if !path.join("config.json").exists() {
        return Ok(None);
    }
    let mut repo = Repo::open(&path)?;
    repo.key_from_vault(vault, c)?;
    Ok(Some(path.display().to_string()))
}

/// The repository of a data directory: `backup.repository`, else `DIR-backups`.
pub fn repository(dir: &Path, cfg: &Config, out: Option<&Path>) -> PathBuf {
    if let Some(o) = out {
        return o.to_owned();
    }
    if !cfg.backup.repository.is_empty() {
        let p = PathBuf::from(&cfg.backup.repository);
        return if p.is_absolute() { p } else { dir.join(p) };
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "medvault-data".into());
    dir.with_file_name(format!("{name}-backups"))
}

/// Writes a new recovery key pair: the public half into the data directory, the private
/// half returned to print once.
pub fn new_recovery_key(dir: &Path, cfg: &Config) -> Result<RecoverySecret> {
    let s = RecoverySecret::generate();
    install_recovery_public(dir, cfg, &s)?;
    Ok(s)
}

/// Makes `s`'s public half the one new backups are sealed to.
fn install_recovery_public(dir: &Path, cfg: &Config, s: &RecoverySecret) -> Result<()> {
    let p = dir.join(&cfg.backup.recovery_public_key_file);
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", s.public().to_text()))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

fn recovery_public(dir: &Path, cfg: &Config) -> Result<RecoveryPublic> {
    let p = dir.join(&cfg.backup.recovery_public_key_file);
    let t = std::fs::read_to_string(&p).map_err(|_| {
        anyhow!(
            "no recovery key ({} is missing): run `medvault backup recovery-key` first, so backups survive the loss of the master key",
            p.display()
        )
    })?;
    Ok(RecoveryPublic::from_text(&t)?)
}

/// The data-directory files a snapshot carries (configuration, key files, certificate,
/// recovery public key), by name relative to the data directory.
fn carried_files(dir: &Path, cfg: &Config) -> Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![
        config::FILE.to_owned(),
        cfg.tls.cert.to_string_lossy().into_owned(),
        cfg.tls.key.to_string_lossy().into_owned(),
        cfg.backup.recovery_public_key_file.clone(),
    ];
    let base = cfg.keys.master_key_file.clone();
    for v in 1..=64u32 {
        let p = medvault_core::master_key_version_path(&base, v);
        if dir.join(&p).exists() {
            names.push(p.to_string_lossy().into_owned());
        }
    }
    let mut out = vec![];
    for n in names {
        let p = dir.join(&n);
        if p.exists() {
            out.push((
                n,
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
            ));
        }
    }
    Ok(out)
}

fn bar(msg: &'static str) -> Option<indicatif::ProgressBar> {
    crate::progress_bar(0, msg)
}

fn expires(cfg: &Config) -> String {
    let keep = u64::try_from(cfg.backup.retain.max(1)).unwrap_or(1);
    let every = cfg.backup.interval_secs.max(86_400);
    let secs = keep.saturating_mul(every);
    let now = crate::SystemClock.now().unix_timestamp();
    medvault_core::fhir_instant_secs(now.saturating_add(i64::try_from(secs).unwrap_or(0)))
}

/// Opens (or creates) the repository and its key through the gate.
fn open_repo(
    dir: &Path,
    cfg: &Config,
    vault: &Vault,
    c: &Caller,
    out: Option<&Path>,
) -> Result<(Repo, RepoKey)> {
    let path = repository(dir, cfg, out);
    if path.starts_with(dir) {
        bail!(
            "the backup repository {} is inside the data directory; put it elsewhere",
            path.display()
        );
    }
    if !path.join("config.json").exists() {
        match Repo::init(
            &path,
            vault,
            c,
            &recovery_public(dir, cfg)?,
            crate::SystemClock.now(),
        ) {
            Ok(made) => return Ok(made),
            // Another backup made it at the same moment: use theirs.
            Err(medvault_backup::BackupError::Raced(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut repo = Repo::open(&path)?;
    let key = repo.key_from_vault(vault, c)?;
    Ok((repo, key))
}

/// Takes one snapshot and prunes to `backup.retain` (the server's schedule and `create`).
pub fn snapshot(
    dir: &Path,
    cfg: &Config,
    vault: &Vault,
    c: &Caller,
    out: Option<&Path>,
    limit_kbps: Option<u64>,
) -> Result<medvault_backup::CreateReport> {
    let (repo, key) = open_repo(dir, cfg, vault, c, out)?;
    let files = carried_files(dir, cfg)?;
    let b = bar("backing up");
    let started = std::time::Instant::now();
    let report = repo.create(
        &key,
        vault,
        c,
        &files,
        crate::SystemClock.now(),
        &expires(cfg),
        &|n| {
            if let Some(b) = &b {
                b.set_position(n);
            }
            if let Some(k) = limit_kbps.filter(|k| *k > 0) {
                let due = std::time::Duration::from_secs_f64(n as f64 / (k as f64 * 1024.0));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    crate::throttle(wait);
                }
            }
        },
    )?;
    if let Some(b) = b {
        b.finish_and_clear();
    }
    if out.is_none() {
        repo.prune(cfg.backup.retain)?;
    }
    Ok(report)
}

/// The server's scheduled backups: one snapshot every `backup.interval_secs`, pruned to
/// `backup.retain`, in a thread of its own; failures are logged, never fatal.
pub fn schedule(
    dir: PathBuf,
    cfg: Config,
    vault: Arc<Vault>,
    op: &LocalOperator,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    if cfg.backup.interval_secs == 0 {
        return Ok(None);
    }
    let c = Caller::system(op, "backup");
    let every = std::time::Duration::from_secs(cfg.backup.interval_secs);
    Ok(Some(
        std::thread::Builder::new()
            .name("medvault-backups".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every)
                {
                    match snapshot(&dir, &cfg, &vault, &c, None, None) {
                        Ok(r) => tracing::info!(snapshot = %r.snapshot, bytes = r.bytes, new_bytes = r.new_bytes, "scheduled backup taken"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "scheduled backup failed"),
                    }
                }
            })?,
    ))
}

fn repo_of_manifest(path: &Path) -> Result<Repo> {
    if !path.is_file() {
        bail!(
            "{}: no such snapshot manifest (give REPOSITORY/snapshots/ID.json, as `backup list` shows)",
            path.display()
        );
    }
    let not_manifest = || {
        anyhow!(
            "{} is not a snapshot manifest (REPOSITORY/snapshots/ID.json, as `backup list` shows)",
            path.display()
        )
    };
    let snapshots = path.parent().ok_or_else(not_manifest)?;
    if snapshots.file_name() != Some(std::ffi::OsStr::new("snapshots"))
        || path.extension() != Some(std::ffi::OsStr::new("json"))
    {
        return Err(not_manifest());
    }
    let dir = snapshots.parent().ok_or_else(not_manifest)?;
    Ok(Repo::open(dir)?)
}

/// The repository key: from the recovery key when one is given, else through the data
/// directory's master key (if the data directory opens).
fn key_for(repo: &mut Repo, dir: &Path, rec: &RecoveryArgs) -> Result<Option<RepoKey>> {
    if let Some(s) = rec.secret()? {
        return Ok(Some(repo.key_from_recovery(&s)?));
    }
    if !dir.join(config::FILE).exists() {
        return Ok(None);
    }
    let opened = crate::open(dir).and_then(|(_, vault, op)| {
        Ok(repo.key_from_vault(&vault, &Caller::system(&op, "backup"))?)
    });
    opened.map(Some).map_err(|e| {
        anyhow!(
            "{e:#} — the backup's key comes from this data directory's master key; without it, give --recovery-key-file or --share-file"
        )
    })
}

pub fn run(dir: &Path, cmd: BackupCommand) -> Result<()> {
    match cmd {
        BackupCommand::Create {
            out,
            limit_kbps,
            json,
        } => {
            let (cfg, vault, op) = crate::open(dir)?;
            let r = snapshot(
                dir,
                &cfg,
                &vault,
                &Caller::system(&op, "backup"),
                out.as_deref(),
                limit_kbps,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "snapshot {} taken: {} bytes in {} chunks ({} new, {} bytes written) in {:.2}s; manifest {}",
                    r.snapshot, r.bytes, r.chunks, r.new_chunks, r.new_bytes, r.seconds, r.manifest
                );
            }
        }
        BackupCommand::List { out, json } => {
            let cfg = Config::load(dir)?;
            let repo = Repo::open(&repository(dir, &cfg, out.as_deref()))?;
            let (snaps, bad) = repo.snapshots()?;
            if json {
                let list: Vec<_> = snaps.iter().map(|(p, m)| json!({"id": m.id, "manifest": p, "created": m.created, "expires": m.expires, "bytes": m.bytes(), "resources": m.stats.resources, "audit_entries": m.stats.audit_entries})).collect();
                println!(
                    "{}",
                    json!({"snapshots": list, "invalid": bad.iter().map(|e| e.to_string()).collect::<Vec<_>>()})
                );
            } else {
                for (p, m) in &snaps {
                    println!(
                        "{}  {}  {} bytes  {} audit entries  expires {}  {}",
                        m.id,
                        m.created,
                        m.bytes(),
                        m.stats.audit_entries,
                        m.expires,
                        p.display()
                    );
                }
                for e in &bad {
                    println!("INVALID: {e}");
                }
                if snaps.is_empty() {
                    println!("no snapshots");
                }
            }
        }
        BackupCommand::Verify {
            snapshot,
            read_data,
            recovery,
            json,
        } => {
            let mut repo = repo_of_manifest(&snapshot)?;
            let manifest = repo.manifest(&snapshot)?;
            let key = match key_for(&mut repo, dir, &recovery) {
                Ok(k) => k,
                // Integrity needs no key: check that much, and say what was not checked.
                Err(e) if !read_data && !recovery.given() => {
                    eprintln!("note: checking integrity only: {e}");
                    None
                }
                Err(e) => return Err(e),
            };
            if read_data && key.is_none() {
                bail!(
                    "--read-data decrypts every chunk: it needs this data directory's master key ({} holds no installation) or --recovery-key-file/--share-file",
                    dir.display()
                );
            }
            let b = bar("verifying");
            let r = repo.verify(&manifest, key.as_ref(), &|d, t| {
                if let Some(b) = &b {
                    b.set_length(t);
                    b.set_position(d);
                }
            })?;
            if let Some(b) = b {
                b.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "snapshot {} is intact ({}): {} chunks, {} bytes{}",
                    r.snapshot,
                    r.level,
                    r.chunks,
                    r.bytes,
                    if r.level == "integrity" {
                        "; give the master key or a recovery key to decrypt every chunk"
                    } else {
                        ""
                    }
                );
            }
        }
        BackupCommand::Restore {
            snapshot,
            to,
            postgres,
            ledger,
            recovery,
            json,
        } => {
            let mut repo = repo_of_manifest(&snapshot)?;
            let manifest = repo.manifest(&snapshot)?;
            let key = key_for(&mut repo, dir, &recovery)?.ok_or_else(|| {
                anyhow!("no key to open this backup: {} holds no medvault installation (no {}); give --recovery-key-file or --share-file", dir.display(), config::FILE)
            })?;
            if dir.join(config::FILE).exists() && inside(&to, dir) {
                bail!(
                    "{} is inside the data directory {}; restore into a directory of its own",
                    to.display(),
                    dir.display()
                );
            }
            let r = restore(&repo, &manifest, &key, &to, postgres, &ledger)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for w in &r.warnings {
                    eprintln!("WARNING: {w}");
                }
                println!(
                    "restored snapshot {} into {} in {:.2}s: {} resources, audit log of {} entries verified; {} destroyed charts replayed",
                    manifest.id,
                    to.display(),
                    r.seconds,
                    r.resources.values().sum::<u64>(),
                    r.audit_entries,
                    r.replayed.len()
                );
            }
        }
        BackupCommand::Drill {
            out,
            recovery,
            json,
        } => {
            let (cfg, vault, op) = crate::open(dir)?;
            let c = Caller::system(&op, "backup");
            let mut repo = Repo::open(&repository(dir, &cfg, out.as_deref()))?;
            let key = match recovery.secret()? {
                Some(s) => Some(repo.key_from_recovery(&s)?),
                None => None,
            };
            let report = drill(&mut repo, &vault, &c, key)?;
            if json {
                println!("{report}");
            } else {
                println!("{}", drill_line(&report));
            }
            if report.get("counts_match_manifest") != Some(&serde_json::Value::Bool(true)) {
                bail!("the restored record counts differ from the manifest's");
            }
        }
        BackupCommand::Prune { out, keep, json } => {
            let cfg = Config::load(dir)?;
            let repo = Repo::open(&repository(dir, &cfg, out.as_deref()))?;
            let keep = keep.map_or(cfg.backup.retain, |k| {
                usize::try_from(k).unwrap_or(usize::MAX)
            });
            if keep == 0 {
                bail!("backup.retain must be at least 1: prune never deletes every snapshot");
            }
            let (s, c) = repo.prune(keep)?;
            if json {
                println!(
                    "{}",
                    json!({"kept": keep, "pruned_snapshots": s, "pruned_chunks": c})
                );
            } else {
                println!("pruned {s} snapshots and {c} chunks");
            }
        }
        BackupCommand::RecoveryKey {
            split,
            holders,
            json,
        } => {
            let cfg = Config::load(dir)?;
            crate::require_database(dir, &cfg)?;
            if let Some(h) = &holders {
                let mut names: Vec<&str> = h.split(',').map(str::trim).collect();
                let n = names.len();
                names.sort_unstable();
                names.dedup();
                if names.len() != n {
                    bail!("--holders names someone twice: each share goes to a different person");
                }
            }
            let s = RecoverySecret::generate();
            // Everything is checked, and the shares made, before the new key replaces the
            // old one: a mistyped split must not leave backups sealed to a key nobody holds.
            let split = match split {
                None => None,
                Some((m, n)) => {
                    let names: Vec<String> = holders
                        .unwrap_or_default()
                        .split(',')
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                        .collect();
                    if names.len() != usize::from(n) {
                        bail!("--holders must name {n} people, one per share");
                    }
                    Some((m, n, names, s.split(m, n)?))
                }
            };
            let (_, vault, op) = crate::open(dir)?;
            let detail = match &split {
                None => format!("public={}", s.public().to_text()),
                Some((m, n, names, _)) => format!(
                    "public={} split={m}-of-{n} holders={}",
                    s.public().to_text(),
                    names.join(",")
                ),
            };
            vault
                .record_recovery_key(&Caller::system(&op, "backup"), &detail)
                .map_err(crate::describe)?;
            install_recovery_public(dir, &cfg, &s)?;
            match split {
                None => {
                    let key = s.to_text();
                    if json {
                        println!(
                            "{}",
                            json!({"recovery_key": &*key, "public_key": s.public().to_text()})
                        );
                    } else {
                        println!("recovery key (store it offline; it opens every backup made from now on):\n{}", &*key);
                    }
                }
                Some((m, n, names, shares)) => {
                    if json {
                        let list: Vec<_> = names
                            .iter()
                            .zip(&shares)
                            .map(|(h, s)| json!({"holder": h, "share": &**s}))
                            .collect();
                        println!(
                            "{}",
                            json!({"threshold": m, "shares": list, "public_key": s.public().to_text()})
                        );
                    } else {
                        println!("recovery key split {m}-of-{n}; give each holder their share, privately:");
                        for (h, sh) in names.iter().zip(&shares) {
                            println!("{h}: {}", &**sh);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `p` made absolute, with `.` and `..` applied and the symbolic links of the part that
/// exists resolved (what it would be once created).
fn resolved(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut norm = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                norm.pop();
            }
            Component::CurDir => {}
            c => norm.push(c),
        }
    }
    let (mut head, mut tail) = (norm.clone(), vec![]);
    loop {
        if let Ok(mut real) = head.canonicalize() {
            real.extend(tail.iter().rev());
            return real;
        }
        match head.file_name().map(std::ffi::OsStr::to_owned) {
            Some(name) if head.pop() => tail.push(name),
            _ => return norm,
        }
    }
}

/// Whether `p` is `base` or lies inside it (both [`resolved`]).
fn inside(p: &Path, base: &Path) -> bool {
    resolved(p).starts_with(resolved(base))
}

/// A restore drill (`backup drill`, and the console's): the newest snapshot restored into
/// a temporary directory, its audit log and records verified, its counts compared with the
/// manifest; the report (RTO, RPO, counts) recorded in the audit log and returned.
fn drill(
    repo: &mut Repo,
    vault: &Vault,
    c: &Caller,
    key: Option<RepoKey>,
) -> Result<serde_json::Value> {
    let key = match key {
        Some(k) => k,
        None => repo.key_from_vault(vault, c)?,
    };
    let (snaps, _) = repo.snapshots()?;
    let (_, manifest) = snaps
        .last()
        .ok_or_else(|| anyhow!("no snapshots in {} to drill with", repo.dir.display()))?;
    let tmp = tempfile::tempdir()?;
    let r = restore(
        repo,
        manifest,
        &key,
        &tmp.path().join("restored"),
        None,
        &[],
    )?;
    let rpo = age_secs(
        manifest
            .stats
            .newest_write
            .as_deref()
            .unwrap_or(&manifest.created),
    );
    let report = json!({
        "snapshot": manifest.id, "created": manifest.created,
        "rto_seconds": r.seconds, "rpo_seconds": rpo,
        "audit_entries": r.audit_entries, "audit_verified": true,
        "records_verified": r.records_verified,
        "resources": r.resources, "counts_match_manifest": r.resources == manifest.stats.resources,
        "replayed_destructions": r.replayed.len(),
    });
    vault.record_drill(c, &report).map_err(crate::describe)?;
    Ok(report)
}

/// One line for people from a drill's report.
fn drill_line(r: &serde_json::Value) -> String {
    let f = |k: &str| r.get(k).cloned().unwrap_or(serde_json::Value::Null);
    format!(
        "Drill of snapshot {}: restored and verified in {:.2} s (RTO); newest data {} s old (RPO); audit log of {} entries and {} record versions verified; record counts {} the manifest.",
        f("snapshot").as_str().unwrap_or(""),
        f("rto_seconds").as_f64().unwrap_or(0.0),
        f("rpo_seconds"),
        f("audit_entries"),
        f("records_verified"),
        if f("counts_match_manifest") == true { "match" } else { "DO NOT match" }
    )
}

fn age_secs(instant: &str) -> i64 {
    let Ok(t) =
        time::OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339)
    else {
        return -1;
    };
    (crate::SystemClock.now() - t).whole_seconds()
}

/// What a restore did.
#[derive(Debug, serde::Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub to: String,
    /// The whole restore: load, shred-ledger replay, audit and record verification.
    pub seconds: f64,
    /// Reading, decrypting and loading the snapshot's stream alone.
    pub load_seconds: f64,
    pub resources: std::collections::BTreeMap<String, u64>,
    pub audit_entries: u64,
    /// Record versions checked against their audit records.
    pub records_verified: u64,
    /// Charts destroyed after the snapshot, shredded again in the restored copy.
    pub replayed: Vec<String>,
    pub warnings: Vec<String>,
}

fn restore(
    repo: &Repo,
    manifest: &Manifest,
    key: &RepoKey,
    to: &Path,
    postgres: Option<String>,
    ledgers: &[PathBuf],
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    if inside(to, &repo.dir) {
        bail!(
            "{} is inside the backup repository {}; restore into a directory of its own",
            to.display(),
            repo.dir.display()
        );
    }
    if to.is_symlink() {
        bail!(
            "{} is a symbolic link; give the new directory's own path",
            to.display()
        );
    }
    if to.exists() && !to.is_dir() {
        bail!("{} exists and is not a directory", to.display());
    }
    // A directory left by a restore killed after its rename, before it removed its marker,
    // is cleared like a staging directory; anything else at the target is refused.
    if to.join(crate::RESTORE_MARKER).exists() {
        clear_interrupted(to)?;
    }
    if to.exists()
        && std::fs::read_dir(to)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; restore into a new directory",
            to.display()
        );
    }
    // The ledger: this snapshot's, every later snapshot's, and any given from the live system.
    let mut ledger: Vec<(String, u64)> = manifest.shred_ledger.clone();
    let (snaps, _) = repo.snapshots()?;
    // Later: a longer audit log (every snapshot appends its own entry before dumping).
    let later: Vec<&Manifest> = snaps
        .iter()
        .map(|s| &s.1)
        .filter(|m| m.stats.audit_entries > manifest.stats.audit_entries)
        .collect();
    for m in &later {
        ledger.extend(m.shred_ledger.iter().cloned());
    }
    // Ledgers from the live system: signed notes, checked once the restored copy (which
    // holds the same destruction key) is open.
    let mut notes = vec![];
    for f in ledgers {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let note = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => v
                .get("note")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    anyhow!(
                        "{} is not a shred ledger (`medvault destroy ledger`)",
                        f.display()
                    )
                })?,
            Err(_) => text,
        };
        notes.push((f.clone(), note));
    }
    let mut warnings = vec![];
    if later.is_empty() && ledgers.is_empty() {
        warnings.push(format!(
            "no shred ledger later than this snapshot ({}): charts destroyed after it would come back. Give --ledger with `medvault destroy ledger --json` from the live system, or restore from a newer snapshot",
            manifest.created
        ));
    }
    // Built in a staging directory beside the target and renamed into place only once it
    // is whole and verified: a restore that fails, or is killed, leaves no data directory
    // at the target that could be served. The staging directory is locked (flock) while
    // its restore runs, so a second restore to the same target refuses; one left by a
    // killed restore (marked, unlocked) is cleared first; anything else there is refused.
    let target = to;
    let staging = {
        let name = target
            .file_name()
            .ok_or_else(|| anyhow!("{} names no directory", target.display()))?;
        let mut n = name.to_owned();
        n.push(".restoring");
        target.with_file_name(n)
    };
    if staging.is_symlink() || staging.exists() {
        clear_interrupted(&staging)?;
    }
    if let Some(parent) = staging.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode_0700()
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Not recursive: of two restores racing to create it, one fails here.
    if let Err(e) = std::fs::DirBuilder::new().mode_0700().create(&staging) {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            bail!(
                "cannot create {}: another restore into {} is starting",
                staging.display(),
                target.display()
            );
        }
        bail!("cannot create {}: {e}", staging.display());
    }
    let _held = lock_restore(&staging)?.ok_or_else(|| {
        anyhow!(
            "another restore into {} is running; let it finish",
            target.display()
        )
    })?;
    crate::write_private(
        &staging.join(crate::RESTORE_MARKER),
        b"medvault backup restore is building this directory; it is renamed into place when done\n",
    )?;
    let to = staging.as_path();
    let result = (|| -> Result<RestoreReport> {
        let progress_bar = bar("restoring");
        let progress = |d: u64, t: u64| {
            if let Some(b) = &progress_bar {
                b.set_length(t);
                b.set_position(d);
            }
        };
        let mut reader = repo.reader(manifest, key, &progress);
        let loaded = (|| -> Result<medvault_core::SnapshotStats> {
            let (files, rest) = medvault_backup::read_files(&mut reader)?;
            for (name, data) in &files {
                let rel = Path::new(name);
                if rel.is_absolute()
                    || rel
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    bail!("the snapshot names a file outside the data directory: {name}");
                }
                let p = to.join(rel);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                crate::write_private(&p, data)?;
            }
            let mut cfg = Config::load(to)?;
            if let Some(url) = &postgres {
                cfg.storage.backend = "postgres".into();
                cfg.storage.url = url.clone();
                cfg.storage.url_file = String::new();
            } else {
                cfg.storage.backend = "sqlite".into();
                // The copy's database lives in the copy, whatever path the source used.
                if Path::new(&cfg.storage.path).is_absolute() {
                    cfg.storage.path = "medvault.db".into();
                }
            }
            // The restored copy keeps its own schedule off until an operator turns it on.
            cfg.backup.interval_secs = 0;
            std::fs::remove_file(to.join(config::FILE))?;
            crate::write_private(&to.join(config::FILE), cfg.to_toml()?.as_bytes())?;
            let storage = crate::storage(to, &cfg)?;
            medvault_core::restore_store(&storage, rest).map_err(crate::describe)
        })();
        let loaded = match loaded {
            Ok(s) => s,
            Err(e) => return Err(reader.error().map(anyhow::Error::from).unwrap_or(e)),
        };
        drop(reader);
        let load_seconds = started.elapsed().as_secs_f64();
        if let Some(b) = progress_bar {
            b.finish_and_clear();
        }
        let (_, vault, op) = crate::open_restoring(to)?;
        let mut ledger = ledger.clone();
        for (f, note) in &notes {
            let entries = vault
                .verify_shred_ledger(note)
                .map_err(|e| anyhow!("{}: {}", f.display(), crate::describe(e)))?;
            ledger.extend(entries);
        }
        ledger.sort();
        ledger.dedup();
        let replayed = vault
            .replay_shred_ledger(&Caller::system(&op, "restore"), &ledger)
            .map_err(crate::describe)?;
        vault
            .remove_shredded(&Caller::system(&op, "restore"))
            .map_err(crate::describe)?;
        let verdict = vault
            .verify_audit(&Caller::cli(&op, Role::Auditor), &|_, _| {})
            .map_err(crate::describe)?;
        if !matches!(verdict, medvault_core::AuditVerdict::Intact { .. }) {
            bail!("the restored audit log does not verify: {verdict:?}");
        }
        let records = vault
            .verify_records(&Caller::cli(&op, Role::Auditor))
            .map_err(crate::describe)?;
        if let Some(p) = records.problems.first() {
            bail!(
                "the restored records disagree with the audit log ({} problems); first: {p}",
                records.problems.len()
            );
        }
        let resources = vault
            .census(&Caller::system(&op, "restore"))
            .map_err(crate::describe)?;
        Ok(RestoreReport {
            snapshot: manifest.id.clone(),
            to: target.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            load_seconds,
            resources,
            audit_entries: loaded.audit_entries,
            records_verified: records.checked,
            replayed,
            warnings: warnings.clone(),
        })
    })();
    let placed = result.and_then(|report| {
        // rename(2) replaces an empty directory at the target, or makes it. The marker
        // goes after: a restore killed between the two leaves a marked target, which
        // commands refuse and the next restore clears.
        std::fs::rename(&staging, target).with_context(|| {
            format!(
                "cannot move the restored copy from {} to {}",
                staging.display(),
                target.display()
            )
        })?;
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(parent).and_then(|d| d.sync_all())?;
        std::fs::remove_file(target.join(crate::RESTORE_MARKER))?;
        Ok(report)
    });
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    placed
}

/// Locks the directory `dir` ([`crate::try_lock_exclusive`]); `None` if another process
/// holds it.
fn lock_restore(dir: &Path) -> Result<Option<std::fs::File>> {
    let f = std::fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    crate::try_lock_exclusive(f, dir)
}

/// Removes `dir` if it is what a killed restore left: a directory holding the restore
/// marker that no running restore holds locked. Anything else is refused, never deleted.
fn clear_interrupted(dir: &Path) -> Result<()> {
    let leftover = !dir.is_symlink() && dir.is_dir() && dir.join(crate::RESTORE_MARKER).is_file();
    if !leftover {
        bail!(
            "{} exists and was not left by an interrupted restore; move it away first",
            dir.display()
        );
    }
    let Some(_lock) = lock_restore(dir)? else {
        bail!(
            "another restore is building {}; let it finish",
            dir.display()
        );
    };
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))
}

trait Mode0700 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl Mode0700 for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// `medvault bench`'s backup, restore and shred rows, on the largest fixture: backup and
/// restore throughput of the whole store (MB/s of the snapshot stream), and the latency of
/// shredding a chart of 1 and of 1,000 records through the gate.
pub fn bench_rows(
    vault: &Vault,
    op: &LocalOperator,
    dir: &Path,
    patients: usize,
) -> std::result::Result<Vec<medvault_bench::BenchRow>, medvault_core::VaultError> {
    use medvault_core::VaultError;
    let internal = |e: &dyn std::fmt::Display| VaultError::Internal(e.to_string());
    let c = Caller::system(op, "bench");
    let secret = RecoverySecret::generate();
    let (repo, key) = Repo::init(
        &dir.join("bench-repo"),
        vault,
        &c,
        &secret.public(),
        crate::SystemClock.now(),
    )
    .map_err(|e| internal(&e))?;
    let r = repo
        .create(&key, vault, &c, &[], crate::SystemClock.now(), "", &|_| {})
        .map_err(|e| internal(&e))?;
    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs.max(1e-9);
    let mut rows = vec![medvault_bench::throughput_row(
        patients,
        "backup (MB/s)",
        mb(r.bytes, r.seconds),
    )];
    let manifest = repo
        .manifest(Path::new(&r.manifest))
        .map_err(|e| internal(&e))?;
    let started = std::time::Instant::now();
    let mut reader = repo.reader(&manifest, &key, &|_, _| {});
    let (_, rest) = medvault_backup::read_files(&mut reader).map_err(|e| internal(&e))?;
    medvault_core::restore_store(
        &medvault_core::Storage::Sqlite(dir.join("bench-restored.db")),
        rest,
    )?;
    rows.push(medvault_bench::throughput_row(
        patients,
        "restore (MB/s)",
        mb(r.bytes, started.elapsed().as_secs_f64()),
    ));
    // Charts to shred: ten of one record, three of 1,000.
    let importer = Caller::cli(op, Role::Importer);
    for (charts, records) in [(10usize, 1usize), (3, 1000)] {
        let mut entries = vec![];
        for n in 0..charts {
            let p = format!("urn:uuid:{n:08}-0000-4000-a000-{records:012}");
            entries.push(json!({"fullUrl": p, "resource": {"resourceType": "Patient", "name": [{"family": "Shred"}]}}));
            for _ in 1..records {
                entries.push(
                    json!({"resource": {"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": p}, "valueQuantity": {"value": 72, "unit": "/min"}}}),
                );
            }
        }
        let done = vault.transaction(
            &importer,
            json!({"resourceType": "Bundle", "type": "collection", "entry": entries}),
            "import",
            false,
        )?;
        let mut lat = vec![];
        for w in done.iter().filter(|w| w.location.starts_with("Patient/")) {
            let pid = w.location.split('/').nth(1).unwrap_or_default().to_owned();
            let t = std::time::Instant::now();
            vault.replay_shred_ledger(&c, &[(pid, 0)])?;
            lat.push(t.elapsed());
        }
        rows.push(medvault_bench::latency_row(
            patients,
            &format!("shred, {records} rec"),
            &mut lat,
        ));
        let t = std::time::Instant::now();
        let cleaned = vault.remove_shredded(&c)?;
        let mut per =
            vec![t.elapsed() / u32::try_from(cleaned.max(1)).unwrap_or(1); cleaned.max(1)];
        rows.push(medvault_bench::latency_row(
            patients,
            &format!("rm rows, {records} rec"),
            &mut per,
        ));
    }
    Ok(rows)
}

/// The web console's way to the repository: the server's operator capability, after the
/// gate decided and recorded the administrator's request (`Vault::authorize_backup`).
pub struct ConsoleBackups {
    pub dir: PathBuf,
    pub cfg: Config,
    pub vault: Arc<Vault>,
    pub caller: Caller,
}

impl ConsoleBackups {
    fn repo(&self) -> std::result::Result<Repo, String> {
        Repo::open(&repository(&self.dir, &self.cfg, None)).map_err(|e| e.to_string())
    }
}

impl medvault_web::lifecycle::BackupConsole for ConsoleBackups {
    fn list(&self) -> std::result::Result<Vec<medvault_web::lifecycle::SnapshotLine>, String> {
        let path = repository(&self.dir, &self.cfg, None);
        if !path.join("config.json").exists() {
            return Ok(vec![]);
        }
        let (snaps, _) = self.repo()?.snapshots().map_err(|e| e.to_string())?;
        Ok(snaps
            .iter()
            .rev()
            .map(|(_, m)| medvault_web::lifecycle::SnapshotLine {
                id: m.id.clone(),
                created: m.created.clone(),
                expires: m.expires.clone(),
                bytes: m.bytes(),
                audit_entries: m.stats.audit_entries,
            })
            .collect())
    }

    fn run(&self) -> std::result::Result<String, String> {
        let r = snapshot(&self.dir, &self.cfg, &self.vault, &self.caller, None, None)
            .map_err(|e| format!("{e:#}"))?;
        Ok(format!(
            "Snapshot {} taken: {} bytes, {} new chunks of {}.",
            r.snapshot, r.bytes, r.new_chunks, r.chunks
        ))
    }

    fn verify(&self, id: &str) -> std::result::Result<String, String> {
        let mut repo = self.repo()?;
        if !id.chars().all(|c| c.is_ascii_hexdigit()) || id.is_empty() {
            return Err("no such snapshot".into());
        }
        let m = repo
            .manifest(&repo.dir.join("snapshots").join(format!("{id}.json")))
            .map_err(|e| e.to_string())?;
        let key = repo
            .key_from_vault(&self.vault, &self.caller)
            .map_err(|e| e.to_string())?;
        let r = repo
            .verify(&m, Some(&key), &|_, _| {})
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "Snapshot {} is intact: {} chunks decrypted and checked, {} bytes.",
            r.snapshot, r.chunks, r.bytes
        ))
    }

    fn drill(&self) -> std::result::Result<String, String> {
        let mut repo = self.repo()?;
        drill(&mut repo, &self.vault, &self.caller, None)
            .map(|r| drill_line(&r))
            .map_err(|e| format!("{e:#}"))
    }

    fn last_drill(&self) -> Option<Vec<(String, String)>> {
        let d = self.vault.last_drill(&self.caller).ok()??;
        let s = |k: &str| {
            d.get(k)
                .map(|v| v.to_string().trim_matches('"').to_owned())
                .unwrap_or_default()
        };
        Some(vec![
            ("Snapshot".into(), s("snapshot")),
            ("Taken".into(), s("created")),
            (
                "Recovery time (RTO)".into(),
                format!(
                    "{:.2} s",
                    d.get("rto_seconds")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0)
                ),
            ),
            (
                "Age of newest data (RPO)".into(),
                format!("{} s", s("rpo_seconds")),
            ),
            (
                "Audit log".into(),
                format!("{} entries verified", s("audit_entries")),
            ),
            (
                "Records".into(),
                format!(
                    "{} versions verified against the log",
                    s("records_verified")
                ),
            ),
            (
                "Counts match the manifest".into(),
                s("counts_match_manifest"),
            ),
        ])
    }
}
