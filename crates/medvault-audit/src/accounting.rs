//! The rules of the privacy reports over audit records: the lines of a patient's access
//! report, which accesses enter the HIPAA accounting of disclosures (45 CFR 164.528), and
//! what a recorded disclosure may say. Pure: the gate reads the log and decides who asks.

use crate::{AuditRecord, Outcome};

/// One line of a patient's access report or accounting of disclosures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Access {
    pub index: u64,
    pub time: String,
    pub who: String,
    pub role: Option<String>,
    pub action: String,
    pub outcome: Outcome,
    pub categories: Vec<String>,
    pub withheld: Vec<String>,
    pub purpose: Option<String>,
    pub detail: Option<String>,
    /// The SMART app (client id) the access was made through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The access was made under a break-the-glass grant (emergency override).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// For a recorded disclosure: who received it (name, address), decrypted for the report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    /// For a recorded disclosure: a brief description of what was disclosed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Access {
    /// The line for entry `index`, with a recorded disclosure's opened free text.
    pub fn new(index: u64, r: AuditRecord, text: DisclosureText) -> Self {
        // A recorded disclosure's detail names its recipient kind and basis; a bulk export's
        // its job and recipient. No other detail is a report's business.
        let detail = (r.action == RECORDED_DISCLOSURE || r.action == BULK_EXPORT)
            .then_some(r.detail)
            .flatten();
        Access {
            index,
            time: r.time,
            who: r.actor,
            role: r.role,
            action: r.action,
            outcome: r.outcome,
            categories: r.categories_disclosed,
            withheld: r.categories_withheld,
            purpose: r.purpose,
            detail,
            app: r.app,
            break_glass: r.break_glass,
            recipient_name: text.recipient_name,
            description: text.description,
        }
    }
}

/// The free text of a recorded disclosure (45 CFR 164.528(b)(2): the recipient's name and
/// address, a description of what was disclosed). It may name people and conditions, so it
/// is sealed under the patient's data key, never put in the audit record, and destroyed
/// with the patient's key.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DisclosureText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl DisclosureText {
    /// Whether there is any text to seal.
    pub fn is_empty(&self) -> bool {
        self.recipient_name.is_none() && self.description.is_none()
    }

    /// Checks the lengths (name and address ≤ 500, description ≤ 2000 characters) and
    /// that it is text (no control characters but newlines).
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (field, value, max) in [
            ("recipient_name", &self.recipient_name, 500),
            ("description", &self.description, 2000),
        ] {
            if let Some(v) = value {
                if v.trim().is_empty()
                    || v.chars().count() > max
                    || v.chars().any(|ch| ch.is_control() && ch != '\n')
                {
                    return Err(format!("{field} must be 1 to {max} characters of text"));
                }
            }
        }
        Ok(())
    }
}

/// The action of an audit record that records a disclosure made outside the system.
pub const RECORDED_DISCLOSURE: &str = "disclosure";

/// Kinds of recipient a recorded disclosure may name.
pub const RECIPIENT_KINDS: &[&str] = &[
    "public_health",
    "health_oversight",
    "law_enforcement",
    "court_order",
    "research",
    "coroner",
    "organ_procurement",
    "other",
];

/// Purposes that are treatment, payment or health-care operations (45 CFR 164.528(a)(1)(i)
/// exempts those from the accounting of disclosures).
pub const TPO: &[&str] = &["TREAT", "ETREAT", "HPAYMT", "HOPERAT", "COVERAGE"];

/// The action of a bulk export's read of one chart (`$export`).
pub const BULK_EXPORT: &str = "export";

/// Whether a record enters a patient's access report (everything but reads of the log).
pub fn in_access_report(r: &AuditRecord) -> bool {
    !r.action.starts_with("audit.")
}

/// Whether a record enters the accounting of disclosures as of `since` (six years back):
/// recorded disclosures (except those made under the individual's authorization,
/// 164.528(a)(1)(iv)), and successful disclosures of chart data for a purpose outside
/// treatment, payment and operations — bulk exports among them — except de-identified
/// exports (`deidentified=` in the detail: no longer PHI, 164.514(a)).
pub fn accountable(r: &AuditRecord, since: &str) -> bool {
    r.time.as_str() >= since
        && r.outcome == Outcome::Success
        && !r.detail.as_deref().is_some_and(|d| {
            d.split(' ')
                .any(|p| p.starts_with("basis=authorization:") || p.starts_with("deidentified="))
        })
        && (r.action == RECORDED_DISCLOSURE
            || (!r.categories_disclosed.is_empty()
                && r.purpose.as_deref().is_some_and(|p| !TPO.contains(&p))))
}

/// The id of the sealed free text a disclosure record points to (`text=<id>` in its
/// detail).
pub fn text_id(r: &AuditRecord) -> Option<&str> {
    if r.action != RECORDED_DISCLOSURE {
        return None;
    }
    r.detail
        .as_deref()?
        .split(' ')
        .find_map(|part| part.strip_prefix("text="))
}

/// The AAD that binds a sealed disclosure text to its id and patient.
pub fn text_aad(id: &str, patient: &str) -> Vec<u8> {
    format!("disclosure|{id}|{patient}").into_bytes()
}
