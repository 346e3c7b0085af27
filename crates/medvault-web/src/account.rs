//! "My account": the caller's sessions (and ending them), passkeys (adding through the
//! WebAuthn ceremony, removing), a new authenticator app, new recovery codes, a new
//! password. Changes to factors need a step-up (SPEC "Identity").

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use medvault_core::{PasskeyView, Password, SessionView};
use serde::Deserialize;
use serde_json::json;

use crate::{
    gate, json_error, render, see_other, set_cookie, stepped_gate, when, Chrome, CodeForm,
    SecretPage, Signed, Web, WebError,
};

pub(crate) fn routes() -> Router<Web> {
    Router::new()
        .route("/account", get(account))
        .route("/account/sessions/{id}/end", post(end_session))
        .route("/account/passkeys/start", post(passkey_start))
        .route("/account/passkeys/finish", post(passkey_finish))
        .route("/account/passkeys/{id}/remove", post(remove_passkey))
        .route("/account/recovery-codes", post(recovery_codes))
        .route("/account/totp", post(reset_totp))
        .route("/account/password", post(change_password))
}

pub(crate) struct SessionRow {
    pub id: String,
    pub started: String,
    pub last_seen: String,
    pub source: String,
    pub method: String,
    pub current: bool,
}

pub(crate) struct PasskeyRow {
    pub id: String,
    pub name: String,
    pub created: String,
    pub last_used: String,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    chrome: Chrome,
    notice: String,
    sessions: Vec<SessionRow>,
    passkeys: Vec<PasskeyRow>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Done {
    done: String,
}

async fn account(
    State(web): State<Web>,
    s: Signed,
    Query(q): Query<Done>,
) -> Result<Response, WebError> {
    let (sessions, passkeys): (Vec<SessionView>, Vec<PasskeyView>) =
        gate(&web, &s, |v, c| Ok((v.sessions(c)?, v.passkeys(c)?))).await?;
    let notice = match q.done.as_str() {
        "passkey" => "Passkey added.",
        "passkey-removed" => "Passkey removed.",
        "session" => "Session ended.",
        _ => "",
    };
    render(&AccountPage {
        chrome: s.chrome(&web, "My account", "/account"),
        notice: notice.into(),
        sessions: sessions
            .into_iter()
            .map(|x| SessionRow {
                id: x.id,
                started: when(x.created),
                last_seen: when(x.last_seen),
                source: x.source,
                method: x.method,
                current: x.current,
            })
            .collect(),
        passkeys: passkeys
            .into_iter()
            .map(|p| PasskeyRow {
                id: p.id,
                name: p.name,
                created: when(p.created),
                last_used: if p.last_used == 0 {
                    "never".into()
                } else {
                    when(p.last_used)
                },
            })
            .collect(),
    })
}

async fn end_session(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    gate(&web, &s, move |v, c| v.end_session(c, &id)).await?;
    Ok(see_other("/account?done=session"))
}

async fn passkey_start(State(web): State<Web>, s: Signed, Json(f): Json<CodeForm>) -> Response {
    match stepped_gate(&web, &s, &f.code, |vault, c| {
        vault.passkey_registration_start(c)
    })
    .await
    {
        Ok(o) => Json(o).into_response(),
        Err(WebError::Vault(medvault_core::VaultError::StepUpRequired)) => json_error(
            StatusCode::UNAUTHORIZED,
            "enter your authenticator code to add a passkey",
        ),
        Err(WebError::Vault(
            medvault_core::VaultError::Unauthenticated | medvault_core::VaultError::Locked { .. },
        )) => json_error(StatusCode::UNAUTHORIZED, "the code was not accepted"),
        Err(_) => json_error(StatusCode::BAD_REQUEST, "a passkey cannot be added now"),
    }
}

#[derive(Deserialize)]
struct Registration {
    #[serde(default)]
    name: String,
    credential: serde_json::Value,
}

async fn passkey_finish(
    State(web): State<Web>,
    s: Signed,
    Json(f): Json<Registration>,
) -> Response {
    let name = crate::field(&f.name, 64);
    let name = if name.is_empty() {
        "passkey".into()
    } else {
        name
    };
    match gate(&web, &s, move |v, c| {
        v.passkey_registration_finish(c, &name, f.credential)
    })
    .await
    {
        Ok(id) => Json(json!({ "id": id })).into_response(),
        Err(_) => json_error(StatusCode::BAD_REQUEST, "the passkey was not accepted"),
    }
}

async fn remove_passkey(
    State(web): State<Web>,
    s: Signed,
    Path(id): Path<String>,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.revoke_passkey(c, &id)
    })
    .await?;
    Ok(see_other("/account?done=passkey-removed"))
}

async fn recovery_codes(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    let codes = stepped_gate(&web, &s, &f.code, move |vault, c| {
        vault.new_recovery_codes(c)
    })
    .await?;
    render(&SecretPage {
        chrome: s.chrome(&web, "New recovery codes", "/account"),
        intro: "Your earlier recovery codes no longer work. Keep these somewhere safe; each works once, and this page will not show them again.".into(),
        items: vec![],
        codes,
    })
}

async fn reset_totp(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<CodeForm>,
) -> Result<Response, WebError> {
    let e = stepped_gate(&web, &s, &f.code, move |vault, c| vault.reset_own_totp(c)).await?;
    render(&SecretPage {
        chrome: s.chrome(&web, "New authenticator app", "/account"),
        intro: "Add this to your authenticator app now: your old app's codes no longer work. This page will not show the secret again.".into(),
        items: vec![
            ("Secret".into(), e.totp_secret.clone()),
            ("Enrollment URI".into(), e.totp_uri.clone()),
        ],
        codes: vec![],
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PasswordForm {
    current: String,
    new: String,
    confirm: String,
}

async fn change_password(
    State(web): State<Web>,
    s: Signed,
    Form(f): Form<PasswordForm>,
) -> Result<Response, WebError> {
    if f.new != f.confirm {
        return Err(WebError::Form(
            "The new password and its confirmation differ.".into(),
        ));
    }
    let (current, new) = (Password::new(f.current), Password::new(f.new));
    gate(&web, &s, move |v, c| v.change_password(c, &current, &new)).await?;
    // Every session ended with the change: sign in again with the new password.
    let mut r = see_other("/login?reason=ended");
    set_cookie(&mut r, crate::SESSION_COOKIE, "", "/", 0);
    Ok(r)
}
