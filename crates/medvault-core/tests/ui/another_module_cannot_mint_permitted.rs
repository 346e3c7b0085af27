// Core's own `typestate` module, built beside another module of the same crate: that module
// cannot construct a `Permitted` (private fields) or a `Disclosed`.
#[path = "../../src/typestate.rs"]
#[allow(dead_code)]
mod typestate;

mod records {
    use crate::typestate::{Disclosed, Permitted};
    use medvault_store::Sealed;

    pub fn mint(row: Sealed) -> Permitted<Sealed> {
        Permitted { inner: row }
    }

    pub fn disclose(row: Permitted<Sealed>) -> Disclosed {
        let _ = row;
        Disclosed {
            rtype: medvault_fhir::ResourceType::parse("Patient").unwrap(),
            id: String::new(),
            version: 1,
            last_updated: String::new(),
            deleted: false,
            json: None,
            category: medvault_types::Category::Demographics,
            patient: None,
        }
    }
}

fn main() {
    let _ = records::mint;
    let _ = records::disclose;
}
