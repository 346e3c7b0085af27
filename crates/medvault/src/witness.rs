//! `medvault audit witness`: fetch a medvault log's checkpoint, check it against the last one
//! this witness saw (consistency proof; a fork is reported loudly), cosign it (C2SP
//! tlog-cosignature) and post the cosignature back.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use medvault_audit::merkle::{verify_consistency, Hash};
use medvault_audit::note::{parse_checkpoint, NoteVerifier, Witness};
use rand::RngCore;

pub struct Args<'a> {
    pub log: &'a str,
    pub key: &'a str,
    pub state: &'a Path,
    pub token: &'a str,
    pub name: &'a str,
    pub ca_cert: Option<&'a Path>,
    pub now: u64,
}

/// Exit status for a fork or rollback: distinct from ordinary errors.
pub const FORK_EXIT: i32 = 3;

pub(crate) fn agent(ca: Option<&Path>) -> Result<ureq::Agent> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read {}", ca.display()))?
        {
            roots.add(c?)?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(ureq::AgentBuilder::new()
        .tls_config(Arc::new(cfg))
        .timeout(std::time::Duration::from_secs(30))
        .build())
}

fn witness_key(state: &Path, name: &str) -> Result<Witness> {
    let path = state.join("witness.key");
    if !path.exists() {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(hex(&k).as_bytes())?;
    }
    let text = std::fs::read_to_string(&path)?;
    let bytes: Vec<u8> = (0..text.trim().len() / 2)
        .filter_map(|i| {
            text.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let k: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow!("{} is not a witness key", path.display()))?;
    Ok(Witness::new(name, &k))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One witnessing round. Returns the cosigned size, or exits with [`FORK_EXIT`] on a fork.
pub fn run(a: &Args<'_>) -> Result<u64> {
    std::fs::create_dir_all(a.state)?;
    let http = agent(a.ca_cert)?;
    let base = a.log.trim_end_matches('/');
    let auth = format!("Bearer {}", a.token);
    let note = http
        .get(&format!("{base}/audit/checkpoint"))
        .set("Authorization", &auth)
        .call()?
        .into_string()?;
    let verifier = NoteVerifier::parse(a.key).map_err(|e| anyhow!("log key: {e}"))?;
    let text = verifier
        .verify(&note)
        .map_err(|e| anyhow!("checkpoint: {e}"))?
        .to_owned();
    let (_, size, root) = parse_checkpoint(&text)?;
    let seen_path = a.state.join("checkpoint");
    if let Ok(prev) = std::fs::read_to_string(&seen_path) {
        let (_, old_size, old_root) = parse_checkpoint(&prev)?;
        let fork = |why: String| -> ! {
            let evidence = a.state.join(format!("fork-evidence-{}", a.now));
            let _ = std::fs::write(
                &evidence,
                format!("previously seen:\n{prev}\nnow presented:\n{note}"),
            );
            eprintln!(
                "FORK DETECTED: {why}; evidence saved in {}",
                evidence.display()
            );
            std::process::exit(FORK_EXIT);
        };
        if size < old_size {
            fork(format!(
                "the log presents {size} entries after this witness saw {old_size}"
            ));
        }
        if size == old_size && root != old_root {
            fork(format!("two different trees of size {size}"));
        }
        if size > old_size {
            let proof: serde_json::Value = http
                .get(&format!(
                    "{base}/api/audit/proof/consistency?old={old_size}&new={size}"
                ))
                .set("Authorization", &auth)
                .call()?
                .into_json()?;
            let hashes: Vec<Hash> = proof
                .get("proof")
                .ok_or_else(|| anyhow!("malformed consistency proof"))?
                .as_array()
                .ok_or_else(|| anyhow!("malformed consistency proof"))?
                .iter()
                .filter_map(|h| {
                    h.as_str()
                        .and_then(|s| B64.decode(s).ok())
                        .and_then(|b| Hash::try_from(b.as_slice()).ok())
                })
                .collect();
            if !verify_consistency(old_size, size, &old_root, &root, &hashes) {
                fork(format!("the tree of size {size} is not an extension of the tree of size {old_size} this witness saw"));
            }
        }
    }
    let w = witness_key(a.state, a.name)?;
    let cosigned = format!("{note}{}", w.cosign(&text, a.now));
    let resp = http
        .post(&format!("{base}/audit/cosignature"))
        .set("Authorization", &auth)
        .set("Content-Type", "text/plain; charset=utf-8")
        .send_string(&cosigned);
    if let Err(e) = resp {
        bail!("posting the cosignature: {e}");
    }
    std::fs::write(&seen_path, &text)?;
    std::fs::write(
        a.state.join("witness.vkey"),
        format!("{}\n", w.verifier_key()),
    )?;
    Ok(size)
}
