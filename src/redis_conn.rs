//! The one Redis connection of a gateway process, shared by the limit
//! store and the overflow queue: made on first use (the connection manager
//! spawns its driver on the runtime it is created in, which exists only
//! once the server runs), every call bounded by `redis.timeout_ms`, the URL
//! (and any password in it) never logged.

use crate::config::{Config, RedisSettings};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::{Arc, OnceLock};
use tracing::warn;

/// A Redis connection made on first use.
pub struct RedisConnection {
    client: Option<redis::Client>,
    config: ConnectionManagerConfig,
    conn: OnceLock<Option<ConnectionManager>>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("configured", &self.client.is_some())
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

    /// A connection to `settings.url`, every call bounded by its timeout.
    pub fn new(settings: &RedisSettings) -> Self {
        // The URL's own text may hold a password: only the error's kind is
        // logged, never the URL.
        let client = redis::Client::open(settings.url.expose())
            .map_err(|e| warn!(kind = ?e.kind(), "cannot set up the Redis client; limits stay in-process and parking refuses"))
            .ok();
        RedisConnection {
            client,
            config: ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1),
            conn: OnceLock::new(),
        }
    }

    /// Whether a client could be set up at all.
    pub fn is_configured(&self) -> bool {
        self.client.is_some()
    }

    /// The connection; must be called inside the Tokio runtime.
    pub fn get(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_init(|| {
                self.client
                    .as_ref()?
                    .get_connection_manager_lazy(self.config.clone())
                    .map_err(|e| warn!(kind = ?e.kind(), "cannot set up the Redis connection"))
                    .ok()
            })
            .clone()
    }
}
