//! The floor for `scripts/bench.sh`: a bare Pingora HTTP proxy with no
//! filters, forwarding everything to one upstream. Runestone's throughput
//! and latency are compared against it.
//!
//! `cargo run --release --example floor -- LISTEN_ADDR UPSTREAM_ADDR [THREADS]`

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use std::net::SocketAddr;

/// Forwards every request to `upstream`.
struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is IP:port");
    let threads: usize = args
        .next()
        .map_or(1, |t| t.parse().expect("THREADS is a number"));
    let mut server = Server::new(None).expect("server");
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(&listen);
    proxy.threads = Some(threads);
    server.add_service(proxy);
    server.run_forever();
}
