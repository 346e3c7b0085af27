//! An alert's life: open → triage → false positive (with a reason) or confirmed (which
//! opens an incident); suppressions that hold back alerts of a kind, user or patient for a
//! while, with a reason, an owner and an expiry. Pure: the gate stores and audits.

use serde::{Deserialize, Serialize};

use crate::{AlertLine, AlertType};

/// Longest reason or note, in characters.
pub const REASON_CHARS: usize = 2000;
/// Longest suppression, in days.
pub const MAX_SUPPRESSION_DAYS: i64 = 366;
/// Longest suppression of a whole alert type (no user, no patient), in days.
pub const MAX_TYPE_SUPPRESSION_DAYS: i64 = 30;

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// Raised, not yet looked at.
    Open,
    /// A privacy officer is looking into it.
    Triage,
    /// Not a privacy or security problem (the reason says why).
    FalsePositive,
    /// A real problem: an incident is opened from it.
    Confirmed,
    /// Raised while a suppression matched it; kept, never dropped.
    Suppressed,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Open => "open",
            AlertStatus::Triage => "triage",
            AlertStatus::FalsePositive => "false_positive",
            AlertStatus::Confirmed => "confirmed",
            AlertStatus::Suppressed => "suppressed",
        }
    }

    /// Parses a status name.
    ///
    /// # Errors
    /// A message listing the statuses.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "open" => AlertStatus::Open,
            "triage" => AlertStatus::Triage,
            "false_positive" => AlertStatus::FalsePositive,
            "confirmed" => AlertStatus::Confirmed,
            "suppressed" => AlertStatus::Suppressed,
            other => {
                return Err(format!(
                "unknown alert status `{}`: open, triage, false_positive, confirmed or suppressed",
                other.chars().take(40).collect::<String>()
            ))
            }
        })
    }
}

/// Checks a change of status and its reason (trimmed); returns the reason to keep.
///
/// - open or suppressed → triage, false positive or confirmed;
/// - triage → false positive or confirmed;
/// - false positive → triage (reopened);
/// - confirmed is final (its incident carries on).
///
/// # Errors
/// A message for a change that is not allowed, a false positive without a reason, or a
/// reason over [`REASON_CHARS`].
pub fn transition(from: AlertStatus, to: AlertStatus, reason: &str) -> Result<String, String> {
    use AlertStatus::*;
    let ok = matches!(
        (from, to),
        (Open | Suppressed, Triage | FalsePositive | Confirmed)
            | (Triage, FalsePositive | Confirmed)
            | (FalsePositive, Triage)
    );
    if !ok {
        return Err(format!(
            "an alert that is {} cannot become {}",
            from.as_str().replace('_', " "),
            to.as_str().replace('_', " ")
        ));
    }
    let reason = reason.trim();
    if reason.chars().count() > REASON_CHARS {
        return Err(format!(
            "the reason is longer than {REASON_CHARS} characters"
        ));
    }
    if to == FalsePositive && reason.chars().count() < 3 {
        return Err("say why it is a false positive (a reason is required)".into());
    }
    Ok(reason.to_owned())
}

/// A suppression: alerts matching every field given (type, user, patient) are kept as
/// `suppressed` until `expires` (Unix seconds), for the reason given, on `owner`'s word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suppression {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Option<AlertType>,
    pub user: Option<String>,
    pub patient: Option<String>,
    pub reason: String,
    pub owner: String,
    pub created: i64,
    pub expires: i64,
    /// Ended early by hand.
    #[serde(default)]
    pub ended: Option<i64>,
}

impl Suppression {
    /// Checks a new suppression.
    ///
    /// # Errors
    /// A message when it matches everything (no type, user or patient), holds back alerts
    /// about its own owner, lacks a reason, or expires in the past or more than
    /// [`MAX_SUPPRESSION_DAYS`] ahead ([`MAX_TYPE_SUPPRESSION_DAYS`] for a whole type).
    pub fn check(&self, now: i64) -> Result<(), String> {
        if self.kind.is_none() && self.user.is_none() && self.patient.is_none() {
            return Err(
                "a suppression needs a type, a user or a patient: it may not hold back every alert"
                    .into(),
            );
        }
        if self.user.as_deref() == Some(self.owner.as_str()) {
            return Err(
                "you cannot suppress alerts about yourself; ask another privacy officer".into(),
            );
        }
        if self.user.is_none()
            && self.patient.is_none()
            && self.expires - now > MAX_TYPE_SUPPRESSION_DAYS * 86_400
        {
            return Err(format!(
                "a suppression of a whole alert type lasts at most {MAX_TYPE_SUPPRESSION_DAYS} days; name a user or a patient for longer"
            ));
        }
        let n = self.reason.trim().chars().count();
        if !(3..=REASON_CHARS).contains(&n) {
            return Err(format!(
                "a reason of 3 to {REASON_CHARS} characters is required"
            ));
        }
        if self.expires <= now {
            return Err("the expiry must be in the future".into());
        }
        if self.expires - now > MAX_SUPPRESSION_DAYS * 86_400 {
            return Err(format!(
                "a suppression lasts at most {MAX_SUPPRESSION_DAYS} days"
            ));
        }
        Ok(())
    }

    /// Whether it is in force at `now`.
    pub fn active(&self, now: i64) -> bool {
        self.ended.is_none() && now < self.expires
    }

    /// Whether it holds back `alert` at `now`.
    pub fn matches(&self, alert: &AlertLine, now: i64) -> bool {
        self.active(now)
            && self.kind.is_none_or(|k| k == alert.kind)
            && self
                .user
                .as_deref()
                .is_none_or(|u| alert.user.as_deref() == Some(u))
            && self
                .patient
                .as_deref()
                .is_none_or(|p| alert.patient.as_deref() == Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AlertStatus::*;

    #[test]
    fn an_alert_moves_forward_and_a_false_positive_needs_a_reason() {
        assert!(transition(Open, Triage, "").is_ok());
        assert!(transition(Triage, Confirmed, "").is_ok());
        assert!(transition(Triage, FalsePositive, "").is_err());
        assert_eq!(
            transition(Triage, FalsePositive, "  covering ward 4 ").unwrap(),
            "covering ward 4"
        );
        assert!(transition(FalsePositive, Triage, "").is_ok());
        assert!(transition(Confirmed, Triage, "").is_err());
        assert!(transition(Open, Open, "").is_err());
        assert!(transition(Open, Suppressed, "x y z").is_err());
        assert!(AlertStatus::parse("closed").is_err());
    }

    fn alert(kind: AlertType, user: &str, patient: Option<&str>) -> AlertLine {
        AlertLine {
            kind,
            user: Some(user.into()),
            source_ip: None,
            patient: patient.map(str::to_owned),
            time: "2026-03-01T00:00:00Z".into(),
            score: 0.5,
            evidence: String::new(),
        }
    }

    #[test]
    fn a_suppression_matches_what_it_names_until_it_expires() {
        let s = Suppression {
            id: "s".into(),
            kind: Some(AlertType::AfterHours),
            user: Some("ann".into()),
            patient: None,
            reason: "covering nights in March".into(),
            owner: "po".into(),
            created: 0,
            expires: 100,
            ended: None,
        };
        assert!(s.check(0).is_ok());
        assert!(s.matches(&alert(AlertType::AfterHours, "ann", Some("p1")), 50));
        assert!(!s.matches(&alert(AlertType::AfterHours, "bob", None), 50));
        assert!(!s.matches(&alert(AlertType::VipSnooping, "ann", None), 50));
        assert!(
            !s.matches(&alert(AlertType::AfterHours, "ann", None), 100),
            "expired"
        );
        let all = Suppression {
            kind: None,
            user: None,
            ..s.clone()
        };
        assert!(all
            .check(0)
            .unwrap_err()
            .contains("may not hold back every alert"));
        assert!(Suppression {
            reason: " ".into(),
            ..s.clone()
        }
        .check(0)
        .is_err());
        assert!(Suppression {
            expires: 400 * 86_400,
            ..s.clone()
        }
        .check(0)
        .is_err());
        let own = Suppression {
            user: Some("po".into()),
            ..s.clone()
        };
        assert!(own.check(0).unwrap_err().contains("about yourself"));
        let wide = Suppression {
            user: None,
            expires: 40 * 86_400,
            ..s.clone()
        };
        assert!(wide.check(0).unwrap_err().contains("at most 30 days"));
        assert!(!Suppression {
            ended: Some(10),
            ..s
        }
        .matches(&alert(AlertType::AfterHours, "ann", None), 50));
    }
}
