//! Secrets in the config: provider keys never printed, and the warning for
//! a file that holds plaintext secrets others can read.

use serde_yaml::Value;
use std::fmt;
use std::path::Path;

/// A string that must never be printed: provider keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// The secret itself, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// The key paths of secrets written in the file as they are: provider keys,
/// callback secrets and Redis passwords not taken from `${ENV}`, tenant keys
/// neither `${ENV}` nor `sha256:` digests.
pub(super) fn literal_secrets(root: &Value) -> Vec<String> {
    let literal = |v: &Value| {
        v.as_str()
            .is_some_and(|s| !s.is_empty() && !s.contains("${"))
    };
    fn list(v: Option<&Value>) -> Vec<(usize, &Value)> {
        v.and_then(Value::as_sequence)
            .map(|items| items.iter().enumerate().collect())
            .unwrap_or_default()
    }
    let mut found = Vec::new();
    for (i, provider) in list(root.get("providers")) {
        if provider.get("api_key").is_some_and(literal) {
            found.push(format!("providers[{i}].api_key"));
        }
    }
    for (i, tenant) in list(root.get("tenants")) {
        for (j, key) in list(tenant.get("keys")) {
            if literal(key) && !key.as_str().is_some_and(|k| k.starts_with("sha256:")) {
                found.push(format!("tenants[{i}].keys[{j}]"));
            }
        }
        let secret = tenant
            .get("overflow")
            .and_then(|o| o.get("callbacks"))
            .and_then(|c| c.get("secret"));
        if secret.is_some_and(literal) {
            found.push(format!("tenants[{i}].overflow.callbacks.secret"));
        }
    }
    let redis = root.get("redis");
    let with_password = |u: &Value| literal(u) && u.as_str().is_some_and(|u| u.contains('@'));
    if redis.and_then(|r| r.get("url")).is_some_and(with_password) {
        found.push("redis.url".to_string());
    }
    for (i, node) in list(redis.and_then(|r| r.get("cluster_nodes"))) {
        if with_password(node) {
            found.push(format!("redis.cluster_nodes[{i}]"));
        }
    }
    let sentinel = redis.and_then(|r| r.get("sentinel"));
    for key in ["password", "master_password"] {
        if sentinel.and_then(|s| s.get(key)).is_some_and(literal) {
            found.push(format!("redis.sentinel.{key}"));
        }
    }
    for (i, node) in list(sentinel.and_then(|s| s.get("nodes"))) {
        if with_password(node) {
            found.push(format!("redis.sentinel.nodes[{i}]"));
        }
    }
    let headers = root.get("telemetry").and_then(|t| t.get("headers"));
    for (name, value) in headers.and_then(Value::as_mapping).into_iter().flatten() {
        if literal(value) {
            let name = name.as_str().unwrap_or("?");
            found.push(format!("telemetry.headers.{name}"));
        }
    }
    found
}

/// A warning when the file holds literal secrets and others may read it.
pub(super) fn permission_warning(path: &Path, literal_secrets: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if literal_secrets.is_empty() {
        return None;
    }
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o044 != 0).then(|| {
        format!(
            "{}: holds plaintext secrets ({}) and is readable by {} (mode {:o}); chmod 600 it, or use sha256: digests and ${{ENV}} references",
            path.display(),
            literal_secrets.join(", "),
            if mode & 0o004 != 0 { "others" } else { "its group" },
            mode & 0o777
        )
    })
}
