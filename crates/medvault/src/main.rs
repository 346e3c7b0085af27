//! medvault — the binary: command line for init, serve, demo, user administration,
//! import and the benchmark. The one real clock lives here.
#![forbid(unsafe_code)]

mod backup_cli;
mod charts_cli;
mod config;
mod demo;
mod destroy;
mod detect_cli;
mod http_bench;
mod seal;
mod supply_chain;
mod witness;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use config::Config;
use medvault_core::{
    Caller, Clock, LocalOperator, MasterKeySource, Password, Role, SessionPolicy, Storage, Vault,
    VaultError, VaultOptions,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The system clock: the only place medvault reads the wall clock.
/// mimalloc: per-thread free lists suit a server allocating per request on many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct SystemClock;

impl Clock for SystemClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the one real clock, wired in the binary"
    )]
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

#[derive(Parser)]
#[command(
    name = "medvault",
    version,
    about = "Secure electronic medical records server"
)]
struct Cli {
    /// Data directory.
    #[arg(
        long,
        global = true,
        env = "MEDVAULT_DATA_DIR",
        default_value = "./medvault-data"
    )]
    data_dir: PathBuf,
    /// Log line format on stderr: `text` (default) or `json` (one JSON object per line,
    /// for a log collector).
    #[arg(
        long,
        global = true,
        env = "MEDVAULT_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Lines the log keeps waiting for a slow stderr before it drops new ones (and counts
/// them): requests never wait for the log (a full pipe nobody reads used to stop the
/// whole server).
const LOG_BUFFER_LINES: usize = 65_536;

/// How many log lines were dropped because stderr was not read fast enough (reported by
/// the server's housekeeping thread, so a gap in the log is never silent).
static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: config, master key, TLS certificate, database, first administrator.
    Init {
        #[arg(long, default_value = "admin")]
        admin_user: String,
        #[arg(long)]
        admin_password_file: Option<PathBuf>,
        /// Use PostgreSQL at this URL instead of the embedded SQLite database.
        #[arg(long, env = "MEDVAULT_INIT_POSTGRES")]
        postgres: Option<String>,
        /// Allow a PostgreSQL server on another host without TLS (written as
        /// `storage.allow_plaintext_postgres`; only for a network protected otherwise).
        #[arg(long, requires = "postgres")]
        allow_plaintext_postgres: bool,
        /// Seal the master key under a passphrase read from this file (Argon2id): the server
        /// then starts sealed until `medvault unseal`.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Keep the master key inside an HSM: its PKCS#11 module (e.g.
        /// /usr/lib/softhsm/libsofthsm2.so); with --pkcs11-token and --pkcs11-pin-file.
        #[arg(long)]
        pkcs11_module: Option<String>,
        /// The HSM token's label.
        #[arg(long)]
        pkcs11_token: Option<String>,
        /// A file holding the token's user PIN (kept where it is; not copied).
        #[arg(long)]
        pkcs11_pin_file: Option<PathBuf>,
        /// The master key object's label in the token.
        #[arg(long, default_value = "medvault-master")]
        pkcs11_key_label: String,
        #[arg(long)]
        json: bool,
    },
    /// Give a sealed server its master key passphrase (from --passphrase-file or
    /// MEDVAULT_PASSPHRASE); it then opens and serves.
    Unseal {
        /// The server's URL (default: https:// and `server.listen`).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Serve HTTPS (TLS 1.3).
    Serve {
        #[arg(long, env = "MEDVAULT_LISTEN")]
        listen: Option<String>,
        /// Emergency-mode operation on a restored copy while the primary is down: serve
        /// reads (audited into this copy's own log), refuse every change.
        #[arg(long, env = "MEDVAULT_SERVE_READ_ONLY")]
        read_only: bool,
    },
    /// Initialize (if needed), load synthetic patients and staff, and serve.
    Demo {
        #[arg(long, default_value_t = 200)]
        patients: usize,
        #[arg(long, env = "MEDVAULT_LISTEN")]
        listen: Option<String>,
        #[arg(long, default_value_t = 20_261_124)]
        seed: u64,
        /// Print the logins and the server's URL as one JSON line (for scripts) instead of
        /// the table.
        #[arg(long)]
        json: bool,
    },
    /// Staff user administration.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Service clients (OAuth2 client credentials, SMART Backend Services).
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Access policies: test a table of cases against the policies in force (or a proposal).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Import a FHIR Bundle (transaction or collection) through the secure path, all-or-nothing.
    Import {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run the standard benchmark: secure path vs plain store.
    Bench {
        /// Largest patient count (the table runs at 1 and at this many); default 100000,
        /// or 1000 with --http.
        #[arg(long)]
        patients: Option<usize>,
        /// Drive the real server over TLS instead: `medvault serve` on a temporary data
        /// directory, read/search/$everything/write/metadata beside a static file.
        #[arg(long)]
        http: bool,
        /// With --http: concurrent keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// With --http: seconds each row is measured.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// With --http: the paced read row's rate (requests per second).
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// With --http: only these rows (comma-separated), beside the static file.
        #[arg(long, value_delimiter = ',')]
        rows: Vec<String>,
        /// With --http: serve with this medvault binary instead of this one (to compare
        /// two builds on the same data).
        #[arg(long)]
        server_exe: Option<PathBuf>,
        #[arg(long, default_value_t = 20_000)]
        ops: usize,
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Entries in the audit log built for the verify and proof rows (the issue's
        /// target is measured with 10000000).
        #[arg(long, default_value_t = 1_000_000)]
        audit_log: u64,
        /// `sqlite` (temporary files) or `postgres` (temporary databases via --postgres).
        #[arg(long, default_value = "sqlite")]
        backend: String,
        /// A PostgreSQL URL whose user may create databases (for --backend postgres).
        #[arg(long, env = "MEDVAULT_BENCH_PG_URL")]
        postgres: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Encrypted, signed, content-addressed backups: create, list, verify, restore, drill.
    Backup {
        #[command(subcommand)]
        command: backup_cli::BackupCommand,
    },
    /// This installation at a glance: version and build age, the TLS certificate's expiry,
    /// and the dependency advisory check (RustSec) of this build.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// This build's software bill of materials (CycloneDX 1.5 JSON) on stdout.
    Sbom,
    /// The server's TLS certificate.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Master key versions and rotation.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Destroy a patient's chart (two privacy officers; crypto-shredding; signed certificate).
    Destroy {
        #[command(subcommand)]
        command: destroy::DestroyCommand,
    },
    /// Legal holds (block destruction while a matter is open).
    Hold {
        #[command(subcommand)]
        command: destroy::HoldCommand,
    },
    /// The paper chart registry: scan a barcode (look up, check out, return, missing),
    /// register volumes, the dashboard, badge-export imports.
    Charts {
        #[command(subcommand)]
        command: charts_cli::ChartsCommand,
    },
    /// Retention schedules: how long a record is kept and when it may be destroyed.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Staff profiles for the detectors (department, shift, home address, own chart),
    /// from an HR roster.
    Staff {
        #[command(subcommand)]
        command: StaffCommand,
    },
    /// Privacy monitoring and intrusion detection: scan another EHR's exported access log,
    /// generate a labelled scenario, score alerts.
    Detect {
        #[command(subcommand)]
        command: detect_cli::DetectCommand,
    },
    /// The accounting of disclosures (45 CFR 164.528): record a patient's request and its
    /// clock.
    Disclosures {
        #[command(subcommand)]
        command: DisclosuresCommand,
    },
    /// The Security Rule self-assessment with live evidence (as the local operator).
    Compliance {
        #[command(subcommand)]
        command: ComplianceCommand,
    },
    /// Breach assessment (45 CFR 164.402–414, GDPR Art. 33/34): decide from the facts
    /// whether an event is a notifiable breach and by when each party must be told.
    Breach {
        #[command(subcommand)]
        command: BreachCommand,
    },
    /// Print the current code for a TOTP secret (base32), as an authenticator app would.
    TotpCode { secret: String },
}

#[derive(Subcommand)]
enum DisclosuresCommand {
    /// Record a request for an accounting of disclosures received on `--requested`
    /// (YYYY-MM-DD) → {"covers_from", "respond_by", "extension_once_days", "excludes"}.
    Request {
        #[arg(long)]
        patient: String,
        #[arg(long)]
        requested: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ComplianceCommand {
    /// The safeguards report: each safeguard, its live evidence or attestation, findings,
    /// risks and the review cadence.
    Safeguards {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BreachCommand {
    /// Decide one set of facts (`--facts FILE`, or `-` for standard input: {"discovered", "affected": {STATE: count},
    /// "affected_eu_subjects", "jurisdiction", "phi_encrypted_at_rest", "key_compromised",
    /// "exception", "further_disclosed", "cause", "recipient_is_covered_entity",
    /// "phi_viewed", "returned_or_destroyed_attested", "law_enforcement_delay": {"kind",
    /// "requested", "until"}, "high_risk", "risk", "ba_discovered"}) → {"breach", "reason",
    /// "individuals_by", "hhs", "hhs_by", "media", "media_by",
    /// "notification_delayed_until_at_most", "supervisory_authority",
    /// "supervisory_authority_by", "data_subjects", "ba_must_notify_covered_entity_by"}.
    Assess {
        #[arg(long)]
        facts: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Decide one case (`--case FILE`: {"as_of", "born", "last_encounter", "record_class",
    /// "legal_hold", "policy": {"adult_years_after_last_encounter", "minor_until_age"},
    /// "policy_document_created", "last_effective"}) → {"destroy_eligible",
    /// "destroy_eligible_from", "retain_until", "rule"}. Without `--case`: the due list of
    /// every electronic chart and paper volume in the store, soonest first, with the rule
    /// that decided and the holds that stop it (read as the local operator, audited).
    Evaluate {
        #[arg(long)]
        case: Option<PathBuf>,
        /// The jurisdiction whose schedules apply (default: the site's).
        #[arg(long, conflicts_with = "case")]
        jurisdiction: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StaffCommand {
    /// Import an HR roster CSV (user,family,given,address,department,role,shift_start,
    /// shift_end,patient_id,hired): each listed user's profile is replaced, sealed.
    Import {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the staff profiles (as a security administrator would see them).
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Replaces the self-signed certificate medvault generated with a new one (new key,
    /// valid 397 days); a running server serves it within seconds, without a restart. A
    /// certificate from a CA is renewed with that CA instead: replace the files and the
    /// server reloads them.
    Renew {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Master key versions, the data keys each wraps, and a rotation's progress.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Re-wrap every data key under a new master key version while the server keeps
    /// serving (records untouched); resumes a rotation that stopped.
    Rotate {
        /// Rotate this patient's data key instead: every stored version of the chart is
        /// re-encrypted under a new data key, in one transaction.
        #[arg(long, conflicts_with = "index")]
        patient: Option<String>,
        /// Rotate the blind-index key instead: every resource's search, care and privacy
        /// tokens are written again under a new root while searches go on, and the old
        /// root is deleted; resumes a rotation that stopped.
        #[arg(long)]
        index: bool,
        /// With --index: seconds to wait between phases, so every server follows each one
        /// (at least 5; default 10).
        #[arg(long, conflicts_with = "patient")]
        grace_secs: Option<u64>,
        /// Data keys re-wrapped (with --index: resources re-indexed) per transaction
        /// (default 500).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "patient")]
        batch: Option<u64>,
        /// Pause between batches, in milliseconds, to spare a busy server.
        #[arg(long, conflicts_with = "patient")]
        pause_ms: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Decide each case of FILE (a JSON array of {"user" or "role", "action", "resource",
    /// "purpose", "relationship", "expect"}) and print the deciding policy ids; exit 1 if
    /// any decision differs from what was expected.
    Test {
        file: PathBuf,
        /// Test this Cedar policy set (a proposal) instead of the one in force.
        #[arg(long)]
        policies: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a staff user; prints the password (generated unless given) and TOTP enrollment.
    Add {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// With `--role patient`: link the portal account to this patient's chart (the
        /// operator vouches for the identity, as the front desk does).
        #[arg(long)]
        patient: Option<String>,
        /// The identity-proofing evidence seen for `--patient`.
        #[arg(long, default_value = "in-person-known-patient")]
        evidence: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Register a client with SMART v2 system scopes (`system/Observation.rs system/Patient.rs`);
    /// prints its id and secret (shown once), or takes a public JWK for private_key_jwt.
    Add {
        name: String,
        #[arg(long)]
        scope: String,
        /// A public JWK (or a JWK Set with one key) for private_key_jwt instead of a secret.
        #[arg(long)]
        jwk: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List registered clients.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a client and every token it holds.
    Revoke { client_id: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute every leaf and the Merkle root; exit 1 naming the first bad entry.
    Verify {
        /// Also cross-check every stored record version against the digest its write
        /// committed to the log; name any deleted, rolled back, altered or added.
        #[arg(long)]
        records: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print an RFC 6962 inclusion proof for entry INDEX in the tree of the latest checkpoint.
    Prove {
        index: u64,
        /// Tree size (default: the latest checkpoint's).
        #[arg(long)]
        size: Option<u64>,
    },
    /// Witness a medvault log: check its checkpoint is consistent with the last one seen,
    /// cosign it and post the cosignature back. Exit 3 on a fork.
    Witness {
        /// The log's base URL, e.g. https://ehr.example:8443
        #[arg(long)]
        log: String,
        /// The log's verifier key (GET /audit/key).
        #[arg(long)]
        key: String,
        /// Directory for this witness's key and the last checkpoint it saw.
        #[arg(long)]
        state: PathBuf,
        /// Bearer token of a privacy officer or auditor account (a token may begin with `-`).
        #[arg(long, env = "MEDVAULT_WITNESS_TOKEN", allow_hyphen_values = true)]
        token: String,
        #[arg(long, default_value = "witness.medvault.local")]
        name: String,
        /// CA certificate to trust for the log's TLS (e.g. its self-signed cert).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
    },
    /// JSON lines for a SIEM; users, patients and addresses replaced by keyed HMACs.
    Export {
        /// Only entries at or after this time (e.g. 2026-11-01 or 2026-11-24T10:00).
        #[arg(long)]
        since: Option<String>,
        /// Print the HMAC pseudonym of a user name, patient id or address, and exit.
        #[arg(long)]
        lookup: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets are files and never printed).
    Show,
}

fn main() {
    // Everything this process creates — database, WAL, keys, certificates, backups, temp
    // files — is readable by its owner alone, whatever the caller's umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let filter = std::env::var("MEDVAULT_LOG").unwrap_or_else(|_| {
        if matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
            "info".into()
        } else {
            "warn".into()
        }
    });
    // Log lines are written by their own thread: a slow or stalled stderr never blocks a
    // request (lossy: beyond LOG_BUFFER_LINES waiting, new lines are dropped).
    let (writer, log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("medvault-log")
        .finish(std::io::stderr());
    let _ = LOG_DROPS.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(writer);
    match cli.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    let result = run(cli);
    // Flush what the log thread still holds before the process ends.
    drop(log_guard);
    if let Err(e) = result {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let dir = cli.data_dir;
    match cli.command {
        Command::Init {
            admin_user,
            admin_password_file,
            postgres,
            allow_plaintext_postgres,
            passphrase_file,
            pkcs11_module,
            pkcs11_token,
            pkcs11_pin_file,
            pkcs11_key_label,
            json,
        } => {
            let pw = admin_password_file
                .map(|f| read_secret_file(&f))
                .transpose()?;
            let provider = match (passphrase_file, pkcs11_module) {
                (Some(_), Some(_)) => {
                    bail!("choose one of --passphrase-file and --pkcs11-module")
                }
                (Some(f), None) => KeyProvider::Passphrase(seal::read_passphrase(&f)?),
                (None, Some(module)) => {
                    let pin_file = pkcs11_pin_file
                        .ok_or_else(|| anyhow!("--pkcs11-module needs --pkcs11-pin-file"))?;
                    let pin_file = std::path::absolute(&pin_file)?;
                    KeyProvider::Pkcs11 {
                        module,
                        token: pkcs11_token
                            .ok_or_else(|| anyhow!("--pkcs11-module needs --pkcs11-token"))?,
                        pin_file: pin_file.to_string_lossy().into_owned(),
                        key_label: pkcs11_key_label,
                    }
                }
                (None, None) => KeyProvider::File,
            };
            let postgres = postgres.map(|url| (url, allow_plaintext_postgres));
            let out = init(&dir, &admin_user, pw, postgres, provider)?;
            print_init(&out, json);
            Ok(())
        }
        Command::Serve { listen, read_only } => serve(&dir, listen, read_only),
        Command::Unseal {
            url,
            passphrase_file,
        } => seal::unseal(&dir, url, passphrase_file),
        Command::Demo {
            patients,
            listen,
            seed,
            json,
        } => demo(&dir, patients, seed, listen, json),
        Command::User {
            command:
                UserCommand::Add {
                    name,
                    role,
                    password_file,
                    patient,
                    evidence,
                    json,
                },
        } => {
            let role: Role = role.parse().map_err(|e| anyhow!("{e}"))?;
            if patient.is_some() && role != Role::Patient {
                bail!("--patient links a patient-portal account: use it with --role patient");
            }
            let pw = password_file.map(|f| read_secret_file(&f)).transpose()?;
            let (cfg, vault, op) = open(&dir)?;
            drop(cfg);
            // Checked before anything is created, so a bad chart leaves no account behind.
            if let Some(p) = &patient {
                vault
                    .check_portal_link(&op, p, &evidence)
                    .map_err(describe)?;
            }
            let u = vault
                .add_user(&Caller::cli(&op, Role::SecurityAdmin), &name, role, pw)
                .map_err(describe)?;
            if let Some(p) = &patient {
                vault
                    .link_portal(
                        &Caller::cli(&op, Role::FrontDesk),
                        p,
                        &name,
                        "self",
                        &evidence,
                    )
                    .map_err(describe)?;
            }
            if json {
                let mut v = json!({"username": u.username.as_str(), "role": u.role.as_str(), "password": u.password.expose(),
                    "totp_secret": u.totp_secret, "totp_uri": u.totp_uri, "recovery_codes": u.recovery_codes});
                if let (Some(p), Some(o)) = (&u.practitioner_id, v.as_object_mut()) {
                    o.insert("practitioner_id".into(), json!(p));
                }
                if let (Some(p), Some(o)) = (&patient, v.as_object_mut()) {
                    o.insert("patient".into(), json!(p));
                }
                println!("{v}");
            } else {
                println!("user:         {} ({})", u.username, u.role);
                println!("password:     {}", u.password.expose());
                println!("totp secret:  {}", u.totp_secret);
                println!("totp uri:     {}", u.totp_uri);
                println!("recovery codes (each works once, instead of a TOTP code):");
                for c in &u.recovery_codes {
                    println!("              {c}");
                }
                if let Some(p) = &u.practitioner_id {
                    println!("practitioner: Practitioner/{p}");
                }
                if let Some(p) = &patient {
                    println!("portal link:  Patient/{p} (self, {evidence})");
                }
                println!("(shown once; medvault stores only a hash of the password and a sealed TOTP seed)");
            }
            Ok(())
        }
        Command::Client { command } => client_command(&dir, command),
        Command::Policy { command } => policy_command(&dir, command),
        Command::Import { file, json } => {
            let meta = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if meta.len() > 1 << 30 {
                bail!("{} is larger than 1 GiB; split the Bundle", file.display());
            }
            let text =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
                anyhow!(
                    "{} is not valid JSON (line {}, column {})",
                    file.display(),
                    e.line(),
                    e.column()
                )
            })?;
            let (_, vault, op) = open(&dir)?;
            let results = vault
                .transaction(&Caller::cli(&op, Role::Importer), value, "import", false)
                .map_err(describe)?;
            if json {
                // Where each entry went, in the Bundle's order (`Type/id/_history/n`).
                let locations: Vec<&str> = results.iter().map(|r| r.location.as_str()).collect();
                println!(
                    "{}",
                    json!({"imported": results.len(), "locations": locations})
                );
            } else {
                println!(
                    "imported {} resources from {}",
                    results.len(),
                    file.display()
                );
            }
            Ok(())
        }
        Command::Bench {
            patients,
            http: true,
            connections,
            seconds,
            rate,
            rows,
            server_exe,
            backend,
            json,
            ..
        } => {
            if backend != "sqlite" {
                bail!("--http runs on SQLite only (the server's PostgreSQL path is measured in-process: medvault bench --backend postgres)");
            }
            let valid = (0.0..=3600.0).contains(&seconds) && seconds > 0.0 && rate > 0.0;
            if !valid || connections == 0 {
                bail!("--seconds must be in (0, 3600], --rate above 0, --connections at least 1");
            }
            http_bench::run(
                http_bench::HttpBenchOptions {
                    patients: patients.unwrap_or(1000),
                    connections,
                    seconds,
                    paced_rate: rate,
                },
                &rows.iter().map(|r| r.trim().to_owned()).collect::<Vec<_>>(),
                server_exe.as_deref(),
                json,
            )
        }
        Command::Bench {
            patients,
            ops,
            threads,
            audit_log,
            backend,
            postgres,
            json,
            ..
        } => {
            let backend = match (backend.as_str(), postgres) {
                ("sqlite", _) => medvault_bench::BenchBackend::Sqlite,
                ("postgres", Some(url)) => medvault_bench::BenchBackend::Postgres(url),
                ("postgres", None) => bail!(
                    "--backend postgres needs --postgres URL (a user that may create databases)"
                ),
                (other, _) => bail!("unknown backend `{other}` (sqlite, postgres)"),
            };
            bench(
                &backend,
                patients.unwrap_or(100_000),
                ops,
                threads,
                audit_log,
                json,
            )
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            let cfg = Config::load(&dir)?;
            print!("{}", cfg.to_toml()?);
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { records, json },
        } => {
            let (_, vault, op) = open(&dir)?;
            let bar = progress_bar(0, "verifying the audit log");
            let verdict = vault
                .verify_audit(&Caller::cli(&op, Role::Auditor), &|done, total| {
                    if let Some(b) = &bar {
                        b.set_length(total);
                        b.set_position(done);
                    }
                })
                .map_err(describe)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            match verdict {
                medvault_core::AuditVerdict::Intact {
                    size,
                    root,
                    checkpoints,
                } => {
                    let root: String = root.iter().map(|b| format!("{b:02x}")).collect();
                    let rv = if records {
                        Some(
                            vault
                                .verify_records(&Caller::cli(&op, Role::Auditor))
                                .map_err(describe)?,
                        )
                    } else {
                        None
                    };
                    if json {
                        println!(
                            "{}",
                            json!({"intact": rv.as_ref().is_none_or(|r| r.problems.is_empty()), "size": size, "root": root, "checkpoints": checkpoints, "records": rv})
                        );
                    } else {
                        println!("audit log intact: {size} entries, root {root}, {checkpoints} signed checkpoints verified");
                        if let Some(r) = &rv {
                            for p in &r.problems {
                                println!("RECORD {p}");
                            }
                            if r.problems.is_empty() {
                                println!(
                                    "records intact: {} versions match their audit records ({} written before records carried digests)",
                                    r.checked, r.unattested
                                );
                            }
                        }
                    }
                    match rv {
                        Some(r) if !r.problems.is_empty() => bail!(
                            "{} stored record versions disagree with the audit log; first: {}",
                            r.problems.len(),
                            r.problems.first().map(String::as_str).unwrap_or("")
                        ),
                        _ => Ok(()),
                    }
                }
                medvault_core::AuditVerdict::Broken { index, problem } => {
                    if json {
                        println!(
                            "{}",
                            json!({"intact": false, "index": index, "problem": problem})
                        );
                    }
                    bail!("audit log broken at entry {index}: {problem}")
                }
            }
        }
        Command::Audit {
            command: AuditCommand::Prove { index, size },
        } => {
            let (_, vault, op) = open(&dir)?;
            let size = match size {
                Some(s) => s,
                None => vault
                    .latest_checkpoint(&Caller::cli(&op, Role::Auditor))
                    .map_err(describe)?
                    .and_then(|n| n.lines().nth(1).and_then(|l| l.parse().ok()))
                    .ok_or_else(|| anyhow!("no signed checkpoint yet; pass --size"))?,
            };
            let p = vault
                .inclusion_proof(&Caller::cli(&op, Role::Auditor), index, size)
                .map_err(describe)?;
            println!("{}", serde_json::to_string_pretty(&p)?);
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Export { since, lookup },
        } => {
            let (_, vault, op) = open(&dir)?;
            let auditor = Caller::cli(&op, Role::Auditor);
            if let Some(v) = lookup {
                println!("{}", vault.pseudonym(&auditor, &v).map_err(describe)?);
                return Ok(());
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            vault
                .export_audit(&auditor, since.as_deref(), &mut out)
                .map_err(describe)?;
            match out.flush() {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Audit {
            command:
                AuditCommand::Witness {
                    log,
                    key,
                    state,
                    token,
                    name,
                    ca_cert,
                },
        } => {
            let now = u64::try_from(SystemClock.now().unix_timestamp()).unwrap_or(0);
            let args = witness::Args {
                log: &log,
                key: &key,
                state: &state,
                token: &token,
                name: &name,
                ca_cert: ca_cert.as_deref(),
                now,
            };
            let size = witness::run(&args)?;
            println!("cosigned checkpoint of {size} entries");
            Ok(())
        }
        Command::Tls {
            command: TlsCommand::Renew { json },
        } => tls_renew(&dir, json),
        Command::Status { json } => status(&dir, json),
        Command::Sbom => {
            let text = serde_json::to_string_pretty(&supply_chain::sbom()?)?;
            // A reader that stops early (`| head`) is not an error.
            match writeln!(std::io::stdout(), "{text}") {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Command::Keys { command } => keys(&dir, command),
        Command::Backup { command } => backup_cli::run(&dir, command),
        Command::Destroy { command } => destroy::destroy(&dir, command),
        Command::Hold { command } => destroy::hold(&dir, command),
        Command::Detect { command } => detect_cli::run(&dir, command),
        Command::Charts { command } => charts_cli::run(&dir, command),
        Command::Disclosures {
            command:
                DisclosuresCommand::Request {
                    patient,
                    requested,
                    json,
                },
        } => {
            let (_cfg, vault, op) = open(&dir)?;
            let r = match vault.request_accounting(
                &Caller::cli(&op, Role::PrivacyOfficer),
                &patient,
                &requested,
            ) {
                Err(medvault_core::VaultError::NotFound) => {
                    anyhow::bail!("no chart for patient `{patient}` in this data directory")
                }
                r => r.map_err(describe)?,
            };
            if json {
                println!(
                    "{}",
                    json!({"covers_from": r.clock.covers_from, "respond_by": r.clock.respond_by,
                        "extension_once_days": r.clock.extension_once_days,
                        "excludes": r.clock.excludes})
                );
            } else {
                println!(
                    "request {} recorded: covers disclosures from {}; respond by {} (one extension of {} days allowed)",
                    r.id, r.clock.covers_from, r.clock.respond_by, r.clock.extension_once_days
                );
            }
            Ok(())
        }
        Command::Compliance {
            command: ComplianceCommand::Safeguards { json },
        } => {
            let (cfg, vault, op) = open(&dir)?;
            vault.set_environment(medvault_core::Environment {
                tls: Some(TLS_SUMMARY.into()),
                certificate_not_after: medvault_server::certificate_not_after(
                    &dir.join(&cfg.tls.cert),
                ),
                supply_chain: supply_chain::evidence(&dir, &cfg.supply_chain.advisory_db),
            });
            let r = vault
                .safeguards(&Caller::cli(&op, Role::SecurityAdmin))
                .map_err(describe)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            for a in &r.assessed {
                println!(
                    "{:<13} {:<24} {} — {}",
                    a.status, a.safeguard.cfr, a.safeguard.title, a.evidence
                );
            }
            println!("next risk review due {}", r.next_review_due);
            Ok(())
        }
        Command::Breach {
            command: BreachCommand::Assess { facts, json },
        } => {
            use medvault_core::governance::breach;
            let text = if facts.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("cannot read the facts from standard input")?
            } else {
                std::fs::read_to_string(&facts)
                    .with_context(|| format!("cannot read {}", facts.display()))?
            };
            let d = breach::parse_facts(&text)
                .and_then(|f| breach::assess(&f, SystemClock.now()))
                .map_err(|e| anyhow::anyhow!("{}: {e}", facts.display()))?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
                return Ok(());
            }
            println!(
                "{}: {}",
                if d.breach {
                    "breach"
                } else {
                    "not a notifiable breach"
                },
                d.reason.explain()
            );
            if let Some(m) = d.media.as_ref().filter(|m| !m.is_empty()) {
                println!("media in: {}", m.join(", "));
            }
            if let Some(u) = &d.notification_delayed_until_at_most {
                println!("law-enforcement delay: notification held until at most {u}");
            }
            for (who, by) in d.deadlines() {
                println!("notify {who} by {by}");
            }
            Ok(())
        }
        Command::Retention {
            command:
                RetentionCommand::Evaluate {
                    case,
                    jurisdiction,
                    json,
                },
        } => {
            let Some(case) = case else {
                let (_cfg, vault, op) = open(&dir)?;
                let due = vault
                    .retention_due(
                        &Caller::cli(&op, Role::RecordsClerk),
                        jurisdiction.as_deref(),
                    )
                    .map_err(describe)?;
                if json {
                    println!("{}", serde_json::to_string(&json!({ "due": due }))?);
                    return Ok(());
                }
                for i in &due {
                    let what = match &i.barcode {
                        Some(b) => format!("paper volume {b} of {}", i.patient),
                        None => format!("chart {}", i.patient),
                    };
                    let when = match (&i.verdict.retain_until, i.verdict.destroy_eligible) {
                        (None, _) => "keep".to_owned(),
                        (Some(d), true) => format!("eligible since {d}"),
                        (Some(d), false) => format!("keep until {d}"),
                    };
                    println!("{what} [{}]: {when} ({})", i.record_class, i.verdict.rule);
                }
                return Ok(());
            };
            let text = std::fs::read_to_string(&case)
                .with_context(|| format!("cannot read {}", case.display()))?;
            let c: medvault_core::retention::Case = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", case.display()))?;
            let v = medvault_core::retention::evaluate(&c, SystemClock.now().date())
                .map_err(|e| anyhow::anyhow!("{}: {e}", case.display()))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                match (&v.retain_until, v.destroy_eligible) {
                    (None, _) => println!("keep: {}", v.rule),
                    (Some(d), true) => println!("may be destroyed since {d} ({})", v.rule),
                    (Some(d), false) => println!("keep until {d} ({})", v.rule),
                }
            }
            Ok(())
        }
        Command::Staff { command } => {
            let (_cfg, vault, op) = open(&dir)?;
            let admin = Caller::cli(&op, Role::SecurityAdmin);
            match command {
                StaffCommand::Import { file, json } => {
                    let csv = std::fs::read(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let n = vault.import_staff(&admin, &csv)?;
                    if json {
                        println!("{}", json!({ "imported": n }));
                    } else {
                        println!("imported {n} staff profiles from {}", file.display());
                    }
                }
                StaffCommand::List { json } => {
                    let list = vault.staff(&admin)?;
                    if json {
                        println!("{}", json!({ "staff": list }));
                    } else {
                        for e in list {
                            let shift = match (e.shift_start, e.shift_end) {
                                (Some(a), Some(b)) if a == b => "round the clock".into(),
                                (Some(a), Some(b)) => format!("{a:02}:00–{b:02}:00"),
                                _ => "-".into(),
                            };
                            println!("{:<20} {:<16} {:<12} {shift}", e.user, e.department, e.role);
                        }
                    }
                }
            }
            Ok(())
        }
        Command::TotpCode { secret } => {
            let code = medvault_core::totp_now(&secret, SystemClock.now().unix_timestamp())
                .ok_or_else(|| anyhow!("secret is not base32"))?;
            println!("{code}");
            Ok(())
        }
    }
}

/// Pauses the command line between batches of background work, as the operator asked.
#[expect(
    clippy::disallowed_methods,
    reason = "an operator-requested pause between batches, not a wait on a condition"
)]
fn throttle(d: std::time::Duration) {
    std::thread::sleep(d);
}

/// Takes `<data dir>/rotation.lock` exclusively for the life of the returned file
/// (flock(2)), or fails at once if another rotation holds it.
fn rotation_lock(dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("rotation.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    try_lock_exclusive(f, &p)?.ok_or_else(|| anyhow!("another `medvault keys rotate` is running on this data directory; let it finish (or stop it: a rotation resumes where it stopped)"))
}

/// Takes an exclusive flock(2) on `f` (a file or directory opened from `path`) without
/// waiting: the file back, holding the lock for its life, or `None` if another process
/// holds it.
pub(crate) fn try_lock_exclusive(f: std::fs::File, path: &Path) -> Result<Option<std::fs::File>> {
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(anyhow!("cannot lock {}: {e}", path.display())),
    }
}

fn keys(dir: &Path, command: KeysCommand) -> Result<()> {
    if let KeysCommand::Rotate {
        index: false,
        grace_secs: Some(_),
        ..
    } = &command
    {
        // clap counts a flag's default as present, so `requires = "index"` cannot say this.
        <Cli as clap::CommandFactory>::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--grace-secs applies only to `keys rotate --index`",
            )
            .exit();
    }
    // One rotation at a time per data directory: a second `keys rotate` started beside a
    // running one (or resuming it) waits for nothing and stops here.
    let (_, vault, op) = open(dir)?;
    let _rotation = match &command {
        KeysCommand::Rotate { .. } => Some(rotation_lock(dir)?),
        KeysCommand::Status { .. } => None,
    };
    let me = Caller::system(&op, "keys");
    match command {
        KeysCommand::Status { json } => {
            let st = vault.key_status(&me).map_err(describe)?;
            if json {
                println!("{}", serde_json::to_string(&st)?);
                return Ok(());
            }
            match st.rotating_to {
                Some(t) => println!(
                    "master key: version {} in force; rotation to version {t} under way, {} data keys to re-wrap (run `medvault keys rotate` to resume)",
                    st.current_version, st.remaining
                ),
                None => println!("master key: version {} in force", st.current_version),
            }
            let ix = &st.index;
            match (ix.phase, ix.rotating_to, ix.retiring) {
                ("stable", ..) => println!("blind-index key: generation {}", ix.generation),
                (phase, to, old) => println!(
                    "blind-index key: generation {} in use for lookups; a rotation is under way (phase: {phase}){}{} — run `medvault keys rotate --index` to resume it if it stopped",
                    ix.generation,
                    to.map(|t| format!(" to generation {t}")).unwrap_or_default(),
                    old.map(|o| format!(", removing generation {o}'s tokens")).unwrap_or_default()
                ),
            }
            for v in st.versions {
                println!(
                    "  v{:<3} {:<16} {:>8} data keys  {}{}",
                    v.version,
                    v.state,
                    v.data_keys,
                    v.file.as_deref().unwrap_or("(in memory)"),
                    if v.file_present { "" } else { " (file absent)" }
                );
            }
        }
        KeysCommand::Rotate {
            patient: Some(p),
            json,
            ..
        } => {
            let r = vault.rotate_patient_key(&me, &p).map_err(|e| match e {
                VaultError::NotFound => {
                    anyhow!("no chart with patient id {p} (or it has been destroyed)")
                }
                e => describe(e),
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "patient {}: data key version {} -> {}, {} stored versions re-encrypted",
                    r.patient, r.from_key_version, r.to_key_version, r.reencrypted
                );
            }
        }
        KeysCommand::Rotate {
            patient: None,
            index: true,
            grace_secs,
            batch,
            pause_ms,
            json,
        } => {
            let (grace_secs, pause_ms) = (grace_secs.unwrap_or(10), pause_ms.unwrap_or(0));
            let batch = usize::try_from(batch.unwrap_or(500)).unwrap_or(usize::MAX);
            let bar = progress_bar(0, "re-indexing (both keys)");
            let pass = std::sync::atomic::AtomicU8::new(1);
            let report = vault
                .rotate_index_key(
                    &me,
                    batch,
                    std::time::Duration::from_secs(grace_secs),
                    &|grace| {
                        if let Some(b) = &bar {
                            b.set_message("waiting for every server to follow");
                        } else if !json {
                            eprintln!("waiting {} s for every server to follow", grace.as_secs());
                        }
                        throttle(grace);
                    },
                    &|p, done, total| {
                        if let Some(b) = &bar {
                            if pass.swap(p, std::sync::atomic::Ordering::Relaxed) != p || done == 0
                            {
                                b.set_message(if p == 1 {
                                    "re-indexing (both keys)"
                                } else {
                                    "removing the old key's tokens"
                                });
                            }
                            b.set_length(total);
                            b.set_position(done);
                        }
                        if pause_ms > 0 {
                            throttle(std::time::Duration::from_millis(pause_ms));
                        }
                    },
                )
                .map_err(describe)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "blind-index key rotated{}: generation {} -> {}; {} resource re-indexings over its passes (both keys, then the new one alone); the old root is deleted",
                    if report.resumed { " (resumed)" } else { "" },
                    report.from_generation,
                    report.to_generation,
                    report.reindexed
                );
            }
        }
        KeysCommand::Rotate {
            patient: None,
            index: false,
            batch,
            pause_ms,
            json,
            ..
        } => {
            let pause_ms = pause_ms.unwrap_or(0);
            let batch = usize::try_from(batch.unwrap_or(500)).unwrap_or(usize::MAX);
            let bar = progress_bar(0, "re-wrapping data keys");
            let report = vault
                .rotate_master_key(&me, batch, &|done, total| {
                    if let Some(b) = &bar {
                        b.set_length(total);
                        b.set_position(done);
                    }
                    if pause_ms > 0 {
                        throttle(std::time::Duration::from_millis(pause_ms));
                    }
                })
                .map_err(describe)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            // The installation's backup repository is re-wrapped now, so the retired key
            // file can go without locking it out.
            let rewrapped = backup_cli::rewrap_repository(dir, &vault, &me)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "master key rotated{}: version {} -> {}, {} data keys re-wrapped",
                    if report.resumed { " (resumed)" } else { "" },
                    report.from_version,
                    report.to_version,
                    report.rewrapped
                );
                if let Some(r) = &rewrapped {
                    println!(
                        "backup repository {r}: its key is now wrapped by version {}",
                        report.to_version
                    );
                }
                for f in &report.retired_files {
                    println!("retired: no data key uses {f} any more; delete it once every backup sealed under it has expired, and once any other backup repository has taken a backup since (each re-wraps its key then)");
                }
            }
        }
    }
    Ok(())
}

/// One line for a gate error, with the first validation issue when there is one.
fn describe(e: VaultError) -> anyhow::Error {
    if let VaultError::Fhir(f) = &e {
        if let Some(i) = f.issues().first() {
            return anyhow!(
                "{}: {}{}",
                e,
                i.diagnostics,
                i.expression
                    .as_ref()
                    .map(|x| format!(" at {x}"))
                    .unwrap_or_default()
            );
        }
    }
    if let VaultError::Forbidden { withheld } = &e {
        if withheld.is_empty() {
            return anyhow!("access denied: your role may not do this");
        }
        let cats: Vec<&str> = withheld.iter().map(|c| c.as_str()).collect();
        return anyhow!("access denied ({})", cats.join(", "));
    }
    // The operator at the console sees the cause (HTTP clients never do).
    if let VaultError::Internal(cause) | VaultError::Unavailable(cause) = &e {
        return anyhow!("{e}: {cause}");
    }
    anyhow!("{e}")
}

fn read_secret_file(f: &Path) -> Result<Password> {
    let s = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
    Ok(Password::new(s.trim_end_matches(['\n', '\r']).to_owned()))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn options(cfg: &Config) -> VaultOptions {
    VaultOptions {
        break_glass_secs: cfg.access.break_glass_secs,
        session: SessionPolicy {
            idle_timeout_secs: cfg.session.idle_timeout_secs,
            absolute_timeout_secs: cfg.session.absolute_timeout_secs,
            mfa_challenge_secs: 300,
            step_up_secs: cfg.session.step_up_secs,
            dormant_after_days: cfg.session.dormant_after_days,
            passwordless: cfg.session.passwordless,
        },
        lockout: medvault_core::LockoutPolicy {
            max_failures: cfg.lockout.max_failures,
            account_max_failures: cfg.lockout.account_max_failures,
            source_max_failures: cfg.lockout.source_max_failures_per_minute,
            base_backoff_secs: cfg.lockout.base_backoff_secs,
            max_backoff_secs: cfg.lockout.max_backoff_secs,
            challenge_attempts: cfg.lockout.challenge_attempts,
            memory_secs: 86_400,
        },
        key_cache_capacity: cfg.keys.key_cache_capacity,
        public_transparency: cfg.audit.public_transparency,
        read_only: false,
        max_page_size: cfg.server.max_page_size.max(1),
        cursor_ttl_secs: cfg.server.cursor_ttl_secs,
    }
}

fn storage(dir: &Path, cfg: &Config) -> Result<Storage> {
    Ok(match cfg.storage.backend.as_str() {
        "postgres" => {
            let url = cfg.postgres_url(dir)?;
            config::postgres_transport(&url, cfg.storage.allow_plaintext_postgres)?;
            Storage::Postgres(url)
        }
        _ => Storage::Sqlite(dir.join(&cfg.storage.path)),
    })
}

/// Opens the gate over the configured store; `key` is where the master key comes from.
fn open_vault(dir: &Path, cfg: &Config, key: &MasterKeySource) -> Result<(Vault, LocalOperator)> {
    let storage = storage(dir, cfg)?;
    Vault::open(&storage, key, Arc::new(SystemClock), options(cfg)).map_err(|e| match storage {
        Storage::Postgres(_) if matches!(e, VaultError::Unavailable(_)) => {
            anyhow!("PostgreSQL: {}", describe(e))
        }
        _ => describe(e),
    })
}

/// Opens the data directory's gate: the configuration, the gate, and this process's
/// local-operator capability (what the command line acts through).
/// The file marking a directory `backup restore` is still building (removed just before it
/// is renamed into place): no command but the restore opens such a directory.
pub(crate) const RESTORE_MARKER: &str = "RESTORE-IN-PROGRESS";

/// Refuses a SQLite data directory whose database file is missing, rather than opening a
/// new, empty one beside its configuration and keys (a database deleted, or a directory
/// left by an interrupted restore). `init` and `restore` make the database; nothing else
/// does.
pub(crate) fn require_database(dir: &Path, cfg: &Config) -> Result<()> {
    if dir.join(RESTORE_MARKER).exists() {
        bail!(
            "{} is a restore in progress or interrupted (it holds {RESTORE_MARKER}), not a data directory: let `backup restore` finish, or run it again",
            dir.display()
        );
    }
    if cfg.storage.backend == "postgres" {
        return Ok(());
    }
    let db = dir.join(&cfg.storage.path);
    if !db.exists() {
        bail!(
            "{} has a configuration but no database ({} is missing): it is not a complete data directory (an interrupted `backup restore` leaves one; restore again into a new directory)",
            dir.display(),
            db.display()
        );
    }
    Ok(())
}

pub(crate) fn open(dir: &Path) -> Result<(Config, Arc<Vault>, LocalOperator)> {
    let cfg = Config::load(dir)?;
    require_database(dir, &cfg)?;
    open_with(dir, cfg)
}

/// [`open`] for `backup restore`, on the directory it is building.
fn open_restoring(dir: &Path) -> Result<(Config, Arc<Vault>, LocalOperator)> {
    open_with(dir, Config::load(dir)?)
}

fn open_with(dir: &Path, cfg: Config) -> Result<(Config, Arc<Vault>, LocalOperator)> {
    let key = seal::key_source(dir, &cfg, None)?;
    let (vault, operator) = open_vault(dir, &cfg, &key)?;
    Ok((cfg, Arc::new(vault), operator))
}

struct InitOutput {
    user: medvault_core::NewUserInfo,
    cert_sha256: String,
    /// The backup recovery key's private half, shown once.
    recovery_key: String,
}

/// Where `init` puts the new master key.
enum KeyProvider {
    File,
    Passphrase(medvault_core::Passphrase),
    Pkcs11 {
        module: String,
        token: String,
        pin_file: String,
        key_label: String,
    },
}

fn init(
    dir: &Path,
    admin: &str,
    password: Option<Password>,
    postgres: Option<(String, bool)>,
    provider: KeyProvider,
) -> Result<InitOutput> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} already exists and is not empty; refusing to overwrite it",
            dir.display()
        );
    }
    if let Some(p) = &password {
        medvault_core::check_password(p, Some(admin)).map_err(describe)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cfg = Config::default();
    if let Some((url, allow_plaintext)) = postgres {
        cfg.storage.backend = "postgres".into();
        cfg.storage.url = url;
        cfg.storage.allow_plaintext_postgres = allow_plaintext;
    }
    match &provider {
        KeyProvider::File => {}
        KeyProvider::Passphrase(_) => cfg.keys.provider = "passphrase".into(),
        KeyProvider::Pkcs11 {
            module,
            token,
            pin_file,
            key_label,
        } => {
            cfg.keys.provider = "pkcs11".into();
            cfg.keys.pkcs11_module = module.clone();
            cfg.keys.pkcs11_token = token.clone();
            cfg.keys.pkcs11_pin_file = pin_file.clone();
            cfg.keys.pkcs11_key_label = key_label.clone();
        }
    }
    let result = (|| -> Result<InitOutput> {
        let master = match provider {
            KeyProvider::Passphrase(p) => {
                MasterKeySource::NewPassphrase(dir.join(&cfg.keys.master_key_file), p)
            }
            KeyProvider::Pkcs11 { .. } => MasterKeySource::NewPkcs11(seal::hsm_config(&cfg)?),
            KeyProvider::File => MasterKeySource::NewFile(dir.join(&cfg.keys.master_key_file)),
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.join("tls"))?;
        let generated = self_signed_certificate()?;
        write_private(&dir.join(&cfg.tls.cert), generated.cert_pem.as_bytes())?;
        write_private(&dir.join(&cfg.tls.key), generated.key_pem.as_bytes())?;
        let cert_sha256 = generated.sha256;
        write_private(&dir.join(config::FILE), cfg.to_toml()?.as_bytes())?;
        let (vault, op) = open_vault(dir, &cfg, &master)?;
        let user = vault
            .add_user(
                &Caller::cli(&op, Role::SecurityAdmin),
                admin,
                Role::SecurityAdmin,
                password,
            )
            .map_err(describe)?;
        let recovery = backup_cli::new_recovery_key(dir, &cfg)?;
        Ok(InitOutput {
            user,
            cert_sha256,
            recovery_key: recovery.to_text().to_string(),
        })
    })();
    if result.is_err() {
        // Leave nothing half-made behind (law 8).
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn print_init(o: &InitOutput, json: bool) {
    if json {
        println!(
            "{}",
            json!({"admin_user": o.user.username.as_str(), "admin_password": o.user.password.expose(),
                "totp_secret": o.user.totp_secret, "totp_uri": o.user.totp_uri, "recovery_codes": o.user.recovery_codes,
                "tls_cert_sha256": o.cert_sha256, "recovery_key": o.recovery_key})
        );
    } else {
        println!("medvault initialized.");
        println!("security administrator: {}", o.user.username);
        println!("password:               {}", o.user.password.expose());
        println!("TOTP (add to an authenticator app): {}", o.user.totp_uri);
        println!("recovery codes (each works once instead of a TOTP code):");
        for c in &o.user.recovery_codes {
            println!("    {c}");
        }
        println!("TLS certificate SHA-256: {}", o.cert_sha256);
        println!("backup recovery key (keep it offline, away from the server; it restores backups if the master key is lost):");
        println!("    {}", o.recovery_key);
        println!("These secrets are shown once.");
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// Called once with the server's public base URL when it is listening (`demo --json`).
type Announce = Box<dyn FnOnce(&str) + Send>;

/// Where the server listens: an address to bind, or a socket already bound (and announced)
/// by the sealed server.
enum Listen {
    Address(String),
    Bound(std::net::TcpListener),
}

fn serve_vault(
    dir: &Path,
    cfg: &Config,
    vault: Arc<Vault>,
    op: LocalOperator,
    listen: Option<String>,
    announce: Option<Announce>,
) -> Result<()> {
    let listen = Listen::Address(listen.unwrap_or_else(|| cfg.server.listen.clone()));
    serve_vault_on(dir, cfg, vault, op, listen, announce)
}

fn serve_vault_on(
    dir: &Path,
    cfg: &Config,
    vault: Arc<Vault>,
    op: LocalOperator,
    listen: Listen,
    announce: Option<Announce>,
) -> Result<()> {
    // The certificate is re-read when its files change (`medvault tls renew`, or a
    // certificate replaced by the operator's own tooling): no restart.
    let reloader = medvault_server::CertificateReloader::new(
        &dir.join(&cfg.tls.cert),
        &dir.join(&cfg.tls.key),
    )?;
    let tls = medvault_server::tls_config(reloader.clone())?;
    warn_certificate_expiry(reloader.not_after());
    let checkpoint_vault = vault.clone();
    let mut trusted_proxies = vec![];
    for p in cfg
        .server
        .trusted_proxies
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        trusted_proxies.push(
            p.parse::<std::net::IpAddr>()
                .with_context(|| format!("server.trusted_proxies: `{p}` is not an IP address"))?,
        );
    }
    let configured_base = cfg.server.public_base_url.trim_end_matches('/').to_owned();
    if !configured_base.is_empty() && !configured_base.starts_with("https://") {
        anyhow::bail!("server.public_base_url must start with https://");
    }
    let max_body_bytes = cfg.server.max_body_bytes;
    let limits = cfg.limits.to_server();
    let idle_timeout_secs = cfg.session.idle_timeout_secs;
    let oidc_providers = oidc_providers(dir, cfg)?;
    // Sign a checkpoint of the audit log every second while it grows, and once at shutdown.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let signer_vault = checkpoint_vault.clone();
    let signer_reloader = reloader.clone();
    // The build's dependencies against the advisory database, at start (a finding is
    // logged as a warning and shown in the safeguards report).
    let supply = supply_chain::evidence(dir, &cfg.supply_chain.advisory_db);
    match supply.as_ref() {
        Some(sc) if sc.clean => tracing::info!("dependency advisories: {}", sc.text),
        Some(sc) => tracing::warn!("dependency advisories: {}", sc.text),
        None => {}
    }
    let signer_supply = supply.clone();
    // The server's own work acts through the local operator; handlers get only the gate.
    let checkpointer = Caller::system(&op, "checkpointer");
    // Accounts unused past `session.dormant_after_days` are disabled at start and hourly.
    let warden = Caller::system(&op, "dormant-accounts");
    // Staff whose assigned training lapsed past the grace period lose PHI access (and
    // regain it when current) at start and hourly, besides at each training change.
    let trainer = Caller::system(&op, "training");
    let signer = std::thread::Builder::new()
        .name("medvault-checkpoints".into())
        .spawn(move || {
            let mut tick: u32 = 0;
            let mut reported_drops: usize = 0;
            loop {
                if tick % 3600 == 0 {
                    match signer_vault.disable_dormant(&warden) {
                        Ok(names) if !names.is_empty() => {
                            tracing::info!(accounts = names.len(), "disabled dormant accounts")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = ?e, "could not disable dormant accounts"),
                    }
                    match signer_vault.training_sweep(&trainer) {
                        Ok(changed) if !changed.is_empty() => {
                            tracing::info!(accounts = changed.len(), "training standing changed")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = ?e, "could not sweep training standing"),
                    }
                }
                if tick % 60 == 0 {
                    // Bulk export files past their hour are deleted even if nobody asks.
                    signer_vault.sweep_exports();
                }
                if tick % 10 == 0 {
                    let dropped = LOG_DROPS.get().map_or(0, |c| c.dropped_lines());
                    if dropped > reported_drops {
                        tracing::warn!(
                            dropped = dropped - reported_drops,
                            "log lines were dropped: the log's reader (stderr) did not keep up"
                        );
                        reported_drops = dropped;
                    }
                }
                if tick % 5 == 0 {
                    match signer_reloader.reload_if_changed() {
                        Ok(true) => {
                            tracing::info!("TLS certificate reloaded from disk");
                            signer_vault.set_environment(medvault_core::Environment {
                                tls: Some(TLS_SUMMARY.into()),
                                certificate_not_after: signer_reloader.not_after(),
                                supply_chain: signer_supply.clone(),
                            });
                            warn_certificate_expiry(signer_reloader.not_after());
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "the changed TLS certificate was not loaded; the previous one is still served"),
                    }
                }
                if tick % 86_400 == 0 && tick > 0 {
                    warn_certificate_expiry(signer_reloader.not_after());
                }
                tick = tick.wrapping_add(1);
                let stopping = !matches!(
                    stop_rx.recv_timeout(std::time::Duration::from_secs(1)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
                if let Err(e) = signer_vault.checkpoint(&checkpointer) {
                    tracing::error!(error = ?e, "could not sign an audit checkpoint");
                }
                // A policy version another server approved comes into force here too.
                if let Err(e) = signer_vault.reload_policy() {
                    tracing::error!(error = ?e, "could not load the policy version in force");
                }
                if stopping {
                    break;
                }
            }
        })?;
    let console_backups: Arc<dyn medvault_web::lifecycle::BackupConsole> =
        Arc::new(backup_cli::ConsoleBackups {
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            vault: checkpoint_vault.clone(),
            caller: Caller::system(&op, "backup"),
        });
    let (detect_stop, detect_rx) = std::sync::mpsc::channel::<()>();
    let detection = match cfg.detect.enabled {
        true => Some(detect_cli::spawn(
            checkpoint_vault.clone(),
            &op,
            &cfg.detect,
            detect_rx,
        )?),
        false => None,
    };
    let (backup_stop, backup_rx) = std::sync::mpsc::channel::<()>();
    let backups = backup_cli::schedule(
        dir.to_owned(),
        cfg.clone(),
        checkpoint_vault.clone(),
        &op,
        backup_rx,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (listener, announced) = match listen {
            Listen::Address(a) => (
                tokio::net::TcpListener::bind(&a)
                    .await
                    .with_context(|| format!("cannot listen on {a}"))?,
                false,
            ),
            Listen::Bound(l) => (tokio::net::TcpListener::from_std(l)?, true),
        };
        let addr = listener.local_addr()?;
        let public_base_url = if configured_base.is_empty() {
            if addr.ip().is_unspecified() {
                tracing::warn!("listening on every address without server.public_base_url: links will name localhost; set it to the URL clients use");
                format!("https://localhost:{}", addr.port())
            } else {
                format!("https://{addr}")
            }
        } else {
            configured_base
        };
        if let Err(e) = vault.set_relying_party(&public_base_url) {
            tracing::warn!(error = %e, "passkeys are unavailable: set server.public_base_url to a DNS name");
        }
        vault.set_oidc_providers(oidc_providers);
        // Bulk Data files wait here, sealed under keys only this process holds.
        vault
            .set_export_spool(dir.join("exports"))
            .map_err(describe)?;
        vault.set_environment(medvault_core::Environment {
            tls: Some(TLS_SUMMARY.into()),
            certificate_not_after: reloader.not_after(),
            supply_chain: supply.clone(),
        });
        let console = medvault_web::router(
            vault.clone(),
            medvault_web::ConsoleOptions {
                idle_timeout_secs,
                public_base_url: public_base_url.clone(),
                backups: Some(medvault_web::BackupDoor(console_backups)),
            },
        );
        let app = medvault_server::router_with_console(
            medvault_server::AppState {
                vault,
                options: medvault_server::HttpOptions {
                    max_body_bytes,
                    public_base_url: public_base_url.clone(),
                    trusted_proxies,
                    limits: limits.clone(),
                },
            },
            Some(console),
        );
        if let Some(a) = announce {
            a(&public_base_url);
        }
        if !announced {
            println!("listening on https://{addr}");
            std::io::stdout().flush()?;
        }
        medvault_server::serve(app, listener, tls, limits, shutdown_signal()).await;
        Ok::<(), anyhow::Error>(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    let _ = detect_stop.send(());
    if let Some(d) = detection {
        let _ = d.join();
    }
    let _ = stop_tx.send(());
    let _ = signer.join();
    let _ = backup_stop.send(());
    if let Some(b) = backups {
        let _ = b.join();
    }
    Ok(())
}

fn policy_command(dir: &Path, command: PolicyCommand) -> Result<()> {
    let PolicyCommand::Test {
        file,
        policies,
        json,
    } = command;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let cases: Vec<medvault_core::PolicyCase> = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not a JSON array of policy cases (line {}, column {}): {e}",
            file.display(),
            e.line(),
            e.column()
        )
    })?;
    let proposal = match &policies {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let (_, vault, op) = open(dir)?;
    let results = vault
        .policy_test(&op, &cases, proposal.as_deref())
        .map_err(describe)?;
    let failed = results.iter().filter(|r| !r.passed).count();
    if json {
        println!("{}", json!({"cases": results, "failed": failed}));
    } else {
        for r in &results {
            println!(
                "{} {:<60} {} (expected {}) [{}]",
                if r.passed { "PASS" } else { "FAIL" },
                r.case,
                r.decided,
                r.expected,
                r.policies.join(", ")
            );
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} cases decided otherwise than expected",
            results.len()
        );
    }
    Ok(())
}

fn client_command(dir: &Path, command: ClientCommand) -> Result<()> {
    let (_, vault, op) = open(dir)?;
    let admin = Caller::cli(&op, Role::SecurityAdmin);
    match command {
        ClientCommand::Add {
            name,
            scope,
            jwk,
            json,
        } => {
            let key = match jwk {
                None => None,
                Some(f) => {
                    let text = std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|_| anyhow!("{} is not JSON (a JWK)", f.display()))?;
                    // A JWK Set with one key is accepted too.
                    Some(match v.get("keys").and_then(|k| k.as_array()) {
                        Some(keys) if keys.len() == 1 => keys.first().cloned().unwrap_or_default(),
                        Some(_) => bail!("{}: a JWK Set must hold exactly one key", f.display()),
                        None => v,
                    })
                }
            };
            let c = vault
                .add_client(&admin, &name, &scope, key)
                .map_err(describe)?;
            let secret = c.client_secret.as_ref().map(|s| s.expose().to_owned());
            if json {
                println!(
                    "{}",
                    json!({"client_id": c.client_id, "client_secret": secret, "scope": scope})
                );
            } else {
                println!("client id:     {}", c.client_id);
                match &secret {
                    Some(s) => println!(
                        "client secret: {s}\n(shown once; medvault stores only a MAC of it)"
                    ),
                    None => {
                        println!("authenticates with private_key_jwt (the registered public key)")
                    }
                }
                println!("token:         POST /auth/token grant_type=client_credentials (tokens last 5 minutes)");
            }
            Ok(())
        }
        ClientCommand::List { json } => {
            let list = vault.clients(&admin).map_err(describe)?;
            if json {
                println!("{}", json!(list));
            } else {
                for c in list {
                    println!(
                        "{}  {}  {}  {}",
                        c.client_id,
                        c.name,
                        c.auth,
                        c.scopes.join(" ")
                    );
                }
            }
            Ok(())
        }
        ClientCommand::Revoke { client_id } => {
            vault.revoke_client(&admin, &client_id).map_err(describe)?;
            println!("revoked {client_id}");
            Ok(())
        }
    }
}

/// The `[[oidc]]` providers, with their client secrets read from their files.
fn oidc_providers(dir: &Path, cfg: &Config) -> Result<Vec<medvault_core::OidcProvider>> {
    cfg.oidc
        .iter()
        .map(|o| {
            let secret = read_secret_file(&dir.join(&o.client_secret_file))
                .with_context(|| format!("oidc `{}`: client_secret_file", o.name))?;
            let mut roles = vec![];
            for (group, role) in &o.roles {
                let r: Role = role
                    .parse()
                    .map_err(|e| anyhow!("oidc `{}`: group `{group}`: {e}", o.name))?;
                if !r.is_staff() {
                    bail!("oidc `{}`: role `{role}` cannot be given to a user", o.name);
                }
                roles.push((group.clone(), r));
            }
            Ok(medvault_core::OidcProvider {
                name: o.name.clone(),
                issuer: o.issuer.trim_end_matches('/').to_owned(),
                client_id: o.client_id.clone(),
                client_secret: secret.expose().to_owned(),
                role_claim: o.role_claim.clone(),
                roles,
                mfa_amr: o.mfa_amr.clone(),
                username_claim: o.username_claim.clone(),
            })
        })
        .collect()
}

fn serve(dir: &Path, listen: Option<String>, read_only: bool) -> Result<()> {
    let cfg0 = Config::load(dir)?;
    require_database(dir, &cfg0)?;
    if seal::starts_sealed(&cfg0) {
        // Sealed: answer 503 until `medvault unseal` gives the passphrase, on the same socket.
        let listen = listen.unwrap_or_else(|| cfg0.server.listen.clone());
        let (listener, vault, op) = seal::serve_sealed(
            dir,
            &cfg0,
            &listen,
            VaultOptions {
                read_only,
                ..options(&cfg0)
            },
        )?;
        tracing::info!("unsealed");
        return serve_vault_on(
            dir,
            &cfg0,
            Arc::new(vault),
            op,
            Listen::Bound(listener),
            None,
        );
    }
    if !read_only {
        let (cfg, vault, op) = open(dir)?;
        return serve_vault(dir, &cfg, vault, op, listen, None);
    }
    let mut cfg = Config::load(dir)?;
    // A copy serving while the primary is down takes no backups of its own.
    cfg.backup.interval_secs = 0;
    let key = seal::key_source(dir, &cfg, None)?;
    let storage = storage(dir, &cfg)?;
    let (vault, op) = Vault::open(
        &storage,
        &key,
        Arc::new(SystemClock),
        VaultOptions {
            read_only: true,
            ..options(&cfg)
        },
    )
    .map_err(describe)?;
    tracing::warn!("EMERGENCY READ-ONLY MODE (45 CFR 164.308(a)(7)): records are served and every access audited into this copy's log; changes are refused. Export the log for the privacy office afterwards: medvault audit export");
    serve_vault(dir, &cfg, Arc::new(vault), op, listen, None)
}

const DEMO_ROLES: &[Role] = &[
    Role::Physician,
    Role::Nurse,
    Role::FrontDesk,
    Role::Billing,
    Role::SecurityAdmin,
    Role::PrivacyOfficer,
    Role::Auditor,
    Role::RecordsClerk,
];

/// The demo's paper records: a records room the records clerk may enter, with cameras, and
/// a paper volume for each of the first five demo charts (one checked out to the physician),
/// so the registry, the due list and the console's records pages have something to show.
fn demo_paper_records(
    vault: &Vault,
    op: &LocalOperator,
    written: &[medvault_core::EntryResult],
) -> Result<(), VaultError> {
    use medvault_core::governance::records::{Cabinet, Cameras, Room};
    let clerk = Caller::cli(op, Role::RecordsClerk);
    vault.put_records_room(
        &clerk,
        Room {
            id: "HIM-B1".into(),
            name: "Health information management, basement B1".into(),
            door: Some("B1-records".into()),
            authorized: vec![Role::RecordsClerk.as_str().into()],
            cabinets: ["A", "B"]
                .into_iter()
                .map(|id| Cabinet {
                    id: id.into(),
                    name: String::new(),
                })
                .collect(),
            cameras: Some(Cameras {
                coverage: "door and aisles A-B".into(),
                footage_retention_days: 30,
            }),
        },
    )?;
    let patients = written
        .iter()
        .filter_map(|e| e.location.strip_prefix("Patient/"))
        .filter_map(|l| l.split('/').next())
        .take(5);
    for (i, pid) in patients.enumerate() {
        let barcode = format!("PC-{:06}", i + 1);
        vault.register_volume(
            &clerk,
            medvault_core::NewVolume {
                barcode: barcode.clone(),
                patient: pid.to_owned(),
                volume: 1,
                record_class: None,
                room: "HIM-B1".into(),
                cabinet: if i % 2 == 0 { "A" } else { "B" }.into(),
                last_entry: Some("2012-03-01".into()),
            },
        )?;
        if i == 1 {
            let due = medvault_core::fhir_instant_secs(vault.now_unix() + 2 * 86_400);
            vault.volume_custody(
                &clerk,
                &barcode,
                medvault_core::CustodyAct::CheckOut {
                    to: Some(Role::Physician.as_str().into()),
                    department: None,
                    due,
                    retrieved_by: None,
                },
            )?;
        }
    }
    Ok(())
}

/// Demo charts loaded per transaction.
const DEMO_BUNDLE: usize = 500;

fn demo(
    dir: &Path,
    patients: usize,
    seed: u64,
    listen: Option<String>,
    as_json: bool,
) -> Result<()> {
    let fresh = !dir.join(config::FILE).exists();
    // One login per staff role, each named after its role.
    let mut logins: Vec<serde_json::Value> = vec![];
    let mut recovery_key: Option<String> = None;
    if fresh {
        let out = init(
            dir,
            Role::SecurityAdmin.as_str(),
            None,
            None,
            KeyProvider::File,
        )?;
        if !as_json {
            println!(
                "Created {} (TLS certificate SHA-256 {})",
                dir.display(),
                out.cert_sha256
            );
            println!(
                "Backup recovery key (restores backups if the master key is lost; keep it offline): {}",
                out.recovery_key
            );
        }
        recovery_key = Some(out.recovery_key.clone());
        let (_, vault, op) = open(dir)?;
        logins.push(
            json!({"username": out.user.username.as_str(), "role": Role::SecurityAdmin.as_str(),
            "password": out.user.password.expose(), "totp_secret": out.user.totp_secret}),
        );
        // Staff first: the clinicians' Practitioners go on the demo patients' care teams.
        let mut care_team = vec![];
        for role in DEMO_ROLES.iter().filter(|r| **r != Role::SecurityAdmin) {
            let u = vault
                .add_user(
                    &Caller::cli(&op, Role::SecurityAdmin),
                    role.as_str(),
                    *role,
                    None,
                )
                .map_err(describe)?;
            care_team.extend(u.practitioner_id.clone());
            logins.push(
                json!({"username": u.username.as_str(), "role": role.as_str(),
                "password": u.password.expose(), "totp_secret": u.totp_secret}),
            );
        }
        let bar = if as_json {
            None
        } else {
            progress_bar(patients as u64, "generating synthetic charts")
        };
        if let Some(b) = &bar {
            b.set_message("loading through the secure path");
        }
        let mut written = vec![];
        for (k, bundle) in demo::bundles(seed, patients, &care_team, DEMO_BUNDLE)
            .into_iter()
            .enumerate()
        {
            written.extend(
                vault
                    .transaction(&Caller::cli(&op, Role::Importer), bundle, "import", false)
                    .map_err(describe)?,
            );
            if let Some(b) = &bar {
                b.set_position(((k + 1) * DEMO_BUNDLE).min(patients) as u64);
            }
        }
        let n = written.len();
        // A patient-portal account for the first demo patient (identity checked in person,
        // as the front desk would).
        if let Some(pid) = written
            .iter()
            .find_map(|e| e.location.strip_prefix("Patient/"))
            .and_then(|l| l.split('/').next())
        {
            let u = vault
                .add_user(
                    &Caller::cli(&op, Role::SecurityAdmin),
                    "patient",
                    Role::Patient,
                    None,
                )
                .map_err(describe)?;
            vault
                .link_portal(
                    &Caller::cli(&op, Role::FrontDesk),
                    pid,
                    "patient",
                    "self",
                    "in-person-known-patient",
                )
                .map_err(describe)?;
            logins.push(
                json!({"username": u.username.as_str(), "role": Role::Patient.as_str(),
                "password": u.password.expose(), "totp_secret": u.totp_secret}),
            );
        }
        demo_paper_records(&vault, &op, &written).map_err(describe)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        if !as_json {
            println!("Loaded {patients} synthetic patients ({n} FHIR resources), all fiction.");
            let treated = (0..patients).filter(|i| demo::cared_for(*i)).count();
            println!(
                "The physician and nurse are on the care teams of {treated} of them; reaching the others' clinical records takes break-the-glass."
            );
            println!(
                "Some records carry sensitivity labels (and a few charts are VIP-restricted): they need a patient's consent grant, or break-the-glass for a medical emergency."
            );
            println!();
            println!(
                "{:<16} {:<16} {:<22} TOTP secret (base32)",
                "user", "role", "password"
            );
            for l in &logins {
                println!(
                    "{:<16} {:<16} {:<22} {}",
                    l["username"].as_str().unwrap_or(""),
                    l["role"].as_str().unwrap_or(""),
                    l["password"].as_str().unwrap_or(""),
                    l["totp_secret"].as_str().unwrap_or("")
                );
            }
            println!();
            println!("API: POST /auth/login {{\"username\",\"password\"}}, then POST /auth/mfa/totp {{\"mfa_token\",\"code\"}}");
            println!("with a code from an authenticator app, or `medvault totp-code SECRET`. These logins are shown once.");
        }
        drop(vault);
    }
    let (cfg, vault, op) = open(dir)?;
    // A directory `medvault init` made (not the demo) has none of the demo's users or
    // charts: say so, rather than point at logins that do not exist.
    let demo_made = fresh
        || vault
            .users(&Caller::cli(&op, Role::SecurityAdmin))
            .map_err(describe)?
            .iter()
            .any(|u| u.username == Role::Physician.as_str() && u.role == Role::Physician.as_str());
    if !fresh && !as_json {
        if demo_made {
            println!(
                "Using the existing demo data in {} (its logins were printed when it was created;",
                dir.display()
            );
            println!("delete the directory to start over).");
        } else {
            println!(
                "{} was not made by `medvault demo`: it has no demo users or synthetic charts. Serving it as it is; sign in with its own accounts (or run `medvault demo --data-dir NEW_DIR` for the demo).",
                dir.display()
            );
        }
    }
    let data_dir = dir.display().to_string();
    let announce: Announce = if as_json {
        Box::new(move |url: &str| {
            println!(
                "{}",
                json!({"url": url, "console": format!("{}/", console_url(url)), "fhir_base": format!("{url}/fhir"),
                    "data_dir": data_dir, "created": fresh, "demo_data": demo_made, "users": logins,
                    "recovery_key": recovery_key})
            );
        })
    } else {
        let names: Vec<String> = logins
            .iter()
            .filter_map(|l| l["username"].as_str().map(str::to_owned))
            .collect();
        Box::new(move |url: &str| {
            println!();
            if !demo_made {
                println!(
                    "Web console: open {}/ and sign in with one of this installation's accounts.",
                    console_url(url)
                );
            } else if names.is_empty() {
                println!(
                    "Web console: open {}/ and sign in as one of the demo users (password, then a TOTP code).",
                    console_url(url)
                );
            } else {
                println!(
                    "Web console: open {}/ and sign in as {} (password, then a TOTP code).",
                    console_url(url),
                    names.join(", ")
                );
            }
            if fresh {
                println!(
                    "The certificate is self-signed: its SHA-256 fingerprint is printed above."
                );
            } else {
                println!("The certificate is self-signed: its SHA-256 fingerprint was printed when this directory was created.");
            }
        })
    };
    let announce = Some(announce);
    serve_vault(dir, &cfg, vault, op, listen, announce)
}

/// The URL to open the console at: a loopback address becomes `localhost`, the name
/// passkeys work with (WebAuthn needs a domain, not an IP address).
fn console_url(url: &str) -> String {
    url.replacen("https://127.0.0.1:", "https://localhost:", 1)
}

fn progress_bar(len: u64, msg: &'static str) -> Option<indicatif::ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(msg);
    b.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(b)
}

fn bench(
    backend: &medvault_bench::BenchBackend,
    patients: usize,
    ops: usize,
    threads: usize,
    audit_log: u64,
    json: bool,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bar = progress_bar(patients as u64, "loading patients");
    let (rows, audit_notes) = medvault_bench::run(
        backend,
        tmp.path(),
        medvault_bench::BenchOptions {
            sizes: [1, patients.max(1)],
            ops: ops.max(1),
            threads: threads.max(1),
            audit_log,
        },
        Arc::new(SystemClock),
        &|stage, done, total| {
            if let Some(b) = &bar {
                b.set_message(stage.to_owned());
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        },
        &backup_cli::bench_rows,
    )
    .map_err(describe)?;
    if let Some(b) = &bar {
        b.set_message("detection, offline");
    }
    let mut rows = rows;
    rows.extend(medvault_bench::detection_rows());
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({"patients": r.patients, "operation": r.operation,
                "secure_ops_per_sec": r.secure.ops_per_sec, "secure_p50_us": r.secure.p50_us, "secure_p99_us": r.secure.p99_us,
                "plain_ops_per_sec": r.plain.as_ref().map(|p| p.ops_per_sec), "plain_p50_us": r.plain.as_ref().map(|p| p.p50_us),
                "plain_p99_us": r.plain.as_ref().map(|p| p.p99_us),
                "ratio": r.plain.as_ref().map(|p| r.secure.ops_per_sec / p.ops_per_sec.max(1e-9))})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        let store = match backend {
            medvault_bench::BenchBackend::Sqlite => "SQLite (WAL)",
            medvault_bench::BenchBackend::Postgres(_) => "PostgreSQL",
        };
        println!("medvault bench: secure path vs plain store, {threads} client threads, in-process, {store}");
        print!("{}", medvault_bench::render(&rows));
        for n in &audit_notes {
            println!("{n}");
        }
    }
    Ok(())
}

/// Lifetime of a certificate medvault generates: the CA/Browser Forum's 397-day maximum
/// (Baseline Requirements §6.3.2), which scanners hold every server certificate to.
const CERT_LIFETIME_DAYS: i64 = 397;

/// A generated self-signed certificate (PEM) and its key.
struct GeneratedCertificate {
    cert_pem: String,
    key_pem: String,
    /// SHA-256 of the certificate's DER, hex.
    sha256: String,
    not_after: OffsetDateTime,
}

/// A new self-signed certificate for `localhost`, `127.0.0.1` and `::1`, CN `medvault`,
/// valid from now for [`CERT_LIFETIME_DAYS`], with a new P-256 key.
fn self_signed_certificate() -> Result<GeneratedCertificate> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "medvault");
    let now = SystemClock.now();
    params.not_before = now;
    let not_after = now + time::Duration::days(CERT_LIFETIME_DAYS);
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        sha256: Sha256::digest(cert.der())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_after,
    })
}

/// Writes `data` to `path` through a temporary file renamed over it (0600): a reader sees
/// the old file or the new one, never half of one.
fn replace_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("renewing");
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, data)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// `medvault tls renew`.
fn tls_renew(dir: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(dir)?;
    let cert_path = dir.join(&cfg.tls.cert);
    let pem = std::fs::read(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| anyhow!("{} is not a PEM certificate", cert_path.display()))?;
    let cert = p
        .parse_x509()
        .map_err(|_| anyhow!("{} is not an X.509 certificate", cert_path.display()))?;
    let ours = cert.issuer() == cert.subject()
        && cert
            .subject()
            .iter_common_name()
            .any(|cn| cn.as_str() == Ok("medvault"));
    if !ours {
        bail!(
            "{} was issued by {}, not generated by medvault: renew it with that CA and replace the files; a running server reloads them within seconds",
            cert_path.display(),
            cert.issuer()
        );
    }
    let generated = self_signed_certificate()?;
    // Key first: until the certificate follows, the server sees a mismatched pair and keeps
    // serving the old one.
    replace_private(&dir.join(&cfg.tls.key), generated.key_pem.as_bytes())?;
    replace_private(&cert_path, generated.cert_pem.as_bytes())?;
    let not_after = generated
        .not_after
        .format(&time::format_description::well_known::Rfc3339)?;
    if json {
        println!(
            "{}",
            json!({"tls_cert_sha256": generated.sha256, "not_after": not_after})
        );
    } else {
        println!("renewed the TLS certificate: SHA-256 {}", generated.sha256);
        println!("valid until {not_after}; a running server serves it within 5 seconds");
    }
    Ok(())
}

/// `medvault status`.
fn status(dir: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(dir)?;
    let now = SystemClock.now().unix_timestamp();
    let built = supply_chain::build_time();
    let not_after = medvault_server::certificate_not_after(&dir.join(&cfg.tls.cert));
    let days_left = not_after.map(|t| (t - now).div_euclid(86_400));
    let advisories = match supply_chain::database_path(dir, &cfg.supply_chain.advisory_db) {
        Some(db) => Some(supply_chain::check(&db)?),
        None => None,
    };
    let fmt = |t: i64| {
        OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    };
    if json {
        println!(
            "{}",
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "built": fmt(built),
                "build_age_days": (now - built).div_euclid(86_400),
                "tls_not_after": not_after.map(fmt),
                "tls_days_left": days_left,
                "advisories": advisories,
            })
        );
        return Ok(());
    }
    println!(
        "medvault {} built {} ({} day(s) ago)",
        env!("CARGO_PKG_VERSION"),
        fmt(built),
        (now - built).div_euclid(86_400)
    );
    match (not_after, days_left) {
        (Some(t), Some(_)) if t <= now => {
            println!("TLS certificate EXPIRED on {}: clients refuse it", fmt(t))
        }
        (Some(t), Some(d)) => println!("TLS certificate valid until {} ({d} day(s) left)", fmt(t)),
        _ => println!("TLS certificate: expiry unknown"),
    }
    match &advisories {
        Some(a) => {
            println!("dependencies: {}", supply_chain::summary(a));
            for f in &a.findings {
                let fix = if f.patched.is_empty() {
                    "no fixed version".to_owned()
                } else {
                    format!("fixed in {}", f.patched.join(", "))
                };
                println!("  {} {} {}: {} ({fix})", f.id, f.package, f.version, f.title);
            }
            for acc in &a.accepted {
                let f = &acc.finding;
                println!(
                    "  accepted {} {} {}: {} — {}",
                    f.id, f.package, f.version, f.title, acc.reason
                );
            }
        }
        None => println!(
            "dependencies: unchecked (no advisory database: set [supply_chain] advisory_db, or put a RustSec advisory-db clone at {})",
            dir.join("advisory-db").display()
        ),
    }
    Ok(())
}

/// What the server says of its transport security (status, safeguards report).
const TLS_SUMMARY: &str = "TLS 1.3 only (rustls)";

/// Days before a certificate's end from which the server warns (at start, daily, on
/// reload), as the safeguards report does.
const CERT_WARN_DAYS: i64 = 30;

/// Logs a warning when the served certificate ends within [`CERT_WARN_DAYS`] (or has).
fn warn_certificate_expiry(not_after: Option<i64>) {
    let Some(t) = not_after else { return };
    let days = (t - SystemClock.now().unix_timestamp()).div_euclid(86_400);
    if days < 0 {
        tracing::warn!("the TLS certificate has EXPIRED: clients will refuse it; renew it (`medvault tls renew` for the certificate medvault generated, or with your CA) and the server reloads it");
    } else if days < CERT_WARN_DAYS {
        tracing::warn!(
            days_left = days,
            "the TLS certificate expires soon: renew it (`medvault tls renew` for the certificate medvault generated, or with your CA) and the server reloads it"
        );
    }
}
