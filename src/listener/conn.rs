//! A gRPC connection that the server closes when it is of no use: no request within the
//! first-request timeout, or no open stream for the idle timeout.
//!
//! hyper's HTTP/2 server has neither timeout, and tonic runs the TLS handshake and hyper
//! on the connections it is handed, so the watch is kept below both, in the connection's
//! own reads: [`Conn`] wraps the TCP stream, and while hyper (or the TLS handshake) waits
//! for bytes, a timer runs to the connection's deadline; when it fires the read fails and
//! hyper drops the connection. What a deadline depends on is counted above hyper, by
//! [`StreamsLayer`], which sees every request: it finds the request's connection by the
//! peer address tonic records in the request ([`Connections`]) and holds an
//! [`OpenStream`] until the response body is done (a reviewer stream, for hours).
//!
//! - Before the first request: `first_request_timeout` from the accept, so the TLS
//!   handshake, the HTTP/2 preface and the first request's headers must all arrive in
//!   that time. A client that connects eagerly and calls later is closed and reconnects
//!   on its next call (gRPC clients do, as for any closed idle connection).
//! - After: `idle_timeout` from the moment the last open stream ended. HTTP/2 keepalive
//!   pings do not count as use; they only find dead peers.
//! - Never within [`READ_GRACE`] of bytes arriving, so a request whose bytes were just
//!   read, but which hyper has not handed on yet, is not cut at the deadline.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http_body_util::BodyExt as _;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use super::accept::Slot;
use super::stats::Reason;

/// A deadline never closes a connection less than this after bytes arrived on it.
pub const READ_GRACE: Duration = Duration::from_secs(1);

/// The two timeouts of a gRPC connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_request: Duration,
    pub idle: Duration,
}

// === impl Activity ===

/// What the stream layer tells a connection's watchdog: streams open, whether any request
/// came, since when none is open.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    requested: AtomicBool,
    idle_since: Mutex<Instant>,
    /// The connection's task, woken when its last stream ends so the idle timer starts.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            open: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            waker: Mutex::new(None),
        }
    }
}

/// One open stream on a connection; dropped when the response body is done.
#[derive(Debug)]
pub struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        *self.0.idle_since.lock() = Instant::now();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(waker) = self.0.waker.lock().take()
        {
            waker.wake();
        }
    }
}

// === impl Connections ===

/// The open gRPC connections by peer address: how a request finds its connection. A
/// peer address names one TCP connection to this listener while it is open.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Mutex<HashMap<SocketAddr, Arc<Activity>>>>);

impl Connections {
    /// Counts a stream on the connection from `peer`; `None` if it is not one of ours.
    pub fn stream_opened(&self, peer: SocketAddr) -> Option<OpenStream> {
        let activity = self.0.lock().get(&peer)?.clone();
        activity.requested.store(true, Ordering::Release);
        activity.open.fetch_add(1, Ordering::AcqRel);
        Some(OpenStream(activity))
    }
}

// === impl Conn ===

/// An accepted gRPC connection; see the module documentation.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    connections: Connections,
    timeouts: Timeouts,
    accepted: Instant,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
    /// Held until the connection is dropped: its place under the cap.
    slot: Slot,
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        connections: &Connections,
        timeouts: Timeouts,
    ) -> Conn {
        let activity = Arc::new(Activity::new());
        connections.0.lock().insert(peer, activity.clone());
        let now = Instant::now();
        Conn {
            stream,
            peer,
            activity,
            connections: connections.clone(),
            timeouts,
            accepted: now,
            last_read: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.first_request)),
            slot,
        }
    }

    /// Called while a read waits: `Some(reason)` once the connection should be closed.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<Reason> {
        {
            let mut waker = self.activity.waker.lock();
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        if self.activity.open.load(Ordering::Acquire) > 0 {
            // Woken by the last stream's end, which starts the idle timer.
            return None;
        }
        let (deadline, reason) = if self.activity.requested.load(Ordering::Acquire) {
            (
                *self.activity.idle_since.lock() + self.timeouts.idle,
                Reason::Idle,
            )
        } else {
            (
                self.accepted + self.timeouts.first_request,
                Reason::FirstRequestTimeout,
            )
        };
        let deadline = deadline.max(self.last_read + READ_GRACE);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready().then_some(reason)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut connections = self.connections.0.lock();
        if connections
            .get(&self.peer)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            connections.remove(&self.peer);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if let Poll::Ready(read) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.last_read = Instant::now();
            }
            return Poll::Ready(read);
        }
        match this.expired(cx) {
            None => Poll::Pending,
            Some(reason) => {
                this.slot.stats().closed(this.slot.listener(), reason);
                tracing::debug!(peer = %this.peer, reason = reason.as_str(), "closing connection");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match reason {
                        Reason::Idle => "closed: no open stream for the idle timeout",
                        _ => "closed: no request within the first-request timeout",
                    },
                )))
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    /// The TCP stream's own, so `remote_addr` and (under TLS) `peer_certs` work as before.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

// === impl StreamsLayer ===

/// Counts each request as an open stream of its connection until its response body is
/// done; in front of every service.
#[derive(Debug, Clone)]
pub struct StreamsLayer {
    connections: Connections,
}

impl StreamsLayer {
    pub fn new(connections: Connections) -> StreamsLayer {
        StreamsLayer { connections }
    }
}

impl<S> tower::Layer<S> for StreamsLayer {
    type Service = Streams<S>;

    fn layer(&self, inner: S) -> Streams<S> {
        Streams {
            inner,
            connections: self.connections.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Streams<S> {
    inner: S,
    connections: Connections,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Streams<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.get_ref().remote_addr())
            });
        let open = peer.and_then(|peer| self.connections.stream_opened(peer));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                // The stream stays open until the body is done: the closure owns it.
                Some(open) => response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _open = &open;
                        frame
                    }))
                }),
                None => response,
            })
        })
    }
}
