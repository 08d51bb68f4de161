//! The admin listener: `/healthz` and `/metrics` for operators, and the dashboard under
//! `/ui/` (see `ui`). It binds to loopback by default and is separate from the
//! agent-facing listener, so an agent cannot reach it by speaking to the proxy port. With
//! `--ui-listen` the dashboard gets a listener of its own that serves nothing else.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::server::{accept_loop, serve_until_drained, Drain};
use super::Shared;
use crate::ui::{self, UiBody};

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// `/healthz`, `/metrics` and the dashboard.
    Admin,
    /// The dashboard only (`--ui-listen`).
    UiOnly,
}

/// Serve the admin endpoints until `drain` says stop.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, drain: Drain, serves: Serves) {
    accept_loop(listener, drain, move |stream, _peer, drain| {
        let shared = shared.clone();
        async move {
            let conn_drain = drain.clone();
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let mut drain = conn_drain.clone();
                async move {
                    Ok::<_, Infallible>(
                        answer(req, &shared, serves, async move { drain.stopped().await }).await,
                    )
                }
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

async fn answer(
    req: Request<Incoming>,
    shared: &Shared,
    serves: Serves,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Response<UiBody> {
    let path = req.uri().path();
    if path == "/ui" || path.starts_with("/ui/") {
        let cx = ui::Context {
            policies: shared.policies.load_full(),
            revocations: &shared.revocations,
            redis: shared.redis.as_ref(),
            holds: &shared.holds,
        };
        return shared.ui.handle(req, cx, stop).await;
    }
    let (status, content_type, body) = match (req.method(), path, serves) {
        (&Method::GET, "/healthz", Serves::Admin) => {
            let agents = shared.policies.load().agents().count();
            (
                StatusCode::OK,
                "application/json",
                format!("{{\"status\":\"ok\",\"agents\":{agents}}}\n"),
            )
        }
        (&Method::GET, "/metrics", Serves::Admin) => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(shared.leaves.stats()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            match serves {
                Serves::Admin => "not found: try /healthz, /metrics or /ui/\n".to_owned(),
                Serves::UiOnly => "not found: try /ui/\n".to_owned(),
            },
        ),
    };
    let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
