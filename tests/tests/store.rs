//! The store contract, checked the same way on Redis and on the embedded store: no plugins,
//! no host, only transitions and what they leave behind.

use std::collections::HashSet;
use std::time::Duration;

use rebound::store::{AttemptRef, FailedAttempt, NextStep, Requeued, StoreError};
use rebound::task::{NewTask, TaskState};
use rebound_tests::{Backend, TestStore};

const LEASE: Duration = Duration::from_secs(30);

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
    let retry = FailedAttempt {
        error: "boom".into(),
        next: NextStep::RetryIn(Duration::ZERO),
        exhausted_hook_ran: false,
        progress: 0,
    };
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
            failed: 0
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
            }
        } else {
            Requeued {
                requeued: 0,
                failed: 1,
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

    ts.store.release(&attempt, 30).await.unwrap();
    let task = ts.store.get("r").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!((task.attempt, task.progress, task.lease_losses), (0, 30, 0));
    assert!(
        ts.store.release(&attempt, 30).await.is_err(),
        "released only once"
    );

    let again = ts.store.claim("echo", "b", 1, LEASE).await.unwrap();
    assert_eq!(again[0].id, "r");
    assert_eq!(again[0].attempt, 1);
    assert_eq!(again[0].priority, 7);
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

rebound_tests::on_both_stores!(
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
    concurrent_claims_never_share_a_task,
    queues_and_counts_are_per_queue,
);
