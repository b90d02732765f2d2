//! Access tokens of app targets (DingTalk work notifications, WeCom and Lark app messages):
//! cached per credential, refreshed before they expire, and fetched once however many sends
//! need one at the same moment (single flight), since token endpoints have tight quotas of
//! their own.
//!
//! Each key has a slot: a std mutex over the cached token and the outcome of the last fetch,
//! held only for a few statements and never across an await, and a tokio mutex held by the
//! one caller fetching while the others wait their turn.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::http::{self, ReadError};
use crate::platform::outbound::{self, Answer, Class, IssuedToken, TokenRequest};

/// Longest lifetime taken at the platform's word: a token claiming more is refetched after
/// this anyway (and an absurd `expires_in` cannot overflow the clock).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Tokens per credential. Cheap to share behind an `Arc`; keys are opaque to it (and never
/// shown, since a caller may well build them from the secret).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// Held by the caller fetching a token for this key; the others queue on it.
    flight: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    /// Fetches finished so far: a caller that finds it moved while it waited for the flight
    /// knows a fetch ended in the meantime, and takes its outcome instead of fetching again.
    fetches: u64,
    /// Why the last fetch failed, when it did and no valid token remained.
    failure: Option<Answer>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
    expires_at: Instant,
}

impl State {
    /// The token, when it is not yet due for a refresh.
    fn fresh(&self, now: Instant) -> Option<String> {
        self.cached
            .as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// The token, when it has not expired (it may be due for a refresh).
    fn valid(&self, now: Instant) -> Option<String> {
        self.cached
            .as_ref()
            .filter(|c| now < c.expires_at)
            .map(|c| c.token.clone())
    }
}

impl TokenCache {
    /// A valid token for `key` (one credential), fetching with `fetch` when none is cached or
    /// the cached one is within its refresh margin of expiry. Concurrent callers for one key
    /// share a single fetch (single flight); callers that waited on a failed fetch get that
    /// failure, not a fetch each. Keys do not wait for each other.
    ///
    /// [U] When a refresh fails while the cached token has not expired yet, that token is
    /// returned: it still works, and the next call tries the refresh again.
    pub async fn get<F, Fut>(&self, key: &str, fetch: F) -> Result<String, Answer>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IssuedToken, Answer>>,
    {
        let slot = self.slot(key);
        let seen = {
            let state = lock(&slot.state);
            if let Some(token) = state.fresh(Instant::now()) {
                return Ok(token);
            }
            state.fetches
        };
        // If the caller holding the flight is cancelled, its guard is dropped without a
        // fetch being counted, and the next in line fetches.
        let _flight = slot.flight.lock().await;
        {
            let state = lock(&slot.state);
            let now = Instant::now();
            if let Some(token) = state.fresh(now) {
                return Ok(token);
            }
            if state.fetches != seen {
                if let Some(failure) = &state.failure {
                    return Err(failure.clone());
                }
                if let Some(token) = state.valid(now) {
                    return Ok(token);
                }
                // That fetch's token was invalidated already: fetch another.
            }
        }
        // Counted from before the request: the platform's clock started no later.
        let started = Instant::now();
        let outcome = fetch().await;
        let mut state = lock(&slot.state);
        state.fetches += 1;
        match outcome {
            Ok(issued) => {
                let lifetime = issued.expires_in.min(MAX_LIFETIME);
                let expires_at = started + lifetime;
                state.cached = Some(Cached {
                    token: issued.token.clone(),
                    refresh_at: expires_at - refresh_margin(lifetime),
                    expires_at,
                });
                state.failure = None;
                Ok(issued.token)
            }
            Err(answer) => {
                if let Some(token) = state.valid(Instant::now()) {
                    state.failure = None;
                    return Ok(token);
                }
                state.cached = None;
                state.failure = Some(answer.clone());
                Err(answer)
            }
        }
    }

    /// Forgets `token` for `key` (the platform called it expired/invalid), unless a newer one
    /// replaced it already.
    pub fn invalidate(&self, key: &str, token: &str) {
        let Some(slot) = lock(&self.slots).get(key).cloned() else {
            return;
        };
        let mut state = lock(&slot.state);
        if state.cached.as_ref().is_some_and(|c| c.token == token) {
            state.cached = None;
        }
    }

    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        slots.entry(key.to_owned()).or_default().clone()
    }
}

/// Keys may hold secrets and values are tokens: only the size is shown.
impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("keys", &lock(&self.slots).len())
            .finish()
    }
}

/// No code here panics while holding a lock, and the data is consistent after every
/// statement, so a poisoned lock is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Refresh this long before expiry: min(5 min, lifetime / 10), so that a token is never used
/// in its last minutes (clocks differ, requests take time) and a short-lived one is still
/// used for most of its life.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(5 * 60))
}

/// A platform's reading of its token endpoint's answer.
/// Performs a TokenRequest with reqwest and parses it with `parse`; transport errors and
/// timeouts (the client's) are Transient answers (never print the URL: it holds the secret).
pub async fn fetch(
    http: &reqwest::Client,
    req: &TokenRequest,
    parse: impl Fn(u16, &[u8]) -> Result<IssuedToken, Answer>,
) -> Result<IssuedToken, Answer> {
    let request = match &req.json {
        None => http.get(&req.url),
        Some(body) => http.post(&req.url).json(body),
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status().as_u16();
    let body = match http::read_capped(response).await {
        Ok(body) => body,
        Err(ReadError::Transport(e)) => return Err(transport(e)),
        Err(e @ ReadError::TooLarge) => {
            return Err(Answer {
                class: Class::Transient,
                code: None,
                status,
                detail: format!("token {e}"),
            })
        }
    };
    parse(status, &body)
}

/// A token request that got no answer.
fn transport(e: reqwest::Error) -> Answer {
    let mut answer = outbound::transport_answer(e, 0);
    answer.detail.insert_str(0, "token request ");
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn issued(token: &str, secs: u64) -> Result<IssuedToken, Answer> {
        Ok(IssuedToken {
            token: token.into(),
            expires_in: Duration::from_secs(secs),
        })
    }

    fn refused() -> Answer {
        Answer {
            class: Class::Permanent,
            code: Some(40001),
            status: 200,
            detail: r#"{"errcode":40001}"#.into(),
        }
    }

    /// A fetch that counts its calls and answers `outcome` after `delay`.
    async fn counted(
        calls: &AtomicUsize,
        delay: Duration,
        outcome: Result<IssuedToken, Answer>,
    ) -> Result<IssuedToken, Answer> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        outcome
    }

    #[test]
    fn margins() {
        assert_eq!(
            refresh_margin(Duration::from_secs(7200)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn get_is_send_and_debug_shows_nothing() {
        fn is_send<T: Send>(_: &T) {}
        let cache = TokenCache::default();
        let f = cache.get("corp:s3cret", || async { issued("t-1", 60) });
        is_send(&f);
        assert_eq!(f.await.unwrap(), "t-1");
        assert_eq!(format!("{cache:?}"), "TokenCache { keys: 1 }");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_gets_fetch_once() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get("app", || {
                            counted(&calls, Duration::from_millis(50), issued("t1", 7200))
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            let token = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(token.unwrap(), "t1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reused_until_the_margin_then_refetched() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        // 100 s lifetime: refreshed from 90 s on.
        let get = |token: &'static str| {
            cache.get("app", || {
                counted(&calls, Duration::ZERO, issued(token, 100))
            })
        };
        assert_eq!(get("t1").await.unwrap(), "t1");
        tokio::time::advance(Duration::from_secs(89)).await;
        assert_eq!(get("t2").await.unwrap(), "t1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(get("t2").await.unwrap(), "t2");
        assert_eq!(get("t3").await.unwrap(), "t2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidating_a_stale_token_keeps_the_newer_one() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        let get = |token: &'static str| {
            cache.get("app", || {
                counted(&calls, Duration::ZERO, issued(token, 7200))
            })
        };
        assert_eq!(get("t1").await.unwrap(), "t1");
        cache.invalidate("app", "t1");
        assert_eq!(get("t2").await.unwrap(), "t2");
        // A send that used t1 reports it late.
        cache.invalidate("app", "t1");
        cache.invalidate("other", "t2");
        assert_eq!(get("t3").await.unwrap(), "t2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_share_a_failure_and_the_next_call_fetches_again() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get("app", || {
                            counted(&calls, Duration::from_secs(1), Err(refused()))
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Err(refused()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let again = cache
            .get("app", || {
                counted(&calls, Duration::ZERO, issued("t1", 7200))
            })
            .await;
        assert_eq!(again.unwrap(), "t1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_falls_back_to_a_still_valid_token() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        let ok = cache
            .get("app", || counted(&calls, Duration::ZERO, issued("t1", 100)))
            .await;
        assert_eq!(ok.unwrap(), "t1");
        tokio::time::advance(Duration::from_secs(95)).await;
        let fail = || counted(&calls, Duration::ZERO, Err(refused()));
        assert_eq!(cache.get("app", fail).await.unwrap(), "t1");
        // Each call in the margin tries again.
        assert_eq!(cache.get("app", fail).await.unwrap(), "t1");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(cache.get("app", fail).await, Err(refused()));
        // An invalidated token is no fallback.
        let ok = cache
            .get("app", || counted(&calls, Duration::ZERO, issued("t2", 100)))
            .await;
        assert_eq!(ok.unwrap(), "t2");
        tokio::time::advance(Duration::from_secs(95)).await;
        cache.invalidate("app", "t2");
        assert_eq!(cache.get("app", fail).await, Err(refused()));
    }

    #[tokio::test]
    async fn keys_fetch_independently() {
        let cache = Arc::new(TokenCache::default());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started, fetching) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get("a", || async move {
                        let _ = started.send(());
                        let _ = released.await;
                        issued("ta", 7200)
                    })
                    .await
            })
        };
        // Key a's fetch is under way, and hangs.
        fetching.await.unwrap();
        let calls = AtomicUsize::new(0);
        let b = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get("b", || counted(&calls, Duration::ZERO, issued("tb", 7200))),
        )
        .await
        .expect("key b waited for key a");
        assert_eq!(b.unwrap(), "tb");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        release.send(()).unwrap();
        let a = tokio::time::timeout(Duration::from_secs(5), slow)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.unwrap(), "ta");
    }

    #[tokio::test]
    async fn a_cancelled_fetch_lets_the_next_caller_fetch() {
        let cache = Arc::new(TokenCache::default());
        let hung = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get("app", || {
                        std::future::pending::<Result<IssuedToken, Answer>>()
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get("app", || async { issued("t1", 60) }).await })
        };
        tokio::task::yield_now().await;
        hung.abort();
        let token = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(token.unwrap(), "t1");
    }

    /// A one-route server answering `status` and `body`, recording what it was asked.
    async fn server(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<Mutex<Vec<(String, String, String)>>>) {
        use warp::Filter;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::body::bytes())
            .map(
                move |m: warp::http::Method,
                      p: warp::path::FullPath,
                      q: String,
                      b: bytes::Bytes| {
                    lock(&log).push((
                        format!("{m} {}", p.as_str()),
                        q,
                        String::from_utf8_lossy(&b).into_owned(),
                    ));
                    warp::reply::with_status(
                        body,
                        warp::http::StatusCode::from_u16(status).unwrap(),
                    )
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        (format!("http://{addr}"), seen)
    }

    #[tokio::test]
    async fn fetches_by_get_and_post() {
        use crate::platform::{lark, wecom};
        let http = reqwest::Client::new();
        let (base, seen) = server(
            200,
            r#"{"errcode":0,"access_token":"tok","expires_in":7200}"#,
        )
        .await;
        let req = wecom::app::token_request(&base, "ww1", "s3cret");
        let t = fetch(&http, &req, wecom::app::parse_token).await.unwrap();
        assert_eq!(t.token, "tok");
        assert_eq!(
            lock(&seen)[0],
            (
                "GET /cgi-bin/gettoken".into(),
                "corpid=ww1&corpsecret=s3cret".into(),
                String::new()
            )
        );

        let (base, seen) = server(400, r#"{"code":10014,"msg":"app secret invalid"}"#).await;
        let req = lark::app::token_request(&base, "cli_1", "s3cret");
        let a = fetch(&http, &req, lark::app::parse_token)
            .await
            .unwrap_err();
        assert_eq!(
            (a.class, a.code, a.status),
            (Class::Permanent, Some(10014), 400)
        );
        let (line, _, body) = lock(&seen)[0].clone();
        assert_eq!(line, "POST /open-apis/auth/v3/tenant_access_token/internal");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["app_secret"], "s3cret");
    }

    #[tokio::test]
    async fn transport_errors_are_transient_and_hide_the_url() {
        use crate::platform::dingtalk;
        // A port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let req = dingtalk::work::token_request(&format!("http://127.0.0.1:{port}"), "k", "s3cret");
        let a = fetch(&reqwest::Client::new(), &req, dingtalk::work::parse_token)
            .await
            .unwrap_err();
        assert_eq!((a.class, a.status, a.code), (Class::Transient, 0, None));
        assert!(
            !a.detail.contains("s3cret") && !a.detail.contains("gettoken"),
            "{}",
            a.detail
        );

        let (base, _) = server(502, "<html>bad gateway</html>").await;
        let req = dingtalk::work::token_request(&base, "k", "s3cret");
        let a = fetch(&reqwest::Client::new(), &req, dingtalk::work::parse_token)
            .await
            .unwrap_err();
        assert_eq!((a.class, a.status), (Class::Transient, 502));
    }
}
