//! The bus engines a scenario runs on, behind one small interface, so that each integration
//! scenario is written once and run against the in-process bus, a real `nats-server -js` and a
//! real Kafka-protocol broker (tansu): the bus contract cannot drift between engines.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use imbridge::bus::memory::Subscription;

use super::kafka::{self, Tansu};
use super::{nats_bus, NatsServer, TestApp, WAIT};

pub enum Engine {
    Memory,
    Nats(NatsServer),
    Kafka(Tansu),
}

/// A message as a subscriber of the engine sees it, header names as the engine spells them.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    /// The record key (Kafka only).
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Engine {
    /// Every engine, each with its own fresh server.
    pub fn all() -> Vec<Engine> {
        vec![Engine::Memory, Engine::nats(), Engine::kafka()]
    }

    /// The engines that keep messages outside the daemon (they survive it being killed).
    pub fn durable() -> Vec<Engine> {
        vec![Engine::nats(), Engine::kafka()]
    }

    pub fn nats() -> Engine {
        Engine::Nats(NatsServer::start())
    }

    pub fn kafka() -> Engine {
        Engine::Kafka(Tansu::start())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Nats(_) => "nats",
            Engine::Kafka(_) => "kafka",
        }
    }

    /// The `[bus]` section.
    pub fn toml(&self) -> String {
        match self {
            Engine::Memory => String::new(),
            Engine::Nats(s) => nats_bus(&s.url()),
            Engine::Kafka(k) => kafka::kafka_bus(&k.brokers()),
        }
    }

    /// The header name of CloudEvents attribute `attr`: `ce-id`, or `ce_id` on Kafka.
    pub fn ce(&self, attr: &str) -> String {
        match self {
            Engine::Kafka(_) => format!("ce_{attr}"),
            _ => format!("ce-{attr}"),
        }
    }

    /// Stops the broker (the memory engine has none).
    pub fn stop(&mut self) {
        match self {
            Engine::Memory => panic!("the memory engine cannot be stopped"),
            Engine::Nats(s) => s.stop(),
            Engine::Kafka(k) => k.stop(),
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) {
        match self {
            Engine::Memory => panic!("the memory engine cannot be restarted"),
            Engine::Nats(s) => s.restart(),
            Engine::Kafka(k) => k.restart(),
        }
    }

    /// Pauses (`-STOP`) or resumes (`-CONT`) the broker process. A pause returns once every
    /// thread of the broker is stopped: nats-server was seen answering for a few milliseconds
    /// after SIGSTOP, letting through a publish the test meant to stall.
    pub fn signal(&self, sig: &str) {
        match self {
            Engine::Memory => panic!("the memory engine has no broker"),
            Engine::Nats(s) if sig == "-STOP" => s.pause(),
            Engine::Nats(s) => s.signal(sig),
            Engine::Kafka(k) => k.signal(sig),
        }
    }

    /// Pauses the broker and waits until it is really stalled (NATS only).
    pub fn pause(&self) {
        match self {
            Engine::Nats(s) => s.pause(),
            _ => panic!("only the NATS engine is paused and waited for"),
        }
    }

    /// Publishes straight on the bus, as an internal system does (not through the daemon). The
    /// in-process bus is reached through the daemon `app` running it.
    pub async fn publish(&self, app: Option<&TestApp>, subject: &str, payload: &[u8]) {
        match self {
            Engine::Memory => {
                let app = app.expect("the in-process bus lives in a daemon");
                let msg = imbridge::bus::Message {
                    subject: subject.into(),
                    id: format!("raw-{}", rand::random::<u64>()),
                    headers: Vec::new(),
                    payload: payload.to_vec().into(),
                };
                app.bus.publish(&msg).await.expect("in-process publish");
            }
            Engine::Nats(s) => {
                let js = jetstream::new(s.client().await);
                js.publish(subject.to_owned(), payload.to_vec().into())
                    .await
                    .unwrap()
                    .await
                    .expect("stored on JetStream");
            }
            Engine::Kafka(k) => kafka::produce(&k.brokers(), subject, None, &[], payload).await,
        }
    }

    /// Waits until a message published straight on the bus to `notify.<target>` is kept for
    /// the daemon: on NATS the daemon must have made the interest-retention stream and the
    /// target's consumer; Kafka keeps every record (and the daemon reads from the earliest).
    pub async fn wait_notify_kept(&self, target: &str) {
        let Engine::Nats(s) = self else { return };
        let js = jetstream::new(s.client().await);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(stream) = js.get_stream("IMBRIDGE_NOTIFY").await {
                let consumer: Result<jetstream::consumer::PullConsumer, _> = stream
                    .get_consumer(&format!("imbridge-notify-{target}"))
                    .await;
                if consumer.is_ok() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "notify.{target} never kept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts watching `subject` (a full subject, no wildcards on Kafka). On the memory engine
    /// only what is published afterwards is seen; the others read what the broker stores.
    pub fn watch(&self, app: &TestApp, subject: &str) -> Watch {
        let subscription = match self {
            Engine::Memory => Some(app.bus.memory().expect("memory bus").subscribe(subject)),
            _ => None,
        };
        Watch {
            subject: subject.to_owned(),
            subscription,
        }
    }

    /// What the broker stores for `subject` now, without waiting (NATS and Kafka).
    pub async fn stored(&self, subject: &str) -> usize {
        match self {
            Engine::Memory => panic!("the memory engine stores nothing"),
            Engine::Nats(s) => {
                let js = jetstream::new(s.client().await);
                let Ok(name) = js.stream_by_subject(subject).await else {
                    return 0;
                };
                let stream = js.get_stream(name).await.unwrap();
                let mut consumer: jetstream::consumer::PullConsumer = stream
                    .create_consumer(jetstream::consumer::pull::Config {
                        filter_subject: subject.to_owned(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                consumer.info().await.unwrap().num_pending as usize
            }
            Engine::Kafka(k) => kafka::count(&k.brokers(), subject).await,
        }
    }
}

pub struct Watch {
    subject: String,
    subscription: Option<Subscription>,
}

impl Watch {
    /// The first `n` messages of the subject (failing the test if they do not come in time).
    pub async fn next(&mut self, engine: &Engine, n: usize) -> Vec<Stored> {
        match engine {
            Engine::Memory => {
                let sub = self.subscription.as_mut().expect("subscribed");
                let mut out = Vec::new();
                while out.len() < n {
                    let m = tokio::time::timeout(WAIT, sub.next())
                        .await
                        .unwrap_or_else(|_| {
                            panic!("{}: {} of {n} messages", self.subject, out.len())
                        })
                        .expect("bus open");
                    out.push(Stored {
                        subject: m.subject.clone(),
                        key: None,
                        headers: m.headers.clone(),
                        payload: m.payload.to_vec(),
                    });
                }
                out
            }
            Engine::Nats(s) => {
                let js = jetstream::new(s.client().await);
                let deadline = tokio::time::Instant::now() + WAIT;
                let name = loop {
                    if let Ok(name) = js.stream_by_subject(&self.subject).await {
                        break name;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no stream for {}",
                        self.subject
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let stream = js.get_stream(name).await.unwrap();
                let consumer: jetstream::consumer::PullConsumer = stream
                    .create_consumer(jetstream::consumer::pull::Config {
                        filter_subject: self.subject.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let mut messages = consumer.messages().await.unwrap();
                let mut out = Vec::new();
                while out.len() < n {
                    let m = tokio::time::timeout_at(deadline, messages.next())
                        .await
                        .unwrap_or_else(|_| {
                            panic!("{}: {} of {n} messages", self.subject, out.len())
                        })
                        .unwrap()
                        .unwrap();
                    out.push(Stored {
                        subject: m.subject.to_string(),
                        key: None,
                        headers: imbridge::bus::nats::header_pairs(m.headers.as_ref()),
                        payload: m.payload.to_vec(),
                    });
                }
                out
            }
            Engine::Kafka(k) => kafka::records(&k.brokers(), &self.subject, n)
                .await
                .into_iter()
                .map(|r| Stored {
                    subject: r.topic,
                    key: r.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                    headers: r.headers,
                    payload: r.payload,
                })
                .collect(),
        }
    }
}
