// A handler gets callers only from authentication (or the anonymous caller): it cannot
// build a signed-in caller itself.
use medvault_core::Caller;

fn signed_in(who: Caller) -> Caller {
    Caller::new(who.principal().cloned().unwrap(), None, None, String::new())
}

fn main() {
    let _ = signed_in;
}
