//! The upstream connections of one event loop. A request drives its own connection
//! inside its own task, as nginx handles the upstream inside the same event: there is no
//! connection task to hand the request to and the answer back from, as in hyper-util's
//! pooled client (two task wake-ups per request; step 10 of the gateway section of
//! docs/BENCHMARKS.md).
//!
//! A connection is leased to one request at a time. It goes back to the pool of the
//! thread that finishes reading its answer, and is checked again before its next use.
//! hyper's `Connection` does the HTTP/1 work; this module only decides who polls it.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::uri::{PathAndQuery, Scheme};
use axum::http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle connection unused this long is closed, as hyper-util's client did.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_IDLE_PER_SERVICE: usize = 256;
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// A service's base URL, parsed once: the request's path and query are put after it.
pub struct Target {
    /// Its pool's index: cheaper to look up than the authority, hashed per byte.
    id: usize,
    /// `host:port`, the port defaulted, for connecting.
    address: String,
    host: HeaderValue,
    /// The base URL's path without its trailing slash; usually empty.
    prefix: String,
}

impl Target {
    pub fn parse(base: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let parts = base
            .parse::<Uri>()
            .with_context(|| format!("{base:?} is not a URL"))?
            .into_parts();
        let scheme = parts
            .scheme
            .with_context(|| format!("{base:?} has no scheme"))?;
        // Services are reached inside the deployment's network; TLS ends at the gateway.
        anyhow::ensure!(
            scheme == Scheme::HTTP,
            "{base:?}: services are reached over http only"
        );
        let authority = parts
            .authority
            .with_context(|| format!("{base:?} has no host"))?;
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            address: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            host: HeaderValue::from_str(authority.as_str())?,
            prefix: parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').to_owned())
                .unwrap_or_default(),
        })
    }

    /// The `Host` header for the service.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The service's path for a request to `path_and_query` at the gateway.
    pub fn path(&self, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
        let path_and_query = match (path_and_query, self.prefix.is_empty()) {
            (Some(p), true) => p.clone(),
            (p, _) => {
                let rest = p.map_or("/", PathAndQuery::as_str);
                format!("{}{rest}", self.prefix).parse().ok()?
            }
        };
        Some(Uri::from(path_and_query))
    }
}

/// Why a request got no answer from its service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting: no answer in {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[source] hyper::Error),
}

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

/// One connection to a service, held by one request at a time.
struct Lease {
    send: http1::SendRequest<Body>,
    /// Boxed once per connection, so moving the lease does not move the dispatcher.
    connection: Pin<Box<Connection>>,
    target: usize,
    idle_since: Instant,
}

impl Lease {
    /// Moves the connection's I/O on; false once it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.connection.as_mut().poll(cx).is_pending()
    }

    /// Whether it can take a request now; a closed or half-used one cannot.
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && matches!(self.send.poll_ready(cx), Poll::Ready(Ok(())))
    }

    /// Back to the pool when it can take the next request. One still busy (the service
    /// answered before the request's body was all sent) finishes that on a task of its
    /// own and then closes, so the client's upload is not left half-read in the pool.
    fn release(mut self, cx: &mut Context<'_>) {
        if !self.drive(cx) {
            return;
        }
        if matches!(self.send.poll_ready(cx), Poll::Ready(Ok(()))) {
            self.idle_since = Instant::now();
            POOL.with(|pool| pool.borrow_mut().put(self));
        } else {
            let connection = self.connection;
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }
}

#[derive(Default)]
struct Pool {
    /// Idle connections by target, the most recently used last.
    idle: Vec<Vec<Lease>>,
    sweeping: bool,
}

thread_local! {
    /// One pool per event loop, so a connection stays on the thread that uses it.
    static POOL: RefCell<Pool> = RefCell::default();
}

impl Pool {
    /// The most recently used connection that is still good.
    fn take(&mut self, target: usize, cx: &mut Context<'_>) -> Option<Lease> {
        let idle = self.idle.get_mut(target)?;
        while let Some(mut lease) = idle.pop() {
            if lease.idle_since.elapsed() < IDLE_TIMEOUT && lease.ready(cx) {
                return Some(lease);
            }
        }
        None
    }

    fn put(&mut self, lease: Lease) {
        if self.idle.len() <= lease.target {
            self.idle.resize_with(lease.target + 1, Vec::new);
        }
        let idle = &mut self.idle[lease.target];
        if idle.len() >= MAX_IDLE_PER_SERVICE {
            idle.remove(0);
        }
        idle.push(lease);
        if !self.sweeping {
            self.sweeping = true;
            tokio::spawn(sweep());
        }
    }

    /// Closes connections idle too long or closed by their service.
    fn sweep(&mut self, cx: &mut Context<'_>) {
        for idle in &mut self.idle {
            idle.retain_mut(|lease| lease.idle_since.elapsed() < IDLE_TIMEOUT && lease.drive(cx));
        }
    }
}

async fn sweep() {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // A closed connection's poll sees its EOF without waking anyone.
        let mut cx = Context::from_waker(Waker::noop());
        POOL.with(|pool| pool.borrow_mut().sweep(&mut cx));
    }
}

async fn connect(target: &Target) -> Result<Lease, Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.address))
        .await
        .map_err(|_| Error::ConnectTimeout)?
        .map_err(Error::Connect)?;
    stream.set_nodelay(true).map_err(Error::Connect)?;
    let (send, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Error::Http)?;
    Ok(Lease {
        send,
        connection: Box::pin(connection),
        target: target.id,
        idle_since: Instant::now(),
    })
}

/// Sends `request` (origin-form URI, `Host` set) to the service at `target`, on an idle
/// connection of this thread's pool or a new one. A request that a reused connection
/// closed before taking is sent again on another.
pub async fn send(
    target: &Target,
    mut request: Request<Body>,
) -> Result<Response<UpstreamBody>, Error> {
    loop {
        let idle =
            poll_fn(|cx| Poll::Ready(POOL.with(|pool| pool.borrow_mut().take(target.id, cx))))
                .await;
        let reused = idle.is_some();
        let mut lease = match idle {
            Some(lease) => lease,
            None => connect(target).await?,
        };
        let mut head = std::pin::pin!(lease.send.try_send_request(request));
        let mut open = true;
        let answer = poll_fn(|cx| {
            if open {
                open = lease.drive(cx);
            }
            // Only the connection's I/O, polled just above, completes the answer, so
            // the answer's own wake-up would be a second poll for nothing.
            let mut quiet = Context::from_waker(Waker::noop());
            head.as_mut().poll(&mut quiet)
        })
        .await;
        match answer {
            Ok(response) => {
                let lease = open.then_some(lease);
                return Ok(response.map(|incoming| UpstreamBody { incoming, lease }));
            }
            Err(mut error) => match error.take_message() {
                Some(unsent) if reused => request = unsent,
                _ => return Err(Error::Http(error.into_error())),
            },
        }
    }
}

/// A service's answer body. Reading it drives the connection; once read to the end, the
/// connection goes back to the pool. Dropped unread, the connection closes.
pub struct UpstreamBody {
    incoming: Incoming,
    lease: Option<Lease>,
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(lease) = &mut this.lease
            && !lease.drive(cx)
        {
            this.lease = None;
        }
        let frame = Pin::new(&mut this.incoming).poll_frame(cx);
        if let Poll::Ready(None) = frame
            && let Some(lease) = this.lease.take()
        {
            lease.release(cx);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        // With a lease held, the reader must poll to the end so it can be returned.
        self.lease.is_none() && self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A service on a real socket answering `ok` to each request, counting the
    /// connections it accepts. With `close_after_each`, it closes each connection after
    /// its answer (without saying so in the answer) and then reports it on `closed`.
    async fn service(
        close_after_each: bool,
    ) -> (
        Target,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = Target::parse(&format!("http://{}", listener.local_addr().expect("addr")))
            .expect("target");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.clear();
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                        if close_after_each {
                            drop(socket);
                            let _ = closed_tx.send(());
                            return;
                        }
                    }
                });
            }
        });
        (target, accepted, closed)
    }

    async fn get(target: &Target) -> String {
        let request = Request::builder()
            .uri("/")
            .header(axum::http::header::HOST, target.host())
            .body(Body::empty())
            .expect("request");
        let response = send(target, request).await.expect("an answer");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8(body.to_bytes().to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn a_connection_is_used_again_once_its_answer_is_read() {
        let (target, accepted, _) = service(false).await;
        for _ in 0..3 {
            assert_eq!(get(&target).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_while_idle_is_not_used() {
        let (target, accepted, mut closed) = service(true).await;
        assert_eq!(get(&target).await, "ok");
        closed
            .recv()
            .await
            .expect("the service closed the connection");
        // The pooled connection is dead: the request goes on a new one, not to a 502.
        assert_eq!(get(&target).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_dropped_unread_closes_its_connection() {
        let (target, accepted, _) = service(false).await;
        let request = Request::builder()
            .uri("/")
            .header(axum::http::header::HOST, target.host())
            .body(Body::empty())
            .expect("request");
        drop(send(&target, request).await.expect("an answer"));
        assert_eq!(get(&target).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_request_goes_to_the_same_path_and_query_under_the_service_base_url() {
        let pq = |s: &str| s.parse::<PathAndQuery>().expect("path");
        let plain = Target::parse("http://127.0.0.1:8081").expect("base");
        assert_eq!(
            plain.path(Some(&pq("/api/v1/users/me?x=1"))).expect("uri"),
            "/api/v1/users/me?x=1"
        );
        assert_eq!(plain.path(None).expect("uri"), "/");
        assert_eq!(plain.host(), "127.0.0.1:8081");
        assert_eq!(plain.address, "127.0.0.1:8081");

        let prefixed = Target::parse("http://svc.internal/user/").expect("base");
        assert_eq!(
            prefixed.path(Some(&pq("/api/v1/users/me"))).expect("uri"),
            "/user/api/v1/users/me"
        );
        assert_eq!(prefixed.host(), "svc.internal");
        assert_eq!(prefixed.address, "svc.internal:80");

        assert!(Target::parse("127.0.0.1:8081/no-scheme").is_err());
        assert!(
            Target::parse("https://svc.internal").is_err(),
            "TLS ends at the gateway"
        );
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_body_is_not_used_again() {
        // The service answers as soon as it has read a request's head, as one refusing
        // an upload does; the request's body is still coming.
        let (target, accepted, _) = service(false).await;
        let (more, chunks) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let body = futures_util::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, std::io::Error>(chunk), chunks))
        });
        let request = Request::builder()
            .method("POST")
            .uri("/upload")
            .header(axum::http::header::HOST, target.host())
            .body(Body::from_stream(body))
            .expect("request");
        let response = send(&target, request).await.expect("an answer");
        let answer = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&answer[..], b"ok");

        // Were that connection pooled, this request would go out in the middle of the
        // upload's chunked body.
        assert_eq!(get(&target).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        more.send(Bytes::from_static(b"rest of the upload"))
            .expect("still sending");
    }
}
