//! The sink interface: where batches of events go.

use std::io;

use crate::event::Event;

/// A destination for batches of events. Runs only on the reporter's thread, so it may block
/// briefly (a file write, a UDP send) but should not block for long: a slow sink delays every sink
/// and, once the queue fills, makes the request path drop events.
pub trait Sink: Send {
    /// A short name for counters and logs, e.g. `"statsd"`.
    fn name(&self) -> &str;

    /// Consumes one batch. An error is counted and logged by the reporter; the next batch is
    /// still delivered.
    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError>;

    /// Pushes out anything buffered. Called after every batch and at shutdown.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Why a sink could not export (all or part of) a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. "send statsd datagram".
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Some events of the batch were not exported; the others were.
    #[error("{failed} of {total} events not exported; first error: {what}: {source}")]
    Partial {
        /// Events not exported.
        failed: usize,
        /// Events in the batch.
        total: usize,
        /// What was being done when the first error happened.
        what: &'static str,
        /// The first error.
        #[source]
        source: io::Error,
    },
    /// Any other failure.
    #[error("{0}")]
    Other(String),
}

impl SinkError {
    /// How many events of a batch of `batch_len` this error lost.
    pub fn failed_events(&self, batch_len: usize) -> usize {
        match self {
            SinkError::Partial { failed, .. } => (*failed).min(batch_len),
            _ => batch_len,
        }
    }
}
