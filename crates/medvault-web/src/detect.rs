//! Detection pages: the privacy officer's alert queue with its evidence and triage, a
//! user's and a patient's alerts over time (SVG), suppressions; the security
//! administrator's staff profiles (imported from an HR roster).

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::detect::lifecycle::{AlertStatus, Suppression};
use medvault_core::detect::scan::RosterEntry;
use medvault_core::detect::AlertType;
use medvault_core::AlertView;
use serde::Deserialize;

use crate::{gate, render, see_other, svg, when, Chrome, Signed, Web, WebError};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/privacy/alerts", get(queue))
        .route("/privacy/alerts/{id}/status", post(set_status))
        .route("/privacy/alerts/users/{user}", get(by_user))
        .route("/privacy/alerts/patients/{id}", get(by_patient))
        .route("/privacy/suppressions", get(suppressions).post(suppress))
        .route("/privacy/suppressions/{id}/end", post(end_suppression))
        .route("/admin/staff", get(staff).post(import_staff))
}

pub(crate) struct AlertRow {
    pub id: String,
    pub kind: String,
    pub family: String,
    pub user: String,
    pub source_ip: String,
    pub patient: String,
    pub time: String,
    pub score: String,
    pub evidence: String,
    pub status: String,
    pub open: bool,
    pub incident: String,
    pub responses: String,
    pub last_reason: String,
}

fn row(a: &AlertView) -> AlertRow {
    AlertRow {
        id: a.id.clone(),
        kind: a.alert.kind.as_str().replace('_', " "),
        family: a.alert.kind.family().to_owned(),
        user: a.alert.user.clone().unwrap_or_default(),
        source_ip: a.alert.source_ip.clone().unwrap_or_default(),
        patient: a.alert.patient.clone().unwrap_or_default(),
        time: a.alert.time.replace('T', " ").replace('Z', " UTC"),
        score: format!("{:.2}", a.alert.score),
        evidence: a.alert.evidence.clone(),
        status: a.status.as_str().replace('_', " "),
        open: matches!(
            a.status,
            AlertStatus::Open | AlertStatus::Triage | AlertStatus::Suppressed
        ),
        incident: a.incident.clone().unwrap_or_default(),
        responses: a.responses.join(", ").replace('_', " "),
        last_reason: a
            .history
            .last()
            .map(|h| h.reason.clone())
            .unwrap_or_default(),
    }
}

/// Alerts per day (of the detector's time), for the SVG timeline.
fn per_day(alerts: &[AlertView]) -> String {
    let mut days: Vec<(String, u32)> = vec![];
    for a in alerts {
        let d: String = a.alert.time.chars().take(10).collect();
        match days.iter_mut().find(|x| x.0 == d) {
            Some(x) => x.1 += 1,
            None => days.push((d, 1)),
        }
    }
    days.sort();
    svg::per_day("Alerts per day", &days)
}

#[derive(Template)]
#[template(path = "alerts.html")]
struct QueuePage {
    chrome: Chrome,
    open: Vec<AlertRow>,
    closed: Vec<AlertRow>,
}

async fn queue(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let all = gate(&web, &s, |v, c| v.alerts(c, None, None, None)).await?;
    let (open, closed): (Vec<_>, Vec<_>) = all.iter().map(row).partition(|r| r.open);
    render(&QueuePage {
        chrome: s.chrome(&web, "Privacy and security alerts", "/privacy/alerts"),
        open,
        closed,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StatusForm {
    status: String,
    reason: String,
    back: String,
}

async fn set_status(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<StatusForm>,
) -> Result<Response, WebError> {
    let (status, reason) = (crate::field(&f.status, 32), crate::field(&f.reason, 2000));
    gate(&web, &s, move |v, c| {
        v.set_alert_status(c, &id, &status, &reason)
    })
    .await?;
    // Back to the page the form was on (only our own pages).
    let back = if f.back.starts_with("/privacy/alerts") && !f.back.contains("//") {
        f.back
    } else {
        "/privacy/alerts".into()
    };
    Ok(see_other(&back))
}

#[derive(Template)]
#[template(path = "alert_subject.html")]
struct SubjectPage {
    chrome: Chrome,
    heading: String,
    profile: Vec<(String, String)>,
    timeline: String,
    rows: Vec<AlertRow>,
    back: String,
    report: String,
}

async fn by_user(
    State(web): State<Web>,
    s: Signed,
    Path(user): Path<String>,
) -> Result<Response, WebError> {
    let u = user.clone();
    let (alerts, staff) = gate(&web, &s, move |v, c| {
        Ok((v.alerts(c, None, Some(&u), None)?, v.staff(c)?))
    })
    .await?;
    let profile = staff
        .into_iter()
        .find(|e| e.user == user)
        .map(|e| {
            let shift = match (e.shift_start, e.shift_end) {
                (Some(a), Some(b)) if a == b => "round the clock".into(),
                (Some(a), Some(b)) => format!("{a:02}:00–{b:02}:00"),
                _ => "not known".into(),
            };
            vec![
                ("Department".to_owned(), e.department),
                ("Role".to_owned(), e.role),
                ("Shift".to_owned(), shift),
                ("Own chart".to_owned(), e.patient_id),
            ]
        })
        .unwrap_or_default();
    render(&SubjectPage {
        chrome: s.chrome(&web, &format!("Alerts about {user}"), "/privacy/alerts"),
        heading: format!("User {user}"),
        profile,
        timeline: per_day(&alerts),
        rows: alerts.iter().map(row).collect(),
        back: format!("/privacy/alerts/users/{user}"),
        report: String::new(),
    })
}

async fn by_patient(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let p = id.clone();
    let alerts = gate(&web, &s, move |v, c| v.alerts(c, None, None, Some(&p))).await?;
    render(&SubjectPage {
        chrome: s.chrome(
            &web,
            &format!("Alerts naming chart {id}"),
            "/privacy/alerts",
        ),
        heading: format!("Chart {id}"),
        profile: vec![],
        timeline: per_day(&alerts),
        rows: alerts.iter().map(row).collect(),
        back: format!("/privacy/alerts/patients/{id}"),
        report: format!("/privacy/patients/{id}"),
    })
}

pub(crate) struct SuppressionRow {
    pub id: String,
    pub kind: String,
    pub user: String,
    pub patient: String,
    pub reason: String,
    pub owner: String,
    pub expires: String,
    pub active: bool,
}

#[derive(Template)]
#[template(path = "suppressions.html")]
struct SuppressionsPage {
    chrome: Chrome,
    rows: Vec<SuppressionRow>,
    types: Vec<(&'static str, String)>,
}

async fn suppressions(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (list, now): (Vec<Suppression>, i64) =
        gate(&web, &s, |v, c| Ok((v.suppressions(c)?, v.now_unix()))).await?;
    render(&SuppressionsPage {
        chrome: s.chrome(&web, "Alert suppressions", "/privacy/suppressions"),
        rows: list
            .iter()
            .map(|x| SuppressionRow {
                id: x.id.clone(),
                kind: x
                    .kind
                    .map(|k| k.as_str().replace('_', " "))
                    .unwrap_or_else(|| "any".into()),
                user: x.user.clone().unwrap_or_else(|| "any".into()),
                patient: x.patient.clone().unwrap_or_else(|| "any".into()),
                reason: x.reason.clone(),
                owner: x.owner.clone(),
                expires: when(x.ended.unwrap_or(x.expires)),
                active: x.active(now),
            })
            .collect(),
        types: AlertType::ALL
            .iter()
            .map(|t| (t.as_str(), t.as_str().replace('_', " ")))
            .collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SuppressForm {
    kind: String,
    user: String,
    patient: String,
    reason: String,
    days: String,
}

async fn suppress(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<SuppressForm>,
) -> Result<Response, WebError> {
    let kind = match f.kind.trim() {
        "" | "any" => None,
        k => Some(
            k.parse::<AlertType>()
                .map_err(|_| WebError::Form("Choose an alert type from the list.".into()))?,
        ),
    };
    let days: i64 = f
        .days
        .trim()
        .parse()
        .ok()
        .filter(|d| (1..=366).contains(d))
        .ok_or_else(|| WebError::Form("Say for how many days (1 to 366).".into()))?;
    let (user, patient, reason) = (
        crate::field(&f.user, 64),
        crate::field(&f.patient, 64),
        crate::field(&f.reason, 2000),
    );
    gate(&web, &s, move |v, c| {
        let expires = v.now_unix().saturating_add(days * 86_400);
        v.add_suppression(
            c,
            kind,
            Some(user).filter(|u| !u.is_empty()),
            Some(patient).filter(|p| !p.is_empty()),
            &reason,
            expires,
        )
    })
    .await?;
    Ok(see_other("/privacy/suppressions"))
}

async fn end_suppression(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.end_suppression(c, &id)).await?;
    Ok(see_other("/privacy/suppressions"))
}

pub(crate) struct StaffRow {
    pub user: String,
    pub name: String,
    pub department: String,
    pub role: String,
    pub shift: String,
    pub patient_id: String,
    pub hired: String,
}

#[derive(Template)]
#[template(path = "staff.html")]
struct StaffPage {
    chrome: Chrome,
    rows: Vec<StaffRow>,
}

async fn staff(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list: Vec<RosterEntry> = gate(&web, &s, |v, c| v.staff(c)).await?;
    render(&StaffPage {
        chrome: s.chrome(&web, "Staff profiles", "/admin/staff"),
        rows: list
            .into_iter()
            .map(|e| StaffRow {
                shift: match (e.shift_start, e.shift_end) {
                    (Some(a), Some(b)) if a == b => "round the clock".into(),
                    (Some(a), Some(b)) => format!("{a:02}:00–{b:02}:00"),
                    _ => String::new(),
                },
                name: format!("{} {}", e.given, e.family).trim().to_owned(),
                user: e.user,
                department: e.department,
                role: e.role,
                patient_id: e.patient_id,
                hired: e.hired,
            })
            .collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ImportForm {
    roster: String,
}

async fn import_staff(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<ImportForm>,
) -> Result<Response, WebError> {
    let csv = f.roster.into_bytes();
    gate(&web, &s, move |v, c| v.import_staff(c, &csv)).await?;
    Ok(see_other("/admin/staff"))
}
