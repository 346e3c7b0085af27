//! Paper records and the records lifecycle (issue 15), for health information management
//! staff (records clerks), privacy officers, auditors and security administrators: the
//! chart registry with its dashboard (overdue, missing, flagged retrievals, visitors) and
//! scanner lookup, a volume's custody chain and custody acts, storage rooms with their
//! access lists, keys, badge imports and footage reviews, the visitor log, retention (the
//! due list and the schedules, changed by two people), paper destruction with its
//! certificates, and legal holds of every scope — each list also as a CSV download.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::governance::records::{
    ident, Cabinet, Cameras, HoldScope, KeyItem, PaperMethod, RecordClass, Room, Schedule, Volume,
};
use medvault_core::{
    CustodyAct, DestructionReason, DueItem, HoldView, KeyAct, NewVisitor, NewVolume, PaperRequest,
    VaultError, VisitorView,
};
use medvault_types::Role;
use serde::Deserialize;

use crate::{
    field, gate, render, see_other, stepped_gate, when, Chrome, CodeForm, Signed, Web, WebError,
};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/records", get(registry))
        .route("/records/scan", post(scan))
        .route("/records/volumes", post(register))
        .route("/records/volumes/{barcode}", get(volume))
        .route("/records/volumes/{barcode}/custody", post(custody))
        .route("/records/rooms", get(rooms).post(put_room))
        .route("/records/keys", post(add_key))
        .route("/records/keys/{id}/{act}", post(key_act))
        .route("/records/badges", post(badges))
        .route("/records/footage", post(footage))
        .route("/records/visitors", get(visitors).post(sign_in))
        .route("/records/visitors/{id}/sign-out", post(sign_out))
        .route("/records/retention", get(retention))
        .route("/records/retention/schedules", post(propose))
        .route("/records/retention/schedules/{id}/approve", post(approve))
        .route("/records/destruction", get(destruction).post(request))
        .route("/records/destruction/{id}/certificate", get(certificate))
        .route("/records/destruction/{id}/{action}", post(decide))
        .route("/records/holds", get(holds).post(set_hold))
        .route("/records/holds/{id}/release", post(release))
        .route("/records/export/{what}", get(export))
}

fn clerk(s: &Signed) -> bool {
    s.caller.role() == Some(Role::RecordsClerk)
}

fn form_err(e: impl std::fmt::Display) -> WebError {
    WebError::Form(e.to_string())
}

/// A barcode from a form or a path, checked before it goes into a redirect.
fn barcode(v: &str) -> Result<String, WebError> {
    ident("barcode", v).map(str::to_owned).map_err(form_err)
}

pub(crate) struct VolRow {
    pub barcode: String,
    pub patient: String,
    pub volume: u32,
    pub class: String,
    pub location: String,
    pub status: String,
    pub holder: String,
    pub due: String,
    pub overdue: bool,
}

fn vol_row(v: &Volume, now: i64) -> VolRow {
    VolRow {
        barcode: v.barcode.clone(),
        patient: v.patient.clone(),
        volume: v.volume,
        class: v.record_class.as_str().replace('_', " "),
        location: format!("{}/{}", v.room, v.cabinet),
        status: v.status.as_str().replace('_', " "),
        holder: v
            .holder
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        due: v.due.map(when).unwrap_or_default(),
        overdue: v.overdue(now),
    }
}

pub(crate) struct FlagRow {
    pub kind: String,
    pub at: String,
    pub subject: String,
    pub target: String,
    pub evidence: String,
}

fn flag_row(f: &medvault_core::FlagView) -> FlagRow {
    FlagRow {
        kind: f.flag.kind.replace('_', " "),
        at: when(f.flag.at),
        subject: f.flag.subject.clone(),
        target: f.flag.target.clone(),
        evidence: f.flag.evidence.clone(),
    }
}

#[derive(Template)]
#[template(path = "registry.html")]
struct RegistryPage {
    chrome: Chrome,
    in_storage: usize,
    checked_out: usize,
    overdue: Vec<VolRow>,
    missing: Vec<VolRow>,
    flags: Vec<FlagRow>,
    visitors: Vec<(String, String, String)>,
    volumes: Vec<VolRow>,
    rooms: Vec<Room>,
    classes: Vec<&'static str>,
    may_act: bool,
}

async fn registry(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (d, vols, rooms, now) = gate(&web, &s, |v, c| {
        Ok((
            v.records_dashboard(c)?,
            v.volumes(c, None)?,
            v.records_rooms(c)?,
            v.now_unix(),
        ))
    })
    .await?;
    render(&RegistryPage {
        chrome: s.chrome(&web, "Paper chart registry", "/records"),
        in_storage: d.in_storage,
        checked_out: d.checked_out,
        overdue: d.overdue.iter().map(|v| vol_row(v, now)).collect(),
        missing: d.missing.iter().map(|v| vol_row(v, now)).collect(),
        flags: d.flags.iter().map(flag_row).collect(),
        visitors: d
            .visitors
            .iter()
            .filter(|v| !v.flags.is_empty())
            .map(|v| {
                (
                    v.visitor.name.clone(),
                    v.visitor.room.clone(),
                    v.flags
                        .iter()
                        .map(|f| f.kind.replace('_', " "))
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
            .collect(),
        volumes: vols.iter().map(|v| vol_row(&v.volume, now)).collect(),
        rooms,
        classes: RecordClass::ALL.iter().map(|c| c.as_str()).collect(),
        may_act: clerk(&s),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ScanForm {
    barcode: String,
}

async fn scan(s: Signed, Form(f): Form<ScanForm>) -> Result<Response, WebError> {
    let _ = &s;
    Ok(see_other(&format!(
        "/records/volumes/{}",
        barcode(&f.barcode)?
    )))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RegisterForm {
    barcode: String,
    patient: String,
    room: String,
    cabinet: String,
    volume: String,
    record_class: String,
    last_entry: String,
}

async fn register(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RegisterForm>,
) -> Result<Response, WebError> {
    let record_class = match f.record_class.trim() {
        "" => None,
        k => Some(k.parse::<RecordClass>().map_err(form_err)?),
    };
    let volume = match f.volume.trim() {
        "" => 1,
        n => n
            .parse()
            .map_err(|_| WebError::Form("The volume number is a whole number from 1.".into()))?,
    };
    let n = NewVolume {
        barcode: field(&f.barcode, 64),
        patient: field(&f.patient, 64),
        volume,
        record_class,
        room: field(&f.room, 64),
        cabinet: field(&f.cabinet, 64),
        last_entry: Some(field(&f.last_entry, 10)).filter(|d| !d.is_empty()),
    };
    let v = gate(&web, &s, move |v, c| v.register_volume(c, n)).await?;
    Ok(see_other(&format!("/records/volumes/{}", v.barcode)))
}

pub(crate) struct CustodyRow {
    pub at: String,
    pub action: String,
    pub by: String,
    pub from: String,
    pub to: String,
    pub retrieved_by: String,
    pub due: String,
    pub note: String,
}

#[derive(Template)]
#[template(path = "volume.html")]
struct VolumePage {
    chrome: Chrome,
    v: VolRow,
    custody: Vec<CustodyRow>,
    holds: Vec<HoldView>,
    flags: Vec<FlagRow>,
    may_act: bool,
}

async fn volume(
    State(web): State<Web>,
    s: Signed,
    Path(code): Path<String>,
) -> Result<Response, WebError> {
    let (v, now) = gate(&web, &s, move |v, c| {
        Ok((v.scan_volume(c, &code)?, v.now_unix()))
    })
    .await?;
    render(&VolumePage {
        chrome: s.chrome(&web, &format!("Volume {}", v.volume.barcode), "/records"),
        v: vol_row(&v.volume, now),
        custody: v
            .volume
            .custody
            .iter()
            .rev()
            .map(|e| CustodyRow {
                at: when(e.at),
                action: e.action.replace('_', " "),
                by: e.by.clone(),
                from: e.from.clone().unwrap_or_default(),
                to: e.to.clone().unwrap_or_default(),
                retrieved_by: e.retrieved_by.clone().unwrap_or_default(),
                due: e.due.map(when).unwrap_or_default(),
                note: e.note.clone(),
            })
            .collect(),
        holds: v.holds,
        flags: v.flags.iter().map(flag_row).collect(),
        may_act: clerk(&s),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CustodyForm {
    act: String,
    to: String,
    department: String,
    due: String,
    retrieved_by: String,
    returned_by: String,
    note: String,
}

fn opt(v: &str, max: usize) -> Option<String> {
    Some(field(v, max)).filter(|x| !x.is_empty())
}

async fn custody(
    State(web): State<Web>,
    s: Signed,
    Path(code): Path<String>,
    Form(f): Form<CustodyForm>,
) -> Result<Response, WebError> {
    let code = barcode(&code)?;
    let act = match f.act.as_str() {
        "check-out" => CustodyAct::CheckOut {
            to: opt(&f.to, 64),
            department: opt(&f.department, 120),
            due: field(&f.due, 40),
            retrieved_by: opt(&f.retrieved_by, 64),
        },
        "return" => CustodyAct::Return {
            returned_by: field(&f.returned_by, 64),
        },
        "transfer" => CustodyAct::Transfer {
            to: opt(&f.to, 64),
            department: opt(&f.department, 120),
            due: opt(&f.due, 40),
        },
        "missing" => CustodyAct::Missing {
            note: field(&f.note, 2000),
        },
        "found" => CustodyAct::Found {
            note: field(&f.note, 2000),
        },
        _ => {
            return Err(WebError::Form(
                "Choose check-out, return, transfer, missing or found.".into(),
            ))
        }
    };
    let b = code.clone();
    gate(&web, &s, move |v, c| v.volume_custody(c, &b, act)).await?;
    Ok(see_other(&format!("/records/volumes/{code}")))
}

pub(crate) struct KeyRow {
    pub id: String,
    pub kind: String,
    pub place: String,
    pub holders: String,
    pub issued: bool,
    pub last: String,
}

pub(crate) struct ReviewRow {
    pub room: String,
    pub incident: String,
    pub stretch: String,
    pub finding: String,
    pub reviewer: String,
}

#[derive(Template)]
#[template(path = "rooms.html")]
struct RoomsPage {
    chrome: Chrome,
    rooms: Vec<Room>,
    keys: Vec<KeyRow>,
    reviews: Vec<ReviewRow>,
    may_act: bool,
}

async fn rooms(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (rooms, keys, reviews) = gate(&web, &s, |v, c| {
        Ok((
            v.records_rooms(c)?,
            v.records_keys(c)?,
            v.footage_reviews(c)?,
        ))
    })
    .await?;
    render(&RoomsPage {
        chrome: s.chrome(&web, "Storage rooms, keys and cameras", "/records/rooms"),
        rooms,
        keys: keys
            .iter()
            .map(|k: &KeyItem| KeyRow {
                id: k.id.clone(),
                kind: k.kind.clone(),
                place: match &k.cabinet {
                    Some(c) => format!("{}/{c}", k.room),
                    None => k.room.clone(),
                },
                holders: k.holders.join(", "),
                issued: !k.holders.is_empty(),
                last: k
                    .history
                    .last()
                    .map(|e| format!("{} by {}, {}", e.action.replace('_', " "), e.by, when(e.at)))
                    .unwrap_or_default(),
            })
            .collect(),
        reviews: reviews
            .into_iter()
            .map(|r| ReviewRow {
                stretch: format!("{} to {}", r.from, r.to),
                room: r.room,
                incident: r.incident,
                finding: r.finding,
                reviewer: format!("{}, {}", r.reviewer, when(r.at)),
            })
            .collect(),
        may_act: matches!(
            s.caller.role(),
            Some(Role::RecordsClerk | Role::SecurityAdmin)
        ),
    })
}

fn list(v: &str) -> Vec<String> {
    v.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.chars().take(64).collect())
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoomForm {
    id: String,
    name: String,
    door: String,
    authorized: String,
    cabinets: String,
    coverage: String,
    retention_days: String,
}

async fn put_room(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<RoomForm>,
) -> Result<Response, WebError> {
    let cameras = match (f.coverage.trim(), f.retention_days.trim()) {
        ("", "") => None,
        (coverage, days) => Some(Cameras {
            coverage: field(coverage, 200),
            footage_retention_days: days
                .parse()
                .map_err(|_| WebError::Form("Footage retention is a number of days.".into()))?,
        }),
    };
    let room = Room {
        id: field(&f.id, 64),
        name: field(&f.name, 120),
        door: opt(&f.door, 64),
        authorized: list(&f.authorized),
        cabinets: list(&f.cabinets)
            .into_iter()
            .map(|id| Cabinet {
                id,
                name: String::new(),
            })
            .collect(),
        cameras,
    };
    gate(&web, &s, move |v, c| v.put_records_room(c, room)).await?;
    Ok(see_other("/records/rooms"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KeyForm {
    id: String,
    kind: String,
    room: String,
    cabinet: String,
    to: String,
    known_by: String,
}

async fn add_key(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<KeyForm>,
) -> Result<Response, WebError> {
    let k = KeyItem {
        id: field(&f.id, 64),
        kind: field(&f.kind, 16),
        room: field(&f.room, 64),
        cabinet: opt(&f.cabinet, 64),
        holders: vec![],
        history: vec![],
    };
    gate(&web, &s, move |v, c| v.add_records_key(c, k)).await?;
    Ok(see_other("/records/rooms"))
}

async fn key_act(
    State(web): State<Web>,
    s: Signed,
    Path((id, act)): Path<(String, String)>,
    Form(f): Form<KeyForm>,
) -> Result<Response, WebError> {
    let act = match act.as_str() {
        "issue" => KeyAct::Issue {
            to: field(&f.to, 64),
        },
        "return" => KeyAct::Return,
        "change-combination" => KeyAct::ChangeCombination {
            known_by: list(&f.known_by),
        },
        _ => return Err(WebError::Vault(VaultError::NotFound)),
    };
    gate(&web, &s, move |v, c| v.records_key_act(c, &id, act)).await?;
    Ok(see_other("/records/rooms"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BadgeForm {
    csv: String,
}

async fn badges(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<BadgeForm>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.import_badge_events(c, &f.csv)).await?;
    Ok(see_other("/records/rooms"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FootageForm {
    room: String,
    incident: String,
    from: String,
    to: String,
    finding: String,
}

async fn footage(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<FootageForm>,
) -> Result<Response, WebError> {
    let r = medvault_core::FootageReview {
        id: String::new(),
        room: field(&f.room, 64),
        incident: field(&f.incident, 64),
        from: field(&f.from, 40),
        to: field(&f.to, 40),
        finding: field(&f.finding, 2000),
        reviewer: String::new(),
        at: 0,
    };
    gate(&web, &s, move |v, c| v.log_footage_review(c, r)).await?;
    Ok(see_other("/records/rooms"))
}

pub(crate) struct VisitorRow {
    pub id: String,
    pub name: String,
    pub identity: String,
    pub host: String,
    pub purpose: String,
    pub escort: String,
    pub room: String,
    pub time_in: String,
    pub time_out: String,
    pub present: bool,
    pub flags: String,
}

fn visitor_row(v: &VisitorView) -> VisitorRow {
    let x = &v.visitor;
    VisitorRow {
        id: x.id.clone(),
        name: x.name.clone(),
        identity: x.identity.clone(),
        host: x.host.clone(),
        purpose: x.purpose.clone(),
        escort: x.escort.clone().unwrap_or_else(|| "none".into()),
        room: x.room.clone(),
        time_in: when(x.time_in),
        time_out: x.time_out.map(when).unwrap_or_default(),
        present: x.time_out.is_none(),
        flags: v
            .flags
            .iter()
            .map(|f| f.kind.replace('_', " "))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[derive(Template)]
#[template(path = "visitors.html")]
struct VisitorsPage {
    chrome: Chrome,
    rows: Vec<VisitorRow>,
    rooms: Vec<Room>,
    may_act: bool,
}

async fn visitors(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (list, rooms) = gate(&web, &s, |v, c| Ok((v.visitors(c)?, v.records_rooms(c)?))).await?;
    render(&VisitorsPage {
        chrome: s.chrome(&web, "Visitor log", "/records/visitors"),
        rows: list.iter().map(visitor_row).collect(),
        rooms,
        may_act: clerk(&s),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VisitorForm {
    name: String,
    identity: String,
    identity_checked: String,
    host: String,
    purpose: String,
    escort: String,
    room: String,
}

async fn sign_in(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<VisitorForm>,
) -> Result<Response, WebError> {
    let n = NewVisitor {
        name: field(&f.name, 120),
        identity: field(&f.identity, 120),
        identity_checked: f.identity_checked == "yes",
        host: field(&f.host, 64),
        purpose: field(&f.purpose, 200),
        escort: opt(&f.escort, 64),
        room: field(&f.room, 64),
    };
    gate(&web, &s, move |v, c| v.sign_in_visitor(c, n)).await?;
    Ok(see_other("/records/visitors"))
}

async fn sign_out(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.sign_out_visitor(c, &id)).await?;
    Ok(see_other("/records/visitors"))
}

pub(crate) struct DueRow {
    pub what: String,
    pub patient: String,
    pub class: String,
    pub eligible: bool,
    pub from: String,
    pub rule: String,
    pub holds: String,
}

fn due_row(i: &DueItem) -> DueRow {
    DueRow {
        what: match &i.barcode {
            Some(b) => format!("paper volume {b}"),
            None => "electronic chart".into(),
        },
        patient: i.patient.clone(),
        class: i.record_class.as_str().replace('_', " "),
        eligible: i.verdict.destroy_eligible,
        from: i.verdict.destroy_eligible_from.clone().unwrap_or_default(),
        rule: i.verdict.rule.clone(),
        holds: i.holds.join(", "),
    }
}

#[derive(Template)]
#[template(path = "retention.html")]
struct RetentionPage {
    chrome: Chrome,
    due: Vec<DueRow>,
    active: Vec<medvault_core::ScheduleView>,
    proposed: Vec<medvault_core::ScheduleView>,
    classes: Vec<&'static str>,
    may_act: bool,
}

async fn retention(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (due, schedules) = gate(&web, &s, |v, c| {
        Ok((v.retention_due(c, None)?, v.retention_schedules(c)?))
    })
    .await?;
    let (proposed, active) = schedules.into_iter().partition(|x| x.status == "proposed");
    render(&RetentionPage {
        chrome: s.chrome(&web, "Retention", "/records/retention"),
        due: due.iter().map(due_row).collect(),
        active,
        proposed,
        classes: RecordClass::ALL.iter().map(|c| c.as_str()).collect(),
        may_act: matches!(
            s.caller.role(),
            Some(Role::RecordsClerk | Role::PrivacyOfficer)
        ),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ScheduleForm {
    jurisdiction: String,
    record_class: String,
    years: String,
    until_age: String,
    citation: String,
    code: String,
}

async fn propose(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<ScheduleForm>,
) -> Result<Response, WebError> {
    let number = |v: &str, what: &str| -> Result<u32, WebError> {
        v.trim()
            .parse()
            .map_err(|_| WebError::Form(format!("{what} is a whole number.")))
    };
    let sched = Schedule {
        jurisdiction: field(&f.jurisdiction, 64),
        record_class: f.record_class.parse().map_err(form_err)?,
        years: number(&f.years, "Years")?,
        until_age: match f.until_age.trim() {
            "" => None,
            a => Some(number(a, "The age")?),
        },
        citation: field(&f.citation, 200),
    };
    stepped_gate(&web, &s, &f.code, move |v, c| v.propose_schedule(c, sched)).await?;
    Ok(see_other("/records/retention"))
}

async fn approve(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |v, c| v.approve_schedule(c, &id)).await?;
    Ok(see_other("/records/retention"))
}

#[derive(Template)]
#[template(path = "paper_destruction.html")]
struct DestructionPage {
    chrome: Chrome,
    eligible: Vec<DueRow>,
    pending: Vec<medvault_core::PaperDestruction>,
    done: Vec<medvault_core::PaperDestruction>,
    reasons: Vec<(&'static str, &'static str)>,
    methods: Vec<(&'static str, &'static str)>,
    may_request: bool,
    may_approve: bool,
}

async fn destruction(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let (due, list) = gate(&web, &s, |v, c| {
        Ok((v.retention_due(c, None)?, v.paper_destructions(c)?))
    })
    .await?;
    let (pending, done) = list.into_iter().partition(|d| d.status == "requested");
    render(&DestructionPage {
        chrome: s.chrome(&web, "Paper destruction", "/records/destruction"),
        eligible: due
            .iter()
            .filter(|i| i.barcode.is_some() && i.verdict.destroy_eligible && i.holds.is_empty())
            .map(due_row)
            .collect(),
        pending,
        done,
        reasons: DestructionReason::ALL
            .iter()
            .map(|r| (r.as_str(), r.label()))
            .collect(),
        methods: PaperMethod::ALL
            .iter()
            .map(|m| (m.as_str(), m.label()))
            .collect(),
        may_request: matches!(
            s.caller.role(),
            Some(Role::RecordsClerk | Role::PrivacyOfficer)
        ),
        may_approve: s.caller.role() == Some(Role::PrivacyOfficer),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PaperForm {
    volumes: String,
    reason: String,
    method: String,
    vendor: String,
    witness: String,
    date: String,
    code: String,
}

async fn request(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<PaperForm>,
) -> Result<Response, WebError> {
    let r = PaperRequest {
        volumes: list(&f.volumes),
        reason: field(&f.reason, 40),
        method: field(&f.method, 40),
        vendor: field(&f.vendor, 120),
        witness: field(&f.witness, 120),
        date: field(&f.date, 10),
    };
    stepped_gate(&web, &s, &f.code, move |v, c| {
        v.request_paper_destruction(c, r)
    })
    .await?;
    Ok(see_other("/records/destruction"))
}

async fn decide(
    State(web): State<Web>,
    s: Signed,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    match action.as_str() {
        "approve" => {
            let to = format!("/records/destruction/{id}/certificate");
            stepped_gate(&web, &s, &f.code, move |v, c| {
                v.approve_paper_destruction(c, &id)
            })
            .await?;
            Ok(see_other(&to))
        }
        "cancel" => {
            stepped_gate(&web, &s, &f.code, move |v, c| {
                v.cancel_paper_destruction(c, &id)
            })
            .await?;
            Ok(see_other("/records/destruction"))
        }
        _ => Err(WebError::Vault(VaultError::NotFound)),
    }
}

async fn certificate(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let (certificate, key) = gate(&web, &s, move |v, c| {
        Ok((v.paper_certificate(c, &id)?, v.destruction_verifier_key(c)?))
    })
    .await?;
    render(&crate::lifecycle::CertificatePage {
        chrome: s.chrome(&web, "Certificate of destruction", "/records/destruction"),
        certificate,
        key,
        back: "/records/destruction",
    })
}

pub(crate) struct HoldRow {
    pub id: String,
    pub scope: String,
    pub matter: String,
    pub reason: String,
    pub placed: String,
    pub active: bool,
    pub released: String,
}

fn hold_row(h: &HoldView) -> HoldRow {
    HoldRow {
        id: h.id.clone(),
        scope: match &h.scope {
            HoldScope::Patient(p) => format!("patient {p}"),
            HoldScope::RecordClass(c) => format!("all {} records", c.as_str().replace('_', " ")),
            HoldScope::Volume(b) => format!("paper volume {b}"),
        },
        matter: h.matter.clone(),
        reason: h.reason.clone().unwrap_or_default(),
        placed: format!("{}, {}", h.set_by, when(h.set_at)),
        active: h.active,
        released: match (&h.released_by, h.released_at) {
            (Some(b), Some(t)) => format!("{b}, {}", when(t)),
            _ => String::new(),
        },
    }
}

#[derive(Template)]
#[template(path = "records_holds.html")]
struct HoldsPage {
    chrome: Chrome,
    rows: Vec<HoldRow>,
    classes: Vec<&'static str>,
    may_act: bool,
}

async fn holds(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.records_holds(c)).await?;
    render(&HoldsPage {
        chrome: s.chrome(&web, "Legal holds on records", "/records/holds"),
        rows: list.iter().map(hold_row).collect(),
        classes: RecordClass::ALL.iter().map(|c| c.as_str()).collect(),
        may_act: s.caller.role() == Some(Role::SecurityAdmin),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HoldForm {
    scope: String,
    target: String,
    matter: String,
    reason: String,
    code: String,
}

async fn set_hold(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<HoldForm>,
) -> Result<Response, WebError> {
    let target = field(&f.target, 64);
    let scope = match f.scope.as_str() {
        "patient" => HoldScope::Patient(target),
        "record_class" => HoldScope::RecordClass(target.parse().map_err(form_err)?),
        "volume" => HoldScope::Volume(target),
        _ => return Err(WebError::Form("Choose what the hold covers.".into())),
    };
    stepped_gate(&web, &s, &f.code, move |v, c| {
        v.set_records_hold(c, scope, &f.matter, &f.reason)
    })
    .await?;
    Ok(see_other("/records/holds"))
}

async fn release(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |v, c| {
        v.release_records_hold(c, &id)
    })
    .await?;
    Ok(see_other("/records/holds"))
}

/// One CSV cell (RFC 4180 quoting); a cell a spreadsheet would run as a formula starts
/// with an apostrophe (OWASP CSV injection).
fn cell(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{v}")
    } else {
        v.to_owned()
    };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

fn csv(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut out = header.join(",");
    out.push_str("\r\n");
    for r in rows {
        out.push_str(&r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
}

/// `GET /records/export/{volumes|custody|rooms|visitors|due|destruction|holds}`: the list
/// as a CSV download (read through the gate like the page, so audited the same way).
async fn export(
    State(web): State<Web>,
    s: Signed,
    Path(what): Path<String>,
) -> Result<Response, WebError> {
    let w = what.clone();
    let text = gate(&web, &s, move |v, c| {
        let now = v.now_unix();
        Ok(match w.as_str() {
            "volumes" => csv(
                &[
                    "barcode",
                    "patient",
                    "volume",
                    "record_class",
                    "location",
                    "status",
                    "holder",
                    "due",
                    "overdue",
                ],
                v.volumes(c, None)?
                    .iter()
                    .map(|x| {
                        let r = vol_row(&x.volume, now);
                        vec![
                            r.barcode,
                            r.patient,
                            r.volume.to_string(),
                            r.class,
                            r.location,
                            r.status,
                            r.holder,
                            r.due,
                            r.overdue.to_string(),
                        ]
                    })
                    .collect(),
            ),
            "custody" => csv(
                &[
                    "barcode",
                    "time",
                    "action",
                    "by",
                    "from",
                    "to",
                    "retrieved_by",
                    "due",
                    "note",
                ],
                v.volumes(c, None)?
                    .iter()
                    .flat_map(|x| {
                        x.volume.custody.iter().map(|e| {
                            vec![
                                x.volume.barcode.clone(),
                                when(e.at),
                                e.action.clone(),
                                e.by.clone(),
                                e.from.clone().unwrap_or_default(),
                                e.to.clone().unwrap_or_default(),
                                e.retrieved_by.clone().unwrap_or_default(),
                                e.due.map(when).unwrap_or_default(),
                                e.note.clone(),
                            ]
                        })
                    })
                    .collect(),
            ),
            "rooms" => csv(
                &[
                    "room",
                    "name",
                    "door",
                    "authorized",
                    "cabinets",
                    "camera_coverage",
                    "footage_retention_days",
                ],
                v.records_rooms(c)?
                    .into_iter()
                    .map(|r| {
                        vec![
                            r.id,
                            r.name,
                            r.door.unwrap_or_default(),
                            r.authorized.join(" "),
                            r.cabinets
                                .iter()
                                .map(|c| c.id.clone())
                                .collect::<Vec<_>>()
                                .join(" "),
                            r.cameras
                                .as_ref()
                                .map(|c| c.coverage.clone())
                                .unwrap_or_default(),
                            r.cameras
                                .map(|c| c.footage_retention_days.to_string())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect(),
            ),
            "visitors" => csv(
                &[
                    "name", "identity", "host", "purpose", "escort", "room", "time_in", "time_out",
                    "flags",
                ],
                v.visitors(c)?
                    .iter()
                    .map(|x| {
                        let r = visitor_row(x);
                        vec![
                            r.name, r.identity, r.host, r.purpose, r.escort, r.room, r.time_in,
                            r.time_out, r.flags,
                        ]
                    })
                    .collect(),
            ),
            "due" => csv(
                &[
                    "record",
                    "patient",
                    "record_class",
                    "destroy_eligible",
                    "destroy_eligible_from",
                    "rule",
                    "holds",
                ],
                v.retention_due(c, None)?
                    .iter()
                    .map(|i| {
                        let r = due_row(i);
                        vec![
                            r.what,
                            r.patient,
                            r.class,
                            r.eligible.to_string(),
                            r.from,
                            r.rule,
                            r.holds,
                        ]
                    })
                    .collect(),
            ),
            "destruction" => csv(
                &[
                    "id",
                    "patient",
                    "volumes",
                    "reason",
                    "method",
                    "vendor",
                    "witness",
                    "date",
                    "status",
                    "requested_by",
                    "decided_by",
                ],
                v.paper_destructions(c)?
                    .into_iter()
                    .map(|d| {
                        vec![
                            d.id,
                            d.patient,
                            d.volumes.join(" "),
                            d.reason.as_str().to_owned(),
                            d.method.as_str().to_owned(),
                            d.vendor,
                            d.witness,
                            d.date,
                            d.status,
                            d.requested_by,
                            d.decided_by.unwrap_or_default(),
                        ]
                    })
                    .collect(),
            ),
            "holds" => csv(
                &[
                    "id", "scope", "matter", "reason", "placed", "active", "released",
                ],
                v.records_holds(c)?
                    .iter()
                    .map(|h| {
                        let r = hold_row(h);
                        vec![
                            r.id,
                            r.scope,
                            r.matter,
                            r.reason,
                            r.placed,
                            r.active.to_string(),
                            r.released,
                        ]
                    })
                    .collect(),
            ),
            _ => return Err(VaultError::NotFound),
        })
    })
    .await?;
    let mut resp = text.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"medvault-{what}.csv\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_run_as_formulas() {
        assert_eq!(cell("plain"), "plain");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("+1"), "'+1");
        assert_eq!(
            csv(&["a", "b"], vec![vec!["1".into(), "-2".into()]]),
            "a,b\r\n1,'-2\r\n"
        );
    }
}
