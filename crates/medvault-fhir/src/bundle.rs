//! Transaction and collection Bundles (FHIR R4 §3.1.0.11 "transaction"): parsed and
//! validated whole before anything is written — every entry's request, every resource —
//! with new ids assigned to created resources and the references between entries
//! (`fullUrl`s such as `urn:uuid:…`, and in a collection the resources' own `Type/id`)
//! rewritten to them. The gate then plans the entries in [`BundleEntry`] order.

use std::collections::HashMap;

use serde_json::Value;

use crate::{FhirError, Resource, ResourceType};

/// Largest number of entries accepted in one Bundle.
pub const MAX_ENTRIES: usize = 50_000;

/// An entry's interaction, in the order FHIR processes a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Delete,
    Post,
    Put,
}

/// One entry of a transaction, parsed and validated.
#[derive(Debug)]
pub struct BundleEntry {
    /// Position in the Bundle (the response keeps this order).
    pub index: usize,
    pub method: Method,
    /// The resource of a POST or PUT, references rewritten.
    pub resource: Option<Resource>,
    /// `(type, id)` of a PUT or DELETE (`request.url`).
    pub target: Option<(ResourceType, String)>,
    /// The id a POST creates.
    pub new_id: Option<String>,
}

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::Request(msg.into())
}

fn parse_target(url: &str) -> Result<(ResourceType, String), FhirError> {
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

/// Parses a `transaction` Bundle, or a `collection` when `collection_allowed` (imports,
/// where every entry is a create). `new_id` makes the id of each created resource.
/// Returns the entries in processing order: DELETE, then POST (Patients first, so their
/// data keys exist before their records), then PUT.
///
/// # Errors
/// [`FhirError::Request`] for a malformed Bundle or entry request; [`FhirError::Invalid`]
/// (with expressions `Bundle.entry[i].resource.…`) for an invalid resource.
pub fn parse_transaction(
    bundle: Value,
    collection_allowed: bool,
    mut new_id: impl FnMut() -> String,
) -> Result<Vec<BundleEntry>, FhirError> {
    let Value::Object(mut b) = bundle else {
        return Err(bad("a Bundle must be a JSON object"));
    };
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(bad("expected a Bundle"));
    }
    let collection = match b.get("type").and_then(Value::as_str) {
        Some("transaction") => false,
        Some("collection") if collection_allowed => true,
        _ => {
            return Err(bad(
                "Bundle.type must be transaction (or collection for import)",
            ))
        }
    };
    let raw = match b.remove("entry") {
        Some(Value::Array(a)) => a,
        None => vec![],
        Some(_) => return Err(bad("Bundle.entry must be an array")),
    };
    if raw.len() > MAX_ENTRIES {
        return Err(bad(format!(
            "a Bundle may hold at most {MAX_ENTRIES} entries"
        )));
    }
    let mut entries = Vec::with_capacity(raw.len());
    let mut full_urls = Vec::with_capacity(raw.len());
    for (index, e) in raw.into_iter().enumerate() {
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
        full_urls.push(full_url);
        entries.push((index, method, target, resource));
    }
    // Validate every resource first (parse, don't validate later).
    let mut parsed = Vec::with_capacity(entries.len());
    for (index, method, target, resource) in entries {
        let resource = match resource {
            None => None,
            Some(v) => Some(
                Resource::from_value(v, target.as_ref().map(|t: &(ResourceType, String)| t.0))
                    .map_err(|err| locate(err, index))?,
            ),
        };
        parsed.push(BundleEntry {
            index,
            method,
            resource,
            target,
            new_id: None,
        });
    }
    // Assign ids to new resources and map their fullUrls (and, for imports, their old ids).
    let mut map: HashMap<String, String> = HashMap::new();
    for e in parsed.iter_mut().filter(|e| e.method == Method::Post) {
        let Some(r) = &e.resource else { continue };
        let id = new_id();
        let new_ref = format!("{}/{id}", r.rtype());
        if let Some(Some(f)) = full_urls.get(e.index) {
            map.insert(f.clone(), new_ref.clone());
        }
        if collection {
            if let Some(old) = r.id() {
                map.insert(format!("{}/{old}", r.rtype()), new_ref.clone());
            }
        }
        e.new_id = Some(id);
    }
    for e in &mut parsed {
        if let Some(r) = &mut e.resource {
            r.rewrite_references(&map);
        }
    }
    parsed.sort_by_key(|e| {
        let not_patient = e
            .resource
            .as_ref()
            .map(|r| r.rtype().as_str() != "Patient")
            .unwrap_or(true);
        (e.method, not_patient, e.index)
    });
    Ok(parsed)
}

/// Prefixes an invalid resource's issue expressions with its place in the Bundle.
fn locate(err: FhirError, index: usize) -> FhirError {
    match err {
        FhirError::Invalid(mut issues) => {
            for i in &mut issues {
                i.expression = i
                    .expression
                    .take()
                    .map(|x| format!("Bundle.entry[{index}].resource.{x}"));
            }
            FhirError::Invalid(issues)
        }
        other => other,
    }
}
