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
    ClientTlsConfig, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates,
    TlsMode, Value,
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
        self.conn.get_or_init(|| self.open()).clone()
    }

    /// A connection of its own, set up as [`RedisConnection::get`]'s (and,
    /// like it, connecting in the background), whose drivers run on the
    /// calling runtime: the request path's batching task takes one, so a
    /// round trip never wakes another thread (on a gateway pinned to one
    /// core, each wake-up is a context switch).
    pub fn dedicated(&self) -> Option<Conn> {
        self.open()
    }

    /// Sets up a connection as the settings name (`None`, logged, when
    /// the client cannot be set up).
    fn open(&self) -> Option<Conn> {
        Conn::open(&self.settings)
            .map_err(|e| warn!(kind = ?e.kind(), error = %scrub(&e.to_string()), mode = self.settings.target.mode(), "cannot set up the Redis client; limits stay in-process and parking refuses"))
            .ok()
    }

    /// Runs one command within `timeout`: its reply, or `Err` when there is
    /// no connection, the command failed or it timed out (counted in
    /// `runestone_redis_errors_total{op}`; a failure is logged, without
    /// the command's arguments).
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
        timeout: Duration,
        op: &'static str,
    ) -> Result<T, ()> {
        let mut conn = self.get().ok_or(())?;
        let failed = || crate::metrics::REDIS_ERRORS.with_label_values(&[op]).inc();
        match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                failed();
                warn!(op, error = %scrub(&e.to_string()), "Redis call failed");
                Err(())
            }
            Err(_) => {
                failed();
                Err(())
            }
        }
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
        // Credentials: redis.username/password, else the (first) URL's,
        // given to every node alike.
        let credentials = |first: &RedisConnectionInfo| {
            (
                settings
                    .username
                    .clone()
                    .or(first.username().map(str::to_owned)),
                settings
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .or(first.password().map(str::to_owned)),
            )
        };
        let with_credentials =
            |info: ConnectionInfo, (user, password): &(Option<String>, Option<String>)| {
                let mut redis = info.redis_settings().clone();
                if let Some(user) = user {
                    redis = redis.set_username(user);
                }
                if let Some(password) = password {
                    redis = redis.set_password(password);
                }
                info.set_redis_settings(redis)
            };
        match &settings.target {
            RedisTarget::Single { url } => {
                let info = url.expose().into_connection_info()?;
                let creds = credentials(info.redis_settings());
                let info = with_credentials(info, &creds);
                let client = if tls {
                    redis::Client::build_with_tls(info, certificates(&settings.tls))?
                } else {
                    redis::Client::open(info)?
                };
                Ok(Conn::Single(client.get_connection_manager_lazy(manager)?))
            }
            RedisTarget::Cluster { nodes } => {
                let infos = nodes
                    .iter()
                    .map(|n| n.expose().into_connection_info())
                    .collect::<RedisResult<Vec<_>>>()?;
                let creds = infos
                    .first()
                    .map(|first| credentials(first.redis_settings()))
                    .unwrap_or_default();
                let infos: Vec<ConnectionInfo> = infos
                    .into_iter()
                    .map(|info| with_credentials(info, &creds))
                    .collect();
                // No retries of the client's own: a pipeline retried after a
                // redirect runs its earlier commands again (an admission
                // twice). A redirected call fails over to in-process limits
                // for once, and the slot map is refreshed.
                let mut builder = ClusterClientBuilder::new(infos)
                    .connection_timeout(connect)
                    .response_timeout(timeout)
                    .retries(0);
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
                let infos = nodes
                    .iter()
                    .map(|n| n.expose().into_connection_info())
                    .collect::<RedisResult<Vec<_>>>()?;
                // The sentinels' credentials: the fields, else the first
                // node URL's.
                let first = infos
                    .first()
                    .map(|i| i.redis_settings().clone())
                    .unwrap_or_default();
                let username = username.clone().or(first.username().map(str::to_owned));
                let password = password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .or(first.password().map(str::to_owned));
                let addrs: Vec<_> = infos.iter().map(|i| i.addr().clone()).collect();
                let mut builder =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
                        .set_client_to_redis_db(*db);
                if let Some(user) = username {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if let Some(password) = password {
                    builder = builder.set_client_to_sentinel_password(password);
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

    /// Runs `commands` together, each command's own result in order: one
    /// pipeline on a single server; on a cluster each command on its own
    /// (sent together), since a pipeline there may not cross slots, and one
    /// the client sends again after a redirect would run its earlier
    /// commands twice. Each command touches one key group (one hash slot).
    pub async fn pipeline(
        &self,
        commands: &[(usize, Cmd)],
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        if matches!(self, Conn::Cluster(_)) {
            let each = commands.iter().map(|(_, cmd)| {
                let mut conn = self.clone();
                async move { cmd.query_async::<Value>(&mut conn).await }
            });
            return Ok(futures_util::future::join_all(each).await);
        }
        let mut pipe = Pipeline::new();
        for (_, cmd) in commands {
            pipe.add_command(cmd.clone());
        }
        let mut conn = self.clone();
        pipe.ignore_errors()
            .query_async::<Vec<RedisResult<Value>>>(&mut conn)
            .await
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
    /// Wakes calls waiting for the sentinels' answer.
    answered: tokio::sync::Notify,
}

impl SentinelConn {
    fn new(client: SentinelClient, config: ConnectionManagerConfig, db: i64) -> Self {
        SentinelConn {
            inner: Arc::new(SentinelInner {
                client: tokio::sync::Mutex::new(client),
                primary: ArcSwapOption::empty(),
                config,
                asking: AtomicBool::new(false),
                answered: tokio::sync::Notify::new(),
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
            inner.answered.notify_waiters();
        });
    }

    /// The current primary's connection. Before the first one is known,
    /// the sentinels are asked and their answer awaited (the caller's bound
    /// applies); an error when they name none.
    async fn primary(&self) -> RedisResult<ConnectionManager> {
        // Listening before looking: an answer between the two is not missed.
        let answered = self.inner.answered.notified();
        if let Some(primary) = self.inner.primary.load_full() {
            return Ok((*primary).clone());
        }
        self.ask_sentinels();
        answered.await;
        match self.inner.primary.load_full() {
            Some(primary) => Ok((*primary).clone()),
            None => Err((ErrorKind::Io, "the sentinels named no reachable primary").into()),
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
            let result = self.primary().await?.req_packed_command(cmd).await;
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
                .primary()
                .await?
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

/// `text` with the credentials of any URL in it masked (`scheme://***@`):
/// error messages may quote a URL.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(userinfo) => {
                out.push_str("***");
                out.push_str(&tail[userinfo..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn credentials_in_urls_are_masked() {
        assert_eq!(
            scrub(
                r#"invalid type: string "rediss://user:S3cr3t@10.0.0.1:6379", expected a sequence"#
            ),
            r#"invalid type: string "rediss://***@10.0.0.1:6379", expected a sequence"#
        );
        assert_eq!(
            scrub("redis://10.0.0.1:6379/0 refused"),
            "redis://10.0.0.1:6379/0 refused"
        );
        assert_eq!(scrub("a://x@y b://p@q"), "a://***@y b://***@q");
    }
}
