//! `medvault charts …`: the paper chart registry from the command line — the scanner
//! workflow (`charts scan BARCODE`, with a custody act or without), registration, the
//! dashboard, badge-export imports. Each command signs in as a named person (a records
//! clerk: password and TOTP code) and acts through the gate like the HTTP API does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use medvault_core::governance::records::RecordClass;
use medvault_core::{CustodyAct, NewVolume, VaultError, VolumeView};

use crate::destroy::{as_person, SignIn};

#[derive(Subcommand, Debug)]
pub enum ChartsCommand {
    /// Look a volume up by its barcode (status, location, holder, due date, holds, flags),
    /// or record a custody act with one of the options.
    Scan {
        barcode: String,
        /// Check it out to this person.
        #[arg(long, conflicts_with_all = ["check_out_department", "return_from", "missing", "found"])]
        check_out_to: Option<String>,
        /// Check it out to this department.
        #[arg(long, conflicts_with_all = ["return_from", "missing", "found"])]
        check_out_department: Option<String>,
        /// Due back (YYYY-MM-DD, the end of that day at the site, or RFC 3339).
        #[arg(long)]
        due: Option<String>,
        /// Who took it from the room (default: the signed-in clerk).
        #[arg(long)]
        retrieved_by: Option<String>,
        /// Return it, handed back by this person (the holder).
        #[arg(long, conflicts_with_all = ["missing", "found"])]
        return_from: Option<String>,
        /// Declare it missing with this note (opens an incident).
        #[arg(long, conflicts_with = "found")]
        missing: Option<String>,
        /// A missing volume is found (note).
        #[arg(long)]
        found: Option<String>,
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Register a paper volume of a patient's chart in a room's cabinet.
    Register {
        #[arg(long)]
        barcode: String,
        #[arg(long)]
        patient: String,
        #[arg(long)]
        room: String,
        #[arg(long)]
        cabinet: String,
        #[arg(long, default_value_t = 1)]
        volume: u32,
        /// adult_chart, minor_chart, billing, imaging, documentation, audit_log
        /// (default: from the electronic chart).
        #[arg(long)]
        record_class: Option<String>,
        /// The last date written in the volume (YYYY-MM-DD).
        #[arg(long)]
        last_entry: Option<String>,
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Overdue and missing volumes, flagged retrievals and visitors.
    Dashboard {
        #[command(flatten)]
        who: SignIn,
        #[arg(long)]
        json: bool,
    },
    /// Import the door system's badge export (CSV: time,user,door,direction,granted).
    BadgeImport {
        file: PathBuf,
        #[command(flatten)]
        who: SignIn,
    },
}

fn print_volume(v: &VolumeView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
        return Ok(());
    }
    let vol = &v.volume;
    let place = match &vol.holder {
        Some(h) => format!(
            "checked out to {h}, due {}{}",
            vol.due.map(crate::destroy::when).unwrap_or_default(),
            if v.overdue { " — OVERDUE" } else { "" }
        ),
        None => format!(
            "{} ({}/{})",
            vol.status.as_str().replace('_', " "),
            vol.room,
            vol.cabinet
        ),
    };
    println!(
        "{} volume {} of patient {} [{}]: {place}",
        vol.barcode, vol.volume, vol.patient, vol.record_class
    );
    for h in &v.holds {
        println!("  LEGAL HOLD {} (matter {})", h.id, h.matter);
    }
    for f in &v.flags {
        println!("  flagged {}: {}", f.flag.kind, f.flag.evidence);
    }
    Ok(())
}

fn unknown(barcode: &str) -> impl FnOnce(VaultError) -> VaultError + '_ {
    move |e| match e {
        VaultError::NotFound => VaultError::BadRequest(format!(
            "unknown barcode {}: no volume is registered under it",
            barcode.chars().take(64).collect::<String>()
        )),
        e => e,
    }
}

/// Runs one `medvault charts` command.
pub fn run(dir: &Path, cmd: ChartsCommand) -> Result<()> {
    let (_cfg, vault, _op) = crate::open(dir)?;
    match cmd {
        ChartsCommand::Scan {
            barcode,
            check_out_to,
            check_out_department,
            due,
            retrieved_by,
            return_from,
            missing,
            found,
            who,
            json,
        } => {
            let act = if check_out_to.is_some() || check_out_department.is_some() {
                let Some(due) = due else {
                    bail!("a check-out needs --due (YYYY-MM-DD or RFC 3339)");
                };
                Some(CustodyAct::CheckOut {
                    to: check_out_to,
                    department: check_out_department,
                    due,
                    retrieved_by,
                })
            } else if let Some(r) = return_from {
                Some(CustodyAct::Return { returned_by: r })
            } else if let Some(note) = missing {
                Some(CustodyAct::Missing { note })
            } else {
                found.map(|note| CustodyAct::Found { note })
            };
            let v = as_person(&vault, &who, |c| {
                match act {
                    Some(a) => vault.volume_custody(c, &barcode, a),
                    None => vault.scan_volume(c, &barcode),
                }
                .map_err(unknown(&barcode))
            })?;
            print_volume(&v, json)
        }
        ChartsCommand::Register {
            barcode,
            patient,
            room,
            cabinet,
            volume,
            record_class,
            last_entry,
            who,
            json,
        } => {
            let record_class = record_class
                .map(|c| c.parse::<RecordClass>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = NewVolume {
                barcode,
                patient,
                volume,
                record_class,
                room,
                cabinet,
                last_entry,
            };
            let v = as_person(&vault, &who, |c| vault.register_volume(c, n))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("registered {} in {}/{}", v.barcode, v.room, v.cabinet);
            }
            Ok(())
        }
        ChartsCommand::Dashboard { who, json } => {
            let d = as_person(&vault, &who, |c| vault.records_dashboard(c))?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
                return Ok(());
            }
            println!(
                "{} in storage, {} checked out, {} overdue, {} missing, {} flags, {} visitors in",
                d.in_storage,
                d.checked_out,
                d.overdue.len(),
                d.missing.len(),
                d.flags.len(),
                d.visitors.len()
            );
            for v in &d.overdue {
                println!(
                    "OVERDUE {} with {} since {}",
                    v.barcode,
                    v.holder
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    v.due.map(crate::destroy::when).unwrap_or_default()
                );
            }
            for v in &d.missing {
                println!("MISSING {} (patient {})", v.barcode, v.patient);
            }
            for f in &d.flags {
                println!(
                    "FLAG {} {}: {}",
                    f.flag.kind, f.flag.target, f.flag.evidence
                );
            }
            Ok(())
        }
        ChartsCommand::BadgeImport { file, who } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let n = as_person(&vault, &who, |c| vault.import_badge_events(c, &csv))?;
            println!("imported {n} badge events");
            Ok(())
        }
    }
}
