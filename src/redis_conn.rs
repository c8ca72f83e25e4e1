//! The one Redis connection of a gateway process, shared by the limit
//! store and the overflow queue, in the mode the config names: one server
//! (`redis.url`), Redis Cluster (`redis.cluster_nodes`), or the primary a
//! set of sentinels names (`redis.sentinel`). TLS is rustls with the system
//! roots or `redis.ca_file`, host names verified, client certificates when
//! given.
//!
//! The connection is made on first use (its drivers spawn on the runtime,
//! which exists only once the server runs) and connects in the background:
//! callers bound every call by `redis.timeout_ms` and fall back while it is
//! not there. No URL, user name or password is ever logged.

use crate::config::{Config, RedisSettings, RedisTarget, RedisTls};
use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::{info, warn};

/// A Redis connection made on first use.
pub struct RedisConnection {
    settings: RedisSettings,
    conn: OnceLock<Option<Conn>>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("mode", &self.settings.target.mode())
            .finish_non_exhaustive()
    }
}

impl RedisConnection {
    /// The connection `config` asks for, if it has a `redis:` section.
    pub fn for_config(config: &Config) -> Option<Arc<RedisConnection>> {
        config
            .redis
            .as_ref()
            .map(|settings| Arc::new(RedisConnection::new(settings)))
    }

    /// A connection as `settings` describe it (nothing is dialled yet).
    pub fn new(settings: &RedisSettings) -> Self {
        RedisConnection {
            settings: settings.clone(),
            conn: OnceLock::new(),
        }
    }

    /// The mode and endpoints (without credentials), for the start-up log.
    pub fn describe(&self) -> (&'static str, Vec<String>) {
        (
            self.settings.target.mode(),
            self.settings.target.endpoints(),
        )
    }

    /// Whether a client could be set up (false once setting one up failed).
    pub fn is_configured(&self) -> bool {
        self.conn.get().is_none_or(Option::is_some)
    }

    /// The connection; must be called inside the Tokio runtime.
    pub fn get(&self) -> Option<Conn> {
        self.conn
            .get_or_init(|| {
                Conn::open(&self.settings)
                    .map_err(|e| warn!(kind = ?e.kind(), mode = self.settings.target.mode(), "cannot set up the Redis client; limits stay in-process and parking refuses"))
                    .ok()
            })
            .clone()
    }
}

/// A connection in one of the three modes; cheap to clone (clones share
/// the connection).
#[derive(Clone)]
pub enum Conn {
    /// One server, reconnected by the connection manager.
    Single(ConnectionManager),
    /// Redis Cluster: commands routed by hash slot, `MOVED`/`ASK` and
    /// topology changes followed by the client.
    Cluster(ClusterConnection),
    /// The primary the sentinels name, asked again after a failover.
    Sentinel(SentinelConn),
}

impl Conn {
    /// Sets up the connection `settings` name; it connects in the
    /// background.
    fn open(settings: &RedisSettings) -> RedisResult<Conn> {
        let timeout = settings.timeout;
        // Setting up a connection (TLS included) may take longer than one
        // call may: it runs in the background, bounded on its own.
        let connect = timeout.max(Duration::from_secs(1));
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let tls = settings.target.uses_tls();
        match &settings.target {
            RedisTarget::Single { url } => {
                let client = if tls {
                    redis::Client::build_with_tls(url.expose(), certificates(&settings.tls))?
                } else {
                    redis::Client::open(url.expose())?
                };
                Ok(Conn::Single(client.get_connection_manager_lazy(manager)?))
            }
            RedisTarget::Cluster { nodes } => {
                let mut builder = ClusterClientBuilder::new(nodes.iter().map(|n| n.expose()))
                    .connection_timeout(connect)
                    .response_timeout(timeout)
                    .retries(2);
                if tls {
                    builder = builder
                        .tls(TlsMode::Secure)
                        .certs(certificates(&settings.tls));
                }
                let client = builder.build()?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(timeout);
                Ok(Conn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
            RedisTarget::Sentinel {
                master_name,
                nodes,
                username,
                password,
                master_username,
                master_password,
                db,
            } => {
                let addrs = nodes
                    .iter()
                    .map(|n| n.expose().into_connection_info().map(|i| i.addr().clone()))
                    .collect::<RedisResult<Vec<_>>>()?;
                let mut builder =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
                        .set_client_to_redis_db(*db);
                if let Some(user) = username {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if let Some(password) = password {
                    builder = builder.set_client_to_sentinel_password(password.expose());
                }
                if let Some(user) = master_username {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = master_password {
                    builder = builder.set_client_to_redis_password(password.expose());
                }
                if tls {
                    builder = builder
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_certificates(certificates(&settings.tls))
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_certificates(certificates(&settings.tls));
                }
                Ok(Conn::Sentinel(SentinelConn::new(
                    builder.build()?,
                    manager,
                    *db,
                )))
            }
        }
    }

    /// Runs `commands` as pipelines, each command with the key group it
    /// touches (commands of one group share a hash slot): one pipeline on a
    /// single server, one per group (sent together) on a cluster, whose
    /// pipelines may not cross slots. Each command's own result, in order.
    pub async fn pipeline(
        &self,
        commands: &[(usize, Cmd)],
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        let run = |cmds: Vec<&Cmd>| {
            let mut pipe = Pipeline::new();
            for cmd in cmds {
                pipe.add_command(cmd.clone());
            }
            let mut conn = self.clone();
            async move {
                pipe.ignore_errors()
                    .query_async::<Vec<RedisResult<Value>>>(&mut conn)
                    .await
            }
        };
        if !matches!(self, Conn::Cluster(_)) {
            return run(commands.iter().map(|(_, cmd)| cmd).collect()).await;
        }
        let mut groups: Vec<usize> = commands.iter().map(|(group, _)| *group).collect();
        groups.sort_unstable();
        groups.dedup();
        let answers = futures_util::future::join_all(groups.iter().map(|&group| {
            run(commands
                .iter()
                .filter(|(g, _)| *g == group)
                .map(|(_, cmd)| cmd)
                .collect())
        }))
        .await;
        let mut by_group: Vec<std::vec::IntoIter<RedisResult<Value>>> = answers
            .into_iter()
            .zip(&groups)
            .map(|(answer, &group)| {
                let n = commands.iter().filter(|(g, _)| *g == group).count();
                match answer {
                    Ok(results) => results,
                    Err(e) => vec![Err(e); n],
                }
                .into_iter()
            })
            .collect();
        Ok(commands
            .iter()
            .map(|(group, _)| {
                let at = groups.binary_search(group).unwrap_or_default();
                by_group[at].next().unwrap_or_else(|| {
                    Err((ErrorKind::Client, "a reply per command was expected").into())
                })
            })
            .collect())
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.db,
        }
    }
}

/// The PEM material of `tls` as the client takes it.
fn certificates(tls: &RedisTls) -> TlsCertificates {
    TlsCertificates {
        client_tls: tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.expose().as_bytes().to_vec(),
        }),
        root_cert: tls.ca.clone(),
    }
}

/// A connection to the primary the sentinels name. It asks them on first
/// use, and again whenever the primary it has stops answering as one (a
/// connection lost or refused, `READONLY` from a demoted primary,
/// `MASTERDOWN`): after a failover, calls go to the new primary.
#[derive(Clone)]
pub struct SentinelConn {
    inner: Arc<SentinelInner>,
    db: i64,
}

struct SentinelInner {
    client: tokio::sync::Mutex<SentinelClient>,
    primary: ArcSwapOption<ConnectionManager>,
    config: ConnectionManagerConfig,
    asking: AtomicBool,
}

impl SentinelConn {
    fn new(client: SentinelClient, config: ConnectionManagerConfig, db: i64) -> Self {
        SentinelConn {
            inner: Arc::new(SentinelInner {
                client: tokio::sync::Mutex::new(client),
                primary: ArcSwapOption::empty(),
                config,
                asking: AtomicBool::new(false),
            }),
            db,
        }
    }

    /// Asks the sentinels for the primary, in the background (one question
    /// at a time; a caller's timeout does not cut it short).
    fn ask_sentinels(&self) {
        if self.inner.asking.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let found = async {
                let client = inner.client.lock().await.async_get_client().await?;
                client.get_connection_manager_lazy(inner.config.clone())
            }
            .await;
            match found {
                Ok(primary) => {
                    inner.primary.store(Some(Arc::new(primary)));
                    info!("Redis: connected to the primary the sentinels name");
                }
                Err(e) => {
                    warn!(kind = ?e.kind(), "Redis: the sentinels named no reachable primary");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            inner.asking.store(false, Ordering::Release);
        });
    }

    /// The current primary's connection, or why there is none yet.
    fn primary(&self) -> RedisResult<ConnectionManager> {
        match self.inner.primary.load_full() {
            Some(primary) => Ok((*primary).clone()),
            None => {
                self.ask_sentinels();
                Err((ErrorKind::Io, "no primary known yet").into())
            }
        }
    }

    /// After an error: whether the primary may have moved.
    fn after(&self, error: &RedisError) {
        let moved = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || matches!(
                error.kind(),
                ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
            );
        if moved {
            self.ask_sentinels();
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.primary()?.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.after(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .primary()?
                .req_packed_commands(pipeline, offset, count)
                .await;
            match &result {
                Err(e) => self.after(e),
                // A demoted primary answers each write with READONLY.
                Ok(values) => {
                    if let Some(Value::ServerError(e)) =
                        values.iter().find(|v| matches!(v, Value::ServerError(_)))
                    {
                        self.after(&RedisError::from(e.clone()));
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
