//! Incident response (45 CFR 164.308(a)(6); NIST SP 800-61): what an [`Incident`] carries
//! beyond its source and timeline — severity, the response roles and who holds them, the
//! notification tree (who is told at each severity, and their acknowledgement), playbooks
//! that create task lists, the phase timestamps (detected, contained, eradicated,
//! recovered), sealed evidence by reference, the accounts and time window under
//! investigation, the affected individuals counted per state, and the breach decision
//! ([`crate::breach`]). The asset and media inventory feeds the lost-device playbook.
//!
//! [`Incident`]: crate::Incident

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::breach::{Decision, Facts};

/// How bad an incident is; each level tells more roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    #[default]
    Moderate,
    High,
    Critical,
}

impl Severity {
    /// Parses `low`, `moderate`, `high`, `critical`.
    ///
    /// # Errors
    /// The list of names.
    pub fn parse(s: &str) -> Result<Severity, String> {
        match s.trim() {
            "low" => Ok(Severity::Low),
            "moderate" => Ok(Severity::Moderate),
            "high" => Ok(Severity::High),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity `{}`: low, moderate, high or critical",
                other.chars().take(40).collect::<String>()
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Moderate => "moderate",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// The response roles.
pub const ROLES: &[&str] = &[
    "incident_lead",
    "privacy_officer",
    "security_officer",
    "legal",
    "communications",
];

/// The notification tree: the roles told at `severity` (each level adds to the one
/// below: low tells the lead and the privacy officer; moderate the security officer; high
/// legal; critical communications).
pub fn roles_told(severity: Severity) -> &'static [&'static str] {
    let n = match severity {
        Severity::Low => 2,
        Severity::Moderate => 3,
        Severity::High => 4,
        Severity::Critical => ROLES.len(),
    };
    ROLES.get(..n).unwrap_or(ROLES)
}

/// The playbooks and the tasks each creates.
pub const PLAYBOOKS: &[(&str, &[&str])] = &[
    (
        "lost_or_stolen_device",
        &[
            "Identify the device in the asset inventory (owner, encryption, last check)",
            "Decide the encryption safe harbour from the inventory and the key state",
            "Remote-wipe or lock the device; revoke its sessions and tokens",
            "File a police report if it was stolen",
            "Assess breach and notification",
        ],
    ),
    (
        "ransomware",
        &[
            "Isolate affected systems from the network",
            "Preserve evidence (memory, logs, ransom note)",
            "Verify the audit log and its witnessed checkpoints",
            "Restore from the last verified backup (see the last drill and its RTO)",
            "Reset credentials of affected accounts",
            "Notify the FBI or CISA",
            "Assess breach: ransomware is presumed a breach unless low probability is documented",
        ],
    ),
    (
        "snooping_employee",
        &[
            "Suspend the employee's PHI access",
            "Compute the charts accessed in the window from the audit log",
            "Interview the employee with HR",
            "Apply the sanctions policy (45 CFR 164.530(e))",
            "Assess breach and notification",
        ],
    ),
    (
        "misdirected_disclosure",
        &[
            "Contact the recipient; request return or an attestation of destruction",
            "Establish whether the recipient is obliged to protect PHI",
            "Record the disclosure in the accounting of disclosures",
            "Assess breach (four factors)",
        ],
    ),
    (
        "missing_paper_chart",
        &[
            "Search the volume's last custodians and locations",
            "Correlate badge events and review camera footage",
            "Declare the volume lost or found",
            "Assess breach and notification",
        ],
    ),
    (
        "compromised_account",
        &[
            "Disable the account and end its sessions",
            "Reset the password and second factor",
            "Compute the charts the account read in the window from the audit log",
            "Review the account's other activity (exports, changes)",
            "Assess breach and notification",
        ],
    ),
];

/// The tasks of playbook `name`.
///
/// # Errors
/// The list of playbooks.
pub fn playbook(name: &str) -> Result<&'static [&'static str], String> {
    PLAYBOOKS
        .iter()
        .find(|(n, _)| *n == name.trim())
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            format!(
                "unknown playbook `{}`: {}",
                name.chars().take(40).collect::<String>(),
                PLAYBOOKS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            )
        })
}

/// One task of the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: u32,
    pub text: String,
    #[serde(default)]
    pub done_by: Option<String>,
    #[serde(default)]
    pub done_at: Option<i64>,
}

/// One notice of the notification tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub role: String,
    pub user: String,
    pub notified_at: i64,
    #[serde(default)]
    pub acknowledged_at: Option<i64>,
}

/// Evidence attached to an incident: the sealed bytes live elsewhere; this is their
/// reference and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRef {
    pub id: String,
    pub name: String,
    /// `sha256:HEX` of the evidence as attached.
    pub sha256: String,
    pub bytes: u64,
    pub added_by: String,
    pub added_at: i64,
}

/// The phases of the response (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    #[serde(default)]
    pub detected: Option<i64>,
    #[serde(default)]
    pub contained: Option<i64>,
    #[serde(default)]
    pub eradicated: Option<i64>,
    #[serde(default)]
    pub recovered: Option<i64>,
}

/// The names of the phases, in order.
pub const PHASES: &[&str] = &["detected", "contained", "eradicated", "recovered"];

impl Phases {
    /// Records `phase` at `at`; phases are in order and each is set once.
    ///
    /// # Errors
    /// An unknown phase, one already set, one before an earlier phase.
    pub fn set(&mut self, phase: &str, at: i64, opened: i64) -> Result<(), String> {
        let phase = phase.trim();
        let i = PHASES.iter().position(|p| *p == phase).ok_or_else(|| {
            format!(
                "unknown phase `{}`: contained, eradicated or recovered",
                phase.chars().take(40).collect::<String>()
            )
        })?;
        if i == 0 {
            return Err("detection is recorded when the incident opens; record contained, eradicated or recovered".into());
        }
        let order = [
            self.detected.or(Some(opened)),
            self.contained,
            self.eradicated,
            self.recovered,
        ];
        if order.get(i).copied().flatten().is_some() {
            return Err(format!("the incident was already {phase}"));
        }
        // In order: the phase before must be recorded, and not after this one.
        match order.get(i - 1).copied().flatten() {
            None => {
                return Err(format!(
                    "record `{}` first",
                    PHASES.get(i - 1).copied().unwrap_or("")
                ))
            }
            Some(t) if t > at => {
                return Err(format!(
                    "`{phase}` cannot be before `{}`",
                    PHASES.get(i - 1).copied().unwrap_or("")
                ))
            }
            Some(_) => {}
        }
        match i {
            1 => self.contained = Some(at),
            2 => self.eradicated = Some(at),
            _ => self.recovered = Some(at),
        }
        Ok(())
    }

    /// Seconds from detection (or opening) to containment.
    pub fn time_to_contain(&self, opened: i64) -> Option<i64> {
        self.contained.map(|c| c - self.detected.unwrap_or(opened))
    }

    /// Seconds from detection (or opening) to recovery.
    pub fn time_to_recover(&self, opened: i64) -> Option<i64> {
        self.recovered.map(|c| c - self.detected.unwrap_or(opened))
    }
}

/// The response record of an incident (empty for an incident just opened).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub severity: Severity,
    /// Response role → user.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    #[serde(default)]
    pub playbook: Option<String>,
    #[serde(default)]
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub phases: Phases,
    #[serde(default)]
    pub notices: Vec<Notice>,
    #[serde(default)]
    pub evidence: Vec<EvidenceRef>,
    /// Accounts whose access is under investigation.
    #[serde(default)]
    pub accounts: Vec<String>,
    /// The window under investigation (Unix seconds).
    #[serde(default)]
    pub window: Option<(i64, i64)>,
    /// Affected individuals by state of residence (`unknown` when the chart gives none).
    #[serde(default)]
    pub affected: BTreeMap<String, u64>,
    /// The asset (inventory id) a lost-device incident is about.
    #[serde(default)]
    pub asset: Option<String>,
    #[serde(default)]
    pub facts: Option<Facts>,
    #[serde(default)]
    pub decision: Option<Decision>,
    #[serde(default)]
    pub closed_at: Option<i64>,
}

impl Response {
    /// The notices the tree calls for that are not yet sent: `(role, user)` for each role
    /// told at the severity that has a holder and no notice.
    pub fn due_notices(&self) -> Vec<(String, String)> {
        roles_told(self.severity)
            .iter()
            .filter_map(|r| self.roles.get(*r).map(|u| ((*r).to_owned(), u.clone())))
            .filter(|(r, u)| !self.notices.iter().any(|n| &n.role == r && &n.user == u))
            .collect()
    }
}

/// An asset of the inventory (laptop, phone, removable media, server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub id: String,
    /// `laptop`, `desktop`, `phone`, `tablet`, `removable_media`, `server`.
    pub kind: String,
    pub owner: String,
    pub location: String,
    /// Whether its storage is encrypted (full-disk or file-level, FIPS 140 validated).
    pub encrypted: bool,
    /// When encryption was last checked (`YYYY-MM-DD`).
    #[serde(default)]
    pub last_check: Option<String>,
    /// `in_service`, `lost`, `stolen`, `retired`.
    #[serde(default = "in_service")]
    pub status: String,
    /// Whether it holds or reaches PHI.
    #[serde(default)]
    pub holds_phi: bool,
}

fn in_service() -> String {
    "in_service".into()
}

/// The kinds of asset.
pub const ASSET_KINDS: &[&str] = &[
    "laptop",
    "desktop",
    "phone",
    "tablet",
    "removable_media",
    "server",
];
/// The states of an asset.
pub const ASSET_STATUSES: &[&str] = &["in_service", "lost", "stolen", "retired"];

/// Checks an asset (trimmed, in place).
///
/// # Errors
/// A message naming the field.
pub fn check_asset(a: &mut Asset, today: time::Date) -> Result<(), String> {
    a.id = a.id.trim().to_owned();
    if a.id.is_empty()
        || a.id.len() > 64
        || !a
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err("`id` must be 1–64 letters, digits, `-`, `_` or `.`".into());
    }
    if !ASSET_KINDS.contains(&a.kind.trim()) {
        return Err(format!(
            "unknown asset kind: one of {}",
            ASSET_KINDS.join(", ")
        ));
    }
    if !ASSET_STATUSES.contains(&a.status.trim()) {
        return Err(format!(
            "unknown asset status: one of {}",
            ASSET_STATUSES.join(", ")
        ));
    }
    for (f, v) in [("owner", &a.owner), ("location", &a.location)] {
        if v.trim().is_empty() || v.chars().count() > 200 {
            return Err(format!("`{f}` must be 1–200 characters"));
        }
    }
    if let Some(d) = a.last_check.as_deref().filter(|d| !d.trim().is_empty()) {
        let d = crate::retention::date("last_check", d)?;
        if d > today {
            return Err("`last_check` is in the future".into());
        }
        a.last_check = Some(crate::breach::day(d));
    } else {
        a.last_check = None;
    }
    a.kind = a.kind.trim().to_owned();
    a.status = a.status.trim().to_owned();
    Ok(())
}

/// The lost-device playbook's safe-harbour facts from the inventory: the device's data
/// counts as encrypted at rest only when the inventory says so and encryption was checked
/// (`last_check` present).
pub fn device_encrypted(a: &Asset) -> bool {
    a.encrypted && a.last_check.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_in_order_once() {
        let mut p = Phases {
            detected: Some(90),
            ..Phases::default()
        };
        assert!(p.set("recovered", 300, 100).is_err(), "not contained yet");
        p.set("contained", 200, 100).unwrap();
        assert!(p.set("contained", 300, 100).is_err(), "once");
        assert!(p.set("eradicated", 150, 100).is_err(), "before containment");
        assert!(p.set("detected", 80, 100).is_err(), "set at opening");
        p.set("eradicated", 200, 100).unwrap();
        p.set("recovered", 400, 100).unwrap();
        assert_eq!(
            (p.time_to_contain(100), p.time_to_recover(100)),
            (Some(110), Some(310))
        );
        assert!(p.set("resolved", 1, 1).is_err());
    }

    #[test]
    fn the_tree_tells_more_roles_as_severity_rises() {
        let mut r = Response::default();
        for role in ROLES {
            r.roles.insert((*role).to_owned(), format!("u.{role}"));
        }
        assert_eq!(r.due_notices().len(), 3);
        r.severity = Severity::Critical;
        assert_eq!(r.due_notices().len(), 5);
        assert!(playbook("ransomware").unwrap().len() > 3);
        assert!(playbook("aliens").is_err());
    }
}
