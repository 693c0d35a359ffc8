"""Write Rebound task handlers in Python.

A plugin is one Python module that declares one handler::

    from rebound_sdk import Fatal, handler, log

    @handler
    def resize(task):
        width = task.param("width")
        if width > 10_000:
            raise Fatal(f"width {width} is over the limit of 10000")
        log.info(f"resizing to {width} px")
        return {"width": width}

``python -m rebound_sdk build resize.py`` turns it into ``resize.wasm``, a WebAssembly
component that serves the queue ``resize`` once it is in the host's plugin directory. A
handler that also wants the ``on_exhausted`` hook subclasses :class:`Handler` instead.

Every attempt runs in a fresh, sandboxed instance, under the host's deadline, fuel and
memory limits. It reaches only what the host grants: :data:`log`, :func:`set_progress`,
:func:`cancelled`, and the environment variables its manifest names. Anything printed to
stdout or stderr ends up in the host's log, tagged with the task.
"""

import os as _os
import sys as _sys

# `python -m rebound_sdk build email.py`, run in the app's own folder, puts that folder first
# on the module path, where `email.py` would hide the standard library's `email` from the
# build command itself before it could say so. The build needs no module from that folder
# (it hands the app's folder to componentize-py on its own), so it is taken off the path.
if (
    _sys.argv[:1] == ["-m"]
    and _sys.orig_argv[-len(_sys.argv) :][:1] == [__name__]
    and _sys.path[:1] == [_os.getcwd()]
):
    del _sys.path[0]

from .handler import Handler, handler  # noqa: E402
from .host import cancelled, log, set_progress  # noqa: E402
from .task import Failure, Fatal, Retry, RetryAfter, Task  # noqa: E402

__all__ = [
    "Failure",
    "Fatal",
    "Handler",
    "Retry",
    "RetryAfter",
    "Task",
    "cancelled",
    "handler",
    "log",
    "set_progress",
]
