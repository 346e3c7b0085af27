// `typestate::permit` takes the policy engine's `Decision`, whose fields are private to
// `medvault-policy`: code in core cannot write itself an "allowed".
#[path = "../../src/typestate.rs"]
#[allow(dead_code)]
mod typestate;

mod records {
    use medvault_audit::{AuditRecord, Outcome};
    use medvault_policy::Decision;
    use medvault_store::Sealed;

    pub fn mint(row: Sealed) {
        let allowed = Decision {
            allowed: true,
            policies: vec![],
        };
        let mut rec = AuditRecord::new("read", "x", Outcome::Success, String::new(), "r");
        let _ = crate::typestate::permit(&allowed, row, &mut rec);
    }
}

fn main() {
    let _ = records::mint;
}
