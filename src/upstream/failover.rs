//! The failover decision for one request, as a pure state machine: which
//! route and deployment to try next, whether a failed attempt is retried
//! (on the same deployment, after a wait, or elsewhere), and what the
//! client is answered when nothing more can be tried.
//!
//! A request walks its routes in order (the requested model, then its
//! fallbacks the tenant may use), taking deployments the chooser offers
//! (healthy backend, breakers allowing, not ruled out by this request), and
//! never makes more than `failover.max_attempts` attempts. How an attempt
//! ended decides the next step:
//!
//! - answered (or the client left): done;
//! - a failure another deployment would share (a request the provider
//!   refused as invalid, a content-policy rejection): that answer;
//! - a transient failure (a 500/502/503, a reset before any byte): the same
//!   deployment once more (`failover.same_deployment_retries`) after a short
//!   jittered pause, then on;
//! - any other failure before anything reached the client: the deployment
//!   (or, for a transport failure, the backend address) is out for this
//!   request, and the next one is tried;
//! - the provider's own 429: the deployment cools down for the provider's
//!   wait and is not ruled out, so when nothing else can serve and that wait
//!   is within `failover.max_retry_wait_ms`, the request waits and tries it
//!   again;
//! - the prompt is longer than the model's context: the request moves to
//!   the model's `context_fallbacks` (never retried unchanged).
//!
//! When nothing is left, the answer is the last failure, or 503
//! `no_healthy_upstream` with the soonest time a deployment frees up when no
//! attempt could be made at all.

use super::health::Domain;
use super::{Backend, NoBackend, Tried};
use crate::config::{FailoverSettings as Policy, ModelRoute};
use crate::openai::ApiError;
use std::time::Duration;

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempted {
    /// The client has its answer: the request is over.
    Answered,
    /// The client went away before its answer was whole: the request is
    /// over, and nothing is said about the deployment.
    ClientGone,
    /// Failed before anything reached the client; another deployment may do
    /// better. `domain` says what is out for this request; `transient`
    /// failures are worth one more try on the same deployment.
    Retryable {
        error: ApiError,
        domain: Domain,
        transient: bool,
    },
    /// The provider rate-limited the deployment (it cools down for the
    /// provider's wait).
    RateLimited(ApiError),
    /// A stream broke after reaching the client, and can be continued on
    /// another deployment (this one is out for the request).
    StreamBroken(ApiError),
    /// The prompt does not fit the model's context window.
    ContextTooLong(ApiError),
    /// Failed, and another deployment would fare no better.
    Final(ApiError),
}

impl Attempted {
    /// A failure of the deployment (not transient).
    pub fn deployment(error: ApiError) -> Self {
        Attempted::Retryable {
            error,
            domain: Domain::Deployment,
            transient: false,
        }
    }
}

/// What to do next.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Ask for the next deployment ([`Failover::next`]).
    TryNext,
    /// Try the same deployment again after this pause.
    RetrySame(Duration),
    /// The request is over with this result.
    Done(Result<(), ApiError>),
}

/// What [`Failover::next`] offers.
#[derive(Debug)]
pub enum Next<'r> {
    /// Try this deployment, for this route.
    Try {
        /// The route's index in the config, and the route.
        route: (usize, &'r ModelRoute),
        backend: Backend,
    },
    /// Nothing can serve now, but a deployment frees up within the wait
    /// allowed: sleep this long, then ask again.
    Wait(Duration),
    /// Nothing more can be tried: answer [`Failover::give_up`].
    GiveUp,
}

/// A request's failover state.
#[derive(Debug)]
pub struct Failover<'r> {
    policy: Policy,
    routes: Vec<(usize, &'r ModelRoute)>,
    /// The model's `context_fallbacks` the tenant may use, until used.
    context_routes: Option<Vec<(usize, &'r ModelRoute)>>,
    /// Routes that said the prompt is too long for them (never asked
    /// again).
    too_long: Vec<usize>,
    attempts: u32,
    /// The route being tried, as a position in `routes`.
    position: usize,
    tried: Tried,
    /// The deployment of the last attempt, and its same-deployment retries.
    current: Option<(Backend, u32)>,
    /// The last attempt's failure, the answer when nothing more can be
    /// tried (boxed: most requests have none, and every request holds its
    /// failover while it streams).
    last_error: Option<Box<ApiError>>,
    /// The soonest a deployment that could not be chosen frees up.
    soonest: Option<Duration>,
    /// The soonest the client might try again, when nothing could be
    /// chosen (see [`NoBackend::retry_after`]).
    retry_after: Option<Duration>,
    waited: Duration,
}

impl<'r> Failover<'r> {
    /// A request over `routes` (the requested route first, then its
    /// fallbacks), with `context_routes` for a prompt too long.
    pub fn new(
        policy: Policy,
        routes: Vec<(usize, &'r ModelRoute)>,
        context_routes: Vec<(usize, &'r ModelRoute)>,
    ) -> Self {
        Failover {
            policy,
            routes,
            context_routes: Some(context_routes),
            too_long: Vec::new(),
            attempts: 0,
            position: 0,
            tried: Tried::default(),
            current: None,
            last_error: None,
            soonest: None,
            retry_after: None,
            waited: Duration::ZERO,
        }
    }

    /// Only deployments of `provider` (when given) may be tried.
    pub fn only_provider(mut self, provider: Option<usize>) -> Self {
        self.tried.only = provider;
        self
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether a prompt too long for the current route could still move to
    /// a context fallback (another route, not known to be too small).
    pub fn may_change_context(&self) -> bool {
        let current = self.routes.get(self.position).map(|(index, _)| *index);
        self.context_routes.as_ref().is_some_and(|routes| {
            routes
                .iter()
                .any(|(index, _)| Some(*index) != current && !self.too_long.contains(index))
        })
    }

    /// Whether another attempt may be made.
    pub fn attempts_left(&self) -> bool {
        (self.attempts as usize) < self.policy.max_attempts
    }

    /// The next deployment to try. `choose` offers a backend of a route
    /// (its index in the config, the route, what this request ruled out).
    pub fn next(
        &mut self,
        mut choose: impl FnMut(usize, &ModelRoute, &Tried) -> Result<Backend, NoBackend>,
    ) -> Next<'r> {
        if !self.attempts_left() {
            return Next::GiveUp;
        }
        while self.position < self.routes.len() {
            let (index, route) = self.routes[self.position];
            match choose(index, route, &self.tried) {
                Ok(backend) => {
                    self.attempts += 1;
                    self.current = Some((backend.clone(), 0));
                    return Next::Try {
                        route: (index, route),
                        backend,
                    };
                }
                Err(none) => {
                    self.soonest = sooner(self.soonest, none.frees_in);
                    self.retry_after = sooner(self.retry_after, none.retry_after);
                    self.position += 1;
                }
            }
        }
        // Nothing eligible now: wait for the soonest deployment when that
        // is within the request's allowance, then walk the routes again.
        // (Backends failing their health checks are not waited for: that
        // is an outage, not a rest, and the client is better told at once.)
        match self.soonest {
            Some(wait) if self.waited + wait <= self.policy.max_retry_wait => {
                self.soonest = None;
                self.retry_after = None;
                self.waited += wait;
                self.position = 0;
                Next::Wait(wait)
            }
            _ => Next::GiveUp,
        }
    }

    /// The same deployment was granted again: one more attempt on it.
    pub fn retrying(&mut self, backend: &Backend) {
        self.attempts += 1;
        if let Some((current, retries)) = &mut self.current {
            *current = backend.clone();
            *retries += 1;
        }
    }

    /// The same deployment could not be granted again: it is out for this
    /// request, and the next one is tried.
    pub fn retry_refused(&mut self) {
        if let Some((backend, _)) = self.current.take() {
            self.tried.deployment(&backend);
        }
    }

    /// Takes how an attempt ended; what to do next.
    pub fn after(&mut self, attempted: Attempted) -> Step {
        match attempted {
            Attempted::Answered | Attempted::ClientGone => Step::Done(Ok(())),
            Attempted::Final(error) => Step::Done(Err(error)),
            Attempted::RateLimited(error) => {
                self.last_error = Some(Box::new(error));
                self.current = None;
                Step::TryNext
            }
            Attempted::StreamBroken(error) => {
                self.last_error = Some(Box::new(error));
                if let Some((backend, _)) = self.current.take() {
                    self.tried.deployment(&backend);
                }
                Step::TryNext
            }
            Attempted::ContextTooLong(error) => {
                // Never the same prompt to a route that said it is too long.
                if let Some((index, _)) = self.routes.get(self.position) {
                    self.too_long.push(*index);
                }
                let routes: Vec<_> = self
                    .context_routes
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(index, _)| !self.too_long.contains(index))
                    .collect();
                if routes.is_empty() {
                    return Step::Done(Err(error));
                }
                self.last_error = Some(Box::new(error));
                self.current = None;
                self.routes = routes;
                self.position = 0;
                Step::TryNext
            }
            Attempted::Retryable {
                error,
                domain,
                transient,
            } => {
                self.last_error = Some(Box::new(error));
                let Some((backend, retries)) = self.current.take() else {
                    return Step::TryNext;
                };
                if transient
                    && retries < self.policy.same_deployment_retries
                    && self.attempts_left()
                {
                    self.current = Some((backend, retries));
                    return Step::RetrySame(self.policy.same_deployment_delay);
                }
                match domain {
                    Domain::Transport => self.tried.address(&backend),
                    Domain::Deployment => self.tried.deployment(&backend),
                }
                Step::TryNext
            }
        }
    }

    /// The answer once nothing more can be tried: the last failure, or 503
    /// `no_healthy_upstream` for the requested model when no attempt could
    /// be made.
    pub fn give_up(self, model: &str) -> ApiError {
        if let Some(error) = self.last_error {
            return *error;
        }
        let mut error = ApiError::no_healthy_upstream(model);
        error.retry_after_ms = Some(
            self.retry_after
                .map_or(1000, |d| d.as_millis().max(1) as u64),
        );
        error
    }
}

/// The sooner of two moments, either perhaps unknown.
fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Strategy, Target};
    use crate::upstream::breaker::Permit;
    use crate::upstream::health::Permits;
    use std::net::SocketAddr;

    fn route(name: &str) -> ModelRoute {
        ModelRoute {
            name: name.into(),
            strategy: Strategy::RoundRobin,
            targets: vec![Target {
                provider: 0,
                model: name.into(),
                price: None,
            }],
            fallbacks: Vec::new(),
            context_fallbacks: Vec::new(),
            resume_streams: true,
            cache: Default::default(),
        }
    }

    fn backend(route: usize, slot: usize, port: u16) -> Backend {
        Backend {
            route,
            target: 0,
            provider: 0,
            slot,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            permits: Permits {
                transport: Permit::Normal,
                deployment: Permit::Normal,
            },
        }
    }

    /// A chooser over fixed deployments per route: (slot, port) pairs, each
    /// offered unless the request ruled it out; `waits` says when the route
    /// frees up when it has none.
    fn chooser(
        deployments: Vec<Vec<(usize, u16)>>,
        waits: Option<Duration>,
    ) -> impl FnMut(usize, &ModelRoute, &Tried) -> Result<Backend, NoBackend> {
        move |index, _, tried| {
            deployments[index]
                .iter()
                .map(|&(slot, port)| backend(index, slot, port))
                .find(|b| !tried.skips(b.provider, b.slot, b.addr))
                .ok_or(NoBackend {
                    frees_in: waits,
                    retry_after: waits,
                })
        }
    }

    fn failed(error: ApiError) -> Attempted {
        Attempted::deployment(error)
    }

    fn policy(max_attempts: usize) -> Policy {
        Policy {
            max_attempts,
            ..Policy::default()
        }
    }

    /// Walks the request, failing every attempt with `fail`; the (route
    /// position, slot) pairs tried.
    fn walk(
        failover: &mut Failover<'_>,
        choose: &mut impl FnMut(usize, &ModelRoute, &Tried) -> Result<Backend, NoBackend>,
        mut fail: impl FnMut() -> Attempted,
    ) -> Vec<(usize, usize)> {
        let mut seen = Vec::new();
        loop {
            match failover.next(&mut *choose) {
                Next::Try { route, backend } => {
                    seen.push((route.0, backend.slot));
                    loop {
                        match failover.after(fail()) {
                            Step::TryNext => break,
                            Step::RetrySame(_) => {
                                seen.push((route.0, backend.slot));
                                failover.retrying(&backend);
                            }
                            Step::Done(_) => return seen,
                        }
                    }
                }
                Next::Wait(_) => {}
                Next::GiveUp => return seen,
            }
        }
    }

    #[test]
    fn a_fallback_on_the_same_provider_and_backend_is_tried() {
        // Two models served by one provider at one address.
        let (a, b) = (route("a"), route("b"));
        let mut choose = chooser(vec![vec![(0, 1)], vec![(1, 1)]], None);
        let mut failover = Failover::new(policy(5), vec![(0, &a), (1, &b)], vec![]);
        let seen = walk(&mut failover, &mut choose, || {
            failed(ApiError::upstream_timeout("slow"))
        });
        assert_eq!(seen, [(0, 0), (1, 1)]);
        assert_eq!(failover.give_up("a").code, "upstream_timeout");
    }

    #[test]
    fn a_transport_failure_rules_out_the_address_for_every_deployment() {
        let (a, b) = (route("a"), route("b"));
        let mut choose = chooser(vec![vec![(0, 1)], vec![(1, 1), (1, 2)]], None);
        let mut failover = Failover::new(policy(5), vec![(0, &a), (1, &b)], vec![]);
        let seen = walk(&mut failover, &mut choose, || Attempted::Retryable {
            error: ApiError::upstream_error("refused"),
            domain: Domain::Transport,
            transient: false,
        });
        assert_eq!(
            seen,
            [(0, 0), (1, 1)],
            "b on port 1 is skipped, port 2 tried"
        );
    }

    #[test]
    fn a_transient_failure_is_retried_once_on_the_same_deployment() {
        let a = route("a");
        let mut choose = chooser(vec![vec![(0, 1), (0, 2)]], None);
        let mut failover = Failover::new(policy(5), vec![(0, &a)], vec![]);
        let seen = walk(&mut failover, &mut choose, || Attempted::Retryable {
            error: ApiError::upstream_error("503"),
            domain: Domain::Deployment,
            transient: true,
        });
        assert_eq!(
            seen,
            [(0, 0), (0, 0), (0, 0), (0, 0)],
            "twice on each of two backends"
        );
        assert_eq!(failover.attempts(), 4);
    }

    #[test]
    fn stops_at_max_attempts_retries_included() {
        let a = route("a");
        let mut choose = chooser(vec![vec![(0, 1), (0, 2), (0, 3)]], None);
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        let seen = walk(&mut failover, &mut choose, || Attempted::Retryable {
            error: ApiError::upstream_error("500"),
            domain: Domain::Deployment,
            transient: true,
        });
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn a_rate_limited_deployment_is_waited_for_within_the_allowance() {
        let a = route("a");
        let mut calls = 0;
        // Nothing eligible at first (cooling down for 500 ms), then free.
        let mut choose = |index: usize, _: &ModelRoute, _: &Tried| {
            calls += 1;
            if calls == 1 {
                Err(NoBackend {
                    frees_in: Some(Duration::from_millis(500)),
                    retry_after: Some(Duration::from_millis(500)),
                })
            } else {
                Ok(backend(index, 0, 1))
            }
        };
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        assert!(
            matches!(failover.next(&mut choose), Next::Wait(d) if d == Duration::from_millis(500))
        );
        assert!(matches!(failover.next(&mut choose), Next::Try { .. }));
        // Past the allowance, it gives up at once.
        let mut never = chooser(vec![vec![]], Some(Duration::from_secs(5)));
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        assert!(matches!(failover.next(&mut never), Next::GiveUp));
        let answer = failover.give_up("a");
        assert_eq!((answer.status, answer.retry_after_ms), (503, Some(5000)));
    }

    #[test]
    fn a_429_does_not_rule_the_deployment_out() {
        let a = route("a");
        let mut choose = chooser(vec![vec![(0, 1)]], None);
        let mut failover = Failover::new(policy(2), vec![(0, &a)], vec![]);
        let seen = walk(&mut failover, &mut choose, || {
            Attempted::RateLimited(ApiError::provider_rate_limited("p"))
        });
        assert_eq!(
            seen,
            [(0, 0), (0, 0)],
            "its cool-down decides, not the request"
        );
        assert_eq!(failover.give_up("a").code, "upstream_rate_limited");
    }

    #[test]
    fn a_prompt_too_long_moves_to_the_context_fallbacks_once() {
        let (a, fallback, big) = (route("a"), route("fb"), route("big"));
        let mut choose = chooser(vec![vec![(0, 1)], vec![(1, 1)], vec![(2, 1)]], None);
        let mut failover = Failover::new(policy(5), vec![(0, &a), (1, &fallback)], vec![(2, &big)]);
        let seen = walk(&mut failover, &mut choose, || {
            Attempted::ContextTooLong(ApiError::invalid_field("messages", "too long"))
        });
        assert_eq!(seen, [(0, 0), (2, 2)], "the ordinary fallback is skipped");
    }

    #[test]
    fn a_route_that_said_too_long_is_never_asked_again() {
        // The fallback said too long, and is also the context fallback.
        let (a, big) = (route("a"), route("big"));
        let mut choose = chooser(vec![vec![(0, 1)], vec![(1, 1)]], None);
        let mut failover = Failover::new(policy(5), vec![(0, &a), (1, &big)], vec![(1, &big)]);
        assert!(matches!(failover.next(&mut choose), Next::Try { .. }));
        assert!(failover.may_change_context());
        assert_eq!(
            failover.after(failed(ApiError::upstream_error("504"))),
            Step::TryNext
        );
        assert!(matches!(
            failover.next(&mut choose),
            Next::Try { route: (1, _), .. }
        ));
        assert!(
            !failover.may_change_context(),
            "its only context fallback is itself"
        );
        match failover.after(Attempted::ContextTooLong(
            ApiError::context_length_exceeded("long"),
        )) {
            Step::Done(Err(e)) => assert_eq!(e.code, "context_length_exceeded"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_broken_stream_moves_on_and_rules_its_deployment_out() {
        let a = route("a");
        let mut choose = chooser(vec![vec![(0, 1), (1, 1)]], None);
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        let seen = walk(&mut failover, &mut choose, || {
            Attempted::StreamBroken(ApiError::upstream_error("cut"))
        });
        assert_eq!(seen, [(0, 0), (0, 1)], "never the same deployment twice");
    }

    #[test]
    fn an_answered_or_final_attempt_ends_the_request() {
        let a = route("a");
        let mut choose = chooser(vec![vec![(0, 1), (0, 2)]], None);
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        assert!(matches!(failover.next(&mut choose), Next::Try { .. }));
        assert_eq!(failover.after(Attempted::Answered), Step::Done(Ok(())));
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        assert!(matches!(failover.next(&mut choose), Next::Try { .. }));
        match failover.after(Attempted::Final(ApiError::invalid_field("model", "no"))) {
            Step::Done(Err(e)) => assert_eq!(e.status, 400),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backends_failing_their_health_checks_are_not_waited_for() {
        // No moment any frees up: only the next health check, a hint for
        // the client, who is told at once.
        let a = route("a");
        let mut choose = |_: usize, _: &ModelRoute, _: &Tried| {
            Err(NoBackend {
                frees_in: None,
                retry_after: Some(Duration::from_secs(1)),
            })
        };
        let mut failover = Failover::new(policy(3), vec![(0, &a)], vec![]);
        assert!(matches!(failover.next(&mut choose), Next::GiveUp));
        let answer = failover.give_up("a");
        assert_eq!((answer.status, answer.retry_after_ms), (503, Some(1000)));
    }

    #[test]
    fn with_nothing_eligible_answers_503_with_the_soonest_retry() {
        let (a, b) = (route("a"), route("b"));
        let mut choose = chooser(vec![vec![], vec![]], Some(Duration::from_millis(2500)));
        let mut failover = Failover::new(policy(3), vec![(0, &a), (1, &b)], vec![]);
        assert!(matches!(failover.next(&mut choose), Next::GiveUp));
        assert_eq!(failover.attempts(), 0);
        let answer = failover.give_up("a");
        assert_eq!((answer.status, answer.code), (503, "no_healthy_upstream"));
        assert_eq!(answer.retry_after_ms, Some(2500));
    }
}
