//! A webhook receiver on a random port: records each request with its headers, body and
//! time, answers from a script, and checks signatures as a receiver would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::WAIT;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Checks `imbridge-signature` as a receiver would: HMAC-SHA256 of `t.body` with the
    /// shared secret, compared in constant time. Returns the signed time.
    pub fn verify(&self, secret: &str) -> u64 {
        let sig = self.header("imbridge-signature").expect("signed");
        let (t, v1) = sig.split_once(',').expect("t=…,v1=…");
        let t = t.strip_prefix("t=").expect("t=");
        let v1 = v1.strip_prefix("v1=").expect("v1=");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&self.body);
        mac.verify_slice(&hex::decode(v1).unwrap())
            .expect("signature verifies");
        t.parse().expect("unix seconds")
    }
}

/// An answer the receiver gives: status, `Retry-After`, body.
pub type Scripted = (u16, Option<u64>, String);

#[derive(Default)]
pub struct State {
    pub got: Vec<Got>,
    pub script: VecDeque<Scripted>,
    /// Requests being answered now, and the most there ever were.
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// Requests answered.
    pub done: usize,
}

/// A webhook receiver on a random port: answers from its script, then 200.
pub struct Receiver {
    pub state: Arc<Mutex<State>>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start(script: Vec<Scripted>) -> Receiver {
        Receiver::slow(script, Duration::ZERO).await
    }

    /// A receiver taking `delay` to answer each request.
    pub async fn slow(script: Vec<Scripted>, delay: Duration) -> Receiver {
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let s = state.clone();
        let routes = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(move |headers: HeaderMap, body: bytes::Bytes| {
                let s = s.clone();
                async move {
                    let (status, retry_after, text) = {
                        let mut st = s.lock().unwrap();
                        st.got.push(Got {
                            headers,
                            body: body.to_vec(),
                            at: Instant::now(),
                        });
                        st.in_flight += 1;
                        st.max_in_flight = st.max_in_flight.max(st.in_flight);
                        st.script.pop_front().unwrap_or((200, None, String::new()))
                    };
                    tokio::time::sleep(delay).await;
                    let mut st = s.lock().unwrap();
                    st.in_flight -= 1;
                    st.done += 1;
                    let mut res = warp::http::Response::builder()
                        .status(StatusCode::from_u16(status).unwrap());
                    if let Some(secs) = retry_after {
                        res = res.header("retry-after", secs.to_string());
                    }
                    res.body(text).unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hook?token=RECEIVER-TOKEN",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Receiver { state, url, task }
    }

    pub fn got(&self) -> Vec<Got> {
        self.state.lock().unwrap().got.clone()
    }

    /// Waits until `n` requests came.
    pub async fn wait_for(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "only {} requests", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
