//! The host's HTTP API: submit and inspect tasks, queue stats, the host's plugins, health,
//! and Prometheus metrics.
//!
//! `rebound run --http ADDR` (or `http.listen`) serves it; bind it to a loopback address
//! unless something elsewhere needs it. With `http.token` set, every `/v1` route but the
//! OpenAPI description asks for `Authorization: Bearer TOKEN`. The routes and shapes are in
//! `docs/openapi.json`, also served at `/v1/openapi.json`.
//!
//! Every error is JSON, `{"error": {"code": "...", "message": "..."}}`, with a code that
//! stays the same from version to version (see [`ApiError`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::runtime::plugin::LivePlugins;
use crate::store::{SharedStore, Store, StoreError};
use crate::task::{NewTask, TaskState};

/// The content type of Prometheus's text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The OpenAPI description of these routes, kept in the repository.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// The most tasks one listing page may hold.
const MAX_PAGE: usize = 1000;

/// The largest request body taken (axum's default for JSON bodies).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// How long a request waits for the store before it fails with `store_unavailable`.
const STORE_WAIT: Duration = Duration::from_secs(3);

/// What the API serves from.
pub struct Api {
    /// Where tasks live.
    pub store: SharedStore,
    /// This host's plugins as they are now, with the files that failed to load; `/readyz`
    /// reports the host not ready while any file fails.
    pub plugins: LivePlugins,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The bearer token `/v1` routes ask for; none when `None`.
    pub token: Option<String>,
}

type Shared = Arc<Api>;

/// An error answer: an HTTP status and a stable code, with a message for people.
///
/// | code                | status | when                                              |
/// |---------------------|--------|---------------------------------------------------|
/// | `invalid_request`   | 400    | a body, parameter or value the API cannot accept  |
/// | `invalid_cursor`    | 400    | a listing cursor no listing handed out            |
/// | `unauthorized`      | 401    | a token is required and was missing or wrong      |
/// | `not_found`         | 404    | no such task, or no such route                    |
/// | `method_not_allowed`| 405    | the route exists, not with this method            |
/// | `too_large`         | 413    | a request body over 2 MiB                         |
/// | `duplicate_id`      | 409    | a task with the submitted id exists               |
/// | `wrong_state`       | 409    | the task's state does not allow the request       |
/// | `internal`          | 500    | a bug; the message says what                      |
/// | `store_unavailable` | 503    | the store did not answer; try again               |
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let (status, code) = match &err {
            StoreError::DuplicateId { .. } => (StatusCode::CONFLICT, "duplicate_id"),
            StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
            StoreError::InvalidCursor { .. } => (StatusCode::BAD_REQUEST, "invalid_cursor"),
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            StoreError::Backend { .. } => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            StoreError::LeaseLost { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, err.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body: larger than {MAX_BODY_BYTES} bytes"),
            );
        }
        ApiError::invalid(format!("request body: {}", rejection.body_text()))
    }
}

/// `store_call`, given [`STORE_WAIT`] to answer; past that the request fails with
/// `store_unavailable` instead of hanging while the store reconnects.
async fn within<T>(
    store_call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(STORE_WAIT, store_call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!(
                "the store did not answer within {} s; a submission may or may not have \
                 been made (submit again with the same id to find out)",
                STORE_WAIT.as_secs()
            ),
        )),
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(format!("query string: {}", rejection.body_text()))
    }
}

/// The routes.
pub fn router(api: Api) -> Router {
    let api: Shared = Arc::new(api);
    let v1 = Router::new()
        .route("/queues/{queue}/tasks", post(submit).get(list))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/cancel", post(cancel))
        .route("/tasks/{id}/retry", post(retry))
        .route("/stats", get(stats))
        .route("/plugins", get(plugins))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(render_metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|request: Request| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {} {}", request.method(), request.uri().path()),
            )
        })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} is not allowed on {}",
                    request.method(),
                    request.uri().path()
                ),
            )
        })
        .with_state(api)
}

/// Refuses a `/v1` request without the configured bearer token.
async fn require_token(
    State(api): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &api.token else {
        return next.run(request).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            // The scheme's name is case-insensitive (RFC 9110 section 11.1).
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this host requires `Authorization: Bearer TOKEN`",
        )
        .into_response(),
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A submission as the API's `POST /v1/queues/{queue}/tasks` body and each line of
/// `rebound submit --file` give it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The parameters, any JSON value; `{}` when absent.
    #[serde(default)]
    pub params: Option<Value>,
    /// The task's id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Wait this long before the task may run, in ms.
    #[serde(default)]
    pub delay_ms: u64,
    /// The task's own retry policy.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// Free GPU memory needed, in GiB.
    #[serde(default)]
    pub min_gpu_memory_gb: Option<f64>,
    /// Highest GPU utilization, in percent.
    #[serde(default)]
    pub max_gpu_utilization: Option<f64>,
    /// The replaced framework's name for `max_gpu_utilization` (it meant "at most"); taken
    /// with a warning in the log.
    #[serde(default)]
    pub min_gpu_utilization: Option<f64>,
}

impl SubmitRequest {
    /// Reads a request from its JSON form, which must be an object (serde would also take
    /// an array of the fields in order, which nobody means).
    pub fn from_json(value: Value) -> Result<Self, String> {
        if !value.is_object() {
            return Err(format!(
                "expected a JSON object with `params` and optional `id`, `priority`, \
                 `delay_ms`, `retry`, `min_gpu_memory_gb`, `max_gpu_utilization`; got {}",
                json_kind(&value)
            ));
        }
        serde_json::from_value(value).map_err(|err| err.to_string())
    }

    /// The task this asks for in `queue`; an error names what is wrong with the GPU
    /// requirement (the store checks the rest).
    pub fn into_new_task(self, queue: &str) -> Result<NewTask, String> {
        let utilization = match (self.max_gpu_utilization, self.min_gpu_utilization) {
            (Some(_), Some(_)) => {
                return Err("max_gpu_utilization and its deprecated alias \
                            min_gpu_utilization are both given; keep max_gpu_utilization"
                    .to_owned());
            }
            (None, Some(old)) => {
                tracing::warn!(
                    "min_gpu_utilization is deprecated: it means \"start only while utilization \
                     is at most this\"; name it max_gpu_utilization"
                );
                Some(old)
            }
            (max, None) => max,
        };
        let gpu = match (self.min_gpu_memory_gb, utilization) {
            (None, None) => None,
            (memory, utilization) => Some(GpuRequirement::from_settings(memory, utilization)?),
        };
        Ok(NewTask {
            queue: queue.to_owned(),
            id: self.id,
            params: self.params.unwrap_or_else(|| json!({})).to_string(),
            priority: self.priority,
            delay_ms: self.delay_ms,
            retry: self.retry,
            gpu,
        })
    }
}

async fn submit(
    State(api): State<Shared>,
    Path(queue): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let body = SubmitRequest::from_json(body)
        .map_err(|err| ApiError::invalid(format!("request body: {err}")))?;
    let task = body.into_new_task(&queue).map_err(ApiError::invalid)?;
    let task = within(api.store.create(task)).await?;
    crate::metrics::task_created(&queue);
    Ok((StatusCode::CREATED, Json(task)).into_response())
}

async fn get_task(State(api): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match within(api.store.get(&id)).await? {
        Some(task) => Ok(Json(task).into_response()),
        None => Err(StoreError::NotFound { id }.into()),
    }
}

async fn cancel(State(api): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let state = within(api.store.cancel(&id)).await?;
    Ok(Json(json!({ "id": id, "state": state })).into_response())
}

async fn retry(State(api): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let task = within(api.store.retry(&id)).await?;
    Ok(Json(task).into_response())
}

/// The query of a listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(api): State<Shared>,
    Path(queue): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let state: TaskState = match query.state.as_deref() {
        None => TaskState::Pending,
        Some(state) => state.parse().map_err(ApiError::invalid)?,
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit} is out of range: 1 to {MAX_PAGE}"
        )));
    }
    let page = within(
        api.store
            .list(&queue, state, limit, query.cursor.as_deref()),
    )
    .await?;
    Ok(Json(json!({ "tasks": page.tasks, "next": page.next })).into_response())
}

/// Every queue's counts by state, and the running hosts' reports: what `GET /v1/stats` and
/// `rebound stats --json` print.
pub async fn stats_json(store: &dyn Store) -> Result<Value, StoreError> {
    let mut queues = serde_json::Map::new();
    for queue in store.queues().await? {
        let counts = store.counts(&queue).await?;
        queues.insert(queue, json!(counts));
    }
    let hosts = store.hosts().await?;
    Ok(json!({ "queues": queues, "hosts": hosts }))
}

async fn stats(State(api): State<Shared>) -> Result<Response, ApiError> {
    Ok(Json(within(stats_json(api.store.as_ref())).await?).into_response())
}

async fn plugins(State(api): State<Shared>) -> Json<Value> {
    let plugins: Vec<Value> = api
        .plugins
        .current()
        .iter()
        .map(|plugin| {
            json!({
                "name": plugin.name(),
                "queue": plugin.queue(),
                "version": plugin.version(),
                "path": plugin.path(),
                "gpu": plugin.gpu(),
            })
        })
        .collect();
    Json(json!({ "plugins": plugins }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn readyz(State(api): State<Shared>) -> Response {
    let mut reasons = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(2), api.store.queues()).await;
    match answered {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => reasons.push(format!("the store does not answer: {err}")),
        Err(_) => reasons.push("the store did not answer within 2 s".to_owned()),
    }
    let plugins = api.plugins.current();
    if plugins.is_empty() {
        reasons.push("no plugin is loaded".to_owned());
    }
    reasons.extend(plugins.failures().map(str::to_owned));
    if reasons.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        let body = json!({ "status": "not_ready", "reasons": reasons });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn render_metrics(State(api): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        api.metrics.render(),
    )
        .into_response()
}

/// Binds `addr` now (so a taken port is a start-up error) and returns the server, which runs
/// until dropped, with the address it listens on. Histogram upkeep runs alongside it.
pub async fn serve(
    addr: SocketAddr,
    api: Api,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let local = listener.local_addr()?;
    let upkeep = api.metrics.clone();
    let app = router(api);
    let server = async move {
        let upkeep = async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        };
        tokio::select! {
            result = axum::serve(listener, app) => {
                if let Err(err) = result {
                    tracing::error!(error = %err, "HTTP server stopped");
                }
            }
            () = upkeep => {}
        }
    };
    Ok((local, server))
}

/// What kind of JSON value this is, for error messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
