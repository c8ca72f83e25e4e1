//! Job callback URLs: how one is parsed and normalised, and how it is
//! matched against a tenant's allow-list.

use super::Secret;

/// A tenant's allowed job callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callbacks {
    /// Allowed URLs, normalised: an exact URL, or a prefix ending in `/`.
    pub allowed_urls: Vec<CallbackUrl>,
    /// The HMAC-SHA256 key results are signed with.
    pub secret: Secret,
}

impl Callbacks {
    /// The URL a job may post its result to, normalised, when `raw` is on
    /// the allow-list: same scheme, host and port, and either the same path
    /// and query as an exact entry or a path under a prefix entry (the
    /// prefix ends in `/`, so the match is on whole segments). `None` when
    /// `raw` is not a plain URL (see [`CallbackUrl::parse`]) or not allowed.
    pub fn allowed(&self, raw: &str) -> Option<CallbackUrl> {
        let url = CallbackUrl::parse(raw).ok()?;
        self.allowed_urls
            .iter()
            .any(|allowed| url.is_under(allowed))
            .then_some(url)
    }
}

/// A callback URL as the gateway delivers to it: http(s), no user info, no
/// fragment, and nothing a normaliser would change (no dot segments, no
/// encoded dots, slashes or backslashes, no backslashes, no control
/// characters or spaces), so the URL checked is the URL delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(url::Url);

impl CallbackUrl {
    /// Parses and checks a callback URL; why it is refused otherwise.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(c) = raw
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
        {
            return Err(format!("contains the character {c:?}"));
        }
        if raw.contains('\\') {
            return Err("contains a backslash".into());
        }
        if raw.contains('#') {
            return Err("has a fragment".into());
        }
        let lower = raw.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%00"]
            .iter()
            .any(|e| lower.contains(e))
        {
            return Err("encodes a dot, slash, backslash or NUL".into());
        }
        let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be http or https".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry a user name or password".into());
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        // The path and query exactly as written: a URL the parser had to
        // normalise (dot segments, stray characters) is refused.
        let after_scheme = raw.split_once("://").map_or("", |(_, rest)| rest);
        let raw_path = after_scheme
            .find(['/', '?'])
            .map_or("", |at| &after_scheme[at..]);
        let (raw_path, raw_query) = match raw_path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (raw_path, None),
        };
        let path_as_parsed = if raw_path.is_empty() { "/" } else { raw_path };
        if url.path() != path_as_parsed || url.query() != raw_query {
            return Err("has a path the URL parser would change (dot segments or encoding)".into());
        }
        if raw_path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err("has a dot segment".into());
        }
        // Path parameters (`..;/`, which some servers resolve as `..`) and
        // any percent-encoding (`%252e`, overlong UTF-8) have no place in a
        // callback path: only plain characters pass.
        if raw_path.contains([';', '%']) {
            return Err("has ';' or a percent-encoded character in its path".into());
        }
        Ok(CallbackUrl(url))
    }

    /// The normalised URL.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether this URL is `allowed` (exact) or under it (a prefix entry).
    fn is_under(&self, allowed: &CallbackUrl) -> bool {
        let (a, b) = (&self.0, &allowed.0);
        if a.scheme() != b.scheme()
            || a.host_str() != b.host_str()
            || a.port_or_known_default() != b.port_or_known_default()
        {
            return false;
        }
        if b.path().ends_with('/') && b.query().is_none() {
            a.path().starts_with(b.path())
        } else {
            a.path() == b.path() && a.query() == b.query()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(urls: &[&str]) -> Callbacks {
        Callbacks {
            allowed_urls: urls
                .iter()
                .map(|u| CallbackUrl::parse(u).unwrap())
                .collect(),
            secret: Secret("whsec-0123456789abcdef".into()),
        }
    }

    #[test]
    fn refuses_urls_a_normaliser_would_rewrite() {
        for url in [
            "https://h.example/runestone/../other",
            "https://h.example/runestone/./x",
            "https://h.example/runestone/%2e%2e/other",
            "https://h.example/runestone/%2E./other",
            "https://h.example/runestone/a%2fb",
            "https://h.example/runestone/a%5Cb",
            "https://h.example/runestone/a\\b",
            "https://h.example/runestone/.\t./x",
            "https://h.example/runestone/a b",
            "https://h.example/runestone/\u{e9}",
            "https://user:pw@h.example/runestone/x",
            "https://h.example@evil.example/runestone/x",
            "https://h.example/runestone/x#frag",
            "ftp://h.example/runestone/x",
            "https:///runestone/x",
            "https://h.example/runestone/x%00",
            "https://h.example/a//../b",
            "https://h.example/runestone/..;/admin",
            "https://h.example/runestone/.;/admin",
            "https://h.example/runestone/%252e%252e/admin",
            "https://h.example/runestone/%c0%ae%c0%ae/admin",
            "https://h.example/runestone/..%c0%afadmin",
        ] {
            assert!(CallbackUrl::parse(url).is_err(), "{url:?} was accepted");
        }
    }

    #[test]
    fn matches_scheme_host_port_and_whole_path_segments() {
        let callbacks = allow(&[
            "https://Hooks.Example/runestone/",
            "http://h.example:8080/exact?x=1",
        ]);
        let allowed = |url: &str| callbacks.allowed(url).map(|u| u.as_str().to_string());
        assert_eq!(
            allowed("https://hooks.example:443/runestone/done?id=1").as_deref(),
            Some("https://hooks.example/runestone/done?id=1"),
            "host case and the default port are normalised"
        );
        assert!(
            allowed("https://hooks.example/runestone").is_none(),
            "not under the prefix"
        );
        assert!(
            allowed("https://hooks.example/runestonex/y").is_none(),
            "segment boundary"
        );
        assert!(
            allowed("http://hooks.example/runestone/y").is_none(),
            "scheme"
        );
        assert!(
            allowed("https://hooks.example:8443/runestone/y").is_none(),
            "port"
        );
        assert!(
            allowed("https://evil.example/runestone/y").is_none(),
            "host"
        );
        assert!(allowed("http://h.example:8080/exact?x=1").is_some());
        assert!(
            allowed("http://h.example:8080/exact?x=2").is_none(),
            "an exact entry keeps its query"
        );
        assert!(allowed("http://h.example:8080/exact/more").is_none());
    }
}
