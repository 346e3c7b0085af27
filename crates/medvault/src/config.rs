//! `medvault.toml`: defaults < file < `MEDVAULT_*` environment < CLI flags, parsed once
//! into an immutable [`Config`]. Unknown keys are errors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub tls: Tls,
    pub storage: Storage,
    pub keys: Keys,
    pub session: Session,
    pub lockout: Lockout,
    pub access: Access,
    pub audit: Audit,
    pub backup: Backup,
    pub detect: Detect,
    pub limits: Limits,
    pub supply_chain: SupplyChain,
    /// OpenID Connect identity providers for single sign-on (`[[oidc]]`, any number).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub oidc: Vec<Oidc>,
}

/// One OpenID provider (`[[oidc]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    /// The name in URLs (`/auth/oidc/NAME/start`) and user names (`NAME.user`):
    /// lowercase letters, digits and `-`.
    pub name: String,
    /// The issuer (`https://idp.example.org/realms/hospital`); `http://` only on loopback.
    pub issuer: String,
    pub client_id: String,
    /// File holding the client secret, relative to the data directory.
    pub client_secret_file: String,
    /// The ID token claim holding the user's groups.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// Group → role (`{ "ehr-physicians" = "physician" }`); a user in no listed group is
    /// refused.
    pub roles: std::collections::BTreeMap<String, String>,
    /// `amr` values (RFC 8176) that count as multi-factor at the IdP.
    #[serde(default = "default_mfa_amr")]
    pub mfa_amr: Vec<String>,
    /// The claim naming the user.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
}

fn default_role_claim() -> String {
    "groups".into()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_mfa_amr() -> Vec<String> {
    ["mfa", "otp", "hwk", "swk", "fpt", "face", "iris", "sc"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// The login throttle (SPEC "Identity", lockout): per account and address, per account,
/// per address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lockout {
    /// Consecutive failures of one account from one address before it locks.
    pub max_failures: i64,
    /// Failures of one account from all addresses before password sign-in slows down
    /// (a passkey still signs in).
    pub account_max_failures: i64,
    /// Failures from one address within a minute, over all accounts.
    pub source_max_failures_per_minute: i64,
    /// The first lock's length; each further failure doubles it.
    pub base_backoff_secs: i64,
    /// The longest lock.
    pub max_backoff_secs: i64,
    /// Wrong second-factor answers before a challenge dies (back to the password).
    pub challenge_attempts: i64,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout {
            max_failures: 5,
            account_max_failures: 20,
            source_max_failures_per_minute: 20,
            base_backoff_secs: 30,
            max_backoff_secs: 900,
            challenge_attempts: 3,
        }
    }
}

/// Access control beyond roles (SPEC "Access control").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// How long a break-the-glass grant lasts, in seconds (default 8 hours; at most 72
    /// hours).
    pub break_glass_secs: i64,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            break_glass_secs: 8 * 3600,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Open checkpoints, the verifier key, tiles and proofs (commitments only) to anyone.
    /// Changing it is recorded in the audit log at the next start.
    pub public_transparency: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: String,
    pub max_body_bytes: usize,
    /// The URL clients reach this server at (`https://ehr.example.org`), from which every
    /// link, `Location` and `fullUrl` is built. Empty: `https://{listen address}`.
    pub public_base_url: String,
    /// Comma-separated addresses of reverse proxies whose `X-Forwarded-For`,
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` are believed. Empty: none.
    pub trusted_proxies: String,
    /// The largest `_count` a search may ask for.
    pub max_page_size: usize,
    /// How long a search's paging cursor stays valid, in seconds.
    pub cursor_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// `sqlite` (embedded default) or `postgres`.
    pub backend: String,
    /// SQLite database file, relative to the data directory.
    pub path: PathBuf,
    /// PostgreSQL URL (`postgres://user@host:5432/db?sslmode=require`); or use `url_file`.
    pub url: String,
    /// File holding the PostgreSQL URL (keeps a password out of this file).
    pub url_file: String,
    /// Connect to a PostgreSQL server on another host without TLS. Off: such a URL is
    /// refused unless it names the loopback or a Unix socket, or asks for
    /// `sslmode=require`, `verify-ca` or `verify-full`.
    pub allow_plaintext_postgres: bool,
}

/// `[supply_chain]`: where the RustSec advisory database is (a directory holding
/// `crates/`, e.g. a clone of <https://github.com/rustsec/advisory-db> kept current by the
/// operator). Empty: `advisory-db` in the data directory, if present.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupplyChain {
    pub advisory_db: String,
}

/// `[limits]`: timeouts, connections and request rates (HTTP `429` + `Retry-After` beyond
/// a rate). A rate of 0 turns that limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a TLS handshake may take.
    pub handshake_timeout_secs: u64,
    /// Seconds a request's headers may take to arrive (also how long an idle keep-alive
    /// connection is kept).
    pub header_timeout_secs: u64,
    /// Seconds a request's body may take to arrive.
    pub body_timeout_secs: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Requests per second from one address (an IPv6 /64), sustained.
    pub per_address_per_sec: u32,
    /// Requests one address may send at once above that rate.
    pub per_address_burst: u32,
    /// Requests per second with one token or session, sustained.
    pub per_token_per_sec: u32,
    /// Requests one token may send at once above that rate.
    pub per_token_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        let d = medvault_server::Limits::default();
        Limits {
            handshake_timeout_secs: d.handshake_timeout.as_secs(),
            header_timeout_secs: d.header_timeout.as_secs(),
            body_timeout_secs: d.body_timeout.as_secs(),
            max_connections: d.max_connections,
            per_address_per_sec: d.per_address.per_sec as u32,
            per_address_burst: d.per_address.burst as u32,
            per_token_per_sec: d.per_token.per_sec as u32,
            per_token_burst: d.per_token.burst as u32,
        }
    }
}

impl Limits {
    /// The server's form of these limits.
    pub fn to_server(&self) -> medvault_server::Limits {
        let secs = |s: u64| std::time::Duration::from_secs(s.max(1));
        let rate = |per_sec: u32, burst: u32| medvault_server::Rate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(per_sec).max(1)),
        };
        medvault_server::Limits {
            handshake_timeout: secs(self.handshake_timeout_secs),
            header_timeout: secs(self.header_timeout_secs),
            body_timeout: secs(self.body_timeout_secs),
            max_connections: self.max_connections.max(1),
            per_address: rate(self.per_address_per_sec, self.per_address_burst),
            per_token: rate(self.per_token_per_sec, self.per_token_burst),
        }
    }
}

/// Refuses a PostgreSQL URL that would carry PHI in clear over a network: a host other
/// than the loopback or a Unix socket without `sslmode=require|verify-ca|verify-full`,
/// unless `allowed` (`storage.allow_plaintext_postgres`). libpq URL forms: the host after
/// `@` (or `//`), a bracketed IPv6 address, or a `host=` query parameter.
///
/// # Errors
/// One line naming the host and what to do.
pub fn postgres_transport(url: &str, allowed: bool) -> Result<()> {
    if allowed {
        return Ok(());
    }
    // Two forms: a URL (`postgres://…?k=v`), or libpq's `key=value` words.
    let (hosts, sslmode) = match url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        Some(rest) => {
            let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
            let params: Vec<(String, String)> =
                serde_urlencoded::from_str(query).unwrap_or_default();
            let param = |k: &str| {
                params
                    .iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            let authority = base.split('/').next().unwrap_or("");
            let hostports = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let hosts: Vec<String> = match param("host") {
                Some(h) => h.split(',').map(str::to_owned).collect(),
                None => hostports
                    .split(',')
                    .map(|hp| match hp.strip_prefix('[') {
                        Some(h) => h.split(']').next().unwrap_or("").to_owned(),
                        None => hp.split(':').next().unwrap_or("").to_owned(),
                    })
                    .collect(),
            };
            (hosts, param("sslmode"))
        }
        None => {
            let word = |k: &str| {
                url.split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .filter(|(n, _)| *n == k)
                    .map(|(_, v)| v.trim_matches('\'').to_owned())
                    .next_back()
            };
            let hosts = word("host")
                .map(|h| h.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            (hosts, word("sslmode"))
        }
    };
    if matches!(
        sslmode.as_deref(),
        Some("require" | "verify-ca" | "verify-full")
    ) {
        return Ok(());
    }
    let local = |host: &str| {
        host.is_empty()
            || host.starts_with('/')
            || host.starts_with("%2F")
            || host.starts_with("%2f")
            || host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let Some(remote) = hosts.iter().find(|h| !local(h)) else {
        return Ok(());
    };
    // Only a plausible host name is repeated: never the rest of the connection string
    // (it may hold a password).
    let shown = if !remote.is_empty()
        && remote.len() < 256
        && remote
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:%".contains(&b))
    {
        remote.as_str()
    } else {
        "another host"
    };
    bail!(
        "the PostgreSQL connection names {shown} without TLS: add sslmode=verify-full (or require), or allow it with `init --allow-plaintext-postgres` / storage.allow_plaintext_postgres = true if the network is otherwise protected"
    )
}

/// `[backup]`: where snapshots go, how often the server takes one, how many it keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backup {
    /// The repository directory; empty: `DATA_DIR-backups` beside the data directory (never
    /// inside it: a backup must survive the loss of the data directory).
    pub repository: String,
    /// Seconds between scheduled snapshots while serving (0: none).
    pub interval_secs: u64,
    /// Snapshots kept; older ones and the chunks only they use are pruned.
    pub retain: usize,
    /// The recovery public key (`MVRP1-…`), relative to the data directory.
    pub recovery_public_key_file: String,
}

/// Live privacy monitoring and intrusion detection (`[detect]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Detect {
    /// Run the live consumer of the audit log (off the request path).
    pub enabled: bool,
    /// Alert types (comma-separated) that disable the account and end its sessions.
    pub lock: String,
    /// Alert types that end the account's sessions.
    pub revoke_sessions: String,
    /// Alert types that require a fresh second factor before the next sensitive action.
    pub step_up: String,
    /// POST each alert (JSON, without the patient) to this https:// URL (a SIEM or a
    /// paging webhook); empty: none. Every alert is also logged as one `medvault::siem`
    /// line.
    pub webhook_url: String,
}

impl Default for Detect {
    fn default() -> Self {
        Detect {
            enabled: true,
            lock: "brute_force".into(),
            revoke_sessions: "token_new_address".into(),
            step_up: "mass_export,enumeration".into(),
            webhook_url: String::new(),
        }
    }
}

impl Detect {
    /// The alert types of one comma-separated setting.
    ///
    /// # Errors
    /// An unknown type, named with its key.
    pub fn types(key: &str, v: &str) -> Result<Vec<medvault_core::detect::AlertType>> {
        v.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse()
                    .map_err(|e: String| anyhow::anyhow!("detect.{key}: {e}"))
            })
            .collect()
    }

    /// The automatic responses configured.
    ///
    /// # Errors
    /// An unknown alert type.
    pub fn responses(&self) -> Result<medvault_core::DetectResponses> {
        Ok(medvault_core::DetectResponses {
            lock: Detect::types("lock", &self.lock)?,
            revoke_sessions: Detect::types("revoke_sessions", &self.revoke_sessions)?,
            step_up: Detect::types("step_up", &self.step_up)?,
        })
    }
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            repository: String::new(),
            interval_secs: 86_400,
            retain: 30,
            recovery_public_key_file: "backup-recovery.pub".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keys {
    /// `file`, `passphrase` or `pkcs11`.
    pub provider: String,
    pub master_key_file: PathBuf,
    pub key_cache_capacity: usize,
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`), for `pkcs11`.
    pub pkcs11_module: String,
    /// The token's label, for `pkcs11`.
    pub pkcs11_token: String,
    /// A file holding the token's user PIN (else `MEDVAULT_PKCS11_PIN`), for `pkcs11`.
    pub pkcs11_pin_file: String,
    /// The master key object's label (`LABEL`, then `LABEL.v2`, … after rotations).
    pub pkcs11_key_label: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Session {
    pub idle_timeout_secs: i64,
    pub absolute_timeout_secs: i64,
    /// How long a verified second factor allows step-up actions.
    pub step_up_secs: i64,
    /// Days without a sign-in after which an account is disabled (0: never).
    pub dormant_after_days: i64,
    /// Let a passkey alone sign in (`/auth/webauthn/passwordless/*`); off by default.
    pub passwordless: bool,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8443".into(),
            max_body_bytes: 8 * 1024 * 1024,
            public_base_url: String::new(),
            trusted_proxies: String::new(),
            max_page_size: 1000,
            cursor_ttl_secs: 900,
        }
    }
}
impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: "tls/cert.pem".into(),
            key: "tls/key.pem".into(),
        }
    }
}
impl Default for Storage {
    fn default() -> Self {
        Storage {
            backend: "sqlite".into(),
            path: "medvault.db".into(),
            url: String::new(),
            url_file: String::new(),
            allow_plaintext_postgres: false,
        }
    }
}
impl Default for Keys {
    fn default() -> Self {
        Keys {
            provider: "file".into(),
            master_key_file: "master.key".into(),
            key_cache_capacity: 100_000,
            pkcs11_module: String::new(),
            pkcs11_token: String::new(),
            pkcs11_pin_file: String::new(),
            pkcs11_key_label: "medvault-master".into(),
        }
    }
}
impl Default for Session {
    fn default() -> Self {
        Session {
            idle_timeout_secs: 900,
            absolute_timeout_secs: 43_200,
            step_up_secs: 300,
            dormant_after_days: 90,
            passwordless: false,
        }
    }
}

pub const FILE: &str = "medvault.toml";

impl Config {
    /// Reads `DIR/medvault.toml` and applies `MEDVAULT_<SECTION>_<KEY>` overrides.
    pub fn load(dir: &Path) -> Result<Config> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no medvault data directory at {} (run `medvault init`)",
                dir.display()
            )
        })?;
        Self::from_toml(&text, &path)
    }

    /// Parses the text of `medvault.toml` (read from `path`, which errors name) over the
    /// defaults and the `MEDVAULT_*` environment, and checks it.
    ///
    /// # Errors
    /// One line: invalid TOML, an unknown key, a value of the wrong type, or a setting
    /// `check` refuses.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config> {
        let mut value: toml::Value = toml::from_str(text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        let defaults = toml::Value::try_from(Config::default())?;
        apply_env(&mut value, &defaults)?;
        let cfg: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let l = &self.limits;
        for (name, v) in [
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("header_timeout_secs", l.header_timeout_secs),
            ("body_timeout_secs", l.body_timeout_secs),
        ] {
            if v == 0 {
                bail!("limits.{name} must be at least 1 (seconds)");
            }
        }
        if l.max_connections == 0 {
            bail!("limits.max_connections must be at least 1");
        }
        for (name, rate, burst) in [
            ("per_address", l.per_address_per_sec, l.per_address_burst),
            ("per_token", l.per_token_per_sec, l.per_token_burst),
        ] {
            if rate > 0 && burst == 0 {
                bail!("limits.{name}_burst must be at least 1 while limits.{name}_per_sec is on (0 turns the rate off)");
            }
        }
        match self.storage.backend.as_str() {
            "sqlite" => {}
            "postgres" if !self.storage.url.is_empty() || !self.storage.url_file.is_empty() => {}
            "postgres" => {
                bail!("storage.backend = \"postgres\" needs storage.url or storage.url_file")
            }
            other => bail!("storage.backend `{other}` is unknown (sqlite, postgres)"),
        }
        match self.keys.provider.as_str() {
            "file" | "passphrase" => {}
            "pkcs11" if self.keys.pkcs11_module.is_empty() || self.keys.pkcs11_token.is_empty() => {
                bail!("keys.provider = \"pkcs11\" needs keys.pkcs11_module and keys.pkcs11_token")
            }
            "pkcs11" => {}
            other => bail!("keys.provider `{other}` is unknown (file, passphrase, pkcs11)"),
        }
        let positive = |key: &str, v: i64| -> Result<()> {
            if v <= 0 {
                bail!("{key} must be positive (it is {v})");
            }
            Ok(())
        };
        positive("session.idle_timeout_secs", self.session.idle_timeout_secs)?;
        positive(
            "session.absolute_timeout_secs",
            self.session.absolute_timeout_secs,
        )?;
        positive("session.step_up_secs", self.session.step_up_secs)?;
        self.detect.responses()?;
        let hook = &self.detect.webhook_url;
        let local = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"];
        if !hook.is_empty()
            && !hook.starts_with("https://")
            && !local.iter().any(|l| hook.starts_with(l))
        {
            bail!(
                "detect.webhook_url must start with https:// (or be a loopback http:// collector)"
            );
        }
        if self.session.idle_timeout_secs > self.session.absolute_timeout_secs {
            bail!("session.idle_timeout_secs must not exceed session.absolute_timeout_secs");
        }
        if self.session.dormant_after_days < 0 {
            bail!("session.dormant_after_days must be 0 (never) or more");
        }
        let l = &self.lockout;
        for (key, v) in [
            ("lockout.max_failures", l.max_failures),
            ("lockout.account_max_failures", l.account_max_failures),
            (
                "lockout.source_max_failures_per_minute",
                l.source_max_failures_per_minute,
            ),
            ("lockout.base_backoff_secs", l.base_backoff_secs),
            ("lockout.max_backoff_secs", l.max_backoff_secs),
            ("lockout.challenge_attempts", l.challenge_attempts),
        ] {
            positive(key, v)?;
        }
        if l.base_backoff_secs > l.max_backoff_secs {
            bail!("lockout.base_backoff_secs must not exceed lockout.max_backoff_secs");
        }
        if l.challenge_attempts > 10 || l.max_failures > 100 {
            bail!("lockout.challenge_attempts must be at most 10 and lockout.max_failures at most 100 (a second factor must not become a guessing game)");
        }
        if !(1..=72 * 3600).contains(&self.access.break_glass_secs) {
            bail!("access.break_glass_secs must be between 1 and 259200 (72 hours): emergency access is time-boxed");
        }
        let mut names = std::collections::BTreeSet::new();
        for o in &self.oidc {
            if o.name.is_empty()
                || o.name.len() > 32
                || !o
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                bail!("oidc name `{}` must be 1-32 of a-z, 0-9 and -", o.name);
            }
            if !names.insert(o.name.clone()) {
                bail!("oidc name `{}` is used twice", o.name);
            }
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| o.issuer.starts_with(p));
            if !o.issuer.starts_with("https://") && !loopback {
                bail!("oidc `{}`: issuer must be https://", o.name);
            }
            if o.roles.is_empty() {
                bail!("oidc `{}`: roles maps no group to a role", o.name);
            }
            for (group, role) in &o.roles {
                let staff = role
                    .parse::<medvault_core::Role>()
                    .map(|r| r.is_staff())
                    .unwrap_or(false);
                if !staff {
                    bail!(
                        "oidc `{}`: group `{group}` maps to `{role}`, which is not a staff role",
                        o.name
                    );
                }
            }
            if o.client_secret_file.is_empty() {
                bail!("oidc `{}`: client_secret_file is required", o.name);
            }
        }
        Ok(())
    }

    /// The PostgreSQL URL, from `storage.url` or the file `storage.url_file` names.
    pub fn postgres_url(&self, dir: &Path) -> Result<String> {
        if !self.storage.url.is_empty() {
            return Ok(self.storage.url.clone());
        }
        let f = dir.join(&self.storage.url_file);
        Ok(std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read {}", f.display()))?
            .trim()
            .to_owned())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

fn apply_env(value: &mut toml::Value, defaults: &toml::Value) -> Result<()> {
    let (Some(table), Some(dt)) = (value.as_table_mut(), defaults.as_table()) else {
        return Ok(());
    };
    for (section, dsec) in dt {
        let Some(dsec) = dsec.as_table() else {
            continue;
        };
        for (key, dval) in dsec {
            let var = format!("MEDVAULT_{}_{}", section.to_uppercase(), key.to_uppercase());
            let Ok(raw) = std::env::var(&var) else {
                continue;
            };
            let parsed = match dval {
                toml::Value::Integer(_) => toml::Value::Integer(
                    raw.parse()
                        .with_context(|| format!("{var} must be an integer"))?,
                ),
                toml::Value::Boolean(_) => toml::Value::Boolean(
                    raw.parse()
                        .with_context(|| format!("{var} must be true or false"))?,
                ),
                _ => toml::Value::String(raw),
            };
            let sec = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let Some(s) = sec.as_table_mut() {
                s.insert(key.clone(), parsed);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_without_tls_is_refused_off_the_loopback() {
        for ok in [
            "postgres://root@127.0.0.1:5432/root",
            "postgres://u:p@localhost/db",
            "postgresql://u@[::1]:5432/db",
            "postgres:///db?host=/var/run/postgresql",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
            "host=/var/run/postgresql user=u password=p dbname=x",
            "host=db.example.org sslmode=verify-full user=u password=p",
            "postgres://u@db.example.org/db?sslmode=verify-full",
            "postgres://u@10.0.0.5/db?application_name=x&sslmode=require",
        ] {
            assert!(postgres_transport(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "postgres://u:p@db.example.org:5432/db",
            "postgres://u@10.0.0.5/db?sslmode=prefer",
            "postgres://u@[2001:db8::1]/db",
            "postgres://u@localhost/db?host=db.example.org",
            "postgres://u:p@localhost,db.example.org/db",
            "host=db.example.org user=u password=p dbname=x",
        ] {
            let e = postgres_transport(bad, false).unwrap_err().to_string();
            assert!(e.contains("without TLS"), "{bad}: {e}");
            assert!(
                !e.contains("u:p") && !e.contains("password"),
                "the password must not be echoed: {e}"
            );
            assert!(postgres_transport(bad, true).is_ok(), "{bad} when allowed");
        }
    }

    /// Configuration fuzzing: arbitrary text, and TOML made of the real sections and keys
    /// with values of any type, gives a configuration or one error line, never a panic.
    /// CI smoke: 256 cases; longer: `PROPTEST_CASES=20000 cargo test -p medvault fuzz_`.
    #[test]
    fn fuzz_configuration_is_refused_cleanly() {
        use proptest::prelude::*;
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut keys: Vec<(String, String)> = vec![];
        for (section, t) in defaults.as_table().unwrap() {
            for k in t
                .as_table()
                .map(|t| t.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                keys.push((section.clone(), k));
            }
        }
        let value = prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            r#""[ -~]{0,30}""#,
            r#"\[[0-9, "a-z]{0,20}\]"#,
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "[ -~]{0,12}",
        ];
        let path = Path::new("medvault.toml");
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&any::<String>(), |text| {
                let _ = Config::from_toml(&text, path);
                Ok(())
            })
            .unwrap();
        runner
            .run(
                &prop::collection::vec((prop::sample::select(keys), value), 0..8),
                |pairs| {
                    let mut text = String::new();
                    for ((section, key), v) in pairs {
                        text.push_str(&format!("[{section}]\n{key} = {v}\n"));
                    }
                    if let Err(e) = Config::from_toml(&text, path) {
                        let msg = format!("{e:#}");
                        prop_assert!(!msg.is_empty());
                    }
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn zero_timeouts_and_connections_are_refused_not_taken_as_one() {
        let path = Path::new("medvault.toml");
        for bad in [
            "[limits]\nheader_timeout_secs = 0\n",
            "[limits]\nmax_connections = 0\n",
            "[limits]\nper_token_burst = 0\n",
        ] {
            let e = Config::from_toml(bad, path).unwrap_err().to_string();
            assert!(e.contains("limits."), "{bad}: {e}");
        }
        assert!(Config::from_toml(
            "[limits]\nper_token_per_sec = 0\nper_token_burst = 0\n",
            path
        )
        .is_ok());
    }

    #[test]
    fn the_limits_section_defaults_to_the_servers_limits() {
        assert_eq!(
            Limits::default().to_server(),
            medvault_server::Limits::default()
        );
    }
}
