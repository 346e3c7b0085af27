//! Records when this binary was built (`MEDVAULT_BUILD_UNIX`, Unix seconds) for
//! `medvault status` and the safeguards report: `SOURCE_DATE_EPOCH` when set (reproducible
//! builds), else the time of the build.

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(now);
    println!("cargo:rustc-env=MEDVAULT_BUILD_UNIX={built}");
}

#[expect(
    clippy::disallowed_methods,
    reason = "the build's own time, read once by the build script"
)]
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
