//! The shutdown signal every long-running task takes. SIGTERM or SIGINT trips it; so can a
//! test. After it trips, listeners stop accepting, in-flight requests finish (with their
//! publishes) within the grace period, then the bus is flushed.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// A signal of its own that this one trips too: one part stopped (a target a reload
    /// removed) without stopping the rest.
    pub fn child(&self) -> Shutdown {
        Shutdown(self.0.child_token())
    }

    /// Completes once the shutdown has started.
    pub async fn cancelled(&self) {
        self.0.cancelled().await
    }

    /// Trips this signal on the first SIGTERM or SIGINT. The handlers are installed before
    /// this returns, so a signal that arrives right after start-up is not lost to the default
    /// action (which would kill the process without draining).
    pub fn on_signals(&self) -> std::io::Result<()> {
        let signals = Signals::install()?;
        let this = self.clone();
        tokio::spawn(async move {
            let name = signals.recv().await;
            tracing::info!(signal = name, "shutting down");
            this.trigger();
        });
        Ok(())
    }
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn recv(self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
