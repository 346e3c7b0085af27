//! FHIR Bulk Data Access 2.0 over HTTP (<https://hl7.org/fhir/uv/bulkdata/export.html>):
//! kick-off (`Prefer: respond-async`, GET or POST with a Parameters body), status polling
//! (`202` with `X-Progress` and `Retry-After`, then `200` and the manifest), deletion
//! (cancellation) and file download as NDJSON. The gate does the work
//! (`medvault_core::Vault::export_kickoff`); this only parses and renders.

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use medvault_core::{ExportLevel, ExportView};
use medvault_fhir::{Issue, IssueCode};
use serde_json::{json, Value};

use crate::{as_caller, blocking, body_bytes, caller, json_response, ApiError, AppState, Ctx};

/// The media type of a download (Bulk Data §"File Request").
pub(crate) const NDJSON: &str = "application/fhir+ndjson";

/// The parameters of a kick-off: the query string, or a POSTed `Parameters` resource whose
/// `valueString`/`valueInstant` parameters carry the same names.
async fn kickoff_params(
    state: &AppState,
    raw: Option<String>,
    req: Request,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(&raw.unwrap_or_default())
        .map_err(|_| ApiError::bad_request("malformed query string"))?;
    if req.method() == axum::http::Method::POST {
        let bytes = body_bytes(state, req).await?;
        if !bytes.is_empty() {
            let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
                ApiError::bad_request("the kick-off body must be a FHIR Parameters resource")
            })?;
            if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return Err(ApiError::bad_request(
                    "the kick-off body must be a FHIR Parameters resource",
                ));
            }
            for p in v
                .get("parameter")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                let value = ["valueString", "valueInstant", "valueCode"]
                    .iter()
                    .find_map(|k| p.get(*k).and_then(Value::as_str));
                match value {
                    Some(v) if !name.is_empty() => params.push((name.to_owned(), v.to_owned())),
                    _ => {
                        return Err(ApiError::bad_request(
                            "each kick-off parameter needs a name and a valueString, valueInstant or valueCode",
                        ))
                    }
                }
            }
        }
    }
    Ok(params)
}

async fn kickoff(
    state: AppState,
    ctx: Ctx,
    level: ExportLevel,
    path: &str,
    raw: Option<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let prefer_async = req
        .headers()
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("respond-async"));
    if !prefer_async {
        return Err(ApiError::bad_request(
            "$export is asynchronous: send Prefer: respond-async",
        ));
    }
    let request = match &raw {
        Some(q) if !q.is_empty() => format!("{}/{path}?{q}", ctx.base),
        _ => format!("{}/{path}", ctx.base),
    };
    let params = kickoff_params(&state, raw, req).await?;
    let c = caller(&state, &ctx).await?;
    let vault = state.vault.clone();
    let id = blocking({
        let vault = vault.clone();
        move || vault.export_kickoff(&c, level, &params, &request)
    })
    .await??;
    // The export runs on its own blocking thread; its status says how far it is.
    let job = id.clone();
    tokio::task::spawn_blocking(move || vault.run_export(&job));
    let mut r = json_response(
        StatusCode::ACCEPTED,
        &medvault_fhir::operation_outcome(
            &[Issue::info(
                IssueCode::Informational,
                "export accepted; poll the Content-Location URL for its status".into(),
            )],
            None,
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{}/$export-status/{id}", ctx.base)) {
        r.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(r)
}

/// `GET|POST /fhir/$export` (system level: backend clients).
pub(crate) async fn system(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    kickoff(state, ctx, ExportLevel::System, "$export", raw, req).await
}

/// `GET|POST /fhir/Patient/$export`.
pub(crate) async fn patients(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    kickoff(
        state,
        ctx,
        ExportLevel::Patient,
        "Patient/$export",
        raw,
        req,
    )
    .await
}

/// `GET|POST /fhir/Group/{id}/$export` (`my-patients`: the caller's charts).
pub(crate) async fn group(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(ApiError::not_found());
    }
    let path = format!("Group/{id}/$export");
    kickoff(state, ctx, ExportLevel::Group(id), &path, raw, req).await
}

fn job_id(id: &str) -> Result<(), ApiError> {
    if id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        Ok(())
    } else {
        Err(ApiError::not_found())
    }
}

/// The completion manifest (Bulk Data §"Response - Complete Status").
fn manifest(v: &ExportView, base: &str) -> Value {
    let output: Vec<Value> = v
        .output
        .iter()
        .filter(|o| !o.downloaded)
        .map(|o| {
            json!({"type": o.rtype, "url": format!("{base}/$export-file/{}/{}", v.id, o.name),
                   "count": o.count})
        })
        .collect();
    let mut m = json!({
        "transactionTime": v.transaction_time,
        "request": v.request,
        "requiresAccessToken": true,
        "output": output,
        "deleted": [],
        "error": [],
    });
    let mut ext = serde_json::Map::new();
    if let Some(method) = &v.deidentified {
        ext.insert(
            medvault_fhir::deid::METHOD_SYSTEM.into(),
            json!({"method": method, "standard": "45 CFR 164.514(b)(2)"}),
        );
    }
    if v.part2 {
        ext.insert(
            "https://medvault.dev/fhir/42-cfr-part-2".into(),
            json!("records under 42 CFR Part 2 are included; see OperationOutcome.ndjson for the notice prohibiting redisclosure"),
        );
    }
    if !ext.is_empty() {
        if let Some(o) = m.as_object_mut() {
            o.insert("extension".into(), Value::Object(ext));
        }
    }
    m
}

/// `GET /fhir/$export-status/{id}`.
pub(crate) async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    job_id(&id)?;
    let base = ctx.base.clone();
    let v = as_caller(&state, &ctx, move |v, c| v.export_status(c, &id)).await?;
    match v.state.as_str() {
        "complete" => {
            let mut r = (
                StatusCode::OK,
                serde_json::to_vec(&manifest(&v, &base)).unwrap_or_default(),
            )
                .into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(e) = v.expires {
                if let Ok(h) = HeaderValue::from_str(
                    &time::OffsetDateTime::from_unix_timestamp(e)
                        .ok()
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc2822)
                                .ok()
                        })
                        .unwrap_or_default(),
                ) {
                    r.headers_mut().insert(header::EXPIRES, h);
                }
            }
            Ok(r)
        }
        "failed" => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            format!(
                "the export failed: {}",
                v.error.as_deref().unwrap_or("unknown cause")
            ),
        )),
        _ => {
            let mut r = StatusCode::ACCEPTED.into_response();
            let progress = format!("{}: {}/{} charts", v.state, v.done, v.total);
            if let Ok(h) = HeaderValue::from_str(&progress) {
                r.headers_mut().insert("x-progress", h);
            }
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(r)
        }
    }
}

/// `DELETE /fhir/$export-status/{id}`: cancels the job and deletes its files.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    job_id(&id)?;
    as_caller(&state, &ctx, move |v, c| v.cancel_export(c, &id)).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &medvault_fhir::operation_outcome(
            &[Issue::info(
                IssueCode::Informational,
                "export cancelled; its files are deleted".into(),
            )],
            None,
        ),
    ))
}

/// `GET /fhir/$export-file/{id}/{name}`: one NDJSON file, once.
pub(crate) async fn file(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    job_id(&id)?;
    if !name.ends_with(".ndjson")
        || name.len() > 80
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
    {
        return Err(ApiError::not_found());
    }
    let bytes = as_caller(&state, &ctx, move |v, c| v.export_file(c, &id, &name)).await?;
    let mut r = (StatusCode::OK, bytes).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(r)
}
