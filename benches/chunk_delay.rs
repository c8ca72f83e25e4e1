//! Chunk forwarding delay for `scripts/bench.sh`: opens STREAMS concurrent
//! streaming chat requests to 127.0.0.1:PORT, where runestone-mock runs with
//! `--stamp-chunks` (directly, or behind a gateway), and for every token
//! takes its arrival time minus the time the mock wrote it (both
//! CLOCK_MONOTONIC on this machine). Prints one JSON line with the count and
//! p50, p99 and p99.9 in microseconds. One blocking reader thread per
//! stream, so the reader adds little of its own delay.
//!
//! `cargo run --release --example chunk_delay -- PORT KEY STREAMS`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

/// CLOCK_MONOTONIC in microseconds, the clock the mock stamps with.
fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .expect("CLOCK_MONOTONIC")
}

/// One stream's delays: arrival minus stamp for each token.
fn stream(port: u16, key: &str) -> Vec<u64> {
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stamp"}]}"#;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut delays = Vec::new();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let arrived = monotonic_us();
        // A token event: ..."delta":{"content":"<stamp>"}...
        let Some(at) = line.find(r#""content":""#) else {
            continue;
        };
        let rest = &line[at + 11..];
        let digits: &str = &rest[..rest.find('"').unwrap_or(0)];
        if let Ok(stamp) = digits.parse::<u64>() {
            delays.push(arrived.saturating_sub(stamp));
        }
    }
    delays
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(key), Some(streams)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: chunk_delay PORT KEY STREAMS");
        std::process::exit(2);
    };
    let port: u16 = port.parse().expect("PORT");
    let streams: usize = streams.parse().expect("STREAMS");
    let mut delays: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..streams)
            .map(|_| scope.spawn(|| stream(port, &key)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader"))
            .collect()
    });
    delays.sort_unstable();
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        r#"{{"chunks": {}, "p50_us": {}, "p99_us": {}, "p999_us": {}}}"#,
        delays.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
}
