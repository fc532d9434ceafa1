//! Log output: JSON lines (as the reference agent) or text, on stderr.

use tracing_subscriber::filter::LevelFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Only this crate's events pass below INFO, so SDK
/// internals (which may print request details) never reach debug or trace output.
pub fn init(level: tracing::Level, format: LogFormat) {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::INFO.min(LevelFilter::from_level(level)))
        .with_target(env!("CARGO_CRATE_NAME"), LevelFilter::from_level(level));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level);
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .init(),
        LogFormat::Text => builder.finish().with(filter).init(),
    }
}
