//! Search requests (FHIR R4 §3.1.1 "Search"): the query string parsed into what the gate
//! searches by — ids, `_lastUpdated` and clinical date ranges, the patient, chains and
//! `_has`, sorting, paging, `_include`/`_revinclude`, `_summary`/`_elements` — with each
//! string and token value normalized exactly as [`search_tokens`](crate::search_tokens)
//! normalized it at write time, ready to become blind-index tokens. Nothing here sees
//! stored data.
//!
//! A parameter medvault does not know is listed in [`SearchRequest::unknown`] (the search
//! says so in an OperationOutcome entry) under `Prefer: handling=lenient`, the default, and
//! refused under `handling=strict` (FHIR R4 §3.1.1.4.1). A known parameter with a
//! malformed value is always refused.

use medvault_types::PatientId;

use crate::date::{parse_query, DateQuery};
use crate::index::MIN_PREFIX;
use crate::{normalize_text, search_params, FhirError, ResourceType};

/// `_summary` (FHIR R4 §3.1.1.5.11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Summary {
    /// `_summary=false` or absent: whole resources.
    #[default]
    Full,
    /// `count`: the total only, no entries.
    Count,
    /// `true`: the summary elements only.
    True,
    /// `data`: everything but the narrative (`text`).
    Data,
    /// `text`: the narrative, id, meta and the mandatory elements.
    Text,
}

/// What `_sort` orders by (one key; ties by logical id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Id,
    LastUpdated,
    /// A date search parameter (`date`, `birthdate`): compared after decryption.
    Date(&'static str),
}

/// `_include` / `_revinclude` (FHIR R4 §3.1.1.5.4): `source:param[:target]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source: ResourceType,
    /// The reference search parameter, or `*` for every reference.
    pub param: String,
    pub target: Option<ResourceType>,
    /// `:iterate`: also applied to what was included.
    pub iterate: bool,
}

/// A chained parameter on the patient (`subject:Patient.identifier=…`,
/// `patient.birthdate=…`): the Patient search whose matches restrict this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The Patient search parameter and its value, as sent.
    pub param: String,
    pub value: String,
}

/// `_has:Type:ref:param=value` on Patient (reverse chaining, FHIR R4 §3.1.1.5.10): Patients
/// that a `Type` resource matching `param=value` references through `ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Has {
    pub rtype: ResourceType,
    pub param: String,
    pub value: String,
}

/// A parsed search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchRequest {
    /// `_count`, as asked (the gate applies its page-size limits; 0 asks for the total only).
    pub count: Option<usize>,
    /// `_offset`.
    pub offset: usize,
    /// `_id` values.
    pub ids: Vec<String>,
    /// `_lastUpdated` values (AND).
    pub last_updated: Vec<DateQuery>,
    /// `patient` / `subject`.
    pub patient: Option<PatientId>,
    /// Token and string parameters: name and normalized values (OR within, AND across).
    pub params: Vec<(&'static str, Vec<String>)>,
    /// Clinical date parameters (OR within, AND across): candidates from the blind index,
    /// then compared exactly after decryption.
    pub dates: Vec<(&'static str, Vec<DateQuery>)>,
    pub chains: Vec<Chain>,
    pub has: Vec<Has>,
    /// `_sort`, and whether descending.
    pub sort: Option<(SortBy, bool)>,
    pub summary: Summary,
    /// `_elements`: top-level element names kept.
    pub elements: Vec<String>,
    pub include: Vec<Include>,
    pub revinclude: Vec<Include>,
    /// `_cursor`: the opaque continuation of an earlier page.
    pub cursor: Option<String>,
    /// Parameters medvault does not know or support (lenient handling), as sent.
    pub unknown: Vec<String>,
    /// Every parameter name asked for, sorted and deduplicated (for the audit record; the
    /// values are never recorded).
    pub names: Vec<String>,
}

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::Request(msg.into())
}

fn shown(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Patient search parameters a chain or `_has` may use.
const PATIENT_CHAIN: &[&str] = &["identifier", "name", "family", "given", "birthdate"];

fn parse_include(
    rt: ResourceType,
    v: &str,
    iterate: bool,
    what: &str,
) -> Result<Include, FhirError> {
    if v == "*" && what == "_include" {
        return Ok(Include {
            source: rt,
            param: "*".into(),
            target: None,
            iterate,
        });
    }
    let mut parts = v.split(':');
    let (Some(src), Some(param)) = (parts.next(), parts.next()) else {
        return Err(bad(format!("{what} must be Type:param[:target]")));
    };
    let source = ResourceType::parse(src).ok_or_else(|| {
        bad(format!(
            "{what}: unsupported resource type `{}`",
            shown(src)
        ))
    })?;
    let target = parts
        .next()
        .map(|t| {
            ResourceType::parse(t)
                .ok_or_else(|| bad(format!("{what}: unsupported target type `{}`", shown(t))))
        })
        .transpose()?;
    if parts.next().is_some() || param.is_empty() {
        return Err(bad(format!("{what} must be Type:param[:target]")));
    }
    Ok(Include {
        source,
        param: param.to_owned(),
        target,
        iterate,
    })
}

/// Parses the query parameters of a search on `rt`; `strict` refuses unknown parameters.
///
/// # Errors
/// [`FhirError::Request`] naming the parameter for a malformed value, an unsupported
/// modifier or combination, or (under `strict`) an unknown parameter.
pub fn parse(
    rt: ResourceType,
    params: &[(String, String)],
    strict: bool,
) -> Result<SearchRequest, FhirError> {
    let mut q = SearchRequest::default();
    let allowed = search_params(rt.as_str());
    let unknown = |q: &mut SearchRequest, k: &str, why: &str| -> Result<(), FhirError> {
        if strict {
            return Err(bad(format!(
                "{why} `{}` (Prefer: handling=strict)",
                shown(k)
            )));
        }
        q.unknown.push(shown(k));
        Ok(())
    };
    for (k, v) in params {
        let (name, modifier) = match k.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (k.as_str(), None),
        };
        q.names.push(shown(name));
        // Chains on the patient: patient.x, subject.x, subject:Patient.x.
        if let Some((head, tail)) = k.split_once('.') {
            let (ref_param, ty) = match head.split_once(':') {
                Some((r, t)) => (r, Some(t)),
                None => (head, None),
            };
            if ["patient", "subject"].contains(&ref_param)
                && allowed.contains(&ref_param)
                && ty.is_none_or(|t| t == "Patient")
                && PATIENT_CHAIN.contains(&tail)
            {
                if v.is_empty() {
                    return Err(bad(format!("`{}` needs a value", shown(k))));
                }
                q.chains.push(Chain {
                    param: tail.to_owned(),
                    value: v.clone(),
                });
            } else {
                unknown(&mut q, k, "unsupported chained parameter")?;
            }
            continue;
        }
        if name == "_has" {
            let parts: Vec<&str> = modifier.unwrap_or("").split(':').collect();
            let [ty, ref_param, param] = parts.as_slice() else {
                return Err(bad("_has must be _has:Type:reference:parameter"));
            };
            let has_rt = ResourceType::parse(ty)
                .ok_or_else(|| bad(format!("_has: unsupported resource type `{}`", shown(ty))))?;
            if rt.as_str() != "Patient"
                || !["patient", "subject"].contains(ref_param)
                || !search_params(has_rt.as_str()).contains(ref_param)
                || param.starts_with('_')
                || !search_params(has_rt.as_str()).contains(param)
            {
                unknown(&mut q, k, "unsupported _has")?;
                continue;
            }
            q.has.push(Has {
                rtype: has_rt,
                param: (*param).to_owned(),
                value: v.clone(),
            });
            continue;
        }
        match (name, modifier) {
            ("_include" | "_revinclude", m) if m.is_none() || m == Some("iterate") => {
                let inc = parse_include(rt, v, m.is_some(), name)?;
                if name == "_include" && !inc.iterate && inc.source != rt {
                    return Err(bad(format!(
                        "_include={} does not start from the searched type {rt} (use _include:iterate to follow included resources)",
                        shown(v)
                    )));
                }
                if name == "_include" {
                    q.include.push(inc);
                } else {
                    q.revinclude.push(inc);
                }
                continue;
            }
            (_, Some(m)) => {
                unknown(&mut q, k, &format!("unsupported modifier :{}", shown(m)))?;
                continue;
            }
            _ => {}
        }
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
            "_cursor" => q.cursor = Some(v.clone()),
            "_format"
                if v == "json" || v.contains("fhir+json") || v.contains("application/json") => {}
            "_pretty" if v == "true" || v == "false" => {}
            "_total" if ["none", "estimate", "accurate"].contains(&v.as_str()) => {}
            "_summary" => {
                q.summary = match v.as_str() {
                    "count" => Summary::Count,
                    "true" => Summary::True,
                    "data" => Summary::Data,
                    "text" => Summary::Text,
                    "false" => Summary::Full,
                    _ => return Err(bad("_summary must be true, false, text, data or count")),
                }
            }
            "_elements" => {
                for e in v.split(',') {
                    let e = e.trim();
                    if e.is_empty() || !e.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        return Err(bad("_elements must list top-level element names"));
                    }
                    q.elements.push(e.to_owned());
                }
            }
            "_sort" => {
                if v.contains(',') {
                    return Err(bad("_sort takes one key (ties are ordered by id)"));
                }
                let (desc, key) = match v.strip_prefix('-') {
                    Some(k) => (true, k),
                    None => (false, v.as_str()),
                };
                let by = match key {
                    "_id" => SortBy::Id,
                    "_lastUpdated" => SortBy::LastUpdated,
                    "date" if allowed.contains(&"date") => SortBy::Date("date"),
                    "birthdate" if allowed.contains(&"birthdate") => SortBy::Date("birthdate"),
                    other => {
                        return Err(bad(format!(
                            "_sort by `{}` is not supported (_id, _lastUpdated and date parameters are)",
                            shown(other)
                        )))
                    }
                };
                q.sort = Some((by, desc));
            }
            "_id" => {
                for id in v.split(',') {
                    if !medvault_types::is_fhir_id(id) {
                        return Err(bad("_id must be a valid id"));
                    }
                    q.ids.push(id.to_owned());
                }
            }
            "_lastUpdated" => q
                .last_updated
                .push(parse_query(v).map_err(|m| bad(format!("_lastUpdated {m}")))?),
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
                if matches!(param, "birthdate" | "date") {
                    let mut values = vec![];
                    for value in v.split(',') {
                        values.push(parse_query(value).map_err(|m| bad(format!("`{param}` {m}")))?);
                    }
                    q.dates.push((param, values));
                    continue;
                }
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
            other => unknown(&mut q, other, "unknown or unsupported search parameter")?,
        }
    }
    q.names.sort();
    q.names.dedup();
    Ok(q)
}

/// Top-level elements FHIR R4 marks `isSummary` in the resource types medvault stores
/// (Patient, Practitioner, Organization, Observation, Condition, Encounter, medication,
/// immunization, allergy, procedure, diagnostic report, document, claim and coverage).
const SUMMARY_ELEMENTS: &[&str] = &[
    "identifier",
    "active",
    "name",
    "telecom",
    "gender",
    "birthDate",
    "deceasedBoolean",
    "deceasedDateTime",
    "address",
    "managingOrganization",
    "link",
    "status",
    "category",
    "code",
    "subject",
    "patient",
    "encounter",
    "effectiveDateTime",
    "effectivePeriod",
    "effectiveInstant",
    "issued",
    "performer",
    "valueQuantity",
    "valueCodeableConcept",
    "valueString",
    "valueBoolean",
    "valueInteger",
    "valueDateTime",
    "clinicalStatus",
    "verificationStatus",
    "severity",
    "onsetDateTime",
    "onsetPeriod",
    "abatementDateTime",
    "recordedDate",
    "period",
    "class",
    "type",
    "serviceType",
    "priority",
    "intent",
    "medicationCodeableConcept",
    "medicationReference",
    "authoredOn",
    "requester",
    "vaccineCode",
    "occurrenceDateTime",
    "primarySource",
    "criticality",
    "date",
    "created",
    "beneficiary",
    "payor",
    "use",
    "insurer",
    "provider",
    "total",
    "qualification",
    "description",
    "content",
    "performedDateTime",
    "performedPeriod",
    "outcome",
];

/// The resource as `_summary` and `_elements` ask (FHIR R4 §3.1.1.5.11–12), or `None` when
/// it is returned whole. A subsetted copy keeps `resourceType`, `id`, `meta` and the
/// mandatory elements, and is tagged `SUBSETTED` (v3 ObservationValue) in `meta.tag`.
pub fn subset(
    json: &serde_json::Map<String, serde_json::Value>,
    summary: Summary,
    elements: &[String],
) -> Option<serde_json::Map<String, serde_json::Value>> {
    use serde_json::Value;
    if summary == Summary::Full && elements.is_empty() || summary == Summary::Count {
        return None;
    }
    let rt = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let required = crate::defs::defs().required(rt);
    let keep = |k: &str| -> bool {
        if ["resourceType", "id", "meta"].contains(&k) || required.iter().any(|r| r == k) {
            return true;
        }
        match summary {
            Summary::True => SUMMARY_ELEMENTS.contains(&k),
            Summary::Data => k != "text",
            Summary::Text => k == "text",
            Summary::Full | Summary::Count => elements.iter().any(|e| e == k),
        }
    };
    let mut out: serde_json::Map<String, Value> = json
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = out
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(m) = meta {
        let tags = m.entry("tag").or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(t) = tags {
            t.push(serde_json::json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "SUBSETTED", "display": "subsetted"}));
        }
    }
    Some(out)
}
