//! Body types of the HTTP path: one enum each way, no boxing.
//!
//! The response body carries the request's completion: when its last frame passes (or it is
//! dropped early), the upstream connection goes back to the pool, counters settle and the access
//! log record is handed to the writer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

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

/// The body sent upstream: the downstream body, passed through.
pub(crate) struct ReqBody {
    inner: Option<Incoming>,
    track: Option<Arc<ReqTrack>>,
}

impl ReqBody {
    pub(crate) fn new(inner: Incoming, track: Option<Arc<ReqTrack>>) -> ReqBody {
        if let Some(t) = &track
            && inner.is_end_stream()
        {
            t.done.store(true, Ordering::Relaxed);
        }
        ReqBody {
            inner: Some(inner),
            track,
        }
    }

    /// An empty body, for requests the proxy makes itself.
    #[allow(dead_code)]
    pub(crate) fn empty() -> ReqBody {
        ReqBody {
            inner: None,
            track: None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if let Some(t) = &this.track {
            match &r {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        t.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                        t.done.store(true, Ordering::Relaxed);
                    }
                }
                Poll::Ready(None) => t.done.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
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
}

impl UpstreamBody {
    /// Wraps `inner`; if it is already at its end, completes at once (hyper will not poll it).
    pub(crate) fn new(inner: Incoming, done: Finish) -> UpstreamBody {
        let mut b = UpstreamBody {
            inner,
            done: Some(done),
            bytes: 0,
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
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
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
        r
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
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
