//! The passphrase key provider (`keys.provider = "passphrase"`): the master key files are
//! sealed with Argon2id; `medvault serve` starts sealed — every request answers 503 — until
//! `medvault unseal` gives the passphrase from the server's own machine. Commands that open
//! the data directory read it from `MEDVAULT_PASSPHRASE` or `MEDVAULT_PASSPHRASE_FILE`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use medvault_core::{LocalOperator, MasterKeySource, Passphrase, Vault, VaultError, VaultOptions};

use crate::config::Config;

/// Shortest passphrase accepted, in characters (NIST SP 800-63B's floor for a memorized
/// secret chosen by a person, raised: this one guards every record).
const MIN_CHARS: usize = 12;

/// Reads a passphrase from a file (its first line).
pub fn read_passphrase(f: &Path) -> Result<Passphrase> {
    let text =
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
    let p = text.lines().next().unwrap_or("").to_owned();
    if p.chars().count() < MIN_CHARS {
        bail!(
            "the passphrase in {} is shorter than {MIN_CHARS} characters",
            f.display()
        );
    }
    Ok(Passphrase::new(p))
}

fn from_env() -> Result<Option<Passphrase>> {
    if let Ok(p) = std::env::var("MEDVAULT_PASSPHRASE") {
        return Ok(Some(Passphrase::new(p)));
    }
    match std::env::var("MEDVAULT_PASSPHRASE_FILE") {
        Ok(f) => Ok(Some(read_passphrase(Path::new(&f))?)),
        Err(_) => Ok(None),
    }
}

fn uses_passphrase(cfg: &Config) -> bool {
    cfg.keys.provider == "passphrase"
}

/// Whether `serve` starts sealed: the passphrase provider, and no passphrase in the
/// environment.
pub fn starts_sealed(cfg: &Config) -> bool {
    uses_passphrase(cfg)
        && std::env::var_os("MEDVAULT_PASSPHRASE").is_none()
        && std::env::var_os("MEDVAULT_PASSPHRASE_FILE").is_none()
}

/// Where the master key comes from for this data directory.
pub fn key_source(dir: &Path, cfg: &Config, given: Option<Passphrase>) -> Result<MasterKeySource> {
    let path = dir.join(&cfg.keys.master_key_file);
    match cfg.keys.provider.as_str() {
        "file" => Ok(MasterKeySource::File(path)),
        "passphrase" => {
            let p = match given {
                Some(p) => p,
                None => from_env()?.ok_or_else(|| {
                    anyhow!("the master key is sealed with a passphrase: set MEDVAULT_PASSPHRASE (or MEDVAULT_PASSPHRASE_FILE) for this command")
                })?,
            };
            Ok(MasterKeySource::Passphrase(path, p))
        }
        "pkcs11" => Ok(MasterKeySource::Pkcs11(hsm_config(cfg)?)),
        other => {
            bail!("keys.provider `{other}` is not available; use `file`, `passphrase` or `pkcs11`")
        }
    }
}

/// The HSM settings of `[keys]`, with the PIN from `MEDVAULT_PKCS11_PIN` or the PIN file.
pub fn hsm_config(cfg: &Config) -> Result<medvault_core::HsmConfig> {
    let pin = match std::env::var("MEDVAULT_PKCS11_PIN") {
        Ok(p) => p,
        Err(_) if !cfg.keys.pkcs11_pin_file.is_empty() => {
            let f = &cfg.keys.pkcs11_pin_file;
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the HSM PIN file {f}"))?
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        }
        Err(_) => {
            bail!("the HSM needs its user PIN: set keys.pkcs11_pin_file or MEDVAULT_PKCS11_PIN")
        }
    };
    Ok(medvault_core::HsmConfig {
        module: PathBuf::from(&cfg.keys.pkcs11_module),
        token: cfg.keys.pkcs11_token.clone(),
        pin: Passphrase::new(pin),
        key_label: cfg.keys.pkcs11_key_label.clone(),
    })
}

/// Serves sealed on `listen` until a right passphrase arrives; returns the socket (still
/// bound, already announced) and the opened gate.
pub fn serve_sealed(
    dir: &Path,
    cfg: &Config,
    listen: &str,
    options: VaultOptions,
) -> Result<(std::net::TcpListener, Vault, LocalOperator)> {
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let tls = medvault_server::load_tls_config(&dir.join(&cfg.tls.cert), &dir.join(&cfg.tls.key))?;
    let opened: Arc<Mutex<Option<(Vault, LocalOperator)>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(tokio::sync::Notify::new());
    let (d, c, slot, signal) = (dir.to_owned(), cfg.clone(), opened.clone(), done.clone());
    let unseal: medvault_server::Unseal = Arc::new(move |pass: &str| {
        let key = key_source(&d, &c, Some(Passphrase::new(pass.to_owned())))
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let storage = crate::storage(&d, &c).map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut guard = slot
            .lock()
            .map_err(|_| VaultError::Internal("unseal lock".into()))?;
        if guard.is_some() {
            return Ok(());
        }
        let (vault, op) = Vault::open(&storage, &key, Arc::new(crate::SystemClock), options)?;
        *guard = Some((vault, op));
        signal.notify_one();
        Ok(())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let serving = std_listener.try_clone()?;
    let stopped = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(serving)?;
        println!("listening on https://{addr}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tracing::warn!("sealed: every request answers 503 until an operator runs `medvault unseal` on this machine");
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = interrupted.clone();
        let stop = async move {
            tokio::select! {
                () = done.notified() => {}
                () = crate::shutdown_signal() => flag.store(true, std::sync::atomic::Ordering::SeqCst),
            }
        };
        medvault_server::serve(
            medvault_server::sealed_router(unseal),
            listener,
            tls,
            cfg.limits.to_server(),
            stop,
        )
        .await;
        Ok::<bool, anyhow::Error>(interrupted.load(std::sync::atomic::Ordering::SeqCst))
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if stopped {
        bail!("stopped while sealed");
    }
    let (vault, op) = opened
        .lock()
        .map_err(|_| anyhow!("unseal lock"))?
        .take()
        .ok_or_else(|| anyhow!("stopped while sealed"))?;
    Ok((std_listener, vault, op))
}

/// `medvault unseal`: sends the passphrase to the sealed server on this machine.
pub fn unseal(dir: &Path, url: Option<String>, passphrase_file: Option<PathBuf>) -> Result<()> {
    let cfg = Config::load(dir)?;
    let pass = match passphrase_file {
        Some(f) => read_passphrase(&f)?,
        None => from_env()?
            .ok_or_else(|| anyhow!("give --passphrase-file FILE or set MEDVAULT_PASSPHRASE"))?,
    };
    let base = url.unwrap_or_else(|| format!("https://{}", cfg.server.listen));
    let agent = crate::witness::agent(Some(&dir.join(&cfg.tls.cert)))?;
    let res = agent
        .post(&format!("{}/sys/unseal", base.trim_end_matches('/')))
        .send_json(serde_json::json!({"passphrase": pass.expose()}));
    match res {
        Ok(_) => {
            println!("unsealed: the server is serving");
            Ok(())
        }
        Err(ureq::Error::Status(401, _)) => bail!("the passphrase does not open the master key"),
        Err(ureq::Error::Status(404, _)) => bail!("the server at {base} is not sealed"),
        Err(ureq::Error::Status(429, _)) => {
            bail!("too many wrong passphrases: unsealing is locked for a minute")
        }
        Err(ureq::Error::Status(code, r)) => {
            bail!(
                "the server refused ({code}): {}",
                r.into_string().unwrap_or_default()
            )
        }
        Err(e) => bail!("cannot reach the server at {base}: {e}"),
    }
}
