//! Privacy officers' (and auditors') pages: the break-the-glass review queue, per-patient
//! access reports with a timeline and the accounting of disclosures, AuditEvent search,
//! and the audit log's integrity (latest signed checkpoint, witness cosignatures, a
//! verification of the whole log on demand).

use std::sync::Mutex;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::{AuditVerdict, BreakGlassView};
use serde::Deserialize;
use serde_json::Value;

use crate::chart::{access_rows, timeline, AccessRow};
use crate::{gate, render, see_other, stepped_gate, when, Chrome, Signed, Web, WebError};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/privacy/reviews", get(reviews))
        .route("/privacy/reviews/{id}", post(review))
        .route("/privacy/patients", get(find_patient).post(open_patient))
        .route("/privacy/patients/{id}", get(access_report))
        .route(
            "/privacy/audit-events",
            get(audit_events).post(search_events),
        )
        .route("/privacy/integrity", get(integrity).post(verify))
}

pub(crate) struct ReviewRow {
    pub id: String,
    pub user: String,
    pub patient: String,
    pub reason: String,
    pub justification: String,
    pub created: String,
    pub expires: String,
    pub active: bool,
    pub status: String,
    pub reviewed: String,
    pub note: String,
    pub incident: String,
}

#[derive(Template)]
#[template(path = "reviews.html")]
struct ReviewsPage {
    chrome: Chrome,
    pending: Vec<ReviewRow>,
    closed: Vec<ReviewRow>,
}

fn review_row(v: BreakGlassView) -> ReviewRow {
    ReviewRow {
        id: v.id,
        user: v.user,
        patient: v.patient,
        reason: v.reason.replace('-', " "),
        justification: v.justification,
        created: when(v.created),
        expires: when(v.expires),
        active: v.active,
        status: v.status,
        reviewed: match (v.reviewed_by, v.reviewed_at) {
            (Some(b), Some(a)) => format!("{b}, {}", when(a)),
            (Some(b), None) => b,
            _ => String::new(),
        },
        note: v.note.unwrap_or_default(),
        incident: v.incident.unwrap_or_default(),
    }
}

async fn reviews(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let all = gate(&web, &s, |v, c| v.break_glass_reviews(c, false)).await?;
    let (pending, closed): (Vec<_>, Vec<_>) = all
        .into_iter()
        .map(review_row)
        .partition(|r| r.status == "pending");
    render(&ReviewsPage {
        chrome: s.chrome(&web, "Break-the-glass reviews", "/privacy/reviews"),
        pending,
        closed,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReviewForm {
    outcome: String,
    note: String,
    code: String,
}

async fn review(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<ReviewForm>,
) -> Result<Response, WebError> {
    let (outcome, note) = (crate::field(&f.outcome, 32), crate::field(&f.note, 2000));
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.review_break_glass(c, &id, &outcome, &note)
    })
    .await?;
    Ok(see_other("/privacy/reviews"))
}

#[derive(Template)]
#[template(path = "find_patient.html")]
struct FindPatientPage {
    chrome: Chrome,
}

async fn find_patient(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    render(&FindPatientPage {
        chrome: s.chrome(&web, "Access reports", "/privacy/patients"),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PatientForm {
    patient: String,
}

/// The chart id, posted; the report's URL carries only that opaque id.
async fn open_patient(_s: Signed, Form(f): Form<PatientForm>) -> Result<Response, WebError> {
    let id = f.patient.trim().trim_start_matches("Patient/").to_owned();
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(WebError::Form("Enter the patient's chart id.".into()));
    }
    Ok(see_other(&format!("/privacy/patients/{id}")))
}

#[derive(Template)]
#[template(path = "report.html")]
struct ReportPage {
    chrome: Chrome,
    patient_id: String,
    rows: Vec<AccessRow>,
    timeline: String,
    disclosures: Vec<AccessRow>,
}

async fn access_report(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let pid = id.clone();
    let (report, disclosures) = gate(&web, &s, move |v, c| {
        Ok((v.access_report(c, &pid)?, v.disclosures(c, &pid)?))
    })
    .await?;
    render(&ReportPage {
        chrome: s.chrome(&web, "Access report", "/privacy/patients"),
        patient_id: id,
        timeline: timeline(&report),
        rows: access_rows(&report),
        disclosures: access_rows(&disclosures),
    })
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct EventQuery {
    patient: String,
    agent: String,
    date: String,
    action: String,
}

pub(crate) struct EventRow {
    pub id: String,
    pub recorded: String,
    pub action: String,
    pub agent: String,
    pub entity: String,
    pub outcome: String,
    pub purpose: String,
    /// Under a break-the-glass grant (purpose of event `BTG`).
    pub break_glass: bool,
}

#[derive(Template)]
#[template(path = "audit_events.html")]
struct EventsPage {
    chrome: Chrome,
    query: EventQuery,
    searched: bool,
    events: Vec<EventRow>,
}

async fn audit_events(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    render(&EventsPage {
        chrome: s.chrome(&web, "Audit events", "/privacy/audit-events"),
        query: EventQuery::default(),
        searched: false,
        events: vec![],
    })
}

fn event_row(e: &Value) -> EventRow {
    let s = |p: &str| {
        e.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let entities: Vec<String> = e
        .get("entity")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.pointer("/what/reference").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    EventRow {
        id: s("/id"),
        recorded: s("/recorded")
            .chars()
            .take(19)
            .collect::<String>()
            .replace('T', " "),
        action: [
            "/subtype/0/display",
            "/subtype/0/code",
            "/type/display",
            "/type/code",
        ]
        .iter()
        .map(|p| s(p))
        .find(|a| !a.is_empty())
        .unwrap_or_default(),
        agent: {
            let who = s("/agent/0/who/display");
            if who.is_empty() {
                s("/agent/0/who/identifier/value")
            } else {
                who
            }
        },
        entity: entities.join(", "),
        outcome: match s("/outcome").as_str() {
            "0" => "success".into(),
            "4" => "denied or failed".into(),
            "8" | "12" => "failure".into(),
            o => o.to_owned(),
        },
        purpose: s("/purposeOfEvent/0/coding/0/code"),
        break_glass: e
            .get("purposeOfEvent")
            .and_then(Value::as_array)
            .is_some_and(|ps| {
                ps.iter()
                    .any(|p| p.pointer("/coding/0/code").and_then(Value::as_str) == Some("BTG"))
            }),
    }
}

/// `POST /privacy/audit-events`: an AuditEvent search (patient, agent, date, action),
/// posted so its terms stay out of URLs.
async fn search_events(
    State(web): State<Web>,
    s: Signed,
    Form(q): Form<EventQuery>,
) -> Result<Response, WebError> {
    let q = EventQuery {
        patient: crate::field(&q.patient, 80),
        agent: crate::field(&q.agent, 128),
        date: crate::field(&q.date, 40),
        action: crate::field(&q.action, 40),
    };
    let mut params = vec![("_count".to_owned(), "200".to_owned())];
    for (k, v) in [
        ("patient", &q.patient),
        ("agent", &q.agent),
        ("date", &q.date),
        ("action", &q.action),
    ] {
        if !v.is_empty() {
            params.push((k.to_owned(), v.clone()));
        }
    }
    let page = gate(&web, &s, move |v, c| v.audit_events(c, &params, true)).await?;
    render(&EventsPage {
        chrome: s.chrome(&web, "Audit events", "/privacy/audit-events"),
        query: q,
        searched: true,
        events: page.events.iter().map(event_row).collect(),
    })
}

/// The last verification run from the console on this server.
static LAST_VERIFICATION: Mutex<Option<String>> = Mutex::new(None);

#[derive(Template)]
#[template(path = "integrity.html")]
struct IntegrityPage {
    chrome: Chrome,
    size: String,
    root: String,
    signatures: Vec<(String, String)>,
    note: String,
    verification: String,
}

/// The checkpoint note's signature lines (`— name base64`), as (key name, role): the log's
/// own key first, the rest witness cosignatures (C2SP signed-note, tlog-cosignature).
fn signatures(note: &str) -> Vec<(String, String)> {
    note.lines()
        .filter_map(|l| l.strip_prefix("— "))
        .enumerate()
        .map(|(i, l)| {
            let name = l.split(' ').next().unwrap_or_default().to_owned();
            let role = if i == 0 { "log" } else { "witness cosignature" };
            (name, role.to_owned())
        })
        .collect()
}

async fn integrity(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let note = gate(&web, &s, |v, c| v.latest_checkpoint(c)).await?;
    let note = note.unwrap_or_default();
    let mut lines = note.lines();
    let _origin = lines.next();
    let size = lines.next().unwrap_or_default().to_owned();
    let root = lines.next().unwrap_or_default().to_owned();
    let verification = LAST_VERIFICATION
        .lock()
        .ok()
        .and_then(|v| v.clone())
        .unwrap_or_else(|| "Not verified from the console since this server started.".into());
    render(&IntegrityPage {
        chrome: s.chrome(&web, "Audit log integrity", "/privacy/integrity"),
        signatures: signatures(&note),
        size,
        root,
        note,
        verification,
    })
}

/// `POST /privacy/integrity`: verifies the whole log now (`medvault audit verify`).
async fn verify(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let verdict = gate(&web, &s, |v, c| v.verify_audit(c, &|_, _| {})).await?;
    let text = match verdict {
        AuditVerdict::Intact {
            size, checkpoints, ..
        } => format!(
            "Intact: {size} entries recomputed, {checkpoints} signed checkpoints consistent."
        ),
        AuditVerdict::Broken { index, problem } => {
            format!("BROKEN at entry {index}: {problem}")
        }
    };
    if let Ok(mut v) = LAST_VERIFICATION.lock() {
        *v = Some(text);
    }
    Ok(see_other("/privacy/integrity"))
}
