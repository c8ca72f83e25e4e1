//! How keys are written in the config: `sha256:<hex>` digests (what
//! `runestone hash-key` prints) or plaintext for development, digested at
//! load so the running gateway holds no tenant key.

use sha2::{Digest, Sha256};

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
