//! TOTP (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, 30-second steps, so any
//! authenticator app works. The HMAC comes from RustCrypto; only the truncation is here.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub const STEP_SECS: i64 = 30;
pub const DIGITS: u32 = 6;

/// A TOTP seed (20 random bytes).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TotpSecret(Vec<u8>);

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret([REDACTED])")
    }
}

impl TotpSecret {
    pub fn generate() -> Self {
        let mut b = vec![0u8; 20];
        rand::rngs::OsRng.fill_bytes(&mut b);
        TotpSecret(b)
    }
    pub fn from_bytes(b: Vec<u8>) -> Self {
        TotpSecret(b)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
    /// Base32 (RFC 4648, no padding), as authenticator apps expect.
    pub fn base32(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }
    /// The `otpauth://` enrollment URI.
    pub fn uri(&self, issuer: &str, account: &str) -> String {
        format!(
            "otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
            self.base32()
        )
    }
    /// The step (in [now-1, now+1]) whose code equals `code`, if any.
    pub fn matching_step(&self, code: &str, now_unix: i64) -> Option<i64> {
        if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let step = now_unix.div_euclid(STEP_SECS);
        [step, step - 1, step + 1].into_iter().find(|s| {
            let expected = totp_code(&self.0, *s);
            constant_time_eq(expected.as_bytes(), code.as_bytes())
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The current RFC 6238 code for a base32 secret at `unix_time` (seconds): what any
/// authenticator app shows (the `medvault totp-code` helper, for scripts and demos).
/// `None` if the secret is not base32.
pub fn totp_now(secret_base32: &str, unix_time: i64) -> Option<String> {
    let clean: String = secret_base32
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .collect::<String>()
        .to_uppercase();
    let bytes = data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).ok()?;
    Some(totp_code(&bytes, unix_time.div_euclid(STEP_SECS)))
}

/// The 6-digit code of `secret` at time step `step`.
pub fn totp_code(secret: &[u8], step: i64) -> String {
    let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = usize::from(h.last().copied().unwrap_or(0) & 0x0f);
    let word = h
        .get(offset..offset + 4)
        .and_then(|w| <[u8; 4]>::try_from(w).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0);
    let code = (word & 0x7fff_ffff) % 10u32.pow(DIGITS);
    format!("{code:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", 8 digits -> last 6 digits.
        let seed = b"12345678901234567890";
        assert_eq!(totp_code(seed, 59 / 30), "287082");
        assert_eq!(totp_code(seed, 1_111_111_109 / 30), "081804");
        assert_eq!(totp_code(seed, 1_234_567_890 / 30), "005924");
        assert_eq!(totp_code(seed, 2_000_000_000 / 30), "279037");
    }

    #[test]
    fn window_and_format() {
        let s = TotpSecret::generate();
        let now = 1_700_000_000;
        let c = totp_code(s.bytes(), now / 30);
        assert_eq!(s.matching_step(&c, now), Some(now / 30));
        assert_eq!(s.matching_step(&c, now + 30), Some(now / 30));
        assert_eq!(s.matching_step(&c, now + 90), None);
        assert_eq!(s.matching_step("12345", now), None);
        assert!(s
            .uri("medvault", "ann")
            .starts_with("otpauth://totp/medvault:ann?secret="));
    }
}
