//! A small HTTP/1 listener for operators: `GET /metrics` (Prometheus text) and
//! `GET /status` (JSON: log head, write refusal, policy version, span export lag).
//!
//! Loopback only (checked by the server before binding): it is unauthenticated, and what it
//! shows (activity, lag, errors) is for the operators of this host. Scrape remotely through
//! OTLP metrics or a local agent.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;

use super::metrics::Metrics;
use crate::listener::Acceptor;

/// A client must send its request headers within this (the first request's, and each next
/// one's on a kept-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the `/status` document when asked.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Serves until `stopping` becomes true. `listener` caps connections
/// ([`crate::listener::HTTP_LISTENER_CONNECTIONS`], more are refused at once) and waits out
/// a lack of file descriptors; each connection holds its slot until it ends.
pub async fn serve(
    mut listener: Acceptor,
    metrics: Arc<Metrics>,
    status: StatusFn,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let (stream, _, slot) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let metrics = metrics.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&request, &metrics, &status);
                async move { Ok::<_, Infallible>(answer) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics listener: connection ended");
            }
            drop(slot);
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    metrics: &Metrics,
    status: &StatusFn,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => match metrics.render() {
            Ok(text) => Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(text)))
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, String::new())),
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/status" => {
            let body = serde_json::to_vec_pretty(&status()).unwrap_or_default();
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, String::new()))
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "countersign serves /metrics and /status here\n".into(),
        ),
    }
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
}
