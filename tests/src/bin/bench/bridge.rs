//! The floor under the gateway: a bare HTTP-to-JetStream bridge. For each `POST` it makes
//! exactly the gateway's one create-if-absent publish of the same request message (the raw
//! baseline's `publish_as_gateway`, built by the gateway's own `Submission::message`) and answers `202` with the
//! operation's id; nothing else: no routing, no tenants, no limits, no tracing, no metrics. The
//! benchmark runs it as a process of its own (`bench --bridge <nats-url>`), like the gateway, and
//! drives it with the same HTTP load, so that the gateway's cost is read against the least any
//! HTTP front door on this broker must spend, not against a raw client that speaks no HTTP.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use handlers::contract::Subjects;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::clients::publish_as_gateway;

/// Serves on an ephemeral loopback port, printed first on stdout, until killed.
pub async fn serve(nats_url: &str) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let bridge = Arc::new(Bridge {
        js,
        subjects: Subjects::default(),
        route: super::bench_route(),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let bridge = bridge.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let bridge = bridge.clone();
                async move { Ok::<_, Infallible>(bridge.accept(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Bridge {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    route: gateway::config::RouteConfig,
}

impl Bridge {
    async fn accept(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(|k| k.trim_matches('"').to_owned())
            .unwrap_or_default();
        let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
            return answer(StatusCode::BAD_REQUEST, Bytes::new());
        };
        let written = publish_as_gateway(&self.js, &self.subjects, &self.route, key, &body).await;
        match written {
            Some(id) => answer(
                StatusCode::ACCEPTED,
                Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
            ),
            None => answer(StatusCode::SERVICE_UNAVAILABLE, Bytes::new()),
        }
    }
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}
