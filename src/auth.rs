//! API key -> tenant lookup.
//!
//! Keys are configured as `sha256:<hex>` digests (or, for development, in
//! plaintext, which is digested at load time), so the running gateway holds
//! no tenant key. A presented key is digested and looked up by digest: the
//! lookup compares digests, never the key, so its timing says nothing useful
//! about any stored key.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// A SHA-256 digest of an API key.
pub type KeyDigest = [u8; 32];

/// Digests a presented or configured plaintext key.
pub fn digest_key(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The `sha256:<hex>` form `runestone hash-key` prints and the config takes.
pub fn format_digest(digest: &KeyDigest) -> String {
    format!("sha256:{}", hex::encode(digest))
}

/// Parses a configured key: `sha256:<64 hex digits>` is a digest, anything
/// else is a plaintext key. Returns `None` for a malformed digest.
pub fn parse_configured_key(key: &str) -> Option<KeyDigest> {
    match key.strip_prefix("sha256:") {
        Some(hex_digest) => {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hex_digest.trim(), &mut digest).ok()?;
            Some(digest)
        }
        None => Some(digest_key(key)),
    }
}

/// Reads the key a client presented: `Authorization: Bearer KEY` or
/// `x-api-key: KEY`. Returns `None` when neither is there or is usable.
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Option<&'a str> {
    if let Some(value) = authorization {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let key = key.trim();
        return (!key.is_empty()).then_some(key);
    }
    let key = std::str::from_utf8(x_api_key?).ok()?.trim();
    (!key.is_empty()).then_some(key)
}

/// The compiled key index: digest -> index of the tenant in the config.
#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    by_digest: HashMap<KeyDigest, usize>,
}

impl KeyIndex {
    /// Adds a key for tenant `tenant`. Returns the tenant that already had
    /// this key, if any (the config validator reports that as an error).
    pub fn insert(&mut self, digest: KeyDigest, tenant: usize) -> Option<usize> {
        match self.by_digest.get(&digest) {
            Some(&existing) => Some(existing),
            None => {
                self.by_digest.insert(digest, tenant);
                None
            }
        }
    }

    /// The tenant a presented key belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<usize> {
        self.by_digest.get(&digest_key(presented)).copied()
    }

    /// Number of keys known.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Limits failed authentications per client address (GCRA over a minute):
/// an address past its budget is refused without its key being checked,
/// which slows key guessing and keeps a flood of bad keys cheap.
#[derive(Debug)]
pub struct FailureThrottle {
    per_minute: u32,
    /// Theoretical arrival time (ms) per address.
    state: Mutex<HashMap<IpAddr, f64>>,
}

/// Addresses remembered before idle ones are swept out.
const THROTTLE_SWEEP_AT: usize = 10_000;

impl FailureThrottle {
    /// A throttle allowing `per_minute` failures per address (0: off).
    pub fn new(per_minute: u32) -> Self {
        FailureThrottle {
            per_minute,
            state: Mutex::default(),
        }
    }

    /// `Err(retry_after_ms)` when `ip` has used up its failures.
    pub fn check(&self, ip: IpAddr, now_ms: f64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&tat) = state.get(&ip) else {
            return Ok(());
        };
        // Would one more failure go past the minute's budget?
        let over = tat.max(now_ms) + self.interval() - now_ms - crate::limits::WINDOW_MS;
        if over > 1e-6 {
            Err(over.ceil() as u64)
        } else {
            Ok(())
        }
    }

    /// Counts one failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now_ms: f64) {
        if self.per_minute == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.len() >= THROTTLE_SWEEP_AT {
            state.retain(|_, tat| *tat > now_ms);
        }
        let interval = self.interval();
        let tat = state.entry(ip).or_insert(now_ms);
        *tat = tat.max(now_ms) + interval;
    }

    fn interval(&self) -> f64 {
        crate::limits::WINDOW_MS / f64::from(self.per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_and_plaintext_forms_find_the_same_tenant() {
        let mut index = KeyIndex::default();
        let digest = format_digest(&digest_key("sk-acme-1"));
        assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64);
        assert_eq!(
            index.insert(parse_configured_key(&digest).unwrap(), 0),
            None
        );
        assert_eq!(
            index.insert(parse_configured_key("sk-beta-1").unwrap(), 1),
            None
        );
        assert_eq!(index.authenticate("sk-acme-1"), Some(0));
        assert_eq!(index.authenticate("sk-beta-1"), Some(1));
        assert_eq!(index.authenticate("sk-acme-2"), None);
        assert_eq!(
            index.authenticate(&digest),
            None,
            "the digest itself is not a key"
        );
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let mut index = KeyIndex::default();
        index.insert(digest_key("k"), 0);
        assert_eq!(index.insert(digest_key("k"), 3), Some(0));
    }

    #[test]
    fn malformed_digests_are_rejected() {
        assert!(parse_configured_key("sha256:zz").is_none());
        assert!(parse_configured_key("sha256:abcd").is_none());
    }

    #[test]
    fn throttles_an_address_after_its_failures() {
        let throttle = FailureThrottle::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(throttle.check(a, 0.0).is_ok());
            throttle.record_failure(a, 0.0);
        }
        assert_eq!(
            throttle.check(a, 0.0),
            Err(20_000),
            "one failure's worth of the minute"
        );
        assert!(
            throttle.check(b, 0.0).is_ok(),
            "other addresses are not affected"
        );
        assert!(throttle.check(a, 20_000.0).is_ok(), "the budget refills");
        assert!(FailureThrottle::new(0).check(a, 0.0).is_ok());
    }

    #[test]
    fn reads_bearer_and_x_api_key() {
        assert_eq!(presented_key(Some(b"Bearer sk-1"), None), Some("sk-1"));
        assert_eq!(presented_key(Some(b"bearer   sk-1 "), None), Some("sk-1"));
        assert_eq!(presented_key(None, Some(b"sk-2")), Some("sk-2"));
        assert_eq!(presented_key(Some(b"Basic abc"), Some(b"sk-2")), None);
        assert_eq!(presented_key(Some(b"Bearer "), None), None);
        assert_eq!(presented_key(None, None), None);
        assert_eq!(presented_key(Some(b"Bearer \xff"), None), None);
    }
}
