//! Chunk forwarding delay for `scripts/bench.sh`: opens STREAMS concurrent
//! streaming chat requests to each TARGET (`PORT:KEY`, key `none` for no
//! key), where runestone-mock runs with `--stamp-chunks` (directly, or
//! behind a proxy), and for every token takes its arrival time minus the
//! time the mock wrote it (both CLOCK_MONOTONIC on this machine), and for
//! every stream the time from sending the request to its first token.
//! ROUNDS (default 1) repeats that, the targets taking turns round after
//! round so that a slow spell of the machine hits them all alike. Prints
//! one JSON line per target, in order: the chunk count, the delay's p50,
//! p99 and p99.9, and time to first token p50 and p99, in microseconds.
//! One blocking reader thread per stream, so the reader adds little of its
//! own delay.
//!
//! `cargo run --release --example chunk_delay -- STREAMS ROUNDS PORT:KEY...`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

/// CLOCK_MONOTONIC in microseconds, the clock the mock stamps with.
fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .expect("CLOCK_MONOTONIC")
}

/// One stream's delays (arrival minus stamp for each token) and its time
/// to first token.
fn stream(port: u16, key: &str) -> (Vec<u64>, Option<u64>) {
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stamp"}]}"#;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    let auth = match key {
        "none" => String::new(),
        key => format!("Authorization: Bearer {key}\r\n"),
    };
    let sent = monotonic_us();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut delays = Vec::new();
    let mut first_token = None;
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let arrived = monotonic_us();
        // A token event: ..."delta":{"content":"<stamp>"}...
        let Some(at) = line.find(r#""content":""#) else {
            continue;
        };
        first_token.get_or_insert(arrived.saturating_sub(sent));
        let rest = &line[at + 11..];
        let digits: &str = &rest[..rest.find('"').unwrap_or(0)];
        if let Ok(stamp) = digits.parse::<u64>() {
            delays.push(arrived.saturating_sub(stamp));
        }
    }
    (delays, first_token)
}

/// The `p` quantile of sorted samples (0 when there are none).
fn quantile(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: chunk_delay STREAMS ROUNDS PORT:KEY...");
        std::process::exit(2);
    }
    let streams: usize = args[0].parse().expect("STREAMS");
    let rounds: usize = args[1].parse().expect("ROUNDS");
    let targets: Vec<(u16, &str)> = args[2..]
        .iter()
        .map(|t| {
            let (port, key) = t.split_once(':').expect("PORT:KEY");
            (port.parse().expect("PORT"), key)
        })
        .collect();
    let mut samples = vec![(Vec::new(), Vec::new()); targets.len()];
    for _ in 0..rounds {
        for (&(port, key), (delays, ttfts)) in targets.iter().zip(&mut samples) {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..streams)
                    .map(|_| scope.spawn(|| stream(port, key)))
                    .collect();
                for handle in handles {
                    let (chunks, ttft) = handle.join().expect("reader");
                    delays.extend(chunks);
                    ttfts.extend(ttft);
                }
            });
        }
    }
    for (delays, ttfts) in &mut samples {
        report(delays, ttfts);
    }
    // A target that sent no token (a refused key, a wrong port) would give
    // a row of zeros: fail instead.
    if let Some(at) = samples
        .iter()
        .position(|(d, t)| d.is_empty() || t.is_empty())
    {
        eprintln!("chunk_delay: {} sent no tokens", args[2 + at]);
        std::process::exit(1);
    }
}

/// Prints one target's JSON line.
fn report(delays: &mut [u64], ttfts: &mut [u64]) {
    delays.sort_unstable();
    ttfts.sort_unstable();
    println!(
        r#"{{"chunks": {}, "p50_us": {}, "p99_us": {}, "p999_us": {}, "ttft_p50_us": {}, "ttft_p99_us": {}}}"#,
        delays.len(),
        quantile(delays, 0.5),
        quantile(delays, 0.99),
        quantile(delays, 0.999),
        quantile(ttfts, 0.5),
        quantile(ttfts, 0.99)
    );
}
