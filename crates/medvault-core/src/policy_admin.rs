//! Policy administration (SPEC "Access control"): versioned Cedar policy sets, each
//! proposed by one security administrator and in force only once a different one approves
//! it, every change audited; the hard denies of the built-in set (separation of duties,
//! psychotherapy notes, consent, labels, the training gate, break-the-glass for clinical
//! roles only) cannot be dropped through this door. Servers sharing one database pick up
//! an approved version within a second ([`Vault::reload_policy`]). `medvault policy test`
//! runs a table of cases against the set in force (or a proposal) and names the deciding
//! policies ([`Vault::policy_test`]).

use std::sync::Arc;

use medvault_policy::{Asker, PolicyEngine, PrivacyFacts, Query, Relationship, Target};
use medvault_store::{Op, PolicyRow};
use medvault_types::{Action, Category, Operation, Purpose, Role};
use serde::{Deserialize, Serialize};

use crate::{Caller, LocalOperator, Outcome, Vault, VaultError};

/// A policy version as `GET /api/policies` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVersion {
    /// 0 is the built-in set, in force until a version is approved.
    pub version: i64,
    /// `proposed`, `active` or `superseded`.
    pub status: String,
    pub text: String,
    pub proposed_by: Option<String>,
    /// Unix seconds.
    pub proposed_at: Option<i64>,
    pub approved_by: Option<String>,
    pub approved_at: Option<i64>,
}

impl PolicyVersion {
    fn of(r: &PolicyRow) -> Self {
        let approved = !r.approved_by.is_empty();
        PolicyVersion {
            version: r.version,
            status: r.status.clone(),
            text: r.text.clone(),
            proposed_by: Some(r.proposed_by.clone()),
            proposed_at: Some(r.proposed_at),
            approved_by: approved.then(|| r.approved_by.clone()),
            approved_at: approved.then_some(r.approved_at),
        }
    }
}

/// One case of `medvault policy test`: who (a user name, or a role), what, on which data
/// category (or which operation), why, and how the chart is reached; the decision
/// expected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCase {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// `read`, `search`, `create`, `update`, `delete`, or an operation (`user.disable`, …).
    pub action: String,
    /// A data category, or a resource type with one category; absent for operations.
    #[serde(default)]
    pub resource: Option<String>,
    /// An HL7 v3 PurposeOfUse code; the role's default when absent.
    #[serde(default)]
    pub purpose: Option<String>,
    /// `none`, `treatment` (default), `break-glass` or `emergency`.
    #[serde(default)]
    pub relationship: Option<String>,
    #[serde(default)]
    pub consent_denied: bool,
    #[serde(default)]
    pub restricted: bool,
    #[serde(default)]
    pub psychotherapy: bool,
    #[serde(default)]
    pub withheld_from_patient: bool,
    /// Overrides the user's training record (default: the user's, or current).
    #[serde(default)]
    pub training_current: Option<bool>,
    /// `allow` or `deny`.
    pub expect: String,
}

/// What a case decided.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub expected: String,
    pub decided: String,
    pub passed: bool,
    /// The deciding policies' `@id`s.
    pub policies: Vec<String>,
}

fn bad(msg: impl Into<String>) -> VaultError {
    VaultError::BadRequest(msg.into())
}

impl Vault {
    /// The policy engine in force.
    pub(crate) fn policy(&self) -> Arc<PolicyEngine> {
        match self.policy.read() {
            Ok(p) => p.0.clone(),
            // A poisoned lock means a panic mid-swap: deny everything rather than guess.
            Err(_) => Arc::new(PolicyEngine::deny_all()),
        }
    }

    fn swap_policy(&self, version: i64, engine: PolicyEngine) {
        if let Ok(mut p) = self.policy.write() {
            *p = (Arc::new(engine), version);
        }
        if let Ok(mut c) = self.reachable.lock() {
            c.clear();
        }
    }

    /// The version in force: the newest `active` row, or 0 (built-in).
    fn active_policy(rows: &[PolicyRow]) -> Option<&PolicyRow> {
        rows.iter().find(|r| r.status == "active")
    }

    /// Loads the version in force from the store (at open, and when another server
    /// approved one). Returns whether it changed.
    ///
    /// # Errors
    /// A stored version that no longer validates (the server refuses to guess).
    pub fn reload_policy(&self) -> Result<bool, VaultError> {
        let rows = self.store.policies()?;
        let current = self.policy.read().map(|p| p.1).unwrap_or(-1);
        let Some(active) = Self::active_policy(&rows) else {
            return Ok(false);
        };
        if active.version == current {
            return Ok(false);
        }
        let engine = PolicyEngine::from_text(&active.text).map_err(|e| {
            VaultError::Internal(format!(
                "policy version {} does not load: {e}",
                active.version
            ))
        })?;
        self.swap_policy(active.version, engine);
        tracing::info!(version = active.version, "policy version in force");
        Ok(true)
    }

    /// `GET /api/policies`: the version in force and every proposal.
    ///
    /// # Errors
    /// Denied; storage and audit failures.
    pub fn policies(&self, c: &Caller) -> Result<Vec<PolicyVersion>, VaultError> {
        let _permit = self.permit_operation(c, Operation::ReadPolicies, None)?;
        let rows = self.store.policies()?;
        let mut out: Vec<PolicyVersion> = rows.iter().map(PolicyVersion::of).collect();
        out.push(PolicyVersion {
            version: 0,
            status: if Self::active_policy(&rows).is_some() {
                "superseded".into()
            } else {
                "active".into()
            },
            text: medvault_policy::DEFAULT_POLICIES.to_owned(),
            proposed_by: None,
            proposed_at: None,
            approved_by: None,
            approved_at: None,
        });
        Ok(out)
    }

    /// Checks a policy text: it parses, validates against the schema, and keeps every hard
    /// deny of the built-in set.
    fn check_policy_text(text: &str) -> Result<PolicyEngine, VaultError> {
        let engine = PolicyEngine::from_text(text)
            .map_err(|e| bad(format!("the policy set is refused: {e}")))?;
        let kept = PolicyEngine::forbid_ids(text).map_err(|e| bad(e.to_string()))?;
        let required = PolicyEngine::forbid_ids(medvault_policy::DEFAULT_POLICIES)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mine = PolicyEngine::policy_texts(text).map_err(|e| bad(e.to_string()))?;
        let builtin = PolicyEngine::policy_texts(medvault_policy::DEFAULT_POLICIES)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for (id, _) in &mine {
            if !seen.insert(id.as_str()) {
                return Err(bad(format!(
                    "two policies share the @id `{id}`; each must be unique"
                )));
            }
        }
        // A hard deny stays as written: keeping its id but changing its rule is dropping it.
        for (id, rule) in builtin.iter().filter(|(id, _)| required.contains(id)) {
            if let Some((_, theirs)) = mine.iter().find(|(i, _)| i == id) {
                if theirs != rule {
                    return Err(bad(format!(
                        "the hard deny `{id}` must stay exactly as shipped"
                    )));
                }
            }
        }
        let dropped: Vec<&String> = required.iter().filter(|id| !kept.contains(id)).collect();
        if !dropped.is_empty() {
            return Err(bad(format!(
                "the policy set drops hard denies that must stay in force: {}",
                dropped
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(engine)
    }

    /// `PUT /api/policies` (step-up): proposes a new version; nothing changes until a
    /// different security administrator approves it.
    ///
    /// # Errors
    /// Denied, `StepUpRequired`, `BadRequest` (does not parse or validate, drops a hard
    /// deny, larger than 256 KiB).
    pub fn propose_policy(&self, c: &Caller, text: &str) -> Result<i64, VaultError> {
        let Some(mut rec) = self.operate(c, Operation::ProposePolicy, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        if text.len() > 256 * 1024 {
            return Err(bad("the policy set is larger than 256 KiB"));
        }
        if let Err(e) = Self::check_policy_text(text) {
            rec.outcome = Outcome::Failure;
            rec.detail = Some("refused: does not validate".into());
            self.audit(vec![rec])?;
            return Err(e);
        }
        let version = self.store.policies()?.first().map_or(1, |r| r.version + 1);
        let digest = medvault_crypto::sha256_hex(text.as_bytes());
        rec.detail = Some(format!("version={version} sha256={digest}"));
        self.commit(
            vec![Op::ProposePolicy(PolicyRow {
                version,
                text: text.to_owned(),
                proposed_by: c.actor().to_owned(),
                proposed_at: self.clock.now().unix_timestamp(),
                status: "proposed".into(),
                approved_by: String::new(),
                approved_at: 0,
            })],
            vec![rec],
        )?;
        Ok(version)
    }

    /// `POST /api/policies/{version}/approve` (step-up; never the proposer): puts a
    /// proposed version in force, here at once and on every server within a second.
    ///
    /// # Errors
    /// Denied (including approving one's own proposal), `StepUpRequired`, `NotFound`,
    /// `Conflict` (not a pending proposal).
    pub fn approve_policy(&self, c: &Caller, version: i64) -> Result<(), VaultError> {
        let Some(mut rec) = self.operate(c, Operation::ApprovePolicy, None)? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("version={version}"));
        let Some(row) = self
            .store
            .policies()?
            .into_iter()
            .find(|r| r.version == version)
        else {
            rec.outcome = Outcome::NotFound;
            self.audit(vec![rec])?;
            return Err(VaultError::NotFound);
        };
        if row.proposed_by == c.actor() {
            rec.outcome = Outcome::Denied;
            rec.detail = Some(format!("version={version} refused: one's own proposal"));
            self.audit(vec![rec])?;
            return Err(VaultError::SeparationOfDuties(
                "a proposal is approved by a security administrator other than its proposer",
            ));
        }
        // Nor an account the proposer made or promoted (a second administrator who is the
        // same person is no second person): the audit log says who created whom.
        let me = format!("target={} ", c.actor());
        let me_end = format!("target={}", c.actor());
        let made_by_proposer = self.scan_back(1, |_, r| {
            let about_me = r
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with(&me) || d == me_end);
            (matches!(r.action.as_str(), "user.create" | "user.role")
                && r.outcome == Outcome::Success
                && r.actor == row.proposed_by
                && about_me)
                .then_some(())
        })?;
        if !made_by_proposer.is_empty() {
            rec.outcome = Outcome::Denied;
            rec.detail = Some(format!(
                "version={version} refused: the approver's account was made by the proposer"
            ));
            self.audit(vec![rec])?;
            return Err(VaultError::SeparationOfDuties(
                "an account the proposer created or promoted cannot approve their proposal",
            ));
        }
        if row.status != "proposed" {
            return Err(VaultError::Duplicate(
                "this version is not a pending proposal".into(),
            ));
        }
        let in_force = self.policy.read().map(|p| p.1).unwrap_or(0);
        if version < in_force {
            return Err(VaultError::Duplicate(format!(
                "version {version} is older than version {in_force} in force; propose it again to bring it back"
            )));
        }
        let engine = Self::check_policy_text(&row.text)?;
        self.commit(
            vec![Op::ApprovePolicy {
                version,
                approved_by: c.actor().to_owned(),
                approved_at: self.clock.now().unix_timestamp(),
            }],
            vec![rec],
        )?;
        self.swap_policy(version, engine);
        Ok(())
    }

    /// `medvault policy test FILE`: decides each case against the set in force, or against
    /// `text` (a proposal), naming the deciding policies.
    ///
    /// # Errors
    /// `BadRequest` naming the case that cannot be understood; a `text` that is refused.
    pub fn policy_test(
        &self,
        _operator: &LocalOperator,
        cases: &[PolicyCase],
        text: Option<&str>,
    ) -> Result<Vec<CaseResult>, VaultError> {
        if cases.is_empty() {
            return Err(bad("the file holds no cases"));
        }
        let engine = match text {
            Some(t) => Arc::new(Self::check_policy_text(t)?),
            None => self.policy(),
        };
        let mut out = vec![];
        for (i, k) in cases.iter().enumerate() {
            let at = |m: String| bad(format!("case {}: {m}", i + 1));
            let (role, training) = match (&k.user, &k.role) {
                (Some(_), Some(_)) => return Err(at("name a `user` or a `role`, not both".into())),
                (Some(u), None) => {
                    let row = self
                        .store
                        .user(u)?
                        .ok_or_else(|| at(format!("no user `{u}`")))?;
                    let role: Role = row.role.parse().map_err(|_| at("unknown role".into()))?;
                    (role, row.training_current)
                }
                (None, Some(r)) => (r.parse::<Role>().map_err(|e| at(e.to_string()))?, true),
                (None, None) => return Err(at("name a `user` or a `role`".into())),
            };
            let purpose = match &k.purpose {
                Some(p) => p.parse::<Purpose>().map_err(|e| at(e.to_string()))?,
                None => role.default_purpose(),
            };
            let relationship = match k.relationship.as_deref().unwrap_or("treatment") {
                "none" => Relationship::None,
                "treatment" => Relationship::Treatment,
                "break-glass" => Relationship::BreakGlass,
                "emergency" => Relationship::Emergency,
                "self" => Relationship::Own,
                "proxy" => Relationship::Proxy,
                other => return Err(at(format!("unknown relationship `{other}`"))),
            };
            let target = match (k.action.parse::<Action>(), &k.resource) {
                (Ok(a), Some(r)) => Target::Records(a, category_of(r).map_err(at)?),
                (Ok(_), None) => return Err(at("a record action needs a `resource`".into())),
                (Err(_), _) => Target::Operation(
                    k.action
                        .parse::<Operation>()
                        .map_err(|_| at(format!("unknown action `{}`", k.action)))?,
                ),
            };
            let expected = match k.expect.as_str() {
                "allow" | "deny" => k.expect.clone(),
                other => return Err(at(format!("expect must be allow or deny, not `{other}`"))),
            };
            let d = engine.decide_fresh(Query {
                asker: Asker::User(role),
                target,
                purpose,
                public_transparency: self.options.public_transparency,
                relationship,
                training_current: k.training_current.unwrap_or(training),
                privacy: PrivacyFacts {
                    consent_denied: k.consent_denied,
                    restricted: k.restricted,
                    psychotherapy: k.psychotherapy,
                    withheld_from_patient: k.withheld_from_patient,
                },
            });
            let decided = if d.allowed() { "allow" } else { "deny" };
            out.push(CaseResult {
                case: format!(
                    "{} {} {}{} {} {}",
                    k.user.clone().unwrap_or_else(|| role.to_string()),
                    k.action,
                    k.resource
                        .clone()
                        .map(|r| format!("{r} "))
                        .unwrap_or_default(),
                    purpose,
                    relationship.as_str(),
                    if relationship == Relationship::Emergency {
                        "(emergency)"
                    } else {
                        ""
                    }
                )
                .trim_end()
                .to_owned(),
                passed: decided == expected,
                expected,
                decided: decided.to_owned(),
                policies: d.policies().to_vec(),
            });
        }
        Ok(out)
    }
}

/// A data category by name, or the one category of a resource type.
fn category_of(name: &str) -> Result<Category, String> {
    if let Ok(c) = name.parse::<Category>() {
        return Ok(c);
    }
    let rt = medvault_fhir::ResourceType::parse(name)
        .ok_or_else(|| format!("`{name}` is neither a data category nor a resource type"))?;
    match medvault_fhir::categories_of_type(rt) {
        [one] => Ok(*one),
        many => Err(format!(
            "{name} records fall in several categories ({}): name one",
            many.iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
