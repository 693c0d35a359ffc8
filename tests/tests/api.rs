//! The host's HTTP API, route by route: each success and each error code, on a real store
//! (Redis, a Redis cluster, the embedded file) with real compiled plugins.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use metrics_exporter_prometheus::PrometheusBuilder;
use rebound::gpu::GpuRequirement;
use rebound::http::{Api, router};
use rebound::runtime::{PluginSet, Runtime};
use rebound::store::SharedStore;
use rebound_tests::{Backend, RedisServer, TestStore, plugin_dir};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The API over `store`, serving the `echo` plugin with a GPU requirement from its manifest.
fn api(store: SharedStore, token: Option<&str>) -> (Router, tempfile::TempDir) {
    let dir = plugin_dir(&["echo"]);
    std::fs::write(
        dir.path().join("echo.toml"),
        "[gpu]\nmax_gpu_utilization = 90\n",
    )
    .unwrap();
    let runtime = Runtime::new(Default::default()).unwrap();
    let (plugins, errors) =
        PluginSet::load_dir(&runtime, dir.path(), &Default::default(), &BTreeMap::new()).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let api = Api {
        store,
        plugins: plugins.into(),
        metrics: PrometheusBuilder::new().build_recorder().handle(),
        token: token.map(str::to_owned),
    };
    (router(api), dir)
}

/// One request; the status and the body, parsed as JSON when it is JSON.
async fn call(app: &Router, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_with(app, method, uri, body, None).await
}

async fn call_with(
    app: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// Asserts an error answer: its status and its stable code.
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

async fn submit_get_and_list(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (app, _dir) = api(ts.store.clone(), None);

    let body = json!({
        "params": {"n": 1}, "id": "t1", "priority": 5, "delay_ms": 0,
        "retry": {"backoff": "fixed", "max_retry_count": 1},
        "min_gpu_memory_gb": 0.5
    });
    let (status, task) = call(&app, Method::POST, "/v1/queues/echo/tasks", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["id"], "t1");
    assert_eq!(task["state"], "pending");
    assert_eq!(task["params"], r#"{"n":1}"#);
    assert_eq!(task["gpu"]["memory_bytes"], 1u64 << 29);
    // The old framework's name for the utilization limit still works.
    let old = json!({"min_gpu_utilization": 40});
    let (status, aliased) = call(&app, Method::POST, "/v1/queues/echo/tasks", Some(old)).await;
    assert_eq!(status, StatusCode::CREATED, "{aliased}");
    assert_eq!(aliased["gpu"]["max_utilization"], 40);
    ts.store
        .cancel(aliased["id"].as_str().unwrap())
        .await
        .unwrap();
    // Everything but the queue is optional.
    let (status, plain) = call(&app, Method::POST, "/v1/queues/echo/tasks", Some(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(plain["params"], "{}");

    let (status, got) = call(&app, Method::GET, "/v1/tasks/t1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["priority"], 5);

    let (status, page) = call(&app, Method::GET, "/v1/queues/echo/tasks?limit=1", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap().to_owned();
    let uri = format!("/v1/queues/echo/tasks?state=pending&limit=10&cursor={next}");
    let (status, rest) = call(&app, Method::GET, &uri, None).await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    let mut seen: Vec<String> = [&page, &rest]
        .iter()
        .flat_map(|p| p["tasks"].as_array().unwrap().clone())
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let mut expected = vec!["t1".to_owned(), plain["id"].as_str().unwrap().to_owned()];
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(rest["next"], Value::Null);

    let (status, stats) = call(&app, Method::GET, "/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["queues"]["echo"]["pending"], 2, "{stats}");
    assert!(stats["hosts"].is_array());

    let (status, plugins) = call(&app, Method::GET, "/v1/plugins", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plugins["plugins"][0]["name"], "echo");
    let gpu: GpuRequirement = serde_json::from_value(plugins["plugins"][0]["gpu"].clone()).unwrap();
    assert_eq!(gpu.max_utilization, Some(90));
}

async fn submissions_the_store_refuses_name_what_is_wrong(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (app, _dir) = api(ts.store.clone(), None);
    let submit = |body: Value| call(&app, Method::POST, "/v1/queues/echo/tasks", Some(body));

    let answer = submit(json!({"params": 1, "id": "same"})).await;
    assert_eq!(answer.0, StatusCode::CREATED);
    assert_error(
        &submit(json!({"id": "same"})).await,
        StatusCode::CONFLICT,
        "duplicate_id",
    );

    let cases = [
        (json!({"priority": 5000}), "priority"),
        (json!({"id": "has space"}), "task id"),
        (json!({"prams": {}}), "prams"),
        (json!({"min_gpu_memory_gb": -1}), "min_gpu_memory_gb"),
        (json!({"max_gpu_utilization": 120}), "max_gpu_utilization"),
        (json!({"retry": {"backoff": "sometimes"}}), "sometimes"),
        (
            json!({"min_gpu_utilization": 1, "max_gpu_utilization": 1}),
            "both",
        ),
        // serde would read an array as the fields in order; nobody means that.
        (json!([{"a": 1}, "id-from-array"]), "got an array"),
        (json!("params"), "got a string"),
    ];
    for (body, named) in cases {
        let answer = submit(body.clone()).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
        let message = answer.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{body}: {message}");
    }
    let answer = call(
        &app,
        Method::POST,
        "/v1/queues/no:colon/tasks",
        Some(json!({})),
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");

    // A body that is not JSON at all.
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/queues/echo/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A body over the limit is 413 with its own code.
    let huge = json!({"params": "x".repeat(3 * 1024 * 1024)});
    assert_error(
        &submit(huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );

    // Nothing was created by the refused submissions.
    assert_eq!(ts.store.counts("echo").await.unwrap().pending, 1);
}

async fn cancel_and_retry_follow_the_task_state(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (app, _dir) = api(ts.store.clone(), None);
    call(
        &app,
        Method::POST,
        "/v1/queues/echo/tasks",
        Some(json!({"id": "c"})),
    )
    .await;

    // Only failed or canceled tasks can be retried.
    let answer = call(&app, Method::POST, "/v1/tasks/c/retry", None).await;
    assert_error(&answer, StatusCode::CONFLICT, "wrong_state");

    let (status, canceled) = call(&app, Method::POST, "/v1/tasks/c/cancel", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(canceled, json!({"id": "c", "state": "canceled"}));
    let again = call(&app, Method::POST, "/v1/tasks/c/cancel", None).await;
    assert_error(&again, StatusCode::CONFLICT, "wrong_state");

    let (status, retried) = call(&app, Method::POST, "/v1/tasks/c/retry", None).await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["state"], "pending");

    for uri in [
        "/v1/tasks/nope",
        "/v1/tasks/nope/cancel",
        "/v1/tasks/nope/retry",
    ] {
        let method = if uri.ends_with("nope") {
            Method::GET
        } else {
            Method::POST
        };
        assert_error(
            &call(&app, method, uri, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
}

async fn listing_errors_name_the_parameter(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (app, _dir) = api(ts.store.clone(), None);
    let cases = [
        ("/v1/queues/echo/tasks?state=done", "done"),
        ("/v1/queues/echo/tasks?limit=0", "limit"),
        ("/v1/queues/echo/tasks?limit=many", "limit"),
        ("/v1/queues/echo/tasks?colour=red", "colour"),
    ];
    for (uri, named) in cases {
        let answer = call(&app, Method::GET, uri, None).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
        let message = answer.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{uri}: {message}");
    }
    let answer = call(
        &app,
        Method::GET,
        "/v1/queues/echo/tasks?cursor=bogus",
        None,
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_cursor");
}

async fn token_health_metrics_and_unknown_routes(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (app, _dir) = api(ts.store.clone(), Some("s3cret"));

    let missing = call(&app, Method::GET, "/v1/stats", None).await;
    assert_error(&missing, StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong = call_with(&app, Method::GET, "/v1/stats", None, Some("guess")).await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, _) = call_with(&app, Method::GET, "/v1/stats", None, Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    // The scheme's name is case-insensitive.
    let request = Request::builder()
        .uri("/v1/stats")
        .header(header::AUTHORIZATION, "bearer s3cret")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Health, metrics and the API's description need no token.
    assert_eq!(
        call(&app, Method::GET, "/healthz", None).await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    assert_eq!(
        call(&app, Method::GET, "/readyz", None).await,
        (StatusCode::OK, json!({"status": "ready"}))
    );
    let (status, metrics) = call(&app, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.is_string(), "{metrics}");
    let (status, spec) = call(&app, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/queues/{queue}/tasks",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/tasks/{id}/retry",
        "/v1/stats",
        "/v1/plugins",
        "/v1/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "the OpenAPI description lacks {path}"
        );
    }

    let unknown = call(&app, Method::GET, "/v2/things", None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
    let method = call(&app, Method::DELETE, "/healthz", None).await;
    assert_error(
        &method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

rebound_tests::on_both_stores!(
    submit_get_and_list,
    submissions_the_store_refuses_name_what_is_wrong,
    cancel_and_retry_follow_the_task_state,
    listing_errors_name_the_parameter,
    token_health_metrics_and_unknown_routes,
);

/// A store that stops answering: requests fail with 503 and a stable code, `/readyz` says
/// why, and both recover when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_503_until_it_is_back() {
    rebound_tests::init_logging();
    let mut redis = RedisServer::start().unwrap();
    let store = rebound::store::redis::RedisStore::connect(&redis.url())
        .await
        .unwrap();
    let (app, _dir) = api(std::sync::Arc::new(store), None);
    call(
        &app,
        Method::POST,
        "/v1/queues/echo/tasks",
        Some(json!({"id": "kept"})),
    )
    .await;

    redis.kill();
    let answer = call(&app, Method::GET, "/v1/tasks/kept", None).await;
    assert_error(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    );
    let (status, ready) = call(&app, Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["status"], "not_ready");

    redis.restart().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, ready) = call(&app, Method::GET, "/readyz", None).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A plugin file that failed to load keeps the host from being ready, and `/readyz` says
/// which and why.
#[tokio::test]
async fn a_plugin_that_failed_to_load_is_not_ready() {
    let dir = plugin_dir(&["echo"]);
    std::fs::write(dir.path().join("broken.wasm"), b"not a component").unwrap();
    let runtime = Runtime::new(Default::default()).unwrap();
    let (plugins, errors) =
        PluginSet::load_dir(&runtime, dir.path(), &Default::default(), &BTreeMap::new()).unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let path = tempfile::tempdir().unwrap();
    let store =
        rebound::store::embedded::EmbeddedStore::open(&path.path().join("tasks.db")).unwrap();
    let app = router(Api {
        store: std::sync::Arc::new(store),
        plugins: plugins.into(),
        metrics: PrometheusBuilder::new().build_recorder().handle(),
        token: None,
    });
    let (status, ready) = call(&app, Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    let reasons = ready["reasons"].to_string();
    assert!(reasons.contains("broken.wasm"), "{reasons}");
}
