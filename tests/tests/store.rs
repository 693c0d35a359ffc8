//! The store contract, checked the same way on Redis and on the embedded store: no plugins,
//! no host, only transitions and what they leave behind.

use std::collections::HashSet;
use std::time::Duration;

use rebound::gpu::{GpuGate, GpuRequirement};
use rebound::store::{AttemptRef, FailedAttempt, HostReport, NextStep, Requeued, StoreError};
use rebound::task::{NewTask, TaskState};
use rebound_tests::{Backend, TestStore};

const LEASE: Duration = Duration::from_secs(30);

/// A failed attempt as a host reports it, with no hook run and no progress.
fn failure(error: &str, next: NextStep) -> FailedAttempt {
    FailedAttempt {
        error: error.to_owned(),
        next,
        exhausted_hook_ran: false,
        progress: 0,
    }
}

fn echo(id: &str) -> NewTask {
    NewTask {
        id: Some(id.to_owned()),
        ..NewTask::new("echo", "{}")
    }
}

async fn duplicate_id_is_refused_in_any_queue(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("same")).await.unwrap();

    let again = ts.store.create(echo("same")).await.unwrap_err();
    assert!(
        matches!(&again, StoreError::DuplicateId { id, queue } if id == "same" && queue == "echo"),
        "{again}"
    );
    assert!(again.to_string().contains("already exists"), "{again}");

    let elsewhere = NewTask {
        id: Some("same".into()),
        ..NewTask::new("other", "{}")
    };
    let err = ts.store.create(elsewhere).await.unwrap_err();
    assert!(matches!(err, StoreError::DuplicateId { .. }), "{err}");
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!(counts.pending, 1, "the refused creates changed nothing");
}

async fn invalid_input_names_the_field(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let err = ts
        .store
        .create(NewTask::new("echo", "{oops"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("params is not valid JSON"),
        "{err}"
    );
    assert!(ts.store.queues().await.unwrap().is_empty());
}

async fn claim_orders_by_priority_then_fifo(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let plan = [("low", -5), ("a", 0), ("high", 10), ("b", 0), ("c", 0)];
    for (id, priority) in plan {
        let task = NewTask {
            priority,
            ..echo(id)
        };
        ts.store.create(task).await.unwrap();
        // Distinct creation times, so FIFO order is well defined.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }

    let mut order = Vec::new();
    for _ in 0..plan.len() {
        let claimed = ts.store.claim("echo", "h", 1, LEASE).await.unwrap();
        order.push(claimed[0].id.clone());
    }
    assert_eq!(order, ["high", "a", "b", "c", "low"]);
    assert!(
        ts.store
            .claim("echo", "h", 1, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn delayed_task_is_claimable_only_when_due(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let task = NewTask {
        delay_ms: 300,
        ..echo("later")
    };
    let created = ts.store.create(task).await.unwrap();
    assert_eq!(created.state, TaskState::Pending);
    assert!(created.run_at_ms >= created.created_ms + 300);

    assert!(
        ts.store
            .claim("echo", "h", 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let claimed = ts.store.claim("echo", "h", 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, "later");
}

async fn claim_starts_an_attempt_under_a_lease(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("t")).await.unwrap();
    let claimed = ts.store.claim("echo", "host-a", 5, LEASE).await.unwrap();

    assert_eq!(claimed.len(), 1);
    let task = &claimed[0];
    assert_eq!(task.state, TaskState::Running);
    assert_eq!(task.attempt, 1);
    let lease = task.lease.as_ref().unwrap();
    assert_eq!(lease.owner, "host-a");
    assert_eq!(lease.token, 1);
    assert!(lease.deadline_ms >= task.started_ms.unwrap() + 29_000);
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.pending, counts.running), (0, 1));
}

async fn stale_lease_reports_are_rejected(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("t")).await.unwrap();
    let first = ts.store.claim("echo", "a", 1, LEASE).await.unwrap();
    let first = AttemptRef::of(&first[0]);

    // The first attempt fails into a retry; a second claim takes the task over.
    let retry = failure("boom", NextStep::RetryIn(Duration::ZERO));
    assert_eq!(
        ts.store.fail(&first, &retry).await.unwrap(),
        TaskState::Retrying
    );
    let second = ts.store.claim("echo", "b", 1, LEASE).await.unwrap();
    let second = AttemptRef::of(&second[0]);
    assert_eq!(second.token, first.token + 1);

    // Reports under the first token change nothing.
    let err = ts.store.complete(&first, "{}", 100).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::LeaseLost { transition: "complete", state, .. } if state == "running"),
        "{err}"
    );
    assert!(ts.store.fail(&first, &retry).await.is_err());
    assert!(ts.store.set_progress(&first, 50).await.is_err());

    ts.store
        .complete(&second, "{\"ok\":true}", 10)
        .await
        .unwrap();
    let task = ts.store.get("t").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result.as_deref(), Some("{\"ok\":true}"));
    assert_eq!(task.progress, 10);
    assert_eq!(task.errors, ["boom"]);

    let missing = AttemptRef {
        id: "nope".into(),
        queue: "echo".into(),
        token: 1,
    };
    let err = ts.store.complete(&missing, "{}", 0).await.unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

async fn failure_transitions_follow_the_hosts_decision(backend: Backend) {
    // (next step, hook ran) → expected state, count of hook runs
    let cases = [
        (
            NextStep::RetryIn(Duration::from_secs(60)),
            false,
            TaskState::Retrying,
            0,
        ),
        (NextStep::Fail, true, TaskState::Failed, 1),
        (NextStep::Fail, false, TaskState::Failed, 0),
    ];
    let ts = TestStore::new(backend).await.unwrap();
    for (n, (next, hook, expected, hook_runs)) in cases.into_iter().enumerate() {
        let id = format!("case-{n}");
        ts.store.create(echo(&id)).await.unwrap();
        let claimed = ts.store.claim("echo", "h", 1, LEASE).await.unwrap();
        let failure = FailedAttempt {
            error: format!("error {n}"),
            next,
            exhausted_hook_ran: hook,
            progress: 40,
        };
        let state = ts
            .store
            .fail(&AttemptRef::of(&claimed[0]), &failure)
            .await
            .unwrap();
        assert_eq!(state, expected, "case {n}");

        let task = ts.store.get(&id).await.unwrap().unwrap();
        assert_eq!(task.state, expected, "case {n}");
        assert_eq!(task.exhausted_hook_runs, hook_runs, "case {n}");
        assert_eq!(task.last_error.as_deref(), Some(failure.error.as_str()));
        assert_eq!(task.progress, 40);
        assert!(task.lease.is_none());
        if expected == TaskState::Retrying {
            assert!(task.run_at_ms >= task.updated_ms + 59_000, "case {n}");
            assert!(task.finished_ms.is_none());
        } else {
            assert!(task.finished_ms.is_some());
        }
    }
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.retrying, counts.failed, counts.running), (1, 2, 0));
}

async fn progress_never_goes_down(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("p")).await.unwrap();
    let claimed = ts.store.claim("echo", "h", 1, LEASE).await.unwrap();
    let attempt = AttemptRef::of(&claimed[0]);
    for (set, expected) in [(30, 30), (20, 30), (100, 100), (250, 100)] {
        ts.store.set_progress(&attempt, set).await.unwrap();
        let task = ts.store.get("p").await.unwrap().unwrap();
        assert_eq!(task.progress, expected, "after set_progress({set})");
    }
}

async fn heartbeat_extends_the_lease_of_the_holder_only(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("h")).await.unwrap();
    let claimed = ts
        .store
        .claim("echo", "a", 1, Duration::from_millis(200))
        .await
        .unwrap();
    let attempt = AttemptRef::of(&claimed[0]);
    let first_deadline = claimed[0].lease.as_ref().unwrap().deadline_ms;

    ts.store.heartbeat(&attempt, LEASE).await.unwrap();
    let task = ts.store.get("h").await.unwrap().unwrap();
    let renewed = task.lease.unwrap().deadline_ms;
    assert!(
        renewed >= first_deadline + 29_000,
        "{renewed} vs {first_deadline}"
    );

    // A renewed lease is not expired, so nothing is taken back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = ts.store.requeue_expired("echo", 10, 3).await.unwrap();
    assert_eq!(done, Requeued::default());

    let stale = AttemptRef {
        token: attempt.token + 1,
        ..attempt
    };
    let err = ts.store.heartbeat(&stale, LEASE).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                transition: "heartbeat",
                ..
            }
        ),
        "{err}"
    );
}

async fn expired_leases_are_taken_back_without_charging_an_attempt(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("orphan")).await.unwrap();
    let short = Duration::from_millis(100);
    let claimed = ts.store.claim("echo", "dead-host", 1, short).await.unwrap();
    let lost = AttemptRef::of(&claimed[0]);

    tokio::time::sleep(Duration::from_millis(150)).await;
    let done = ts.store.requeue_expired("echo", 10, 3).await.unwrap();
    assert_eq!(
        done,
        Requeued {
            requeued: 1,
            failed: 0,
            canceled: 0
        }
    );

    let task = ts.store.get("orphan").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(task.attempt, 0, "the lost attempt is not charged");
    assert_eq!(task.lease_losses, 1);
    assert!(task.lease.is_none());
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.pending, counts.running), (1, 0));

    // The dead host's late report is refused; the next claim runs attempt 1 again.
    assert!(ts.store.complete(&lost, "{}", 0).await.is_err());
    let again = ts.store.claim("echo", "b", 1, LEASE).await.unwrap();
    assert_eq!(again[0].attempt, 1);
    assert_eq!(again[0].lease.as_ref().unwrap().token, lost.token + 1);
}

async fn too_many_lease_losses_fail_the_task(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store.create(echo("cursed")).await.unwrap();
    let short = Duration::from_millis(50);
    // Two losses are allowed; the third fails the task.
    for round in 1..=3 {
        let claimed = ts.store.claim("echo", "h", 1, short).await.unwrap();
        assert_eq!(claimed.len(), 1, "round {round}");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let done = ts.store.requeue_expired("echo", 10, 2).await.unwrap();
        let expected = if round < 3 {
            Requeued {
                requeued: 1,
                failed: 0,
                canceled: 0,
            }
        } else {
            Requeued {
                requeued: 0,
                failed: 1,
                canceled: 0,
            }
        };
        assert_eq!(done, expected, "round {round}");
    }
    let task = ts.store.get("cursed").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.lease_losses, 3);
    let error = task.last_error.unwrap();
    assert!(error.contains("lost its lease 3 times"), "{error}");
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.failed, counts.running, counts.pending), (1, 0, 0));
}

async fn release_hands_a_task_back_uncharged(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    ts.store
        .create(NewTask {
            priority: 7,
            ..echo("r")
        })
        .await
        .unwrap();
    let claimed = ts.store.claim("echo", "a", 1, LEASE).await.unwrap();
    let attempt = AttemptRef::of(&claimed[0]);

    ts.store
        .release(&attempt, 30, Duration::ZERO)
        .await
        .unwrap();
    let task = ts.store.get("r").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!((task.attempt, task.progress, task.lease_losses), (0, 30, 0));
    assert!(
        ts.store
            .release(&attempt, 30, Duration::ZERO)
            .await
            .is_err(),
        "released only once"
    );

    let again = ts.store.claim("echo", "b", 1, LEASE).await.unwrap();
    assert_eq!(again[0].id, "r");
    assert_eq!(again[0].attempt, 1);
    assert_eq!(again[0].priority, 7);
}

async fn cancel_depends_on_the_state(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let delayed = NewTask {
        delay_ms: 60_000,
        ..echo("delayed")
    };
    for task in [echo("pending"), delayed, echo("retrying"), echo("done")] {
        ts.store.create(task).await.unwrap();
    }
    // Put "retrying" into its backoff and "done" into completed.
    for id in ["retrying", "done"] {
        loop {
            let claimed = ts.store.claim("echo", "h", 1, LEASE).await.unwrap();
            let attempt = AttemptRef::of(&claimed[0]);
            if attempt.id != id {
                ts.store.release(&attempt, 0, Duration::ZERO).await.unwrap();
                continue;
            }
            if id == "retrying" {
                let retry = failure("later", NextStep::RetryIn(Duration::from_secs(60)));
                ts.store.fail(&attempt, &retry).await.unwrap();
            } else {
                ts.store.complete(&attempt, "{}", 0).await.unwrap();
            }
            break;
        }
    }

    // (task, answer) — waiting tasks are canceled at once
    for id in ["pending", "delayed", "retrying"] {
        assert_eq!(
            ts.store.cancel(id).await.unwrap(),
            TaskState::Canceled,
            "{id}"
        );
        let task = ts.store.get(id).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Canceled, "{id}");
        assert!(task.finished_ms.is_some());
    }
    assert!(
        ts.store
            .claim("echo", "h", 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    let err = ts.store.cancel("done").await.unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::WrongState {
                state: TaskState::Completed,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("it is completed"), "{err}");
    let err = ts.store.cancel("nope").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");

    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!(
        (counts.canceled, counts.completed, counts.unfinished()),
        (3, 1, 0)
    );
}

async fn cancel_of_a_running_task_is_applied_when_its_attempt_ends(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let ids = ["by-fail", "by-release", "by-requeue", "by-complete"];
    for id in ids {
        ts.store.create(echo(id)).await.unwrap();
    }
    let short = Duration::from_millis(100);
    let mut attempts = std::collections::HashMap::new();
    for task in ts.store.claim("echo", "h", 4, short).await.unwrap() {
        attempts.insert(task.id.clone(), AttemptRef::of(&task));
    }
    for id in ids {
        assert_eq!(
            ts.store.cancel(id).await.unwrap(),
            TaskState::Running,
            "{id}"
        );
    }
    let mut requested = ts.store.cancel_requests("echo").await.unwrap();
    requested.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(requested, expected);

    // However the attempt ends, a canceled task is not retried or handed back.
    let retry = failure("stopped", NextStep::RetryIn(Duration::ZERO));
    let state = ts.store.fail(&attempts["by-fail"], &retry).await.unwrap();
    assert_eq!(state, TaskState::Canceled);
    ts.store
        .release(&attempts["by-release"], 0, Duration::ZERO)
        .await
        .unwrap();
    ts.store
        .complete(&attempts["by-complete"], "{}", 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let done = ts.store.requeue_expired("echo", 10, 3).await.unwrap();
    assert_eq!(
        done,
        Requeued {
            requeued: 0,
            failed: 0,
            canceled: 1
        }
    );

    for (id, expected) in [
        ("by-fail", TaskState::Canceled),
        ("by-release", TaskState::Canceled),
        ("by-requeue", TaskState::Canceled),
        ("by-complete", TaskState::Completed),
    ] {
        let task = ts.store.get(id).await.unwrap().unwrap();
        assert_eq!(task.state, expected, "{id}");
        assert!(!task.cancel_requested, "{id}");
    }
    assert!(ts.store.cancel_requests("echo").await.unwrap().is_empty());
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!(
        (counts.canceled, counts.completed, counts.running),
        (3, 1, 0)
    );
}

async fn retry_requeues_failed_and_canceled_tasks_only(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    for id in ["failed", "canceled", "pending"] {
        ts.store.create(echo(id)).await.unwrap();
    }
    ts.store.cancel("canceled").await.unwrap();
    let claimed = ts.store.claim("echo", "h", 1, LEASE).await.unwrap();
    assert_eq!(claimed[0].id, "failed");
    let fatal = failure("bad", NextStep::Fail);
    ts.store
        .fail(&AttemptRef::of(&claimed[0]), &fatal)
        .await
        .unwrap();

    for id in ["failed", "canceled"] {
        let task = ts.store.retry(id).await.unwrap();
        assert_eq!((task.state, task.attempt), (TaskState::Pending, 0), "{id}");
        assert!(task.finished_ms.is_none(), "{id}");
    }
    let again = ts.store.get("failed").await.unwrap().unwrap();
    assert_eq!(again.errors, ["bad"], "the error history stays");

    let err = ts.store.retry("pending").await.unwrap_err();
    assert!(err.to_string().contains("only failed or canceled"), "{err}");
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.pending, counts.failed, counts.canceled), (3, 0, 0));
    let claimed = ts.store.claim("echo", "h", 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 3);
}

async fn finished_tasks_are_deleted_after_their_retention(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    for id in ["done", "failed", "canceled", "waiting"] {
        ts.store.create(echo(id)).await.unwrap();
    }
    ts.store.cancel("canceled").await.unwrap();
    let claimed = ts.store.claim("echo", "h", 2, LEASE).await.unwrap();
    for task in &claimed {
        let attempt = AttemptRef::of(task);
        if task.id == "done" {
            ts.store.complete(&attempt, "{}", 0).await.unwrap();
        } else {
            let fatal = failure("no", NextStep::Fail);
            ts.store.fail(&attempt, &fatal).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let kept = ts
        .store
        .trim_finished("echo", Duration::from_secs(60), 100)
        .await;
    assert_eq!(kept.unwrap(), 0, "nothing is old enough");
    let deleted = ts
        .store
        .trim_finished("echo", Duration::from_millis(20), 2)
        .await;
    assert_eq!(deleted.unwrap(), 2, "at most `max` per call");
    let deleted = ts
        .store
        .trim_finished("echo", Duration::from_millis(20), 100)
        .await;
    assert_eq!(deleted.unwrap(), 1);

    for id in ["done", "failed", "canceled"] {
        assert!(ts.store.get(id).await.unwrap().is_none(), "{id}");
    }
    assert!(ts.store.get("waiting").await.unwrap().is_some());
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!(
        counts,
        rebound::task::StateCounts {
            pending: 1,
            ..Default::default()
        }
    );
}

async fn listing_by_state_pages_through_every_task_once(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    for n in 0..30 {
        let task = NewTask {
            // Some waiting ones are delayed, so a listing must look past the claimable ones.
            delay_ms: if n % 3 == 0 { 60_000 } else { 0 },
            ..echo(&format!("t{n:02}"))
        };
        ts.store.create(task).await.unwrap();
    }
    let mut completed = HashSet::new();
    for task in ts.store.claim("echo", "h", 8, LEASE).await.unwrap() {
        ts.store
            .complete(&AttemptRef::of(&task), "{}", 0)
            .await
            .unwrap();
        completed.insert(task.id);
    }

    // (state, expected number of tasks)
    for (state, expected) in [(TaskState::Pending, 22), (TaskState::Completed, 8)] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let page = ts
                .store
                .list("echo", state, 5, cursor.as_deref())
                .await
                .unwrap();
            assert!(page.tasks.len() <= 5);
            seen.extend(page.tasks.into_iter().map(|task| {
                assert_eq!(task.state, state);
                task.id
            }));
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "{state}: the listing ends");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{state}: no task twice");
        assert_eq!(seen.len(), expected, "{state}");
        if state == TaskState::Completed {
            assert_eq!(seen.into_iter().collect::<HashSet<_>>(), completed);
        }
    }
    let none = ts
        .store
        .list("echo", TaskState::Failed, 5, None)
        .await
        .unwrap();
    assert!(none.tasks.is_empty() && none.next.is_none());
    let err = ts
        .store
        .list("echo", TaskState::Pending, 5, Some("garbage"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cursor `garbage`"), "{err}");
}

async fn concurrent_claims_never_share_a_task(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    for n in 0..200 {
        ts.store.create(echo(&format!("t{n}"))).await.unwrap();
    }
    let other = ts.reopen().await.unwrap();

    // Two handles, as two hosts would have, claim small batches as fast as they can.
    let claim_all = |store: rebound::store::SharedStore, owner: &'static str| async move {
        let mut mine = Vec::new();
        loop {
            let batch = store.claim("echo", owner, 3, LEASE).await.unwrap();
            if batch.is_empty() {
                return mine;
            }
            mine.extend(batch.into_iter().map(|task| task.id));
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(claim_all(ts.store.clone(), "a")),
        tokio::spawn(claim_all(other, "b")),
    );
    let (a, b) = (a.unwrap(), b.unwrap());

    let mut seen = HashSet::new();
    for id in a.iter().chain(&b) {
        assert!(seen.insert(id.clone()), "task {id} was claimed twice");
    }
    assert_eq!(seen.len(), 200);
    assert!(!a.is_empty() && !b.is_empty(), "both claimers got work");
    let counts = ts.store.counts("echo").await.unwrap();
    assert_eq!((counts.pending, counts.running), (0, 200));
}

async fn queues_and_counts_are_per_queue(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    for queue in ["b-queue", "a-queue", "a-queue"] {
        ts.store.create(NewTask::new(queue, "{}")).await.unwrap();
    }
    assert_eq!(ts.store.queues().await.unwrap(), ["a-queue", "b-queue"]);
    assert_eq!(ts.store.counts("a-queue").await.unwrap().pending, 2);
    assert_eq!(ts.store.counts("b-queue").await.unwrap().pending, 1);
    assert_eq!(ts.store.counts("unknown").await.unwrap().unfinished(), 0);
    assert!(ts.store.get("no-such-task").await.unwrap().is_none());
}

async fn release_with_a_delay_holds_the_task_back_until_then(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let needs = GpuRequirement::from_settings(Some(2.5), Some(60.0)).unwrap();
    ts.store
        .create(NewTask {
            gpu: Some(needs),
            priority: 1,
            ..echo("held")
        })
        .await
        .unwrap();
    ts.store.create(echo("behind")).await.unwrap();
    let claimed = ts.store.claim("echo", "a", 1, LEASE).await.unwrap();
    assert_eq!(claimed[0].gpu, Some(needs), "the requirement is kept");

    let delay = Duration::from_millis(400);
    ts.store
        .release(&AttemptRef::of(&claimed[0]), 0, delay)
        .await
        .unwrap();
    let task = ts.store.get("held").await.unwrap().unwrap();
    assert_eq!((task.state, task.attempt), (TaskState::Pending, 0));
    // The task behind it (lower priority) goes first now; the held one only once its
    // delay has passed.
    let next = ts.store.claim("echo", "a", 5, LEASE).await.unwrap();
    let ids: Vec<&str> = next.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["behind"]);
    tokio::time::sleep(delay + Duration::from_millis(100)).await;
    let again = ts.store.claim("echo", "a", 5, LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id.as_str(), again[0].attempt), ("held", 1));
}

async fn host_reports_are_kept_until_their_ttl(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let report = |host: &str, held: usize| HostReport {
        host: host.to_owned(),
        queues: vec!["echo".to_owned()],
        started_ms: 1,
        reported_ms: 2,
        gate: GpuGate::closed("test").snapshot(),
        held_at_gate: [("echo".to_owned(), held)].into(),
    };
    let ttl = Duration::from_millis(600);
    ts.store.report_host(&report("b", 1), ttl).await.unwrap();
    ts.store.report_host(&report("a", 1), ttl).await.unwrap();
    ts.store.report_host(&report("a", 2), ttl).await.unwrap();

    let hosts = ts.store.hosts().await.unwrap();
    assert_eq!(
        hosts,
        [report("a", 2), report("b", 1)],
        "sorted, latest report only"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    ts.store.report_host(&report("b", 3), ttl).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hosts = ts.store.hosts().await.unwrap();
    assert_eq!(
        hosts,
        [report("b", 3)],
        "a's report expired, b's was renewed"
    );
    ts.store.forget_host("b").await.unwrap();
    assert_eq!(ts.store.hosts().await.unwrap(), []);
}

rebound_tests::on_both_stores!(
    release_with_a_delay_holds_the_task_back_until_then,
    host_reports_are_kept_until_their_ttl,
    duplicate_id_is_refused_in_any_queue,
    invalid_input_names_the_field,
    claim_orders_by_priority_then_fifo,
    delayed_task_is_claimable_only_when_due,
    claim_starts_an_attempt_under_a_lease,
    stale_lease_reports_are_rejected,
    failure_transitions_follow_the_hosts_decision,
    progress_never_goes_down,
    heartbeat_extends_the_lease_of_the_holder_only,
    expired_leases_are_taken_back_without_charging_an_attempt,
    too_many_lease_losses_fail_the_task,
    release_hands_a_task_back_uncharged,
    cancel_depends_on_the_state,
    cancel_of_a_running_task_is_applied_when_its_attempt_ends,
    retry_requeues_failed_and_canceled_tasks_only,
    finished_tasks_are_deleted_after_their_retention,
    listing_by_state_pages_through_every_task_once,
    concurrent_claims_never_share_a_task,
    queues_and_counts_are_per_queue,
);
