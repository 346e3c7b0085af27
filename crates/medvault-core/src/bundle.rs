//! Transaction Bundles (`POST /fhir`) and imports: the Bundle parsed and validated whole
//! (`medvault_fhir::bundle`), every entry planned through the gate, then one all-or-nothing
//! commit with every entry's audit record.

use medvault_fhir::bundle::{parse_transaction, Method};
use medvault_store::Expect;
use serde_json::Value;

use crate::write::Plan;
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

impl Vault {
    /// Applies a transaction (or, for `import`, a collection) Bundle all-or-nothing; the
    /// results are in the Bundle's entry order.
    pub fn transaction(
        &self,
        c: &Caller,
        bundle: Value,
        action: &str,
    ) -> Result<Vec<EntryResult>, VaultError> {
        let entries = parse_transaction(bundle, action == "import", medvault_types::random_uuid)?;
        let mut plan = Plan::default();
        let mut results: Vec<(usize, EntryResult)> = Vec::with_capacity(entries.len());
        for e in entries {
            if e.method == Method::Delete {
                let (rt, id) = e.target.ok_or_else(|| bad("missing request.url"))?;
                let v = self.plan_delete(c, &mut plan, rt, &id)?;
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
            let (w, _) = match (e.method, e.new_id, e.target) {
                (Method::Post, Some(id), _) => {
                    self.plan_put(c, &mut plan, r, id, None, Expect::Absent)?
                }
                (_, _, Some((rt, id))) => {
                    if r.id() != Some(id.as_str()) {
                        return Err(bad("PUT entry resource id must match request.url"));
                    }
                    let prior = match self.store.current(rt.as_str(), &id)? {
                        Some(p) if !p.deleted() => p,
                        _ => return Err(VaultError::NotFound),
                    };
                    let expect = Expect::Version(prior.version());
                    self.plan_put(c, &mut plan, r, id, Some(&prior), expect)?
                }
                _ => return Err(bad("missing request.url")),
            };
            let status = if w.created { "201 Created" } else { "200 OK" };
            let location = format!("{}/{}/_history/{}", w.rtype, w.id, w.version);
            let written = Some(w);
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
        self.commit_plan(plan)?;
        results.sort_by_key(|(i, _)| *i);
        Ok(results.into_iter().map(|(_, r)| r).collect())
    }
}
