//! The caller: who is asking (a signed-in user in a role, the local operator, the server's
//! own background work, or an anonymous requester), why (purpose of use), and from where.
//! Every public method of the gate takes one.

use medvault_audit::{AuditRecord, Outcome};
use medvault_identity::Principal;
use medvault_policy::Asker;
use medvault_types::{Clock, Purpose, Role, Username};

/// Who is asking, why, and from where.
#[derive(Debug, Clone)]
pub struct Caller {
    who: Option<Principal>,
    pub purpose: Purpose,
    pub source: Option<String>,
    pub request_id: String,
    assurance: Assurance,
}

/// How the caller proved who they are, as step-up needs to know.
#[derive(Debug, Clone)]
pub(crate) enum Assurance {
    /// Nobody signed in.
    None,
    /// The local operator or the server itself: proven by holding the data directory and
    /// its master key, which no second factor adds to.
    Local,
    /// A signed-in session: its token hash and when a second factor was last verified.
    Session { token_hash: Vec<u8>, mfa_at: i64 },
    /// A service client's access token: what its SMART scopes grant.
    Client(ClientScopes),
    /// A SMART app's access token, acting for the signed-in user: what its scopes grant,
    /// narrowing (never widening) the user's policy, and the chart a `patient/` launch
    /// limits it to.
    App(AppContext),
}

/// A SMART app acting for a user.
#[derive(Debug, Clone)]
pub(crate) struct AppContext {
    pub scopes: ClientScopes,
    /// The only chart the token reaches (`patient/` scopes with a launch context).
    pub patient: Option<medvault_types::PatientId>,
    pub client_id: String,
}

/// What a service client's scopes grant: categories for the policy, and the resource
/// types (`None`: every type) for the gate's own check, read and write.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientScopes {
    pub read: medvault_policy::CategorySet,
    pub write: medvault_policy::CategorySet,
    pub read_types: Option<Vec<String>>,
    pub write_types: Option<Vec<String>>,
}

impl ClientScopes {
    fn from_scopes(scopes: &str) -> Self {
        let mut out = ClientScopes {
            read_types: Some(vec![]),
            write_types: Some(vec![]),
            ..Default::default()
        };
        for (_, sc) in medvault_identity::parse_scopes(scopes).unwrap_or_default() {
            let cats: Vec<medvault_types::Category> = match &sc.rtype {
                None => medvault_types::Category::ALL.to_vec(),
                Some(t) => medvault_fhir::ResourceType::parse(t)
                    .map(|rt| medvault_fhir::categories_of_type(rt).to_vec())
                    .unwrap_or_default(),
            };
            let grant = |set: &mut medvault_policy::CategorySet,
                         types: &mut Option<Vec<String>>| {
                for c in &cats {
                    set.insert(*c);
                }
                match (&sc.rtype, types.as_mut()) {
                    (None, _) => *types = None,
                    (Some(t), Some(list)) => list.push(t.clone()),
                    (Some(_), None) => {}
                }
            };
            if sc.read {
                grant(&mut out.read, &mut out.read_types);
            }
            if sc.write {
                grant(&mut out.write, &mut out.write_types);
            }
        }
        out
    }

    /// Whether the scopes reach resources of type `rt` (read or write).
    pub fn allows(&self, rt: &str, write: bool) -> bool {
        let types = if write {
            &self.write_types
        } else {
            &self.read_types
        };
        types.as_ref().is_none_or(|t| t.iter().any(|x| x == rt))
    }

    /// Whether every type is readable (`system/*.r…`).
    pub fn reads_everything(&self) -> bool {
        self.read_types.is_none()
    }
}

/// Actor name recorded for an anonymous caller.
pub const ANONYMOUS: &str = "anonymous";

/// The local operator's capability: proof that this process opened the gate itself, from
/// the data directory and its master key. Handed out only by [`Vault::open`](crate::Vault::open)
/// (and `open_with_store`), it is what the command line acts through ([`Caller::cli`]) and
/// what the server's own background work acts through ([`Caller::system`]). Code that is
/// only handed the `Vault` — an HTTP handler — cannot make one, so it cannot make a caller
/// that did not sign in.
#[derive(Debug)]
pub struct LocalOperator {
    _private: (),
}

impl LocalOperator {
    pub(crate) fn new() -> Self {
        LocalOperator { _private: () }
    }
}

impl Caller {
    /// A signed-in user, with a declared purpose of use (else their role's default): made
    /// only by authentication ([`Vault::authenticate`](crate::Vault::authenticate)).
    pub(crate) fn new(
        principal: Principal,
        purpose: Option<Purpose>,
        source: Option<String>,
        request_id: String,
    ) -> Self {
        let purpose = purpose.unwrap_or(principal.role.default_purpose());
        Caller {
            who: Some(principal),
            purpose,
            source,
            request_id,
            assurance: Assurance::Local,
        }
    }

    /// A caller signed in through a session.
    pub(crate) fn from_session(
        session: medvault_identity::SessionInfo,
        purpose: Option<Purpose>,
        source: Option<String>,
        request_id: String,
    ) -> Self {
        let mut c = Caller::new(session.principal, purpose, source, request_id);
        c.assurance = match (&session.scopes, &session.app) {
            (_, Some(app)) => {
                // The resource scopes as system scopes name the same types; a token
                // holding patient/ scopes and no user/ scope is held to its launch chart.
                let parsed: Vec<medvault_identity::AppScope> = app
                    .scopes
                    .split_whitespace()
                    .filter_map(|x| medvault_identity::AppScope::parse(x).ok())
                    .collect();
                let as_system: Vec<String> = parsed.iter().map(|a| a.as_system()).collect();
                let patient_only =
                    !parsed.is_empty() && parsed.iter().all(|a| a.context == "patient");
                let mut scopes = ClientScopes::from_scopes(&as_system.join(" "));
                scopes.write = medvault_policy::CategorySet::default();
                scopes.write_types = Some(vec![]);
                Assurance::App(AppContext {
                    scopes,
                    // A patient/ token without a launch chart reaches none.
                    patient: patient_only.then(|| {
                        app.patient
                            .as_deref()
                            .and_then(|p| medvault_types::PatientId::new(p).ok())
                            .unwrap_or_else(no_chart)
                    }),
                    client_id: app.client_id.clone(),
                })
            }
            (Some(scopes), None) => Assurance::Client(ClientScopes::from_scopes(scopes)),
            (None, None) => Assurance::Session {
                token_hash: session.token_hash,
                mfa_at: session.mfa_at,
            },
        };
        c
    }

    pub(crate) fn assurance(&self) -> &Assurance {
        &self.assurance
    }

    /// A request without credentials (signing in, or a public transparency read). Policies
    /// see it as the Cedar principal `Anonymous`; it is never recorded by name.
    pub fn anonymous(source: Option<String>, request_id: String) -> Self {
        Caller {
            who: None,
            purpose: Purpose::Operations,
            source,
            request_id,
            assurance: Assurance::None,
        }
    }

    /// The local command-line principal (`cli.<os user>`), acting in `role`.
    pub fn cli(_operator: &LocalOperator, role: Role) -> Self {
        let who: String = std::env::var("USER")
            .unwrap_or_else(|_| "operator".into())
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .take(40)
            .collect();
        let name =
            Username::new(&format!("cli.{who}")).unwrap_or_else(|_| constant("cli.operator"));
        Caller::new(
            Principal {
                username: name,
                role,
                practitioner: None,
                training_current: true,
            },
            None,
            Some("local".into()),
            medvault_types::random_uuid(),
        )
    }

    /// The server's own background work (`system.<task>`, role `system`), such as signing a
    /// checkpoint of the audit log every second.
    pub fn system(_operator: &LocalOperator, task: &str) -> Self {
        let name =
            Username::new(&format!("system.{task}")).unwrap_or_else(|_| constant("system.server"));
        Caller::new(
            Principal {
                username: name,
                role: Role::System,
                practitioner: None,
                training_current: true,
            },
            None,
            Some("local".into()),
            medvault_types::random_uuid(),
        )
    }

    /// The signed-in principal, if any.
    pub fn principal(&self) -> Option<&Principal> {
        self.who.as_ref()
    }

    /// The caller's role, if signed in.
    pub fn role(&self) -> Option<Role> {
        self.who.as_ref().map(|p| p.role)
    }

    /// The name recorded in the audit log: the user name, or `anonymous`.
    pub fn actor(&self) -> &str {
        self.who
            .as_ref()
            .map(|p| p.username.as_str())
            .unwrap_or(ANONYMOUS)
    }

    /// The Cedar principal.
    pub(crate) fn asker(&self) -> Asker {
        if let Assurance::Client(s) = &self.assurance {
            return Asker::Client {
                read: s.read,
                write: s.write,
            };
        }
        if let (Assurance::App(a), Some(p)) = (&self.assurance, &self.who) {
            return Asker::App {
                role: p.role,
                read: a.scopes.read,
            };
        }
        match &self.who {
            Some(p) => Asker::User(p.role),
            None => Asker::Anonymous,
        }
    }

    /// A service client's scopes, or a SMART app's, if the caller is one.
    pub(crate) fn client_scopes(&self) -> Option<&ClientScopes> {
        match &self.assurance {
            Assurance::Client(s) => Some(s),
            Assurance::App(a) => Some(&a.scopes),
            _ => None,
        }
    }

    /// The SMART app the caller acts through, if any.
    pub(crate) fn app(&self) -> Option<&AppContext> {
        match &self.assurance {
            Assurance::App(a) => Some(a),
            _ => None,
        }
    }

    /// The only chart the caller may reach, for a SMART app launched with a patient.
    pub(crate) fn launch_patient(&self) -> Option<&medvault_types::PatientId> {
        self.app().and_then(|a| a.patient.as_ref())
    }

    /// Whether a record in `patient`'s chart (or in none) is outside the caller's launch
    /// context.
    pub(crate) fn outside_launch(&self, patient: Option<&medvault_types::PatientId>) -> bool {
        match (self.launch_patient(), patient) {
            (Some(l), Some(p)) => l != p,
            _ => false,
        }
    }

    /// A fresh audit record of `action` by this caller, stamped now.
    pub(crate) fn record(&self, clock: &dyn Clock, action: &str, outcome: Outcome) -> AuditRecord {
        let now = medvault_types::fhir_instant(clock.now());
        let mut r = AuditRecord::new(action, self.actor(), outcome, now, &self.request_id);
        r.role = self.role().map(|r| r.as_str().to_owned());
        r.purpose = Some(self.purpose.as_str().to_owned());
        r.source = self.source.clone();
        r.app = self.app().map(|a| a.client_id.clone());
        r
    }
}

/// A constant user name, known valid.
fn constant(name: &str) -> Username {
    Username::new(name).unwrap_or_else(|_| unreachable_username())
}

#[expect(
    clippy::panic,
    reason = "a constant valid user name cannot fail validation"
)]
fn unreachable_username() -> Username {
    panic!("constant user name rejected")
}

/// The id of no chart: what a `patient/` token without a launch chart is held to.
fn no_chart() -> medvault_types::PatientId {
    medvault_types::PatientId::new("no-launch-context")
        .unwrap_or_else(|_| crate::directory_key_id())
}
