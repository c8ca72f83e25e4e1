//! Coalescing: concurrent identical requests make one provider call. The
//! first (the leader) forwards as usual and publishes what its client gets;
//! the others wait for it and are answered from it: a stream asked for
//! like the leader's follows the leader's bytes as they arrive, anything
//! else gets the finished answer replayed. When the leader fails, each
//! waiter makes its own call.

use super::Key;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// How a client wants its answer (a stream with or without its usage
/// chunk, or JSON): a waiter follows the leader's bytes only when asked the
/// same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    pub stream: bool,
    pub include_usage: bool,
}

/// How a flight ended.
#[derive(Debug, Clone)]
pub enum Landed {
    /// A complete answer, as it would be stored.
    Answer(Arc<super::Entry>),
    /// A complete answer that is not kept (too large, or not one to
    /// replay): followers of its stream have it all; it cost this much.
    Unstored(i64),
    /// No answer to share: the waiters call the provider themselves (a
    /// follower whose stream ended as the first request's did is logged
    /// with its reason, when it had one: an in-band error's).
    Failed(Option<&'static str>),
}

#[derive(Default)]
struct Progress {
    /// The answer's status and content type, once sent.
    head: Option<(u16, String)>,
    /// The body so far, as the leader's client got it.
    chunks: Vec<Bytes>,
    bytes: usize,
    /// The body went past the bound: no waiter can follow it any more.
    overflowed: bool,
    /// The body ended (as far as the leader's client is concerned).
    ended: bool,
    landed: Option<Landed>,
    /// Requests waiting on the flight (following its bytes or its
    /// landing).
    waiters: usize,
}

/// One provider call others may wait on.
pub struct Flight {
    form: Form,
    progress: Mutex<Progress>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
    /// The most body bytes kept for followers.
    max_bytes: usize,
}

impl Flight {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// How the leader's client asked.
    pub fn form(&self) -> Form {
        self.form
    }

    /// Whether requests wait on the flight (the leader's call then runs to
    /// its end even if its own client goes).
    pub fn has_waiters(&self) -> bool {
        self.progress().waiters > 0
    }

    /// The leader's client got its answer's head.
    pub fn head(&self, status: u16, content_type: String) {
        self.progress().head = Some((status, content_type));
        self.bump();
    }

    /// The leader's client got a piece of the body (`end` on the last).
    pub fn body(&self, chunk: &Bytes, end: bool) {
        {
            let mut progress = self.progress();
            if !progress.overflowed {
                if progress.bytes + chunk.len() > self.max_bytes {
                    progress.overflowed = true;
                    progress.chunks.clear();
                } else {
                    progress.bytes += chunk.len();
                    progress.chunks.push(chunk.clone());
                }
            }
            progress.ended |= end;
        }
        self.bump();
    }

    /// Waits for the flight to land.
    pub async fn landed(&self) -> Landed {
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(landed) = &self.progress().landed {
                return landed.clone();
            }
            if changes.changed().await.is_err() {
                return Landed::Failed(None);
            }
        }
    }

    /// Follows the leader's stream: `follower` gets its status and
    /// content type, then every piece of the body from the start, as it
    /// comes. See [`Followed`] for how it ends.
    pub async fn follow<F: Follower>(&self, follower: &mut F) -> Followed {
        let mut changes = self.changed.subscribe();
        let head = loop {
            {
                let progress = self.progress();
                if progress.overflowed || progress.landed.is_some() {
                    return Followed::Nothing;
                }
                if let Some(head) = progress.head.clone() {
                    if head.0 != 200 {
                        return Followed::Nothing;
                    }
                    break head;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Followed::Nothing },
                _ = follower.gone() => return Followed::Abandoned,
            }
        };
        if !follower.head(head.0, &head.1).await {
            return Followed::Abandoned;
        }
        let mut sent = 0;
        // Whether the stream's `data: [DONE]` went to the follower: a
        // client leaving after it had the whole answer.
        let mut done = false;
        loop {
            let (pending, ended, overflowed, landed) = {
                let progress = self.progress();
                (
                    progress.chunks.get(sent..).unwrap_or_default().to_vec(),
                    progress.ended,
                    progress.overflowed,
                    progress.landed.is_some(),
                )
            };
            if overflowed {
                // Past the bound mid-stream: what was sent cannot be taken
                // back.
                return Followed::Broken;
            }
            for chunk in pending {
                sent += 1;
                let last = says_done(&chunk);
                if !follower.body(chunk).await {
                    return Followed::ClientLeft { whole: done };
                }
                done |= last;
            }
            if ended && sent == self.progress().chunks.len() {
                return Followed::Whole;
            }
            if landed {
                // The leader's call ended before its stream did.
                return Followed::Broken;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Followed::Broken },
                // Often right after `[DONE]`, before the leader's body has
                // ended: SDKs close a stream there.
                _ = follower.gone() => return Followed::ClientLeft { whole: done },
            }
        }
    }
}

/// Whether a piece of a chat or completion stream holds its `[DONE]`
/// event: `data:` (and a space, or not) at a line's start, which an
/// event's JSON cannot hold (its strings have no raw line end; a piece of
/// an event too long to hold whole may start anywhere, so one that starts
/// with it is taken at its word).
fn says_done(chunk: &[u8]) -> bool {
    memchr::memmem::find_iter(chunk, b"[DONE]").any(|at| {
        let before = &chunk[..at];
        let before = before.strip_suffix(b" ").unwrap_or(before);
        before
            .strip_suffix(b"data:")
            .is_some_and(|line| line.is_empty() || line.ends_with(b"\n"))
    })
}

/// How following a flight's stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    /// Nothing went out (not a 200 stream, landed already, past the bound
    /// before it started): the caller waits for the landing instead.
    Nothing,
    /// The whole body went out.
    Whole,
    /// The follower's client went away before anything reached it.
    Abandoned,
    /// The follower's client went away (or could not be written to) after
    /// the head went out; `whole` when the stream's `[DONE]` had gone to
    /// it (SDKs close a stream there).
    ClientLeft { whole: bool },
    /// Something went out and the rest cannot: the leader's call ended
    /// before its stream did, or the stream went past the bound.
    Broken,
}

/// A request's place among a flight's waiters, held while it waits.
pub struct Waiting {
    flight: Arc<Flight>,
}

impl std::ops::Deref for Waiting {
    type Target = Flight;

    fn deref(&self) -> &Flight {
        &self.flight
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.flight.progress().waiters -= 1;
    }
}

/// Where a follower's bytes go.
#[async_trait::async_trait]
pub trait Follower: Send {
    /// The answer's head; false when the client is gone.
    async fn head(&mut self, status: u16, content_type: &str) -> bool;
    /// A piece of the body; false when the client is gone.
    async fn body(&mut self, chunk: Bytes) -> bool;
    /// Resolves when the client goes away.
    async fn gone(&mut self);
}

/// The provider calls in flight, by key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Key, Arc<Flight>>>,
}

/// Joining a flight: lead it, or wait on the one in the air.
pub enum Join {
    Lead(Leader),
    Wait(Waiting),
}

/// The leader's hold on its flight: landing it (or dropping it, which
/// lands it failed) lets the waiters go.
pub struct Leader {
    flights: Arc<Flights>,
    key: Key,
    flight: Arc<Flight>,
    landed: bool,
}

impl Leader {
    /// The flight, to publish the answer as it goes.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Lands the flight: the answer for the waiters, or none. The flight
    /// stays joinable until the leader is dropped (a request joining it
    /// now gets the landed answer at once), so the caller drops it only
    /// once the answer is stored: no identical request then finds neither
    /// the flight nor the stored entry and calls the provider again.
    pub fn land(&mut self, landed: Landed) {
        if std::mem::replace(&mut self.landed, true) {
            return;
        }
        self.flight.progress().landed = Some(landed);
        self.flight.bump();
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.land(Landed::Failed(None));
        self.flights.lock().remove(&self.key);
    }
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`: leads a new one (asked as `form`,
    /// keeping at most `max_bytes` for followers) or waits on the one in
    /// the air.
    pub fn join(self: &Arc<Self>, key: Key, form: Form, max_bytes: usize) -> Join {
        let mut map = self.lock();
        if let Some(flight) = map.get(&key) {
            flight.progress().waiters += 1;
            return Join::Wait(Waiting {
                flight: flight.clone(),
            });
        }
        let flight = Arc::new(Flight {
            form,
            progress: Mutex::default(),
            changed: watch::channel(0).0,
            max_bytes,
        });
        map.insert(key, flight.clone());
        Join::Lead(Leader {
            flights: self.clone(),
            key,
            flight,
            landed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Form = Form {
        stream: false,
        include_usage: false,
    };

    #[tokio::test]
    async fn waiters_get_the_leaders_answer_and_a_dropped_leader_fails_them() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(mut leader) = flights.join([1; 32], JSON, 1024) else {
            panic!("the first leads");
        };
        let Join::Wait(flight) = flights.join([1; 32], JSON, 1024) else {
            panic!("the second waits");
        };
        let waiter = tokio::spawn(async move { flight.landed().await });
        let entry = super::super::Entry {
            stored_at_ms: 0,
            cost_pusd: 5,
            streamable: true,
            answer: serde_json::value::to_raw_value(&serde_json::json!({})).unwrap(),
        };
        leader.land(Landed::Answer(Arc::new(entry)));
        assert!(matches!(waiter.await.unwrap(), Landed::Answer(e) if e.cost_pusd == 5));
        // Landed but not yet stored: one arriving now gets the answer.
        let Join::Wait(late) = flights.join([1; 32], JSON, 1024) else {
            panic!("joins the landed flight");
        };
        assert!(matches!(late.landed().await, Landed::Answer(e) if e.cost_pusd == 5));
        drop(leader);
        // Landed and stored: the next one leads again.
        let Join::Lead(leader) = flights.join([1; 32], JSON, 1024) else {
            panic!("a new flight");
        };
        let Join::Wait(flight) = flights.join([1; 32], JSON, 1024) else {
            panic!("waits");
        };
        drop(leader);
        assert!(matches!(flight.landed().await, Landed::Failed(None)));
    }

    struct Sink(Vec<Bytes>);

    #[async_trait::async_trait]
    impl Follower for Sink {
        async fn head(&mut self, status: u16, _: &str) -> bool {
            status == 200
        }
        async fn body(&mut self, chunk: Bytes) -> bool {
            self.0.push(chunk);
            true
        }
        async fn gone(&mut self) {
            std::future::pending::<()>().await
        }
    }

    #[tokio::test]
    async fn a_follower_gets_the_stream_from_its_start_as_it_comes() {
        let flights = Arc::new(Flights::default());
        let form = Form {
            stream: true,
            include_usage: false,
        };
        let Join::Lead(leader) = flights.join([2; 32], form, 1024) else {
            panic!()
        };
        let flight = leader.flight().clone();
        flight.head(200, "text/event-stream".into());
        flight.body(&Bytes::from_static(b"a"), false);
        let Join::Wait(waiting) = flights.join([2; 32], form, 1024) else {
            panic!()
        };
        let follower = tokio::spawn(async move {
            let mut sink = Sink(Vec::new());
            let whole = waiting.follow(&mut sink).await;
            (whole, sink.0)
        });
        tokio::task::yield_now().await;
        flight.body(&Bytes::from_static(b"b"), false);
        flight.body(&Bytes::from_static(b"c"), true);
        let (whole, got) = follower.await.unwrap();
        assert_eq!(whole, Followed::Whole);
        assert_eq!(got.concat(), b"abc");
        assert!(!flight.has_waiters());
    }

    /// A client that refuses the `0`-th piece of the body (from 1).
    struct Leaving(usize);

    #[async_trait::async_trait]
    impl Follower for Leaving {
        async fn head(&mut self, _: u16, _: &str) -> bool {
            true
        }
        async fn body(&mut self, _: Bytes) -> bool {
            self.0 -= 1;
            self.0 > 0
        }
        async fn gone(&mut self) {
            std::future::pending::<()>().await
        }
    }

    #[tokio::test]
    async fn a_follower_leaving_had_the_whole_answer_once_done_went_to_it() {
        let form = Form {
            stream: true,
            include_usage: false,
        };
        // Its content names `[DONE]`; only an event of its own ends a stream.
        let event = &b"data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]\"}}]}\n\n"[..];
        let done = &b"data: [DONE]\n\n"[..];
        let unspaced = &b"data:[DONE]\n\n"[..];
        let both = [event, done].concat();
        let more = &b": more\n\n"[..];
        for (pieces, refused, whole) in [
            (vec![event, done, more], 3, true),
            (vec![event, done], 2, false),
            (vec![&both[..], more], 2, true),
            (vec![event, more], 2, false),
            (vec![event, unspaced, more], 3, true),
        ] {
            let flights = Arc::new(Flights::default());
            let Join::Lead(leader) = flights.join([3; 32], form, 1024) else {
                panic!()
            };
            let flight = leader.flight().clone();
            flight.head(200, "text/event-stream".into());
            for piece in &pieces {
                flight.body(&Bytes::copy_from_slice(piece), false);
            }
            let Join::Wait(waiting) = flights.join([3; 32], form, 1024) else {
                panic!()
            };
            let left = waiting.follow(&mut Leaving(refused)).await;
            assert_eq!(
                left,
                Followed::ClientLeft { whole },
                "{pieces:?}, {refused}"
            );
        }
    }
}
