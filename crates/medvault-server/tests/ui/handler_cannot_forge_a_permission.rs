// Opening a record needs a `Permitted<Sealed>`, which only the policy decision makes; a
// handler can neither build a permission nor a sealed row that claims to come from storage.
use medvault_core::typestate::Permitted;
use medvault_store::{Sealed, VersionRow};

fn forge(row: VersionRow) -> Permitted<Sealed> {
    let sealed = Sealed(row);
    Permitted { inner: sealed }
}

fn main() {
    let _ = forge;
}
