//! medvault-policy — authorization decisions with Cedar.
//!
//! A decision takes (role, action, data category, purpose of use) and answers allow or
//! deny with the deciding policy ids. Default deny (law 3): no permit, a forbid, an
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
use medvault_types::{Action, Category, Purpose, Role};

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

/// What is being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Query {
    pub role: Role,
    pub action: Action,
    pub category: Category,
    pub purpose: Purpose,
}

/// The answer, with the policies that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub policies: Vec<String>,
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

    fn evaluate(&self, q: Query) -> Option<Decision> {
        let role = uid("Role", q.role.as_str())?;
        let user = uid("User", "principal")?;
        let principal = Entity::new_no_attrs(user.clone(), [role.clone()].into_iter().collect());
        let entities = Entities::from_entities(
            [principal, Entity::new_no_attrs(role, Default::default())],
            None,
        )
        .ok()?;
        let action = uid("Action", q.action.as_str())?;
        let resource = uid("Category", q.category.as_str())?;
        let context = Context::from_pairs([(
            "purpose".to_owned(),
            RestrictedExpression::new_string(q.purpose.as_str().to_owned()),
        )])
        .ok()?;
        let req = Request::new(user, action, resource, context, None).ok()?;
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

    /// The categories a role may act on for a purpose.
    pub fn allowed_categories(
        &self,
        role: Role,
        action: Action,
        purpose: Purpose,
    ) -> Vec<Category> {
        Category::ALL
            .iter()
            .copied()
            .filter(|c| {
                self.decide(Query {
                    role,
                    action,
                    category: *c,
                    purpose,
                })
                .allowed
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(e: &PolicyEngine, role: Role, action: Action, cat: Category) -> bool {
        e.decide(Query {
            role,
            action,
            category: cat,
            purpose: role.default_purpose(),
        })
        .allowed
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
            .filter(|c| **c != Demographics && **c != Directory)
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

    #[test]
    fn purpose_matters_and_decisions_name_policies() {
        let e = PolicyEngine::with_defaults().unwrap();
        let q = Query {
            role: Role::Nurse,
            action: Action::Read,
            category: Category::Vitals,
            purpose: Purpose::Research,
        };
        assert!(!e.decide(q).allowed);
        let d = e.decide(Query {
            purpose: Purpose::Treat,
            ..q
        });
        assert!(d.allowed);
        assert_eq!(d.policies, vec!["nurse-chart-read".to_owned()]);
    }

    #[test]
    fn default_deny_and_forbid_wins() {
        let e = PolicyEngine::from_text("").unwrap();
        let q = Query {
            role: Role::Physician,
            action: Action::Read,
            category: Category::Vitals,
            purpose: Purpose::Treat,
        };
        assert!(!e.decide(q).allowed, "no policy means deny");
        let e = PolicyEngine::from_text(
            "permit(principal, action, resource); forbid(principal in Role::\"security_admin\", action, resource);",
        )
        .unwrap();
        assert!(
            !e.decide(Query {
                role: Role::SecurityAdmin,
                ..q
            })
            .allowed
        );
        assert!(e.decide(q).allowed);
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
}
