//! Body types of the HTTP path: one enum each way, no boxing.
//!
//! The response body carries the request's completion: when its last frame passes (or it is
//! dropped early), the upstream connection goes back to the pool, counters settle and the access
//! log record is handed to the writer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http::Finish;

/// What the request body has done so far, shared with the request's owner when someone needs
/// to know (the access log's byte count, the request timeout).
#[derive(Default)]
pub(crate) struct ReqTrack {
    pub(crate) bytes: AtomicU64,
    pub(crate) done: AtomicBool,
}

/// Errors of a request body sent upstream.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body sent upstream.
pub(crate) enum ReqBody {
    /// No body.
    Empty,
    /// The downstream body, passed through as it arrives.
    Stream {
        inner: Incoming,
        track: Option<Arc<ReqTrack>>,
    },
    /// One reader of a body kept for retries and mirrors.
    Shared(SharedReader),
}

impl ReqBody {
    pub(crate) fn new(inner: Incoming, track: Option<Arc<ReqTrack>>) -> ReqBody {
        if let Some(t) = &track
            && inner.is_end_stream()
        {
            t.done.store(true, Ordering::Relaxed);
        }
        ReqBody::Stream { inner, track }
    }
}

fn note(track: &Option<Arc<ReqTrack>>, f: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>, end: bool) {
    if let Some(t) = track {
        match f {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    t.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if end {
                    t.done.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => t.done.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream { inner, track } => {
                let r = Pin::new(&mut *inner).poll_frame(cx);
                note(track, &r, inner.is_end_stream());
                r.map(|o| o.map(|r| r.map_err(Into::into)))
            }
            ReqBody::Shared(reader) => reader.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
            ReqBody::Shared(r) => r.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
            ReqBody::Shared(r) => r.size_hint(),
        }
    }
}

/// A downstream body kept so several upstream requests can read it: the attempts of a retried
/// request, and mirrors. Frames are kept up to a byte limit; past it the body is no longer
/// replayable, and a reader that falls behind what is kept fails instead of sending a truncated
/// body. Whichever reader needs a frame that has not arrived pulls it from the client; every
/// reader is woken when one does. Only the readers of one request use the lock, on one worker.
#[derive(Clone)]
pub(crate) struct SharedBody(Arc<Mutex<SharedState>>);

struct SharedState {
    source: Option<Incoming>,
    /// Frames kept, in order (data, then trailers).
    frames: Vec<Kept>,
    /// Frames pulled in all, kept or not.
    pulled: usize,
    bytes: u64,
    limit: u64,
    overflow: bool,
    ended: bool,
    failed: Option<String>,
    waiters: Vec<Waker>,
    hint: SizeHint,
}

#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

impl SharedBody {
    /// Keeps up to `limit` bytes of `source` for replay.
    pub(crate) fn new(source: Incoming, limit: u64) -> SharedBody {
        let hint = source.size_hint();
        let ended = source.is_end_stream();
        SharedBody(Arc::new(Mutex::new(SharedState {
            source: Some(source),
            frames: Vec::new(),
            pulled: 0,
            bytes: 0,
            limit,
            overflow: false,
            ended,
            failed: None,
            waiters: Vec::new(),
            hint,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader from the start. `None` once the body outgrew its limit: it cannot be sent again.
    pub(crate) fn reader(&self) -> Option<SharedReader> {
        (!self.lock().overflow).then(|| SharedReader {
            body: self.clone(),
            pos: 0,
            done: false,
        })
    }

    /// True while every byte read so far is kept (a new reader can replay the body).
    pub(crate) fn replayable(&self) -> bool {
        !self.lock().overflow
    }

    /// Bytes read from the client so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// True when the client has sent the whole body.
    pub(crate) fn ended(&self) -> bool {
        self.lock().ended
    }
}

/// One reader of a [`SharedBody`].
pub(crate) struct SharedReader {
    body: SharedBody,
    /// Index of the next frame this reader returns.
    pos: usize,
    done: bool,
}

impl SharedReader {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut st = self.body.lock();
        if self.pos < st.frames.len() {
            let f = st.frames[self.pos].clone();
            self.pos += 1;
            return Poll::Ready(Some(Ok(match f {
                Kept::Data(d) => Frame::data(d),
                Kept::Trailers(t) => Frame::trailers(t),
            })));
        }
        if self.pos < st.pulled {
            // Frames this reader needs were not kept (past the limit).
            self.done = true;
            return Poll::Ready(Some(Err("request body exceeded the retry/mirror buffer limit".into())));
        }
        if let Some(why) = &st.failed {
            self.done = true;
            return Poll::Ready(Some(Err(why.clone().into())));
        }
        if st.ended {
            self.done = true;
            return Poll::Ready(None);
        }
        let st = &mut *st;
        let Some(source) = st.source.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(&mut *source).poll_frame(cx) {
            Poll::Pending => {
                if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    st.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                let out = match r {
                    None => {
                        st.ended = true;
                        self.done = true;
                        None
                    }
                    Some(Err(e)) => {
                        st.failed = Some(e.to_string());
                        self.done = true;
                        Some(Err(BodyError::from(e)))
                    }
                    Some(Ok(frame)) => {
                        st.pulled += 1;
                        self.pos = st.pulled;
                        let kept = match frame.data_ref() {
                            Some(d) => {
                                st.bytes += d.len() as u64;
                                Kept::Data(d.clone())
                            }
                            None => Kept::Trailers(frame.trailers_ref().cloned().unwrap_or_default()),
                        };
                        if st.bytes > st.limit {
                            st.overflow = true;
                        }
                        if !st.overflow && st.frames.len() + 1 == st.pulled {
                            st.frames.push(kept);
                        }
                        if source.is_end_stream() {
                            st.ended = true;
                        }
                        Some(Ok(frame))
                    }
                };
                for w in st.waiters.drain(..) {
                    w.wake();
                }
                Poll::Ready(out)
            }
        }
    }

    fn is_end(&self) -> bool {
        let st = self.body.lock();
        self.done || (st.ended && self.pos >= st.pulled)
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.body.lock();
        if self.pos == 0 { st.hint } else { SizeHint::default() }
    }
}

impl Drop for SharedReader {
    fn drop(&mut self) {
        // Another reader may be waiting for this one to pull the next frame.
        let mut st = self.body.lock();
        for w in st.waiters.drain(..) {
            w.wake();
        }
    }
}

/// How a response stream ended, for the completion hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The last frame went out.
    Complete,
    /// The upstream body failed mid-stream.
    UpstreamError,
    /// The body was dropped before its end: the downstream went away.
    Dropped,
    /// The route's `max_stream_duration` passed; the stream was reset.
    MaxDuration,
}

/// The body sent downstream.
pub enum RespBody {
    /// A reply made by the proxy.
    Local(Option<Bytes>),
    /// An upstream response, streamed.
    Upstream(UpstreamBody),
}

impl RespBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> RespBody {
        let b = b.into();
        RespBody::Local(if b.is_empty() { None } else { Some(b) })
    }

    pub(crate) fn empty() -> RespBody {
        RespBody::Local(None)
    }
}

/// An upstream response body with its completion hook.
pub struct UpstreamBody {
    inner: Incoming,
    done: Option<Finish>,
    bytes: u64,
    /// The route's `max_stream_duration`, when it has one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl UpstreamBody {
    /// Wraps `inner`; if it is already at its end, completes at once (hyper will not poll it).
    pub(crate) fn new(inner: Incoming, done: Finish, deadline: Option<tokio::time::Instant>) -> UpstreamBody {
        let mut b = UpstreamBody {
            inner,
            done: Some(done),
            bytes: 0,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        };
        if b.inner.is_end_stream() {
            b.finish(Ending::Complete);
        }
        b
    }

    fn finish(&mut self, ending: Ending) {
        if let Some(d) = self.done.take() {
            d.complete(ending, self.bytes);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.finish(Ending::Dropped);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            this.finish(Ending::MaxDuration);
            return Poll::Ready(Some(Err("max_stream_duration reached".into())));
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                // hyper stops polling once is_end_stream() says so, so finish here, not on None.
                if this.inner.is_end_stream() {
                    this.finish(Ending::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Ending::UpstreamError),
            Poll::Ready(None) => this.finish(Ending::Complete),
            Poll::Pending => {}
        }
        r.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RespBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Upstream(u) => Pin::new(u).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Local(b) => b.is_none(),
            RespBody::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream(u) => u.size_hint(),
        }
    }
}
