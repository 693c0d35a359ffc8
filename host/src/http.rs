//! The host's HTTP endpoint: Prometheus metrics and a liveness check.
//!
//! `rebound run --http ADDR` serves it; it binds where it is told (use a loopback address
//! unless a scraper elsewhere needs it).
//!
//! | route      | answers                                                    |
//! |------------|------------------------------------------------------------|
//! | `/metrics` | every metric in Prometheus's text format                   |
//! | `/healthz` | `ok` while the host process runs                           |

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// The content type of Prometheus's text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes, rendering metrics from `metrics`.
pub fn router(metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics)
}

async fn render_metrics(State(metrics): State<PrometheusHandle>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render())
}

/// Binds `addr` now (so a taken port is a start-up error) and returns the server, which runs
/// until dropped, with the address it listens on. Histogram upkeep runs alongside it.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let local = listener.local_addr()?;
    let upkeep = metrics.clone();
    let server = async move {
        let upkeep = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        };
        let serve = axum::serve(listener, router(metrics));
        tokio::select! {
            result = serve => {
                if let Err(err) = result {
                    tracing::error!(error = %err, "HTTP server stopped");
                }
            }
            () = upkeep => {}
        }
    };
    Ok((local, server))
}
