// Renderers accept `Disclosed` alone, and only the gate makes one (after a policy decision
// recorded in the audit log): a handler cannot build one from its parts.
use medvault_core::{Category, Disclosed};

fn forge(rtype: medvault_fhir::ResourceType) -> Disclosed {
    Disclosed {
        rtype,
        id: String::new(),
        version: 1,
        last_updated: String::new(),
        deleted: false,
        json: None,
        category: Category::Vitals,
        patient: None,
    }
}

fn main() {
    let _ = forge;
}
