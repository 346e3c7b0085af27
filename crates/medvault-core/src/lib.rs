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

mod auditlog;
mod auth;
pub mod balp;
pub mod bench;
mod bundle;
pub mod demo;
mod search;

use std::collections::HashMap;
use std::sync::Arc;

pub use auditlog::{AuditVerdict, ConsistencyProof, InclusionProof, TileRef};
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
    /// The right edge of the tiled Merkle tree as of this server's last checkpoint.
    tiles: std::sync::Mutex<medvault_audit::tiles::Tiles>,
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
            tiles: std::sync::Mutex::new(medvault_audit::tiles::Tiles::new()),
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
