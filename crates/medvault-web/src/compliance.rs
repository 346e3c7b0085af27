//! Compliance pages (issue 16), for privacy and security officers (auditors read): the
//! Security Rule self-assessment with live evidence, findings, the risk register and its
//! SVG heat map, attestations and the quarterly review (also as a printable report); the
//! asset inventory; incidents and their response (roles, notices, playbook tasks, phases,
//! evidence, scope and affected individuals, the breach decision with its deadlines, the
//! notification letter and the HHS report's fields); training (everyone's own courses, and
//! the program for officers); and patients' privacy requests (accounting of disclosures,
//! data-subject requests, authorizations). Reminders are shown on sign-in ([`home`]).

use std::fmt::Write as _;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::governance::response::{Asset, PHASES, PLAYBOOKS, ROLES};
use medvault_core::governance::rights::{Authorization, REQUEST_KINDS};
use medvault_core::governance::safeguards::{Assessed, Attestation, Risk, SAFEGUARDS, TREATMENTS};
use medvault_core::governance::training::{Course, CourseState, TOPICS};
use medvault_core::{
    CompletionInput, Incident, IncidentAction, NewIncident, NewRightsRequest, Reminder,
    RightsAction, TrainingSettings,
};
use medvault_types::Role;
use serde::Deserialize;

use crate::{field, gate, render, see_other, when, Chrome, Signed, Web, WebError};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/compliance", get(safeguards))
        .route("/compliance/report", get(report))
        .route("/compliance/risks", post(put_risk))
        .route("/compliance/attestations", post(attest))
        .route("/compliance/reviews", post(review))
        .route("/compliance/assets", get(assets).post(put_asset))
        .route("/incidents", get(incidents).post(open_incident))
        .route("/incidents/{id}", get(incident).post(act))
        .route("/incidents/{id}/letter", get(letter))
        .route("/training", get(training).post(complete))
        .route("/training/courses", post(put_course))
        .route("/training/phishing", post(phishing))
        .route("/training/settings", post(settings))
        .route("/privacy/requests", get(requests))
        .route("/privacy/requests/accounting", post(accounting))
        .route("/privacy/requests/rights", post(open_rights))
        .route("/privacy/requests/rights/{id}", post(act_rights))
        .route("/privacy/requests/rights/{id}/bundle", get(bundle))
        .route("/privacy/requests/authorizations", post(authorize))
}

fn form_err(e: impl std::fmt::Display) -> WebError {
    WebError::Form(e.to_string())
}

fn officer(s: &Signed) -> bool {
    matches!(s.role(), Some(Role::PrivacyOfficer | Role::SecurityAdmin))
}

// ---- Reminders on sign-in --------------------------------------------------------------

#[derive(Template)]
#[template(path = "reminders.html")]
struct RemindersPage {
    chrome: Chrome,
    reminders: Vec<Reminder>,
    next: &'static str,
}

/// The reminders page shown on sign-in when something is due: `next` is where the user
/// goes on from it.
pub(crate) async fn reminders_or(web: &Web, s: &Signed, next: &'static str) -> Option<Response> {
    let r = gate(web, s, |v, c| v.reminders(c)).await.ok()?;
    if r.is_empty() {
        return None;
    }
    render(&RemindersPage {
        chrome: s.chrome(web, "Before you start", "/"),
        reminders: r,
        next,
    })
    .ok()
}

// ---- Safeguards, risks, attestations -----------------------------------------------------

struct SafeguardRow {
    status: &'static str,
    cfr: &'static str,
    title: &'static str,
    hicp: String,
    csf: String,
    source: &'static str,
    evidence: String,
}

fn safeguard_row(a: &Assessed) -> SafeguardRow {
    SafeguardRow {
        status: a.status,
        cfr: a.safeguard.cfr,
        title: a.safeguard.title,
        hicp: a
            .safeguard
            .hicp
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        csf: a.safeguard.csf.join(", "),
        source: a.source,
        evidence: a.evidence.clone(),
    }
}

/// A 5×5 likelihood × impact heat map of the risks, as SVG.
fn heat_map(risks: &[Risk]) -> String {
    let cell = 56.0;
    let (left, top) = (70.0, 10.0);
    let mut out = String::new();
    for l in 1..=5u8 {
        for i in 1..=5u8 {
            let n = risks
                .iter()
                .filter(|r| r.likelihood == l && r.impact == i)
                .count();
            let score = l * i;
            let fill = match score {
                0..=4 => "#d9f0d3",
                5..=9 => "#fff3b0",
                10..=14 => "#ffd08a",
                _ => "#f4a3a3",
            };
            let x = left + f64::from(i - 1) * cell;
            let y = top + f64::from(5 - l) * cell;
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"{fill}\" stroke=\"#4a4a4a\"><title>likelihood {l}, impact {i}: {n} risk(s)</title></rect>"
            );
            if n > 0 {
                let _ = write!(
                    out,
                    "<text class=\"count\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"18\" fill=\"#1a1a1a\">{n}</text>",
                    x + cell / 2.0,
                    y + cell / 2.0 + 6.0
                );
            }
        }
    }
    let w = left + 5.0 * cell + 10.0;
    let h = top + 5.0 * cell + 40.0;
    format!(
        "<figure><svg id=\"heat-map\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\">\
<title>Risk heat map</title><desc>{n} risks by likelihood (rows, 5 at the top) and impact (columns, 5 at the right)</desc>{out}\
<text x=\"{cx}\" y=\"{ly}\" text-anchor=\"middle\" font-size=\"12\" fill=\"#1a1a1a\">impact →</text>\
<text x=\"8\" y=\"{cy}\" font-size=\"12\" fill=\"#1a1a1a\">likelihood ↑</text></svg><figcaption>Risks by likelihood × impact</figcaption></figure>",
        n = risks.len(),
        cx = left + 2.5 * cell,
        ly = top + 5.0 * cell + 24.0,
        cy = top + 2.5 * cell,
    )
}

#[derive(Template)]
#[template(path = "safeguards.html")]
struct SafeguardsPage {
    chrome: Chrome,
    rows: Vec<SafeguardRow>,
    findings: Vec<SafeguardRow>,
    practices: Vec<(u8, bool)>,
    practices_12_months: String,
    reviews_12_months: usize,
    heat: String,
    risks: Vec<Risk>,
    last_review: String,
    next_review_due: String,
    attestable: Vec<(&'static str, &'static str)>,
    treatments: &'static [&'static str],
    may_manage: bool,
    printable: bool,
}

async fn safeguards_page(web: &Web, s: &Signed, printable: bool) -> Result<Response, WebError> {
    let r = gate(web, s, |v, c| v.safeguards(c)).await?;
    let title = if printable {
        "Security risk assessment report"
    } else {
        "Safeguards and risks"
    };
    render(&SafeguardsPage {
        chrome: s.chrome(web, title, "/compliance"),
        rows: r.assessed.iter().map(safeguard_row).collect(),
        findings: r.findings.iter().map(safeguard_row).collect(),
        practices: r.practices.clone(),
        practices_12_months: r
            .practices_12_months
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        reviews_12_months: r.reviews_12_months,
        heat: heat_map(&r.risks),
        risks: r.risks,
        last_review: r.last_review.unwrap_or_else(|| "never".into()),
        next_review_due: r.next_review_due,
        attestable: SAFEGUARDS
            .iter()
            .filter(|s| s.evidence.is_none())
            .map(|s| (s.id, s.title))
            .collect(),
        treatments: TREATMENTS,
        may_manage: officer(s) && !printable,
        printable,
    })
}

async fn safeguards(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    safeguards_page(&web, &s, false).await
}

async fn report(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    safeguards_page(&web, &s, true).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RiskForm {
    title: String,
    likelihood: String,
    impact: String,
    owner: String,
    treatment: String,
    review_by: String,
}

async fn put_risk(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RiskForm>,
) -> Result<Response, WebError> {
    let n = |v: &str, what: &str| {
        v.trim()
            .parse::<u8>()
            .map_err(|_| form_err(format!("{what} is a number from 1 to 5")))
    };
    let r = Risk {
        id: String::new(),
        title: field(&f.title, 300),
        likelihood: n(&f.likelihood, "Likelihood")?,
        impact: n(&f.impact, "Impact")?,
        owner: field(&f.owner, 300),
        treatment: field(&f.treatment, 20),
        review_by: field(&f.review_by, 10),
        safeguard: None,
    };
    gate(&web, &s, move |v, c| v.put_risk(c, r)).await?;
    Ok(see_other("/compliance"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AttestForm {
    safeguard: String,
    owner: String,
    date: String,
    note: String,
    in_place: String,
}

async fn attest(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<AttestForm>,
) -> Result<Response, WebError> {
    let a = Attestation {
        safeguard: field(&f.safeguard, 64),
        owner: field(&f.owner, 200),
        date: field(&f.date, 10),
        note: field(&f.note, 2000),
        in_place: f.in_place == "yes",
    };
    gate(&web, &s, move |v, c| v.attest_safeguard(c, a)).await?;
    Ok(see_other("/compliance"))
}

async fn review(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    gate(&web, &s, |v, c| v.record_review(c)).await?;
    Ok(see_other("/compliance"))
}

#[derive(Template)]
#[template(path = "assets.html")]
struct AssetsPage {
    chrome: Chrome,
    assets: Vec<Asset>,
    may_manage: bool,
}

async fn assets(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let a = gate(&web, &s, |v, c| v.assets(c)).await?;
    render(&AssetsPage {
        chrome: s.chrome(&web, "Devices and media", "/compliance/assets"),
        assets: a,
        may_manage: officer(&s),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AssetForm {
    id: String,
    kind: String,
    owner: String,
    location: String,
    encrypted: String,
    last_check: String,
    status: String,
    holds_phi: String,
}

async fn put_asset(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<AssetForm>,
) -> Result<Response, WebError> {
    let a = Asset {
        id: field(&f.id, 64),
        kind: field(&f.kind, 32),
        owner: field(&f.owner, 200),
        location: field(&f.location, 200),
        encrypted: f.encrypted == "yes",
        last_check: Some(field(&f.last_check, 10)).filter(|d| !d.is_empty()),
        status: if f.status.trim().is_empty() {
            "in_service".into()
        } else {
            field(&f.status, 20)
        },
        holds_phi: f.holds_phi == "yes",
    };
    gate(&web, &s, move |v, c| v.put_asset(c, a)).await?;
    Ok(see_other("/compliance/assets"))
}

// ---- Incidents ---------------------------------------------------------------------------

struct IncidentRow {
    id: String,
    title: String,
    source: String,
    severity: &'static str,
    status: &'static str,
    opened: String,
    to_contain: String,
    to_recover: String,
    breach: String,
}

fn hours(secs: Option<i64>) -> String {
    secs.map(|s| format!("{:.1} h", s.max(0) as f64 / 3600.0))
        .unwrap_or_default()
}

fn incident_row(i: &Incident) -> IncidentRow {
    use medvault_core::governance::IncidentSource as S;
    let source = match &i.source {
        S::BreakGlassReview { .. } => "break-the-glass review".to_owned(),
        S::DetectionAlert { alert_type, .. } => format!("alert: {}", alert_type.replace('_', " ")),
        S::MissingChart { barcode } => format!("missing paper chart {barcode}"),
        S::Manual => "opened by hand".to_owned(),
    };
    IncidentRow {
        id: i.id.clone(),
        title: if i.response.title.is_empty() {
            let mut t = source.clone();
            if let Some(first) = t.get(..1).map(str::to_uppercase) {
                t.replace_range(..1, &first);
            }
            t
        } else {
            i.response.title.clone()
        },
        source,
        severity: i.response.severity.as_str(),
        status: i.status.as_str(),
        opened: when(i.opened_at),
        to_contain: hours(i.response.phases.time_to_contain(i.opened_at)),
        to_recover: hours(i.response.phases.time_to_recover(i.opened_at)),
        breach: i.response.decision.as_ref().map_or_else(String::new, |d| {
            if d.breach {
                "breach".into()
            } else {
                "not a notifiable breach".into()
            }
        }),
    }
}

#[derive(Template)]
#[template(path = "incidents.html")]
struct IncidentsPage {
    chrome: Chrome,
    rows: Vec<IncidentRow>,
    playbooks: Vec<&'static str>,
    mean_contain: String,
    mean_recover: String,
}

async fn incidents(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.incidents(c)).await?;
    let mean = |f: &dyn Fn(&Incident) -> Option<i64>| {
        let v: Vec<i64> = list.iter().filter_map(f).collect();
        if v.is_empty() {
            String::new()
        } else {
            hours(Some(v.iter().sum::<i64>() / v.len() as i64))
        }
    };
    render(&IncidentsPage {
        chrome: s.chrome(&web, "Incidents", "/incidents"),
        mean_contain: mean(&|i| i.response.phases.time_to_contain(i.opened_at)),
        mean_recover: mean(&|i| i.response.phases.time_to_recover(i.opened_at)),
        rows: list.iter().map(incident_row).collect(),
        playbooks: PLAYBOOKS.iter().map(|p| p.0).collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OpenForm {
    title: String,
    severity: String,
    playbook: String,
}

async fn open_incident(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<OpenForm>,
) -> Result<Response, WebError> {
    let n = NewIncident {
        title: field(&f.title, 300),
        severity: Some(field(&f.severity, 20)).filter(|x| !x.is_empty()),
        playbook: Some(field(&f.playbook, 64)).filter(|x| !x.is_empty()),
        patients: vec![],
    };
    let i = gate(&web, &s, move |v, c| v.open_incident(c, n)).await?;
    Ok(see_other(&format!("/incidents/{}", i.id)))
}

#[derive(Template)]
#[template(path = "incident.html")]
struct IncidentPage {
    chrome: Chrome,
    i: Incident,
    row: IncidentRow,
    roles: &'static [&'static str],
    phases: &'static [&'static str],
    playbooks: Vec<&'static str>,
    deadlines: Vec<(&'static str, String)>,
    affected: String,
    window: String,
    my_notice: bool,
    hhs: Option<String>,
    open: bool,
    me: String,
}

async fn incident(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let (i, hhs) = gate(&web, &s, move |v, c| {
        let i = v.incident(c, &id)?;
        let hhs = if i.response.decision.as_ref().is_some_and(|d| d.breach) {
            v.hhs_report(c, &i.id)
                .ok()
                .and_then(|r| serde_json::to_string_pretty(&r).ok())
        } else {
            None
        };
        Ok((i, hhs))
    })
    .await?;
    let me = s.username();
    render(&IncidentPage {
        chrome: s.chrome(
            &web,
            &format!("Incident {}", i.id.get(..8).unwrap_or(&i.id)),
            "/incidents",
        ),
        row: incident_row(&i),
        roles: ROLES,
        phases: PHASES.get(1..).unwrap_or(PHASES),
        playbooks: PLAYBOOKS.iter().map(|p| p.0).collect(),
        deadlines: i
            .response
            .decision
            .as_ref()
            .map(medvault_core::governance::breach::Decision::deadlines)
            .unwrap_or_default(),
        affected: i
            .response
            .affected
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        window: i
            .response
            .window
            .map(|(a, b)| format!("{} to {}", when(a), when(b)))
            .unwrap_or_default(),
        my_notice: i
            .response
            .notices
            .iter()
            .any(|n| n.user == me && n.acknowledged_at.is_none()),
        open: i.status == medvault_core::governance::IncidentStatus::Open,
        hhs,
        me,
        i,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ActForm {
    action: String,
    severity: String,
    role: String,
    user: String,
    playbook: String,
    task: String,
    phase: String,
    name: String,
    content: String,
    accounts: String,
    from: String,
    to: String,
    asset: String,
    facts: String,
    text: String,
}

/// A `datetime-local` value (`YYYY-MM-DDTHH:MM`, taken as UTC) or RFC 3339.
fn instant(v: &str) -> String {
    let v = v.trim();
    if v.len() == 16 {
        format!("{v}:00Z")
    } else {
        v.to_owned()
    }
}

async fn act(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<ActForm>,
) -> Result<Response, WebError> {
    let a = match f.action.as_str() {
        "severity" => IncidentAction::Severity {
            severity: field(&f.severity, 20),
        },
        "assign" => IncidentAction::Assign {
            role: field(&f.role, 40),
            user: field(&f.user, 64),
        },
        "playbook" => IncidentAction::Playbook {
            playbook: field(&f.playbook, 64),
        },
        "task" => IncidentAction::Task {
            task: f
                .task
                .trim()
                .parse()
                .map_err(|_| form_err("no such task"))?,
        },
        "phase" => IncidentAction::Phase {
            phase: field(&f.phase, 20),
            at: None,
        },
        "acknowledge" => IncidentAction::Acknowledge,
        "evidence" => IncidentAction::Evidence {
            name: field(&f.name, 200),
            content: f.content.clone(),
        },
        "scope" => IncidentAction::Scope {
            accounts: f
                .accounts
                .split([',', ' ', '\n'])
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect(),
            from: instant(&f.from),
            to: instant(&f.to),
        },
        "compute_affected" => IncidentAction::ComputeAffected,
        "asset" => IncidentAction::Asset {
            asset: field(&f.asset, 64),
        },
        "assess" => IncidentAction::Assess {
            facts: if f.facts.trim().is_empty() {
                None
            } else {
                Some(
                    serde_json::from_str(f.facts.trim())
                        .map_err(|e| form_err(format!("facts must be a JSON object: {e}")))?,
                )
            },
        },
        "note" => IncidentAction::Note {
            text: field(&f.text, 2000),
        },
        "close" => IncidentAction::Close {
            note: field(&f.text, 2000),
        },
        _ => return Err(form_err("unknown action")),
    };
    let to = format!("/incidents/{id}");
    gate(&web, &s, move |v, c| v.act_on_incident(c, &id, a)).await?;
    Ok(see_other(&to))
}

#[derive(Deserialize)]
struct LetterQuery {
    patient: String,
}

async fn letter(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    q: Result<Query<LetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, WebError> {
    let Ok(Query(q)) = q else {
        return Err(form_err("choose a patient"));
    };
    let text = gate(&web, &s, move |v, c| v.breach_letter(c, &id, &q.patient)).await?;
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(r)
}

// ---- Training ------------------------------------------------------------------------------

struct StandingRow {
    user: String,
    role: String,
    current: bool,
    courses: String,
}

#[derive(Template)]
#[template(path = "training.html")]
struct TrainingPage {
    chrome: Chrome,
    mine: Vec<(String, String, &'static str, String, String)>,
    officer: bool,
    courses: Vec<Course>,
    standings: Vec<StandingRow>,
    departments: Vec<(String, usize, usize)>,
    phishing: Vec<(String, String, bool, bool, String)>,
    grace_days: u32,
    topics: &'static [&'static str],
}

fn state_text(s: CourseState) -> &'static str {
    match s {
        CourseState::Current => "current",
        CourseState::Due => "due",
        CourseState::Lapsed => "lapsed",
    }
}

async fn training(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let is_officer = officer(&s) || s.role() == Some(Role::Auditor);
    let (mine, dash) = gate(&web, &s, move |v, c| {
        let mine = v.my_training(c)?;
        let dash = if is_officer {
            Some(v.training_dashboard(c)?)
        } else {
            None
        };
        Ok((mine, dash))
    })
    .await?;
    let (courses, standings, departments, phishing, grace) = match dash {
        Some(d) => (
            d.courses,
            d.standings
                .iter()
                .filter(|x| !x.courses.is_empty())
                .map(|x| StandingRow {
                    user: x.user.clone(),
                    role: x.role.clone(),
                    current: x.current,
                    courses: x
                        .courses
                        .iter()
                        .map(|c| format!("{} {} (due {})", c.course, state_text(c.state), c.due))
                        .collect::<Vec<_>>()
                        .join("; "),
                })
                .collect(),
            d.departments,
            d.phishing
                .into_iter()
                .map(|p| (p.user, p.campaign, p.clicked, p.reported, p.date))
                .collect(),
            d.settings.grace_days,
        ),
        None => (vec![], vec![], vec![], vec![], 0),
    };
    render(&TrainingPage {
        chrome: s.chrome(&web, "Training", "/training"),
        mine: mine
            .courses
            .iter()
            .map(|c| {
                (
                    c.course.clone(),
                    c.title.clone(),
                    state_text(c.state),
                    c.due.clone(),
                    c.lapses.clone(),
                )
            })
            .collect(),
        officer: officer(&s),
        courses,
        standings,
        departments,
        phishing,
        grace_days: grace,
        topics: TOPICS,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompleteForm {
    course: String,
    attestation: String,
}

async fn complete(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<CompleteForm>,
) -> Result<Response, WebError> {
    let i = CompletionInput {
        user: None,
        course: field(&f.course, 64),
        completed: None,
        attestation: field(&f.attestation, 500),
    };
    gate(&web, &s, move |v, c| v.record_completion(c, i)).await?;
    Ok(see_other("/training"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CourseForm {
    id: String,
    title: String,
    topic: String,
    roles: String,
    renewal_months: String,
    assigned: String,
}

async fn put_course(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<CourseForm>,
) -> Result<Response, WebError> {
    let c = Course {
        id: field(&f.id, 64),
        title: field(&f.title, 500),
        topic: field(&f.topic, 40),
        roles: f
            .roles
            .split([',', ' '])
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
        renewal_months: if f.renewal_months.trim().is_empty() {
            6
        } else {
            f.renewal_months
                .trim()
                .parse()
                .map_err(|_| form_err("renewal months is a number"))?
        },
        assigned: field(&f.assigned, 10),
    };
    gate(&web, &s, move |v, cl| v.put_course(cl, c)).await?;
    Ok(see_other("/training"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsvForm {
    csv: String,
}

async fn phishing(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<CsvForm>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.import_phishing(c, &f.csv)).await?;
    Ok(see_other("/training"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GraceForm {
    grace_days: String,
}

async fn settings(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<GraceForm>,
) -> Result<Response, WebError> {
    let d: u32 = f
        .grace_days
        .trim()
        .parse()
        .map_err(|_| form_err("grace days is a number"))?;
    gate(&web, &s, move |v, c| {
        v.set_training_settings(c, TrainingSettings { grace_days: d })
    })
    .await?;
    Ok(see_other("/training"))
}

// ---- Patients' privacy requests -----------------------------------------------------------

#[derive(Template)]
#[template(path = "privacy_requests.html")]
struct RequestsPage {
    chrome: Chrome,
    accounting: Vec<medvault_core::AccountingRequest>,
    rights: Vec<medvault_core::RightsRequest>,
    authorizations: Vec<Authorization>,
    kinds: &'static [&'static str],
}

async fn requests(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (accounting, rights, authorizations) = gate(&web, &s, |v, c| {
        Ok((
            v.accounting_requests(c)?,
            v.rights_requests(c)?,
            v.authorizations(c, None)?,
        ))
    })
    .await?;
    render(&RequestsPage {
        chrome: s.chrome(&web, "Patients' privacy requests", "/privacy/requests"),
        accounting,
        rights,
        authorizations,
        kinds: REQUEST_KINDS,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AccountingForm {
    patient: String,
    requested: String,
}

async fn accounting(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<AccountingForm>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| {
        v.request_accounting(c, &f.patient, &f.requested)
    })
    .await?;
    Ok(see_other("/privacy/requests"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RightsForm {
    patient: String,
    kind: String,
    received: String,
    jurisdiction: String,
}

async fn open_rights(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RightsForm>,
) -> Result<Response, WebError> {
    let n = NewRightsRequest {
        patient: field(&f.patient, 64),
        kind: field(&f.kind, 20),
        received: field(&f.received, 10),
        jurisdiction: Some(field(&f.jurisdiction, 10)).filter(|j| !j.is_empty()),
    };
    gate(&web, &s, move |v, c| v.open_rights_request(c, n)).await?;
    Ok(see_other("/privacy/requests"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RightsActForm {
    action: String,
    text: String,
}

async fn act_rights(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<RightsActForm>,
) -> Result<Response, WebError> {
    let a = match f.action.as_str() {
        "extend" => RightsAction::Extend {
            reason: field(&f.text, 2000),
        },
        "fulfil" => RightsAction::Fulfil {
            note: field(&f.text, 2000),
        },
        "refuse" => RightsAction::Refuse {
            reason: field(&f.text, 2000),
        },
        _ => return Err(form_err("unknown action")),
    };
    gate(&web, &s, move |v, c| v.act_on_rights_request(c, &id, a)).await?;
    Ok(see_other("/privacy/requests"))
}

async fn bundle(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let b = gate(&web, &s, move |v, c| v.rights_access_bundle(c, &id)).await?;
    let mut r = b.to_string().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    r.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"record.json\""),
    );
    Ok(r)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthorizationForm {
    patient: String,
    recipient: String,
    purpose: String,
    description: String,
    signed: String,
    expires: String,
    kind: String,
}

async fn authorize(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<AuthorizationForm>,
) -> Result<Response, WebError> {
    let a = Authorization {
        id: String::new(),
        patient: field(&f.patient, 64),
        recipient: field(&f.recipient, 40),
        purpose: field(&f.purpose, 20),
        description: field(&f.description, 2000),
        signed: field(&f.signed, 10),
        expires: field(&f.expires, 10),
        kind: if f.kind.trim().is_empty() {
            "authorization".into()
        } else {
            field(&f.kind, 20)
        },
        revoked: None,
    };
    gate(&web, &s, move |v, c| v.put_authorization(c, a)).await?;
    Ok(see_other("/privacy/requests"))
}
