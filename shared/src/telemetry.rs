//! Logging and the trace context that follows one request through every service:
//! HTTP `traceparent`/`X-Request-Id` in, AMQP headers out, and back in on the consumer.

use tracing_subscriber::{EnvFilter, fmt as tfmt, prelude::*};

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber: JSON outside development, text in development.
/// Safe to call more than once (tests start several services in one process).
pub fn init(settings: &Settings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.log.filter.clone()));
    let json = match settings.log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !settings.is_development(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(json_layer(std::io::stdout)).try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        registry
            .with(tfmt::layer().compact().with_ansi(ansi))
            .try_init()
    };
    // Already installed: keep the first one.
    drop(result);
}

/// The production log format: one JSON object per line, the event's fields at the top
/// level and the current span's fields under `span` (an HTTP request's `request_id`, a
/// consumed message's `correlation_id`, `event_type`, `event_id`). Tests use it with their
/// own writer to check what operators will grep for.
pub fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tfmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tfmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
}

/// Installs the production JSON format writing to `writer` (a test capturing the logs
/// operators would read). False when a subscriber was already installed.
pub fn init_json_with_writer<W>(filter: &str, writer: W) -> bool
where
    W: for<'w> tfmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(EnvFilter::new(filter))
        .with(json_layer(writer))
        .try_init()
        .is_ok()
}

/// Names the saga (the order id) a request works on, on the request's log span, so
/// `correlation_id=<order id>` finds the request as well as every event it caused.
pub fn record_correlation_id(id: impl std::fmt::Display) {
    tracing::Span::current().record("correlation_id", tracing::field::display(id));
}

/// Installs a test subscriber writing to the test harness, only when `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn"));
        drop(
            tracing_subscriber::registry()
                .with(filter)
                .with(tfmt::layer().compact().with_test_writer())
                .try_init(),
        );
    }
}

/// W3C trace context (`traceparent`) plus our request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
    pub request_id: Option<String>,
}

tokio::task_local! {
    // Shared: the scope moves its value into the thread and out again at every poll.
    static CURRENT: std::sync::Arc<TraceContext>;
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut bytes = [0u8; N];
        fastrand::fill(&mut bytes);
        if bytes.iter().any(|b| *b != 0) {
            return bytes;
        }
    }
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl TraceContext {
    /// A new trace, for work that did not arrive with one.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            sampled: true,
            request_id: None,
        }
    }

    /// Parses a `traceparent` header (version 00); `None` when it is not valid.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let trace_id = parse_hex::<16>(parts.next()?)?;
        let span_id = parse_hex::<8>(parts.next()?)?;
        let flags = parse_hex::<1>(parts.next()?)?;
        if version != "00" || parts.next().is_some() {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
            request_id: None,
        })
    }

    /// The same trace, a new span: what this process does on behalf of the parent.
    pub fn child(&self) -> Self {
        Self {
            span_id: random_nonzero(),
            ..self.clone()
        }
    }

    pub fn with_request_id(mut self, request_id: Option<String>) -> Self {
        self.request_id = request_id;
        self
    }

    pub fn trace_id(&self) -> String {
        crate::hex(&self.trace_id)
    }

    /// `00-<trace id>-<span id>-<flags>`, built in place: it goes out with every request
    /// and event, and formatting it byte by byte cost the gateway a seventh of its time.
    pub fn traceparent(&self) -> String {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        // The slices are exactly twice the ids' lengths, so encoding cannot fail.
        let _ = hex::encode_to_slice(self.trace_id, &mut out[3..35]);
        let _ = hex::encode_to_slice(self.span_id, &mut out[36..52]);
        out[54] = if self.sampled { b'1' } else { b'0' };
        // Hex digits and dashes only, so always UTF-8 (and checked fast as ASCII).
        String::from_utf8(out.to_vec()).unwrap_or_default()
    }

    /// The context of the task running now, if one was set.
    pub fn current() -> Option<Self> {
        Self::with_current(Self::clone)
    }

    /// `f` of the context of the task running now, if one was set, without a copy.
    pub fn with_current<R>(f: impl FnOnce(&Self) -> R) -> Option<R> {
        CURRENT.try_with(|current| f(current)).ok()
    }

    /// Runs `fut` with this context as the current one.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(std::sync::Arc::new(self), fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(header).expect("valid");
        assert_eq!(ctx.traceparent(), header);
        let child = ctx.child();
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(child.traceparent(), header);

        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let ctx = TraceContext::parse(unsampled).expect("valid");
        assert_eq!(ctx.traceparent(), unsampled);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn current_is_set_only_inside_the_scope() {
        assert!(TraceContext::current().is_none());
        let ctx = TraceContext::new_root().with_request_id(Some("r1".into()));
        let seen = ctx.clone().scope(async { TraceContext::current() }).await;
        assert_eq!(seen, Some(ctx));
    }
}
