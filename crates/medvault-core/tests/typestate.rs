//! The typestate, checked by the compiler from inside core: another module of the crate
//! cannot mint a `Permitted` (its constructor is private to `typestate`), nor forge the
//! policy engine's `Decision` that `typestate::permit` requires.

#[test]
fn only_the_decision_makes_a_permission() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
