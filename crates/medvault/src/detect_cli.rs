//! `medvault detect`: the offline scan of another EHR's exported access log, the labelled
//! scenario generator, and scoring alerts against labels.

use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use medvault_core::detect::{scan, scenario, AlertLine, Directory, Thresholds};
use serde_json::json;

#[derive(Subcommand)]
pub enum DetectCommand {
    /// Scan an access log exported from another EHR: roster, patients and time-ordered
    /// events in, one alert per line out (the same detectors the live server runs).
    Scan {
        /// HR roster CSV: user,family,given,address,department,role,shift_start,shift_end,patient_id,hired
        #[arg(long)]
        roster: PathBuf,
        /// Patients, one JSON object a line (id, family, given, address, vip, employee_user,
        /// deceased_date, care_team, encounters).
        #[arg(long)]
        patients: PathBuf,
        /// Access events, one JSON object a line, in time order.
        #[arg(long)]
        events: PathBuf,
        /// Where to write the alerts (JSON lines); written whole or not at all.
        #[arg(long)]
        out: PathBuf,
        /// Also raise `token_new_address` (off by default: exported logs rarely tie a
        /// workstation's events to its sign-in).
        #[arg(long)]
        session_address: bool,
        /// Print the summary as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Write a labelled hospital scenario (roster.csv, patients.jsonl, events.jsonl and
    /// labels.jsonl) with the hard negatives and injected incidents of every type.
    Scenario {
        /// A directory to create (it must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Patients (a volume spike needs a department's worth of related charts).
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1000..=100_000))]
        patients: u64,
        /// Days of log (a dormant account needs more than 30 days of silence).
        #[arg(long, default_value_t = 35, value_parser = clap::value_parser!(i64).range(35..=366))]
        days: i64,
        /// Also inject stolen sessions (for `detect scan --session-address`).
        #[arg(long)]
        session_address: bool,
    },
    /// Write this server's own access stream as the scan's `events.jsonl` (what the live
    /// detectors read), from audit entry `--from`: to re-scan it offline with other
    /// settings, or hand it to another tool. Needs the privacy officer's policy.
    Events {
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Score alerts against a scenario's labels: precision and recall per type.
    Score {
        #[arg(long)]
        labels: PathBuf,
        #[arg(long)]
        alerts: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a file", path.display());
    }
    Ok(BufReader::with_capacity(1 << 20, f))
}

/// A reader's error naming the file as given.
fn named(path: &Path) -> impl Fn(medvault_core::detect::DetectError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}", e.in_file(&path.display().to_string()))
}

/// Writes `out` whole or not at all: into a temporary file beside it, renamed at the end.
fn write_whole(out: &Path, f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if out.is_dir() {
        bail!("{} is a directory; give a file name", out.display());
    }
    // Written by rename: a link, pipe or device there would be replaced, not written
    // through. Refuse them.
    if let Ok(m) = std::fs::symlink_metadata(out) {
        if !m.file_type().is_file() {
            bail!(
                "{} is not a regular file (a link, pipe or device); give a file name",
                out.display()
            );
        }
    }
    let mut tmp = tempfile::NamedTempFile::new_in(parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        f(&mut w)?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

fn bytes_bar(len: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} scanning [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(b)
}

pub fn run(data_dir: &Path, command: DetectCommand) -> Result<()> {
    match command {
        DetectCommand::Events { from, out } => {
            let (_cfg, vault, op) = crate::open(data_dir)?;
            let po = medvault_core::Caller::cli(&op, medvault_core::Role::PrivacyOfficer);
            let lines = vault.detection_events(&po, from)?;
            write_whole(&out, |w| {
                for l in &lines {
                    writeln!(w, "{l}")?;
                }
                Ok(())
            })?;
            println!("wrote {} events to {}", lines.len(), out.display());
            Ok(())
        }
        DetectCommand::Scan {
            roster,
            patients,
            events,
            out,
            session_address,
            json,
        } => {
            let mut dir = Directory::default();
            let staff = scan::read_roster(&mut dir, open(&roster)?).map_err(named(&roster))?;
            let pts = scan::read_patients(&mut dir, open(&patients)?).map_err(named(&patients))?;
            let ev = open(&events)?;
            let size = std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0);
            let bar = bytes_bar(size);
            let thresholds = Thresholds {
                session_address,
                ..Thresholds::default()
            };
            let started = std::time::Instant::now();
            let mut stats = scan::ScanStats::default();
            write_whole(&out, |w| {
                stats = scan::scan(&mut dir, thresholds, ev, w, &mut |n| {
                    if let Some(b) = &bar {
                        b.set_position(n);
                    }
                })
                .map_err(named(&events))?;
                Ok(())
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let secs = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    json!({"staff": staff, "patients": pts, "events": stats.events,
                        "alerts": stats.alerts, "out": out.display().to_string(), "seconds": secs})
                );
            } else {
                println!(
                    "scanned {} events ({} staff, {} patients) in {secs:.1} s: {} alerts written to {}",
                    stats.events,
                    staff,
                    pts,
                    stats.alerts,
                    out.display()
                );
            }
            Ok(())
        }
        DetectCommand::Scenario {
            out,
            seed,
            patients,
            days,
            session_address,
        } => {
            if out.exists()
                && std::fs::read_dir(&out)
                    .with_context(|| format!("{} is not a directory", out.display()))?
                    .next()
                    .is_some()
            {
                bail!("{} is not empty; give a new directory", out.display());
            }
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let size = scenario::Size {
                patients: usize::try_from(patients).unwrap_or(2000),
                days,
                session_hijack: session_address,
                ..scenario::Size::default()
            };
            let s = scenario::generate(seed, size);
            let labels: String = s
                .labels
                .iter()
                .map(|l| format!("{}\n", serde_json::to_string(l).unwrap_or_default()))
                .collect();
            for (name, text) in [
                ("roster.csv", s.roster_csv()),
                ("patients.jsonl", s.patients_jsonl()),
                ("events.jsonl", s.events_jsonl()),
                ("labels.jsonl", labels),
            ] {
                write_whole(&out.join(name), |w| Ok(w.write_all(text.as_bytes())?))?;
            }
            println!(
                "wrote {} staff, {} patients, {} events and {} labelled incidents to {}",
                s.roster.len(),
                s.patients.len(),
                s.events.len(),
                s.labels.len(),
                out.display()
            );
            Ok(())
        }
        DetectCommand::Score {
            labels,
            alerts,
            json,
        } => {
            let read_lines = |p: &Path| -> Result<Vec<String>> {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                Ok(text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect())
            };
            let mut ls = vec![];
            for (i, l) in read_lines(&labels)?.iter().enumerate() {
                ls.push(
                    serde_json::from_str::<scenario::Label>(l)
                        .with_context(|| format!("{} line {}", labels.display(), i + 1))?,
                );
            }
            let mut al = vec![];
            for (i, l) in read_lines(&alerts)?.iter().enumerate() {
                al.push(
                    serde_json::from_str::<AlertLine>(l)
                        .with_context(|| format!("{} line {}", alerts.display(), i + 1))?,
                );
            }
            let scores = scenario::score(&ls, &al);
            if json {
                let rows: serde_json::Map<String, serde_json::Value> = scores
                    .iter()
                    .map(|(k, t)| {
                        (
                            k.clone(),
                            json!({"tp": t.tp, "fp": t.fp, "fn": t.fn_,
                                "precision": t.precision(), "recall": t.recall()}),
                        )
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(rows));
            } else {
                println!(
                    "{:<22} {:>4} {:>4} {:>4} {:>9} {:>7}",
                    "type", "tp", "fp", "fn", "precision", "recall"
                );
                for (k, t) in &scores {
                    println!(
                        "{k:<22} {:>4} {:>4} {:>4} {:>9.3} {:>7.3}",
                        t.tp,
                        t.fp,
                        t.fn_,
                        t.precision(),
                        t.recall()
                    );
                }
            }
            Ok(())
        }
    }
}

/// Runs the live detection consumer on its own thread until `stop` fires: a step every
/// second (at once again while a backlog remains), each alert posted to the webhook.
pub fn spawn(
    vault: std::sync::Arc<medvault_core::Vault>,
    op: &medvault_core::LocalOperator,
    cfg: &crate::config::Detect,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>> {
    const STEP: u64 = 20_000;
    let caller = medvault_core::Caller::system(op, "detect");
    let mut live = medvault_core::LiveDetection::new(Thresholds::default(), cfg.responses()?);
    let hook = cfg.webhook_url.clone();
    Ok(std::thread::Builder::new()
        .name("medvault-detect".into())
        .spawn(move || loop {
            let busy = match vault.detect_step(&caller, &mut live, STEP) {
                Ok(r) => {
                    if !hook.is_empty() {
                        for a in &r.alerts {
                            notify(&hook, a);
                        }
                    }
                    r.entries == STEP
                }
                Err(medvault_core::VaultError::Unavailable(_)) => false,
                Err(e) => {
                    tracing::error!(error = ?e, "detection step failed; retrying");
                    false
                }
            };
            let wait = if busy { 0 } else { 1000 };
            match stop.recv_timeout(std::time::Duration::from_millis(wait)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        })?)
}

/// Posts one alert to the webhook (no patient: the alert names who and what, the console
/// shows whose chart).
fn notify(url: &str, a: &medvault_core::AlertView) {
    let body = json!({
        "id": a.id, "type": a.alert.kind, "user": a.alert.user, "source_ip": a.alert.source_ip,
        "time": a.alert.time, "score": a.alert.score, "evidence": a.alert.evidence,
        "status": a.status, "responses": a.responses,
    });
    let r = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .post(url)
        .send_json(body);
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not post a detection alert to detect.webhook_url");
    }
}
