//! The HIPAA Security Rule self-assessment (45 CFR 164.308, .310, .312, .316) with live
//! evidence: each safeguard names the fact medvault can know about it (or needs an
//! attestation with owner and date), the 405(d) HICP practices (Health Industry
//! Cybersecurity Practices, 2023 edition, practices 1–10) and the NIST CSF 2.0 functions
//! it maps to, so a report can show which recognized security practices (HITECH §13412)
//! were in place. Also the risk register (likelihood × impact, 1–5 each) and the quarterly
//! review cadence. Pure: evidence and `today` are parameters.

use serde::{Deserialize, Serialize};

/// One safeguard of the Security Rule as assessed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Safeguard {
    pub id: &'static str,
    /// The CFR paragraph.
    pub cfr: &'static str,
    pub title: &'static str,
    /// HICP practice numbers (1 email protection, 2 endpoint protection, 3 access
    /// management, 4 data protection and loss prevention, 5 IT asset management, 6 network
    /// management, 7 vulnerability management, 8 security operations and incident
    /// response, 9 network connected medical devices, 10 cybersecurity oversight and
    /// governance).
    pub hicp: &'static [u8],
    /// NIST CSF 2.0 functions: GV, ID, PR, DE, RS, RC.
    pub csf: &'static [&'static str],
    /// The live evidence key that decides it, or `None`: attested.
    pub evidence: Option<&'static str>,
}

/// The safeguards assessed, in CFR order.
pub const SAFEGUARDS: &[Safeguard] = &[
    Safeguard {
        id: "risk-analysis",
        cfr: "164.308(a)(1)(ii)(A)",
        title: "Risk analysis",
        hicp: &[10],
        csf: &["ID", "GV"],
        evidence: Some("risk_review"),
    },
    Safeguard {
        id: "risk-management",
        cfr: "164.308(a)(1)(ii)(B)",
        title: "Risk management",
        hicp: &[10],
        csf: &["GV"],
        evidence: None,
    },
    Safeguard {
        id: "sanction-policy",
        cfr: "164.308(a)(1)(ii)(C)",
        title: "Sanction policy",
        hicp: &[10],
        csf: &["GV"],
        evidence: None,
    },
    Safeguard {
        id: "activity-review",
        cfr: "164.308(a)(1)(ii)(D)",
        title: "Information system activity review",
        hicp: &[8],
        csf: &["DE"],
        evidence: Some("alerts_triaged"),
    },
    Safeguard {
        id: "security-official",
        cfr: "164.308(a)(2)",
        title: "Assigned security responsibility",
        hicp: &[10],
        csf: &["GV"],
        evidence: None,
    },
    Safeguard {
        id: "workforce-clearance",
        cfr: "164.308(a)(3)(ii)(B)",
        title: "Workforce clearance and termination: dormant accounts",
        hicp: &[3],
        csf: &["PR"],
        evidence: Some("dormant_accounts"),
    },
    Safeguard {
        id: "access-authorization",
        cfr: "164.308(a)(4)(ii)(B)",
        title: "Access authorization: approved policies",
        hicp: &[3],
        csf: &["PR", "GV"],
        evidence: Some("policy_approval"),
    },
    Safeguard {
        id: "awareness-training",
        cfr: "164.308(a)(5)(i)",
        title: "Security awareness and training",
        hicp: &[1, 10],
        csf: &["PR"],
        evidence: Some("training"),
    },
    Safeguard {
        id: "password-management",
        cfr: "164.308(a)(5)(ii)(D)",
        title: "Password management and MFA",
        hicp: &[3],
        csf: &["PR"],
        evidence: Some("mfa"),
    },
    Safeguard {
        id: "incident-procedures",
        cfr: "164.308(a)(6)",
        title: "Security incident procedures",
        hicp: &[8],
        csf: &["RS"],
        evidence: Some("incidents"),
    },
    Safeguard {
        id: "data-backup",
        cfr: "164.308(a)(7)(ii)(A)",
        title: "Data backup plan and restore drills",
        hicp: &[4],
        csf: &["RC"],
        evidence: Some("backup_drill"),
    },
    Safeguard {
        id: "contingency-testing",
        cfr: "164.308(a)(7)(ii)(D)",
        title: "Testing and revision of the contingency plan",
        hicp: &[8],
        csf: &["RC"],
        evidence: None,
    },
    Safeguard {
        id: "evaluation",
        cfr: "164.308(a)(8)",
        title: "Periodic technical and nontechnical evaluation",
        hicp: &[10],
        csf: &["GV"],
        evidence: Some("risk_review"),
    },
    Safeguard {
        id: "facility-access",
        cfr: "164.310(a)(1)",
        title: "Facility access controls",
        hicp: &[5],
        csf: &["PR"],
        evidence: None,
    },
    Safeguard {
        id: "workstation-security",
        cfr: "164.310(c)",
        title: "Workstation security",
        hicp: &[2],
        csf: &["PR"],
        evidence: None,
    },
    Safeguard {
        id: "device-media",
        cfr: "164.310(d)(1)",
        title: "Device and media controls: inventory and encryption",
        hicp: &[2, 5],
        csf: &["ID", "PR"],
        evidence: Some("assets"),
    },
    Safeguard {
        id: "unique-user",
        cfr: "164.312(a)(2)(i)",
        title: "Unique user identification",
        hicp: &[3],
        csf: &["PR"],
        evidence: Some("unique_users"),
    },
    Safeguard {
        id: "emergency-access",
        cfr: "164.312(a)(2)(ii)",
        title: "Emergency access procedure (break-the-glass, reviewed)",
        hicp: &[3],
        csf: &["PR"],
        evidence: Some("break_glass_reviews"),
    },
    Safeguard {
        id: "encryption-at-rest",
        cfr: "164.312(a)(2)(iv)",
        title: "Encryption and decryption at rest",
        hicp: &[4],
        csf: &["PR"],
        evidence: Some("encryption"),
    },
    Safeguard {
        id: "audit-controls",
        cfr: "164.312(b)",
        title: "Audit controls: verified, witnessed log",
        hicp: &[8],
        csf: &["DE"],
        evidence: Some("audit_log"),
    },
    Safeguard {
        id: "integrity",
        cfr: "164.312(c)(1)",
        title: "Integrity of ePHI",
        hicp: &[4],
        csf: &["PR"],
        evidence: Some("audit_log"),
    },
    Safeguard {
        id: "authentication",
        cfr: "164.312(d)",
        title: "Person or entity authentication",
        hicp: &[3],
        csf: &["PR"],
        evidence: Some("mfa"),
    },
    Safeguard {
        id: "transmission-security",
        cfr: "164.312(e)(1)",
        title: "Transmission security: TLS and certificate",
        hicp: &[6],
        csf: &["PR"],
        evidence: Some("tls"),
    },
    Safeguard {
        id: "patching",
        cfr: "164.308(a)(1)(ii)(B)",
        title: "Software updates and dependency advisories",
        hicp: &[7],
        csf: &["ID", "PR"],
        evidence: Some("advisories"),
    },
    Safeguard {
        id: "documentation",
        cfr: "164.316(b)",
        title: "Policies and documentation kept six years",
        hicp: &[10],
        csf: &["GV"],
        evidence: None,
    },
];

/// One fact medvault knows now: `ok` decides, `text` says what was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub key: String,
    /// `None`: not known here (treated as not assessed, never as met).
    pub ok: Option<bool>,
    pub text: String,
}

/// An officer's attestation for a safeguard without live evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub safeguard: String,
    pub owner: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    pub note: String,
    /// Whether the safeguard is in place, as attested.
    pub in_place: bool,
}

/// Days an attestation stays valid.
pub const ATTESTATION_DAYS: i64 = 365;

/// A safeguard's assessed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assessed {
    pub safeguard: Safeguard,
    /// `met`, `not_met`, `attested`, `not_assessed`.
    pub status: &'static str,
    /// `live` or `attestation`.
    pub source: &'static str,
    pub evidence: String,
}

/// Assesses every safeguard from live `evidence` and `attestations` as of `today`
/// (attestations older than a year no longer count).
pub fn assess(
    evidence: &[Evidence],
    attestations: &[Attestation],
    today: time::Date,
) -> Vec<Assessed> {
    SAFEGUARDS
        .iter()
        .map(|s| {
            if let Some(k) = s.evidence {
                let e = evidence.iter().find(|e| e.key == k);
                let (status, text) = match e {
                    Some(e) => (
                        match e.ok {
                            Some(true) => "met",
                            Some(false) => "not_met",
                            None => "not_assessed",
                        },
                        e.text.clone(),
                    ),
                    None => ("not_assessed", "no evidence".into()),
                };
                return Assessed {
                    safeguard: *s,
                    status,
                    source: "live",
                    evidence: text,
                };
            }
            let a = attestations
                .iter()
                .filter(|a| a.safeguard == s.id)
                .filter(|a| {
                    crate::retention::date("date", &a.date)
                        .is_ok_and(|d| (today - d).whole_days() <= ATTESTATION_DAYS)
                })
                .max_by(|x, y| x.date.cmp(&y.date));
            match a {
                Some(a) => Assessed {
                    safeguard: *s,
                    status: if a.in_place { "attested" } else { "not_met" },
                    source: "attestation",
                    evidence: format!("{} on {}: {}", a.owner, a.date, a.note),
                },
                None => Assessed {
                    safeguard: *s,
                    status: "not_assessed",
                    source: "attestation",
                    evidence: "no attestation in the last year".into(),
                },
            }
        })
        .collect()
}

/// The HICP practices in place: every safeguard mapped to the practice met or attested.
pub fn practices_in_place(assessed: &[Assessed]) -> Vec<(u8, bool)> {
    (1..=10u8)
        .filter(|p| assessed.iter().any(|a| a.safeguard.hicp.contains(p)))
        .map(|p| {
            (
                p,
                assessed
                    .iter()
                    .filter(|a| a.safeguard.hicp.contains(&p))
                    .all(|a| matches!(a.status, "met" | "attested")),
            )
        })
        .collect()
}

/// A risk of the register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Risk {
    #[serde(default)]
    pub id: String,
    pub title: String,
    /// 1 (rare) to 5 (almost certain).
    pub likelihood: u8,
    /// 1 (negligible) to 5 (severe).
    pub impact: u8,
    pub owner: String,
    /// `mitigate`, `accept`, `transfer`, `avoid`.
    pub treatment: String,
    /// When it is next reviewed (`YYYY-MM-DD`).
    pub review_by: String,
    /// The safeguard whose failing evidence raised it, if raised automatically.
    #[serde(default)]
    pub safeguard: Option<String>,
}

/// The treatments a risk may have.
pub const TREATMENTS: &[&str] = &["mitigate", "accept", "transfer", "avoid"];

impl Risk {
    /// Likelihood × impact (1–25).
    pub fn score(&self) -> u8 {
        self.likelihood.saturating_mul(self.impact)
    }

    /// Checks a risk (trimmed, in place).
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&mut self) -> Result<(), String> {
        for (f, v) in [("title", &mut self.title), ("owner", &mut self.owner)] {
            *v = v.trim().to_owned();
            if v.is_empty() || v.chars().count() > 300 {
                return Err(format!("`{f}` must be 1–300 characters"));
            }
        }
        if !(1..=5).contains(&self.likelihood) || !(1..=5).contains(&self.impact) {
            return Err("`likelihood` and `impact` are 1 to 5".into());
        }
        if !TREATMENTS.contains(&self.treatment.trim()) {
            return Err(format!(
                "unknown treatment: one of {}",
                TREATMENTS.join(", ")
            ));
        }
        self.treatment = self.treatment.trim().to_owned();
        let d = crate::retention::date("review_by", &self.review_by)?;
        self.review_by = crate::breach::day(d);
        Ok(())
    }
}

/// Months between risk reviews (quarterly).
pub const REVIEW_MONTHS: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_evidence_decides_and_old_attestations_lapse() {
        let today = crate::retention::date("t", "2026-12-01").unwrap();
        let ev = vec![Evidence {
            key: "mfa".into(),
            ok: Some(false),
            text: "1 of 3 without".into(),
        }];
        let att = vec![Attestation {
            safeguard: "sanction-policy".into(),
            owner: "po".into(),
            date: "2025-06-01".into(),
            note: "x".into(),
            in_place: true,
        }];
        let a = assess(&ev, &att, today);
        let get = |id: &str| a.iter().find(|x| x.safeguard.id == id).unwrap().status;
        assert_eq!(get("password-management"), "not_met");
        assert_eq!(get("sanction-policy"), "not_assessed", "older than a year");
        assert_eq!(
            get("encryption-at-rest"),
            "not_assessed",
            "unknown is never met"
        );
        assert!(practices_in_place(&a).iter().any(|(p, ok)| *p == 3 && !ok));
    }
}
