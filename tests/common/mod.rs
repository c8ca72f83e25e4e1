//! Test harness: real `runestone` and `runestone-mock` processes on free
//! loopback ports, started and waited for by readiness, killed on drop.
//!
//! ```ignore
//! let mock = Mock::start(&["--api-key", "provider-key"]);
//! let gw = Gateway::start(&GatewayConfig::new(&mock).yaml());
//! let resp = gw.post_json("/v1/chat/completions", TENANT_KEY, &json!({...}));
//! assert_eq!(mock.requests()[0]["headers"]["authorization"], "Bearer provider-key");
//! ```
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tenant key used by [`GatewayConfig`]'s default tenant.
pub const TENANT_KEY: &str = "sk-tenant-acme-0123456789";
/// A second tenant restricted to the embeddings model.
pub const RESTRICTED_KEY: &str = "sk-tenant-restricted-987";
/// The key the gateway sends to the mock provider.
pub const PROVIDER_KEY: &str = "sk-provider-secret-555";

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` comes from the same range as
/// the local ports of outgoing connections, so between this check and the
/// process binding it, any connection (a gateway's to its provider, a
/// client's) could take it, and the gateway would wait for it in vain
/// (Pingora retries a port in use). Ports below that range are never
/// given to connections; each call here moves on to the next one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(10_000);
    if span < 1_000 {
        // An ephemeral range tuned down to the low ports: none below it to
        // spare, so one from the kernel, as before.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
    }
    // Spread test processes apart, then step through the span.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (start + step) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range ({ephemeral_low})");
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "runestone-test-{}-{name}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn fastrand_suffix() -> u64 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

/// Polls `GET url` until it answers 200, or panics after `timeout` (killing
/// the process first, so a failed start leaves nothing running).
pub fn wait_ready(url: &str, child: &mut Child, timeout: Duration, what: &str) {
    if let Err(e) = try_wait_ready(url, child, timeout, what) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{e}");
    }
}

/// [`wait_ready`], saying why it failed instead of panicking.
fn try_wait_ready(
    url: &str,
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during start-up: {status}"));
        }
        match ureq::get(url).timeout(Duration::from_millis(500)).call() {
            Ok(resp) if resp.status() == 200 => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("{what} not ready at {url} after {timeout:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The `runestone-mock` binary: a crate of its own in the workspace, so not
/// one Cargo builds for this package's tests. It is found beside the test
/// binary's profile directory (`target/debug`), and built there (or found up
/// to date) once per test binary.
pub fn mock_binary() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let mock = profile_dir.join("runestone-mock");
    // Built (or found up to date) once per test binary: a mock left from
    // an older build would lack what the tests ask of it. The workspace's
    // binaries, as scripts/test.sh builds them (`-p runestone-mock` alone
    // resolves Pingora's features differently and compiles it again), and
    // without the variables `cargo test` gives this process: build scripts
    // that watch them (ring's watches CARGO_PKG_NAME) would run again, and
    // every crate above them would be compiled again, twice a test binary.
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--workspace", "--bins"]);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || name.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(name.as_ref());
            }
        }
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build --workspace --bins");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    assert!(mock.exists(), "{} is missing", mock.display());
    mock
}

/// A running `runestone-mock`.
pub struct Mock {
    pub port: u16,
    child: Child,
}

impl Mock {
    /// Starts the mock with extra CLI arguments.
    pub fn start(args: &[&str]) -> Mock {
        // A free port can be taken before the mock binds it (by another
        // test's server or outgoing connection): then the mock exits, or
        // another process answers on it, and it starts again on another.
        for _ in 0..3 {
            let port = free_port();
            let mut child = Mock::spawn(port, args);
            let url = format!("http://127.0.0.1:{port}/health");
            let ready = try_wait_ready(&url, &mut child, Duration::from_secs(10), "runestone-mock");
            let pid = ureq::get(&format!("http://127.0.0.1:{port}/_mock/pid"))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok());
            if ready.is_ok() && pid == Some(child.id().to_string()) {
                return Mock { port, child };
            }
            let _ = child.kill();
            let _ = child.wait();
            match ready {
                Err(e) if !e.contains("exited during start-up") => panic!("{e}"),
                _ => continue,
            }
        }
        panic!("runestone-mock exited during start-up three times (no free port?)");
    }

    fn spawn(port: u16, args: &[&str]) -> Child {
        Command::new(mock_binary())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn runestone-mock")
    }

    /// Starts the mock on `port` (to bring a killed one back).
    pub fn start_on(port: u16, args: &[&str]) -> Mock {
        let mut child = Mock::spawn(port, args);
        wait_ready(
            &format!("http://127.0.0.1:{port}/health"),
            &mut child,
            Duration::from_secs(10),
            "runestone-mock",
        );
        Mock { port, child }
    }

    /// The mock's OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// `GET /_mock/stats`.
    pub fn stats(&self) -> Value {
        get_json(&format!("http://127.0.0.1:{}/_mock/stats", self.port))
    }

    /// Number of API requests the mock received.
    pub fn request_count(&self) -> u64 {
        self.stats()["requests"].as_u64().expect("stats.requests")
    }

    /// `GET /_mock/requests`: what the provider saw, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        get_json(&format!("http://127.0.0.1:{}/_mock/requests", self.port))
            .as_array()
            .expect("requests array")
            .clone()
    }

    /// Queues a fault (see the mock's docs) for the next requests.
    pub fn fault(&self, fault: Value) {
        ureq::post(&format!("http://127.0.0.1:{}/_mock/faults", self.port))
            .send_json(fault)
            .expect("set mock fault");
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a gateway config around one or more mocks.
#[derive(Clone)]
pub struct GatewayConfig {
    pub port: u16,
    pub metrics_port: u16,
    pub max_body: usize,
    pub providers: Vec<String>,
    pub models: String,
    pub tenants: String,
    /// Further top-level sections (`pricing:`, `redis:`), as YAML.
    pub extra: String,
    /// `server.tls` (cert, key) paths.
    pub tls: Option<(String, String)>,
    /// `server.grace_period_seconds`.
    pub grace: u64,
    /// Further `server:` lines, as YAML (two-space indented).
    pub server_extra: String,
}

impl GatewayConfig {
    /// The same config on listeners of its own: another instance beside
    /// the first (sharing its Redis, say).
    pub fn another_instance(&self) -> Self {
        GatewayConfig {
            port: free_port(),
            metrics_port: free_port(),
            ..self.clone()
        }
    }

    /// One provider `mock` (at `mock`), model `gpt-4o-mini` renamed to
    /// `mock-small`, model `same-name` passed as is, an embeddings model, and
    /// tenants `acme` (all models) and `restricted` (embeddings only).
    pub fn new(mock: &Mock) -> Self {
        GatewayConfig {
            port: free_port(),
            metrics_port: free_port(),
            max_body: 4 * 1024 * 1024,
            providers: vec![format!(
                "  - {{ name: mock, kind: openai, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\" }}",
                mock.base_url()
            )],
            models: "
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
  - name: same-name
    targets: [{ provider: mock }]
  - name: text-embedding-3-small
    targets: [{ provider: mock }]
"
            .into(),
            tenants: format!(
                "
  - id: acme
    keys: [\"{TENANT_KEY}\"]
  - id: restricted
    keys: [\"{}\"]
    models: [text-embedding-3-small]
",
                sha256_key(RESTRICTED_KEY)
            ),
            extra: String::new(),
            tls: None,
            grace: 1,
            server_extra: String::new(),
        }
    }

    /// The YAML text; `#SERVER_EXTRA#` marks where per-process settings go.
    pub fn yaml(&self) -> String {
        let tls = match &self.tls {
            Some((cert, key)) => format!("  tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n"),
            None => String::new(),
        };
        format!(
            "server:\n  listen: \"127.0.0.1:{}\"\n  metrics_listen: \"127.0.0.1:{}\"\n  threads: 2\n  max_request_body_bytes: {}\n  grace_period_seconds: {}\n{tls}{}#SERVER_EXTRA#\nproviders:\n{}\nmodels:{}\ntenants:{}\n{}",
            self.port,
            self.metrics_port,
            self.max_body,
            self.grace,
            self.server_extra,
            self.providers.join("\n"),
            self.models,
            self.tenants,
            self.extra
        )
    }

    /// The YAML with this process's pid file and upgrade socket in `dir`.
    pub fn yaml_in(&self, dir: &std::path::Path) -> String {
        self.yaml().replacen(
            "#SERVER_EXTRA#",
            &format!(
                "  pid_file: \"{0}/gw.pid\"\n  upgrade_sock: \"{0}/gw.sock\"",
                dir.display()
            ),
            1,
        )
    }
}

/// The `sha256:<hex>` form of a key, as `runestone hash-key` prints it.
pub fn sha256_key(key: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run runestone hash-key");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running gateway.
pub struct Gateway {
    pub port: u16,
    pub metrics_port: u16,
    child: Child,
    dir: PathBuf,
}

impl Gateway {
    /// Starts `runestone --config` with this YAML and waits for `/health`.
    pub fn start(config: &GatewayConfig) -> Gateway {
        Self::start_with_env(config, &[])
    }

    /// Starts a gateway whose API listener speaks HTTPS; readiness is
    /// checked on the metrics listener.
    pub fn start_tls(config: &GatewayConfig) -> Gateway {
        Self::spawn(
            config,
            &[],
            &format!("http://127.0.0.1:{}/metrics", config.metrics_port),
        )
    }

    /// Like [`Gateway::start`], with extra environment variables.
    pub fn start_with_env(config: &GatewayConfig, env: &[(&str, &str)]) -> Gateway {
        Self::spawn(
            config,
            env,
            &format!("http://127.0.0.1:{}/health", config.port),
        )
    }

    fn spawn(config: &GatewayConfig, env: &[(&str, &str)], ready_url: &str) -> Gateway {
        let dir = scratch_dir("gw");
        std::fs::write(dir.join("runestone.yaml"), config.yaml_in(&dir)).expect("write config");
        Self::launch(config, dir, env, ready_url)
    }

    /// Starts the gateway again on the same config file and directory (its
    /// pid file, its access log), once this process has exited; what the
    /// process before said moves to `gateway-before.log`.
    pub fn start_again(&mut self, config: &GatewayConfig) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "the gateway still runs"
        );
        std::fs::rename(
            self.dir.join("gateway.log"),
            self.dir.join("gateway-before.log"),
        )
        .expect("keep the log");
        let ready = format!("http://127.0.0.1:{}/health", config.port);
        let again = Self::launch(config, self.dir.clone(), &[], &ready);
        // The scratch directory is the new one's now.
        let before = std::mem::replace(self, again);
        std::mem::forget(before);
    }

    fn launch(
        config: &GatewayConfig,
        dir: PathBuf,
        env: &[(&str, &str)],
        ready_url: &str,
    ) -> Gateway {
        // A second instance on the same ports would wait for them while the
        // first answered for both.
        for port in [config.port, config.metrics_port] {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
                "port {port} is taken: another gateway on the same config? (GatewayConfig::another_instance)"
            );
        }
        let config_path = dir.join("runestone.yaml");
        let log = std::fs::File::create(dir.join("gateway.log")).expect("create log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_runestone"))
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn runestone");
        // The metrics listener is a service of its own and may bind a moment
        // after the API: tests scrape it at once.
        let metrics_url = format!("http://127.0.0.1:{}/metrics", config.metrics_port);
        let started = try_wait_ready(ready_url, &mut child, Duration::from_secs(20), "runestone")
            .and_then(|()| {
                let what = "runestone's metrics listener";
                try_wait_ready(&metrics_url, &mut child, Duration::from_secs(20), what)
            });
        if let Err(e) = started {
            let _ = child.kill();
            let _ = child.wait();
            // What the gateway said is what tells a slow start from a stuck one.
            let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!("{e}; the end of its log:\n{tail}");
        }
        let gateway = Gateway {
            port: config.port,
            metrics_port: config.metrics_port,
            child,
            dir,
        };
        if config.extra.contains("redis:") {
            // Redis counts as down until the start-up connection answers;
            // tests that want it up wait for that (or its failure).
            let deadline = Instant::now() + Duration::from_secs(8);
            while Instant::now() < deadline {
                let log = gateway.log();
                if log.contains("Redis answers") || log.contains("at start-up") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        gateway
    }

    /// Starts a second process on the same config with `--upgrade`, to take
    /// the listening sockets over when this one gets SIGQUIT; it is waiting
    /// for them once its upgrade socket exists.
    pub fn start_upgrade(&self) -> Child {
        let sock = self.dir.join("gw.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(self.dir.join("gateway-upgraded.log")).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_runestone"))
            .arg("--config")
            .arg(self.dir.join("runestone.yaml"))
            .arg("--upgrade")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn runestone --upgrade");
        wait_until(
            Duration::from_secs(10),
            "the new process's upgrade socket",
            || sock.exists(),
        );
        child
    }

    /// The config file the process runs on, and its scratch directory.
    pub fn config_path(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("runestone.yaml"), self.dir.clone())
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// POSTs JSON with a Bearer key; any status is returned, not an error.
    pub fn post_json(&self, path: &str, key: &str, body: &Value) -> Response {
        self.post_raw(
            path,
            &[("authorization", &format!("Bearer {key}"))],
            body.to_string().as_bytes(),
        )
    }

    /// POSTs raw bytes with the given headers.
    pub fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut req = ureq::post(&self.url(path))
            .timeout(Duration::from_secs(30))
            .set("content-type", "application/json");
        for (name, value) in headers {
            req = req.set(name, value);
        }
        Response::from(req.send_bytes(body))
    }

    /// GETs a path with optional Bearer key.
    pub fn get(&self, path: &str, key: Option<&str>) -> Response {
        let mut req = ureq::get(&self.url(path)).timeout(Duration::from_secs(10));
        if let Some(key) = key {
            req = req.set("authorization", &format!("Bearer {key}"));
        }
        Response::from(req.call())
    }

    /// The Prometheus text on the metrics listener.
    pub fn metrics(&self) -> String {
        ureq::get(&format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .call()
            .expect("scrape metrics")
            .into_string()
            .unwrap()
    }

    /// Everything the gateway printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A response with its status, headers and body, whatever the status.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn from(result: Result<ureq::Response, ureq::Error>) -> Response {
        let resp = match result {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => panic!("request failed at the transport level: {e}"),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .flat_map(|name| {
                resp.all(&name)
                    .into_iter()
                    .map(|v| (name.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut body = Vec::new();
        resp.into_reader()
            .read_to_end(&mut body)
            .expect("read body");
        Response {
            status,
            headers,
            body,
        }
    }

    /// A header's value (names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `error.code` of an OpenAI-shaped error body.
    pub fn error_code(&self) -> String {
        let body = self.json();
        assert!(
            body["error"]["message"].is_string(),
            "not OpenAI-shaped: {body}"
        );
        assert!(
            body["error"]["type"].is_string(),
            "not OpenAI-shaped: {body}"
        );
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// GETs JSON, panicking on any failure.
pub fn get_json(url: &str) -> Value {
    ureq::get(url)
        .call()
        .expect("GET")
        .into_json()
        .expect("JSON body")
}

/// A chat request body.
pub fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "stream": stream})
}

/// The `Content-Length` an HTTP/1.1 head declares, if any.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse().unwrap())
    })
}

/// A connection to `port` on loopback whose reads give up after 10 s.
pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads `stream` up to and including `end`, a byte at a time (nothing
/// after it is taken).
fn read_through(stream: &mut TcpStream, end: &[u8], what: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(end) {
        stream.read_exact(&mut byte).expect(what);
        out.push(byte[0]);
    }
    out
}

/// Reads one response head (up to its blank line) off `stream`.
pub fn read_head(stream: &mut TcpStream) -> String {
    String::from_utf8_lossy(&read_through(stream, b"\r\n\r\n", "a response head")).into_owned()
}

/// Reads a chunked body off `stream` to its last chunk.
pub fn read_chunked(stream: &mut TcpStream) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let size_line = read_through(stream, b"\r\n", "a chunk size");
        let size = std::str::from_utf8(&size_line).unwrap().trim();
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        let mut chunk = vec![0u8; size + 2];
        stream.read_exact(&mut chunk).expect("a chunk");
        assert!(chunk.ends_with(b"\r\n"), "a chunk ends in CRLF");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// Sends raw bytes on a fresh connection and returns everything read until
/// the server closes it or `timeout` passes.
pub fn raw_exchange(port: u16, request: &[u8], timeout: Duration) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(request).expect("write request");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads an SSE response line by line, calling `on_data` with each `data:`
/// payload and the time since the request was sent.
pub fn read_sse(port: u16, key: &str, body: &Value, on_data: impl FnMut(&str, Duration)) -> u16 {
    read_sse_at(port, "/v1/chat/completions", key, body, on_data)
}

/// The `data:` payloads of an SSE response from `path`, and its status.
pub fn sse_events(port: u16, path: &str, key: &str, body: &Value) -> (u16, Vec<String>) {
    let mut events = Vec::new();
    let status = read_sse_at(port, path, key, body, |data, _| {
        events.push(data.to_string())
    });
    (status, events)
}

/// [`read_sse`] of a stream from `path`.
pub fn read_sse_at(
    port: u16,
    path: &str,
    key: &str,
    body: &Value,
    on_data: impl FnMut(&str, Duration),
) -> u16 {
    let body = body.to_string();
    read_sse_of(
        port,
        path,
        key,
        "application/json",
        body.as_bytes(),
        on_data,
    )
}

/// [`read_sse_at`] of a body of any `content_type` (a multipart form).
pub fn read_sse_of(
    port: u16,
    path: &str,
    key: &str,
    content_type: &str,
    body: &[u8],
    mut on_data: impl FnMut(&str, Duration),
) -> u16 {
    let started = Instant::now();
    let resp = match ureq::post(&format!("http://127.0.0.1:{port}{path}"))
        .set("authorization", &format!("Bearer {key}"))
        .set("content-type", content_type)
        .timeout(Duration::from_secs(30))
        .send_bytes(body)
    {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("stream request failed: {e}"),
    };
    let status = resp.status();
    let reader = BufReader::new(resp.into_reader());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data: ") {
            on_data(data, started.elapsed());
        }
    }
    status
}

/// A `redis-server` on a free port, without persistence, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Redis {
    /// Starts redis-server and waits until it answers PING.
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// Starts redis-server on `port` (to restart one that was killed).
    pub fn start_on(port: u16) -> Redis {
        Self::start_in(port, scratch_dir("redis"))
    }

    /// Starts redis-server on `port` with its data in `dir` (a dump there
    /// is loaded).
    fn start_in(port: u16, dir: PathBuf) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/setup.sh installs it)");
        let redis = Redis { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The config's `redis:` section (a line) for a test that is not about
    /// Redis failing: a call is given a second, not the default 50 ms. One
    /// that times out marks Redis down and moves limits, parking and the
    /// response store's lookups in-process, which a loaded machine must not
    /// do to such a test.
    pub fn section(&self) -> String {
        format!("redis: {{ url: \"{}\", timeout_ms: 1000 }}\n", self.url())
    }

    /// Stops the server the way an operator's restart does (`SHUTDOWN
    /// SAVE`: its data saved), then starts it again on the same port with
    /// the same data once `down` has run.
    pub fn restart_after(&mut self, down: impl FnOnce()) {
        self.cli(&["SHUTDOWN", "SAVE"]);
        let _ = self.child.wait();
        down();
        let again = Self::start_in(self.port, self.dir.clone());
        let old = std::mem::replace(self, again);
        std::mem::forget(old);
    }

    /// Kills the server (SIGKILL) and starts an empty one on the same port:
    /// a restart without persistence, as a failover to a replica that had
    /// not seen the latest writes loses them too.
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let again = Self::start_on(self.port);
        std::mem::forget(std::mem::replace(self, again));
    }

    /// Runs a command with redis-cli and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGSTOP: the server keeps its connections but answers nothing.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// SIGCONT after [`Redis::freeze`].
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a signal by name to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// The value of one sample in Prometheus text (`name{labels} value`), or 0.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of `name` whose labels contain each of `labels`
/// (whole `key="value"` pairs).
pub fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A chunked `POST /v1/chat/completions` of `body` (8 KiB chunks) with the
/// default tenant's key, asking the gateway to close afterwards.
pub fn chunked_chat_request(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TENANT_KEY}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

/// Polls `check` every 20 ms until it holds, or panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `id` is a UUID in its canonical text form.
pub fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The `x-request-id` the provider sees for a request the client (or a
/// job) named `id`: `id` itself when it is a UUID, else the UUID the
/// gateway makes from it.
pub fn upstream_id(id: &str) -> String {
    runestone::ids::upstream_request_id(id).into_owned()
}

/// Any request to `url`, with these headers and an optional body; any
/// status is returned, not an error.
pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Response {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(30));
    for (name, value) in headers {
        req = req.set(name, value);
    }
    Response::from(match body {
        Some(body) => req.send_bytes(body),
        None => req.call(),
    })
}

/// A callback receiver: answers 500 to the first `failures` deliveries
/// (to exercise the retries), then 200, and hands over every delivery it
/// received (request head, body) in order.
pub fn callback_receiver(failures: usize) -> (u16, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let read = stream.read(&mut buf).unwrap_or(0);
                if read == 0 {
                    break (String::new(), Vec::new());
                }
                data.extend_from_slice(&buf[..read]);
                if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..end]).to_string();
                    let len = content_length(&head).unwrap_or(0);
                    while data.len() < end + 4 + len {
                        let read = stream.read(&mut buf).unwrap_or(0);
                        if read == 0 {
                            break;
                        }
                        data.extend_from_slice(&buf[..read]);
                    }
                    let len = len.min(data.len() - end - 4);
                    break (head, data[end + 4..end + 4 + len].to_vec());
                }
            };
            if head.is_empty() {
                continue;
            }
            let status = if n < failures {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if tx.send((head, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// Starts the gateway binary directly (not through [`Gateway`], so the test
/// can kill -9 it), with its config, pid file, upgrade socket and output
/// (`gateway.log`) in `dir`; waits for `/ready`.
pub fn start_raw(config: &GatewayConfig, dir: &std::path::Path) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    start_raw_with(config, dir, log.try_clone().unwrap().into(), log.into())
}

/// [`start_raw`], its stdout and stderr going where the test says.
pub fn start_raw_with(
    config: &GatewayConfig,
    dir: &std::path::Path,
    stdout: std::process::Stdio,
    stderr: std::process::Stdio,
) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("runestone.yaml");
    std::fs::write(&path, config.yaml_in(dir)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .arg("--config")
        .arg(&path)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", config.port),
        &mut child,
        Duration::from_secs(20),
        "runestone",
    );
    child
}

/// The debt files beside `dir`'s `gw.pid`.
pub fn debt_files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let rest = name.strip_prefix("gw.pid.owed.").unwrap_or(".new");
            !rest.ends_with(".new")
        })
        .collect();
    found.sort();
    found
}

/// The requests a debt file says are owed (each debt's `SETTLE` call's
/// sixth argument).
pub fn requests_owed_in(path: &std::path::Path) -> u64 {
    let Ok(text) = std::fs::read(path) else {
        return 0;
    };
    let Ok(file) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return 0;
    };
    file["owed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|debt| debt["args"][5].as_str().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The requests the debt files beside `dir`'s `gw.pid` say are owed.
pub fn requests_owed_beside(dir: &std::path::Path) -> u64 {
    debt_files_in(dir).iter().map(|f| requests_owed_in(f)).sum()
}
