//! Faults: what `POST /_mock/faults` queues, how a fault object is parsed
//! and validated, and the FIFO queue requests take them from.

use crate::*;

/// A misbehaviour injected through `POST /_mock/faults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer this status with an OpenAI-shaped error body.
    Status {
        /// HTTP status.
        status: u16,
        /// Explicit `retry-after` seconds.
        retry_after: Option<u64>,
        /// Explicit `retry-after-ms`.
        retry_after_ms: Option<u64>,
    },
    /// Answer this status with this exact body.
    RawError {
        /// HTTP status.
        status: u16,
        /// Raw body.
        body: String,
        /// Its `content-type`.
        content_type: Cow<'static, str>,
        /// Explicit `retry-after` seconds.
        retry_after: Option<u64>,
    },
    /// Close the connection after this many token events (half body when not streaming).
    Disconnect {
        /// Token events sent before closing.
        after_chunks: u64,
    },
    /// Answer normally, compressed in this content encoding (a provider
    /// that ignores `accept-encoding: identity`).
    Compress {
        /// `gzip`, `deflate`, `br` or `zstd`.
        encoding: &'static str,
    },
    /// End the stream's body cleanly after this many token events, with no
    /// finish event, usage or `[DONE]`.
    EndEarly {
        /// Token events sent before the end.
        after_chunks: u64,
    },
    /// Pause after this many token events (before headers when 0 or not streaming).
    Stall {
        /// Token events sent before the pause.
        after_chunks: u64,
        /// Pause length.
        stall_ms: u64,
    },
    /// Close the connection without answering.
    DropConnection,
    /// Answer normally, with these extra response headers.
    Headers(Vec<(String, String)>),
    /// Answer normally but report no usage, like servers that ignore
    /// `stream_options.include_usage`.
    NoUsage {
        /// Also end streams' bodies this many ms after their last event.
        linger_ms: Option<u64>,
    },
    /// Echo the request's credential in headers and body (hostile provider).
    EchoKey,
    /// Send the head (and a stream's role event) at once, then the first
    /// content only after this many ms.
    FirstToken {
        /// The delay.
        ms: u64,
    },
    /// Send an event that is not JSON after this many token events, then go
    /// on normally.
    Malformed {
        /// Token events before it.
        after_chunks: u64,
    },
    /// End streams cleanly without `data: [DONE]`.
    NoDone,
    /// Send the provider's in-band error event after this many token
    /// events, then end the body (after `linger_ms`, when set).
    ErrorEvent {
        /// Token events before it.
        after_chunks: u64,
        /// How long the body stays open after it.
        linger_ms: Option<u64>,
        /// The error's code, when not the server's overload.
        code: Option<String>,
    },
    /// Send the whole stream, its last event included, then end the body
    /// only after this many ms (a provider whose body's end trails its
    /// last event).
    Linger {
        /// The delay.
        ms: u64,
    },
    /// Answer 400 to a conversation that ends with an assistant message (a
    /// provider that does not continue a prefill); others normally.
    RejectPrefill,
}

/// A queued fault with its remaining uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedFault {
    /// What to do.
    pub(crate) fault: Fault,
    /// Requests still to be affected.
    pub(crate) remaining: u32,
    /// Only requests to this exact path take the fault.
    pub(crate) path: Option<String>,
    /// Only requests for this model take the fault.
    pub(crate) model: Option<String>,
}

impl QueuedFault {
    /// JSON shape served by `GET /_mock/faults`.
    pub(crate) fn to_json(&self) -> Value {
        let mut v = match &self.fault {
            Fault::Status {
                status,
                retry_after,
                retry_after_ms,
            } => {
                json!({"status": status, "retry_after": retry_after, "retry_after_ms": retry_after_ms})
            }
            Fault::RawError {
                status,
                body,
                content_type,
                retry_after,
            } => {
                json!({"status": status, "error_body": body, "content_type": content_type, "retry_after": retry_after})
            }
            Fault::Disconnect { after_chunks } => json!({"disconnect_after_chunks": after_chunks}),
            Fault::EndEarly { after_chunks } => json!({"end_after_chunks": after_chunks}),
            Fault::Compress { encoding } => json!({"compress": encoding}),
            Fault::Stall {
                after_chunks,
                stall_ms,
            } => json!({"stall_after_chunks": after_chunks, "stall_ms": stall_ms}),
            Fault::DropConnection => json!({"drop_connection": true}),
            Fault::NoUsage { linger_ms: None } => json!({"no_usage": true}),
            Fault::NoUsage {
                linger_ms: Some(ms),
            } => json!({"no_usage": true, "linger_ms": ms}),
            Fault::EchoKey => json!({"echo_key": true}),
            Fault::FirstToken { ms } => json!({"first_token_ms": ms}),
            Fault::Malformed { after_chunks } => json!({"malformed_after_chunks": after_chunks}),
            Fault::ErrorEvent {
                after_chunks,
                linger_ms,
                code,
            } => {
                json!({"error_after_chunks": after_chunks, "linger_ms": linger_ms, "error_code": code})
            }
            Fault::NoDone => json!({"no_done": true}),
            Fault::Linger { ms } => json!({"linger_ms": ms}),
            Fault::RejectPrefill => json!({"reject_prefill": true}),
            Fault::Headers(headers) => json!({"headers": headers
                .iter()
                .cloned()
                .collect::<std::collections::BTreeMap<String, String>>()}),
        };
        v["count"] = json!(self.remaining);
        v["path"] = json!(self.path);
        v["model"] = json!(self.model);
        v
    }
}

/// FIFO of pending faults.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    /// Pending faults, oldest first.
    pub(crate) entries: VecDeque<QueuedFault>,
}

impl FaultQueue {
    /// Appends a fault (ignored when it has no remaining uses).
    pub(crate) fn push(&mut self, fault: QueuedFault) {
        if fault.remaining > 0 {
            self.entries.push_back(fault);
        }
    }

    /// Takes one use of the first fault applicable to `path`.
    pub(crate) fn take(&mut self, path: &str, model: Option<&str>) -> Option<Fault> {
        let idx = self.entries.iter().position(|f| {
            f.path.as_deref().is_none_or(|p| p == path)
                && f.model.as_deref().is_none_or(|m| Some(m) == model)
        })?;
        let entry = &mut self.entries[idx];
        entry.remaining -= 1;
        let fault = entry.fault.clone();
        if entry.remaining == 0 {
            self.entries.remove(idx);
        }
        Some(fault)
    }

    /// Total remaining uses.
    pub(crate) fn pending(&self) -> u64 {
        self.entries.iter().map(|f| u64::from(f.remaining)).sum()
    }

    /// Forgets every fault.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Wire shape of one fault object.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSpec {
    /// Status for status / raw error faults.
    pub(crate) status: Option<u16>,
    /// Number of requests affected (default 1).
    pub(crate) count: Option<u32>,
    /// Disconnect fault.
    pub(crate) disconnect_after_chunks: Option<u64>,
    /// End-early fault: token events before the clean end.
    pub(crate) end_after_chunks: Option<u64>,
    /// Compress fault: the content encoding.
    pub(crate) compress: Option<String>,
    /// Stall fault: token events before the pause.
    pub(crate) stall_after_chunks: Option<u64>,
    /// Stall fault: pause length.
    pub(crate) stall_ms: Option<u64>,
    /// Persistent latency change.
    pub(crate) latency_ms: Option<u64>,
    /// Raw error body.
    pub(crate) error_body: Option<String>,
    /// Its content type: `text/plain` (default), `application/json` or
    /// `text/event-stream` (hostile-provider tests answer 200 with these).
    pub(crate) content_type: Option<String>,
    /// Explicit `retry-after` seconds.
    pub(crate) retry_after: Option<u64>,
    /// Close without answering.
    pub(crate) drop_connection: Option<bool>,
    /// Restrict the fault to one path.
    pub(crate) path: Option<String>,
    /// Extra response headers on an otherwise normal answer.
    pub(crate) headers: Option<std::collections::BTreeMap<String, String>>,
    /// Report no usage.
    pub(crate) no_usage: Option<bool>,
    /// Echo the credential.
    pub(crate) echo_key: Option<bool>,
    /// Explicit `retry-after-ms`.
    pub(crate) retry_after_ms: Option<u64>,
    /// Restrict the fault to one model.
    pub(crate) model: Option<String>,
    /// First content after this many ms.
    pub(crate) first_token_ms: Option<u64>,
    /// A non-JSON event after this many token events.
    pub(crate) malformed_after_chunks: Option<u64>,
    /// The provider's error event after this many token events.
    pub(crate) error_after_chunks: Option<u64>,
    /// That error's code (`invalid_prompt`, `rate_limit_exceeded`, ...).
    pub(crate) error_code: Option<String>,
    /// End streams without `[DONE]`.
    pub(crate) no_done: Option<bool>,
    /// End streams' bodies this many ms after their last event.
    pub(crate) linger_ms: Option<u64>,
    /// Refuse conversations that end with an assistant message.
    pub(crate) reject_prefill: Option<bool>,
}

impl FaultSpec {
    /// Validates the spec and splits it into a latency change and a queued fault.
    pub(crate) fn into_parts(self) -> Result<(Option<u64>, Option<QueuedFault>), String> {
        let stall = self.stall_after_chunks.is_some() || self.stall_ms.is_some();
        let dropped = self.drop_connection == Some(true);
        let no_usage = self.no_usage == Some(true);
        let echo_key = self.echo_key == Some(true);
        let no_done = self.no_done == Some(true);
        let reject_prefill = self.reject_prefill == Some(true);
        let kinds = [
            no_usage,
            echo_key,
            no_done,
            reject_prefill,
            self.first_token_ms.is_some(),
            // Goes with `no_usage` and `error_after_chunks` too.
            self.linger_ms.is_some() && !no_usage && self.error_after_chunks.is_none(),
            self.error_after_chunks.is_some(),
            self.malformed_after_chunks.is_some(),
            self.headers.is_some(),
            self.error_body.is_some(),
            self.disconnect_after_chunks.is_some(),
            self.end_after_chunks.is_some(),
            self.compress.is_some(),
            stall,
            dropped,
        ]
        .into_iter()
        .filter(|k| *k)
        .count();
        if kinds > 1 {
            return Err(
                "a fault may set only one of headers, error_body, disconnect_after_chunks, \
                 stall_after_chunks/stall_ms, drop_connection"
                    .to_owned(),
            );
        }
        if let Some(s) = self.status {
            if !(200..=599).contains(&s) {
                return Err(format!("status {s} is not between 200 and 599"));
            }
        }
        let takes_status = self.error_body.is_some() || kinds == 0;
        if self.status.is_some() && !takes_status {
            return Err("status only goes with error_body or alone".to_owned());
        }
        if self.content_type.is_some() && self.error_body.is_none() {
            return Err("content_type only goes with error_body".to_owned());
        }
        if self.error_code.is_some() && self.error_after_chunks.is_none() {
            return Err("error_code only goes with error_after_chunks".to_owned());
        }
        let fault = if let Some(body) = self.error_body {
            // One of three media types, with parameters if given (a
            // provider may put anything there).
            let content_type: Cow<'static, str> = match self.content_type {
                None => "text/plain; charset=utf-8".into(),
                Some(given) => match given.split(';').next().map(str::trim) {
                    Some("text/plain") if given == "text/plain" => {
                        "text/plain; charset=utf-8".into()
                    }
                    Some("text/plain" | "application/json" | "text/event-stream") => given.into(),
                    _ => {
                        return Err(format!(
                            "content_type must be text/plain, application/json or text/event-stream (parameters allowed), not {given}"
                        ))
                    }
                },
            };
            Some(Fault::RawError {
                status: self.status.unwrap_or(500),
                body,
                content_type,
                retry_after: self.retry_after,
            })
        } else if let Some(k) = self.disconnect_after_chunks {
            Some(Fault::Disconnect { after_chunks: k })
        } else if let Some(k) = self.end_after_chunks {
            Some(Fault::EndEarly { after_chunks: k })
        } else if let Some(encoding) = &self.compress {
            let encoding = ["gzip", "deflate", "br", "zstd"]
                .into_iter()
                .find(|e| e == encoding)
                .ok_or_else(|| {
                    format!("compress must be gzip, deflate, br or zstd, not {encoding}")
                })?;
            Some(Fault::Compress { encoding })
        } else if stall {
            Some(Fault::Stall {
                after_chunks: self.stall_after_chunks.unwrap_or(0),
                stall_ms: self.stall_ms.unwrap_or(DEFAULT_STALL_MS),
            })
        } else if let Some(k) = self.error_after_chunks {
            Some(Fault::ErrorEvent {
                after_chunks: k,
                linger_ms: self.linger_ms,
                code: self.error_code,
            })
        } else if dropped {
            Some(Fault::DropConnection)
        } else if no_usage {
            Some(Fault::NoUsage {
                linger_ms: self.linger_ms,
            })
        } else if echo_key {
            Some(Fault::EchoKey)
        } else if no_done {
            Some(Fault::NoDone)
        } else if reject_prefill {
            Some(Fault::RejectPrefill)
        } else if let Some(ms) = self.first_token_ms {
            Some(Fault::FirstToken { ms })
        } else if let Some(ms) = self.linger_ms {
            Some(Fault::Linger { ms })
        } else if let Some(k) = self.malformed_after_chunks {
            Some(Fault::Malformed { after_chunks: k })
        } else if let Some(headers) = self.headers {
            Some(Fault::Headers(headers.into_iter().collect()))
        } else {
            self.status.map(|status| Fault::Status {
                status,
                retry_after: self.retry_after,
                retry_after_ms: self.retry_after_ms,
            })
        };
        if (self.retry_after.is_some() || self.retry_after_ms.is_some())
            && !matches!(fault, Some(Fault::Status { .. } | Fault::RawError { .. }))
        {
            return Err("retry_after only goes with status or error_body".to_owned());
        }
        let queued = match fault {
            Some(fault) => {
                let count = self.count.unwrap_or(1);
                if count == 0 {
                    return Err("count must be at least 1".to_owned());
                }
                Some(QueuedFault {
                    fault,
                    remaining: count,
                    path: self.path,
                    model: self.model,
                })
            }
            None if self.latency_ms.is_none() => {
                return Err(
                    "empty fault: set status, error_body, disconnect_after_chunks, \
                     stall_after_chunks/stall_ms, drop_connection or latency_ms"
                        .to_owned(),
                )
            }
            None => None,
        };
        Ok((self.latency_ms, queued))
    }
}

/// Parses a `POST /_mock/faults` body: one fault object or an array of them.
pub(crate) fn parse_faults(body: &[u8]) -> Result<(Option<u64>, Vec<QueuedFault>), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let specs = match value {
        Value::Array(items) => items,
        v @ Value::Object(_) => vec![v],
        _ => return Err("expected a fault object or an array of fault objects".to_owned()),
    };
    let mut latency = None;
    let mut faults = Vec::with_capacity(specs.len());
    for spec in specs {
        let spec: FaultSpec =
            serde_json::from_value(spec).map_err(|e| format!("invalid fault: {e}"))?;
        let (l, f) = spec.into_parts()?;
        latency = l.or(latency);
        faults.extend(f);
    }
    Ok((latency, faults))
}
