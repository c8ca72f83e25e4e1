//! Stored Responses API responses: which tenant created which response id,
//! and which provider holds it.
//!
//! A provider stores a response under the account that created it, so a
//! follow-up (`previous_response_id`) and `GET`/`DELETE`/`cancel`/
//! `input_items` must reach that provider, and only the tenant that created
//! the response may name it: every tenant shares the gateway's provider
//! account, so the provider cannot tell them apart. The gateway records
//! each response id it saw created under its tenant's id (not its position
//! in the config, which a reload may change), in Redis when configured
//! (shared by every instance, kept 30 days like OpenAI keeps responses) and
//! in a bounded in-process map, where each tenant has its share of the
//! bound (so one tenant's many responses cannot push out another's). An id
//! not recorded for the asking tenant is answered 404 as if it did not
//! exist.

use crate::redis_conn::RedisConnection;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::warn;

/// How long Redis keeps a record: OpenAI keeps stored responses 30 days.
const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Records kept in process, shared out among the tenants (each tenant's
/// oldest are forgotten first).
const IN_PROCESS_RECORDS: usize = 100_000;

/// Where a stored response lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holder {
    /// The provider's name in the config.
    pub provider: String,
    /// The public model that created it.
    pub model: String,
}

/// Whether a lookup could be answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The tenant created it: here it lives.
    Found(Holder),
    /// Not recorded for the tenant.
    Unknown,
    /// Not in process, and Redis (which may know) did not answer.
    Unavailable,
}

#[derive(Default)]
struct Local {
    records: HashMap<(String, String), Holder>,
    /// Each tenant's ids, oldest first.
    order: HashMap<String, VecDeque<String>>,
}

/// The record of stored responses; cheap to clone.
#[derive(Clone)]
pub(crate) struct StoredResponses {
    local: Arc<Mutex<Local>>,
    /// Records each tenant may keep in process.
    tenant_share: usize,
    redis: Option<(Arc<RedisConnection>, String, Duration)>,
}

impl StoredResponses {
    /// A record for `tenants` tenants, kept in Redis too when `redis` is
    /// given (with the config's key prefix and call timeout).
    pub(crate) fn new(
        redis: Option<(Arc<RedisConnection>, String, Duration)>,
        tenants: usize,
    ) -> Self {
        StoredResponses {
            local: Arc::default(),
            tenant_share: (IN_PROCESS_RECORDS / tenants.max(1)).max(1),
            redis,
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(prefix: &str, tenant: &str, id: &str) -> String {
        format!("{prefix}:{{{tenant}}}:response:{id}")
    }

    async fn redis<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, ()> {
        let Some((conn, _, timeout)) = &self.redis else {
            return Err(());
        };
        conn.query(cmd, *timeout, "responses").await
    }

    /// Records that `tenant` (its config id) created response `id`, held by
    /// `holder`.
    pub(crate) async fn record(&self, tenant: &str, id: &str, holder: Holder) {
        self.record_here(tenant, id, holder.clone());
        if let Some((_, prefix, _)) = &self.redis {
            let value = serde_json::to_string(&holder).expect("a holder serialises");
            let mut cmd = redis::cmd("SET");
            cmd.arg(Self::key(prefix, tenant, id))
                .arg(value)
                .arg("EX")
                .arg(KEEP.as_secs());
            if self.redis::<()>(cmd).await.is_err() {
                warn!(tenant, "a stored response is recorded in this process only (Redis did not answer); other instances will not find it");
            }
        }
    }

    /// Records it in this process, forgetting the tenant's oldest past its
    /// share.
    fn record_here(&self, tenant: &str, id: &str, holder: Holder) {
        let mut guard = self.local();
        let local = &mut *guard;
        let key = (tenant.to_string(), id.to_string());
        if local.records.insert(key, holder).is_some() {
            return;
        }
        let order = local.order.entry(tenant.to_string()).or_default();
        order.push_back(id.to_string());
        while order.len() > self.tenant_share {
            if let Some(oldest) = order.pop_front() {
                local.records.remove(&(tenant.to_string(), oldest));
            }
        }
    }

    /// Where `tenant`'s response `id` lives.
    pub(crate) async fn find(&self, tenant: &str, id: &str) -> Lookup {
        let key = (tenant.to_string(), id.to_string());
        if let Some(holder) = self.local().records.get(&key) {
            return Lookup::Found(holder.clone());
        }
        let Some((_, prefix, _)) = &self.redis else {
            return Lookup::Unknown;
        };
        let mut cmd = redis::cmd("GET");
        cmd.arg(Self::key(prefix, tenant, id));
        match self.redis::<Option<String>>(cmd).await {
            Ok(Some(value)) => match serde_json::from_str(&value) {
                Ok(holder) => Lookup::Found(holder),
                Err(_) => Lookup::Unknown,
            },
            Ok(None) => Lookup::Unknown,
            Err(()) => Lookup::Unavailable,
        }
    }

    /// Forgets `tenant`'s response `id` (it was deleted).
    pub(crate) async fn forget(&self, tenant: &str, id: &str) {
        let key = (tenant.to_string(), id.to_string());
        {
            let mut local = self.local();
            if local.records.remove(&key).is_some() {
                if let Some(order) = local.order.get_mut(tenant) {
                    order.retain(|k| k != id);
                }
            }
        }
        if let Some((_, prefix, _)) = &self.redis {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(Self::key(prefix, tenant, id));
            let _ = self.redis::<()>(cmd).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(provider: &str) -> Holder {
        Holder {
            provider: provider.into(),
            model: "m".into(),
        }
    }

    #[tokio::test]
    async fn a_response_is_found_only_by_the_tenant_that_created_it() {
        let stored = StoredResponses::new(None, 2);
        stored.record("acme", "resp_1", holder("openai")).await;
        assert_eq!(
            stored.find("acme", "resp_1").await,
            Lookup::Found(holder("openai"))
        );
        assert_eq!(stored.find("globex", "resp_1").await, Lookup::Unknown);
        stored.forget("acme", "resp_1").await;
        assert_eq!(stored.find("acme", "resp_1").await, Lookup::Unknown);
    }

    #[tokio::test]
    async fn the_in_process_record_is_bounded() {
        let stored = StoredResponses::new(None, 1);
        for i in 0..IN_PROCESS_RECORDS + 10 {
            stored
                .record("acme", &format!("resp_{i}"), holder("p"))
                .await;
        }
        assert_eq!(stored.find("acme", "resp_0").await, Lookup::Unknown);
        assert!(matches!(
            stored
                .find("acme", &format!("resp_{}", IN_PROCESS_RECORDS + 9))
                .await,
            Lookup::Found(_)
        ));
        assert_eq!(stored.local().records.len(), IN_PROCESS_RECORDS);
    }

    #[tokio::test]
    async fn one_tenant_cannot_push_out_anothers_responses() {
        let stored = StoredResponses::new(None, 4);
        let share = IN_PROCESS_RECORDS / 4;
        stored.record("globex", "resp_kept", holder("p")).await;
        for i in 0..IN_PROCESS_RECORDS + 10 {
            stored
                .record("acme", &format!("resp_{i}"), holder("p"))
                .await;
        }
        assert!(matches!(
            stored.find("globex", "resp_kept").await,
            Lookup::Found(_)
        ));
        // acme keeps its share: its newest.
        let newest = format!("resp_{}", IN_PROCESS_RECORDS + 9);
        assert!(matches!(
            stored.find("acme", &newest).await,
            Lookup::Found(_)
        ));
        let dropped = format!("resp_{}", IN_PROCESS_RECORDS + 9 - share);
        assert_eq!(stored.find("acme", &dropped).await, Lookup::Unknown);
        assert_eq!(stored.local().records.len(), share + 1);
        stored.forget("acme", &newest).await;
        assert_eq!(stored.local().order["acme"].len(), share - 1);
    }
}
