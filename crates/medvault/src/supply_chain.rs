//! Supply chain: what this build is made of and whether any of it has a published
//! vulnerability.
//!
//! - The build's `Cargo.lock` is compiled into the binary, so the running program knows its
//!   exact dependency set; `medvault sbom` prints it as a CycloneDX 1.5 JSON SBOM
//!   (<https://cyclonedx.org/docs/1.5/json/>), one component per package with its
//!   `pkg:cargo` purl and crates.io SHA-256.
//! - The advisory check reads a local copy of the RustSec advisory database
//!   (<https://github.com/rustsec/advisory-db>; `[supply_chain] advisory_db`, or
//!   `advisory-db` in the data directory) with the `rustsec` crate — the library
//!   `cargo audit` is built on — and matches it against that lockfile. Nothing is fetched:
//!   keeping the copy current is the operator's (a mirror, or the offline bundle CI uses).
//! - The build's time comes from `build.rs` (`SOURCE_DATE_EPOCH` when set, for
//!   reproducible builds).
//!
//! `medvault status` and the safeguards report (45 CFR 164.308(a)(1)(ii)(B) risk
//! management, 164.308(a)(5)(ii)(B) protection from malicious software) show the result.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

/// The lockfile this binary was built from.
const LOCKFILE: &str = include_str!("../../../Cargo.lock");

/// Unix seconds at which this binary was built (see `build.rs`).
pub(crate) fn build_time() -> i64 {
    env!("MEDVAULT_BUILD_UNIX").parse().unwrap_or(0)
}

/// Advisories reviewed and accepted for this build, with why (the same list as
/// `deny.toml`'s `ignore`): shown by `medvault status`, never counted as open findings.
pub(crate) const ACCEPTED: &[(&str, &str)] = &[(
    "RUSTSEC-2023-0071",
    "medvault only verifies RSA signatures (SMART client assertions, OpenID ID tokens) with public keys and holds no RSA private key; the Marvin attack recovers a private key from the timing of private-key operations",
)];

/// One advisory that applies to a package in this build.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Finding {
    /// `RUSTSEC-YYYY-NNNN`.
    pub id: String,
    pub package: String,
    pub version: String,
    pub title: String,
    /// Versions that fix it (`>= 0.3.47`), empty when there is no fix.
    pub patched: Vec<String>,
}

/// The result of checking this build against an advisory database.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AdvisoryState {
    /// The database directory read.
    pub database: PathBuf,
    /// The newest advisory's date in it (`YYYY-MM-DD`): how current the copy is.
    pub advisories_through: Option<String>,
    /// Advisories in the database.
    pub advisories: usize,
    /// Packages in this build.
    pub packages: usize,
    /// Vulnerabilities affecting them (informational notices, e.g. "unmaintained", are
    /// not counted), less the accepted ones.
    pub findings: Vec<Finding>,
    /// Vulnerabilities affecting them that were reviewed and accepted ([`ACCEPTED`]), with
    /// the reason.
    pub accepted: Vec<Accepted>,
}

/// A finding reviewed and accepted, with why.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Accepted {
    #[serde(flatten)]
    pub finding: Finding,
    pub reason: String,
}

/// The advisory database to read: `configured` if set, else `advisory-db` in the data
/// directory if it exists.
pub(crate) fn database_path(dir: &Path, configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        let p = PathBuf::from(configured);
        return Some(if p.is_absolute() { p } else { dir.join(p) });
    }
    let default = dir.join("advisory-db");
    default.is_dir().then_some(default)
}

/// Checks this build's lockfile against the RustSec database at `db`.
///
/// # Errors
/// The directory is missing or holds no RustSec `crates/` collection, or an advisory in it
/// does not parse.
pub(crate) fn check(db: &Path) -> Result<AdvisoryState> {
    if !db.join("crates").is_dir() {
        return Err(anyhow!(
            "{} is not a RustSec advisory database (no crates/ directory)",
            db.display()
        ));
    }
    let database = rustsec::Database::open(db)
        .map_err(|e| anyhow!("cannot read the advisory database {}: {e}", db.display()))?;
    let lockfile = rustsec::Lockfile::from_str(LOCKFILE)
        .map_err(|e| anyhow!("this build's lockfile does not parse: {e}"))?;
    let all: Vec<Finding> = database
        .vulnerabilities(&lockfile)
        .into_iter()
        .map(|v| Finding {
            id: v.advisory.id.to_string(),
            package: v.package.name.to_string(),
            version: v.package.version.to_string(),
            title: v.advisory.title.clone(),
            patched: v
                .versions
                .patched()
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
        .collect();
    let (accepted, findings): (Vec<Finding>, Vec<Finding>) = all
        .into_iter()
        .partition(|f| ACCEPTED.iter().any(|(id, _)| *id == f.id));
    let accepted = accepted
        .into_iter()
        .map(|f| {
            let why = ACCEPTED
                .iter()
                .find(|(id, _)| *id == f.id)
                .map(|(_, why)| (*why).to_owned())
                .unwrap_or_default();
            Accepted {
                finding: f,
                reason: why,
            }
        })
        .collect();
    let advisories_through = database
        .iter()
        .map(|a| a.metadata.date.as_str().to_owned())
        .max();
    Ok(AdvisoryState {
        database: db.to_owned(),
        advisories_through,
        advisories: database.iter().count(),
        packages: lockfile.packages.len(),
        findings,
        accepted,
    })
}

/// This build as a CycloneDX 1.5 SBOM (JSON).
///
/// # Errors
/// The embedded lockfile does not parse (a build defect).
pub(crate) fn sbom() -> Result<Value> {
    let lockfile = rustsec::Lockfile::from_str(LOCKFILE)
        .map_err(|e| anyhow!("this build's lockfile does not parse: {e}"))?;
    let version = env!("CARGO_PKG_VERSION");
    let built = time::OffsetDateTime::from_unix_timestamp(build_time())
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    // The binary itself is the SBOM's subject (`metadata.component`), not one of its
    // components.
    let parts = || {
        lockfile
            .packages
            .iter()
            .filter(|p| p.name.as_str() != "medvault")
    };
    let purl_of = |name: &str, version: &str| format!("pkg:cargo/{name}@{version}");
    let dependencies: Vec<Value> = lockfile
        .packages
        .iter()
        .map(|p| {
            let on: Vec<String> = p
                .dependencies
                .iter()
                .map(|d| purl_of(d.name.as_str(), &d.version.to_string()))
                .collect();
            json!({"ref": purl_of(p.name.as_str(), &p.version.to_string()), "dependsOn": on})
        })
        .collect();
    let components: Vec<Value> = parts()
        .map(|p| {
            let purl = format!("pkg:cargo/{}@{}", p.name, p.version);
            let mut c = json!({
                "type": "library",
                "bom-ref": purl,
                "name": p.name.as_str(),
                "version": p.version.to_string(),
                "purl": purl,
            });
            if let (Some(o), Some(sum)) = (c.as_object_mut(), p.checksum.as_ref()) {
                o.insert(
                    "hashes".into(),
                    json!([{"alg": "SHA-256", "content": sum.to_string()}]),
                );
            }
            if let (Some(o), Some(src)) = (c.as_object_mut(), p.source.as_ref()) {
                o.insert(
                    "externalReferences".into(),
                    json!([{"type": "distribution", "url": src.url().to_string()}]),
                );
            }
            c
        })
        .collect();
    Ok(json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": built,
            "tools": {"components": [{"type": "application", "name": "medvault", "version": version}]},
            "component": {"type": "application", "bom-ref": format!("pkg:cargo/medvault@{version}"),
                "name": "medvault", "version": version, "purl": format!("pkg:cargo/medvault@{version}")},
        },
        "components": components,
        "dependencies": dependencies,
    }))
}

/// The summary line the safeguards report and the server's log use.
pub(crate) fn summary(state: &AdvisoryState) -> String {
    let through = state
        .advisories_through
        .as_deref()
        .unwrap_or("an unknown date");
    let accepted: Vec<&str> = state
        .accepted
        .iter()
        .map(|a| a.finding.id.as_str())
        .collect();
    let reviewed = if accepted.is_empty() {
        String::new()
    } else {
        format!("; reviewed and accepted: {}", accepted.join(", "))
    };
    if state.findings.is_empty() {
        format!(
            "no open vulnerability in the build's {} packages (RustSec advisories through {through}){reviewed}",
            state.packages
        )
    } else {
        let ids: Vec<String> = state
            .findings
            .iter()
            .map(|f| format!("{} ({} {})", f.id, f.package, f.version))
            .collect();
        format!(
            "{} known vulnerabilit{} in the build: {} (RustSec advisories through {through}); update the dependencies and rebuild{reviewed}",
            state.findings.len(),
            if state.findings.len() == 1 { "y" } else { "ies" },
            ids.join(", ")
        )
    }
}

/// [`check`] for the data directory's configured database, as the environment fact the
/// safeguards report uses: `None` when no database is configured or present.
pub(crate) fn evidence(dir: &Path, configured: &str) -> Option<medvault_core::SupplyChain> {
    use medvault_core::Clock as _;
    let build_age_days =
        (crate::SystemClock.now().unix_timestamp() - build_time()).div_euclid(86_400);
    let Some(db) = database_path(dir, configured) else {
        return Some(medvault_core::SupplyChain {
            checked: false,
            clean: false,
            text: format!(
                "no advisory database configured ([supply_chain] advisory_db): this build's dependencies are unchecked; build {build_age_days} day(s) old"
            ),
        });
    };
    Some(match check(&db).with_context(|| "advisory check") {
        Ok(state) => medvault_core::SupplyChain {
            checked: true,
            clean: state.findings.is_empty(),
            text: format!("{}; build {build_age_days} day(s) old", summary(&state)),
        },
        Err(e) => medvault_core::SupplyChain {
            checked: false,
            clean: false,
            text: format!("{e:#}"),
        },
    })
}
