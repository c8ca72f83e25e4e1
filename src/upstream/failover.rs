//! The failover decision for one request, as a pure state machine: which
//! route and backend to try next, whether a failed attempt is retried, and
//! what the client is answered when nothing more can be tried.
//!
//! A request walks its routes in order (the requested model, then its
//! fallbacks the tenant may use). On each route it takes backends the
//! chooser offers (healthy, breaker allowing, not yet tried by this
//! request) until the route has none left, then moves to the next route,
//! never making more than `failover.max_attempts` attempts. An attempt that
//! failed before anything reached the client is retried on the next backend;
//! one whose failure another backend would share (a request the provider
//! refused as invalid), or that already answered the client, ends the
//! request. When nothing is left, the answer is the last failure, or 503
//! `no_healthy_upstream` with the soonest time a backend frees up when no
//! attempt could be made at all.

use super::{Backend, NoBackend};
use crate::config::ModelRoute;
use crate::openai::ApiError;
use std::net::SocketAddr;
use std::time::Duration;

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempted {
    /// The client has its answer (or went away): the request is over.
    Answered,
    /// Failed before anything reached the client; another backend may do
    /// better.
    Retryable(ApiError),
    /// Failed, and another backend would fare no better.
    Final(ApiError),
}

/// What to do after an attempt.
#[derive(Debug)]
pub enum Step {
    /// Try the next backend ([`Failover::next`]).
    TryNext,
    /// The request is over with this result.
    Done(Result<(), ApiError>),
}

/// One backend to try: the route's position in the request's routes, and
/// the backend chosen.
#[derive(Debug)]
pub struct Choice {
    /// Index into the routes given to [`Failover::next`].
    pub position: usize,
    /// The backend (and target) to try.
    pub backend: Backend,
}

/// A request's failover state.
#[derive(Debug)]
pub struct Failover {
    max_attempts: usize,
    attempts: u32,
    /// The route being tried, as a position in the request's routes.
    position: usize,
    /// (provider, address) pairs already tried by this request.
    tried: Vec<(usize, SocketAddr)>,
    last_error: Option<ApiError>,
    /// The soonest a backend that could not be chosen frees up.
    soonest: Option<Duration>,
}

impl Failover {
    /// A request that may make up to `max_attempts` attempts.
    pub fn new(max_attempts: usize) -> Self {
        Failover {
            max_attempts,
            attempts: 0,
            position: 0,
            tried: Vec::new(),
            last_error: None,
            soonest: None,
        }
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next backend to try, or `None` when the attempts are used up or
    /// no route has an eligible backend left. `choose` offers a backend of a
    /// route (its index in the config, the route, what was tried).
    pub fn next(
        &mut self,
        routes: &[(usize, &ModelRoute)],
        mut choose: impl FnMut(usize, &ModelRoute, &[(usize, SocketAddr)]) -> Result<Backend, NoBackend>,
    ) -> Option<Choice> {
        while self.position < routes.len() {
            if self.attempts as usize >= self.max_attempts {
                return None;
            }
            let (index, route) = routes[self.position];
            match choose(index, route, &self.tried) {
                Ok(backend) => {
                    self.tried.push((backend.provider, backend.addr));
                    self.attempts += 1;
                    return Some(Choice {
                        position: self.position,
                        backend,
                    });
                }
                Err(none) => {
                    self.soonest = match (self.soonest, none.retry_after) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.position += 1;
                }
            }
        }
        None
    }

    /// Takes how an attempt ended; what to do next.
    pub fn after(&mut self, attempted: Attempted) -> Step {
        match attempted {
            Attempted::Answered => Step::Done(Ok(())),
            Attempted::Final(error) => Step::Done(Err(error)),
            Attempted::Retryable(error) => {
                self.last_error = Some(error);
                Step::TryNext
            }
        }
    }

    /// The answer once nothing more can be tried: the last failure, or 503
    /// `no_healthy_upstream` for `model` when no attempt could be made.
    pub fn give_up(self, model: &str) -> ApiError {
        self.last_error.unwrap_or_else(|| {
            let mut error = ApiError::no_healthy_upstream(model);
            error.retry_after_ms = Some(self.soonest.map_or(1000, |d| d.as_millis().max(1) as u64));
            error
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Strategy, Target};
    use crate::upstream::breaker::Permit;

    fn route(name: &str, providers: &[usize]) -> ModelRoute {
        ModelRoute {
            name: name.into(),
            strategy: Strategy::RoundRobin,
            targets: providers
                .iter()
                .map(|&provider| Target {
                    provider,
                    model: name.into(),
                    price: None,
                })
                .collect(),
            fallbacks: Vec::new(),
        }
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    /// A chooser over fixed backends per route: (provider, port) pairs,
    /// offered in order unless already tried.
    fn chooser(
        backends: Vec<Vec<(usize, u16)>>,
        retry_after: Option<Duration>,
    ) -> impl FnMut(usize, &ModelRoute, &[(usize, SocketAddr)]) -> Result<Backend, NoBackend> {
        move |index, _, tried| {
            backends[index]
                .iter()
                .find(|(p, port)| !tried.contains(&(*p, addr(*port))))
                .map(|&(provider, port)| Backend {
                    route: index,
                    target: 0,
                    provider,
                    addr: addr(port),
                    permit: Permit::Normal,
                })
                .ok_or(NoBackend { retry_after })
        }
    }

    #[test]
    fn tries_each_backend_of_a_route_then_its_fallbacks_in_order() {
        let (a, b) = (route("a", &[0]), route("b", &[1]));
        let routes = [(0, &a), (1, &b)];
        let mut choose = chooser(vec![vec![(0, 1), (0, 2)], vec![(1, 3)]], None);
        let mut failover = Failover::new(5);
        let mut seen = Vec::new();
        while let Some(choice) = failover.next(&routes, &mut choose) {
            seen.push((choice.position, choice.backend.addr.port()));
            let step = failover.after(Attempted::Retryable(ApiError::upstream_error("5xx")));
            assert!(matches!(step, Step::TryNext));
        }
        assert_eq!(seen, [(0, 1), (0, 2), (1, 3)]);
        assert_eq!(failover.attempts(), 3);
        let answer = failover.give_up("a");
        assert_eq!(
            (answer.status, answer.code),
            (502, "upstream_error"),
            "the last failure"
        );
    }

    #[test]
    fn stops_at_max_attempts() {
        let a = route("a", &[0]);
        let routes = [(0, &a)];
        let mut choose = chooser(vec![vec![(0, 1), (0, 2), (0, 3)]], None);
        let mut failover = Failover::new(2);
        let mut tries = 0;
        while failover.next(&routes, &mut choose).is_some() {
            tries += 1;
            failover.after(Attempted::Retryable(ApiError::upstream_timeout("slow")));
        }
        assert_eq!(tries, 2);
        assert_eq!(failover.give_up("a").code, "upstream_timeout");
    }

    #[test]
    fn an_answered_or_final_attempt_ends_the_request() {
        let a = route("a", &[0]);
        let routes = [(0, &a)];
        let mut choose = chooser(vec![vec![(0, 1), (0, 2)]], None);
        let mut failover = Failover::new(3);
        failover.next(&routes, &mut choose).unwrap();
        assert!(matches!(
            failover.after(Attempted::Answered),
            Step::Done(Ok(()))
        ));
        let mut failover = Failover::new(3);
        failover.next(&routes, &mut choose).unwrap();
        match failover.after(Attempted::Final(ApiError::invalid_field("model", "no"))) {
            Step::Done(Err(e)) => assert_eq!(e.status, 400),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn with_nothing_eligible_answers_503_with_the_soonest_retry() {
        let (a, b) = (route("a", &[0]), route("b", &[1]));
        let routes = [(0, &a), (1, &b)];
        let mut choose = chooser(vec![vec![], vec![]], Some(Duration::from_millis(2500)));
        let mut failover = Failover::new(3);
        assert!(failover.next(&routes, &mut choose).is_none());
        assert_eq!(failover.attempts(), 0);
        let answer = failover.give_up("a");
        assert_eq!((answer.status, answer.code), (503, "no_healthy_upstream"));
        assert_eq!(answer.retry_after_ms, Some(2500));
    }

    #[test]
    fn a_backend_is_not_tried_twice_by_one_request() {
        let (a, b) = (route("a", &[0]), route("b", &[0]));
        let routes = [(0, &a), (1, &b)];
        // Both routes are on the same provider and backend.
        let mut choose = chooser(vec![vec![(0, 1)], vec![(0, 1)]], None);
        let mut failover = Failover::new(5);
        assert!(failover.next(&routes, &mut choose).is_some());
        failover.after(Attempted::Retryable(ApiError::upstream_error("5xx")));
        assert!(failover.next(&routes, &mut choose).is_none());
    }
}
