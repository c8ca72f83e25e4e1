//! Shared state: the configuration, counters and the journal of requests
//! served by `/_mock/stats` and `/_mock/requests`.

use crate::*;

/// Immutable settings from the command line.
#[derive(Debug, Clone)]
pub(crate) struct MockConfig {
    /// Required API key, if any.
    pub(crate) api_key: Option<String>,
    /// Streaming pace; 0 means unpaced.
    pub(crate) tokens_per_second: u64,
    /// Latency restored by `POST /_mock/reset`.
    pub(crate) latency_ms: u64,
    /// Streamed tokens carry their write time (`--stamp-chunks`).
    pub(crate) stamp_chunks: bool,
    /// Refuse requests without a UUID `x-request-id`.
    pub(crate) require_uuid_request_id: bool,
}

/// Counters behind `GET /_mock/stats`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Total API requests.
    pub(crate) requests: AtomicU64,
    /// Per-path counters for [`KNOWN_PATHS`].
    pub(crate) known: [AtomicU64; KNOWN_PATHS.len()],
    /// Counters for every other path (cold path).
    pub(crate) other: Mutex<HashMap<String, u64>>,
    /// Prompt tokens of responses whose 200 headers were written.
    pub(crate) prompt_tokens: AtomicU64,
    /// Completion tokens actually delivered.
    pub(crate) completion_tokens: AtomicU64,
    /// Responses abandoned because the client went away.
    pub(crate) disconnects: AtomicU64,
    /// Requests per model named (at most [`MAX_OTHER_PATHS`] names).
    pub(crate) models: Mutex<HashMap<String, u64>>,
    /// The client addresses API requests came from: how many connections
    /// a proxy opened (at most [`MAX_PEERS`] kept).
    pub(crate) peers: Mutex<std::collections::HashSet<std::net::SocketAddr>>,
}

/// How many client addresses [`Stats::peers`] keeps.
const MAX_PEERS: usize = 100_000;

impl Stats {
    /// Counts one API request to `path`.
    pub(crate) fn count_request(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = KNOWN_PATHS.iter().position(|p| *p == path) {
            self.known[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut other = lock(&self.other);
        if let Some(n) = other.get_mut(path) {
            *n += 1;
        } else if other.len() < MAX_OTHER_PATHS {
            other.insert(path.to_owned(), 1);
        } else {
            *other.entry("(other)".to_owned()).or_insert(0) += 1;
        }
    }

    /// Zeroes every counter.
    pub(crate) fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        for k in &self.known {
            k.store(0, Ordering::Relaxed);
        }
        lock(&self.other).clear();
        lock(&self.models).clear();
        self.prompt_tokens.store(0, Ordering::Relaxed);
        self.completion_tokens.store(0, Ordering::Relaxed);
        self.disconnects.store(0, Ordering::Relaxed);
        lock(&self.peers).clear();
    }

    /// Notes the client address of an API request.
    pub(crate) fn count_peer(&self, peer: std::net::SocketAddr) {
        let mut peers = lock(&self.peers);
        if peers.len() < MAX_PEERS {
            peers.insert(peer);
        }
    }

    /// Counts one request naming `model`.
    pub(crate) fn count_model(&self, model: &str) {
        let mut models = lock(&self.models);
        if let Some(n) = models.get_mut(model) {
            *n += 1;
        } else if models.len() < MAX_OTHER_PATHS {
            models.insert(model.to_owned(), 1);
        } else {
            *models.entry("(other)".to_owned()).or_insert(0) += 1;
        }
    }

    /// `by_model` object.
    pub(crate) fn by_model(&self) -> serde_json::Map<String, Value> {
        lock(&self.models)
            .iter()
            .map(|(model, n)| (model.clone(), json!(n)))
            .collect()
    }

    /// Counts one client that went away mid-response.
    pub(crate) fn disconnect(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `by_path` object with the non-zero counters.
    pub(crate) fn by_path(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        for (path, n) in KNOWN_PATHS.iter().zip(&self.known) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                map.insert((*path).to_owned(), json!(n));
            }
        }
        for (path, n) in lock(&self.other).iter() {
            map.insert(path.clone(), json!(n));
        }
        map
    }
}

/// One API request as seen by the mock (no body copy: length and hash only).
#[derive(Debug, Clone)]
pub(crate) struct RecordedRequest {
    /// Request method.
    pub(crate) method: Method,
    /// URI path without query.
    pub(crate) path: String,
    /// Query string, if any.
    pub(crate) query: Option<String>,
    /// All request headers as received.
    pub(crate) headers: HeaderMap,
    /// Request body length.
    pub(crate) body_bytes: usize,
    /// SHA-256 of the request body.
    pub(crate) body_sha256: [u8; 32],
    /// Model named by the request (body `model`, or Azure deployment).
    pub(crate) model: Option<String>,
    /// The conversation ended with an assistant message to continue.
    pub(crate) prefilled: bool,
    /// When it arrived, in milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
}

impl RecordedRequest {
    /// JSON shape served by `GET /_mock/requests`.
    pub(crate) fn to_json(&self) -> Value {
        let mut headers = serde_json::Map::new();
        for (name, value) in &self.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            match headers.get_mut(name.as_str()) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
                }
            }
        }
        json!({
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_bytes": self.body_bytes,
            "body_sha256": hex::encode(self.body_sha256),
            "model": self.model,
            "prefilled": self.prefilled,
            "at_ms": self.at_ms,
        })
    }
}

/// Everything the mock remembers between requests.
#[derive(Debug)]
pub(crate) struct MockState {
    /// Counters.
    pub(crate) stats: Stats,
    /// Last API requests, oldest first.
    pub(crate) recorded: Mutex<VecDeque<RecordedRequest>>,
    /// Pending faults.
    pub(crate) faults: Mutex<FaultQueue>,
    /// Mirror of `faults.pending()` so the hot path can skip the lock.
    pub(crate) faults_pending: AtomicU64,
    /// Current latency (CLI value until changed by a fault).
    pub(crate) latency_ms: AtomicU64,
    /// Source of response ids.
    pub(crate) next_id: AtomicU64,
    /// Stored Responses API responses.
    pub(crate) responses: Mutex<ResponseStore>,
}

impl MockState {
    /// Fresh state with the given latency.
    pub(crate) fn new(latency_ms: u64) -> Self {
        MockState {
            stats: Stats::default(),
            recorded: Mutex::new(VecDeque::with_capacity(RECORD_LIMIT)),
            faults: Mutex::new(FaultQueue::default()),
            faults_pending: AtomicU64::new(0),
            latency_ms: AtomicU64::new(latency_ms),
            next_id: AtomicU64::new(1),
            responses: Mutex::new(ResponseStore::default()),
        }
    }

    /// Remembers a request, dropping the oldest beyond [`RECORD_LIMIT`].
    pub(crate) fn record(&self, req: RecordedRequest) {
        let mut recorded = lock(&self.recorded);
        if recorded.len() >= RECORD_LIMIT {
            recorded.pop_front();
        }
        recorded.push_back(req);
    }

    /// Takes the fault for a request to `path`, if any.
    pub(crate) fn take_fault(&self, path: &str, model: Option<&str>) -> Option<Fault> {
        if self.faults_pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = lock(&self.faults);
        let fault = queue.take(path, model);
        self.faults_pending
            .store(queue.pending(), Ordering::Release);
        fault
    }

    /// Queues faults and/or changes the latency.
    pub(crate) fn add_faults(&self, latency_ms: Option<u64>, faults: Vec<QueuedFault>) {
        if let Some(ms) = latency_ms {
            self.latency_ms.store(ms, Ordering::Relaxed);
        }
        let mut queue = lock(&self.faults);
        for f in faults {
            queue.push(f);
        }
        self.faults_pending
            .store(queue.pending(), Ordering::Release);
    }

    /// `POST /_mock/reset`.
    pub(crate) fn reset(&self, latency_ms: u64) {
        self.stats.reset();
        lock(&self.recorded).clear();
        let mut queue = lock(&self.faults);
        queue.clear();
        self.faults_pending.store(0, Ordering::Release);
        self.latency_ms.store(latency_ms, Ordering::Relaxed);
    }
}

/// Locks a mutex, recovering from poisoning (the data stays usable for a mock).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
