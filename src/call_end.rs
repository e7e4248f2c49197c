//! How a tower layer learns how a gRPC call ended: its status code, read from the response
//! headers (trailers-only answers, which most errors are) or from the trailers at the end of the
//! body, which is therefore wrapped. The metrics and the traces both record it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// gRPC status codes by number: `CANCELLED` and `UNKNOWN`, and how many there are.
pub const CANCELLED: usize = 1;
pub const UNKNOWN: usize = 2;
pub const CODES: usize = 17;

/// What a layer records when its call ends. Dropped before that (its client went away, the
/// drain's grace ran out), it records `CANCELLED` itself.
pub trait CallEnd {
    /// The call ended with `code` (below [`CODES`]).
    fn finish(self, code: usize);

    /// Runs one poll of the call's handler or of its answer's body.
    fn polling<R>(&self, poll: impl FnOnce() -> R) -> R {
        poll()
    }
}

/// The `grpc-status` of headers or trailers: a code below [`CODES`], else `UNKNOWN`.
pub fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|code| code.parse::<usize>().ok())
            .filter(|code| *code < CODES)
            .unwrap_or(UNKNOWN),
    )
}

/// The inner service's answer, its body wrapped to see the trailers. Without an `end` (the
/// layer is off) it only passes the answer through.
#[pin_project::pin_project]
pub struct EndFuture<F, C> {
    #[pin]
    inner: F,
    end: Option<C>,
}

impl<F, C> EndFuture<F, C> {
    pub fn new(inner: F, end: Option<C>) -> Self {
        Self { inner, end }
    }
}

impl<F, B, E, C> Future for EndFuture<F, C>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    C: CallEnd,
{
    type Output = Result<http::Response<EndBody<B, C>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let answer = std::task::ready!(match this.end.as_ref() {
            Some(end) => end.polling(|| inner.poll(cx)),
            None => inner.poll(cx),
        });
        let mut end = this.end.take();
        Poll::Ready(match answer {
            Ok(response) => {
                if end.is_some()
                    && let Some(code) = status_code(response.headers())
                    && let Some(done) = end.take()
                {
                    done.finish(code);
                }
                Ok(response.map(|inner| EndBody { inner, end }))
            }
            Err(e) => {
                if let Some(end) = end {
                    end.finish(UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

/// A response body that finishes its call when the trailers pass (or, dropped before that,
/// lets its `CallEnd` record `CANCELLED`).
#[pin_project::pin_project]
pub struct EndBody<B, C> {
    #[pin]
    inner: B,
    end: Option<C>,
}

impl<B: http_body::Body, C: CallEnd> http_body::Body for EndBody<B, C> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let inner = this.inner;
        let frame = std::task::ready!(match this.end.as_ref() {
            Some(end) => end.polling(|| inner.poll_frame(cx)),
            None => inner.poll_frame(cx),
        });
        if this.end.is_none() {
            return Poll::Ready(frame);
        }
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| status_code(trailers).unwrap_or(UNKNOWN)),
            Some(Err(_)) => Some(UNKNOWN),
            // Ended without trailers: gRPC always sends them, so the status is unknown.
            None => Some(UNKNOWN),
        };
        if let Some(code) = code
            && let Some(end) = this.end.take()
        {
            end.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
