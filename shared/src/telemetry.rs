//! Logging: tracing to stderr, human-readable text or one JSON object per line.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` refines the filter; without it the level is
/// `info` (`debug` for sessionfleet crates with `verbose`). Calling it twice is harmless.
pub fn init(format: LogFormat, verbose: bool) {
    let default = if verbose {
        "info,sessionfleet=debug,sessionfleet_worker=debug"
    } else {
        "info,apalis_core=warn,apalis_redis=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
