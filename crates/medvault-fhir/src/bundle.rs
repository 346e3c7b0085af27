//! Transaction and collection Bundles (FHIR R4 §3.1.0.11 "transaction"): parsed and
//! validated whole before anything is written — every entry's request, every resource —
//! in two steps. [`parse_transaction`] reads the entries and refuses what medvault does
//! not do (naming it) and transactions that address one resource twice; the gate then
//! resolves the conditional entries (`ifNoneExist`, `PUT Type?search`) against what it
//! stores, and [`Parsed::bind`] assigns ids to created resources and rewrites the
//! references between entries (`fullUrl`s such as `urn:uuid:…`, and in a collection the
//! resources' own `Type/id`) to them.

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

/// Where a PUT or DELETE entry points (`request.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `Type/id`.
    Id(ResourceType, String),
    /// `Type?search` (conditional update), with the query string as sent.
    Search(ResourceType, String),
}

/// One entry of a transaction, parsed and validated.
#[derive(Debug)]
pub struct BundleEntry {
    /// Position in the Bundle (the response keeps this order).
    pub index: usize,
    pub method: Method,
    /// The resource of a POST or PUT, references rewritten by [`Parsed::bind`].
    pub resource: Option<Resource>,
    /// A PUT's or DELETE's `request.url`.
    pub target: Option<Target>,
    /// `request.ifMatch`: the version the resource must be at (`W/"3"` → 3).
    pub if_match: Option<u64>,
    /// `request.ifNoneMatch` of a PUT: `*` (any version) or a version that must not be
    /// current.
    pub if_none_match: Option<IfNoneMatch>,
    /// `request.ifNoneExist` of a POST: the search (query string) for a conditional create.
    pub if_none_exist: Option<String>,
    /// `fullUrl`, as sent.
    pub full_url: Option<String>,
    /// The id this entry writes or finds, set by the gate before [`Parsed::bind`]: a POST's
    /// new id, or the existing match of a conditional create or update.
    pub id: Option<String>,
}

/// `If-None-Match` / `request.ifNoneMatch` on a write (FHIR R4 §3.1.0.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfNoneMatch {
    /// `*`: the write applies only if the resource does not exist.
    Any,
    /// `W/"n"`: the write applies only if the current version is not `n`.
    Version(u64),
}

/// A transaction read and checked, its conditional entries not yet resolved.
#[derive(Debug)]
pub struct Parsed {
    /// The entries in Bundle order.
    pub entries: Vec<BundleEntry>,
    collection: bool,
}

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::Request(msg.into())
}

/// Parses an ETag (`W/"3"`, `"3"` or `3`) into its version number.
///
/// # Errors
/// [`FhirError::Request`] naming `what` for anything else.
pub fn etag_version(s: &str, what: &str) -> Result<u64, FhirError> {
    let t = s.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    let t = t
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t);
    t.parse::<u64>()
        .map_err(|_| bad(format!("{what} must be an ETag like W/\"3\"")))
}

/// Parses `If-None-Match` of a write: `*` or an ETag.
///
/// # Errors
/// [`FhirError::Request`] naming `what` for anything else.
pub fn if_none_match(s: &str, what: &str) -> Result<IfNoneMatch, FhirError> {
    if s.trim() == "*" {
        Ok(IfNoneMatch::Any)
    } else {
        etag_version(s, what).map(IfNoneMatch::Version)
    }
}

fn parse_target(url: &str, method: &str) -> Result<Target, FhirError> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let path = path.trim_start_matches('/').trim_end_matches('/');
    let mut parts = path.split('/');
    let (Some(t), id) = (parts.next(), parts.next()) else {
        return Err(bad("entry request.url must be Type/id or Type?search"));
    };
    if parts.next().is_some() {
        return Err(bad("entry request.url must be Type/id or Type?search"));
    }
    let rt =
        ResourceType::parse(t).ok_or_else(|| bad("unsupported resource type in request.url"))?;
    match (id, query) {
        (Some(id), None) => {
            if !medvault_types::is_fhir_id(id) {
                return Err(bad("invalid id in request.url"));
            }
            Ok(Target::Id(rt, id.to_owned()))
        }
        (None, Some(q)) if method == "PUT" && !q.is_empty() => Ok(Target::Search(rt, q.to_owned())),
        (None, Some(q)) if method == "PUT" && q.is_empty() => Err(bad(
            "a conditional PUT needs a search: request.url Type?param=value",
        )),
        (None, Some(_)) => Err(bad(format!(
            "conditional {method} (request.url Type?search) is not supported; of the conditional interactions, PUT is"
        ))),
        _ => Err(bad("entry request.url must be Type/id or Type?search")),
    }
}

fn text_of<'a>(
    req: &'a serde_json::Map<String, Value>,
    k: &str,
) -> Result<Option<&'a str>, FhirError> {
    match req.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("entry request.{k} must be a string"))),
    }
}

/// Parses a `transaction` Bundle, or a `collection` when `collection_allowed` (imports,
/// where every entry is a create). Nothing in an entry's `request` is ignored: an element
/// medvault does not support (`ifModifiedSince`, a conditional DELETE, `ifNoneExist` on
/// anything but POST…) is a [`FhirError::Request`] naming it. Two entries with the same
/// `fullUrl`, or addressing the same `Type/id`, are refused naming both.
///
/// # Errors
/// [`FhirError::Request`] for a malformed Bundle or entry request; [`FhirError::Invalid`]
/// (with expressions `Bundle.entry[i].resource.…`) for an invalid resource.
pub fn parse_transaction(bundle: Value, collection_allowed: bool) -> Result<Parsed, FhirError> {
    let Value::Object(mut b) = bundle else {
        return Err(bad("a Bundle must be a JSON object"));
    };
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(bad("expected a Bundle"));
    }
    let collection = match b.get("type").and_then(Value::as_str) {
        Some("transaction") => false,
        Some("collection") if collection_allowed => true,
        Some("batch") => {
            return Err(bad(
                "Bundle.type batch is not supported; send a transaction (all-or-nothing)",
            ))
        }
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
    let mut seen_urls: HashMap<String, usize> = HashMap::new();
    let mut seen_targets: HashMap<(ResourceType, String), usize> = HashMap::new();
    for (index, e) in raw.into_iter().enumerate() {
        let Value::Object(mut e) = e else {
            return Err(bad("Bundle.entry items must be objects"));
        };
        let full_url = match e.get("fullUrl") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(bad(format!(
                    "Bundle.entry[{index}].fullUrl must be a string"
                )))
            }
        };
        if let Some(f) = &full_url {
            if let Some(first) = seen_urls.insert(f.clone(), index) {
                return Err(bad(format!(
                    "Bundle.entry[{first}] and Bundle.entry[{index}] have the same fullUrl"
                )));
            }
        }
        let resource = e.remove("resource");
        let mut entry = BundleEntry {
            index,
            method: Method::Post,
            resource: None,
            target: None,
            if_match: None,
            if_none_match: None,
            if_none_exist: None,
            full_url,
            id: None,
        };
        if !collection {
            let Some(Value::Object(req)) = e.get("request") else {
                return Err(bad(format!("Bundle.entry[{index}] needs a request")));
            };
            let m = text_of(req, "method")?.unwrap_or("");
            let url = text_of(req, "url")?.unwrap_or("");
            for k in req.keys() {
                if !["method", "url", "ifMatch", "ifNoneMatch", "ifNoneExist"].contains(&k.as_str())
                    && !k.starts_with("_")
                    && k != "id"
                    && k != "extension"
                {
                    return Err(bad(format!(
                        "Bundle.entry[{index}].request.{} is not supported",
                        k.chars().take(40).collect::<String>()
                    )));
                }
            }
            entry.method = match m {
                "POST" => Method::Post,
                "PUT" => Method::Put,
                "DELETE" => Method::Delete,
                "GET" | "HEAD" | "PATCH" => {
                    return Err(bad(format!(
                        "Bundle.entry[{index}]: {m} entries are not supported in a transaction"
                    )))
                }
                _ => return Err(bad("entry request.method must be POST, PUT or DELETE")),
            };
            if entry.method != Method::Post {
                entry.target = Some(parse_target(url, m)?);
            }
            if let Some(v) = text_of(req, "ifMatch")? {
                if entry.method == Method::Post {
                    return Err(bad(format!(
                        "Bundle.entry[{index}]: ifMatch applies to PUT and DELETE"
                    )));
                }
                entry.if_match = Some(etag_version(v, "request.ifMatch")?);
            }
            if let Some(v) = text_of(req, "ifNoneMatch")? {
                if entry.method != Method::Put {
                    return Err(bad(format!(
                        "Bundle.entry[{index}]: ifNoneMatch applies to PUT"
                    )));
                }
                entry.if_none_match = Some(if_none_match(v, "request.ifNoneMatch")?);
            }
            if let Some(v) = text_of(req, "ifNoneExist")? {
                if entry.method != Method::Post {
                    return Err(bad(format!(
                        "Bundle.entry[{index}]: ifNoneExist applies to POST"
                    )));
                }
                let v = v.split_once('?').map(|(_, q)| q).unwrap_or(v);
                if v.is_empty() {
                    return Err(bad(format!(
                        "Bundle.entry[{index}].request.ifNoneExist is empty"
                    )));
                }
                entry.if_none_exist = Some(v.to_owned());
            }
        }
        if let Some(Target::Id(rt, id)) = &entry.target {
            if let Some(first) = seen_targets.insert((*rt, id.clone()), index) {
                return Err(bad(format!(
                    "Bundle.entry[{first}] and Bundle.entry[{index}] both address {rt}/{id}"
                )));
            }
        }
        if entry.method != Method::Delete && resource.is_none() {
            return Err(bad("POST and PUT entries need a resource"));
        }
        if entry.method == Method::Delete && resource.is_some() {
            return Err(bad(format!(
                "Bundle.entry[{index}]: a DELETE carries no resource"
            )));
        }
        let expected = match &entry.target {
            Some(Target::Id(rt, _) | Target::Search(rt, _)) => Some(*rt),
            None => None,
        };
        entry.resource = match resource {
            None => None,
            Some(v) => Some(Resource::from_value(v, expected).map_err(|err| locate(err, index))?),
        };
        if let (Some(r), Some(Target::Id(_, id))) = (&entry.resource, &entry.target) {
            if r.id() != Some(id.as_str()) {
                return Err(bad(format!(
                    "Bundle.entry[{index}]: the resource id must match request.url"
                )));
            }
        }
        entries.push(entry);
    }
    Ok(Parsed {
        entries,
        collection,
    })
}

impl Parsed {
    /// Rewrites the references between entries to the ids the gate set in
    /// [`BundleEntry::id`] (each POST's fullUrl, and in a collection each resource's own
    /// `Type/id`), then returns the entries in processing order: DELETE, then POST
    /// (Patients first, so their data keys exist before their records), then PUT.
    ///
    /// # Errors
    /// [`FhirError::Request`] when two entries resolved to the same resource.
    pub fn bind(self) -> Result<Vec<BundleEntry>, FhirError> {
        let Parsed {
            mut entries,
            collection,
        } = self;
        let mut map: HashMap<String, String> = HashMap::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for e in &entries {
            let rt = match (&e.resource, &e.target) {
                (_, Some(Target::Id(rt, _) | Target::Search(rt, _))) => *rt,
                (Some(r), None) => r.rtype(),
                (None, None) => continue,
            };
            let id = match (&e.target, &e.id) {
                (Some(Target::Id(_, id)), _) | (_, Some(id)) => id,
                _ => continue,
            };
            let new_ref = format!("{rt}/{id}");
            if let Some(first) = seen.insert(new_ref.clone(), e.index) {
                return Err(bad(format!(
                    "Bundle.entry[{first}] and Bundle.entry[{}] both address {new_ref}",
                    e.index
                )));
            }
            if let Some(f) = &e.full_url {
                map.insert(f.clone(), new_ref.clone());
            }
            if collection {
                if let Some(old) = e.resource.as_ref().and_then(|r| r.id()) {
                    map.insert(format!("{rt}/{old}"), new_ref.clone());
                }
            }
        }
        for e in &mut entries {
            if let Some(r) = &mut e.resource {
                r.rewrite_references(&map);
            }
        }
        entries.sort_by_key(|e| {
            let not_patient = e
                .resource
                .as_ref()
                .map(|r| r.rtype().as_str() != "Patient")
                .unwrap_or(true);
            (e.method, not_patient, e.index)
        });
        Ok(entries)
    }
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
