// A handler holds the gate (`Vault`), never the store behind it: core names no store
// backend, and the gate's store is a private field.
use medvault_core::Vault;

fn handler(vault: &Vault) {
    let _store = &vault.store;
}

fn backend() {
    let _ = medvault_core::SqliteStore::open;
}

fn main() {
    let _ = handler;
    let _ = backend;
}
