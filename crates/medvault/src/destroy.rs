//! `medvault destroy …` and `medvault hold …`: two-person destruction and legal holds from
//! the command line. Each command signs in as a named person (password and a TOTP code,
//! which also counts as the step-up), acts through the gate like the HTTP API does, and
//! signs out; the local-operator capability never decides a destruction.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use medvault_core::{Caller, Factor, Vault};

/// Who signs in for one command.
#[derive(Args, Debug)]
pub struct SignIn {
    /// The account acting (a privacy officer, or a security administrator for holds).
    #[arg(long)]
    user: String,
    /// A file holding the account's password (else `MEDVAULT_PASSWORD`).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// The account's current TOTP code (else `MEDVAULT_TOTP`).
    #[arg(long, env = "MEDVAULT_TOTP", hide_env_values = true)]
    totp: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DestroyCommand {
    /// Ask for a chart's destruction (a second privacy officer must approve).
    Request {
        patient: String,
        /// retention-period-ended, erasure-request, duplicate-record or court-order.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending request: the chart is crypto-shredded; prints the certificate.
    Approve {
        id: String,
        #[command(flatten)]
        who: SignIn,
        /// Also write the certificate to this file (0600).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Withdraw a pending request.
    Cancel {
        id: String,
        #[command(flatten)]
        who: SignIn,
    },
    /// List every request.
    List {
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Print the signed certificate of a completed destruction.
    Certificate {
        id: String,
        #[command(flatten)]
        who: SignIn,
    },
    /// Print the certificates' verifier key (C2SP note verifier key; public, so no
    /// sign-in is needed).
    Key,
    /// Print the shred ledger (every chart destroyed, with the audit entry recording it),
    /// signed with the destruction key, for `backup restore --ledger` (no PHI).
    Ledger {
        #[arg(long)]
        json: bool,
    },
    /// Verify a certificate offline against the verifier key; exit 1 if it does not verify.
    Verify {
        certificate: PathBuf,
        /// The verifier key, or a file holding it.
        #[arg(long)]
        key: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum HoldCommand {
    /// Place a legal hold on a chart (blocks its destruction until released).
    Set {
        patient: String,
        /// The matter reference (case or docket number).
        #[arg(long)]
        matter: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Release a hold.
    Release {
        id: String,
        #[command(flatten)]
        who: SignIn,
    },
    /// List holds (of one chart with --patient).
    List {
        #[arg(long)]
        patient: Option<String>,
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
}

/// Signs `who` in (password, then TOTP) and runs `f` as them; always signs out.
pub(crate) fn as_person<T>(
    vault: &Vault,
    who: &SignIn,
    f: impl FnOnce(&Caller) -> Result<T, medvault_core::VaultError>,
) -> Result<T> {
    let password = match &who.password_file {
        Some(p) => crate::read_secret_file(p)?,
        None => medvault_core::Password::new(
            std::env::var("MEDVAULT_PASSWORD")
                .map_err(|_| anyhow!("give --password-file FILE or set MEDVAULT_PASSWORD"))?,
        ),
    };
    let code = who.totp.clone().ok_or_else(|| {
        anyhow!("give --totp CODE (or set MEDVAULT_TOTP): this act needs a second factor")
    })?;
    let anon = Caller::anonymous(Some("cli".into()), medvault_types_request_id());
    let ch = vault
        .login(&anon, &who.user, &password)
        .map_err(crate::describe)?;
    let grant = vault
        .login_factor(&anon, &ch.mfa_token, &Factor::Totp(code.trim()))
        .map_err(|e| match e {
            medvault_core::VaultError::Unauthenticated => anyhow!(
                "the TOTP code was not accepted: wrong, or already used (each code works once; wait for the next)"
            ),
            e => crate::describe(e),
        })?;
    let me = vault
        .authenticate(&anon, &grant.token, None)
        .map_err(crate::describe)?;
    let out = f(&me).map_err(crate::describe);
    let _ = vault.logout(&me, &grant.token);
    out
}

/// "not found" said of what was not found (`what`), as one line on the CLI.
fn named(what: String) -> impl FnOnce(medvault_core::VaultError) -> medvault_core::VaultError {
    move |e| match e {
        medvault_core::VaultError::NotFound => medvault_core::VaultError::BadRequest(what),
        e => e,
    }
}

fn medvault_types_request_id() -> String {
    format!("cli-{}", std::process::id())
}

pub(crate) fn when(secs: i64) -> String {
    medvault_core::fhir_instant_secs(secs)
}

/// Runs one `medvault destroy` command.
pub fn destroy(dir: &Path, cmd: DestroyCommand) -> Result<()> {
    if let DestroyCommand::Verify {
        certificate,
        key,
        json,
    } = cmd
    {
        return verify(&certificate, &key, json);
    }
    let (_cfg, vault, op) = crate::open(dir)?;
    match cmd {
        DestroyCommand::Ledger { json } => {
            let ledger = vault.shred_ledger().map_err(crate::describe)?;
            let note = vault.signed_shred_ledger().map_err(crate::describe)?;
            if json {
                println!("{}", serde_json::json!({"entries": ledger, "note": note}));
            } else {
                print!("{note}");
            }
        }
        DestroyCommand::Request {
            patient,
            reason,
            who,
            json,
        } => {
            let d = as_person(&vault, &who, |c| {
                vault
                    .request_destruction(c, &patient, &reason)
                    .map_err(named(format!(
                        "no patient {patient} (unknown, or its chart was already destroyed)"
                    )))
            })?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                println!(
                    "destruction {} requested for patient {} ({}); a second privacy officer approves it with: medvault destroy approve {}",
                    d.id, d.patient, d.reason, d.id
                );
            }
        }
        DestroyCommand::Approve { id, who, out } => {
            let cert = as_person(&vault, &who, |c| {
                vault.approve_destruction(c, &id).map_err(named(format!(
                    "no destruction request {id} (`medvault destroy list` shows them)"
                )))
            })?;
            if let Some(p) = out {
                crate::write_private(&p, cert.as_bytes())?;
            }
            print!("{cert}");
        }
        DestroyCommand::Cancel { id, who } => {
            as_person(&vault, &who, |c| {
                vault.cancel_destruction(c, &id).map_err(named(format!(
                    "no destruction request {id} (`medvault destroy list` shows them)"
                )))
            })?;
            println!("destruction {id} cancelled");
        }
        DestroyCommand::List { who, json } => {
            let list = as_person(&vault, &who, |c| vault.destructions(c))?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no destruction requests");
            } else {
                for d in list {
                    println!(
                        "{}  {:<10} patient {}  {}  requested {} by {}{}",
                        d.id,
                        d.status,
                        d.patient,
                        d.reason,
                        when(d.requested_at),
                        d.requested_by,
                        match (&d.decided_by, d.decided_at) {
                            (Some(b), Some(t)) => format!("; {} {} by {b}", d.status, when(t)),
                            _ => String::new(),
                        }
                    );
                }
            }
        }
        DestroyCommand::Certificate { id, who } => {
            print!(
                "{}",
                as_person(&vault, &who, |c| {
                    vault.destruction_certificate(c, &id).map_err(named(format!(
                        "no destruction request {id} (`medvault destroy list` shows them)"
                    )))
                })?
            );
        }
        DestroyCommand::Key => {
            println!("{}", vault.destruction_verifier_key_local(&op));
        }
        DestroyCommand::Verify { .. } => {}
    }
    Ok(())
}

fn verify(certificate: &Path, key: &str, json: bool) -> Result<()> {
    let note = std::fs::read_to_string(certificate)
        .with_context(|| format!("cannot read {}", certificate.display()))?;
    let key = match std::fs::read_to_string(key) {
        Ok(k) => k.trim().to_owned(),
        Err(_) => key.trim().to_owned(),
    };
    let cert = medvault_core::verify_certificate(&note, &key).map_err(crate::describe)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({"valid": true, "certificate": cert}))?
        );
    } else {
        println!(
            "valid: patient {} destroyed {} ({}), requested by {}, approved by {}; audit entry {} in checkpoint {} of {}",
            cert.patient,
            cert.destroyed_at,
            cert.reason,
            cert.requested_by,
            cert.approved_by,
            cert.audit_entry,
            cert.checkpoint.size,
            cert.checkpoint.origin
        );
    }
    Ok(())
}

/// Runs one `medvault hold` command.
pub fn hold(dir: &Path, cmd: HoldCommand) -> Result<()> {
    let (_cfg, vault, _op) = crate::open(dir)?;
    match cmd {
        HoldCommand::Set {
            patient,
            matter,
            reason,
            who,
            json,
        } => {
            let h = as_person(&vault, &who, |c| {
                vault
                    .set_legal_hold(c, &patient, &matter, &reason)
                    .map_err(named(format!("no patient {patient}")))
            })?;
            if json {
                println!("{}", serde_json::to_string(&h)?);
            } else {
                println!(
                    "legal hold {} placed on patient {} (matter {})",
                    h.id, h.patient, h.matter
                );
            }
        }
        HoldCommand::Release { id, who } => {
            as_person(&vault, &who, |c| {
                vault.release_legal_hold(c, &id).map_err(named(format!(
                    "no legal hold {id} (`medvault hold list` shows them)"
                )))
            })?;
            println!("legal hold {id} released");
        }
        HoldCommand::List { patient, who, json } => {
            let list = as_person(&vault, &who, |c| vault.legal_holds(c, patient.as_deref()))?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no legal holds");
            } else {
                for h in list {
                    println!(
                        "{}  {}  patient {}  matter {}  set {} by {}{}",
                        h.id,
                        if h.active { "active  " } else { "released" },
                        h.patient,
                        h.matter,
                        when(h.set_at),
                        h.set_by,
                        h.reason
                            .map(|r| format!("  reason: {r}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_id_is_named_not_just_not_found() {
        let e = named("no destruction request d-1".into())(medvault_core::VaultError::NotFound);
        assert_eq!(crate::describe(e).to_string(), "no destruction request d-1");
        // Other errors pass through unchanged.
        let e = named("x".into())(medvault_core::VaultError::Gone);
        assert!(matches!(e, medvault_core::VaultError::Gone));
    }
}
