"""The SDK's command line: ``python -m rebound_sdk build APP.py [-o NAME.wasm]``."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from .build import BuildError, build


def _version() -> str:
    try:
        return importlib.metadata.version("rebound-sdk")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rebound_sdk",
        description="Build Rebound task handlers written in Python into WebAssembly plugins.",
    )
    parser.add_argument("--version", action="version", version=f"rebound-sdk {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_command = commands.add_parser(
        "build",
        help="build a handler module into a plugin component",
        description="Build the handler that APP.py declares into a WebAssembly component. "
        "Copy the result into the host's plugin directory; its file name is the queue it "
        "serves.",
    )
    build_command.add_argument(
        "app", type=Path, metavar="APP.py", help="the module that declares the handler"
    )
    build_command.add_argument(
        "-o", "--output", type=Path, help="the component to write (default: NAME.wasm here)"
    )
    build_command.add_argument(
        "-p",
        "--python-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="another directory to find the app's imports in (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        build(args.app, args.output, args.python_path)
    except (BuildError, OSError) as error:
        # OSError: a file the build reads or writes, past its own checks (a full disk, say).
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
