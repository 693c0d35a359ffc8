"""The glue between componentize-py's generated bindings and a :class:`Handler`.

The build command generates an entry module that calls :func:`world_for` with the plugin
author's module; componentize-py exports the class it returns. Only ever imported inside
a component being built.
"""

from __future__ import annotations

import json
import traceback
from types import ModuleType
from typing import Any

from componentize_py_types import Err
from wit_world.imports import types as wit

from . import host
from .handler import Handler, find_handler
from .task import Failure, Fatal, RetryAfter, Task


def _task(task: wit.Task) -> Task:
    return Task(
        id=task.id,
        queue=task.queue,
        params_json=task.params,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        gpu=task.gpu,
        progress=task.progress,
    )


def _failure(failure: Failure) -> Any:
    if isinstance(failure, Fatal):
        return wit.Failure_Fatal(failure.message)
    if isinstance(failure, RetryAfter):
        return wit.Failure_RetryAfter(wit.RetryAfter(failure.delay_ms, failure.message))
    return wit.Failure_Retry(failure.message)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _log_traceback(what: str, error: BaseException) -> None:
    host.log.error(f"{what} raised:\n" + "".join(traceback.format_exception(error)))


def _handle(handler: Handler, task: wit.Task) -> str:
    host._start_attempt(task.progress)
    try:
        output = handler.handle(_task(task))
    except Failure as failure:
        raise Err(_failure(failure)) from None
    except ImportError as error:
        # Only modules imported while the plugin was built are in it: retrying cannot help.
        _log_traceback("handler", error)
        fix = f"add `import {error.name}`" if error.name else "import it"
        raise Err(
            wit.Failure_Fatal(
                f"{_describe(error)} (a plugin holds only the modules imported while it was "
                "built, and a library may import one only when it is first used: "
                f"{fix} at the top of the handler's module)"
            )
        ) from None
    except BaseException as error:
        # Python's habit: an unexpected exception is worth another try (SystemExit too: a
        # handler cannot end the plugin). The traceback goes to the host's log; the task
        # keeps the one-line summary.
        _log_traceback("handler", error)
        raise Err(wit.Failure_Retry(_describe(error))) from None
    try:
        return json.dumps(output, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        # The same code would return the same value on every retry.
        raise Err(wit.Failure_Fatal(f"the handler's result is not JSON: {error}")) from None


def world_for(module: ModuleType) -> type:
    """The class componentize-py exports for the handler that ``module`` declares."""
    handler = find_handler(module)

    class WitWorld:
        def handle(self, task: wit.Task) -> str:
            return _handle(handler, task)

        def on_exhausted(self, task: wit.Task, error: str) -> None:
            try:
                handler.on_exhausted(_task(task), error)
            except BaseException as raised:
                _log_traceback("on_exhausted", raised)

    return WitWorld
