//! A response body that passes the engine's frames through as they arrive and reports, once,
//! whether the stream completed or was cut short (client disconnect or upstream failure).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::engine::http_client::{BoxError, ConnectionGuard};

/// Outcome of a streamed response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every frame reached the client.
    Completed,
    /// The upstream failed or the client went away before the end.
    Aborted,
}

type OnEnd = Box<dyn FnOnce(StreamEnd) + Send + Sync>;

/// The upstream body with an end-of-stream callback. Dropping it early (hyper does so when the
/// client disconnects) closes the engine connection, which makes the engine stop generating.
pub struct TrackedBody {
    inner: Incoming,
    on_end: Option<OnEnd>,
    /// Closes the engine connection when the body is dropped, completed or not.
    _connection: ConnectionGuard,
}

impl TrackedBody {
    pub fn new(inner: Incoming, connection: ConnectionGuard, on_end: impl FnOnce(StreamEnd) + Send + Sync + 'static) -> TrackedBody {
        TrackedBody { inner, on_end: Some(Box::new(on_end)), _connection: connection }
    }

    fn end(&mut self, outcome: StreamEnd) {
        if let Some(on_end) = self.on_end.take() {
            on_end(outcome);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.end(StreamEnd::Completed);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.inner.is_end_stream() {
                    self.end(StreamEnd::Completed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                self.end(StreamEnd::Aborted);
                Poll::Ready(Some(Err(Box::new(error))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.end(StreamEnd::Aborted);
    }
}
