//! Redis as production runs it, against real `redis-server` processes the
//! tests start: TLS with a CA the test makes (and a wrong CA, and a
//! certificate for another host name, refused), client certificates, an
//! ACL user limited to the key prefix and the commands the gateway needs,
//! Redis Cluster (three primaries, three replicas) with two gateways and a
//! primary failing over, and Sentinel following a failover.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// A redis-server (or sentinel) process, killed on drop.
struct Server {
    port: u16,
    child: Child,
    dir: PathBuf,
    /// What redis-cli needs to talk to it (TLS, credentials).
    cli_args: Vec<String>,
}

impl Server {
    /// Starts `redis-server` with `conf` (lines of redis.conf) on a free
    /// port and waits for it to answer PING through `cli_args`.
    fn start(conf: &str, cli_args: Vec<String>) -> Server {
        Self::start_on(free_port(), conf, cli_args, false)
    }

    fn start_on(port: u16, conf: &str, cli_args: Vec<String>, sentinel: bool) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "runestone-redis-{}-{port}-{}",
            std::process::id(),
            Instant::now().elapsed().subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // A TLS-only server says `port 0` and takes `{port}` for its TLS port.
        let listen = if conf.contains("port 0") {
            String::new()
        } else {
            format!("port {port}\n")
        };
        // A cluster node's bus port is its port + 10,000 unless named: a
        // free port above 55,535 would leave it none.
        let bus = if conf.contains("cluster-enabled yes") {
            format!("cluster-port {}\n", free_port())
        } else {
            String::new()
        };
        let file = dir.join("redis.conf");
        std::fs::write(
            &file,
            format!(
                "{listen}{bus}bind 127.0.0.1\nsave \"\"\nappendonly no\ndir {}\n{}\n",
                dir.display(),
                conf.replace("{port}", &port.to_string())
            ),
        )
        .unwrap();
        let mut command = Command::new("redis-server");
        command.arg(&file);
        if sentinel {
            command.arg("--sentinel");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/setup.sh installs it)");
        let server = Server {
            port,
            child,
            dir,
            cli_args,
        };
        wait_until(
            Duration::from_secs(10),
            "redis-server to answer PING",
            || server.cli(&["PING"]).trim() == "PONG",
        );
        server
    }

    /// Runs a command with redis-cli as this server's client.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, server certificates and a client certificate, made with openssl.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "runestone-pki-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ]);
        }
        pki.issue("server", "subjectAltName=IP:127.0.0.1,DNS:localhost");
        pki.issue("wrong-name", "subjectAltName=DNS:redis.internal");
        pki.issue("client", "extendedKeyUsage=clientAuth");
        pki
    }

    /// A certificate `name` signed by the CA, with `extension`.
    fn issue(&self, name: &str, extension: &str) {
        std::fs::write(self.dir.join(format!("{name}.ext")), extension).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl (scripts/setup.sh installs it)");
        assert!(status.success(), "openssl {args:?}");
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// redis.conf lines for a TLS-only server presenting `cert`.
    fn server_conf(&self, cert: &str, client_auth: bool) -> String {
        format!(
            "port 0\ntls-port {{port}}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients {}\n",
            self.path(&format!("{cert}.pem")),
            self.path(&format!("{cert}.key")),
            self.path("ca.pem"),
            if client_auth { "yes" } else { "no" }
        )
    }

    /// redis-cli arguments for TLS (with the client certificate).
    fn cli_args(&self) -> Vec<String> {
        [
            "--tls",
            "--cacert",
            &self.path("ca.pem"),
            "--cert",
            &self.path("client.pem"),
            "--key",
            &self.path("client.key"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tenants `acme` (and `other`) with `rpm` requests a minute, over `redis`
/// (the YAML of the `redis:` section's body). Redis is given half a second
/// a call: longer than a loaded machine's TLS or cluster round trip (a call
/// over it marks Redis down and moves limits in-process), short enough that
/// the failover tests see a node that does not answer soon.
fn config(mock: &Mock, redis: &str, rpm: u32) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: {rpm} }}\n    overflow: {{ enabled: true, max_wait_seconds: 5 }}\n"
    );
    config.extra = format!(
        "pricing:\n  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}\nredis:\n{redis}\n  timeout_ms: 500\n"
    );
    config
}

fn ask(gw: &Gateway) -> u16 {
    gw.post_json(CHAT, TENANT_KEY, &chat("gpt-4o-mini", false))
        .status
}

/// Whether the gateway says Redis is up, in `/ready` and the metric.
fn redis_up(gw: &Gateway) -> bool {
    let ready = gw.get("/ready", None).json();
    let metric = metric_value(&gw.metrics(), "runestone_redis_up");
    // Read while Redis's health changed (a failover in progress): ask again.
    if gw.get("/ready", None).json()["checks"]["redis"] != ready["checks"]["redis"]
        || metric_value(&gw.metrics(), "runestone_redis_up") != metric
    {
        return false;
    }
    assert_eq!(
        ready["checks"]["redis"] == "ok",
        metric == 1.0,
        "/ready and runestone_redis_up agree: {ready}"
    );
    ready["checks"]["redis"] == "ok"
}

#[test]
fn tls_with_the_configured_ca_shares_limits_and_anything_else_is_refused() {
    let pki = Pki::new();
    let redis = Server::start(&pki.server_conf("server", false), pki.cli_args());
    let mock = Mock::start(&[]);
    let tls = |host: &str, port: u16, ca: &str| {
        format!(
            "  url: \"rediss://{host}:{port}/0\"\n  ca_file: \"{}\"",
            pki.path(ca)
        )
    };
    // Two gateways over one TLS Redis: the RPM is global.
    let a = Gateway::start(&config(&mock, &tls("127.0.0.1", redis.port, "ca.pem"), 4));
    let b = Gateway::start(&config(&mock, &tls("localhost", redis.port, "ca.pem"), 4));
    wait_until(Duration::from_secs(10), "both to connect", || {
        redis_up(&a) && redis_up(&b)
    });
    let statuses: Vec<u16> = (0..6)
        .map(|i| ask(if i % 2 == 0 { &a } else { &b }))
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "4 a minute across both"
    );
    assert!(redis_up(&a) && redis_up(&b));
    assert!(redis.cli(&["KEYS", "runestone:{acme}:*"]).contains("rate"));

    // A CA that did not sign the server's certificate, and a certificate
    // for another host name: the connection is refused, Redis reported
    // down, requests served from in-process limits.
    let other = Server::start(&pki.server_conf("wrong-name", false), pki.cli_args());
    for (what, redis) in [
        ("a wrong CA", tls("127.0.0.1", redis.port, "other-ca.pem")),
        ("another host name", tls("127.0.0.1", other.port, "ca.pem")),
    ] {
        let gw = Gateway::start(&config(&mock, &redis, 100));
        assert_eq!(ask(&gw), 200, "{what}: fail-open");
        wait_until(Duration::from_secs(5), "Redis reported down", || {
            !redis_up(&gw)
        });
        assert_eq!(gw.get("/ready", None).status, 503, "{what}");
    }
    assert!(
        other.cli(&["KEYS", "*"]).trim().is_empty(),
        "nothing written"
    );
}

#[test]
fn a_client_certificate_is_sent_when_the_server_asks_for_one() {
    let pki = Pki::new();
    let redis = Server::start(&pki.server_conf("server", true), pki.cli_args());
    let mock = Mock::start(&[]);
    let url = format!(
        "  url: \"rediss://127.0.0.1:{}/0\"\n  ca_file: \"{}\"",
        redis.port,
        pki.path("ca.pem")
    );
    let with_cert = format!(
        "{url}\n  client_cert: \"{}\"\n  client_key: \"{}\"",
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let gw = Gateway::start(&config(&mock, &with_cert, 100));
    assert_eq!(ask(&gw), 200);
    wait_until(Duration::from_secs(5), "Redis up", || redis_up(&gw));
    let without = Gateway::start(&config(&mock, &url, 100));
    assert_eq!(ask(&without), 200);
    wait_until(Duration::from_secs(5), "Redis down", || !redis_up(&without));
}

#[test]
fn check_refuses_what_the_gateway_could_not_honour_and_masks_credentials() {
    let mock = Mock::start(&[]);
    let check = |redis: &str| {
        let dir = std::env::temp_dir().join(format!("runestone-check-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runestone.yaml");
        std::fs::write(&path, config(&mock, redis, 10).yaml()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check("  url: \"rediss://runestone:s3cret-pw@127.0.0.1:6380/0\"");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("redis: single at rediss://127.0.0.1:6380"),
        "{out}"
    );
    assert!(!out.contains("s3cret-pw"), "{out}");
    for (redis, expect) in [
        (
            "  url: \"rediss://127.0.0.1:6380/0\"\n  ca_file: \"/nonexistent/ca.pem\"",
            "redis.ca_file",
        ),
        (
            "  url: \"redis://127.0.0.1:6379/0\"\n  ca_file: \"/etc/hostname\"",
            "redis.ca_file",
        ),
        ("  url: \"rediss://127.0.0.1:6380/0#insecure\"", "redis.url"),
        (
            "  url: \"redis://127.0.0.1:6379\"\n  cluster_nodes: [\"redis://127.0.0.1:7000\"]",
            "exactly one of url, cluster_nodes and sentinel",
        ),
        (
            "  cluster_nodes: [\"redis://127.0.0.1:7000\", \"rediss://127.0.0.1:7001\"]",
            "mixes redis:// and rediss://",
        ),
        (
            "  sentinel: { master_name: \"\", nodes: [] }",
            "redis.sentinel.nodes",
        ),
        (
            "  url: \"rediss://127.0.0.1:6380/0\"\n  client_cert: \"/etc/hostname\"",
            "client_cert and client_key go together",
        ),
    ] {
        let (code, out) = check(redis);
        assert_eq!(code, Some(2), "{redis}: {out}");
        assert!(out.contains(expect), "{redis}: {out}");
    }
}

/// The ACL the docs give: the key prefix and the commands the gateway runs,
/// nothing else (no FLUSHALL, KEYS, CONFIG).
/// An ACL file with the gateway's user as docs/operations.md gives it
/// (password `gateway-pw-123`), `default` off, and an `admin`.
fn minimal_acl() -> String {
    let docs = include_str!("../docs/operations.md");
    let rules = docs
        .lines()
        .find_map(|line| line.strip_prefix("ACL SETUSER runestone on >PASSWORD "))
        .expect("docs/operations.md gives the minimal ACL user");
    format!(
        "user default off\nuser runestone on >gateway-pw-123 {rules}\nuser admin on >admin-pw-123 ~* &* +@all\n"
    )
}

#[test]
fn an_acl_user_limited_to_the_prefix_is_enough() {
    let redis = Server::start(&minimal_acl(), admin_args());
    let as_gateway = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "--user",
                "runestone",
                "--pass",
                "gateway-pw-123",
            ])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for denied in [
        &["FLUSHALL"][..],
        &["KEYS", "*"],
        &["CONFIG", "GET", "maxmemory-policy"],
    ] {
        assert!(
            as_gateway(denied).contains("NOPERM"),
            "{denied:?} is denied"
        );
    }
    let mock = Mock::start(&[]);
    let url = format!(
        "  url: \"redis://runestone:gateway-pw-123@127.0.0.1:{}/0\"",
        redis.port
    );
    let gw = Gateway::start(&config(&mock, &url, 3));
    // Limits, the overflow queue (a parked request admitted later) and an
    // async job all run as that user.
    let statuses: Vec<u16> = (0..3).map(|_| ask(&gw)).collect();
    assert_eq!(statuses, [200, 200, 200]);
    assert!(redis_up(&gw));
    let job = gw.post_raw(
        CHAT,
        &[
            ("authorization", &format!("Bearer {TENANT_KEY}")),
            ("prefer", "respond-async"),
        ],
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "job"}]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(job.status, 202, "{}", String::from_utf8_lossy(&job.body));
    // The job is kept under the tenant's prefix (queued, or already taken).
    assert!(redis.cli(&["KEYS", "runestone:{acme}:*"]).contains(":job:"));
    // Over its rpm a request parks; the queue lost (a flush, a failover),
    // its instance puts its place back as that user.
    std::thread::scope(|scope| {
        let parked = scope.spawn(|| ask(&gw));
        let queue = "runestone:{acme}:queue";
        let sync_entries = || {
            redis
                .cli(&["LRANGE", queue, "0", "-1"])
                .lines()
                .filter(|e| e.starts_with("s|"))
                .count()
        };
        wait_until(Duration::from_secs(5), "a request to park", || {
            sync_entries() == 1
        });
        redis.cli(&["DEL", queue]);
        wait_until(Duration::from_secs(3), "its place to be put back", || {
            sync_entries() == 1
        });
        assert_eq!(parked.join().unwrap(), 429, "its rpm allows none in 5 s");
    });
    assert!(redis_up(&gw), "no NOPERM marked Redis down");
    assert!(!gw.log().contains("NOPERM"), "{}", gw.log());
}

fn admin_args() -> Vec<String> {
    ["--user", "admin", "--pass", "admin-pw-123"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Three primaries and three replicas on free ports, the cluster created
/// and every slot served.
struct Cluster {
    nodes: Vec<Server>,
}

impl Cluster {
    fn start() -> Cluster {
        let conf = "cluster-enabled yes\ncluster-node-timeout 1000\ncluster-config-file nodes.conf\ncluster-replica-validity-factor 0\n";
        let nodes: Vec<Server> = (0..6)
            .map(|_| Server::start(conf, vec!["-c".into()]))
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        wait_until(
            Duration::from_secs(20),
            "the cluster to serve every slot",
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.cli(&["PING"]).trim() == "PONG")
                    .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            },
        );
    }

    /// The node serving `key`'s slot as primary.
    fn primary_of(&self, key: &str) -> usize {
        let live = self
            .nodes
            .iter()
            .find(|n| n.cli(&["PING"]).trim() == "PONG")
            .unwrap();
        let slot: u16 = live
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let topology = live.cli(&["CLUSTER", "NODES"]);
        for line in topology.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => (a.parse::<u16>().unwrap()..=b.parse().unwrap()).contains(&slot),
                None => range.parse::<u16>().ok() == Some(slot),
            });
            if owns {
                let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
        }
        panic!("no primary for slot {slot}: {topology}");
    }

    fn seeds(&self) -> String {
        let urls: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("\"redis://127.0.0.1:{}\"", n.port))
            .collect();
        format!("  cluster_nodes: [{}]", urls.join(", "))
    }
}

#[test]
fn two_gateways_over_a_cluster_share_limits_and_survive_a_primary_failing_over() {
    let mut cluster = Cluster::start();
    // Two tenants whose keys live on different primaries.
    let tenants = ["acme", "zeta", "kilo", "echo", "mike", "yank"];
    let a = tenants[0];
    let b = *tenants[1..]
        .iter()
        .find(|t| {
            cluster.primary_of(&format!("{{{t}}}")) != cluster.primary_of(&format!("{{{a}}}"))
        })
        .expect("tenants on two primaries");
    let other_key = "sk-tenant-other-0123456789";
    let mock = Mock::start(&[]);
    let mut config = config(&mock, &cluster.seeds(), 6);
    config.tenants = format!(
        "\n  - id: {a}\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 6 }}\n  - id: {b}\n    keys: [\"{other_key}\"]\n    limits: {{ requests_per_minute: 100000, max_concurrent: 2 }}\n    overflow: {{ enabled: true, max_wait_seconds: 10 }}\n"
    );
    let gw1 = Gateway::start(&config);
    config.port = free_port();
    config.metrics_port = free_port();
    let gw2 = Gateway::start(&config);
    for gw in [&gw1, &gw2] {
        wait_until(Duration::from_secs(10), "the start-up connection", || {
            gw.log().contains("Redis answers")
        });
        assert!(
            gw.log().contains("mode=\"cluster\""),
            "the start-up log names the mode"
        );
    }
    // The RPM is global across both gateways.
    let statuses: Vec<u16> = (0..9)
        .map(|i| ask(if i % 2 == 0 { &gw1 } else { &gw2 }))
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
    assert!(redis_up(&gw1) && redis_up(&gw2));
    // Async jobs of the other tenant, submitted on one gateway, answered
    // from the other.
    let submit = |gw: &Gateway| {
        let resp = gw.post_raw(
            CHAT,
            &[
                ("authorization", &format!("Bearer {other_key}")),
                ("prefer", "respond-async"),
            ],
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "job"}]})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
        resp.json()["id"].as_str().unwrap().to_string()
    };
    let result = |gw: &Gateway, id: &str| {
        let mut last = 0;
        wait_until(Duration::from_secs(15), "the job to finish", || {
            last = gw.get(&format!("/v1/jobs/{id}"), Some(other_key)).status;
            last != 202
        });
        last
    };
    let ids: Vec<String> = (0..4).map(|_| submit(&gw1)).collect();
    for id in &ids {
        assert_eq!(result(&gw2, id), 200);
    }
    // Parking: six slow requests at once over a concurrency of two, half
    // on each gateway, all admitted in turn.
    mock.fault(json!({"latency_ms": 300}));
    let parked: Vec<u16> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let gw = if i % 2 == 0 { &gw1 } else { &gw2 };
                scope.spawn(move || {
                    gw.post_json(CHAT, other_key, &chat("gpt-4o-mini", false))
                        .status
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(parked, [200; 6]);
    assert!(
        [&gw1, &gw2]
            .iter()
            .map(|gw| metric_sum(
                &gw.metrics(),
                "runestone_overflow_total",
                &["outcome=\"admitted\""]
            ))
            .sum::<f64>()
            >= 2.0,
        "some waited their turn"
    );
    mock.fault(json!({"latency_ms": 0}));

    // The primary of the second tenant's keys dies; its replica takes over.
    let victim = cluster.primary_of(&format!("{{{b}}}"));
    let sent_before = mock.request_count();
    cluster.nodes[victim].kill();
    let sent = answered_while_a_primary_is_gone(|_| {
        gw1.post_json(CHAT, other_key, &chat("gpt-4o-mini", false))
            .status
    });
    assert!(sent > 20);
    wait_until(Duration::from_secs(20), "a replica to take over", || {
        cluster
            .nodes
            .iter()
            .enumerate()
            .any(|(i, n)| i != victim && n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    });
    wait_until(
        Duration::from_secs(15),
        "both gateways to see Redis again",
        || {
            ask(&gw1);
            redis_up(&gw1) && redis_up(&gw2)
        },
    );
    // Jobs keep working, and nothing is left taken.
    let ids: Vec<String> = (0..3).map(|_| submit(&gw2)).collect();
    for id in &ids {
        assert_eq!(result(&gw1, id), 200);
    }
    let primary = cluster.primary_of(&format!("{{{b}}}"));
    assert_ne!(primary, victim);
    wait_until(Duration::from_secs(10), "no concurrency lease left", || {
        cluster.nodes[primary]
            .cli(&["ZCARD", &format!("runestone:{{{b}}}:inflight")])
            .trim()
            == "0"
    });
    // What the provider generated is what the gateways billed, exactly.
    let stats = billed_what_was_generated(&mock, &[&gw1, &gw2], sent_before);
    // And at the configured price (1 and 2 USD per 1M tokens).
    let cost: f64 = [&gw1, &gw2]
        .iter()
        .map(|gw| metric_sum(&gw.metrics(), "runestone_cost_usd_total", &[]))
        .sum();
    let expected = (stats["prompt_tokens"].as_f64().unwrap()
        + 2.0 * stats["completion_tokens"].as_f64().unwrap())
        / 1e6;
    assert!((cost - expected).abs() < 1e-9, "{cost} != {expected}");
}

/// Sends a request (`send`, given its number) every 20 ms for three
/// seconds, as after a cluster primary was killed: each is answered, within
/// two seconds. How many were sent.
fn answered_while_a_primary_is_gone(mut send: impl FnMut(usize) -> u16) -> usize {
    let started = Instant::now();
    let mut during = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        during.push((send(during.len()), t.elapsed()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        during
            .iter()
            .all(|(s, t)| *s == 200 && *t < Duration::from_secs(2)),
        "answered within bounds while the primary was gone: {during:?}"
    );
    during.len()
}

/// Asserts that the tokens `gateways` billed are exactly those `mock`
/// generated (`sent_before` a failover is said if not); the mock's stats.
fn billed_what_was_generated(mock: &Mock, gateways: &[&Gateway], sent_before: u64) -> Value {
    let billed: f64 = (gateways.iter())
        .map(|gw| metric_sum(&gw.metrics(), "runestone_tokens_total", &[]))
        .sum();
    let stats = mock.stats();
    let generated =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        billed, generated as f64,
        "sent before the failover: {sent_before}"
    );
    stats
}

/// A cluster primary that loses a tenant's queue (a failover to a replica
/// that had not seen the entries, a flush): the requests parked on each
/// gateway put their places back, through the cluster's routing of the
/// script, and are served when the slot frees, not refused at max_wait.
#[test]
fn places_a_cluster_primary_lost_are_put_back() {
    let cluster = Cluster::start();
    let mock = Mock::start(&["--latency-ms", "1500"]);
    let mut config = config(&mock, &cluster.seeds(), 0);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ max_concurrent: 1 }}\n    overflow: {{ enabled: true, max_wait_seconds: 12 }}\n"
    );
    let gw1 = Gateway::start(&config);
    let gw2 = Gateway::start(&config.another_instance());
    let primary = &cluster.nodes[cluster.primary_of("{acme}")];
    let queue = "runestone:{acme}:queue";
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let holder = scope.spawn(|| ask(&gw1));
        wait_until(Duration::from_secs(5), "the slot to be taken", || {
            mock.request_count() == 1
        });
        let waiters = [scope.spawn(|| ask(&gw1)), scope.spawn(|| ask(&gw2))];
        wait_until(Duration::from_secs(5), "both to park", || {
            primary.cli(&["LLEN", queue]).trim() == "2"
        });
        assert_eq!(primary.cli(&["DEL", queue]).trim(), "1");
        [holder]
            .into_iter()
            .chain(waiters)
            .map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(mock.request_count(), 3);
    assert!(
        gw1.log().contains("queued again") || gw2.log().contains("queued again"),
        "the places were put back, not found some other way"
    );
}

#[test]
fn sentinel_names_the_primary_and_the_gateway_follows_a_failover() {
    let primary = Server::start("", Vec::new());
    let replica = Server::start(
        &format!("replicaof 127.0.0.1 {}\n", primary.port),
        Vec::new(),
    );
    let sentinel_port = free_port();
    let sentinel = Server::start_on(
        sentinel_port,
        &format!(
            "sentinel monitor mymain 127.0.0.1 {} 1\nsentinel down-after-milliseconds mymain 1000\nsentinel failover-timeout mymain 5000\n",
            primary.port
        ),
        Vec::new(),
        true,
    );
    wait_until(Duration::from_secs(10), "the replica to sync", || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    });
    let mock = Mock::start(&[]);
    let redis = format!(
        "  sentinel: {{ master_name: mymain, nodes: [\"redis://127.0.0.1:{sentinel_port}\"] }}"
    );
    let gw = Gateway::start(&config(&mock, &redis, 1000));
    wait_until(
        Duration::from_secs(5),
        "the gateway to use the primary",
        || ask(&gw) == 200 && redis_up(&gw),
    );
    assert!(primary.cli(&["KEYS", "runestone:*"]).contains("acme"));
    // The primary dies; the sentinel promotes the replica.
    let mut primary = primary;
    primary.kill();
    wait_until(
        Duration::from_secs(20),
        "the sentinel to promote the replica",
        || replica.cli(&["ROLE"]).starts_with("master"),
    );
    wait_until(Duration::from_secs(15), "the gateway to follow", || {
        ask(&gw) == 200 && redis_up(&gw) && replica.cli(&["KEYS", "runestone:*"]).contains("usage")
    });
    let before = replica.cli(&["KEYS", "runestone:{acme}:usage:*"]);
    let key = before.lines().next().unwrap().to_string();
    let count = |r: &Server| {
        r.cli(&["HGET", &key, "requests"])
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    let n = count(&replica);
    assert_eq!(ask(&gw), 200);
    wait_until(
        Duration::from_secs(5),
        "usage recorded on the new primary",
        || count(&replica) == n + 1,
    );
    drop(sentinel);
}

fn ready_redis(gw: &Gateway) -> String {
    gw.get("/ready", None).json()["checks"]["redis"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_tenant_on_a_healthy_primary_keeps_its_global_rpm_while_another_primary_is_down() {
    let mut cluster = Cluster::start();
    // Long enough that no replica takes over during the test.
    for node in &cluster.nodes {
        node.cli(&["CONFIG", "SET", "cluster-node-timeout", "15000"]);
    }
    let other = ["zeta", "kilo", "echo", "mike", "yank", "other"]
        .into_iter()
        .find(|t| cluster.primary_of(&format!("{{{t}}}")) != cluster.primary_of("{acme}"))
        .unwrap();
    let other_key = "sk-tenant-other-0123456789";
    let mock = Mock::start(&[]);
    let mut config = config(&mock, &cluster.seeds(), 10);
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 10 }}\n  - id: {other}\n    keys: [\"{other_key}\"]\n    limits: {{ requests_per_minute: 100000 }}\n"
    );
    let gw1 = Gateway::start(&config);
    config.port = free_port();
    config.metrics_port = free_port();
    let gw2 = Gateway::start(&config);
    for gw in [&gw1, &gw2] {
        wait_until(Duration::from_secs(10), "the start-up connection", || {
            redis_up(gw)
        });
    }
    let victim = cluster.primary_of(&format!("{{{other}}}"));
    cluster.nodes[victim].kill();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let admitted = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                gw1.post_json(CHAT, other_key, &chat("gpt-4o-mini", false));
                gw2.post_json(CHAT, other_key, &chat("gpt-4o-mini", false));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let admitted = (0..30)
            .map(|i| ask(if i % 2 == 0 { &gw1 } else { &gw2 }))
            .filter(|s| *s == 200)
            .count();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        admitted
    });
    assert_eq!(admitted, 10, "acme's 10 a minute held across both gateways");
    // The other tenant was served all along, on in-process limits.
    assert!(
        metric_sum(
            &gw1.metrics(),
            "runestone_requests_total",
            &["status=\"200\""]
        ) > 5.0
    );
}

#[test]
fn cluster_credentials_on_the_first_seed_or_in_redis_password_reach_every_node() {
    let conf = "cluster-enabled yes\ncluster-node-timeout 1000\ncluster-config-file nodes.conf\nrequirepass gateway#pw/1\nmasterauth gateway#pw/1\n";
    let auth: Vec<String> = ["-a", "gateway#pw/1", "--no-auth-warning"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let nodes: Vec<Server> = (0..6).map(|_| Server::start(conf, auth.clone())).collect();
    let mut create = Command::new("redis-cli");
    create.args(&auth).args(["--cluster", "create"]);
    for node in &nodes {
        create.arg(format!("127.0.0.1:{}", node.port));
    }
    let out = create
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cluster = Cluster { nodes };
    cluster.wait_ok();
    let mock = Mock::start(&[]);
    let (a, b) = (cluster.nodes[0].port, cluster.nodes[1].port);
    for redis in [
        // Percent-encoded in the first seed's URL only.
        format!("  cluster_nodes: [\"redis://:gateway%23pw%2F1@127.0.0.1:{a}\", \"redis://127.0.0.1:{b}\"]"),
        // Or given as it is, no escaping.
        format!("  cluster_nodes: [\"redis://127.0.0.1:{a}\", \"redis://127.0.0.1:{b}\"]\n  password: \"gateway#pw/1\""),
    ] {
        let gw = Gateway::start(&config(&mock, &redis, 100));
        assert_eq!(ask(&gw), 200);
        assert_eq!(ready_redis(&gw), "ok", "{redis}\n{}", gw.log());
    }
}

#[test]
fn sentinel_works_with_the_minimal_acl_and_starts_connected() {
    let primary = Server::start(
        &format!(
            "{}masteruser admin\nmasterauth admin-pw-123\n",
            minimal_acl()
        ),
        admin_args(),
    );
    let sentinel_port = free_port();
    let _sentinel = Server::start_on(
        sentinel_port,
        &format!(
            "sentinel monitor mymain 127.0.0.1 {} 1\nsentinel auth-user mymain admin\nsentinel auth-pass mymain admin-pw-123\nsentinel down-after-milliseconds mymain 1000\n",
            primary.port
        ),
        Vec::new(),
        true,
    );
    let mock = Mock::start(&[]);
    let redis = format!(
        "  sentinel: {{ master_name: mymain, nodes: [\"redis://127.0.0.1:{sentinel_port}\"], master_username: runestone, master_password: gateway-pw-123 }}"
    );
    let gw = Gateway::start(&config(&mock, &redis, 100));
    assert!(gw.log().contains("Redis answers"), "{}", gw.log());
    assert_eq!(
        ready_redis(&gw),
        "ok",
        "ACL LOG: {}",
        primary.cli(&["ACL", "LOG"])
    );
    assert_eq!(
        metric_value(
            &gw.metrics(),
            "runestone_redis_errors_total{op=\"connect\"}"
        ),
        0.0,
        "connected at start-up, not after a failure"
    );
    assert_eq!(ask(&gw), 200);
    assert!(primary.cli(&["KEYS", "runestone:*"]).contains("acme"));
}

#[test]
fn ready_does_not_claim_redis_before_it_has_answered() {
    // A listener that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mock = Mock::start(&[]);
    let gw = Gateway::start(&config(
        &mock,
        &format!("  url: \"redis://127.0.0.1:{port}/0\""),
        100,
    ));
    assert_eq!(ready_redis(&gw), "unavailable");
    assert_eq!(metric_value(&gw.metrics(), "runestone_redis_up"), 0.0);
    assert_eq!(ask(&gw), 200, "served on in-process limits meanwhile");
    drop(listener);
}

#[test]
fn check_never_prints_a_secret_a_wrong_shape_would_echo() {
    let mock = Mock::start(&[]);
    let dir = std::env::temp_dir().join(format!("runestone-check-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("runestone.yaml");
    // A string where a list is expected, its password from the environment.
    std::fs::write(
        &path,
        config(&mock, "  cluster_nodes: \"${REDIS_SEEDS}\"", 10).yaml(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config"])
        .arg(&path)
        .env(
            "REDIS_SEEDS",
            "rediss://runestone:S3cr3t-from-env@10.0.0.1:6379",
        )
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("redis.cluster_nodes"), "{text}");
    assert!(!text.contains("S3cr3t"), "{text}");
}

#[test]
fn a_redirected_command_on_a_cluster_runs_once() {
    let cluster = Cluster::start();
    let (rate, settled, inflight) = (
        "runestone:{acme}:rate",
        "runestone:{acme}:settled",
        "runestone:{acme}:inflight",
    );
    let src = cluster.primary_of("{acme}");
    let dst = (0..6)
        .find(|&i| i != src && cluster.nodes[i].cli(&["ROLE"]).starts_with("master"))
        .unwrap();
    let (s, d) = (&cluster.nodes[src], &cluster.nodes[dst]);
    for key in [rate, settled, inflight] {
        s.cli(&["SET", key, "0"]);
    }
    // The slot half-migrated: one key moved, the others not yet.
    let slot = s.cli(&["CLUSTER", "KEYSLOT", rate]).trim().to_string();
    let id = |n: &Server| n.cli(&["CLUSTER", "MYID"]).trim().to_string();
    assert_eq!(
        d.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id(s)])
            .trim(),
        "OK"
    );
    assert_eq!(
        s.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id(d)])
            .trim(),
        "OK"
    );
    let port = d.port.to_string();
    assert_eq!(
        s.cli(&[
            "MIGRATE",
            "127.0.0.1",
            &port,
            "",
            "0",
            "5000",
            "KEYS",
            settled
        ])
        .trim(),
        "OK"
    );
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:1\"\nproviders:\n  - {{ name: mock, base_url: \"http://127.0.0.1:1/v1\" }}\nmodels:\n  - name: m\n    targets: [{{ provider: mock }}]\ntenants:\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\nredis:\n{}\n  timeout_ms: 3000\n",
        cluster.seeds()
    );
    let config = runestone::config::Config::from_yaml(&yaml, |_| None).unwrap();
    let connection = runestone::redis_conn::RedisConnection::for_config(&config).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let conn = connection.get().unwrap();
        let mut first = redis::cmd("EVAL");
        first
            .arg("redis.call('INCR', KEYS[1]) redis.call('INCR', KEYS[2]) return 1")
            .arg(2)
            .arg(rate)
            .arg(inflight);
        let mut second = redis::cmd("EVAL");
        second
            .arg("return redis.call('EXISTS', KEYS[1], KEYS[2])")
            .arg(2)
            .arg(rate)
            .arg(settled);
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            conn.pipeline(&[(0, first), (0, second)]),
        )
        .await;
    });
    assert_eq!(
        s.cli(&["GET", rate]).trim(),
        "1",
        "the first command ran once"
    );
}

/// `redis.lease` over a cluster: two gateways taking quota ahead keep one
/// global limit, serve on while the tenant's primary fails over, bill
/// exactly what the provider generated, and leave no slot held once their
/// leases run out.
#[test]
fn leasing_gateways_over_a_cluster_keep_the_limit_and_bill_exactly_through_a_failover() {
    let mut cluster = Cluster::start();
    let mock = Mock::start(&[]);
    let mut config = config(
        &mock,
        &format!("{}\n  lease: {{ share: 0.5, ms: 500 }}", cluster.seeds()),
        6,
    );
    // 6 a minute: a share of 3 ahead per instance. `busy` pools only
    // slots (two instances could not both hold half of a minute and have
    // room for the requests Redis decides).
    config.tenants = format!(
        "\n  - id: acme\n    keys: [\"{TENANT_KEY}\"]\n    limits: {{ requests_per_minute: 6 }}\n  - id: busy\n    keys: [\"sk-tenant-busy-0123456789\"]\n    limits: {{ max_concurrent: 4 }}\n"
    );
    let gw1 = Gateway::start(&config);
    let gw2 = Gateway::start(&config.another_instance());
    for gw in [&gw1, &gw2] {
        wait_until(Duration::from_secs(10), "the start-up connection", || {
            redis_up(gw)
        });
    }
    let statuses: Vec<u16> = (0..12)
        .map(|i| ask(if i % 2 == 0 { &gw1 } else { &gw2 }))
        .collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    // What one instance holds unused is refused to the other until given
    // back, never admitted twice.
    assert!((3..=6).contains(&admitted), "{statuses:?}");

    let busy = |gw: &Gateway| {
        gw.post_json(
            CHAT,
            "sk-tenant-busy-0123456789",
            &chat("gpt-4o-mini", false),
        )
        .status
    };
    for gw in [&gw1, &gw2] {
        for _ in 0..5 {
            assert_eq!(busy(gw), 200);
        }
    }
    let leased = |gw: &Gateway| {
        metric_value(
            &gw.metrics(),
            r#"runestone_leased_admissions_total{tenant="busy"}"#,
        )
    };
    assert!(leased(&gw1) >= 1.0 && leased(&gw2) >= 1.0);
    let victim = cluster.primary_of("{busy}");
    let sent_before = mock.request_count();
    cluster.nodes[victim].kill();
    answered_while_a_primary_is_gone(|i| busy(if i % 2 == 0 { &gw1 } else { &gw2 }));
    wait_until(
        Duration::from_secs(20),
        "both gateways to see Redis again",
        || {
            busy(&gw1);
            busy(&gw2);
            redis_up(&gw1) && redis_up(&gw2)
        },
    );
    let primary = cluster.primary_of("{busy}");
    assert_ne!(primary, victim);
    wait_until(Duration::from_secs(10), "no slot left held", || {
        cluster.nodes[primary]
            .cli(&["ZCARD", "runestone:{busy}:inflight"])
            .trim()
            == "0"
    });
    billed_what_was_generated(&mock, &[&gw1, &gw2], sent_before);
}
