//! A failure-injecting [`Store`] wrapper for crash and fault tests (after neon's
//! `simulate_failures`): flip a switch and the chosen operations fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use medvault_types::PatientId;

use crate::*;

/// Wraps a store; each switch makes one kind of operation fail.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    /// Commits that carry audit entries fail (the audit append fails).
    pub fail_audit: AtomicBool,
    /// Every read fails.
    pub fail_reads: AtomicBool,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            fail_audit: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
        })
    }
    pub fn set_fail_audit(&self, on: bool) {
        self.fail_audit.store(on, Ordering::SeqCst);
    }
    pub fn set_fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    fn read_gate(&self) -> Result<(), StoreError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            Err(StoreError::Injected("read"))
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn audited(&self, read: AuditedRead) -> Result<Payload, StoreError> {
        self.read_gate()?;
        if self.fail_audit.load(Ordering::SeqCst) {
            return Err(StoreError::Injected("audit append"));
        }
        self.inner.audited(read)
    }
    fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        if !batch.audit.is_empty() && self.fail_audit.load(Ordering::SeqCst) {
            return Err(StoreError::Injected("audit append"));
        }
        self.inner.commit(batch)
    }
    fn current(&self, rtype: &str, id: &str) -> Result<Option<Sealed>, StoreError> {
        self.read_gate()?;
        self.inner.current(rtype, id)
    }
    fn version(&self, rtype: &str, id: &str, version: u64) -> Result<Option<Sealed>, StoreError> {
        self.read_gate()?;
        self.inner.version(rtype, id, version)
    }
    fn history(&self, rtype: &str, id: &str) -> Result<Vec<Sealed>, StoreError> {
        self.read_gate()?;
        self.inner.history(rtype, id)
    }
    fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.read_gate()?;
        self.inner.search(q)
    }
    fn dump(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        self.inner.dump(out)
    }
    fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<DumpStats, StoreError> {
        self.inner.snapshot(out)
    }
    fn load(&self, input: &mut dyn std::io::Read) -> Result<DumpStats, StoreError> {
        self.inner.load(input)
    }
    fn purge_deleted(&self) -> Result<bool, StoreError> {
        self.inner.purge_deleted()
    }
    fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        self.inner.census()
    }
    fn chart_versions(&self, patient: &PatientId) -> Result<Vec<Sealed>, StoreError> {
        self.inner.chart_versions(patient)
    }
    fn patient_keys(&self, patient: &PatientId) -> Result<Vec<WrappedKey>, StoreError> {
        self.inner.patient_keys(patient)
    }
    fn keys_wrapped_below(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(PatientId, WrappedKey)>, StoreError> {
        self.inner.keys_wrapped_below(master_version, limit)
    }
    fn master_key_census(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.inner.master_key_census()
    }
    fn patient_key(&self, patient: &PatientId) -> Result<Option<WrappedKey>, StoreError> {
        self.read_gate()?;
        self.inner.patient_key(patient)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        self.inner.user(username)
    }
    fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.inner.users()
    }
    fn session(&self, token_hash: &[u8]) -> Result<Option<SessionRow>, StoreError> {
        self.inner.session(token_hash)
    }
    fn sessions_of(&self, username: &str) -> Result<Vec<SessionRow>, StoreError> {
        self.inner.sessions_of(username)
    }
    fn throttle(&self, keys: &[Vec<u8>]) -> Result<Vec<ThrottleRow>, StoreError> {
        self.inner.throttle(keys)
    }
    fn credential(&self, kind: &str, id: &[u8]) -> Result<Option<CredentialRow>, StoreError> {
        self.inner.credential(kind, id)
    }
    fn credentials(&self, username: &str, kind: &str) -> Result<Vec<CredentialRow>, StoreError> {
        self.inner.credentials(username, kind)
    }
    fn charts(
        &self,
        care_tokens: &[Vec<u8>],
        username: &str,
        now: i64,
        patient: Option<&PatientId>,
    ) -> Result<Vec<(PatientId, Reach)>, StoreError> {
        self.inner.charts(care_tokens, username, now, patient)
    }
    fn break_glass(&self) -> Result<Vec<BreakGlassRow>, StoreError> {
        self.inner.break_glass()
    }
    fn incidents(&self) -> Result<Vec<IncidentRow>, StoreError> {
        self.inner.incidents()
    }
    fn governance(&self, kind: &str) -> Result<Vec<GovernanceRow>, StoreError> {
        self.inner.governance(kind)
    }
    fn governance_record(&self, kind: &str, id: &str) -> Result<Option<GovernanceRow>, StoreError> {
        self.inner.governance_record(kind, id)
    }
    fn policies(&self) -> Result<Vec<PolicyRow>, StoreError> {
        self.inner.policies()
    }
    fn chart_tokens(
        &self,
        patient: &PatientId,
        params: &[String],
    ) -> Result<Vec<IndexHit>, StoreError> {
        self.inner.chart_tokens(patient, params)
    }
    fn legal_holds(&self, patient: Option<&PatientId>) -> Result<Vec<LegalHoldRow>, StoreError> {
        self.inner.legal_holds(patient)
    }
    fn destructions(&self) -> Result<Vec<DestructionRow>, StoreError> {
        self.inner.destructions()
    }
    fn chart_census(&self, patient: &PatientId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.inner.chart_census(patient)
    }
    fn portal_links(&self, username: &str) -> Result<Vec<PortalLinkRow>, StoreError> {
        self.inner.portal_links(username)
    }
    fn audit_len(&self) -> Result<u64, StoreError> {
        self.inner.audit_len()
    }
    fn audit_range(&self, start: u64, end: u64) -> Result<Vec<AuditRow>, StoreError> {
        self.inner.audit_range(start, end)
    }
    fn audit_scan(&self, start: u64, end: u64, f: &mut AuditVisitor<'_>) -> Result<(), StoreError> {
        self.inner.audit_scan(start, end, f)
    }
    fn tiles(&self, level: u32, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.tiles(level, start, end)
    }
    fn tiles_at(&self, level: u32, indexes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.tiles_at(level, indexes)
    }
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        self.inner.checkpoints()
    }
    fn checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>, StoreError> {
        self.inner.checkpoint(size)
    }
    fn announce_key_eviction(&self, patient: &PatientId) -> Result<(), StoreError> {
        self.inner.announce_key_eviction(patient)
    }
    fn on_key_eviction(&self, f: Box<dyn Fn(&PatientId) + Send + Sync>) {
        self.inner.on_key_eviction(f)
    }
}
