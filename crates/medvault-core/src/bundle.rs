//! Transaction Bundles (`POST /fhir`) and imports: the Bundle parsed and validated whole
//! (`medvault_fhir::bundle`), its conditional entries resolved through the gate's search,
//! every entry planned through the gate, then one all-or-nothing commit with every entry's
//! audit record.

use medvault_fhir::bundle::{parse_transaction, Method, Target};
use medvault_store::Expect;
use medvault_types::Action;
use serde_json::Value;

use crate::search::Matched;
use crate::write::{Plan, Precondition};
use crate::{Caller, Outcome, Vault, VaultError, Written};

/// One entry's outcome in a transaction-response Bundle.
#[derive(Debug, Clone)]
pub struct EntryResult {
    pub status: &'static str,
    pub written: Option<Written>,
    pub location: String,
}

fn bad(msg: &str) -> VaultError {
    VaultError::BadRequest(msg.into())
}

const MANY: &str = "the conditional search matches more than one resource";

impl Vault {
    /// Applies a transaction (or, for `import`, a collection) Bundle all-or-nothing; the
    /// results are in the Bundle's entry order. Conditional creates that find their match
    /// write nothing and answer `200 OK` with it; `ifMatch`/`ifNoneMatch` follow the rules
    /// of the `If-Match`/`If-None-Match` headers (a failed one fails the transaction: 412).
    /// `bodies`: read each written resource back (when the caller may) for a
    /// `Prefer: return=representation` response; imports and minimal responses skip it.
    pub fn transaction(
        &self,
        c: &Caller,
        bundle: Value,
        action: &str,
        bodies: bool,
    ) -> Result<Vec<EntryResult>, VaultError> {
        let mut parsed = parse_transaction(bundle, action == "import")?;
        // Resolve what each entry writes or finds before references are bound to it.
        let mut found: Vec<(usize, Written)> = vec![];
        let mut conditions: std::collections::HashMap<(String, String), usize> =
            std::collections::HashMap::new();
        for e in &mut parsed.entries {
            // Each conditional write is authorized before its search runs (as over HTTP).
            if let (Some(r), true) = (
                &e.resource,
                e.if_none_exist.is_some() || matches!(e.target, Some(Target::Search(..))),
            ) {
                let action = if e.method == Method::Post {
                    Action::Create
                } else {
                    Action::Update
                };
                self.may_write(c, action, r.rtype(), "", r.category(), None)?;
            }
            let condition = match (&e.target, &e.if_none_exist, &e.resource) {
                (Some(Target::Search(rt, q)), _, _) => Some((rt.as_str().to_owned(), q.clone())),
                (_, Some(q), Some(r)) => Some((r.rtype().as_str().to_owned(), q.clone())),
                _ => None,
            };
            if let Some(key) = condition {
                if let Some(first) = conditions.insert(key, e.index) {
                    return Err(VaultError::BadRequest(format!(
                        "Bundle.entry[{first}] and Bundle.entry[{}] have the same conditional search",
                        e.index
                    )));
                }
            }
            match (e.method, &e.target, &e.if_none_exist) {
                (Method::Post, _, Some(q)) => {
                    let (rt, category) = e
                        .resource
                        .as_ref()
                        .map(|r| (r.rtype(), r.category()))
                        .ok_or_else(|| bad("missing resource"))?;
                    match self.match_condition(c, rt, q, category)? {
                        Matched::None => e.id = Some(medvault_types::random_uuid()),
                        Matched::One(d) => {
                            e.id = Some(d.id().to_owned());
                            found.push((e.index, Written::found(d)));
                        }
                        Matched::Many => return Err(VaultError::PreconditionFailed(MANY)),
                    }
                }
                (Method::Post, _, None) => e.id = Some(medvault_types::random_uuid()),
                (Method::Put, Some(Target::Search(rt, q)), _) => {
                    let body_id = e.resource.as_ref().and_then(|r| r.id()).map(str::to_owned);
                    let category = e
                        .resource
                        .as_ref()
                        .map(|r| r.category())
                        .ok_or_else(|| bad("missing resource"))?;
                    match self.match_condition(c, *rt, q, category)? {
                        Matched::None if body_id.is_some() => {
                            return Err(bad(
                                "conditional update found no match and the resource has an id: update as create is not supported",
                            ))
                        }
                        Matched::None => e.id = Some(medvault_types::random_uuid()),
                        Matched::One(d) => {
                            if body_id.as_deref().is_some_and(|b| b != d.id()) {
                                return Err(bad(
                                    "the resource id differs from the resource the conditional update found",
                                ));
                            }
                            e.id = Some(d.id().to_owned());
                        }
                        Matched::Many => return Err(VaultError::PreconditionFailed(MANY)),
                    }
                }
                _ => {}
            }
        }
        let entries = parsed.bind()?;
        let mut plan = Plan::default();
        let mut results: Vec<(usize, EntryResult)> = Vec::with_capacity(entries.len());
        let answered: std::collections::HashSet<usize> = found.iter().map(|(i, _)| *i).collect();
        for (index, w) in found {
            let location = format!("{}/{}/_history/{}", w.rtype, w.id, w.version);
            results.push((
                index,
                EntryResult {
                    status: "200 OK",
                    written: Some(w),
                    location,
                },
            ));
        }
        for e in entries {
            if answered.contains(&e.index) {
                continue;
            }
            let pre = Precondition {
                if_match: e.if_match,
                if_none_match: e.if_none_match,
            };
            if e.method == Method::Delete {
                let Some(Target::Id(rt, id)) = e.target else {
                    return Err(bad("missing request.url"));
                };
                let v = self.plan_delete(c, &mut plan, rt, &id, pre)?;
                let location = format!("{rt}/{id}/_history/{v}");
                results.push((
                    e.index,
                    EntryResult {
                        status: "204 No Content",
                        written: None,
                        location,
                    },
                ));
                continue;
            }
            let r = e.resource.ok_or_else(|| bad("missing resource"))?;
            let id = match (&e.target, e.id) {
                (Some(Target::Id(_, id)), _) => id.clone(),
                (_, Some(id)) => id,
                _ => return Err(bad("missing request.url")),
            };
            let rt = r.rtype();
            let prior = match (e.method, &e.target) {
                (Method::Post, _) => None,
                _ => self
                    .store
                    .current(rt.as_str(), &id)?
                    .filter(|p| !p.deleted()),
            };
            let (w, json) = match (e.method, prior) {
                (Method::Put, None) if matches!(e.target, Some(Target::Id(..))) => {
                    return Err(VaultError::NotFound)
                }
                (_, None) => self.plan_put(c, &mut plan, r, id, None, Expect::Absent)?,
                (_, Some(prior)) => {
                    self.may_write(c, Action::Update, rt, &id, r.category(), Some(&prior))?;
                    pre.check(prior.version())?;
                    let expect = Expect::Version(prior.version());
                    self.plan_put(c, &mut plan, r, id, Some(&prior), expect)?
                }
            };
            let category = w.category;
            let status = if w.created { "201 Created" } else { "200 OK" };
            let location = format!("{}/{}/_history/{}", w.rtype, w.id, w.version);
            let written = Some(if bodies {
                self.readback(c, w, json, category)
            } else {
                w
            });
            results.push((
                e.index,
                EntryResult {
                    status,
                    written,
                    location,
                },
            ));
        }
        let mut rec = self.record(c, action, Outcome::Success);
        rec.resource = Some("Bundle".into());
        rec.detail = Some(format!("entries={}", results.len()));
        plan.audit.insert(0, rec);
        match self.commit_plan(plan) {
            Err(VaultError::Conflict) => return Err(VaultError::PreconditionFailed(
                "a resource in the transaction changed while it was applied; nothing was written",
            )),
            r => r?,
        }
        results.sort_by_key(|(i, _)| *i);
        Ok(results.into_iter().map(|(_, r)| r).collect())
    }
}
