//! Identifiers that must not be guessable: request, job and lease ids.
//!
//! A job id is all a tenant needs to read a job's result (with its key), and
//! a request id is echoed to clients and sent to providers, so both come
//! from the thread-local CSPRNG (ChaCha, seeded from the OS) with 96 bits
//! or more, never from a fast non-cryptographic generator.

use rand::Rng;

/// `prefix` followed by 24 lowercase hex digits (96 random bits).
pub fn random_id(prefix: &str) -> String {
    let bits: u128 = rand::thread_rng().gen::<u128>() >> 32;
    format!("{prefix}{bits:024x}")
}

/// 32 lowercase hex digits (128 random bits), for ids that are not shown.
pub fn random_token() -> String {
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_96_random_bits_behind_their_prefix() {
        let a = random_id("req_");
        assert!(a.starts_with("req_") && a.len() == 4 + 24, "{a}");
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| random_id("job_")).collect();
        assert_eq!(ids.len(), 1000);
        assert_eq!(random_token().len(), 32);
    }
}
