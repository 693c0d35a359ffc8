"""How a module declares its handler: a :class:`Handler` subclass, or a function marked
with :func:`handler`."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Callable

from .task import Task


class Handler:
    """A task handler. Subclass it and override :meth:`handle`; override
    :meth:`on_exhausted` to act when a task has used up its retries.

    Rebound runs every attempt in a fresh instance of the plugin, so nothing a handler
    keeps in memory (on ``self`` or in a global) survives from one attempt to the next.
    """

    def handle(self, task: Task) -> Any:
        """Runs one attempt and returns the task's result, which must encode as JSON.
        Raise :class:`~rebound_sdk.Retry`, :class:`~rebound_sdk.RetryAfter` or
        :class:`~rebound_sdk.Fatal` to fail the attempt; any other exception is a retry."""
        raise NotImplementedError(f"{type(self).__name__} does not define handle(self, task)")

    def on_exhausted(self, task: Task, error: str) -> None:
        """Called once, in a fresh instance, when the task failed and has no retries left;
        ``error`` is the last attempt's error. It cannot change the outcome. The default
        does nothing."""


class _FunctionHandler(Handler):
    def __init__(self, function: Callable[[Task], Any]) -> None:
        self._function = function
        self.__name__ = getattr(function, "__name__", "handler")
        self.__doc__ = getattr(function, "__doc__", None)
        self.__module__ = getattr(function, "__module__", __name__)

    def handle(self, task: Task) -> Any:
        return self._function(task)

    def __call__(self, task: Task) -> Any:
        return self._function(task)


def handler(function: Callable[[Task], Any]) -> Handler:
    """Marks ``function(task)`` as the module's handler, for a plugin that needs no
    ``on_exhausted`` hook. The function stays callable, for its tests."""
    if not callable(function):
        raise TypeError(f"@handler takes a function, not {type(function).__name__}")
    _refuse_coroutine(function, getattr(function, "__name__", "the handler"))
    return _FunctionHandler(function)


def _refuse_coroutine(function: Any, name: str) -> None:
    # Each attempt is one synchronous call; nothing would ever run the coroutine.
    if inspect.iscoroutinefunction(function):
        raise TypeError(f"{name} is `async def`; a handler is a plain function (no event loop runs it)")


def _superseded(value: Any, found: list[tuple[str, Any]]) -> bool:
    """Whether the handler class ``value`` only serves another of those ``found``: a base
    class that another derives from, or the class of an instance the module configured
    (``resize = Resize(width=640)``)."""
    if not isinstance(value, type):
        return False
    for _, other in found:
        if other is value:
            continue
        if issubclass(other, value) if isinstance(other, type) else isinstance(other, value):
            return True
    return False


def find_handler(module: ModuleType) -> Handler:
    """The one handler ``module`` declares: a :class:`Handler` subclass, an instance of one,
    or a function marked with :func:`handler`. Those defined in the module come first; a base
    class that another of them derives from, or a class the module made an instance of, does
    not count. Failing those, one handler the module imported will do. Zero or several is an
    error that says which."""
    own: list[tuple[str, Any]] = []
    imported: list[tuple[str, Any]] = []
    for name, value in vars(module).items():
        is_instance = isinstance(value, Handler)
        is_class = (
            isinstance(value, type)
            and issubclass(value, Handler)
            and value not in (Handler, _FunctionHandler)
        )
        if is_instance or is_class:
            (own if value.__module__ == module.__name__ else imported).append((name, value))
    own = [(name, value) for name, value in own if not _superseded(value, own)]
    imported = [(name, value) for name, value in imported if not _superseded(value, imported)]
    found = own or imported
    if not found:
        raise LookupError(
            f"module {module.__name__} declares no handler: define a subclass of "
            "rebound_sdk.Handler, or mark a function with @rebound_sdk.handler"
        )
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        where = "declares" if own else "imports"
        raise LookupError(
            f"module {module.__name__} {where} {len(found)} handlers ({names}); "
            "a plugin has exactly one"
        )
    name, value = found[0]
    if isinstance(value, Handler):
        return value
    _refuse_coroutine(value.handle, f"{name}.handle")
    try:
        return value()
    except TypeError as error:
        raise TypeError(
            f"handler class {name} in {module.__name__} must be constructible "
            f"without arguments ({error}), or made once at import time with its "
            f"settings: `handler = {name}(...)`"
        ) from None
