//! Search and `$everything` through the gate. Search values become blind-index tokens
//! before they reach the store; results the caller may not see are left out and named.

use medvault_fhir::{normalize_text, ResourceType};
use medvault_store::{Cmp, SearchQuery};
use medvault_types::{Action, Category, PatientId};

use crate::{push_unique, Caller, Disclosed, Outcome, Vault, VaultError};

/// Entries the caller may see, and the categories that were withheld.
#[derive(Debug, Default)]
pub struct SearchResult {
    pub entries: Vec<Disclosed>,
    pub disclosed: Vec<Category>,
    pub withheld: Vec<Category>,
    pub more: bool,
    pub offset: usize,
    pub count: usize,
}

const DEFAULT_COUNT: usize = 50;

fn bad(msg: impl Into<String>) -> VaultError {
    VaultError::BadRequest(msg.into())
}

fn date_value(param: &str, v: &str) -> Result<String, VaultError> {
    let v = v.strip_prefix("eq").unwrap_or(v);
    let ok_shape = matches!(v.len(), 4 | 7 | 10)
        && v.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !ok_shape {
        if v.len() > 2
            && v.get(..2)
                .is_some_and(|p| ["ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"].contains(&p))
        {
            return Err(bad(format!(
                "`{param}` supports equality on YYYY, YYYY-MM or YYYY-MM-DD; range prefixes are not available on blind-indexed dates"
            )));
        }
        return Err(bad(format!(
            "`{param}` must be YYYY, YYYY-MM or YYYY-MM-DD"
        )));
    }
    Ok(v.to_owned())
}

impl Vault {
    fn build_query(
        &self,
        rt: ResourceType,
        params: &[(String, String)],
    ) -> Result<(SearchQuery, Vec<String>), VaultError> {
        let mut q = SearchQuery {
            rtype: Some(rt.as_str().to_owned()),
            limit: DEFAULT_COUNT,
            ..Default::default()
        };
        let allowed = medvault_fhir::search_params(rt.as_str());
        let mut names = vec![];
        for (k, v) in params {
            let (name, modifier) = match k.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (k.as_str(), None),
            };
            if modifier.is_some() {
                return Err(bad(format!("search modifier on `{name}` is not supported")));
            }
            names.push(name.to_owned());
            match name {
                "_count" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| bad("_count must be a non-negative integer"))?;
                    q.limit = n.clamp(1, self.options.max_page_size);
                }
                "_offset" => {
                    q.offset = v
                        .parse()
                        .map_err(|_| bad("_offset must be a non-negative integer"))?
                }
                "_format" if v == "json" || v.contains("fhir+json") => {}
                "_id" => {
                    for id in v.split(',') {
                        if !medvault_types::is_fhir_id(id) {
                            return Err(bad("_id must be a valid id"));
                        }
                        q.ids.push(id.to_owned());
                    }
                }
                "_lastUpdated" => {
                    let (cmp, at) = match v.get(..2) {
                        Some("ge") => (Some(Cmp::Ge), v.get(2..).unwrap_or("")),
                        Some("gt") => (Some(Cmp::Gt), v.get(2..).unwrap_or("")),
                        Some("le") => (Some(Cmp::Le), v.get(2..).unwrap_or("")),
                        Some("lt") => (Some(Cmp::Lt), v.get(2..).unwrap_or("")),
                        Some("eq") => (None, v.get(2..).unwrap_or("")),
                        _ => (None, v.as_str()),
                    };
                    if at.len() < 4
                        || !at
                            .bytes()
                            .all(|b| b.is_ascii_digit() || b"-:T.Z+".contains(&b))
                    {
                        return Err(bad("_lastUpdated must be a FHIR date or dateTime"));
                    }
                    match cmp {
                        Some(c) => q.last_updated.push((c, at.to_owned())),
                        None => {
                            q.last_updated.push((Cmp::Ge, at.to_owned()));
                            q.last_updated.push((Cmp::Lt, format!("{at}\u{7f}")));
                        }
                    }
                }
                "patient" | "subject" if allowed.contains(&name) => {
                    let id = v.strip_prefix("Patient/").unwrap_or(v);
                    let pid = PatientId::new(id)
                        .map_err(|_| bad("patient must be Patient/{id} or an id"))?;
                    if q.patient.as_ref().is_some_and(|p| *p != pid) {
                        return Err(bad("conflicting patient parameters"));
                    }
                    q.patient = Some(pid);
                }
                p if allowed.contains(&p) => {
                    let param: &'static str =
                        allowed.iter().copied().find(|a| *a == p).unwrap_or("");
                    let mut tokens = vec![];
                    for value in v.split(',') {
                        let norm = match param {
                            "name" | "family" | "given" => {
                                let n = normalize_text(value);
                                if n.chars().count() < medvault_fhir_min_prefix() {
                                    return Err(bad(format!(
                                        "`{param}` needs at least 2 characters"
                                    )));
                                }
                                n
                            }
                            "birthdate" | "date" => date_value(param, value)?,
                            _ => {
                                if value.is_empty() {
                                    return Err(bad(format!("`{param}` needs a value")));
                                }
                                value.strip_prefix('|').unwrap_or(value).to_owned()
                            }
                        };
                        tokens.push(self.indexer.token(rt.as_str(), param, &norm).to_vec());
                    }
                    q.tokens.push((param.to_owned(), tokens));
                }
                other => {
                    return Err(bad(format!(
                        "unknown or unsupported search parameter `{}`",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        names.sort();
        names.dedup();
        Ok((q, names))
    }

    /// `GET /{type}?…`.
    pub fn search(
        &self,
        c: &Caller,
        rt: ResourceType,
        params: &[(String, String)],
    ) -> Result<SearchResult, VaultError> {
        let (q, names) = self.build_query(rt, params)?;
        let page = self.store.search(&q)?;
        let mut out = SearchResult {
            more: page.more,
            offset: q.offset,
            count: q.limit,
            ..Default::default()
        };
        let mut patients: Vec<String> = vec![];
        for row in &page.rows {
            let cat: Category = row
                .category
                .parse()
                .map_err(|_| VaultError::Internal("bad category".into()))?;
            if self.decide(c, Action::Search, cat).allowed {
                out.entries.push(self.disclosed(row, self.open_row(row)?)?);
                push_unique(&mut out.disclosed, cat);
                if let Some(p) = &row.patient {
                    if !patients.iter().any(|x| x == p.as_str()) {
                        patients.push(p.to_string());
                    }
                }
            } else {
                push_unique(&mut out.withheld, cat);
            }
        }
        let mut rec = self.record(c, "search", Outcome::Success);
        rec.resource = Some(rt.as_str().to_owned());
        rec.patient = q.patient.as_ref().map(|p| p.to_string());
        rec.categories_disclosed = out.disclosed.iter().map(|c| c.to_string()).collect();
        rec.categories_withheld = out.withheld.iter().map(|c| c.to_string()).collect();
        rec.detail = Some(format!(
            "params={} matched={} returned={}",
            names.join(","),
            page.rows.len(),
            out.entries.len()
        ));
        let mut recs = vec![];
        // One record per patient whose chart appears in the results, so "who looked at my
        // record" and the accounting of disclosures see searches too.
        if q.patient.is_none() {
            for p in patients {
                let mut r = rec.resalted();
                r.patient = Some(p);
                recs.push(r);
            }
        }
        recs.insert(0, rec);
        self.audit(recs)?;
        Ok(out)
    }

    /// `GET /Patient/{id}/$everything`: the chart, less what the caller may not see.
    pub fn everything(&self, c: &Caller, patient: &str) -> Result<SearchResult, VaultError> {
        let mut rec = self.record(c, "everything", Outcome::Success);
        rec.resource = Some(format!("Patient/{patient}"));
        let pid = PatientId::new(patient).map_err(|_| VaultError::NotFound)?;
        rec.patient = Some(pid.to_string());
        match self.store.current("Patient", pid.as_str())? {
            Some(r) if !r.deleted => {}
            _ => {
                rec.outcome = Outcome::NotFound;
                self.audit(vec![rec])?;
                return Err(VaultError::NotFound);
            }
        }
        let q = SearchQuery {
            patient: Some(pid),
            limit: 100_000,
            ..Default::default()
        };
        let page = self.store.search(&q)?;
        let mut out = SearchResult {
            count: page.rows.len(),
            ..Default::default()
        };
        for row in &page.rows {
            let cat: Category = row
                .category
                .parse()
                .map_err(|_| VaultError::Internal("bad category".into()))?;
            if self.decide(c, Action::Read, cat).allowed {
                out.entries.push(self.disclosed(row, self.open_row(row)?)?);
                push_unique(&mut out.disclosed, cat);
            } else {
                push_unique(&mut out.withheld, cat);
            }
        }
        rec.categories_disclosed = out.disclosed.iter().map(|c| c.to_string()).collect();
        rec.categories_withheld = out.withheld.iter().map(|c| c.to_string()).collect();
        if out.entries.is_empty() && !out.withheld.is_empty() {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden {
                withheld: out.withheld,
            });
        }
        self.audit(vec![rec])?;
        Ok(out)
    }
}

fn medvault_fhir_min_prefix() -> usize {
    2
}
