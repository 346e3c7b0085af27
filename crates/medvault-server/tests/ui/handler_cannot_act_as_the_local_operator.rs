// The command line and the server's own background work act through `LocalOperator`, which
// only opening the gate hands out; a handler, given only the gate, cannot make one and so
// cannot make itself an auditor.
use medvault_core::{Caller, LocalOperator, Role};

fn auditor() -> Caller {
    let op = LocalOperator { _private: () };
    Caller::cli(&op, Role::Auditor)
}

fn main() {
    let _ = auditor;
}
