//! The long-connection apps' tasks, each with a stop of its own, so that a reload restarts
//! exactly the apps whose settings (credentials, endpoint, proxy) it changed, starts the new
//! ones and stops the removed ones. A stopped connection answers what it holds, as at
//! shutdown; the platform pushes what was not answered to the new connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::task::JoinHandle;

use super::{DingTalkStreamApp, LarkStreamApp, StreamSettings, Streams};
use crate::ingress::State;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// What the connections share, kept to start more of them later.
pub struct StreamApps {
    settings: StreamSettings,
    state: Arc<State>,
    streams: Streams,
    supervisor: Supervisor,
    shutdown: Shutdown,
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    dingtalk: BTreeMap<String, (DingTalkStreamApp, Unit)>,
    lark: BTreeMap<String, (LarkStreamApp, Unit)>,
    /// Stopped apps' tasks, joined at shutdown (they may still be answering what they hold).
    retired: Vec<JoinHandle<()>>,
}

struct Unit {
    stop: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

/// What [`StreamApps::apply`] changed, as `<platform>/<app>`.
#[derive(Debug, Default)]
pub struct Changed {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
}

impl StreamApps {
    pub fn new(
        settings: &StreamSettings,
        state: &Arc<State>,
        streams: &Streams,
        supervisor: &Supervisor,
        shutdown: &Shutdown,
    ) -> Self {
        StreamApps {
            settings: settings.clone(),
            state: state.clone(),
            streams: streams.clone(),
            supervisor: supervisor.clone(),
            shutdown: shutdown.clone(),
            running: Mutex::default(),
        }
    }

    /// Brings the running connections to `dingtalk` and `lark`: an app whose settings
    /// changed gets a new connection before its old one is stopped; one that cannot be
    /// started (its HTTP client) keeps the old one and is reported.
    pub fn apply(
        &self,
        dingtalk: &BTreeMap<String, DingTalkStreamApp>,
        lark: &BTreeMap<String, LarkStreamApp>,
    ) -> anyhow::Result<Changed> {
        let mut running = self.lock();
        let Running {
            dingtalk: d,
            lark: l,
            retired,
        } = &mut *running;
        let spawn_d = |apps: &BTreeMap<String, DingTalkStreamApp>, stop: &Shutdown| {
            super::dingtalk::spawn(apps, self.shared(stop))
        };
        let first = reconcile("dingtalk", d, dingtalk, spawn_d, &self.shutdown, retired);
        let spawn_l = |apps: &BTreeMap<String, LarkStreamApp>, stop: &Shutdown| {
            super::lark::spawn(apps, self.shared(stop))
        };
        let second = reconcile("lark", l, lark, spawn_l, &self.shutdown, retired);
        let (started_d, stopped_d, failed_d) = split(first);
        let (started_l, stopped_l, failed_l) = split(second);
        let changed = Changed {
            started: started_d.into_iter().chain(started_l).collect(),
            stopped: stopped_d.into_iter().chain(stopped_l).collect(),
        };
        for key in &changed.stopped {
            if let Some((platform, app)) = key.split_once('/') {
                if !changed.started.contains(key) {
                    self.streams.forget(platform, app);
                    self.state.metrics.stream_connected(platform, app, false);
                }
            }
        }
        let failed: Vec<String> = failed_d.into_iter().chain(failed_l).collect();
        match failed.is_empty() {
            true => Ok(changed),
            false => anyhow::bail!(
                "could not start the long connections of {}",
                failed.join(", ")
            ),
        }
    }

    /// Every connection task, running or stopped, to join at shutdown.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        let mut running = self.lock();
        let Running {
            dingtalk,
            lark,
            retired,
        } = &mut *running;
        let mut tasks = std::mem::take(retired);
        let units = dingtalk.values_mut().map(|(_, u)| u);
        for unit in units.chain(lark.values_mut().map(|(_, u)| u)) {
            tasks.append(&mut unit.tasks);
        }
        tasks
    }

    fn shared<'a>(&'a self, stop: &'a Shutdown) -> super::Shared<'a> {
        super::Shared {
            settings: &self.settings,
            state: &self.state,
            streams: &self.streams,
            supervisor: &self.supervisor,
            shutdown: stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What reconciling one platform did to one app.
enum Step {
    Started(String),
    Stopped(String),
    Failed(String),
}

fn split(steps: Vec<Step>) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut started, mut stopped, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for step in steps {
        match step {
            Step::Started(k) => started.push(k),
            Step::Stopped(k) => stopped.push(k),
            Step::Failed(k) => failed.push(k),
        }
    }
    (started, stopped, failed)
}

/// Starts what `wanted` has that `running` lacks or has otherwise, then stops what it
/// replaced or what `wanted` no longer has.
fn reconcile<A, F>(
    platform: &str,
    running: &mut BTreeMap<String, (A, Unit)>,
    wanted: &BTreeMap<String, A>,
    spawn: F,
    shutdown: &Shutdown,
    retired: &mut Vec<JoinHandle<()>>,
) -> Vec<Step>
where
    A: PartialEq + Clone,
    F: Fn(&BTreeMap<String, A>, &Shutdown) -> anyhow::Result<Vec<JoinHandle<()>>>,
{
    let mut steps = Vec::new();
    retired.retain(|t| !t.is_finished());
    for (name, app) in wanted {
        if running.get(name).is_some_and(|(was, _)| was == app) {
            continue;
        }
        let key = format!("{platform}/{name}");
        let stop = shutdown.child();
        let one = BTreeMap::from([(name.clone(), app.clone())]);
        match spawn(&one, &stop) {
            Ok(tasks) => {
                if let Some((_, old)) =
                    running.insert(name.clone(), (app.clone(), Unit { stop, tasks }))
                {
                    old.stop.trigger();
                    retired.extend(old.tasks);
                    steps.push(Step::Stopped(key.clone()));
                }
                steps.push(Step::Started(key));
            }
            Err(e) => {
                tracing::error!(platform, app = %name, error = %format!("{e:#}"), "cannot start the long connection; the previous one (if any) stays");
                steps.push(Step::Failed(key));
            }
        }
    }
    let gone: Vec<String> = running
        .keys()
        .filter(|n| !wanted.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        if let Some((_, unit)) = running.remove(&name) {
            unit.stop.trigger();
            retired.extend(unit.tasks);
            steps.push(Step::Stopped(format!("{platform}/{name}")));
        }
    }
    steps
}
