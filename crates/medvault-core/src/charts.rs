//! "My patients": the charts a clinician relates to today (care teams, encounters within
//! ±30 days, live break-the-glass grants), or a portal account's own and proxied charts,
//! read through the policy like any search and audited per chart.

use medvault_fhir::ResourceType;
use medvault_policy::Relationship;
use medvault_store::StoreError;
use medvault_types::{Action, PatientId};

use crate::typestate::Disclosed;
use crate::{Caller, Outcome, Vault, VaultError};

/// Most charts one "my patients" list shows (the rest are found by searching).
pub const MAX_MY_PATIENTS: usize = 500;

impl Vault {
    /// The Patient resources of the charts `c` relates to today, each with the
    /// relationship that reaches it (treatment, break-the-glass, emergency, own, proxy),
    /// strongest first as the store ranks them, at most [`MAX_MY_PATIENTS`]. Charts whose
    /// demographics the policy withholds (a restricted chart) are left out. Audited as a
    /// Patient search with one record per chart listed.
    ///
    /// # Errors
    /// `Refused` for a service client without Patient read scope; storage and audit
    /// failures.
    pub fn my_patients(&self, c: &Caller) -> Result<Vec<(Disclosed, Relationship)>, VaultError> {
        let pt = ResourceType::parse("Patient")
            .ok_or_else(|| VaultError::Internal("Patient is not a supported type".into()))?;
        self.scope_check(c, pt, Action::Search)?;
        let (rows, rels) = self.audited_read(c, move |cx, tx| {
            let mut rec = cx.record("search", Outcome::Success);
            rec.resource = Some("Patient".into());
            rec.detail = Some("my patients (care teams, encounters, grants)".into());
            let lookup =
                |t: &[Vec<u8>], u: &str, n: i64, p: Option<&PatientId>| tx.charts(t, u, n, p);
            let charts = cx.reacher.all(&lookup)?;
            let mut rows = vec![];
            for (p, _) in charts.iter().take(MAX_MY_PATIENTS) {
                if let Some(r) = tx.current("Patient", p.as_str())? {
                    if !r.deleted() {
                        rows.push(r);
                    }
                }
            }
            let (allowed, _, _) = cx.filter(tx, rows, Action::Read, &mut rec)?;
            let mut recs = vec![];
            for row in &allowed {
                if let Some(p) = row.get().patient() {
                    let mut r = rec.resalted();
                    r.patient = Some(p.to_string());
                    recs.push(r);
                }
            }
            recs.insert(0, rec);
            Ok::<_, StoreError>((recs, Ok((allowed, charts))))
        })?;
        let opened = self.open_all(rows)?;
        Ok(opened
            .into_iter()
            .map(|d| {
                let rel = rels
                    .iter()
                    .find(|(p, _)| Some(p) == d.patient())
                    .map_or(Relationship::None, |(_, r)| *r);
                (d, rel)
            })
            .collect())
    }
}
