//! The search query, written once for both SQL backends.

use crate::{Cmp, SearchQuery};

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

pub(crate) const VERSION_COLS: &str =
    "v.rtype, v.id, v.version, v.patient_id, v.last_updated, v.deleted, v.category, v.key_version, v.body";

/// The SQL and arguments for `q` (asking for one row more than the limit, to know whether
/// there is a next page); `None` when the query cannot match anything.
pub(crate) fn search(q: &SearchQuery, d: Dialect) -> Option<(String, Vec<Arg>)> {
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
    let mut sql = format!(
        "SELECT {VERSION_COLS} FROM resource_current c {hint} JOIN resource_versions v
         ON {join_patient}v.rtype = c.rtype AND v.id = c.id AND v.version = c.version WHERE {live}"
    );
    let mut args: Vec<Arg> = vec![];
    let mut push = |sql: &mut String, frag: &str, a: Arg| {
        args.push(a);
        let mark = match d {
            Dialect::Sqlite => format!("?{}", args.len()),
            Dialect::Postgres => format!("${}", args.len()),
        };
        sql.push_str(&frag.replace('?', &mark));
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
    if !q.ids.is_empty() {
        sql.push_str(" AND c.id IN (");
        list(
            &mut sql,
            &mut push,
            q.ids.iter().cloned().map(Arg::Text).collect(),
        );
        sql.push(')');
    }
    if !q.categories.is_empty() {
        sql.push_str(" AND c.category IN (");
        list(
            &mut sql,
            &mut push,
            q.categories.iter().cloned().map(Arg::Text).collect(),
        );
        sql.push(')');
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
    for (cmp, at) in &q.last_updated {
        let op = match cmp {
            Cmp::Ge => ">=",
            Cmp::Gt => ">",
            Cmp::Le => "<=",
            Cmp::Lt => "<",
        };
        push(
            &mut sql,
            &format!(" AND c.last_updated {op} ?"),
            Arg::Text(at.clone()),
        );
    }
    let limit = i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX);
    let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
    push(&mut sql, " ORDER BY c.rtype, c.id LIMIT ?", Arg::Int(limit));
    push(&mut sql, " OFFSET ?", Arg::Int(offset));
    Some((sql, args))
}
