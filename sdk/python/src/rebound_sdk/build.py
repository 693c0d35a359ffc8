"""``python -m rebound_sdk build APP.py``: turns a handler module into a plugin component.

It writes a small entry module that exports the handler ``APP.py`` declares, and runs
componentize-py on it against the WIT contract shipped in this package. componentize-py
imports the app while it builds (its top level runs then, not per task), snapshots the
interpreter, and writes one component holding CPython, the app and what it imports.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

WIT_DIR = Path(__file__).resolve().parent / "wit"
WORLD = "rebound:plugin/handler"
_ENTRY = "rebound_plugin_entry"
# Names the component's own modules take; an app by one of these names would shadow them.
_RESERVED = {_ENTRY, "rebound_sdk", "wit_world", "componentize_py_types", "componentize_py_runtime"}
# Standard modules of the CPython that componentize-py embeds (3.14) which an older Python
# running the build does not list in `sys.stdlib_module_names`: an app by one of these names
# would be hidden by them inside the component.
_EMBEDDED_STDLIB_ONLY = {"annotationlib", "compression", "_colorize", "_pyrepl"}
# What the host accepts as a queue name (a plugin serves the queue its file is named after,
# unless its manifest names another).
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_RUN_COMPONENTIZE_PY = (
    "import sys, componentize_py; sys.argv[0] = 'componentize-py'; "
    "sys.exit(componentize_py.script())"
)


class BuildError(Exception):
    """The plugin could not be built; the message says why."""


def _module_name(app: Path) -> str:
    if app.suffix != ".py":
        raise BuildError(f"{app} is not a Python file (expected NAME.py)")
    if not app.is_file():
        raise BuildError(f"{app} does not exist")
    name = app.stem
    if not name.isidentifier() or keyword.iskeyword(name):
        raise BuildError(
            f"{app.name}: `{name}` cannot be imported as a Python module; rename the file"
        )
    if name in _RESERVED:
        raise BuildError(f"{app.name}: the module name `{name}` is reserved; rename the file")
    if name in getattr(sys, "stdlib_module_names", ()) or name in _EMBEDDED_STDLIB_ONLY:
        raise BuildError(
            f"{app.name}: `{name}` is a module of Python's standard library, which an app by "
            "that name would hide (or be hidden by); rename the file"
        )
    # A syntax error is reported now, not after componentize-py has started CPython.
    try:
        compile(app.read_bytes(), str(app), "exec", dont_inherit=True)
    except SyntaxError as error:
        where = f"{error.filename}, line {error.lineno}"
        raise BuildError(f"{where}: {error.msg}\n    {(error.text or '').rstrip()}") from None
    return name


def build(
    app: Path,
    output: Optional[Path] = None,
    python_path: Sequence[Path] = (),
    quiet: bool = False,
) -> Path:
    """Builds the handler in ``app`` into ``output`` (default: ``NAME.wasm`` in the current
    directory, for ``app`` named ``NAME.py``) and returns the output's path.

    ``python_path`` adds directories to search for the app's own imports, after the
    app's directory and the active virtual environment's site-packages.
    """
    app = Path(app)
    module = _module_name(app)
    output = Path(output) if output is not None else Path(f"{module}.wasm")
    if output.suffix != ".wasm":
        raise BuildError(f"{output}: a plugin's file name ends in .wasm")
    if not _QUEUE_NAME.match(output.stem) and not quiet:
        print(
            f"warning: {output.name}: `{output.stem}` is not a queue name (1 to 64 ASCII "
            "letters, digits, `-` or `_`), so the plugin needs a manifest (`queue = ...` in "
            f"{output.stem}.toml) to serve one",
            file=sys.stderr,
        )
    if importlib.util.find_spec("componentize_py") is None:
        raise BuildError(
            "componentize-py is not installed in this Python environment; "
            "install it with: pip install 'componentize-py>=0.25.1,<0.26'"
        )
    if not (WIT_DIR / "plugin.wit").is_file():
        raise BuildError(f"the SDK's WIT contract is missing from {WIT_DIR}; reinstall rebound-sdk")

    # The SDK itself must be importable inside the component, wherever it is installed.
    sdk_root = Path(__file__).resolve().parent.parent
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"cannot create the folder for {output}: {_os_reason(error)}") from None
    # Written beside the output, then renamed over it: a host watching the folder sees the
    # whole component appear at once, never a half-written one.
    partial = output.with_name(f".{output.name}.partial")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rebound-build-") as scratch:
        entry = Path(scratch) / f"{_ENTRY}.py"
        entry.write_text(
            "# Generated by `python -m rebound_sdk build`: exports the app's handler.\n"
            "import importlib\n"
            "import rebound_sdk._preload\n"
            "from rebound_sdk._export import world_for\n"
            f"WitWorld = world_for(importlib.import_module({module!r}))\n"
        )
        search = [Path(scratch), app.resolve().parent, *map(Path, python_path), sdk_root]
        command = [sys.executable, "-c", _RUN_COMPONENTIZE_PY]
        command += ["--wit-path", str(WIT_DIR), "--world", WORLD, "componentize", _ENTRY]
        for directory in search:
            command += ["--python-path", str(directory)]
        command += ["--output", str(partial)]
        # Its errors end in a Rust backtrace when RUST_BACKTRACE is set; the Python
        # traceback before it is what the plugin author needs.
        env = {**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        detail = done.stderr.split("\nStack backtrace:")[0]
        # componentize-py wraps the app's own traceback in one of its own, then repeats
        # the error after "Caused by:"; the app's traceback is what matters.
        _, wrapped, inner = detail.partition("AssertionError: ")
        detail = (inner if wrapped else detail).split("\n\nCaused by:")[0].strip()
        hint = _missing_module_hint(detail, [app.resolve().parent, *map(Path, python_path)])
        raise BuildError(
            f"componentize-py could not build {app.name} (exit {done.returncode}):\n"
            + (detail or done.stdout.strip() or "it printed nothing")
            + (f"\n\n{hint}" if hint else "")
        )
    try:
        os.replace(partial, output)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise BuildError(f"cannot write {output}: {_os_reason(error)}") from None
    if not quiet:
        size = output.stat().st_size / 1e6
        took = time.monotonic() - started
        print(
            f"built {output} ({size:.1f} MB) in {took:.1f} s; "
            f"it serves the queue `{output.stem}`",
            file=sys.stderr,
        )
    return output


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error)


def _missing_module_hint(detail: str, folders: Sequence[Path]) -> Optional[str]:
    """Why a module the build could not import is missing or broken, when this machine has
    it as an extension module, compiled for the machine: the module is not found at all, or
    a package's pure-Python part fails to import names from its compiled part ("cannot
    import name 'X' from 'pkg._core' (unknown location)"). Looks at files only; nothing is
    imported."""
    found = re.findall(
        r"(?:ModuleNotFoundError: No module named|ImportError: cannot import name '\w+' from)"
        r" '([\w.]+)'",
        detail,
    )
    if not found:
        return None
    name = found[-1]
    top = name.split(".")[0]
    for entry in [*folders, *map(Path, sys.path)]:
        package = entry / top
        extensions = sorted(entry.glob(f"{top}.*.so")) + sorted(entry.glob(f"{top}.*.pyd"))
        if package.is_dir():
            extensions += sorted(package.rglob("*.so")) + sorted(package.rglob("*.pyd"))
        if extensions:
            return (
                f"`{top}` is installed here, but with code compiled for this machine "
                f"({extensions[0]}), which cannot load in WebAssembly: a plugin can use "
                "pure-Python packages only"
            )
    return None
