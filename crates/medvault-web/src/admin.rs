//! Security administrators' pages: users (add, disable, enable, unlock, reset MFA, change
//! role), policy versions (view, diff against the version in force, propose, approve),
//! service clients (add, revoke) and system status. Every change needs a step-up: the
//! forms carry an authenticator-code field, verified before the change.

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use medvault_core::{Password, PolicyVersion, Role, VaultError};
use serde::Deserialize;

use crate::{
    gate, render, see_other, stepped_gate, when, Chrome, CodeForm, SecretPage, Signed, Web,
    WebError,
};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/admin/users", get(users).post(add_user))
        .route("/admin/users/{name}/{action}", post(user_action))
        .route("/admin/policies", get(policies).post(propose))
        .route("/admin/policies/{version}/approve", post(approve))
        .route("/admin/clients", get(clients).post(add_client))
        .route("/admin/clients/{id}/revoke", post(revoke_client))
        .route("/admin/status", get(status))
}

/// Roles an administrator may give from the console.
const ROLES: &[Role] = &[
    Role::Physician,
    Role::Nurse,
    Role::FrontDesk,
    Role::Billing,
    Role::PrivacyOfficer,
    Role::Auditor,
    Role::RecordsClerk,
    Role::SecurityAdmin,
];

pub(crate) struct UserRow {
    pub name: String,
    pub role: String,
    pub disabled: bool,
    pub locked: String,
    pub last_login: String,
    pub passkeys: usize,
    pub training: bool,
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    chrome: Chrome,
    users: Vec<UserRow>,
    roles: Vec<&'static str>,
}

async fn users(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.users(c)).await?;
    render(&UsersPage {
        chrome: s.chrome(&web, "Users", "/admin/users"),
        users: list
            .into_iter()
            .map(|u| UserRow {
                name: u.username,
                role: u.role,
                disabled: u.disabled,
                locked: if u.locked_for > 0 {
                    format!("locked for {} s", u.locked_for)
                } else {
                    String::new()
                },
                last_login: u.last_login.map(when).unwrap_or_else(|| "never".into()),
                passkeys: u.passkeys,
                training: u.training_current,
            })
            .collect(),
        roles: ROLES.iter().map(|r| r.as_str()).collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NewUser {
    username: String,
    role: String,
    code: String,
}

fn role_of(s: &str) -> Result<Role, WebError> {
    s.parse::<Role>()
        .ok()
        .filter(|r| ROLES.contains(r))
        .ok_or_else(|| WebError::Form("Choose one of the listed roles.".into()))
}

async fn add_user(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<NewUser>,
) -> Result<Response, WebError> {
    let role = role_of(&f.role)?;
    let name = crate::field(&f.username, 64);
    let u = stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.add_user(c, &name, role, None::<Password>)
    })
    .await?;
    let mut items = vec![
        ("User name".into(), u.username.as_str().to_owned()),
        ("Role".into(), u.role.as_str().replace('_', " ")),
        ("Password".into(), u.password.expose().to_owned()),
        ("TOTP secret".into(), u.totp_secret.clone()),
        ("TOTP enrollment URI".into(), u.totp_uri.clone()),
    ];
    if let Some(p) = &u.practitioner_id {
        items.push(("Practitioner".into(), p.clone()));
    }
    render(&SecretPage {
        chrome: s.chrome(&web, "User added", "/admin/users"),
        intro: "Hand these to the user in person; this page will not show them again. Ask them to change the password under My account.".into(),
        items,
        codes: u.recovery_codes.clone(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UserAction {
    code: String,
    role: String,
}

/// `POST /admin/users/{name}/{disable|enable|unlock|mfa-reset|role}` (step-up).
async fn user_action(
    State(web): State<Web>,
    s: Signed,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<UserAction>,
) -> Result<Response, WebError> {
    let role = if action == "role" {
        Some(role_of(&f.role)?)
    } else {
        None
    };
    if !matches!(
        action.as_str(),
        "disable" | "enable" | "unlock" | "mfa-reset" | "role"
    ) {
        return Err(WebError::Vault(VaultError::NotFound));
    }
    let who = name.clone();
    let enrollment = stepped_gate(&web, &s, &f.code, move |vault, c| {
        match (action.as_str(), role) {
            ("disable", _) => vault.set_user_disabled(c, &who, true).map(|_| None),
            ("enable", _) => vault.set_user_disabled(c, &who, false).map(|_| None),
            ("unlock", _) => vault.unlock_user(c, &who).map(|_| None),
            ("role", Some(r)) => vault.set_user_role(c, &who, r).map(|_| None),
            _ => vault.reset_mfa(c, &who).map(Some),
        }
    })
    .await?;
    match enrollment {
        None => Ok(see_other("/admin/users")),
        Some(e) => render(&SecretPage {
            chrome: s.chrome(&web, "Second factor reset", "/admin/users"),
            intro: format!("{name}'s passkeys are revoked and sessions ended. Hand over the new enrollment in person; this page will not show it again."),
            items: vec![
                ("TOTP secret".into(), e.totp_secret.clone()),
                ("TOTP enrollment URI".into(), e.totp_uri.clone()),
            ],
            codes: e.recovery_codes.clone(),
        }),
    }
}

pub(crate) struct PolicyRow {
    pub version: i64,
    pub status: String,
    pub proposed: String,
    pub approved: String,
    pub text: String,
    /// Lines against the version in force: (`+`, `-` or ` `, text).
    pub diff: Vec<(char, String)>,
}

#[derive(Template)]
#[template(path = "policies.html")]
struct PoliciesPage {
    chrome: Chrome,
    versions: Vec<PolicyRow>,
    active_text: String,
}

fn diff(old: &str, new: &str) -> Vec<(char, String)> {
    use similar::{ChangeTag, TextDiff};
    TextDiff::from_lines(old, new)
        .iter_all_changes()
        .filter(|c| c.tag() != ChangeTag::Equal)
        .map(|c| {
            let tag = match c.tag() {
                ChangeTag::Insert => '+',
                ChangeTag::Delete => '-',
                ChangeTag::Equal => ' ',
            };
            (tag, c.value().trim_end_matches('\n').to_owned())
        })
        .collect()
}

async fn policies(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list: Vec<PolicyVersion> = gate(&web, &s, |v, c| v.policies(c)).await?;
    let active_text = list
        .iter()
        .find(|p| p.status == "active")
        .map(|p| p.text.clone())
        .unwrap_or_default();
    render(&PoliciesPage {
        chrome: s.chrome(&web, "Policies", "/admin/policies"),
        versions: list
            .iter()
            .rev()
            .map(|p| PolicyRow {
                version: p.version,
                status: p.status.clone(),
                proposed: match (&p.proposed_by, p.proposed_at) {
                    (Some(b), Some(a)) => format!("{b}, {}", when(a)),
                    _ => "shipped with medvault".into(),
                },
                approved: match (&p.approved_by, p.approved_at) {
                    (Some(b), Some(a)) => format!("{b}, {}", when(a)),
                    _ => String::new(),
                },
                diff: if p.status == "active" {
                    vec![]
                } else {
                    diff(&active_text, &p.text)
                },
                text: p.text.clone(),
            })
            .collect(),
        active_text,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Proposal {
    text: String,
    code: String,
}

async fn propose(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<Proposal>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.propose_policy(c, &f.text)
    })
    .await?;
    Ok(see_other("/admin/policies"))
}

async fn approve(
    State(web): State<Web>,
    s: Signed,
    Path(version): Path<i64>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.approve_policy(c, version)
    })
    .await?;
    Ok(see_other("/admin/policies"))
}

pub(crate) struct ClientRow {
    pub id: String,
    pub name: String,
    pub scopes: String,
    pub auth: String,
    pub created: String,
}

#[derive(Template)]
#[template(path = "clients.html")]
struct ClientsPage {
    chrome: Chrome,
    clients: Vec<ClientRow>,
}

async fn clients(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let list = gate(&web, &s, |v, c| v.clients(c)).await?;
    render(&ClientsPage {
        chrome: s.chrome(&web, "Service clients", "/admin/clients"),
        clients: list
            .into_iter()
            .map(|c| ClientRow {
                id: c.client_id,
                name: c.name,
                scopes: c.scopes.join(" "),
                auth: c.auth.replace('_', " "),
                created: when(c.created),
            })
            .collect(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NewClient {
    name: String,
    scopes: String,
    code: String,
}

async fn add_client(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<NewClient>,
) -> Result<Response, WebError> {
    let (name, scopes) = (crate::field(&f.name, 64), crate::field(&f.scopes, 1000));
    let n = stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.add_client(c, &name, &scopes, None)
    })
    .await?;
    let mut items = vec![("Client id".into(), n.client_id.clone())];
    if let Some(secret) = &n.client_secret {
        items.push(("Client secret".into(), secret.expose().to_owned()));
    }
    render(&SecretPage {
        chrome: s.chrome(&web, "Service client added", "/admin/clients"),
        intro: "Give these to the system's operator; this page will not show the secret again."
            .into(),
        items,
        codes: vec![],
    })
}

async fn revoke_client(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.revoke_client(c, &id)
    })
    .await?;
    Ok(see_other("/admin/clients"))
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    chrome: Chrome,
    facts: Vec<(String, String)>,
}

async fn status(State(web): State<Web>, s: Signed) -> Result<Response, WebError> {
    let st = gate(&web, &s, |v, c| v.status(c)).await?;
    render(&StatusPage {
        chrome: s.chrome(&web, "System status", "/admin/status"),
        facts: vec![
            ("Storage backend".into(), st.backend.to_owned()),
            ("Audit log entries".into(), st.audit_entries.to_string()),
            (
                "Patient data keys cached".into(),
                st.key_cache_entries.to_string(),
            ),
            (
                "Idle logoff".into(),
                format!("{} s", web.options.idle_timeout_secs),
            ),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_diff_lists_only_changed_lines() {
        let d = diff("a\nb\nc\n", "a\nB\nc\n");
        assert_eq!(d, vec![('-', "b".to_owned()), ('+', "B".to_owned())]);
    }
}
