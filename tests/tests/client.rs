//! The library API of the replaced framework's users: mark processing, update progress, mark
//! completed and mark failed, on both stores, through the same leases as a host.

use std::time::Duration;

use rebound::client::Client;
use rebound::store::StoreError;
use rebound::task::{NewTask, TaskState};
use rebound_tests::{Backend, TestStore};

fn waiting(id: &str, delay_ms: u64) -> NewTask {
    NewTask {
        id: Some(id.to_owned()),
        delay_ms,
        ..NewTask::new("manual", "{}")
    }
}

async fn work_done_outside_a_plugin_goes_through_a_lease(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let client = Client::new(ts.store.clone(), "worker-1");
    // Delayed, yet marking it processing starts it at once.
    client.submit(waiting("job", 60_000)).await.unwrap();

    let attempt = client.mark_processing("job").await.unwrap();
    assert_eq!(attempt.task.state, TaskState::Running);
    assert_eq!(attempt.task.attempt, 1);
    assert_eq!(attempt.task.lease.as_ref().unwrap().owner, "worker-1");

    client.update_progress(&attempt, 40).await.unwrap();
    client.update_progress(&attempt, 10).await.unwrap();
    let err = client.update_progress(&attempt, 101).await.unwrap_err();
    assert!(err.to_string().contains("progress 101"), "{err}");
    assert_eq!(client.get("job").await.unwrap().unwrap().progress, 40);

    let err = client
        .mark_completed(&attempt, "not json")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    client
        .mark_completed(&attempt, r#"{"done":true}"#)
        .await
        .unwrap();
    let task = client.get("job").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result.as_deref(), Some(r#"{"done":true}"#));

    // Only waiting tasks can be marked processing.
    let err = client.mark_processing("job").await.unwrap_err();
    assert!(err.to_string().contains("it is completed"), "{err}");
    let err = client.mark_processing("nope").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

async fn marked_failures_retry_or_end_the_task(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let client = Client::new(ts.store.clone(), "worker-1");
    client.submit(waiting("flaky-job", 0)).await.unwrap();

    let first = client.mark_processing("flaky-job").await.unwrap();
    let state = client
        .mark_retry(&first, "busy", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(state, TaskState::Retrying);
    // A stale attempt can report nothing once the task moved on.
    assert!(client.mark_completed(&first, "{}").await.is_err());

    let second = client.mark_processing("flaky-job").await.unwrap();
    assert_eq!(second.task.attempt, 2);
    let state = client.mark_failed(&second, "gave up").await.unwrap();
    assert_eq!(state, TaskState::Failed);
    let task = client.get("flaky-job").await.unwrap().unwrap();
    assert_eq!(task.errors, ["busy", "gave up"]);
    let counts = ts.store.counts("manual").await.unwrap();
    assert_eq!((counts.failed, counts.running, counts.retrying), (1, 0, 0));
}

rebound_tests::on_both_stores!(
    work_done_outside_a_plugin_goes_through_a_lease,
    marked_failures_retry_or_end_the_task,
);
