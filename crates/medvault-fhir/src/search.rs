//! Search requests (FHIR R4 §3.1.1.4 "search"): the query string parsed into what the gate
//! searches by — ids, `_lastUpdated` bounds, the patient, paging, and each parameter's
//! values normalized exactly as [`search_tokens`](crate::search_tokens) normalized them at
//! write time, ready to become blind-index tokens. Nothing here sees stored data.

use medvault_types::PatientId;

use crate::index::MIN_PREFIX;
use crate::{normalize_text, search_params, FhirError, ResourceType};

/// A bound on `_lastUpdated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Ge,
    Gt,
    Le,
    Lt,
}

/// A parsed search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchRequest {
    /// `_count`, as asked (the gate applies its page-size limits).
    pub count: Option<usize>,
    /// `_offset`.
    pub offset: usize,
    /// `_id` values.
    pub ids: Vec<String>,
    /// `_lastUpdated` bounds (an instant prefix `eq` becomes a `Ge`/`Lt` pair).
    pub last_updated: Vec<(Bound, String)>,
    /// `patient` / `subject`.
    pub patient: Option<PatientId>,
    /// Other parameters: name and normalized values (OR within, AND across).
    pub params: Vec<(&'static str, Vec<String>)>,
    /// Every parameter name asked for, sorted and deduplicated (for the audit record; the
    /// values are never recorded).
    pub names: Vec<String>,
}

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::Request(msg.into())
}

/// A date parameter's value: `YYYY`, `YYYY-MM` or `YYYY-MM-DD` (optionally `eq`).
fn date_value(param: &str, v: &str) -> Result<String, FhirError> {
    let v = v.strip_prefix("eq").unwrap_or(v);
    let ok_shape = matches!(v.len(), 4 | 7 | 10)
        && v.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !ok_shape {
        if v.len() > 2
            && v.get(..2)
                .is_some_and(|p| ["ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"].contains(&p))
        {
            return Err(bad(format!(
                "`{param}` supports equality on YYYY, YYYY-MM or YYYY-MM-DD; range prefixes are not available on blind-indexed dates"
            )));
        }
        return Err(bad(format!(
            "`{param}` must be YYYY, YYYY-MM or YYYY-MM-DD"
        )));
    }
    Ok(v.to_owned())
}

fn last_updated(v: &str, out: &mut Vec<(Bound, String)>) -> Result<(), FhirError> {
    let (bound, at) = match v.get(..2) {
        Some("ge") => (Some(Bound::Ge), v.get(2..).unwrap_or("")),
        Some("gt") => (Some(Bound::Gt), v.get(2..).unwrap_or("")),
        Some("le") => (Some(Bound::Le), v.get(2..).unwrap_or("")),
        Some("lt") => (Some(Bound::Lt), v.get(2..).unwrap_or("")),
        Some("eq") => (None, v.get(2..).unwrap_or("")),
        _ => (None, v),
    };
    if at.len() < 4
        || !at
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-:T.Z+".contains(&b))
    {
        return Err(bad("_lastUpdated must be a FHIR date or dateTime"));
    }
    match bound {
        Some(b) => out.push((b, at.to_owned())),
        None => {
            out.push((Bound::Ge, at.to_owned()));
            out.push((Bound::Lt, format!("{at}\u{7f}")));
        }
    }
    Ok(())
}

/// Parses the query parameters of a search on `rt`.
///
/// # Errors
/// [`FhirError::Request`] naming the parameter for an unknown or unsupported parameter, a
/// modifier, or a malformed value.
pub fn parse(rt: ResourceType, params: &[(String, String)]) -> Result<SearchRequest, FhirError> {
    let mut q = SearchRequest::default();
    let allowed = search_params(rt.as_str());
    for (k, v) in params {
        let (name, modifier) = match k.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (k.as_str(), None),
        };
        if modifier.is_some() {
            return Err(bad(format!("search modifier on `{name}` is not supported")));
        }
        q.names.push(name.to_owned());
        match name {
            "_count" => {
                q.count = Some(
                    v.parse()
                        .map_err(|_| bad("_count must be a non-negative integer"))?,
                )
            }
            "_offset" => {
                q.offset = v
                    .parse()
                    .map_err(|_| bad("_offset must be a non-negative integer"))?
            }
            "_format" if v == "json" || v.contains("fhir+json") => {}
            "_id" => {
                for id in v.split(',') {
                    if !medvault_types::is_fhir_id(id) {
                        return Err(bad("_id must be a valid id"));
                    }
                    q.ids.push(id.to_owned());
                }
            }
            "_lastUpdated" => last_updated(v, &mut q.last_updated)?,
            "patient" | "subject" if allowed.contains(&name) => {
                let id = v.strip_prefix("Patient/").unwrap_or(v);
                let pid =
                    PatientId::new(id).map_err(|_| bad("patient must be Patient/{id} or an id"))?;
                if q.patient.as_ref().is_some_and(|p| *p != pid) {
                    return Err(bad("conflicting patient parameters"));
                }
                q.patient = Some(pid);
            }
            p if allowed.contains(&p) => {
                let param: &'static str = allowed.iter().copied().find(|a| *a == p).unwrap_or("");
                let mut values = vec![];
                for value in v.split(',') {
                    values.push(match param {
                        "name" | "family" | "given" => {
                            let n = normalize_text(value);
                            if n.chars().count() < MIN_PREFIX {
                                return Err(bad(format!(
                                    "`{param}` needs at least {MIN_PREFIX} characters"
                                )));
                            }
                            n
                        }
                        "birthdate" | "date" => date_value(param, value)?,
                        _ => {
                            if value.is_empty() {
                                return Err(bad(format!("`{param}` needs a value")));
                            }
                            value.strip_prefix('|').unwrap_or(value).to_owned()
                        }
                    });
                }
                q.params.push((param, values));
            }
            other => {
                return Err(bad(format!(
                    "unknown or unsupported search parameter `{}`",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    q.names.sort();
    q.names.dedup();
    Ok(q)
}
