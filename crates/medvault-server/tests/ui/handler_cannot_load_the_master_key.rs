// A handler may say where the master key is (to open the gate), but cannot load it: core
// names no key type and keeps the loading to itself.
use medvault_core::MasterKeySource;

fn steal(path: std::path::PathBuf) {
    let _key = MasterKeySource::File(path).keyring();
}

fn name_it() {
    let _ = medvault_core::MasterKey::generate;
}

fn main() {
    let _ = steal;
    let _ = name_it;
}
