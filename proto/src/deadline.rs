//! Client deadlines answered as gRPC requires: a request whose `grpc-timeout` expires on the server is
//! answered `DEADLINE_EXCEEDED`.
//!
//! tonic's server enforces `grpc-timeout` itself but answers `CANCELLED` ("Timeout expired"), which the
//! gRPC status-code table reserves for a cancellation by the caller. [`DeadlineLayer`] sits inside
//! tonic's own timeout (a server layer) and expires [`DEADLINE_MARGIN`] earlier, so the answer a client
//! sees is `DEADLINE_EXCEEDED`; tonic's timer stays as the backstop. The header is parsed by the rules
//! of the gRPC HTTP/2 protocol: at most [`MAX_TIMEOUT_DIGITS`] ASCII digits and one unit of `H M S m u n`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

/// The request header that carries a client's deadline.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";
/// Most digits a `grpc-timeout` value may have (the gRPC protocol's `TimeoutValue`).
pub const MAX_TIMEOUT_DIGITS: usize = 8;
/// How much earlier than tonic's own timer this layer answers.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Parses a `grpc-timeout` value (`"250m"`, `"5S"`, …). `None` for anything else.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > MAX_TIMEOUT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The tower layer; add it with `Server::builder().layer(DeadlineLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Deadline<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let timeout = req.headers().get(GRPC_TIMEOUT_HEADER).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Some(timeout) = timeout else { return fut.await };
            match tokio::time::timeout(timeout.saturating_sub(DEADLINE_MARGIN), fut).await {
                Ok(r) => r,
                Err(_) => Ok(Status::deadline_exceeded(format!("deadline of {timeout:?} exceeded")).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn timeouts_parse_by_the_grpc_rules() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "5", "5x", "-5m", "123456789m", "5 m", "５m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_expired_deadline_is_deadline_exceeded() {
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let req = http::Request::builder().header(GRPC_TIMEOUT_HEADER, "50m").body(()).unwrap();
        let resp = svc.call(req).await.unwrap();
        let status = Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        // Without a deadline the request runs to completion.
        let fast = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new("ok".to_string()))
        });
        let mut svc = DeadlineLayer.layer(fast);
        let resp = svc.call(http::Request::new(())).await.unwrap();
        assert_eq!(resp.body(), "ok");
    }
}
