//! medvault-core — the gate. [`Vault`] is the only way to touch PHI: every operation
//! authenticates, authorizes (Cedar), seals or opens records with the patient's data
//! key, masks what the caller may not see, and appends the audit record — in the same
//! transaction as a write, and before a read's result is handed back (fail closed).
//!
//! This room must never hand out a store handle, return a record that has not passed a
//! policy decision and an audit append, or return PHI when the audit append failed.
//! INVARIANT (typestate): rows leave the store sealed ([`medvault_store::VersionRow`]);
//! only this crate opens them, and only [`Disclosed`] — constructible nowhere else —
//! reaches a renderer.
#![forbid(unsafe_code)]

mod auth;
pub mod balp;
pub mod bench;
mod bundle;
pub mod demo;
mod search;

use std::collections::HashMap;
use std::sync::Arc;

pub use auth::{totp_now, LoginChallenge, NewUserInfo, SessionGrant};
pub use medvault_audit::{AuditRecord, Outcome};
pub use medvault_crypto::MasterKey;
pub use medvault_identity::{Password, Principal, SessionPolicy, Token};
pub use medvault_store::{faulty::FaultyStore, PgStore, SqliteStore, Store};
pub use medvault_types::{Category, Clock, Purpose, Role};
pub use search::SearchResult;

use medvault_crypto::{record_aad, BlindIndexer, DataKey, IndexRootKey, KeyCache, RecordCipher};
use medvault_fhir::{FhirError, Resource, ResourceType};
use medvault_identity::Identity;
use medvault_policy::{PolicyEngine, Query};
use medvault_store::{
    AuditedRead, Committed, Expect, IndexRow, Op, Payload, StoreError, TxRead, VersionRow,
    WriteBatch,
};
use medvault_types::{Action, PatientId, Username};
use serde_json::{Map, Value};

/// Data-key id for non-patient (directory) resources such as Practitioner.
const DIRECTORY_KEY: &str = "medvault.directory";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    Fhir(#[from] FhirError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("not found")]
    NotFound,
    #[error("resource deleted")]
    Gone,
    #[error("access denied")]
    Forbidden { withheld: Vec<Category> },
    #[error("version conflict")]
    Conflict,
    #[error("version does not match If-Match")]
    PreconditionFailed,
    #[error("authentication required")]
    Unauthenticated,
    #[error("{0}")]
    Identity(String),
    #[error("audit log unavailable; request refused")]
    AuditUnavailable,
    #[error("storage unavailable")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => VaultError::Conflict,
            StoreError::Exists => VaultError::Conflict,
            StoreError::NotFound => VaultError::NotFound,
            StoreError::Unavailable(m) => VaultError::Unavailable(m),
            StoreError::Injected(m) => VaultError::Unavailable(m.to_owned()),
            StoreError::Backend(m) => VaultError::Internal(m),
        }
    }
}

impl From<medvault_crypto::CryptoError> for VaultError {
    fn from(e: medvault_crypto::CryptoError) -> Self {
        VaultError::Internal(e.to_string())
    }
}

/// Who is asking, why, and from where.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub purpose: Purpose,
    pub source: Option<String>,
    pub request_id: String,
}

impl Caller {
    pub fn new(
        principal: Principal,
        purpose: Option<Purpose>,
        source: Option<String>,
        request_id: String,
    ) -> Self {
        let purpose = purpose.unwrap_or(principal.role.default_purpose());
        Caller {
            principal,
            purpose,
            source,
            request_id,
        }
    }
    /// The local command-line principal (`cli.<os user>`), acting in `role`.
    pub fn cli(role: Role) -> Self {
        let who: String = std::env::var("USER")
            .unwrap_or_else(|_| "operator".into())
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .take(40)
            .collect();
        let name = Username::new(&format!("cli.{who}"))
            .or_else(|_| Username::new("cli.operator"))
            .unwrap_or_else(|_| unreachable_username());
        Caller::new(
            Principal {
                username: name,
                role,
            },
            None,
            Some("local".into()),
            medvault_types::random_uuid(),
        )
    }
}

#[expect(
    clippy::panic,
    reason = "a constant valid user name cannot fail validation"
)]
fn unreachable_username() -> Username {
    panic!("constant user name rejected")
}

/// A resource the caller may see: produced only by the gate after a policy decision
/// and a successful audit append.
#[derive(Debug, Clone)]
pub struct Disclosed {
    rtype: ResourceType,
    id: String,
    version: u64,
    last_updated: String,
    deleted: bool,
    json: Option<Map<String, Value>>,
    category: Category,
}

impl Disclosed {
    pub fn rtype(&self) -> ResourceType {
        self.rtype
    }
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn last_updated(&self) -> &str {
        &self.last_updated
    }
    pub fn deleted(&self) -> bool {
        self.deleted
    }
    pub fn category(&self) -> Category {
        self.category
    }
    /// The resource body (absent for a deletion in history).
    pub fn json(&self) -> Option<&Map<String, Value>> {
        self.json.as_ref()
    }
}

/// Result of a write: where it landed, and the body if the caller may read it back.
#[derive(Debug, Clone)]
pub struct Written {
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub last_updated: String,
    pub body: Option<Disclosed>,
    pub created: bool,
}

/// What `GET /api/status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub key_cache_entries: usize,
    pub audit_entries: u64,
}

/// Tunables (from `medvault.toml`).
#[derive(Debug, Clone, Copy)]
pub struct VaultOptions {
    pub session: SessionPolicy,
    pub key_cache_capacity: usize,
    pub max_page_size: usize,
    /// Open checkpoints, the verifier key, tiles and proofs (commitments only) to anyone.
    pub public_transparency: bool,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            session: SessionPolicy::default(),
            key_cache_capacity: 100_000,
            max_page_size: 1000,
            public_transparency: false,
        }
    }
}

pub struct Vault {
    signer: medvault_audit::note::NoteSigner,
    origin: String,
    /// The Merkle tree over the audit log as far as it was last checkpointed.
    tree: std::sync::Mutex<medvault_audit::merkle::RootBuilder>,
    store: Arc<dyn Store>,
    master: MasterKey,
    indexer: BlindIndexer,
    keys: Arc<KeyCache>,
    policy: Arc<PolicyEngine>,
    identity: Identity,
    clock: Arc<dyn Clock>,
    options: VaultOptions,
}

/// A write being assembled (one batch, all-or-nothing).
#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    audit: Vec<AuditRecord>,
    /// Data keys created in this plan for new patients.
    new_keys: HashMap<PatientId, Arc<RecordCipher>>,
}

fn load_or_create_meta(
    store: &Arc<dyn Store>,
    key: &str,
    make: impl Fn() -> Result<Vec<u8>, VaultError>,
) -> Result<Vec<u8>, VaultError> {
    if let Some(v) = store.meta(key)? {
        return Ok(v);
    }
    let v = make()?;
    match store.commit(WriteBatch {
        ops: vec![Op::PutMetaOnce {
            key: key.to_owned(),
            value: v.clone(),
        }],
        audit: vec![],
    }) {
        Ok(_) => Ok(v),
        Err(StoreError::Exists) => store
            .meta(key)?
            .ok_or(VaultError::Internal("meta vanished".into())),
        Err(e) => Err(e.into()),
    }
}

impl Vault {
    /// Opens the gate over a store, creating the service keys on first use.
    pub fn open(
        store: Arc<dyn Store>,
        master: MasterKey,
        clock: Arc<dyn Clock>,
        options: VaultOptions,
    ) -> Result<Self, VaultError> {
        let wrapped_root = load_or_create_meta(&store, "key.index_root", || {
            Ok(master.wrap_index_root(&IndexRootKey::generate())?)
        })?;
        let root = master.unwrap_index_root(&wrapped_root)?;
        let wrapped_id = load_or_create_meta(&store, "key.identity", || {
            Ok(master.wrap_named("identity", &DataKey::generate())?)
        })?;
        let identity_key = master.unwrap_named("identity", &wrapped_id)?;
        let dir = directory_key_id();
        if store.patient_key(&dir)?.is_none() {
            let wrapped = master.wrap_data_key(&dir, 1, &DataKey::generate())?;
            match store.commit(WriteBatch {
                ops: vec![Op::PutPatientKey {
                    patient: dir,
                    key_version: 1,
                    wrapped,
                }],
                audit: vec![],
            }) {
                Ok(_) | Err(StoreError::Exists) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let policy =
            PolicyEngine::with_defaults().map_err(|e| VaultError::Internal(e.to_string()))?;
        let wrapped_sig = load_or_create_meta(&store, "key.audit_signing", || {
            Ok(master.wrap_named("audit-signing", &DataKey::generate())?)
        })?;
        let sig_key = master.unwrap_named("audit-signing", &wrapped_sig)?;
        let origin_bytes = load_or_create_meta(&store, "audit.origin", || {
            Ok(format!("medvault.local/audit/{}", medvault_types::random_uuid()).into_bytes())
        })?;
        let origin = String::from_utf8(origin_bytes)
            .map_err(|_| VaultError::Internal("bad audit origin".into()))?;
        let signer =
            medvault_audit::note::NoteSigner::new(&origin, sig_key.expose_for_derivation());
        let keys = Arc::new(KeyCache::new(options.key_cache_capacity));
        let heard = keys.clone();
        store.on_key_eviction(Box::new(move |p| heard.evict(p)));
        let vault = Vault {
            signer,
            origin,
            tree: std::sync::Mutex::new(medvault_audit::merkle::RootBuilder::new()),
            identity: Identity::new(store.clone(), clock.clone(), &identity_key, options.session),
            indexer: BlindIndexer::new(&root),
            keys,
            store,
            master,
            policy: Arc::new(policy),
            clock,
            options,
        };
        vault.record_audit_settings()?;
        Ok(vault)
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn now_instant(&self) -> String {
        medvault_types::fhir_instant(self.clock.now())
    }

    fn record(&self, c: &Caller, action: &str, outcome: Outcome) -> AuditRecord {
        make_record(&*self.clock, c, action, outcome)
    }

    /// Commits operations with their audit records. Any failure fails the request (law 2).
    fn commit(&self, ops: Vec<Op>, audit: Vec<AuditRecord>) -> Result<Committed, VaultError> {
        let audit = audit.iter().map(AuditRecord::to_leaf).collect();
        Ok(self.store.commit(WriteBatch { ops, audit })?)
    }

    /// Appends audit records alone; failure means the caller gets nothing (fail closed).
    fn audit(&self, recs: Vec<AuditRecord>) -> Result<(), VaultError> {
        self.commit(vec![], recs).map(|_| ()).map_err(|e| match e {
            VaultError::Internal(m) | VaultError::Unavailable(m) => {
                let _ = m;
                VaultError::AuditUnavailable
            }
            other => other,
        })
    }

    fn decide(&self, c: &Caller, action: Action, category: Category) -> medvault_policy::Decision {
        self.policy.decide(Query {
            role: c.principal.role,
            action,
            category,
            purpose: c.purpose,
        })
    }

    fn cipher_for(&self, key_id: &PatientId) -> Result<Arc<RecordCipher>, VaultError> {
        if let Some(c) = self.keys.get(key_id) {
            return Ok(c);
        }
        let (version, wrapped) = self
            .store
            .patient_key(key_id)?
            .ok_or(VaultError::Internal("missing data key".into()))?;
        let dk = self.master.unwrap_data_key(key_id, version, &wrapped)?;
        let c = Arc::new(RecordCipher::new(&dk));
        self.keys.insert(key_id.clone(), c.clone());
        Ok(c)
    }

    /// Drops a patient's cached data key here and on every server sharing the store
    /// (what shredding and key rotation rely on). Security administrators only; audited.
    pub fn evict_key(&self, c: &Caller, patient: &str) -> Result<(), VaultError> {
        let mut rec = self.record(c, "keys.evict", Outcome::Success);
        rec.patient = Some(patient.to_owned());
        if c.principal.role != Role::SecurityAdmin {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        let pid = PatientId::new(patient)
            .map_err(|_| VaultError::BadRequest("invalid patient id".into()))?;
        self.audit(vec![rec])?;
        self.keys.evict(&pid);
        Ok(self.store.announce_key_eviction(&pid)?)
    }

    /// Operational status for security administrators (no PHI): backend, cache and log sizes.
    pub fn status(&self, c: &Caller) -> Result<Status, VaultError> {
        let mut rec = self.record(c, "status", Outcome::Success);
        if c.principal.role != Role::SecurityAdmin {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        self.audit(vec![rec])?;
        Ok(Status {
            backend: self.store.backend(),
            key_cache_entries: self.keys.len(),
            audit_entries: self.store.audit_len()?,
        })
    }

    fn open_row(&self, row: &VersionRow) -> Result<Option<Map<String, Value>>, VaultError> {
        if row.deleted {
            return Ok(None);
        }
        let key_id = row.patient.clone().unwrap_or_else(directory_key_id);
        let cipher = self.cipher_for(&key_id)?;
        let plain = cipher.open(
            &record_aad(&row.rtype, &row.id, row.version, &key_id),
            &row.body,
        )?;
        match serde_json::from_slice::<Value>(&plain) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            _ => Err(VaultError::Internal(
                "stored record is not a JSON object".into(),
            )),
        }
    }

    fn disclosed(
        &self,
        row: &VersionRow,
        json: Option<Map<String, Value>>,
    ) -> Result<Disclosed, VaultError> {
        Ok(Disclosed {
            rtype: ResourceType::parse(&row.rtype)
                .ok_or(VaultError::Internal("unknown stored type".into()))?,
            id: row.id.clone(),
            version: row.version,
            last_updated: row.last_updated.clone(),
            deleted: row.deleted,
            json,
            category: row.category.parse().unwrap_or(Category::Notes),
        })
    }

    /// Runs an audited read: `f` runs inside the store transaction that appends the audit
    /// records it returns, so the read and its record commit together; nothing comes back
    /// unless they did (fail closed).
    fn audited_read<T: Send + 'static>(
        &self,
        c: &Caller,
        f: impl FnOnce(
                &ReadCtx,
                &dyn TxRead,
            ) -> Result<(Vec<AuditRecord>, Result<T, VaultError>), StoreError>
            + Send
            + 'static,
    ) -> Result<T, VaultError> {
        let cx = ReadCtx {
            policy: self.policy.clone(),
            clock: self.clock.clone(),
            caller: c.clone(),
        };
        let read: AuditedRead = Box::new(move |tx: &dyn TxRead| {
            let (recs, out) = f(&cx, tx)?;
            let leaves = recs.iter().map(AuditRecord::to_leaf).collect();
            Ok((leaves, Box::new(out) as Payload))
        });
        match self.store.audited(read) {
            Ok(p) => match p.downcast::<Result<T, VaultError>>() {
                Ok(out) => *out,
                Err(_) => Err(VaultError::Internal(
                    "audited read returned the wrong type".into(),
                )),
            },
            Err(StoreError::Unavailable(m)) => Err(VaultError::Unavailable(m)),
            Err(StoreError::Injected("read")) => Err(VaultError::Unavailable("read".into())),
            Err(_) => Err(VaultError::AuditUnavailable),
        }
    }

    /// Opens rows an audited read disclosed, in order.
    fn open_all(&self, rows: &[VersionRow]) -> Result<Vec<Disclosed>, VaultError> {
        rows.iter().map(|r| self.open_disclosed(r)).collect()
    }

    fn open_disclosed(&self, row: &VersionRow) -> Result<Disclosed, VaultError> {
        let json = self.open_row(row)?;
        self.disclosed(row, json)
    }

    /// `GET /{type}/{id}`.
    pub fn read(&self, c: &Caller, rt: ResourceType, id: &str) -> Result<Disclosed, VaultError> {
        let id = id.to_owned();
        let row = self.audited_read(c, move |cx, tx| {
            let row = tx.current(rt.as_str(), &id)?;
            Ok(cx.decide_one(rt, &id, row, "read"))
        })?;
        self.open_disclosed(&row)
    }

    /// `GET /{type}/{id}/_history/{vid}`.
    pub fn vread(
        &self,
        c: &Caller,
        rt: ResourceType,
        id: &str,
        version: u64,
    ) -> Result<Disclosed, VaultError> {
        let id = id.to_owned();
        let row = self.audited_read(c, move |cx, tx| {
            let row = tx.version(rt.as_str(), &id, version)?;
            Ok(cx.decide_one(rt, &id, row, "vread"))
        })?;
        self.open_disclosed(&row)
    }

    /// `GET /{type}/{id}/_history`: every version the caller may see, newest first.
    pub fn history(
        &self,
        c: &Caller,
        rt: ResourceType,
        id: &str,
    ) -> Result<SearchResult, VaultError> {
        let id = id.to_owned();
        let (rows, disclosed, withheld) = self.audited_read(c, move |cx, tx| {
            let rows = tx.history(rt.as_str(), &id)?;
            let mut rec = cx.record("history", Outcome::Success);
            rec.resource = Some(format!("{rt}/{id}"));
            if rows.is_empty() {
                rec.outcome = Outcome::NotFound;
                return Ok((vec![rec], Err(VaultError::NotFound)));
            }
            rec.patient = rows
                .first()
                .and_then(|r| r.patient.as_ref())
                .map(|p| p.to_string());
            let (allowed, disclosed, withheld) = cx.filter(rows, Action::Read);
            rec.categories_disclosed = disclosed.iter().map(|c| c.to_string()).collect();
            rec.categories_withheld = withheld.iter().map(|c| c.to_string()).collect();
            if allowed.is_empty() {
                rec.outcome = Outcome::Denied;
                return Ok((vec![rec], Err(VaultError::Forbidden { withheld })));
            }
            Ok((vec![rec], Ok((allowed, disclosed, withheld))))
        })?;
        let entries = self.open_all(&rows)?;
        Ok(SearchResult {
            entries,
            disclosed,
            withheld,
            ..Default::default()
        })
    }

    /// The patient (data-key owner) a resource belongs to, checked to exist.
    fn owner(&self, res: &Resource, plan: &Plan) -> Result<Option<PatientId>, VaultError> {
        if !res.rtype().is_patient_scoped() {
            return Ok(None);
        }
        let r = res.patient_reference().ok_or_else(|| {
            VaultError::Unprocessable(format!(
                "{} must reference its Patient (subject or patient)",
                res.rtype()
            ))
        })?;
        let pid = medvault_fhir::patient_id_from_reference(&r).ok_or_else(|| {
            VaultError::Unprocessable("patient reference must have the form Patient/{id}".into())
        })?;
        if res.rtype().as_str() == "Patient" || plan.new_keys.contains_key(&pid) {
            return Ok(Some(pid));
        }
        match self.store.current("Patient", pid.as_str())? {
            Some(row) if !row.deleted => Ok(Some(pid)),
            _ => Err(VaultError::Unprocessable(
                "referenced Patient does not exist".into(),
            )),
        }
    }

    /// Plans one create/update: policy, sealing, blind indexes, audit record.
    fn plan_put(
        &self,
        c: &Caller,
        plan: &mut Plan,
        mut res: Resource,
        id: String,
        prior: Option<&VersionRow>,
        expect: Expect,
    ) -> Result<(Written, Map<String, Value>), VaultError> {
        let rt = res.rtype();
        let creating = prior.is_none();
        let category = res.category();
        let action = if creating {
            Action::Create
        } else {
            Action::Update
        };
        let mut rec = self.record(c, action.as_str(), Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        let mut denied = !self.decide(c, action, category).allowed;
        if let Some(p) = prior {
            let old: Category = p
                .category
                .parse()
                .map_err(|_| VaultError::Internal("bad category".into()))?;
            if old != category && !self.decide(c, Action::Update, old).allowed {
                denied = true;
            }
        }
        if denied {
            rec.outcome = Outcome::Denied;
            rec.categories_withheld = vec![category.to_string()];
            return Err(self.deny(rec, category));
        }
        if rt.as_str() == "Patient" && creating {
            let pid =
                PatientId::new(&id).map_err(|_| VaultError::BadRequest("invalid id".into()))?;
            let dk = DataKey::generate();
            let wrapped = self.master.wrap_data_key(&pid, 1, &dk)?;
            plan.ops.push(Op::PutPatientKey {
                patient: pid.clone(),
                key_version: 1,
                wrapped,
            });
            plan.new_keys.insert(pid, Arc::new(RecordCipher::new(&dk)));
        }
        let owner = if rt.as_str() == "Patient" {
            Some(PatientId::new(&id).map_err(|_| VaultError::BadRequest("invalid id".into()))?)
        } else {
            self.owner(&res, plan)?
        };
        if let Some(p) = prior {
            if p.patient != owner {
                return Err(VaultError::Unprocessable(
                    "a resource cannot move to another patient's chart".into(),
                ));
            }
        }
        let version = prior.map(|p| p.version + 1).unwrap_or(1);
        let now = self.now_instant();
        res.stamp(&id, version, &now);
        let key_id = owner.clone().unwrap_or_else(directory_key_id);
        let cipher = match plan.new_keys.get(&key_id) {
            Some(c) => c.clone(),
            None => self.cipher_for(&key_id)?,
        };
        let index: Vec<IndexRow> = medvault_fhir::search_tokens(rt, res.json())
            .into_iter()
            .map(|t| IndexRow {
                param: t.param.to_owned(),
                token: self.indexer.token(rt.as_str(), t.param, &t.value).to_vec(),
            })
            .collect();
        let json = res.into_json();
        let plain = serde_json::to_vec(&json).map_err(|e| VaultError::Internal(e.to_string()))?;
        let body = cipher.seal(&record_aad(rt.as_str(), &id, version, &key_id), &plain)?;
        plan.ops.push(Op::PutVersion {
            row: VersionRow {
                patient: owner.clone(),
                rtype: rt.as_str().to_owned(),
                id: id.clone(),
                version,
                last_updated: now.clone(),
                deleted: false,
                category: category.as_str().to_owned(),
                key_version: 1,
                body,
            },
            expect,
            index,
        });
        rec.resource = Some(format!("{rt}/{id}/_history/{version}"));
        rec.patient = owner.map(|p| p.to_string());
        rec.categories_disclosed = vec![category.to_string()];
        plan.audit.push(rec);
        let written = Written {
            rtype: rt,
            id,
            version,
            last_updated: now,
            body: None,
            created: creating,
        };
        Ok((written, json))
    }

    /// Records a denial (fail closed: if even that cannot be audited, the error says so).
    fn deny(&self, rec: AuditRecord, category: Category) -> VaultError {
        match self.audit(vec![rec]) {
            Ok(()) => VaultError::Forbidden {
                withheld: vec![category],
            },
            Err(e) => e,
        }
    }

    /// Attaches the body to a write result if the caller may read that category.
    fn readback(
        &self,
        c: &Caller,
        mut w: Written,
        json: Map<String, Value>,
        category: Category,
    ) -> Written {
        if self.decide(c, Action::Read, category).allowed {
            w.body = Some(Disclosed {
                rtype: w.rtype,
                id: w.id.clone(),
                version: w.version,
                last_updated: w.last_updated.clone(),
                deleted: false,
                json: Some(json),
                category,
            });
        }
        w
    }

    fn commit_plan(&self, plan: Plan) -> Result<(), VaultError> {
        let new_keys: Vec<(PatientId, Arc<RecordCipher>)> = plan.new_keys.into_iter().collect();
        self.commit(plan.ops, plan.audit)?;
        for (p, k) in new_keys {
            self.keys.insert(p, k);
        }
        Ok(())
    }

    /// `POST /{type}`: the server assigns the id.
    pub fn create(&self, c: &Caller, res: Resource) -> Result<Written, VaultError> {
        let category = res.category();
        let mut plan = Plan::default();
        let id = medvault_types::random_uuid();
        let (w, json) = self.plan_put(c, &mut plan, res, id, None, Expect::Absent)?;
        self.commit_plan(plan)?;
        Ok(self.readback(c, w, json, category))
    }

    /// `PUT /{type}/{id}`, honouring `If-Match` (version number).
    pub fn update(
        &self,
        c: &Caller,
        id: &str,
        res: Resource,
        if_match: Option<u64>,
    ) -> Result<Written, VaultError> {
        let rt = res.rtype();
        match res.id() {
            Some(body_id) if body_id == id => {}
            Some(_) => {
                return Err(VaultError::BadRequest(
                    "resource id in the body does not match the URL".into(),
                ))
            }
            None => {
                return Err(VaultError::BadRequest(
                    "resource id is required in the body of an update".into(),
                ))
            }
        }
        let category = res.category();
        let prior = self.store.current(rt.as_str(), id)?;
        let prior = match prior {
            Some(p) if !p.deleted => p,
            _ => {
                let mut rec = self.record(c, "update", Outcome::NotFound);
                rec.resource = Some(format!("{rt}/{id}"));
                self.audit(vec![rec])?;
                return Err(VaultError::NotFound);
            }
        };
        if let Some(v) = if_match {
            if v != prior.version {
                return Err(VaultError::PreconditionFailed);
            }
        }
        let mut plan = Plan::default();
        let (w, json) = self.plan_put(
            c,
            &mut plan,
            res,
            id.to_owned(),
            Some(&prior),
            Expect::Version(prior.version),
        )?;
        match self.commit_plan(plan) {
            Err(VaultError::Conflict) if if_match.is_some() => Err(VaultError::PreconditionFailed),
            Err(e) => Err(e),
            Ok(()) => Ok(self.readback(c, w, json, category)),
        }
    }

    fn plan_delete(
        &self,
        c: &Caller,
        plan: &mut Plan,
        rt: ResourceType,
        id: &str,
    ) -> Result<u64, VaultError> {
        let prior = self.store.current(rt.as_str(), id)?;
        let mut rec = self.record(c, "delete", Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        let prior = match prior {
            Some(p) if !p.deleted => p,
            Some(_) => {
                rec.outcome = Outcome::NotFound;
                self.audit(vec![rec])?;
                return Err(VaultError::Gone);
            }
            None => {
                rec.outcome = Outcome::NotFound;
                self.audit(vec![rec])?;
                return Err(VaultError::NotFound);
            }
        };
        rec.patient = prior.patient.as_ref().map(|p| p.to_string());
        let category: Category = prior
            .category
            .parse()
            .map_err(|_| VaultError::Internal("bad category".into()))?;
        if !self.decide(c, Action::Delete, category).allowed {
            rec.outcome = Outcome::Denied;
            rec.categories_withheld = vec![category.to_string()];
            return Err(self.deny(rec, category));
        }
        let version = prior.version + 1;
        rec.resource = Some(format!("{rt}/{id}/_history/{version}"));
        plan.ops.push(Op::PutVersion {
            row: VersionRow {
                patient: prior.patient.clone(),
                rtype: rt.as_str().to_owned(),
                id: id.to_owned(),
                version,
                last_updated: self.now_instant(),
                deleted: true,
                category: prior.category.clone(),
                key_version: prior.key_version,
                body: vec![],
            },
            expect: Expect::Version(prior.version),
            index: vec![],
        });
        plan.audit.push(rec);
        Ok(version)
    }

    /// `DELETE /{type}/{id}`: a new, empty version; earlier versions stay sealed in history.
    pub fn delete(&self, c: &Caller, rt: ResourceType, id: &str) -> Result<u64, VaultError> {
        let mut plan = Plan::default();
        let v = self.plan_delete(c, &mut plan, rt, id)?;
        self.commit_plan(plan)?;
        Ok(v)
    }

    /// Number of audit entries (for reports and tests).
    pub fn audit_len(&self) -> Result<u64, VaultError> {
        Ok(self.store.audit_len()?)
    }

    /// Audit records `[start, end)`. Audit records hold no clinical content.
    pub fn audit_records(
        &self,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, AuditRecord)>, VaultError> {
        self.store
            .audit_range(start, end)?
            .into_iter()
            .map(|r| {
                let rec = AuditRecord::from_canonical(&r.record)
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                Ok((r.seq, rec))
            })
            .collect()
    }
}

fn directory_key_id() -> PatientId {
    PatientId::new(DIRECTORY_KEY).unwrap_or_else(|_| unreachable_key_id())
}

#[expect(clippy::panic, reason = "a constant valid id cannot fail validation")]
fn unreachable_key_id() -> PatientId {
    panic!("constant key id rejected")
}

fn push_unique(v: &mut Vec<Category>, c: Category) {
    if !v.contains(&c) {
        v.push(c);
    }
}

fn make_record(clock: &dyn Clock, c: &Caller, action: &str, outcome: Outcome) -> AuditRecord {
    let now = medvault_types::fhir_instant(clock.now());
    let mut r = AuditRecord::new(
        action,
        c.principal.username.as_str(),
        outcome,
        now,
        &c.request_id,
    );
    r.role = Some(c.principal.role.as_str().to_owned());
    r.purpose = Some(c.purpose.as_str().to_owned());
    r.source = c.source.clone();
    r
}

/// What an audited read needs on the store's side: the caller, the policy and the clock,
/// owned, so the read can run on the store's sequencer.
struct ReadCtx {
    policy: Arc<PolicyEngine>,
    clock: Arc<dyn Clock>,
    caller: Caller,
}

impl ReadCtx {
    fn record(&self, action: &str, outcome: Outcome) -> AuditRecord {
        make_record(&*self.clock, &self.caller, action, outcome)
    }

    fn decide(&self, action: Action, category: Category) -> medvault_policy::Decision {
        self.policy.decide(Query {
            role: self.caller.principal.role,
            action,
            category,
            purpose: self.caller.purpose,
        })
    }

    /// The decision and audit record for reading one stored version.
    fn decide_one(
        &self,
        rt: ResourceType,
        id: &str,
        row: Option<VersionRow>,
        action: &str,
    ) -> (Vec<AuditRecord>, Result<VersionRow, VaultError>) {
        let mut rec = self.record(action, Outcome::Success);
        rec.resource = Some(format!("{rt}/{id}"));
        let Some(row) = row else {
            rec.outcome = Outcome::NotFound;
            return (vec![rec], Err(VaultError::NotFound));
        };
        rec.resource = Some(format!("{rt}/{id}/_history/{}", row.version));
        rec.patient = row.patient.as_ref().map(|p| p.to_string());
        let Ok(category) = row.category.parse::<Category>() else {
            return (vec![], Err(VaultError::Internal("bad category".into())));
        };
        let d = self.decide(Action::Read, category);
        if !d.allowed {
            rec.outcome = Outcome::Denied;
            rec.categories_withheld = vec![category.to_string()];
            return (
                vec![rec],
                Err(VaultError::Forbidden {
                    withheld: vec![category],
                }),
            );
        }
        if row.deleted {
            rec.outcome = Outcome::NotFound;
            rec.detail = Some("deleted".into());
            return (vec![rec], Err(VaultError::Gone));
        }
        rec.categories_disclosed = vec![category.to_string()];
        rec.detail = Some(format!("policy={}", d.policies.join(",")));
        (vec![rec], Ok(row))
    }

    /// Splits rows into those the caller may see and the categories withheld.
    fn filter(
        &self,
        rows: Vec<VersionRow>,
        action: Action,
    ) -> (Vec<VersionRow>, Vec<Category>, Vec<Category>) {
        let (mut allowed, mut disclosed, mut withheld) = (vec![], vec![], vec![]);
        for row in rows {
            // An unparseable category is withheld as the most restrictive one (default deny).
            let cat = row.category.parse::<Category>().unwrap_or(Category::Notes);
            if row.category.parse::<Category>().is_ok() && self.decide(action, cat).allowed {
                push_unique(&mut disclosed, cat);
                allowed.push(row);
            } else {
                push_unique(&mut withheld, cat);
            }
        }
        (allowed, disclosed, withheld)
    }
}

/// The outcome of recomputing the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditVerdict {
    /// Every entry is present, in sequence, canonical, and matches its leaf hash.
    Intact {
        size: u64,
        root: [u8; 32],
        checkpoints: usize,
    },
    /// The first entry found wrong, and what is wrong with it.
    Broken { index: u64, problem: String },
}

impl Vault {
    /// The log's checkpoint verifier key (C2SP note verifier-key form).
    pub fn audit_verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// Signs and stores a checkpoint of the audit log if it grew since the last one.
    /// Returns the new checkpoint's size and signed note.
    pub fn checkpoint(&self) -> Result<Option<(u64, String)>, VaultError> {
        let mut tree = self
            .tree
            .lock()
            .map_err(|_| VaultError::Internal("tree lock poisoned".into()))?;
        let n = self.store.audit_len()?;
        if n == 0 || n == tree.size() {
            return Ok(None);
        }
        let mut fresh = tree.clone();
        while fresh.size() < n {
            let rows = self
                .store
                .audit_range(fresh.size(), n.min(fresh.size().saturating_add(50_000)))?;
            if rows.is_empty() {
                return Err(VaultError::Internal("audit log has a gap".into()));
            }
            for r in rows {
                if r.seq != fresh.size() {
                    return Err(VaultError::Internal("audit log has a gap".into()));
                }
                fresh.push(medvault_audit::record_leaf(&r.record));
            }
        }
        let note = self.signer.sign(&medvault_audit::note::checkpoint_text(
            &self.origin,
            n,
            &fresh.root(),
        ));
        self.store.commit(WriteBatch {
            ops: vec![Op::PutCheckpoint {
                size: n,
                note: note.clone(),
            }],
            audit: vec![],
        })?;
        *tree = fresh;
        Ok(Some((n, note)))
    }

    /// Recomputes every leaf hash and the Merkle root of the whole audit log, streaming it in
    /// chunks, and checks every stored checkpoint: its signature, and that the tree of that
    /// size still has the signed root. Reports the first entry (or range) found wrong.
    pub fn verify_audit(&self, progress: &dyn Fn(u64, u64)) -> Result<AuditVerdict, VaultError> {
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut checkpoints: Vec<(u64, [u8; 32])> = vec![];
        for (size, note) in self.store.checkpoints()? {
            let parsed = verifier
                .verify(&note)
                .and_then(medvault_audit::note::parse_checkpoint)
                .ok()
                .filter(|(origin, s, _)| *origin == self.origin && *s == size);
            match parsed {
                Some((_, s, root)) => checkpoints.push((s, root)),
                None => {
                    let problem = format!(
                        "the checkpoint of size {size} is not validly signed by this log's key"
                    );
                    return Ok(AuditVerdict::Broken {
                        index: size,
                        problem,
                    });
                }
            }
        }
        checkpoints.sort_by_key(|c| c.0);
        let total = self.store.audit_len()?;
        let mut next_cp = checkpoints.iter().peekable();
        let mut last_good: u64 = 0;
        let mut builder = medvault_audit::merkle::RootBuilder::new();
        let mut expected: u64 = 0;
        const CHUNK: u64 = 50_000;
        let check_cp = |builder: &medvault_audit::merkle::RootBuilder,
                        next_cp: &mut std::iter::Peekable<
            std::slice::Iter<'_, (u64, [u8; 32])>,
        >,
                        last_good: &mut u64|
         -> Option<AuditVerdict> {
            while let Some(&&(size, root)) = next_cp.peek() {
                if size != builder.size() {
                    break;
                }
                if builder.root() != root {
                    let problem = format!(
                        "entries {}..{size} do not match the checkpoint signed at size {size} (edited, reordered or replaced)",
                        *last_good
                    );
                    return Some(AuditVerdict::Broken {
                        index: *last_good,
                        problem,
                    });
                }
                *last_good = size;
                next_cp.next();
            }
            None
        };
        while expected < total {
            let rows = self
                .store
                .audit_range(expected, expected.saturating_add(CHUNK))?;
            if rows.is_empty() {
                return Ok(AuditVerdict::Broken {
                    index: expected,
                    problem: "entry is missing".into(),
                });
            }
            // Hash and check canonical form on every core; fold into the tree in order.
            let checked = check_entries(&rows);
            for (row, (leaf, problem)) in rows.iter().zip(checked) {
                if row.seq != expected {
                    let problem =
                        format!("entry is missing (the next stored entry is {})", row.seq);
                    return Ok(AuditVerdict::Broken {
                        index: expected,
                        problem,
                    });
                }
                if let Some(problem) = problem {
                    return Ok(AuditVerdict::Broken {
                        index: expected,
                        problem: problem.into(),
                    });
                }
                builder.push(leaf);
                expected += 1;
                if let Some(v) = check_cp(&builder, &mut next_cp, &mut last_good) {
                    return Ok(v);
                }
            }
            progress(expected, total);
        }
        if let Some(&&(size, _)) = next_cp.peek() {
            let problem = format!("the log was truncated: a signed checkpoint covers {size} entries, the log has {total}");
            return Ok(AuditVerdict::Broken {
                index: total,
                problem,
            });
        }
        Ok(AuditVerdict::Intact {
            size: builder.size(),
            root: builder.root(),
            checkpoints: checkpoints.len(),
        })
    }
}

/// Proof of one entry's inclusion in the tree of a given size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InclusionProof {
    pub index: u64,
    pub size: u64,
    pub leaf_hash: String,
    pub root: String,
    pub proof: Vec<String>,
}

/// Proof that the tree of size `old` is a prefix of the tree of size `new`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsistencyProof {
    pub old: u64,
    pub new: u64,
    pub old_root: String,
    pub new_root: String,
    pub proof: Vec<String>,
}

fn b64(h: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(h)
}

impl Vault {
    /// The latest signed checkpoint (C2SP signed note), if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, VaultError> {
        Ok(self.store.checkpoint(None)?.map(|(_, n)| n))
    }

    /// Audit settings are part of the log: a change is recorded when the server starts with it.
    fn record_audit_settings(&self) -> Result<(), VaultError> {
        let value =
            format!("public_transparency={}", self.options.public_transparency).into_bytes();
        if self.store.meta("audit.settings")?.as_deref() == Some(value.as_slice()) {
            return Ok(());
        }
        let mut rec = AuditRecord::new(
            "audit.settings",
            "system",
            Outcome::Success,
            self.now_instant(),
            "startup",
        );
        rec.detail = Some(String::from_utf8_lossy(&value).into_owned());
        self.commit(
            vec![Op::PutMeta {
                key: "audit.settings".into(),
                value,
            }],
            vec![rec],
        )?;
        Ok(())
    }

    /// Who may read the transparency views (commitments only): anyone when
    /// `audit.public_transparency` is on, otherwise privacy officers and auditors.
    pub fn transparency_reader(&self, c: Option<&Caller>, action: &str) -> Result<(), VaultError> {
        match c {
            Some(c) if !self.options.public_transparency => self.require_audit_reader(c, action),
            Some(_) => Ok(()),
            None if self.options.public_transparency => Ok(()),
            None => Err(VaultError::Unauthenticated),
        }
    }

    fn require_audit_reader(&self, c: &Caller, action: &str) -> Result<(), VaultError> {
        let mut rec = self.record(c, action, Outcome::Success);
        if !matches!(c.principal.role, Role::PrivacyOfficer | Role::Auditor) {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(VaultError::Forbidden { withheld: vec![] });
        }
        self.audit(vec![rec])
    }

    fn leaves(&self, size: u64) -> Result<Vec<medvault_audit::merkle::Hash>, VaultError> {
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while (out.len() as u64) < size {
            let start = out.len() as u64;
            let rows = self
                .store
                .audit_range(start, size.min(start.saturating_add(50_000)))?;
            if rows.is_empty() {
                return Err(VaultError::Internal("audit log has a gap".into()));
            }
            for r in rows {
                out.push(medvault_audit::record_leaf(&r.record));
            }
        }
        Ok(out)
    }

    /// Full audit records `[start, end)` (at most 1000) for privacy officers and auditors;
    /// each is checkable against its leaf hash. Reading them is itself audited.
    pub fn audit_entries(
        &self,
        c: &Caller,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, String, String, AuditRecord)>, VaultError> {
        if end < start || end - start > 1000 {
            return Err(VaultError::BadRequest(
                "ask for at most 1000 entries with start <= end".into(),
            ));
        }
        self.require_audit_reader(c, "audit.entries")?;
        let rows = self.store.audit_range(start, end)?;
        rows.into_iter()
            .map(|r| {
                let rec = AuditRecord::from_canonical(&r.record)
                    .map_err(|e| VaultError::Internal(e.to_string()))?;
                Ok((
                    r.seq,
                    b64(&medvault_audit::commitment(&r.record)),
                    b64(&r.leaf_hash),
                    rec,
                ))
            })
            .collect()
    }

    /// RFC 6962 inclusion proof of entry `index` in the tree of `size` entries.
    pub fn inclusion_proof(
        &self,
        c: Option<&Caller>,
        index: u64,
        size: u64,
    ) -> Result<InclusionProof, VaultError> {
        self.transparency_reader(c, "audit.proof")?;
        if index >= size || size > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need index < size <= the log's size".into(),
            ));
        }
        let leaves = self.leaves(size)?;
        let i =
            usize::try_from(index).map_err(|_| VaultError::BadRequest("index too large".into()))?;
        let proof = medvault_audit::merkle::inclusion_proof(&leaves, i)
            .ok_or(VaultError::BadRequest("index out of range".into()))?;
        let leaf = leaves
            .get(i)
            .ok_or(VaultError::BadRequest("index out of range".into()))?;
        Ok(InclusionProof {
            index,
            size,
            leaf_hash: b64(leaf),
            root: b64(&medvault_audit::merkle::root(&leaves)),
            proof: proof.iter().map(|h| b64(h)).collect(),
        })
    }

    /// RFC 6962 consistency proof between the trees of `old` and `new` entries.
    pub fn consistency_proof(
        &self,
        c: Option<&Caller>,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof, VaultError> {
        self.transparency_reader(c, "audit.proof")?;
        if old == 0 || old > new || new > self.store.audit_len()? {
            return Err(VaultError::BadRequest(
                "need 0 < old <= new <= the log's size".into(),
            ));
        }
        let leaves = self.leaves(new)?;
        let m = usize::try_from(old).map_err(|_| VaultError::BadRequest("old too large".into()))?;
        let proof = medvault_audit::merkle::consistency_proof(&leaves, m)
            .ok_or(VaultError::BadRequest("bad sizes".into()))?;
        Ok(ConsistencyProof {
            old,
            new,
            old_root: b64(&medvault_audit::merkle::root(
                leaves.get(..m).unwrap_or(&[]),
            )),
            new_root: b64(&medvault_audit::merkle::root(&leaves)),
            proof: proof.iter().map(|h| b64(h)).collect(),
        })
    }
}

/// What a C2SP tlog-tiles path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileRef {
    /// A hash tile: level (in tiles of height 8), index, width if partial.
    Hashes {
        level: u32,
        index: u64,
        width: Option<u64>,
    },
    /// An entry bundle: index, width if partial.
    Entries { index: u64, width: Option<u64> },
}

impl TileRef {
    /// Parses `L/N[.p/W]` or `entries/N[.p/W]`, N written in 3-digit path elements with
    /// `x` before all but the last (C2SP tlog-tiles).
    pub fn parse(path: &str) -> Option<TileRef> {
        let mut parts: Vec<&str> = path.split('/').collect();
        let first = *parts.first()?;
        let width = match parts.len() {
            n if n >= 3 && parts.get(n - 2).is_some_and(|p| p.ends_with(".p")) => {
                let w: u64 = parts.last()?.parse().ok()?;
                if !(1..=255).contains(&w) || parts.last()?.starts_with('0') {
                    return None;
                }
                parts.pop();
                let last = parts.pop()?;
                parts.push(last.strip_suffix(".p")?);
                Some(w)
            }
            _ => None,
        };
        let idx_parts = parts.get(1..)?;
        if idx_parts.is_empty() {
            return None;
        }
        let mut index: u64 = 0;
        for (i, p) in idx_parts.iter().enumerate() {
            let digits = if i + 1 < idx_parts.len() {
                p.strip_prefix('x')?
            } else {
                p
            };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            index = index.checked_mul(1000)?.checked_add(digits.parse().ok()?)?;
        }
        if first == "entries" {
            return Some(TileRef::Entries { index, width });
        }
        let level: u32 = first
            .parse()
            .ok()
            .filter(|l| *l < 64 && !(first.len() > 1 && first.starts_with('0')))?;
        Some(TileRef::Hashes {
            level,
            index,
            width,
        })
    }
}

const TILE_WIDTH: u64 = 256;

impl Vault {
    /// The bytes of a hash tile or entry bundle for the latest checkpointed tree, or
    /// `NotFound` when the tree does not (yet) hold it.
    pub fn tile(&self, c: Option<&Caller>, t: TileRef) -> Result<Vec<u8>, VaultError> {
        self.transparency_reader(c, "audit.tile")?;
        let size = self.store.checkpoint(None)?.map(|(s, _)| s).unwrap_or(0);
        let (level, index, width) = match t {
            TileRef::Hashes {
                level,
                index,
                width,
            } => (level, index, width),
            TileRef::Entries { index, width } => (0, index, width),
        };
        // Leaves under one hash at this level, and how many such hashes the tree completes.
        let span = TILE_WIDTH.checked_pow(level).ok_or(VaultError::NotFound)?;
        let complete = size / span;
        let first = index.checked_mul(TILE_WIDTH).ok_or(VaultError::NotFound)?;
        let available = complete.saturating_sub(first).min(TILE_WIDTH);
        let want = width.unwrap_or(TILE_WIDTH);
        if available == 0 || want > available || (width.is_none() && available < TILE_WIDTH) {
            return Err(VaultError::NotFound);
        }
        let start = first * span;
        let end = (first + want) * span;
        let mut level_hashes: Vec<[u8; 32]> = vec![];
        let mut commitments: Vec<[u8; 32]> = vec![];
        let mut at = start;
        while at < end {
            let rows = self
                .store
                .audit_range(at, end.min(at.saturating_add(50_000)))?;
            if rows.is_empty() {
                return Err(VaultError::Internal("audit log has a gap".into()));
            }
            for r in rows {
                let c = medvault_audit::commitment(&r.record);
                level_hashes.push(medvault_audit::leaf_hash(&c));
                if matches!(t, TileRef::Entries { .. }) {
                    commitments.push(c);
                }
                at += 1;
            }
        }
        if let TileRef::Entries { .. } = t {
            let mut out = Vec::with_capacity(commitments.len() * 34);
            for c in commitments {
                out.extend_from_slice(&32u16.to_be_bytes());
                out.extend_from_slice(&c);
            }
            return Ok(out);
        }
        for _ in 0..level * 8 {
            level_hashes = level_hashes
                .chunks(2)
                .map(|p| match p {
                    [l, r] => medvault_audit::merkle::node_hash(l, r),
                    [one] => *one,
                    _ => [0u8; 32],
                })
                .collect();
        }
        Ok(level_hashes.concat())
    }
}

impl Vault {
    /// The stored checkpoint of exactly `size` entries, with any witness cosignatures.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<String>, VaultError> {
        Ok(self.store.checkpoint(Some(size))?.map(|(_, n)| n))
    }

    /// `POST /audit/checkpoint`: signs a checkpoint now and returns the latest (privacy
    /// officers and auditors; audited).
    pub fn checkpoint_now(&self, c: &Caller) -> Result<Option<String>, VaultError> {
        self.require_audit_reader(c, "audit.checkpoint")?;
        self.checkpoint()?;
        self.latest_checkpoint()
    }

    /// Accepts a witness's cosigned copy of one of this log's checkpoints: the note must carry
    /// this log's valid signature over a checkpoint it stored; the other signature lines are
    /// appended to the stored checkpoint. Privacy officers and auditors (who run witnesses).
    pub fn add_cosignatures(&self, c: &Caller, note: &str) -> Result<usize, VaultError> {
        self.require_audit_reader(c, "audit.cosign")?;
        let verifier = medvault_audit::note::NoteVerifier::parse(&self.signer.verifier_key())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        let text = verifier
            .verify(note)
            .map_err(|_| VaultError::BadRequest("not a checkpoint signed by this log".into()))?;
        let (origin, size, _) = medvault_audit::note::parse_checkpoint(text)
            .map_err(|e| VaultError::BadRequest(e.to_string()))?;
        let stored = self.checkpoint_at(size)?.ok_or(VaultError::NotFound)?;
        if origin != self.origin || !stored.starts_with(text) {
            return Err(VaultError::BadRequest(
                "checkpoint does not match the stored one".into(),
            ));
        }
        let own = format!("\u{2014} {} ", self.origin);
        let lines: Vec<String> = note
            .get(text.len() + 1..)
            .unwrap_or("")
            .lines()
            .filter(|l| l.starts_with('\u{2014}') && !l.starts_with(&own) && l.len() < 400)
            .map(|l| format!("{l}\n"))
            .collect();
        let n = lines.len();
        let ops = lines
            .into_iter()
            .map(|line| Op::AddCosignature { size, line })
            .collect();
        self.store.commit(WriteBatch { ops, audit: vec![] })?;
        Ok(n)
    }
}

/// Per entry: its recomputed leaf and, if wrong, what is wrong — computed on all cores.
fn check_entries(rows: &[medvault_store::AuditRow]) -> Vec<([u8; 32], Option<&'static str>)> {
    fn one(row: &medvault_store::AuditRow) -> ([u8; 32], Option<&'static str>) {
        let leaf = medvault_audit::record_leaf(&row.record);
        if row.leaf_hash.as_slice() != leaf.as_slice() {
            return (leaf, Some("record does not match its leaf hash"));
        }
        match AuditRecord::from_canonical(&row.record) {
            Ok(r) if r.canonical() == row.record => (leaf, None),
            _ => (leaf, Some("not a canonical audit record")),
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    if threads == 1 || rows.len() < 2_000 {
        return rows.iter().map(one).collect();
    }
    let per = rows.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![([0u8; 32], Some("verification thread failed"))])
            })
            .collect()
    })
}

#[cfg(test)]
mod tile_tests {
    use super::TileRef;

    #[test]
    fn tile_paths() {
        assert_eq!(
            TileRef::parse("0/000"),
            Some(TileRef::Hashes {
                level: 0,
                index: 0,
                width: None
            })
        );
        assert_eq!(
            TileRef::parse("1/x001/x234/067"),
            Some(TileRef::Hashes {
                level: 1,
                index: 1_234_067,
                width: None
            })
        );
        assert_eq!(
            TileRef::parse("0/001.p/17"),
            Some(TileRef::Hashes {
                level: 0,
                index: 1,
                width: Some(17)
            })
        );
        assert_eq!(
            TileRef::parse("entries/000.p/5"),
            Some(TileRef::Entries {
                index: 0,
                width: Some(5)
            })
        );
        for bad in [
            "",
            "0",
            "0/1",
            "0/0001",
            "x/000",
            "0/000.p/0",
            "0/000.p/256",
            "0/001/002",
            "00/000",
            "0/000.p/05",
            "0/../000",
        ] {
            assert_eq!(TileRef::parse(bad), None, "{bad}");
        }
    }
}
