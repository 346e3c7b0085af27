//! The search query, written once for both SQL backends.

use medvault_types::PatientId;

use crate::{Order, Sealed, SearchQuery, UserRow, VersionRow};

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
}

/// The columns [`sealed`] maps, in order, for a `resource_versions v` query.
pub(crate) const VERSION_COLS: &str =
    "v.rtype, v.id, v.version, v.patient_id, v.last_updated, v.deleted, v.category, v.key_version, v.body";

/// The columns [`user`] maps, in order.
pub(crate) const USER_COLS: &str =
    "username, role, password_hash, totp_secret_wrapped, totp_last_step, disabled, failed_logins, created, practitioner_id";

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
        failed_logins: r.int(6)?,
        created: r.text(7)?,
        practitioner_id: r.opt_text(8)?,
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
        ("c.category", q.categories.clone()),
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
