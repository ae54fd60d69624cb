//! Rate limits: requests per second per token, and per address for
//! requests without a valid token, answered 429 with `Retry-After` beyond
//! them (GCRA buckets from `governor`). The layer verifies the bearer token
//! once and hands its claims on to the routes.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use grabflow_http::auth::{Secret, VerifiedBearer};
use grabflow_http::ApiError;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Who a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A valid token (by a hash of it).
    Token(u64),
    /// An address sending no valid token.
    Address(IpAddr),
}

/// The limits, shared by every request of a router.
#[derive(Clone)]
pub struct RateLimits(Arc<Inner>);

struct Inner {
    tokens: Option<DefaultKeyedRateLimiter<Key>>,
    addresses: Option<DefaultKeyedRateLimiter<Key>>,
    secret: Secret,
    hasher: RandomState,
    seen: AtomicU64,
}

impl RateLimits {
    /// `per_token` requests a second for each valid token, `per_address`
    /// for each address sending none (0: no limit); a second's worth may
    /// come at once.
    pub fn new(per_token: u32, per_address: u32, secret: Secret) -> RateLimits {
        let limiter = |n: u32| NonZeroU32::new(n).map(|n| RateLimiter::keyed(Quota::per_second(n)));
        RateLimits(Arc::new(Inner {
            tokens: limiter(per_token),
            addresses: limiter(per_address),
            secret,
            hasher: RandomState::new(),
            seen: AtomicU64::new(0),
        }))
    }
}

/// The bearer token of `req`: the `Authorization` header (`true`), else the
/// `access_token` query parameter of the rider streams (`false`).
fn token(req: &Request) -> Option<(&str, bool)> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match header {
        Some(t) => Some((t.trim(), true)),
        None => req
            .uri()
            .query()?
            .split('&')
            .find_map(|p| p.strip_prefix("access_token="))
            .map(|t| (t.trim(), false)),
    }
}

/// Middleware: counts the request against its token or address, and
/// answers 429 with `Retry-After` beyond the limit.
pub async fn limit(State(limits): State<RateLimits>, mut req: Request, next: Next) -> Response {
    let l = &*limits.0;
    let valid = token(&req).and_then(|(t, bearer)| {
        let claims = l.secret.verify(t)?;
        Some((l.hasher.hash_one(t), bearer.then_some(claims)))
    });
    let (key, limiter) = match valid {
        Some((hash, bearer)) => {
            // The routes take the claims from here instead of verifying again.
            if let Some(claims) = bearer {
                req.extensions_mut().insert(VerifiedBearer(claims));
            }
            (Key::Token(hash), &l.tokens)
        }
        None => match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => (Key::Address(addr.ip()), &l.addresses),
            None => return next.run(req).await,
        },
    };
    if let Some(limiter) = limiter {
        // Buckets of keys not seen for a while are dropped now and then.
        if l.seen.fetch_add(1, Ordering::Relaxed) % 65_536 == 65_535 {
            limiter.retain_recent();
        }
        if let Err(not_until) = limiter.check_key(&key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut answer = ApiError::too_many_requests(format!(
                "over the rate limit of this {}; retry after {secs} s",
                if matches!(key, Key::Token(_)) {
                    "token"
                } else {
                    "address"
                }
            ))
            .into_response();
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return answer;
        }
    }
    next.run(req).await
}
