//! Compliance over HTTP (SPEC "Compliance, incidents and training"): accounting-of-
//! disclosures requests, breach assessment, incidents and their response, the asset
//! inventory, training, the safeguards report and risk register, and reminders. Handlers
//! parse, call the gate and render; every decision and audit record is the gate's.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use medvault_core::governance::response::Asset;
use medvault_core::governance::safeguards::{Attestation, Risk};
use medvault_core::governance::training::Course;
use medvault_core::{CompletionInput, IncidentAction, NewIncident, TrainingSettings};
use serde::Deserialize;
use serde_json::json;

use crate::admin::{text, QueryResult};
use crate::records::body;
use crate::{as_caller, blocking, body_bytes, caller, plain_json, ApiError, AppState, Ctx};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Requested {
    requested: String,
}

/// `POST /api/patients/{id}/accounting-requests {"requested": "YYYY-MM-DD"}` → `201`.
pub(crate) async fn request_accounting(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let r: Requested = body(&state, req, "{\"requested\": \"YYYY-MM-DD\"}").await?;
    let vault = state.vault.clone();
    let out = blocking(move || vault.request_accounting(&c, &id, &r.requested)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(out)))
}

/// `GET /api/accounting-requests`.
pub(crate) async fn accounting_requests(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.accounting_requests(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "requests": v })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reason {
    reason: String,
}

/// `POST /api/accounting-requests/{id}/extend {"reason"}`.
pub(crate) async fn extend_accounting(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let r: Reason = body(&state, req, "{\"reason\"}").await?;
    let vault = state.vault.clone();
    let out = blocking(move || vault.update_accounting(&c, &id, Some(&r.reason))).await??;
    Ok(plain_json(StatusCode::OK, json!(out)))
}

/// `POST /api/accounting-requests/{id}/provided`.
pub(crate) async fn accounting_provided(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let out = as_caller(&state, &ctx, move |v, c| v.update_accounting(c, &id, None)).await?;
    Ok(plain_json(StatusCode::OK, json!(out)))
}

/// `POST /api/breach/assess` with facts → the decision (the rule alone; nothing stored).
pub(crate) async fn assess(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let bytes = body_bytes(&state, req).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("facts must be UTF-8 JSON"))?;
    let vault = state.vault.clone();
    let d = blocking(move || vault.assess_breach(&c, &text)).await??;
    Ok(plain_json(StatusCode::OK, json!(d)))
}

/// `POST /api/incidents` with {"title","severity","playbook","patients"} → `201`.
pub(crate) async fn open_incident(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let n: NewIncident = body(
        &state,
        req,
        "{\"title\",\"severity\",\"playbook\",\"patients\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let i = blocking(move || vault.open_incident(&c, n)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(i)))
}

/// `GET /api/incidents/{id}`.
pub(crate) async fn incident(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let i = as_caller(&state, &ctx, move |v, c| v.incident(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(i)))
}

/// `POST /api/incidents/{id}` with {"action": …}.
pub(crate) async fn act(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let a: IncidentAction = body(
        &state,
        req,
        "{\"action\": severity|assign|playbook|task|phase|acknowledge|evidence|scope|compute_affected|asset|assess|note|close, …}",
    )
    .await?;
    let vault = state.vault.clone();
    let i = blocking(move || vault.act_on_incident(&c, &id, a)).await??;
    Ok(plain_json(StatusCode::OK, json!(i)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatientParam {
    patient: String,
}

/// `GET /api/incidents/{id}/letter?patient=P` → the individual notice, as text.
pub(crate) async fn letter(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    q: QueryResult<PatientParam>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("give the patient: ?patient=ID"))?;
    let l = as_caller(&state, &ctx, move |v, c| {
        v.breach_letter(c, &id, &q.patient)
    })
    .await?;
    Ok(text(l))
}

/// `GET /api/incidents/{id}/hhs-report`.
pub(crate) async fn hhs_report(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.hhs_report(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(r)))
}

/// `GET /api/assets`.
pub(crate) async fn assets(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let a = as_caller(&state, &ctx, move |v, c| v.assets(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "assets": a })))
}

/// `PUT /api/assets/{id}` with an asset.
pub(crate) async fn put_asset(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let mut a: Value = body(&state, req, "an asset {\"kind\",\"owner\",\"location\",\"encrypted\",\"last_check\",\"status\",\"holds_phi\"}").await?;
    if let Some(o) = a.as_object_mut() {
        if o.get("id").is_some_and(|v| v.as_str() != Some(id.as_str())) {
            return Err(ApiError::bad_request(
                "the asset's id differs from the path",
            ));
        }
        o.insert("id".into(), json!(id));
    }
    let a: Asset = serde_json::from_value(a)
        .map_err(|e| ApiError::bad_request(format!("body must be an asset: {e}")))?;
    let vault = state.vault.clone();
    let a = blocking(move || vault.put_asset(&c, a)).await??;
    Ok(plain_json(StatusCode::OK, json!(a)))
}

use serde_json::Value;

/// `GET /api/training`.
pub(crate) async fn training(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let d = as_caller(&state, &ctx, move |v, c| v.training_dashboard(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(d)))
}

/// `GET /api/training/mine`.
pub(crate) async fn my_training(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let d = as_caller(&state, &ctx, move |v, c| v.my_training(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(d)))
}

/// `PUT /api/training/courses/{id}` with a course.
pub(crate) async fn put_course(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let mut v: Value = body(
        &state,
        req,
        "a course {\"title\",\"topic\",\"roles\",\"renewal_months\",\"assigned\"}",
    )
    .await?;
    if let Some(o) = v.as_object_mut() {
        if o.get("id").is_some_and(|x| x.as_str() != Some(id.as_str())) {
            return Err(ApiError::bad_request(
                "the course's id differs from the path",
            ));
        }
        o.insert("id".into(), json!(id));
    }
    let course: Course = serde_json::from_value(v)
        .map_err(|e| ApiError::bad_request(format!("body must be a course: {e}")))?;
    let vault = state.vault.clone();
    let course = blocking(move || vault.put_course(&c, course)).await??;
    Ok(plain_json(StatusCode::OK, json!(course)))
}

/// `PUT /api/training/settings {"grace_days"}`.
pub(crate) async fn training_settings(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let s: TrainingSettings = body(&state, req, "{\"grace_days\"}").await?;
    let vault = state.vault.clone();
    let s = blocking(move || vault.set_training_settings(&c, s)).await??;
    Ok(plain_json(StatusCode::OK, json!(s)))
}

/// `POST /api/training/completions {"course","attestation"[, "user", "completed"]}` →
/// `201` with the learner's standing.
pub(crate) async fn complete(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let i: CompletionInput = body(
        &state,
        req,
        "{\"course\",\"attestation\",\"user\",\"completed\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let s = blocking(move || vault.record_completion(&c, i)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(s)))
}

/// `POST /api/training/phishing` with CSV `user,campaign,clicked,reported,date`.
pub(crate) async fn phishing(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let bytes = body_bytes(&state, req).await?;
    let csv = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the phishing export must be UTF-8 CSV"))?;
    let vault = state.vault.clone();
    let n = blocking(move || vault.import_phishing(&c, &csv)).await??;
    Ok(plain_json(StatusCode::OK, json!({ "imported": n })))
}

/// `GET /api/compliance/safeguards`.
pub(crate) async fn safeguards(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.safeguards(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(r)))
}

/// `POST /api/compliance/attestations {"safeguard","owner","date","note","in_place"}`.
pub(crate) async fn attest(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let a: Attestation = body(
        &state,
        req,
        "{\"safeguard\",\"owner\",\"date\",\"note\",\"in_place\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let a = blocking(move || vault.attest_safeguard(&c, a)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(a)))
}

/// `PUT /api/compliance/risks/{id}` with a risk.
pub(crate) async fn put_risk(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let mut r: Risk = body(
        &state,
        req,
        "a risk {\"title\",\"likelihood\",\"impact\",\"owner\",\"treatment\",\"review_by\"}",
    )
    .await?;
    if !r.id.is_empty() && r.id != id {
        return Err(ApiError::bad_request("the risk's id differs from the path"));
    }
    r.id = id;
    let vault = state.vault.clone();
    let r = blocking(move || vault.put_risk(&c, r)).await??;
    Ok(plain_json(StatusCode::OK, json!(r)))
}

/// `POST /api/compliance/reviews`: records the quarterly review.
pub(crate) async fn review(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.record_review(c)).await?;
    Ok(plain_json(StatusCode::CREATED, json!(r)))
}

/// `GET /api/reminders`.
pub(crate) async fn reminders(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let r = as_caller(&state, &ctx, move |v, c| v.reminders(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "reminders": r })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OptPatient {
    #[serde(default)]
    patient: Option<String>,
}

fn opt_patient(q: QueryResult<OptPatient>) -> Result<Option<String>, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|_| ApiError::bad_request("the only parameter is patient"))?;
    Ok(q.patient)
}

/// `POST /api/privacy/authorizations` → `201`.
pub(crate) async fn authorize(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let a: medvault_core::governance::rights::Authorization = body(
        &state,
        req,
        "{\"patient\",\"recipient\",\"purpose\",\"description\",\"signed\",\"expires\",\"kind\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let a = blocking(move || vault.put_authorization(&c, a)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(a)))
}

/// `GET /api/privacy/authorizations[?patient=ID]`.
pub(crate) async fn authorizations(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<OptPatient>,
) -> Result<Response, ApiError> {
    let p = opt_patient(q)?;
    let v = as_caller(&state, &ctx, move |v, c| v.authorizations(c, p.as_deref())).await?;
    Ok(plain_json(StatusCode::OK, json!({ "authorizations": v })))
}

/// `POST /api/privacy/authorizations/{id}/revoke`.
pub(crate) async fn revoke_authorization(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = as_caller(&state, &ctx, move |v, c| v.revoke_authorization(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, json!(a)))
}

/// `POST /api/privacy/npp-acknowledgements` → `201`.
pub(crate) async fn acknowledge_npp(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let a: medvault_core::NppAcknowledgement = body(
        &state,
        req,
        "{\"patient\",\"date\",\"method\",\"notice_version\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let a = blocking(move || vault.acknowledge_npp(&c, a)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(a)))
}

/// `GET /api/privacy/npp-acknowledgements[?patient=ID]`.
pub(crate) async fn npp_acknowledgements(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<OptPatient>,
) -> Result<Response, ApiError> {
    let p = opt_patient(q)?;
    let v = as_caller(&state, &ctx, move |v, c| {
        v.npp_acknowledgements(c, p.as_deref())
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!({ "acknowledgements": v })))
}

/// `PUT /api/privacy/processing-activities/{id}`.
pub(crate) async fn put_activity(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let mut a: medvault_core::governance::rights::ProcessingActivity = body(
        &state,
        req,
        "an Art. 30 entry {\"name\",\"purposes\",\"lawful_basis\",\"special_category_condition\",\"data_subjects\",\"data_categories\",\"recipients\",\"third_country_transfers\",\"retention\",\"security_measures\"}",
    )
    .await?;
    if !a.id.is_empty() && a.id != id {
        return Err(ApiError::bad_request(
            "the activity's id differs from the path",
        ));
    }
    a.id = id;
    let vault = state.vault.clone();
    let a = blocking(move || vault.put_processing_activity(&c, a)).await??;
    Ok(plain_json(StatusCode::OK, json!(a)))
}

/// `GET /api/privacy/processing-activities`.
pub(crate) async fn activities(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.processing_activities(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "activities": v })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsentBody {
    patient: String,
    activity: String,
    given: String,
}

/// `POST /api/privacy/consents {"patient","activity","given"}` → `201`.
pub(crate) async fn consent(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let b: ConsentBody = body(&state, req, "{\"patient\",\"activity\",\"given\"}").await?;
    let vault = state.vault.clone();
    let pc =
        blocking(move || vault.record_processing_consent(&c, &b.patient, &b.activity, &b.given))
            .await??;
    Ok(plain_json(StatusCode::CREATED, json!(pc)))
}

/// `POST /api/privacy/consents/{id}/withdraw`.
pub(crate) async fn withdraw(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let pc = as_caller(&state, &ctx, move |v, c| {
        v.withdraw_processing_consent(c, &id)
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!(pc)))
}

/// `GET /api/privacy/consents[?patient=ID]`.
pub(crate) async fn consents(
    State(state): State<AppState>,
    ctx: Ctx,
    q: QueryResult<OptPatient>,
) -> Result<Response, ApiError> {
    let p = opt_patient(q)?;
    let v = as_caller(&state, &ctx, move |v, c| {
        v.processing_consents(c, p.as_deref())
    })
    .await?;
    Ok(plain_json(StatusCode::OK, json!({ "consents": v })))
}

/// `POST /api/privacy/requests {"patient","kind","received","jurisdiction"}` → `201`.
pub(crate) async fn open_request(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let n: medvault_core::NewRightsRequest = body(
        &state,
        req,
        "{\"patient\",\"kind\",\"received\",\"jurisdiction\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let r = blocking(move || vault.open_rights_request(&c, n)).await??;
    Ok(plain_json(StatusCode::CREATED, json!(r)))
}

/// `GET /api/privacy/requests`.
pub(crate) async fn requests(
    State(state): State<AppState>,
    ctx: Ctx,
) -> Result<Response, ApiError> {
    let v = as_caller(&state, &ctx, move |v, c| v.rights_requests(c)).await?;
    Ok(plain_json(StatusCode::OK, json!({ "requests": v })))
}

/// `POST /api/privacy/requests/{id}` with {"action": extend|fulfil|refuse, …}.
pub(crate) async fn act_on_request(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let a: medvault_core::RightsAction = body(
        &state,
        req,
        "{\"action\": extend|fulfil|refuse, \"reason\"|\"note\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let r = blocking(move || vault.act_on_rights_request(&c, &id, a)).await??;
    Ok(plain_json(StatusCode::OK, json!(r)))
}

/// `GET /api/privacy/requests/{id}/bundle`: the patient's record as a FHIR Bundle.
pub(crate) async fn request_bundle(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let b = as_caller(&state, &ctx, move |v, c| v.rights_access_bundle(c, &id)).await?;
    Ok(plain_json(StatusCode::OK, b))
}

/// `GET /api/compliance/notice`: the contact procedures breach letters give.
pub(crate) async fn notice(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    let n = as_caller(&state, &ctx, move |v, c| v.notice_settings(c)).await?;
    Ok(plain_json(StatusCode::OK, json!(n)))
}

/// `PUT /api/compliance/notice {"organization","toll_free_phone","email","postal_address","website"}`.
pub(crate) async fn put_notice(
    State(state): State<AppState>,
    ctx: Ctx,
    req: Request,
) -> Result<Response, ApiError> {
    let c = caller(&state, &ctx).await?;
    let n: medvault_core::NoticeSettings = body(
        &state,
        req,
        "{\"organization\",\"toll_free_phone\",\"email\",\"postal_address\",\"website\"}",
    )
    .await?;
    let vault = state.vault.clone();
    let n = blocking(move || vault.set_notice_settings(&c, n)).await??;
    Ok(plain_json(StatusCode::OK, json!(n)))
}
