//! Keys, backups and destruction (issue 13): privacy officers request and approve a chart's
//! destruction and read its certificate; security administrators place and release legal
//! holds, watch the master key versions and a rotation's progress, take a backup, verify
//! one and run a restore drill (each after step-up; the server's operator capability does
//! the work through [`BackupConsole`]).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::{DestructionReason, DestructionView, KeyStatus, LegalHoldView, VaultError};
use serde::Deserialize;

use crate::{gate, render, see_other, stepped_gate, Chrome, CodeForm, Signed, Web, WebError};

/// What the console may ask of the backup repository; the binary implements it with the
/// server's operator capability (the web room cannot reach a repository itself). Errors
/// are one line for the page.
pub trait BackupConsole: Send + Sync {
    /// Complete snapshots, newest first.
    fn list(&self) -> Result<Vec<SnapshotLine>, String>;
    /// Takes a snapshot now; a line saying what was stored.
    fn run(&self) -> Result<String, String>;
    /// Verifies snapshot `id`, decrypting every chunk; a line with the verdict.
    fn verify(&self, id: &str) -> Result<String, String>;
    /// Restores the newest snapshot elsewhere and checks it; a line with RTO and RPO.
    fn drill(&self) -> Result<String, String>;
    /// The last drill's report, as lines for people.
    fn last_drill(&self) -> Option<Vec<(String, String)>>;
}

/// One snapshot as the backups page lists it.
#[derive(Debug, Clone)]
pub struct SnapshotLine {
    pub id: String,
    pub created: String,
    pub expires: String,
    pub bytes: u64,
    pub audit_entries: u64,
}

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/privacy/destruction", get(destruction).post(request))
        .route("/privacy/destruction/{id}/certificate", get(certificate))
        .route("/privacy/destruction/{id}/{action}", post(decide))
        .route("/admin/legal-holds", get(holds).post(set_hold))
        .route("/admin/legal-holds/{id}/release", post(release))
        .route("/admin/keys", get(keys))
        .route("/admin/backups", get(backups))
        .route("/admin/backups/{action}", post(backup_action))
}

#[derive(Template)]
#[template(path = "destruction.html")]
struct DestructionPage {
    chrome: Chrome,
    pending: Vec<DestructionView>,
    done: Vec<DestructionView>,
    reasons: Vec<(&'static str, &'static str)>,
    may_act: bool,
}

async fn destruction(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.destructions(c)).await?;
    let (pending, done) = list.into_iter().partition(|d| d.status == "requested");
    render(&DestructionPage {
        chrome: s.chrome(&web, "Destruction", "/privacy/destruction"),
        pending,
        done,
        reasons: DestructionReason::ALL
            .iter()
            .map(|r| (r.as_str(), r.label()))
            .collect(),
        may_act: s.caller.role() == Some(medvault_core::Role::PrivacyOfficer),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestForm {
    patient: String,
    reason: String,
    code: String,
}

async fn request(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RequestForm>,
) -> Result<Response, WebError> {
    let patient = f.patient.trim().to_owned();
    stepped_gate(&web, &s, &f.code, move |v, c| {
        v.request_destruction(c, &patient, &f.reason)
    })
    .await?;
    Ok(see_other("/privacy/destruction"))
}

async fn decide(
    State(web): State<Web>,
    s: Signed,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    let to = format!("/privacy/destruction/{id}/certificate");
    match action.as_str() {
        "approve" => {
            stepped_gate(&web, &s, &f.code, move |v, c| v.approve_destruction(c, &id)).await?;
            Ok(see_other(&to))
        }
        "cancel" => {
            stepped_gate(&web, &s, &f.code, move |v, c| v.cancel_destruction(c, &id)).await?;
            Ok(see_other("/privacy/destruction"))
        }
        _ => Err(WebError::Vault(VaultError::NotFound)),
    }
}

#[derive(Template)]
#[template(path = "certificate.html")]
pub(crate) struct CertificatePage {
    pub chrome: Chrome,
    pub certificate: String,
    pub key: String,
    /// The register the certificate belongs to.
    pub back: &'static str,
}

async fn certificate(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let (certificate, key) = gate(&web, &s, move |v, c| {
        Ok((
            v.destruction_certificate(c, &id)?,
            v.destruction_verifier_key(c)?,
        ))
    })
    .await?;
    render(&CertificatePage {
        chrome: s.chrome(&web, "Certificate of destruction", "/privacy/destruction"),
        certificate,
        key,
        back: "/privacy/destruction",
    })
}

#[derive(Template)]
#[template(path = "legal_holds.html")]
struct HoldsPage {
    chrome: Chrome,
    active: Vec<LegalHoldView>,
    released: Vec<LegalHoldView>,
    may_act: bool,
}

async fn holds(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.legal_holds(c, None)).await?;
    let (active, released) = list.into_iter().partition(|h| h.active);
    render(&HoldsPage {
        chrome: s.chrome(&web, "Legal holds", "/admin/legal-holds"),
        active,
        released,
        may_act: s.caller.role() == Some(medvault_core::Role::SecurityAdmin),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HoldForm {
    patient: String,
    matter: String,
    reason: String,
    code: String,
}

async fn set_hold(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<HoldForm>,
) -> Result<Response, WebError> {
    let patient = f.patient.trim().to_owned();
    stepped_gate(&web, &s, &f.code, move |v, c| {
        v.set_legal_hold(c, &patient, &f.matter, &f.reason)
    })
    .await?;
    Ok(see_other("/admin/legal-holds"))
}

async fn release(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |v, c| v.release_legal_hold(c, &id)).await?;
    Ok(see_other("/admin/legal-holds"))
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage {
    chrome: Chrome,
    status: KeyStatus,
}

async fn keys(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let status = gate(&web, &s, |v, c| v.key_status(c)).await?;
    render(&KeysPage {
        chrome: s.chrome(&web, "Keys", "/admin/keys"),
        status,
    })
}

#[derive(Template)]
#[template(path = "backups.html")]
struct BackupsPage {
    chrome: Chrome,
    configured: bool,
    snapshots: Vec<SnapshotLine>,
    problem: String,
    last_drill: Vec<(String, String)>,
    message: String,
    may_act: bool,
}

fn door(web: &Web) -> Option<Arc<dyn BackupConsole>> {
    web.options.backups.as_ref().map(|b| b.0.clone())
}

async fn backups_page(web: &Web, s: &Signed, message: String) -> Result<Response, WebError> {
    gate(web, s, |v, c| v.authorize_backup(c, "read")).await?;
    let d = door(web);
    let (snapshots, problem, last_drill) = match d {
        Some(d) => {
            crate::blocking(move || {
                let (list, problem) = match d.list() {
                    Ok(l) => (l, String::new()),
                    Err(e) => (vec![], e),
                };
                (list, problem, d.last_drill().unwrap_or_default())
            })
            .await?
        }
        None => (vec![], String::new(), vec![]),
    };
    render(&BackupsPage {
        chrome: s.chrome(web, "Backups", "/admin/backups"),
        configured: web.options.backups.is_some(),
        snapshots,
        problem,
        last_drill,
        message,
        may_act: s.caller.role() == Some(medvault_core::Role::SecurityAdmin),
    })
}

async fn backups(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    backups_page(&web, &s, String::new()).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BackupForm {
    code: String,
    snapshot: String,
}

async fn backup_action(
    State(web): State<Web>,
    s: Signed,
    Path(action): Path<String>,
    Form(f): Form<BackupForm>,
) -> Result<Response, WebError> {
    let act = match action.as_str() {
        "run" | "drill" | "verify" => action.clone(),
        _ => return Err(WebError::Vault(VaultError::NotFound)),
    };
    let what = act.clone();
    stepped_gate(&web, &s, &f.code, move |v, c| v.authorize_backup(c, &what)).await?;
    let Some(d) = door(&web) else {
        return Err(WebError::Form(
            "backups are not available from this server's console".into(),
        ));
    };
    let snapshot = f.snapshot.clone();
    let message = crate::blocking(move || match act.as_str() {
        "run" => d.run(),
        "drill" => d.drill(),
        _ => d.verify(&snapshot),
    })
    .await?
    .unwrap_or_else(|e| format!("Failed: {e}"));
    backups_page(&web, &s, message).await
}
