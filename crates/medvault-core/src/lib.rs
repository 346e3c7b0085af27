//! medvault-core — the gate. [`Vault`] is the only way to touch PHI: every operation
//! takes a [`Caller`], is decided by the policy engine (Cedar, `medvault-policy`), seals or
//! opens records with the patient's data key, masks what the caller may not see, and
//! appends the audit record — in the same transaction as a write, and before a read's
//! result is handed back (fail closed).
//!
//! This room must never hand out a store handle or a key, return a record that has not
//! passed a policy decision and an audit append, decide access anywhere but in the policy
//! engine, or return PHI when the audit append failed. It does nothing else: the benchmark,
//! the demo data and log verification live in their own rooms.
//!
//! Where things are, by concern:
//! * [`caller`](Caller) — who asks; [`typestate`] — `Sealed → Permitted<Sealed> → Disclosed`;
//! * records: `read` (read, vread, history), `write` (create, update, delete), `search`
//!   (search, `$everything`), `bundle` (transactions and imports);
//! * the audit log: `transparency` (checkpoints, tiles, proofs, verification),
//!   `audit_views` (FHIR AuditEvent, full entries), `accounting` (access report,
//!   accounting of disclosures, recorded disclosures), `export` (SIEM export);
//! * `auth` (sign-in, users), `admin` (status, key eviction).
//!
//! INVARIANT (typestate): rows leave the store [`Sealed`](medvault_store::Sealed); only
//! [`typestate::permit`] makes them `Permitted`, only [`typestate::open`] makes a
//! [`Disclosed`], and renderers accept `Disclosed` alone.
//! INVARIANT (capability): nothing here returns the store or a key; crates above core
//! cannot name a store backend, because core does not re-export one.
#![forbid(unsafe_code)]

mod access;
mod accounting;
mod admin;
mod audit_views;
mod auth;
mod backup;
mod break_glass;
mod bulk;
mod bundle;
mod caller;
mod charts;
mod compliance;
mod destruction;
mod detection;
mod error;
mod export;
mod index_keys;
mod integrity;
mod keys;
mod policy_admin;
mod portal;
mod privacy;
mod read;
mod records;
mod reindex;
mod rights;
mod search;
mod smart;
mod transparency;
pub mod typestate;
mod write;

use std::path::PathBuf;
use std::sync::Arc;

pub use access::Explanation;
pub use admin::Status;
pub use audit_views::AuditEventPage;
pub use auth::{check_password, EnrollmentInfo, LoginChallenge, NewUserInfo, SessionGrant};
pub use backup::{check_dump, restore_store, SnapshotStats, PAGE_IMAGE_TAG};
pub use break_glass::{BreakGlassGrant, BreakGlassView};
pub use bulk::{ExportLevel, ExportOutput, ExportView, EXPORT_TTL_SECS, MY_PATIENTS_GROUP};
pub use bundle::EntryResult;
pub use caller::{Caller, LocalOperator, ANONYMOUS};
pub use charts::MAX_MY_PATIENTS;
pub use compliance::{
    AccountingRequest, CompletionInput, Environment, HhsReport, IncidentAction, NewIncident,
    NoticeSettings, Reminder, SafeguardsReport, SupplyChain, TrainingDashboard, TrainingSettings,
    UNKNOWN_STATE,
};
pub use destruction::{verify_certificate, DestructionView, LegalHoldView, SHRED_ACTION};
pub use detection::{
    event_line, AlertChange, AlertView, DetectResponses, LiveDetection, StepReport,
};
pub use error::VaultError;
pub use index_keys::{IndexKeyStatus, IndexRotationReport};
pub use integrity::RecordsVerdict;
pub use keys::{KeyStatus, KeyVersion, PatientRotation, RotationReport};
pub use medvault_audit::accounting::{Access, DisclosureText, RECIPIENT_KINDS};
pub use medvault_audit::log::{ConsistencyProof, InclusionProof};
pub use medvault_audit::merkle::verify_inclusion;
pub use medvault_audit::tiles::TileRef;
pub use medvault_audit::verify::AuditVerdict;
pub use medvault_audit::{AuditRecord, Outcome};
/// The detection room: its offline scan and scenario generator are pure and hold no PHI
/// of medvault's own, so the binary runs them directly.
pub use medvault_detect as detect;
pub use medvault_fhir::ResourceType;
/// The governance rules (paper records, retention, destruction, incidents).
pub use medvault_governance as governance;
pub use medvault_governance::destruction::{Certificate, DestructionReason};
pub use medvault_governance::retention;
pub use medvault_governance::Incident;
pub use medvault_identity::{
    totp_now, AccountView, AppClientAuth, AppGrant, AppView, ClientAuth, ClientGrant, ClientView,
    Factor, LockoutPolicy, OidcProvider, PasskeyView, Password, SessionPolicy, SessionView, Token,
};
pub use medvault_policy::Relationship;
pub use medvault_store::direct::{write_new_file, AlignedBuf};
pub use medvault_types::{Action, Category, Clock, Operation, Purpose, Role};
pub use policy_admin::{CaseResult, PolicyCase, PolicyVersion};
pub use records::{
    CustodyAct, Dashboard, DueItem, FlagView, FootageReview, HoldView, KeyAct, NewVisitor,
    NewVolume, PaperDestruction, PaperRequest, ScheduleView, Site, VisitorView, VolumeView,
};
pub use rights::{
    NewRightsRequest, NppAcknowledgement, ProcessingConsent, RightsAction, RightsRequest,
};
pub use search::SearchResult;
pub use smart::{AppTokenResponse, AuthorizeError, AuthorizeRequest, Consent};
pub use typestate::Disclosed;
pub use write::{Precondition, Written};

pub use medvault_crypto::hsm::HsmConfig;
pub use medvault_crypto::Passphrase;
use medvault_crypto::{DataKey, KeyCache, Keyring, KeyringSource, MasterKey, RecordCipher};
use medvault_identity::Identity;
use medvault_policy::{PolicyEngine, Query};
use medvault_store::{Committed, Op, Store, StoreError, WriteBatch};
use medvault_types::PatientId;

/// Data-key id for non-patient (directory) resources such as Practitioner.
const DIRECTORY_KEY: &str = "medvault.directory";

/// Where the records live (`storage.backend` in `medvault.toml`).
#[derive(Debug, Clone)]
pub enum Storage {
    /// One SQLite database (WAL) at this path: the embedded default.
    Sqlite(PathBuf),
    /// A PostgreSQL database at this URL (several servers may share it).
    Postgres(String),
}

/// Where the master key comes from (`keys.*` in `medvault.toml`).
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// A key file (0600; refused if others may read it).
    File(PathBuf),
    /// Create a new key file (0600) at this path; refused if it exists (`medvault init`).
    NewFile(PathBuf),
    /// Key files sealed under a passphrase (Argon2id; `keys.provider = "passphrase"`): the
    /// server starts sealed until `medvault unseal` gives the passphrase.
    Passphrase(PathBuf, Passphrase),
    /// Create a new sealed key file at this path (`medvault init --key-provider passphrase`).
    NewPassphrase(PathBuf, Passphrase),
    /// Key objects inside an HSM reached through PKCS#11 (`keys.provider = "pkcs11"`).
    Pkcs11(HsmConfig),
    /// Generate version 1 inside the HSM (`medvault init --pkcs11-module …`); refused if the
    /// token already holds a key of that label.
    NewPkcs11(HsmConfig),
    /// A random key held in memory only, for benchmarks and tests: nothing sealed under it
    /// outlives the process.
    Ephemeral,
}

impl MasterKeySource {
    /// The keyring over this source: version 1 created or generated now for `NewFile` and
    /// `Ephemeral`; key files opened on first need otherwise (version 1 may be retired).
    fn keyring(&self) -> Result<Keyring, VaultError> {
        Ok(match self {
            MasterKeySource::File(p) => Keyring::new(KeyringSource::Files(p.clone()), None),
            MasterKeySource::NewFile(p) => Keyring::new(
                KeyringSource::Files(p.clone()),
                Some(MasterKey::create_file(p)?),
            ),
            MasterKeySource::Passphrase(p, pass) => {
                let ring = Keyring::new(KeyringSource::Sealed(p.clone(), pass.clone()), None);
                // The passphrase is checked now, so a wrong one fails the unseal, not a read.
                if p.exists() {
                    ring.get(1)?;
                }
                ring
            }
            MasterKeySource::NewPassphrase(p, pass) => Keyring::new(
                KeyringSource::Sealed(p.clone(), pass.clone()),
                Some(MasterKey::create_sealed_file(p, pass)?),
            ),
            MasterKeySource::Pkcs11(cfg) => Keyring::new(
                KeyringSource::Pkcs11(Arc::new(medvault_crypto::hsm::Hsm::open(cfg)?)),
                None,
            ),
            MasterKeySource::NewPkcs11(cfg) => {
                let h = medvault_crypto::hsm::Hsm::open(cfg)?;
                if h.find(1)?.is_some() {
                    return Err(VaultError::Duplicate(format!(
                        "the token already holds a key labelled `{}`; choose another label",
                        cfg.key_label
                    )));
                }
                h.generate(1)?;
                Keyring::new(KeyringSource::Pkcs11(Arc::new(h)), None)
            }
            MasterKeySource::Ephemeral => {
                Keyring::new(KeyringSource::Ephemeral, Some(MasterKey::generate()))
            }
        })
    }
}

/// Tunables (from `medvault.toml`).
#[derive(Debug, Clone, Copy)]
pub struct VaultOptions {
    pub session: SessionPolicy,
    pub lockout: LockoutPolicy,
    pub key_cache_capacity: usize,
    pub max_page_size: usize,
    /// How long a search's paging cursor stays valid, in seconds.
    pub cursor_ttl_secs: u64,
    /// Open checkpoints, tiles and proofs (commitments only) to anyone (Cedar
    /// `context.public_transparency`).
    pub public_transparency: bool,
    /// How long a break-the-glass grant lasts, in seconds.
    pub break_glass_secs: i64,
    /// Emergency-mode operation (45 CFR 164.308(a)(7)(ii)(C)), on a restored copy while the
    /// primary is down: records are read (and every read audited, into this copy's own
    /// log), never created, changed or deleted.
    pub read_only: bool,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            session: SessionPolicy::default(),
            lockout: LockoutPolicy::default(),
            key_cache_capacity: 100_000,
            max_page_size: 1000,
            cursor_ttl_secs: 900,
            public_transparency: false,
            break_glass_secs: medvault_governance::DEFAULT_GRANT_SECS,
            read_only: false,
        }
    }
}

type ReachableCache =
    std::collections::HashMap<(Option<Role>, Purpose, bool, Action), access::Reachable>;

/// The gate. See the crate documentation.
pub struct Vault {
    /// The audit log's tiles, checkpoints and proofs (`medvault_audit::log`).
    log: medvault_audit::log::TiledLog,
    store: Arc<dyn Store>,
    /// Every version of the master key (`keys.rs`: rotation re-wraps data keys under a new
    /// one; a data key names the version that wraps it).
    keyring: Keyring,
    /// The blind-index key generations and this server's view of their rotation.
    index: index_keys::IndexKeys,
    /// Authenticates the search cursors the gate hands out.
    cursor_mac: medvault_crypto::ServiceMac,
    /// The categories each (role, purpose of use, training, action) may act on, by how the
    /// chart is reached, as the policy decided.
    reachable: std::sync::Mutex<ReachableCache>,
    keys: Arc<KeyCache>,
    /// The policy set in force and its version (0: built-in).
    policy: std::sync::RwLock<(Arc<PolicyEngine>, i64)>,
    identity: Identity,
    /// Signs certificates of destruction (its own key, never the checkpoint key).
    destruction_signer: medvault_audit::note::NoteSigner,
    clock: Arc<dyn Clock>,
    options: VaultOptions,
    /// What the serving process knows about its transport (for the safeguards report).
    environment: std::sync::RwLock<compliance::Environment>,
    /// Bulk Data export jobs and their sealed files (`bulk.rs`).
    exports: bulk::Exports,
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
    /// Opens the gate over `storage` with the master key from `key`, creating the service
    /// keys (blind-index root, identity, audit signing) on first use. Returns the gate and
    /// the [`LocalOperator`] capability of the process that opened it.
    ///
    /// # Errors
    /// The key file is missing, unreadable or readable by others; the database cannot be
    /// opened or migrated; a stored service key does not unwrap under this master key.
    pub fn open(
        storage: &Storage,
        key: &MasterKeySource,
        clock: Arc<dyn Clock>,
        options: VaultOptions,
    ) -> Result<(Self, LocalOperator), VaultError> {
        let keyring = key.keyring()?;
        let store: Arc<dyn Store> = match storage {
            Storage::Sqlite(path) => medvault_store::SqliteStore::open(path)?,
            Storage::Postgres(url) => medvault_store::PgStore::open(url)?,
        };
        Self::assemble(store, keyring, clock, options)
    }

    /// Opens the gate over a store the caller built: for tests (a failure-injecting store)
    /// and the benchmark. Only crates that depend on `medvault-store` can name one.
    ///
    /// # Errors
    /// As [`Vault::open`].
    pub fn open_with_store(
        store: Arc<dyn Store>,
        key: &MasterKeySource,
        clock: Arc<dyn Clock>,
        options: VaultOptions,
    ) -> Result<(Self, LocalOperator), VaultError> {
        Self::assemble(store, key.keyring()?, clock, options)
    }

    fn assemble(
        store: Arc<dyn Store>,
        keyring: Keyring,
        clock: Arc<dyn Clock>,
        options: VaultOptions,
    ) -> Result<(Self, LocalOperator), VaultError> {
        let current = keys::master_version(&store)?;
        let index = index_keys::IndexKeys::open(&store, &keyring)?;
        let identity_key =
            keys::named_service_key(&store, &keyring, current, "key.identity", "identity")?;
        let dir = directory_key_id();
        if store.patient_key(&dir)?.is_none() {
            let wrapped = keyring
                .get(current)?
                .wrap_data_key(&dir, 1, &DataKey::generate())?;
            match store.commit(WriteBatch {
                ops: vec![Op::PutPatientKey {
                    patient: dir,
                    key_version: 1,
                    master_version: current,
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
        let sig_key = keys::named_service_key(
            &store,
            &keyring,
            current,
            "key.audit_signing",
            "audit-signing",
        )?;
        let origin_bytes = load_or_create_meta(&store, "audit.origin", || {
            Ok(format!("medvault.local/audit/{}", medvault_types::random_uuid()).into_bytes())
        })?;
        let origin = String::from_utf8(origin_bytes)
            .map_err(|_| VaultError::Internal("bad audit origin".into()))?;
        let signer =
            medvault_audit::note::NoteSigner::new(&origin, sig_key.expose_for_derivation());
        let destruction_signer = destruction::signer(
            &destruction::signer_name(&origin),
            &keys::named_service_key(
                &store,
                &keyring,
                current,
                "key.destruction_signing",
                "destruction-signing",
            )?,
        );
        let keys = Arc::new(KeyCache::new(options.key_cache_capacity));
        let heard = keys.clone();
        store.on_key_eviction(Box::new(move |p| heard.evict(p)));
        let vault = Vault {
            environment: std::sync::RwLock::default(),
            exports: bulk::Exports::default(),
            log: medvault_audit::log::TiledLog::new(origin, signer),
            identity: Identity::new(
                store.clone(),
                clock.clone(),
                &identity_key,
                options.session,
                options.lockout,
                Arc::new(medvault_identity::Argon2id::default()),
            )
            .map_err(|e| VaultError::Internal(e.to_string()))?,
            index,
            // Under the identity key, not the blind-index root: cursors outlive its rotation.
            cursor_mac: medvault_crypto::ServiceMac::from_data_key(
                &identity_key,
                "search-cursor/v1",
            ),
            reachable: std::sync::Mutex::new(std::collections::HashMap::new()),
            keys,
            store,
            keyring,
            policy: std::sync::RwLock::new((Arc::new(policy), 0)),
            destruction_signer,
            clock,
            options,
        };
        vault.reload_policy()?;
        vault.record_audit_settings()?;
        let operator = LocalOperator::new();
        vault.reindex_if_needed(&operator)?;
        Ok((vault, operator))
    }

    fn now_instant(&self) -> String {
        medvault_types::fhir_instant(self.clock.now())
    }

    fn record(&self, c: &Caller, action: &str, outcome: Outcome) -> AuditRecord {
        c.record(&*self.clock, action, outcome)
    }

    /// Commits operations with their audit records. Any failure fails the request (law 2).
    fn commit(&self, ops: Vec<Op>, audit: Vec<AuditRecord>) -> Result<Committed, VaultError> {
        let audit = audit.iter().map(AuditRecord::to_leaf).collect();
        Ok(self.store.commit(WriteBatch { ops, audit })?)
    }

    /// Appends audit records alone; failure means the caller gets nothing (fail closed).
    /// The cause is logged here, once; the caller sees only that the log is unavailable.
    fn audit(&self, recs: Vec<AuditRecord>) -> Result<(), VaultError> {
        self.commit(vec![], recs).map(|_| ()).map_err(audit_failed)
    }

    /// Decides one action on records of `category` for `c`, reaching their chart through
    /// `relationship`.
    fn decide(
        &self,
        c: &Caller,
        action: Action,
        category: Category,
        relationship: medvault_policy::Relationship,
    ) -> medvault_policy::Decision {
        self.policy().decide(Self::records_query(
            c,
            action,
            category,
            relationship,
            self.options.public_transparency,
        ))
    }

    /// A service client's scopes name resource types; the policy sees categories. A type
    /// its scopes do not name is refused here, and the refusal recorded.
    ///
    /// # Errors
    /// `Refused` for a type outside the client's scopes.
    pub(crate) fn scope_check(
        &self,
        c: &Caller,
        rt: medvault_fhir::ResourceType,
        action: Action,
    ) -> Result<(), VaultError> {
        let Some(s) = c.client_scopes() else {
            return Ok(());
        };
        let write = matches!(action, Action::Create | Action::Update | Action::Delete);
        if s.allows(rt.as_str(), write) {
            return Ok(());
        }
        let mut rec = self.record(c, action.as_str(), Outcome::Denied);
        rec.resource = Some(rt.as_str().to_owned());
        rec.detail = Some("outside the client's scopes".into());
        self.audit(vec![rec])?;
        Err(VaultError::Refused {
            action: match action {
                Action::Read => "read",
                Action::Search => "search",
                Action::Create => "create",
                Action::Update => "update",
                Action::Delete => "delete",
            },
            rtype: match c.app() {
                Some(_) => format!("{rt} through this app (outside its scopes)"),
                None => rt.as_str().to_owned(),
            },
        })
    }

    /// Decides an operation of the gate for `c` by policy, recording nothing: for the two
    /// operations whose record is themselves or would alter what they examine — signing a
    /// checkpoint (the signed checkpoint is its record) and verifying the log (verification
    /// must leave the evidence as it found it).
    ///
    /// # Errors
    /// Denied: `Forbidden` for a signed-in caller, `Unauthenticated` for an anonymous one.
    fn decide_operation(&self, c: &Caller, op: Operation) -> medvault_policy::Decision {
        self.policy().decide(Query::operation(
            c.asker(),
            op,
            c.purpose,
            self.options.public_transparency,
        ))
    }

    fn decide_unrecorded(&self, c: &Caller, op: Operation) -> Result<(), VaultError> {
        match self.decide_operation(c, op).allowed() {
            true => Ok(()),
            false => Err(refusal(c)),
        }
    }

    /// Decides an operation of the gate for `c` by policy, and records a named caller's
    /// denial at once. Returns the record of the permitted request for the caller to commit
    /// with its effect (or alone), or `None` for an anonymous caller, who is never recorded
    /// (nothing to name, and anyone could grow the log).
    ///
    /// # Errors
    /// Denied: `Forbidden` for a signed-in caller, `Unauthenticated` for an anonymous one;
    /// `AuditUnavailable` if the denial cannot be recorded.
    fn operate(
        &self,
        c: &Caller,
        op: Operation,
        patient: Option<&str>,
    ) -> Result<Option<AuditRecord>, VaultError> {
        let decided = self.decide_unrecorded(c, op);
        if c.principal().is_none() {
            return decided.map(|()| None);
        }
        let mut rec = self.record(c, op.as_str(), Outcome::Success);
        rec.patient = patient.map(str::to_owned);
        if let Err(e) = decided {
            rec.outcome = Outcome::Denied;
            self.audit(vec![rec])?;
            return Err(e);
        }
        if self.options.read_only && op.changes_charts() {
            rec.outcome = Outcome::Denied;
            rec.detail = Some("emergency read-only mode".into());
            self.audit(vec![rec])?;
            return Err(VaultError::ReadOnly);
        }
        if op.needs_step_up() && !self.stepped_up(c) {
            rec.outcome = Outcome::Denied;
            rec.detail = Some("step-up required".into());
            self.audit(vec![rec])?;
            return Err(VaultError::StepUpRequired);
        }
        Ok(Some(rec))
    }

    /// Decides an operation by policy into a permission ([`typestate::Permitted`]), and
    /// records a named caller's request — allowed or denied — at once: for reports that
    /// open sealed text under that permission.
    ///
    /// # Errors
    /// As [`Vault::operate`].
    fn permit_operation(
        &self,
        c: &Caller,
        op: Operation,
        patient: Option<&str>,
    ) -> Result<typestate::Permitted<Operation>, VaultError> {
        // About one chart: the caller's relationship to it is part of the decision (a
        // patient's own access report).
        let d = match patient.and_then(|p| PatientId::new(p).ok()) {
            Some(pid) if c.principal().is_some() => {
                let rel = self.write_relationship(c, &[], Some(&pid))?;
                let mut q =
                    Query::operation(c.asker(), op, c.purpose, self.options.public_transparency);
                q.relationship = rel;
                self.policy().decide(q)
            }
            _ => self.decide_operation(c, op),
        };
        let mut rec = self.record(c, op.as_str(), Outcome::Success);
        rec.patient = patient.map(str::to_owned);
        let permitted = typestate::permit(&d, op, &mut rec);
        if c.principal().is_some() {
            self.audit(vec![rec])?;
        }
        permitted.map_err(|_| refusal(c))
    }

    /// The newest data key of a chart (what new records are sealed under).
    fn cipher_for(&self, key_id: &PatientId) -> Result<Arc<RecordCipher>, VaultError> {
        Ok(self.newest_cipher(key_id)?.1)
    }

    /// The newest data key of a chart and its version. A cached key another process has
    /// since superseded stays usable: what it seals names its version, and old versions
    /// stay stored.
    pub(crate) fn newest_cipher(
        &self,
        key_id: &PatientId,
    ) -> Result<(u32, Arc<RecordCipher>), VaultError> {
        if let Some(c) = self.keys.newest(key_id) {
            return Ok(c);
        }
        let wk = self
            .store
            .patient_key(key_id)?
            // No key: the chart was destroyed (its rows are on their way out).
            .ok_or(VaultError::NotFound)?;
        let c = self.open_data_key(key_id, &wk)?;
        self.keys
            .insert(key_id.clone(), wk.key_version, c.clone(), true);
        Ok((wk.key_version, c))
    }

    /// Unwraps one stored data key of a chart under the master key version that wraps it.
    pub(crate) fn open_data_key(
        &self,
        key_id: &PatientId,
        wk: &medvault_store::WrappedKey,
    ) -> Result<Arc<RecordCipher>, VaultError> {
        let dk = self.keyring.get(wk.master_version)?.unwrap_data_key(
            key_id,
            wk.key_version,
            &wk.wrapped,
        )?;
        Ok(Arc::new(RecordCipher::new(&dk)))
    }

    /// The data key of `version` of a chart (what a stored version names).
    pub(crate) fn cipher_at(
        &self,
        key_id: &PatientId,
        version: u32,
    ) -> Result<Arc<RecordCipher>, VaultError> {
        if let Some(c) = self.keys.get(key_id, version) {
            return Ok(c);
        }
        let wk = self
            .store
            .patient_keys(key_id)?
            .into_iter()
            .find(|k| k.key_version == version)
            .ok_or(VaultError::NotFound)?;
        let c = self.open_data_key(key_id, &wk)?;
        self.keys.insert(key_id.clone(), version, c.clone(), false);
        Ok(c)
    }
}

/// The error for an operation the policy denied `c`: sign in (anonymous), or forbidden.
fn refusal(c: &Caller) -> VaultError {
    match c.principal() {
        None => VaultError::Unauthenticated,
        Some(_) => VaultError::Forbidden { withheld: vec![] },
    }
}

/// Logs the cause of a failed audit append once, here, and turns it into the error the
/// caller sees (law 2: no record, no response).
pub(crate) fn audit_failed(e: VaultError) -> VaultError {
    match e {
        VaultError::Internal(m) | VaultError::Unavailable(m) => {
            tracing::error!(cause = %m, "audit append failed; request refused");
            VaultError::AuditUnavailable
        }
        other => other,
    }
}

/// The file of master key `version` beside the configured one (`master.key`,
/// `master.v2.key`, …): what a backup carries and an operator deletes once retired.
pub fn master_key_version_path(base: &std::path::Path, version: u32) -> PathBuf {
    medvault_crypto::version_path(base, version)
}

/// FHIR `instant` text (UTC, milliseconds) of a Unix time in seconds; the epoch for a time
/// out of range.
pub fn fhir_instant_secs(secs: i64) -> String {
    medvault_types::fhir_instant(
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
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
