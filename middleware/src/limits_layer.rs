//! The rate-limit layer: counts each request against the live policy's
//! [`RateLimits`](crate::limits::RateLimits) and refuses one over its
//! destination's rate (`rate_limited`, with when to retry: a 429 and
//! `Retry-After` over HTTP). It sits just inside the loop guard, so a
//! request is counted before anything else is done for it, and its
//! refusals are logged like every other.
//!
//! With no limit set it reads one atomic flag
//! ([`PolicyHandle::limits_rates`]) and passes the request on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::future::ResponseFuture;
use crate::limits::Rate;
use crate::policy::PolicyHandle;
use crate::request::RequestInfo;

/// Adds [`RateLimit`]. Clones share the buckets.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    policy: PolicyHandle,
    buckets: Arc<Mutex<Buckets>>,
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
            let live: Vec<(String, Rate)> = self.policy.load().rate_limits().entries().collect();
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

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.layer.policy.limits_rates() {
            return ResponseFuture::inner(self.inner.call(request));
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(error) => return ResponseFuture::refused(error),
        };
        // A DNS question opens nothing: what follows it is counted.
        if info.protocol.is_lookup() {
            return ResponseFuture::inner(self.inner.call(request));
        }
        let found = self.layer.policy.load().rate_limits().find(&info.target);
        let Some((pattern, rate)) = found else {
            return ResponseFuture::inner(self.inner.call(request));
        };
        match self.layer.take(pattern.clone(), rate, Instant::now()) {
            Ok(()) => ResponseFuture::inner(self.inner.call(request)),
            Err(wait) => {
                // Whole seconds, rounded up: never "retry after 0".
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let retry = Duration::from_secs(seconds.max(1));
                let blocked = Blocked::new(
                    Reason::RateLimited,
                    Source::Limits,
                    info.target,
                    info.protocol,
                    &info.method,
                )
                .with_rule(Some(format!("[[rate_limits]] {pattern}: {rate}")))
                .with_status(StatusCode::TOO_MANY_REQUESTS, Some(retry));
                ResponseFuture::refused(blocked)
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
