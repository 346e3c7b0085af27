//! Transaction Bundles (`POST /fhir`) and imports: every entry planned through the
//! gate, then one all-or-nothing commit with every entry's audit record.

use std::collections::HashMap;

use medvault_fhir::{Resource, ResourceType};
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

/// Largest number of entries accepted in one Bundle.
pub const MAX_ENTRIES: usize = 50_000;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
}

struct Entry {
    method: Method,
    resource: Option<Value>,
    target: Option<(ResourceType, String)>,
    full_url: Option<String>,
    index: usize,
}

fn bad(msg: impl Into<String>) -> VaultError {
    VaultError::BadRequest(msg.into())
}

fn parse_target(url: &str) -> Result<(ResourceType, String), VaultError> {
    let url = url.split('?').next().unwrap_or("");
    let mut parts = url.trim_start_matches('/').split('/');
    let (Some(t), Some(id), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("entry request.url must be Type/id"));
    };
    let rt =
        ResourceType::parse(t).ok_or_else(|| bad("unsupported resource type in request.url"))?;
    if !medvault_types::is_fhir_id(id) {
        return Err(bad("invalid id in request.url"));
    }
    Ok((rt, id.to_owned()))
}

impl Vault {
    /// Applies a transaction (or, for `import`, a collection) Bundle all-or-nothing.
    pub fn transaction(
        &self,
        c: &Caller,
        bundle: Value,
        action: &str,
    ) -> Result<Vec<EntryResult>, VaultError> {
        let Value::Object(mut b) = bundle else {
            return Err(bad("a Bundle must be a JSON object"));
        };
        if b.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(bad("expected a Bundle"));
        }
        let kind = b
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let collection = match kind.as_str() {
            "transaction" => false,
            "collection" if action == "import" => true,
            _ => {
                return Err(bad(
                    "Bundle.type must be transaction (or collection for import)",
                ))
            }
        };
        let entries = match b.remove("entry") {
            Some(Value::Array(a)) => a,
            None => vec![],
            Some(_) => return Err(bad("Bundle.entry must be an array")),
        };
        if entries.len() > MAX_ENTRIES {
            return Err(VaultError::BadRequest(format!(
                "a Bundle may hold at most {MAX_ENTRIES} entries"
            )));
        }
        let mut parsed = Vec::with_capacity(entries.len());
        for (index, e) in entries.into_iter().enumerate() {
            let Value::Object(mut e) = e else {
                return Err(bad("Bundle.entry items must be objects"));
            };
            let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
            let resource = e.remove("resource");
            let (method, target) = if collection {
                (Method::Post, None)
            } else {
                let req = e
                    .get("request")
                    .ok_or_else(|| bad("transaction entries need request"))?;
                let m = req.get("method").and_then(Value::as_str).unwrap_or("");
                let url = req.get("url").and_then(Value::as_str).unwrap_or("");
                match m {
                    "POST" => (Method::Post, None),
                    "PUT" => (Method::Put, Some(parse_target(url)?)),
                    "DELETE" => (Method::Delete, Some(parse_target(url)?)),
                    _ => return Err(bad("entry request.method must be POST, PUT or DELETE")),
                }
            };
            if method != Method::Delete && resource.is_none() {
                return Err(bad("POST and PUT entries need a resource"));
            }
            parsed.push(Entry {
                method,
                resource,
                target,
                full_url,
                index,
            });
        }
        // Validate every resource first (parse, don't validate later).
        let mut resources: HashMap<usize, Resource> = HashMap::new();
        for e in &mut parsed {
            if let Some(v) = e.resource.take() {
                let r =
                    Resource::from_value(v, e.target.as_ref().map(|t| t.0)).map_err(
                        |err| match err {
                            medvault_fhir::FhirError::Invalid(mut issues) => {
                                for i in &mut issues {
                                    i.expression = i
                                        .expression
                                        .take()
                                        .map(|x| format!("Bundle.entry[{}].resource.{x}", e.index));
                                }
                                VaultError::Fhir(medvault_fhir::FhirError::Invalid(issues))
                            }
                            other => VaultError::Fhir(other),
                        },
                    )?;
                resources.insert(e.index, r);
            }
        }
        // Assign ids to new resources and map their fullUrls (and, for imports, their old ids).
        let mut map: HashMap<String, String> = HashMap::new();
        let mut new_ids: HashMap<usize, String> = HashMap::new();
        for e in parsed.iter().filter(|e| e.method == Method::Post) {
            let Some(r) = resources.get(&e.index) else {
                continue;
            };
            let id = medvault_types::random_uuid();
            let new_ref = format!("{}/{id}", r.rtype());
            if let Some(f) = &e.full_url {
                map.insert(f.clone(), new_ref.clone());
            }
            if collection {
                if let Some(old) = r.id() {
                    map.insert(format!("{}/{old}", r.rtype()), new_ref.clone());
                }
            }
            new_ids.insert(e.index, id);
        }
        // FHIR order: DELETE, then POST (patients first, so their data keys exist), then PUT.
        parsed.sort_by_key(|e| {
            let not_patient = resources
                .get(&e.index)
                .map(|r| r.rtype().as_str() != "Patient")
                .unwrap_or(true);
            (e.method, not_patient, e.index)
        });
        let mut plan = Plan::default();
        let mut results: Vec<(usize, EntryResult)> = vec![];
        for e in parsed {
            match e.method {
                Method::Delete => {
                    let (rt, id) = e.target.ok_or_else(|| bad("missing request.url"))?;
                    let v = self.plan_delete(c, &mut plan, rt, &id)?;
                    results.push((
                        e.index,
                        EntryResult {
                            status: "204 No Content",
                            written: None,
                            location: format!("{rt}/{id}/_history/{v}"),
                        },
                    ));
                }
                Method::Post | Method::Put => {
                    let mut r = resources
                        .remove(&e.index)
                        .ok_or_else(|| bad("missing resource"))?;
                    r.rewrite_references(&map);
                    let (w, _) = if e.method == Method::Post {
                        let id = new_ids
                            .get(&e.index)
                            .cloned()
                            .unwrap_or_else(medvault_types::random_uuid);
                        self.plan_put(c, &mut plan, r, id, None, Expect::Absent)?
                    } else {
                        let (rt, id) = e.target.ok_or_else(|| bad("missing request.url"))?;
                        if r.id() != Some(id.as_str()) {
                            return Err(bad("PUT entry resource id must match request.url"));
                        }
                        let prior = match self.store.current(rt.as_str(), &id)? {
                            Some(p) if !p.deleted() => p,
                            _ => return Err(VaultError::NotFound),
                        };
                        self.plan_put(
                            c,
                            &mut plan,
                            r,
                            id,
                            Some(&prior),
                            Expect::Version(prior.version()),
                        )?
                    };
                    let status = if w.created { "201 Created" } else { "200 OK" };
                    let location = format!("{}/{}/_history/{}", w.rtype, w.id, w.version);
                    results.push((
                        e.index,
                        EntryResult {
                            status,
                            written: Some(w),
                            location,
                        },
                    ));
                }
            }
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
