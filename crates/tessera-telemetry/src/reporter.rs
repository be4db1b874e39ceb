//! The bounded queue between the request path and the sinks, and the thread that drains it.

use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::TelemetryError;

/// How long the export thread naps between draining the queue while a batch fills.
const NAP: Duration = Duration::from_millis(5);
use crate::event::Event;
use crate::metrics::escape_label_value;
use crate::sink::Sink;

/// How often, at most, one sink's errors are logged; the ones in between are counted and summed
/// into the next log line, so a dead collector does not flood the proxy's own log.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Queue and batching parameters.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Events the queue holds before `report` starts dropping. The slots are allocated up front,
    /// `size_of::<Event>()` (about 600 bytes) each.
    pub queue_capacity: usize,
    /// Most events handed to the sinks in one batch.
    pub max_batch: usize,
    /// Longest an event waits in a partial batch before the batch is exported.
    pub flush_interval: Duration,
    /// Name of the background thread.
    pub thread_name: String,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            queue_capacity: 4096,
            max_batch: 512,
            flush_interval: Duration::from_secs(1),
            thread_name: "tessera-telemetry".to_string(),
        }
    }
}

impl ReporterConfig {
    fn validate(&self) -> Result<(), TelemetryError> {
        if self.queue_capacity == 0 {
            return Err(TelemetryError::InvalidConfig(
                "queue_capacity must be at least 1 (0 would make every report a rendezvous)".into(),
            ));
        }
        if self.max_batch == 0 {
            return Err(TelemetryError::InvalidConfig("max_batch must be at least 1".into()));
        }
        if self.flush_interval.is_zero() {
            return Err(TelemetryError::InvalidConfig(
                "flush_interval must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

// Events travel unboxed: boxing would put an allocation on the request path, and the queue's
// slots are allocated once, up front.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(Event),
    Shutdown,
}

struct SinkCounters {
    name: String,
    exported: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    accepted: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    sinks: Vec<SinkCounters>,
    thread: Mutex<Option<JoinHandle<()>>>,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

impl Shared {
    fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            sinks: self
                .sinks
                .iter()
                .map(|s| SinkStats {
                    name: s.name.clone(),
                    exported: s.exported.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Waits until the background thread has exported everything and returned. Whoever takes the
    /// `JoinHandle` joins it; everyone else waits on the `finished` flag.
    fn wait_for_thread(&self) {
        let handle = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            if handle.thread().id() == thread::current().id() {
                // A sink dropped the last Reporter from inside the telemetry thread: joining
                // ourselves would deadlock, and the thread ends on its own.
                return;
            }
            if handle.join().is_err() {
                tracing::error!("telemetry reporter thread panicked; pending events are lost");
            }
            return;
        }
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        while !*finished {
            finished = self.finished_cv.wait(finished).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Sets the `finished` flag when the thread ends, even by a panic.
struct FinishedGuard(Arc<Shared>);

impl Drop for FinishedGuard {
    fn drop(&mut self) {
        *self.0.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.finished_cv.notify_all();
    }
}

/// Counters of one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    /// The sink's [`Sink::name`].
    pub name: String,
    /// Events the sink exported without error.
    pub exported: u64,
    /// Failed (or panicked) `export` and `flush` calls.
    pub errors: u64,
}

/// A copy of the reporter's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Events taken into the queue.
    pub accepted: u64,
    /// Events dropped because the queue was full or the reporter had shut down.
    pub dropped: u64,
    /// Batches handed to the sinks.
    pub batches: u64,
    /// Per-sink counters, in the order the sinks were given.
    pub sinks: Vec<SinkStats>,
}

impl StatsSnapshot {
    /// Appends the counters as Prometheus text (`tessera_telemetry_*`).
    pub fn render_prometheus(&self, out: &mut String) {
        let totals = [
            (
                "events_accepted",
                "Events taken into the telemetry queue.",
                self.accepted,
            ),
            (
                "events_dropped",
                "Events dropped because the telemetry queue was full or closed.",
                self.dropped,
            ),
            ("batches", "Batches handed to the telemetry sinks.", self.batches),
        ];
        for (name, help, value) in totals {
            let _ = write!(
                out,
                "# HELP tessera_telemetry_{name}_total {help}\n# TYPE tessera_telemetry_{name}_total counter\ntessera_telemetry_{name}_total {value}\n"
            );
        }
        let per_sink: [(&str, &str, SinkCounterOf); 2] = [
            ("sink_exported", "Events a telemetry sink exported.", |s| s.exported),
            (
                "sink_errors",
                "Failed export or flush calls of a telemetry sink.",
                |s| s.errors,
            ),
        ];
        for (name, help, get) in per_sink {
            let _ = write!(
                out,
                "# HELP tessera_telemetry_{name}_total {help}\n# TYPE tessera_telemetry_{name}_total counter\n"
            );
            for sink in &self.sinks {
                out.push_str("tessera_telemetry_");
                out.push_str(name);
                out.push_str("_total{sink=\"");
                escape_label_value(&sink.name, out);
                let _ = writeln!(out, "\"}} {}", get(sink));
            }
        }
    }
}

/// Picks one counter of a sink.
type SinkCounterOf = fn(&SinkStats) -> u64;

struct Inner {
    tx: Option<SyncSender<Msg>>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel tells the thread to export what is queued and stop.
        drop(self.tx.take());
        self.shared.wait_for_thread();
    }
}

/// The request path's handle: cheap to clone, `report` never blocks.
///
/// Dropping the last clone (or calling [`Reporter::shutdown`]) exports every queued event,
/// flushes the sinks and waits for the background thread to end.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").field("stats", &self.stats()).finish()
    }
}

/// Waits for the reporter thread; returned by [`Reporter::start`] for the process's shutdown path.
#[derive(Debug)]
pub struct ReporterJoin {
    shared: Arc<Shared>,
}

impl ReporterJoin {
    /// Blocks until the background thread has ended, then returns the final counters.
    ///
    /// The thread ends after [`Reporter::shutdown`] or once every [`Reporter`] clone is dropped;
    /// calling this while neither has happened blocks until one does.
    pub fn join(self) -> StatsSnapshot {
        self.shared.wait_for_thread();
        self.shared.snapshot()
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Reporter {
    /// Starts the background thread that feeds `sinks`.
    pub fn start(
        config: ReporterConfig,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Result<(Reporter, ReporterJoin), TelemetryError> {
        config.validate()?;
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let shared = Arc::new(Shared {
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            sinks: sinks
                .iter()
                .map(|s| SinkCounters {
                    name: s.name().to_string(),
                    exported: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                })
                .collect(),
            thread: Mutex::new(None),
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
        });
        let worker = Worker {
            rx,
            sinks: sinks
                .into_iter()
                .map(|sink| Slot {
                    sink,
                    last_logged: None,
                    suppressed: 0,
                })
                .collect(),
            max_batch: config.max_batch,
            flush_interval: config.flush_interval,
            shared: Arc::clone(&shared),
        };
        let handle = thread::Builder::new()
            .name(config.thread_name.clone())
            .spawn(move || worker.run())
            .map_err(|source| TelemetryError::Io {
                what: format!("spawn thread {:?}", config.thread_name),
                source,
            })?;
        *shared.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        let reporter = Reporter {
            inner: Arc::new(Inner {
                tx: Some(tx),
                shared: Arc::clone(&shared),
            }),
        };
        Ok((reporter, ReporterJoin { shared }))
    }

    /// Queues `event` without blocking. Returns `false` (and counts a drop) when the queue is full
    /// or the reporter has shut down.
    pub fn report(&self, event: Event) -> bool {
        let shared = &self.inner.shared;
        let Some(tx) = &self.inner.tx else {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        match tx.try_send(Msg::Event(event)) {
            Ok(()) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Exports everything queued so far, flushes the sinks, stops the thread and waits for it,
    /// even while other clones exist; their later reports are counted as dropped. Idempotent.
    /// An event reported in the instant the thread closes the queue can be counted as accepted
    /// yet not exported.
    /// Not for the request path: it blocks until the sinks are done.
    pub fn shutdown(&self) {
        if let Some(tx) = &self.inner.tx {
            // A blocking send, so the marker queues behind every accepted event. It fails only if
            // the thread has already ended, which is what we want anyway.
            let _ = tx.send(Msg::Shutdown);
        }
        self.inner.shared.wait_for_thread();
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.shared.snapshot()
    }
}

struct Slot {
    sink: Box<dyn Sink>,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Slot {
    fn log_error(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < ERROR_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            sink = self.sink.name(),
            suppressed = self.suppressed,
            "telemetry sink {what} failed: {error}"
        );
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

struct Worker {
    rx: Receiver<Msg>,
    sinks: Vec<Slot>,
    max_batch: usize,
    flush_interval: Duration,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(mut self) {
        let _finished = FinishedGuard(Arc::clone(&self.shared));
        let mut batch: Vec<Event> = Vec::with_capacity(self.max_batch);
        // Idle: nothing to export, so sleep until the first event rather than waking every flush
        // interval. A shutdown marker or a closed queue ends the loop.
        while let Ok(Msg::Event(first)) = self.rx.recv() {
            batch.push(first);
            // The first event starts the clock: no event waits longer than `flush_interval`.
            let deadline = Instant::now() + self.flush_interval;
            let mut stop = false;
            // Collect by draining and napping rather than blocking per event: a sender only pays
            // a wake-up (a futex call on the sending thread) when this thread is blocked, which
            // under load is now almost never.
            'collect: while batch.len() < self.max_batch {
                loop {
                    match self.rx.try_recv() {
                        Ok(Msg::Event(event)) => {
                            batch.push(event);
                            if batch.len() >= self.max_batch {
                                break 'collect;
                            }
                        }
                        Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => {
                            stop = true;
                            break 'collect;
                        }
                        Err(TryRecvError::Empty) => break,
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep(NAP.min(deadline - now));
            }
            self.deliver(&mut batch);
            if stop {
                break;
            }
        }
        self.drain(&mut batch);
    }

    /// Exports whatever is still queued (accepted before shutdown), then closes the queue.
    fn drain(&mut self, batch: &mut Vec<Event>) {
        self.deliver(batch);
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Event(event)) => {
                    batch.push(event);
                    if batch.len() >= self.max_batch {
                        self.deliver(batch);
                    }
                }
                Ok(Msg::Shutdown) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        self.deliver(batch);
    }

    fn deliver(&mut self, batch: &mut Vec<Event>) {
        if batch.is_empty() {
            return;
        }
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let len = batch.len();
        for (slot, counters) in self.sinks.iter_mut().zip(&self.shared.sinks) {
            // A panicking sink must not take the other sinks (or the proxy's shutdown) with it.
            let exported = catch_unwind(AssertUnwindSafe(|| slot.sink.export(batch)));
            match exported {
                Ok(Ok(())) => {
                    counters.exported.fetch_add(len as u64, Ordering::Relaxed);
                }
                Ok(Err(error)) => {
                    let ok = len - error.failed_events(len);
                    counters.exported.fetch_add(ok as u64, Ordering::Relaxed);
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    slot.log_error("export", &error);
                }
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    slot.log_error("export", &"panicked");
                }
            }
            let flushed = catch_unwind(AssertUnwindSafe(|| slot.sink.flush()));
            let error: Option<Box<dyn std::fmt::Display>> = match flushed {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(Box::new(error) as Box<dyn std::fmt::Display>),
                Err(_) => Some(Box::new("panicked")),
            };
            if let Some(error) = error {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                slot.log_error("flush", &error);
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, ReporterSide};
    use crate::sink::SinkError;

    struct Counting(Arc<AtomicU64>);
    impl Sink for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
            self.0.fetch_add(batch.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Failing;
    impl Sink for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn export(&mut self, _: &[Event]) -> Result<(), SinkError> {
            Err(SinkError::Other("collector down".into()))
        }
    }

    struct Panicking;
    impl Sink for Panicking {
        fn name(&self) -> &str {
            "panicking"
        }
        fn export(&mut self, _: &[Event]) -> Result<(), SinkError> {
            panic!("sink bug")
        }
    }

    #[test]
    fn drop_of_last_handle_flushes_everything() {
        let seen = Arc::new(AtomicU64::new(0));
        let config = ReporterConfig {
            flush_interval: Duration::from_secs(3600),
            ..ReporterConfig::default()
        };
        let (reporter, join) = Reporter::start(config, vec![Box::new(Counting(Arc::clone(&seen)))]).unwrap();
        let clone = reporter.clone();
        for _ in 0..10 {
            assert!(clone.report(Event::new(Kind::Http, ReporterSide::Source)));
        }
        drop(clone);
        drop(reporter);
        // The flush interval is an hour: only the shutdown path can have exported these.
        assert_eq!(seen.load(Ordering::SeqCst), 10);
        let stats = join.join();
        assert_eq!(stats.accepted, 10);
        assert_eq!(stats.sinks[0].exported, 10);
    }

    #[test]
    fn failing_and_panicking_sinks_are_counted_and_others_still_get_events() {
        let seen = Arc::new(AtomicU64::new(0));
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Panicking),
            Box::new(Failing),
            Box::new(Counting(Arc::clone(&seen))),
        ];
        let (reporter, join) = Reporter::start(ReporterConfig::default(), sinks).unwrap();
        for _ in 0..3 {
            reporter.report(Event::new(Kind::Tcp, ReporterSide::Destination));
        }
        reporter.shutdown();
        assert!(!reporter.report(Event::new(Kind::Tcp, ReporterSide::Destination)));
        let stats = join.join();
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        assert_eq!(stats.accepted, 3);
        assert_eq!(stats.dropped, 1);
        assert!(stats.sinks[0].errors >= 1 && stats.sinks[0].exported == 0);
        assert!(stats.sinks[1].errors >= 1 && stats.sinks[1].exported == 0);
        assert_eq!(stats.sinks[2].errors, 0);
        let mut text = String::new();
        stats.render_prometheus(&mut text);
        assert!(
            text.contains("tessera_telemetry_sink_exported_total{sink=\"counting\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("tessera_telemetry_events_dropped_total 1\n"), "{text}");
    }

    #[test]
    fn bad_config_is_rejected() {
        let config = ReporterConfig {
            max_batch: 0,
            ..ReporterConfig::default()
        };
        assert!(matches!(
            Reporter::start(config, Vec::new()),
            Err(TelemetryError::InvalidConfig(_))
        ));
    }
}
