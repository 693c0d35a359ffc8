"""The task a handler is given, and the failures it may end an attempt with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any, Optional, Union

_MISSING: Any = object()
# The first attempt and the retries of the host's default policy (`retry.max_retry_count`).
_DEFAULT_MAX_ATTEMPTS = 4


class Failure(Exception):
    """Why an attempt did not succeed. Raise one of its subclasses from ``handle``.

    Any other exception a handler raises counts as :class:`Retry`, with the exception's
    type and message as the task's error.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message) or type(self).__name__
        super().__init__(message)
        self.message = message


class Retry(Failure):
    """Try again after the delay that the task's retry policy gives for this attempt."""


class RetryAfter(Failure):
    """Try again after ``delay`` (seconds, or a ``timedelta``), instead of the policy's
    delay; for example the ``Retry-After`` of a busy server. It still uses up a retry."""

    def __init__(self, delay: Union[float, timedelta], message: str = "") -> None:
        super().__init__(message)
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not seconds >= 0:
            raise ValueError(f"RetryAfter delay must be zero or more seconds, not {delay!r}")
        self.delay_ms = round(seconds * 1000)


class Fatal(Failure):
    """Give up now: the task fails with this message and is never retried, whatever
    retries it has left, and the ``on_exhausted`` hook is not called."""


@dataclass(frozen=True)
class Task:
    """One attempt of one task, as ``handle`` receives it."""

    id: str
    """The task's id, unique among all of Rebound's tasks."""
    queue: str
    """The queue the task was submitted to."""
    params_json: str
    """The producer's parameters as JSON text; :attr:`params` decodes them."""
    attempt: int
    """Which attempt this is, counting from 1."""
    max_attempts: int
    """The most attempts the task may get; on the last one a retry fails the task."""
    gpu: Optional[int] = None
    """The GPU the host's gate reserved for this attempt, or ``None``."""
    progress: int = 0
    """The progress last reported for the task (0-100), carried over between attempts."""

    @cached_property
    def params(self) -> Any:
        """The parameters, decoded from JSON. Text that does not decode fails the task
        fatally, since a retry would fail the same way."""
        try:
            return json.loads(self.params_json)
        except ValueError as error:
            raise Fatal(f"task {self.id} has unusable params: {error}") from None

    def param(self, name: str, default: Any = _MISSING) -> Any:
        """One field of the parameters, which must be a JSON object. A missing field
        fails the task fatally, naming the field, unless ``default`` is given."""
        params = self.params
        if not isinstance(params, dict):
            raise Fatal(f"params is a JSON {_json_kind(params)}, not an object")
        if name in params:
            return params[name]
        if default is _MISSING:
            raise Fatal(f"params has no field `{name}`")
        return default

    @classmethod
    def of(cls, params: Any = None, **fields: Any) -> "Task":
        """A task for a handler's unit tests: ``params`` (default ``{}``) encoded as the
        producer would, and any other field given by name (``attempt=2``, say).
        ``max_attempts`` defaults to what the host's default retry policy gives (4: the
        first attempt and 3 retries), or to ``attempt`` when that is higher."""
        fields.setdefault("id", "test-task")
        fields.setdefault("queue", "test")
        fields.setdefault("attempt", 1)
        fields.setdefault("max_attempts", max(fields["attempt"], _DEFAULT_MAX_ATTEMPTS))
        return cls(params_json=json.dumps({} if params is None else params), **fields)

    @property
    def is_last_attempt(self) -> bool:
        """Whether this is the task's last attempt: a retry asked for now fails the task."""
        return self.attempt >= self.max_attempts


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__
