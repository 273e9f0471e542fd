//! SIGTERM and SIGINT as one stream of "stop" requests.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Both stop signals, registered at start so none is missed.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Registers the handlers.
    pub fn register() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
