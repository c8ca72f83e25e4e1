//! API key -> tenant lookup.
//!
//! Keys are configured as `sha256:<hex>` digests (or, for development, in
//! plaintext, which is digested at load time), so the running gateway holds
//! no tenant key. A presented key is digested and looked up by digest: the
//! lookup compares digests, never the key, so its timing says nothing useful
//! about any stored key.

pub use crate::config::keys::{digest_key, format_digest, parse_configured_key, KeyDigest};
use crate::config::{ForwardedHeader, TenantSettings};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The key a client presented, read from every `Authorization: Bearer KEY`
/// and `x-api-key: KEY` header it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No usable credential (none sent, another scheme, not UTF-8, empty).
    Missing,
    /// One key, however many headers carried it.
    Key(&'a str),
    /// Two credentials that disagree: refused, never resolved by picking one
    /// (a proxy in front might have checked the other).
    Conflicting,
}

/// Reads the key a client presented from its `Authorization` and
/// `x-api-key` header values (every one it sent).
pub fn presented_key<'a>(
    authorization: impl IntoIterator<Item = &'a [u8]>,
    x_api_key: impl IntoIterator<Item = &'a [u8]>,
) -> Presented<'a> {
    let bearer = |value: &'a [u8]| {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (scheme, key) = value.split_once(' ')?;
        let key = key.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
    };
    let plain = |value: &'a [u8]| {
        let key = std::str::from_utf8(value).ok()?.trim();
        (!key.is_empty()).then_some(key)
    };
    let mut found: Option<&'a str> = None;
    let mut unusable = false;
    let values = authorization
        .into_iter()
        .map(|v| (v, true))
        .chain(x_api_key.into_iter().map(|v| (v, false)));
    for (value, is_authorization) in values {
        let key = if is_authorization {
            bearer(value)
        } else {
            plain(value)
        };
        match (key, found) {
            (None, _) => unusable = true,
            (Some(key), None) => found = Some(key),
            (Some(key), Some(seen)) if key != seen => return Presented::Conflicting,
            (Some(_), Some(_)) => {}
        }
    }
    match found {
        // A usable key beside an unusable credential: the two disagree.
        Some(_) if unusable => Presented::Conflicting,
        Some(key) => Presented::Key(key),
        None => Presented::Missing,
    }
}

/// The compiled key index: digest -> index of the tenant in the config.
#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    /// foldhash: read on every request, built from the config only.
    by_digest: foldhash::HashMap<KeyDigest, usize>,
}

impl KeyIndex {
    /// The index of every tenant's keys (validation made them unique).
    pub fn new(tenants: &[TenantSettings]) -> Self {
        let mut index = KeyIndex::default();
        for (tenant, settings) in tenants.iter().enumerate() {
            for digest in &settings.keys {
                index.insert(*digest, tenant);
            }
        }
        index
    }

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
/// an address past its budget has its failed attempts answered 429 rather
/// than 401, so a client stuck on a bad key backs off. A valid key is never
/// throttled, whatever else came from its address: behind a load balancer
/// every client shares one address, and one client's bad key must not lock
/// the others out. (Guessing is defeated by the key space, not by this.)
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

    /// Counts one failed authentication from `ip`: `Err(retry_after_ms)`
    /// when the address had already used up its failures (the failure is
    /// then not counted again).
    pub fn record_failure(&self, ip: IpAddr, now_ms: f64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.len() >= THROTTLE_SWEEP_AT {
            state.retain(|_, tat| *tat > now_ms);
        }
        let tat = state.entry(ip).or_insert(now_ms);
        match crate::gcra::take(*tat, now_ms, f64::from(self.per_minute), 1.0) {
            Ok(new_tat) => {
                *tat = new_tat;
                Ok(())
            }
            Err(wait) => Err(wait.ceil() as u64),
        }
    }
}

/// The address a request came from. The peer's own address, unless the peer
/// is a trusted proxy (`server.trusted_proxies`): then the hops of the one
/// header the proxies set (`server.client_address_header`; the other is
/// ignored, since a client could write it) are read right to left, skipping
/// trusted proxies, and the first untrusted one is the client. A hop that
/// cannot be read ends the walk at the last address known good, so a client
/// cannot pose as another address by writing garbage.
pub fn client_address<'a>(
    peer: IpAddr,
    trusted: &[ipnet::IpNet],
    header: ForwardedHeader,
    values: impl Iterator<Item = &'a [u8]>,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let elements = values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','));
    let hops: Vec<&str> = match header {
        ForwardedHeader::XForwardedFor => elements.map(str::trim).collect(),
        ForwardedHeader::Forwarded => elements
            .map(|element| {
                element
                    .split(';')
                    .find_map(|pair| {
                        let (name, value) = pair.trim().split_once('=')?;
                        name.trim()
                            .eq_ignore_ascii_case("for")
                            .then_some(value.trim())
                    })
                    .unwrap_or("")
            })
            .collect(),
    };
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// One hop of `X-Forwarded-For` or `Forwarded: for=`: an address, maybe
/// quoted, bracketed (IPv6) and with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
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
            assert!(throttle.record_failure(a, 0.0).is_ok());
        }
        assert_eq!(
            throttle.record_failure(a, 0.0),
            Err(20_000),
            "one failure's worth of the minute"
        );
        assert!(
            throttle.record_failure(b, 0.0).is_ok(),
            "other addresses are not affected"
        );
        assert!(
            throttle.record_failure(a, 20_000.0).is_ok(),
            "the budget refills"
        );
        assert!(FailureThrottle::new(0).record_failure(a, 0.0).is_ok());
    }

    fn key<'a>(auth: &[&'a str], x: &[&'a str]) -> Presented<'a> {
        presented_key(
            auth.iter().map(|v| v.as_bytes()),
            x.iter().map(|v| v.as_bytes()),
        )
    }

    #[test]
    fn reads_bearer_and_x_api_key() {
        assert_eq!(key(&["Bearer sk-1"], &[]), Presented::Key("sk-1"));
        assert_eq!(key(&["bearer   sk-1 "], &[]), Presented::Key("sk-1"));
        assert_eq!(key(&[], &["sk-2"]), Presented::Key("sk-2"));
        assert_eq!(key(&["Bearer sk-1"], &["sk-1"]), Presented::Key("sk-1"));
        assert_eq!(key(&["Bearer "], &[]), Presented::Missing);
        assert_eq!(key(&["Basic abc"], &[]), Presented::Missing);
        assert_eq!(key(&[], &[]), Presented::Missing);
        assert_eq!(presented_key([&b"Bearer \xff"[..]], []), Presented::Missing);
    }

    #[test]
    fn refuses_credentials_that_disagree() {
        assert_eq!(
            key(&["Bearer sk-1", "Bearer sk-2"], &[]),
            Presented::Conflicting
        );
        assert_eq!(key(&["Bearer sk-1"], &["sk-2"]), Presented::Conflicting);
        assert_eq!(key(&[], &["sk-1", "sk-2"]), Presented::Conflicting);
        assert_eq!(key(&["Basic abc"], &["sk-2"]), Presented::Conflicting);
    }

    #[test]
    fn takes_the_client_address_from_trusted_proxies_only() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addr = |peer: &str, header: ForwardedHeader, values: &[&str]| {
            client_address(
                ip(peer),
                &trusted,
                header,
                values.iter().map(|v| v.as_bytes()),
            )
        };
        let xff = ForwardedHeader::XForwardedFor;
        // An untrusted peer's headers are ignored.
        assert_eq!(addr("192.0.2.1", xff, &["198.51.100.7"]), ip("192.0.2.1"));
        // Behind a trusted proxy: the rightmost untrusted hop.
        assert_eq!(
            addr("10.0.0.5", xff, &["6.6.6.6, 198.51.100.7, 10.1.1.1"]),
            ip("198.51.100.7")
        );
        assert_eq!(
            addr(
                "10.0.0.5",
                ForwardedHeader::Forwarded,
                &["for=198.51.100.9;proto=https, for=\"[2001:db8::1]:4711\""]
            ),
            ip("2001:db8::1")
        );
        // Garbage ends the walk at the last good address.
        assert_eq!(addr("10.0.0.5", xff, &["1.2.3.4, garbage"]), ip("10.0.0.5"));
        // Only trusted hops: the leftmost.
        assert_eq!(
            addr("10.0.0.5", xff, &["10.2.2.2, 10.3.3.3"]),
            ip("10.2.2.2")
        );
        assert_eq!(addr("10.0.0.5", xff, &[]), ip("10.0.0.5"));
    }
}
