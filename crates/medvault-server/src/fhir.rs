//! `/fhir`: the FHIR R4 REST interactions, rendered from [`Disclosed`] values only.

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use medvault_core::{Disclosed, Precondition, SearchResult, Written};
use medvault_fhir::bundle::{etag_version, if_none_match};
use medvault_fhir::search::{subset, Summary};
use medvault_fhir::{
    capability_statement, operation_outcome, Issue, IssueCode, Resource, ResourceType,
};
use serde_json::{json, Map, Value};

use crate::{blocking, body_bytes, caller, json_response, pending_caller, ApiError, AppState, Ctx};

fn resource_type(s: &str) -> Result<ResourceType, ApiError> {
    ResourceType::parse(s).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            IssueCode::NotSupported,
            "unsupported resource type",
        )
    })
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    if medvault_types::is_fhir_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request("invalid resource id"))
    }
}

fn http_date(instant: &str) -> Option<String> {
    let t = time::OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339)
        .ok()?;
    t.to_offset(time::UtcOffset::UTC).format(HTTP_DATE).ok()
}

fn set(r: &mut Response, k: header::HeaderName, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        r.headers_mut().insert(k, v);
    }
}

fn resource_response(status: StatusCode, d: &Disclosed) -> Response {
    let body = d
        .json()
        .map(|m| Value::Object(m.clone()))
        .unwrap_or(Value::Null);
    let mut r = json_response(status, &body);
    set(&mut r, header::ETAG, &format!("W/\"{}\"", d.version()));
    if let Some(lm) = http_date(d.last_updated()) {
        set(&mut r, header::LAST_MODIFIED, &lm);
    }
    r
}

/// `Prefer: return=…` (FHIR R4 §3.1.0.1.6): what a write answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

/// The `Prefer` header (RFC 7240) as FHIR uses it: `return` for writes, `handling` for
/// searches (`strict` refuses unknown parameters; `lenient`, the default, lists them).
#[derive(Clone, Copy)]
pub(crate) struct Prefer {
    pub(crate) ret: Option<Return>,
    pub(crate) strict: bool,
}

pub(crate) fn prefer(h: &HeaderMap) -> Result<Prefer, ApiError> {
    let mut p = Prefer {
        ret: None,
        strict: false,
    };
    for v in h.get_all("prefer") {
        let v = v
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid Prefer header"))?;
        for pref in v.split([',', ';']) {
            let Some((k, val)) = pref.split_once('=') else {
                continue;
            };
            match (k.trim().to_ascii_lowercase().as_str(), val.trim().trim_matches('"')) {
                ("return", "minimal") => p.ret = Some(Return::Minimal),
                ("return", "representation") => p.ret = Some(Return::Representation),
                ("return", "OperationOutcome") => p.ret = Some(Return::OperationOutcome),
                ("return", other) => {
                    return Err(ApiError::bad_request(format!(
                        "Prefer: return={} is not supported (minimal, representation or OperationOutcome)",
                        other.chars().take(40).collect::<String>()
                    )))
                }
                ("handling", "strict") => p.strict = true,
                ("handling", "lenient") => p.strict = false,
                ("handling", _) => {
                    return Err(ApiError::bad_request(
                        "Prefer: handling must be strict or lenient",
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(p)
}

/// Refuses a request that carries a header medvault would otherwise ignore (conditional
/// headers that do not apply to the interaction): 400 naming it.
fn refuse_headers(h: &HeaderMap, names: &[&str], interaction: &str) -> Result<(), ApiError> {
    for n in names {
        if h.contains_key(n.to_ascii_lowercase().as_str()) {
            return Err(ApiError::bad_request(format!(
                "{n} is not supported on {interaction}"
            )));
        }
    }
    Ok(())
}

fn stored_outcome(w: &Written) -> Value {
    let what = if w.created {
        "created"
    } else {
        "updated or found"
    };
    operation_outcome(
        &[Issue::info(
            IssueCode::Informational,
            format!("{}/{} {what}, version {}", w.rtype, w.id, w.version),
        )],
        None,
    )
}

fn written_response(w: &Written, base: &str, ret: Return) -> Response {
    let status = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut r = match (&w.body, ret) {
        (_, Return::Minimal) => {
            let mut r = axum::response::IntoResponse::into_response(status);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            r
        }
        (_, Return::OperationOutcome) => json_response(status, &stored_outcome(w)),
        (Some(d), Return::Representation) => resource_response(status, d),
        (None, Return::Representation) => json_response(
            status,
            &operation_outcome(
                &[Issue::info(
                    IssueCode::Informational,
                    "stored; your role may not read it back".into(),
                )],
                None,
            ),
        ),
    };
    set(&mut r, header::ETAG, &format!("W/\"{}\"", w.version));
    set(
        &mut r,
        header::LOCATION,
        &format!("{base}/{}/{}/_history/{}", w.rtype, w.id, w.version),
    );
    if let Some(lm) = http_date(&w.last_updated) {
        set(&mut r, header::LAST_MODIFIED, &lm);
    }
    r
}

fn require_fhir_json(h: &HeaderMap) -> Result<(), ApiError> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime == "application/fhir+json" || mime == "application/json" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueCode::NotSupported,
            "Content-Type must be application/fhir+json",
        ))
    }
}

/// The one OperationOutcome entry of a search (search mode `outcome`): what was withheld
/// (once per response, never per page) and which parameters were ignored.
fn outcome_entry(r: &SearchResult) -> Option<Value> {
    let mut issues = vec![];
    if !r.withheld.is_empty() {
        let cats: Vec<&str> = r.withheld.iter().map(|c| c.as_str()).collect();
        issues.push(Issue::warning(
            IssueCode::Suppressed,
            format!(
                "entries withheld: your role may not see {} for this purpose of use",
                cats.join(", ")
            ),
        ));
    }
    if r.limited_to_relationships {
        issues.push(Issue::info(
            IssueCode::Suppressed,
            "results are limited to the charts of patients you have a treatment relationship with (care team or recent encounter) or a break-the-glass grant for".to_owned(),
        ));
    }
    if !r.unknown.is_empty() {
        issues.push(Issue::warning(
            IssueCode::NotSupported,
            format!(
                "parameters ignored (unknown or not supported): {}; send Prefer: handling=strict to have them refused",
                r.unknown.join(", ")
            ),
        ));
    }
    if issues.is_empty() {
        return None;
    }
    let oo = operation_outcome(&issues, None);
    Some(json!({"resource": oo, "search": {"mode": "outcome"}}))
}

fn subsetted_meta(b: &mut Map<String, Value>, r: &SearchResult) {
    if !r.withheld.is_empty() || r.limited_to_relationships {
        b.insert(
            "meta".into(),
            json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
                "display": "subsetted"}]}),
        );
    }
}

/// A searchset Bundle (FHIR R4 §3.1.1.2): `total`, `self` and `next` links, matches, what
/// `_include` added (mode `include`), and the outcome entry.
fn search_bundle(
    r: &SearchResult,
    base: &str,
    self_link: String,
    next: Option<String>,
    summary: Summary,
    elements: &[String],
) -> Value {
    let entry = |d: &Disclosed, mode: &str| -> Option<Value> {
        let res = d.json()?;
        let res = match subset(res, summary, elements) {
            Some(sub) => Value::Object(sub),
            None => Value::Object(res.clone()),
        };
        Some(
            json!({"fullUrl": format!("{base}/{}/{}", d.rtype(), d.id()), "resource": res, "search": {"mode": mode}}),
        )
    };
    let mut entries: Vec<Value> = r.entries.iter().filter_map(|d| entry(d, "match")).collect();
    entries.extend(r.included.iter().filter_map(|d| entry(d, "include")));
    if let Some(w) = outcome_entry(r) {
        entries.push(w);
    }
    let mut links = vec![json!({"relation": "self", "url": self_link})];
    if let Some(n) = next {
        links.push(json!({"relation": "next", "url": n}));
    }
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("type".into(), json!("searchset"));
    subsetted_meta(&mut b, r);
    if let Some(t) = r.total {
        b.insert("total".into(), json!(t));
    }
    b.insert("link".into(), Value::Array(links));
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Value::Object(b)
}

/// The query string as received, for links (`_cursor` replaced by the next one).
fn link_with(base: &str, path: &str, params: &[(String, String)], cursor: Option<&str>) -> String {
    let mut p: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .cloned()
        .collect();
    if let Some(c) = cursor {
        p.push(("_cursor".into(), c.to_owned()));
    }
    let q = serde_urlencoded::to_string(&p).unwrap_or_default();
    if q.is_empty() {
        format!("{base}/{path}")
    } else {
        format!("{base}/{path}?{q}")
    }
}

fn query_params(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(&raw.unwrap_or_default())
        .map_err(|_| ApiError::bad_request("malformed query string"))
}

fn summary_of(params: &[(String, String)]) -> (Summary, Vec<String>) {
    let mut summary = Summary::Full;
    let mut elements = vec![];
    for (k, v) in params {
        match (k.as_str(), v.as_str()) {
            ("_summary", "true") => summary = Summary::True,
            ("_summary", "data") => summary = Summary::Data,
            ("_summary", "text") => summary = Summary::Text,
            ("_summary", "count") => summary = Summary::Count,
            ("_elements", v) => elements.extend(v.split(',').map(|e| e.trim().to_owned())),
            _ => {}
        }
    }
    (summary, elements)
}

/// The CapabilityStatement, built and serialized once (it was rebuilt on every request).
static CAPABILITY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

pub(crate) async fn metadata(State(_): State<AppState>) -> Response {
    let body = CAPABILITY.get_or_init(|| {
        serde_json::to_vec(&capability_statement(
            env!("CARGO_PKG_VERSION"),
            "2026-11-29",
        ))
        .unwrap_or_default()
    });
    let mut r = axum::response::IntoResponse::into_response((StatusCode::OK, body.clone()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::FHIR_JSON),
    );
    r
}

pub(crate) async fn search(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    let pending = pending_caller(&ctx)?;
    let strict = prefer(&headers)?.strict;
    let params = query_params(query)?;
    let vault = state.vault.clone();
    let p2 = params.clone();
    let r = blocking(move || vault.search(&pending.resolve(&vault)?, rt, &p2, strict)).await??;
    let base = &ctx.base;
    let (summary, elements) = summary_of(&params);
    let next = r
        .next
        .as_deref()
        .map(|cur| link_with(base, rt.as_str(), &params, Some(cur)));
    let self_link = link_with(base, rt.as_str(), &params, None);
    Ok(json_response(
        StatusCode::OK,
        &search_bundle(&r, base, self_link, next, summary, &elements),
    ))
}

pub(crate) async fn create(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    let pending = pending_caller(&ctx)?;
    require_fhir_json(req.headers())?;
    refuse_headers(
        req.headers(),
        &["If-Match", "If-None-Match", "If-Modified-Since"],
        "create",
    )?;
    let ret = prefer(req.headers())?.ret.unwrap_or(Return::Representation);
    let if_none_exist = header_text(req.headers(), "If-None-Exist")?;
    let base = ctx.base.clone();
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let w = blocking(move || {
        let c = pending.resolve(&vault)?;
        let res = Resource::parse(&body, Some(rt))?;
        match if_none_exist {
            Some(q) if q.trim_start_matches('?').is_empty() => Err(
                medvault_core::VaultError::BadRequest("If-None-Exist is empty".into()),
            ),
            Some(q) => {
                let q = q.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or(q);
                vault.create_if_none_exist(&c, res, &q)
            }
            None => vault.create(&c, res),
        }
    })
    .await??;
    Ok(written_response(&w, &base, ret))
}

pub(crate) async fn read(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    valid_id(&id)?;
    let pending = pending_caller(&ctx)?;
    let (summary, elements) = read_params(query)?;
    refuse_headers(&headers, &["If-Match", "If-None-Exist"], "read")?;
    let not_if = header_text(&headers, "If-None-Match")?
        .map(|v| if_none_match(&v, "If-None-Match"))
        .transpose()?;
    let since = header_text(&headers, "If-Modified-Since")?
        .map(|v| {
            time::PrimitiveDateTime::parse(&v, HTTP_DATE)
                .map(|t| t.assume_utc())
                .map_err(|_| ApiError::bad_request("If-Modified-Since must be an HTTP date"))
        })
        .transpose()?;
    let vault = state.vault.clone();
    let d = blocking(move || vault.read(&pending.resolve(&vault)?, rt, &id)).await??;
    // Conditional read (FHIR R4 §3.1.0.4): 304 when the client's copy is current.
    let unchanged = match (not_if, since) {
        (Some(n), _) => {
            matches!(n, medvault_fhir::bundle::IfNoneMatch::Any)
                || n == medvault_fhir::bundle::IfNoneMatch::Version(d.version())
        }
        (None, Some(t)) => time::OffsetDateTime::parse(
            d.last_updated(),
            &time::format_description::well_known::Rfc3339,
        )
        .is_ok_and(|lu| lu.replace_millisecond(0).unwrap_or(lu) <= t),
        (None, None) => false,
    };
    if unchanged {
        let mut r = axum::response::IntoResponse::into_response(StatusCode::NOT_MODIFIED);
        set(&mut r, header::ETAG, &format!("W/\"{}\"", d.version()));
        return Ok(r);
    }
    Ok(subset_response(&d, summary, &elements))
}

/// The parameters a read or vread takes: `_summary` and `_elements` (FHIR R4
/// §3.1.1.5.11–12); anything else is a 400 naming it, never silently ignored.
fn read_params(query: Option<String>) -> Result<(Summary, Vec<String>), ApiError> {
    let params = query_params(query)?;
    for (k, v) in &params {
        let ok = match k.as_str() {
            "_summary" => ["true", "false", "text", "data"].contains(&v.as_str()),
            "_elements" => v
                .split(',')
                .all(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_alphanumeric())),
            "_format" | "_pretty" => true,
            _ => false,
        };
        if !ok {
            return Err(ApiError::bad_request(format!(
                "`{}={}` is not supported on a read (_summary=true|false|text|data and _elements are)",
                k.chars().take(40).collect::<String>(),
                v.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(summary_of(&params))
}

/// A resource as `_summary`/`_elements` ask, with its ETag.
fn subset_response(d: &Disclosed, summary: Summary, elements: &[String]) -> Response {
    match d.json().and_then(|j| subset(j, summary, elements)) {
        Some(sub) => {
            let mut r = json_response(StatusCode::OK, &Value::Object(sub));
            set(&mut r, header::ETAG, &format!("W/\"{}\"", d.version()));
            r
        }
        None => resource_response(StatusCode::OK, d),
    }
}

const HTTP_DATE: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

fn header_text(h: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    h.get(name)
        .map(|v| {
            v.to_str()
                .map(|s| s.trim().to_owned())
                .map_err(|_| ApiError::bad_request(format!("invalid {name} header")))
        })
        .transpose()
}

/// `If-Match` and `If-None-Match` of a write, with the rules Bundle entries also follow.
fn precondition(h: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = header_text(h, "If-Match")?
        .map(|v| etag_version(&v, "If-Match"))
        .transpose()?;
    let if_none_match = header_text(h, "If-None-Match")?
        .map(|v| if_none_match(&v, "If-None-Match"))
        .transpose()?;
    Ok(Precondition {
        if_match,
        if_none_match,
    })
}

pub(crate) async fn update(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    valid_id(&id)?;
    let c = caller(&state, &ctx).await?;
    let (pre, ret) = update_headers(req.headers())?;
    let base = ctx.base.clone();
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let w = blocking(move || {
        let res = Resource::parse(&body, Some(rt))?;
        vault.update(&c, &id, res, pre)
    })
    .await??;
    Ok(written_response(&w, &base, ret))
}

/// What an update's headers ask: its preconditions and `Prefer: return`; refuses what
/// does not apply to an update.
fn update_headers(h: &HeaderMap) -> Result<(Precondition, Return), ApiError> {
    require_fhir_json(h)?;
    refuse_headers(h, &["If-None-Exist", "If-Modified-Since"], "update")?;
    Ok((
        precondition(h)?,
        prefer(h)?.ret.unwrap_or(Return::Representation),
    ))
}

/// `PUT /fhir/{type}?{search}`: conditional update (FHIR R4 §3.1.0.4.2).
pub(crate) async fn update_where(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    let c = caller(&state, &ctx).await?;
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Err(ApiError::bad_request(
            "PUT on a type needs a search (conditional update): PUT /fhir/Type?param=value",
        ));
    };
    let (pre, ret) = update_headers(req.headers())?;
    let base = ctx.base.clone();
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let w = blocking(move || {
        let res = Resource::parse(&body, Some(rt))?;
        vault.update_where(&c, &query, res, pre)
    })
    .await??;
    Ok(written_response(&w, &base, ret))
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    valid_id(&id)?;
    let c = caller(&state, &ctx).await?;
    refuse_headers(
        &headers,
        &["If-None-Exist", "If-None-Match", "If-Modified-Since"],
        "delete",
    )?;
    let pre = precondition(&headers)?;
    let vault = state.vault.clone();
    let v = blocking(move || vault.delete(&c, rt, &id, pre)).await??;
    let mut r = json_response(
        StatusCode::OK,
        &operation_outcome(
            &[Issue::info(IssueCode::Informational, "deleted".into())],
            None,
        ),
    );
    set(&mut r, header::ETAG, &format!("W/\"{v}\""));
    Ok(r)
}

pub(crate) async fn vread(
    State(state): State<AppState>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    valid_id(&id)?;
    let v: u64 = vid
        .parse()
        .map_err(|_| ApiError::bad_request("version id must be a number"))?;
    let c = caller(&state, &ctx).await?;
    let (summary, elements) = read_params(query)?;
    let vault = state.vault.clone();
    let d = blocking(move || vault.vread(&c, rt, &id, v)).await??;
    Ok(subset_response(&d, summary, &elements))
}

pub(crate) async fn instance_op(
    State(state): State<AppState>,
    Path((rtype, id, op)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let rt = resource_type(&rtype)?;
    valid_id(&id)?;
    let base = ctx.base.clone();
    match op.as_str() {
        "_history" => {
            let c = caller(&state, &ctx).await?;
            let vault = state.vault.clone();
            let id2 = id.clone();
            let r = blocking(move || vault.history(&c, rt, &id2)).await??;
            let mut entries: Vec<Value> = r
                .entries
                .iter()
                .map(|d| {
                    let url = format!("{rt}/{}", d.id());
                    match d.json() {
                        Some(res) => json!({"fullUrl": format!("{base}/{url}"), "resource": res,
                            "request": if d.version() == 1 { json!({"method": "POST", "url": rt.as_str()}) } else { json!({"method": "PUT", "url": url}) },
                            "response": {"status": if d.version() == 1 { "201" } else { "200" }, "etag": format!("W/\"{}\"", d.version()),
                                         "lastModified": d.last_updated()}}),
                        None => json!({"fullUrl": format!("{base}/{url}"), "request": {"method": "DELETE", "url": url},
                            "response": {"status": "204", "etag": format!("W/\"{}\"", d.version()), "lastModified": d.last_updated()}}),
                    }
                })
                .collect();
            if let Some(w) = outcome_entry(&r) {
                entries.push(w);
            }
            let mut b = Map::new();
            b.insert("resourceType".into(), json!("Bundle"));
            b.insert("type".into(), json!("history"));
            subsetted_meta(&mut b, &r);
            b.insert(
                "link".into(),
                json!([{"relation": "self", "url": format!("{base}/{rt}/{id}/_history")}]),
            );
            b.insert("entry".into(), Value::Array(entries));
            Ok(json_response(StatusCode::OK, &Value::Object(b)))
        }
        "$everything" if rt.as_str() == "Patient" => {
            let pending = pending_caller(&ctx)?;
            let params = query_params(query)?;
            let vault = state.vault.clone();
            let id2 = id.clone();
            let p2 = params.clone();
            let r =
                blocking(move || vault.everything(&pending.resolve(&vault)?, &id2, &p2)).await??;
            let path = format!("Patient/{id}/$everything");
            let next = r
                .next
                .as_deref()
                .map(|cur| link_with(&base, &path, &params, Some(cur)));
            let link = link_with(&base, &path, &params, None);
            Ok(json_response(
                StatusCode::OK,
                &search_bundle(&r, &base, link, next, Summary::Full, &[]),
            ))
        }
        _ => Err(ApiError::not_found()),
    }
}

pub(crate) async fn transaction(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    require_fhir_json(req.headers())?;
    refuse_headers(
        req.headers(),
        &[
            "If-Match",
            "If-None-Match",
            "If-None-Exist",
            "If-Modified-Since",
        ],
        "a transaction (put them in each entry's request)",
    )?;
    let ret = prefer(req.headers())?.ret.unwrap_or(Return::Minimal);
    let base = ctx.base.clone();
    let body = body_bytes(&state, req).await?;
    let vault = state.vault.clone();
    let results = blocking(move || {
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            medvault_core::VaultError::Fhir(medvault_fhir::FhirError::Malformed(short_json_error(
                &e,
            )))
        })?;
        vault.transaction(&c, v, "transaction", ret == Return::Representation)
    })
    .await??;
    let entries: Vec<Value> = results
        .iter()
        .map(|e| {
            let mut entry = Map::new();
            let mut resp = Map::new();
            resp.insert("status".into(), json!(e.status));
            resp.insert("location".into(), json!(format!("{base}/{}", e.location)));
            if let Some(w) = &e.written {
                resp.insert("etag".into(), json!(format!("W/\"{}\"", w.version)));
                resp.insert("lastModified".into(), json!(w.last_updated));
                entry.insert(
                    "fullUrl".into(),
                    json!(format!("{base}/{}/{}", w.rtype, w.id)),
                );
                match ret {
                    Return::Representation => {
                        if let Some(body) = w.body.as_ref().and_then(|d| d.json()) {
                            entry.insert("resource".into(), Value::Object(body.clone()));
                        }
                    }
                    Return::OperationOutcome => {
                        resp.insert("outcome".into(), stored_outcome(w));
                    }
                    Return::Minimal => {}
                }
            } else if ret == Return::OperationOutcome {
                resp.insert(
                    "outcome".into(),
                    operation_outcome(
                        &[Issue::info(IssueCode::Informational, "deleted".into())],
                        None,
                    ),
                );
            }
            entry.insert("response".into(), Value::Object(resp));
            Value::Object(entry)
        })
        .collect();
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("type".into(), json!("transaction-response"));
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Ok(json_response(StatusCode::OK, &Value::Object(b)))
}

fn short_json_error(e: &serde_json::Error) -> String {
    if e.to_string().contains("recursion limit") {
        "JSON nesting too deep".into()
    } else {
        format!("syntax error at line {} column {}", e.line(), e.column())
    }
}

/// `GET /fhir/AuditEvent?…`: BALP AuditEvents for privacy officers and auditors, newest
/// first, paged (`next` continues before the last event returned).
pub(crate) async fn audit_events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let params = query_params(query)?;
    let strict = prefer(&headers)?.strict;
    let vault = state.vault.clone();
    let p2 = params.clone();
    let page = blocking(move || vault.audit_events(&c, &p2, strict)).await??;
    let base = &ctx.base;
    let mut entries: Vec<Value> = page
        .events
        .into_iter()
        .map(|e| {
            let id = e.get("id").and_then(Value::as_str).unwrap_or("").to_owned();
            json!({"fullUrl": format!("{base}/AuditEvent/{id}"), "resource": e, "search": {"mode": "match"}})
        })
        .collect();
    let ignored = SearchResult {
        unknown: page.unknown,
        ..Default::default()
    };
    if let Some(o) = outcome_entry(&ignored) {
        entries.push(o);
    }
    let mut links =
        vec![json!({"relation": "self", "url": link_with(base, "AuditEvent", &params, None)})];
    if let Some(cur) = &page.next {
        links.push(
            json!({"relation": "next", "url": link_with(base, "AuditEvent", &params, Some(cur))}),
        );
    }
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("type".into(), json!("searchset"));
    b.insert("link".into(), Value::Array(links));
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Ok(json_response(StatusCode::OK, &Value::Object(b)))
}

/// `GET /fhir/AuditEvent/{id}`: one audit log entry as a BALP AuditEvent.
pub(crate) async fn audit_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let seq: u64 = id.parse().map_err(|_| ApiError::not_found())?;
    let vault = state.vault.clone();
    let ev = blocking(move || vault.audit_event(&c, seq)).await??;
    Ok(json_response(StatusCode::OK, &ev))
}

/// AuditEvents are written by medvault only.
pub(crate) async fn audit_events_read_only() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        "AuditEvent is read-only",
    )
}
