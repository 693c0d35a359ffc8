"""`flaky`: fails until a given attempt, then succeeds; exercises retries and backoff.

The Python twin of plugins/flaky, with the same parameters (all optional):

- `succeed_at` (default 1): the first attempt that succeeds. Earlier attempts ask for a
  retry with the task's backoff policy.
- `retry_after_ms`: when set, earlier attempts ask for a retry after exactly this delay
  instead of the policy's.
- `fatal`: when true, the first attempt fails fatally instead.

When the task runs out of retries, the `on_exhausted` hook logs one warning.
"""

from rebound_sdk import Fatal, Handler, Retry, RetryAfter, log


class Flaky(Handler):
    def handle(self, task):
        if task.param("fatal", False):
            raise Fatal("asked to fail fatally")
        succeed_at = task.param("succeed_at", 1)
        if task.attempt < succeed_at:
            message = (
                f"attempt {task.attempt} of {task.max_attempts} fails on purpose; "
                f"success comes at attempt {succeed_at}"
            )
            retry_after_ms = task.param("retry_after_ms", None)
            if retry_after_ms is not None:
                raise RetryAfter(retry_after_ms / 1000, message)
            raise Retry(message)
        return {"succeeded_at": task.attempt}

    def on_exhausted(self, task, error):
        log.warn(f"task {task.id} gave up after {task.attempt} attempts: {error}")
