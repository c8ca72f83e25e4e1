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

/// A random (version 4) UUID, `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`:
/// the request id the gateway makes, and the only kind it sends upstream
/// (model servers that check `x-request-id` expect one).
pub fn uuid_v4() -> String {
    uuid_from(rand::thread_rng().gen::<u128>())
}

/// `bits` as a version 4 UUID's text (the version and variant bits set).
fn uuid_from(bits: u128) -> String {
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let bytes = bits.to_be_bytes();
    // Its five groups written in place: on every request, and `format!` of
    // a u128 then of its slices cost more than the rest of this module.
    let mut text = [b'-'; 36];
    for (from, to) in [
        (0..4, 0..8),
        (4..6, 9..13),
        (6..8, 14..18),
        (8..10, 19..23),
        (10..16, 24..36),
    ] {
        hex::encode_to_slice(&bytes[from], &mut text[to]).expect("two digits a byte");
    }
    std::str::from_utf8(&text).unwrap_or_default().to_owned()
}

/// The id sent upstream for request `id`: itself when it is a UUID, else a
/// UUID made from it (a client's own id may not be one, and some model
/// servers refuse an `x-request-id` that is not), the same for every
/// attempt of the request.
pub fn upstream_request_id(id: &str) -> std::borrow::Cow<'_, str> {
    if is_uuid(id) {
        return std::borrow::Cow::Borrowed(id);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let bits = u128::from_be_bytes(digest[..16].try_into().unwrap_or_default());
    std::borrow::Cow::Owned(uuid_from(bits))
}

/// Whether `id` is a UUID in its canonical text form.
pub fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
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

    #[test]
    fn request_ids_sent_upstream_are_uuids() {
        let id = uuid_v4();
        assert!(is_uuid(&id), "{id}");
        assert_eq!(&id[14..15], "4", "version 4");
        assert!("89ab".contains(&id[19..20]), "RFC 4122 variant");
        assert_eq!(upstream_request_id(&id), id.as_str());
        assert_eq!(
            uuid_from(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            "01234567-89ab-4def-8123-456789abcdef"
        );
        let made = upstream_request_id("client-id-42");
        assert!(is_uuid(&made) && made == upstream_request_id("client-id-42"));
        assert!(!is_uuid("req_0123456789abcdef01234567"));
    }
}
