//! medvault-policy — authorization decisions with Cedar.
//!
//! A decision takes (who asks, what action on which resource, purpose of use, whether
//! public transparency is on) and answers allow or deny with the deciding policy ids.
//! Every action of the gate is a Cedar action here — records by data category, and every
//! [`Operation`] (audit views, reports, disclosures, export, status, key eviction,
//! transparency reads, user administration) — so "who may do X" is answered by the
//! `.cedar` files alone. Default deny (law 3): no permit, a forbid, an
//! evaluation error, or a policy set that fails schema validation all mean deny.
//! This room must never see PHI, never touch storage, and never allow on error.
//! INVARIANT: the Cedar request is built from exactly the fields of [`Query`], and the
//! entities given to Cedar carry nothing else, so caching decisions by `Query` is exact.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::RwLock;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use medvault_types::{Action, Category, Operation, Purpose, Role};

pub const DEFAULT_POLICIES: &str = include_str!("../policies/default.cedar");
pub const SCHEMA: &str = include_str!("../policies/medvault.cedarschema");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy syntax: {0}")]
    Parse(String),
    #[error("policy does not validate against the schema: {0}")]
    Validation(String),
    #[error("schema: {0}")]
    Schema(String),
}

/// Who is asking: a signed-in user in a role, or an anonymous caller (the public
/// transparency endpoints). Cedar entity `User` in `Role::"…"`, or `Anonymous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asker {
    User(Role),
    Anonymous,
    /// A backend service client: the categories its scopes let it read and write.
    Client {
        read: CategorySet,
        write: CategorySet,
    },
    /// A SMART app acting for a signed-in user in `role` (SMART App Launch 2.0): decided
    /// as that user by the policies, then narrowed to the categories its scopes let it
    /// read — never wider than the user's own decision, never a write, never an
    /// operation. The narrowing is here, not in the editable policy set, so no policy
    /// version can let a scope widen access.
    App {
        role: Role,
        read: CategorySet,
    },
}

/// A set of data categories, compact enough to key the decision cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CategorySet(u32);

impl CategorySet {
    pub fn insert(&mut self, c: Category) {
        if let Some(i) = Category::ALL.iter().position(|x| *x == c) {
            self.0 |= 1 << i;
        }
    }
    pub fn contains(self, c: Category) -> bool {
        Category::ALL
            .iter()
            .position(|x| *x == c)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
    fn members(self) -> impl Iterator<Item = Category> {
        Category::ALL
            .iter()
            .copied()
            .filter(move |c| self.contains(*c))
    }
}

/// The deciding "policy" named when a SMART app's scopes, not a policy, deny a request.
pub const SMART_SCOPES: &str = "smart-app-scopes";

/// What is asked for: an action on a chart's records of one data category (Cedar resource
/// `Category::"…"`), or an operation of the gate (Cedar resource `Service::"medvault"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Records(Action, Category),
    Operation(Operation),
}

/// How the asker reaches the chart a record belongs to (Cedar `context.relationship`):
/// SPEC "Access control".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Relationship {
    /// No treatment relationship and no emergency grant (also: no chart, or an operation).
    #[default]
    None,
    /// A care team or an encounter within ±30 days links the asker's Practitioner to the
    /// patient (`"treatment"`).
    Treatment,
    /// A live break-the-glass grant for this patient (`"break-glass"`).
    BreakGlass,
    /// A live break-the-glass grant for a medical emergency (`"break-glass"` with
    /// `context.emergency`): what a consent deny and most sensitivity labels yield to.
    Emergency,
    /// A patient portal account's own chart (`"self"`).
    Own,
    /// A chart a portal account is a proxy for — a guardian, a caregiver (`"proxy"`).
    Proxy,
}

impl Relationship {
    /// The Cedar value.
    pub fn as_str(self) -> &'static str {
        match self {
            Relationship::None => "none",
            Relationship::Treatment => "treatment",
            Relationship::BreakGlass | Relationship::Emergency => "break-glass",
            Relationship::Own => "self",
            Relationship::Proxy => "proxy",
        }
    }
}

/// What is being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Query {
    pub asker: Asker,
    pub target: Target,
    pub purpose: Purpose,
    /// Whether `audit.public_transparency` is on (Cedar `context.public_transparency`).
    pub public_transparency: bool,
    /// How the asker reaches the record's chart (Cedar `context.relationship`).
    pub relationship: Relationship,
    /// Whether the asker's required training is current (Cedar `context.training_current`;
    /// true for callers without training, such as service clients and the server).
    pub training_current: bool,
    /// Privacy facts of the record (Cedar `context.consent_denied`, `context.restricted`,
    /// `context.psychotherapy`).
    pub privacy: PrivacyFacts,
}

/// What a record's security labels and its patient's privacy consents say about this asker
/// (SPEC "Access control"), as found by the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PrivacyFacts {
    /// A patient-privacy Consent denies the asker this record (its category, one of its
    /// labels, or everything).
    pub consent_denied: bool,
    /// The record (or its patient) carries a sensitivity or confidentiality label no
    /// consent grants the asker — other than psychotherapy notes.
    pub restricted: bool,
    /// The record (or its patient) is labelled psychotherapy notes (`PSYTHPN`) without a
    /// grant.
    pub psychotherapy: bool,
    /// A clinician marked the record to be withheld from the patient portal.
    pub withheld_from_patient: bool,
}

impl Query {
    /// A user in `role`, with current training, acting on records of `category` of a
    /// chart reached through `relationship`, for `purpose`.
    pub fn records(
        role: Role,
        action: Action,
        category: Category,
        purpose: Purpose,
        relationship: Relationship,
    ) -> Self {
        Query {
            asker: Asker::User(role),
            target: Target::Records(action, category),
            purpose,
            public_transparency: false,
            relationship,
            training_current: true,
            privacy: PrivacyFacts::default(),
        }
    }

    /// `asker` performing an operation of the gate.
    pub fn operation(
        asker: Asker,
        op: Operation,
        purpose: Purpose,
        public_transparency: bool,
    ) -> Self {
        Query {
            asker,
            target: Target::Operation(op),
            purpose,
            public_transparency,
            relationship: Relationship::None,
            training_current: true,
            privacy: PrivacyFacts::default(),
        }
    }
}

/// The answer, with the policies that decided it. Made only by [`PolicyEngine::decide`]
/// (private fields), so a permission cannot be forged by the code that acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    policies: Vec<String>,
}

impl Decision {
    /// Whether the request is permitted.
    pub fn allowed(&self) -> bool {
        self.allowed
    }
    /// The `@id`s of the policies that decided (the permits for an allow, the forbids if a
    /// forbid denied; empty for a default deny).
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
}

/// A validated Cedar policy set with a decision cache.
pub struct PolicyEngine {
    policies: PolicySet,
    authorizer: Authorizer,
    cache: RwLock<HashMap<Query, Decision>>,
}

fn uid(ty: &str, id: &str) -> Option<EntityUid> {
    let t = EntityTypeName::from_str(ty).ok()?;
    Some(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

impl PolicyEngine {
    /// A policy set that allows nothing (what a server falls back to rather than guess).
    pub fn deny_all() -> Self {
        PolicyEngine {
            policies: PolicySet::new(),
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The built-in policies.
    pub fn with_defaults() -> Result<Self, PolicyError> {
        Self::from_text(DEFAULT_POLICIES)
    }

    /// Parses and validates (strictly, against the schema) a policy set.
    pub fn from_text(src: &str) -> Result<Self, PolicyError> {
        let policies = PolicySet::from_str(src).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let (schema, _) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| PolicyError::Schema(e.to_string()))?;
        let result = Validator::new(schema).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let msg: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            return Err(PolicyError::Validation(msg.join("; ")));
        }
        Ok(PolicyEngine {
            policies,
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Each policy's `@id` and its text (Cedar's own rendering, so whitespace and comments
    /// do not matter), in order.
    ///
    /// # Errors
    /// `Parse` for text that is not Cedar.
    pub fn policy_texts(src: &str) -> Result<Vec<(String, String)>, PolicyError> {
        let set = PolicySet::from_str(src).map_err(|e| PolicyError::Parse(e.to_string()))?;
        Ok(set
            .policies()
            .map(|p| {
                let id = p
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| p.id().to_string());
                let mut body = p.clone();
                // Compare the rule, not its annotations' formatting.
                body = body.new_id(cedar_policy::PolicyId::new("p"));
                (id, body.to_string())
            })
            .collect())
    }

    /// The `@id`s of the `forbid` policies of a policy text: its hard denies.
    ///
    /// # Errors
    /// `Parse` for text that is not Cedar.
    pub fn forbid_ids(src: &str) -> Result<Vec<String>, PolicyError> {
        let set = PolicySet::from_str(src).map_err(|e| PolicyError::Parse(e.to_string()))?;
        Ok(set
            .policies()
            .filter(|p| p.effect() == cedar_policy::Effect::Forbid)
            .map(|p| {
                p.annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| p.id().to_string())
            })
            .collect())
    }

    /// Decides one query. Never errors: anything unexpected is a deny.
    pub fn decide(&self, q: Query) -> Decision {
        if let Some(d) = self.cache.read().ok().and_then(|c| c.get(&q).cloned()) {
            return d;
        }
        let d = self.evaluate(q).unwrap_or(Decision {
            allowed: false,
            policies: vec![],
        });
        if let Ok(mut c) = self.cache.write() {
            c.insert(q, d.clone());
        }
        d
    }

    /// Decides one query by evaluating the policies afresh, bypassing the decision cache:
    /// the explain mode, and the benchmark's measure of one Cedar evaluation.
    pub fn decide_fresh(&self, q: Query) -> Decision {
        self.evaluate(q).unwrap_or(Decision {
            allowed: false,
            policies: vec![],
        })
    }

    fn evaluate(&self, q: Query) -> Option<Decision> {
        if let Asker::App { role, read } = q.asker {
            let within_scopes = match q.target {
                Target::Records(Action::Read | Action::Search, category) => read.contains(category),
                _ => false,
            };
            let as_user = self.evaluate(Query {
                asker: Asker::User(role),
                ..q
            })?;
            return Some(if within_scopes {
                as_user
            } else {
                Decision {
                    allowed: false,
                    policies: vec![SMART_SCOPES.to_owned()],
                }
            });
        }
        let (principal, entities) = match q.asker {
            Asker::User(role) => {
                let role = uid("Role", role.as_str())?;
                let user = uid("User", "principal")?;
                let entity =
                    Entity::new_no_attrs(user.clone(), [role.clone()].into_iter().collect());
                let entities = Entities::from_entities(
                    [entity, Entity::new_no_attrs(role, Default::default())],
                    None,
                )
                .ok()?;
                (user, entities)
            }
            // Decided above, as the user it acts for.
            Asker::App { .. } => return None,
            Asker::Anonymous => (uid("Anonymous", "anonymous")?, Entities::empty()),
            Asker::Client { read, write } => {
                let client = uid("Client", "client")?;
                let set = |s: CategorySet| -> Option<RestrictedExpression> {
                    let ids = s
                        .members()
                        .map(|c| {
                            uid("Category", c.as_str()).map(RestrictedExpression::new_entity_uid)
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some(RestrictedExpression::new_set(ids))
                };
                let attrs = [
                    ("read".to_owned(), set(read)?),
                    ("write".to_owned(), set(write)?),
                ]
                .into_iter()
                .collect();
                let entity = Entity::new(client.clone(), attrs, Default::default()).ok()?;
                let cats = Category::ALL.iter().filter_map(|c| {
                    uid("Category", c.as_str()).map(|u| Entity::new_no_attrs(u, Default::default()))
                });
                let entities =
                    Entities::from_entities(std::iter::once(entity).chain(cats), None).ok()?;
                (client, entities)
            }
        };
        let (action, resource) = match q.target {
            Target::Records(action, category) => (
                uid("Action", action.as_str())?,
                uid("Category", category.as_str())?,
            ),
            Target::Operation(op) => (uid("Action", op.as_str())?, uid("Service", "medvault")?),
        };
        let context = Context::from_pairs([
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(q.purpose.as_str().to_owned()),
            ),
            (
                "public_transparency".to_owned(),
                RestrictedExpression::new_bool(q.public_transparency),
            ),
            (
                "relationship".to_owned(),
                RestrictedExpression::new_string(q.relationship.as_str().to_owned()),
            ),
            (
                "training_current".to_owned(),
                RestrictedExpression::new_bool(q.training_current),
            ),
            (
                "emergency".to_owned(),
                RestrictedExpression::new_bool(q.relationship == Relationship::Emergency),
            ),
            (
                "consent_denied".to_owned(),
                RestrictedExpression::new_bool(q.privacy.consent_denied),
            ),
            (
                "restricted".to_owned(),
                RestrictedExpression::new_bool(q.privacy.restricted),
            ),
            (
                "psychotherapy".to_owned(),
                RestrictedExpression::new_bool(q.privacy.psychotherapy),
            ),
            (
                "withheld_from_patient".to_owned(),
                RestrictedExpression::new_bool(q.privacy.withheld_from_patient),
            ),
        ])
        .ok()?;
        let req = Request::new(principal, action, resource, context, None).ok()?;
        let resp = self
            .authorizer
            .is_authorized(&req, &self.policies, &entities);
        // INVARIANT: any evaluation error is a deny, even if some policy permitted.
        let errored = resp.diagnostics().errors().next().is_some();
        let policies: Vec<String> = resp.diagnostics().reason().map(|p| p.to_string()).collect();
        let policies = policies
            .into_iter()
            .map(|id| {
                self.policies
                    .policy(&cedar_policy::PolicyId::new(&id))
                    .and_then(|p| p.annotation("id").map(str::to_owned))
                    .unwrap_or(id)
            })
            .collect();
        Some(Decision {
            allowed: resp.decision() == CedarDecision::Allow && !errored,
            policies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(e: &PolicyEngine, role: Role, action: Action, cat: Category) -> bool {
        e.decide(Query::records(
            role,
            action,
            cat,
            role.default_purpose(),
            Relationship::Treatment,
        ))
        .allowed()
    }

    #[test]
    fn the_seed_role_matrix_holds() {
        let e = PolicyEngine::with_defaults().unwrap();
        use Action::*;
        use Category::{Demographics, Directory, Medications, Notes, Problems, Vitals};
        use Role::{Auditor, FrontDesk, Importer, Nurse, Physician, PrivacyOfficer, SecurityAdmin};
        assert!(allowed(&e, Nurse, Read, Vitals) && allowed(&e, Nurse, Read, Medications));
        assert!(!allowed(&e, Nurse, Read, Category::Billing));
        assert!(
            allowed(&e, Role::Billing, Read, Category::Billing)
                && allowed(&e, Role::Billing, Read, Demographics)
        );
        assert!(
            !allowed(&e, Role::Billing, Read, Vitals) && !allowed(&e, Role::Billing, Read, Notes)
        );
        assert!(
            allowed(&e, FrontDesk, Create, Demographics)
                && allowed(&e, FrontDesk, Read, Demographics)
        );
        for c in Category::ALL
            .iter()
            .filter(|c| ![Demographics, Directory, Category::Consents].contains(*c))
        {
            assert!(
                !allowed(&e, FrontDesk, Read, *c),
                "front desk must not read {c}"
            );
        }
        for r in [SecurityAdmin, PrivacyOfficer, Auditor, Importer] {
            for c in Category::ALL.iter().filter(|c| **c != Directory) {
                assert!(!allowed(&e, r, Read, *c), "{r} must not read {c}");
                assert!(!allowed(&e, r, Search, *c), "{r} must not search {c}");
            }
        }
        assert!(allowed(&e, Physician, Create, Problems));
        assert!(!allowed(&e, Physician, Read, Category::Billing));
    }

    /// One precedence (docs/design/0006): hard denies > consent deny (yields only to a
    /// medical emergency) > sensitivity labels (a grant, or an emergency) > treatment
    /// relationship > role × category ∩ purpose of use.
    #[test]
    fn precedence_hard_denies_consent_labels_relationship_role() {
        let e = PolicyEngine::with_defaults().unwrap();
        let ask = |role, rel, privacy: PrivacyFacts, training: bool| {
            let mut q = Query::records(role, Action::Read, Category::Notes, Purpose::Treat, rel);
            q.privacy = privacy;
            q.training_current = training;
            e.decide(q)
        };
        use Relationship::{BreakGlass, Emergency, Treatment};
        let none = PrivacyFacts::default();
        let consent = PrivacyFacts {
            consent_denied: true,
            ..none
        };
        let label = PrivacyFacts {
            restricted: true,
            ..none
        };
        let psy = PrivacyFacts {
            psychotherapy: true,
            ..none
        };
        let p = Role::Physician;
        assert!(ask(p, Treatment, none, true).allowed());
        assert!(
            !ask(p, Relationship::None, none, true).allowed(),
            "relationship"
        );
        let d = ask(p, Treatment, consent, true);
        assert!(!d.allowed() && d.policies() == ["consent-deny"], "{d:?}");
        assert!(
            !ask(p, BreakGlass, consent, true).allowed(),
            "only an emergency"
        );
        assert!(ask(p, Emergency, consent, true).allowed());
        let d = ask(p, Treatment, label, true);
        assert!(!d.allowed() && d.policies() == ["sensitive-records-need-a-grant"]);
        assert!(ask(p, Emergency, label, true).allowed());
        assert!(
            !ask(p, Emergency, psy, true).allowed(),
            "psychotherapy notes: never by emergency"
        );
        assert!(!ask(p, Treatment, none, false).allowed(), "training lapsed");
        assert!(
            ask(p, Emergency, none, false).allowed(),
            "except an emergency"
        );
        assert!(
            !ask(Role::Billing, Emergency, none, true).allowed(),
            "clinical roles only"
        );
        let mut billing = Query::records(
            Role::Billing,
            Action::Read,
            Category::Billing,
            Purpose::Payment,
            Relationship::None,
        );
        assert!(e.decide(billing).allowed());
        billing.privacy = psy;
        assert!(
            !e.decide(billing).allowed(),
            "psychotherapy notes never to billing"
        );
    }

    #[test]
    fn purpose_matters_and_decisions_name_policies() {
        let e = PolicyEngine::with_defaults().unwrap();
        let q = Query::records(
            Role::Nurse,
            Action::Read,
            Category::Vitals,
            Purpose::Research,
            Relationship::Treatment,
        );
        assert!(!e.decide(q).allowed());
        let d = e.decide(Query {
            purpose: Purpose::Treat,
            ..q
        });
        assert!(d.allowed());
        assert_eq!(d.policies(), ["nurse-chart-read".to_owned()]);
    }

    #[test]
    fn default_deny_and_forbid_wins() {
        let e = PolicyEngine::from_text("").unwrap();
        let q = Query::records(
            Role::Physician,
            Action::Read,
            Category::Vitals,
            Purpose::Treat,
            Relationship::Treatment,
        );
        assert!(!e.decide(q).allowed(), "no policy means deny");
        let e = PolicyEngine::from_text(
            "permit(principal, action, resource); forbid(principal in Role::\"security_admin\", action, resource);",
        )
        .unwrap();
        assert!(!e
            .decide(Query {
                asker: Asker::User(Role::SecurityAdmin),
                ..q
            })
            .allowed());
        assert!(e.decide(q).allowed());
    }

    #[test]
    fn unknown_attributes_are_rejected_at_load() {
        let bad = "permit(principal, action, resource) when { context.mood == \"good\" };";
        assert!(matches!(
            PolicyEngine::from_text(bad),
            Err(PolicyError::Validation(_))
        ));
        assert!(matches!(
            PolicyEngine::from_text("permit(principal"),
            Err(PolicyError::Parse(_))
        ));
    }

    /// Who may do what, read from the `.cedar` files: every action of the gate, with the
    /// roles (under their default purpose of use) and anonymous callers it allows.
    fn who_may(e: &PolicyEngine) -> String {
        let mut out = String::new();
        let askers = |target: Target, public: bool, relationship: Relationship| -> Vec<String> {
            let mut who: Vec<String> = Role::ALL
                .iter()
                .filter(|r| {
                    e.decide(Query {
                        asker: Asker::User(**r),
                        target,
                        purpose: r.default_purpose(),
                        public_transparency: public,
                        relationship,
                        training_current: true,
                        privacy: PrivacyFacts::default(),
                    })
                    .allowed()
                })
                .map(|r| r.as_str().to_owned())
                .collect();
            let anonymous = e.decide(Query {
                asker: Asker::Anonymous,
                target,
                purpose: Purpose::Operations,
                public_transparency: public,
                relationship,
                training_current: true,
                privacy: PrivacyFacts::default(),
            });
            if anonymous.allowed() {
                who.push("anonymous".into());
            }
            who
        };
        // Records: with a treatment relationship, and where it differs, without one and
        // under break-the-glass.
        for a in Action::ALL {
            for c in Category::ALL {
                let target = Target::Records(*a, *c);
                let who = askers(target, false, Relationship::Treatment);
                out.push_str(&format!("{a} {c}: {}", who.join(" ")));
                for (label, r) in [
                    ("no relationship", Relationship::None),
                    ("break-glass", Relationship::BreakGlass),
                    ("own chart", Relationship::Own),
                    ("proxy", Relationship::Proxy),
                ] {
                    let other = askers(target, false, r);
                    if other != who {
                        out.push_str(&format!(" | {label}: {}", other.join(" ")));
                    }
                }
                out.push('\n');
            }
        }
        for op in Operation::ALL {
            let who = askers(Target::Operation(*op), false, Relationship::None);
            let public = askers(Target::Operation(*op), true, Relationship::None);
            out.push_str(&format!("{op}: {}", who.join(" ")));
            if public != who {
                out.push_str(&format!(" | public transparency: {}", public.join(" ")));
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn a_service_client_gets_exactly_its_scopes() {
        let e = PolicyEngine::with_defaults().unwrap();
        let mut read = CategorySet::default();
        read.insert(Category::Vitals);
        read.insert(Category::Labs);
        let mut write = CategorySet::default();
        write.insert(Category::Labs);
        let ask = |action, category| {
            e.decide(Query {
                asker: Asker::Client { read, write },
                target: Target::Records(action, category),
                purpose: Purpose::Operations,
                public_transparency: false,
                relationship: Relationship::None,
                training_current: true,
                privacy: PrivacyFacts::default(),
            })
            .allowed
        };
        assert!(ask(Action::Read, Category::Vitals));
        assert!(ask(Action::Search, Category::Labs));
        assert!(ask(Action::Create, Category::Labs));
        assert!(!ask(Action::Create, Category::Vitals), "read scope only");
        assert!(!ask(Action::Delete, Category::Labs), "never delete");
        assert!(!ask(Action::Read, Category::Notes), "outside its scopes");
        assert!(!ask(Action::Read, Category::Directory));
        let op = e.decide(Query::operation(
            Asker::Client { read, write },
            Operation::AuditEntries,
            Purpose::Operations,
            false,
        ));
        assert!(!op.allowed, "no operation of the gate");
    }

    /// The whole access table of the shipped policies. A change to the `.cedar` files that
    /// changes who may do anything fails here and shows the new table to review.
    #[test]
    fn every_action_of_the_gate_and_who_may_do_it() {
        let e = PolicyEngine::with_defaults().unwrap();
        let table = who_may(&e);
        let expected: String = include_str!("../policies/who-may.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        if table != expected {
            println!("{table}");
        }
        assert_eq!(table, expected, "the policies changed who may do what");
        // Every operation is reachable by someone, and nothing is open to anonymous callers
        // unless public transparency is on (the verifier key aside).
        for op in Operation::ALL {
            assert!(table.contains(&format!("{op}: ")), "{op} missing");
        }
        for line in table.lines().filter(|l| !l.starts_with("audit.key")) {
            let before_public = line.split(" | ").next().unwrap_or("");
            assert!(!before_public.contains("anonymous"), "{line}");
        }
    }

    #[test]
    fn anonymous_callers_get_nothing_but_public_transparency() {
        let e = PolicyEngine::with_defaults().unwrap();
        for public in [false, true] {
            for a in Action::ALL {
                for c in Category::ALL {
                    let q = Query {
                        asker: Asker::Anonymous,
                        target: Target::Records(*a, *c),
                        purpose: Purpose::Treat,
                        public_transparency: public,
                        relationship: Relationship::BreakGlass,
                        training_current: true,
                        privacy: PrivacyFacts::default(),
                    };
                    assert!(!e.decide(q).allowed(), "anonymous {a} {c}");
                }
            }
        }
        let proof = |public| {
            e.decide(Query::operation(
                Asker::Anonymous,
                Operation::Proof,
                Purpose::Operations,
                public,
            ))
            .allowed()
        };
        assert!(!proof(false) && proof(true));
    }
}
