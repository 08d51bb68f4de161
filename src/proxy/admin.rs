//! The admin listener: `/healthz` and `/metrics` for operators. It binds to loopback by
//! default, serves no secrets, and is separate from the agent-facing listener so an agent
//! cannot reach it by speaking to the proxy port.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::server::{accept_loop, serve_until_drained, Drain};
use super::Shared;

/// Serve the admin endpoints until `drain` says stop.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, drain: Drain) {
    accept_loop(listener, drain, move |stream, _peer, drain| {
        let shared = shared.clone();
        async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&req, &shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = serve_until_drained(conn, drain, "admin connection").await;
        }
    })
    .await;
}

fn answer(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            let agents = shared.policies.load().agents().count();
            (
                StatusCode::OK,
                "application/json",
                format!("{{\"status\":\"ok\",\"agents\":{agents}}}\n"),
            )
        }
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(shared.leaves.stats()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz or /metrics\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
