//! The queue itself: entries, parking a request and waiting for its turn,
//! giving up a place.

use super::{answered, unix_ms, Overflow, ParkRefusal, Waited, Waiter};
use crate::limits::{Grant, Limiter, Refusal};
use crate::lock;
use crate::metrics;
use std::time::Instant;
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    Sync {
        id: String,
        tokens: u64,
        deadline_ms: u64,
        owner: String,
    },
    Async {
        id: String,
    },
}

impl Entry {
    pub(super) fn encode(&self) -> String {
        match self {
            Entry::Sync {
                id,
                tokens,
                deadline_ms,
                owner,
            } => format!("s|{id}|{tokens}|{deadline_ms}|{owner}"),
            Entry::Async { id } => format!("a|{id}"),
        }
    }

    pub(super) fn decode(raw: &str) -> Option<Entry> {
        let parts: Vec<&str> = raw.split('|').collect();
        match parts.as_slice() {
            ["s", id, tokens, deadline_ms, owner] |
            // Before 0.2 a sync entry also held its route's position.
            ["s", id, tokens, _, deadline_ms, owner] => Some(Entry::Sync {
                id: id.to_string(),
                tokens: tokens.parse().ok()?,
                deadline_ms: deadline_ms.parse().ok()?,
                owner: owner.to_string(),
            }),
            ["a", id] => Some(Entry::Async { id: id.to_string() }),
            _ => None,
        }
    }
}

/// A parked request's place in its queue.
#[derive(Debug)]
pub struct Parked {
    tenant: usize,
    entry: Entry,
    parked_at: Instant,
    admission: Option<oneshot::Receiver<Result<Grant, Refusal>>>,
}

impl Overflow {
    /// Counts a request refused a place in `tenant`'s queue, once, by the
    /// caller that answers it.
    pub fn count_park_refusal(&self, tenant: usize, why: ParkRefusal) {
        match why {
            ParkRefusal::Full | ParkRefusal::StoreFull(_) => self.count(tenant, "full"),
            ParkRefusal::Unavailable | ParkRefusal::Unconfirmed => {
                self.count(tenant, "unavailable")
            }
        }
    }

    /// Appends an entry unless the tenant has `max_parked` already (or the
    /// shared queue cannot be reached).
    async fn push(&self, tenant: usize, entry: &Entry) -> Result<(), ParkRefusal> {
        let max = self.inner.settings[tenant].max_parked;
        if let Some(r) = &self.inner.redis {
            let script = redis::Script::new(
                "if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end \
                 redis.call('RPUSH', KEYS[1], ARGV[1]) return 1",
            );
            let mut invocation = script.key(self.key(tenant, "queue"));
            invocation.arg(entry.encode()).arg(max);
            let Some(mut conn) = r.conn() else {
                return Err(ParkRefusal::Unavailable);
            };
            return match tokio::time::timeout(r.timeout, invocation.invoke_async::<i64>(&mut conn))
                .await
            {
                Ok(Ok(1)) => Ok(()),
                Ok(Ok(_)) => Err(ParkRefusal::Full),
                _ => {
                    metrics::REDIS_ERRORS.with_label_values(&["overflow"]).inc();
                    Err(ParkRefusal::Unavailable)
                }
            };
        }
        let mut local = lock(&self.inner.local);
        let queue = local.queues.entry(tenant).or_default();
        if queue.len() >= max {
            return Err(ParkRefusal::Full);
        }
        queue.push_back(entry.clone());
        Ok(())
    }

    pub(super) async fn remove(&self, tenant: usize, entry: &Entry) {
        if self.inner.redis.is_some() {
            let _: Option<i64> = self
                .redis(
                    redis::cmd("LREM")
                        .arg(self.key(tenant, "queue"))
                        .arg(1)
                        .arg(entry.encode()),
                )
                .await;
            return;
        }
        if let Some(queue) = lock(&self.inner.local).queues.get_mut(&tenant) {
            queue.retain(|e| e != entry);
        }
    }

    /// Parks a sync request for `route` (its index in this process's
    /// config): it joins the tenant's queue and waits for
    /// [`Overflow::wait`]. The caller races the wait against the client going
    /// away and calls [`Overflow::abandon`] if it does, and counts a refusal
    /// it answers ([`Overflow::count_park_refusal`]).
    pub async fn park(
        &self,
        tenant: usize,
        route: usize,
        tokens: u64,
    ) -> Result<Parked, ParkRefusal> {
        if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // No drain to admit it.
            return Err(ParkRefusal::Unavailable);
        }
        let settings = &self.inner.settings[tenant];
        let id = crate::ids::random_token();
        let entry = Entry::Sync {
            id: id.clone(),
            tokens,
            deadline_ms: unix_ms() + settings.max_wait.as_millis() as u64,
            owner: self.inner.instance.clone(),
        };
        let (admit, rx) = oneshot::channel();
        let waiter = Waiter {
            admit,
            route,
            tenant,
            queued: None,
            parked_at: Instant::now(),
        };
        self.add_waiter(id.clone(), waiter);
        if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // The drain stopped as it parked: nothing would admit it.
            self.take_waiter(&id);
            return Err(ParkRefusal::Unavailable);
        }
        if let Err(refusal) = self.push(tenant, &entry).await {
            self.take_waiter(&id);
            return Err(refusal);
        }
        if self.inner.redis.is_some() {
            if let Some(waiter) = lock(&self.inner.waiters).get_mut(&id) {
                waiter.queued = Some(entry.clone());
            }
        }
        self.visit_soon(tenant);
        Ok(Parked {
            tenant,
            entry,
            parked_at: Instant::now(),
            admission: Some(rx),
        })
    }

    /// Waits for the parked request's admission, up to the tenant's
    /// `max_wait`.
    pub async fn wait(&self, parked: &mut Parked) -> Waited {
        let tenant = parked.tenant;
        let max_wait = self.inner.settings[tenant].max_wait;
        let Some(rx) = parked.admission.as_mut() else {
            return Waited::TimedOut;
        };
        let admitted = match tokio::time::timeout(max_wait, &mut *rx).await {
            Ok(result) => result.ok(),
            // A grant may have arrived as the wait ran out: take it.
            Err(_) => rx.try_recv().ok(),
        };
        match admitted {
            Some(Ok(grant)) => {
                parked.admission = None;
                metrics::OVERFLOW_WAIT
                    .with_label_values(&[&self.inner.tenant_ids[tenant]])
                    .observe(parked.parked_at.elapsed().as_secs_f64());
                self.count(tenant, "admitted");
                Waited::Admitted(grant)
            }
            Some(Err(refusal)) => {
                // The drain took its place away already.
                parked.admission = None;
                self.count(tenant, "refused");
                Waited::Refused(refusal)
            }
            _ => {
                self.forget(parked).await;
                if self
                    .inner
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    self.count(tenant, "stopping");
                    return Waited::Stopping;
                }
                self.count(tenant, "timeout");
                Waited::TimedOut
            }
        }
    }

    /// A waiting client went away: it gives up its place (a grant that
    /// raced in is given back unused).
    pub async fn abandon(&self, parked: &mut Parked, limiter: &Limiter) {
        self.forget(parked).await;
        if let Some(Ok(Ok(grant))) = parked.admission.take().map(|mut rx| rx.try_recv()) {
            limiter.release(grant).await;
        }
        self.count(parked.tenant, "abandoned");
    }

    async fn forget(&self, parked: &Parked) {
        if let Entry::Sync { id, .. } = &parked.entry {
            self.take_waiter(id);
        }
        self.remove(parked.tenant, &parked.entry).await;
    }
}

/// The longest queue [`Overflow::restore_places`] looks through; a longer
/// one is not checked.
const RESTORE_SCAN: usize = 10_000;

/// Puts back the entries (`ARGV[4..]`) the queue (`KEYS[1]`) no longer
/// holds, each before the first request parked with a later deadline (so
/// in the order they parked, whichever instance puts its own back first),
/// and renews the instance's heartbeat (`KEYS[2]`, PX `ARGV[1]`; member
/// `ARGV[2]` of `KEYS[3]`), lost with them, so that the other instances do
/// not take the entries for a dead instance's. How many were put back; -1
/// when the queue is longer than `ARGV[3]`. Only commands the documented
/// ACL allows: an entry goes in the middle by turning the list round once
/// (`LMOVE` of each entry from its head to its tail).
const RESTORE: &str = r"
if redis.call('LLEN', KEYS[1]) > tonumber(ARGV[3]) then return -1 end
local queue = redis.call('LRANGE', KEYS[1], 0, -1)
local held = {}
for _, entry in ipairs(queue) do held[entry] = true end
local function deadline(entry)
  return tonumber(string.match(entry, '^s|[^|]*|[^|]*|(%d+)|[^|]*$'))
end
local lost = {}
for i = 4, #ARGV do
  if not held[ARGV[i]] and deadline(ARGV[i]) then
    held[ARGV[i]] = true
    table.insert(lost, ARGV[i])
  end
end
if #lost == 0 then return 0 end
table.sort(lost, function(a, b) return deadline(a) < deadline(b) end)
local later = false
for _, entry in ipairs(queue) do
  local due = deadline(entry)
  if due and due > deadline(lost[1]) then later = true break end
end
local k = 1
if later then
  for _, entry in ipairs(queue) do
    local due = deadline(entry)
    while k <= #lost and due and due > deadline(lost[k]) do
      redis.call('RPUSH', KEYS[1], lost[k])
      k = k + 1
    end
    redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
  end
end
for i = k, #lost do redis.call('RPUSH', KEYS[1], lost[i]) end
redis.call('SET', KEYS[2], 1, 'PX', ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return #lost
";

impl Overflow {
    /// Puts back the places of requests parked here that Redis lost: it
    /// restarted without its data, was flushed, or a replica that had not
    /// seen them took over. They would otherwise wait out `max_wait` with
    /// nothing to admit them. A place goes back where its deadline puts it
    /// (see [`RESTORE`]); the drain checks once a second.
    pub(super) async fn restore_places(&self) {
        let Some(r) = &self.inner.redis else {
            return;
        };
        let now = unix_ms();
        let mut places: Vec<(usize, Instant, String)> = lock(&self.inner.waiters)
            .values()
            .filter_map(|w| match &w.queued {
                Some(entry @ Entry::Sync { deadline_ms, .. }) if *deadline_ms > now => {
                    Some((w.tenant, w.parked_at, entry.encode()))
                }
                _ => None,
            })
            .collect();
        places.sort_unstable();
        let heartbeat_ms = self.inner.jobs.visibility_timeout.as_millis() as u64;
        let script = redis::Script::new(RESTORE);
        for tenant_places in places.chunk_by(|a, b| a.0 == b.0) {
            let tenant = tenant_places[0].0;
            let mut invocation = script.key(self.key(tenant, "queue"));
            invocation
                .key(self.key(tenant, &format!("worker:{}", self.inner.instance)))
                .key(self.key(tenant, "workers"))
                .arg(heartbeat_ms)
                .arg(&self.inner.instance)
                .arg(RESTORE_SCAN);
            for (_, _, entry) in tenant_places {
                invocation.arg(entry);
            }
            let Some(mut conn) = r.conn() else {
                return;
            };
            let restored = answered(
                tokio::time::timeout(r.timeout, invocation.invoke_async::<i64>(&mut conn)).await,
            );
            if let Some(restored @ 1..) = restored {
                tracing::warn!(tenant = %self.inner.tenant_ids[tenant], restored, "overflow queue: Redis had lost the places of requests parked here (restarted without its data, flushed, or a replica behind took over); they are queued again");
                self.visit_soon(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let sync = Entry::Sync {
            id: "abc".into(),
            tokens: 42,
            deadline_ms: 1_700_000_000_000,
            owner: "0123abcd".into(),
        };
        assert_eq!(Entry::decode(&sync.encode()), Some(sync.clone()));
        // The older form, with a route position, still reads.
        assert_eq!(
            Entry::decode("s|abc|42|7|1700000000000|0123abcd"),
            Some(sync)
        );
        let job = Entry::Async { id: "job_1".into() };
        assert_eq!(Entry::decode(&job.encode()), Some(job));
        assert_eq!(Entry::decode("x|y"), None);
        assert_eq!(Entry::decode("s|a|notanumber|2|o"), None);
        assert_eq!(Entry::decode(""), None);
    }
}
