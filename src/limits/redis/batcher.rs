//! Group commit: admissions and settlements queued while a round trip is
//! out go together in the next, one script call per kind, tenant and
//! period, all in one pipeline.

use super::ledger::{self, Shared, Unsettled};
use super::scripts::{admit_answers, AdmitAnswer};
use super::{Keys, Lease, SettleOp, LEASE_TTL_MS};
use crate::lock;
use crate::redis_conn::Conn;
use redis::{RedisResult, Script};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most admissions and settlements one round trip carries.
pub(super) const MAX_BATCH: usize = 128;

/// Where the batching task sends one answer: the value, or why there is none.
pub(super) type Reply<T> = oneshot::Sender<Result<T, String>>;

/// An admission or settlement waiting for the next round trip.
pub(super) enum Op {
    Admit(AdmitOp),
    Settle(SettleOp),
}

/// One admission, as the batched [`ADMIT`] takes it.
pub(super) struct AdmitOp {
    pub(super) tenant: usize,
    pub(super) period_id: Arc<str>,
    /// RPM, TPM, max concurrent, budget (pUSD); 0 for none. Then the
    /// spend owed for the period that Redis has not counted (pUSD; see
    /// `Ledger::uncounted_spend`), which counts
    /// against the budget, and what this instance admitted while Redis was
    /// unavailable: its requests in flight, its requests and tokens TATs
    /// (Unix ms; constant from one such admission to the next, so they
    /// do not keep admissions from sharing a batch).
    pub(super) limits: [u64; 8],
    /// The tokens it reserves; `None` for no request (a release only).
    pub(super) tokens: Option<u64>,
    /// `None` when the tenant has no concurrency limit.
    pub(super) lease: Option<Lease>,
    /// Whether `lease` is a slot this instance kept (`redis.lease`).
    pub(super) kept: bool,
    /// With `redis.lease`: the requests and tokens asked for ahead, and
    /// those given back (0 for none), the hold they are given back from
    /// and the one what is asked for becomes.
    pub(super) extra: [i64; 2],
    pub(super) back: [i64; 2],
    pub(super) release: Option<Lease>,
    pub(super) hold: Option<Lease>,
    pub(super) reply: Reply<AdmitAnswer>,
}

/// Adds `op` to the batch it shares a script call with, or starts one.
pub(super) fn group<T>(batches: &mut Vec<Vec<T>>, op: T, same: impl Fn(&T, &T) -> bool) {
    match batches.iter_mut().find(|batch| same(&batch[0], &op)) {
        Some(batch) => batch.push(op),
        None => batches.push(vec![op]),
    }
}

/// Group commit for admissions and settlements. The ones queued while a
/// round trip is out go together in the next: one script call per kind,
/// tenant and period, all in one pipeline. Under load that is one round trip
/// and one script run for many requests; a request alone goes at once.
///
/// The task holds the connection and scripts, not the store, so it ends when
/// the store (the queue's sender) is dropped.
pub(super) struct Batcher {
    /// The connection round trips take: the shared one until `own` answers.
    pub(super) conn: Conn,
    /// A connection of the task's own, connecting on its runtime (see
    /// `RedisStore::queue`); taken over once it has answered.
    pub(super) own: Option<tokio::task::JoinHandle<Option<Conn>>>,
    pub(super) admit: Script,
    pub(super) settle: Script,
    pub(super) keys: Arc<[Keys]>,
    pub(super) timeout: Duration,
    /// How long Redis keeps a hold of quota taken ahead (`redis.lease`).
    pub(super) hold_ttl_ms: u64,
    pub(super) shared: Arc<Shared>,
}

impl Batcher {
    pub(super) async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Op>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut ops, MAX_BATCH).await > 0 {
            // The tasks woken with the first one queue theirs first: fewer,
            // larger batches (a sixth fewer script calls, a fifth less of
            // Redis's time, in the bench's Redis row).
            tokio::task::yield_now().await;
            while ops.len() < MAX_BATCH {
                let Ok(op) = queue.try_recv() else { break };
                ops.push(op);
            }
            if let Some(own) = self.own.take_if(|own| own.is_finished()) {
                // Finished: this does not wait.
                if let Ok(Some(own)) = own.await {
                    self.conn = own;
                }
            }
            self.send(ops.drain(..)).await;
        }
    }

    /// Sends one batch and answers every caller in it.
    pub(super) async fn send(&self, ops: impl Iterator<Item = Op>) {
        let mut admits: Vec<Vec<AdmitOp>> = Vec::new();
        let mut settles: Vec<Vec<SettleOp>> = Vec::new();
        for op in ops {
            match op {
                // A caller that stopped waiting (timed out) has already
                // fallen back to the in-process store: it is not sent.
                Op::Admit(op) if !op.reply.is_closed() => group(&mut admits, op, |a, b| {
                    (a.tenant, &a.period_id, a.limits) == (b.tenant, &b.period_id, b.limits)
                }),
                Op::Admit(_) => {}
                // A settlement belongs to the store once queued: sent, or
                // kept for the flush while Redis is down.
                Op::Settle(op) if !self.shared.is_up(op.tenant) => {
                    self.shared
                        .defer(op.tenant, &op.period_id, op.lease, &op.usage);
                    let _ = op.reply.send(Ok(()));
                }
                Op::Settle(op) => group(&mut settles, op, |a, b| {
                    (a.tenant, &a.period_id, a.rpm, a.tpm) == (b.tenant, &b.period_id, b.rpm, b.tpm)
                }),
            }
        }
        let unsettled: Vec<Unsettled> = settles
            .iter()
            .map(|batch| Unsettled::from_ops(&self.keys[batch[0].tenant], batch))
            .collect();
        // Each command touches one tenant's keys (one hash slot).
        let commands: Vec<(usize, redis::Cmd)> = admits
            .iter()
            .map(|batch| (batch[0].tenant, self.admit_command(batch)))
            .chain(unsettled.iter().map(|u| {
                (
                    u.tenant,
                    u.command(&self.keys[u.tenant], &self.settle, true),
                )
            }))
            .collect();
        if commands.is_empty() {
            return;
        }
        let results = match tokio::time::timeout(self.timeout, self.query(&commands)).await {
            Ok(Ok(results)) if results.len() == commands.len() => results,
            Ok(Ok(_)) => {
                let e = (redis::ErrorKind::Client, "a reply per command was expected").into();
                vec![Err(e); commands.len()]
            }
            Ok(Err(e)) => vec![Err(e); commands.len()],
            Err(_) => {
                let e = (redis::ErrorKind::Io, "no answer within the timeout").into();
                vec![Err(e); commands.len()]
            }
        };
        let mut results = results.into_iter();
        for batch in admits {
            let answers = results
                .next()
                .unwrap_or(Ok(redis::Value::Nil))
                .map_err(|e| e.to_string())
                .and_then(|value| admit_answers(value, batch.len()));
            match answers {
                Ok(answers) => {
                    for (op, answer) in batch.into_iter().zip(answers) {
                        let _ = op.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for op in batch {
                        let _ = op.reply.send(Err(e.clone()));
                    }
                }
            }
        }
        for (batch, unsettled) in settles.into_iter().zip(unsettled) {
            let result = match results.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) if ledger::refused(&e) => {
                    // Redis answered, and wrote none of it: owed again,
                    // not a Redis outage.
                    lock(&self.shared.ledger).refuse(unsettled, "settle", &e.to_string());
                    Ok(())
                }
                // Redis may or may not have applied it: the flush sends it
                // again under the same number.
                Some(Err(e)) => {
                    lock(&self.shared.ledger).unanswered(unsettled);
                    Err(e.to_string())
                }
                None => {
                    lock(&self.shared.ledger).unanswered(unsettled);
                    Err("no reply".to_string())
                }
            };
            for op in batch {
                let _ = op.reply.send(result.clone());
            }
        }
    }

    /// Runs the commands (each with the tenant whose keys it touches) in
    /// one pipeline, one per tenant on a cluster, each with its own result.
    /// Scripts Redis does not know (it restarted, or a replica took over)
    /// are loaded and only the commands that named them run again.
    pub(super) async fn query(
        &self,
        commands: &[(usize, redis::Cmd)],
    ) -> RedisResult<Vec<RedisResult<redis::Value>>> {
        let mut conn = self.conn.clone();
        let mut results = conn.pipeline(commands).await?;
        let no_script = |r: &RedisResult<redis::Value>| matches!(r, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
        let again: Vec<usize> = (0..results.len())
            .filter(|&i| no_script(&results[i]))
            .collect();
        if !again.is_empty() {
            self.admit.load_async(&mut conn).await?;
            self.settle.load_async(&mut conn).await?;
            let retry: Vec<(usize, redis::Cmd)> =
                again.iter().map(|&i| commands[i].clone()).collect();
            let retried = conn.pipeline(&retry).await?;
            for (i, result) in again.into_iter().zip(retried) {
                results[i] = result;
            }
        }
        Ok(results)
    }

    /// One `EVALSHA` of [`ADMIT`] for admissions of one tenant and period.
    pub(super) fn admit_command(&self, batch: &[AdmitOp]) -> redis::Cmd {
        let first = &batch[0];
        let keys = &self.keys[first.tenant];
        // Sized up front, as the settlement's (see `Unsettled::command`).
        let mut cmd = redis::Cmd::with_capacity(14 + 9 * batch.len(), 440 + 72 * batch.len());
        cmd.arg("EVALSHA")
            .arg(self.admit.get_hash())
            .arg(4)
            .arg(&keys.rate)
            .arg(&keys.inflight)
            .arg(keys.usage(&first.period_id))
            .arg(&keys.holds);
        cmd.arg(&first.limits[..])
            .arg(LEASE_TTL_MS)
            .arg(self.hold_ttl_ms);
        let id = |cmd: &mut redis::Cmd, id: Option<Lease>| {
            match id {
                Some(id) => cmd.arg(id),
                None => cmd.arg(""),
            };
        };
        for op in batch {
            match op.tokens {
                Some(tokens) => cmd.arg(tokens),
                None => cmd.arg(-1),
            };
            id(&mut cmd, op.lease);
            cmd.arg(if op.kept { "1" } else { "0" })
                .arg(&op.extra[..])
                .arg(&op.back[..]);
            id(&mut cmd, op.release);
            id(&mut cmd, op.hold);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_operations_that_share_a_script_call() {
        let mut batches: Vec<Vec<(u8, u32)>> = Vec::new();
        for op in [(0, 1), (1, 2), (0, 3), (2, 4), (1, 5)] {
            group(&mut batches, op, |a, b| a.0 == b.0);
        }
        assert_eq!(
            batches,
            [vec![(0, 1), (0, 3)], vec![(1, 2), (1, 5)], vec![(2, 4)]]
        );
    }
}
