//! The search query, written once for both SQL backends.

use medvault_types::PatientId;

use crate::{DestructionRow, LegalHoldRow, PortalLinkRow};

use crate::{
    BreakGlassRow, Charts, CredentialRow, GovernanceRow, IncidentRow, Op, Order, PolicyRow,
    Privacy, Reach, Sealed, SearchQuery, SessionRow, ThrottleRow, UserRow, VersionRow,
};

/// Which SQL the builder speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
pub(crate) enum Arg {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
    Bool(bool),
    Null,
}

/// The columns [`sealed`] maps, in order, for a `resource_versions v` query.
pub(crate) const VERSION_COLS: &str =
    "v.rtype, v.id, v.version, v.patient_id, v.last_updated, v.deleted, v.category, v.key_version, v.body";

/// The columns [`user`] maps, in order.
pub(crate) const USER_COLS: &str =
    "username, role, password_hash, totp_secret_wrapped, totp_last_step, disabled, created, practitioner_id, last_login, training_current";

/// The columns [`break_glass`] maps, in order.
pub(crate) const BREAK_GLASS_COLS: &str =
    "id, username, patient_id, reason, justification, created, expires, outcome, reviewed_by, reviewed_at, note, incident";

/// The columns [`policy`] maps, in order.
pub(crate) const POLICY_COLS: &str =
    "version, text, proposed_by, proposed_at, status, approved_by, approved_at";

/// A policy version from the [`POLICY_COLS`] of a row.
pub(crate) fn policy<R: Columns>(r: &R) -> Result<PolicyRow, R::Error> {
    Ok(PolicyRow {
        version: r.int(0)?,
        text: r.text(1)?,
        proposed_by: r.text(2)?,
        proposed_at: r.int(3)?,
        status: r.text(4)?,
        approved_by: r.text(5)?,
        approved_at: r.int(6)?,
    })
}

/// The columns [`portal_link`] maps, in order.
pub(crate) const PORTAL_LINK_COLS: &str =
    "username, patient_id, kind, evidence, linked_by, linked_at";

/// A portal link from the [`PORTAL_LINK_COLS`] of a row (`None` for a bad patient id).
pub(crate) fn portal_link<R: Columns>(r: &R) -> Result<Option<PortalLinkRow>, R::Error> {
    let Some(patient) = r.patient(1)?.and_then(|p| PatientId::new(&p).ok()) else {
        return Ok(None);
    };
    Ok(Some(PortalLinkRow {
        username: r.text(0)?,
        patient,
        kind: r.text(2)?,
        evidence: r.text(3)?,
        linked_by: r.text(4)?,
        linked_at: r.int(5)?,
    }))
}

/// The columns [`legal_hold`] maps, in order.
pub(crate) const LEGAL_HOLD_COLS: &str =
    "id, patient_id, matter, reason, set_by, set_at, released_by, released_at";

/// A legal hold from the [`LEGAL_HOLD_COLS`] of a row (`None` for a bad patient id).
pub(crate) fn legal_hold<R: Columns>(r: &R) -> Result<Option<LegalHoldRow>, R::Error> {
    let Some(patient) = r.patient(1)?.and_then(|p| PatientId::new(&p).ok()) else {
        return Ok(None);
    };
    Ok(Some(LegalHoldRow {
        id: r.text(0)?,
        patient,
        matter: r.text(2)?,
        reason: r.bytes(3)?,
        set_by: r.text(4)?,
        set_at: r.int(5)?,
        released_by: r.text(6)?,
        released_at: r.int(7)?,
    }))
}

/// The columns [`destruction`] maps, in order.
pub(crate) const DESTRUCTION_COLS: &str =
    "id, patient_id, reason, status, requested_by, requested_at, approved_by, approved_at, records, audit_seq, checkpoint";

/// A destruction request from the [`DESTRUCTION_COLS`] of a row (`None` for a bad id).
pub(crate) fn destruction<R: Columns>(r: &R) -> Result<Option<DestructionRow>, R::Error> {
    let Some(patient) = r.patient(1)?.and_then(|p| PatientId::new(&p).ok()) else {
        return Ok(None);
    };
    Ok(Some(DestructionRow {
        id: r.text(0)?,
        patient,
        reason: r.text(2)?,
        status: r.text(3)?,
        requested_by: r.text(4)?,
        requested_at: r.int(5)?,
        approved_by: r.text(6)?,
        approved_at: r.int(7)?,
        records: r.text(8)?,
        audit_seq: r.int(9)?,
        checkpoint: r.int(10)?,
    }))
}

/// `Store::chart_versions`: `$1` the patient id.
pub(crate) const CHART_VERSIONS_SQL: &str =
    "WHERE v.patient_id = $1 ORDER BY v.rtype, v.id, v.version";

/// `Store::patient_keys`: `$1` the patient id.
pub(crate) const PATIENT_KEYS_SQL: &str =
    "SELECT key_version, master_version, wrapped FROM patient_keys WHERE patient_id = $1 ORDER BY key_version DESC";

/// `Store::keys_wrapped_below`: `$1` the master version, `$2` the limit.
pub(crate) const KEYS_BELOW_SQL: &str =
    "SELECT patient_id, key_version, master_version, wrapped FROM patient_keys WHERE master_version < $1 ORDER BY patient_id, key_version LIMIT $2";

/// `Store::master_key_census`.
pub(crate) const MASTER_CENSUS_SQL: &str =
    "SELECT master_version, COUNT(*) FROM patient_keys GROUP BY master_version ORDER BY master_version";

/// A chart's census (`Store::chart_census`): `$1` is the patient id.
pub(crate) const CENSUS_SQL: &str =
    "SELECT rtype, COUNT(DISTINCT id), COUNT(*) FROM resource_versions WHERE patient_id = $1 GROUP BY rtype ORDER BY rtype";

/// The columns [`incident`] maps, in order.
pub(crate) const INCIDENT_COLS: &str = "id, opened_at, status, body";

/// The columns [`governance`] maps, in order.
pub(crate) const GOVERNANCE_COLS: &str = "kind, id, at, status, subject, body";

/// A governance record from the [`GOVERNANCE_COLS`] of a row.
pub(crate) fn governance<R: Columns>(r: &R) -> Result<GovernanceRow, R::Error> {
    Ok(GovernanceRow {
        kind: r.text(0)?,
        id: r.text(1)?,
        at: r.int(2)?,
        status: r.text(3)?,
        subject: r.text(4)?,
        body: r.bytes(5)?,
    })
}

/// The columns [`session`] maps, in order.
pub(crate) const SESSION_COLS: &str =
    "token_hash, kind, username, created, last_seen, expires, attempts, mfa_at, source, method, scope";

/// The columns [`credential`] maps, in order.
pub(crate) const CREDENTIAL_COLS: &str = "kind, id, username, name, data, created, last_used";

/// The columns [`throttle`] maps, in order.
pub(crate) const THROTTLE_COLS: &str = "key, failures, window_start, last_failure";

/// One result row, column by position, as each backend's driver reads it.
pub(crate) trait Columns {
    type Error;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    /// The patient column (SQLite: NULL for none; PostgreSQL: '' for none, as it is part of
    /// the partition key).
    fn patient(&self, i: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>, Self::Error>;
}

/// A stored version from the [`VERSION_COLS`] of a row: the one row mapper of both backends.
pub(crate) fn sealed<R: Columns>(r: &R) -> Result<Sealed, R::Error> {
    Ok(Sealed::from_storage(VersionRow {
        rtype: r.text(0)?,
        id: r.text(1)?,
        version: u64::try_from(r.int(2)?).unwrap_or(0),
        patient: r.patient(3)?.and_then(|p| PatientId::new(&p).ok()),
        last_updated: r.text(4)?,
        deleted: r.flag(5)?,
        category: r.text(6)?,
        key_version: u32::try_from(r.int(7)?).unwrap_or(0),
        body: r.bytes(8)?,
    }))
}

/// A user from the [`USER_COLS`] of a row.
pub(crate) fn user<R: Columns>(r: &R) -> Result<UserRow, R::Error> {
    Ok(UserRow {
        username: r.text(0)?,
        role: r.text(1)?,
        password_hash: r.text(2)?,
        totp_secret_wrapped: r.bytes(3)?,
        totp_last_step: r.int(4)?,
        disabled: r.flag(5)?,
        created: r.text(6)?,
        practitioner_id: r.opt_text(7)?,
        last_login: r.int(8)?,
        training_current: r.flag(9)?,
    })
}

/// A break-the-glass grant from the [`BREAK_GLASS_COLS`] of a row (a row whose patient id
/// is not a valid id maps to `None`, and is skipped).
pub(crate) fn break_glass<R: Columns>(r: &R) -> Result<Option<BreakGlassRow>, R::Error> {
    let Some(patient) = r.patient(2)?.and_then(|p| PatientId::new(&p).ok()) else {
        return Ok(None);
    };
    Ok(Some(BreakGlassRow {
        id: r.text(0)?,
        username: r.text(1)?,
        patient,
        reason: r.text(3)?,
        justification: r.bytes(4)?,
        created: r.int(5)?,
        expires: r.int(6)?,
        outcome: r.text(7)?,
        reviewed_by: r.text(8)?,
        reviewed_at: r.int(9)?,
        note: r.bytes(10)?,
        incident: r.text(11)?,
    }))
}

/// An incident from the [`INCIDENT_COLS`] of a row.
pub(crate) fn incident<R: Columns>(r: &R) -> Result<IncidentRow, R::Error> {
    Ok(IncidentRow {
        id: r.text(0)?,
        opened_at: r.int(1)?,
        status: r.text(2)?,
        body: r.text(3)?,
    })
}

/// The query of `charts` (see [`crate::TxRead::charts`]): `(patient_id, how)` rows, `how`
/// 0 for a care relationship and 1 for a break-the-glass grant.
pub(crate) fn charts(
    care_tokens: &[Vec<u8>],
    username: &str,
    now: i64,
    patient: Option<&PatientId>,
    d: Dialect,
) -> (String, Vec<Arg>) {
    let mark = |i: usize| match d {
        Dialect::Sqlite => format!("?{i}"),
        Dialect::Postgres => format!("${i}"),
    };
    // Argument 3 is the chart ('' for every chart).
    let only = format!("({} = '' OR patient_id = {})", mark(3), mark(3));
    let mut args = vec![
        Arg::Text(username.to_owned()),
        Arg::Int(now),
        Arg::Text(patient.map(|p| p.as_str().to_owned()).unwrap_or_default()),
    ];
    let mut sql = format!(
        "SELECT DISTINCT patient_id, CAST(CASE WHEN reason = 'medical-emergency' THEN 2 ELSE 1 END AS BIGINT) FROM break_glass WHERE username = {} AND expires > {} AND {only}
         UNION ALL SELECT patient_id, CAST(CASE WHEN kind = 'self' THEN 3 ELSE 4 END AS BIGINT) FROM portal_links WHERE username = {} AND {only}",
        mark(1),
        mark(2),
        mark(1)
    );
    if !care_tokens.is_empty() {
        let marks: Vec<String> = (0..care_tokens.len()).map(|i| mark(i + 4)).collect();
        // For one chart, drive from that chart's index rows (a clinician's panel may hold
        // thousands of charts under the same token); for every chart, from the tokens.
        let (hint, chart) = match (patient.is_some(), d) {
            (true, Dialect::Sqlite) => (
                " INDEXED BY search_index_chart",
                format!("patient_id = {}", mark(3)),
            ),
            (true, Dialect::Postgres) => ("", format!("patient_id = {}", mark(3))),
            (false, _) => ("", only.clone()),
        };
        sql = format!(
            "SELECT DISTINCT patient_id, CAST(0 AS BIGINT) FROM search_index{hint} WHERE {chart} AND param = '_care' AND rtype IN ('CareTeam', 'Encounter') AND token IN ({}) UNION ALL {sql}",
            marks.join(", ")
        );
        args.extend(care_tokens.iter().cloned().map(Arg::Bytes));
    }
    (sql, args)
}

/// Folds `charts` rows into one entry per chart, a care relationship winning.
pub(crate) fn fold_charts(rows: Vec<(Option<String>, i64)>) -> Vec<(PatientId, Reach)> {
    let mut out: Vec<(PatientId, Reach)> = vec![];
    for (p, how) in rows {
        let Some(p) = p.and_then(|p| PatientId::new(&p).ok()) else {
            continue;
        };
        let reach = match how {
            0 => Reach::Care,
            2 => Reach::Emergency,
            3 => Reach::Own,
            4 => Reach::Proxy,
            _ => Reach::BreakGlass,
        };
        // An emergency grant wins (it is what overrides a consent, and its accesses are
        // flagged), then a care relationship, then another grant, then portal links.
        let rank = |r: Reach| match r {
            Reach::Emergency => 5,
            Reach::Care => 4,
            Reach::BreakGlass => 3,
            Reach::Own => 2,
            Reach::Proxy => 1,
        };
        match out.iter_mut().find(|(q, _)| *q == p) {
            Some(e) if rank(reach) > rank(e.1) => e.1 = reach,
            Some(_) => {}
            None => out.push((p, reach)),
        }
    }
    out
}

/// A session from the [`SESSION_COLS`] of a row.
pub(crate) fn session<R: Columns>(r: &R) -> Result<SessionRow, R::Error> {
    Ok(SessionRow {
        token_hash: r.bytes(0)?,
        kind: r.text(1)?,
        username: r.text(2)?,
        created: r.int(3)?,
        last_seen: r.int(4)?,
        expires: r.int(5)?,
        attempts: r.int(6)?,
        mfa_at: r.int(7)?,
        source: r.text(8)?,
        method: r.text(9)?,
        scope: r.text(10)?,
    })
}

/// A credential from the [`CREDENTIAL_COLS`] of a row.
pub(crate) fn credential<R: Columns>(r: &R) -> Result<CredentialRow, R::Error> {
    Ok(CredentialRow {
        kind: r.text(0)?,
        id: r.bytes(1)?,
        username: r.text(2)?,
        name: r.text(3)?,
        data: r.bytes(4)?,
        created: r.int(5)?,
        last_used: r.int(6)?,
    })
}

/// A failure counter from the [`THROTTLE_COLS`] of a row.
pub(crate) fn throttle<R: Columns>(r: &R) -> Result<ThrottleRow, R::Error> {
    Ok(ThrottleRow {
        key: r.bytes(0)?,
        failures: r.int(1)?,
        window_start: r.int(2)?,
        last_failure: r.int(3)?,
    })
}

/// What a statement's row count must be for its operation to hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Must {
    /// Anything (an idempotent change).
    Any,
    /// At least one row, else the operation is a `Conflict`.
    Touch,
}

/// One statement of an operation on users, sessions, credentials or the login throttle.
pub(crate) struct Stmt {
    pub sql: &'static str,
    pub args: Vec<Arg>,
    pub must: Must,
}

fn stmt(sql: &'static str, args: Vec<Arg>, must: Must) -> Stmt {
    Stmt { sql, args, must }
}

/// The statements of an identity operation, written once for both backends: `$n`
/// placeholders (SQLite runs them as `?n`, which bind by number as `$n` do in PostgreSQL)
/// and upserts both dialects accept. `None` for operations each
/// backend applies itself. A unique-key violation is `Exists` on both backends.
pub(crate) fn identity(op: &Op) -> Option<Vec<Stmt>> {
    use Arg::{Bool, Bytes, Int, Text};
    use Must::{Any, Touch};
    let t = |s: &String| Text(s.clone());
    let b = |v: &Vec<u8>| Bytes(v.clone());
    Some(match op {
        Op::CreateUser(u) | Op::PutUser(u) => {
            let args = vec![
                t(&u.username),
                t(&u.role),
                t(&u.password_hash),
                b(&u.totp_secret_wrapped),
                Int(u.totp_last_step),
                Bool(u.disabled),
                t(&u.created),
                u.practitioner_id.as_ref().map(t).unwrap_or(Arg::Null),
                Int(u.last_login),
                Bool(u.training_current),
            ];
            let sql = if matches!(op, Op::CreateUser(_)) {
                "INSERT INTO users (username, role, password_hash, totp_secret_wrapped, totp_last_step, disabled, created, practitioner_id, last_login, training_current, failed_logins)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0)"
            } else {
                "INSERT INTO users (username, role, password_hash, totp_secret_wrapped, totp_last_step, disabled, created, practitioner_id, last_login, training_current, failed_logins)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0)
                 ON CONFLICT (username) DO UPDATE SET role = excluded.role, password_hash = excluded.password_hash,
                   totp_secret_wrapped = excluded.totp_secret_wrapped, totp_last_step = excluded.totp_last_step,
                   disabled = excluded.disabled, created = excluded.created,
                   practitioner_id = excluded.practitioner_id, last_login = excluded.last_login,
                   training_current = excluded.training_current"
            };
            vec![stmt(sql, args, Any)]
        }
        Op::UseTotpStep { username, step } => vec![stmt(
            "UPDATE users SET totp_last_step = $2 WHERE username = $1 AND totp_last_step < $2",
            vec![t(username), Int(*step)],
            Touch,
        )],
        Op::RecordLogin { username, at } => vec![stmt(
            "UPDATE users SET last_login = $2 WHERE username = $1",
            vec![t(username), Int(*at)],
            Any,
        )],
        Op::SetPasswordHash { username, hash } => vec![stmt(
            "UPDATE users SET password_hash = $2 WHERE username = $1",
            vec![t(username), t(hash)],
            Touch,
        )],
        Op::SetTotpSecret { username, wrapped } => vec![stmt(
            "UPDATE users SET totp_secret_wrapped = $2, totp_last_step = 0 WHERE username = $1",
            vec![t(username), b(wrapped)],
            Touch,
        )],
        Op::SetDisabled { username, disabled } => vec![stmt(
            "UPDATE users SET disabled = $2 WHERE username = $1",
            vec![t(username), Bool(*disabled)],
            Touch,
        )],
        Op::SetTraining { username, current } => vec![stmt(
            "UPDATE users SET training_current = $2 WHERE username = $1",
            vec![t(username), Bool(*current)],
            Touch,
        )],
        Op::PutBreakGlass(g) => vec![stmt(
            "INSERT INTO break_glass (id, username, patient_id, reason, justification, created, expires, outcome, reviewed_by, reviewed_at, note, incident)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            vec![
                t(&g.id),
                t(&g.username),
                Text(g.patient.as_str().to_owned()),
                t(&g.reason),
                b(&g.justification),
                Int(g.created),
                Int(g.expires),
                t(&g.outcome),
                t(&g.reviewed_by),
                Int(g.reviewed_at),
                b(&g.note),
                t(&g.incident),
            ],
            Any,
        )],
        Op::ReviewBreakGlass {
            id,
            outcome,
            reviewed_by,
            reviewed_at,
            note,
            incident,
        } => vec![stmt(
            "UPDATE break_glass SET outcome = $2, reviewed_by = $3, reviewed_at = $4, note = $5, incident = $6,
               expires = CASE WHEN $2 = 'inappropriate' AND expires > $4 THEN $4 ELSE expires END
             WHERE id = $1 AND outcome = ''",
            vec![
                t(id),
                t(outcome),
                t(reviewed_by),
                Int(*reviewed_at),
                b(note),
                t(incident),
            ],
            Touch,
        )],
        Op::PutIncident(i) => vec![stmt(
            "INSERT INTO incidents (id, opened_at, status, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
            vec![t(&i.id), Int(i.opened_at), t(&i.status), t(&i.body)],
            Any,
        )],
        Op::PutGovernance(g) => vec![stmt(
            "INSERT INTO governance (kind, id, at, status, subject, body) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (kind, id) DO UPDATE SET at = excluded.at, status = excluded.status,
                 subject = excluded.subject, body = excluded.body",
            vec![t(&g.kind), t(&g.id), Int(g.at), t(&g.status), t(&g.subject), b(&g.body)],
            Any,
        )],
        Op::DeleteGovernance { kind, id } => vec![stmt(
            "DELETE FROM governance WHERE kind = $1 AND id = $2",
            vec![t(kind), t(id)],
            Any,
        )],
        Op::PutPortalLink(l) => vec![stmt(
            "INSERT INTO portal_links (username, patient_id, kind, evidence, linked_by, linked_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                t(&l.username),
                Text(l.patient.as_str().to_owned()),
                t(&l.kind),
                t(&l.evidence),
                t(&l.linked_by),
                Int(l.linked_at),
            ],
            Any,
        )],
        Op::DeletePortalLink { username, patient } => vec![stmt(
            "DELETE FROM portal_links WHERE username = $1 AND patient_id = $2",
            vec![t(username), Text(patient.as_str().to_owned())],
            Touch,
        )],
        Op::PutLegalHold(h) => vec![stmt(
            "INSERT INTO legal_holds (id, patient_id, matter, reason, set_by, set_at, released_by, released_at)
             VALUES ($1, $2, $3, $4, $5, $6, '', 0)",
            vec![
                t(&h.id),
                Text(h.patient.as_str().to_owned()),
                t(&h.matter),
                b(&h.reason),
                t(&h.set_by),
                Int(h.set_at),
            ],
            Any,
        )],
        Op::ReleaseLegalHold {
            id,
            released_by,
            released_at,
        } => vec![stmt(
            "UPDATE legal_holds SET released_by = $2, released_at = $3 WHERE id = $1 AND released_at = 0",
            vec![t(id), t(released_by), Int(*released_at)],
            Touch,
        )],
        Op::RequestDestruction(d) => vec![stmt(
            "INSERT INTO destructions (id, patient_id, reason, status, requested_by, requested_at, approved_by, approved_at, records, audit_seq, checkpoint)
             SELECT $1, $2, $3, 'requested', $4, $5, '', 0, '', -1, 0
             WHERE NOT EXISTS (SELECT 1 FROM legal_holds WHERE patient_id = $2 AND released_at = 0)
               AND NOT EXISTS (SELECT 1 FROM destructions WHERE patient_id = $2 AND status = 'requested')",
            vec![
                t(&d.id),
                Text(d.patient.as_str().to_owned()),
                t(&d.reason),
                t(&d.requested_by),
                Int(d.requested_at),
            ],
            Touch,
        )],
        Op::CompleteDestruction {
            id,
            approved_by,
            approved_at,
            records,
        } => vec![stmt(
            "UPDATE destructions SET status = 'completed', approved_by = $2, approved_at = $3, records = $4
             WHERE id = $1 AND status = 'requested' AND requested_by <> $2
               AND NOT EXISTS (SELECT 1 FROM legal_holds h WHERE h.patient_id = destructions.patient_id AND h.released_at = 0)",
            vec![t(id), t(approved_by), Int(*approved_at), t(records)],
            Touch,
        )],
        Op::CancelDestruction {
            id,
            cancelled_by,
            at,
        } => vec![stmt(
            "UPDATE destructions SET status = 'cancelled', approved_by = $2, approved_at = $3
             WHERE id = $1 AND status = 'requested'",
            vec![t(id), t(cancelled_by), Int(*at)],
            Touch,
        )],
        Op::SetDestructionEvidence {
            id,
            audit_seq,
            checkpoint,
        } => vec![stmt(
            "UPDATE destructions SET audit_seq = $2, checkpoint = $3 WHERE id = $1 AND status = 'completed'",
            vec![t(id), Int(*audit_seq), Int(*checkpoint)],
            Touch,
        )],
        Op::RewrapPatientKey {
            patient,
            key_version,
            from,
            to,
            wrapped,
        } => vec![stmt(
            "UPDATE patient_keys SET wrapped = $5, master_version = $4
             WHERE patient_id = $1 AND key_version = $2 AND master_version = $3",
            vec![
                Text(patient.as_str().to_owned()),
                Int(i64::from(*key_version)),
                Int(i64::from(*from)),
                Int(i64::from(*to)),
                b(wrapped),
            ],
            Touch,
        )],
        Op::ShredPatient { patient } => {
            let p = || Text(patient.as_str().to_owned());
            // The keys first: once they are gone, whatever copy of a row survives anywhere
            // (a WAL frame, a replica, a backup) is ciphertext nobody can open.
            // Only rows that do not grow with the chart: a shred takes the same time for
            // one record or ten thousand. The chart's records stay behind as ciphertext
            // nobody can open (reads skip them) until `RemoveShredded` deletes them.
            [
                "DELETE FROM patient_keys WHERE patient_id = $1",
                "DELETE FROM break_glass WHERE patient_id = $1",
                "DELETE FROM portal_links WHERE patient_id = $1",
            ]
            .into_iter()
            .map(|sql| stmt(sql, vec![p()], Any))
            .collect()
        }
        Op::ReencryptVersion(r) => vec![
            stmt(
                "DELETE FROM resource_versions WHERE rtype = $1 AND id = $2 AND version = $3 AND patient_id = $4",
                vec![
                    t(&r.rtype),
                    t(&r.id),
                    Int(i64::try_from(r.version).unwrap_or(i64::MAX)),
                    Text(r.patient.as_ref().map(|p| p.as_str().to_owned()).unwrap_or_default()),
                ],
                Touch,
            ),
            stmt(
                "INSERT INTO resource_versions (rtype, id, version, patient_id, last_updated, deleted, category, key_version, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                vec![
                    t(&r.rtype),
                    t(&r.id),
                    Int(i64::try_from(r.version).unwrap_or(i64::MAX)),
                    Text(r.patient.as_ref().map(|p| p.as_str().to_owned()).unwrap_or_default()),
                    t(&r.last_updated),
                    Bool(r.deleted),
                    t(&r.category),
                    Int(i64::from(r.key_version)),
                    b(&r.body),
                ],
                Any,
            ),
        ],
        Op::RemoveShredded { patient } => {
            let p = || Text(patient.as_str().to_owned());
            [
                "DELETE FROM resource_current WHERE patient_id = $1",
                "DELETE FROM search_index WHERE patient_id = $1",
                "DELETE FROM resource_versions WHERE patient_id = $1",
            ]
            .into_iter()
            .map(|sql| stmt(sql, vec![p()], Any))
            .collect()
        }
        Op::ProposePolicy(p) => vec![stmt(
            "INSERT INTO policies (version, text, proposed_by, proposed_at, status, approved_by, approved_at)
             VALUES ($1, $2, $3, $4, 'proposed', '', 0)",
            vec![Int(p.version), t(&p.text), t(&p.proposed_by), Int(p.proposed_at)],
            Any,
        )],
        Op::ApprovePolicy {
            version,
            approved_by,
            approved_at,
        } => vec![
            stmt(
                "UPDATE policies SET status = 'superseded' WHERE status = 'active'
                 AND EXISTS (SELECT 1 FROM policies p WHERE p.version = $1 AND p.status = 'proposed' AND p.proposed_by <> $2)",
                vec![Int(*version), t(approved_by)],
                Any,
            ),
            stmt(
                "UPDATE policies SET status = 'active', approved_by = $2, approved_at = $3
                 WHERE version = $1 AND status = 'proposed' AND proposed_by <> $2",
                vec![Int(*version), t(approved_by), Int(*approved_at)],
                Touch,
            ),
        ],
        Op::PutSession(s) => vec![stmt(
            "INSERT INTO sessions (token_hash, kind, username, created, last_seen, expires, attempts, mfa_at, source, method, scope)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            vec![
                b(&s.token_hash),
                t(&s.kind),
                t(&s.username),
                Int(s.created),
                Int(s.last_seen),
                Int(s.expires),
                Int(s.attempts),
                Int(s.mfa_at),
                t(&s.source),
                t(&s.method),
                t(&s.scope),
            ],
            Any,
        )],
        Op::DeleteSession { token_hash } => vec![stmt(
            "DELETE FROM sessions WHERE token_hash = $1",
            vec![b(token_hash)],
            Any,
        )],
        Op::TouchSession {
            token_hash,
            last_seen,
        } => vec![stmt(
            "UPDATE sessions SET last_seen = $2 WHERE token_hash = $1 AND last_seen < $2",
            vec![b(token_hash), Int(*last_seen)],
            Any,
        )],
        Op::FailChallenge {
            token_hash,
            max_attempts,
        } => vec![
            stmt(
                "UPDATE sessions SET attempts = attempts + 1 WHERE token_hash = $1 AND kind = 'mfa'",
                vec![b(token_hash)],
                Any,
            ),
            stmt(
                "DELETE FROM sessions WHERE token_hash = $1 AND kind = 'mfa' AND attempts >= $2",
                vec![b(token_hash), Int(*max_attempts)],
                Any,
            ),
        ],
        Op::ConsumeChallenge {
            token_hash,
            max_attempts,
        } => vec![stmt(
            "DELETE FROM sessions WHERE token_hash = $1 AND kind = 'mfa' AND attempts < $2",
            vec![b(token_hash), Int(*max_attempts)],
            Touch,
        )],
        Op::RevokeSessions { username } => vec![stmt(
            "DELETE FROM sessions WHERE username = $1",
            vec![t(username)],
            Any,
        )],
        Op::StepUp { token_hash, at } => vec![stmt(
            "UPDATE sessions SET mfa_at = $2 WHERE token_hash = $1 AND kind = 'session'",
            vec![b(token_hash), Int(*at)],
            Touch,
        )],
        Op::CountFailure {
            key,
            subject,
            at,
            window_secs,
        } => vec![stmt(
            "INSERT INTO login_throttle (key, subject, failures, window_start, last_failure) VALUES ($1, $2, 1, $3, $3)
             ON CONFLICT (key) DO UPDATE SET
               failures = CASE WHEN excluded.last_failure - login_throttle.window_start >= $4 THEN 1 ELSE login_throttle.failures + 1 END,
               window_start = CASE WHEN excluded.last_failure - login_throttle.window_start >= $4 THEN excluded.last_failure ELSE login_throttle.window_start END,
               last_failure = excluded.last_failure",
            vec![b(key), b(subject), Int(*at), Int(*window_secs)],
            Any,
        )],
        Op::ClearFailures { key } => vec![stmt(
            "DELETE FROM login_throttle WHERE key = $1",
            vec![b(key)],
            Any,
        )],
        Op::ClearSubjectFailures { subject } => vec![stmt(
            "DELETE FROM login_throttle WHERE subject = $1",
            vec![b(subject)],
            Any,
        )],
        Op::PutCredential(c) => vec![stmt(
            "INSERT INTO credentials (kind, id, username, name, data, created, last_used) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            vec![
                t(&c.kind),
                b(&c.id),
                t(&c.username),
                t(&c.name),
                b(&c.data),
                Int(c.created),
                Int(c.last_used),
            ],
            Any,
        )],
        Op::UseCredential { kind, id, data, at } => vec![stmt(
            "UPDATE credentials SET data = $3, last_used = $4 WHERE kind = $1 AND id = $2",
            vec![t(kind), b(id), b(data), Int(*at)],
            Touch,
        )],
        Op::DeleteCredential { kind, id, username } => vec![stmt(
            "DELETE FROM credentials WHERE kind = $1 AND id = $2 AND username = $3",
            vec![t(kind), b(id), t(username)],
            Touch,
        )],
        Op::DeleteCredentials { username, kind } => vec![stmt(
            "DELETE FROM credentials WHERE username = $1 AND kind = $2",
            vec![t(username), t(kind)],
            Any,
        )],
        _ => return None,
    })
}

/// What a search statement selects.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Select {
    /// The matching versions, in order, one more than the limit (to know whether there is
    /// a next page).
    Rows,
    /// `(category, count)` of the matches.
    Tally,
}

/// The SQL and arguments for `q`; `None` when the query cannot match anything.
pub(crate) fn search(q: &SearchQuery, d: Dialect, select: Select) -> Option<(String, Vec<Arg>)> {
    let by_patient = q.patient.is_some();
    let (hint, join_patient, live) = match d {
        // SQLite has no statistics on a fresh database: with a patient, drive from the
        // patient index (a chart is small) and check tokens per row; without one, drive
        // from the blind-index tokens. The choice is made here, not left to the planner.
        Dialect::Sqlite => (
            if by_patient {
                "INDEXED BY resource_current_patient"
            } else {
                ""
            },
            "",
            "c.deleted = 0",
        ),
        Dialect::Postgres => ("", "v.patient_id = c.patient_id AND ", "NOT c.deleted"),
    };
    let mut sql = match select {
        Select::Rows => format!(
            "SELECT {VERSION_COLS} FROM resource_current c {hint} JOIN resource_versions v
         ON {join_patient}v.rtype = c.rtype AND v.id = c.id AND v.version = c.version WHERE {live}"
        ),
        Select::Tally => {
            format!("SELECT c.category, COUNT(*) FROM resource_current c {hint} WHERE {live}")
        }
    };
    let mut args: Vec<Arg> = vec![];
    let mut push = |sql: &mut String, frag: &str, a: Arg| {
        args.push(a);
        let mark = match d {
            Dialect::Sqlite => format!("?{}", args.len()),
            Dialect::Postgres => format!("${}", args.len()),
        };
        sql.push_str(&frag.replacen('?', &mark, 1));
    };
    let list = |sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg), items: Vec<Arg>| {
        for (i, a) in items.into_iter().enumerate() {
            push(sql, if i == 0 { "?" } else { ", ?" }, a);
        }
    };
    if let Some(t) = &q.rtype {
        push(&mut sql, " AND c.rtype = ?", Arg::Text(t.clone()));
    }
    if let Some(p) = &q.patient {
        push(
            &mut sql,
            " AND c.patient_id = ?",
            Arg::Text(p.as_str().to_owned()),
        );
    }
    for (column, items) in [
        (
            "c.patient_id",
            q.patients
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect::<Vec<_>>(),
        ),
        ("c.id", q.ids.clone()),
        ("c.rtype", q.types.clone()),
        (
            "c.category",
            if q.scopes.is_empty() {
                q.categories.clone()
            } else {
                vec![]
            },
        ),
    ] {
        if !items.is_empty() {
            sql.push_str(&format!(" AND {column} IN ("));
            list(
                &mut sql,
                &mut push,
                items.into_iter().map(Arg::Text).collect(),
            );
            sql.push(')');
        }
    }
    if !q.scopes.is_empty() {
        // (open categories) OR (scoped categories AND charts) OR …
        let mut any = false;
        sql.push_str(" AND (1 = 0");
        if !q.categories.is_empty() {
            sql.push_str(" OR c.category IN (");
            list(
                &mut sql,
                &mut push,
                q.categories.iter().cloned().map(Arg::Text).collect(),
            );
            sql.push(')');
            any = true;
        }
        for (cats, charts) in &q.scopes {
            let empty = match charts {
                Charts::Patients(p) => p.is_empty(),
                Charts::Care(t) => t.is_empty(),
                Charts::Grants { .. } => false,
                Charts::Links { kinds, .. } => kinds.is_empty(),
            };
            if cats.is_empty() || empty {
                continue;
            }
            sql.push_str(" OR (c.category IN (");
            list(
                &mut sql,
                &mut push,
                cats.iter().cloned().map(Arg::Text).collect(),
            );
            sql.push_str(") AND c.patient_id IN (");
            charts_sql(&mut sql, &mut push, charts);
            sql.push_str("))");
            any = true;
        }
        sql.push(')');
        if !any {
            return None;
        }
    }
    if let Some(pv) = &q.privacy {
        privacy_clauses(&mut sql, &mut push, pv);
    }
    for (param, tokens) in &q.tokens {
        if tokens.is_empty() {
            return None;
        }
        if by_patient || d == Dialect::Postgres {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM search_index s WHERE s.rtype = c.rtype AND s.id = c.id",
            );
            if d == Dialect::Postgres {
                sql.push_str(" AND s.patient_id = c.patient_id");
            }
        } else {
            sql.push_str(" AND c.id IN (SELECT s.id FROM search_index s WHERE s.rtype = c.rtype");
        }
        push(&mut sql, " AND s.param = ?", Arg::Text(param.clone()));
        sql.push_str(" AND s.token IN (");
        list(
            &mut sql,
            &mut push,
            tokens.iter().cloned().map(Arg::Bytes).collect(),
        );
        sql.push_str("))");
    }
    for r in &q.last_updated {
        sql.push_str(if r.outside {
            " AND NOT (1 = 1"
        } else {
            " AND (1 = 1"
        });
        if let Some(f) = &r.from {
            push(&mut sql, " AND c.last_updated >= ?", Arg::Text(f.clone()));
        }
        if let Some(t) = &r.to {
            push(&mut sql, " AND c.last_updated < ?", Arg::Text(t.clone()));
        }
        sql.push(')');
    }
    if let Some(before) = q.created_before {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        push(&mut sql, " AND c.created_seq < ?", Arg::Int(before));
    }
    if select == Select::Tally {
        sql.push_str(" GROUP BY c.category");
        return Some((sql, args));
    }
    let (key, dir) = match q.order {
        Order::Id => ("c.rtype, c.id", ""),
        Order::LastUpdated => ("c.last_updated, c.rtype, c.id", ""),
        Order::LastUpdatedDesc => ("c.last_updated, c.rtype, c.id", " DESC"),
    };
    if let Some(after) = &q.after {
        let want = key.split(", ").count();
        if after.len() != want {
            return None;
        }
        let cmp = if dir.is_empty() { ">" } else { "<" };
        sql.push_str(&format!(" AND ({key}) {cmp} ("));
        list(
            &mut sql,
            &mut push,
            after.iter().cloned().map(Arg::Text).collect(),
        );
        sql.push(')');
    }
    let order: Vec<String> = key.split(", ").map(|k| format!("{k}{dir}")).collect();
    sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
    let limit = i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX);
    let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
    push(&mut sql, " LIMIT ?", Arg::Int(limit));
    push(&mut sql, " OFFSET ?", Arg::Int(offset));
    Some((sql, args))
}

/// The clauses of [`Privacy`]: consent denies by category (or of everything), and labels on
/// the resource or on its chart's Patient that no consent grants or that one denies.
fn privacy_clauses(sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg), pv: &Privacy) {
    let params = |sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg), ps: &[String]| {
        if ps.is_empty() {
            sql.push_str("NULL");
        }
        for (i, p) in ps.iter().enumerate() {
            push(sql, if i == 0 { "?" } else { ", ?" }, Arg::Text(p.clone()));
        }
    };
    if pv.deny_params.is_empty() {
        return;
    }
    // In exempt charts consents yield, and of the labels only the unopened ones count.
    let not_exempt =
        |sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg)| match &pv.exempt {
            Some((charts, _)) => {
                sql.push_str("c.patient_id NOT IN (");
                charts_sql(sql, push, charts);
                sql.push(')');
            }
            None => sql.push_str("1 = 1"),
        };
    for (cat, token) in &pv.category_tokens {
        push(sql, " AND NOT (c.category = ? AND ", Arg::Text(cat.clone()));
        not_exempt(sql, push);
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM search_index d WHERE d.rtype = 'Consent' AND d.patient_id = c.patient_id AND d.param IN (",
        );
        params(sql, push, &pv.deny_params);
        push(sql, ") AND d.token IN (?", Arg::Bytes(token.clone()));
        push(sql, ", ?)))", Arg::Bytes(pv.everything_token.clone()));
    }
    // A label is cleared by a grant and not denied; the resource's own labels, then its
    // Patient's (which every record of the chart inherits).
    for own in [true, false] {
        sql.push_str(" AND NOT EXISTS (SELECT 1 FROM search_index l WHERE ");
        sql.push_str(if own {
            "l.rtype = c.rtype AND l.id = c.id"
        } else {
            "l.rtype = 'Patient' AND l.id = c.patient_id"
        });
        sql.push_str(" AND l.param = '_label'");
        for (i, t) in pv.ignored_labels.iter().enumerate() {
            push(
                sql,
                if i == 0 {
                    " AND l.token NOT IN (?"
                } else {
                    ", ?"
                },
                Arg::Bytes(t.clone()),
            );
        }
        if !pv.ignored_labels.is_empty() {
            sql.push(')');
        }
        sql.push_str(" AND (");
        not_exempt(sql, push);
        match &pv.exempt {
            Some((_, unopened)) if !unopened.is_empty() => {
                for (i, t) in unopened.iter().enumerate() {
                    push(
                        sql,
                        if i == 0 { " OR l.token IN (?" } else { ", ?" },
                        Arg::Bytes(t.clone()),
                    );
                }
                sql.push(')');
            }
            _ => {}
        }
        sql.push_str(
            ") AND (NOT EXISTS (SELECT 1 FROM search_index g WHERE g.rtype = 'Consent' AND g.patient_id = c.patient_id AND g.token = l.token AND g.param IN (",
        );
        params(sql, push, &pv.grant_params);
        sql.push_str(")) OR (");
        not_exempt(sql, push);
        sql.push_str(" AND EXISTS (SELECT 1 FROM search_index d WHERE d.rtype = 'Consent' AND d.patient_id = c.patient_id AND d.token = l.token AND d.param IN (");
        params(sql, push, &pv.deny_params);
        sql.push_str(")))))");
    }
}

/// A set of charts as SQL: a list of ids, or a subquery of patient ids.
fn charts_sql(sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg), charts: &Charts) {
    let list = |sql: &mut String, push: &mut dyn FnMut(&mut String, &str, Arg), items: Vec<Arg>| {
        if items.is_empty() {
            sql.push_str("NULL");
        }
        for (i, a) in items.into_iter().enumerate() {
            push(sql, if i == 0 { "?" } else { ", ?" }, a);
        }
    };
    match charts {
        Charts::Patients(p) => list(
            sql,
            push,
            p.iter().map(|p| Arg::Text(p.as_str().to_owned())).collect(),
        ),
        Charts::Care(tokens) => {
            sql.push_str("SELECT k.patient_id FROM search_index k WHERE k.rtype IN ('CareTeam', 'Encounter') AND k.param = '_care' AND k.token IN (");
            list(sql, push, tokens.iter().cloned().map(Arg::Bytes).collect());
            sql.push(')');
        }
        Charts::Links { username, kinds } => {
            push(
                sql,
                "SELECT pl.patient_id FROM portal_links pl WHERE pl.username = ?",
                Arg::Text(username.clone()),
            );
            sql.push_str(" AND pl.kind IN (");
            list(sql, push, kinds.iter().cloned().map(Arg::Text).collect());
            sql.push(')');
        }
        Charts::Grants { username, now } => {
            push(
                sql,
                "SELECT g.patient_id FROM break_glass g WHERE g.username = ?",
                Arg::Text(username.clone()),
            );
            push(sql, " AND g.expires > ?", Arg::Int(*now));
        }
    }
}

/// The query of `chart_tokens`: index rows of one chart with one of `params`.
pub(crate) fn chart_tokens(
    patient: &PatientId,
    params: &[String],
    d: Dialect,
) -> (String, Vec<Arg>) {
    let mark = |i: usize| match d {
        Dialect::Sqlite => format!("?{i}"),
        Dialect::Postgres => format!("${i}"),
    };
    let marks: Vec<String> = (0..params.len()).map(|i| mark(i + 2)).collect();
    let sql =
        format!(
        "SELECT rtype, id, param, token FROM search_index WHERE patient_id = {} AND param IN ({})",
        mark(1),
        if marks.is_empty() { "NULL".to_owned() } else { marks.join(", ") }
    );
    let mut args = vec![Arg::Text(patient.as_str().to_owned())];
    args.extend(params.iter().cloned().map(Arg::Text));
    (sql, args)
}
