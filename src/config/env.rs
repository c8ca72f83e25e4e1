//! `${ENV}` interpolation: every string value may reference environment
//! variables; an unset one is a problem at the key that uses it.

use super::{join, problem, Problem};
use serde_yaml::Value;

/// Replaces `${VAR}` in every string value; an unset variable is a problem
/// at the key that uses it.
pub(super) fn interpolate(
    value: &mut Value,
    path: &str,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    problems.push(problem(path, "unterminated '${' in value"));
                    return;
                };
                let name = &after[..end];
                match env(name) {
                    Some(v) if !name.is_empty() => out.push_str(&v),
                    _ => {
                        problems.push(problem(
                            path,
                            format!("environment variable {name} is not set"),
                        ));
                        // Keep the reference, so later checks of this value
                        // do not add misleading follow-up problems.
                        out.push_str(&rest[start..start + 2 + end + 1]);
                    }
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key.as_str().unwrap_or("?").to_string();
                interpolate(item, &join(path, &key), env, problems);
            }
        }
        _ => {}
    }
}
