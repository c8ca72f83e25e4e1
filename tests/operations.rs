//! What operators rely on: the metrics pass `promtool check metrics`, the
//! alert rules pass `promtool check rules`, the dashboard queries only
//! metrics the gateway exports, and a SIGTERM drains in-flight requests.

mod common;

use common::*;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// promtool: `$PROMTOOL`, else the copy scripts/setup.sh unpacks, else PATH.
fn promtool() -> String {
    if let Ok(path) = std::env::var("PROMTOOL") {
        return path;
    }
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/bin/promtool");
    if std::path::Path::new(local).exists() {
        local.to_string()
    } else {
        "promtool".to_string()
    }
}

/// A gateway with every feature on, after traffic that touches every metric.
fn busy_gateway(redis: &Redis, mock: &Mock) -> Gateway {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![format!(
        "  - {{ name: mock, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", health_check: {{ path: \"/models\", interval_seconds: 1 }} }}",
        mock.base_url()
    )];
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 5, max_concurrent: 1, budget_usd: {{ amount: 10, period: daily }} }}\n    overflow: {{ enabled: true, max_wait_seconds: 1 }}\n"
    );
    config.extra = format!(
        "pricing:\n  gpt-4o-mini: {{ input: 1, output: 2 }}\n{}",
        redis.section()
    );
    let gw = Gateway::start(&config);
    // Two at once over one slot: the second is parked, then admitted.
    mock.fault(serde_json::json!({"latency_ms": 200}));
    std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            gw.post_json(
                "/v1/chat/completions",
                TENANT_KEY,
                &chat("gpt-4o-mini", false),
            )
        });
        let b = scope.spawn(|| {
            gw.post_json(
                "/v1/chat/completions",
                TENANT_KEY,
                &chat("gpt-4o-mini", true),
            )
        });
        assert_eq!(
            (a.join().unwrap().status, b.join().unwrap().status),
            (200, 200)
        );
    });
    // Past the RPM limit: parked, then refused when max_wait runs out.
    for i in 0..4 {
        gw.post_json(
            "/v1/chat/completions",
            TENANT_KEY,
            &chat("gpt-4o-mini", i % 2 == 0),
        );
    }
    gw.post_json(
        "/v1/chat/completions",
        "sk-wrong-key-xxx",
        &chat("gpt-4o-mini", false),
    );
    gw
}

#[test]
fn metrics_pass_promtool_check_metrics() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = busy_gateway(&redis, &mock);
    let names = [
        "runestone_requests_total",
        "runestone_request_duration_seconds",
        "runestone_time_to_first_token_seconds",
        "runestone_tokens_total",
        "runestone_cost_usd_total",
        "runestone_rate_limited_total",
        "runestone_inflight_requests",
        "runestone_overflow_parked",
        "runestone_overflow_total",
        "runestone_overflow_wait_seconds",
        "runestone_upstream_healthy",
        "runestone_circuit_state",
        "runestone_redis_up",
        "runestone_gateway_overhead_seconds",
        "runestone_errors_total",
        "runestone_budget_used_ratio",
    ];
    // A request's counters move once its answer is out (Pingora's logging
    // phase), so the last one's may trail its response a little.
    let exported = |metrics: &str, name: &str| metrics.contains(&format!("# TYPE {name} "));
    wait_until(
        Duration::from_secs(5),
        "every metric to be exported",
        || {
            let metrics = gw.metrics();
            names.iter().all(|name| exported(&metrics, name))
        },
    );
    let metrics = gw.metrics();
    for name in names {
        assert!(exported(&metrics, name), "{name} is exported");
    }
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh unpacks it into .tools/bin)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let out = Command::new(promtool())
        .args([
            "check",
            "rules",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prometheus-alerts.yaml"),
        ])
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("runestone_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let gw = busy_gateway(&redis, &mock);
    let metrics = gw.metrics();
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../conf/grafana-dashboard.json"))
            .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            used.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    used.extend(metric_names(include_str!("../conf/prometheus-alerts.yaml")));
    assert!(used.len() >= 15, "{used:?}");
    for name in used {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} is queried but not exported"
        );
    }
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let mock = Mock::start(&["--latency-ms", "1500"]);
    let mut config = GatewayConfig::new(&mock);
    config.grace = 5;
    let gw = Gateway::start(&config);
    let (resp, after) = answer_in_flight_at_sigterm(&gw, &mock);
    assert_eq!(
        resp.status, 200,
        "the in-flight request finished during the drain"
    );
    assert!(resp.json()["choices"][0]["message"]["content"].is_string());
    assert!(after < Duration::from_secs(5));
}

/// The answer to a chat request that has reached the provider when the
/// gateway is sent SIGTERM, and how long after the signal it came.
fn answer_in_flight_at_sigterm(gw: &Gateway, mock: &Mock) -> (Response, Duration) {
    std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| {
            gw.post_json(
                "/v1/chat/completions",
                TENANT_KEY,
                &chat("gpt-4o-mini", false),
            )
        });
        wait_until(
            Duration::from_secs(5),
            "the request to reach the provider",
            || mock.request_count() == 1,
        );
        let signalled = Instant::now();
        signal(gw.pid(), "TERM");
        (in_flight.join().unwrap(), signalled.elapsed())
    })
}

/// Sends requests on fresh connections until `stop`; counts (ok, failed).
fn load(port: u16, stop: &std::sync::atomic::AtomicBool) -> (u32, u32, Vec<String>) {
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections(0)
        .timeout(Duration::from_secs(10))
        .build();
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let result = agent
            .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .set("authorization", &format!("Bearer {TENANT_KEY}"))
            .send_json(chat("gpt-4o-mini", false));
        match result {
            Ok(resp) if resp.status() == 200 => ok += 1,
            Ok(resp) => {
                failed += 1;
                errors.push(format!("status {}", resp.status()));
            }
            Err(e) => {
                failed += 1;
                errors.push(e.to_string());
            }
        }
    }
    (ok, failed, errors)
}

#[test]
fn graceful_upgrade_hands_over_the_listener_without_a_failed_request() {
    let mock = Mock::start(&["--latency-ms", "20"]);
    let mut gw = Gateway::start(&GatewayConfig::new(&mock));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let port = gw.port;
    let (ok, failed, errors, mut upgraded) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4).map(|_| scope.spawn(|| load(port, &stop))).collect();
        wait_until(Duration::from_secs(5), "load to flow", || {
            mock.request_count() > 20
        });
        let upgraded = gw.start_upgrade();
        signal(gw.pid(), "QUIT");
        assert_eq!(
            gw.wait_exit(Duration::from_secs(15)),
            Some(0),
            "the old process drained and exited"
        );
        let served_by_old = mock.request_count();
        wait_until(Duration::from_secs(5), "the new process to serve", || {
            mock.request_count() > served_by_old + 20
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut totals = (0, 0, Vec::new());
        for worker in workers {
            let (ok, failed, errors) = worker.join().unwrap();
            totals.0 += ok;
            totals.1 += failed;
            totals.2.extend(errors);
        }
        (totals.0, totals.1, totals.2, upgraded)
    });
    let _ = upgraded.kill();
    let _ = upgraded.wait();
    assert!(ok > 40, "{ok} requests served");
    assert_eq!(
        failed, 0,
        "refused or failed during the upgrade: {errors:?}"
    );
}

/// Kills whatever process the pid file names when dropped: reloads leave a
/// new, detached process behind.
struct PidFileGuard(std::path::PathBuf);

impl PidFileGuard {
    /// The pid the file names now, if it names one (a foreground gateway
    /// writes it in place: it can be caught empty).
    fn try_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        text.trim().parse().ok().filter(|&pid| pid > 1)
    }

    /// The pid the file names, waiting a moment for one being written.
    fn pid(&self) -> u32 {
        let mut pid = None;
        wait_until(Duration::from_secs(5), "a pid in the pid file", || {
            pid = self.try_pid();
            pid.is_some()
        });
        pid.unwrap()
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        // Never `kill 0` (this whole process group) for an empty file.
        if let Some(pid) = self.try_pid() {
            signal(pid, "KILL");
        }
    }
}

/// The status of a chat completion through the gateway on `port` with `key`,
/// on a connection of its own.
fn chat_status(port: u16, key: &str) -> u16 {
    let agent = ureq::AgentBuilder::new().max_idle_connections(0).build();
    match agent
        .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(chat("gpt-4o-mini", false))
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r.status(),
        Err(e) => panic!("{e}"),
    }
}

/// The `/v1/usage` answer for `key`'s tenant (on a connection of its own:
/// after a reload, whichever process accepts it).
fn usage_of(port: u16, key: &str) -> serde_json::Value {
    let agent = ureq::AgentBuilder::new().max_idle_connections(0).build();
    agent
        .get(&format!("http://127.0.0.1:{port}/v1/usage"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// Whether the process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat.contains(") Z "))
}

/// Runs `BIN reload --config CONFIG` in `dir`: its exit code and all it
/// printed.
fn reload_with(
    bin: &std::path::Path,
    dir: &std::path::Path,
    config: &str,
) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(["reload", "--config", config])
        .current_dir(dir)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), said)
}

/// The access log lines in the file `path` (none when there is no file).
fn access_lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("\"type\":\"access\"")
        .count()
}

/// Waits for a gateway started by hand to answer `/health` on `port`.
fn wait_healthy(port: u16) {
    let health = format!("http://127.0.0.1:{port}/health");
    wait_until(Duration::from_secs(20), "the gateway", || {
        ureq::get(&health).call().is_ok()
    });
}

fn runestone_reload(config: &std::path::Path, dir: &std::path::Path) -> Option<i32> {
    let log = std::fs::File::create(dir.join("reload.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["reload", "--config"])
        .arg(config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap()
        .code()
}

/// Two `runestone reload` commands at once: both return once a new process
/// serves, and no request is left beside the pid file.
#[test]
fn two_reloads_at_once_leave_no_request_behind() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    for round in 0..3 {
        let before = guard.pid();
        let reload = || {
            Command::new(env!("CARGO_BIN_EXE_runestone"))
                .args(["reload", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut first, mut second) = (reload(), reload());
        assert_eq!(first.wait().unwrap().code(), Some(0), "round {round}");
        assert_eq!(second.wait().unwrap().code(), Some(0), "round {round}");
        assert_ne!(guard.pid(), before);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".reload."))
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
        wait_until(Duration::from_secs(15), "the old process to end", || {
            exited(before)
        });
    }
}

#[test]
fn reload_swaps_the_config_without_a_failed_request_and_refuses_a_broken_one() {
    const NEW_KEY: &str = "sk-tenant-beta-rotated-1";
    let mock = Mock::start(&["--latency-ms", "10"]);
    let mut config = GatewayConfig::new(&mock);
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let port = config.port;
    let ask = move |key: &str| chat_status(port, key);
    assert_eq!(ask(NEW_KEY), 401);
    let access_lines = |file: &str| access_lines_in(&dir.join(file));
    let first = guard.pid();

    // Add a key (the first step of a rotation) under load.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (reloaded, drained, (ok, failed, errors)) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3).map(|_| scope.spawn(|| load(port, &stop))).collect();
        config.tenants = format!(
            "\n  - id: acme\n    keys: [\"{TENANT_KEY}\", \"{NEW_KEY}\"]\n  - id: restricted\n    keys: [\"{}\"]\n    models: [text-embedding-3-small]\n",
            sha256_key(RESTRICTED_KEY)
        );
        std::fs::write(&path, config.yaml_in(&dir)).unwrap();
        let reloaded = runestone_reload(&path, &dir);
        let drained = gw.wait_exit(Duration::from_secs(15));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let load = workers.into_iter().map(|w| w.join().unwrap()).fold(
            (0, 0, Vec::new()),
            |mut acc, (o, f, e)| {
                acc.0 += o;
                acc.1 += f;
                acc.2.extend(e);
                acc
            },
        );
        (reloaded, drained, load)
    });
    assert_eq!(reloaded, Some(0));
    assert_eq!(drained, Some(0), "the old process drained and exited");
    // The command returns once the new process has taken over, and says which.
    let serving = guard.pid();
    assert_ne!(serving, first);
    let said = std::fs::read_to_string(dir.join("reload.log")).unwrap();
    assert!(
        said.contains(&format!("reloaded: process {serving} serves")),
        "{said}"
    );
    assert_eq!(ask(NEW_KEY), 200);
    assert!(ok > 10);
    assert_eq!(failed, 0, "failed during the reload: {errors:?}");
    // The new process writes where the old one did, not to the reload
    // command's output (gone once it returned).
    let lines = access_lines("gateway.log");
    assert_eq!(ask(NEW_KEY), 200);
    wait_until(
        Duration::from_secs(5),
        "the new process's access line",
        || access_lines("gateway.log") > lines,
    );
    assert_eq!(access_lines("reload.log"), 0);

    // A broken config is refused and the running one keeps serving.
    std::fs::write(&path, "server: [").unwrap();
    assert_eq!(runestone_reload(&path, &dir), Some(2));
    assert_eq!(ask(NEW_KEY), 200);
    assert_eq!(guard.pid(), serving);

    // SIGHUP works too: drop the old key (the end of the rotation). Sent
    // twice: the process hands over once, the second one is ignored.
    let handovers = || gw.log().matches("SIGHUP: handing over").count();
    let before = handovers();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{NEW_KEY}\"]\n");
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    signal(serving, "HUP");
    wait_until(Duration::from_secs(10), "a new process", || {
        guard.try_pid().is_some_and(|pid| pid != serving)
    });
    signal(serving, "HUP");
    wait_until(Duration::from_secs(10), "the old key to be refused", || {
        ask(TENANT_KEY) == 401
    });
    assert_eq!(ask(NEW_KEY), 200);
    wait_until(Duration::from_secs(15), "the old process to exit", || {
        exited(serving)
    });
    assert_eq!(handovers(), before + 1, "{}", gw.log());

    // Two reloads back to back: the second reaches a process that has just
    // written its pid file, still starting; it reloads once it can.
    const THIRD_KEY: &str = "sk-tenant-gamma-3";
    let mut earlier = Vec::new();
    for keys in [
        format!("\"{NEW_KEY}\", \"{TENANT_KEY}\""),
        format!("\"{THIRD_KEY}\""),
    ] {
        let before = guard.pid();
        config.tenants = format!("\n  - id: acme\n    keys: [{keys}]\n");
        std::fs::write(&path, config.yaml_in(&dir)).unwrap();
        assert_eq!(runestone_reload(&path, &dir), Some(0));
        earlier.push(before);
    }
    // A process accepts beside its successor for Pingora's five seconds
    // after the handover, then drains and exits.
    wait_until(
        Duration::from_secs(30),
        "the earlier processes to exit",
        || earlier.iter().all(|&pid| exited(pid)),
    );
    assert_eq!(ask(NEW_KEY), 401);
    let last = guard.pid();
    assert_eq!(ask(THIRD_KEY), 200);
    assert_eq!(guard.pid(), last, "the last process keeps serving");
}

#[test]
fn a_second_gateway_on_a_running_ones_pid_file_refuses_to_start() {
    // Started again on the same config (a careless operator, a unit
    // started twice): it used to write its pid over the running one's and
    // wait for the taken port forever, so that a reload reached it and the
    // running gateway could no longer be reloaded.
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let pid_file = dir.join("gw.pid");
    let guard = PidFileGuard(pid_file.clone());
    let running = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(running.trim(), gw.pid().to_string());
    // The same binary, and another version of another name (its check
    // knows the running one by the address it serves).
    let versioned = dir.join("runestone-2.0");
    std::fs::copy(env!("CARGO_BIN_EXE_runestone"), &versioned).unwrap();
    for binary in [
        std::path::Path::new(env!("CARGO_BIN_EXE_runestone")),
        &versioned,
    ] {
        let (code, said) = start_refused(binary, &path, &dir);
        assert_eq!(code, Some(1), "{said}");
        assert!(said.contains("already runs"), "{said}");
        assert!(said.contains(&gw.pid().to_string()), "{said}");
        assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), running);
    }
    // The running one still serves, and still reloads.
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    wait_healthy(config.port);
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
    assert_ne!(guard.pid(), gw.pid(), "the successor took over");
}

/// A child process killed when dropped (a failed assertion leaves none).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A restart by hand (`kill` then a start at once): the old process may not
/// have closed its listener yet when the new one looks, and the new one
/// refused to start, leaving nothing serving once the old one drained. Two
/// started so: exactly one serves, and the pid file names it (both used to
/// start once the old one stopped, the other left retrying the port).
/// Here the old one is held (SIGSTOP) still listening while they look,
/// then let go and stopped.
#[test]
fn gateways_started_as_the_last_one_is_told_to_stop_wait_for_it_and_one_serves() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let pid_file = dir.join("gw.pid");
    let _guard = PidFileGuard(pid_file.clone());
    signal(gw.pid(), "STOP");
    let start = |name: &str| {
        let log = std::fs::File::create(dir.join(name)).unwrap();
        Reaped(
            Command::new(env!("CARGO_BIN_EXE_runestone"))
                .arg("--config")
                .arg(&path)
                .current_dir(&dir)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let mut next = [start("next-0.log"), start("next-1.log")];
    // One holds the pid file's start lock while it looks.
    let locked = || {
        let file = std::fs::File::open(&pid_file).unwrap();
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    };
    let ended = |next: &mut [Reaped; 2]| next.iter_mut().any(|n| n.0.try_wait().unwrap().is_some());
    wait_until(Duration::from_secs(10), "the next ones to look", || {
        locked() || ended(&mut next)
    });
    // A start that does not wait refuses within these 300 ms; one that
    // waits is still there.
    let _ = (0..15).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        ended(&mut next)
    });
    signal(gw.pid(), "CONT");
    signal(gw.pid(), "TERM");
    let said =
        |i: usize| std::fs::read_to_string(dir.join(format!("next-{i}.log"))).unwrap_or_default();
    let mut refused = None;
    wait_until(Duration::from_secs(15), "one of them to give up", || {
        refused = (0..2).find(|&i| next[i].0.try_wait().unwrap().is_some());
        refused.is_some()
    });
    let refused = refused.unwrap();
    let serving = 1 - refused;
    assert_eq!(
        next[refused].0.wait().unwrap().code(),
        Some(1),
        "{}",
        said(refused)
    );
    assert!(said(refused).contains("already runs"), "{}", said(refused));
    wait_healthy(config.port);
    assert!(
        next[serving].0.try_wait().unwrap().is_none(),
        "{}",
        said(serving)
    );
    let named = std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(
        named.trim(),
        next[serving].0.id().to_string(),
        "{}",
        said(serving)
    );
    assert!(
        said(serving).contains("Starting service: runestone api"),
        "{}",
        said(serving)
    );
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
}

/// `config` written as `runestone.yaml` into a new directory of its own
/// (`runestone-test-NAME-PORT` in the temporary directory), with its pid
/// file and upgrade socket there: the directory and the file's path.
fn config_in_a_dir_of_its_own(
    config: &GatewayConfig,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("runestone-test-{name}-{}", config.port));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("runestone.yaml");
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    (dir, path)
}

/// Starts `binary` on the config at `path` (in `dir`), expecting it to
/// refuse: its exit code (`None` when it was still running after 10 s, and
/// killed then) and what it wrote to stderr.
fn start_refused(
    binary: &std::path::Path,
    path: &std::path::Path,
    dir: &std::path::Path,
) -> (Option<i32>, String) {
    let mut start = Command::new(binary)
        .arg("--config")
        .arg(path)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = (0..200).find_map(|_| {
        let status = start.try_wait().unwrap();
        if status.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        status
    });
    if status.is_none() {
        let _ = start.kill();
        let _ = start.wait();
    }
    let mut said = String::new();
    start
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    (status.and_then(|s| s.code()), said)
}

/// A gateway whose address another program holds (another service, a
/// gateway on another pid file) says so and exits: it used to write its
/// pid, retry the bind for 30 s, then panic in Pingora's listener and stay
/// alive serving nothing, named in the pid file.
#[test]
fn a_gateway_whose_address_another_program_holds_says_so_and_exits() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let (dir, path) = config_in_a_dir_of_its_own(&config, "taken");
    let _guard = PidFileGuard(dir.join("gw.pid"));
    let holder = std::net::TcpListener::bind(("127.0.0.1", config.port)).unwrap();
    let (code, said) = start_refused(
        std::path::Path::new(env!("CARGO_BIN_EXE_runestone")),
        &path,
        &dir,
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("cannot listen on server.listen"), "{said}");
    assert!(said.contains(&config.port.to_string()), "{said}");
    let named = std::fs::read_to_string(dir.join("gw.pid")).unwrap_or_default();
    assert!(
        named.trim().is_empty(),
        "the pid file names nobody: {named}"
    );
    // The same when the pid file names a running gateway that serves on
    // another address: it is not the one holding this one.
    let other = Gateway::start(&GatewayConfig::new(&mock));
    std::fs::write(dir.join("gw.pid"), other.pid().to_string()).unwrap();
    let (code, said) = start_refused(
        std::path::Path::new(env!("CARGO_BIN_EXE_runestone")),
        &path,
        &dir,
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("cannot listen on server.listen"), "{said}");
    drop(other);
    // Once the port is free, the same config starts.
    drop(holder);
    let mut next = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(config.port);
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
    signal(next.id(), "TERM");
    assert!(next.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two gateways started at the same moment on one config: one serves and
/// the pid file names it; the other refuses to start (both found none
/// running, and the one left waiting for the port could write its pid over
/// the one that serves).
#[test]
fn two_gateways_started_at_once_leave_one_serving_and_named() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let (dir, path) = config_in_a_dir_of_its_own(&config, "twice");
    let guard = PidFileGuard(dir.join("gw.pid"));
    for round in 0..3 {
        let start = || {
            Command::new(env!("CARGO_BIN_EXE_runestone"))
                .arg("--config")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut both = [Reaped(start()), Reaped(start())];
        let mut refused = None;
        wait_until(Duration::from_secs(40), "one of them to give up", || {
            refused = (0..2).find(|&i| both[i].0.try_wait().unwrap().is_some());
            refused.is_some()
        });
        let refused = refused.unwrap();
        let serving = 1 - refused;
        let mut said = String::new();
        std::io::Read::read_to_string(&mut both[refused].0.stderr.take().unwrap(), &mut said)
            .unwrap();
        assert_eq!(
            both[refused].0.wait().unwrap().code(),
            Some(1),
            "round {round}: {said}"
        );
        assert!(said.contains("already runs"), "round {round}: {said}");
        wait_healthy(config.port);
        assert_eq!(guard.pid(), both[serving].0.id(), "round {round}");
        assert_eq!(chat_status(config.port, TENANT_KEY), 200);
        signal(both[serving].0.id(), "TERM");
        assert!(both[serving].0.wait().unwrap().success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gateway_started_while_the_last_one_drains_takes_over() {
    // A restart by hand (SIGTERM, then start at once): the old process
    // still runs its grace period, and its pid file names it, but it
    // listens no more, so the new one starts and serves.
    let mock = Mock::start(&["--latency-ms", "3000"]);
    let mut config = GatewayConfig::new(&mock);
    config.grace = 10;
    let gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| chat_status(config.port, TENANT_KEY));
        wait_until(
            Duration::from_secs(5),
            "the request to reach the provider",
            || mock.request_count() == 1,
        );
        signal(gw.pid(), "TERM");
        wait_until(
            Duration::from_secs(5),
            "the old one to stop listening",
            || std::net::TcpListener::bind(("127.0.0.1", config.port)).is_ok(),
        );
        let log = std::fs::File::create(dir.join("next.log")).unwrap();
        // Its pid file left writable by anyone (a gateway started under
        // umask 000 made it so), and under such a umask itself.
        std::fs::set_permissions(
            dir.join("gw.pid"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        let mut next = Command::new("sh")
            .args(["-c", "umask 000 && exec \"$0\" --config \"$1\""])
            .arg(env!("CARGO_BIN_EXE_runestone"))
            .arg(&path)
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            let health = format!("http://127.0.0.1:{}/health", config.port);
            next.try_wait().unwrap().is_none() && ureq::get(&health).call().is_ok()
        });
        let said = std::fs::read_to_string(dir.join("next.log")).unwrap_or_default();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("gw.pid")).unwrap().permissions(),
        );
        let named = std::fs::read_to_string(dir.join("gw.pid")).unwrap_or_default();
        let _ = next.kill();
        let _ = next.wait();
        assert!(started, "the next gateway did not serve: {said}");
        assert_eq!(
            named.trim(),
            next.id().to_string(),
            "the pid file is the new one's: {said}"
        );
        assert_eq!(mode & 0o777, 0o644, "its pid file, whatever the umask");
        assert!(!exited(gw.pid()), "the old one was still draining");
        assert_eq!(in_flight.join().unwrap(), 200, "and finished its request");
    });
}

#[test]
fn a_reload_that_would_not_see_a_changed_environment_is_refused() {
    // A key taken from the environment (`${VAR}`), rotated there: the
    // command validates the config with the new value, but the new process
    // is the running one's child, with its environment. It used to report
    // success while the old key went on working and the new one was
    // refused.
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    config.tenants = "\n  - id: acme\n    keys: [\"${ROTATED_KEY}\"]\n".into();
    let gw = Gateway::start_with_env(&config, &[("ROTATED_KEY", TENANT_KEY)]);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let reload = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_runestone"))
            .args(["reload", "--config"])
            .arg(&path)
            .env("ROTATED_KEY", value)
            .output()
            .unwrap()
    };
    let refused = reload("sk-tenant-rotated-2");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("ROTATED_KEY") && said.contains("restart"),
        "{said}"
    );
    assert!(
        !said.contains("sk-tenant-rotated-2") && !said.contains(TENANT_KEY),
        "never a value: {said}"
    );
    assert_eq!(guard.pid(), gw.pid(), "nothing changed");
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
    // With the environment the gateway has, the reload goes ahead.
    let reloaded = reload(TENANT_KEY);
    assert_eq!(
        reloaded.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    wait_healthy(config.port);
    assert_ne!(guard.pid(), gw.pid(), "the successor took over");
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
}

#[test]
fn a_daemon_started_on_a_relative_path_reloads_itself_and_writes_where_it_did() {
    const NEW_KEY: &str = "sk-tenant-daemon-new-1";
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let (dir, _) = config_in_a_dir_of_its_own(&config, "daemon");
    let guard = PidFileGuard(dir.join("gw.pid"));
    // Pingora's daemon keeps the stdout it was started with.
    let out = std::fs::File::create(dir.join("daemon.out")).unwrap();
    let started = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["--config", "runestone.yaml", "--daemon"])
        .current_dir(&dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(started.success());
    wait_healthy(config.port);
    let first = guard.pid();
    assert_eq!(chat_status(config.port, NEW_KEY), 401);

    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\", \"{NEW_KEY}\"]\n");
    std::fs::write(dir.join("runestone.yaml"), config.yaml_in(&dir)).unwrap();
    let (code, said) = reload_with(
        env!("CARGO_BIN_EXE_runestone").as_ref(),
        &dir,
        "runestone.yaml",
    );
    assert_eq!(code, Some(0), "{said}");
    let second = guard.pid();
    assert_ne!(second, first);
    assert!(
        said.contains(&format!("reloaded: process {second} serves")),
        "{said}"
    );
    wait_until(Duration::from_secs(20), "the first daemon to exit", || {
        exited(first)
    });
    assert_eq!(chat_status(config.port, NEW_KEY), 200);
    // The new daemon is the old one's child: same stdout, and its own
    // working directory is the one it was started from.
    let access = || access_lines_in(&dir.join("daemon.out"));
    let lines = access();
    assert_eq!(chat_status(config.port, NEW_KEY), 200);
    wait_until(
        Duration::from_secs(5),
        "the new daemon's access line",
        || access() > lines,
    );
    assert!(!said.contains("\"type\":\"access\""), "{said}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{second}/cwd")).unwrap(),
        dir.canonicalize().unwrap()
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_runs_the_commands_binary_on_its_file_and_keeps_the_gateways_output() {
    const NEW_KEY: &str = "sk-tenant-other-file-1";
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let dir = std::env::temp_dir().join(format!("runestone-test-binaries-{}", config.port));
    std::fs::create_dir_all(&dir).unwrap();
    let installed = dir.join("runestone");
    std::fs::copy(env!("CARGO_BIN_EXE_runestone"), &installed).unwrap();
    std::fs::write(dir.join("runestone.yaml"), config.yaml_in(&dir)).unwrap();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let out = std::fs::File::create(dir.join("gateway.out")).unwrap();
    let mut first = Command::new(&installed)
        .args(["--config", "runestone.yaml"])
        .current_dir(&dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_healthy(config.port);
    let access = || access_lines_in(&dir.join("gateway.out"));
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();

    // Another file, and a new version installed beside the old one: the
    // command's binary runs the command's file, as the gateway's child.
    std::fs::create_dir_all(dir.join("next")).unwrap();
    let beside = dir.join("next/runestone");
    std::fs::copy(env!("CARGO_BIN_EXE_runestone"), &beside).unwrap();
    config.tenants = format!("\n  - id: acme\n    keys: [\"{NEW_KEY}\"]\n");
    std::fs::write(dir.join("other.yaml"), config.yaml_in(&dir)).unwrap();
    let (code, said) = reload_with(&beside, &dir, "other.yaml");
    assert_eq!(code, Some(0), "{said}");
    let second = guard.pid();
    assert_ne!(second, first.id());
    assert_eq!(exe(second), beside);
    let _ = first.wait();
    assert_eq!(chat_status(config.port, NEW_KEY), 200);
    assert_eq!(chat_status(config.port, TENANT_KEY), 401);
    // A reload is no fault: neither process logs an error.
    let output = std::fs::read_to_string(dir.join("gateway.out")).unwrap();
    assert!(!output.contains(" ERROR "), "{output}");
    let lines = access();
    assert_eq!(chat_status(config.port, NEW_KEY), 200);
    wait_until(
        Duration::from_secs(5),
        "the new process's access line",
        || access() > lines,
    );
    assert!(!said.contains("\"type\":\"access\""), "{said}");
    let requests = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|f| {
            let name = f.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("gw.pid.reload")
        })
        .count();
    assert_eq!(requests, 0, "the request is taken");

    // That binary replaced in place (as a package upgrade does), then
    // SIGHUP: the process runs what is at its binary's path now.
    let fresh = dir.join("next/.runestone.new");
    std::fs::copy(env!("CARGO_BIN_EXE_runestone"), &fresh).unwrap();
    std::fs::rename(&fresh, &beside).unwrap();
    signal(second, "HUP");
    wait_until(
        Duration::from_secs(10),
        "a process on the new binary",
        || guard.try_pid().is_some_and(|pid| pid != second),
    );
    let third = guard.pid();
    assert_eq!(exe(third), beside, "not the deleted binary");
    wait_until(
        Duration::from_secs(20),
        "the second process to exit",
        || exited(second),
    );
    assert_eq!(chat_status(config.port, NEW_KEY), 200);

    // A versioned binary (`runestone-2.0`, where a `runestone` link now
    // points): the running process is another binary of another name, but
    // it serves the config's address, so it is asked.
    let versioned = dir.join("runestone-2.0");
    std::fs::copy(env!("CARGO_BIN_EXE_runestone"), &versioned).unwrap();
    let (code, said) = reload_with(&versioned, &dir, "other.yaml");
    assert_eq!(code, Some(0), "{said}");
    wait_until(Duration::from_secs(20), "the third process to exit", || {
        exited(third)
    });
    let third = guard.pid();
    assert_eq!(exe(third), versioned);
    assert_eq!(chat_status(config.port, NEW_KEY), 200);

    // A pid file naming a process that is not runestone is refused and
    // nothing is signalled.
    let mut stranger = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&guard.0, stranger.id().to_string()).unwrap();
    let (code, said) = reload_with(&beside, &dir, "other.yaml");
    assert_eq!(code, Some(1));
    assert!(said.contains("is not runestone"), "{said}");
    assert!(stranger.try_wait().unwrap().is_none(), "the stranger lives");
    let _ = stranger.kill();
    let _ = stranger.wait();
    // Nor one anyone may write, even naming the right pid.
    std::fs::write(&guard.0, third.to_string()).unwrap();
    let mode =
        |m| std::fs::set_permissions(&guard.0, std::os::unix::fs::PermissionsExt::from_mode(m));
    mode(0o666).unwrap();
    let (code, said) = reload_with(&beside, &dir, "other.yaml");
    assert_eq!(code, Some(1));
    assert!(said.contains("anyone may write it"), "{said}");
    mode(0o644).unwrap();

    // Nor is a pid file that is a symlink, even to the right pid.
    std::fs::write(dir.join("elsewhere.pid"), third.to_string()).unwrap();
    std::fs::remove_file(&guard.0).unwrap();
    std::os::unix::fs::symlink(dir.join("elsewhere.pid"), &guard.0).unwrap();
    let (code, said) = reload_with(&beside, &dir, "other.yaml");
    assert_eq!(code, Some(1));
    assert!(said.contains("symlink"), "{said}");
    assert!(!exited(third));
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_successor_that_cannot_start_gets_nothing_and_the_gateway_keeps_serving() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let pid = guard.pid();
    let yaml = config.yaml_in(&dir);
    let sock = format!("{}/gw.sock", dir.display());
    assert!(yaml.contains(&sock));
    let log_says = |what: &str| gw.log().contains(what);

    // The upgrade socket moved: Pingora hands the sockets over through the
    // old one's path, so the reload is refused.
    std::fs::write(&path, yaml.replace(&sock, &format!("{sock}2"))).unwrap();
    signal(pid, "HUP");
    wait_until(Duration::from_secs(10), "the refusal", || {
        log_says("server.upgrade_sock changed")
    });
    // The command hears of it from the gateway (not from its own deadline).
    let (code, said) = reload_with(
        env!("CARGO_BIN_EXE_runestone").as_ref(),
        &dir,
        path.to_str().unwrap(),
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("refused the reload") && said.contains("server.upgrade_sock changed"),
        "{said}"
    );

    // So is a moved pid file (SIGHUP alone: the command finds the gateway
    // through the new file's path, and does not).
    let pid_path = format!("{}/gw.pid", dir.display());
    assert!(yaml.contains(&pid_path));
    std::fs::write(&path, yaml.replace(&pid_path, &format!("{pid_path}2"))).unwrap();
    signal(pid, "HUP");
    wait_until(Duration::from_secs(10), "the refusal", || {
        log_says("server.pid_file changed")
    });

    // The API moved to an address another program holds: refused before
    // anything is handed over (the new process would serve nothing).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = format!("127.0.0.1:{}", config.port);
    assert!(yaml.contains(&listen));
    std::fs::write(
        &path,
        yaml.replace(&listen, &taken.local_addr().unwrap().to_string()),
    )
    .unwrap();
    signal(pid, "HUP");
    wait_until(Duration::from_secs(10), "the refusal", || {
        log_says("cannot listen on")
    });

    // A successor that dies at its start (here it cannot bind the upgrade
    // socket: a directory is in the way): the running process never hands
    // over.
    std::fs::write(&path, &yaml).unwrap();
    std::fs::create_dir(&sock).unwrap();
    signal(pid, "HUP");
    wait_until(Duration::from_secs(15), "the successor's failure", || {
        log_says("the new process exited at its start")
            || log_says("the new process did not wait for the sockets")
    });
    assert!(!exited(pid));
    assert_eq!(chat_status(config.port, TENANT_KEY), 200);
    assert!(!log_says("SIGQUIT received"), "{}", gw.log());
    // Stopped then, it leaves no usage for a new process (none took over;
    // its own usage, handed to the one that died, is nobody's).
    signal(pid, "TERM");
    wait_until(Duration::from_secs(15), "the gateway to stop", || {
        exited(pid)
    });
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".usage."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn sigterm_under_load_drains_requests_and_running_jobs() {
    let redis = Redis::start();
    let mock = Mock::start(&["--latency-ms", "300"]);
    let mut config = GatewayConfig::new(&mock);
    config.grace = 5;
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    overflow: {{ enabled: true }}\n"
    );
    config.extra = format!(
        "{}jobs: {{ visibility_timeout_seconds: 2 }}\n",
        redis.section()
    );
    let mut gw = Gateway::start(&config);
    let submit = || {
        let resp = gw.post_raw(
            "/v1/chat/completions",
            &[
                ("authorization", &format!("Bearer {TENANT_KEY}")),
                ("prefer", "respond-async"),
            ],
            chat("gpt-4o-mini", false).to_string().as_bytes(),
        );
        assert_eq!(resp.status, 202);
        resp.json()["id"].as_str().unwrap().to_string()
    };
    let job = submit();
    wait_until(Duration::from_secs(5), "the job to be running", || {
        mock.request_count() == 1
    });
    let port = gw.port;
    let (answered, failures) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().max_idle_connections(0).build();
                    let (mut answered, mut failures) = (0, Vec::new());
                    loop {
                        let result = agent
                            .post(&format!("http://127.0.0.1:{port}/v1/chat/completions"))
                            .set("authorization", &format!("Bearer {TENANT_KEY}"))
                            .send_json(chat("gpt-4o-mini", false));
                        match result {
                            Ok(resp) if resp.status() == 200 => answered += 1,
                            Ok(resp) => failures.push(format!("status {}", resp.status())),
                            Err(ureq::Error::Status(code, _)) => {
                                failures.push(format!("status {code}"))
                            }
                            // The listener is closed: the drain has begun.
                            Err(ureq::Error::Transport(t))
                                if t.kind() == ureq::ErrorKind::ConnectionFailed =>
                            {
                                break
                            }
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (answered, failures)
                })
            })
            .collect();
        wait_until(Duration::from_secs(5), "load to flow", || {
            mock.request_count() > 4
        });
        signal(gw.pid(), "TERM");
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .fold((0, Vec::new()), |mut acc, (a, f)| {
                acc.0 += a;
                acc.1.extend(f);
                acc
            })
    });
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(answered > 3);
    assert!(
        failures.is_empty(),
        "every accepted request was answered: {failures:?}"
    );
    // The job that was running when SIGTERM came finished and stored its
    // answer before the process stopped: it runs once.
    let done = Gateway::start(&config);
    let state = done.get(&format!("/v1/jobs/{job}"), Some(TENANT_KEY));
    assert_eq!(
        state.status,
        200,
        "{}",
        String::from_utf8_lossy(&state.body)
    );
    let runs = mock
        .requests()
        .iter()
        .filter(|r| r["headers"]["x-request-id"] == upstream_id(&job).as_str())
        .count();
    assert_eq!(runs, 1);
}

#[test]
fn the_kubernetes_example_carries_a_valid_config() {
    let manifests = include_str!("../deploy/kubernetes/runestone.yaml");
    let mut kinds = Vec::new();
    let mut embedded = None;
    for doc in serde_yaml::Deserializer::from_str(manifests) {
        let value = serde_yaml::Value::deserialize(doc).expect("each manifest is YAML");
        kinds.push(value["kind"].as_str().unwrap_or_default().to_string());
        if value["kind"] == "ConfigMap" {
            embedded = value["data"]["runestone.yaml"].as_str().map(str::to_string);
        }
        if value["kind"] == "Deployment" {
            let container = &value["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
            assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
        }
    }
    for kind in [
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "StatefulSet",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    let dir = std::env::temp_dir().join(format!("runestone-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("runestone.yaml");
    std::fs::write(&path, embedded.expect("the ConfigMap holds runestone.yaml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config"])
        .arg(&path)
        .env("OPENAI_API_KEY", "sk-test")
        .env("ACME_DEV_KEY", "sk-acme-test-key")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
    let example = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/runestone.yaml"),
        ])
        .env("OPENAI_API_KEY", "sk-test")
        .env("ACME_DEV_KEY", "sk-acme-test-key")
        .output()
        .unwrap();
    assert_eq!(
        example.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&example.stderr)
    );
}

#[test]
fn a_stdout_nobody_reads_never_holds_up_requests_and_shutdown_loses_no_log_line() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let dir = std::env::temp_dir().join(format!("runestone-log-{}", std::process::id()));
    // stdout is a pipe read by nobody until the end: it fills after about
    // 64 KiB (some 150 lines).
    let mut child = start_raw_with(&config, &dir, Stdio::piped(), Stdio::null());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let requests = 1000;
    for i in 0..requests {
        let resp = agent
            .post(&format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                config.port
            ))
            .set("authorization", &format!("Bearer {TENANT_KEY}"))
            .send_json(chat("gpt-4o-mini", false));
        assert!(
            matches!(&resp, Ok(r) if r.status() == 200),
            "request {i} with the log pipe full: {resp:?}"
        );
    }
    let mut stdout = child.stdout.take().unwrap();
    signal(child.id(), "TERM");
    let mut log = String::new();
    stdout.read_to_string(&mut log).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let lines = log
        .lines()
        .filter(|l| l.contains("\"type\":\"access\"") && l.contains("\"endpoint\":\"chat\""))
        .count();
    assert_eq!(lines, requests, "every request's line, written at shutdown");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload while Redis is unavailable: the new process starts knowing the
/// spend the old one knew, so a spent budget stays spent rather than
/// starting afresh until Redis answers.
#[test]
fn a_reload_while_redis_is_away_keeps_a_spent_budget_spent() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    // Each request costs (7 * $1 + 16 * $2) / 1M = $0.000039: the third
    // crosses the budget.
    config.tenants = format!(
        "\n  - id: other\n    keys: [\"{RESTRICTED_KEY}\"]\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ budget_usd: {{ amount: 0.0001, period: daily }} }}\n"
    );
    config.extra = format!(
        "pricing:\n  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}\nredis: {{ url: \"{}\", timeout_ms: 300 }}\n",
        redis.url()
    );
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let first = guard.pid();
    let port = config.port;
    for _ in 0..3 {
        assert_eq!(chat_status(port, TENANT_KEY), 200);
    }
    assert_eq!(chat_status(port, TENANT_KEY), 429, "spent");
    redis.freeze();
    // The tenants in another order: the spend follows the tenant's id.
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ budget_usd: {{ amount: 0.0001, period: daily }} }}\n  - id: other\n    keys: [\"{RESTRICTED_KEY}\"]\n"
    );
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    assert_ne!(guard.pid(), first);
    for _ in 0..3 {
        assert_eq!(
            chat_status(port, TENANT_KEY),
            429,
            "still spent, Redis away"
        );
    }
    assert_eq!(
        chat_status(port, RESTRICTED_KEY),
        200,
        "the other tenant has no budget"
    );
    redis.thaw();
}

#[test]
fn a_reload_without_redis_keeps_a_spent_budget_spent_and_the_usage() {
    // In-process limits: the new process is handed each tenant's usage in
    // its period, so a spent `total` budget stays spent (it reopened at
    // every reload) and `/v1/usage` goes on counting, whatever the
    // tenants' order in the new file.
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    // Each request costs (7 * $1 + 16 * $2) / 1M = $0.000039: the third
    // crosses the budget.
    let tenants = |acme_first: bool| {
        let acme = format!("  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ budget_usd: {{ amount: 0.0001, period: total }} }}\n");
        let other = format!("  - id: other\n    keys: [\"{RESTRICTED_KEY}\"]\n");
        match acme_first {
            true => format!("\n{acme}{other}"),
            false => format!("\n{other}{acme}"),
        }
    };
    config.tenants = tenants(false);
    config.extra = "pricing:\n  gpt-4o-mini: { input: 1.0, output: 2.0 }\n".into();
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let first = guard.pid();
    let port = config.port;
    for _ in 0..3 {
        assert_eq!(chat_status(port, TENANT_KEY), 200);
    }
    assert_eq!(chat_status(port, TENANT_KEY), 429, "spent");
    assert_eq!(chat_status(port, RESTRICTED_KEY), 200);
    let usage = |key: &str| {
        let answer = usage_of(port, key);
        (
            answer["requests"].as_u64().unwrap(),
            answer["cost_usd"].as_f64().unwrap(),
        )
    };
    let before = (usage(TENANT_KEY), usage(RESTRICTED_KEY));
    assert_eq!((before.0 .0, before.1 .0), (3, 1));
    config.tenants = tenants(true);
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    assert_ne!(guard.pid(), first);
    assert_eq!(chat_status(port, TENANT_KEY), 429, "still spent");
    assert_eq!((usage(TENANT_KEY), usage(RESTRICTED_KEY)), before);
    assert_eq!(chat_status(port, RESTRICTED_KEY), 200);
    assert_eq!(usage(RESTRICTED_KEY).0, 2, "and counting on");
}

/// Without Redis, a reload hands the new process what each tenant took of
/// its requests and tokens minutes: a reload is no fresh minute, and a
/// limit raised by it has the rest of its minute at once.
#[test]
fn a_reload_without_redis_keeps_the_minutes_taken() {
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let tenant = |rpm: u32| {
        format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: {rpm} }}\n")
    };
    config.tenants = tenant(3);
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let port = config.port;
    let served = || {
        (0..10)
            .map(|_| chat_status(port, TENANT_KEY))
            .take_while(|status| *status == 200)
            .count()
    };
    assert_eq!(served(), 3);
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(
        chat_status(port, TENANT_KEY),
        429,
        "the minute is still taken"
    );
    // Raised to 6: the three taken count against it (asked once the old
    // process, which accepts beside the new one for 5 s, has ended).
    let guard = PidFileGuard(dir.join("gw.pid"));
    let second = guard.pid();
    config.tenants = tenant(6);
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    wait_until(Duration::from_secs(15), "the second process to end", || {
        exited(second)
    });
    assert_eq!(served(), 3);
}

/// A stream still running when the old process's grace period ends is
/// ended then, its client told in-band, and billed what it carried (the
/// process dropped it unbilled with its runtimes).
#[test]
fn a_stream_running_past_the_grace_period_is_billed_what_it_carried() {
    // 60 tokens at 5 a second: twelve seconds, past the old process's 5 s
    // beside the new one and its 1 s grace period.
    let mock = Mock::start(&["--tokens-per-second", "5"]);
    let config = GatewayConfig::new(&mock);
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    // The successor is stopped with the test.
    let _successor = PidFileGuard(dir.join("gw.pid"));
    let port = config.port;
    let stream = std::thread::spawn(move || {
        let mut body = chat("gpt-4o-mini", true);
        body["mock_tokens"] = serde_json::json!(60);
        let (mut tokens, mut last) = (0, String::new());
        let status = read_sse(port, TENANT_KEY, &body, |data, _| {
            tokens += usize::from(data.contains("tok"));
            last = data.to_string();
        });
        (status, tokens, last)
    });
    wait_until(Duration::from_secs(5), "the stream to run", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_inflight_requests{tenant="acme"}"#,
        ) == 1.0
    });
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    let (status, tokens, last) = stream.join().unwrap();
    assert_eq!(status, 200);
    assert!((10..60).contains(&tokens), "cut short: {tokens} tokens");
    // Told so (an error event, no `[DONE]`): the SDKs raise.
    assert!(last.contains("gateway_stopping"), "{last}");
    let usage = || {
        let answer = usage_of(port, TENANT_KEY);
        (
            answer["requests"].as_u64().unwrap(),
            answer["completion_tokens"].as_u64().unwrap(),
        )
    };
    wait_until(Duration::from_secs(5), "the cut stream counted", || {
        usage().0 == 1
    });
    let (_, completion) = usage();
    assert!(
        completion as usize >= tokens,
        "billed {completion} completion tokens for {tokens} carried"
    );
    let log = gw.log();
    assert!(
        log.contains("the grace period ends with requests still running"),
        "{log}"
    );
    assert!(log.contains(r#""error":"gateway_stopping""#), "{log}");
}

/// A JSON request still waiting for its provider's answer when the grace
/// period ends is told so (503 `gateway_stopping`, retryable) rather than
/// left with its connection closed unanswered, and billed its prompt.
#[test]
fn a_request_waiting_past_the_grace_period_is_told_the_gateway_stopped() {
    let mock = Mock::start(&["--latency-ms", "30000"]);
    let config = GatewayConfig::new(&mock);
    let mut gw = Gateway::start(&config);
    let (answer, _) = answer_in_flight_at_sigterm(&gw, &mock);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_code(), "gateway_stopping");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = gw.log();
    let line = log
        .lines()
        .find(|line| line.contains(r#""endpoint":"chat""#))
        .unwrap_or_else(|| panic!("no access log line: {log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["status"], 503, "{line}");
    assert_eq!(line["error"], "gateway_stopping", "{line}");
    assert!(line["prompt_tokens"].as_u64().unwrap() > 0, "{line}");
}

/// A client still sending its request's body when the grace period ends
/// is told so (503 `gateway_stopping`) and logged, where the runtimes
/// dropped it unanswered and unlogged.
#[test]
fn a_request_whose_body_is_still_arriving_at_the_grace_periods_end_is_told_so() {
    let mock = Mock::start(&[]);
    let config = GatewayConfig::new(&mock);
    let mut gw = Gateway::start(&config);
    let mut stream = connect(config.port);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // Asked for its body: the gateway reads it now.
    let interim = read_head(&mut stream);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(br#"{"model":"#).unwrap();
    signal(gw.pid(), "TERM");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("gateway_stopping"), "{answer}");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = gw.log();
    assert!(
        log.lines().any(|line| line.contains(r#""endpoint":"chat""#)
            && line.contains(r#""status":503"#)
            && line.contains(r#""error":"gateway_stopping""#)),
        "{log}"
    );
}

/// Without Redis, what the old process settles after a reload handed its
/// usage over (a request in flight then) is left for the new process when
/// the old one ends, and counted there: a budget is not overspent by it.
#[test]
fn a_reload_without_redis_counts_what_the_old_process_settled_after_it() {
    // Every answer takes 2 s: a request sent just before the reload ends in
    // the old process, after the handover.
    let mock = Mock::start(&["--latency-ms", "2000"]);
    let mut config = GatewayConfig::new(&mock);
    // (7 * $1 + 16 * $2) / 1M = $0.000039 a request: the third crosses it.
    config.tenants = format!("\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ budget_usd: {{ amount: 0.0001, period: total }} }}\n");
    config.extra = "pricing:\n  gpt-4o-mini: { input: 1.0, output: 2.0 }\n".into();
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let guard = PidFileGuard(dir.join("gw.pid"));
    let first = guard.pid();
    let port = config.port;
    let usage = || usage_of(port, TENANT_KEY)["requests"].as_u64().unwrap();
    assert_eq!(chat_status(port, TENANT_KEY), 200);
    let in_flight = std::thread::spawn(move || chat_status(port, TENANT_KEY));
    wait_until(Duration::from_secs(5), "the request in flight", || {
        metric_value(
            &gw.metrics(),
            r#"runestone_inflight_requests{tenant="acme"}"#,
        ) == 1.0
    });
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    assert_ne!(guard.pid(), first);
    assert_eq!(usage(), 1, "the new process was handed the one settled");
    assert_eq!(in_flight.join().unwrap(), 200, "served by the old process");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    wait_until(
        Duration::from_secs(5),
        "the old process's last request counted",
        || usage() == 2,
    );
    let left = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".usage."))
        .count();
    assert_eq!(left, 0, "the file is taken");
    assert_eq!(chat_status(port, TENANT_KEY), 200, "crosses the budget");
    assert_eq!(chat_status(port, TENANT_KEY), 429, "spent");
    assert_eq!(usage(), 3);
}

/// A reload while Redis does not answer: what the old process still owed
/// Redis when it ended is paid by its successor once Redis answers, with
/// the successor's own, each request billed once to its tenant to the
/// pico-dollar (the tenants reordered across the reload).
#[test]
fn what_a_process_reloaded_during_an_outage_owed_is_paid_by_its_successor() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let mut config = GatewayConfig::new(&mock);
    let tenants = |first: &str, second: &str| {
        let tenant = |id: &str| {
            let key = if id == "acme" {
                TENANT_KEY
            } else {
                RESTRICTED_KEY
            };
            format!("\n  - id: {id}\n    keys: [\"{key}\"]")
        };
        format!("{}{}\n", tenant(first), tenant(second))
    };
    config.tenants = tenants("other", "acme");
    // (7 * $1 + 16 * $2) / 1M = $0.000039 a request.
    config.extra = format!(
        "pricing:\n  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}\nredis: {{ url: \"{}\", timeout_ms: 300 }}\n",
        redis.url()
    );
    let mut gw = Gateway::start(&config);
    let (path, dir) = gw.config_path();
    let port = config.port;
    let usage = |tenant: &str, field: &str| {
        let (period, _) = runestone::limits::period_at(
            runestone::config::BudgetPeriod::Monthly,
            runestone::limits::now_ms(),
        );
        let key = format!("runestone:{{{tenant}}}:usage:{period}");
        redis.cli(&["HGET", &key, field]).trim().to_string()
    };
    assert_eq!(chat_status(port, TENANT_KEY), 200);
    wait_until(Duration::from_secs(5), "Redis to count it", || {
        usage("acme", "requests") == "1"
    });
    redis.freeze();
    for key in [
        TENANT_KEY,
        TENANT_KEY,
        TENANT_KEY,
        RESTRICTED_KEY,
        RESTRICTED_KEY,
    ] {
        assert_eq!(chat_status(port, key), 200, "served in process");
    }
    config.tenants = tenants("acme", "other");
    std::fs::write(&path, config.yaml_in(&dir)).unwrap();
    assert_eq!(runestone_reload(&path, &dir), Some(0));
    // The old process ends owing (its grace period passes with Redis
    // frozen); the new one serves on in process.
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    for _ in 0..2 {
        assert_eq!(chat_status(port, TENANT_KEY), 200, "served in process");
    }
    let guard = PidFileGuard(dir.join("gw.pid"));
    let successor = guard.pid();
    let log = || std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    wait_until(
        Duration::from_secs(10),
        "the successor to take the debts over",
        || log().contains("took over what ended processes owed Redis"),
    );
    redis.thaw();
    wait_until(Duration::from_secs(10), "everything paid", || {
        usage("acme", "requests") == "6" && usage("other", "requests") == "2"
    });
    assert_eq!(usage("acme", "cost_pusd"), (6 * 39_000_000).to_string());
    assert_eq!(usage("other", "cost_pusd"), (2 * 39_000_000).to_string());
    let left = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".owed."))
        .count();
    assert_eq!(left, 0, "no debt file left once paid");
    signal(successor, "TERM");
    wait_until(Duration::from_secs(15), "the successor to stop", || {
        exited(successor)
    });
}
