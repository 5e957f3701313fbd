//! The rate-limit layer: counts each request against the live policy's
//! [`RateLimits`](crate::limits::RateLimits) and refuses one over its
//! destination's rate (`rate_limited`, with when to retry: a 429 and
//! `Retry-After` over HTTP) or past its cap on what is open at once
//! (`concurrency_limited`). A place under a cap rides on the response as
//! [`HeldWhileOpen`], for the transport to keep while what it opens stays
//! open. It sits just inside the loop guard, so a
//! request is counted before anything else is done for it, and its
//! refusals are logged like every other.
//!
//! With no limit set it reads one atomic flag
//! ([`PolicyHandle::limits_rates`]) and passes the request on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::future::MarkedResponse;
use crate::limits::Rate;
use crate::policy::PolicyHandle;
use crate::request::RequestInfo;

/// Adds [`RateLimit`]. Clones share the buckets and the counts.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    policy: PolicyHandle,
    buckets: Arc<Mutex<Buckets>>,
    open: Arc<Mutex<Counts>>,
}

/// How many places are taken, by pattern and cap.
type Counts = HashMap<(String, u32), Arc<AtomicUsize>>;

/// A place under a concurrency cap, on the response: the transport keeps
/// it for as long as the tunnel or upgraded connection the response opens
/// stays open, and drops it with the response otherwise (a request's
/// place is given back when its response head comes back).
#[derive(Debug, Clone)]
pub struct HeldWhileOpen(#[allow(dead_code)] Arc<Place>);

/// One place taken; given back when dropped.
#[derive(Debug)]
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The token buckets, by pattern and rate (a reload that changes a rate
/// starts its bucket afresh).
type Buckets = HashMap<(String, u64, u32), Bucket>;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimitLayer {
    /// Reads the limits from `policy` per request.
    pub fn new(policy: PolicyHandle) -> RateLimitLayer {
        RateLimitLayer {
            policy,
            buckets: Arc::default(),
            open: Arc::default(),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// Refuses requests over their destination's rate; see the [module
/// docs](self).
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl RateLimitLayer {
    /// Takes one token from the bucket of `pattern` at `rate`, or says how
    /// long until one is there.
    fn take(&self, pattern: String, rate: Rate, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded by the patterns of the policies loaded: forget buckets
        // of limits a reload removed once there are many.
        if buckets.len() > 1024 {
            let live: Vec<(String, Rate)> = self
                .policy
                .load()
                .rate_limits()
                .entries()
                .filter_map(|(pattern, limit)| Some((pattern, limit.rate()?)))
                .collect();
            buckets.retain(|(pattern, per_second, burst), _| {
                live.iter().any(|(p, r)| {
                    p == pattern && r.per_second().to_bits() == *per_second && r.burst() == *burst
                })
            });
        }
        let burst = f64::from(rate.burst());
        let bucket = buckets
            .entry((pattern, rate.per_second().to_bits(), rate.burst()))
            .or_insert(Bucket {
                tokens: burst,
                at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second()).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate.per_second();
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }
}

impl RateLimitLayer {
    /// Takes a place under the cap of `pattern`, or `None` when all are
    /// taken.
    fn place(&self, pattern: &str, cap: u32) -> Option<Place> {
        let count = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            open.entry((pattern.to_owned(), cap)).or_default().clone()
        };
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < cap).then_some(now + 1)
            })
            .ok()
            .map(|_| Place(count))
    }
}

impl<S, B, R> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = MarkedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.layer.policy.limits_rates() {
            return MarkedResponse::inner(self.inner.call(request));
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(error) => return MarkedResponse::refused(error),
        };
        // A DNS question opens nothing: what follows it is counted.
        if info.protocol.is_lookup() {
            return MarkedResponse::inner(self.inner.call(request));
        }
        let found = self.layer.policy.load().rate_limits().find(&info.target);
        let Some((pattern, limit)) = found else {
            return MarkedResponse::inner(self.inner.call(request));
        };
        let refused = |reason, rule: String, retry: Duration| {
            let blocked = Blocked::new(
                reason,
                Source::Limits,
                info.target.clone(),
                info.protocol,
                &info.method,
            )
            .with_rule(Some(rule))
            .with_status(StatusCode::TOO_MANY_REQUESTS, Some(retry));
            MarkedResponse::refused(blocked)
        };
        // The place first: a request refused for it spends no token.
        let place = match limit.concurrent_cap() {
            Some(cap) => match self.layer.place(&pattern, cap) {
                Some(place) => Some(place),
                None => {
                    let rule = format!("[[rate_limits]] {pattern}: {limit}");
                    return refused(Reason::ConcurrencyLimited, rule, Duration::from_secs(1));
                }
            },
            None => None,
        };
        let taken = match limit.rate() {
            Some(rate) => self.layer.take(pattern.clone(), rate, Instant::now()),
            None => Ok(()),
        };
        match taken {
            Ok(()) => {
                let future = MarkedResponse::inner(self.inner.call(request));
                match place {
                    Some(place) => future.with_extension(HeldWhileOpen(Arc::new(place))),
                    None => future,
                }
            }
            Err(wait) => {
                // Whole seconds, rounded up: never "retry after 0".
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let retry = Duration::from_secs(seconds.max(1));
                let rule = format!("[[rate_limits]] {pattern}: {limit}");
                refused(Reason::RateLimited, rule, retry)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::limits::RateLimits;
    use crate::{NetworkPolicy, Protocol, Target};
    use http::Response;
    use tower_test::mock;

    fn request(authority: &str) -> Request<()> {
        let mut request = Request::get(format!("http://{authority}/"))
            .body(())
            .unwrap();
        let target = Target::parse_authority(authority, Some(80)).unwrap();
        request.extensions_mut().insert(target);
        request.extensions_mut().insert(Protocol::Http);
        request
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate() {
        let layer = RateLimitLayer::new(PolicyHandle::default());
        let rate = Rate::new(2.0, 3).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(layer.take("a".into(), rate, start), Ok(()));
        }
        let wait = layer.take("a".into(), rate, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another pattern has its own bucket.
        assert_eq!(layer.take("b".into(), rate, start), Ok(()));
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        assert_eq!(layer.take("a".into(), rate, later), Ok(()));
        assert!(layer.take("a".into(), rate, later).is_err());
    }

    #[tokio::test]
    async fn a_place_is_held_by_the_response_and_given_back_with_it() {
        let limits = RateLimits::new()
            .limit("capped.test", crate::limits::Limit::concurrent(1).unwrap())
            .unwrap();
        let policy = PolicyHandle::new(NetworkPolicy::builder().rate_limits(limits).build());
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(RateLimitLayer::new(policy));
        handle.allow(10);
        assert!(service.poll_ready().is_ready());
        let first = service.call(request("capped.test:80"));
        let (_, send) = handle.next_request().await.unwrap();
        // In flight: the next one is refused.
        assert!(service.poll_ready().is_ready());
        let error = service.call(request("capped.test:80")).await.unwrap_err();
        let blocked = error.downcast_ref::<Blocked>().unwrap();
        assert_eq!(blocked.reason, Reason::ConcurrencyLimited);
        send.send_response(Response::new(()));
        let response = first.await.unwrap();
        assert!(response.extensions().get::<HeldWhileOpen>().is_some());
        // Still held by the response (a tunnel's transport keeps it).
        assert!(service.poll_ready().is_ready());
        assert!(service.call(request("capped.test:80")).await.is_err());
        drop(response);
        assert!(service.poll_ready().is_ready());
        let again = service.call(request("capped.test:80"));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        again.await.unwrap();
    }

    #[tokio::test]
    async fn over_the_rate_is_refused_with_when_to_retry_and_others_pass() {
        let limits = RateLimits::new()
            .limit("slow.test", Rate::new(0.001, 2).unwrap())
            .unwrap();
        let policy = PolicyHandle::new(NetworkPolicy::builder().rate_limits(limits).build());
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(RateLimitLayer::new(policy));
        handle.allow(10);
        for _ in 0..2 {
            assert!(service.poll_ready().is_ready());
            let response = service.call(request("slow.test:80"));
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(Response::new(()));
            response.await.unwrap();
        }
        assert!(service.poll_ready().is_ready());
        let error = service.call(request("slow.test:80")).await.unwrap_err();
        let blocked = error.downcast_ref::<Blocked>().unwrap();
        assert_eq!(blocked.reason, Reason::RateLimited);
        let hint = blocked.status_hint.unwrap();
        assert_eq!(hint.status, StatusCode::TOO_MANY_REQUESTS);
        // A token takes 1000 s (less what refilled while this test ran).
        let after = hint.retry_after.unwrap().as_secs();
        assert!((900..=1000).contains(&after), "{after}");
        assert!(blocked.message.contains("slow.test"), "{}", blocked.message);
        // A host no limit covers is not counted.
        assert!(service.poll_ready().is_ready());
        let response = service.call(request("fast.test:80"));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        response.await.unwrap();
    }
}
