//! The audit log as FHIR: `GET /fhir/AuditEvent?patient=&agent=&date=&action=`, BALP
//! AuditEvents (`medvault_audit::balp`) for privacy officers and auditors.

use medvault_audit::balp::AuditEventQuery;
use medvault_types::Operation;
use serde_json::Value;

use crate::{AuditRecord, Caller, Vault, VaultError};

/// A page of AuditEvents, newest first, and the cursor of the next (older) page.
#[derive(Debug, Default)]
pub struct AuditEventPage {
    pub events: Vec<Value>,
    /// `_cursor` of the next page (opaque; continues below the last event returned).
    pub next: Option<String>,
    /// Parameters ignored under lenient handling, as sent.
    pub unknown: Vec<String>,
}

impl Vault {
    /// `GET /fhir/AuditEvent?patient=&agent=&date=&action=&_count=&_offset=&_cursor=`:
    /// newest first, `_count` per page (default 100, at most 1000), `_offset` skipping
    /// matches, `_cursor` continuing below an earlier page's last event (the log only
    /// grows, so pages never shift). `date` takes every FHIR prefix, compared with each
    /// entry's instant. Policy action `audit.search`; reading the log is itself audited.
    ///
    /// # Errors
    /// `BadRequest` for an unknown parameter or a malformed value; `Forbidden` by policy.
    pub fn audit_events(
        &self,
        c: &Caller,
        params: &[(String, String)],
        strict: bool,
    ) -> Result<AuditEventPage, VaultError> {
        let mut dates = vec![];
        let mut offset = 0usize;
        let mut cursor_token = None;
        let mut count = 100usize;
        let mut unknown = vec![];
        let mut rest = vec![];
        for (k, v) in params {
            match k.as_str() {
                "date" => dates.push(
                    medvault_fhir::date::parse_query(v)
                        .map_err(|m| VaultError::BadRequest(format!("date {m}")))?,
                ),
                "_offset" => {
                    offset = v.parse().map_err(|_| {
                        VaultError::BadRequest("_offset must be a non-negative integer".into())
                    })?
                }
                "_count" => {
                    count = v
                        .parse::<usize>()
                        .map_err(|_| {
                            VaultError::BadRequest("_count must be a non-negative integer".into())
                        })?
                        .min(self.options.max_page_size)
                }
                "_cursor" => cursor_token = Some(v.clone()),
                "_format" => {}
                "patient" | "agent" | "action" => rest.push((k.clone(), v.clone())),
                other if strict => {
                    return Err(VaultError::BadRequest(format!(
                        "unknown AuditEvent search parameter `{}` (Prefer: handling=strict)",
                        other.chars().take(40).collect::<String>()
                    )))
                }
                other => unknown.push(other.chars().take(40).collect::<String>()),
            }
        }
        let q = AuditEventQuery::parse(&rest).map_err(VaultError::BadRequest)?;
        // The continuation is a cursor like a search's: bound to the caller and the query,
        // tamper-evident, expiring; its key is the sequence number to continue below (the
        // log only grows, so pages never shift). `_offset` applies to the first page only.
        let query = crate::search::cursor_query("AuditEvent", params);
        let before = match &cursor_token {
            Some(t) => {
                let cur = self.open_cursor(c, &query, t)?;
                offset = 0;
                Some(cur.snapshot)
            }
            None => None,
        };
        let Some(mut rec) = self.operate(c, Operation::AuditSearch, q.patient.as_deref())? else {
            return Err(VaultError::Unauthenticated);
        };
        let now = i64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let mut skipped = 0usize;
        let mut events = if count == 0 {
            vec![]
        } else {
            self.scan_back_from(before, count.saturating_add(1), |index, r| {
                if !dates.is_empty() {
                    let Ok(at) = medvault_fhir::date::parse(&r.time) else {
                        return None;
                    };
                    let at = medvault_fhir::date::Interval {
                        start: at.start,
                        end: at.start + 1,
                    };
                    if !dates.iter().all(|d| d.matches(at, now)) {
                        return None;
                    }
                }
                let ev = q.event(index, &r)?;
                if skipped < offset {
                    skipped += 1;
                    return None;
                }
                Some((index, ev))
            })?
        };
        let more = events.len() > count;
        events.truncate(count);
        let next = if more {
            events.last().map(|(i, _)| {
                self.seal_cursor(
                    c,
                    &query,
                    &crate::search::Cursor {
                        snapshot: *i,
                        after: None,
                        offset: 0,
                        total: 0,
                    },
                )
            })
        } else {
            None
        };
        rec.detail = Some(format!("returned={}", events.len()));
        self.audit(vec![rec])?;
        Ok(AuditEventPage {
            events: events.into_iter().map(|(_, e)| e).collect(),
            next,
            unknown,
        })
    }

    /// `GET /fhir/AuditEvent/{id}`: the log entry with sequence number `id` as an
    /// AuditEvent. Policy action `audit.search` (for the entry's patient); audited.
    ///
    /// # Errors
    /// `NotFound` for an entry that does not exist; `Forbidden` by policy.
    pub fn audit_event(&self, c: &Caller, id: u64) -> Result<Value, VaultError> {
        let rows = self.store.audit_range(id, id.saturating_add(1))?;
        let Some(r) = rows
            .first()
            .and_then(|row| AuditRecord::from_canonical(&row.record).ok())
        else {
            // Decide first, so an unauthorized caller learns nothing about the log's length.
            if self.operate(c, Operation::AuditSearch, None)?.is_none() {
                return Err(VaultError::Unauthenticated);
            }
            return Err(VaultError::NotFound);
        };
        let Some(mut rec) = self.operate(c, Operation::AuditSearch, r.patient.as_deref())? else {
            return Err(VaultError::Unauthenticated);
        };
        rec.detail = Some(format!("read AuditEvent/{id}"));
        self.audit(vec![rec])?;
        Ok(medvault_audit::balp::audit_event(id, &r))
    }
}
